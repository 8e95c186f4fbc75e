//! The real I/O: a tokio UDP socket with UDP GSO/GRO, a tun-rs TUN device with offload
//! (virtio-net header, GSO split on read, GRO coalescing on write), netlink, TCP.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::Interest;
use tokio::net::{TcpStream, UdpSocket};
use tun_rs::{AsyncDevice, GROTable, VIRTIO_NET_HDR_LEN};

use super::netconf::NetConf;
use super::{
    Connector, FastPaths, Platform, Received, SessionIo, TunDevice, TunReader, TunWriter,
    UdpTransport, Underlay,
};
use crate::core::wg::OVERLAY_MTU;
use a2a_udpbatch as udpbatch;

/// Largest datagram or packet handled.
const BUF_LEN: usize = 65536;

/// The host's kernel: what `a2ad` runs on.
pub struct Kernel;

impl Platform for Kernel {
    type Udp = KernelUdp;
    type Tun = KernelTun;
    type Underlay = KernelUnderlay;
    type Connector = TcpConnector;
    type Overlay = KernelOverlay;

    async fn open(
        &self,
        interface: &str,
        udp_port: u16,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<SessionIo<Self>, String> {
        let (udp, dual) = bind_udp(udp_port).await?;
        let fast = allowed("A2A_TUN_OFFLOAD");
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(interface)
                .mtu(OVERLAY_MTU)
                .offload(offload)
                .build_async()
        };
        let tun = match build(fast) {
            Ok(t) => t,
            Err(e) if fast => {
                tracing::warn!("TUN offload unavailable ({e}); using one packet per read/write");
                build(false).map_err(|e| tun_error(interface, e))?
            }
            Err(e) => return Err(tun_error(interface, e)),
        };
        let tun_offload = tun.tcp_gso();
        let (udp_gso, udp_gro) = (udp.gso.load(Ordering::Relaxed), udp.gro);
        tracing::info!(
            "data path: UDP {}, TUN offload {}, UDP GSO {}, UDP GRO {}",
            if dual { "IPv4 and IPv6" } else { "IPv4 only" },
            on_off(tun_offload),
            on_off(udp_gso),
            on_off(udp_gro)
        );
        let netconf = NetConf::new().map_err(|e| format!("cannot open netlink: {e}"))?;
        let tun_index = netconf
            .link_index(interface)
            .await
            .map_err(|e| e.to_string())?;
        let underlay = KernelUnderlay {
            netconf,
            tun_index,
            interface: interface.to_string(),
            ipv6: dual,
        };
        underlay.set_overlay_address(ip, prefix_len).await?;
        Ok(SessionIo {
            udp,
            tun: KernelTun(Arc::new(tun)),
            underlay,
            overlay: KernelOverlay,
            fast: FastPaths {
                tun_offload,
                udp_gso,
                udp_gro,
            },
        })
    }

    fn connector(&self) -> TcpConnector {
        TcpConnector
    }
}

/// The overlay address's sockets as the kernel's: the TUN device holds the address.
#[derive(Clone, Copy, Default)]
pub struct KernelOverlay;

impl super::OverlayNet for KernelOverlay {
    type Stream = TcpStream;
    type Listener = tokio::net::TcpListener;
    type Datagrams = UdpSocket;

    async fn listen(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::bind(addr).await
    }

    async fn bind_udp(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        UdpSocket::bind(addr).await
    }

    async fn connect(&self, to: SocketAddr) -> io::Result<TcpStream> {
        TcpStream::connect(to).await
    }
}

impl super::OverlayListener for tokio::net::TcpListener {
    type Stream = TcpStream;

    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        tokio::net::TcpListener::accept(self).await
    }
}

impl super::OverlayDatagrams for UdpSocket {
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        UdpSocket::recv_from(self, buf).await
    }

    async fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        UdpSocket::send_to(self, data, to).await.map(drop)
    }
}

