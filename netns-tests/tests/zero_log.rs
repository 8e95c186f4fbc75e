//! The zero-log promise, proven on the real coordinator: it runs under `strace -f` and
//! `tcpdump` while nodes behind easy and hard NATs (and one without UDP) join, talk directly and
//! through its relay, leave, fail, and while it is itself killed and restarted. See the README,
//! "The zero-log promise", for which assertion proves which part of the promise.
//!
//! Needs root, `strace` and `tcpdump` (installed by `./run-tests`); under `CI=true` without root
//! it fails instead of skipping (see [`Lab::new`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use a2a_netns_tests::{
    garbage, metric, report, require_tools, scrape_metrics, wait_for, wait_until, Capture, Lab,
    Nat, Node, Ns, Proc, Router, COORDINATOR_PORT, OVERLAY_TIMEOUT,
};
use data_encoding::{
    BASE32_NOPAD, BASE64, BASE64URL, BASE64URL_NOPAD, BASE64_NOPAD, HEXLOWER, HEXUPPER,
};

/// Long enough for hole punching between two easy NATs.
const PATH_TIMEOUT: Duration = Duration::from_secs(25);
/// The TCP port the canary receivers listen on (over the overlay).
const CANARY_PORT: u16 = 9009;
/// How often the canary is repeated in one transfer: 33 bytes a line, about 1 MiB in all.
const CANARY_REPEAT: usize = 32 * 1024;

/// Receives one TCP connection on `0.0.0.0:PORT` and writes what it got to `OUT`.
const RECEIVER: &str = r#"
import socket, sys
port, out = int(sys.argv[1]), sys.argv[2]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
chunks = []
while True:
    b = c.recv(65536)
    if not b:
        break
    chunks.append(b)
open(out, "wb").write(b"".join(chunks))
c.close()
"#;

/// Sends the file `PATH` to `IP:PORT` over TCP (retrying the connect for 20 s), then waits for
/// the receiver to close.
const SENDER: &str = r#"
import socket, sys, time
ip, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = open(path, "rb").read()
deadline = time.time() + 20
while True:
    try:
        s = socket.create_connection((ip, port), timeout=5)
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.2)
s.settimeout(30)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
s.recv(1)
s.close()
"#;

/// Sends ARG3 five times as a plain UDP datagram to ARG1:ARG2.
const UDP_SENDER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"#;

/// `n` random characters of `[A-Za-z0-9]`.
fn random_text(n: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = garbage::Rng::new();
    (0..n)
        .map(|_| ALPHABET[rng.below(ALPHABET.len())] as char)
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

// ------------------------------------------------------------------------------------------
// The coordinator under strace
// ------------------------------------------------------------------------------------------

/// Where the traced coordinator serves its metrics (loopback of its namespace): the scrapes
/// are searched for identifiers like its output.
const METRICS: &str = "127.0.0.1:9300";

/// The real `a2a-coordinator`, started by `strace -f` (its file system calls, appended to one
/// trace file over every run) at its most verbose log level (`A2A_LOG=trace`), serving its
/// metrics at [`METRICS`].
struct TracedCoordinator {
    ns: Ns,
    addr: SocketAddrV4,
    state_dir: PathBuf,
    trace: PathBuf,
    bin: String,
    /// One process per run (strace, which exec'd from `ip netns exec`).
    runs: Vec<Proc>,
}

impl TracedCoordinator {
    fn new(lab: &Lab) -> TracedCoordinator {
        let ns = lab.add_ns("coord");
        let addr = SocketAddrV4::new(ns.wan_ip.expect("wan address"), COORDINATOR_PORT);
        // A fresh, empty state directory (as the .deb's unit gets from systemd): the identity
        // key is created in it under strace, at the first start.
        let state_dir = lab.dir().join("coord-state");
        let _ = fs::remove_dir_all(&state_dir);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&state_dir)
            .expect("create the coordinator's state dir");
        TracedCoordinator {
            ns,
            addr,
            state_dir,
            trace: lab.dir().join("coordinator.strace"),
            bin: lab.bins().coordinator.clone(),
            runs: Vec::new(),
        }
    }

    fn key_path(&self) -> PathBuf {
        self.state_dir.join("coordinator.key")
    }

    /// Starts a run and returns the token it prints.
    fn start(&mut self) -> String {
        let trace = self.trace.to_string_lossy().into_owned();
        let state = self.state_dir.to_string_lossy().into_owned();
        let listen = self.addr.to_string();
        let proc = self.ns.spawn(
            "coordinator",
            &[
                "env",
                "A2A_LOG=trace",
                "strace",
                "-f",
                "-A",
                "--seccomp-bpf",
                "-s",
                "4096",
                "-o",
                &trace,
                "-e",
                "trace=%file,ftruncate,fallocate,fchmod,fchown,fsetxattr,fremovexattr,bind",
                "--",
                &self.bin,
                "--listen",
                &listen,
                "--state-dir",
                &state,
                "--metrics",
                METRICS,
            ],
        );
        let token = wait_for(
            Duration::from_secs(20),
            "the traced coordinator's `join token:` line",
            || {
                if let Some(st) = proc.exit_status() {
                    panic!(
                        "strace/a2a-coordinator exited ({st:?}) before printing a token:\n{}",
                        proc.stderr_text()
                    );
                }
                proc.stdout_text()
                    .lines()
                    .find_map(|l| l.strip_prefix("join token: "))
                    .map(|t| t.trim().to_string())
                    .ok_or_else(|| "no token yet".to_string())
            },
        );
        self.runs.push(proc);
        token
    }

    /// Its metrics now, scraped with curl in its namespace.
    fn scrape(&self) -> String {
        scrape_metrics(&self.ns, METRICS)
    }

    fn strace_proc(&self) -> &Proc {
        self.runs.last().expect("the coordinator was started")
    }

    /// The pid of the coordinator itself: strace's child.
    fn coordinator_pid(&self) -> libc::pid_t {
        let strace = self.strace_proc().pid();
        let children = fs::read_to_string(format!("/proc/{strace}/task/{strace}/children"))
            .unwrap_or_default();
        let pids: Vec<libc::pid_t> = children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        assert_eq!(
            pids.len(),
            1,
            "strace (pid {strace}) should have exactly one child, the coordinator: {pids:?}"
        );
        let comm = fs::read_to_string(format!("/proc/{}/comm", pids[0])).unwrap_or_default();
        assert!(
            comm.starts_with("a2a-coordinat"),
            "strace's child {} is {comm:?}, not the coordinator",
            pids[0]
        );
        pids[0]
    }

    /// Sends `signal` to the coordinator (not to strace) and waits for strace to end.
    fn signal_and_wait(&self, signal: i32) {
        let pid = self.coordinator_pid();
        // SAFETY: kill(2) on the coordinator this test started.
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "kill({pid}, {signal})"
        );
        let strace = self.strace_proc();
        wait_until(
            Duration::from_secs(20),
            "strace to end after the coordinator did",
            || !strace.is_running(),
        );
    }

    /// Everything the coordinator printed, over all runs (stdout, then stderr, per run).
    fn output(&self) -> String {
        self.runs
            .iter()
            .map(|p| format!("{}{}", p.stdout_text(), p.stderr_text()))
            .collect()
    }

    fn trace_len(&self) -> usize {
        fs::metadata(&self.trace)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// Asserts that the state directory holds the key file, 0600, and nothing else.
    #[track_caller]
    fn assert_state_dir_holds_only_the_key(&self) {
        let mut files: Vec<String> = fs::read_dir(&self.state_dir)
            .expect("read the coordinator's state dir")
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            ["coordinator.key"],
            "the coordinator's state dir holds more than its key"
        );
        let mode = fs::metadata(self.key_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the coordinator's key has mode {mode:o}");
    }
}

