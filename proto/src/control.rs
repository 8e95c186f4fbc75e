//! Messages on the control channel between a node and the coordinator (JSON, one per Noise frame).

use serde::{Deserialize, Serialize};

use crate::invite::{InviteId, InviteProof};
use crate::keys::{NetworkId, NodeKey, RelaySecret, Signature, SignerId};
use crate::membership::Signed;
use crate::record::SignedRecord;
use crate::sealed::Sealed;

/// Node to coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// First message on a connection. `proof` is the network key's signature over the
    /// channel's Noise handshake hash, so it cannot be replayed on another connection; a node
    /// admitted by invite has none (the empty string on the wire) and its record carries its
    /// member certificate instead.
    Register {
        network: NetworkId,
        #[serde(with = "crate::keys::empty_is_none")]
        proof: Option<Signature>,
        record: SignedRecord,
        /// The node reads [`ServerMsg::Peers`]: member changes may come to it coalesced.
        /// Absent (false) from nodes older than the batches: they get one `PeerUp` or
        /// `PeerDown` per change, as before.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        batches: bool,
    },
    /// A newer record (new candidates, for instance).
    Update { record: SignedRecord },
    /// Keeps the registration alive.
    Heartbeat,
    /// The node leaves the network; the coordinator tells the other members at once.
    Leave,
    /// "I am probing this peer for a direct path now": the coordinator tells the peer
    /// ([`ServerMsg::Punch`]) so both ends send probes at the same time and open their NATs.
    Punch { to: NodeKey },
    /// A member that made an invite: send redemptions of `id` to me (I count its uses).
    InviteOpen { id: InviteId },
    /// The invite is used up or expired: forget it.
    InviteClose { id: InviteId },
    /// The first message from a node holding an invite code (instead of `Register`): `proof`
    /// is derived from the invite secret, this connection's node key and `signing_key` (the
    /// Ed25519 key the node will sign its records with).
    Redeem {
        invite: InviteId,
        signing_key: SignerId,
        proof: InviteProof,
    },
    /// The inviter admits redemption `ticket`: `sealed` is the answer sealed to the redeemer.
    InviteAdmit { ticket: u32, sealed: Sealed },
    /// The inviter refuses redemption `ticket` (used up, expired, bad proof).
    InviteDeny { ticket: u32, message: String },
    /// A signed revocation (`a2actl kick`), or one this member holds, for the coordinator to
    /// pass on to every member and enforce at registration.
    Revoke { revocation: Signed },
    /// A signed rotation notice (`a2actl token rotate`): pass it to every member of this
    /// network, now and when they register later.
    Rotate { notice: Signed },
    /// A policy or a tag statement signed by the network key (`a2actl policy set`, `tag`),
    /// or one this member holds (sent after every registration, so a restarted coordinator
    /// learns them again): keep the newest of each in memory and pass it to every member.
    Statement { signed: Signed },
}

/// Why the coordinator refused a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseReason {
    /// The proof of membership does not verify: the node does not hold this network's secret.
    BadProof,
    /// The record's signature, body or key does not match.
    BadRecord,
    /// Another live node of the network holds this overlay address; derive the next one.
    AddressInUse,
    /// A message came out of order (e.g. anything before `Register`).
    Protocol,
    /// The node key was removed from the network (`a2actl kick`).
    Revoked,
    /// The invite cannot be redeemed (unknown, its inviter offline, used up or expired).
    InviteRefused,
}

/// One member in [`ServerMsg::Peers`]: its record and the id relay data for it is addressed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEntry {
    pub record: SignedRecord,
    pub relay_id: u32,
}

