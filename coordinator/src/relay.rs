//! Relay routing: which node a relayed datagram comes from, where its destination can be
//! reached, and whether the sender may send it. Free of I/O and of logging.
//!
//! Every registered connection owns a relay slot, named by its relay id (the connection id).
//! A node reaches its slot over the control connection (TCP relay frames) and, once it has
//! proved the slot's secret in a UDP bind, over UDP from the bound address. A datagram is
//! forwarded only between two slots of the same network, over UDP to a destination bound in the
//! last [`UDP_BIND_TTL`], else over the destination's control connection. The table holds what
//! forwarding needs and nothing else: no counts per pair, no history.
//!
//! Shared by several UDP receive loops (one per core) behind a read-write lock: routing and a
//! bind refreshed from the address it already holds take `&self` (each slot's changing part,
//! its bucket and binding, sits behind a lock of its own, which in practice only the loop that
//! receives that node's flow takes), so the loops never wait for one another; only a
//! registration, a close and a bind from a new address take the table for writing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use a2a_proto::keys::RelaySecret;
use a2a_proto::sync::lock;
use a2a_proto::NetworkId;

use crate::limits::{Rate, TokenBucket};

/// A UDP binding not refreshed for this long is no longer used to reach its node.
pub const UDP_BIND_TTL: Duration = Duration::from_secs(15);
/// Datagrams one node may have relayed per second (sustained), and in a burst: about 2.9
/// Gbit/s of full-size WireGuard packets, so the hub can carry a relayed pair near its direct
/// path's speed (80 000, the first choice, held one flow to 930 Mbit/s, 29 % of direct).
pub const RELAY_RATE_PPS: f64 = 250_000.0;
pub const RELAY_BURST: f64 = 25_000.0;

/// Where to send a relayed datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest<H> {
    Udp(SocketAddr),
    /// Over the destination's control connection.
    Conn(H),
}

/// Why a relay datagram or bind was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayDrop {
    /// UDP from an address no slot is bound to.
    UnknownSource,
    UnknownDestination,
    /// Source and destination belong to different networks.
    ForeignNetwork,
    /// The sender is over its rate.
    RateLimited,
    /// A bind with an unknown id or the wrong secret.
    BadBind,
}

/// The per-sender relay rate, as a token bucket in datagrams.
pub const RELAY_RATE: Rate = Rate {
    per_sec: RELAY_RATE_PPS,
    burst: RELAY_BURST,
};

struct Slot<H> {
    network: NetworkId,
    secret: RelaySecret,
    handle: H,
    /// What changes while the slot lives; its own lock, so routing needs the table for
    /// reading only.
    live: Mutex<Live>,
}

struct Live {
    udp: Option<(SocketAddr, Instant)>,
    bucket: TokenBucket,
}

impl<H: Clone> Slot<H> {
    fn dest(&self, now: Instant) -> Dest<H> {
        match lock(&self.live).udp {
            Some((addr, at)) if now.saturating_duration_since(at) < UDP_BIND_TTL => Dest::Udp(addr),
            _ => Dest::Conn(self.handle.clone()),
        }
    }
}

/// The relay slots of all live connections. `H` is how a connection is written to.
pub struct RelayTable<H> {
    slots: HashMap<u32, Slot<H>>,
    by_addr: HashMap<SocketAddr, u32>,
}

impl<H: Clone> Default for RelayTable<H> {
    fn default() -> Self {
        RelayTable {
            slots: HashMap::new(),
            by_addr: HashMap::new(),
        }
    }
}

impl<H: Clone> RelayTable<H> {
    pub fn insert(&mut self, now: Instant, id: u32, network: NetworkId, secret: RelaySecret, h: H) {
        self.remove(id);
        self.slots.insert(
            id,
            Slot {
                network,
                secret,
                handle: h,
                live: Mutex::new(Live {
                    udp: None,
                    bucket: TokenBucket::new(RELAY_RATE, now),
                }),
            },
        );
    }

