//! Disco: the authenticated probes two nodes exchange to find and hold a direct path.
//!
//! A probe travels on the WireGuard UDP socket (first bytes `A2 10`), directly or inside relay
//! data. It is sealed with XChaCha20-Poly1305 under a key both ends derive from their X25519
//! node keys (the WireGuard keys): `HKDF-SHA256(ikm = DH(own, peer), info = "a2a disco v1")`.
//! Only the two nodes can make or read it, so an off-path sender cannot forge one.
//!
//! ```text
//! A2 10 | sender node key (32) | nonce (24) | sealed { kind (1) | tx id (12) | [observed addr] } | tag (16)
//! ```
//!
//! A ping carries a random transaction id; the pong echoes it and says which address the ping
//! came from. A pong only counts if it answers a ping still outstanding to the address it came
//! from (the caller checks), so a replayed pong or ping cannot move a node's endpoint.

use std::net::SocketAddr;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::keys::NodeKey;
use crate::udp::{decode_addr, encode_addr, A2A_MAGIC, KIND_DISCO};

const INFO: &[u8] = b"a2a disco v1";
const HEADER_LEN: usize = 2 + 32 + 24;
const TAG_LEN: usize = 16;
const KIND_PING: u8 = 1;
const KIND_PONG: u8 = 2;
/// Largest plaintext (a pong carrying an IPv6 address).
pub const MAX_BODY_LEN: usize = 1 + 12 + 19;
/// Largest sealed disco datagram.
pub const MAX_DISCO_LEN: usize = HEADER_LEN + MAX_BODY_LEN + TAG_LEN;

/// A transaction id: pairs a pong with its ping.
pub type TxId = [u8; 12];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoMsg {
    Ping {
        tx: TxId,
    },
    /// `observed`: the address the ping arrived from, as the pinged node saw it.
    Pong {
        tx: TxId,
        observed: SocketAddr,
    },
}

/// The symmetric key two nodes share for disco.
#[derive(Clone)]
pub struct DiscoKey(XChaCha20Poly1305);

impl DiscoKey {
    pub fn derive(own: &StaticSecret, peer: &NodeKey) -> Self {
        let shared = own.diffie_hellman(&PublicKey::from(peer.0));
        let mut key = [0u8; 32];
        Hkdf::<Sha256>::new(None, shared.as_bytes())
            .expand(INFO, &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 length");
        DiscoKey(XChaCha20Poly1305::new(&key.into()))
    }

    /// Seals `msg` from `sender` into `out`; returns the datagram length.
    pub fn seal(&self, sender: &NodeKey, msg: &DiscoMsg, out: &mut [u8; MAX_DISCO_LEN]) -> usize {
        out[0] = A2A_MAGIC;
        out[1] = KIND_DISCO;
        out[2..34].copy_from_slice(&sender.0);
        let nonce: [u8; 24] = rand::random();
        out[34..HEADER_LEN].copy_from_slice(&nonce);
        let (aad, body) = out.split_at_mut(HEADER_LEN);
        let aad = &aad[..34];
        let len = encode_body(msg, body);
        let (plain, rest) = body.split_at_mut(len);
        let tag = self
            .0
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), aad, plain)
            .expect("disco messages are far below the AEAD length limit");
        rest[..TAG_LEN].copy_from_slice(&tag);
        HEADER_LEN + len + TAG_LEN
    }

    /// Opens a datagram sealed by [`seal`](Self::seal); `None` if it is malformed, forged, or
    /// sealed under another key.
    pub fn open(&self, d: &[u8]) -> Option<DiscoMsg> {
        if d.len() < HEADER_LEN + 13 + TAG_LEN
            || d.len() > MAX_DISCO_LEN
            || d[..2] != [A2A_MAGIC, KIND_DISCO]
        {
            return None;
        }
        let nonce = XNonce::from_slice(&d[34..HEADER_LEN]);
        let (aad, _) = d.split_at(34);
        let (sealed, tag) = d[HEADER_LEN..].split_at(d.len() - HEADER_LEN - TAG_LEN);
        let mut plain = [0u8; MAX_BODY_LEN];
        let plain = &mut plain[..sealed.len()];
        plain.copy_from_slice(sealed);
        self.0
            .decrypt_in_place_detached(nonce, aad, plain, tag.into())
            .ok()?;
        decode_body(plain)
    }
}

