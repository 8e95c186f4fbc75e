//! The boringtun adapter: one `Tunn` call's result as an owned action the caller carries out,
//! and the plaintext shaping around it (padding, the destination of a packet). No I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::TunnResult;

/// Overlay MTU: 1500 minus the IPv6 (40) + UDP (8) + WireGuard (32) overheads, as wg-quick.
pub const OVERLAY_MTU: u16 = 1420;
/// Datagram overhead of a WireGuard data packet, plus its padding to 16 bytes.
pub const WG_DATA_OVERHEAD: usize = 32 + 16;

/// What the caller must do with the output of one `Tunn` call; ranges index the output buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SendToNetwork(Range<usize>),
    /// A decrypted IPv4 or IPv6 packet and its inner source address (which the caller checks
    /// against the sending peer).
    WriteToTunnel(Range<usize>, IpAddr),
    Nothing,
    Rejected,
    /// A handshake initiation with a timestamp not after the last accepted one: a replay.
    ReplayedHandshake,
}

/// Turns a `TunnResult` (which borrows `out`) into an owned [`Action`].
pub fn action(out_start: *const u8, result: TunnResult<'_>) -> Action {
    let range = |p: &[u8]| {
        let start = p.as_ptr() as usize - out_start as usize;
        start..start + p.len()
    };
    match result {
        TunnResult::Done => Action::Nothing,
        TunnResult::Err(WireGuardError::WrongTai64nTimestamp) => Action::ReplayedHandshake,
        TunnResult::Err(_) => Action::Rejected,
        TunnResult::WriteToNetwork(p) => Action::SendToNetwork(range(p)),
        TunnResult::WriteToTunnelV4(p, src) => Action::WriteToTunnel(range(p), src.into()),
        TunnResult::WriteToTunnelV6(p, src) => Action::WriteToTunnel(range(p), src.into()),
    }
}

/// Length of a plaintext of `len` bytes padded as WireGuard pads it (whitepaper §5.4.6): to a
/// multiple of 16, but not beyond the MTU (nor shortened when it is longer).
pub fn padded_len(len: usize, mtu: usize) -> usize {
    if len >= mtu {
        len
    } else {
        len.next_multiple_of(16).min(mtu)
    }
}

/// Zero-pads the packet at the start of `buf` (`len` bytes) for encryption: boringtun does not
/// pad, and then the datagram's size tells the inner packet's exact length. The receiver trims
/// the padding by the IP header's total length (boringtun does), so this is invisible to peers.
pub fn pad_plaintext(buf: &mut [u8], len: usize) -> &[u8] {
    let padded = padded_len(len, usize::from(OVERLAY_MTU)).min(buf.len());
    buf[len..padded].fill(0);
    &buf[..padded]
}

/// Destination of an IPv4 or IPv6 packet read from the TUN device; `None` for anything else
/// (or a header cut short).
pub fn ip_destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => Some(IpAddr::V4(Ipv4Addr::new(
            packet[16], packet[17], packet[18], packet[19],
        ))),
        Some(6) if packet.len() >= 40 => {
            let dst: [u8; 16] = packet[24..40].try_into().expect("16 bytes");
            Some(IpAddr::V6(Ipv6Addr::from(dst)))
        }
        _ => None,
    }
}

