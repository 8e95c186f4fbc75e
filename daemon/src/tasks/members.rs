//! One port of this node's overlay address served to members, for what a2ad itself serves them
//! (the service lists, tasks/services.rs; the policy's exchange, tasks/policy.rs): TCP and UDP
//! bound on the overlay address (IPv4, and IPv6 when asked), bound again when the address
//! changes, only members answered, the connections answered at once bounded. It runs on any
//! [`OverlayNet`]: the kernel's sockets (TUN mode) or the userspace stack's (`a2ad
//! --userspace`), so both modes serve the same.

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::core::counters::Counters;
use crate::core::peers::PeerTable;
use crate::io::{OverlayDatagrams, OverlayListener, OverlayNet};

/// This node's IPv6 overlay address now.
pub type OwnIp6 = Arc<dyn Fn() -> Ipv6Addr + Send + Sync>;

/// How often the IPv6 side checks that it is bound on this node's IPv6 overlay address (the
/// address moves with a token rotation, and may come late or not at all).
pub const IP6_RECHECK: Duration = Duration::from_secs(5);
/// Largest datagram taken (more is cut off, and then malformed for the handler).
const MAX_DATAGRAM: usize = 64;

/// What a port does with what members send it.
pub trait Handler<S>: Send + Sync + 'static {
    /// A member's connection (within the port's bound): answer it.
    fn stream(&self, stream: S, from: SocketAddr) -> impl Future<Output = ()> + Send;

    /// A member's datagram.
    fn datagram(&self, data: &[u8], from: SocketAddr);
}

/// A port of the overlay address, served to members.
pub struct Port<N: OverlayNet> {
    pub net: N,
    pub port: u16,
    /// What the port is for, in messages: "cannot {what} on ADDR".
    pub what: &'static str,
    pub peers: Arc<PeerTable>,
    pub counters: Arc<Counters>,
    /// Counted for a connection or datagram from a non-member.
    pub not_member: fn(&Counters) -> &AtomicU64,
    /// Connections answered at once; more are closed at once.
    pub max_connections: usize,
    pub ip: watch::Receiver<Ipv4Addr>,
    /// Served on the IPv6 overlay address too, when given (and when it can be bound).
    pub ip6: Option<OwnIp6>,
}

type Bound<N> = (<N as OverlayNet>::Listener, <N as OverlayNet>::Datagrams);

impl<N: OverlayNet> Port<N> {
    async fn bind(&self, addr: SocketAddr) -> std::io::Result<Bound<N>> {
        Ok((self.net.listen(addr).await?, self.net.bind_udp(addr).await?))
    }

    /// Serves until the address watch ends (or the task is aborted). IPv4 is required
    /// (retried every 5 s when it cannot be bound); IPv6 is served when the address can be
    /// bound, and checked again every [`IP6_RECHECK`].
    pub async fn serve<H: Handler<N::Stream>>(mut self, handler: Arc<H>) {
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let mut warned6 = false;
        loop {
            let own = *self.ip.borrow_and_update();
            let addr = SocketAddr::new(own.into(), self.port);
            let (tcp, udp) = match self.bind(addr).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(
                        "cannot {} on {addr}: {e} (is another program on that port?); \
                         retrying in 5 s",
                        self.what
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        r = self.ip.changed() => if r.is_err() { return },
                    }
                    continue;
                }
            };
            let mut v6: Option<(Ipv6Addr, Bound<N>)> = None;
            let mut conns = JoinSet::new();
            let (mut buf, mut buf6) = ([0u8; MAX_DATAGRAM], [0u8; MAX_DATAGRAM]);
            let mut recheck = tokio::time::interval(IP6_RECHECK);
            loop {
                tokio::select! {
                    r = self.ip.changed() => {
                        if r.is_err() {
                            return;
                        }
                        break;
                    }
                    _ = recheck.tick(), if self.ip6.is_some() => {
                        let want = self.ip6.as_ref().map_or(Ipv6Addr::UNSPECIFIED, |f| f());
                        if v6.as_ref().map(|(a, _)| *a) != Some(want) {
                            v6 = None; // an old address's sockets go first
                            let addr = SocketAddr::new(want.into(), self.port);
                            match self.bind(addr).await {
                                Ok(b) => {
                                    tracing::debug!("{} on {addr} too", self.what);
                                    v6 = Some((want, b));
                                }
                                Err(e) if !warned6 => {
                                    warned6 = true;
                                    tracing::warn!(
                                        "cannot {} on its IPv6 overlay address {addr}: {e}; \
                                         members reach it over IPv4 only (trying again every \
                                         {} s)",
                                        self.what,
                                        IP6_RECHECK.as_secs()
                                    );
                                }
                                Err(_) => {}
                            }
                        }
                    }
                    accepted = tcp.accept() => {
                        self.accepted(accepted, &slots, &handler, &mut conns).await
                    }
                    accepted = accept_on::<N>(&v6) => {
                        self.accepted(accepted, &slots, &handler, &mut conns).await
                    }
                    received = udp.recv_from(&mut buf) => {
                        self.datagram(received, &buf, &*handler).await
                    }
                    received = recv_on::<N>(&v6, &mut buf6) => {
                        self.datagram(received, &buf6, &*handler).await
                    }
                    Some(_) = conns.join_next() => {}
                }
            }
        }
    }

    /// A connection accepted: answered when it comes from a member (within the slots).
    async fn accepted<H: Handler<N::Stream>>(
        &self,
        accepted: std::io::Result<(N::Stream, SocketAddr)>,
        slots: &Arc<Semaphore>,
        handler: &Arc<H>,
        conns: &mut JoinSet<()>,
    ) {
        let Ok((stream, from)) = accepted else {
            // Out of descriptors, say: wait a little rather than spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        };
        if self.peers.by_addr(from.ip()).is_none() {
            Counters::bump((self.not_member)(&self.counters));
            return;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            return;
        };
        let handler = handler.clone();
        conns.spawn(async move {
            let _permit = permit;
            handler.stream(stream, from).await;
        });
    }

    /// A datagram received: a member's goes to the handler.
    async fn datagram<H: Handler<N::Stream>>(
        &self,
        received: std::io::Result<(usize, SocketAddr)>,
        buf: &[u8],
        handler: &H,
    ) {
        let Ok((n, from)) = received else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        };
        if self.peers.by_addr(from.ip()).is_none() {
            Counters::bump((self.not_member)(&self.counters));
            return;
        }
        handler.datagram(&buf[..n.min(buf.len())], from);
    }
}

/// The next connection on the IPv6 listener; never, without one.
async fn accept_on<N: OverlayNet>(
    v6: &Option<(Ipv6Addr, Bound<N>)>,
) -> std::io::Result<(N::Stream, SocketAddr)> {
    match v6 {
        Some((_, (tcp, _))) => tcp.accept().await,
        None => std::future::pending().await,
    }
}

/// The next datagram on the IPv6 socket; never, without one.
async fn recv_on<N: OverlayNet>(
    v6: &Option<(Ipv6Addr, Bound<N>)>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match v6 {
        Some((_, (_, udp))) => udp.recv_from(buf).await,
        None => std::future::pending().await,
    }
}
