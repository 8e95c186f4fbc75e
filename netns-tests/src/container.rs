//! A machine with systemd as PID 1 in a lab namespace ([`Container`]): a Debian bookworm root
//! (built once by `scripts/resolved-root.sh` with debootstrap, cached under the target
//! directory) booted with `systemd-nspawn --boot` inside the namespace, systemd-resolved and
//! D-Bus running as on a real host, the built `a2ad` and `a2actl` bind-mounted at `/usr/bin` and
//! `packaging/a2ad.service` at `/etc/systemd/system`, so a2ad runs under its real unit.
//!
//! How it boots on a host without systemd (this repository's machine: PID 1 is not systemd,
//! cgroup v1 with a named `systemd` hierarchy): `--register=no --keep-unit`, since there is no
//! machined and no system bus to ask for a scope; `--network-namespace-path=/run/netns/NS`, so
//! the container's only network is the lab namespace's veth to the wan; `--volatile=overlay`,
//! so the cached root is never written (a tmpfs overlay takes the boot's writes and goes with
//! it); `--capability=CAP_NET_ADMIN`, which nspawn drops for a namespace it did not create and
//! a2ad needs for its TUN device; and nspawn is started in cgroups of the container's own
//! (named after the machine, which is the lab namespace's name), under which it makes the
//! container's, removed when it is dropped. Commands run inside with `nsenter` into the namespaces of the container's PID 1.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::process::{run_host, tail, Output, Proc};
use crate::timing::{report, wait_for};
use crate::topology::{Lab, Ns};

/// The version of the root `scripts/resolved-root.sh` builds (its stamp file's name).
const ROOT_STAMP: &str = ".a2a-root-v1";
/// How long building the root may take (debootstrap downloads ~100 packages).
const ROOT_BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// How long the container's systemd may take to reach `running`.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// The PATH of commands run inside.
const INSIDE_PATH: &str = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";

/// The container root: `$A2A_CONTAINER_ROOT`, else `resolved-root` in `$CARGO_TARGET_DIR`, else
/// beside the binaries' directory (`target/debug` -> `target/resolved-root`): where
/// `scripts/resolved-root.sh` (which `./run-tests` calls) puts it.
pub fn container_root(bin_dir: &Path) -> PathBuf {
    if let Some(d) = std::env::var_os("A2A_CONTAINER_ROOT").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("resolved-root");
    }
    bin_dir.parent().unwrap_or(bin_dir).join("resolved-root")
}

