//! UDP→TUN: receive datagrams (with UDP GRO, several per call), demultiplex, decrypt, check the
//! inner source, and write the packets to the TUN device in batches (with offload, coalesced
//! into TCP/UDP super-packets) once the socket has nothing more queued.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use a2a_proto::addr::canonical;
use a2a_proto::udp::{
    classify, is_disco, parse_relay_data, A2aDatagram, DatagramKind, RELAY_HEADER_LEN,
};
use a2a_proto::NodeKey;

use super::{DataPlane, BUF_LEN};
use crate::core::counters::Counters;
use crate::core::peers::{Peer, Routed, Via};
use crate::core::policy::{Reply, Verdict};
use crate::core::refusal;
use crate::core::wg::{action, is_cookie_reply, Action};
use crate::io::{Platform, TunDevice, TunWriter, UdpTransport};
use crate::tasks::events::PathEvent;

/// Room in front of every packet written to the TUN device: the virtio-net header when offload
/// is on, or a relay header when a decapsulation answers through the relay.
const HEAD: usize = 16;
/// Decrypted packets written to the TUN device at most at once: one GRO read's worth (UDP GRO
/// hands over up to 64 datagrams a call). TCP loses nothing by it (a coalesced super-packet
/// holds at most 64 KiB, 47 segments); UDP, written a datagram per write, reaches its socket
/// in runs half as long as with 128, which a default receive buffer (212 KiB) absorbs better:
/// iperf3 `-u -b 400M` lost 0.5–2.2 % instead of 2.0–4.3 %, and `-b 0` received 733–823
/// Mbit/s instead of 623–663 (two 4 s runs each over a2a direct between the bench's two
/// namespaces, 2026-12-02).
const RX_BATCH: usize = 64;
/// Plaintext room for a decapsulation that is not data (handshake replies, keepalives).
const MIN_DECAP_OUT: usize = 256;

/// Decrypted packets waiting to be written to the TUN device: `bufs[..n]`, each packet at
/// `HEAD` (the room before it holds the virtio-net header with offload). A buffer is allocated
/// the first time its slot is used, with room for a coalesced super-packet, and reused: an idle
/// node holds the one or two it used, not the whole batch (128 would hold about 1 MiB).
pub struct TunBatch<W> {
    bufs: Vec<Vec<u8>>,
    /// The peer each packet came from (what the policy judges it by).
    keys: Vec<NodeKey>,
    n: usize,
    writer: W,
    /// Answers to refused packets (a TCP RST, an ICMP "prohibited"), sent to their peers
    /// after the batch is written: `(peer, length)` of `replies[..]`, at most
    /// [`MAX_REPLIES`] a batch (the rest of a burst of refusals is only counted).
    reply_to: Vec<(NodeKey, usize)>,
    replies: Vec<Vec<u8>>,
}

/// Refusals answered per batch written to the TUN device.
const MAX_REPLIES: usize = 8;
/// Room for one answer to a refusal: the relay header, the answer (at most an ICMPv6 error of
/// 1280 bytes) and WireGuard's overhead.
const REPLY_LEN: usize = RELAY_HEADER_LEN + 1280 + 64;

impl<W: TunWriter> TunBatch<W> {
    pub fn new(capacity: usize, writer: W) -> Self {
        let bufs = (0..capacity.max(1)).map(|_| Vec::new()).collect();
        TunBatch {
            bufs,
            keys: vec![NodeKey([0; 32]); capacity.max(1)],
            n: 0,
            writer,
            reply_to: Vec::with_capacity(MAX_REPLIES),
            // Zeroed apiece (a clone of one would write them all at start).
            replies: (0..MAX_REPLIES).map(|_| vec![0u8; REPLY_LEN]).collect(),
        }
    }

    /// Adds a packet that needs no policing (an answer to a refusal, for this node's own TUN
    /// device), built by `build` into a buffer of at least `room` bytes (its length, or `None`
    /// for nothing); false when the batch is full or nothing was built.
    pub fn push_built(
        &mut self,
        room: usize,
        build: impl FnOnce(&mut [u8]) -> Option<usize>,
    ) -> bool {
        if self.is_full() {
            return false;
        }
        let b = self.slot(HEAD + room);
        let Some(len) = build(&mut b[HEAD..]) else {
            return false;
        };
        b.truncate(HEAD + len);
        self.n += 1;
        true
    }

