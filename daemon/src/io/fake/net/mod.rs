//! A switched network in memory, for several daemons in one process: hosts with IPv4
//! addresses, UDP sockets, byte streams, NAT routers, and impairments (loss, latency, jitter,
//! reordering, blocking), like wireguard-go's `bindtest` with smoltcp's `FaultInjector` around it.
//!
//! Every delay is a `tokio::time` deadline, so the network follows a paused clock; every
//! random choice comes from one seeded RNG, so a run repeats. A datagram's fate (NAT
//! translation, filtering, loss, arrival time) is decided when it is sent.
//!
//! What it does not simulate: IP fragmentation and path MTU (a datagram of any size up to
//! 65507 bytes arrives whole), ICMP (an undeliverable datagram vanishes and no error ever comes
//! back on the socket), IPv6, bandwidth and queueing delay (only the receive queue's length is
//! bounded), nested NATs, port forwarding, and loss or latency on byte streams (they are
//! instantaneous and lossless, as TCP hides loss; see [`FakeStream`]).

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::io::{Received, UdpTransport};

mod nat;
mod tcp;

pub use nat::{NatKind, DEFAULT_NAT_TIMEOUT};
pub use tcp::{FakeConnector, FakeListener, FakeStream, SYN_TIMEOUT};

/// Datagrams a socket holds unread (arrived or in flight to it); more are dropped and counted
/// as [`NetStats::queue_full`], as a full receive buffer drops them.
pub const RECV_QUEUE: usize = 4096;

/// The largest UDP payload over IPv4.
const MAX_DATAGRAM: usize = 65507;

/// First port handed out for a bind to port 0 or an outgoing stream.
const FIRST_EPHEMERAL: u16 = 49152;

/// Which network a host is on: the public one (0) or the inside of a NAT (its number + 1).
type Realm = usize;
const PUBLIC: Realm = 0;
type HostId = usize;

/// The network: cloning gives another handle on the same one.
#[derive(Clone)]
pub struct FakeNet {
    state: Arc<Mutex<State>>,
}

/// What happened to the datagrams sent so far, one count per datagram (a GSO send of `n`
/// segments counts `n`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Queued at the receiving socket (arrived or still in flight).
    pub delivered: u64,
    /// Dropped by an [`Impairment`]'s loss.
    pub lost: u64,
    /// Dropped by [`FakeNet::block_udp`].
    pub blocked: u64,
    /// Nobody bound at the destination address (or the address is nobody's).
    pub no_listener: u64,
    /// Dropped by a NAT: no mapping for the public port, the remote not admitted by the
    /// mapping's filter, or a hairpin through a router that does not hairpin.
    pub nat_filtered: u64,
    /// The receiving socket's queue held [`RECV_QUEUE`] datagrams.
    pub queue_full: u64,
    /// A datagram with a TTL of its own died on the way ([`UdpTransport::send_ttl`]).
    pub ttl_expired: u64,
}

/// Impairments of a host's traffic ([`Host::set_impairment`]) or of a link between two hosts
/// ([`FakeNet::set_link`]). A datagram between hosts `a` and `b` meets `a`'s, `b`'s and the
/// link's: it is lost if any of them loses it, and its delays add up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Impairment {
    /// Percent of datagrams dropped (0 to 100).
    pub loss_percent: f64,
    /// Delay of every datagram.
    pub latency: Duration,
    /// A further delay, uniform in `0..=jitter`, drawn for each datagram (so datagrams may
    /// overtake each other when it exceeds their spacing).
    pub jitter: Duration,
    /// Percent of datagrams held back a further [`reorder_delay`](Self::reorder_delay), so
    /// that later ones overtake them (as netem's `reorder`).
    pub reorder_percent: f64,
    pub reorder_delay: Duration,
}

impl Impairment {
    /// Only loss.
    pub fn loss(percent: f64) -> Impairment {
        Impairment {
            loss_percent: percent,
            ..Impairment::default()
        }
    }

