//! This node's standing in its network: the credential it registers with (swapped when the
//! network rotates its secret), the invites it made and honours, and the node keys removed from
//! the network. Free of I/O: what must be saved is handed back to the caller ([`Membership`],
//! the revocation list), which writes the state directory.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use a2a_proto::invite::{InviteCode, InviteId, InviteProof};
use a2a_proto::keys::SignerId;
use a2a_proto::membership::{Revocation, Signed};
use a2a_proto::overlay::derive_ip6;
use a2a_proto::sync::lock;
use a2a_proto::token::JoinToken;
use a2a_proto::{Credential, NetworkId, NodeKey};

use a2a_proto::membership::Invited;
use serde::{Deserialize, Serialize};

/// Membership kept across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The join token, or the invite code the node was admitted with (then `invited` is set).
    pub token: String,
    /// The member certificate and network of a node admitted by invite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invited: Option<Invited>,
    pub name: String,
    pub ip: Ipv4Addr,
    /// The IPv6 overlay address, derived from the network id and the node key (so a file
    /// written before IPv6 addresses, without it, loses nothing: it is derived on load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
}

impl Membership {
    /// The network this membership is in (`None` if the saved token does not parse).
    pub fn network_id(&self) -> Option<NetworkId> {
        match &self.invited {
            Some(i) => Some(i.network),
            None => JoinToken::parse(&self.token)
                .ok()
                .map(|t| Credential::from_token(t).network_id()),
        }
    }

    /// The IPv6 overlay address of `node` in this membership's network, derived (the saved
    /// one is a copy for people reading the file).
    pub fn derived_ip6(&self, node: &NodeKey) -> Option<Ipv6Addr> {
        self.network_id().map(|n| derive_ip6(&n, node))
    }
}

/// Most invites one node keeps open at once (the coordinator's cap too).
pub const MAX_OPEN_INVITES: usize = 64;
/// Longest invite lifetime accepted.
pub const MAX_INVITE_TTL_MS: u64 = 30 * 24 * 3600 * 1000;
/// Most uses one invite may have.
pub const MAX_INVITE_USES: u32 = 1000;

struct OpenInvite {
    code: InviteCode,
    uses_left: u32,
    expires_ms: u64,
    /// Tags each member admitted by it gets (`a2actl invite --tag`).
    tags: std::collections::BTreeSet<String>,
}

/// Why a redemption was refused, as told to the redeemer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    Unknown,
    UsedUp,
    Expired,
    BadProof,
}

impl Denial {
    pub fn message(&self) -> &'static str {
        match self {
            Denial::Unknown => {
                "this invite is not known to the member that should hold it; ask for a new invite"
            }
            Denial::UsedUp => {
                "this invite has been used up; ask a member for a new invite (`a2actl invite`)"
            }
            Denial::Expired => {
                "this invite has expired; ask a member for a new invite (`a2actl invite --ttl ...`)"
            }
            Denial::BadProof => "the invite proof does not match this invite",
        }
    }
}

/// The invites this node made, in memory only: a daemon restart voids them.
#[derive(Default)]
pub struct InviteBook {
    open: HashMap<InviteId, OpenInvite>,
}

