//! Whole daemons in one process, without root and without sockets: real `a2a_daemon` nodes
//! (real boringtun, real control client, real path finder) on the fake network and fake TUN
//! devices of `io::fake`, registered with the real coordinator library (`a2a_coordinator`'s
//! `Server`, its control streams and UDP port wired to the fake network), on tokio's paused
//! clock: a test that waits 30 s of the daemons' time takes milliseconds. boringtun's own
//! timers follow the real clock (see the README's "The daemon in layers"); nothing here waits
//! for them.
//!
//! The netns tests (`netns-tests/`) remain the end-to-end proof on real kernels; these check
//! the daemon's behaviour piece by piece, fast.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use a2a_daemon::io::fake::net::{Direction, NatKind};
use a2a_daemon::node::commands::CommandError;
use common::*;

#[tokio::test(start_paused = true)]
async fn up_returns_with_the_peers_already_there_and_packets_cross() {
    let w = world();
    let a = w.join(1, "alpha").await;
    let b = w.join(2, "bravo").await;
    assert!(
        b.peer(&a).await.is_some(),
        "up returns once alpha is in bravo's table"
    );
    assert!(reaches(&b, &a, b"hello alpha").await);
    assert!(reaches(&a, &b, b"hello bravo").await);
    let st = a.status().await;
    assert!(st.self_.unwrap().registered);
    assert_ne!(a.ip, b.ip);
}

#[tokio::test(start_paused = true)]
async fn traffic_starts_on_the_relay_and_moves_to_the_direct_path() {
    let w = world();
    let (ha, hb) = (w.public(1), w.public(2));
    // No direct path at first: the handshake and the data go through the relay.
    w.net.block_udp(&ha, &hb, Direction::BothWays);
    let a = Node::join(&ha, "alpha", &w.token).await;
    let b = Node::join(&hb, "bravo", &w.token).await;
    assert!(reaches(&a, &b, b"over the relay").await);
    assert_eq!(a.path_to(&b).await, "relay");
    assert!(
        w.hub.counters().contains("relayed_udp="),
        "{}",
        w.hub.counters()
    );
    assert!(
        !w.hub.counters().contains(" relayed_udp=0 "),
        "{}",
        w.hub.counters()
    );
    // The direct path opens: the next upgrade round finds it.
    w.net.unblock_udp(&ha, &hb, Direction::BothWays);
    wait_until(Duration::from_secs(15), "a direct path", || async {
        a.path_to(&b).await == "direct" && b.path_to(&a).await == "direct"
    })
    .await;
    assert!(a.counter("path_upgrades").await >= 1);
    assert!(reaches(&a, &b, b"direct now").await);
    let endpoint = a.peer(&b).await.unwrap().endpoint.unwrap();
    assert_eq!(endpoint, format!("{}:{NODE_PORT}", hb.ip()));
}

#[tokio::test(start_paused = true)]
async fn a_silent_direct_path_falls_back_to_the_relay_and_traffic_goes_on() {
    let w = world();
    let (ha, hb) = (w.public(1), w.public(2));
    let a = Node::join(&ha, "alpha", &w.token).await;
    let b = Node::join(&hb, "bravo", &w.token).await;
    wait_direct(&a, &b, Duration::from_secs(15)).await;
    assert!(reaches(&a, &b, b"direct").await);
    w.net.block_udp(&ha, &hb, Direction::BothWays);
    wait_until(Duration::from_secs(15), "the fallback", || async {
        a.path_to(&b).await == "relay" && b.path_to(&a).await == "relay"
    })
    .await;
    assert!(a.counter("path_fallbacks").await >= 1);
    assert!(reaches(&a, &b, b"relayed again").await);
    assert!(reaches(&b, &a, b"and back").await);
}