/// Binds the node's UDP socket on `udp_port` (IPv6 and IPv4, or IPv4 only where the host has
/// no IPv6), with UDP GSO and GRO where the kernel has them; whether it serves IPv6 too. Needs
/// no privilege (a port below 1024 aside).
pub async fn bind_udp(udp_port: u16) -> Result<(KernelUdp, bool), String> {
    let in_use = |e: io::Error| {
        format!(
            "cannot bind UDP port {udp_port}: {e} (is another a2ad or WireGuard using it? \
             start a2ad with --port)"
        )
    };
    // One socket for both families; IPv4 only where the host has no IPv6.
    // `A2A_UDP_IPV6=0`: an IPv4 socket even where the host has IPv6.
    let ipv6 = std::env::var("A2A_UDP_IPV6").map_or(true, |v| v != "0");
    let dual_socket = if ipv6 {
        udpbatch::bind_dual_stack(udp_port)
    } else {
        Err(io::Error::other("A2A_UDP_IPV6=0"))
    };
    let (socket, dual) = match dual_socket {
        Ok(s) => (UdpSocket::from_std(s).map_err(in_use)?, true),
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => return Err(in_use(e)),
        Err(e) => {
            tracing::info!("no IPv6 UDP socket ({e}); serving IPv4 only");
            let s = UdpSocket::bind(("0.0.0.0", udp_port))
                .await
                .map_err(in_use)?;
            (s, false)
        }
    };
    let fd = socket.as_raw_fd();
    udpbatch::set_buffers(fd);
    let udp_gso = allowed("A2A_UDP_GSO") && udpbatch::gso_supported(fd);
    let gro = allowed("A2A_UDP_GRO") && udpbatch::enable_gro(fd);
    let udp = KernelUdp {
        socket,
        dual,
        gso: AtomicBool::new(udp_gso),
        gro,
    };
    Ok((udp, dual))
}

/// The offloads (TUN virtio-net header, UDP GSO/GRO) are used unless `A2A_OFFLOAD=0`, or the
/// one named (`A2A_TUN_OFFLOAD`, `A2A_UDP_GSO`, `A2A_UDP_GRO`) is `0`.
fn allowed(name: &str) -> bool {
    let off = |k: &str| std::env::var(k).is_ok_and(|v| v == "0");
    !off("A2A_OFFLOAD") && !off(name)
}

pub(crate) fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn tun_error(interface: &str, e: io::Error) -> String {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return format!(
            "cannot create TUN device {interface}: /dev/net/tun does not exist; load the tun \
             module (`modprobe tun`) or, in a container, pass the device through (--device /dev/net/tun)"
        );
    }
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "cannot create TUN device {interface}: permission denied; a2ad needs root or \
             CAP_NET_ADMIN, or runs without either as `a2ad --userspace` (proxies and forwards \
             instead of an interface)"
        ),
        Some(libc::EBUSY) => format!(
            "cannot create TUN device {interface}: it is in use by another program; start a2ad with --interface"
        ),
        _ => format!("cannot create TUN device {interface}: {e}"),
    }
}

/// The UDP socket, with UDP GRO on receive and UDP GSO on send where the kernel has them.
pub struct KernelUdp {
    socket: UdpSocket,
    /// An IPv6 socket serving IPv4 too: IPv4 destinations are sent to as IPv4-mapped.
    dual: bool,
    /// Cleared for good when the kernel or the outgoing device refuses segmentation.
    gso: AtomicBool,
    /// UDP GRO was turned on at bind.
    gro: bool,
}

impl KernelUdp {
    /// Whether UDP GSO and UDP GRO are on.
    pub fn fast(&self) -> (bool, bool) {
        (self.gso.load(Ordering::Relaxed), self.gro)
    }
}

impl UdpTransport for KernelUdp {
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        let fd = self.socket.as_raw_fd();
        match self
            .socket
            .try_io(Interest::READABLE, || udpbatch::recv_segments(fd, buf))
        {
            Ok((len, from, segment)) => Ok(Some(Received { len, segment, from })),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn readable(&self) {
        let _ = self.socket.readable().await;
    }

    async fn send(&self, data: &[u8], segment: usize, to: SocketAddr) -> io::Result<()> {
        let to = match to {
            SocketAddr::V4(v4) if self.dual => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            SocketAddr::V6(_) if !self.dual => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "an IPv6 destination on an IPv4-only socket",
                ))
            }
            _ => to,
        };
        if data.len() <= segment {
            return self.socket.send_to(data, to).await.map(drop);
        }
        if self.gso.load(Ordering::Relaxed) {
            let fd = self.socket.as_raw_fd();
            let sent = self
                .socket
                .async_io(Interest::WRITABLE, || {
                    udpbatch::send_segments(fd, data, segment as u16, to)
                })
                .await;
            match sent {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) => {
                    // The kernel or the outgoing device cannot segment: stop trying.
                    tracing::warn!("UDP GSO send failed ({e}); sending one datagram per call");
                    self.gso.store(false, Ordering::Relaxed);
                }
                // Any other failure (EMSGSIZE when the route's MTU is below the segment size,
                // which GSO cannot fragment; a firewall's EPERM): send the datagrams one by
                // one, so each fares as it would have without GSO (fragmented, or counted).
                Err(_) => {}
            }
        }
        let mut result = Ok(());
        for d in data.chunks(segment) {
            if let Err(e) = self.socket.send_to(d, to).await {
                result = Err(e);
            }
        }
        result
    }

    async fn send_ttl(&self, data: &[u8], to: SocketAddr, ttl: u8) -> io::Result<()> {
        let fd = self.socket.as_raw_fd();
        self.socket
            .async_io(Interest::WRITABLE, || {
                udpbatch::send_with_ttl(fd, data, to, ttl)
            })
            .await
            .map(drop)
    }

    fn max_segments(&self) -> usize {
        if self.gso.load(Ordering::Relaxed) {
            udpbatch::MAX_SEGMENTS
        } else {
            1
        }
    }
}

