//! `a2ad --userspace`: a node in a "sandbox" namespace, run as an unprivileged user (nobody, no
//! capabilities) in a mount namespace where /dev/net/tun does not exist, next to a TUN-mode
//! peer. Programs in the sandbox reach the peer by name through the SOCKS5 and HTTP proxies;
//! the peer reaches a program in the sandbox through a forward; destinations outside the
//! overlay are refused and counted, not reached. Real binaries, real curl, real python
//! servers; see the crate documentation of `a2a_netns_tests`.

use std::fs;
use std::os::unix::fs::chown;
use std::path::Path;
use std::time::{Duration, Instant};

use a2a_netns_tests::{
    garbage, report, require_tools, wait_for, CoordOpts, Lab, Node, Proc, OVERLAY_TIMEOUT,
};

/// nobody:nogroup on Debian.
const NOBODY: u32 = 65534;
const PEER_PORT: u16 = 8000;
/// The sandbox's local program (loopback only: reachable from members only by the forward).
const LOCAL_PORT: u16 = 9000;
const FORWARD_PORT: u16 = 9999;

/// Runs what follows it as nobody with no capabilities, in a mount namespace whose /dev/net is
/// an empty tmpfs (no TUN device at all).
fn jail() -> Vec<&'static str> {
    vec![
        "unshare",
        "-m",
        "sh",
        "-c",
        "mount -t tmpfs tmpfs /dev/net && exec \"$@\"",
        "jail",
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
    ]
}

fn random_file(path: &Path, len: usize) -> Vec<u8> {
    let mut rng = garbage::Rng::new();
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        let r = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    fs::write(path, &data).expect("write the served file");
    data
}

/// `curl ARGS... -o OUT URL` in `node`'s namespace: the bytes fetched and curl's speed (bytes
/// a second), or curl's error.
fn curl(node: &Node, args: &[&str], url: &str, out: &Path) -> Result<(Vec<u8>, f64), String> {
    let _ = fs::remove_file(out);
    let out_s = out.to_string_lossy().into_owned();
    let mut full = vec![
        "curl",
        "-sS",
        "--max-time",
        "60",
        "-w",
        "%{speed_download}",
        "-o",
        &out_s,
    ];
    full.extend_from_slice(args);
    full.push(url);
    let o = node.ns.exec_timeout(&full, Duration::from_secs(90));
    if !o.success() {
        return Err(o.to_string());
    }
    let speed = o.stdout.trim().parse().unwrap_or(0.0);
    Ok((fs::read(out).map_err(|e| e.to_string())?, speed))
}

fn serve_local(node: &Node, dir: &Path, port: u16) -> Proc {
    let dir = dir.to_string_lossy().into_owned();
    let port_s = port.to_string();
    let p = node.ns.spawn(
        "local-http",
        &[
            "python3",
            "-m",
            "http.server",
            &port_s,
            "--bind",
            "127.0.0.1",
            "--directory",
            &dir,
        ],
    );
    let url = format!("http://127.0.0.1:{port}/");
    wait_for(
        Duration::from_secs(15),
        "the sandbox's local server",
        || {
            p.assert_running();
            let o = node.ns.exec(&["curl", "-sS", "-o", "/dev/null", &url]);
            if o.success() {
                Ok(())
            } else {
                Err(o.to_string())
            }
        },
    );
    p
}

struct World {
    lab: Lab,
    _coord: a2a_netns_tests::Coordinator,
    sandbox: Node,
    bob: Node,
}

/// A coordinator, a TUN-mode `bob` and a userspace `sandbox` (nobody, no /dev/net/tun),
/// joined and seeing each other.
fn world(test: &str) -> Option<World> {
    world_with(test, CoordOpts::default())
}

fn world_with(test: &str, opts: CoordOpts) -> Option<World> {
    let lab = Lab::new(test)?;
    require_tools(&[
        ("curl", "curl"),
        ("python3", "python3"),
        ("setpriv", "util-linux"),
        ("unshare", "util-linux"),
        ("sha256sum", "coreutils"),
    ]);
    let coord = lab.coordinator(opts);
    let bob = lab.node("bob");
    let sandbox = lab.node_without_daemon("sandbox");
    chown(&sandbox.state_dir, Some(NOBODY), Some(NOBODY)).expect("chown the state directory");

    // Without --userspace, a2ad in the jail fails at once, and says what to do.
    let mut plain = jail();
    let daemon = lab.bins().daemon.clone();
    let state = sandbox.state_dir.to_string_lossy().into_owned();
    plain.extend_from_slice(&[daemon.as_str(), "--state-dir", &state]);
    let o = sandbox.ns.exec(&plain);
    assert!(!o.success(), "a2ad without a TUN device should fail: {o}");
    assert!(
        o.stderr.contains("/dev/net/tun") && o.stderr.contains("--userspace"),
        "the error should name the device and propose --userspace: {o}"
    );

    // The proxies' flags without --userspace: refused, saying why.
    let o = sandbox
        .ns
        .exec(&[&daemon, "--state-dir", &state, "--socks5", "127.0.0.1:1081"]);
    assert!(
        !o.success() && o.stderr.contains("--userspace"),
        "--socks5 without --userspace should fail naming it: {o}"
    );

    sandbox.start_daemon_wrapped(&jail(), &["--no-system-dns", "--userspace"]);
    bob.up_ok(&coord.token);
    sandbox.up_ok(&coord.token);
    sandbox.wait_peers(&["bob"], OVERLAY_TIMEOUT);
    bob.wait_peers(&["sandbox"], OVERLAY_TIMEOUT);
    Some(World {
        lab,
        _coord: coord,
        sandbox,
        bob,
    })
}

