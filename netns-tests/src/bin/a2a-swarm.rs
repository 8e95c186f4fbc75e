//! a2a-swarm: many simulated nodes against one real coordinator, for `tests/swarm.rs` and for
//! measuring the hub by hand. Not part of a2a.
//!
//! ```text
//! a2a-swarm --coordinator HOST:PORT --coordinator-key KEY --networks M --nodes-per-network K
//!           --hold SECS [--connect-rate N] [--join-timeout SECS] [--prefix CIDR]
//!           [--token TOKEN] [--expect-restart SECS]
//!           [--misbehave-silent N] [--misbehave-vanish N] [--misbehave-loop N]
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
//! verified, complete peer lists, binds answered, member messages received (`PeerUp`, `PeerDown`
//! or a `Peers` batch, each counted once) and of those the batches, errors by kind. Bounded: at most 100 000
//! nodes, and the join timeout plus the restart wait plus the hold plus 30 s in all.
//!
//! A node whose control connection is lost reconnects as `a2ad` does (a back-off from 0.5 s
//! doubling to 4 s, reset by a registration; here with jitter, each wait drawn from its upper
//! half) and registers again with the same key and a fresh record. `--expect-restart SECS`:
//! once joined, `joined` is printed on stderr (the caller then kills and restarts the
//! coordinator) and the swarm waits up to SECS for the first lost connection and for every node
//! to have registered again and every peer list to be complete again; the report's `restart`
//! object holds the times from the first lost connection.
//!
//! `--token TOKEN`: one network, the token's (its secret signs the records; its first endpoint
//! and its coordinator key are used unless given): the swarm joins an existing network, in which
//! real nodes may be members too (their records are verified and counted as `foreign_records`).
//!
//! Misbehaving nodes, each kind in a network of its own and all from the last source address
//! (so the per-source limits they meet are not the well-behaved nodes'): `silent` ones register
//! and never heartbeat (the coordinator should end them at its registration deadline; they
//! register again a second later), `vanish` ones connect, send their registration and close at
//! once, once a second, and `loop` ones register, close as soon as they are registered and
//! connect again at once, as fast as the coordinator lets them. The report's `misbehave` object
//! counts what they did.

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
use a2a_proto::{JoinToken, NetworkKey, NodeKey, NodeRecord, SignedRecord};
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
    /// `--token`: the network to join instead of networks of its own.
    token: Option<JoinToken>,
    /// `--expect-restart`: how long to wait, once joined, for a lost coordinator to be back.
    restart_wait: Option<Duration>,
    /// Misbehaving nodes by kind.
    silent: usize,
    vanish: usize,
    looping: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut coordinator = None;
    let mut key = None;
    let (mut networks, mut per_network) = (1, 10);
    let mut hold = 10;
    let mut connect_rate = 40.0;
    let mut join_timeout = 120;
    let mut prefix: Option<Ipv4Net> = None;
    let mut token = None;
    let mut restart_wait = None;
    let (mut silent, mut vanish, mut looping) = (0, 0, 0);
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
            "--prefix" => prefix = Some(value()?.parse().map_err(|e| format!("{a}: {e}"))?),
            "--token" => {
                token = Some(JoinToken::parse(&value()?).map_err(|e| format!("--token: {e}"))?)
            }
            "--expect-restart" => restart_wait = Some(Duration::from_secs(num(value()?)?)),
            "--misbehave-silent" => silent = num(value()?)? as usize,
            "--misbehave-vanish" => vanish = num(value()?)? as usize,
            "--misbehave-loop" => looping = num(value()?)? as usize,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if let Some(t) = &token {
        if networks != 1 {
            return Err("--token joins one network: --networks must be 1".into());
        }
        if coordinator.is_none() {
            let e = t.endpoints.first().ok_or("--token: no endpoint")?;
            let addr = std::net::ToSocketAddrs::to_socket_addrs(e)
                .map_err(|err| format!("the token's endpoint {e}: {err}"))?
                .next()
                .ok_or(format!("the token's endpoint {e}: no address"))?;
            coordinator = Some(addr);
        }
        key = key.or(Some(t.coordinator_key));
        prefix = prefix.or(Some(t.prefix));
    }
    if networks * per_network == 0 || networks * per_network + silent + vanish + looping > MAX_NODES
    {
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
        prefix: prefix.unwrap_or_else(|| "100.64.0.0/10".parse().expect("a prefix")),
        sources: 1,
        token,
        restart_wait,
        silent,
        vanish,
        looping,
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
    /// By node index: when it last registered (µs since start; 0: never).
    last_registered_at: Vec<AtomicU64>,
    /// Registrations of well-behaved nodes, first ones and again after a lost connection.
    registrations: AtomicU64,
    /// Registered connections of well-behaved nodes lost before the stop.
    connections_lost: AtomicU64,
    /// Set once every node registered and every peer list was complete.
    joined: AtomicBool,
    /// When the first registered connection was lost after the join (µs since start; 0: none).
    lost_at: AtomicU64,
    /// `--token`: records of members that are not the swarm's are expected.
    foreign: bool,
    foreign_records: AtomicU64,
    relay_frames: AtomicU64,
    /// Messages about members received by the well-behaved nodes (`PeerUp`, `PeerDown`,
    /// `Peers`), and of those the `Peers` batches.
    member_messages: AtomicU64,
    batches: AtomicU64,
    mis: Misbehaved,
    /// How many misbehaving nodes of each kind (silent, vanish, loop).
    mis_counts: [usize; 3],
}

