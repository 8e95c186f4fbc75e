//! The coordinator's registry: which nodes of which networks are live, in memory only.
//!
//! Free of I/O: the server feeds it messages with the current time and a connection id, and it
//! answers with the messages to send and to whom. Nothing here is ever written or printed.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use a2a_proto::control::{RefuseReason, ServerMsg};
use a2a_proto::invite::{InviteId, InviteProof};
use a2a_proto::keys::{RelaySecret, Signature, SignerId, REGISTER_CONTEXT};
use a2a_proto::membership::{Revocation, RotationNotice, Signed};
use a2a_proto::overlay::derive_ip6;
use a2a_proto::policy::{PolicyDoc, TagStatement};
use a2a_proto::{NetworkId, NodeKey, SignedRecord};

/// Identifies one control connection; also the node's relay id while it is connected.
pub type ConnId = u32;

/// Ids from here up name what the cluster holds (remote members, redemptions another
/// coordinator passed on); local connections use the ids below.
pub const REMOTE_BASE: ConnId = 0x8000_0000;

/// Whether id `id` is in the cluster's half (see [`REMOTE_BASE`]).
pub fn is_remote_id(id: ConnId) -> bool {
    id >= REMOTE_BASE
}

/// Whether `ticket` names a redemption another coordinator passed on: never passed to the
/// cluster again.
fn is_cluster_ticket(ticket: ConnId) -> bool {
    is_remote_id(ticket)
}

/// Messages the server must send: each to the connection named.
pub type Sends = Vec<(ConnId, ServerMsg)>;

/// A refused request: the reason code and a message for the node.
pub type Refusal = (RefuseReason, String);

/// A `Register` message with what the channel knows of its sender.
pub struct RegisterRequest<'a> {
    /// The node's Noise static key, authenticated by the control channel.
    pub conn_key: NodeKey,
    /// The channel's handshake hash, which the proof must sign.
    pub handshake_hash: &'a [u8],
    pub network: NetworkId,
    /// The network key's signature over `handshake_hash`; none from a node admitted by invite.
    pub proof: Option<Signature>,
    pub record: SignedRecord,
    /// The secret the node proves its relay id with in UDP binds.
    pub relay_secret: RelaySecret,
}

struct Member {
    record: SignedRecord,
    ip: Ipv4Addr,
    /// The IPv6 overlay address, derived from the network id and node key (records do not
    /// carry it), kept so that a duplicate is refused without hashing every member again.
    ip6: Ipv6Addr,
    issued_ms: u64,
    conn: ConnId,
    relay_secret: RelaySecret,
    expires: Instant,
    /// Held by another coordinator of the cluster (see `cluster.rs`): `conn` is the
    /// relay id this coordinator gave it; it has no connection here and does not expire here.
    remote: bool,
}

/// A change to this coordinator's own members, for the cluster (see `cluster.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalChange {
    /// Registered, or a newer record.
    Up {
        network: NetworkId,
        record: SignedRecord,
        conn: ConnId,
    },
    /// Left, failed, expired or was removed.
    Down { network: NetworkId, key: NodeKey },
    /// A local member removed a node (`a2actl kick`): the other coordinators apply it too.
    Revoked {
        network: NetworkId,
        revocation: Signed,
    },
    /// A local member rotated the network's secret: the other coordinators keep the notice
    /// too.
    Moved { network: NetworkId, notice: Signed },
    /// A local member sent a newer policy or tag statement: the other coordinators keep it
    /// too.
    Statement { network: NetworkId, signed: Signed },
    /// A newcomer on connection `ticket` redeems an invite no local member made: the cluster
    /// is asked (the member that made it may be on another coordinator).
    Redeem {
        ticket: ConnId,
        invite: InviteId,
        node_key: NodeKey,
        signing_key: SignerId,
        proof: InviteProof,
    },
}

/// Who answers a redemption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answerer {
    /// The local member that made the invite.
    Member(ConnId),
    /// The cluster was asked; `held`: a coordinator said its member made the invite.
    Cluster { held: bool },
}

/// What a network's members said about membership itself: removed node keys and where the
/// network moved. Signed by the network key, so the coordinator can check it but not make it;
/// kept in memory only, and re-sent by members after a coordinator restart.
#[derive(Default)]
struct Changes {
    revoked: HashMap<NodeKey, Signed>,
    moved: Option<Signed>,
    /// The network's policy of the highest version seen, and its version.
    policy: Option<(u64, Signed)>,
    /// Per member, its tag statement of the highest version seen, and its version.
    tags: HashMap<NodeKey, (u64, Signed)>,
    /// Forgotten at this time: [`CHANGES_TTL`] after [`Registry::expire`] first saw the
    /// network with no member here, local or remote (`None` while it has one).
    forget_at: Option<Instant>,
}

impl Changes {
    /// How many signed changes it holds.
    fn len(&self) -> usize {
        self.revoked.len()
            + usize::from(self.moved.is_some())
            + usize::from(self.policy.is_some())
            + self.tags.len()
    }
}

/// Revocations kept per network.
pub const MAX_REVOCATIONS: usize = 4096;
/// Tag statements kept per network.
pub const MAX_TAGGED: usize = 4096;
/// Invites one connection may announce.
pub const MAX_INVITES_PER_CONN: usize = 64;
/// How long a redemption waits for its inviter's answer.
pub const REDEEM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a redemption passed to the cluster waits for a coordinator to say its member made
/// the invite (then [`REDEEM_TIMEOUT`] for the answer).
pub const UNCLAIMED_AFTER: Duration = Duration::from_secs(3);
/// How long membership changes outlive a network's last member on any coordinator of the
/// cluster that this one knows of (its local and remote members).
pub const CHANGES_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Signed changes kept at most, over all networks with no member here (local or remote):
/// beyond it, those of the networks memberless the longest are forgotten first
/// ([`Forgotten::over_cap`]).
pub const MAX_MEMBERLESS_CHANGES: usize = 16 * 1024;

/// Networks whose kept changes [`Registry::expire`] forgot (counts only).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    /// [`CHANGES_TTL`] after their last member.
    pub expired: usize,
    /// Early, to stay within [`MAX_MEMBERLESS_CHANGES`].
    pub over_cap: usize,
}

/// Live registrations, grouped by network.
pub struct Registry {
    networks: HashMap<NetworkId, HashMap<NodeKey, Member>>,
    by_conn: HashMap<ConnId, (NetworkId, NodeKey)>,
    changes: HashMap<NetworkId, Changes>,
    /// Invite id → the connection of the member honouring it.
    invites: HashMap<InviteId, ConnId>,
    /// Redemption ticket (the redeemer's connection) → who answers it, and the deadline.
    tickets: HashMap<ConnId, (Answerer, Instant)>,
    /// In a cluster: a redemption of an invite no local member made is passed to it.
    clustered: bool,
    heartbeat: Duration,
    ttl: Duration,
    /// Changes to local members since [`Registry::take_changes`].
    local_changes: Vec<LocalChange>,
    /// Since [`Registry::take_forgotten`].
    forgotten: Forgotten,
    /// [`MAX_MEMBERLESS_CHANGES`] (smaller in tests).
    max_memberless: usize,
}

