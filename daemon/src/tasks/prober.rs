//! Endpoint probes to the coordinator from the WireGuard socket: "which address do you see me
//! at?" (and, with a relay bind, "relay my packets to that address"). The receive loop hands
//! replies to [`Prober::answered`]; whoever asked awaits them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use a2a_proto::udp::{A2aDatagram, MAX_A2A_DATAGRAM};
use tokio::sync::oneshot;

use crate::io::UdpTransport;
use crate::tasks::now;

/// Outstanding probes at most (a flood of replies cannot grow the table).
const MAX_WAITING: usize = 64;
/// How long [`Prober::hops`] waits for further answers after the first, at least.
const GRACE: Duration = Duration::from_millis(20);

/// A probe's answer: the address the coordinator saw and the round-trip time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub observed: SocketAddr,
    pub rtt: Duration,
}

type Waiter = (SocketAddr, Instant, oneshot::Sender<Answer>);

#[derive(Default)]
pub struct Prober {
    waiting: Mutex<HashMap<[u8; 8], Waiter>>,
}

impl Prober {
    /// A reply arrived from `from`: completes the probe with that nonce sent to `from`.
    pub fn answered(&self, nonce: [u8; 8], from: SocketAddr, observed: SocketAddr) {
        let mut w = a2a_proto::sync::lock(&self.waiting);
        if w.get(&nonce).is_some_and(|(to, ..)| *to == from) {
            if let Some((_, sent, tx)) = w.remove(&nonce) {
                let _ = tx.send(Answer {
                    observed,
                    rtt: now().saturating_duration_since(sent),
                });
            }
        }
    }

    /// Sends a probe (`bind`: a relay bind with id and secret) to `to`, up to `tries` times,
    /// waiting `timeout` for each answer.
    pub async fn probe(
        &self,
        udp: &impl UdpTransport,
        to: SocketAddr,
        bind: Option<(u32, a2a_proto::keys::RelaySecret)>,
        tries: u32,
        timeout: Duration,
    ) -> Option<Answer> {
        for _ in 0..tries {
            let nonce: [u8; 8] = rand::random();
            let msg = match bind {
                Some((relay_id, secret)) => A2aDatagram::RelayBind {
                    nonce,
                    relay_id,
                    secret,
                },
                None => A2aDatagram::EndpointProbe { nonce },
            };
            let mut buf = [0u8; MAX_A2A_DATAGRAM];
            let len = msg.encode(&mut buf);
            let (tx, rx) = oneshot::channel();
            {
                let mut w = a2a_proto::sync::lock(&self.waiting);
                if w.len() >= MAX_WAITING {
                    let t = now();
                    w.retain(|_, (_, sent, _)| {
                        t.saturating_duration_since(*sent) < Duration::from_secs(10)
                    });
                }
                w.insert(nonce, (to, now(), tx));
            }
            let _ = udp.send(&buf[..len], len, to).await;
            let got = tokio::time::timeout(timeout, rx).await;
            a2a_proto::sync::lock(&self.waiting).remove(&nonce);
            if let Ok(Ok(answer)) = got {
                return Some(answer);
            }
        }
        None
    }

    /// How many routers away `to` is, from this socket: endpoint probes with TTL 1 to `max`
    /// go out at once; the smallest TTL that `to` answers within `timeout` (after the first
    /// answer, a little longer for the others). `None`: none answered.
    pub async fn hops(
        &self,
        udp: &impl UdpTransport,
        to: SocketAddr,
        max: u8,
        timeout: Duration,
    ) -> Option<u8> {
        let mut waiting = Vec::new();
        for ttl in 1..=max {
            let nonce: [u8; 8] = rand::random();
            let mut buf = [0u8; MAX_A2A_DATAGRAM];
            let len = A2aDatagram::EndpointProbe { nonce }.encode(&mut buf);
            let (tx, rx) = oneshot::channel();
            a2a_proto::sync::lock(&self.waiting).insert(nonce, (to, now(), tx));
            let _ = udp.send_ttl(&buf[..len], to, ttl).await;
            waiting.push((ttl, nonce, rx));
        }
        let start = tokio::time::Instant::now();
        let mut first: Option<tokio::time::Instant> = None;
        let mut answered: Option<u8> = None;
        loop {
            for (ttl, _, rx) in waiting.iter_mut() {
                if let Ok(a) = rx.try_recv() {
                    answered = Some(answered.map_or(*ttl, |h| h.min(*ttl)));
                    // The rest were sent at the same moment: they are due about now.
                    first.get_or_insert(tokio::time::Instant::now() + a.rtt.max(GRACE));
                }
            }
            let now = tokio::time::Instant::now();
            if first.is_some_and(|t| now >= t) || now >= start + timeout {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut w = a2a_proto::sync::lock(&self.waiting);
        for (_, nonce, _) in &waiting {
            w.remove(nonce);
        }
        answered
    }
}
