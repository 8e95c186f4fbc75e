//! Faults of the coordinator cluster on NATS (README, *A coordinator cluster on NATS*): three
//! coordinators sharing one identity and the full `--endpoint` list, over a cluster of three
//! real `nats-server`s (configuration written by the harness: users with passwords, JetStream
//! off), six nodes behind easy and hard NATs and a firewall that lets only TCP out, routers
//! that restrict some nodes to one coordinator. `kill -9` of each coordinator in turn, of one
//! `nats-server`, and a coordinator cut off from NATS; every coordinator runs under `strace`
//! of its file-system calls from its first start. Needs root, `nats-server`, `strace`, `nft`,
//! `ping` and `ss` (installed by `./run-tests`).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use a2a_netns_tests::{
    coordinator_counter as counter, cut_off_from_nats, report, require_tools, wait_for,
    Coordinator, Lab, Nat, NatsServer, Node, Ns, PingStats, Proc, Router, COORDINATOR_PORT,
    NATS_CUT_TABLE, NATS_PORT, OVERLAY_TIMEOUT,
};

const METRICS_PORT: u16 = 9300;
/// Long enough for hole punching between two easy NATs.
const PATH_TIMEOUT: Duration = Duration::from_secs(25);
/// Long enough for a dead coordinator's presence to expire (7 s) and its members to go.
const EXPIRY_TIMEOUT: Duration = Duration::from_secs(25);
/// What the issue asks: a node whose coordinator died is registered with another within 5 s.
const FAILOVER: Duration = Duration::from_secs(5);
/// What the issue asks: members of different coordinators see each other within 2 s.
const SEEN_WITHIN: Duration = Duration::from_secs(2);

fn tools() {
    require_tools(&[
        ("nats-server", "nats-server"),
        ("strace", "strace"),
        ("nft", "nftables"),
        ("ping", "iputils-ping"),
        ("ss", "iproute2"),
        ("curl", "curl"),
    ]);
}

/// The same network's token with its endpoints rotated so that `first` comes first (the
/// order a node tries them in), as an operator who copied it from that coordinator's
/// configuration would hand it out.
fn token_first(token: &str, first: &Coordinator) -> String {
    let mut t = a2a_proto::JoinToken::parse(token).expect("a valid token");
    let at = t
        .endpoints
        .iter()
        .position(|e| *e == first.addr.to_string())
        .expect("the token names every coordinator");
    t.endpoints.rotate_left(at);
    t.encode()
}

/// The wan addresses `ns` holds an established TCP connection to on `port` (from `ss`).
fn connected_to(ns: &Ns, port: u16) -> Vec<Ipv4Addr> {
    let out = ns.exec(&["ss", "-Htn", "state", "established"]);
    assert!(out.success(), "ss failed: {out}");
    let suffix = format!(":{port}");
    out.stdout
        .lines()
        .filter_map(|l| {
            let peer = l.split_whitespace().nth(3)?;
            peer.strip_suffix(&suffix)?.parse().ok()
        })
        .collect()
}

/// Which coordinator (index into `coords`) `n` holds its control connection with, if any.
fn coordinator_of(n: &Node, coords: &[Coordinator]) -> Option<usize> {
    let peers = connected_to(&n.ns, COORDINATOR_PORT);
    coords.iter().position(|c| peers.contains(c.addr.ip()))
}

/// Whether the node says a coordinator has it registered.
fn registered(n: &Node) -> bool {
    n.try_status()
        .map(|s| s.raw["self"]["registered"].as_bool() == Some(true))
        .unwrap_or(false)
}

/// The names of `all` but `me`.
fn others<'a>(all: &[&'a str], me: &str) -> Vec<&'a str> {
    all.iter().copied().filter(|x| *x != me).collect()
}

/// Waits until every node of `nodes` lists exactly the others of `names` (those of `nodes`
/// included); returns how long that took from `since`.
#[track_caller]
fn wait_all_list(nodes: &[&Node], names: &[&str], since: Instant, timeout: Duration) -> Duration {
    for n in nodes {
        n.wait_listed(&others(names, &n.name), timeout);
    }
    since.elapsed()
}

/// A 10/s ping of `count` from `from` to `to`'s overlay address, in the background.
fn ping10(from: &Node, to: &Node, count: u32) -> Proc {
    let target = to.overlay_ip().to_string();
    let count = count.to_string();
    from.ns.spawn(
        "ping10",
        &["ping", "-n", "-i", "0.1", "-c", &count, "-W", "2", &target],
    )
}

