//! Path selection for one peer: which direct address (if any) carries its packets, when to
//! probe, and when to fall back to the relay. Free of I/O; the path finder feeds it the clock,
//! probe answers and received data, and carries out the probes it asks for.
//!
//! - Traffic starts on the relay; every candidate address is probed at once and again every
//!   [`UPGRADE_EVERY`] while the peer is relayed, and each round asks the coordinator to make the
//!   peer probe back (a punch).
//! - A round's probes carry the node's *round TTL* (see [`round_ttl`]): enough to leave its own
//!   NATs, opening their mappings towards the peer, and to reach hosts on its own links, but
//!   too little to reach the peer's router. Only a punch from the peer (sent after the peer's
//!   own round opened its NAT towards us) or the peer's own traffic reaching us makes us probe
//!   with the full TTL. A NAT router without a firewall delivers an unsolicited datagram to its
//!   own stack, and conntrack then holds an entry whose reply tuple makes the router give its
//!   node's later packets towards us another port, for as long as we keep sending: probes that
//!   arrive only once the peer's mapping exists never make such an entry.
//! - A candidate becomes the direct path after [`CONFIRM_PONGS`] answered probes in a row
//!   (the second is sent as soon as the first is answered): one lucky packet does not switch.
//! - A direct path is pinged every [`HEARTBEAT`] (which also holds NAT mappings open) and is
//!   dropped for the relay when neither a pong nor data came from it for [`DIRECT_TIMEOUT`].
//!   Once a heartbeat goes unanswered, it is pinged every [`RETRY_GAP`] until it answers or
//!   times out, so a lost datagram or two on a lossy link is not a dead path.
//! - A direct path lost within [`FLAP_WINDOW`] of being chosen doubles the wait before the next
//!   upgrade round (up to [`MAX_UPGRADE_WAIT`]): a flaky path is not chosen again and again.
//! - Only a pong answering a ping still outstanding *to the address it came from* counts, so a
//!   replayed or spoofed probe cannot move the endpoint.
//! - Once direct, the peer's other candidates are probed again [`FIRST_ALTERNATES`] after the
//!   upgrade (an IPv6 candidate whose first probe went unanswered, say) and then every
//!   [`ALTERNATES_EVERY`] (and the answers to the round that found the path still count): the
//!   path moves to another
//!   when that is clearly better ([`clearly_better`]: a lower RTT by a margin, or IPv6 at an
//!   RTT no worse by that margin than IPv4's) twice in a row. (The IPv6 underlay's part; see
//!   the functions under "Path preference".)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use a2a_proto::disco::TxId;

pub const HEARTBEAT: Duration = Duration::from_secs(2);
pub const DIRECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const UPGRADE_EVERY: Duration = Duration::from_secs(5);
pub const MAX_UPGRADE_WAIT: Duration = Duration::from_secs(40);
pub const FLAP_WINDOW: Duration = Duration::from_secs(30);
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a direct path whose last heartbeat went unanswered is pinged again.
pub const RETRY_GAP: Duration = Duration::from_millis(500);
pub const CONFIRM_PONGS: u32 = 2;
/// Addresses a peer was seen at but did not publish (its mapping towards us), kept for probing.
const MAX_LEARNED: usize = 4;
const MAX_PENDING: usize = 64;
/// The same address is not probed again sooner than this because of received traffic.
const REPROBE_GAP: Duration = Duration::from_secs(1);
/// Addresses remembered with the time they were last probed because of received traffic.
const MAX_SIGHTED: usize = 8;
/// How often a direct path's alternatives (the other candidates) are probed.
pub const ALTERNATES_EVERY: Duration = Duration::from_secs(30);
/// How soon after an upgrade the alternatives are first probed: the round that found the path
/// may have raced a better one (IPv4 confirmed before IPv6 first answered), which should not
/// wait [`ALTERNATES_EVERY`].
pub const FIRST_ALTERNATES: Duration = Duration::from_secs(2);
/// Two RTTs closer than this (or than a tenth of the current path's, if more) are equal.
pub const RTT_MARGIN: Duration = Duration::from_millis(1);

/// Where the peer's packets go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Direct(SocketAddr),
    Relay,
}

/// A probe the caller must send: a disco ping with `tx` to `addr` (`None`: through the relay),
/// with the IP TTL `ttl` (`None`: the socket's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub addr: Option<SocketAddr>,
    pub tx: TxId,
    pub ttl: Option<u8>,
}

/// Whether a probe may go to `addr`, a candidate a peer published (or an address it was seen
/// at): not an address nobody can be reached at (unspecified, port 0, loopback, link-local,
/// multicast, IPv4 broadcast), not the coordinator's, and not one of this node's own
/// (`own`: its local and reflexive addresses). A peer's record could otherwise aim our probes
/// at the coordinator, at ourselves or at a whole link.
pub fn probe_worthy(addr: SocketAddr, own: &[SocketAddr], coordinator: Option<SocketAddr>) -> bool {
    let canonical = a2a_proto::addr::canonical(addr);
    let ip = canonical.ip();
    let reachable = addr.port() != 0
        && !ip.is_unspecified()
        && !ip.is_loopback()
        && !ip.is_multicast()
        && match ip {
            std::net::IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_broadcast(),
            std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        };
    reachable
        && coordinator.map(a2a_proto::addr::canonical) != Some(canonical)
        && !own
            .iter()
            .any(|o| a2a_proto::addr::canonical(*o) == canonical)
}