    /// Only latency and jitter.
    pub fn latency(latency: Duration, jitter: Duration) -> Impairment {
        Impairment {
            latency,
            jitter,
            ..Impairment::default()
        }
    }
}

/// One way or both ways, for [`FakeNet::block_udp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the first host to the second only.
    OneWay,
    BothWays,
}

/// How a host's UDP sockets behave (for sockets bound after it is set, and those bound now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpOptions {
    /// What [`UdpTransport::max_segments`] reports: 1 is a socket without GSO.
    pub max_segments: usize,
    /// GRO-like receive: consecutive queued datagrams of one size from one source come out of
    /// one `try_recv` as one [`Received`] (the last may be shorter), up to 64 of them or the
    /// buffer's length.
    pub gro: bool,
}

impl Default for UdpOptions {
    /// GSO of 64 segments, no GRO.
    fn default() -> Self {
        UdpOptions {
            max_segments: 64,
            gro: false,
        }
    }
}

/// The most datagrams GRO coalesces (as the kernel's `UDP_GRO` limit).
const GRO_MAX: usize = 64;

struct State {
    hosts: Vec<HostState>,
    host_by_addr: HashMap<(Realm, Ipv4Addr), HostId>,
    /// Realm `n` is the inside of `nats[n - 1]`.
    nats: Vec<nat::NatState>,
    nat_by_ip: HashMap<Ipv4Addr, usize>,
    udp: HashMap<(Realm, SocketAddrV4), Arc<SocketQueue>>,
    tcp: HashMap<(Realm, SocketAddrV4), tcp::Listening>,
    /// By (lower host id, higher host id).
    links: HashMap<(HostId, HostId), Impairment>,
    /// Directed: (from, to).
    blocked: HashSet<(HostId, HostId)>,
    rng: StdRng,
    stats: NetStats,
    seq: u64,
}

struct HostState {
    realm: Realm,
    ip: Ipv4Addr,
    impairment: Impairment,
    udp_options: UdpOptions,
    tcp_blocked: bool,
    streams: Vec<Weak<tcp::Link>>,
    next_port: u16,
}

impl State {
    fn add_host(&mut self, realm: Realm, ip: Ipv4Addr) -> HostId {
        if let Some(&id) = self.host_by_addr.get(&(realm, ip)) {
            return id;
        }
        assert!(
            realm != PUBLIC || !self.nat_by_ip.contains_key(&ip),
            "{ip} is a NAT router's public address"
        );
        let id = self.hosts.len();
        self.hosts.push(HostState {
            realm,
            ip,
            impairment: Impairment::default(),
            udp_options: UdpOptions::default(),
            tcp_blocked: false,
            streams: Vec::new(),
            next_port: FIRST_EPHEMERAL,
        });
        self.host_by_addr.insert((realm, ip), id);
        id
    }

    fn nat_of(&mut self, realm: Realm) -> Option<&mut nat::NatState> {
        realm.checked_sub(1).and_then(|i| self.nats.get_mut(i))
    }

    /// A port of `host` not bound for UDP (or, with `tcp`, not listened on).
    fn ephemeral(&mut self, host: HostId, tcp: bool) -> u16 {
        let realm = self.hosts[host].realm;
        let ip = self.hosts[host].ip;
        loop {
            let h = &mut self.hosts[host];
            let port = h.next_port;
            h.next_port = if port == u16::MAX {
                FIRST_EPHEMERAL
            } else {
                port + 1
            };
            let key = (realm, SocketAddrV4::new(ip, port));
            let used = if tcp {
                self.tcp.contains_key(&key)
            } else {
                self.udp.contains_key(&key)
            };
            if !used {
                return port;
            }
        }
    }