impl Registry {
    /// `heartbeat`: how often nodes are asked to refresh; a member not heard from for `ttl`
    /// expires.
    pub fn new(heartbeat: Duration, ttl: Duration) -> Self {
        Registry {
            networks: HashMap::new(),
            by_conn: HashMap::new(),
            changes: HashMap::new(),
            invites: HashMap::new(),
            tickets: HashMap::new(),
            clustered: false,
            heartbeat,
            ttl,
            local_changes: Vec::new(),
            forgotten: Forgotten::default(),
            max_memberless: MAX_MEMBERLESS_CHANGES,
        }
    }

    /// Networks whose kept changes were forgotten since the last call.
    pub fn take_forgotten(&mut self) -> Forgotten {
        std::mem::take(&mut self.forgotten)
    }

    /// Runs in a cluster: redemptions of invites unknown here are passed to it.
    pub fn set_clustered(&mut self) {
        self.clustered = true;
    }

    /// The changes to local members since the last call (for the cluster).
    pub fn take_changes(&mut self) -> Vec<LocalChange> {
        std::mem::take(&mut self.local_changes)
    }

    /// Number of live members over all networks (a count only; it names nobody).
    pub fn member_count(&self) -> usize {
        self.by_conn.len()
    }

    /// The connection of a live member.
    pub fn conn_of(&self, network: &NetworkId, key: &NodeKey) -> Option<ConnId> {
        self.networks.get(network)?.get(key).map(|m| m.conn)
    }

    pub fn network_count(&self) -> usize {
        self.networks.len()
    }

    /// Handles `Register` on connection `conn`.
    pub fn register(
        &mut self,
        now: Instant,
        conn: ConnId,
        request: RegisterRequest<'_>,
    ) -> Result<Sends, Refusal> {
        let RegisterRequest {
            conn_key,
            handshake_hash,
            network,
            proof,
            record,
            relay_secret,
        } = request;
        if self.by_conn.contains_key(&conn) {
            return Err((RefuseReason::Protocol, "already registered".into()));
        }
        // A holder of the network secret signs the channel's handshake hash. A node admitted by
        // invite sends no proof: its record carries a member certificate for the node key that
        // the channel authenticated (checked in `check_record`).
        let holds_secret =
            proof.is_some_and(|p| network.verify(REGISTER_CONTEXT, handshake_hash, &p.0));
        if !holds_secret && (proof.is_some() || record.cert.is_none()) {
            return Err((
                RefuseReason::BadProof,
                "membership proof does not verify: the join token is not valid for this network"
                    .into(),
            ));
        }
        let (ip, issued_ms) = self.check_record(&network, conn_key, &record)?;
        let members = self.networks.entry(network).or_default();
        // A node re-registering (daemon restart, new connection) replaces its old entry.
        if let Some(old) = members.remove(&conn_key) {
            self.by_conn.remove(&old.conn);
        }
        let mut out: Sends = vec![(
            conn,
            ServerMsg::Registered {
                heartbeat_s: self.heartbeat.as_secs() as u32,
                relay_id: conn,
                relay_secret,
                peers: members.len() as u32,
            },
        )];
        if let Some(changes) = self.changes.get_mut(&network) {
            changes.forget_at = None;
            out.extend(changes.revoked.values().map(|r| {
                (
                    conn,
                    ServerMsg::Revoked {
                        revocation: r.clone(),
                    },
                )
            }));
            if let Some(notice) = &changes.moved {
                out.push((
                    conn,
                    ServerMsg::Moved {
                        notice: notice.clone(),
                    },
                ));
            }
            // Tags and policy before the members: a member's tags are known when it is.
            let statements = changes.tags.values().chain(&changes.policy);
            out.extend(statements.map(|(_, signed)| {
                (
                    conn,
                    ServerMsg::Statement {
                        signed: signed.clone(),
                    },
                )
            }));
        }
        for m in members.values() {
            out.push((
                conn,
                ServerMsg::PeerUp {
                    record: m.record.clone(),
                    relay_id: m.conn,
                },
            ));
            out.push((
                m.conn,
                ServerMsg::PeerUp {
                    record: record.clone(),
                    relay_id: conn,
                },
            ));
        }
        self.local_changes.push(LocalChange::Up {
            network,
            record: record.clone(),
            conn,
        });
        members.insert(
            conn_key,
            Member {
                record,
                ip,
                ip6: derive_ip6(&network, &conn_key),
                issued_ms,
                conn,
                relay_secret,
                expires: now + self.ttl,
                remote: false,
            },
        );
        self.by_conn.insert(conn, (network, conn_key));
        Ok(out)
    }

    /// A member another coordinator of the cluster holds (its record verified here as any
    /// node's is), under relay id `conn` (see `cluster.rs`): its record goes to the local
    /// members, and local members registering later are told of it. Refused when a local
    /// connection holds the key (the local one wins), when the record does not verify, when
    /// the key is revoked or its address taken.
    pub fn register_remote(
        &mut self,
        now: Instant,
        conn: ConnId,
        network: NetworkId,
        record: SignedRecord,
        relay_secret: RelaySecret,
    ) -> Result<Sends, Refusal> {
        let key = record
            .verify(&network)
            .map_err(|e| (RefuseReason::BadRecord, e.to_string()))?
            .record
            .node_key;
        if self
            .networks
            .get(&network)
            .and_then(|m| m.get(&key))
            .is_some_and(|m| !m.remote)
        {
            return Err((RefuseReason::Protocol, "held by a local connection".into()));
        }
        let (ip, issued_ms) = self.check_record(&network, key, &record)?;
        let members = self.networks.entry(network).or_default();
        if let Some(old) = members.remove(&key) {
            self.by_conn.remove(&old.conn);
        }
        let out = members
            .values()
            .filter(|m| !m.remote)
            .map(|m| {
                (
                    m.conn,
                    ServerMsg::PeerUp {
                        record: record.clone(),
                        relay_id: conn,
                    },
                )
            })
            .collect();
        members.insert(
            key,
            Member {
                record,
                ip,
                ip6: derive_ip6(&network, &key),
                issued_ms,
                conn,
                relay_secret,
                expires: now,
                remote: true,
            },
        );
        self.by_conn.insert(conn, (network, key));
        Ok(out)
    }

    /// A remote member (relay id `conn`) is gone: its local peers are told.
    pub fn remove_remote(&mut self, conn: ConnId) -> Sends {
        match self.by_conn.get(&conn) {
            Some((network, key))
                if self
                    .networks
                    .get(network)
                    .and_then(|m| m.get(key))
                    .is_some_and(|m| m.remote && m.conn == conn) =>
            {
                self.disconnect(conn)
            }
            _ => Vec::new(),
        }
    }

