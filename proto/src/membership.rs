//! Membership that the coordinator cannot forge: what proves a node belongs to a network, and
//! the signed statements that change who belongs.
//!
//! - A node that joined with the token holds the network secret and signs with the network key.
//! - A node admitted by invite holds a [`MemberCert`]: the network key's signature over its node
//!   key and a signing key derived from its node private key. It signs its own records with
//!   that key. It never learns the network secret.
//! - A [`Revocation`] (`a2actl kick`), signed by the network key, removes a node key for good.
//! - A [`RotationNotice`] (`a2actl token rotate`), signed by the old network key, moves the
//!   members it names to a new network secret, each sealed to that member's node key so the
//!   coordinator that carries it cannot read it.
//!
//! All of these are signed JSON ([`Signed`]): the coordinator can check them against the
//! network id it knows, but cannot make one.

use chacha20poly1305::aead::KeyInit;
use chacha20poly1305::XChaCha20Poly1305;
use ed25519_dalek::SigningKey;
use hkdf::Hkdf;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

pub use crate::cert::{issue_cert, node_signing_key, MemberCert};
use crate::keys::{
    CoordinatorKey, NetworkId, NetworkKey, NetworkSecret, NodeKey, Signature, SignerId,
    REGISTER_CONTEXT, REVOKE_CONTEXT, ROTATE_CONTEXT,
};
use crate::record::{NodeRecord, SignedRecord};
use crate::sealed::Sealed;
use crate::signed::RecordError;
pub use crate::signed::{Signed, MAX_SIGNED_LEN};
use crate::token::JoinToken;

/// Most members one rotation notice carries to the new network.
pub const MAX_CARRIED: usize = 1024;

/// "This node key is no longer a member" (`a2actl kick`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub network: NetworkId,
    pub node_key: NodeKey,
    pub issued_ms: u64,
}

impl Revocation {
    pub fn open(signed: &Signed, network: &NetworkId) -> Result<Revocation, RecordError> {
        let r: Revocation = signed.open(network, REVOKE_CONTEXT)?;
        if r.network != *network {
            return Err(RecordError::Foreign);
        }
        Ok(r)
    }
}

/// What a rotation hands one member, sealed to its node key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Carry {
    /// For a holder of the old secret: the new network secret.
    Secret { secret: NetworkSecret },
    /// For a member admitted by invite: its certificate under the new network key.
    Cert { cert: Signed },
}

/// One member carried to the new network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    pub node_key: NodeKey,
    /// The [`Carry`] JSON, sealed to the member (the rotator's X25519 with it).
    pub sealed: Sealed,
}

/// "This network moves to a new secret; these members come along" (`a2actl token rotate`).
/// Members not named are left behind in the old network, alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationNotice {
    pub old_network: NetworkId,
    pub new_network: NetworkId,
    /// The member that rotated (its node key seals the carried parts).
    pub rotator: NodeKey,
    pub issued_ms: u64,
    pub carried: Vec<Carried>,
}

fn carry_cipher(own: &StaticSecret, peer: &NodeKey, new_network: &NetworkId) -> XChaCha20Poly1305 {
    let shared = own.diffie_hellman(&PublicKey::from(peer.0));
    let mut key = [0u8; 32];
    let mut info = b"a2a rotate carry v1".to_vec();
    info.extend_from_slice(&new_network.0);
    Hkdf::<Sha256>::new(None, shared.as_bytes())
        .expand(&info, &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    XChaCha20Poly1305::new(&key.into())
}

impl RotationNotice {
    pub fn open(signed: &Signed, network: &NetworkId) -> Result<RotationNotice, RecordError> {
        let n: RotationNotice = signed.open(network, ROTATE_CONTEXT)?;
        if n.old_network != *network {
            return Err(RecordError::Foreign);
        }
        if n.carried.len() > MAX_CARRIED {
            return Err(RecordError::Invalid(
                "rotation carries too many members".into(),
            ));
        }
        Ok(n)
    }

    /// Seals `carry` for `member`, by the rotator (`own`).
    pub fn seal(
        own: &StaticSecret,
        member: NodeKey,
        new_network: &NetworkId,
        carry: &Carry,
    ) -> Carried {
        let cipher = carry_cipher(own, &member, new_network);
        let plain = serde_json::to_vec(carry).expect("a carry always serialises");
        Carried {
            node_key: member,
            sealed: Sealed::seal(&cipher, &plain, &member.0),
        }
    }

    /// This member's part, opened with its private key; `None` if the notice leaves it behind
    /// or its part does not open.
    pub fn carry_for(&self, own: &StaticSecret) -> Option<Carry> {
        let me = NodeKey(PublicKey::from(own).to_bytes());
        let part = self.carried.iter().find(|c| c.node_key == me)?;
        let cipher = carry_cipher(own, &self.rotator, &self.new_network);
        let plain = part.sealed.open(&cipher, &me.0)?;
        serde_json::from_slice(&plain).ok()
    }
}

/// What a node admitted by invite keeps instead of the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invited {
    /// The coordinator's static public key.
    pub coordinator_key: CoordinatorKey,
    pub endpoints: Vec<String>,
    pub prefix: Ipv4Net,
    pub network: NetworkId,
    pub cert: Signed,
}

