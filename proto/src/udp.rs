//! One UDP socket carries WireGuard and a2a's own datagrams; the first byte tells them apart.
//!
//! WireGuard messages start with type 1-4 followed by three zero bytes. a2a's own datagrams start
//! with [`A2A_MAGIC`] (0xA2), a value WireGuard never uses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const A2A_MAGIC: u8 = 0xA2;
const KIND_ENDPOINT_PROBE: u8 = 0x01;
const KIND_ENDPOINT_REPLY: u8 = 0x02;

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
    /// Coordinator to node: the source address the probe came from.
    EndpointReply {
        nonce: [u8; 8],
        observed: SocketAddr,
    },
}

/// Largest encoded [`A2aDatagram`].
pub const MAX_A2A_DATAGRAM: usize = 2 + 8 + 1 + 16 + 2;

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
                let mut at = 10;
                match observed.ip() {
                    IpAddr::V4(ip) => {
                        out[at] = 4;
                        out[at + 1..at + 5].copy_from_slice(&ip.octets());
                        at += 5;
                    }
                    IpAddr::V6(ip) => {
                        out[at] = 6;
                        out[at + 1..at + 17].copy_from_slice(&ip.octets());
                        at += 17;
                    }
                }
                out[at..at + 2].copy_from_slice(&observed.port().to_be_bytes());
                at + 2
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
            KIND_ENDPOINT_REPLY => {
                let (ip, rest): (IpAddr, &[u8]) = match d.get(10)? {
                    4 if d.len() == 10 + 1 + 4 + 2 => {
                        let o: [u8; 4] = d[11..15].try_into().ok()?;
                        (Ipv4Addr::from(o).into(), &d[15..])
                    }
                    6 if d.len() == 10 + 1 + 16 + 2 => {
                        let o: [u8; 16] = d[11..27].try_into().ok()?;
                        (Ipv6Addr::from(o).into(), &d[27..])
                    }
                    _ => return None,
                };
                let port = u16::from_be_bytes([rest[0], rest[1]]);
                Some(A2aDatagram::EndpointReply {
                    nonce,
                    observed: SocketAddr::new(ip, port),
                })
            }
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
