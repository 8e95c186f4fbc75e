//! End-to-end scenarios: real a2a binaries, real TUN devices, one lab (set of network
//! namespaces) per test. Needs root; see the crate documentation of `a2a_netns_tests`.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use a2a_netns_tests::{
    assert_private_files, garbage, in_prefix, report, require_tool, wait_for, wait_until,
    CoordOpts, Coordinator, Lab, Node, Status, DEFAULT_PREFIX, NODE_PORT, OVERLAY_TIMEOUT,
};

/// Joins `node` and checks the address `a2actl up` printed against the prefix and `a2actl ip`.
#[track_caller]
fn join(node: &Node, token: &str, prefix: &str) -> Ipv4Addr {
    let ip = node.up_ok(token);
    assert!(
        in_prefix(ip, prefix),
        "{}: `a2actl up` printed {ip}, outside the network prefix {prefix}",
        node.name
    );
    assert_eq!(
        node.ctl_ip().unwrap(),
        ip,
        "{}: `a2actl ip` disagrees with `a2actl up`",
        node.name
    );
    ip
}

/// HTTP over the overlay between every ordered pair of `nodes`, polling each pair.
#[track_caller]
fn http_all_pairs(nodes: &[&Node]) {
    for a in nodes {
        for b in nodes {
            if a.name != b.name {
                a.wait_http(b, OVERLAY_TIMEOUT);
            }
        }
    }
}

/// A coordinator and two nodes, `alpha` and `bravo`, joined to its network, each serving HTTP,
/// with HTTP already working both ways.
fn two_joined_nodes(lab: &Lab) -> (Coordinator, Node, Node) {
    let coord = lab.coordinator(CoordOpts::default());
    let alpha = lab.node("alpha");
    let bravo = lab.node("bravo");
    for n in [&alpha, &bravo] {
        n.serve_http();
        join(n, &coord.token, DEFAULT_PREFIX);
    }
    http_all_pairs(&[&alpha, &bravo]);
    (coord, alpha, bravo)
}

/// HTTP between every ordered pair must work right now (one attempt each, 5 s).
#[track_caller]
fn http_all_pairs_now(nodes: &[&Node], when: &str) {
    for a in nodes {
        for b in nodes {
            if a.name != b.name {
                if let Err(e) = a.fetch_from(b, 5) {
                    panic!("{when}: HTTP {} -> {} failed: {e}", a.name, b.name);
                }
            }
        }
    }
}

#[track_caller]
fn assert_no_peer(st: &Status, who: &str, other: &Node, other_ip: Ipv4Addr, other_key: &str) {
    for p in &st.peers {
        assert!(
            p.name != other.name && p.ip != other_ip && p.public_key != other_key,
            "{who} lists {} ({other_ip}) of another network as a peer: {p:?}",
            other.name
        );
    }
}

/// Sum of the daemon's `counters` (drop counters), if it reports them.
fn counter_sum(st: &Status) -> Option<u64> {
    st.raw
        .get("counters")?
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
}

fn self_key(node: &Node) -> String {
    node.status()
        .me
        .unwrap_or_else(|| panic!("{} has no self in its status", node.name))
        .public_key
}

