//! What a member keeps so that it works without a coordinator: the peer records it verified
//! (with the address each was last reached at directly), saved in the state directory
//! (`peers.json`) and read again at start, and the rule for a peer the coordinator stops
//! listing. Free of I/O: the caller reads and writes the file and reads the clock.
//!
//! - The file is sealed by this node: its body names the network and the node, and carries an
//!   Ed25519 signature by the node's signing key (derived from its node key,
//!   [`node_signing_key`]). A file from another node or another network, or one edited, is
//!   refused as a whole ([`open`]) — the caller says so and starts without it. Each record in it
//!   is a peer's own signed record and is verified again as if the coordinator had just sent it
//!   (network key or member certificate, overlay prefix, revocations): the seal covers what no
//!   peer signed (the endpoints), the records' signatures cover the rest.
//! - A peer the coordinator no longer lists (its session there expired: its own coordinator
//!   died, say) is not revoked: like a WireGuard peer in a configuration, it stays while it is
//!   alive on a direct path, and is dropped once nothing came from it directly for
//!   [`UNLISTED_QUIET`] ([`verdict`]). A revocation removes it at once. While no coordinator is
//!   reachable nothing is dropped: nobody can say who left.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use a2a_proto::keys::SignerId;
use a2a_proto::membership::node_signing_key;
use a2a_proto::{NetworkId, NodeKey, SignedRecord};
use data_encoding::BASE64;
use ed25519_dalek::Signer;
use serde::{Deserialize, Serialize};

/// Signature context of `peers.json`.
pub const SAVED_PEERS_CONTEXT: &[u8] = b"a2a saved peers v1";
/// How long a peer the coordinator stopped listing is kept once nothing comes from it
/// directly: a direct path is pinged every [`HEARTBEAT`] and given up after [`DIRECT_TIMEOUT`],
/// so this is five heartbeats, twice the time a direct path survives in silence, and one
/// WireGuard keepalive ([`PERSISTENT_KEEPALIVE_S`]). The coordinator cannot say whether a
/// member left (`a2actl down`) or only lost it: a member that left goes quiet, and is gone
/// from the other members' tables (and names) this long after.
///
/// [`HEARTBEAT`]: crate::core::path::HEARTBEAT
/// [`DIRECT_TIMEOUT`]: crate::core::path::DIRECT_TIMEOUT
/// [`PERSISTENT_KEEPALIVE_S`]: crate::core::peers::PERSISTENT_KEEPALIVE_S
pub const UNLISTED_QUIET: Duration = Duration::from_secs(10);
/// Most peers saved (the largest network a member is expected in, with room).
pub const MAX_SAVED: usize = 16 * 1024;
/// Largest `peers.json` read (a record is well under 4 KiB).
pub const MAX_FILE: usize = MAX_SAVED * 4096;

/// `peers.json` as written: the body (JSON of [`Body`]) and this node's signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedFile {
    pub body: String,
    pub sig: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Body {
    network: NetworkId,
    /// Whose file this is.
    node_key: NodeKey,
    peers: Vec<SavedPeer>,
}

/// One peer as saved: its own signed record, and where it was last reached directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPeer {
    /// The key its record must be of.
    pub node_key: NodeKey,
    pub record: SignedRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
}

/// Why a saved file was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it is not a saved peer list ({0})")]
    Malformed(String),
    #[error(
        "its seal does not verify under this node's key: it was edited, or written by another node"
    )]
    Tampered,
    #[error("it is another node's")]
    OtherNode,
    #[error("it is from another network (the network rotated, or this node joined another)")]
    OtherNetwork,
    #[error("it holds more than {MAX_SAVED} peers")]
    TooMany,
}

/// Seals the peers to save for this node (`node_private`) in `network`.
pub fn seal(node_private: &[u8; 32], network: NetworkId, peers: Vec<SavedPeer>) -> SavedFile {
    let node_key = crate::core::peers::own_key(node_private);
    let body = serde_json::to_string(&Body {
        network,
        node_key,
        peers,
    })
    .expect("a peer list always serialises");
    let sig = node_signing_key(node_private).sign(&signed_bytes(body.as_bytes()));
    SavedFile {
        body,
        sig: BASE64.encode(&sig.to_bytes()),
    }
}

