//! UDP batching on Linux, for a2ad's data plane and the coordinator's relay: one `sendmsg`
//! carries many equal-sized datagrams to one address (UDP_SEGMENT, "UDP GSO"), one `recvmsg`
//! returns many datagrams of one sender coalesced by the kernel (UDP_GRO), and several sockets
//! share a port (SO_REUSEPORT) so that each core has a receive loop of its own. Both offloads
//! are probed at start-up; without them every datagram is its own call.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{FromRawFd, RawFd};

/// Most segments in one UDP GSO send (the kernel's UDP_MAX_SEGMENTS is 64 on older kernels).
pub const MAX_SEGMENTS: usize = 64;
/// Most bytes in one UDP GSO send (an IPv4 datagram's payload limit, with room for headers).
pub const MAX_GSO_BYTES: usize = 65000;

fn set_int(fd: RawFd, level: libc::c_int, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &value as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to coalesce received datagrams (UDP_GRO); false if it cannot.
pub fn enable_gro(fd: RawFd) -> bool {
    set_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok()
}

/// True if the kernel knows UDP_SEGMENT (probed as wireguard-go does, with getsockopt).
pub fn gso_supported(fd: RawFd) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` live across the call; `len` is `value`'s size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            &mut value as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    rc == 0
}

fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Room for one cmsg carrying an int (UDP_GRO) or a u16 (UDP_SEGMENT), 8-byte aligned.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Sends `buf` to `addr` as datagrams of `segment` bytes (the last may be shorter) in one call.
/// Non-blocking: WouldBlock when the socket buffer is full.
pub fn send_segments(fd: RawFd, buf: &[u8], segment: u16, addr: SocketAddr) -> io::Result<usize> {
    send_with_cmsg(fd, buf, addr, libc::SOL_UDP, libc::UDP_SEGMENT, segment)
}

/// Sends one datagram `buf` to `addr` with the IP TTL (IPv6: hop limit) `ttl` instead of the
/// socket's, as a control message, so other sends on the socket keep theirs. An IPv4
/// destination (also one written as IPv4-mapped IPv6 on a dual-stack socket) takes `IP_TTL`,
/// an IPv6 one `IPV6_HOPLIMIT`. Non-blocking: WouldBlock when the socket buffer is full.
pub fn send_with_ttl(fd: RawFd, buf: &[u8], addr: SocketAddr, ttl: u8) -> io::Result<usize> {
    let v4 = match addr {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let (level, kind) = if v4 {
        (libc::IPPROTO_IP, libc::IP_TTL)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT)
    };
    send_with_cmsg(fd, buf, addr, level, kind, libc::c_int::from(ttl))
}

/// One `sendmsg` of `buf` to `addr` with one control message (`level`, `kind`, `value`).
fn send_with_cmsg<T: Copy>(
    fd: RawFd,
    buf: &[u8],
    addr: SocketAddr,
    level: libc::c_int,
    kind: libc::c_int,
    value: T,
) -> io::Result<usize> {
    const { assert!(size_of::<T>() <= 8) };
    let (mut name, name_len) = to_sockaddr(addr);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = CmsgBuf([0; 64]);
    // SAFETY: msghdr is plain data; every pointer in it refers to a local that outlives the call,
    // and the one cmsg written lies within `control` (CMSG_SPACE(8) <= 64).
    unsafe {
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = &mut name as *mut _ as *mut libc::c_void;
        msg.msg_namelen = name_len;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<T>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<T>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut T, value);
        let n = libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Receives into `buf`: (bytes, sender, segment size). With UDP_GRO the bytes may be several
/// datagrams of `segment` bytes each (the last may be shorter); else `segment` is the length.
/// Non-blocking: WouldBlock when nothing is queued.
pub fn recv_segments(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut name: libc::sockaddr_storage = unsafe { zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = CmsgBuf([0; 64]);
    // SAFETY: as in `send_segments`; the kernel writes at most msg_controllen bytes of cmsgs and
    // msg_namelen bytes of address, and the CMSG_* walk stays within what it wrote.
    unsafe {
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = &mut name as *mut _ as *mut libc::c_void;
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = control.0.len() as _;
        let n = libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated"));
        }
        let mut segment = n;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                let s = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int);
                if s > 0 {
                    segment = s as usize;
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        let from = from_sockaddr(&name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no sender address"))?;
        Ok((n, from, segment.max(1)))
    }
}

/// The receive and send buffer a UDP socket asks for, as wireguard-go's: a burst (fifty nodes'
/// handshakes reaching the coordinator at once, a GRO batch the reader has not taken yet)
/// waits there instead of being dropped; the default (`net.core.rmem_default`, about 208 KiB)
/// holds some 270 small datagrams.
pub const SOCKET_BUFFER: usize = 7 << 20;

/// Asks for [`SOCKET_BUFFER`] bytes of receive and send buffer: beyond `net.core.rmem_max` /
/// `wmem_max` when the process may (`SO_RCVBUFFORCE`, CAP_NET_ADMIN), else as much as they
/// allow. Never fails: a smaller buffer only drops more of a burst.
pub fn set_buffers(fd: RawFd) {
    let size = SOCKET_BUFFER as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if set_int(fd, libc::SOL_SOCKET, force, size).is_err() {
            let _ = set_int(fd, libc::SOL_SOCKET, plain, size);
        }
    }
}

/// Binds one UDP socket serving IPv4 and IPv6 on `port` (`[::]:port` with IPV6_V6ONLY off:
/// IPv4 peers appear as IPv4-mapped IPv6 addresses), non-blocking. Fails where the host has
/// no IPv6 (EAFNOSUPPORT): the caller falls back to an IPv4 socket.
pub fn bind_dual_stack(port: u16) -> io::Result<std::net::UdpSocket> {
    // SAFETY: socket() with constant arguments; the descriptor is owned at once below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let socket = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
    set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    let (name, len) = to_sockaddr(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port));
    // SAFETY: `name` holds a sockaddr of `len` bytes.
    let rc = unsafe { libc::bind(fd, &name as *const _ as *const libc::sockaddr, len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// Binds `n` UDP sockets to `addr`, all with SO_REUSEPORT, non-blocking: the kernel spreads
/// senders over them by a hash of the 4-tuple, so one flow always reaches the same socket
/// (and its datagrams keep their order). With `n` = 1, one plain socket. `[::]:port` serves
/// IPv4 as well (IPV6_V6ONLY off).
/// Port 0: the first socket's ephemeral port for all.
pub fn bind_group(mut addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    let mut out: Vec<std::net::UdpSocket> = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        let family = match addr {
            SocketAddr::V4(_) => libc::AF_INET,
            SocketAddr::V6(_) => libc::AF_INET6,
        };
        // SAFETY: socket() with constant arguments; the descriptor is owned at once below.
        let fd = unsafe {
            libc::socket(
                family,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let socket = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
        if n > 1 {
            set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        }
        set_buffers(fd);
        if let SocketAddr::V6(a) = addr {
            if a.ip().is_unspecified() {
                // `[::]` serves IPv4 too (as IPv4-mapped), whatever the host's default.
                set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
            }
        }
        let (name, len) = to_sockaddr(addr);
        // SAFETY: `name` holds a sockaddr of `len` bytes.
        let rc = unsafe { libc::bind(fd, &name as *const _ as *const libc::sockaddr, len) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if addr.port() == 0 {
            addr.set_port(socket.local_addr()?.port());
        }
        out.push(socket);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_group_shares_one_port() {
        let g = bind_group("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = g[0].local_addr().unwrap().port();
        assert_eq!(g.len(), 3);
        for s in &g {
            assert_eq!(s.local_addr().unwrap().port(), port);
        }
    }

    /// One dual-stack socket takes IPv4 (as IPv4-mapped) and IPv6, and sends to both (GSO
    /// included, where the kernel has it).
    #[test]
    fn a_dual_stack_socket_serves_both_families() {
        let Ok(dual) = bind_dual_stack(0) else {
            return; // no IPv6 on this host
        };
        let port = dual.local_addr().unwrap().port();
        let v4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        v4.send_to(b"four", ("127.0.0.1", port)).unwrap();
        dual.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = dual.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"four");
        let mapped = match from {
            SocketAddr::V6(a) => a,
            other => panic!("an IPv4 sender on a dual-stack socket: {other}"),
        };
        assert_eq!(mapped.ip().to_ipv4_mapped(), Some(Ipv4Addr::LOCALHOST));
        let to = SocketAddr::V6(mapped);
        if gso_supported(dual.as_raw_fd()) {
            assert_eq!(
                send_segments(dual.as_raw_fd(), b"abcdef", 3, to).unwrap(),
                6
            );
            v4.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            for want in [b"abc", b"def"] {
                let n = v4.recv(&mut buf).unwrap();
                assert_eq!(&buf[..n], want);
            }
        }
        // A plain IPv4 destination works on the dual-stack socket too.
        dual.send_to(b"plain", v4.local_addr().unwrap()).unwrap();
        v4.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let n = v4.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"plain");
        let group = bind_group("[::]:0".parse().unwrap(), 2).unwrap();
        let gport = group[0].local_addr().unwrap().port();
        v4.send_to(b"g", ("127.0.0.1", gport)).unwrap();
        if let Ok(v6) = std::net::UdpSocket::bind("[::1]:0") {
            v6.send_to(b"six", ("::1", port)).unwrap();
            let (n, from) = dual.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"six");
            assert_eq!(from, v6.local_addr().unwrap());
        }
    }

    #[test]
    fn sockaddrs_round_trip() {
        for a in ["10.1.2.3:4567", "[fd00::1]:51820"] {
            let a: SocketAddr = a.parse().unwrap();
            let (s, _) = to_sockaddr(a);
            assert_eq!(from_sockaddr(&s), Some(a));
        }
    }

    /// Segments sent with UDP GSO arrive as separate datagrams (or one GRO batch that splits
    /// into them), byte for byte.
    #[test]
    fn segments_arrive_intact() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let gro = enable_gro(rx.as_raw_fd());
        let payload: Vec<u8> = (0..1000u32 * 3 + 17).map(|i| (i * 7) as u8).collect();
        let to = rx.local_addr().unwrap();
        if gso_supported(tx.as_raw_fd()) {
            assert_eq!(
                send_segments(tx.as_raw_fd(), &payload, 1000, to).unwrap(),
                payload.len()
            );
        } else {
            for c in payload.chunks(1000) {
                tx.send_to(c, to).unwrap();
            }
        }
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < payload.len() {
            // Block until something is there, then read it with recvmsg.
            let mut peek = [0u8; 1];
            rx.peek_from(&mut peek).unwrap();
            let (n, from, seg) = recv_segments(rx.as_raw_fd(), &mut buf).unwrap();
            assert_eq!(from, tx.local_addr().unwrap());
            for c in buf[..n].chunks(seg) {
                assert!(c.len() == 1000 || c.len() == 17, "{} {gro}", c.len());
                got.extend_from_slice(c);
            }
        }
        assert_eq!(got, payload);
    }

    /// The TTL of one datagram is the one asked for; the socket's own is left alone.
    #[test]
    fn a_datagram_carries_its_own_ttl() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set_int(rx.as_raw_fd(), libc::IPPROTO_IP, libc::IP_RECVTTL, 1).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let to = rx.local_addr().unwrap();
        let ttl_of_next = || -> i32 {
            let mut peek = [0u8; 1];
            rx.peek_from(&mut peek).unwrap();
            let mut buf = [0u8; 64];
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            };
            let mut control = CmsgBuf([0; 64]);
            // SAFETY: as in recv_segments.
            unsafe {
                let mut msg: libc::msghdr = zeroed();
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = control.0.as_mut_ptr() as *mut libc::c_void;
                msg.msg_controllen = control.0.len() as _;
                assert!(libc::recvmsg(rx.as_raw_fd(), &mut msg, 0) > 0);
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                assert!(!cmsg.is_null(), "no TTL control message");
                assert_eq!((*cmsg).cmsg_type, libc::IP_TTL);
                std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int)
            }
        };
        assert_eq!(send_with_ttl(tx.as_raw_fd(), b"low", to, 2).unwrap(), 3);
        assert_eq!(ttl_of_next(), 2);
        tx.send_to(b"default", to).unwrap();
        assert_eq!(ttl_of_next(), 64, "the socket's TTL is unchanged");
    }
}
