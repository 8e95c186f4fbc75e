//! End-to-end test harness for a2a: real binaries (`a2a-coordinator`, `a2ad`, `a2actl`) in Linux
//! network namespaces, with real TUN devices.
//!
//! A [`Lab`] is one isolated topology: a "wan" namespace holding a Linux bridge, and any number
//! of namespaces (coordinator, nodes, attackers) each connected to that bridge by a veth pair and
//! given an address in `10.<x>.0.0/24`. Everything a lab creates is named after the test process
//! id and a per-process counter, so tests can run in parallel (and next to another `cargo test`)
//! without colliding. Dropping the lab (also while a test panics) kills every process it started
//! and deletes its namespaces; when the test failed, the logs of every process are printed and
//! kept on disk.
//!
//! Root is needed. Without it (or when `ip netns add` fails) [`Lab::new`] returns `None` after
//! printing "skipped: needs root", except when `CI=true`, where it panics: CI must not silently
//! skip the end-to-end tests.
//!
//! Binaries are taken from `$A2A_BIN_DIR`, else from the cargo target directory of the test
//! executable (`target/debug/deps/x` -> `target/debug`).

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long the overlay may take to do something (peers appearing, a handshake, a rejoin).
pub const OVERLAY_TIMEOUT: Duration = Duration::from_secs(20);
/// The overlay prefix a coordinator uses when it is given no `--prefix`.
pub const DEFAULT_PREFIX: &str = "100.64.0.0/10";
/// The port test HTTP servers listen on.
pub const HTTP_PORT: u16 = 8080;
/// The port coordinators listen on (TCP and UDP).
pub const COORDINATOR_PORT: u16 = 7600;
/// The WireGuard UDP port of every node (a2ad's default).
pub const NODE_PORT: u16 = 51820;
/// The port test iperf3 servers listen on.
pub const IPERF_PORT: u16 = 5201;

const NETNS_DIR: &str = "/var/run/netns";
const BRIDGE: &str = "br0";
/// Default time limit of a command run with [`Ns::exec`].
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// Environment variables of a2a that must not leak from the test's environment into children.
const A2A_ENV: &[&str] = &[
    "A2A_SOCKET",
    "A2A_STATE_DIR",
    "A2A_INTERFACE",
    "A2A_PORT",
    "A2A_COORDINATOR_STATE_DIR",
    "http_proxy",
    "https_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
];

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

/// Whether we run under CI (`CI=true`), where missing privileges are a failure, not a skip.
pub fn in_ci() -> bool {
    matches!(
        std::env::var("CI")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("true") | Ok("1") | Ok("yes")
    )
}

/// Prints a line to the test's real stderr, bypassing libtest's output capture, so that
/// measurements (throughput, join latency) show up in the normal `cargo test` output.
pub fn report(msg: impl fmt::Display) {
    let line = format!("[a2a-netns] {msg}\n");
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

// ------------------------------------------------------------------------------------------
// Polling
// ------------------------------------------------------------------------------------------

/// Calls `f` every 200 ms until it returns `Ok` or `timeout` passes; returns the last error
/// on timeout.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("still failing after {timeout:?}: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Like [`poll`], but panics with `what` and the last error on timeout.
pub fn wait_for<T>(timeout: Duration, what: &str, f: impl FnMut() -> Result<T, String>) -> T {
    poll(timeout, f).unwrap_or_else(|e| panic!("timed out waiting for {what}: {e}"))
}

/// Waits until `cond` holds, polling every 200 ms; panics with `what` on timeout.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || {
        if cond() {
            Ok(())
        } else {
            Err("condition not met".into())
        }
    })
}

// ------------------------------------------------------------------------------------------
// Binaries
// ------------------------------------------------------------------------------------------

/// Paths of the a2a binaries under test.
#[derive(Debug, Clone)]
pub struct Bins {
    pub dir: PathBuf,
    pub coordinator: String,
    pub daemon: String,
    pub ctl: String,
}

impl Bins {
    /// Finds the binaries in `$A2A_BIN_DIR` or the test executable's target directory; panics
    /// with instructions when one is missing.
    pub fn locate() -> Bins {
        let dir = match std::env::var_os("A2A_BIN_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => {
                let exe = std::env::current_exe().expect("current_exe");
                // target/debug/deps/test-xxxx -> target/debug
                let deps = exe.parent().expect("test executable has a directory");
                if deps.file_name() == Some(OsStr::new("deps")) {
                    deps.parent().expect("deps has a parent").to_path_buf()
                } else {
                    deps.to_path_buf()
                }
            }
        };
        let find = |name: &str| -> String {
            let p = dir.join(name);
            if !p.is_file() {
                panic!(
                    "a2a binary `{name}` not found at {}: run `cargo build --workspace` first \
                     (or point A2A_BIN_DIR at the directory holding a2ad, a2actl and \
                     a2a-coordinator)",
                    p.display()
                );
            }
            p.to_string_lossy().into_owned()
        };
        let bins = Bins {
            coordinator: find("a2a-coordinator"),
            daemon: find("a2ad"),
            ctl: find("a2actl"),
            dir: dir.clone(),
        };
        bins.warn_if_stale();
        bins
    }

    /// Warns (once) when a binary is older than the newest source file of its crate: the usual
    /// mistake is `cargo test` without `cargo build --workspace`.
    fn warn_if_stale(&self) {
        static WARNED: Once = Once::new();
        WARNED.call_once(|| {
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            for (bin, crates) in [
                (&self.coordinator, &["coordinator", "proto"][..]),
                (&self.daemon, &["daemon", "proto"][..]),
                (&self.ctl, &["ctl", "proto"][..]),
            ] {
                let Some(bin_time) = fs::metadata(bin).and_then(|m| m.modified()).ok() else {
                    continue;
                };
                let newest = crates
                    .iter()
                    .filter_map(|c| newest_mtime(&workspace.join(c).join("src")))
                    .max();
                if matches!(newest, Some(t) if t > bin_time) {
                    report(format!(
                        "warning: {bin} is older than its sources; run `cargo build --workspace`"
                    ));
                }
            }
        });
    }
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        panic!("`{tool}` is not installed: install the `{package}` package (see .ci/run)");
    }
}