/// The peers of a saved file, if it is this node's (`node_private`), unedited, and of
/// `network`. Their records are still to be verified, one by one.
pub fn open(
    file: &SavedFile,
    node_private: &[u8; 32],
    network: &NetworkId,
) -> Result<Vec<SavedPeer>, Refusal> {
    if file.body.len() > MAX_FILE {
        return Err(Refusal::TooMany);
    }
    let signer = SignerId::from(node_signing_key(node_private).verifying_key());
    let sig = BASE64
        .decode(file.sig.as_bytes())
        .map_err(|_| Refusal::Tampered)?;
    if !signer.verify(SAVED_PEERS_CONTEXT, file.body.as_bytes(), &sig) {
        return Err(Refusal::Tampered);
    }
    let body: Body =
        serde_json::from_str(&file.body).map_err(|e| Refusal::Malformed(e.to_string()))?;
    if body.node_key != crate::core::peers::own_key(node_private) {
        return Err(Refusal::OtherNode);
    }
    if body.network != *network {
        return Err(Refusal::OtherNetwork);
    }
    if body.peers.len() > MAX_SAVED {
        return Err(Refusal::TooMany);
    }
    Ok(body.peers)
}

/// What [`SignerId::verify`] checks: the context, a zero byte, the message.
fn signed_bytes(message: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(SAVED_PEERS_CONTEXT.len() + 1 + message.len());
    v.extend_from_slice(SAVED_PEERS_CONTEXT);
    v.push(0);
    v.extend_from_slice(message);
    v
}

/// A restored peer's candidates: where it was last reached directly first (its packets go
/// there before any probe answered), then those its record publishes.
pub fn restored_candidates(
    endpoint: Option<SocketAddr>,
    published: &[SocketAddr],
) -> Vec<SocketAddr> {
    let mut c: Vec<SocketAddr> = endpoint.into_iter().collect();
    for a in published {
        if !c.contains(a) {
            c.push(*a);
        }
    }
    c
}

/// How a peer stands with the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// The coordinator listed it (or sent its record) on this connection.
    Listed,
    /// Restored from `peers.json`; no coordinator has listed it since the start.
    Saved,
    /// The coordinator said it is gone (or left it out of its list) at `since`; it is not
    /// revoked.
    Unlisted { since: Instant },
}

impl Listing {
    /// The word `a2actl status` shows (`None`: listed, nothing to say).
    pub fn word(&self) -> Option<&'static str> {
        match self {
            Listing::Listed => None,
            Listing::Saved => Some("saved"),
            Listing::Unlisted { .. } => Some("unlisted"),
        }
    }
}

/// What to do with a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Drop,
}

