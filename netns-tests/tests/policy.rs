//! Who may reach whom: tags and grants signed with the network key, enforced by every
//! receiving node on decrypted packets and by every sender before the network. A planner, a
//! worker and an untagged member: planner → worker:8080 works, planner → worker:9090 and the
//! untagged member → worker:8080 fail fast (a RST, not a hang), ping only where granted, a
//! policy change takes effect on new and existing flows, bad policies are refused with the
//! line and the problem, an invited `--tag worker` member is a worker from its first packet, a
//! restarted member and a restarted hub keep the policy. And a forging hub (the test hook) that
//! withholds every statement, replays old ones and forges new ones changes nothing: members
//! pass the policy to each other over the overlay, and a member that never got it is still
//! fenced by the receiver. Real binaries over real TUN devices.

use std::fs;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use a2a_netns_tests::{report, require_tools, wait_for, CoordOpts, Lab, Node, Proc};

/// Long enough for a statement to reach every member (it is pushed at once).
const SPREAD_TIMEOUT: Duration = Duration::from_secs(20);
/// A refused connection must fail within this (a RST or ICMP "prohibited", not a timeout).
const FAST: Duration = Duration::from_secs(1);

const POLICY_V1: &str = r#"{
  "grants": [
    {"src": ["tag:planner"], "dst": ["tag:worker"], "ports": ["tcp:8080", "icmp"]}
  ]
}
"#;

const POLICY_V2: &str = r#"{
  "grants": [
    {"src": ["tag:planner"], "dst": ["tag:worker"], "ports": ["tcp:8080", "tcp:9090", "icmp"]}
  ]
}
"#;

fn policy_json(node: &Node) -> serde_json::Value {
    let out = node.ctl(&["policy", "show", "--json"]).expect_ok();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn version(node: &Node) -> u64 {
    policy_json(node)["version"].as_u64().unwrap_or(0)
}

#[track_caller]
fn wait_version(node: &Node, want: u64, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    wait_for(
        timeout,
        &format!("policy version {want} on {}", node.name),
        || match version(node) {
            v if v == want => Ok(()),
            v => Err(format!("version {v}")),
        },
    );
    t0.elapsed()
}

/// One TCP connection attempt from `from` to `ip:port` (curl, 5 s at most): whether an HTTP
/// answer came, and how long it took.
fn connect(from: &Node, ip: Ipv4Addr, port: u16) -> (bool, Duration, String) {
    let t0 = Instant::now();
    let url = format!("http://{ip}:{port}/");
    let out = from.ns.exec_timeout(
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--noproxy",
            "*",
            "--connect-timeout",
            "5",
            "--max-time",
            "5",
            &url,
        ],
        Duration::from_secs(15),
    );
    (out.success(), t0.elapsed(), out.stderr.trim().to_string())
}

#[track_caller]
fn assert_reaches(from: &Node, to: &Node, port: u16) {
    let (ok, took, err) = connect(from, to.overlay_ip(), port);
    assert!(ok, "{} -> {}:{port} should work: {err}", from.name, to.name);
    let _ = took;
}

/// Refused, and fast: the connection attempt ends within [`FAST`].
#[track_caller]
fn assert_refused_fast(from: &Node, to: &Node, port: u16) -> Duration {
    let (ok, took, err) = connect(from, to.overlay_ip(), port);
    assert!(!ok, "{} -> {}:{port} should be refused", from.name, to.name);
    assert!(
        took < FAST,
        "{} -> {}:{port} was refused after {took:?} (not fast: a hang, not a RST): {err}",
        from.name,
        to.name
    );
    took
}

/// A web server on `port` in `node`'s namespace.
fn serve(lab: &Lab, node: &Node, port: u16) -> Proc {
    let dir = lab.dir().join(format!("www-{}-{port}", node.name));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("index.html"), format!("{} {port}\n", node.name)).unwrap();
    let p = node.ns.serve_dir(&format!("http-{port}"), &dir, port);
    wait_for(
        Duration::from_secs(15),
        &format!("the web server on {}:{port}", node.name),
        || {
            node.ns
                .http_get(Ipv4Addr::LOCALHOST, port, "/", 2)
                .map(drop)
        },
    );
    p
}

