//! WireGuard-level hostile input against real daemons: replayed handshake initiations and data
//! captured on the underlay, a flood of initiations with a valid MAC1 (the cookie mechanism),
//! and the session timers (rekey after 120 s, no data after 180 s) in real time. Needs root;
//! see the crate documentation of `a2a_netns_tests`.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use a2a_netns_tests::{
    cpu_time, report, require_tool, wait_until, CoordOpts, Lab, Node, Ns, NODE_PORT,
    OVERLAY_TIMEOUT,
};
use a2a_wg_forge as wg_forge;

/// How long the path between two open nodes may take to become direct.
const PATH_TIMEOUT: Duration = Duration::from_secs(25);
/// The overlay MTU (a2ad's `OVERLAY_MTU`).
const MTU: usize = 1420;

/// CPU time (user + system) a process has used, in seconds.
/// Seconds since `n`'s last WireGuard handshake with peer `peer` (None: no session).
fn handshake_age(n: &Node, peer: &str) -> Option<u64> {
    n.status()
        .peer(peer)
        .unwrap_or_else(|| panic!("{} does not list {peer}", n.name))
        .last_handshake_s
}

fn public_key(n: &Node) -> [u8; 32] {
    let b64 = n.status().me.expect("joined").public_key;
    a2a_proto::keys::base64_exact(&b64).expect("status prints keys in base64")
}

// ------------------------------------------------------------------------------------------
// Capturing the underlay
// ------------------------------------------------------------------------------------------

/// A UDP datagram seen arriving on a namespace's `eth0`.
struct Seen {
    at: Instant,
    from: SocketAddr,
    /// Sent by this namespace (from the port), rather than arriving for it.
    outgoing: bool,
    payload: Vec<u8>,
}

/// Captures, on `eth0` of a namespace (AF_PACKET), the UDP datagrams arriving for one port and
/// those sent from it, until [`stop`](Self::stop).
struct Capture {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    handle: JoinHandle<()>,
}

impl Capture {
    /// Starts capturing; returns once the capture socket is open.
    fn start(ns: &Ns, port: u16) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let ns = ns.clone();
        let (flag, into) = (stop.clone(), seen.clone());
        let handle = std::thread::spawn(move || {
            ns.run_in(move || {
                let fd = open_packet_socket().expect("AF_PACKET socket on eth0");
                let _ = ready_tx.send(());
                capture_loop(&fd, port, &flag, &into)
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the capture socket opens");
        Capture { stop, seen, handle }
    }

    /// When the last datagram matching `f` arrived, if one did.
    fn last(&self, f: impl Fn(&Seen) -> bool) -> Option<Instant> {
        let seen = self.seen.lock().unwrap();
        seen.iter().rev().find(|s| f(s)).map(|s| s.at)
    }

    fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("capture thread");
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// An AF_PACKET socket receiving every frame of `eth0`, both ways (`ETH_P_ALL`: a socket bound
/// to one protocol sees only incoming frames), with a 100 ms receive timeout.
fn open_packet_socket() -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a NUL-terminated interface name.
    let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data; zero is a valid value for every field.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: bind(2) with a correctly sized sockaddr_ll.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setsockopt with a valid fd and a correctly sized timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    Ok(fd)
}

fn capture_loop(fd: &OwnedFd, port: u16, stop: &AtomicBool, seen: &Mutex<Vec<Seen>>) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: sockaddr_ll is plain data.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: recvfrom(2) into a buffer of the given length and a sockaddr_ll.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
                &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                &mut from_len,
            )
        };
        if n <= 0 {
            continue;
        }
        let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
        let p = &buf[..n as usize];
        if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 17 {
            continue;
        }
        let ihl = usize::from(p[0] & 15) * 4;
        if p.len() < ihl + 8 {
            continue;
        }
        let sport = u16::from_be_bytes([p[ihl], p[ihl + 1]]);
        let dport = u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]);
        if (outgoing && sport != port) || (!outgoing && dport != port) {
            continue;
        }
        let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
        seen.lock().unwrap().push(Seen {
            at: Instant::now(),
            from: SocketAddr::new(src.into(), sport),
            outgoing,
            payload: p[ihl + 8..].to_vec(),
        });
    }
}

