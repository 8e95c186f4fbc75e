//! Membership the hub cannot forge: a forging coordinator's members are refused, invites admit
//! exactly as many machines as they say, and kick and rotation remove a machine for good.
//! Real binaries in network namespaces; needs root (see the crate documentation).

use std::net::Ipv4Addr;
use std::time::Duration;

use a2a_netns_tests::{
    report, require_tool, wait_for, wait_until, Capture, CoordOpts, Lab, Node, OVERLAY_TIMEOUT,
};

/// Captures the node's overlay interface with `tcpdump`, into a file in the lab directory.
fn capture_overlay(lab: &Lab, node: &Node) -> Capture {
    let file = lab.dir().join(format!("{}-a2a0.pcap", node.name));
    Capture::start(&node.ns, "a2a0", file)
}

/// Source addresses of the IPv4 packets in a capture file.
fn sources(node: &Node, file: &std::path::Path) -> Vec<Ipv4Addr> {
    let f = file.to_string_lossy().into_owned();
    let out = node
        .ns
        .exec(&["tcpdump", "-n", "-r", &f, "-q", "ip"])
        .expect_ok();
    out.stdout
        .lines()
        .filter_map(|l| {
            // "12:00:00.000000 IP 100.64.1.2.8080 > 100.64.3.4.5555: tcp 0"
            let src = l.split_whitespace().nth(2)?;
            let ip: String = src.splitn(5, '.').take(4).collect::<Vec<_>>().join(".");
            ip.parse().ok()
        })
        .collect()
}

#[test]
fn a_forging_coordinator_adds_no_member() {
    let Some(lab) = Lab::new("forged") else {
        return;
    };
    require_tool("tcpdump", "tcpdump");
    let coord = lab.coordinator(CoordOpts {
        forging: true,
        ..Default::default()
    });
    let alpha = lab.node("alpha");
    let bravo = lab.node("bravo");
    alpha.serve_http();
    bravo.serve_http();
    // alpha's capture starts before bravo joins, so it sees the forged member announced and
    // its handshakes sent to alpha at bravo's registration; charlie's join sends both again.
    alpha.up_ok(&coord.token);
    let cap_a = capture_overlay(&lab, &alpha);
    bravo.up_ok(&coord.token);
    let cap_b = capture_overlay(&lab, &bravo);
    let charlie = lab.node("charlie");
    charlie.up_ok(&coord.token);
    // Only the genuine members: never a forged one, however long we look.
    alpha.wait_peers(&["bravo", "charlie"], OVERLAY_TIMEOUT);
    bravo.wait_peers(&["alpha", "charlie"], OVERLAY_TIMEOUT);
    alpha.wait_http(&bravo, OVERLAY_TIMEOUT);
    bravo.wait_http(&alpha, OVERLAY_TIMEOUT);
    // Let the forged handshakes and their retries play out, then look again.
    std::thread::sleep(Duration::from_secs(3));
    alpha.wait_peers(&["bravo", "charlie"], Duration::from_secs(1));
    bravo.wait_peers(&["alpha", "charlie"], Duration::from_secs(1));
    charlie.wait_peers(&["alpha", "bravo"], Duration::from_secs(1));

    // Every forgery was dropped and counted by kind. bravo registered second, so it also got
    // alpha's first record replayed, a tampered copy of it and a forged revocation of alpha.
    for (node, stale) in [(&alpha, 0), (&bravo, 1)] {
        let got = |c| node.counter(c);
        report(format!(
            "{}: unsigned {} bad_signature {} foreign {} stale {} membership_bad_signature {} \
             udp_unknown_peer {}",
            node.name,
            got("records_unsigned"),
            got("records_bad_signature"),
            got("records_foreign"),
            got("records_stale"),
            got("membership_bad_signature"),
            got("udp_unknown_peer"),
        ));
        assert!(got("records_unsigned") >= 1, "{}: unsigned", node.name);
        // The forged member, the self-issued certificate (and for bravo the tampered copy).
        assert!(
            got("records_bad_signature") >= 2 + stale,
            "{}: bad signatures",
            node.name
        );
        assert!(got("records_foreign") >= 1, "{}: foreign", node.name);
        assert!(got("records_stale") >= stale, "{}: stale", node.name);
        // The forged rotation notice (and for bravo the forged revocation).
        assert!(
            got("membership_bad_signature") > stale,
            "{}: forged revocation/rotation",
            node.name
        );
        // The forged member's relayed handshake initiations (8 at each later join) found no
        // peer.
        assert!(
            got("udp_unknown_peer") >= 16,
            "{}: forged handshakes",
            node.name
        );
    }
    // The network did not move and nobody was removed: the two still talk.
    alpha.wait_http(&bravo, Duration::from_secs(5));
    bravo.wait_http(&alpha, Duration::from_secs(5));

    // No packet from anyone but the two members reached either overlay interface.
    cap_a.stop();
    cap_b.stop();
    let members = [alpha.overlay_ip(), bravo.overlay_ip(), charlie.overlay_ip()];
    for (node, cap) in [(&alpha, &cap_a), (&bravo, &cap_b)] {
        let srcs = sources(node, cap.file());
        assert!(
            srcs.len() >= 4,
            "{}: the capture saw almost nothing ({}), so it proves nothing",
            node.name,
            srcs.len()
        );
        let strangers: Vec<_> = srcs.iter().filter(|s| !members.contains(s)).collect();
        assert!(
            strangers.is_empty(),
            "{}: packets from outside the network reached a2a0: {strangers:?}",
            node.name
        );
        report(format!(
            "{}: {} packets on a2a0, all from members",
            node.name,
            srcs.len()
        ));
    }
    coord.assert_running();
    alpha.assert_daemon_running();
    bravo.assert_daemon_running();
}

