//! The packet path: two loops, TUN→UDP (encrypt) and UDP→TUN (decrypt), plus the WireGuard
//! timer tick. Buffers are allocated once per loop; peers are found in a lock-free snapshot and
//! only the one peer's tunnel is locked, never across an `.await`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use a2a_proto::udp::{classify, A2aDatagram, DatagramKind};
use a2a_proto::NodeKey;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tun_rs::AsyncDevice;

use crate::peers::{Peer, PeerTable};

/// Largest datagram or packet handled (no offload yet: one MTU-sized packet at a time).
const BUF_LEN: usize = 65536;
/// How often WireGuard timers are driven.
const TIMER_TICK: Duration = Duration::from_millis(250);

/// Counts of dropped input and notable events, shown by `a2actl status`.
#[derive(Default)]
pub struct Counters {
    pub udp_garbage: AtomicU64,
    pub udp_unknown_peer: AtomicU64,
    pub udp_a2a_malformed: AtomicU64,
    pub wg_rejected: AtomicU64,
    pub wg_cookies_sent: AtomicU64,
    pub inner_source_mismatch: AtomicU64,
    pub tun_no_route: AtomicU64,
    pub tun_not_ipv4: AtomicU64,
    pub no_endpoint: AtomicU64,
    pub send_errors: AtomicU64,
    pub records_dropped: AtomicU64,
}

impl Counters {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("udp_garbage", g(&self.udp_garbage)),
            ("udp_unknown_peer", g(&self.udp_unknown_peer)),
            ("udp_a2a_malformed", g(&self.udp_a2a_malformed)),
            ("wg_rejected", g(&self.wg_rejected)),
            ("wg_cookies_sent", g(&self.wg_cookies_sent)),
            ("inner_source_mismatch", g(&self.inner_source_mismatch)),
            ("tun_no_route", g(&self.tun_no_route)),
            ("tun_not_ipv4", g(&self.tun_not_ipv4)),
            ("no_endpoint", g(&self.no_endpoint)),
            ("send_errors", g(&self.send_errors)),
            ("records_dropped", g(&self.records_dropped)),
        ]
    }
}

/// What the caller must do with the output of one `Tunn` call; ranges index the output buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    SendToNetwork(Range<usize>),
    WriteToTunnel(Range<usize>, Ipv4Addr),
    /// An IPv6 packet: the overlay is IPv4-only for now.
    DropV6,
    Nothing,
    Rejected,
}

/// Turns a `TunnResult` (which borrows `out`) into an owned [`Action`].
fn action(out_start: *const u8, result: TunnResult<'_>) -> Action {
    let range = |p: &[u8]| {
        let start = p.as_ptr() as usize - out_start as usize;
        start..start + p.len()
    };
    match result {
        TunnResult::Done => Action::Nothing,
        TunnResult::Err(_) => Action::Rejected,
        TunnResult::WriteToNetwork(p) => Action::SendToNetwork(range(p)),
        TunnResult::WriteToTunnelV4(p, src) => Action::WriteToTunnel(range(p), src),
        TunnResult::WriteToTunnelV6(..) => Action::DropV6,
    }
}

/// Destination of an IPv4 packet read from the TUN device.
fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() >= 20 && packet[0] >> 4 == 4 {
        Some(Ipv4Addr::new(
            packet[16], packet[17], packet[18], packet[19],
        ))
    } else {
        None
    }
}

pub struct DataPlane {
    pub tun: Arc<AsyncDevice>,
    pub udp: Arc<UdpSocket>,
    pub peers: Arc<PeerTable>,
    pub counters: Arc<Counters>,
}

impl DataPlane {
    /// Sends a handshake initiation to a new peer now, so the first packet does not wait.
    pub async fn initiate(&self, peer: &Peer) {
        let mut out = [0u8; 256];
        let act = {
            let mut t = peer.tunn();
            let start = out.as_ptr();
            action(start, t.format_handshake_initiation(&mut out, false))
        };
        if let Action::SendToNetwork(r) = act {
            self.send_to_peer(peer, &out[r]).await;
        }
    }

    async fn send_to_peer(&self, peer: &Peer, datagram: &[u8]) {
        match peer.endpoint().addr {
            Some(addr) => {
                if self.udp.send_to(datagram, addr).await.is_err() {
                    Counters::bump(&self.counters.send_errors);
                }
            }
            None => Counters::bump(&self.counters.no_endpoint),
        }
    }