#[tokio::test(start_paused = true)]
async fn two_easy_nats_punch_through_and_two_hard_ones_stay_relayed() {
    let w = world();
    let easy1 = w.net.nat(Ipv4Addr::new(192, 0, 2, 1), NatKind::Easy);
    let easy2 = w.net.nat(Ipv4Addr::new(192, 0, 2, 2), NatKind::Easy);
    let hard1 = w.net.nat(Ipv4Addr::new(192, 0, 2, 3), NatKind::Hard);
    let hard2 = w.net.nat(Ipv4Addr::new(192, 0, 2, 4), NatKind::Hard);
    let lan = Ipv4Addr::new(10, 0, 0, 2);
    let a = Node::join(&easy1.host(lan), "easy-a", &w.token).await;
    let b = Node::join(&easy2.host(lan), "easy-b", &w.token).await;
    let c = Node::join(&hard1.host(lan), "hard-c", &w.token).await;
    let d = Node::join(&hard2.host(lan), "hard-d", &w.token).await;
    wait_until(Duration::from_secs(20), "easy-easy direct", || async {
        a.path_to(&b).await == "direct" && b.path_to(&a).await == "direct"
    })
    .await;
    let endpoint = a.peer(&b).await.unwrap().endpoint.unwrap();
    assert!(
        endpoint.starts_with("192.0.2.2:"),
        "easy-b's NAT's public address: {endpoint}"
    );
    assert!(reaches(&c, &d, b"hard to hard").await);
    // Several upgrade rounds later, still relayed (two symmetric NATs cannot punch).
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(c.path_to(&d).await, "relay");
    assert!(reaches(&d, &c, b"still relayed").await);
}

#[tokio::test(start_paused = true)]
async fn a_node_whose_public_address_changes_is_reached_directly_at_the_new_one() {
    let w = world();
    let nat = w.net.nat(Ipv4Addr::new(192, 0, 2, 1), NatKind::Easy);
    let a = Node::join(&nat.host(Ipv4Addr::new(10, 0, 0, 2)), "roamer", &w.token).await;
    let b = w.join(2, "bravo").await;
    wait_until(Duration::from_secs(15), "a direct path", || async {
        b.path_to(&a).await == "direct"
    })
    .await;
    let before = b.peer(&a).await.unwrap().endpoint.unwrap();
    // The roamer's router forgets its mappings: it now leaves from another public port.
    nat.flush();
    assert!(reaches(&a, &b, b"from a new port").await);
    assert!(reaches(&b, &a, b"answered there").await);
    wait_until(
        Duration::from_secs(20),
        "direct at the new address",
        || async {
            let p = b.peer(&a).await.unwrap();
            p.path == "direct" && p.endpoint.as_deref() != Some(before.as_str())
        },
    )
    .await;
    let after = b.peer(&a).await.unwrap().endpoint.unwrap();
    assert!(after.starts_with("192.0.2.1:"), "{after}");
}

#[tokio::test(start_paused = true)]
async fn a_packet_from_another_members_address_is_dropped_and_counted() {
    let w = world();
    let a = w.join(1, "alpha").await;
    let b = w.join(2, "bravo").await;
    let c = w.join(3, "charlie").await;
    assert!(reaches(&a, &b, b"genuine").await);
    // alpha forges charlie's address as the source of a packet to bravo.
    a.tun().inject(ipv4_udp(c.ip, b.ip, b"forged source"));
    assert!(receive(&b, b"forged source", Duration::from_secs(2))
        .await
        .is_none());
    assert_eq!(b.counter("inner_source_mismatch").await, 1);
    assert!(reaches(&a, &b, b"genuine again").await);
}