/// Whether to keep a peer at `now`, given how it is listed and when something last came from
/// it directly (`heard`: a direct path's pong or data). Called only while registered with a
/// coordinator (without one, nobody says who left: everything is kept). A listed peer stays
/// (the coordinator relays it); a saved one the coordinator's list did not name is unlisted
/// from then on (the caller marks it); an unlisted one stays until [`UNLISTED_QUIET`] passed
/// since the later of its unlisting and its last direct sign of life, or goes at once when it
/// said itself, through its tunnel, that it leaves (`left`: `a2actl down` on it).
pub fn verdict(now: Instant, listing: Listing, heard: Option<Instant>, left: bool) -> Verdict {
    match listing {
        Listing::Listed | Listing::Saved => Verdict::Keep,
        Listing::Unlisted { .. } if left => Verdict::Drop,
        Listing::Unlisted { since } => {
            let last = heard.map_or(since, |h| h.max(since));
            if now.saturating_duration_since(last) >= UNLISTED_QUIET {
                Verdict::Drop
            } else {
                Verdict::Keep
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use a2a_proto::{NetworkKey, NodeRecord};

    const NODE: [u8; 32] = [9; 32];

    fn network() -> NetworkKey {
        NetworkKey::derive(&[1; 32])
    }

    fn peer(n: u8) -> SavedPeer {
        let key = crate::core::peers::own_key(&[n; 32]);
        let net = network();
        let record = NodeRecord {
            network: net.id(),
            node_key: key,
            name: format!("n{n}"),
            ip: format!("100.64.0.{n}").parse().unwrap(),
            candidates: vec![format!("10.0.0.{n}:51820").parse().unwrap()],
            issued_ms: 1,
            ssh: None,
        };
        SavedPeer {
            node_key: key,
            record: record.sign(&net),
            endpoint: Some(format!("192.0.2.{n}:4000").parse().unwrap()),
        }
    }

    #[test]
    fn a_sealed_list_opens_for_its_node_and_network_only() {
        let peers = vec![peer(2), peer(3)];
        let file = seal(&NODE, network().id(), peers.clone());
        assert_eq!(open(&file, &NODE, &network().id()), Ok(peers));
        // Another node's key does not open it: the seal is made with the node's own key.
        assert_eq!(
            open(&file, &[8; 32], &network().id()),
            Err(Refusal::Tampered)
        );
        let other = NetworkKey::derive(&[2; 32]).id();
        assert_eq!(open(&file, &NODE, &other), Err(Refusal::OtherNetwork));
    }

    #[test]
    fn any_edit_of_the_file_is_refused_as_a_whole() {
        let file = seal(&NODE, network().id(), vec![peer(2)]);
        // An endpoint moved (no peer signed it; the seal covers it).
        let mut moved = file.clone();
        moved.body = moved.body.replace("192.0.2.2:4000", "192.0.2.66:4000");
        assert_ne!(moved.body, file.body);
        assert_eq!(open(&moved, &NODE, &network().id()), Err(Refusal::Tampered));
        // A peer dropped from the list (a kicked member's record put back would be the same).
        let emptied = SavedFile {
            body: file.body.replace(
                &file.body[file.body.find("\"peers\"").unwrap()..],
                "\"peers\":[]}",
            ),
            sig: file.sig.clone(),
        };
        assert_eq!(
            open(&emptied, &NODE, &network().id()),
            Err(Refusal::Tampered)
        );
        let mut unsigned = file.clone();
        unsigned.sig = "!!".into();
        assert_eq!(
            open(&unsigned, &NODE, &network().id()),
            Err(Refusal::Tampered)
        );
        unsigned.sig = String::new();
        assert_eq!(
            open(&unsigned, &NODE, &network().id()),
            Err(Refusal::Tampered)
        );
    }

    #[test]
    fn a_file_sealed_for_another_node_is_refused() {
        // Sealed with this node's key but naming another node (a copy of its body re-sealed).
        let body = Body {
            network: network().id(),
            node_key: crate::core::peers::own_key(&[5; 32]),
            peers: vec![],
        };
        let body = serde_json::to_string(&body).unwrap();
        let sig = node_signing_key(&NODE).sign(&signed_bytes(body.as_bytes()));
        let file = SavedFile {
            body,
            sig: BASE64.encode(&sig.to_bytes()),
        };
        assert_eq!(open(&file, &NODE, &network().id()), Err(Refusal::OtherNode));
    }

    #[test]
    fn the_last_direct_endpoint_comes_first() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            restored_candidates(Some(a("192.0.2.1:5")), &[a("10.0.0.1:1"), a("192.0.2.1:5")]),
            vec![a("192.0.2.1:5"), a("10.0.0.1:1")]
        );
        assert_eq!(
            restored_candidates(None, &[a("10.0.0.1:1")]),
            vec![a("10.0.0.1:1")]
        );
    }

    #[test]
    fn an_unlisted_peer_stays_while_heard_directly_and_goes_when_quiet() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        assert_eq!(
            verdict(s(1000), Listing::Listed, None, false),
            Verdict::Keep
        );
        assert_eq!(verdict(s(1000), Listing::Saved, None, false), Verdict::Keep);
        let unlisted = Listing::Unlisted { since: s(10) };
        // Never heard directly: the quiet time runs from the unlisting.
        assert_eq!(verdict(s(19), unlisted, None, false), Verdict::Keep);
        assert_eq!(verdict(s(20), unlisted, None, false), Verdict::Drop);
        // Heard before the unlisting: the same.
        assert_eq!(verdict(s(20), unlisted, Some(s(5)), false), Verdict::Drop);
        // Heard after: it stays as long as it keeps being heard.
        assert_eq!(verdict(s(100), unlisted, Some(s(99)), false), Verdict::Keep);
        assert_eq!(verdict(s(108), unlisted, Some(s(99)), false), Verdict::Keep);
        assert_eq!(verdict(s(109), unlisted, Some(s(99)), false), Verdict::Drop);
        // A peer that said it leaves goes as soon as it is unlisted, not before.
        assert_eq!(verdict(s(11), unlisted, Some(s(11)), true), Verdict::Drop);
        assert_eq!(verdict(s(11), Listing::Listed, None, true), Verdict::Keep);
        assert_eq!(Listing::Listed.word(), None);
        assert_eq!(unlisted.word(), Some("unlisted"));
        assert_eq!(Listing::Saved.word(), Some("saved"));
    }
}