/// Waits for a [`ping10`] to end; its statistics.
fn ping_result(ping: &Proc) -> (PingStats, String) {
    let out = wait_for(Duration::from_secs(60), "the 10/s ping to end", || {
        ping.exit_status()
            .map(|_| ping.stdout_text())
            .ok_or_else(|| "running".to_string())
    });
    (PingStats::parse(&out).expect("ping output"), out)
}

/// A router of `nat` kind whose LAN reaches only the coordinators `reach` (indices): the
/// others are cut off (TCP answered with a reset, the rest dropped).
fn router(lab: &Lab, name: &str, nat: Nat, coords: &[Coordinator], reach: &[usize]) -> Router {
    let r = lab.router(name, nat);
    for (i, c) in coords.iter().enumerate() {
        if !reach.contains(&i) {
            r.cut_off_from(*c.addr.ip());
        }
    }
    r
}

/// No cluster message was refused as forged, malformed, flooding or a bad record.
#[track_caller]
fn assert_nothing_refused(coords: &[Coordinator]) {
    for (i, c) in coords.iter().enumerate() {
        for refused in ["seal", "malformed", "flood", "record"] {
            assert_eq!(
                counter(c, &format!("cluster_refused_{refused}")),
                0,
                "c{} refused cluster messages ({refused})",
                i + 1
            );
        }
    }
}

/// Stops every coordinator and asserts from their traces (every run since their first start)
/// that none opened a file for writing or changed one, but for the first one creating the
/// cluster's key; and that the traces followed the coordinators (their binds of the
/// coordinator port, `runs` runs each at least).
#[track_caller]
fn assert_coordinators_wrote_nothing(coords: &[Coordinator], runs: &[usize]) {
    for (i, c) in coords.iter().enumerate() {
        c.kill();
        let writes = c.file_writes();
        assert!(
            writes.is_empty(),
            "coordinator c{} wrote to files:\n{}",
            i + 1,
            writes.join("\n")
        );
        let trace = std::fs::read_to_string(c.trace_path()).unwrap();
        let binds = trace
            .lines()
            .filter(|l| l.contains("bind(") && l.contains(&format!("htons({COORDINATOR_PORT})")))
            .count();
        // A run binds the port for TCP and for UDP.
        assert!(
            binds >= 2 * runs[i],
            "the trace of c{} shows {binds} binds of port {COORDINATOR_PORT} for {} runs: \
             strace did not follow the coordinator",
            i + 1,
            runs[i]
        );
        let created = trace
            .lines()
            .filter(|l| l.contains("coordinator.key") && l.contains("O_CREAT"))
            .count();
        assert_eq!(
            created,
            usize::from(i == 0),
            "only the first coordinator creates the key (the others were given a copy)"
        );
    }
    report(format!(
        "cluster faults: strace of {} coordinators in --nats mode ({} runs): no file opened for \
         writing but the first one's new key",
        coords.len(),
        runs.iter().sum::<usize>()
    ));
}

