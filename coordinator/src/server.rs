//! The coordinator's sockets: TCP control connections (which also carry relay frames for nodes
//! without UDP), the UDP port (endpoint discovery, relay binds, UDP relay) and the mapping-check
//! port (discovery only).
//!
//! Zero-log by construction: nothing here formats a key, name, address or record. The only
//! output is aggregate counters.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use a2a_proto::addr::canonical;
use a2a_proto::control::{ClientMsg, ServerMsg};
use a2a_proto::noise_channel::{handshake_responder, FrameError, FrameWriter, Incoming};
use a2a_proto::sync::lock;
use a2a_proto::udp::{
    classify, parse_relay_data, write_relay_header, A2aDatagram, DatagramKind, MAX_A2A_DATAGRAM,
    RELAY_HEADER_LEN,
};
use a2a_proto::{NetworkId, NodeKey, SignedRecord};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::limits::{Admission, Drops, Limits, OverLimit, Seat};
use crate::registry::ConnId;
use crate::relay::{Dest, RelayDrop, RelayTable};
use crate::switchboard::{Count, Outbox, RelayChange, Switchboard};

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

/// Which of the coordinator's UDP ports a datagram came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpPort {
    /// The main port: endpoint probes, relay binds and relay data.
    Main,
    /// The mapping-check port (the next one): endpoint probes only.
    Alt,
}

/// Where the coordinator sends datagrams it makes outside the UDP loop (relay data that came
/// over a control connection, for a node bound over UDP): the real socket, or a test's channel.
pub trait DatagramSink: Send + Sync + 'static {
    /// Sends one datagram without waiting; false if it was dropped (a full socket buffer).
    fn send_datagram(&self, to: SocketAddr, datagram: &[u8]) -> bool;
}

impl DatagramSink for UdpSocket {
    fn send_datagram(&self, to: SocketAddr, datagram: &[u8]) -> bool {
        self.try_send_to(datagram, to).is_ok()
    }
}

/// The switchboard plus the outboxes of live connections.
struct Hub {
    board: Switchboard,
    outboxes: HashMap<ConnId, ConnTx>,
}

/// What the driver of one connection does next, from an [`Outbox`].
struct Next {
    pause: Duration,
    registered: bool,
    linger: Option<Duration>,
}

impl Hub {
    /// Carries out `out` (queues, closes, relay slots, counters) but what concerns the
    /// connection handled alone, which is returned.
    fn carry_out(&mut self, server: &Server, out: Outbox) -> Next {
        for (conn, msg) in out.send {
            if let Some(tx) = self.outboxes.get(&conn) {
                if tx.try_send(Outgoing::Msg(msg)).is_err() {
                    // Too slow or gone: dropping its sender closes the connection's writer.
                    self.outboxes.remove(&conn);
                }
            }
        }
        for change in out.relay {
            match change {
                RelayChange::Open {
                    conn,
                    network,
                    secret,
                } => {
                    if let Some(tx) = self.outboxes.get(&conn) {
                        server
                            .relay()
                            .insert(Instant::now(), conn, network, secret, tx.clone());
                    }
                }
                RelayChange::Close(conn) => server.relay().remove(conn),
            }
        }
        for conn in out.close {
            // Its writer flushes what is queued, then the connection ends.
            self.outboxes.remove(&conn);
        }
        for c in out.counts {
            server.count(c);
        }
        Next {
            pause: out.pause,
            registered: out.registered,
            linger: out.linger,
        }
    }

    /// Queues a [`Tamper`] hook's injections, each to the member of `network` it names.
    fn inject(&mut self, network: NetworkId, injections: Vec<(NodeKey, Injected)>) {
        for (to, injected) in injections {
            let Some(tx) = self
                .board
                .registry()
                .conn_of(&network, &to)
                .and_then(|c| self.outboxes.get(&c))
            else {
                continue;
            };
            let _ = tx.try_send(match injected {
                Injected::Msg(m) => Outgoing::Msg(m),
                Injected::Relay { from, datagram } => Outgoing::Relay(from, datagram),
            });
        }
    }
}

