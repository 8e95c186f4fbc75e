//! a2a-swarm: many simulated nodes against one real coordinator, for `tests/swarm.rs` and for
//! measuring the hub by hand. Not part of a2a.
//!
//! ```text
//! a2a-swarm --coordinator HOST:PORT --coordinator-key KEY --networks M --nodes-per-network K
//!           --hold SECS [--connect-rate N] [--join-timeout SECS] [--prefix CIDR]
//! ```
//!
//! Makes M networks of its own (a random network secret each) and runs K nodes in each, all in
//! this one process: each node has its own key, its own Noise control connection (TCP) and a
//! UDP port of its own (its socket opened for each bind only, so a node holds one descriptor), registers with a record signed by its network's key, binds its relay
//! slot over UDP (and again with each heartbeat), heartbeats as the coordinator asks, and
//! verifies every peer record it receives. Connections are spread over every non-loopback IPv4
//! address of the namespace, at most N new connections per second from each (default 40,
//! within the coordinator's per-source bucket), so the per-source limits hold as they are.
//!
//! Once every node has registered and every peer list is complete (or after the join timeout,
//! default 120 s), the nodes are held, heartbeating, for SECS seconds; then one JSON object is
//! printed on stdout: nodes registered, peer lists complete at the end of the hold, join latency p50/p99/max in ms (from a node's
//! registration until every member registered before it lists it), records received and
//! verified, complete peer lists, binds answered, errors by kind. Bounded: at most 100 000
//! nodes, and the join timeout plus the hold plus 30 s in all.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use a2a_proto::control::{ClientMsg, RefuseReason, ServerMsg};
use a2a_proto::keys::{RelaySecret, Signature, REGISTER_CONTEXT};
use a2a_proto::noise_channel::{handshake_initiator, open_frame, Incoming};
use a2a_proto::udp::{A2aDatagram, MAX_A2A_DATAGRAM};
use a2a_proto::{NetworkKey, NodeKey, NodeRecord, SignedRecord};
use ipnet::Ipv4Net;
use snow::StatelessTransportState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, UdpSocket};

const MAX_NODES: usize = 100_000;

