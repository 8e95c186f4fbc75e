//! The coordinator cluster without I/O (`--nats`; see README, *A coordinator cluster on NATS*):
//! what this coordinator tells the others, and what to do with what they tell it.
//!
//! The driver feeds it the time, this coordinator's own member changes (from the
//! switchboard's `Outbox::local`) and every message that came from NATS;
//! it answers with a [`Step`]: the messages to publish, and what to apply to the local
//! switchboard and relay table: remote members appearing or going ([`Apply::Up`],
//! [`Apply::Down`]), a punch for a local node ([`Apply::Punch`]), relay data for a local node
//! ([`Apply::Relay`]). Call [`Cluster::tick`] at [`Cluster::poll_timeout`].
//!
//! Every message is sealed under the cluster key ([`a2a_proto::cluster`]); what does not open,
//! is replayed, stale, from too many instances or over a sender's member limit, or carries a
//! record that does not verify, is refused and counted ([`Counts`]), never applied. Remote
//! members get relay ids of this coordinator's own in the upper half of the `u32` range
//! ([`REMOTE_BASE`]), which local connections never use. Nothing here is written or printed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use a2a_proto::cluster::{
    member_digest, parse_relay, parse_relay_batch, push_relay_batch, relay_body, subject_all,
    subject_bridge, subject_to, xor_into, Change, ClusterKey, ClusterMsg, Entry, Gone, Header,
    Instance, OpenError, BATCH_ENTRY_OVERHEAD, CHANGES_PER_MSG, ENTRIES_PER_MSG, KIND_BRIDGE_HELLO,
    KIND_MSG, KIND_RELAY, KIND_RELAY_BATCH,
};
use a2a_proto::control::{RefuseReason, ServerMsg};
use a2a_proto::invite::{InviteId, InviteProof};
use a2a_proto::keys::SignerId;
use a2a_proto::membership::{Revocation, RotationNotice};
use a2a_proto::policy::{PolicyDoc, TagStatement};
use a2a_proto::{NetworkId, NodeKey, SignedRecord};

use crate::registry::{is_remote_id, ConnId, LocalChange, REMOTE_BASE};

/// How often a coordinator says it is alive.
pub const ALIVE_EVERY: Duration = Duration::from_secs(2);
/// A coordinator not heard from for this long is dead: its members go.
pub const DEAD_AFTER: Duration = Duration::from_secs(7);
/// At most one snapshot asked of one coordinator per this long.
pub const SYNC_ASK_EVERY: Duration = Duration::from_secs(2);
/// A message sent further than this from the receiver's clock is refused.
pub const MAX_SKEW_MS: u64 = 30_000;
/// Sequence numbers accepted behind the highest seen (out of order), per sender instance and
/// kind of subject.
pub const REPLAY_WINDOW: u64 = 64;
/// The top bit of a sequence number: set on messages for one coordinator (`a2a.CID.to.…`),
/// clear on the cluster's subject. The two are numbered apart (the receiver reads them from
/// two subscriptions, in two tasks: their order across the two is not kept) and never share a
/// nonce.
pub const DIRECTED: u64 = 1 << 63;
/// The next bit, set (with [`DIRECTED`]) on relay data and on a bridge's hello: relay data may
/// go over NATS or over a bridge (`bridge.rs`), so it is numbered apart from the
/// directed messages that go over NATS alone, whose order it would otherwise break.
pub const RELAY_SPACE: u64 = 1 << 62;
/// A bridge's hello sent further than this from the dialer's clock is refused.
pub const HELLO_SKEW_MS: u64 = MAX_SKEW_MS;
/// The most body bytes of one batch of relay data (NATS' default `max_payload` is 1 MiB; a
/// batch this size is some 45 WireGuard datagrams).
pub const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Members one coordinator may announce.
pub const MAX_MEMBERS_PER_PEER: usize = 100_000;
/// Coordinator instances heard at once.
pub const MAX_PEERS: usize = 64;
/// Redemptions other coordinators passed here and not answered yet, at most.
pub const MAX_TICKETS: usize = 1024;
/// Body bytes of one [`ClusterMsg::Changes`] message at most when a snapshot carries what a
/// coordinator keeps (a rotation notice may be 256 KiB; NATS' default limit is 1 MiB).
pub const MAX_CHANGES_BYTES: usize = 512 * 1024;
/// The longest refusal text passed on from another coordinator.
pub const MAX_REFUSAL_LEN: usize = 512;

/// Seals what this coordinator publishes; shared with the relay path, which seals relay data
/// without taking the cluster's lock.
pub struct Sealer {
    key: ClusterKey,
    me: Instance,
    /// The next numbers on the cluster's subject, and on the coordinators' own subjects.
    seq_all: AtomicU64,
    seq_to: AtomicU64,
    seq_relay: AtomicU64,
    cid: String,
    all: String,
    /// This instance's subject, and the subject of a bridge's hello.
    mine: String,
    bridge: String,
}

impl Sealer {
    /// For the coordinator identity (`private`, `public`) and this instance `me` (random at
    /// every start).
    pub fn new(private: &[u8; 32], public: &[u8; 32], me: Instance) -> Self {
        let cid = a2a_proto::cluster::cluster_id(public);
        Sealer {
            key: ClusterKey::derive(private),
            me,
            seq_all: AtomicU64::new(0),
            seq_to: AtomicU64::new(0),
            seq_relay: AtomicU64::new(0),
            all: subject_all(&cid),
            mine: subject_to(&cid, &me),
            bridge: subject_bridge(&cid),
            cid,
        }
    }

    pub fn me(&self) -> Instance {
        self.me
    }

    /// The subject every coordinator of the cluster listens on.
    pub fn subject_all(&self) -> String {
        self.all.clone()
    }

    /// The subject of one instance (this one: what to subscribe to).
    pub fn subject_to(&self, instance: &Instance) -> String {
        subject_to(&self.cid, instance)
    }

    /// This instance's subject: what relay data over a bridge is sealed for.
    pub fn subject_mine(&self) -> &str {
        &self.mine
    }

    /// One envelope: `body` of `kind` for `subject`, with the next sequence number (of the
    /// cluster's subject, of the directed messages, or of relay data).
    pub fn seal(&self, subject: &str, kind: u8, body: &[u8], now_ms: u64) -> Vec<u8> {
        let seq = if subject == self.all {
            self.seq_all.fetch_add(1, Ordering::Relaxed) + 1
        } else if kind == KIND_RELAY || kind == KIND_RELAY_BATCH || kind == KIND_BRIDGE_HELLO {
            DIRECTED | RELAY_SPACE | (self.seq_relay.fetch_add(1, Ordering::Relaxed) + 1)
        } else {
            DIRECTED | (self.seq_to.fetch_add(1, Ordering::Relaxed) + 1)
        };
        let header = Header {
            sender: self.me,
            seq,
            sent_ms: now_ms,
            kind,
        };
        self.key.seal(subject, header, body)
    }

    /// Opens an envelope received on `subject` (the seal only: no state, so no lock; the
    /// driver calls it before taking the cluster's). Nothing in it may be used before
    /// [`Cluster::accept`] took it, which counts what was refused here too.
    pub fn open(&self, subject: &str, payload: &[u8]) -> Result<Opened, OpenError> {
        self.key
            .open(subject, payload)
            .map(|(header, body)| Opened { header, body })
    }

    /// A bridge's hello: names this instance to the coordinator that dialed it.
    pub fn seal_hello(&self, now_ms: u64) -> Vec<u8> {
        self.seal(&self.bridge, KIND_BRIDGE_HELLO, &[], now_ms)
    }

    /// The instance a bridge's hello names, if it opens under the cluster key, is a hello and
    /// was sent within [`HELLO_SKEW_MS`] of `now_ms`.
    pub fn open_hello(&self, payload: &[u8], now_ms: u64) -> Result<Instance, OpenError> {
        let (header, body) = self.key.open(&self.bridge, payload)?;
        if header.kind != KIND_BRIDGE_HELLO
            || !body.is_empty()
            || header.seq & (DIRECTED | RELAY_SPACE) != DIRECTED | RELAY_SPACE
            || now_ms.abs_diff(header.sent_ms) > HELLO_SKEW_MS
        {
            return Err(OpenError::Malformed);
        }
        Ok(header.sender)
    }

    /// Relay data from local relay id `src` for the member another coordinator gave relay id
    /// `remote_dst`, on `subject` (that coordinator's).
    pub fn seal_relay(&self, via: &Via, src: u32, datagram: &[u8], now_ms: u64) -> Publish {
        Publish {
            subject: via.subject.clone(),
            payload: self.seal(
                &via.subject,
                KIND_RELAY,
                &relay_body(src, via.remote_id, datagram),
                now_ms,
            ),
        }
    }

    /// What is queued for NATS, in one go: the messages sealed already first (in their order),
    /// then the relay data packed per destination coordinator, in order, in as few envelopes
    /// as [`MAX_BATCH_BYTES`] allows (one datagram alone goes as kind [`KIND_RELAY`], several
    /// as [`KIND_RELAY_BATCH`]): one seal and one NATS message per envelope, not per datagram.
    pub fn pack(&self, items: impl IntoIterator<Item = Outgoing>, now_ms: u64) -> Packed {
        let mut packed = Packed::default();
        let mut relay = Vec::new();
        // Open batches, one per destination subject (a cluster has few coordinators).
        let mut open: Vec<Batch> = Vec::new();
        for item in items {
            let r = match item {
                Outgoing::Sealed(p) => {
                    packed.publish.push(p);
                    continue;
                }
                Outgoing::Relay(r) => r,
            };
            let room = BATCH_ENTRY_OVERHEAD + r.datagram.len();
            let i = match open.iter().position(|b| b.subject == r.via.subject) {
                Some(i) => {
                    if !open[i].body.is_empty() && open[i].body.len() + room > MAX_BATCH_BYTES {
                        let full = std::mem::replace(&mut open[i], Batch::new(&r.via.subject));
                        relay.push(self.seal_batch(full, now_ms));
                    }
                    i
                }
                None => {
                    open.push(Batch::new(&r.via.subject));
                    open.len() - 1
                }
            };
            let b = &mut open[i];
            push_relay_batch(&mut b.body, r.src, r.via.remote_id, &r.datagram);
            b.count += 1;
            packed.datagrams += 1;
        }
        for b in open {
            relay.push(self.seal_batch(b, now_ms));
        }
        packed.relay_messages = relay.len() as u64;
        packed.publish.append(&mut relay);
        packed
    }

