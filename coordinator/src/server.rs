//! The coordinator's sockets: TCP control connections (which also carry relay frames for nodes
//! without UDP), the UDP port (endpoint discovery, relay binds, UDP relay) and the mapping-check
//! port (discovery only).
//!
//! Zero-log by construction: nothing here formats a key, name, address or record. The only
//! output is aggregate counters.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use a2a_proto::addr::canonical;
use a2a_proto::control::{ClientMsg, RefuseReason, ServerMsg};
use a2a_proto::keys::RelaySecret;
use a2a_proto::noise_channel::{handshake_responder, FrameError, FrameWriter, Incoming};
use a2a_proto::sync::lock;
use a2a_proto::udp::{
    classify, parse_relay_data, write_relay_header, A2aDatagram, DatagramKind, MAX_A2A_DATAGRAM,
    RELAY_HEADER_LEN,
};
use a2a_proto::{NetworkId, NodeKey, SignedRecord};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::limits::{Admission, Drops, Limits, Ticket};
use crate::registry::{ConnId, Outbox, RegisterRequest, Registry};
use crate::relay::{Dest, RelayDrop, RelayTable};

/// How often nodes heartbeat, and how long a silent registration lives.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
pub const REGISTRATION_TTL: Duration = Duration::from_secs(35);
/// How often the counters line is printed unless told otherwise.
pub const STATS_EVERY: Duration = Duration::from_secs(60);
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
    pub relay_binds: AtomicU64,
    pub relay_bad_binds: AtomicU64,
    pub relayed_udp: AtomicU64,
    pub relayed_tcp: AtomicU64,
    pub relay_unknown_source: AtomicU64,
    pub relay_unknown_destination: AtomicU64,
    pub relay_foreign_network: AtomicU64,
    pub relay_rate_limited: AtomicU64,
    pub relay_queue_full: AtomicU64,
    pub punches: AtomicU64,
    pub redemptions: AtomicU64,
    pub redemptions_refused: AtomicU64,
    pub revocations: AtomicU64,
}

impl Counters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "tcp_accepted={} tcp_refused_over_cap={} tcp_bad_handshake={} tcp_bad_message={} \
             registrations={} registrations_refused={} udp_endpoint_probes={} udp_dropped={} \
             relay_binds={} relay_bad_binds={} relayed_udp={} relayed_tcp={} \
             relay_unknown_source={} relay_unknown_destination={} relay_foreign_network={} \
             relay_rate_limited={} relay_queue_full={} punches={} redemptions={} \
             redemptions_refused={} revocations={}",
            g(&self.tcp_accepted),
            g(&self.tcp_refused_over_cap),
            g(&self.tcp_bad_handshake),
            g(&self.tcp_bad_message),
            g(&self.registrations),
            g(&self.registrations_refused),
            g(&self.udp_endpoint_probes),
            g(&self.udp_dropped),
            g(&self.relay_binds),
            g(&self.relay_bad_binds),
            g(&self.relayed_udp),
            g(&self.relayed_tcp),
            g(&self.relay_unknown_source),
            g(&self.relay_unknown_destination),
            g(&self.relay_foreign_network),
            g(&self.relay_rate_limited),
            g(&self.relay_queue_full),
            g(&self.punches),
            g(&self.redemptions),
            g(&self.redemptions_refused),
            g(&self.revocations),
        )
    }

    fn dropped(&self, why: RelayDrop) {
        Counters::bump(match why {
            RelayDrop::UnknownSource => &self.relay_unknown_source,
            RelayDrop::UnknownDestination => &self.relay_unknown_destination,
            RelayDrop::ForeignNetwork => &self.relay_foreign_network,
            RelayDrop::RateLimited => &self.relay_rate_limited,
            RelayDrop::BadBind => &self.relay_bad_binds,
        });
    }
}

