//! The peer table: one WireGuard tunnel (`boringtun::noise::Tunn`) per member of the network,
//! found by overlay address (TUN→UDP), by receiver index or key (UDP→TUN).
//!
//! Readers on the packet path load an immutable snapshot (`ArcSwap`), so they never take a
//! table-wide lock; each peer's tunnel has its own lock. Writers (the control client) build a
//! new snapshot. No I/O happens here.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use a2a_proto::disco::DiscoKey;
use a2a_proto::membership::MemberCert;
use a2a_proto::overlay::derive_ip6;
use a2a_proto::sync::lock;
use a2a_proto::{NodeKey, NodeRecord};
use arc_swap::ArcSwap;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// WireGuard persistent keepalive, seconds. Shorter than boringtun's KEEPALIVE_TIMEOUT +
/// REKEY_TIMEOUT (15 s): boringtun starts a new handshake when a packet is sent more than 15 s
/// after the last one received from the peer, without waiting for the answer the whitepaper
/// waits for, so with the usual 25 s an idle tunnel's first packet often cost a needless
/// handshake. A peer that hears our keepalive every 10 s never sees such a silence.
pub const PERSISTENT_KEEPALIVE_S: u16 = 10;
/// Handshake messages a second before cookies are demanded (shared by all peers; boringtun
/// counts a peer's message twice, once when it is routed and once in the peer's tunnel, so
/// 500 messages). A join storm is legitimate load: fifty nodes joining at once send each node
/// an initiation and a response per peer, about 200 counts in the second they arrive, and at
/// 100 (the first choice) a quarter of the paths then waited for boringtun's 5 s retry. With
/// the dependencies' crypto a handshake costs about 0.1 ms, so 1 000 a second is a tenth of a
/// core before cookies (and then [`HANDSHAKES_PER_SOURCE`]) hold a flood back; wireguard-go
/// and the kernel module only count queued handshakes (128) before they are under load.
pub const HANDSHAKE_RATE_LIMIT: u64 = 1000;
/// Handshake messages a second let through from one source (address, or relay id) while the
/// node is under load, however valid their cookie: a flooder that answers cookies is held to
/// this, as WireGuard's kernel module and wireguard-go hold it (boringtun does not).
pub const HANDSHAKES_PER_SOURCE: u32 = 20;

/// What the control client knows of a peer, from its latest record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The IPv6 overlay address, derived from the network id and the peer's key.
    pub ip6: Ipv6Addr,
    pub candidates: Vec<SocketAddr>,
    pub issued_ms: u64,
    /// The member certificate of a peer admitted by invite; `None` for a holder of the
    /// network secret.
    pub cert: Option<MemberCert>,
    /// Its SSH user and host keys (checked by the control client; invalid ones are dropped).
    pub ssh: a2a_proto::ssh::SshKeys,
}

use crate::core::family::Reach;
use crate::core::limit::PerSecond;
use crate::core::offline::Listing;
use crate::core::path::{PathState, Route};

/// What the packet path reads to send to a peer: a copy of its path state's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendRoute {
    pub route: Route,
    /// Where to send when relayed but the relay is unavailable.
    pub fallback: Option<SocketAddr>,
}

pub struct Peer {
    pub key: NodeKey,
    /// The 24-bit index boringtun puts in the upper bits of this peer's WireGuard indices.
    pub index: u32,
    tunn: Mutex<Tunn>,
    /// The overlay address, also in `info`; kept apart so the receive path checks inner
    /// sources without taking a lock.
    ip: AtomicU32,
    /// The IPv6 overlay address (high and low halves), for the same check; it changes only
    /// when the network rotates (its /48 is the network id's).
    ip6: [AtomicU64; 2],
    info: Mutex<PeerInfo>,
    /// Seals and opens disco probes with this peer.
    pub disco: DiscoKey,
    /// The coordinator's relay id for this peer (0: not known).
    relay_id: AtomicU32,
    path: Mutex<PathState>,
    route: Mutex<SendRoute>,
    /// When data last came from the direct address (ms since the table's epoch).
    direct_rx_ms: AtomicU64,
    /// When the path finder was last told of data from another address (ms since the epoch).
    seen_elsewhere_ms: AtomicU64,
    /// When a handshake was last sent again at once because of a cookie reply (ms since the
    /// epoch).
    cookie_retry_ms: AtomicU64,
    /// How the coordinator lists it (core/offline.rs decides what that means).
    listing: Mutex<Listing>,
    /// The peer itself said it leaves the network (`a2actl down`), through its tunnel.
    left: AtomicBool,
}

