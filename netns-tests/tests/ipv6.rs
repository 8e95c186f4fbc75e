//! The IPv6 underlay: a dual-stack lab (the wan and the routers' LANs carry IPv6, routed, no
//! NAT66, behind the routers' stateful firewalls), nodes that punch over IPv6 when IPv4 NATs
//! are hard, and IPv6-only nodes. Needs root; see the crate documentation of `a2a_netns_tests`.

use std::time::{Duration, Instant};

use a2a_netns_tests::{
    report, require_tools, wait_for, CoordOpts, Lab, Nat, Node, Ns, NODE_PORT, OVERLAY_TIMEOUT,
};

/// One ICMPv6 echo from `from` to `to` (one second to answer).
fn ping6(from: &Ns, to: std::net::Ipv6Addr) -> bool {
    from.exec(&["ping", "-6", "-n", "-c", "1", "-W", "1", &to.to_string()])
        .success()
}

/// The lab itself: IPv6 is routed between the wan and the LANs both ways for what a LAN host
/// started, and unsolicited inbound is dropped at the router, as home routers do; IPv4 is
/// unchanged (masqueraded).
#[test]
fn dual_stack_lab_routes_ipv6_and_drops_unsolicited_inbound() {
    let Some(lab) = Lab::new_dual_stack("ipv6_lab") else {
        return;
    };
    // A wan host added before the routers and one after: both must get routes to the LANs.
    let early = lab.add_ns("early");
    let ra = lab.router("rtr-a", Nat::Hard);
    let rb = lab.router("rtr-b", Nat::Easy);
    let late = lab.add_ns("late");
    let a = lab.add_ns_behind(&ra, "a");
    let b = lab.add_ns_behind(&rb, "b");
    let v6only = lab.add_ns_v6_only("v6only");
    let ip6 = |n: &Ns| n.wan_ip6.expect("an IPv6 address");
    assert!(v6only.wan_ip.is_none());
    for n in [&early, &late, &a, &b, &v6only] {
        let addr = ip6(n).to_string();
        assert!(addr.starts_with("2001:db8:"), "{n:?} has {addr}");
    }

    // Outbound from a LAN to the wan works (and its answer comes back through the firewall).
    for wan in [&early, &late, &v6only] {
        assert!(ping6(&a, ip6(wan)), "a cannot reach {wan:?} over IPv6");
        assert!(ping6(&b, ip6(wan)), "b cannot reach {wan:?} over IPv6");
    }
    // Unsolicited inbound from the wan, or from another LAN, is dropped at the router.
    for from in [&early, &late, &v6only, &b] {
        assert!(
            !ping6(from, ip6(&a)),
            "{from:?} reached a's LAN unsolicited"
        );
    }
    assert!(!ping6(&a, ip6(&b)), "a reached b's LAN unsolicited");
    // The wan hosts reach each other.
    assert!(ping6(&early, ip6(&late)));
    assert!(ping6(&v6only, ip6(&early)));

    // IPv4 as before: the LAN reaches the wan, the IPv6-only host has no IPv4.
    let early4 = early.wan_ip.unwrap().to_string();
    a.exec(&["ping", "-4", "-n", "-c", "1", "-W", "1", &early4])
        .expect_ok();
    assert!(!v6only
        .exec(&["ping", "-4", "-n", "-c", "1", "-W", "1", &early4])
        .success());
}