/// A hook for tests only: a test binary (the forging coordinator in `netns-tests`) wraps the
/// real server and injects what an attacker holding the hub would send, to show that members
/// refuse it. The `a2a-coordinator` binary never installs one.
pub trait Tamper: Send + Sync + 'static {
    /// Called once a node registered in `network` with `record`; each injection returned is
    /// sent to the member of `network` with that node key (the new node or any other), after
    /// the genuine registration messages.
    fn after_register(
        &self,
        network: &NetworkId,
        record: &SignedRecord,
    ) -> Vec<(NodeKey, Injected)>;
}

/// What a [`Tamper`] hook sends to a node.
pub enum Injected {
    Msg(ServerMsg),
    /// A datagram framed as relay data from relay id `from`, over the control connection.
    Relay {
        from: u32,
        datagram: Vec<u8>,
    },
}

/// What a connection's writer task sends: a message, or relay data from a relay id.
enum Outgoing {
    Msg(ServerMsg),
    Relay(u32, Vec<u8>),
}

type ConnTx = mpsc::Sender<Outgoing>;

/// The registry plus the outboxes of live connections.
struct Hub {
    registry: Registry,
    outboxes: HashMap<ConnId, ConnTx>,
}

impl Hub {
    fn deliver(&mut self, out: Outbox) {
        for (conn, msg) in out {
            if let Some(tx) = self.outboxes.get(&conn) {
                if tx.try_send(Outgoing::Msg(msg)).is_err() {
                    // Too slow or gone: dropping its sender closes the connection's writer.
                    self.outboxes.remove(&conn);
                }
            }
        }
    }
}

pub struct Server {
    hub: Mutex<Hub>,
    /// Kept apart from the hub so relayed packets never wait for registrations.
    relay: Mutex<RelayTable<ConnTx>>,
    /// The main UDP socket, for relaying what arrives over TCP to nodes bound over UDP.
    udp: std::sync::OnceLock<Arc<UdpSocket>>,
    private_key: [u8; 32],
    pub counters: Counters,
    tamper: std::sync::OnceLock<Arc<dyn Tamper>>,
    next_conn: std::sync::atomic::AtomicU32,
    /// Per-source and global connection accounting (see [`crate::limits`]).
    admission: Mutex<Admission>,
    limits: Limits,
    /// What the limits dropped, by reason.
    pub limited: Drops,
    stats_every: Duration,
}

/// An admitted connection's place in the accounting, given back when the task ends.
struct Permit {
    server: Arc<Server>,
    ticket: Option<Ticket>,
}

impl Permit {
    fn registered(&mut self) {
        if let Some(t) = self.ticket.as_mut() {
            self.server.admission().registered(t);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.server.admission().closed(t);
        }
    }
}

impl Server {
    pub fn new(private_key: [u8; 32]) -> Arc<Self> {
        Server::with_limits(private_key, Limits::default(), STATS_EVERY)
    }

    /// A server with the given limits, printing its counters every `stats_every`.
    pub fn with_limits(private_key: [u8; 32], limits: Limits, stats_every: Duration) -> Arc<Self> {
        Arc::new(Server {
            hub: Mutex::new(Hub {
                registry: Registry::new(HEARTBEAT, REGISTRATION_TTL),
                outboxes: HashMap::new(),
            }),
            relay: Mutex::new(RelayTable::default()),
            udp: std::sync::OnceLock::new(),
            private_key,
            counters: Counters::default(),
            tamper: std::sync::OnceLock::new(),
            next_conn: std::sync::atomic::AtomicU32::new(1),
            admission: Mutex::new(Admission::new(limits.clone(), Instant::now())),
            limits,
            limited: Drops::default(),
            stats_every,
        })
    }

    /// Installs a test hook (see [`Tamper`]); only test binaries call this.
    pub fn set_tamper(&self, tamper: Arc<dyn Tamper>) {
        let _ = self.tamper.set(tamper);
    }