/// The uid a2ad runs as (the jail's shell execs setpriv, which execs a2ad: the pid is a2ad's).
fn daemon_uid(node: &Node) -> Option<u32> {
    let pid = node.daemon().pid();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

#[test]
fn userspace_node_reaches_members_through_proxies_and_is_reached_through_forwards() {
    let Some(w) = world("userspace") else {
        return;
    };
    let (sandbox, bob) = (&w.sandbox, &w.bob);
    assert_eq!(
        daemon_uid(sandbox),
        Some(NOBODY),
        "a2ad should run as nobody"
    );
    assert!(
        !sandbox.ns.has_link("a2a0"),
        "userspace mode must create no interface"
    );

    // bob serves a file on all its addresses (its wan address too: a leak would reach it).
    let www = w.lab.dir().join("bob-www");
    fs::create_dir_all(&www).unwrap();
    let data = random_file(&www.join("blob"), 3 << 20);
    let _server = bob.ns.serve_dir("files", &www, PEER_PORT);
    let out = w.lab.dir().join("fetched");
    let by_name = format!("http://bob.a2a:{PEER_PORT}/blob");
    wait_for(
        Duration::from_secs(15),
        "bob's server through SOCKS5",
        || {
            curl(
                sandbox,
                &["--socks5-hostname", "127.0.0.1:1080"],
                &by_name,
                &out,
            )
            .map(drop)
        },
    );

    // SOCKS5 with remote name resolution, by name.
    let (got, speed) = curl(
        sandbox,
        &["--socks5-hostname", "127.0.0.1:1080"],
        &by_name,
        &out,
    )
    .expect("curl through SOCKS5 by name");
    assert!(
        got == data,
        "the file through SOCKS5 differs ({} bytes)",
        got.len()
    );
    report(format!(
        "userspace: 3 MiB through SOCKS5 at {:.1} MB/s",
        speed / 1e6
    ));
    // SOCKS5 with an address (curl resolves nothing: the member's overlay address).
    let by_ip = format!("http://{}:{PEER_PORT}/blob", bob.overlay_ip());
    let (got, _) = curl(sandbox, &["--socks5", "127.0.0.1:1080"], &by_ip, &out)
        .expect("curl through SOCKS5 by address");
    assert!(got == data, "the file through SOCKS5 by address differs");
    // The HTTP proxy: a plain request, and CONNECT.
    let (got, _) = curl(
        sandbox,
        &["--proxy", "http://127.0.0.1:3128"],
        &by_name,
        &out,
    )
    .expect("curl through the HTTP proxy");
    assert!(got == data, "the file through the HTTP proxy differs");
    let (got, _) = curl(
        sandbox,
        &["--proxy", "http://127.0.0.1:3128", "--proxytunnel"],
        &by_name,
        &out,
    )
    .expect("curl through the HTTP proxy's CONNECT");
    assert!(got == data, "the file through HTTP CONNECT differs");
    // The member's IPv6 overlay address (the stack holds this node's too), through a server
    // of bob's bound to IPv6.
    let ip6 = bob.ctl(&["ip", "-6"]).expect_ok().stdout.trim().to_string();
    let www_s = www.to_string_lossy().into_owned();
    let _server6 = bob.ns.spawn(
        "files6",
        &[
            "python3",
            "-m",
            "http.server",
            "8001",
            "--bind",
            "::",
            "--directory",
            &www_s,
        ],
    );
    let by_ip6 = format!("http://[{ip6}]:8001/blob");
    wait_for(
        Duration::from_secs(15),
        "bob's IPv6 server through SOCKS5",
        || curl(sandbox, &["--socks5", "127.0.0.1:1080"], &by_ip6, &out).map(drop),
    );
    let (got, _) = curl(sandbox, &["--socks5", "127.0.0.1:1080"], &by_ip6, &out)
        .expect("curl through SOCKS5 to an IPv6 overlay address");
    assert!(got == data, "the file over IPv6 through SOCKS5 differs");
    assert!(sandbox.counter("proxy_connections") >= 5);

    // Outside the overlay: refused, counted, not reached (bob's server answers on its wan
    // address, so a leak would fetch the file).
    let refused = sandbox.counter("proxy_not_allowed");
    let wan = format!("http://{}:{PEER_PORT}/blob", bob.wan_ip());
    let direct = bob.ns.exec(&["curl", "-sS", "-o", "/dev/null", &wan]);
    assert!(
        direct.success(),
        "bob's server should answer on its wan address: {direct}"
    );
    for (args, url) in [
        (&["--socks5-hostname", "127.0.0.1:1080"][..], wan.as_str()),
        (&["--socks5", "127.0.0.1:1080"][..], wan.as_str()),
        (
            &["--socks5-hostname", "127.0.0.1:1080"][..],
            "http://example.com/",
        ),
        (&["--proxy", "http://127.0.0.1:3128"][..], wan.as_str()),
    ] {
        let r = curl(sandbox, args, url, &out);
        match r {
            Err(_) => {}
            // The HTTP proxy answers 403 with its reason (curl -sS without -f succeeds).
            Ok((body, _)) => assert!(
                String::from_utf8_lossy(&body).contains("only members"),
                "{url} through {args:?} was not refused: {} bytes",
                body.len()
            ),
        }
    }
    assert_eq!(sandbox.counter("proxy_not_allowed"), refused + 4);
    // An unknown member's name: refused too.
    assert!(curl(
        sandbox,
        &["--socks5-hostname", "127.0.0.1:1080"],
        "http://nosuch.a2a/",
        &out
    )
    .is_err());

    // Inbound: nothing answers on the sandbox's overlay address until a forward is added.
    let local = w.lab.dir().join("sandbox-www");
    fs::create_dir_all(&local).unwrap();
    let local_data = random_file(&local.join("card.json"), 200_000);
    let _local_server = serve_local(sandbox, &local, LOCAL_PORT);
    let fwd_url = format!("http://{}:{FORWARD_PORT}/card.json", sandbox.overlay_ip());
    let bob_out = w.lab.dir().join("bob-fetched");
    assert!(
        curl(bob, &["--connect-timeout", "5"], &fwd_url, &bob_out).is_err(),
        "the port answered before any forward"
    );
    let to = format!("127.0.0.1:{LOCAL_PORT}");
    let port = FORWARD_PORT.to_string();
    let added = sandbox.ctl(&["forward", "add", &port, "--to", &to]);
    assert!(added.success(), "forward add: {added}");
    let listed = sandbox.ctl(&["forwards"]).expect_ok();
    assert!(
        listed
            .stdout
            .contains(&format!("tcp {FORWARD_PORT} -> {to}")),
        "forwards: {listed}"
    );
    let saved = fs::read_to_string(sandbox.state_dir.join("forwards.json")).expect("forwards.json");
    assert!(saved.contains(&to), "forwards.json: {saved}");
    let (got, _) = curl(bob, &["--connect-timeout", "5"], &fwd_url, &bob_out)
        .expect("bob's curl to the forwarded port");
    assert!(got == local_data, "the file through the forward differs");
    assert!(sandbox.counter("forward_accepted") >= 1);
    // Several at once.
    let t0 = Instant::now();
    let many: Vec<_> = (0..8)
        .map(|i| {
            let out = w.lab.dir().join(format!("bob-fetched-{i}"));
            let out_s = out.to_string_lossy().into_owned();
            bob.ns.spawn(
                &format!("curl-{i}"),
                &["curl", "-sS", "--max-time", "30", "-o", &out_s, &fwd_url],
            )
        })
        .collect();
    for (i, p) in many.iter().enumerate() {
        wait_for(
            Duration::from_secs(40),
            "the parallel fetches",
            || match p.exit_status() {
                Some(s) if s.success() => Ok(()),
                Some(s) => panic!("curl {i} failed ({s:?}): {}", p.stderr_text()),
                None => Err("running".into()),
            },
        );
        let got = fs::read(w.lab.dir().join(format!("bob-fetched-{i}"))).unwrap();
        assert!(got == local_data, "parallel fetch {i} differs");
    }
    report(format!(
        "userspace: 8 parallel fetches through the forward in {:?}",
        t0.elapsed()
    ));
    // The forward is kept across a restart (forwards.json), with the membership.
    sandbox.stop_daemon(libc::SIGTERM);
    sandbox.start_daemon_wrapped(&jail(), &["--no-system-dns", "--userspace"]);
    wait_for(OVERLAY_TIMEOUT, "the forward after a restart", || {
        let (got, _) = curl(bob, &["--connect-timeout", "5"], &fwd_url, &bob_out)?;
        if got == local_data {
            Ok(())
        } else {
            Err(format!("{} bytes differ", got.len()))
        }
    });
    // Removed: refused again.
    sandbox.ctl(&["forward", "rm", &port]).expect_ok();
    assert!(curl(bob, &["--connect-timeout", "5"], &fwd_url, &bob_out).is_err());
    sandbox.assert_daemon_running();
}

#[test]
fn userspace_proxies_bound_bad_and_slow_clients() {
    let Some(w) = world("userspace-bad") else {
        return;
    };
    let sandbox = &w.sandbox;
    let bob = &w.bob;
    let www = w.lab.dir().join("bob-www");
    fs::create_dir_all(&www).unwrap();
    let data = random_file(&www.join("x"), 10_000);
    let _server = bob.ns.serve_dir("files", &www, PEER_PORT);
    let url = format!("http://bob.a2a:{PEER_PORT}/x");
    let out = w.lab.dir().join("fetched");
    wait_for(
        Duration::from_secs(15),
        "bob's server through SOCKS5",
        || {
            curl(
                sandbox,
                &["--socks5-hostname", "127.0.0.1:1080"],
                &url,
                &out,
            )
            .map(drop)
        },
    );
    let malformed = sandbox.counter("proxy_malformed");
    let timeouts = sandbox.counter("proxy_handshake_timeout");
    let over_limit = sandbox.counter("proxy_over_limit");
    // Garbage, huge requests and slow (silent) clients, from inside the sandbox namespace.
    let (sent, silent) = sandbox.ns.run_in(|| {
        use std::io::{Read, Write};
        let mut rng = garbage::Rng::new();
        let mut sent = 0;
        for i in 0..200 {
            let port = if i % 2 == 0 { 1080 } else { 3128 };
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                continue;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut d = garbage::datagram(&mut rng);
            if port == 1080 && !d.is_empty() {
                d[0] = 4; // never a SOCKS5 greeting
            }
            if i % 10 == 1 {
                d = vec![b'A'; 20_000]; // a header far past the limit
            }
            if d.is_empty()
                || (port == 3128 && !d.windows(4).any(|w| w == b"\r\n\r\n") && d.len() < 8192)
            {
                d.extend_from_slice(b"\x00\r\n\r\n");
            }
            if s.write_all(&d).is_ok() {
                sent += 1;
            }
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
        // Slowloris: connections that send half a request and wait, more of them than the
        // limit of connections at once.
        let silent: Vec<_> = (0..140)
            .filter_map(|i| {
                let port = if i % 2 == 0 { 1080 } else { 3128 };
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
                let half: &[u8] = if port == 1080 {
                    &[5, 1]
                } else {
                    b"GET http://bob.a2a/ HTTP/1.1\r\n"
                };
                s.write_all(half).ok()?;
                Some(s)
            })
            .collect();
        (sent, silent)
    });
    assert!(sent >= 150, "only {sent} bad requests sent");
    assert_eq!(silent.len(), 140);
    // Beyond MAX_PROXY_CONNECTIONS (128) at once: closed at once and counted.
    wait_for(Duration::from_secs(5), "connections over the limit", || {
        let n = sandbox.counter("proxy_over_limit") - over_limit;
        if n >= 12 {
            Ok(())
        } else {
            Err(format!("{n} over the limit"))
        }
    });
    wait_for(
        Duration::from_secs(20),
        "slow clients to be timed out",
        || {
            let n = sandbox.counter("proxy_handshake_timeout") - timeouts;
            if n >= 128 {
                Ok(())
            } else {
                Err(format!("{n} timed out"))
            }
        },
    );
    drop(silent);
    let bad = sandbox.counter("proxy_malformed") - malformed;
    assert!(bad >= 150, "only {bad} of {sent} bad requests counted");
    // Still serving.
    let (got, _) = curl(
        sandbox,
        &["--socks5-hostname", "127.0.0.1:1080"],
        &url,
        &out,
    )
    .expect("curl after the garbage");
    assert!(got == data);

    // A flood of connections from a member to a forwarded port: at most the stack's
    // MAX_CONNECTIONS (256, and the few listeners ready when it was reached) are accepted, the
    // rest refused; once they close, the forward serves again.
    let local = w.lab.dir().join("sandbox-www");
    fs::create_dir_all(&local).unwrap();
    let local_data = random_file(&local.join("f"), 1000);
    let _local_server = serve_local(sandbox, &local, LOCAL_PORT);
    let to = format!("127.0.0.1:{LOCAL_PORT}");
    sandbox
        .ctl(&["forward", "add", &FORWARD_PORT.to_string(), "--to", &to])
        .expect_ok();
    let target = std::net::SocketAddr::from((sandbox.overlay_ip(), FORWARD_PORT));
    let held = bob.ns.run_in(move || {
        (0..400)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3)).ok()
            })
            .collect::<Vec<_>>()
    });
    report(format!(
        "userspace: {} of 400 connections to a forwarded port accepted at once",
        held.len()
    ));
    assert!(
        held.len() >= 200 && held.len() <= 256 + 4,
        "{} of 400 connections accepted: the bound is 256",
        held.len()
    );
    sandbox.assert_daemon_running();
    drop(held);
    let fwd_url = format!("http://{}:{FORWARD_PORT}/f", sandbox.overlay_ip());
    let bob_out = w.lab.dir().join("bob-fetched");
    wait_for(
        Duration::from_secs(30),
        "the forward after the flood",
        || {
            let (got, _) = curl(bob, &["--connect-timeout", "3"], &fwd_url, &bob_out)?;
            if got == local_data {
                Ok(())
            } else {
                Err(format!("{} bytes differ", got.len()))
            }
        },
    );
    sandbox.assert_daemon_running();
}