struct Args {
    coordinator: SocketAddr,
    coordinator_key: [u8; 32],
    networks: usize,
    per_network: usize,
    hold: Duration,
    connect_rate: f64,
    join_timeout: Duration,
    prefix: Ipv4Net,
    /// How many source addresses the nodes are spread over (set once they are known).
    sources: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut coordinator = None;
    let mut key = None;
    let (mut networks, mut per_network) = (1, 10);
    let mut hold = 10;
    let mut connect_rate = 40.0;
    let mut join_timeout = 120;
    let mut prefix: Ipv4Net = "100.64.0.0/10".parse().expect("a prefix");
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{a}: {e}"));
        match a.as_str() {
            "--coordinator" => {
                let v = value()?;
                let addr = std::net::ToSocketAddrs::to_socket_addrs(&v)
                    .map_err(|e| format!("--coordinator {v}: {e}"))?
                    .next()
                    .ok_or(format!("--coordinator {v}: no address"))?;
                coordinator = Some(addr);
            }
            "--coordinator-key" => {
                key = Some(
                    a2a_proto::keys::base64_exact::<32>(&value()?)
                        .ok_or("--coordinator-key: not a base64 32-byte key")?,
                )
            }
            "--networks" => networks = num(value()?)? as usize,
            "--nodes-per-network" => per_network = num(value()?)? as usize,
            "--hold" => hold = num(value()?)?,
            "--join-timeout" => join_timeout = num(value()?)?,
            "--connect-rate" => {
                connect_rate = value()?.parse().map_err(|e| format!("{a}: {e}"))?;
            }
            "--prefix" => prefix = value()?.parse().map_err(|e| format!("{a}: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if networks * per_network == 0 || networks * per_network > MAX_NODES {
        return Err(format!("between 1 and {MAX_NODES} nodes in all"));
    }
    if connect_rate <= 0.0 {
        return Err("--connect-rate must be positive".into());
    }
    Ok(Args {
        coordinator: coordinator.ok_or("--coordinator is required")?,
        coordinator_key: key.ok_or("--coordinator-key is required")?,
        networks,
        per_network,
        hold: Duration::from_secs(hold),
        connect_rate,
        join_timeout: Duration::from_secs(join_timeout),
        prefix,
        sources: 1,
    })
}

/// What every node reports into.
struct Swarm {
    start: Instant,
    networks: Vec<NetworkKey>,
    per_network: usize,
    /// By node index: when it was registered (µs since start; 0: not yet).
    registered_at: Vec<AtomicU64>,
    /// By node index: how many peers its table holds.
    peers_known: Vec<AtomicU64>,
    /// (learner, learnt, µs since start): a member learnt of another by a `PeerUp`.
    learnt: Mutex<Vec<(u32, u32, u64)>>,
    /// Node key to node index.
    index: HashMap<NodeKey, u32>,
    /// Verified records, by signature and body: each distinct record is verified once.
    verified: Mutex<HashMap<(String, String), bool>>,
    records_received: AtomicU64,
    records_verified: AtomicU64,
    binds_answered: AtomicU64,
    registered: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Set when the hold is over: nodes stop.
    stop: AtomicBool,
}

impl Swarm {
    fn micros(&self) -> u64 {
        (self.start.elapsed().as_micros() as u64).max(1)
    }

    fn error(&self, kind: &str) {
        *self.errors.lock().unwrap().entry(kind.into()).or_default() += 1;
    }

    /// Verifies `record` as a record of network `net`, once per distinct record.
    fn verify(&self, net: usize, record: &SignedRecord) -> Option<NodeKey> {
        self.records_received.fetch_add(1, Ordering::Relaxed);
        let id = self.networks[net].id();
        let key = (record.sig.clone(), record.body.clone());
        let cached = self.verified.lock().unwrap().get(&key).copied();
        let ok = match cached {
            Some(ok) => ok,
            None => {
                let ok = record.verify(&id).is_ok();
                self.verified.lock().unwrap().insert(key, ok);
                ok
            }
        };
        if !ok {
            self.error("record_bad_signature");
            return None;
        }
        self.records_verified.fetch_add(1, Ordering::Relaxed);
        let node_key = serde_json::from_str::<NodeRecord>(&record.body)
            .ok()?
            .node_key;
        match self.index.get(&node_key) {
            Some(&i) if i as usize / self.per_network == net => Some(node_key),
            _ => {
                self.error("record_not_a_member");
                None
            }
        }
    }
}

/// One node's secrets.
struct NodeId {
    index: u32,
    net: usize,
    private: [u8; 32],
    key: NodeKey,
}

fn main() {
    let mut args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("a2a-swarm: {e}");
            std::process::exit(2);
        }
    };
    raise_fd_limit();
    let sources = local_ipv4();
    if sources.is_empty() {
        eprintln!("a2a-swarm: no non-loopback IPv4 address in this namespace");
        std::process::exit(2);
    }
    args.sources = sources.len();
    let total = args.networks * args.per_network;
    if total / sources.len() > 20_000 {
        eprintln!("a2a-swarm: more than 20 000 nodes per address");
        std::process::exit(2);
    }
    let networks: Vec<NetworkKey> = (0..args.networks)
        .map(|_| NetworkKey::derive(&rand::random::<[u8; 32]>()))
        .collect();
    let nodes: Vec<NodeId> = (0..total)
        .map(|i| {
            let private: [u8; 32] = rand::random();
            let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(private));
            NodeId {
                index: i as u32,
                net: i / args.per_network,
                private,
                key: NodeKey(public.to_bytes()),
            }
        })
        .collect();
    let swarm = Arc::new(Swarm {
        start: Instant::now(),
        networks,
        per_network: args.per_network,
        registered_at: (0..total).map(|_| AtomicU64::new(0)).collect(),
        peers_known: (0..total).map(|_| AtomicU64::new(0)).collect(),
        learnt: Mutex::new(Vec::new()),
        index: nodes.iter().map(|n| (n.key, n.index)).collect(),
        verified: Mutex::new(HashMap::new()),
        records_received: AtomicU64::new(0),
        records_verified: AtomicU64::new(0),
        binds_answered: AtomicU64::new(0),
        registered: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        stop: AtomicBool::new(false),
    });
    // One thread: the swarm shares the machine with the coordinator it measures.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let report = rt.block_on(run(args, sources, nodes, swarm));
    println!("{report}");
}

