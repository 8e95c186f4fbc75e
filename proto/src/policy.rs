//! Who may reach whom: the policy document (grants from tagged or named members to tagged or
//! named members on ports), the network key's signature over a versioned policy, and tag
//! statements (the network key's word that a node key carries some tags). I/O-free: the
//! daemon's `core::policy` compiles a verified policy into a per-flow lookup.
//!
//! A policy is JSON, for example
//! `{"grants": [{"src": ["tag:planner"], "dst": ["tag:worker"], "ports": ["tcp:8080", "icmp"]}]}`.
//! A selector is `tag:NAME`, a member name or `*`; a port is `tcp:N`, `tcp:N-M`, `tcp:*`, the
//! same for `udp`, `icmp` or `*` (every protocol and port). Anything else is refused with the
//! line and column and the problem.

use std::collections::BTreeSet;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::keys::{NetworkId, NetworkKey, NodeKey};
use crate::record::MAX_NAME_LEN;
use crate::signed::{RecordError, Signed};

/// Largest policy document accepted, in bytes.
pub const MAX_POLICY_LEN: usize = 64 * 1024;
/// Most grants one policy holds.
pub const MAX_GRANTS: usize = 1000;
/// Most tags one member carries.
pub const MAX_TAGS: usize = 32;
/// Where a2ad passes the policy and the tag statements to other members, over the overlay
/// (UDP: a digest of what it holds; TCP: the whole [`Bundle`] to a member whose digest differs).
pub const POLICY_PORT: u16 = 4748;
/// Largest [`Bundle`] read from a member: the largest policy and a tag statement for many
/// members.
pub const MAX_BUNDLE_BYTES: usize = 4 * 1024 * 1024;
/// Signature context of a policy document (`a2actl policy set`).
pub const POLICY_CONTEXT: &[u8] = b"a2a policy v1";
/// Signature context of a tag statement (`a2actl tag`).
pub const TAGS_CONTEXT: &[u8] = b"a2a tags v1";

/// The transport a port range is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Tcp,
    Udp,
}

/// Who a grant is from or to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// `*`: every member.
    Any,
    /// `tag:NAME`: every member carrying the tag.
    Tag(String),
    /// A member's name.
    Member(String),
}

/// What a grant opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortSpec {
    /// `*`: every protocol and port.
    Any,
    /// `icmp`: ICMP / ICMPv6 echo.
    Icmp,
    /// `tcp:N`, `tcp:N-M`, `tcp:*`, and the same for `udp` (inclusive).
    Range {
        transport: Transport,
        lo: u16,
        hi: u16,
    },
}

/// One grant: members matching `src` may open flows to members matching `dst` on `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    #[serde(deserialize_with = "non_empty")]
    pub src: Vec<Selector>,
    #[serde(deserialize_with = "non_empty")]
    pub dst: Vec<Selector>,
    #[serde(deserialize_with = "non_empty")]
    pub ports: Vec<PortSpec>,
    /// The local users `src` members may log in as on `dst` members over SSH (`a2actl ssh`;
    /// the grant's ports must open `tcp:22`).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "ssh_users"
    )]
    pub ssh: Vec<String>,
}

impl Grant {
    /// Whether the grant's ports open TCP port 22.
    fn opens_ssh(&self) -> bool {
        self.ports.iter().any(|p| match *p {
            PortSpec::Any => true,
            PortSpec::Range {
                transport: Transport::Tcp,
                lo,
                hi,
            } => lo <= 22 && 22 <= hi,
            _ => false,
        })
    }
}

fn ssh_users<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    for u in &v {
        crate::ssh::validate_user(u).map_err(de::Error::custom)?;
    }
    Ok(v)
}

/// The policy document: a list of grants. Nothing is allowed that no grant allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub grants: Vec<Grant>,
}

