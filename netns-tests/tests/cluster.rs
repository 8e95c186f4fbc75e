//! The coordinator cluster on NATS (README, *A coordinator cluster on NATS*), with the real
//! `nats-server` (three servers in one NATS cluster, configuration written here: users with
//! passwords, JetStream off) and real coordinators and nodes, each in its own namespace.
//! Routers cut some nodes off from one coordinator, so that two nodes reach no coordinator in
//! common. Needs root and `nats-server` (installed by `./run-tests`).

use std::time::{Duration, Instant};

use a2a_netns_tests::{
    coordinator_counter as counter, report, require_tools, wait_for, Coordinator, Lab, Nat,
    NatsAuth, NatsServer, Node, PingStats, OVERLAY_TIMEOUT,
};

/// Long enough for hole punching between two easy NATs.
const PATH_TIMEOUT: Duration = Duration::from_secs(25);
const METRICS_PORT: u16 = 9300;

/// `n` coordinators sharing one identity and the full `--endpoint` list, each joined to every
/// NATS server, with metrics on their wan address (`Lab::coordinators_on_nats`).
fn coordinators(lab: &Lab, nats: &[NatsServer], auth: &NatsAuth, n: usize) -> Vec<Coordinator> {
    lab.coordinators_on_nats(nats, auth, n, METRICS_PORT, false)
}

/// The coordinator key and the endpoints a token names.
fn token_names(token: &str) -> ([u8; 32], Vec<String>) {
    let t = a2a_proto::JoinToken::parse(token).expect("a valid token");
    (t.coordinator_key, t.endpoints)
}

/// A stranger posing as a coordinator's bridge: `HOST PORT`; writes the bridge magic and a
/// hello of random bytes, prints "closed" when the coordinator closes without a word, else
/// "answered N".
const BRIDGE_STRANGER: &str = r#"
import os, socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"a2abrg1\n" + struct.pack(">I", 60) + b"a2c1" + os.urandom(56))
try:
    d = s.recv(100)
    print("closed" if d == b"" else "answered %d" % len(d))
except ConnectionResetError:
    print("closed")
"#;

/// Forged envelopes the stranger publishes, and how often it replays a genuine message.
const STRANGER_FORGERIES: u64 = 50;
const STRANGER_REPLAYS: u64 = 5;

/// A NATS client in raw protocol: `HOST PORT USER PASSWORD SUBJECT` (`-` for no user).
/// Prints "refused …" when NATS refuses it; else publishes 50 envelopes with the cluster's
/// magic and random bytes, then takes the first genuine message on SUBJECT and publishes it
/// again 5 times, and prints "sent".
const STRANGER: &str = r#"
import os, socket, sys
host, port, user, pw, subject = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
CRLF = b"\r\n"
s = socket.create_connection((host, port), timeout=10)
f = s.makefile("rb")
f.readline()
auth = "" if user == "-" else '"user":"%s","pass":"%s",' % (user, pw)
s.sendall(('CONNECT {' + auth + '"verbose":false,"pedantic":false}').encode() + CRLF + b"PING" + CRLF)
line = f.readline()
if not line.startswith(b"PONG"):
    print("refused", line.decode().strip())
    sys.exit(0)
subj = subject.encode()
def pub(p):
    s.sendall(b"PUB " + subj + b" " + str(len(p)).encode() + CRLF + p + CRLF)
for _ in range(50):
    pub(b"a2c1" + os.urandom(120))
s.sendall(b"SUB " + subj + b" 1" + CRLF)
while True:
    line = f.readline()
    if line.startswith(b"MSG"):
        n = int(line.split()[-1])
        payload = f.read(n)
        f.read(2)
        break
    if line.startswith(b"PING"):
        s.sendall(b"PONG" + CRLF)
for _ in range(5):
    pub(payload)
s.sendall(b"PING" + CRLF)
while not f.readline().startswith(b"PONG"):
    pass
print("sent")
"#;

/// Whether `hay` holds `needle` not as part of a longer number or word (`10.1.0.5` is not in
/// `10.1.0.52`).
fn mentions(hay: &str, needle: &str) -> bool {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    hay.match_indices(needle).any(|(i, _)| {
        !word(hay[..i].chars().next_back()) && !word(hay[i + needle.len()..].chars().next())
    })
}

