//! Keys: the node's X25519 identity and the network signing key derived from the token's secret.

use std::fmt;

use data_encoding::BASE64;
use ed25519_dalek::{Signature as DalekSignature, Signer, SigningKey, Verifier, VerifyingKey};
use hkdf::Hkdf;
use sha2::Sha256;

/// A node's public key (X25519), the same key WireGuard and the control channel use.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeKey(pub [u8; 32]);

impl NodeKey {
    /// Standard base64, as WireGuard prints keys.
    pub fn to_base64(&self) -> String {
        BASE64.encode(&self.0)
    }

    pub fn from_base64(s: &str) -> Option<Self> {
        base64_exact(s.trim()).map(NodeKey)
    }
}

/// Decodes the one standard-base64 text of exactly `N` bytes (for 32 bytes: 44 characters, one
/// `=`). The decoder alone would also take concatenated padded pieces (`…Bwc=HcwB`), giving one
/// key many spellings.
pub fn base64_exact<const N: usize>(text: &str) -> Option<[u8; N]> {
    let v: [u8; N] = BASE64.decode(text.as_bytes()).ok()?.try_into().ok()?;
    (BASE64.encode(&v) == text).then_some(v)
}

/// Decodes the one standard-base64 text of any length (see [`base64_exact`]).
pub fn base64_strict(text: &str) -> Option<Vec<u8>> {
    let v = BASE64.decode(text.as_bytes()).ok()?;
    (BASE64.encode(&v) == text).then_some(v)
}

/// Compares two byte strings in time that depends on their lengths only, never on where they
/// differ: for secrets and proofs an attacker could otherwise guess byte by byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serde (as strict standard base64) and `to_base64`/`from_base64` for a newtype over `[u8; N]`.
macro_rules! base64_newtype {
    ($name:ident, $n:literal, $what:literal) => {
        impl $name {
            /// Standard base64, padded.
            pub fn to_base64(&self) -> String {
                data_encoding::BASE64.encode(&self.0)
            }

            /// The one base64 text of this value (see [`crate::keys::base64_exact`]).
            pub fn from_base64(text: &str) -> Option<Self> {
                $crate::keys::base64_exact::<$n>(text).map($name)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_base64())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $name::from_base64(&s).ok_or_else(|| {
                    serde::de::Error::custom(concat!(
                        $what,
                        " must be standard base64 of ",
                        stringify!($n),
                        " bytes"
                    ))
                })
            }
        }
    };
}
pub(crate) use base64_newtype;

/// Constant-time `PartialEq` (see [`constant_time_eq`]) and an opaque `Debug` for a secret.
macro_rules! secret_newtype {
    ($name:ident) => {
        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                $crate::keys::constant_time_eq(&self.0, &other.0)
            }
        }

        impl Eq for $name {}

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($name), "(..)"))
            }
        }
    };
}
pub(crate) use secret_newtype;

/// An Ed25519 signature (64 bytes), e.g. the registration proof; base64 on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);
base64_newtype!(Signature, 64, "a signature");

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signature(..)")
    }
}

/// The serde of an optional value spelled as the empty string when absent (the registration
/// proof of a node admitted by invite, which has none).
pub mod empty_is_none {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => v.serialize(s),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        use serde::de::IntoDeserializer;
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s.is_empty() {
            return Ok(None);
        }
        T::deserialize(s.as_ref().into_deserializer()).map(Some)
    }
}

/// The public half of a node's own record-signing key (Ed25519, see
/// `cert::node_signing_key`): what a member certificate vouches for, as the
/// [`NetworkId`] is the public half of the network key. Always a valid Ed25519 point (checked
/// when made); kept compressed, 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SignerId([u8; 32]);

impl SignerId {
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey::from_bytes(&self.0).expect("a SignerId is a valid Ed25519 key")
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        BASE64.encode(&self.0)
    }

    /// The one base64 text of a valid Ed25519 public key.
    pub fn from_base64(text: &str) -> Option<Self> {
        let bytes = base64_exact::<32>(text)?;
        VerifyingKey::from_bytes(&bytes).ok()?;
        Some(SignerId(bytes))
    }

    /// Checks a signature made by this key over `context` and `message`.
    pub fn verify(&self, context: &[u8], message: &[u8], sig: &[u8]) -> bool {
        let Ok(sig) = DalekSignature::from_slice(sig) else {
            return false;
        };
        self.verifying_key()
            .verify(&signed_bytes(context, message), &sig)
            .is_ok()
    }
}

impl From<VerifyingKey> for SignerId {
    fn from(k: VerifyingKey) -> Self {
        SignerId(k.to_bytes())
    }
}

impl fmt::Debug for SignerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SignerId(..)")
    }
}

