//! Bridges: direct TCP connections between the coordinators of a cluster that carry relay data
//! past the NATS servers (see README, *A coordinator cluster on NATS*). As a DERP mesh's
//! servers forward packets to each other, a coordinator dials every `--endpoint` of the token
//! and, where one answers as another coordinator of the cluster, sends that coordinator's relay
//! envelopes over the connection instead of publishing them. NATS carries everything else, and
//! the relay data too wherever no bridge is up (coordinators that cannot reach each other's
//! endpoint, a bridge that is full or closed): a bridge changes the path, never what arrives.
//!
//! On the wire (`a2a_proto::cluster`): the dialer writes [`BRIDGE_MAGIC`] and its hello, the
//! other answers its own hello, then the dialer writes relay envelopes. Each frame is
//! `length (u32 BE) | envelope`; every envelope is sealed under the cluster key, so a stranger
//! who connects learns one instance number and can send nothing that opens. What does not open
//! closes the connection and is counted. [`Plan`] (no I/O) decides which endpoint to dial when;
//! the rest of this module is its driver. Nothing about nodes is printed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use a2a_proto::cluster::{BRIDGE_MAGIC, HEADER_LEN, MAX_ENVELOPE};
use a2a_proto::sync::{read, write};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::cluster::Sealer;

/// Relay envelopes waiting for one bridge at most (each up to 64 KiB): beyond it they go over
/// NATS.
pub const BRIDGE_QUEUE: usize = 64;
/// Envelopes written to a bridge in one write at most.
const WRITE_BATCH: usize = 16;
/// How long a dial and each hello may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// The first wait after a failed dial, doubled per failure up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Unacknowledged data older than this closes a bridge (`TCP_USER_TIMEOUT`): a path that went
/// dark hands its relay data back to NATS within seconds, not after minutes of retransmits.
const USER_TIMEOUT_MS: u32 = 5_000;
/// An idle bridge is probed after this many seconds (TCP keepalive), and closed when a probe
/// goes unanswered for [`USER_TIMEOUT_MS`]: a coordinator whose host died without closing
/// its connections frees the slot, so its successor at that endpoint is bridged again.
const KEEPALIVE_IDLE_S: i32 = 30;
/// A hello frame's largest size (a header and a tag).
const MAX_HELLO: usize = HEADER_LEN + 64;

/// What became of one dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A bridge to another coordinator is up.
    Up,
    /// The endpoint is this coordinator itself: never dialed again.
    Me,
    /// No connection, or no hello that opened.
    Failed,
    /// The coordinator there has a bridge already (another endpoint of the same one).
    Duplicate,
    /// A bridge that was up closed.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Idle { at: Instant, failures: u32 },
    Dialing { failures: u32 },
    Up,
    Me,
}

/// Which of the token's endpoints to dial, and when (I/O-free).
#[derive(Debug)]
pub struct Plan {
    slots: Vec<Slot>,
}

impl Plan {
    /// `endpoints` endpoints, each due at once.
    pub fn new(endpoints: usize, now: Instant) -> Self {
        Plan {
            slots: vec![
                Slot::Idle {
                    at: now,
                    failures: 0
                };
                endpoints
            ],
        }
    }

