//! The coordinator's control protocol without I/O: what to do with each message a node sends on
//! its control connection. The server's socket loops feed it (the connection, the message, the
//! time) and carry out the [`Outbox`] it returns: which messages to send to which connection,
//! which connections to end, which relay slots to open or close, which counters to bump, how
//! long to pause reading. It holds the [`Registry`] (who is live in which network) and each
//! connection's phase (handshaken, registered, redeeming an invite) and message budget.
//!
//! When to call what:
//! - [`Switchboard::open`] once a connection's Noise handshake completed;
//! - [`Switchboard::handle`] for each control message read from it (relay frames go to the
//!   [`crate::relay::RelayTable`] directly);
//! - [`Switchboard::close`] when its stream ends, whatever the reason;
//! - [`Switchboard::expire`] about once a second;
//! - [`Switchboard::flush`] at [`Switchboard::fanout_deadline`]: member changes are coalesced
//!   over a short window (see [`crate::fanout`]).
//!
//! Nothing here is written or printed.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use a2a_proto::control::{ClientMsg, PeerEntry, RefuseReason, ServerMsg};
use a2a_proto::keys::RelaySecret;
use a2a_proto::{NetworkId, NodeKey};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::fanout::{batches, Fanout, MAX_BATCH_BYTES};
use crate::limits::{Rate, TokenBucket};
use crate::registry::is_remote_id;
use crate::registry::{ConnId, LocalChange, RegisterRequest, Registry, Sends, REDEEM_TIMEOUT};

/// What the driver counts (its counters are numbers only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Registration,
    RegistrationRefused,
    /// A message out of order, malformed in a way the parse could not see, or refused.
    BadMessage,
    Punch,
    Redemption,
    RedemptionRefused,
    Revocation,
    /// A new policy or tag statement passed to a network's members.
    Statement,
    /// A message that came faster than its connection's budget (reading pauses).
    Throttled,
    /// A network's kept membership changes forgotten, [`crate::registry::CHANGES_TTL`] after its
    /// last member here (local or remote).
    ChangesForgotten,
    /// The same, early: over [`crate::registry::MAX_MEMBERLESS_CHANGES`].
    ChangesForgottenOverCap,
}

/// A change to the relay slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayChange {
    /// The connection registered: its relay id is the connection id, proved by `secret`.
    Open {
        conn: ConnId,
        network: NetworkId,
        secret: RelaySecret,
    },
    Close(ConnId),
}

/// What the driver must do after a call.
#[derive(Debug, Default, PartialEq)]
pub struct Outbox {
    /// Messages to queue, each on the connection named.
    pub send: Vec<(ConnId, ServerMsg)>,
    /// Connections to end once what is queued for them is written (the one handled included).
    pub close: Vec<ConnId>,
    pub relay: Vec<RelayChange>,
    pub counts: Vec<Count>,
    /// Read nothing more from the connection handled for this long (its message budget: TCP
    /// pushes back on the sender meanwhile).
    pub pause: Duration,
    /// The connection handled has registered now.
    pub registered: bool,
    /// The connection handled redeems an invite: keep it this long for the inviter's answer
    /// to reach it and for it to close, reading nothing more.
    pub linger: Option<Duration>,
    /// Changes to this coordinator's own members, for the cluster (`--nats`; ignored without).
    pub local: Vec<LocalChange>,
}

impl Outbox {
    fn refuse(&mut self, conn: ConnId, reason: RefuseReason, message: String) {
        self.send
            .push((conn, ServerMsg::Refused { reason, message }));
    }
}

/// Where one connection stands.
enum Phase {
    /// Handshaken: the first message must be `Register` or `Redeem`.
    Opened {
        key: NodeKey,
        handshake_hash: Vec<u8>,
    },
    Registered {
        budget: TokenBucket,
    },
    /// Sent `Redeem`: waits for its answer, and may send nothing more.
    Redeeming,
}

/// How long past [`REDEEM_TIMEOUT`] a redeemer is kept for its answer.
const REDEEM_LINGER: Duration = Duration::from_secs(2);

/// The control protocol of all connections.
pub struct Switchboard {
    registry: Registry,
    conns: HashMap<ConnId, Phase>,
    message_rate: Rate,
    /// Makes relay secrets; seeded by the caller (the server from the OS, tests fixed).
    rng: StdRng,
    /// Member changes for the other members, gathered over a window.
    fanout: Fanout,
    /// Connections of nodes that do not read batches (older than them): their member changes
    /// go one `PeerUp` or `PeerDown` each, at once.
    singles: HashSet<ConnId>,
}

impl Switchboard {
    /// `heartbeat` and `ttl` as for [`Registry::new`]; `message_rate` is the budget of each
    /// registered connection's control messages. Member changes leave one message per change
    /// at once; [`Switchboard::coalesce`] gathers them instead.
    pub fn new(heartbeat: Duration, ttl: Duration, message_rate: Rate, seed: [u8; 32]) -> Self {
        Switchboard {
            registry: Registry::new(heartbeat, ttl),
            conns: HashMap::new(),
            message_rate,
            rng: StdRng::from_seed(seed),
            fanout: Fanout::new(Duration::ZERO, MAX_BATCH_BYTES),
            singles: HashSet::new(),
        }
    }

    /// Gathers member changes over `window` into batches of at most `max_bytes` of JSON
    /// ([`crate::fanout`]); a zero window sends each at once, as `PeerUp` or `PeerDown`.
    pub fn coalesce(&mut self, window: Duration, max_bytes: usize) {
        self.fanout = Fanout::new(window, max_bytes);
    }

