//! A node: a namespace with its a2ad, driven through `a2actl` ([`Node`]).

use std::fmt;
use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::process::{describe_status, tail, Output, Proc};
use crate::services::HttpServer;
use crate::status::Status;
use crate::timing::wait_for;
use crate::topology::{Lab, Ns, Router};

/// How long the overlay may take to do something (peers appearing, a handshake, a rejoin).
pub const OVERLAY_TIMEOUT: Duration = Duration::from_secs(20);
/// The WireGuard UDP port of every node (a2ad's default).
pub const NODE_PORT: u16 = 51820;

/// A node namespace with its a2ad.
pub struct Node {
    pub ns: Ns,
    /// The node name passed to `a2actl up --name`.
    pub name: String,
    pub state_dir: PathBuf,
    daemon: Mutex<Option<Proc>>,
    ip: Mutex<Option<Ipv4Addr>>,
    http: Mutex<Option<HttpServer>>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Node({})", self.name)
    }
}

impl Node {
    pub fn wan_ip(&self) -> Ipv4Addr {
        self.ns.wan_ip.expect("wan address")
    }

    /// Starts a2ad (`--state-dir` only) and waits until `a2actl status` answers.
    pub fn start_daemon(&self) -> Proc {
        self.start_daemon_with(&[])
    }

    /// Starts a2ad with `--state-dir`, `--no-system-dns` (many daemons share the host's
    /// resolver configuration; the names test points a namespace's resolv.conf at a node's
    /// resolver itself) and `extra` arguments, and waits until `a2actl status` answers.
    pub fn start_daemon_with(&self, extra: &[&str]) -> Proc {
        let mut args = vec!["--no-system-dns"];
        args.extend_from_slice(extra);
        self.start_daemon_args(&args)
    }

    /// Starts a2ad with `--state-dir` and exactly `extra` (system DNS integration on unless
    /// `extra` turns it off), and waits until `a2actl status` answers.
    pub fn start_daemon_args(&self, extra: &[&str]) -> Proc {
        self.start_daemon_wrapped(&[], extra)
    }

    /// Starts `WRAPPER... a2ad --state-dir DIR EXTRA...` (a wrapper that drops privileges, say)
    /// and waits until `a2actl status` answers.
    pub fn start_daemon_wrapped(&self, wrapper: &[&str], extra: &[&str]) -> Proc {
        let mut slot = self.daemon.lock().unwrap();
        if let Some(p) = slot.as_ref() {
            assert!(!p.is_running(), "a2ad is already running in {}", self.name);
        }
        let state = self.state_dir.to_string_lossy().into_owned();
        let mut args = wrapper.to_vec();
        args.extend_from_slice(&[self.ns.bins().daemon.as_str(), "--state-dir", &state]);
        args.extend_from_slice(extra);
        let proc = self.ns.spawn("a2ad", &args);
        wait_for(
            Duration::from_secs(15),
            &format!("a2ad in {} to answer `a2actl status`", self.name),
            || {
                if let Some(st) = proc.exit_status() {
                    panic!(
                        "a2ad in {} exited ({}) right after starting\n--- stderr ---\n{}",
                        self.name,
                        describe_status(st),
                        tail(&proc.stderr_text(), 60)
                    );
                }
                let out = self.ctl(&["status", "--json"]);
                if out.success() {
                    Ok(())
                } else {
                    Err(out.to_string())
                }
            },
        );
        *slot = Some(proc.clone());
        proc
    }

    pub fn daemon(&self) -> Proc {
        self.daemon.lock().unwrap().clone().expect("a2ad started")
    }

    #[track_caller]
    pub fn assert_daemon_running(&self) {
        self.daemon().assert_running();
    }

    /// Stops a2ad with `signal` (SIGKILL after 10 s).
    pub fn stop_daemon(&self, signal: i32) {
        self.daemon().stop(signal, Duration::from_secs(10));
    }