/// Why a policy document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "policy is {len} bytes, more than the limit of {MAX_POLICY_LEN}: split it or use tags"
    )]
    TooLarge { len: usize },
    #[error(
        "policy has {count} grants, more than the limit of {MAX_GRANTS}: merge grants with tags"
    )]
    TooManyGrants { count: usize },
    #[error("policy does not parse at line {line} column {column}: {problem}")]
    Syntax {
        line: usize,
        column: usize,
        problem: String,
    },
    #[error("policy names unknown tag `{tag}` at line {line} column {column}: tag a member with it first, or fix the name")]
    UnknownTag {
        tag: String,
        line: usize,
        column: usize,
    },
    #[error("policy grant at line {line} column {column} names SSH users but its ports do not open tcp:22: add \"tcp:22\" to its ports")]
    SshWithoutPort { line: usize, column: usize },
    #[error("signed policy refused: {0}")]
    Signature(RecordError),
}

impl Policy {
    /// Parses a policy document. With `known_tags`, a `tag:NAME` outside the set is refused
    /// (what `a2actl policy set` does); without, any well-formed tag is taken (what a member
    /// does with a signed policy: a tag nobody carries yet matches nobody).
    pub fn parse(text: &str, known_tags: Option<&BTreeSet<String>>) -> Result<Policy, PolicyError> {
        if text.len() > MAX_POLICY_LEN {
            return Err(PolicyError::TooLarge { len: text.len() });
        }
        let policy: Policy = serde_json::from_str(text).map_err(|e| PolicyError::Syntax {
            line: e.line(),
            column: e.column(),
            problem: strip_position(&e.to_string()),
        })?;
        if policy.grants.len() > MAX_GRANTS {
            return Err(PolicyError::TooManyGrants {
                count: policy.grants.len(),
            });
        }
        if let Some(g) = policy
            .grants
            .iter()
            .position(|g| !g.ssh.is_empty() && !g.opens_ssh())
        {
            let (line, column) = nth_position_of(text, "\"ssh\"", ssh_index(&policy, g));
            return Err(PolicyError::SshWithoutPort { line, column });
        }
        if let Some(known) = known_tags {
            for g in &policy.grants {
                for s in g.src.iter().chain(&g.dst) {
                    if let Selector::Tag(t) = s {
                        if !known.contains(t) {
                            let (line, column) = position_of(text, &format!("tag:{t}"));
                            return Err(PolicyError::UnknownTag {
                                tag: t.clone(),
                                line,
                                column,
                            });
                        }
                    }
                }
            }
        }
        Ok(policy)
    }
}

/// Which of the grants naming SSH users grant `g` is (0-based), to find its `"ssh"` in the text.
fn ssh_index(policy: &Policy, g: usize) -> usize {
    policy.grants[..g]
        .iter()
        .filter(|g| !g.ssh.is_empty())
        .count()
}

/// Line and column (1-based) of the `n`-th occurrence of `needle` in `text` (the first when
/// there are fewer).
fn nth_position_of(text: &str, needle: &str, n: usize) -> (usize, usize) {
    let at = text
        .match_indices(needle)
        .nth(n)
        .or_else(|| text.match_indices(needle).next())
        .map_or(0, |(i, _)| i);
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(at, |nl| at - nl - 1) + 1;
    (line, column)
}

/// serde_json appends " at line L column C"; the error names the position itself.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Line and column (1-based) of the first `"needle"` string in `text`.
fn position_of(text: &str, needle: &str) -> (usize, usize) {
    let quoted = format!("\"{needle}\"");
    let at = text.find(&quoted).unwrap_or(0);
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = at - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

fn non_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    let v = Vec::<T>::deserialize(d)?;
    if v.is_empty() {
        return Err(de::Error::custom(
            "empty list: a grant needs at least one src, dst and port (use \"*\" for all)",
        ));
    }
    Ok(v)
}

