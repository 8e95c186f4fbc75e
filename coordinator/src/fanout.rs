//! The join fan-out, coalesced: changes to a network's members are gathered for each member
//! over a short window and leave as one [`ServerMsg::Peers`] (or a few, each under a size cap)
//! instead of one message per change. Free of I/O: the switchboard hands it every change with
//! the time, and [`Fanout::flush`] returns what to send once the window has passed.
//!
//! A change after a quiet spell (nothing sent for a window) leaves at once, the leading edge,
//! which the switchboard asks for with [`Fanout::quiet`] and [`Fanout::flush_now`]: a lone join
//! is not delayed (a peer on the same LAN knows the newcomer before its first probe arrives),
//! and only the changes that follow it within the window wait.
//!
//! Without it, a network of N members that all register at once (a coordinator restart) costs
//! N² messages of one record each; with it, each member gets about one message per window
//! whatever the join rate, carrying only what changed (deltas, never the whole member list).
//!
//! For each member it is told of, only the outcome of the window's changes is kept: a record
//! replaced in the window leaves as its newest only, a member that joined and left as a
//! departure only, one that left and came back as both (the departure applied first, so the
//! receiver drops the old session before it takes the new record). Records leave in the order
//! of their last change, so one that gave up an overlay address is applied before the one that
//! took it.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use a2a_proto::control::{PeerEntry, ServerMsg};
use a2a_proto::NodeKey;

use crate::registry::{ConnId, Sends};

/// How long changes are gathered before they leave. Every change is delayed by at most this
/// much (50 ms is 5 % of the 1 s join-latency budget), and a member receives at most 20
/// member-change messages a second however fast others join.
pub const WINDOW: Duration = Duration::from_millis(50);

/// The most JSON bytes one batch message carries: half a control frame (65 519 bytes of
/// plaintext), about fifty records of the usual size; a larger batch is split.
pub const MAX_BATCH_BYTES: usize = 32 * 1024;

/// The bytes of `{"type":"peers","down":[],"up":[]}` and some margin.
const BATCH_OVERHEAD: usize = 64;

/// What one member is to be told about another.
struct Change {
    key: NodeKey,
    /// Order of the last change.
    seq: u64,
    /// It left (before `up`, if both).
    down: bool,
    /// Its newest record.
    up: Option<PeerEntry>,
}

#[derive(Default)]
struct Target {
    changes: HashMap<NodeKey, Change>,
    next_seq: u64,
}

impl Target {
    fn change(&mut self, key: NodeKey) -> &mut Change {
        let seq = self.next_seq;
        self.next_seq += 1;
        let c = self.changes.entry(key).or_insert(Change {
            key,
            seq,
            down: false,
            up: None,
        });
        c.seq = seq;
        c
    }
}

/// Pending member changes, by the connection they are for.
pub struct Fanout {
    window: Duration,
    max_bytes: usize,
    targets: HashMap<ConnId, Target>,
    /// When the open window ends (none open: nothing pending).
    deadline: Option<Instant>,
    /// When changes last left (the leading edge waits a window after it).
    last_flush: Option<Instant>,
}

impl Fanout {
    /// Gathers changes over `window` (zero: off, see [`Fanout::is_on`]); each message carries
    /// at most `max_bytes` of JSON (a single record larger than that still leaves, alone).
    pub fn new(window: Duration, max_bytes: usize) -> Self {
        Fanout {
            window,
            max_bytes,
            targets: HashMap::new(),
            deadline: None,
            last_flush: None,
        }
    }

    /// Off (a zero window), changes leave at once as one `PeerUp` or `PeerDown` each: the
    /// messages of coordinators before this one, which older nodes understand.
    pub fn is_on(&self) -> bool {
        !self.window.is_zero()
    }

    fn target(&mut self, now: Instant, conn: ConnId) -> &mut Target {
        self.deadline.get_or_insert(now + self.window);
        self.targets.entry(conn).or_default()
    }

    /// Member `key` joined or has a newer record, `entry`: tell `conn`.
    pub fn up(&mut self, now: Instant, conn: ConnId, key: NodeKey, entry: PeerEntry) {
        self.target(now, conn).change(key).up = Some(entry);
    }

