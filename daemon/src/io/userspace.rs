//! `a2ad --userspace`: the TUN contract with a userspace TCP/IP stack on its other side, for
//! hosts without `/dev/net/tun` or without `CAP_NET_ADMIN` (a container, a sandbox, a CI job).
//! The UDP socket is the kernel's as ever (no privilege needed); the overlay addresses are held
//! by the stack ([`NetStack`], smoltcp), not by an interface, so nothing here needs netlink
//! writes. Programs reach members through the proxies (tasks/proxy.rs), and members reach
//! programs through forwards.
//!
//! The driver: one task polls the stack when a packet, a socket write or its timer wakes it,
//! and hands the packets the stack sent to the data plane's TUN reader. Each proxied or
//! forwarded connection is a [`StackStream`] (tokio's `AsyncRead`/`AsyncWrite` on a smoltcp
//! socket, woken by smoltcp's wakers).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use a2a_proto::api::{Forward, ForwardProto};
use arc_swap::ArcSwapOption;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Notify};

use super::kernel::{bind_udp, default_gateway, on_off, KernelUdp, TcpConnector};
use super::netconf::NetConf;
use super::{
    FastPaths, Platform, SessionIo, SessionView, TunDevice, TunReader, TunWriter, Underlay,
};
use crate::core::counters::Counters;
use crate::core::netstack::{
    socket_addr, ConnectError, ListenError, ListenKey, NetStack, UdpError,
};
use crate::core::wg::OVERLAY_MTU;

/// Packets the stack sent, waiting for the data plane (more are dropped: TCP resends).
const OUT_QUEUE: usize = 4096;
/// How long a connection through the stack may take to be established.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The userspace platform: the kernel's UDP socket, a userspace stack for the overlay.
#[derive(Clone, Default)]
pub struct Userspace {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// The stack of the session running now.
    current: ArcSwapOption<Stack>,
    forwards: Mutex<Vec<Forward>>,
}

impl Userspace {
    pub fn new() -> Userspace {
        Userspace::default()
    }

    /// The stack of the running session, if one runs.
    pub fn stack(&self) -> Option<Arc<Stack>> {
        self.shared
            .current
            .load_full()
            .filter(|s| !s.closed.load(Ordering::Relaxed))
    }
}

impl Platform for Userspace {
    type Udp = KernelUdp;
    type Tun = UserspaceTun;
    type Underlay = UserspaceUnderlay;
    type Connector = TcpConnector;
    type Overlay = StackOverlay;