    pub fn is_full(&self) -> bool {
        self.n == self.bufs.len()
    }

    /// The next free buffer, at least `len` bytes long (it grows within its capacity).
    fn slot(&mut self, len: usize) -> &mut Vec<u8> {
        let b = &mut self.bufs[self.n];
        if b.capacity() == 0 {
            // First use of this slot: the room for a super-packet is reserved, not touched.
            b.reserve_exact(HEAD + BUF_LEN);
        }
        if b.len() < len {
            b.resize(len, 0);
        }
        b
    }
}

type Batch<P> = TunBatch<<<P as crate::io::Platform>::Tun as TunDevice>::Writer>;

impl<P: Platform> DataPlane<P> {
    /// A batch of `capacity` packets writing to this data plane's TUN device.
    pub fn tun_batch(&self, capacity: usize) -> Batch<P> {
        TunBatch::new(capacity, self.tun.writer())
    }

    pub async fn udp_to_tun(self: Arc<Self>) {
        let mut datagram = vec![0u8; BUF_LEN];
        let mut rx = self.tun_batch(RX_BATCH);
        loop {
            let got = match self.udp.try_recv(&mut datagram) {
                Ok(Some(got)) => got,
                Ok(None) => {
                    self.flush_rx(&mut rx).await;
                    self.udp.readable().await;
                    continue;
                }
                Err(_) => continue, // ICMP errors from earlier sends surface here
            };
            let src = canonical(got.from);
            for d in datagram[..got.len].chunks(got.segment.max(1)) {
                self.receive(d, Via::Direct(src), src.ip(), &mut rx).await;
                if rx.is_full() {
                    self.flush_rx(&mut rx).await;
                }
            }
        }
    }

    /// Writes the decrypted packets gathered in `rx` to the TUN device, those the policy
    /// lets in (see [`police_rx`](Self::police_rx)); then answers the refused ones.
    pub async fn flush_rx(&self, rx: &mut Batch<P>) {
        if rx.n == 0 {
            return;
        }
        self.police_rx(rx);
        self.write_tun(rx).await;
        for i in 0..rx.reply_to.len() {
            let (key, len) = rx.reply_to[i];
            if let Some(peer) = self.peers.by_key(&key) {
                self.send_packet(&peer, &mut rx.replies[i], len).await;
            }
        }
        rx.reply_to.clear();
    }

    /// Writes `rx`'s packets to the TUN device as they are.
    pub async fn write_tun(&self, rx: &mut Batch<P>) {
        if rx.n == 0 {
            return;
        }
        let n = rx.n;
        rx.n = 0;
        if let Err(e) = rx.writer.write(&mut rx.bufs[..n], HEAD).await {
            tracing::debug!("writing to the TUN device failed: {e}");
            Counters::bump(&self.counters.send_errors);
        }
    }

    /// Judges every packet of `rx` by the policy (one lock for the batch), keeps those that
    /// pass in order, and builds the answers to refused ones that get one.
    fn police_rx(&self, rx: &mut Batch<P>) {
        let now_ms = self.peers.ms_since_epoch(crate::tasks::now());
        let mut tracker = self.tracker();
        let mut kept = 0;
        for i in 0..rx.n {
            let key = rx.keys[i];
            let verdict = tracker.inbound(now_ms, key, &rx.bufs[i][HEAD..]);
            if let Verdict::Refuse { reply, .. } = verdict {
                let r = rx.reply_to.len();
                if r < MAX_REPLIES {
                    let out = &mut rx.replies[r][RELAY_HEADER_LEN..REPLY_LEN - 64];
                    if let Some(len) = refusal(reply, &rx.bufs[i][HEAD..], out) {
                        rx.reply_to.push((key, len));
                    }
                }
                continue;
            }
            if kept != i {
                rx.bufs.swap(kept, i);
                rx.keys.swap(kept, i);
            }
            kept += 1;
        }
        rx.n = kept;
    }