    /// Verifies a record for `network` and `key`, and that its address is free among live members.
    fn check_record(
        &self,
        network: &NetworkId,
        key: NodeKey,
        record: &SignedRecord,
    ) -> Result<(Ipv4Addr, u64), Refusal> {
        if key.is_low_order() {
            // Its DH with anyone is a known constant (see `a2a_proto::keys::is_low_order`).
            return Err((
                RefuseReason::BadRecord,
                "node key is an X25519 point of small order".into(),
            ));
        }
        let parsed = record
            .verify(network)
            .map_err(|e| (RefuseReason::BadRecord, e.to_string()))?;
        let parsed = parsed.record;
        if parsed.node_key != key {
            return Err((
                RefuseReason::BadRecord,
                "record key does not match the control channel's key".into(),
            ));
        }
        if self
            .changes
            .get(network)
            .is_some_and(|c| c.revoked.contains_key(&key))
        {
            return Err((
                RefuseReason::Revoked,
                "this node was removed from the network (a2actl kick); ask a member for a new invite"
                    .into(),
            ));
        }
        let taken = self
            .networks
            .get(network)
            .is_some_and(|members| members.iter().any(|(k, m)| *k != key && m.ip == parsed.ip));
        if taken {
            return Err((
                RefuseReason::AddressInUse,
                "overlay address is held by another live node".into(),
            ));
        }
        // The IPv6 address is the key's (80 bits of its hash): another key with the same one
        // is a hash collision, which no next attempt moves away from; only a new key does.
        let ip6 = derive_ip6(network, &key);
        let taken6 = self
            .networks
            .get(network)
            .is_some_and(|members| members.iter().any(|(k, m)| *k != key && m.ip6 == ip6));
        if taken6 {
            return Err((
                RefuseReason::BadRecord,
                "the IPv6 overlay address derived from this node key is held by another live \
                 node; give this node a new key (stop a2ad, remove node.key from its state \
                 directory, join again)"
                    .into(),
            ));
        }
        Ok((parsed.ip, parsed.issued_ms))
    }

    /// Handles `Update`: a newer record from a registered node.
    pub fn update(
        &mut self,
        now: Instant,
        conn: ConnId,
        record: SignedRecord,
    ) -> Result<Sends, Refusal> {
        let Some(&(network, key)) = self.by_conn.get(&conn) else {
            return Err((RefuseReason::Protocol, "update before register".into()));
        };
        let (ip, issued_ms) = self.check_record(&network, key, &record)?;
        let members = self
            .networks
            .get_mut(&network)
            .expect("indexed network exists");
        let me = members.get_mut(&key).expect("indexed member exists");
        if issued_ms <= me.issued_ms {
            return Err((
                RefuseReason::BadRecord,
                "record is older than the current one".into(),
            ));
        }
        me.record = record.clone();
        me.ip = ip;
        me.issued_ms = issued_ms;
        me.expires = now + self.ttl;
        self.local_changes.push(LocalChange::Up {
            network,
            record: record.clone(),
            conn,
        });
        let mut out: Sends = vec![(
            conn,
            ServerMsg::Registered {
                heartbeat_s: self.heartbeat.as_secs() as u32,
                relay_id: conn,
                relay_secret: me.relay_secret,
                peers: 0,
            },
        )];
        out.extend(members.iter().filter(|(k, _)| **k != key).map(|(_, m)| {
            (
                m.conn,
                ServerMsg::PeerUp {
                    record: record.clone(),
                    relay_id: conn,
                },
            )
        }));
        Ok(out)
    }

    /// Handles `Punch`: tells `to`, if it is a live member of the sender's network, that the
    /// sender is probing it. Anything else is dropped (false).
    pub fn punch(&self, conn: ConnId, to: &NodeKey) -> Option<Sends> {
        let (network, from) = self.by_conn.get(&conn)?;
        if from == to {
            return None;
        }
        let target = self.networks.get(network)?.get(to)?;
        Some(vec![(target.conn, ServerMsg::Punch { from: *from })])
    }

    /// Handles `Heartbeat`; false if the connection has no registration.
    pub fn heartbeat(&mut self, now: Instant, conn: ConnId) -> bool {
        let Some((network, key)) = self.by_conn.get(&conn) else {
            return false;
        };
        if let Some(m) = self.networks.get_mut(network).and_then(|n| n.get_mut(key)) {
            m.expires = now + self.ttl;
            true
        } else {
            false
        }
    }

    /// The connection closed or the node left: forget it and tell the other members.
    pub fn disconnect(&mut self, conn: ConnId) -> Sends {
        self.invites.retain(|_, c| *c != conn);
        self.tickets.remove(&conn);
        let Some((network, key)) = self.by_conn.remove(&conn) else {
            return Vec::new();
        };
        self.remove_member(network, key)
    }

    fn remove_member(&mut self, network: NetworkId, key: NodeKey) -> Sends {
        let Some(members) = self.networks.get_mut(&network) else {
            return Vec::new();
        };
        if members.remove(&key).is_some_and(|m| !m.remote) {
            self.local_changes.push(LocalChange::Down { network, key });
        }
        let out = members
            .values()
            .map(|m| (m.conn, ServerMsg::PeerDown { node_key: key }))
            .collect();
        if members.is_empty() {
            // Its kept changes start their countdown at the next `expire`.
            self.networks.remove(&network);
        }
        out
    }

    /// Drops members not heard from within the TTL; returns the messages to send and the
    /// connections that should be closed.
    pub fn expire(&mut self, now: Instant) -> (Sends, Vec<ConnId>) {
        let expired: Vec<(NetworkId, NodeKey, ConnId)> = self
            .networks
            .iter()
            .flat_map(|(n, members)| {
                members
                    .iter()
                    .filter(|(_, m)| !m.remote && m.expires <= now)
                    .map(|(k, m)| (*n, *k, m.conn))
            })
            .collect();
        let mut out = Vec::new();
        let mut closed = Vec::new();
        for (network, key, conn) in expired {
            self.by_conn.remove(&conn);
            self.invites.retain(|_, c| *c != conn);
            closed.push(conn);
            out.extend(self.remove_member(network, key));
        }
        // Redemptions whose inviter did not answer in time.
        let late: Vec<ConnId> = self
            .tickets
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for ticket in late {
            let message = match self.tickets.remove(&ticket) {
                Some((Answerer::Cluster { held: false }, _)) => {
                    "this invite is unknown to every coordinator of the cluster: it expired or \
                     was used up, or the member that made it is offline or restarted (invites \
                     live only in its memory); ask for a new invite"
                }
                _ => "the member that made this invite did not answer",
            };
            out.push((
                ticket,
                ServerMsg::Refused {
                    reason: RefuseReason::InviteRefused,
                    message: message.into(),
                },
            ));
        }
        self.forget_changes(now);
        (out, closed)
    }

    /// Membership changes are kept while their network has a member here, local or remote
    /// (a revocation must be refused while the revoked node's record can be presented to a
    /// member), and [`CHANGES_TTL`] after that; networks with no member here keep at most
    /// [`MAX_MEMBERLESS_CHANGES`] changes together, the memberless the longest forgotten
    /// first. A member that registers re-sends what it holds, so a network's changes come
    /// back with its first member.
    fn forget_changes(&mut self, now: Instant) {
        let networks = &self.networks;
        for (network, c) in self.changes.iter_mut() {
            if networks.contains_key(network) {
                c.forget_at = None;
            } else {
                c.forget_at.get_or_insert(now + CHANGES_TTL);
            }
        }
        let before = self.changes.len();
        self.changes
            .retain(|_, c| c.forget_at.is_none_or(|at| at > now));
        self.forgotten.expired += before - self.changes.len();
        let mut oldest: Vec<(Instant, NetworkId, usize)> = self
            .changes
            .iter()
            .filter_map(|(n, c)| c.forget_at.map(|at| (at, *n, c.len())))
            .collect();
        let mut memberless: usize = oldest.iter().map(|(_, _, len)| len).sum();
        if memberless <= self.max_memberless {
            return;
        }
        oldest.sort_unstable_by_key(|(at, _, _)| *at);
        for (_, network, len) in oldest {
            if memberless <= self.max_memberless {
                break;
            }
            self.changes.remove(&network);
            memberless -= len;
            self.forgotten.over_cap += 1;
        }
    }

