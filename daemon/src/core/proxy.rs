//! The requests of userspace mode's proxies, I/O-free: a SOCKS5 greeting and request
//! (RFC 1928, no authentication, CONNECT and UDP ASSOCIATE), the header of a SOCKS5 UDP
//! datagram (§7) both ways, an HTTP proxy request (CONNECT, and plain requests in
//! absolute form), and where each may go: a member's overlay address, given as an address or
//! as `NAME.a2a`. Anything else is refused (never resolved or dialled on the host's network).
//!
//! Each parser takes the bytes read so far and says: more needed, done (with the bytes used),
//! or refused (with the answer to give). The driver (tasks/proxy.rs) bounds what it reads
//! ([`MAX_HEADER`]) and how long it waits.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The most a proxy request may be: an HTTP request head (request line and headers); a SOCKS5
/// greeting and request are at most 257 and 262 bytes.
pub const MAX_HEADER: usize = 8 * 1024;

/// The outcome of parsing what was read so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse<T> {
    /// Not all of it yet: read more (up to [`MAX_HEADER`]).
    Incomplete,
    /// Parsed, from the first `usize` bytes.
    Done(T, usize),
    /// Refused: answer and close.
    Refused(Refusal),
}

/// Why a request is refused, mapped to the SOCKS5 reply code and HTTP status to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not the protocol (a wrong version, a malformed field, a header too long).
    Malformed,
    /// A SOCKS5 client offering no method but authentication ones.
    NoAcceptableMethod,
    /// A SOCKS5 command other than CONNECT and UDP ASSOCIATE (BIND).
    CommandNotSupported,
    /// A SOCKS5 address type other than IPv4, IPv6 and a name.
    AddressTypeNotSupported,
    /// The destination is not a member: an address outside the overlay, a name outside `.a2a`.
    NotAllowed,
    /// A `.a2a` name no member has.
    UnknownName,
    /// An HTTP request head beyond [`MAX_HEADER`].
    TooLarge,
}

impl Refusal {
    /// The SOCKS5 reply code (RFC 1928 §6).
    pub fn socks_code(self) -> u8 {
        match self {
            Refusal::Malformed | Refusal::TooLarge => 0x01,
            Refusal::NotAllowed => 0x02,
            Refusal::UnknownName => 0x04,
            Refusal::CommandNotSupported => 0x07,
            Refusal::AddressTypeNotSupported => 0x08,
            Refusal::NoAcceptableMethod => 0xff,
        }
    }

    /// The HTTP status line's code and reason.
    pub fn http_status(self) -> (u16, &'static str) {
        match self {
            Refusal::TooLarge => (431, "Request Header Fields Too Large"),
            Refusal::NotAllowed => (403, "Forbidden"),
            Refusal::UnknownName => (502, "Bad Gateway"),
            _ => (400, "Bad Request"),
        }
    }
}

/// Where a client asks to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    Addr(SocketAddr),
    Name(String, u16),
}

/// A SOCKS5 greeting: whether the client offers "no authentication" (the only method served).
pub fn socks_greeting(buf: &[u8]) -> Parse<()> {
    match buf {
        [] | [5] => Parse::Incomplete,
        [5, 0, ..] => Parse::Refused(Refusal::Malformed),
        [5, n, methods @ ..] => {
            let n = usize::from(*n);
            if methods.len() < n {
                return Parse::Incomplete;
            }
            if methods[..n].contains(&0) {
                Parse::Done((), 2 + n)
            } else {
                Parse::Refused(Refusal::NoAcceptableMethod)
            }
        }
        _ => Parse::Refused(Refusal::Malformed),
    }
}

/// A SOCKS5 command served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// A TCP connection to the request's destination.
    Connect,
    /// A UDP relay; the request's address is where the client will send from (often
    /// `0.0.0.0:0`: not known yet).
    UdpAssociate,
}