    /// Handles one datagram that came `via` (`src_ip`: the underlay source, for WireGuard's
    /// rate limiter): relay data from the coordinator is unwrapped first (not by recursion,
    /// which would box a future per relayed datagram).
    async fn receive(&self, d: &[u8], via: Via, src_ip: IpAddr, out: &mut Batch<P>) {
        if let Via::Direct(from) = via {
            if let Some((id, payload)) = parse_relay_data(d) {
                let from_relay = self
                    .coordinator
                    .load()
                    .as_deref()
                    .is_some_and(|c| *c == from);
                if !from_relay {
                    Counters::bump(&self.counters.relay_not_from_coordinator);
                    return;
                }
                return self
                    .receive_unwrapped(payload, Via::Relay(id), src_ip, out)
                    .await;
            }
        }
        self.receive_unwrapped(d, via, src_ip, out).await
    }

    /// A datagram that is not (or no longer) in a relay header. Relay data inside relay data
    /// is malformed.
    async fn receive_unwrapped(&self, d: &[u8], via: Via, src_ip: IpAddr, out: &mut Batch<P>) {
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
                match A2aDatagram::decode(d) {
                    Some(A2aDatagram::EndpointReply { nonce, observed }) => {
                        self.prober.answered(nonce, from, observed)
                    }
                    _ => Counters::bump(&self.counters.udp_a2a_malformed),
                }
            }
        }
    }

    /// Relay data that came over the control connection (into `out`, which the caller flushes).
    pub async fn receive_relayed_tcp(&self, src_id: u32, payload: &[u8], out: &mut Batch<P>) {
        let ip = self
            .relay
            .load()
            .as_ref()
            .map(|l| l.coordinator.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        if classify(payload) == DatagramKind::WireGuard || is_disco(payload) {
            self.receive_unwrapped(payload, Via::Relay(src_id), ip, out)
                .await;
        } else {
            Counters::bump(&self.counters.udp_garbage);
        }
    }

    async fn receive_wireguard(&self, d: &[u8], via: Via, src_ip: IpAddr, out: &mut Batch<P>) {
        let mut cookie = [0u8; RELAY_HEADER_LEN + 64];
        let peer = match self.peers.route_wireguard(
            d,
            src_ip,
            via.source(),
            &mut cookie[RELAY_HEADER_LEN..],
        ) {
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
        let now_ms = self.peers.ms_since_epoch(crate::tasks::now());
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
        rx: &mut Batch<P>,
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
        let direct = via.direct();
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
                if !peer.holds(inner_src) {
                    // A member may only send from its own overlay addresses.
                    Counters::bump(if inner_src.is_ipv4() {
                        &self.counters.inner_source_mismatch
                    } else {
                        &self.counters.inner_source_mismatch6
                    });
                    return;
                }
                if let Some(a) = direct {
                    self.seen_direct(peer, a);
                }
                if r.start != 0 {
                    buf.copy_within(HEAD + r.start..HEAD + r.end, HEAD);
                }
                buf.truncate(HEAD + r.len());
                rx.keys[slot] = peer.key;
                rx.n = slot + 1;
                return;
            }
            Action::Nothing => {
                if is_cookie_reply(d) {
                    // Not data: it tells nothing about the peer's path. The peer is under load
                    // and wants our handshake again with the cookie: sent now, not at
                    // boringtun's retry 5 s later (at most once a second per peer; the peer
                    // then limits handshakes per source, not by cookies).
                    Counters::bump(&self.counters.wg_cookies_received);
                    let now_ms = self.peers.ms_since_epoch(crate::tasks::now());
                    if peer.retry_after_cookie(now_ms) {
                        self.send_initiation(peer, true).await;
                    }
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
}

/// Builds the answer `reply` asks for to the refused `packet` into `out`; its length, or
/// `None` for no answer.
pub(super) fn refusal(reply: Reply, packet: &[u8], out: &mut [u8]) -> Option<usize> {
    match reply {
        Reply::None => None,
        Reply::TcpRst => refusal::tcp_rst(packet, out),
        Reply::IcmpProhibited => refusal::prohibited(packet, out),
    }
}