    /// TUN→UDP: read a packet, find the peer owning its destination, encrypt, send.
    pub async fn tun_to_udp(self: Arc<Self>) {
        let mut packet = vec![0u8; BUF_LEN];
        let mut out = vec![0u8; BUF_LEN + 64];
        loop {
            let n = match self.tun.recv(&mut packet).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("reading the TUN device failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(dst) = ipv4_destination(&packet[..n]) else {
                Counters::bump(&self.counters.tun_not_ipv4);
                continue;
            };
            let Some(peer) = self.peers.by_ip(dst) else {
                Counters::bump(&self.counters.tun_no_route);
                continue;
            };
            let act = {
                let mut t = peer.tunn();
                let start = out.as_ptr();
                action(start, t.encapsulate(&packet[..n], &mut out))
            };
            if let Action::SendToNetwork(r) = act {
                self.send_to_peer(&peer, &out[r]).await;
            }
        }
    }

    /// Finds the peer a WireGuard datagram belongs to, or answers it with a cookie under load.
    fn route_wireguard(&self, datagram: &[u8], src: SocketAddr, cookie: &mut [u8]) -> Routed {
        let packet = match self
            .peers
            .rate_limiter()
            .verify_packet(Some(src.ip()), datagram, cookie)
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(c)) => return Routed::Cookie(c.len()),
            Err(_) => return Routed::Rejected,
        };
        let peer = match packet {
            Packet::HandshakeInit(init) => {
                parse_handshake_anon(self.peers.own_secret(), &self.peers.own_public(), &init)
                    .ok()
                    .and_then(|h| self.peers.by_key(&NodeKey(h.peer_static_public)))
            }
            Packet::HandshakeResponse(r) => self.peers.by_receiver_index(r.receiver_idx),
            Packet::PacketCookieReply(c) => self.peers.by_receiver_index(c.receiver_idx),
            Packet::PacketData(d) => self.peers.by_receiver_index(d.receiver_idx),
        };
        match peer {
            Some(p) => Routed::Peer(p),
            None => Routed::UnknownPeer,
        }
    }

    /// UDP→TUN: receive a datagram, demultiplex, decrypt, check the inner source, write.
    pub async fn udp_to_tun(self: Arc<Self>, a2a: mpsc::Sender<(A2aDatagram, SocketAddr)>) {
        let mut datagram = vec![0u8; BUF_LEN];
        let mut out = vec![0u8; BUF_LEN];
        let mut cookie = [0u8; 64];
        loop {
            let (n, src) = match self.udp.recv_from(&mut datagram).await {
                Ok(x) => x,
                Err(_) => continue, // ICMP errors from earlier sends surface here
            };
            let src = canonical(src);
            match classify(&datagram[..n]) {
                DatagramKind::Unknown => Counters::bump(&self.counters.udp_garbage),
                DatagramKind::A2a => match A2aDatagram::decode(&datagram[..n]) {
                    Some(msg) => {
                        let _ = a2a.try_send((msg, src));
                    }
                    None => Counters::bump(&self.counters.udp_a2a_malformed),
                },
                DatagramKind::WireGuard => {
                    let peer = match self.route_wireguard(&datagram[..n], src, &mut cookie) {
                        Routed::Peer(p) => p,
                        Routed::Cookie(len) => {
                            Counters::bump(&self.counters.wg_cookies_sent);
                            let _ = self.udp.send_to(&cookie[..len], src).await;
                            continue;
                        }
                        Routed::Rejected => {
                            Counters::bump(&self.counters.wg_rejected);
                            continue;
                        }
                        Routed::UnknownPeer => {
                            Counters::bump(&self.counters.udp_unknown_peer);
                            continue;
                        }
                    };
                    self.decapsulate(&peer, &datagram[..n], src, &mut out).await;
                }
            }
        }
    }

    async fn decapsulate(&self, peer: &Peer, datagram: &[u8], src: SocketAddr, out: &mut [u8]) {
        let act = {
            let mut t = peer.tunn();
            let start = out.as_ptr();
            action(start, t.decapsulate(Some(src.ip()), datagram, out))
        };
        match act {
            Action::Rejected => {
                Counters::bump(&self.counters.wg_rejected);
                return;
            }
            Action::WriteToTunnel(r, inner_src) => {
                if inner_src != peer.ip() {
                    // A member may only send from its own overlay address.
                    Counters::bump(&self.counters.inner_source_mismatch);
                    return;
                }
                peer.confirm_endpoint(src);
                if let Err(e) = self.tun.send(&out[r]).await {
                    tracing::debug!("writing to the TUN device failed: {e}");
                    Counters::bump(&self.counters.send_errors);
                }
                return;
            }
            Action::DropV6 => {
                Counters::bump(&self.counters.tun_not_ipv4);
                return;
            }
            Action::Nothing => {
                peer.confirm_endpoint(src);
                return;
            }
            Action::SendToNetwork(r) => {
                peer.confirm_endpoint(src);
                if self.udp.send_to(&out[r], src).await.is_err() {
                    Counters::bump(&self.counters.send_errors);
                }
            }
        }
        // A completed handshake may release queued packets: flush until Done.
        loop {
            let act = {
                let mut t = peer.tunn();
                let start = out.as_ptr();
                action(start, t.decapsulate(None, &[], out))
            };
            match act {
                Action::SendToNetwork(r) => {
                    if self.udp.send_to(&out[r], src).await.is_err() {
                        Counters::bump(&self.counters.send_errors);
                    }
                }
                _ => break,
            }
        }
    }

    /// Drives WireGuard's timers (rekey, keepalive, handshake retries) for every peer.
    pub async fn timers(self: Arc<Self>) {
        let mut out = vec![0u8; BUF_LEN];
        let mut tick = tokio::time::interval(TIMER_TICK);
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            ticks += 1;
            if ticks.is_multiple_of(4) {
                self.peers.rate_limiter().reset_count();
            }
            for peer in self.peers.all() {
                let act = {
                    let mut t: std::sync::MutexGuard<'_, Tunn> = peer.tunn();
                    let start = out.as_ptr();
                    action(start, t.update_timers(&mut out))
                };
                if let Action::SendToNetwork(r) = act {
                    self.send_to_peer(&peer, &out[r]).await;
                }
            }
        }
    }
}

