//! A flood from one address does not take the coordinator away from everyone else: while one
//! namespace floods it, a new node joins and reaches an existing one, the existing nodes stay
//! connected, and the coordinator's counters show the flood was limited. The flooding
//! namespace is that of a member node directly on the wan (`neighbour`, a compromised machine,
//! say), whose own connection must survive the flood too. Three floods in turn
//! (`src/bin/a2a-flood.rs`):
//! - *mixed*: held TCP connections, half and replayed Noise handshakes, complete handshakes with
//!   invalid registrations (each at [`TCP_RATE`]), UDP relay data for random ids and UDP probes
//!   and binds (each at [`UDP_RATE`]);
//! - *handshakes*: complete Noise handshakes with invalid registrations only, at [`TCP_RATE`]:
//!   nothing is held, so the per-source cap on unregistered connections binds less, and the
//!   per-source bucket of new connections must;
//! - *member*: an insider (a registered member of another network on the same coordinator)
//!   sending control messages as fast as they are read, with relay frames for random ids: the
//!   per-connection message budget paces it.
//!
//! Last, `neighbour`'s a2ad is restarted during a mixed flood: its new connection is refused
//! like the flood's (the per-source caps cannot tell them apart), and a2ad must take those
//! resets as "busy" and keep trying, not give up: it is back by itself when the flood stops.
//!
//! Needs root; see the crate documentation of `a2a_netns_tests`.
//!
//! Timings are printed, never asserted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use a2a_netns_tests::{
    cpu_time, report, require_tools, wait_for, CoordOpts, Coordinator, Lab, Node, Proc,
    OVERLAY_TIMEOUT,
};

/// New TCP connections per second of each TCP kind (hold, half, full): 3000 a second in all.
const TCP_RATE: u32 = 1000;
/// UDP datagrams per second of each UDP kind (relay data, probes and binds): 40 000 in all.
const UDP_RATE: u32 = 20000;
/// What the first flood sends.
const MIXED: &str = "hold,half,full,relay,probe";

/// Starts the flooder in `ns` with `token` and `kinds`, and waits until the coordinator refuses
/// part of what it sends.
fn start_flood(
    ns: &a2a_netns_tests::Ns,
    coord: &Coordinator,
    token: &str,
    kinds: &str,
    label: &str,
) -> Proc {
    let before = coord.fresh_counters();
    let flooder = ns.spawn(
        &format!("flood-{label}"),
        &[
            env!("CARGO_BIN_EXE_a2a-flood"),
            "--token",
            token,
            "--tcp-rate",
            &TCP_RATE.to_string(),
            "--udp-rate",
            &UDP_RATE.to_string(),
            "--kinds",
            kinds,
            "--seconds",
            "300",
        ],
    );
    wait_for(
        Duration::from_secs(30),
        &format!("the coordinator to refuse part of the {label} flood"),
        || {
            flooder.assert_running();
            let c = coord.fresh_counters();
            let refused: u64 = [
                "tcp_refused_source_pending",
                "tcp_refused_source_rate",
                "udp_rate_limited",
                "ctl_msgs_throttled",
            ]
            .iter()
            .map(|k| get(&c, k).saturating_sub(get(&before, k)))
            .sum();
            if refused > 0 {
                Ok(())
            } else {
                Err(format!("counters: {c:?}"))
            }
        },
    );
    flooder
}

/// `a2actl up` (which must succeed: it waits up to a2ad's own 20 s for the registration),
/// timed; then the first HTTP answer from `peer` over the overlay, timed from the start of
/// `up`. Returns (up, first HTTP).
#[track_caller]
fn join_and_reach(node: &Node, token: &str, peer: &Node) -> (Duration, Duration) {
    let start = Instant::now();
    let ip = node.up_ok(token);
    let up = start.elapsed();
    assert_eq!(node.ctl_ip().unwrap(), ip);
    node.wait_http(peer, OVERLAY_TIMEOUT);
    (up, start.elapsed())
}