/// Three coordinators; six nodes: easy-1, easy-2 (easy NATs) and fw-3 (a firewall that lets
/// only TCP out) reach every coordinator, and are given the token with c1, c2 and c3 first
/// respectively; hard-1, hard-2, hard-3 (hard NATs) each reach only c1, c2, c3. Each
/// coordinator is killed in turn (`kill -9`) and restarted before the next: a 10/s ping
/// between easy-1 and easy-2 (direct) loses nothing; the dead coordinator's nodes that reach
/// another register there within 5 s (measured per node); a new node joins during the outage
/// and everyone sees it; after the restart the node that reaches only the restarted
/// coordinator and everyone else list each other again. The coordinators open no file for
/// writing (strace, over all their runs).
#[test]
fn each_coordinator_killed_in_turn_loses_no_ping_and_its_nodes_fail_over() {
    let Some(lab) = Lab::new("clkill") else {
        return;
    };
    tools();
    let auth = lab.nats_auth();
    let nats_ns: Vec<_> = (1..=3).map(|i| lab.add_ns(&format!("nats{i}"))).collect();
    let nats = lab.nats_cluster(&nats_ns, &auth, false);
    let coords = lab.coordinators_on_nats(&nats, &auth, 3, METRICS_PORT, true);
    let tokens: Vec<String> = coords
        .iter()
        .map(|c| token_first(&coords[0].token, c))
        .collect();

    let r_e1 = router(&lab, "rtr-easy1", Nat::Easy, &coords, &[0, 1, 2]);
    let r_e2 = router(&lab, "rtr-easy2", Nat::Easy, &coords, &[0, 1, 2]);
    let r_fw = router(&lab, "rtr-fw3", Nat::NoUdp, &coords, &[0, 1, 2]);
    let r_h: Vec<Router> = (0..3)
        .map(|i| {
            router(
                &lab,
                &format!("rtr-hard{}", i + 1),
                Nat::Hard,
                &coords,
                &[i],
            )
        })
        .collect();
    let e1 = lab.node_behind(&r_e1, "easy-1");
    let e2 = lab.node_behind(&r_e2, "easy-2");
    let fw = lab.node_behind(&r_fw, "fw-3");
    let hard: Vec<Node> = (0..3)
        .map(|i| lab.node_behind(&r_h[i], &format!("hard-{}", i + 1)))
        .collect();

    // A join on c1 seen by a node of c3.
    hard[2].up_ok(&tokens[0]);
    let t0 = Instant::now();
    hard[0].up_ok(&tokens[0]);
    let up_took = t0.elapsed();
    let returned = Instant::now();
    hard[2].wait_listed(&["hard-1"], OVERLAY_TIMEOUT);
    let seen = returned.elapsed();
    report(format!(
        "cluster faults: hard-1's join on c1 (`up` took {up_took:?}) listed on hard-3 (on c3) \
         {:.0} ms after its `up` returned",
        seen.as_secs_f64() * 1000.0
    ));
    assert!(
        seen <= SEEN_WITHIN,
        "a join on c1 took {seen:?} to reach a node of c3 (the issue asks for 2 s)"
    );
    e1.up_ok(&tokens[0]);
    e2.up_ok(&tokens[1]);
    fw.up_ok(&tokens[2]);
    hard[1].up_ok(&tokens[0]);
    let mut names: Vec<String> = ["easy-1", "easy-2", "fw-3", "hard-1", "hard-2", "hard-3"]
        .map(String::from)
        .to_vec();
    let mut nodes: Vec<&Node> = vec![&e1, &e2, &fw, &hard[0], &hard[1], &hard[2]];
    {
        let n: Vec<&str> = names.iter().map(String::as_str).collect();
        wait_all_list(&nodes, &n, Instant::now(), OVERLAY_TIMEOUT);
    }
    for (n, want) in [
        (&e1, 0),
        (&e2, 1),
        (&fw, 2),
        (&hard[0], 0),
        (&hard[1], 1),
        (&hard[2], 2),
    ] {
        assert_eq!(
            coordinator_of(n, &coords),
            Some(want),
            "{} registers with the first coordinator of its token it reaches",
            n.name
        );
    }
    e1.wait_path("easy-2", "direct", PATH_TIMEOUT);
    e2.wait_path("easy-1", "direct", PATH_TIMEOUT);

    // The nodes that join during the outages (their daemons started, not joined yet).
    let lates: Vec<Node> = (1..=3).map(|i| lab.node(&format!("late-{i}"))).collect();
    let mut failovers: Vec<String> = Vec::new();
    for k in 0..3 {
        let victim = &coords[k];
        let cname = format!("c{}", k + 1);
        // The nodes on it that reach another coordinator.
        let movable: Vec<&Node> = [&e1, &e2, &fw]
            .into_iter()
            .chain(&lates[..k])
            .filter(|n| coordinator_of(n, &coords) == Some(k))
            .collect();
        assert!(
            !movable.is_empty(),
            "no node that can move is on {cname}: the test cannot check its failover"
        );
        let ping = ping10(&e1, &e2, 100);
        std::thread::sleep(Duration::from_secs(2));
        let killed = Instant::now();
        victim.kill();
        // Each node moves to another coordinator and is registered there.
        let mut moved: Vec<Option<(Duration, usize)>> = vec![None; movable.len()];
        wait_for(
            Duration::from_secs(20),
            &format!("{cname}'s nodes to register with another coordinator"),
            || {
                for (i, n) in movable.iter().enumerate() {
                    if moved[i].is_none() {
                        if let Some(to) = coordinator_of(n, &coords).filter(|&c| c != k) {
                            if registered(n) {
                                moved[i] = Some((killed.elapsed(), to));
                            }
                        }
                    }
                }
                if moved.iter().all(Option::is_some) {
                    Ok(())
                } else {
                    Err(format!("moved so far: {moved:?}"))
                }
            },
        );
        let line: Vec<String> = movable
            .iter()
            .zip(&moved)
            .map(|(n, m)| {
                let (took, to) = m.unwrap();
                format!("{} to c{} in {} ms", n.name, to + 1, took.as_millis())
            })
            .collect();
        report(format!(
            "cluster faults: kill -9 of {cname}: {}",
            line.join(", ")
        ));
        failovers.push(format!("{cname}: {}", line.join(", ")));
        for (n, m) in movable.iter().zip(&moved) {
            let (took, _) = m.unwrap();
            assert!(
                took <= FAILOVER,
                "{} took {took:?} to register with another coordinator after kill -9 of {cname} \
                 (the issue asks for 5 s)",
                n.name
            );
        }
        // A new node joins during the outage, its token naming the dead coordinator first;
        // everyone lists it (and, once the dead coordinator's presence expired, no longer the
        // node that reaches only that one).
        let late = &lates[k];
        late.up_ok(&tokens[k]);
        assert_ne!(coordinator_of(late, &coords), Some(k));
        names.push(late.name.clone());
        let stranded = format!("hard-{}", k + 1);
        let reachable: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| *n != stranded)
            .collect();
        let mut up_nodes: Vec<&Node> = nodes
            .iter()
            .copied()
            .filter(|n| n.name != stranded)
            .collect();
        up_nodes.push(late);
        wait_all_list(&up_nodes, &reachable, Instant::now(), EXPIRY_TIMEOUT);
        let (stats, out) = ping_result(&ping);
        report(format!(
            "cluster faults: 10/s ping easy-1 → easy-2 across kill -9 of {cname}: {} of {} answered",
            stats.rtts.len(),
            stats.sent
        ));
        assert_eq!(stats.sent, 100, "{out}");
        assert_eq!(
            stats.rtts.len(),
            100,
            "pings lost across kill -9 of {cname}:\n{out}"
        );
        // It comes back (a new instance, which asks the others for what they hold): the node
        // that reaches only it registers again, and it and everyone list each other.
        let restarted = Instant::now();
        victim.restart();
        nodes.push(late);
        let all: Vec<&str> = names.iter().map(String::as_str).collect();
        let synced = wait_all_list(&nodes, &all, restarted, OVERLAY_TIMEOUT);
        assert_eq!(coordinator_of(&hard[k], &coords), Some(k));
        report(format!(
            "cluster faults: after {cname}'s restart, {stranded} (reaches only {cname}) and \
             everyone list each other within {synced:?}"
        ));
    }
    report(format!(
        "cluster faults: failover per killed coordinator: {}",
        failovers.join("; ")
    ));
    assert_nothing_refused(&coords);
    assert_coordinators_wrote_nothing(&coords, &[2, 2, 2]);
    drop(nats);
}

