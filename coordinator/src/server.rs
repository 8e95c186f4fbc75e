//! The coordinator's sockets: TCP control connections and the UDP endpoint-discovery port.
//!
//! Zero-log by construction: nothing here formats a key, name, address or record. The only
//! output is aggregate counters.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use a2a_proto::control::{ClientMsg, RefuseReason, ServerMsg};
use a2a_proto::noise_channel::{handshake_responder, FrameWriter};
use a2a_proto::udp::{classify, A2aDatagram, DatagramKind, MAX_A2A_DATAGRAM};
use a2a_proto::NodeKey;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::registry::{ConnId, Outbox, RegisterRequest, Registry};

/// How often nodes heartbeat, and how long a silent registration lives.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
pub const REGISTRATION_TTL: Duration = Duration::from_secs(35);
/// A connection must register within this long after connecting.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most control connections at once.
const MAX_CONNECTIONS: u64 = 50_000;
/// Messages queued for one slow connection before it is dropped.
const OUTBOX_DEPTH: usize = 4096;

/// Counts of what happened, printed as numbers only.
#[derive(Default)]
pub struct Counters {
    pub tcp_accepted: AtomicU64,
    pub tcp_refused_over_cap: AtomicU64,
    pub tcp_bad_handshake: AtomicU64,
    pub tcp_bad_message: AtomicU64,
    pub registrations: AtomicU64,
    pub registrations_refused: AtomicU64,
    pub udp_endpoint_probes: AtomicU64,
    pub udp_dropped: AtomicU64,
    open_connections: AtomicU64,
}

impl Counters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "tcp_accepted={} tcp_refused_over_cap={} tcp_bad_handshake={} tcp_bad_message={} \
             registrations={} registrations_refused={} udp_endpoint_probes={} udp_dropped={}",
            g(&self.tcp_accepted),
            g(&self.tcp_refused_over_cap),
            g(&self.tcp_bad_handshake),
            g(&self.tcp_bad_message),
            g(&self.registrations),
            g(&self.registrations_refused),
            g(&self.udp_endpoint_probes),
            g(&self.udp_dropped),
        )
    }
}

/// The registry plus the outboxes of live connections.
struct Hub {
    registry: Registry,
    outboxes: HashMap<ConnId, mpsc::Sender<ServerMsg>>,
}

impl Hub {
    fn deliver(&mut self, out: Outbox) {
        for (conn, msg) in out {
            if let Some(tx) = self.outboxes.get(&conn) {
                if tx.try_send(msg).is_err() {
                    // Too slow or gone: dropping its sender closes the connection's writer.
                    self.outboxes.remove(&conn);
                }
            }
        }
    }
}

pub struct Server {
    hub: Mutex<Hub>,
    private_key: [u8; 32],
    pub counters: Counters,
    next_conn: AtomicU64,
}

impl Server {
    pub fn new(private_key: [u8; 32]) -> Arc<Self> {
        Arc::new(Server {
            hub: Mutex::new(Hub {
                registry: Registry::new(HEARTBEAT, REGISTRATION_TTL),
                outboxes: HashMap::new(),
            }),
            private_key,
            counters: Counters::default(),
            next_conn: AtomicU64::new(1),
        })
    }

