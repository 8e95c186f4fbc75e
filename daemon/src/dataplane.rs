//! The packet path: two loops, TUN→UDP (encrypt) and UDP→TUN (decrypt), plus the WireGuard
//! timer tick. Buffers are allocated once per loop; peers are found in a lock-free snapshot and
//! only the one peer's tunnel is locked, never across an `.await`.
//!
//! A peer's packets go where its path state says: to its direct address, or through the
//! coordinator's relay (over UDP when the relay bind works, else over the control connection).
//! Whatever arrives is answered the way it came.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use a2a_proto::addr::canonical;
use a2a_proto::udp::{
    classify, is_disco, parse_relay_data, write_relay_header, A2aDatagram, DatagramKind,
    RELAY_HEADER_LEN,
};
use a2a_proto::NodeKey;
use arc_swap::ArcSwapOption;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::path::Route;
use crate::pathfinder::PathEvent;
use crate::peers::{Peer, PeerTable, Routed, Source};
use crate::prober::Prober;
use crate::session::OVERLAY_MTU;
use crate::udpbatch;

/// Largest datagram or packet handled.
const BUF_LEN: usize = 65536;
/// Room in front of every packet written to the TUN device: the virtio-net header when offload
/// is on, or a relay header when a decapsulation answers through the relay.
const HEAD: usize = 16;
/// One packet read from the TUN device (at most the MTU; segments of a GSO read are MTU-sized).
const TUN_PACKET_LEN: usize = 4096;
/// Plaintext room for a decapsulation that is not data (handshake replies, keepalives).
const MIN_DECAP_OUT: usize = 256;
/// Datagram overhead of a WireGuard data packet, plus its padding to 16 bytes.
const WG_DATA_OVERHEAD: usize = 32 + 16;
/// How often WireGuard timers are driven.
const TIMER_TICK: Duration = Duration::from_millis(250);

/// Counts of dropped input and notable events, shown by `a2actl status`.
#[derive(Default)]
pub struct Counters {
    pub udp_garbage: AtomicU64,
    pub udp_unknown_peer: AtomicU64,
    pub udp_a2a_malformed: AtomicU64,
    pub wg_rejected: AtomicU64,
    /// Handshake initiations whose timestamp is not newer than the last one accepted from that
    /// peer: replays (boringtun refuses them), counted apart from `wg_rejected`.
    pub wg_handshake_replays: AtomicU64,
    pub wg_cookies_sent: AtomicU64,
    /// Cookie replies from peers accepted: our handshake met a peer under load, and the next
    /// one will carry the cookie's MAC2.
    pub wg_cookies_received: AtomicU64,
    /// Handshake messages with a valid cookie dropped while under load, their source being over
    /// its share (`HANDSHAKES_PER_SOURCE` a second).
    pub wg_handshake_rate_limited: AtomicU64,
    pub inner_source_mismatch: AtomicU64,
    pub tun_no_route: AtomicU64,
    pub tun_not_ipv4: AtomicU64,
    pub no_endpoint: AtomicU64,
    pub send_errors: AtomicU64,
    pub records_unsigned: AtomicU64,
    pub records_bad_signature: AtomicU64,
    pub records_foreign: AtomicU64,
    pub records_malformed: AtomicU64,
    pub records_stale: AtomicU64,
    pub records_revoked: AtomicU64,
    pub records_address_conflict: AtomicU64,
    pub membership_bad_signature: AtomicU64,
    pub invites_redeemed: AtomicU64,
    pub invites_denied: AtomicU64,
    pub relay_not_from_coordinator: AtomicU64,
    pub relay_queue_full: AtomicU64,
    pub disco_unknown_sender: AtomicU64,
    pub disco_bad: AtomicU64,
    pub disco_rate_limited: AtomicU64,
    pub disco_stale_pong: AtomicU64,
    pub path_upgrades: AtomicU64,
    pub path_fallbacks: AtomicU64,
    /// 1 while the matching fast path is in use (set at start-up; UDP GSO may turn off later).
    pub fast_tun_offload: AtomicU64,
    pub fast_udp_gso: AtomicU64,
    pub fast_udp_gro: AtomicU64,
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
            ("wg_handshake_replays", g(&self.wg_handshake_replays)),
            ("wg_cookies_sent", g(&self.wg_cookies_sent)),
            ("wg_cookies_received", g(&self.wg_cookies_received)),
            (
                "wg_handshake_rate_limited",
                g(&self.wg_handshake_rate_limited),
            ),
            ("inner_source_mismatch", g(&self.inner_source_mismatch)),
            ("tun_no_route", g(&self.tun_no_route)),
            ("tun_not_ipv4", g(&self.tun_not_ipv4)),
            ("no_endpoint", g(&self.no_endpoint)),
            ("send_errors", g(&self.send_errors)),
            ("records_unsigned", g(&self.records_unsigned)),
            ("records_bad_signature", g(&self.records_bad_signature)),
            ("records_foreign", g(&self.records_foreign)),
            ("records_malformed", g(&self.records_malformed)),
            ("records_stale", g(&self.records_stale)),
            ("records_revoked", g(&self.records_revoked)),
            (
                "records_address_conflict",
                g(&self.records_address_conflict),
            ),
            (
                "membership_bad_signature",
                g(&self.membership_bad_signature),
            ),
            ("invites_redeemed", g(&self.invites_redeemed)),
            ("invites_denied", g(&self.invites_denied)),
            (
                "relay_not_from_coordinator",
                g(&self.relay_not_from_coordinator),
            ),
            ("relay_queue_full", g(&self.relay_queue_full)),
            ("disco_unknown_sender", g(&self.disco_unknown_sender)),
            ("disco_bad", g(&self.disco_bad)),
            ("disco_rate_limited", g(&self.disco_rate_limited)),
            ("disco_stale_pong", g(&self.disco_stale_pong)),
            ("path_upgrades", g(&self.path_upgrades)),
            ("path_fallbacks", g(&self.path_fallbacks)),
            ("fast_tun_offload", g(&self.fast_tun_offload)),
            ("fast_udp_gso", g(&self.fast_udp_gso)),
            ("fast_udp_gro", g(&self.fast_udp_gro)),
        ]
    }
}