impl InviteBook {
    /// Records a new invite; the caller announces its id to the coordinator.
    pub fn open(
        &mut self,
        code: InviteCode,
        uses: u32,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<InviteId, String> {
        self.expire(now_ms);
        if uses == 0 || uses > MAX_INVITE_USES {
            return Err(format!("--uses must be 1 to {MAX_INVITE_USES}"));
        }
        if self.open.len() >= MAX_OPEN_INVITES {
            return Err(format!(
                "this node already has {MAX_OPEN_INVITES} open invites; wait for some to expire"
            ));
        }
        let id = code.id();
        self.open.insert(
            id,
            OpenInvite {
                code,
                uses_left: uses,
                expires_ms,
                tags: Default::default(),
            },
        );
        Ok(id)
    }

    /// Gives the members admitted by invite `id` these tags (signed by the inviter when it
    /// admits each one).
    pub fn set_tags(&mut self, id: &InviteId, tags: std::collections::BTreeSet<String>) {
        if let Some(i) = self.open.get_mut(id) {
            i.tags = tags;
        }
    }

    /// The tags of invite `id` (none for an unknown one).
    pub fn tags(&self, id: &InviteId) -> std::collections::BTreeSet<String> {
        self.open
            .get(id)
            .map(|i| i.tags.clone())
            .unwrap_or_default()
    }

    /// Decides one redemption and, if admitted, takes one use, all at once: two redemptions of
    /// a one-time invite can never both pass. Returns the code (to seal the answer with) and
    /// whether the invite is now used up (to close it at the coordinator).
    pub fn redeem(
        &mut self,
        id: &InviteId,
        node_key: &NodeKey,
        signing_key: &SignerId,
        proof: &InviteProof,
        now_ms: u64,
    ) -> Result<(InviteCode, bool), Denial> {
        let invite = self.open.get_mut(id).ok_or(Denial::Unknown)?;
        if invite.expires_ms <= now_ms {
            self.open.remove(id);
            return Err(Denial::Expired);
        }
        // Constant time (`InviteProof`'s `==`).
        if invite.code.proof(node_key, signing_key) != *proof {
            return Err(Denial::BadProof);
        }
        if invite.uses_left == 0 {
            return Err(Denial::UsedUp);
        }
        invite.uses_left -= 1;
        let code = invite.code.clone();
        let used_up = invite.uses_left == 0;
        if used_up {
            self.open.remove(id);
        }
        Ok((code, used_up))
    }

    /// Drops expired invites; returns their ids.
    pub fn expire(&mut self, now_ms: u64) -> Vec<InviteId> {
        let gone: Vec<InviteId> = self
            .open
            .iter()
            .filter(|(_, i)| i.expires_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            self.open.remove(id);
        }
        gone
    }

    /// The ids still open, to announce again after reconnecting.
    pub fn ids(&self) -> Vec<InviteId> {
        self.open.keys().cloned().collect()
    }
}

/// Node keys removed from the network, with the signed revocations that prove it.
#[derive(Default)]
pub struct RevokedList {
    by_key: HashMap<NodeKey, Signed>,
}

impl RevokedList {
    pub fn contains(&self, key: &NodeKey) -> bool {
        self.by_key.contains_key(key)
    }

    /// Adds a verified revocation; false if it was already known.
    pub fn add(&mut self, r: &Revocation, signed: Signed) -> bool {
        self.by_key.insert(r.node_key, signed).is_none()
    }

    pub fn signed(&self) -> Vec<Signed> {
        self.by_key.values().cloned().collect()
    }
}

/// Shared by the control client and the daemon's commands.
pub struct MemberState {
    credential: RwLock<Arc<Credential>>,
    /// The token or invite code the credential came from, as saved.
    join_text: Mutex<String>,
    invites: Mutex<InviteBook>,
    revoked: Mutex<RevokedList>,
}

impl MemberState {
    /// Starts with `credential` and the revocations saved for its network (others are
    /// ignored).
    pub fn new(credential: Credential, join_text: String, saved: Vec<Signed>) -> MemberState {
        let network = credential.network_id();
        let mut revoked = RevokedList::default();
        for signed in saved {
            if let Ok(r) = Revocation::open(&signed, &network) {
                revoked.add(&r, signed);
            }
        }
        MemberState {
            credential: RwLock::new(Arc::new(credential)),
            join_text: Mutex::new(join_text),
            invites: Mutex::new(InviteBook::default()),
            revoked: Mutex::new(revoked),
        }
    }

    pub fn credential(&self) -> Arc<Credential> {
        a2a_proto::sync::read(&self.credential).clone()
    }