    fn hub(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves until an I/O error on a listening socket.
    pub async fn run(self: Arc<Self>, tcp: TcpListener, udp: UdpSocket) -> io::Result<()> {
        let udp_task = tokio::spawn(self.clone().serve_udp(udp));
        let expiry_task = tokio::spawn(self.clone().expire_loop());
        let stats_task = tokio::spawn(self.clone().stats_loop());
        let res = self.accept_loop(tcp).await;
        udp_task.abort();
        expiry_task.abort();
        stats_task.abort();
        res
    }

    async fn accept_loop(self: Arc<Self>, tcp: TcpListener) -> io::Result<()> {
        loop {
            let (stream, _peer) = match tcp.accept().await {
                Ok(x) => x,
                // Out of file descriptors and the like: back off, keep serving.
                Err(e) if is_transient_accept_error(&e) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if self.counters.open_connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                Counters::bump(&self.counters.tcp_refused_over_cap);
                continue;
            }
            Counters::bump(&self.counters.tcp_accepted);
            self.counters
                .open_connections
                .fetch_add(1, Ordering::Relaxed);
            let server = self.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                server.clone().serve_connection(stream).await;
                server
                    .counters
                    .open_connections
                    .fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    async fn serve_connection(self: Arc<Self>, mut stream: TcpStream) {
        let established = match handshake_responder(&mut stream, &self.private_key).await {
            Ok(e) => e,
            Err(_) => {
                Counters::bump(&self.counters.tcp_bad_handshake);
                return;
            }
        };
        let conn_key = NodeKey(established.remote_static);
        let hash = established.handshake_hash.clone();
        let (read, write) = stream.into_split();
        let (mut reader, writer) = established.split(read, write);
        let conn: ConnId = self.next_conn.fetch_add(1, Ordering::Relaxed);

        // The first message must be a valid registration.
        let first = tokio::time::timeout(REGISTER_TIMEOUT, reader.recv::<ClientMsg>()).await;
        let (tx, rx) = mpsc::channel(OUTBOX_DEPTH);
        let writer_task = tokio::spawn(write_loop(writer, rx));
        let registered = match first {
            Ok(Ok(ClientMsg::Register {
                network,
                proof,
                record,
            })) => {
                let mut hub = self.hub();
                hub.outboxes.insert(conn, tx.clone());
                match hub.registry.register(
                    Instant::now(),
                    conn,
                    RegisterRequest {
                        conn_key,
                        handshake_hash: &hash,
                        network,
                        proof: &proof,
                        record,
                    },
                ) {
                    Ok(out) => {
                        hub.deliver(out);
                        Counters::bump(&self.counters.registrations);
                        true
                    }
                    Err((reason, message)) => {
                        hub.outboxes.remove(&conn);
                        Counters::bump(&self.counters.registrations_refused);
                        let _ = tx.try_send(ServerMsg::Refused { reason, message });
                        false
                    }
                }
            }
            Ok(Ok(_)) => {
                Counters::bump(&self.counters.tcp_bad_message);
                let _ = tx.try_send(ServerMsg::Refused {
                    reason: RefuseReason::Protocol,
                    message: "the first message must be a registration".into(),
                });
                false
            }
            _ => {
                Counters::bump(&self.counters.tcp_bad_message);
                false
            }
        };
        drop(tx);
        if registered {
            loop {
                let msg = match reader.recv::<ClientMsg>().await {
                    Ok(m) => m,
                    Err(e) => {
                        if e.kind() == io::ErrorKind::InvalidData {
                            Counters::bump(&self.counters.tcp_bad_message);
                        }
                        break;
                    }
                };
                let mut hub = self.hub();
                match msg {
                    ClientMsg::Heartbeat => {
                        if !hub.registry.heartbeat(Instant::now(), conn) {
                            break; // replaced by a newer connection or expired
                        }
                        hub.deliver(vec![(conn, ServerMsg::HeartbeatAck)]);
                    }
                    ClientMsg::Update { record } => {
                        match hub.registry.update(Instant::now(), conn, record) {
                            Ok(out) => hub.deliver(out),
                            Err((reason, message)) => {
                                Counters::bump(&self.counters.registrations_refused);
                                hub.deliver(vec![(conn, ServerMsg::Refused { reason, message })]);
                            }
                        }
                    }
                    ClientMsg::Leave => break,
                    ClientMsg::Register { .. } => {
                        Counters::bump(&self.counters.tcp_bad_message);
                        break;
                    }
                }
                if !hub.outboxes.contains_key(&conn) {
                    break; // dropped as too slow
                }
            }
            let mut hub = self.hub();
            let out = hub.registry.disconnect(conn);
            hub.outboxes.remove(&conn);
            hub.deliver(out);
        }
        // The writer ends once every sender is gone and the queue is flushed.
        let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
    }

    async fn serve_udp(self: Arc<Self>, udp: UdpSocket) {
        let mut buf = vec![0u8; 2048];
        let mut reply = [0u8; MAX_A2A_DATAGRAM];
        loop {
            let (n, src) = match udp.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(_) => {
                    // ICMP errors surface here on Linux; nothing to do but go on.
                    Counters::bump(&self.counters.udp_dropped);
                    continue;
                }
            };
            let datagram = &buf[..n];
            match (classify(datagram), A2aDatagram::decode(datagram)) {
                (DatagramKind::A2a, Some(A2aDatagram::EndpointProbe { nonce })) => {
                    Counters::bump(&self.counters.udp_endpoint_probes);
                    let len = A2aDatagram::EndpointReply {
                        nonce,
                        observed: canonical(src),
                    }
                    .encode(&mut reply);
                    let _ = udp.send_to(&reply[..len], src).await;
                }
                _ => Counters::bump(&self.counters.udp_dropped),
            }
        }
    }

    async fn expire_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let mut hub = self.hub();
            let (out, closed) = hub.registry.expire(Instant::now());
            for conn in closed {
                hub.outboxes.remove(&conn);
            }
            hub.deliver(out);
        }
    }

    async fn stats_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tick.tick().await;
            let (members, networks) = {
                let hub = self.hub();
                (hub.registry.member_count(), hub.registry.network_count())
            };
            tracing::info!(
                "live members={members} networks={networks} {}",
                self.counters.summary()
            );
        }
    }
}

async fn write_loop(
    mut writer: FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    mut rx: mpsc::Receiver<ServerMsg>,
) {
    while let Some(msg) = rx.recv().await {
        if writer.send(&msg).await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

/// An IPv4-mapped IPv6 source (dual-stack socket) reported as plain IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    ) || e.kind() == io::ErrorKind::ConnectionAborted
        || e.kind() == io::ErrorKind::ConnectionReset
}
