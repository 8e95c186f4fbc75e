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
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use a2a_proto::addr::canonical;
use a2a_proto::control::{ClientMsg, ServerMsg};
use a2a_proto::noise_channel::{handshake_responder, FrameError};

use crate::histogram::{Histogram, HistogramSnapshot};
use a2a_proto::sync::{lock, read, write};
use a2a_proto::udp::{
    classify, parse_relay_data, write_relay_header, A2aDatagram, DatagramKind, MAX_A2A_DATAGRAM,
    RELAY_HEADER_LEN,
};
use a2a_proto::{NetworkId, NodeKey, SignedRecord};
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::batch::{Batcher, Run, MAX_SEGMENTS};
use crate::channel::{relay_frame, Frame, Outbox as ConnOutbox, Reader, Refused};
use crate::cluster::{Apply, Cluster, Outgoing, Publish, RelayOut, Sealer, Step, Via};
use crate::fanout;
use crate::limits::{Admission, Drops, Limits, OverLimit, Seat};
use crate::registry::{is_remote_id, ConnId};
use crate::relay::{Dest, RelayDrop, RelayTable};
use crate::switchboard::{Count, Outbox, RelayChange, Switchboard};
use a2a_udpbatch as udpbatch;

/// How often nodes heartbeat, and how long a silent registration lives.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
pub const REGISTRATION_TTL: Duration = Duration::from_secs(35);
/// How often the counters line is printed unless told otherwise.
pub const STATS_EVERY: Duration = Duration::from_secs(60);

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
    /// Sends the kernel refused (a full buffer is waited out, so: no route, a firewall).
    pub udp_send_failed: AtomicU64,
    pub relay_binds: AtomicU64,
    pub relay_bad_binds: AtomicU64,
    pub relayed_udp: AtomicU64,
    /// Bytes of the datagrams counted in `relayed_udp` (relay header included).
    pub relayed_udp_bytes: AtomicU64,
    pub relayed_tcp: AtomicU64,
    /// Bytes of the datagrams counted in `relayed_tcp` (relay header included).
    pub relayed_tcp_bytes: AtomicU64,
    /// Runs of relayed datagrams to one address sent in one UDP GSO call, and the datagrams
    /// in them.
    pub relay_gso_sends: AtomicU64,
    pub relay_gso_datagrams: AtomicU64,
    pub relay_unknown_source: AtomicU64,
    pub relay_unknown_destination: AtomicU64,
    pub relay_foreign_network: AtomicU64,
    pub relay_rate_limited: AtomicU64,
    pub relay_queue_full: AtomicU64,
    pub punches: AtomicU64,
    pub redemptions: AtomicU64,
    pub redemptions_refused: AtomicU64,
    pub revocations: AtomicU64,
    pub statements: AtomicU64,
    /// Networks whose kept membership changes were forgotten (after their last member; early,
    /// over the cap).
    pub changes_forgotten: AtomicU64,
    pub changes_forgotten_over_cap: AtomicU64,
    /// Control messages queued to nodes, and the bytes of their frames.
    pub ctl_messages_sent: AtomicU64,
    pub ctl_bytes_sent: AtomicU64,
    /// Of those, the messages about other members (`Peers`, `PeerUp`, `PeerDown`), and the
    /// member changes they carry.
    pub member_messages_sent: AtomicU64,
    pub member_changes_sent: AtomicU64,
}

impl Counters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn add(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Every counter: its name, what it counts, its value (the counters line and the metrics
    /// are made from this one list).
    pub fn values(&self) -> Vec<(&'static str, &'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "tcp_accepted",
                "TCP connections admitted",
                g(&self.tcp_accepted),
            ),
            (
                "tcp_refused_over_cap",
                "TCP connections refused: the coordinator was at its connection cap",
                g(&self.tcp_refused_over_cap),
            ),
            (
                "tcp_bad_handshake",
                "TCP connections whose Noise handshake failed",
                g(&self.tcp_bad_handshake),
            ),
            (
                "tcp_bad_message",
                "Control messages malformed, out of order or refused",
                g(&self.tcp_bad_message),
            ),
            (
                "registrations",
                "Registrations accepted",
                g(&self.registrations),
            ),
            (
                "registrations_refused",
                "Registrations refused",
                g(&self.registrations_refused),
            ),
            (
                "udp_endpoint_probes",
                "Endpoint probes and relay binds answered with the address seen",
                g(&self.udp_endpoint_probes),
            ),
            (
                "udp_dropped",
                "UDP datagrams dropped as not a2a's, malformed, or unreadable",
                g(&self.udp_dropped),
            ),
            (
                "udp_send_failed",
                "UDP sends the kernel refused (no route, a firewall)",
                g(&self.udp_send_failed),
            ),
            (
                "relay_binds",
                "UDP relay binds accepted",
                g(&self.relay_binds),
            ),
            (
                "relay_bad_binds",
                "UDP relay binds with an unknown id or the wrong secret",
                g(&self.relay_bad_binds),
            ),
            (
                "relayed_udp",
                "Datagrams relayed from UDP to UDP",
                g(&self.relayed_udp),
            ),
            (
                "relayed_udp_bytes",
                "Bytes of the datagrams relayed from UDP to UDP (relay header included)",
                g(&self.relayed_udp_bytes),
            ),
            (
                "relayed_tcp",
                "Datagrams relayed from or to a control connection (TCP)",
                g(&self.relayed_tcp),
            ),
            (
                "relayed_tcp_bytes",
                "Bytes of the datagrams relayed from or to a control connection (relay header \
                 included)",
                g(&self.relayed_tcp_bytes),
            ),
            (
                "relay_gso_sends",
                "Runs of relayed datagrams to one address sent in one UDP GSO call",
                g(&self.relay_gso_sends),
            ),
            (
                "relay_gso_datagrams",
                "Relayed datagrams sent in those GSO calls",
                g(&self.relay_gso_datagrams),
            ),
            (
                "relay_unknown_source",
                "Relay datagrams dropped: from an address no relay slot is bound to",
                g(&self.relay_unknown_source),
            ),
            (
                "relay_unknown_destination",
                "Relay datagrams dropped: to a relay id nobody holds",
                g(&self.relay_unknown_destination),
            ),
            (
                "relay_foreign_network",
                "Relay datagrams dropped: source and destination in different networks",
                g(&self.relay_foreign_network),
            ),
            (
                "relay_rate_limited",
                "Relay datagrams dropped: the sender was over its relay rate",
                g(&self.relay_rate_limited),
            ),
            (
                "relay_queue_full",
                "Relay datagrams dropped: the destination's connection queue was full or closed",
                g(&self.relay_queue_full),
            ),
            ("punches", "Hole-punch requests passed on", g(&self.punches)),
            (
                "redemptions",
                "Invite redemptions passed on",
                g(&self.redemptions),
            ),
            (
                "redemptions_refused",
                "Invite redemptions refused",
                g(&self.redemptions_refused),
            ),
            ("revocations", "Revocations passed on", g(&self.revocations)),
            (
                "statements",
                "Policy and tag statements passed on (their content is never kept beyond memory)",
                g(&self.statements),
            ),
            (
                "changes_forgotten",
                "Networks whose kept membership changes were forgotten, 7 days after their last \
                 member on any coordinator",
                g(&self.changes_forgotten),
            ),
            (
                "changes_forgotten_over_cap",
                "Networks with no member whose kept membership changes were forgotten early, \
                 to keep at most 16384 such changes",
                g(&self.changes_forgotten_over_cap),
            ),
            (
                "ctl_messages_sent",
                "Control messages queued to nodes (relay frames aside)",
                g(&self.ctl_messages_sent),
            ),
            (
                "ctl_bytes_sent",
                "Bytes of the control messages queued to nodes (frames, encryption included)",
                g(&self.ctl_bytes_sent),
            ),
            (
                "member_messages_sent",
                "Control messages telling nodes of other members (batches, or one change each)",
                g(&self.member_messages_sent),
            ),
            (
                "member_changes_sent",
                "Member changes (joins, new records, departures) carried by those messages",
                g(&self.member_changes_sent),
            ),
        ]
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

/// One reading of the coordinator ([`Server::snapshot`]): (name, what it is, value) for every
/// gauge and counter; numbers under fixed names, nothing else.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// What is live now (members, networks, connections, relay slots, UDP sockets).
    pub gauges: Vec<(&'static str, &'static str, u64)>,
    /// What happened since the start.
    pub counters: Vec<(&'static str, &'static str, u64)>,
    /// How long accepted connections' Noise handshakes took, from the accept.
    pub handshakes: HistogramSnapshot,
}