impl std::fmt::Debug for Invited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invited")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// What lets this node take part in a network.
pub enum Credential {
    /// Joined with the token: holds the network secret, so it can invite, kick and rotate.
    Secret { token: JoinToken, key: NetworkKey },
    /// Admitted by invite: a certificate and the node's own signing key.
    Invited {
        invited: Invited,
        signer: SigningKey,
    },
}

impl Credential {
    pub fn from_token(token: JoinToken) -> Credential {
        let key = NetworkKey::derive(&token.network_secret);
        Credential::Secret { token, key }
    }

    /// Checks a saved invite credential against this node's private key.
    pub fn from_invited(invited: Invited, node_private: &[u8; 32]) -> Result<Credential, String> {
        let cert = MemberCert::open(&invited.cert, &invited.network)
            .map_err(|e| format!("the saved member certificate is invalid: {e}"))?;
        let signer = node_signing_key(node_private);
        let me = NodeKey(PublicKey::from(&StaticSecret::from(*node_private)).to_bytes());
        if cert.node_key != me || cert.signing_key != SignerId::from(signer.verifying_key()) {
            return Err("the saved member certificate is for another node key".into());
        }
        Ok(Credential::Invited { invited, signer })
    }

    pub fn coordinator_key(&self) -> [u8; 32] {
        match self {
            Credential::Secret { token, .. } => token.coordinator_key,
            Credential::Invited { invited, .. } => invited.coordinator_key.0,
        }
    }

    pub fn endpoints(&self) -> &[String] {
        match self {
            Credential::Secret { token, .. } => &token.endpoints,
            Credential::Invited { invited, .. } => &invited.endpoints,
        }
    }

    pub fn prefix(&self) -> Ipv4Net {
        match self {
            Credential::Secret { token, .. } => token.prefix,
            Credential::Invited { invited, .. } => invited.prefix,
        }
    }

    pub fn network_id(&self) -> NetworkId {
        match self {
            Credential::Secret { key, .. } => key.id(),
            Credential::Invited { invited, .. } => invited.network,
        }
    }

    /// The network key, if this node holds the secret.
    pub fn network_key(&self) -> Option<&NetworkKey> {
        match self {
            Credential::Secret { key, .. } => Some(key),
            Credential::Invited { .. } => None,
        }
    }

    pub fn token(&self) -> Option<&JoinToken> {
        match self {
            Credential::Secret { token, .. } => Some(token),
            Credential::Invited { .. } => None,
        }
    }

    pub fn sign_record(&self, record: &NodeRecord) -> SignedRecord {
        match self {
            Credential::Secret { key, .. } => record.sign(key),
            Credential::Invited {
                invited, signer, ..
            } => record.sign_with_cert(signer, &invited.cert),
        }
    }