    /// Where a datagram from `src` (on `host`) to `dst` goes: the receiving host, its socket's
    /// key, and the source address it sees.
    fn route_udp(
        &mut self,
        host: HostId,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        now: Instant,
    ) -> Result<(HostId, (Realm, SocketAddrV4), SocketAddrV4), Reason> {
        let realm = self.hosts[host].realm;
        if realm != PUBLIC {
            if let Some(&to) = self.host_by_addr.get(&(realm, *dst.ip())) {
                return Ok((to, (realm, dst), src));
            }
        }
        let from = match self.nat_of(realm) {
            Some(n) => {
                let port = n.outbound(src, dst, now);
                SocketAddrV4::new(n.public_ip, port)
            }
            None => src,
        };
        if let Some(&i) = self.nat_by_ip.get(dst.ip()) {
            let inner = i + 1;
            let n = &mut self.nats[i];
            if inner == realm && !n.hairpin {
                return Err(Reason::NatFiltered);
            }
            let inside = n
                .inbound(dst.port(), from, now)
                .ok_or(Reason::NatFiltered)?;
            let to = *self
                .host_by_addr
                .get(&(inner, *inside.ip()))
                .ok_or(Reason::NoListener)?;
            return Ok((to, (inner, inside), from));
        }
        let to = *self
            .host_by_addr
            .get(&(PUBLIC, *dst.ip()))
            .ok_or(Reason::NoListener)?;
        Ok((to, (PUBLIC, dst), from))
    }

    /// Sends one datagram with a TTL of its own. The fake network has no routers between its
    /// networks but the NATs, so it stands for the internet's: such a datagram reaches the
    /// hosts of the sender's own network (its LAN; for a public host, the other public hosts)
    /// as any does; leaving a NAT (TTL 2 or more) it opens the mapping, then dies at the first
    /// router beyond, short of any other NAT or host.
    fn send_limited(
        &mut self,
        host: HostId,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        data: &[u8],
        ttl: u8,
        now: Instant,
    ) -> Option<Arc<SocketQueue>> {
        let realm = self.hosts[host].realm;
        if self.host_by_addr.contains_key(&(realm, *dst.ip())) && ttl >= 1 {
            return self.send_one(host, src, dst, data, now);
        }
        if ttl >= 2 {
            if let Some(n) = self.nat_of(realm) {
                n.outbound(src, dst, now);
            }
        }
        self.count(Reason::TtlExpired);
        None
    }

    /// When a datagram from `a` to `b` sent `now` arrives, or `None` when it is lost.
    fn fate(&mut self, a: HostId, b: HostId, now: Instant) -> Option<Instant> {
        let link = self.links.get(&(a.min(b), a.max(b))).copied();
        let imps = [
            Some(self.hosts[a].impairment),
            Some(self.hosts[b].impairment).filter(|_| a != b),
            link,
        ];
        let mut at = now;
        let mut lost = false;
        for imp in imps.into_iter().flatten() {
            if imp.loss_percent > 0.0 && self.rng.gen::<f64>() * 100.0 < imp.loss_percent {
                lost = true;
            }
            at += imp.latency;
            if !imp.jitter.is_zero() {
                at += imp.jitter.mul_f64(self.rng.gen::<f64>());
            }
            if imp.reorder_percent > 0.0 && self.rng.gen::<f64>() * 100.0 < imp.reorder_percent {
                at += imp.reorder_delay;
            }
        }
        (!lost).then_some(at)
    }

    /// Sends one datagram; the queue it joined, to be woken.
    fn send_one(
        &mut self,
        host: HostId,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        data: &[u8],
        now: Instant,
    ) -> Option<Arc<SocketQueue>> {
        let (to, key, from) = match self.route_udp(host, src, dst, now) {
            Ok(r) => r,
            Err(r) => {
                self.count(r);
                return None;
            }
        };
        if self.blocked.contains(&(host, to)) {
            self.count(Reason::Blocked);
            return None;
        }
        let Some(at) = self.fate(host, to, now) else {
            self.count(Reason::Lost);
            return None;
        };
        let Some(q) = self.udp.get(&key).cloned() else {
            self.count(Reason::NoListener);
            return None;
        };
        let mut heap = q.heap.lock().unwrap();
        if heap.len() >= RECV_QUEUE {
            drop(heap);
            self.count(Reason::QueueFull);
            return None;
        }
        self.seq += 1;
        heap.push(Reverse(Queued {
            at,
            seq: self.seq,
            from,
            data: data.to_vec(),
        }));
        drop(heap);
        self.stats.delivered += 1;
        Some(q)
    }

