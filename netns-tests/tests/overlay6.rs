//! IPv6 overlay addresses and `whois`, end to end: real a2ad and a2actl, real TUN devices, one
//! lab per test (IPv4 underlay: the overlay's IPv6 does not need the underlay's). Needs root;
//! see the crate documentation of `a2a_netns_tests`.

use std::collections::HashSet;
use std::fs;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use a2a_netns_tests::{
    report, require_tools, wait_for, wait_until, CoordOpts, Lab, Node, Status, OVERLAY_TIMEOUT,
};

/// `self.ip6` of a status, parsed.
#[track_caller]
fn self_ip6(st: &Status, who: &str) -> Ipv6Addr {
    st.raw["self"]["ip6"]
        .as_str()
        .unwrap_or_else(|| panic!("{who}: status --json has no self.ip6: {}", st.raw["self"]))
        .parse()
        .unwrap_or_else(|e| panic!("{who}: self.ip6 is not an IPv6 address ({e})"))
}

/// `a2actl ip -6`, parsed.
#[track_caller]
fn ctl_ip6(node: &Node) -> Ipv6Addr {
    let out = node.ctl(&["ip", "-6"]).expect_ok();
    out.stdout.trim().parse().unwrap_or_else(|e| {
        panic!(
            "{}: `a2actl ip -6` printed {:?}, not a bare IPv6 address ({e})",
            node.name, out.stdout
        )
    })
}

/// The 48-bit prefix of an address.
fn prefix48(ip: Ipv6Addr) -> [u16; 3] {
    let s = ip.segments();
    [s[0], s[1], s[2]]
}

/// `a2actl whois --json ADDR` on `node`, parsed; panics if it fails.
#[track_caller]
fn whois(node: &Node, addr: &str) -> serde_json::Value {
    let out = node.ctl(&["whois", "--json", addr]).expect_ok();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("whois --json {addr} printed no JSON ({e}): {out}"))
}

/// Replies to `ping -6` from `node` to `ip`: `count` probes, 0.2 s apart, optionally from
/// source address `from`.
fn ping6(node: &Node, ip: Ipv6Addr, count: u32, from: Option<Ipv6Addr>) -> Result<u32, String> {
    let (ip, count_s) = (ip.to_string(), count.to_string());
    let from = from.map(|f| f.to_string());
    let mut args = vec!["ping", "-6", "-n", "-c", &count_s, "-i", "0.2", "-W", "2"];
    if let Some(f) = &from {
        args.extend(["-I", f.as_str()]);
    }
    args.push(&ip);
    let out = node.ns.exec(&args);
    // "5 packets transmitted, 5 received" (iputils).
    let received = out
        .stdout
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no ping summary: {out}"))?;
    Ok(received)
}

/// Waits until `n` lists every other of `nodes` with the ip6 in `want` (same order), and
/// returns that status.
fn wait_peers_ip6(n: &Node, nodes: &[Node], want: &[Ipv6Addr]) -> Status {
    wait_for(OVERLAY_TIMEOUT, &format!("{}'s peers' ip6", n.name), || {
        let st = n.try_status()?;
        for (o, want) in nodes.iter().zip(want) {
            if o.name == n.name {
                continue;
            }
            let got = st.raw["peers"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == o.name.as_str()))
                .and_then(|p| p["ip6"].as_str().map(str::to_string));
            if got.as_deref() != Some(&want.to_string()) {
                return Err(format!(
                    "{} lists {} with ip6 {got:?}, not {want}",
                    n.name, o.name
                ));
            }
        }
        Ok(st)
    })
}

