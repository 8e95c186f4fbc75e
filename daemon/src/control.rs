//! The coordinator client: connects over the Noise control channel, proves membership,
//! publishes this node's signed record, applies the verified records of other members to the
//! peer table, heartbeats, and reconnects by itself when the coordinator goes away.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use a2a_proto::control::{ClientMsg, RefuseReason, ServerMsg};
use a2a_proto::keys::REGISTER_CONTEXT;
use a2a_proto::noise_channel::{handshake_initiator, FrameReader, FrameWriter};
use a2a_proto::overlay::derive_ip;
use a2a_proto::udp::{A2aDatagram, MAX_A2A_DATAGRAM};
use a2a_proto::{JoinToken, NetworkKey, NodeRecord};
use data_encoding::BASE64;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::dataplane::{Counters, DataPlane};
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
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// How often the reflexive address is re-checked.
const REPROBE_EVERY: Duration = Duration::from_secs(30);
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
    pub async fn run(
        self,
        mut a2a_rx: mpsc::Receiver<(A2aDatagram, SocketAddr)>,
        mut leave: watch::Receiver<bool>,
    ) {
        let mut backoff = BACKOFF_MIN;
        let mut attempt = 0u32;
        let mut last_issued = 0u64;
        let mut closed_handshakes = 0u32;
        loop {
            let end = self
                .session(&mut a2a_rx, &mut leave, &mut last_issued)
                .await;
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
    async fn discover_reflexive(
        &self,
        coordinator: SocketAddr,
        a2a_rx: &mut mpsc::Receiver<(A2aDatagram, SocketAddr)>,
    ) -> Option<SocketAddr> {
        let nonce: [u8; 8] = rand::random();
        let mut buf = [0u8; MAX_A2A_DATAGRAM];
        let len = A2aDatagram::EndpointProbe { nonce }.encode(&mut buf);
        for _ in 0..3 {
            let _ = self.dataplane.udp.send_to(&buf[..len], coordinator).await;
            let deadline = tokio::time::Instant::now() + PROBE_TIMEOUT;
            while let Ok(Some((msg, from))) = tokio::time::timeout_at(deadline, a2a_rx.recv()).await
            {
                if let A2aDatagram::EndpointReply { nonce: n, observed } = msg {
                    if n == nonce && from == coordinator {
                        return Some(observed);
                    }
                }
            }
        }
        None
    }

    async fn candidates(&self, reflexive: Option<SocketAddr>) -> Vec<SocketAddr> {
        let mut c: Vec<SocketAddr> = reflexive.into_iter().collect();
        if let Ok(local) = self.netconf.local_ipv4(Some(self.tun_index)).await {
            for ip in local {
                let a = SocketAddr::new(ip.into(), self.udp_port);
                if !c.contains(&a) {
                    c.push(a);
                }
            }
        }
        c.truncate(a2a_proto::record::MAX_CANDIDATES);
        c
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
        a2a_rx: &mut mpsc::Receiver<(A2aDatagram, SocketAddr)>,
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
        let est =
            match handshake_initiator(&mut stream, &self.node_private, &self.token.coordinator_key)
                .await
            {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return SessionEnd::Refused(e.to_string())
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return SessionEnd::ClosedInHandshake(format!(
                        "coordinator {coordinator} closed the connection during the handshake"
                    ))
                }
                Err(e) => {
                    return SessionEnd::Lost(format!("handshake with coordinator failed: {e}"))
                }
            };
        let proof = BASE64.encode(&self.network_key.sign(REGISTER_CONTEXT, &est.handshake_hash));
        let (r, w) = stream.into_split();
        let (mut reader, mut writer) = est.split(r, w);

        let mut reflexive = self.discover_reflexive(coordinator, a2a_rx).await;
        let record = self.record(self.candidates(reflexive).await, last_issued);
        let register = ClientMsg::Register {
            network: self.network_key.id(),
            proof,
            record,
        };
        if let Err(e) = writer.send(&register).await {
            return SessionEnd::Lost(format!("sending registration failed: {e}"));
        }
        let heartbeat_s = match reader.recv::<ServerMsg>().await {
            Ok(ServerMsg::Registered { heartbeat_s }) => heartbeat_s.clamp(1, 300),
            Ok(ServerMsg::Refused { reason, message }) => return refused(reason, message),
            Ok(_) => return SessionEnd::Lost("unexpected first reply from coordinator".into()),
            Err(e) => return SessionEnd::Lost(format!("coordinator closed the connection: {e}")),
        };
        let ip = *self.ip.borrow();
        tracing::info!("registered with the coordinator as {} ({ip})", self.name);
        let _ = self.status.send(Registration::Registered { ip });

        let mut heartbeat = tokio::time::interval(Duration::from_secs(heartbeat_s.into()));
        heartbeat.tick().await;
        let mut reprobe = tokio::time::interval(REPROBE_EVERY);
        reprobe.tick().await;
        loop {
            tokio::select! {
                msg = reader.recv::<ServerMsg>() => match msg {
                    Ok(msg) => {
                        if let Some(end) = self.handle(msg).await {
                            return end;
                        }
                    }
                    Err(e) => return SessionEnd::Lost(format!("coordinator connection lost: {e}")),
                },
                _ = heartbeat.tick() => {
                    if let Err(e) = writer.send(&ClientMsg::Heartbeat).await {
                        return SessionEnd::Lost(format!("heartbeat failed: {e}"));
                    }
                }
                _ = reprobe.tick() => {
                    let now = self.discover_reflexive(coordinator, a2a_rx).await;
                    if now.is_some() && now != reflexive {
                        reflexive = now;
                        let record = self.record(self.candidates(reflexive).await, last_issued);
                        if let Err(e) = writer.send(&ClientMsg::Update { record }).await {
                            return SessionEnd::Lost(format!("update failed: {e}"));
                        }
                    }
                }
                _ = leave.changed() => {
                    leave_gracefully(&mut writer, &mut reader).await;
                    return SessionEnd::Left;
                }
            }
        }
    }

    /// Applies one message from the coordinator; `Some` ends the session.
    async fn handle(&self, msg: ServerMsg) -> Option<SessionEnd> {
        match msg {
            ServerMsg::PeerUp { record } => {
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
                match self.dataplane.peers.apply(verified) {
                    Applied::Added => {
                        if let Some(peer) = self.dataplane.peers.by_key(&key) {
                            tracing::info!("peer {} ({}) joined", peer.info().name, peer.ip());
                            self.dataplane.initiate(&peer).await;
                        }
                    }
                    Applied::Updated | Applied::IsSelf => {}
                    Applied::Stale | Applied::AddressConflict => {
                        Counters::bump(&self.counters.records_dropped);
                    }
                }
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

fn refused(reason: RefuseReason, message: String) -> SessionEnd {
    match reason {
        RefuseReason::AddressInUse => SessionEnd::AddressInUse,
        RefuseReason::BadProof | RefuseReason::BadRecord => SessionEnd::Refused(message),
        RefuseReason::Protocol => SessionEnd::Lost(message),
    }
}

async fn leave_gracefully(
    writer: &mut FrameWriter<OwnedWriteHalf>,
    reader: &mut FrameReader<OwnedReadHalf>,
) {
    let _ = writer.send(&ClientMsg::Leave).await;
    let _ = writer.shutdown().await;
    // Wait briefly for the coordinator to close, so the leave is processed before we vanish.
    let _ = tokio::time::timeout(Duration::from_millis(500), reader.recv::<ServerMsg>()).await;
}