    async fn open(
        &self,
        _interface: &str,
        udp_port: u16,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<SessionIo<Self>, String> {
        let (udp, dual) = bind_udp(udp_port).await?;
        let (udp_gso, udp_gro) = udp.fast();
        tracing::info!(
            "data path: UDP {}, userspace TCP/IP stack (no TUN device), UDP GSO {}, UDP GRO {}",
            if dual { "IPv4 and IPv6" } else { "IPv4 only" },
            on_off(udp_gso),
            on_off(udp_gro)
        );
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let stack = Arc::new(Stack {
            inner: Mutex::new(NetStack::new(
                usize::from(OVERLAY_MTU),
                std::time::Instant::now(),
                rand::random(),
            )),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            session: ArcSwapOption::empty(),
            udp_forwards: Mutex::new(Vec::new()),
            listeners: Mutex::new(std::collections::HashMap::new()),
        });
        stack.lock().set_ipv4(ip, prefix_len);
        let forwards = self.forwards();
        stack.lock().set_forwards(&tcp_ports(&forwards));
        stack.set_udp_forwards(&forwards);
        tokio::spawn(drive(stack.clone(), out_tx, self.shared.clone()));
        self.shared.current.store(Some(stack.clone()));
        // Reading the host's addresses over netlink needs no privilege (only changing them does).
        let netconf = NetConf::new().ok();
        Ok(SessionIo {
            udp,
            tun: UserspaceTun {
                stack: stack.clone(),
                out: Arc::new(tokio::sync::Mutex::new(out_rx)),
            },
            underlay: UserspaceUnderlay {
                stack: stack.clone(),
                netconf,
                ipv6: dual,
            },
            overlay: StackOverlay { stack },
            fast: FastPaths {
                tun_offload: false,
                udp_gso,
                udp_gro,
            },
        })
    }

    fn connector(&self) -> TcpConnector {
        TcpConnector
    }

    fn attach(&self, session: SessionView) {
        if let Some(stack) = self.shared.current.load_full() {
            stack.session.store(Some(Arc::new(session)));
        }
    }

    fn userspace(&self) -> bool {
        true
    }

    fn set_forwards(&self, forwards: &[Forward]) {
        *self.shared.forwards.lock().unwrap() = forwards.to_vec();
        if let Some(stack) = self.stack() {
            stack.lock().set_forwards(&tcp_ports(forwards));
            stack.set_udp_forwards(forwards);
            stack.wake.notify_one();
        }
    }
}

fn tcp_ports(forwards: &[Forward]) -> Vec<u16> {
    forwards
        .iter()
        .filter(|f| f.proto == ForwardProto::Tcp)
        .map(|f| f.port)
        .collect()
}

impl Userspace {
    fn forwards(&self) -> Vec<Forward> {
        self.shared.forwards.lock().unwrap().clone()
    }
}

/// One session's stack, shared by the driver, the TUN halves and the connections.
pub struct Stack {
    inner: Mutex<NetStack>,
    /// Wakes the driver: packets queued, data written or read, a socket closed.
    wake: Notify,
    /// Set when the session's TUN device is dropped: the driver ends, connections fail.
    closed: AtomicBool,
    session: ArcSwapOption<SessionView>,
    /// The UDP forwards served: port, target, the task relaying them.
    udp_forwards: Mutex<Vec<(u16, SocketAddr, AbortOnDrop)>>,
    /// The daemon's own listeners ([`StackListener`]): where their connections go.
    listeners: Mutex<std::collections::HashMap<ListenKey, mpsc::Sender<StackStream>>>,
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Stack {
    fn lock(&self) -> std::sync::MutexGuard<'_, NetStack> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session this stack serves, once it runs.
    pub fn session(&self) -> Option<Arc<SessionView>> {
        self.session.load_full()
    }

    pub fn counters(&self) -> Option<Arc<Counters>> {
        self.session().map(|s| s.counters.clone())
    }

    /// A packet dropped at a full queue between the data plane and the stack.
    fn queue_full(&self) {
        if let Some(s) = self.session.load().as_ref() {
            Counters::bump(&s.counters.stack_queue_full);
        }
    }

    /// Whether `ip` is another member's overlay address (in this node's prefix).
    pub fn is_overlay_peer(&self, ip: std::net::IpAddr) -> bool {
        self.lock().is_overlay_peer(ip)
    }

    /// A TCP connection to `to` through the overlay, established (or why not).
    pub async fn connect(self: &Arc<Self>, to: SocketAddr) -> io::Result<StackStream> {
        let handle = self.lock().connect(to).map_err(|e| match e {
            ConnectError::NotOverlay => io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is not another member's overlay address", to.ip()),
            ),
            ConnectError::TooMany => io::Error::other(format!(
                "{} connections through the userspace stack are open already",
                crate::core::netstack::MAX_CONNECTIONS
            )),
            ConnectError::Stack(e) => io::Error::other(e),
        })?;
        self.wake.notify_one();
        let stream = StackStream {
            stack: self.clone(),
            handle,
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, stream.established()).await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer from {to} within {CONNECT_TIMEOUT:?}"),
            )),
        }
    }
}

/// Members' flows (source addresses) a UDP forward relays at once; a datagram from one more is
/// dropped until one has been idle for [`UDP_FLOW_IDLE`].
pub const MAX_UDP_FLOWS: usize = 64;
/// A UDP forward's flow with no datagram either way for this long is closed.
pub const UDP_FLOW_IDLE: Duration = Duration::from_secs(60);
/// How long a datagram waits for room in a local socket before it is dropped.
pub const SEND_WAIT: Duration = Duration::from_millis(50);