    fn count(&mut self, r: Reason) {
        let s = &mut self.stats;
        match r {
            Reason::Lost => s.lost += 1,
            Reason::Blocked => s.blocked += 1,
            Reason::NoListener => s.no_listener += 1,
            Reason::NatFiltered => s.nat_filtered += 1,
            Reason::QueueFull => s.queue_full += 1,
            Reason::TtlExpired => s.ttl_expired += 1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Reason {
    Lost,
    Blocked,
    NoListener,
    NatFiltered,
    QueueFull,
    TtlExpired,
}

impl Default for FakeNet {
    fn default() -> Self {
        FakeNet::new()
    }
}

impl FakeNet {
    /// An empty network whose random choices come from seed 0.
    pub fn new() -> FakeNet {
        FakeNet::with_seed(0)
    }

    /// An empty network whose random choices (loss, jitter, reordering) come from `seed`.
    pub fn with_seed(seed: u64) -> FakeNet {
        FakeNet {
            state: Arc::new(Mutex::new(State {
                hosts: Vec::new(),
                host_by_addr: HashMap::new(),
                nats: Vec::new(),
                nat_by_ip: HashMap::new(),
                udp: HashMap::new(),
                tcp: HashMap::new(),
                links: HashMap::new(),
                blocked: HashSet::new(),
                rng: StdRng::seed_from_u64(seed),
                stats: NetStats::default(),
                seq: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// The host at `ip` on the public network (created on first use). Panics when `ip` is a
    /// NAT router's public address.
    pub fn host(&self, ip: Ipv4Addr) -> Host {
        let id = self.lock().add_host(PUBLIC, ip);
        Host {
            net: self.clone(),
            id,
            ip,
        }
    }

    /// A NAT router whose outside is `public_ip` on the public network; hosts behind it come
    /// from [`Nat::host`]. Panics when `public_ip` is already a host's or a router's.
    pub fn nat(&self, public_ip: Ipv4Addr, kind: NatKind) -> Nat {
        let mut s = self.lock();
        assert!(
            !s.nat_by_ip.contains_key(&public_ip)
                && !s.host_by_addr.contains_key(&(PUBLIC, public_ip)),
            "{public_ip} is in use"
        );
        let i = s.nats.len();
        s.nats.push(nat::NatState::new(public_ip, kind));
        s.nat_by_ip.insert(public_ip, i);
        Nat {
            net: self.clone(),
            index: i,
            public_ip,
        }
    }

    /// A UDP socket bound at `addr` on the public network (the host is created on first use).
    pub fn bind_udp(&self, addr: SocketAddr) -> io::Result<FakeUdp> {
        let addr = v4(addr)?;
        self.host_checked(*addr.ip())?.bind_udp(addr.port())
    }

    /// A stream listener at `addr` on the public network (the host is created on first use).
    pub fn listen_tcp(&self, addr: SocketAddr) -> io::Result<FakeListener> {
        let addr = v4(addr)?;
        self.host_checked(*addr.ip())?.listen_tcp(addr.port())
    }

    fn host_checked(&self, ip: Ipv4Addr) -> io::Result<Host> {
        if self.lock().nat_by_ip.contains_key(&ip) {
            return Err(io::Error::from(io::ErrorKind::AddrNotAvailable));
        }
        Ok(self.host(ip))
    }

    /// Impairs the traffic between `a` and `b`, both ways (replacing what was set).
    pub fn set_link(&self, a: &Host, b: &Host, impairment: Impairment) {
        self.lock()
            .links
            .insert((a.id.min(b.id), a.id.max(b.id)), impairment);
    }

    /// Drops UDP from `a` to `b` (and from `b` to `a` with [`Direction::BothWays`]), as a
    /// firewall rule would. Streams are not affected (see [`Host::block_tcp`]).
    pub fn block_udp(&self, a: &Host, b: &Host, direction: Direction) {
        let mut s = self.lock();
        s.blocked.insert((a.id, b.id));
        if direction == Direction::BothWays {
            s.blocked.insert((b.id, a.id));
        }
    }

    /// Undoes [`block_udp`](Self::block_udp) for the same hosts and direction.
    pub fn unblock_udp(&self, a: &Host, b: &Host, direction: Direction) {
        let mut s = self.lock();
        s.blocked.remove(&(a.id, b.id));
        if direction == Direction::BothWays {
            s.blocked.remove(&(b.id, a.id));
        }
    }

    /// What happened to the datagrams sent so far.
    pub fn stats(&self) -> NetStats {
        self.lock().stats
    }
}

/// A NAT router: its public address on the public network and the private network behind it.
#[derive(Clone)]
pub struct Nat {
    net: FakeNet,
    index: usize,
    public_ip: Ipv4Addr,
}

impl Nat {
    /// The host at the private address `ip` behind this router (created on first use; other
    /// routers' private networks may reuse the address). Traffic between hosts behind the
    /// same router does not pass through it.
    pub fn host(&self, ip: Ipv4Addr) -> Host {
        let id = self.net.lock().add_host(self.index + 1, ip);
        Host {
            net: self.net.clone(),
            id,
            ip,
        }
    }

    /// The router's outside address.
    pub fn public_ip(&self) -> Ipv4Addr {
        self.public_ip
    }

    /// Idle time after which a mapping is forgotten (default [`DEFAULT_NAT_TIMEOUT`]). Only
    /// outbound datagrams refresh a mapping and the permission of the remote they go to.
    pub fn set_timeout(&self, timeout: Duration) {
        self.net.lock().nats[self.index].timeout = timeout;
    }

    /// Whether a datagram from inside to the router's own public address is turned back in
    /// (hairpinning; off by default, as on many home routers). It is then translated and
    /// filtered as if it came from outside.
    pub fn set_hairpin(&self, hairpin: bool) {
        self.net.lock().nats[self.index].hairpin = hairpin;
    }

    /// Forgets every UDP mapping, as a rebooted router does: the hosts behind it reach the
    /// outside from new public ports (they roam, as seen from outside).
    pub fn flush(&self) {
        self.net.lock().nats[self.index].flush();
    }

    /// Mappings alive now.
    pub fn mappings(&self) -> usize {
        self.net.lock().nats[self.index].mapping_count(Instant::now())
    }
}

/// One host of a [`FakeNet`], on the public network or behind a NAT router: the handle to
/// bind on it, impair it, or build its [`FakePlatform`](super::FakePlatform).
#[derive(Clone)]
pub struct Host {
    net: FakeNet,
    id: HostId,
    ip: Ipv4Addr,
}

impl Host {
    /// Its address (a private one behind a NAT).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The network it is on.
    pub fn net(&self) -> &FakeNet {
        &self.net
    }

    /// A UDP socket on `port` of this host (0: a free port). `AddrInUse` when a socket is
    /// bound there.
    pub fn bind_udp(&self, port: u16) -> io::Result<FakeUdp> {
        let mut s = self.net.lock();
        let port = if port == 0 {
            s.ephemeral(self.id, false)
        } else {
            port
        };
        let h = &s.hosts[self.id];
        let local = SocketAddrV4::new(self.ip, port);
        let key = (h.realm, local);
        if s.udp.contains_key(&key) {
            return Err(io::Error::from(io::ErrorKind::AddrInUse));
        }
        let q = Arc::new(SocketQueue {
            heap: Mutex::new(BinaryHeap::new()),
            notify: Notify::new(),
            max_segments: AtomicUsize::new(h.udp_options.max_segments.max(1)),
            gro: AtomicBool::new(h.udp_options.gro),
        });
        s.udp.insert(key, q.clone());
        Ok(FakeUdp {
            net: self.net.clone(),
            host: self.id,
            key,
            q,
        })
    }

    /// A stream listener on `port` of this host. `AddrInUse` when one listens there.
    pub fn listen_tcp(&self, port: u16) -> io::Result<FakeListener> {
        tcp::listen(self, port)
    }

    /// What this host's connections to coordinators go through.
    pub fn connector(&self) -> FakeConnector {
        FakeConnector { host: self.clone() }
    }

    /// Impairs all of this host's UDP traffic, both ways (replacing what was set).
    pub fn set_impairment(&self, impairment: Impairment) {
        self.net.lock().hosts[self.id].impairment = impairment;
    }

    /// The UDP options of this host's sockets: those bound from now on and those bound now.
    pub fn set_udp_options(&self, options: UdpOptions) {
        let mut s = self.net.lock();
        let h = &mut s.hosts[self.id];
        h.udp_options = options;
        let (realm, ip) = (h.realm, h.ip);
        for ((r, a), q) in &s.udp {
            if *r == realm && *a.ip() == ip {
                q.max_segments
                    .store(options.max_segments.max(1), Ordering::Relaxed);
                q.gro.store(options.gro, Ordering::Relaxed);
            }
        }
    }

    /// The UDP options sockets bound now get.
    pub fn udp_options(&self) -> UdpOptions {
        self.net.lock().hosts[self.id].udp_options
    }

    /// Drops this host's stream connection attempts, outgoing and incoming, as a firewall
    /// dropping SYNs: `connect` waits [`SYN_TIMEOUT`] and fails with `TimedOut`. Streams
    /// already open are not affected (see [`cut_streams`](Self::cut_streams)).
    pub fn block_tcp(&self, blocked: bool) {
        self.net.lock().hosts[self.id].tcp_blocked = blocked;
    }

    /// Resets every open stream of this host (either end): reads and writes on both ends fail
    /// with `ConnectionReset` from now on, as after a coordinator crash or a link failure.
    pub fn cut_streams(&self) {
        let links: Vec<_> = std::mem::take(&mut self.net.lock().hosts[self.id].streams);
        for l in links.iter().filter_map(Weak::upgrade) {
            l.cut();
        }
    }
}

/// A datagram queued at a socket, arriving at `at`.
struct Queued {
    at: Instant,
    seq: u64,
    from: SocketAddrV4,
    data: Vec<u8>,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct SocketQueue {
    /// Earliest arrival first.
    heap: Mutex<BinaryHeap<Reverse<Queued>>>,
    notify: Notify,
    max_segments: AtomicUsize,
    gro: AtomicBool,
}

/// A UDP socket on a [`FakeNet`] host; unbound when dropped.
///
/// Sends never fail for the network's sake (a datagram that cannot be delivered is counted in
/// [`NetStats`] and vanishes); `try_recv` never returns an error (there is no ICMP). A
/// datagram longer than the receive buffer is truncated to it.
pub struct FakeUdp {
    net: FakeNet,
    host: HostId,
    key: (Realm, SocketAddrV4),
    q: Arc<SocketQueue>,
}

impl FakeUdp {
    /// The address it is bound at (a private one behind a NAT).
    pub fn local_addr(&self) -> SocketAddr {
        SocketAddr::V4(self.key.1)
    }

    /// Changes what [`UdpTransport::max_segments`] reports (as the kernel refusing GSO would).
    pub fn set_max_segments(&self, n: usize) {
        self.q.max_segments.store(n.max(1), Ordering::Relaxed);
    }

    /// Turns GRO-like coalescing on receive on or off.
    pub fn set_gro(&self, gro: bool) {
        self.q.gro.store(gro, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for FakeUdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeUdp")
            .field("local", &self.key.1)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeUdp {
    fn drop(&mut self) {
        let mut s = self.net.lock();
        if s.udp
            .get(&self.key)
            .is_some_and(|q| Arc::ptr_eq(q, &self.q))
        {
            s.udp.remove(&self.key);
        }
    }
}

impl UdpTransport for FakeUdp {
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        let now = Instant::now();
        let mut heap = self.q.heap.lock().unwrap();
        let ready = |h: &BinaryHeap<Reverse<Queued>>| h.peek().filter(|d| d.0.at <= now).is_some();
        if !ready(&heap) {
            return Ok(None);
        }
        let Some(Reverse(first)) = heap.pop() else {
            return Ok(None);
        };
        let len = first.data.len().min(buf.len());
        buf[..len].copy_from_slice(&first.data[..len]);
        let segment = len;
        let mut got = Received {
            len,
            segment,
            from: SocketAddr::V4(first.from),
        };
        if !self.q.gro.load(Ordering::Relaxed) || segment == 0 || len < first.data.len() {
            return Ok(Some(got));
        }
        let mut count = 1;
        while count < GRO_MAX && ready(&heap) {
            let Some(next) = heap.peek().map(|d| &d.0) else {
                break;
            };
            let n = next.data.len();
            if next.from != first.from || n > segment || n == 0 || got.len + n > buf.len() {
                break;
            }
            let Some(Reverse(next)) = heap.pop() else {
                break;
            };
            buf[got.len..got.len + n].copy_from_slice(&next.data);
            got.len += n;
            count += 1;
            if n < segment {
                break; // a shorter datagram ends the batch
            }
        }
        Ok(Some(got))
    }

    async fn readable(&self) {
        loop {
            let notified = self.q.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = self.q.heap.lock().unwrap().peek().map(|d| d.0.at);
            match next {
                Some(at) if at <= Instant::now() => return,
                Some(at) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn send(&self, data: &[u8], segment: usize, to: SocketAddr) -> io::Result<()> {
        // Yields now and then, as a real socket's readiness does, so a sending loop cannot
        // starve the other tasks.
        tokio::task::consume_budget().await;
        let to = v4(to)?;
        if segment == 0 && !data.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if segment.min(data.len()) > MAX_DATAGRAM {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        let now = Instant::now();
        let mut woken: Vec<Arc<SocketQueue>> = Vec::new();
        {
            let mut s = self.net.lock();
            let chunks: Box<dyn Iterator<Item = &[u8]>> = if data.is_empty() {
                Box::new(std::iter::once(data))
            } else {
                Box::new(data.chunks(segment))
            };
            // More segments than max_segments: sent one by one, as the contract asks.
            for d in chunks {
                if let Some(q) = s.send_one(self.host, self.key.1, to, d, now) {
                    if !woken.iter().any(|w| Arc::ptr_eq(w, &q)) {
                        woken.push(q);
                    }
                }
            }
        }
        for q in woken {
            q.notify.notify_waiters();
        }
        Ok(())
    }

    async fn send_ttl(&self, data: &[u8], to: SocketAddr, ttl: u8) -> io::Result<()> {
        tokio::task::consume_budget().await;
        let to = v4(to)?;
        if data.len() > MAX_DATAGRAM {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        let now = Instant::now();
        let woken = self
            .net
            .lock()
            .send_limited(self.host, self.key.1, to, data, ttl, now);
        if let Some(q) = woken {
            q.notify.notify_waiters();
        }
        Ok(())
    }

    fn max_segments(&self) -> usize {
        self.q.max_segments.load(Ordering::Relaxed)
    }
}

/// `addr` as IPv4 (an IPv4-mapped IPv6 address too); the fake has no IPv6.
fn v4(addr: SocketAddr) -> io::Result<SocketAddrV4> {
    match addr.ip() {
        IpAddr::V4(ip) => Ok(SocketAddrV4::new(ip, addr.port())),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(ip) => Ok(SocketAddrV4::new(ip, addr.port())),
            None => Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "the fake network has no IPv6",
            )),
        },
    }
}

#[cfg(test)]
mod tests;