    /// The endpoints to dial now (each is then being dialed until its [`Plan::outcome`]).
    pub fn due(&mut self, now: Instant) -> Vec<usize> {
        let mut due = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Slot::Idle { at, failures } = *slot {
                if at > now {
                    continue;
                }
                *slot = Slot::Dialing { failures };
                due.push(i);
            }
        }
        due
    }

    /// When the next endpoint is due, if any is waiting.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Idle { at, .. } => Some(*at),
                _ => None,
            })
            .min()
    }

    pub fn outcome(&mut self, endpoint: usize, outcome: Outcome, now: Instant) {
        let Some(slot) = self.slots.get_mut(endpoint) else {
            return;
        };
        let failures = match *slot {
            Slot::Idle { failures, .. } | Slot::Dialing { failures } => failures,
            Slot::Up | Slot::Me => 0,
        };
        *slot = match outcome {
            Outcome::Up => Slot::Up,
            Outcome::Me => Slot::Me,
            Outcome::Closed => Slot::Idle {
                at: now + RETRY_MIN,
                failures: 0,
            },
            Outcome::Duplicate => Slot::Idle {
                at: now + RETRY_MAX,
                failures: 0,
            },
            Outcome::Failed => {
                let failures = failures.saturating_add(1);
                let wait = RETRY_MIN
                    .saturating_mul(1u32 << (failures - 1).min(16))
                    .min(RETRY_MAX);
                Slot::Idle {
                    at: now + wait,
                    failures,
                }
            }
        };
    }

    /// Dials of `endpoint` that failed in a row (0 after one that did not).
    pub fn failures(&self, endpoint: usize) -> u32 {
        match self.slots.get(endpoint) {
            Some(Slot::Idle { failures, .. } | Slot::Dialing { failures }) => *failures,
            _ => 0,
        }
    }

    /// Bridges up.
    pub fn up(&self) -> usize {
        self.slots.iter().filter(|s| **s == Slot::Up).count()
    }
}

/// One bridge up: its number (so that a closing one removes itself, not a newer one) and its
/// queue.
type Bridge = (u64, mpsc::Sender<Vec<u8>>);

/// The bridges up, by the subject of the coordinator each reaches, and their counters.
#[derive(Default)]
pub struct Bridges {
    on: AtomicBool,
    next: AtomicU64,
    up: RwLock<HashMap<String, Bridge>>,
    /// Relay envelopes sent and received over bridges.
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Envelopes that went over NATS because their bridge's queue was full.
    pub full: AtomicU64,
    /// Connections closed for what did not open: a magic, a hello or a frame.
    pub refused: AtomicU64,
    /// Bridges that came up.
    pub opened: AtomicU64,
}

impl Bridges {
    /// Whether this coordinator dials and answers bridges (off with `--no-bridges`).
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Bridges up now.
    pub fn count(&self) -> usize {
        read(&self.up).len()
    }

    /// Sends a relay envelope for `subject` over its bridge, or gives it back (no bridge up,
    /// or its queue full: it goes over NATS).
    pub fn send(&self, subject: &str, payload: Vec<u8>) -> Result<(), Vec<u8>> {
        let up = read(&self.up);
        let Some((_, tx)) = up.get(subject) else {
            return Err(payload);
        };
        match tx.try_send(payload) {
            Ok(()) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(p)) => {
                self.full.fetch_add(1, Ordering::Relaxed);
                Err(p)
            }
            Err(mpsc::error::TrySendError::Closed(p)) => Err(p),
        }
    }

    /// Adds a bridge for `subject`, unless one is up already.
    fn add(&self, subject: &str, tx: mpsc::Sender<Vec<u8>>) -> Option<u64> {
        let mut up = write(&self.up);
        if up.contains_key(subject) {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        up.insert(subject.to_string(), (id, tx));
        self.opened.fetch_add(1, Ordering::Relaxed);
        Some(id)
    }

    fn remove(&self, subject: &str, id: u64) {
        let mut up = write(&self.up);
        if up.get(subject).is_some_and(|(i, _)| *i == id) {
            up.remove(subject);
        }
    }
}

/// Starts dialing the token's `endpoints` (this coordinator's own among them: it finds out
/// which by the hello) and answering bridges, with the cluster's `sealer` and `bridges`.
pub fn start(sealer: Arc<Sealer>, bridges: Arc<Bridges>, endpoints: Vec<String>) {
    bridges.on.store(true, Ordering::Relaxed);
    tokio::spawn(dial_loop(sealer, bridges, endpoints));
}