#[test]
fn three_nodes_on_one_segment() {
    let Some(lab) = Lab::new("three_nodes") else {
        return;
    };
    require_tool("iperf3", "iperf3");
    let prefix = "100.77.0.0/16";
    let coord = lab.coordinator(CoordOpts {
        prefix: Some(prefix.into()),
        ..Default::default()
    });
    let nodes: Vec<Node> = ["alpha", "bravo", "charlie"]
        .iter()
        .map(|n| lab.node(n))
        .collect();
    for n in &nodes {
        n.serve_http();
    }
    let (alpha, bravo, charlie) = (&nodes[0], &nodes[1], &nodes[2]);

    join(alpha, &coord.token, prefix);
    join(bravo, &coord.token, prefix);
    // Time the last join: from `a2actl up` to its first HTTP answer from an existing node.
    let start = Instant::now();
    join(charlie, &coord.token, prefix);
    let up_took = start.elapsed();
    wait_for(OVERLAY_TIMEOUT, "first HTTP charlie -> alpha", || {
        charlie.fetch_from(alpha, 2)
    });
    report(format!(
        "three_nodes: `a2actl up` returned after {} ms; first HTTP response {} ms after `a2actl up`",
        up_took.as_millis(),
        start.elapsed().as_millis()
    ));

    let ips: HashSet<Ipv4Addr> = nodes.iter().map(|n| n.overlay_ip()).collect();
    assert_eq!(ips.len(), 3, "overlay addresses must be distinct: {ips:?}");

    http_all_pairs(&[alpha, bravo, charlie]);
    for (a, b) in [
        (alpha, bravo),
        (bravo, alpha),
        (charlie, bravo),
        (alpha, charlie),
    ] {
        assert!(
            a.ns.ping(b.overlay_ip(), 3),
            "ping {} -> {} over the overlay failed",
            a.name,
            b.name
        );
    }

    // Throughput, reported only.
    let _server = bravo.ns.iperf3_server();
    let mbps = alpha
        .ns
        .iperf3_client(bravo.overlay_ip(), 3)
        .unwrap_or_else(|e| panic!("iperf3 alpha -> bravo over the overlay: {e}"));
    assert!(mbps > 0.0, "iperf3 measured no throughput");
    report(format!(
        "three_nodes: iperf3 TCP alpha -> bravo over the overlay: {mbps:.1} Mbit/s"
    ));

    // Status: two direct peers each, with the right names, addresses and keys.
    let keys: Vec<String> = nodes.iter().map(self_key).collect();
    let distinct: HashSet<&String> = keys.iter().collect();
    assert_eq!(distinct.len(), 3, "public keys must be distinct: {keys:?}");
    for (i, n) in nodes.iter().enumerate() {
        let others: Vec<&Node> = nodes.iter().filter(|o| o.name != n.name).collect();
        let st = wait_for(
            OVERLAY_TIMEOUT,
            &format!("{} to see 2 direct peers", n.name),
            || {
                // Some traffic, so that the paths are established.
                for o in &others {
                    let _ = n.fetch_from(o, 2);
                }
                let st = n.try_status()?;
                let direct = st.peers.iter().filter(|p| p.path == "direct").count();
                if st.peers.len() == 2 && direct == 2 {
                    Ok(st)
                } else {
                    Err(format!("peers: {:?}", st.peers))
                }
            },
        );
        let me = st.me.clone().expect("self in status");
        assert_eq!(me.name, n.name);
        assert_eq!(me.ip, n.overlay_ip());
        assert_eq!(me.public_key, keys[i]);
        for o in &others {
            let p = st
                .peer(&o.name)
                .unwrap_or_else(|| panic!("{} does not list {}: {:?}", n.name, o.name, st.raw));
            assert_eq!(
                p.ip,
                o.overlay_ip(),
                "{} sees {}'s ip wrong",
                n.name,
                o.name
            );
            let j = nodes.iter().position(|x| x.name == o.name).unwrap();
            assert_eq!(
                p.public_key, keys[j],
                "{} sees {}'s key wrong",
                n.name, o.name
            );
            let endpoint = p
                .endpoint
                .as_deref()
                .unwrap_or_else(|| panic!("direct peer {} without an endpoint", o.name));
            let endpoint: SocketAddr = endpoint
                .parse()
                .unwrap_or_else(|e| panic!("endpoint {endpoint:?} is not IP:port ({e})"));
            assert_eq!(
                endpoint.ip(),
                std::net::IpAddr::V4(o.wan_ip()),
                "{} reaches {} directly, so the endpoint should be its address on the segment",
                n.name,
                o.name
            );
            assert!(
                p.rx_bytes > 0 && p.tx_bytes > 0,
                "{} -> {}: no bytes counted after traffic: {p:?}",
                n.name,
                o.name
            );
        }
        // The human-readable status names the peers too.
        let human = n.ctl(&["status"]).expect_ok();
        for o in &others {
            assert!(
                human.stdout.contains(&o.name),
                "`a2actl status` on {} does not mention {}:\n{}",
                n.name,
                o.name,
                human.stdout
            );
        }
    }
    for n in &nodes {
        n.assert_daemon_running();
        assert_private_files(&n.state_dir);
    }
    coord.assert_running();

    // The coordinator writes no file but its identity key.
    let mut files: Vec<String> = std::fs::read_dir(&coord.state_dir)
        .expect("coordinator state dir")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["coordinator.key"],
        "the coordinator's state dir holds more than its key"
    );

    // The coordinator logs nothing that names a node (it runs with A2A_LOG=trace).
    let log = format!(
        "{}{}",
        coord.proc().stdout_text(),
        coord.proc().stderr_text()
    );
    for (n, key) in nodes.iter().zip(&keys) {
        for secret in [
            n.name.clone(),
            n.overlay_ip().to_string(),
            n.wan_ip().to_string(),
            key.clone(),
        ] {
            assert!(
                !log.contains(&secret),
                "the coordinator's output names node {} ({secret}):\n{log}",
                n.name
            );
        }
    }
}

