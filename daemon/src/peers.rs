//! The peer table: one WireGuard tunnel (`boringtun::noise::Tunn`) per member of the network,
//! found by overlay address (TUN→UDP), by session index or key (UDP→TUN).
//!
//! Readers on the packet path load an immutable snapshot (`ArcSwap`), so they never take a
//! table-wide lock; each peer's tunnel has its own lock. Writers (the control client) build a
//! new snapshot. No I/O happens here.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use a2a_proto::{NodeKey, NodeRecord};
use arc_swap::ArcSwap;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use boringtun::x25519::{PublicKey, StaticSecret};

/// WireGuard persistent keepalive, seconds: holds NAT mappings open.
pub const PERSISTENT_KEEPALIVE_S: u16 = 25;
/// Handshake initiations a second before cookies are demanded (shared by all peers).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// What the control client knows of a peer, from its latest record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub name: String,
    pub ip: Ipv4Addr,
    pub candidates: Vec<SocketAddr>,
    pub issued_ms: u64,
}

/// Where to send a peer's datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Endpoint {
    pub addr: Option<SocketAddr>,
    /// True once an authenticated packet came from `addr` (WireGuard roaming).
    pub confirmed: bool,
}

pub struct Peer {
    pub key: NodeKey,
    /// The 24-bit index boringtun puts in the upper bits of this peer's session indices.
    pub index: u32,
    tunn: Mutex<Tunn>,
    /// The overlay address, also in `info`; kept apart so the receive path checks inner
    /// sources without taking a lock.
    ip: AtomicU32,
    info: Mutex<PeerInfo>,
    endpoint: Mutex<Endpoint>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

    pub fn endpoint(&self) -> Endpoint {
        *lock(&self.endpoint)
    }