// ------------------------------------------------------------------------------------------
// Command output
// ------------------------------------------------------------------------------------------

/// The result of a finished (or timed out) command.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub cmd: String,
    /// The exit code; `None` when killed by a signal or timed out.
    pub code: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics with the whole output unless the command succeeded.
    #[track_caller]
    pub fn expect_ok(self) -> Output {
        if !self.success() {
            panic!("command failed: {self}");
        }
        self
    }

    /// Panics with the whole output if the command succeeded (or timed out).
    #[track_caller]
    pub fn expect_fail(self) -> Output {
        if self.success() || self.timed_out {
            panic!("command should have failed (with an exit code): {self}");
        }
        self
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = if self.timed_out {
            "timed out".to_string()
        } else {
            match self.code {
                Some(c) => format!("exit {c}"),
                None => "killed by a signal".to_string(),
            }
        };
        write!(
            f,
            "`{}` -> {status} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmd,
            self.elapsed,
            truncate(&self.stdout, 4000),
            truncate(&self.stderr, 4000)
        )
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn describe_status(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{st:?}"),
    }
}

// ------------------------------------------------------------------------------------------
// Processes
// ------------------------------------------------------------------------------------------

/// A long-running process started by the lab, with its stdout and stderr in files. The lab
/// kills it when dropped.
#[derive(Clone)]
pub struct Proc {
    inner: Arc<ProcInner>,
}

struct ProcInner {
    label: String,
    pid: u32,
    child: Mutex<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl fmt::Debug for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proc({} pid {})", self.inner.label, self.inner.pid)
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    pub fn label(&self) -> &str {
        &self.inner.label
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        a2a_proto::sync::lock(&self.inner.child)
    }

    /// `None` while running, else how it ended.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.child().try_wait().ok().flatten()
    }

    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// Panics (with the log tail) unless the process is still running.
    #[track_caller]
    pub fn assert_running(&self) {
        if let Some(st) = self.exit_status() {
            panic!(
                "{} (pid {}) is not running any more: it ended with {}\n--- stderr tail ---\n{}",
                self.inner.label,
                self.inner.pid,
                describe_status(st),
                tail(&self.stderr_text(), 60)
            );
        }
    }

    pub fn stdout_text(&self) -> String {
        fs::read_to_string(&self.inner.stdout).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.inner.stderr).unwrap_or_default()
    }

    pub fn stderr_path(&self) -> &Path {
        &self.inner.stderr
    }

    /// SIGKILL and reap.
    pub fn kill(&self) {
        let mut child = self.child();
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    /// Sends `signal`, waits up to `grace` for the process to end, then SIGKILLs it.
    /// Returns how it ended.
    pub fn stop(&self, signal: i32, grace: Duration) -> Option<ExitStatus> {
        if self.is_running() {
            // SAFETY: plain kill(2) on a pid we own and have not reaped.
            unsafe {
                libc::kill(self.inner.pid as libc::pid_t, signal);
            }
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(st) = self.exit_status() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[... {start} earlier lines ...]\n"));
    }
    for l in &all[start..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

// ------------------------------------------------------------------------------------------
// The lab
// ------------------------------------------------------------------------------------------

struct LabInner {
    name: String,
    test: String,
    dir: PathBuf,
    bins: Bins,
    /// `x` of the lab's wan subnet `10.x.0.0/24`.
    subnet: u8,
    started: Instant,
    namespaces: Mutex<Vec<String>>,
    procs: Mutex<Vec<Proc>>,
    seq: AtomicU32,
    next_host: AtomicU32,
}

impl LabInner {
    fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn log_command(&self, out: &Output) {
        let t = self.started.elapsed().as_secs_f64();
        let status = if out.timed_out {
            "timed out".to_string()
        } else {
            format!("{:?}", out.code)
        };
        let mut line = format!(
            "[{t:8.3}s] {} -> {status} in {} ms\n",
            out.cmd,
            out.elapsed.as_millis()
        );
        for (tag, text) in [("out", &out.stdout), ("err", &out.stderr)] {
            let text = truncate(text.trim_end(), 600);
            if !text.is_empty() {
                for l in text.lines() {
                    line.push_str(&format!("           {tag}| {l}\n"));
                }
            }
        }
        if let Ok(mut f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("commands.log"))
        {
            let _ = f.write_all(line.as_bytes());
        }
    }

    /// Runs a command (in `ns`, via `ip netns exec`, or on the host) to completion.
    fn run(&self, ns: Option<&str>, args: &[&str], timeout: Duration) -> Output {
        let n = self.next_seq();
        let out = run_to_completion(&self.dir.join("cmd"), n, ns, args, timeout);
        self.log_command(&out);
        out
    }

    /// Starts a long-running process with stdout and stderr in `<dir>/logs/<label>.{stdout,stderr}`.
    fn spawn(&self, ns: Option<&str>, label: &str, args: &[&str]) -> Proc {
        let n = self.next_seq();
        let log_dir = self.dir.join("logs");
        fs::create_dir_all(&log_dir).expect("create log dir");
        let label = format!("{label}.{n}");
        let stdout = log_dir.join(format!("{label}.stdout"));
        let stderr = log_dir.join(format!("{label}.stderr"));
        let mut command = command_in(ns, args);
        command
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("create log file"))
            .stderr(File::create(&stderr).expect("create log file"));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", args.join(" ")));
        let proc = Proc {
            inner: Arc::new(ProcInner {
                label: label.clone(),
                pid: child.id(),
                child: Mutex::new(child),
                stdout,
                stderr,
            }),
        };
        self.log_command(&Output {
            cmd: format!(
                "[{}] {} &  (background, pid {}, logs/{label}.*)",
                ns.unwrap_or("host"),
                args.join(" "),
                proc.pid()
            ),
            code: None,
            timed_out: false,
            stdout: String::new(),
            stderr: String::new(),
            elapsed: Duration::ZERO,
        });
        self.procs.lock().unwrap().push(proc.clone());
        proc
    }

    /// Host command that must succeed (lab plumbing).
    fn host(&self, args: &[&str]) {
        self.run(None, args, EXEC_TIMEOUT).expect_ok();
    }

    fn create_ns(&self, role: &str) -> String {
        let name = format!("{}-{role}", self.name);
        self.host(&["ip", "netns", "add", &name]);
        self.namespaces.lock().unwrap().push(name.clone());
        self.host(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        name
    }
}

/// Runs a command to completion with its output in files under `dir` (removed afterwards) and
/// a time limit, after which it is killed.
fn run_to_completion(
    dir: &Path,
    n: u32,
    ns: Option<&str>,
    args: &[&str],
    timeout: Duration,
) -> Output {
    assert!(!args.is_empty(), "empty command");
    let _ = fs::create_dir_all(dir);
    let out_path = dir.join(format!("{n}.out"));
    let err_path = dir.join(format!("{n}.err"));
    let display = match ns {
        Some(ns) => format!("[{ns}] {}", args.join(" ")),
        None => args.join(" "),
    };
    let mut command = command_in(ns, args);
    command
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("create output file"))
        .stderr(File::create(&err_path).expect("create output file"));
    let start = Instant::now();
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot run `{display}`: {e}"),
    };
    let deadline = start + timeout;
    let mut sleep = Duration::from_millis(1);
    let (code, timed_out) = loop {
        match child.try_wait() {
            Ok(Some(st)) => break (st.code(), false),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break (None, true);
            }
            Ok(None) => {
                std::thread::sleep(sleep);
                sleep = (sleep * 2).min(Duration::from_millis(20));
            }
            Err(e) => panic!("waiting for `{display}`: {e}"),
        }
    };
    let out = Output {
        cmd: display,
        code,
        timed_out,
        stdout: String::from_utf8_lossy(&fs::read(&out_path).unwrap_or_default()).into(),
        stderr: String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default()).into(),
        elapsed: start.elapsed(),
    };
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    out
}

