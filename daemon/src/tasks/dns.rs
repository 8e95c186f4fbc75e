//! The overlay resolver's driver: UDP and TCP sockets on the resolver's address (on the TUN
//! device, so only this host and, through the tunnel, the members reach it), the zone rebuilt
//! from the peer table every second, forwarding to the host's own resolvers, and the system
//! integration with systemd-resolved. What to answer is decided in [`crate::core::dns`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::core::counters::Counters;
use crate::core::dns::{
    refused, servfail, Dropped, Member, Resolver, SdService, Transport, Verdict, Zone,
    MAX_QUERY_LEN,
};
use crate::core::peers::PeerTable;
use crate::tasks::now;

/// How often the zone is rebuilt from the peer table (a rename shows within this).
const ZONE_REFRESH: Duration = Duration::from_secs(1);
/// How often the member table is checked for changes (cheap: one counter read).
const MEMBERS_WATCH: Duration = Duration::from_millis(50);
/// How long one upstream resolver has to answer a forwarded query before the next is tried.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Forwarded queries in flight at once; more are dropped (`dns_busy`).
const MAX_FORWARDS: usize = 256;
/// TCP connections at once; more are closed at once (`dns_busy`).
const MAX_TCP: usize = 64;
/// A TCP connection with no query for this long is closed (RFC 7766 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The resolver's sockets, bound before the task starts (a failure is reported, not fatal).
pub struct DnsSockets {
    pub udp: UdpSocket,
    pub tcp: TcpListener,
}

/// Binds UDP and TCP port 53 on `ip` (an address of the TUN device).
pub async fn bind(ip: Ipv4Addr) -> Result<DnsSockets, String> {
    let addr = SocketAddr::new(ip.into(), 53);
    let what = |e: io::Error| {
        format!(
            "cannot serve DNS on {addr}: {e} (another a2ad on this host, or a resolver bound \
             to every address on port 53?)"
        )
    };
    let udp = UdpSocket::bind(addr).await.map_err(what)?;
    let tcp = TcpListener::bind(addr).await.map_err(what)?;
    Ok(DnsSockets { udp, tcp })
}

/// What the resolver task needs from the session.
pub struct DnsTask {
    pub counters: Arc<Counters>,
    pub peers: Arc<PeerTable>,
    /// This node's name and (changing) address: it is in the zone too.
    pub name: String,
    pub ip: watch::Receiver<Ipv4Addr>,
    /// This node's IPv6 overlay address now (it moves with a token rotation).
    pub ip6: Box<dyn Fn() -> Ipv6Addr + Send + Sync>,
    pub dns_ip: Ipv4Addr,
    /// The host's own resolvers, where names outside the zone go.
    pub upstreams: Vec<SocketAddr>,
    /// Every member's services now, for DNS-SD (`_a2a._tcp.a2a`).
    pub services: Box<dyn Fn() -> Vec<SdService> + Send + Sync>,
    /// The network's IPv4 prefix and IPv6 /48 now, whose reverse names are answered (the /48
    /// moves with a token rotation).
    pub prefixes: Box<dyn Fn() -> (Ipv4Net, Ipv6Net) + Send + Sync>,
}

impl DnsTask {
    /// Serves until aborted; every forward and connection it started ends with it.
    pub async fn run(self, sockets: DnsSockets) {
        let resolver = Arc::new(Mutex::new(Resolver::new(Zone::default())));
        let shared = Arc::new(Shared {
            counters: self.counters.clone(),
            peers: self.peers.clone(),
            upstreams: self.upstreams.clone(),
            resolver: resolver.clone(),
            forwards: Semaphore::new(MAX_FORWARDS),
        });
        let udp = Arc::new(sockets.udp);
        let mut tasks = JoinSet::new();
        tasks.spawn(shared.clone().serve_udp(udp));
        tasks.spawn(shared.clone().serve_tcp(sockets.tcp));
        // The members are looked at often, so a name asked right after `up` (when the peer
        // list has just arrived) is answered, not NXDOMAIN that a cache keeps for the
        // negative TTL; the rest (services, this node's address) every ZONE_REFRESH.
        let mut tick = tokio::time::interval(MEMBERS_WATCH);
        let mut built: Option<(u64, tokio::time::Instant)> = None;
        loop {
            tick.tick().await;
            let generation = self.peers.generation();
            let due = built.is_none_or(|(g, at)| g != generation || at.elapsed() >= ZONE_REFRESH);
            if !due {
                continue;
            }
            built = Some((generation, tokio::time::Instant::now()));
            let zone = self.zone();
            Counters::store(&self.counters.dns_invalid_names, zone.invalid());
            Counters::store(&self.counters.dns_name_conflicts, zone.conflicts());
            let mut r = resolver.lock().expect("resolver lock");
            if !r.zone().same_names(&zone) {
                tracing::debug!("overlay names: {} in the zone", zone.len());
                r.set_zone(zone);
            }
        }
    }