/// The WireGuard datagram in a captured payload: as is, or inside a relay frame
/// (`A2 05 | relay id | WireGuard datagram`).
fn wireguard_in(payload: &[u8]) -> Option<&[u8]> {
    let wg = match payload {
        [0xA2, 0x05, _, _, _, _, rest @ ..] => rest,
        other => other,
    };
    (wg.len() >= 4 && (1..=4).contains(&wg[0]) && wg[1..4] == [0, 0, 0]).then_some(wg)
}

/// Sends every datagram to `target` from one socket in this namespace.
fn send_all(ns: &Ns, target: SocketAddr, datagrams: Vec<Vec<u8>>) -> usize {
    ns.run_in(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind a UDP socket");
        let mut sent = 0;
        for d in &datagrams {
            if sock.send_to(d, target).is_ok() {
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        sent
    })
}

// ------------------------------------------------------------------------------------------
// Replays
// ------------------------------------------------------------------------------------------

#[test]
fn replayed_initiations_and_data_change_nothing() {
    let Some(lab) = Lab::new("wg_replay") else {
        return;
    };
    let coord = lab.coordinator(CoordOpts::default());
    let alpha = lab.node("alpha");
    let bravo = lab.node("bravo");
    // Everything arriving at and leaving both WireGuard ports from the moment they join:
    // handshake messages (relayed at first, then direct) and data.
    let capture_a = Capture::start(&alpha.ns, NODE_PORT);
    let capture_b = Capture::start(&bravo.ns, NODE_PORT);
    for n in [&alpha, &bravo] {
        n.serve_http();
        n.up_ok(&coord.token);
    }
    alpha.wait_http(&bravo, OVERLAY_TIMEOUT);
    bravo.wait_http(&alpha, OVERLAY_TIMEOUT);
    alpha.wait_path("bravo", "direct", PATH_TIMEOUT);
    // Data of every size class (and so every padding) both ways.
    for (from, to) in [(&alpha, &bravo), (&bravo, &alpha)] {
        for size in [1, 15, 16, 17, 100, 500, 1000, 1391, 1392] {
            let s = size.to_string();
            let ip = to.overlay_ip().to_string();
            from.ns
                .exec(&["ping", "-n", "-q", "-c", "2", "-i", "0.2", "-s", &s, &ip])
                .expect_ok();
        }
    }
    let seen_a = capture_a.stop();
    let seen_b = capture_b.stop();
    // Both ends initiate when they learn of each other; which initiation each end processed
    // depends on who learnt first (one that arrives before the responder knows the initiator is
    // dropped unprocessed, and a later "replay" of it would be its first delivery, which
    // WireGuard rightly accepts). Replay to the end that answered an initiation: the victim.
    let answered = |seen: &[Seen]| -> Vec<Vec<u8>> {
        let responses: Vec<[u8; 4]> = seen
            .iter()
            .filter(|s| s.outgoing)
            .filter_map(|s| wireguard_in(&s.payload))
            .filter(|wg| wg[0] == 2 && wg.len() == 92)
            .map(|wg| wg[8..12].try_into().unwrap())
            .collect();
        seen.iter()
            .filter(|s| !s.outgoing)
            .filter_map(|s| wireguard_in(&s.payload))
            .filter(|wg| {
                wg[0] == 1 && wg.len() == 148 && responses.contains(&wg[4..8].try_into().unwrap())
            })
            .map(<[u8]>::to_vec)
            .collect()
    };
    let (victim, sender, seen, inits) = match (answered(&seen_b), answered(&seen_a)) {
        (b, _) if !b.is_empty() => (&bravo, &alpha, seen_b, b),
        (_, a) => (&alpha, &bravo, seen_a, a),
    };
    let sender_wan = SocketAddr::new(sender.wan_ip().into(), NODE_PORT);
    let data: Vec<Vec<u8>> = seen
        .iter()
        .filter(|s| !s.outgoing && s.from == sender_wan && s.payload.len() <= 1500)
        .filter_map(|s| wireguard_in(&s.payload))
        .filter(|wg| wg[0] == 4)
        .map(<[u8]>::to_vec)
        .collect();
    report(format!(
        "wg_replay: captured {} datagrams at {}: {} initiations it answered, {} data packets \
         from {}",
        seen.len(),
        victim.name,
        inits.len(),
        data.len(),
        sender.name
    ));
    assert!(
        !inits.is_empty(),
        "no answered handshake initiation captured"
    );
    assert!(data.len() >= 18, "too few data packets captured");

    // Padding (whitepaper §5.4.6): every data datagram's plaintext is a multiple of 16 bytes,
    // or the MTU, so its size does not give away the inner packet's exact length.
    let sizes: Vec<usize> = data.iter().map(|d| d.len() - 32).collect();
    assert!(
        sizes.iter().all(|&p| p % 16 == 0 || p == MTU),
        "unpadded data from {} (plaintext sizes): {sizes:?}",
        sender.name
    );

    // Replay every initiation three times and every data packet once, from another host, once
    // the session is a few seconds old (so that a new handshake would show).
    wait_until(Duration::from_secs(10), "a session 3 s old", || {
        handshake_age(victim, &sender.name).is_some_and(|s| s >= 3)
    });
    let age_before = handshake_age(victim, &sender.name).unwrap();
    let sender_age_before = handshake_age(sender, &victim.name).unwrap();
    let (_, endpoint_before) = victim.path_to(&sender.name).unwrap();
    let replays_before = victim.counter("wg_handshake_replays");
    let rejected_before = victim.counter("wg_rejected");
    let evil = lab.add_ns("evil");
    let victim_wan = SocketAddr::new(victim.wan_ip().into(), NODE_PORT);
    let mut datagrams = Vec::new();
    for _ in 0..3 {
        datagrams.extend(inits.iter().cloned());
    }
    let replayed_inits = datagrams.len() as u64;
    datagrams.extend(data.iter().cloned());
    let sent = send_all(&evil, victim_wan, datagrams);
    assert_eq!(sent as u64, replayed_inits + data.len() as u64);
    std::thread::sleep(Duration::from_secs(1));

    // Each replayed initiation is refused for its timestamp, and counted as a replay.
    let replays = victim.counter("wg_handshake_replays") - replays_before;
    let rejected = victim.counter("wg_rejected") - rejected_before;
    report(format!(
        "wg_replay: {} counted {replays} replayed initiations and {rejected} rejected data \
         packets",
        victim.name
    ));
    assert_eq!(
        replays, replayed_inits,
        "every replayed initiation is counted"
    );
    assert!(
        rejected >= data.len() as u64,
        "replayed data is rejected ({rejected} of {})",
        data.len()
    );
    // No new handshake on either side, the path did not move to the replayer, and traffic
    // flows both ways.
    assert!(
        handshake_age(victim, &sender.name).unwrap() >= age_before,
        "a replay made {} start a new session",
        victim.name
    );
    assert!(handshake_age(sender, &victim.name).unwrap() >= sender_age_before);
    assert_eq!(victim.path_to(&sender.name).unwrap().1, endpoint_before);
    alpha.fetch_from(&bravo, 5).unwrap();
    bravo.fetch_from(&alpha, 5).unwrap();
    assert!(handshake_age(victim, &sender.name).unwrap() >= age_before);
}

// ------------------------------------------------------------------------------------------
// Handshake flood and cookies
// ------------------------------------------------------------------------------------------

/// Initiations sent every 2 ms by [`Flood`]: about 6000 a second, six times the rate at
/// which a node starts demanding cookies (1000 counts a second, two per initiation), and
/// little enough for a debug build of a2ad (optimised dependencies) on a shared 2-core
/// machine to keep up with, so that what is tested is the cookie mechanism and not CPU
/// exhaustion.
const FLOOD_BURST: usize = 12;

/// Floods `target` from `ns` with MAC1-valid initiations ([`FLOOD_BURST`] every 2 ms) until
/// stopped; counts the cookie replies that come back to the flooder's (real) address. With
/// `answer_cookies`, the flooder does what a cookie asks: its next initiations carry a valid
/// MAC2.
struct Flood {
    stop: Arc<AtomicBool>,
    /// Initiations sent, cookie replies received, initiations sent with a valid cookie.
    counts: Arc<[AtomicU64; 3]>,
    handle: JoinHandle<()>,
}

impl Flood {
    fn start(ns: &Ns, target: SocketAddr, responder: [u8; 32], answer_cookies: bool) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let (s, c) = (stop.clone(), counts.clone());
        let ns = ns.clone();
        let handle = std::thread::spawn(move || {
            ns.run_in(move || {
                let mut rng = rand::thread_rng();
                let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
                sock.set_nonblocking(true).expect("nonblocking");
                let mut buf = [0u8; 256];
                // The MAC1 of each recent initiation, by sender index: a cookie reply is
                // sealed with it.
                const RECENT: usize = 4096;
                let mut mac1s = vec![[0u8; 16]; RECENT];
                let mut cookie: Option<[u8; 16]> = None;
                let mut sender: u32 = 0;
                while !s.load(Ordering::Relaxed) {
                    for _ in 0..FLOOD_BURST {
                        sender = sender.wrapping_add(1);
                        let init = wg_forge::random_initiation(
                            &responder,
                            sender,
                            cookie.as_ref(),
                            &mut rng,
                        );
                        mac1s[sender as usize % RECENT] = init.mac1;
                        if sock.send_to(&init.message, target).is_ok() {
                            c[0].fetch_add(1, Ordering::Relaxed);
                            if cookie.is_some() {
                                c[2].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    while let Ok((len, _)) = sock.recv_from(&mut buf) {
                        if len != wg_forge::COOKIE_REPLY_LEN || buf[0] != 3 {
                            continue;
                        }
                        c[1].fetch_add(1, Ordering::Relaxed);
                        if answer_cookies {
                            let reply = &buf[..len];
                            let idx = wg_forge::receiver_index(reply).expect("a cookie reply");
                            let mac1 = &mac1s[idx as usize % RECENT];
                            if let Some(k) = wg_forge::open_cookie(reply, &responder, mac1) {
                                cookie = Some(k);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        });
        Flood {
            stop,
            counts,
            handle,
        }
    }

    /// Stops the flood; (initiations sent, cookie replies received, initiations sent with a
    /// valid cookie).
    fn stop(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("flood thread");
        let c = &self.counts;
        let get = |i: usize| c[i].load(Ordering::Relaxed);
        (get(0), get(1), get(2))
    }
}

#[test]
fn a_handshake_flood_draws_cookies_and_costs_no_session() {
    let Some(lab) = Lab::new("wg_flood") else {
        return;
    };
    let coord = lab.coordinator(CoordOpts::default());
    let alpha = lab.node("alpha");
    let bravo = lab.node("bravo");
    for n in [&alpha, &bravo] {
        n.serve_http();
        n.up_ok(&coord.token);
    }
    alpha.wait_http(&bravo, OVERLAY_TIMEOUT);
    bravo.wait_http(&alpha, OVERLAY_TIMEOUT);
    alpha.wait_path("bravo", "direct", PATH_TIMEOUT);
    wait_until(Duration::from_secs(10), "a session 3 s old", || {
        handshake_age(&bravo, "alpha").is_some_and(|s| s >= 3)
    });
    let age_before = handshake_age(&bravo, "alpha").unwrap();
    let cookies_before = bravo.counter("wg_cookies_sent");

    // The flood, from a host with a real address that knows bravo's public key.
    let evil = lab.add_ns("evil");
    let bravo_wan = SocketAddr::new(bravo.wan_ip().into(), NODE_PORT);
    let cpu_before = cpu_time(bravo.daemon().pid());
    let bravo_key = public_key(&bravo);
    let flood = Flood::start(&evil, bravo_wan, bravo_key, false);
    let flood_started = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "bravo to answer the flood with cookies",
        || bravo.counter("wg_cookies_sent") > cookies_before + 1000,
    );

    // The established session carries on, both ways, without a new handshake.
    alpha.wait_http(&bravo, Duration::from_secs(15));
    bravo.wait_http(&alpha, Duration::from_secs(15));

    // A new member handshakes with bravo during the flood: its initiation (or its response
    // to bravo's) draws a cookie reply, and the retry carrying the cookie's MAC2 passes. The
    // limiter lets the first 500 handshake messages of each second through without a cookie;
    // should charlie's handshake fall among them, charlie leaves and joins again (a new
    // handshake), a few times at most.
    let charlie = lab.node("charlie");
    charlie.serve_http();
    let mut charlie_cookies = 0;
    let mut joins = Vec::new();
    for attempt in 0..5 {
        if attempt > 0 {
            charlie.ctl(&["down"]).expect_ok();
        }
        charlie.up_ok(&coord.token);
        joins.push(charlie.wait_http(&bravo, Duration::from_secs(45)));
        bravo.wait_http(&charlie, OVERLAY_TIMEOUT);
        // Counters start again with each membership.
        charlie_cookies = charlie.counter("wg_cookies_received");
        if charlie_cookies > 0 {
            break;
        }
    }
    alpha.wait_http(&bravo, Duration::from_secs(15));
    let age_during = handshake_age(&bravo, "alpha").unwrap();
    let flood_secs = flood_started.elapsed().as_secs_f64();
    let cpu = (cpu_time(bravo.daemon().pid()) - cpu_before).as_secs_f64();
    let (sent, cookies_back, _) = flood.stop();
    let cookies_sent = bravo.counter("wg_cookies_sent") - cookies_before;
    report(format!(
        "wg_flood: {sent} initiations in {flood_secs:.1} s; bravo sent {cookies_sent} cookie \
         replies, {cookies_back} reached the flooder; charlie's joins reached bravo after \
         {joins:?}, the last with {charlie_cookies} cookie(s); bravo's session with alpha is \
         {age_during} s old; bravo's a2ad used {:.0} % of a core",
        cpu / flood_secs * 100.0
    ));
    report(format!(
        "wg_flood: counters: bravo {}; charlie {}",
        bravo.status().raw["counters"],
        charlie.status().raw["counters"]
    ));
    assert!(
        cookies_back > 0,
        "no cookie reply reached the flooder's address"
    );
    assert!(
        charlie_cookies > 0,
        "charlie's handshakes with bravo met no cookie although bravo was under load"
    );
    assert!(
        age_during >= age_before,
        "the flood cost alpha and bravo their session ({age_before} s, then {age_during} s)"
    );

    // A flooder that answers the cookies (it receives at its address, so it can) gets its
    // initiations past the cookie check, and each would cost bravo a Diffie-Hellman: under load
    // bravo lets 20 a second through per source (boringtun alone would let them all through).
    let unknown_before = bravo.counter("udp_unknown_peer");
    let limited_before = bravo.counter("wg_handshake_rate_limited");
    let cpu_before = cpu_time(bravo.daemon().pid());
    let flood = Flood::start(&evil, bravo_wan, bravo_key, true);
    let flood_started = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    alpha.wait_http(&bravo, Duration::from_secs(15));
    bravo.wait_http(&alpha, Duration::from_secs(15));
    let flood_secs = flood_started.elapsed().as_secs_f64();
    let cpu = (cpu_time(bravo.daemon().pid()) - cpu_before).as_secs_f64();
    let (sent, cookies_back, with_cookie) = flood.stop();
    let attempted = bravo.counter("udp_unknown_peer") - unknown_before;
    let limited = bravo.counter("wg_handshake_rate_limited") - limited_before;
    report(format!(
        "wg_flood: a flooder answering cookies sent {sent} initiations in {flood_secs:.1} s, \
         {with_cookie} with a valid cookie ({cookies_back} cookie replies); bravo looked up the \
         key in {attempted} of them and dropped {limited} over the per-source share; bravo's \
         a2ad used {:.0} % of a core",
        cpu / flood_secs * 100.0
    ));
    assert!(
        with_cookie > sent / 2,
        "the flooder did not manage to answer the cookies"
    );
    assert!(
        limited > with_cookie / 2,
        "initiations with a valid cookie were not limited per source"
    );
    // What the limits allow: the first 1 000 handshake messages of each second (a2ad's
    // HANDSHAKE_RATE_LIMIT) and then 20 a second from this source (HANDSHAKES_PER_SOURCE),
    // with a second's slack for the resets' timing.
    let allowed = (1000.0 + 20.0) * (flood_secs + 1.0);
    assert!(
        (attempted as f64) <= allowed && attempted < sent / 2,
        "bravo did a handshake's Diffie-Hellman for {attempted} of {sent} flood initiations \
         (the limits allow about {allowed:.0})"
    );
    assert!(handshake_age(&bravo, "alpha").unwrap() >= age_during);

    // Once the floods are over, the limiter's count is reset (every second): a new member's
    // handshake needs no cookie any more.
    std::thread::sleep(Duration::from_millis(2500));
    let cookies_after = bravo.counter("wg_cookies_sent");
    let delta = lab.node("delta");
    delta.serve_http();
    delta.up_ok(&coord.token);
    delta.wait_http(&bravo, OVERLAY_TIMEOUT);
    bravo.wait_http(&delta, OVERLAY_TIMEOUT);
    assert_eq!(
        bravo.counter("wg_cookies_sent"),
        cookies_after,
        "bravo still demands cookies after the flood: its rate limiter was not reset"
    );
    assert_eq!(delta.counter("wg_cookies_received"), 0);
    for n in [&alpha, &bravo, &charlie, &delta] {
        n.assert_daemon_running();
    }
    coord.assert_running();
}

// ------------------------------------------------------------------------------------------
// Session timers, in real time
// ------------------------------------------------------------------------------------------

/// REKEY_AFTER_TIME and REJECT_AFTER_TIME of the WireGuard whitepaper (§6.1), seconds.
const REKEY_AFTER_S: u64 = 120;
const REJECT_AFTER_S: u64 = 180;

/// Drops WireGuard handshake initiations and responses to and from `ns`'s WireGuard port, plain
/// or inside relay frames, counting them (nftables, matching the first payload bytes).
fn block_handshakes(ns: &Ns) {
    let port = NODE_PORT;
    let rules = format!(
        "table inet a2a_wg_block {{\n\
           counter handshakes {{ }}\n\
           chain input {{ type filter hook input priority -5; policy accept;\n\
             udp dport {port} @th,64,32 {{ 0x01000000, 0x02000000 }} counter name handshakes drop\n\
             udp dport {port} @th,64,16 0xa205 @th,112,32 {{ 0x01000000, 0x02000000 }} counter name handshakes drop\n\
           }}\n\
           chain output {{ type filter hook output priority -5; policy accept;\n\
             udp sport {port} @th,64,32 {{ 0x01000000, 0x02000000 }} counter name handshakes drop\n\
             udp sport {port} @th,64,16 0xa205 @th,112,32 {{ 0x01000000, 0x02000000 }} counter name handshakes drop\n\
           }}\n\
         }}\n"
    );
    let file = std::env::temp_dir().join(format!("{}-wg-block.nft", ns.name));
    std::fs::write(&file, rules).expect("write nftables rules");
    ns.exec(&["nft", "-f", &file.to_string_lossy()]).expect_ok();
    let _ = std::fs::remove_file(&file);
}

fn unblock_handshakes(ns: &Ns) {
    ns.exec(&["nft", "delete", "table", "inet", "a2a_wg_block"])
        .expect_ok();
}

/// Handshake messages dropped by [`block_handshakes`] so far.
fn blocked_handshakes(ns: &Ns) -> u64 {
    let out = ns
        .exec(&[
            "nft",
            "list",
            "counter",
            "inet",
            "a2a_wg_block",
            "handshakes",
        ])
        .expect_ok();
    out.stdout
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {:?}", out.stdout))
}

/// One ping over the overlay (1 s to answer).
fn ping_once(from: &Node, to: &Node) -> bool {
    from.ns
        .exec_timeout(
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                "1",
                "-W",
                "1",
                &to.overlay_ip().to_string(),
            ],
            Duration::from_secs(10),
        )
        .success()
}

/// The session timers of the real daemons in real time (about 200 s; WireGuard's timers are
/// constants of boringtun, and a mock clock would only reach boringtun's own state machine,
/// not a2ad's timer task, path and queues):
///
/// 1. An idle tunnel wakes up without a new handshake (boringtun starts a handshake when a
///    packet is sent more than KEEPALIVE + REKEY_TIMEOUT = 15 s after the last one received,
///    however alive the peer; a2a's persistent keepalive is shorter than that).
/// 2. With handshakes blocked on the underlay, the initiator tries to rekey after
///    REKEY_AFTER_TIME while data keeps flowing on the old keys.
/// 3. At REJECT_AFTER_TIME the keys are dropped: nothing passes any more.
/// 4. Handshakes unblocked, a new session carries data again.
#[test]
fn session_timers_rekey_reject_and_recover_in_real_time() {
    let Some(lab) = Lab::new("wg_timers") else {
        return;
    };
    require_tool("nft", "nftables");
    let coord = lab.coordinator(CoordOpts::default());
    let alpha = lab.node("alpha");
    let bravo = lab.node("bravo");
    for n in [&alpha, &bravo] {
        n.serve_http();
        n.up_ok(&coord.token);
    }
    alpha.wait_http(&bravo, OVERLAY_TIMEOUT);
    bravo.wait_http(&alpha, OVERLAY_TIMEOUT);
    alpha.wait_path("bravo", "direct", PATH_TIMEOUT);

    // 1. An idle tunnel (only keepalives and path probes), then one datagram that nothing
    // answers, sent when alpha last heard from bravo's WireGuard at least 16 s before, or after
    // 40 s of waiting for such a gap. (A reply within boringtun's 250 ms timer tick would hide
    // a spurious handshake: one-way traffic, or a reply slower than the next tick, shows it.)
    let sink = bravo.ns.spawn(
        "udp-sink",
        &[
            "python3",
            "-c",
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind(('0.0.0.0', 9999))\nwhile True: s.recv(2048)",
        ],
    );
    let capture = Capture::start(&alpha.ns, NODE_PORT);
    let bravo_wan = SocketAddr::new(bravo.wan_ip().into(), NODE_PORT);
    let from_bravo = |s: &Seen| s.from == bravo_wan && wireguard_in(&s.payload).is_some();
    let idle = Instant::now();
    let quiet = loop {
        let last = capture.last(from_bravo).unwrap_or(idle);
        if last.elapsed() >= Duration::from_secs(16) || idle.elapsed() >= Duration::from_secs(40) {
            break last.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    sink.assert_running();
    let age_before = handshake_age(&alpha, "bravo").unwrap();
    let to = SocketAddr::new(bravo.overlay_ip().into(), 9999);
    alpha.ns.run_in(move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.send_to(b"one way", to).expect("send one datagram");
    });
    std::thread::sleep(Duration::from_secs(3));
    let seen = capture.stop();
    let mut gaps: Vec<f64> = seen
        .iter()
        .filter(|s| from_bravo(s))
        .map(|s| s.at)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    gaps.sort_by(f64::total_cmp);
    let (a_age, b_age) = (
        handshake_age(&alpha, "bravo").unwrap(),
        handshake_age(&bravo, "alpha").unwrap(),
    );
    report(format!(
        "wg_timers: idle tunnel: longest silence of bravo's WireGuard {:.1} s (keepalives); one \
         datagram sent {:.1} s after the last one heard; the sessions are then {a_age} s \
         (alpha) and {b_age} s (bravo) old",
        gaps.last().copied().unwrap_or(0.0),
        quiet.as_secs_f64()
    ));
    assert!(
        a_age >= age_before && b_age >= age_before,
        "the first packet after an idle period started a new handshake (ages {age_before} s \
         before, {a_age} s and {b_age} s after)"
    );

    // 2.-3. Handshakes blocked; a ping a second from alpha to bravo.
    block_handshakes(&bravo.ns);
    let age0 = handshake_age(&alpha, "bravo").unwrap();
    // The session's birth, on the test's clock (the age is rounded down: up to 1 s earlier).
    let born = Instant::now() - Duration::from_secs(age0);
    let age = || born.elapsed().as_secs();
    let mut pings: Vec<(u64, bool)> = Vec::new();
    let mut first_blocked: Option<u64> = None;
    let mut last_age_seen = age0;
    while age() < REJECT_AFTER_S + 12 {
        let tick = Instant::now();
        pings.push((age(), ping_once(&alpha, &bravo)));
        if first_blocked.is_none() && blocked_handshakes(&bravo.ns) > 0 {
            first_blocked = Some(age());
        }
        if let Some(a) = handshake_age(&alpha, "bravo") {
            last_age_seen = a;
        }
        if let Some(rest) = Duration::from_secs(1).checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let blocked = blocked_handshakes(&bravo.ns);
    let ok_before_rekey = pings
        .iter()
        .filter(|(a, ok)| *a < REKEY_AFTER_S && *ok)
        .count();
    let ok_rekey_to_reject = pings
        .iter()
        .filter(|(a, ok)| (REKEY_AFTER_S + 5..REJECT_AFTER_S - 5).contains(a) && *ok)
        .count();
    let after_reject: Vec<bool> = pings
        .iter()
        .filter(|(a, _)| *a >= REJECT_AFTER_S + 3)
        .map(|(_, ok)| *ok)
        .collect();
    report(format!(
        "wg_timers: first handshake blocked at session age {first_blocked:?} s, {blocked} blocked \
         in all; pings answered: {ok_before_rekey} before {REKEY_AFTER_S} s, \
         {ok_rekey_to_reject} between {} and {} s, {} of {} after {} s; alpha last saw its \
         session {last_age_seen} s old",
        REKEY_AFTER_S + 5,
        REJECT_AFTER_S - 5,
        after_reject.iter().filter(|ok| **ok).count(),
        after_reject.len(),
        REJECT_AFTER_S + 3
    ));
    let first_blocked = first_blocked.expect("nobody tried to rekey the session");
    assert!(
        first_blocked + 2 >= REKEY_AFTER_S,
        "a handshake was started at session age {first_blocked} s, before REKEY_AFTER_TIME"
    );
    assert!(
        first_blocked < REJECT_AFTER_S,
        "no rekey was tried before the session expired"
    );
    assert!(
        ok_rekey_to_reject >= 20,
        "the old session stopped carrying data before REJECT_AFTER_TIME"
    );
    assert!(after_reject.len() >= 5);
    assert!(
        after_reject.iter().all(|ok| !ok),
        "data still passed after REJECT_AFTER_TIME with handshakes blocked: {pings:?}"
    );
    assert!(
        last_age_seen < REJECT_AFTER_S + 2,
        "alpha listed a session {last_age_seen} s old"
    );

    // 4. Handshakes allowed again: a new session, and data flows.
    unblock_handshakes(&bravo.ns);
    wait_until(
        OVERLAY_TIMEOUT,
        "pings after handshakes are unblocked",
        || ping_once(&alpha, &bravo),
    );
    let new_age = handshake_age(&alpha, "bravo").expect("a new session");
    assert!(new_age < 30, "the new session is {new_age} s old");
    alpha.wait_http(&bravo, OVERLAY_TIMEOUT);
    bravo.wait_http(&alpha, OVERLAY_TIMEOUT);
}
