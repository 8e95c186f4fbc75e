//! Lossy, slow links (issue 12): two nodes behind easy NATs whose wan links each add 10 ms
//! ± 2.5 ms per direction and drop 3 % each way (`Impairment::LOSSY_WAN`: `a2a-impair` for the
//! delay, nftables for the loss; see `src/impair.rs`), so a 40 ms round trip between them.
//! They must go direct within 10 s and stay direct for a minute under an iperf3 stream, and for
//! a minute more without it, when only heartbeats hold the path: a lost probe or two is not a
//! dead path. And the forwarder itself: it delays, keeps order and keeps up. Needs root; see the
//! crate documentation of `a2a_netns_tests`.

use std::time::{Duration, Instant};

use a2a_netns_tests::{report, require_tools, CoordOpts, Impairment, Lab, Nat, Node, Ns, Router};

/// The bound on going direct after both `up`s.
const DIRECT_WITHIN: Duration = Duration::from_secs(10);
/// How long the stream runs, the path watched every second meanwhile.
const STREAM_SECS: u32 = 60;

/// Checks once a second, until `done`, that `a` and `b` reach each other directly; returns the
/// number of rounds and every sample that was not direct.
fn watch_direct(a: &Node, b: &Node, mut done: impl FnMut() -> bool) -> (u32, Vec<String>) {
    let started = Instant::now();
    let mut rounds = 0u32;
    let mut not_direct: Vec<String> = Vec::new();
    while !done() {
        for (x, y) in [(a, b), (b, a)] {
            match x.path_to(&y.name) {
                Ok((p, _)) if p == "direct" => {}
                other => not_direct.push(format!(
                    "{:.1} s: {} -> {}: {other:?}",
                    started.elapsed().as_secs_f64(),
                    x.name,
                    y.name
                )),
            }
        }
        rounds += 1;
        let next = started + Duration::from_secs(rounds.into());
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    (rounds, not_direct)
}

/// Frames the loss rules of `routers` have dropped so far.
fn lost_frames(routers: &[&Router]) -> u64 {
    routers
        .iter()
        .map(|r| {
            let l = r.wire_loss();
            l.lost_in + l.lost_out
        })
        .sum()
}

#[test]
fn lossy_slow_links_go_direct_and_stay_direct_under_a_stream() {
    let Some(lab) = Lab::new("lossy") else {
        return;
    };
    require_tools(&[
        ("iperf3", "iperf3"),
        ("nft", "nftables"),
        ("sysctl", "procps"),
        ("ping", "iputils-ping"),
    ]);
    let coord = lab.coordinator(CoordOpts::default());
    let imp = Impairment::LOSSY_WAN;
    let ra = lab.router_impaired("rtr-a", Nat::Easy, imp);
    let rb = lab.router_impaired("rtr-b", Nat::Easy, imp);
    let a = lab.node_behind(&ra, "lossy-a");
    let b = lab.node_behind(&rb, "lossy-b");

    // The impairment is there: the wire between the routers is slow and jittery (four
    // crossings of 10 ms ± 2.5 ms). The median and the middle half of the replies: an echo
    // that waited for an ARP reply lost on the wire (3 % on each crossing) takes a second more.
    let ping = ra
        .ns
        .ping_stats(rb.wan_ip(), 30)
        .unwrap_or_else(|e| panic!("ping between the routers' wan addresses: {e}"));
    let (Some(median), Some(spread)) = (ping.median(), ping.interquartile()) else {
        panic!("too few echo replies between the routers' wan addresses: {ping:?}");
    };
    report(format!(
        "lossy: underlay ping rtr-a -> rtr-b: {}/{} answered, median {median:.1} ms, middle \
         half within {spread:.1} ms",
        ping.rtts.len(),
        ping.sent,
    ));
    assert!(
        median >= 35.0,
        "the underlay round trip between the impaired routers is {median:.1} ms (median), not \
         the 40 ms the two forwarders should add: {ping:?}"
    );
    assert!(
        spread >= 1.0,
        "the underlay round trip does not vary (middle half within {spread:.2} ms): no \
         jitter: {ping:?}"
    );

    let t0 = Instant::now();
    a.up_ok(&coord.token);
    b.up_ok(&coord.token);
    let both_up = Instant::now();
    a.wait_path(&b.name, "direct", Duration::from_secs(30));
    b.wait_path(&a.name, "direct", Duration::from_secs(30));
    let direct_after = both_up.elapsed();
    report(format!(
        "lossy: direct both ways {} ms after both `up`s ({} ms after the first)",
        direct_after.as_millis(),
        t0.elapsed().as_millis()
    ));
    assert!(
        direct_after <= DIRECT_WITHIN,
        "the pair went direct {direct_after:?} after both `up`s, later than {DIRECT_WITHIN:?}"
    );
    for n in [&a, &b] {
        assert_eq!(
            n.counter("path_fallbacks"),
            0,
            "{} fell back already",
            n.name
        );
    }
    let rx_before = b.status().peer(&a.name).map_or(0, |p| p.rx_bytes);

    // A minute of TCP between the overlay addresses; the path watched every second.
    let _server = b.ns.iperf3_server();
    let client = a.ns.clone();
    let to = b.overlay_ip();
    let stream = std::thread::spawn(move || client.iperf3_client(to, STREAM_SECS));
    let started = Instant::now();
    let (samples, not_direct) = watch_direct(&a, &b, || stream.is_finished());
    let mbits = stream
        .join()
        .expect("the iperf3 client thread")
        .unwrap_or_else(|e| panic!("the iperf3 stream over the lossy links failed: {e}"));
    let streamed = started.elapsed();
    let rx_after = b.status().peer(&a.name).map_or(0, |p| p.rx_bytes);
    let fallbacks: Vec<(String, u64)> = [&a, &b]
        .iter()
        .map(|n| (n.name.clone(), n.counter("path_fallbacks")))
        .collect();
    // The sender's congestion control decides what random loss costs (BBR hardly slows down
    // for it, CUBIC does): reported with the figure.
    let cc =
        a.ns.exec(&["sysctl", "-n", "net.ipv4.tcp_congestion_control"])
            .stdout;
    report(format!(
        "lossy: iperf3 TCP ({}) {mbits:.2} Mbit/s for {STREAM_SECS} s ({} MB into lossy-b's \
         tunnel); path sampled {samples} times in {:.1} s, not direct {} times; \
         path_fallbacks {fallbacks:?}",
        cc.trim(),
        (rx_after.saturating_sub(rx_before)) / 1_000_000,
        streamed.as_secs_f64(),
        not_direct.len()
    ));
    assert!(
        streamed >= Duration::from_secs(STREAM_SECS.into()),
        "the stream ended after {streamed:?}"
    );
    assert!(mbits > 0.0, "the stream moved nothing");
    assert!(
        rx_after > rx_before,
        "lossy-b received nothing from lossy-a during the stream"
    );
    assert!(
        not_direct.is_empty(),
        "the path left direct during the stream:\n{}",
        not_direct.join("\n")
    );
    for (name, n) in &fallbacks {
        assert_eq!(*n, 0, "{name} fell back to the relay {n} times");
    }

    // A minute without the stream: only the heartbeats (and WireGuard's keepalive every 10 s)
    // now keep the direct path, and some of them are lost on the wire.
    let lost_before = lost_frames(&[&ra, &rb]);
    let idle = Instant::now();
    let (samples, not_direct) = watch_direct(&a, &b, || {
        idle.elapsed() >= Duration::from_secs(STREAM_SECS.into())
    });
    let lost_idle = lost_frames(&[&ra, &rb]) - lost_before;
    let fallbacks: Vec<(String, u64)> = [&a, &b]
        .iter()
        .map(|n| (n.name.clone(), n.counter("path_fallbacks")))
        .collect();
    report(format!(
        "lossy: idle for {STREAM_SECS} s: {lost_idle} frames lost on the wires meanwhile; path \
         sampled {samples} times, not direct {} times; path_fallbacks {fallbacks:?}",
        not_direct.len()
    ));
    assert!(
        not_direct.is_empty(),
        "the idle path left direct:\n{}",
        not_direct.join("\n")
    );
    for (name, n) in &fallbacks {
        assert_eq!(*n, 0, "{name} fell back to the relay {n} times while idle");
    }

    // The loss rules dropped (both ways on both routers) and the forwarders delayed wire-sized
    // frames without losing any of their own.
    for r in [&ra, &rb] {
        let loss = r.wire_loss();
        let pct = |lost: u64, seen: u64| 100.0 * lost as f64 / seen.max(1) as f64;
        report(format!(
            "lossy: {} wire loss: in {}/{} ({:.2} %), out {}/{} ({:.2} %)",
            r.ns.role,
            loss.lost_in,
            loss.seen_in,
            pct(loss.lost_in, loss.seen_in),
            loss.lost_out,
            loss.seen_out,
            pct(loss.lost_out, loss.seen_out)
        ));
        assert!(
            loss.lost_in > 0 && loss.lost_out > 0,
            "{}'s loss rules dropped nothing: {loss:?}",
            r.ns.role
        );
        let wan = r.impaired_wan().expect("an impaired router");
        let (out, inn) = wan.stop();
        report(format!(
            "lossy: {} forwarder: to wan {} frames ({} MB, queue peak {}), from wan {} frames \
             ({} MB, queue peak {})",
            r.ns.role,
            out.sent,
            out.bytes / 1_000_000,
            out.max_queue,
            inn.sent,
            inn.bytes / 1_000_000,
            inn.max_queue
        ));
        for (dir, c) in [("to wan", out), ("from wan", inn)] {
            assert!(c.sent > 0, "{} forwarded nothing {dir}: {c:?}", r.ns.role);
            assert_eq!(
                (c.full, c.send_errors, c.truncated, c.gso),
                (0, 0, 0, 0),
                "{}'s forwarder {dir} dropped, failed or saw GSO super-frames: {c:?}",
                r.ns.role
            );
        }
    }
}

/// The namespace's `RcvbufErrors` (UDP datagrams dropped because a socket was full).
fn rcvbuf_errors(ns: &Ns) -> u64 {
    let snmp = ns.exec(&["cat", "/proc/net/snmp"]).expect_ok().stdout;
    let udp: Vec<Vec<&str>> = snmp
        .lines()
        .filter_map(|l| l.strip_prefix("Udp: "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let [names, values] = &udp[..] else {
        panic!("no Udp lines in /proc/net/snmp: {snmp}");
    };
    names
        .iter()
        .position(|n| *n == "RcvbufErrors")
        .and_then(|i| values.get(i)?.parse().ok())
        .unwrap_or_else(|| panic!("no RcvbufErrors in /proc/net/snmp: {snmp}"))
}

/// The forwarder on its own (no loss): a wire of 20 ms ± 5 ms each way between a LAN host and a
/// wan host; UDP at 100 Mbit/s must arrive complete and in order (a delay line that let frames
/// overtake would reorder nearly all of them: they are 0.12 ms apart, the jitter spans 10 ms),
/// and TCP's throughput through it is reported.
#[test]
fn the_impairment_forwarder_delays_keeps_order_and_keeps_up() {
    let Some(lab) = Lab::new("impair_forwarder") else {
        return;
    };
    require_tools(&[("iperf3", "iperf3"), ("ping", "iputils-ping")]);
    let imp = Impairment {
        delay: Duration::from_millis(20),
        jitter: Duration::from_millis(5),
        loss_pct: 0,
    };
    let router = lab.router_impaired("rtr", Nat::Easy, imp);
    let inside = lab.add_ns_behind(&router, "inside");
    let outside = lab.add_ns("outside");
    let to = outside.wan_ip.expect("a wan address");

    let ping = inside
        .ping_stats(to, 20)
        .unwrap_or_else(|e| panic!("ping across the impaired wire: {e}"));
    let (Some(median), Some(spread)) = (ping.median(), ping.interquartile()) else {
        panic!("too few echo replies across the impaired wire: {ping:?}");
    };
    report(format!(
        "impair_forwarder: ping across 20 ms ± 5 ms each way: {}/{} answered, median \
         {median:.1} ms, middle half within {spread:.1} ms",
        ping.rtts.len(),
        ping.sent
    ));
    assert!(
        median >= 35.0,
        "a round trip across the wire is {median:.1} ms (median), not the 40 ms the forwarder \
         should add: {ping:?}"
    );
    assert!(spread >= 1.0, "no jitter: {ping:?}");

    let _server = outside.iperf3_server();
    let port = a2a_netns_tests::IPERF_PORT.to_string();
    let ip = to.to_string();
    let udp: serde_json::Value = a2a_netns_tests::wait_for(
        Duration::from_secs(30),
        "an iperf3 UDP run across the impaired wire",
        || {
            let out = inside.exec_timeout(
                &[
                    "iperf3", "-c", &ip, "-p", &port, "-u", "-b", "100M", "-w", "4M", "-t", "5",
                    "-J",
                ],
                Duration::from_secs(30),
            );
            let json: serde_json::Value = serde_json::from_str(&out.stdout)
                .map_err(|e| format!("iperf3 printed no JSON ({e}): {out}"))?;
            match json.get("error") {
                Some(err) => Err(format!("iperf3: {err}")),
                None => Ok(json),
            }
        },
    );
    let stream = &udp["end"]["streams"][0]["udp"];
    let count = |key: &str| {
        stream[key]
            .as_u64()
            .unwrap_or_else(|| panic!("iperf3's UDP stream has no {key:?}: {stream}"))
    };
    let (packets, lost, out_of_order) = (
        count("packets"),
        count("lost_packets"),
        count("out_of_order"),
    );
    report(format!(
        "impair_forwarder: UDP at 100 Mbit/s: {packets} datagrams, {lost} lost, \
         {out_of_order} out of order"
    ));
    assert!(
        packets > 10_000,
        "too few datagrams to judge the order: {stream}"
    );
    // Order is the forwarder's alone. On a busy machine the receiver's socket may overflow when
    // a burst leaves the delay line: such losses are counted by the receiver's kernel
    // (RcvbufErrors); any other loss is the wire's fault.
    assert_eq!(
        out_of_order, 0,
        "the forwarder reordered datagrams: {stream}"
    );
    let overflows = rcvbuf_errors(&outside);
    if lost > 0 {
        report(format!(
            "impair_forwarder: {lost} datagrams lost, {overflows} overflows of the receiver's \
             socket"
        ));
    }
    assert!(
        lost <= overflows,
        "{lost} datagrams lost on the wire, only {overflows} of them in the receiver's socket: \
         {stream}"
    );

    let mbits = inside
        .iperf3_client(to, 10)
        .unwrap_or_else(|e| panic!("iperf3 TCP across the impaired wire: {e}"));
    report(format!(
        "impair_forwarder: TCP across 20 ms ± 5 ms each way: {mbits:.0} Mbit/s (10 s)"
    ));
    assert!(mbits > 0.0, "TCP moved nothing across the wire");

    let wan = router.impaired_wan().expect("an impaired router");
    let (out, inn) = wan.stop();
    report(format!(
        "impair_forwarder: to wan {} frames ({} MB, queue peak {}), from wan {} frames ({} MB, \
         queue peak {})",
        out.sent,
        out.bytes / 1_000_000,
        out.max_queue,
        inn.sent,
        inn.bytes / 1_000_000,
        inn.max_queue
    ));
    for (dir, c) in [("to wan", out), ("from wan", inn)] {
        assert_eq!(
            (c.full, c.send_errors, c.truncated, c.gso),
            (0, 0, 0, 0),
            "the forwarder {dir} dropped, failed or saw GSO super-frames: {c:?}"
        );
    }
    // Nothing was dropped on purpose: the loss rules (0 %) counted frames and dropped none.
    let loss = router.wire_loss();
    assert!(loss.seen_out > 0 && loss.seen_in > 0, "{loss:?}");
    assert_eq!((loss.lost_in, loss.lost_out), (0, 0), "{loss:?}");
}
