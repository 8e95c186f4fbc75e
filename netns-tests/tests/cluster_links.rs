//! The coordinator cluster's links to NATS (README, *A coordinator cluster on NATS*): TLS
//! with a private CA (`--nats-ca`, `--nats-cert`, `--nats-key`), certificates made by the
//! test with the `openssl` CLI, the real `nats-server` requiring TLS and a client
//! certificate; and a cut from NATS long enough for the client to drop the connection.
//! Needs root, `nats-server`, `openssl`, `strace`, `nft` and `curl` (installed by
//! `./run-tests`).

use std::time::{Duration, Instant};

use a2a_netns_tests::{
    coordinator_counter as counter, cut_off_from_nats, report, require_tools, wait_for, CoordOpts,
    Coordinator, Lab, Nat, Router, COORDINATOR_PORT, NATS_CUT_TABLE, OVERLAY_TIMEOUT,
};

const METRICS_PORT: u16 = 9310;

/// A router of `nat` kind whose LAN reaches only `reach` of the coordinators (the others are
/// cut off: TCP answered with a reset, the rest dropped).
fn router(lab: &Lab, name: &str, coords: &[&Coordinator], reach: &Coordinator) -> Router {
    let r = lab.router(name, Nat::Easy);
    for c in coords {
        if c.addr != reach.addr {
            r.cut_off_from(*c.addr.ip());
        }
    }
    r
}

/// `token` with `only` as its one endpoint.
fn token_only(token: &str, only: &Coordinator) -> String {
    let mut t = a2a_proto::JoinToken::parse(token).expect("a valid token");
    t.endpoints = vec![only.addr.to_string()];
    t.encode()
}

/// A coordinator of the cluster (its identity, copied from `from`) started by hand with its
/// own TLS options.
fn coordinator_with(lab: &Lab, name: &str, from: &Coordinator, opts: CoordOpts) -> Coordinator {
    let ns = lab.add_ns(name);
    let endpoint = format!("{}:{COORDINATOR_PORT}", ns.wan_ip.expect("wan address"));
    lab.coordinator_in(
        ns,
        CoordOpts {
            endpoints: vec![endpoint],
            key_from: Some(from.state_dir.join("coordinator.key")),
            ..opts
        },
    )
}

