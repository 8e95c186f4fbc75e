//! When to fetch each member's service list: I/O-free, driven by `now` (the driver in
//! `tasks/services.rs` does the fetching).
//!
//! A peer's list is fetched when the peer appears, when it says its list changed (a "changed"
//! datagram naming a version other than the one held), and otherwise every [`POLL`] (the
//! backstop for a lost datagram). A failed fetch is retried after a backoff doubling from
//! [`RETRY_MIN`] to [`POLL`]. At most [`MAX_IN_FLIGHT`] fetches run at once.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use a2a_proto::services::ServiceSpec;

/// What `services.json` holds: this node's own services and the version of their list.
#[derive(serde::Serialize, serde::Deserialize, Default)]
pub struct SavedServices {
    pub version: u64,
    pub services: Vec<ServiceSpec>,
}

/// A held list is fetched again after this long even with no "changed" datagram.
pub const POLL: Duration = Duration::from_secs(30);
/// The first retry after a failed fetch.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Fetches running at once.
pub const MAX_IN_FLIGHT: usize = 8;
/// "Changed" datagrams heeded from one peer: one fetch at most this often on its word
/// (a peer flooding them cannot make this node fetch in a loop).
pub const CHANGED_MIN_GAP: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct PeerFetch {
    /// The version of the list held (`None`: none yet).
    version: Option<u64>,
    due: Instant,
    in_flight: bool,
    failures: u32,
    last_started: Option<Instant>,
}

/// The fetch schedule of every peer, keyed by `K` (the driver uses the peer's public key).
#[derive(Debug)]
pub struct Fetcher<K> {
    peers: HashMap<K, PeerFetch>,
    in_flight: usize,
}

impl<K> Default for Fetcher<K> {
    fn default() -> Self {
        Fetcher {
            peers: HashMap::new(),
            in_flight: 0,
        }
    }
}

impl<K: Eq + Hash + Clone> Fetcher<K> {
    /// The current members: new ones are due at once, departed ones are forgotten (returned,
    /// so their lists are dropped).
    pub fn set_peers(&mut self, now: Instant, members: impl IntoIterator<Item = K>) -> Vec<K> {
        let current: std::collections::HashSet<K> = members.into_iter().collect();
        let gone: Vec<K> = self
            .peers
            .keys()
            .filter(|k| !current.contains(*k))
            .cloned()
            .collect();
        for k in &gone {
            if self.peers.remove(k).is_some_and(|p| p.in_flight) {
                self.in_flight -= 1;
            }
        }
        for k in current {
            self.peers.entry(k).or_insert(PeerFetch {
                version: None,
                due: now,
                in_flight: false,
                failures: 0,
                last_started: None,
            });
        }
        gone
    }

    /// A peer says its list is now at `version`: fetched soon unless that is the one held.
    pub fn changed(&mut self, now: Instant, peer: &K, version: u64) {
        if let Some(p) = self.peers.get_mut(peer) {
            if p.version != Some(version) {
                let earliest = p.last_started.map_or(now, |t| t + CHANGED_MIN_GAP);
                p.due = p.due.min(earliest.max(now));
            }
        }
    }

    /// The peers whose fetch starts now (marked in flight), within [`MAX_IN_FLIGHT`].
    pub fn start(&mut self, now: Instant) -> Vec<K> {
        let mut due: Vec<(&K, &mut PeerFetch)> = self
            .peers
            .iter_mut()
            .filter(|(_, p)| !p.in_flight && p.due <= now)
            .collect();
        due.sort_by_key(|(_, p)| p.due);
        let room = MAX_IN_FLIGHT.saturating_sub(self.in_flight);
        let mut out = Vec::new();
        for (k, p) in due.into_iter().take(room) {
            p.in_flight = true;
            p.last_started = Some(now);
            out.push(k.clone());
        }
        self.in_flight += out.len();
        out
    }

    fn finish(&mut self, peer: &K) -> Option<&mut PeerFetch> {
        let p = self.peers.get_mut(peer)?;
        if p.in_flight {
            p.in_flight = false;
            self.in_flight -= 1;
        }
        Some(p)
    }

