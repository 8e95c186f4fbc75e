//! What coordinators of one cluster tell each other over NATS (see README, *A coordinator
//! cluster on NATS*): the sealed envelope every message travels in, the messages themselves,
//! and the subjects they are published on. Free of I/O.
//!
//! Envelope: `"a2c1" | sender instance (16) | sequence (u64 BE) | sent at (u64 BE, Unix ms) |
//! kind (u8) | ciphertext and tag`. The 37-byte header and the subject are authenticated as
//! associated data; the body is sealed with XChaCha20-Poly1305 under the cluster key (derived
//! from the coordinator's private key, which every coordinator of the cluster holds), with the
//! nonce `instance | sequence`. Kind [`KIND_MSG`] bodies are JSON ([`ClusterMsg`]); kind
//! [`KIND_RELAY`] is relay data: `source relay id (u32 BE) | destination relay id (u32 BE) |
//! datagram`; kind [`KIND_RELAY_BATCH`] is several relay datagrams in one envelope:
//! `(source (u32 BE) | destination (u32 BE) | length (u16 BE) | datagram)*`.
//!
//! A *bridge* is a direct TCP connection from one coordinator to another that carries relay
//! envelopes only, bypassing the NATS servers: the dialer writes [`BRIDGE_MAGIC`], the other
//! answers one [`KIND_BRIDGE_HELLO`] envelope on [`subject_bridge`] (which names its instance),
//! then the dialer writes envelopes, each framed as `length (u32 BE) | envelope`.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::invite::{InviteId, InviteProof};
use crate::keys::{NetworkId, NodeKey, SignerId};
use crate::record::SignedRecord;
use crate::sealed::Sealed;

pub const MAGIC: &[u8; 4] = b"a2c1";
/// Bytes before the ciphertext.
pub const HEADER_LEN: usize = 4 + 16 + 8 + 8 + 1;
const TAG_LEN: usize = 16;
/// A JSON [`ClusterMsg`].
pub const KIND_MSG: u8 = 0;
/// Relay data: `source | destination | datagram`.
pub const KIND_RELAY: u8 = 1;
/// Several relay datagrams: `(source | destination | length (u16) | datagram)*`.
pub const KIND_RELAY_BATCH: u8 = 2;
/// A bridge's hello: the answering coordinator's instance is the header's sender; no body.
pub const KIND_BRIDGE_HELLO: u8 = 3;
/// What a bridge's dialer writes first. Its first byte can never start a node's control
/// connection (a Noise frame's 2-byte length, at most 65 535 and far less for a handshake).
pub const BRIDGE_MAGIC: &[u8; 8] = b"a2abrg1\n";
/// Bytes a datagram takes in a batch besides itself.
pub const BATCH_ENTRY_OVERHEAD: usize = 4 + 4 + 2;
/// The largest envelope accepted (NATS' default max_payload is 1 MiB).
pub const MAX_ENVELOPE: usize = 1024 * 1024;

/// One running coordinator: random at every start, so a restart is a new instance.
pub type Instance = [u8; 16];

/// One member as a coordinator announces it: its network, its signed record and the relay id
/// the announcing coordinator gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub network: NetworkId,
    pub record: SignedRecord,
    pub relay_id: u32,
}

/// One member gone, as its coordinator announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gone {
    pub network: NetworkId,
    pub node_key: NodeKey,
}

