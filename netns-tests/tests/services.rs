//! Services and agent cards, peer to peer: a service added on one member appears on the others
//! (its A2A agent card's skills too, read from a real HTTP server), `rm` and `down` withdraw,
//! with the coordinator killed a new service still appears (the hub is not in the path), the
//! coordinator's wire (tcpdump in its namespace) and its output hold no service name, port or
//! card text, and a hostile member's list (huge, malformed, slow) is refused and counted while
//! the others' lists still arrive, and a caller that is no member gets nothing; DNS-SD (`_a2a._tcp.a2a` PTR, SRV, TXT) answers through a
//! member's resolver. Real binaries over real TUN devices.

use std::fs;
use std::time::{Duration, Instant};

use a2a_netns_tests::{report, require_tools, wait_for, Capture, CoordOpts, Lab, Nat, Node, Proc};

/// Long enough for a list to travel (the poll backstop is 30 s; a change is pushed at once).
const SEEN_TIMEOUT: Duration = Duration::from_secs(20);

const CARD: &str = r#"{
  "name": "Trip Planner Zq7",
  "description": "Plans trips; canary text Xy93kq",
  "url": "http://alice.a2a:9100/",
  "version": "1.0.0",
  "capabilities": {},
  "defaultInputModes": ["text"],
  "defaultOutputModes": ["text"],
  "skills": [
    {"id": "plan-trip", "name": "Plan a trip", "tags": ["travel", "planning"]},
    {"id": "book-hotel", "name": "Book a hotel", "tags": ["travel"]}
  ]
}"#;

/// A hostile service-list server on 0.0.0.0:4747 (it holds the port before the member's a2ad
/// binds it): the first answer is 1 MiB, the next malformed JSON, the next never ends (slow),
/// then a valid-looking list with an invalid name, round and round.
const HOSTILE_PY: &str = r#"
import socket, threading, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 4747))
s.listen(16)
print("ready", flush=True)
n = 0
def serve(c, k):
    try:
        c.recv(2048)
        if k % 4 == 0:
            body = b'{"version":1,"services":[' + b'{"name":"x","port":1,"proto":"tcp"},' * 40000 + b']}'
        elif k % 4 == 1:
            body = b'{"version":1,"services":[{"name":'
        elif k % 4 == 2:
            c.sendall(b"HTTP/1.0 200 OK\r\n\r\n{")
            time.sleep(30)
            return
        else:
            body = b'{"version":1,"services":[{"name":"EVIL NAME","port":1,"proto":"tcp"}]}'
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c, n), daemon=True).start()
    n += 1
"#;

/// A real A2A agent's card endpoint: PyPI's a2a-sdk (`create_agent_card_routes`, the SDK's
/// own `/.well-known/agent-card.json` route, over Starlette and uvicorn). Arguments: PORT.
const SDK_AGENT_PY: &str = include_str!("a2a_sdk_agent.py");

/// The python of the venv `./run-tests` installs a2a-sdk into (`TARGET/a2a-sdk-venv`, or
/// `$A2A_SDK_VENV`); panics naming the package when it is not there.
fn sdk_python() -> String {
    let venv = std::env::var_os("A2A_SDK_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let dir = a2a_netns_tests::Bins::locate().dir;
            dir.parent().unwrap_or(&dir).join("a2a-sdk-venv")
        });
    let python = venv.join("bin/python");
    let ok = std::process::Command::new(&python)
        .args(["-c", "import a2a.server.routes.agent_card_routes, uvicorn"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "this test needs PyPI's a2a-sdk (with the http-server extra) and uvicorn in the venv {}: \
         run ./run-tests, which installs them there, or `python3 -m venv {0} && {0}/bin/pip \
         install 'a2a-sdk[http-server]' uvicorn` (Debian's python3-venv gives python3 -m venv)",
        venv.display()
    );
    python.to_string_lossy().into_owned()
}

/// An "agent" on 0.0.0.0:9103 that accepts connections and never answers.
const SLOW_PY: &str = r#"
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9103))
s.listen(16)
held = []
while True:
    c, _ = s.accept()
    held.append(c)
"#;

