//! Members without their coordinator: a member restarted while no coordinator runs comes back
//! with the peers it verified (`peers.json`, sealed by the node) and reaches them directly; an
//! edited file is refused and said so; a kicked member's record is not brought back; and a
//! peer the coordinator forgets stays while its direct path lives, then goes when it is quiet.
//! Real binaries in network namespaces; needs root (see the crate documentation).

use std::time::{Duration, Instant};

use a2a_netns_tests::{require_tool, wait_for, wait_until, CoordOpts, Lab, Node, OVERLAY_TIMEOUT};

/// The node keys of the peers in a node's `peers.json` (its body, which the seal covers).
fn saved_peers(node: &Node) -> Result<Vec<String>, String> {
    let path = node.state_dir.join("peers.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let body: serde_json::Value = serde_json::from_str(
        file["body"]
            .as_str()
            .ok_or_else(|| format!("no body in {text}"))?,
    )
    .map_err(|e| e.to_string())?;
    Ok(body["peers"]
        .as_array()
        .ok_or_else(|| format!("no peers in {body}"))?
        .iter()
        .map(|p| p["node_key"].as_str().unwrap_or_default().to_string())
        .collect())
}

/// The `listing` of peer `name` in `a2actl status --json` (`None`: listed).
fn listing(node: &Node, name: &str) -> Result<Option<String>, String> {
    let st = node.try_status()?;
    let p = st.raw["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .ok_or_else(|| format!("{} does not list {name}", node.name))?;
    Ok(p["listing"].as_str().map(str::to_string))
}

fn public_key(node: &Node) -> String {
    node.status().me.expect("joined").public_key
}

#[test]
fn a_member_restarted_without_coordinator_comes_back_with_its_verified_peers() {
    require_tool("ping", "iputils-ping");
    let Some(lab) = Lab::new("offline") else {
        return;
    };
    let coord = lab.coordinator(CoordOpts::default());
    let alpha = lab.node("alpha");
    let bravo = lab.node("bravo"); // restarted while no coordinator runs
    let charlie = lab.node("charlie"); // kicked before the coordinator goes down
    alpha.serve_http();
    bravo.serve_http();
    for n in [&alpha, &bravo, &charlie] {
        n.up_ok(&coord.token);
    }
    alpha.wait_peers(&["bravo", "charlie"], OVERLAY_TIMEOUT);
    bravo.wait_peers(&["alpha", "charlie"], OVERLAY_TIMEOUT);
    bravo.wait_http(&alpha, OVERLAY_TIMEOUT);
    bravo.wait_path("alpha", "direct", OVERLAY_TIMEOUT);
    alpha.wait_path("bravo", "direct", OVERLAY_TIMEOUT);
    let (alpha_key, charlie_key) = (public_key(&alpha), public_key(&charlie));

    // bravo's saved list holds both peers; a copy of it is kept (a file bravo really wrote,
    // that still holds charlie).
    wait_for(OVERLAY_TIMEOUT, "bravo to save both peers", || {
        let keys = saved_peers(&bravo)?;
        if keys.contains(&alpha_key) && keys.contains(&charlie_key) {
            Ok(())
        } else {
            Err(format!("saved: {keys:?}"))
        }
    });
    let peers_file = bravo.state_dir.join("peers.json");
    let with_charlie = std::fs::read(&peers_file).unwrap();

    // charlie is kicked while the coordinator runs; bravo saves the revocation and drops it
    // from its list.
    alpha.ctl(&["kick", "charlie"]).expect_ok();
    bravo.wait_peers(&["alpha"], OVERLAY_TIMEOUT);
    wait_for(
        OVERLAY_TIMEOUT,
        "bravo to save its list without charlie",
        || {
            let keys = saved_peers(&bravo)?;
            if keys == [alpha_key.clone()] {
                Ok(())
            } else {
                Err(format!("saved: {keys:?}"))
            }
        },
    );

    // The coordinator dies; bravo restarts with the older file that still holds charlie.
    coord.kill();
    bravo.stop_daemon(libc::SIGTERM);
    std::fs::write(&peers_file, &with_charlie).unwrap();
    let started = Instant::now();
    let daemon = bravo.start_daemon();
    // alpha comes back (no coordinator has listed it since: "saved") and is reached directly;
    // charlie's record verifies but charlie is revoked: it stays out.
    let st = bravo.wait_peers(&["alpha"], OVERLAY_TIMEOUT);
    assert!(st.peer("charlie").is_none());
    assert_eq!(listing(&bravo, "alpha").unwrap().as_deref(), Some("saved"));
    bravo.wait_path("alpha", "direct", OVERLAY_TIMEOUT);
    let took = started.elapsed();
    bravo.wait_http(&alpha, OVERLAY_TIMEOUT);
    let alpha_ip = alpha.overlay_ip().to_string();
    bravo
        .ns
        .exec(&["ping", "-c", "3", "-W", "2", &alpha_ip])
        .expect_ok();
    let pongs = bravo.ping_peer("alpha", 3);
    assert!(
        pongs
            .iter()
            .any(|(path, rtt)| path == "direct" && rtt.is_some()),
        "no direct pong from alpha: {pongs:?}"
    );
    let log = daemon.stderr_text();
    assert!(
        log.contains("restored 1 peers") && log.contains("1 records refused"),
        "{log}"
    );
    assert!(
        bravo.counter("records_revoked") >= 1,
        "charlie's record was not refused as revoked"
    );
    let human = bravo.ctl(&["status"]).expect_ok();
    assert!(human.stdout.contains("(saved)"), "{human}");
    eprintln!(
        "bravo restarted without coordinator: direct to alpha {:.1} s after the start",
        took.as_secs_f64()
    );

    // An edited file is refused as a whole, and said so: alpha's endpoint pointed elsewhere.
    bravo.stop_daemon(libc::SIGTERM);
    let text = std::fs::read_to_string(&peers_file).unwrap();
    let edited = text.replacen(":51820", ":51821", 1);
    assert_ne!(edited, text, "no endpoint to edit in {text}");
    std::fs::write(&peers_file, edited).unwrap();
    let daemon = bravo.start_daemon();
    wait_until(
        Duration::from_secs(10),
        "bravo to say it ignores the edited peers.json",
        || {
            let log = daemon.stderr_text();
            log.contains("ignoring") && log.contains("peers.json") && log.contains("edited")
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let st = bravo.status();
    assert!(
        st.peers.is_empty(),
        "peers from an edited file: {:?}",
        st.peers
    );
    assert_eq!(bravo.counter("peers_file_refused"), 1);
    assert!(
        bravo.fetch_from(&alpha, 3).is_err(),
        "alpha reachable without any record"
    );
}

#[test]
fn a_peer_the_coordinator_forgets_stays_while_its_direct_path_lives() {
    require_tool("nft", "nftables");
    let Some(lab) = Lab::new("unlisted") else {
        return;
    };
    let coord = lab.coordinator(CoordOpts::default());
    let alpha = lab.node("alpha");
    let bravo = lab.node("bravo");
    alpha.serve_http();
    bravo.serve_http();
    alpha.up_ok(&coord.token);
    bravo.up_ok(&coord.token);
    alpha.wait_peers(&["bravo"], OVERLAY_TIMEOUT);
    alpha.wait_http(&bravo, OVERLAY_TIMEOUT);
    alpha.wait_path("bravo", "direct", OVERLAY_TIMEOUT);
    bravo.wait_path("alpha", "direct", OVERLAY_TIMEOUT);
    assert_eq!(listing(&alpha, "bravo").unwrap(), None);

    // bravo loses the coordinator (every packet to or from it dropped) but not alpha: its
    // session expires there and the coordinator tells alpha it is gone.
    let coord_ip = coord.addr.ip().to_string();
    let rules = format!(
        "table inet cut {{\n\
           chain out {{ type filter hook output priority 0; ip daddr {coord_ip} drop; }}\n\
           chain in {{ type filter hook input priority 0; ip saddr {coord_ip} drop; }}\n\
         }}\n"
    );
    let file = lab.dir().join("cut-coordinator.nft");
    std::fs::write(&file, rules).unwrap();
    bravo
        .ns
        .exec(&["nft", "-f", &file.to_string_lossy()])
        .expect_ok();
    let cut = Instant::now();
    wait_for(
        Duration::from_secs(90),
        "alpha to see bravo unlisted",
        || match listing(&alpha, "bravo")? {
            Some(l) if l == "unlisted" => Ok(()),
            other => Err(format!("listing {other:?}")),
        },
    );
    let unlisted_after = cut.elapsed();
    let log = alpha.daemon().stderr_text();
    assert!(log.contains("left the coordinator's list"), "{log}");
    // It stays, direct, and carries traffic, well past the quiet time of a silent peer.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        alpha
            .fetch_from(&bravo, 5)
            .unwrap_or_else(|e| panic!("bravo unreachable once unlisted: {e}"));
        assert_eq!(alpha.path_to("bravo").unwrap().0, "direct");
        std::thread::sleep(Duration::from_secs(2));
    }
    let human = alpha.ctl(&["status"]).expect_ok();
    assert!(human.stdout.contains("direct (unlisted)"), "{human}");

    // bravo goes silent: alpha drops it once nothing came from it for the quiet time.
    bravo.stop_daemon(libc::SIGKILL);
    let silent = Instant::now();
    alpha.wait_peers(&[], Duration::from_secs(30));
    let dropped_after = silent.elapsed();
    assert!(
        dropped_after >= Duration::from_secs(7),
        "dropped {dropped_after:?} after going silent: sooner than the quiet time (10 s)"
    );
    assert_eq!(alpha.counter("peers_unlisted_dropped"), 1);
    eprintln!(
        "unlisted {:.1} s after the cut; dropped {:.1} s after going silent",
        unlisted_after.as_secs_f64(),
        dropped_after.as_secs_f64()
    );
}
