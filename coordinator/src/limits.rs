//! Admission control: what one source (one IPv4 address, one IPv6 /64) may cost the coordinator,
//! so that a flood from it leaves the coordinator serving everyone else. Free of I/O and of
//! logging: the server asks before it spends anything (a file descriptor, a task, the Diffie-
//! Hellman operations of a Noise handshake, a UDP reply) and does what the answer says.
//!
//! The decisions, each with the time passed in:
//! - [`Admission::admit_tcp`]: a new TCP connection is served, or refused (the server resets it)
//!   because the coordinator holds its maximum of connections or of connections not yet
//!   registered, or the source holds its maximum of either, or the source opened more new
//!   connections than its token bucket allows. Every connection handshakes once, so the bucket
//!   also bounds the Noise handshakes (four X25519 operations each) and the registrations (two
//!   Ed25519 verifications) one source can make the coordinator do.
//! - [`Limits::register_deadline`]: a connection that has not completed its handshake and sent a
//!   valid registration this long after it was accepted is closed (slow-loris).
//! - [`Limits::message_budget`]: control messages on one registered connection are paced to a
//!   token bucket; the reader waits (TCP back-pressure) instead of dropping them.
//! - [`Admission::udp`]: probes, binds and other non-relay datagrams are answered within a token
//!   bucket per source; the rest are dropped. (Relay data has its own per-sender bucket in the
//!   relay table, `relay.rs`, which uses this module's [`TokenBucket`].)
//!
//! State is kept per source only while it has connections or was seen within
//! [`Limits::source_idle`], and for at most [`Limits::max_sources`] sources; beyond that (a flood
//! from more sources than that, spoofed UDP sources for instance) the untracked sources share
//! one overflow allowance of the same size as one source's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A sustained rate per second and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: f64,
}

impl Rate {
    /// How long an emptied bucket takes to refill.
    pub fn refill_time(&self) -> Duration {
        Duration::from_secs_f64(self.burst / self.per_sec)
    }
}

/// File descriptors kept apart from control connections: the listening sockets, the UDP
/// sockets, stdio, the runtime's own.
pub const RESERVED_FDS: u64 = 64;

/// The limits. [`Limits::default`] holds the coordinator's numbers (the README says why).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Control connections open at once, over all sources.
    pub max_connections: usize,
    /// Connections accepted but not yet registered, over all sources.
    pub max_pending: usize,
    /// Control connections open at once from one source.
    pub source_connections: usize,
    /// Connections not yet registered from one source.
    pub source_pending: usize,
    /// New connections (hence handshakes and registrations) one source may open.
    pub source_connect_rate: Rate,
    /// From accept to a valid registration: the handshake and the `Register` message.
    pub register_deadline: Duration,
    /// Control messages (relay frames aside) one registered connection may send.
    pub message_rate: Rate,
    /// Non-relay UDP datagrams (endpoint probes, relay binds) answered per source.
    pub source_udp_rate: Rate,
    /// Sources tracked at once.
    pub max_sources: usize,
    /// A source without connections is forgotten after this long unseen.
    pub source_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 50_000,
            max_pending: 2048,
            source_connections: 1024,
            source_pending: 64,
            source_connect_rate: Rate {
                per_sec: 50.0,
                burst: 500.0,
            },
            register_deadline: Duration::from_secs(5),
            message_rate: Rate {
                per_sec: 200.0,
                burst: 1000.0,
            },
            source_udp_rate: Rate {
                per_sec: 200.0,
                burst: 1000.0,
            },
            max_sources: 65_536,
            source_idle: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// The limits lowered to fit `nofile` open files (the process's `RLIMIT_NOFILE`): a
    /// connection beyond what the process can open would stall the accept loop for everyone.
    pub fn fit_fd_limit(mut self, nofile: u64) -> Self {
        let fit = nofile.saturating_sub(RESERVED_FDS).max(1);
        self.max_connections = self.max_connections.min(fit as usize);
        self.max_pending = self.max_pending.min(self.max_connections);
        self
    }

    /// The budget of one registered connection's control messages, starting full.
    pub fn message_budget(&self, now: Instant) -> TokenBucket {
        TokenBucket::new(self.message_rate, now)
    }
}