/// A SOCKS5 request: CONNECT to an address or a name, or UDP ASSOCIATE.
pub fn socks_request(buf: &[u8]) -> Parse<(Command, Dest)> {
    if buf.len() < 5 {
        return match buf {
            [] | [5] | [5, _] | [5, _, 0] | [5, _, 0, _] => Parse::Incomplete,
            _ => Parse::Refused(Refusal::Malformed),
        };
    }
    if buf[0] != 5 || buf[2] != 0 {
        return Parse::Refused(Refusal::Malformed);
    }
    let (addr_len, start) = match buf[3] {
        1 => (4, 4),
        4 => (16, 4),
        3 if buf[4] == 0 => return Parse::Refused(Refusal::Malformed),
        3 => (usize::from(buf[4]), 5),
        _ => return Parse::Refused(Refusal::AddressTypeNotSupported),
    };
    let end = start + addr_len + 2;
    if buf.len() < end {
        return Parse::Incomplete;
    }
    // The whole request is read before the command is judged: the reply ends it cleanly.
    let command = match buf[1] {
        1 => Command::Connect,
        3 => Command::UdpAssociate,
        _ => return Parse::Refused(Refusal::CommandNotSupported),
    };
    match parse_addr(&buf[3..end]) {
        Some(dest) => Parse::Done((command, dest), end),
        None => Parse::Refused(Refusal::Malformed),
    }
}

/// `ATYP | ADDR | PORT`, exactly (its length checked by the caller).
fn parse_addr(buf: &[u8]) -> Option<Dest> {
    let (start, addr_len) = match *buf.first()? {
        1 => (1, 4),
        4 => (1, 16),
        _ => (2, usize::from(*buf.get(1)?)),
    };
    let raw = buf.get(start..start + addr_len)?;
    let port = buf.get(start + addr_len..start + addr_len + 2)?;
    let port = u16::from_be_bytes([port[0], port[1]]);
    Some(match buf[0] {
        1 => Dest::Addr(SocketAddr::new(
            IpAddr::from(<[u8; 4]>::try_from(raw).unwrap_or_default()),
            port,
        )),
        4 => Dest::Addr(SocketAddr::new(
            IpAddr::from(<[u8; 16]>::try_from(raw).unwrap_or_default()),
            port,
        )),
        _ => Dest::Name(std::str::from_utf8(raw).ok()?.to_string(), port),
    })
}