impl Peer {
    pub fn tunn(&self) -> MutexGuard<'_, Tunn> {
        lock(&self.tunn)
    }

    pub fn info(&self) -> PeerInfo {
        lock(&self.info).clone()
    }

    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.ip.load(Ordering::Relaxed))
    }

    pub fn ip6(&self) -> Ipv6Addr {
        let hi = u128::from(self.ip6[0].load(Ordering::Relaxed));
        let lo = u128::from(self.ip6[1].load(Ordering::Relaxed));
        Ipv6Addr::from((hi << 64) | lo)
    }

    fn store_ip6(&self, ip6: Ipv6Addr) {
        let v = u128::from(ip6);
        self.ip6[0].store((v >> 64) as u64, Ordering::Relaxed);
        self.ip6[1].store(v as u64, Ordering::Relaxed);
    }

    /// The inner-source check: whether a packet from this peer may carry `src` as its source
    /// (its own overlay address of that family, nothing else).
    pub fn holds(&self, src: IpAddr) -> bool {
        match src {
            IpAddr::V4(v4) => v4 == self.ip(),
            IpAddr::V6(v6) => v6 == self.ip6(),
        }
    }

    pub fn route(&self) -> SendRoute {
        *lock(&self.route)
    }

    pub fn relay_id(&self) -> u32 {
        self.relay_id.load(Ordering::Relaxed)
    }

    pub fn set_relay_id(&self, id: u32) {
        self.relay_id.store(id, Ordering::Relaxed);
    }

    /// Runs `f` on the path state (briefly: it is locked meanwhile); the route the packet path
    /// reads follows whatever `f` decided, so the two can never disagree.
    pub fn with_path<R>(&self, f: impl FnOnce(&mut PathState) -> R) -> R {
        let mut path = lock(&self.path);
        let r = f(&mut path);
        self.publish_route(&path);
        r
    }

    /// Copies the path state's decision to where the packet path reads it.
    fn publish_route(&self, path: &PathState) {
        let r = SendRoute {
            route: path.route(),
            fallback: path.fallback(),
        };
        let mut cur = lock(&self.route);
        if *cur != r {
            *cur = r;
        }
    }

    /// Authenticated data arrived directly from `from` at `now_ms`: true if that is the direct
    /// path (its liveness is refreshed); false if the path finder should look at `from`.
    pub fn heard_direct(&self, from: SocketAddr, now_ms: u64) -> bool {
        if lock(&self.route).route == Route::Direct(from) {
            self.direct_rx_ms.store(now_ms, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Whether data from an address that is not the path should be reported to the path
    /// finder now: at most once a second, not once per packet.
    pub fn report_seen_elsewhere(&self, now_ms: u64) -> bool {
        let last = self.seen_elsewhere_ms.load(Ordering::Relaxed);
        now_ms.saturating_sub(last) >= 1000
            && self
                .seen_elsewhere_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Whether a cookie reply from this peer should make us send our handshake again now,
    /// with the cookie, instead of at boringtun's retry 5 s later: at most once a second.
    pub fn retry_after_cookie(&self, now_ms: u64) -> bool {
        let last = self.cookie_retry_ms.load(Ordering::Relaxed);
        (last == 0 || now_ms.saturating_sub(last) >= 1000)
            && self
                .cookie_retry_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    pub fn listing(&self) -> Listing {
        *lock(&self.listing)
    }

    pub fn set_listing(&self, listing: Listing) {
        if listing == Listing::Listed {
            // Listed again: a new session of the member's, whatever its last one said.
            self.left.store(false, Ordering::Relaxed);
        }
        *lock(&self.listing) = listing;
    }

    /// The peer said, through its own tunnel (so nobody else can say it), that it leaves the
    /// network: once unlisted it goes at once ([`crate::core::offline::verdict`]).
    pub fn mark_left(&self) {
        self.left.store(true, Ordering::Relaxed);
    }

    pub fn has_left(&self) -> bool {
        self.left.load(Ordering::Relaxed)
    }

    /// When something last came from this peer directly: its direct path's last answer or
    /// data, or data from the last direct address (`None`: never).
    pub fn direct_heard(&self, epoch: Instant) -> Option<Instant> {
        let path = lock(&self.path).direct_heard();
        path.max(self.last_direct_rx(epoch))
    }

    /// When data last came from the direct address, if ever.
    pub fn last_direct_rx(&self, epoch: Instant) -> Option<Instant> {
        match self.direct_rx_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(epoch + Duration::from_millis(ms)),
        }
    }
}

/// The outcome of applying a verified record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Added,
    Updated,
    /// Not newer than the record already held: dropped.
    Stale,
    /// Our own record: ignored.
    IsSelf,
    /// Another peer already holds that overlay address: dropped.
    AddressConflict,
    /// The node key is an X25519 point of small order: dropped (anyone could impersonate it).
    LowOrderKey,
}

/// Where a WireGuard datagram goes, as [`PeerTable::route_wireguard`] decides.
pub enum Routed {
    Peer(Arc<Peer>),
    /// Under load and without a valid cookie MAC: answer with the cookie reply of this length
    /// (written to the caller's buffer).
    Cookie(usize),
    /// A handshake message over its source's share while under load: dropped.
    RateLimited,
    Rejected,
    UnknownPeer,
}

/// How a datagram reached us, and so how to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    Direct(SocketAddr),
    /// Through the relay, from the peer with this relay id.
    Relay(u32),
}

impl Via {
    /// Who sent it, for the per-source handshake limit.
    pub fn source(self) -> Source {
        match self {
            Via::Direct(addr) => Source::Addr(addr.ip()),
            Via::Relay(id) => Source::Relay(id),
        }
    }

    /// The address it came from, when it came directly.
    pub fn direct(self) -> Option<SocketAddr> {
        match self {
            Via::Direct(a) => Some(a),
            Via::Relay(_) => None,
        }
    }
}

/// Who sent a datagram, for the per-source handshake limit: its underlay address, or, when
/// relayed (all relayed datagrams come from the coordinator's address), its relay id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Addr(IpAddr),
    Relay(u32),
}