/// Coordinator to node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// The registration (or update) is accepted; send a heartbeat every `heartbeat_s` seconds.
    /// `relay_id` names this node in relay data; `relay_secret` proves it in a UDP relay bind.
    /// `peers`: how many records follow at once (the members already in the network, as
    /// `PeerUp`s or in `Peers` messages), so the node knows when its peer table is complete.
    Registered {
        heartbeat_s: u32,
        relay_id: u32,
        relay_secret: RelaySecret,
        peers: u32,
    },
    Refused {
        reason: RefuseReason,
        message: String,
    },
    /// A member of the network (sent for every member after registering, then on changes), with
    /// the id relay data for it is addressed to.
    PeerUp {
        record: SignedRecord,
        relay_id: u32,
    },
    /// A member is probing for a direct path to this node: probe it back now.
    Punch {
        from: NodeKey,
    },
    /// A member left or expired.
    PeerDown {
        node_key: NodeKey,
    },
    /// Changes to the network's members, coalesced over the coordinator's fan-out window (or
    /// the members already there, right after `Registered`): apply every `down` (left or
    /// expired), then every `up` in order (joined, or a newer record), as that many
    /// `PeerDown`s and `PeerUp`s. A node key appears at most once in each list; in both, it
    /// left and came back. A record of the receiver itself is ignored.
    Peers {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        down: Vec<NodeKey>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        up: Vec<PeerEntry>,
    },
    HeartbeatAck,
    /// To an inviter: a node asks to redeem one of its invites.
    RedeemRequest {
        ticket: u32,
        invite: InviteId,
        node_key: NodeKey,
        signing_key: SignerId,
        proof: InviteProof,
    },
    /// To a redeemer: the inviter's sealed answer.
    InviteAdmitted {
        sealed: Sealed,
    },
    /// A member was removed: drop it and refuse it from now on.
    Revoked {
        revocation: Signed,
    },
    /// The network moved to a new secret.
    Moved {
        notice: Signed,
    },
    /// A policy or tag statement of the network (see [`ClientMsg::Statement`]); members verify
    /// it against the network key and keep it only if it is newer than what they hold, so a
    /// coordinator that forges, replays or withholds one changes nothing.
    Statement {
        signed: Signed,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let m = ClientMsg::Update {
            record: SignedRecord {
                body: "{}".into(),
                sig: "x".into(),
                cert: None,
            },
        };
        let s = serde_json::to_string(&m).unwrap();
        assert!(s.contains("\"type\":\"update\""), "{s}");
        assert_eq!(serde_json::from_str::<ClientMsg>(&s).unwrap(), m);
        let r = ServerMsg::Refused {
            reason: RefuseReason::AddressInUse,
            message: "taken".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<ServerMsg>(&s).unwrap(), r);
        assert!(serde_json::from_str::<ClientMsg>("{\"type\":\"nope\"}").is_err());
    }

    /// A batch of member changes: empty lists are left out and read back as empty.
    #[test]
    fn a_peers_batch_round_trips_and_its_lists_may_be_absent() {
        let record = SignedRecord {
            body: "{\"a\":1}".into(),
            sig: "x".into(),
            cert: None,
        };
        let m = ServerMsg::Peers {
            down: vec![NodeKey([1; 32])],
            up: vec![PeerEntry {
                record,
                relay_id: 7,
            }],
        };
        let s = serde_json::to_string(&m).unwrap();
        assert!(s.contains("\"type\":\"peers\""), "{s}");
        assert_eq!(serde_json::from_str::<ServerMsg>(&s).unwrap(), m);
        let empty = serde_json::from_str::<ServerMsg>("{\"type\":\"peers\"}").unwrap();
        assert_eq!(
            empty,
            ServerMsg::Peers {
                down: vec![],
                up: vec![]
            }
        );
        assert_eq!(
            serde_json::to_string(&empty).unwrap(),
            "{\"type\":\"peers\"}"
        );
    }

    /// The typed fields keep the JSON shape they had as strings: base64 (and an empty proof
    /// for an invited node), and a malformed one fails the whole message.
    #[test]
    fn keys_and_secrets_cross_as_the_same_base64_strings() {
        use data_encoding::BASE64;
        let record = SignedRecord {
            body: "{}".into(),
            sig: "x".into(),
            cert: None,
        };
        let network = crate::NetworkKey::derive(&[1; 32]).id();
        for proof in [Some(Signature([5; 64])), None] {
            let m = ClientMsg::Register {
                batches: true,
                network,
                proof,
                record: record.clone(),
            };
            let v: serde_json::Value = serde_json::to_value(&m).unwrap();
            let want = proof.map(|p| BASE64.encode(&p.0)).unwrap_or_default();
            assert_eq!(v["proof"], want.as_str());
            assert_eq!(serde_json::from_value::<ClientMsg>(v).unwrap(), m);
        }
        let m = ServerMsg::Registered {
            heartbeat_s: 10,
            relay_id: 1,
            relay_secret: RelaySecret([3; 16]),
            peers: 0,
        };
        let v: serde_json::Value = serde_json::to_value(&m).unwrap();
        assert_eq!(v["relay_secret"], BASE64.encode(&[3; 16]).as_str());
        for bad in [
            BASE64.encode(&[3; 15]),
            "!!".into(),
            BASE64.encode(&[3; 17]),
        ] {
            let mut v = v.clone();
            v["relay_secret"] = bad.into();
            assert!(serde_json::from_value::<ServerMsg>(v).is_err());
        }
        let signer = SignerId::from(crate::membership::node_signing_key(&[1; 32]).verifying_key());
        let m = ClientMsg::Redeem {
            invite: InviteId([0xab; 16]),
            signing_key: signer,
            proof: InviteProof([2; 32]),
        };
        let v: serde_json::Value = serde_json::to_value(&m).unwrap();
        assert_eq!(v["invite"], "ab".repeat(16).as_str());
        assert_eq!(v["signing_key"], signer.to_base64().as_str());
        assert_eq!(v["proof"], BASE64.encode(&[2; 32]).as_str());
        assert_eq!(serde_json::from_value::<ClientMsg>(v.clone()).unwrap(), m);
        let mut bad = v;
        bad["proof"] = "".into();
        assert!(serde_json::from_value::<ClientMsg>(bad).is_err());
    }
}