async fn run(args: Args, sources: Vec<Ipv4Addr>, nodes: Vec<NodeId>, swarm: Arc<Swarm>) -> String {
    let total = nodes.len();
    let args = Arc::new(args);
    // Started round-robin over the sources, each source at its own pace.
    let gap = Duration::from_secs_f64(1.0 / (args.connect_rate * sources.len() as f64));
    let mut tasks = Vec::with_capacity(total);
    let mut next = tokio::time::Instant::now();
    for (i, node) in nodes.into_iter().enumerate() {
        tokio::time::sleep_until(next).await;
        next += gap;
        let source = sources[i % sources.len()];
        let (swarm, args) = (swarm.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            node_main(&args, source, node, &swarm).await;
        }));
    }
    // Joined: everyone registered and every peer list complete, or the timeout.
    let deadline = swarm.start + args.join_timeout;
    let want = (args.per_network - 1) as u64;
    loop {
        let registered = swarm.registered.load(Ordering::Relaxed) as usize;
        let complete = swarm
            .peers_known
            .iter()
            .all(|p| p.load(Ordering::Relaxed) >= want);
        if (registered == total && complete) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let joined_s = swarm.start.elapsed().as_secs_f64();
    tokio::time::sleep(args.hold).await;
    // Peer lists as they stand at the end of the hold, before the nodes leave.
    let complete = swarm
        .peers_known
        .iter()
        .filter(|p| p.load(Ordering::Relaxed) >= want)
        .count();
    swarm.stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    report(&swarm, &sources, total, complete, joined_s)
}

fn report(
    swarm: &Swarm,
    sources: &[Ipv4Addr],
    total: usize,
    complete: usize,
    joined_s: f64,
) -> String {
    let reg: Vec<u64> = swarm
        .registered_at
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    // A node's join: from its registration until the last member registered before it learnt
    // of it.
    let mut last = vec![0u64; total];
    for &(learner, learnt, at) in swarm.learnt.lock().unwrap().iter() {
        let (l, n) = (learner as usize, learnt as usize);
        if reg[l] != 0 && reg[n] != 0 && reg[l] < reg[n] {
            last[n] = last[n].max(at);
        }
    }
    let mut joins: Vec<f64> = (0..total)
        .filter(|&n| reg[n] != 0 && last[n] != 0)
        .map(|n| last[n].saturating_sub(reg[n]) as f64 / 1000.0)
        .collect();
    joins.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| -> f64 {
        if joins.is_empty() {
            return 0.0;
        }
        joins[((joins.len() as f64 * p).ceil() as usize).clamp(1, joins.len()) - 1]
    };
    serde_json::json!({
        "nodes": total,
        "sources": sources.len(),
        "registered": swarm.registered.load(Ordering::Relaxed),
        "peer_lists_complete": complete,
        "joined_s": (joined_s * 10.0).round() / 10.0,
        "join_ms": {
            "count": joins.len(),
            "p50": (pct(0.50) * 10.0).round() / 10.0,
            "p99": (pct(0.99) * 10.0).round() / 10.0,
            "max": (joins.last().copied().unwrap_or(0.0) * 10.0).round() / 10.0,
        },
        "records_received": swarm.records_received.load(Ordering::Relaxed),
        "records_verified": swarm.records_verified.load(Ordering::Relaxed),
        "binds_answered": swarm.binds_answered.load(Ordering::Relaxed),
        "errors": *swarm.errors.lock().unwrap(),
    })
    .to_string()
}

/// Node `index`'s UDP port on its source: distinct among the nodes sharing the source.
fn udp_port(index: u32, args: &Args) -> u16 {
    10_000 + (index as usize / args.sources) as u16
}

/// One node: connects (retrying a few times after a refusal or failure), registers, then lives
/// until the swarm stops.
async fn node_main(args: &Args, source: Ipv4Addr, node: NodeId, swarm: &Swarm) {
    let mut attempt = 0u32;
    for tries in 0..5u32 {
        if swarm.stop.load(Ordering::Relaxed) {
            return;
        }
        match session(args, source, &node, attempt, swarm).await {
            Ok(()) => return,
            Err(Failure::AddressInUse) => attempt += 1,
            Err(Failure::Other(kind)) => {
                swarm.error(kind);
                tokio::time::sleep(Duration::from_millis(500 << tries)).await;
            }
        }
    }
    swarm.error("gave_up");
}

enum Failure {
    AddressInUse,
    Other(&'static str),
}

fn io_kind(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connect_refused",
        io::ErrorKind::ConnectionReset => "reset",
        io::ErrorKind::TimedOut => "timed_out",
        io::ErrorKind::UnexpectedEof => "closed",
        io::ErrorKind::AddrNotAvailable => "no_local_port",
        io::ErrorKind::InvalidData => "malformed_frame",
        io::ErrorKind::BrokenPipe => "broken_pipe",
        io::ErrorKind::ConnectionAborted => "aborted",
        io::ErrorKind::AddrInUse => "addr_in_use",
        io::ErrorKind::NotConnected => "not_connected",
        _ if e.raw_os_error() == Some(libc::EMFILE) => "out_of_descriptors",
        _ if e.raw_os_error() == Some(libc::EHOSTUNREACH) => "host_unreachable",
        _ if e.raw_os_error() == Some(libc::ETIMEDOUT) => "timed_out",
        _ => "io",
    }
}