/// A tag: the same rule as a node name (1 to 63 of `a-z 0-9 -`, not starting or ending with
/// `-`), so a tag can become a DNS label later.
pub fn valid_name(name: &str) -> bool {
    crate::record::validate_name(name).is_ok()
}

impl Selector {
    pub fn parse(s: &str) -> Result<Selector, String> {
        if s == "*" {
            return Ok(Selector::Any);
        }
        if s.is_empty() {
            return Err("empty selector: use tag:NAME, a member name or *".into());
        }
        if let Some(t) = s.strip_prefix("tag:") {
            if t.is_empty() {
                return Err("empty selector `tag:`: name the tag, as in tag:worker".into());
            }
            if let Err(e) = crate::record::validate_name(t) {
                return Err(format!("bad tag `{t}`: {e}"));
            }
            return Ok(Selector::Tag(t.to_string()));
        }
        if let Err(e) = crate::record::validate_name(s) {
            return Err(format!(
                "bad selector `{s}`: use tag:NAME, a member name or *; as a member name, {e}"
            ));
        }
        Ok(Selector::Member(s.to_string()))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Any => f.write_str("*"),
            Selector::Tag(t) => write!(f, "tag:{t}"),
            Selector::Member(m) => f.write_str(m),
        }
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) && !s.starts_with('+') => Ok(n as u16),
        _ => Err(format!("bad port `{s}`: a number from 1 to 65535")),
    }
}

impl PortSpec {
    pub fn parse(s: &str) -> Result<PortSpec, String> {
        match s {
            "*" => return Ok(PortSpec::Any),
            "icmp" => return Ok(PortSpec::Icmp),
            _ => {}
        }
        let (transport, rest) = if let Some(r) = s.strip_prefix("tcp:") {
            (Transport::Tcp, r)
        } else if let Some(r) = s.strip_prefix("udp:") {
            (Transport::Udp, r)
        } else {
            return Err(format!(
                "bad port `{s}`: use tcp:N, tcp:N-M, tcp:*, the same for udp, icmp or *"
            ));
        };
        let (lo, hi) = if rest == "*" {
            (1, 65535)
        } else if let Some((a, b)) = rest.split_once('-') {
            let (lo, hi) = (parse_port(a)?, parse_port(b)?);
            if lo > hi {
                return Err(format!("bad port range `{s}`: {lo} is above {hi}"));
            }
            (lo, hi)
        } else {
            let p = parse_port(rest)?;
            (p, p)
        };
        Ok(PortSpec::Range { transport, lo, hi })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::Any => f.write_str("*"),
            PortSpec::Icmp => f.write_str("icmp"),
            PortSpec::Range { transport, lo, hi } => {
                let t = match transport {
                    Transport::Tcp => "tcp",
                    Transport::Udp => "udp",
                };
                if lo == hi {
                    write!(f, "{t}:{lo}")
                } else if (*lo, *hi) == (1, 65535) {
                    write!(f, "{t}:*")
                } else {
                    write!(f, "{t}:{lo}-{hi}")
                }
            }
        }
    }
}

macro_rules! string_serde {
    ($ty:ty, $what:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$ty, E> {
                        <$ty>::parse(s).map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}
string_serde!(Selector, "a selector string (tag:NAME, a member name or *)");
string_serde!(PortSpec, "a port string (tcp:N, tcp:N-M, udp:N, icmp or *)");

/// A policy as signed: the document's text (kept as written, so its line numbers mean
/// something in `policy show`) and a version; the highest version a member has seen wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDoc {
    pub network: NetworkId,
    pub version: u64,
    pub issued_ms: u64,
    pub text: String,
}

/// A policy whose signature verified and whose text parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPolicy {
    pub version: u64,
    pub issued_ms: u64,
    pub text: String,
    pub policy: Policy,
    /// The signed form, to persist and to pass to other members.
    pub signed: Signed,
}