/// Coordinator to coordinator (kind [`KIND_MSG`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClusterMsg {
    /// Presence, every couple of seconds, on the cluster's subject: how many members the sender
    /// holds and the XOR of their [`member_digest`]s.
    Alive {
        members: u32,
        #[serde(with = "hex16")]
        digest: [u8; 16],
    },
    /// Members the sender now holds (registered, or a newer record).
    Up { entries: Vec<Entry> },
    /// Members the sender no longer holds (left, failed, expired).
    Down { gone: Vec<Gone> },
    /// "I (re)started, or my view of you is off: send me what you hold" (on the cluster's
    /// subject: everyone answers; on one coordinator's: that one answers).
    Sync,
    /// An answer to [`ClusterMsg::Sync`], on the asker's subject: part of what the sender holds;
    /// `last` closes it, and what the sender held before and did not name is gone.
    Snapshot { entries: Vec<Entry>, last: bool },
    /// Membership changes a member of the sender made, or (on the asker's subject, before a
    /// [`ClusterMsg::Snapshot`]) what the sender keeps: signed by the network key, so every
    /// coordinator checks each as if its own member had sent it (see [`Change`]).
    Changes { changes: Vec<Change> },
    /// A newcomer on the sender redeems an invite the sender does not know (on the cluster's
    /// subject): the coordinator whose member made it passes it to that member, answers
    /// [`ClusterMsg::RedeemHeld`] at once and [`ClusterMsg::RedeemAnswer`] when the member
    /// decides. `ticket` names the redemption on the sender; `node_key` is the key the
    /// sender's control channel authenticated.
    Redeem {
        ticket: u32,
        invite: InviteId,
        node_key: NodeKey,
        signing_key: SignerId,
        proof: InviteProof,
    },
    /// "The member that made this invite is mine and was asked" (on the asker's subject).
    RedeemHeld { ticket: u32 },
    /// The inviter's answer (on the asker's subject): the sealed member certificate if it
    /// admitted the newcomer, else why not.
    RedeemAnswer {
        ticket: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        admitted: Option<Sealed>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        refused: String,
    },
    /// A member of the sender is probing `to` (a member the receiver holds) for a direct path.
    Punch {
        network: NetworkId,
        from: NodeKey,
        to: NodeKey,
    },
}

/// One membership change of a network, signed by its network key (the coordinator can check
/// it, not make it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Change {
    /// A node removed (`a2actl kick`): every coordinator keeps it for members that register
    /// later, tells its members, ends the node's connection if it holds it and refuses the
    /// key from then on.
    Revoke {
        network: NetworkId,
        revocation: crate::signed::Signed,
    },
    /// The network moved to a new secret (`a2actl token rotate`): kept for members that
    /// register later, passed to the members.
    Moved {
        network: NetworkId,
        notice: crate::signed::Signed,
    },
    /// A policy or tag statement: kept if newer than held, passed to the members.
    Statement {
        network: NetworkId,
        signed: crate::signed::Signed,
    },
}

impl Change {
    pub fn network(&self) -> &NetworkId {
        match self {
            Change::Revoke { network, .. }
            | Change::Moved { network, .. }
            | Change::Statement { network, .. } => network,
        }
    }
}

/// Changes per [`ClusterMsg::Changes`] message when a snapshot carries what a coordinator
/// keeps (a revocation or notice is well under a kilobyte, a policy a few).
pub const CHANGES_PER_MSG: usize = 64;

/// Entries per [`ClusterMsg::Snapshot`] or [`ClusterMsg::Up`] message (records are at most a
/// few kilobytes: far below NATS' payload limit).
pub const ENTRIES_PER_MSG: usize = 256;

/// What one member adds to a presence digest: 16 bytes of SHA-256(network ‖ key ‖ issued_ms).
pub fn member_digest(network: &NetworkId, key: &NodeKey, issued_ms: u64) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"a2a cluster member v1");
    h.update(network.0);
    h.update(key.0);
    h.update(issued_ms.to_be_bytes());
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

/// XORs `b` into `a` (a digest is the XOR of its members').
pub fn xor_into(a: &mut [u8; 16], b: &[u8; 16]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= y;
    }
}

/// A cluster's name on NATS: 16 hex digits derived from the coordinator public key.
pub fn cluster_id(coordinator_public: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(b"a2a cluster id v1");
    h.update(coordinator_public);
    data_encoding::HEXLOWER.encode(&h.finalize()[..8])
}

/// The subject every coordinator of cluster `cid` subscribes to.
pub fn subject_all(cid: &str) -> String {
    format!("a2a.{cid}.all")
}

/// The subject of one coordinator instance.
pub fn subject_to(cid: &str, instance: &Instance) -> String {
    format!("a2a.{cid}.to.{}", data_encoding::HEXLOWER.encode(instance))
}

/// The subject a bridge's hello is sealed for (never published on NATS).
pub fn subject_bridge(cid: &str) -> String {
    format!("a2a.{cid}.bridge")
}

/// The header of an opened envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub sender: Instance,
    pub seq: u64,
    pub sent_ms: u64,
    pub kind: u8,
}

/// Why an envelope did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Too short, too long or not an a2a cluster envelope.
    Malformed,
    /// The seal does not open: not sealed with this cluster's key, or changed on the way.
    BadSeal,
}

/// The cluster key: seals and opens envelopes.
pub struct ClusterKey(XChaCha20Poly1305);

