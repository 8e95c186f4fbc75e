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

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use a2a_proto::control::{ClientMsg, RefuseReason, ServerMsg};
use a2a_proto::invite::InviteAnswer;
use a2a_proto::membership::{issue_cert, Carry, Invited, MemberCert, Revocation, RotationNotice};
use a2a_proto::overlay::derive_ip;
use a2a_proto::record::{RecordError, VerifiedRecord, MAX_CANDIDATES};
use a2a_proto::{Credential, JoinToken, NetworkKey, NodeKey, NodeRecord, SignedRecord};
use data_encoding::BASE64;

use crate::core::counters::Counters;
use crate::core::membership::{MemberState, Membership};
use crate::core::peers::{Applied, PeerTable};

/// Reconnect back-off bounds.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(4);
/// Silence from the coordinator, in heartbeats, after which the connection is presumed dead.
pub const SILENT_HEARTBEATS: u32 = 3;
/// How long the coordinator may take to answer a registration.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Overlay addresses tried when the derived one is taken.
pub const MAX_ADDRESS_ATTEMPTS: u32 = 16;
/// Handshakes closed in a row before the token's coordinator key is declared wrong.
pub const MAX_CLOSED_HANDSHAKES: u32 = 3;

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
        secret: [u8; 16],
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
    SaveMembership(Membership),
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
    published: Vec<SocketAddr>,
    registered: bool,
    /// `PeerUp`s still to come before `up` may return.
    initial_peers: u32,
    heartbeat_every: Duration,
    next_timer: Instant,
    last_heard: Instant,
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
    conn: Option<Conn>,
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
            conn: None,
        }
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
        let published = candidates_from(reflexive, &locals);
        let record = self.record(now, &cred, published.clone());
        let msg = ClientMsg::Register {
            network: cred.network_id(),
            proof: cred.register_proof(handshake_hash),
            record,
        };
        self.conn = Some(Conn {
            cred,
            locals,
            published,
            registered: false,
            initial_peers: 0,
            heartbeat_every: REGISTER_TIMEOUT,
            next_timer: now.at + REGISTER_TIMEOUT,
            last_heard: now.at,
        });
        msg
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due; `None` without a connection.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conn.as_ref().map(|c| c.next_timer)
    }

    /// The timer [`poll_timeout`](Self::poll_timeout) named fired.
    pub fn handle_timeout(&mut self, now: Now) -> Vec<Action> {
        let Some(c) = self.conn.as_mut() else {
            return vec![];
        };
        if now.at < c.next_timer {
            return vec![];
        }
        if !c.registered {
            return vec![Action::End(End::Lost(
                "the coordinator did not answer the registration".into(),
            ))];
        }
        let mut out = Vec::new();
        c.next_timer = now.at + c.heartbeat_every;
        if c.initial_peers > 0 {
            // Some promised records never came (dropped as forged, say): `up` waits no longer.
            c.initial_peers = 0;
            out.push(Action::Status(Registration::Registered { ip: self.ip }));
        }
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
        let candidates = candidates_from(reflexive, locals);
        if candidates == c.published || !c.registered {
            return vec![];
        }
        let cred = c.cred.clone();
        let record = self.record(now, &cred, candidates.clone());
        if let Some(c) = self.conn.as_mut() {
            c.published = candidates;
        }
        vec![Action::Send(ClientMsg::Update { record })]
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
        let peer_up = matches!(msg, ServerMsg::PeerUp { .. });
        self.message(now, &cred, msg, &mut out);
        if let Some(c) = self.conn.as_mut() {
            if peer_up && c.initial_peers > 0 {
                c.initial_peers -= 1;
                if c.initial_peers == 0 {
                    out.push(Action::Status(Registration::Registered { ip: self.ip }));
                }
            }
        }
        out
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
        let Some(secret) = BASE64
            .decode(relay_secret.as_bytes())
            .ok()
            .and_then(|v| <[u8; 16]>::try_from(v).ok())
        else {
            return vec![Action::End(End::Lost(
                "coordinator sent a malformed relay secret".into(),
            ))];
        };
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
        out
    }

    fn message(&mut self, now: Now, cred: &Credential, msg: ServerMsg, out: &mut Vec<Action>) {
        let network = cred.network_id();
        match msg {
            ServerMsg::PeerUp { record, relay_id } => {
                self.peer_up(now, cred, record, relay_id, out)
            }
            ServerMsg::Punch { from } => out.push(Action::Punch(from)),
            ServerMsg::PeerDown { node_key } => {
                if let Some(peer) = self.peers.by_key(&node_key) {
                    tracing::info!("peer {} ({}) left", peer.info().name, peer.ip());
                }
                self.peers.remove(&node_key);
            }
            ServerMsg::RedeemRequest {
                ticket,
                invite,
                node_key,
                signing_key,
                proof,
            } => {
                out.push(Action::Send(self.answer_redemption(
                    now,
                    cred,
                    ticket,
                    &invite,
                    node_key,
                    &signing_key,
                    &proof,
                )));
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
            }
            ServerMsg::Moved { notice } => self.follow_rotation(cred, &notice, out),
            ServerMsg::Refused { reason, message } => {
                out.push(Action::End(refused(reason, message)))
            }
            ServerMsg::Registered { .. }
            | ServerMsg::HeartbeatAck
            | ServerMsg::InviteAdmitted { .. } => {}
        }
    }

    /// A member's record: applied only when it verifies (the coordinator cannot forge members),
    /// else dropped and counted by kind.
    fn peer_up(
        &mut self,
        now: Now,
        cred: &Credential,
        record: SignedRecord,
        relay_id: u32,
        out: &mut Vec<Action>,
    ) {
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
                return;
            }
        };
        let VerifiedRecord { record, cert } = verified;
        if !cred.prefix().contains(&record.ip) {
            Counters::bump(&c.records_malformed);
            return;
        }
        if self.member.is_revoked(&record.node_key) {
            Counters::bump(&c.records_revoked);
            return;
        }
        let key = record.node_key;
        let applied = self.peers.apply(now.at, record, cert);
        let peer = self.peers.by_key(&key);
        if let Some(p) = &peer {
            p.set_relay_id(relay_id);
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
        invite: &str,
        node_key: NodeKey,
        signing_key: &str,
        proof: &str,
    ) -> ClientMsg {
        let deny = |message: &str| ClientMsg::InviteDeny {
            ticket,
            message: message.into(),
        };
        let Some(network_key) = cred.network_key() else {
            return deny("the inviter no longer holds the network secret");
        };
        let Some(signing) = BASE64
            .decode(signing_key.as_bytes())
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok())
        else {
            return deny("malformed signing key");
        };
        if self.member.is_revoked(&node_key) {
            return deny("this node key was removed from the network");
        }
        let decided =
            self.member
                .invites()
                .redeem(invite, &node_key, signing_key, proof, now.unix_ms);
        match decided {
            Ok((code, _used_up)) => {
                Counters::bump(&self.counters.invites_redeemed);
                let cert = issue_cert(network_key, node_key, &signing, invite.into(), now.unix_ms);
                let answer = InviteAnswer::Admitted {
                    network: network_key.id(),
                    prefix: cred.prefix(),
                    cert,
                };
                ClientMsg::InviteAdmit {
                    ticket,
                    sealed: code.seal_answer(&node_key, &answer),
                }
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
            Some(Carry::Secret { secret }) => BASE64
                .decode(secret.as_bytes())
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
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
                        coordinator_key: BASE64.encode(&cred.coordinator_key()),
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
        })
    }
}

/// The candidates a node publishes: its reflexive address first, then its local ones.
pub fn candidates_from(reflexive: Option<SocketAddr>, locals: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut c: Vec<SocketAddr> = reflexive.into_iter().collect();
    for a in locals {
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