async fn session(
    args: &Args,
    source: Ipv4Addr,
    node: &NodeId,
    attempt: u32,
    swarm: &Swarm,
) -> Result<(), Failure> {
    let io = |e: io::Error| Failure::Other(io_kind(&e));
    let socket = TcpSocket::new_v4().map_err(io)?;
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .map_err(io)?;
    let mut stream =
        tokio::time::timeout(Duration::from_secs(10), socket.connect(args.coordinator))
            .await
            .map_err(|_| Failure::Other("connect_timed_out"))?
            .map_err(io)?;
    let _ = stream.set_nodelay(true);
    let est = handshake_initiator(&mut stream, &node.private, &args.coordinator_key)
        .await
        .map_err(|_| Failure::Other("handshake_failed"))?;
    let net_key = &swarm.networks[node.net];
    let record = NodeRecord {
        network: net_key.id(),
        node_key: node.key,
        name: format!("s{}", node.index),
        ip: a2a_proto::overlay::derive_ip(args.prefix, &node.key, attempt),
        candidates: vec![SocketAddr::new(IpAddr::V4(source), 51820)],
        issued_ms: a2a_proto::time::now_ms(),
    }
    .sign(net_key);
    let proof = Signature(net_key.sign(REGISTER_CONTEXT, &est.handshake_hash));
    let (r, w) = stream.into_split();
    let state = Arc::new(est.state);
    let mut rx = Rx {
        io: r,
        state: state.clone(),
        nonce: 0,
        cipher: Vec::new(),
        plain: Vec::new(),
    };
    let mut tx = Tx {
        io: w,
        state,
        nonce: 0,
        buf: Vec::new(),
    };
    tx.send(&ClientMsg::Register {
        network: net_key.id(),
        proof: Some(proof),
        record,
    })
    .await
    .map_err(io)?;
    let first = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .map_err(|_| Failure::Other("register_timed_out"))?
        .map_err(io)?;
    let (heartbeat, relay_id, secret, initial) = match first {
        Incoming::Msg(ServerMsg::Registered {
            heartbeat_s,
            relay_id,
            relay_secret,
            peers,
        }) => (heartbeat_s.max(1), relay_id, relay_secret, peers),
        Incoming::Msg(ServerMsg::Refused {
            reason: RefuseReason::AddressInUse,
            ..
        }) => return Err(Failure::AddressInUse),
        Incoming::Msg(ServerMsg::Refused { .. }) => return Err(Failure::Other("refused")),
        _ => return Err(Failure::Other("unexpected_message")),
    };
    let me = node.index as usize;
    // A node that registers again (after a lost connection) is counted once, at its first.
    if swarm.registered_at[me]
        .compare_exchange(0, swarm.micros(), Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        swarm.registered.fetch_add(1, Ordering::Relaxed);
    }
    // The node's UDP address: a fixed port of its own on its source (below the ephemeral
    // range), its socket opened only for each bind, so that a node holds one descriptor.
    let udp_addr = SocketAddr::new(IpAddr::V4(source), udp_port(node.index, args));
    bind(udp_addr, args.coordinator, relay_id, &secret, swarm).await;
    // Reading and writing run side by side, neither ever cancelled mid-frame (a read dropped
    // half-way would lose the stream's framing).
    let read = async {
        let mut peers: HashMap<NodeKey, ()> = HashMap::new();
        let mut seen_initial = 0u32;
        loop {
            let frame = rx.recv().await.map_err(|e| {
                if swarm.stop.load(Ordering::Relaxed) {
                    Failure::Other("closed_at_stop")
                } else {
                    io(e)
                }
            })?;
            match frame {
                Incoming::Msg(ServerMsg::PeerUp { record, .. }) => {
                    let Some(key) = swarm.verify(node.net, &record) else {
                        continue;
                    };
                    if peers.insert(key, ()).is_none() {
                        swarm.peers_known[me].store(peers.len() as u64, Ordering::Relaxed);
                    }
                    if seen_initial < initial {
                        seen_initial += 1;
                    } else if let Some(&learnt) = swarm.index.get(&key) {
                        let at = swarm.micros();
                        swarm.learnt.lock().unwrap().push((node.index, learnt, at));
                    }
                }
                Incoming::Msg(ServerMsg::PeerDown { node_key }) => {
                    if !swarm.stop.load(Ordering::Relaxed) {
                        swarm.error("peer_down");
                    }
                    if peers.remove(&node_key).is_some() {
                        swarm.peers_known[me].store(peers.len() as u64, Ordering::Relaxed);
                    }
                }
                Incoming::Msg(ServerMsg::HeartbeatAck) | Incoming::Msg(ServerMsg::Punch { .. }) => {
                }
                Incoming::Msg(_) => swarm.error("unexpected_message"),
                Incoming::Relay(..) => swarm.error("unexpected_relay"),
            }
        }
    };
    let write = async {
        let mut beat = tokio::time::interval(Duration::from_secs(heartbeat as u64));
        beat.tick().await;
        let mut stop_check = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    tx.send(&ClientMsg::Heartbeat).await.map_err(io)?;
                    bind(udp_addr, args.coordinator, relay_id, &secret, swarm).await;
                }
                _ = stop_check.tick() => {
                    if swarm.stop.load(Ordering::Relaxed) {
                        let _ = tx.send(&ClientMsg::Leave).await;
                        return Ok(());
                    }
                }
            }
        }
    };
    tokio::select! {
        r = read => r,
        r = write => r,
    }
}