/// `a2actl services --json` (with extra args), parsed.
fn services(node: &Node, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["services", "--json"];
    args.extend_from_slice(extra);
    let out = node.ctl(&args);
    assert!(out.success(), "{out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The entry of `node`'s list for service `name` of member `of`.
fn entry(node: &Node, of: &str, name: &str) -> Option<serde_json::Value> {
    services(node, &[])
        .into_iter()
        .find(|s| s["node"] == of && s["name"] == name)
}

/// Waits until `node` lists `of`'s service `name` and `check` accepts it; returns the time taken.
fn wait_listed(
    node: &Node,
    of: &str,
    name: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    let t0 = Instant::now();
    wait_for(
        SEEN_TIMEOUT,
        &format!("{} to list {of}'s service {name}", node.name),
        || match entry(node, of, name) {
            Some(e) if check(&e) => Ok(()),
            got => Err(format!("{got:?}")),
        },
    );
    t0.elapsed()
}

fn wait_unlisted(node: &Node, of: &str, name: &str) -> Duration {
    let t0 = Instant::now();
    wait_for(
        SEEN_TIMEOUT,
        &format!("{} to stop listing {of}'s service {name}", node.name),
        || match entry(node, of, name) {
            None => Ok(()),
            Some(e) => Err(format!("still listed: {e}")),
        },
    );
    t0.elapsed()
}

/// `dig +short @100.100.100.100 ARGS` in `node`'s namespace (its own a2ad's resolver).
fn dig_short(node: &Node, args: &[&str]) -> String {
    let mut full = vec!["dig", "+short", "+time=2", "+tries=1", "@100.100.100.100"];
    full.extend_from_slice(args);
    node.ns.exec_timeout(&full, Duration::from_secs(10)).stdout
}

fn skill_ids(e: &serde_json::Value) -> Vec<String> {
    e["card"]["skills"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|k| k["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A python3 http.server in `node`'s namespace on 0.0.0.0:`port`, serving `card` (raw bytes)
/// as `/.well-known/agent-card.json`.
fn serve_card(lab: &Lab, node: &Node, port: u16, card: &[u8]) -> Proc {
    let dir = lab.dir().join(format!("card-{}-{port}", node.name));
    fs::create_dir_all(dir.join(".well-known")).unwrap();
    fs::write(dir.join(".well-known/agent-card.json"), card).unwrap();
    let p = node.ns.serve_dir("card-server", &dir, port);
    wait_for(Duration::from_secs(10), "the card server", || {
        p.assert_running();
        let out = node.ns.exec(&[
            "python3",
            "-c",
            &format!(
                "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/.well-known/agent-card.json', timeout=2)"
            ),
        ]);
        if out.success() {
            Ok(())
        } else {
            Err(out.to_string())
        }
    });
    p
}

#[test]
fn services_and_cards_travel_peer_to_peer_and_the_hub_sees_none() {
    let Some(lab) = Lab::new("services") else {
        return;
    };
    require_tools(&[
        ("python3", "python3"),
        ("tcpdump", "tcpdump"),
        ("dig", "bind9-dnsutils"),
    ]);
    let coord = lab.coordinator(CoordOpts::default());
    let coord_cap = Capture::start(&coord.ns, "eth0", lab.dir().join("coord-eth0.pcap"));
    let alice = lab.node("alice");
    let bob = lab.node("bob");
    let carol = lab.node("carol");
    for n in [&alice, &bob, &carol] {
        n.up_ok(&coord.token);
    }
    for (n, others) in [
        (&alice, ["bob", "carol"]),
        (&bob, ["alice", "carol"]),
        (&carol, ["alice", "bob"]),
    ] {
        n.wait_peers(&others, a2a_netns_tests::OVERLAY_TIMEOUT);
    }

    // Bad input is refused and loses nothing.
    for bad in [
        &["service", "add", "Bad_Name", "--port", "80"][..],
        &["service", "add", "web", "--port", "0"],
        &["service", "add", "web", "--port", "80", "--proto", "smtp"],
        &[
            "service", "add", "web", "--port", "80", "--path", "no-slash",
        ],
    ] {
        let out = alice.ctl(bad);
        assert!(!out.success(), "{bad:?} should fail: {out}");
    }
    assert!(services(&alice, &[]).is_empty());

    // An A2A agent with a real card (python3's http.server), and one whose card is no JSON.
    let _card = serve_card(&lab, &alice, 9100, CARD.as_bytes());
    let _broken = serve_card(&lab, &alice, 9101, b"<html>not a card</html>");
    alice
        .ctl(&[
            "service", "add", "planner", "--port", "9100", "--proto", "a2a",
        ])
        .expect_ok();
    let t0 = Instant::now();
    let has_card = |e: &serde_json::Value| skill_ids(e) == ["plan-trip", "book-hotel"];
    let on_bob = wait_listed(&bob, "alice", "planner", has_card);
    wait_listed(&carol, "alice", "planner", has_card);
    let every = t0.elapsed();
    report(format!(
        "a new A2A service (card read, then pushed) visible on bob after {:.2} s, on every \
         member after {:.2} s",
        on_bob.as_secs_f64(),
        every.as_secs_f64()
    ));
    let e = entry(&carol, "alice", "planner").unwrap();
    assert_eq!(e["ip"], alice.overlay_ip().to_string());
    assert_eq!(e["port"], 9100);
    assert_eq!(e["proto"], "a2a");
    assert_eq!(e["card"]["name"], "Trip Planner Zq7");
    assert_eq!(e["card"]["skills"][0]["tags"][0], "travel");
    assert_eq!(e["self"], false);
    assert_eq!(entry(&alice, "alice", "planner").unwrap()["self"], true);

    alice
        .ctl(&[
            "service", "add", "broken", "--port", "9101", "--proto", "a2a",
        ])
        .expect_ok();
    alice
        .ctl(&[
            "service", "add", "tools", "--port", "9200", "--proto", "mcp", "--path", "/mcp",
        ])
        .expect_ok();
    let t1 = Instant::now();
    wait_listed(&bob, "alice", "tools", |e| e["path"] == "/mcp");
    let plain = t1.elapsed();
    wait_listed(&bob, "alice", "broken", |e| e["card"].is_null());
    assert!(alice.counter("cards_malformed") >= 1);
    // A card over 64 KiB, and an agent that accepts and never answers: listed without a card,
    // each counted, and the good card still published.
    let mut huge = CARD.trim_end().trim_end_matches('}').to_string();
    huge.push_str(&format!(", \"pad\": \"{}\"}}", "x".repeat(70 * 1024)));
    let _huge = serve_card(&lab, &alice, 9102, huge.as_bytes());
    let _slow = alice.ns.spawn("slow-agent", &["python3", "-c", SLOW_PY]);
    alice
        .ctl(&["service", "add", "huge", "--port", "9102", "--proto", "a2a"])
        .expect_ok();
    alice
        .ctl(&["service", "add", "slow", "--port", "9103", "--proto", "a2a"])
        .expect_ok();
    wait_listed(&bob, "alice", "huge", |e| e["card"].is_null());
    wait_listed(&bob, "alice", "slow", |e| e["card"].is_null());
    wait_for(
        SEEN_TIMEOUT,
        "alice to count the huge and the slow card",
        || {
            let (big, slow) = (
                alice.counter("cards_oversized"),
                alice.counter("cards_unreachable"),
            );
            if big >= 1 && slow >= 1 {
                Ok(())
            } else {
                Err(format!("cards_oversized {big}, cards_unreachable {slow}"))
            }
        },
    );
    alice.assert_daemon_running();
    wait_listed(&bob, "alice", "planner", has_card);
    report(format!(
        "a new service (no card) visible on bob after {:.2} s",
        plain.as_secs_f64()
    ));
    // DNS-SD through bob's resolver: browse, then SRV and TXT of the instance.
    wait_for(SEEN_TIMEOUT, "DNS-SD of alice's services on bob", || {
        let ptr = dig_short(&bob, &["_a2a._tcp.a2a", "PTR"]);
        let srv = dig_short(&bob, &["planner._a2a._tcp.a2a", "SRV"]);
        let txt = dig_short(&bob, &["planner._a2a._tcp.a2a", "TXT"]);
        let mcp = dig_short(&bob, &["tools._mcp._tcp.a2a", "TXT"]);
        if ptr.contains("planner._a2a._tcp.a2a.")
            && srv.contains("0 0 9100 alice.a2a.")
            && txt.contains("skills=plan-trip,book-hotel")
            && mcp.contains("path=/mcp")
        {
            Ok(())
        } else {
            Err(format!(
                "PTR {ptr:?} SRV {srv:?} TXT {txt:?} mcp TXT {mcp:?}"
            ))
        }
    });
    // --skill filters on the card's skill ids.
    let by_skill = services(&bob, &["--skill", "book-hotel"]);
    assert_eq!(by_skill.len(), 1, "{by_skill:?}");
    assert_eq!(by_skill[0]["name"], "planner");
    assert!(services(&bob, &["--skill", "nosuch"]).is_empty());

    // rm withdraws; so does down.
    alice.ctl(&["service", "rm", "tools"]).expect_ok();
    let gone = wait_unlisted(&bob, "alice", "tools");
    report(format!(
        "a removed service gone from bob after {:.2} s",
        gone.as_secs_f64()
    ));
    assert!(!alice.ctl(&["service", "rm", "tools"]).success());
    bob.ctl(&[
        "service", "add", "bobweb", "--port", "8080", "--proto", "http",
    ])
    .expect_ok();
    wait_listed(&carol, "bob", "bobweb", |_| true);
    bob.ctl(&["down"]).expect_ok();
    wait_unlisted(&carol, "bob", "bobweb");
    bob.up_ok(&coord.token);
    assert!(
        services(&bob, &[]).iter().all(|s| s["node"] != "bob"),
        "down forgot bob's services"
    );
    wait_listed(&bob, "alice", "planner", has_card);

    // The hub is not in the path: with the coordinator killed, a new service still appears.
    coord.kill();
    carol
        .ctl(&[
            "service", "add", "late", "--port", "7000", "--proto", "http",
        ])
        .expect_ok();
    let t2 = Instant::now();
    wait_listed(&alice, "carol", "late", |_| true);
    wait_listed(&bob, "carol", "late", |_| true);
    report(format!(
        "with the coordinator killed, a new service visible on every member after {:.2} s",
        t2.elapsed().as_secs_f64()
    ));

    // Nothing of it crossed the coordinator's wire, nor reached its output.
    coord_cap.stop();
    let wire = fs::read(coord_cap.file()).unwrap();
    let output = fs::read_to_string(coord.proc().stdout_path()).unwrap_or_default()
        + &fs::read_to_string(coord.proc().stderr_path()).unwrap_or_default();
    for needle in [
        "planner",
        "bobweb",
        "Trip Planner Zq7",
        "Xy93kq",
        "plan-trip",
        "agent-card",
        "a2a/services",
        "\"port\":9100",
    ] {
        assert!(
            !wire.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle:?} crossed the coordinator's wire"
        );
        assert!(
            !output.contains(needle),
            "{needle:?} in the coordinator's output"
        );
    }
}

#[test]
fn a_hostile_members_list_is_refused_and_counted_while_others_arrive() {
    let Some(lab) = Lab::new("services-hostile") else {
        return;
    };
    require_tools(&[("python3", "python3"), ("curl", "curl")]);
    let coord = lab.coordinator(CoordOpts::default());
    let alice = lab.node("alice");
    let bob = lab.node("bob");
    // mallory is a real member whose service port is held by a hostile server before its a2ad
    // binds it: alice fetches mallory's "list" from that server over the tunnel.
    let mallory = lab.node("mallory");
    let hostile = mallory.ns.spawn("hostile", &["python3", "-c", HOSTILE_PY]);
    wait_for(Duration::from_secs(10), "the hostile server", || {
        hostile.assert_running();
        if hostile.stdout_text().contains("ready") {
            Ok(())
        } else {
            Err("not ready".into())
        }
    });
    for n in [&alice, &bob, &mallory] {
        n.up_ok(&coord.token);
    }
    alice.wait_peers(&["bob", "mallory"], a2a_netns_tests::OVERLAY_TIMEOUT);
    bob.ctl(&["service", "add", "web", "--port", "8080", "--proto", "http"])
        .expect_ok();
    wait_listed(&alice, "bob", "web", |_| true);
    // Each refusal is counted: the huge list, the malformed ones (cut JSON, a bad name), the
    // slow one. (bob fetches from the same server, so which answer alice gets varies.)
    wait_for(
        Duration::from_secs(40),
        "alice to refuse each of mallory's lists",
        || {
            let (big, bad, failed) = (
                alice.counter("services_list_oversized"),
                alice.counter("services_list_malformed"),
                alice.counter("services_fetch_failed"),
            );
            if big >= 1 && bad >= 1 && failed >= 1 {
                Ok(())
            } else {
                Err(format!("oversized {big}, malformed {bad}, failed {failed}"))
            }
        },
    );
    alice.assert_daemon_running();
    assert!(
        services(&alice, &[]).iter().all(|s| s["node"] != "mallory"),
        "a refused list is not listed"
    );
    // Others' lists still arrive.
    bob.ctl(&["service", "add", "api", "--port", "8081", "--proto", "http"])
        .expect_ok();
    wait_listed(&alice, "bob", "api", |_| true);
    // A member reads a list with any HTTP client (curl over the tunnel)...
    let url = format!("http://{}:4747/a2a/services", bob.overlay_ip());
    let out = alice.ns.exec_timeout(
        &["curl", "-sS", "--max-time", "5", &url],
        Duration::from_secs(10),
    );
    assert!(out.success(), "{out}");
    let list: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(list["version"].as_u64().is_some(), "{list}");
    assert_eq!(
        list["services"].as_array().map(|a| a.len()),
        Some(2),
        "{list}"
    );
    // ...but an address no member holds gets nothing: a process on bob's own host, calling
    // from bob's own overlay address, is no member (and is counted).
    let before = bob.counter("services_not_member");
    let out = bob.ns.exec_timeout(
        &["curl", "-sS", "--max-time", "5", &url],
        Duration::from_secs(10),
    );
    assert!(!out.success() && !out.stdout.contains("services"), "{out}");
    assert!(bob.counter("services_not_member") > before);
}

#[test]
fn an_a2a_sdk_agents_card_is_published_with_its_skills() {
    let Some(lab) = Lab::new("services-sdk") else {
        return;
    };
    require_tools(&[("python3", "python3")]);
    let coord = lab.coordinator(CoordOpts::default());
    let alice = lab.node("alice");
    let bob = lab.node("bob");
    let python = sdk_python();
    let agent = alice
        .ns
        .spawn("sdk-agent", &[&python, "-c", SDK_AGENT_PY, "9110"]);
    for n in [&alice, &bob] {
        n.up_ok(&coord.token);
    }
    bob.wait_peers(&["alice"], a2a_netns_tests::OVERLAY_TIMEOUT);
    wait_for(
        Duration::from_secs(30),
        "the a2a-sdk agent to serve its card",
        || {
            agent.assert_running();
            let out = alice.ns.exec(&[
            "python3",
            "-c",
            "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9110/.well-known/agent-card.json', timeout=2)",
        ]);
            if out.success() {
                Ok(())
            } else {
                Err(out.to_string())
            }
        },
    );
    alice
        .ctl(&[
            "service",
            "add",
            "summarizer",
            "--port",
            "9110",
            "--proto",
            "a2a",
        ])
        .expect_ok();
    let took = wait_listed(&bob, "alice", "summarizer", |e| {
        skill_ids(e) == ["summarize"]
    });
    report(format!(
        "an a2a-sdk agent's card visible on the other member after {:.2} s",
        took.as_secs_f64()
    ));
    let e = entry(&bob, "alice", "summarizer").unwrap();
    assert_eq!(e["card"]["name"], "SDK Summarizer Q4");
    assert_eq!(e["card"]["description"], "An agent card served by a2a-sdk");
    assert_eq!(
        e["card"]["skills"][0]["tags"],
        serde_json::json!(["text", "nlp"])
    );
    let by_skill = services(&bob, &["--skill", "summarize"]);
    assert_eq!(by_skill.len(), 1, "{by_skill:?}");
}

/// Paths settle within this (hole punching is given up on after a few rounds).
const PATH_TIMEOUT: Duration = Duration::from_secs(25);

/// How many times `needle` occurs in `hay`.
fn occurrences(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// The datagrams of a recording (`datagram LEN\n` + LEN bytes + `\n`, see
/// `a2a-recording-coordinator`): how many, and their bytes in all.
fn recorded_datagrams(rec: &[u8]) -> (usize, usize) {
    let (mut count, mut bytes, mut at) = (0, 0, 0);
    while at < rec.len() {
        let line_end = rec[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rec.len(), |i| at + i);
        let line = &rec[at..line_end];
        at = line_end + 1;
        if let Some(len) = line
            .strip_prefix(b"datagram ")
            .and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok())
        {
            count += 1;
            bytes += len;
            at += len + 1;
        }
    }
    (count, bytes)
}

/// The issue's proof that the hub learns nothing of the services: a coordinator recording
/// every control message nodes send it (decrypted, as Debug and as JSON) and every datagram
/// (over UDP, and relayed over control connections), with every member relayed through it (two
/// behind endpoint-dependent NATs, relayed over UDP; one without UDP, relayed over TCP), so the
/// service traffic itself crosses the hub. Every member lists the others' services and the
/// agent card, and the recording holds none of their names, ports, paths or card text.
#[test]
fn a_recording_coordinator_sees_no_service_name_port_or_card_text() {
    let Some(lab) = Lab::new("services-recorded") else {
        return;
    };
    require_tools(&[("python3", "python3"), ("curl", "curl")]);
    let coord = lab.coordinator(CoordOpts {
        recording: true,
        ..Default::default()
    });
    let hard1 = lab.router("rtr-hard1", Nat::Hard);
    let hard2 = lab.router("rtr-hard2", Nat::Hard);
    let noudp = lab.router("rtr-noudp", Nat::NoUdp);
    let alice = lab.node_behind(&hard1, "alice");
    let bob = lab.node_behind(&hard2, "bob");
    let carol = lab.node_behind(&noudp, "carol");
    for n in [&alice, &bob, &carol] {
        n.up_ok(&coord.token);
    }
    for (n, others) in [
        (&alice, ["bob", "carol"]),
        (&bob, ["alice", "carol"]),
        (&carol, ["alice", "bob"]),
    ] {
        n.wait_peers(&others, a2a_netns_tests::OVERLAY_TIMEOUT);
    }
    for (a, b) in [
        (&alice, &bob),
        (&bob, &alice),
        (&alice, &carol),
        (&carol, &alice),
        (&bob, &carol),
        (&carol, &bob),
    ] {
        a.wait_path(&b.name, "relay", PATH_TIMEOUT);
    }
    assert_eq!(
        carol.netcheck()["relay"],
        "tcp",
        "carol should relay over TCP"
    );

    let card = r#"{
      "name": "Recorded Agent Vq8",
      "description": "canary description Kj27wz",
      "url": "http://alice.a2a:9431/",
      "version": "1.0.0",
      "capabilities": {},
      "defaultInputModes": ["text"],
      "defaultOutputModes": ["text"],
      "skills": [{"id": "skill-rq5m", "name": "Skill Hh40p", "tags": ["tag-nb2c"]}]
    }"#;
    let _card = serve_card(&lab, &alice, 9431, card.as_bytes());
    alice
        .ctl(&[
            "service",
            "add",
            "svc-zx81q",
            "--port",
            "9431",
            "--proto",
            "a2a",
        ])
        .expect_ok();
    bob.ctl(&[
        "service",
        "add",
        "websvc-mm3k7",
        "--port",
        "9877",
        "--proto",
        "http",
        "--path",
        "/p-yy61t",
    ])
    .expect_ok();
    carol
        .ctl(&[
            "service",
            "add",
            "mcpsvc-tt0p",
            "--port",
            "9533",
            "--proto",
            "mcp",
            "--path",
            "/mcp-ww4",
        ])
        .expect_ok();
    // They are visible on every other member: the test could fail.
    let has_card = |e: &serde_json::Value| {
        skill_ids(e) == ["skill-rq5m"] && e["card"]["description"] == "canary description Kj27wz"
    };
    for n in [&bob, &carol] {
        wait_listed(n, "alice", "svc-zx81q", has_card);
    }
    for n in [&alice, &carol] {
        wait_listed(n, "bob", "websvc-mm3k7", |e| e["path"] == "/p-yy61t");
    }
    for n in [&alice, &bob] {
        wait_listed(n, "carol", "mcpsvc-tt0p", |e| e["port"] == 9533);
    }
    // And a whole list fetched over the relayed path once more, by hand, from the TCP-relayed
    // member (the bytes of its answer crossed the hub too).
    let (_, before) = recorded_datagrams(&coord.recording());
    let url = format!("http://{}:4747/a2a/services", alice.overlay_ip());
    let out = carol.ns.exec_timeout(
        &["curl", "-sS", "--max-time", "10", &url],
        Duration::from_secs(15),
    );
    assert!(out.success() && out.stdout.contains("Kj27wz"), "{out}");
    let list_len = out.stdout.len();
    // (The hub received every datagram before it forwarded it, and recorded it then.)
    let (_, after) = recorded_datagrams(&coord.recording());

    let rec = coord.recording();
    // Not vacuous: the recording holds what the hub does learn (registrations with the
    // members' names, their control messages) and the relayed traffic, in bulk.
    let registers = occurrences(&rec, b"msg Register");
    assert!(registers >= 3, "{registers} registrations recorded");
    for n in [&alice, &bob, &carol] {
        let name = format!("\\\"name\\\":\\\"{}\\\"", n.name);
        assert!(
            occurrences(&rec, name.as_bytes()) > 0,
            "the recording should hold {}'s record ({name})",
            n.name
        );
    }
    let (datagrams, bytes) = recorded_datagrams(&rec);
    report(format!(
        "the recording coordinator recorded {registers} registrations, {datagrams} datagrams \
         ({bytes} bytes; {} while carol fetched alice's {list_len}-byte list) with every \
         member relayed; {} bytes in all",
        after - before,
        rec.len()
    ));
    assert!(
        after - before >= list_len,
        "{} bytes of datagrams recorded while carol fetched alice's {list_len}-byte list through \
         the relay: the list's (encrypted) bytes should be among them",
        after - before
    );
    // None of it is in the recording, in any form the hub could read.
    for needle in [
        "svc-zx81q",
        "websvc-mm3k7",
        "mcpsvc-tt0p",
        "Recorded Agent Vq8",
        "Kj27wz",
        "skill-rq5m",
        "Hh40p",
        "tag-nb2c",
        "/p-yy61t",
        "/mcp-ww4",
        "\"port\":9431",
        "\"port\":9877",
        "\"port\":9533",
        "port: 9431",
        "port: 9877",
        "port: 9533",
        "a2a/services",
        "agent-card",
    ] {
        assert_eq!(
            occurrences(&rec, needle.as_bytes()),
            0,
            "{needle:?} is in the recording coordinator's recording"
        );
    }
}

/// Services over the IPv6 overlay: with every IPv4 packet to or from port 4747 on bob's overlay
/// interface dropped (nftables in bob's namespace), lists still travel both ways between alice
/// and bob (over their IPv6 overlay addresses: the listener serves both families, a fetch tries
/// IPv6 when IPv4 does not connect, the "changed" datagram goes to both), and DNS-SD's SRV
/// target resolves to the AAAA that reaches the list.
#[test]
fn services_travel_over_the_ipv6_overlay_when_ipv4_is_blocked() {
    let Some(lab) = Lab::new("services-ip6") else {
        return;
    };
    require_tools(&[
        ("curl", "curl"),
        ("nft", "nftables"),
        ("dig", "bind9-dnsutils"),
    ]);
    let coord = lab.coordinator(CoordOpts::default());
    let alice = lab.node("alice");
    let bob = lab.node("bob");
    for n in [&alice, &bob] {
        n.up_ok(&coord.token);
    }
    bob.wait_peers(&["alice"], a2a_netns_tests::OVERLAY_TIMEOUT);
    alice.wait_peers(&["bob"], a2a_netns_tests::OVERLAY_TIMEOUT);
    let ip6 = |n: &Node| -> String {
        n.status().raw["self"]["ip6"]
            .as_str()
            .expect("status --json self.ip6")
            .to_string()
    };
    let (alice6, bob6) = (ip6(&alice), ip6(&bob));
    let rules = lab.dir().join("no-v4-services.nft");
    fs::write(
        &rules,
        "table inet a2a_test_v4_services {\n\
         chain input { type filter hook input priority 0; \
         iifname \"a2a0\" meta nfproto ipv4 tcp dport 4747 counter drop; \
         iifname \"a2a0\" meta nfproto ipv4 udp dport 4747 counter drop; }\n\
         chain output { type filter hook output priority 0; \
         oifname \"a2a0\" meta nfproto ipv4 tcp dport 4747 counter drop; \
         oifname \"a2a0\" meta nfproto ipv4 udp dport 4747 counter drop; }\n}\n",
    )
    .unwrap();
    let out = bob.ns.exec(&["nft", "-f", &rules.to_string_lossy()]);
    assert!(out.success(), "nft: {out}");
    // The block holds: IPv4 to alice's list fails from bob, IPv6 works.
    let curl = |url: &str| {
        bob.ns.exec_timeout(
            &["curl", "-sS", "-g", "--max-time", "3", url],
            Duration::from_secs(10),
        )
    };
    let v4 = curl(&format!("http://{}:4747/a2a/services", alice.overlay_ip()));
    assert!(!v4.success(), "IPv4 to port 4747 should be blocked: {v4}");
    let v6 = curl(&format!("http://[{alice6}]:4747/a2a/services"));
    assert!(v6.success() && v6.stdout.contains("\"services\""), "{v6}");

    // Both ways: bob fetches alice's list, alice fetches bob's, each over IPv6 only.
    alice
        .ctl(&[
            "service", "add", "v6web", "--port", "8086", "--proto", "http",
        ])
        .expect_ok();
    let t0 = Instant::now();
    wait_listed(&bob, "alice", "v6web", |e| e["port"] == 8086);
    let took = t0.elapsed();
    bob.ctl(&[
        "service", "add", "v6tools", "--port", "8087", "--proto", "mcp", "--path", "/m",
    ])
    .expect_ok();
    wait_listed(&alice, "bob", "v6tools", |e| e["path"] == "/m");
    report(format!(
        "with IPv4 to the service port blocked, a new service visible on the other member \
         after {:.2} s (over the IPv6 overlay)",
        took.as_secs_f64()
    ));
    let e = entry(&bob, "alice", "v6web").unwrap();
    assert_eq!(e["ip6"], alice6);
    // The rules did drop IPv4 attempts (the fetches and datagrams tried IPv4 first).
    let ruleset = bob
        .ns
        .exec(&["nft", "list", "table", "inet", "a2a_test_v4_services"]);
    let dropped: u64 = ruleset
        .stdout
        .split("packets ")
        .skip(1)
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(dropped > 0, "no IPv4 packet was dropped: {ruleset}");
    // DNS-SD on bob: the instance's SRV target, its AAAA, and the list over it.
    // (The zone takes in the services every second.)
    wait_for(SEEN_TIMEOUT, "DNS-SD of alice's v6web on bob", || {
        let srv = dig_short(&bob, &["v6web._http._tcp.a2a", "SRV"]);
        if srv.contains("0 0 8086 alice.a2a.") {
            Ok(())
        } else {
            Err(format!("SRV {srv:?}"))
        }
    });
    let aaaa = dig_short(&bob, &["alice.a2a", "AAAA"]);
    assert_eq!(aaaa.trim(), alice6, "AAAA of the SRV target");
    let v6 = curl(&format!("http://[{}]:4747/a2a/services", aaaa.trim()));
    assert!(v6.success() && v6.stdout.contains("v6web"), "{v6}");
    // bob's own list over IPv6, from alice (the listener serves the IPv6 address too).
    let out = alice.ns.exec_timeout(
        &[
            "curl",
            "-sS",
            "-g",
            "--max-time",
            "3",
            &format!("http://[{bob6}]:4747/a2a/services"),
        ],
        Duration::from_secs(10),
    );
    assert!(out.success() && out.stdout.contains("v6tools"), "{out}");
    alice.assert_daemon_running();
    bob.assert_daemon_running();
}