    /// The zone of the current membership: this node and every peer.
    fn zone(&self) -> Zone {
        let serial = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        let own = Member {
            name: self.name.clone(),
            ip: *self.ip.borrow(),
            ip6: Some((self.ip6)()),
        };
        let peers = self.peers.all().into_iter().map(|p| {
            let info = p.info();
            Member {
                name: info.name,
                ip: info.ip,
                ip6: Some(p.ip6()),
            }
        });
        let (v4, v6) = (self.prefixes)();
        Zone::build(self.dns_ip, serial, std::iter::once(own).chain(peers))
            .with_services((self.services)())
            .with_reverse(v4, v6)
    }
}

struct Shared {
    counters: Arc<Counters>,
    peers: Arc<PeerTable>,
    upstreams: Vec<SocketAddr>,
    resolver: Arc<Mutex<Resolver>>,
    forwards: Semaphore,
}

impl Shared {
    fn decide(&self, from: IpAddr, query: &[u8], transport: Transport) -> Verdict {
        let verdict =
            self.resolver
                .lock()
                .expect("resolver lock")
                .handle(now(), from, query, transport);
        let c = &self.counters;
        // A member's own a2ad answers its host, so a query from a peer came through the tunnel
        // on purpose: the zone is the peer's to read, but this host's resolvers are not its to
        // use (no open forwarder on the overlay).
        let from_peer = match from {
            IpAddr::V4(v4) => self.peers.by_ip(v4).is_some(),
            IpAddr::V6(_) => false,
        };
        if verdict == Verdict::Forward && from_peer {
            Counters::bump(&c.dns_forward_refused);
            return match refused(query) {
                Some(bytes) => Verdict::Answer {
                    bytes,
                    truncated: false,
                },
                None => Verdict::Drop(Dropped::Malformed),
            };
        }
        match &verdict {
            Verdict::Answer { truncated, .. } => {
                Counters::bump(&c.dns_answered);
                if *truncated {
                    Counters::bump(&c.dns_truncated);
                }
            }
            Verdict::Forward => Counters::bump(&c.dns_forwarded),
            Verdict::Drop(Dropped::Malformed) => Counters::bump(&c.dns_malformed),
            Verdict::Drop(Dropped::Oversized) => Counters::bump(&c.dns_oversized),
            Verdict::Drop(Dropped::RateLimited) => Counters::bump(&c.dns_rate_limited),
        }
        verdict
    }