impl PolicyDoc {
    /// Signs a policy; refuses one that does not parse against `known_tags`.
    pub fn sign(
        key: &NetworkKey,
        version: u64,
        issued_ms: u64,
        text: &str,
        known_tags: Option<&BTreeSet<String>>,
    ) -> Result<Signed, PolicyError> {
        Policy::parse(text, known_tags)?;
        let doc = PolicyDoc {
            network: key.id(),
            version,
            issued_ms,
            text: text.to_string(),
        };
        Ok(Signed::sign(&doc, key, POLICY_CONTEXT))
    }

    /// Verifies a signed policy for `network` and parses its text.
    pub fn open(signed: &Signed, network: &NetworkId) -> Result<VerifiedPolicy, PolicyError> {
        let doc: PolicyDoc = signed
            .open(network, POLICY_CONTEXT)
            .map_err(PolicyError::Signature)?;
        if doc.network != *network {
            return Err(PolicyError::Signature(RecordError::Foreign));
        }
        let policy = Policy::parse(&doc.text, None)?;
        Ok(VerifiedPolicy {
            version: doc.version,
            issued_ms: doc.issued_ms,
            text: doc.text,
            policy,
            signed: signed.clone(),
        })
    }
}

/// What to do with a verified policy given the one held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyUpdate {
    /// Newer than the one held (or none held): take it, persist it, pass it on.
    Take,
    /// The one held: nothing to do.
    Same,
    /// Older than the one held (a replay): keep the held one.
    Older,
    /// The held version with other content (two token holders signed the same version):
    /// keep the held one; the operator sets a higher version.
    Conflict,
}

impl VerifiedPolicy {
    pub fn newer_than(&self, held: Option<&VerifiedPolicy>) -> PolicyUpdate {
        match held {
            None => PolicyUpdate::Take,
            Some(h) if self.version > h.version => PolicyUpdate::Take,
            Some(h) if self.version < h.version => PolicyUpdate::Older,
            Some(h) if h.text == self.text => PolicyUpdate::Same,
            Some(_) => PolicyUpdate::Conflict,
        }
    }
}

/// "This node key carries these tags" (`a2actl tag`, `untag`, `invite --tag`): signed by the
/// network key, so neither the member nor the hub can add one. The highest version per node
/// key wins; untagging is a newer statement with fewer tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagStatement {
    pub network: NetworkId,
    pub node_key: NodeKey,
    pub version: u64,
    pub issued_ms: u64,
    pub tags: BTreeSet<String>,
}

impl TagStatement {
    pub fn sign(&self, key: &NetworkKey) -> Result<Signed, RecordError> {
        self.check()?;
        Ok(Signed::sign(self, key, TAGS_CONTEXT))
    }

    pub fn open(signed: &Signed, network: &NetworkId) -> Result<TagStatement, RecordError> {
        let s: TagStatement = signed.open(network, TAGS_CONTEXT)?;
        if s.network != *network {
            return Err(RecordError::Foreign);
        }
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), RecordError> {
        if self.tags.len() > MAX_TAGS {
            return Err(RecordError::Invalid(format!(
                "{} tags, more than the limit of {MAX_TAGS}",
                self.tags.len()
            )));
        }
        if let Some(t) = self.tags.iter().find(|t| !valid_name(t)) {
            return Err(RecordError::Invalid(format!(
                "bad tag `{t}`: 1 to {MAX_NAME_LEN} of a-z, 0-9 and '-' (not at either end)"
            )));
        }
        Ok(())
    }

    /// Whether this statement replaces `held` for the same node key.
    pub fn replaces(&self, held: Option<&TagStatement>) -> bool {
        held.is_none_or(|h| h.node_key == self.node_key && self.version > h.version)
    }
}

/// Every signed statement a member holds: the policy (highest version seen) and one tag
/// statement per tagged member. What a member serves other members on [`POLICY_PORT`] and
/// keeps in its state directory. Each part is verified by whoever reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Signed>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<Signed>,
}

const DIGEST_MAGIC: &[u8; 6] = b"a2apd1";