    /// `a2actl --state-dir DIR <args>` in the node's namespace.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let state = self.state_dir.to_string_lossy().into_owned();
        let mut full = vec![self.ns.bins().ctl.as_str(), "--state-dir", &state];
        full.extend_from_slice(args);
        self.ns.exec_timeout(&full, Duration::from_secs(90))
    }

    /// `a2actl up --join TOKEN --name NAME`, as is.
    pub fn up(&self, token: &str) -> Output {
        let out = self.ctl(&["up", "--join", token, "--name", &self.name]);
        if out.success() {
            if let Ok(ip) = out.stdout.trim().parse() {
                *self.ip.lock().unwrap() = Some(ip);
            }
        }
        out
    }

    /// `a2actl up` that must succeed and print a bare IPv4 address; returns (and remembers) it.
    #[track_caller]
    pub fn up_ok(&self, token: &str) -> Ipv4Addr {
        let out = self.up(token);
        if !out.success() {
            panic!("`a2actl up` failed on {}: {out}", self.name);
        }
        let ip: Ipv4Addr = out.stdout.trim().parse().unwrap_or_else(|e| {
            panic!(
                "`a2actl up` should print a bare IPv4 address on stdout, got {:?} ({e})",
                out.stdout
            )
        });
        *self.ip.lock().unwrap() = Some(ip);
        ip
    }

    /// The overlay address returned by the last successful [`up_ok`](Self::up_ok).
    pub fn overlay_ip(&self) -> Ipv4Addr {
        self.ip
            .lock()
            .unwrap()
            .unwrap_or_else(|| panic!("{} has not joined (no up_ok)", self.name))
    }

    /// `a2actl ip`, parsed.
    pub fn ctl_ip(&self) -> Result<Ipv4Addr, String> {
        let out = self.ctl(&["ip"]);
        if !out.success() {
            return Err(out.to_string());
        }
        out.stdout
            .trim()
            .parse()
            .map_err(|e| format!("`a2actl ip` printed {:?}: {e}", out.stdout))
    }

    pub fn try_status(&self) -> Result<Status, String> {
        let out = self.ctl(&["status", "--json"]);
        if !out.success() {
            return Err(out.to_string());
        }
        Status::parse(&out.stdout)
    }

    #[track_caller]
    pub fn status(&self) -> Status {
        self.try_status()
            .unwrap_or_else(|e| panic!("`a2actl status --json` on {}: {e}", self.name))
    }

    /// One of a2ad's counters from `a2actl status --json`; panics naming the node if the daemon
    /// has no such counter (a typo in a test must not read as zero).
    pub fn counter(&self, name: &str) -> u64 {
        let st = self.status();
        st.raw["counters"][name].as_u64().unwrap_or_else(|| {
            panic!(
                "{} has no counter {name:?}: {}",
                self.name, st.raw["counters"]
            )
        })
    }

    /// Starts the node's HTTP server (see [`Ns::serve_http`]).
    pub fn serve_http(&self) -> HttpServer {
        let server = self.ns.serve_http();
        *self.http.lock().unwrap() = Some(server.clone());
        server
    }

    pub fn http_server(&self) -> HttpServer {
        self.http
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| panic!("{} serves no HTTP", self.name))
    }

    /// One HTTP GET of `other`'s file over the overlay; checks the body.
    pub fn fetch_from(&self, other: &Node, timeout_s: u32) -> Result<(), String> {
        let server = other.http_server();
        let body = self
            .ns
            .http_get(other.overlay_ip(), server.port, &server.path, timeout_s)?;
        if body == server.body {
            Ok(())
        } else {
            Err(format!(
                "{} got the wrong body from {}: {body:?}",
                self.name, other.name
            ))
        }
    }

    /// Polls [`fetch_from`](Self::fetch_from) until it works; returns how long it took.
    #[track_caller]
    pub fn wait_http(&self, other: &Node, timeout: Duration) -> Duration {
        let start = Instant::now();
        wait_for(
            timeout,
            &format!(
                "HTTP {} -> {} ({})",
                self.name,
                other.name,
                other.overlay_ip()
            ),
            || self.fetch_from(other, 3),
        );
        start.elapsed()
    }

    /// `a2actl netcheck --json`, parsed.
    pub fn netcheck(&self) -> serde_json::Value {
        let out = self.ctl(&["netcheck", "--json"]).expect_ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("netcheck printed no JSON ({e}): {out}"))
    }

    /// `a2actl ping -c count PEER`: for each line, the path and the RTT (None: no answer).
    pub fn ping_peer(&self, peer: &str, count: u32) -> Vec<(String, Option<f64>)> {
        let out = self.ctl(&["ping", "-c", &count.to_string(), peer]);
        out.stdout
            .lines()
            .map(|l| {
                let path = l
                    .split(" via ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or("?")
                    .to_string();
                let rtt = l
                    .strip_suffix(" ms")
                    .and_then(|r| r.rsplit(' ').next())
                    .and_then(|v| v.parse().ok());
                (path, rtt)
            })
            .collect()
    }

    /// The path (`direct`, `relay`, `none`) and endpoint of peer `name` in `status --json`.
    pub fn path_to(&self, name: &str) -> Result<(String, Option<String>), String> {
        let st = self.try_status()?;
        let p = st
            .peer(name)
            .ok_or_else(|| format!("{} does not list {name}", self.name))?;
        Ok((p.path.clone(), p.endpoint.clone()))
    }

    /// Waits until the path to peer `name` is `want`; returns how long that took.
    #[track_caller]
    pub fn wait_path(&self, name: &str, want: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        wait_for(
            timeout,
            &format!("{}'s path to {name} to be {want}", self.name),
            || match self.path_to(name)? {
                (p, _) if p == want => Ok(()),
                (p, e) => Err(format!("path is {p} via {e:?}")),
            },
        );
        start.elapsed()
    }

    /// Waits until the node's status lists exactly the peers named `names` (any path).
    #[track_caller]
    pub fn wait_peers(&self, names: &[&str], timeout: Duration) -> Status {
        self.wait_peer_list(names, timeout, false)
    }

    /// Waits until the peers the coordinator lists (leaving out those a2ad keeps unlisted or
    /// restored, see `PeerView::listing`) are exactly `names`.
    pub fn wait_listed(&self, names: &[&str], timeout: Duration) -> Status {
        self.wait_peer_list(names, timeout, true)
    }

    fn wait_peer_list(&self, names: &[&str], timeout: Duration, listed_only: bool) -> Status {
        let mut want: Vec<&str> = names.to_vec();
        want.sort_unstable();
        wait_for(
            timeout,
            &format!(
                "{} to list peers {want:?}{}",
                self.name,
                if listed_only { " (as listed)" } else { "" }
            ),
            || {
                let st = self.try_status()?;
                let mut got: Vec<&str> = st
                    .peers
                    .iter()
                    .filter(|p| !listed_only || p.listing.is_none())
                    .map(|p| p.name.as_str())
                    .collect();
                got.sort_unstable();
                if got == want {
                    Ok(st.clone())
                } else {
                    Err(format!("peers are {got:?}"))
                }
            },
        )
    }
}

