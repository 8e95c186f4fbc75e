//! The proxies of `a2ad --userspace`: SOCKS5 and HTTP on loopback, through which programs on
//! this host reach members by name (`socks5h://`, `HTTP_PROXY`). Each connection: read the
//! request (at most [`MAX_HEADER`] bytes, within [`HANDSHAKE_TIMEOUT`]), route it
//! (core/proxy.rs: members only), open the connection through the userspace stack, splice.
//! A SOCKS5 UDP ASSOCIATE gets a UDP relay socket on the proxy's address and a UDP socket on
//! the stack, both living as long as its TCP connection. At most [`MAX_PROXY_CONNECTIONS`] at
//! once (associations included); every refusal is counted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::core::counters::Counters;
use crate::core::dns::{Member, Zone};
use crate::core::netstack::UdpError;
use crate::core::proxy::{
    http_request, route, socks_greeting, socks_reply, socks_reply_bound, socks_request, socks_udp,
    socks_udp_header, Command, Dest, HttpRequest, Parse, Refusal, UdpDrop, MAX_HEADER,
    MAX_UDP_DATAGRAM,
};
use crate::io::userspace::{Stack, StackUdp, Userspace, SEND_WAIT};
use crate::io::SessionView;

/// Proxy connections served at once (SOCKS5 and HTTP together); one more is closed at once.
pub const MAX_PROXY_CONNECTIONS: usize = 128;
/// The time a client has to send its whole request (slowloris).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Socks5,
    Http,
}

/// Binds a proxy's listener; says loudly when it is reachable beyond this host.
pub async fn bind(addr: SocketAddr, what: &str, flag: &str) -> Result<TcpListener, String> {
    let l = TcpListener::bind(addr).await.map_err(|e| {
        format!(
            "cannot listen for the {what} proxy on {addr}: {e} (choose another with {flag} ADDR)"
        )
    })?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            "the {what} proxy on {addr} is reachable beyond this host: anyone who reaches it \
             reaches every member as this node; bind it to 127.0.0.1 unless that is meant"
        );
    }
    Ok(l)
}

/// Serves the SOCKS5 and HTTP proxies (either may be off) until the task is dropped.
pub async fn serve(socks5: Option<TcpListener>, http: Option<TcpListener>, platform: Userspace) {
    let limit = Arc::new(Semaphore::new(MAX_PROXY_CONNECTIONS));
    let mut tasks = Vec::new();
    for (listener, kind) in [(socks5, Kind::Socks5), (http, Kind::Http)] {
        if let Some(l) = listener {
            tasks.push(tokio::spawn(accept(
                l,
                kind,
                platform.clone(),
                limit.clone(),
            )));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
}

fn count(stack: Option<&Arc<Stack>>, pick: impl Fn(&Counters) -> &std::sync::atomic::AtomicU64) {
    if let Some(c) = stack.and_then(|s| s.counters()) {
        Counters::bump(pick(&c));
    }
}

async fn accept(listener: TcpListener, kind: Kind, platform: Userspace, limit: Arc<Semaphore>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors, say: let some close.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            count(platform.stack().as_ref(), |c| &c.proxy_over_limit);
            drop(client);
            continue;
        };
        let platform = platform.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = client.set_nodelay(true);
            handle(client, kind, &platform).await;
        });
    }
}