    /// When [`Switchboard::flush`] has member changes to send.
    pub fn fanout_deadline(&self) -> Option<Instant> {
        self.fanout.deadline()
    }

    /// The member changes gathered, once their window has passed.
    pub fn flush(&mut self, now: Instant) -> Outbox {
        Outbox {
            send: self.fanout.flush(now),
            ..Outbox::default()
        }
    }

    /// What the registry answered, with member changes for other members than `me` (the
    /// connection handled) gathered, and the member list for `me` itself (a registration) in
    /// batches at once.
    fn route(&mut self, now: Instant, me: Option<ConnId>, mut sends: Sends) -> Sends {
        // A remote member hears of member changes from its own coordinator; only a punch for
        // it goes on (to the cluster), and an inviter's answer (or a timeout) to a redemption
        // another coordinator passed here.
        sends.retain(|(conn, msg)| {
            !is_remote_id(*conn)
                || matches!(
                    msg,
                    ServerMsg::Punch { .. }
                        | ServerMsg::InviteAdmitted { .. }
                        | ServerMsg::Refused {
                            reason: RefuseReason::InviteRefused,
                            ..
                        }
                )
        });
        if !self.fanout.is_on() {
            return sends;
        }
        let mut out = Vec::with_capacity(4);
        let mut snapshot = Vec::new();
        // One record is fanned out per call (to every other member): its key is read once.
        let mut subject: Option<(u32, a2a_proto::NodeKey)> = None;
        for (conn, msg) in sends {
            if self.singles.contains(&conn) {
                out.push((conn, msg));
                continue;
            }
            match msg {
                ServerMsg::PeerUp { record, relay_id } if Some(conn) == me => {
                    snapshot.push(PeerEntry { record, relay_id });
                }
                ServerMsg::PeerUp { record, relay_id } => {
                    let key = match subject {
                        Some((id, key)) if id == relay_id => Some(key),
                        _ => serde_json::from_str::<a2a_proto::NodeRecord>(&record.body)
                            .ok()
                            .map(|r| r.node_key),
                    };
                    // The registry checked the record: its body parses.
                    let Some(key) = key else { continue };
                    subject = Some((relay_id, key));
                    self.fanout
                        .up(now, conn, key, PeerEntry { record, relay_id });
                }
                ServerMsg::PeerDown { node_key } => self.fanout.down(now, conn, node_key),
                m => out.push((conn, m)),
            }
        }
        if let Some(me) = me {
            out.extend(
                batches(Vec::new(), snapshot, self.fanout.max_bytes())
                    .into_iter()
                    .map(|m| (me, m)),
            );
        }
        // The leading edge: after a quiet window, what this call gathered leaves now.
        if self.fanout.quiet(now) {
            out.extend(self.fanout.flush_now(now));
        }
        out
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Connection `conn` completed its handshake with the node key `key`.
    pub fn open(&mut self, conn: ConnId, key: NodeKey, handshake_hash: Vec<u8>) {
        self.conns.insert(
            conn,
            Phase::Opened {
                key,
                handshake_hash,
            },
        );
    }

    /// Whether `conn` is a connection this switchboard knows (opened and not closed).
    pub fn is_open(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn)
    }

    /// One control message from `conn`.
    pub fn handle(&mut self, now: Instant, conn: ConnId, msg: ClientMsg) -> Outbox {
        let mut out = Outbox::default();
        match self.conns.get_mut(&conn) {
            None => out.close.push(conn),
            Some(Phase::Redeeming) => {
                // A redeemer has nothing more to say: anything from it ends it.
                out.close.push(conn);
            }
            Some(Phase::Opened { .. }) => self.first(now, conn, msg, &mut out),
            Some(Phase::Registered { budget }) => {
                out.pause = budget.delay(now);
                if !out.pause.is_zero() {
                    out.counts.push(Count::Throttled);
                }
                self.registered(now, conn, msg, &mut out);
            }
        }
        out.local = self.registry.take_changes();
        out
    }

    /// A member another coordinator of the cluster holds appears, or has a newer record, under
    /// relay id `conn` (see `cluster.rs`); refused (counted by the caller) when a local
    /// connection holds the key or the record does not verify here.
    pub fn remote_up(
        &mut self,
        now: Instant,
        conn: ConnId,
        network: NetworkId,
        record: a2a_proto::SignedRecord,
    ) -> Result<Outbox, crate::registry::Refusal> {
        let mut secret = [0u8; 16];
        self.rng.fill_bytes(&mut secret);
        let secret = RelaySecret(secret);
        let sent = self
            .registry
            .register_remote(now, conn, network, record, secret)?;
        let mut out = Outbox {
            send: self.route(now, None, sent),
            ..Outbox::default()
        };
        // Its relay slot: data for it goes to its coordinator. Nobody can bind it over UDP
        // (the secret is random and never sent).
        out.relay.push(RelayChange::Open {
            conn,
            network,
            secret,
        });
        out.local = self.registry.take_changes();
        Ok(out)
    }

    /// A remote member (relay id `conn`) is gone.
    pub fn remote_down(&mut self, now: Instant, conn: ConnId) -> Outbox {
        let sent = self.registry.remove_remote(conn);
        let mut out = Outbox {
            send: self.route(now, None, sent),
            ..Outbox::default()
        };
        out.relay.push(RelayChange::Close(conn));
        out.local = self.registry.take_changes();
        out
    }