/// The NATS servers `ns` is connected to (their index in `nats`).
fn nats_of(ns: &Ns, nats: &[NatsServer]) -> Vec<usize> {
    let peers = connected_to(ns, NATS_PORT);
    nats.iter()
        .enumerate()
        .filter(|(_, s)| peers.contains(&s.ns.wan_ip.unwrap()))
        .map(|(i, _)| i)
        .collect()
}

/// Three coordinators, six nodes each restricted to one coordinator: easy-1 and hard-1 reach
/// only c1, easy-2 and hard-2 only c2, easy-3 and hard-3 only c3. (1) `kill -9` of the
/// `nats-server` the most coordinators are connected to: a 10/s ping between easy-1 and
/// easy-2 (direct) loses nothing, a node joining on c1 meanwhile is listed by everyone within
/// 2 s, hard-1 still reaches hard-2 over the relay across c1 and c2, and every coordinator is
/// connected to a living server again. (2) c3 cut off from every NATS server (nft drop): its
/// own nodes keep pinging each other, a node joins on it and sees them; when the cut ends,
/// the members on both sides list each other again (measured). The coordinators open no file
/// for writing (strace).
#[test]
fn a_nats_server_killed_and_a_coordinator_cut_off_from_nats() {
    let Some(lab) = Lab::new("clnats") else {
        return;
    };
    tools();
    let auth = lab.nats_auth();
    let nats_ns: Vec<_> = (1..=3).map(|i| lab.add_ns(&format!("nats{i}"))).collect();
    let nats = lab.nats_cluster(&nats_ns, &auth, false);
    let coords = lab.coordinators_on_nats(&nats, &auth, 3, METRICS_PORT, true);
    let token = &coords[0].token;
    let mut routers = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..3 {
        for (kind, nat) in [("easy", Nat::Easy), ("hard", Nat::Hard)] {
            let name = format!("{kind}-{}", i + 1);
            let r = router(&lab, &format!("rtr-{kind}{}", i + 1), nat, &coords, &[i]);
            nodes.push(lab.node_behind(&r, &name));
            routers.push(r);
        }
    }
    let [e1, h1, e2, _h2, e3, h3] = &nodes[..] else {
        unreachable!()
    };
    for n in &nodes {
        n.up_ok(token);
    }
    let mut names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let mut all_nodes: Vec<&Node> = nodes.iter().collect();
    {
        let n: Vec<&str> = names.iter().map(String::as_str).collect();
        wait_all_list(&all_nodes, &n, Instant::now(), OVERLAY_TIMEOUT);
    }
    e1.wait_path("easy-2", "direct", PATH_TIMEOUT);
    e2.wait_path("easy-1", "direct", PATH_TIMEOUT);
    let relay_ping = |from: &Node, to: &str| {
        wait_for(
            OVERLAY_TIMEOUT,
            &format!("{} to reach {to}", from.name),
            || {
                let p = from.ping_peer(to, 3);
                if p.iter().any(|(_, rtt)| rtt.is_some()) {
                    Ok(p)
                } else {
                    Err(format!("{p:?}"))
                }
            },
        )
    };
    let p = relay_ping(h1, "hard-2");
    assert!(p.iter().all(|(path, _)| path == "relay"), "{p:?}");

    // (1) kill -9 of the nats-server the most coordinators are connected to.
    let conns: Vec<Vec<usize>> = coords.iter().map(|c| nats_of(&c.ns, &nats)).collect();
    for (i, c) in conns.iter().enumerate() {
        assert_eq!(c.len(), 1, "c{} holds one NATS connection: {c:?}", i + 1);
    }
    let victim = (0..nats.len())
        .max_by_key(|s| conns.iter().filter(|c| c[0] == *s).count())
        .unwrap();
    let hit: Vec<String> = (0..3)
        .filter(|&i| conns[i][0] == victim)
        .map(|i| format!("c{}", i + 1))
        .collect();
    let ping = ping10(e1, e2, 100);
    std::thread::sleep(Duration::from_secs(2));
    let relayed_before = counter(&coords[0], "cluster_relayed_out");
    let killed = Instant::now();
    nats[victim].kill();
    // A node joins on c1 meanwhile: everyone lists it within 2 s.
    let r_join = router(&lab, "rtr-join", Nat::Easy, &coords, &[0]);
    let join = lab.node_behind(&r_join, "join-1");
    join.up_ok(token);
    let returned = Instant::now();
    let mut seen = Vec::new();
    for n in &nodes {
        n.wait_listed(
            &others(
                &names
                    .iter()
                    .map(String::as_str)
                    .chain(["join-1"])
                    .collect::<Vec<_>>(),
                &n.name,
            ),
            OVERLAY_TIMEOUT,
        );
        seen.push(returned.elapsed());
    }
    let seen_all = returned.elapsed();
    report(format!(
        "cluster faults: kill -9 of nats-server {} ({} connected to it): join-1's join on c1 \
         {} ms after the kill, listed by all six nodes {} ms after its `up` returned",
        victim + 1,
        hit.join(", "),
        (returned - killed).as_millis(),
        seen_all.as_millis()
    ));
    assert!(
        seen_all <= SEEN_WITHIN,
        "a join during a NATS server's death took {seen_all:?} to be seen everywhere: {seen:?}"
    );
    names.push("join-1".into());
    all_nodes.push(&join);
    // Every coordinator is connected to a living server again.
    let reconnected = wait_for(
        Duration::from_secs(20),
        "every coordinator to be connected to a living NATS server",
        || {
            let now: Vec<Vec<usize>> = coords.iter().map(|c| nats_of(&c.ns, &nats)).collect();
            if now.iter().all(|c| c.len() == 1 && c[0] != victim) {
                Ok(killed.elapsed())
            } else {
                Err(format!("connections: {now:?}"))
            }
        },
    );
    report(format!(
        "cluster faults: every coordinator connected to a living NATS server {} ms after the kill",
        reconnected.as_millis()
    ));
    // Relaying across coordinators keeps working.
    let p = relay_ping(h1, "hard-2");
    assert!(p.iter().all(|(path, _)| path == "relay"), "{p:?}");
    assert!(counter(&coords[0], "cluster_relayed_out") > relayed_before);
    let (stats, out) = ping_result(&ping);
    report(format!(
        "cluster faults: 10/s ping easy-1 → easy-2 across kill -9 of a nats-server: {} of {} answered",
        stats.rtts.len(),
        stats.sent
    ));
    assert_eq!(stats.sent, 100, "{out}");
    assert_eq!(stats.rtts.len(), 100, "pings lost:\n{out}");

    // (2) c3 cut off from every NATS server.
    let c3 = &coords[2];
    let ping = ping10(e3, h3, 250);
    std::thread::sleep(Duration::from_secs(1));
    let cut = Instant::now();
    cut_off_from_nats(&c3.ns, &nats);
    // Each side drops the other's members once its presence expired.
    let (side3, side12): (Vec<&Node>, Vec<&Node>) = all_nodes
        .iter()
        .copied()
        .partition(|n| n.name.ends_with("-3"));
    let names3: Vec<&str> = side3.iter().map(|n| n.name.as_str()).collect();
    let names12: Vec<&str> = side12.iter().map(|n| n.name.as_str()).collect();
    wait_all_list(&side3, &names3, cut, EXPIRY_TIMEOUT);
    let split = wait_all_list(&side12, &names12, cut, EXPIRY_TIMEOUT);
    report(format!(
        "cluster faults: c3 cut off from NATS: each side dropped the other's members within {split:?}"
    ));
    // A node joins on c3 and sees c3's members (and they it).
    let r_late = router(&lab, "rtr-late3", Nat::Easy, &coords, &[2]);
    let late = lab.node_behind(&r_late, "late-3");
    late.up_ok(token);
    assert_eq!(coordinator_of(&late, &coords), Some(2));
    let mut names3 = names3.clone();
    names3.push("late-3");
    let mut side3 = side3.clone();
    side3.push(&late);
    wait_all_list(&side3, &names3, Instant::now(), OVERLAY_TIMEOUT);
    // Its own nodes kept pinging each other.
    assert!(e3.ns.ping(h3.overlay_ip(), 3), "easy-3 reaches hard-3");
    // Back: both sides merge.
    c3.ns
        .exec(&["nft", "delete", "table", "inet", NATS_CUT_TABLE])
        .expect_ok();
    let back = Instant::now();
    names.push("late-3".into());
    all_nodes.push(&late);
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    let merged = wait_all_list(&all_nodes, &all, back, Duration::from_secs(30));
    report(format!(
        "cluster faults: c3 back on NATS after {:?} cut off: members on both sides list each other \
         within {merged:?}",
        back - cut
    ));
    let (stats, out) = ping_result(&ping);
    report(format!(
        "cluster faults: 10/s ping easy-3 → hard-3 (both on c3) across its cut-off: {} of {} answered",
        stats.rtts.len(),
        stats.sent
    ));
    assert_eq!(
        stats.rtts.len(),
        stats.sent as usize,
        "c3's nodes lost pings while c3 was cut off from NATS:\n{out}"
    );
    let p = relay_ping(h3, "hard-1");
    assert!(p.iter().all(|(path, _)| path == "relay"), "{p:?}");
    assert_nothing_refused(&coords);
    for (i, c) in coords.iter().enumerate() {
        report(format!(
            "cluster faults: c{}: syncs asked {}, coordinators expired {}, refused as replays {}, \
             as stale {}",
            i + 1,
            counter(c, "cluster_syncs_asked"),
            counter(c, "cluster_coordinators_expired"),
            counter(c, "cluster_refused_replay"),
            counter(c, "cluster_refused_stale"),
        ));
    }
    assert_coordinators_wrote_nothing(&coords, &[1, 1, 1]);
    drop(routers);
}