#[test]
fn ipv6_overlay_addresses_carry_traffic_whois_names_members_and_forged_sources_are_dropped() {
    let Some(lab) = Lab::new("overlay6") else {
        return;
    };
    require_tools(&[
        ("ping", "iputils-ping"),
        ("curl", "curl"),
        ("iperf3", "iperf3"),
        ("python3", "python3"),
    ]);
    let coord = lab.coordinator(CoordOpts::default());
    let nodes: Vec<Node> = ["alpha", "bravo", "charlie"]
        .iter()
        .map(|n| lab.node(n))
        .collect();
    for n in &nodes {
        n.up_ok(&coord.token);
    }
    let (alpha, bravo, charlie) = (&nodes[0], &nodes[1], &nodes[2]);
    for n in &nodes {
        n.wait_peers(
            &nodes
                .iter()
                .filter(|o| o.name != n.name)
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>(),
            OVERLAY_TIMEOUT,
        );
    }

    // Every node: self.ip6 and `a2actl ip -6` agree, in one unique-local /48, all distinct;
    // `a2actl ip` still prints the bare IPv4 address.
    let ip6: Vec<Ipv6Addr> = nodes
        .iter()
        .map(|n| {
            let st = n.status();
            let ip6 = self_ip6(&st, &n.name);
            assert_eq!(
                ctl_ip6(n),
                ip6,
                "{}: `a2actl ip -6` disagrees with status",
                n.name
            );
            assert_eq!(
                n.ctl_ip().unwrap(),
                n.overlay_ip(),
                "{}: `a2actl ip`",
                n.name
            );
            assert!(
                ip6.is_unique_local(),
                "{}: {ip6} is not unique-local",
                n.name
            );
            ip6
        })
        .collect();
    assert_eq!(ip6.iter().collect::<HashSet<_>>().len(), 3, "{ip6:?}");
    assert!(
        ip6.iter().all(|ip| prefix48(*ip) == prefix48(ip6[0])),
        "one network, one /48: {ip6:?}"
    );
    let key: Vec<String> = nodes
        .iter()
        .map(|n| n.status().me.unwrap().public_key)
        .collect();

    // Every node lists every peer with the ip6 that peer reports for itself.
    for n in &nodes {
        let st = wait_peers_ip6(n, &nodes, &ip6);
        // The interface has the address and the /48 route.
        let iface = st.raw["self"]["interface"].as_str().unwrap().to_string();
        let me = &ip6[nodes.iter().position(|o| o.name == n.name).unwrap()];
        let addrs =
            n.ns.exec(&["ip", "-6", "addr", "show", "dev", &iface])
                .expect_ok();
        assert!(
            addrs.stdout.contains(&format!("inet6 {me}/48")),
            "{}: {iface} lacks {me}/48: {addrs}",
            n.name
        );
        // The saved membership carries the address.
        let saved = fs::read_to_string(n.state_dir.join("network.json")).unwrap();
        let saved: serde_json::Value = serde_json::from_str(&saved).unwrap();
        assert_eq!(saved["ip6"], me.to_string(), "{}: network.json", n.name);
    }

    // ping -6 between the overlay addresses, every ordered pair.
    for (a, _) in nodes.iter().zip(&ip6) {
        for (b, b6) in nodes.iter().zip(&ip6) {
            if a.name != b.name {
                wait_for(
                    OVERLAY_TIMEOUT,
                    &format!("ping -6 {} -> {}", a.name, b.name),
                    || match ping6(a, *b6, 3, None)? {
                        0 => Err("no reply".into()),
                        _ => Ok(()),
                    },
                );
            }
        }
    }

    // TCP over IPv6: a 2 MiB file fetched with curl (checked byte for byte), then iperf3 -6.
    let www = lab.dir().join("overlay6-www");
    fs::create_dir_all(&www).unwrap();
    let body: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(www.join("blob"), &body).unwrap();
    let b6 = ip6[1].to_string();
    let _http = bravo.ns.spawn(
        "http6",
        &[
            "python3",
            "-m",
            "http.server",
            "8086",
            "--bind",
            &b6,
            "--directory",
            www.to_str().unwrap(),
        ],
    );
    let url = format!("http://[{b6}]:8086/blob");
    let got = lab.dir().join("overlay6-got");
    let got_s = got.to_str().unwrap().to_string();
    wait_for(OVERLAY_TIMEOUT, "curl over IPv6 alpha -> bravo", || {
        let out = alpha.ns.exec(&[
            "curl",
            "-g",
            "-sS",
            "--fail",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "-o",
            &got_s,
            &url,
        ]);
        if out.success() {
            Ok(())
        } else {
            Err(out.to_string())
        }
    });
    assert!(
        fs::read(&got).unwrap() == body,
        "the file came over IPv6 changed"
    );
    let _iperf = bravo.ns.iperf3_server();
    let mbps = alpha
        .ns
        .iperf3_client(IpAddr::V6(ip6[1]), 3)
        .unwrap_or_else(|e| panic!("iperf3 -6 alpha -> bravo over the overlay: {e}"));
    assert!(mbps > 0.0, "iperf3 measured no throughput over IPv6");
    // The same over IPv4, for comparison (a figure, not an assertion).
    let mbps4 = alpha
        .ns
        .iperf3_client(bravo.overlay_ip(), 3)
        .unwrap_or_else(|e| panic!("iperf3 alpha -> bravo over the IPv4 overlay: {e}"));
    report(format!(
        "overlay6: iperf3 TCP alpha -> bravo over the overlay: IPv6 {mbps:.1} Mbit/s, \
         IPv4 {mbps4:.1} Mbit/s"
    ));

    // whois on charlie: alpha by its IPv4 and its IPv6 address (with a port, as a server sees a
    // caller), charlie itself, and addresses nobody holds.
    for addr in [
        alpha.overlay_ip().to_string(),
        format!("{}:40000", alpha.overlay_ip()),
        ip6[0].to_string(),
        format!("[{}]:40000", ip6[0]),
    ] {
        let w = whois(charlie, &addr);
        assert_eq!(w["name"], "alpha", "whois {addr}: {w}");
        assert_eq!(w["public_key"], key[0].as_str(), "whois {addr}: {w}");
        assert_eq!(w["ip"], alpha.overlay_ip().to_string(), "whois {addr}: {w}");
        assert_eq!(w["ip6"], ip6[0].to_string(), "whois {addr}: {w}");
        assert_eq!(w["admitted_by"], "token", "whois {addr}: {w}");
        assert_eq!(w["self"], false, "whois {addr}: {w}");
    }
    let w = whois(alpha, &ip6[1].to_string());
    assert_eq!(
        (&w["name"], &w["public_key"]),
        (&"bravo".into(), &key[1].as_str().into())
    );
    let w = whois(charlie, &ip6[2].to_string());
    assert_eq!((&w["name"], &w["self"]), (&"charlie".into(), &true.into()));
    let text = charlie.ctl(&["whois", &ip6[0].to_string()]).expect_ok();
    assert!(text.stdout.starts_with("alpha\n"), "{text}");
    assert!(text.stdout.contains(&key[0]), "{text}");
    let mut nobody = ip6[0].octets();
    nobody[15] ^= 0x5a;
    let nobody = Ipv6Addr::from(nobody);
    for (addr, says) in [
        (nobody.to_string(), format!("no member holds {nobody}")),
        (
            "100.64.0.0".to_string(),
            "no member holds 100.64.0.0".to_string(),
        ),
        (
            "192.0.2.1".to_string(),
            "outside this network's overlay".to_string(),
        ),
        ("planner".to_string(), "is not an IP address".to_string()),
        (
            format!("{}:70000", alpha.overlay_ip()),
            "is not a number from 1 to 65535".to_string(),
        ),
    ] {
        let out = charlie.ctl(&["whois", &addr]).expect_fail();
        assert!(
            out.stderr.contains(&says),
            "whois {addr}: want {says:?}: {out}"
        );
    }

    // The README's whois example, as printed there, serving on bravo: alpha is greeted by name
    // over IPv6 and over IPv4 (seen as ::ffff:a.b.c.d); a caller that is no member (bravo
    // itself over loopback) is refused.
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let example = readme
        .split("<!-- whois-example -->\n```python\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("README.md has the whois example after <!-- whois-example -->");
    let script = lab.dir().join("whois-example.py");
    fs::write(&script, example).unwrap();
    let bin_dir = std::path::Path::new(&lab.bins().ctl)
        .parent()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let path_var = format!("PATH={bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin");
    let state_var = format!("A2A_STATE_DIR={}", bravo.state_dir.display());
    let _example = bravo.ns.spawn(
        "whois-example",
        &[
            "env",
            &path_var,
            &state_var,
            "python3",
            script.to_str().unwrap(),
        ],
    );
    let greet = |from: &Node, url: &str| {
        let out = from.ns.exec(&[
            "curl",
            "-g",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "-w",
            " %{http_code}",
            url,
        ]);
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(out.to_string())
        }
    };
    for url in [
        format!("http://[{}]:8080/", ip6[1]),
        format!("http://{}:8080/", bravo.overlay_ip()),
    ] {
        let got = wait_for(
            OVERLAY_TIMEOUT,
            &format!("the whois example at {url}"),
            || greet(alpha, &url),
        );
        assert_eq!(got, "hello alpha (token)\n 200", "{url}");
    }
    let got = greet(bravo, "http://[::1]:8080/").unwrap();
    assert_eq!(got, "members only\n 403");

    // A forged inner source: alpha sends to bravo from charlie's IPv6 address (given to its own
    // interface, so the kernel sends from it). Alpha's a2ad encrypts it to bravo, which must
    // drop every packet and count it, and answer none. Alpha's own address still works.
    let before = bravo.counter("inner_source_mismatch6");
    let iface = alpha.status().raw["self"]["interface"]
        .as_str()
        .unwrap()
        .to_string();
    alpha
        .ns
        .exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{}/128", ip6[2]),
            "dev",
            &iface,
            "nodad",
        ])
        .expect_ok();
    let replies = ping6(alpha, ip6[1], 5, Some(ip6[2])).unwrap_or(0);
    assert_eq!(
        replies, 0,
        "bravo answered a packet whose inner source was forged"
    );
    wait_until(
        Duration::from_secs(5),
        "bravo to count the forged packets",
        || bravo.counter("inner_source_mismatch6") >= before + 5,
    );
    assert_eq!(
        ping6(alpha, ip6[1], 2, Some(ip6[0])).unwrap(),
        2,
        "alpha's own ip6"
    );
    report(format!(
        "overlay6: forged IPv6 inner sources dropped at bravo: {} (5 sent)",
        bravo.counter("inner_source_mismatch6") - before
    ));
}