/// The TUN device (tun-rs), shared by its reading and writing halves.
pub struct KernelTun(Arc<AsyncDevice>);

impl TunDevice for KernelTun {
    type Reader = KernelTunReader;
    type Writer = KernelTunWriter;

    fn reader(&self) -> KernelTunReader {
        KernelTunReader {
            dev: self.0.clone(),
            original: vec![0u8; VIRTIO_NET_HDR_LEN + BUF_LEN],
        }
    }

    fn writer(&self) -> KernelTunWriter {
        KernelTunWriter {
            dev: self.0.clone(),
            gro: None,
        }
    }
}

pub struct KernelTunReader {
    dev: Arc<AsyncDevice>,
    /// What one read returns before it is split: a super-packet with its virtio-net header.
    original: Vec<u8>,
}

/// Room a read must leave for one more read: the segments of the largest super-packet (64 KiB
/// of TCP at the smallest MSS the overlay MTU gives, 1 360 bytes over IPv6: 49).
const SEGMENTS_PER_READ: usize = 64;

impl TunReader for KernelTunReader {
    /// Waits for a packet, then takes what else is queued without waiting, while a whole
    /// super-packet still fits: UDP comes one datagram per read (no UDP offload on the TUN
    /// device), so a burst becomes one batch for the send path instead of a wakeup and a send
    /// per datagram. A lone packet costs nothing more: the read that finds the queue empty
    /// is the one the next wait would make.
    async fn read(&mut self, bufs: &mut [&mut [u8]], sizes: &mut [usize]) -> io::Result<usize> {
        let mut n = self
            .dev
            .recv_multiple(&mut self.original, bufs, sizes, 0)
            .await?;
        while bufs.len().min(sizes.len()) - n >= SEGMENTS_PER_READ {
            match self
                .dev
                .try_recv_multiple(&mut self.original, &mut bufs[n..], &mut sizes[n..], 0)
            {
                Ok(k) => n += k,
                // Nothing more queued. (Any other failure dropped that one packet, as a read
                // of its own would have; the packets already read go on.)
                Err(_) => break,
            }
        }
        Ok(n)
    }
}

pub struct KernelTunWriter {
    dev: Arc<AsyncDevice>,
    /// Made at the first write: a table preallocates 2 × 128 item lists (about 1 MiB touched),
    /// and of the three writers (the two packet loops and the control connection's relay
    /// reader) an idle node writes with one at most.
    gro: Option<GROTable>,
}

impl TunWriter for KernelTunWriter {
    /// TCP is coalesced into super-packets; UDP is written one datagram per write. Coalesced
    /// UDP reaches a socket without UDP GRO as one burst of datagrams, which overflowed a
    /// default receive buffer (iperf3's server lost 98 000 of the 296 000 datagrams a2ad had
    /// delivered, at 1.1 Gbit/s offered); one write each delivers them as a NIC would, paced
    /// by the writes.
    async fn write(&mut self, bufs: &mut [Vec<u8>], offset: usize) -> io::Result<()> {
        let vnet_hdr = self.dev.tcp_gso();
        let udp_from = if vnet_hdr && self.dev.udp_gso() {
            // Stable: each flow's packets keep their order.
            bufs.sort_by_key(|b| is_udp(b.get(offset..).unwrap_or_default()));
            bufs.partition_point(|b| !is_udp(b.get(offset..).unwrap_or_default()))
        } else {
            bufs.len()
        };
        let (coalesced, single) = bufs.split_at_mut(udp_from);
        let mut result = Ok(());
        if !coalesced.is_empty() {
            result = self
                .dev
                .send_multiple(
                    self.gro.get_or_insert_with(GROTable::default),
                    coalesced,
                    offset,
                )
                .await
                .map(drop);
        }
        for b in single {
            let Some(start) = offset.checked_sub(VIRTIO_NET_HDR_LEN) else {
                break;
            };
            // A virtio-net header of zeros: one whole packet, its checksum already complete.
            b[start..offset].fill(0);
            if let Err(e) = self.dev.send(&b[start..]).await {
                result = Err(e);
            }
        }
        result
    }
}