async fn dial_loop(sealer: Arc<Sealer>, bridges: Arc<Bridges>, endpoints: Vec<String>) {
    let mut plan = Plan::new(endpoints.len(), Instant::now());
    let (report, mut outcomes) =
        mpsc::channel::<(usize, Result<Outcome, String>)>(endpoints.len().max(1) * 2);
    loop {
        for i in plan.due(Instant::now()) {
            let (sealer, bridges) = (sealer.clone(), bridges.clone());
            let (endpoint, report) = (endpoints[i].clone(), report.clone());
            tokio::spawn(async move {
                let r = report.clone();
                let outcome = dial(&sealer, &bridges, &endpoint, move |o| {
                    let _ = r.try_send((i, Ok(o)));
                })
                .await;
                let _ = report.send((i, outcome)).await;
            });
        }
        let wait = plan.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            Some((i, o)) = outcomes.recv() => {
                let o = o.unwrap_or_else(|why| {
                    // Said once per run of failures, not at every retry.
                    if plan.failures(i) == 0 {
                        tracing::info!(
                            "cluster: no bridge to the coordinator at {} ({why}); its relay \
                             data goes over NATS, and the dial is retried (every 30 s at \
                             most). Coordinators bridge when they reach each other's \
                             --endpoint over TCP; --no-bridges turns bridges off",
                            endpoints[i]
                        );
                    }
                    Outcome::Failed
                });
                plan.outcome(i, o, Instant::now());
            }
            _ = async {
                match wait {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// One dial of `endpoint`. Returns the outcome when no bridge came up (a failure with why);
/// else says [`Outcome::Up`] through `up`, carries the bridge until it closes and returns
/// [`Outcome::Closed`].
async fn dial(
    sealer: &Sealer,
    bridges: &Bridges,
    endpoint: &str,
    up: impl FnOnce(Outcome),
) -> Result<Outcome, String> {
    let connect = async {
        let addr = tokio::net::lookup_host(endpoint)
            .await
            .map_err(|e| format!("cannot resolve it: {e}"))?
            .next()
            .ok_or("it resolves to no address")?;
        TcpStream::connect(addr)
            .await
            .map_err(|e| format!("TCP connect: {e}"))
    };
    let mut stream = match tokio::time::timeout(DIAL_TIMEOUT, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(why)) => return Err(why),
        Err(_) => return Err(format!("no TCP connection within {DIAL_TIMEOUT:?}")),
    };
    let _ = stream.set_nodelay(true);
    tune(&stream);
    let mut hello = BRIDGE_MAGIC.to_vec();
    push_frame(&mut hello, &sealer.seal_hello(a2a_proto::time::now_ms()));
    let answered = async {
        stream.write_all(&hello).await.ok()?;
        read_frame(&mut stream, MAX_HELLO).await.ok()
    };
    let Ok(Some(answer)) = tokio::time::timeout(DIAL_TIMEOUT, answered).await else {
        return Err("no bridge hello in answer: not an a2a coordinator with bridges".into());
    };
    let Ok(instance) = sealer.open_hello(&answer, a2a_proto::time::now_ms()) else {
        bridges.refused.fetch_add(1, Ordering::Relaxed);
        return Err(
            "its hello does not open: another cluster's coordinator.key, or a clock more than \
             30 s off"
                .into(),
        );
    };
    if instance == sealer.me() {
        return Ok(Outcome::Me);
    }
    let subject = sealer.subject_to(&instance);
    let (tx, rx) = mpsc::channel(BRIDGE_QUEUE);
    let Some(id) = bridges.add(&subject, tx) else {
        return Ok(Outcome::Duplicate);
    };
    up(Outcome::Up);
    tracing::info!(
        "cluster: bridge to the coordinator at {endpoint} up: relay data for it bypasses NATS"
    );
    let (mut reader, writer) = stream.into_split();
    tokio::select! {
        _ = carry(writer, rx) => {}
        // The other side sends nothing after its hello: a read ends only when it closes.
        _ = reader.read_u8() => {}
    }
    bridges.remove(&subject, id);
    tracing::info!(
        "cluster: bridge to the coordinator at {endpoint} closed: relay data for it goes over \
         NATS"
    );
    Ok(Outcome::Closed)
}

/// Writes what is queued for a bridge, several envelopes per write, until the queue or the
/// connection closes.
async fn carry(mut w: impl AsyncWrite + Unpin, mut rx: mpsc::Receiver<Vec<u8>>) {
    let mut queued = Vec::with_capacity(WRITE_BATCH);
    let mut buf = Vec::new();
    while rx.recv_many(&mut queued, WRITE_BATCH).await > 0 {
        buf.clear();
        for p in queued.drain(..) {
            push_frame(&mut buf, &p);
        }
        if w.write_all(&buf).await.is_err() {
            return;
        }
    }
}

/// Whether an accepted connection starts as a bridge (its first byte is the magic's: a node's
/// control connection starts with a zero).
pub fn starts_as_bridge(first: u8) -> bool {
    first == BRIDGE_MAGIC[0]
}

/// Answers a bridge another coordinator dialed: checks its magic and hello (by `deadline`),
/// calls `admitted` (the connection is then no longer pending), answers this coordinator's
/// hello and hands every envelope to `receive` (false: it did not open) until the connection
/// closes or sends what does not open.
pub async fn serve<S>(
    sealer: &Sealer,
    bridges: &Bridges,
    mut stream: S,
    deadline: tokio::time::Instant,
    admitted: impl FnOnce(),
    receive: impl Fn(&[u8]) -> bool,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let refused = || {
        bridges.refused.fetch_add(1, Ordering::Relaxed);
    };
    let greeted = async {
        let mut magic = [0u8; BRIDGE_MAGIC.len()];
        stream.read_exact(&mut magic).await.ok()?;
        if &magic != BRIDGE_MAGIC {
            return None;
        }
        let hello = read_frame(&mut stream, MAX_HELLO).await.ok()?;
        sealer.open_hello(&hello, a2a_proto::time::now_ms()).ok()
    };
    let Ok(Some(_dialer)) = tokio::time::timeout_at(deadline, greeted).await else {
        refused();
        return;
    };
    admitted();
    let mut answer = Vec::new();
    push_frame(&mut answer, &sealer.seal_hello(a2a_proto::time::now_ms()));
    if stream.write_all(&answer).await.is_err() {
        return;
    }
    loop {
        let frame = match read_frame(&mut stream, MAX_ENVELOPE).await {
            Ok(f) => f,
            Err(FrameError::Closed) => return,
            Err(FrameError::Malformed) => return refused(),
        };
        if !receive(&frame) {
            return refused();
        }
        bridges.received.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
enum FrameError {
    Closed,
    /// A length of zero or over the limit.
    Malformed,
}

async fn read_frame(r: &mut (impl AsyncRead + Unpin), max: usize) -> Result<Vec<u8>, FrameError> {
    let len = r.read_u32().await.map_err(|_| FrameError::Closed)? as usize;
    if len == 0 || len > max {
        return Err(FrameError::Malformed);
    }
    let mut frame = vec![0u8; len];
    r.read_exact(&mut frame)
        .await
        .map_err(|_| FrameError::Closed)?;
    Ok(frame)
}

fn push_frame(buf: &mut Vec<u8>, envelope: &[u8]) {
    buf.extend_from_slice(&(envelope.len() as u32).to_be_bytes());
    buf.extend_from_slice(envelope);
}

/// A bridge's socket, on either side: [`USER_TIMEOUT_MS`] and TCP keepalive after
/// [`KEEPALIVE_IDLE_S`] (best effort: a refused option leaves the kernel's default).
pub fn tune(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: setsockopt on the stream's open descriptor with a correctly sized int.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    };
    set(
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        USER_TIMEOUT_MS as libc::c_int,
    );
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_S);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, KEEPALIVE_IDLE_S / 3);
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(1);

    #[test]
    fn every_endpoint_is_dialed_at_once_and_failures_back_off_to_the_cap() {
        let t0 = Instant::now();
        let mut p = Plan::new(3, t0);
        assert_eq!(p.due(t0), vec![0, 1, 2]);
        assert_eq!(
            p.due(t0),
            Vec::<usize>::new(),
            "being dialed: not due again"
        );
        assert_eq!(p.poll_timeout(), None);
        p.outcome(0, Outcome::Me, t0);
        p.outcome(1, Outcome::Up, t0);
        p.outcome(2, Outcome::Failed, t0);
        assert_eq!(p.up(), 1);
        assert_eq!(p.poll_timeout(), Some(t0 + RETRY_MIN));
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            now = p.poll_timeout().expect("one waits");
            assert_eq!(p.due(now - T), Vec::<usize>::new(), "not before its time");
            assert_eq!(p.due(now), vec![2]);
            p.outcome(2, Outcome::Failed, now);
            waits.push((p.poll_timeout().unwrap() - now).as_secs());
        }
        assert_eq!(waits, vec![2, 4, 8, 16, 30, 30, 30, 30]);
        // Me is never dialed again; a bridge that closes is redialed after RETRY_MIN, with its
        // failures forgotten.
        p.outcome(1, Outcome::Closed, now);
        assert_eq!(p.due(now + RETRY_MIN), vec![1]);
        p.outcome(1, Outcome::Failed, now + RETRY_MIN);
        assert_eq!(p.due(now + RETRY_MIN * 2 - T), Vec::<usize>::new());
        assert!(p.due(now + RETRY_MIN * 2).contains(&1));
        assert!(p.due(now + RETRY_MAX * 100).iter().all(|&i| i != 0));
    }

    #[test]
    fn a_second_endpoint_of_the_same_coordinator_waits_the_longest() {
        let t0 = Instant::now();
        let mut p = Plan::new(2, t0);
        p.due(t0);
        p.outcome(0, Outcome::Up, t0);
        p.outcome(1, Outcome::Duplicate, t0);
        assert_eq!(p.poll_timeout(), Some(t0 + RETRY_MAX));
        p.outcome(7, Outcome::Up, t0); // out of range: ignored
        assert_eq!(p.up(), 1);
    }

    #[tokio::test]
    async fn a_bridge_takes_envelopes_until_full_then_gives_them_back() {
        let b = Bridges::default();
        assert_eq!(
            b.send("a2a.x.to.1", vec![1]),
            Err(vec![1]),
            "no bridge: NATS"
        );
        let (tx, mut rx) = mpsc::channel(2);
        let id = b.add("a2a.x.to.1", tx).expect("the first");
        let (tx2, _rx2) = mpsc::channel(2);
        assert!(
            b.add("a2a.x.to.1", tx2).is_none(),
            "one bridge per coordinator"
        );
        assert_eq!(b.send("a2a.x.to.1", vec![1]), Ok(()));
        assert_eq!(b.send("a2a.x.to.1", vec![2]), Ok(()));
        assert_eq!(b.send("a2a.x.to.1", vec![3]), Err(vec![3]), "full: NATS");
        assert_eq!(b.full.load(Ordering::Relaxed), 1);
        assert_eq!(rx.recv().await, Some(vec![1]));
        b.remove("a2a.x.to.1", id + 1);
        assert_eq!(b.count(), 1, "another bridge's id removes nothing");
        b.remove("a2a.x.to.1", id);
        assert_eq!(b.count(), 0);
        assert_eq!(b.send("a2a.x.to.1", vec![4]), Err(vec![4]));
    }

    #[tokio::test]
    async fn frames_are_length_prefixed_and_refused_over_the_limit() {
        let mut buf = Vec::new();
        push_frame(&mut buf, b"hello");
        push_frame(&mut buf, &[7u8; 300]);
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r, 1000).await.unwrap(), b"hello");
        assert!(matches!(
            read_frame(&mut r, 100).await,
            Err(FrameError::Malformed)
        ));
        let mut zero = &[0u8, 0, 0, 0][..];
        assert!(matches!(
            read_frame(&mut zero, 100).await,
            Err(FrameError::Malformed)
        ));
        let mut short = &[0u8, 0, 0, 9, 1, 2][..];
        assert!(matches!(
            read_frame(&mut short, 100).await,
            Err(FrameError::Closed)
        ));
        assert!(starts_as_bridge(BRIDGE_MAGIC[0]));
        assert!(
            !starts_as_bridge(0),
            "a node's Noise frame length starts with 0"
        );
    }
}
