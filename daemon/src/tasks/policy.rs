//! Who may reach whom, at run time: the policy book (the network's signed policy and tag
//! statements this node holds, kept in the state directory), the rules the packet path
//! enforces (recompiled when the book or the members change), and the statements' passage
//! between members over the overlay itself, so that a coordinator that withholds or replays
//! them changes nothing once any member has the newest.
//!
//! Between members: a 14-byte digest datagram to each member's UDP [`POLICY_PORT`] when what
//! this node holds changes, when members join, and every [`ANNOUNCE_EVERY`]; a member whose
//! digest differs fetches the whole bundle over TCP from the same port (and answers with its
//! own digest, so the exchange goes both ways). Everything fetched is verified before use.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use a2a_proto::control::ClientMsg;
use a2a_proto::membership::Signed;
use a2a_proto::policy::{
    digest_datagram, is_leave, leave_datagram, parse_digest, Bundle, MAX_BUNDLE_BYTES, POLICY_PORT,
};
use a2a_proto::{NetworkId, NodeKey};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::core::control::Registration;
use crate::core::counters::Counters;
use crate::core::peers::PeerTable;
use crate::core::policy::Rules;
use crate::core::statements::{Refused, Statements, Taken};
use crate::io::state::StateDir;
use crate::io::{OverlayDatagrams, OverlayNet, Platform};
use crate::tasks::dataplane::DataPlane;
use crate::tasks::events::ControlOut;
use crate::tasks::members::{Handler, Port};
use crate::tasks::now;

/// Every member is told this node's digest this often (new members, lost datagrams).
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(30);
/// How often the members and the book are looked at for changes.
const WATCH_EVERY: Duration = Duration::from_millis(100);
/// Flows past their timeout are forgotten this often.
const EXPIRE_EVERY: Duration = Duration::from_secs(5);
/// A whole bundle within this, or the fetch fails.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// One fetch per member at most this often (a member announcing in a loop is not fetched in a
/// loop), and one answering digest per member at most this often.
const PER_MEMBER_EVERY: Duration = Duration::from_millis(250);
/// Bundles served at once; more connections are closed at once.
const MAX_SERVING: usize = 16;
/// Fetches in flight at once.
const MAX_FETCHES: usize = 8;
/// Members waiting for a fetch (more are fetched at their next announcement).
const MAX_PENDING: usize = 1024;

/// This node's policy and tag statements, shared by the control task (statements from the
/// coordinator), the commands (`a2actl policy set`, `tag`) and the policy task.
pub struct PolicyBook {
    inner: Mutex<Statements>,
    state: StateDir,
    counters: Arc<Counters>,
    /// The digest, sent whenever something new is taken.
    changed: watch::Sender<u64>,
}

impl PolicyBook {
    /// The statements saved in `state` that verify for `network`.
    pub fn load(state: StateDir, network: NetworkId, counters: Arc<Counters>) -> PolicyBook {
        let statements = Statements::load(network, &state.policy());
        let (changed, _) = watch::channel(statements.digest());
        PolicyBook {
            inner: Mutex::new(statements),
            state,
            counters,
            changed,
        }
    }

    /// The network moved (`a2actl token rotate`): statements signed for the old one do not
    /// verify in the new one, so the book starts again empty there.
    pub fn follow(&self, network: NetworkId) {
        let mut s = self.read();
        if s.network() != network {
            *s = Statements::load(network, &self.state.policy());
            let digest = s.digest();
            drop(s);
            tracing::info!("the network moved: its policy and tags are set anew in the new one");
            self.changed.send_replace(digest);
        }
    }

    pub fn read(&self) -> MutexGuard<'_, Statements> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Verifies and takes `signed` if it is newer than what is held; persists and announces
    /// what is taken.
    pub fn offer(&self, signed: &Signed) -> Result<Taken, Refused> {
        self.offer_all(std::slice::from_ref(signed)).map(|n| {
            if n > 0 {
                Taken::New
            } else {
                Taken::Ignored
            }
        })
    }

    /// Offers every statement of `list`; how many were taken. The last refusal is the error
    /// when nothing was taken.
    pub fn offer_all(&self, list: &[Signed]) -> Result<usize, Refused> {
        let mut s = self.read();
        let (mut taken, mut refused) = (0, None);
        for signed in list {
            match s.offer(signed) {
                Ok(Taken::New) => taken += 1,
                Ok(Taken::Ignored) => {}
                Err(e) => {
                    Counters::bump(&self.counters.policy_statements_refused);
                    refused = Some(e);
                }
            }
        }
        if taken > 0 {
            for _ in 0..taken {
                Counters::bump(&self.counters.policy_statements_taken);
            }
            if let Err(e) = self.state.save_policy(&s.bundle()) {
                tracing::warn!("the policy could not be saved: {e}; it holds until a2ad stops");
            }
            let digest = s.digest();
            drop(s);
            self.changed.send_replace(digest);
            return Ok(taken);
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(0),
        }
    }
}