    /// The first message of a connection: a registration, a redemption, or a refusal.
    fn first(&mut self, now: Instant, conn: ConnId, msg: ClientMsg, out: &mut Outbox) {
        let Some(Phase::Opened {
            key,
            handshake_hash,
        }) = self.conns.remove(&conn)
        else {
            unreachable!("called for opened connections only")
        };
        match msg {
            ClientMsg::Register {
                network,
                proof,
                record,
                batches,
            } => {
                if !batches {
                    self.singles.insert(conn);
                }
                let mut secret = [0u8; 16];
                self.rng.fill_bytes(&mut secret);
                let secret = RelaySecret(secret);
                let request = RegisterRequest {
                    conn_key: key,
                    handshake_hash: &handshake_hash,
                    network,
                    proof,
                    record,
                    relay_secret: secret,
                };
                match self.registry.register(now, conn, request) {
                    Ok(sent) => {
                        out.send = self.route(now, Some(conn), sent);
                        out.relay.push(RelayChange::Open {
                            conn,
                            network,
                            secret,
                        });
                        out.counts.push(Count::Registration);
                        out.registered = true;
                        self.conns.insert(
                            conn,
                            Phase::Registered {
                                budget: TokenBucket::new(self.message_rate, now),
                            },
                        );
                    }
                    Err((reason, message)) => {
                        self.singles.remove(&conn);
                        out.counts.push(Count::RegistrationRefused);
                        out.refuse(conn, reason, message);
                        out.close.push(conn);
                    }
                }
            }
            ClientMsg::Redeem {
                invite,
                signing_key,
                proof,
            } => {
                // A node with an invite code: the inviter decides; the node then reconnects to
                // register with its new certificate.
                match self
                    .registry
                    .redeem(now, conn, key, invite, signing_key, proof)
                {
                    Ok(sent) => {
                        out.counts.push(Count::Redemption);
                        out.send = sent;
                    }
                    Err((reason, message)) => {
                        out.counts.push(Count::RedemptionRefused);
                        out.refuse(conn, reason, message);
                    }
                }
                out.linger = Some(REDEEM_TIMEOUT + REDEEM_LINGER);
                self.conns.insert(conn, Phase::Redeeming);
            }
            _ => {
                out.counts.push(Count::BadMessage);
                out.refuse(
                    conn,
                    RefuseReason::Protocol,
                    "the first message must be a registration".into(),
                );
                out.close.push(conn);
            }
        }
    }

    fn registered(&mut self, now: Instant, conn: ConnId, msg: ClientMsg, out: &mut Outbox) {
        let r = &mut self.registry;
        match msg {
            ClientMsg::Heartbeat => {
                if r.heartbeat(now, conn) {
                    out.send.push((conn, ServerMsg::HeartbeatAck));
                } else {
                    // Replaced by a newer connection of the same node, or expired.
                    out.close.push(conn);
                }
            }
            ClientMsg::Update { record } => match r.update(now, conn, record) {
                Ok(sent) => out.send = self.route(now, Some(conn), sent),
                Err((reason, message)) => {
                    out.counts.push(Count::RegistrationRefused);
                    out.refuse(conn, reason, message);
                }
            },
            ClientMsg::Leave => out.close.push(conn),
            ClientMsg::Punch { to } => {
                if let Some(sent) = r.punch(conn, &to) {
                    out.counts.push(Count::Punch);
                    out.send = sent;
                }
            }
            ClientMsg::Register { .. } | ClientMsg::Redeem { .. } => {
                out.counts.push(Count::BadMessage);
                out.close.push(conn);
            }
            ClientMsg::InviteOpen { id } => {
                if r.invite_open(conn, id).is_err() {
                    out.counts.push(Count::BadMessage);
                }
            }
            ClientMsg::InviteClose { id } => r.invite_close(conn, &id),
            ClientMsg::InviteAdmit { ticket, sealed } => {
                let answer = ServerMsg::InviteAdmitted { sealed };
                match r.invite_answer(conn, ticket, answer) {
                    Some(sent) => out.send = sent,
                    None => out.counts.push(Count::BadMessage),
                }
            }
            ClientMsg::InviteDeny { ticket, message } => {
                let answer = ServerMsg::Refused {
                    reason: RefuseReason::InviteRefused,
                    message,
                };
                match r.invite_answer(conn, ticket, answer) {
                    Some(sent) => out.send = sent,
                    None => out.counts.push(Count::BadMessage),
                }
            }
            ClientMsg::Revoke { revocation } => match r.revoke(conn, revocation) {
                Ok((sent, removed)) => {
                    out.send = self.route(now, Some(conn), sent);
                    self.end_revoked(out, removed);
                }
                Err(_) => out.counts.push(Count::BadMessage),
            },
            ClientMsg::Rotate { notice } => match r.rotate(conn, notice) {
                Ok(sent) => out.send = sent,
                Err(_) => out.counts.push(Count::BadMessage),
            },
            ClientMsg::Statement { signed } => match r.statement(conn, signed) {
                Ok(sent) => {
                    if !sent.is_empty() {
                        out.counts.push(Count::Statement);
                    }
                    out.send = self.route(now, Some(conn), sent);
                }
                Err(_) => out.counts.push(Count::BadMessage),
            },
        }
    }

    /// A revocation another coordinator of the cluster applied: applied here too (its
    /// signature checked under `network`); `Err` if it does not verify.
    pub fn remote_revoke(
        &mut self,
        now: Instant,
        network: NetworkId,
        revocation: a2a_proto::membership::Signed,
    ) -> Result<Outbox, crate::registry::Refusal> {
        let (sent, removed) = self.registry.revoke_remote(network, revocation)?;
        let mut out = Outbox {
            send: self.route(now, None, sent),
            ..Outbox::default()
        };
        self.end_revoked(&mut out, removed);
        out.local = self.registry.take_changes();
        Ok(out)
    }

