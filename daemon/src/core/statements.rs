//! The network's signed word on who may reach whom, as this member holds it: the policy of the
//! highest version seen and, per node key, the tag statement of the highest version seen.
//! Everything offered (by the coordinator, by another member over the overlay, from the state
//! directory) is verified against the network's key first; a replay of an older version or a
//! forgery changes nothing. I/O-free: the caller persists the [`Bundle`] and passes statements on.

use std::collections::{BTreeSet, HashMap};

use a2a_proto::membership::Signed;
use a2a_proto::policy::{
    Bundle, PolicyDoc, PolicyError, PolicyUpdate, TagStatement, VerifiedPolicy,
};
use a2a_proto::signed::RecordError;
use a2a_proto::{NetworkId, NodeKey};

use crate::core::policy::{matches, Member, Rules};

/// Most node keys with a tag statement held (a statement is signed by the network key, so
/// only a token holder can make more; the bound keeps a buggy one from growing the table).
pub const MAX_TAGGED: usize = 16 * 1024;

/// What an offered statement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Newer than the one held: now held (persist it, recompile, pass it on).
    New,
    /// Already held, or older (a replay), or a conflicting copy of the held version: ignored.
    Ignored,
}

/// Why an offered statement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Policy(PolicyError),
    #[error("tag statement refused: {0}")]
    Tags(RecordError),
    #[error("tag statements are held for {MAX_TAGGED} members already")]
    TooManyTagged,
}

#[derive(Debug, Clone)]
pub struct Statements {
    network: NetworkId,
    policy: Option<VerifiedPolicy>,
    tags: HashMap<NodeKey, (TagStatement, Signed)>,
    /// Changes every time something is taken (the gossip compares these).
    digest: u64,
}

static NO_TAGS: BTreeSet<String> = BTreeSet::new();

impl Statements {
    pub fn new(network: NetworkId) -> Statements {
        Statements {
            network,
            policy: None,
            tags: HashMap::new(),
            digest: 0,
        }
    }

    /// The statements of `saved` that still verify for `network` (a file from another network
    /// or a damaged one gives what verifies, possibly nothing).
    pub fn load(network: NetworkId, saved: &Bundle) -> Statements {
        let mut s = Statements::new(network);
        if let Some(p) = &saved.policy {
            let _ = s.offer_policy(p);
        }
        for t in &saved.tags {
            let _ = s.offer_tags(t);
        }
        s
    }

    pub fn bundle(&self) -> Bundle {
        let mut tags: Vec<(&NodeKey, &Signed)> =
            self.tags.iter().map(|(k, (_, s))| (k, s)).collect();
        tags.sort_by_key(|(k, _)| **k);
        Bundle {
            policy: self.policy.as_ref().map(|p| p.signed.clone()),
            tags: tags.into_iter().map(|(_, s)| s.clone()).collect(),
        }
    }

    pub fn network(&self) -> NetworkId {
        self.network
    }

    pub fn policy(&self) -> Option<&VerifiedPolicy> {
        self.policy.as_ref()
    }

