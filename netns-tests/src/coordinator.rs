//! A coordinator in its namespace ([`Coordinator`], started with [`CoordOpts`]).

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use crate::process::{
    describe_status, kill_children, require_tool, tail, traced_file_writes, Proc, TRACE_FILE_CALLS,
};
use crate::timing::{wait_for, wait_until};
use crate::topology::{Lab, Ns};

/// The overlay prefix a coordinator uses when it is given no `--prefix`.
pub const DEFAULT_PREFIX: &str = "100.64.0.0/10";
/// The port coordinators listen on (TCP and UDP).
pub const COORDINATOR_PORT: u16 = 7600;

/// How to start a coordinator.
#[derive(Debug, Clone, Default)]
pub struct CoordOpts {
    /// `--prefix`.
    pub prefix: Option<String>,
    /// Listen on `0.0.0.0` and pass the wan address as `--endpoint`.
    pub wildcard_listen: bool,
    /// Listen on `[::]` (IPv4 and IPv6 on one port; a dual-stack lab) and pass the wan IPv4
    /// and IPv6 addresses as `--endpoint A,[B]`.
    pub dual_stack: bool,
    /// Run the forging coordinator (`a2a-forging-coordinator`, the real server with a hook that
    /// injects forged members) instead of `a2a-coordinator`.
    pub forging: bool,
    /// With `forging`: `--policy-attack` (withhold policy and tag statements, replay old
    /// ones, forge new ones).
    pub policy_attack: bool,
    /// Run the recording coordinator (`a2a-recording-coordinator`, the real server with a hook
    /// that records every control message and datagram nodes send it) instead;
    /// [`Coordinator::recording`] reads what it recorded.
    pub recording: bool,
    /// `--stats-interval SECS` (hidden): print the counters line this often (default 60 s);
    /// [`Coordinator::counters`] reads the latest.
    pub stats_interval: Option<u32>,
    /// `--metrics ADDR`: serve Prometheus metrics there (in the coordinator's namespace);
    /// [`Coordinator::scrape`] reads them.
    pub metrics: Option<String>,
    /// `--fanout-window-ms MS` (hidden): how long member changes are gathered (0: one message
    /// per change).
    pub fanout_window_ms: Option<u32>,
    /// `--endpoint A,B,…` (a cluster's: every coordinator's address), listening on the wan
    /// address.
    pub endpoints: Vec<String>,
    /// `--nats URL,…`: join a cluster over these NATS servers.
    pub nats: Vec<String>,
    /// `--nats-credentials FILE`.
    pub nats_credentials: Option<PathBuf>,
    /// `--nats-ca FILE`.
    pub nats_ca: Option<PathBuf>,
    /// `--nats-cert FILE --nats-key FILE`.
    pub nats_client_cert: Option<(PathBuf, PathBuf)>,
    /// Copied into the state directory as `coordinator.key` before the first start: the
    /// cluster's shared identity.
    pub key_from: Option<PathBuf>,
    /// Run under `strace -f` of its file-system calls, from the start (every run appends to
    /// [`Coordinator::trace_path`]); [`Coordinator::file_writes`] reads what it wrote.
    pub strace: bool,
}

/// A coordinator process in its namespace.
pub struct Coordinator {
    pub ns: Ns,
    /// The wan address it serves on (TCP and UDP).
    pub addr: SocketAddrV4,
    pub state_dir: PathBuf,
    /// The token printed at the first start.
    pub token: String,
    pub opts: CoordOpts,
    proc: Mutex<Option<Proc>>,
}