/// Runs a command on the host (no namespace, no root needed) with a time limit.
pub fn run_host(args: &[&str], timeout: Duration) -> Output {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir()
        .join("a2a-netns")
        .join(format!("host-{}-{n}", std::process::id()));
    let out = run_to_completion(&dir, n, None, args, timeout);
    let _ = fs::remove_dir_all(&dir);
    out
}

fn command_in(ns: Option<&str>, args: &[&str]) -> Command {
    let mut command = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).args(args);
            c
        }
        None => {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        }
    };
    for var in A2A_ENV {
        command.env_remove(var);
    }
    // SAFETY: prctl is async-signal-safe. Children die with the thread that started them
    // (the test thread), so a killed test process leaves no daemon behind.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
    command
}

/// One isolated network topology; see the crate documentation.
pub struct Lab {
    inner: Arc<LabInner>,
    hub: String,
}

impl Lab {
    /// Creates a lab with its wan segment. Returns `None` (test skipped) without root, unless
    /// `CI=true`, where it panics.
    pub fn new(test: &str) -> Option<Lab> {
        let pid = std::process::id();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("a2a-{pid}-{n}");
        let skip = |why: &str| -> Option<Lab> {
            if in_ci() {
                panic!(
                    "the end-to-end tests need root and network namespaces ({why}); \
                     CI=true, so this is a failure, not a skip: run them as root"
                );
            }
            report(format!("{test}: skipped: needs root ({why})"));
            None
        };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return skip("not running as root");
        }
        // Everything that can panic comes before the first namespace exists.
        let bins = Bins::locate();
        require_tool("curl", "curl");
        require_tool("python3", "python3");
        require_tool("ping", "iputils-ping");
        STALE_CLEANUP.call_once(cleanup_stale_namespaces);
        let probe = Command::new("ip")
            .args(["netns", "add", &format!("{name}-hub")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match probe {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                let why = format!(
                    "`ip netns add` failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return skip(&why);
            }
            Err(e) => return skip(&format!("cannot run `ip` (install iproute2): {e}")),
        }

        let dir = std::env::temp_dir()
            .join("a2a-netns")
            .join(format!("{name}-{test}"));
        let _ = fs::remove_dir_all(&dir);
        if let Err(e) = fs::create_dir_all(&dir) {
            delete_namespace(&format!("{name}-hub"));
            panic!("cannot create the lab directory {}: {e}", dir.display());
        }
        let subnet = 16 + ((pid.wrapping_mul(7919).wrapping_add(n * 13)) % 200) as u8;
        let inner = Arc::new(LabInner {
            name: name.clone(),
            test: test.to_string(),
            dir,
            bins,
            subnet,
            started: Instant::now(),
            namespaces: Mutex::new(vec![format!("{name}-hub")]),
            procs: Mutex::new(Vec::new()),
            seq: AtomicU32::new(0),
            next_host: AtomicU32::new(2),
        });
        let hub = format!("{name}-hub");
        let lab = Lab { inner, hub };
        // From here on, a panic drops `lab`, which removes what was created.
        let h = lab.hub.as_str();
        lab.inner.host(&["ip", "-n", h, "link", "set", "lo", "up"]);
        lab.inner.host(&[
            "ip",
            "-n",
            h,
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
        ]);
        lab.inner
            .host(&["ip", "-n", h, "link", "set", BRIDGE, "up"]);
        Some(lab)
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The directory holding the lab's logs and state directories.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn bins(&self) -> &Bins {
        &self.inner.bins
    }

    /// The wan subnet, `10.x.0.0/24`.
    pub fn wan_subnet(&self) -> String {
        format!("10.{}.0.0/24", self.inner.subnet)
    }

    /// A new namespace attached to the wan bridge, with an address of the wan subnet on `eth0`.
    /// `role` must be unique in the lab (it names the namespace).
    pub fn add_ns(&self, role: &str) -> Ns {
        let inner = &self.inner;
        let name = inner.create_ns(role);
        let host = inner.next_host.fetch_add(1, Ordering::Relaxed);
        assert!(host < 255, "too many namespaces in one lab");
        let ip = Ipv4Addr::new(10, inner.subnet, 0, host as u8);
        // The veth pair is created inside the hub and the node namespace directly, so its names
        // only need to be unique there; still, the hub side carries the lab counter and the host
        // number (<= 15 characters).
        let hub_side = format!("v{}h{host}", inner.name.rsplit('-').next().unwrap_or("0"));
        let hub_side = truncate(&hub_side, 15).to_string();
        inner.host(&[
            "ip", "-n", &self.hub, "link", "add", &hub_side, "type", "veth", "peer", "name",
            "eth0", "netns", &name,
        ]);
        inner.host(&[
            "ip", "-n", &self.hub, "link", "set", &hub_side, "master", BRIDGE, "up",
        ]);
        inner.host(&[
            "ip",
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        inner.host(&["ip", "-n", &name, "link", "set", "eth0", "up"]);
        Ns {
            name,
            role: role.to_string(),
            wan_ip: Some(ip),
            lab: inner.clone(),
        }
    }

    /// Starts a coordinator in a new namespace `coord` and waits for its join token.
    pub fn coordinator(&self, opts: CoordOpts) -> Coordinator {
        let ns = self.add_ns("coord");
        let ip = ns.wan_ip.expect("wan address");
        let state_dir = self.inner.dir.join("coord-state");
        fs::create_dir_all(&state_dir).expect("create coordinator state dir");
        let coord = Coordinator {
            addr: SocketAddrV4::new(ip, COORDINATOR_PORT),
            state_dir,
            token: String::new(),
            opts,
            proc: Mutex::new(None),
            ns,
        };
        let token = coord.start();
        Coordinator { token, ..coord }
    }

    /// A node: a new namespace on the wan with a2ad running in it (not joined yet).
    pub fn node(&self, name: &str) -> Node {
        let node = self.node_without_daemon(name);
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
        let state_dir = self.inner.dir.join(format!("{name}-state"));
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

    /// A router on the wan doing `nat` for a LAN of its own (`192.168.<k>.0/24`); see [`Nat`].
    /// Like a home router's firewall it drops unsolicited traffic from the wan, to itself as
    /// well as to the LAN; dropped before conntrack confirms it, such a packet leaves no entry
    /// that would clash with (and so renumber) the mapping of a LAN node punching out.
    pub fn router(&self, role: &str, nat: Nat) -> Router {
        let ns = self.add_ns(role);
        let k = self.inner.next_host.fetch_add(1, Ordering::Relaxed);
        let lan = Ipv4Addr::new(192, 168, k as u8, 1);
        let n = ns.name.as_str();
        let inner = &self.inner;
        inner.host(&[
            "ip",
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        inner.host(&[
            "ip",
            "-n",
            n,
            "link",
            "add",
            "lan0",
            "type",
            "bridge",
            "forward_delay",
            "0",
        ]);
        inner.host(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{lan}/24"),
            "dev",
            "lan0",
        ]);
        inner.host(&["ip", "-n", n, "link", "set", "lan0", "up"]);
        let masquerade = match nat {
            Nat::Easy | Nat::NoUdp => "masquerade persistent",
            Nat::Hard => "masquerade random,fully-random",
        };
        let no_udp = match nat {
            Nat::NoUdp => "oifname \"eth0\" meta l4proto udp drop",
            _ => "",
        };
        let rules = format!(
            "table ip a2a_nat {{\n\
               chain postrouting {{ type nat hook postrouting priority srcnat; oifname \"eth0\" {masquerade}; }}\n\
             }}\n\
             table inet a2a_fw {{\n\
               chain input {{ type filter hook input priority filter; policy accept;\n\
                 iifname \"eth0\" ct state established,related accept\n\
                 iifname \"eth0\" drop\n\
               }}\n\
               chain forward {{ type filter hook forward priority filter; policy accept;\n\
                 iifname \"eth0\" ct state established,related accept\n\
                 iifname \"eth0\" drop\n\
                 {no_udp}\n\
               }}\n\
             }}\n"
        );
        let file = self.inner.dir.join(format!("{role}.nft"));
        fs::write(&file, rules).expect("write nftables rules");
        require_tool("nft", "nftables");
        ns.exec(&["nft", "-f", &file.to_string_lossy()]).expect_ok();
        Router {
            ns,
            nat,
            lan,
            next_host: AtomicU32::new(2),
        }
    }

    /// A node on `router`'s LAN with a2ad running (not joined yet).
    pub fn node_behind(&self, router: &Router, name: &str) -> Node {
        let inner = &self.inner;
        let ns_name = inner.create_ns(name);
        let h = router.next_host.fetch_add(1, Ordering::Relaxed);
        let o = router.lan.octets();
        let ip = Ipv4Addr::new(o[0], o[1], o[2], h as u8);
        let r = router.ns.name.as_str();
        let side = format!("lan{h}");
        inner.host(&[
            "ip", "-n", r, "link", "add", &side, "type", "veth", "peer", "name", "eth0", "netns",
            &ns_name,
        ]);
        inner.host(&["ip", "-n", r, "link", "set", &side, "master", "lan0", "up"]);
        inner.host(&[
            "ip",
            "-n",
            &ns_name,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        inner.host(&["ip", "-n", &ns_name, "link", "set", "eth0", "up"]);
        inner.host(&[
            "ip",
            "-n",
            &ns_name,
            "route",
            "add",
            "default",
            "via",
            &router.lan.to_string(),
        ]);
        let ns = Ns {
            name: ns_name,
            role: name.to_string(),
            wan_ip: None,
            lab: inner.clone(),
        };
        let node = self.node_in(ns, name);
        node.start_daemon();
        node
    }

    /// Prints the tail of every process log and of the command log to stderr.
    pub fn print_logs(&self) {
        let inner = &self.inner;
        let mut text = format!(
            "\n===== a2a lab {} ({}) logs, kept in {} =====\n",
            inner.name,
            inner.test,
            inner.dir.display()
        );
        let procs = a2a_proto::sync::lock(&inner.procs).clone();
        for p in &procs {
            for (kind, path) in [("stdout", &p.inner.stdout), ("stderr", &p.inner.stderr)] {
                let content = fs::read_to_string(path).unwrap_or_default();
                if content.trim().is_empty() {
                    continue;
                }
                text.push_str(&format!(
                    "----- {} {kind} (pid {}) -----\n{}",
                    p.inner.label,
                    p.inner.pid,
                    tail(&content, 150)
                ));
            }
        }
        let commands = fs::read_to_string(inner.dir.join("commands.log")).unwrap_or_default();
        text.push_str(&format!(
            "----- commands (tail) -----\n{}===== end of lab {} logs =====\n",
            tail(&commands, 120),
            inner.name
        ));
        // Through eprint!, so libtest shows it with the failure.
        eprint!("{text}");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            self.print_logs();
        }
        let inner = &self.inner;
        let procs: Vec<Proc> = std::mem::take(&mut *a2a_proto::sync::lock(&inner.procs));
        for p in &procs {
            p.kill();
        }
        let namespaces: Vec<String> =
            std::mem::take(&mut *a2a_proto::sync::lock(&inner.namespaces));
        for ns in namespaces.iter().rev() {
            delete_namespace(ns);
        }
        let keep = failed || std::env::var_os("A2A_KEEP_LOGS").is_some();
        if !keep {
            let _ = fs::remove_dir_all(&inner.dir);
        } else if !failed {
            report(format!(
                "logs of {} kept in {}",
                inner.test,
                inner.dir.display()
            ));
        }
    }
}

/// Kills whatever still runs in `ns` and deletes it. Never panics.
fn delete_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
    {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<libc::pid_t>().ok())
        {
            // SAFETY: kill(2); these pids live in a namespace this process created.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Deletes namespaces `a2a-<pid>-...` left behind by test processes that no longer exist
/// (killed before their labs were dropped).
fn cleanup_stale_namespaces() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.split('-');
        if parts.next() != Some("a2a") {
            continue;
        }
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            delete_namespace(&name);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Namespaces
// ------------------------------------------------------------------------------------------

/// A network namespace of a lab.
#[derive(Clone)]
pub struct Ns {
    pub name: String,
    pub role: String,
    /// The address on the wan segment.
    pub wan_ip: Option<Ipv4Addr>,
    lab: Arc<LabInner>,
}

impl fmt::Debug for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ns({})", self.name)
    }
}

/// How a [`Router`] treats its LAN's traffic to the wan (nftables in the router's namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// `masquerade persistent`: one mapping per inside socket, whatever the destination
    /// (endpoint-independent mapping), inbound only for established flows. Hole punching works.
    Easy,
    /// `masquerade random,fully-random`: a new mapping per destination. Punching fails.
    Hard,
    /// Easy NAT, and all outbound UDP dropped: only TCP reaches the coordinator.
    NoUdp,
}

/// A NAT router between the wan and a LAN of nodes.
#[derive(Debug)]
pub struct Router {
    pub ns: Ns,
    pub nat: Nat,
    /// The router's LAN address (the nodes' gateway).
    pub lan: Ipv4Addr,
    next_host: AtomicU32,
}

impl Router {
    pub fn wan_ip(&self) -> Ipv4Addr {
        self.ns.wan_ip.expect("a router has a wan address")
    }

    /// Drops UDP forwarded from this router's LAN to `to` (a wan address), until
    /// [`unblock_udp`](Self::unblock_udp).
    pub fn block_udp_to(&self, to: Ipv4Addr) {
        let to = to.to_string();
        let n = &self.ns;
        let _ = n.exec(&["nft", "delete", "table", "inet", "a2a_block"]);
        n.exec(&["nft", "add", "table", "inet", "a2a_block"])
            .expect_ok();
        n.exec(&[
            "nft",
            "add chain inet a2a_block forward { type filter hook forward priority -10; }",
        ])
        .expect_ok();
        n.exec(&[
            "nft",
            "add",
            "rule",
            "inet",
            "a2a_block",
            "forward",
            "ip",
            "daddr",
            &to,
            "meta",
            "l4proto",
            "udp",
            "drop",
        ])
        .expect_ok();
    }

    pub fn unblock_udp(&self) {
        self.ns
            .exec(&["nft", "delete", "table", "inet", "a2a_block"])
            .expect_ok();
    }

    /// Sets the conntrack UDP timeouts (seconds) of this router: NAT mappings of idle flows
    /// expire after that long.
    pub fn set_udp_mapping_timeout(&self, secs: u32) {
        for key in [
            "nf_conntrack_udp_timeout",
            "nf_conntrack_udp_timeout_stream",
        ] {
            self.ns
                .exec(&["sysctl", "-qw", &format!("net.netfilter.{key}={secs}")])
                .expect_ok();
        }
    }
}

/// A running test HTTP server.
#[derive(Debug, Clone)]
pub struct HttpServer {
    pub proc: Proc,
    pub port: u16,
    /// URL path of the served file, e.g. `/a2a-alpha.txt`.
    pub path: String,
    /// Its exact content.
    pub body: String,
}

impl Ns {
    /// Runs a command in the namespace (time limit 30 s).
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_timeout(args, EXEC_TIMEOUT)
    }

    pub fn exec_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        self.lab.run(Some(&self.name), args, timeout)
    }

    /// Starts a background process in the namespace.
    pub fn spawn(&self, label: &str, args: &[&str]) -> Proc {
        self.lab
            .spawn(Some(&self.name), &format!("{}-{label}", self.role), args)
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it creates live here.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = Path::new(NETNS_DIR).join(&self.name);
        let handle = std::thread::spawn(move || {
            let file =
                File::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
            // SAFETY: setns(2) on a valid namespace fd; it only affects this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                panic!("setns({}): {}", path.display(), io::Error::last_os_error());
            }
            f()
        });
        handle
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Whether a network interface exists in the namespace.
    pub fn has_link(&self, name: &str) -> bool {
        self.exec(&["ip", "link", "show", "dev", name]).success()
    }

    /// Starts `python3 -m http.server` on `HTTP_PORT`, serving one file with a unique body, and
    /// waits until it answers locally.
    pub fn serve_http(&self) -> HttpServer {
        let www = self.lab.dir.join(format!("{}-www", self.role));
        fs::create_dir_all(&www).expect("create www dir");
        let file = format!("a2a-{}.txt", self.role);
        let body = format!(
            "hello from {} in lab {} ({:016x})\n",
            self.role,
            self.lab.name,
            garbage::Rng::new().next_u64()
        );
        fs::write(www.join(&file), &body).expect("write served file");
        let port = HTTP_PORT.to_string();
        let dir = www.to_string_lossy().into_owned();
        let proc = self.spawn(
            "http",
            &[
                "python3",
                "-m",
                "http.server",
                &port,
                "--bind",
                "0.0.0.0",
                "--directory",
                &dir,
            ],
        );
        let server = HttpServer {
            proc,
            port: HTTP_PORT,
            path: format!("/{file}"),
            body,
        };
        wait_for(
            Duration::from_secs(15),
            &format!("the HTTP server in {}", self.name),
            || {
                server.proc.assert_running();
                let body = self.http_get(Ipv4Addr::LOCALHOST, server.port, &server.path, 2)?;
                if body == server.body {
                    Ok(())
                } else {
                    Err(format!("unexpected body {body:?}"))
                }
            },
        );
        server
    }

    /// `curl`s `http://ip:port/path` from this namespace; the body on success.
    pub fn http_get(
        &self,
        ip: Ipv4Addr,
        port: u16,
        path: &str,
        timeout_s: u32,
    ) -> Result<String, String> {
        let url = format!("http://{ip}:{port}{path}");
        let t = timeout_s.to_string();
        let out = self.exec_timeout(
            &[
                "curl",
                "-sS",
                "--fail",
                "--noproxy",
                "*",
                "--connect-timeout",
                &t,
                "--max-time",
                &t,
                &url,
            ],
            Duration::from_secs(u64::from(timeout_s) + 5),
        );
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(format!(
                "curl {url} from {} failed ({:?}): {}",
                self.name,
                out.code,
                out.stderr.trim()
            ))
        }
    }

    /// `ping -c count` (0.2 s apart, 1 s wait for each reply); true if any reply came back.
    pub fn ping(&self, ip: Ipv4Addr, count: u32) -> bool {
        let c = count.to_string();
        let ip = ip.to_string();
        self.exec_timeout(
            &["ping", "-n", "-q", "-c", &c, "-i", "0.2", "-W", "1", &ip],
            Duration::from_secs(u64::from(count) + 10),
        )
        .success()
    }

    /// Starts `iperf3 -s` on `IPERF_PORT`.
    pub fn iperf3_server(&self) -> Proc {
        require_tool("iperf3", "iperf3");
        let port = IPERF_PORT.to_string();
        self.spawn("iperf3", &["iperf3", "-s", "-p", &port])
    }

    /// Runs an iperf3 TCP test of `secs` seconds towards `ip` (retrying until the server is
    /// up); returns the received throughput in Mbit/s.
    pub fn iperf3_client(&self, ip: Ipv4Addr, secs: u32) -> Result<f64, String> {
        require_tool("iperf3", "iperf3");
        let port = IPERF_PORT.to_string();
        let ip = ip.to_string();
        let t = secs.to_string();
        poll(Duration::from_secs(15), || {
            let out = self.exec_timeout(
                &["iperf3", "-c", &ip, "-p", &port, "-t", &t, "-J"],
                Duration::from_secs(u64::from(secs) + 20),
            );
            let json: serde_json::Value = serde_json::from_str(&out.stdout)
                .map_err(|e| format!("iperf3 printed no JSON ({e}): {out}"))?;
            if let Some(err) = json.get("error") {
                return Err(format!("iperf3: {err}"));
            }
            let end = &json["end"];
            end["sum_received"]["bits_per_second"]
                .as_f64()
                .or_else(|| end["sum"]["bits_per_second"].as_f64())
                .map(|bps| bps / 1e6)
                .ok_or_else(|| format!("iperf3 JSON without a throughput: {out}"))
        })
    }
}

// ------------------------------------------------------------------------------------------
// Coordinator
// ------------------------------------------------------------------------------------------

/// How to start a coordinator.
#[derive(Debug, Clone, Default)]
pub struct CoordOpts {
    /// `--prefix`.
    pub prefix: Option<String>,
    /// Listen on `0.0.0.0` and pass the wan address as `--endpoint`.
    pub wildcard_listen: bool,
    /// Run the forging coordinator (`a2a-forging-coordinator`, the real server with a hook that
    /// injects forged members) instead of `a2a-coordinator`.
    pub forging: bool,
    /// `--stats-interval SECS` (hidden): print the counters line this often (default 60 s);
    /// [`Coordinator::counters`] reads the latest.
    pub stats_interval: Option<u32>,
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
        let bins = &self.ns.lab.bins;
        // At its most verbose level, so the zero-log checks read everything it can print.
        let binary = if self.opts.forging {
            bins.dir
                .join("a2a-forging-coordinator")
                .to_string_lossy()
                .into_owned()
        } else {
            bins.coordinator.clone()
        };
        let mut args = vec!["env".into(), "A2A_LOG=trace".into(), binary];
        if self.opts.wildcard_listen {
            args.push("--listen".into());
            args.push(format!("0.0.0.0:{COORDINATOR_PORT}"));
            args.push("--endpoint".into());
            args.push(self.addr.to_string());
        } else {
            args.push("--listen".into());
            args.push(self.addr.to_string());
        }
        args.push("--state-dir".into());
        args.push(self.state_dir.to_string_lossy().into_owned());
        if let Some(p) = &self.opts.prefix {
            args.push("--prefix".into());
            args.push(p.clone());
        }
        if let Some(secs) = self.opts.stats_interval {
            args.push("--stats-interval".into());
            args.push(secs.to_string());
        }
        args
    }