    fn seal_batch(&self, mut b: Batch, now_ms: u64) -> Publish {
        let kind = if b.count == 1 {
            // One datagram: `source | destination | datagram`, as a single relay message.
            b.body.drain(8..BATCH_ENTRY_OVERHEAD);
            KIND_RELAY
        } else {
            KIND_RELAY_BATCH
        };
        Publish {
            payload: self.seal(&b.subject, kind, &b.body, now_ms),
            subject: b.subject,
        }
    }
}

/// An envelope whose seal opened ([`Sealer::open`]), not accepted yet: its sender, number
/// and time are unchecked, so it goes to [`Cluster::accept`] and nowhere else.
#[derive(Debug)]
pub struct Opened {
    header: Header,
    body: Vec<u8>,
}

/// Relay data for a member another coordinator holds, not sealed yet: the relay paths queue
/// it, [`Sealer::pack`] packs what is queued.
#[derive(Debug, Clone)]
pub struct RelayOut {
    pub via: Arc<Via>,
    /// The sender's relay id here.
    pub src: u32,
    pub datagram: Vec<u8>,
}

/// What waits for NATS.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A message sealed already (presence, members, punches, snapshots).
    Sealed(Publish),
    Relay(RelayOut),
}

/// What [`Sealer::pack`] made of the queue.
#[derive(Debug, Default)]
pub struct Packed {
    /// In the order to publish.
    pub publish: Vec<Publish>,
    /// Of those, the envelopes of relay data, and the datagrams they carry.
    pub relay_messages: u64,
    pub datagrams: u64,
}

struct Batch {
    subject: String,
    body: Vec<u8>,
    count: usize,
}

impl Batch {
    fn new(subject: &str) -> Self {
        Batch {
            subject: subject.to_string(),
            body: Vec::with_capacity(MAX_BATCH_BYTES),
            count: 0,
        }
    }
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub subject: String,
    pub payload: Vec<u8>,
}

/// Where relay data for a remote member goes: its coordinator's subject, and the relay id
/// that coordinator gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    pub subject: String,
    pub remote_id: u32,
}

/// What to apply locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Apply {
    /// A remote member appears or has a newer record: hold it under relay id `conn`, relay
    /// data for it goes `via`.
    Up {
        network: NetworkId,
        record: SignedRecord,
        conn: ConnId,
        via: Via,
    },
    /// The remote member held under relay id `conn` is gone (or held under another id now).
    Down { conn: ConnId },
    /// Tell the local member `to` of `network` that `from` probes it.
    Punch {
        network: NetworkId,
        from: NodeKey,
        to: NodeKey,
    },
    /// A membership change (revocation, rotation notice, statement) a member of another
    /// coordinator sent, or one another coordinator keeps: apply it here (its signature was
    /// checked under its network; the registry checks it again).
    Change(Change),
    /// Another coordinator asked for what this one holds: the membership changes it keeps go
    /// to `to` ([`Cluster::kept_to`]) before the snapshot of members.
    SendKept { to: Instance },
    /// A newcomer on another coordinator redeems `invite`: if a local member made it, pass it
    /// on under `ticket` and say so ([`Cluster::redeem_held`]), else forget the ticket
    /// ([`Cluster::forget_ticket`]). The inviter's answer to `ticket` goes to
    /// [`Cluster::redeem_answer`].
    Redeem {
        ticket: ConnId,
        invite: InviteId,
        node_key: NodeKey,
        signing_key: SignerId,
        proof: InviteProof,
    },
    /// The redemption of the local newcomer `ticket` reached the member that made the invite.
    RedeemHeld { ticket: ConnId },
    /// The answer for the local newcomer `ticket` (`InviteAdmitted` or `Refused`).
    RedeemAnswer { ticket: ConnId, answer: ServerMsg },
    /// Relay data from the remote member `src` (its local relay id) for the local relay id
    /// `dst`.
    Relay {
        src: ConnId,
        dst: ConnId,
        datagram: Vec<u8>,
    },
}

/// What the cluster counted (numbers only).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Messages opened and accepted.
    pub received: u64,
    pub published: u64,
    /// Did not open under the cluster key (a stranger, another cluster, changed on the way).
    pub refused_seal: u64,
    /// Not an envelope, or its body does not parse.
    pub refused_malformed: u64,
    /// A sequence number seen already or too far behind.
    pub refused_replay: u64,
    /// Sent too far from this clock.
    pub refused_stale: u64,
    /// Over [`MAX_PEERS`] instances, or over a sender's [`MAX_MEMBERS_PER_PEER`].
    pub refused_flood: u64,
    /// A record that does not verify for its network.
    pub refused_record: u64,
    /// A punch or relay data for a member this coordinator does not hold.
    pub unknown_member: u64,
    /// Our own messages, echoed by NATS.
    pub own: u64,
    pub coordinators_expired: u64,
    pub syncs_asked: u64,
    /// Redemptions passed to the cluster, and answers passed back.
    pub redeems_asked: u64,
    pub redeems_answered: u64,
}

/// What to publish and to apply after one call.
#[derive(Debug, Default)]
pub struct Step {
    pub publish: Vec<Publish>,
    pub apply: Vec<Apply>,
}

type Key = (NetworkId, NodeKey);

struct Remote {
    record: SignedRecord,
    remote_id: u32,
    local_id: ConnId,
    issued_ms: u64,
}

struct Peer {
    last_heard: Instant,
    /// Sequence windows of the cluster's subject, of this coordinator's own and of relay data.
    replay_all: Replay,
    replay_to: Replay,
    replay_relay: Replay,
    members: HashMap<Key, Remote>,
    by_remote_id: HashMap<u32, ConnId>,
    digest: [u8; 16],
    last_ask: Option<Instant>,
    /// A snapshot being received: the members it named so far.
    snapshot: Option<HashSet<Key>>,
}

/// The sliding window of sequence numbers (as IPsec's and WireGuard's).
struct Replay {
    top: u64,
    /// Bit i: `top - i` was seen.
    bits: u64,
}

impl Replay {
    fn accept(&mut self, seq: u64) -> bool {
        if seq == 0 {
            return false;
        }
        if seq > self.top {
            let shift = seq - self.top;
            self.bits = if shift >= REPLAY_WINDOW {
                1
            } else {
                (self.bits << shift) | 1
            };
            self.top = seq;
            return true;
        }
        let behind = self.top - seq;
        if behind >= REPLAY_WINDOW || self.bits & (1 << behind) != 0 {
            return false;
        }
        self.bits |= 1 << behind;
        true
    }
}

struct Local {
    record: SignedRecord,
    conn: ConnId,
    issued_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    Local,
    Remote(Instance),
}

/// One coordinator's view of the cluster.
pub struct Cluster {
    sealer: Arc<Sealer>,
    local: HashMap<Key, Local>,
    local_digest: [u8; 16],
    peers: HashMap<Instance, Peer>,
    /// Who the applied record of each member comes from (one per key).
    held: HashMap<Key, Holder>,
    by_local_id: HashMap<ConnId, (Instance, Key)>,
    /// Redemptions other coordinators passed here: the ticket here → the asking instance and
    /// its ticket. Numbered with the remote members (never the same id).
    tickets: HashMap<ConnId, (Instance, u32)>,
    next_id: u32,
    next_alive: Instant,
    pub counts: Counts,
}

impl Cluster {
    pub fn new(sealer: Arc<Sealer>, now: Instant) -> Self {
        Cluster {
            sealer,
            local: HashMap::new(),
            local_digest: [0; 16],
            peers: HashMap::new(),
            held: HashMap::new(),
            by_local_id: HashMap::new(),
            tickets: HashMap::new(),
            next_id: REMOTE_BASE,
            next_alive: now,
            counts: Counts::default(),
        }
    }

    pub fn sealer(&self) -> &Arc<Sealer> {
        &self.sealer
    }

    /// Coordinators heard from (a count only).
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Remote members held (a count only).
    pub fn remote_count(&self) -> usize {
        self.by_local_id.len()
    }

    /// At start: ask everyone for what they hold, and say we are here.
    pub fn start(&mut self, now: Instant, now_ms: u64) -> Step {
        let mut step = Step::default();
        let all = self.sealer.subject_all();
        self.publish(&mut step, &all, &ClusterMsg::Sync, now_ms);
        self.alive(&mut step, now, now_ms);
        step
    }

    /// When [`Cluster::tick`] has something to do.
    pub fn poll_timeout(&self) -> Instant {
        let expiry = self.peers.values().map(|p| p.last_heard + DEAD_AFTER).min();
        expiry.map_or(self.next_alive, |e| e.min(self.next_alive))
    }

    /// Presence, and the expiry of coordinators gone silent.
    pub fn tick(&mut self, now: Instant, now_ms: u64) -> Step {
        let mut step = Step::default();
        if now >= self.next_alive {
            self.alive(&mut step, now, now_ms);
        }
        let dead: Vec<Instance> = self
            .peers
            .iter()
            .filter(|(_, p)| p.last_heard + DEAD_AFTER <= now)
            .map(|(i, _)| *i)
            .collect();
        for instance in dead {
            self.counts.coordinators_expired += 1;
            self.tickets.retain(|_, (asker, _)| *asker != instance);
            if let Some(peer) = self.peers.remove(&instance) {
                for (key, r) in peer.members {
                    self.by_local_id.remove(&r.local_id);
                    self.unhold(&mut step, instance, key, r.local_id);
                }
            }
        }
        step
    }