impl Stack {
    /// Serves exactly the UDP ones of `forwards` from now on.
    fn set_udp_forwards(self: &Arc<Self>, forwards: &[Forward]) {
        let want: Vec<(u16, SocketAddr)> = forwards
            .iter()
            .filter(|f| f.proto == ForwardProto::Udp)
            .map(|f| (f.port, f.to))
            .collect();
        let mut running = self.udp_forwards.lock().unwrap_or_else(|e| e.into_inner());
        // Ended (dropped, its socket closed) before a new one binds the port.
        running.retain(|(port, to, _)| want.contains(&(*port, *to)));
        for (port, to) in want {
            if !running.iter().any(|(p, t, _)| (*p, *t) == (port, to)) {
                let task = tokio::spawn(udp_forward(self.clone(), port, to));
                running.push((port, to, AbortOnDrop(task)));
            }
        }
    }

    fn count(&self, pick: impl Fn(&Counters) -> &std::sync::atomic::AtomicU64) {
        if let Some(c) = self.counters() {
            Counters::bump(pick(&c));
        }
    }

    /// A UDP socket on the overlay (a SOCKS5 UDP association's), on a port of its own.
    pub fn udp_open(self: &Arc<Self>) -> io::Result<StackUdp> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(closed());
        }
        let handle = self.lock().udp_open().map_err(|_| {
            io::Error::other(format!(
                "{} UDP sockets on the userspace stack are open already",
                crate::core::netstack::MAX_UDP_SOCKETS
            ))
        })?;
        Ok(StackUdp {
            stack: self.clone(),
            handle,
        })
    }
}

/// A UDP forward: datagrams from members to `port` of the overlay addresses go to `to` from a
/// kernel UDP socket per member's address (so the local program's answers find their way
/// back), at most [`MAX_UDP_FLOWS`] at once, each closed after [`UDP_FLOW_IDLE`].
async fn udp_forward(stack: Arc<Stack>, port: u16, to: SocketAddr) {
    let handle = match stack.lock().udp_bind(port) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("UDP forward of port {port}: {e:?}; remove it and add it again");
            return;
        }
    };
    let udp = StackUdp {
        stack: stack.clone(),
        handle,
    };
    let (back_tx, mut back_rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>(256);
    let mut flows: std::collections::HashMap<
        SocketAddr,
        (
            Arc<tokio::net::UdpSocket>,
            AbortOnDrop,
            tokio::time::Instant,
        ),
    > = std::collections::HashMap::new();
    let mut buf = vec![0u8; 2048];
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            r = udp.recv_from(&mut buf) => {
                let Ok((n, member)) = r else { break };
                if !flows.contains_key(&member) {
                    if flows.len() >= MAX_UDP_FLOWS {
                        stack.count(|c| &c.forward_udp_dropped);
                        continue;
                    }
                    let any: SocketAddr = if to.is_ipv4() {
                        (Ipv4Addr::UNSPECIFIED, 0).into()
                    } else {
                        (Ipv6Addr::UNSPECIFIED, 0).into()
                    };
                    let local = match tokio::net::UdpSocket::bind(any).await {
                        Ok(l) if l.connect(to).await.is_ok() => Arc::new(l),
                        _ => {
                            stack.count(|c| &c.forward_target_unreachable);
                            continue;
                        }
                    };
                    let reader = {
                        let (local, back) = (local.clone(), back_tx.clone());
                        tokio::spawn(async move {
                            let mut b = vec![0u8; 2048];
                            loop {
                                match local.recv(&mut b).await {
                                    Ok(n) => {
                                        if back.send((member, b[..n].to_vec())).await.is_err() {
                                            break;
                                        }
                                    }
                                    // The target's port is closed (ICMP): it may open later.
                                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                                    Err(_) => break,
                                }
                            }
                        })
                    };
                    flows.insert(member, (local, AbortOnDrop(reader), tokio::time::Instant::now()));
                }
                if let Some((local, _, seen)) = flows.get_mut(&member) {
                    *seen = tokio::time::Instant::now();
                    // A new socket's readiness is not known yet: wait for it, shortly.
                    let sent = match local.try_send(&buf[..n]) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            tokio::time::timeout(SEND_WAIT, local.send(&buf[..n]))
                                .await
                                .unwrap_or(Err(e))
                        }
                        r => r,
                    };
                    match sent {
                        Ok(_) => stack.count(|c| &c.forward_udp_datagrams),
                        // The target's port is closed: as for any datagram, nothing comes back.
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                        Err(_) => stack.count(|c| &c.forward_udp_dropped),
                    }
                }
            }
            Some((member, data)) = back_rx.recv() => {
                if let Some((_, _, seen)) = flows.get_mut(&member) {
                    *seen = tokio::time::Instant::now();
                }
                // A datagram longer than one overlay packet carries is dropped too.
                if udp.send_to(&data, member).is_err() {
                    stack.count(|c| &c.forward_udp_dropped);
                }
            }
            _ = sweep.tick() => {
                flows.retain(|_, (_, _, seen)| seen.elapsed() < UDP_FLOW_IDLE);
            }
        }
    }
}