/// Writes the plaintext of `msg` (`kind | tx id | [observed addr]`) into `out`; returns its
/// length (at most [`MAX_BODY_LEN`]).
pub fn encode_body(msg: &DiscoMsg, out: &mut [u8]) -> usize {
    match msg {
        DiscoMsg::Ping { tx } => {
            out[0] = KIND_PING;
            out[1..13].copy_from_slice(tx);
            13
        }
        DiscoMsg::Pong { tx, observed } => {
            out[0] = KIND_PONG;
            out[1..13].copy_from_slice(tx);
            13 + encode_addr(observed, &mut out[13..])
        }
    }
}

/// Parses an opened plaintext written by [`encode_body`]; `None` for anything else.
pub fn decode_body(plain: &[u8]) -> Option<DiscoMsg> {
    let tx: TxId = plain.get(1..13)?.try_into().ok()?;
    match (plain[0], plain.len()) {
        (KIND_PING, 13) => Some(DiscoMsg::Ping { tx }),
        (KIND_PONG, _) => Some(DiscoMsg::Pong {
            tx,
            observed: decode_addr(&plain[13..])?,
        }),
        _ => None,
    }
}

/// The sender key a disco datagram claims (unauthenticated until [`DiscoKey::open`] succeeds).
pub fn claimed_sender(d: &[u8]) -> Option<NodeKey> {
    if d.len() < HEADER_LEN || d[..2] != [A2A_MAGIC, KIND_DISCO] {
        return None;
    }
    Some(NodeKey(d[2..34].try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(n: u8) -> (StaticSecret, NodeKey) {
        let s = StaticSecret::from([n; 32]);
        let p = PublicKey::from(&s);
        (s, NodeKey(p.to_bytes()))
    }

    #[test]
    fn both_ends_derive_the_same_key_and_messages_round_trip() {
        let (a, a_pub) = pair(1);
        let (b, b_pub) = pair(2);
        let ab = DiscoKey::derive(&a, &b_pub);
        let ba = DiscoKey::derive(&b, &a_pub);
        let mut buf = [0u8; MAX_DISCO_LEN];
        for msg in [
            DiscoMsg::Ping { tx: [7; 12] },
            DiscoMsg::Pong {
                tx: [8; 12],
                observed: "198.51.100.4:40000".parse().unwrap(),
            },
            DiscoMsg::Pong {
                tx: [9; 12],
                observed: "[2001:db8::1]:51820".parse().unwrap(),
            },
        ] {
            let n = ab.seal(&a_pub, &msg, &mut buf);
            assert!(crate::udp::is_disco(&buf[..n]));
            assert_eq!(claimed_sender(&buf[..n]), Some(a_pub));
            assert_eq!(ba.open(&buf[..n]), Some(msg));
            for cut in 0..n {
                assert_eq!(ba.open(&buf[..cut]), None);
            }
        }
    }

    #[test]
    fn bodies_round_trip_and_malformed_ones_are_refused() {
        let mut buf = [0u8; MAX_BODY_LEN];
        for msg in [
            DiscoMsg::Ping { tx: [1; 12] },
            DiscoMsg::Pong {
                tx: [2; 12],
                observed: "[2001:db8::1]:51820".parse().unwrap(),
            },
        ] {
            let n = encode_body(&msg, &mut buf);
            assert_eq!(decode_body(&buf[..n]), Some(msg));
            for cut in 0..n {
                assert_eq!(decode_body(&buf[..cut]), None);
            }
        }
        let mut long_ping = [0u8; 14];
        long_ping[0] = KIND_PING;
        assert_eq!(decode_body(&long_ping), None);
        let mut other_kind = [0u8; 13];
        other_kind[0] = 3;
        assert_eq!(decode_body(&other_kind), None);
    }

    #[test]
    fn forged_or_tampered_probes_do_not_open() {
        let (a, a_pub) = pair(1);
        let (b, b_pub) = pair(2);
        let (m, _) = pair(3);
        let ba = DiscoKey::derive(&b, &a_pub);
        let mut buf = [0u8; MAX_DISCO_LEN];
        // A third node claiming to be `a` cannot make a probe `b` accepts.
        let forged = DiscoKey::derive(&m, &b_pub);
        let n = forged.seal(&a_pub, &DiscoMsg::Ping { tx: [1; 12] }, &mut buf);
        assert_eq!(ba.open(&buf[..n]), None);
        // Any flipped bit of a genuine probe is refused.
        let ab = DiscoKey::derive(&a, &b_pub);
        let n = ab.seal(&a_pub, &DiscoMsg::Ping { tx: [1; 12] }, &mut buf);
        for i in 0..n {
            let mut t = buf;
            t[i] ^= 0x10;
            assert_eq!(ba.open(&t[..n]), None, "bit flipped at byte {i}");
        }
    }
}
