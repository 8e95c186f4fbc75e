//! Messages on the control channel between a node and the coordinator (JSON, one per Noise frame).

use serde::{Deserialize, Serialize};

use crate::keys::{NetworkId, NodeKey};
use crate::record::SignedRecord;

/// Node to coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// First message on a connection. `proof` is the network key's signature (base64) over the
    /// channel's Noise handshake hash, so it cannot be replayed on another connection.
    Register {
        network: NetworkId,
        proof: String,
        record: SignedRecord,
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
}

/// Coordinator to node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// The registration (or update) is accepted; send a heartbeat every `heartbeat_s` seconds.
    /// `relay_id` names this node in relay data; `relay_secret` (base64, 16 bytes) proves it in
    /// a UDP relay bind. `peers`: how many `PeerUp`s follow at once (the members already in
    /// the network), so the node knows when its peer table is complete.
    Registered {
        heartbeat_s: u32,
        relay_id: u32,
        relay_secret: String,
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
    HeartbeatAck,
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
}