/// One `nats-server` requiring TLS on its client port, its certificate signed by a private
/// CA made by the test, and a client certificate signed by it (`verify: true`). c1 and c2
/// are given that CA (`--nats-ca`), a client certificate and plain `nats://` URLs (the CA
/// makes TLS required): alpha (reaches only c1) and bravo (only c2) list each other. c3,
/// holding the cluster's key too, is given another CA: it does not join (charlie, on c3
/// only, lists nobody; alpha and bravo never list charlie) and its log says the server's
/// certificate was refused and why. c4, given the right CA but no client certificate, is
/// refused by the server. The nats-server opens no file for writing (strace).
#[test]
fn tls_with_a_private_ca_joins_and_a_wrong_ca_is_refused() {
    let Some(lab) = Lab::new("cltls") else {
        return;
    };
    require_tools(&[
        ("nats-server", "nats-server"),
        ("openssl", "openssl"),
        ("strace", "strace"),
        ("nft", "nftables"),
        ("curl", "curl"),
    ]);
    let nats_ns = [lab.add_ns("nats1")];
    let mut auth = lab.nats_auth();
    let tls = lab.nats_tls("good", &nats_ns);
    auth.tls = Some(tls.clone());
    let wrong = lab.nats_tls("wrong", &nats_ns);
    let nats = lab.nats_cluster(&nats_ns, &auth, true);
    let started = Instant::now();
    let coords = lab.coordinators_on_nats(&nats, &auth, 2, METRICS_PORT, false);
    let (c1, c2) = (&coords[0], &coords[1]);
    let base = CoordOpts {
        nats: vec![nats[0].url()],
        nats_credentials: Some(auth.file.clone()),
        ..CoordOpts::default()
    };
    // The wrong CA, the right client certificate.
    let c3 = coordinator_with(
        &lab,
        "coord3",
        c1,
        CoordOpts {
            nats_ca: Some(wrong.ca.clone()),
            nats_client_cert: Some(tls.client.clone()),
            ..base.clone()
        },
    );
    // The right CA, no client certificate.
    let c4 = coordinator_with(
        &lab,
        "coord4",
        c1,
        CoordOpts {
            nats_ca: Some(tls.ca.clone()),
            ..base.clone()
        },
    );
    let all = [c1, c2, &c3, &c4];
    let r_alpha = router(&lab, "rtr-alpha", &all, c1);
    let r_bravo = router(&lab, "rtr-bravo", &all, c2);
    let r_charlie = router(&lab, "rtr-charlie", &all, &c3);
    let alpha = lab.node_behind(&r_alpha, "alpha");
    let bravo = lab.node_behind(&r_bravo, "bravo");
    let charlie = lab.node_behind(&r_charlie, "charlie");
    alpha.up_ok(&c1.token);
    bravo.up_ok(&c1.token);
    charlie.up_ok(&token_only(&c1.token, &c3));
    let up = Instant::now();
    alpha.wait_listed(&["bravo"], OVERLAY_TIMEOUT);
    bravo.wait_listed(&["alpha"], OVERLAY_TIMEOUT);
    report(format!(
        "cluster tls: alpha (c1) and bravo (c2) list each other {} ms after bravo's `up` \
         returned, over TLS with a private CA",
        up.elapsed().as_millis()
    ));
    // c3 had every chance to join: presence every 2 s, a sync at each connection.
    std::thread::sleep(Duration::from_secs(8));
    charlie.wait_listed(&[], Duration::from_secs(1));
    alpha.wait_listed(&["bravo"], Duration::from_secs(1));
    bravo.wait_listed(&["alpha"], Duration::from_secs(1));
    let log = |c: &Coordinator| c.proc().stderr_text();
    for (name, c) in [("c1", c1), ("c2", c2)] {
        assert!(
            log(c).contains("cluster: connected to NATS"),
            "{name} did not connect:\n{}",
            log(c)
        );
    }
    let l3 = log(&c3);
    assert!(
        !l3.contains("cluster: connected to NATS"),
        "c3 (the wrong CA) connected:\n{l3}"
    );
    let refusal = l3
        .lines()
        .find(|l| l.contains("refused a NATS server's TLS certificate"))
        .unwrap_or_else(|| panic!("c3's log does not say why it did not join:\n{l3}"));
    assert!(refusal.contains("--nats-ca"), "{refusal}");
    report(format!("cluster tls: c3 (another CA) says: {refusal}"));
    let l4 = log(&c4);
    assert!(
        !l4.contains("cluster: connected to NATS"),
        "c4 (no client certificate) connected to a server that verifies clients:\n{l4}"
    );
    report(format!(
        "cluster tls: c4 (no client certificate) not connected {} s after its start",
        started.elapsed().as_secs()
    ));
    for n in &nats {
        let writes = n.file_writes();
        assert!(
            writes.is_empty(),
            "nats-server wrote:\n{}",
            writes.join("\n")
        );
    }
    drop((r_alpha, r_bravo, r_charlie));
}

/// How many times `c` printed `line`.
fn printed(c: &Coordinator, line: &str) -> usize {
    c.proc().stderr_text().matches(line).count()
}

const DISCONNECTED: &str = "cluster: disconnected from NATS";
const CONNECTED: &str = "cluster: connected to NATS";