/// Reads into `buf` until `parse` decides (bounded by MAX_HEADER).
async fn read_request<T>(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Parse<T>,
) -> Result<(T, usize), Option<Refusal>> {
    let mut chunk = [0u8; 1024];
    loop {
        match parse(buf) {
            Parse::Done(t, n) => return Ok((t, n)),
            Parse::Refused(r) => return Err(Some(r)),
            Parse::Incomplete if buf.len() >= MAX_HEADER => return Err(Some(Refusal::TooLarge)),
            Parse::Incomplete => {}
        }
        let room = (MAX_HEADER - buf.len()).min(chunk.len());
        match client.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// What a request is after reading: where to, and (HTTP) what to send first.
struct Request {
    dest: Dest,
    /// A SOCKS5 UDP ASSOCIATE (`dest`: where the client says it will send from).
    udp: bool,
    http: Option<HttpRequest>,
    /// Bytes the client sent after its request (data for the member).
    early: Vec<u8>,
}

async fn handshake(client: &mut TcpStream, kind: Kind) -> Result<Request, Option<Refusal>> {
    let mut buf = Vec::new();
    match kind {
        Kind::Socks5 => {
            let res = read_request(client, &mut buf, socks_greeting).await;
            if let Err(Some(Refusal::NoAcceptableMethod)) = res {
                let _ = client.write_all(&[5, 0xff]).await;
                return Err(None);
            }
            let ((), n) = res.map_err(|r| r.map(|_| Refusal::Malformed))?;
            buf.drain(..n);
            client.write_all(&[5, 0]).await.map_err(|_| None)?;
            let ((command, dest), n) = read_request(client, &mut buf, socks_request).await?;
            Ok(Request {
                dest,
                udp: command == Command::UdpAssociate,
                http: None,
                early: buf.split_off(n),
            })
        }
        Kind::Http => {
            let (req, n) = read_request(client, &mut buf, http_request).await?;
            Ok(Request {
                dest: req.dest.clone(),
                udp: false,
                http: Some(req),
                early: buf.split_off(n),
            })
        }
    }
}

async fn refuse(client: &mut TcpStream, kind: Kind, r: Refusal) {
    match kind {
        Kind::Socks5 if r == Refusal::NoAcceptableMethod => {}
        Kind::Socks5 => {
            let _ = client.write_all(&socks_reply(r.socks_code())).await;
        }
        Kind::Http => {
            let (code, reason) = r.http_status();
            let why = match r {
                Refusal::NotAllowed => "only members of the a2a network are reachable through this proxy (NAME.a2a or a member's overlay address)\n",
                Refusal::UnknownName => "no member has that name (see `a2actl status`)\n",
                Refusal::TooLarge => "request header too large\n",
                _ => "malformed proxy request\n",
            };
            let msg = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{why}",
                why.len()
            );
            let _ = client.write_all(msg.as_bytes()).await;
        }
    }
    let _ = client.shutdown().await;
}

/// The member named `label`, by the overlay resolver's rules (a name two members claim names
/// neither).
fn lookup(view: &SessionView, label: &str) -> Option<Ipv4Addr> {
    let own = Member {
        name: view.name.clone(),
        ip: *view.ip.borrow(),
        ip6: None,
    };
    let peers = view.peers.all().into_iter().map(|p| {
        let info = p.info();
        Member {
            name: info.name,
            ip: info.ip,
            ip6: None,
        }
    });
    Zone::build(view.dns_ip, 0, std::iter::once(own).chain(peers))
        .lookup(label)
        .map(|(ip, _)| ip)
}

async fn handle(mut client: TcpStream, kind: Kind, platform: &Userspace) {
    let req = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut client, kind)).await {
        Err(_) => {
            count(platform.stack().as_ref(), |c| &c.proxy_handshake_timeout);
            return;
        }
        Ok(Err(None)) => return,
        Ok(Err(Some(r))) => {
            count(platform.stack().as_ref(), |c| &c.proxy_malformed);
            refuse(&mut client, kind, r).await;
            return;
        }
        Ok(Ok(req)) => req,
    };
    let Some(stack) = platform.stack() else {
        // Not in a network now.
        match kind {
            Kind::Socks5 => {
                let _ = client.write_all(&socks_reply(0x03)).await;
            }
            Kind::Http => {
                let _ = client
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 42\r\nConnection: close\r\n\r\nthis node is in no a2a network right now\r\n")
                    .await;
            }
        }
        return;
    };
    if req.udp {
        associate(client, stack, &req.dest).await;
        return;
    }
    let view = stack.session();
    let to = route(
        &req.dest,
        |label| view.as_deref().and_then(|v| lookup(v, label)),
        |ip: IpAddr| stack.is_overlay_peer(ip),
    );
    let to = match to {
        Ok(to) => to,
        Err(r) => {
            count(Some(&stack), |c| &c.proxy_not_allowed);
            refuse(&mut client, kind, r).await;
            return;
        }
    };
    let mut member = match stack.connect(to).await {
        Ok(s) => s,
        Err(e) => {
            count(Some(&stack), |c| &c.proxy_connect_failed);
            tracing::debug!("proxy: {to}: {e}");
            match kind {
                Kind::Socks5 => {
                    let code = match e.kind() {
                        std::io::ErrorKind::ConnectionRefused => 0x05,
                        std::io::ErrorKind::TimedOut => 0x04,
                        std::io::ErrorKind::PermissionDenied => 0x02,
                        _ => 0x01,
                    };
                    let _ = client.write_all(&socks_reply(code)).await;
                }
                Kind::Http => {
                    let body = format!("{to}: {e}\n");
                    let msg = format!(
                        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = client.write_all(msg.as_bytes()).await;
                }
            }
            return;
        }
    };
    count(Some(&stack), |c| &c.proxy_connections);
    let ok = match (&req.http, kind) {
        (_, Kind::Socks5) => client.write_all(&socks_reply(0)).await,
        (Some(h), _) if h.connect => {
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
        }
        (Some(h), _) => member.write_all(&h.head).await,
        (None, _) => Ok(()),
    };
    if ok.is_err() {
        return;
    }
    if !req.early.is_empty() && member.write_all(&req.early).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut member).await;
}

/// How long a name a UDP association's client sends to is kept resolved.
const NAME_TTL: Duration = Duration::from_secs(5);