/// An upload sink (python3, port SINK_PORT): answers each PUT or POST with the SHA-256 of its
/// body and its length.
const SINK_PY: &str = r#"
import hashlib, http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_PUT(self):
        n = int(self.headers["Content-Length"])
        h = hashlib.sha256()
        while n > 0:
            b = self.rfile.read(min(n, 1 << 20))
            if not b:
                break
            h.update(b)
            n -= len(b)
        body = ("%s %d\n" % (h.hexdigest(), int(self.headers["Content-Length"]) - n)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_PUT
print("ready", flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", 8002), H).serve_forever()
"#;
const SINK_PORT: u16 = 8002;

/// A TCP echo server (python3) on port ECHO_PORT of every address.
const ECHO_PY: &str = r#"
import socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000))
s.listen(16)
print("ready", flush=True)
def echo(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;
const ECHO_PORT: u16 = 7000;

/// Round trips of 64 bytes on one TCP connection to the echo server at `to` (through the
/// SOCKS5 proxy on 127.0.0.1:1080 first when `socks` names the member), from `node`'s
/// namespace: the median and the 99th percentile, in microseconds.
fn echo_rtt(node: &Node, to: std::net::SocketAddr, socks: Option<&'static str>) -> (u64, u64) {
    node.ns.run_in(move || {
        use std::io::{Read, Write};
        let mut s = match socks {
            None => std::net::TcpStream::connect(to).expect("connect to the echo server"),
            Some(name) => {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", 1080)).expect("SOCKS5");
                let mut req = vec![5, 1, 0, 5, 1, 0, 3, name.len() as u8];
                req.extend_from_slice(name.as_bytes());
                req.extend_from_slice(&to.port().to_be_bytes());
                s.write_all(&req).unwrap();
                let mut reply = [0u8; 12];
                s.read_exact(&mut reply).unwrap();
                assert_eq!(&reply[..2], &[5, 0], "SOCKS5 greeting answer");
                assert_eq!(reply[3], 0, "SOCKS5 CONNECT to {name}: reply {}", reply[3]);
                s
            }
        };
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let msg = [7u8; 64];
        let mut back = [0u8; 64];
        let mut times: Vec<u64> = (0..2000)
            .map(|_| {
                let t = Instant::now();
                s.write_all(&msg).unwrap();
                s.read_exact(&mut back).unwrap();
                t.elapsed().as_micros() as u64
            })
            .collect();
        times.sort_unstable();
        (times[times.len() / 2], times[times.len() * 99 / 100])
    })
}

fn rss_kib(node: &Node) -> u64 {
    let pid = node.daemon().pid();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The median of `curl -w %{time_total}` over `n` fetches of a small file, in milliseconds.
fn median_ms(node: &Node, args: &[&str], url: &str, n: usize) -> f64 {
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            let mut full = vec!["curl", "-sS", "-o", "/dev/null", "-w", "%{time_total}"];
            full.extend_from_slice(args);
            full.push(url);
            let o = node.ns.exec(&full).expect_ok();
            o.stdout.trim().parse::<f64>().expect("curl's time") * 1000.0
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[n / 2]
}

/// 100 MB from a TUN-mode member: to the userspace node through SOCKS5, and to a TUN-mode
/// node, each checked byte for byte; the speeds and request times are reported (no timing
/// asserts).
#[test]
fn userspace_long_download_and_figures_against_tun_mode() {
    let Some(w) = world("userspace-bulk") else {
        return;
    };
    let (sandbox, bob) = (&w.sandbox, &w.bob);
    let carol = w.lab.node("carol");
    let coord_token = w._coord.token.clone();
    carol.up_ok(&coord_token);
    carol.wait_peers(&["bob", "sandbox"], OVERLAY_TIMEOUT);
    // Memory at rest (joined, idle): the userspace node's a2ad and a TUN-mode one.
    report(format!(
        "userspace figures: a2ad RSS at rest {} KiB in userspace mode, {} KiB in TUN mode",
        rss_kib(sandbox),
        rss_kib(&carol)
    ));
    let www = w.lab.dir().join("bob-www");
    fs::create_dir_all(&www).unwrap();
    let data = random_file(&www.join("big"), 100_000_000);
    fs::write(www.join("small"), b"ok\n").unwrap();
    let _server = bob.ns.serve_dir("files", &www, PEER_PORT);
    let socks = ["--socks5-hostname", "127.0.0.1:1080"];
    let small = format!("http://bob.a2a:{PEER_PORT}/small");
    wait_for(
        Duration::from_secs(15),
        "bob's server through SOCKS5",
        || curl(sandbox, &socks, &small, &w.lab.dir().join("s")).map(drop),
    );
    let by_ip = format!("http://{}:{PEER_PORT}", bob.overlay_ip());
    wait_for(Duration::from_secs(15), "bob's server from carol", || {
        curl(
            &carol,
            &[],
            &format!("{by_ip}/small"),
            &w.lab.dir().join("s"),
        )
        .map(drop)
    });

    let out = w.lab.dir().join("big-fetched");
    let (got, us_speed) = curl(
        sandbox,
        &socks,
        &format!("http://bob.a2a:{PEER_PORT}/big"),
        &out,
    )
    .expect("100 MB through the userspace stack");
    assert!(
        got == data,
        "100 MB through SOCKS5 differ ({} bytes)",
        got.len()
    );
    drop(got);
    let (got, tun_speed) =
        curl(&carol, &[], &format!("{by_ip}/big"), &out).expect("100 MB over TUN");
    assert!(got == data, "100 MB over TUN differ");
    drop(got);
    // 100 MB up: through the proxy to bob's sink, which answers the body's SHA-256.
    let sink = bob.ns.spawn("sink", &["python3", "-c", SINK_PY]);
    wait_for(Duration::from_secs(10), "the upload sink", || {
        sink.assert_running();
        if sink.stdout_text().contains("ready") {
            Ok(())
        } else {
            Err("not ready".into())
        }
    });
    let big = www.join("big").to_string_lossy().into_owned();
    let want = sandbox
        .ns
        .exec(&["sha256sum", &big])
        .expect_ok()
        .stdout
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let upload = |node: &Node, args: &[&str], url: &str| -> (String, f64) {
        let ans = w.lab.dir().join(format!("sink-answer-{}", node.name));
        let ans_s = ans.to_string_lossy().into_owned();
        let mut full = vec!["curl", "-sS", "--max-time", "60", "-T", &big];
        full.extend_from_slice(args);
        full.extend_from_slice(&["-w", "%{speed_upload}", "-o", &ans_s, url]);
        let o = node.ns.exec_timeout(&full, Duration::from_secs(90));
        assert!(o.success(), "100 MB upload from {}: {o}", node.name);
        let speed: f64 = o.stdout.trim().parse().unwrap_or(0.0);
        (fs::read_to_string(&ans).unwrap_or_default(), speed)
    };
    let (answer, us_up) = upload(sandbox, &socks, &format!("http://bob.a2a:{SINK_PORT}/up"));
    assert_eq!(
        answer.trim(),
        format!("{want} 100000000"),
        "the sink's SHA-256 and length of the upload through SOCKS5"
    );
    let (answer, tun_up) = upload(
        &carol,
        &[],
        &format!("http://{}:{SINK_PORT}/up", bob.overlay_ip()),
    );
    assert_eq!(
        answer.trim(),
        format!("{want} 100000000"),
        "the sink's SHA-256 and length of the upload over TUN"
    );
    report(format!(
        "userspace figures: 100 MB upload {:.0} Mbit/s through the userspace stack (SOCKS5), \
         {:.0} Mbit/s TUN to TUN",
        us_up * 8.0 / 1e6,
        tun_up * 8.0 / 1e6
    ));
    let echo = bob.ns.spawn("echo", &["python3", "-c", ECHO_PY]);
    wait_for(Duration::from_secs(10), "the echo server", || {
        echo.assert_running();
        if echo.stdout_text().contains("ready") {
            Ok(())
        } else {
            Err("not ready".into())
        }
    });
    let to = std::net::SocketAddr::from((bob.overlay_ip(), ECHO_PORT));
    let (us_p50, us_p99) = echo_rtt(sandbox, to, Some("bob.a2a"));
    let (tun_p50, tun_p99) = echo_rtt(&carol, to, None);
    report(format!(
        "userspace figures: 64-byte TCP round trips on one connection: p50 {us_p50} µs, p99 \
         {us_p99} µs through SOCKS5 and the userspace stack; p50 {tun_p50} µs, p99 {tun_p99} µs \
         TUN to TUN"
    ));
    let us_ms = median_ms(sandbox, &socks, &small, 21);
    let tun_ms = median_ms(&carol, &[], &format!("{by_ip}/small"), 21);
    report(format!(
        "userspace figures: 100 MB download {:.0} Mbit/s through the userspace stack (SOCKS5), \
         {:.0} Mbit/s TUN to TUN; a small GET (connect + request) median {us_ms:.2} ms through \
         SOCKS5, {tun_ms:.2} ms over TUN",
        us_speed * 8.0 / 1e6,
        tun_speed * 8.0 / 1e6
    ));
    sandbox.assert_daemon_running();
}

/// A UDP echo server (python3) on port UDP_ECHO_PORT of every address, IPv4 and IPv6 (or of
/// the one address given after the port): answers
/// each datagram with itself, and `who?` with the sender's address as it saw it.
const UDP_ECHO_PY: &str = r#"
import socket, sys
if len(sys.argv) > 2:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[2], int(sys.argv[1])))
else:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(65535)
    if d == b"who?":
        d = a[0].removeprefix("::ffff:").encode()
    s.sendto(d, a)
