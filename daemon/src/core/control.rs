//! The node's side of the control protocol, without I/O (the mirror of the coordinator's
//! `registry.rs`). The driver (`tasks::control`) owns the connection; it tells the [`Client`]
//! what happened — a connection's Noise handshake completed ([`Client::connected`]), a message
//! arrived ([`Client::handle`]), a timer fired ([`Client::handle_timeout`], when
//! [`Client::poll_timeout`] says), the underlay's addresses changed ([`Client::addresses`]), the
//! connection ended ([`Client::ended`]) — and carries out the [`Action`]s it gets back, in order.
//!
//! Every decision is here: record verification (whatever the coordinator hands over that does
//! not verify is dropped and counted), the initial-peers countdown that lets `a2actl up`
//! return, heartbeats and the silence that declares the coordinator gone, republishing when the
//! candidates change, answering redemptions of this node's invites, following a rotation, and
//! what to do after a connection ends (back-off, another overlay address, or stop).
//!
//! Error contract: nothing here fails; bad input is counted and dropped, and a reason to stop
//! comes back as [`Action::End`].

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use a2a_proto::control::{ClientMsg, PeerEntry, RefuseReason, ServerMsg};
use a2a_proto::invite::{InviteAnswer, InviteId, InviteProof};
use a2a_proto::keys::{CoordinatorKey, RelaySecret, SignerId};
use a2a_proto::membership::{issue_cert, Carry, Invited, MemberCert, Revocation, RotationNotice};
use a2a_proto::overlay::derive_ip;
use a2a_proto::policy::TagStatement;
use a2a_proto::record::{RecordError, VerifiedRecord, MAX_CANDIDATES};
use a2a_proto::{Credential, JoinToken, NetworkKey, NodeKey, NodeRecord, SignedRecord};

use crate::core::counters::Counters;
use crate::core::membership::{MemberState, Membership};
use crate::core::offline::{self, Listing, SavedFile, SavedPeer, Verdict};
use crate::core::path::Route;
use crate::core::peers::{Applied, Peer, PeerTable};

/// Reconnect back-off bounds.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(4);
/// Silence from the coordinator, in heartbeats, after which the connection is presumed dead.
pub const SILENT_HEARTBEATS: u32 = 3;
/// How long the coordinator may take to answer a registration: as long as three default
/// heartbeats, since a coordinator that is slow under load (a swarm joining at once) is better
/// waited for than met with a retry.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
/// Overlay addresses tried when the derived one is taken.
pub const MAX_ADDRESS_ATTEMPTS: u32 = 16;
/// Handshakes closed in a row before the token's coordinator key is declared wrong.
pub const MAX_CLOSED_HANDSHAKES: u32 = 3;
/// How often, while registered, unlisted peers are looked at ([`offline::verdict`]) and the
/// saved peer list is brought up to date (written only when it changed).
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The clock, both ways: `at` for timers, `unix_ms` for what is signed (records, certificates).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    pub unix_ms: u64,
}

/// How the registration stands, for `a2actl up` and `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    Connecting,
    Registered {
        ip: Ipv4Addr,
    },
    /// The coordinator refused this node for a reason retrying cannot fix.
    Refused(String),
    /// The coordinator cannot be reached right now (retrying).
    Unreachable(String),
}

/// Why one control connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Leave was requested: stop for good.
    Left,
    /// Refused permanently.
    Refused(String),
    /// Our address is taken: derive another and reconnect at once.
    AddressInUse,
    /// Connection lost or failed: retry after a back-off.
    Lost(String),
    /// The coordinator closed the connection during the Noise handshake: what a coordinator
    /// does when the token pins another key. Retried a few times, then a refusal.
    ClosedInHandshake(String),
    /// The network rotated its secret and this node came along: register again at once.
    Moved,
}

/// What the driver must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(ClientMsg),
    /// Bind this node's relay id over UDP (a probe carrying the secret) before going on: the
    /// first relayed handshake must not meet an unbound address.
    BindRelay {
        relay_id: u32,
        secret: RelaySecret,
    },
    /// A new peer: send it a WireGuard handshake initiation now.
    Initiate(NodeKey),
    /// The peer is new or published new candidates: the path finder looks at it.
    Candidates(NodeKey),
    /// The coordinator says this peer is probing us: probe it back now.
    Punch(NodeKey),
    /// The registration stands (the members already in the network are in the peer table).
    Status(Registration),
    SaveRevocations(Vec<a2a_proto::membership::Signed>),
    /// A policy or tag statement from the coordinator, for the policy book to verify (it
    /// keeps it only if newer than what it holds).
    Statement(a2a_proto::membership::Signed),
    SaveMembership(Membership),
    /// Write `peers.json` (the verified peers, sealed; core/offline.rs).
    SavePeers(SavedFile),
    End(End),
}

/// What to do after a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Connect again after this wait.
    Retry(Duration),
    /// Move the overlay interface to this address, then connect again at once.
    MoveAddress(Ipv4Addr),
    /// Stop for good; the status to show.
    Stop(Option<Registration>),
}

/// The current connection.
struct Conn {
    /// The credential of this whole connection (a rotation ends it and starts another).
    cred: Arc<Credential>,
    /// The underlay addresses it started with; when they change, the connection starts over.
    locals: Vec<SocketAddr>,
    /// The reflexive address last reported.
    reflexive: Option<SocketAddr>,
    published: Vec<SocketAddr>,
    /// The SSH keys in the record last sent.
    published_ssh: Option<a2a_proto::ssh::SshKeys>,
    registered: bool,
    /// `PeerUp`s still to come before `up` may return.
    initial_peers: u32,
    heartbeat_every: Duration,
    next_timer: Instant,
    last_heard: Instant,
    /// The peers this connection's coordinator listed (or sent a record of).
    listed: HashSet<NodeKey>,
    /// Whether the member list the registration announced has come: from then on a peer
    /// not listed is unlisted.
    list_complete: bool,
}

/// The control client's state over its whole run, across connections.
pub struct Client {
    member: Arc<MemberState>,
    peers: Arc<PeerTable>,
    counters: Arc<Counters>,
    node_private: [u8; 32],
    node_key: NodeKey,
    name: String,
    ip: Ipv4Addr,
    /// The last record's issue time: each new record is strictly newer.
    last_issued: u64,
    backoff: Duration,
    address_attempt: u32,
    closed_handshakes: u32,
    /// The router's port mapping of the WireGuard port, when it may be published.
    mapped: Option<SocketAddr>,
    /// The SSH keys this node publishes in its record (`None` before any are set).
    ssh: Option<a2a_proto::ssh::SshKeys>,
    conn: Option<Conn>,
    /// Each peer's signed record as verified, for `peers.json`.
    records: HashMap<NodeKey, SignedRecord>,
    /// The peer list last saved (or restored), sorted by key: written again only when it
    /// changes.
    saved: Vec<SavedPeer>,
}

impl Client {
    pub fn new(
        member: Arc<MemberState>,
        peers: Arc<PeerTable>,
        counters: Arc<Counters>,
        node_private: [u8; 32],
        name: String,
        ip: Ipv4Addr,
    ) -> Client {
        Client {
            node_key: peers.own_key(),
            member,
            peers,
            counters,
            node_private,
            name,
            ip,
            last_issued: 0,
            backoff: BACKOFF_MIN,
            address_attempt: 0,
            closed_handshakes: 0,
            mapped: None,
            ssh: None,
            conn: None,
            records: HashMap::new(),
            saved: Vec::new(),
        }
    }

    /// The peers of `peers.json` (already opened: its seal checked, [`offline::open`]), each
    /// verified again as if the coordinator had sent it, enter the peer table as
    /// [`Listing::Saved`], aimed first at where they were last reached directly. Returns the
    /// actions (a handshake and path finding for each) and how many were restored and
    /// refused.
    pub fn restore(&mut self, now: Now, saved: Vec<SavedPeer>) -> (Vec<Action>, usize, usize) {
        let cred = self.member.credential();
        let (mut out, mut restored, mut refused) = (Vec::new(), 0, 0);
        for s in saved {
            let Some((mut record, cert)) = self.verify_record(&cred, &s.record) else {
                refused += 1;
                continue;
            };
            let key = record.node_key;
            if key != s.node_key {
                refused += 1;
                continue;
            }
            record.candidates = offline::restored_candidates(s.endpoint, &record.candidates);
            if self.peers.apply(now.at, record, cert) != Applied::Added {
                refused += 1;
                continue;
            }
            if let Some(peer) = self.peers.by_key(&key) {
                peer.set_listing(Listing::Saved);
            }
            self.records.insert(key, s.record.clone());
            self.saved.push(s);
            restored += 1;
            out.push(Action::Initiate(key));
            out.push(Action::Candidates(key));
        }
        self.saved.sort_by_key(|s| s.node_key);
        (out, restored, refused)
    }

    /// The credential to connect with now.
    pub fn credential(&self) -> Arc<Credential> {
        self.member.credential()
    }

