//! a2ad's systemd-resolved integration on a host where systemd is PID 1: a Debian bookworm
//! container booted with systemd-nspawn in a lab namespace (systemd-resolved, D-Bus and
//! libnss-resolve as on a real host; see `Container`), a2ad started by systemd from the
//! packaging's own a2ad.service and *without* `--no-system-dns`, joined with `a2actl up`.
//! `getent hosts bob.a2a` then goes glibc -> nss-resolve -> resolved -> a2ad on the a2a0 link
//! and answers bob's overlay address; other names keep the machine's own resolution (its
//! /etc/hosts, and resolved's global server: a resolver in the lab, not a2ad); after `a2actl
//! down`, and after a2ad is killed with SIGKILL, `bob.a2a` no longer resolves and resolved
//! holds nothing for the link. Real binaries over real TUN devices; see the crate
//! documentation of `a2a_netns_tests`.

use std::fs;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use a2a_netns_tests::{
    report, require_tools, wait_for, Bind, Container, CoordOpts, Lab, Proc, OVERLAY_TIMEOUT,
};

/// What the lab's upstream resolver answers for every A question.
const UPSTREAM_ANSWER: &str = "192.0.2.55";
/// A name only in the container root's /etc/hosts (scripts/resolved-root.sh), and its address.
const HOSTS_NAME: &str = "hosts-only.example";
const HOSTS_ANSWER: &str = "192.0.2.77";

/// A tiny upstream resolver (python3, UDP port 53): an A question for a name under `example`
/// gets UPSTREAM_ANSWER, another type NOERROR with no answer, any other name NXDOMAIN (as the
/// Internet's resolvers answer `*.a2a`); it prints each name asked. Not a2ad: its answer proves
/// the query went to the machine's own DNS server.
const UPSTREAM_PY: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))
print("ready", flush=True)
while True:
    q, peer = s.recvfrom(4096)
    if len(q) < 12:
        continue
    i = 12
    labels = []
    while i < len(q) and q[i] != 0:
        labels.append(q[i + 1:i + 1 + q[i]].decode("ascii", "replace"))
        i += 1 + q[i]
    qend = i + 5
    if qend > len(q):
        continue
    qtype = struct.unpack("!H", q[i + 1:i + 3])[0]
    name = ".".join(labels).lower()
    answers = b""
    rcode = 0
    if not name.endswith("example"):
        rcode = 3
    elif qtype == 1:
        answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + socket.inet_aton(sys.argv[1])
    flags = 0x8180 | rcode | (struct.unpack("!H", q[2:4])[0] & 0x0100)
    head = q[0:2] + struct.pack("!HHHHH", flags, 1, 1 if answers else 0, 0, 0)
    s.sendto(head + q[12:qend] + answers, peer)
    print("asked", name, qtype, flush=True)
"#;

/// How many questions for `name` the upstream resolver has had.
fn asked_upstream(upstream: &Proc, name: &str) -> usize {
    let line = format!("asked {name} ");
    upstream
        .stdout_text()
        .lines()
        .filter(|l| l.starts_with(&line))
        .count()
}

/// `getent hosts NAME` inside: the IPv4 addresses, or why it failed.
fn getent(c: &Container, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    let out = c.exec_timeout(&["getent", "ahostsv4", name], Duration::from_secs(20));
    if !out.success() {
        return Err(format!("getent ahostsv4 {name}: {out}"));
    }
    let mut ips: Vec<Ipv4Addr> = out
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    Ok(ips)
}

/// `getent hosts NAME` inside (the command the issue names), which must succeed: its first
/// address.
fn getent_hosts(c: &Container, name: &str) -> Result<String, String> {
    let out = c.exec_timeout(&["getent", "hosts", name], Duration::from_secs(20));
    if !out.success() {
        return Err(format!("getent hosts {name}: {out}"));
    }
    out.stdout
        .split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| format!("getent hosts {name} printed nothing: {out}"))
}

/// Waits until `name` resolves inside to exactly `want` (or, with `None`, until it does not
/// resolve at all); returns how long it took.
fn wait_name(c: &Container, name: &str, want: Option<Ipv4Addr>) -> Duration {
    let t0 = Instant::now();
    wait_for(
        OVERLAY_TIMEOUT,
        &format!("{name} to resolve to {want:?} in the container"),
        || match (getent(c, name), want) {
            (Ok(ips), Some(w)) if ips == vec![w] => Ok(()),
            (Err(_), None) => Ok(()),
            (got, _) => Err(format!("{got:?}")),
        },
    );
    t0.elapsed()
}

/// The names that are not the overlay's resolve as they did before a2a: the container's
/// /etc/hosts, and resolved's global server (the lab's upstream resolver).
#[track_caller]
fn assert_other_names(c: &Container, when: &str) {
    assert_eq!(
        getent_hosts(c, HOSTS_NAME),
        Ok(HOSTS_ANSWER.to_string()),
        "{when}: a name in /etc/hosts"
    );
    assert_eq!(
        getent(c, "outside.example"),
        Ok(vec![UPSTREAM_ANSWER.parse().unwrap()]),
        "{when}: a name outside .a2a should be answered by the machine's own DNS server"
    );
}

