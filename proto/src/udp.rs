//! One UDP socket carries WireGuard and a2a's own datagrams; the first byte tells them apart.
//!
//! WireGuard messages start with type 1-4 followed by three zero bytes. a2a's own datagrams start
//! with [`A2A_MAGIC`] (0xA2), a value WireGuard never uses, and a kind byte:
//!
//! | kind | message | direction | layout after `A2 kind` |
//! | --- | --- | --- | --- |
//! | 01 | endpoint probe | node → coordinator | nonce 8 |
//! | 02 | endpoint reply | coordinator → node | nonce 8, family 4/6, address, port |
//! | 03 | relay bind | node → coordinator | nonce 8, relay id 4, relay secret 16 |
//! | 05 | relay data | both | peer's relay id 4, then a WireGuard or disco datagram |
//! | 10 | disco | node → node (direct or inside relay data) | see the `disco` module |
//!
//! Relay data carries the *destination's* id from node to coordinator and the *source's* id
//! from coordinator to node; its 6-byte header keeps a full-size WireGuard packet (1452 bytes
//! for the 1420-byte overlay MTU) inside a 1500-byte IPv4 path.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::keys::RelaySecret;

pub const A2A_MAGIC: u8 = 0xA2;
const KIND_ENDPOINT_PROBE: u8 = 0x01;
const KIND_ENDPOINT_REPLY: u8 = 0x02;
const KIND_RELAY_BIND: u8 = 0x03;
pub const KIND_RELAY_DATA: u8 = 0x05;
pub const KIND_DISCO: u8 = 0x10;
/// Length of the relay data header: magic, kind, relay id.
pub const RELAY_HEADER_LEN: usize = 6;

/// What a datagram on the shared socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    /// A WireGuard message (handshake initiation/response, cookie reply, transport data).
    WireGuard,
    /// One of a2a's own messages.
    A2a,
    /// Anything else: dropped and counted.
    Unknown,
}

pub fn classify(datagram: &[u8]) -> DatagramKind {
    match datagram {
        [1..=4, 0, 0, 0, ..] => DatagramKind::WireGuard,
        [A2A_MAGIC, _, ..] => DatagramKind::A2a,
        _ => DatagramKind::Unknown,
    }
}

/// a2a's own UDP messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum A2aDatagram {
    /// Node to coordinator: "what address do you see me at?"
    EndpointProbe { nonce: [u8; 8] },
    /// Coordinator to node: the source address the probe (or bind) came from.
    EndpointReply {
        nonce: [u8; 8],
        observed: SocketAddr,
    },
    /// Node to coordinator: "relay data for my relay id to this address"; proves the id with
    /// the secret the coordinator gave over the control channel. Answered like a probe.
    RelayBind {
        nonce: [u8; 8],
        relay_id: u32,
        secret: RelaySecret,
    },
}

/// Largest encoded [`A2aDatagram`].
pub const MAX_A2A_DATAGRAM: usize = 2 + 8 + 4 + 16;

/// Writes `a` as `family (4|6) | address | port` into `out`; returns the length (7 or 19).
pub fn encode_addr(a: &SocketAddr, out: &mut [u8]) -> usize {
    let n = match a.ip() {
        IpAddr::V4(ip) => {
            out[0] = 4;
            out[1..5].copy_from_slice(&ip.octets());
            5
        }
        IpAddr::V6(ip) => {
            out[0] = 6;
            out[1..17].copy_from_slice(&ip.octets());
            17
        }
    };
    out[n..n + 2].copy_from_slice(&a.port().to_be_bytes());
    n + 2
}

/// Reads exactly one address written by [`encode_addr`]; `None` for anything else.
pub fn decode_addr(d: &[u8]) -> Option<SocketAddr> {
    let (ip, port): (IpAddr, &[u8]) = match d {
        [4, rest @ ..] if rest.len() == 6 => {
            let o: [u8; 4] = rest[..4].try_into().ok()?;
            (Ipv4Addr::from(o).into(), &rest[4..])
        }
        [6, rest @ ..] if rest.len() == 18 => {
            let o: [u8; 16] = rest[..16].try_into().ok()?;
            (Ipv6Addr::from(o).into(), &rest[16..])
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, u16::from_be_bytes([port[0], port[1]])))
}

/// Writes a relay data header for `relay_id` into the first [`RELAY_HEADER_LEN`] bytes of `out`.
pub fn write_relay_header(out: &mut [u8], relay_id: u32) {
    out[0] = A2A_MAGIC;
    out[1] = KIND_RELAY_DATA;
    out[2..6].copy_from_slice(&relay_id.to_be_bytes());
}

/// Splits a relay data datagram into its relay id and payload; `None` if it is not one or the
/// payload is empty.
pub fn parse_relay_data(d: &[u8]) -> Option<(u32, &[u8])> {
    match d {
        [A2A_MAGIC, KIND_RELAY_DATA, a, b, c, e, payload @ ..] if !payload.is_empty() => {
            Some((u32::from_be_bytes([*a, *b, *c, *e]), payload))
        }
        _ => None,
    }
}