/// One system call from strace's output, unfinished/resumed halves joined.
#[derive(Debug, Clone)]
struct Syscall {
    name: String,
    args: String,
    ret: String,
    line: String,
}

impl Syscall {
    fn succeeded(&self) -> bool {
        // "= 0", "= 3"; failures are "= -1 ENOENT (...)", and "= ?" never returned.
        self.ret
            .split_whitespace()
            .next()
            .and_then(|r| r.parse::<i64>().ok())
            .is_some_and(|r| r >= 0)
    }

    /// The first quoted string argument (the path for the file calls traced here).
    fn path(&self) -> Option<&str> {
        let start = self.args.find('"')? + 1;
        let len = self.args[start..].find('"')?;
        Some(&self.args[start..start + len])
    }
}

/// Parses strace's output; returns the calls and the lines it could not read (which the
/// assertions refuse, so that nothing is skipped unseen). A call still unfinished at the end
/// (its process was killed in it) counts, with the return value `?`.
fn parse_strace(text: &str) -> (Vec<Syscall>, Vec<String>) {
    use std::collections::HashMap;
    let mut pending: HashMap<String, String> = HashMap::new();
    let mut calls = Vec::new();
    let mut unparsed = Vec::new();
    let parse = |line: String, calls: &mut Vec<Syscall>, unparsed: &mut Vec<String>| {
        let call = line
            .find('(')
            .zip(line.rfind(" = "))
            .and_then(|(open, eq)| {
                let name = &line[..open];
                let ok = open < eq
                    && !name.is_empty()
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                ok.then(|| Syscall {
                    name: name.to_string(),
                    args: line[open + 1..eq]
                        .trim_end()
                        .trim_end_matches(')')
                        .to_string(),
                    ret: line[eq + 3..].trim().to_string(),
                    line: line.clone(),
                })
            });
        match call {
            Some(c) => calls.push(c),
            None => unparsed.push(line),
        }
    };
    for raw in text.lines().filter(|l| !l.trim().is_empty()) {
        // "PID  rest" (strace -f -o FILE prefixes every line with the pid).
        let (pid, rest) = match raw.split_once(' ') {
            Some((p, r)) if p.chars().all(|c| c.is_ascii_digit()) => {
                (p.to_string(), r.trim_start())
            }
            _ => (String::new(), raw),
        };
        if rest.starts_with("+++") || rest.starts_with("---") {
            continue; // exits and signals
        }
        if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid, head.to_string());
            continue;
        }
        let line = match rest.strip_prefix("<... ") {
            Some(tail) => match (tail.split_once(" resumed>"), pending.remove(&pid)) {
                (Some((_, after)), Some(head)) => format!("{head}{after}"),
                _ => {
                    unparsed.push(raw.to_string());
                    continue;
                }
            },
            None => rest.to_string(),
        };
        parse(line, &mut calls, &mut unparsed);
    }
    for (_, head) in pending {
        parse(format!("{head}) = ?"), &mut calls, &mut unparsed);
    }
    (calls, unparsed)
}

/// What one run of the coordinator did to the file system, from its strace.
struct FileActivity {
    calls: usize,
    /// Lines of the trace that are no system call the parser knows how to read.
    unparsed: Vec<String>,
    /// Opens for writing or creating (O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND, O_TMPFILE,
    /// or creat), successful or not.
    write_opens: Vec<Syscall>,
    /// Calls that change the file system (mkdir, rename, link, unlink, truncate, chmod, ...)
    /// and binds of Unix sockets (which create a file).
    changes: Vec<Syscall>,
    /// Binds of network sockets (to show the trace covers the serving part too).
    inet_binds: Vec<Syscall>,
}