/// A SOCKS5 UDP association (RFC 1928 §7): a UDP relay socket on the address the client
/// reached the proxy at, a UDP socket on the stack; datagrams from the client (from the TCP
/// connection's address only, and from the port it named, or else from the first one it sent
/// from) go to members, members' datagrams back to it. Ends with the TCP connection.
async fn associate(mut client: TcpStream, stack: Arc<Stack>, from: &Dest) {
    let (Ok(local), Ok(peer)) = (client.local_addr(), client.peer_addr()) else {
        return;
    };
    let relay = match UdpSocket::bind((local.ip(), 0)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                "SOCKS5 UDP ASSOCIATE: cannot bind a relay socket on {}: {e}",
                local.ip()
            );
            let _ = client.write_all(&socks_reply(0x01)).await;
            return;
        }
    };
    let udp = match stack.udp_open() {
        Ok(u) => u,
        Err(e) => {
            count(Some(&stack), |c| &c.proxy_over_limit);
            tracing::debug!("SOCKS5 UDP ASSOCIATE refused: {e}");
            let _ = client.write_all(&socks_reply(0x01)).await;
            return;
        }
    };
    let Ok(bound) = relay.local_addr() else {
        return;
    };
    if client.write_all(&socks_reply_bound(bound)).await.is_err() {
        return;
    }
    count(Some(&stack), |c| &c.proxy_udp_associations);
    // The client's UDP address: the port it named (if any) on the TCP connection's address, or
    // the first address it sends from there.
    let mut client_udp = match from {
        Dest::Addr(a) if a.port() != 0 => Some(SocketAddr::new(peer.ip(), a.port())),
        _ => None,
    };
    let view = stack.session();
    let mut names: Option<(String, u16, SocketAddr, tokio::time::Instant)> = None;
    let mut control = [0u8; 512];
    let mut up = vec![0u8; MAX_UDP_DATAGRAM + 1];
    let mut down = vec![0u8; 2048];
    loop {
        tokio::select! {
            // Anything on the TCP connection is ignored; its end ends the association.
            r = client.read(&mut control) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            r = relay.recv_from(&mut up) => {
                let Ok((n, src)) = r else { continue };
                if src.ip() != peer.ip() || client_udp.is_some_and(|c| c != src) {
                    count(Some(&stack), |c| &c.proxy_udp_dropped);
                    continue;
                }
                client_udp = Some(src);
                let (dest, payload) = match socks_udp(&up[..n]) {
                    Ok(d) => d,
                    Err(UdpDrop::Malformed | UdpDrop::Fragmented | UdpDrop::TooLarge) => {
                        count(Some(&stack), |c| &c.proxy_udp_malformed);
                        continue;
                    }
                };
                let to = match (&dest, &names) {
                    (Dest::Name(name, port), Some((n, p, to, at)))
                        if n == name && p == port && at.elapsed() < NAME_TTL => Ok(*to),
                    _ => route(
                        &dest,
                        |label| view.as_deref().and_then(|v| lookup(v, label)),
                        |ip: IpAddr| stack.is_overlay_peer(ip),
                    ),
                };
                let to = match to {
                    Ok(to) => to,
                    Err(_) => {
                        count(Some(&stack), |c| &c.proxy_udp_not_allowed);
                        continue;
                    }
                };
                if let Dest::Name(name, port) = &dest {
                    if !names.as_ref().is_some_and(|(n, p, ..)| n == name && p == port) {
                        names = Some((name.clone(), *port, to, tokio::time::Instant::now()));
                    }
                }
                send_up(&stack, &udp, payload, to);
            }
            r = udp.recv_from(&mut down) => {
                let Ok((n, src)) = r else { break };
                let Some(to) = client_udp else {
                    count(Some(&stack), |c| &c.proxy_udp_dropped);
                    continue;
                };
                let mut out = socks_udp_header(src);
                out.extend_from_slice(&down[..n]);
                // A full socket buffer drops it (after a short wait), as it would any datagram.
                let sent = match relay.try_send_to(&out, to) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        tokio::time::timeout(SEND_WAIT, relay.send_to(&out, to))
                            .await
                            .unwrap_or(Err(e))
                    }
                    r => r,
                };
                if sent.is_err() {
                    count(Some(&stack), |c| &c.proxy_udp_dropped);
                }
            }
        }
    }
}

fn send_up(stack: &Arc<Stack>, udp: &StackUdp, payload: &[u8], to: SocketAddr) {
    match udp.send_to(payload, to) {
        Ok(()) => count(Some(stack), |c| &c.proxy_udp_datagrams),
        Err(UdpError::NotOverlay) => count(Some(stack), |c| &c.proxy_udp_not_allowed),
        Err(UdpError::TooLarge) => {
            tracing::debug!(
                "SOCKS5 UDP: a {}-byte datagram to {to} is over the {} bytes one overlay packet carries",
                payload.len(),
                udp.max_payload(to.ip())
            );
            count(Some(stack), |c| &c.proxy_udp_malformed)
        }
        Err(UdpError::QueueFull | UdpError::TooMany | UdpError::InUse | UdpError::NotHeld) => {
            count(Some(stack), |c| &c.proxy_udp_dropped)
        }
    }
}