/// `resolvectl status a2a0` inside: Ok(text) while resolved knows the link (its "Link N
/// (a2a0)" section), else what it said (resolvectl exits 0 for an unknown interface, with
/// "Failed to resolve interface" on stderr).
fn link_status(c: &Container) -> Result<String, String> {
    let out = c.exec(&["resolvectl", "status", "--no-pager", "a2a0"]);
    if out.success() && out.stdout.contains("(a2a0)") {
        Ok(out.stdout)
    } else {
        Err(out.to_string())
    }
}

/// What resolved holds for the overlay, from `resolvectl status` (all links): lines naming
/// a2a0, the resolver's address or the routing domain.
fn overlay_dns_config(c: &Container) -> Vec<String> {
    let out = c.exec(&["resolvectl", "status", "--no-pager"]);
    assert!(out.success(), "{out}");
    out.stdout
        .lines()
        .filter(|l| l.contains("a2a0") || l.contains("100.100.100.100") || l.contains("~a2a"))
        .map(|l| l.trim().to_string())
        .collect()
}

/// `systemctl is-active a2ad` inside.
fn a2ad_state(c: &Container) -> String {
    c.exec(&["systemctl", "is-active", "a2ad"])
        .stdout
        .trim()
        .to_string()
}

/// `a2actl up --join TOKEN --name box` inside: the overlay address it prints.
#[track_caller]
fn up(c: &Container, token: &str) -> Ipv4Addr {
    let out = c.ctl(&["up", "--join", token, "--name", "box"]);
    assert!(out.success(), "`a2actl up` in the container: {out}");
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("`a2actl up` printed {:?}: {e}", out.stdout))
}

