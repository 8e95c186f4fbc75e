//! Byte streams between hosts, for the control channel: a listener, a connector per host,
//! and a stream over `tokio::io::duplex` that a host's [`cut_streams`](super::Host::cut_streams)
//! resets.
//!
//! What it does not simulate: TCP itself (no handshake timing, windows, loss or latency: bytes
//! arrive at once and in order), keepalives, half-open connections after a cut (both ends see
//! the reset at once), and NAT state for streams (a connection from behind a NAT gets a fresh
//! public port, never expires, and nothing can connect in).

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;

use super::{v4, FakeNet, Host, Realm, PUBLIC};
use crate::io::Connector;

/// How long a connection attempt whose SYNs are dropped waits before `TimedOut` (Linux's with
/// its default six SYN retries).
pub const SYN_TIMEOUT: Duration = Duration::from_secs(127);

/// Bytes in flight each way before a writer waits.
const PIPE_BYTES: usize = 256 * 1024;

type Accepted = (FakeStream, SocketAddr);

pub(super) struct Listening {
    tx: mpsc::UnboundedSender<Accepted>,
}

/// Accepts streams at one address; stops listening when dropped.
pub struct FakeListener {
    net: FakeNet,
    key: (Realm, SocketAddrV4),
    tx: mpsc::UnboundedSender<Accepted>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Accepted>>,
}

pub(super) fn listen(host: &Host, port: u16) -> io::Result<FakeListener> {
    let mut s = host.net.lock();
    let port = if port == 0 {
        s.ephemeral(host.id, true)
    } else {
        port
    };
    let key = (s.hosts[host.id].realm, SocketAddrV4::new(host.ip, port));
    if s.tcp.contains_key(&key) {
        return Err(io::Error::from(io::ErrorKind::AddrInUse));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    s.tcp.insert(key, Listening { tx: tx.clone() });
    Ok(FakeListener {
        net: host.net.clone(),
        key,
        tx,
        rx: tokio::sync::Mutex::new(rx),
    })
}

impl FakeListener {
    /// The next connection and the address it came from (a NAT router's public address for a
    /// host behind one).
    pub async fn accept(&self) -> io::Result<(FakeStream, SocketAddr)> {
        self.rx
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    /// The address it listens at.
    pub fn local_addr(&self) -> SocketAddr {
        SocketAddr::V4(self.key.1)
    }
}

impl Drop for FakeListener {
    fn drop(&mut self) {
        let mut s = self.net.lock();
        if s.tcp
            .get(&self.key)
            .is_some_and(|l| l.tx.same_channel(&self.tx))
        {
            s.tcp.remove(&self.key);
        }
    }
}

/// Connects from one host. `resolve` takes only `ip:port` (there is no DNS); `connect` is
/// refused when the destination host exists but nobody listens there, and waits
/// [`SYN_TIMEOUT`] before `TimedOut` when the address is nobody's, is a NAT router's, or either
/// host [blocks streams](Host::block_tcp).
#[derive(Clone)]
pub struct FakeConnector {
    pub(super) host: Host,
}

impl Connector for FakeConnector {
    type Stream = FakeStream;

    async fn resolve(&self, endpoint: &str) -> io::Result<Vec<SocketAddr>> {
        endpoint
            .parse::<SocketAddr>()
            .map(|a| vec![a])
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the fake network resolves only ip:port, not {endpoint:?}"),
                )
            })
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<FakeStream> {
        match connect_now(&self.host, addr)? {
            Some(stream) => Ok(stream),
            None => {
                tokio::time::sleep(SYN_TIMEOUT).await;
                Err(io::Error::from(io::ErrorKind::TimedOut))
            }
        }
    }
}

