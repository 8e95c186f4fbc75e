//! TUN→UDP: read packets (with offload, a GSO super-packet split into segments), find the peer
//! owning each destination, encrypt, and send. Datagrams for one direct address are gathered
//! into one UDP GSO send (what may join is [`GsoBatch`]'s decision). Relayed ones over UDP join
//! the same way, each with its relay header, in one batch for the coordinator's address (its
//! relay splits the batch by relay id and sends on with GSO again); relayed over the control
//! connection, one by one. A lone packet goes out at once: the batch is flushed at the end of
//! every read.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use a2a_proto::udp::{write_relay_header, RELAY_HEADER_LEN};
use a2a_proto::NodeKey;
use tun_rs::IDEAL_BATCH_SIZE;

use super::receive::refusal;
use super::{DataPlane, TunBatch, TUN_PACKET_LEN};
use crate::core::batch::{GsoBatch, Pushed};
use crate::core::counters::Counters;
use crate::core::path::Route;
use crate::core::peers::Peer;
use crate::core::policy::Verdict;
use crate::core::wg::{action, ip_destination, pad_plaintext, Action, WG_DATA_OVERHEAD};
use crate::io::{Platform, TunDevice, TunReader, UdpTransport};
use a2a_udpbatch::MAX_GSO_BYTES;