    /// Handles `InviteOpen`: redemptions of `id` go to `conn` from now on.
    pub fn invite_open(&mut self, conn: ConnId, id: InviteId) -> Result<(), Refusal> {
        if !self.by_conn.contains_key(&conn) {
            return Err((RefuseReason::Protocol, "invite before register".into()));
        }
        let held = self.invites.values().filter(|c| **c == conn).count();
        if held >= MAX_INVITES_PER_CONN && !self.invites.contains_key(&id) {
            return Err((
                RefuseReason::Protocol,
                format!("at most {MAX_INVITES_PER_CONN} open invites per node"),
            ));
        }
        self.invites.insert(id, conn);
        Ok(())
    }

    pub fn invite_close(&mut self, conn: ConnId, id: &InviteId) {
        if self.invites.get(id) == Some(&conn) {
            self.invites.remove(id);
        }
    }

    /// Handles `Redeem` on the not-yet-registered connection `conn` (the ticket): passes it to
    /// the inviter, who decides.
    pub fn redeem(
        &mut self,
        now: Instant,
        conn: ConnId,
        node_key: NodeKey,
        invite: InviteId,
        signing_key: SignerId,
        proof: InviteProof,
    ) -> Result<Sends, Refusal> {
        let Some(&inviter) = self.invites.get(&invite) else {
            if self.clustered && !is_cluster_ticket(conn) {
                // Its member may be on another coordinator: the cluster is asked.
                self.tickets.insert(
                    conn,
                    (Answerer::Cluster { held: false }, now + UNCLAIMED_AFTER),
                );
                self.local_changes.push(LocalChange::Redeem {
                    ticket: conn,
                    invite,
                    node_key,
                    signing_key,
                    proof,
                });
                return Ok(Vec::new());
            }
            return Err((
                RefuseReason::InviteRefused,
                "this invite is unknown to the coordinator: it expired or was used up, or the \
                 member that made it is offline or restarted (invites live only in its memory); \
                 ask for a new invite"
                    .into(),
            ));
        };
        self.tickets
            .insert(conn, (Answerer::Member(inviter), now + REDEEM_TIMEOUT));
        Ok(vec![(
            inviter,
            ServerMsg::RedeemRequest {
                ticket: conn,
                invite,
                node_key,
                signing_key,
                proof,
            },
        )])
    }

    /// Handles the inviter's answer to `ticket`; `None` unless `conn` is that ticket's inviter.
    pub fn invite_answer(&mut self, conn: ConnId, ticket: u32, answer: ServerMsg) -> Option<Sends> {
        match self.tickets.get(&ticket) {
            Some((Answerer::Member(inviter), _)) if *inviter == conn => {
                self.tickets.remove(&ticket);
                Some(vec![(ticket, answer)])
            }
            _ => None,
        }
    }

    /// A coordinator of the cluster says its member made the invite `ticket` redeems: the
    /// redemption now waits for that member's answer.
    pub fn cluster_redeem_held(&mut self, now: Instant, ticket: ConnId) {
        if let Some((a @ Answerer::Cluster { held: false }, deadline)) =
            self.tickets.get_mut(&ticket)
        {
            *a = Answerer::Cluster { held: true };
            *deadline = now + REDEEM_TIMEOUT;
        }
    }

    /// The answer to a redemption passed to the cluster: for the redeemer, if it still waits.
    pub fn cluster_redeem_answer(&mut self, ticket: ConnId, answer: ServerMsg) -> Sends {
        match self.tickets.get(&ticket) {
            Some((Answerer::Cluster { .. }, _)) => {
                self.tickets.remove(&ticket);
                vec![(ticket, answer)]
            }
            _ => Vec::new(),
        }
    }

    /// Handles `Revoke`: checks it under the sender's network, keeps it, tells every member, and
    /// removes the revoked node if it is live (its connection is returned, to be closed).
    pub fn revoke(
        &mut self,
        conn: ConnId,
        revocation: Signed,
    ) -> Result<(Sends, Option<ConnId>), Refusal> {
        let Some(&(network, _)) = self.by_conn.get(&conn) else {
            return Err((RefuseReason::Protocol, "revoke before register".into()));
        };
        self.apply_revocation(network, Some(conn), revocation)
    }

    /// A revocation another coordinator of the cluster applied (one of its members sent it):
    /// checked under `network` as one from a local member, kept, passed to every member here;
    /// the node's connection, if it is held here, is returned to end.
    pub fn revoke_remote(
        &mut self,
        network: NetworkId,
        revocation: Signed,
    ) -> Result<(Sends, Option<ConnId>), Refusal> {
        self.apply_revocation(network, None, revocation)
    }

    fn apply_revocation(
        &mut self,
        network: NetworkId,
        from: Option<ConnId>,
        revocation: Signed,
    ) -> Result<(Sends, Option<ConnId>), Refusal> {
        let r = Revocation::open(&revocation, &network)
            .map_err(|e| (RefuseReason::BadRecord, format!("revocation: {e}")))?;
        let changes = self.changes.entry(network).or_default();
        if changes.revoked.contains_key(&r.node_key) {
            return Ok((Vec::new(), None));
        }
        if changes.revoked.len() >= MAX_REVOCATIONS {
            return Err((
                RefuseReason::Protocol,
                format!(
                    "more than {MAX_REVOCATIONS} revocations in one network; rotate the secret"
                ),
            ));
        }
        changes.revoked.insert(r.node_key, revocation.clone());
        if from.is_some() {
            // The cluster's other coordinators apply it too (one from them is not sent back).
            self.local_changes.push(LocalChange::Revoked {
                network,
                revocation: revocation.clone(),
            });
        }
        // The member that sent it applied it already.
        let mut out = self.to_others(
            &network,
            from.unwrap_or(0),
            ServerMsg::Revoked { revocation },
        );
        let removed = self
            .networks
            .get(&network)
            .and_then(|m| m.get(&r.node_key))
            .map(|m| m.conn);
        if let Some(gone) = removed {
            self.by_conn.remove(&gone);
            self.invites.retain(|_, c| *c != gone);
            out.extend(self.remove_member(network, r.node_key));
        }
        Ok((out, removed))
    }

    /// Handles `Statement`: a policy or tag statement checked under the sender's network; a
    /// newer one than held is kept and passed to every other member (the sender holds it).
    /// An older or equal one is dropped without a word: members send what they hold after
    /// every registration.
    pub fn statement(&mut self, conn: ConnId, signed: Signed) -> Result<Sends, Refusal> {
        let Some(&(network, _)) = self.by_conn.get(&conn) else {
            return Err((RefuseReason::Protocol, "statement before register".into()));
        };
        self.apply_statement(network, Some(conn), signed)
    }

    /// A statement a member of another coordinator sent: checked under `network`, kept if
    /// newer than held, passed to every member here.
    pub fn statement_remote(
        &mut self,
        network: NetworkId,
        signed: Signed,
    ) -> Result<Sends, Refusal> {
        self.apply_statement(network, None, signed)
    }