enum Routed {
    Peer(Arc<Peer>),
    Cookie(usize),
    Rejected,
    UnknownPeer,
}

/// An IPv4-mapped IPv6 address as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ipv4_destinations_only() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[100, 64, 0, 9]);
        assert_eq!(ipv4_destination(&p), Some(Ipv4Addr::new(100, 64, 0, 9)));
        assert_eq!(ipv4_destination(&p[..19]), None);
        p[0] = 0x60;
        assert_eq!(ipv4_destination(&p), None);
    }

    /// A minimal IPv4/UDP packet from `src` to `dst` carrying `payload`.
    fn ipv4_udp(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        p
    }

    #[test]
    fn actions_carry_a_packet_through_a_real_handshake() {
        use boringtun::x25519::{PublicKey, StaticSecret};
        let a_key = StaticSecret::from([1u8; 32]);
        let b_key = StaticSecret::from([2u8; 32]);
        let mut a = Tunn::new(a_key.clone(), PublicKey::from(&b_key), None, None, 1, None);
        let mut b = Tunn::new(b_key, PublicKey::from(&a_key), None, None, 2, None);
        let packet = ipv4_udp([100, 64, 0, 1], [100, 64, 0, 2], b"hello over the overlay");
        let mut out_a = vec![0u8; 2048];
        let mut out_b = vec![0u8; 2048];

        // No session yet: the packet is queued and a handshake initiation goes out.
        let Action::SendToNetwork(r) = action(out_a.as_ptr(), a.encapsulate(&packet, &mut out_a))
        else {
            panic!("expected a handshake initiation");
        };
        let init = out_a[r].to_vec();
        assert_eq!(classify(&init), DatagramKind::WireGuard);
        let Action::SendToNetwork(r) =
            action(out_b.as_ptr(), b.decapsulate(None, &init, &mut out_b))
        else {
            panic!("expected a handshake response");
        };
        let response = out_b[r].to_vec();
        // The response completes the handshake; the queued packet is released by the flush.
        let first = action(out_a.as_ptr(), a.decapsulate(None, &response, &mut out_a));
        let mut sent = Vec::new();
        if let Action::SendToNetwork(r) = first {
            sent.push(out_a[r].to_vec());
        }
        while let Action::SendToNetwork(r) =
            action(out_a.as_ptr(), a.decapsulate(None, &[], &mut out_a))
        {
            sent.push(out_a[r].to_vec());
        }
        let mut delivered = None;
        for d in sent {
            if let Action::WriteToTunnel(r, src) =
                action(out_b.as_ptr(), b.decapsulate(None, &d, &mut out_b))
            {
                assert_eq!(src, Ipv4Addr::new(100, 64, 0, 1));
                delivered = Some(out_b[r].to_vec());
            }
        }
        assert_eq!(delivered.as_deref(), Some(&packet[..]));

        // Tampered ciphertext is rejected, not delivered.
        let Action::SendToNetwork(r) = action(out_a.as_ptr(), a.encapsulate(&packet, &mut out_a))
        else {
            panic!("expected a data packet");
        };
        let mut data = out_a[r].to_vec();
        let last = data.len() - 1;
        data[last] ^= 1;
        assert_eq!(
            action(out_b.as_ptr(), b.decapsulate(None, &data, &mut out_b)),
            Action::Rejected
        );
    }
}