/// Whether a WireGuard datagram is a cookie reply (type 3).
pub fn is_cookie_reply(d: &[u8]) -> bool {
    d.first() == Some(&3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::IpAddr;
    use std::time::Instant;

    use a2a_proto::udp::{classify, DatagramKind};
    use a2a_proto::NodeKey;
    use boringtun::noise::Tunn;

    use crate::core::peers::{PeerTable, Routed, Source, HANDSHAKE_RATE_LIMIT};

    use boringtun::x25519::{PublicKey, StaticSecret};

    /// Two tunnels with keys between them (`a` initiated).
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
    fn finds_ipv4_and_ipv6_destinations() {
        let mut p = [0u8; 40];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[100, 64, 0, 9]);
        assert_eq!(ip_destination(&p), Some(IpAddr::from([100, 64, 0, 9])));
        assert_eq!(ip_destination(&p[..19]), None);
        p[0] = 0x60;
        let dst: Ipv6Addr = "fd00:1:2:3::9".parse().unwrap();
        p[24..40].copy_from_slice(&dst.octets());
        assert_eq!(ip_destination(&p), Some(IpAddr::V6(dst)));
        assert_eq!(ip_destination(&p[..39]), None);
        p[0] = 0x50;
        assert_eq!(ip_destination(&p), None);
        assert_eq!(ip_destination(&[]), None);
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

    /// A WireGuard handshake initiation built by hand (a2a-wg-forge), so that the initiator's
    /// static key can be anything, even a point whose DH is all zeros: `ss` is the
    /// static-static DH as the responder computes it.
    fn forged_initiation(responder: &[u8; 32], static_public: &[u8; 32], ss: &[u8; 32]) -> Vec<u8> {
        a2a_wg_forge::initiation_with(
            responder,
            static_public,
            ss,
            rand::random(),
            a2a_wg_forge::tai64n(std::time::SystemTime::now()),
            None,
        )
        .message
    }

    fn record(key: &StaticSecret, ip: [u8; 4]) -> a2a_proto::NodeRecord {
        a2a_proto::NodeRecord {
            network: a2a_proto::NetworkKey::derive(&[1; 32]).id(),
            node_key: NodeKey(PublicKey::from(key).to_bytes()),
            name: "peer".into(),
            ip: Ipv4Addr::from(ip),
            candidates: vec![],
            issued_ms: 1,
            ssh: None,
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
        let t = PeerTable::new(r, Instant::now());
        t.apply(Instant::now(), record(&i, [100, 64, 0, 4]), None);
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
        let t = PeerTable::new(r.clone(), Instant::now());
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
            assert_eq!(
                t.apply(Instant::now(), rec, None),
                crate::core::peers::Applied::LowOrderKey
            );
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
        let t = PeerTable::new(r.clone(), Instant::now());
        t.apply(Instant::now(), record(&i, [100, 64, 0, 4]), None);
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

        // The keys are the ones before, both ways.
        assert_eq!(receiver_index(&mut out_r), before, "new keys were made");
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
        let t = PeerTable::new(r.clone(), Instant::now());
        t.apply(Instant::now(), record(&i, [100, 64, 0, 4]), None);
        // Initiations with a valid MAC1 from keys nobody knows, until cookies are demanded.
        let mut cookie = [0u8; 64];
        let mut cookies = 0;
        for n in 0..(HANDSHAKE_RATE_LIMIT as u16 + 50) {
            let [hi, lo] = n.to_be_bytes();
            let mut key = [lo; 32];
            key[0] = hi;
            let init = forged_initiation(&r_pub, &key, &key);
            let from = IpAddr::V4(Ipv4Addr::new(10, 9, hi, lo));
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
        assert_eq!(passed, crate::core::peers::HANDSHAKES_PER_SOURCE);
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

        // No keys yet: the packet is queued and a handshake initiation goes out.
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
                assert_eq!(src, IpAddr::from([100, 64, 0, 1]));
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

    #[test]
    fn ipv6_packets_cross_the_tunnel_with_their_inner_source() {
        let (mut a, mut b) = handshaken_pair();
        let (src, dst): (Ipv6Addr, Ipv6Addr) = (
            "fd12:3456:789a:1::1".parse().unwrap(),
            "fd12:3456:789a:2::2".parse().unwrap(),
        );
        // A minimal IPv6/UDP packet (payload length 8 + 5).
        let mut packet = vec![0u8; 40 + 8 + 5];
        packet[0] = 0x60;
        packet[4..6].copy_from_slice(&13u16.to_be_bytes());
        packet[6] = 17;
        packet[7] = 64;
        packet[8..24].copy_from_slice(&src.octets());
        packet[24..40].copy_from_slice(&dst.octets());
        packet[44..46].copy_from_slice(&13u16.to_be_bytes());
        packet[48..].copy_from_slice(b"hello");
        assert_eq!(ip_destination(&packet), Some(IpAddr::V6(dst)));
        let (mut out_a, mut out_b) = (vec![0u8; 2048], vec![0u8; 2048]);
        let mut plain = packet.clone();
        plain.resize(128, 0);
        let padded = pad_plaintext(&mut plain, packet.len()).to_vec();
        let Action::SendToNetwork(r) = action(out_a.as_ptr(), a.encapsulate(&padded, &mut out_a))
        else {
            panic!("expected a data packet");
        };
        let data = out_a[r].to_vec();
        let Action::WriteToTunnel(r, inner) =
            action(out_b.as_ptr(), b.decapsulate(None, &data, &mut out_b))
        else {
            panic!("the IPv6 packet was not delivered");
        };
        assert_eq!(inner, IpAddr::V6(src));
        assert_eq!(
            &out_b[r],
            &packet[..],
            "padding trimmed by the payload length"
        );
    }
}
