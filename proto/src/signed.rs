//! Signed statements: a JSON body and the network key's signature over it, and the checks
//! every signed thing (statement or node record) gets before its signature is tried. The
//! lowest layer of membership: certificates, records, revocations and rotation notices are
//! all signed this way.

use data_encoding::BASE64;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::keys::{NetworkId, NetworkKey};

/// Largest signed statement accepted (a rotation notice for [`MAX_CARRIED`] members).
pub const MAX_SIGNED_LEN: usize = 256 * 1024;
/// A JSON body and the network key's signature over it (base64).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub body: String,
    pub sig: String,
}

impl Signed {
    pub fn sign<T: Serialize>(value: &T, key: &NetworkKey, context: &[u8]) -> Signed {
        let body = serde_json::to_string(value).expect("a statement always serialises");
        let sig = key.sign(context, body.as_bytes());
        Signed {
            body,
            sig: BASE64.encode(&sig),
        }
    }

    /// Checks the signature under `network`, then parses the body.
    pub fn open<T: DeserializeOwned>(
        &self,
        network: &NetworkId,
        context: &[u8],
    ) -> Result<T, RecordError> {
        let sig = signature_bytes(&self.body, &self.sig, MAX_SIGNED_LEN)?;
        if !network.verify(context, self.body.as_bytes(), &sig) {
            return Err(RecordError::BadSignature);
        }
        serde_json::from_str(&self.body).map_err(|e| RecordError::Malformed(e.to_string()))
    }
}

/// The checks every signed statement gets before its signature is tried: the body within
/// `max_body`, a signature present, base64 of at most 128 characters. Returns the signature.
pub(crate) fn signature_bytes(
    body: &str,
    sig: &str,
    max_body: usize,
) -> Result<Vec<u8>, RecordError> {
    if body.len() > max_body || sig.len() > 128 {
        return Err(RecordError::TooLarge);
    }
    if sig.is_empty() {
        return Err(RecordError::Unsigned);
    }
    BASE64
        .decode(sig.as_bytes())
        .map_err(|_| RecordError::BadSignature)
}

/// Why a signed record or statement was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record or statement is larger than its limit")]
    TooLarge,
    #[error("record carries no signature")]
    Unsigned,
    #[error("record is for another network")]
    Foreign,
    #[error("record signature does not verify under this network's key")]
    BadSignature,
    #[error("record body is malformed: {0}")]
    Malformed(String),
    #[error("record is invalid: {0}")]
    Invalid(String),
}
