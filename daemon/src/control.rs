//! The coordinator client: connects over the Noise control channel, proves membership,
//! publishes this node's signed record, applies the verified records of other members to the
//! peer table, heartbeats, and reconnects by itself when the coordinator goes away.
//!
//! While registered it also keeps the relay link: a UDP bind every [`BIND_EVERY`] (which also
//! re-learns the reflexive address, so a roaming node republishes its candidates), relay frames
//! over the connection when UDP binds go unanswered, and punch requests to and from peers.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::atomic::Ordering;

use a2a_proto::control::{ClientMsg, RefuseReason, ServerMsg};
use a2a_proto::keys::REGISTER_CONTEXT;
use a2a_proto::noise_channel::{handshake_initiator, FrameReader, FrameWriter, Incoming};
use a2a_proto::overlay::derive_ip;
use a2a_proto::{JoinToken, NetworkKey, NodeRecord};
use data_encoding::BASE64;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::dataplane::{ControlOut, Counters, DataPlane, RelayLink, TunBatch};
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
    pub token: JoinToken,
    pub network_key: NetworkKey,
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
}

/// Handshakes closed in a row before the token's coordinator key is declared wrong.
const MAX_CLOSED_HANDSHAKES: u32 = 3;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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
                    let ip = derive_ip(self.token.prefix, &self.node_key(), attempt);
                    tracing::info!("overlay address taken by another node; moving to {ip}");
                    if let Err(e) = self
                        .netconf
                        .configure(self.tun_index, ip, self.token.prefix.prefix_len())
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
        let mut last = String::from("no endpoint");
        for endpoint in &self.token.endpoints {
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
        candidates: Vec<SocketAddr>,
        last_issued: &mut u64,
    ) -> a2a_proto::SignedRecord {
        let issued_ms = now_ms().max(*last_issued + 1);
        *last_issued = issued_ms;
        NodeRecord {
            node_key: self.node_key(),
            name: self.name.clone(),
            ip: *self.ip.borrow(),
            candidates,
            issued_ms,
        }
        .sign(&self.network_key)
    }

    async fn session(
        &self,
        leave: &mut watch::Receiver<bool>,
        last_issued: &mut u64,
    ) -> SessionEnd {
        if *leave.borrow() {
            return SessionEnd::Left;
        }
        let (mut stream, coordinator) = match self.connect().await {
            Ok(x) => x,
            Err(e) => return SessionEnd::Lost(e),
        };
        let _ = stream.set_nodelay(true);
        // UDP discovery runs during the handshake: without UDP it costs no extra time.
        let (handshake, reflexive) = tokio::join!(
            handshake_initiator(&mut stream, &self.node_private, &self.token.coordinator_key),
            self.discover_reflexive(coordinator)
        );
        let est = match handshake {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return SessionEnd::Refused(e.to_string())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return SessionEnd::ClosedInHandshake(format!(
                    "coordinator {coordinator} closed the connection during the handshake"
                ))
            }
            Err(e) => return SessionEnd::Lost(format!("handshake with coordinator failed: {e}")),
        };
        let proof = BASE64.encode(&self.network_key.sign(REGISTER_CONTEXT, &est.handshake_hash));
        let (r, w) = stream.into_split();
        let (mut reader, mut writer) = est.split(r, w);

        let locals = local_addresses(&self.netconf, self.tun_index, self.udp_port).await;
        let mut published = candidates_from(reflexive, &locals);
        let record = self.record(published.clone(), last_issued);
        let register = ClientMsg::Register {
            network: self.network_key.id(),
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
        let Some(relay_secret) = BASE64
            .decode(relay_secret.as_bytes())
            .ok()
            .and_then(|v| <[u8; 16]>::try_from(v).ok())
        else {
            return SessionEnd::Lost("coordinator sent a malformed relay secret".into());
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
                            if let Some(end) = self.handle(msg).await {
                                break end;
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
                        let record = self.record(candidates, last_issued);
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

    /// Applies one message from the coordinator; `Some` ends the session.
    async fn handle(&self, msg: ServerMsg) -> Option<SessionEnd> {
        match msg {
            ServerMsg::PeerUp { record, relay_id } => {
                let verified = match record.verify(&self.network_key.id()) {
                    Ok(r) => r,
                    Err(e) => {
                        // The coordinator cannot forge members: drop and count.
                        tracing::warn!("dropped a peer record: {e}");
                        Counters::bump(&self.counters.records_dropped);
                        return None;
                    }
                };
                if !self.token.prefix.contains(&verified.ip) {
                    Counters::bump(&self.counters.records_dropped);
                    return None;
                }
                let key = verified.node_key;
                let applied = self.dataplane.peers.apply(verified);
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
                    Applied::Stale | Applied::AddressConflict | Applied::LowOrderKey => {
                        Counters::bump(&self.counters.records_dropped);
                    }
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
            ServerMsg::Refused { reason, message } => Some(refused(reason, message)),
            ServerMsg::Registered { .. } | ServerMsg::HeartbeatAck => None,
        }
    }
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
    relay: (u32, [u8; 16]),
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
        RefuseReason::BadProof | RefuseReason::BadRecord => SessionEnd::Refused(message),
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
                let _ = msgs.send(Err(e)).await;
                return;
            }
        }
    }
}