impl ClusterKey {
    /// Derived from the coordinator's private key (the cluster's shared identity).
    pub fn derive(coordinator_private: &[u8; 32]) -> Self {
        let hk = Hkdf::<Sha256>::new(None, coordinator_private);
        let mut key = [0u8; 32];
        hk.expand(b"a2a cluster seal v1", &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 length");
        ClusterKey(XChaCha20Poly1305::new(Key::from_slice(&key)))
    }

    /// Seals `body` of `kind` for `subject`.
    pub fn seal(&self, subject: &str, header: Header, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&header.sender);
        out.extend_from_slice(&header.seq.to_be_bytes());
        out.extend_from_slice(&header.sent_ms.to_be_bytes());
        out.push(header.kind);
        out.extend_from_slice(body);
        let (head, rest) = out.split_at_mut(HEADER_LEN);
        let tag = self
            .0
            .encrypt_in_place_detached(&nonce(&header), &aad(head, subject), rest)
            .expect("XChaCha20-Poly1305 seals any length used here");
        out.extend_from_slice(&tag);
        out
    }

    /// Opens an envelope received on `subject`: its header and plaintext body.
    pub fn open(&self, subject: &str, envelope: &[u8]) -> Result<(Header, Vec<u8>), OpenError> {
        if envelope.len() < HEADER_LEN + TAG_LEN
            || envelope.len() > MAX_ENVELOPE
            || &envelope[..4] != MAGIC
        {
            return Err(OpenError::Malformed);
        }
        let head = &envelope[..HEADER_LEN];
        let header = Header {
            sender: head[4..20].try_into().expect("16 bytes"),
            seq: u64::from_be_bytes(head[20..28].try_into().expect("8 bytes")),
            sent_ms: u64::from_be_bytes(head[28..36].try_into().expect("8 bytes")),
            kind: head[36],
        };
        let (body, tag) = envelope[HEADER_LEN..].split_at(envelope.len() - HEADER_LEN - TAG_LEN);
        let mut plain = body.to_vec();
        self.0
            .decrypt_in_place_detached(
                &nonce(&header),
                &aad(head, subject),
                &mut plain,
                chacha20poly1305::Tag::from_slice(tag),
            )
            .map_err(|_| OpenError::BadSeal)?;
        Ok((header, plain))
    }
}

fn nonce(h: &Header) -> XNonce {
    let mut n = [0u8; 24];
    n[..16].copy_from_slice(&h.sender);
    n[16..].copy_from_slice(&h.seq.to_be_bytes());
    *XNonce::from_slice(&n)
}

fn aad(head: &[u8], subject: &str) -> Vec<u8> {
    let mut a = head.to_vec();
    a.extend_from_slice(subject.as_bytes());
    a
}

/// A relay body: `source | destination | datagram`.
pub fn relay_body(src: u32, dst: u32, datagram: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + datagram.len());
    b.extend_from_slice(&src.to_be_bytes());
    b.extend_from_slice(&dst.to_be_bytes());
    b.extend_from_slice(datagram);
    b
}

/// Reads a relay body: source, destination, datagram.
pub fn parse_relay(body: &[u8]) -> Option<(u32, u32, &[u8])> {
    let (ids, datagram) = body.split_at_checked(8)?;
    let src = u32::from_be_bytes(ids[..4].try_into().ok()?);
    let dst = u32::from_be_bytes(ids[4..].try_into().ok()?);
    Some((src, dst, datagram))
}

/// Appends one datagram to a relay batch body (`datagram` at most `u16::MAX` bytes; longer
/// ones are cut there, which no WireGuard datagram is).
pub fn push_relay_batch(body: &mut Vec<u8>, src: u32, dst: u32, datagram: &[u8]) {
    let datagram = &datagram[..datagram.len().min(u16::MAX as usize)];
    body.extend_from_slice(&src.to_be_bytes());
    body.extend_from_slice(&dst.to_be_bytes());
    body.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
    body.extend_from_slice(datagram);
}

/// Reads a relay batch body: each `(source, destination, datagram)`, in order. `None` if any
/// entry is cut short, empty, or the batch holds none.
pub fn parse_relay_batch(mut body: &[u8]) -> Option<Vec<(u32, u32, &[u8])>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let (head, rest) = body.split_at_checked(BATCH_ENTRY_OVERHEAD)?;
        let src = u32::from_be_bytes(head[..4].try_into().ok()?);
        let dst = u32::from_be_bytes(head[4..8].try_into().ok()?);
        let len = u16::from_be_bytes(head[8..].try_into().ok()?) as usize;
        if len == 0 {
            return None;
        }
        let (datagram, rest) = rest.split_at_checked(len)?;
        out.push((src, dst, datagram));
        body = rest;
    }
    (!out.is_empty()).then_some(out)
}