/// A token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + dt * self.rate.per_sec).min(self.rate.burst);
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes a token, going into debt when there is none, and says how long the caller must
    /// wait before acting on what it was for: zero within the budget. For pacing a stream the
    /// caller reads no further while it waits (so the debt stays below one token per reader).
    pub fn delay(&mut self, now: Instant) -> Duration {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(-self.rate.burst);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate.per_sec)
        }
    }
}

/// Who limits apply to: an IPv4 address, or an IPv6 /64 (one subscriber's prefix: a source
/// holding a /64 has 2^64 addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4(u32),
    V6(u64),
}

impl From<IpAddr> for SourceKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => SourceKey::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(v4.into()),
                None => SourceKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Which limit a refused connection was over (the control protocol's own refusals, sent to
/// a node, are [`crate::registry::Refusal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// The coordinator holds [`Limits::max_connections`].
    Full,
    /// [`Limits::max_pending`] connections are waiting for their registration.
    PendingFull,
    /// The source holds [`Limits::source_connections`].
    SourceConnections,
    /// The source holds [`Limits::source_pending`] unregistered connections.
    SourcePending,
    /// The source opened connections faster than [`Limits::source_connect_rate`].
    SourceRate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Source(SourceKey),
    /// Counted in the shared allowance of sources not tracked.
    Overflow,
}

/// An admitted connection's seat: where it is counted. Hand it to [`Admission::registered`] once the
/// node has registered and to [`Admission::closed`] when the connection ends.
#[derive(Debug, PartialEq, Eq)]
pub struct Seat {
    slot: Slot,
    registered: bool,
}

struct SourceState {
    open: usize,
    pending: usize,
    connects: TokenBucket,
    udp: TokenBucket,
    seen: Instant,
}

impl SourceState {
    fn new(limits: &Limits, now: Instant) -> Self {
        SourceState {
            open: 0,
            pending: 0,
            connects: TokenBucket::new(limits.source_connect_rate, now),
            udp: TokenBucket::new(limits.source_udp_rate, now),
            seen: now,
        }
    }
}

/// Per-source and global accounting of connections and rates.
pub struct Admission {
    limits: Limits,
    sources: HashMap<SourceKey, SourceState>,
    overflow: SourceState,
    open: usize,
    pending: usize,
    last_prune: Instant,
}

/// A full table is pruned at most this often (a prune walks every source).
const PRUNE_GAP: Duration = Duration::from_secs(1);