/// The SOCKS5 reply with `code` (0: succeeded), bound address unspecified.
pub fn socks_reply(code: u8) -> [u8; 10] {
    [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// The SOCKS5 reply "succeeded" naming `bound` (UDP ASSOCIATE: the relay's address).
pub fn socks_reply_bound(bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![5, 0, 0];
    push_addr(&mut out, bound);
    out
}

fn push_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(v4) => {
            out.push(1);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(4);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

/// The most a datagram from a SOCKS5 UDP client may be, header and payload (the overlay carries
/// at most 1392 bytes of payload in one packet; the header is at most 262).
pub const MAX_UDP_DATAGRAM: usize = 2048;

/// Why a datagram from a SOCKS5 UDP client is dropped (RFC 1928 §7: dropped, not answered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpDrop {
    /// Not a UDP request header (reserved bytes not zero, an unknown address type, cut short).
    Malformed,
    /// A fragment (FRAG not 0): fragments are not reassembled, as §7 allows.
    Fragmented,
    /// Beyond [`MAX_UDP_DATAGRAM`].
    TooLarge,
}

/// A datagram from a SOCKS5 UDP client: `RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA`; where to
/// and the payload.
pub fn socks_udp(buf: &[u8]) -> Result<(Dest, &[u8]), UdpDrop> {
    if buf.len() > MAX_UDP_DATAGRAM {
        return Err(UdpDrop::TooLarge);
    }
    if buf.len() < 4 || buf[0] != 0 || buf[1] != 0 {
        return Err(UdpDrop::Malformed);
    }
    if buf[2] != 0 {
        return Err(UdpDrop::Fragmented);
    }
    let addr_len = match buf[3] {
        1 => 1 + 4,
        4 => 1 + 16,
        3 => match buf.get(4) {
            Some(0) | None => return Err(UdpDrop::Malformed),
            Some(&n) => 2 + usize::from(n),
        },
        _ => return Err(UdpDrop::Malformed),
    };
    let end = 3 + addr_len + 2;
    if buf.len() < end {
        return Err(UdpDrop::Malformed);
    }
    let dest = parse_addr(&buf[3..end]).ok_or(UdpDrop::Malformed)?;
    Ok((dest, &buf[end..]))
}

/// The header of a datagram to a SOCKS5 UDP client: from whom it came (a member's address).
pub fn socks_udp_header(from: SocketAddr) -> Vec<u8> {
    let mut out = vec![0, 0, 0];
    push_addr(&mut out, from);
    out
}

/// An HTTP proxy request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// CONNECT: a tunnel, answered 200 then spliced. Otherwise a plain request, whose `head`
    /// is sent to the member first.
    pub connect: bool,
    pub dest: Dest,
    /// A plain request's head as the member gets it: the request line in origin form, the
    /// hop-by-hop headers dropped, `Connection: close` (one request per connection).
    pub head: Vec<u8>,
}

/// An HTTP proxy request head (request line and headers, to the empty line).
pub fn http_request(buf: &[u8]) -> Parse<HttpRequest> {
    let Some(end) = find(buf, b"\r\n\r\n").map(|i| i + 4) else {
        return if buf.len() >= MAX_HEADER {
            Parse::Refused(Refusal::TooLarge)
        } else {
            Parse::Incomplete
        };
    };
    if end > MAX_HEADER {
        return Parse::Refused(Refusal::TooLarge);
    }
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Parse::Refused(Refusal::Malformed);
    };
    let mut lines = head[..end - 4].split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parse::Refused(Refusal::Malformed);
    };
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphabetic());
    if !token(method) || !(version == "HTTP/1.1" || version == "HTTP/1.0") {
        return Parse::Refused(Refusal::Malformed);
    }
    let headers: Vec<&str> = lines.collect();
    if headers
        .iter()
        .any(|h| !h.contains(':') || h.starts_with([' ', '\t']))
    {
        return Parse::Refused(Refusal::Malformed);
    }
    if method == "CONNECT" {
        let Some(dest) = authority(target, None) else {
            return Parse::Refused(Refusal::Malformed);
        };
        return Parse::Done(
            HttpRequest {
                connect: true,
                dest,
                head: Vec::new(),
            },
            end,
        );
    }
    let Some(rest) = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("HTTP://"))
    else {
        // Origin form (`GET /x`) is for servers, and https:// goes through CONNECT.
        return Parse::Refused(Refusal::Malformed);
    };
    let (auth, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], &rest[i..]),
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    let Some(dest) = authority(auth, Some(80)) else {
        return Parse::Refused(Refusal::Malformed);
    };
    let mut out = format!("{method} {path} {version}\r\n");
    for h in headers {
        let name = h.split(':').next().unwrap_or_default().trim();
        let hop = [
            "connection",
            "proxy-connection",
            "keep-alive",
            "proxy-authorization",
        ];
        if hop.iter().any(|n| name.eq_ignore_ascii_case(n)) {
            continue;
        }
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    Parse::Done(
        HttpRequest {
            connect: false,
            dest,
            head: out.into_bytes(),
        },
        end,
    )
}

