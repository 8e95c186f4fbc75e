//! Relay routing: which node a relayed datagram comes from, where its destination can be
//! reached, and whether the sender may send it. Free of I/O and of logging.
//!
//! Every registered connection owns a relay slot, named by its relay id (the connection id).
//! A node reaches its slot over the control connection (TCP relay frames) and, once it has
//! proved the slot's secret in a UDP bind, over UDP from the bound address. A datagram is
//! forwarded only between two slots of the same network, over UDP to a destination bound in the
//! last [`UDP_BIND_TTL`], else over the destination's control connection. The table holds what
//! forwarding needs and nothing else: no counts per pair, no history.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use a2a_proto::keys::RelaySecret;
use a2a_proto::NetworkId;

/// A UDP binding not refreshed for this long is no longer used to reach its node.
pub const UDP_BIND_TTL: Duration = Duration::from_secs(15);
/// Datagrams one node may have relayed per second (sustained), and in a burst.
pub const RELAY_RATE_PPS: f64 = 80_000.0;
pub const RELAY_BURST: f64 = 8_000.0;

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

/// A token bucket in datagrams.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(now: Instant) -> Self {
        Bucket {
            tokens: RELAY_BURST,
            at: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * RELAY_RATE_PPS).min(RELAY_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Slot<H> {
    network: NetworkId,
    secret: RelaySecret,
    handle: H,
    udp: Option<(SocketAddr, Instant)>,
    bucket: Bucket,
}

impl<H: Clone> Slot<H> {
    fn dest(&self, now: Instant) -> Dest<H> {
        match self.udp {
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
                udp: None,
                bucket: Bucket::new(now),
            },
        );
    }

    pub fn remove(&mut self, id: u32) {
        if let Some(slot) = self.slots.remove(&id) {
            if let Some((addr, _)) = slot.udp {
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
        if let Some((old, _)) = slot.udp {
            if old != src && self.by_addr.get(&old) == Some(&id) {
                self.by_addr.remove(&old);
            }
        }
        slot.udp = Some((src, now));
        // An address re-bound by another slot (a node restarted behind the same NAT mapping)
        // now belongs to the newest binder.
        if let Some(prev) = self.by_addr.insert(src, id) {
            if prev != id {
                if let Some(p) = self.slots.get_mut(&prev) {
                    p.udp = None;
                }
            }
        }
        Ok(())
    }

    /// A relay datagram for `dst` arriving over UDP from `src`: the sender's id and where to
    /// send it.
    pub fn route_udp(
        &mut self,
        now: Instant,
        src: SocketAddr,
        dst: u32,
    ) -> Result<(u32, Dest<H>), RelayDrop> {
        let src_id = *self.by_addr.get(&src).ok_or(RelayDrop::UnknownSource)?;
        self.route_slot(now, src_id, dst).map(|d| (src_id, d))
    }

    /// A relay datagram for `dst` arriving over the control connection of slot `src_id`.
    pub fn route_conn(
        &mut self,
        now: Instant,
        src_id: u32,
        dst: u32,
    ) -> Result<Dest<H>, RelayDrop> {
        self.route_slot(now, src_id, dst)
    }

    fn route_slot(&mut self, now: Instant, src_id: u32, dst: u32) -> Result<Dest<H>, RelayDrop> {
        let src = self
            .slots
            .get_mut(&src_id)
            .ok_or(RelayDrop::UnknownSource)?;
        let network = src.network;
        if !src.bucket.take(now) {
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
        t.bind(now, 1, &RelaySecret([1; 16]), addr("192.0.2.1:5000"))
            .unwrap();
        t.bind(now, 2, &RelaySecret([2; 16]), addr("192.0.2.2:6000"))
            .unwrap();
        assert_eq!(
            t.route_udp(now, addr("192.0.2.1:5000"), 2),
            Ok((1, Dest::Udp(addr("192.0.2.2:6000"))))
        );
        // A binding not refreshed falls back to the control connection.
        let later = now + UDP_BIND_TTL + Duration::from_secs(1);
        assert_eq!(t.route_conn(later, 1, 2), Ok(Dest::Conn("conn2")));
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
    fn nothing_crosses_networks_or_reaches_unknown_ids() {
        let now = Instant::now();
        let mut t = table(now);
        assert_eq!(t.route_conn(now, 1, 3), Err(RelayDrop::ForeignNetwork));
        assert_eq!(t.route_conn(now, 3, 1), Err(RelayDrop::ForeignNetwork));
        assert_eq!(t.route_conn(now, 1, 99), Err(RelayDrop::UnknownDestination));
        assert_eq!(t.route_conn(now, 99, 1), Err(RelayDrop::UnknownSource));
    }

    #[test]
    fn a_flooding_sender_is_limited_without_limiting_others() {
        let now = Instant::now();
        let mut t = table(now);
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
