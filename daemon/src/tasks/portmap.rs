//! The port-mapping driver: carries out what the I/O-free
//! [`PortMapper`](crate::core::portmap::PortMapper) decides, on its own ephemeral UDP socket
//! connected to the default gateway's port 5351 (so only the gateway's answers arrive). It
//! re-reads the default gateway every [`GATEWAY_EVERY`] and starts over when it changed, hands
//! the control client a mapping to publish only when it sits at the reflexive address the
//! coordinator sees, and deletes the mapping when the session stops.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::core::counters::Counters;
use crate::core::portmap::{PortMapper, Report, Request, MAX_MESSAGE, PORT};
use crate::io::Underlay;
use crate::tasks::now;

/// How often the default gateway is looked up again.
const GATEWAY_EVERY: Duration = Duration::from_secs(30);
/// How long a stopping session waits for the gateway to confirm the delete.
const DELETE_WAIT: Duration = Duration::from_millis(500);

/// What the port mapper shares with the control client and the commands.
pub struct PortMapLink {
    /// The reflexive address the coordinator sees (set by the control client).
    pub reflexive: watch::Sender<Option<SocketAddr>>,
    /// The mapping to publish as a candidate (set by the port mapper).
    pub published: watch::Sender<Option<SocketAddr>>,
    /// The port mapper's state, for `a2actl netcheck`.
    pub report: Mutex<Option<Report>>,
}

impl Default for PortMapLink {
    fn default() -> Self {
        PortMapLink {
            reflexive: watch::channel(None).0,
            published: watch::channel(None).0,
            report: Mutex::new(None),
        }
    }
}

impl PortMapLink {
    pub fn report(&self) -> Option<Report> {
        a2a_proto::sync::lock(&self.report).clone()
    }
}

pub struct PortMapTask<U: Underlay> {
    pub underlay: Arc<U>,
    /// The WireGuard socket's port: the internal port to map.
    pub udp_port: u16,
    pub link: Arc<PortMapLink>,
    pub counters: Arc<Counters>,
}

/// A socket connected to the gateway's port-mapping port, and the address it sends from.
async fn open(gateway: Ipv4Addr) -> std::io::Result<(UdpSocket, Ipv4Addr)> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    socket.connect((gateway, PORT)).await?;
    let local = match socket.local_addr()?.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    Ok((socket, local))
}

async fn send_all(socket: &Option<UdpSocket>, out: Vec<Request>) {
    let Some(s) = socket else { return };
    for r in out {
        if let Err(e) = s.send(&r.bytes).await {
            tracing::debug!(
                "port mapping: cannot send a {} request: {e}",
                r.protocol.name()
            );
        }
    }
}

async fn recv(socket: &Option<UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

impl<U: Underlay> PortMapTask<U> {
    /// Runs until `stop` fires, then deletes the mapping (waiting at most [`DELETE_WAIT`]).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut mapper = PortMapper::new(self.udp_port, rand::random());
        let mut socket: Option<UdpSocket> = None;
        let mut reflexive = self.link.reflexive.subscribe();
        let mut gateway_every = tokio::time::interval(GATEWAY_EVERY);
        // One byte more than any PCP message, so an oversized one is seen as such.
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        loop {
            tokio::select! {
                _ = gateway_every.tick() => {
                    let gateway = self.underlay.gateway_ipv4().await;
                    if gateway != mapper.gateway() {
                        socket = None;
                        let found = match gateway {
                            Some(g) => match open(g).await {
                                Ok((s, local)) => {
                                    socket = Some(s);
                                    Some((g, local))
                                }
                                Err(e) => {
                                    tracing::debug!("port mapping: no socket to {g}: {e}");
                                    None
                                }
                            },
                            None => None,
                        };
                        let out = mapper.set_gateway(now(), found);
                        send_all(&socket, out).await;
                    }
                }
                r = recv(&socket, &mut buf) => {
                    // An error is an ICMP error for an earlier request (no server there): the
                    // retries and the back-off deal with it.
                    if let Ok((n, from)) = r {
                        match mapper.handle_response(now(), from, &buf[..n]) {
                            Ok(out) => send_all(&socket, out).await,
                            Err(why) => {
                                Counters::bump(&self.counters.portmap_bad);
                                tracing::debug!("port mapping: dropped an answer: {why:?}");
                            }
                        }
                    }
                }
                _ = sleep_until(mapper.poll_timeout()) => {
                    let out = mapper.handle_timeout(now());
                    send_all(&socket, out).await;
                }
                changed = reflexive.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = stop.changed() => {
                    self.delete(&mut mapper, &socket, &mut buf).await;
                    return;
                }
            }
            let (publish, mismatch) = mapper.publishable(*reflexive.borrow());
            if mismatch {
                Counters::bump(&self.counters.portmap_mismatch);
                if let (Some(m), Some(r)) = (mapper.mapping(), *reflexive.borrow()) {
                    tracing::warn!(
                        "the router's {} mapping is at {}, but the coordinator sees this node \
                         at {}: not publishing it (a NAT beyond the router, or a router that \
                         reports a wrong address)",
                        m.protocol.name(),
                        m.external,
                        r.ip()
                    );
                }
            }
            self.link.published.send_if_modified(|cur| {
                if *cur != publish {
                    if let Some(p) = publish {
                        tracing::info!("publishing the router's port mapping {p}");
                    }
                    *cur = publish;
                    true
                } else {
                    false
                }
            });
            *a2a_proto::sync::lock(&self.link.report) = Some(mapper.report());
        }
    }

    async fn delete(&self, mapper: &mut PortMapper, socket: &Option<UdpSocket>, buf: &mut [u8]) {
        let had = mapper.mapping();
        let out = mapper.stop();
        self.link.published.send_replace(None);
        *a2a_proto::sync::lock(&self.link.report) = Some(mapper.report());
        if out.is_empty() {
            return;
        }
        // Sent twice (a lost datagram would leave the mapping until it expires); the first
        // answer ends the wait.
        send_all(socket, out.clone()).await;
        let answered = tokio::time::timeout(DELETE_WAIT, async {
            tokio::select! {
                r = recv(socket, buf) => r.is_ok(),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    send_all(socket, out).await;
                    recv(socket, buf).await.is_ok()
                }
            }
        })
        .await
        .unwrap_or(false);
        if let Some(m) = had {
            tracing::info!(
                "deleted the router's port mapping {}{}",
                m.external,
                if answered { "" } else { " (unconfirmed)" }
            );
        }
    }
}
