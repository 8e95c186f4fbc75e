//! The userspace TCP/IP stack of `a2ad --userspace`: smoltcp holding the node's overlay
//! addresses, fed the packets the data plane would have written to a TUN device and giving back
//! the packets it would have read from one. I/O-free: it takes `now` and packets and returns
//! packets; its sockets wake whoever waits on them (smoltcp's wakers). The driver
//! (io/userspace.rs) owns the clock, the lock and the tasks.
//!
//! TCP: outbound connections (the SOCKS5 and HTTP proxies) and inbound ones to the forwarded
//! ports (`a2actl forward add`). UDP: one socket per SOCKS5 UDP association, on a port of its
//! own, sending to members and receiving what they answer.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};

/// Packets from the overlay queued for the stack (more are dropped, counted by the caller).
pub const RX_QUEUE: usize = 4096;
/// Packets the stack sent, not taken yet (more are dropped: TCP resends them).
pub const TX_QUEUE: usize = 4096;
/// Each TCP connection's receive and send buffers (the window: 256 KiB each way keeps a
/// single stream well above 1 Gbit/s at the overlay's sub-millisecond RTTs).
pub const TCP_BUFFER: usize = 256 * 1024;
/// TCP connections through the stack at once, outbound and inbound together; a connection
/// beyond it is refused (the proxies answer "general failure", a SYN to a forwarded port goes
/// unanswered until one closes). 256 × 512 KiB of buffers is the bound on the stack's memory.
pub const MAX_CONNECTIONS: usize = 256;
/// Listening sockets kept per forwarded port: SYNs that arrive together (a client opening
/// several connections at once) are accepted without a reset.
pub const LISTEN_BACKLOG: usize = 4;
/// Egress passes in one poll: up to this many segments per connection (~90 KB).
const EGRESS_PASSES: usize = 64;
/// UDP sockets at once (SOCKS5 UDP associations and UDP forwards); one more is refused.
pub const MAX_UDP_SOCKETS: usize = 32;
/// The daemon's own UDP sockets at once (the service lists' and the policy's, on the overlay
/// addresses), bounded apart from [`MAX_UDP_SOCKETS`] so that neither starves the other.
pub const MAX_OWN_UDP_SOCKETS: usize = 16;
/// Datagrams queued in each UDP socket, each way; a datagram beyond it is dropped (counted by
/// the caller), as a full socket buffer drops it in a kernel.
pub const UDP_QUEUE: usize = 64;
/// IPv4 and UDP headers, and IPv6's: a datagram's payload is at most the MTU less these (the
/// stack does not fragment).
const UDP4_OVERHEAD: usize = 20 + 8;
const UDP6_OVERHEAD: usize = 40 + 8;
/// Local ports of outbound connections.
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

/// The queues between the data plane and smoltcp: smoltcp's `Device`.
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
    tx_dropped: u64,
}

impl phy::Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Every packet in was authenticated by WireGuard, which a bit flip does not pass;
        // the checksums out are still computed (the peer's kernel checks them).
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = phy::Checksum::Tx;
        checksum.tcp = phy::Checksum::Tx;
        checksum.udp = phy::Checksum::Tx;
        checksum.icmpv4 = phy::Checksum::Tx;
        checksum.icmpv6 = phy::Checksum::Tx;
        caps.checksum = checksum;
        caps
    }

    fn receive(&mut self, _now: SInstant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((
            RxToken(packet),
            TxToken {
                tx: &mut self.tx,
                dropped: &mut self.tx_dropped,
            },
        ))
    }

    fn transmit(&mut self, _now: SInstant) -> Option<TxToken<'_>> {
        // Full: smoltcp keeps the segment and sends it at a later poll.
        if self.tx.len() >= TX_QUEUE {
            return None;
        }
        Some(TxToken {
            tx: &mut self.tx,
            dropped: &mut self.tx_dropped,
        })
    }
}

struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct TxToken<'a> {
    tx: &'a mut VecDeque<Vec<u8>>,
    dropped: &'a mut u64,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0; len];
        let r = f(&mut packet);
        // A reply sent while a packet is received goes past the bound rather than be lost.
        if self.tx.len() < 2 * TX_QUEUE {
            self.tx.push_back(packet);
        } else {
            *self.dropped += 1;
        }
        r
    }
}

/// Why an outbound connection was not opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// [`MAX_CONNECTIONS`] are open.
    TooMany,
    /// The destination is not on the overlay (not in this node's prefixes), or is this node.
    NotOverlay,
    /// smoltcp refused (no free local port, say).
    Stack(String),
}

