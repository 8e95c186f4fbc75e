//! Node records: what a node publishes about itself, signed so that the coordinator can check
//! membership but cannot forge a member.
//!
//! A node that holds the network secret signs its record with the network key. A node admitted
//! by invite does not hold it: it signs with its own node signing key and attaches the member
//! certificate (signed by the network key) that vouches for that signing key.

use std::net::{Ipv4Addr, SocketAddr};

use data_encoding::BASE64;
use serde::{Deserialize, Serialize};

use crate::cert::MemberCert;
use crate::keys::{NetworkId, NetworkKey, NodeKey, RECORD_CONTEXT};
pub use crate::signed::RecordError;
use crate::signed::{signature_bytes, Signed};

/// Longest node name accepted.
pub const MAX_NAME_LEN: usize = 63;
/// Most endpoint candidates a record may carry.
pub const MAX_CANDIDATES: usize = 16;
/// Largest encoded record body accepted.
pub const MAX_RECORD_LEN: usize = 4096;

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The network the record is for: a record of another network is dropped as foreign.
    pub network: NetworkId,
    pub node_key: NodeKey,
    pub name: String,
    pub ip: Ipv4Addr,
    /// Underlay addresses where the node's WireGuard socket may be reached, best first.
    pub candidates: Vec<SocketAddr>,
    /// Milliseconds since the Unix epoch when the node issued this record; a newer record
    /// replaces an older one, an older one is dropped as stale.
    pub issued_ms: u64,
    /// The member's SSH user key and, when its sshd is enabled for members, its host key.
    /// Absent from records of nodes before SSH (and older nodes ignore it: a record's body is
    /// parsed without denying unknown fields, and signed as the exact text it travels as).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<crate::ssh::SshKeys>,
}

/// A record as it travels: the exact signed bytes (a JSON text) and the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRecord {
    pub body: String,
    pub sig: String,
    /// For a node admitted by invite: its member certificate; `sig` is then made with the
    /// certificate's signing key instead of the network key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<Signed>,
}

/// A record whose signature (and certificate, if any) verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRecord {
    pub record: NodeRecord,
    /// The certificate of a node admitted by invite; `None` for a holder of the network secret.
    pub cert: Option<MemberCert>,
}

/// Checks a node name: 1 to 63 of `a-z 0-9 -`, not starting or ending with `-`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("name must be 1 to {MAX_NAME_LEN} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(format!(
            "name {name:?} may hold only a-z, 0-9 and '-' (not at either end)"
        ));
    }
    Ok(())
}

/// Turns a host name into a valid node name (lowercase, invalid characters to '-').
pub fn sanitize_name(raw: &str) -> String {
    let mut s: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(MAX_NAME_LEN)
        .collect();
    while s.ends_with('-') {
        s.pop();
    }
    let s = s.trim_start_matches('-').to_string();
    if s.is_empty() {
        "node".into()
    } else {
        s
    }
}

impl NodeRecord {
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.name)?;
        if self.node_key.is_low_order() {
            return Err("node key is an X25519 point of small order".into());
        }
        if self.candidates.len() > MAX_CANDIDATES {
            return Err(format!("more than {MAX_CANDIDATES} candidates"));
        }
        Ok(())
    }

    /// Signs with the network key (a node that holds the network secret).
    pub fn sign(&self, key: &NetworkKey) -> SignedRecord {
        let body = serde_json::to_string(self).expect("a record always serialises");
        let sig = key.sign(RECORD_CONTEXT, body.as_bytes());
        SignedRecord {
            body,
            sig: BASE64.encode(&sig),
            cert: None,
        }
    }

    /// Signs with a node's own signing key, vouched for by `cert` (a node admitted by invite).
    pub fn sign_with_cert(&self, key: &ed25519_dalek::SigningKey, cert: &Signed) -> SignedRecord {
        use ed25519_dalek::Signer;
        let body = serde_json::to_string(self).expect("a record always serialises");
        let sig = key.sign(&crate::keys::signed_bytes(RECORD_CONTEXT, body.as_bytes()));
        SignedRecord {
            body,
            sig: BASE64.encode(&sig.to_bytes()),
            cert: Some(cert.clone()),
        }
    }
}