/// What the misbehaving nodes did.
#[derive(Default)]
struct Misbehaved {
    silent_registrations: AtomicU64,
    /// Silent registrations the coordinator ended at its deadline, and how long it held them
    /// (ms); those that ended sooner.
    silent_dropped: AtomicU64,
    silent_ended_early: AtomicU64,
    /// The oldest silent registration still open at the stop (ms).
    silent_open_max_ms: AtomicU64,
    silent_held_min_ms: AtomicU64,
    silent_held_max_ms: AtomicU64,
    vanish_sent: AtomicU64,
    loop_registrations: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Misbehaved {
    fn error(&self, kind: &str) {
        *self.errors.lock().unwrap().entry(kind.into()).or_default() += 1;
    }
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
            None if self.foreign => {
                self.foreign_records.fetch_add(1, Ordering::Relaxed);
                Some(node_key)
            }
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
    let mut sources = local_ipv4();
    if sources.is_empty() {
        eprintln!("a2a-swarm: no non-loopback IPv4 address in this namespace");
        std::process::exit(2);
    }
    // The misbehaving nodes' address: the last one, their own when there are two or more.
    let misbehaving = args.silent + args.vanish + args.looping;
    let mis_source = *sources.last().expect("an address");
    if misbehaving > 0 && sources.len() > 1 {
        sources.pop();
    }
    args.sources = sources.len();
    let total = args.networks * args.per_network;
    if total / sources.len() > 20_000 {
        eprintln!("a2a-swarm: more than 20 000 nodes per address");
        std::process::exit(2);
    }
    // The swarm's networks, then one for each kind of misbehaving node.
    let mut networks: Vec<NetworkKey> = match &args.token {
        Some(t) => vec![NetworkKey::derive(&t.network_secret)],
        None => (0..args.networks)
            .map(|_| NetworkKey::derive(&rand::random::<[u8; 32]>()))
            .collect(),
    };
    networks.extend((0..3).map(|_| NetworkKey::derive(&rand::random::<[u8; 32]>())));
    let node_id = |index: usize, net: usize| {
        let private: [u8; 32] = rand::random();
        let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(private));
        NodeId {
            index: index as u32,
            net,
            private,
            key: NodeKey(public.to_bytes()),
        }
    };
    let nodes: Vec<NodeId> = (0..total)
        .map(|i| node_id(i, i / args.per_network))
        .collect();
    let kinds = [
        (Kind::Silent, args.silent),
        (Kind::Vanish, args.vanish),
        (Kind::Loop, args.looping),
    ];
    let mut misfits = Vec::new();
    for (k, (kind, count)) in kinds.into_iter().enumerate() {
        for _ in 0..count {
            misfits.push((kind, node_id(total + misfits.len(), args.networks + k)));
        }
    }
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
        last_registered_at: (0..total).map(|_| AtomicU64::new(0)).collect(),
        registrations: AtomicU64::new(0),
        connections_lost: AtomicU64::new(0),
        joined: AtomicBool::new(false),
        lost_at: AtomicU64::new(0),
        foreign: args.token.is_some(),
        foreign_records: AtomicU64::new(0),
        relay_frames: AtomicU64::new(0),
        member_messages: AtomicU64::new(0),
        batches: AtomicU64::new(0),
        mis: Misbehaved {
            silent_held_min_ms: AtomicU64::new(u64::MAX),
            ..Default::default()
        },
        mis_counts: [args.silent, args.vanish, args.looping],
    });
    // One thread: the swarm shares the machine with the coordinator it measures.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let report = rt.block_on(run(args, sources, nodes, (mis_source, misfits), swarm));
    println!("{report}");
}