    /// The counters of the latest counters line the coordinator printed (`name=value` pairs of
    /// its `live members=...` line), or `None` before the first one.
    pub fn counters(&self) -> Option<std::collections::BTreeMap<String, u64>> {
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
    pub fn fresh_counters(&self) -> std::collections::BTreeMap<String, u64> {
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

    /// SIGKILL.
    pub fn kill(&self) {
        self.proc().kill();
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
        let bins = &self.ns.lab.bins;
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

// ------------------------------------------------------------------------------------------
// Nodes
// ------------------------------------------------------------------------------------------

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
        let mut slot = self.daemon.lock().unwrap();
        if let Some(p) = slot.as_ref() {
            assert!(!p.is_running(), "a2ad is already running in {}", self.name);
        }
        let state = self.state_dir.to_string_lossy().into_owned();
        let proc = self
            .ns
            .spawn("a2ad", &[&self.ns.lab.bins.daemon, "--state-dir", &state]);
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
        let mut full = vec![self.ns.lab.bins.ctl.as_str(), "--state-dir", &state];
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
        let mut want: Vec<&str> = names.to_vec();
        want.sort_unstable();
        wait_for(
            timeout,
            &format!("{} to list peers {want:?}", self.name),
            || {
                let st = self.try_status()?;
                let mut got: Vec<&str> = st.peers.iter().map(|p| p.name.as_str()).collect();
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

// ------------------------------------------------------------------------------------------
// Status JSON
// ------------------------------------------------------------------------------------------

/// `a2actl status --json`, checked against the contract.
#[derive(Debug, Clone)]
pub struct Status {
    /// `self`; `None` when the node has not joined (null or absent).
    pub me: Option<SelfStatus>,
    pub peers: Vec<PeerStatus>,
    pub raw: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfStatus {
    pub name: String,
    pub ip: Ipv4Addr,
    pub public_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: String,
    pub ip: Ipv4Addr,
    pub public_key: String,
    pub path: String,
    pub endpoint: Option<String>,
    pub last_handshake_s: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

fn field<'a>(v: &'a serde_json::Value, key: &str) -> Result<&'a serde_json::Value, String> {
    v.get(key)
        .ok_or_else(|| format!("missing field {key:?} in {v}"))
}

fn str_field(v: &serde_json::Value, key: &str) -> Result<String, String> {
    field(v, key)?
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("field {key:?} is not a string in {v}"))
}

fn ip_field(v: &serde_json::Value, key: &str) -> Result<Ipv4Addr, String> {
    str_field(v, key)?
        .parse()
        .map_err(|e| format!("field {key:?} is not an IPv4 address ({e}) in {v}"))
}

fn u64_field(v: &serde_json::Value, key: &str) -> Result<u64, String> {
    field(v, key)?
        .as_u64()
        .ok_or_else(|| format!("field {key:?} is not an unsigned integer in {v}"))
}

impl Status {
    pub fn parse(json: &str) -> Result<Status, String> {
        let raw: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("status is not JSON ({e}): {json}"))?;
        let me = match raw.get("self") {
            None | Some(serde_json::Value::Null) => None,
            Some(s) => Some(SelfStatus {
                name: str_field(s, "name")?,
                ip: ip_field(s, "ip")?,
                public_key: str_field(s, "public_key")?,
            }),
        };
        let peers = field(&raw, "peers")?
            .as_array()
            .ok_or_else(|| format!("\"peers\" is not an array: {raw}"))?
            .iter()
            .map(|p| {
                let path = str_field(p, "path")?;
                if !matches!(path.as_str(), "direct" | "relay" | "none") {
                    return Err(format!("path {path:?} is not direct|relay|none in {p}"));
                }
                let endpoint = match field(p, "endpoint")? {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(s) => Some(s.clone()),
                    other => return Err(format!("endpoint {other} is not a string or null")),
                };
                let last_handshake_s = match field(p, "last_handshake_s")? {
                    serde_json::Value::Null => None,
                    v => Some(v.as_u64().ok_or_else(|| {
                        format!("last_handshake_s {v} is not an unsigned integer or null")
                    })?),
                };
                Ok(PeerStatus {
                    name: str_field(p, "name")?,
                    ip: ip_field(p, "ip")?,
                    public_key: str_field(p, "public_key")?,
                    path,
                    endpoint,
                    last_handshake_s,
                    rx_bytes: u64_field(p, "rx_bytes")?,
                    tx_bytes: u64_field(p, "tx_bytes")?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Status { me, peers, raw })
    }

    pub fn peer(&self, name: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.name == name)
    }
}

/// Whether `ip` is inside `cidr` (`a.b.c.d/len`).
pub fn in_prefix(ip: Ipv4Addr, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').expect("CIDR with a /");
    let net: Ipv4Addr = net.parse().expect("CIDR address");
    let len: u32 = len.parse().expect("CIDR length");
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Asserts that no file in `dir` (recursively, sockets excluded) is readable or writable by
/// group or others: the node key and membership are secrets.
#[track_caller]
pub fn assert_private_files(dir: &Path) {
    for entry in fs::read_dir(dir).expect("read state dir").flatten() {
        let meta = entry.metadata().expect("metadata");
        let ft = meta.file_type();
        if ft.is_dir() {
            assert_private_files(&entry.path());
        } else if ft.is_file() {
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(
                mode & 0o077,
                0,
                "{} has mode {mode:o}: state files must not be accessible to group/others",
                entry.path().display()
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// Garbage
// ------------------------------------------------------------------------------------------

/// Hostile input: random and malformed TCP streams and UDP datagrams. Run these inside a
/// namespace with [`Ns::run_in`].
pub mod garbage {
    use super::*;

    /// xorshift64*: fast, seedable, good enough for garbage.
    pub struct Rng(u64);

    impl Rng {
        pub fn new() -> Rng {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            let mut seed = [0u8; 8];
            if let Ok(mut f) = File::open("/dev/urandom") {
                let _ = f.read_exact(&mut seed);
            }
            Rng::seeded(t ^ u64::from_le_bytes(seed) ^ u64::from(std::process::id()))
        }

        pub fn seeded(seed: u64) -> Rng {
            Rng(seed | 1)
        }

        pub fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// Uniform-ish in `0..n` (`n > 0`).
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        pub fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next_u64() as u8).collect()
        }
    }

    impl Default for Rng {
        fn default() -> Self {
            Rng::new()
        }
    }

    /// One hostile datagram: random bytes, or shaped like WireGuard (type 1-4, three zero bytes)
    /// or like a2a's own messages (0xA2, kind), with random or extreme lengths.
    pub fn datagram(rng: &mut Rng) -> Vec<u8> {
        let len = match rng.below(10) {
            0 => 0,
            1 => 1 + rng.below(3),
            2 => 1200 + rng.below(300),
            3 => 148, // WireGuard handshake initiation size
            4 => 92,  // handshake response
            5 => 64,  // cookie reply
            _ => rng.below(200),
        };
        let mut d = rng.bytes(len);
        match rng.below(4) {
            0 if len >= 4 => {
                d[0] = 1 + rng.below(4) as u8;
                d[1..4].fill(0);
            }
            1 if len >= 2 => {
                d[0] = 0xA2;
                d[1] = rng.below(4) as u8;
            }
            _ => {}
        }
        d
    }

    /// Sends `count` hostile datagrams to `target` (plus a few maximum-size ones); returns how
    /// many were sent.
    pub fn udp_flood(target: SocketAddr, count: usize) -> io::Result<usize> {
        let mut rng = Rng::new();
        let socks: Vec<UdpSocket> = (0..8)
            .map(|_| UdpSocket::bind("0.0.0.0:0"))
            .collect::<io::Result<_>>()?;
        let mut sent = 0;
        for i in 0..count {
            let d = if i % 500 == 0 {
                rng.bytes(65_507)
            } else {
                datagram(&mut rng)
            };
            // Errors such as ECONNREFUSED from an earlier ICMP are expected.
            if socks[i % socks.len()].send_to(&d, target).is_ok() {
                sent += 1;
            }
            if i % 256 == 0 {
                // Let the receiver breathe a little, so most datagrams are actually processed.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(sent)
    }

    /// What [`tcp_garbage`] managed to do.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct TcpStats {
        pub connected: usize,
        pub failed: usize,
        pub bytes: usize,
    }

    fn set_rst_on_close(s: &TcpStream) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt with a valid fd and a correctly sized linger struct.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const libc::linger as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }

    /// Opens `conns` connections to `target`, writes hostile bytes on each and closes it (some
    /// with a RST): random bytes, frame headers announcing 64 KiB followed by nothing, zero
    /// length frames, a few bytes, or nothing at all.
    pub fn tcp_garbage(target: SocketAddr, conns: usize) -> TcpStats {
        let mut rng = Rng::new();
        let mut stats = TcpStats::default();
        for i in 0..conns {
            let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(3)) else {
                stats.failed += 1;
                continue;
            };
            stats.connected += 1;
            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
            let payload = match i % 6 {
                0 => {
                    let n = 1 + rng.below(8192);
                    rng.bytes(n)
                }
                1 => vec![0xff, 0xff],
                2 => {
                    let mut v = vec![0xff, 0xff];
                    v.extend(rng.bytes(1000));
                    v
                }
                3 => {
                    let mut v = vec![0, 0];
                    let n = rng.below(100);
                    v.extend(rng.bytes(n));
                    v
                }
                4 => {
                    let n = 1 + rng.below(3);
                    rng.bytes(n)
                }
                _ => Vec::new(),
            };
            if let Ok(()) = s.write_all(&payload) {
                stats.bytes += payload.len();
            }
            if i % 3 == 0 {
                set_rst_on_close(&s);
            }
        }
        stats
    }

    /// Opens `n` connections to `target` that send nothing (or only a partial frame header)
    /// and keeps them open: the caller holds the returned streams.
    pub fn tcp_hold_open(target: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
        let mut held = Vec::new();
        let mut failed = 0;
        for i in 0..n {
            match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
                Ok(mut s) => {
                    if i % 4 == 1 {
                        let _ = s.write_all(&[0x01]); // half a length prefix
                    } else if i % 4 == 2 {
                        let _ = s.write_all(&[0xff, 0xff, 0x00]); // a 64 KiB frame, never finished
                    }
                    held.push(s);
                }
                Err(_) => failed += 1,
            }
        }
        (held, failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_membership() {
        let ip: Ipv4Addr = "100.77.3.4".parse().unwrap();
        assert!(in_prefix(ip, "100.77.0.0/16"));
        assert!(in_prefix(ip, "100.64.0.0/10"));
        assert!(!in_prefix(ip, "100.78.0.0/16"));
        assert!(!in_prefix("100.128.0.1".parse().unwrap(), "100.64.0.0/10"));
        assert!(in_prefix(ip, "0.0.0.0/0"));
    }

    #[test]
    fn status_parsing_checks_the_contract() {
        let ok = r#"{"self": {"name": "a", "ip": "100.64.0.1", "public_key": "k"},
            "peers": [{"name": "b", "ip": "100.64.0.2", "public_key": "k2", "path": "direct",
            "endpoint": "10.1.0.3:51820", "last_handshake_s": null, "rx_bytes": 1,
            "tx_bytes": 2}]}"#;
        let st = Status::parse(ok).unwrap();
        assert_eq!(st.me.as_ref().unwrap().name, "a");
        assert_eq!(st.peer("b").unwrap().path, "direct");
        assert_eq!(st.peer("b").unwrap().last_handshake_s, None);

        let not_joined = r#"{"self": null, "peers": []}"#;
        assert!(Status::parse(not_joined).unwrap().me.is_none());

        for bad in [
            ok.replace("\"direct\"", "\"sideways\""),
            ok.replace("\"rx_bytes\": 1,", ""),
            ok.replace("100.64.0.2", "nope"),
            r#"{"self": null}"#.to_string(),
            "not json".to_string(),
        ] {
            assert!(Status::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn garbage_is_varied() {
        let mut rng = garbage::Rng::seeded(42);
        let ds: Vec<Vec<u8>> = (0..1000).map(|_| garbage::datagram(&mut rng)).collect();
        assert!(ds.iter().any(|d| d.is_empty()));
        assert!(ds.iter().any(|d| d.len() > 1000));
        assert!(ds
            .iter()
            .any(|d| d.len() >= 4 && d[0] <= 4 && d[1..4] == [0, 0, 0]));
        assert!(ds.iter().any(|d| d.len() >= 2 && d[0] == 0xA2));
    }

    #[test]
    fn output_tail_and_truncate() {
        assert_eq!(tail("a\nb\nc\n", 2), "[... 1 earlier lines ...]\nb\nc\n");
        assert_eq!(truncate("héllo", 2), "h");
    }
}