#[test]
fn coordinator_killed_overlay_keeps_working() {
    let Some(lab) = Lab::new("coordinator_killed") else {
        return;
    };
    let coord = lab.coordinator(CoordOpts::default());
    let nodes: Vec<Node> = ["alpha", "bravo", "charlie"]
        .iter()
        .map(|n| lab.node(n))
        .collect();
    for n in &nodes {
        n.serve_http();
        join(n, &coord.token, DEFAULT_PREFIX);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    http_all_pairs(&refs);

    coord.kill();
    http_all_pairs_now(&refs, "right after the coordinator was killed");
    // Longer than the coordinator heartbeat: the nodes have noticed it is gone by now.
    std::thread::sleep(Duration::from_secs(12));
    http_all_pairs_now(&refs, "12 s after the coordinator was killed");
    for n in &nodes {
        n.assert_daemon_running();
        assert_eq!(n.ctl_ip().unwrap(), n.overlay_ip());
        let st = n.status();
        assert_eq!(
            st.peers.len(),
            2,
            "{} forgot its peers: {:?}",
            n.name,
            st.raw
        );
    }
}

#[test]
fn coordinator_restarted_new_node_joins() {
    let Some(lab) = Lab::new("coordinator_restarted") else {
        return;
    };
    // Wildcard listen with --endpoint, to cover that form too.
    let coord = lab.coordinator(CoordOpts {
        wildcard_listen: true,
        ..Default::default()
    });
    let alpha = lab.node("alpha");
    let bravo = lab.node("bravo");
    for n in [&alpha, &bravo] {
        n.serve_http();
        join(n, &coord.token, DEFAULT_PREFIX);
    }
    http_all_pairs(&[&alpha, &bravo]);

    coord.kill();
    std::thread::sleep(Duration::from_secs(1));
    let second = coord.restart();
    assert!(second.starts_with("a2a1"));

    // The old token still works after the restart.
    let charlie = lab.node("charlie");
    charlie.serve_http();
    let start = Instant::now();
    join(&charlie, &coord.token, DEFAULT_PREFIX);
    for n in [&alpha, &bravo] {
        // Old nodes must re-register with the restarted coordinator to learn about charlie.
        n.wait_peers(
            &["alpha", "bravo", "charlie"]
                .into_iter()
                .filter(|x| *x != n.name)
                .collect::<Vec<_>>(),
            Duration::from_secs(40),
        );
    }
    report(format!(
        "coordinator_restarted: old nodes listed the new node {} ms after its `a2actl up`",
        start.elapsed().as_millis()
    ));
    charlie.wait_peers(&["alpha", "bravo"], OVERLAY_TIMEOUT);
    http_all_pairs(&[&alpha, &bravo, &charlie]);
    coord.assert_running();
}

#[test]
fn node_daemon_restart_keeps_address() {
    let Some(lab) = Lab::new("node_restart") else {
        return;
    };
    let (_coord, alpha, bravo) = two_joined_nodes(&lab);
    let bravo_ip = bravo.overlay_ip();
    let bravo_key = self_key(&bravo);

    for (signal, how) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGKILL, "SIGKILL")] {
        bravo.stop_daemon(signal);
        wait_until(
            Duration::from_secs(10),
            "bravo's overlay to be unreachable while its daemon is down",
            || alpha.fetch_from(&bravo, 2).is_err(),
        );
        let start = Instant::now();
        bravo.start_daemon(); // no `a2actl up`
        let ip = wait_for(OVERLAY_TIMEOUT, "bravo to rejoin by itself", || {
            bravo.ctl_ip()
        });
        assert_eq!(
            ip, bravo_ip,
            "bravo changed address after a restart ({how})"
        );
        assert_eq!(
            self_key(&bravo),
            bravo_key,
            "bravo changed key after a restart ({how})"
        );
        alpha.wait_http(&bravo, OVERLAY_TIMEOUT);
        bravo.wait_http(&alpha, OVERLAY_TIMEOUT);
        report(format!(
            "node_restart ({how}): HTTP alpha <-> bravo again {} ms after restarting a2ad",
            start.elapsed().as_millis()
        ));
        let st = alpha.status();
        let p = st.peer("bravo").expect("alpha still lists bravo");
        assert_eq!(
            (p.ip, p.public_key.as_str()),
            (bravo_ip, bravo_key.as_str())
        );
        alpha.assert_daemon_running();
    }
    assert_private_files(&bravo.state_dir);
}