    async fn serve_udp(self: Arc<Self>, socket: Arc<UdpSocket>) {
        let mut forwards = JoinSet::new();
        // One byte more than a query may be, to tell an oversized one.
        let mut buf = vec![0u8; MAX_QUERY_LEN + 1];
        loop {
            // Reap finished forwards so the set stays small.
            while forwards.try_join_next().is_some() {}
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("dns: receive: {e}");
                    continue;
                }
            };
            let query = &buf[..n];
            match self.decide(from.ip(), query, Transport::Udp) {
                Verdict::Answer { bytes, .. } => {
                    let _ = socket.send_to(&bytes, from).await;
                }
                Verdict::Forward => {
                    if self.forwards.available_permits() == 0 {
                        Counters::bump(&self.counters.dns_busy);
                        continue;
                    }
                    let me = self.clone();
                    let socket = socket.clone();
                    let query = query.to_vec();
                    forwards.spawn(async move {
                        let Ok(_permit) = me.forwards.try_acquire() else {
                            return;
                        };
                        let answer = match forward_udp(&me.upstreams, &query).await {
                            Some(a) => a,
                            None => {
                                Counters::bump(&me.counters.dns_forward_failed);
                                match servfail(&query) {
                                    Some(s) => s,
                                    None => return,
                                }
                            }
                        };
                        let _ = socket.send_to(&answer, from).await;
                    });
                }
                Verdict::Drop(_) => {}
            }
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let mut conns = JoinSet::new();
        let slots = Arc::new(Semaphore::new(MAX_TCP));
        loop {
            while conns.try_join_next().is_some() {}
            let (stream, from) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("dns: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                Counters::bump(&self.counters.dns_busy);
                continue; // dropping the stream closes it
            };
            let me = self.clone();
            conns.spawn(async move {
                let _permit = permit;
                me.serve_conn(stream, from.ip()).await;
            });
        }
    }

    /// Queries on one TCP connection, each a 2-byte length and the message (RFC 1035 4.2.2).
    async fn serve_conn(&self, mut stream: TcpStream, from: IpAddr) {
        loop {
            let mut len = [0u8; 2];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => return, // idle, closed or broken
            }
            let len = usize::from(u16::from_be_bytes(len));
            if len > MAX_QUERY_LEN {
                Counters::bump(&self.counters.dns_oversized);
                return;
            }
            let mut query = vec![0u8; len];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await {
                Ok(Ok(_)) => {}
                _ => {
                    Counters::bump(&self.counters.dns_malformed);
                    return;
                }
            }
            let answer = match self.decide(from, &query, Transport::Tcp) {
                Verdict::Answer { bytes, .. } => bytes,
                Verdict::Forward => {
                    let Ok(_permit) = self.forwards.try_acquire() else {
                        Counters::bump(&self.counters.dns_busy);
                        return;
                    };
                    match forward_tcp(&self.upstreams, &query).await {
                        Some(a) => a,
                        None => {
                            Counters::bump(&self.counters.dns_forward_failed);
                            match servfail(&query) {
                                Some(s) => s,
                                None => return,
                            }
                        }
                    }
                }
                Verdict::Drop(Dropped::RateLimited) => continue,
                Verdict::Drop(_) => return,
            };
            let Ok(n) = u16::try_from(answer.len()) else {
                return;
            };
            let mut out = Vec::with_capacity(2 + answer.len());
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(&answer);
            if stream.write_all(&out).await.is_err() {
                return;
            }
        }
    }
}

/// Whether `answer` answers `query`: a response with the same id.
fn answers(query: &[u8], answer: &[u8]) -> bool {
    answer.len() >= 12 && answer[0..2] == query[0..2] && answer[2] & 0x80 != 0
}

/// Sends `query` to each upstream in turn from a fresh socket (a random port) until one
/// answers; `None` when none does in time.
async fn forward_udp(upstreams: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    for &up in upstreams {
        let local: SocketAddr = match up {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let Ok(sock) = UdpSocket::bind(local).await else {
            continue;
        };
        if sock.connect(up).await.is_err() || sock.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 65535];
        let wait = async {
            loop {
                match sock.recv(&mut buf).await {
                    Ok(n) if answers(query, &buf[..n]) => return Some(buf[..n].to_vec()),
                    Ok(_) => continue, // not the answer: keep waiting
                    Err(_) => return None,
                }
            }
        };
        if let Ok(Some(a)) = tokio::time::timeout(UPSTREAM_TIMEOUT, wait).await {
            return Some(a);
        }
    }
    None
}

/// [`forward_udp`] over TCP (the client asked over TCP, likely after a truncated answer).
async fn forward_tcp(upstreams: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    for &up in upstreams {
        let exchange = async {
            let mut s = TcpStream::connect(up).await.ok()?;
            let mut out = Vec::with_capacity(2 + query.len());
            out.extend_from_slice(&u16::try_from(query.len()).ok()?.to_be_bytes());
            out.extend_from_slice(query);
            s.write_all(&out).await.ok()?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.ok()?;
            let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut answer).await.ok()?;
            answers(query, &answer).then_some(answer)
        };
        if let Ok(Some(a)) = tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await {
            return Some(a);
        }
    }
    None
}