impl Coordinator {
    fn args(&self) -> Vec<String> {
        let bins = self.ns.bins();
        // At its most verbose level, so the zero-log checks read everything it can print.
        let binary = if self.opts.forging {
            bins.dir
                .join("a2a-forging-coordinator")
                .to_string_lossy()
                .into_owned()
        } else if self.opts.recording {
            bins.dir
                .join("a2a-recording-coordinator")
                .to_string_lossy()
                .into_owned()
        } else {
            bins.coordinator.clone()
        };
        let mut args = vec!["env".into(), "A2A_LOG=trace".into()];
        if self.opts.strace {
            args.extend(
                [
                    "strace",
                    "-f",
                    "-A",
                    "--seccomp-bpf",
                    "-qq",
                    "-o",
                    &self.trace_path().to_string_lossy(),
                    "-e",
                    TRACE_FILE_CALLS,
                    "--",
                ]
                .map(String::from),
            );
        }
        args.push(binary);
        if self.opts.dual_stack {
            let v6 = self
                .ns
                .wan_ip6
                .expect("a dual-stack coordinator needs a dual-stack lab");
            args.push("--listen".into());
            args.push(format!("[::]:{COORDINATOR_PORT}"));
            args.push("--endpoint".into());
            args.push(format!("{},[{v6}]:{COORDINATOR_PORT}", self.addr));
        } else if self.opts.wildcard_listen {
            args.push("--listen".into());
            args.push(format!("0.0.0.0:{COORDINATOR_PORT}"));
            args.push("--endpoint".into());
            args.push(self.addr.to_string());
        } else {
            args.push("--listen".into());
            args.push(self.addr.to_string());
            if !self.opts.endpoints.is_empty() {
                args.push("--endpoint".into());
                args.push(self.opts.endpoints.join(","));
            }
        }
        if !self.opts.nats.is_empty() {
            args.push("--nats".into());
            args.push(self.opts.nats.join(","));
        }
        if let Some(f) = &self.opts.nats_credentials {
            args.push("--nats-credentials".into());
            args.push(f.to_string_lossy().into_owned());
        }
        if let Some(f) = &self.opts.nats_ca {
            args.push("--nats-ca".into());
            args.push(f.to_string_lossy().into_owned());
        }
        if let Some((cert, key)) = &self.opts.nats_client_cert {
            args.push("--nats-cert".into());
            args.push(cert.to_string_lossy().into_owned());
            args.push("--nats-key".into());
            args.push(key.to_string_lossy().into_owned());
        }
        args.push("--state-dir".into());
        args.push(self.state_dir.to_string_lossy().into_owned());
        if self.opts.policy_attack {
            args.push("--policy-attack".into());
        }
        if self.opts.recording {
            args.push("--record".into());
            args.push(self.recording_path().to_string_lossy().into_owned());
        }
        if let Some(p) = &self.opts.prefix {
            args.push("--prefix".into());
            args.push(p.clone());
        }
        if let Some(secs) = self.opts.stats_interval {
            args.push("--stats-interval".into());
            args.push(secs.to_string());
        }
        if let Some(addr) = &self.opts.metrics {
            args.push("--metrics".into());
            args.push(addr.clone());
        }
        if let Some(ms) = self.opts.fanout_window_ms {
            args.push("--fanout-window-ms".into());
            args.push(ms.to_string());
        }
        args
    }

    /// Where strace writes its trace ([`CoordOpts::strace`]): `ROLE.strace` beside the state
    /// directory.
    pub fn trace_path(&self) -> PathBuf {
        self.state_dir
            .with_file_name(format!("{}.strace", self.ns.role))
    }

    /// The lines of its file-system trace ([`CoordOpts::strace`], every run so far) that open
    /// a file for writing or change one, but for the creation of its own identity key
    /// (`O_CREAT|O_EXCL` of `STATE_DIR/coordinator.key`): none is allowed (zero-log).
    pub fn file_writes(&self) -> Vec<String> {
        assert!(
            self.opts.strace,
            "the coordinator does not run under strace"
        );
        let text = fs::read_to_string(self.trace_path()).expect("read the coordinator's trace");
        let key = format!("\"{}\"", self.state_dir.join("coordinator.key").display());
        traced_file_writes(&text)
            .into_iter()
            .filter(|l| !(l.contains(&key) && l.contains("O_CREAT") && l.contains("O_EXCL")))
            .collect()
    }

    /// Where the recording coordinator ([`CoordOpts::recording`]) records.
    pub fn recording_path(&self) -> PathBuf {
        self.state_dir.join("recording.bin")
    }

    /// What the recording coordinator recorded so far (see `a2a-recording-coordinator`).
    pub fn recording(&self) -> Vec<u8> {
        assert!(self.opts.recording, "not a recording coordinator");
        fs::read(self.recording_path()).unwrap_or_default()
    }

    /// The counters of the latest counters line the coordinator printed (`name=value` pairs of
    /// its `live members=...` line), or `None` before the first one.
    pub fn counters(&self) -> Option<BTreeMap<String, u64>> {
        let log = self.proc().stderr_text();
        let line = log.lines().rev().find(|l| l.contains("live members="))?;
        let start = line.find("live members=")?;
        Some(
            line[start + "live ".len()..]
                .split_whitespace()
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect(),
        )
    }

    /// Waits for a counters line printed after this call (needs `stats_interval`) and returns
    /// its counters.
    #[track_caller]
    pub fn fresh_counters(&self) -> BTreeMap<String, u64> {
        let lines = |p: &Proc| {
            p.stderr_text()
                .lines()
                .filter(|l| l.contains("live members="))
                .count()
        };
        let proc = self.proc();
        let before = lines(&proc);
        wait_until(
            Duration::from_secs(30),
            "a new counters line from the coordinator (is stats_interval set?)",
            || lines(&proc) > before,
        );
        self.counters().expect("a counters line")
    }

    /// `GET /metrics` from the address given as [`CoordOpts::metrics`], from the coordinator's
    /// own namespace: the Prometheus text.
    #[track_caller]
    pub fn scrape(&self) -> String {
        let addr = self
            .opts
            .metrics
            .as_deref()
            .expect("the coordinator was started with CoordOpts::metrics");
        scrape_metrics(&self.ns, addr)
    }