/// The datagram a member sends to others (UDP [`POLICY_PORT`]): "what I hold sums to
/// `digest`"; a member holding something else fetches the other's bundle.
pub fn digest_datagram(digest: u64) -> [u8; 14] {
    let mut d = [0u8; 14];
    d[..6].copy_from_slice(DIGEST_MAGIC);
    d[6..].copy_from_slice(&digest.to_be_bytes());
    d
}

/// The digest in a digest datagram, or `None` when it is not one.
pub fn parse_digest(d: &[u8]) -> Option<u64> {
    if d.len() != 14 || &d[..6] != DIGEST_MAGIC {
        return None;
    }
    Some(u64::from_be_bytes(d[6..].try_into().ok()?))
}

const LEAVE_MAGIC: &[u8; 6] = b"a2alv1";

/// The datagram a member sends every peer (UDP [`POLICY_PORT`], through its tunnels) when it
/// leaves the network (`a2actl down`): "I leave". Only the tunnel says who sent it, so only the
/// member itself can say it; a peer that has it drops the member as soon as the coordinator
/// stops listing it, instead of keeping it while a direct path might still live.
pub fn leave_datagram() -> [u8; 6] {
    *LEAVE_MAGIC
}

/// Whether `d` is a leave datagram.
pub fn is_leave(d: &[u8]) -> bool {
    d == LEAVE_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leave_datagram_is_not_a_digest_and_a_digest_is_not_a_leave() {
        assert!(is_leave(&leave_datagram()));
        assert_eq!(parse_digest(&leave_datagram()), None);
        assert!(!is_leave(&digest_datagram(7)));
        assert!(!is_leave(b"a2alv"));
        assert!(!is_leave(b"a2alv12"));
    }

    const EXAMPLE: &str = r#"{"grants": [{"src": ["tag:planner"], "dst": ["tag:worker"], "ports": ["tcp:8080", "icmp"]}]}"#;

    fn tags(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn syntax(text: &str) -> (usize, usize, String) {
        match Policy::parse(text, None) {
            Err(PolicyError::Syntax {
                line,
                column,
                problem,
            }) => (line, column, problem),
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn ssh_users_are_checked_and_need_port_22() {
        let ok = r#"{"grants": [{"src": ["*"], "dst": ["*"], "ports": ["tcp:22"], "ssh": ["agent", "_deploy"]}]}"#;
        assert_eq!(
            Policy::parse(ok, None).unwrap().grants[0].ssh,
            ["agent", "_deploy"]
        );
        let bad_user = ok.replace("agent", "Root User");
        assert!(matches!(
            Policy::parse(&bad_user, None),
            Err(PolicyError::Syntax { .. })
        ));
        let text = "{\"grants\": [\n {\"src\": [\"*\"], \"dst\": [\"*\"], \"ports\": [\"tcp:80\"]},\n {\"src\": [\"*\"], \"dst\": [\"*\"], \"ports\": [\"udp:22\"], \"ssh\": [\"agent\"]}]}";
        match Policy::parse(text, None) {
            Err(PolicyError::SshWithoutPort { line, .. }) => assert_eq!(line, 3),
            other => panic!("{other:?}"),
        }
        let any = ok.replace("tcp:22", "*");
        assert!(Policy::parse(&any, None).is_ok());
    }

    #[test]
    fn parses_the_example() {
        let p = Policy::parse(EXAMPLE, Some(&tags(&["planner", "worker"]))).unwrap();
        assert_eq!(
            p.grants,
            vec![Grant {
                src: vec![Selector::Tag("planner".into())],
                dst: vec![Selector::Tag("worker".into())],
                ports: vec![
                    PortSpec::Range {
                        transport: Transport::Tcp,
                        lo: 8080,
                        hi: 8080
                    },
                    PortSpec::Icmp
                ],
                ssh: vec![],
            }]
        );
        // Round trip through its own JSON.
        let again = Policy::parse(&serde_json::to_string(&p).unwrap(), None).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn parses_every_selector_and_port_form() {
        let text = r#"{"grants": [{"src": ["*", "alice", "tag:a"], "dst": ["bob-1"],
            "ports": ["tcp:1-1024", "udp:53", "udp:*", "*", "icmp"]}]}"#;
        let p = Policy::parse(text, None).unwrap();
        assert_eq!(
            p.grants[0].src,
            vec![
                Selector::Any,
                Selector::Member("alice".into()),
                Selector::Tag("a".into())
            ]
        );
        assert_eq!(
            p.grants[0].ports[2],
            PortSpec::Range {
                transport: Transport::Udp,
                lo: 1,
                hi: 65535
            }
        );
        assert_eq!(p.grants[0].ports[3], PortSpec::Any);
        // An empty policy allows nothing, and parses.
        assert!(Policy::parse(r#"{"grants": []}"#, None)
            .unwrap()
            .grants
            .is_empty());
    }

    #[test]
    fn refuses_an_unknown_field_naming_line_and_column() {
        let text = "{\"grants\": [\n  {\"src\": [\"*\"], \"dst\": [\"*\"], \"ports\": [\"*\"],\n   \"port\": 1}]}";
        let (line, column, problem) = syntax(text);
        assert_eq!(line, 3);
        assert!(column > 1, "{column}");
        assert!(problem.contains("unknown field `port`"), "{problem}");
        let (line, _, problem) = syntax("{\"grant\": []}");
        assert_eq!(line, 1);
        assert!(problem.contains("unknown field `grant`"), "{problem}");
    }

    #[test]
    fn refuses_bad_ports_naming_the_line() {
        for (port, want) in [
            (
                "tcp:9000-80",
                "bad port range `tcp:9000-80`: 9000 is above 80",
            ),
            ("tcp:0", "bad port `0`"),
            ("tcp:65536", "bad port `65536`"),
            ("tcp:", "bad port ``"),
            ("tcp:+5", "bad port `+5`"),
            ("sctp:5", "bad port `sctp:5`"),
            ("", "bad port ``"),
        ] {
            let text = format!(
                "{{\"grants\": [{{\"src\": [\"*\"], \"dst\": [\"*\"],\n \"ports\": [\"{port}\"]}}]}}"
            );
            let (line, _, problem) = syntax(&text);
            assert_eq!(line, 2, "{port}");
            assert!(problem.contains(want), "{port}: {problem}");
        }
    }

    #[test]
    fn refuses_empty_and_bad_selectors() {
        for (sel, want) in [
            ("", "empty selector"),
            ("tag:", "empty selector `tag:`"),
            ("tag:a b", "bad tag `a b`"),
            ("has space", "bad selector `has space`"),
            ("Alice", "bad selector `Alice`"),
            ("tag:Worker", "bad tag `Worker`"),
        ] {
            let text = format!(
                "{{\"grants\": [\n{{\"src\": [\"{sel}\"], \"dst\": [\"*\"], \"ports\": [\"*\"]}}]}}"
            );
            let (line, _, problem) = syntax(&text);
            assert_eq!(line, 2, "{sel}");
            assert!(problem.contains(want), "{sel}: {problem}");
        }
        let (_, _, problem) = syntax(r#"{"grants": [{"src": [], "dst": ["*"], "ports": ["*"]}]}"#);
        assert!(problem.contains("empty list"), "{problem}");
        let (_, _, problem) = syntax(r#"{"grants": [{"src": ["*"], "ports": ["*"]}]}"#);
        assert!(problem.contains("missing field `dst`"), "{problem}");
        let (_, _, problem) = syntax("{\"grants\": [");
        assert!(problem.contains("EOF"), "{problem}");
    }

    #[test]
    fn refuses_an_unknown_tag_when_the_tags_are_known() {
        let text = "{\"grants\": [\n {\"src\": [\"tag:planner\"],\n  \"dst\": [\"tag:wroker\"], \"ports\": [\"*\"]}]}";
        let err = Policy::parse(text, Some(&tags(&["planner", "worker"]))).unwrap_err();
        assert_eq!(
            err,
            PolicyError::UnknownTag {
                tag: "wroker".into(),
                line: 3,
                column: 11
            }
        );
        assert!(err.to_string().contains("line 3 column 11"), "{err}");
        // Without the set (a member checking a signed policy) it parses.
        assert!(Policy::parse(text, None).is_ok());
    }

    #[test]
    fn refuses_documents_over_the_limits() {
        let big = format!("{{\"grants\": []{}}}", " ".repeat(MAX_POLICY_LEN));
        let err = Policy::parse(&big, None).unwrap_err();
        assert!(matches!(err, PolicyError::TooLarge { .. }));
        assert!(err.to_string().contains("65536"), "{err}");
        let grant = r#"{"src":["*"],"dst":["*"],"ports":["*"]}"#;
        let many = format!("{{\"grants\":[{}]}}", vec![grant; MAX_GRANTS + 1].join(","));
        assert!(many.len() <= MAX_POLICY_LEN);
        let err = Policy::parse(&many, None).unwrap_err();
        assert_eq!(err, PolicyError::TooManyGrants { count: 1001 });
        assert!(err.to_string().contains("limit of 1000"), "{err}");
        let ok = format!("{{\"grants\":[{}]}}", vec![grant; MAX_GRANTS].join(","));
        assert_eq!(Policy::parse(&ok, None).unwrap().grants.len(), MAX_GRANTS);
    }

    #[test]
    fn signed_policies_verify_and_bind_network_and_context() {
        let net = NetworkKey::derive(&[1; 32]);
        let s = PolicyDoc::sign(&net, 3, 10, EXAMPLE, None).unwrap();
        let v = PolicyDoc::open(&s, &net.id()).unwrap();
        assert_eq!((v.version, v.issued_ms, v.text.as_str()), (3, 10, EXAMPLE));
        // Another network's key (a forging hub): refused.
        let rogue = NetworkKey::derive(&[2; 32]);
        let forged = PolicyDoc::sign(&rogue, 4, 10, EXAMPLE, None).unwrap();
        assert_eq!(
            PolicyDoc::open(&forged, &net.id()),
            Err(PolicyError::Signature(RecordError::BadSignature))
        );
        // A body edited after signing (a version bumped by the hub): refused.
        let mut edited = s.clone();
        edited.body = edited.body.replace("\"version\":3", "\"version\":9");
        assert_ne!(edited.body, s.body);
        assert_eq!(
            PolicyDoc::open(&edited, &net.id()),
            Err(PolicyError::Signature(RecordError::BadSignature))
        );
        // The same body signed under another context (a tag statement's): refused.
        let doc: PolicyDoc = serde_json::from_str(&s.body).unwrap();
        let other_ctx = Signed::sign(&doc, &net, TAGS_CONTEXT);
        assert_eq!(
            PolicyDoc::open(&other_ctx, &net.id()),
            Err(PolicyError::Signature(RecordError::BadSignature))
        );
        // Signed by this network but naming another one: refused.
        let foreign = Signed::sign(
            &PolicyDoc {
                network: rogue.id(),
                ..doc
            },
            &net,
            POLICY_CONTEXT,
        );
        assert_eq!(
            PolicyDoc::open(&foreign, &net.id()),
            Err(PolicyError::Signature(RecordError::Foreign))
        );
        // Unsigned: refused.
        let unsigned = Signed {
            body: s.body.clone(),
            sig: String::new(),
        };
        assert_eq!(
            PolicyDoc::open(&unsigned, &net.id()),
            Err(PolicyError::Signature(RecordError::Unsigned))
        );
        // Signing refuses what does not parse; a signed text that does not parse is refused.
        assert!(PolicyDoc::sign(&net, 1, 1, "{}", None).is_err());
        let bad = Signed::sign(
            &PolicyDoc {
                network: net.id(),
                version: 5,
                issued_ms: 1,
                text: "{}".into(),
            },
            &net,
            POLICY_CONTEXT,
        );
        assert!(matches!(
            PolicyDoc::open(&bad, &net.id()),
            Err(PolicyError::Syntax { .. })
        ));
    }

    #[test]
    fn the_highest_version_wins_and_replays_change_nothing() {
        let net = NetworkKey::derive(&[1; 32]);
        let open = |v, text| {
            PolicyDoc::open(&PolicyDoc::sign(&net, v, 1, text, None).unwrap(), &net.id()).unwrap()
        };
        let v1 = open(1, EXAMPLE);
        let v2 = open(2, r#"{"grants": []}"#);
        assert_eq!(v1.newer_than(None), PolicyUpdate::Take);
        assert_eq!(v2.newer_than(Some(&v1)), PolicyUpdate::Take);
        // The old one replayed: kept the new one.
        assert_eq!(v1.newer_than(Some(&v2)), PolicyUpdate::Older);
        assert_eq!(v2.clone().newer_than(Some(&v2)), PolicyUpdate::Same);
        assert_eq!(
            open(2, EXAMPLE).newer_than(Some(&v2)),
            PolicyUpdate::Conflict
        );
    }

    #[test]
    fn tag_statements_sign_verify_and_replace_by_version() {
        let net = NetworkKey::derive(&[1; 32]);
        let st = TagStatement {
            network: net.id(),
            node_key: NodeKey([7; 32]),
            version: 2,
            issued_ms: 5,
            tags: tags(&["worker"]),
        };
        let s = st.sign(&net).unwrap();
        assert_eq!(TagStatement::open(&s, &net.id()).unwrap(), st);
        // Forged by another key, or edited: refused.
        let rogue = NetworkKey::derive(&[2; 32]);
        let forged = Signed::sign(&st, &rogue, TAGS_CONTEXT);
        assert_eq!(
            TagStatement::open(&forged, &net.id()),
            Err(RecordError::BadSignature)
        );
        let mut edited = s.clone();
        edited.body = edited.body.replace("worker", "admins");
        assert_eq!(
            TagStatement::open(&edited, &net.id()),
            Err(RecordError::BadSignature)
        );
        // A policy's signature does not pass for a tag statement.
        let as_policy = Signed::sign(&st, &net, POLICY_CONTEXT);
        assert_eq!(
            TagStatement::open(&as_policy, &net.id()),
            Err(RecordError::BadSignature)
        );
        // Bad tags and too many tags are refused at signing and at opening.
        let bad = TagStatement {
            tags: tags(&["no space"]),
            ..st.clone()
        };
        assert!(bad.sign(&net).is_err());
        assert!(TagStatement::open(&Signed::sign(&bad, &net, TAGS_CONTEXT), &net.id()).is_err());
        let many = TagStatement {
            tags: (0..=MAX_TAGS).map(|i| format!("t{i}")).collect(),
            ..st.clone()
        };
        assert!(many
            .sign(&net)
            .unwrap_err()
            .to_string()
            .contains("limit of 32"));
        // Replacement: newer versions only, same node key only.
        let older = TagStatement {
            version: 1,
            ..st.clone()
        };
        let newer = TagStatement {
            version: 3,
            tags: BTreeSet::new(),
            ..st.clone()
        };
        assert!(st.replaces(None));
        assert!(newer.replaces(Some(&st)));
        assert!(!older.replaces(Some(&st)));
        assert!(!st.replaces(Some(&st)));
        let other = TagStatement {
            node_key: NodeKey([8; 32]),
            version: 9,
            ..st.clone()
        };
        assert!(!other.replaces(Some(&st)));
    }
}