/// The rules for this node (`name`) among the members now, by the statements held.
pub fn rules_now(book: &PolicyBook, peers: &PeerTable, name: &str) -> Rules {
    let members: Vec<(NodeKey, String)> =
        peers.all().iter().map(|p| (p.key, p.info().name)).collect();
    book.read().rules(
        peers.own_key(),
        name,
        members.iter().map(|(k, n)| (*k, n.as_str())),
    )
}

/// Recompiles the packet path's rules, passes statements to the coordinator and to members.
pub struct PolicyTask<P: Platform> {
    pub book: Arc<PolicyBook>,
    pub dataplane: Arc<DataPlane<P>>,
    pub peers: Arc<PeerTable>,
    pub counters: Arc<Counters>,
    pub name: String,
    pub ip: watch::Receiver<Ipv4Addr>,
    pub registration: watch::Receiver<Registration>,
    /// Exchange statements with members over the overlay (binds real sockets; the fakes do
    /// not).
    pub gossip: bool,
    /// The overlay address's sockets, for that exchange.
    pub net: P::Overlay,
}

impl<P: Platform> PolicyTask<P> {
    pub async fn run(mut self) {
        let mut tasks = JoinSet::new();
        let (digests_tx, mut digests) = tokio::sync::mpsc::channel::<(IpAddr, u64)>(256);
        if self.gossip {
            let port = Port {
                net: self.net.clone(),
                port: POLICY_PORT,
                what: "pass the policy to members",
                peers: self.peers.clone(),
                counters: self.counters.clone(),
                not_member: |c| &c.policy_bad_request,
                max_connections: MAX_SERVING,
                ip: self.ip.clone(),
                ip6: None,
            };
            let members = Members {
                book: self.book.clone(),
                peers: self.peers.clone(),
                counters: self.counters.clone(),
                digests: digests_tx,
            };
            tasks.spawn(port.serve(Arc::new(members)));
        }
        let mut own = self.book.subscribe();
        let mut watch = tokio::time::interval(WATCH_EVERY);
        let mut expire = tokio::time::interval(EXPIRE_EVERY);
        let mut announce = tokio::time::interval(ANNOUNCE_EVERY);
        let mut compiled = (u64::MAX, u64::MAX);
        let mut members = 0usize;
        let mut last_fetch: HashMap<NodeKey, Instant> = HashMap::new();
        let mut last_answer: HashMap<NodeKey, Instant> = HashMap::new();
        // Members whose digest came while a fetch from them was too recent: fetched once the
        // limit allows (a burst of changes ends in one more fetch, not none).
        let mut pending: HashMap<NodeKey, Ipv4Addr> = HashMap::new();
        let mut fetches: JoinSet<Option<Bundle>> = JoinSet::new();
        loop {
            tokio::select! {
                _ = watch.tick() => {
                    let due: Vec<NodeKey> = pending
                        .keys()
                        .filter(|k| {
                            last_fetch.get(*k).is_none_or(|at| at.elapsed() >= PER_MEMBER_EVERY)
                        })
                        .copied()
                        .collect();
                    for key in due {
                        if fetches.len() >= MAX_FETCHES {
                            break;
                        }
                        if let Some(ip) = pending.remove(&key) {
                            last_fetch.insert(key, Instant::now());
                            fetches.spawn(fetch(self.net.clone(), ip));
                        }
                    }
                    let now_state = (self.peers.generation(), self.book.read().digest());
                    if now_state != compiled {
                        compiled = now_state;
                        self.recompile();
                        let n = self.peers.len();
                        if n > members && self.gossip {
                            // New members hear at once what this node holds.
                            self.announce().await;
                        }
                        members = n;
                    }
                }
                _ = expire.tick() => {
                    let now_ms = self.peers.ms_since_epoch(now());
                    self.dataplane.tracker().expire(now_ms);
                    let gone = |m: &mut HashMap<NodeKey, Instant>| {
                        m.retain(|_, at| at.elapsed() < PER_MEMBER_EVERY)
                    };
                    gone(&mut last_fetch);
                    gone(&mut last_answer);
                }
                _ = announce.tick(), if self.gossip => self.announce().await,
                Ok(()) = own.changed() => {
                    own.borrow_and_update();
                    // In force at once, not at the next look.
                    compiled = (self.peers.generation(), self.book.read().digest());
                    self.recompile();
                    self.to_coordinator();
                    if self.gossip {
                        self.announce().await;
                    }
                }
                Ok(()) = self.registration.changed() => {
                    let registered = matches!(
                        *self.registration.borrow_and_update(),
                        Registration::Registered { .. }
                    );
                    if registered {
                        // A coordinator that restarted holds nothing: it learns again from
                        // the members.
                        self.to_coordinator();
                    }
                }
                Some((from, digest)) = digests.recv() => {
                    let Some(peer) = self.peers.by_addr(from) else { continue };
                    if digest == self.book.read().digest() {
                        continue;
                    }
                    let recent = |m: &HashMap<NodeKey, Instant>| {
                        m.get(&peer.key).is_some_and(|at| at.elapsed() < PER_MEMBER_EVERY)
                    };
                    if !recent(&last_fetch) && fetches.len() < MAX_FETCHES {
                        last_fetch.insert(peer.key, Instant::now());
                        let ip = peer.ip();
                        fetches.spawn(fetch(self.net.clone(), ip));
                    } else if pending.len() < MAX_PENDING {
                        pending.insert(peer.key, peer.ip());
                    }
                    if !recent(&last_answer) {
                        // The other side may hold what this one lacks, or lack what it holds.
                        last_answer.insert(peer.key, Instant::now());
                        self.send_digest(&[peer.ip()]).await;
                    }
                }
                Some(done) = fetches.join_next() => {
                    match done.ok().flatten() {
                        Some(bundle) => {
                            Counters::bump(&self.counters.policy_bundles_fetched);
                            let list: Vec<Signed> =
                                bundle.policy.into_iter().chain(bundle.tags).collect();
                            let _ = self.book.offer_all(&list);
                        }
                        None => Counters::bump(&self.counters.policy_fetch_failed),
                    }
                }
            }
        }
    }