async fn run(
    args: Args,
    sources: Vec<Ipv4Addr>,
    nodes: Vec<NodeId>,
    (mis_source, misfits): (Ipv4Addr, Vec<(Kind, NodeId)>),
    swarm: Arc<Swarm>,
) -> String {
    let total = nodes.len();
    let args = Arc::new(args);
    // The misbehaving nodes start at once, each at its own pace.
    let mut mis_tasks = Vec::new();
    for (kind, node) in misfits {
        let (swarm, args) = (swarm.clone(), args.clone());
        mis_tasks.push(tokio::spawn(async move {
            misbehave(&args, mis_source, kind, node, &swarm).await;
        }));
    }
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
    swarm.joined.store(true, Ordering::Relaxed);
    eprintln!("a2a-swarm: joined in {joined_s:.1} s");
    let restart = match args.restart_wait {
        Some(wait) => Some(await_restart(&swarm, wait, want).await),
        None => None,
    };
    tokio::time::sleep(args.hold).await;
    // Peer lists as they stand at the end of the hold, before the nodes leave.
    let complete = swarm
        .peers_known
        .iter()
        .filter(|p| p.load(Ordering::Relaxed) >= want)
        .count();
    swarm.stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        for t in tasks.into_iter().chain(mis_tasks) {
            let _ = t.await;
        }
    })
    .await;
    let mut out = report(&swarm, &sources, total, complete, joined_s);
    if let Some(r) = restart {
        out["restart"] = r;
    }
    out.to_string()
}