    /// A summary of what is held: two members whose summaries differ exchange statements.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    fn update_digest(&mut self) {
        // Order-independent: the sum of a hash per statement (policy version, and each node
        // key with its tags' version).
        let mut d = self
            .policy
            .as_ref()
            .map_or(0, |p| mix(p.version, &[0xAA; 32]));
        for (k, (t, _)) in &self.tags {
            d = d.wrapping_add(mix(t.version, &k.0));
        }
        self.digest = d;
    }

    pub fn tags(&self, key: &NodeKey) -> &BTreeSet<String> {
        self.tags.get(key).map_or(&NO_TAGS, |(t, _)| &t.tags)
    }

    /// The version of `key`'s tag statement (0: none).
    pub fn tags_version(&self, key: &NodeKey) -> u64 {
        self.tags.get(key).map_or(0, |(t, _)| t.version)
    }

    /// Every tag some member carries (a new policy may name only these).
    pub fn known_tags(&self) -> BTreeSet<String> {
        self.tags
            .values()
            .flat_map(|(t, _)| t.tags.iter().cloned())
            .collect()
    }

    /// Every signed statement held, to pass to a member or the coordinator.
    pub fn all_signed(&self) -> Vec<Signed> {
        let s = self.bundle();
        s.policy.into_iter().chain(s.tags).collect()
    }

    pub fn offer_policy(&mut self, signed: &Signed) -> Result<Taken, Refused> {
        let p = PolicyDoc::open(signed, &self.network).map_err(Refused::Policy)?;
        match p.newer_than(self.policy.as_ref()) {
            PolicyUpdate::Take => {
                self.policy = Some(p);
                self.update_digest();
                Ok(Taken::New)
            }
            PolicyUpdate::Same | PolicyUpdate::Older | PolicyUpdate::Conflict => Ok(Taken::Ignored),
        }
    }

    pub fn offer_tags(&mut self, signed: &Signed) -> Result<Taken, Refused> {
        let t = TagStatement::open(signed, &self.network).map_err(Refused::Tags)?;
        if !t.replaces(self.tags.get(&t.node_key).map(|(h, _)| h)) {
            return Ok(Taken::Ignored);
        }
        if !self.tags.contains_key(&t.node_key) && self.tags.len() >= MAX_TAGGED {
            return Err(Refused::TooManyTagged);
        }
        self.tags.insert(t.node_key, (t, signed.clone()));
        self.update_digest();
        Ok(Taken::New)
    }

    /// A statement of either kind (what arrives from other members and the coordinator).
    pub fn offer(&mut self, signed: &Signed) -> Result<Taken, Refused> {
        match self.offer_policy(signed) {
            Err(Refused::Policy(PolicyError::Signature(_))) => self.offer_tags(signed),
            other => other,
        }
    }

    /// The rules for `me` (`own_key`, `own_name`) among `members` (key and name each).
    pub fn rules<'a>(
        &self,
        own_key: NodeKey,
        own_name: &str,
        members: impl IntoIterator<Item = (NodeKey, &'a str)>,
    ) -> Rules {
        let me = Member {
            key: own_key,
            name: own_name,
            tags: self.tags(&own_key),
        };
        Rules::compile(
            self.policy.as_ref().map(|p| &p.policy),
            me,
            members.into_iter().map(|(key, name)| Member {
                key,
                name,
                tags: self.tags(&key),
            }),
        )
        .versioned(self.policy.as_ref().map_or(0, |p| p.version))
    }
}

impl Statements {
    /// Per member, the local users the policy lets it log in as on this node over SSH (the
    /// `"ssh"` of every grant from the member to this node); `None` with no policy set.
    pub fn ssh_users<'a>(
        &self,
        own_key: NodeKey,
        own_name: &str,
        members: impl IntoIterator<Item = (NodeKey, &'a str)>,
    ) -> Option<HashMap<NodeKey, BTreeSet<String>>> {
        let policy = &self.policy.as_ref()?.policy;
        let own_tags = self.tags(&own_key);
        let mut out = HashMap::new();
        for (key, name) in members {
            let tags = self.tags(&key);
            let users: BTreeSet<String> = policy
                .grants
                .iter()
                .filter(|g| {
                    g.src.iter().any(|s| matches(s, name, tags))
                        && g.dst.iter().any(|s| matches(s, own_name, own_tags))
                })
                .flat_map(|g| g.ssh.iter().cloned())
                .collect();
            out.insert(key, users);
        }
        Some(out)
    }
}