/// A state directory written before IPv6 overlay addresses (no `ip6` in network.json) keeps
/// working: the daemon rejoins with the same IPv4 address and derives the same IPv6 one.
#[test]
fn a_state_directory_without_ip6_derives_it_on_load() {
    let Some(lab) = Lab::new("overlay6_old_state") else {
        return;
    };
    require_tools(&[("ping", "iputils-ping")]);
    let coord = lab.coordinator(CoordOpts::default());
    let alpha = lab.node("alpha");
    let bravo = lab.node("bravo");
    alpha.up_ok(&coord.token);
    bravo.up_ok(&coord.token);
    alpha.wait_peers(&["bravo"], OVERLAY_TIMEOUT);
    let ip6 = self_ip6(&alpha.status(), "alpha");
    let ip4 = alpha.overlay_ip();

    alpha.stop_daemon(libc::SIGTERM);
    let path = alpha.state_dir.join("network.json");
    let mut saved: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(saved["ip6"], ip6.to_string());
    saved.as_object_mut().unwrap().remove("ip6");
    fs::write(&path, serde_json::to_vec_pretty(&saved).unwrap()).unwrap();
    alpha.start_daemon();

    let st = wait_for(OVERLAY_TIMEOUT, "alpha to rejoin", || {
        let st = alpha.try_status()?;
        match &st.me {
            Some(_) => Ok(st),
            None => Err("not joined".into()),
        }
    });
    assert_eq!(self_ip6(&st, "alpha"), ip6, "the derived address moved");
    assert_eq!(st.me.as_ref().unwrap().ip, ip4);
    wait_for(
        OVERLAY_TIMEOUT,
        "ping -6 bravo -> alpha after the restart",
        || match ping6(&bravo, ip6, 3, None)? {
            0 => Err("no reply".into()),
            _ => Ok(()),
        },
    );
}