/// Why a UDP datagram was not sent, or a UDP socket not opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UdpError {
    /// [`MAX_UDP_SOCKETS`] are open.
    TooMany,
    /// The destination is not another member's overlay address.
    NotOverlay,
    /// Longer than the overlay's MTU allows (see [`NetStack::max_udp_payload`]).
    TooLarge,
    /// [`UDP_QUEUE`] datagrams are queued already.
    QueueFull,
    /// Another UDP socket holds the port.
    InUse,
    /// The address to bind is not one this stack holds.
    NotHeld,
}

/// What a listening socket listens on: a port of every overlay address (a forward's), or of
/// one (the daemon's own services').
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenKey {
    pub addr: Option<IpAddr>,
    pub port: u16,
}

/// Why [`NetStack::listen`] did not listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenError {
    /// The address is not one this stack holds.
    NotHeld,
    /// Something listens there already.
    InUse,
}

/// An open UDP socket's address, port, and whether it is the daemon's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UdpSlot {
    addr: Option<IpAddr>,
    port: u16,
    own: bool,
}

/// The stack: one interface with the node's overlay addresses, its TCP sockets, the forwarded
/// ports' listeners.
pub struct NetStack {
    iface: Interface,
    sockets: SocketSet<'static>,
    queues: Queues,
    /// The time `now` is measured from (smoltcp's clock is a count of microseconds).
    epoch: std::time::Instant,
    ip4: Option<(Ipv4Addr, u8)>,
    ip6: Option<(Ipv6Addr, u8)>,
    next_port: u16,
    /// Open connections (outbound and accepted), whose sockets the driver holds.
    connections: usize,
    /// Forwarded ports (no address) and the daemon's own (an address) → their listening
    /// sockets.
    listeners: BTreeMap<ListenKey, Vec<SocketHandle>>,
    /// Connections released while still closing: what is queued goes out first, then they
    /// are removed (at the latest at the deadline, with a reset).
    lingering: Vec<(SocketHandle, SInstant)>,
    /// The time of the last poll.
    last: SInstant,
    /// Connections accepted by listeners, not handed to the driver yet.
    just_accepted: Vec<(ListenKey, SocketHandle)>,
    /// Open UDP sockets and what they are bound to.
    udp: BTreeMap<SocketHandle, UdpSlot>,
    next_udp_port: u16,
}

/// How long a released connection may take to send what it holds and close.
const LINGER: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(30);

impl NetStack {
    /// A stack with no address yet (see [`set_ipv4`](Self::set_ipv4)); `now` starts its clock.
    pub fn new(mtu: usize, now: std::time::Instant, seed: u64) -> NetStack {
        let mut queues = Queues {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
            tx_dropped: 0,
        };
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed;
        let iface = Interface::new(config, &mut queues, SInstant::ZERO);
        NetStack {
            iface,
            sockets: SocketSet::new(Vec::new()),
            queues,
            epoch: now,
            ip4: None,
            ip6: None,
            next_port: *EPHEMERAL.start() + (seed % 8192) as u16,
            connections: 0,
            listeners: BTreeMap::new(),
            lingering: Vec::new(),
            last: SInstant::ZERO,
            just_accepted: Vec::new(),
            udp: BTreeMap::new(),
            next_udp_port: *EPHEMERAL.start() + (seed.rotate_left(17) % 8192) as u16,
        }
    }