impl serde::Serialize for SignerId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for SignerId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        SignerId::from_base64(&s).ok_or_else(|| {
            serde::de::Error::custom("signing key must be base64 of a 32-byte Ed25519 key")
        })
    }
}

/// The coordinator's static X25519 public key, which the control channel pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CoordinatorKey(pub [u8; 32]);
base64_newtype!(CoordinatorKey, 32, "a coordinator key");

impl fmt::Debug for CoordinatorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CoordinatorKey({})", self.to_base64())
    }
}

/// The network secret K (32 bytes) the network key is derived from; what a token carries.
#[derive(Clone, Copy)]
pub struct NetworkSecret(pub [u8; 32]);
base64_newtype!(NetworkSecret, 32, "a network secret");
secret_newtype!(NetworkSecret);

/// The 16-byte secret a node proves its relay id with in UDP relay binds; handed out by the
/// coordinator at registration.
#[derive(Clone, Copy)]
pub struct RelaySecret(pub [u8; 16]);
base64_newtype!(RelaySecret, 16, "a relay secret");
secret_newtype!(RelaySecret);

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", self.to_base64())
    }
}

impl serde::Serialize for NodeKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for NodeKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        NodeKey::from_base64(&s).ok_or_else(|| serde::de::Error::custom("invalid node key"))
    }
}

impl NodeKey {
    /// Whether this key is one of the X25519 points of small order (see [`is_low_order`]):
    /// never a peer, never registered.
    pub fn is_low_order(&self) -> bool {
        is_low_order(&self.0)
    }
}

/// The points of small order on Curve25519 (u-coordinates, little endian), as listed by
/// Bernstein and blocked by libsodium (`crypto_scalarmult_curve25519`) and WireGuard: X25519 of
/// any (clamped) secret with one of these is all zeros. The last three are p-1, p and p+1, the
/// unreduced forms of the same points.
pub const LOW_ORDER_POINTS: [[u8; 32]; 7] = [
    // 0 (order 4)
    [0; 32],
    // 1 (order 1)
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    // 325606250916557431795983626356110631294008115727848805560023387167927233504 (order 8)
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    // 39382357235489614581723060781553021112529911719440698176882885853963445705823 (order 8)
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    // p - 1 (order 2)
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    // p (= 0, order 4)
    [
        0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    // p + 1 (= 1, order 1)
    [
        0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
];

/// Whether `key` is an X25519 public key of small order: one of [`LOW_ORDER_POINTS`], the top
/// bit ignored as X25519 ignores it (as libsodium does). A DH with such a key yields all zeros,
/// which anybody can compute: a peer configured with one could be impersonated by anyone,
/// since WireGuard's static-static DH would be a known constant (boringtun does not check).
pub fn is_low_order(key: &[u8; 32]) -> bool {
    LOW_ORDER_POINTS
        .iter()
        .any(|p| p[..31] == key[..31] && p[31] == key[31] & 0x7f)
}

/// The public half of the network signing key: what the coordinator knows a network by.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetworkId(pub [u8; 32]);

impl NetworkId {
    pub fn verifying_key(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).ok()
    }

    /// Checks a signature made with [`NetworkKey::sign`] over `context` and `message`.
    pub fn verify(&self, context: &[u8], message: &[u8], sig: &[u8]) -> bool {
        let (Some(key), Ok(sig)) = (self.verifying_key(), DalekSignature::from_slice(sig)) else {
            return false;
        };
        key.verify(&signed_bytes(context, message), &sig).is_ok()
    }
}

impl fmt::Debug for NetworkId {
    // The network id is an identifier the coordinator must not print; keep Debug opaque.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NetworkId(..)")
    }
}

impl serde::Serialize for NetworkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(&self.0))
    }
}

impl<'de> serde::Deserialize<'de> for NetworkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64_exact(&s)
            .map(NetworkId)
            .ok_or_else(|| serde::de::Error::custom("network id must be base64 of 32 bytes"))
    }
}

/// The network signing key (Ed25519), derived from the token's network secret with HKDF-SHA256.
/// Every member holds it; the coordinator only ever sees its public half ([`NetworkId`]).
pub struct NetworkKey {
    signing: SigningKey,
}

impl NetworkKey {
    /// The key of a network secret.
    pub fn derive(network_secret: &[u8; 32]) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(b"a2a network v1"), network_secret);
        let mut seed = [0u8; 32];
        hk.expand(b"a2a network signing key", &mut seed)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        NetworkKey {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    pub fn id(&self) -> NetworkId {
        NetworkId(self.signing.verifying_key().to_bytes())
    }

    /// Signs `message` under a domain-separating `context`.
    pub fn sign(&self, context: &[u8], message: &[u8]) -> [u8; 64] {
        self.signing
            .sign(&signed_bytes(context, message))
            .to_bytes()
    }
}