#[test]
fn nodes_on_different_coordinators_see_each_other_punch_relay_and_fail_over() {
    let Some(lab) = Lab::new("cluster") else {
        return;
    };
    require_tools(&[
        ("nats-server", "nats-server"),
        ("nft", "nftables"),
        ("ping", "iputils-ping"),
        ("iperf3", "iperf3"),
        ("strace", "strace"),
        ("python3", "python3"),
    ]);
    let auth = lab.nats_auth();
    let nats_ns: Vec<_> = (1..=3).map(|i| lab.add_ns(&format!("nats{i}"))).collect();
    let nats = lab.nats_cluster(&nats_ns, &auth, true);
    let coords = coordinators(&lab, &nats, &auth, 2);
    let (c1, c2) = (&coords[0], &coords[1]);
    // One identity: both print tokens with the same coordinator key and both endpoints (each
    // token is a new network's, so the nodes below all use the first).
    let (key1, endpoints1) = token_names(&c1.token);
    assert_eq!((key1, endpoints1.clone()), token_names(&c2.token));
    assert_eq!(endpoints1, vec![c1.addr.to_string(), c2.addr.to_string()]);
    let token = &c1.token;

    // easy-1 reaches both coordinators (and registers with the first, c1); easy-2 only c2;
    // hard-1 only c1, hard-2 only c2.
    let r_easy1 = lab.router("rtr-easy1", Nat::Easy);
    let r_easy2 = lab.router("rtr-easy2", Nat::Easy);
    let r_hard1 = lab.router("rtr-hard1", Nat::Hard);
    let r_hard2 = lab.router("rtr-hard2", Nat::Hard);
    let r_hard3 = lab.router("rtr-hard3", Nat::Hard);
    r_easy2.cut_off_from(*c1.addr.ip());
    r_hard3.cut_off_from(*c1.addr.ip());
    r_hard1.cut_off_from(*c2.addr.ip());
    r_hard2.cut_off_from(*c1.addr.ip());
    let e1 = lab.node_behind(&r_easy1, "easy-1");
    let e2 = lab.node_behind(&r_easy2, "easy-2");
    let h1 = lab.node_behind(&r_hard1, "hard-1");
    let h2 = lab.node_behind(&r_hard2, "hard-2");
    let h3 = lab.node_behind(&r_hard3, "hard-3");

    let regs = |c: &Coordinator| counter(c, "registrations");
    e1.up_ok(token);
    assert_eq!((regs(c1), regs(c2)), (1, 0), "easy-1 registers with c1");
    let t0 = Instant::now();
    e2.up_ok(token);
    assert_eq!((regs(c1), regs(c2)), (1, 1), "easy-2 registers with c2");
    // Members of different coordinators see each other.
    e1.wait_peers(&["easy-2"], OVERLAY_TIMEOUT);
    e2.wait_peers(&["easy-1"], OVERLAY_TIMEOUT);
    let seen = t0.elapsed();
    report(format!(
        "cluster: easy-2 (on c2) and easy-1 (on c1) list each other {:.0} ms after easy-2's up returned",
        seen.as_secs_f64() * 1000.0
    ));
    assert!(
        seen <= Duration::from_secs(2),
        "members of two coordinators took {seen:?} to see each other (the issue asks for 2 s)"
    );
    // They punch through each other's coordinators: direct.
    let took = e1.wait_path("easy-2", "direct", PATH_TIMEOUT);
    e2.wait_path("easy-1", "direct", PATH_TIMEOUT);
    report(format!("cluster: easy-1 ↔ easy-2 direct after {took:?}"));
    assert!(counter(c1, "punches") + counter(c2, "punches") > 0);

    // Two nodes that reach no coordinator in common relay through c1, NATS and c2.
    h1.up_ok(token);
    h2.up_ok(token);
    h3.up_ok(token);
    assert_eq!((regs(c1), regs(c2)), (2, 3));
    let all = ["easy-1", "easy-2", "hard-1", "hard-2", "hard-3"];
    for n in [&e1, &e2, &h1, &h2, &h3] {
        let others: Vec<&str> = all.iter().copied().filter(|x| *x != n.name).collect();
        n.wait_peers(&others, OVERLAY_TIMEOUT);
    }
    let out_before = counter(c1, "cluster_relayed_out");
    let in_before = counter(c2, "cluster_relayed_in");
    let probes = wait_for(
        OVERLAY_TIMEOUT,
        "hard-1 to reach hard-2 over the relay",
        || {
            let p = h1.ping_peer("hard-2", 5);
            if p.iter().any(|(_, rtt)| rtt.is_some()) {
                Ok(p)
            } else {
                Err(format!("{p:?}"))
            }
        },
    );
    assert!(probes.iter().all(|(path, _)| path == "relay"), "{probes:?}");
    assert!(
        h1.ns.ping(h2.overlay_ip(), 5),
        "hard-1 pings hard-2 over the overlay (relayed across coordinators)"
    );
    assert!(counter(c1, "cluster_relayed_out") > out_before);
    assert!(counter(c2, "cluster_relayed_in") > in_before);
    // Relayed throughput across coordinators (hard-1 on c1 → hard-2 on c2) and through one
    // (hard-3 on c2 → hard-2): measured and reported, not asserted (a shared 2-core machine).
    let _iperf = h2.ns.iperf3_server();
    let _rtt: f64 = wait_for(OVERLAY_TIMEOUT, "hard-3 to reach hard-2", || {
        h3.ping_peer("hard-2", 1)
            .first()
            .and_then(|(_, rtt)| *rtt)
            .ok_or_else(|| "no answer".to_string())
    });
    let one = h3
        .ns
        .iperf3_client(h2.overlay_ip(), 5)
        .expect("iperf3 through one coordinator");
    let across = h1
        .ns
        .iperf3_client(h2.overlay_ip(), 5)
        .expect("iperf3 across coordinators");
    report(format!(
        "cluster: relayed TCP throughput through one coordinator {one:.0} Mbit/s, across two over NATS {across:.0} Mbit/s ({:.0} %)",
        100.0 * across / one
    ));
    // Idle round trips over the relay, across coordinators and through one.
    let rtt = |from: &Node| {
        let p = from.ping_peer("hard-2", 5);
        let mut v: Vec<f64> = p.iter().filter_map(|(_, r)| *r).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    report(format!(
        "cluster: relayed ping RTT (median of 5) across coordinators {:.2} ms, through one {:.2} ms",
        rtt(&h1),
        rtt(&h3)
    ));
    report(format!(
        "cluster: after the transfers: c1 relayed out {} (dropped at its NATS queue {}), c2 relayed in {}",
        counter(c1, "cluster_relayed_out"),
        counter(c1, "cluster_publish_dropped"),
        counter(c2, "cluster_relayed_in"),
    ));

    // kill -9 of c1 while easy-1 pings easy-2 ten times a second: nothing is lost, and
    // easy-1 re-registers with c2.
    let target = e2.overlay_ip().to_string();
    let ping = e1.ns.spawn(
        "ping10",
        &["ping", "-n", "-i", "0.1", "-c", "100", "-W", "2", &target],
    );
    std::thread::sleep(Duration::from_secs(2));
    let before = regs(c2);
    let killed = Instant::now();
    c1.kill();
    let failover = wait_for(
        Duration::from_secs(20),
        "easy-1 to re-register with c2",
        || {
            if regs(c2) > before {
                Ok(killed.elapsed())
            } else {
                Err("not yet".into())
            }
        },
    );
    report(format!(
        "cluster: easy-1 re-registered with c2 {failover:?} after kill -9 of c1"
    ));
    assert!(
        failover <= Duration::from_secs(5),
        "easy-1 took {failover:?} to move to c2 (the issue asks for 5 s)"
    );
    // A node joins during the outage (its token names c1 first: it moves on to c2).
    let late = lab.node("late");
    late.up_ok(token);
    late.wait_peers(&["easy-1", "easy-2", "hard-2", "hard-3"], OVERLAY_TIMEOUT);
    e2.wait_peers(
        &["easy-1", "hard-2", "hard-3", "late"],
        Duration::from_secs(20),
    );
    let out = wait_for(Duration::from_secs(30), "the 10/s ping to end", || {
        ping.exit_status()
            .map(|_| ping.stdout_text())
            .ok_or_else(|| "running".to_string())
    });
    let stats = PingStats::parse(&out).expect("ping output");
    report(format!(
        "cluster: 10/s ping easy-1 → easy-2 across kill -9 of easy-1's coordinator: {} of {} answered",
        stats.rtts.len(),
        stats.sent
    ));
    assert_eq!(stats.sent, 100);
    assert_eq!(
        stats.rtts.len(),
        100,
        "no ping lost across the failover:\n{out}"
    );
    // c1 comes back (a new instance: it asks the others for what they hold at start): hard-1,
    // which reaches only c1, registers again and sees every member, those of c2 included;
    // c2's members see hard-1 again.
    let restarted = Instant::now();
    c1.restart();
    let everyone = ["easy-1", "easy-2", "hard-1", "hard-2", "hard-3", "late"];
    for n in [&h1, &e2, &h2, &late] {
        let others: Vec<&str> = everyone.iter().copied().filter(|x| *x != n.name).collect();
        n.wait_peers(&others, OVERLAY_TIMEOUT);
    }
    report(format!(
        "cluster: after c1's restart, hard-1 (on c1 only) and c2's members list each other within {:?}",
        restarted.elapsed()
    ));
    let again = wait_for(OVERLAY_TIMEOUT, "hard-1 to reach hard-2 again", || {
        let p = h1.ping_peer("hard-2", 3);
        if p.iter().any(|(_, rtt)| rtt.is_some()) {
            Ok(restarted.elapsed())
        } else {
            Err(format!("{p:?}"))
        }
    });
    report(format!(
        "cluster: hard-1 reaches hard-2 over the relay again {again:?} after c1's restart"
    ));
    for refused in ["seal", "replay", "stale", "flood", "malformed"] {
        assert_eq!(
            counter(c2, &format!("cluster_refused_{refused}")),
            0,
            "{refused}"
        );
    }

    // A stranger on NATS: without the password NATS refuses it; with it (a leaked password,
    // another tenant of the same NATS user) its forged envelopes and its replay of a genuine
    // message are refused and counted by both coordinators, and nothing is applied.
    let subject = a2a_proto::cluster::subject_all(&a2a_proto::cluster::cluster_id(&key1));
    let stranger = lab.add_ns("stranger");
    let nats_host = nats[0].ns.wan_ip.unwrap().to_string();
    let port = a2a_netns_tests::NATS_PORT.to_string();
    let script = lab.dir().join("stranger.py");
    std::fs::write(&script, STRANGER).unwrap();
    let script = script.to_string_lossy().into_owned();
    let out = stranger.exec(&["python3", &script, &nats_host, &port, "-", "-", &subject]);
    assert!(
        out.stdout.contains("refused") && out.stdout.contains("Authorization Violation"),
        "NATS let a client without the password in: {out}"
    );
    let sum = |name: &str| counter(c1, name) + counter(c2, name);
    let (seal0, replay0, remote0) = (
        sum("cluster_refused_seal"),
        sum("cluster_refused_replay"),
        sum("cluster_remote_members"),
    );
    let out = stranger.exec(&[
        "python3",
        &script,
        &nats_host,
        &port,
        a2a_netns_tests::NATS_USER,
        &auth.password,
        &subject,
    ]);
    assert!(
        out.stdout.contains("sent"),
        "the stranger could not publish: {out}"
    );
    wait_for(
        Duration::from_secs(10),
        "both coordinators to refuse the forgeries",
        || {
            let seal = sum("cluster_refused_seal") - seal0;
            let replay = sum("cluster_refused_replay") - replay0;
            if seal >= 2 * STRANGER_FORGERIES && replay >= STRANGER_REPLAYS {
                Ok(())
            } else {
                Err(format!("refused so far: {seal} forged, {replay} replayed"))
            }
        },
    );
    assert_eq!(
        sum("cluster_remote_members"),
        remote0,
        "nothing was applied"
    );
    report(format!(
        "cluster: a stranger with the NATS password: {} forged envelopes and {} replays refused",
        sum("cluster_refused_seal") - seal0,
        sum("cluster_refused_replay") - replay0
    ));

    // A stranger at a coordinator's endpoint posing as another coordinator's bridge: its
    // hello does not open, so the coordinator answers nothing, closes and counts it.
    let bridge_script = lab.dir().join("bridge_stranger.py");
    std::fs::write(&bridge_script, BRIDGE_STRANGER).unwrap();
    let bridge_script = bridge_script.to_string_lossy().into_owned();
    let refused0 = counter(c1, "cluster_bridges_refused");
    let out = stranger.exec(&[
        "python3",
        &bridge_script,
        &c1.addr.ip().to_string(),
        &c1.addr.port().to_string(),
    ]);
    assert!(
        out.stdout.contains("closed"),
        "a forged bridge hello was answered: {out}"
    );
    assert_eq!(counter(c1, "cluster_bridges_refused"), refused0 + 1);
    assert_eq!(
        sum("cluster_remote_members"),
        remote0,
        "nothing was applied"
    );

    // Zero-log in a cluster: at their most verbose level (A2A_LOG=trace), neither coordinator
    // printed a node's name, key or addresses, nor the NATS password.
    let mut needles: Vec<(String, String)> =
        vec![("the NATS password".into(), auth.password.clone())];
    for n in [&e1, &e2, &h1, &h2, &h3, &late] {
        let me = n.status().me.expect("joined");
        needles.push((format!("{}'s name", n.name), n.name.clone()));
        needles.push((format!("{}'s key", n.name), me.public_key.clone()));
        needles.push((format!("{}'s overlay address", n.name), me.ip.to_string()));
    }
    for r in [&r_easy1, &r_easy2, &r_hard1, &r_hard2, &r_hard3] {
        needles.push((
            format!("{}'s wan address", r.ns.role),
            r.wan_ip().to_string(),
        ));
    }
    needles.push(("late's wan address".into(), late.wan_ip().to_string()));
    // The NATS servers wrote nothing (strace of their file-system calls, from the start).
    for (i, n) in nats.iter().enumerate() {
        let writes = n.file_writes();
        assert!(
            writes.is_empty(),
            "nats-server {i} wrote to files:\n{}",
            writes.join("\n")
        );
    }
    for (i, c) in coords.iter().enumerate() {
        let p = c.proc();
        let printed = format!("{}\n{}", p.stdout_text(), p.stderr_text());
        for (what, needle) in &needles {
            assert!(
                !mentions(&printed, needle),
                "coordinator {} printed {what}:\n{printed}",
                i + 1
            );
        }
    }
}

/// One iperf3 TCP run from `from` to `to`'s overlay address: Mbit/s received and the sender's
/// retransmissions.
fn iperf3(from: &Node, to: &Node, secs: u32) -> (f64, u64) {
    let ip = to.overlay_ip().to_string();
    let t = secs.to_string();
    let out = from.ns.exec_timeout(
        &["iperf3", "-c", &ip, "-p", "5201", "-t", &t, "-J"],
        Duration::from_secs(u64::from(secs) + 20),
    );
    let json: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3 printed no JSON ({e}): {out}"));
    let end = &json["end"];
    let mbps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 without a throughput: {out}"))
        / 1e6;
    let retransmits = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    let sender = &end["streams"][0]["sender"];
    report(format!(
        "iperf3 {} → {}: {mbps:.0} Mbit/s, congestion window up to {} bytes, RTT mean {} µs, max {} µs",
        from.name, to.name, sender["max_snd_cwnd"], sender["mean_rtt"], sender["max_rtt"]
    ));
    (mbps, retransmits)
}

/// The table [`cut_bridges`] adds.
const BRIDGE_CUT_TABLE: &str = "a2a_bridgecut";

/// Refuses (with a TCP reset, at once) every TCP segment between `c`'s namespace and the
/// `others`' endpoints, both ways: their bridges close and cannot be dialed again; NATS and the
/// nodes are untouched.
fn cut_bridges(c: &Coordinator, others: &[&Coordinator]) {
    c.ns.exec(&["nft", "add", "table", "inet", BRIDGE_CUT_TABLE])
        .expect_ok();
    c.ns.exec(&[
        "nft",
        &format!(
            "add chain inet {BRIDGE_CUT_TABLE} out {{ type filter hook output priority -30; }}"
        ),
    ])
    .expect_ok();
    for o in others {
        let (ip, port) = (o.addr.ip(), o.addr.port());
        for dir in ["dport", "sport"] {
            let rule = format!(
                "add rule inet {BRIDGE_CUT_TABLE} out ip daddr {ip} tcp {dir} {port} reject with tcp reset"
            );
            c.ns.exec(&["nft", &rule]).expect_ok();
        }
    }
}

/// Relay data across coordinators goes over a bridge (a direct TCP connection between the two
/// coordinators) when they reach each other, else over NATS, several datagrams to a message:
/// hard-1 (reaches only c1) sends TCP to hard-2 (only c2) through c1 and c2, and hard-3 (only
/// c2) to hard-2 through c2 alone. Then the coordinators' bridges are cut (TCP resets between
/// them) and hard-1 sends again, now over NATS. The three throughputs are reported (not
/// asserted: a shared 2-core machine); the counters must show the first run crossed the
/// bridge and not NATS, the second NATS in fewer messages than datagrams, none dropped at the
/// queue to NATS, and that all arrived.
#[test]
fn relay_across_coordinators_goes_over_a_bridge_or_nats_in_batches() {
    let Some(lab) = Lab::new("clrelay") else {
        return;
    };
    require_tools(&[
        ("nats-server", "nats-server"),
        ("nft", "nftables"),
        ("iperf3", "iperf3"),
    ]);
    let auth = lab.nats_auth();
    let nats_ns: Vec<_> = (1..=3).map(|i| lab.add_ns(&format!("nats{i}"))).collect();
    let nats = lab.nats_cluster(&nats_ns, &auth, false);
    let coords = coordinators(&lab, &nats, &auth, 2);
    let (c1, c2) = (&coords[0], &coords[1]);
    let token = &c1.token;
    let r_hard1 = lab.router("rtr-hard1", Nat::Hard);
    let r_hard2 = lab.router("rtr-hard2", Nat::Hard);
    let r_hard3 = lab.router("rtr-hard3", Nat::Hard);
    r_hard1.cut_off_from(*c2.addr.ip());
    r_hard2.cut_off_from(*c1.addr.ip());
    r_hard3.cut_off_from(*c1.addr.ip());
    let h1 = lab.node_behind(&r_hard1, "hard-1");
    let h2 = lab.node_behind(&r_hard2, "hard-2");
    let h3 = lab.node_behind(&r_hard3, "hard-3");
    for n in [&h1, &h2, &h3] {
        n.up_ok(token);
    }
    let all = ["hard-1", "hard-2", "hard-3"];
    for n in [&h1, &h2, &h3] {
        let others: Vec<&str> = all.iter().copied().filter(|x| *x != n.name).collect();
        n.wait_peers(&others, OVERLAY_TIMEOUT);
    }
    // Each coordinator dials the token's endpoints and finds the other (and itself).
    for c in [c1, c2] {
        wait_for(
            Duration::from_secs(10),
            "a bridge between c1 and c2",
            || match counter(c, "cluster_bridges") {
                1 => Ok(()),
                n => Err(format!("{n} bridges up")),
            },
        );
    }
    let _iperf = h2.ns.iperf3_server();
    for from in [&h1, &h3] {
        wait_for(OVERLAY_TIMEOUT, "a relayed answer from hard-2", || {
            from.ping_peer("hard-2", 1)
                .first()
                .and_then(|(_, rtt)| *rtt)
                .ok_or_else(|| "no answer".to_string())
        });
    }
    let (one, one_re) = iperf3(&h3, &h2, 5);
    let out0 = counter(c1, "cluster_relayed_out");
    let msgs0 = counter(c1, "cluster_relay_messages_out");
    let bridged0 = counter(c1, "cluster_bridged_out");
    let bin0 = counter(c2, "cluster_bridged_in");
    let in0 = counter(c2, "cluster_relayed_in");
    let (bridged, bridged_re) = iperf3(&h1, &h2, 5);
    let out = counter(c1, "cluster_relayed_out") - out0;
    let over_nats = counter(c1, "cluster_relay_messages_out") - msgs0;
    let envelopes = counter(c1, "cluster_bridged_out") - bridged0;
    let envelopes_in = counter(c2, "cluster_bridged_in") - bin0;
    let inn = counter(c2, "cluster_relayed_in") - in0;
    let full = counter(c1, "cluster_bridge_full");
    report(format!(
        "cluster relay: TCP through one coordinator {one:.0} Mbit/s ({one_re} retransmits), \
         across two over a bridge {bridged:.0} Mbit/s ({bridged_re} retransmits, {:.0} %); c1 \
         sent {out} datagrams in {envelopes} envelopes over the bridge ({:.1} per envelope) \
         and {over_nats} over NATS ({full} with the bridge full); c2 received {inn}",
        100.0 * bridged / one,
        out as f64 / envelopes.max(1) as f64
    ));
    assert!(out > 1000, "only {out} datagrams crossed in 5 s of iperf3");
    assert!(
        envelopes > 0 && envelopes < out,
        "{out} relay datagrams took {envelopes} envelopes over the bridge"
    );
    assert_eq!(
        envelopes_in, envelopes,
        "c2 received what c1 sent over the bridge"
    );
    assert!(
        over_nats <= full,
        "{over_nats} relay envelopes went over NATS with a bridge up ({full} when it was full)"
    );
    assert!(
        inn >= out * 99 / 100,
        "c1 sent {out} datagrams, c2 received {inn}"
    );

    // The bridges cut: relay data goes over NATS again.
    cut_bridges(c1, &[c2]);
    cut_bridges(c2, &[c1]);
    wait_for(Duration::from_secs(15), "the bridges closed", || {
        // Traffic both ways makes each side meet the reset.
        h1.ping_peer("hard-2", 1);
        match (
            counter(c1, "cluster_bridges"),
            counter(c2, "cluster_bridges"),
        ) {
            (0, 0) => Ok(()),
            n => Err(format!("bridges up on c1, c2: {n:?}")),
        }
    });
    wait_for(
        OVERLAY_TIMEOUT,
        "a relayed answer from hard-2 over NATS",
        || {
            h1.ping_peer("hard-2", 1)
                .first()
                .and_then(|(_, rtt)| *rtt)
                .ok_or_else(|| "no answer".to_string())
        },
    );
    let out0 = counter(c1, "cluster_relayed_out");
    let msgs0 = counter(c1, "cluster_relay_messages_out");
    let bridged0 = counter(c1, "cluster_bridged_out");
    let in0 = counter(c2, "cluster_relayed_in");
    let (across, across_re) = iperf3(&h1, &h2, 5);
    let out = counter(c1, "cluster_relayed_out") - out0;
    let msgs = counter(c1, "cluster_relay_messages_out") - msgs0;
    let inn = counter(c2, "cluster_relayed_in") - in0;
    let dropped = counter(c1, "cluster_publish_dropped");
    assert_eq!(
        counter(c1, "cluster_bridged_out"),
        bridged0,
        "relay data went over a bridge that was cut"
    );
    report(format!(
        "cluster relay, bridges cut: across two over NATS {across:.0} Mbit/s ({across_re} \
         retransmits, {:.0} % of through one); c1 sent {out} datagrams in {msgs} NATS messages \
         ({:.1} per message), dropped {dropped} at its queue to NATS; c2 received {inn}",
        100.0 * across / one,
        out as f64 / msgs.max(1) as f64
    ));
    assert!(
        out > 1000,
        "only {out} datagrams crossed NATS in 5 s of iperf3"
    );
    assert!(
        msgs < out,
        "{out} relay datagrams took {msgs} NATS messages: none were batched"
    );
    assert_eq!(dropped, 0, "relay data dropped at the queue to NATS");
    // What c1 published, c2 received (core NATS may lose messages only on a failure).
    assert!(
        inn >= out * 99 / 100,
        "c1 sent {out} datagrams, c2 received {inn}"
    );
}

/// A kick crosses the cluster: alpha (reaches only c1) kicks bravo (reaches only c2); c2
/// applies the revocation as if its own member had sent it (counted as a revocation there):
/// charlie (also on c2 only) drops bravo, and bravo stays out.
#[test]
fn a_kick_on_one_coordinator_removes_the_node_held_by_another() {
    let Some(lab) = Lab::new("clkick") else {
        return;
    };
    require_tools(&[("nats-server", "nats-server"), ("nft", "nftables")]);
    let auth = lab.nats_auth();
    let nats_ns = [lab.add_ns("nats1")];
    let nats = lab.nats_cluster(&nats_ns, &auth, false);
    let coords = coordinators(&lab, &nats, &auth, 2);
    let (c1, c2) = (&coords[0], &coords[1]);
    let token = &c1.token;
    let r_alpha = lab.router("rtr-alpha", Nat::Easy);
    let r_bravo = lab.router("rtr-bravo", Nat::Easy);
    let r_charlie = lab.router("rtr-charlie", Nat::Easy);
    r_alpha.cut_off_from(*c2.addr.ip());
    r_bravo.cut_off_from(*c1.addr.ip());
    r_charlie.cut_off_from(*c1.addr.ip());
    let alpha = lab.node_behind(&r_alpha, "alpha");
    let bravo = lab.node_behind(&r_bravo, "bravo");
    let charlie = lab.node_behind(&r_charlie, "charlie");
    for n in [&alpha, &bravo, &charlie] {
        n.up_ok(token);
    }
    let regs = |c: &Coordinator| counter(c, "registrations");
    assert_eq!((regs(c1), regs(c2)), (1, 2));
    let all = ["alpha", "bravo", "charlie"];
    for n in [&alpha, &bravo, &charlie] {
        let others: Vec<&str> = all.iter().copied().filter(|x| *x != n.name).collect();
        n.wait_peers(&others, OVERLAY_TIMEOUT);
    }
    let revocations = counter(c2, "revocations");
    alpha.ctl(&["kick", "bravo"]).expect_ok();
    // charlie, on c2, hears of it from c2.
    charlie.wait_peers(&["alpha"], OVERLAY_TIMEOUT);
    alpha.wait_peers(&["charlie"], OVERLAY_TIMEOUT);
    assert_eq!(counter(c2, "revocations"), revocations + 1);
    // It stays out (bravo's daemon, told it was removed, does not bring it back).
    std::thread::sleep(Duration::from_secs(2));
    charlie.wait_peers(&["alpha"], Duration::from_secs(1));
    assert_eq!(counter(c2, "cluster_refused_record"), 0);
}

/// Closes the policy port (4748, members' gossip of statements) on `node`'s overlay, both
/// ways: what it learns of the policy and tags, it learns from its coordinator.
fn fence_policy_port(lab: &Lab, node: &Node) {
    let rules = "table inet fence {
  chain out {
    type filter hook output priority 0;
    oifname \"a2a0\" tcp dport 4748 drop
    oifname \"a2a0\" udp dport 4748 drop
  }
  chain in {
    type filter hook input priority 0;
    iifname \"a2a0\" tcp dport 4748 drop
    iifname \"a2a0\" udp dport 4748 drop
  }
}
";
    let path = lab.dir().join(format!("fence-{}.nft", node.name));
    std::fs::write(&path, rules).unwrap();
    node.ns
        .exec(&["nft", "-f", &path.to_string_lossy()])
        .expect_ok();
}