    fn apply_statement(
        &mut self,
        network: NetworkId,
        from: Option<ConnId>,
        signed: Signed,
    ) -> Result<Sends, Refusal> {
        let changes = self.changes.entry(network).or_default();
        if let Ok(p) = PolicyDoc::open(&signed, &network) {
            if changes
                .policy
                .as_ref()
                .is_some_and(|(v, _)| *v >= p.version)
            {
                return Ok(Vec::new());
            }
            changes.policy = Some((p.version, signed.clone()));
        } else {
            let t = TagStatement::open(&signed, &network)
                .map_err(|e| (RefuseReason::BadRecord, format!("statement: {e}")))?;
            match changes.tags.get(&t.node_key) {
                Some((v, _)) if *v >= t.version => return Ok(Vec::new()),
                None if changes.tags.len() >= MAX_TAGGED => {
                    return Err((
                        RefuseReason::Protocol,
                        format!("more than {MAX_TAGGED} tagged members in one network"),
                    ))
                }
                _ => {}
            }
            changes.tags.insert(t.node_key, (t.version, signed.clone()));
        }
        if from.is_some() {
            self.local_changes.push(LocalChange::Statement {
                network,
                signed: signed.clone(),
            });
        }
        Ok(self.to_others(&network, from.unwrap_or(0), ServerMsg::Statement { signed }))
    }