/// Each of `nodes` joins with `token` and waits until it lists all the others.
fn mesh(token: &str, nodes: &[&Node]) {
    for n in nodes {
        n.up_ok(token);
    }
    for n in nodes {
        let others: Vec<&str> = nodes
            .iter()
            .filter(|o| o.name != n.name)
            .map(|o| o.name.as_str())
            .collect();
        n.wait_peers(&others, a2a_netns_tests::OVERLAY_TIMEOUT);
    }
}

fn refused(node: &Node, reason: &str) -> u64 {
    policy_json(node)["refused"][reason].as_u64().unwrap_or(0)
}

fn write(lab: &Lab, name: &str, text: &str) -> String {
    let path = lab.dir().join(name);
    fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn tags_and_grants_fence_members_and_survive_restarts() {
    let Some(lab) = Lab::new("policy") else {
        return;
    };
    require_tools(&[
        ("python3", "python3"),
        ("curl", "curl"),
        ("ping", "iputils-ping"),
    ]);
    let coord = lab.coordinator(CoordOpts::default());
    let alice = lab.node("alice"); // the planner
    let bob = lab.node("bob"); // the worker
    let carol = lab.node("carol"); // untagged
    mesh(&coord.token, &[&alice, &bob, &carol]);
    let _web8080 = serve(&lab, &bob, 8080);
    let _web9090 = serve(&lab, &bob, 9090);
    let _alice_web = serve(&lab, &alice, 8080);

    // No policy: everything reaches everything (as before policies existed).
    wait_for(
        SPREAD_TIMEOUT,
        "carol -> bob:8080 before any policy",
        || match connect(&carol, bob.overlay_ip(), 8080) {
            (true, ..) => Ok(()),
            (false, _, e) => Err(e),
        },
    );
    assert_eq!(version(&bob), 0);

    // Bad policies are refused with the line and the problem; nothing changes.
    let unknown = write(&lab, "unknown.json", POLICY_V1);
    let out = alice.ctl(&["policy", "set", &unknown]).expect_fail();
    assert!(
        out.stderr.contains("unknown tag `planner`") && out.stderr.contains("line 3"),
        "{out}"
    );
    let broken = write(
        &lab,
        "broken.json",
        "{\"grants\": [\n  {\"src\": [\"*\"],\n}",
    );
    let out = alice.ctl(&["policy", "set", &broken]).expect_fail();
    assert!(out.stderr.contains("line 3"), "{out}");
    let grant = r#"{"src": ["*"], "dst": ["*"], "ports": ["tcp:1"]},"#;
    let many = format!(
        "{{\"grants\": [{}{}]}}",
        grant.repeat(100_000),
        &grant[..grant.len() - 1]
    );
    let out = alice
        .ctl(&["policy", "set", &write(&lab, "many.json", &many)])
        .expect_fail();
    assert!(out.stderr.contains("limit"), "{out}");
    let bad_port = write(
        &lab,
        "port.json",
        r#"{"grants": [{"src": ["*"], "dst": ["*"], "ports": ["tcp:99999"]}]}"#,
    );
    alice.ctl(&["policy", "set", &bad_port]).expect_fail();
    assert_eq!(version(&alice), 0, "a refused policy changes nothing");

    // Tags, then the policy.
    let out = alice.ctl(&["tag", "alice", "planner"]).expect_ok();
    assert!(out.stderr.contains("planner"), "{out}");
    alice.ctl(&["tag", "bob", "worker", "db"]).expect_ok();
    alice.ctl(&["untag", "bob", "db"]).expect_ok();
    alice.ctl(&["tag", "bob", "Bad_Tag"]).expect_fail();
    let v1 = write(&lab, "v1.json", POLICY_V1);
    alice.ctl(&["policy", "set", &v1]).expect_ok();
    let spread = [&bob, &carol].map(|n| wait_version(n, 1, SPREAD_TIMEOUT));
    report(format!(
        "policy version 1 in force on bob after {:.2} s, on carol after {:.2} s",
        spread[0].as_secs_f64(),
        spread[1].as_secs_f64()
    ));
    let whois = bob
        .ctl(&["whois", &alice.overlay_ip().to_string(), "--json"])
        .expect_ok();
    assert!(whois.stdout.contains("planner"), "{whois}");
    wait_for(SPREAD_TIMEOUT, "bob's tags on carol", || {
        let out = carol.ctl(&["status", "--json"]).expect_ok();
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let bob_tags = v["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == "bob"))
            .map(|p| p["tags"].clone());
        if bob_tags == Some(serde_json::json!(["worker"])) {
            Ok(())
        } else {
            Err(format!("{bob_tags:?}"))
        }
    });

    // planner -> worker:8080 works; worker:9090 and the untagged member are refused fast.
    assert_reaches(&alice, &bob, 8080);
    let t1 = assert_refused_fast(&alice, &bob, 9090);
    let t2 = assert_refused_fast(&carol, &bob, 8080);
    // The worker does not call the planner either (no grant that way).
    let t3 = assert_refused_fast(&bob, &alice, 8080);
    report(format!(
        "refused connections failed after {:.0} ms (planner -> worker:9090), {:.0} ms \
         (untagged -> worker:8080), {:.0} ms (worker -> planner:8080)",
        t1.as_secs_f64() * 1000.0,
        t2.as_secs_f64() * 1000.0,
        t3.as_secs_f64() * 1000.0
    ));
    assert!(
        refused(&carol, "outbound") > 0,
        "carol's own node refused it"
    );
    // Ping only where granted.
    assert!(alice.ns.ping(bob.overlay_ip(), 3), "planner pings worker");
    assert!(!carol.ns.ping(bob.overlay_ip(), 3), "untagged does not");
    assert!(
        !bob.ns.ping(alice.overlay_ip(), 3),
        "worker does not ping planner"
    );
    // policy test says why.
    let out = carol
        .ctl(&["policy", "test", "alice", "bob", "tcp:8080"])
        .expect_ok();
    assert!(out.stdout.contains("allowed by grant 1"), "{out}");
    let out = carol.ctl(&["policy", "test", "carol", "bob", "tcp:8080"]);
    assert!(!out.success() && out.stdout.contains("refused"), "{out}");
    let shown = policy_json(&bob);
    assert!(
        shown["grants"][0]["allowed"].as_u64().unwrap_or(0) >= 1,
        "{shown}"
    );

    // An existing flow the new policy refuses stops within seconds: a ping running across
    // the change.
    alice.ctl(&["tag", "carol", "planner"]).expect_ok();
    wait_for(
        SPREAD_TIMEOUT,
        "carol tagged planner on bob",
        || match connect(&carol, bob.overlay_ip(), 8080) {
            (true, ..) => Ok(()),
            (false, _, e) => Err(e),
        },
    );
    let pinger = carol.ns.spawn(
        "ping-across",
        &[
            "ping",
            "-n",
            "-i",
            "0.2",
            "-w",
            "8",
            &bob.overlay_ip().to_string(),
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    alice.ctl(&["untag", "carol", "planner"]).expect_ok();
    wait_for(
        Duration::from_secs(15),
        "the ping across the change to end",
        || {
            if pinger.is_running() {
                Err("running".into())
            } else {
                Ok(())
            }
        },
    );
    let text = pinger.stdout_text();
    let received: u32 = text
        .split(", ")
        .find_map(|p| p.strip_suffix(" received").and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    let sent: u32 = text
        .split(" packets transmitted")
        .next()
        .and_then(|l| l.rsplit('\n').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    // Answered before the change; after it, carol's own node answers the next echo with
    // ICMP "administratively prohibited" (ping prints "Packet filtered" and, under -w, ends).
    assert!(
        received > 0 && received < sent && text.contains("Packet filtered"),
        "the ping across the change should be cut within seconds: {received} of {sent}:\n{text}"
    );

    // A policy change applies at once.
    let v2 = write(&lab, "v2.json", POLICY_V2);
    alice.ctl(&["policy", "set", &v2]).expect_ok();
    wait_version(&bob, 2, SPREAD_TIMEOUT);
    assert_reaches(&alice, &bob, 9090);

    // An invited member with --tag worker is a worker from its first packet.
    let code = alice
        .ctl(&["invite", "--tag", "worker", "--ttl", "10m"])
        .expect_ok()
        .stdout
        .trim()
        .to_string();
    let dave = lab.node("dave");
    dave.up_ok(&code);
    let _dave_web = serve(&lab, &dave, 8080);
    alice.wait_peers(&["bob", "carol", "dave"], a2a_netns_tests::OVERLAY_TIMEOUT);
    assert_reaches(&alice, &dave, 8080);
    assert_refused_fast(&carol, &dave, 8080);
    // An invited member holds no network key: it cannot set the policy or tags.
    let out = dave.ctl(&["policy", "set", &v1]).expect_fail();
    assert!(out.stderr.contains("invite"), "{out}");
    dave.ctl(&["tag", "dave", "planner"]).expect_fail();

    // A restarted member keeps the policy (from its state directory, before any coordinator).
    coord.kill();
    bob.stop_daemon(libc::SIGTERM);
    bob.start_daemon();
    // (Within seconds: the session resumes from the state directory, no coordinator up.)
    wait_version(&bob, 2, Duration::from_secs(5));
    // The hub restarted holds no policy; members keep theirs and hand it over again.
    coord.restart();
    bob.wait_peers(
        &["alice", "carol", "dave"],
        a2a_netns_tests::OVERLAY_TIMEOUT,
    );
    assert_reaches(&alice, &bob, 9090);
    assert_refused_fast(&carol, &bob, 8080);
    let erin = lab.node("erin");
    erin.up_ok(&coord.token);
    wait_version(&erin, 2, SPREAD_TIMEOUT);
}

#[test]
fn a_forging_hub_that_withholds_replays_or_forges_the_policy_changes_nothing() {
    let Some(lab) = Lab::new("policy-forge") else {
        return;
    };
    require_tools(&[
        ("python3", "python3"),
        ("curl", "curl"),
        ("nft", "nftables"),
    ]);
    let coord = lab.coordinator(CoordOpts {
        forging: true,
        policy_attack: true,
        ..CoordOpts::default()
    });
    let alice = lab.node("alice");
    let bob = lab.node("bob");
    let carol = lab.node("carol");
    // Carol never hears from the other members about the policy (its policy port is closed
    // on the overlay), and the hub withholds it: carol enforces nothing, bob must.
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
    let path = write(&lab, "fence.nft", rules);
    carol.ns.exec(&["nft", "-f", &path]).expect_ok();
    mesh(&coord.token, &[&alice, &bob, &carol]);
    let _web8080 = serve(&lab, &bob, 8080);
    let _web9090 = serve(&lab, &bob, 9090);

    alice.ctl(&["tag", "alice", "planner"]).expect_ok();
    alice.ctl(&["tag", "bob", "worker"]).expect_ok();
    alice
        .ctl(&["policy", "set", &write(&lab, "v1.json", POLICY_V1)])
        .expect_ok();
    // Withheld by the hub, the policy reaches bob from alice over the overlay.
    let took = wait_version(&bob, 1, SPREAD_TIMEOUT);
    report(format!(
        "with the hub withholding it, policy version 1 reached bob member to member in {:.2} s",
        took.as_secs_f64()
    ));
    alice
        .ctl(&["policy", "set", &write(&lab, "v2.json", POLICY_V2)])
        .expect_ok();
    wait_version(&bob, 2, SPREAD_TIMEOUT);
    assert_eq!(version(&carol), 0, "carol is fenced off from the policy");
    assert_reaches(&alice, &bob, 9090);
    // Carol's node enforces nothing, so its SYN crosses the network: bob's node refuses it
    // before its TUN device, with a RST.
    let before = refused(&bob, "no_grant");
    assert_refused_fast(&carol, &bob, 8080);
    assert!(
        refused(&bob, "no_grant") > before,
        "the receiver refused it"
    );

    // Bob restarts: at registration the hub hands it the old policy again (a replay), a
    // forged policy opening everything and forged tags; bob keeps version 2.
    bob.stop_daemon(libc::SIGTERM);
    bob.start_daemon();
    bob.wait_peers(&["alice", "carol"], a2a_netns_tests::OVERLAY_TIMEOUT);
    wait_for(
        SPREAD_TIMEOUT,
        "the forged statements refused on bob",
        || match bob.counter("policy_statements_refused") {
            0 => Err("none yet".into()),
            _ => Ok(()),
        },
    );
    assert_eq!(version(&bob), 2);
    assert_reaches(&alice, &bob, 9090);
    assert_refused_fast(&carol, &bob, 8080);
    // The forged tags (planner and worker, handed to bob) made bob no planner.
    let out = bob.ctl(&["policy", "test", "bob", "alice", "tcp:8080"]);
    assert!(!out.success(), "{out}");
    let out = bob.ctl(&["policy", "test", "carol", "bob", "tcp:8080"]);
    assert!(!out.success(), "{out}");
    coord.proc().assert_running();
}