    fn at(&self, now: std::time::Instant) -> SInstant {
        SInstant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64)
    }

    fn set_addrs(&mut self) {
        let (ip4, ip6) = (self.ip4, self.ip6);
        self.iface.update_ip_addrs(|addrs| {
            addrs.clear();
            if let Some((ip, len)) = ip4 {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(ip), len));
            }
            if let Some((ip, len)) = ip6 {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(ip), len));
            }
        });
    }

    /// Holds `ip/prefix_len` as the node's IPv4 overlay address (instead of the one before).
    pub fn set_ipv4(&mut self, ip: Ipv4Addr, prefix_len: u8) {
        self.ip4 = Some((ip, prefix_len.min(32)));
        self.set_addrs();
    }

    /// Holds `ip/prefix_len` as the node's IPv6 overlay address.
    pub fn set_ipv6(&mut self, ip: Ipv6Addr, prefix_len: u8) {
        self.ip6 = Some((ip, prefix_len.min(128)));
        self.set_addrs();
    }

    pub fn ipv4(&self) -> Option<(Ipv4Addr, u8)> {
        self.ip4
    }

    /// Whether `ip` is one of the addresses this stack holds.
    pub fn holds(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => self.ip4.is_some_and(|(own, _)| own == ip),
            IpAddr::V6(ip) => self.ip6.is_some_and(|(own, _)| own == ip),
        }
    }

    /// Whether `ip` is another node's overlay address: in one of this node's prefixes, not this
    /// node's own, not the network or broadcast address.
    pub fn is_overlay_peer(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => self.ip4.is_some_and(|(own, len)| {
                ipnet::Ipv4Net::new(own, len).is_ok_and(|net| {
                    let net = net.trunc();
                    net.contains(&ip) && ip != own && ip != net.network() && ip != net.broadcast()
                })
            }),
            IpAddr::V6(ip) => self.ip6.is_some_and(|(own, len)| {
                ipnet::Ipv6Net::new(own, len)
                    .is_ok_and(|net| net.trunc().contains(&ip) && ip != own)
            }),
        }
    }

    /// Queues a packet from the overlay; `false` when the queue is full (dropped).
    pub fn receive(&mut self, packet: &[u8]) -> bool {
        if self.queues.rx.len() >= RX_QUEUE {
            return false;
        }
        self.queues.rx.push_back(packet.to_vec());
        true
    }

    /// Runs the stack at `now`: takes the queued packets in, lets the sockets send.
    pub fn poll(&mut self, now: std::time::Instant) {
        let at = self.at(now);
        self.last = at;
        // One packet at a time, so that a connection accepted by a forwarded port's listener
        // gets the listener replaced before the next SYN (a burst of SYNs is not reset).
        loop {
            let r = self
                .iface
                .poll_ingress_single(at, &mut self.queues, &mut self.sockets);
            match r {
                smoltcp::iface::PollIngressSingleResult::None => break,
                smoltcp::iface::PollIngressSingleResult::PacketProcessed => {}
                smoltcp::iface::PollIngressSingleResult::SocketStateChanged => self.take_accepted(),
            }
        }
        // An egress pass sends at most one segment per socket: pass again while segments go
        // out, a bounded number of times (the driver polls again at once when more is due).
        for _ in 0..EGRESS_PASSES {
            if self.queues.tx.len() >= TX_QUEUE {
                break;
            }
            let sent = self
                .iface
                .poll_egress(at, &mut self.queues, &mut self.sockets);
            if sent == smoltcp::iface::PollResult::None {
                break;
            }
        }
        let sockets = &mut self.sockets;
        let before = self.lingering.len();
        self.lingering.retain(|&(h, deadline)| {
            let s = sockets.get_mut::<tcp::Socket>(h);
            let done = matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait);
            if done || at >= deadline {
                s.abort();
                sockets.remove(h);
                return false;
            }
            true
        });
        self.connections = self
            .connections
            .saturating_sub(before - self.lingering.len());
    }

    /// The next packet for the overlay, if any.
    pub fn take_packet(&mut self) -> Option<Vec<u8>> {
        self.queues.tx.pop_front()
    }

    /// Packets the stack sent and lost to a full queue (TCP sends them again).
    pub fn tx_dropped(&self) -> u64 {
        self.queues.tx_dropped
    }

    /// When the stack must be polled again at the latest, with nothing else happening.
    pub fn poll_delay(&mut self, now: std::time::Instant) -> Option<Duration> {
        let at = self.at(now);
        self.iface
            .poll_delay(at, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    fn new_socket() -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        // Agents' RPCs are small writes answered at once: no Nagle delay.
        s.set_nagle_enabled(false);
        s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(30)));
        // A connection whose peer is gone for this long is dropped (keep-alives unanswered).
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        s
    }

    /// Opens a TCP connection to `to`, an overlay address; the driver waits for the socket to
    /// be established (or closed: refused or unreachable) and removes it with
    /// [`release`](Self::release).
    pub fn connect(&mut self, to: SocketAddr) -> Result<SocketHandle, ConnectError> {
        if !self.is_overlay_peer(to.ip()) {
            return Err(ConnectError::NotOverlay);
        }
        if self.connections >= MAX_CONNECTIONS {
            return Err(ConnectError::TooMany);
        }
        let mut socket = Self::new_socket();
        let span = (EPHEMERAL.end() - EPHEMERAL.start()) as u32 + 1;
        let port = self.next_port;
        self.next_port =
            EPHEMERAL.start() + ((u32::from(port - EPHEMERAL.start()) + 1) % span) as u16;
        let remote = IpEndpoint::new(ip_address(to.ip()), to.port());
        socket
            .connect(self.iface.context(), remote, port)
            .map_err(|e| ConnectError::Stack(e.to_string()))?;
        self.connections += 1;
        Ok(self.sockets.add(socket))
    }

    /// The TCP socket behind `handle`.
    pub fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// Gives a connection's socket back after its last use: one being established or closed
    /// goes at once; one with data or a FIN still to send is closed and lingers until it has
    /// (see [`LINGER`]).
    pub fn release(&mut self, handle: SocketHandle) {
        let s = self.sockets.get_mut::<tcp::Socket>(handle);
        match s.state() {
            tcp::State::Closed
            | tcp::State::TimeWait
            | tcp::State::Listen
            | tcp::State::SynSent
            | tcp::State::SynReceived => {
                s.abort();
                self.sockets.remove(handle);
                self.connections = self.connections.saturating_sub(1);
            }
            _ => {
                s.close();
                self.lingering.push((handle, self.last + LINGER));
            }
        }
    }

    /// Closes a connection gracefully (FIN after what is queued); it stays until released.
    pub fn close(&mut self, handle: SocketHandle) {
        self.tcp(handle).close();
    }

    /// Listens on exactly these ports of the overlay addresses (forwards added and removed);
    /// connections already accepted stay.
    pub fn set_forwards(&mut self, ports: &[u16]) {
        let gone: Vec<ListenKey> = self
            .listeners
            .keys()
            .copied()
            .filter(|k| k.addr.is_none() && !ports.contains(&k.port))
            .collect();
        for key in gone {
            self.unlisten_key(key);
        }
        for &port in ports {
            self.listeners
                .entry(ListenKey { addr: None, port })
                .or_default();
        }
        self.refill_listeners();
    }

    /// The forwarded ports listened on.
    pub fn forwards(&self) -> Vec<u16> {
        self.listeners
            .keys()
            .filter(|k| k.addr.is_none())
            .map(|k| k.port)
            .collect()
    }

    /// Listens on `port` of `addr`, one of this stack's addresses (the daemon's own services);
    /// what is accepted comes out of [`accepted`](Self::accepted) with its key.
    pub fn listen(&mut self, addr: IpAddr, port: u16) -> Result<ListenKey, ListenError> {
        if !self.holds(addr) {
            return Err(ListenError::NotHeld);
        }
        let key = ListenKey {
            addr: Some(addr),
            port,
        };
        if port == 0 || self.listeners.contains_key(&key) {
            return Err(ListenError::InUse);
        }
        self.listeners.insert(key, Vec::new());
        self.refill_listeners();
        Ok(key)
    }

    /// Stops listening on `key` (connections already accepted stay).
    pub fn unlisten(&mut self, key: ListenKey) {
        self.unlisten_key(key);
    }

    fn unlisten_key(&mut self, key: ListenKey) {
        for h in self.listeners.remove(&key).unwrap_or_default() {
            self.sockets.remove(h);
        }
    }

    fn refill_listeners(&mut self) {
        for (key, handles) in self.listeners.iter_mut() {
            while handles.len() < LISTEN_BACKLOG {
                let mut s = Self::new_socket();
                let at = smoltcp::wire::IpListenEndpoint {
                    addr: key.addr.map(ip_address),
                    port: key.port,
                };
                if s.listen(at).is_err() {
                    break;
                }
                handles.push(self.sockets.add(s));
            }
        }
    }

    /// Connections a member opened to a listened port since the last call: `(what listened,
    /// socket)` each, now the driver's (released with [`release`](Self::release)). Beyond
    /// [`MAX_CONNECTIONS`], a port's listeners are not refilled until connections close.
    pub fn accepted(&mut self) -> Vec<(ListenKey, SocketHandle)> {
        self.take_accepted();
        std::mem::take(&mut self.just_accepted)
    }

    /// Moves the listeners that left the listening state to `just_accepted`, and refills.
    fn take_accepted(&mut self) {
        let out = &mut self.just_accepted;
        let before = out.len();
        for (&key, handles) in self.listeners.iter_mut() {
            handles.retain(|&h| {
                let s = self.sockets.get::<tcp::Socket>(h);
                if s.state() == tcp::State::Listen {
                    return true;
                }
                out.push((key, h));
                false
            });
        }
        self.connections += out.len() - before;
        if self.connections < MAX_CONNECTIONS {
            self.refill_listeners();
        }
    }

    /// Open connections (outbound and accepted).
    pub fn connections(&self) -> usize {
        self.connections
    }

    /// The largest UDP payload to `to` that fits the overlay's MTU in one packet.
    pub fn max_udp_payload(&self, to: IpAddr) -> usize {
        let overhead = match to {
            IpAddr::V4(_) => UDP4_OVERHEAD,
            IpAddr::V6(_) => UDP6_OVERHEAD,
        };
        self.queues.mtu.saturating_sub(overhead)
    }

    /// Opens a UDP socket on a free local port of the overlay addresses; the caller sends with
    /// [`udp_send`](Self::udp_send), receives on [`udp`](Self::udp) and closes it with
    /// [`udp_close`](Self::udp_close).
    pub fn udp_open(&mut self) -> Result<SocketHandle, UdpError> {
        self.udp_slot(None, 0, false)
    }

    /// Opens a UDP socket on `port` of the overlay addresses (a UDP forward's); `InUse` when a
    /// socket holds it already.
    pub fn udp_bind(&mut self, port: u16) -> Result<SocketHandle, UdpError> {
        if port == 0 {
            return Err(UdpError::InUse);
        }
        self.udp_slot(None, port, false)
    }

    /// Opens one of the daemon's own UDP sockets on `port` (0: a free one) of `addr`, an
    /// address this stack holds; bounded by [`MAX_OWN_UDP_SOCKETS`].
    pub fn udp_bind_own(&mut self, addr: IpAddr, port: u16) -> Result<SocketHandle, UdpError> {
        if !self.holds(addr) {
            return Err(UdpError::NotHeld);
        }
        self.udp_slot(Some(addr), port, true)
    }

    /// Whether a socket on `addr` (none: every address) and `port` would clash with one open.
    fn udp_taken(&self, addr: Option<IpAddr>, port: u16) -> bool {
        self.udp
            .values()
            .any(|s| s.port == port && (s.addr.is_none() || addr.is_none() || s.addr == addr))
    }

    fn udp_slot(
        &mut self,
        addr: Option<IpAddr>,
        port: u16,
        own: bool,
    ) -> Result<SocketHandle, UdpError> {
        let (limit, open) = match own {
            true => (
                MAX_OWN_UDP_SOCKETS,
                self.udp.values().filter(|s| s.own).count(),
            ),
            false => (
                MAX_UDP_SOCKETS,
                self.udp.values().filter(|s| !s.own).count(),
            ),
        };
        if open >= limit {
            return Err(UdpError::TooMany);
        }
        let port = match port {
            0 => {
                let span = (EPHEMERAL.end() - EPHEMERAL.start()) as u32 + 1;
                let mut port = self.next_udp_port;
                // Few ports are taken: a free one is near.
                while self.udp_taken(addr, port) {
                    port = EPHEMERAL.start()
                        + ((u32::from(port - EPHEMERAL.start()) + 1) % span) as u16;
                }
                self.next_udp_port =
                    EPHEMERAL.start() + ((u32::from(port - EPHEMERAL.start()) + 1) % span) as u16;
                port
            }
            p if self.udp_taken(addr, p) => return Err(UdpError::InUse),
            p => p,
        };
        let buffer = || {
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; UDP_QUEUE],
                vec![0; UDP_QUEUE * self.queues.mtu],
            )
        };
        let mut socket = udp::Socket::new(buffer(), buffer());
        let at = smoltcp::wire::IpListenEndpoint {
            addr: addr.map(ip_address),
            port,
        };
        socket.bind(at).map_err(|_| UdpError::TooMany)?;
        let handle = self.sockets.add(socket);
        self.udp.insert(handle, UdpSlot { addr, port, own });
        Ok(handle)
    }

    /// Queues `payload` to `to` (a member's overlay address) on UDP socket `handle`; it goes
    /// out at the next poll.
    pub fn udp_send(
        &mut self,
        handle: SocketHandle,
        to: SocketAddr,
        payload: &[u8],
    ) -> Result<(), UdpError> {
        if !self.is_overlay_peer(to.ip()) || to.port() == 0 {
            return Err(UdpError::NotOverlay);
        }
        if payload.len() > self.max_udp_payload(to.ip()) {
            return Err(UdpError::TooLarge);
        }
        let remote = IpEndpoint::new(ip_address(to.ip()), to.port());
        self.sockets
            .get_mut::<udp::Socket>(handle)
            .send_slice(payload, remote)
            .map_err(|_| UdpError::QueueFull)
    }

    /// The UDP socket behind `handle` (to receive, and to register wakers).
    pub fn udp(&mut self, handle: SocketHandle) -> &mut udp::Socket<'static> {
        self.sockets.get_mut::<udp::Socket>(handle)
    }

    /// Closes a UDP socket (what it still queued is dropped) and frees its port.
    pub fn udp_close(&mut self, handle: SocketHandle) {
        if self.udp.remove(&handle).is_some() {
            self.sockets.remove(handle);
        }
    }

    /// Open UDP sockets.
    pub fn udp_sockets(&self) -> usize {
        self.udp.len()
    }
}

