//! Invite codes: let a new machine join without handing it the network secret.
//!
//! A member that holds the secret makes a random 16-byte invite secret `s` and keeps, in memory,
//! how many uses and how long it has left. The code it prints carries `s`, the coordinator's key
//! and endpoints, nothing else. From `s` both ends derive (HKDF-SHA256):
//! - the invite id, which the inviter announces to the coordinator so redemptions reach it;
//! - the proof a redeemer sends for its node key (so the coordinator, which sees the id but not
//!   `s`, cannot redeem the invite for a key of its own);
//! - the key that seals the inviter's answer (member certificate, network id, prefix), so the
//!   coordinator can neither read nor replace it.
//!
//! The inviter counts uses under a lock and checks the expiry itself: concurrent redemptions
//! of a one-time code admit exactly one node, whatever the coordinator does.
//!
//! Layout (before base32): `version(1) | secret(16) | coordinator_key(32) | endpoint_count(1) |
//! (len(1) | utf8 "host:port")* | check(4)`; the string is `a2ai` and lowercase unpadded base32.

use chacha20poly1305::aead::KeyInit;
use chacha20poly1305::XChaCha20Poly1305;
use hkdf::Hkdf;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{base64_newtype, secret_newtype, NetworkId, NodeKey, SignerId};
use crate::sealed::Sealed;
use crate::signed::Signed;
use crate::token::{base32, encode_checked, encoded_len, validate_endpoint, MAX_ENDPOINTS};

/// The printable prefix of every invite code.
pub const INVITE_PREFIX: &str = "a2ai";
const VERSION: u8 = 1;
const CHECK_LEN: usize = 4;
const FIXED_LEN: usize = 1 + 16 + 32 + 1;

/// Why an invite code was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteError {
    #[error("invite code does not start with \"a2ai\": pass the code printed by `a2actl invite`")]
    WrongPrefix,
    #[error("invite code has an invalid character {0:?} at position {1}: it holds only letters a-z and digits 2-7 after \"a2ai\"")]
    BadCharacter(char, usize),
    #[error("invite code is truncated: expected at least {expected} characters, got {got}")]
    Truncated { expected: usize, got: usize },
    #[error("invite code is corrupted: its checksum does not match; copy it again")]
    Checksum,
    #[error("invite code version {0} is not supported by this a2a; upgrade a2a")]
    UnsupportedVersion(u8),
    #[error("invite code carries an invalid coordinator endpoint: {0}")]
    BadEndpoint(String),
}

/// A parsed invite code.
#[derive(Clone, PartialEq, Eq)]
pub struct InviteCode {
    pub secret: [u8; 16],
    pub coordinator_key: [u8; 32],
    pub endpoints: Vec<String>,
}

impl std::fmt::Debug for InviteCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InviteCode")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// The id of an invite, as the coordinator knows it: 16 bytes derived from the invite secret,
/// 32 lowercase hex digits on the wire. `Debug` does not print it (the coordinator must not).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct InviteId(pub [u8; 16]);

impl InviteId {
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// The one spelling: 32 lowercase hex digits.
    pub fn from_hex(text: &str) -> Option<InviteId> {
        if text.len() != 32 {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, pair) in text.as_bytes().chunks(2).enumerate() {
            let digit = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            id[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(InviteId(id))
    }
}

impl std::fmt::Debug for InviteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InviteId(..)")
    }
}

impl Serialize for InviteId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for InviteId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        InviteId::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("invite id must be 32 lowercase hex digits"))
    }
}

/// A redeemer's proof that it holds the invite secret, bound to its node key and signing key
/// (32 bytes, base64 on the wire). Compared in constant time.
#[derive(Clone, Copy)]
pub struct InviteProof(pub [u8; 32]);
base64_newtype!(InviteProof, 32, "an invite proof");
secret_newtype!(InviteProof);