    /// Compiles the rules for the members now and the statements held, for the packet path.
    fn recompile(&self) {
        let rules = rules_now(&self.book, &self.peers, &self.name);
        self.dataplane.tracker().set_rules(rules);
    }

    /// Sends every statement held to the coordinator (it keeps the newest of each and passes
    /// them on; what it has already is dropped there).
    fn to_coordinator(&self) {
        let link = self.dataplane.relay.load();
        let Some(link) = link.as_ref() else {
            return;
        };
        for signed in self.book.read().all_signed() {
            let _ = link
                .control
                .try_send(ControlOut::Msg(ClientMsg::Statement { signed }));
        }
    }

    /// Tells every member what this node holds.
    async fn announce(&self) {
        let ips: Vec<Ipv4Addr> = self.peers.all().iter().map(|p| p.ip()).collect();
        self.send_digest(&ips).await;
    }

    async fn send_digest(&self, to: &[Ipv4Addr]) {
        if to.is_empty() {
            return;
        }
        let own = *self.ip.borrow();
        let Ok(socket) = self.net.bind_udp((own, 0).into()).await else {
            return;
        };
        let d = digest_datagram(self.book.read().digest());
        for ip in to {
            let _ = socket.send_to(&d, (*ip, POLICY_PORT).into()).await;
        }
    }
}

/// Tells every peer, through its tunnel, that this node leaves the network
/// ([`leave_datagram`]); best effort: a peer that misses it drops this node
/// [`crate::core::offline::UNLISTED_QUIET`] after the coordinator stops listing it.
pub async fn say_leaving<N: OverlayNet>(net: &N, own: Ipv4Addr, peers: &PeerTable) {
    let Ok(socket) = net.bind_udp((own, 0).into()).await else {
        return;
    };
    let d = leave_datagram();
    for peer in peers.all() {
        let _ = socket.send_to(&d, (peer.ip(), POLICY_PORT).into()).await;
    }
}

/// One member's bundle, bounded in time and size; `None` when it fails.
async fn fetch<N: OverlayNet>(net: N, ip: Ipv4Addr) -> Option<Bundle> {
    let exchange = async {
        let s = net.connect((ip, POLICY_PORT).into()).await.ok()?;
        let mut body = Vec::new();
        s.take(MAX_BUNDLE_BYTES as u64 + 1)
            .read_to_end(&mut body)
            .await
            .ok()?;
        if body.len() > MAX_BUNDLE_BYTES {
            return None;
        }
        serde_json::from_slice::<Bundle>(&body).ok()
    };
    tokio::time::timeout(FETCH_TIMEOUT, exchange)
        .await
        .ok()
        .flatten()
}

/// Answers members on [`POLICY_PORT`]: a connection gets the bundle, a datagram is a digest
/// for the task.
struct Members {
    book: Arc<PolicyBook>,
    peers: Arc<PeerTable>,
    counters: Arc<Counters>,
    digests: tokio::sync::mpsc::Sender<(IpAddr, u64)>,
}

impl<S: AsyncWrite + Unpin + Send + 'static> Handler<S> for Members {
    async fn stream(&self, mut stream: S, _from: SocketAddr) {
        let body = serde_json::to_vec(&self.book.read().bundle()).unwrap_or_default();
        let _ = tokio::time::timeout(FETCH_TIMEOUT, async {
            let _ = stream.write_all(&body).await;
            let _ = stream.shutdown().await;
        })
        .await;
    }

    fn datagram(&self, data: &[u8], from: SocketAddr) {
        if is_leave(data) {
            // From a member (the port answers only members), through its own tunnel.
            if let Some(peer) = self.peers.by_addr(from.ip()) {
                Counters::bump(&self.counters.leave_notices);
                peer.mark_left();
            }
            return;
        }
        match parse_digest(data) {
            Some(d) => {
                let _ = self.digests.try_send((from.ip(), d));
            }
            None => Counters::bump(&self.counters.policy_bad_request),
        }
    }
}