fn mix(version: u64, key: &[u8; 32]) -> u64 {
    // FNV-1a over the key and the version: not cryptographic, only a change detector.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.iter().chain(&version.to_le_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use a2a_proto::NetworkKey;

    fn key() -> NetworkKey {
        NetworkKey::derive(&[7; 32])
    }

    fn tags_of(k: &NetworkKey, node: NodeKey, version: u64, tags: &[&str]) -> Signed {
        TagStatement {
            network: k.id(),
            node_key: node,
            version,
            issued_ms: version,
            tags: tags.iter().map(|s| s.to_string()).collect(),
        }
        .sign(k)
        .unwrap()
    }

    const POLICY: &str =
        r#"{"grants": [{"src": ["tag:planner"], "dst": ["tag:worker"], "ports": ["tcp:8080"]}]}"#;

    #[test]
    fn the_highest_version_wins_and_replays_and_forgeries_change_nothing() {
        let k = key();
        let mut s = Statements::new(k.id());
        let v2 = PolicyDoc::sign(&k, 2, 2, POLICY, None).unwrap();
        let v1 = PolicyDoc::sign(&k, 1, 1, r#"{"grants": []}"#, None).unwrap();
        assert_eq!(s.offer(&v2), Ok(Taken::New));
        let d = s.digest();
        assert_eq!(s.offer(&v1), Ok(Taken::Ignored), "a replay of an older one");
        assert_eq!(s.offer(&v2), Ok(Taken::Ignored));
        let rogue = NetworkKey::derive(&[9; 32]);
        let forged = PolicyDoc::sign(&rogue, 9, 9, r#"{"grants": []}"#, None).unwrap();
        assert!(s.offer(&forged).is_err());
        assert_eq!(s.policy().unwrap().version, 2);
        assert_eq!(s.digest(), d);
    }

    #[test]
    fn tags_per_member_untag_and_survive_a_reload() {
        let k = key();
        let (p, w) = (NodeKey([1; 32]), NodeKey([2; 32]));
        let mut s = Statements::new(k.id());
        s.offer(&tags_of(&k, p, 1, &["planner"])).unwrap();
        s.offer(&tags_of(&k, w, 1, &["worker", "db"])).unwrap();
        assert_eq!(s.offer(&tags_of(&k, w, 2, &["worker"])), Ok(Taken::New));
        assert_eq!(
            s.offer(&tags_of(&k, w, 1, &["worker", "db"])),
            Ok(Taken::Ignored)
        );
        assert_eq!(s.tags(&w).len(), 1);
        assert_eq!(
            s.known_tags().into_iter().collect::<Vec<_>>(),
            vec!["planner".to_string(), "worker".to_string()]
        );
        s.offer(&PolicyDoc::sign(&k, 1, 1, POLICY, None).unwrap())
            .unwrap();
        let json = serde_json::to_string(&s.bundle()).unwrap();
        let back = Statements::load(k.id(), &serde_json::from_str(&json).unwrap());
        assert_eq!(back.digest(), s.digest());
        assert_eq!(back.tags(&p), s.tags(&p));
        assert!(back.policy().is_some());
        // Loaded under another network: nothing verifies.
        let other = Statements::load(NetworkId([3; 32]), &s.bundle());
        assert!(other.policy().is_none() && other.tags(&p).is_empty());
    }

    #[test]
    fn ssh_users_come_from_the_grants_to_this_node() {
        let k = key();
        let (p, w, u) = (NodeKey([1; 32]), NodeKey([2; 32]), NodeKey([3; 32]));
        let mut s = Statements::new(k.id());
        assert!(
            s.ssh_users(w, "w", [(p, "p")]).is_none(),
            "no policy, no answer"
        );
        s.offer(&tags_of(&k, p, 1, &["planner"])).unwrap();
        s.offer(&tags_of(&k, w, 1, &["worker"])).unwrap();
        let text = r#"{"grants": [
            {"src": ["tag:planner"], "dst": ["tag:worker"], "ports": ["tcp:22"], "ssh": ["agent"]},
            {"src": ["p"], "dst": ["*"], "ports": ["tcp:22"], "ssh": ["deploy"]},
            {"src": ["*"], "dst": ["*"], "ports": ["tcp:80"]}
        ]}"#;
        s.offer(&PolicyDoc::sign(&k, 1, 1, text, None).unwrap())
            .unwrap();
        let users = s.ssh_users(w, "w", [(p, "p"), (u, "u")]).unwrap();
        assert_eq!(users[&p].iter().collect::<Vec<_>>(), ["agent", "deploy"]);
        assert!(users[&u].is_empty());
        // Not to another node: the planner has no tag:worker grant onto itself.
        let users = s.ssh_users(p, "p", [(w, "w")]).unwrap();
        assert!(users[&w].is_empty());
    }

    #[test]
    fn rules_follow_tags() {
        let k = key();
        let (p, w, u) = (NodeKey([1; 32]), NodeKey([2; 32]), NodeKey([3; 32]));
        let mut s = Statements::new(k.id());
        s.offer(&tags_of(&k, p, 1, &["planner"])).unwrap();
        s.offer(&tags_of(&k, w, 1, &["worker"])).unwrap();
        s.offer(&PolicyDoc::sign(&k, 1, 1, POLICY, None).unwrap())
            .unwrap();
        let rules = s.rules(w, "w", [(p, "p"), (u, "u")]);
        assert!(rules.check_inbound(&p, 6, 8080).is_some());
        assert!(rules.check_inbound(&p, 6, 9090).is_none());
        assert!(rules.check_inbound(&u, 6, 8080).is_none());
    }
}
