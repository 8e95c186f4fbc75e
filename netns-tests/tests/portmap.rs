//! Port mapping: a hard-NAT router running the real miniupnpd (NAT-PMP, PCP, UPnP IGD) gives
//! its node a mapped port, published as a candidate, so a hard–hard pair goes direct; the
//! mapping is deleted on `a2actl down` and on daemon stop. A router without a server, and one
//! whose server answers garbage or lies about the external address, change nothing but a
//! counter. Needs root; see the crate documentation of `a2a_netns_tests`.

use std::time::{Duration, Instant};

use a2a_netns_tests::{
    report, wait_for, CoordOpts, Lab, Lie, MiniUpnpd, Nat, Node, NODE_PORT, OVERLAY_TIMEOUT,
};

/// How long a path may take to change (upgrade rounds every 5 s).
const PATH_TIMEOUT: Duration = Duration::from_secs(25);
/// A probe round with nothing answering takes 3.75 s.
const PORTMAP_TIMEOUT: Duration = Duration::from_secs(15);

fn portmap(n: &Node) -> serde_json::Value {
    let v = n.netcheck();
    v.get("portmap")
        .cloned()
        .unwrap_or_else(|| panic!("netcheck JSON of {} has no portmap: {v}", n.name))
}

/// Waits until `n`'s port mapper reports `state`; returns its report.
#[track_caller]
fn wait_portmap_state(n: &Node, state: &str) -> serde_json::Value {
    wait_for(
        PORTMAP_TIMEOUT,
        &format!("{}'s port mapping to be {state}", n.name),
        || {
            let pm = portmap(n);
            if pm["state"] == state {
                Ok(pm)
            } else {
                Err(pm.to_string())
            }
        },
    )
}

/// Waits until miniupnpd holds exactly `count` mappings to the WireGuard port.
#[track_caller]
fn wait_mappings(upnp: &MiniUpnpd, count: usize, what: &str) -> Vec<(u16, String)> {
    wait_for(Duration::from_secs(5), what, || {
        let m: Vec<(u16, String)> = upnp
            .udp_mappings()
            .into_iter()
            .filter(|(_, to)| to.ends_with(&format!(":{NODE_PORT}")))
            .collect();
        if m.len() == count {
            Ok(m)
        } else {
            Err(format!("miniupnpd holds {m:?}"))
        }
    })
}