impl SignedRecord {
    /// Verifies the record for `network`: its size, that it is signed, that it names this
    /// network, its signature (by the network key, or by a signing key the network key
    /// certified), then validates the body.
    pub fn verify(&self, network: &NetworkId) -> Result<VerifiedRecord, RecordError> {
        let sig = signature_bytes(&self.body, &self.sig, MAX_RECORD_LEN)?;
        let record: NodeRecord =
            serde_json::from_str(&self.body).map_err(|e| RecordError::Malformed(e.to_string()))?;
        if record.network != *network {
            return Err(RecordError::Foreign);
        }
        let cert = match &self.cert {
            None => {
                if !network.verify(RECORD_CONTEXT, self.body.as_bytes(), &sig) {
                    return Err(RecordError::BadSignature);
                }
                None
            }
            Some(signed) => {
                let cert = MemberCert::open(signed, network)?;
                if cert.node_key != record.node_key {
                    return Err(RecordError::BadSignature);
                }
                if !cert.verify_node_signature(RECORD_CONTEXT, self.body.as_bytes(), &sig) {
                    return Err(RecordError::BadSignature);
                }
                Some(cert)
            }
        };
        record.validate().map_err(RecordError::Invalid)?;
        Ok(VerifiedRecord { record, cert })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> NodeRecord {
        NodeRecord {
            network: NetworkKey::derive(&[1; 32]).id(),
            node_key: NodeKey([3; 32]),
            name: "alice".into(),
            ip: "100.64.0.7".parse().unwrap(),
            candidates: vec!["10.0.0.2:51820".parse().unwrap()],
            issued_ms: 1,
            ssh: None,
        }
    }

    #[test]
    fn signed_record_verifies_only_in_its_network() {
        let k = NetworkKey::derive(&[1; 32]);
        let signed = record().sign(&k);
        assert_eq!(signed.verify(&k.id()).unwrap().record, record());
        let other = NetworkKey::derive(&[2; 32]);
        assert_eq!(signed.verify(&other.id()), Err(RecordError::Foreign));
        // Naming our network but signed by another key: a forgery.
        let mut forged = record();
        forged.network = other.id();
        let forged = forged.sign(&k);
        assert_eq!(forged.verify(&other.id()), Err(RecordError::BadSignature));
        let mut unsigned = record().sign(&k);
        unsigned.sig.clear();
        assert_eq!(unsigned.verify(&k.id()), Err(RecordError::Unsigned));
    }

    #[test]
    fn tampered_record_is_refused() {
        let k = NetworkKey::derive(&[1; 32]);
        let mut signed = record().sign(&k);
        signed.body = signed.body.replace("100.64.0.7", "100.64.0.8");
        assert_eq!(signed.verify(&k.id()), Err(RecordError::BadSignature));
        let mut signed = record().sign(&k);
        signed.sig = "!!".into();
        assert_eq!(signed.verify(&k.id()), Err(RecordError::BadSignature));
    }

    #[test]
    fn signed_but_invalid_record_is_refused() {
        let k = NetworkKey::derive(&[1; 32]);
        let mut r = record();
        r.name = "Bad Name".into();
        assert!(matches!(
            r.sign(&k).verify(&k.id()),
            Err(RecordError::Invalid(_))
        ));
    }

    #[test]
    fn signed_record_with_a_low_order_key_is_refused() {
        let k = NetworkKey::derive(&[1; 32]);
        for p in crate::keys::LOW_ORDER_POINTS {
            let mut r = record();
            r.node_key = NodeKey(p);
            assert!(r.validate().is_err());
            assert!(matches!(
                r.sign(&k).verify(&k.id()),
                Err(RecordError::Invalid(_))
            ));
        }
    }

    #[test]
    fn ssh_keys_are_optional_both_ways() {
        let k = NetworkKey::derive(&[1; 32]);
        // A record of a node before SSH: no field, and it still verifies.
        let old = record().sign(&k);
        assert!(!old.body.contains("ssh"));
        assert_eq!(old.verify(&k.id()).unwrap().record.ssh, None);
        // A record with keys, read by a node before SSH (its NodeRecord had no `ssh`): the
        // field is ignored, and the signature covers the text as it is.
        let mut r = record();
        r.ssh = Some(crate::ssh::SshKeys {
            user: Some(crate::ssh::public_of(&[4; 32]).to_openssh()),
            host: None,
        });
        let new = r.sign(&k);
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct OldRecord {
            network: NetworkId,
            node_key: NodeKey,
            name: String,
            ip: Ipv4Addr,
            candidates: Vec<SocketAddr>,
            issued_ms: u64,
        }
        let old_view: OldRecord = serde_json::from_str(&new.body).unwrap();
        assert_eq!(old_view.name, "alice");
        assert_eq!(new.verify(&k.id()).unwrap().record, r);
        // The coordinator cannot change a key: the signature no longer covers the body.
        let mut forged = new.clone();
        forged.body = forged.body.replace(
            r.ssh.as_ref().unwrap().user.as_deref().unwrap(),
            &crate::ssh::public_of(&[6; 32]).to_openssh(),
        );
        assert_ne!(forged.body, new.body);
        assert_eq!(forged.verify(&k.id()), Err(RecordError::BadSignature));
    }

    #[test]
    fn names() {
        assert!(validate_name("agent-7").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("A").is_err());
        assert_eq!(sanitize_name("My_Host.local"), "my-host-local");
        assert_eq!(sanitize_name("___"), "node");
    }
}