#[test]
fn second_network_is_isolated() {
    let Some(lab) = Lab::new("second_network") else {
        return;
    };
    let coord = lab.coordinator(CoordOpts::default());
    let token2 = coord.new_token();
    assert_ne!(token2, coord.token, "`token` must make a new network");

    let alpha = lab.node("alpha");
    let bravo = lab.node("bravo");
    let xray = lab.node("xray");
    let yankee = lab.node("yankee");
    for n in [&alpha, &bravo, &xray, &yankee] {
        n.serve_http();
    }
    join(&alpha, &coord.token, DEFAULT_PREFIX);
    join(&bravo, &coord.token, DEFAULT_PREFIX);
    join(&xray, &token2, DEFAULT_PREFIX);
    join(&yankee, &token2, DEFAULT_PREFIX);

    // Both networks work on their own...
    http_all_pairs(&[&alpha, &bravo]);
    http_all_pairs(&[&xray, &yankee]);
    alpha.wait_peers(&["bravo"], OVERLAY_TIMEOUT);
    bravo.wait_peers(&["alpha"], OVERLAY_TIMEOUT);
    xray.wait_peers(&["yankee"], OVERLAY_TIMEOUT);
    yankee.wait_peers(&["xray"], OVERLAY_TIMEOUT);

    // ...and see nothing of each other.
    let net1 = [&alpha, &bravo];
    let net2 = [&xray, &yankee];
    for (mine, theirs) in [(net1, net2), (net2, net1)] {
        for m in mine {
            let st = m.status();
            for t in theirs {
                assert_no_peer(&st, &m.name, t, t.overlay_ip(), &self_key(t));
                assert!(
                    m.fetch_from(t, 3).is_err(),
                    "{} reached {} ({}) of the other network over HTTP",
                    m.name,
                    t.name,
                    t.overlay_ip()
                );
                assert!(
                    !m.ns.ping(t.overlay_ip(), 2),
                    "{} pinged {} ({}) of the other network",
                    m.name,
                    t.name,
                    t.overlay_ip()
                );
            }
        }
    }
    // Still nothing leaked after some time (and traffic attempts).
    std::thread::sleep(Duration::from_secs(2));
    for m in [&alpha, &bravo] {
        let st = m.status();
        assert_eq!(st.peers.len(), 1, "{}: {:?}", m.name, st.raw);
    }
    coord.assert_running();
}

const BASE32: &str = "abcdefghijklmnopqrstuvwxyz234567";

/// Unused low bits of the last base32 character of a token (`a2a1` + unpadded base32).
fn padding_bits(token: &str) -> usize {
    let chars = token.len() - 4;
    (5 * chars) % 8
}

/// The token with the lowest bit of its last base32 character flipped.
fn flip_last_bit(token: &str) -> String {
    let mut chars: Vec<char> = token.chars().collect();
    let end = chars.len() - 1;
    let v = BASE32
        .find(chars[end])
        .expect("a token ends in a base32 character");
    chars[end] = BASE32.as_bytes()[v ^ 1] as char;
    chars.into_iter().collect()
}

/// Bogus tokens derived from a real one: (description, token).
fn bogus_tokens(real: &str) -> Vec<(&'static str, String)> {
    let mut changed: Vec<char> = real.chars().collect();
    let mid = changed.len() / 2;
    changed[mid] = if changed[mid] == 'a' { 'b' } else { 'a' };
    let mut bad_char: Vec<char> = real.chars().collect();
    bad_char[mid] = '1'; // not in the base32 alphabet
    vec![
        ("garbage", "this-is-not-a-token".to_string()),
        ("a2a1 garbage", "a2a1hello".to_string()),
        ("truncated", real[..real.len() / 2].to_string()),
        ("last char dropped", real[..real.len() - 1].to_string()),
        ("one char changed", changed.into_iter().collect()),
        ("invalid char", bad_char.into_iter().collect()),
        ("doubled", format!("{real}{real}")),
        ("empty", String::new()),
    ]
}