/// The TTL of a node's upgrade rounds, from what it knows of its own network: `None` (the
/// full TTL) when it does not know its reflexive address (no coordinator to punch through);
/// 1 for an open host (its reflexive address is one of its own: no NAT to open, and its
/// round still reaches the hosts on its links); else `hops - 1` to the coordinator, between
/// 2 and 3: past a NAT router (2) or a home router and a carrier's NAT (3), and short of the
/// peer's router, which is at least two routers further on the internet. The coordinator's
/// distance tells the two cases apart in a lab where the coordinator is one router beyond
/// the NATs; `hops: None` (not measured) takes 2.
pub fn round_ttl(
    reflexive: Option<SocketAddr>,
    locals: &[SocketAddr],
    hops: Option<u8>,
) -> Option<u8> {
    let r = reflexive?;
    if locals.iter().any(|l| l.ip() == r.ip()) {
        return Some(1);
    }
    Some(hops.map_or(2, |h| h.saturating_sub(1).clamp(2, 3)))
}

/// What an accepted pong meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PongSeen {
    pub rtt: Duration,
    /// The ping was a user's (`a2actl ping`).
    pub user: bool,
    /// This pong made `addr` the direct path.
    pub upgraded: bool,
    /// Send one more probe to confirm this address.
    pub confirm: Option<SocketAddr>,
    /// This pong moved the direct path to `addr`, a clearly better one.
    pub moved: bool,
}

#[derive(Debug, Clone, Copy)]
struct Direct {
    addr: SocketAddr,
    last_heard: Instant,
    last_ping: Instant,
    since: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    tx: TxId,
    addr: Option<SocketAddr>,
    sent: Instant,
    user: bool,
}

#[derive(Debug)]
pub struct PathState {
    candidates: Vec<SocketAddr>,
    learned: Vec<SocketAddr>,
    direct: Option<Direct>,
    /// The last direct address, used when there is no relay either.
    last_direct: Option<SocketAddr>,
    pending: Vec<Pending>,
    /// When each address was last probed because the peer was seen there ([`Self::seen_at`]).
    sighted: Vec<(SocketAddr, Instant)>,
    /// Pongs in a row from each address that answered while relayed (a peer answering at two
    /// addresses at once, IPv4 and IPv6 or LAN and wan, must not reset the other's count).
    confirming: Vec<(SocketAddr, u32)>,
    next_round: Instant,
    /// When a punch from the peer was last answered with probes.
    last_punch: Option<Instant>,
    upgrade_wait: Duration,
    rtt: Option<Duration>,
    /// A clearly better address than the direct path's, and how many answers in a row said so.
    better: Option<(SocketAddr, u32)>,
    /// When a direct path's alternatives are probed next.
    next_alternates: Instant,
}

impl PathState {
    pub fn new(now: Instant, candidates: Vec<SocketAddr>) -> Self {
        PathState {
            candidates,
            learned: Vec::new(),
            direct: None,
            last_direct: None,
            pending: Vec::new(),
            sighted: Vec::new(),
            confirming: Vec::new(),
            next_round: now,
            last_punch: None,
            upgrade_wait: UPGRADE_EVERY,
            rtt: None,
            better: None,
            next_alternates: now,
        }
    }

    pub fn route(&self) -> Route {
        match self.direct {
            Some(d) => Route::Direct(d.addr),
            None => Route::Relay,
        }
    }

    /// Where to send when the relay is unavailable too (the coordinator is down).
    pub fn fallback(&self) -> Option<SocketAddr> {
        self.last_direct.or(self.candidates.first().copied())
    }

    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// When the direct path last answered or carried data (`None`: relayed).
    pub fn direct_heard(&self) -> Option<Instant> {
        self.direct.map(|d| d.last_heard)
    }

    /// The peer published new candidates: probe them now if relayed.
    pub fn set_candidates(&mut self, now: Instant, candidates: Vec<SocketAddr>) {
        if candidates != self.candidates {
            self.candidates = candidates;
            if self.direct.is_none() {
                self.next_round = now;
            }
        }
    }

    /// The peer's round opened its NATs towards us and asks us to probe back (signalled by the
    /// coordinator): probe every address of it now with the full TTL, if relayed, without
    /// asking it to probe back in turn (that would never end), and not more than once per
    /// [`REPROBE_GAP`]. The round schedule is left alone.
    pub fn punch_requested(&mut self, now: Instant, probes: &mut Vec<Probe>) {
        let recent = self
            .last_punch
            .is_some_and(|t| now.saturating_duration_since(t) < REPROBE_GAP);
        if self.direct.is_some() || recent {
            return;
        }
        self.last_punch = Some(now);
        for addr in self.targets() {
            probes.push(self.new_probe(now, Some(addr), false, None));
        }
    }

    /// The published candidates and the learned addresses.
    fn targets(&self) -> Vec<SocketAddr> {
        let mut targets = self.candidates.clone();
        for a in &self.learned {
            if !targets.contains(a) {
                targets.push(*a);
            }
        }
        targets
    }

