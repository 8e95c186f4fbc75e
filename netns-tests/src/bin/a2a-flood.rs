//! a2a-flood: floods a coordinator from one address, for `tests/flood.rs`. Not part of a2a.
//!
//! ```text
//! a2a-flood --token TOKEN [--tcp-rate N] [--udp-rate M] [--seconds S] [--kinds K,K,...]
//! ```
//!
//! Five kinds at once (or those named by `--kinds`), each at its own rate per second (N for
//! the TCP kinds, M for the UDP kinds), against the token's first endpoint:
//! - `hold`: TCP connections that send nothing and are held open until the coordinator closes
//!   them (or 30 s);
//! - `half`: TCP connections that send half of a Noise handshake's first frame, or the whole
//!   first message replayed from one handshake (the coordinator spends its Diffie-Hellman
//!   operations on each, for free to the flooder) and then nothing more;
//! - `full`: complete Noise handshakes with a fresh key each, followed by a registration that
//!   cannot be valid (random network, bogus proof and record);
//! - `relay`: UDP relay data for random relay ids;
//! - `probe`: UDP endpoint probes and relay binds with random ids and secrets;
//! - `member` (not in the default set): one connection registered as a real member of the
//!   token's network (an insider: it holds the network secret) that sends heartbeats as fast as
//!   the coordinator reads them, with a relay frame for a random id after every fourth.
//!
//! Every second, and once more when it stops (after S seconds, or on SIGTERM/SIGINT), it prints
//! one line of cumulative counts per kind, `flood t=.. hold_sent=.. hold_reset=.. ...`, then
//! `flood done` at the end.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use a2a_netns_tests::garbage::Rng;
use a2a_proto::control::ClientMsg;
use a2a_proto::noise_channel::{handshake_initiator, HandshakeError};
use a2a_proto::{JoinToken, NetworkId, SignedRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Named counters, printed in name order.
#[derive(Default)]
struct Stats(Mutex<BTreeMap<String, Arc<AtomicU64>>>);

impl Stats {
    fn counter(&self, name: &str) -> Arc<AtomicU64> {
        self.0
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(AtomicU64::new(0)))
            .clone()
    }

    fn bump(&self, name: &str) {
        self.counter(name).fetch_add(1, Ordering::Relaxed);
    }

    fn line(&self, t: f64) -> String {
        let mut s = format!("flood t={t:.1}");
        for (k, v) in self.0.lock().unwrap().iter() {
            s.push_str(&format!(" {k}={}", v.load(Ordering::Relaxed)));
        }
        s
    }
}

struct Args {
    token: JoinToken,
    tcp_rate: u32,
    udp_rate: u32,
    seconds: u64,
    kinds: Vec<String>,
}

const KINDS: [&str; 6] = ["hold", "half", "full", "relay", "probe", "member"];

