//! The coordinator client: connects over the Noise control channel, proves membership,
//! publishes this node's signed record, applies the verified records of other members to the
//! peer table, heartbeats, and reconnects by itself when the coordinator goes away.
//!
//! While registered it also keeps the relay link: a UDP bind every [`BIND_EVERY`] (which also
//! re-learns the reflexive address, so a roaming node republishes its candidates), relay frames
//! over the connection when UDP binds go unanswered, and punch requests to and from peers.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::Ordering;

use a2a_proto::control::{ClientMsg, RefuseReason, ServerMsg};
use a2a_proto::invite::{InviteAnswer, InviteCode, InviteId, InviteProof};
use a2a_proto::keys::{CoordinatorKey, SignerId};
use a2a_proto::membership::{
    issue_cert, node_signing_key, Carry, Invited, MemberCert, Revocation, RotationNotice,
};
use a2a_proto::noise_channel::{
    handshake_initiator, FrameReader, FrameWriter, HandshakeError, Incoming,
};
use a2a_proto::overlay::derive_ip;
use a2a_proto::record::{RecordError, VerifiedRecord};
use a2a_proto::time::now_ms;
use a2a_proto::{Credential, JoinToken, NetworkKey, NodeKey, NodeRecord};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::dataplane::{ControlOut, Counters, DataPlane, RelayLink, TunBatch};
use crate::membership::MemberState;
use crate::pathfinder::PathEvent;
use crate::peers::Applied;

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

/// Reconnect back-off bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(4);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the coordinator to echo our UDP endpoint.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the relay bind is refreshed (and the reflexive and local addresses re-checked).
const BIND_EVERY: Duration = Duration::from_secs(5);
/// Silence from the coordinator, in heartbeats, after which the connection is presumed dead.
const SILENT_HEARTBEATS: u32 = 3;
/// Frames queued from the packet path for the control connection.
const CONTROL_QUEUE: usize = 4096;
/// Overlay addresses tried when the derived one is taken.
const MAX_ADDRESS_ATTEMPTS: u32 = 16;

pub struct ControlClient {
    pub member: Arc<MemberState>,
    pub node_private: [u8; 32],
    pub name: String,
    pub udp_port: u16,
    pub dataplane: Arc<DataPlane>,
    pub counters: Arc<Counters>,
    pub netconf: crate::netconf::NetConf,
    pub tun_index: u32,
    pub status: watch::Sender<Registration>,
    /// The current overlay address; changes only when the coordinator reports a conflict.
    pub ip: watch::Sender<Ipv4Addr>,
}