pub(crate) fn signed_bytes(context: &[u8], message: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(context.len() + 1 + message.len());
    v.extend_from_slice(context);
    v.push(0);
    v.extend_from_slice(message);
    v
}

/// Signature context of a member certificate (a node admitted by invite).
pub const CERT_CONTEXT: &[u8] = b"a2a member cert v1";
/// Signature context of a revocation (`a2actl kick`).
pub const REVOKE_CONTEXT: &[u8] = b"a2a revoke v1";
/// Signature context of a rotation notice (`a2actl token rotate`).
pub const ROTATE_CONTEXT: &[u8] = b"a2a rotate v1";
/// Signature context of a node record.
pub const RECORD_CONTEXT: &[u8] = b"a2a node record v1";
/// Signature context of a registration proof (signed over the control channel's handshake hash).
pub const REGISTER_CONTEXT: &[u8] = b"a2a register v1";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivation_is_deterministic_and_secret_specific() {
        let a = NetworkKey::derive(&[1; 32]);
        let b = NetworkKey::derive(&[1; 32]);
        let c = NetworkKey::derive(&[2; 32]);
        assert_eq!(a.id(), b.id());
        assert_ne!(a.id(), c.id());
    }

    #[test]
    fn signatures_bind_context_message_and_network() {
        let k = NetworkKey::derive(&[1; 32]);
        let other = NetworkKey::derive(&[2; 32]);
        let sig = k.sign(RECORD_CONTEXT, b"hello");
        assert!(k.id().verify(RECORD_CONTEXT, b"hello", &sig));
        assert!(!k.id().verify(RECORD_CONTEXT, b"hellp", &sig));
        assert!(!k.id().verify(REGISTER_CONTEXT, b"hello", &sig));
        assert!(!other.id().verify(RECORD_CONTEXT, b"hello", &sig));
        assert!(!k.id().verify(RECORD_CONTEXT, b"hello", &sig[..63]));
    }

    #[test]
    fn low_order_points_are_recognised_and_give_an_all_zero_dh() {
        use x25519_dalek::{PublicKey, StaticSecret};
        let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
        for p in LOW_ORDER_POINTS {
            for top in [0u8, 0x80] {
                let mut k = p;
                k[31] |= top;
                assert!(is_low_order(&k), "{k:02x?}");
                assert!(NodeKey(k).is_low_order());
                // What makes them dangerous: the shared secret is all zeros, whatever our key.
                let shared = secret.diffie_hellman(&PublicKey::from(k));
                assert_eq!(shared.as_bytes(), &[0u8; 32], "{k:02x?}");
                assert!(!shared.was_contributory());
            }
        }
        // Real keys are not.
        for _ in 0..100 {
            let s = StaticSecret::random_from_rng(rand::rngs::OsRng);
            let k = PublicKey::from(&s).to_bytes();
            assert!(!is_low_order(&k));
            assert!(secret
                .diffie_hellman(&PublicKey::from(k))
                .was_contributory());
        }
        // Neighbours of the listed points are not either (p + 2 is the point 2).
        let mut two = LOW_ORDER_POINTS[6];
        two[0] += 1;
        assert!(!is_low_order(&two));
        let mut x = LOW_ORDER_POINTS[2];
        x[5] ^= 1;
        assert!(!is_low_order(&x));
    }

    #[test]
    fn node_key_base64_round_trips() {
        let k = NodeKey([9; 32]);
        assert_eq!(NodeKey::from_base64(&k.to_base64()), Some(k));
        assert_eq!(NodeKey::from_base64("short"), None);
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<NodeKey>(&json).unwrap(), k);
    }

    /// Found by fuzz/fuzz_targets/keyfile.rs: the base64 decoder also takes concatenated padded
    /// pieces, so one key had many spellings (key files, node keys, network ids).
    #[test]
    fn a_key_has_one_spelling() {
        let k = [7u8; 32];
        let text = BASE64.encode(&k);
        assert_eq!(base64_exact::<32>(&text), Some(k));
        let two_pieces = format!("{}{}", BASE64.encode(&k[..29]), BASE64.encode(&k[29..]));
        assert_eq!(BASE64.decode(two_pieces.as_bytes()).unwrap(), k);
        assert_eq!(base64_exact::<32>(&two_pieces), None);
        assert_eq!(NodeKey::from_base64(&two_pieces), None);
        assert_eq!(
            NodeKey::from_base64(&format!(" {text}\n")),
            Some(NodeKey(k))
        );
        assert!(serde_json::from_str::<NetworkId>(&format!("\"{two_pieces}\"")).is_err());
        assert_eq!(
            serde_json::from_str::<NetworkId>(&format!("\"{text}\"")).unwrap(),
            NetworkId(k)
        );
        assert_eq!(base64_exact::<32>(&BASE64.encode(&[7; 31])), None);
    }
}