/// `name=value` pairs, space-separated, for the counters line.
pub fn pairs(values: &[(&'static str, &'static str, u64)]) -> String {
    values
        .iter()
        .map(|(name, _, v)| format!("{name}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A hook for tests only: a test binary (the forging coordinator in `netns-tests`) wraps the
/// real server and injects what an attacker holding the hub would send, to show that members
/// refuse it; another (the recording coordinator) records everything nodes send it, to show
/// what the hub can learn. The `a2a-coordinator` binary never installs one.
pub trait Tamper: Send + Sync + 'static {
    /// Called once a node registered in `network` with `record`; each injection returned is
    /// sent to the member of `network` with that node key (the new node or any other), after
    /// the genuine registration messages.
    fn after_register(
        &self,
        network: &NetworkId,
        record: &SignedRecord,
    ) -> Vec<(NodeKey, Injected)>;

    /// Whether to keep `msg` from the node it is for (what a hub that withholds does); it
    /// sees every message the switchboard sends. Injections are never withheld.
    fn withhold(&self, _msg: &ServerMsg) -> bool {
        false
    }

    /// Every control message a node sends, decrypted, before the server acts on it.
    fn saw_message(&self, _msg: &ClientMsg) {}

    /// Every datagram a node sends the coordinator, as it came: over UDP (relay data, endpoint
    /// probes, relay binds, anything else), or framed as relay data on its control connection.
    fn saw_datagram(&self, _datagram: &[u8]) {}
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

/// How a connection is written to: its shared, coalescing outbox (see [`crate::channel`]).
type ConnTx = Arc<ConnOutbox>;

/// Where a relay slot's data goes: the node's control connection, or (a remote member of the
/// cluster) the coordinator holding it, over NATS.
#[derive(Clone)]
enum Link {
    Conn(ConnTx),
    Remote(Arc<Via>),
}

/// The cluster (`--nats`): the decision core, the sealer the relay path shares, and the queue
/// of what to publish (the NATS driver, `nats.rs`, drains it).
pub struct ClusterLink {
    core: Mutex<Cluster>,
    sealer: Arc<Sealer>,
    publish: tokio::sync::mpsc::Sender<Outgoing>,
    /// Messages that could not be queued for NATS (the queue was full).
    pub publish_dropped: AtomicU64,
    /// Remote members' records this coordinator refused (address taken, revoked, held here).
    pub refused_here: AtomicU64,
    /// Relay data sent to and received from other coordinators.
    pub relayed_out: AtomicU64,
    pub relayed_in: AtomicU64,
    /// NATS messages that carried relay data out (bridges aside).
    pub relay_messages_out: AtomicU64,
    /// The direct connections to other coordinators that carry relay data past NATS.
    pub bridges: Arc<crate::bridge::Bridges>,
}

impl ClusterLink {
    pub fn new(core: Cluster, publish: tokio::sync::mpsc::Sender<Outgoing>) -> Self {
        ClusterLink {
            sealer: core.sealer().clone(),
            core: Mutex::new(core),
            publish,
            publish_dropped: AtomicU64::new(0),
            refused_here: AtomicU64::new(0),
            relayed_out: AtomicU64::new(0),
            relayed_in: AtomicU64::new(0),
            relay_messages_out: AtomicU64::new(0),
            bridges: Arc::default(),
        }
    }

    pub fn core(&self) -> std::sync::MutexGuard<'_, Cluster> {
        lock(&self.core)
    }

    /// The cluster's counters (numbers only), for the counters line and the metrics.
    pub fn values(&self) -> Vec<(&'static str, &'static str, u64)> {
        let (c, peers, remote) = {
            let core = self.core();
            (core.counts, core.peer_count(), core.remote_count())
        };
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            (
                "cluster_coordinators",
                "Other coordinators of the cluster heard from (gauge)",
                peers as u64,
            ),
            (
                "cluster_remote_members",
                "Members other coordinators hold (gauge)",
                remote as u64,
            ),
            (
                "cluster_published",
                "Cluster messages published (relay data aside)",
                c.published,
            ),
            ("cluster_received", "Cluster messages accepted", c.received),
            (
                "cluster_refused_seal",
                "Cluster messages refused: not sealed with the cluster key",
                c.refused_seal,
            ),
            (
                "cluster_refused_malformed",
                "Cluster messages refused: malformed",
                c.refused_malformed,
            ),
            (
                "cluster_refused_replay",
                "Cluster messages refused: replayed",
                c.refused_replay,
            ),
            (
                "cluster_refused_stale",
                "Cluster messages refused: sent too far from this clock",
                c.refused_stale,
            ),
            (
                "cluster_refused_flood",
                "Cluster messages refused: too many instances or members",
                c.refused_flood,
            ),
            (
                "cluster_refused_record",
                "Records from the cluster refused: the signature does not verify",
                c.refused_record + g(&self.refused_here),
            ),
            (
                "cluster_unknown_member",
                "Punches and relay data from the cluster for a member not held here",
                c.unknown_member,
            ),
            (
                "cluster_coordinators_expired",
                "Coordinators gone silent",
                c.coordinators_expired,
            ),
            (
                "cluster_syncs_asked",
                "Snapshots asked of a coordinator whose presence did not match",
                c.syncs_asked,
            ),
            (
                "cluster_redeems_asked",
                "Redemptions of invites unknown here passed to the cluster",
                c.redeems_asked,
            ),
            (
                "cluster_redeems_answered",
                "Answers of local inviters sent back to the coordinator that asked",
                c.redeems_answered,
            ),
            (
                "cluster_relayed_out",
                "Relay datagrams sent to other coordinators",
                g(&self.relayed_out),
            ),
            (
                "cluster_relayed_in",
                "Relay datagrams received from other coordinators",
                g(&self.relayed_in),
            ),
            (
                "cluster_bridges",
                "Bridges up: direct connections to other coordinators for relay data (gauge)",
                self.bridges.count() as u64,
            ),
            (
                "cluster_bridges_opened",
                "Bridges to other coordinators that came up",
                g(&self.bridges.opened),
            ),
            (
                "cluster_bridged_out",
                "Relay envelopes sent over bridges instead of NATS",
                g(&self.bridges.sent),
            ),
            (
                "cluster_bridged_in",
                "Relay envelopes received over bridges",
                g(&self.bridges.received),
            ),
            (
                "cluster_bridge_full",
                "Relay envelopes sent over NATS because their bridge's queue was full",
                g(&self.bridges.full),
            ),
            (
                "cluster_bridges_refused",
                "Bridge connections closed for a magic, hello or envelope that did not open",
                g(&self.bridges.refused),
            ),
            (
                "cluster_relay_messages_out",
                "NATS messages that carried relay data to other coordinators",
                g(&self.relay_messages_out),
            ),
            (
                "cluster_publish_dropped",
                "Cluster messages dropped: the queue to NATS was full",
                g(&self.publish_dropped),
            ),
        ]
    }

    fn queue(&self, p: Publish) {
        self.queue_out(Outgoing::Sealed(p));
    }

    fn queue_out(&self, o: Outgoing) {
        if self.publish.try_send(o).is_err() {
            Counters::bump(&self.publish_dropped);
        }
    }

    /// The sealer, which packs what is queued ([`Sealer::pack`]).
    pub fn sealer(&self) -> &Arc<Sealer> {
        &self.sealer
    }
}
/// Which of the coordinator's UDP ports a datagram came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpPort {
    /// The main port: endpoint probes, relay binds and relay data.
    Main,
    /// The mapping-check port (the next one): endpoint probes only.
    Alt,
}