#[test]
fn bogus_tokens_are_refused() {
    let Some(lab) = Lab::new("bogus_tokens") else {
        return;
    };
    let coord = lab.coordinator(CoordOpts::default());
    let alpha = lab.node("alpha");
    let bravo = lab.node("bravo");
    let fresh = lab.node("charlie"); // daemon running, never joined until the end
    for n in [&alpha, &bravo, &fresh] {
        n.serve_http();
    }
    join(&alpha, &coord.token, DEFAULT_PREFIX);
    join(&bravo, &coord.token, DEFAULT_PREFIX);
    http_all_pairs(&[&alpha, &bravo]);
    let alpha_ip = alpha.overlay_ip();

    let mut bogus = bogus_tokens(&coord.token);
    // The last character of a token whose encoding ends in padding bits, with one of those bits
    // flipped: a lax base32 decoder reads the same bytes, a strict one refuses it (it is still a
    // token with one character changed). Extra endpoints give the token such a length.
    let mut endpoints = vec![coord.addr.to_string()];
    let padded = loop {
        let t = coord.token_for(&endpoints);
        if padding_bits(&t) > 0 {
            break t;
        }
        // 4 more bytes ("x:1" and its length byte): moves the length off a multiple of 5.
        let host = (b'a' + endpoints.len() as u8) as char;
        endpoints.push(format!("{host}:1"));
    };
    bogus.push(("last char changed (padding bits)", flip_last_bit(&padded)));

    for (what, token) in bogus {
        for node in [&fresh, &alpha] {
            let out = node.up(&token);
            assert!(
                !out.success() && !out.timed_out,
                "`a2actl up` with a {what} token on {} should fail: {out}",
                node.name
            );
            assert!(
                out.stderr.to_lowercase().contains("token"),
                "`a2actl up` with a {what} token: stderr should talk about the token: {out}"
            );
            assert!(
                out.stdout.trim().is_empty(),
                "`a2actl up` with a {what} token printed something on stdout: {out}"
            );
            node.assert_daemon_running();
        }
        assert_eq!(
            alpha.ctl_ip().unwrap(),
            alpha_ip,
            "alpha's address changed after a {what} token"
        );
        let st = fresh.status();
        assert!(
            st.me.is_none() && st.peers.is_empty(),
            "charlie was never joined but after a {what} token its status is {:?}",
            st.raw
        );
    }
    // alpha is still in the network: reachable both ways, bravo still lists it.
    http_all_pairs_now(&[&alpha, &bravo], "after the bogus tokens");
    let p = bravo.status();
    assert_eq!(p.peer("alpha").map(|p| p.ip), Some(alpha_ip));

    // The real token still works for the node that saw only bogus ones.
    join(&fresh, &coord.token, DEFAULT_PREFIX);
    http_all_pairs(&[&alpha, &bravo, &fresh]);
    coord.assert_running();
}

#[test]
fn garbage_input_is_survived() {
    let Some(lab) = Lab::new("garbage") else {
        return;
    };
    let (coord, alpha, bravo) = two_joined_nodes(&lab);
    let evil = lab.add_ns("evil");
    let coord_addr = SocketAddr::V4(coord.addr);

    // Connections that send nothing (or half a frame) and stay open during all that follows.
    let (held, held_failed) = evil.run_in(move || garbage::tcp_hold_open(coord_addr, 200));
    report(format!(
        "garbage: holding {} idle TCP connections to the coordinator ({held_failed} failed)",
        held.len()
    ));
    let tcp = evil.run_in(move || garbage::tcp_garbage(coord_addr, 600));
    report(format!("garbage: TCP garbage to the coordinator: {tcp:?}"));
    let counters_before = counter_sum(&alpha.status());
    let targets = [
        ("coordinator", coord_addr),
        ("alpha", SocketAddr::new(alpha.wan_ip().into(), NODE_PORT)),
        ("bravo", SocketAddr::new(bravo.wan_ip().into(), NODE_PORT)),
    ];
    for (name, addr) in targets {
        let sent = evil
            .run_in(move || garbage::udp_flood(addr, 5000))
            .unwrap_or_else(|e| panic!("UDP flood to {name}: {e}"));
        report(format!(
            "garbage: {sent} hostile UDP datagrams to {name} ({addr})"
        ));
    }

    // Garbage on a daemon's local API socket as well.
    let socket = alpha.state_dir.join("a2ad.sock");
    if socket.exists() {
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        let mut rng = garbage::Rng::new();
        for payload in [
            rng.bytes(3000),
            b"{\"cmd\": \"nonsense\"}\n".to_vec(),
            b"not json at all\n".to_vec(),
            vec![b'x'; 2 << 20], // longer than any request line, no newline
            Vec::new(),
        ] {
            if let Ok(mut s) = UnixStream::connect(&socket) {
                let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
                let _ = s.write_all(&payload);
            }
        }
    }

    coord.assert_running();
    alpha.assert_daemon_running();
    bravo.assert_daemon_running();
    assert_eq!(alpha.ctl_ip().unwrap(), alpha.overlay_ip());
    // The garbage did reach the daemon: its drop counters (README: `counters` in the status)
    // moved. Without them the test would prove nothing.
    let st = alpha.status();
    report(format!(
        "garbage: alpha's counters after the flood: {}",
        st.raw["counters"]
    ));
    if let (Some(before), Some(after)) = (counters_before, counter_sum(&st)) {
        assert!(
            after > before,
            "alpha's drop counters did not move after 5000 hostile datagrams: {}",
            st.raw["counters"]
        );
    }
    http_all_pairs(&[&alpha, &bravo]);

    // A new node still joins (while the idle connections are still held) and works.
    let charlie = lab.node("charlie");
    charlie.serve_http();
    join(&charlie, &coord.token, DEFAULT_PREFIX);
    http_all_pairs(&[&alpha, &bravo, &charlie]);
    alpha.wait_peers(&["bravo", "charlie"], OVERLAY_TIMEOUT);
    drop(held);

    coord.assert_running();
    for n in [&alpha, &bravo, &charlie] {
        n.assert_daemon_running();
    }
}

