//! The packet path, split by direction as wireguard-go's send.go/receive.go/timers.go:
//! [`transmit`] (TUN→UDP, encrypt), [`receive`] (UDP→TUN, decrypt) and [`timers`] (WireGuard's
//! timer tick). Buffers are allocated once per loop; peers are found in a lock-free snapshot
//! and only the one peer's tunnel is locked, never across an `.await`.
//!
//! A peer's packets go where its path state says: to its direct address, or through the
//! coordinator's relay (over UDP when the relay bind works, else over the control connection).
//! Whatever arrives is answered the way it came. Generic over the [`Platform`]'s I/O (static
//! dispatch: the real sockets pay no indirection).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use a2a_proto::udp::{write_relay_header, RELAY_HEADER_LEN};
use arc_swap::ArcSwapOption;
use tokio::sync::mpsc;

use crate::core::counters::Counters;
use crate::core::path::Route;
use crate::core::peers::{Peer, PeerTable, Via};
use crate::core::policy::Tracker;
use crate::core::wg::{action, Action};
use crate::io::{Platform, UdpTransport};
use crate::tasks::events::{ControlOut, PathEvent, RelayLink};
use crate::tasks::prober::Prober;

pub mod receive;
pub mod timers;
pub mod transmit;

pub use receive::TunBatch;

/// Largest datagram or packet handled.
const BUF_LEN: usize = 65536;
/// One packet read from the TUN device (at most the MTU; segments of a GSO read are MTU-sized).
const TUN_PACKET_LEN: usize = 4096;

pub struct DataPlane<P: Platform> {
    pub udp: P::Udp,
    pub tun: P::Tun,
    pub peers: Arc<PeerTable>,
    pub counters: Arc<Counters>,
    /// Set while registered with the coordinator.
    pub relay: ArcSwapOption<RelayLink>,
    /// The coordinator's address while connected to it: relay data is accepted from there
    /// from the start, before the relay bind completes and [`relay`](Self::relay) is set (the
    /// peers of a node that just registered relay their handshakes to it at once).
    pub coordinator: ArcSwapOption<std::net::SocketAddr>,
    pub prober: Prober,
    pub path_events: mpsc::Sender<PathEvent>,
    /// The TTL of upgrade rounds' probes (`core::path::round_ttl`; 0: the full TTL), set by
    /// the control task from what each connection learns.
    pub round_ttl: AtomicU8,
    /// This node's own addresses (local and reflexive), which no probe goes to.
    pub own_addrs: arc_swap::ArcSwap<Vec<std::net::SocketAddr>>,
    /// Who may reach whom: the policy's rules and the connection tracker, locked once per
    /// batch by each direction (set by the policy task, `tasks/policy.rs`).
    pub policy: Mutex<Tracker>,
}

