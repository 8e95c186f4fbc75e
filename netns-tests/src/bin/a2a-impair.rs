//! a2a-impair: a bump in the wire for the lab, in place of netem (which this machine's kernel
//! lacks). Not part of a2a.
//!
//! a2a-impair IF_A IF_B [--delay MS] [--jitter MS] [--loss PCT] [--queue FRAMES] [--seed N]
//!
//! Every frame received on one interface is sent out of the other after `--delay` ± `--jitter`
//! milliseconds (uniform; fractions allowed), unless `--loss` drops it (the lab drops with
//! nftables in its routers instead; this is for other uses). The two interfaces are meant to be
//! the two ends of veth pairs in a namespace of their own, without addresses: one AF_PACKET
//! socket (ETH_P_ALL, promiscuous) bound to each, and a thread per direction.
//!
//! - Order: a frame never leaves before the one ahead of it in its direction. Its departure is
//!   `max(arrival + delay ± jitter, departure of the frame before)`, like netem with a rate: TCP
//!   sees jitter, not reordering. Because departures only grow, each direction is a FIFO queue
//!   and no timer heap is needed. Under load (frames closer together than the jitter) the delay
//!   tends to the upper end, `delay + jitter`.
//! - Offloads: the sockets use `PACKET_VNET_HDR`, so a frame travels with its virtio-net header
//!   like through a tap: a frame whose checksum the sender left to the hardware (every veth does)
//!   keeps it "partial" instead of arriving with a wrong checksum, and a GSO super-frame (up to
//!   64 KiB) is passed on whole (and counted in `gso`). No `ethtool -K` is needed. To delay wire
//!   packets rather than super-frames, the lab limits GSO to one segment on the links that feed
//!   the forwarder (`ip link set DEV gso_max_segs 1`).
//! - The queue of each direction holds at most `--queue` frames; a frame arriving at a full queue
//!   is dropped and counted (`full`).
//! - Frames of type PACKET_OUTGOING (a socket sees what is sent on its interface) are skipped.
//!
//! On SIGTERM or SIGINT it prints its counters as one JSON line on stdout and exits 0:
//! `{"a_to_b": {"frames": .., "bytes": .., "sent": .., "lost": .., "full": .., "send_errors": ..,
//! "gso": .., "truncated": .., "max_queue": ..}, "b_to_a": {..}}`.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Size of the virtio-net header `PACKET_VNET_HDR` puts before each frame.
const VNET_HDR: usize = 10;
/// The largest frame: a 64 KiB GSO super-frame with its Ethernet header, and the vnet header.
const MAX_FRAME: usize = VNET_HDR + 14 + 65_535;
/// Socket buffers: room for a few hundred Mbit/s to wait while a thread is busy.
const SOCKET_BUFFER: libc::c_int = 16 << 20;
/// Frames received in one go before the due ones are sent.
const RX_BURST: usize = 64;
/// How often a waiting thread looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

struct Opts {
    a: String,
    b: String,
    delay: Duration,
    jitter: Duration,
    /// Drop probability in millionths.
    loss_ppm: u32,
    queue: usize,
    seed: u64,
}

const USAGE: &str = "usage: a2a-impair IF_A IF_B [--delay MS] [--jitter MS] [--loss PCT] \
                     [--queue FRAMES] [--seed N]";

fn parse_ms(flag: &str, v: &str) -> Result<Duration, String> {
    let ms: f64 = v
        .parse()
        .map_err(|e| format!("{flag} {v:?}: not a number of milliseconds ({e})"))?;
    if !(0.0..=60_000.0).contains(&ms) {
        return Err(format!("{flag} {v}: give 0 to 60000 milliseconds"));
    }
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut names = Vec::new();
    let mut opts = Opts {
        a: String::new(),
        b: String::new(),
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        loss_ppm: 0,
        queue: 100_000,
        seed: std::process::id().into(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if !arg.starts_with("--") {
            names.push(arg.clone());
            continue;
        }
        let v = it
            .next()
            .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))?;
        match arg.as_str() {
            "--delay" => opts.delay = parse_ms(arg, v)?,
            "--jitter" => opts.jitter = parse_ms(arg, v)?,
            "--loss" => {
                let pct: f64 = v
                    .parse()
                    .map_err(|e| format!("--loss {v:?}: not a percentage ({e})"))?;
                if !(0.0..=100.0).contains(&pct) {
                    return Err(format!("--loss {v}: give a percentage from 0 to 100"));
                }
                opts.loss_ppm = (pct * 10_000.0).round() as u32;
            }
            "--queue" => {
                opts.queue = v
                    .parse()
                    .ok()
                    .filter(|&q| q > 0)
                    .ok_or_else(|| format!("--queue {v:?}: give a number of frames above 0"))?;
            }
            "--seed" => {
                opts.seed = v
                    .parse()
                    .map_err(|e| format!("--seed {v:?}: not a number ({e})"))?;
            }
            _ => return Err(format!("unknown option {arg}\n{USAGE}")),
        }
    }
    if opts.jitter > opts.delay {
        return Err(format!(
            "--jitter {:?} is larger than --delay {:?}: a frame cannot leave before it came",
            opts.jitter, opts.delay
        ));
    }
    match <[String; 2]>::try_from(names) {
        Ok([a, b]) if a != b => {
            opts.a = a;
            opts.b = b;
            Ok(opts)
        }
        Ok(_) => Err(format!(
            "IF_A and IF_B must be two different interfaces\n{USAGE}"
        )),
        Err(names) => Err(format!(
            "give exactly two interfaces, not {}\n{USAGE}",
            names.len()
        )),
    }
}