#[tokio::test(start_paused = true)]
async fn bursts_cross_intact_and_in_order_across_gso_batch_boundaries() {
    // Direct, and through the relay (relayed datagrams are batched for the coordinator's
    // address, each behind its relay header).
    for (max_segments, gro, relayed) in [
        (64, true, false),
        (64, false, false),
        (1, true, false),
        (3, true, false),
        (64, true, true),
        (3, false, true),
    ] {
        let w = world();
        let (ha, hb) = (w.public(1), w.public(2));
        if relayed {
            w.net.block_udp(&ha, &hb, Direction::BothWays);
        }
        let mut options = ha.udp_options();
        options.max_segments = max_segments;
        ha.set_udp_options(options);
        let mut options = hb.udp_options();
        options.gro = gro;
        hb.set_udp_options(options);
        let a = Node::join(&ha, "alpha", &w.token).await;
        let b = Node::join(&hb, "bravo", &w.token).await;
        if !relayed {
            wait_direct(&a, &b, Duration::from_secs(15)).await;
        }
        assert!(reaches(&a, &b, b"warm").await);
        let path = if relayed { "relay" } else { "direct" };
        assert_eq!(a.path_to(&b).await, path);
        // Runs of equal sizes broken by shorter and longer packets: each change of size, and
        // every 64th datagram, ends a GSO batch.
        let sizes: Vec<usize> = (0..300)
            .map(|i| match i % 50 {
                17 => 200,
                33 => 1380,
                40..=44 => 64,
                _ => 1000,
            })
            .collect();
        let tun = a.tun();
        for (i, &n) in sizes.iter().enumerate() {
            let mut payload = vec![(i % 251) as u8; n];
            payload[..4].copy_from_slice(&(i as u32).to_be_bytes());
            tun.inject(ipv4_udp(a.ip, b.ip, &payload));
        }
        let rx = b.tun();
        for (i, &n) in sizes.iter().enumerate() {
            let p = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("packet {i} of 300 missing ({max_segments}, {gro}, {path})")
                })
                .unwrap();
            let payload = &p[28..];
            assert_eq!(payload.len(), n, "packet {i}");
            assert_eq!(
                u32::from_be_bytes(payload[..4].try_into().unwrap()),
                i as u32
            );
            assert!(
                payload[4..].iter().all(|&x| x == (i % 251) as u8),
                "packet {i}"
            );
        }
        assert_eq!(a.counter("send_errors").await, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn without_udp_to_the_coordinator_the_relay_runs_over_the_control_connection() {
    let w = world();
    let (ha, hb) = (w.public(1), w.public(2));
    // alpha reaches the coordinator over TCP only, and bravo not at all over UDP directly.
    w.net.block_udp(&ha, &w.hub_host, Direction::BothWays);
    w.net.block_udp(&ha, &hb, Direction::BothWays);
    let a = Node::join(&ha, "alpha", &w.token).await;
    let b = Node::join(&hb, "bravo", &w.token).await;
    assert!(reaches(&a, &b, b"framed over TCP").await);
    assert!(reaches(&b, &a, b"and back over UDP then TCP").await);
    assert_eq!(a.path_to(&b).await, "relay");
    let report = a.daemon.netcheck().await.unwrap();
    assert_eq!(report.relay, "tcp");
    assert!(!report.udp);
    let stats = w.hub.counters();
    assert!(!stats.contains(" relayed_tcp=0 "), "{stats}");
}

#[tokio::test(start_paused = true)]
async fn tunnels_outlive_a_coordinator_restart_and_the_new_one_admits_new_members() {
    let mut w = world();
    let a = w.join(1, "alpha").await;
    let b = w.join(2, "bravo").await;
    wait_direct(&a, &b, Duration::from_secs(15)).await;
    w.hub.stop();
    // The coordinator is gone: members keep each other, the tunnel carries on.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        b.peer(&a).await.is_some(),
        "a dead coordinator removes nobody"
    );
    assert!(reaches(&a, &b, b"while the hub is down").await);
    assert!(!a.status().await.self_.unwrap().registered);
    // It comes back empty (memory only), with the same key: both re-register by themselves.
    drop(std::mem::replace(
        &mut w.hub,
        Hub::start(&w.hub_host, w.key),
    ));
    wait_until(Duration::from_secs(20), "both registered again", || async {
        a.status().await.self_.unwrap().registered && b.status().await.self_.unwrap().registered
    })
    .await;
    let c = w.join(3, "charlie").await;
    assert!(c.peer(&a).await.is_some() && c.peer(&b).await.is_some());
    wait_until(
        Duration::from_secs(5),
        "old members list charlie",
        || async { a.peer(&c).await.is_some() && b.peer(&c).await.is_some() },
    )
    .await;
    assert!(reaches(&c, &a, b"new member").await);
    assert!(reaches(&b, &c, b"old member").await);
}

#[tokio::test(start_paused = true)]
async fn a_kicked_member_is_dropped_by_everyone_and_reaches_nobody() {
    let w = world();
    let a = w.join(1, "alpha").await;
    let b = w.join(2, "bravo").await;
    let c = w.join(3, "charlie").await;
    assert!(reaches(&c, &a, b"before").await);
    let (name, _, holds_secret) = a.daemon.kick("charlie").await.unwrap();
    assert_eq!(name, "charlie");
    assert!(holds_secret);
    wait_until(
        Duration::from_secs(5),
        "charlie dropped everywhere",
        || async { a.peer(&c).await.is_none() && b.peer(&c).await.is_none() },
    )
    .await;
    wait_until(Duration::from_secs(5), "charlie told", || async {
        c.status().await.self_.unwrap().refused.is_some()
    })
    .await;
    c.send(&a, b"after");
    assert!(receive(&a, b"after", Duration::from_secs(3))
        .await
        .is_none());
    assert!(
        matches!(
            a.daemon.kick("charlie").await,
            Err(CommandError::NoSuchPeer(_))
        ),
        "already gone"
    );
    assert!(reaches(&a, &b, b"the others go on").await);
}