/// Two coordinators on one `nats-server`; alpha reaches only c1, bravo only c2. c2 is cut off
/// from NATS (nft drops its traffic to and from the client port) until its client declares
/// the connection dead (the coordinator prints that it disconnected; measured) and its
/// reconnections fail; a node joins on each side meanwhile and sees its side. When the cut
/// ends, c2 reconnects (measured) and the four nodes list each other (measured; a generous
/// timeout, no timing assert). With async-nats' default PING interval (60 s) the connection
/// would not be declared dead within the test's minute.
#[test]
fn a_cut_long_enough_to_drop_the_nats_connection_reconnects_and_merges() {
    let Some(lab) = Lab::new("clcut") else {
        return;
    };
    require_tools(&[
        ("nats-server", "nats-server"),
        ("nft", "nftables"),
        ("curl", "curl"),
    ]);
    let auth = lab.nats_auth();
    let nats_ns = [lab.add_ns("nats1")];
    let nats = lab.nats_cluster(&nats_ns, &auth, false);
    let coords = lab.coordinators_on_nats(&nats, &auth, 2, METRICS_PORT, false);
    let (c1, c2) = (&coords[0], &coords[1]);
    let all = [c1, c2];
    let token = &c1.token;
    let r_a1 = router(&lab, "rtr-alpha", &all, c1);
    let r_b1 = router(&lab, "rtr-bravo", &all, c2);
    let alpha = lab.node_behind(&r_a1, "alpha");
    let bravo = lab.node_behind(&r_b1, "bravo");
    alpha.up_ok(token);
    bravo.up_ok(token);
    alpha.wait_listed(&["bravo"], OVERLAY_TIMEOUT);
    bravo.wait_listed(&["alpha"], OVERLAY_TIMEOUT);
    assert_eq!(printed(c2, CONNECTED), 1);

    cut_off_from_nats(&c2.ns, &nats);
    let cut = Instant::now();
    let dead = wait_for(
        Duration::from_secs(60),
        "c2 to declare its NATS connection dead",
        || {
            if printed(c2, DISCONNECTED) > 0 {
                Ok(cut.elapsed())
            } else {
                Err("c2 has not printed that it disconnected".to_string())
            }
        },
    );
    report(format!(
        "cluster cut: c2's NATS connection declared dead {} ms after the cut",
        dead.as_millis()
    ));
    // A node joins on each side; each side lists its own only.
    let r_a2 = router(&lab, "rtr-alpha2", &all, c1);
    let r_b2 = router(&lab, "rtr-bravo2", &all, c2);
    let alpha2 = lab.node_behind(&r_a2, "alpha-2");
    let bravo2 = lab.node_behind(&r_b2, "bravo-2");
    alpha2.up_ok(token);
    bravo2.up_ok(token);
    for (n, want) in [
        (&alpha, "alpha-2"),
        (&alpha2, "alpha"),
        (&bravo, "bravo-2"),
        (&bravo2, "bravo"),
    ] {
        n.wait_listed(&[want], OVERLAY_TIMEOUT);
    }
    // Its reconnections fail while the cut lasts.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(printed(c2, CONNECTED), 1, "c2 reconnected through the cut");
    c2.ns
        .exec(&["nft", "delete", "table", "inet", NATS_CUT_TABLE])
        .expect_ok();
    let back = Instant::now();
    let reconnected = wait_for(Duration::from_secs(30), "c2 to reconnect to NATS", || {
        if printed(c2, CONNECTED) >= 2 {
            Ok(back.elapsed())
        } else {
            Err("not yet".to_string())
        }
    });
    let names = ["alpha", "alpha-2", "bravo", "bravo-2"];
    for n in [&alpha, &alpha2, &bravo, &bravo2] {
        let others: Vec<&str> = names.iter().copied().filter(|x| *x != n.name).collect();
        n.wait_listed(&others, Duration::from_secs(60));
    }
    let merged = back.elapsed();
    report(format!(
        "cluster cut: c2 cut off for {} ms: reconnected {} ms after the cut ended, the four \
         nodes list each other {} ms after it ended",
        (back - cut).as_millis(),
        reconnected.as_millis(),
        merged.as_millis()
    ));
    for (i, c) in coords.iter().enumerate() {
        for refused in ["seal", "malformed", "flood", "record"] {
            assert_eq!(
                counter(c, &format!("cluster_refused_{refused}")),
                0,
                "c{} refused cluster messages ({refused})",
                i + 1
            );
        }
        report(format!(
            "cluster cut: c{}: syncs asked {}, coordinators expired {}, refused as stale {}, \
             as replays {}",
            i + 1,
            counter(c, "cluster_syncs_asked"),
            counter(c, "cluster_coordinators_expired"),
            counter(c, "cluster_refused_stale"),
            counter(c, "cluster_refused_replay"),
        ));
    }
    drop((r_a1, r_b1, r_a2, r_b2));
}