fn answered(pm: &serde_json::Value) -> Vec<String> {
    pm["answered"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_hard_nat_with_port_mapping_goes_direct_and_the_mapping_is_deleted() {
    let Some(lab) = Lab::with_public_wan("portmap_direct") else {
        return;
    };
    let coord = lab.coordinator(CoordOpts::default());
    let mapped = lab.router("rtr-upnp", Nat::Hard);
    let upnp = mapped.start_miniupnpd();
    let hard = lab.router("rtr-hard", Nat::Hard);
    let plain = lab.router("rtr-plain", Nat::Hard);
    let a = lab.node_behind(&mapped, "mapped");
    let b = lab.node_behind(&hard, "hard-b");
    let c = lab.node_behind(&plain, "hard-c");
    for n in [&a, &b, &c] {
        n.serve_http();
    }

    // The mapped node learns its mapping and publishes it.
    let t_up = Instant::now();
    a.up_ok(&coord.token);
    let pm = wait_for(
        PORTMAP_TIMEOUT,
        "mapped's port mapping to be published",
        || {
            let pm = portmap(&a);
            if pm["published"] == true {
                Ok(pm)
            } else {
                Err(pm.to_string())
            }
        },
    );
    report(format!(
        "portmap_direct: mapping published {} ms after `a2actl up`: {pm}",
        t_up.elapsed().as_millis()
    ));
    let held = wait_mappings(&upnp, 1, "miniupnpd to hold the node's mapping");
    let (port, _) = held[0];
    assert_eq!(
        pm["mapped"],
        format!("{}:{port}", mapped.wan_ip()),
        "the mapping netcheck reports is the one miniupnpd holds ({held:?}): {pm}"
    );
    assert_eq!(pm["protocol"], "pcp", "{pm}");
    // (The SSDP answer may come a moment after PCP's.)
    let pm_all = wait_for(
        Duration::from_secs(5),
        "netcheck to report the three protocols",
        || {
            let pm = portmap(&a);
            let mut got = answered(&pm);
            got.sort();
            if got == ["nat-pmp", "pcp", "upnp"] {
                Ok(pm)
            } else {
                Err(pm.to_string())
            }
        },
    );
    assert_eq!(pm_all["protocol"], "pcp", "PCP is preferred: {pm_all}");
    assert_eq!(a.counter("portmap_bad"), 0);
    assert_eq!(a.counter("portmap_mismatch"), 0);

    // Hard–hard with the mapping on one side goes direct; without it, it stays relayed.
    let t0 = Instant::now();
    b.up_ok(&coord.token);
    b.wait_http(&a, OVERLAY_TIMEOUT);
    b.wait_path("mapped", "direct", PATH_TIMEOUT);
    let b_direct = t0.elapsed();
    a.wait_path("hard-b", "direct", PATH_TIMEOUT);
    let both_direct = t0.elapsed();
    report(format!(
        "portmap_direct: hard-b -> mapped direct {} ms after hard-b's `a2actl up`, both ways {} ms",
        b_direct.as_millis(),
        both_direct.as_millis()
    ));
    let (_, ep) = b.path_to("mapped").unwrap();
    assert_eq!(
        ep,
        Some(format!("{}:{port}", mapped.wan_ip())),
        "hard-b reaches mapped at its mapped address"
    );
    c.up_ok(&coord.token);
    c.wait_http(&a, OVERLAY_TIMEOUT);
    c.wait_http(&b, OVERLAY_TIMEOUT);
    c.wait_path("mapped", "direct", PATH_TIMEOUT);
    // A router without a server: netcheck says so, and hard–hard stays relayed.
    let pm_c = wait_portmap_state(&c, "none answered");
    assert!(answered(&pm_c).is_empty(), "{pm_c}");
    assert!(pm_c["mapped"].is_null(), "{pm_c}");
    std::thread::sleep(Duration::from_secs(6));
    for (x, y) in [(&b, "hard-c"), (&c, "hard-b")] {
        let (path, _) = x.path_to(y).unwrap();
        assert_eq!(
            path, "relay",
            "{} -> {y}: hard–hard without mapping",
            x.name
        );
    }
    assert_eq!(c.counter("portmap_bad"), 0);

    // `a2actl down` deletes the mapping.
    a.ctl(&["down"]).expect_ok();
    wait_mappings(&upnp, 0, "the mapping to be gone after `a2actl down`");

    // So does stopping the daemon (SIGTERM), after it mapped again.
    a.up_ok(&coord.token);
    wait_portmap_state(&a, "mapped");
    wait_mappings(&upnp, 1, "miniupnpd to hold the node's mapping again");
    b.wait_path("mapped", "direct", PATH_TIMEOUT);
    a.stop_daemon(libc::SIGTERM);
    wait_mappings(&upnp, 0, "the mapping to be gone after a2ad stopped");
    upnp.proc.assert_running();
    for n in [&b, &c] {
        n.assert_daemon_running();
    }
    coord.assert_running();
}

#[test]
fn a_port_mapping_server_that_lies_or_answers_garbage_changes_only_a_counter() {
    let Some(lab) = Lab::with_public_wan("portmap_hostile") else {
        return;
    };
    let coord = lab.coordinator(CoordOpts::default());
    let liar = lab.router("rtr-liar", Nat::Hard);
    let garbage = lab.router("rtr-garbage", Nat::Hard);
    let wrong = {
        let o = liar.wan_ip().octets();
        std::net::Ipv4Addr::new(o[0], o[1], o[2], 250)
    };
    let lies = liar.start_fake_portmapper(Lie::WrongAddress(wrong));
    let junk = garbage.start_fake_portmapper(Lie::Garbage);
    let x = lab.node_behind(&liar, "lied-to");
    let y = lab.node_behind(&garbage, "junked");
    let open = lab.node("open");
    for n in [&x, &y, &open] {
        n.serve_http();
        n.up_ok(&coord.token);
    }

    // The liar's mapping is taken as a mapping, but never published.
    let pm = wait_portmap_state(&x, "mapped");
    assert_eq!(
        pm["mapped"]
            .as_str()
            .map(|m| m.starts_with(&format!("{wrong}:"))),
        Some(true),
        "{pm}"
    );
    assert_eq!(pm["published"], false, "{pm}");
    wait_for(PORTMAP_TIMEOUT, "lied-to to count the mismatch", || match x
        .counter("portmap_mismatch")
    {
        0 => Err("0".to_string()),
        n => Ok(n),
    });
    // Garbage is counted and maps nothing.
    let pm = wait_portmap_state(&y, "none answered");
    assert!(pm["mapped"].is_null(), "{pm}");
    assert!(y.counter("portmap_bad") >= 1, "garbage answers counted");
    assert!(
        lies.answered() >= 1 && junk.answered() >= 1,
        "both servers were asked"
    );

    // Everything works as without them.
    for (p, q) in [(&x, &y), (&y, &x), (&x, &open), (&y, &open), (&open, &x)] {
        p.wait_http(q, OVERLAY_TIMEOUT);
    }
    x.wait_path("open", "direct", PATH_TIMEOUT);
    y.wait_path("open", "direct", PATH_TIMEOUT);
    std::thread::sleep(Duration::from_secs(6));
    for (p, q) in [(&x, "junked"), (&y, "lied-to")] {
        let (path, ep) = p.path_to(q).unwrap();
        assert_eq!(
            path, "relay",
            "{} -> {q} via {ep:?}: no real mapping, hard–hard",
            p.name
        );
    }
    for n in [&x, &y, &open] {
        n.assert_daemon_running();
    }
    coord.assert_running();
}

#[test]
fn a_upnp_only_router_maps_the_port_too() {
    let Some(lab) = Lab::with_public_wan("portmap_upnp") else {
        return;
    };
    let coord = lab.coordinator(CoordOpts::default());
    let mapped = lab.router("rtr-igd", Nat::Hard);
    let upnp = mapped.start_miniupnpd_with(false, 86_400);
    let hard = lab.router("rtr-hard", Nat::Hard);
    let a = lab.node_behind(&mapped, "igd");
    let b = lab.node_behind(&hard, "hard-b");
    for n in [&a, &b] {
        n.serve_http();
    }
    let t_up = Instant::now();
    a.up_ok(&coord.token);
    let pm = wait_for(
        PORTMAP_TIMEOUT,
        "igd's port mapping to be published",
        || {
            let pm = portmap(&a);
            if pm["published"] == true {
                Ok(pm)
            } else {
                Err(pm.to_string())
            }
        },
    );
    report(format!(
        "portmap_upnp: mapping published {} ms after `a2actl up`: {pm}",
        t_up.elapsed().as_millis()
    ));
    assert_eq!(pm["protocol"], "upnp", "{pm}");
    assert_eq!(answered(&pm), ["upnp"], "only UPnP is on: {pm}");
    let held = wait_mappings(&upnp, 1, "miniupnpd to hold the node's UPnP mapping");
    assert_eq!(
        pm["mapped"],
        format!("{}:{}", mapped.wan_ip(), held[0].0),
        "{held:?}"
    );
    assert_eq!(a.counter("portmap_bad"), 0);

    let t0 = Instant::now();
    b.up_ok(&coord.token);
    b.wait_http(&a, OVERLAY_TIMEOUT);
    b.wait_path("igd", "direct", PATH_TIMEOUT);
    a.wait_path("hard-b", "direct", PATH_TIMEOUT);
    report(format!(
        "portmap_upnp: hard-b <-> igd direct {} ms after hard-b's `a2actl up`",
        t0.elapsed().as_millis()
    ));
    a.ctl(&["down"]).expect_ok();
    wait_mappings(&upnp, 0, "the UPnP mapping to be gone after `a2actl down`");
    a.up_ok(&coord.token);
    wait_portmap_state(&a, "mapped");
    wait_mappings(&upnp, 1, "miniupnpd to hold the UPnP mapping again");
    a.stop_daemon(libc::SIGTERM);
    wait_mappings(&upnp, 0, "the UPnP mapping to be gone after a2ad stopped");
    upnp.proc.assert_running();
    b.assert_daemon_running();
    coord.assert_running();
}

#[test]
fn a_short_lifetime_is_renewed_before_it_expires() {
    let Some(lab) = Lab::with_public_wan("portmap_renew") else {
        return;
    };
    let coord = lab.coordinator(CoordOpts::default());
    let mapped = lab.router("rtr-short", Nat::Hard);
    // PCP grants 20 s: renewed every 10 s, and miniupnpd removes it once it expires.
    let upnp = mapped.start_miniupnpd_with(true, 20);
    let a = lab.node_behind(&mapped, "short");
    a.up_ok(&coord.token);
    let pm = wait_portmap_state(&a, "mapped");
    assert_eq!(pm["lifetime_s"], 20, "miniupnpd cut the lifetime: {pm}");
    let first = wait_mappings(&upnp, 1, "miniupnpd to hold the mapping");
    // Past two lifetimes: still there, the same one, still published.
    std::thread::sleep(Duration::from_secs(45));
    let later = wait_mappings(&upnp, 1, "the mapping to be held after 45 s");
    assert_eq!(first, later, "renewed in place");
    let pm = portmap(&a);
    assert_eq!(pm["state"], "mapped", "{pm}");
    assert_eq!(pm["published"], true, "{pm}");
    // And without renewals it does go away: stop the daemon's mapper by killing a2ad.
    a.stop_daemon(libc::SIGKILL);
    wait_for(
        Duration::from_secs(45),
        "miniupnpd to expire the mapping nobody renews",
        || match upnp.udp_mappings().len() {
            0 => Ok(()),
            n => Err(format!("{n} left")),
        },
    );
    upnp.proc.assert_running();
}