    fn alive(&mut self, step: &mut Step, now: Instant, now_ms: u64) {
        let all = self.sealer.subject_all();
        let msg = ClusterMsg::Alive {
            members: self.local.len() as u32,
            digest: self.local_digest,
        };
        self.publish(step, &all, &msg, now_ms);
        self.next_alive = now + ALIVE_EVERY;
    }

    fn publish(&mut self, step: &mut Step, subject: &str, msg: &ClusterMsg, now_ms: u64) {
        let body = serde_json::to_vec(msg).expect("cluster messages serialise");
        step.publish.push(Publish {
            subject: subject.to_string(),
            payload: self.sealer.seal(subject, KIND_MSG, &body, now_ms),
        });
        self.counts.published += 1;
    }

    /// This coordinator's own members changed (registered, updated, left).
    pub fn local(&mut self, now_ms: u64, changes: Vec<LocalChange>) -> Step {
        let mut step = Step::default();
        let mut up = Vec::new();
        let mut gone = Vec::new();
        let mut kept = Vec::new();
        let mut redeems = Vec::new();
        for change in changes {
            match change {
                LocalChange::Revoked {
                    network,
                    revocation,
                } => kept.push(Change::Revoke {
                    network,
                    revocation,
                }),
                LocalChange::Moved { network, notice } => {
                    kept.push(Change::Moved { network, notice })
                }
                LocalChange::Statement { network, signed } => {
                    kept.push(Change::Statement { network, signed })
                }
                LocalChange::Redeem {
                    ticket,
                    invite,
                    node_key,
                    signing_key,
                    proof,
                } => {
                    self.counts.redeems_asked += 1;
                    redeems.push(ClusterMsg::Redeem {
                        ticket,
                        invite,
                        node_key,
                        signing_key,
                        proof,
                    });
                }
                LocalChange::Up {
                    network,
                    record,
                    conn,
                } => {
                    let Ok(v) = record.verify(&network) else {
                        continue; // the registry verified it
                    };
                    let key = (network, v.record.node_key);
                    let issued_ms = v.record.issued_ms;
                    if let Some(old) = self.local.remove(&key) {
                        xor_into(
                            &mut self.local_digest,
                            &member_digest(&key.0, &key.1, old.issued_ms),
                        );
                    }
                    xor_into(
                        &mut self.local_digest,
                        &member_digest(&key.0, &key.1, issued_ms),
                    );
                    self.local.insert(
                        key,
                        Local {
                            record: record.clone(),
                            conn,
                            issued_ms,
                        },
                    );
                    // The local connection wins: a remote holder's slot is closed.
                    if let Some(Holder::Remote(i)) = self.held.insert(key, Holder::Local) {
                        if let Some(r) = self.peers.get(&i).and_then(|p| p.members.get(&key)) {
                            step.apply.push(Apply::Down { conn: r.local_id });
                        }
                    }
                    up.push(Entry {
                        network,
                        record,
                        relay_id: conn,
                    });
                }
                LocalChange::Down { network, key } => {
                    let key = (network, key);
                    let Some(old) = self.local.remove(&key) else {
                        continue;
                    };
                    xor_into(
                        &mut self.local_digest,
                        &member_digest(&key.0, &key.1, old.issued_ms),
                    );
                    if self.held.get(&key) == Some(&Holder::Local) {
                        self.held.remove(&key);
                        // Another coordinator may hold it too (it moved): that one now.
                        self.hold_best(&mut step, key);
                    }
                    gone.push(Gone {
                        network,
                        node_key: key.1,
                    });
                }
            }
        }
        let all = self.sealer.subject_all();
        if !kept.is_empty() {
            self.publish_changes(&mut step, &all, kept, now_ms);
        }
        for msg in redeems {
            self.publish(&mut step, &all, &msg, now_ms);
        }
        if !gone.is_empty() {
            self.publish(&mut step, &all, &ClusterMsg::Down { gone }, now_ms);
        }
        for chunk in up.chunks(ENTRIES_PER_MSG) {
            let msg = ClusterMsg::Up {
                entries: chunk.to_vec(),
            };
            self.publish(&mut step, &all, &msg, now_ms);
        }
        step
    }

    /// A local member punches `to`, the remote member held under relay id `to`: its
    /// coordinator is told. Nothing if `to` is not a remote member.
    pub fn punch(&mut self, now_ms: u64, from: NodeKey, to: ConnId) -> Step {
        let mut step = Step::default();
        let Some(&(instance, (network, key))) = self.by_local_id.get(&to) else {
            return step;
        };
        let subject = self.sealer.subject_to(&instance);
        let msg = ClusterMsg::Punch {
            network,
            from,
            to: key,
        };
        self.publish(&mut step, &subject, &msg, now_ms);
        step
    }

    /// Membership changes for `subject`, in as few messages as [`CHANGES_PER_MSG`] and
    /// [`MAX_CHANGES_BYTES`] allow.
    fn publish_changes(&mut self, step: &mut Step, subject: &str, all: Vec<Change>, now_ms: u64) {
        let mut changes = Vec::new();
        let mut bytes = 0;
        for c in all {
            let len = match &c {
                Change::Revoke { revocation: s, .. }
                | Change::Moved { notice: s, .. }
                | Change::Statement { signed: s, .. } => s.body.len() + s.sig.len() + 128,
            };
            if !changes.is_empty()
                && (changes.len() >= CHANGES_PER_MSG || bytes + len > MAX_CHANGES_BYTES)
            {
                let msg = ClusterMsg::Changes {
                    changes: std::mem::take(&mut changes),
                };
                self.publish(step, subject, &msg, now_ms);
                bytes = 0;
            }
            bytes += len;
            changes.push(c);
        }
        if !changes.is_empty() {
            self.publish(step, subject, &ClusterMsg::Changes { changes }, now_ms);
        }
    }

    /// What this coordinator keeps of membership changes (the registry's), for the
    /// coordinator `to`, which asked for a snapshot ([`Apply::SendKept`]).
    pub fn kept_to(&mut self, to: Instance, kept: Vec<Change>, now_ms: u64) -> Step {
        let mut step = Step::default();
        if !kept.is_empty() && self.peers.contains_key(&to) {
            let subject = self.sealer.subject_to(&to);
            self.publish_changes(&mut step, &subject, kept, now_ms);
        }
        step
    }

    /// A local member made the invite the redemption `ticket` (from [`Apply::Redeem`])
    /// redeems, and was asked: the asking coordinator is told.
    pub fn redeem_held(&mut self, ticket: ConnId, now_ms: u64) -> Step {
        let mut step = Step::default();
        if let Some(&(asker, theirs)) = self.tickets.get(&ticket) {
            let subject = self.sealer.subject_to(&asker);
            self.publish(
                &mut step,
                &subject,
                &ClusterMsg::RedeemHeld { ticket: theirs },
                now_ms,
            );
        }
        step
    }

    /// No local member made the invite `ticket` redeems (another coordinator may hold it).
    pub fn forget_ticket(&mut self, ticket: ConnId) {
        self.tickets.remove(&ticket);
    }

    /// The inviter's answer to `ticket`, if `ticket` is a redemption another coordinator
    /// passed here: sent back to it. Anything but an admission or an invite refusal is not.
    pub fn redeem_answer(&mut self, ticket: ConnId, answer: &ServerMsg, now_ms: u64) -> Step {
        let mut step = Step::default();
        let (admitted, refused) = match answer {
            ServerMsg::InviteAdmitted { sealed } => (Some(sealed.clone()), String::new()),
            ServerMsg::Refused {
                reason: RefuseReason::InviteRefused,
                message,
            } => (None, message.clone()),
            _ => return step,
        };
        let Some((asker, theirs)) = self.tickets.remove(&ticket) else {
            return step;
        };
        self.counts.redeems_answered += 1;
        let subject = self.sealer.subject_to(&asker);
        let msg = ClusterMsg::RedeemAnswer {
            ticket: theirs,
            admitted,
            refused,
        };
        self.publish(&mut step, &subject, &msg, now_ms);
        step
    }

    /// Whether a change another coordinator sent verifies under its network.
    fn verifies(change: &Change) -> bool {
        match change {
            Change::Revoke {
                network,
                revocation,
            } => Revocation::open(revocation, network).is_ok(),
            Change::Moved { network, notice } => RotationNotice::open(notice, network).is_ok(),
            Change::Statement { network, signed } => {
                PolicyDoc::open(signed, network).is_ok()
                    || TagStatement::open(signed, network).is_ok()
            }
        }
    }

    /// One message from NATS, on `subject`: opened ([`Sealer::open`]) and accepted
    /// ([`Cluster::accept`]) in one go.
    pub fn receive(&mut self, now: Instant, now_ms: u64, subject: &str, payload: &[u8]) -> Step {
        let opened = self.sealer.open(subject, payload);
        self.accept(now, now_ms, opened)
    }