/// The policy version a node enforces (0: none).
fn policy_version(node: &Node) -> u64 {
    let out = node.ctl(&["policy", "show", "--json"]).expect_ok();
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["version"].as_u64().unwrap_or(0)
}

#[track_caller]
fn wait_policy(node: &Node, want: u64) {
    wait_for(
        OVERLAY_TIMEOUT,
        &format!("policy version {want} on {}", node.name),
        || match policy_version(node) {
            v if v == want => Ok(()),
            v => Err(format!("version {v}")),
        },
    );
}

/// Everything allowed: the statement is what is tested, not what it allows.
const OPEN_POLICY: &str = r#"{"grants": [{"src": ["*"], "dst": ["*"], "ports": ["*"]}]}"#;

/// Statements, invites and rotation notices cross the cluster. alpha reaches only c1; bravo,
/// charlie, dave and erin only c2, and bravo, charlie and dave have the policy port closed
/// on their overlay (so members cannot pass them statements directly). alpha's tags and
/// policy reach bravo live and charlie, which registers later, at its registration; an
/// invite alpha makes is redeemed by dave through c2 (a one-time code: erin is then refused,
/// as is a code nobody made); alpha's rotation moves bravo and dave (token holder and
/// invited node, both on c2) to the new network.
#[test]
fn statements_invites_and_rotation_cross_the_cluster() {
    let Some(lab) = Lab::new("clmember") else {
        return;
    };
    require_tools(&[("nats-server", "nats-server"), ("nft", "nftables")]);
    let auth = lab.nats_auth();
    let nats_ns = [lab.add_ns("nats1")];
    let nats = lab.nats_cluster(&nats_ns, &auth, false);
    let coords = coordinators(&lab, &nats, &auth, 2);
    let (c1, c2) = (&coords[0], &coords[1]);
    let token = &c1.token;
    let routers: Vec<_> = ["alpha", "bravo", "charlie", "dave", "erin"]
        .iter()
        .map(|n| lab.router(&format!("rtr-{n}"), Nat::Easy))
        .collect();
    routers[0].cut_off_from(*c2.addr.ip());
    for r in &routers[1..] {
        r.cut_off_from(*c1.addr.ip());
    }
    let alpha = lab.node_behind(&routers[0], "alpha");
    let bravo = lab.node_behind(&routers[1], "bravo");
    let charlie = lab.node_behind(&routers[2], "charlie");
    let dave = lab.node_behind(&routers[3], "dave");
    let erin = lab.node_behind(&routers[4], "erin");
    for n in [&bravo, &charlie, &dave] {
        fence_policy_port(&lab, n);
    }
    alpha.up_ok(token);
    bravo.up_ok(token);
    let regs = |c: &Coordinator| counter(c, "registrations");
    assert_eq!((regs(c1), regs(c2)), (1, 1));
    alpha.wait_peers(&["bravo"], OVERLAY_TIMEOUT);
    bravo.wait_peers(&["alpha"], OVERLAY_TIMEOUT);

    // Statements: tags and a policy from alpha (on c1) reach bravo (on c2) through the
    // cluster, and charlie, registering on c2 afterwards, gets them at its registration.
    alpha.ctl(&["tag", "alpha", "planner"]).expect_ok();
    let policy = lab.dir().join("open.json");
    std::fs::write(&policy, OPEN_POLICY).unwrap();
    alpha
        .ctl(&["policy", "set", &policy.to_string_lossy()])
        .expect_ok();
    wait_policy(&bravo, 1);
    charlie.up_ok(token);
    wait_policy(&charlie, 1);
    let out = charlie
        .ctl(&["whois", &alpha.overlay_ip().to_string(), "--json"])
        .expect_ok();
    assert!(
        out.stdout.contains("planner"),
        "alpha's tag on charlie: {out}"
    );
    assert!(
        counter(c2, "statements") >= 2,
        "c2 passed the statements on"
    );
    report("cluster: alpha's policy and tags (via c1) reached bravo and charlie (on c2)");

    // Invites: alpha's one-time code, redeemed by dave, who reaches only c2.
    let code = alpha
        .ctl(&["invite", "--uses", "1", "--ttl", "10m"])
        .expect_ok()
        .stdout
        .trim()
        .to_string();
    assert!(code.starts_with("a2ai"), "{code}");
    let t0 = Instant::now();
    dave.up_ok(&code);
    report(format!(
        "cluster: dave redeemed alpha's invite through c2 in {:?}",
        t0.elapsed()
    ));
    assert_eq!(counter(c2, "cluster_redeems_asked"), 1);
    assert_eq!(counter(c1, "cluster_redeems_answered"), 1);
    let members = ["alpha", "bravo", "charlie", "dave"];
    for n in [&alpha, &bravo, &charlie, &dave] {
        let others: Vec<&str> = members.iter().copied().filter(|x| *x != n.name).collect();
        n.wait_peers(&others, OVERLAY_TIMEOUT);
    }
    let whois = alpha
        .ctl(&["whois", &dave.overlay_ip().to_string(), "--json"])
        .expect_ok();
    assert!(
        whois.stdout.contains("invite"),
        "dave admitted by invite: {whois}"
    );
    // Used up: erin (on c2) is refused, and told why.
    let out = erin.up(&code).expect_fail();
    assert!(out.stderr.contains("invite"), "{out}");
    assert_eq!(counter(c2, "cluster_redeems_asked"), 2);

    // Rotation: alpha (on c1) rotates; bravo (token) and dave (invited), both on c2, move.
    alpha.ctl(&["token", "rotate"]).expect_ok();
    for n in [&bravo, &dave] {
        wait_for(OVERLAY_TIMEOUT, &format!("{} to move", n.name), || {
            let saved = std::fs::read_to_string(n.state_dir.join("network.json"))
                .map_err(|e| e.to_string())?;
            if saved.contains(token.as_str()) {
                Err("still on the old network".into())
            } else {
                Ok(())
            }
        });
    }
    alpha.wait_peers(&["bravo", "charlie", "dave"], OVERLAY_TIMEOUT);
    bravo.wait_peers(&["alpha", "charlie", "dave"], OVERLAY_TIMEOUT);
    dave.wait_peers(&["alpha", "bravo", "charlie"], OVERLAY_TIMEOUT);
    for n in [&bravo, &dave] {
        assert!(
            alpha.ns.ping(n.overlay_ip(), 3),
            "alpha reaches {} in the new network",
            n.name
        );
    }
    for c in [c1, c2] {
        assert_eq!(counter(c, "cluster_refused_record"), 0);
    }
}

