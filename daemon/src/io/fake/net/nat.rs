//! NAT routers: the mapping and filtering state of one router (RFC 4787's terms).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use tokio::time::Instant;

/// How a NAT router maps and filters UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Endpoint-independent mapping (one public port per inside socket, whatever it sends
    /// to) with address-and-port-dependent filtering: a home router's "full cone" mapping with
    /// a firewall that admits only remotes the inside socket sent to.
    Easy,
    /// Address-and-port-dependent mapping ("symmetric": a new public port for each
    /// destination) with the same filtering: what carrier-grade NATs and some firewalls do.
    Hard,
}

/// The idle time after which a mapping (and each remote's permission) is forgotten, as Linux
/// conntrack's `nf_conntrack_udp_timeout`.
pub const DEFAULT_NAT_TIMEOUT: Duration = Duration::from_secs(30);

/// First public port a router hands out (ports are not preserved, so a daemon that assumes its
/// own port is seen outside is caught).
const FIRST_PORT: u16 = 40000;

pub(super) struct NatState {
    pub(super) public_ip: Ipv4Addr,
    pub(super) kind: NatKind,
    pub(super) timeout: Duration,
    pub(super) hairpin: bool,
    /// By public port.
    mappings: HashMap<u16, Mapping>,
    next_port: u16,
}

struct Mapping {
    inside: SocketAddrV4,
    /// The one destination of a [`NatKind::Hard`] mapping.
    dest: Option<SocketAddrV4>,
    last_out: Instant,
    /// Remotes the inside socket sent to, and when it last did.
    allowed: HashMap<SocketAddrV4, Instant>,
}

impl NatState {
    pub(super) fn new(public_ip: Ipv4Addr, kind: NatKind) -> NatState {
        NatState {
            public_ip,
            kind,
            timeout: DEFAULT_NAT_TIMEOUT,
            hairpin: false,
            mappings: HashMap::new(),
            next_port: FIRST_PORT,
        }
    }

    /// Translates a datagram from `inside` to `remote`: the public port it leaves from
    /// (creating or refreshing the mapping and `remote`'s permission).
    pub(super) fn outbound(
        &mut self,
        inside: SocketAddrV4,
        remote: SocketAddrV4,
        now: Instant,
    ) -> u16 {
        self.expire(now);
        let kind = self.kind;
        let found = self
            .mappings
            .iter_mut()
            .find(|(_, m)| m.inside == inside && (kind == NatKind::Easy || m.dest == Some(remote)));
        if let Some((&port, m)) = found {
            m.last_out = now;
            m.allowed.insert(remote, now);
            return port;
        }
        let port = self.free_port();
        self.mappings.insert(
            port,
            Mapping {
                inside,
                dest: (kind == NatKind::Hard).then_some(remote),
                last_out: now,
                allowed: HashMap::from([(remote, now)]),
            },
        );
        port
    }

    /// Where a datagram from `from` to the public `port` goes inside, if the filter admits it.
    pub(super) fn inbound(
        &mut self,
        port: u16,
        from: SocketAddrV4,
        now: Instant,
    ) -> Option<SocketAddrV4> {
        self.expire(now);
        let m = self.mappings.get(&port)?;
        m.allowed.contains_key(&from).then_some(m.inside)
    }

    /// Live mappings.
    pub(super) fn mapping_count(&mut self, now: Instant) -> usize {
        self.expire(now);
        self.mappings.len()
    }

    /// Forgets every UDP mapping (a router reboot, or a NAT that renumbers): the next datagram
    /// out gets a new public port.
    pub(super) fn flush(&mut self) {
        self.mappings.clear();
    }

    /// A public port for a TCP connection (TCP is not filtered or expired).
    pub(super) fn tcp_port(&mut self) -> u16 {
        self.free_port()
    }

    fn free_port(&mut self) -> u16 {
        loop {
            let port = self.next_port;
            self.next_port = if port == u16::MAX {
                FIRST_PORT
            } else {
                port + 1
            };
            if !self.mappings.contains_key(&port) {
                return port;
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let timeout = self.timeout;
        self.mappings.retain(|_, m| {
            m.allowed.retain(|_, t| now.duration_since(*t) < timeout);
            now.duration_since(m.last_out) < timeout
        });
    }
}