/// `a2actl invite` on `node`; returns the code.
#[track_caller]
fn invite(node: &Node, args: &[&str]) -> String {
    let mut full = vec!["invite"];
    full.extend_from_slice(args);
    let out = node.ctl(&full).expect_ok();
    let code = out.stdout.trim().to_string();
    assert!(code.starts_with("a2ai"), "invite printed {code:?}");
    code
}

#[test]
fn invites_admit_exactly_as_many_as_they_say() {
    let Some(lab) = Lab::new("invite") else {
        return;
    };
    let coord = lab.coordinator(CoordOpts::default());
    let alpha = lab.node("alpha");
    alpha.serve_http();
    alpha.up_ok(&coord.token);

    // A one-time code, redeemed by three machines at once: exactly one gets in.
    let code = invite(&alpha, &["--uses", "1", "--ttl", "10m"]);
    assert!(
        code.len() < coord.token.len(),
        "the invite code is shorter than the token"
    );
    let racers: Vec<Node> = ["r1", "r2", "r3"].iter().map(|n| lab.node(n)).collect();
    let outcomes: Vec<a2a_netns_tests::Output> = std::thread::scope(|s| {
        let handles: Vec<_> = racers.iter().map(|n| s.spawn(|| n.up(&code))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<&Node> = racers
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| o.success())
        .map(|(n, _)| n)
        .collect();
    for (n, o) in racers.iter().zip(&outcomes) {
        report(format!(
            "{}: {}",
            n.name,
            if o.success() {
                "admitted".to_string()
            } else {
                o.stderr.trim().to_string()
            }
        ));
        if !o.success() {
            assert!(
                o.stderr.contains("invite"),
                "{}: the refusal names the invite: {o}",
                n.name
            );
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "a one-time invite admitted {}",
        winners.len()
    );
    let winner = winners[0];
    winner.serve_http();
    winner.wait_peers(&["alpha"], OVERLAY_TIMEOUT);
    alpha.wait_http(winner, OVERLAY_TIMEOUT);
    winner.wait_http(&alpha, OVERLAY_TIMEOUT);
    // The invited node never saw the network secret: its saved membership holds the invite
    // code and a certificate, not the token.
    let saved = std::fs::read_to_string(winner.state_dir.join("network.json")).unwrap();
    assert!(
        !saved.contains(&coord.token),
        "the invited node holds the token"
    );
    assert!(
        saved.contains("\"cert\""),
        "the invited node holds a certificate: {saved}"
    );
    // An invited node cannot invite, kick or rotate.
    let out = winner.ctl(&["invite"]).expect_fail();
    assert!(
        out.stderr.contains("does not hold the network secret"),
        "{out}"
    );
    winner.ctl(&["token", "rotate"]).expect_fail();
    // It survives a daemon restart with its certificate.
    winner.stop_daemon(libc::SIGTERM);
    winner.start_daemon();
    winner.wait_peers(&["alpha"], OVERLAY_TIMEOUT);
    winner.wait_http(&alpha, OVERLAY_TIMEOUT);

    // Two uses: two machines, then a refusal.
    let code = invite(&alpha, &["--uses", "2"]);
    let others: Vec<&Node> = racers.iter().filter(|n| n.name != winner.name).collect();
    for n in &others {
        n.up_ok(&code);
    }
    let third = lab.node("third");
    let out = third.up(&code).expect_fail();
    assert!(out.stderr.contains("invite"), "{out}");
    alpha.wait_peers(&["r1", "r2", "r3"], OVERLAY_TIMEOUT);

    // Expiry: a code for 2 s no longer works after 3 s.
    let code = invite(&alpha, &["--ttl", "2s"]);
    std::thread::sleep(Duration::from_secs(3));
    let out = third.up(&code).expect_fail();
    assert!(out.stderr.contains("expired"), "{out}");
    // A damaged code is named before the daemon is asked.
    let mut bad = code.clone();
    bad.truncate(code.len() - 5);
    let out = third.up(&bad).expect_fail();
    assert!(out.stderr.contains("invite code"), "{out}");
    // Nobody got in by those refusals.
    alpha.wait_peers(&["r1", "r2", "r3"], Duration::from_secs(1));
    let st = third.status();
    assert!(st.me.is_none(), "third joined: {:?}", st.me);
}

#[test]
fn kick_and_rotation_remove_a_machine() {
    let Some(lab) = Lab::new("kick") else {
        return;
    };
    let coord = lab.coordinator(CoordOpts::default());
    let alpha = lab.node("alpha"); // joins with the token; runs the commands
    let bravo = lab.node("bravo"); // admitted by invite, then kicked
    let charlie = lab.node("charlie"); // joins with the token, then kicked and rotated out
    let delta = lab.node("delta"); // joins with the token, carried by the rotation
    let echo = lab.node("echo"); // admitted by invite, carried by the rotation
    for n in [&alpha, &bravo, &charlie, &delta, &echo] {
        n.serve_http();
    }
    alpha.up_ok(&coord.token);
    charlie.up_ok(&coord.token);
    delta.up_ok(&coord.token);
    let code = invite(&alpha, &["--uses", "2"]);
    bravo.up_ok(&code);
    echo.up_ok(&code);
    let all = ["alpha", "bravo", "charlie", "delta", "echo"];
    for n in [&alpha, &bravo, &charlie, &delta, &echo] {
        let others: Vec<&str> = all.iter().copied().filter(|x| *x != n.name).collect();
        n.wait_peers(&others, OVERLAY_TIMEOUT);
    }
    bravo.wait_http(&delta, OVERLAY_TIMEOUT);
    charlie.wait_http(&delta, OVERLAY_TIMEOUT);

    // Kick the invited node: every member drops it and its packets.
    let out = alpha.ctl(&["kick", "bravo"]).expect_ok();
    assert!(!out.stderr.contains("warning"), "{out}");
    for n in [&alpha, &charlie, &delta, &echo] {
        let others: Vec<&str> = all
            .iter()
            .copied()
            .filter(|x| *x != n.name && *x != "bravo")
            .collect();
        n.wait_peers(&others, OVERLAY_TIMEOUT);
    }
    for target in [&alpha, &delta, &echo] {
        assert!(
            bravo.fetch_from(target, 3).is_err(),
            "the kicked node still reaches {}",
            target.name
        );
    }
    // Its used invite and its old certificate do not bring it back.
    bravo.up(&code).expect_fail();
    bravo.stop_daemon(libc::SIGTERM);
    bravo.start_daemon();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        bravo.fetch_from(&alpha, 3).is_err(),
        "the kicked node came back"
    );
    alpha.wait_peers(&["charlie", "delta", "echo"], Duration::from_secs(1));

    // Kick a node that holds the secret: a2actl warns it could rejoin; rotate shuts it out.
    let out = alpha.ctl(&["kick", "charlie"]).expect_ok();
    assert!(out.stderr.contains("token rotate"), "{out}");
    let out = alpha.ctl(&["token", "rotate"]).expect_ok();
    let new_token = out.stdout.trim().to_string();
    assert!(
        new_token.starts_with("a2a1") && new_token != coord.token,
        "{out}"
    );
    report(format!("rotate: {}", out.stderr.trim()));
    // delta (secret) and echo (invite) come along and keep talking to alpha.
    for n in [&delta, &echo] {
        wait_until(OVERLAY_TIMEOUT, &format!("{} to move", n.name), || {
            std::fs::read_to_string(n.state_dir.join("network.json"))
                .map(|s| !s.contains(&coord.token))
                .unwrap_or(false)
        });
    }
    let saved = std::fs::read_to_string(delta.state_dir.join("network.json")).unwrap();
    assert!(saved.contains(&new_token), "delta saved the new token");
    alpha.wait_peers(&["delta", "echo"], OVERLAY_TIMEOUT);
    delta.wait_peers(&["alpha", "echo"], OVERLAY_TIMEOUT);
    echo.wait_peers(&["alpha", "delta"], OVERLAY_TIMEOUT);
    for (a, b) in [(&alpha, &delta), (&delta, &echo), (&echo, &alpha)] {
        a.wait_http(b, OVERLAY_TIMEOUT);
        b.wait_http(a, OVERLAY_TIMEOUT);
    }
    // The carried members still run after a restart, on the new secret.
    echo.stop_daemon(libc::SIGTERM);
    echo.start_daemon();
    echo.wait_http(&alpha, OVERLAY_TIMEOUT);

    // charlie comes back under a brand-new key with the old token: it registers in the old
    // network, which is empty and tells it that it was left behind.
    charlie.stop_daemon(libc::SIGTERM);
    std::fs::remove_file(charlie.state_dir.join("node.key")).unwrap();
    std::fs::remove_file(charlie.state_dir.join("network.json")).unwrap();
    charlie.start_daemon();
    let _ = charlie.up(&coord.token);
    let why = wait_for(OVERLAY_TIMEOUT, "charlie to be refused", || {
        let st = charlie.status();
        let registered = st.raw["self"]["registered"].as_bool().unwrap_or(false);
        if registered {
            Err("still registered".to_string())
        } else {
            Ok(st.raw.to_string())
        }
    });
    report(format!("charlie after rotation: {why}"));
    assert!(charlie.status().peers.is_empty(), "charlie sees peers");
    for target in [&alpha, &delta, &echo] {
        assert!(
            charlie.fetch_from(target, 3).is_err(),
            "charlie reaches {} with the old token",
            target.name
        );
    }
    alpha.wait_peers(&["delta", "echo"], Duration::from_secs(1));
    // The new token admits a new machine.
    let foxtrot = lab.node("foxtrot");
    foxtrot.up_ok(&new_token);
    foxtrot.wait_peers(&["alpha", "delta", "echo"], OVERLAY_TIMEOUT);
}