#[derive(Default)]
struct Snapshot {
    by_ip: HashMap<Ipv4Addr, Arc<Peer>>,
    by_ip6: HashMap<Ipv6Addr, Arc<Peer>>,
    by_key: HashMap<NodeKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
}

pub struct PeerTable {
    snapshot: ArcSwap<Snapshot>,
    writer: Mutex<()>,
    own_key: NodeKey,
    own_secret: StaticSecret,
    rate_limiter: Arc<RateLimiter>,
    /// Handshake messages seen since the last [`reset_handshake_limits`]: at or over
    /// `HANDSHAKE_RATE_LIMIT`, the node is under load (boringtun, counting at least as many, is
    /// then demanding cookies).
    ///
    /// [`reset_handshake_limits`]: PeerTable::reset_handshake_limits
    handshakes: AtomicU64,
    /// Under load: handshake messages let through per source since the last reset.
    per_source: Mutex<PerSecond<Source>>,
    epoch: Instant,
    /// What this host's addresses reach: which of a peer's candidates its path state probes.
    reach: Mutex<Reach>,
    /// Bumped on every change to the members or their records (the policy recompiles).
    generation: AtomicU64,
}

impl PeerTable {
    /// A table for the node with `own_secret`, its clock starting at `now`.
    pub fn new(own_secret: StaticSecret, now: Instant) -> Self {
        let own_public = PublicKey::from(&own_secret);
        PeerTable {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            writer: Mutex::new(()),
            own_key: NodeKey(own_public.to_bytes()),
            own_secret,
            rate_limiter: Arc::new(RateLimiter::new(&own_public, HANDSHAKE_RATE_LIMIT)),
            handshakes: AtomicU64::new(0),
            per_source: Mutex::new(PerSecond::new(HANDSHAKES_PER_SOURCE)),
            // Back-dated so that "ms since epoch" is never 0 (0 means "never").
            epoch: now - Duration::from_millis(1),
            reach: Mutex::new(Reach::default()),
            generation: AtomicU64::new(0),
        }
    }

