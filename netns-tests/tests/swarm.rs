//! A swarm on one coordinator: networks of simulated nodes (`src/bin/a2a-swarm.rs`: each a real
//! Noise control connection, a signed registration, a UDP relay bind, heartbeats) from one
//! namespace spread over several addresses, held for a while: 20 networks of 100 for 20 s when
//! built with optimisations (`cargo test --release`), 10 of 30 at 2 new connections per second
//! per address otherwise (unoptimised X25519 and Ed25519 cost milliseconds per operation on
//! both sides). `A2A_SWARM_NETWORKS`, `A2A_SWARM_NODES_PER_NETWORK`, `A2A_SWARM_HOLD` and
//! `A2A_SWARM_CONNECT_RATE` (new connections per second per address) override them, up to 100
//! networks of 100 by hand.
//!
//! Every node registers, every record it receives verifies and names a member, every peer list
//! is complete at the end of the hold, binds are answered (at least as many as nodes), and no
//! message or frame is out of place. What a loaded machine makes a node retry (a connection
//! reset or timed out, a registration past its deadline) is reported, not asserted.
//!
//! The figures are printed, never asserted: the coordinator's RSS before, at its peak and per
//! node, the join latency p50/p99 (a node's registration until every member registered before
//! it lists it) and the coordinator's CPU during the joins and while the swarm idles.
//!
//! Needs root; see the crate documentation of `a2a_netns_tests`.

use std::time::{Duration, Instant};

use a2a_netns_tests::{cpu_time, metric, report, require_tool, CoordOpts, Lab};

/// Where the coordinator serves its metrics: loopback of its namespace.
const METRICS_PORT: u16 = 9300;
const METRICS: &str = "127.0.0.1:9300";

/// A size from the environment, or the default for this build.
fn setting(name: &str, optimised: u64, debug: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) {
            debug
        } else {
            optimised
        })
}
/// Source addresses of the swarm (the coordinator's limits count per address: at most 1 024
/// connections each): at least 8, one per 400 nodes beyond that.
fn sources(nodes: usize) -> u8 {
    nodes.div_ceil(400).clamp(8, 50) as u8
}

