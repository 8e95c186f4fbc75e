//! The topology of a lab: the wan bridge, namespaces attached to it ([`Ns`]), NAT routers
//! ([`Router`], [`Nat`]), and their creation and removal.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use crate::process::{
    command_in, require_tools, run_to_completion, tail, truncate, Bins, Output, Proc,
};
use crate::timing::{in_ci, report};

pub(crate) const NETNS_DIR: &str = "/var/run/netns";
pub(crate) const BRIDGE: &str = "br0";
/// Default time limit of a command run with [`Ns::exec`].
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

// ------------------------------------------------------------------------------------------
// The kernel's neighbour table
// ------------------------------------------------------------------------------------------

/// Where the host's ARP table limits are (they exist in the initial namespace only).
const NEIGH_SYSCTL: &str = "/proc/sys/net/ipv4/neigh/default";
/// Room left in the ARP table for everything else on the machine (Linux's default limit).
const NEIGH_HEADROOM: u64 = 1024;
/// The limits found before a lab raised them, and how many labs of this process need the
/// raised ones.
static NEIGH_RAISED: Mutex<Option<(u64, u64, usize)>> = Mutex::new(None);

fn neigh_limit(name: &str) -> Option<u64> {
    fs::read_to_string(format!("{NEIGH_SYSCTL}/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn set_neigh_limit(name: &str, value: u64) {
    if let Err(e) = fs::write(format!("{NEIGH_SYSCTL}/{name}"), value.to_string()) {
        report(format!("cannot set {NEIGH_SYSCTL}/{name} to {value}: {e}"));
    }
}

/// Makes room in the kernel's ARP table for `hosts` namespaces on one bridge that all talk to
/// each other (each holding an entry for every other: `hosts`²). All namespaces share one
/// table, whose hard limit (`gc_thresh3`, 1024 by default) a 50-node lab exceeds: the kernel
/// then refuses new entries ("neighbor table overflow") and every datagram to a neighbour
/// without one is dropped, so nodes past the limit never reach each other directly (924 of 2450
/// paths in the first swarm test). Raises `gc_thresh2` and `gc_thresh3` only when needed, and
/// sets `holds` when it did (the lab must then call [`release_neighbours`] when it ends).
fn reserve_neighbours(hosts: u64, holds: &std::sync::atomic::AtomicBool) {
    let need = hosts * hosts + NEIGH_HEADROOM;
    let mut raised = a2a_proto::sync::lock(&NEIGH_RAISED);
    let (Some(soft), Some(hard)) = (neigh_limit("gc_thresh2"), neigh_limit("gc_thresh3")) else {
        return;
    };
    // A small lab fits in the default table beside everything else: leave the host alone.
    if hosts * hosts <= hard / 2 || hard >= need {
        return;
    }
    let need = need.next_multiple_of(1024);
    set_neigh_limit("gc_thresh3", need);
    set_neigh_limit("gc_thresh2", soft.max(need / 2));
    let first = !holds.swap(true, Ordering::Relaxed);
    match raised.as_mut() {
        Some((_, _, holders)) if first => *holders += 1,
        Some(_) => {}
        None => *raised = Some((soft, hard, 1)),
    }
    report(format!(
        "raised the kernel's ARP table limit (gc_thresh3) from {hard} to {need} for {hosts} \
         namespaces; restored when the lab ends"
    ));
}

/// A lab that raised the ARP table limits is done with them: the last one restores them.
fn release_neighbours() {
    let mut raised = a2a_proto::sync::lock(&NEIGH_RAISED);
    if let Some((soft, hard, holders)) = raised.as_mut() {
        *holders -= 1;
        if *holders == 0 {
            set_neigh_limit("gc_thresh2", *soft);
            set_neigh_limit("gc_thresh3", *hard);
            *raised = None;
        }
    }
}

// ------------------------------------------------------------------------------------------
// The lab
// ------------------------------------------------------------------------------------------

pub(crate) struct LabInner {
    name: String,
    test: String,
    pub(crate) dir: PathBuf,
    bins: Bins,
    /// `w` and `x` of the lab's wan subnet `w.x.0.0/24` (`w` is 10 unless the lab was made
    /// with [`Lab::with_public_wan`]).
    wan_first: u8,
    subnet: u8,
    started: Instant,
    namespaces: Mutex<Vec<String>>,
    procs: Mutex<Vec<Proc>>,
    seq: AtomicU32,
    next_host: AtomicU32,
    /// This lab raised the kernel's ARP table limits ([`reserve_neighbours`]).
    raised_neighbours: std::sync::atomic::AtomicBool,
    /// The wan and the routers' LANs carry IPv6 too ([`Lab::new_dual_stack`]).
    ipv6: std::sync::atomic::AtomicBool,
    /// IPv6 routing on the wan: every wan namespace with an IPv6 address, and every router
    /// LAN prefix with the router's wan address, so that a namespace added after a router gets
    /// routes to its LAN and a router added after a namespace gives it one.
    v6_routing: Mutex<V6Routing>,
}

#[derive(Default)]
struct V6Routing {
    wan: Vec<String>,
    lans: Vec<(String, Ipv6Addr)>,
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
    pub(crate) fn run(&self, ns: Option<&str>, args: &[&str], timeout: Duration) -> Output {
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
        let proc = Proc::new(label.clone(), child, stdout, stderr);
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
    pub(crate) fn host(&self, args: &[&str]) {
        self.run(None, args, EXEC_TIMEOUT).expect_ok();
    }

    /// The next host number of the wan subnet and its address (the lab's ARP limits raised
    /// when the namespaces could fill the table).
    fn next_wan_address(&self) -> (u32, Ipv4Addr) {
        let host = self.next_host.fetch_add(1, Ordering::Relaxed);
        assert!(host < 255, "too many namespaces in one lab");
        reserve_neighbours(host.into(), &self.raised_neighbours);
        (
            host,
            Ipv4Addr::new(self.wan_first, self.subnet, 0, host as u8),
        )
    }

    pub(crate) fn create_ns(&self, role: &str) -> String {
        let name = format!("{}-{role}", self.name);
        self.host(&["ip", "netns", "add", &name]);
        self.namespaces.lock().unwrap().push(name.clone());
        self.host(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        if self.ipv6() {
            // No duplicate address detection on the links created in here: addresses are
            // usable at once (they are unique by construction), not a second or two later.
            self.host(&[
                "ip",
                "netns",
                "exec",
                &name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.accept_dad=0",
            ]);
        }
        name
    }

    /// The name of the wan bridge's port towards the namespace with wan address `10.x.0.host`
    /// (<= 15 characters; it only needs to be unique in the hub, but carries the lab counter).
    pub(crate) fn hub_port(&self, host: u32) -> String {
        let port = format!("v{}h{host}", self.name.rsplit('-').next().unwrap_or("0"));
        truncate(&port, 15).to_string()
    }

    fn ipv6(&self) -> bool {
        self.ipv6.load(Ordering::Relaxed)
    }

    /// The lab's IPv6 wan prefix `2001:db8:<subnet>::/64`'s address `host`.
    fn wan6(&self, host: u32) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, self.subnet.into(), 0, 0, 0, 0, host as u16)
    }
}
/// One isolated network topology; see the crate documentation.
pub struct Lab {
    pub(crate) inner: Arc<LabInner>,
    pub(crate) hub: String,
}

impl Lab {
    /// Creates a lab with its wan segment. Returns `None` (test skipped) without root, unless
    /// `CI=true`, where it panics.
    pub fn new(test: &str) -> Option<Lab> {
        Lab::create(test, 10)
    }

    /// Like [`new`](Self::new), with the wan subnet in a public range (`44.x.0.0/24`) instead
    /// of `10.x.0.0/24`: for routers whose software refuses a private external address
    /// (miniupnpd maps no port on a router whose wan address is private).
    pub fn with_public_wan(test: &str) -> Option<Lab> {
        Lab::create(test, 44)
    }

    fn create(test: &str, wan_first: u8) -> Option<Lab> {
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
        // What every lab uses: `ip` (checked below), HTTP servers and clients, ping.
        require_tools(&[
            ("curl", "curl"),
            ("python3", "python3"),
            ("ping", "iputils-ping"),
        ]);
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
            wan_first,
            subnet,
            started: Instant::now(),
            namespaces: Mutex::new(vec![format!("{name}-hub")]),
            procs: Mutex::new(Vec::new()),
            seq: AtomicU32::new(0),
            next_host: AtomicU32::new(2),
            raised_neighbours: Default::default(),
            ipv6: Default::default(),
            v6_routing: Default::default(),
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

    /// A lab whose wan and router LANs carry IPv6 as well as IPv4: the wan is
    /// `2001:db8:<x>::/64` (beside `10.x.0.0/24`), router `k`'s LAN `2001:db8:<x>:<k>::/64`,
    /// routed (no NAT66) via the router's wan address, which every wan namespace has a route
    /// for. The routers' firewall drops unsolicited inbound IPv6 as it does IPv4 (ICMPv6
    /// neighbour discovery and the errors a path needs excepted), as home routers do.
    pub fn new_dual_stack(test: &str) -> Option<Lab> {
        let lab = Lab::new(test)?;
        lab.inner.ipv6.store(true, Ordering::Relaxed);
        Some(lab)
    }

    /// The wan's IPv6 prefix, `2001:db8:<x>::/64` (a dual-stack lab only).
    pub fn wan_subnet6(&self) -> String {
        format!("{}/64", self.inner.wan6(0))
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

    /// The wan subnet, `10.x.0.0/24` (or `44.x.0.0/24`: [`with_public_wan`](Self::with_public_wan)).
    pub fn wan_subnet(&self) -> String {
        format!("{}.{}.0.0/24", self.inner.wan_first, self.inner.subnet)
    }

    /// A new namespace attached to the wan bridge, with an address of the wan subnet on `eth0`.
    /// `role` must be unique in the lab (it names the namespace).
    pub fn add_ns(&self, role: &str) -> Ns {
        self.add_wan_ns(role, true, self.inner.ipv6())
    }

    /// Starts a long-running process on the host (in no lab namespace), logged and killed
    /// with the lab like the others.
    pub(crate) fn spawn_host(&self, label: &str, args: &[&str]) -> Proc {
        self.inner.spawn(None, label, args)
    }

    /// A new namespace on the wan with only an IPv6 address (a dual-stack lab only): an
    /// IPv6-only host.
    pub fn add_ns_v6_only(&self, role: &str) -> Ns {
        assert!(
            self.inner.ipv6(),
            "an IPv6-only namespace needs Lab::new_dual_stack"
        );
        self.add_wan_ns(role, false, true)
    }

    /// A new namespace on the wan with only an IPv4 address, in a dual-stack lab too.
    pub fn add_ns_v4_only(&self, role: &str) -> Ns {
        self.add_wan_ns(role, true, false)
    }

    fn add_wan_ns(&self, role: &str, v4: bool, v6: bool) -> Ns {
        let inner = &self.inner;
        let name = inner.create_ns(role);
        let (host, ip) = inner.next_wan_address();
        // The veth pair is created inside the hub and the node namespace directly.
        let hub_side = inner.hub_port(host);
        inner.host(&[
            "ip", "-n", &self.hub, "link", "add", &hub_side, "type", "veth", "peer", "name",
            "eth0", "netns", &name,
        ]);
        inner.host(&[
            "ip", "-n", &self.hub, "link", "set", &hub_side, "master", BRIDGE, "up",
        ]);
        if v4 {
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
        }
        inner.host(&["ip", "-n", &name, "link", "set", "eth0", "up"]);
        let wan_ip6 = v6.then(|| inner.wan6(host));
        if let Some(ip6) = wan_ip6 {
            inner.host(&[
                "ip",
                "-n",
                &name,
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            let mut routing = a2a_proto::sync::lock(&inner.v6_routing);
            for (prefix, via) in &routing.lans {
                inner.host(&[
                    "ip",
                    "-n",
                    &name,
                    "-6",
                    "route",
                    "add",
                    prefix,
                    "via",
                    &via.to_string(),
                ]);
            }
            routing.wan.push(name.clone());
        }
        Ns {
            name,
            role: role.to_string(),
            wan_ip: v4.then_some(ip),
            wan_ip6,
            lab: inner.clone(),
        }
    }

    /// A router on the wan doing `nat` for a LAN of its own (`192.168.<k>.0/24`); see [`Nat`].
    /// Like a home router's firewall it drops unsolicited traffic from the wan, to itself as
    /// well as to the LAN; dropped before conntrack confirms it, such a packet leaves no entry
    /// that would clash with (and so renumber) the mapping of a LAN node punching out.
    ///
    /// A [`Nat::EasyNoFirewall`] router has no firewall, and reaches the wan through an ISP's
    /// router of its own ([`Lab::add_ns_via_isp`]): between two customers' routers on the
    /// internet there is always at least one router of their ISPs.
    pub fn router(&self, role: &str, nat: Nat) -> Router {
        require_tools(&[("nft", "nftables"), ("sysctl", "procps")]);
        let ns = match nat {
            Nat::EasyNoFirewall => self.add_ns_via_isp(role),
            _ => self.add_ns(role),
        };
        self.make_router(ns, nat)
    }

    /// A router like [`Lab::router`], but on the wan segment itself whatever its kind: two of
    /// them are neighbours, as two cloud VMs of one subnet or two Docker hosts of one LAN.
    pub fn router_on_segment(&self, role: &str, nat: Nat) -> Router {
        require_tools(&[("nft", "nftables"), ("sysctl", "procps")]);
        let ns = self.add_ns(role);
        self.make_router(ns, nat)
    }

    /// A router whose wan side is on `outer`'s LAN: a home router behind a carrier-grade NAT
    /// (double NAT). Its LAN is a `192.168.<k>.0/24` of its own.
    pub fn router_behind(&self, outer: &Router, role: &str, nat: Nat) -> Router {
        require_tools(&[("nft", "nftables"), ("sysctl", "procps")]);
        let mut ns = self.add_ns_behind(outer, role);
        ns.wan_ip = Some(self.lan_ip_of(&ns));
        // Its LAN is IPv4 only, in a dual-stack lab too (the wan has no route to it).
        ns.wan_ip6 = None;
        self.make_router(ns, nat)
    }

    fn lan_ip_of(&self, ns: &Ns) -> Ipv4Addr {
        let out = ns.exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        out.stdout
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no IPv4 address on {}'s eth0: {}", ns.name, out.stdout))
    }

    /// A namespace with an address of the wan subnet that reaches the wan through a router of
    /// its own (`isp-<role>`, a plain forwarder on the wan bridge answering ARP for it): a
    /// packet between it and any other wan host crosses one more router, which decrements its
    /// TTL. `role` must be unique in the lab.
    pub fn add_ns_via_isp(&self, role: &str) -> Ns {
        let isp = self.add_ns(&format!("isp-{role}"));
        let isp_ip = isp.wan_ip.expect("a wan address");
        let inner = &self.inner;
        let name = inner.create_ns(role);
        let (_, ip) = inner.next_wan_address();
        let (i, n) = (isp.name.as_str(), name.as_str());
        inner.host(&[
            "ip", "-n", i, "link", "add", "down0", "type", "veth", "peer", "name", "eth0", "netns",
            n,
        ]);
        inner.host(&["ip", "-n", i, "link", "set", "down0", "up"]);
        inner.host(&[
            "ip",
            "-n",
            i,
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            "down0",
        ]);
        for key in ["net.ipv4.ip_forward=1", "net.ipv4.conf.eth0.proxy_arp=1"] {
            inner.host(&["ip", "netns", "exec", i, "sysctl", "-qw", key]);
        }
        inner.host(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{ip}/32"),
            "dev",
            "eth0",
        ]);
        inner.host(&["ip", "-n", n, "link", "set", "eth0", "up"]);
        let isp_ip = isp_ip.to_string();
        inner.host(&["ip", "-n", n, "route", "add", &isp_ip, "dev", "eth0"]);
        inner.host(&["ip", "-n", n, "route", "add", "default", "via", &isp_ip]);
        Ns {
            name,
            role: role.to_string(),
            wan_ip: Some(ip),
            // IPv4 only, in a dual-stack lab too.
            wan_ip6: None,
            lab: inner.clone(),
        }
    }

    fn make_router(&self, ns: Ns, nat: Nat) -> Router {
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
        let lan6 = ns.wan_ip6.map(|wan6| {
            let lan6 = Ipv6Addr::new(0x2001, 0xdb8, inner.subnet.into(), k as u16, 0, 0, 0, 1);
            inner.host(&[
                "ip",
                "netns",
                "exec",
                n,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.forwarding=1",
            ]);
            inner.host(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{lan6}/64"),
                "dev",
                "lan0",
                "nodad",
            ]);
            // Every other wan namespace routes the LAN's prefix via this router, now and later.
            let prefix = format!(
                "{}/64",
                Ipv6Addr::from(u128::from(lan6) & !0xffff_ffff_ffff_ffff)
            );
            let mut routing = a2a_proto::sync::lock(&inner.v6_routing);
            for other in routing.wan.iter().filter(|w| **w != ns.name) {
                inner.host(&[
                    "ip",
                    "-n",
                    other,
                    "-6",
                    "route",
                    "add",
                    &prefix,
                    "via",
                    &wan6.to_string(),
                ]);
            }
            routing.lans.push((prefix, wan6));
            lan6
        });
        let masquerade = match nat {
            Nat::Easy | Nat::NoUdp => "masquerade persistent",
            Nat::EasyNoFirewall => "masquerade",
            Nat::Hard => "masquerade random,fully-random",
        };
        let no_udp = match nat {
            Nat::NoUdp => "oifname \"eth0\" meta l4proto udp drop",
            _ => "",
        };
        let firewall = nat != Nat::EasyNoFirewall;
        let mut rules = format!(
            "table ip a2a_nat {{\n\
               chain postrouting {{ type nat hook postrouting priority srcnat; oifname \"eth0\" {masquerade}; }}\n\
             }}\n"
        );
        if firewall {
            rules += &format!(
                "table inet a2a_fw {{\n\
               chain input {{ type filter hook input priority filter; policy accept;\n\
                 iifname \"eth0\" ct state established,related accept\n\
                 iifname \"eth0\" icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert, destination-unreachable, packet-too-big, time-exceeded, parameter-problem }} accept\n\
                 iifname \"eth0\" drop\n\
               }}\n\
               chain forward {{ type filter hook forward priority filter; policy accept;\n\
                 iifname \"eth0\" ct state established,related accept\n\
                 iifname \"eth0\" icmpv6 type {{ destination-unreachable, packet-too-big, time-exceeded, parameter-problem }} accept\n\
                 iifname \"eth0\" drop\n\
                 {no_udp}\n\
               }}\n\
             }}\n"
            );
        }
        let file = self.inner.dir.join(format!("{}.nft", ns.role));
        fs::write(&file, rules).expect("write nftables rules");
        ns.exec(&["nft", "-f", &file.to_string_lossy()]).expect_ok();
        Router {
            ns,
            nat,
            lan,
            lan6,
            next_host: AtomicU32::new(2),
            impaired: OnceLock::new(),
        }
    }

    /// A new namespace on `router`'s LAN (`eth0`, the next address of the LAN, default route via
    /// the router). `role` must be unique in the lab (it names the namespace).
    pub fn add_ns_behind(&self, router: &Router, role: &str) -> Ns {
        let inner = &self.inner;
        let ns_name = inner.create_ns(role);
        let h = router.next_host.fetch_add(1, Ordering::Relaxed);
        assert!(h < 255, "too many namespaces behind one router");
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
        if router.impaired.get().is_some() {
            // Wire-sized frames onto an impaired wire (see `impair.rs`).
            inner.host(&[
                "ip",
                "-n",
                &ns_name,
                "link",
                "set",
                "eth0",
                "gso_max_segs",
                "1",
            ]);
        }
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
        let lan_ip6 = router.lan6.map(|gw| {
            let ip6 = Ipv6Addr::from(u128::from(gw) & !0xffff_ffff_ffff_ffff | u128::from(h));
            inner.host(&[
                "ip",
                "-n",
                &ns_name,
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            inner.host(&[
                "ip",
                "-n",
                &ns_name,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gw.to_string(),
            ]);
            ip6
        });
        Ns {
            name: ns_name,
            role: role.to_string(),
            wan_ip: None,
            wan_ip6: lan_ip6,
            lab: inner.clone(),
        }
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
            for (kind, path) in [("stdout", p.stdout_path()), ("stderr", p.stderr_path())] {
                let content = fs::read_to_string(path).unwrap_or_default();
                if content.trim().is_empty() {
                    continue;
                }
                text.push_str(&format!(
                    "----- {} {kind} (pid {}) -----\n{}",
                    p.label(),
                    p.pid(),
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
        if inner.raised_neighbours.load(Ordering::Relaxed) {
            release_neighbours();
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
    /// The global IPv6 address (on the wan, or on a router's LAN: routed, not translated), in a
    /// dual-stack lab.
    pub wan_ip6: Option<Ipv6Addr>,
    pub(crate) lab: Arc<LabInner>,
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
    /// Plain `masquerade` and no firewall at all (input and forward accept), like a cloud VM
    /// used as a NAT gateway, a Docker host or many small routers: an unsolicited datagram to
    /// the router's own address is delivered to its own stack (no listener: an ICMP error
    /// goes back), and conntrack keeps an entry for it whose reply tuple then renumbers the
    /// mapping of a LAN node that punches towards the same address and port. Reaches the wan
    /// through an ISP router of its own ([`Lab::router`]).
    EasyNoFirewall,
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
    /// The router's IPv6 LAN address (the nodes' IPv6 gateway), in a dual-stack lab.
    pub lan6: Option<Ipv6Addr>,
    next_host: AtomicU32,
    /// Its wan link's impairment ([`Lab::router_impaired`]).
    pub(crate) impaired: OnceLock<ImpairedWan>,
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

    /// Cuts this router's LAN off from `to` (a wan address), TCP and UDP alike: TCP is
    /// answered with a reset (a node moves on to its next coordinator at once), the rest
    /// dropped. For a node that must reach only some coordinators of a cluster.
    pub fn cut_off_from(&self, to: Ipv4Addr) {
        let to = to.to_string();
        let n = &self.ns;
        if !n
            .exec(&["nft", "list", "table", "inet", "a2a_cut"])
            .success()
        {
            n.exec(&["nft", "add", "table", "inet", "a2a_cut"])
                .expect_ok();
            n.exec(&[
                "nft",
                "add chain inet a2a_cut forward { type filter hook forward priority -20; }",
            ])
            .expect_ok();
        }
        for rule in [
            format!("add rule inet a2a_cut forward ip daddr {to} meta l4proto tcp reject with tcp reset"),
            format!("add rule inet a2a_cut forward ip daddr {to} drop"),
        ] {
            n.exec(&["nft", &rule]).expect_ok();
        }
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

impl Ns {
    /// UDP datagrams the kernel dropped in this namespace because a socket's receive buffer
    /// was full (`RcvbufErrors` in `/proc/net/snmp`): what a loaded machine loses before the
    /// program sees it.
    pub fn udp_rcvbuf_errors(&self) -> u64 {
        let snmp = self.exec(&["cat", "/proc/net/snmp"]).expect_ok().stdout;
        let udp: Vec<Vec<&str>> = snmp
            .lines()
            .filter(|l| l.starts_with("Udp:"))
            .map(|l| l.split_whitespace().collect())
            .collect();
        let [names, values] = &udp[..] else {
            panic!("no Udp lines in /proc/net/snmp: {snmp}");
        };
        let i = names
            .iter()
            .position(|n| *n == "RcvbufErrors")
            .expect("RcvbufErrors in /proc/net/snmp");
        values[i].parse().expect("a number")
    }

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

    /// The directory of the lab this namespace belongs to.
    pub(crate) fn lab_dir(&self) -> &Path {
        &self.lab.dir
    }

    /// The name of the lab this namespace belongs to.
    pub(crate) fn lab_name(&self) -> &str {
        &self.lab.name
    }

    /// The binaries under test.
    pub(crate) fn bins(&self) -> &Bins {
        &self.lab.bins
    }

    /// Whether a network interface exists in the namespace.
    pub fn has_link(&self, name: &str) -> bool {
        self.exec(&["ip", "link", "show", "dev", name]).success()
    }
}

// ------------------------------------------------------------------------------------------
// What an impaired wan link is (set up and read by `impair.rs`)
// ------------------------------------------------------------------------------------------

/// What a router's wan link does to every frame, in each direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Added to every frame in each direction.
    pub delay: Duration,
    /// Uniform spread around `delay` (at most `delay`).
    pub jitter: Duration,
    /// Percentage of frames dropped in each direction (nftables in the router).
    pub loss_pct: u32,
}

impl Impairment {
    /// Issue 12's lossy, slow link, per router: between two such routers a round trip of
    /// 40 ms (four crossings of 10 ms), 20 ms ± 5 ms each way (two crossings of ± 2.5 ms), and
    /// 3 % loss on each router's wan in each direction.
    pub const LOSSY_WAN: Impairment = Impairment {
        delay: Duration::from_millis(10),
        jitter: Duration::from_micros(2500),
        loss_pct: 3,
    };
}

/// The impairment of a router's wan link: the forwarder's namespace and process.
#[derive(Debug)]
pub struct ImpairedWan {
    pub impairment: Impairment,
    /// The namespace between the router and the wan bridge.
    pub ns: Ns,
    pub forwarder: Proc,
}