    /// The current overlay address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// A connection's Noise handshake completed (`handshake_hash` binds the proof to it);
    /// `reflexive` is the address the coordinator saw our UDP socket at, if it answered, and
    /// `locals` this host's addresses with our port. Returns the registration to send.
    pub fn connected(
        &mut self,
        now: Now,
        handshake_hash: &[u8],
        reflexive: Option<SocketAddr>,
        locals: Vec<SocketAddr>,
    ) -> ClientMsg {
        let cred = self.member.credential();
        self.peers.set_addresses(now.at, reflexive, &locals);
        let published = candidates_from(reflexive, self.mapped, &locals);
        let record = self.record(now, &cred, published.clone());
        let msg = ClientMsg::Register {
            batches: true,
            network: cred.network_id(),
            proof: cred.register_proof(handshake_hash),
            record,
        };
        self.conn = Some(Conn {
            cred,
            locals,
            reflexive,
            published,
            published_ssh: self.ssh.clone(),
            registered: false,
            initial_peers: 0,
            heartbeat_every: REGISTER_TIMEOUT,
            next_timer: now.at + REGISTER_TIMEOUT,
            last_heard: now.at,
            listed: HashSet::new(),
            list_complete: false,
        });
        msg
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due; `None` without a connection.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conn.as_ref().map(|c| c.next_timer)
    }

