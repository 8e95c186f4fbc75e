//! Services, peer to peer: this node's own list ([`ServiceBook`], kept in the state directory),
//! served to members only on its overlay address (TCP [`SERVICES_PORT`], one HTTP/1.0 GET),
//! the lists fetched from every peer over the tunnel (when to fetch is decided by
//! [`crate::core::services::Fetcher`]), the "changed" datagrams that make peers fetch at once,
//! and the agent cards of this node's A2A agents read from the agents themselves. None of it
//! goes through the coordinator.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use a2a_proto::services::{
    changed_datagram, http_body, parse_card, parse_changed, parse_list, Advertised, Card,
    CardRefusal, ListRefusal, Proto, ServiceList, ServiceSpec, MAX_CARD_BYTES, MAX_LIST_BYTES,
    MAX_SERVICES, SERVICES_PORT,
};
use a2a_proto::NodeKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::core::counters::Counters;
use crate::core::peers::PeerTable;
use crate::core::services::{Fetcher, SavedServices};
use crate::io::state::StateDir;
use crate::io::{OverlayDatagrams, OverlayNet};
use crate::tasks::members::{Handler, Port};
use crate::tasks::now;

pub use crate::tasks::members::OwnIp6;

/// A whole answer from a peer within this, or the fetch fails (a slow peer is refused).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A member's request must arrive within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest request read from a member.
const MAX_REQUEST: usize = 2048;
/// Connections answered at once; more are closed at once.
const MAX_CONNECTIONS: usize = 32;
/// An agent's card is read within this.
const CARD_TIMEOUT: Duration = Duration::from_secs(3);
/// Cards are read again this often (an agent started after `service add`, or changed).
const CARD_REFRESH: Duration = Duration::from_secs(30);
/// The peer table is looked at this often (new and departed members).
const PEERS_REFRESH: Duration = Duration::from_secs(1);
/// Headers allowed before a card's body.
const MAX_HEADERS: usize = 8192;
/// A fetch connects to a peer's overlay IPv4 address first; when that has not connected
/// within this, it tries the IPv6 one too, and the first connection made is used (happy
/// eyeballs, RFC 8305, with IPv4 first: it is the address every member has).
const SECOND_FAMILY_AFTER: Duration = Duration::from_millis(250);

/// This node's services and their cards, shared by the commands and the session's task.
pub struct ServiceBook {
    inner: Mutex<Book>,
    /// The version, sent whenever the list changes.
    changed: watch::Sender<u64>,
}

struct Book {
    version: u64,
    specs: Vec<ServiceSpec>,
    cards: HashMap<String, Card>,
}

impl Default for ServiceBook {
    fn default() -> Self {
        ServiceBook::new(SavedServices::default())
    }
}

