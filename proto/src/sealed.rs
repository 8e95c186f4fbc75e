//! Sealed blobs: `nonce (24) | XChaCha20-Poly1305 ciphertext and tag`, standard base64 on the
//! wire. An inviter's answer to a redemption and each member's part of a rotation notice are
//! sealed so: the coordinator that carries them can neither read nor replace them.

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Largest sealed blob accepted (nonce, ciphertext and tag).
pub const MAX_SEALED: usize = 64 * 1024;

/// A sealed blob; at least a nonce and a tag, at most [`MAX_SEALED`] bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed(Vec<u8>);

impl Sealed {
    /// Seals `plain` with a random nonce, authenticating `aad` too.
    pub fn seal(cipher: &XChaCha20Poly1305, plain: &[u8], aad: &[u8]) -> Sealed {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let sealed = cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
            .expect("XChaCha20-Poly1305 seals any length used here");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Sealed(out)
    }

    /// The plaintext, if this was sealed with `cipher` and `aad`.
    pub fn open(&self, cipher: &XChaCha20Poly1305, aad: &[u8]) -> Option<Vec<u8>> {
        let (nonce, msg) = self.0.split_at_checked(NONCE_LEN)?;
        cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg, aad })
            .ok()
    }

    /// Takes raw bytes (`nonce | ciphertext`) if their length can be a sealed blob.
    pub fn from_bytes(bytes: Vec<u8>) -> Option<Sealed> {
        (NONCE_LEN + TAG_LEN..=MAX_SEALED)
            .contains(&bytes.len())
            .then_some(Sealed(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed({} bytes)", self.0.len())
    }
}

impl serde::Serialize for Sealed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&data_encoding::BASE64.encode(&self.0))
    }
}

impl<'de> serde::Deserialize<'de> for Sealed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        // Refused on its length before anything is decoded.
        (s.len() <= MAX_SEALED.div_ceil(3) * 4)
            .then(|| crate::keys::base64_strict(&s))
            .flatten()
            .and_then(Sealed::from_bytes)
            .ok_or_else(|| {
                serde::de::Error::custom("sealed data must be standard base64 of 40 to 65536 bytes")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20poly1305::KeyInit;

    #[test]
    fn opens_only_with_its_key_and_aad_and_has_one_spelling() {
        let c = XChaCha20Poly1305::new(&[1; 32].into());
        let other = XChaCha20Poly1305::new(&[2; 32].into());
        let s = Sealed::seal(&c, b"hello", b"aad");
        assert_eq!(s.open(&c, b"aad").as_deref(), Some(&b"hello"[..]));
        assert_eq!(s.open(&c, b"aae"), None);
        assert_eq!(s.open(&other, b"aad"), None);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Sealed>(&json).unwrap(), s);
        // Too short to hold a nonce and a tag, not base64, two padded pieces: refused.
        let short = data_encoding::BASE64.encode(&[0; 39]);
        assert!(serde_json::from_str::<Sealed>(&format!("\"{short}\"")).is_err());
        assert!(serde_json::from_str::<Sealed>("\"!!\"").is_err());
        let raw = s.as_bytes();
        let two = format!(
            "\"{}{}\"",
            data_encoding::BASE64.encode(&raw[..raw.len() - 1]),
            data_encoding::BASE64.encode(&raw[raw.len() - 1..])
        );
        assert!(serde_json::from_str::<Sealed>(&two).is_err());
        assert!(Sealed::from_bytes(vec![0; MAX_SEALED + 1]).is_none());
    }
}