"#;
const UDP_ECHO_PORT: u16 = 7001;

/// A SOCKS5 UDP client (python3, RFC 1928 §7) in the sandbox: associations through
/// 127.0.0.1:1080, datagrams to bob by name, IPv4 and IPv6 address, each echoed byte for byte;
/// what must be dropped (a fragment, one byte over what one overlay packet carries, bob's wan
/// address, a name outside `.a2a`, a datagram from another port) gets no answer; the relay
/// closes with the TCP connection; associations beyond the stack's bound are refused. Prints
/// `ok` last; any failure raises.
const SOCKS_UDP_PY: &str = r#"
import os, socket, struct, sys, time
bob4, bob6, wan, me = sys.argv[1:5]
max_assoc, PORT = int(sys.argv[5]), int(sys.argv[6])

def associate():
    t = socket.create_connection(("127.0.0.1", 1080), timeout=5)
    t.sendall(b"\x05\x01\x00")
    assert t.recv(2) == b"\x05\x00", "greeting"
    t.sendall(b"\x05\x03\x00\x01" + bytes(6))
    r = b""
    while len(r) < 10:
        c = t.recv(10 - len(r))
        if not c:
            break
        r += c
    return t, r

def relay_of(r):
    assert r[:4] == b"\x05\x00\x00\x01", "UDP ASSOCIATE reply %r" % r
    return socket.inet_ntoa(r[4:8]), struct.unpack(">H", r[8:10])[0]