/// A smoltcp endpoint as a socket address.
pub fn socket_addr(e: IpEndpoint) -> SocketAddr {
    let ip = match e.addr {
        IpAddress::Ipv4(v4) => IpAddr::V4(v4),
        IpAddress::Ipv6(v6) => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, e.port)
}

fn ip_address(ip: IpAddr) -> IpAddress {
    match ip {
        IpAddr::V4(v4) => IpAddress::Ipv4(v4),
        IpAddr::V6(v6) => IpAddress::Ipv6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Moves every packet each stack sent to the other, polling both, `rounds` times.
    fn pump(a: &mut NetStack, b: &mut NetStack, now: Instant, rounds: usize) {
        for _ in 0..rounds {
            a.poll(now);
            b.poll(now);
            while let Some(p) = a.take_packet() {
                assert!(b.receive(&p));
            }
            while let Some(p) = b.take_packet() {
                assert!(a.receive(&p));
            }
        }
    }

    fn pair() -> (NetStack, NetStack, Instant) {
        let now = Instant::now();
        let mut a = NetStack::new(1420, now, 1);
        let mut b = NetStack::new(1420, now, 2);
        a.set_ipv4(Ipv4Addr::new(100, 80, 0, 1), 16);
        b.set_ipv4(Ipv4Addr::new(100, 80, 0, 2), 16);
        (a, b, now)
    }

    #[test]
    fn a_connection_to_a_forwarded_port_carries_bytes_both_ways() {
        let (mut a, mut b, now) = pair();
        b.set_forwards(&[8080]);
        let h = a.connect("100.80.0.2:8080".parse().unwrap()).unwrap();
        pump(&mut a, &mut b, now, 4);
        assert_eq!(a.tcp(h).state(), tcp::State::Established);
        let accepted = b.accepted();
        assert_eq!(accepted.len(), 1);
        let (key, hb) = accepted[0];
        let forward = ListenKey {
            addr: None,
            port: 8080,
        };
        assert_eq!(key, forward);
        // The listener was replaced: a second client is accepted too.
        assert_eq!(b.listeners[&forward].len(), LISTEN_BACKLOG);
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let mut sent = 0;
        let mut got = Vec::new();
        let mut buf = vec![0; 65536];
        for _ in 0..1000 {
            if sent < data.len() {
                sent += a.tcp(h).send_slice(&data[sent..]).unwrap();
            }
            pump(&mut a, &mut b, now, 1);
            while let Ok(n @ 1..) = b.tcp(hb).recv_slice(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
            if got.len() == data.len() {
                break;
            }
        }
        assert_eq!(got, data);
        b.tcp(hb).send_slice(b"pong").unwrap();
        pump(&mut a, &mut b, now, 2);
        let n = a.tcp(h).recv_slice(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"pong");
        // Released with data unsent: it goes out before the FIN.
        a.tcp(h).send_slice(b"last words").unwrap();
        a.release(h);
        pump(&mut a, &mut b, now, 3);
        let n = b.tcp(hb).recv_slice(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"last words");
        assert!(!b.tcp(hb).may_recv());
        b.release(hb);
        pump(&mut a, &mut b, now, 3);
        assert_eq!((a.connections(), b.connections()), (0, 0));
    }

    #[test]
    fn a_burst_of_connections_beyond_the_backlog_is_accepted() {
        let (mut a, mut b, now) = pair();
        b.set_forwards(&[8080]);
        let n = 4 * LISTEN_BACKLOG;
        let hs: Vec<_> = (0..n)
            .map(|_| a.connect("100.80.0.2:8080".parse().unwrap()).unwrap())
            .collect();
        pump(&mut a, &mut b, now, 4);
        for h in hs {
            assert_eq!(a.tcp(h).state(), tcp::State::Established);
        }
        assert_eq!(b.accepted().len(), n);
        assert_eq!(b.connections(), n);
    }

    #[test]
    fn a_port_not_forwarded_is_refused() {
        let (mut a, mut b, now) = pair();
        b.set_forwards(&[8080]);
        let h = a.connect("100.80.0.2:9999".parse().unwrap()).unwrap();
        pump(&mut a, &mut b, now, 4);
        assert_eq!(a.tcp(h).state(), tcp::State::Closed);
        assert!(b.accepted().is_empty());
        // Removing the forward closes its listeners.
        b.set_forwards(&[]);
        let h = a.connect("100.80.0.2:8080".parse().unwrap()).unwrap();
        pump(&mut a, &mut b, now, 4);
        assert_eq!(a.tcp(h).state(), tcp::State::Closed);
    }

    #[test]
    fn the_daemons_own_listeners_and_sockets_take_one_address() {
        let (mut a, mut b, now) = pair();
        let own: IpAddr = "100.80.0.2".parse().unwrap();
        assert_eq!(
            b.listen("100.80.0.9".parse().unwrap(), 4747),
            Err(ListenError::NotHeld)
        );
        let key = b.listen(own, 4747).unwrap();
        assert_eq!(b.listen(own, 4747), Err(ListenError::InUse));
        assert!(
            b.forwards().is_empty(),
            "a listener of its own is no forward"
        );
        let h = a.connect("100.80.0.2:4747".parse().unwrap()).unwrap();
        pump(&mut a, &mut b, now, 4);
        assert_eq!(a.tcp(h).state(), tcp::State::Established);
        let accepted = b.accepted();
        assert_eq!(accepted.len(), 1);
        assert_eq!(accepted[0].0, key);
        b.unlisten(key);
        let h = a.connect("100.80.0.2:4747".parse().unwrap()).unwrap();
        pump(&mut a, &mut b, now, 4);
        assert_eq!(a.tcp(h).state(), tcp::State::Closed);
        // The daemon's own UDP sockets are bounded apart from the proxies' and forwards'.
        for _ in 0..MAX_UDP_SOCKETS {
            b.udp_open().unwrap();
        }
        assert_eq!(b.udp_open(), Err(UdpError::TooMany));
        let hb = b.udp_bind_own(own, 4747).unwrap();
        assert_eq!(b.udp_bind_own(own, 4747), Err(UdpError::InUse));
        assert_eq!(
            b.udp_bind_own("100.80.0.9".parse().unwrap(), 4747),
            Err(UdpError::NotHeld)
        );
        let ha = a.udp_bind_own("100.80.0.1".parse().unwrap(), 0).unwrap();
        a.udp_send(ha, "100.80.0.2:4747".parse().unwrap(), b"hi")
            .unwrap();
        pump(&mut a, &mut b, now, 3);
        let mut buf = [0u8; 64];
        let (n, meta) = b.udp(hb).recv_slice(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hi");
        assert_eq!(
            socket_addr(meta.endpoint).ip(),
            "100.80.0.1".parse::<IpAddr>().unwrap()
        );
        for _ in 1..MAX_OWN_UDP_SOCKETS {
            b.udp_bind_own(own, 0).unwrap();
        }
        assert_eq!(b.udp_bind_own(own, 0), Err(UdpError::TooMany));
    }

    #[test]
    fn only_overlay_addresses_are_dialled() {
        let (mut a, _, _) = pair();
        for to in [
            "8.8.8.8:53",
            "100.80.0.1:80",
            "100.80.0.0:80",
            "100.80.255.255:80",
            "[::1]:80",
        ] {
            assert_eq!(
                a.connect(to.parse().unwrap()),
                Err(ConnectError::NotOverlay),
                "{to}"
            );
        }
        assert!(a.connect("100.80.7.9:80".parse().unwrap()).is_ok());
        let mut none = NetStack::new(1420, Instant::now(), 3);
        assert_eq!(
            none.connect("100.80.7.9:80".parse().unwrap()),
            Err(ConnectError::NotOverlay)
        );
    }

    #[test]
    fn connections_are_bounded() {
        let (mut a, _, _) = pair();
        for _ in 0..MAX_CONNECTIONS {
            a.connect("100.80.0.2:80".parse().unwrap()).unwrap();
        }
        assert_eq!(
            a.connect("100.80.0.2:80".parse().unwrap()),
            Err(ConnectError::TooMany)
        );
    }

    #[test]
    fn udp_datagrams_go_to_members_and_answers_come_back() {
        let (mut a, mut b, now) = pair();
        let ha = a.udp_open().unwrap();
        let hb = b.udp_open().unwrap();
        let pb = b.udp[&hb].port;
        let to: SocketAddr = SocketAddr::new("100.80.0.2".parse().unwrap(), pb);
        a.udp_send(ha, to, b"ping").unwrap();
        let big = vec![7u8; a.max_udp_payload(to.ip())];
        a.udp_send(ha, to, &big).unwrap();
        pump(&mut a, &mut b, now, 3);
        let mut buf = [0u8; 2048];
        let (n, meta) = b.udp(hb).recv_slice(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        let from = socket_addr(meta.endpoint);
        assert_eq!(from.ip(), "100.80.0.1".parse::<IpAddr>().unwrap());
        let (n, _) = b.udp(hb).recv_slice(&mut buf).unwrap();
        assert_eq!(&buf[..n], &big[..]);
        b.udp_send(hb, from, b"pong").unwrap();
        pump(&mut a, &mut b, now, 3);
        let (n, meta) = a.udp(ha).recv_slice(&mut buf).unwrap();
        assert_eq!((&buf[..n], socket_addr(meta.endpoint)), (&b"pong"[..], to));
        // One byte more than fits one packet, outside the overlay, to this node: refused.
        assert_eq!(
            a.udp_send(ha, to, &vec![0; big.len() + 1]),
            Err(UdpError::TooLarge)
        );
        for bad in ["8.8.8.8:53", "100.80.0.1:53", "100.80.0.2:0"] {
            assert_eq!(
                a.udp_send(ha, bad.parse().unwrap(), b"x"),
                Err(UdpError::NotOverlay),
                "{bad}"
            );
        }
        // The queue is bounded: datagrams beyond it are refused until the stack sends.
        let mut queued = 0;
        let refused = loop {
            match a.udp_send(ha, to, &big) {
                Ok(()) => queued += 1,
                Err(e) => break e,
            }
            assert!(queued <= UDP_QUEUE, "more than UDP_QUEUE datagrams queued");
        };
        assert_eq!(refused, UdpError::QueueFull);
        // (The payload ring may waste its end on one datagram that would wrap.)
        assert!(queued >= UDP_QUEUE - 1, "only {queued} datagrams queued");
        pump(&mut a, &mut b, now, 3);
        assert!(a.udp_send(ha, to, &big).is_ok());
        // Closed: what comes to its port is answered "port unreachable", received by nobody.
        b.udp_close(hb);
        assert_eq!(b.udp_sockets(), 0);
        a.udp_send(ha, to, b"late").unwrap();
        pump(&mut a, &mut b, now, 3);
        assert!(a.udp(ha).recv_slice(&mut buf).is_err());
    }

    #[test]
    fn udp_sockets_are_bounded_and_take_distinct_ports() {
        let (mut a, _, _) = pair();
        let hs: Vec<_> = (0..MAX_UDP_SOCKETS)
            .map(|_| a.udp_open().unwrap())
            .collect();
        assert_eq!(a.udp_open(), Err(UdpError::TooMany));
        let mut ports: Vec<u16> = a.udp.values().map(|s| s.port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), MAX_UDP_SOCKETS);
        a.udp_close(hs[3]);
        assert!(a.udp_open().is_ok());
        let (mut b, _, _) = pair();
        let h = b.udp_bind(5353).unwrap();
        assert_eq!(b.udp_bind(5353), Err(UdpError::InUse));
        assert_eq!(b.udp_bind(0), Err(UdpError::InUse));
        b.udp_close(h);
        assert!(b.udp_bind(5353).is_ok());
    }

    #[test]
    fn garbage_from_the_overlay_is_dropped() {
        let (mut a, mut b, now) = pair();
        b.set_forwards(&[8080]);
        for junk in [
            &[][..],
            &[0x45][..],
            &[0x45; 40][..],
            &[0x60; 60][..],
            &[0xff; 1400][..],
        ] {
            assert!(b.receive(junk));
        }
        pump(&mut a, &mut b, now, 2);
        assert!(b.accepted().is_empty());
        let mut full = NetStack::new(1420, now, 4);
        for _ in 0..RX_QUEUE {
            assert!(full.receive(&[0]));
        }
        assert!(!full.receive(&[0]));
    }
}