/// A UDP socket on the userspace stack. Dropping it closes it.
pub struct StackUdp {
    stack: Arc<Stack>,
    handle: SocketHandle,
}

impl StackUdp {
    /// Queues `payload` to `to`, a member's overlay address (sent at the stack's next poll).
    pub fn send_to(&self, payload: &[u8], to: SocketAddr) -> Result<(), UdpError> {
        self.stack.lock().udp_send(self.handle, to, payload)?;
        self.stack.wake.notify_one();
        Ok(())
    }

    /// The largest payload one datagram to `to` may carry.
    pub fn max_payload(&self, to: std::net::IpAddr) -> usize {
        self.stack.lock().max_udp_payload(to)
    }

    /// The next datagram a member sent to this socket: its length in `buf` and the sender.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        std::future::poll_fn(|cx| {
            if self.stack.closed.load(Ordering::Relaxed) {
                return Poll::Ready(Err(closed()));
            }
            let mut s = self.stack.lock();
            let sock = s.udp(self.handle);
            match sock.recv_slice(buf) {
                Ok((n, meta)) => Poll::Ready(Ok((n, socket_addr(meta.endpoint)))),
                // Longer than `buf` (not from this stack's MTU): dropped, wait for the next.
                Err(smoltcp::socket::udp::RecvError::Truncated) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Err(smoltcp::socket::udp::RecvError::Exhausted) => {
                    sock.register_recv_waker(cx.waker());
                    Poll::Pending
                }
            }
        })
        .await
    }
}

impl Drop for StackUdp {
    fn drop(&mut self) {
        self.stack.lock().udp_close(self.handle);
        self.stack.wake.notify_one();
    }
}

