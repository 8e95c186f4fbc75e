//! The I/O contracts of a node, narrow as wireguard-go's `conn.Bind` and `tun.Device`: a UDP
//! transport (batched receive with the segment size, batched send with a segment size), a TUN
//! device (batched read of packets, batched write), the underlay's addresses, and the stream the
//! control channel runs over. A [`Platform`] opens one of each for a session.
//!
//! The real implementations ([`kernel`]: tokio sockets with UDP GSO/GRO, tun-rs with offload,
//! netlink) and in-memory fakes ([`fake`]: a channel TUN and a switched network with loss,
//! latency, reordering and NAT) sit side by side; the packet path is generic over them, so the
//! real one pays no dynamic dispatch.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncWrite};

pub mod fake;
pub mod kernel;
pub mod netconf;
pub mod state;
pub mod userspace;

/// Datagrams received in one call: `len` bytes at the start of the caller's buffer, in
/// datagrams of `segment` bytes each (the last may be shorter; one datagram: `segment == len`),
/// all from `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub segment: usize,
    pub from: SocketAddr,
}

/// The node's one UDP socket.
pub trait UdpTransport: Send + Sync + 'static {
    /// Receives without waiting: `Ok(None)` when nothing is queued. An `Err` is about one
    /// datagram (an ICMP error from an earlier send, say); the next call may succeed.
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<Received>>;

    /// Resolves when [`try_recv`](Self::try_recv) may have something.
    fn readable(&self) -> impl Future<Output = ()> + Send;

    /// Sends `data` to `to` as datagrams of `segment` bytes (the last may be shorter) in one
    /// call: at most [`max_segments`](Self::max_segments) of them. `segment == data.len()` is
    /// one datagram. A transport that cannot segment after all sends them one by one itself.
    fn send(
        &self,
        data: &[u8],
        segment: usize,
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Sends one datagram with the IP TTL (IPv6: hop limit) `ttl` instead of the socket's.
    fn send_ttl(
        &self,
        data: &[u8],
        to: SocketAddr,
        ttl: u8,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// The most datagrams one [`send`](Self::send) takes (1 without GSO); may drop to 1 when
    /// the kernel refuses segmentation.
    fn max_segments(&self) -> usize;
}

/// The overlay's TUN device. Each loop that reads or writes it takes its own half, which owns
/// that loop's scratch space (an offload read's super-packet, a write's coalescing table).
pub trait TunDevice: Send + Sync + 'static {
    type Reader: TunReader;
    type Writer: TunWriter;
    fn reader(&self) -> Self::Reader;
    fn writer(&self) -> Self::Writer;
}

pub trait TunReader: Send + 'static {
    /// Waits for packets: one, or the segments of a GSO super-packet, each at
    /// `bufs[i][..sizes[i]]`; returns how many. The buffers are slices (of one allocation, in
    /// the packet loop), so that the pages of those a read never fills stay untouched.
    fn read(
        &mut self,
        bufs: &mut [&mut [u8]],
        sizes: &mut [usize],
    ) -> impl Future<Output = io::Result<usize>> + Send;
}

pub trait TunWriter: Send + 'static {
    /// Writes the packets `bufs[i][offset..]` (the room before `offset` is the device's, for a
    /// virtio-net header), coalescing what it can.
    fn write(
        &mut self,
        bufs: &mut [Vec<u8>],
        offset: usize,
    ) -> impl Future<Output = io::Result<()>> + Send;
}

/// The host's network as the node sees it: its own addresses and the overlay interface's one.
pub trait Underlay: Send + Sync + 'static {
    /// This host's IPv4 addresses (loopback, link-local and the overlay interface's left out).
    fn local_ipv4(&self) -> impl Future<Output = Vec<Ipv4Addr>> + Send;

    /// This host's IPv6 addresses a node publishes (global and unique-local; never
    /// link-local), if its UDP socket serves IPv6; none by default.
    fn local_ipv6(&self) -> impl Future<Output = Vec<Ipv6Addr>> + Send {
        async { Vec::new() }
    }

    /// Gives the overlay interface `ip/prefix_len` (instead of its address before) and brings
    /// it up.
    fn set_overlay_address(
        &self,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// Gives the overlay interface the IPv6 overlay address `ip/prefix_len` (instead of any
    /// other it had but link-local ones); the prefix route comes with it. The fakes ignore it
    /// (their tunnel carries what the daemon writes, whatever the address).
    fn set_overlay_address6(
        &self,
        ip: Ipv6Addr,
        prefix_len: u8,
    ) -> impl Future<Output = Result<(), String>> + Send {
        let _ = (ip, prefix_len);
        async { Ok(()) }
    }

    /// The IPv4 default gateway (where a port-mapping server would be), if there is one. The
    /// fakes have none.
    fn gateway_ipv4(&self) -> impl Future<Output = Option<Ipv4Addr>> + Send {
        async { None }
    }
}