def hdr(atyp, addr, port, frag=0):
    if atyp == 1:
        a = socket.inet_aton(addr)
    elif atyp == 4:
        a = socket.inet_pton(socket.AF_INET6, addr)
    else:
        a = bytes([len(addr)]) + addr.encode()
    return b"\x00\x00" + bytes([frag, atyp]) + a + struct.pack(">H", port)

def back_hdr(ip, port):
    if ":" in ip:
        return b"\x00\x00\x00\x04" + socket.inet_pton(socket.AF_INET6, ip) + struct.pack(">H", port)
    return b"\x00\x00\x00\x01" + socket.inet_aton(ip) + struct.pack(">H", port)

t, r = associate()
relay = relay_of(r)
assert relay[0] == "127.0.0.1", "the relay should be on loopback: %r" % (relay,)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect(relay)

def exchange(h, payload, wait=3.0):
    u.settimeout(wait)
    u.send(h + payload)
    try:
        return u.recv(65535)
    except socket.timeout:
        return None

# The member saw the datagram come from this node's overlay address.
got = None
for _ in range(10):
    got = exchange(hdr(3, "bob.a2a", PORT), b"who?", 1.0)
    if got is not None:
        break
assert got == back_hdr(bob4, PORT) + me.encode(), "who? through the relay: %r" % got
sizes = [1, 2, 100, 512, 1000, 1392] + [1 + (i * 97) % 1392 for i in range(60)]
for atyp, addr, back, limit in [(3, "bob.a2a", bob4, 1392), (1, bob4, bob4, 1392), (4, bob6, bob6, 1372)]:
    lost = 0
    for n in sizes:
        n = min(n, limit)
        payload = os.urandom(n)
        got = exchange(hdr(atyp, addr, PORT), payload)
        if got is None:
            lost += 1
            continue
        assert got == back_hdr(back, PORT) + payload, "%d bytes to %s came back as %r" % (n, addr, got[:40])
    # One at a time over veths: nothing is lost once the path is up.
    assert lost == 0, "%d of %d datagrams to %s lost" % (lost, len(sizes), addr)
    print("exchanged", len(sizes) - lost, "datagrams with", addr, flush=True)

# Dropped, not answered: a fragment, one byte over one overlay packet (IPv4 and IPv6),
# outside the overlay (bob's echo server answers on its wan address too), a name outside .a2a.
for what, h, payload in [
    ("a fragment", hdr(1, bob4, PORT, frag=1), b"x"),
    ("1393 bytes", hdr(1, bob4, PORT), os.urandom(1393)),
    ("1373 bytes over IPv6", hdr(4, bob6, PORT), os.urandom(1373)),
    ("bob's wan address", hdr(1, wan, PORT), b"who?"),
    ("a name outside .a2a", hdr(3, "example.com", PORT), b"who?"),
]:
    got = exchange(h, payload, 1.0)
    assert got is None, "%s was answered: %r" % (what, got[:40])
# From another port than the association's client: dropped.
other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
other.settimeout(1.0)
other.sendto(hdr(3, "bob.a2a", PORT) + b"who?", relay)
try:
    got = other.recv(65535)
    raise AssertionError("a datagram from another port was answered: %r" % got)
except socket.timeout:
    pass
# Still working after all that.
assert exchange(hdr(3, "bob.a2a", PORT), b"again") == back_hdr(bob4, PORT) + b"again"

# The association ends with its TCP connection: the relay's port is closed.
t.close()
closed = False
for _ in range(20):
    try:
        u.settimeout(0.5)
        u.send(hdr(3, "bob.a2a", PORT) + b"who?")
        u.recv(65535)
    except ConnectionRefusedError:
        closed = True
        break
    except socket.timeout:
        pass
assert closed, "the relay still took datagrams after its TCP connection closed"

# Bounded: max_assoc at once; one more is refused (general failure) until one ends.
held = [associate() for _ in range(max_assoc)]
for i, (_, r) in enumerate(held):
    relay_of(r)
_, r = associate()
assert r[:2] == b"\x05\x01", "association %d beyond the bound got %r" % (max_assoc + 1, r)
held.pop()[0].close()
ok = None
for _ in range(20):
    time.sleep(0.1)
    _, r = associate()
    if r[:2] == b"\x05\x00":
        ok = r
        break
assert ok is not None, "no association once one ended: %r" % r
print("ok", flush=True)
"#;

/// The stack's bound on UDP sockets (core/netstack.rs MAX_UDP_SOCKETS).
const MAX_UDP_ASSOCIATIONS: usize = 32;

