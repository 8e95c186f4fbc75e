//! The port-mapping driver: carries out what the I/O-free
//! [`PortMapper`](crate::core::portmap::PortMapper) decides, on its own ephemeral UDP socket
//! (PCP and NAT-PMP to the default gateway's port 5351, the SSDP search to its multicast
//! group) and, for UPnP, one HTTP exchange at a time over TCP, each bounded in size
//! ([`upnp::MAX_HTTP`]) and time ([`HTTP_TIMEOUT`]). It re-reads the default gateway every
//! [`GATEWAY_EVERY`] and starts over when it changed, hands the control client a mapping to
//! publish only when it sits at the reflexive address the coordinator sees, and deletes the
//! mapping when the session stops.

use std::collections::VecDeque;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;

use crate::core::counters::Counters;
use crate::core::portmap::{PortMapper, Report, Request, Via, MAX_MESSAGE, PORT};
use crate::core::upnp;
use crate::io::Underlay;
use crate::tasks::now;

/// How often the default gateway is looked up again.
const GATEWAY_EVERY: Duration = Duration::from_secs(30);
/// How long a stopping session waits for the gateway to confirm a PCP or NAT-PMP delete.
const DELETE_WAIT: Duration = Duration::from_millis(500);
/// The longest one UPnP HTTP exchange (connect, request, answer) may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

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

/// The port mapper's socket, and the address this host reaches the gateway from (learnt by
/// connecting a second socket, which sends nothing).
async fn open(gateway: Ipv4Addr) -> std::io::Result<(UdpSocket, Ipv4Addr)> {
    let route = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    route.connect((gateway, PORT)).await?;
    let local = match route.local_addr()?.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    Ok((socket, local))
}

/// Sends the datagrams; queues the HTTP requests.
async fn send_all(socket: &Option<UdpSocket>, http: &mut VecDeque<Request>, out: Vec<Request>) {
    for r in out {
        match r.via {
            Via::Http => http.push_back(r),
            Via::Udp => {
                let Some(s) = socket else { continue };
                if let Err(e) = s.send_to(&r.bytes, r.to).await {
                    tracing::debug!(
                        "port mapping: cannot send a {} request: {e}",
                        r.protocol.name()
                    );
                }
            }
        }
    }
}

async fn recv(socket: &Option<UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

type Exchange = Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send>>;

/// One HTTP exchange: connect, send, read until the server closes, at most
/// [`upnp::MAX_HTTP`] bytes within [`HTTP_TIMEOUT`]; what arrived by then (`None`: nothing).
fn exchange(r: Request) -> Exchange {
    Box::pin(async move {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(HTTP_TIMEOUT, async {
            let mut s = TcpStream::connect(r.to).await?;
            s.write_all(&r.bytes).await?;
            (&mut s)
                .take(upnp::MAX_HTTP as u64)
                .read_to_end(&mut answer)
                .await
        })
        .await;
        (!answer.is_empty()).then_some(answer)
    })
}

async fn finish(http: &mut Option<Exchange>) -> Option<Vec<u8>> {
    match http {
        Some(f) => f.await,
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
    /// Runs until `stop` fires, then deletes the mapping (waiting at most [`DELETE_WAIT`], or
    /// one HTTP exchange for UPnP).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut mapper = PortMapper::new(self.udp_port, rand::random());
        let mut socket: Option<UdpSocket> = None;
        let mut queue: VecDeque<Request> = VecDeque::new();
        let mut http: Option<Exchange> = None;
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
                        queue.clear();
                        http = None;
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
                        send_all(&socket, &mut queue, out).await;
                    }
                }
                r = recv(&socket, &mut buf) => {
                    // An error is an ICMP error for an earlier request (no server there): the
                    // retries and the back-off deal with it.
                    if let Ok((n, from)) = r {
                        match mapper.handle_response(now(), from, &buf[..n]) {
                            Ok(out) => send_all(&socket, &mut queue, out).await,
                            Err(why) => {
                                Counters::bump(&self.counters.portmap_bad);
                                tracing::debug!("port mapping: dropped an answer: {why:?}");
                            }
                        }
                    }
                }
                answer = finish(&mut http) => {
                    http = None;
                    match mapper.handle_http(now(), answer.as_deref()) {
                        Ok(out) => send_all(&socket, &mut queue, out).await,
                        Err(why) => {
                            Counters::bump(&self.counters.portmap_bad);
                            tracing::debug!("port mapping: dropped a UPnP answer: {why:?}");
                        }
                    }
                }
                _ = sleep_until(mapper.poll_timeout()) => {
                    let out = mapper.handle_timeout(now());
                    send_all(&socket, &mut queue, out).await;
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
            if http.is_none() {
                http = queue.pop_front().map(exchange);
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
        let answered = if out.iter().any(|r| r.via == Via::Http) {
            // UPnP: one exchange, with its own time limit.
            let mut answered = false;
            for r in out {
                answered |= exchange(r).await.is_some();
            }
            answered
        } else {
            // Sent twice (a lost datagram would leave the mapping until it expires); the
            // first answer ends the wait.
            let mut none = VecDeque::new();
            send_all(socket, &mut none, out.clone()).await;
            tokio::time::timeout(DELETE_WAIT, async {
                tokio::select! {
                    r = recv(socket, buf) => r.is_ok(),
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        send_all(socket, &mut none, out).await;
                        recv(socket, buf).await.is_ok()
                    }
                }
            })
            .await
            .unwrap_or(false)
        };
        if let Some(m) = had {
            tracing::info!(
                "deleted the router's {} port mapping {}{}",
                m.protocol.name(),
                m.external,
                if answered { "" } else { " (unconfirmed)" }
            );
        }
    }
}