    /// The timer [`poll_timeout`](Self::poll_timeout) named fired.
    pub fn handle_timeout(&mut self, now: Now) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(c) = self.conn.as_mut() else {
            return out;
        };
        if now.at < c.next_timer {
            return out;
        }
        if !c.registered {
            out.push(Action::End(End::Lost(
                "the coordinator did not answer the registration".into(),
            )));
            return out;
        }
        c.next_timer = now.at + c.heartbeat_every;
        if c.initial_peers > 0 {
            // Some promised records never came (dropped as forged, say): `up` waits no longer.
            c.initial_peers = 0;
            out.push(Action::Status(Registration::Registered { ip: self.ip }));
            self.list_complete(now);
        }
        let Some(c) = self.conn.as_mut() else {
            return out;
        };
        if now.at.saturating_duration_since(c.last_heard) > c.heartbeat_every * SILENT_HEARTBEATS {
            out.push(Action::End(End::Lost(
                "coordinator stopped answering".into(),
            )));
            return out;
        }
        out.push(Action::Send(ClientMsg::Heartbeat));
        out
    }

    /// The reflexive or local addresses may have changed (the relay bind re-learns them):
    /// republishes the record when the candidates did; starts over when the local addresses
    /// did (the connection is bound to one that may be gone).
    pub fn addresses(
        &mut self,
        now: Now,
        reflexive: Option<SocketAddr>,
        locals: &[SocketAddr],
    ) -> Vec<Action> {
        let Some(c) = self.conn.as_ref() else {
            return vec![];
        };
        if locals != c.locals.as_slice() {
            return vec![Action::End(End::Lost("underlay addresses changed".into()))];
        }
        self.peers.set_addresses(now.at, reflexive, locals);
        if let Some(c) = self.conn.as_mut() {
            c.reflexive = reflexive;
        }
        self.republish(now).into_iter().collect()
    }

    /// The router's port mapping to publish (after the caller checked it is at the reflexive
    /// address), or `None`; republishes when the candidates change.
    pub fn mapped(&mut self, now: Now, mapped: Option<SocketAddr>) -> Vec<Action> {
        self.mapped = mapped;
        self.republish(now).into_iter().collect()
    }

    /// The SSH keys to publish (user key, and the host key while sshd is enabled for
    /// members); republishes the record when they changed.
    pub fn set_ssh(&mut self, now: Now, keys: Option<a2a_proto::ssh::SshKeys>) -> Vec<Action> {
        self.ssh = keys;
        self.republish(now).into_iter().collect()
    }

    /// A new record when the candidates or the SSH keys differ from the published ones (once
    /// registered).
    fn republish(&mut self, now: Now) -> Option<Action> {
        let c = self.conn.as_ref()?;
        let candidates = candidates_from(c.reflexive, self.mapped, &c.locals);
        if (candidates == c.published && self.ssh == c.published_ssh) || !c.registered {
            return None;
        }
        let cred = c.cred.clone();
        let record = self.record(now, &cred, candidates.clone());
        if let Some(c) = self.conn.as_mut() {
            c.published = candidates;
            c.published_ssh = self.ssh.clone();
        }
        Some(Action::Send(ClientMsg::Update { record }))
    }

    /// One message from the coordinator.
    pub fn handle(&mut self, now: Now, msg: ServerMsg) -> Vec<Action> {
        let Some(c) = self.conn.as_mut() else {
            return vec![];
        };
        c.last_heard = now.at;
        if !c.registered {
            return self.first_reply(now, msg);
        }
        let cred = c.cred.clone();
        let mut out = Vec::new();
        // Records count down the initial member list, one per `PeerUp`, all of a `Peers`'s.
        let records = match &msg {
            ServerMsg::PeerUp { .. } => 1,
            ServerMsg::Peers { up, .. } => u32::try_from(up.len()).unwrap_or(u32::MAX),
            _ => 0,
        };
        self.message(now, &cred, msg, &mut out);
        if let Some(c) = self.conn.as_mut() {
            if records > 0 && c.initial_peers > 0 {
                c.initial_peers = c.initial_peers.saturating_sub(records);
                if c.initial_peers == 0 {
                    out.push(Action::Status(Registration::Registered { ip: self.ip }));
                    self.list_complete(now);
                }
            }
        }
        out
    }

    /// The member list the registration announced has come: every peer it did not name is
    /// unlisted from now on (kept while alive on a direct path, [`offline::verdict`]).
    fn list_complete(&mut self, now: Now) {
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        c.list_complete = true;
        for peer in self.peers.all() {
            if c.listed.contains(&peer.key) {
                continue;
            }
            match peer.listing() {
                Listing::Unlisted { .. } => {}
                was => {
                    tracing::info!(
                        "peer {} ({}){} is not listed by the coordinator: kept while its direct \
                         path is alive",
                        peer.info().name,
                        peer.ip(),
                        if was == Listing::Saved {
                            ", restored from peers.json,"
                        } else {
                            ""
                        }
                    );
                    peer.set_listing(Listing::Unlisted { since: now.at });
                }
            }
        }
    }

    /// To be called every [`SWEEP_EVERY`]: while registered, drops the unlisted peers quiet
    /// for [`offline::UNLISTED_QUIET`] and saves the peer list when it changed.
    pub fn sweep(&mut self, now: Now) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.conn.as_ref().is_some_and(|c| c.registered) {
            return out;
        }
        let complete = self.conn.as_ref().is_some_and(|c| c.list_complete);
        let epoch = self.peers.epoch();
        if complete {
            for peer in self.peers.all() {
                let left = peer.has_left();
                if offline::verdict(now.at, peer.listing(), peer.direct_heard(epoch), left)
                    == Verdict::Drop
                {
                    self.drop_unlisted(&peer, left);
                }
            }
        }
        let list = self.peer_list();
        if list != self.saved {
            let network = self.member.credential().network_id();
            out.push(Action::SavePeers(offline::seal(
                &self.node_private,
                network,
                list.clone(),
            )));
            self.saved = list;
        }
        out
    }

    /// The peers to save: each peer in the table whose verified record is held, with its
    /// direct address (or the one saved before, when it is not direct now), sorted by key.
    fn peer_list(&mut self) -> Vec<SavedPeer> {
        let table: HashSet<NodeKey> = self.peers.all().iter().map(|p| p.key).collect();
        self.records.retain(|k, _| table.contains(k));
        let before: HashMap<NodeKey, Option<SocketAddr>> = self
            .saved
            .iter()
            .map(|s| (s.node_key, s.endpoint))
            .collect();
        let mut list: Vec<SavedPeer> = self
            .records
            .iter()
            .map(|(k, record)| {
                let direct = self.peers.by_key(k).and_then(|p| match p.route().route {
                    Route::Direct(a) => Some(a),
                    Route::Relay => None,
                });
                SavedPeer {
                    node_key: *k,
                    record: record.clone(),
                    endpoint: direct.or(before.get(k).copied().flatten()),
                }
            })
            .collect();
        list.sort_by_key(|s| s.node_key);
        list
    }

    fn first_reply(&mut self, now: Now, msg: ServerMsg) -> Vec<Action> {
        let (heartbeat_s, relay_id, relay_secret, peers) = match msg {
            ServerMsg::Registered {
                heartbeat_s,
                relay_id,
                relay_secret,
                peers,
            } => (heartbeat_s.clamp(1, 300), relay_id, relay_secret, peers),
            ServerMsg::Refused { reason, message } => {
                return vec![Action::End(refused(reason, message))]
            }
            _ => {
                return vec![Action::End(End::Lost(
                    "unexpected first reply from coordinator".into(),
                ))]
            }
        };
        let secret = relay_secret;
        let Some(c) = self.conn.as_mut() else {
            return vec![];
        };
        c.registered = true;
        c.initial_peers = peers;
        c.heartbeat_every = Duration::from_secs(heartbeat_s.into());
        c.next_timer = now.at + c.heartbeat_every;
        self.backoff = BACKOFF_MIN;
        self.address_attempt = 0;
        let mut out = vec![Action::BindRelay { relay_id, secret }];
        if peers == 0 {
            out.push(Action::Status(Registration::Registered { ip: self.ip }));
            self.list_complete(now);
        }
        // What this member knows about membership, for the coordinator to hold again (it may
        // have restarted): the revocations it has seen and the invites it honours.
        out.extend(
            self.member
                .revocations()
                .into_iter()
                .map(|revocation| Action::Send(ClientMsg::Revoke { revocation })),
        );
        out.extend(
            self.member
                .invites()
                .ids()
                .into_iter()
                .map(|id| Action::Send(ClientMsg::InviteOpen { id })),
        );
        // A mapping learnt while registering is published now.
        out.extend(self.republish(now));
        out
    }

    fn message(&mut self, now: Now, cred: &Credential, msg: ServerMsg, out: &mut Vec<Action>) {
        let network = cred.network_id();
        match msg {
            ServerMsg::PeerUp { record, relay_id } => {
                self.peer_up(now, cred, record, relay_id, out)
            }
            ServerMsg::Punch { from } => out.push(Action::Punch(from)),
            ServerMsg::PeerDown { node_key } => self.peer_down(now, &node_key),
            ServerMsg::Peers { down, up } => {
                // Departures first: a member that left and came back in one batch is in both.
                for node_key in &down {
                    self.peer_down(now, node_key);
                }
                for PeerEntry { record, relay_id } in up {
                    self.peer_up(now, cred, record, relay_id, out);
                }
            }
            ServerMsg::RedeemRequest {
                ticket,
                invite,
                node_key,
                signing_key,
                proof,
            } => {
                out.extend(self.answer_redemption(
                    now,
                    cred,
                    ticket,
                    invite,
                    node_key,
                    signing_key,
                    &proof,
                ));
                if self.member.invites().ids().iter().all(|id| *id != invite) {
                    out.push(Action::Send(ClientMsg::InviteClose { id: invite }));
                }
            }
            ServerMsg::Revoked { revocation } => {
                let Ok(r) = Revocation::open(&revocation, &network) else {
                    Counters::bump(&self.counters.membership_bad_signature);
                    return;
                };
                if r.node_key == self.node_key {
                    out.push(Action::End(End::Refused(
                        "this node was removed from the network (a2actl kick); ask a member for a \
                         new invite"
                            .into(),
                    )));
                    return;
                }
                if let Some(list) = self.member.revoke(&r, revocation) {
                    if let Some(peer) = self.peers.by_key(&r.node_key) {
                        tracing::info!("peer {} ({}) was removed", peer.info().name, peer.ip());
                    }
                    out.push(Action::SaveRevocations(list));
                }
                self.peers.remove(&r.node_key);
                self.records.remove(&r.node_key);
            }
            ServerMsg::Moved { notice } => self.follow_rotation(cred, &notice, out),
            ServerMsg::Statement { signed } => out.push(Action::Statement(signed)),
            ServerMsg::Refused { reason, message } => {
                out.push(Action::End(refused(reason, message)))
            }
            ServerMsg::Registered { .. }
            | ServerMsg::HeartbeatAck
            | ServerMsg::InviteAdmitted { .. } => {}
        }
    }

    /// A member left or expired: it is no longer listed, but it is not revoked, so it stays
    /// while it is alive on a direct path ([`offline::verdict`]).
    fn peer_down(&mut self, now: Now, node_key: &NodeKey) {
        if let Some(c) = self.conn.as_mut() {
            c.listed.remove(node_key);
        }
        let Some(peer) = self.peers.by_key(node_key) else {
            return;
        };
        if peer.has_left() {
            // It said so itself, through its tunnel: gone now, not after the quiet time.
            self.drop_unlisted(&peer, true);
            return;
        }
        if !matches!(peer.listing(), Listing::Unlisted { .. }) {
            tracing::info!(
                "peer {} ({}) left the coordinator's list: kept while its direct path is alive",
                peer.info().name,
                peer.ip()
            );
            peer.set_listing(Listing::Unlisted { since: now.at });
        }
    }

    /// Drops a peer the coordinator no longer lists: `left`, it said it leaves; else it was
    /// quiet for [`offline::UNLISTED_QUIET`].
    fn drop_unlisted(&self, peer: &Peer, left: bool) {
        if left {
            tracing::info!("peer {} ({}) left the network", peer.info().name, peer.ip());
            Counters::bump(&self.counters.peers_left);
        } else {
            tracing::info!(
                "peer {} ({}) dropped: the coordinator no longer lists it and nothing came from \
                 it directly for {} s",
                peer.info().name,
                peer.ip(),
                offline::UNLISTED_QUIET.as_secs()
            );
            Counters::bump(&self.counters.peers_unlisted_dropped);
        }
        self.peers.remove(&peer.key);
    }

    /// A record from the coordinator or `peers.json`, verified: for this network (its key, or
    /// a member certificate of it), in its prefix, not revoked. What does not verify is
    /// counted by kind and `None`.
    fn verify_record(
        &self,
        cred: &Credential,
        record: &SignedRecord,
    ) -> Option<(NodeRecord, Option<MemberCert>)> {
        let c = &self.counters;
        let verified = match record.verify(&cred.network_id()) {
            Ok(v) => v,
            Err(e) => {
                Counters::bump(match e {
                    RecordError::Unsigned => &c.records_unsigned,
                    RecordError::BadSignature => &c.records_bad_signature,
                    RecordError::Foreign => &c.records_foreign,
                    _ => &c.records_malformed,
                });
                tracing::debug!("dropped a peer record: {e}");
                return None;
            }
        };
        let VerifiedRecord { mut record, cert } = verified;
        if !cred.prefix().contains(&record.ip) {
            Counters::bump(&c.records_malformed);
            return None;
        }
        if self.member.is_revoked(&record.node_key) {
            Counters::bump(&c.records_revoked);
            return None;
        }
        let unreachable = crate::core::family::unreachable_count(&record.candidates);
        if unreachable > 0 {
            c.candidates_ignored
                .fetch_add(unreachable as u64, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(Err(e)) = record.ssh.as_ref().map(|k| k.validate()) {
            // The member stays; its SSH keys do not: nobody logs in as it, nor trusts its host.
            Counters::bump(&c.ssh_keys_invalid);
            tracing::debug!("ignored the SSH keys of {}: {e}", record.name);
            record.ssh = None;
        }
        Some((record, cert))
    }

    /// A member's record: applied only when it verifies (the coordinator cannot forge members),
    /// else dropped and counted by kind.
    fn peer_up(
        &mut self,
        now: Now,
        cred: &Credential,
        signed: SignedRecord,
        relay_id: u32,
        out: &mut Vec<Action>,
    ) {
        let Some((record, cert)) = self.verify_record(cred, &signed) else {
            return;
        };
        let c = &self.counters;
        let key = record.node_key;
        let applied = self.peers.apply(now.at, record, cert);
        let peer = self.peers.by_key(&key);
        if let Some(p) = &peer {
            p.set_relay_id(relay_id);
            // Listed again (a record the same as the one restored from peers.json is stale,
            // and lists it all the same).
            let was = p.listing();
            if matches!(applied, Applied::Added | Applied::Updated | Applied::Stale) {
                if was != Listing::Listed {
                    tracing::info!(
                        "peer {} ({}) is listed by the coordinator again",
                        p.info().name,
                        p.ip()
                    );
                }
                p.set_listing(Listing::Listed);
                if let Some(conn) = self.conn.as_mut() {
                    conn.listed.insert(key);
                }
                if applied != Applied::Stale {
                    self.records.insert(key, signed);
                } else {
                    self.records.entry(key).or_insert(signed);
                }
            }
            if applied == Applied::Stale && was != Listing::Listed {
                // Not a replay: the record this node already held from peers.json or before.
                return;
            }
            if applied == Applied::Updated && matches!(was, Listing::Unlisted { .. }) {
                // Gone and back with a new record (a restart): a fresh handshake, as for a
                // new peer.
                out.push(Action::Initiate(key));
            }
        }
        match applied {
            Applied::Added | Applied::Updated => {
                if let Some(peer) = peer {
                    if applied == Applied::Added {
                        tracing::info!("peer {} ({}) joined", peer.info().name, peer.ip());
                        out.push(Action::Initiate(key));
                    }
                    out.push(Action::Candidates(key));
                }
            }
            Applied::IsSelf => {}
            Applied::Stale => Counters::bump(&c.records_stale),
            Applied::AddressConflict => Counters::bump(&c.records_address_conflict),
            Applied::LowOrderKey => Counters::bump(&c.records_malformed),
        }
    }

    /// Decides a redemption of one of our invites: a certificate sealed to the redeemer, or a
    /// denial.
    #[allow(clippy::too_many_arguments)]
    fn answer_redemption(
        &self,
        now: Now,
        cred: &Credential,
        ticket: u32,
        invite: InviteId,
        node_key: NodeKey,
        signing_key: SignerId,
        proof: &InviteProof,
    ) -> Vec<Action> {
        let deny = |message: &str| {
            vec![Action::Send(ClientMsg::InviteDeny {
                ticket,
                message: message.into(),
            })]
        };
        let Some(network_key) = cred.network_key() else {
            return deny("the inviter no longer holds the network secret");
        };
        if self.member.is_revoked(&node_key) {
            return deny("this node key was removed from the network");
        }
        let tags = self.member.invites().tags(&invite);
        let decided =
            self.member
                .invites()
                .redeem(&invite, &node_key, &signing_key, proof, now.unix_ms);
        match decided {
            Ok((code, _used_up)) => {
                Counters::bump(&self.counters.invites_redeemed);
                let cert = issue_cert(network_key, node_key, signing_key, invite, now.unix_ms);
                let answer = InviteAnswer::Admitted {
                    network: network_key.id(),
                    prefix: cred.prefix(),
                    cert,
                };
                let mut out = Vec::new();
                if !tags.is_empty() {
                    // The tags reach the coordinator (and this node's book) before the
                    // admission does: the new member is tagged from its first packet.
                    let statement = TagStatement {
                        network: network_key.id(),
                        node_key,
                        version: 1,
                        issued_ms: now.unix_ms,
                        tags,
                    };
                    if let Ok(signed) = statement.sign(network_key) {
                        out.push(Action::Send(ClientMsg::Statement {
                            signed: signed.clone(),
                        }));
                        out.push(Action::Statement(signed));
                    }
                }
                out.push(Action::Send(ClientMsg::InviteAdmit {
                    ticket,
                    sealed: code.seal_answer(&node_key, &answer),
                }));
                out
            }
            Err(denial) => {
                Counters::bump(&self.counters.invites_denied);
                deny(denial.message())
            }
        }
    }

    /// A rotation notice: move to the new network if it carries this node, otherwise stop (the
    /// node was left behind, i.e. removed).
    fn follow_rotation(
        &mut self,
        cred: &Credential,
        notice: &a2a_proto::membership::Signed,
        out: &mut Vec<Action>,
    ) {
        let Ok(n) = RotationNotice::open(notice, &cred.network_id()) else {
            Counters::bump(&self.counters.membership_bad_signature);
            return;
        };
        let own = x25519_dalek::StaticSecret::from(self.node_private);
        let moved = match n.carry_for(&own) {
            None => {
                out.push(Action::End(End::Refused(
                    "the network rotated its secret without this node: it was removed; ask a \
                     member for a new invite or token"
                        .into(),
                )));
                return;
            }
            Some(Carry::Secret { secret }) => Some(secret.0)
                .filter(|s| NetworkKey::derive(s).id() == n.new_network)
                .map(|network_secret| {
                    let token = JoinToken {
                        coordinator_key: cred.coordinator_key(),
                        network_secret,
                        prefix: cred.prefix(),
                        endpoints: cred.endpoints().to_vec(),
                    };
                    let text = token.encode();
                    (Credential::from_token(token), text)
                }),
            Some(Carry::Cert { cert }) => MemberCert::open(&cert, &n.new_network)
                .ok()
                .and_then(|_| {
                    let invited = Invited {
                        coordinator_key: CoordinatorKey(cred.coordinator_key()),
                        endpoints: cred.endpoints().to_vec(),
                        prefix: cred.prefix(),
                        network: n.new_network,
                        cert,
                    };
                    Credential::from_invited(invited, &self.node_private).ok()
                })
                .map(|c| (c, self.member.join_text())),
        };
        let Some((new_cred, text)) = moved else {
            Counters::bump(&self.counters.membership_bad_signature);
            return;
        };
        // Peers the rotation did not carry stay behind: drop them now.
        let carried: HashSet<NodeKey> = n
            .carried
            .iter()
            .map(|c| c.node_key)
            .chain([n.rotator])
            .collect();
        for p in self.peers.all() {
            if !carried.contains(&p.key) {
                self.peers.remove(&p.key);
            }
        }
        // The records held are the old network's: the new one's come with the registration.
        self.records.clear();
        self.member.replace_credential(Arc::new(new_cred), text);
        out.push(Action::SaveMembership(
            self.member.membership(self.name.clone(), self.ip),
        ));
        out.push(Action::SaveRevocations(Vec::new()));
        out.push(Action::End(End::Moved));
    }

    /// The connection ended: what to do next.
    pub fn ended(&mut self, end: End) -> Next {
        self.conn = None;
        let end = match end {
            End::ClosedInHandshake(why) => {
                self.closed_handshakes += 1;
                if self.closed_handshakes >= MAX_CLOSED_HANDSHAKES {
                    End::Refused(format!(
                        "{why}: the join token's coordinator key does not match this \
                         coordinator (is the token from another coordinator, or was its state \
                         directory replaced?); get a new token"
                    ))
                } else {
                    End::Lost(why)
                }
            }
            other => {
                self.closed_handshakes = 0;
                other
            }
        };
        match end {
            End::Left => Next::Stop(None),
            End::Moved => {
                tracing::info!("the network rotated its secret; registering in the new one");
                self.backoff = BACKOFF_MIN;
                Next::Retry(Duration::ZERO)
            }
            End::Refused(msg) => {
                tracing::error!("coordinator refused this node: {msg}");
                Next::Stop(Some(Registration::Refused(msg)))
            }
            End::AddressInUse => {
                self.address_attempt += 1;
                if self.address_attempt >= MAX_ADDRESS_ATTEMPTS {
                    return Next::Stop(Some(Registration::Refused(
                        "no free overlay address found in the network prefix".into(),
                    )));
                }
                let prefix = self.member.credential().prefix();
                self.ip = derive_ip(prefix, &self.node_key, self.address_attempt);
                tracing::info!(
                    "overlay address taken by another node; moving to {}",
                    self.ip
                );
                Next::MoveAddress(self.ip)
            }
            End::Lost(why) => {
                let wait = self.backoff;
                tracing::info!("control connection: {why}; retrying in {wait:?}");
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                Next::Retry(wait)
            }
            End::ClosedInHandshake(_) => unreachable!("mapped above"),
        }
    }

    fn record(&mut self, now: Now, cred: &Credential, candidates: Vec<SocketAddr>) -> SignedRecord {
        let issued_ms = now.unix_ms.max(self.last_issued + 1);
        self.last_issued = issued_ms;
        cred.sign_record(&NodeRecord {
            network: cred.network_id(),
            node_key: self.node_key,
            name: self.name.clone(),
            ip: self.ip,
            candidates,
            issued_ms,
            ssh: self.ssh.clone(),
        })
    }
}

/// The candidates a node publishes: its reflexive address first, then its router's port
/// mapping, then its local ones.
pub fn candidates_from(
    reflexive: Option<SocketAddr>,
    mapped: Option<SocketAddr>,
    locals: &[SocketAddr],
) -> Vec<SocketAddr> {
    let mut c: Vec<SocketAddr> = reflexive.into_iter().collect();
    for a in mapped.iter().chain(locals) {
        if !c.contains(a) {
            c.push(*a);
        }
    }
    c.truncate(MAX_CANDIDATES);
    c
}

fn refused(reason: RefuseReason, message: String) -> End {
    match reason {
        RefuseReason::AddressInUse => End::AddressInUse,
        RefuseReason::BadProof
        | RefuseReason::BadRecord
        | RefuseReason::Revoked
        | RefuseReason::InviteRefused => End::Refused(message),
        RefuseReason::Protocol => End::Lost(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use a2a_proto::invite::InviteCode;
    use a2a_proto::keys::{REVOKE_CONTEXT, ROTATE_CONTEXT};
    use a2a_proto::membership::Signed;
    use boringtun::x25519::{PublicKey, StaticSecret};

    const SECRET: [u8; 32] = [7; 32];

    fn token(secret: [u8; 32]) -> JoinToken {
        JoinToken {
            coordinator_key: [9; 32],
            network_secret: secret,
            prefix: "100.64.0.0/10".parse().unwrap(),
            endpoints: vec!["192.0.2.1:7600".into()],
        }
    }

    fn key_of(private: [u8; 32]) -> NodeKey {
        NodeKey(PublicKey::from(&StaticSecret::from(private)).to_bytes())
    }

    struct World {
        client: Client,
        peers: Arc<PeerTable>,
        counters: Arc<Counters>,
        member: Arc<MemberState>,
        t0: Instant,
    }

    fn world() -> World {
        let t0 = Instant::now();
        let cred = Credential::from_token(token(SECRET));
        let member = Arc::new(MemberState::new(cred, token(SECRET).encode(), vec![]));
        let private = [1; 32];
        let peers = Arc::new(PeerTable::new(StaticSecret::from(private), t0));
        let counters = Arc::new(Counters::default());
        let client = Client::new(
            member.clone(),
            peers.clone(),
            counters.clone(),
            private,
            "self".into(),
            "100.64.0.1".parse().unwrap(),
        );
        World {
            client,
            peers,
            counters,
            member,
            t0,
        }
    }

    fn at(w: &World, ms: u64) -> Now {
        Now {
            at: w.t0 + Duration::from_millis(ms),
            unix_ms: 1_000_000 + ms,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn registered(peers: u32) -> ServerMsg {
        ServerMsg::Registered {
            heartbeat_s: 10,
            relay_id: 5,
            relay_secret: RelaySecret([3u8; 16]),
            peers,
        }
    }

    /// A member's record signed with the network key (`secret`), as a real member signs it.
    fn peer_record(n: u8, secret: [u8; 32], issued_ms: u64) -> SignedRecord {
        let cred = Credential::from_token(token(secret));
        cred.sign_record(&NodeRecord {
            network: cred.network_id(),
            node_key: key_of([n; 32]),
            name: format!("peer{n}"),
            ip: format!("100.64.0.{n}").parse().unwrap(),
            candidates: vec![addr("192.0.2.50:51820")],
            issued_ms,
            ssh: None,
        })
    }

    fn peer_up(n: u8) -> ServerMsg {
        ServerMsg::PeerUp {
            record: peer_record(n, SECRET, 10),
            relay_id: u32::from(n),
        }
    }

    /// Connects and registers with `peers` members to come.
    fn register(w: &mut World, peers: u32) -> Vec<Action> {
        let msg = w
            .client
            .connected(at(w, 0), b"hash", Some(addr("198.51.100.1:4000")), vec![]);
        assert!(matches!(msg, ClientMsg::Register { .. }), "{msg:?}");
        w.client.handle(at(w, 5), registered(peers))
    }

    fn status_registered(actions: &[Action]) -> bool {
        actions
            .iter()
            .any(|a| matches!(a, Action::Status(Registration::Registered { .. })))
    }

    #[test]
    fn bad_ssh_keys_are_dropped_and_counted_and_new_keys_are_republished() {
        use a2a_proto::ssh::{public_of, SshKeys};
        let mut w = world();
        register(&mut w, 0);
        let cred = Credential::from_token(token(SECRET));
        let good = public_of(&[5; 32]).to_openssh();
        let record = cred.sign_record(&NodeRecord {
            network: cred.network_id(),
            node_key: key_of([7; 32]),
            name: "peer7".into(),
            ip: "100.64.0.7".parse().unwrap(),
            candidates: vec![],
            issued_ms: 10,
            ssh: Some(SshKeys {
                user: Some(good.clone()),
                host: Some(format!("ssh-ed25519 {}", "A".repeat(3000))),
            }),
        });
        w.client.handle(
            at(&w, 6),
            ServerMsg::PeerUp {
                record,
                relay_id: 7,
            },
        );
        // The member is in, without its keys: nobody logs in as it, no host key is trusted.
        let peer = w.peers.by_key(&key_of([7; 32])).expect("the peer");
        assert_eq!(peer.info().ssh, SshKeys::default());
        let counted = w
            .counters
            .ssh_keys_invalid
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(counted, 1);

        // This node's own keys: a new record when they change, none when they do not.
        let keys = SshKeys {
            user: Some(good),
            host: None,
        };
        let actions = w.client.set_ssh(at(&w, 7), Some(keys.clone()));
        let [Action::Send(ClientMsg::Update { record })] = &actions[..] else {
            panic!("expected one Update, got {actions:?}");
        };
        let sent: NodeRecord = serde_json::from_str(&record.body).unwrap();
        assert_eq!(sent.ssh, Some(keys.clone()));
        assert!(w.client.set_ssh(at(&w, 8), Some(keys)).is_empty());
    }

    #[test]
    fn unreachable_candidates_are_counted_and_never_probed() {
        let mut w = world();
        w.client.connected(
            at(&w, 0),
            b"hash",
            Some(addr("198.51.100.1:4000")),
            vec![addr("10.0.0.2:51820"), addr("[2001:db8:2::2]:51820")],
        );
        w.client.handle(at(&w, 5), registered(1));
        let cred = Credential::from_token(token(SECRET));
        let record = cred.sign_record(&NodeRecord {
            network: cred.network_id(),
            node_key: key_of([7; 32]),
            name: "peer7".into(),
            ip: "100.64.0.7".parse().unwrap(),
            candidates: vec![
                addr("[fe80::1]:51820"),
                addr("[ff02::1]:51820"),
                addr("192.0.2.50:51820"),
                addr("[2001:db8:1::5]:51820"),
                addr("[::]:51820"),
                addr("[fd00:9::5]:51820"),
            ],
            issued_ms: 10,
            ssh: None,
        });
        w.client.handle(
            at(&w, 6),
            ServerMsg::PeerUp {
                record,
                relay_id: 7,
            },
        );
        let counted = w
            .counters
            .candidates_ignored
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(counted, 3, "link-local, multicast, unspecified");
        let peer = w.peers.by_key(&key_of([7; 32])).expect("the peer");
        let mut probes = Vec::new();
        peer.with_path(|p| p.tick(w.t0 + Duration::from_millis(10), None, None, &mut probes));
        let probed: Vec<SocketAddr> = probes.iter().filter_map(|p| p.addr).collect();
        assert_eq!(
            probed,
            vec![addr("192.0.2.50:51820"), addr("[2001:db8:1::5]:51820")],
            "no ULA of another site either"
        );
    }

    #[test]
    fn the_registration_proves_membership_and_publishes_a_signed_record() {
        let mut w = world();
        let msg = w.client.connected(
            at(&w, 0),
            b"hash",
            Some(addr("198.51.100.1:4000")),
            vec![addr("10.0.0.2:51820")],
        );
        let ClientMsg::Register {
            network,
            proof,
            record,
            ..
        } = msg
        else {
            panic!("not a registration");
        };
        let cred = w.member.credential();
        assert_eq!(network, cred.network_id());
        assert_eq!(proof, cred.register_proof(b"hash"));
        let v = record.verify(&network).unwrap();
        assert_eq!(v.record.node_key, w.peers.own_key());
        assert_eq!(
            v.record.candidates,
            vec![addr("198.51.100.1:4000"), addr("10.0.0.2:51820")],
            "reflexive first, then local"
        );
    }

    #[test]
    fn up_returns_once_the_members_already_there_are_in_the_peer_table() {
        let mut w = world();
        let actions = register(&mut w, 2);
        assert_eq!(
            actions[0],
            Action::BindRelay {
                relay_id: 5,
                secret: RelaySecret([3; 16])
            },
            "the relay is bound before any peer is handled"
        );
        assert!(
            !status_registered(&actions),
            "two members are still to come"
        );
        let a = w.client.handle(at(&w, 6), peer_up(2));
        assert_eq!(
            a,
            vec![
                Action::Initiate(key_of([2; 32])),
                Action::Candidates(key_of([2; 32]))
            ]
        );
        let a = w.client.handle(at(&w, 7), peer_up(3));
        assert!(status_registered(&a));
        assert_eq!(w.peers.len(), 2);
        assert_eq!(w.peers.by_key(&key_of([3; 32])).unwrap().relay_id(), 3);
        // A newer record updates; the same one again is stale.
        let newer = ServerMsg::PeerUp {
            record: peer_record(3, SECRET, 11),
            relay_id: 3,
        };
        assert_eq!(
            w.client.handle(at(&w, 8), newer),
            vec![Action::Candidates(key_of([3; 32]))]
        );
        assert!(w.client.handle(at(&w, 9), peer_up(3)).is_empty());
        assert_eq!(Counters::get(&w.counters.records_stale), 1);
    }

    /// A batch of member changes: the initial members count down by its records; later, its
    /// departures are applied before its records (a member that left and came back).
    #[test]
    fn a_peers_batch_applies_departures_then_records_and_counts_the_initial_list() {
        let mut w = world();
        register(&mut w, 3);
        let entry = |n: u8, issued_ms| PeerEntry {
            record: peer_record(n, SECRET, issued_ms),
            relay_id: u32::from(n),
        };
        let a = w.client.handle(
            at(&w, 6),
            ServerMsg::Peers {
                down: vec![],
                up: vec![entry(2, 10), entry(3, 10)],
            },
        );
        assert!(!status_registered(&a), "one member is still to come");
        assert!(a.contains(&Action::Initiate(key_of([3; 32]))));
        let a = w.client.handle(
            at(&w, 7),
            ServerMsg::Peers {
                down: vec![],
                up: vec![entry(4, 10)],
            },
        );
        assert!(status_registered(&a));
        assert_eq!(w.peers.len(), 3);
        // 2 restarted (gone, then back with a new relay id and record), 3 left, 4 is renewed.
        let back = PeerEntry {
            record: peer_record(2, SECRET, 20),
            relay_id: 22,
        };
        let a = w.client.handle(
            at(&w, 8),
            ServerMsg::Peers {
                down: vec![key_of([2; 32]), key_of([3; 32])],
                up: vec![back, entry(4, 11)],
            },
        );
        assert!(a.contains(&Action::Initiate(key_of([2; 32]))), "{a:?}");
        assert!(!a.contains(&Action::Initiate(key_of([4; 32]))));
        // 3 is not revoked: it stays, unlisted, while its direct path lives (core/offline.rs).
        assert_eq!(w.peers.len(), 3);
        assert!(matches!(
            w.peers.by_key(&key_of([3; 32])).unwrap().listing(),
            Listing::Unlisted { .. }
        ));
        assert_eq!(
            w.peers.by_key(&key_of([2; 32])).unwrap().listing(),
            Listing::Listed
        );
        assert_eq!(w.peers.by_key(&key_of([2; 32])).unwrap().relay_id(), 22);
        // A record of another network in a batch is dropped and counted; the rest applies.
        let a = w.client.handle(
            at(&w, 9),
            ServerMsg::Peers {
                down: vec![],
                up: vec![
                    PeerEntry {
                        record: peer_record(5, [8; 32], 10),
                        relay_id: 5,
                    },
                    entry(6, 10),
                ],
            },
        );
        assert!(a.contains(&Action::Initiate(key_of([6; 32]))));
        assert!(w.peers.by_key(&key_of([5; 32])).is_none());
        assert_eq!(
            Counters::get(&w.counters.records_foreign),
            1,
            "another network's"
        );
    }

    #[test]
    fn promised_records_that_never_come_do_not_hold_up_forever() {
        let mut w = world();
        register(&mut w, 2);
        // A forged record counts as one of those promised (it came), and is dropped.
        let forged = ServerMsg::PeerUp {
            record: peer_record(2, [8; 32], 10),
            relay_id: 2,
        };
        assert!(!status_registered(&w.client.handle(at(&w, 6), forged)));
        let due = w.client.poll_timeout().unwrap();
        assert_eq!(due, at(&w, 5).at + Duration::from_secs(10));
        let a = w.client.handle_timeout(Now {
            at: due,
            unix_ms: 0,
        });
        assert!(status_registered(&a), "the first heartbeat ends the wait");
        assert!(a.contains(&Action::Send(ClientMsg::Heartbeat)));
    }

    #[test]
    fn records_that_do_not_verify_are_counted_by_kind_and_never_applied() {
        let mut w = world();
        register(&mut w, 0);
        let mut unsigned = peer_record(2, SECRET, 10);
        unsigned.sig.clear();
        let mut tampered = peer_record(3, SECRET, 10);
        tampered.body = tampered.body.replace("peer3", "peerX");
        let foreign = peer_record(4, [8; 32], 10);
        let outside = {
            let cred = Credential::from_token(token(SECRET));
            cred.sign_record(&NodeRecord {
                network: cred.network_id(),
                node_key: key_of([5; 32]),
                name: "out".into(),
                ip: "10.1.2.3".parse().unwrap(),
                candidates: vec![],
                issued_ms: 1,
                ssh: None,
            })
        };
        for record in [unsigned, tampered, foreign, outside] {
            let a = w.client.handle(
                at(&w, 6),
                ServerMsg::PeerUp {
                    record,
                    relay_id: 1,
                },
            );
            assert!(a.is_empty(), "{a:?}");
        }
        assert!(w.peers.is_empty());
        let c = &w.counters;
        assert_eq!(Counters::get(&c.records_unsigned), 1);
        assert_eq!(Counters::get(&c.records_bad_signature), 1);
        assert_eq!(Counters::get(&c.records_foreign), 1);
        assert_eq!(Counters::get(&c.records_malformed), 1);
    }

    #[test]
    fn heartbeats_keep_the_connection_and_silence_ends_it() {
        let mut w = world();
        register(&mut w, 0);
        let mut t = w.client.poll_timeout().unwrap();
        // The coordinator answers the first two heartbeats, then falls silent.
        for i in 0..2 {
            let a = w.client.handle_timeout(Now { at: t, unix_ms: 0 });
            assert_eq!(a, vec![Action::Send(ClientMsg::Heartbeat)], "beat {i}");
            w.client
                .handle(Now { at: t, unix_ms: 0 }, ServerMsg::HeartbeatAck);
            t = w.client.poll_timeout().unwrap();
        }
        let mut ended = None;
        for _ in 0..5 {
            let a = w.client.handle_timeout(Now { at: t, unix_ms: 0 });
            if let Some(Action::End(e)) = a.last() {
                ended = Some(e.clone());
                break;
            }
            t = w.client.poll_timeout().unwrap();
        }
        assert_eq!(
            ended,
            Some(End::Lost("coordinator stopped answering".into()))
        );
        // Early timer calls do nothing.
        let mut w = world();
        register(&mut w, 0);
        assert!(w.client.handle_timeout(at(&w, 6)).is_empty());
    }

    #[test]
    fn an_unanswered_registration_ends_the_connection() {
        let mut w = world();
        w.client.connected(at(&w, 0), b"h", None, vec![]);
        let due = w.client.poll_timeout().unwrap();
        assert_eq!(due, w.t0 + REGISTER_TIMEOUT);
        assert!(matches!(
            w.client.handle_timeout(Now {
                at: due,
                unix_ms: 0
            })[..],
            [Action::End(End::Lost(_))]
        ));
        // Refusals and surprises in place of the answer.
        w.client.connected(at(&w, 0), b"h", None, vec![]);
        let a = w.client.handle(
            at(&w, 1),
            ServerMsg::Refused {
                reason: RefuseReason::AddressInUse,
                message: "taken".into(),
            },
        );
        assert_eq!(a, vec![Action::End(End::AddressInUse)]);
        w.client.connected(at(&w, 0), b"h", None, vec![]);
        let a = w.client.handle(at(&w, 1), ServerMsg::HeartbeatAck);
        assert!(matches!(a[..], [Action::End(End::Lost(_))]));
    }

    #[test]
    fn new_candidates_are_republished_and_new_local_addresses_start_over() {
        let mut w = world();
        let locals = vec![addr("10.0.0.2:51820")];
        w.client.connected(
            at(&w, 0),
            b"h",
            Some(addr("198.51.100.1:4000")),
            locals.clone(),
        );
        w.client.handle(at(&w, 1), registered(0));
        assert!(w
            .client
            .addresses(at(&w, 2), Some(addr("198.51.100.1:4000")), &locals)
            .is_empty());
        let a = w
            .client
            .addresses(at(&w, 3), Some(addr("198.51.100.1:4999")), &locals);
        let [Action::Send(ClientMsg::Update { record })] = &a[..] else {
            panic!("{a:?}");
        };
        let v = record.verify(&w.member.credential().network_id()).unwrap();
        assert_eq!(v.record.candidates[0], addr("198.51.100.1:4999"));
        assert!(
            v.record.issued_ms > 1_000_000,
            "newer than the registration's"
        );
        assert!(w
            .client
            .addresses(at(&w, 4), Some(addr("198.51.100.1:4999")), &locals)
            .is_empty());
        let a = w
            .client
            .addresses(at(&w, 5), None, &[addr("10.0.0.3:51820")]);
        assert!(matches!(a[..], [Action::End(End::Lost(_))]));
    }

    #[test]
    fn a_port_mapping_is_published_after_the_reflexive_address_and_withdrawn() {
        let mut w = world();
        let locals = vec![addr("10.0.0.2:51820")];
        let reflexive = Some(addr("198.51.100.1:4000"));
        w.client
            .connected(at(&w, 0), b"h", reflexive, locals.clone());
        // Learnt while registering: nothing sent yet, published with the registration.
        assert!(w
            .client
            .mapped(at(&w, 1), Some(addr("198.51.100.1:40000")))
            .is_empty());
        let a = w.client.handle(at(&w, 2), registered(0));
        let update = a
            .iter()
            .find_map(|a| match a {
                Action::Send(ClientMsg::Update { record }) => Some(record),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no update after registering: {a:?}"));
        let v = update.verify(&w.member.credential().network_id()).unwrap();
        assert_eq!(
            v.record.candidates,
            vec![
                addr("198.51.100.1:4000"),
                addr("198.51.100.1:40000"),
                addr("10.0.0.2:51820")
            ]
        );
        assert!(w
            .client
            .mapped(at(&w, 3), Some(addr("198.51.100.1:40000")))
            .is_empty());
        let a = w.client.mapped(at(&w, 4), None);
        let [Action::Send(ClientMsg::Update { record })] = &a[..] else {
            panic!("{a:?}");
        };
        let v = record.verify(&w.member.credential().network_id()).unwrap();
        assert_eq!(
            v.record.candidates,
            vec![addr("198.51.100.1:4000"), addr("10.0.0.2:51820")]
        );
    }

    #[test]
    fn a_redemption_of_our_invite_is_decided_here_once() {
        let mut w = world();
        register(&mut w, 0);
        let code = InviteCode {
            secret: [4; 16],
            coordinator_key: [9; 32],
            endpoints: vec!["192.0.2.1:7600".into()],
        };
        let id = w
            .member
            .invites()
            .open(code.clone(), 1, 2_000_000, 1_000_000)
            .unwrap();
        let redeemer = key_of([6; 32]);
        let signing = a2a_proto::membership::node_signing_key(&[6; 32]);
        let signing_key = SignerId::from(signing.verifying_key());
        let request = |proof: InviteProof| ServerMsg::RedeemRequest {
            ticket: 77,
            invite: id,
            node_key: redeemer,
            signing_key,
            proof,
        };
        let a = w.client.handle(at(&w, 10), request(InviteProof([0; 32])));
        assert!(matches!(
            &a[0],
            Action::Send(ClientMsg::InviteDeny { ticket: 77, .. })
        ));
        let a = w
            .client
            .handle(at(&w, 11), request(code.proof(&redeemer, &signing_key)));
        let Action::Send(ClientMsg::InviteAdmit { ticket: 77, sealed }) = &a[0] else {
            panic!("{a:?}");
        };
        let Some(InviteAnswer::Admitted { network, cert, .. }) =
            code.open_answer(&redeemer, sealed)
        else {
            panic!("the answer is sealed to the redeemer");
        };
        assert_eq!(network, w.member.credential().network_id());
        assert!(MemberCert::open(&cert, &network).is_ok());
        assert!(
            a.contains(&Action::Send(ClientMsg::InviteClose { id })),
            "used up: closed at the coordinator"
        );
        let a = w
            .client
            .handle(at(&w, 12), request(code.proof(&redeemer, &signing_key)));
        assert!(matches!(&a[0], Action::Send(ClientMsg::InviteDeny { .. })));
        assert_eq!(Counters::get(&w.counters.invites_redeemed), 1);
        assert_eq!(Counters::get(&w.counters.invites_denied), 2);
    }

    #[test]
    fn revocations_remove_peers_are_saved_and_a_forged_one_changes_nothing() {
        let mut w = world();
        register(&mut w, 0);
        w.client.handle(at(&w, 6), peer_up(2));
        let network_key = NetworkKey::derive(&SECRET);
        let revoke = |k: NodeKey, key: &NetworkKey| ServerMsg::Revoked {
            revocation: Signed::sign(
                &Revocation {
                    network: network_key.id(),
                    node_key: k,
                    issued_ms: 5,
                },
                key,
                REVOKE_CONTEXT,
            ),
        };
        let forged = revoke(key_of([2; 32]), &NetworkKey::derive(&[8; 32]));
        assert!(w.client.handle(at(&w, 7), forged).is_empty());
        assert_eq!(Counters::get(&w.counters.membership_bad_signature), 1);
        assert_eq!(w.peers.len(), 1);
        let a = w
            .client
            .handle(at(&w, 8), revoke(key_of([2; 32]), &network_key));
        assert!(matches!(&a[..], [Action::SaveRevocations(l)] if l.len() == 1));
        assert!(w.peers.is_empty());
        assert!(
            w.client.handle(at(&w, 9), peer_up(2)).is_empty(),
            "a revoked member's record is refused"
        );
        assert_eq!(Counters::get(&w.counters.records_revoked), 1);
        let own = w.peers.own_key();
        let a = w.client.handle(at(&w, 10), revoke(own, &network_key));
        assert!(matches!(a[..], [Action::End(End::Refused(_))]));
    }

    /// Runs the client's timers up to `ms`, second by second; the actions of them all.
    fn sweep_to(w: &mut World, from_ms: u64, to_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let mut ms = from_ms;
        while ms <= to_ms {
            out.extend(w.client.handle_timeout(at(w, ms)));
            out.extend(w.client.sweep(at(w, ms)));
            ms += 1000;
        }
        out
    }

    fn saved_files(actions: &[Action]) -> Vec<SavedFile> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SavePeers(f) => Some(f.clone()),
                _ => None,
            })
            .collect()
    }

    fn network_id() -> a2a_proto::NetworkId {
        Credential::from_token(token(SECRET)).network_id()
    }

    #[test]
    fn verified_peers_are_saved_sealed_and_restored_towards_their_last_endpoint() {
        let mut w = world();
        register(&mut w, 1);
        w.client.handle(at(&w, 6), peer_up(2));
        let files = saved_files(&sweep_to(&mut w, 1000, 3000));
        assert_eq!(files.len(), 1, "saved once, then only when it changes");
        let saved = offline::open(&files[0], &[1; 32], &network_id()).unwrap();
        assert_eq!(saved.len(), 1);
        assert_eq!(saved[0].node_key, key_of([2; 32]));
        assert_eq!(saved[0].endpoint, None, "not reached directly yet");

        // A restarted node: the peer comes back before any coordinator answers, aimed first at
        // where it was last reached.
        let mut w2 = world();
        let mut with_endpoint = saved.clone();
        with_endpoint[0].endpoint = Some(addr("203.0.113.9:51820"));
        let (actions, restored, refused) = w2.client.restore(at(&w2, 0), with_endpoint);
        assert_eq!((restored, refused), (1, 0));
        assert_eq!(
            actions,
            vec![
                Action::Initiate(key_of([2; 32])),
                Action::Candidates(key_of([2; 32]))
            ]
        );
        let p = w2.peers.by_key(&key_of([2; 32])).unwrap();
        assert_eq!(p.listing(), Listing::Saved);
        assert_eq!(
            p.info().candidates,
            vec![addr("203.0.113.9:51820"), addr("192.0.2.50:51820")]
        );
        assert_eq!(p.route().fallback, Some(addr("203.0.113.9:51820")));
        // The coordinator comes back and lists it with the same record: listed again, not
        // counted as a replay.
        register(&mut w2, 1);
        w2.client.handle(at(&w2, 6), peer_up(2));
        assert_eq!(p.listing(), Listing::Listed);
        assert_eq!(Counters::get(&w2.counters.records_stale), 0);
        // Nothing changed: nothing is written (the endpoint saved before is kept).
        assert!(saved_files(&sweep_to(&mut w2, 1000, 3000)).is_empty());
    }

    #[test]
    fn restored_records_are_verified_again_and_revoked_ones_stay_out() {
        let mut w = world();
        let good = |n: u8| SavedPeer {
            node_key: key_of([n; 32]),
            record: peer_record(n, SECRET, 10),
            endpoint: None,
        };
        let foreign = SavedPeer {
            node_key: key_of([3; 32]),
            record: peer_record(3, [8; 32], 10),
            endpoint: None,
        };
        let mismatched = SavedPeer {
            node_key: key_of([9; 32]),
            ..good(4)
        };
        // Peer 5 was kicked: its revocation is known (revoked.json).
        let network_key = NetworkKey::derive(&SECRET);
        let r = Revocation {
            network: network_key.id(),
            node_key: key_of([5; 32]),
            issued_ms: 5,
        };
        w.member
            .revoke(&r, Signed::sign(&r, &network_key, REVOKE_CONTEXT))
            .unwrap();
        let (_, restored, refused) = w
            .client
            .restore(at(&w, 0), vec![good(2), foreign, mismatched, good(5)]);
        assert_eq!((restored, refused), (1, 3));
        assert!(w.peers.by_key(&key_of([2; 32])).is_some());
        assert_eq!(w.peers.len(), 1);
        assert_eq!(Counters::get(&w.counters.records_foreign), 1);
        assert_eq!(Counters::get(&w.counters.records_revoked), 1);
    }

    #[test]
    fn a_peer_the_coordinator_forgets_stays_while_heard_directly_and_a_revoked_one_goes_at_once() {
        let mut w = world();
        register(&mut w, 0);
        w.client.handle(at(&w, 6), peer_up(2));
        w.client.handle(at(&w, 6), peer_up(3));
        let p2 = w.peers.by_key(&key_of([2; 32])).unwrap();
        // Peer 2 has a direct path (two answered probes).
        let direct = addr("192.0.2.50:51820");
        p2.with_path(|path| {
            let now = at(&w, 100).at;
            let mut probes = Vec::new();
            path.tick(now, None, None, &mut probes);
            path.on_pong(now, probes[0].tx, Some(direct)).unwrap();
            let c = path.confirm_probe(now, direct);
            path.on_pong(now, c.tx, Some(direct)).unwrap();
        });
        assert_eq!(p2.route().route, Route::Direct(direct));
        // Both expire at the coordinator: neither is dropped at once.
        let down = |n: u8| ServerMsg::PeerDown {
            node_key: key_of([n; 32]),
        };
        w.client.handle(at(&w, 1000), down(2));
        w.client.handle(at(&w, 1000), down(3));
        assert_eq!(w.peers.len(), 2);
        assert!(matches!(p2.listing(), Listing::Unlisted { .. }));
        // Peer 2 keeps answering on its direct path (its data arrives); peer 3 is silent.
        for s in 2..40u64 {
            let ms = s * 1000;
            p2.with_path(|path| {
                path.tick(at(&w, ms).at, Some(at(&w, ms).at), None, &mut Vec::new());
            });
            w.client.handle_timeout(at(&w, ms));
            w.client.sweep(at(&w, ms));
        }
        assert!(w.peers.by_key(&key_of([3; 32])).is_none(), "quiet: dropped");
        assert!(w.peers.by_key(&key_of([2; 32])).is_some(), "alive: kept");
        assert_eq!(Counters::get(&w.counters.peers_unlisted_dropped), 1);
        // Listed again: listed.
        w.client.handle(at(&w, 40_000), peer_up(2));
        assert_eq!(p2.listing(), Listing::Listed);
        // A revocation removes it at once, direct path or not.
        let network_key = NetworkKey::derive(&SECRET);
        let r = Revocation {
            network: network_key.id(),
            node_key: key_of([2; 32]),
            issued_ms: 5,
        };
        w.client.handle(
            at(&w, 41_000),
            ServerMsg::Revoked {
                revocation: Signed::sign(&r, &network_key, REVOKE_CONTEXT),
            },
        );
        assert!(w.peers.is_empty());
        let files = saved_files(&w.client.sweep(at(&w, 42_000)));
        let saved = offline::open(&files[0], &[1; 32], &network_id()).unwrap();
        assert!(saved.is_empty(), "the revoked peer is not saved");
    }

    #[test]
    fn a_peer_that_said_it_leaves_goes_when_unlisted_whichever_comes_first() {
        let mut w = world();
        register(&mut w, 0);
        for n in [2, 3, 4] {
            w.client.handle(at(&w, 6), peer_up(n));
        }
        let down = |n: u8| ServerMsg::PeerDown {
            node_key: key_of([n; 32]),
        };
        // 2 says it leaves, then the coordinator's PeerDown: gone at once.
        w.peers.by_key(&key_of([2; 32])).unwrap().mark_left();
        assert!(w.peers.by_key(&key_of([2; 32])).is_some(), "still listed");
        w.client.handle(at(&w, 1000), down(2));
        assert!(w.peers.by_key(&key_of([2; 32])).is_none());
        // 3: the PeerDown first, its notice later: gone at the next sweep, not after 10 s.
        w.client.handle(at(&w, 1000), down(3));
        let p3 = w.peers.by_key(&key_of([3; 32])).unwrap();
        w.client.sweep(at(&w, 1500));
        assert!(w.peers.by_key(&key_of([3; 32])).is_some());
        p3.mark_left();
        w.client.sweep(at(&w, 2000));
        assert!(w.peers.by_key(&key_of([3; 32])).is_none());
        assert_eq!(Counters::get(&w.counters.peers_left), 2);
        assert_eq!(Counters::get(&w.counters.peers_unlisted_dropped), 0);
        // 4 said it leaves but comes back (a new record listed): the notice is forgotten, a
        // later PeerDown unlists it as usual.
        let p4 = w.peers.by_key(&key_of([4; 32])).unwrap();
        p4.mark_left();
        w.client.handle(at(&w, 3000), peer_up(4));
        w.client.handle(at(&w, 4000), down(4));
        w.client.sweep(at(&w, 4500));
        assert!(
            w.peers.by_key(&key_of([4; 32])).is_some(),
            "kept while unlisted"
        );
        assert!(matches!(p4.listing(), Listing::Unlisted { .. }));
    }

    #[test]
    fn a_restored_peer_the_coordinator_does_not_list_is_unlisted_and_nothing_goes_offline() {
        let mut w = world();
        let saved = vec![SavedPeer {
            node_key: key_of([2; 32]),
            record: peer_record(2, SECRET, 10),
            endpoint: Some(addr("203.0.113.9:51820")),
        }];
        w.client.restore(at(&w, 0), saved);
        // No coordinator for a long while: no timer runs, nothing is dropped.
        assert_eq!(w.client.poll_timeout(), None);
        let p = w.peers.by_key(&key_of([2; 32])).unwrap();
        assert_eq!(p.listing(), Listing::Saved);
        // A coordinator answers; its list (one member, 3) does not name 2.
        let reg = w.client.connected(
            at(&w, 100_000),
            b"h",
            Some(addr("198.51.100.1:4000")),
            vec![],
        );
        assert!(matches!(reg, ClientMsg::Register { .. }));
        w.client.handle(at(&w, 100_005), registered(1));
        assert_eq!(p.listing(), Listing::Saved, "the list is not complete yet");
        w.client.handle(at(&w, 100_006), peer_up(3));
        assert!(matches!(p.listing(), Listing::Unlisted { .. }));
        // Never reached directly: gone after the quiet time.
        sweep_to(&mut w, 101_000, 109_000);
        assert!(w.peers.by_key(&key_of([2; 32])).is_some());
        sweep_to(&mut w, 110_000, 111_000);
        assert!(w.peers.by_key(&key_of([2; 32])).is_none());
        assert!(w.peers.by_key(&key_of([3; 32])).is_some());
    }

    #[test]
    fn a_rotation_that_carries_this_node_moves_it_and_one_that_does_not_stops_it() {
        let mut w = world();
        register(&mut w, 0);
        w.client.handle(at(&w, 6), peer_up(2));
        w.client.handle(at(&w, 6), peer_up(3));
        let old = NetworkKey::derive(&SECRET);
        let new_secret = [5u8; 32];
        let new = NetworkKey::derive(&new_secret);
        let rotator = StaticSecret::from([2; 32]);
        let notice = |carry_me: bool| {
            let mut carried = Vec::new();
            if carry_me {
                let carry = Carry::Secret {
                    secret: a2a_proto::keys::NetworkSecret(new_secret),
                };
                carried.push(RotationNotice::seal(
                    &rotator,
                    w.peers.own_key(),
                    &new.id(),
                    &carry,
                ));
            }
            ServerMsg::Moved {
                notice: Signed::sign(
                    &RotationNotice {
                        old_network: old.id(),
                        new_network: new.id(),
                        rotator: key_of([2; 32]),
                        issued_ms: 9,
                        carried,
                    },
                    &old,
                    ROTATE_CONTEXT,
                ),
            }
        };
        let left_behind = notice(false);
        let carried = notice(true);
        let a = w.client.handle(at(&w, 7), carried);
        assert!(matches!(&a[0], Action::SaveMembership(m) if m.token != token(SECRET).encode()));
        assert_eq!(a[1], Action::SaveRevocations(vec![]));
        assert_eq!(a[2], Action::End(End::Moved));
        assert_eq!(w.member.credential().network_id(), new.id());
        assert!(
            w.peers.by_key(&key_of([2; 32])).is_some(),
            "the rotator stays"
        );
        assert!(
            w.peers.by_key(&key_of([3; 32])).is_none(),
            "not carried: dropped"
        );
        assert_eq!(w.client.ended(End::Moved), Next::Retry(Duration::ZERO));

        let mut w2 = world();
        register(&mut w2, 0);
        let a = w2.client.handle(at(&w2, 7), left_behind);
        assert!(matches!(a[..], [Action::End(End::Refused(_))]));
    }

    #[test]
    fn after_a_connection_ends_back_off_move_address_or_stop() {
        let mut w = world();
        let waits: Vec<_> = (0..5)
            .map(|_| w.client.ended(End::Lost("x".into())))
            .collect();
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 4000]
                .map(|ms| Next::Retry(Duration::from_millis(ms)))
                .to_vec()
        );
        register(&mut w, 0);
        assert_eq!(
            w.client.ended(End::Lost("x".into())),
            Next::Retry(BACKOFF_MIN),
            "a registration resets the back-off"
        );
        let first = w.client.ip();
        let Next::MoveAddress(ip) = w.client.ended(End::AddressInUse) else {
            panic!("expected a new address");
        };
        assert_ne!(ip, first);
        assert_eq!(w.client.ip(), ip);
        for _ in 2..MAX_ADDRESS_ATTEMPTS {
            assert!(matches!(
                w.client.ended(End::AddressInUse),
                Next::MoveAddress(_)
            ));
        }
        assert!(matches!(
            w.client.ended(End::AddressInUse),
            Next::Stop(Some(Registration::Refused(_)))
        ));
        let mut w = world();
        for _ in 1..MAX_CLOSED_HANDSHAKES {
            assert!(matches!(
                w.client.ended(End::ClosedInHandshake("closed".into())),
                Next::Retry(_)
            ));
        }
        let Next::Stop(Some(Registration::Refused(why))) =
            w.client.ended(End::ClosedInHandshake("closed".into()))
        else {
            panic!("three closed handshakes are a wrong key");
        };
        assert!(why.contains("get a new token"), "{why}");
        assert_eq!(w.client.ended(End::Left), Next::Stop(None));
    }
}