/// Once joined: waits up to `wait` for a lost connection and then for every node to have
/// registered again and every peer list to be complete again. Times are from the first lost
/// connection.
async fn await_restart(swarm: &Swarm, wait: Duration, want: u64) -> serde_json::Value {
    let deadline = Instant::now() + wait;
    let ms = |us: u64| (us / 100) as f64 / 10.0;
    let mut all_registered_us = 0;
    loop {
        let lost = swarm.lost_at.load(Ordering::Relaxed);
        if lost != 0 {
            let again = swarm
                .last_registered_at
                .iter()
                .filter(|a| a.load(Ordering::Relaxed) > lost)
                .count();
            if again == swarm.last_registered_at.len() && all_registered_us == 0 {
                all_registered_us = swarm
                    .last_registered_at
                    .iter()
                    .map(|a| a.load(Ordering::Relaxed))
                    .max()
                    .unwrap_or(0)
                    - lost;
            }
            let complete = swarm
                .peers_known
                .iter()
                .filter(|p| p.load(Ordering::Relaxed) >= want)
                .count();
            let done = all_registered_us != 0 && complete == swarm.peers_known.len();
            if done || Instant::now() >= deadline {
                return serde_json::json!({
                    "lost_at_s": ms(lost) / 1000.0,
                    "registered_again": again,
                    "all_registered_again_ms": ms(all_registered_us),
                    "peer_lists_complete": complete,
                    "recovered": done,
                    "recovered_ms": if done { ms(swarm.micros() - lost) } else { 0.0 },
                    "connections_lost": swarm.connections_lost.load(Ordering::Relaxed),
                });
            }
        } else if Instant::now() >= deadline {
            return serde_json::json!({ "lost_at_s": 0, "recovered": false });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn report(
    swarm: &Swarm,
    sources: &[Ipv4Addr],
    total: usize,
    complete: usize,
    joined_s: f64,
) -> serde_json::Value {
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
    let m = &swarm.mis;
    let held_min = m.silent_held_min_ms.load(Ordering::Relaxed);
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
        "registrations": swarm.registrations.load(Ordering::Relaxed),
        "connections_lost": swarm.connections_lost.load(Ordering::Relaxed),
        "foreign_records": swarm.foreign_records.load(Ordering::Relaxed),
        "relay_frames": swarm.relay_frames.load(Ordering::Relaxed),
        "member_messages": swarm.member_messages.load(Ordering::Relaxed),
        "member_batches": swarm.batches.load(Ordering::Relaxed),
        "misbehave": {
            "silent": {
                "nodes": swarm.mis_counts[0],
                "registrations": m.silent_registrations.load(Ordering::Relaxed),
                "dropped_at_deadline": m.silent_dropped.load(Ordering::Relaxed),
                "ended_early": m.silent_ended_early.load(Ordering::Relaxed),
                "open_at_stop_ms_max": m.silent_open_max_ms.load(Ordering::Relaxed),
                "held_ms_min": if held_min == u64::MAX { 0 } else { held_min },
                "held_ms_max": m.silent_held_max_ms.load(Ordering::Relaxed),
            },
            "vanish": {
                "nodes": swarm.mis_counts[1],
                "registrations_sent": m.vanish_sent.load(Ordering::Relaxed),
            },
            "loop": {
                "nodes": swarm.mis_counts[2],
                "registrations": m.loop_registrations.load(Ordering::Relaxed),
            },
            "errors": *m.errors.lock().unwrap(),
        },
    })
}

/// Node `index`'s UDP port on its source: distinct among the nodes sharing the source.
fn udp_port(index: u32, args: &Args) -> u16 {
    10_000 + (index as usize / args.sources) as u16
}

/// One node: connects, registers and lives until the swarm stops; when its connection is
/// lost or refused it backs off (0.5 s doubling to 4 s, reset by a registration, each wait drawn
/// from its upper half) and connects again.
async fn node_main(args: &Args, source: Ipv4Addr, node: NodeId, swarm: &Swarm) {
    let mut attempt = 0u32;
    let mut backoff = BACKOFF_MIN;
    let me = node.index as usize;
    while !swarm.stop.load(Ordering::Relaxed) {
        let mut registered = false;
        let result = session(args, source, &node, attempt, swarm, &mut registered).await;
        if registered {
            backoff = BACKOFF_MIN;
            swarm.peers_known[me].store(0, Ordering::Relaxed);
            if swarm.stop.load(Ordering::Relaxed) {
                return;
            }
            swarm.connections_lost.fetch_add(1, Ordering::Relaxed);
            if swarm.joined.load(Ordering::Relaxed) {
                let _ = swarm.lost_at.compare_exchange(
                    0,
                    swarm.micros(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
        }
        match result {
            Ok(()) => return,
            Err(Failure::AddressInUse) => {
                attempt += 1;
                continue;
            }
            Err(Failure::Other(kind)) => {
                if !registered {
                    swarm.error(kind);
                }
            }
        }
        tokio::time::sleep(jitter(backoff)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(4);

/// A wait drawn uniformly from the upper half of `d`.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// A silent registration that lasted this long was ended at the coordinator's registration
/// deadline (35 s without a heartbeat), not by something else.
const SILENT_DEADLINE_MS: u64 = 34_000;

/// Returns once the swarm stops.
async fn stopped(swarm: &Swarm) {
    while !swarm.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The kinds of misbehaving node.
#[derive(Clone, Copy)]
enum Kind {
    Silent,
    Vanish,
    Loop,
}

/// One misbehaving node, until the swarm stops.
async fn misbehave(args: &Args, source: Ipv4Addr, kind: Kind, node: NodeId, swarm: &Swarm) {
    let m = &swarm.mis;
    while !swarm.stop.load(Ordering::Relaxed) {
        let wait_registered = !matches!(kind, Kind::Vanish);
        let connected = connect_register(args, source, &node, 0, swarm, wait_registered).await;
        let mut pause = Duration::from_secs(1);
        match (kind, connected) {
            (_, Err(Failure::AddressInUse)) => m.error("address_in_use"),
            (_, Err(Failure::Other(e))) => {
                m.error(e);
                pause = Duration::from_millis(100);
            }
            (Kind::Vanish, Ok(_)) => {
                m.vanish_sent.fetch_add(1, Ordering::Relaxed);
            }
            (Kind::Loop, Ok(_)) => {
                m.loop_registrations.fetch_add(1, Ordering::Relaxed);
                pause = Duration::ZERO;
            }
            (Kind::Silent, Ok(mut c)) => {
                m.silent_registrations.fetch_add(1, Ordering::Relaxed);
                let since = Instant::now();
                // Reads until the coordinator ends it, never sending a heartbeat (the read is
                // cancelled only at the stop).
                let ended = tokio::select! {
                    _ = async { while c.rx.recv().await.is_ok() {} } => true,
                    _ = stopped(swarm) => false,
                };
                let held = since.elapsed().as_millis() as u64;
                if !ended {
                    m.silent_open_max_ms.fetch_max(held, Ordering::Relaxed);
                }
                if ended && !swarm.stop.load(Ordering::Relaxed) && held < SILENT_DEADLINE_MS {
                    // A restart, or a drop before the deadline (which would be the coordinator's
                    // fault: reported, the caller judges).
                    m.silent_ended_early.fetch_add(1, Ordering::Relaxed);
                } else if ended && !swarm.stop.load(Ordering::Relaxed) {
                    m.silent_dropped.fetch_add(1, Ordering::Relaxed);
                    m.silent_held_min_ms.fetch_min(held, Ordering::Relaxed);
                    m.silent_held_max_ms.fetch_max(held, Ordering::Relaxed);
                }
            }
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
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

/// A registered control connection.
struct Conn {
    rx: Rx,
    tx: Tx,
    heartbeat: u32,
    relay_id: u32,
    secret: RelaySecret,
    initial: u32,
}

/// Connects from `source`, completes the handshake and sends a registration; with
/// `wait_registered`, also waits for the answer.
async fn connect_register(
    args: &Args,
    source: Ipv4Addr,
    node: &NodeId,
    attempt: u32,
    swarm: &Swarm,
    wait_registered: bool,
) -> Result<Conn, Failure> {
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
        ssh: None,
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
        batches: true,
        network: net_key.id(),
        proof: Some(proof),
        record,
    })
    .await
    .map_err(io)?;
    if !wait_registered {
        return Ok(Conn {
            rx,
            tx,
            heartbeat: 0,
            relay_id: 0,
            secret: RelaySecret([0; 16]),
            initial: 0,
        });
    }
    let first = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .map_err(|_| Failure::Other("register_timed_out"))?
        .map_err(io)?;
    match first {
        Incoming::Msg(ServerMsg::Registered {
            heartbeat_s,
            relay_id,
            relay_secret,
            peers,
        }) => Ok(Conn {
            rx,
            tx,
            heartbeat: heartbeat_s.max(1),
            relay_id,
            secret: relay_secret,
            initial: peers,
        }),
        Incoming::Msg(ServerMsg::Refused {
            reason: RefuseReason::AddressInUse,
            ..
        }) => Err(Failure::AddressInUse),
        Incoming::Msg(ServerMsg::Refused { .. }) => Err(Failure::Other("refused")),
        _ => Err(Failure::Other("unexpected_message")),
    }
}

/// One connection of a well-behaved node, from connecting until it is lost or the swarm stops;
/// `registered` is set once it registered.
async fn session(
    args: &Args,
    source: Ipv4Addr,
    node: &NodeId,
    attempt: u32,
    swarm: &Swarm,
    registered: &mut bool,
) -> Result<(), Failure> {
    let io = |e: io::Error| Failure::Other(io_kind(&e));
    let Conn {
        mut rx,
        mut tx,
        heartbeat,
        relay_id,
        secret,
        initial,
    } = connect_register(args, source, node, attempt, swarm, true).await?;
    *registered = true;
    let me = node.index as usize;
    // A node that registers again (after a lost connection) is counted once, at its first.
    if swarm.registered_at[me]
        .compare_exchange(0, swarm.micros(), Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        swarm.registered.fetch_add(1, Ordering::Relaxed);
    }
    swarm.registrations.fetch_add(1, Ordering::Relaxed);
    swarm.last_registered_at[me].store(swarm.micros(), Ordering::Relaxed);
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
            // A member's record: verified, added, and timed unless it is of the initial list.
            let mut up = |record: &SignedRecord, peers: &mut HashMap<NodeKey, ()>| {
                let Some(key) = swarm.verify(node.net, record) else {
                    return;
                };
                if key == node.key {
                    return;
                }
                if peers.insert(key, ()).is_none() {
                    swarm.peers_known[me].store(peers.len() as u64, Ordering::Relaxed);
                }
                if seen_initial < initial {
                    seen_initial += 1;
                } else if swarm.lost_at.load(Ordering::Relaxed) != 0 {
                    // After a restart: join latencies are those of the first joins.
                } else if let Some(&learnt) = swarm.index.get(&key) {
                    let at = swarm.micros();
                    swarm.learnt.lock().unwrap().push((node.index, learnt, at));
                }
            };
            let down = |node_key: &NodeKey, peers: &mut HashMap<NodeKey, ()>| {
                if !swarm.stop.load(Ordering::Relaxed) {
                    swarm.error("peer_down");
                }
                if peers.remove(node_key).is_some() {
                    swarm.peers_known[me].store(peers.len() as u64, Ordering::Relaxed);
                }
            };
            if let Incoming::Msg(
                ServerMsg::PeerUp { .. } | ServerMsg::PeerDown { .. } | ServerMsg::Peers { .. },
            ) = &frame
            {
                swarm.member_messages.fetch_add(1, Ordering::Relaxed);
            }
            match frame {
                Incoming::Msg(ServerMsg::PeerUp { record, .. }) => up(&record, &mut peers),
                Incoming::Msg(ServerMsg::PeerDown { node_key }) => down(&node_key, &mut peers),
                Incoming::Msg(ServerMsg::Peers {
                    down: gone,
                    up: came,
                }) => {
                    swarm.batches.fetch_add(1, Ordering::Relaxed);
                    for k in &gone {
                        down(k, &mut peers);
                    }
                    for e in &came {
                        up(&e.record, &mut peers);
                    }
                }
                Incoming::Msg(ServerMsg::HeartbeatAck) | Incoming::Msg(ServerMsg::Punch { .. }) => {
                }
                Incoming::Msg(_) => swarm.error("unexpected_message"),
                // A real member of a `--token` network may relay to a simulated one.
                Incoming::Relay(..) if swarm.foreign => {
                    swarm.relay_frames.fetch_add(1, Ordering::Relaxed);
                }
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