    fn new_probe(
        &mut self,
        now: Instant,
        addr: Option<SocketAddr>,
        user: bool,
        ttl: Option<u8>,
    ) -> Probe {
        if self.pending.len() >= MAX_PENDING {
            self.pending.remove(0);
        }
        let tx: TxId = rand::random();
        self.pending.push(Pending {
            tx,
            addr,
            sent: now,
            user,
        });
        Probe { addr, tx, ttl }
    }

    /// A user's probe over the current path.
    pub fn user_probe(&mut self, now: Instant) -> Probe {
        let addr = self.direct.map(|d| d.addr);
        self.new_probe(now, addr, true, None)
    }

    /// Advances the clock. `last_rx`: when data last came from the direct address;
    /// `round_ttl`: the TTL of an upgrade round's probes ([`round_ttl`]). Pushes the probes to
    /// send into `probes`; returns true if the coordinator should ask the peer to probe back
    /// (an upgrade round started).
    pub fn tick(
        &mut self,
        now: Instant,
        last_rx: Option<Instant>,
        round_ttl: Option<u8>,
        probes: &mut Vec<Probe>,
    ) -> bool {
        self.pending
            .retain(|p| now.saturating_duration_since(p.sent) < PING_TIMEOUT);
        if let Some(mut d) = self.direct {
            if let Some(rx) = last_rx {
                if rx > d.last_heard {
                    d.last_heard = rx;
                }
            }
            if now.saturating_duration_since(d.last_heard) > DIRECT_TIMEOUT {
                self.lose_direct(now, d);
            } else {
                // Unanswered since the last heartbeat: ping again sooner.
                let silent = now.saturating_duration_since(d.last_heard) >= HEARTBEAT + RETRY_GAP;
                let gap = if silent { RETRY_GAP } else { HEARTBEAT };
                if now.saturating_duration_since(d.last_ping) >= gap {
                    d.last_ping = now;
                    probes.push(self.new_probe(now, Some(d.addr), false, None));
                }
                self.direct = Some(d);
                self.probe_alternates(now, d.addr, round_ttl, probes);
                return false;
            }
        }
        if now < self.next_round {
            return false;
        }
        self.next_round = now + self.upgrade_wait;
        let targets = self.targets();
        for addr in &targets {
            probes.push(self.new_probe(now, Some(*addr), false, round_ttl));
        }
        // A punch asks the peer for full-TTL probes, which must find our NATs open: no punch
        // after a round that opened nothing.
        !targets.is_empty()
    }

    fn lose_direct(&mut self, now: Instant, d: Direct) {
        self.direct = None;
        self.last_direct = Some(d.addr);
        self.rtt = None;
        self.confirming.clear();
        self.better = None;
        self.upgrade_wait = if now.saturating_duration_since(d.since) < FLAP_WINDOW {
            (self.upgrade_wait * 2).min(MAX_UPGRADE_WAIT)
        } else {
            UPGRADE_EVERY
        };
        self.next_round = now + self.upgrade_wait;
    }

    /// A pong with `tx` arrived from `from` (`None`: through the relay). `None` if it answers
    /// no outstanding ping to that address: dropped.
    pub fn on_pong(
        &mut self,
        now: Instant,
        tx: TxId,
        from: Option<SocketAddr>,
    ) -> Option<PongSeen> {
        let i = self
            .pending
            .iter()
            .position(|p| p.tx == tx && p.addr == from)?;
        let p = self.pending.swap_remove(i);
        let rtt = now.saturating_duration_since(p.sent);
        let mut seen = PongSeen {
            rtt,
            user: p.user,
            upgraded: false,
            confirm: None,
            moved: false,
        };
        let Some(addr) = from else {
            if self.direct.is_none() {
                self.rtt = Some(rtt);
            }
            return Some(seen);
        };
        match &mut self.direct {
            Some(d) if d.addr == addr => {
                d.last_heard = now;
                self.rtt = Some(rtt);
            }
            Some(_) => self.alternate_answered(now, addr, rtt, &mut seen),
            None => {
                let count = match self.confirming.iter_mut().find(|(a, _)| *a == addr) {
                    Some((_, n)) => {
                        *n += 1;
                        *n
                    }
                    None => {
                        if self.confirming.len() >= MAX_SIGHTED {
                            self.confirming.remove(0);
                        }
                        self.confirming.push((addr, 1));
                        1
                    }
                };
                if count >= CONFIRM_PONGS {
                    self.direct = Some(Direct {
                        addr,
                        last_heard: now,
                        last_ping: now,
                        since: now,
                    });
                    self.last_direct = Some(addr);
                    self.confirming.clear();
                    self.rtt = Some(rtt);
                    self.next_alternates = now + FIRST_ALTERNATES;
                    seen.upgraded = true;
                } else {
                    seen.confirm = Some(addr);
                }
            }
        }
        Some(seen)
    }

    // --- Path preference (the IPv6 underlay): several answering candidates ---------------