    /// A membership change another coordinator of the cluster sent or keeps: applied here as
    /// if a local member had sent it (checked under its network); `Err` if it does not verify.
    pub fn remote_change(
        &mut self,
        now: Instant,
        change: a2a_proto::cluster::Change,
    ) -> Result<Outbox, crate::registry::Refusal> {
        use a2a_proto::cluster::Change;
        let mut counts = Vec::new();
        let sent = match change {
            Change::Revoke {
                network,
                revocation,
            } => return self.remote_revoke(now, network, revocation),
            Change::Moved { network, notice } => self.registry.rotate_remote(network, notice)?,
            Change::Statement { network, signed } => {
                let sent = self.registry.statement_remote(network, signed)?;
                if !sent.is_empty() {
                    counts.push(Count::Statement);
                }
                sent
            }
        };
        let mut out = Outbox {
            send: self.route(now, None, sent),
            counts,
            ..Outbox::default()
        };
        out.local = self.registry.take_changes();
        Ok(out)
    }

    /// Runs in a cluster: redemptions of invites no local member made are passed to it.
    pub fn set_clustered(&mut self) {
        self.registry.set_clustered();
    }

    /// A newcomer on another coordinator redeems `invite` (under `ticket`, an id of the
    /// cluster's): passed to the local member that made it; `Err` if none did.
    pub fn cluster_redeem(
        &mut self,
        now: Instant,
        ticket: ConnId,
        node_key: NodeKey,
        invite: a2a_proto::invite::InviteId,
        signing_key: a2a_proto::keys::SignerId,
        proof: a2a_proto::invite::InviteProof,
    ) -> Result<Outbox, crate::registry::Refusal> {
        let sent = self
            .registry
            .redeem(now, ticket, node_key, invite, signing_key, proof)?;
        Ok(Outbox {
            send: sent,
            counts: vec![Count::Redemption],
            ..Outbox::default()
        })
    }

    /// A coordinator of the cluster passed the local newcomer `ticket`'s redemption to its
    /// inviter.
    pub fn cluster_redeem_held(&mut self, now: Instant, ticket: ConnId) {
        self.registry.cluster_redeem_held(now, ticket);
    }

    /// The inviter's answer for the local newcomer `ticket`, from the cluster.
    pub fn cluster_redeem_answer(&mut self, ticket: ConnId, answer: ServerMsg) -> Outbox {
        Outbox {
            send: self.registry.cluster_redeem_answer(ticket, answer),
            ..Outbox::default()
        }
    }

    /// The revoked node's connection, if held here: told why, then ended.
    fn end_revoked(&mut self, out: &mut Outbox, removed: Option<ConnId>) {
        if let Some(gone) = removed {
            self.fanout.forget(gone);
            self.singles.remove(&gone);
            out.counts.push(Count::Revocation);
            out.refuse(
                gone,
                RefuseReason::Revoked,
                "this node was removed from the network (a2actl kick)".into(),
            );
            // Its refusal is written, then its connection ends.
            out.close.push(gone);
            out.relay.push(RelayChange::Close(gone));
            self.conns.remove(&gone);
        }
    }

    /// Connection `conn` ended (closed by the node, by the server, or failed): forget it and
    /// tell the other members.
    pub fn close(&mut self, now: Instant, conn: ConnId) -> Outbox {
        let was_registered = matches!(self.conns.remove(&conn), Some(Phase::Registered { .. }));
        self.fanout.forget(conn);
        self.singles.remove(&conn);
        let sent = self.registry.disconnect(conn);
        let mut out = Outbox {
            send: self.route(now, None, sent),
            ..Outbox::default()
        };
        if was_registered {
            out.relay.push(RelayChange::Close(conn));
        }
        out.local = self.registry.take_changes();
        out
    }

