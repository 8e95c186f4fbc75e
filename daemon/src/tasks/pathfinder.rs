//! The path finder task: drives every peer's [`PathState`](crate::core::path::PathState) — sends the
//! disco probes it asks for, answers the peer's probes, feeds it pongs and sightings, and
//! publishes its route to the packet path. All decisions are in `path.rs`; this is the I/O.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use a2a_proto::disco::{claimed_sender, DiscoMsg, TxId, MAX_DISCO_LEN};
use a2a_proto::udp::RELAY_HEADER_LEN;
use a2a_proto::NodeKey;
use tokio::sync::{mpsc, oneshot};

use crate::core::counters::Counters;
use crate::core::limit::PerSecond;
use crate::core::path::{probe_worthy, Probe, Route};
use crate::core::peers::{Peer, Via};
use crate::io::Platform;
use crate::tasks::dataplane::DataPlane;
use crate::tasks::events::{ControlOut, PathEvent, UserPong};
use crate::tasks::now;

const TICK: Duration = Duration::from_millis(250);
/// Disco datagrams accepted per second for one claimed peer from one source (address, or relay
/// id); the rest are dropped and counted. Keyed by source too, so a flood that claims to be a
/// peer does not starve that peer's genuine probes.
const DISCO_PER_SECOND: u32 = 50;

pub struct PathFinder<P: Platform> {
    dp: Arc<DataPlane<P>>,
    user_pings: HashMap<TxId, (Route, oneshot::Sender<UserPong>)>,
    /// Disco datagrams per (claimed peer, source) in the current second.
    budget: PerSecond<(NodeKey, Via)>,
}

