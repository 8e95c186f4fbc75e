//! At swarm size (issue 12): many nodes as open hosts on one bridge, all joining at once, every directed
//! path direct within 15 s. Needs root; see the crate documentation of `a2a_netns_tests`.
//!
//! Kept light for a 2-core machine: one a2ad per node and nothing else in its namespace (no
//! HTTP servers, no iperf3); the paths are read from `a2actl status --json`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use a2a_netns_tests::{report, require_tool, CoordOpts, Lab, Node};

const NODES: usize = 50;
/// Every directed path is direct within this of the moment the joins start.
const ALL_DIRECT_WITHIN: Duration = Duration::from_secs(15);

/// What `a2actl status` says on every node at one moment.
struct Survey {
    /// For each node: how many peers it lists, and how many of those are direct.
    counts: Vec<(usize, usize)>,
    /// Directed paths by kind (`direct`, `relay`, `none`).
    kinds: BTreeMap<String, usize>,
    /// Counters summed over all nodes.
    sums: BTreeMap<String, u64>,
}

fn survey(nodes: &[Node]) -> Survey {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let statuses: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes.iter().map(|n| s.spawn(|| n.try_status())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut counts = Vec::new();
    let mut sums = BTreeMap::new();
    for st in statuses {
        let Ok(st) = st else {
            counts.push((0, 0));
            continue;
        };
        for p in &st.peers {
            *kinds.entry(p.path.clone()).or_default() += 1;
        }
        let direct = st.peers.iter().filter(|p| p.path == "direct").count();
        counts.push((st.peers.len(), direct));
        if let Some(c) = st.raw["counters"].as_object() {
            for (k, v) in c {
                *sums.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
            }
        }
    }
    Survey {
        counts,
        kinds,
        sums,
    }
}

fn nonzero(sums: &BTreeMap<String, u64>) -> String {
    sums.iter()
        .filter(|(k, v)| **v > 0 && !k.starts_with("fast_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn fifty_open_nodes_joining_at_once_all_go_direct_within_15_s() {
    let Some(lab) = Lab::new("crowd") else {
        return;
    };
    require_tool("ip", "iproute2");
    let coord = lab.coordinator(CoordOpts::default());
    let nodes: Vec<Node> = (0..NODES).map(|i| lab.node(&format!("n{i:02}"))).collect();

    // All at once: every `a2actl up` is started together.
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for n in &nodes {
            let token = coord.token.clone();
            s.spawn(move || n.up_ok(&token));
        }
    });
    let joined = t0.elapsed();
    report(format!(
        "crowd: {NODES} nodes joined in {:.1} s",
        joined.as_secs_f64()
    ));

    let want = NODES * (NODES - 1);
    let deadline = t0 + ALL_DIRECT_WITHIN;
    loop {
        let Survey {
            counts,
            kinds,
            sums,
        } = survey(&nodes);
        let direct: usize = counts.iter().map(|c| c.1).sum();
        let t = t0.elapsed().as_secs_f64();
        report(format!(
            "crowd: t={t:.1}s {direct}/{want} directed paths direct: {kinds:?}"
        ));
        if direct == want {
            report(format!("crowd: counters {}", nonzero(&sums)));
            let nodes_dropped: u64 = nodes.iter().map(|n| n.ns.udp_rcvbuf_errors()).sum();
            report(format!(
                "crowd: UDP receive buffer overflows: coordinator {}, nodes {nodes_dropped}",
                coord.ns.udp_rcvbuf_errors()
            ));
            break;
        }
        if Instant::now() >= deadline {
            let behind: Vec<String> = nodes
                .iter()
                .zip(&counts)
                .filter(|(_, c)| c.1 < NODES - 1)
                .map(|(n, c)| format!("{}:{}/{}", n.name, c.1, c.0))
                .collect();
            panic!(
                "only {direct} of {want} directed paths direct {:?} after the joins began ({kinds:?}; \
                 per node direct/listed: {behind:?}); counters: {}",
                ALL_DIRECT_WITHIN,
                nonzero(&sums)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