    /// Members not heard from within the TTL are dropped (their connections ended) and
    /// redemptions whose inviter did not answer are refused.
    pub fn expire(&mut self, now: Instant) -> Outbox {
        let (send, closed) = self.registry.expire(now);
        for conn in &closed {
            self.fanout.forget(*conn);
            self.singles.remove(conn);
        }
        let mut out = Outbox {
            send: self.route(now, None, send),
            ..Outbox::default()
        };
        for conn in closed {
            self.conns.remove(&conn);
            out.relay.push(RelayChange::Close(conn));
            out.close.push(conn);
        }
        out.local = self.registry.take_changes();
        let forgotten = self.registry.take_forgotten();
        out.counts.extend(std::iter::repeat_n(
            Count::ChangesForgotten,
            forgotten.expired,
        ));
        out.counts.extend(std::iter::repeat_n(
            Count::ChangesForgottenOverCap,
            forgotten.over_cap,
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use a2a_proto::invite::{InviteId, InviteProof};
    use a2a_proto::keys::{Signature, SignerId, REGISTER_CONTEXT, REVOKE_CONTEXT, ROTATE_CONTEXT};
    use a2a_proto::membership::{node_signing_key, Revocation, RotationNotice, Signed};
    use a2a_proto::sealed::Sealed;
    use a2a_proto::{NetworkKey, NodeRecord, SignedRecord};

    fn hash(conn: ConnId) -> Vec<u8> {
        format!("handshake hash of connection {conn}").into_bytes()
    }

    fn key(n: u8) -> NodeKey {
        NodeKey([n; 32])
    }

    fn record(k: &NetworkKey, n: u8, ip: &str, issued_ms: u64) -> SignedRecord {
        NodeRecord {
            network: k.id(),
            node_key: key(n),
            name: format!("n{n}"),
            ip: ip.parse().unwrap(),
            candidates: vec![],
            issued_ms,
            ssh: None,
        }
        .sign(k)
    }

    fn register_msg(k: &NetworkKey, conn: ConnId, n: u8, ip: &str) -> ClientMsg {
        ClientMsg::Register {
            batches: true,
            network: k.id(),
            proof: Some(Signature(k.sign(REGISTER_CONTEXT, &hash(conn)))),
            record: record(k, n, ip, 1),
        }
    }

    fn board() -> Switchboard {
        Switchboard::new(
            Duration::from_secs(10),
            Duration::from_secs(30),
            Rate {
                per_sec: 100.0,
                burst: 5.0,
            },
            [7; 32],
        )
    }

    /// Opens connection `conn` for node `n` and registers it.
    fn join(b: &mut Switchboard, now: Instant, k: &NetworkKey, conn: ConnId, n: u8) -> Outbox {
        b.open(conn, key(n), hash(conn));
        b.handle(
            now,
            conn,
            register_msg(k, conn, n, &format!("100.64.0.{n}")),
        )
    }

    fn sent_to(out: &Outbox, conn: ConnId) -> Vec<&ServerMsg> {
        out.send
            .iter()
            .filter(|(c, _)| *c == conn)
            .map(|(_, m)| m)
            .collect()
    }

    fn refusal(out: &Outbox, conn: ConnId) -> Option<RefuseReason> {
        sent_to(out, conn).into_iter().find_map(|m| match m {
            ServerMsg::Refused { reason, .. } => Some(*reason),
            _ => None,
        })
    }

    #[test]
    fn a_registration_is_accepted_and_opens_a_relay_slot() {
        let mut b = board();
        let k = NetworkKey::derive(&[1; 32]);
        let now = Instant::now();
        let out = join(&mut b, now, &k, 1, 1);
        assert!(out.registered);
        assert_eq!(out.counts, vec![Count::Registration]);
        assert!(out.close.is_empty());
        let Some(ServerMsg::Registered {
            relay_id,
            relay_secret,
            ..
        }) = sent_to(&out, 1).first().copied()
        else {
            panic!("no Registered: {out:?}");
        };
        assert_eq!(*relay_id, 1);
        assert_eq!(
            out.relay,
            vec![RelayChange::Open {
                conn: 1,
                network: k.id(),
                secret: *relay_secret,
            }]
        );
        // The next member is told of the first, and the first of it.
        let out = join(&mut b, now, &k, 2, 2);
        assert!(sent_to(&out, 2)
            .iter()
            .any(|m| matches!(m, ServerMsg::PeerUp { relay_id: 1, .. })));
        assert!(sent_to(&out, 1)
            .iter()
            .any(|m| matches!(m, ServerMsg::PeerUp { relay_id: 2, .. })));
        // Each registration gets its own relay secret.
        let secrets: Vec<_> = [&out]
            .iter()
            .flat_map(|o| o.relay.iter())
            .map(|c| match c {
                RelayChange::Open { secret, .. } => *secret,
                RelayChange::Close(_) => unreachable!(),
            })
            .collect();
        assert_ne!(secrets[0], *relay_secret);
    }

    #[test]
    fn registrations_are_refused_for_a_bad_proof_or_a_taken_address() {
        let mut b = board();
        let k = NetworkKey::derive(&[1; 32]);
        let other = NetworkKey::derive(&[2; 32]);
        let now = Instant::now();
        // A proof over another connection's handshake hash (a replay).
        b.open(1, key(1), hash(1));
        let replayed = ClientMsg::Register {
            batches: true,
            network: k.id(),
            proof: Some(Signature(k.sign(REGISTER_CONTEXT, &hash(9)))),
            record: record(&k, 1, "100.64.0.1", 1),
        };
        let out = b.handle(now, 1, replayed);
        assert_eq!(refusal(&out, 1), Some(RefuseReason::BadProof));
        assert_eq!(out.close, vec![1]);
        assert_eq!(out.counts, vec![Count::RegistrationRefused]);
        assert!(out.relay.is_empty() && !out.registered);
        // A proof by another network's key.
        b.open(2, key(2), hash(2));
        let foreign = ClientMsg::Register {
            batches: true,
            network: k.id(),
            proof: Some(Signature(other.sign(REGISTER_CONTEXT, &hash(2)))),
            record: record(&k, 2, "100.64.0.2", 1),
        };
        assert_eq!(
            refusal(&b.handle(now, 2, foreign), 2),
            Some(RefuseReason::BadProof)
        );
        // An address a live member holds.
        join(&mut b, now, &k, 3, 3);
        b.open(4, key(4), hash(4));
        let out = b.handle(now, 4, register_msg(&k, 4, 4, "100.64.0.3"));
        assert_eq!(refusal(&out, 4), Some(RefuseReason::AddressInUse));
        assert_eq!(out.close, vec![4]);
        assert_eq!(b.registry().member_count(), 1);
    }

    #[test]
    fn nothing_but_a_registration_or_redemption_comes_first() {
        let mut b = board();
        let now = Instant::now();
        for (conn, msg) in [
            (1, ClientMsg::Heartbeat),
            (2, ClientMsg::Punch { to: key(9) }),
            (
                3,
                ClientMsg::InviteOpen {
                    id: InviteId([0; 16]),
                },
            ),
        ] {
            b.open(conn, key(conn as u8), hash(conn));
            let out = b.handle(now, conn, msg);
            assert_eq!(refusal(&out, conn), Some(RefuseReason::Protocol));
            assert_eq!(out.close, vec![conn]);
            assert_eq!(out.counts, vec![Count::BadMessage]);
        }
        // A connection the switchboard does not know (never opened, or closed) is ended.
        let out = b.handle(now, 77, ClientMsg::Heartbeat);
        assert_eq!(out.close, vec![77]);
        assert!(out.send.is_empty());
        // A registered node registering again is a protocol error too.
        let k = NetworkKey::derive(&[1; 32]);
        join(&mut b, now, &k, 10, 10);
        let out = b.handle(now, 10, register_msg(&k, 10, 10, "100.64.0.10"));
        assert_eq!(out.close, vec![10]);
        assert_eq!(out.counts, vec![Count::BadMessage]);
    }

    #[test]
    fn updates_fan_out_and_heartbeats_are_acknowledged() {
        let mut b = board();
        let k = NetworkKey::derive(&[1; 32]);
        let now = Instant::now();
        for n in 1..=3 {
            join(&mut b, now, &k, n as ConnId, n);
        }
        let out = b.handle(
            now,
            1,
            ClientMsg::Update {
                record: record(&k, 1, "100.64.0.1", 2),
            },
        );
        assert!(matches!(
            sent_to(&out, 1)[..],
            [ServerMsg::Registered { .. }]
        ));
        for other in [2, 3] {
            assert!(matches!(
                sent_to(&out, other)[..],
                [ServerMsg::PeerUp { relay_id: 1, .. }]
            ));
        }
        // An older record is refused, to the sender only.
        let out = b.handle(
            now,
            1,
            ClientMsg::Update {
                record: record(&k, 1, "100.64.0.1", 2),
            },
        );
        assert_eq!(refusal(&out, 1), Some(RefuseReason::BadRecord));
        assert_eq!(out.send.len(), 1);
        let out = b.handle(now, 2, ClientMsg::Heartbeat);
        assert_eq!(out.send, vec![(2, ServerMsg::HeartbeatAck)]);
    }

    #[test]
    fn punches_reach_the_peer_in_the_same_network_only() {
        let mut b = board();
        let k = NetworkKey::derive(&[1; 32]);
        let other = NetworkKey::derive(&[2; 32]);
        let now = Instant::now();
        join(&mut b, now, &k, 1, 1);
        join(&mut b, now, &k, 2, 2);
        join(&mut b, now, &other, 3, 3);
        let out = b.handle(now, 1, ClientMsg::Punch { to: key(2) });
        assert_eq!(out.send, vec![(2, ServerMsg::Punch { from: key(1) })]);
        assert_eq!(out.counts, vec![Count::Punch]);
        let out = b.handle(now, 3, ClientMsg::Punch { to: key(1) });
        assert!(out.send.is_empty() && out.counts.is_empty());
    }

    #[test]
    fn redemptions_go_to_the_inviter_and_its_answer_to_the_redeemer() {
        let mut b = board();
        let k = NetworkKey::derive(&[1; 32]);
        let now = Instant::now();
        join(&mut b, now, &k, 1, 1);
        join(&mut b, now, &k, 2, 2);
        let id = InviteId([4; 16]);
        assert!(b
            .handle(now, 1, ClientMsg::InviteOpen { id })
            .counts
            .is_empty());
        let signer = SignerId::from(node_signing_key(&[5; 32]).verifying_key());
        let redeem = ClientMsg::Redeem {
            invite: id,
            signing_key: signer,
            proof: InviteProof([6; 32]),
        };
        // Redeemer on connection 50: passed to the inviter with its channel's node key.
        b.open(50, key(50), hash(50));
        let out = b.handle(now, 50, redeem.clone());
        assert_eq!(out.counts, vec![Count::Redemption]);
        assert_eq!(out.linger, Some(REDEEM_TIMEOUT + REDEEM_LINGER));
        assert!(out.close.is_empty() && !out.registered);
        assert!(matches!(
            &out.send[..],
            [(1, ServerMsg::RedeemRequest { ticket: 50, node_key, .. })] if *node_key == key(50)
        ));
        // Only the inviter answers; the sealed answer reaches the redeemer alone.
        let sealed = Sealed::from_bytes(vec![8; 48]).unwrap();
        let admit = |ticket| ClientMsg::InviteAdmit {
            ticket,
            sealed: sealed.clone(),
        };
        let out = b.handle(now, 2, admit(50));
        assert!(out.send.is_empty());
        assert_eq!(out.counts, vec![Count::BadMessage]);
        let out = b.handle(now, 1, admit(50));
        assert_eq!(
            out.send,
            vec![(
                50,
                ServerMsg::InviteAdmitted {
                    sealed: sealed.clone()
                }
            )]
        );
        // The redeemer may say nothing more.
        assert_eq!(b.handle(now, 50, ClientMsg::Heartbeat).close, vec![50]);
        // A denial reaches its redeemer as a refusal.
        b.open(51, key(51), hash(51));
        b.handle(now, 51, redeem.clone());
        let out = b.handle(
            now,
            1,
            ClientMsg::InviteDeny {
                ticket: 51,
                message: "used up".into(),
            },
        );
        assert_eq!(refusal(&out, 51), Some(RefuseReason::InviteRefused));
        // An invite nobody holds is refused at once.
        b.open(52, key(52), hash(52));
        let out = b.handle(
            now,
            52,
            ClientMsg::Redeem {
                invite: InviteId([9; 16]),
                signing_key: signer,
                proof: InviteProof([6; 32]),
            },
        );
        assert_eq!(refusal(&out, 52), Some(RefuseReason::InviteRefused));
        assert_eq!(out.counts, vec![Count::RedemptionRefused]);
    }

    #[test]
    fn a_revocation_is_broadcast_ends_the_node_and_keeps_it_out() {
        let mut b = board();
        let k = NetworkKey::derive(&[1; 32]);
        let rogue = NetworkKey::derive(&[2; 32]);
        let now = Instant::now();
        for n in 1..=3 {
            join(&mut b, now, &k, n as ConnId, n);
        }
        let revocation = Revocation {
            network: k.id(),
            node_key: key(3),
            issued_ms: 1,
        };
        // Signed by another key: refused, nobody removed.
        let out = b.handle(
            now,
            1,
            ClientMsg::Revoke {
                revocation: Signed::sign(&revocation, &rogue, REVOKE_CONTEXT),
            },
        );
        assert_eq!(out.counts, vec![Count::BadMessage]);
        assert_eq!(b.registry().member_count(), 3);
        let out = b.handle(
            now,
            1,
            ClientMsg::Revoke {
                revocation: Signed::sign(&revocation, &k, REVOKE_CONTEXT),
            },
        );
        assert!(sent_to(&out, 2)
            .iter()
            .any(|m| matches!(m, ServerMsg::Revoked { .. })));
        assert!(sent_to(&out, 2)
            .iter()
            .any(|m| matches!(m, ServerMsg::PeerDown { node_key } if *node_key == key(3))));
        assert_eq!(refusal(&out, 3), Some(RefuseReason::Revoked));
        assert_eq!(out.close, vec![3]);
        assert_eq!(out.relay, vec![RelayChange::Close(3)]);
        assert_eq!(out.counts, vec![Count::Revocation]);
        assert!(!b.is_open(3));
        // Its connection ending later changes nothing more.
        assert_eq!(b.close(now, 3), Outbox::default());
        // It cannot register again; a later member learns of the revocation.
        b.open(4, key(3), hash(4));
        let out = b.handle(now, 4, register_msg(&k, 4, 3, "100.64.0.3"));
        assert_eq!(refusal(&out, 4), Some(RefuseReason::Revoked));
        let out = join(&mut b, now, &k, 5, 5);
        assert!(sent_to(&out, 5)
            .iter()
            .any(|m| matches!(m, ServerMsg::Revoked { .. })));
    }

    #[test]
    fn a_rotation_notice_is_kept_for_members_that_come_later() {
        let mut b = board();
        let k = NetworkKey::derive(&[1; 32]);
        let next = NetworkKey::derive(&[2; 32]);
        let now = Instant::now();
        join(&mut b, now, &k, 1, 1);
        join(&mut b, now, &k, 2, 2);
        let notice = Signed::sign(
            &RotationNotice {
                old_network: k.id(),
                new_network: next.id(),
                rotator: key(1),
                issued_ms: 1,
                carried: vec![],
            },
            &k,
            ROTATE_CONTEXT,
        );
        let out = b.handle(
            now,
            1,
            ClientMsg::Rotate {
                notice: notice.clone(),
            },
        );
        assert_eq!(
            out.send,
            vec![(
                2,
                ServerMsg::Moved {
                    notice: notice.clone()
                }
            )]
        );
        // Everyone leaves; a latecomer of the old network is told where it went.
        for conn in [1, 2] {
            b.handle(now, conn, ClientMsg::Leave);
            b.close(now, conn);
        }
        let out = join(&mut b, now, &k, 3, 3);
        assert!(sent_to(&out, 3).contains(&&ServerMsg::Moved { notice }));
    }

    #[test]
    fn leaving_and_expiry_tell_the_others_and_close_relay_slots() {
        let mut b = board();
        let k = NetworkKey::derive(&[1; 32]);
        let t0 = Instant::now();
        for n in 1..=3 {
            join(&mut b, t0, &k, n as ConnId, n);
        }
        let out = b.handle(t0, 3, ClientMsg::Leave);
        assert_eq!(out.close, vec![3]);
        let out = b.close(t0, 3);
        assert_eq!(out.relay, vec![RelayChange::Close(3)]);
        assert_eq!(out.send.len(), 2);
        // 1 heartbeats, 2 goes silent.
        b.handle(t0 + Duration::from_secs(20), 1, ClientMsg::Heartbeat);
        let out = b.expire(t0 + Duration::from_secs(31));
        assert_eq!(out.close, vec![2]);
        assert_eq!(out.relay, vec![RelayChange::Close(2)]);
        assert_eq!(
            out.send,
            vec![(1, ServerMsg::PeerDown { node_key: key(2) })]
        );
    }

    #[test]
    fn control_messages_are_paced_to_the_budget() {
        let mut b = board();
        let k = NetworkKey::derive(&[1; 32]);
        let now = Instant::now();
        join(&mut b, now, &k, 1, 1);
        // A burst of 5 passes at once; the sixth asks the reader to wait a token's time.
        for _ in 0..5 {
            assert_eq!(b.handle(now, 1, ClientMsg::Heartbeat).pause, Duration::ZERO);
        }
        let out = b.handle(now, 1, ClientMsg::Heartbeat);
        assert!(out.pause > Duration::ZERO, "{out:?}");
        assert!(out.counts.contains(&Count::Throttled));
        // Still handled: pacing delays, it does not drop.
        assert_eq!(out.send, vec![(1, ServerMsg::HeartbeatAck)]);
    }

    /// Member changes for the others wait for the window and leave as one batch per member;
    /// a joiner gets the members already there at once, in batches, counted in `Registered`.
    #[test]
    fn with_coalescing_a_join_storm_is_one_message_per_member_per_window() {
        let k = NetworkKey::derive(&[1; 32]);
        let t0 = Instant::now();
        let member_msgs = |out: &Outbox| {
            out.send
                .iter()
                .filter(|(_, m)| {
                    matches!(
                        m,
                        ServerMsg::PeerUp { .. }
                            | ServerMsg::PeerDown { .. }
                            | ServerMsg::Peers { .. }
                    )
                })
                .count()
        };
        // Without: one message per change, n(n-1) of them.
        let mut b = board();
        let legacy: usize = (1..=10)
            .map(|n| member_msgs(&join(&mut b, t0, &k, n, n as u8)))
            .sum();
        assert_eq!(legacy, 10 * 9);
        let mut b = board();
        b.coalesce(crate::fanout::WINDOW, crate::fanout::MAX_BATCH_BYTES);
        let mut at_once = 0;
        for n in 1..=10u8 {
            let out = join(&mut b, t0, &k, n as ConnId, n);
            let mine = sent_to(&out, n as ConnId);
            assert!(
                matches!(mine[0], ServerMsg::Registered { peers, .. } if *peers == n as u32 - 1)
            );
            if n == 1 {
                assert_eq!(mine.len(), 1);
            } else {
                assert!(matches!(&mine[1..], [ServerMsg::Peers { down, up }]
                    if down.is_empty() && up.len() == n as usize - 1));
            }
            if n == 2 {
                // The first change after a quiet spell leaves at once (the leading edge).
                assert!(
                    matches!(sent_to(&out, 1)[..], [ServerMsg::Peers { up, .. }] if up.len() == 1)
                );
            } else {
                assert!(
                    out.send.iter().all(|(c, _)| *c == n as ConnId),
                    "others wait"
                );
            }
            at_once += member_msgs(&out);
        }
        assert_eq!(at_once, 10);
        assert!(b.flush(t0).send.is_empty());
        let at = b.fanout_deadline().unwrap();
        let out = b.flush(at);
        // Member n learns of the 10 - n that came after it (member 1: after 2), in one message.
        assert_eq!(member_msgs(&out), 9);
        for n in 1..10u32 {
            let after = if n == 1 { 8 } else { 10 - n as usize };
            assert!(
                matches!(sent_to(&out, n)[..], [ServerMsg::Peers { up, .. }] if up.len() == after)
            );
        }
        // A member that left and one that re-registered: the others hear once, departures first.
        b.handle(at, 3, ClientMsg::Leave);
        let out = b.close(at, 3);
        assert!(out.send.is_empty() && out.relay == vec![RelayChange::Close(3)]);
        b.close(at, 4);
        let out = join(&mut b, at, &k, 14, 4);
        assert!(matches!(
            sent_to(&out, 14)[..],
            [
                ServerMsg::Registered { peers: 8, .. },
                ServerMsg::Peers { .. }
            ]
        ));
        let out = b.flush(b.fanout_deadline().unwrap());
        assert_eq!(member_msgs(&out), 8);
        assert!(
            matches!(sent_to(&out, 1)[..], [ServerMsg::Peers { down, up }]
            if *down == vec![key(3), key(4)] && up.len() == 1 && up[0].relay_id == 14)
        );
        assert!(sent_to(&out, 3).is_empty() && sent_to(&out, 4).is_empty());
    }

    /// A node older than the batches (its registration without `batches`) still gets one
    /// `PeerUp`/`PeerDown` per change, at once, beside members that get batches.
    #[test]
    fn a_node_without_batches_gets_one_message_per_change_at_once() {
        let k = NetworkKey::derive(&[1; 32]);
        let t0 = Instant::now();
        let mut b = board();
        b.coalesce(crate::fanout::WINDOW, crate::fanout::MAX_BATCH_BYTES);
        join(&mut b, t0, &k, 1, 1);
        join(&mut b, t0, &k, 2, 2);
        let ClientMsg::Register {
            network,
            proof,
            record,
            ..
        } = register_msg(&k, 3, 3, "100.64.0.3")
        else {
            unreachable!()
        };
        let old = ClientMsg::Register {
            network,
            proof,
            record,
            batches: false,
        };
        let json = serde_json::to_value(&old).unwrap();
        assert!(
            json.get("batches").is_none(),
            "as an old node sends it: {json}"
        );
        b.open(3, key(3), hash(3));
        let out = b.handle(t0, 3, serde_json::from_value(json).unwrap());
        let mine = sent_to(&out, 3);
        assert!(matches!(mine[0], ServerMsg::Registered { peers: 2, .. }));
        assert!(
            mine[1..]
                .iter()
                .all(|m| matches!(m, ServerMsg::PeerUp { .. })),
            "{mine:?}"
        );
        assert_eq!(mine.len(), 3);
        // A new member: the old node hears at once, the others at the window's end.
        let out = join(&mut b, t0, &k, 4, 4);
        assert!(matches!(sent_to(&out, 3)[..], [ServerMsg::PeerUp { .. }]));
        assert!(sent_to(&out, 1).is_empty());
        let out = b.flush(b.fanout_deadline().unwrap());
        assert!(sent_to(&out, 3).is_empty());
        assert!(matches!(sent_to(&out, 1)[..], [ServerMsg::Peers { .. }]));
        // A departure, the same.
        let out = b.close(t0, 4);
        assert!(matches!(sent_to(&out, 3)[..], [ServerMsg::PeerDown { .. }]));
        assert!(sent_to(&out, 1).is_empty());
    }
}