/// The root at `root`, built by `scripts/resolved-root.sh` if it is not there yet (minutes:
/// debootstrap; reported with how long it took).
fn ensure_root(root: &Path) {
    if root.join(ROOT_STAMP).is_file() {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/resolved-root.sh");
    let (script, dir) = (script.to_string_lossy(), root.to_string_lossy());
    report(format!(
        "building the container root in {dir} (debootstrap; once, then cached)"
    ));
    let t0 = Instant::now();
    let out = run_host(&[&script, &dir], ROOT_BUILD_TIMEOUT);
    assert!(
        out.success() && root.join(ROOT_STAMP).is_file(),
        "could not build the container root with {script} {dir}: {out}"
    );
    report(format!(
        "container root built in {:.0} s",
        t0.elapsed().as_secs_f64()
    ));
}

/// A file the container sees at a path of its own (bind-mounted read-only).
#[derive(Debug, Clone)]
pub struct Bind {
    pub host: PathBuf,
    pub inside: String,
}

/// A booted systemd-nspawn container in a lab namespace. Dropping it kills its PID 1 (the
/// whole PID namespace goes with it) and waits for systemd-nspawn to exit.
pub struct Container {
    /// The lab namespace the container's network is.
    pub ns: Ns,
    pub machine: String,
    nspawn: Proc,
    /// The container's PID 1 (systemd), as the host sees it.
    leader: u32,
    /// The cgroups nspawn was started in (removed with the container).
    cgroups: Vec<PathBuf>,
}

impl Lab {
    /// Boots a container in a new lab namespace on the wan (see the module documentation), with
    /// `binds` besides a2ad, a2actl and a2ad.service; returns once its systemd is `running`.
    pub fn container(&self, role: &str, binds: &[Bind]) -> Container {
        let bins = self.bins().clone();
        let root = container_root(&bins.dir);
        ensure_root(&root);
        let ns = self.add_ns(role);
        let machine = ns.name.clone();
        let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/a2ad.service");
        let mut all = vec![
            Bind {
                host: bins.daemon.clone().into(),
                inside: "/usr/bin/a2ad".into(),
            },
            Bind {
                host: bins.ctl.clone().into(),
                inside: "/usr/bin/a2actl".into(),
            },
            Bind {
                host: unit,
                inside: "/etc/systemd/system/a2ad.service".into(),
            },
        ];
        all.extend_from_slice(binds);
        let mut args: Vec<String> = [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            "--console=pipe",
            // A real host's systemd has it; nspawn keeps it only with a network it made itself
            // (--private-network), not with --network-namespace-path. a2ad creates its TUN
            // device with it.
            "--capability=CAP_NET_ADMIN",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--directory={}", root.display()));
        args.push(format!("--machine={machine}"));
        args.push(format!("--network-namespace-path=/run/netns/{}", ns.name));
        for b in &all {
            assert!(
                b.host.exists(),
                "{} (to bind at {}) does not exist",
                b.host.display(),
                b.inside
            );
            args.push(format!("--bind-ro={}:{}", b.host.display(), b.inside));
        }
        // nspawn puts the container's cgroups under its own ("payload", "supervisor"): start it
        // in cgroups of this container's, not the host's roots, so that they are this
        // container's alone and go with it.
        let cgroups = own_cgroups(&machine);
        let mut argv: Vec<&str> = Vec::new();
        let enter: String;
        if !cgroups.is_empty() {
            enter = cgroups
                .iter()
                .map(|d| format!("echo $$ >'{}/cgroup.procs' && ", d.display()))
                .collect::<String>()
                + "exec \"$@\"";
            argv.extend_from_slice(&["sh", "-c", &enter, "sh"]);
        }
        argv.extend(args.iter().map(String::as_str));
        let nspawn = self.spawn_host(&format!("{role}-nspawn"), &argv);
        // nspawn's child that stays is the container's PID 1 (an intermediate child exits).
        let mut leader = 0;
        wait_for(
            Duration::from_secs(30),
            &format!("systemd-nspawn's PID 1 in {machine}"),
            || {
                if !nspawn.is_running() {
                    panic!(
                        "systemd-nspawn exited right after starting\n--- stdout ---\n{}\n--- stderr ---\n{}",
                        tail(&nspawn.stdout_text(), 40),
                        tail(&nspawn.stderr_text(), 40)
                    );
                }
                for pid in children(nspawn.pid()) {
                    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    if comm.trim() == "systemd" {
                        leader = pid;
                        return Ok(());
                    }
                }
                Err("no systemd child yet".into())
            },
        );
        let c = Container {
            ns,
            machine,
            nspawn,
            leader,
            cgroups,
        };
        c.wait_booted();
        c
    }
}

/// New cgroups named `machine` in the hierarchies systemd uses: the named `systemd` one
/// of cgroup v1 and the unified one beside it (a hybrid host, like this repository's machine),
/// or the unified one alone.
fn own_cgroups(machine: &str) -> Vec<PathBuf> {
    let hierarchies: &[&str] = if Path::new("/sys/fs/cgroup/cgroup.procs").is_file() {
        &["/sys/fs/cgroup"]
    } else {
        &["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"]
    };
    hierarchies
        .iter()
        .map(Path::new)
        .filter(|h| h.join("cgroup.procs").is_file())
        .map(|h| h.join(machine))
        .filter(|dir| fs::create_dir_all(dir).is_ok())
        .collect()
}

/// Removes a cgroup and everything under it, deepest first (a cgroup goes only once it has no
/// process and no child; the container's last processes may take a moment to be reaped).
fn remove_cgroup(dir: &Path) {
    fn dirs(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut all = Vec::new();
        dirs(dir, &mut all);
        let left = all.iter().filter(|d| fs::remove_dir(d).is_err()).count();
        if left == 0 || !dir.exists() || Instant::now() > deadline {
            if dir.exists() {
                report(format!("could not remove the cgroup {}", dir.display()));
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The child processes of `pid` (all its threads' children).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        if let Ok(text) = fs::read_to_string(t.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

impl Container {
    /// Waits until `systemctl is-system-running` says `running` (with `degraded`, fails listing
    /// the failed units).
    fn wait_booted(&self) {
        let t0 = Instant::now();
        wait_for(
            BOOT_TIMEOUT,
            &format!("systemd in {} to finish booting", self.machine),
            || {
                self.assert_running();
                let out = self.exec(&["systemctl", "is-system-running"]);
                match out.stdout.trim() {
                    "running" => Ok(()),
                    "degraded" => panic!(
                        "the container booted degraded: {}",
                        self.exec(&["systemctl", "--failed", "--no-pager"])
                    ),
                    s => Err(format!("is-system-running: {s:?}")),
                }
            },
        );
        report(format!(
            "container {} booted in {:.1} s",
            self.machine,
            t0.elapsed().as_secs_f64()
        ));
    }

    #[track_caller]
    pub fn assert_running(&self) {
        if !self.nspawn.is_running() {
            panic!(
                "the container {} is gone (systemd-nspawn exited)\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.machine,
                tail(&self.nspawn.stdout_text(), 40),
                tail(&self.nspawn.stderr_text(), 40)
            );
        }
    }

    /// Runs a command inside the container (its mount, UTS, IPC, network and PID namespaces and
    /// root, a clean environment), time limit 30 s.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_timeout(args, Duration::from_secs(30))
    }

    pub fn exec_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        let leader = self.leader.to_string();
        let mut full = vec![
            "nsenter",
            "-t",
            &leader,
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
            "-r",
            "-w",
            "env",
            "-i",
            INSIDE_PATH,
        ];
        full.extend_from_slice(args);
        self.ns.lab.run(None, &full, timeout)
    }

    /// `a2actl ARGS` inside (the default socket, /run/a2a/a2ad.sock, as on a real host).
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut full = vec!["a2actl"];
        full.extend_from_slice(args);
        self.exec_timeout(&full, Duration::from_secs(90))
    }

    /// The journal of `units` inside (the last lines), for messages.
    pub fn journal(&self, units: &[&str]) -> String {
        let mut args = vec![
            "journalctl",
            "--no-pager",
            "-o",
            "short-monotonic",
            "-n",
            "150",
        ];
        for u in units {
            args.extend_from_slice(&["-u", u]);
        }
        self.exec(&args).to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- journal of {} (a2ad, systemd-resolved) ---\n{}",
                self.machine,
                self.journal(&["a2ad.service", "systemd-resolved.service"])
            );
        }
        // SIGKILL to the container's PID 1 ends its PID namespace; nspawn then exits.
        // SAFETY: kill(2) on the pid of a process this lab started (the child of its nspawn).
        unsafe {
            libc::kill(self.leader as i32, libc::SIGKILL);
        }
        self.nspawn.stop(libc::SIGTERM, Duration::from_secs(10));
        // nspawn leaves this directory behind when /run is not a tmpfs.
        let _ = fs::remove_dir_all(format!("/run/systemd/nspawn/propagate/{}", self.machine));
        for dir in &self.cgroups {
            remove_cgroup(dir);
        }
    }
}