    /// A message from NATS that [`Sealer::open`] opened (or refused) without the cluster's
    /// lock: every refusal is counted here, and the sender, clock and replay window are
    /// checked before anything in it is used.
    pub fn accept(&mut self, now: Instant, now_ms: u64, opened: Result<Opened, OpenError>) -> Step {
        let mut step = Step::default();
        let Opened { header, body } = match opened {
            Ok(opened) => opened,
            Err(OpenError::Malformed) => {
                self.counts.refused_malformed += 1;
                return step;
            }
            Err(OpenError::BadSeal) => {
                self.counts.refused_seal += 1;
                return step;
            }
        };
        if header.sender == self.sealer.me {
            self.counts.own += 1;
            return step;
        }
        if now_ms.abs_diff(header.sent_ms) > MAX_SKEW_MS {
            self.counts.refused_stale += 1;
            return step;
        }
        let relay = header.kind == KIND_RELAY || header.kind == KIND_RELAY_BATCH;
        // Relay data comes from a coordinator whose members are known here (it is for them),
        // and says nothing of the sender being in the cluster: over a bridge it flows while
        // the sender is cut off from NATS, whose presence alone keeps it (and its members).
        if relay && !self.peers.contains_key(&header.sender) {
            self.counts.unknown_member += 1;
            return step;
        }
        if !self.peers.contains_key(&header.sender) && self.peers.len() >= MAX_PEERS {
            self.counts.refused_flood += 1;
            return step;
        }
        let peer = self.peers.entry(header.sender).or_insert_with(|| Peer {
            last_heard: now,
            replay_all: Replay { top: 0, bits: 0 },
            replay_to: Replay { top: 0, bits: 0 },
            replay_relay: Replay { top: 0, bits: 0 },
            members: HashMap::new(),
            by_remote_id: HashMap::new(),
            digest: [0; 16],
            last_ask: None,
            snapshot: None,
        });
        let directed = header.seq & DIRECTED != 0;
        // Relay data, and it alone, is numbered in the relay space (over NATS or a bridge).
        if relay != (header.seq & (DIRECTED | RELAY_SPACE) == DIRECTED | RELAY_SPACE) {
            self.counts.refused_malformed += 1;
            return step;
        }
        // The subject is sealed in: a message numbered for one subject opens on no other.
        let window = if relay {
            &mut peer.replay_relay
        } else if directed {
            &mut peer.replay_to
        } else {
            &mut peer.replay_all
        };
        if !window.accept(header.seq & !(DIRECTED | RELAY_SPACE)) {
            self.counts.refused_replay += 1;
            return step;
        }
        if !relay {
            peer.last_heard = now;
        }
        let sender = header.sender;
        if relay {
            let datagrams = if header.kind == KIND_RELAY {
                parse_relay(&body).map(|d| vec![d])
            } else {
                parse_relay_batch(&body)
            };
            let Some(datagrams) = datagrams else {
                self.counts.refused_malformed += 1;
                return step;
            };
            self.counts.received += 1;
            for (src, dst, datagram) in datagrams {
                match peer.by_remote_id.get(&src) {
                    Some(&local_src) if !is_remote_id(dst) => {
                        step.apply.push(Apply::Relay {
                            src: local_src,
                            dst,
                            datagram: datagram.to_vec(),
                        });
                    }
                    _ => self.counts.unknown_member += 1,
                }
            }
            return step;
        }
        let Ok(msg) = serde_json::from_slice::<ClusterMsg>(&body) else {
            self.counts.refused_malformed += 1;
            return step;
        };
        if header.kind != KIND_MSG {
            self.counts.refused_malformed += 1;
            return step;
        }
        self.counts.received += 1;
        match msg {
            ClusterMsg::Changes { changes } => {
                for c in changes {
                    if Self::verifies(&c) {
                        step.apply.push(Apply::Change(c));
                    } else {
                        self.counts.refused_record += 1;
                    }
                }
            }
            ClusterMsg::Redeem {
                ticket,
                invite,
                node_key,
                signing_key,
                proof,
            } => {
                if directed {
                    self.counts.refused_malformed += 1;
                    return step;
                }
                if self.tickets.len() >= MAX_TICKETS {
                    self.counts.refused_flood += 1;
                    return step;
                }
                let (by_local_id, tickets) = (&self.by_local_id, &self.tickets);
                let local = next_free(&mut self.next_id, |id| {
                    by_local_id.contains_key(&id) || tickets.contains_key(&id)
                });
                self.tickets.insert(local, (sender, ticket));
                step.apply.push(Apply::Redeem {
                    ticket: local,
                    invite,
                    node_key,
                    signing_key,
                    proof,
                });
            }
            ClusterMsg::RedeemHeld { ticket } => {
                if !directed {
                    self.counts.refused_malformed += 1;
                    return step;
                }
                step.apply.push(Apply::RedeemHeld { ticket });
            }
            ClusterMsg::RedeemAnswer {
                ticket,
                admitted,
                mut refused,
            } => {
                if !directed {
                    self.counts.refused_malformed += 1;
                    return step;
                }
                let answer = match admitted {
                    Some(sealed) => ServerMsg::InviteAdmitted { sealed },
                    None => {
                        if refused.len() > MAX_REFUSAL_LEN {
                            let mut cut = MAX_REFUSAL_LEN;
                            while !refused.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            refused.truncate(cut);
                        }
                        ServerMsg::Refused {
                            reason: RefuseReason::InviteRefused,
                            message: refused,
                        }
                    }
                };
                step.apply.push(Apply::RedeemAnswer { ticket, answer });
            }
            ClusterMsg::Alive { members, digest } => {
                let off = members as usize != peer.members.len() || digest != peer.digest;
                let asked_lately = peer
                    .last_ask
                    .is_some_and(|at| now.saturating_duration_since(at) < SYNC_ASK_EVERY);
                if off && !asked_lately && peer.snapshot.is_none() {
                    peer.last_ask = Some(now);
                    self.counts.syncs_asked += 1;
                    let subject = self.sealer.subject_to(&sender);
                    self.publish(&mut step, &subject, &ClusterMsg::Sync, now_ms);
                }
            }
            ClusterMsg::Up { entries } => {
                for e in entries {
                    self.remote_up(&mut step, sender, e);
                }
            }
            ClusterMsg::Down { gone } => {
                for g in gone {
                    self.remote_down(&mut step, sender, (g.network, g.node_key));
                }
            }
            ClusterMsg::Sync => {
                // What is kept of membership first (a revoked node in the snapshot is then
                // refused), then the members.
                step.apply.push(Apply::SendKept { to: sender });
                let subject = self.sealer.subject_to(&sender);
                let entries: Vec<Entry> = self
                    .local
                    .iter()
                    .map(|((network, _), l)| Entry {
                        network: *network,
                        record: l.record.clone(),
                        relay_id: l.conn,
                    })
                    .collect();
                let chunks: Vec<&[Entry]> = if entries.is_empty() {
                    vec![&[]]
                } else {
                    entries.chunks(ENTRIES_PER_MSG).collect()
                };
                let n = chunks.len();
                for (i, chunk) in chunks.into_iter().enumerate() {
                    let msg = ClusterMsg::Snapshot {
                        entries: chunk.to_vec(),
                        last: i + 1 == n,
                    };
                    self.publish(&mut step, &subject, &msg, now_ms);
                }
            }
            ClusterMsg::Snapshot { entries, last } => {
                let mut named = peer.snapshot.take().unwrap_or_default();
                for e in entries {
                    if let Some(key) = self.remote_up(&mut step, sender, e) {
                        named.insert(key);
                    }
                }
                if last {
                    let stale: Vec<Key> = self.peers[&sender]
                        .members
                        .keys()
                        .filter(|k| !named.contains(k))
                        .copied()
                        .collect();
                    for key in stale {
                        self.remote_down(&mut step, sender, key);
                    }
                } else if let Some(p) = self.peers.get_mut(&sender) {
                    p.snapshot = Some(named);
                }
            }
            ClusterMsg::Punch { network, from, to } => {
                if self.local.contains_key(&(network, to)) {
                    step.apply.push(Apply::Punch { network, from, to });
                } else {
                    self.counts.unknown_member += 1;
                }
            }
        }
        step
    }

    /// `sender` holds the member `e`: kept, and applied if it is the best holder.
    fn remote_up(&mut self, step: &mut Step, sender: Instance, e: Entry) -> Option<Key> {
        let Ok(v) = e.record.verify(&e.network) else {
            self.counts.refused_record += 1;
            return None;
        };
        let key = (e.network, v.record.node_key);
        let issued_ms = v.record.issued_ms;
        let peer = self.peers.get_mut(&sender)?;
        let local_id = match peer.members.get(&key) {
            Some(r) => {
                if r.issued_ms > issued_ms {
                    // Older than what this sender said before: kept as it was.
                    self.counts.refused_record += 1;
                    return Some(key);
                }
                xor_into(
                    &mut peer.digest,
                    &member_digest(&key.0, &key.1, r.issued_ms),
                );
                peer.by_remote_id.remove(&r.remote_id);
                r.local_id
            }
            None => {
                if peer.members.len() >= MAX_MEMBERS_PER_PEER {
                    self.counts.refused_flood += 1;
                    return None;
                }
                let (by_local_id, tickets) = (&self.by_local_id, &self.tickets);
                let id = next_free(&mut self.next_id, |id| {
                    by_local_id.contains_key(&id) || tickets.contains_key(&id)
                });
                self.by_local_id.insert(id, (sender, key));
                id
            }
        };
        let unchanged = peer
            .members
            .get(&key)
            .is_some_and(|r| r.record == e.record && r.remote_id == e.relay_id);
        xor_into(&mut peer.digest, &member_digest(&key.0, &key.1, issued_ms));
        peer.by_remote_id.insert(e.relay_id, local_id);
        peer.members.insert(
            key,
            Remote {
                record: e.record.clone(),
                remote_id: e.relay_id,
                local_id,
                issued_ms,
            },
        );
        match self.held.get(&key).copied() {
            Some(Holder::Local) => {}
            Some(Holder::Remote(i)) if i == sender => {
                if !unchanged {
                    step.apply.push(self.up(sender, key));
                }
            }
            Some(Holder::Remote(other)) => {
                let theirs = self
                    .peers
                    .get(&other)
                    .and_then(|p| p.members.get(&key))
                    .map(|r| (r.issued_ms, r.local_id));
                match theirs {
                    Some((their_issued, _)) if their_issued > issued_ms => {}
                    Some((_, their_id)) => {
                        // The newer record (or, equal, the later announcement: it moved).
                        self.held.insert(key, Holder::Remote(sender));
                        step.apply.push(self.up(sender, key));
                        step.apply.push(Apply::Down { conn: their_id });
                    }
                    None => {
                        self.held.insert(key, Holder::Remote(sender));
                        step.apply.push(self.up(sender, key));
                    }
                }
            }
            None => {
                self.held.insert(key, Holder::Remote(sender));
                step.apply.push(self.up(sender, key));
            }
        }
        Some(key)
    }