/// The driver: polls the stack when woken or when its timer is due, passes what it sent to the
/// TUN reader, and splices each connection accepted on a forwarded port to its local target.
async fn drive(stack: Arc<Stack>, out: mpsc::Sender<Vec<u8>>, shared: Arc<Shared>) {
    // Polls in a row that asked to be polled again at once.
    let mut busy = 0u32;
    while !stack.closed.load(Ordering::Relaxed) {
        let (delay, accepted) = {
            let mut s = stack.lock();
            let now = std::time::Instant::now();
            s.poll(now);
            while let Some(p) = s.take_packet() {
                if out.try_send(p).is_err() {
                    stack.queue_full();
                }
            }
            (s.poll_delay(now), s.accepted())
        };
        for (key, handle) in accepted {
            let stream = StackStream {
                stack: stack.clone(),
                handle,
            };
            if key.addr.is_some() {
                let to = stack
                    .listeners
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&key)
                    .cloned();
                // Gone meanwhile: dropping the stream resets the connection.
                if let Some(to) = to {
                    tokio::spawn(hand_over(stream, to));
                }
                continue;
            }
            let port = key.port;
            let to = shared
                .forwards
                .lock()
                .unwrap()
                .iter()
                .find(|f| f.port == port)
                .map(|f| f.to);
            match to {
                Some(to) => {
                    tokio::spawn(splice_forward(stream, to));
                }
                // Removed meanwhile: dropping the stream resets the connection.
                None => drop(stream),
            }
        }
        let delay = delay.unwrap_or(Duration::from_secs(1));
        if delay.is_zero() {
            // More to send at once: let the data plane take what was sent first; should the
            // stack keep asking (a bug), it is not allowed to spin.
            busy += 1;
            if busy < 64 {
                tokio::task::yield_now().await;
            } else {
                busy = 0;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            continue;
        }
        busy = 0;
        tokio::select! {
            _ = stack.wake.notified() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// A member's connection to one of the daemon's own listeners, handed over once established
/// (a full queue resets it: the listener bounds what it serves).
async fn hand_over(stream: StackStream, to: mpsc::Sender<StackStream>) {
    if let Ok(Ok(())) = tokio::time::timeout(CONNECT_TIMEOUT, stream.established()).await {
        let _ = to.try_send(stream);
    }
}

/// The overlay address's sockets in userspace mode: on the session's stack.
#[derive(Clone)]
pub struct StackOverlay {
    stack: Arc<Stack>,
}

/// Connections accepted by a listener of the daemon's own, waiting for it.
const ACCEPT_QUEUE: usize = 16;

fn held(addr: SocketAddr) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        format!(
            "{} is not an address of this node's userspace stack",
            addr.ip()
        ),
    )
}

impl super::OverlayNet for StackOverlay {
    type Stream = StackStream;
    type Listener = StackListener;
    type Datagrams = StackUdp;

    async fn listen(&self, addr: SocketAddr) -> io::Result<StackListener> {
        if self.stack.closed.load(Ordering::Relaxed) {
            return Err(closed());
        }
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let key = self
            .stack
            .lock()
            .listen(addr.ip(), addr.port())
            .map_err(|e| match e {
                ListenError::NotHeld => held(addr),
                ListenError::InUse => io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{addr} is listened on already"),
                ),
            })?;
        self.stack
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, tx);
        Ok(StackListener {
            stack: self.stack.clone(),
            key,
            rx: tokio::sync::Mutex::new(rx),
        })
    }

    async fn bind_udp(&self, addr: SocketAddr) -> io::Result<StackUdp> {
        if self.stack.closed.load(Ordering::Relaxed) {
            return Err(closed());
        }
        let handle = self
            .stack
            .lock()
            .udp_bind_own(addr.ip(), addr.port())
            .map_err(|e| match e {
                UdpError::NotHeld => held(addr),
                UdpError::InUse => io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("UDP {addr} is bound already"),
                ),
                e => io::Error::other(format!("UDP {addr}: {e:?}")),
            })?;
        Ok(StackUdp {
            stack: self.stack.clone(),
            handle,
        })
    }

    async fn connect(&self, to: SocketAddr) -> io::Result<StackStream> {
        self.stack.connect(to).await
    }
}

/// A listener of the daemon's own on the stack. Dropping it stops listening.
pub struct StackListener {
    stack: Arc<Stack>,
    key: ListenKey,
    rx: tokio::sync::Mutex<mpsc::Receiver<StackStream>>,
}

impl super::OverlayListener for StackListener {
    type Stream = StackStream;

    async fn accept(&self) -> io::Result<(StackStream, SocketAddr)> {
        let stream = self.rx.lock().await.recv().await.ok_or_else(closed)?;
        let from = stream.remote().ok_or_else(closed)?;
        Ok((stream, from))
    }
}

impl Drop for StackListener {
    fn drop(&mut self) {
        self.stack
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        self.stack.lock().unlisten(self.key);
        self.stack.wake.notify_one();
    }
}