#[test]
fn down_leaves_the_network() {
    let Some(lab) = Lab::new("down") else {
        return;
    };
    let (coord, alpha, bravo) = two_joined_nodes(&lab);
    assert!(bravo.ns.has_link("a2a0"), "bravo has no a2a0 interface");

    bravo.ctl(&["down"]).expect_ok();
    assert!(
        !bravo.ns.has_link("a2a0"),
        "`a2actl down` left the a2a0 interface in place"
    );
    bravo.assert_daemon_running();
    assert!(
        alpha.fetch_from(&bravo, 3).is_err(),
        "bravo still answers over the overlay after `a2actl down`"
    );
    alpha.wait_peers(&[], Duration::from_secs(45));

    // And it can join again.
    let ip = join(&bravo, &coord.token, DEFAULT_PREFIX);
    assert_eq!(ip, bravo.overlay_ip());
    http_all_pairs(&[&alpha, &bravo]);
}

#[test]
fn forged_token_keeps_membership() {
    let Some(lab) = Lab::new("forged_token") else {
        return;
    };
    let (coord, alpha, bravo) = two_joined_nodes(&lab);
    let alpha_ip = alpha.overlay_ip();

    // A well-formed token for the real coordinator's endpoint that pins another key (bravo's
    // public key, a valid X25519 point): not issued by this coordinator.
    let wrong_key = self_key(&bravo);
    let state = coord.state_dir.to_string_lossy().into_owned();
    let endpoint = coord.addr.to_string();
    let forged = coord
        .ns
        .exec(&[
            &lab.bins().coordinator,
            "token",
            "--coordinator-key",
            &wrong_key,
            "--state-dir",
            &state,
            "--endpoint",
            &endpoint,
        ])
        .expect_ok()
        .stdout
        .trim()
        .to_string();
    assert!(forged.starts_with("a2a1"), "{forged:?}");

    let out = alpha.up(&forged);
    assert!(
        !out.success() && !out.timed_out,
        "`a2actl up` with a token pinning the wrong coordinator key must fail: {out}"
    );
    report(format!(
        "forged_token: refused in {} ms: {}",
        out.elapsed.as_millis(),
        out.stderr.trim()
    ));
    // The previous membership is kept (or restored): same address, same peers, reachable.
    alpha.assert_daemon_running();
    assert_eq!(alpha.ctl_ip().unwrap(), alpha_ip, "alpha lost its address");
    http_all_pairs(&[&alpha, &bravo]);
    alpha.wait_peers(&["bravo"], OVERLAY_TIMEOUT);
    bravo.wait_peers(&["alpha"], OVERLAY_TIMEOUT);
    coord.assert_running();
    assert!(
        out.stderr.to_lowercase().contains("token"),
        "stderr should say what is wrong with the token: {out}"
    );
}