/// The flooder's counters from the last `flood t=...` line it printed.
fn flood_counts(stdout: &str) -> (f64, BTreeMap<String, u64>) {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("flood t="))
        .unwrap_or_else(|| panic!("the flooder printed no counts: {stdout:?}"));
    let mut t = 0.0;
    let mut counts = BTreeMap::new();
    for kv in line.split_whitespace().skip(1) {
        if let Some((k, v)) = kv.split_once('=') {
            if k == "t" {
                t = v.parse().unwrap_or(0.0);
            } else if let Ok(v) = v.parse() {
                counts.insert(k.to_string(), v);
            }
        }
    }
    (t, counts)
}

fn get(m: &BTreeMap<String, u64>, k: &str) -> u64 {
    m.get(k).copied().unwrap_or(0)
}

/// One flood: what the flooder sends, the node that joins during it, and the coordinator
/// counters (with what each counts) that must move.
struct Phase {
    name: &'static str,
    kinds: &'static str,
    /// Whether the flooder holds a token of its own network (else the nodes' token).
    own_network: bool,
    joiner: &'static str,
    must_count: &'static [(&'static str, &'static str)],
}

const PHASES: [Phase; 3] = [
    Phase {
        name: "mixed",
        kinds: MIXED,
        own_network: false,
        joiner: "fresh",
        must_count: &[
            (
                "tcp_refused_source_pending",
                "connections refused over the per-source cap of unregistered connections",
            ),
            (
                "tcp_register_deadline",
                "connections closed at the registration deadline",
            ),
            (
                "registrations_refused",
                "invalid registrations after complete handshakes",
            ),
            (
                "udp_rate_limited",
                "probes and binds over the source's rate",
            ),
            (
                "relay_unknown_source",
                "relay data from an address bound to no node",
            ),
            (
                "relay_bad_binds",
                "relay binds with unknown ids or wrong secrets",
            ),
        ],
    },
    Phase {
        name: "handshakes",
        kinds: "full",
        own_network: false,
        joiner: "fresh2",
        must_count: &[
            (
                "tcp_refused_source_rate",
                "connections refused over the per-source rate of new connections",
            ),
            (
                "registrations_refused",
                "invalid registrations after complete handshakes",
            ),
        ],
    },
    Phase {
        name: "member",
        kinds: "member",
        own_network: true,
        joiner: "fresh3",
        must_count: &[
            (
                "ctl_msgs_throttled",
                "control messages held to the connection's rate",
            ),
            (
                "relay_unknown_destination",
                "relay frames for ids nobody holds",
            ),
        ],
    },
];

