//! Member certificates: the network key's word that a node key (and the signing key derived
//! from it) belongs to the network. A node admitted by invite holds one instead of the network
//! secret and signs its own records with that signing key.

use ed25519_dalek::SigningKey;
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::invite::InviteId;
use crate::keys::{NetworkId, NetworkKey, NodeKey, SignerId, CERT_CONTEXT};
use crate::signed::{RecordError, Signed};

/// The Ed25519 key a node signs its own records with when it was admitted by invite, derived
/// from its X25519 node private key (so it needs no extra file and survives restarts).
pub fn node_signing_key(node_private: &[u8; 32]) -> SigningKey {
    let mut seed = [0u8; 32];
    Hkdf::<Sha256>::new(Some(b"a2a node signing key v1"), node_private)
        .expand(b"ed25519 seed", &mut seed)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    SigningKey::from_bytes(&seed)
}

/// The network key's word that a node key belongs to the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCert {
    pub network: NetworkId,
    pub node_key: NodeKey,
    /// The node's signing key, see [`node_signing_key`].
    pub signing_key: SignerId,
    /// The invite it was admitted with, for `status`.
    pub invite: InviteId,
    pub issued_ms: u64,
}

impl MemberCert {
    /// Verifies a certificate for `network`.
    pub fn open(signed: &Signed, network: &NetworkId) -> Result<MemberCert, RecordError> {
        let cert: MemberCert = signed.open(network, CERT_CONTEXT)?;
        if cert.network != *network {
            return Err(RecordError::Foreign);
        }
        Ok(cert)
    }

    /// Checks a signature made by the certified node's signing key.
    pub fn verify_node_signature(&self, context: &[u8], message: &[u8], sig: &[u8]) -> bool {
        self.signing_key.verify(context, message, sig)
    }
}

/// Issues a certificate for `node_key` (whose signing key is `signing_key`).
pub fn issue_cert(
    key: &NetworkKey,
    node_key: NodeKey,
    signing_key: SignerId,
    invite: InviteId,
    issued_ms: u64,
) -> Signed {
    Signed::sign(
        &MemberCert {
            network: key.id(),
            node_key,
            signing_key,
            invite,
            issued_ms,
        },
        key,
        CERT_CONTEXT,
    )
}