/// A revoked key is refused by every coordinator, also by one that starts after the kick:
/// revocations travel in the start-up snapshot. alpha (reaches only c1) kicks bravo, a token
/// holder that reaches only c2; c2 restarts (a new instance with no members, so no member
/// re-sends the revocation to it); bravo's daemon restarts with its old key and token and
/// tries c2, which refuses it (without the snapshot's revocations c2 admitted it).
#[test]
fn a_kicked_token_holder_is_refused_by_a_coordinator_started_after_the_kick() {
    let Some(lab) = Lab::new("clrevoke") else {
        return;
    };
    require_tools(&[("nats-server", "nats-server"), ("nft", "nftables")]);
    let auth = lab.nats_auth();
    let nats_ns = [lab.add_ns("nats1")];
    let nats = lab.nats_cluster(&nats_ns, &auth, false);
    let coords = coordinators(&lab, &nats, &auth, 2);
    let (c1, c2) = (&coords[0], &coords[1]);
    let token = &c1.token;
    let r_alpha = lab.router("rtr-alpha", Nat::Easy);
    let r_bravo = lab.router("rtr-bravo", Nat::Easy);
    r_alpha.cut_off_from(*c2.addr.ip());
    r_bravo.cut_off_from(*c1.addr.ip());
    let alpha = lab.node_behind(&r_alpha, "alpha");
    let bravo = lab.node_behind(&r_bravo, "bravo");
    alpha.up_ok(token);
    bravo.up_ok(token);
    alpha.wait_peers(&["bravo"], OVERLAY_TIMEOUT);
    bravo.wait_peers(&["alpha"], OVERLAY_TIMEOUT);
    alpha.ctl(&["kick", "bravo"]).expect_ok();
    alpha.wait_peers(&[], OVERLAY_TIMEOUT);
    wait_for(
        OVERLAY_TIMEOUT,
        "c2 to end bravo's connection",
        || match counter(c2, "revocations") {
            0 => Err("not yet".to_string()),
            _ => Ok(()),
        },
    );
    bravo.stop_daemon(libc::SIGTERM);

    // c2 starts again, empty; it asks c1 for what it holds.
    c2.kill();
    c2.restart();
    wait_for(OVERLAY_TIMEOUT, "c2 to hear from c1", || {
        match counter(c2, "cluster_received") {
            0 => Err("nothing yet".to_string()),
            _ => Ok(()),
        }
    });
    assert_eq!(counter(c2, "cluster_refused_record"), 0);
    bravo.start_daemon();
    let _ = bravo.up(token);
    wait_for(OVERLAY_TIMEOUT, "c2 to refuse bravo", || {
        match counter(c2, "registrations_refused") {
            0 => Err(format!(
                "registrations {}, refused none yet",
                counter(c2, "registrations")
            )),
            _ => Ok(()),
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        counter(c2, "registrations"),
        0,
        "a coordinator started after the kick admitted the kicked key"
    );
    alpha.wait_peers(&[], Duration::from_secs(1));
    let st = bravo.status();
    assert!(
        !st.raw["self"]["registered"].as_bool().unwrap_or(false),
        "bravo is registered: {}",
        st.raw
    );
}

/// A size from the environment, or `default`.
fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// NATS messages per second at steady state, per 1 000 nodes: a swarm of simulated nodes
/// (`a2a-swarm`: real Noise control connections, signed registrations, UDP binds, heartbeats)
/// registers with c1 of a two-coordinator cluster; once c2 holds every one of them as a
/// remote member, the cluster messages both coordinators publish (`cluster_published`, and
/// relay data apart) are counted over `A2A_CLUSTER_IDLE` seconds (default 30). Reported, and
/// asserted only in what cannot depend on the machine's load: every node crossed, and at
/// steady state nothing but presence is published (no per-node traffic on NATS).
/// `A2A_CLUSTER_NETWORKS` × `A2A_CLUSTER_NODES_PER_NETWORK` nodes (default 10 × 50).
#[test]
fn nats_messages_at_steady_state_per_thousand_nodes() {
    let Some(lab) = Lab::new("clsteady") else {
        return;
    };
    require_tools(&[("nats-server", "nats-server"), ("nft", "nftables")]);
    let networks = setting("A2A_CLUSTER_NETWORKS", 10);
    let per_network = setting("A2A_CLUSTER_NODES_PER_NETWORK", 50);
    let idle = setting("A2A_CLUSTER_IDLE", 30);
    let nodes = networks * per_network;
    let auth = lab.nats_auth();
    let nats_ns = [lab.add_ns("nats1")];
    let nats = lab.nats_cluster(&nats_ns, &auth, false);
    let coords = coordinators(&lab, &nats, &auth, 2);
    let (c1, c2) = (&coords[0], &coords[1]);
    let ns = lab.add_ns("swarm");
    // Several source addresses (the coordinator's limits count per address).
    let o = ns.wan_ip.expect("a wan address").octets();
    let sources = nodes.div_ceil(400).clamp(8, 50);
    for i in 1..sources {
        let extra = format!("{}.{}.{}.{}/24", o[0], o[1], o[2], 200 + i);
        ns.exec(&["ip", "addr", "add", &extra, "dev", "eth0"])
            .expect_ok();
    }
    let token = a2a_proto::JoinToken::parse(&c1.token).expect("c1's token");
    let key = data_encoding::BASE64.encode(&token.coordinator_key);
    let hold = (idle + 60).to_string();
    let (networks_s, per_network_s) = (networks.to_string(), per_network.to_string());
    let c1_addr = c1.addr.to_string();
    let at_start = counter(c1, "cluster_published") + counter(c2, "cluster_published");
    let swarm = ns.spawn(
        "a2a-swarm",
        &[
            env!("CARGO_BIN_EXE_a2a-swarm"),
            "--coordinator",
            &c1_addr,
            "--coordinator-key",
            &key,
            "--networks",
            &networks_s,
            "--nodes-per-network",
            &per_network_s,
            "--hold",
            &hold,
            "--connect-rate",
            "20",
            "--join-timeout",
            "240",
        ],
    );
    wait_for(
        Duration::from_secs(300),
        "c2 to hold every node of the swarm",
        || {
            let remote = counter(c2, "cluster_remote_members");
            if remote == nodes {
                Ok(())
            } else if !swarm.is_running() {
                panic!("the swarm ended: {}", swarm.stderr_text());
            } else {
                Err(format!("{remote} of {nodes}"))
            }
        },
    );
    // Settled: the last member messages are out.
    std::thread::sleep(Duration::from_secs(3));
    let published = |c: &Coordinator| counter(c, "cluster_published");
    let joining = published(c1) + published(c2) - at_start;
    report(format!(
        "cluster: {nodes} nodes joining c1: {joining} NATS messages published in all ({:.3} per node, `up`s of up to 256 records each, and presence)",
        joining as f64 / nodes as f64
    ));
    let relay = |c: &Coordinator| counter(c, "cluster_relay_messages_out");
    let before = [(published(c1), relay(c1)), (published(c2), relay(c2))];
    let regs_before = counter(c1, "registrations");
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(idle));
    let secs = t0.elapsed().as_secs_f64();
    let after = [(published(c1), relay(c1)), (published(c2), relay(c2))];
    let regs = counter(c1, "registrations") - regs_before;
    assert!(
        swarm.is_running(),
        "the swarm held its nodes: {}",
        swarm.stderr_text()
    );
    assert_eq!(counter(c2, "cluster_remote_members"), nodes);
    let msgs: Vec<u64> = (0..2)
        .map(|i| (after[i].0 - before[i].0) + (after[i].1 - before[i].1))
        .collect();
    let total = (msgs[0] + msgs[1]) as f64 / secs;
    report(format!(
        "cluster steady state: {nodes} nodes on c1 (c2 holds them all as remote members), over \
         {secs:.1} s: c1 published {} NATS messages, c2 {} ({total:.2}/s in all, {:.2}/s per \
         1 000 nodes); {regs} re-registrations meanwhile",
        msgs[0],
        msgs[1],
        total * 1000.0 / nodes as f64
    ));
    // Presence only: one `alive` per 2 s per coordinator, plus what re-registrations made.
    let presence = 2.0 * (secs / 2.0 + 1.0);
    assert!(
        (msgs[0] + msgs[1]) as f64 <= presence + 2.0 * regs as f64,
        "{msgs:?} messages in {secs:.1} s: more than presence at steady state"
    );
}