/// `whois` tells an invited member from a token holder, and a rotation (new network id, so a new
/// /48) moves every member's IPv6 address, on its interface and in its peers' tables, and IPv6
/// traffic follows.
#[test]
fn whois_tells_invited_members_and_rotation_moves_the_ipv6_prefix() {
    let Some(lab) = Lab::new("overlay6_rotate") else {
        return;
    };
    require_tools(&[("ping", "iputils-ping")]);
    let coord = lab.coordinator(CoordOpts::default());
    let nodes: Vec<Node> = ["alpha", "bravo", "charlie"]
        .iter()
        .map(|n| lab.node(n))
        .collect();
    let (alpha, bravo, charlie) = (&nodes[0], &nodes[1], &nodes[2]);
    alpha.up_ok(&coord.token);
    bravo.up_ok(&coord.token);
    let code = alpha.ctl(&["invite"]).expect_ok().stdout.trim().to_string();
    charlie.up_ok(&code);
    for n in &nodes {
        let others: Vec<&str> = nodes
            .iter()
            .filter(|o| o.name != n.name)
            .map(|o| o.name.as_str())
            .collect();
        n.wait_peers(&others, OVERLAY_TIMEOUT);
    }
    let old: Vec<Ipv6Addr> = nodes
        .iter()
        .map(|n| self_ip6(&n.status(), &n.name))
        .collect();

    let w = wait_for(
        OVERLAY_TIMEOUT,
        "bravo to know charlie's certificate",
        || {
            let w = whois(bravo, &old[2].to_string());
            if w["admitted_by"] == "invite" {
                Ok(w)
            } else {
                Err(format!("{w}"))
            }
        },
    );
    assert_eq!(w["name"], "charlie", "{w}");
    let invite = w["invite"].as_str().unwrap_or_default();
    assert!(
        invite.len() == 32 && invite.bytes().all(|b| b.is_ascii_hexdigit()),
        "{w}"
    );
    assert!(w["certified_ms"].as_u64().is_some(), "{w}");
    let w = whois(charlie, &charlie.overlay_ip().to_string());
    assert_eq!(
        (&w["admitted_by"], &w["self"]),
        (&"invite".into(), &true.into()),
        "{w}"
    );
    let w = whois(bravo, &old[0].to_string());
    assert_eq!(w["admitted_by"], "token", "{w}");
    assert!(w.get("invite").is_none(), "{w}");

    alpha.ctl(&["token", "rotate"]).expect_ok();
    let new: Vec<Ipv6Addr> = nodes
        .iter()
        .zip(&old)
        .map(|(n, was)| {
            wait_for(
                OVERLAY_TIMEOUT,
                &format!("{}'s ip6 to move", n.name),
                || {
                    let ip6 = self_ip6(&n.try_status()?, &n.name);
                    if prefix48(ip6) == prefix48(*was) {
                        return Err(format!("still {ip6}"));
                    }
                    // The host part is the key's: it stays.
                    assert_eq!(ip6.segments()[3..], was.segments()[3..], "{}", n.name);
                    let iface = n.status().raw["self"]["interface"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    let addrs =
                        n.ns.exec(&["ip", "-6", "addr", "show", "dev", &iface])
                            .expect_ok();
                    if !addrs.stdout.contains(&format!("inet6 {ip6}/48"))
                        || addrs.stdout.contains(&was.to_string())
                    {
                        return Err(format!("{iface} has not moved to {ip6}: {addrs}"));
                    }
                    Ok(ip6)
                },
            )
        })
        .collect();
    assert!(
        new.iter().all(|ip| prefix48(*ip) == prefix48(new[0])),
        "{new:?}"
    );
    for n in &nodes {
        wait_peers_ip6(n, &nodes, &new);
    }
    for a in &nodes {
        for (b, b6) in nodes.iter().zip(&new) {
            if a.name != b.name {
                wait_for(
                    OVERLAY_TIMEOUT,
                    &format!("ping -6 {} -> {} after the rotation", a.name, b.name),
                    || match ping6(a, *b6, 3, None)? {
                        0 => Err("no reply".into()),
                        _ => Ok(()),
                    },
                );
            }
        }
    }
}