#[test]
fn a_flood_from_one_address_leaves_the_coordinator_serving_others() {
    let Some(lab) = Lab::new("flood") else {
        return;
    };
    require_tools(&[("sysctl", "procps"), ("nstat", "iproute2")]);
    let coord = lab.coordinator(CoordOpts {
        stats_interval: Some(1),
        ..Default::default()
    });
    let alpha = lab.node("alpha");
    let bravo = lab.node("bravo");
    for n in [&alpha, &bravo] {
        n.serve_http();
        n.up_ok(&coord.token);
    }
    alpha.wait_http(&bravo, OVERLAY_TIMEOUT);
    bravo.wait_http(&alpha, OVERLAY_TIMEOUT);

    // The same join without a flood, for comparison.
    let calm = lab.node("calm");
    calm.serve_http();
    let (calm_up, calm_http) = join_and_reach(&calm, &coord.token, &alpha);
    report(format!(
        "flood: without flood: `a2actl up` {} ms, first HTTP to alpha {} ms after `up` began",
        calm_up.as_millis(),
        calm_http.as_millis()
    ));
    // The flooder's host: a member node on the wan; the flood comes from its address.
    let neighbour = lab.node("neighbour");
    neighbour.serve_http();
    neighbour.up_ok(&coord.token);
    let mut members = vec!["alpha", "bravo", "calm", "neighbour"];
    let evil = neighbour.ns.clone();
    evil.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])
        .expect_ok();
    let coord_pid = coord.proc().pid();
    let mut joined = Vec::new();
    let other_network = coord.new_token();

    for phase in &PHASES {
        let name = phase.name;
        let before = coord.fresh_counters();
        let (cpu_before, began) = (cpu_time(coord_pid), Instant::now());
        let token = if phase.own_network {
            &other_network
        } else {
            &coord.token
        };
        let flooder = start_flood(&evil, &coord, token, phase.kinds, name);
        // A few seconds more, so held connections reach their registration deadline.
        std::thread::sleep(Duration::from_secs(6));
        flooder.assert_running();

        // A new node joins through the flood and reaches an existing node.
        let fresh = lab.node(phase.joiner);
        let (up, http) = join_and_reach(&fresh, &coord.token, &alpha);
        report(format!(
            "flood: during the {name} flood: `a2actl up` {} ms, first HTTP to alpha {} ms after \
             `up` began (without flood: {} / {} ms)",
            up.as_millis(),
            http.as_millis(),
            calm_up.as_millis(),
            calm_http.as_millis()
        ));
        members.push(phase.joiner);
        // The existing nodes are still connected: they learned of the new node from the
        // coordinator, and still reach each other and the new node.
        for n in [&alpha, &bravo, &neighbour] {
            let others: Vec<&str> = members.iter().copied().filter(|p| *p != n.name).collect();
            n.wait_peers(&others, OVERLAY_TIMEOUT);
        }
        alpha
            .fetch_from(&bravo, 5)
            .unwrap_or_else(|e| panic!("alpha -> bravo during the {name} flood: {e}"));
        bravo
            .fetch_from(&alpha, 5)
            .unwrap_or_else(|e| panic!("bravo -> alpha during the {name} flood: {e}"));
        fresh.serve_http();
        bravo.wait_http(&fresh, OVERLAY_TIMEOUT);
        flooder.assert_running();
        let during = coord.fresh_counters();

        // Stop the flood and read what it did.
        let flooder_cpu = cpu_time(flooder.pid());
        let coord_cpu = cpu_time(coord_pid).saturating_sub(cpu_before);
        let flood_time = began.elapsed();
        flooder.stop(libc::SIGTERM, Duration::from_secs(10));
        let (secs, sent) = flood_counts(&flooder.stdout_text());
        let rate = |k: &str| get(&sent, k) as f64 / secs.max(0.001);
        report(format!(
            "flood: {name}: {secs:.1} s from one address ({}), target {TCP_RATE}/s per TCP kind \
             and {UDP_RATE}/s per UDP kind; sent: held connections {:.0}/s, half handshakes \
             {:.0}/s, full handshakes {:.0}/s, relay data {:.0}/s, probes+binds {:.0}/s, member \
             messages {:.0}/s (answered {:.0}/s) and relay frames {:.0}/s; CPU over {:.1} s: \
             coordinator {:.0}% of one core, flooder {:.0}%",
            phase.kinds,
            rate("hold_sent"),
            rate("half_sent"),
            rate("full_sent"),
            rate("relay_sent"),
            rate("probe_sent"),
            rate("member_msgs_sent"),
            rate("member_replies"),
            rate("member_relay_sent"),
            flood_time.as_secs_f64(),
            100.0 * coord_cpu.as_secs_f64() / flood_time.as_secs_f64(),
            100.0 * flooder_cpu.as_secs_f64() / flood_time.as_secs_f64(),
        ));
        report(format!("flood: {name}: the flooder saw: {sent:?}"));
        let listen = coord.ns.exec(&[
            "nstat",
            "-az",
            "TcpExtListenOverflows",
            "TcpExtListenDrops",
            "TcpExtSyncookiesSent",
            "UdpRcvbufErrors",
        ]);
        report(format!(
            "flood: {name}: the coordinator's kernel (totals so far): {}",
            listen
                .stdout
                .lines()
                .filter(|l| l.starts_with("TcpExt") || l.starts_with("Udp"))
                .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join("="))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        let after = coord.fresh_counters();
        let delta = |k: &str| get(&after, k).saturating_sub(get(&before, k));
        report(format!(
            "flood: {name}: coordinator counters moved by: {}",
            after
                .keys()
                .filter(|k| delta(k) > 0)
                .map(|k| format!("{k}=+{}", delta(k)))
                .collect::<Vec<_>>()
                .join(" ")
        ));

        // The flood was limited, and each part of it is counted.
        for (k, what) in phase.must_count {
            assert!(
                delta(k) > 0,
                "the coordinator counted no {what} ({k}) during the {name} flood: {after:?}"
            );
        }
        if get(&sent, "probe_sent") > 0 {
            let answered = get(&sent, "probe_answered");
            assert!(
                answered < get(&sent, "probe_sent"),
                "every probe of the {name} flood was answered ({answered})"
            );
        }
        // Nobody else was refused or had to register again: the new node registered once, and
        // the insider (if any) as often as it says.
        let insider = get(&sent, "member_registered");
        let registered = get(&during, "registrations") - get(&before, "registrations");
        assert!(
            registered >= 1 && registered <= 1 + insider,
            "{registered} registrations during the {name} flood, for one new node and {insider} \
             of the insider: a node lost its connection"
        );
        assert_eq!(
            get(&during, "members"),
            members.len() as u64 + u64::from(phase.own_network),
            "live members during the {name} flood"
        );
        joined.push(fresh);
    }

    // The flooder's own node, restarted during a flood: refused like the flood while it runs
    // (it shares the address), never giving up, back by itself when the flood ends.
    let flooder = start_flood(&evil, &coord, &coord.token, MIXED, "restart");
    neighbour.stop_daemon(libc::SIGTERM);
    neighbour.start_daemon();
    std::thread::sleep(Duration::from_secs(10));
    let in_during_flood = alpha
        .try_status()
        .map(|st| st.peer("neighbour").is_some())
        .unwrap_or(false);
    neighbour.assert_daemon_running();
    flooder.stop(libc::SIGTERM, Duration::from_secs(10));
    let stopped = Instant::now();
    let others: Vec<&str> = members.iter().copied().filter(|p| *p != "alpha").collect();
    alpha.wait_peers(&others, OVERLAY_TIMEOUT);
    neighbour.wait_http(&alpha, OVERLAY_TIMEOUT);
    let st = neighbour.status();
    assert!(
        st.me.is_some(),
        "neighbour is not a member after its restart: {:?}",
        st.raw
    );
    report(format!(
        "flood: neighbour (restarted at the flooder's address during a mixed flood): {} while \
         the flood ran; back on the overlay {} ms after it stopped",
        if in_during_flood {
            "got back in"
        } else {
            "refused"
        },
        stopped.elapsed().as_millis()
    ));

    // Afterwards everything still works, and the output named no one.
    coord.assert_running();
    for n in [&alpha, &bravo, &calm, &neighbour]
        .into_iter()
        .chain(&joined)
    {
        n.assert_daemon_running();
        if n.name != "alpha" {
            alpha.wait_http(n, OVERLAY_TIMEOUT);
        }
    }
    let log = format!(
        "{}{}",
        coord.proc().stdout_text(),
        coord.proc().stderr_text()
    );
    let evil_ip = neighbour.wan_ip().to_string();
    let mut secrets = vec![
        format!("{evil_ip}:"),
        format!("{evil_ip} "),
        "insider".to_string(),
    ];
    for n in &joined {
        secrets.push(n.overlay_ip().to_string());
        secrets.push(n.wan_ip().to_string());
        secrets.push(n.name.clone());
    }
    for secret in secrets {
        assert!(
            !log.contains(&secret),
            "the coordinator's output names a node or the flooder ({secret})"
        );
    }
}