/// `host:port` (or `host` with `default_port`), `[v6]:port` too.
fn authority(s: &str, default_port: Option<u16>) -> Option<Dest> {
    if s.contains('@') || s.is_empty() {
        return None;
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port?,
            None => return None,
        };
        return Some(Dest::Addr(SocketAddr::new(h.parse().ok()?, port)));
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().ok()?),
            None => (s, default_port?),
        }
    };
    if host.is_empty() {
        return None;
    }
    Some(match host.parse::<IpAddr>() {
        Ok(ip) => Dest::Addr(SocketAddr::new(ip, port)),
        Err(_) => Dest::Name(host.to_string(), port),
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Where `dest` goes: a member's overlay address (`is_member_addr`), or the address of the
/// member a `NAME.a2a` names (`lookup`, with the overlay resolver's rules). Anything else is
/// refused, so no request leaves through the host's own network.
pub fn route(
    dest: &Dest,
    lookup: impl Fn(&str) -> Option<Ipv4Addr>,
    is_member_addr: impl Fn(IpAddr) -> bool,
) -> Result<SocketAddr, Refusal> {
    match dest {
        Dest::Addr(a) if is_member_addr(a.ip()) => Ok(*a),
        Dest::Addr(_) => Err(Refusal::NotAllowed),
        Dest::Name(name, port) => {
            if let Ok(ip) = name.parse::<IpAddr>() {
                return route(
                    &Dest::Addr(SocketAddr::new(ip, *port)),
                    lookup,
                    is_member_addr,
                );
            }
            let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
            let Some(label) = name.strip_suffix(".a2a") else {
                return Err(Refusal::NotAllowed);
            };
            if !crate::core::dns::is_label(label) {
                return Err(Refusal::UnknownName);
            }
            match lookup(label) {
                Some(ip) if is_member_addr(IpAddr::V4(ip)) => Ok(SocketAddr::new(ip.into(), *port)),
                Some(_) => Err(Refusal::NotAllowed),
                None => Err(Refusal::UnknownName),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socks5_greeting_needs_no_authentication_offered() {
        assert_eq!(socks_greeting(&[5, 1, 0]), Parse::Done((), 3));
        assert_eq!(socks_greeting(&[5, 2, 2, 0, 9]), Parse::Done((), 4));
        assert_eq!(
            socks_greeting(&[5, 1, 2]),
            Parse::Refused(Refusal::NoAcceptableMethod)
        );
        // Partial, at every length.
        for n in 0..3 {
            assert_eq!(socks_greeting(&[5, 2, 1, 0][..n]), Parse::Incomplete, "{n}");
        }
        assert_eq!(socks_greeting(&[5, 2, 0]), Parse::Incomplete);
        for bad in [&[4, 1, 0][..], &[5, 0], b"GET / HTTP/1.1\r\n", &[0xff; 300]] {
            assert_eq!(
                socks_greeting(bad),
                Parse::Refused(Refusal::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_socks5_request_names_an_address_or_a_name() {
        let v4 = [5, 1, 0, 1, 100, 80, 0, 2, 0x1f, 0x90];
        assert_eq!(
            socks_request(&v4),
            Parse::Done(
                (
                    Command::Connect,
                    Dest::Addr("100.80.0.2:8080".parse().unwrap())
                ),
                10
            )
        );
        let mut name = vec![5, 1, 0, 3, 7];
        name.extend_from_slice(b"bob.a2a");
        name.extend_from_slice(&[0, 80]);
        assert_eq!(
            socks_request(&name),
            Parse::Done(
                (Command::Connect, Dest::Name("bob.a2a".into(), 80)),
                name.len()
            )
        );
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0, 22]);
        assert_eq!(
            socks_request(&v6),
            Parse::Done(
                (
                    Command::Connect,
                    Dest::Addr("[fd00::1]:22".parse().unwrap())
                ),
                22
            )
        );
        // Every prefix of a request is incomplete, never refused.
        for req in [&v4[..], &name, &v6] {
            for n in 0..req.len() {
                assert_eq!(
                    socks_request(&req[..n]),
                    Parse::Incomplete,
                    "{:?}",
                    &req[..n]
                );
            }
        }
        // Trailing bytes (the client's first data) are left alone.
        let mut more = v4.to_vec();
        more.extend_from_slice(b"GET /");
        assert!(matches!(socks_request(&more), Parse::Done(_, 10)));
    }

    #[test]
    fn malformed_socks5_requests_are_refused() {
        let udp = [5, 3, 0, 1, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            socks_request(&udp),
            Parse::Done(
                (
                    Command::UdpAssociate,
                    Dest::Addr("0.0.0.0:0".parse().unwrap())
                ),
                10
            )
        );
        let bind = [5, 2, 0, 1, 100, 80, 0, 2, 0, 53];
        assert_eq!(
            socks_request(&bind),
            Parse::Refused(Refusal::CommandNotSupported)
        );
        assert_eq!(
            socks_request(&[5, 1, 0, 9, 0, 0, 0, 0, 0, 0]),
            Parse::Refused(Refusal::AddressTypeNotSupported)
        );
        for bad in [
            &[4, 1, 0, 1, 1, 2, 3, 4, 0, 80][..],
            &[5, 1, 1, 1, 1, 2, 3, 4, 0, 80],
            &[5, 1, 0, 3, 0, 0, 80],
            &[5, 1, 0, 3, 2, 0xff, 0xfe, 0, 80],
            &[0xff; 1000],
        ] {
            assert_eq!(
                socks_request(bad),
                Parse::Refused(Refusal::Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(socks_reply(2), [5, 2, 0, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn socks5_udp_datagrams_name_a_destination_and_carry_a_payload() {
        let mut v4 = vec![0, 0, 0, 1, 100, 80, 0, 2, 0x1b, 0x59];
        v4.extend_from_slice(b"hello");
        assert_eq!(
            socks_udp(&v4),
            Ok((
                Dest::Addr("100.80.0.2:7001".parse().unwrap()),
                &b"hello"[..]
            ))
        );
        let mut name = vec![0, 0, 0, 3, 7];
        name.extend_from_slice(b"bob.a2a");
        name.extend_from_slice(&[0, 53]);
        assert_eq!(
            socks_udp(&name),
            Ok((Dest::Name("bob.a2a".into(), 53), &b""[..]))
        );
        let mut v6 = vec![0, 0, 0, 4];
        v6.extend_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0, 53, 0xaa]);
        assert_eq!(
            socks_udp(&v6),
            Ok((Dest::Addr("[fd00::2]:53".parse().unwrap()), &[0xaa][..]))
        );
        // The header back names the sender, and parses as a request header itself.
        let from: SocketAddr = "100.80.0.2:7001".parse().unwrap();
        let mut back = socks_udp_header(from);
        assert_eq!(back, [0, 0, 0, 1, 100, 80, 0, 2, 0x1b, 0x59]);
        back.extend_from_slice(b"x");
        assert_eq!(socks_udp(&back), Ok((Dest::Addr(from), &b"x"[..])));
        let from6: SocketAddr = "[fd00::2]:53".parse().unwrap();
        assert_eq!(
            socks_udp(&socks_udp_header(from6)),
            Ok((Dest::Addr(from6), &b""[..]))
        );
        assert_eq!(
            socks_reply_bound("127.0.0.1:40000".parse().unwrap()),
            [5, 0, 0, 1, 127, 0, 0, 1, 0x9c, 0x40]
        );
    }

    #[test]
    fn malformed_fragmented_and_huge_udp_datagrams_are_dropped() {
        let good = [0, 0, 0, 1, 100, 80, 0, 2, 0, 53, 1, 2, 3];
        // Cut short anywhere in the header: malformed (a datagram is whole or nothing).
        for n in 0..10 {
            assert_eq!(socks_udp(&good[..n]), Err(UdpDrop::Malformed), "{n}");
        }
        // Any fragment number but 0: dropped, fragments are not reassembled.
        for frag in [1u8, 2, 0x7f, 0x80, 0xff] {
            let mut f = good.to_vec();
            f[2] = frag;
            assert_eq!(socks_udp(&f), Err(UdpDrop::Fragmented), "{frag}");
        }
        for bad in [
            &[0, 1, 0, 1, 100, 80, 0, 2, 0, 53][..],
            &[1, 0, 0, 1, 100, 80, 0, 2, 0, 53],
            &[0, 0, 0, 2, 100, 80, 0, 2, 0, 53],
            &[0, 0, 0, 9, 100, 80, 0, 2, 0, 53],
            &[0, 0, 0, 3, 0, 0, 53],
            &[0, 0, 0, 3, 5, b'b', b'o', b'b', 0, 53],
            &[0, 0, 0, 3, 2, 0xff, 0xfe, 0, 53],
            &[0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0],
            &[5, 1, 0, 1, 100, 80, 0, 2, 0, 53],
        ] {
            assert_eq!(socks_udp(bad), Err(UdpDrop::Malformed), "{bad:?}");
        }
        let mut huge = good.to_vec();
        huge.resize(MAX_UDP_DATAGRAM + 1, 0);
        assert_eq!(socks_udp(&huge), Err(UdpDrop::TooLarge));
        huge.truncate(MAX_UDP_DATAGRAM);
        assert!(socks_udp(&huge).is_ok());
        assert_eq!(socks_udp(&[0xff; 65_535]), Err(UdpDrop::TooLarge));
    }

    #[test]
    fn an_http_connect_and_a_plain_request_are_parsed() {
        let c = b"CONNECT bob.a2a:8443 HTTP/1.1\r\nHost: bob.a2a:8443\r\n\r\n";
        let Parse::Done(r, n) = http_request(c) else {
            panic!()
        };
        assert!(r.connect);
        assert_eq!((r.dest, n), (Dest::Name("bob.a2a".into(), 8443), c.len()));
        let g = b"GET http://bob.a2a:8080/x/y?z=1 HTTP/1.1\r\nHost: bob.a2a:8080\r\n\
                  Proxy-Connection: keep-alive\r\nAccept: */*\r\n\r\nBODY";
        let Parse::Done(r, n) = http_request(g) else {
            panic!()
        };
        assert!(!r.connect);
        assert_eq!(n, g.len() - 4);
        assert_eq!(r.dest, Dest::Name("bob.a2a".into(), 8080));
        assert_eq!(
            String::from_utf8(r.head).unwrap(),
            "GET /x/y?z=1 HTTP/1.1\r\nHost: bob.a2a:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let Parse::Done(r, _) = http_request(b"GET http://100.80.0.2 HTTP/1.0\r\n\r\n") else {
            panic!()
        };
        assert_eq!(r.dest, Dest::Addr("100.80.0.2:80".parse().unwrap()));
        assert!(r.head.starts_with(b"GET / HTTP/1.0\r\n"));
        // Partial heads wait for more.
        for n in 0..g.len() - 4 {
            assert_eq!(http_request(&g[..n]), Parse::Incomplete, "{n}");
        }
    }

    #[test]
    fn malformed_and_huge_http_requests_are_refused() {
        for bad in [
            &b"GET /local HTTP/1.1\r\n\r\n"[..],
            b"GET https://bob.a2a/ HTTP/1.1\r\n\r\n",
            b"CONNECT bob.a2a HTTP/1.1\r\n\r\n",
            b"CONNECT bob.a2a:99999 HTTP/1.1\r\n\r\n",
            b"CONNECT user@bob.a2a:80 HTTP/1.1\r\n\r\n",
            b"GET http://bob.a2a/ HTTP/2\r\n\r\n",
            b"GET  http://bob.a2a/ HTTP/1.1\r\n\r\n",
            b"G\xffT http://bob.a2a/ HTTP/1.1\r\n\r\n",
            b"GET http://bob.a2a/ HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET http://bob.a2a/ HTTP/1.1\r\n folded: x\r\n\r\n",
            b"\x05\x01\x00\r\n\r\n",
        ] {
            assert_eq!(
                http_request(bad),
                Parse::Refused(Refusal::Malformed),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let huge = vec![b'a'; MAX_HEADER];
        assert_eq!(http_request(&huge), Parse::Refused(Refusal::TooLarge));
        let mut long = b"GET http://bob.a2a/ HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEADER + 10, b'x');
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(http_request(&long), Parse::Refused(Refusal::TooLarge));
        assert_eq!(Refusal::TooLarge.http_status().0, 431);
    }

    #[test]
    fn only_members_are_routed_to() {
        let lookup = |l: &str| (l == "bob").then_some(Ipv4Addr::new(100, 80, 0, 2));
        let member = |ip: IpAddr| ip.to_string().starts_with("100.80.");
        let r = |d: Dest| route(&d, lookup, member);
        let bob: SocketAddr = "100.80.0.2:80".parse().unwrap();
        assert_eq!(r(Dest::Name("bob.a2a".into(), 80)), Ok(bob));
        assert_eq!(r(Dest::Name("BOB.A2A.".into(), 80)), Ok(bob));
        assert_eq!(r(Dest::Name("100.80.0.2".into(), 80)), Ok(bob));
        assert_eq!(r(Dest::Addr(bob)), Ok(bob));
        assert_eq!(
            r(Dest::Name("carol.a2a".into(), 80)),
            Err(Refusal::UnknownName)
        );
        assert_eq!(
            r(Dest::Name("x.bob.a2a".into(), 80)),
            Err(Refusal::UnknownName)
        );
        for outside in [
            "example.com",
            "bob.a2a.example.com",
            "a2a",
            "localhost",
            "8.8.8.8",
        ] {
            assert_eq!(
                r(Dest::Name(outside.into(), 80)),
                Err(Refusal::NotAllowed),
                "{outside}"
            );
        }
        assert_eq!(
            r(Dest::Addr("127.0.0.1:22".parse().unwrap())),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(Refusal::NotAllowed.socks_code(), 2);
    }
}