/// Two nodes behind hard IPv4 NATs (a new mapping per destination: a pair of those relays over
/// IPv4) that both have IPv6 get a direct IPv6 path: no NAT66, and each one's probes open its own
/// router's stateful firewall for the other's. Within 10 s of both having joined.
#[test]
fn hard_nat_pair_with_ipv6_goes_direct_over_ipv6() {
    let Some(lab) = Lab::new_dual_stack("ipv6_hard_pair") else {
        return;
    };
    require_tools(&[("nft", "nftables"), ("sysctl", "procps")]);
    let coord = lab.coordinator(CoordOpts::default());
    let ra = lab.router("rtr-a", Nat::Hard);
    let rb = lab.router("rtr-b", Nat::Hard);
    let a = lab.node_behind(&ra, "hard-a");
    let b = lab.node_behind(&rb, "hard-b");
    a.serve_http();
    b.serve_http();
    a.up_ok(&coord.token);
    b.up_ok(&coord.token);
    let joined = Instant::now();
    let want = |n: &Node| format!("[{}]:{NODE_PORT}", n.ns.wan_ip6.unwrap());
    for (x, y) in [(&a, &b), (&b, &a)] {
        let expect = want(y);
        wait_for(
            Duration::from_secs(10).saturating_sub(joined.elapsed()),
            &format!("{}'s path to {} to be direct at {expect}", x.name, y.name),
            || match x.path_to(&y.name)? {
                (p, Some(e)) if p == "direct" && e == expect => Ok(()),
                (p, e) => Err(format!("path is {p} via {e:?}")),
            },
        );
    }
    report(format!(
        "ipv6_hard_pair: both directions direct over IPv6 {} ms after the second join",
        joined.elapsed().as_millis()
    ));
    a.wait_http(&b, OVERLAY_TIMEOUT);
    b.wait_http(&a, OVERLAY_TIMEOUT);
    // Each publishes its global IPv6 address, never its link-local one.
    for x in [&a, &b] {
        let nc = x.netcheck();
        assert_eq!(nc["ipv6"], "no endpoint", "an IPv4-only token: {nc}");
        let local: Vec<String> = nc["local"]
            .as_array()
            .unwrap_or_else(|| panic!("netcheck has no local list: {nc}"))
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect();
        let own = x.ns.wan_ip6.unwrap().to_string();
        assert!(local.contains(&own), "{} publishes {local:?}", x.name);
        assert!(
            !local.iter().any(|c| c.starts_with("fe80")),
            "{} publishes a link-local address: {local:?}",
            x.name
        );
    }
}