/// xorshift64*: enough randomness for jitter and loss, and reproducible with `--seed`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Default)]
struct Counters {
    frames: AtomicU64,
    bytes: AtomicU64,
    sent: AtomicU64,
    lost: AtomicU64,
    full: AtomicU64,
    send_errors: AtomicU64,
    gso: AtomicU64,
    truncated: AtomicU64,
    max_queue: AtomicU64,
}

impl Counters {
    fn json(&self) -> String {
        let f = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "{{\"frames\": {}, \"bytes\": {}, \"sent\": {}, \"lost\": {}, \"full\": {}, \
             \"send_errors\": {}, \"gso\": {}, \"truncated\": {}, \"max_queue\": {}}}",
            f(&self.frames),
            f(&self.bytes),
            f(&self.sent),
            f(&self.lost),
            f(&self.full),
            f(&self.send_errors),
            f(&self.gso),
            f(&self.truncated),
            f(&self.max_queue)
        )
    }
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An AF_PACKET socket bound to `ifname`, receiving every frame, with virtio-net headers.
fn packet_socket(ifname: &str) -> Result<OwnedFd, String> {
    let fail = |what: &str, e: io::Error| format!("{ifname}: {what}: {e}");
    let c_name = CString::new(ifname).map_err(|_| format!("{ifname:?}: not an interface name"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(format!(
            "no interface {ifname} in this namespace ({}): run a2a-impair where both \
             interfaces are",
            io::Error::last_os_error()
        ));
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) with constant arguments.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto.into()) };
    if raw < 0 {
        return Err(fail(
            "AF_PACKET socket (needs root or CAP_NET_RAW)",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `raw` is a new socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let on: libc::c_int = 1;
    setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &on)
        .map_err(|e| fail("PACKET_VNET_HDR", e))?;
    // Not fatal: the OUTGOING copies are skipped below anyway (older kernels lack the option).
    let _ = setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &on);
    for (force, plain, what) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "SO_RCVBUF"),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "SO_SNDBUF"),
    ] {
        if setsockopt(&fd, libc::SOL_SOCKET, force, &SOCKET_BUFFER).is_err() {
            setsockopt(&fd, libc::SOL_SOCKET, plain, &SOCKET_BUFFER).map_err(|e| fail(what, e))?;
        }
    }
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: `sll` is a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(fail("bind", io::Error::last_os_error()));
    }
    // SAFETY: all-zero is a valid packet_mreq.
    let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mreq.mr_ifindex = index as i32;
    mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
    setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
        .map_err(|e| fail("promiscuous mode", e))?;
    Ok(fd)
}

struct Frame {
    due: Instant,
    data: Vec<u8>,
}

struct Direction {
    rx: Arc<OwnedFd>,
    tx: Arc<OwnedFd>,
    delay: Duration,
    jitter: Duration,
    loss_ppm: u32,
    queue: usize,
    rng: Rng,
    counters: Arc<Counters>,
}

/// Waits until `fd` is readable or `timeout` passes (with sub-millisecond precision).
fn wait_readable(fd: &OwnedFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos().into(),
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask.
    unsafe {
        libc::ppoll(&mut pfd, 1, &ts, std::ptr::null());
    }
}