/// Opens the control channel's byte stream to a coordinator.
pub trait Connector: Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The addresses an endpoint (`host:port`) names.
    fn resolve(&self, endpoint: &str) -> impl Future<Output = io::Result<Vec<SocketAddr>>> + Send;

    fn connect(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// The overlay address's own sockets, for what a2ad itself serves to members and asks of them
/// over the overlay (the service lists, the policy's exchange): kernel sockets on the TUN
/// device's address ([`kernel::KernelOverlay`]), or sockets on the userspace stack
/// ([`userspace::StackOverlay`]). Narrow on purpose: listen on an address and accept streams,
/// send and receive datagrams, dial a member.
pub trait OverlayNet: Clone + Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Listener: OverlayListener<Stream = Self::Stream>;
    type Datagrams: OverlayDatagrams;

    /// Listens for TCP connections on `addr` (one of this node's overlay addresses).
    fn listen(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Listener>> + Send;

    /// A UDP socket on `addr` (one of this node's overlay addresses; port 0: a free one).
    fn bind_udp(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = io::Result<Self::Datagrams>> + Send;

    /// A TCP connection to `to`, a member's overlay address.
    fn connect(&self, to: SocketAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

pub trait OverlayListener: Send + Sync + 'static {
    type Stream;

    /// The next connection and who opened it.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
}

pub trait OverlayDatagrams: Send + Sync + 'static {
    /// The next datagram: its length at the start of `buf`, and the sender.
    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send;

    fn send_to(&self, data: &[u8], to: SocketAddr) -> impl Future<Output = io::Result<()>> + Send;
}

/// Which fast paths a session's I/O has (shown as the `fast_*` counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FastPaths {
    pub tun_offload: bool,
    pub udp_gso: bool,
    pub udp_gro: bool,
}

/// The I/O of one session.
pub struct SessionIo<P: Platform> {
    pub udp: P::Udp,
    pub tun: P::Tun,
    pub underlay: P::Underlay,
    /// The overlay address's sockets, for the daemon's own member-to-member services.
    pub overlay: P::Overlay,
    pub fast: FastPaths,
}

/// What a session needs from the host: the real kernel, or an in-memory fake.
pub trait Platform: Send + Sync + 'static {
    type Udp: UdpTransport;
    type Tun: TunDevice;
    type Underlay: Underlay;
    type Connector: Connector;
    type Overlay: OverlayNet;

    /// Opens the UDP socket on `udp_port` and the TUN device `interface`, addressed
    /// `ip/prefix_len`. Errors say what failed and what to do; on error nothing is left open.
    fn open(
        &self,
        interface: &str,
        udp_port: u16,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> impl Future<Output = Result<SessionIo<Self>, String>> + Send
    where
        Self: Sized;

    /// How this host reaches coordinators.
    fn connector(&self) -> Self::Connector;

    /// Told once a session runs: who the node is and whom it knows (the userspace platform's
    /// proxies resolve `NAME.a2a` from it). The kernel's needs nothing: programs use the TUN
    /// device and the resolver.
    fn attach(&self, session: SessionView) {
        let _ = session;
    }

    /// Whether the overlay ends in this process (a userspace stack), so that members reach this
    /// host's programs through forwards (`a2actl forward add`), not a TUN device.
    fn userspace(&self) -> bool {
        false
    }

    /// The forwards to serve from now on (the userspace platform's; the others have none).
    fn set_forwards(&self, forwards: &[a2a_proto::api::Forward]) {
        let _ = forwards;
    }
}

/// A running session as its platform sees it.
#[derive(Clone)]
pub struct SessionView {
    pub name: String,
    pub peers: std::sync::Arc<crate::core::peers::PeerTable>,
    pub counters: std::sync::Arc<crate::core::counters::Counters>,
    /// The overlay resolver's address (never a member's).
    pub dns_ip: Ipv4Addr,
    /// This node's IPv4 overlay address, as the coordinator last assigned it.
    pub ip: tokio::sync::watch::Receiver<Ipv4Addr>,
}