    fn up(&self, sender: Instance, key: Key) -> Apply {
        let r = &self.peers[&sender].members[&key];
        Apply::Up {
            network: key.0,
            record: r.record.clone(),
            conn: r.local_id,
            via: Via {
                subject: self.sealer.subject_to(&sender),
                remote_id: r.remote_id,
            },
        }
    }

    /// `sender` no longer holds `key`.
    fn remote_down(&mut self, step: &mut Step, sender: Instance, key: Key) {
        let Some(peer) = self.peers.get_mut(&sender) else {
            return;
        };
        let Some(r) = peer.members.remove(&key) else {
            return;
        };
        xor_into(
            &mut peer.digest,
            &member_digest(&key.0, &key.1, r.issued_ms),
        );
        peer.by_remote_id.remove(&r.remote_id);
        self.by_local_id.remove(&r.local_id);
        self.unhold(step, sender, key, r.local_id);
    }

    /// `sender`'s copy of `key` (relay id `local_id`) is gone: if it was the one applied,
    /// another holder's is applied, or the member goes.
    fn unhold(&mut self, step: &mut Step, sender: Instance, key: Key, local_id: ConnId) {
        if self.held.get(&key) == Some(&Holder::Remote(sender)) {
            self.held.remove(&key);
            self.hold_best(step, key);
        }
        // Closes its slot (and, when no other holder took over, the member).
        step.apply.push(Apply::Down { conn: local_id });
    }

    /// The newest remote copy of `key`, if any coordinator holds one, is applied.
    fn hold_best(&mut self, step: &mut Step, key: Key) {
        let best = self
            .peers
            .iter()
            .filter_map(|(i, p)| p.members.get(&key).map(|r| (r.issued_ms, *i)))
            .max_by_key(|(issued, _)| *issued);
        if let Some((_, i)) = best {
            self.held.insert(key, Holder::Remote(i));
            step.apply.push(self.up(i, key));
        }
    }
}