/// What the packet path hands to the control connection.
#[derive(Debug)]
pub enum ControlOut {
    /// Relay data for a relay id, over TCP (UDP to the relay does not work).
    Relay(u32, Vec<u8>),
    /// Ask the coordinator to make this peer probe us.
    Punch(NodeKey),
    /// A control message from a command (invite, kick, rotate).
    Msg(a2a_proto::control::ClientMsg),
    /// This node moved to a rotated network: end the connection and register anew.
    Moved,
}

/// The way to the coordinator's relay while registered.
pub struct RelayLink {
    /// The coordinator's UDP address (relay data and binds).
    pub coordinator: SocketAddr,
    /// True while UDP binds are answered: relay over UDP; else over the control connection.
    pub udp_ok: AtomicBool,
    pub control: mpsc::Sender<ControlOut>,
}

/// How a datagram reached us, and so how to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    Direct(SocketAddr),
    /// Through the relay, from the peer with this relay id.
    Relay(u32),
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
    /// A handshake initiation with a timestamp not after the last accepted one: a replay.
    ReplayedHandshake,
}

/// Turns a `TunnResult` (which borrows `out`) into an owned [`Action`].
fn action(out_start: *const u8, result: TunnResult<'_>) -> Action {
    let range = |p: &[u8]| {
        let start = p.as_ptr() as usize - out_start as usize;
        start..start + p.len()
    };
    match result {
        TunnResult::Done => Action::Nothing,
        TunnResult::Err(WireGuardError::WrongTai64nTimestamp) => Action::ReplayedHandshake,
        TunnResult::Err(_) => Action::Rejected,
        TunnResult::WriteToNetwork(p) => Action::SendToNetwork(range(p)),
        TunnResult::WriteToTunnelV4(p, src) => Action::WriteToTunnel(range(p), src),
        TunnResult::WriteToTunnelV6(..) => Action::DropV6,
    }
}

/// Length of a plaintext of `len` bytes padded as WireGuard pads it (whitepaper §5.4.6): to a
/// multiple of 16, but not beyond the MTU (nor shortened when it is longer).
fn padded_len(len: usize, mtu: usize) -> usize {
    if len >= mtu {
        len
    } else {
        len.next_multiple_of(16).min(mtu)
    }
}

/// Zero-pads the packet at the start of `buf` (`len` bytes) for encryption: boringtun does not
/// pad, and then the datagram's size tells the inner packet's exact length. The receiver trims
/// the padding by the IP header's total length (boringtun does), so this is invisible to peers.
fn pad_plaintext(buf: &mut [u8], len: usize) -> &[u8] {
    let padded = padded_len(len, usize::from(OVERLAY_MTU)).min(buf.len());
    buf[len..padded].fill(0);
    &buf[..padded]
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
    /// Set while registered with the coordinator.
    pub relay: ArcSwapOption<RelayLink>,
    pub prober: Prober,
    pub path_events: mpsc::Sender<PathEvent>,
}