impl Direction {
    fn run(mut self) {
        let c = &self.counters;
        let mut queue: VecDeque<Frame> = VecDeque::new();
        let mut last_due: Option<Instant> = None;
        let mut buf = vec![0u8; MAX_FRAME];
        while !STOP.load(Ordering::Relaxed) {
            let timeout = queue
                .front()
                .map_or(STOP_CHECK, |f| {
                    f.due.saturating_duration_since(Instant::now())
                })
                .min(STOP_CHECK);
            if !timeout.is_zero() {
                wait_readable(&self.rx, timeout);
            }
            for _ in 0..RX_BURST {
                // SAFETY: all-zero is a valid sockaddr_ll.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: `buf` and `from` are valid for the lengths given.
                let n = unsafe {
                    libc::recvfrom(
                        self.rx.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut from_len,
                    )
                };
                if n < 0 {
                    break;
                }
                let n = n as usize;
                if from.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                c.frames.fetch_add(1, Ordering::Relaxed);
                c.bytes
                    .fetch_add(n.saturating_sub(VNET_HDR) as u64, Ordering::Relaxed);
                if n > buf.len() {
                    c.truncated.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if n < VNET_HDR {
                    continue;
                }
                // virtio_net_hdr.gso_type (byte 1): 0 is VIRTIO_NET_HDR_GSO_NONE.
                if buf[1] != 0 {
                    c.gso.fetch_add(1, Ordering::Relaxed);
                }
                if self.loss_ppm > 0 && (self.rng.next() % 1_000_000) < u64::from(self.loss_ppm) {
                    c.lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if queue.len() >= self.queue {
                    c.full.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let spread = self.jitter.as_secs_f64() * (2.0 * self.rng.unit() - 1.0);
                let delay = Duration::from_secs_f64((self.delay.as_secs_f64() + spread).max(0.0));
                let mut due = Instant::now() + delay;
                if let Some(last) = last_due {
                    due = due.max(last);
                }
                last_due = Some(due);
                queue.push_back(Frame {
                    due,
                    data: buf[..n].to_vec(),
                });
                c.max_queue.fetch_max(queue.len() as u64, Ordering::Relaxed);
            }
            let now = Instant::now();
            while queue.front().is_some_and(|f| f.due <= now) {
                let f = queue.pop_front().expect("a front frame");
                // SAFETY: `f.data` is valid for its length.
                let rc = unsafe {
                    libc::send(self.tx.as_raw_fd(), f.data.as_ptr().cast(), f.data.len(), 0)
                };
                if rc < 0 {
                    c.send_errors.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("a2a-impair: {e}");
            return ExitCode::from(2);
        }
    };
    let sockets = packet_socket(&opts.a).and_then(|a| Ok((a, packet_socket(&opts.b)?)));
    let (a, b) = match sockets {
        Ok((a, b)) => (Arc::new(a), Arc::new(b)),
        Err(e) => {
            eprintln!("a2a-impair: {e}");
            return ExitCode::from(1);
        }
    };
    // SAFETY: the handler only stores to an atomic; PR_SET_TIMERSLACK has no preconditions
    // (1 µs: the timers of the delay line wake on time).
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0);
    }
    let mut rng = Rng(opts.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let a_to_b = Arc::new(Counters::default());
    let b_to_a = Arc::new(Counters::default());
    let threads: Vec<_> = [(&a, &b, &a_to_b), (&b, &a, &b_to_a)]
        .into_iter()
        .map(|(rx, tx, counters)| {
            let dir = Direction {
                rx: rx.clone(),
                tx: tx.clone(),
                delay: opts.delay,
                jitter: opts.jitter,
                loss_ppm: opts.loss_ppm,
                queue: opts.queue,
                rng: Rng(rng.next() | 1),
                counters: counters.clone(),
            };
            std::thread::spawn(move || dir.run())
        })
        .collect();
    eprintln!(
        "a2a-impair: {} <-> {}: delay {:?} ± {:?}, loss {}%, queue {} frames",
        opts.a,
        opts.b,
        opts.delay,
        opts.jitter,
        f64::from(opts.loss_ppm) / 10_000.0,
        opts.queue
    );
    for t in threads {
        let _ = t.join();
    }
    println!(
        "{{\"a_to_b\": {}, \"b_to_a\": {}}}",
        a_to_b.json(),
        b_to_a.json()
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn arguments_are_checked() {
        let o = parse_args(&args("x y --delay 10 --jitter 2.5 --loss 3")).unwrap();
        assert_eq!((o.a.as_str(), o.b.as_str()), ("x", "y"));
        assert_eq!(o.delay, Duration::from_millis(10));
        assert_eq!(o.jitter, Duration::from_micros(2500));
        assert_eq!(o.loss_ppm, 30_000);
        for bad in [
            "x",
            "x x",
            "x y z",
            "x y --delay",
            "x y --delay -1",
            "x y --delay 1 --jitter 2",
            "x y --loss 101",
            "x y --queue 0",
            "x y --nope 1",
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_random_numbers_are_uniform_enough() {
        let mut r = Rng(12345);
        let n = 100_000;
        let mean = (0..n).map(|_| r.unit()).sum::<f64>() / f64::from(n);
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }
}