#[tokio::test(start_paused = true)]
async fn a_node_behind_a_lossy_slow_link_still_gets_a_direct_path_and_keeps_it() {
    use a2a_daemon::io::fake::net::Impairment;
    let w = world();
    let (ha, hb) = (w.public(1), w.public(2));
    let mut lossy = Impairment::latency(Duration::from_millis(20), Duration::from_millis(5));
    lossy.loss_percent = 3.0;
    ha.set_impairment(lossy);
    let a = Node::join(&ha, "alpha", &w.token).await;
    let b = Node::join(&hb, "bravo", &w.token).await;
    wait_direct(&a, &b, Duration::from_secs(15)).await;
    // A lost probe or two is not a dead path: a minute later, still direct, no fallback.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(a.path_to(&b).await, "direct");
    assert_eq!(a.counter("path_fallbacks").await, 0);
    assert!(reaches(&a, &b, b"through the loss").await);
}

#[tokio::test(start_paused = true)]
async fn a_policy_fences_flows_both_ways_and_answers_refusals() {
    let w = world();
    let a = w.join(1, "alpha").await; // the planner
    let b = w.join(2, "bravo").await; // the worker
    let c = w.join(3, "charlie").await; // untagged
    assert!(reaches(&c, &b, b"before any policy").await);
    a.daemon
        .tag("alpha", vec!["planner".into()], false)
        .await
        .unwrap();
    a.daemon
        .tag("bravo", vec!["worker".into()], false)
        .await
        .unwrap();
    let policy =
        r#"{"grants": [{"src": ["tag:planner"], "dst": ["tag:worker"], "ports": ["udp:4000"]}]}"#;
    a.daemon.policy_set(policy).await.unwrap();
    wait_until(
        Duration::from_secs(5),
        "the policy on every member",
        || async {
            b.status().await.policy.unwrap().version == 1
                && c.status().await.policy.unwrap().version == 1
        },
    )
    .await;
    // Planner to worker, and the worker's replies (the same ports back) pass.
    assert!(reaches(&a, &b, b"planner to worker").await);
    assert!(reaches(&b, &a, b"worker answers").await);
    // The untagged member's packets stop at its own node.
    let refused_before = c.status().await.policy.unwrap().refused["outbound"];
    c.send(&b, b"untagged to worker");
    assert!(receive(&b, b"untagged to worker", Duration::from_secs(2))
        .await
        .is_none());
    assert!(c.status().await.policy.unwrap().refused["outbound"] > refused_before);
    // And its program hears "administratively prohibited" from its own node at once.
    let tun = c.tun();
    let answer = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let p = tun.recv().await?;
            if p.len() >= 22 && p[9] == 1 && p[20] == 3 && p[21] == 13 {
                return Some(p);
            }
        }
    })
    .await
    .ok()
    .flatten()
    .expect("an ICMP administratively-prohibited answer");
    assert_eq!(
        &answer[12..16],
        &b.ip.octets(),
        "from the refused destination"
    );
    // A policy change applies to the next packet: the grant gone, the planner is refused too.
    a.daemon.policy_set(r#"{"grants": []}"#).await.unwrap();
    wait_until(Duration::from_secs(5), "version 2 on bravo", || async {
        b.status().await.policy.unwrap().version == 2
    })
    .await;
    a.send(&b, b"after the change");
    assert!(receive(&b, b"after the change", Duration::from_secs(2))
        .await
        .is_none());
    // Only token holders sign: an unknown tag is refused and nothing changes.
    let err = a
        .daemon
        .policy_set(r#"{"grants": [{"src": ["tag:nobody"], "dst": ["*"], "ports": ["*"]}]}"#)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown tag `nobody`"), "{err}");
    assert_eq!(b.status().await.policy.unwrap().version, 2);
}