    /// Moves to a new network's credential: revocations and invites of the old one are void
    /// (the caller saves the new membership and the empty revocation list).
    pub fn replace_credential(&self, credential: Arc<Credential>, join_text: String) {
        *a2a_proto::sync::write(&self.credential) = credential;
        *lock(&self.join_text) = join_text;
        *lock(&self.invites) = InviteBook::default();
        *lock(&self.revoked) = RevokedList::default();
    }

    pub fn invites(&self) -> MutexGuard<'_, InviteBook> {
        lock(&self.invites)
    }

    pub fn is_revoked(&self, key: &NodeKey) -> bool {
        lock(&self.revoked).contains(key)
    }

    /// Adds a verified revocation: the list to save, or `None` if it was known.
    pub fn revoke(&self, r: &Revocation, signed: Signed) -> Option<Vec<Signed>> {
        let mut list = lock(&self.revoked);
        list.add(r, signed).then(|| list.signed())
    }

    pub fn revocations(&self) -> Vec<Signed> {
        lock(&self.revoked).signed()
    }

    pub fn join_text(&self) -> String {
        lock(&self.join_text).clone()
    }

    /// The membership to save for the current credential, as `name` at `ip`.
    pub fn membership(&self, name: String, ip: Ipv4Addr) -> Membership {
        let invited = match &*self.credential() {
            Credential::Invited { invited, .. } => Some(invited.clone()),
            Credential::Secret { .. } => None,
        };
        Membership {
            token: self.join_text(),
            invited,
            name,
            ip,
            ip6: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(n: u8) -> InviteCode {
        InviteCode {
            secret: [n; 16],
            coordinator_key: [1; 32],
            endpoints: vec!["h:1".into()],
        }
    }

    fn s() -> SignerId {
        a2a_proto::membership::node_signing_key(&[1; 32])
            .verifying_key()
            .into()
    }

    #[test]
    fn a_one_time_invite_admits_exactly_one() {
        let mut book = InviteBook::default();
        let c = code(1);
        let id = book.open(c.clone(), 1, 10_000, 0).unwrap();
        let (a, b) = (NodeKey([1; 32]), NodeKey([2; 32]));
        let (_, used_up) = book.redeem(&id, &a, &s(), &c.proof(&a, &s()), 5).unwrap();
        assert!(used_up);
        assert_eq!(
            book.redeem(&id, &b, &s(), &c.proof(&b, &s()), 5)
                .unwrap_err(),
            Denial::Unknown
        );
    }

    #[test]
    fn uses_expiry_and_proofs_are_enforced() {
        let mut book = InviteBook::default();
        let c = code(2);
        let id = book.open(c.clone(), 2, 1000, 0).unwrap();
        let k = |n| NodeKey([n; 32]);
        // A proof made for another key does not pass (what a coordinator replaying it sends).
        assert_eq!(
            book.redeem(&id, &k(9), &s(), &c.proof(&k(1), &s()), 1)
                .unwrap_err(),
            Denial::BadProof
        );
        assert!(
            !book
                .redeem(&id, &k(1), &s(), &c.proof(&k(1), &s()), 1)
                .unwrap()
                .1
        );
        assert!(
            book.redeem(&id, &k(2), &s(), &c.proof(&k(2), &s()), 2)
                .unwrap()
                .1
        );
        assert_eq!(
            book.redeem(&id, &k(3), &s(), &c.proof(&k(3), &s()), 3)
                .unwrap_err(),
            Denial::Unknown
        );
        let c = code(3);
        let id = book.open(c.clone(), 5, 1000, 0).unwrap();
        assert_eq!(
            book.redeem(&id, &k(1), &s(), &c.proof(&k(1), &s()), 1000)
                .unwrap_err(),
            Denial::Expired
        );
        assert!(book.open(code(4), 0, 1000, 0).is_err());
        let id = book.open(code(5), 1, 100, 0).unwrap();
        assert_eq!(book.expire(100), vec![id]);
        assert!(book.ids().is_empty());
    }
}