/// The host's own resolvers from `resolv.conf` text, without `own` (the overlay resolver: a
/// host whose resolv.conf points at a2ad must not have a2ad forward to itself).
pub fn parse_resolv_conf(text: &str, own: Ipv4Addr) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .filter(|ip| *ip != IpAddr::V4(own) && !ip.is_unspecified())
        // A link-local server needs its interface, which a socket address here cannot carry.
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The host's resolvers: `/etc/resolv.conf`'s, or, when it names only a2ad, the ones
/// systemd-resolved uses (`/run/systemd/resolve/resolv.conf`). Read when a session starts.
pub fn host_upstreams(own: Ipv4Addr) -> Vec<SocketAddr> {
    for path in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
        if let Ok(text) = std::fs::read_to_string(path) {
            let ups = parse_resolv_conf(&text, own);
            if !ups.is_empty() {
                return ups;
            }
        }
    }
    Vec::new()
}

/// systemd-resolved's per-link DNS: registered on the overlay interface for the `~a2a`
/// routing domain only, so no other name goes to a2ad. The link's settings go away with the
/// link, so a crashed a2ad (whose TUN device the kernel removes) leaves nothing behind.
pub mod system {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use tokio::process::Command;

    /// How long one `resolvectl` call may take.
    const RESOLVECTL_TIMEOUT: Duration = Duration::from_secs(5);

    /// resolved's Varlink socket: it accepts a connection only while resolved runs.
    const RESOLVED_SOCKET: &str = "/run/systemd/resolve/io.systemd.Resolve";

    /// Whether systemd-resolved runs here.
    pub fn resolved_running() -> bool {
        std::os::unix::net::UnixStream::connect(RESOLVED_SOCKET).is_ok()
    }

    async fn resolvectl(args: &[&str]) -> Result<(), String> {
        let run = Command::new("resolvectl")
            .args(args)
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(RESOLVECTL_TIMEOUT, run).await {
            Ok(Ok(o)) if o.status.success() => Ok(()),
            Ok(Ok(o)) => Err(format!(
                "`resolvectl {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Ok(Err(e)) => Err(format!("cannot run resolvectl: {e}")),
            Err(_) => Err(format!("`resolvectl {}` did not finish", args.join(" "))),
        }
    }

    /// Points resolved's `~a2a` routing domain at `dns` on `interface`. Without resolved, says
    /// how to use the resolver and changes nothing.
    pub async fn register(interface: &str, dns: Ipv4Addr) {
        if !resolved_running() {
            tracing::info!(
                "systemd-resolved is not running, so the system resolver is left as it is: \
                 NAME.a2a resolves at {dns} (`dig @{dns} NAME.a2a`); to have every program \
                 resolve them, put `nameserver {dns}` first in /etc/resolv.conf (a2ad forwards \
                 every other name to the resolvers listed there now)"
            );
            return;
        }
        let ip = dns.to_string();
        let steps: [&[&str]; 2] = [&["dns", interface, &ip], &["domain", interface, "~a2a"]];
        for args in steps {
            if let Err(e) = resolvectl(args).await {
                tracing::warn!("cannot register the overlay resolver with systemd-resolved: {e}");
                return;
            }
        }
        // Never the default route for other names (the `~` domain already implies it on
        // current systemd; older ones lack the verb, which is fine).
        let _ = resolvectl(&["default-route", interface, "false"]).await;
        tracing::info!("systemd-resolved sends *.a2a to {dns} on {interface}");
    }

    /// Undoes [`register`] (before the interface goes, which would undo it too).
    pub async fn revert(interface: &str) {
        if !resolved_running() {
            return;
        }
        if let Err(e) = resolvectl(&["revert", interface]).await {
            tracing::debug!("resolvectl revert: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_gives_the_nameservers_but_a2ad_itself() {
        let own = Ipv4Addr::new(100, 100, 100, 100);
        let text = "# generated\nsearch example.com\nnameserver 10.0.0.53\n\
                    nameserver 100.100.100.100\nnameserver fe80::1%eth0\n  nameserver   ::1\n\
                    nameserver bogus\noptions edns0\n";
        let ups = parse_resolv_conf(text, own);
        assert_eq!(
            ups,
            vec!["10.0.0.53:53".parse().unwrap(), "[::1]:53".parse().unwrap(),]
        );
        assert!(parse_resolv_conf("nameserver 100.100.100.100\n", own).is_empty());
    }
}