    fn admission(&self) -> std::sync::MutexGuard<'_, Admission> {
        lock(&self.admission)
    }

    fn hub(&self) -> std::sync::MutexGuard<'_, Hub> {
        lock(&self.hub)
    }

    fn relay(&self) -> std::sync::MutexGuard<'_, RelayTable<ConnTx>> {
        lock(&self.relay)
    }

    /// A new connection id: never 0, never one in use (ids wrap after 2^32 connections).
    fn new_conn_id(&self) -> ConnId {
        loop {
            let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !self.hub().outboxes.contains_key(&id) {
                return id;
            }
        }
    }

    /// Serves until an I/O error on a listening socket.
    pub async fn run(
        self: Arc<Self>,
        tcp: TcpListener,
        udp: UdpSocket,
        udp_alt: Option<UdpSocket>,
    ) -> io::Result<()> {
        let udp = Arc::new(udp);
        let _ = self.udp.set(udp.clone());
        let mut tasks = vec![
            tokio::spawn(self.clone().serve_udp(udp, true)),
            tokio::spawn(self.clone().expire_loop()),
            tokio::spawn(self.clone().stats_loop()),
        ];
        if let Some(alt) = udp_alt {
            tasks.push(tokio::spawn(self.clone().serve_udp(Arc::new(alt), false)));
        }
        let res = self.accept_loop(tcp).await;
        for t in tasks {
            t.abort();
        }
        res
    }

    /// Accepting and refusing run on a thread of their own: a refusal never waits behind the
    /// handshakes (Diffie-Hellman) and relaying the runtime's workers are busy with, so the
    /// listen queue keeps draining under a flood and a new node's connection is not dropped in
    /// the kernel. Admitted connections are served on the runtime.
    async fn accept_loop(self: Arc<Self>, tcp: TcpListener) -> io::Result<()> {
        let listener = tcp.into_std()?;
        listener.set_nonblocking(false)?;
        let rt = tokio::runtime::Handle::current();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || {
                let _ = done_tx.send(self.accept_thread(&listener, &rt));
            })?;
        Err(done_rx
            .await
            .unwrap_or_else(|_| io::Error::other("the accept thread ended")))
    }

    /// Runs until a fatal error on the listening socket, which it returns.
    fn accept_thread(
        self: Arc<Self>,
        tcp: &std::net::TcpListener,
        rt: &tokio::runtime::Handle,
    ) -> io::Error {
        loop {
            let (stream, peer) = match tcp.accept() {
                Ok(x) => x,
                // Out of file descriptors and the like: back off, keep serving.
                Err(e) if is_transient_accept_error(&e) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => return e,
            };
            let admitted = self.admission().admit_tcp(Instant::now(), peer.ip());
            let ticket = match admitted {
                Ok(t) => t,
                Err(why) => {
                    if why == crate::limits::Refusal::Full {
                        Counters::bump(&self.counters.tcp_refused_over_cap);
                    }
                    self.limited.refused(why);
                    reset(&stream);
                    continue;
                }
            };
            Counters::bump(&self.counters.tcp_accepted);
            let mut permit = Permit {
                server: self.clone(),
                ticket: Some(ticket),
            };
            let server = self.clone();
            rt.spawn(async move {
                let stream = stream
                    .set_nonblocking(true)
                    .and_then(|()| TcpStream::from_std(stream));
                if let Ok(stream) = stream {
                    let _ = stream.set_nodelay(true);
                    server.serve_connection(stream, &mut permit).await;
                }
            });
        }
    }

    async fn serve_connection(self: Arc<Self>, mut stream: TcpStream, permit: &mut Permit) {
        // The handshake and the registration together get one deadline (slow-loris).
        let deadline = tokio::time::Instant::now() + self.limits.register_deadline;
        let handshake = handshake_responder(&mut stream, &self.private_key);
        let established = match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(e)) => e,
            Ok(Err(_)) => {
                Counters::bump(&self.counters.tcp_bad_handshake);
                return;
            }
            Err(_) => {
                Drops::bump(&self.limited.tcp_register_deadline);
                reset(&stream);
                return;
            }
        };
        let conn_key = NodeKey(established.remote_static);
        let hash = established.handshake_hash.clone();
        let (read, write) = stream.into_split();
        let (mut reader, writer) = established.split(read, write);
        let conn: ConnId = self.new_conn_id();

        // The first message must be a valid registration.
        let first = tokio::time::timeout_at(deadline, reader.recv::<ClientMsg>()).await;
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
                let secret = RelaySecret(rand::random());
                let tampered = self
                    .tamper
                    .get()
                    .map(|t| t.after_register(&network, &record));
                match hub.registry.register(
                    Instant::now(),
                    conn,
                    RegisterRequest {
                        conn_key,
                        handshake_hash: &hash,
                        network,
                        proof,
                        record,
                        relay_secret: secret,
                    },
                ) {
                    Ok(out) => {
                        self.relay()
                            .insert(Instant::now(), conn, network, secret, tx.clone());
                        hub.deliver(out);
                        for (to, injected) in tampered.into_iter().flatten() {
                            let Some(out) = hub
                                .registry
                                .conn_of(&network, &to)
                                .and_then(|c| hub.outboxes.get(&c))
                            else {
                                continue;
                            };
                            let _ = out.try_send(match injected {
                                Injected::Msg(m) => Outgoing::Msg(m),
                                Injected::Relay { from, datagram } => {
                                    Outgoing::Relay(from, datagram)
                                }
                            });
                        }
                        Counters::bump(&self.counters.registrations);
                        permit.registered();
                        true
                    }
                    Err((reason, message)) => {
                        hub.outboxes.remove(&conn);
                        Counters::bump(&self.counters.registrations_refused);
                        let _ = tx.try_send(Outgoing::Msg(ServerMsg::Refused { reason, message }));
                        false
                    }
                }
            }
            Ok(Ok(ClientMsg::Redeem {
                invite,
                signing_key,
                proof,
            })) => {
                // A node with an invite code: pass the redemption to its inviter, deliver the
                // answer, then the node reconnects to register with its new certificate.
                {
                    let mut hub = self.hub();
                    hub.outboxes.insert(conn, tx.clone());
                    match hub.registry.redeem(
                        Instant::now(),
                        conn,
                        conn_key,
                        invite,
                        signing_key,
                        proof,
                    ) {
                        Ok(out) => {
                            Counters::bump(&self.counters.redemptions);
                            hub.deliver(out);
                        }
                        Err((reason, message)) => {
                            Counters::bump(&self.counters.redemptions_refused);
                            hub.deliver(vec![(conn, ServerMsg::Refused { reason, message })]);
                        }
                    }
                }
                drop(tx);
                // Wait for the redeemer to read its answer and close (or the deadline).
                let _ = tokio::time::timeout(
                    crate::registry::REDEEM_TIMEOUT + Duration::from_secs(2),
                    reader.recv::<ClientMsg>(),
                )
                .await;
                {
                    let mut hub = self.hub();
                    hub.registry.disconnect(conn);
                    hub.outboxes.remove(&conn);
                }
                let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
                return;
            }
            Ok(Ok(_)) => {
                Counters::bump(&self.counters.tcp_bad_message);
                let _ = tx.try_send(Outgoing::Msg(ServerMsg::Refused {
                    reason: RefuseReason::Protocol,
                    message: "the first message must be a registration".into(),
                }));
                false
            }
            Err(_) => {
                Drops::bump(&self.limited.tcp_register_deadline);
                false
            }
            Ok(Err(_)) => {
                Counters::bump(&self.counters.tcp_bad_message);
                false
            }
        };
        drop(tx);
        if registered {
            let mut budget = self.limits.message_budget(Instant::now());
            loop {
                let msg = match reader.recv_frame::<ClientMsg>().await {
                    Ok(Incoming::Msg(m)) => {
                        self.pace(&mut budget).await;
                        m
                    }
                    Ok(Incoming::Relay(dst, payload)) => {
                        self.relay_from_conn(conn, dst, payload).await;
                        continue;
                    }
                    Err(e) => {
                        if matches!(e, FrameError::Malformed(_)) {
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
                    ClientMsg::Punch { to } => {
                        if let Some(out) = hub.registry.punch(conn, &to) {
                            Counters::bump(&self.counters.punches);
                            hub.deliver(out);
                        }
                    }
                    ClientMsg::Register { .. } | ClientMsg::Redeem { .. } => {
                        Counters::bump(&self.counters.tcp_bad_message);
                        break;
                    }
                    ClientMsg::InviteOpen { id } => {
                        if hub.registry.invite_open(conn, id).is_err() {
                            Counters::bump(&self.counters.tcp_bad_message);
                        }
                    }
                    ClientMsg::InviteClose { id } => hub.registry.invite_close(conn, &id),
                    ClientMsg::InviteAdmit { ticket, sealed } => {
                        let answer = ServerMsg::InviteAdmitted { sealed };
                        match hub.registry.invite_answer(conn, ticket, answer) {
                            Some(out) => hub.deliver(out),
                            None => Counters::bump(&self.counters.tcp_bad_message),
                        }
                    }
                    ClientMsg::InviteDeny { ticket, message } => {
                        let answer = ServerMsg::Refused {
                            reason: RefuseReason::InviteRefused,
                            message,
                        };
                        match hub.registry.invite_answer(conn, ticket, answer) {
                            Some(out) => hub.deliver(out),
                            None => Counters::bump(&self.counters.tcp_bad_message),
                        }
                    }
                    ClientMsg::Revoke { revocation } => match hub.registry.revoke(conn, revocation)
                    {
                        Ok((out, removed)) => {
                            hub.deliver(out);
                            if let Some(gone) = removed {
                                Counters::bump(&self.counters.revocations);
                                hub.deliver(vec![(
                                    gone,
                                    ServerMsg::Refused {
                                        reason: RefuseReason::Revoked,
                                        message: "this node was removed from the network \
                                                  (a2actl kick)"
                                            .into(),
                                    },
                                )]);
                                // Its writer flushes the refusal, then the connection ends.
                                hub.outboxes.remove(&gone);
                                self.relay().remove(gone);
                            }
                        }
                        Err(_) => Counters::bump(&self.counters.tcp_bad_message),
                    },
                    ClientMsg::Rotate { notice } => match hub.registry.rotate(conn, notice) {
                        Ok(out) => hub.deliver(out),
                        Err(_) => Counters::bump(&self.counters.tcp_bad_message),
                    },
                }
                if !hub.outboxes.contains_key(&conn) {
                    break; // dropped as too slow
                }
            }
            let mut hub = self.hub();
            let out = hub.registry.disconnect(conn);
            hub.outboxes.remove(&conn);
            hub.deliver(out);
            self.relay().remove(conn);
        }
        // The writer ends once every sender is gone and the queue is flushed.
        let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
    }

    /// Holds a connection's reader to its message rate: reading no further while it waits
    /// pushes back on the sender through TCP.
    async fn pace(&self, budget: &mut crate::limits::TokenBucket) {
        let wait = budget.delay(Instant::now());
        if !wait.is_zero() {
            Drops::bump(&self.limited.ctl_msgs_throttled);
            tokio::time::sleep(wait).await;
        }
    }

    /// Relay data that came over connection `conn`'s control channel.
    async fn relay_from_conn(&self, conn: ConnId, dst: u32, payload: Vec<u8>) {
        let dest = self.relay().route_conn(Instant::now(), conn, dst);
        match dest {
            Ok(Dest::Udp(addr)) => {
                let mut d = vec![0u8; RELAY_HEADER_LEN + payload.len()];
                write_relay_header(&mut d, conn);
                d[RELAY_HEADER_LEN..].copy_from_slice(&payload);
                if let Some(udp) = self.udp.get() {
                    let _ = udp.send_to(&d, addr).await;
                    Counters::bump(&self.counters.relayed_tcp);
                }
            }
            Ok(Dest::Conn(tx)) => self.forward_over_conn(&tx, conn, payload),
            Err(why) => self.counters.dropped(why),
        }
    }

    fn forward_over_conn(&self, tx: &ConnTx, src: u32, payload: Vec<u8>) {
        if tx.try_send(Outgoing::Relay(src, payload)).is_ok() {
            Counters::bump(&self.counters.relayed_tcp);
        } else {
            Counters::bump(&self.counters.relay_queue_full);
        }
    }

    /// One UDP socket: endpoint probes everywhere; binds and relay data on the main port only.
    async fn serve_udp(self: Arc<Self>, udp: Arc<UdpSocket>, main: bool) {
        let mut buf = vec![0u8; 65536];
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
            let src = canonical(src);
            if main {
                if let Some((dst, _)) = parse_relay_data(&buf[..n]) {
                    let routed = self.relay().route_udp(Instant::now(), src, dst);
                    match routed {
                        Ok((src_id, Dest::Udp(addr))) => {
                            // Same datagram, header now naming the source.
                            write_relay_header(&mut buf[..n], src_id);
                            let _ = udp.send_to(&buf[..n], addr).await;
                            Counters::bump(&self.counters.relayed_udp);
                        }
                        Ok((src_id, Dest::Conn(tx))) => {
                            let payload = buf[RELAY_HEADER_LEN..n].to_vec();
                            self.forward_over_conn(&tx, src_id, payload);
                        }
                        Err(why) => self.counters.dropped(why),
                    }
                    continue;
                }
            }
            if !self.admission().udp(Instant::now(), src.ip()) {
                Drops::bump(&self.limited.udp_rate_limited);
                continue;
            }
            let datagram = &buf[..n];
            let nonce = match (classify(datagram), A2aDatagram::decode(datagram)) {
                (DatagramKind::A2a, Some(A2aDatagram::EndpointProbe { nonce })) => nonce,
                (
                    DatagramKind::A2a,
                    Some(A2aDatagram::RelayBind {
                        nonce,
                        relay_id,
                        secret,
                    }),
                ) if main => {
                    let bound = self.relay().bind(Instant::now(), relay_id, &secret, src);
                    match bound {
                        Ok(()) => Counters::bump(&self.counters.relay_binds),
                        Err(why) => {
                            self.counters.dropped(why);
                            continue;
                        }
                    }
                    nonce
                }
                _ => {
                    Counters::bump(&self.counters.udp_dropped);
                    continue;
                }
            };
            Counters::bump(&self.counters.udp_endpoint_probes);
            let len = A2aDatagram::EndpointReply {
                nonce,
                observed: src,
            }
            .encode(&mut reply);
            let _ = udp.send_to(&reply[..len], src).await;
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
                self.relay().remove(conn);
            }
            hub.deliver(out);
        }
    }

    async fn stats_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.stats_every);
        tick.tick().await;
        loop {
            tick.tick().await;
            tracing::info!("{}", self.stats_line());
        }
    }

    /// The coordinator's only report: how many members, networks and relay slots are live, and
    /// the counters. Numbers only, never an identifier.
    pub fn stats_line(&self) -> String {
        let (members, networks) = {
            let hub = self.hub();
            (hub.registry.member_count(), hub.registry.network_count())
        };
        let slots = self.relay().len();
        let (open, pending) = {
            let a = self.admission();
            (a.open(), a.pending())
        };
        format!(
            "live members={members} networks={networks} relay_slots={slots} \
             connections={open} unregistered={pending} {} {}",
            self.counters.summary(),
            self.limited.summary()
        )
    }
}

async fn write_loop(
    mut writer: FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    while let Some(out) = rx.recv().await {
        let sent = match out {
            Outgoing::Msg(msg) => writer.send(&msg).await,
            Outgoing::Relay(src, payload) => writer.send_relay(src, &payload).await,
        };
        if sent.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

/// Closes `stream` with a RST when it is dropped. A node reads that as "busy, try again" and
/// backs off; an orderly close during the handshake means "this coordinator does not hold the
/// token's key" to it, which it gives up on after a few tries.
fn reset(stream: &impl std::os::fd::AsRawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on the stream's open descriptor with a correctly sized `linger`.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    ) || e.kind() == io::ErrorKind::ConnectionAborted
        || e.kind() == io::ErrorKind::ConnectionReset
}