fn file_activity((calls, unparsed): &(Vec<Syscall>, Vec<String>)) -> FileActivity {
    const WRITE_FLAGS: &[&str] = &[
        "O_WRONLY",
        "O_RDWR",
        "O_CREAT",
        "O_TRUNC",
        "O_APPEND",
        "O_TMPFILE",
    ];
    const CHANGES: &[&str] = &[
        "mkdir",
        "mkdirat",
        "rmdir",
        "rename",
        "renameat",
        "renameat2",
        "link",
        "linkat",
        "symlink",
        "symlinkat",
        "unlink",
        "unlinkat",
        "truncate",
        "ftruncate",
        "fallocate",
        "mknod",
        "mknodat",
        "chmod",
        "fchmod",
        "fchmodat",
        "fchmodat2",
        "chown",
        "lchown",
        "fchown",
        "fchownat",
        "utime",
        "utimes",
        "utimensat",
        "futimesat",
        "setxattr",
        "lsetxattr",
        "fsetxattr",
        "removexattr",
        "lremovexattr",
        "fremovexattr",
        "mount",
        "umount2",
        "swapon",
        "swapoff",
        "acct",
        "chroot",
        "pivot_root",
    ];
    let mut act = FileActivity {
        calls: calls.len(),
        unparsed: unparsed.clone(),
        write_opens: Vec::new(),
        changes: Vec::new(),
        inet_binds: Vec::new(),
    };
    for c in calls {
        let n = c.name.as_str();
        if n == "creat"
            || (n.starts_with("open")
                && c.args
                    .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                    .any(|tok| WRITE_FLAGS.contains(&tok)))
        {
            act.write_opens.push(c.clone());
        } else if CHANGES.contains(&n) {
            act.changes.push(c.clone());
        } else if n == "bind" {
            if c.args.contains("AF_UNIX") || c.args.contains("AF_LOCAL") {
                act.changes.push(c.clone());
            } else {
                act.inet_binds.push(c.clone());
            }
        }
    }
    act
}

fn lines(calls: &[Syscall]) -> String {
    calls
        .iter()
        .map(|c| format!("  {}\n", c.line))
        .collect::<String>()
}

/// Asserts the file-system part of the promise for one run. `creates_key`: the first run,
/// whose only write is its new identity key.
#[track_caller]
fn assert_no_file_written(
    run: &str,
    act: &FileActivity,
    coord: &TracedCoordinator,
    creates_key: bool,
) {
    let key = coord.key_path().to_string_lossy().into_owned();
    let state = coord.state_dir.to_string_lossy().into_owned();
    assert!(
        act.unparsed.is_empty(),
        "{run}: strace lines the test cannot read (so cannot vouch for):\n{}",
        act.unparsed.join("\n")
    );
    assert!(
        act.calls > 0
            && act
                .inet_binds
                .iter()
                .any(|b| b.args.contains(&format!("htons({COORDINATOR_PORT})"))),
        "{run}: the trace shows no bind of port {COORDINATOR_PORT}: strace did not follow the \
         coordinator ({} calls traced)",
        act.calls
    );
    if creates_key {
        let ok = act.write_opens.len() == 1
            && act.write_opens[0].path() == Some(key.as_str())
            && act.write_opens[0].args.contains("O_CREAT")
            && act.write_opens[0].args.contains("O_EXCL")
            && act.write_opens[0].succeeded();
        assert!(
            ok,
            "{run}: the only file opened for writing must be the new key {key} (O_CREAT|O_EXCL); \
             write opens:\n{}",
            lines(&act.write_opens)
        );
    } else {
        assert!(
            act.write_opens.is_empty(),
            "{run}: the coordinator opened files for writing:\n{}",
            lines(&act.write_opens)
        );
    }
    // The key's loader asks for its directory (recursive mkdir) and is told it exists: the
    // only change attempted, and it changes nothing.
    let unexpected: Vec<Syscall> = act
        .changes
        .iter()
        .filter(|c| {
            !(c.name.starts_with("mkdir")
                && c.path() == Some(state.as_str())
                && !c.succeeded()
                && c.ret.contains("EEXIST"))
        })
        .cloned()
        .collect();
    assert!(
        unexpected.is_empty(),
        "{run}: the coordinator changed (or tried to change) the file system:\n{}",
        lines(&unexpected)
    );
}

// ------------------------------------------------------------------------------------------
// Identifiers that must never be printed
// ------------------------------------------------------------------------------------------

/// One string the coordinator must not print, and what it is.
struct Needle {
    what: String,
    text: String,
    /// Match only where it is not part of a longer number (addresses, ports).
    bounded: bool,
}

/// Every printable form of a 32-byte key: base64 (padded or not, standard or URL-safe), hex,
/// base32, a Rust byte-array `Debug`, and 8-character prefixes (short ids).
fn key_forms(what: &str, key: &[u8; 32]) -> Vec<Needle> {
    let mut forms = vec![
        BASE64.encode(key),
        BASE64_NOPAD.encode(key),
        BASE64URL.encode(key),
        BASE64URL_NOPAD.encode(key),
        HEXLOWER.encode(key),
        HEXUPPER.encode(key),
        BASE32_NOPAD.encode(key),
        BASE32_NOPAD.encode(key).to_ascii_lowercase(),
        format!("{:?}", key)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        BASE64.encode(key)[..8].to_string(),
        BASE64URL.encode(key)[..8].to_string(),
    ];
    let short_hex = HEXLOWER.encode(&key[..4]);
    // An all-digit short id could be a counter's value.
    if !short_hex.chars().all(|c| c.is_ascii_digit()) {
        forms.push(short_hex.clone());
        forms.push(short_hex.to_ascii_uppercase());
    }
    forms.sort();
    forms.dedup();
    forms
        .into_iter()
        .map(|text| Needle {
            what: what.to_string(),
            text,
            bounded: false,
        })
        .collect()
}

fn addr_needles(what: &str, ip: Ipv4Addr) -> Needle {
    Needle {
        what: what.to_string(),
        text: ip.to_string(),
        bounded: true,
    }
}

fn port_needles(what: &str, port: u16) -> Vec<Needle> {
    [":", "port=", "port ", "port: ", "port\":", "port\": "]
        .iter()
        .map(|p| Needle {
            what: what.to_string(),
            text: format!("{p}{port}"),
            bounded: true,
        })
        .collect()
}

