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
    let lab = Lab::new(test)?;
    require_tools(&[
        ("curl", "curl"),
        ("python3", "python3"),
        ("setpriv", "util-linux"),
        ("unshare", "util-linux"),
        ("sha256sum", "coreutils"),
    ]);
    let coord = lab.coordinator(CoordOpts::default());
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