    /// The registration proof over the control channel's handshake hash: the network key's
    /// signature for a secret holder; none for an invited node, whose record carries its
    /// certificate (the channel itself authenticates the node key the certificate names).
    pub fn register_proof(&self, handshake_hash: &[u8]) -> Option<Signature> {
        match self {
            Credential::Secret { key, .. } => {
                Some(Signature(key.sign(REGISTER_CONTEXT, handshake_hash)))
            }
            Credential::Invited { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invite::InviteId;
    use crate::keys::CERT_CONTEXT;

    const INVITE: InviteId = InviteId([0xab; 16]);

    fn node(n: u8) -> (StaticSecret, NodeKey) {
        let s = StaticSecret::from([n; 32]);
        let k = NodeKey(PublicKey::from(&s).to_bytes());
        (s, k)
    }

    fn record(network: NetworkId, key: NodeKey) -> NodeRecord {
        NodeRecord {
            network,
            node_key: key,
            name: "inv".into(),
            ip: "100.64.0.9".parse().unwrap(),
            candidates: vec![],
            issued_ms: 5,
            ssh: None,
        }
    }

    #[test]
    fn certified_records_verify_and_forgeries_do_not() {
        let net = NetworkKey::derive(&[1; 32]);
        let (_, key) = node(7);
        let signer = node_signing_key(&[7; 32]);
        let cert = issue_cert(&net, key, signer.verifying_key().into(), INVITE, 1);
        let signed = record(net.id(), key).sign_with_cert(&signer, &cert);
        let v = signed.verify(&net.id()).unwrap();
        assert_eq!(v.cert.unwrap().invite, INVITE);

        // The certificate is for another node key.
        let (_, other) = node(8);
        let signed = record(net.id(), other).sign_with_cert(&signer, &cert);
        assert_eq!(signed.verify(&net.id()), Err(RecordError::BadSignature));
        // Signed by a key the certificate does not name.
        let stranger = node_signing_key(&[9; 32]);
        let signed = record(net.id(), key).sign_with_cert(&stranger, &cert);
        assert_eq!(signed.verify(&net.id()), Err(RecordError::BadSignature));
        // A certificate the coordinator made with some other key.
        let rogue = NetworkKey::derive(&[2; 32]);
        let fake = issue_cert(&rogue, key, signer.verifying_key().into(), INVITE, 1);
        let signed = record(net.id(), key).sign_with_cert(&signer, &fake);
        assert!(signed.verify(&net.id()).is_err());
    }

    #[test]
    fn revocations_bind_their_network() {
        let net = NetworkKey::derive(&[1; 32]);
        let other = NetworkKey::derive(&[2; 32]);
        let r = Revocation {
            network: net.id(),
            node_key: NodeKey([3; 32]),
            issued_ms: 1,
        };
        let s = Signed::sign(&r, &net, REVOKE_CONTEXT);
        assert_eq!(Revocation::open(&s, &net.id()).unwrap(), r);
        assert!(Revocation::open(&s, &other.id()).is_err());
        // A certificate's signature does not pass for a revocation.
        let s2 = Signed::sign(&r, &net, CERT_CONTEXT);
        assert_eq!(
            Revocation::open(&s2, &net.id()),
            Err(RecordError::BadSignature)
        );
    }

    #[test]
    fn rotation_parts_open_only_for_their_member() {
        let old = NetworkKey::derive(&[1; 32]);
        let new = NetworkKey::derive(&[2; 32]);
        let (rot_s, rot_k) = node(1);
        let (a_s, a_k) = node(2);
        let (b_s, _) = node(3);
        let carry = Carry::Secret {
            secret: NetworkSecret([2; 32]),
        };
        let notice = RotationNotice {
            old_network: old.id(),
            new_network: new.id(),
            rotator: rot_k,
            issued_ms: 1,
            carried: vec![RotationNotice::seal(&rot_s, a_k, &new.id(), &carry)],
        };
        let signed = Signed::sign(&notice, &old, ROTATE_CONTEXT);
        let opened = RotationNotice::open(&signed, &old.id()).unwrap();
        assert_eq!(opened.carry_for(&a_s), Some(carry));
        assert_eq!(opened.carry_for(&b_s), None);
        assert!(RotationNotice::open(&signed, &new.id()).is_err());
    }

    #[test]
    fn invited_credential_checks_its_certificate() {
        let net = NetworkKey::derive(&[1; 32]);
        let (_, key) = node(7);
        let signer = node_signing_key(&[7; 32]);
        let invited = Invited {
            coordinator_key: CoordinatorKey([4; 32]),
            endpoints: vec!["h:1".into()],
            prefix: "100.64.0.0/10".parse().unwrap(),
            network: net.id(),
            cert: issue_cert(&net, key, signer.verifying_key().into(), INVITE, 1),
        };
        let cred = Credential::from_invited(invited.clone(), &[7; 32]).unwrap();
        assert!(cred.network_key().is_none());
        assert_eq!(cred.register_proof(b"h"), None);
        let signed = cred.sign_record(&record(net.id(), key));
        assert!(signed.verify(&net.id()).is_ok());
        assert!(Credential::from_invited(invited, &[8; 32]).is_err());
    }
}