/// Whether `needle` occurs in `hay`; when bounded, not inside a longer number or address.
fn occurs(hay: &str, n: &Needle) -> bool {
    let bytes = hay.as_bytes();
    let mut from = 0;
    while let Some(i) = hay[from..].find(&n.text) {
        let at = from + i;
        let end = at + n.text.len();
        if !n.bounded {
            return true;
        }
        let first = n.text.as_bytes()[0];
        let before_ok = !first.is_ascii_digit()
            || at == 0
            || !(bytes[at - 1].is_ascii_digit() || bytes[at - 1] == b'.');
        let after_ok = end >= bytes.len() || !bytes[end].is_ascii_digit();
        if before_ok && after_ok {
            return true;
        }
        from = at + 1;
    }
    false
}

/// Collects what the coordinator knows about `node` (and its router): key, name, overlay
/// address, every underlay address and port.
fn node_needles(node: &Node, router: Option<&Router>) -> Vec<Needle> {
    let st = node.status();
    let me = st
        .me
        .clone()
        .unwrap_or_else(|| panic!("{} has no self in its status", node.name));
    let label = |what: &str| format!("{}'s {what}", node.name);
    let key: [u8; 32] = a2a_proto::keys::base64_exact(&me.public_key).unwrap_or_else(|| {
        panic!(
            "{}: public key {:?} is not base64",
            node.name, me.public_key
        )
    });
    let mut needles = key_forms(&label("public key"), &key);
    needles.push(Needle {
        what: label("name"),
        text: me.name.clone(),
        bounded: false,
    });
    needles.push(addr_needles(&label("overlay address"), me.ip));
    // Its underlay: the addresses on its interfaces, its router's wan address, and what the
    // coordinator saw (netcheck's reflexive addresses, also the published local candidates).
    let out = node
        .ns
        .exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .expect_ok();
    let mut addrs: BTreeSet<Ipv4Addr> = out
        .stdout
        .split_whitespace()
        .filter_map(|w| w.split('/').next()?.parse().ok())
        .collect();
    if let Some(r) = router {
        addrs.insert(r.wan_ip());
    }
    let nc = node.netcheck();
    let mut ports: BTreeSet<u16> = BTreeSet::new();
    for field in ["reflexive", "reflexive_alt"] {
        if let Some(sa) = nc[field]
            .as_str()
            .and_then(|s| s.parse::<SocketAddrV4>().ok())
        {
            addrs.insert(*sa.ip());
            ports.insert(sa.port());
        }
    }
    for l in nc["local"].as_array().into_iter().flatten() {
        if let Some(ip) = l.as_str().and_then(|s| s.parse::<Ipv4Addr>().ok()) {
            addrs.insert(ip);
        }
    }
    assert!(
        !addrs.is_empty(),
        "{}: found no underlay address (netcheck {nc})",
        node.name
    );
    for a in addrs {
        needles.push(addr_needles(&label("underlay address"), a));
    }
    for p in ports {
        needles.extend(port_needles(&label("reflexive UDP port"), p));
    }
    needles
}