impl<P: Platform> PathFinder<P> {
    pub fn new(dp: Arc<DataPlane<P>>) -> Self {
        PathFinder {
            dp,
            user_pings: HashMap::new(),
            budget: PerSecond::new(DISCO_PER_SECOND),
        }
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<PathEvent>) {
        let mut tick = tokio::time::interval(TICK);
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    ticks += 1;
                    if ticks.is_multiple_of(4) {
                        self.budget.reset();
                        self.user_pings.retain(|_, (_, tx)| !tx.is_closed());
                    }
                    self.tick().await;
                }
                ev = events.recv() => match ev {
                    Some(ev) => self.handle(ev).await,
                    None => return,
                },
            }
        }
    }

    async fn tick(&mut self) {
        let now = now();
        for peer in self.dp.peers.all() {
            self.tick_peer(now, &peer).await;
        }
    }

    async fn tick_peer(&self, now: Instant, peer: &Peer) {
        let epoch = self.dp.peers.epoch();
        // Short-TTL rounds only while a punch can follow them. While registering (connected,
        // the relay not bound yet) a relayed peer's round waits: its punch goes through the
        // relay link, and a full-TTL round would reach the peer's NAT before the peer opened it.
        let relay = self.dp.relay.load().is_some();
        if !relay && self.dp.coordinator.load().is_some() && peer.route().route == Route::Relay {
            return;
        }
        let round_ttl = if relay { self.dp.round_ttl() } else { None };
        {
            let mut probes = Vec::new();
            let (punch, before, after) = peer.with_path(|path| {
                let before = path.route();
                let punch = path.tick(now, peer.last_direct_rx(epoch), round_ttl, &mut probes);
                (punch, before, path.route())
            });
            if before != after {
                Counters::bump(&self.dp.counters.path_fallbacks);
                tracing::info!(
                    "peer {}: direct path stopped answering; using the relay",
                    peer.info().name
                );
            }
            let mut opened = false;
            for p in probes {
                opened |= self.send_ping(peer, p).await && p.addr.is_some();
            }
            // The peer's answer to a punch goes all the way: only once this round's probes
            // opened our NATs towards it.
            if punch {
                tracing::debug!(
                    "round for {}: TTL {round_ttl:?}, opened {opened}",
                    peer.info().name
                );
            }
            if punch && opened {
                if let Some(link) = self.dp.relay.load().as_ref() {
                    let _ = link.control.try_send(ControlOut::Punch(peer.key));
                }
            }
        }
    }

    /// Sends a probe; false if it was not (an address no probe goes to).
    async fn send_ping(&self, peer: &Peer, probe: Probe) -> bool {
        if let Some(addr) = probe.addr {
            let coordinator = self.dp.coordinator.load().as_deref().copied();
            if !probe_worthy(addr, &self.dp.own_addrs.load(), coordinator) {
                Counters::bump(&self.dp.counters.candidates_ignored);
                return false;
            }
        }
        let via = probe.addr.map_or(Via::Relay(peer.relay_id()), Via::Direct);
        self.send_disco(peer, via, &DiscoMsg::Ping { tx: probe.tx }, probe.ttl)
            .await;
        true
    }

    async fn send_disco(&self, peer: &Peer, via: Via, msg: &DiscoMsg, ttl: Option<u8>) {
        let mut sealed = [0u8; MAX_DISCO_LEN];
        let n = peer.disco.seal(&self.dp.peers.own_key(), msg, &mut sealed);
        let mut buf = [0u8; RELAY_HEADER_LEN + MAX_DISCO_LEN];
        buf[RELAY_HEADER_LEN..][..n].copy_from_slice(&sealed[..n]);
        match (via, ttl) {
            (Via::Direct(addr), Some(ttl)) => {
                self.dp
                    .send_udp_ttl(&buf[RELAY_HEADER_LEN..][..n], addr, ttl)
                    .await
            }
            _ => self.dp.reply(via, &mut buf, n).await,
        }
    }

    async fn handle(&mut self, ev: PathEvent) {
        let now = now();
        match ev {
            PathEvent::Disco(d, via) => self.disco(now, &d, via).await,
            PathEvent::SeenAt(key, from) => {
                if let Some(peer) = self.dp.peers.by_key(&key) {
                    let probe = peer.with_path(|p| p.seen_at(now, from));
                    if let Some(p) = probe {
                        self.send_ping(&peer, p).await;
                    }
                }
            }
            PathEvent::Punch(key) => {
                if let Some(peer) = self.dp.peers.by_key(&key) {
                    let mut probes = Vec::new();
                    peer.with_path(|p| p.punch_requested(now, &mut probes));
                    tracing::debug!(
                        "punch from {}: {} full probes",
                        peer.info().name,
                        probes.len()
                    );
                    for p in probes {
                        self.send_ping(&peer, p).await;
                    }
                }
            }
            PathEvent::Candidates(key) => {
                if let Some(peer) = self.dp.peers.by_key(&key) {
                    self.tick_peer(now, &peer).await;
                }
            }
            PathEvent::UserPing(key, reply) => {
                if let Some(peer) = self.dp.peers.by_key(&key) {
                    let (probe, route) =
                        peer.with_path(|path| (path.user_probe(now), path.route()));
                    self.user_pings.insert(probe.tx, (route, reply));
                    self.send_ping(&peer, probe).await;
                }
            }
        }
    }

    async fn disco(&mut self, now: Instant, d: &[u8], via: Via) {
        let counters = &self.dp.counters;
        let Some(peer) = claimed_sender(d).and_then(|k| self.dp.peers.by_key(&k)) else {
            Counters::bump(&counters.disco_unknown_sender);
            return;
        };
        if !self.budget.allow((peer.key, via)) {
            Counters::bump(&counters.disco_rate_limited);
            return;
        }
        let Some(msg) = peer.disco.open(d) else {
            Counters::bump(&counters.disco_bad);
            return;
        };
        match msg {
            DiscoMsg::Ping { tx } => {
                let observed = match via {
                    Via::Direct(a) => a,
                    Via::Relay(_) => match self.dp.relay.load().as_ref() {
                        Some(l) => l.coordinator,
                        None => return,
                    },
                };
                self.send_disco(&peer, via, &DiscoMsg::Pong { tx, observed }, None)
                    .await;
                if let Via::Direct(from) = via {
                    let probe = peer.with_path(|p| p.seen_at(now, from));
                    if let Some(p) = probe {
                        self.send_ping(&peer, p).await;
                    }
                }
            }
            DiscoMsg::Pong { tx, .. } => {
                let from = match via {
                    Via::Direct(a) => Some(a),
                    Via::Relay(_) => None,
                };
                let (seen, confirm) = peer.with_path(|path| {
                    let seen = path.on_pong(now, tx, from);
                    let confirm = seen
                        .and_then(|s| s.confirm)
                        .map(|a| path.confirm_probe(now, a));
                    (seen, confirm)
                });
                let Some(seen) = seen else {
                    Counters::bump(&counters.disco_stale_pong);
                    return;
                };
                if seen.upgraded {
                    Counters::bump(&counters.path_upgrades);
                    tracing::info!(
                        "peer {}: direct path via {} ({:.2} ms)",
                        peer.info().name,
                        from.map(|a| a.to_string()).unwrap_or_default(),
                        seen.rtt.as_secs_f64() * 1000.0
                    );
                }
                if seen.moved {
                    Counters::bump(&counters.path_moves);
                    tracing::info!(
                        "peer {}: direct path moved to {} ({:.2} ms)",
                        peer.info().name,
                        from.map(|a| a.to_string()).unwrap_or_default(),
                        seen.rtt.as_secs_f64() * 1000.0
                    );
                }
                if seen.user {
                    if let Some((route, reply)) = self.user_pings.remove(&tx) {
                        let _ = reply.send(UserPong {
                            rtt: seen.rtt,
                            route,
                        });
                    }
                }
                if let Some(p) = confirm {
                    self.send_ping(&peer, p).await;
                }
            }
        }
    }
}