/// `len` bytes of a pseudo-random pattern (xorshift) seeded by `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every byte crosses the overlay intact whatever the packet sizes, on whichever data path
/// a2ad chose (TUN offload and UDP GSO/GRO, or one packet per call with `A2A_OFFLOAD=0`): TCP
/// bulk transfers both ways written in uneven chunks (GSO super-packets split on send,
/// coalesced on receive), UDP datagrams of sizes from 1 byte to the largest that fits the MTU
/// and fragmented ones beyond it, and pings of mixed sizes (ping checks its payload).
#[test]
fn mixed_sizes_arrive_intact() {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};

    let Some(lab) = Lab::new("mixed_sizes") else {
        return;
    };
    let (_coord, alpha, bravo) = two_joined_nodes(&lab);
    let a_ip = alpha.ctl_ip().unwrap();
    let b_ip = bravo.ctl_ip().unwrap();
    let offload_wanted = std::env::var("A2A_OFFLOAD").map_or(true, |v| v != "0");
    for n in [&alpha, &bravo] {
        let st = n.status();
        let on = |k: &str| st.raw["counters"][k].as_u64() == Some(1);
        report(format!(
            "mixed_sizes: {} data path: TUN offload {}, UDP GSO {}, UDP GRO {}",
            n.name,
            on("fast_tun_offload"),
            on("fast_udp_gso"),
            on("fast_udp_gro")
        ));
        if !offload_wanted {
            assert!(!on("fast_tun_offload") && !on("fast_udp_gso") && !on("fast_udp_gro"));
        }
    }

    for (seed, from, to, to_ip) in [(1, &alpha, &bravo, b_ip), (2, &bravo, &alpha, a_ip)] {
        let data = pattern(seed, 24 << 20);
        let listener = to.ns.run_in(move || TcpListener::bind((to_ip, 0)).unwrap());
        let port = listener.local_addr().unwrap().port();
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        });
        let mut s = from.ns.run_in(move || {
            TcpStream::connect_timeout(&SocketAddr::from((to_ip, port)), Duration::from_secs(10))
                .unwrap()
        });
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut sent = 0;
        let mut chunk = 1;
        while sent < data.len() {
            let end = (sent + chunk).min(data.len());
            s.write_all(&data[sent..end]).unwrap();
            sent = end;
            chunk = chunk * 3 % 200_003 + 1;
        }
        s.shutdown(Shutdown::Write).unwrap();
        let got = reader.join().unwrap();
        assert_eq!(
            got.len(),
            data.len(),
            "TCP {} -> {}: length",
            from.name,
            to.name
        );
        let first_bad = got.iter().zip(&data).position(|(a, b)| a != b);
        assert_eq!(
            first_bad, None,
            "TCP {} -> {}: bytes differ",
            from.name, to.name
        );
    }

    let rx = bravo.ns.run_in(move || UdpSocket::bind((b_ip, 0)).unwrap());
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let to = rx.local_addr().unwrap();
    let tx = alpha.ns.run_in(move || UdpSocket::bind((a_ip, 0)).unwrap());
    let sizes = (1..=1392)
        .step_by(13)
        .chain([1392, 1393, 1500, 2000, 2900, 4000, 9000]);
    let mut buf = vec![0u8; 65536];
    for size in sizes {
        let payload = pattern(size as u64, size);
        let mut arrived = false;
        // A datagram may be lost; whatever arrives must be the datagram sent.
        for _ in 0..5 {
            tx.send_to(&payload, to).unwrap();
            if let Ok((n, _)) = rx.recv_from(&mut buf) {
                assert_eq!(&buf[..n], &payload[..], "UDP datagram of {size} bytes");
                arrived = true;
                break;
            }
        }
        assert!(arrived, "UDP datagram of {size} bytes never arrived");
    }

    // A burst of full-size datagrams of one flow: many reach bravo's a2ad in one GRO read and
    // are written to its TUN device one write each (TCP is coalesced, UDP is not). Whatever
    // arrives is intact and in the order sent.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&rx);
    let big: libc::c_int = 8 << 20;
    // SAFETY: a valid socket and an int option of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &big as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    const BURST: u32 = 2000;
    for seq in 0..BURST {
        let mut payload = pattern(u64::from(seq), 1392);
        payload[..4].copy_from_slice(&seq.to_be_bytes());
        tx.send_to(&payload, to).unwrap();
        if seq % 64 == 63 {
            // Bursts of 64, within what alpha's TUN queue (500) holds for a debug build.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let mut last: Option<u32> = None;
    let mut got = 0;
    while let Ok((n, _)) = rx.recv_from(&mut buf) {
        assert_eq!(n, 1392, "a datagram of the burst changed length");
        let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
        let mut want = pattern(u64::from(seq), 1392);
        want[..4].copy_from_slice(&seq.to_be_bytes());
        assert_eq!(&buf[..n], &want[..], "datagram {seq} of the burst");
        assert!(
            last.is_none_or(|l| seq > l),
            "datagram {seq} of the burst arrived after {last:?}"
        );
        last = Some(seq);
        got += 1;
    }
    report(format!(
        "mixed_sizes: {got} of a burst of {BURST} datagrams arrived, in order"
    ));
    assert!(
        got >= BURST / 2,
        "only {got} of a burst of {BURST} datagrams arrived"
    );

    for size in ["0", "1", "56", "1000", "1392", "1393", "3000", "8000"] {
        let out = alpha
            .ns
            .exec(&["ping", "-c", "2", "-W", "2", "-s", size, &b_ip.to_string()]);
        assert!(out.success(), "ping -s {size}: {out}");
        let text = out.to_string();
        assert!(!text.contains("wrong data"), "ping -s {size}: {text}");
    }
}

/// WireGuard's netns.sh MTU check, ported: the largest ping that fits the overlay MTU (1420)
/// crosses with DF set; one byte more does not (the kernel stops it at the a2a0 MTU); and when
/// the underlay MTU is smaller than a full WireGuard packet, full-size overlay packets still
/// arrive (the outer UDP is fragmented) instead of vanishing in a black hole.
#[test]
fn mtu_fits_and_nothing_vanishes() {
    let Some(lab) = Lab::new("mtu") else {
        return;
    };
    require_tool("iperf3", "iperf3");
    let (_coord, alpha, bravo) = two_joined_nodes(&lab);
    let b_ip = bravo.overlay_ip().to_string();
    let ping = |size: u32| {
        alpha.ns.exec(&[
            "ping",
            "-n",
            "-q",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            &size.to_string(),
            &b_ip,
        ])
    };
    // 1420 - 20 (IPv4) - 8 (ICMP) = 1392 bytes of payload.
    ping(1392).expect_ok();
    let too_big = ping(1393);
    assert!(
        !too_big.success(),
        "a ping larger than the overlay MTU crossed with DF set: {too_big}"
    );

    // Underlay MTU 1280 on both nodes: a full WireGuard packet (1452 + 28 bytes) no longer fits.
    for n in [&alpha, &bravo] {
        n.ns.exec(&["ip", "link", "set", "dev", "eth0", "mtu", "1280"])
            .expect_ok();
    }
    wait_for(
        Duration::from_secs(20),
        "full-size pings over a 1280-byte underlay",
        || {
            let out = ping(1392);
            if out.success() {
                Ok(())
            } else {
                Err(out.to_string())
            }
        },
    );
    // And bulk TCP, whose segments are full-size.
    bravo.serve_http();
    let mbit = {
        let server = bravo.ns.iperf3_server();
        let r = alpha.ns.iperf3_client(bravo.overlay_ip(), 2);
        server.kill();
        r.unwrap_or_else(|e| panic!("TCP over a 1280-byte underlay: {e}"))
    };
    report(format!(
        "mtu: 1392-byte DF pings cross, 1393 does not; over a 1280-byte underlay \
         full-size pings and TCP ({mbit:.0} Mbit/s) still arrive"
    ));
    assert!(
        mbit > 1.0,
        "TCP over a 1280-byte underlay carried almost nothing"
    );
}

/// `a2ad --metrics`: Prometheus text with the counters and each peer by name, on the address
/// given (loopback of the node's namespace); anything but a GET of /metrics is refused.
#[test]
fn metrics_name_each_peer_and_its_path() {
    let Some(lab) = Lab::new("metrics") else {
        return;
    };
    require_tool("curl", "curl");
    let coord = lab.coordinator(CoordOpts::default());
    let alpha = lab.node_without_daemon("alpha");
    alpha.start_daemon_with(&["--metrics", "127.0.0.1:9100"]);
    let bravo = lab.node("bravo");
    for n in [&alpha, &bravo] {
        n.serve_http();
        join(n, &coord.token, DEFAULT_PREFIX);
    }
    http_all_pairs(&[&alpha, &bravo]);
    let scrape = |args: &[&str]| {
        let mut full = vec!["curl", "-sS", "--max-time", "5"];
        full.extend_from_slice(args);
        alpha.ns.exec(&full)
    };
    let out = scrape(&["-f", "http://127.0.0.1:9100/metrics"]);
    assert!(out.success(), "{out}");
    let text = out.stdout.clone();
    for want in [
        "a2a_registered 1",
        "a2a_peers 1",
        "a2a_udp_garbage_total 0",
        "a2a_peer_rx_bytes_total{peer=\"bravo\"}",
        "a2a_peer_path{peer=\"bravo\",path=",
    ] {
        assert!(text.contains(want), "{want} missing in:\n{text}");
    }
    let path = bravo_path_line(&text);
    report(format!("metrics: {path}"));
    let out = scrape(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        "http://127.0.0.1:9100/metrics",
    ]);
    assert_eq!(out.stdout.trim(), "405", "{out}");
    let out = scrape(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://127.0.0.1:9100/",
    ]);
    assert_eq!(out.stdout.trim(), "404", "{out}");
    // Not reachable from the other node: it listens on alpha's loopback only.
    let out = bravo.ns.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "2",
        &format!("http://{}:9100/metrics", alpha.wan_ip()),
    ]);
    assert!(!out.success(), "metrics reachable from another host: {out}");
}

fn bravo_path_line(text: &str) -> String {
    text.lines()
        .filter(|l| l.starts_with("a2a_peer_path{peer=\"bravo\"") && l.ends_with(" 1"))
        .collect::<Vec<_>>()
        .join(", ")
}