impl Lab {
    /// A node: a new namespace on the wan with a2ad running in it (not joined yet).
    pub fn node(&self, name: &str) -> Node {
        let node = self.node_without_daemon(name);
        node.start_daemon();
        node
    }

    /// A node on the wan with only an IPv6 address (a dual-stack lab), a2ad running.
    pub fn node_v6_only(&self, name: &str) -> Node {
        let ns = self.add_ns_v6_only(name);
        let node = self.node_in(ns, name);
        node.start_daemon();
        node
    }

    /// A node on the wan with only an IPv4 address (in a dual-stack lab too), a2ad running.
    pub fn node_v4_only(&self, name: &str) -> Node {
        let ns = self.add_ns_v4_only(name);
        let node = self.node_in(ns, name);
        node.start_daemon();
        node
    }

    /// A node namespace with a state directory but no daemon started.
    pub fn node_without_daemon(&self, name: &str) -> Node {
        let ns = self.add_ns(name);
        self.node_in(ns, name)
    }

    /// A node in an existing namespace (with a2ad not started).
    fn node_in(&self, ns: Ns, name: &str) -> Node {
        let state_dir = self.dir().join(format!("{name}-state"));
        fs::create_dir_all(&state_dir).expect("create node state dir");
        Node {
            ns,
            name: name.to_string(),
            state_dir,
            daemon: Mutex::new(None),
            ip: Mutex::new(None),
            http: Mutex::new(None),
        }
    }

    /// A node on `router`'s LAN with a2ad running (not joined yet).
    pub fn node_behind(&self, router: &Router, name: &str) -> Node {
        let ns = self.add_ns_behind(router, name);
        let node = self.node_in(ns, name);
        node.start_daemon();
        node
    }
}