    /// While direct: [`FIRST_ALTERNATES`] after the upgrade and then every
    /// [`ALTERNATES_EVERY`], probes the candidates other than `current`,
    /// with the round TTL as a round does (so no unsolicited full-TTL datagram reaches a peer's
    /// router that has no mapping for it; alternatives on this node's own links and networks
    /// answer, and the answers to the peer's punches of the round that found the path count).
    fn probe_alternates(
        &mut self,
        now: Instant,
        current: SocketAddr,
        round_ttl: Option<u8>,
        probes: &mut Vec<Probe>,
    ) {
        if now < self.next_alternates {
            return;
        }
        self.next_alternates = now + ALTERNATES_EVERY;
        let mut targets: Vec<SocketAddr> = Vec::new();
        for a in self.candidates.iter().chain(&self.learned) {
            if *a != current && !targets.contains(a) {
                targets.push(*a);
            }
        }
        for addr in targets {
            probes.push(self.new_probe(now, Some(addr), false, round_ttl));
        }
    }

    /// While direct, another address answered in `rtt`: when it is clearly better than the
    /// path ([`clearly_better`]) twice in a row (the second answer is asked for at once), the
    /// path moves there. Hysteresis: moving back needs the old path to be clearly better in
    /// turn, which the margin makes exclusive, so two paths of about equal RTT do not flap.
    fn alternate_answered(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        rtt: Duration,
        seen: &mut PongSeen,
    ) {
        let (Some(d), Some(current_rtt)) = (self.direct, self.rtt) else {
            return;
        };
        if !clearly_better((addr, rtt), (d.addr, current_rtt)) {
            if self.better.is_some_and(|(a, _)| a == addr) {
                self.better = None;
            }
            return;
        }
        let count = match self.better {
            Some((a, n)) if a == addr => n + 1,
            _ => 1,
        };
        if count < CONFIRM_PONGS {
            self.better = Some((addr, count));
            seen.confirm = Some(addr);
            return;
        }
        self.better = None;
        self.direct = Some(Direct {
            addr,
            last_heard: now,
            last_ping: now,
            since: now,
        });
        self.last_direct = Some(addr);
        self.rtt = Some(rtt);
        seen.moved = true;
    }

    /// The confirming probe for [`PongSeen::confirm`].
    pub fn confirm_probe(&mut self, now: Instant, addr: SocketAddr) -> Probe {
        self.new_probe(now, Some(addr), false, None)
    }

    /// The peer reached us from `from` (an authenticated ping, or WireGuard data not from the
    /// direct address): returns a probe to send there if it could be a (better) path.
    ///
    /// Probed at once even when a round just probed `from`: the peer reaching us means it knows
    /// us now, and the round's probe may have arrived before it did (a peer drops probes from
    /// nodes it does not know yet, as every peer of a node that just joined does until the
    /// coordinator's news of it arrives). Waiting for the next round would cost
    /// [`UPGRADE_EVERY`]; this costs one round trip. Whatever the peer (or a replay of its
    /// traffic) sends, `from` is probed for this at most once per [`REPROBE_GAP`].
    pub fn seen_at(&mut self, now: Instant, from: SocketAddr) -> Option<Probe> {
        if self.direct.is_some_and(|d| d.addr == from) {
            return None;
        }
        if !self.candidates.contains(&from) && !self.learned.contains(&from) {
            if self.learned.len() >= MAX_LEARNED {
                self.learned.remove(0);
            }
            self.learned.push(from);
        }
        if self.direct.is_some() {
            return None;
        }
        match self.sighted.iter_mut().find(|(a, _)| *a == from) {
            Some((_, t)) if now.saturating_duration_since(*t) < REPROBE_GAP => return None,
            Some((_, t)) => *t = now,
            None => {
                if self.sighted.len() >= MAX_SIGHTED {
                    self.sighted.remove(0);
                }
                self.sighted.push((from, now));
            }
        }
        Some(self.new_probe(now, Some(from), false, None))
    }
}