impl Admission {
    pub fn new(limits: Limits, now: Instant) -> Self {
        Admission {
            overflow: SourceState::new(&limits, now),
            limits,
            sources: HashMap::new(),
            open: 0,
            pending: 0,
            last_prune: now,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Connections open (admitted and not closed).
    pub fn open(&self) -> usize {
        self.open
    }

    /// Connections admitted and not yet registered.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Sources tracked.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    /// A connection from `ip` was accepted: serve it (and count it) or refuse it.
    pub fn admit_tcp(&mut self, now: Instant, ip: IpAddr) -> Result<Seat, OverLimit> {
        let slot = self.slot(now, ip);
        let (open, pending) = (self.open, self.pending);
        let limits = &self.limits;
        let s = match slot {
            Slot::Source(k) => self.sources.get_mut(&k).expect("slot just made"),
            Slot::Overflow => &mut self.overflow,
        };
        s.seen = now;
        if s.open >= limits.source_connections {
            return Err(OverLimit::SourceConnections);
        }
        if s.pending >= limits.source_pending {
            return Err(OverLimit::SourcePending);
        }
        if open >= limits.max_connections {
            return Err(OverLimit::Full);
        }
        if pending >= limits.max_pending {
            return Err(OverLimit::PendingFull);
        }
        // Last, so a refusal for another reason costs the source no token.
        if !s.connects.take(now) {
            return Err(OverLimit::SourceRate);
        }
        s.open += 1;
        s.pending += 1;
        self.open += 1;
        self.pending += 1;
        Ok(Seat {
            slot,
            registered: false,
        })
    }

    /// The connection of `seat` has registered: it no longer counts as pending.
    pub fn registered(&mut self, seat: &mut Seat) {
        if seat.registered {
            return;
        }
        seat.registered = true;
        self.pending -= 1;
        if let Some(s) = self.state(seat.slot) {
            s.pending -= 1;
        }
    }

    /// The connection of `seat` has ended.
    pub fn closed(&mut self, seat: Seat) {
        self.open -= 1;
        if !seat.registered {
            self.pending -= 1;
        }
        if let Some(s) = self.state(seat.slot) {
            s.open -= 1;
            if !seat.registered {
                s.pending -= 1;
            }
        }
    }

    /// A non-relay UDP datagram from `ip`: whether to handle (and answer) it.
    pub fn udp(&mut self, now: Instant, ip: IpAddr) -> bool {
        let slot = self.slot(now, ip);
        let s = match slot {
            Slot::Source(k) => self.sources.get_mut(&k).expect("slot just made"),
            Slot::Overflow => &mut self.overflow,
        };
        s.seen = now;
        s.udp.take(now)
    }

    fn state(&mut self, slot: Slot) -> Option<&mut SourceState> {
        match slot {
            Slot::Source(k) => self.sources.get_mut(&k),
            Slot::Overflow => Some(&mut self.overflow),
        }
    }

    /// Where `ip` is counted: its own state (made if missing and there is room), else the
    /// overflow allowance.
    fn slot(&mut self, now: Instant, ip: IpAddr) -> Slot {
        if now.saturating_duration_since(self.last_prune) >= self.limits.source_idle {
            self.prune(now);
        }
        let key = SourceKey::from(ip);
        if self.sources.contains_key(&key) {
            return Slot::Source(key);
        }
        if self.sources.len() >= self.limits.max_sources
            && now.saturating_duration_since(self.last_prune) >= PRUNE_GAP
        {
            self.prune(now);
        }
        if self.sources.len() >= self.limits.max_sources {
            return Slot::Overflow;
        }
        self.sources
            .insert(key, SourceState::new(&self.limits, now));
        Slot::Source(key)
    }

    /// Forgets sources without connections that were not seen for [`Limits::source_idle`]
    /// (their buckets would be full again by then).
    fn prune(&mut self, now: Instant) {
        let idle = self.limits.source_idle;
        self.sources
            .retain(|_, s| s.open > 0 || now.saturating_duration_since(s.seen) < idle);
        self.last_prune = now;
    }
}

/// Counts of what the limits dropped, by reason: numbers only, never who.
#[derive(Default)]
pub struct Drops {
    /// Refused: [`OverLimit::PendingFull`].
    pub tcp_refused_pending_cap: AtomicU64,
    /// Refused: [`OverLimit::SourceConnections`].
    pub tcp_refused_source_cap: AtomicU64,
    /// Refused: [`OverLimit::SourcePending`].
    pub tcp_refused_source_pending: AtomicU64,
    /// Refused: [`OverLimit::SourceRate`].
    pub tcp_refused_source_rate: AtomicU64,
    /// Closed for missing the registration deadline (in the handshake or after it).
    pub tcp_register_deadline: AtomicU64,
    /// Control messages delayed to keep a connection within its message rate.
    pub ctl_msgs_throttled: AtomicU64,
    /// Non-relay UDP datagrams dropped over their source's rate.
    pub udp_rate_limited: AtomicU64,
}

impl Drops {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refusal; `Full` is counted by the caller (as `tcp_refused_over_cap`).
    pub fn refused(&self, why: OverLimit) {
        match why {
            OverLimit::Full => {}
            OverLimit::PendingFull => Drops::bump(&self.tcp_refused_pending_cap),
            OverLimit::SourceConnections => Drops::bump(&self.tcp_refused_source_cap),
            OverLimit::SourcePending => Drops::bump(&self.tcp_refused_source_pending),
            OverLimit::SourceRate => Drops::bump(&self.tcp_refused_source_rate),
        }
    }

    /// Every count: its name, what it counts, its value (the counters line and the metrics
    /// are made from this one list).
    pub fn values(&self) -> Vec<(&'static str, &'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "tcp_refused_pending_cap",
                "TCP connections refused: too many unregistered connections",
                g(&self.tcp_refused_pending_cap),
            ),
            (
                "tcp_refused_source_cap",
                "TCP connections refused: too many from one source",
                g(&self.tcp_refused_source_cap),
            ),
            (
                "tcp_refused_source_pending",
                "TCP connections refused: too many unregistered from one source",
                g(&self.tcp_refused_source_pending),
            ),
            (
                "tcp_refused_source_rate",
                "TCP connections refused: their source opened them too fast",
                g(&self.tcp_refused_source_rate),
            ),
            (
                "tcp_register_deadline",
                "Connections closed for not registering in time",
                g(&self.tcp_register_deadline),
            ),
            (
                "ctl_msgs_throttled",
                "Control messages delayed to keep a connection within its message rate",
                g(&self.ctl_msgs_throttled),
            ),
            (
                "udp_rate_limited",
                "Non-relay UDP datagrams dropped over their source's rate",
                g(&self.udp_rate_limited),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Small numbers, so the tests can reach every limit.
    fn small() -> Limits {
        Limits {
            max_connections: 20,
            max_pending: 10,
            source_connections: 8,
            source_pending: 4,
            source_connect_rate: Rate {
                per_sec: 10.0,
                burst: 6.0,
            },
            register_deadline: Duration::from_secs(5),
            message_rate: Rate {
                per_sec: 100.0,
                burst: 5.0,
            },
            source_udp_rate: Rate {
                per_sec: 100.0,
                burst: 10.0,
            },
            max_sources: 4,
            source_idle: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let rate = Rate {
            per_sec: 10.0,
            burst: 3.0,
        };
        let mut b = TokenBucket::new(rate, t0);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert!(!b.take(t0 + ms(50)), "half a token is not a token");
        assert!(b.take(t0 + ms(100)));
        // Time does not pile up beyond the burst.
        let later = t0 + Duration::from_secs(100);
        assert_eq!((0..10).filter(|_| b.take(later)).count(), 3);
        // A clock that goes backwards gives nothing.
        assert!(!b.take(t0));
    }

    #[test]
    fn delay_paces_a_stream_to_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(
            Rate {
                per_sec: 100.0,
                burst: 5.0,
            },
            t0,
        );
        for _ in 0..5 {
            assert_eq!(b.delay(t0), Duration::ZERO);
        }
        // The sixth waits for one token (10 ms); after waiting, the next waits another 10 ms.
        let wait = b.delay(t0);
        assert!((wait.as_secs_f64() - 0.010).abs() < 1e-9, "{wait:?}");
        let wait = b.delay(t0 + wait);
        assert!((wait.as_secs_f64() - 0.010).abs() < 1e-9, "{wait:?}");
        // A reader that waits as told is held to the rate: 1000 messages take 10 s less the
        // burst.
        let mut now = t0 + ms(20);
        let mut b = TokenBucket::new(
            Rate {
                per_sec: 100.0,
                burst: 5.0,
            },
            now,
        );
        let start = now;
        for _ in 0..1000 {
            now += b.delay(now);
        }
        let took = now - start;
        assert!(
            took >= ms(9940) && took <= ms(9960),
            "1000 messages at 100/s with a burst of 5 took {took:?}"
        );
    }

    #[test]
    fn connections_per_source_are_capped_and_released() {
        let t0 = Instant::now();
        let mut a = Admission::new(
            Limits {
                source_connect_rate: Rate {
                    per_sec: 1000.0,
                    burst: 1000.0,
                },
                ..small()
            },
            t0,
        );
        let flood = ip("198.51.100.7");
        let mut seats = Vec::new();
        for _ in 0..4 {
            seats.push(a.admit_tcp(t0, flood).unwrap());
        }
        // Four handshakes in flight: the fifth waits until one registers or closes.
        assert_eq!(a.admit_tcp(t0, flood), Err(OverLimit::SourcePending));
        for t in &mut seats {
            a.registered(t);
        }
        a.registered(&mut seats[0]); // twice is once
        assert_eq!(a.pending(), 0);
        for _ in 0..4 {
            let mut t = a.admit_tcp(t0, flood).unwrap();
            a.registered(&mut t);
            seats.push(t);
        }
        assert_eq!(a.admit_tcp(t0, flood), Err(OverLimit::SourceConnections));
        // Another source is not affected.
        let other = a.admit_tcp(t0, ip("203.0.113.9")).unwrap();
        // Closing one frees one.
        a.closed(seats.pop().unwrap());
        let t = a.admit_tcp(t0, flood).unwrap();
        assert_eq!(a.open(), 9);
        a.closed(t);
        a.closed(other);
        for t in seats {
            a.closed(t);
        }
        assert_eq!((a.open(), a.pending()), (0, 0));
    }

    #[test]
    fn new_connections_per_source_follow_the_bucket() {
        let t0 = Instant::now();
        let mut a = Admission::new(small(), t0);
        let flood = ip("198.51.100.7");
        // Six at once (the burst), each closed at once so no cap interferes.
        for _ in 0..6 {
            let t = a.admit_tcp(t0, flood).unwrap();
            a.closed(t);
        }
        assert_eq!(a.admit_tcp(t0, flood), Err(OverLimit::SourceRate));
        // 10 per second after that.
        let t = a.admit_tcp(t0 + ms(100), flood).unwrap();
        a.closed(t);
        assert_eq!(a.admit_tcp(t0 + ms(150), flood), Err(OverLimit::SourceRate));
        // The rest of the world still gets in.
        let t = a.admit_tcp(t0, ip("203.0.113.9")).unwrap();
        a.closed(t);
    }

    #[test]
    fn a_refused_connection_costs_no_token() {
        let t0 = Instant::now();
        let mut a = Admission::new(small(), t0);
        let flood = ip("198.51.100.7");
        let held: Vec<Seat> = (0..4).map(|_| a.admit_tcp(t0, flood).unwrap()).collect();
        for _ in 0..100 {
            assert_eq!(a.admit_tcp(t0, flood), Err(OverLimit::SourcePending));
        }
        for t in held {
            a.closed(t);
        }
        // 6 - 4 tokens left: the pending refusals did not drain them.
        assert!(a.admit_tcp(t0, flood).is_ok());
    }

    #[test]
    fn global_caps_hold_over_all_sources() {
        let t0 = Instant::now();
        let mut a = Admission::new(
            Limits {
                max_sources: 1000,
                ..small()
            },
            t0,
        );
        let mut seats = Vec::new();
        for i in 0..10u8 {
            seats.push(a.admit_tcp(t0, ip(&format!("192.0.2.{i}"))).unwrap());
        }
        assert_eq!(
            a.admit_tcp(t0, ip("192.0.2.200")),
            Err(OverLimit::PendingFull)
        );
        for t in &mut seats {
            a.registered(t);
        }
        for i in 10..20u8 {
            let mut t = a.admit_tcp(t0, ip(&format!("192.0.2.{i}"))).unwrap();
            a.registered(&mut t);
            seats.push(t);
        }
        assert_eq!(a.admit_tcp(t0, ip("192.0.2.200")), Err(OverLimit::Full));
        a.closed(seats.pop().unwrap());
        assert!(a.admit_tcp(t0, ip("192.0.2.200")).is_ok());
    }

    #[test]
    fn the_fd_limit_lowers_the_caps() {
        let l = Limits::default().fit_fd_limit(1024);
        assert_eq!(l.max_connections, 1024 - RESERVED_FDS as usize);
        assert_eq!(l.max_pending, l.max_connections);
        let l = Limits::default().fit_fd_limit(1 << 20);
        assert_eq!(l.max_connections, Limits::default().max_connections);
        assert_eq!(Limits::default().fit_fd_limit(10).max_connections, 1);
    }

    #[test]
    fn udp_per_source_is_rate_limited() {
        let t0 = Instant::now();
        let mut a = Admission::new(small(), t0);
        let flood = ip("198.51.100.7");
        assert_eq!((0..50).filter(|_| a.udp(t0, flood)).count(), 10);
        assert!(a.udp(t0, ip("203.0.113.9")), "another source has its own");
        assert!(a.udp(t0 + ms(10), flood), "one more per 10 ms");
        assert!(!a.udp(t0 + ms(10), flood));
    }

    #[test]
    fn ipv6_sources_are_counted_per_64() {
        assert_eq!(
            SourceKey::from(ip("2001:db8:1:2::1")),
            SourceKey::from(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            SourceKey::from(ip("2001:db8:1:2::1")),
            SourceKey::from(ip("2001:db8:1:3::1"))
        );
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert_eq!(SourceKey::from(mapped), SourceKey::from(ip("192.0.2.1")));
        let t0 = Instant::now();
        let mut a = Admission::new(small(), t0);
        let sent = (0..50u16)
            .filter(|i| {
                let addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 7, *i, 0, 0, 1);
                a.udp(t0, IpAddr::V6(addr))
            })
            .count();
        assert_eq!(
            sent, 10,
            "one /64 is one source however many addresses it uses"
        );
    }

    #[test]
    fn the_source_table_is_bounded_and_forgets_idle_sources() {
        let t0 = Instant::now();
        let mut a = Admission::new(small(), t0);
        let seat = a.admit_tcp(t0, ip("192.0.2.1")).unwrap();
        for i in 2..=4u8 {
            assert!(a.udp(t0, ip(&format!("192.0.2.{i}"))));
        }
        assert_eq!(a.sources(), 4);
        // Full: new sources share the overflow allowance (10 datagrams between them).
        let shared = (10..40u8)
            .filter(|i| a.udp(t0, ip(&format!("192.0.2.{i}"))))
            .count();
        assert_eq!(shared, 10);
        assert_eq!(a.sources(), 4);
        // Known sources keep their own allowance meanwhile.
        assert!(a.udp(t0, ip("192.0.2.2")));
        // Once idle long enough the UDP-only sources are forgotten; the one holding a
        // connection stays.
        let later = t0 + Duration::from_secs(61);
        assert!(a.udp(later, ip("192.0.2.50")));
        assert_eq!(a.sources(), 2);
        a.closed(seat);
        assert_eq!(a.open(), 0);
    }

    #[test]
    fn connections_counted_in_the_overflow_are_released_there() {
        let t0 = Instant::now();
        let mut a = Admission::new(
            Limits {
                max_sources: 1,
                ..small()
            },
            t0,
        );
        let first = a.admit_tcp(t0, ip("192.0.2.1")).unwrap();
        let mut over: Vec<Seat> = (2..6u8)
            .map(|i| a.admit_tcp(t0, ip(&format!("192.0.2.{i}"))).unwrap())
            .collect();
        // Four pending in the overflow allowance: its pending cap is reached.
        assert_eq!(
            a.admit_tcp(t0, ip("192.0.2.9")),
            Err(OverLimit::SourcePending)
        );
        a.closed(over.pop().unwrap());
        over.push(a.admit_tcp(t0, ip("192.0.2.9")).unwrap());
        for mut t in over {
            a.registered(&mut t);
            a.closed(t);
        }
        a.closed(first);
        assert_eq!((a.open(), a.pending()), (0, 0));
    }

    #[test]
    fn default_limits_fit_a_few_hundred_nodes_behind_one_address() {
        let l = Limits::default();
        // 300 nodes behind one NAT, each with its connection and a stale one not yet expired.
        assert!(l.source_connections >= 600);
        // All of them reconnecting at once (a coordinator restart) get in within the burst
        // and their back-off (4 s at most) covers the rest.
        assert!(l.source_connect_rate.burst >= 300.0);
        // Their binds (one per 5 s each) and probes stay well within the UDP rate.
        assert!(l.source_udp_rate.per_sec >= 300.0 / 5.0 * 2.0);
        // A forgotten source would have a full bucket anyway.
        for r in [l.source_connect_rate, l.source_udp_rate] {
            assert!(r.refill_time() <= l.source_idle);
        }
        // A node without UDP registers about 1 s after connecting (two 0.5 s probe timeouts).
        assert!(l.register_deadline >= Duration::from_secs(3));
    }
}