/// The next id for a remote member or a redemption from the cluster: in the upper half,
/// never one in use.
fn next_free(next: &mut u32, used: impl Fn(ConnId) -> bool) -> ConnId {
    loop {
        let id = *next;
        *next = if *next == u32::MAX {
            REMOTE_BASE
        } else {
            *next + 1
        };
        if !used(id) {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use a2a_proto::{NetworkKey, NodeRecord};

    const PRIVATE: [u8; 32] = [5; 32];
    const PUBLIC: [u8; 32] = [6; 32];
    const T0: u64 = 1_800_000_000_000;

    fn coordinator(n: u8, now: Instant) -> Cluster {
        Cluster::new(Arc::new(Sealer::new(&PRIVATE, &PUBLIC, [n; 16])), now)
    }

    fn record(k: &NetworkKey, n: u8, issued_ms: u64) -> SignedRecord {
        NodeRecord {
            network: k.id(),
            node_key: NodeKey([n; 32]),
            name: format!("n{n}"),
            ip: format!("100.64.0.{n}").parse().unwrap(),
            candidates: vec![],
            issued_ms,
            ssh: None,
        }
        .sign(k)
    }

    fn up(k: &NetworkKey, n: u8, issued_ms: u64, conn: ConnId) -> LocalChange {
        LocalChange::Up {
            network: k.id(),
            record: record(k, n, issued_ms),
            conn,
        }
    }

    /// Delivers what `from` published to `to` (as NATS would to a subscriber of every
    /// subject): what `to` must apply, and what it published back.
    fn deliver(to: &mut Cluster, now: Instant, now_ms: u64, step: &Step) -> Step {
        let mut out = Step::default();
        for p in &step.publish {
            let s = to.receive(now, now_ms, &p.subject, &p.payload);
            out.publish.extend(s.publish);
            out.apply.extend(s.apply);
        }
        out
    }

    fn ups(step: &Step) -> Vec<ConnId> {
        step.apply
            .iter()
            .filter_map(|a| match a {
                Apply::Up { conn, .. } => Some(*conn),
                _ => None,
            })
            .collect()
    }

    fn revocation(k: &NetworkKey, n: u8) -> a2a_proto::membership::Signed {
        let r = Revocation {
            network: k.id(),
            node_key: NodeKey([n; 32]),
            issued_ms: T0,
        };
        a2a_proto::membership::Signed::sign(&r, k, a2a_proto::keys::REVOKE_CONTEXT)
    }

    fn policy(k: &NetworkKey, version: u64) -> a2a_proto::membership::Signed {
        PolicyDoc::sign(k, version, T0, r#"{"grants": []}"#, None).unwrap()
    }

    #[test]
    fn local_membership_changes_are_published_and_forged_ones_refused() {
        let now = Instant::now();
        let k = NetworkKey::derive(&[1; 32]);
        let rogue = NetworkKey::derive(&[2; 32]);
        let mut c1 = coordinator(1, now);
        let mut c2 = coordinator(2, now);
        let tags = TagStatement {
            network: k.id(),
            node_key: NodeKey([3; 32]),
            version: 1,
            issued_ms: T0,
            tags: ["worker".to_string()].into(),
        }
        .sign(&k)
        .unwrap();
        let notice = a2a_proto::membership::Signed::sign(
            &RotationNotice {
                old_network: k.id(),
                new_network: NetworkKey::derive(&[7; 32]).id(),
                rotator: NodeKey([1; 32]),
                issued_ms: T0,
                carried: vec![],
            },
            &k,
            a2a_proto::keys::ROTATE_CONTEXT,
        );
        let changes = vec![
            LocalChange::Revoked {
                network: k.id(),
                revocation: revocation(&k, 9),
            },
            LocalChange::Moved {
                network: k.id(),
                notice: notice.clone(),
            },
            LocalChange::Statement {
                network: k.id(),
                signed: policy(&k, 1),
            },
            LocalChange::Statement {
                network: k.id(),
                signed: tags.clone(),
            },
        ];
        let s = c1.local(T0, changes);
        assert_eq!(s.publish.len(), 1, "one message for the batch");
        let got = deliver(&mut c2, now, T0, &s);
        assert_eq!(
            got.apply,
            vec![
                Apply::Change(Change::Revoke {
                    network: k.id(),
                    revocation: revocation(&k, 9)
                }),
                Apply::Change(Change::Moved {
                    network: k.id(),
                    notice
                }),
                Apply::Change(Change::Statement {
                    network: k.id(),
                    signed: policy(&k, 1)
                }),
                Apply::Change(Change::Statement {
                    network: k.id(),
                    signed: tags
                }),
            ]
        );
        assert_eq!(c2.counts.refused_record, 0);
        // The same message again: a replay, refused.
        assert!(deliver(&mut c2, now, T0, &s).apply.is_empty());
        assert_eq!(c2.counts.refused_replay, 1);
        // A cluster member passing on changes the network key did not sign (another key's
        // signature, or one for another network): each refused and counted, none applied.
        let forged = vec![
            Change::Revoke {
                network: k.id(),
                revocation: revocation(&rogue, 9),
            },
            Change::Statement {
                network: k.id(),
                signed: policy(&rogue, 2),
            },
            Change::Moved {
                network: k.id(),
                notice: revocation(&k, 9),
            },
            Change::Statement {
                network: rogue.id(),
                signed: policy(&k, 3),
            },
        ];
        let body = serde_json::to_vec(&ClusterMsg::Changes { changes: forged }).unwrap();
        let subject = c1.sealer().subject_all();
        let env = c1.sealer().seal(&subject, KIND_MSG, &body, T0);
        assert!(c2.receive(now, T0, &subject, &env).apply.is_empty());
        assert_eq!(c2.counts.refused_record, 4);
    }

    #[test]
    fn a_starting_coordinator_is_sent_the_kept_changes_before_the_members() {
        let now = Instant::now();
        let k = NetworkKey::derive(&[1; 32]);
        let mut c1 = coordinator(1, now);
        c1.local(T0, vec![up(&k, 1, 10, 7)]);
        let mut c2 = coordinator(2, now);
        let start = c2.start(now, T0);
        let answer = deliver(&mut c1, now, T0, &start);
        // c1 is asked to send what its registry keeps first.
        assert_eq!(answer.apply, vec![Apply::SendKept { to: [2; 16] }]);
        let kept: Vec<Change> = (0..(CHANGES_PER_MSG as u8 + 1))
            .map(|n| Change::Revoke {
                network: k.id(),
                revocation: revocation(&k, 100 + n),
            })
            .collect();
        let sent = c1.kept_to([2; 16], kept.clone(), T0);
        assert_eq!(sent.publish.len(), 2, "in chunks");
        assert!(sent
            .publish
            .iter()
            .all(|p| p.subject == c1.sealer().subject_to(&[2; 16])));
        let mut on2 = deliver(&mut c2, now, T0, &sent);
        on2.apply.extend(deliver(&mut c2, now, T0, &answer).apply);
        let changes: Vec<Change> = on2
            .apply
            .iter()
            .filter_map(|a| match a {
                Apply::Change(c) => Some(c.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(changes, kept);
        assert_eq!(ups(&on2).len(), 1);
        // Nothing is sent to an instance never heard from.
        assert!(c1.kept_to([9; 16], kept, T0).publish.is_empty());
    }

    #[test]
    fn a_redemption_crosses_to_the_inviters_coordinator_and_its_answer_comes_back() {
        use a2a_proto::invite::{InviteId, InviteProof};
        let now = Instant::now();
        let mut c1 = coordinator(1, now);
        let mut c2 = coordinator(2, now);
        let mut c3 = coordinator(3, now);
        let signing_key: SignerId = a2a_proto::membership::node_signing_key(&[4; 32])
            .verifying_key()
            .into();
        let redeem = LocalChange::Redeem {
            ticket: 42,
            invite: InviteId([8; 16]),
            node_key: NodeKey([5; 32]),
            signing_key,
            proof: InviteProof([6; 32]),
        };
        // The newcomer is on c2: asked on the cluster's subject.
        let asked = c2.local(T0, vec![redeem]);
        assert_eq!(asked.publish.len(), 1);
        assert_eq!(asked.publish[0].subject, c2.sealer().subject_all());
        assert_eq!(c2.counts.redeems_asked, 1);
        // c3's members made no such invite: it forgets its ticket; c1's did.
        let on3 = deliver(&mut c3, now, T0, &asked);
        let [Apply::Redeem { ticket: t3, .. }] = on3.apply.as_slice() else {
            panic!("{:?}", on3.apply)
        };
        c3.forget_ticket(*t3);
        assert!(c3.tickets.is_empty());
        let on1 = deliver(&mut c1, now, T0, &asked);
        let [Apply::Redeem {
            ticket,
            invite,
            node_key,
            ..
        }] = on1.apply.as_slice()
        else {
            panic!("{:?}", on1.apply)
        };
        assert!(is_remote_id(*ticket), "a ticket in the cluster's half");
        assert_eq!((*invite, *node_key), (InviteId([8; 16]), NodeKey([5; 32])));
        let ticket = *ticket;
        // c1 says its member was asked, then passes the answer on; c2 gets both for ticket 42.
        let held = c1.redeem_held(ticket, T0);
        let got = deliver(&mut c2, now, T0, &held);
        assert_eq!(got.apply, vec![Apply::RedeemHeld { ticket: 42 }]);
        // Anything but an invite answer is not passed on.
        let other = ServerMsg::Refused {
            reason: RefuseReason::Revoked,
            message: "x".into(),
        };
        assert!(c1.redeem_answer(ticket, &other, T0).publish.is_empty());
        let sealed = a2a_proto::sealed::Sealed::from_bytes(vec![1; 60]).unwrap();
        let admitted = ServerMsg::InviteAdmitted { sealed };
        let answer = c1.redeem_answer(ticket, &admitted, T0);
        let got = deliver(&mut c2, now, T0, &answer);
        assert_eq!(
            got.apply,
            vec![Apply::RedeemAnswer {
                ticket: 42,
                answer: admitted.clone()
            }]
        );
        assert_eq!(c1.counts.redeems_answered, 1);
        // Once: the ticket is gone, and a replay of the answer is refused.
        assert!(c1.redeem_answer(ticket, &admitted, T0).publish.is_empty());
        assert!(deliver(&mut c2, now, T0, &answer).apply.is_empty());
        assert_eq!(c2.counts.refused_replay, 1);
        // An answer or a "held" on the cluster's subject (to everyone) is refused, as is a
        // redemption sent to one coordinator: each goes only one way.
        let all = c1.sealer().subject_all();
        for msg in [
            ClusterMsg::RedeemHeld { ticket: 42 },
            ClusterMsg::RedeemAnswer {
                ticket: 42,
                admitted: None,
                refused: "no".into(),
            },
        ] {
            let body = serde_json::to_vec(&msg).unwrap();
            let env = c1.sealer().seal(&all, KIND_MSG, &body, T0);
            assert!(c2.receive(now, T0, &all, &env).apply.is_empty());
        }
        let to1 = c2.sealer().subject_to(&[1; 16]);
        let body = serde_json::to_vec(&ClusterMsg::Redeem {
            ticket: 1,
            invite: InviteId([8; 16]),
            node_key: NodeKey([5; 32]),
            signing_key,
            proof: InviteProof([6; 32]),
        })
        .unwrap();
        let env = c2.sealer().seal(&to1, KIND_MSG, &body, T0);
        assert!(c1.receive(now, T0, &to1, &env).apply.is_empty());
        assert_eq!(
            (c2.counts.refused_malformed, c1.counts.refused_malformed),
            (2, 1)
        );
    }

    #[test]
    fn a_flood_of_redemptions_is_refused_and_a_dead_askers_tickets_go() {
        use a2a_proto::invite::{InviteId, InviteProof};
        let now = Instant::now();
        let mut c1 = coordinator(1, now);
        let mut c2 = coordinator(2, now);
        let signing_key: SignerId = a2a_proto::membership::node_signing_key(&[4; 32])
            .verifying_key()
            .into();
        let flood: Vec<LocalChange> = (0..(MAX_TICKETS as u32 + 5))
            .map(|i| LocalChange::Redeem {
                ticket: i,
                invite: InviteId([8; 16]),
                node_key: NodeKey([5; 32]),
                signing_key,
                proof: InviteProof([6; 32]),
            })
            .collect();
        let s = c2.local(T0, flood);
        deliver(&mut c1, now, T0, &s);
        assert_eq!(c1.tickets.len(), MAX_TICKETS);
        assert_eq!(c1.counts.refused_flood, 5);
        // c2 goes silent: its tickets go with it.
        c1.tick(now + DEAD_AFTER, T0);
        assert!(c1.tickets.is_empty());
    }

    #[test]
    fn queued_relay_data_is_packed_per_coordinator_and_arrives_in_order() {
        let now = Instant::now();
        let k = NetworkKey::derive(&[1; 32]);
        let mut c1 = coordinator(1, now);
        let mut c2 = coordinator(2, now);
        let mut c3 = coordinator(3, now);
        // Member 1 on c1 (relay id 7 there), held by c2 and c3 under ids of their own.
        let s = c1.local(T0, vec![up(&k, 1, 10, 7)]);
        let via = |c: &mut Cluster| {
            let got = deliver(c, now, T0, &s);
            let [Apply::Up { via, conn, .. }] = got.apply.as_slice() else {
                panic!("{:?}", got.apply)
            };
            (Arc::new(via.clone()), *conn)
        };
        let (via2, _) = via(&mut c2);
        let (via3, _) = via(&mut c3);
        // c2 queues a presence message, 100 datagrams for member 1 from its members 4 and
        // 5, and one for it from c3's member 6.
        let alive = c2.tick(now + ALIVE_EVERY, T0).publish;
        let mut queued: Vec<Outgoing> = alive.into_iter().map(Outgoing::Sealed).collect();
        for i in 0..100u32 {
            queued.push(Outgoing::Relay(RelayOut {
                via: via2.clone(),
                src: 4 + i % 2,
                datagram: vec![i as u8; 1400],
            }));
        }
        let packed = c2.sealer().pack(queued, T0);
        assert_eq!(packed.datagrams, 100);
        // 100 × 1410 bytes: three envelopes of at most MAX_BATCH_BYTES, after the presence.
        assert_eq!(packed.relay_messages, 3);
        assert_eq!(packed.publish.len(), 4);
        assert!(packed.publish[1..]
            .iter()
            .all(|p| p.subject == via2.subject && p.payload.len() <= MAX_BATCH_BYTES + 64));
        // c1 knows c2's members 4 and 5 (c2 announced them), and gets them in order.
        let members = c2.local(T0, vec![up(&k, 4, 10, 4), up(&k, 5, 10, 5)]);
        deliver(&mut c1, now, T0, &members);
        let got = deliver(
            &mut c1,
            now,
            T0,
            &Step {
                publish: packed.publish,
                apply: vec![],
            },
        );
        let relayed: Vec<(u32, Vec<u8>)> = got
            .apply
            .iter()
            .filter_map(|a| match a {
                Apply::Relay { dst, datagram, .. } => Some((*dst, datagram.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(relayed.len(), 100);
        for (i, (dst, d)) in relayed.iter().enumerate() {
            assert_eq!((*dst, d.len(), d[0]), (7, 1400, i as u8));
        }
        assert_eq!(c1.counts.refused_replay + c1.counts.refused_malformed, 0);
        assert_eq!(c1.counts.unknown_member, 0);
        // Two datagrams for one coordinator: one envelope.
        let packed = c3.sealer().pack(
            [via3.clone(), via3]
                .into_iter()
                .enumerate()
                .map(|(i, via)| {
                    Outgoing::Relay(RelayOut {
                        via,
                        src: 6,
                        datagram: vec![i as u8; 10],
                    })
                }),
            T0,
        );
        assert_eq!((packed.relay_messages, packed.datagrams), (1, 2));
        // A batch cut short is refused whole and counted.
        let mut bad = Vec::new();
        a2a_proto::cluster::push_relay_batch(&mut bad, 4, 7, &[1; 20]);
        bad.truncate(bad.len() - 1);
        let env = c2.sealer().seal(&via2.subject, KIND_RELAY_BATCH, &bad, T0);
        let got = c1.receive(now, T0, &via2.subject, &env);
        assert!(got.apply.is_empty());
        assert_eq!(c1.counts.refused_malformed, 1);
    }

    #[test]
    fn a_member_registered_on_one_coordinator_appears_on_the_other_and_goes() {
        let now = Instant::now();
        let k = NetworkKey::derive(&[1; 32]);
        let mut c1 = coordinator(1, now);
        let mut c2 = coordinator(2, now);
        let s = c1.local(T0, vec![up(&k, 1, 10, 7)]);
        let got = deliver(&mut c2, now, T0, &s);
        let [Apply::Up {
            network, conn, via, ..
        }] = got.apply.as_slice()
        else {
            panic!("{:?}", got.apply)
        };
        assert_eq!(*network, k.id());
        assert!(is_remote_id(*conn));
        assert_eq!(via.remote_id, 7);
        assert_eq!(via.subject, c1.sealer().subject_to(&[1; 16]));
        let id = *conn;
        // c2's digest of c1 now matches c1's presence: no snapshot asked.
        let alive = c1.tick(now + ALIVE_EVERY, T0);
        let got = deliver(&mut c2, now, T0, &alive);
        assert!(got.publish.is_empty(), "{:?}", got.publish);
        // The member leaves.
        let s = c1.local(
            T0,
            vec![LocalChange::Down {
                network: k.id(),
                key: NodeKey([1; 32]),
            }],
        );
        let got = deliver(&mut c2, now, T0, &s);
        assert_eq!(got.apply, vec![Apply::Down { conn: id }]);
        assert_eq!(c2.remote_count(), 0);
        assert_eq!(c2.counts.refused_seal + c2.counts.refused_replay, 0);
    }

    #[test]
    fn a_dead_coordinators_members_expire_and_a_moved_member_stays() {
        let now = Instant::now();
        let k = NetworkKey::derive(&[1; 32]);
        let mut c1 = coordinator(1, now);
        let mut c2 = coordinator(2, now);
        let mut c3 = coordinator(3, now);
        // Node 1 on c1, node 2 on c1.
        let s = c1.local(T0, vec![up(&k, 1, 10, 7), up(&k, 2, 10, 8)]);
        let got = deliver(&mut c3, now, T0, &s);
        assert_eq!(ups(&got).len(), 2);
        deliver(&mut c2, now, T0, &s);
        // c1 dies; node 1 re-registers on c2 with the same record.
        let s = c2.local(T0 + 1000, vec![up(&k, 1, 10, 3)]);
        let local_win = s.apply.clone();
        assert_eq!(local_win.len(), 1, "c2's remote copy of node 1 is closed");
        let got = deliver(&mut c3, now + Duration::from_secs(1), T0 + 1000, &s);
        // On c3, node 1 is now c2's (the later announcement), c1's slot closed.
        let [Apply::Up { via, .. }, Apply::Down { .. }] = got.apply.as_slice() else {
            panic!("{:?}", got.apply)
        };
        assert_eq!(via.remote_id, 3);
        // c2 keeps saying it is alive; c1 is silent.
        let later = now + DEAD_AFTER + Duration::from_millis(1);
        let alive = c2.tick(later, T0 + 8000);
        deliver(&mut c3, later, T0 + 8000, &alive);
        let s = c3.tick(later, T0 + 8000);
        assert_eq!(c3.counts.coordinators_expired, 1);
        // Node 2 (only on c1) goes; node 1 (moved to c2) stays.
        let downs = s
            .apply
            .iter()
            .filter(|a| matches!(a, Apply::Down { .. }))
            .count();
        assert_eq!(downs, 2, "{:?}", s.apply); // node 2, and c1's stale copy of node 1
        assert!(ups(&s).is_empty(), "node 1 stays held by c2: {:?}", s.apply);
        assert_eq!(c3.remote_count(), 1);
        assert_eq!(c3.peer_count(), 1);
    }

    /// The driver opens the seal without the cluster's lock ([`Sealer::open`]) and hands
    /// the result to [`Cluster::accept`]: open keeps no state (the same envelope opens twice),
    /// so the replay window, and the counting of what open refused, are accept's.
    #[test]
    fn opened_outside_the_lock_is_counted_and_windowed_when_accepted() {
        let now = Instant::now();
        let k = NetworkKey::derive(&[1; 32]);
        let mut c1 = coordinator(1, now);
        let mut c2 = coordinator(2, now);
        let s = c1.local(T0, vec![up(&k, 1, 10, 7)]);
        let p = &s.publish[0];
        let sealer = c2.sealer().clone();
        let first = sealer.open(&p.subject, &p.payload);
        let again = sealer.open(&p.subject, &p.payload);
        assert!(first.is_ok() && again.is_ok());
        assert_eq!(c2.counts, Counts::default());
        assert_eq!(ups(&c2.accept(now, T0, first)).len(), 1);
        assert!(c2.accept(now, T0, again).apply.is_empty());
        assert_eq!(c2.counts.refused_replay, 1);
        // What open refused is counted once accepted, as receive counts it.
        let mut changed = p.payload.clone();
        *changed.last_mut().unwrap() ^= 1;
        let changed = sealer.open(&p.subject, &changed);
        assert_eq!(changed.as_ref().err(), Some(&OpenError::BadSeal));
        let on_another_subject = sealer.open("a2a.other", &p.payload);
        assert_eq!(on_another_subject.as_ref().err(), Some(&OpenError::BadSeal));
        let garbage = sealer.open(&p.subject, b"hello");
        assert_eq!(garbage.as_ref().err(), Some(&OpenError::Malformed));
        assert_eq!(c2.counts.refused_seal + c2.counts.refused_malformed, 0);
        for refused in [changed, on_another_subject, garbage] {
            assert!(c2.accept(now, T0, refused).apply.is_empty());
        }
        assert_eq!(
            (c2.counts.refused_seal, c2.counts.refused_malformed),
            (2, 1)
        );
        assert_eq!(c2.counts.received, 1);
        assert_eq!(c2.remote_count(), 1);
    }

    #[test]
    fn forged_foreign_replayed_stale_and_malformed_messages_are_refused_and_counted() {
        let now = Instant::now();
        let k = NetworkKey::derive(&[1; 32]);
        let mut c1 = coordinator(1, now);
        let mut c2 = coordinator(2, now);
        let s = c1.local(T0, vec![up(&k, 1, 10, 7)]);
        let p = &s.publish[0];
        // A stranger: another coordinator key, same subject.
        let stranger = Sealer::new(&[9; 32], &PUBLIC, [4; 16]);
        let body = serde_json::to_vec(&ClusterMsg::Up {
            entries: vec![Entry {
                network: k.id(),
                record: record(&k, 9, 10),
                relay_id: 1,
            }],
        })
        .unwrap();
        let forged = stranger.seal(&p.subject, KIND_MSG, &body, T0);
        assert!(c2.receive(now, T0, &p.subject, &forged).apply.is_empty());
        assert_eq!(c2.counts.refused_seal, 1);
        // A changed byte of a genuine message.
        let mut bad = p.payload.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(c2.receive(now, T0, &p.subject, &bad).apply.is_empty());
        assert_eq!(c2.counts.refused_seal, 2);
        // Garbage.
        assert!(c2.receive(now, T0, &p.subject, b"hello").apply.is_empty());
        assert_eq!(c2.counts.refused_malformed, 1);
        // A genuine message, then its replay.
        assert_eq!(ups(&c2.receive(now, T0, &p.subject, &p.payload)).len(), 1);
        assert!(c2.receive(now, T0, &p.subject, &p.payload).apply.is_empty());
        assert_eq!(c2.counts.refused_replay, 1);
        // A genuine message sent too long ago (or a clock far off).
        let old = c1.local(T0 - MAX_SKEW_MS - 1, vec![up(&k, 2, 10, 8)]);
        let got = deliver(&mut c2, now, T0, &old);
        assert!(got.apply.is_empty());
        assert_eq!(c2.counts.refused_stale, 1);
        // A member of the cluster announcing a record it cannot sign (forged signature): the
        // record is refused, not applied.
        let mut forged_record = record(&k, 3, 10);
        forged_record.sig = record(&NetworkKey::derive(&[2; 32]), 3, 10).sig;
        let body = serde_json::to_vec(&ClusterMsg::Up {
            entries: vec![Entry {
                network: k.id(),
                record: forged_record,
                relay_id: 9,
            }],
        })
        .unwrap();
        let sealed = c1.sealer().seal(&p.subject, KIND_MSG, &body, T0);
        assert!(c2.receive(now, T0, &p.subject, &sealed).apply.is_empty());
        assert_eq!(c2.counts.refused_record, 1);
        // Our own echo.
        let mine = c2.local(T0, vec![up(&k, 4, 10, 1)]);
        assert!(deliver(&mut c2, now, T0, &mine).apply.is_empty());
        assert_eq!(c2.counts.own, 1);
        assert_eq!(c2.remote_count(), 1);
    }

    /// Relay data (on a coordinator's own subject) far ahead of presence (on the cluster's):
    /// the two are numbered apart, so a late presence is no replay.
    #[test]
    fn the_two_subjects_are_numbered_apart() {
        let now = Instant::now();
        let k = NetworkKey::derive(&[1; 32]);
        let mut c1 = coordinator(1, now);
        let mut c2 = coordinator(2, now);
        let s2 = c2.local(T0, vec![up(&k, 2, 10, 4)]);
        let on1 = deliver(&mut c1, now, T0, &s2);
        let Apply::Up { via, .. } = &on1.apply[0] else {
            panic!()
        };
        // c2 has heard of c1 (relay data from a coordinator it never heard is dropped).
        let s1 = c1.local(T0, vec![up(&k, 1, 10, 7)]);
        deliver(&mut c2, now, T0, &s1);
        let alive = c1.tick(now + ALIVE_EVERY, T0);
        let relays: Vec<Publish> = (0..200)
            .map(|_| c1.sealer().seal_relay(via, 7, b"x", T0))
            .collect();
        for r in &relays {
            c2.receive(now, T0, &r.subject, &r.payload);
        }
        deliver(&mut c2, now, T0, &alive);
        assert_eq!(c2.counts.refused_replay, 0);
        // Each is still refused a second time.
        c2.receive(now, T0, &relays[199].subject, &relays[199].payload);
        deliver(&mut c2, now, T0, &alive);
        assert_eq!(c2.counts.refused_replay, 2);
    }

    #[test]
    fn out_of_order_messages_inside_the_window_are_accepted_once() {
        let mut r = Replay { top: 0, bits: 0 };
        assert!(r.accept(5));
        assert!(r.accept(3));
        assert!(!r.accept(3));
        assert!(r.accept(100));
        assert!(!r.accept(5), "too far behind");
        assert!(r.accept(100 - REPLAY_WINDOW + 1));
        assert!(!r.accept(100 - REPLAY_WINDOW));
        assert!(!r.accept(0));
    }

    #[test]
    fn a_flood_of_instances_is_refused() {
        let now = Instant::now();
        let mut c = coordinator(1, now);
        let subject = c.sealer().subject_all();
        let body = serde_json::to_vec(&ClusterMsg::Sync).unwrap();
        for i in 0..(MAX_PEERS + 10) {
            let mut inst = [0u8; 16];
            inst[..8].copy_from_slice(&(i as u64 + 1000).to_be_bytes());
            let s = Sealer::new(&PRIVATE, &PUBLIC, inst);
            c.receive(now, T0, &subject, &s.seal(&subject, KIND_MSG, &body, T0));
        }
        assert_eq!(c.peer_count(), MAX_PEERS);
        assert_eq!(c.counts.refused_flood, 10);
    }

    #[test]
    fn a_starting_coordinator_gets_a_snapshot_and_a_lost_change_is_repaired() {
        let now = Instant::now();
        let k = NetworkKey::derive(&[1; 32]);
        let mut c1 = coordinator(1, now);
        c1.local(T0, vec![up(&k, 1, 10, 7), up(&k, 2, 10, 8)]);
        // c2 starts: asks everyone; c1 answers on c2's subject.
        let mut c2 = coordinator(2, now);
        let start = c2.start(now, T0);
        let answer = deliver(&mut c1, now, T0, &start);
        assert!(answer
            .publish
            .iter()
            .all(|p| p.subject == c1.sealer().subject_to(&[2; 16])));
        let got = deliver(&mut c2, now, T0, &answer);
        assert_eq!(ups(&got).len(), 2);
        // c1's `down` for node 2 is lost; its next presence shows c2 the difference.
        c1.local(
            T0,
            vec![LocalChange::Down {
                network: k.id(),
                key: NodeKey([2; 32]),
            }],
        );
        let alive = c1.tick(now + ALIVE_EVERY, T0);
        let ask = deliver(&mut c2, now, T0, &alive);
        assert_eq!(ask.publish.len(), 1);
        assert_eq!(c2.counts.syncs_asked, 1);
        let snapshot = deliver(&mut c1, now, T0, &ask);
        let got = deliver(&mut c2, now, T0, &snapshot);
        assert_eq!(
            got.apply
                .iter()
                .filter(|a| matches!(a, Apply::Down { .. }))
                .count(),
            1
        );
        assert_eq!(c2.remote_count(), 1);
        // Now in step: the next presence asks nothing.
        let alive = c1.tick(now + 2 * ALIVE_EVERY, T0);
        assert!(deliver(&mut c2, now, T0, &alive).publish.is_empty());
    }

    #[test]
    fn punches_and_relay_data_reach_the_coordinator_holding_the_node() {
        let now = Instant::now();
        let k = NetworkKey::derive(&[1; 32]);
        let mut c1 = coordinator(1, now);
        let mut c2 = coordinator(2, now);
        // Node 1 on c1 (relay id 7), node 2 on c2 (relay id 4).
        let s1 = c1.local(T0, vec![up(&k, 1, 10, 7)]);
        let s2 = c2.local(T0, vec![up(&k, 2, 10, 4)]);
        let on2 = deliver(&mut c2, now, T0, &s1);
        let on1 = deliver(&mut c1, now, T0, &s2);
        let (
            Apply::Up { conn: n1_on_c2, .. },
            Apply::Up {
                conn: n2_on_c1,
                via,
                ..
            },
        ) = (&on2.apply[0], &on1.apply[0])
        else {
            panic!()
        };
        // Node 1 punches node 2 (held on c1 under n2_on_c1): c2 tells node 2.
        let p = c1.punch(T0, NodeKey([1; 32]), *n2_on_c1);
        let got = deliver(&mut c2, now, T0, &p);
        assert_eq!(
            got.apply,
            vec![Apply::Punch {
                network: k.id(),
                from: NodeKey([1; 32]),
                to: NodeKey([2; 32])
            }]
        );
        // Node 1 relays to node 2: c2 hands it to its relay id 4, from node 1's id on c2.
        let r = c1.sealer().seal_relay(via, 7, b"wireguard", T0);
        let got = c2.receive(now, T0, &r.subject, &r.payload);
        assert_eq!(
            got.apply,
            vec![Apply::Relay {
                src: *n1_on_c2,
                dst: 4,
                datagram: b"wireguard".to_vec()
            }]
        );
        // Relay data from an id c2 does not know of is dropped and counted.
        let r = c1.sealer().seal_relay(via, 99, b"x", T0);
        assert!(c2.receive(now, T0, &r.subject, &r.payload).apply.is_empty());
        assert_eq!(c2.counts.unknown_member, 1);
        // A punch for a node c2 does not hold.
        let p = c1.punch(T0, NodeKey([1; 32]), 12345);
        assert!(p.publish.is_empty());
    }

    /// c1 holding node 1 (relay id 7) and c2 node 2 (relay id 4), each told of the other's:
    /// the time, both, how c1 reaches node 2 and c1's relay id for it.
    fn two_with_a_member_each() -> (Instant, Cluster, Cluster, Via, ConnId) {
        let now = Instant::now();
        let k = NetworkKey::derive(&[1; 32]);
        let mut c1 = coordinator(1, now);
        let mut c2 = coordinator(2, now);
        let s1 = c1.local(T0, vec![up(&k, 1, 10, 7)]);
        let s2 = c2.local(T0, vec![up(&k, 2, 10, 4)]);
        deliver(&mut c2, now, T0, &s1);
        let on1 = deliver(&mut c1, now, T0, &s2);
        let Apply::Up { conn, via, .. } = &on1.apply[0] else {
            panic!("c1 was told of node 2")
        };
        (now, c1, c2, via.clone(), *conn)
    }

    #[test]
    fn relay_data_is_numbered_apart_so_a_bridge_cannot_break_the_directed_order() {
        let (now, mut c1, mut c2, via, n2) = two_with_a_member_each();
        let (via, n2) = (&via, &n2);
        // A punch goes over NATS while 100 relay envelopes overtake it over a bridge: both
        // are accepted (more than REPLAY_WINDOW apart, they would not be in one space).
        let punch = c1.punch(T0, NodeKey([1; 32]), *n2);
        let relayed: Vec<Publish> = (0..100)
            .map(|_| c1.sealer().seal_relay(via, 7, b"wg", T0))
            .collect();
        for r in &relayed {
            assert_eq!(c2.receive(now, T0, &r.subject, &r.payload).apply.len(), 1);
        }
        assert_eq!(deliver(&mut c2, now, T0, &punch).apply.len(), 1);
        assert_eq!(c2.counts.refused_replay, 0);
        // A relay envelope replayed (over either path) is refused.
        let again = &relayed[99];
        assert!(c2
            .receive(now, T0, &again.subject, &again.payload)
            .apply
            .is_empty());
        assert_eq!(c2.counts.refused_replay, 1);
        // Relay data numbered in the directed space, or a message in the relay space, is
        // malformed: each space carries its own kind only.
        let key = ClusterKey::derive(&PRIVATE);
        let subject = c2.sealer().subject_mine().to_string();
        let relay_body = a2a_proto::cluster::relay_body(7, 4, b"wg");
        for (seq, kind, body) in [
            (DIRECTED | 1_000, KIND_RELAY, relay_body.clone()),
            (DIRECTED | RELAY_SPACE | 1_000, KIND_MSG, b"{}".to_vec()),
            (RELAY_SPACE | 1_000, KIND_RELAY, relay_body),
        ] {
            let header = Header {
                sender: [1; 16],
                seq,
                sent_ms: T0,
                kind,
            };
            let e = key.seal(&subject, header, &body);
            assert!(c2.receive(now, T0, &subject, &e).apply.is_empty());
        }
        assert_eq!(c2.counts.refused_malformed, 3);
        assert_eq!(c2.counts.refused_replay, 1);
    }

    #[test]
    fn relay_data_neither_makes_nor_keeps_a_coordinator_alive() {
        let (now, c1, mut c2, via, _) = two_with_a_member_each();
        let via = &via;
        // Relay data from a coordinator c2 never heard on NATS is dropped.
        let c3 = coordinator(3, now);
        let r = c3.sealer().seal_relay(via, 7, b"wg", T0);
        assert!(c2.receive(now, T0, &r.subject, &r.payload).apply.is_empty());
        assert_eq!(c2.counts.unknown_member, 1);
        assert_eq!(
            c2.peer_count(),
            1,
            "c3 is not taken for a coordinator of the cluster"
        );
        // c1 cut off from NATS, its relay data still arriving over a bridge: c2 lets its
        // members go when its presence stops, not when its relay data does.
        let mut at = now;
        for s in 1..=8u64 {
            at = now + Duration::from_secs(s);
            let r = c1.sealer().seal_relay(via, 7, b"wg", T0 + s * 1000);
            c2.receive(at, T0 + s * 1000, &r.subject, &r.payload);
            c2.tick(at, T0 + s * 1000);
        }
        assert!(at >= now + DEAD_AFTER);
        assert_eq!(c2.remote_count(), 0, "c1's members went with its presence");
        assert_eq!(c2.counts.coordinators_expired, 1);
    }

    #[test]
    fn a_bridges_hello_names_its_instance_and_opens_nowhere_else() {
        let now = Instant::now();
        let c1 = coordinator(1, now);
        let mut c2 = coordinator(2, now);
        let hello = c1.sealer().seal_hello(T0);
        assert_eq!(c2.sealer().open_hello(&hello, T0), Ok([1; 16]));
        assert_eq!(
            c2.sealer().open_hello(&hello, T0 + HELLO_SKEW_MS + 1),
            Err(OpenError::Malformed),
            "stale"
        );
        let stranger = Cluster::new(Arc::new(Sealer::new(&[9; 32], &PUBLIC, [3; 16])), now);
        assert_eq!(
            c2.sealer()
                .open_hello(&stranger.sealer().seal_hello(T0), T0),
            Err(OpenError::BadSeal),
            "another cluster's key"
        );
        // A relay envelope is no hello, and a hello is nothing the cluster applies.
        let mine = c2.sealer().subject_mine().to_string();
        let relay = c1.sealer().seal(&mine, KIND_RELAY, &[0; 8], T0);
        assert!(c2.sealer().open_hello(&relay, T0).is_err());
        let subject = c1.sealer().bridge.clone();
        assert!(c2.receive(now, T0, &subject, &hello).apply.is_empty());
        assert_eq!(c2.counts.refused_malformed, 1);
    }
}