/// The TCP peers (address and port) of the coordinator's established control connections.
fn control_peers(coord: &TracedCoordinator) -> Vec<SocketAddrV4> {
    let out = coord
        .ns
        .exec(&["ss", "-Htn", "state", "established"])
        .expect_ok();
    out.stdout
        .lines()
        .filter_map(|l| {
            let addrs: Vec<SocketAddrV4> = l
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            match addrs[..] {
                [local, peer] if local.port() == COORDINATOR_PORT => Some(peer),
                _ => None,
            }
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// Packet captures
// ------------------------------------------------------------------------------------------

/// Traffic to and from the coordinator's port in a capture.
#[derive(Debug, Default)]
struct CoordTraffic {
    frames: usize,
    /// UDP relay data (`A2 05 ...`) sent to the coordinator's port: packets, payload bytes.
    relay_in: (usize, usize),
    /// UDP relay data the coordinator sent out.
    relay_out: (usize, usize),
    /// TCP payload to the coordinator's port (control channel, relay frames of nodes without
    /// UDP) and from it.
    tcp_in: (usize, usize),
    tcp_out: (usize, usize),
}

/// Parses a classic pcap file of Ethernet frames.
fn coord_traffic(pcap: &[u8], coord: SocketAddrV4) -> CoordTraffic {
    use a2a_proto::udp::{A2A_MAGIC, KIND_RELAY_DATA};
    assert!(pcap.len() >= 24, "the capture has no pcap header");
    let magic = u32::from_le_bytes(pcap[0..4].try_into().unwrap());
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        m => panic!("not a pcap file (magic {m:#x})"),
    };
    let u32_at = |b: &[u8], i: usize| {
        let a: [u8; 4] = b[i..i + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = u32_at(pcap, 20);
    assert_eq!(linktype, 1, "expected an Ethernet capture (link type 1)");
    let be16 = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let mut t = CoordTraffic::default();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let incl = u32_at(pcap, at + 8) as usize;
        let frame = &pcap[at + 16..(at + 16 + incl).min(pcap.len())];
        at += 16 + incl;
        t.frames += 1;
        if frame.len() < 14 + 20 || be16(frame, 12) != 0x0800 {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(be16(ip, 2)).min(ip.len());
        if ihl < 20 || total < ihl {
            continue;
        }
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let l4 = &ip[ihl..total];
        let port = coord.port();
        match ip[9] {
            17 if l4.len() >= 8 => {
                let payload = &l4[8..];
                let relay =
                    payload.len() > 2 && payload[0] == A2A_MAGIC && payload[1] == KIND_RELAY_DATA;
                if !relay {
                    continue;
                }
                if dst == *coord.ip() && be16(l4, 2) == port {
                    t.relay_in.0 += 1;
                    t.relay_in.1 += payload.len();
                } else if src == *coord.ip() && be16(l4, 0) == port {
                    t.relay_out.0 += 1;
                    t.relay_out.1 += payload.len();
                }
            }
            6 if l4.len() >= 20 => {
                let off = usize::from(l4[12] >> 4) * 4;
                let payload = l4.len().saturating_sub(off);
                if payload == 0 {
                    continue;
                }
                if dst == *coord.ip() && be16(l4, 2) == port {
                    t.tcp_in.0 += 1;
                    t.tcp_in.1 += payload;
                } else if src == *coord.ip() && be16(l4, 0) == port {
                    t.tcp_out.0 += 1;
                    t.tcp_out.1 += payload;
                }
            }
            _ => {}
        }
    }
    t
}

/// Sends `payload` from `from` to `to`'s overlay address over TCP and checks it arrived whole.
fn transfer(lab: &Lab, from: &Node, to: &Node, payload: &Path) {
    let out = lab.dir().join(format!("received-by-{}", to.name));
    let _ = fs::remove_file(&out);
    let receiver = to.ns.spawn(
        "canary-rx",
        &[
            "python3",
            "-c",
            RECEIVER,
            &CANARY_PORT.to_string(),
            &out.to_string_lossy(),
        ],
    );
    wait_until(Duration::from_secs(15), "the canary receiver", || {
        receiver.assert_running();
        receiver.stdout_text().contains("ready")
    });
    from.ns
        .exec_timeout(
            &[
                "python3",
                "-c",
                SENDER,
                &to.overlay_ip().to_string(),
                &CANARY_PORT.to_string(),
                &payload.to_string_lossy(),
            ],
            Duration::from_secs(60),
        )
        .expect_ok();
    wait_until(
        Duration::from_secs(20),
        "the canary receiver to finish",
        || !receiver.is_running(),
    );
    let got = fs::read(&out).unwrap_or_default();
    let want = fs::read(payload).unwrap();
    assert!(
        got == want,
        "{} -> {}: the receiver got {} bytes, not the {} sent",
        from.name,
        to.name,
        got.len(),
        want.len()
    );
}

/// The counters the coordinator printed when it stopped (SIGTERM) at the end of `run`,
/// checked to be `name=number` only.
fn shutdown_counters(run: &Proc) -> BTreeMap<String, u64> {
    let err = run.stderr_text();
    let stats = err
        .lines()
        .find_map(|l| l.split_once("shutting down; all registrations were in memory only; "))
        .map(|(_, s)| s.to_string())
        .unwrap_or_else(|| panic!("the coordinator's output lacks its shutdown line:\n{err}"));
    stats
        .trim_start_matches("live ")
        .split_whitespace()
        .map(|field| {
            field
                .split_once('=')
                .and_then(|(k, v)| Some((k.to_string(), v.parse::<u64>().ok()?)))
                .unwrap_or_else(|| {
                    panic!("{field:?} in the coordinator's counters is not name=number: {stats}")
                })
        })
        .collect()
}

/// Whether the process is stopped (state `T` in /proc/PID/stat).
fn is_stopped(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('T')))
        .unwrap_or(false)
}

fn signal_daemon(node: &Node, signal: i32) {
    let pid = node.daemon().pid();
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(
        comm.trim(),
        "a2ad",
        "pid {pid} of {} is not a2ad",
        node.name
    );
    // SAFETY: kill(2) on a daemon this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, signal) }, 0);
}

#[test]
fn zero_log_coordinator_under_strace_and_tcpdump() {
    let Some(lab) = Lab::new("zero_log") else {
        return;
    };
    require_tools(&[
        ("strace", "strace"),
        ("tcpdump", "tcpdump"),
        ("ss", "iproute2"),
        ("nft", "nftables"),
    ]);
    let tag = random_text(6).to_ascii_lowercase();
    let name = |n: &str| format!("{n}-{tag}");

    // The coordinator under strace, its interface under tcpdump from before the first packet.
    let mut coord = TracedCoordinator::new(&lab);
    let coord_cap = Capture::start(&coord.ns, "eth0", lab.dir().join("coord-eth0.pcap"));
    let token = coord.start();
    let first_token = a2a_proto::JoinToken::parse(&token).expect("the coordinator's token parses");

    // An easy pair (direct), a hard pair (relayed over UDP), a node without UDP (relayed over
    // TCP), and open nodes that will leave, fail, and be invited then kicked.
    let easy1 = lab.router("rtr-easy1", Nat::Easy);
    let easy2 = lab.router("rtr-easy2", Nat::Easy);
    let hard1 = lab.router("rtr-hard1", Nat::Hard);
    let hard2 = lab.router("rtr-hard2", Nat::Hard);
    let noudp = lab.router("rtr-noudp", Nat::NoUdp);
    let ea = lab.node_behind(&easy1, &name("easy-a"));
    let eb = lab.node_behind(&easy2, &name("easy-b"));
    let ha = lab.node_behind(&hard1, &name("hard-a"));
    let hb = lab.node_behind(&hard2, &name("hard-b"));
    let nu = lab.node_behind(&noudp, &name("noudp"));
    let leaver = lab.node(&name("leaver"));
    let crasher = lab.node(&name("crasher"));
    let invitee = lab.node(&name("invitee"));
    let behind: [(&Node, Option<&Router>); 8] = [
        (&ea, Some(&easy1)),
        (&eb, Some(&easy2)),
        (&ha, Some(&hard1)),
        (&hb, Some(&hard2)),
        (&nu, Some(&noudp)),
        (&leaver, None),
        (&crasher, None),
        (&invitee, None),
    ];
    for (n, _) in &behind[..7] {
        n.serve_http();
        n.up_ok(&token);
    }
    // The last one joins with an invite from easy-a (redeemed through the coordinator).
    let code = ea
        .ctl(&["invite", "--uses", "1", "--ttl", "10m"])
        .expect_ok()
        .stdout
        .trim()
        .to_string();
    let invite = a2a_proto::invite::InviteCode::parse(&code).expect("the invite code parses");
    invitee.serve_http();
    invitee.up_ok(&code);
    let names = |ns: &[&Node]| ns.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
    let all: Vec<&Node> = behind.iter().map(|(n, _)| *n).collect();
    for n in &all {
        let others: Vec<String> = names(&all).into_iter().filter(|m| *m != n.name).collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        n.wait_peers(&others, OVERLAY_TIMEOUT);
    }
    ea.wait_path(&eb.name, "direct", PATH_TIMEOUT);
    eb.wait_path(&ea.name, "direct", PATH_TIMEOUT);
    for (a, b) in [(&ha, &hb), (&hb, &ha), (&nu, &ha), (&ha, &nu)] {
        a.wait_path(&b.name, "relay", PATH_TIMEOUT);
    }
    assert_eq!(
        nu.netcheck()["relay"],
        "tcp",
        "the no-UDP node should relay over TCP"
    );
    for (a, b) in [
        (&ea, &eb),
        (&eb, &ea),
        (&ha, &hb),
        (&hb, &ha),
        (&nu, &ha),
        (&leaver, &hb),
        (&crasher, &nu),
        (&invitee, &hb),
    ] {
        a.wait_http(b, OVERLAY_TIMEOUT);
    }

    // Tags and a policy, which the coordinator keeps (in memory) and passes on: a grant that
    // lets everything through first (the relay checks below still run), and one naming a tag
    // and a port of their own.
    let policy_tag = format!("t{}", random_text(10).to_ascii_lowercase());
    let policy_port = 20000 + (random_text(4).bytes().map(u16::from).sum::<u16>() % 20000);
    ea.ctl(&["tag", &eb.name, &policy_tag]).expect_ok();
    let policy = format!(
        r#"{{"grants": [{{"src": ["*"], "dst": ["*"], "ports": ["*"]}},
            {{"src": ["tag:{policy_tag}"], "dst": ["{}"], "ports": ["tcp:{policy_port}"]}}]}}"#,
        ha.name
    );
    let policy_file = lab.dir().join("zero-log-policy.json");
    fs::write(&policy_file, &policy).unwrap();
    ea.ctl(&["policy", "set", &policy_file.to_string_lossy()])
        .expect_ok();
    wait_for(OVERLAY_TIMEOUT, "the policy on hard-b", || {
        let out = hb.ctl(&["policy", "show", "--json"]).expect_ok();
        if out.stdout.contains(&policy_tag) {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });

    // What the coordinator holds about each node, and so must never print.
    let mut needles: Vec<Needle> = Vec::new();
    for (n, r) in &behind {
        needles.extend(node_needles(n, *r));
    }
    needles.push(Needle {
        what: "a tag".into(),
        text: policy_tag.clone(),
        bounded: false,
    });
    needles.push(Needle {
        what: "the policy's grants".into(),
        text: "\"grants\"".into(),
        bounded: false,
    });
    let peers = wait_for(
        OVERLAY_TIMEOUT,
        "one control connection per node at the coordinator",
        || {
            let peers = control_peers(&coord);
            if peers.len() == all.len() {
                Ok(peers)
            } else {
                Err(format!("{peers:?}"))
            }
        },
    );
    for p in &peers {
        needles.push(addr_needles("a node's control connection source", *p.ip()));
        needles.extend(port_needles("a node's control connection port", p.port()));
    }
    let network_id = a2a_proto::NetworkKey::derive(&first_token.network_secret).id();
    needles.extend(key_forms("the network id", &network_id.0));
    // The invite's id is all the coordinator knows of it (hex); never printed either.
    let invite_id = invite.id().to_hex();
    for text in [
        invite_id.clone(),
        invite_id.to_ascii_uppercase(),
        invite_id[..8].to_string(),
    ] {
        needles.push(Needle {
            what: "the invite id".into(),
            text,
            bounded: false,
        });
    }

    // The canary crosses the direct path, the UDP relay (hard-a -> hard-b, with hard-a's TUN
    // captured) and the TCP relay (noudp -> hard-a).
    let canary = random_text(32);
    let payload = lab.dir().join("canary-payload");
    fs::write(&payload, format!("{canary}\n").repeat(CANARY_REPEAT)).unwrap();
    let payload_len = fs::metadata(&payload).unwrap().len() as usize;
    // The metrics are scraped between the transfers (and later after the departures and in
    // the last run): each scrape is searched for identifiers too, and the relay counters must
    // move by at least the payload over each relay, or the scrape is not the real thing.
    let mut scrapes = vec![coord.scrape()];
    transfer(&lab, &ea, &eb, &payload);
    scrapes.push(coord.scrape());
    let tun_cap = Capture::start(&ha.ns, "a2a0", lab.dir().join("hard-a-a2a0.pcap"));
    transfer(&lab, &ha, &hb, &payload);
    scrapes.push(coord.scrape());
    tun_cap.wait_for(canary.as_bytes());
    let (tun_pcap, tun_summary) = tun_cap.finish();
    transfer(&lab, &nu, &ha, &payload);
    scrapes.push(coord.scrape());
    let moved = |name: &str, from: usize, to: usize| {
        let value = |i: usize| {
            metric(&scrapes[i], name)
                .unwrap_or_else(|| panic!("no {name} in scrape {i}:\n{}", scrapes[i]))
        };
        value(to).saturating_sub(value(from))
    };
    let udp_bytes = moved("a2a_coordinator_relayed_udp_bytes_total", 1, 2);
    let tcp_bytes = moved("a2a_coordinator_relayed_tcp_bytes_total", 2, 3);
    report(format!(
        "zero_log: metrics: the {payload_len}-byte transfers moved the relay counters by \
         {} datagrams / {udp_bytes} bytes over UDP (hard-a -> hard-b), {} datagrams / \
         {tcp_bytes} bytes over TCP (noudp -> hard-a)",
        moved("a2a_coordinator_relayed_udp_total", 1, 2),
        moved("a2a_coordinator_relayed_tcp_total", 2, 3),
    ));
    assert!(
        udp_bytes >= payload_len as u64 && tcp_bytes >= payload_len as u64,
        "the metrics should count the {payload_len}-byte transfers relayed over UDP and TCP: \
         {udp_bytes} and {tcp_bytes} bytes\n--- before ---\n{}\n--- after ---\n{}",
        scrapes[1],
        scrapes[3]
    );
    for (a, b) in [(&ha, &hb), (&nu, &ha)] {
        assert_eq!(
            a.path_to(&b.name).unwrap().0,
            "relay",
            "{} -> {} left the relay during the transfer",
            a.name,
            b.name
        );
    }
    // The control: another canary in plain UDP to the coordinator's port, from hard-a.
    let control = random_text(32);
    ha.ns
        .exec(&[
            "python3",
            "-c",
            UDP_SENDER,
            &coord.addr.ip().to_string(),
            &COORDINATOR_PORT.to_string(),
            &control,
        ])
        .expect_ok();
    needles.push(Needle {
        what: "the canary".into(),
        text: canary.clone(),
        bounded: false,
    });

    // Until the control datagrams are captured (or 10 s), then read the coordinator's capture.
    coord_cap.wait_for(control.as_bytes());
    let (pcap, summary) = coord_cap.finish();
    let traffic = coord_traffic(&pcap, coord.addr);
    report(format!(
        "zero_log: coordinator capture: {} bytes, {} frames ({summary}); relay UDP in {} packets / \
         {} bytes, out {} / {}; TCP in {} segments / {} bytes, out {} / {}",
        pcap.len(),
        traffic.frames,
        traffic.relay_in.0,
        traffic.relay_in.1,
        traffic.relay_out.0,
        traffic.relay_out.1,
        traffic.tcp_in.0,
        traffic.tcp_in.1,
        traffic.tcp_out.0,
        traffic.tcp_out.1,
    ));
    report(format!(
        "zero_log: hard-a's a2a0 capture: {} bytes ({tun_summary})",
        tun_pcap.len()
    ));
    // Not vacuous: the relayed transfers are in the capture (hard-a's over UDP, noudp's over
    // TCP), and a plaintext canary in a capture is found.
    assert!(
        traffic.relay_in.1 >= payload_len && traffic.relay_out.1 >= payload_len,
        "the coordinator's capture should hold the {payload_len}-byte UDP-relayed transfer in \
         both directions: {traffic:?} ({summary})"
    );
    assert!(
        traffic.tcp_in.1 >= payload_len,
        "the coordinator's capture should hold the {payload_len}-byte TCP-relayed transfer: \
         {traffic:?} ({summary})"
    );
    assert!(
        contains(&tun_pcap, canary.as_bytes()),
        "the canary is not in the capture of hard-a's TUN device: the search cannot find it"
    );
    assert!(
        contains(&pcap, control.as_bytes()),
        "the plaintext control canary sent to the coordinator's port is not in its capture: the \
         search cannot find it"
    );
    assert!(
        !contains(&pcap, canary.as_bytes()),
        "the canary sent through the relay appears in plaintext on the coordinator's interface"
    );

    // A node leaves, another fails, the invited one is kicked: the others see all three go.
    // (The kicked node's daemon is then stopped: members keep its revocation, but the frozen
    // members below could not re-send it to a restarted coordinator in time.)
    leaver.ctl(&["down"]).expect_ok();
    crasher.stop_daemon(libc::SIGKILL);
    ea.ctl(&["kick", &invitee.name]).expect_ok();
    let survivors: Vec<&Node> = vec![&ea, &eb, &ha, &hb, &nu];
    for n in &survivors {
        let others: Vec<String> = names(&survivors)
            .into_iter()
            .filter(|m| *m != n.name)
            .collect();
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        n.wait_peers(&others, OVERLAY_TIMEOUT);
    }
    invitee.stop_daemon(libc::SIGTERM);
    scrapes.push(coord.scrape());

    // The first run stops cleanly: its last line counts what it did, in numbers only (the
    // relayed transfers, the plaintext datagrams it dropped), and names nobody.
    coord.signal_and_wait(libc::SIGTERM);
    let mut run_ends = vec![coord.trace_len()];
    coord.assert_state_dir_holds_only_the_key();
    let c1 = shutdown_counters(coord.strace_proc());
    report(format!(
        "zero_log: first run's counters at shutdown: {c1:?}"
    ));
    for (counter, at_least) in [
        ("members", survivors.len() as u64),
        ("networks", 1),
        ("registrations", all.len() as u64),
        ("relayed_udp", 1),
        ("relayed_tcp", 1),
        ("udp_dropped", 5),
        ("redemptions", 1),
        ("revocations", 1),
    ] {
        assert!(
            c1.get(counter).is_some_and(|v| *v >= at_least),
            "the first run's {counter} should be at least {at_least}: {c1:?}"
        );
    }

    // Restart, and the survivors re-register (same token, same coordinator key).
    let token2 = coord.start();
    let second_token = a2a_proto::JoinToken::parse(&token2).unwrap();
    assert_eq!(
        second_token.coordinator_key, first_token.coordinator_key,
        "the restarted coordinator has another key: it did not reuse its state dir"
    );
    wait_until(
        OVERLAY_TIMEOUT,
        "the survivors to reconnect to the restarted coordinator",
        || control_peers(&coord).len() == survivors.len(),
    );

    // Restart with kill -9: with every daemon frozen (no re-registration possible), kill -9 the
    // coordinator and start it again on the same state dir and port. A brand-new node joining
    // the same network must see nobody: the member list was not on disk.
    for n in &survivors {
        signal_daemon(n, libc::SIGSTOP);
        let pid = n.daemon().pid();
        wait_until(Duration::from_secs(5), "a2ad to stop", || is_stopped(pid));
    }
    coord.signal_and_wait(libc::SIGKILL);
    run_ends.push(coord.trace_len());
    coord.assert_state_dir_holds_only_the_key();
    let token3 = coord.start();
    assert_eq!(
        a2a_proto::JoinToken::parse(&token3)
            .unwrap()
            .coordinator_key,
        first_token.coordinator_key,
        "the coordinator restarted after kill -9 has another key"
    );
    let fresh = lab.node(&name("fresh"));
    fresh.serve_http();
    fresh.up_ok(&token);
    let st = fresh.status();
    assert!(
        st.peers.is_empty(),
        "a node joining the restarted coordinator sees peers while all others are frozen: {:?}",
        st.raw
    );
    // Still nobody a few seconds later (the frozen daemons cannot have re-registered).
    std::thread::sleep(Duration::from_secs(3));
    let st = fresh.status();
    assert!(
        st.peers.is_empty(),
        "the restarted coordinator listed peers nobody re-registered: {:?}",
        st.raw
    );
    // Thawed, they re-register, and only they reappear (not the node that left or failed).
    for n in &survivors {
        signal_daemon(n, libc::SIGCONT);
    }
    let back: Vec<String> = names(&survivors);
    let back: Vec<&str> = back.iter().map(String::as_str).collect();
    fresh.wait_peers(&back, OVERLAY_TIMEOUT);
    fresh.wait_http(&hb, OVERLAY_TIMEOUT);
    hb.wait_http(&fresh, OVERLAY_TIMEOUT);
    needles.extend(node_needles(&fresh, None));
    coord.assert_state_dir_holds_only_the_key();
    let last = coord.scrape();
    assert_eq!(
        metric(&last, "a2a_coordinator_members"),
        Some(survivors.len() as u64 + 1),
        "the last run's metrics should count its live members:\n{last}"
    );
    scrapes.push(last);

    // Stop it cleanly and read what it did and said.
    coord.signal_and_wait(libc::SIGTERM);
    run_ends.push(coord.trace_len());
    coord.assert_state_dir_holds_only_the_key();
    let c3 = shutdown_counters(coord.strace_proc());
    assert_eq!(
        (c3.get("members"), c3.get("networks")),
        (Some(&(survivors.len() as u64 + 1)), Some(&1)),
        "the last run should count the {} live members of one network: {c3:?}",
        survivors.len() + 1
    );
    let trace = fs::read_to_string(&coord.trace).expect("read the strace output");
    let mut from = 0;
    let mut summary = Vec::new();
    for (i, end) in run_ends.iter().enumerate() {
        let act = file_activity(&parse_strace(&trace[from..*end]));
        from = *end;
        summary.push(format!(
            "run {}: {} file calls, {} write opens, {} changes attempted",
            i + 1,
            act.calls,
            act.write_opens.len(),
            act.changes.len()
        ));
        assert_no_file_written(&format!("run {}", i + 1), &act, &coord, i == 0);
    }
    report(format!("zero_log: strace: {}", summary.join("; ")));

    let output = coord.output();
    let leaks: Vec<String> = needles
        .iter()
        .filter(|n| occurs(&output, n))
        .map(|n| format!("{} ({:?})", n.what, n.text))
        .collect();
    report(format!(
        "zero_log: coordinator output: {} lines, {} bytes over {} runs, searched for {} forms of \
         node identifiers",
        output.lines().count(),
        output.len(),
        coord.runs.len(),
        needles.len()
    ));
    assert!(
        leaks.is_empty(),
        "the coordinator printed node identifiers: {leaks:?}\n--- its output ---\n{output}"
    );
    let scraped = scrapes.join("");
    let leaks: Vec<String> = needles
        .iter()
        .filter(|n| occurs(&scraped, n))
        .map(|n| format!("{} ({:?})", n.what, n.text))
        .collect();
    report(format!(
        "zero_log: metrics: {} scrapes, {} bytes, searched for the same {} forms",
        scrapes.len(),
        scraped.len(),
        needles.len()
    ));
    assert!(
        leaks.is_empty(),
        "the coordinator's metrics hold node identifiers: {leaks:?}\n--- the scrapes ---\n{scraped}"
    );
}