    pub fn remove(&mut self, id: u32) {
        if let Some(slot) = self.slots.remove(&id) {
            if let Some((addr, _)) = lock(&slot.live).udp {
                if self.by_addr.get(&addr) == Some(&id) {
                    self.by_addr.remove(&addr);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Slots reached over UDP at `now` (bound, and refreshed in the last [`UDP_BIND_TTL`]): a
    /// count for the metrics, one pass over the table.
    pub fn udp_bound(&self, now: Instant) -> usize {
        self.slots
            .values()
            .filter(|s| matches!(s.dest(now), Dest::Udp(_)))
            .count()
    }

    /// A UDP bind from `src` to the address the slot already holds, refreshed without writing
    /// the table: `Ok(true)` if done, `Ok(false)` if it needs [`RelayTable::bind`] (a new
    /// address), an error if the id or secret is wrong.
    pub fn refresh(
        &self,
        now: Instant,
        id: u32,
        secret: &RelaySecret,
        src: SocketAddr,
    ) -> Result<bool, RelayDrop> {
        let slot = self.slots.get(&id).ok_or(RelayDrop::BadBind)?;
        // Constant time (`RelaySecret`'s `==`).
        if slot.secret != *secret {
            return Err(RelayDrop::BadBind);
        }
        if self.by_addr.get(&src) != Some(&id) {
            return Ok(false);
        }
        let mut live = lock(&slot.live);
        if live.udp.map(|(a, _)| a) != Some(src) {
            return Ok(false);
        }
        live.udp = Some((src, now));
        Ok(true)
    }

    /// A UDP bind from `src`: with the right secret, `src` becomes the slot's UDP address.
    pub fn bind(
        &mut self,
        now: Instant,
        id: u32,
        secret: &RelaySecret,
        src: SocketAddr,
    ) -> Result<(), RelayDrop> {
        let slot = self.slots.get_mut(&id).ok_or(RelayDrop::BadBind)?;
        // Constant time (`RelaySecret`'s `==`).
        if slot.secret != *secret {
            return Err(RelayDrop::BadBind);
        }
        let live = slot.live.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some((old, _)) = live.udp {
            if old != src && self.by_addr.get(&old) == Some(&id) {
                self.by_addr.remove(&old);
            }
        }
        live.udp = Some((src, now));
        // An address re-bound by another slot (a node restarted behind the same NAT mapping)
        // now belongs to the newest binder.
        if let Some(prev) = self.by_addr.insert(src, id) {
            if prev != id {
                if let Some(p) = self.slots.get_mut(&prev) {
                    p.live.get_mut().unwrap_or_else(|p| p.into_inner()).udp = None;
                }
            }
        }
        Ok(())
    }

    /// A relay datagram for `dst` arriving over UDP from `src`: the sender's id and where to
    /// send it.
    pub fn route_udp(
        &self,
        now: Instant,
        src: SocketAddr,
        dst: u32,
    ) -> Result<(u32, Dest<H>), RelayDrop> {
        let src_id = *self.by_addr.get(&src).ok_or(RelayDrop::UnknownSource)?;
        self.route_slot(now, src_id, dst).map(|d| (src_id, d))
    }

    /// A relay datagram for `dst` arriving over the control connection of slot `src_id`.
    pub fn route_conn(&self, now: Instant, src_id: u32, dst: u32) -> Result<Dest<H>, RelayDrop> {
        self.route_slot(now, src_id, dst)
    }

    fn route_slot(&self, now: Instant, src_id: u32, dst: u32) -> Result<Dest<H>, RelayDrop> {
        let src = self.slots.get(&src_id).ok_or(RelayDrop::UnknownSource)?;
        let network = src.network;
        if !lock(&src.live).bucket.take(now) {
            return Err(RelayDrop::RateLimited);
        }
        let dst = self.slots.get(&dst).ok_or(RelayDrop::UnknownDestination)?;
        if dst.network != network {
            return Err(RelayDrop::ForeignNetwork);
        }
        Ok(dst.dest(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET_A: NetworkId = NetworkId([1; 32]);
    const NET_B: NetworkId = NetworkId([2; 32]);

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn table(now: Instant) -> RelayTable<&'static str> {
        let mut t = RelayTable::default();
        t.insert(now, 1, NET_A, RelaySecret([1; 16]), "conn1");
        t.insert(now, 2, NET_A, RelaySecret([2; 16]), "conn2");
        t.insert(now, 3, NET_B, RelaySecret([3; 16]), "conn3");
        t
    }

    #[test]
    fn unbound_nodes_are_reached_over_their_connection_then_over_udp_once_bound() {
        let now = Instant::now();
        let mut t = table(now);
        assert_eq!(t.route_conn(now, 1, 2), Ok(Dest::Conn("conn2")));
        assert_eq!(
            t.route_udp(now, addr("192.0.2.1:5000"), 2),
            Err(RelayDrop::UnknownSource)
        );
        assert_eq!(t.udp_bound(now), 0);
        t.bind(now, 1, &RelaySecret([1; 16]), addr("192.0.2.1:5000"))
            .unwrap();
        t.bind(now, 2, &RelaySecret([2; 16]), addr("192.0.2.2:6000"))
            .unwrap();
        assert_eq!(t.udp_bound(now), 2);
        assert_eq!(
            t.route_udp(now, addr("192.0.2.1:5000"), 2),
            Ok((1, Dest::Udp(addr("192.0.2.2:6000"))))
        );
        // A binding not refreshed falls back to the control connection.
        let later = now + UDP_BIND_TTL + Duration::from_secs(1);
        assert_eq!(t.route_conn(later, 1, 2), Ok(Dest::Conn("conn2")));
        assert_eq!(t.udp_bound(later), 0);
    }

    #[test]
    fn binds_need_the_secret_and_follow_the_newest_address() {
        let now = Instant::now();
        let mut t = table(now);
        assert_eq!(
            t.bind(now, 1, &RelaySecret([9; 16]), addr("192.0.2.9:1")),
            Err(RelayDrop::BadBind)
        );
        assert_eq!(
            t.bind(now, 77, &RelaySecret([1; 16]), addr("192.0.2.9:1")),
            Err(RelayDrop::BadBind)
        );
        assert_eq!(
            t.route_udp(now, addr("192.0.2.9:1"), 2),
            Err(RelayDrop::UnknownSource),
            "a failed bind binds nothing"
        );
        // Roaming: the node binds from a new address; the old one stops working.
        t.bind(now, 1, &RelaySecret([1; 16]), addr("192.0.2.1:5000"))
            .unwrap();
        t.bind(now, 1, &RelaySecret([1; 16]), addr("192.0.2.1:5001"))
            .unwrap();
        assert_eq!(
            t.route_udp(now, addr("192.0.2.1:5000"), 2),
            Err(RelayDrop::UnknownSource)
        );
        assert!(t.route_udp(now, addr("192.0.2.1:5001"), 2).is_ok());
        // Removing the slot removes its binding.
        t.remove(1);
        assert_eq!(
            t.route_udp(now, addr("192.0.2.1:5001"), 2),
            Err(RelayDrop::UnknownSource)
        );
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_bind_from_the_bound_address_refreshes_without_writing_the_table() {
        let now = Instant::now();
        let mut t = table(now);
        let a1 = addr("192.0.2.1:5000");
        assert_eq!(t.refresh(now, 1, &RelaySecret([1; 16]), a1), Ok(false));
        assert_eq!(
            t.refresh(now, 1, &RelaySecret([9; 16]), a1),
            Err(RelayDrop::BadBind)
        );
        t.bind(now, 1, &RelaySecret([1; 16]), a1).unwrap();
        t.bind(now, 2, &RelaySecret([2; 16]), addr("192.0.2.2:6000"))
            .unwrap();
        // Near the end of its life the binding is refreshed and reaches the node for longer.
        let later = now + UDP_BIND_TTL - Duration::from_secs(1);
        assert_eq!(
            t.refresh(later, 2, &RelaySecret([2; 16]), addr("192.0.2.2:6000")),
            Ok(true)
        );
        let after = now + UDP_BIND_TTL + Duration::from_secs(1);
        assert_eq!(
            t.route_conn(after, 1, 2),
            Ok(Dest::Udp(addr("192.0.2.2:6000")))
        );
        // Another address, or one another slot holds, needs a full bind.
        assert_eq!(t.refresh(now, 2, &RelaySecret([2; 16]), a1), Ok(false));
    }

    #[test]
    fn nothing_crosses_networks_or_reaches_unknown_ids() {
        let now = Instant::now();
        let t = table(now);
        assert_eq!(t.route_conn(now, 1, 3), Err(RelayDrop::ForeignNetwork));
        assert_eq!(t.route_conn(now, 3, 1), Err(RelayDrop::ForeignNetwork));
        assert_eq!(t.route_conn(now, 1, 99), Err(RelayDrop::UnknownDestination));
        assert_eq!(t.route_conn(now, 99, 1), Err(RelayDrop::UnknownSource));
    }

    #[test]
    fn a_flooding_sender_is_limited_without_limiting_others() {
        let now = Instant::now();
        let t = table(now);
        let mut passed = 0;
        for _ in 0..(RELAY_BURST as usize + 1000) {
            if t.route_conn(now, 1, 2).is_ok() {
                passed += 1;
            }
        }
        assert_eq!(passed, RELAY_BURST as usize);
        assert_eq!(t.route_conn(now, 2, 1), Ok(Dest::Conn("conn1")));
        // Tokens come back with time.
        let later = now + Duration::from_millis(10);
        assert!(t.route_conn(later, 1, 2).is_ok());
    }
}