    /// Member `key` left or expired: tell `conn`.
    pub fn down(&mut self, now: Instant, conn: ConnId, key: NodeKey) {
        let c = self.target(now, conn).change(key);
        c.down = true;
        c.up = None;
    }

    /// Connection `conn` ended: what was pending for it goes nowhere.
    pub fn forget(&mut self, conn: ConnId) {
        self.targets.remove(&conn);
        if self.targets.is_empty() {
            self.deadline = None;
        }
    }

    /// The most JSON bytes of one batch.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// When [`Fanout::flush`] has something to send.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// For how many connections changes are pending (a count only).
    pub fn pending(&self) -> usize {
        self.targets.len()
    }

    /// Whether nothing has left for a whole window: changes pending now may leave at once
    /// ([`Fanout::flush_now`]) rather than wait for the window.
    pub fn quiet(&self, now: Instant) -> bool {
        self.last_flush.is_none_or(|t| now >= t + self.window)
    }

    /// Once the window has passed: every pending change, as batches, each member's in order.
    pub fn flush(&mut self, now: Instant) -> Sends {
        if self.deadline.is_none_or(|d| d > now) {
            return Vec::new();
        }
        self.flush_now(now)
    }

    /// Every pending change now, as [`Fanout::flush`] sends them when due.
    pub fn flush_now(&mut self, now: Instant) -> Sends {
        if self.deadline.is_none() {
            return Vec::new();
        }
        self.deadline = None;
        self.last_flush = Some(now);
        let mut out = Vec::new();
        for (conn, t) in self.targets.drain() {
            let mut changes: Vec<Change> = t.changes.into_values().collect();
            changes.sort_unstable_by_key(|c| c.seq);
            let mut down = Vec::new();
            let mut up = Vec::new();
            for c in changes {
                if c.down {
                    down.push(c.key);
                }
                up.extend(c.up);
            }
            out.extend(
                batches(down, up, self.max_bytes)
                    .into_iter()
                    .map(|m| (conn, m)),
            );
        }
        out
    }
}

/// Counts the bytes written to it.
struct Counter(usize);

impl io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The JSON length of a departure in a batch (and a comma).
fn key_len(key: &NodeKey) -> usize {
    let mut c = Counter(1);
    let _ = serde_json::to_writer(&mut c, key);
    c.0
}

/// The JSON length of a record in a batch (and a comma).
fn entry_len(entry: &PeerEntry) -> usize {
    let mut c = Counter(1);
    let _ = serde_json::to_writer(&mut c, entry);
    c.0
}