/// The connection, or `None` when the SYN goes unanswered.
fn connect_now(host: &Host, addr: SocketAddr) -> io::Result<Option<FakeStream>> {
    let dst = v4(addr)?;
    let mut s = host.net.lock();
    if s.hosts[host.id].tcp_blocked {
        return Ok(None);
    }
    let realm = s.hosts[host.id].realm;
    let (key, from) = if realm != PUBLIC && s.host_by_addr.contains_key(&(realm, *dst.ip())) {
        let port = s.ephemeral(host.id, true);
        ((realm, dst), SocketAddrV4::new(host.ip, port))
    } else {
        if s.nat_by_ip.contains_key(dst.ip()) {
            return Ok(None);
        }
        let from = match s.nat_of(realm) {
            Some(n) => SocketAddrV4::new(n.public_ip, n.tcp_port()),
            None => SocketAddrV4::new(host.ip, s.ephemeral(host.id, true)),
        };
        ((PUBLIC, dst), from)
    };
    let Some(&to) = s.host_by_addr.get(&(key.0, *key.1.ip())) else {
        return Ok(None);
    };
    if s.hosts[to].tcp_blocked {
        return Ok(None);
    }
    let Some(listening) = s.tcp.get(&key) else {
        return Err(io::Error::from(io::ErrorKind::ConnectionRefused));
    };
    let link = Arc::new(Link {
        cut: AtomicBool::new(false),
        wakers: Mutex::new(Default::default()),
    });
    let (a, b) = tokio::io::duplex(PIPE_BYTES);
    let ours = FakeStream {
        inner: a,
        link: link.clone(),
        end: 0,
    };
    let theirs = FakeStream {
        inner: b,
        link: link.clone(),
        end: 1,
    };
    if listening.tx.send((theirs, SocketAddr::V4(from))).is_err() {
        return Err(io::Error::from(io::ErrorKind::ConnectionRefused));
    }
    for h in [host.id, to] {
        let streams = &mut s.hosts[h].streams;
        streams.retain(|l| l.strong_count() > 0);
        streams.push(Arc::downgrade(&link));
    }
    Ok(Some(ours))
}

/// What both ends of a stream share: whether it was cut, and who waits on it.
pub(super) struct Link {
    cut: AtomicBool,
    /// By end × (read, write).
    wakers: Mutex<[Option<Waker>; 4]>,
}

impl Link {
    pub(super) fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap());
        for w in wakers.into_iter().flatten() {
            w.wake();
        }
    }

    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// Registers `waker` for slot `i`, then says whether the stream is cut (so a cut between
    /// the check and the registration is not missed).
    fn wait(&self, i: usize, waker: &Waker) -> bool {
        let mut w = self.wakers.lock().unwrap();
        if !w[i].as_ref().is_some_and(|old| old.will_wake(waker)) {
            w[i] = Some(waker.clone());
        }
        drop(w);
        self.is_cut()
    }
}

/// One end of a stream: bytes written here are read at the other end. Dropping it closes the
/// stream (the other end reads EOF, its writes fail); a cut makes both ends' reads and writes
/// fail with `ConnectionReset`.
pub struct FakeStream {
    inner: DuplexStream,
    link: Arc<Link>,
    end: usize,
}

impl std::fmt::Debug for FakeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeStream")
            .field("cut", &self.link.is_cut())
            .finish_non_exhaustive()
    }
}

fn reset() -> io::Error {
    io::Error::from(io::ErrorKind::ConnectionReset)
}

impl FakeStream {
    fn poll_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        slot: usize,
        f: impl FnOnce(Pin<&mut DuplexStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.link.is_cut() {
            return Poll::Ready(Err(reset()));
        }
        match f(Pin::new(&mut self.inner), cx) {
            Poll::Pending if self.link.wait(self.end * 2 + slot, cx.waker()) => {
                Poll::Ready(Err(reset()))
            }
            r => r,
        }
    }
}

impl AsyncRead for FakeStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut()
            .poll_with(cx, 0, |inner, cx| inner.poll_read(cx, buf))
    }
}

impl AsyncWrite for FakeStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_with(cx, 1, |inner, cx| inner.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .poll_with(cx, 1, |inner, cx| inner.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .poll_with(cx, 1, |inner, cx| inner.poll_shutdown(cx))
    }
}