#[test]
fn userspace_socks5_udp_associate_reaches_a_member() {
    let Some(w) = world("userspace-udp") else {
        return;
    };
    let (sandbox, bob) = (&w.sandbox, &w.bob);
    let port = UDP_ECHO_PORT.to_string();
    let echo = bob
        .ns
        .spawn("udp-echo", &["python3", "-c", UDP_ECHO_PY, &port]);
    wait_for(Duration::from_secs(10), "the UDP echo server", || {
        echo.assert_running();
        if echo.stdout_text().contains("ready") {
            Ok(())
        } else {
            Err("not ready".into())
        }
    });
    let ip6 = bob.ctl(&["ip", "-6"]).expect_ok().stdout.trim().to_string();
    let before: Vec<u64> = [
        "proxy_udp_associations",
        "proxy_udp_datagrams",
        "proxy_udp_malformed",
        "proxy_udp_not_allowed",
        "proxy_udp_dropped",
    ]
    .iter()
    .map(|c| sandbox.counter(c))
    .collect();
    let (bob4, wan, me) = (
        bob.overlay_ip().to_string(),
        bob.wan_ip().to_string(),
        sandbox.overlay_ip().to_string(),
    );
    let max = MAX_UDP_ASSOCIATIONS.to_string();
    let t0 = Instant::now();
    let o = sandbox.ns.exec_timeout(
        &[
            "python3",
            "-c",
            SOCKS_UDP_PY,
            &bob4,
            &ip6,
            &wan,
            &me,
            &max,
            &port,
        ],
        Duration::from_secs(180),
    );
    assert!(o.success(), "the SOCKS5 UDP client: {o}");
    assert!(o.stdout.trim_end().ends_with("ok"), "{o}");
    report(format!(
        "userspace: SOCKS5 UDP client done in {:?}: {}",
        t0.elapsed(),
        o.stdout.trim().replace('\n', "; ")
    ));
    let delta = |i: usize, c: &str| sandbox.counter(c) - before[i];
    // One association for the exchanges, the bound's worth, one after one ended.
    assert!(
        delta(0, "proxy_udp_associations") >= (MAX_UDP_ASSOCIATIONS + 2) as u64,
        "associations counted: {}",
        delta(0, "proxy_udp_associations")
    );
    assert!(delta(1, "proxy_udp_datagrams") >= 3 * 60);
    // A fragment, and one byte too many over IPv4 and over IPv6.
    assert_eq!(delta(2, "proxy_udp_malformed"), 3);
    // bob's wan address and example.com.
    assert_eq!(delta(3, "proxy_udp_not_allowed"), 2);
    // The datagram from another port; the ones sent to the closed relay reach nobody.
    assert_eq!(delta(4, "proxy_udp_dropped"), 1);
    // The refused association was counted over the limit.
    assert!(sandbox.counter("proxy_over_limit") >= 1);

    // A UDP forward: bob's datagrams to the sandbox's overlay address reach a program bound to
    // the sandbox's loopback, and its answers come back, for two of bob's sockets at once.
    let local_port = "9001";
    let local_echo = sandbox.ns.spawn(
        "udp-echo-local",
        &["python3", "-c", UDP_ECHO_PY, local_port, "127.0.0.1"],
    );
    wait_for(Duration::from_secs(10), "the sandbox's UDP echo", || {
        local_echo.assert_running();
        if local_echo.stdout_text().contains("ready") {
            Ok(())
        } else {
            Err("not ready".into())
        }
    });
    let me = sandbox.overlay_ip().to_string();
    let fwd_port = "9997";
    let member = |expect: &str| {
        bob.ns.exec_timeout(
            &["python3", "-c", UDP_MEMBER_PY, &me, fwd_port, expect],
            Duration::from_secs(120),
        )
    };
    let o = member("none");
    assert!(o.success(), "UDP to the sandbox before the forward: {o}");
    let to = format!("127.0.0.1:{local_port}");
    sandbox
        .ctl(&["forward", "add", fwd_port, "--to", &to, "--proto", "udp"])
        .expect_ok();
    let listed = sandbox.ctl(&["forwards"]).expect_ok();
    assert!(
        listed.stdout.contains(&format!("udp {fwd_port} -> {to}")),
        "forwards: {listed}"
    );
    let saved = fs::read_to_string(sandbox.state_dir.join("forwards.json")).unwrap();
    assert!(saved.contains("\"udp\""), "forwards.json: {saved}");
    let carried = sandbox.counter("forward_udp_datagrams");
    let dropped = sandbox.counter("forward_udp_dropped");
    let o = member("echo");
    assert!(o.success(), "UDP through the forward: {o}");
    report(format!("userspace: UDP forward: {}", o.stdout.trim()));
    assert!(sandbox.counter("forward_udp_datagrams") - carried >= 121);
    assert_eq!(sandbox.counter("forward_udp_dropped"), dropped);
    // Kept across a restart (forwards.json).
    sandbox.stop_daemon(libc::SIGTERM);
    sandbox.start_daemon_wrapped(&jail(), &["--no-system-dns", "--userspace"]);
    wait_for(OVERLAY_TIMEOUT, "the UDP forward after a restart", || {
        let o = member("echo");
        if o.success() {
            Ok(())
        } else {
            Err(o.to_string())
        }
    });
    sandbox.ctl(&["forward", "rm", fwd_port]).expect_ok();
    let o = member("none");
    assert!(
        o.success(),
        "UDP to the sandbox after the forward's removal: {o}"
    );
    sandbox.assert_daemon_running();
}

/// A member's UDP client (python3, bob's namespace) to IP PORT: with `echo`, two sockets each
/// get their datagrams back byte for byte, and `who?` is answered with the loopback address
/// the sandbox's program saw; with `none`, nothing answers.
const UDP_MEMBER_PY: &str = r#"
import os, socket, sys
ip, port, expect = sys.argv[1], int(sys.argv[2]), sys.argv[3]
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
for s in socks:
    s.connect((ip, port))
def ask(s, payload, wait):
    s.settimeout(wait)
    s.send(payload)
    try:
        return s.recv(65535)
    except (socket.timeout, ConnectionRefusedError):
        return None
if expect == "none":
    got = ask(socks[0], b"who?", 1.0)
    assert got is None, "answered without a forward: %r" % got
    print("no answer")
    sys.exit(0)
got = None
for _ in range(10):
    got = ask(socks[0], b"who?", 1.0)
    if got is not None:
        break
assert got == b"127.0.0.1", "who? through the forward: %r" % got
lost = []
for i in range(60):
    for k, s in enumerate(socks):
        payload = os.urandom(1 + (i * 89) % 1392)
        back = ask(s, payload, 3.0)
        if back is None:
            lost.append("%d bytes (#%d, socket %d)" % (len(payload), i, k))
            continue
        assert back == payload, "%d bytes came back as %d" % (len(payload), len(back))
# One at a time over veths: nothing is lost once the path is up.
assert not lost, "%d of 120 datagrams lost: %s" % (len(lost), lost)
print("%d of 120 datagrams echoed, from two sockets; lost: %s" % (120 - len(lost), lost or "none"))
"#;

/// A refused connection fails within this (a RST from the data plane's policy, not a timeout).
const FAST: Duration = Duration::from_secs(1);

/// `curl` once (5 s at most): whether it fetched, how long it took, its error.
fn attempt(node: &Node, args: &[&str], url: &str) -> (bool, Duration, String) {
    let t0 = Instant::now();
    let mut full = vec![
        "curl",
        "-fsS",
        "-o",
        "/dev/null",
        "--connect-timeout",
        "5",
        "--max-time",
        "5",
    ];
    full.extend_from_slice(args);
    full.push(url);
    let o = node.ns.exec_timeout(&full, Duration::from_secs(15));
    (o.success(), t0.elapsed(), o.stderr.trim().to_string())
}

#[track_caller]
fn assert_refused_fast(node: &Node, args: &[&str], url: &str) -> Duration {
    let (ok, took, err) = attempt(node, args, url);
    assert!(
        !ok,
        "{url} from {} should be refused by the policy",
        node.name
    );
    assert!(
        took < FAST,
        "{url} from {} was refused after {took:?} (a hang, not a RST): {err}",
        node.name
    );
    took
}

fn refused_total(node: &Node) -> u64 {
    let out = node.ctl(&["policy", "show", "--json"]).expect_ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("policy show --json");
    v["refused"]
        .as_object()
        .map(|m| m.values().filter_map(|x| x.as_u64()).sum())
        .unwrap_or(0)
}