impl<P: Platform> DataPlane<P> {
    pub async fn tun_to_udp(self: Arc<Self>) {
        let mut reader = self.tun.reader();
        // One zeroed allocation for the 128 slots (512 KiB: the allocator maps it afresh, and
        // the kernel gives a page only when it is first written), cut into slices: an idle
        // node holds the pages of the one or two slots its reads fill, not all 128.
        // (`vec![vec![0; 4096]; 128]` cloned the first buffer 127 times, writing every page
        // at start; 128 allocations of their own would each write a header into its page.)
        let mut backing = vec![0u8; TUN_PACKET_LEN * IDEAL_BATCH_SIZE];
        let mut packets: Vec<&mut [u8]> = backing.chunks_mut(TUN_PACKET_LEN).collect();
        let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
        let mut tx = GsoBatch::new(
            self.udp.max_segments(),
            MAX_GSO_BYTES,
            RELAY_HEADER_LEN + TUN_PACKET_LEN + WG_DATA_OVERHEAD,
        );
        let mut single = vec![0u8; RELAY_HEADER_LEN + TUN_PACKET_LEN + 64];
        // Which packets of a read the policy lets out, and its answers to the others.
        let mut pass = vec![true; IDEAL_BATCH_SIZE];
        let mut answers = self.tun_batch(8);
        loop {
            let n = match reader.read(&mut packets, &mut sizes).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("reading the TUN device failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.police_tx(&packets, &sizes[..n], &mut pass, &mut answers);
            self.write_tun(&mut answers).await;
            // The peer of the previous packet and where its datagrams go, reused while the
            // destination repeats.
            let mut last: Option<(IpAddr, Arc<Peer>, Send)> = None;
            for ((packet, &size), &pass) in packets.iter_mut().zip(&sizes[..n]).zip(&pass) {
                if !pass {
                    continue;
                }
                let packet = pad_plaintext(packet, size);
                let Some(dst) = ip_destination(packet) else {
                    Counters::bump(&self.counters.tun_not_ip);
                    continue;
                };
                if last.as_ref().is_none_or(|(ip, ..)| *ip != dst) {
                    let Some(peer) = self.peers.by_addr(dst) else {
                        Counters::bump(&self.counters.tun_no_route);
                        continue;
                    };
                    let send = self.send_for(&peer);
                    last = Some((dst, peer, send));
                }
                let Some((_, peer, send)) = last.as_ref() else {
                    continue;
                };
                match *send {
                    Send::Direct(addr) => {
                        self.encrypt_batched(peer, packet, addr, None, &mut tx)
                            .await
                    }
                    Send::RelayUdp(id, coordinator) => {
                        self.encrypt_batched(peer, packet, coordinator, Some(id), &mut tx)
                            .await
                    }
                    Send::Other => {
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

    /// Judges the packets of one read by the policy (one lock for the read): `pass[i]` says
    /// whether packet `i` goes out. A refused one is answered to the local program through
    /// `answers` (a RST, or ICMP "prohibited"), so its connection fails at once; the peer
    /// would refuse it anyway, so it does not cross the network.
    fn police_tx(
        &self,
        packets: &[&mut [u8]],
        sizes: &[usize],
        pass: &mut [bool],
        answers: &mut TunBatch<<P::Tun as TunDevice>::Writer>,
    ) {
        let now_ms = self.peers.ms_since_epoch(crate::tasks::now());
        let mut tracker = self.tracker();
        let mut last: Option<(IpAddr, NodeKey)> = None;
        for (i, (packet, &size)) in packets.iter().zip(sizes).enumerate() {
            pass[i] = true;
            let packet = &packet[..size];
            let Some(dst) = ip_destination(packet) else {
                continue; // counted by the send loop
            };
            let key = match last {
                Some((ip, key)) if ip == dst => key,
                _ => match self.peers.by_addr(dst) {
                    Some(peer) => {
                        last = Some((dst, peer.key));
                        peer.key
                    }
                    None => continue,
                },
            };
            if let Verdict::Refuse { reply, .. } = tracker.outbound(now_ms, key, packet) {
                pass[i] = false;
                answers.push_built(1500, |out| refusal(reply, packet, out));
            }
        }
    }

    /// Where `peer`'s datagrams go now: direct, through the relay over UDP (batched like direct
    /// ones), or the other ways [`send_to_peer`](Self::send_to_peer) knows (one by one).
    fn send_for(&self, peer: &Peer) -> Send {
        match peer.route().route {
            Route::Direct(addr) => Send::Direct(addr),
            Route::Relay => {
                let id = peer.relay_id();
                let link = self.relay.load();
                match link.as_ref() {
                    Some(l) if id != 0 && l.udp_ok.load(Ordering::Relaxed) => {
                        Send::RelayUdp(id, l.coordinator)
                    }
                    _ => Send::Other,
                }
            }
        }
    }

    /// Encrypts `packet` for `peer` into the send batch for `addr`, behind a relay header for
    /// `relay` when it goes through the relay, sending what the batch held first when the new
    /// datagram cannot join it.
    async fn encrypt_batched(
        &self,
        peer: &Peer,
        packet: &[u8],
        addr: SocketAddr,
        relay: Option<u32>,
        tx: &mut GsoBatch,
    ) {
        let head = if relay.is_some() { RELAY_HEADER_LEN } else { 0 };
        if !tx.fits(addr, head + packet.len() + WG_DATA_OVERHEAD) {
            self.flush_tx(tx).await;
        }
        let act = {
            let mut t = peer.tunn();
            let body = &mut tx.spare()[head..];
            let start = body.as_ptr();
            action(start, t.encapsulate(packet, body))
        };
        let Action::SendToNetwork(r) = act else {
            return;
        };
        // The datagram: the header (if any) right before the encrypted bytes.
        if let Some(id) = relay {
            write_relay_header(&mut tx.spare()[r.start..], id);
        }
        if tx.push(addr, r.start, head + r.len()) == Pushed::SendEarlierFirst {
            self.flush_tx(tx).await;
            tx.carry_over();
        }
    }

    /// Sends the batch: one UDP GSO call when it holds several datagrams.
    async fn flush_tx(&self, tx: &mut GsoBatch) {
        let ready = tx.ready();
        if ready.count > 0 {
            if self
                .udp
                .send(ready.data, ready.segment, ready.addr)
                .await
                .is_err()
            {
                Counters::bump(&self.counters.send_errors);
            }
            if ready.count > 1 && self.udp.max_segments() == 1 {
                // The transport gave up segmentation.
                Counters::set(&self.counters.fast_udp_gso, false);
                tx.set_max_segments(1);
            }
        }
        tx.clear();
    }
}

/// How the transmit loop sends one peer's datagrams.
#[derive(Clone, Copy)]
enum Send {
    Direct(SocketAddr),
    /// Through the coordinator's relay over UDP: (relay id, the coordinator's address).
    RelayUdp(u32, SocketAddr),
    /// Over the control connection, or nowhere yet: one by one through `send_to_peer`.
    Other,
}