/// A coordinator listening dual-stack (`--listen [::]:PORT`, one port for both families, TCP
/// and UDP) with a token carrying an IPv4 and an IPv6 endpoint. An IPv6-only node joins with
/// it, goes direct over IPv6 to a dual-stack node and reaches an IPv4-only node through the
/// relay (the coordinator relaying between an IPv6 and an IPv4 node); HTTP works every way.
#[test]
fn ipv6_only_node_goes_direct_over_ipv6_and_relays_to_ipv4_only() {
    let Some(lab) = Lab::new_dual_stack("ipv6_only") else {
        return;
    };
    let coord = lab.coordinator(CoordOpts {
        dual_stack: true,
        ..CoordOpts::default()
    });
    let dual = lab.node("dual");
    let v4only = lab.node_v4_only("v4only");
    let v6only = lab.node_v6_only("v6only");
    let nodes = [&dual, &v4only, &v6only];
    for n in nodes {
        n.serve_http();
        n.up_ok(&coord.token);
    }
    for a in nodes {
        for b in nodes {
            if a.name != b.name {
                a.wait_http(b, OVERLAY_TIMEOUT);
            }
        }
    }
    let at6 = |n: &Node| format!("[{}]:{NODE_PORT}", n.ns.wan_ip6.unwrap());
    let at4 = |n: &Node| format!("{}:{NODE_PORT}", n.wan_ip());
    let direct_at = |x: &Node, y: &Node, want: String| {
        wait_for(
            Duration::from_secs(10),
            &format!("{}'s path to {} to be direct at {want}", x.name, y.name),
            || match x.path_to(&y.name)? {
                (p, Some(e)) if p == "direct" && e == want => Ok(()),
                (p, e) => Err(format!("path is {p} via {e:?}")),
            },
        );
    };
    direct_at(&v6only, &dual, at6(&dual));
    direct_at(&dual, &v6only, at6(&v6only));
    direct_at(&v4only, &dual, at4(&dual));
    direct_at(&dual, &v4only, at4(&v4only));
    // Nothing direct between the families: relayed, by a coordinator seen over IPv6 by one and
    // over IPv4 by the other.
    std::thread::sleep(Duration::from_secs(6));
    let coord6 = format!("[{}]:{}", coord.ns.wan_ip6.unwrap(), coord.addr.port());
    for (x, y, via) in [
        (&v6only, &v4only, coord6.clone()),
        (&v4only, &v6only, coord.addr.to_string()),
    ] {
        let (path, ep) = x.path_to(&y.name).unwrap();
        assert_eq!(
            (path.as_str(), ep.as_deref()),
            ("relay", Some(via.as_str())),
            "{} -> {}",
            x.name,
            y.name
        );
    }
    v6only.fetch_from(&v4only, 5).unwrap();
    v4only.fetch_from(&v6only, 5).unwrap();
    // Bulk TCP both ways through the relay: full-size WireGuard packets in relay frames are 6
    // bytes too many for a 1500-byte IPv6 path and are fragmented by the sender (a GSO send of
    // them gets EMSGSIZE and goes one by one); neither the node nor the coordinator turns UDP
    // GSO off for it.
    require_tools(&[("iperf3", "iperf3")]);
    for (from, to) in [(&v6only, &v4only), (&v4only, &v6only)] {
        let server = to.ns.iperf3_server();
        let mbit = from
            .ns
            .iperf3_client(to.overlay_ip(), 2)
            .unwrap_or_else(|e| panic!("iperf3 {} -> {} (relayed): {e}", from.name, to.name));
        server.kill();
        report(format!(
            "ipv6_only: iperf3 TCP 2 s {} -> {} relayed: {mbit:.0} Mbit/s",
            from.name, to.name
        ));
    }
    let node_log = v6only.daemon().stderr_text();
    assert!(
        !node_log.contains("GSO send failed"),
        "the IPv6-only node turned GSO off:\n{node_log}"
    );
    let coord_log = coord.proc().stderr_text();
    assert!(
        !coord_log.contains("GSO send refused"),
        "the coordinator turned GSO off"
    );
    // Over UDP, not the control connection's fallback.
    let nc = v6only.netcheck();
    assert_eq!(nc["relay"], "udp", "{nc}");
    assert_eq!(nc["coordinator"], coord6.as_str(), "{nc}");
    // netcheck's IPv6 reachability: asked over IPv6 whichever family the connection took.
    for n in [&v6only, &dual] {
        let nc = n.netcheck();
        assert_eq!(nc["ipv6"], "reachable", "{}: {nc}", n.name);
        assert_eq!(nc["reflexive6"], at6(n).as_str(), "{}: {nc}", n.name);
    }
    let nc = v4only.netcheck();
    assert_eq!(nc["ipv6"], "no address", "{nc}");
    assert!(nc["reflexive6"].is_null(), "{nc}");
}

/// The median RTT of `count` `a2actl ping` probes from `a` to `b`, each of which must have
/// gone direct over `family` (`IPv4` or `IPv6`, as the ping line says).
#[track_caller]
fn median_probe_rtt(a: &Node, b: &Node, family: &str, count: u32) -> f64 {
    let out = a
        .ctl(&["ping", "-c", &count.to_string(), &b.name])
        .expect_ok();
    let mut rtts: Vec<f64> = Vec::new();
    for line in out.stdout.lines() {
        assert!(
            line.contains(" via direct ") && line.contains(&format!(" over {family} in ")),
            "{} -> {}: a probe not direct over {family}: {line:?}",
            a.name,
            b.name
        );
        let rtt: Option<f64> = line
            .strip_suffix(" ms")
            .and_then(|r| r.rsplit(' ').next())
            .and_then(|v| v.parse().ok());
        rtts.extend(rtt);
    }
    assert!(!rtts.is_empty(), "no probe answered: {out}");
    rtts.sort_by(f64::total_cmp);
    rtts[rtts.len() / 2]
}