/// The policy on the userspace stack: the data plane judges the stack's packets as it judges a
/// TUN device's. bob (a token holder, TUN mode) tags the sandbox `agent` and itself `worker`,
/// and grants agent → worker tcp:8080 and worker → agent tcp:9998 only: through SOCKS5 the
/// sandbox reaches bob's 8080 and fails fast on 9090 (which worked before the policy), and
/// bob reaches the sandbox's forward of 9998 and fails fast on its forward of 9999.
#[test]
fn userspace_node_is_fenced_by_the_policy() {
    let Some(w) = world("userspace-policy") else {
        return;
    };
    let (sandbox, bob) = (&w.sandbox, &w.bob);
    let www = w.lab.dir().join("bob-www");
    fs::create_dir_all(&www).unwrap();
    let data = random_file(&www.join("f"), 100_000);
    let _web8080 = bob.ns.serve_dir("files-8080", &www, 8080);
    let _web9090 = bob.ns.serve_dir("files-9090", &www, 9090);
    let local = w.lab.dir().join("sandbox-www");
    fs::create_dir_all(&local).unwrap();
    let local_data = random_file(&local.join("card.json"), 10_000);
    let _local_server = serve_local(sandbox, &local, LOCAL_PORT);
    let to = format!("127.0.0.1:{LOCAL_PORT}");
    for port in ["9998", "9999"] {
        sandbox
            .ctl(&["forward", "add", port, "--to", &to])
            .expect_ok();
    }
    let socks = ["--socks5-hostname", "127.0.0.1:1080"];
    let out = w.lab.dir().join("fetched");
    let bob_out = w.lab.dir().join("bob-fetched");
    let fwd = |port: u16| format!("http://{}:{port}/card.json", sandbox.overlay_ip());
    // Before any policy: everything reaches everything.
    for port in [8080, 9090] {
        let url = format!("http://bob.a2a:{port}/f");
        wait_for(
            Duration::from_secs(15),
            &format!("bob:{port} before the policy"),
            || match curl(sandbox, &socks, &url, &out) {
                Ok((got, _)) if got == data => Ok(()),
                Ok((got, _)) => Err(format!("{} bytes differ", got.len())),
                Err(e) => Err(e),
            },
        );
    }
    for port in [9998, 9999] {
        let (got, _) =
            curl(bob, &["--connect-timeout", "5"], &fwd(port), &bob_out).unwrap_or_else(|e| {
                panic!("bob -> the sandbox's forward {port} before the policy: {e}")
            });
        assert!(got == local_data, "the forward of {port} differs");
    }

    // bob, a token holder, tags and sets the policy; it reaches the sandbox through the hub.
    bob.ctl(&["tag", "sandbox", "agent"]).expect_ok();
    bob.ctl(&["tag", "bob", "worker"]).expect_ok();
    let policy = w.lab.dir().join("policy.json");
    fs::write(
        &policy,
        r#"{"grants": [
  {"src": ["tag:agent"], "dst": ["tag:worker"], "ports": ["tcp:8080"]},
  {"src": ["tag:worker"], "dst": ["tag:agent"], "ports": ["tcp:9998"]}
]}
"#,
    )
    .unwrap();
    bob.ctl(&["policy", "set", &policy.to_string_lossy()])
        .expect_ok();
    wait_for(Duration::from_secs(20), "the policy on the sandbox", || {
        let out = sandbox.ctl(&["policy", "show", "--json"]).expect_ok();
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        match v["version"].as_u64() {
            Some(1) => Ok(()),
            other => Err(format!("version {other:?}")),
        }
    });
    sandbox
        .ctl(&["policy", "test", "sandbox", "bob", "tcp:9090"])
        .expect_fail();
    let refused = refused_total(sandbox);

    // Through SOCKS5: the granted port works, the other fails fast (the data plane answers the
    // stack's SYN with a RST; the proxy says "connection refused").
    let (got, _) = curl(sandbox, &socks, "http://bob.a2a:8080/f", &out)
        .expect("bob:8080 through SOCKS5 under the policy");
    assert!(got == data, "bob:8080 under the policy differs");
    let took_socks = assert_refused_fast(sandbox, &socks, "http://bob.a2a:9090/f");
    let took_http = assert_refused_fast(
        sandbox,
        &["--proxy", "http://127.0.0.1:3128"],
        "http://bob.a2a:9090/f",
    );
    assert!(
        refused_total(sandbox) > refused,
        "the sandbox counted no refusal"
    );
    // A member to the sandbox's forwards: 9998 is granted, 9999 is not.
    let (got, _) = curl(bob, &["--connect-timeout", "5"], &fwd(9998), &bob_out)
        .expect("bob -> the sandbox's granted forward");
    assert!(got == local_data, "the granted forward differs");
    let took_fwd = assert_refused_fast(bob, &[], &fwd(9999));
    report(format!(
        "userspace policy: refused in {:.0} ms (SOCKS5), {:.0} ms (HTTP proxy), {:.0} ms (a \
         member to a refused forward)",
        took_socks.as_secs_f64() * 1e3,
        took_http.as_secs_f64() * 1e3,
        took_fwd.as_secs_f64() * 1e3
    ));
    sandbox.assert_daemon_running();
}

/// `a2actl services --json` on `node`: the entry for member `of`'s service `name`.
fn listed(node: &Node, of: &str, name: &str) -> Option<serde_json::Value> {
    let out = node.ctl(&["services", "--json"]).expect_ok();
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    all.into_iter()
        .find(|s| s["node"] == of && s["name"] == name)
}

fn policy_version(node: &Node) -> u64 {
    let out = node.ctl(&["policy", "show", "--json"]).expect_ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("policy show --json");
    v["version"].as_u64().unwrap_or(0)
}