#[test]
fn the_leak_search_finds_what_it_looks_for() {
    // Without namespaces: the matcher used above finds each form and is not fooled by longer
    // numbers.
    let key = [7u8; 32];
    let forms = key_forms("k", &key);
    for f in &forms {
        assert!(occurs(&format!("x {} y", f.text), f), "{}", f.text);
    }
    let ip = addr_needles("ip", "10.1.0.3".parse().unwrap());
    assert!(occurs("peer 10.1.0.3:4000", &ip));
    assert!(occurs("10.1.0.3", &ip));
    assert!(!occurs("10.1.0.30", &ip));
    assert!(!occurs("110.1.0.3", &ip));
    let ports = port_needles("p", 4000);
    assert!(ports.iter().any(|p| occurs("from 10.1.0.3:4000 ok", p)));
    assert!(ports.iter().any(|p| occurs("port=4000", p)));
    assert!(!ports
        .iter()
        .any(|p| occurs("relayed_udp=4000 t=14000 :40001", p)));

    let trace = "\
100  openat(AT_FDCWD, \"/s/coordinator.key\", O_RDONLY|O_CLOEXEC) = -1 ENOENT (No such file or directory)
100 mkdir(\"/s\", 0700) = -1 EEXIST (File exists)
101 openat(AT_FDCWD, \"/s/coordinator.key\", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0600 <unfinished ...>
100 bind(3, {sa_family=AF_INET, sin_port=htons(7600), sin_addr=inet_addr(\"10.1.0.2\")}, 16) = 0
101 <... openat resumed>) = 3
101 +++ exited with 0 +++
102 creat(\"/x\", 0644 <unfinished ...>
102 something strace never prints
102 +++ killed by SIGKILL +++
";
    let act = file_activity(&parse_strace(trace));
    assert_eq!(act.calls, 5);
    assert_eq!(act.unparsed, ["something strace never prints"]);
    assert_eq!(act.write_opens.len(), 2);
    assert_eq!(act.write_opens[0].path(), Some("/s/coordinator.key"));
    assert!(act.write_opens[0].succeeded());
    assert_eq!(act.write_opens[1].path(), Some("/x"));
    assert!(!act.write_opens[1].succeeded());
    assert_eq!(act.changes.len(), 1);
    assert!(!act.changes[0].succeeded());
    assert_eq!(act.inet_binds.len(), 1);
}