fn parse_args() -> Result<Args, String> {
    let mut token = None;
    let mut tcp_rate = 200;
    let mut udp_rate = 5000;
    let mut seconds = 600;
    let mut kinds: Vec<String> = KINDS[..5].iter().map(|k| k.to_string()).collect();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--token" => {
                token = Some(JoinToken::parse(&value()?).map_err(|e| format!("--token: {e}"))?)
            }
            "--tcp-rate" => tcp_rate = value()?.parse().map_err(|e| format!("{a}: {e}"))?,
            "--udp-rate" => udp_rate = value()?.parse().map_err(|e| format!("{a}: {e}"))?,
            "--seconds" => seconds = value()?.parse().map_err(|e| format!("{a}: {e}"))?,
            "--kinds" => {
                kinds = value()?.split(',').map(str::to_string).collect();
                if let Some(k) = kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
                    return Err(format!("--kinds: unknown kind {k} (kinds: {KINDS:?})"));
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        token: token.ok_or("--token is required")?,
        tcp_rate,
        udp_rate,
        seconds,
        kinds,
    })
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("a2a-flood: {e}");
            std::process::exit(2);
        }
    };
    raise_fd_limit();
    let target: SocketAddr = match args.token.endpoints[0].parse() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("a2a-flood: the token's endpoint is not IP:PORT: {e}");
            std::process::exit(2);
        }
    };
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();

    // UDP on plain threads, TCP on one tokio thread: the flooder shares two cores with what it
    // floods, so it takes no more than it needs.
    let mut threads = Vec::new();
    let wanted = |k: &str| args.kinds.iter().any(|w| w == k);
    for (name, kind) in [("relay", UdpKind::Relay), ("probe", UdpKind::Probe)] {
        if !wanted(name) {
            continue;
        }
        let (stats, stop) = (stats.clone(), stop.clone());
        let rate = args.udp_rate;
        threads.push(std::thread::spawn(move || {
            if let Err(e) = udp_flood(kind, target, rate, &stats, &stop) {
                eprintln!("a2a-flood: UDP: {e}");
            }
        }));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let first = replayable_first_message(&args.token.coordinator_key).await;
        let first = Arc::new(first);
        for (name, kind) in [
            ("hold", TcpKind::Hold),
            ("half", TcpKind::Half),
            ("full", TcpKind::Full),
        ] {
            if !wanted(name) {
                continue;
            }
            let stats = stats.clone();
            let first = first.clone();
            let key = args.token.coordinator_key;
            let rate = args.tcp_rate;
            tokio::spawn(async move { tcp_flood(kind, target, rate, key, first, stats).await });
        }
        if wanted("member") {
            let stats = stats.clone();
            let token = args.token.clone();
            tokio::spawn(async move { member(target, token, stats).await });
        }
        let report = {
            let stats = stats.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    println!("{}", stats.line(start.elapsed().as_secs_f64()));
                }
            }
        };
        tokio::select! {
            _ = report => {}
            _ = tokio::time::sleep(Duration::from_secs(args.seconds)) => {}
            _ = a2a_proto::process::shutdown_signal() => {}
        }
    });
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    println!("{}", stats.line(start.elapsed().as_secs_f64()));
    println!("flood done");
    // The held connections and their tasks go with the process.
    drop(rt);
}

#[derive(Clone, Copy)]
enum UdpKind {
    Relay,
    Probe,
}

/// Sends `rate` datagrams a second in 1 ms slices from 16 sockets (16 source ports, as a NAT
/// would show many nodes) and counts the coordinator's answers.
fn udp_flood(
    kind: UdpKind,
    target: SocketAddr,
    rate: u32,
    stats: &Stats,
    stop: &AtomicBool,
) -> io::Result<()> {
    let socks: Vec<Arc<UdpSocket>> = (0..16)
        .map(|_| UdpSocket::bind("0.0.0.0:0").map(Arc::new))
        .collect::<io::Result<_>>()?;
    let (sent, failed, answered) = match kind {
        UdpKind::Relay => ("relay_sent", "relay_send_failed", "relay_answered"),
        UdpKind::Probe => ("probe_sent", "probe_send_failed", "probe_answered"),
    };
    let answered = stats.counter(answered);
    for s in &socks {
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let (s, answered) = (s.clone(), answered.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                match s.recv(&mut buf) {
                    Ok(_) => {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                    Err(_) => {}
                }
                if Arc::strong_count(&s) == 1 {
                    return; // the sender is gone
                }
            }
        });
    }
    let (sent, failed) = (stats.counter(sent), stats.counter(failed));
    let mut rng = Rng::new();
    // Random bodies made once: the flooder spends its CPU on sending, not on random bytes.
    let bodies: Vec<Vec<u8>> = (0..64)
        .map(|_| {
            let n = 40 + rng.below(1400);
            rng.bytes(n)
        })
        .collect();
    let start = Instant::now();
    let mut done: u64 = 0;
    let mut d = Vec::with_capacity(1500);
    while !stop.load(Ordering::Relaxed) {
        let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        while done < due {
            d.clear();
            match kind {
                UdpKind::Relay => {
                    d.extend_from_slice(&[0xA2, 0x05]);
                    d.extend_from_slice(&(rng.next_u64() as u32).to_be_bytes());
                    d.extend_from_slice(&bodies[(done % 64) as usize]);
                }
                UdpKind::Probe if done.is_multiple_of(2) => {
                    d.extend_from_slice(&[0xA2, 0x01]);
                    d.extend_from_slice(&rng.next_u64().to_be_bytes());
                }
                UdpKind::Probe => {
                    // nonce 8, relay id 4, secret 16
                    d.extend_from_slice(&[0xA2, 0x03]);
                    d.extend_from_slice(&rng.next_u64().to_be_bytes());
                    d.extend_from_slice(&(rng.next_u64() as u32).to_be_bytes());
                    d.extend_from_slice(&rng.next_u64().to_be_bytes());
                    d.extend_from_slice(&rng.next_u64().to_be_bytes());
                }
            }
            let s = &socks[(done % socks.len() as u64) as usize];
            if s.send_to(&d, target).is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            done += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TcpKind {
    Hold,
    Half,
    Full,
}

/// A first handshake frame (length prefix and IK message one) to the coordinator, made once
/// by a real initiator over an in-memory pipe: replayed, it makes the coordinator do the
/// handshake's Diffie-Hellman operations every time.
async fn replayable_first_message(coordinator_key: &[u8; 32]) -> Vec<u8> {
    let (mut a, mut b) = tokio::io::duplex(4096);
    let key: [u8; 32] = Rng::new().bytes(32).try_into().expect("32 bytes");
    let ck = *coordinator_key;
    let initiator = tokio::spawn(async move { handshake_initiator(&mut a, &key, &ck).await });
    let len = b.read_u16().await.expect("first frame length") as usize;
    let mut frame = vec![0u8; 2 + len];
    frame[..2].copy_from_slice(&(len as u16).to_be_bytes());
    b.read_exact(&mut frame[2..]).await.expect("first frame");
    initiator.abort();
    frame
}

async fn tcp_flood(
    kind: TcpKind,
    target: SocketAddr,
    rate: u32,
    coordinator_key: [u8; 32],
    first: Arc<Vec<u8>>,
    stats: Arc<Stats>,
) {
    let start = Instant::now();
    let mut done: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        while done < due {
            let (stats, first) = (stats.clone(), first.clone());
            let n = done;
            tokio::spawn(async move {
                match kind {
                    TcpKind::Hold => hold(target, &stats, None).await,
                    TcpKind::Half => {
                        let bytes = if n.is_multiple_of(2) {
                            &first[..first.len() / 2]
                        } else {
                            &first[..]
                        };
                        hold(target, &stats, Some(bytes)).await
                    }
                    TcpKind::Full => full(target, coordinator_key, &stats).await,
                }
            });
            done += 1;
        }
    }
}

async fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    let s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    set_rst_on_close(&s);
    Ok(s)
}