/// Which UDP offloads the loops use where the kernel has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offload {
    /// UDP_GRO: receive several datagrams of one sender per call.
    pub gro: bool,
    /// UDP_SEGMENT: send several datagrams to one address per call.
    pub gso: bool,
}

impl Offload {
    /// Both, unless `A2A_OFFLOAD=0`, or `A2A_UDP_GRO=0` / `A2A_UDP_GSO=0` for one (the
    /// daemon's switches).
    pub fn from_env() -> Self {
        let off = |k: &str| std::env::var(k).is_ok_and(|v| v == "0");
        Offload {
            gro: !off("A2A_OFFLOAD") && !off("A2A_UDP_GRO"),
            gso: !off("A2A_OFFLOAD") && !off("A2A_UDP_GSO"),
        }
    }
}

/// What became of one received datagram on the UDP loop's first pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Relay data to send on to this address (its header rewritten in place).
    Udp(SocketAddr),
    /// Queued on a control connection, or dropped and counted.
    Done,
    /// Not relay data: a probe or bind, for [`Server::handle_control`].
    Control,
}

/// Binds the main UDP port as `n` sockets with SO_REUSEPORT (one plain socket for 1), ready
/// for [`Server::run_group`].
/// The control channel's TCP listener on `addr`; `[::]:port` serves IPv4 too (IPV6_V6ONLY
/// off, whatever the host's default): IPv4 clients are seen IPv4-mapped, and canonical
/// ([`canonical`]) from accept on.
pub fn listen_tcp(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(a) => {
            let s = tokio::net::TcpSocket::new_v6()?;
            if a.ip().is_unspecified() {
                let off: libc::c_int = 0;
                // SAFETY: `off` lives across the call and its size is passed.
                let rc = unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::IPPROTO_IPV6,
                        libc::IPV6_V6ONLY,
                        &off as *const libc::c_int as *const libc::c_void,
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            s
        }
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

pub fn bind_udp(addr: SocketAddr, n: usize) -> io::Result<Vec<UdpSocket>> {
    udpbatch::bind_group(addr, n)?
        .into_iter()
        .map(UdpSocket::from_std)
        .collect()
}

/// Where the coordinator sends datagrams it makes outside the UDP loop (relay data that came
/// over a control connection, for a node bound over UDP): the real socket, or a test's channel.
pub trait DatagramSink: Send + Sync + 'static {
    /// Sends one datagram without waiting; false if it was dropped (a full socket buffer).
    fn send_datagram(&self, to: SocketAddr, datagram: &[u8]) -> bool;

    /// Sends the datagrams of `data` to `to`, each `segment` bytes but the last (a
    /// [`crate::batch::Run`]), without waiting: how many were sent.
    fn send_run(&self, to: SocketAddr, data: &[u8], segment: usize) -> usize {
        data.chunks(segment.max(1))
            .filter(|d| self.send_datagram(to, d))
            .count()
    }
}

impl DatagramSink for UdpSocket {
    fn send_datagram(&self, to: SocketAddr, datagram: &[u8]) -> bool {
        self.try_send_to(datagram, to).is_ok()
    }

    /// One UDP GSO send when the run has several datagrams (one system call, and one
    /// packet through the kernel until it is segmented); one call each if GSO is refused.
    fn send_run(&self, to: SocketAddr, data: &[u8], segment: usize) -> usize {
        let segment = segment.max(1);
        let count = data.len().div_ceil(segment);
        if count > 1 && udpbatch::send_segments(self.as_raw_fd(), data, segment as u16, to).is_ok()
        {
            return count;
        }
        data.chunks(segment)
            .filter(|d| self.send_datagram(to, d))
            .count()
    }
}

/// The switchboard plus the outboxes of live connections.
struct Hub {
    board: Switchboard,
    outboxes: HashMap<ConnId, ConnTx>,
    /// Where relay data for each remote member goes (cluster only).
    remote_via: HashMap<ConnId, Arc<Via>>,
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
        // Relay slots first: a node told it is registered may bind its slot at once.
        for change in out.relay {
            match change {
                RelayChange::Open {
                    conn,
                    network,
                    secret,
                } => {
                    let link = match self.outboxes.get(&conn) {
                        Some(tx) => Some(Link::Conn(tx.clone())),
                        None => self.remote_via.get(&conn).cloned().map(Link::Remote),
                    };
                    if let Some(link) = link {
                        server
                            .relay_mut()
                            .insert(Instant::now(), conn, network, secret, link);
                    }
                }
                RelayChange::Close(conn) => server.relay_mut().remove(conn),
            }
        }
        let k = &server.counters;
        let mut steps = Vec::new();
        if let Some(cluster) = server.cluster.get() {
            if !out.local.is_empty() {
                steps.push(cluster.core().local(a2a_proto::time::now_ms(), out.local));
            }
        }
        let tamper = server.tamper.get();
        for (conn, msg) in out.send {
            if tamper.is_some_and(|t| t.withhold(&msg)) {
                continue;
            }
            if is_remote_id(conn) {
                // A remote member: only a punch goes on, to its coordinator; a redemption
                // another coordinator passed here: the inviter's answer goes back to it.
                if let Some(cluster) = server.cluster.get() {
                    let now_ms = a2a_proto::time::now_ms();
                    match &msg {
                        ServerMsg::Punch { from } => {
                            steps.push(cluster.core().punch(now_ms, *from, conn))
                        }
                        ServerMsg::InviteAdmitted { .. } | ServerMsg::Refused { .. } => {
                            steps.push(cluster.core().redeem_answer(conn, &msg, now_ms))
                        }
                        _ => {}
                    }
                }
                continue;
            }
            if let Some(tx) = self.outboxes.get(&conn) {
                match tx.send_msg(&msg) {
                    Ok(bytes) => {
                        Counters::bump(&k.ctl_messages_sent);
                        Counters::add(&k.ctl_bytes_sent, bytes);
                        let changes = match &msg {
                            ServerMsg::Peers { down, up } => down.len() + up.len(),
                            ServerMsg::PeerUp { .. } | ServerMsg::PeerDown { .. } => 1,
                            _ => 0,
                        };
                        if changes > 0 {
                            Counters::bump(&k.member_messages_sent);
                            Counters::add(&k.member_changes_sent, changes);
                        }
                    }
                    Err(_) => {
                        // Too slow or gone: its writer flushes what is queued, then it ends.
                        tx.close();
                        self.outboxes.remove(&conn);
                    }
                }
            }
        }
        if self.board.fanout_deadline().is_some() {
            server.fanout_wake.notify_one();
        }
        for conn in out.close {
            // Its writer flushes what is queued, then the connection ends.
            if let Some(tx) = self.outboxes.remove(&conn) {
                tx.close();
            }
        }
        for c in out.counts {
            server.count(c);
        }
        for step in steps {
            self.apply(server, step);
        }
        Next {
            pause: out.pause,
            registered: out.registered,
            linger: out.linger,
        }
    }

    /// Carries out what the cluster decided: publishes, remote members appearing and going,
    /// punches for local nodes, relay data for local nodes.
    fn apply(&mut self, server: &Server, step: Step) {
        let Some(cluster) = server.cluster.get() else {
            return;
        };
        let now = Instant::now();
        // What is kept of membership goes before the snapshot of members it answers.
        for a in &step.apply {
            if let Apply::SendKept { to } = a {
                let kept = self.board.registry().kept();
                let s = cluster.core().kept_to(*to, kept, a2a_proto::time::now_ms());
                for p in s.publish {
                    cluster.queue(p);
                }
            }
        }
        for p in step.publish {
            cluster.queue(p);
        }
        for a in step.apply {
            match a {
                Apply::Up {
                    network,
                    record,
                    conn,
                    via,
                } => {
                    self.remote_via.insert(conn, Arc::new(via));
                    match self.board.remote_up(now, conn, network, record) {
                        Ok(out) => {
                            self.carry_out(server, out);
                        }
                        Err(_) => {
                            Counters::bump(&cluster.refused_here);
                            self.remote_via.remove(&conn);
                        }
                    }
                }
                Apply::Change(change) => match self.board.remote_change(now, change) {
                    Ok(out) => {
                        self.carry_out(server, out);
                    }
                    Err(_) => Counters::bump(&cluster.refused_here),
                },
                Apply::SendKept { .. } => {}
                Apply::Redeem {
                    ticket,
                    invite,
                    node_key,
                    signing_key,
                    proof,
                } => {
                    match self.board.cluster_redeem(
                        now,
                        ticket,
                        node_key,
                        invite,
                        signing_key,
                        proof,
                    ) {
                        Ok(out) => {
                            let held = cluster
                                .core()
                                .redeem_held(ticket, a2a_proto::time::now_ms());
                            for p in held.publish {
                                cluster.queue(p);
                            }
                            self.carry_out(server, out);
                        }
                        // No local member made it (another coordinator's may have).
                        Err(_) => cluster.core().forget_ticket(ticket),
                    }
                }
                Apply::RedeemHeld { ticket } => self.board.cluster_redeem_held(now, ticket),
                Apply::RedeemAnswer { ticket, answer } => {
                    let out = self.board.cluster_redeem_answer(ticket, answer);
                    self.carry_out(server, out);
                }
                Apply::Down { conn } => {
                    let out = self.board.remote_down(now, conn);
                    self.carry_out(server, out);
                    self.remote_via.remove(&conn);
                }
                Apply::Punch { network, from, to } => {
                    let target = self.board.registry().conn_of(&network, &to);
                    if let Some(tx) = target.and_then(|c| self.outboxes.get(&c)) {
                        if tx.send_msg(&ServerMsg::Punch { from }).is_ok() {
                            server.count(Count::Punch);
                        }
                    }
                }
                Apply::Relay {
                    src,
                    dst,
                    mut datagram,
                } => {
                    // Laid out as a UDP relay datagram: the header's room first.
                    let mut d = vec![0u8; RELAY_HEADER_LEN];
                    d.append(&mut datagram);
                    Counters::bump(&cluster.relayed_in);
                    server.relay_from_conn(src, dst, &mut d);
                }
            }
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
            let _ = match injected {
                Injected::Msg(m) => tx.send_msg(&m).map(drop),
                Injected::Relay { from, datagram } => {
                    let mut d = vec![0u8; RELAY_HEADER_LEN];
                    d.extend_from_slice(&datagram);
                    tx.send_relay(relay_frame(&mut d, from))
                }
            };
        }
    }
}