    /// Changes whenever a member joins, leaves or publishes a new record.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// This host's addresses are `locals` and `reflexive`: from now on each peer's path probes
    /// those of its candidates they reach ([`Reach`]), the peers known already included.
    pub fn set_addresses(
        &self,
        now: Instant,
        reflexive: Option<SocketAddr>,
        locals: &[SocketAddr],
    ) {
        let reach = Reach::from_addresses(reflexive, locals);
        {
            let mut cur = lock(&self.reach);
            if *cur == reach {
                return;
            }
            *cur = reach.clone();
        }
        for peer in self.all() {
            let candidates = reach.usable(&lock(&peer.info).candidates);
            peer.with_path(|p| p.set_candidates(now, candidates));
        }
    }

    /// The candidates of a peer this host probes.
    fn usable(&self, candidates: &[SocketAddr]) -> Vec<SocketAddr> {
        lock(&self.reach).usable(candidates)
    }

    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// `now` in milliseconds since the epoch, for [`Peer::heard_direct`].
    pub fn ms_since_epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    pub fn own_key(&self) -> NodeKey {
        self.own_key
    }

    pub fn own_public(&self) -> PublicKey {
        PublicKey::from(self.own_key.0)
    }

    /// Starts a new second for the handshake limits (boringtun's, which resets itself at most
    /// once a second, and the per-source one); called about every second.
    pub fn reset_handshake_limits(&self) {
        self.rate_limiter.reset_count();
        self.handshakes.store(0, Ordering::Relaxed);
        lock(&self.per_source).reset();
    }

    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<Arc<Peer>> {
        self.snapshot.load().by_ip.get(&ip).cloned()
    }

    pub fn by_ip6(&self, ip: Ipv6Addr) -> Option<Arc<Peer>> {
        self.snapshot.load().by_ip6.get(&ip).cloned()
    }

    /// The peer holding overlay address `ip`, of either family.
    pub fn by_addr(&self, ip: IpAddr) -> Option<Arc<Peer>> {
        match ip {
            IpAddr::V4(v4) => self.by_ip(v4),
            IpAddr::V6(v6) => self.by_ip6(v6),
        }
    }

    pub fn by_key(&self, key: &NodeKey) -> Option<Arc<Peer>> {
        self.snapshot.load().by_key.get(key).cloned()
    }

    /// The peer owning an index from a WireGuard message's receiver field.
    pub fn by_receiver_index(&self, receiver_idx: u32) -> Option<Arc<Peer>> {
        self.snapshot
            .load()
            .by_index
            .get(&(receiver_idx >> 8))
            .cloned()
    }

