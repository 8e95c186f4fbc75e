//! A swarm in one process: 50 daemons on open hosts of the fake network join the real
//! coordinator library at once, as in the netns test `swarm.rs`, on tokio's paused clock.
//! Every directed path must be chosen direct within 15 s of the daemons' time.
//!
//! What this checks is the path decision (the route the packet path reads, shown as the
//! endpoint), not whether the WireGuard session is up (`path` is `none` until it is): boringtun's
//! handshake retries follow the real clock (REKEY_TIMEOUT, 5 s), and 50 debug-build daemons in
//! one process take many real seconds per second of the paused clock, so session liveness here
//! says more about this machine than about the daemon. The netns swarm test checks both.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use futures_util::future::join_all;

const NODES: u8 = 50;

/// Directed paths whose route is the peer's host address, and counters summed over all nodes.
async fn survey(nodes: &[Node]) -> (usize, BTreeMap<String, u64>, BTreeMap<String, usize>) {
    let mut direct = 0;
    let mut sums = BTreeMap::new();
    let mut kinds = BTreeMap::new();
    for n in nodes {
        let st = n.status().await;
        for p in &st.peers {
            *kinds.entry(p.path.clone()).or_default() += 1;
            let i: u8 = p.name[1..].parse().unwrap();
            let host = format!("198.51.100.{}:{NODE_PORT}", i + 1);
            if p.endpoint.as_deref() == Some(host.as_str()) {
                direct += 1;
            }
        }
        for (k, v) in st.counters {
            *sums.entry(k).or_default() += v;
        }
    }
    (direct, sums, kinds)
}

fn interesting(sums: &BTreeMap<String, u64>) -> String {
    sums.iter()
        .filter(|(k, v)| **v > 0 && !k.starts_with("fast_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(start_paused = true)]
async fn fifty_open_nodes_joining_at_once_all_choose_direct_paths_within_15_s() {
    let w = world();
    let hosts: Vec<_> = (1..=NODES)
        .map(|i| w.net.host(Ipv4Addr::new(198, 51, 100, i)))
        .collect();
    // All at once: every `up` starts within the same instant (the 50 joined in 1.4 s).
    let names: Vec<String> = (0..NODES).map(|i| format!("n{i:02}")).collect();
    let nodes: Vec<Node> = join_all(
        hosts
            .iter()
            .zip(&names)
            .map(|(h, name)| Node::join(h, name, &w.token)),
    )
    .await;
    let want = nodes.len() * (nodes.len() - 1);
    let start = tokio::time::Instant::now();
    let deadline = start + Duration::from_secs(15);
    loop {
        let (direct, sums, kinds) = survey(&nodes).await;
        let t = start.elapsed().as_secs_f64();
        eprintln!("t={t:.1}s routed direct {direct}/{want}, status paths {kinds:?}");
        if direct == want {
            eprintln!("counters: {}", interesting(&sums));
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!("counters: {}", interesting(&sums));
            eprintln!("coordinator: {}", w.hub.counters());
            panic!("only {direct} of {want} directed paths routed direct after 15 s: {kinds:?}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