impl ServiceBook {
    pub fn new(saved: SavedServices) -> ServiceBook {
        let (changed, _) = watch::channel(saved.version);
        ServiceBook {
            inner: Mutex::new(Book {
                version: saved.version,
                specs: saved.services,
                cards: HashMap::new(),
            }),
            changed,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn specs(&self) -> Vec<ServiceSpec> {
        self.lock().specs.clone()
    }

    /// What is served to members.
    pub fn list(&self) -> ServiceList {
        let b = self.lock();
        ServiceList {
            version: b.version,
            services: b
                .specs
                .iter()
                .map(|s| Advertised {
                    spec: s.clone(),
                    card: b.cards.get(&s.name).cloned(),
                })
                .collect(),
        }
    }

    /// A new version: above the last one and, across restarts, above any handed out before
    /// (wall-clock milliseconds), so a peer never holds an old list under the new number.
    fn bump(b: &mut Book) -> u64 {
        b.version = (b.version + 1).max(a2a_proto::time::now_ms());
        b.version
    }

    /// Changes the specs with `edit`, saving them first: when the save fails nothing changes.
    fn edit(
        &self,
        state: &StateDir,
        edit: impl FnOnce(&mut Vec<ServiceSpec>) -> Result<(), String>,
    ) -> Result<Vec<ServiceSpec>, String> {
        let mut b = self.lock();
        let mut specs = b.specs.clone();
        edit(&mut specs)?;
        let mut version = b.version;
        version = (version + 1).max(a2a_proto::time::now_ms());
        state
            .save_services(&SavedServices {
                version,
                services: specs.clone(),
            })
            .map_err(|e| format!("the service list is unchanged: {e}"))?;
        b.version = version;
        b.cards.retain(|name, _| {
            specs
                .iter()
                .any(|s| &s.name == name && s.proto == Proto::A2a)
        });
        b.specs = specs.clone();
        let _ = self.changed.send(version);
        Ok(specs)
    }

    /// Adds `spec` (replacing a service of the same name), within [`MAX_SERVICES`].
    pub fn add(&self, state: &StateDir, spec: ServiceSpec) -> Result<Vec<ServiceSpec>, String> {
        spec.validate()?;
        self.edit(state, |specs| {
            specs.retain(|s| s.name != spec.name);
            if specs.len() >= MAX_SERVICES {
                return Err(format!(
                    "this node already advertises {MAX_SERVICES} services, the most it may; \
                     remove one first (`a2actl service rm NAME`)"
                ));
            }
            specs.push(spec);
            specs.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(())
        })
    }

    pub fn remove(&self, state: &StateDir, name: &str) -> Result<Vec<ServiceSpec>, String> {
        self.edit(state, |specs| {
            let before = specs.len();
            specs.retain(|s| s.name != name);
            if specs.len() == before {
                return Err(format!(
                    "no service named {name:?} here: see `a2actl services`"
                ));
            }
            Ok(())
        })
    }

    /// Forgets every service (`down`); the saved file goes too.
    pub fn clear(&self, state: &StateDir) -> Result<(), String> {
        if self.lock().specs.is_empty() {
            return Ok(());
        }
        self.edit(state, |specs| {
            specs.clear();
            Ok(())
        })
        .map(|_| ())
    }

    /// Sets (or removes) the card read for service `name`; a change is a new version.
    fn set_card(&self, name: &str, card: Option<Card>) {
        let mut b = self.lock();
        if !b.specs.iter().any(|s| s.name == name) || b.cards.get(name) == card.as_ref() {
            return;
        }
        match card {
            Some(c) => b.cards.insert(name.to_string(), c),
            None => b.cards.remove(name),
        };
        let v = Self::bump(&mut b);
        let _ = self.changed.send(v);
    }
}

/// The lists held from peers, by peer key.
pub type RemoteLists = Arc<Mutex<HashMap<NodeKey, Vec<Advertised>>>>;

/// What the task needs from the session.
pub struct ServicesTask<N: OverlayNet> {
    /// The overlay address's sockets: the list is served and fetched through them.
    pub net: N,
    /// Whether this host's kernel holds the overlay addresses (TUN mode): an agent's card is
    /// then also read there when nothing answers on loopback. In userspace mode only loopback
    /// is tried (a kernel connection to the overlay address would leave by the default route).
    pub cards_on_overlay: bool,
    pub book: Arc<ServiceBook>,
    pub peers: Arc<PeerTable>,
    pub counters: Arc<Counters>,
    pub ip: watch::Receiver<Ipv4Addr>,
    /// This node's IPv6 overlay address: the list is served there too.
    pub ip6: OwnIp6,
    pub remote: RemoteLists,
}

enum FetchError {
    Refused(ListRefusal),
    Failed,
}

impl<N: OverlayNet> ServicesTask<N> {
    /// Runs until aborted; every connection and fetch it started ends with it.
    pub async fn run(self) {
        let mut tasks = JoinSet::new();
        let (changed_tx, mut changed_rx) = mpsc::channel::<(IpAddr, u64)>(256);
        let port = Port {
            net: self.net.clone(),
            port: SERVICES_PORT,
            what: "serve this node's services to members",
            peers: self.peers.clone(),
            counters: self.counters.clone(),
            not_member: |c| &c.services_not_member,
            max_connections: MAX_CONNECTIONS,
            ip: self.ip.clone(),
            ip6: Some(self.ip6.clone()),
        };
        let members = Members {
            book: self.book.clone(),
            counters: self.counters.clone(),
            changed: changed_tx,
        };
        tasks.spawn(port.serve(Arc::new(members)));
        tasks.spawn(read_cards(
            self.book.clone(),
            self.counters.clone(),
            self.ip.clone(),
            self.ip6.clone(),
            self.cards_on_overlay,
        ));
        let mut fetcher: Fetcher<NodeKey> = Fetcher::default();
        let mut fetches: JoinSet<(NodeKey, Result<ServiceList, FetchError>)> = JoinSet::new();
        let mut own = self.book.subscribe();
        own.mark_unchanged();
        let mut tick = tokio::time::interval(PEERS_REFRESH);
        loop {
            let next = fetcher.next_due();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tick.tick() => {
                    let keys = self.peers.all().into_iter().map(|p| p.key);
                    let gone = fetcher.set_peers(now(), keys);
                    let mut remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
                    for k in gone {
                        remote.remove(&k);
                    }
                }
                Some((from, version)) = changed_rx.recv() => {
                    if let Some(p) = self.peers.by_addr(from) {
                        fetcher.changed(now(), &p.key, version);
                    }
                }
                Ok(()) = own.changed() => {
                    let version = *own.borrow_and_update();
                    self.announce(version).await;
                }
                Some(Ok((key, result))) = fetches.join_next() => {
                    match result {
                        Ok(list) => {
                            Counters::bump(&self.counters.services_fetched);
                            fetcher.fetched(now(), &key, list.version);
                            if self.peers.by_key(&key).is_some() {
                                self.remote
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(key, list.services);
                            }
                        }
                        Err(e) => {
                            let c = &self.counters;
                            Counters::bump(match e {
                                FetchError::Refused(ListRefusal::Oversized) => {
                                    &c.services_list_oversized
                                }
                                FetchError::Refused(ListRefusal::Malformed) => {
                                    &c.services_list_malformed
                                }
                                FetchError::Failed => &c.services_fetch_failed,
                            });
                            if matches!(e, FetchError::Refused(_)) {
                                // A list refused is not kept: the peer's current list is unknown.
                                self.remote
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .remove(&key);
                            }
                            fetcher.failed(now(), &key);
                        }
                    }
                }
                _ = sleep => {}
            }
            for key in fetcher.start(now()) {
                match self.peers.by_key(&key) {
                    Some(p) => {
                        let (ip, ip6, net) = (p.ip(), p.ip6(), self.net.clone());
                        fetches.spawn(async move { (key, fetch_list(&net, ip, ip6).await) });
                    }
                    None => fetcher.failed(now(), &key),
                }
            }
        }
    }

    /// Tells every peer the list changed: one datagram to each of its overlay addresses (IPv4
    /// and IPv6: either family may be the one that gets through), again a second later (a lost
    /// one is covered by the poll; the peer fetches once per version however many arrive).
    async fn announce(&self, version: u64) {
        let own = *self.ip.borrow();
        let socket4 = self.net.bind_udp((own, 0).into()).await.ok();
        let socket6 = self.net.bind_udp(((self.ip6)(), 0).into()).await.ok();
        let d = changed_datagram(version);
        let peers: Vec<(Ipv4Addr, Ipv6Addr)> =
            self.peers.all().iter().map(|p| (p.ip(), p.ip6())).collect();
        send_changed(&socket4, &socket6, &d, &peers).await;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            send_changed(&socket4, &socket6, &d, &peers).await;
        });
    }
}