impl super::OverlayDatagrams for StackUdp {
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        StackUdp::recv_from(self, buf).await
    }

    /// Waits up to [`SEND_WAIT`] for room in the socket's queue.
    async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        let deadline = tokio::time::Instant::now() + SEND_WAIT;
        loop {
            match StackUdp::send_to(self, data, to) {
                Ok(()) => return Ok(()),
                Err(UdpError::QueueFull) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return Err(io::Error::other(format!("UDP to {to}: {e:?}"))),
            }
        }
    }
}

/// A member's connection to a forwarded port, carried to `to` on this host.
async fn splice_forward(mut stream: StackStream, to: SocketAddr) {
    let counters = stream.stack.counters();
    if tokio::time::timeout(CONNECT_TIMEOUT, stream.established())
        .await
        .map_or(true, |r| r.is_err())
    {
        return;
    }
    let mut local =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(to)).await {
            Ok(Ok(s)) => s,
            _ => {
                if let Some(c) = &counters {
                    Counters::bump(&c.forward_target_unreachable);
                }
                // The member sees a reset, as from a closed port.
                return;
            }
        };
    let _ = local.set_nodelay(true);
    if let Some(c) = &counters {
        Counters::bump(&c.forward_accepted);
    }
    let _ = tokio::io::copy_bidirectional(&mut stream, &mut local).await;
}

/// The TUN device of userspace mode: what the data plane reads is what the stack sent, what it
/// writes goes into the stack. Dropping it ends the stack.
pub struct UserspaceTun {
    stack: Arc<Stack>,
    out: Arc<tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>>,
}

impl Drop for UserspaceTun {
    fn drop(&mut self) {
        self.stack.closed.store(true, Ordering::Relaxed);
        // The UDP forwards' tasks wait on their sockets, which nothing wakes any more.
        self.stack
            .udp_forwards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        // The daemon's own listeners' accepts end.
        self.stack
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.stack.wake.notify_one();
    }
}

impl TunDevice for UserspaceTun {
    type Reader = UserspaceTunReader;
    type Writer = UserspaceTunWriter;

    fn reader(&self) -> UserspaceTunReader {
        UserspaceTunReader {
            out: self.out.clone(),
        }
    }

    fn writer(&self) -> UserspaceTunWriter {
        UserspaceTunWriter {
            stack: self.stack.clone(),
        }
    }
}

pub struct UserspaceTunReader {
    out: Arc<tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>>,
}

impl TunReader for UserspaceTunReader {
    async fn read(&mut self, bufs: &mut [&mut [u8]], sizes: &mut [usize]) -> io::Result<usize> {
        let room = bufs.len().min(sizes.len());
        if room == 0 {
            return Ok(0);
        }
        let mut out = self.out.lock().await;
        let Some(first) = out.recv().await else {
            // The stack is gone (the session stops): nothing will come.
            return std::future::pending().await;
        };
        let mut next = Some(first);
        let mut n = 0;
        while let Some(p) = next.take() {
            // The stack sends at most the overlay MTU; a longer packet cannot be.
            if p.len() <= bufs[n].len() {
                bufs[n][..p.len()].copy_from_slice(&p);
                sizes[n] = p.len();
                n += 1;
            }
            if n < room {
                next = out.try_recv().ok();
            }
        }
        Ok(n)
    }
}

pub struct UserspaceTunWriter {
    stack: Arc<Stack>,
}

impl TunWriter for UserspaceTunWriter {
    async fn write(&mut self, bufs: &mut [Vec<u8>], offset: usize) -> io::Result<()> {
        {
            let mut s = self.stack.lock();
            for b in bufs.iter() {
                if !s.receive(b.get(offset..).unwrap_or_default()) {
                    self.stack.queue_full();
                }
            }
        }
        self.stack.wake.notify_one();
        Ok(())
    }
}

