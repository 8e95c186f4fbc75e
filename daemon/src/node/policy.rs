//! The policy commands: `a2actl policy set|show|test`, `tag`, `untag`. Setting a policy or
//! tags signs a statement with the network key (token holders only) and offers it to this
//! node's book, which persists it, enforces it and passes it to the coordinator and the members.

use std::collections::{BTreeMap, BTreeSet};

use a2a_proto::api::{GrantView, PolicyVerdict, PolicyView};
use a2a_proto::policy::{valid_name, PolicyDoc, PortSpec, TagStatement, Transport, MAX_TAGS};
use a2a_proto::time::now_ms;
use a2a_proto::NodeKey;

use crate::core::policy::{Grant, Member, Rules, Tracker, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::core::statements::{Statements, Taken};
use crate::io::Platform;
use crate::node::commands::{CommandError, Daemon};
use crate::node::session::Session;
use crate::tasks::policy::rules_now;

/// Checks tags given on the command line.
pub fn valid_tags(tags: Vec<String>) -> Result<BTreeSet<String>, CommandError> {
    let set: BTreeSet<String> = tags
        .into_iter()
        .map(|t| t.strip_prefix("tag:").unwrap_or(&t).to_string())
        .collect();
    if let Some(bad) = set.iter().find(|t| !valid_name(t)) {
        return Err(CommandError::Failed(format!(
            "bad tag `{bad}`: 1 to 63 of a-z, 0-9 and '-' (not at either end)"
        )));
    }
    if set.len() > MAX_TAGS {
        return Err(CommandError::Failed(format!(
            "{} tags, more than the limit of {MAX_TAGS}",
            set.len()
        )));
    }
    Ok(set)
}

/// What `policy show` and `status` print: the policy held and the tracker's counts.
pub fn view(book: &Statements, tracker: &Tracker, with_text: bool) -> PolicyView {
    let counts = tracker.counts();
    let grants = match book.policy() {
        None => Vec::new(),
        Some(p) => p
            .policy
            .grants
            .iter()
            .enumerate()
            .map(|(i, g)| GrantView {
                number: i as u32 + 1,
                src: g.src.iter().map(|s| s.to_string()).collect(),
                dst: g.dst.iter().map(|s| s.to_string()).collect(),
                ports: g.ports.iter().map(|p| p.to_string()).collect(),
                allowed: counts.allowed_by_grant.get(i).copied().unwrap_or(0),
            })
            .collect(),
    };
    let refused = BTreeMap::from([
        ("no_grant".to_string(), counts.refused_no_grant),
        ("no_flow".to_string(), counts.refused_no_flow),
        ("revoked".to_string(), counts.refused_revoked),
        ("table_full".to_string(), counts.refused_table_full),
        ("malformed".to_string(), counts.malformed),
        ("outbound".to_string(), counts.refused_outbound),
    ]);
    PolicyView {
        // What the packet path enforces now (the book may hold a newer one for a moment).
        version: tracker.rules().version(),
        text: if with_text {
            book.policy().map(|p| p.text.clone())
        } else {
            None
        },
        issued_ms: book.policy().map(|p| p.issued_ms),
        grants,
        refused,
        flows: tracker.flows() as u64,
    }
}

/// A member by name, overlay address or key: a peer, or this node.
fn find_member<P: Platform>(
    s: &Session<P>,
    own_key: NodeKey,
    target: &str,
) -> Result<(NodeKey, String), CommandError> {
    let is_self = target == s.name
        || target == s.current_ip().to_string()
        || target == s.current_ip6().to_string()
        || target == own_key.to_base64();
    if is_self {
        return Ok((own_key, s.name.clone()));
    }
    let peer = s
        .peers
        .find(target)
        .ok_or_else(|| CommandError::NoSuchPeer(target.to_string()))?;
    Ok((peer.key, peer.info().name))
}

/// `tcp:N`, `udp:N` or `icmp` as (protocol, port).
fn one_port(text: &str) -> Result<(u8, u16), CommandError> {
    let spec = PortSpec::parse(text).map_err(CommandError::Failed)?;
    match spec {
        PortSpec::Icmp => Ok((PROTO_ICMP, 0)),
        PortSpec::Range { transport, lo, hi } if lo == hi => Ok((
            match transport {
                Transport::Tcp => PROTO_TCP,
                Transport::Udp => PROTO_UDP,
            },
            lo,
        )),
        _ => Err(CommandError::Failed(format!(
            "`{text}` is not one port: test one of tcp:N, udp:N or icmp"
        ))),
    }
}

impl<P: Platform> Daemon<P> {
    /// Signs `text` as the next version of the network's policy and enforces it here at once
    /// (the members get it from the coordinator and from each other).
    pub async fn policy_set(&self, text: &str) -> Result<PolicyView, CommandError> {
        let slot = self.session.lock().await;
        let s = slot.as_ref().ok_or(CommandError::NotJoined)?;
        let credential = s.member.credential();
        let key = Self::network_key(&credential, "set the policy")?;
        s.policy.follow(key.id());
        let (version, known) = {
            let book = s.policy.read();
            (
                book.policy().map_or(0, |p| p.version) + 1,
                book.known_tags(),
            )
        };
        let signed = PolicyDoc::sign(&key, version, now_ms(), text, Some(&known))
            .map_err(|e| CommandError::Failed(format!("{e}; the policy in force is unchanged")))?;
        match s.policy.offer(&signed) {
            Ok(Taken::New) => {}
            Ok(Taken::Ignored) => {
                return Err(CommandError::Failed(
                    "a policy of this version is held already; try again".into(),
                ))
            }
            Err(e) => return Err(CommandError::Failed(e.to_string())),
        }
        // The book is read before the tracker is locked (status locks them in that order).
        let rules = rules_now(&s.policy, &s.peers, &s.name);
        s.dataplane.tracker().set_rules(rules);
        tracing::info!("policy version {version} set");
        let book = s.policy.read();
        let shown = view(&book, &s.dataplane.tracker(), true);
        Ok(shown)
    }

    pub async fn policy_show(&self) -> Result<PolicyView, CommandError> {
        let slot = self.session.lock().await;
        let s = slot.as_ref().ok_or(CommandError::NotJoined)?;
        let book = s.policy.read();
        let shown = view(&book, &s.dataplane.tracker(), true);
        Ok(shown)
    }

    /// May `src` open `port` on `dst`, by the policy held here?
    pub async fn policy_test(
        &self,
        src: &str,
        dst: &str,
        port: &str,
    ) -> Result<PolicyVerdict, CommandError> {
        let slot = self.session.lock().await;
        let s = slot.as_ref().ok_or(CommandError::NotJoined)?;
        let own = self.node_key();
        let (src_key, src_name) = find_member(s, own, src)?;
        let (dst_key, dst_name) = find_member(s, own, dst)?;
        if src_key == dst_key {
            return Err(CommandError::Failed(format!(
                "{src_name} is both the source and the destination: the policy is about \
                 traffic between members"
            )));
        }
        let (proto, number) = one_port(port)?;
        let book = s.policy.read();
        let (src_tags, dst_tags) = (book.tags(&src_key), book.tags(&dst_key));
        let rules = Rules::compile(
            book.policy().map(|p| &p.policy),
            Member {
                key: dst_key,
                name: &dst_name,
                tags: dst_tags,
            },
            [Member {
                key: src_key,
                name: &src_name,
                tags: src_tags,
            }],
        );
        let show = |t: &BTreeSet<String>| {
            if t.is_empty() {
                "no tags".to_string()
            } else {
                t.iter()
                    .map(|t| format!("tag:{t}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        };
        let what = format!(
            "{src_name} ({}) -> {dst_name} ({}) {port}",
            show(src_tags),
            show(dst_tags)
        );
        Ok(match rules.check_inbound(&src_key, proto, number) {
            Some(Grant::NoPolicy) => PolicyVerdict {
                allowed: true,
                grant: None,
                reason: format!("{what}: allowed (no policy is set: everything is)"),
            },
            Some(Grant::Daemon) => PolicyVerdict {
                allowed: true,
                grant: None,
                reason: format!(
                    "{what}: allowed (a2ad's own exchange between members, never refused)"
                ),
            },
            Some(Grant::Index(i)) => PolicyVerdict {
                allowed: true,
                grant: Some(u32::from(i) + 1),
                reason: format!("{what}: allowed by grant {}", i + 1),
            },
            None => PolicyVerdict {
                allowed: false,
                grant: None,
                reason: format!("{what}: refused (no grant allows it)"),
            },
        })
    }

    /// Adds (`remove` false) or removes tags of a member: the next version of its tag
    /// statement, signed with the network key.
    pub async fn tag(
        &self,
        target: &str,
        tags: Vec<String>,
        remove: bool,
    ) -> Result<(String, Vec<String>), CommandError> {
        let tags = valid_tags(tags)?;
        if tags.is_empty() {
            return Err(CommandError::Failed("name at least one tag".into()));
        }
        let slot = self.session.lock().await;
        let s = slot.as_ref().ok_or(CommandError::NotJoined)?;
        let credential = s.member.credential();
        let key = Self::network_key(&credential, if remove { "untag" } else { "tag" })?;
        s.policy.follow(key.id());
        let (node_key, name) = find_member(s, self.node_key(), target)?;
        let (version, mut held) = {
            let book = s.policy.read();
            (
                book.tags_version(&node_key) + 1,
                book.tags(&node_key).clone(),
            )
        };
        if remove {
            held.retain(|t| !tags.contains(t));
        } else {
            held.extend(tags);
        }
        let statement = TagStatement {
            network: key.id(),
            node_key,
            version,
            issued_ms: now_ms(),
            tags: held.clone(),
        };
        let signed = statement
            .sign(&key)
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        s.policy
            .offer(&signed)
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        // The book is read before the tracker is locked (status locks them in that order).
        let rules = rules_now(&s.policy, &s.peers, &s.name);
        s.dataplane.tracker().set_rules(rules);
        Ok((name, held.into_iter().collect()))
    }
}