/// Why one control session ended.
enum SessionEnd {
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

/// Handshakes closed in a row before the token's coordinator key is declared wrong.
const MAX_CLOSED_HANDSHAKES: u32 = 3;

impl ControlClient {
    /// Runs until `leave` fires (then tells the coordinator) or a permanent refusal.
    pub async fn run(self, mut leave: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        let mut attempt = 0u32;
        let mut last_issued = 0u64;
        let mut closed_handshakes = 0u32;
        loop {
            let end = self.session(&mut leave, &mut last_issued).await;
            self.dataplane.relay.store(None);
            let end = match end {
                SessionEnd::ClosedInHandshake(why) => {
                    closed_handshakes += 1;
                    if closed_handshakes >= MAX_CLOSED_HANDSHAKES {
                        SessionEnd::Refused(format!(
                            "{why}: the join token's coordinator key does not match this \
                             coordinator (is the token from another coordinator, or was its \
                             state directory replaced?); get a new token"
                        ))
                    } else {
                        SessionEnd::Lost(why)
                    }
                }
                other => {
                    closed_handshakes = 0;
                    other
                }
            };
            match end {
                SessionEnd::Left => return,
                SessionEnd::Moved => {
                    tracing::info!("the network rotated its secret; registering in the new one");
                    backoff = BACKOFF_MIN;
                    continue;
                }
                SessionEnd::ClosedInHandshake(_) => unreachable!("mapped above"),
                SessionEnd::Refused(msg) => {
                    tracing::error!("coordinator refused this node: {msg}");
                    let _ = self.status.send(Registration::Refused(msg));
                    return;
                }
                SessionEnd::AddressInUse => {
                    attempt += 1;
                    if attempt >= MAX_ADDRESS_ATTEMPTS {
                        let _ = self.status.send(Registration::Refused(
                            "no free overlay address found in the network prefix".into(),
                        ));
                        return;
                    }
                    let prefix = self.member.credential().prefix();
                    let ip = derive_ip(prefix, &self.node_key(), attempt);
                    tracing::info!("overlay address taken by another node; moving to {ip}");
                    if let Err(e) = self
                        .netconf
                        .configure(self.tun_index, ip, prefix.prefix_len())
                        .await
                    {
                        tracing::error!("{e}");
                    }
                    let _ = self.ip.send(ip);
                    continue;
                }
                SessionEnd::Lost(why) => {
                    tracing::info!("control connection: {why}; retrying in {backoff:?}");
                    if !matches!(*self.status.borrow(), Registration::Refused(_)) {
                        let _ = self.status.send(Registration::Unreachable(why));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = leave.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            if *leave.borrow() {
                return;
            }
        }
    }

    fn node_key(&self) -> a2a_proto::NodeKey {
        self.dataplane.peers.own_key()
    }

    async fn connect(&self) -> Result<(TcpStream, SocketAddr), String> {
        connect_any(self.member.credential().endpoints()).await
    }

    /// Asks the coordinator's UDP port which address our WireGuard socket is seen at.
    async fn discover_reflexive(&self, coordinator: SocketAddr) -> Option<SocketAddr> {
        let dp = &self.dataplane;
        dp.prober
            .probe(&dp.udp, coordinator, None, 2, PROBE_TIMEOUT)
            .await
            .map(|a| a.observed)
    }

    fn record(
        &self,
        cred: &Credential,
        candidates: Vec<SocketAddr>,
        last_issued: &mut u64,
    ) -> a2a_proto::SignedRecord {
        let issued_ms = now_ms().max(*last_issued + 1);
        *last_issued = issued_ms;
        cred.sign_record(&NodeRecord {
            network: cred.network_id(),
            node_key: self.node_key(),
            name: self.name.clone(),
            ip: *self.ip.borrow(),
            candidates,
            issued_ms,
        })
    }

    async fn session(
        &self,
        leave: &mut watch::Receiver<bool>,
        last_issued: &mut u64,
    ) -> SessionEnd {
        if *leave.borrow() {
            return SessionEnd::Left;
        }
        // The credential for this whole connection (a rotation ends it and starts another).
        let cred = self.member.credential();
        let (mut stream, coordinator) = match self.connect().await {
            Ok(x) => x,
            Err(e) => return SessionEnd::Lost(e),
        };
        let _ = stream.set_nodelay(true);
        // UDP discovery runs during the handshake: without UDP it costs no extra time.
        let coordinator_key = cred.coordinator_key();
        let (handshake, reflexive) = tokio::join!(
            handshake_initiator(&mut stream, &self.node_private, &coordinator_key),
            self.discover_reflexive(coordinator)
        );
        let est = match handshake {
            Ok(e) => e,
            Err(e @ HandshakeError::Refused) => return SessionEnd::Refused(e.to_string()),
            Err(HandshakeError::Closed) => {
                return SessionEnd::ClosedInHandshake(format!(
                    "coordinator {coordinator} closed the connection during the handshake"
                ))
            }
            Err(e) => return SessionEnd::Lost(format!("handshake with coordinator failed: {e}")),
        };
        let proof = cred.register_proof(&est.handshake_hash);
        let (r, w) = stream.into_split();
        let (mut reader, mut writer) = est.split(r, w);

        let locals = local_addresses(&self.netconf, self.tun_index, self.udp_port).await;
        let mut published = candidates_from(reflexive, &locals);
        let record = self.record(&cred, published.clone(), last_issued);
        let register = ClientMsg::Register {
            network: cred.network_id(),
            proof,
            record,
        };
        if let Err(e) = writer.send(&register).await {
            return SessionEnd::Lost(format!("sending registration failed: {e}"));
        }
        let (heartbeat_s, relay_id, relay_secret, mut initial_peers) = match reader
            .recv::<ServerMsg>()
            .await
        {
            Ok(ServerMsg::Registered {
                heartbeat_s,
                relay_id,
                relay_secret,
                peers,
            }) => (heartbeat_s.clamp(1, 300), relay_id, relay_secret, peers),
            Ok(ServerMsg::Refused { reason, message }) => return refused(reason, message),
            Ok(_) => return SessionEnd::Lost("unexpected first reply from coordinator".into()),
            Err(e) => return SessionEnd::Lost(format!("coordinator closed the connection: {e}")),
        };
        // The relay link: the packet path and path finder send through `control_tx`. Bind
        // before the first peer is handled, so the first relayed handshake is not dropped as
        // coming from an unbound address (skipped when UDP already failed).
        let udp_ok = match reflexive {
            Some(_) => {
                let dp = &self.dataplane;
                let bind = Some((relay_id, relay_secret));
                dp.prober
                    .probe(&dp.udp, coordinator, bind, 2, PROBE_TIMEOUT)
                    .await
                    .is_some()
            }
            None => false,
        };
        // `up` returns once the members already in the network are in the peer table, so the
        // caller's first packet to any of them has a tunnel to go into.
        let ip = *self.ip.borrow();
        let registered = || {
            tracing::info!("registered with the coordinator as {} ({ip})", self.name);
            let _ = self.status.send(Registration::Registered { ip });
        };
        if initial_peers == 0 {
            registered();
        }
        // What this member knows about membership, for the coordinator to hold again (it may
        // have restarted): the revocations it has seen and the invites it honours.
        let mut hello: Vec<ClientMsg> = self
            .member
            .revocations()
            .into_iter()
            .map(|revocation| ClientMsg::Revoke { revocation })
            .collect();
        hello.extend(
            self.member
                .invites()
                .ids()
                .into_iter()
                .map(|id| ClientMsg::InviteOpen { id }),
        );
        for m in &hello {
            if let Err(e) = writer.send(m).await {
                return SessionEnd::Lost(format!("coordinator connection lost: {e}"));
            }
        }
        let (control_tx, mut control_rx) = mpsc::channel(CONTROL_QUEUE);
        let link = Arc::new(RelayLink {
            coordinator,
            udp_ok: std::sync::atomic::AtomicBool::new(udp_ok),
            control: control_tx,
        });
        self.dataplane.relay.store(Some(link.clone()));
        let (addrs_tx, mut addrs_rx) = watch::channel((reflexive, locals.clone()));
        let binder = AbortOnDrop(tokio::spawn(bind_loop(
            self.dataplane.clone(),
            self.netconf.clone(),
            self.tun_index,
            self.udp_port,
            link,
            (relay_id, relay_secret),
            addrs_tx,
        )));

        // Reading is not cancellation-safe (a frame read half-way would be lost), so one task
        // owns the reader: it hands relay data straight to the packet path and messages here.
        let (msgs_tx, mut msgs) = mpsc::channel::<std::io::Result<ServerMsg>>(256);
        let reader_task = AbortOnDrop(tokio::spawn(read_loop(
            reader,
            self.dataplane.clone(),
            msgs_tx,
        )));

        let heartbeat_every = Duration::from_secs(heartbeat_s.into());
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        heartbeat.tick().await;
        let mut last_heard = tokio::time::Instant::now();
        let end = loop {
            tokio::select! {
                msg = msgs.recv() => {
                    last_heard = tokio::time::Instant::now();
                    match msg {
                        Some(Ok(msg)) => {
                            let peer_up = matches!(msg, ServerMsg::PeerUp { .. });
                            let mut replies = Vec::new();
                            if let Some(end) = self.handle(&cred, msg, &mut replies).await {
                                break end;
                            }
                            let mut failed = None;
                            for m in &replies {
                                if let Err(e) = writer.send(m).await {
                                    failed = Some(e);
                                    break;
                                }
                            }
                            if let Some(e) = failed {
                                break SessionEnd::Lost(format!("coordinator connection lost: {e}"));
                            }
                            if peer_up && initial_peers > 0 {
                                initial_peers -= 1;
                                if initial_peers == 0 {
                                    registered();
                                }
                            }
                        }
                        Some(Err(e)) => break SessionEnd::Lost(format!("coordinator connection lost: {e}")),
                        None => break SessionEnd::Lost("coordinator connection lost".into()),
                    }
                }
                out = control_rx.recv() => {
                    let sent = match out {
                        Some(ControlOut::Relay(id, payload)) => writer.send_relay(id, &payload).await,
                        Some(ControlOut::Punch(to)) => writer.send(&ClientMsg::Punch { to }).await,
                        Some(ControlOut::Msg(m)) => writer.send(&m).await,
                        Some(ControlOut::Moved) => break SessionEnd::Moved,
                        None => Ok(()),
                    };
                    if let Err(e) = sent {
                        break SessionEnd::Lost(format!("coordinator connection lost: {e}"));
                    }
                }
                _ = heartbeat.tick() => {
                    if initial_peers > 0 {
                        initial_peers = 0;
                        registered();
                    }
                    if last_heard.elapsed() > heartbeat_every * SILENT_HEARTBEATS {
                        break SessionEnd::Lost("coordinator stopped answering".into());
                    }
                    if let Err(e) = writer.send(&ClientMsg::Heartbeat).await {
                        break SessionEnd::Lost(format!("heartbeat failed: {e}"));
                    }
                }
                changed = addrs_rx.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let (reflexive, now_locals) = addrs_rx.borrow_and_update().clone();
                    if now_locals != locals {
                        // The connection is bound to an address that may be gone: start over.
                        break SessionEnd::Lost("underlay addresses changed".into());
                    }
                    let candidates = candidates_from(reflexive, &now_locals);
                    if candidates != published {
                        published = candidates.clone();
                        let record = self.record(&cred, candidates, last_issued);
                        if let Err(e) = writer.send(&ClientMsg::Update { record }).await {
                            break SessionEnd::Lost(format!("update failed: {e}"));
                        }
                    }
                }
                _ = leave.changed() => {
                    leave_gracefully(&mut writer, &mut msgs).await;
                    break SessionEnd::Left;
                }
            }
        };
        drop(reader_task);
        drop(binder);
        end
    }

    /// Applies one message from the coordinator; `Some` ends the session. Answers to send go
    /// into `replies`.
    async fn handle(
        &self,
        cred: &Credential,
        msg: ServerMsg,
        replies: &mut Vec<ClientMsg>,
    ) -> Option<SessionEnd> {
        let network = cred.network_id();
        match msg {
            ServerMsg::PeerUp { record, relay_id } => {
                // The coordinator cannot forge members: whatever does not verify is dropped
                // and counted by kind.
                let verified = match record.verify(&network) {
                    Ok(v) => v,
                    Err(e) => {
                        let c = &self.counters;
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
                let VerifiedRecord { record, cert } = verified;
                if !cred.prefix().contains(&record.ip) {
                    Counters::bump(&self.counters.records_malformed);
                    return None;
                }
                if self.member.is_revoked(&record.node_key) {
                    Counters::bump(&self.counters.records_revoked);
                    return None;
                }
                let key = record.node_key;
                let applied = self.dataplane.peers.apply(record, cert);
                let peer = self.dataplane.peers.by_key(&key);
                if let Some(p) = &peer {
                    p.set_relay_id(relay_id);
                }
                match applied {
                    Applied::Added | Applied::Updated => {
                        if let Some(peer) = peer {
                            if applied == Applied::Added {
                                tracing::info!("peer {} ({}) joined", peer.info().name, peer.ip());
                                self.dataplane.initiate(&peer).await;
                            }
                            let _ = self
                                .dataplane
                                .path_events
                                .try_send(PathEvent::Candidates(key));
                        }
                    }
                    Applied::IsSelf => {}
                    Applied::Stale => Counters::bump(&self.counters.records_stale),
                    Applied::AddressConflict => {
                        Counters::bump(&self.counters.records_address_conflict)
                    }
                    Applied::LowOrderKey => Counters::bump(&self.counters.records_malformed),
                }
                None
            }
            ServerMsg::Punch { from } => {
                let _ = self.dataplane.path_events.try_send(PathEvent::Punch(from));
                None
            }
            ServerMsg::PeerDown { node_key } => {
                if let Some(peer) = self.dataplane.peers.by_key(&node_key) {
                    tracing::info!("peer {} ({}) left", peer.info().name, peer.ip());
                }
                self.dataplane.peers.remove(&node_key);
                None
            }
            ServerMsg::RedeemRequest {
                ticket,
                invite,
                node_key,
                signing_key,
                proof,
            } => {
                replies.push(self.answer_redemption(
                    cred,
                    ticket,
                    invite,
                    node_key,
                    signing_key,
                    &proof,
                ));
                if self.member.invites().ids().iter().all(|id| *id != invite) {
                    replies.push(ClientMsg::InviteClose { id: invite });
                }
                None
            }
            ServerMsg::Revoked { revocation } => {
                let r = match Revocation::open(&revocation, &network) {
                    Ok(r) => r,
                    Err(_) => {
                        Counters::bump(&self.counters.membership_bad_signature);
                        return None;
                    }
                };
                if r.node_key == self.node_key() {
                    return Some(SessionEnd::Refused(
                        "this node was removed from the network (a2actl kick); ask a member for a \
                         new invite"
                            .into(),
                    ));
                }
                if self.member.revoke(&r, revocation) {
                    if let Some(peer) = self.dataplane.peers.by_key(&r.node_key) {
                        tracing::info!("peer {} ({}) was removed", peer.info().name, peer.ip());
                    }
                }
                self.dataplane.peers.remove(&r.node_key);
                None
            }
            ServerMsg::Moved { notice } => self.follow_rotation(cred, &notice),
            ServerMsg::Refused { reason, message } => Some(refused(reason, message)),
            ServerMsg::Registered { .. }
            | ServerMsg::HeartbeatAck
            | ServerMsg::InviteAdmitted { .. } => None,
        }
    }

    /// Decides a redemption of one of our invites: a certificate sealed to the redeemer, or a
    /// denial.
    fn answer_redemption(
        &self,
        cred: &Credential,
        ticket: u32,
        invite: InviteId,
        node_key: NodeKey,
        signing_key: SignerId,
        proof: &InviteProof,
    ) -> ClientMsg {
        let deny = |message: &str| ClientMsg::InviteDeny {
            ticket,
            message: message.into(),
        };
        let Some(network_key) = cred.network_key() else {
            return deny("the inviter no longer holds the network secret");
        };
        if self.member.is_revoked(&node_key) {
            return deny("this node key was removed from the network");
        }
        let decided =
            self.member
                .invites()
                .redeem(&invite, &node_key, &signing_key, proof, now_ms());
        match decided {
            Ok((code, _used_up)) => {
                Counters::bump(&self.counters.invites_redeemed);
                let cert = issue_cert(network_key, node_key, signing_key, invite, now_ms());
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
        &self,
        cred: &Credential,
        notice: &a2a_proto::membership::Signed,
    ) -> Option<SessionEnd> {
        let Ok(n) = RotationNotice::open(notice, &cred.network_id()) else {
            Counters::bump(&self.counters.membership_bad_signature);
            return None;
        };
        let own = x25519_dalek::StaticSecret::from(self.node_private);
        let moved = match n.carry_for(&own) {
            None => {
                return Some(SessionEnd::Refused(
                    "the network rotated its secret without this node: it was removed; ask a \
                     member for a new invite or token"
                        .into(),
                ))
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
            return None;
        };
        // Peers the rotation did not carry stay behind: drop them now.
        let carried: std::collections::HashSet<NodeKey> = n
            .carried
            .iter()
            .map(|c| c.node_key)
            .chain([n.rotator])
            .collect();
        for p in self.dataplane.peers.all() {
            if !carried.contains(&p.key) {
                self.dataplane.peers.remove(&p.key);
            }
        }
        self.member.replace_credential(Arc::new(new_cred), text);
        if let Err(e) = self.member.persist(self.name.clone(), *self.ip.borrow()) {
            tracing::warn!("moved to the rotated network, but cannot save it: {e}");
        }
        Some(SessionEnd::Moved)
    }
}

/// Redeems an invite code at its coordinator: proves the code for this node's key, and opens
/// the inviter's sealed answer (the member certificate) into a credential to register with.
pub async fn redeem_invite(code: &InviteCode, node_private: &[u8; 32]) -> Result<Invited, String> {
    let (mut stream, coordinator) = connect_any(&code.endpoints).await?;
    let est = handshake_initiator(&mut stream, node_private, &code.coordinator_key)
        .await
        .map_err(|e| format!("handshake with coordinator {coordinator} failed: {e}"))?;
    let node_key = NodeKey(
        boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(*node_private))
            .to_bytes(),
    );
    let signing_key = SignerId::from(node_signing_key(node_private).verifying_key());
    let (r, w) = stream.into_split();
    let (mut reader, mut writer) = est.split(r, w);
    writer
        .send(&ClientMsg::Redeem {
            invite: code.id(),
            proof: code.proof(&node_key, &signing_key),
            signing_key,
        })
        .await
        .map_err(|e| format!("coordinator connection lost: {e}"))?;
    let answer = tokio::time::timeout(Duration::from_secs(15), reader.recv::<ServerMsg>())
        .await
        .map_err(|_| "no answer to the invite within 15 s".to_string())?
        .map_err(|e| format!("coordinator closed the connection: {e}"))?;
    let sealed = match answer {
        ServerMsg::InviteAdmitted { sealed } => sealed,
        ServerMsg::Refused { message, .. } => return Err(format!("invite refused: {message}")),
        _ => return Err("unexpected answer from the coordinator".into()),
    };
    let Some(InviteAnswer::Admitted {
        network,
        prefix,
        cert,
    }) = code.open_answer(&node_key, &sealed)
    else {
        return Err(
            "the answer to the invite is not sealed with this invite: refusing it (a forged \
             coordinator?)"
                .into(),
        );
    };
    let invited = Invited {
        coordinator_key: CoordinatorKey(code.coordinator_key),
        endpoints: code.endpoints.clone(),
        prefix,
        network,
        cert,
    };
    // Checks that the certificate is for this node and this network.
    Credential::from_invited(invited.clone(), node_private)?;
    Ok(invited)
}

/// Connects to the first coordinator endpoint that answers.
async fn connect_any(endpoints: &[String]) -> Result<(TcpStream, SocketAddr), String> {
    let mut last = String::from("no endpoint");
    for endpoint in endpoints {
        let addrs = match tokio::net::lookup_host(endpoint.as_str()).await {
            Ok(a) => a.collect::<Vec<_>>(),
            Err(e) => {
                last = format!("cannot resolve {endpoint}: {e}");
                continue;
            }
        };
        for addr in addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => return Ok((s, addr)),
                Ok(Err(e)) => last = format!("cannot connect to coordinator {addr}: {e}"),
                Err(_) => last = format!("coordinator {addr} did not answer"),
            }
        }
    }
    Err(last)
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// This node's local addresses with the WireGuard port (the TUN device's own excluded).
async fn local_addresses(
    netconf: &crate::netconf::NetConf,
    tun_index: u32,
    port: u16,
) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = netconf
        .local_ipv4(Some(tun_index))
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|ip| SocketAddr::new(ip.into(), port))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The candidates a node publishes: its reflexive address first, then its local ones.
fn candidates_from(reflexive: Option<SocketAddr>, locals: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut c: Vec<SocketAddr> = reflexive.into_iter().collect();
    for a in locals {
        if !c.contains(a) {
            c.push(*a);
        }
    }
    c.truncate(a2a_proto::record::MAX_CANDIDATES);
    c
}

/// Refreshes the UDP relay bind every [`BIND_EVERY`]; reports the reflexive address (as the
/// bind's answer shows it) and local addresses whenever they change.
async fn bind_loop(
    dp: Arc<DataPlane>,
    netconf: crate::netconf::NetConf,
    tun_index: u32,
    port: u16,
    link: Arc<RelayLink>,
    relay: (u32, a2a_proto::keys::RelaySecret),
    addrs: watch::Sender<(Option<SocketAddr>, Vec<SocketAddr>)>,
) {
    let mut every = tokio::time::interval(BIND_EVERY);
    loop {
        every.tick().await;
        let answer = dp
            .prober
            .probe(&dp.udp, link.coordinator, Some(relay), 2, PROBE_TIMEOUT)
            .await;
        let was = link.udp_ok.swap(answer.is_some(), Ordering::Relaxed);
        if was != answer.is_some() {
            tracing::info!(
                "relay over {}",
                if answer.is_some() {
                    "UDP"
                } else {
                    "the control connection (UDP to the coordinator gets no answer)"
                }
            );
        }
        let locals = local_addresses(&netconf, tun_index, port).await;
        let reflexive = answer.map(|a| a.observed).or(addrs.borrow().0);
        addrs.send_if_modified(|cur| {
            let new = (reflexive, locals);
            if *cur != new {
                *cur = new;
                true
            } else {
                false
            }
        });
    }
}

fn refused(reason: RefuseReason, message: String) -> SessionEnd {
    match reason {
        RefuseReason::AddressInUse => SessionEnd::AddressInUse,
        RefuseReason::BadProof
        | RefuseReason::BadRecord
        | RefuseReason::Revoked
        | RefuseReason::InviteRefused => SessionEnd::Refused(message),
        RefuseReason::Protocol => SessionEnd::Lost(message),
    }
}

async fn leave_gracefully(
    writer: &mut FrameWriter<OwnedWriteHalf>,
    msgs: &mut mpsc::Receiver<std::io::Result<ServerMsg>>,
) {
    let _ = writer.send(&ClientMsg::Leave).await;
    let _ = writer.shutdown().await;
    // Wait briefly for the coordinator to close, so the leave is processed before we vanish.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(Ok(_)) = msgs.recv().await {}
    })
    .await;
}

/// Owns the connection's reading half: relay data goes to the packet path, messages (and the
/// error that ends the stream) to the session.
async fn read_loop(
    mut reader: FrameReader<OwnedReadHalf>,
    dp: Arc<DataPlane>,
    msgs: mpsc::Sender<std::io::Result<ServerMsg>>,
) {
    let mut buf = TunBatch::new(1);
    loop {
        match reader.recv_frame::<ServerMsg>().await {
            Ok(Incoming::Relay(src, payload)) => {
                dp.receive_relayed_tcp(src, &payload, &mut buf).await
            }
            Ok(Incoming::Msg(m)) => {
                if msgs.send(Ok(m)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = msgs.send(Err(e.into())).await;
                return;
            }
        }
    }
}