pub struct Server {
    hub: Mutex<Hub>,
    /// Kept apart from the hub so relayed packets never wait for registrations; read by every
    /// UDP loop at once (see [`crate::relay`]).
    relay: RwLock<RelayTable<Link>>,
    /// The cluster, when the coordinator runs in one (`--nats`).
    cluster: std::sync::OnceLock<Arc<ClusterLink>>,
    /// For relaying what arrives over TCP to nodes bound over UDP (the main UDP socket).
    udp: std::sync::OnceLock<Arc<dyn DatagramSink>>,
    private_key: [u8; 32],
    pub counters: Counters,
    /// Noise handshake latencies (aggregate, for the metrics).
    pub handshakes: Histogram,
    tamper: std::sync::OnceLock<Arc<dyn Tamper>>,
    next_conn: std::sync::atomic::AtomicU32,
    /// Per-source and global connection accounting (see [`crate::limits`]).
    admission: Mutex<Admission>,
    limits: Limits,
    /// What the limits dropped, by reason.
    pub limited: Drops,
    stats_every: Duration,
    /// UDP sockets in the main port's group (set by [`Server::run_group`]).
    udp_sockets: std::sync::atomic::AtomicUsize,
    /// Member changes are pending: the fan-out loop sends them when their window ends.
    fanout_wake: tokio::sync::Notify,
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
                board: {
                    let mut b = Switchboard::new(
                        HEARTBEAT,
                        REGISTRATION_TTL,
                        limits.message_rate,
                        rand::random(),
                    );
                    b.coalesce(fanout::WINDOW, fanout::MAX_BATCH_BYTES);
                    b
                },
                outboxes: HashMap::new(),
                remote_via: HashMap::new(),
            }),
            relay: RwLock::new(RelayTable::default()),
            cluster: std::sync::OnceLock::new(),
            udp: std::sync::OnceLock::new(),
            private_key,
            counters: Counters::default(),
            handshakes: Histogram::default(),
            tamper: std::sync::OnceLock::new(),
            next_conn: std::sync::atomic::AtomicU32::new(1),
            admission: Mutex::new(Admission::new(limits.clone(), Instant::now())),
            limits,
            limited: Drops::default(),
            stats_every,
            udp_sockets: std::sync::atomic::AtomicUsize::new(0),
            fanout_wake: tokio::sync::Notify::new(),
        })
    }

    /// Gathers member changes over `window` before they leave (zero: each at once, as one
    /// `PeerUp` or `PeerDown`, which nodes older than the `peers` batch understand); see
    /// [`crate::fanout`]. [`fanout::WINDOW`] unless told otherwise.
    pub fn set_fanout_window(&self, window: Duration) {
        self.hub().board.coalesce(window, fanout::MAX_BATCH_BYTES);
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

    /// Joins a cluster (before serving): member changes, punches and relay data for remote
    /// members go to `cluster`; [`Server::cluster_receive`] takes what comes from it.
    pub fn set_cluster(&self, cluster: Arc<ClusterLink>) {
        self.hub().board.set_clustered();
        let _ = self.cluster.set(cluster);
    }

    pub fn cluster(&self) -> Option<&Arc<ClusterLink>> {
        self.cluster.get()
    }

    /// Whether accepted connections may be other coordinators' bridges.
    fn bridging(&self) -> bool {
        self.cluster.get().is_some_and(|c| c.bridges.on())
    }

    /// One message from NATS.
    pub fn cluster_receive(&self, subject: &str, payload: &[u8]) {
        let Some(cluster) = self.cluster.get() else {
            return;
        };
        // The seal is opened before the cluster's lock is taken: the lock is held only to
        // check the sender and the replay window and to map the relay ids.
        let opened = cluster.sealer().open(subject, payload);
        let step = cluster
            .core()
            .accept(Instant::now(), a2a_proto::time::now_ms(), opened);
        if !step.publish.is_empty() || !step.apply.is_empty() {
            self.cluster_apply(step);
        }
    }

    /// One envelope from a bridge (sealed for this instance): false when it does not open,
    /// and the bridge is closed.
    pub fn cluster_receive_bridged(&self, payload: &[u8]) -> bool {
        let Some(cluster) = self.cluster.get() else {
            return false;
        };
        let opened = cluster
            .sealer()
            .open(cluster.sealer().subject_mine(), payload);
        let good = opened.is_ok();
        let step = cluster
            .core()
            .accept(Instant::now(), a2a_proto::time::now_ms(), opened);
        if !step.publish.is_empty() || !step.apply.is_empty() {
            self.cluster_apply(step);
        }
        good
    }

    /// What the cluster decided, carried out (the cluster's lock is not held).
    pub fn cluster_apply(&self, step: Step) {
        // Relay data needs no hub: it goes straight to the relay table.
        if step.publish.is_empty() && step.apply.iter().all(|a| matches!(a, Apply::Relay { .. })) {
            self.relay_from_cluster(step.apply);
            return;
        }
        self.hub().apply(self, step);
    }

    /// Relay data from another coordinator (a batch of it, in order): routed under one read
    /// of the relay table, laid out in one buffer, and the consecutive datagrams for one
    /// address sent in one UDP GSO send, as the UDP relay loop does; data for a node
    /// reached over its control connection is queued there.
    fn relay_from_cluster(&self, relays: Vec<Apply>) {
        let cluster = self.cluster.get().expect("called with a cluster");
        let mut buf = Vec::new();
        let mut runs = Vec::new();
        let mut batcher = Batcher::new(MAX_SEGMENTS);
        {
            let table = self.relay();
            let now = Instant::now();
            for a in relays {
                let Apply::Relay { src, dst, datagram } = a else {
                    continue;
                };
                Counters::bump(&cluster.relayed_in);
                match table.route_conn(now, src, dst) {
                    Ok(Dest::Udp(addr)) => {
                        let start = buf.len();
                        buf.resize(start + RELAY_HEADER_LEN, 0);
                        buf.extend_from_slice(&datagram);
                        write_relay_header(&mut buf[start..], src);
                        runs.extend(batcher.push(addr, start..buf.len()));
                    }
                    Ok(Dest::Conn(link)) => {
                        runs.extend(batcher.cut());
                        let mut d = vec![0u8; RELAY_HEADER_LEN];
                        d.extend_from_slice(&datagram);
                        self.forward_over_conn(&link, src, &mut d);
                    }
                    Err(why) => {
                        runs.extend(batcher.cut());
                        self.counters.dropped(why);
                    }
                }
            }
            runs.extend(batcher.cut());
        }
        let Some(udp) = self.udp.get() else {
            return;
        };
        for run in runs {
            let count = run.count();
            let sent = udp.send_run(run.to, &buf[run.bytes.clone()], run.segment);
            Counters::add(&self.counters.relayed_tcp, sent);
            Counters::add(&self.counters.relayed_tcp_bytes, run.bytes.len());
            Counters::add(&self.counters.relay_queue_full, count - sent);
        }
    }

    fn relay(&self) -> std::sync::RwLockReadGuard<'_, RelayTable<Link>> {
        read(&self.relay)
    }

    fn relay_mut(&self) -> std::sync::RwLockWriteGuard<'_, RelayTable<Link>> {
        write(&self.relay)
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
            Count::Statement => Counters::bump(&k.statements),
            Count::Throttled => Drops::bump(&self.limited.ctl_msgs_throttled),
            Count::ChangesForgotten => Counters::bump(&k.changes_forgotten),
            Count::ChangesForgottenOverCap => Counters::bump(&k.changes_forgotten_over_cap),
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
            let id = self.next_conn.fetch_add(1, Ordering::Relaxed) & !crate::registry::REMOTE_BASE;
            // The upper half names remote members of the cluster (see `crate::cluster`).
            if id != 0 && !is_remote_id(id) && !self.hub().outboxes.contains_key(&id) {
                return id;
            }
        }
    }

    /// Serves until an I/O error on a listening socket, with one UDP socket on the main port.
    pub async fn run(
        self: Arc<Self>,
        tcp: TcpListener,
        udp: UdpSocket,
        udp_alt: Option<UdpSocket>,
    ) -> io::Result<()> {
        self.run_group(tcp, vec![udp], udp_alt, Offload::from_env())
            .await
    }

    /// Serves until an I/O error on a listening socket. `udp`: the main port's sockets (bound
    /// with SO_REUSEPORT when more than one, see [`udpbatch::bind_group`]), one receive loop
    /// each; the first also carries what is relayed from control connections to UDP.
    pub async fn run_group(
        self: Arc<Self>,
        tcp: TcpListener,
        udp: Vec<UdpSocket>,
        udp_alt: Option<UdpSocket>,
        offload: Offload,
    ) -> io::Result<()> {
        self.udp_sockets.store(udp.len(), Ordering::Relaxed);
        let mut tasks = vec![
            tokio::spawn(self.clone().expire_loop()),
            tokio::spawn(self.clone().stats_loop()),
            tokio::spawn(self.clone().fanout_loop()),
            tokio::spawn(trim_loop()),
        ];
        for (i, socket) in udp.into_iter().enumerate() {
            let socket = Arc::new(socket);
            if i == 0 {
                self.set_datagram_sink(socket.clone());
            }
            tasks.push(tokio::spawn(self.clone().serve_udp(
                socket,
                UdpPort::Main,
                offload,
            )));
        }
        if let Some(alt) = udp_alt {
            tasks.push(tokio::spawn(self.clone().serve_udp(
                Arc::new(alt),
                UdpPort::Alt,
                offload,
            )));
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
            let peer = canonical(peer);
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
                    if server.bridging() {
                        // Another coordinator's bridge, or a node: told by the first byte.
                        let deadline =
                            tokio::time::Instant::now() + server.limits.register_deadline;
                        let mut first = [0u8; 1];
                        match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
                            Ok(Ok(1)) if crate::bridge::starts_as_bridge(first[0]) => {
                                crate::bridge::tune(&stream);
                                let cluster = server.cluster().expect("bridging").clone();
                                crate::bridge::serve(
                                    cluster.sealer(),
                                    &cluster.bridges,
                                    stream,
                                    deadline,
                                    || permit.registered(),
                                    |frame| server.cluster_receive_bridged(frame),
                                )
                                .await;
                                return;
                            }
                            Ok(Ok(1)) => {}
                            Ok(_) => return,
                            Err(_) => {
                                Drops::bump(&server.limited.tcp_register_deadline);
                                reset(fd);
                                return;
                            }
                        }
                    }
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
        let started = tokio::time::Instant::now();
        let handshake = handshake_responder(&mut stream, &self.private_key);
        let established = match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(e)) => {
                self.handshakes.observe(started.elapsed());
                e
            }
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
        let state = Arc::new(established.state);
        let mut reader = Reader::new(read, state.clone());
        let tx = ConnOutbox::new(state);
        let writer_task = tokio::spawn(tx.clone().drive(write));
        let conn: ConnId = self.new_conn_id();
        {
            let mut hub = self.hub();
            hub.outboxes.insert(conn, tx.clone());
            hub.board.open(conn, conn_key, hash);
        }

        // Until it registers, the connection reads against the deadline; a redeemer then
        // lingers for its answer.
        let mut read_until = Some((deadline, true));
        let mut registered = false;
        loop {
            let read = reader.next();
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
                Ok(Frame::Msg(m)) => m,
                Ok(Frame::Relay { dst, datagram }) if registered => {
                    if let Some(t) = self.tamper.get() {
                        t.saw_datagram(&datagram[RELAY_HEADER_LEN.min(datagram.len())..]);
                    }
                    self.relay_from_conn(conn, dst, datagram);
                    continue;
                }
                Ok(Frame::Relay { .. }) => {
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
            if let Some(t) = self.tamper.get() {
                t.saw_message(&msg);
            }
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
            let out = hub.board.close(Instant::now(), conn);
            hub.outboxes.remove(&conn);
            hub.carry_out(&self, out);
        }
        tx.close();
        // The writer ends once the queue is flushed.
        let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
    }

    /// Relay data that came over connection `conn`'s control channel, in `datagram` (laid
    /// out as a UDP relay datagram by the reader): sent from those bytes as a datagram, or
    /// encrypted from them into the destination's outbox.
    fn relay_from_conn(&self, conn: ConnId, dst: u32, datagram: &mut [u8]) {
        let dest = self.relay().route_conn(Instant::now(), conn, dst);
        match dest {
            Ok(Dest::Udp(addr)) => {
                write_relay_header(datagram, conn);
                if let Some(udp) = self.udp.get() {
                    if udp.send_datagram(addr, datagram) {
                        Counters::bump(&self.counters.relayed_tcp);
                        Counters::add(&self.counters.relayed_tcp_bytes, datagram.len());
                    } else {
                        Counters::bump(&self.counters.relay_queue_full);
                    }
                }
            }
            Ok(Dest::Conn(tx)) => self.forward_over_conn(&tx, conn, datagram),
            Err(why) => self.counters.dropped(why),
        }
    }

    /// Queues relay data from slot `src` (`datagram`, laid out as a UDP relay datagram) on a
    /// control connection.
    fn forward_over_conn(&self, link: &Link, src: u32, datagram: &mut [u8]) {
        let tx = match link {
            Link::Conn(tx) => tx,
            Link::Remote(via) => {
                // A remote member: to its coordinator (the payload after the header), sealed
                // with whatever else is queued for it by the NATS driver.
                if let Some(cluster) = self.cluster.get() {
                    let payload = &datagram[RELAY_HEADER_LEN.min(datagram.len())..];
                    Counters::bump(&cluster.relayed_out);
                    cluster.queue_out(Outgoing::Relay(RelayOut {
                        via: via.clone(),
                        src,
                        datagram: payload.to_vec(),
                    }));
                }
                return;
            }
        };
        let len = datagram.len();
        match tx.send_relay(relay_frame(datagram, src)) {
            Ok(()) => {
                Counters::bump(&self.counters.relayed_tcp);
                Counters::add(&self.counters.relayed_tcp_bytes, len);
            }
            Err(Refused::Full | Refused::Closed | Refused::TooLarge) => {
                Counters::bump(&self.counters.relay_queue_full)
            }
        }
    }

    /// One UDP socket's loop: a batch received (several datagrams of one sender with UDP GRO),
    /// each datagram routed under one read of the relay table, then the runs for one address
    /// sent with UDP GSO straight from the receive buffer, and the rest handled one by one.
    /// Buffers are the loop's own and reused: nothing is allocated per datagram.
    async fn serve_udp(self: Arc<Self>, udp: Arc<UdpSocket>, port: UdpPort, offload: Offload) {
        let fd = udp.as_raw_fd();
        if offload.gro {
            udpbatch::enable_gro(fd);
        }
        let gso = AtomicBool::new(offload.gso && udpbatch::gso_supported(fd));
        let mut buf = vec![0u8; 65536];
        let mut reply = [0u8; MAX_A2A_DATAGRAM];
        let mut routes: Vec<Route> = Vec::with_capacity(MAX_SEGMENTS);
        let mut batcher = Batcher::new(if gso.load(Ordering::Relaxed) {
            MAX_SEGMENTS
        } else {
            1
        });
        loop {
            let received = udp
                .async_io(Interest::READABLE, || udpbatch::recv_segments(fd, &mut buf))
                .await;
            let (n, from, segment) = match received {
                Ok(x) => x,
                Err(_) => {
                    // ICMP errors surface here on Linux, and truncated datagrams: go on.
                    Counters::bump(&self.counters.udp_dropped);
                    continue;
                }
            };
            let src = canonical(from);
            if let Some(t) = self.tamper.get() {
                for d in buf[..n].chunks(segment) {
                    t.saw_datagram(d);
                }
            }
            routes.clear();
            {
                let table = self.relay();
                let now = Instant::now();
                for d in buf[..n].chunks_mut(segment) {
                    routes.push(self.route_datagram(&table, now, src, port, d));
                }
            }
            let mut forwarded = 0;
            let mut forwarded_bytes = 0;
            let mut at = 0;
            for route in &routes {
                let bytes = at..(at + segment).min(n);
                at = bytes.end;
                if matches!(route, Route::Udp(_)) {
                    forwarded += 1;
                    forwarded_bytes += bytes.len();
                }
                let ended = match route {
                    Route::Udp(to) => batcher.push(*to, bytes.clone()),
                    _ => batcher.cut(),
                };
                if let Some(run) = ended {
                    self.send_run(&udp, &buf, run, &gso, &mut batcher).await;
                }
                if *route == Route::Control {
                    if let Some((to, d)) = self.handle_control(src, port, &buf[bytes], &mut reply) {
                        if udp.send_to(d, to).await.is_err() {
                            Counters::bump(&self.counters.udp_send_failed);
                        }
                    }
                }
            }
            if let Some(run) = batcher.cut() {
                self.send_run(&udp, &buf, run, &gso, &mut batcher).await;
            }
            if forwarded > 0 {
                Counters::add(&self.counters.relayed_udp, forwarded);
                Counters::add(&self.counters.relayed_udp_bytes, forwarded_bytes);
            }
        }
    }

    /// Sends the datagrams of `run` (in `buf`): one UDP GSO send when there are several and
    /// GSO works, else one call each. EIO or EINVAL (the kernel or the outgoing device cannot
    /// segment) turns GSO off for this socket for good; any other refusal (EMSGSIZE below the
    /// route's MTU, a firewall's EPERM) sends the run one datagram at a time, so each fares as
    /// it would have without GSO.
    async fn send_run(
        &self,
        udp: &UdpSocket,
        buf: &[u8],
        run: Run,
        gso: &AtomicBool,
        batcher: &mut Batcher,
    ) {
        let data = &buf[run.bytes.clone()];
        if run.count() > 1 && gso.load(Ordering::Relaxed) {
            let fd = udp.as_raw_fd();
            let sent = udp
                .async_io(Interest::WRITABLE, || {
                    udpbatch::send_segments(fd, data, run.segment as u16, run.to)
                })
                .await;
            match sent {
                Ok(_) => {
                    Counters::bump(&self.counters.relay_gso_sends);
                    Counters::add(&self.counters.relay_gso_datagrams, run.count());
                    return;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) => {
                    tracing::warn!("UDP GSO send refused ({e}); relaying one datagram per call");
                    gso.store(false, Ordering::Relaxed);
                    batcher.set_max_segments(1);
                }
                Err(_) => {}
            }
        }
        for d in data.chunks(run.segment.max(1)) {
            if udp.send_to(d, run.to).await.is_err() {
                Counters::bump(&self.counters.udp_send_failed);
            }
        }
    }

    /// Relay data on the main port, routed with `table` (read once per received batch): its
    /// header rewritten in place to name the source when it leaves over UDP, or queued on the
    /// destination's control connection, or dropped and counted. Anything else is
    /// [`Route::Control`], for [`Server::handle_control`].
    fn route_datagram(
        &self,
        table: &RelayTable<Link>,
        now: Instant,
        src: SocketAddr,
        port: UdpPort,
        datagram: &mut [u8],
    ) -> Route {
        if port != UdpPort::Main {
            return Route::Control;
        }
        let Some((dst, _)) = parse_relay_data(datagram) else {
            return Route::Control;
        };
        match table.route_udp(now, src, dst) {
            Ok((src_id, Dest::Udp(addr))) => {
                // Same datagram, header now naming the source. (Counted by the caller, once
                // per batch: one shared counter bumped per datagram from every core would
                // bounce its cache line between them.)
                write_relay_header(datagram, src_id);
                Route::Udp(addr)
            }
            Ok((src_id, Dest::Conn(tx))) => {
                self.forward_over_conn(&tx, src_id, datagram);
                Route::Done
            }
            Err(why) => {
                self.counters.dropped(why);
                Route::Done
            }
        }
    }

    /// One datagram that came to `port` from `from`: endpoint probes everywhere; binds and
    /// relay data on the main port only. Returns the datagram to send and where: relay data
    /// rewritten in place in `datagram` (its header now naming the source), or an endpoint
    /// reply written into `reply`. Relay data for a node reached over its control connection
    /// is queued there, and `None` returned. No allocation on the UDP relay path. (The UDP
    /// loops do the same a batch at a time.)
    pub fn handle_datagram<'a>(
        &self,
        from: SocketAddr,
        port: UdpPort,
        datagram: &'a mut [u8],
        reply: &'a mut [u8; MAX_A2A_DATAGRAM],
    ) -> Option<(SocketAddr, &'a [u8])> {
        let src = canonical(from);
        if let Some(t) = self.tamper.get() {
            t.saw_datagram(datagram);
        }
        let route = self.route_datagram(&self.relay(), Instant::now(), src, port, datagram);
        match route {
            Route::Udp(to) => {
                Counters::bump(&self.counters.relayed_udp);
                Counters::add(&self.counters.relayed_udp_bytes, datagram.len());
                Some((to, &*datagram))
            }
            Route::Done => None,
            Route::Control => self.handle_control(src, port, datagram, reply),
        }
    }

    /// A datagram that is not relay data, from `src` (canonical): an endpoint probe answered
    /// (into `reply`), a bind carried out and answered, or a drop counted.
    fn handle_control<'a>(
        &self,
        src: SocketAddr,
        port: UdpPort,
        datagram: &[u8],
        reply: &'a mut [u8; MAX_A2A_DATAGRAM],
    ) -> Option<(SocketAddr, &'a [u8])> {
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
                let now = Instant::now();
                // A refresh from the bound address needs the table for reading only.
                let refreshed = self.relay().refresh(now, relay_id, &secret, src);
                let bound = match refreshed {
                    Ok(true) => Ok(()),
                    Ok(false) => self.relay_mut().bind(now, relay_id, &secret, src),
                    Err(why) => Err(why),
                };
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

    /// Sends the member changes gathered once their window has passed. [`Server::run_group`]
    /// runs it; a server served otherwise ([`Server::serve_control`] in tests) must spawn it.
    pub async fn fanout_loop(self: Arc<Self>) {
        loop {
            let deadline = self.hub().board.fanout_deadline();
            match deadline {
                None => self.fanout_wake.notified().await,
                Some(at) => {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                    let mut hub = self.hub();
                    // Due: woken for it (on a paused test clock the wall clock may lag).
                    let out = hub.board.flush(at.max(Instant::now()));
                    hub.carry_out(&self, out);
                }
            }
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

    /// What the coordinator reports, in numbers only, never an identifier: how many members,
    /// networks, connections, relay slots and UDP sockets are live, and every counter.
    pub fn snapshot(&self) -> Snapshot {
        let (members, networks) = {
            let hub = self.hub();
            let r = hub.board.registry();
            (r.member_count(), r.network_count())
        };
        let (slots, bound) = {
            let relay = self.relay();
            (relay.len(), relay.udp_bound(Instant::now()))
        };
        let (open, pending) = {
            let a = self.admission();
            (a.open(), a.pending())
        };
        let sockets = self.udp_sockets.load(Ordering::Relaxed);
        let gauge = |n: usize| n as u64;
        let mut counters = self.counters.values();
        counters.extend(self.limited.values());
        if let Some(c) = self.cluster.get() {
            counters.extend(c.values());
        }
        Snapshot {
            gauges: vec![
                (
                    "members",
                    "Live registrations, over all networks",
                    gauge(members),
                ),
                (
                    "networks",
                    "Networks with at least one live member",
                    gauge(networks),
                ),
                (
                    "relay_slots",
                    "Relay slots (one per registered connection)",
                    gauge(slots),
                ),
                (
                    "connections",
                    "Open TCP control connections, registered or not",
                    gauge(open),
                ),
                (
                    "unregistered",
                    "Open TCP connections not registered yet",
                    gauge(pending),
                ),
                (
                    "relay_udp_bindings",
                    "Relay slots reached over UDP (a bind refreshed in the last 15 s)",
                    gauge(bound),
                ),
                (
                    "udp_sockets",
                    "UDP sockets on the main port (SO_REUSEPORT group), one relay loop each",
                    gauge(sockets),
                ),
            ],
            counters,
            handshakes: self.handshakes.snapshot(),
        }
    }

    /// The coordinator's only report, printed every `stats_every` and at shutdown: the
    /// [`Server::snapshot`] as `name=value` pairs.
    pub fn stats_line(&self) -> String {
        let s = self.snapshot();
        format!("live {} {}", pairs(&s.gauges), pairs(&s.counters))
    }
}

/// Closes `stream` with a RST when it is dropped. A node reads that as "busy, try again" and
/// backs off; an orderly close during the handshake means "this coordinator does not hold the
/// token's key" to it, which it gives up on after a few tries.
/// How often memory freed since is given back to the system.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Gives freed heap memory back to the system every [`TRIM_EVERY`] (glibc's `malloc_trim`): a
/// join or restart storm queues megabytes of records in the connections' outboxes for a few
/// seconds, and glibc keeps what a burst freed in its arenas (one per thread) otherwise, so the
/// RSS held by an idle coordinator was its peak's.
async fn trim_loop() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim takes no pointers; it only walks the allocator's own arenas.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

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
    use a2a_proto::noise_channel::{handshake_initiator, FrameReader, FrameWriter, Incoming};
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
            ssh: None,
        }
        .sign(k);
        let proof = Some(Signature(k.sign(REGISTER_CONTEXT, &est.handshake_hash)));
        let (r, w) = tokio::io::split(a);
        let (mut r, mut w) = est.split(r, w);
        w.send(&ClientMsg::Register {
            batches: true,
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
        // The members already there come at once, in a batch.
        assert!(matches!(
            b_rx.recv::<ServerMsg>().await.unwrap(),
            ServerMsg::Peers { up, .. } if up.len() == 1 && up[0].relay_id == a_id
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

    /// What a recording hook saw.
    #[derive(Default)]
    struct Seen {
        msgs: Mutex<Vec<String>>,
        datagrams: Mutex<Vec<Vec<u8>>>,
    }

    impl Tamper for Seen {
        fn after_register(&self, _: &NetworkId, _: &SignedRecord) -> Vec<(NodeKey, Injected)> {
            Vec::new()
        }
        fn saw_message(&self, msg: &ClientMsg) {
            lock(&self.msgs).push(format!("{msg:?}"));
        }
        fn saw_datagram(&self, datagram: &[u8]) {
            lock(&self.datagrams).push(datagram.to_vec());
        }
    }

    /// The hook's observers see every control message a node sends, and every datagram: over
    /// "UDP" and framed as relay data on a control connection (its payload, without the
    /// header room).
    #[tokio::test]
    async fn a_hook_sees_every_message_and_datagram_nodes_send() {
        let server = Server::new([1; 32]);
        let seen = Arc::new(Seen::default());
        server.set_tamper(seen.clone());
        server.set_datagram_sink(Arc::new(Sent::default()));
        let k = NetworkKey::derive(&[9; 32]);
        let (_a, a_id, _) = member(&server, &k, 2).await;
        let ((_, mut b_tx), _, _) = member(&server, &k, 3).await;
        {
            let msgs = lock(&seen.msgs);
            assert_eq!(msgs.len(), 2, "{msgs:?}");
            assert!(msgs.iter().all(|m| m.starts_with("Register")), "{msgs:?}");
            assert!(msgs[0].contains("n2") && msgs[1].contains("n3"), "{msgs:?}");
        }
        let mut d = [0u8; MAX_A2A_DATAGRAM];
        let len = A2aDatagram::EndpointProbe { nonce: [7; 8] }.encode(&mut d);
        let probe = d[..len].to_vec();
        let mut reply = [0u8; MAX_A2A_DATAGRAM];
        let from: SocketAddr = "198.51.100.1:5000".parse().unwrap();
        assert!(server
            .handle_datagram(from, UdpPort::Main, &mut d[..len], &mut reply)
            .is_some());
        b_tx.send_relay(a_id, &[4, 0, 0, 0, 9, 9]).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while lock(&seen.datagrams).len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the relay data not seen"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let datagrams = lock(&seen.datagrams);
        assert_eq!(datagrams[0], probe);
        assert_eq!(datagrams[1], vec![4, 0, 0, 0, 9, 9]);
    }

    /// Two nodes bound over real UDP to a group of two sockets: a burst from one, sent with
    /// UDP GSO, reaches the other whole and in order, each datagram's header naming the
    /// sender, through the batched loops.
    #[tokio::test]
    async fn a_burst_is_relayed_whole_and_in_order_through_the_batched_loops() {
        let server = Server::new([1; 32]);
        let k = NetworkKey::derive(&[9; 32]);
        let (_a, a_id, a_secret) = member(&server, &k, 2).await;
        let (_b, b_id, b_secret) = member(&server, &k, 3).await;
        let group = bind_udp("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let hub = group[0].local_addr().unwrap();
        let on = Offload {
            gro: true,
            gso: true,
        };
        for socket in group {
            tokio::spawn(
                server
                    .clone()
                    .serve_udp(Arc::new(socket), UdpPort::Main, on),
            );
        }
        let node = move |id: u32, secret: RelaySecret| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut d = [0u8; MAX_A2A_DATAGRAM];
            let len = A2aDatagram::RelayBind {
                nonce: [1; 8],
                relay_id: id,
                secret,
            }
            .encode(&mut d);
            s.send_to(&d[..len], hub).unwrap();
            let (n, _) = s.recv_from(&mut d).unwrap();
            assert!(matches!(
                A2aDatagram::decode(&d[..n]),
                Some(A2aDatagram::EndpointReply { .. })
            ));
            s
        };
        let a = tokio::task::spawn_blocking(move || node(a_id, a_secret));
        let b = tokio::task::spawn_blocking(move || node(b_id, b_secret));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        const SEG: usize = 1000;
        const COUNT: usize = 200;
        let mut burst = vec![0u8; SEG * COUNT];
        for (i, d) in burst.chunks_mut(SEG).enumerate() {
            write_relay_header(d, b_id);
            d[RELAY_HEADER_LEN..RELAY_HEADER_LEN + 4].copy_from_slice(&[4, 0, 0, 0]);
            d[RELAY_HEADER_LEN + 4..RELAY_HEADER_LEN + 8]
                .copy_from_slice(&(i as u32).to_be_bytes());
        }
        let receiver = tokio::task::spawn_blocking(move || {
            let mut got = Vec::new();
            let mut d = vec![0u8; 65536];
            while got.len() < COUNT {
                let (n, from) = b.recv_from(&mut d).expect("the whole burst arrives");
                assert_eq!(from, hub);
                assert_eq!(n, SEG);
                let (src, payload) = parse_relay_data(&d[..n]).unwrap();
                assert_eq!(src, a_id);
                got.push(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
            got
        });
        tokio::task::spawn_blocking(move || {
            let fd = a.as_raw_fd();
            for chunk in burst.chunks(SEG * 20) {
                if udpbatch::gso_supported(fd) {
                    udpbatch::send_segments(fd, chunk, SEG as u16, hub).unwrap();
                } else {
                    for d in chunk.chunks(SEG) {
                        a.send_to(d, hub).unwrap();
                    }
                }
                // Paced, so that no socket buffer overflows on a busy machine.
                std::thread::sleep(Duration::from_millis(5));
            }
        })
        .await
        .unwrap();
        let got = receiver.await.unwrap();
        assert_eq!(got, (0..COUNT as u32).collect::<Vec<_>>());
        assert_eq!(
            server.counters.relayed_udp.load(Ordering::Relaxed),
            COUNT as u64
        );
    }
}