/// A UDP relay bind, answered (with an endpoint reply) within three seconds, or counted.
async fn bind(
    from: SocketAddr,
    to: SocketAddr,
    relay_id: u32,
    secret: &RelaySecret,
    swarm: &Swarm,
) {
    let Ok(udp) = UdpSocket::bind(from).await else {
        return swarm.error("bind_no_socket");
    };
    let nonce: [u8; 8] = rand::random();
    let mut d = [0u8; MAX_A2A_DATAGRAM];
    let len = A2aDatagram::RelayBind {
        nonce,
        relay_id,
        secret: *secret,
    }
    .encode(&mut d);
    if udp.send_to(&d[..len], to).await.is_err() {
        return swarm.error("bind_send_failed");
    }
    let answer = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let Ok((n, _)) = udp.recv_from(&mut d).await else {
                return false;
            };
            if let Some(A2aDatagram::EndpointReply { nonce: got, .. }) =
                A2aDatagram::decode(&d[..n])
            {
                if got == nonce {
                    return true;
                }
            }
        }
    })
    .await;
    if answer == Ok(true) {
        swarm.binds_answered.fetch_add(1, Ordering::Relaxed);
    } else {
        swarm.error("bind_unanswered");
    }
}

/// The node's receiving end of the control channel, with buffers only as large as its frames.
struct Rx {
    io: OwnedReadHalf,
    state: Arc<StatelessTransportState>,
    nonce: u64,
    cipher: Vec<u8>,
    plain: Vec<u8>,
}

impl Rx {
    async fn recv(&mut self) -> io::Result<Incoming<ServerMsg>> {
        let len = self.io.read_u16().await? as usize;
        self.cipher.resize(len, 0);
        self.io.read_exact(&mut self.cipher).await?;
        let frame = open_frame(&self.state, self.nonce, &self.cipher, &mut self.plain)?;
        self.nonce += 1;
        if self.cipher.capacity() > 4096 {
            self.cipher = Vec::new();
            self.plain = Vec::new();
        }
        Ok(frame)
    }
}

/// The node's sending end.
struct Tx {
    io: OwnedWriteHalf,
    state: Arc<StatelessTransportState>,
    nonce: u64,
    buf: Vec<u8>,
}

impl Tx {
    async fn send(&mut self, msg: &ClientMsg) -> io::Result<()> {
        let plain = serde_json::to_vec(msg).map_err(io::Error::other)?;
        self.buf.resize(2 + plain.len() + 16, 0);
        let n = self
            .state
            .write_message(self.nonce, &plain, &mut self.buf[2..])
            .map_err(|e| io::Error::other(format!("noise: {e}")))?;
        self.nonce += 1;
        self.buf[..2].copy_from_slice(&(n as u16).to_be_bytes());
        self.io.write_all(&self.buf[..2 + n]).await
    }
}

/// Every IPv4 address of this namespace's interfaces but loopback.
fn local_ipv4() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list freed below; each entry's address pointer is
    // null or points at a sockaddr of its family.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut p = ifap;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() && (*a).sa_family as libc::c_int == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
                if !ip.is_loopback() && !out.contains(&ip) {
                    out.push(ip);
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

/// Every node holds two descriptors: lift the limit to the kernel's `nr_open` where allowed
/// (root), else the soft limit to the hard one.
fn raise_fd_limit() {
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: nr_open.max(lim.rlim_max),
            rlim_max: nr_open.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