    /// An authenticated packet arrived from `from`: send there from now on (roaming).
    pub fn confirm_endpoint(&self, from: SocketAddr) {
        let mut e = lock(&self.endpoint);
        if e.addr != Some(from) || !e.confirmed {
            *e = Endpoint {
                addr: Some(from),
                confirmed: true,
            };
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
}

#[derive(Default)]
struct Snapshot {
    by_ip: HashMap<Ipv4Addr, Arc<Peer>>,
    by_key: HashMap<NodeKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
}

pub struct PeerTable {
    snapshot: ArcSwap<Snapshot>,
    writer: Mutex<()>,
    own_key: NodeKey,
    own_secret: StaticSecret,
    rate_limiter: Arc<RateLimiter>,
    next_index: AtomicU32,
}

impl PeerTable {
    pub fn new(own_secret: StaticSecret) -> Self {
        let own_public = PublicKey::from(&own_secret);
        PeerTable {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            writer: Mutex::new(()),
            own_key: NodeKey(own_public.to_bytes()),
            own_secret,
            rate_limiter: Arc::new(RateLimiter::new(&own_public, HANDSHAKE_RATE_LIMIT)),
            // Session indices are 24 bits; start at a random one.
            next_index: AtomicU32::new(rand::random::<u32>() & 0x00ff_ffff),
        }
    }

    pub fn own_key(&self) -> NodeKey {
        self.own_key
    }

    pub fn own_secret(&self) -> &StaticSecret {
        &self.own_secret
    }

    pub fn own_public(&self) -> PublicKey {
        PublicKey::from(self.own_key.0)
    }

    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.rate_limiter
    }

    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<Arc<Peer>> {
        self.snapshot.load().by_ip.get(&ip).cloned()
    }

    pub fn by_key(&self, key: &NodeKey) -> Option<Arc<Peer>> {
        self.snapshot.load().by_key.get(key).cloned()
    }

    /// The peer owning a session index from a WireGuard message's receiver field.
    pub fn by_receiver_index(&self, receiver_idx: u32) -> Option<Arc<Peer>> {
        self.snapshot
            .load()
            .by_index
            .get(&(receiver_idx >> 8))
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<Peer>> {
        let mut v: Vec<_> = self.snapshot.load().by_key.values().cloned().collect();
        v.sort_by_key(|p| p.ip());
        v
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.snapshot.load().by_key.len()
    }

    fn rebuild(&self, mutate: impl FnOnce(&mut HashMap<NodeKey, Arc<Peer>>)) {
        let current = self.snapshot.load();
        let mut by_key = current.by_key.clone();
        mutate(&mut by_key);
        let by_ip = by_key.values().map(|p| (p.ip(), p.clone())).collect();
        let by_index = by_key.values().map(|p| (p.index, p.clone())).collect();
        self.snapshot.store(Arc::new(Snapshot {
            by_ip,
            by_key,
            by_index,
        }));
    }

    /// Applies a record whose signature the caller has verified.
    pub fn apply(&self, record: NodeRecord) -> Applied {
        if record.node_key == self.own_key {
            return Applied::IsSelf;
        }
        let _w = lock(&self.writer);
        let snap = self.snapshot.load();
        if let Some(holder) = snap.by_ip.get(&record.ip) {
            if holder.key != record.node_key {
                return Applied::AddressConflict;
            }
        }
        let info = PeerInfo {
            name: record.name,
            ip: record.ip,
            candidates: record.candidates,
            issued_ms: record.issued_ms,
        };
        if let Some(peer) = snap.by_key.get(&record.node_key) {
            {
                let mut current = lock(&peer.info);
                if info.issued_ms <= current.issued_ms {
                    return Applied::Stale;
                }
                peer.ip.store(u32::from(info.ip), Ordering::Relaxed);
                *current = info.clone();
            }
            {
                // Until the peer has been heard from, follow its published candidates.
                let mut e = lock(&peer.endpoint);
                if !e.confirmed {
                    e.addr = info.candidates.first().copied();
                }
            }
            self.rebuild(|_| {});
            return Applied::Updated;
        }
        let index = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        let tunn = Tunn::new(
            self.own_secret.clone(),
            PublicKey::from(record.node_key.0),
            None,
            Some(PERSISTENT_KEEPALIVE_S),
            index,
            Some(self.rate_limiter.clone()),
        );
        let peer = Arc::new(Peer {
            key: record.node_key,
            index,
            tunn: Mutex::new(tunn),
            ip: AtomicU32::new(u32::from(info.ip)),
            endpoint: Mutex::new(Endpoint {
                addr: info.candidates.first().copied(),
                confirmed: false,
            }),
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
            node_key: key(n).1,
            name: format!("n{n}"),
            ip: ip.parse().unwrap(),
            candidates: vec![format!("10.0.0.{n}:51820").parse().unwrap()],
            issued_ms,
        }
    }

    #[test]
    fn adds_updates_and_drops_stale_records() {
        let t = PeerTable::new(key(1).0);
        assert_eq!(t.apply(record(1, "100.64.0.1", 1)), Applied::IsSelf);
        assert_eq!(t.apply(record(2, "100.64.0.2", 5)), Applied::Added);
        assert_eq!(t.apply(record(2, "100.64.0.2", 5)), Applied::Stale);
        assert_eq!(t.apply(record(2, "100.64.0.2", 4)), Applied::Stale);
        assert_eq!(t.len(), 1);
        let p = t.by_ip("100.64.0.2".parse().unwrap()).unwrap();
        assert_eq!(p.endpoint().addr, Some("10.0.0.2:51820".parse().unwrap()));
        // A newer record moves the address; lookups follow.
        assert_eq!(t.apply(record(2, "100.64.0.9", 6)), Applied::Updated);
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
        let t = PeerTable::new(key(1).0);
        assert_eq!(t.apply(record(2, "100.64.0.2", 1)), Applied::Added);
        assert_eq!(
            t.apply(record(3, "100.64.0.2", 1)),
            Applied::AddressConflict
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn confirmed_endpoints_are_not_overridden_by_records() {
        let t = PeerTable::new(key(1).0);
        t.apply(record(2, "100.64.0.2", 1));
        let p = t.by_key(&key(2).1).unwrap();
        let seen: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        p.confirm_endpoint(seen);
        t.apply(record(2, "100.64.0.2", 2));
        assert_eq!(
            p.endpoint(),
            Endpoint {
                addr: Some(seen),
                confirmed: true
            }
        );
    }

    #[test]
    fn removal_and_distinct_indices() {
        let t = PeerTable::new(key(1).0);
        t.apply(record(2, "100.64.0.2", 1));
        t.apply(record(3, "100.64.0.3", 1));
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