/// `down` then `up` as [`ServerMsg::Peers`] messages of at most `max_bytes` of JSON each, in
/// order (departures first); nothing if both are empty.
pub fn batches(down: Vec<NodeKey>, up: Vec<PeerEntry>, max_bytes: usize) -> Vec<ServerMsg> {
    let mut out = Vec::new();
    let mut cur_down = Vec::new();
    let mut cur_up = Vec::new();
    let mut bytes = BATCH_OVERHEAD;
    let full = |bytes: usize, n: usize| n > 0 && bytes + n > max_bytes;
    for key in down {
        let n = key_len(&key);
        if full(bytes, n) && !(cur_down.is_empty() && cur_up.is_empty()) {
            out.push(ServerMsg::Peers {
                down: std::mem::take(&mut cur_down),
                up: Vec::new(),
            });
            bytes = BATCH_OVERHEAD;
        }
        bytes += n;
        cur_down.push(key);
    }
    for entry in up {
        let n = entry_len(&entry);
        if full(bytes, n) && !(cur_down.is_empty() && cur_up.is_empty()) {
            out.push(ServerMsg::Peers {
                down: std::mem::take(&mut cur_down),
                up: std::mem::take(&mut cur_up),
            });
            bytes = BATCH_OVERHEAD;
        }
        bytes += n;
        cur_up.push(entry);
    }
    if !(cur_down.is_empty() && cur_up.is_empty()) {
        out.push(ServerMsg::Peers {
            down: cur_down,
            up: cur_up,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use a2a_proto::{NetworkKey, NodeRecord, SignedRecord};

    fn key(n: u8) -> NodeKey {
        NodeKey([n; 32])
    }

    fn entry(n: u8, issued_ms: u64) -> PeerEntry {
        let k = NetworkKey::derive(&[1; 32]);
        let record: SignedRecord = NodeRecord {
            network: k.id(),
            node_key: key(n),
            name: format!("n{n}"),
            ip: format!("100.64.0.{n}").parse().unwrap(),
            candidates: vec![],
            issued_ms,
            ssh: None,
        }
        .sign(&k);
        PeerEntry {
            record,
            relay_id: n as u32,
        }
    }

    fn fanout() -> Fanout {
        Fanout::new(WINDOW, MAX_BATCH_BYTES)
    }

    /// One batch as departures and (relay id, issued_ms) of its records.
    type Seen = (Vec<NodeKey>, Vec<(u32, u64)>);

    /// Every message to `conn`, as [`Seen`].
    fn seen(sends: &Sends, conn: ConnId) -> Vec<Seen> {
        sends
            .iter()
            .filter(|(c, _)| *c == conn)
            .map(|(_, m)| match m {
                ServerMsg::Peers { down, up } => (
                    down.clone(),
                    up.iter()
                        .map(|e| {
                            let r: NodeRecord = serde_json::from_str(&e.record.body).unwrap();
                            (e.relay_id, r.issued_ms)
                        })
                        .collect(),
                ),
                other => panic!("not a batch: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn changes_leave_together_once_the_window_has_passed() {
        let mut f = fanout();
        let t0 = Instant::now();
        assert_eq!(f.deadline(), None);
        assert!(f.flush(t0 + WINDOW).is_empty());
        f.up(t0, 1, key(2), entry(2, 1));
        // The window opens with the first change and does not move with later ones.
        f.up(t0 + WINDOW / 2, 1, key(3), entry(3, 1));
        f.down(t0 + WINDOW / 2, 2, key(4));
        assert_eq!(f.deadline(), Some(t0 + WINDOW));
        assert_eq!(f.pending(), 2);
        assert!(f.flush(t0 + WINDOW / 2).is_empty());
        let out = f.flush(t0 + WINDOW);
        assert_eq!(out.len(), 2, "one message per member: {out:?}");
        assert_eq!(seen(&out, 1), vec![(vec![], vec![(2, 1), (3, 1)])]);
        assert_eq!(seen(&out, 2), vec![(vec![key(4)], vec![])]);
        assert_eq!(f.deadline(), None);
        assert_eq!(f.pending(), 0);
        assert!(f.flush(t0 + WINDOW * 3).is_empty());
        // The next change opens a new window.
        f.up(t0 + WINDOW * 3, 1, key(2), entry(2, 2));
        assert_eq!(f.deadline(), Some(t0 + WINDOW * 4));
    }

    #[test]
    fn after_a_quiet_window_changes_may_leave_at_once_and_the_next_ones_wait() {
        let mut f = fanout();
        let t0 = Instant::now();
        assert!(f.quiet(t0), "nothing sent yet");
        assert!(f.flush_now(t0).is_empty(), "nothing pending");
        f.up(t0, 1, key(2), entry(2, 1));
        assert_eq!(seen(&f.flush_now(t0), 1), vec![(vec![], vec![(2, 1)])]);
        assert_eq!(f.deadline(), None);
        // Within the window of that send: not quiet, the next change waits for its window.
        let t1 = t0 + WINDOW / 5;
        assert!(!f.quiet(t1));
        f.up(t1, 1, key(3), entry(3, 1));
        assert_eq!(f.deadline(), Some(t1 + WINDOW));
        assert!(f.flush(t1).is_empty());
        assert_eq!(seen(&f.flush(t1 + WINDOW), 1), vec![(vec![], vec![(3, 1)])]);
        // A window after that: quiet again.
        assert!(!f.quiet(t1 + WINDOW + WINDOW / 2));
        assert!(f.quiet(t1 + WINDOW * 2));
    }

    #[test]
    fn a_record_replaced_in_the_window_leaves_as_its_newest_only() {
        let mut f = fanout();
        let t0 = Instant::now();
        f.up(t0, 1, key(2), entry(2, 1));
        f.up(t0, 1, key(2), entry(2, 2));
        f.up(t0, 1, key(2), entry(2, 3));
        assert_eq!(seen(&f.flush(t0 + WINDOW), 1), vec![(vec![], vec![(2, 3)])]);
    }

    #[test]
    fn a_join_then_a_leave_is_a_leave_and_a_leave_then_a_join_is_both() {
        let mut f = fanout();
        let t0 = Instant::now();
        f.up(t0, 1, key(2), entry(2, 1));
        f.down(t0, 1, key(2));
        // Node 3 restarted: its old session goes, its new record comes.
        f.down(t0, 1, key(3));
        f.up(t0, 1, key(3), entry(3, 5));
        assert_eq!(
            seen(&f.flush(t0 + WINDOW), 1),
            vec![(vec![key(2), key(3)], vec![(3, 5)])]
        );
    }

    #[test]
    fn records_leave_in_the_order_of_their_last_change() {
        let mut f = fanout();
        let t0 = Instant::now();
        f.up(t0, 1, key(2), entry(2, 1));
        f.up(t0, 1, key(3), entry(3, 1));
        // 2 changes again (it moved, say, off an address 4 then takes): after 3, before 4.
        f.up(t0, 1, key(2), entry(2, 2));
        f.up(t0, 1, key(4), entry(4, 1));
        assert_eq!(
            seen(&f.flush(t0 + WINDOW), 1),
            vec![(vec![], vec![(3, 1), (2, 2), (4, 1)])]
        );
    }

    #[test]
    fn a_batch_over_the_cap_is_split_in_order() {
        let one = entry_len(&entry(2, 1));
        // Room for three records a message.
        let mut f = Fanout::new(WINDOW, BATCH_OVERHEAD + 3 * one + one / 2);
        let t0 = Instant::now();
        f.down(t0, 1, key(200));
        for n in 2..12 {
            f.up(t0, 1, key(n), entry(n, 1));
        }
        let out = f.flush(t0 + WINDOW);
        let got = seen(&out, 1);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0].0, vec![key(200)]);
        assert!(got[1..].iter().all(|(d, _)| d.is_empty()));
        let ids: Vec<u32> = got
            .iter()
            .flat_map(|(_, u)| u.iter().map(|r| r.0))
            .collect();
        assert_eq!(ids, (2..12).collect::<Vec<_>>());
        for (_, m) in &out {
            let len = serde_json::to_vec(m).unwrap().len();
            assert!(len <= BATCH_OVERHEAD + 3 * one + one / 2, "{len}");
        }
        // A record larger than the cap still leaves, alone.
        let big = batches(vec![], vec![entry(2, 1), entry(3, 1)], 10);
        assert_eq!(big.len(), 2);
        assert!(batches(vec![], vec![], 10).is_empty());
        // At the real cap, a batch fits a control frame.
        let many: Vec<PeerEntry> = (0..=255).map(|n| entry(n, 1)).collect();
        for m in batches(vec![], many, MAX_BATCH_BYTES) {
            let len = serde_json::to_vec(&m).unwrap().len();
            assert!(len <= MAX_BATCH_BYTES, "{len}");
            assert!(len + 16 <= a2a_proto::noise_channel::MAX_FRAME);
        }
    }

    #[test]
    fn what_was_pending_for_a_closed_connection_goes_nowhere() {
        let mut f = fanout();
        let t0 = Instant::now();
        f.up(t0, 1, key(2), entry(2, 1));
        f.up(t0, 3, key(2), entry(2, 1));
        f.forget(1);
        assert!(f.deadline().is_some());
        let out = f.flush(t0 + WINDOW);
        assert!(seen(&out, 1).is_empty());
        assert_eq!(seen(&out, 3).len(), 1);
        f.up(t0, 1, key(2), entry(2, 1));
        f.forget(1);
        assert_eq!(f.deadline(), None, "nothing pending: no window open");
    }
}