/// Whether an IP packet carries UDP right after its fixed header (what tun-rs would coalesce).
fn is_udp(packet: &[u8]) -> bool {
    const UDP: u8 = 17;
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(9) == Some(&UDP),
        Some(6) => packet.get(6) == Some(&UDP),
        _ => false,
    }
}

/// Netlink, for the overlay interface's address and the host's addresses.
pub struct KernelUnderlay {
    netconf: NetConf,
    tun_index: u32,
    interface: String,
    /// The UDP socket serves IPv6: the host's IPv6 addresses are candidates.
    ipv6: bool,
}

impl Underlay for KernelUnderlay {
    async fn local_ipv4(&self) -> Vec<Ipv4Addr> {
        self.netconf
            .local_ipv4(Some(self.tun_index))
            .await
            .unwrap_or_default()
    }

    async fn local_ipv6(&self) -> Vec<Ipv6Addr> {
        if !self.ipv6 {
            return Vec::new();
        }
        self.netconf
            .local_ipv6(Some(self.tun_index))
            .await
            .unwrap_or_default()
    }

    async fn set_overlay_address(&self, ip: Ipv4Addr, prefix_len: u8) -> Result<(), String> {
        // The overlay resolver's address too (its sockets bind there: tasks/dns.rs).
        let prefix = ipnet::Ipv4Net::new(ip, prefix_len)
            .map_err(|e| format!("overlay prefix /{prefix_len}: {e}"))?
            .trunc();
        let dns = a2a_proto::overlay::dns_ip(prefix);
        self.netconf
            .configure(self.tun_index, ip, prefix_len, Some(dns))
            .await
            .map_err(|e| format!("cannot configure {}: {e}", self.interface))
    }

    async fn set_overlay_address6(&self, ip: Ipv6Addr, prefix_len: u8) -> Result<(), String> {
        self.netconf
            .configure6(self.tun_index, ip, prefix_len)
            .await
            .map_err(|e| {
                format!(
                    "cannot give {} its IPv6 overlay address {ip}: {e} (is IPv6 disabled? \
                     sysctl net.ipv6.conf.all.disable_ipv6=0); IPv4 works without it",
                    self.interface
                )
            })
    }

    async fn gateway_ipv4(&self) -> Option<Ipv4Addr> {
        // Bounded: the routing table of a host, read once.
        let table = tokio::fs::read_to_string("/proc/net/route").await.ok()?;
        default_gateway(&table)
    }
}

/// The gateway of the first IPv4 default route in `/proc/net/route` (its hex fields are the
/// address's network-order bytes read as a native-endian number).
pub fn default_gateway(table: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
            return None;
        }
        let flags = u32::from_str_radix(f[3], 16).ok()?;
        if flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY {
            return None;
        }
        let gw = u32::from_str_radix(f[2], 16).ok()?;
        let ip = Ipv4Addr::from(gw.to_ne_bytes());
        (!ip.is_unspecified()).then_some(ip)
    })
}

/// TCP to the coordinator, with Nagle off (the control channel's messages are small).
pub struct TcpConnector;

impl Connector for TcpConnector {
    type Stream = TcpStream;

    async fn resolve(&self, endpoint: &str) -> io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host(endpoint).await?.collect())
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let s = TcpStream::connect(addr).await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_gateway_is_read_from_the_route_table() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        if cfg!(target_endian = "little") {
            assert_eq!(default_gateway(table), Some(Ipv4Addr::new(192, 168, 2, 1)));
        }
        assert_eq!(default_gateway("Iface\tDestination\n"), None);
        assert_eq!(default_gateway("garbage\nx y z\n"), None);
    }
}