/// One "changed" datagram `d` to each of `peers`' addresses, from the socket of its family.
async fn send_changed<D: OverlayDatagrams>(
    socket4: &Option<D>,
    socket6: &Option<D>,
    d: &[u8],
    peers: &[(Ipv4Addr, Ipv6Addr)],
) {
    for (ip, ip6) in peers {
        if let Some(s) = socket4 {
            let _ = s.send_to(d, (*ip, SERVICES_PORT).into()).await;
        }
        if let Some(s) = socket6 {
            let _ = s.send_to(d, (*ip6, SERVICES_PORT).into()).await;
        }
    }
}

/// A connection to a peer's service port: IPv4 first, IPv6 too when IPv4 has not connected
/// within [`SECOND_FAMILY_AFTER`] (or failed); the first one made wins. `None`: neither.
async fn connect_either<N: OverlayNet>(
    net: &N,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
) -> Option<(N::Stream, IpAddr)> {
    let v4 = net.connect((ip, SERVICES_PORT).into());
    let v6 = async {
        let s = net.connect((ip6, SERVICES_PORT).into()).await;
        s.map(|s| (s, IpAddr::V6(ip6)))
    };
    tokio::pin!(v4, v6);
    let delay = tokio::time::sleep(SECOND_FAMILY_AFTER);
    tokio::pin!(delay);
    let (mut v4_done, mut v6_started, mut v6_done) = (false, false, false);
    loop {
        if v4_done && v6_done {
            return None;
        }
        tokio::select! {
            r = &mut v4, if !v4_done => match r {
                Ok(s) => return Some((s, IpAddr::V4(ip))),
                Err(_) => {
                    v4_done = true;
                    v6_started = true;
                }
            },
            _ = &mut delay, if !v6_started => v6_started = true,
            r = &mut v6, if v6_started && !v6_done => match r {
                Ok(s) => return Some(s),
                Err(_) => v6_done = true,
            },
        }
    }
}