pub struct Server {
    hub: Mutex<Hub>,
    /// Kept apart from the hub so relayed packets never wait for registrations.
    relay: Mutex<RelayTable<ConnTx>>,
    /// For relaying what arrives over TCP to nodes bound over UDP (the main UDP socket).
    udp: std::sync::OnceLock<Arc<dyn DatagramSink>>,
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

/// An admitted connection's seat in the accounting, given back when the task ends.
struct Permit {
    server: Arc<Server>,
    seat: Option<Seat>,
}

impl Permit {
    fn registered(&mut self) {
        if let Some(t) = self.seat.as_mut() {
            self.server.admission().registered(t);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(t) = self.seat.take() {
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
                board: Switchboard::new(
                    HEARTBEAT,
                    REGISTRATION_TTL,
                    limits.message_rate,
                    rand::random(),
                ),
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

    /// Where relay data that came over a control connection goes when its destination is
    /// bound over UDP. [`Server::run`] sets the main UDP socket; a test without sockets sets
    /// its own (once, before serving).
    pub fn set_datagram_sink(&self, sink: Arc<dyn DatagramSink>) {
        let _ = self.udp.set(sink);
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

    fn count(&self, c: Count) {
        let k = &self.counters;
        match c {
            Count::Registration => Counters::bump(&k.registrations),
            Count::RegistrationRefused => Counters::bump(&k.registrations_refused),
            Count::BadMessage => Counters::bump(&k.tcp_bad_message),
            Count::Punch => Counters::bump(&k.punches),
            Count::Redemption => Counters::bump(&k.redemptions),
            Count::RedemptionRefused => Counters::bump(&k.redemptions_refused),
            Count::Revocation => Counters::bump(&k.revocations),
            Count::Throttled => Drops::bump(&self.limited.ctl_msgs_throttled),
        }
    }

    fn over_limit(&self, why: OverLimit) {
        if why == OverLimit::Full {
            Counters::bump(&self.counters.tcp_refused_over_cap);
        }
        self.limited.refused(why);
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
        self.set_datagram_sink(udp.clone());
        let mut tasks = vec![
            tokio::spawn(self.clone().serve_udp(udp, UdpPort::Main)),
            tokio::spawn(self.clone().expire_loop()),
            tokio::spawn(self.clone().stats_loop()),
        ];
        if let Some(alt) = udp_alt {
            tasks.push(tokio::spawn(
                self.clone().serve_udp(Arc::new(alt), UdpPort::Alt),
            ));
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
            let seat = match admitted {
                Ok(t) => t,
                Err(why) => {
                    self.over_limit(why);
                    reset(stream.as_raw_fd());
                    continue;
                }
            };
            Counters::bump(&self.counters.tcp_accepted);
            let mut permit = Permit {
                server: self.clone(),
                seat: Some(seat),
            };
            let server = self.clone();
            rt.spawn(async move {
                let stream = stream
                    .set_nonblocking(true)
                    .and_then(|()| TcpStream::from_std(stream));
                if let Ok(stream) = stream {
                    let _ = stream.set_nodelay(true);
                    let fd = stream.as_raw_fd();
                    server.serve_connection(stream, Some(fd), &mut permit).await;
                }
            });
        }
    }

    /// Serves one control connection over any byte stream, as if it had been accepted from
    /// `peer` (whose source the admission limits count): an in-process test connects a whole
    /// daemon with [`tokio::io::duplex`]. Returns when the connection ends.
    pub async fn serve_control<S>(self: Arc<Self>, stream: S, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let admitted = self.admission().admit_tcp(Instant::now(), peer.ip());
        let seat = match admitted {
            Ok(t) => t,
            Err(why) => return self.over_limit(why),
        };
        Counters::bump(&self.counters.tcp_accepted);
        let mut permit = Permit {
            server: self.clone(),
            seat: Some(seat),
        };
        self.serve_connection(stream, None, &mut permit).await;
    }

    /// One admitted connection; `fd`, the socket's (TCP), to close it with a reset.
    async fn serve_connection<S>(
        self: Arc<Self>,
        mut stream: S,
        fd: Option<RawFd>,
        permit: &mut Permit,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
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
                if let Some(fd) = fd {
                    reset(fd);
                }
                return;
            }
        };
        let conn_key = NodeKey(established.remote_static);
        let hash = established.handshake_hash.clone();
        let (read, write) = tokio::io::split(stream);
        let (mut reader, writer) = established.split(read, write);
        let conn: ConnId = self.new_conn_id();
        let (tx, rx) = mpsc::channel(OUTBOX_DEPTH);
        let writer_task = tokio::spawn(write_loop(writer, rx));
        {
            let mut hub = self.hub();
            hub.outboxes.insert(conn, tx);
            hub.board.open(conn, conn_key, hash);
        }

        // Until it registers, the connection reads against the deadline; a redeemer then
        // lingers for its answer.
        let mut read_until = Some((deadline, true));
        let mut registered = false;
        loop {
            let read = reader.recv_frame::<ClientMsg>();
            let frame = match read_until {
                None => read.await,
                Some((until, counts)) => match tokio::time::timeout_at(until, read).await {
                    Ok(f) => f,
                    Err(_) => {
                        if counts {
                            Drops::bump(&self.limited.tcp_register_deadline);
                        }
                        break;
                    }
                },
            };
            let msg = match frame {
                Ok(Incoming::Msg(m)) => m,
                Ok(Incoming::Relay(dst, payload)) if registered => {
                    self.relay_from_conn(conn, dst, payload);
                    continue;
                }
                Ok(Incoming::Relay(..)) => {
                    Counters::bump(&self.counters.tcp_bad_message);
                    break;
                }
                Err(e) => {
                    if matches!(e, FrameError::Malformed(_)) {
                        Counters::bump(&self.counters.tcp_bad_message);
                    }
                    break;
                }
            };
            let tampered = match (&msg, self.tamper.get()) {
                (
                    ClientMsg::Register {
                        network, record, ..
                    },
                    Some(t),
                ) if !registered => Some((*network, t.after_register(network, record))),
                _ => None,
            };
            let (next, open) = {
                let mut hub = self.hub();
                let out = hub.board.handle(Instant::now(), conn, msg);
                let next = hub.carry_out(&self, out);
                if next.registered {
                    if let Some((network, injections)) = tampered {
                        hub.inject(network, injections);
                    }
                }
                (next, hub.outboxes.contains_key(&conn))
            };
            if next.registered {
                registered = true;
                permit.registered();
                read_until = None;
            }
            if let Some(linger) = next.linger {
                read_until = Some((tokio::time::Instant::now() + linger, false));
            }
            if !open {
                break; // closed by the protocol, or dropped as too slow
            }
            if !next.pause.is_zero() {
                // Reading no further pushes back on the sender through TCP.
                tokio::time::sleep(next.pause).await;
            }
        }
        {
            let mut hub = self.hub();
            let out = hub.board.close(conn);
            hub.outboxes.remove(&conn);
            hub.carry_out(&self, out);
        }
        // The writer ends once every sender is gone and the queue is flushed.
        let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
    }

    /// Relay data that came over connection `conn`'s control channel.
    fn relay_from_conn(&self, conn: ConnId, dst: u32, payload: Vec<u8>) {
        let dest = self.relay().route_conn(Instant::now(), conn, dst);
        match dest {
            Ok(Dest::Udp(addr)) => {
                let mut d = vec![0u8; RELAY_HEADER_LEN + payload.len()];
                write_relay_header(&mut d, conn);
                d[RELAY_HEADER_LEN..].copy_from_slice(&payload);
                if let Some(udp) = self.udp.get() {
                    if udp.send_datagram(addr, &d) {
                        Counters::bump(&self.counters.relayed_tcp);
                    } else {
                        Counters::bump(&self.counters.relay_queue_full);
                    }
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

    /// One UDP socket's loop: each datagram handled, and what that returns sent.
    async fn serve_udp(self: Arc<Self>, udp: Arc<UdpSocket>, port: UdpPort) {
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
            if let Some((to, datagram)) = self.handle_datagram(src, port, &mut buf[..n], &mut reply)
            {
                let _ = udp.send_to(datagram, to).await;
            }
        }
    }

    /// One datagram that came to `port` from `from`: endpoint probes everywhere; binds and
    /// relay data on the main port only. Returns the datagram to send and where: relay data
    /// rewritten in place in `datagram` (its header now naming the source), or an endpoint
    /// reply written into `reply`. Relay data for a node reached over its control connection
    /// is queued there, and `None` returned. No allocation on the UDP relay path.
    pub fn handle_datagram<'a>(
        &self,
        from: SocketAddr,
        port: UdpPort,
        datagram: &'a mut [u8],
        reply: &'a mut [u8; MAX_A2A_DATAGRAM],
    ) -> Option<(SocketAddr, &'a [u8])> {
        let src = canonical(from);
        if port == UdpPort::Main {
            if let Some((dst, _)) = parse_relay_data(datagram) {
                let routed = self.relay().route_udp(Instant::now(), src, dst);
                return match routed {
                    Ok((src_id, Dest::Udp(addr))) => {
                        // Same datagram, header now naming the source.
                        write_relay_header(datagram, src_id);
                        Counters::bump(&self.counters.relayed_udp);
                        Some((addr, &*datagram))
                    }
                    Ok((src_id, Dest::Conn(tx))) => {
                        let payload = datagram[RELAY_HEADER_LEN..].to_vec();
                        self.forward_over_conn(&tx, src_id, payload);
                        None
                    }
                    Err(why) => {
                        self.counters.dropped(why);
                        None
                    }
                };
            }
        }
        if !self.admission().udp(Instant::now(), src.ip()) {
            Drops::bump(&self.limited.udp_rate_limited);
            return None;
        }
        let nonce = match (classify(datagram), A2aDatagram::decode(datagram)) {
            (DatagramKind::A2a, Some(A2aDatagram::EndpointProbe { nonce })) => nonce,
            (
                DatagramKind::A2a,
                Some(A2aDatagram::RelayBind {
                    nonce,
                    relay_id,
                    secret,
                }),
            ) if port == UdpPort::Main => {
                let bound = self.relay().bind(Instant::now(), relay_id, &secret, src);
                match bound {
                    Ok(()) => Counters::bump(&self.counters.relay_binds),
                    Err(why) => {
                        self.counters.dropped(why);
                        return None;
                    }
                }
                nonce
            }
            _ => {
                Counters::bump(&self.counters.udp_dropped);
                return None;
            }
        };
        Counters::bump(&self.counters.udp_endpoint_probes);
        let len = A2aDatagram::EndpointReply {
            nonce,
            observed: src,
        }
        .encode(reply);
        Some((src, &reply[..len]))
    }

    async fn expire_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let mut hub = self.hub();
            let out = hub.board.expire(Instant::now());
            hub.carry_out(&self, out);
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
            let r = hub.board.registry();
            (r.member_count(), r.network_count())
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

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: FrameWriter<W>,
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
fn reset(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on the stream's open descriptor with a correctly sized `linger`.
    unsafe {
        libc::setsockopt(
            fd,
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

#[cfg(test)]
mod tests {
    use super::*;
    use a2a_proto::keys::{RelaySecret, Signature, REGISTER_CONTEXT};
    use a2a_proto::noise_channel::{handshake_initiator, FrameReader, FrameWriter};
    use a2a_proto::{NetworkKey, NodeRecord};
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
    use x25519_dalek::{PublicKey, StaticSecret};

    /// What a test's "UDP socket" was asked to send.
    #[derive(Default)]
    struct Sent(Mutex<Vec<(SocketAddr, Vec<u8>)>>);

    impl DatagramSink for Sent {
        fn send_datagram(&self, to: SocketAddr, datagram: &[u8]) -> bool {
            lock(&self.0).push((to, datagram.to_vec()));
            true
        }
    }

    type Channel = (
        FrameReader<ReadHalf<DuplexStream>>,
        FrameWriter<WriteHalf<DuplexStream>>,
    );

    /// A node with secret `n` connects over an in-memory stream and registers.
    async fn member(server: &Arc<Server>, k: &NetworkKey, n: u8) -> (Channel, u32, RelaySecret) {
        let coordinator = PublicKey::from(&StaticSecret::from([1; 32])).to_bytes();
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let peer = SocketAddr::from(([192, 0, 2, n], 4000));
        tokio::spawn(server.clone().serve_control(b, peer));
        let est = handshake_initiator(&mut a, &[n; 32], &coordinator)
            .await
            .unwrap();
        let node_key = NodeKey(PublicKey::from(&StaticSecret::from([n; 32])).to_bytes());
        let record = NodeRecord {
            network: k.id(),
            node_key,
            name: format!("n{n}"),
            ip: format!("100.64.0.{n}").parse().unwrap(),
            candidates: vec![],
            issued_ms: 1,
        }
        .sign(k);
        let proof = Some(Signature(k.sign(REGISTER_CONTEXT, &est.handshake_hash)));
        let (r, w) = tokio::io::split(a);
        let (mut r, mut w) = est.split(r, w);
        w.send(&ClientMsg::Register {
            network: k.id(),
            proof,
            record,
        })
        .await
        .unwrap();
        let ServerMsg::Registered {
            relay_id,
            relay_secret,
            ..
        } = r.recv().await.unwrap()
        else {
            panic!("not registered");
        };
        ((r, w), relay_id, relay_secret)
    }

    #[tokio::test]
    async fn nodes_register_bind_and_relay_without_sockets() {
        let server = Server::new([1; 32]);
        let sent = Arc::new(Sent::default());
        server.set_datagram_sink(sent.clone());
        let k = NetworkKey::derive(&[9; 32]);
        let (_a, a_id, a_secret) = member(&server, &k, 2).await;
        let ((mut b_rx, mut b_tx), b_id, _) = member(&server, &k, 3).await;
        assert!(matches!(
            b_rx.recv::<ServerMsg>().await.unwrap(),
            ServerMsg::PeerUp { relay_id, .. } if relay_id == a_id
        ));
        // Node a binds its relay id over "UDP" from a dual-stack socket's mapped address.
        let mut d = [0u8; MAX_A2A_DATAGRAM];
        let len = A2aDatagram::RelayBind {
            nonce: [5; 8],
            relay_id: a_id,
            secret: a_secret,
        }
        .encode(&mut d);
        let mut reply = [0u8; MAX_A2A_DATAGRAM];
        let from: SocketAddr = "[::ffff:198.51.100.1]:5000".parse().unwrap();
        let plain: SocketAddr = "198.51.100.1:5000".parse().unwrap();
        let (to, answer) = server
            .handle_datagram(from, UdpPort::Main, &mut d[..len], &mut reply)
            .expect("a bind is answered");
        assert_eq!(to, plain);
        assert_eq!(
            A2aDatagram::decode(answer),
            Some(A2aDatagram::EndpointReply {
                nonce: [5; 8],
                observed: plain
            })
        );
        // The mapping-check port answers probes but takes no bind.
        let len = A2aDatagram::RelayBind {
            nonce: [6; 8],
            relay_id: a_id,
            secret: RelaySecret([0; 16]),
        }
        .encode(&mut d);
        assert!(server
            .handle_datagram(from, UdpPort::Alt, &mut d[..len], &mut reply)
            .is_none());
        // Node b relays over its control connection to a: it leaves as UDP to a's binding,
        // its header naming b.
        b_tx.send_relay(a_id, &[4, 0, 0, 0, 9, 9]).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while lock(&sent.0).is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "nothing relayed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (to, datagram) = lock(&sent.0).remove(0);
        assert_eq!(to, plain);
        assert_eq!(
            parse_relay_data(&datagram),
            Some((b_id, &[4, 0, 0, 0, 9, 9][..]))
        );
        // UDP relay data from a's binding to b (not bound over UDP) goes over b's connection.
        let mut relay = vec![0u8; RELAY_HEADER_LEN + 3];
        write_relay_header(&mut relay, b_id);
        relay[RELAY_HEADER_LEN..].copy_from_slice(&[4, 0, 0]);
        assert!(server
            .handle_datagram(plain, UdpPort::Main, &mut relay, &mut reply)
            .is_none());
        assert_eq!(
            b_rx.recv_frame::<ServerMsg>().await.unwrap(),
            Incoming::Relay(a_id, vec![4, 0, 0])
        );
        assert_eq!(server.counters.registrations.load(Ordering::Relaxed), 2);
        assert_eq!(server.counters.relayed_tcp.load(Ordering::Relaxed), 2);
    }
}