/// The underlay of userspace mode: the host's addresses as the kernel's, the overlay addresses
/// held by the stack (no netlink writes, no privilege).
pub struct UserspaceUnderlay {
    stack: Arc<Stack>,
    netconf: Option<NetConf>,
    ipv6: bool,
}

impl Underlay for UserspaceUnderlay {
    async fn local_ipv4(&self) -> Vec<Ipv4Addr> {
        match &self.netconf {
            Some(n) => n.local_ipv4(None).await.unwrap_or_default(),
            None => Vec::new(),
        }
    }

    async fn local_ipv6(&self) -> Vec<Ipv6Addr> {
        match &self.netconf {
            Some(n) if self.ipv6 => n.local_ipv6(None).await.unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    async fn set_overlay_address(&self, ip: Ipv4Addr, prefix_len: u8) -> Result<(), String> {
        self.stack.lock().set_ipv4(ip, prefix_len);
        Ok(())
    }

    async fn set_overlay_address6(&self, ip: Ipv6Addr, prefix_len: u8) -> Result<(), String> {
        self.stack.lock().set_ipv6(ip, prefix_len);
        Ok(())
    }

    async fn gateway_ipv4(&self) -> Option<Ipv4Addr> {
        let table = tokio::fs::read_to_string("/proc/net/route").await.ok()?;
        default_gateway(&table)
    }
}

/// A TCP connection through the userspace stack, as a tokio stream. Dropping it closes the
/// connection (gracefully once both directions were shut down; otherwise with a reset).
pub struct StackStream {
    stack: Arc<Stack>,
    handle: SocketHandle,
}

impl StackStream {
    /// The other end's address.
    fn remote(&self) -> Option<SocketAddr> {
        self.stack
            .lock()
            .tcp(self.handle)
            .remote_endpoint()
            .map(socket_addr)
    }

    /// Waits until the connection is established; an error when it was refused or reset.
    async fn established(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            if self.stack.closed.load(Ordering::Relaxed) {
                return Poll::Ready(Err(closed()));
            }
            let mut s = self.stack.lock();
            let sock = s.tcp(self.handle);
            match sock.state() {
                tcp::State::Established | tcp::State::CloseWait => Poll::Ready(Ok(())),
                tcp::State::Closed | tcp::State::TimeWait => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "connection refused",
                ))),
                _ => {
                    sock.register_recv_waker(cx.waker());
                    Poll::Pending
                }
            }
        })
        .await
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the session ended (the node left its network)",
    )
}

impl Drop for StackStream {
    fn drop(&mut self) {
        self.stack.lock().release(self.handle);
        self.stack.wake.notify_one();
    }
}

impl AsyncRead for StackStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.stack.closed.load(Ordering::Relaxed) {
            return Poll::Ready(Err(closed()));
        }
        let mut s = self.stack.lock();
        let sock = s.tcp(self.handle);
        if sock.can_recv() {
            let n = sock
                .recv_slice(buf.initialize_unfilled())
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionReset, e.to_string()))?;
            buf.advance(n);
            drop(s);
            // The window opened: the driver may have an ACK to send.
            self.stack.wake.notify_one();
            return Poll::Ready(Ok(()));
        }
        if !sock.may_recv() {
            // The member closed its side (or the connection is gone): end of stream.
            return Poll::Ready(Ok(()));
        }
        sock.register_recv_waker(cx.waker());
        Poll::Pending
    }
}

impl AsyncWrite for StackStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.stack.closed.load(Ordering::Relaxed) {
            return Poll::Ready(Err(closed()));
        }
        let mut s = self.stack.lock();
        let sock = s.tcp(self.handle);
        if !sock.may_send() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the member closed the connection",
            )));
        }
        if sock.can_send() {
            let n = sock
                .send_slice(data)
                .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()))?;
            drop(s);
            self.stack.wake.notify_one();
            return Poll::Ready(Ok(n));
        }
        sock.register_send_waker(cx.waker());
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stack.lock().close(self.handle);
        self.stack.wake.notify_one();
        Poll::Ready(Ok(()))
    }
}