/// Connects, writes `bytes` (if any), reads until the coordinator closes or resets the
/// connection (or 30 s pass), counting which.
async fn hold(target: SocketAddr, stats: &Stats, bytes: Option<&[u8]>) {
    let kind = if bytes.is_some() { "half" } else { "hold" };
    stats.bump(&format!("{kind}_sent"));
    let mut s = match connect(target).await {
        Ok(s) => s,
        Err(e) => return stats.bump(&format!("{kind}_connect_{}", failure(&e))),
    };
    stats.bump(&format!("{kind}_connected"));
    if let Some(b) = bytes {
        let _ = s.write_all(b).await;
    }
    let mut buf = [0u8; 512];
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return "closed",
                Ok(_) => stats.bump(&format!("{kind}_answered")),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return "reset",
                Err(_) => return "closed",
            }
        }
    })
    .await
    .unwrap_or("held_30s");
    stats.bump(&format!("{kind}_{end}"));
}

/// A complete handshake with a fresh key, then a registration that cannot be valid.
async fn full(target: SocketAddr, coordinator_key: [u8; 32], stats: &Stats) {
    stats.bump("full_sent");
    let mut s = match connect(target).await {
        Ok(s) => s,
        Err(e) => return stats.bump(&format!("full_connect_{}", failure(&e))),
    };
    stats.bump("full_connected");
    let mut rng = Rng::new();
    let key: [u8; 32] = rng.bytes(32).try_into().expect("32 bytes");
    let hs = tokio::time::timeout(
        Duration::from_secs(10),
        handshake_initiator(&mut s, &key, &coordinator_key),
    )
    .await;
    let est = match hs {
        Ok(Ok(e)) => e,
        Ok(Err(HandshakeError::Io(e))) if e.kind() == io::ErrorKind::ConnectionReset => {
            return stats.bump("full_reset_in_handshake")
        }
        Ok(Err(_)) => return stats.bump("full_handshake_failed"),
        Err(_) => return stats.bump("full_handshake_timed_out"),
    };
    stats.bump("full_handshake_ok");
    let (r, w) = s.into_split();
    let (mut reader, mut writer) = est.split(r, w);
    let network = NetworkId(rng.bytes(32).try_into().expect("32 bytes"));
    let register = ClientMsg::Register {
        batches: true,
        network,
        // Well-formed, so the coordinator gets as far as verifying it (and refuses it).
        proof: Some(a2a_proto::keys::Signature(
            rng.bytes(64).try_into().expect("64 bytes"),
        )),
        record: SignedRecord {
            body: "{\"node_key\":\"garbage\"}".into(),
            sig: "bm90IGEgc2lnbmF0dXJl".into(),
            cert: None,
        },
    };
    if writer.send(&register).await.is_err() {
        return stats.bump("full_register_send_failed");
    }
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        reader.recv::<a2a_proto::control::ServerMsg>(),
    )
    .await;
    match reply {
        Ok(Ok(a2a_proto::control::ServerMsg::Refused { .. })) => stats.bump("full_refused"),
        Ok(Ok(_)) => stats.bump("full_accepted_unexpectedly"),
        Ok(Err(_)) => stats.bump("full_closed"),
        Err(_) => stats.bump("full_no_answer"),
    }
}