    /// Starts the process and returns the token it prints.
    fn start(&self) -> String {
        let mut slot = self.proc.lock().unwrap();
        if let Some(p) = slot.as_ref() {
            assert!(!p.is_running(), "the coordinator is already running");
        }
        let args = self.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = self.ns.spawn("coordinator", &args);
        let token = wait_for(
            Duration::from_secs(20),
            "the coordinator's `join token:` line",
            || {
                if let Some(st) = proc.exit_status() {
                    panic!(
                        "a2a-coordinator exited ({}) before printing its token\n--- stderr ---\n{}",
                        describe_status(st),
                        tail(&proc.stderr_text(), 60)
                    );
                }
                let stdout = proc.stdout_text();
                for line in stdout.lines() {
                    if let Some(t) = line.strip_prefix("join token: ") {
                        let t = t.trim();
                        assert!(
                            t.starts_with("a2a1"),
                            "the coordinator's token does not start with a2a1: {line:?}"
                        );
                        return Ok(t.to_string());
                    }
                }
                Err(format!("stdout so far: {stdout:?}"))
            },
        );
        *slot = Some(proc);
        token
    }

    pub fn proc(&self) -> Proc {
        self.proc
            .lock()
            .unwrap()
            .clone()
            .expect("coordinator started")
    }

    #[track_caller]
    pub fn assert_running(&self) {
        self.proc().assert_running();
    }

    /// SIGKILL (of the coordinator itself first when it runs under strace: strace killed
    /// alone would let it run on).
    pub fn kill(&self) {
        let proc = self.proc();
        if self.opts.strace {
            kill_children(proc.pid());
        }
        proc.kill();
    }

    /// Starts it again (same state directory and address) after [`kill`](Self::kill); returns
    /// the token it prints.
    pub fn restart(&self) -> String {
        self.start()
    }

    /// `a2a-coordinator token --state-dir DIR --endpoint ADDR [--prefix P]`: a token for another
    /// new network.
    pub fn new_token(&self) -> String {
        self.token_for(&[self.addr.to_string()])
    }

    /// `a2a-coordinator token` with the given `--endpoint`s (and the coordinator's `--prefix`).
    pub fn token_for(&self, endpoints: &[String]) -> String {
        let state = self.state_dir.to_string_lossy().into_owned();
        let bins = self.ns.bins();
        let mut args = vec![bins.coordinator.as_str(), "token", "--state-dir", &state];
        for e in endpoints {
            args.push("--endpoint");
            args.push(e);
        }
        if let Some(p) = &self.opts.prefix {
            args.push("--prefix");
            args.push(p);
        }
        let out = self.ns.exec(&args).expect_ok();
        let lines: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(
            lines.len() == 1 && lines[0].trim().starts_with("a2a1"),
            "`a2a-coordinator token` should print exactly one token line: {out}"
        );
        lines[0].trim().to_string()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        // The lab kills what it started (strace); the tracee must not outlive it.
        if self.opts.strace {
            if let Some(p) = self.proc.lock().unwrap().as_ref() {
                kill_children(p.pid());
            }
        }
    }
}

/// A counter of a coordinator's metrics (`a2a_coordinator_NAME_total`); the coordinator was
/// started with [`CoordOpts::metrics`].
#[track_caller]
pub fn coordinator_counter(c: &Coordinator, name: &str) -> u64 {
    let text = c.scrape();
    metric(&text, &format!("a2a_coordinator_{name}_total"))
        .unwrap_or_else(|| panic!("no {name} in the metrics:\n{text}"))
}

/// `GET http://ADDR/metrics` with curl in `ns`; panics unless it answers 200.
#[track_caller]
pub fn scrape_metrics(ns: &Ns, addr: &str) -> String {
    require_tool("curl", "curl");
    let url = format!("http://{addr}/metrics");
    let out = ns.exec(&["curl", "-sSf", "--max-time", "5", &url]);
    assert!(out.success(), "scraping {url} failed: {out}");
    out.stdout
}

/// The value of the unlabelled sample `name` in Prometheus text (`None` when it is missing).
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

impl Lab {
    /// Starts a coordinator in a new namespace `coord` and waits for its join token.
    pub fn coordinator(&self, opts: CoordOpts) -> Coordinator {
        self.coordinator_in(self.add_ns("coord"), opts)
    }

    /// Starts a coordinator in `ns` (made with [`Lab::add_ns`], so that its address is known
    /// before it starts: a cluster's coordinators name each other in `--endpoint`), with its
    /// state directory `ROLE-state`, and waits for its join token.
    pub fn coordinator_in(&self, ns: Ns, opts: CoordOpts) -> Coordinator {
        let ip = ns.wan_ip.expect("wan address");
        let state_dir = self.dir().join(format!("{}-state", ns.role));
        fs::create_dir_all(&state_dir).expect("create coordinator state dir");
        if let Some(key) = &opts.key_from {
            let dest = state_dir.join("coordinator.key");
            fs::copy(key, &dest).expect("copy the cluster's coordinator.key");
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dest, fs::Permissions::from_mode(0o600)).expect("chmod key");
        }
        let mut coord = Coordinator {
            addr: SocketAddrV4::new(ip, COORDINATOR_PORT),
            state_dir,
            token: String::new(),
            opts,
            proc: Mutex::new(None),
            ns,
        };
        coord.token = coord.start();
        coord
    }
}