    /// A fetch brought the list at `version`.
    pub fn fetched(&mut self, now: Instant, peer: &K, version: u64) {
        if let Some(p) = self.finish(peer) {
            p.version = Some(version);
            p.failures = 0;
            p.due = now + POLL;
        }
    }

    /// A fetch failed (timeout, refused, malformed): retried after a backoff.
    pub fn failed(&mut self, now: Instant, peer: &K) {
        if let Some(p) = self.finish(peer) {
            let backoff = RETRY_MIN.saturating_mul(1 << p.failures.min(8)).min(POLL);
            p.failures = p.failures.saturating_add(1);
            p.due = now + backoff;
        }
    }

    /// When [`Fetcher::start`] next has something to start (`None`: nothing scheduled).
    pub fn next_due(&self) -> Option<Instant> {
        if self.in_flight >= MAX_IN_FLIGHT {
            return None;
        }
        self.peers
            .values()
            .filter(|p| !p.in_flight)
            .map(|p| p.due)
            .min()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_peers_are_fetched_at_once_then_polled() {
        let t0 = Instant::now();
        let mut f = Fetcher::default();
        assert!(f.set_peers(t0, ["a", "b"]).is_empty());
        let mut started = f.start(t0);
        started.sort();
        assert_eq!(started, vec!["a", "b"]);
        assert!(f.start(t0).is_empty(), "in flight: not started twice");
        f.fetched(t0, &"a", 1);
        f.failed(t0, &"b");
        assert_eq!(f.next_due(), Some(t0 + RETRY_MIN));
        assert_eq!(f.start(t0 + RETRY_MIN), vec!["b"]);
        f.failed(t0 + RETRY_MIN, &"b");
        // The backoff doubles.
        assert!(f.start(t0 + RETRY_MIN * 2).is_empty());
        assert_eq!(f.start(t0 + RETRY_MIN * 3), vec!["b"]);
        f.fetched(t0 + RETRY_MIN * 3, &"b", 7);
        assert!(f.start(t0 + POLL - Duration::from_millis(1)).is_empty());
        assert_eq!(f.start(t0 + POLL), vec!["a"]);
    }

    #[test]
    fn a_changed_datagram_brings_a_fetch_forward_unless_the_version_is_held() {
        let t0 = Instant::now();
        let mut f = Fetcher::default();
        f.set_peers(t0, ["a"]);
        f.start(t0);
        f.fetched(t0, &"a", 5);
        let t1 = t0 + Duration::from_secs(2);
        f.changed(t1, &"a", 5);
        assert!(f.start(t1).is_empty(), "version 5 is held");
        f.changed(t1, &"a", 6);
        assert_eq!(f.start(t1), vec!["a"]);
        f.fetched(t1, &"a", 6);
        // A flood of datagrams: at most one fetch per CHANGED_MIN_GAP.
        f.changed(t1, &"a", 7);
        assert!(f.start(t1).is_empty());
        assert_eq!(f.start(t1 + CHANGED_MIN_GAP), vec!["a"]);
        f.changed(t1, &"z", 1); // not a member: ignored
        assert_eq!(f.next_due(), None);
    }

    #[test]
    fn fetches_in_flight_are_bounded_and_departed_peers_forgotten() {
        let t0 = Instant::now();
        let mut f = Fetcher::default();
        f.set_peers(t0, 0..20);
        assert_eq!(f.start(t0).len(), MAX_IN_FLIGHT);
        assert!(f.start(t0).is_empty());
        assert_eq!(f.next_due(), None);
        let gone = f.set_peers(t0, 10..20);
        assert_eq!(gone.len(), 10);
        assert!(f.in_flight() <= MAX_IN_FLIGHT);
        let more = f.start(t0);
        assert_eq!(f.in_flight(), MAX_IN_FLIGHT.min(10));
        assert!(more.iter().all(|k| *k >= 10));
    }
}