/// Resident memory of process `pid`, in KB.
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_swarm_of_nodes_registers_and_every_record_verifies() {
    let Some(lab) = Lab::new("swarm") else {
        return;
    };
    let networks = setting("A2A_SWARM_NETWORKS", 20, 10) as usize;
    let per_network = setting("A2A_SWARM_NODES_PER_NETWORK", 100, 30) as usize;
    let hold = setting("A2A_SWARM_HOLD", 20, 20);
    let rate = setting("A2A_SWARM_CONNECT_RATE", 40, 2);
    require_tool("curl", "curl");
    let coord = lab.coordinator(CoordOpts {
        stats_interval: Some(5),
        metrics: Some(METRICS.into()),
        ..Default::default()
    });
    let ns = lab.add_ns("swarm");
    let o = ns.wan_ip.expect("a wan address").octets();
    let sources = sources(networks * per_network);
    for i in 1..sources {
        let extra = format!("{}.{}.{}.{}/24", o[0], o[1], o[2], 200 + i);
        ns.exec(&["ip", "addr", "add", &extra, "dev", "eth0"])
            .expect_ok();
    }
    let token = a2a_proto::JoinToken::parse(&coord.token).expect("the coordinator's token");
    let key = data_encoding::BASE64.encode(&token.coordinator_key);
    let pid = coord.proc().pid();
    std::thread::sleep(Duration::from_secs(1));
    let rss_before = rss_kb(pid);
    let cpu_before = cpu_time(pid);
    let began = Instant::now();
    let swarm = ns.spawn(
        "a2a-swarm",
        &[
            env!("CARGO_BIN_EXE_a2a-swarm"),
            "--coordinator",
            &coord.addr.to_string(),
            "--coordinator-key",
            &key,
            "--networks",
            &networks.to_string(),
            "--nodes-per-network",
            &per_network.to_string(),
            "--hold",
            &hold.to_string(),
            "--connect-rate",
            &rate.to_string(),
            "--join-timeout",
            "240",
        ],
    );
    // (seconds since the start, RSS KB, CPU) every half second until the swarm ends; the
    // coordinator's metrics every other second (the most members and UDP bindings seen).
    let mut samples = Vec::new();
    let (mut most_members, mut most_bound, mut networks_then) = (0, 0, 0);
    let mut last_scrape = String::new();
    while swarm.is_running() {
        if samples.len() % 4 == 0 {
            last_scrape = coord.scrape();
            let members = metric(&last_scrape, "a2a_coordinator_members").unwrap_or_else(|| {
                panic!("no a2a_coordinator_members in the scrape:\n{last_scrape}")
            });
            if members >= most_members {
                most_members = members;
                networks_then =
                    metric(&last_scrape, "a2a_coordinator_networks").unwrap_or_default();
            }
            most_bound = most_bound.max(
                metric(&last_scrape, "a2a_coordinator_relay_udp_bindings").unwrap_or_default(),
            );
        }
        assert!(
            began.elapsed() < Duration::from_secs(240 + hold + 60),
            "the swarm did not end"
        );
        coord.assert_running();
        samples.push((began.elapsed().as_secs_f64(), rss_kb(pid), cpu_time(pid)));
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = swarm.stdout_text();
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "the swarm printed no report: {out:?} {}",
                swarm.stderr_text()
            )
        });
    let r: serde_json::Value = serde_json::from_str(line).expect("a JSON report");
    let n = (networks * per_network) as u64;
    let num = |k: &str| r[k].as_u64().unwrap_or(0);
    let joined_s = r["joined_s"].as_f64().unwrap_or(0.0);
    // Steady state: from two seconds after the joins until a second before the hold ends.
    let window = |from: f64, to: f64| {
        let inside: Vec<_> = samples
            .iter()
            .filter(|s| s.0 >= from && s.0 <= to)
            .collect();
        match (inside.first(), inside.last()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                100.0 * b.2.saturating_sub(a.2).as_secs_f64() / (b.0 - a.0)
            }
            _ => 0.0,
        }
    };
    let idle_cpu = window(joined_s + 2.0, joined_s + hold as f64 - 1.0);
    let rss_peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let rss_held = samples
        .iter()
        .filter(|s| s.0 >= joined_s + 2.0 && s.0 <= joined_s + hold as f64 - 1.0)
        .map(|s| s.1)
        .max()
        .unwrap_or(rss_peak);
    let join_cpu = samples
        .iter()
        .rfind(|s| s.0 <= joined_s)
        .map(|s| s.2.saturating_sub(cpu_before).as_secs_f64())
        .unwrap_or(0.0);
    report(format!(
            "swarm: {n} nodes ({networks} networks of {per_network}) from {sources} addresses: joined in \
             {joined_s:.1} s; join latency p50 {} ms, p99 {} ms, max {} ms; coordinator RSS \
             {rss_before} KB before, {rss_held} KB held ({:.1} KB per node), {rss_peak} KB at \
             peak; coordinator CPU {join_cpu:.1} s during the joins, {idle_cpu:.1} % of a core \
             while the swarm idles; {} records received",
            r["join_ms"]["p50"],
            r["join_ms"]["p99"],
            r["join_ms"]["max"],
            rss_held.saturating_sub(rss_before) as f64 / n as f64,
            num("records_received"),
    ));
    assert_eq!(num("registered"), n, "every node registers: {line}");
    // The metrics saw the swarm whole, and answer on loopback only.
    report(format!(
        "swarm: metrics: at most {most_members} members in {networks_then} networks, \
         {most_bound} relay slots bound over UDP"
    ));
    assert_eq!(
        (most_members, networks_then),
        (n, networks as u64),
        "the coordinator's metrics should count every member of every network during the \
         hold; last scrape:\n{last_scrape}"
    );
    assert!(
        most_bound >= 1
            && metric(&last_scrape, "a2a_coordinator_registrations_total").is_some_and(|r| r >= n),
        "the metrics should count the swarm's UDP bindings and registrations:\n{last_scrape}"
    );
    let from_elsewhere = ns.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "2",
        &format!("http://{}:{}/metrics", coord.addr.ip(), METRICS_PORT),
    ]);
    assert!(
        !from_elsewhere.success(),
        "the coordinator's loopback metrics are reachable from another host: {from_elsewhere}"
    );
    assert_eq!(
        num("peer_lists_complete"),
        n,
        "every peer list completes: {line}"
    );
    assert!(
        num("records_received") >= n * (per_network as u64 - 1),
        "every member's record reaches every other: {line}"
    );
    assert_eq!(
        num("records_verified"),
        num("records_received"),
        "every record verifies: {line}"
    );
    assert!(
        num("binds_answered") >= n,
        "at least as many binds answered as nodes: {line}"
    );
    // What would be wrong whatever the machine's load: a record that does not verify or is no
    // member's, a message or frame out of place, a node that never got in. Connections reset,
    // timed out or closed at the registration deadline on a loaded machine (and the binds and
    // peer departures that go with them) are retried by the node and only reported.
    let errors = r["errors"].as_object().cloned().unwrap_or_default();
    let wrong: Vec<_> = errors
        .iter()
        .filter(|(k, _)| {
            k.starts_with("record_")
                || k.starts_with("unexpected_")
                || *k == "malformed_frame"
                || *k == "gave_up"
        })
        .collect();
    assert!(wrong.is_empty(), "nothing fails: {line}");
    if !errors.is_empty() {
        report(format!(
            "swarm: retried after load-related failures: {errors:?}"
        ));
    }
}