#[test]
fn resolved_routes_the_a2a_domain_to_a2ad_while_up_and_forgets_it_after_down_and_a_crash() {
    let t0 = Instant::now();
    let Some(lab) = Lab::new("resolved") else {
        return;
    };
    require_tools(&[
        ("systemd-nspawn", "systemd-container"),
        ("debootstrap", "debootstrap"),
        ("nsenter", "util-linux"),
        ("python3", "python3"),
    ]);
    let upstream = lab.add_ns("upstream");
    let upstream_ip = upstream.wan_ip.expect("upstream wan address");
    let up_proc = upstream.spawn("resolver", &["python3", "-c", UPSTREAM_PY, UPSTREAM_ANSWER]);
    wait_for(Duration::from_secs(10), "the upstream resolver", || {
        up_proc.assert_running();
        if up_proc.stdout_text().contains("ready") {
            Ok(())
        } else {
            Err("not ready".into())
        }
    });
    let coord = lab.coordinator(CoordOpts::default());
    let bob = lab.node("bob");
    let bob_ip = bob.up_ok(&coord.token);

    // The machine's own DNS server: resolved's global one, the lab's upstream.
    let conf = lab.dir().join("resolved-lab.conf");
    fs::write(
        &conf,
        format!("[Resolve]\nDNS={upstream_ip}\nLLMNR=no\nMulticastDNS=no\n"),
    )
    .expect("write the resolved drop-in");
    let boot = Instant::now();
    let c = lab.container(
        "box",
        &[Bind {
            host: conf,
            inside: "/etc/systemd/resolved.conf.d/lab.conf".into(),
        }],
    );
    let boot = boot.elapsed();
    assert_eq!(
        c.exec(&["systemctl", "is-active", "systemd-resolved"])
            .stdout
            .trim(),
        "active"
    );

    // Before a2a: no overlay names, the others resolve.
    assert!(getent(&c, "bob.a2a").is_err());
    assert!(
        asked_upstream(&up_proc, "bob.a2a") > 0,
        "before a2a, bob.a2a should have gone to the machine's own DNS server (the upstream)"
    );
    assert_other_names(&c, "before a2a");

    // a2ad under its packaged unit (no --no-system-dns), then `a2actl up`.
    c.exec(&["systemctl", "start", "a2ad"]).expect_ok();
    wait_for(
        Duration::from_secs(20),
        "a2ad to answer in the container",
        || {
            let st = a2ad_state(&c);
            if st != "active" && st != "activating" {
                panic!("a2ad.service is {st}:\n{}", c.journal(&["a2ad.service"]));
            }
            let out = c.ctl(&["status", "--json"]);
            if out.success() {
                Ok(())
            } else {
                Err(out.to_string())
            }
        },
    );
    let box_ip = up(&c, &coord.token);
    bob.wait_peers(&["box"], OVERLAY_TIMEOUT);

    // resolved sends *.a2a to a2ad over the link, and only that.
    let took = wait_name(&c, "bob.a2a", Some(bob_ip));
    report(format!(
        "bob.a2a resolved through resolved {:.1} s after `a2actl up` returned",
        took.as_secs_f64()
    ));
    // `getent hosts` asks for IPv6 first: bob's IPv6 overlay address, as his status says.
    let bob_ip6 = bob.status().raw["self"]["ip6"]
        .as_str()
        .expect("status --json self.ip6")
        .to_string();
    assert_eq!(getent_hosts(&c, "bob.a2a"), Ok(bob_ip6));
    assert_eq!(getent(&c, "box.a2a"), Ok(vec![box_ip]));
    assert!(getent(&c, "nosuch.a2a").is_err());
    let q = c.exec(&["resolvectl", "query", "--no-pager", "bob.a2a"]);
    assert!(
        q.success() && q.stdout.contains(&bob_ip.to_string()) && q.stdout.contains("a2a0"),
        "resolvectl query bob.a2a should answer {bob_ip} from link a2a0: {q}"
    );
    let link = link_status(&c).unwrap_or_else(|e| panic!("resolvectl status a2a0: {e}"));
    for want in ["100.100.100.100", "~a2a", "-DefaultRoute"] {
        assert!(
            link.contains(want),
            "resolvectl status a2a0 should show {want}: {link}"
        );
    }
    let forwarded = c.ctl(&["status", "--json"]).expect_ok();
    let forwarded: serde_json::Value =
        serde_json::from_str(&forwarded.stdout).expect("status --json");
    let forwarded = forwarded["counters"]["dns_forwarded"]
        .as_u64()
        .expect("counter dns_forwarded");
    assert_other_names(&c, "while up");
    let after: serde_json::Value =
        serde_json::from_str(&c.ctl(&["status", "--json"]).expect_ok().stdout).expect("json");
    assert_eq!(
        after["counters"]["dns_forwarded"].as_u64(),
        Some(forwarded),
        "names outside .a2a must not go through a2ad (routing-only domain ~a2a)"
    );
    // Names of the zone asked only while up went to a2ad alone (before a2a, bob.a2a reached
    // the upstream: the count is no dead letter).
    for name in ["box.a2a", "nosuch.a2a"] {
        assert_eq!(
            asked_upstream(&up_proc, name),
            0,
            "{name} must go to a2ad only, not to the machine's own DNS server, while up"
        );
    }

    // `a2actl down`: the link's settings are reverted and the interface goes.
    c.ctl(&["down"]).expect_ok();
    let took = wait_name(&c, "bob.a2a", None);
    report(format!(
        "bob.a2a stopped resolving {:.1} s after `a2actl down` returned",
        took.as_secs_f64()
    ));
    assert!(link_status(&c).is_err(), "resolved still knows a2a0");
    assert_eq!(overlay_dns_config(&c), Vec::<String>::new());
    assert_other_names(&c, "after down");
    assert!(
        getent(&c, "bob.a2a").is_err(),
        "bob.a2a resolves again after down"
    );

    // Up again, then a crash: SIGKILL, and no restart (a runtime drop-in; the packaged unit
    // says Restart=on-failure). The kernel removes the TUN device and resolved the link.
    assert_eq!(up(&c, &coord.token), box_ip);
    wait_name(&c, "bob.a2a", Some(bob_ip));
    c.exec(&["mkdir", "-p", "/run/systemd/system/a2ad.service.d"])
        .expect_ok();
    c.exec(&[
        "sh",
        "-c",
        "printf '[Service]\\nRestart=no\\n' >/run/systemd/system/a2ad.service.d/no-restart.conf",
    ])
    .expect_ok();
    c.exec(&["systemctl", "daemon-reload"]).expect_ok();
    c.exec(&["systemctl", "kill", "--signal=KILL", "a2ad"])
        .expect_ok();
    wait_for(
        Duration::from_secs(10),
        "a2ad to be dead",
        || match a2ad_state(&c).as_str() {
            "failed" | "inactive" => Ok(()),
            s => Err(s.to_string()),
        },
    );
    let took = wait_name(&c, "bob.a2a", None);
    report(format!(
        "bob.a2a stopped resolving {:.1} s after a2ad was killed",
        took.as_secs_f64()
    ));
    assert!(
        !c.exec(&["ip", "link", "show", "dev", "a2a0"]).success(),
        "the TUN device outlived a2ad"
    );
    assert!(link_status(&c).is_err(), "resolved still knows a2a0");
    assert_eq!(overlay_dns_config(&c), Vec::<String>::new());
    assert_other_names(&c, "after a2ad was killed");
    assert!(
        getent(&c, "bob.a2a").is_err(),
        "bob.a2a resolves again with a2ad dead"
    );

    // Started again, a2ad rejoins its saved network and registers with resolved by itself.
    c.exec(&["systemctl", "start", "a2ad"]).expect_ok();
    wait_name(&c, "bob.a2a", Some(bob_ip));
    assert_other_names(&c, "after the restart");
    report(format!(
        "container ready (root built if it was missing, and booted) in {:.1} s, whole test {:.1} s",
        boot.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    ));
}