/// ICMP over the overlay (20 echoes, 50 ms apart): ping's summary line.
fn icmp_summary(a: &Node, b: &Node) -> String {
    let out = a.ns.exec(&[
        "ping",
        "-n",
        "-q",
        "-c",
        "20",
        "-i",
        "0.05",
        &b.overlay_ip().to_string(),
    ]);
    out.stdout.lines().last().unwrap_or_default().to_string()
}

/// Two open dual-stack hosts: both families answer at the same RTT, so the path is IPv6 (and
/// `a2actl ping` says so per probe); with UDP over IPv6 blocked the pair finds the IPv4 path.
/// RTT and iperf3 over each, between the same two hosts (printed; no timing asserted).
#[test]
fn dual_stack_pair_prefers_ipv6_and_falls_back_to_ipv4() {
    let Some(lab) = Lab::new_dual_stack("ipv6_prefer") else {
        return;
    };
    require_tools(&[("iperf3", "iperf3"), ("nft", "nftables")]);
    let coord = lab.coordinator(CoordOpts {
        dual_stack: true,
        ..CoordOpts::default()
    });
    let a = lab.node("alpha");
    let b = lab.node("bravo");
    for n in [&a, &b] {
        n.serve_http();
        n.up_ok(&coord.token);
    }
    let at6 = |n: &Node| format!("[{}]:{NODE_PORT}", n.ns.wan_ip6.unwrap());
    let at4 = |n: &Node| format!("{}:{NODE_PORT}", n.wan_ip());
    let direct_at = |x: &Node, y: &Node, want: String, timeout: Duration| {
        wait_for(
            timeout,
            &format!("{}'s path to {} to be direct at {want}", x.name, y.name),
            || match x.path_to(&y.name)? {
                (p, Some(e)) if p == "direct" && e == want => Ok(()),
                (p, e) => Err(format!("path is {p} via {e:?}")),
            },
        );
    };
    direct_at(&a, &b, at6(&b), Duration::from_secs(10));
    direct_at(&b, &a, at6(&a), Duration::from_secs(10));
    a.wait_http(&b, OVERLAY_TIMEOUT);
    let measure = |family: &str| {
        let probe = median_probe_rtt(&a, &b, family, 5);
        let icmp = icmp_summary(&a, &b);
        let server = b.ns.iperf3_server();
        let mbit =
            a.ns.iperf3_client(b.overlay_ip(), 3)
                .unwrap_or_else(|e| panic!("iperf3 over {family}: {e}"));
        server.kill();
        report(format!(
            "ipv6_prefer: direct over {family}: a2actl ping median {probe:.3} ms; ICMP {icmp}; \
             iperf3 TCP 3 s {mbit:.0} Mbit/s"
        ));
    };
    measure("IPv6");

    // UDP over IPv6 to bravo dropped: the pair falls back and finds IPv4.
    let rules = format!(
        "table inet a2a_v6block {{\n chain input {{\n  type filter hook input priority -10;\n  \
         meta nfproto ipv6 udp dport {NODE_PORT} drop\n }}\n}}\n"
    );
    let file = lab.dir().join("v6block.nft");
    std::fs::write(&file, rules).unwrap();
    b.ns.exec(&["nft", "-f", &file.to_string_lossy()])
        .expect_ok();
    let t0 = Instant::now();
    direct_at(&a, &b, at4(&b), Duration::from_secs(25));
    direct_at(&b, &a, at4(&a), Duration::from_secs(25));
    report(format!(
        "ipv6_prefer: direct over IPv4 {} ms after UDP over IPv6 was blocked",
        t0.elapsed().as_millis()
    ));
    a.wait_http(&b, OVERLAY_TIMEOUT);
    b.wait_http(&a, OVERLAY_TIMEOUT);
    measure("IPv4");
}