/// True for a disco datagram (authenticated node-to-node probe), parsed by the `disco` module.
pub fn is_disco(d: &[u8]) -> bool {
    matches!(d, [A2A_MAGIC, KIND_DISCO, ..])
}

impl A2aDatagram {
    /// Writes the datagram into `out` and returns its length.
    pub fn encode(&self, out: &mut [u8; MAX_A2A_DATAGRAM]) -> usize {
        out[0] = A2A_MAGIC;
        match self {
            A2aDatagram::EndpointProbe { nonce } => {
                out[1] = KIND_ENDPOINT_PROBE;
                out[2..10].copy_from_slice(nonce);
                10
            }
            A2aDatagram::EndpointReply { nonce, observed } => {
                out[1] = KIND_ENDPOINT_REPLY;
                out[2..10].copy_from_slice(nonce);
                10 + encode_addr(observed, &mut out[10..])
            }
            A2aDatagram::RelayBind {
                nonce,
                relay_id,
                secret,
            } => {
                out[1] = KIND_RELAY_BIND;
                out[2..10].copy_from_slice(nonce);
                out[10..14].copy_from_slice(&relay_id.to_be_bytes());
                out[14..30].copy_from_slice(&secret.0);
                30
            }
        }
    }

    /// Parses an a2a datagram; `None` for anything malformed (the caller counts it).
    pub fn decode(d: &[u8]) -> Option<Self> {
        if d.len() < 10 || d[0] != A2A_MAGIC {
            return None;
        }
        let nonce: [u8; 8] = d[2..10].try_into().ok()?;
        match d[1] {
            KIND_ENDPOINT_PROBE if d.len() == 10 => Some(A2aDatagram::EndpointProbe { nonce }),
            KIND_RELAY_BIND if d.len() == 30 => Some(A2aDatagram::RelayBind {
                nonce,
                relay_id: u32::from_be_bytes(d[10..14].try_into().ok()?),
                secret: RelaySecret(d[14..30].try_into().ok()?),
            }),
            KIND_ENDPOINT_REPLY => Some(A2aDatagram::EndpointReply {
                nonce,
                observed: decode_addr(&d[10..])?,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_wireguard_a2a_and_garbage() {
        assert_eq!(classify(&[1, 0, 0, 0, 9]), DatagramKind::WireGuard);
        assert_eq!(classify(&[4, 0, 0, 0]), DatagramKind::WireGuard);
        assert_eq!(classify(&[5, 0, 0, 0]), DatagramKind::Unknown);
        assert_eq!(classify(&[1, 0, 1, 0]), DatagramKind::Unknown);
        assert_eq!(classify(&[0xA2, 1]), DatagramKind::A2a);
        assert_eq!(classify(&[]), DatagramKind::Unknown);
        assert_eq!(classify(&[1]), DatagramKind::Unknown);
    }

    #[test]
    fn a2a_datagrams_round_trip() {
        let mut buf = [0u8; MAX_A2A_DATAGRAM];
        for msg in [
            A2aDatagram::EndpointProbe { nonce: [1; 8] },
            A2aDatagram::EndpointReply {
                nonce: [2; 8],
                observed: "10.1.2.3:4567".parse().unwrap(),
            },
            A2aDatagram::EndpointReply {
                nonce: [3; 8],
                observed: "[fd00::1]:80".parse().unwrap(),
            },
            A2aDatagram::RelayBind {
                nonce: [4; 8],
                relay_id: 0xdead_beef,
                secret: RelaySecret([5; 16]),
            },
        ] {
            let n = msg.encode(&mut buf);
            assert_eq!(classify(&buf[..n]), DatagramKind::A2a);
            assert_eq!(A2aDatagram::decode(&buf[..n]), Some(msg));
            for cut in 0..n {
                assert_eq!(A2aDatagram::decode(&buf[..cut]), None);
            }
        }
    }

    #[test]
    fn relay_data_headers_round_trip() {
        let mut d = vec![0u8; RELAY_HEADER_LEN + 3];
        write_relay_header(&mut d, 0x0102_0304);
        d[RELAY_HEADER_LEN..].copy_from_slice(&[4, 0, 0]);
        assert_eq!(classify(&d), DatagramKind::A2a);
        assert_eq!(parse_relay_data(&d), Some((0x0102_0304, &[4u8, 0, 0][..])));
        assert_eq!(
            parse_relay_data(&d[..RELAY_HEADER_LEN]),
            None,
            "empty payload"
        );
        assert_eq!(A2aDatagram::decode(&d), None, "not a control datagram");
        assert!(!is_disco(&d));
        assert!(is_disco(&[A2A_MAGIC, KIND_DISCO, 0]));
    }

    #[test]
    fn malformed_a2a_datagrams_are_refused() {
        assert_eq!(
            A2aDatagram::decode(&[0xA2, 9, 0, 0, 0, 0, 0, 0, 0, 0]),
            None
        );
        let mut long = vec![0xA2, 1];
        long.extend_from_slice(&[0; 9]);
        assert_eq!(A2aDatagram::decode(&long), None);
        let mut bad_family = vec![0xA2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        bad_family.extend_from_slice(&[0; 6]);
        assert_eq!(A2aDatagram::decode(&bad_family), None);
    }
}