impl<P: Platform> DataPlane<P> {
    pub fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Encrypts one IP packet (`buf[RELAY_HEADER_LEN..][..len]`, with room after it for
    /// WireGuard's overhead) for `peer` and sends it along the peer's route.
    pub async fn send_packet(&self, peer: &Peer, buf: &mut [u8], len: usize) {
        let packet = buf[RELAY_HEADER_LEN..][..len].to_vec();
        let act = {
            let mut t = peer.tunn();
            let start = buf[RELAY_HEADER_LEN..].as_ptr();
            action(start, t.encapsulate(&packet, &mut buf[RELAY_HEADER_LEN..]))
        };
        if let Action::SendToNetwork(r) = act {
            let (start, n) = (r.start, r.len());
            if start != 0 {
                buf.copy_within(
                    RELAY_HEADER_LEN + start..RELAY_HEADER_LEN + start + n,
                    RELAY_HEADER_LEN,
                );
            }
            self.send_to_peer(peer, buf, n).await;
        }
    }

    /// Sends a handshake initiation to a new peer now, so the first packet does not wait.
    pub async fn initiate(&self, peer: &Peer) {
        self.send_initiation(peer, false).await
    }

    /// Sends a handshake initiation now; `again`: even while one is under way (a cookie reply
    /// answered it: the new one carries the cookie).
    pub async fn send_initiation(&self, peer: &Peer, again: bool) {
        let mut out = [0u8; 256];
        let act = {
            let mut t = peer.tunn();
            let start = out[RELAY_HEADER_LEN..].as_ptr();
            action(
                start,
                t.format_handshake_initiation(&mut out[RELAY_HEADER_LEN..], again),
            )
        };
        if let Action::SendToNetwork(r) = act {
            self.send_to_peer(peer, &mut out, r.len()).await;
        }
    }

    /// Sends `buf[RELAY_HEADER_LEN..RELAY_HEADER_LEN + len]` to the peer along its route; the
    /// first bytes of `buf` are room for a relay header.
    pub async fn send_to_peer(&self, peer: &Peer, buf: &mut [u8], len: usize) {
        let route = peer.route();
        match route.route {
            Route::Direct(addr) => self.send_udp(&buf[RELAY_HEADER_LEN..][..len], addr).await,
            Route::Relay => {
                let id = peer.relay_id();
                if id != 0 && self.send_relayed(id, buf, len).await {
                    return;
                }
                // Connected but the relay not bound yet (registering): wait for it. A full-TTL
                // datagram to the peer's address now could reach an unfirewalled NAT before
                // its node opened it (see `core::path`); the fallback is for when there is no
                // coordinator at all.
                if self.coordinator.load().is_some() {
                    Counters::bump(&self.counters.no_endpoint);
                    return;
                }
                match route.fallback {
                    Some(addr) => self.send_udp(&buf[RELAY_HEADER_LEN..][..len], addr).await,
                    None => Counters::bump(&self.counters.no_endpoint),
                }
            }
        }
    }

    /// Sends through the relay to relay id `id`; false if there is no relay right now.
    async fn send_relayed(&self, id: u32, buf: &mut [u8], len: usize) -> bool {
        let guard = self.relay.load();
        let Some(link) = guard.as_ref() else {
            return false;
        };
        if link.udp_ok.load(Ordering::Relaxed) {
            write_relay_header(buf, id);
            self.send_udp(&buf[..RELAY_HEADER_LEN + len], link.coordinator)
                .await;
        } else {
            let payload = buf[RELAY_HEADER_LEN..][..len].to_vec();
            if link
                .control
                .try_send(ControlOut::Relay(id, payload))
                .is_err()
            {
                Counters::bump(&self.counters.relay_queue_full);
            }
        }
        true
    }

    /// The TTL of upgrade rounds' probes (`None`: the full TTL).
    pub fn round_ttl(&self) -> Option<u8> {
        Some(self.round_ttl.load(Ordering::Relaxed)).filter(|t| *t > 0)
    }

    /// Sends one datagram with the IP TTL `ttl`, counting a failure.
    pub async fn send_udp_ttl(&self, datagram: &[u8], addr: std::net::SocketAddr, ttl: u8) {
        if self.udp.send_ttl(datagram, addr, ttl).await.is_err() {
            Counters::bump(&self.counters.send_errors);
        }
    }

    /// Sends one datagram, counting a failure.
    pub async fn send_udp(&self, datagram: &[u8], addr: std::net::SocketAddr) {
        if self.udp.send(datagram, datagram.len(), addr).await.is_err() {
            Counters::bump(&self.counters.send_errors);
        }
    }

    /// Answers a datagram the way it came: `buf` as in [`send_to_peer`](Self::send_to_peer).
    pub async fn reply(&self, via: Via, buf: &mut [u8], len: usize) {
        match via {
            Via::Direct(addr) => self.send_udp(&buf[RELAY_HEADER_LEN..][..len], addr).await,
            Via::Relay(id) => {
                if !self.send_relayed(id, buf, len).await {
                    Counters::bump(&self.counters.no_endpoint);
                }
            }
        }
    }
}