    /// Finds the peer a WireGuard datagram from `src` (the underlay address it came from, to
    /// which cookies are bound) belongs to, after boringtun's rate limiter has checked its MAC1
    /// (and, under load, its cookie MAC2; `cookie` then receives the cookie reply). Under load,
    /// a handshake message with a valid cookie still counts against its `source`'s share. An
    /// initiation is matched by the static key inside it, everything else by the receiver index.
    pub fn route_wireguard(
        &self,
        datagram: &[u8],
        src: IpAddr,
        source: Source,
        cookie: &mut [u8],
    ) -> Routed {
        // Counted as boringtun counts them: initiations and responses of the right size only.
        let handshake = matches!(
            (datagram.first(), datagram.len()),
            (Some(1), 148) | (Some(2), 92)
        );
        let under_load =
            handshake && self.handshakes.fetch_add(1, Ordering::Relaxed) >= HANDSHAKE_RATE_LIMIT;
        let packet = match self.rate_limiter.verify_packet(Some(src), datagram, cookie) {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(c)) => return Routed::Cookie(c.len()),
            Err(_) => return Routed::Rejected,
        };
        if under_load {
            // Its MAC2 is valid (boringtun, under load too, checked it): the sender can receive
            // at its address, but may not make us do handshakes at any rate.
            if !lock(&self.per_source).allow(source) {
                return Routed::RateLimited;
            }
        }
        let peer = match packet {
            Packet::HandshakeInit(init) => {
                parse_handshake_anon(&self.own_secret, &self.own_public(), &init)
                    .ok()
                    .and_then(|h| self.by_key(&NodeKey(h.peer_static_public)))
            }
            Packet::HandshakeResponse(r) => self.by_receiver_index(r.receiver_idx),
            Packet::PacketCookieReply(c) => self.by_receiver_index(c.receiver_idx),
            Packet::PacketData(d) => self.by_receiver_index(d.receiver_idx),
        };
        match peer {
            Some(p) => Routed::Peer(p),
            None => Routed::UnknownPeer,
        }
    }

    /// The peer a user names: by its name, overlay address or public key (base64).
    pub fn find(&self, target: &str) -> Option<Arc<Peer>> {
        self.all().into_iter().find(|p| {
            p.info().name == target
                || p.ip().to_string() == target
                || target.parse() == Ok(p.ip6())
                || p.key.to_base64() == target
        })
    }

    pub fn all(&self) -> Vec<Arc<Peer>> {
        let mut v: Vec<_> = self.snapshot.load().by_key.values().cloned().collect();
        v.sort_by_key(|p| p.ip());
        v
    }

    pub fn len(&self) -> usize {
        self.snapshot.load().by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn rebuild(&self, mutate: impl FnOnce(&mut HashMap<NodeKey, Arc<Peer>>)) {
        let current = self.snapshot.load();
        let mut by_key = current.by_key.clone();
        mutate(&mut by_key);
        let by_ip = by_key.values().map(|p| (p.ip(), p.clone())).collect();
        let by_ip6 = by_key.values().map(|p| (p.ip6(), p.clone())).collect();
        let by_index = by_key.values().map(|p| (p.index, p.clone())).collect();
        self.snapshot.store(Arc::new(Snapshot {
            by_ip,
            by_ip6,
            by_key,
            by_index,
        }));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Applies a record whose signature (and certificate, if any) the caller has verified.
    pub fn apply(&self, now: Instant, record: NodeRecord, cert: Option<MemberCert>) -> Applied {
        if record.node_key == self.own_key {
            return Applied::IsSelf;
        }
        if record.node_key.is_low_order() {
            // Checked when the record was verified too; a peer with such a key would be a peer
            // anybody can complete a WireGuard handshake as (its static DH is all zeros).
            return Applied::LowOrderKey;
        }
        let _w = lock(&self.writer);
        let snap = self.snapshot.load();
        // The record verified for its network: the IPv6 address follows from the two.
        let ip6 = derive_ip6(&record.network, &record.node_key);
        let v4_holder = snap.by_ip.get(&record.ip);
        let v6_holder = snap.by_ip6.get(&ip6);
        if [v4_holder, v6_holder]
            .into_iter()
            .flatten()
            .any(|holder| holder.key != record.node_key)
        {
            return Applied::AddressConflict;
        }
        let info = PeerInfo {
            name: record.name,
            ip: record.ip,
            ip6,
            candidates: record.candidates,
            issued_ms: record.issued_ms,
            cert,
            ssh: record.ssh.unwrap_or_default(),
        };
        if let Some(peer) = snap.by_key.get(&record.node_key) {
            {
                let mut current = lock(&peer.info);
                if info.issued_ms <= current.issued_ms {
                    return Applied::Stale;
                }
                peer.ip.store(u32::from(info.ip), Ordering::Relaxed);
                peer.store_ip6(info.ip6);
                *current = info.clone();
            }
            {
                let mut path = lock(&peer.path);
                path.set_candidates(now, self.usable(&info.candidates));
                peer.publish_route(&path);
            }
            self.rebuild(|_| {});
            return Applied::Updated;
        }
        // boringtun puts this 24-bit index in the upper bits of every WireGuard index of the
        // peer, in clear in every packet: a random one (unique here) says nothing about how many
        // peers this node has or in which order they came, nor ties its tunnels together, as
        // consecutive indices would.
        let index = loop {
            let i = rand::random::<u32>() & 0x00ff_ffff;
            if !snap.by_index.contains_key(&i) {
                break i;
            }
        };
        let tunn = Tunn::new(
            self.own_secret.clone(),
            PublicKey::from(record.node_key.0),
            None,
            Some(PERSISTENT_KEEPALIVE_S),
            index,
            Some(self.rate_limiter.clone()),
        );
        let path = PathState::new(now, self.usable(&info.candidates));
        let peer = Arc::new(Peer {
            key: record.node_key,
            index,
            tunn: Mutex::new(tunn),
            ip: AtomicU32::new(u32::from(info.ip)),
            ip6: [
                AtomicU64::new((u128::from(info.ip6) >> 64) as u64),
                AtomicU64::new(u128::from(info.ip6) as u64),
            ],
            disco: DiscoKey::derive(&self.own_secret, &record.node_key),
            relay_id: AtomicU32::new(0),
            route: Mutex::new(SendRoute {
                route: path.route(),
                fallback: path.fallback(),
            }),
            path: Mutex::new(path),
            direct_rx_ms: AtomicU64::new(0),
            seen_elsewhere_ms: AtomicU64::new(0),
            cookie_retry_ms: AtomicU64::new(0),
            listing: Mutex::new(Listing::Listed),
            left: AtomicBool::new(false),
            info: Mutex::new(info),
        });
        self.rebuild(|by_key| {
            by_key.insert(peer.key, peer.clone());
        });
        Applied::Added
    }

    /// Removes a peer (it left the network); true if it was present.
    pub fn remove(&self, key: &NodeKey) -> bool {
        let _w = lock(&self.writer);
        let mut removed = false;
        self.rebuild(|by_key| removed = by_key.remove(key).is_some());
        removed
    }

    pub fn clear(&self) {
        let _w = lock(&self.writer);
        self.rebuild(|by_key| by_key.clear());
    }
}

/// The public key of a node private key.
pub fn own_key(node_private: &[u8; 32]) -> a2a_proto::NodeKey {
    a2a_proto::NodeKey(PublicKey::from(&StaticSecret::from(*node_private)).to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> (StaticSecret, NodeKey) {
        let s = StaticSecret::from([n; 32]);
        let p = PublicKey::from(&s);
        (s, NodeKey(p.to_bytes()))
    }

    fn record(n: u8, ip: &str, issued_ms: u64) -> NodeRecord {
        NodeRecord {
            network: a2a_proto::NetworkKey::derive(&[1; 32]).id(),
            node_key: key(n).1,
            name: format!("n{n}"),
            ip: ip.parse().unwrap(),
            candidates: vec![format!("10.0.0.{n}:51820").parse().unwrap()],
            issued_ms,
            ssh: None,
        }
    }

    #[test]
    fn peers_have_their_derived_ip6_and_the_inner_source_check_takes_only_their_own() {
        let t = PeerTable::new(key(1).0, Instant::now());
        let r2 = record(2, "100.64.0.2", 1);
        let r3 = record(3, "100.64.0.3", 1);
        let (ip6_2, ip6_3) = (
            derive_ip6(&r2.network, &r2.node_key),
            derive_ip6(&r3.network, &r3.node_key),
        );
        assert_eq!(t.apply(Instant::now(), r2, None), Applied::Added);
        assert_eq!(t.apply(Instant::now(), r3, None), Applied::Added);
        let p2 = t.by_ip6(ip6_2).unwrap();
        assert_eq!(p2.ip6(), ip6_2);
        assert_eq!(p2.info().ip6, ip6_2);
        assert!(Arc::ptr_eq(&p2, &t.by_addr(IpAddr::V6(ip6_2)).unwrap()));
        assert!(Arc::ptr_eq(
            &p2,
            &t.by_addr("100.64.0.2".parse().unwrap()).unwrap()
        ));
        assert!(Arc::ptr_eq(&p2, &t.find(&ip6_2.to_string()).unwrap()));
        // Its own addresses pass; another peer's, or any other, of either family, do not.
        assert!(p2.holds(IpAddr::V6(ip6_2)));
        assert!(p2.holds("100.64.0.2".parse().unwrap()));
        assert!(!p2.holds(IpAddr::V6(ip6_3)));
        assert!(!p2.holds("100.64.0.3".parse().unwrap()));
        let mut near = ip6_2.octets();
        near[15] ^= 1;
        assert!(!p2.holds(IpAddr::V6(near.into())));
        assert!(!p2.holds("fe80::1".parse().unwrap()));
        assert!(!p2.holds("::ffff:100.64.0.2".parse().unwrap()));
        // An update keeps the address (it is the key's), and the lookups.
        assert_eq!(
            t.apply(Instant::now(), record(2, "100.64.0.9", 2), None),
            Applied::Updated
        );
        assert_eq!(t.by_ip6(ip6_2).unwrap().ip6(), ip6_2);
        assert!(t.remove(&key(2).1));
        assert!(t.by_ip6(ip6_2).is_none());
    }

    #[test]
    fn adds_updates_and_drops_stale_records() {
        let t = PeerTable::new(key(1).0, Instant::now());
        assert_eq!(
            t.apply(Instant::now(), record(1, "100.64.0.1", 1), None),
            Applied::IsSelf
        );
        assert_eq!(
            t.apply(Instant::now(), record(2, "100.64.0.2", 5), None),
            Applied::Added
        );
        assert_eq!(
            t.apply(Instant::now(), record(2, "100.64.0.2", 5), None),
            Applied::Stale
        );
        assert_eq!(
            t.apply(Instant::now(), record(2, "100.64.0.2", 4), None),
            Applied::Stale
        );
        assert_eq!(t.len(), 1);
        let p = t.by_ip("100.64.0.2".parse().unwrap()).unwrap();
        assert_eq!(p.route().route, Route::Relay, "traffic starts on the relay");
        assert_eq!(p.route().fallback, Some("10.0.0.2:51820".parse().unwrap()));
        // A newer record moves the address; lookups follow.
        assert_eq!(
            t.apply(Instant::now(), record(2, "100.64.0.9", 6), None),
            Applied::Updated
        );
        assert!(t.by_ip("100.64.0.2".parse().unwrap()).is_none());
        let p2 = t.by_ip("100.64.0.9".parse().unwrap()).unwrap();
        assert!(Arc::ptr_eq(&p, &p2), "the tunnel survives a record update");
        assert!(Arc::ptr_eq(&t.by_key(&key(2).1).unwrap(), &p));
        assert!(Arc::ptr_eq(
            &t.by_receiver_index((p.index << 8) | 3).unwrap(),
            &p
        ));
    }

    #[test]
    fn an_address_held_by_another_peer_is_refused() {
        let t = PeerTable::new(key(1).0, Instant::now());
        assert_eq!(
            t.apply(Instant::now(), record(2, "100.64.0.2", 1), None),
            Applied::Added
        );
        assert_eq!(
            t.apply(Instant::now(), record(3, "100.64.0.2", 1), None),
            Applied::AddressConflict
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn data_refreshes_only_the_direct_path() {
        let t = PeerTable::new(key(1).0, Instant::now());
        t.apply(Instant::now(), record(2, "100.64.0.2", 1), None);
        let p = t.by_key(&key(2).1).unwrap();
        let addr: SocketAddr = "10.0.0.2:51820".parse().unwrap();
        assert!(
            !p.heard_direct(addr, 5),
            "relayed: the path finder must look"
        );
        assert_eq!(p.last_direct_rx(t.epoch()), None);
        p.with_path(|path| {
            let now = Instant::now();
            let mut probes = Vec::new();
            path.tick(now, None, None, &mut probes);
            path.on_pong(now, probes[0].tx, Some(addr)).unwrap();
            let c = path.confirm_probe(now, addr);
            path.on_pong(now, c.tx, Some(addr)).unwrap();
        });
        assert_eq!(p.route().route, Route::Direct(addr));
        assert!(p.heard_direct(addr, 5));
        assert_eq!(
            p.last_direct_rx(t.epoch()),
            Some(t.epoch() + Duration::from_millis(5))
        );
        assert!(!p.heard_direct("10.9.9.9:1".parse().unwrap(), 6));
        // Reported to the path finder once a second, not per packet.
        assert!(p.report_seen_elsewhere(2000));
        assert!(!p.report_seen_elsewhere(2500));
        assert!(p.report_seen_elsewhere(3000));
    }

    #[test]
    fn peer_indices_are_random_not_sequential() {
        let t = PeerTable::new(key(1).0, Instant::now());
        let mut indices = Vec::new();
        for n in 2..66u8 {
            t.apply(Instant::now(), record(n, &format!("100.64.0.{n}"), 1), None);
            indices.push(t.by_key(&key(n).1).unwrap().index);
        }
        assert!(
            indices.iter().all(|&i| i < 1 << 24),
            "24 bits: {indices:x?}"
        );
        let mut sorted = indices.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), indices.len(), "unique");
        // Consecutive peers get unrelated indices (sequential ones would count the peers and
        // tie a node's tunnels together); 64 random 24-bit values spread far.
        let neighbours = indices.windows(2).filter(|w| w[0].abs_diff(w[1]) < 256);
        assert!(neighbours.count() <= 1, "{indices:x?}");
        assert!(
            sorted[sorted.len() - 1] - sorted[0] > 1 << 20,
            "{indices:x?}"
        );
    }

    #[test]
    fn low_order_keys_never_become_peers() {
        let t = PeerTable::new(key(1).0, Instant::now());
        for (i, p) in a2a_proto::keys::LOW_ORDER_POINTS.into_iter().enumerate() {
            for top in [0u8, 0x80] {
                let mut k = p;
                k[31] |= top;
                let mut r = record(2, &format!("100.64.0.{}", i + 2), 1);
                r.node_key = NodeKey(k);
                assert_eq!(
                    t.apply(Instant::now(), r, None),
                    Applied::LowOrderKey,
                    "{k:02x?}"
                );
            }
        }
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn removal_and_distinct_indices() {
        let t = PeerTable::new(key(1).0, Instant::now());
        t.apply(Instant::now(), record(2, "100.64.0.2", 1), None);
        t.apply(Instant::now(), record(3, "100.64.0.3", 1), None);
        let a = t.by_key(&key(2).1).unwrap().index;
        let b = t.by_key(&key(3).1).unwrap().index;
        assert_ne!(a, b);
        assert!(t.remove(&key(2).1));
        assert!(!t.remove(&key(2).1));
        assert!(t.by_ip("100.64.0.2".parse().unwrap()).is_none());
        assert_eq!(t.all().len(), 1);
        t.clear();
        assert_eq!(t.len(), 0);
    }
}
