//! Running programs: the a2a binaries under test ([`Bins`]), commands run to completion with a
//! time limit ([`Output`], [`run_host`]), long-running processes with their output in files
//! ([`Proc`]), and the check that an outside tool is installed ([`require_tool`]).

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant, SystemTime};

use crate::timing::report;

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

/// Panics unless `tool` is on `PATH`, naming the Debian package that has it. See
/// [`require_tools`].
#[track_caller]
pub fn require_tool(tool: &str, package: &str) {
    require_tools(&[(tool, package)]);
}

/// Panics unless every `(tool, Debian package)` is on `PATH`, naming all the missing packages
/// and the command that installs them. Call it at the start of a test, after
/// [`Lab::new`](crate::Lab::new) (so that a test skipped for want of root does not fail for
/// want of a tool) and before anything waits on a tool. `./run-tests` installs every package
/// the tests need.
#[track_caller]
pub fn require_tools(tools: &[(&str, &str)]) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let on_path = |tool: &str| std::env::split_paths(&path).any(|p| p.join(tool).is_file());
    let missing: Vec<&(&str, &str)> = tools.iter().filter(|(t, _)| !on_path(t)).collect();
    if missing.is_empty() {
        return;
    }
    let tools: Vec<String> = missing.iter().map(|(t, _)| format!("`{t}`")).collect();
    let mut packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    packages.sort_unstable();
    packages.dedup();
    panic!(
        "{} not installed: this test needs the Debian package(s) {} \
         (`apt-get install {}`, or run ./run-tests, which installs what the tests need)",
        tools.join(", "),
        packages.join(", "),
        packages.join(" ")
    );
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

pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(crate) fn describe_status(st: ExitStatus) -> String {
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
    /// Wraps a started child whose stdout and stderr go to the given files.
    pub(crate) fn new(label: String, child: Child, stdout: PathBuf, stderr: PathBuf) -> Proc {
        Proc {
            inner: Arc::new(ProcInner {
                label,
                pid: child.id(),
                child: Mutex::new(child),
                stdout,
                stderr,
            }),
        }
    }

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

    pub fn stdout_path(&self) -> &Path {
        &self.inner.stdout
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

pub(crate) fn tail(text: &str, lines: usize) -> String {
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
/// Runs a command to completion with its output in files under `dir` (removed afterwards) and
/// a time limit, after which it is killed.
pub(crate) fn run_to_completion(
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

pub(crate) fn command_in(ns: Option<&str>, args: &[&str]) -> Command {
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

/// CPU time (user + system) process `pid` has used so far; zero once it is gone.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / hz)
}

// ------------------------------------------------------------------------------------------
// File-system traces (strace)
// ------------------------------------------------------------------------------------------

/// The system calls of a file-system trace (`strace -e TRACE_FILE_CALLS`): opens, everything
/// that changes a file, and binds (a Unix socket's bind creates one).
pub(crate) const TRACE_FILE_CALLS: &str =
    "trace=open,openat,openat2,creat,mkdir,mkdirat,rmdir,rename,renameat,renameat2,\
     unlink,unlinkat,link,linkat,symlink,symlinkat,truncate,ftruncate,fallocate,chmod,\
     fchmod,fchmodat,chown,fchown,fchownat,lchown,mknod,mknodat,utimensat,setxattr,\
     lsetxattr,fsetxattr,removexattr,lremovexattr,fremovexattr,bind";

/// The lines of a trace made with [`TRACE_FILE_CALLS`] that open a file for writing or change
/// one (a bind only when it is a Unix socket's). Panics when the trace holds no open at all
/// (it would not be the traced program's).
pub(crate) fn traced_file_writes(text: &str) -> Vec<String> {
    assert!(
        text.lines().any(|l| l.contains("openat(")),
        "the trace holds no open at all: is it the traced program's?\n{text}"
    );
    text.lines()
        .filter(|l| {
            let open = l.contains("open(") || l.contains("openat(") || l.contains("openat2(");
            let writes = [
                "O_WRONLY",
                "O_RDWR",
                "O_CREAT",
                "O_TRUNC",
                "O_APPEND",
                "O_TMPFILE",
            ]
            .iter()
            .any(|f| l.contains(f));
            let bind = l.contains("bind(");
            if l.contains("resumed>") {
                // The second half of a call strace saw interrupted: its first half, with the
                // flags, is the line that counts.
                false
            } else if open {
                writes
            } else if bind {
                l.contains("AF_UNIX") || l.contains("AF_LOCAL")
            } else {
                // A change that failed (`= -1 EEXIST`: a state directory that exists) changed
                // nothing.
                !l.contains("+++") && !l.contains("---") && l.contains('(') && !l.contains("= -1 ")
            }
        })
        .map(str::to_string)
        .collect()
}

/// SIGKILLs the children of `pid` (the tracee of a strace this test started: strace killed
/// alone would let it run on).
pub(crate) fn kill_children(pid: u32) {
    let path = format!("/proc/{pid}/task/{pid}/children");
    for child in fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
    {
        if let Ok(c) = child.parse::<i32>() {
            // SAFETY: kill(2) of a child of a process this test started.
            unsafe {
                libc::kill(c, libc::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_names_its_package() {
        require_tools(&[("sh", "dash")]);
        let err = std::panic::catch_unwind(|| {
            require_tools(&[
                ("sh", "dash"),
                ("a2a-no-such-tool", "a2a-no-such-package"),
                ("a2a-no-such-tool-either", "a2a-no-such-package"),
            ])
        })
        .expect_err("a missing tool panics");
        let msg = err.downcast_ref::<String>().expect("a formatted message");
        assert!(msg.contains("`a2a-no-such-tool`"), "{msg}");
        assert!(
            msg.contains("apt-get install a2a-no-such-package`"),
            "{msg}"
        );
        assert!(!msg.contains("dash"), "{msg}");
    }

    #[test]
    fn output_tail_and_truncate() {
        assert_eq!(tail("a\nb\nc\n", 2), "[... 1 earlier lines ...]\nb\nc\n");
        assert_eq!(truncate("héllo", 2), "h");
    }
}