/// One peer's list: `GET /a2a/services` over the tunnel (to its overlay IPv4 or IPv6
/// address, see [`connect_either`]), bounded in time and size.
async fn fetch_list<N: OverlayNet>(
    net: &N,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
) -> Result<ServiceList, FetchError> {
    let exchange = async {
        let (mut s, to) = connect_either(net, ip, ip6)
            .await
            .ok_or(FetchError::Failed)?;
        let host = SocketAddr::new(to, SERVICES_PORT);
        s.write_all(format!("GET /a2a/services HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await
            .map_err(|_| FetchError::Failed)?;
        let mut buf = Vec::new();
        (&mut s)
            .take(MAX_LIST_BYTES as u64 + 1)
            .read_to_end(&mut buf)
            .await
            .map_err(|_| FetchError::Failed)?;
        if buf.len() > MAX_LIST_BYTES {
            return Err(FetchError::Refused(ListRefusal::Oversized));
        }
        let body = http_body(&buf).ok_or(FetchError::Refused(ListRefusal::Malformed))?;
        parse_list(body).map_err(FetchError::Refused)
    };
    tokio::time::timeout(FETCH_TIMEOUT, exchange)
        .await
        .unwrap_or(Err(FetchError::Failed))
}

/// Answers members on [`SERVICES_PORT`]: a connection gets the list, a datagram is a
/// "changed" for the fetcher.
struct Members {
    book: Arc<ServiceBook>,
    counters: Arc<Counters>,
    changed: mpsc::Sender<(IpAddr, u64)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Handler<S> for Members {
    async fn stream(&self, stream: S, _from: SocketAddr) {
        answer(stream, &self.book, &self.counters).await;
    }

    fn datagram(&self, data: &[u8], from: SocketAddr) {
        match parse_changed(data) {
            Some(v) => {
                let _ = self.changed.try_send((from.ip(), v));
            }
            None => Counters::bump(&self.counters.services_bad_request),
        }
    }
}

/// Answers one member's `GET /a2a/services`.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    book: &ServiceBook,
    counters: &Counters,
) {
    let request = async {
        let mut req = Vec::new();
        let mut chunk = [0u8; 512];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 || req.len() + n > MAX_REQUEST {
                return None;
            }
            req.extend_from_slice(&chunk[..n]);
        }
        Some(req)
    };
    let Ok(Some(req)) = tokio::time::timeout(REQUEST_TIMEOUT, request).await else {
        Counters::bump(&counters.services_bad_request);
        return;
    };
    let response = if req.starts_with(b"GET /a2a/services ") {
        let body = serde_json::to_vec(&book.list()).unwrap_or_default();
        let mut r = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(&body);
        r
    } else {
        Counters::bump(&counters.services_bad_request);
        b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let _ = stream.write_all(&response).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Reads the cards of this node's A2A agents: at once when the list changes, and every
/// [`CARD_REFRESH`].
async fn read_cards(
    book: Arc<ServiceBook>,
    counters: Arc<Counters>,
    ip: watch::Receiver<Ipv4Addr>,
    ip6: OwnIp6,
    on_overlay: bool,
) {
    let mut changed = book.subscribe();
    let mut known: Vec<ServiceSpec> = Vec::new();
    loop {
        let specs = book.specs();
        known.clone_from(&specs);
        // Every agent at once (at most MAX_SERVICES), so a slow one delays no other's card.
        let overlay = on_overlay.then(|| [IpAddr::V4(*ip.borrow()), IpAddr::V6(ip6())]);
        let reads = specs
            .iter()
            .filter(|s| s.proto == Proto::A2a)
            .map(|s| async move { (s.name.clone(), read_card(s.port, overlay).await) });
        for (name, result) in futures_util::future::join_all(reads).await {
            let card = match result {
                Ok(c) => {
                    Counters::bump(&counters.cards_read);
                    Some(c)
                }
                Err(why) => {
                    Counters::bump(match why {
                        CardError::Refused(CardRefusal::Oversized) => &counters.cards_oversized,
                        CardError::Refused(CardRefusal::Malformed) => &counters.cards_malformed,
                        CardError::Unreachable => &counters.cards_unreachable,
                    });
                    None
                }
            };
            book.set_card(&name, card);
        }
        let deadline = tokio::time::Instant::now() + CARD_REFRESH;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                r = changed.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // A card set by this loop changes the version too: only a spec change
                    // makes the cards be read again at once.
                    if book.specs() != known {
                        break;
                    }
                }
            }
        }
    }
}