    /// `msg` for every live member of `network` but the one on connection `except`.
    fn to_others(&self, network: &NetworkId, except: ConnId, msg: ServerMsg) -> Sends {
        self.networks
            .get(network)
            .map(|members| {
                members
                    .values()
                    .filter(|m| m.conn != except)
                    .map(|m| (m.conn, msg.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Handles `Rotate`: checks the notice under the sender's network, keeps it for members
    /// that register later, and passes it to every other member now.
    pub fn rotate(&mut self, conn: ConnId, notice: Signed) -> Result<Sends, Refusal> {
        let Some(&(network, _)) = self.by_conn.get(&conn) else {
            return Err((RefuseReason::Protocol, "rotate before register".into()));
        };
        self.apply_rotation(network, Some(conn), notice)
    }

    /// A rotation notice a member of another coordinator sent: checked under `network`, kept
    /// for members that register later, passed to every member here (once).
    pub fn rotate_remote(&mut self, network: NetworkId, notice: Signed) -> Result<Sends, Refusal> {
        self.apply_rotation(network, None, notice)
    }

    fn apply_rotation(
        &mut self,
        network: NetworkId,
        from: Option<ConnId>,
        notice: Signed,
    ) -> Result<Sends, Refusal> {
        RotationNotice::open(&notice, &network)
            .map_err(|e| (RefuseReason::BadRecord, format!("rotation notice: {e}")))?;
        let changes = self.changes.entry(network).or_default();
        if from.is_none() && changes.moved.as_ref() == Some(&notice) {
            return Ok(Vec::new());
        }
        changes.moved = Some(notice.clone());
        if from.is_some() {
            self.local_changes.push(LocalChange::Moved {
                network,
                notice: notice.clone(),
            });
        }
        // The rotating member has moved already.
        Ok(self.to_others(&network, from.unwrap_or(0), ServerMsg::Moved { notice }))
    }

    /// What this coordinator keeps of every network's membership changes (revocations, the
    /// rotation notice, the policy and tag statements), for a coordinator that starts.
    pub fn kept(&self) -> Vec<a2a_proto::cluster::Change> {
        use a2a_proto::cluster::Change;
        let mut out = Vec::new();
        for (network, c) in &self.changes {
            let network = *network;
            out.extend(c.revoked.values().map(|r| Change::Revoke {
                network,
                revocation: r.clone(),
            }));
            out.extend(c.moved.iter().map(|n| Change::Moved {
                network,
                notice: n.clone(),
            }));
            out.extend(
                c.tags
                    .values()
                    .chain(&c.policy)
                    .map(|(_, s)| Change::Statement {
                        network,
                        signed: s.clone(),
                    }),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::RegisterRequest;
    use super::*;
    use a2a_proto::{NetworkKey, NodeRecord};

    const HASH: &[u8] = b"handshake-hash-of-this-connection";

    struct Node {
        key: NodeKey,
        record: NodeRecord,
    }

    fn node(n: u8, ip: &str) -> Node {
        let key = NodeKey([n; 32]);
        Node {
            key,
            record: NodeRecord {
                network: NetworkKey::derive(&[0; 32]).id(),
                node_key: key,
                name: format!("n{n}"),
                ip: ip.parse().unwrap(),
                candidates: vec![],
                issued_ms: 1,
                ssh: None,
            },
        }
    }

    /// The record for network `k`, signed by `signer`.
    fn signed(record: &NodeRecord, k: &NetworkKey, signer: &NetworkKey) -> SignedRecord {
        let mut r = record.clone();
        r.network = k.id();
        r.sign(signer)
    }

    fn proof(k: &NetworkKey, hash: &[u8]) -> Option<Signature> {
        Some(Signature(k.sign(REGISTER_CONTEXT, hash)))
    }

    fn reg(
        r: &mut Registry,
        now: Instant,
        conn: ConnId,
        k: &NetworkKey,
        n: &Node,
    ) -> Result<Sends, Refusal> {
        r.register(
            now,
            conn,
            RegisterRequest {
                conn_key: n.key,
                handshake_hash: HASH,
                network: k.id(),
                proof: proof(k, HASH),
                record: signed(&n.record, k, k),
                relay_secret: RelaySecret([conn as u8; 16]),
            },
        )
    }

    fn registry() -> Registry {
        Registry::new(Duration::from_secs(10), Duration::from_secs(30))
    }

    #[test]
    fn members_learn_of_each_other() {
        let mut r = registry();
        let k = NetworkKey::derive(&[1; 32]);
        let now = Instant::now();
        let out = reg(&mut r, now, 1, &k, &node(1, "100.64.0.1")).unwrap();
        assert_eq!(out.len(), 1);
        assert!(matches!(
            &out[0],
            (1, ServerMsg::Registered { heartbeat_s: 10, relay_id: 1, relay_secret, peers: 0 })
                if *relay_secret == RelaySecret([1; 16])
        ));
        let out = reg(&mut r, now, 2, &k, &node(2, "100.64.0.2")).unwrap();
        // 2 is registered and told of 1; 1 is told of 2; each with the other's relay id.
        assert_eq!(out.len(), 3);
        assert!(matches!(
            out[0],
            (2, ServerMsg::Registered { peers: 1, .. })
        ));
        assert!(out
            .iter()
            .any(|(c, m)| *c == 2 && matches!(m, ServerMsg::PeerUp { relay_id: 1, .. })));
        assert!(out
            .iter()
            .any(|(c, m)| *c == 1 && matches!(m, ServerMsg::PeerUp { relay_id: 2, .. })));
        assert_eq!(r.member_count(), 2);
    }

    #[test]
    fn networks_are_isolated() {
        let mut r = registry();
        let a = NetworkKey::derive(&[1; 32]);
        let b = NetworkKey::derive(&[2; 32]);
        let now = Instant::now();
        reg(&mut r, now, 1, &a, &node(1, "100.64.0.1")).unwrap();
        let out = reg(&mut r, now, 2, &b, &node(2, "100.64.0.1")).unwrap();
        assert_eq!(out.len(), 1, "a member of another network learns nothing");
        assert_eq!(r.network_count(), 2);
        // Nor can it make the coordinator signal a member of the other network.
        assert!(r.punch(2, &NodeKey([1; 32])).is_none());
        assert!(r.punch(1, &NodeKey([1; 32])).is_none(), "not to itself");
        reg(&mut r, now, 3, &a, &node(3, "100.64.0.3")).unwrap();
        let out = r.punch(3, &NodeKey([1; 32])).unwrap();
        assert_eq!(
            out,
            vec![(
                1,
                ServerMsg::Punch {
                    from: NodeKey([3; 32])
                }
            )]
        );
    }

    #[test]
    fn wrong_proof_and_forged_records_are_refused() {
        let mut r = registry();
        let k = NetworkKey::derive(&[1; 32]);
        let other = NetworkKey::derive(&[9; 32]);
        let n = node(1, "100.64.0.1");
        // (what is wrong, channel key, handshake hash, proof signer, record signer, refusal)
        type Case<'a> = (
            &'a str,
            NodeKey,
            &'a [u8],
            &'a NetworkKey,
            &'a NetworkKey,
            RefuseReason,
        );
        let cases: [Case; 4] = [
            (
                "proof by another network",
                n.key,
                HASH,
                &other,
                &k,
                RefuseReason::BadProof,
            ),
            (
                "proof replayed from another connection",
                n.key,
                b"other",
                &k,
                &k,
                RefuseReason::BadProof,
            ),
            (
                "record signed by a non-member",
                n.key,
                HASH,
                &k,
                &other,
                RefuseReason::BadRecord,
            ),
            (
                "record for another key",
                NodeKey([7; 32]),
                HASH,
                &k,
                &k,
                RefuseReason::BadRecord,
            ),
        ];
        for (what, conn_key, hash, prover, signer, want) in cases {
            let request = RegisterRequest {
                conn_key,
                handshake_hash: hash,
                network: k.id(),
                proof: proof(prover, HASH),
                record: signed(&n.record, &k, signer),
                relay_secret: RelaySecret([0; 16]),
            };
            let refusal = r.register(Instant::now(), 1, request).unwrap_err();
            assert_eq!(refusal.0, want, "{what}");
        }
        assert_eq!(r.member_count(), 0);
    }

    #[test]
    fn duplicate_address_is_refused_among_live_nodes_only() {
        let mut r = registry();
        let k = NetworkKey::derive(&[1; 32]);
        let now = Instant::now();
        reg(&mut r, now, 1, &k, &node(1, "100.64.0.1")).unwrap();
        let e = reg(&mut r, now, 2, &k, &node(2, "100.64.0.1")).unwrap_err();
        assert_eq!(e.0, RefuseReason::AddressInUse);
        r.disconnect(1);
        reg(&mut r, now, 2, &k, &node(2, "100.64.0.1")).unwrap();
    }

    #[test]
    fn duplicate_ipv6_address_is_refused() {
        let mut r = registry();
        let k = NetworkKey::derive(&[1; 32]);
        let now = Instant::now();
        reg(&mut r, now, 1, &k, &node(1, "100.64.0.1")).unwrap();
        // Distinct keys' addresses differ (80 bits of hash): a collision is made by hand, as
        // if node 1's key hashed to node 2's address.
        let two = node(2, "100.64.0.2");
        let ip6 = derive_ip6(&k.id(), &two.key);
        assert_ne!(ip6, derive_ip6(&k.id(), &NodeKey([1; 32])));
        r.networks
            .get_mut(&k.id())
            .unwrap()
            .get_mut(&NodeKey([1; 32]))
            .unwrap()
            .ip6 = ip6;
        let e = reg(&mut r, now, 2, &k, &two).unwrap_err();
        assert_eq!(e.0, RefuseReason::BadRecord);
        assert!(e.1.contains("IPv6 overlay address"), "{}", e.1);
        assert!(e.1.contains("new key"), "{}", e.1);
        // Among live nodes only.
        r.disconnect(1);
        reg(&mut r, now, 2, &k, &two).unwrap();
    }

    #[test]
    fn reregistration_replaces_the_old_connection() {
        let mut r = registry();
        let k = NetworkKey::derive(&[1; 32]);
        let now = Instant::now();
        reg(&mut r, now, 1, &k, &node(1, "100.64.0.1")).unwrap();
        reg(&mut r, now, 2, &k, &node(2, "100.64.0.2")).unwrap();
        reg(&mut r, now, 3, &k, &node(1, "100.64.0.1")).unwrap();
        assert_eq!(r.member_count(), 2);
        // The stale connection closing later does not remove the new registration.
        assert!(r.disconnect(1).is_empty());
        assert_eq!(r.member_count(), 2);
    }

    #[test]
    fn leaving_and_expiry_tell_the_others() {
        let mut r = registry();
        let k = NetworkKey::derive(&[1; 32]);
        let t0 = Instant::now();
        reg(&mut r, t0, 1, &k, &node(1, "100.64.0.1")).unwrap();
        reg(&mut r, t0, 2, &k, &node(2, "100.64.0.2")).unwrap();
        reg(&mut r, t0, 3, &k, &node(3, "100.64.0.3")).unwrap();
        let out = r.disconnect(3);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(
            |(_, m)| matches!(m, ServerMsg::PeerDown { node_key } if *node_key == NodeKey([3; 32]))
        ));
        // Node 1 keeps heartbeating, node 2 goes silent.
        let t1 = t0 + Duration::from_secs(20);
        assert!(r.heartbeat(t1, 1));
        let (out, closed) = r.expire(t0 + Duration::from_secs(31));
        assert_eq!(closed, vec![2]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 1);
        assert_eq!(r.member_count(), 1);
        assert!(!r.heartbeat(t1, 2));
    }

    #[test]
    fn low_order_node_keys_are_refused() {
        let mut r = registry();
        let k = NetworkKey::derive(&[1; 32]);
        let now = Instant::now();
        for (i, p) in a2a_proto::keys::LOW_ORDER_POINTS.into_iter().enumerate() {
            let mut n = node(1, &format!("100.64.0.{}", i + 1));
            n.key = NodeKey(p);
            n.record.node_key = n.key;
            let (reason, _) = reg(&mut r, now, i as ConnId + 1, &k, &n).unwrap_err();
            assert_eq!(reason, RefuseReason::BadRecord);
        }
        assert_eq!(r.member_count(), 0);
    }

    #[test]
    fn updates_must_be_newer() {
        let mut r = registry();
        let k = NetworkKey::derive(&[1; 32]);
        let now = Instant::now();
        let mut n = node(1, "100.64.0.1");
        reg(&mut r, now, 1, &k, &n).unwrap();
        assert_eq!(
            r.update(now, 1, signed(&n.record, &k, &k)).unwrap_err().0,
            RefuseReason::BadRecord
        );
        n.record.issued_ms = 2;
        n.record.candidates = vec!["10.0.0.1:1".parse().unwrap()];
        r.update(now, 1, signed(&n.record, &k, &k)).unwrap();
        assert_eq!(
            r.update(now, 9, signed(&n.record, &k, &k)).unwrap_err().0,
            RefuseReason::Protocol
        );
    }

    fn invited(n: u8, k: &NetworkKey) -> (Node, SignedRecord) {
        use a2a_proto::membership::{issue_cert, node_signing_key};
        let node = node(n, &format!("100.64.0.{n}"));
        let signer = node_signing_key(&[n; 32]);
        let cert = issue_cert(
            k,
            node.key,
            signer.verifying_key().into(),
            InviteId([0xab; 16]),
            1,
        );
        let mut r = node.record.clone();
        r.network = k.id();
        let signed = r.sign_with_cert(&signer, &cert);
        (node, signed)
    }

    #[test]
    fn invited_nodes_register_with_their_certificate_only() {
        let mut r = registry();
        let k = NetworkKey::derive(&[1; 32]);
        let rogue = NetworkKey::derive(&[2; 32]);
        let now = Instant::now();
        reg(&mut r, now, 1, &k, &node(1, "100.64.0.1")).unwrap();
        let (n, record) = invited(2, &k);
        let request = |record: SignedRecord, proof: Option<Signature>| RegisterRequest {
            conn_key: n.key,
            handshake_hash: HASH,
            network: k.id(),
            proof,
            record,
            relay_secret: RelaySecret([0; 16]),
        };
        // A certificate from a key that is not the network's: refused.
        let (_, forged) = invited(2, &rogue);
        let mut forged = forged;
        forged.body = record.body.clone();
        assert!(r.register(now, 2, request(forged, None)).is_err());
        // No proof and no certificate: refused.
        let plain = signed(&n.record, &k, &rogue);
        assert_eq!(
            r.register(now, 2, request(plain, None)).unwrap_err().0,
            RefuseReason::BadProof
        );
        // The genuine certificate: admitted, and alpha is told.
        let out = r.register(now, 2, request(record, None)).unwrap();
        assert!(out
            .iter()
            .any(|(c, m)| *c == 1 && matches!(m, ServerMsg::PeerUp { relay_id: 2, .. })));
    }

    #[test]
    fn in_a_cluster_an_unknown_invite_is_asked_of_the_others_and_their_answer_passed_on() {
        let mut r = registry();
        r.set_clustered();
        let now = Instant::now();
        let id = InviteId([3; 16]);
        let signer =
            SignerId::from(a2a_proto::membership::node_signing_key(&[5; 32]).verifying_key());
        let proof = InviteProof([7; 32]);
        // No local member made it: nothing sent yet, the cluster is asked.
        let sent = r
            .redeem(now, 50, NodeKey([5; 32]), id, signer, proof)
            .unwrap();
        assert!(sent.is_empty());
        let asked = r.take_changes();
        assert!(
            matches!(asked.as_slice(), [LocalChange::Redeem { ticket: 50, .. }]),
            "{asked:?}"
        );
        // A redemption passed here by the cluster is never passed back to it.
        let cluster_ticket = REMOTE_BASE + 1;
        let e = r
            .redeem(now, cluster_ticket, NodeKey([5; 32]), id, signer, proof)
            .unwrap_err();
        assert_eq!(e.0, RefuseReason::InviteRefused);
        assert!(r.take_changes().is_empty());
        // Held by another coordinator: it waits for the answer, which goes to the redeemer.
        r.cluster_redeem_held(now, 50);
        let (out, _) = r.expire(now + UNCLAIMED_AFTER + Duration::from_millis(1));
        assert!(out.is_empty(), "held: it waits for the inviter");
        let answer = ServerMsg::Refused {
            reason: RefuseReason::InviteRefused,
            message: "used up".into(),
        };
        assert_eq!(
            r.cluster_redeem_answer(50, answer.clone()),
            vec![(50, answer.clone())]
        );
        assert!(r.cluster_redeem_answer(50, answer).is_empty(), "once");
        // Nobody claims it: refused once the wait is over, saying so.
        r.redeem(now, 51, NodeKey([6; 32]), id, signer, proof)
            .unwrap();
        let (out, _) = r.expire(now + UNCLAIMED_AFTER);
        let [(51, ServerMsg::Refused { reason, message })] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(*reason, RefuseReason::InviteRefused);
        assert!(
            message.contains("every coordinator of the cluster"),
            "{message}"
        );
    }

    #[test]
    fn redemptions_go_to_the_inviter_and_answers_to_the_redeemer_only() {
        let mut r = registry();
        let k = NetworkKey::derive(&[1; 32]);
        let now = Instant::now();
        reg(&mut r, now, 1, &k, &node(1, "100.64.0.1")).unwrap();
        reg(&mut r, now, 2, &k, &node(2, "100.64.0.2")).unwrap();
        let id = InviteId([0; 16]);
        let signer =
            SignerId::from(a2a_proto::membership::node_signing_key(&[5; 32]).verifying_key());
        let proof = InviteProof([7; 32]);
        assert!(r.invite_open(9, id).is_err(), "not registered");
        r.invite_open(1, id).unwrap();
        let unknown = r.redeem(
            now,
            50,
            NodeKey([5; 32]),
            InviteId([0xf; 16]),
            signer,
            proof,
        );
        assert_eq!(unknown.unwrap_err().0, RefuseReason::InviteRefused);
        let out = r
            .redeem(now, 50, NodeKey([5; 32]), id, signer, proof)
            .unwrap();
        assert!(matches!(
            out[..],
            [(1, ServerMsg::RedeemRequest { ticket: 50, .. })]
        ));
        // Only the inviter may answer, once.
        let sealed = a2a_proto::sealed::Sealed::from_bytes(vec![1; 40]).unwrap();
        let answer = || ServerMsg::InviteAdmitted {
            sealed: sealed.clone(),
        };
        assert!(r.invite_answer(2, 50, answer()).is_none());
        assert_eq!(r.invite_answer(1, 50, answer()), Some(vec![(50, answer())]));
        assert!(r.invite_answer(1, 50, answer()).is_none());
        // An unanswered redemption is refused at the deadline.
        r.redeem(now, 51, NodeKey([6; 32]), id, signer, proof)
            .unwrap();
        let (out, _) = r.expire(now + REDEEM_TIMEOUT);
        assert!(out.iter().any(|(c, m)| *c == 51
            && matches!(
                m,
                ServerMsg::Refused {
                    reason: RefuseReason::InviteRefused,
                    ..
                }
            )));
        // The inviter leaving closes its invites.
        r.disconnect(1);
        assert!(r
            .redeem(now, 52, NodeKey([7; 32]), id, signer, proof)
            .is_err());
    }

    #[test]
    fn revocations_remove_and_keep_out_and_only_the_network_key_makes_them() {
        use a2a_proto::keys::REVOKE_CONTEXT;
        let mut r = registry();
        let k = NetworkKey::derive(&[1; 32]);
        let rogue = NetworkKey::derive(&[2; 32]);
        let now = Instant::now();
        for n in 1..=3 {
            reg(
                &mut r,
                now,
                n as u32,
                &k,
                &node(n, &format!("100.64.0.{n}")),
            )
            .unwrap();
        }
        let revocation = Revocation {
            network: k.id(),
            node_key: NodeKey([3; 32]),
            issued_ms: 1,
        };
        let forged = Signed::sign(&revocation, &rogue, REVOKE_CONTEXT);
        assert!(r.revoke(1, forged).is_err());
        assert_eq!(r.member_count(), 3);
        let (out, removed) = r
            .revoke(1, Signed::sign(&revocation, &k, REVOKE_CONTEXT))
            .unwrap();
        assert_eq!(removed, Some(3));
        assert!(out
            .iter()
            .any(|(c, m)| *c == 2 && matches!(m, ServerMsg::Revoked { .. })));
        assert_eq!(r.member_count(), 2);
        // It cannot come back, and a later member learns of the revocation.
        let e = reg(&mut r, now, 4, &k, &node(3, "100.64.0.3")).unwrap_err();
        assert_eq!(e.0, RefuseReason::Revoked);
        let out = reg(&mut r, now, 5, &k, &node(5, "100.64.0.5")).unwrap();
        assert!(out
            .iter()
            .any(|(c, m)| *c == 5 && matches!(m, ServerMsg::Revoked { .. })));
    }

    #[test]
    fn rotation_notices_reach_members_now_and_later() {
        use a2a_proto::keys::ROTATE_CONTEXT;
        let mut r = registry();
        let k = NetworkKey::derive(&[1; 32]);
        let next = NetworkKey::derive(&[2; 32]);
        let now = Instant::now();
        reg(&mut r, now, 1, &k, &node(1, "100.64.0.1")).unwrap();
        reg(&mut r, now, 2, &k, &node(2, "100.64.0.2")).unwrap();
        let notice = RotationNotice {
            old_network: k.id(),
            new_network: next.id(),
            rotator: NodeKey([1; 32]),
            issued_ms: 1,
            carried: vec![],
        };
        assert!(r
            .rotate(1, Signed::sign(&notice, &next, ROTATE_CONTEXT))
            .is_err());
        let out = r
            .rotate(1, Signed::sign(&notice, &k, ROTATE_CONTEXT))
            .unwrap();
        assert!(matches!(out[..], [(2, ServerMsg::Moved { .. })]));
        r.disconnect(1);
        r.disconnect(2);
        let out = reg(&mut r, now, 3, &k, &node(3, "100.64.0.3")).unwrap();
        assert!(out
            .iter()
            .any(|(c, m)| *c == 3 && matches!(m, ServerMsg::Moved { .. })));
    }

    fn revocation(k: &NetworkKey, n: u8) -> Signed {
        use a2a_proto::keys::REVOKE_CONTEXT;
        let revocation = Revocation {
            network: k.id(),
            node_key: NodeKey([n; 32]),
            issued_ms: 1,
        };
        Signed::sign(&revocation, k, REVOKE_CONTEXT)
    }

    /// Networks whose changes are kept, and how many changes each.
    fn kept_per_network(r: &Registry) -> HashMap<NetworkId, usize> {
        let mut out = HashMap::new();
        for c in r.kept() {
            let network = match c {
                a2a_proto::cluster::Change::Revoke { network, .. }
                | a2a_proto::cluster::Change::Moved { network, .. }
                | a2a_proto::cluster::Change::Statement { network, .. } => network,
            };
            *out.entry(network).or_default() += 1;
        }
        out
    }

    #[test]
    fn changes_from_the_cluster_for_a_network_with_no_member_here_are_forgotten_after_the_ttl() {
        let mut r = registry();
        let k = NetworkKey::derive(&[1; 32]);
        let t0 = Instant::now();
        r.revoke_remote(k.id(), revocation(&k, 3)).unwrap();
        // The countdown starts at the first expire that sees the network without a member.
        r.expire(t0);
        r.expire(t0 + CHANGES_TTL - Duration::from_secs(1));
        assert_eq!(kept_per_network(&r).get(&k.id()), Some(&1));
        assert_eq!(r.take_forgotten(), Forgotten::default());
        r.expire(t0 + CHANGES_TTL);
        assert!(r.kept().is_empty());
        assert_eq!(
            r.take_forgotten(),
            Forgotten {
                expired: 1,
                over_cap: 0
            }
        );
    }

    #[test]
    fn a_member_on_another_coordinator_keeps_its_networks_revocations() {
        let mut r = registry();
        let k = NetworkKey::derive(&[1; 32]);
        let t0 = Instant::now();
        let alpha = node(1, "100.64.0.1");
        let remote = REMOTE_BASE + 1;
        r.register_remote(
            t0,
            remote,
            k.id(),
            signed(&alpha.record, &k, &k),
            RelaySecret([1; 16]),
        )
        .unwrap();
        r.revoke_remote(k.id(), revocation(&k, 3)).unwrap();
        // Held as long as alpha is, however long: bravo's record stays refused.
        for days in [0, 8, 30] {
            r.expire(t0 + Duration::from_secs(days * 24 * 3600));
        }
        assert_eq!(kept_per_network(&r).get(&k.id()), Some(&1));
        let bravo = node(3, "100.64.0.3");
        let e = r
            .register_remote(
                t0,
                remote + 1,
                k.id(),
                signed(&bravo.record, &k, &k),
                RelaySecret([2; 16]),
            )
            .unwrap_err();
        assert_eq!(e.0, RefuseReason::Revoked);
        // alpha gone: forgotten CHANGES_TTL after the first expire that sees it gone.
        let t1 = t0 + Duration::from_secs(31 * 24 * 3600);
        r.remove_remote(remote);
        r.expire(t1);
        r.expire(t1 + CHANGES_TTL - Duration::from_secs(1));
        assert_eq!(kept_per_network(&r).len(), 1);
        // A member that comes back (on another coordinator) stops the countdown.
        r.register_remote(
            t1,
            remote + 2,
            k.id(),
            signed(&alpha.record, &k, &k),
            RelaySecret([1; 16]),
        )
        .unwrap();
        r.expire(t1 + CHANGES_TTL);
        assert_eq!(kept_per_network(&r).len(), 1);
        r.remove_remote(remote + 2);
        r.expire(t1 + CHANGES_TTL);
        r.expire(t1 + CHANGES_TTL * 2);
        assert!(r.kept().is_empty());
        assert_eq!(r.take_forgotten().expired, 1);
    }

    #[test]
    fn memberless_changes_over_the_cap_are_forgotten_oldest_network_first() {
        let mut r = registry();
        r.max_memberless = 3;
        let t0 = Instant::now();
        let [a, b, c, held] = [1u8, 2, 3, 4].map(|i| NetworkKey::derive(&[i; 32]));
        // A network with a member counts for nothing against the cap.
        reg(&mut r, t0, 1, &held, &node(1, "100.64.0.1")).unwrap();
        for n in 10..20 {
            r.revoke(1, revocation(&held, n)).unwrap();
        }
        for n in [2, 3] {
            r.revoke_remote(a.id(), revocation(&a, n)).unwrap();
        }
        r.expire(t0);
        for n in [2, 3] {
            r.revoke_remote(b.id(), revocation(&b, n)).unwrap();
        }
        // a and b: 4 changes over 3; a, memberless the longest, goes.
        r.expire(t0 + Duration::from_secs(1));
        let kept = kept_per_network(&r);
        assert_eq!(kept.get(&a.id()), None);
        assert_eq!(kept.get(&b.id()), Some(&2));
        assert_eq!(kept.get(&held.id()), Some(&10));
        assert_eq!(
            r.take_forgotten(),
            Forgotten {
                expired: 0,
                over_cap: 1
            }
        );
        r.revoke_remote(c.id(), revocation(&c, 2)).unwrap();
        r.expire(t0 + Duration::from_secs(2));
        assert_eq!(kept_per_network(&r).len(), 3);
        assert_eq!(r.take_forgotten(), Forgotten::default());
    }
}