impl DataPlane {
    /// Sends a handshake initiation to a new peer now, so the first packet does not wait.
    pub async fn initiate(&self, peer: &Peer) {
        let mut out = [0u8; 256];
        let act = {
            let mut t = peer.tunn();
            let start = out[RELAY_HEADER_LEN..].as_ptr();
            action(
                start,
                t.format_handshake_initiation(&mut out[RELAY_HEADER_LEN..], false),
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

    async fn send_udp(&self, datagram: &[u8], addr: SocketAddr) {
        if self.udp.send_to(datagram, addr).await.is_err() {
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

    /// TUN→UDP: read a packet (with offload, a GSO super-packet split into segments), find the
    /// peer owning each destination, encrypt, and send: datagrams for one direct address are
    /// gathered into one UDP GSO send; relayed ones go one by one.
    pub async fn tun_to_udp(self: Arc<Self>) {
        let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + BUF_LEN];
        let mut packets = vec![vec![0u8; TUN_PACKET_LEN]; IDEAL_BATCH_SIZE];
        let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
        let mut tx = TxBatch::new();
        let mut single = vec![0u8; RELAY_HEADER_LEN + TUN_PACKET_LEN + 64];
        loop {
            let n = match self
                .tun
                .recv_multiple(&mut original, &mut packets, &mut sizes, 0)
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("reading the TUN device failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // The peer of the previous packet and its route, reused while the destination repeats.
            let mut last: Option<(Ipv4Addr, Arc<Peer>, Route)> = None;
            for (packet, &size) in packets.iter_mut().zip(&sizes[..n]) {
                let packet = pad_plaintext(packet, size);
                let Some(dst) = ipv4_destination(packet) else {
                    Counters::bump(&self.counters.tun_not_ipv4);
                    continue;
                };
                if last.as_ref().is_none_or(|(ip, ..)| *ip != dst) {
                    let Some(peer) = self.peers.by_ip(dst) else {
                        Counters::bump(&self.counters.tun_no_route);
                        continue;
                    };
                    let route = peer.route().route;
                    last = Some((dst, peer, route));
                }
                let Some((_, peer, route)) = last.as_ref() else {
                    continue;
                };
                match *route {
                    Route::Direct(addr) => self.encrypt_batched(peer, packet, addr, &mut tx).await,
                    Route::Relay => {
                        self.flush_tx(&mut tx).await;
                        let act = {
                            let mut t = peer.tunn();
                            let start = single[RELAY_HEADER_LEN..].as_ptr();
                            action(
                                start,
                                t.encapsulate(packet, &mut single[RELAY_HEADER_LEN..]),
                            )
                        };
                        if let Action::SendToNetwork(r) = act {
                            self.send_to_peer(peer, &mut single, r.len()).await;
                        }
                    }
                }
            }
            self.flush_tx(&mut tx).await;
        }
    }

    /// Encrypts `packet` for `peer` into the send batch for `addr`, sending what the batch held
    /// first when the new datagram cannot join it.
    async fn encrypt_batched(
        &self,
        peer: &Peer,
        packet: &[u8],
        addr: SocketAddr,
        tx: &mut TxBatch,
    ) {
        if tx.count > 0
            && (tx.addr != addr
                || tx.closed
                || tx.count >= udpbatch::MAX_SEGMENTS
                || tx.len + packet.len() + WG_DATA_OVERHEAD > udpbatch::MAX_GSO_BYTES)
        {
            self.flush_tx(tx).await;
        }
        let pos = tx.len;
        let act = {
            let mut t = peer.tunn();
            let start = tx.buf[pos..].as_ptr();
            action(start, t.encapsulate(packet, &mut tx.buf[pos..]))
        };
        let Action::SendToNetwork(r) = act else {
            return;
        };
        let len = r.len();
        if r.start != 0 {
            tx.buf.copy_within(pos + r.start..pos + r.end, pos);
        }
        if tx.count == 0 {
            tx.addr = addr;
            tx.segment = len;
        } else if len > tx.segment {
            // Longer than the segments before it: those go now, this one starts a new batch.
            tx.len = pos;
            self.flush_tx(tx).await;
            tx.buf.copy_within(pos..pos + len, 0);
            tx.addr = addr;
            tx.segment = len;
            tx.len = len;
            tx.count = 1;
            return;
        } else if len < tx.segment {
            // A shorter datagram can only be the last of a GSO send.
            tx.closed = true;
        }
        tx.len = pos + len;
        tx.count += 1;
    }

    /// Sends the batch: one UDP GSO call when possible, else one datagram per call.
    async fn flush_tx(&self, tx: &mut TxBatch) {
        let count = tx.count;
        let (len, segment, addr) = (tx.len, tx.segment, tx.addr);
        tx.reset();
        if count == 0 {
            return;
        }
        let data = &tx.buf[..len];
        if count > 1 && self.counters.fast_udp_gso.load(Ordering::Relaxed) == 1 {
            let fd = self.udp.as_raw_fd();
            let sent = self
                .udp
                .async_io(Interest::WRITABLE, || {
                    udpbatch::send_segments(fd, data, segment as u16, addr)
                })
                .await;
            match sent {
                Ok(_) => return,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) => {
                    // The kernel or the outgoing device cannot segment: stop trying.
                    tracing::warn!("UDP GSO send failed ({e}); sending one datagram per call");
                    self.counters.fast_udp_gso.store(0, Ordering::Relaxed);
                }
                // Any other failure (EMSGSIZE when the route's MTU is below the segment size,
                // which GSO cannot fragment; a firewall's EPERM): send the datagrams one by
                // one, so each fares as it would have without GSO (fragmented, or counted).
                Err(_) => {}
            }
        }
        for d in data.chunks(segment) {
            self.send_udp(d, addr).await;
        }
    }

    /// UDP→TUN: receive datagrams (with UDP GRO, several per call), demultiplex, decrypt, check
    /// the inner source, and write the packets to the TUN device in batches (with offload,
    /// coalesced into TCP/UDP super-packets) once the socket has nothing more queued.
    pub async fn udp_to_tun(self: Arc<Self>) {
        let mut datagram = vec![0u8; BUF_LEN];
        let mut rx = TunBatch::new(IDEAL_BATCH_SIZE);
        let fd = self.udp.as_raw_fd();
        loop {
            let got = self.udp.try_io(Interest::READABLE, || {
                udpbatch::recv_segments(fd, &mut datagram)
            });
            let (n, src, segment) = match got {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.flush_rx(&mut rx).await;
                    let _ = self.udp.readable().await;
                    continue;
                }
                Err(_) => continue, // ICMP errors from earlier sends surface here
            };
            let src = canonical(src);
            for d in datagram[..n].chunks(segment) {
                self.receive(d, Via::Direct(src), src.ip(), &mut rx).await;
                if rx.is_full() {
                    self.flush_rx(&mut rx).await;
                }
            }
        }
    }

    /// Writes the decrypted packets gathered in `rx` to the TUN device.
    pub async fn flush_rx(&self, rx: &mut TunBatch) {
        if rx.n == 0 {
            return;
        }
        let n = rx.n;
        rx.n = 0;
        if let Err(e) = self
            .tun
            .send_multiple(&mut rx.gro, &mut rx.bufs[..n], HEAD)
            .await
        {
            tracing::debug!("writing to the TUN device failed: {e}");
            Counters::bump(&self.counters.send_errors);
        }
    }

    /// Handles one datagram that came `via` (`src_ip`: the underlay source, for WireGuard's
    /// rate limiter).
    async fn receive(&self, d: &[u8], via: Via, src_ip: IpAddr, out: &mut TunBatch) {
        match classify(d) {
            DatagramKind::Unknown => Counters::bump(&self.counters.udp_garbage),
            DatagramKind::WireGuard => self.receive_wireguard(d, via, src_ip, out).await,
            DatagramKind::A2a if is_disco(d) => {
                if self
                    .path_events
                    .try_send(PathEvent::Disco(d.to_vec(), via))
                    .is_err()
                {
                    Counters::bump(&self.counters.disco_rate_limited);
                }
            }
            DatagramKind::A2a => {
                let Via::Direct(from) = via else {
                    Counters::bump(&self.counters.udp_a2a_malformed);
                    return;
                };
                if let Some((id, payload)) = parse_relay_data(d) {
                    let from_relay = self
                        .relay
                        .load()
                        .as_ref()
                        .is_some_and(|l| l.coordinator == from);
                    if !from_relay {
                        Counters::bump(&self.counters.relay_not_from_coordinator);
                        return;
                    }
                    Box::pin(self.receive(payload, Via::Relay(id), from.ip(), out)).await;
                    return;
                }
                match A2aDatagram::decode(d) {
                    Some(A2aDatagram::EndpointReply { nonce, observed }) => {
                        self.prober.answered(nonce, from, observed)
                    }
                    _ => Counters::bump(&self.counters.udp_a2a_malformed),
                }
            }
        }
    }

    /// Relay data that came over the control connection (written to the TUN device at once).
    pub async fn receive_relayed_tcp(&self, src_id: u32, payload: &[u8], out: &mut TunBatch) {
        let ip = self
            .relay
            .load()
            .as_ref()
            .map(|l| l.coordinator.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        if classify(payload) == DatagramKind::WireGuard || is_disco(payload) {
            self.receive(payload, Via::Relay(src_id), ip, out).await;
            self.flush_rx(out).await;
        } else {
            Counters::bump(&self.counters.udp_garbage);
        }
    }

    async fn receive_wireguard(&self, d: &[u8], via: Via, src_ip: IpAddr, out: &mut TunBatch) {
        let mut cookie = [0u8; RELAY_HEADER_LEN + 64];
        let source = match via {
            Via::Direct(addr) => Source::Addr(addr.ip()),
            Via::Relay(id) => Source::Relay(id),
        };
        let peer =
            match self
                .peers
                .route_wireguard(d, src_ip, source, &mut cookie[RELAY_HEADER_LEN..])
            {
                Routed::Peer(p) => p,
                Routed::Cookie(len) => {
                    Counters::bump(&self.counters.wg_cookies_sent);
                    self.reply(via, &mut cookie, len).await;
                    return;
                }
                Routed::RateLimited => {
                    Counters::bump(&self.counters.wg_handshake_rate_limited);
                    return;
                }
                Routed::Rejected => {
                    Counters::bump(&self.counters.wg_rejected);
                    return;
                }
                Routed::UnknownPeer => {
                    Counters::bump(&self.counters.udp_unknown_peer);
                    return;
                }
            };
        self.decapsulate(&peer, d, via, src_ip, out).await;
    }

    /// Notes that `peer` reached us directly from `from`.
    fn seen_direct(&self, peer: &Peer, from: SocketAddr) {
        let now_ms = self.peers.now_ms();
        if !peer.heard_direct(from, now_ms) && peer.report_seen_elsewhere(now_ms) {
            let _ = self.path_events.try_send(PathEvent::SeenAt(peer.key, from));
        }
    }

    /// Decrypts into the next free buffer of `rx` (kept there for the next flush when it is a
    /// packet for the TUN device).
    async fn decapsulate(
        &self,
        peer: &Peer,
        d: &[u8],
        via: Via,
        src_ip: IpAddr,
        rx: &mut TunBatch,
    ) {
        if rx.is_full() {
            self.flush_rx(rx).await;
        }
        let slot = rx.n;
        let buf = rx.slot(HEAD + d.len().max(MIN_DECAP_OUT));
        let act = {
            let mut t = peer.tunn();
            let start = buf[HEAD..].as_ptr();
            action(start, t.decapsulate(Some(src_ip), d, &mut buf[HEAD..]))
        };
        let direct = match via {
            Via::Direct(a) => Some(a),
            Via::Relay(_) => None,
        };
        match act {
            Action::Rejected => {
                Counters::bump(&self.counters.wg_rejected);
                return;
            }
            Action::ReplayedHandshake => {
                Counters::bump(&self.counters.wg_handshake_replays);
                return;
            }
            Action::WriteToTunnel(r, inner_src) => {
                if inner_src != peer.ip() {
                    // A member may only send from its own overlay address.
                    Counters::bump(&self.counters.inner_source_mismatch);
                    return;
                }
                if let Some(a) = direct {
                    self.seen_direct(peer, a);
                }
                if r.start != 0 {
                    buf.copy_within(HEAD + r.start..HEAD + r.end, HEAD);
                }
                buf.truncate(HEAD + r.len());
                rx.n = slot + 1;
                return;
            }
            Action::DropV6 => {
                Counters::bump(&self.counters.tun_not_ipv4);
                return;
            }
            Action::Nothing => {
                if is_cookie_reply(d) {
                    // Not data: it tells nothing about the peer's path.
                    Counters::bump(&self.counters.wg_cookies_received);
                } else if let Some(a) = direct {
                    self.seen_direct(peer, a);
                }
                return;
            }
            Action::SendToNetwork(r) => {
                let len = r.len();
                if r.start != 0 {
                    buf.copy_within(HEAD + r.start..HEAD + r.end, HEAD);
                }
                self.reply(via, &mut buf[HEAD - RELAY_HEADER_LEN..], len)
                    .await;
            }
        }
        // A completed handshake may release queued packets: flush until Done (rare: the buffer
        // is grown to the largest packet once here).
        let buf = rx.slot(HEAD + BUF_LEN);
        loop {
            let act = {
                let mut t = peer.tunn();
                let start = buf[HEAD..].as_ptr();
                action(start, t.decapsulate(None, &[], &mut buf[HEAD..]))
            };
            match act {
                Action::SendToNetwork(r) => {
                    let len = r.len();
                    if r.start != 0 {
                        buf.copy_within(HEAD + r.start..HEAD + r.end, HEAD);
                    }
                    self.send_to_peer(peer, &mut buf[HEAD - RELAY_HEADER_LEN..], len)
                        .await
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
                self.peers.reset_handshake_limits();
            }
            for peer in self.peers.all() {
                let act = {
                    let mut t: std::sync::MutexGuard<'_, Tunn> = peer.tunn();
                    let start = out[RELAY_HEADER_LEN..].as_ptr();
                    action(start, t.update_timers(&mut out[RELAY_HEADER_LEN..]))
                };
                if let Action::SendToNetwork(r) = act {
                    self.send_to_peer(&peer, &mut out, r.len()).await;
                }
            }
        }
    }
}

/// Encrypted datagrams for one address, back to back in `buf`: `count` of them, each `segment`
/// bytes except perhaps the last (then `closed`: nothing more may join).
struct TxBatch {
    buf: Vec<u8>,
    len: usize,
    count: usize,
    segment: usize,
    closed: bool,
    addr: SocketAddr,
}

impl TxBatch {
    fn new() -> Self {
        TxBatch {
            buf: vec![0u8; udpbatch::MAX_GSO_BYTES + TUN_PACKET_LEN + WG_DATA_OVERHEAD],
            len: 0,
            count: 0,
            segment: 0,
            closed: false,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }

    fn reset(&mut self) {
        self.len = 0;
        self.count = 0;
        self.segment = 0;
        self.closed = false;
    }
}

/// Decrypted packets waiting to be written to the TUN device: `bufs[..n]`, each packet at
/// `HEAD` (the room before it holds the virtio-net header with offload). Buffers are allocated
/// once with room for a coalesced super-packet, and reused.
pub struct TunBatch {
    bufs: Vec<Vec<u8>>,
    n: usize,
    gro: GROTable,
}

impl TunBatch {
    pub fn new(capacity: usize) -> Self {
        let bufs = (0..capacity.max(1))
            .map(|_| {
                let mut b = Vec::with_capacity(HEAD + BUF_LEN);
                b.resize(HEAD + TUN_PACKET_LEN, 0);
                b
            })
            .collect();
        TunBatch {
            bufs,
            n: 0,
            gro: GROTable::default(),
        }
    }

    fn is_full(&self) -> bool {
        self.n == self.bufs.len()
    }

    /// The next free buffer, at least `len` bytes long (it grows within its capacity).
    fn slot(&mut self, len: usize) -> &mut Vec<u8> {
        let b = &mut self.bufs[self.n];
        if b.len() < len {
            b.resize(len, 0);
        }
        b
    }
}

/// Whether a WireGuard datagram is a cookie reply (type 3).
fn is_cookie_reply(d: &[u8]) -> bool {
    d.first() == Some(&3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    use boringtun::x25519::{PublicKey, StaticSecret};

    /// Two tunnels with a session between them (`a` initiated).
    fn handshaken_pair() -> (Tunn, Tunn) {
        let a_key = StaticSecret::from([1u8; 32]);
        let b_key = StaticSecret::from([2u8; 32]);
        let mut a = Tunn::new(a_key.clone(), PublicKey::from(&b_key), None, None, 1, None);
        let mut b = Tunn::new(b_key, PublicKey::from(&a_key), None, None, 2, None);
        let (mut out_a, mut out_b) = (vec![0u8; 2048], vec![0u8; 2048]);
        let Action::SendToNetwork(r) = action(
            out_a.as_ptr(),
            a.format_handshake_initiation(&mut out_a, false),
        ) else {
            panic!("no initiation");
        };
        let init = out_a[r].to_vec();
        let Action::SendToNetwork(r) =
            action(out_b.as_ptr(), b.decapsulate(None, &init, &mut out_b))
        else {
            panic!("no response");
        };
        let response = out_b[r].to_vec();
        let Action::SendToNetwork(r) =
            action(out_a.as_ptr(), a.decapsulate(None, &response, &mut out_a))
        else {
            panic!("no keepalive");
        };
        let keepalive = out_a[r].to_vec();
        assert_eq!(
            action(out_b.as_ptr(), b.decapsulate(None, &keepalive, &mut out_b)),
            Action::Nothing
        );
        (a, b)
    }

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
    fn padding_rounds_up_to_16_within_the_mtu() {
        for (len, want) in [
            (0, 0),
            (1, 16),
            (16, 16),
            (17, 32),
            (84, 96),
            (1408, 1408),
            (1409, 1420),
            (1420, 1420),
            (1500, 1500),
        ] {
            assert_eq!(padded_len(len, 1420), want, "{len}");
        }
        // Stale bytes of an earlier, longer packet in the buffer become zeros.
        let mut buf = vec![0xffu8; 64];
        buf[..20].fill(7);
        let padded = pad_plaintext(&mut buf, 20);
        assert_eq!(padded.len(), 32);
        assert!(padded[..20].iter().all(|&b| b == 7));
        assert!(padded[20..].iter().all(|&b| b == 0));
    }

    #[test]
    fn padded_packets_arrive_trimmed_and_datagrams_hide_the_exact_length() {
        let (mut a, mut b) = handshaken_pair();
        let mut out_a = vec![0u8; 2048];
        let mut out_b = vec![0u8; 2048];
        let mut sizes = HashSet::new();
        for payload in 0..=64 {
            let packet = ipv4_udp([100, 64, 0, 1], [100, 64, 0, 2], &vec![0x5a; payload]);
            let mut buf = packet.clone();
            buf.resize(4096, 0xee);
            let padded = pad_plaintext(&mut buf, packet.len());
            let Action::SendToNetwork(r) =
                action(out_a.as_ptr(), a.encapsulate(padded, &mut out_a))
            else {
                panic!("expected a data packet");
            };
            let datagram = out_a[r].to_vec();
            assert_eq!((datagram.len() - 32) % 16, 0, "{payload}");
            sizes.insert(datagram.len());
            let Action::WriteToTunnel(r, _) =
                action(out_b.as_ptr(), b.decapsulate(None, &datagram, &mut out_b))
            else {
                panic!("expected the packet back");
            };
            assert_eq!(&out_b[r], &packet[..], "trimmed to the IP length");
        }
        // 65 different inner lengths, 5 different datagram lengths.
        assert_eq!(sizes.len(), 5, "{sizes:?}");
    }

    /// A WireGuard handshake initiation built by hand (whitepaper §5.4.2), so that the
    /// initiator's static key can be anything, even a point whose DH is all zeros: `ss` is the
    /// static-static DH as the responder computes it.
    fn forged_initiation(responder: &[u8; 32], static_public: &[u8; 32], ss: &[u8; 32]) -> Vec<u8> {
        use blake2::digest::consts::U16;
        use blake2::digest::{FixedOutput, KeyInit, Mac};
        use blake2::{Blake2s256, Blake2sMac, Digest};
        use boringtun::x25519::{PublicKey, StaticSecret};
        use chacha20poly1305::aead::{Aead, Payload};
        use chacha20poly1305::ChaCha20Poly1305;

        fn hash(parts: &[&[u8]]) -> [u8; 32] {
            let mut h = Blake2s256::new();
            for p in parts {
                Digest::update(&mut h, p);
            }
            h.finalize().into()
        }
        fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
            let mut m = <hmac::SimpleHmac<Blake2s256> as KeyInit>::new_from_slice(key).unwrap();
            for p in parts {
                Mac::update(&mut m, p);
            }
            m.finalize_fixed().into()
        }
        fn kdf2(ck: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32]) {
            let t = hmac(ck, &[input]);
            let ck = hmac(&t, &[&[1]]);
            let k = hmac(&t, &[&ck, &[2]]);
            (ck, k)
        }
        fn seal(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
            let c = <ChaCha20Poly1305 as chacha20poly1305::KeyInit>::new(key.into());
            let payload = Payload {
                msg: plaintext,
                aad,
            };
            c.encrypt(&[0u8; 12].into(), payload).unwrap()
        }

        let ck = hash(&[b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"]);
        let h = hash(&[&ck, b"WireGuard v1 zx2c4 Jason@zx2c4.com"]);
        let h = hash(&[&h, responder]);
        let e = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let e_pub = PublicKey::from(&e).to_bytes();
        let mut msg = vec![0u8; 148];
        msg[0] = 1;
        msg[4..8].copy_from_slice(&rand::random::<u32>().to_le_bytes());
        msg[8..40].copy_from_slice(&e_pub);
        let h = hash(&[&h, &e_pub]);
        let ck = hmac(&hmac(&ck, &[&e_pub]), &[&[1]]);
        let es = e.diffie_hellman(&PublicKey::from(*responder));
        let (ck, k) = kdf2(&ck, es.as_bytes());
        let enc_static = seal(&k, static_public, &h);
        msg[40..88].copy_from_slice(&enc_static);
        let h = hash(&[&h, &enc_static]);
        let (_, k) = kdf2(&ck, ss);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let mut tai64n = [0u8; 12];
        tai64n[..8].copy_from_slice(&(now.as_secs() + (1 << 62) + 37).to_be_bytes());
        tai64n[8..].copy_from_slice(&now.subsec_nanos().to_be_bytes());
        msg[88..116].copy_from_slice(&seal(&k, &tai64n, &h));
        let mac1_key = hash(&[b"mac1----", responder]);
        let mut mac = <Blake2sMac<U16> as KeyInit>::new_from_slice(&mac1_key).unwrap();
        Mac::update(&mut mac, &msg[..116]);
        let mac1: [u8; 16] = mac.finalize_fixed().into();
        msg[116..132].copy_from_slice(&mac1);
        msg
    }

    fn record(key: &StaticSecret, ip: [u8; 4]) -> a2a_proto::NodeRecord {
        a2a_proto::NodeRecord {
            network: a2a_proto::NetworkKey::derive(&[1; 32]).id(),
            node_key: NodeKey(PublicKey::from(key).to_bytes()),
            name: "peer".into(),
            ip: Ipv4Addr::from(ip),
            candidates: vec![],
            issued_ms: 1,
        }
    }

    const SRC: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    /// Routes `d` through the table and decapsulates it in the peer's tunnel, as
    /// `receive_wireguard` does.
    fn route_and_decapsulate(t: &PeerTable, d: &[u8], out: &mut [u8]) -> Action {
        let mut cookie = [0u8; 64];
        let peer = match t.route_wireguard(d, SRC, Source::Addr(SRC), &mut cookie) {
            Routed::Peer(p) => p,
            Routed::Cookie(_) => panic!("unexpected cookie"),
            Routed::RateLimited => panic!("unexpectedly rate limited"),
            Routed::Rejected => return Action::Rejected,
            Routed::UnknownPeer => panic!("unknown peer"),
        };
        let mut tunn = peer.tunn();
        action(out.as_ptr(), tunn.decapsulate(Some(SRC), d, out))
    }

    #[test]
    fn the_forged_initiation_is_valid_wireguard() {
        let r = StaticSecret::from([3u8; 32]);
        let i = StaticSecret::from([4u8; 32]);
        let r_pub = PublicKey::from(&r).to_bytes();
        let i_pub = PublicKey::from(&i).to_bytes();
        let ss = i.diffie_hellman(&PublicKey::from(r_pub)).to_bytes();
        let init = forged_initiation(&r_pub, &i_pub, &ss);
        let mut responder = Tunn::new(r.clone(), PublicKey::from(i_pub), None, None, 1, None);
        let mut out = vec![0u8; 2048];
        assert!(matches!(
            action(out.as_ptr(), responder.decapsulate(None, &init, &mut out)),
            Action::SendToNetwork(_)
        ));
        // And through the daemon's routing.
        let t = PeerTable::new(r);
        t.apply(record(&i, [100, 64, 0, 4]), None);
        let init = forged_initiation(&r_pub, &i_pub, &ss);
        assert!(matches!(
            route_and_decapsulate(&t, &init, &mut out),
            Action::SendToNetwork(_)
        ));
    }

    #[test]
    fn an_initiation_from_a_low_order_static_key_finds_no_peer() {
        let r = StaticSecret::from([3u8; 32]);
        let r_pub = PublicKey::from(&r).to_bytes();
        let t = PeerTable::new(r.clone());
        let mut out = vec![0u8; 2048];
        for low in a2a_proto::keys::LOW_ORDER_POINTS {
            // The premise: boringtun does not refuse the all-zero DH. A tunnel configured with
            // such a peer key completes a handshake with anybody, who needs no secret to forge
            // it (should boringtun ever refuse it, this assert fails: good news).
            let mut responder = Tunn::new(r.clone(), PublicKey::from(low), None, None, 1, None);
            let init = forged_initiation(&r_pub, &low, &[0u8; 32]);
            assert!(
                matches!(
                    action(out.as_ptr(), responder.decapsulate(None, &init, &mut out)),
                    Action::SendToNetwork(_)
                ),
                "boringtun accepted no forged initiation for {low:02x?}"
            );
            // So a2a never holds such a peer, and the same initiation finds nobody.
            let mut rec = record(&r, [100, 64, 0, 9]);
            rec.node_key = NodeKey(low);
            assert_eq!(t.apply(rec, None), crate::peers::Applied::LowOrderKey);
            let mut cookie = [0u8; 64];
            assert!(matches!(
                t.route_wireguard(&init, SRC, Source::Addr(SRC), &mut cookie),
                Routed::UnknownPeer
            ));
        }
    }

    #[test]
    fn a_replayed_initiation_is_counted_apart_and_changes_nothing() {
        let r = StaticSecret::from([3u8; 32]);
        let i = StaticSecret::from([4u8; 32]);
        let t = PeerTable::new(r.clone());
        t.apply(record(&i, [100, 64, 0, 4]), None);
        let mut initiator = Tunn::new(i, PublicKey::from(&r), None, None, 7, None);
        let (mut out_i, mut out_r) = (vec![0u8; 2048], vec![0u8; 2048]);
        let Action::SendToNetwork(x) = action(
            out_i.as_ptr(),
            initiator.format_handshake_initiation(&mut out_i, false),
        ) else {
            panic!("no initiation");
        };
        let init = out_i[x].to_vec();
        let Action::SendToNetwork(x) = route_and_decapsulate(&t, &init, &mut out_r) else {
            panic!("no response");
        };
        let response = out_r[x].to_vec();
        let Action::SendToNetwork(x) = action(
            out_i.as_ptr(),
            initiator.decapsulate(None, &response, &mut out_i),
        ) else {
            panic!("no keepalive");
        };
        let keepalive = out_i[x].to_vec();
        assert_eq!(
            route_and_decapsulate(&t, &keepalive, &mut out_r),
            Action::Nothing
        );
        let peer = t.by_ip(Ipv4Addr::new(100, 64, 0, 4)).unwrap();
        let to_i = ipv4_udp([100, 64, 0, 3], [100, 64, 0, 4], b"to the initiator");
        let receiver_index = |out: &mut [u8]| {
            let Action::SendToNetwork(x) =
                action(out.as_ptr(), peer.tunn().encapsulate(&to_i, out))
            else {
                panic!("no data packet");
            };
            out[x][4..8].to_vec()
        };
        let before = receiver_index(&mut out_r);

        // The replay: refused for its timestamp, and told apart from other rejects.
        assert_eq!(
            route_and_decapsulate(&t, &init, &mut out_r),
            Action::ReplayedHandshake
        );

        // The session is the one before, both ways.
        assert_eq!(receiver_index(&mut out_r), before, "a new session was made");
        let Action::SendToNetwork(x) =
            action(out_r.as_ptr(), peer.tunn().encapsulate(&to_i, &mut out_r))
        else {
            panic!("no data packet");
        };
        let d = out_r[x].to_vec();
        assert!(matches!(
            action(out_i.as_ptr(), initiator.decapsulate(None, &d, &mut out_i)),
            Action::WriteToTunnel(..)
        ));
        let to_r = ipv4_udp([100, 64, 0, 4], [100, 64, 0, 3], b"to the responder");
        let Action::SendToNetwork(x) =
            action(out_i.as_ptr(), initiator.encapsulate(&to_r, &mut out_i))
        else {
            panic!("no data packet");
        };
        let d = out_i[x].to_vec();
        assert!(matches!(
            route_and_decapsulate(&t, &d, &mut out_r),
            Action::WriteToTunnel(..)
        ));
    }

    #[test]
    fn under_load_a_peer_handshakes_with_a_cookie() {
        let r = StaticSecret::from([3u8; 32]);
        let i = StaticSecret::from([4u8; 32]);
        let r_pub = PublicKey::from(&r).to_bytes();
        let t = PeerTable::new(r.clone());
        t.apply(record(&i, [100, 64, 0, 4]), None);
        // Initiations with a valid MAC1 from keys nobody knows, until cookies are demanded.
        let mut cookie = [0u8; 64];
        let mut cookies = 0;
        for n in 0..150u8 {
            let init = forged_initiation(&r_pub, &[n; 32], &[n; 32]);
            let from = IpAddr::V4(Ipv4Addr::new(10, 9, 9, n));
            match t.route_wireguard(&init, from, Source::Addr(from), &mut cookie) {
                Routed::Cookie(len) => {
                    assert_eq!(len, 64);
                    cookies += 1;
                }
                Routed::UnknownPeer => {}
                _ => panic!("a forged initiation was routed to a peer"),
            }
        }
        assert!(cookies >= 40, "{cookies} cookie replies");
        // The real peer's initiation draws a cookie reply too; with it, the retry passes.
        let mut initiator = Tunn::new(i, PublicKey::from(&r), None, None, 7, None);
        let (mut out_i, mut out_r) = (vec![0u8; 2048], vec![0u8; 2048]);
        let Action::SendToNetwork(x) = action(
            out_i.as_ptr(),
            initiator.format_handshake_initiation(&mut out_i, false),
        ) else {
            panic!("no initiation");
        };
        let init = out_i[x].to_vec();
        let Routed::Cookie(len) = t.route_wireguard(&init, SRC, Source::Addr(SRC), &mut cookie)
        else {
            panic!("no cookie under load");
        };
        assert!(is_cookie_reply(&cookie[..len]));
        assert_eq!(
            action(
                out_i.as_ptr(),
                initiator.decapsulate(None, &cookie[..len], &mut out_i)
            ),
            Action::Nothing
        );
        let Action::SendToNetwork(x) = action(
            out_i.as_ptr(),
            initiator.format_handshake_initiation(&mut out_i, true),
        ) else {
            panic!("no retry");
        };
        let retry = out_i[x].to_vec();
        assert!(matches!(
            route_and_decapsulate(&t, &retry, &mut out_r),
            Action::SendToNetwork(_)
        ));

        // Valid cookie or not, one source gets HANDSHAKES_PER_SOURCE handshake messages a
        // second through while the node is under load (a flooder that answers cookies is held
        // to that); another source is not affected, and the next second starts afresh.
        fn with_mac2(initiator: &mut Tunn, out: &mut [u8]) -> Vec<u8> {
            let Action::SendToNetwork(x) = action(
                out.as_ptr(),
                initiator.format_handshake_initiation(out, true),
            ) else {
                panic!("no initiation");
            };
            out[x].to_vec()
        }
        let mut passed = 1;
        let mut limited = 0;
        for _ in 0..40 {
            match t.route_wireguard(
                &with_mac2(&mut initiator, &mut out_i),
                SRC,
                Source::Addr(SRC),
                &mut cookie,
            ) {
                Routed::Peer(_) => passed += 1,
                Routed::RateLimited => limited += 1,
                _ => panic!("a handshake with a valid cookie was refused otherwise"),
            }
        }
        assert_eq!(passed, crate::peers::HANDSHAKES_PER_SOURCE);
        assert_eq!(limited, 41 - passed);
        let other = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3));
        let init = with_mac2(&mut initiator, &mut out_i);
        let Routed::Cookie(len) = t.route_wireguard(&init, other, Source::Addr(other), &mut cookie)
        else {
            panic!("no cookie for the other address");
        };
        initiator.decapsulate(None, &cookie[..len], &mut out_r);
        assert!(matches!(
            t.route_wireguard(
                &with_mac2(&mut initiator, &mut out_i),
                other,
                Source::Addr(other),
                &mut cookie
            ),
            Routed::Peer(_)
        ));
        t.reset_handshake_limits();
        for _ in 0..30 {
            assert!(matches!(
                t.route_wireguard(
                    &with_mac2(&mut initiator, &mut out_i),
                    other,
                    Source::Addr(other),
                    &mut cookie
                ),
                Routed::Peer(_)
            ));
        }
    }

    #[test]
    fn actions_carry_a_packet_through_a_real_handshake() {
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