enum CardError {
    Refused(CardRefusal),
    Unreachable,
}

/// The agent's card from `http://127.0.0.1:PORT/.well-known/agent-card.json`, or from this
/// node's overlay addresses (IPv4, then IPv6; when given) when nothing answers on loopback.
async fn read_card(port: u16, overlay: Option<[IpAddr; 2]>) -> Result<Card, CardError> {
    let mut last = CardError::Unreachable;
    let hosts =
        std::iter::once(IpAddr::V4(Ipv4Addr::LOCALHOST)).chain(overlay.into_iter().flatten());
    for host in hosts {
        match tokio::time::timeout(CARD_TIMEOUT, get_card(host, port)).await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(CardError::Unreachable)) | Err(_) => {}
            Ok(Err(e)) => last = e,
        }
        if !matches!(last, CardError::Unreachable) {
            break;
        }
    }
    Err(last)
}

async fn get_card(host: IpAddr, port: u16) -> Result<Card, CardError> {
    let addr = SocketAddr::new(host, port);
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|_| CardError::Unreachable)?;
    s.write_all(
        format!(
            "GET /.well-known/agent-card.json HTTP/1.0\r\nHost: {addr}\r\n\
             Accept: application/json\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .map_err(|_| CardError::Unreachable)?;
    let cap = MAX_CARD_BYTES + MAX_HEADERS;
    let mut buf = Vec::new();
    (&mut s)
        .take(cap as u64 + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(|_| CardError::Unreachable)?;
    if buf.len() > cap {
        return Err(CardError::Refused(CardRefusal::Oversized));
    }
    let body = http_body(&buf).ok_or(CardError::Unreachable)?;
    parse_card(body).map_err(CardError::Refused)
}

/// Every member's services as DNS-SD shows them: this node's (named `own_name`) and each
/// peer's last fetched list.
pub fn sd_services(
    book: &ServiceBook,
    remote: &RemoteLists,
    peers: &PeerTable,
    own_name: &str,
) -> Vec<crate::core::dns::SdService> {
    let sd = |node: &str, a: &Advertised| {
        let kind = match a.spec.proto {
            Proto::A2a => "a2a",
            Proto::Mcp => "mcp",
            Proto::Http => "http",
            Proto::Tcp => return None,
        };
        Some(crate::core::dns::SdService {
            node: node.to_string(),
            name: a.spec.name.clone(),
            kind,
            port: a.spec.port,
            path: a.spec.path.clone(),
            skills: a
                .card
                .as_ref()
                .map(|c| c.skills.iter().map(|k| k.id.clone()).collect())
                .unwrap_or_default(),
        })
    };
    let mut out: Vec<_> = book
        .list()
        .services
        .iter()
        .filter_map(|a| sd(own_name, a))
        .collect();
    let remote = remote.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (key, list) in remote {
        if let Some(p) = peers.by_key(&key) {
            let node = p.info().name;
            out.extend(list.iter().filter_map(|a| sd(&node, a)));
        }
    }
    out
}