/// Whether address `alt`, answering in its RTT, is clearly better than `current`: a lower RTT
/// by more than the margin ([`RTT_MARGIN`], or a tenth of the current RTT if more), or IPv6
/// where the current path is IPv4 at an RTT no worse by the margin (at equal RTT IPv6 is
/// preferred: it crosses no NAT, so no mapping can expire under it).
pub fn clearly_better(alt: (SocketAddr, Duration), current: (SocketAddr, Duration)) -> bool {
    let margin = (current.1 / 10).max(RTT_MARGIN);
    if alt.1 + margin < current.1 {
        return true;
    }
    alt.0.is_ipv6() && !current.0.is_ipv6() && alt.1 <= current.1 + margin
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Answers every probe to `addr` at `now`.
    fn answer(
        p: &mut PathState,
        now: Instant,
        probes: &[Probe],
        addr: SocketAddr,
    ) -> Vec<PongSeen> {
        probes
            .iter()
            .filter(|pr| pr.addr == Some(addr))
            .filter_map(|pr| p.on_pong(now, pr.tx, Some(addr)))
            .collect()
    }

    #[test]
    fn starts_relayed_probes_all_candidates_and_upgrades_after_two_pongs() {
        let t0 = Instant::now();
        let lan = a("192.168.1.5:51820");
        let wan = a("203.0.113.5:40000");
        let mut p = PathState::new(t0, vec![wan, lan]);
        assert_eq!(p.route(), Route::Relay);
        let mut probes = Vec::new();
        assert!(
            p.tick(t0, None, None, &mut probes),
            "first round asks for a punch"
        );
        assert_eq!(probes.len(), 2);
        let t1 = t0 + Duration::from_millis(3);
        let seen = answer(&mut p, t1, &probes, lan);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].confirm, Some(lan));
        assert_eq!(p.route(), Route::Relay, "one pong is not enough");
        let c = p.confirm_probe(t1, lan);
        let seen = p
            .on_pong(t1 + Duration::from_millis(1), c.tx, Some(lan))
            .unwrap();
        assert!(seen.upgraded);
        assert_eq!(p.route(), Route::Direct(lan));
        assert_eq!(p.rtt(), Some(Duration::from_millis(1)));
        // A late pong from the other candidate does not move the path.
        answer(&mut p, t1, &probes, wan);
        assert_eq!(p.route(), Route::Direct(lan));
    }

    #[test]
    fn a_peer_answering_at_two_addresses_at_once_still_upgrades() {
        // IPv4 and IPv6 (or LAN and wan) answer interleaved: each address keeps its own count.
        let t0 = Instant::now();
        let v4 = a("198.51.100.5:51820");
        let v6 = a("[2001:db8::5]:51820");
        let mut p = PathState::new(t0, vec![v4, v6]);
        let mut probes = Vec::new();
        p.tick(t0, None, None, &mut probes);
        let mut confirms = Vec::new();
        for pr in &probes {
            let seen = p.on_pong(t0, pr.tx, pr.addr).unwrap();
            confirms.push(p.confirm_probe(t0, seen.confirm.unwrap()));
        }
        assert_eq!(p.route(), Route::Relay, "one pong each is not enough");
        let first = confirms[0];
        assert!(p.on_pong(t0, first.tx, first.addr).unwrap().upgraded);
        assert_eq!(p.route(), Route::Direct(v4));
    }

    #[test]
    fn replayed_spoofed_or_misaddressed_pongs_are_ignored() {
        let t0 = Instant::now();
        let good = a("203.0.113.5:40000");
        let evil = a("198.51.100.66:666");
        let mut p = PathState::new(t0, vec![good]);
        let mut probes = Vec::new();
        p.tick(t0, None, None, &mut probes);
        let tx = probes[0].tx;
        assert!(
            p.on_pong(t0, tx, Some(evil)).is_none(),
            "from another address"
        );
        assert!(p.on_pong(t0, [9; 12], Some(good)).is_none(), "unknown tx");
        assert!(p.on_pong(t0, tx, None).is_none(), "through the relay");
        assert!(p.on_pong(t0, tx, Some(good)).is_some());
        assert!(p.on_pong(t0, tx, Some(good)).is_none(), "replayed");
        // Pongs to expired pings count for nothing.
        let mut probes = Vec::new();
        p.tick(t0 + UPGRADE_EVERY, None, None, &mut probes);
        let late = t0 + UPGRADE_EVERY + PING_TIMEOUT + Duration::from_millis(1);
        p.tick(late, None, None, &mut Vec::new());
        assert!(p.on_pong(late, probes[0].tx, Some(good)).is_none());
        assert_eq!(p.route(), Route::Relay);
    }

    fn direct_at(t0: Instant, addr: SocketAddr) -> PathState {
        let mut p = PathState::new(t0, vec![addr]);
        let mut probes = Vec::new();
        p.tick(t0, None, None, &mut probes);
        p.on_pong(t0, probes[0].tx, Some(addr)).unwrap();
        let c = p.confirm_probe(t0, addr);
        assert!(p.on_pong(t0, c.tx, Some(addr)).unwrap().upgraded);
        p
    }

    #[test]
    fn an_unanswered_heartbeat_is_retried_soon_and_one_answer_keeps_the_path() {
        let t0 = Instant::now();
        let addr = a("203.0.113.5:40000");
        let mut p = direct_at(t0, addr);
        let step = Duration::from_millis(250);
        let mut now = t0;
        let mut sent = Vec::new();
        // Every ping is lost until 4 s: the heartbeat at 2 s, then retries every RETRY_GAP.
        while now < t0 + Duration::from_secs(4) {
            now += step;
            let mut probes = Vec::new();
            p.tick(now, None, None, &mut probes);
            sent.extend(probes.iter().map(|_| now - t0));
        }
        assert_eq!(
            sent,
            [2000, 2500, 3000, 3500, 4000]
                .map(Duration::from_millis)
                .to_vec(),
            "a heartbeat, then retries"
        );
        // The retry at 4 s is answered: still direct, and back to the heartbeat's pace.
        let mut probes = Vec::new();
        now += step;
        p.tick(now, None, None, &mut probes);
        assert!(probes.is_empty());
        let retry = p.user_probe(now); // stands for the retry's tx, answered at 4.25 s
        p.on_pong(now, retry.tx, Some(addr)).unwrap();
        assert_eq!(p.route(), Route::Direct(addr));
        let mut probes = Vec::new();
        p.tick(now + step, None, None, &mut probes);
        assert!(probes.is_empty(), "answered: no retry");
    }

    #[test]
    fn a_silent_direct_path_falls_back_to_the_relay_and_heartbeats_keep_a_live_one() {
        let t0 = Instant::now();
        let addr = a("203.0.113.5:40000");
        let mut p = direct_at(t0, addr);
        // Heartbeats go out every HEARTBEAT; answered ones keep the path.
        let mut now = t0;
        for _ in 0..10 {
            now += HEARTBEAT;
            let mut probes = Vec::new();
            assert!(!p.tick(now, None, None, &mut probes));
            assert_eq!(probes.len(), 1, "one heartbeat");
            answer(&mut p, now, &probes, addr);
            assert_eq!(p.route(), Route::Direct(addr));
        }
        // Data from the path also counts as hearing from it.
        let quiet = now + DIRECT_TIMEOUT;
        p.tick(
            quiet,
            Some(quiet - Duration::from_secs(1)),
            None,
            &mut Vec::new(),
        );
        assert_eq!(p.route(), Route::Direct(addr));
        // Silence beyond the timeout: relay, and the address is kept as a fallback.
        let dead = quiet + DIRECT_TIMEOUT;
        p.tick(dead, None, None, &mut Vec::new());
        assert_eq!(p.route(), Route::Relay);
        assert_eq!(p.fallback(), Some(addr));
    }

    #[test]
    fn a_path_that_flaps_is_retried_less_and_less_often() {
        let t0 = Instant::now();
        let addr = a("203.0.113.5:40000");
        let mut p = direct_at(t0, addr);
        let lost = t0 + DIRECT_TIMEOUT + Duration::from_millis(1);
        p.tick(lost, None, None, &mut Vec::new());
        assert_eq!(p.route(), Route::Relay);
        // Lost soon after being chosen: the next round waits twice as long.
        let mut probes = Vec::new();
        assert!(!p.tick(lost + UPGRADE_EVERY, None, None, &mut probes));
        assert!(probes.is_empty());
        assert!(p.tick(lost + UPGRADE_EVERY * 2, None, None, &mut probes));
        assert_eq!(probes.len(), 1);
    }

    #[test]
    fn being_reached_from_a_new_address_probes_it_once() {
        let t0 = Instant::now();
        let mut p = PathState::new(t0, vec![]);
        let roamed = a("198.51.100.9:1234");
        let probe = p.seen_at(t0, roamed).expect("probe the new address");
        assert_eq!(probe.addr, Some(roamed));
        assert!(p.seen_at(t0, roamed).is_none(), "not again at once");
        // Later rounds include the learned address.
        let mut probes = Vec::new();
        p.tick(t0 + UPGRADE_EVERY, None, None, &mut probes);
        assert!(probes.iter().any(|pr| pr.addr == Some(roamed)));
        // The peer is reachable there: it becomes the path.
        for pr in probes {
            if let Some(seen) = p.on_pong(t0, pr.tx, pr.addr) {
                if let Some(c) = seen.confirm {
                    let c = p.confirm_probe(t0, c);
                    p.on_pong(t0, c.tx, c.addr);
                }
            }
        }
        assert_eq!(p.route(), Route::Direct(roamed));
    }

    #[test]
    fn a_ping_from_the_peer_right_after_a_round_is_answered_with_a_probe_at_once() {
        // Our round reached the peer before it knew us (it dropped the probe); its own probe
        // then reaches us: probe back now, not at the next round, and upgrade in one round trip.
        let t0 = Instant::now();
        let addr = a("203.0.113.5:40000");
        let mut p = PathState::new(t0, vec![addr]);
        let mut round = Vec::new();
        p.tick(t0, None, None, &mut round);
        assert_eq!(round.len(), 1, "the round's probe, lost");
        let t1 = t0 + Duration::from_millis(300);
        let probe = p.seen_at(t1, addr).expect("probed again at once");
        assert_eq!(probe.addr, Some(addr));
        let seen = p.on_pong(t1 + Duration::from_millis(1), probe.tx, Some(addr));
        let c = p.confirm_probe(t1, seen.unwrap().confirm.unwrap());
        assert!(p.on_pong(t1, c.tx, Some(addr)).unwrap().upgraded);
        assert_eq!(p.route(), Route::Direct(addr));
        // However often the peer's traffic (or a replay of it) arrives, at most one such probe
        // per address per REPROBE_GAP.
        let mut p = PathState::new(t0, vec![addr]);
        p.tick(t0, None, None, &mut Vec::new());
        let sent = (0..100)
            .filter_map(|i| p.seen_at(t0 + Duration::from_millis(10 * i), addr))
            .count();
        assert_eq!(sent, 1, "one probe in the first second");
        assert!(
            p.seen_at(t0 + REPROBE_GAP, addr).is_some(),
            "and one in the next"
        );
    }

    #[test]
    fn a_punch_is_answered_with_full_probes_but_not_with_a_punch() {
        let t0 = Instant::now();
        let addr = a("203.0.113.5:40000");
        let mut p = PathState::new(t0, vec![addr]);
        assert!(
            p.tick(t0, None, Some(2), &mut Vec::new()),
            "a scheduled round asks for a punch"
        );
        // The peer's punch, even right after our round: full-TTL probes at once, no punch back,
        // the schedule unchanged.
        let t1 = t0 + Duration::from_millis(300);
        let mut probes = Vec::new();
        p.punch_requested(t1, &mut probes);
        assert_eq!(probes.len(), 1);
        assert_eq!(probes[0].ttl, None, "the full TTL");
        let mut probes = Vec::new();
        assert!(!p.tick(t1, None, Some(2), &mut probes), "no punch back");
        assert!(probes.is_empty());
        // At most once per REPROBE_GAP, however often punches come.
        let mut probes = Vec::new();
        for i in 0..10 {
            p.punch_requested(t1 + Duration::from_millis(50 * i), &mut probes);
        }
        assert!(probes.is_empty());
        p.punch_requested(t1 + REPROBE_GAP, &mut probes);
        assert_eq!(probes.len(), 1);
        // The next scheduled round asks again.
        let mut probes = Vec::new();
        assert!(p.tick(t0 + UPGRADE_EVERY, None, Some(2), &mut probes));
        // Direct: punches are not answered.
        let mut d = direct_at(t0, addr);
        let mut probes = Vec::new();
        d.punch_requested(t0 + REPROBE_GAP * 3, &mut probes);
        assert!(probes.is_empty());
    }

    #[test]
    fn rounds_carry_the_round_ttl_and_answers_the_full_one() {
        let t0 = Instant::now();
        let addr = a("203.0.113.5:40000");
        let mut p = PathState::new(t0, vec![addr]);
        let mut probes = Vec::new();
        p.tick(t0, None, Some(2), &mut probes);
        assert_eq!(probes[0].ttl, Some(2));
        // A short-TTL probe that is answered (a host on our own link) counts like any.
        let seen = p.on_pong(t0, probes[0].tx, Some(addr)).unwrap();
        let c = p.confirm_probe(t0, seen.confirm.unwrap());
        assert_eq!(c.ttl, None, "confirmations go all the way");
        // What the peer's own traffic makes us send goes all the way too.
        let mut p = PathState::new(t0, vec![addr]);
        assert_eq!(p.seen_at(t0, addr).unwrap().ttl, None);
        // Without a coordinator to punch through, rounds use the full TTL.
        let mut probes = Vec::new();
        p.tick(t0 + UPGRADE_EVERY, None, None, &mut probes);
        assert_eq!(probes[0].ttl, None);
    }

    #[test]
    fn no_probe_goes_to_nowhere_the_coordinator_or_ourselves() {
        let own = [a("192.168.1.5:51820"), a("203.0.113.9:40000")];
        let coord = Some(a("198.51.100.7:7600"));
        for bad in [
            "0.0.0.0:51820",
            "203.0.113.5:0",
            "127.0.0.1:51820",
            "169.254.3.4:51820",
            "224.0.0.1:51820",
            "255.255.255.255:51820",
            "[::]:51820",
            "[::1]:51820",
            "[fe80::1]:51820",
            "[ff02::1]:51820",
            "198.51.100.7:7600",
            "[::ffff:198.51.100.7]:7600",
            "192.168.1.5:51820",
            "203.0.113.9:40000",
        ] {
            assert!(!probe_worthy(a(bad), &own, coord), "{bad} was probed");
        }
        for good in [
            "192.168.1.6:51820",
            "203.0.113.9:40001",
            "198.51.100.7:51820",
            "[2001:db8::5]:51820",
            "[fd00::5]:51820",
        ] {
            assert!(probe_worthy(a(good), &own, coord), "{good} was not probed");
        }
    }

    #[test]
    fn the_round_ttl_opens_the_nats_and_stops_short_of_the_peer() {
        let lan = a("192.168.1.5:51820");
        let public = a("203.0.113.9:51820");
        assert_eq!(round_ttl(None, &[lan], Some(3)), None, "no coordinator");
        assert_eq!(
            round_ttl(Some(public), &[public], Some(1)),
            Some(1),
            "an open host"
        );
        assert_eq!(
            round_ttl(Some(public), &[lan], None),
            Some(2),
            "not measured"
        );
        assert_eq!(
            round_ttl(Some(public), &[lan], Some(2)),
            Some(2),
            "NAT, then the coordinator"
        );
        assert_eq!(
            round_ttl(Some(public), &[lan], Some(3)),
            Some(2),
            "NAT, ISP, coordinator"
        );
        assert_eq!(
            round_ttl(Some(public), &[lan], Some(4)),
            Some(3),
            "double NAT"
        );
        assert_eq!(
            round_ttl(Some(public), &[lan], Some(15)),
            Some(3),
            "across the internet"
        );
    }

    #[test]
    fn equal_rtt_prefers_ipv6_and_lower_rtt_wins_by_a_margin() {
        let ms = Duration::from_millis;
        let v4 = a("203.0.113.5:40000");
        let v4b = a("198.51.100.5:40000");
        let v6 = a("[2001:db8::5]:51820");
        assert!(clearly_better((v6, ms(10)), (v4, ms(10))), "equal: IPv6");
        assert!(
            clearly_better((v6, ms(11)), (v4, ms(10))),
            "within 10 %: IPv6"
        );
        assert!(!clearly_better((v6, ms(12)), (v4, ms(10))), "worse by more");
        assert!(
            !clearly_better((v4, ms(10)), (v6, ms(10))),
            "equal: stay on IPv6"
        );
        assert!(
            !clearly_better((v4, ms(9)), (v6, ms(10))),
            "within the margin"
        );
        assert!(clearly_better((v4, ms(8)), (v6, ms(10))), "clearly lower");
        assert!(
            !clearly_better((v4b, ms(10)), (v4, ms(10))),
            "same family, equal"
        );
        // Below 10 ms the margin is 1 ms.
        assert!(!clearly_better(
            (v4b, Duration::from_micros(600)),
            (v4, ms(1))
        ));
        assert!(clearly_better((v4b, ms(1)), (v4, ms(3))));
    }

    #[test]
    fn a_direct_path_moves_to_a_clearly_better_candidate_and_not_back() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let v4 = a("203.0.113.5:40000");
        let v6 = a("[2001:db8::5]:51820");
        let mut p = PathState::new(t0, vec![v4, v6]);
        let mut round = Vec::new();
        p.tick(t0, None, None, &mut round);
        // IPv4 answers first and is confirmed.
        let t1 = t0 + ms(2);
        let seen = answer(&mut p, t1, &round, v4);
        let c = p.confirm_probe(t1, seen[0].confirm.unwrap());
        assert!(p.on_pong(t1 + ms(2), c.tx, Some(v4)).unwrap().upgraded);
        assert_eq!(p.route(), Route::Direct(v4));
        // The round's IPv6 answer arrives, at the same RTT: one more probe to be sure.
        let seen = answer(&mut p, t0 + ms(2), &round, v6);
        assert_eq!(seen[0].confirm, Some(v6));
        assert!(!seen[0].moved);
        assert_eq!(p.route(), Route::Direct(v4), "one answer does not move it");
        let c = p.confirm_probe(t1, v6);
        let seen = p.on_pong(t1 + ms(2), c.tx, Some(v6)).unwrap();
        assert!(seen.moved);
        assert_eq!(p.route(), Route::Direct(v6));
        // The other candidate is probed again 2 s after the upgrade and every 30 s after
        // that; at equal RTT the path stays.
        let mut now = t1;
        let mut alternates = 0;
        while now < t1 + FIRST_ALTERNATES + ALTERNATES_EVERY + HEARTBEAT {
            now += ms(250);
            let mut probes = Vec::new();
            p.tick(now, None, None, &mut probes);
            for pr in &probes {
                if pr.addr == Some(v4) {
                    alternates += 1;
                }
                let seen = p.on_pong(now + ms(2), pr.tx, pr.addr).unwrap();
                assert!(seen.confirm.is_none() && !seen.moved);
            }
        }
        assert_eq!(alternates, 2, "IPv4 probed at 2 s and 30 s later");
        assert_eq!(p.route(), Route::Direct(v6));
        // IPv4 clearly faster (at once, against 2 ms): moves after two answers in a row.
        let end = now + ALTERNATES_EVERY + HEARTBEAT;
        let mut moved = false;
        while now < end && !moved {
            now += ms(250);
            let mut probes = Vec::new();
            p.tick(now, None, None, &mut probes);
            for pr in &probes {
                let rtt = if pr.addr == Some(v4) { ms(0) } else { ms(2) };
                let seen = p.on_pong(now + rtt, pr.tx, pr.addr).unwrap();
                if let Some(c) = seen.confirm {
                    let c = p.confirm_probe(now, c);
                    moved = p.on_pong(now, c.tx, Some(v4)).unwrap().moved;
                }
            }
        }
        assert!(moved);
        assert_eq!(p.route(), Route::Direct(v4));
    }

    #[test]
    fn ipv6_silent_in_the_round_that_chose_ipv4_is_tried_again_within_seconds() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let v4 = a("203.0.113.5:40000");
        let v6 = a("[2001:db8::5]:51820");
        let mut p = PathState::new(t0, vec![v4, v6]);
        let mut round = Vec::new();
        p.tick(t0, None, None, &mut round);
        // Only IPv4 answers the round (the IPv6 probe was lost, or the peer did not know us
        // yet there): IPv4 is chosen.
        let seen = answer(&mut p, t0 + ms(2), &round, v4);
        let c = p.confirm_probe(t0 + ms(2), seen[0].confirm.unwrap());
        assert!(p.on_pong(t0 + ms(4), c.tx, Some(v4)).unwrap().upgraded);
        // IPv6 answers from now on: the path is there within the first look, not 30 s.
        let mut now = t0 + ms(4);
        while p.route() != Route::Direct(v6) {
            assert!(
                now < t0 + FIRST_ALTERNATES + HEARTBEAT,
                "still {:?} at {:?}",
                p.route(),
                now - t0
            );
            now += ms(250);
            let mut probes = Vec::new();
            p.tick(now, None, None, &mut probes);
            for pr in &probes {
                let Some(seen) = p.on_pong(now + ms(2), pr.tx, pr.addr) else {
                    continue;
                };
                if let Some(addr) = seen.confirm {
                    let c = p.confirm_probe(now, addr);
                    p.on_pong(now + ms(2), c.tx, Some(addr));
                }
            }
        }
    }

    #[test]
    fn user_probes_follow_the_current_path() {
        let t0 = Instant::now();
        let mut p = PathState::new(t0, vec![]);
        let pr = p.user_probe(t0);
        assert_eq!(pr.addr, None, "relayed");
        let seen = p
            .on_pong(t0 + Duration::from_millis(7), pr.tx, None)
            .unwrap();
        assert!(seen.user);
        assert_eq!(seen.rtt, Duration::from_millis(7));
        let addr = a("203.0.113.5:40000");
        let mut p = direct_at(t0, addr);
        assert_eq!(p.user_probe(t0).addr, Some(addr));
    }
}