mod hex16 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&data_encoding::HEXLOWER.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        data_encoding::HEXLOWER
            .decode(s.as_bytes())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("a digest is 32 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_batches_round_trip_and_refuse_cut_or_empty_entries() {
        let mut b = Vec::new();
        push_relay_batch(&mut b, 1, 2, &[9; 100]);
        push_relay_batch(&mut b, 3, 4, &[8; 1]);
        assert_eq!(b.len(), 2 * BATCH_ENTRY_OVERHEAD + 101);
        assert_eq!(
            parse_relay_batch(&b),
            Some(vec![(1, 2, &[9u8; 100][..]), (3, 4, &[8u8][..])])
        );
        for cut in 1..b.len() {
            if cut == BATCH_ENTRY_OVERHEAD + 100 {
                continue; // a whole first entry
            }
            assert_eq!(parse_relay_batch(&b[..cut]), None, "cut at {cut}");
        }
        assert_eq!(parse_relay_batch(&[]), None);
        let mut empty = Vec::new();
        push_relay_batch(&mut empty, 1, 2, &[]);
        assert_eq!(parse_relay_batch(&empty), None);
    }

    fn header(seq: u64) -> Header {
        Header {
            sender: [7; 16],
            seq,
            sent_ms: 1_700_000_000_000,
            kind: KIND_MSG,
        }
    }

    #[test]
    fn an_envelope_opens_under_the_same_key_and_subject_only() {
        let k = ClusterKey::derive(&[1; 32]);
        let e = k.seal("a2a.x.all", header(3), b"{\"type\":\"sync\"}");
        let (h, body) = k.open("a2a.x.all", &e).unwrap();
        assert_eq!(h, header(3));
        assert_eq!(body, b"{\"type\":\"sync\"}");
        // Another cluster's key, another subject, a changed byte anywhere: refused.
        assert_eq!(
            ClusterKey::derive(&[2; 32]).open("a2a.x.all", &e),
            Err(OpenError::BadSeal)
        );
        assert_eq!(k.open("a2a.x.to.00", &e), Err(OpenError::BadSeal));
        for i in 4..e.len() {
            let mut bad = e.clone();
            bad[i] ^= 1;
            assert_eq!(
                k.open("a2a.x.all", &bad),
                Err(OpenError::BadSeal),
                "byte {i}"
            );
        }
        assert_eq!(k.open("a2a.x.all", &e[..20]), Err(OpenError::Malformed));
        let mut foreign = e.clone();
        foreign[0] = b'x';
        assert_eq!(k.open("a2a.x.all", &foreign), Err(OpenError::Malformed));
    }

    #[test]
    fn messages_and_relay_bodies_round_trip() {
        let m = ClusterMsg::Alive {
            members: 3,
            digest: [0xab; 16],
        };
        let s = serde_json::to_string(&m).unwrap();
        assert!(s.contains("\"type\":\"alive\""), "{s}");
        assert_eq!(serde_json::from_str::<ClusterMsg>(&s).unwrap(), m);
        let b = relay_body(5, 0x8000_0001, b"wg");
        assert_eq!(parse_relay(&b), Some((5, 0x8000_0001, &b"wg"[..])));
        assert_eq!(parse_relay(&b[..7]), None);
    }

    #[test]
    fn digests_cancel_out_when_a_member_goes() {
        let n = NetworkId([1; 32]);
        let mut d = [0u8; 16];
        let a = member_digest(&n, &NodeKey([2; 32]), 10);
        let b = member_digest(&n, &NodeKey([3; 32]), 10);
        xor_into(&mut d, &a);
        xor_into(&mut d, &b);
        xor_into(&mut d, &a);
        assert_eq!(d, b);
        assert_ne!(a, member_digest(&n, &NodeKey([2; 32]), 11));
        assert_eq!(cluster_id(&[9; 32]).len(), 16);
        assert_eq!(
            subject_to("ab", &[0; 16]),
            "a2a.ab.to.00000000000000000000000000000000"
        );
    }
}