/// The member-to-member services on the userspace stack, as on a TUN device: the service
/// lists (port 4747) both ways between the userspace `sandbox` and the TUN-mode `bob`, and the
/// policy's exchange (port 4748) from bob to the sandbox with a hub that withholds every
/// statement (the forging coordinator's `--policy-attack`), so the policy can only pass member
/// to member.
#[test]
fn userspace_node_lists_services_and_takes_the_policy_member_to_member() {
    let Some(w) = world_with(
        "userspace-members",
        CoordOpts {
            forging: true,
            policy_attack: true,
            ..CoordOpts::default()
        },
    ) else {
        return;
    };
    let (sandbox, bob) = (&w.sandbox, &w.bob);
    // a2ad's own ports on the overlay address cannot be forwarded away.
    for port in ["4747", "4748"] {
        let o = sandbox.ctl(&["forward", "add", port, "--to", "127.0.0.1:9000"]);
        assert!(
            !o.success() && o.stderr.contains("a2ad's own"),
            "forward add {port} should be refused: {o}"
        );
    }

    // Service lists, both ways.
    bob.ctl(&["service", "add", "web", "--port", "8080", "--proto", "http"])
        .expect_ok();
    sandbox
        .ctl(&[
            "service", "add", "agent", "--port", "9999", "--proto", "http",
        ])
        .expect_ok();
    let t0 = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "the sandbox to list bob's service",
        || match listed(sandbox, "bob", "web") {
            Some(e) if e["port"] == 8080 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let on_sandbox = t0.elapsed();
    wait_for(
        Duration::from_secs(20),
        "bob to list the sandbox's service",
        || match listed(bob, "sandbox", "agent") {
            Some(e) if e["port"] == 9999 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let on_bob = t0.elapsed();
    let e = listed(bob, "sandbox", "agent").unwrap();
    assert_eq!(e["ip"], sandbox.overlay_ip().to_string());
    assert_eq!(e["self"], false);
    assert!(sandbox.counter("services_fetched") >= 1);
    assert!(bob.counter("services_fetched") >= 1);
    // A change is pushed (the "changed" datagram from the stack), not only polled.
    sandbox
        .ctl(&[
            "service", "add", "tools", "--port", "9200", "--proto", "mcp", "--path", "/mcp",
        ])
        .expect_ok();
    let t1 = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "bob to list the sandbox's new service",
        || match listed(bob, "sandbox", "tools") {
            Some(e) if e["path"] == "/mcp" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    report(format!(
        "userspace services: bob's list on the sandbox after {:.2} s, the sandbox's on bob after {:.2} s, a change on bob after {:.2} s",
        on_sandbox.as_secs_f64(),
        on_bob.as_secs_f64(),
        t1.elapsed().as_secs_f64()
    ));

    // The policy, withheld by the hub: from bob to the sandbox member to member...
    bob.ctl(&["tag", "sandbox", "agent"]).expect_ok();
    bob.ctl(&["tag", "bob", "worker"]).expect_ok();
    let v1 = w.lab.dir().join("v1.json");
    fs::write(
        &v1,
        r#"{"grants": [{"src": ["tag:agent"], "dst": ["tag:worker"], "ports": ["tcp:8080"]}]}"#,
    )
    .unwrap();
    bob.ctl(&["policy", "set", &v1.to_string_lossy()])
        .expect_ok();
    let t2 = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "policy version 1 on the sandbox",
        || match policy_version(sandbox) {
            1 => Ok(()),
            v => Err(format!("version {v}")),
        },
    );
    let to_sandbox = t2.elapsed();
    assert!(
        sandbox.counter("policy_bundles_fetched") >= 1,
        "the sandbox should have fetched the bundle from bob"
    );
    sandbox
        .ctl(&["policy", "test", "sandbox", "bob", "tcp:8080"])
        .expect_ok();
    sandbox
        .ctl(&["policy", "test", "sandbox", "bob", "tcp:9090"])
        .expect_fail();
    report(format!(
        "userspace policy member to member (hub withholding): bob -> sandbox in {:.2} s",
        to_sandbox.as_secs_f64()
    ));
    sandbox.assert_daemon_running();
    w._coord.proc().assert_running();
}

/// `iperf3 -c TO -p PORT -t 5 -J [EXTRA]` from `node`: the receiver's bits a second.
fn iperf3(node: &Node, to: std::net::Ipv4Addr, port: u16, extra: &[&str]) -> f64 {
    let (to, port) = (to.to_string(), port.to_string());
    let mut args = vec!["iperf3", "-c", &to, "-p", &port, "-t", "5", "-J"];
    args.extend_from_slice(extra);
    let o = node.ns.exec_timeout(&args, Duration::from_secs(30));
    assert!(o.success(), "iperf3 from {} to {to}: {o}", node.name);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("iperf3 -J");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("iperf3's received rate")
}

fn wait_ready(p: &Proc, what: &str) {
    wait_for(Duration::from_secs(10), what, || {
        p.assert_running();
        if p.stdout_text().contains("ready") || p.stdout_text().contains("listening") {
            Ok(())
        } else {
            Err("not ready".into())
        }
    });
}

/// The figures of the userspace stack against TUN mode on the same hosts, printed (no timing
/// asserts): single-stream TCP throughput from a TUN-mode member to a forwarded port of the
/// userspace node (whose iperf3 listens on loopback only) and back (`-R`: the stack sends),
/// against the same member to a TUN-mode node; 64-byte round trips through the forward against
/// TUN to TUN; the userspace a2ad's RSS at rest and after the load. Run it with release
/// binaries (`A2A_BIN_DIR=.../release`) for figures worth quoting.
#[test]
fn userspace_figures_iperf3_and_round_trips_through_a_forward() {
    let Some(w) = world("userspace-figures") else {
        return;
    };
    require_tools(&[("iperf3", "iperf3")]);
    let (sandbox, bob) = (&w.sandbox, &w.bob);
    let carol = w.lab.node("carol");
    carol.up_ok(&w._coord.token);
    carol.wait_peers(&["bob", "sandbox"], OVERLAY_TIMEOUT);
    bob.wait_peers(&["carol", "sandbox"], OVERLAY_TIMEOUT);
    let rest = rss_kib(sandbox);
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();

    const IPERF_PORT: u16 = 5201;
    let port = IPERF_PORT.to_string();
    let local = sandbox.ns.spawn(
        "iperf3-local",
        &[
            "iperf3",
            "-s",
            "--forceflush",
            "-B",
            "127.0.0.1",
            "-p",
            &port,
        ],
    );
    wait_ready(&local, "the sandbox's iperf3 on loopback");
    let tun_server = carol.ns.spawn(
        "iperf3-carol",
        &["iperf3", "-s", "--forceflush", "-p", &port],
    );
    wait_ready(&tun_server, "carol's iperf3");
    let to = format!("127.0.0.1:{IPERF_PORT}");
    sandbox
        .ctl(&["forward", "add", &port, "--to", &to])
        .expect_ok();
    let echo_port = ECHO_PORT.to_string();
    let echo_to = format!("127.0.0.1:{ECHO_PORT}");
    sandbox
        .ctl(&["forward", "add", &echo_port, "--to", &echo_to])
        .expect_ok();
    let echo_sandbox = sandbox.ns.spawn("echo-local", &["python3", "-c", ECHO_PY]);
    wait_ready(&echo_sandbox, "the sandbox's echo server");
    let echo_carol = carol.ns.spawn("echo-carol", &["python3", "-c", ECHO_PY]);
    wait_ready(&echo_carol, "carol's echo server");
    // The paths are up (a first short exchange each way) before anything is measured.
    wait_for(
        Duration::from_secs(20),
        "the forward to the sandbox's iperf3",
        || {
            let o = bob.ns.exec_timeout(
                &[
                    "iperf3",
                    "-c",
                    &sandbox.overlay_ip().to_string(),
                    "-p",
                    &port,
                    "-t",
                    "1",
                ],
                Duration::from_secs(15),
            );
            if o.success() {
                Ok(())
            } else {
                Err(o.to_string())
            }
        },
    );

    let up_us = iperf3(bob, sandbox.overlay_ip(), IPERF_PORT, &[]);
    let up_tun = iperf3(bob, carol.overlay_ip(), IPERF_PORT, &[]);
    let down_us = iperf3(bob, sandbox.overlay_ip(), IPERF_PORT, &["-R"]);
    let down_tun = iperf3(bob, carol.overlay_ip(), IPERF_PORT, &["-R"]);
    let (us_p50, us_p99) = echo_rtt(bob, (sandbox.overlay_ip(), ECHO_PORT).into(), None);
    let (tun_p50, tun_p99) = echo_rtt(bob, (carol.overlay_ip(), ECHO_PORT).into(), None);
    let busy = rss_kib(sandbox);
    let mbit = |b: f64| b / 1e6;
    report(format!(
        "userspace figures (load average before: {}): single-stream TCP (iperf3 -t 5) from a \
         TUN-mode member to the userspace node's forward {:.0} Mbit/s, the userspace node \
         sending (-R) {:.0} Mbit/s; the same member to a TUN-mode node {:.0} / {:.0} Mbit/s",
        load.trim(),
        mbit(up_us),
        mbit(down_us),
        mbit(up_tun),
        mbit(down_tun)
    ));
    report(format!(
        "userspace figures: 64-byte TCP round trips through the forward p50 {us_p50} µs, p99 \
         {us_p99} µs; TUN to TUN p50 {tun_p50} µs, p99 {tun_p99} µs (added at p50: {} µs)",
        us_p50 as i64 - tun_p50 as i64
    ));
    report(format!(
        "userspace figures: the userspace a2ad's RSS {rest} KiB at rest, {busy} KiB after the load"
    ));
    sandbox.assert_daemon_running();
}