/// A registered member flooding its control connection; reconnects a second after losing it.
async fn member(target: SocketAddr, token: JoinToken, stats: Arc<Stats>) {
    let mut rng = Rng::new();
    let private: [u8; 32] = rng.bytes(32).try_into().expect("32 bytes");
    let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(private));
    let network_key = a2a_proto::NetworkKey::derive(&token.network_secret);
    let node_key = a2a_proto::NodeKey(public.to_bytes());
    loop {
        match member_session(target, &token, private, &network_key, node_key, &stats).await {
            Ok(()) => stats.bump("member_disconnected"),
            Err(_) => stats.bump("member_failed"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn member_session(
    target: SocketAddr,
    token: &JoinToken,
    private: [u8; 32],
    network_key: &a2a_proto::NetworkKey,
    node_key: a2a_proto::NodeKey,
    stats: &Stats,
) -> io::Result<()> {
    let mut s = connect(target).await?;
    let est = handshake_initiator(&mut s, &private, &token.coordinator_key).await?;
    let proof = network_key.sign(a2a_proto::keys::REGISTER_CONTEXT, &est.handshake_hash);
    let issued_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1);
    let record = a2a_proto::NodeRecord {
        network: network_key.id(),
        node_key,
        name: "insider".into(),
        ip: a2a_proto::overlay::derive_ip(token.prefix, &node_key, 0),
        candidates: Vec::new(),
        issued_ms,
        ssh: None,
    }
    .sign(network_key);
    let (r, w) = s.into_split();
    let (mut reader, mut writer) = est.split(r, w);
    writer
        .send(&ClientMsg::Register {
            batches: true,
            network: network_key.id(),
            proof: Some(a2a_proto::keys::Signature(proof)),
            record,
        })
        .await?;
    match reader.recv::<a2a_proto::control::ServerMsg>().await? {
        a2a_proto::control::ServerMsg::Registered { .. } => stats.bump("member_registered"),
        _ => return Err(io::Error::other("not registered")),
    }
    let replies = stats.counter("member_replies");
    let read = async move {
        while reader
            .recv_frame::<a2a_proto::control::ServerMsg>()
            .await
            .is_ok()
        {
            replies.fetch_add(1, Ordering::Relaxed);
        }
    };
    let (msgs, relays) = (
        stats.counter("member_msgs_sent"),
        stats.counter("member_relay_sent"),
    );
    let write = async move {
        let mut rng = Rng::new();
        let payload = rng.bytes(120);
        for n in 0u64.. {
            if writer.send(&ClientMsg::Heartbeat).await.is_err() {
                return;
            }
            msgs.fetch_add(1, Ordering::Relaxed);
            if n % 4 == 3 {
                let id = rng.next_u64() as u32;
                if writer.send_relay(id, &payload).await.is_err() {
                    return;
                }
                relays.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    tokio::select! {
        _ = read => {}
        _ = write => {}
    }
    Ok(())
}

/// Why a connect failed, in a word.
fn failure(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::TimedOut => "timed_out",
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::ConnectionReset => "reset",
        io::ErrorKind::AddrNotAvailable => "no_port",
        _ => "failed",
    }
}

/// Closes with a RST: the flooder keeps no TIME_WAIT states (nor ports) behind.
fn set_rst_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Held connections are file descriptors: lift the soft limit to the hard one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