fn derive(secret: &[u8; 16], info: &[u8], out: &mut [u8]) {
    Hkdf::<Sha256>::new(Some(b"a2a invite v1"), secret)
        .expand(info, out)
        .expect("HKDF-SHA256 output length is small");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl InviteCode {
    /// Whether `text` looks like an invite code rather than a join token.
    pub fn is_invite(text: &str) -> bool {
        text.trim()
            .get(..INVITE_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(INVITE_PREFIX))
    }

    pub fn id(&self) -> InviteId {
        let mut id = [0u8; 16];
        derive(&self.secret, b"id", &mut id);
        InviteId(id)
    }

    /// The redeemer's proof for `node_key` and its record signing key. (The signing key enters
    /// the derivation as its base64 text, as it did when it crossed as a string.)
    pub fn proof(&self, node_key: &NodeKey, signing_key: &SignerId) -> InviteProof {
        let mut info = b"proof".to_vec();
        info.extend_from_slice(&node_key.0);
        info.extend_from_slice(signing_key.to_base64().as_bytes());
        let mut p = [0u8; 32];
        derive(&self.secret, &info, &mut p);
        InviteProof(p)
    }

    fn cipher(&self, node_key: &NodeKey) -> XChaCha20Poly1305 {
        let mut info = b"answer".to_vec();
        info.extend_from_slice(&node_key.0);
        let mut k = [0u8; 32];
        derive(&self.secret, &info, &mut k);
        XChaCha20Poly1305::new(&k.into())
    }

    /// Seals the inviter's answer to the redeemer `node_key` (the invite id, as hex, is
    /// authenticated with it).
    pub fn seal_answer(&self, node_key: &NodeKey, answer: &InviteAnswer) -> Sealed {
        let plain = serde_json::to_vec(answer).expect("an answer always serialises");
        Sealed::seal(
            &self.cipher(node_key),
            &plain,
            self.id().to_hex().as_bytes(),
        )
    }

    /// Opens an answer sealed with [`seal_answer`](Self::seal_answer); `None` if it was not.
    pub fn open_answer(&self, node_key: &NodeKey, sealed: &Sealed) -> Option<InviteAnswer> {
        let plain = sealed.open(&self.cipher(node_key), self.id().to_hex().as_bytes())?;
        serde_json::from_slice(&plain).ok()
    }

    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(FIXED_LEN - 1);
        bytes.push(VERSION);
        bytes.extend_from_slice(&self.secret);
        bytes.extend_from_slice(&self.coordinator_key);
        encode_checked(INVITE_PREFIX, bytes, &self.endpoints)
    }

    pub fn parse(text: &str) -> Result<Self, InviteError> {
        let text = text.trim();
        let body = match text.get(..INVITE_PREFIX.len()) {
            Some(p) if p.eq_ignore_ascii_case(INVITE_PREFIX) => &text[INVITE_PREFIX.len()..],
            _ => return Err(InviteError::WrongPrefix),
        };
        if let Some((i, c)) = body
            .char_indices()
            .find(|(_, c)| !matches!(c, 'a'..='z' | 'A'..='Z' | '2'..='7'))
        {
            return Err(InviteError::BadCharacter(c, INVITE_PREFIX.len() + i));
        }
        let got = text.len();
        let need = |n: usize| InviteError::Truncated {
            expected: INVITE_PREFIX.len() + encoded_len(n),
            got,
        };
        let bytes = match base32(true).decode(body.as_bytes()) {
            Ok(b) => b,
            Err(_) => match base32(false).decode(body.as_bytes()) {
                Ok(_) => return Err(InviteError::Checksum),
                Err(_) => return Err(need(body.len() * 5 / 8 + 1)),
            },
        };
        if bytes.len() < FIXED_LEN + CHECK_LEN {
            return Err(need(FIXED_LEN + CHECK_LEN));
        }
        if bytes[0] != VERSION {
            return Err(InviteError::UnsupportedVersion(bytes[0]));
        }
        let count = bytes[FIXED_LEN - 1] as usize;
        let mut at = FIXED_LEN;
        let mut endpoints = Vec::with_capacity(count.min(MAX_ENDPOINTS));
        for _ in 0..count {
            let Some(&len) = bytes.get(at) else {
                return Err(need(at + 1 + CHECK_LEN));
            };
            let end = at + 1 + len as usize;
            if end + CHECK_LEN > bytes.len() {
                return Err(need(end + CHECK_LEN));
            }
            endpoints.push(bytes[at + 1..end].to_vec());
            at = end;
        }
        if at + CHECK_LEN != bytes.len() {
            // Longer than its contents: the checksum decides whether it was changed.
            return Err(InviteError::Checksum);
        }
        if Sha256::digest(&bytes[..at])[..CHECK_LEN] != bytes[at..] {
            return Err(InviteError::Checksum);
        }
        if count == 0 || count > MAX_ENDPOINTS {
            return Err(InviteError::BadEndpoint(format!(
                "{count} endpoints (1 to {MAX_ENDPOINTS})"
            )));
        }
        let endpoints = endpoints
            .into_iter()
            .map(|e| {
                let e = String::from_utf8(e)
                    .map_err(|_| InviteError::BadEndpoint("not UTF-8".into()))?;
                validate_endpoint(&e).map_err(InviteError::BadEndpoint)?;
                Ok(e)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(InviteCode {
            secret: bytes[1..17].try_into().expect("16 bytes"),
            coordinator_key: bytes[17..49].try_into().expect("32 bytes"),
            endpoints,
        })
    }
}

/// The inviter's answer to a redemption, sealed to the redeemer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum InviteAnswer {
    Admitted {
        network: NetworkId,
        prefix: Ipv4Net,
        cert: Signed,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> InviteCode {
        InviteCode {
            secret: [7; 16],
            coordinator_key: [9; 32],
            endpoints: vec!["198.51.100.1:7000".into()],
        }
    }

    #[test]
    fn round_trips_and_is_shorter_than_a_token() {
        let c = sample();
        let text = c.encode();
        assert!(text.starts_with("a2ai"));
        assert!(InviteCode::is_invite(&text));
        assert_eq!(InviteCode::parse(&text).unwrap(), c);
        assert_eq!(InviteCode::parse(&text.to_uppercase()).unwrap(), c);
        // A token for the same coordinator is 153 characters.
        assert!(text.len() <= 120, "{}", text.len());
    }

    #[test]
    fn damaged_codes_are_refused_by_name() {
        let text = sample().encode();
        for cut in 0..text.len() {
            assert!(InviteCode::parse(&text[..cut]).is_err(), "cut at {cut}");
        }
        let mut changed = text.clone().into_bytes();
        let i = changed.len() - 10;
        changed[i] = if changed[i] == b'a' { b'b' } else { b'a' };
        let changed = String::from_utf8(changed).unwrap();
        assert_eq!(InviteCode::parse(&changed), Err(InviteError::Checksum));
        assert_eq!(InviteCode::parse("a2a1abc"), Err(InviteError::WrongPrefix));
        assert!(matches!(
            InviteCode::parse(&format!("{text}!")),
            Err(InviteError::BadCharacter('!', _))
        ));
    }

    #[test]
    fn answers_open_only_for_their_redeemer() {
        let c = sample();
        let answer = InviteAnswer::Admitted {
            network: crate::NetworkKey::derive(&[1; 32]).id(),
            prefix: "100.64.0.0/10".parse().unwrap(),
            cert: Signed {
                body: "{}".into(),
                sig: "x".into(),
            },
        };
        let sealed = c.seal_answer(&NodeKey([1; 32]), &answer);
        assert_eq!(c.open_answer(&NodeKey([1; 32]), &sealed), Some(answer));
        assert_eq!(c.open_answer(&NodeKey([2; 32]), &sealed), None);
        let other = InviteCode {
            secret: [8; 16],
            ..sample()
        };
        assert_eq!(other.open_answer(&NodeKey([1; 32]), &sealed), None);
        let s = SignerId::from(crate::membership::node_signing_key(&[1; 32]).verifying_key());
        let t = SignerId::from(crate::membership::node_signing_key(&[2; 32]).verifying_key());
        assert_ne!(
            c.proof(&NodeKey([1; 32]), &s),
            c.proof(&NodeKey([2; 32]), &s)
        );
        assert_ne!(
            c.proof(&NodeKey([1; 32]), &s),
            c.proof(&NodeKey([1; 32]), &t)
        );
        assert_ne!(c.id(), other.id());
    }

    #[test]
    fn invite_ids_have_one_spelling() {
        let id = sample().id();
        let hex = id.to_hex();
        assert_eq!(hex.len(), 32);
        assert_eq!(InviteId::from_hex(&hex), Some(id));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{hex}\""));
        assert_eq!(serde_json::from_str::<InviteId>(&json).unwrap(), id);
        for bad in [
            hex.to_uppercase(),
            hex[..31].to_string(),
            format!("{hex}0"),
            "g".repeat(32),
        ] {
            assert!(InviteId::from_hex(&bad).is_none() || bad == hex, "{bad}");
            assert!(serde_json::from_str::<InviteId>(&format!("\"{bad}\"")).is_err() || bad == hex);
        }
        assert_eq!(format!("{id:?}"), "InviteId(..)");
    }
}
