//! The daemon's commands (`up`, `down`, `status`, `ip`) over its one optional session, and the
//! membership kept in the state directory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use a2a_proto::api::{
    parse_whois_addr, NetcheckReport, PeerStatus, PingResult, PortmapReport, SelfStatus,
    ServiceEntry, Status, WhoisMember,
};
use a2a_proto::control::ClientMsg;
use a2a_proto::invite::InviteCode;
use a2a_proto::keys::{NetworkSecret, REVOKE_CONTEXT, ROTATE_CONTEXT};
use a2a_proto::membership::{issue_cert, Carry, Revocation, RotationNotice, Signed};
use a2a_proto::overlay::{derive_ip, is_host_in, ula_prefix};
use a2a_proto::record::{sanitize_name, validate_name};
use a2a_proto::services::{Advertised, ServiceSpec};
use a2a_proto::time::now_ms;
use a2a_proto::{Credential, JoinToken, NetworkId, NetworkKey, NodeKey};
use boringtun::x25519::{PublicKey, StaticSecret};
use tokio::sync::{oneshot, Mutex};

use crate::core::control::Registration;
use crate::core::membership::{MemberState, Membership, MAX_INVITE_TTL_MS};
use crate::core::path::Route;
use crate::core::peers::Peer;
use crate::io::state::StateDir;
use crate::io::{Connector, Platform, Underlay};
use crate::node::session::{DeviceConfig, Joining, Session};
use crate::tasks::dataplane::DataPlane;
use crate::tasks::events::{ControlOut, PathEvent};
use crate::tasks::services::ServiceBook;

/// The network a saved membership is for.
fn saved_network(m: &Membership) -> Option<NetworkId> {
    match &m.invited {
        Some(invited) => Some(invited.network),
        None => JoinToken::parse(&m.token)
            .ok()
            .map(|t| NetworkKey::derive(&t.network_secret).id()),
    }
}

/// Why a command failed: the variants callers tell apart, and every other failure with its
/// message. Each says what went wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// The node is in no network.
    NotJoined,
    /// The command needs the coordinator, which is not reachable now; why it needs it.
    NotConnected(&'static str),
    /// No peer has that name, address or key.
    NoSuchPeer(String),
    /// A node admitted by invite cannot do this (it lacks the network secret).
    NoSecret(&'static str),
    /// The coordinator refused this node, for a reason retrying does not fix.
    Refused(String),
    /// Anything else (bad input, I/O), with its message.
    Failed(String),
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandError::NotJoined => {
                write!(
                    f,
                    "this node has not joined a network: run `a2actl up --join TOKEN`"
                )
            }
            CommandError::NotConnected(why) => write!(
                f,
                "not connected to the coordinator right now (see `a2actl status`); {why}"
            ),
            CommandError::NoSuchPeer(t) => write!(
                f,
                "no peer named or addressed {t:?}: see `a2actl status` for the peers"
            ),
            CommandError::NoSecret(what) => write!(
                f,
                "this node joined by invite and does not hold the network secret, so it cannot \
                 {what}; run the command on a node that joined with the token"
            ),
            CommandError::Refused(m) => {
                write!(f, "the coordinator refused to register this node: {m}")
            }
            CommandError::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for CommandError {}

impl From<String> for CommandError {
    fn from(m: String) -> Self {
        CommandError::Failed(m)
    }
}

/// How long `a2actl up` waits for the coordinator to accept the node.
const UP_TIMEOUT: Duration = Duration::from_secs(20);
/// WireGuard keys older than this are gone (REJECT_AFTER_TIME).
const KEYS_LIFETIME: Duration = Duration::from_secs(180);

pub struct Daemon<P: Platform> {
    platform: P,
    device: DeviceConfig,
    pub(crate) state: StateDir,
    node_private: [u8; 32],
    pub(crate) session: Mutex<Option<Session<P>>>,
    /// This node's services (kept in the state directory, served while joined).
    services: Arc<ServiceBook>,
    /// This node's SSH identity, and what its sshd accepts (node/ssh.rs).
    pub(crate) ssh: crate::node::ssh::SshBook,
    /// The port forwards (`a2ad --userspace`), kept in the state directory.
    forwards: std::sync::Mutex<Vec<a2a_proto::api::Forward>>,
}

impl<P: Platform> Daemon<P> {
    pub fn new(platform: P, device: DeviceConfig, state: StateDir) -> Result<Self, String> {
        let node_private = state.node_key().map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                format!(
                    "{e}; a2ad runs as root (or with CAP_NET_ADMIN and a state directory it can \
                     write: --state-dir DIR)"
                )
            } else {
                e.to_string()
            }
        })?;
        let services = Arc::new(ServiceBook::new(
            state.services().map_err(|e| e.to_string())?,
        ));
        let forwards = state.forwards().map_err(|e| e.to_string())?;
        platform.set_forwards(&forwards);
        let ssh = crate::node::ssh::SshBook::load(&state, &node_private)?;
        Ok(Daemon {
            platform,
            device,
            state,
            node_private,
            session: Mutex::new(None),
            services,
            forwards: std::sync::Mutex::new(forwards),
            ssh,
        })
    }

    /// What the daemon runs on (in tests, the fake host it can impair).
    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// Opens a session on this daemon's platform, device and state directory.
    async fn start_session(
        &self,
        credential: Credential,
        join_text: String,
        name: String,
        ip: std::net::Ipv4Addr,
    ) -> Result<Session<P>, String> {
        let joining = Joining {
            node_private: self.node_private,
            credential,
            join_text,
            name,
            ip,
            services: self.services.clone(),
            ssh: self.ssh.subscribe(),
        };
        Session::start(&self.platform, &self.device, self.state.clone(), joining).await
    }

    pub(super) fn node_key(&self) -> NodeKey {
        NodeKey(PublicKey::from(&StaticSecret::from(self.node_private)).to_bytes())
    }

    /// At start: rejoin the saved network, if any, without waiting for the coordinator.
    pub async fn resume(&self) -> Result<(), CommandError> {
        let Some(m) = self.state.membership().map_err(|e| e.to_string())? else {
            tracing::info!("not joined to a network; waiting for `a2actl up --join TOKEN`");
            return Ok(());
        };
        let credential = match m.invited.clone() {
            Some(invited) => Credential::from_invited(invited, &self.node_private)?,
            None => Credential::from_token(
                JoinToken::parse(&m.token).map_err(|e| format!("saved {e}"))?,
            ),
        };
        let session = self
            .start_session(credential, m.token.clone(), m.name.clone(), m.ip)
            .await?;
        *self.session.lock().await = Some(session);
        tracing::info!("rejoined the saved network as {} ({})", m.name, m.ip);
        Ok(())
    }

    pub async fn up(
        &self,
        token_text: &str,
        name: Option<String>,
    ) -> Result<(String, String), CommandError> {
        // An invite code is redeemed first (its inviter must be online); a failure here leaves
        // the current network, if any, untouched.
        let credential = if InviteCode::is_invite(token_text) {
            let code = InviteCode::parse(token_text).map_err(|e| e.to_string())?;
            let invited = crate::tasks::control::redeem_invite(
                &self.platform.connector(),
                &code,
                &self.node_private,
            )
            .await?;
            Credential::from_invited(invited, &self.node_private)?
        } else {
            Credential::from_token(JoinToken::parse(token_text).map_err(|e| e.to_string())?)
        };
        let network_id = credential.network_id();
        let prefix = credential.prefix();
        let saved = self.state.membership().map_err(|e| e.to_string())?;
        let name = match name {
            Some(n) => {
                validate_name(&n).map_err(|e| format!("--name: {e}"))?;
                n
            }
            None => saved
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_else(default_name),
        };
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref() {
            if s.network_id() == network_id && s.name == name {
                // Already a member: report the address (after registration, if pending).
                let ip = wait_registered(s).await.unwrap_or_else(|_| s.current_ip());
                return Ok((ip.to_string(), name));
            }
        }
        // Keep the old address when rejoining the same network.
        let same_network = saved
            .as_ref()
            .filter(|m| saved_network(m) == Some(network_id))
            .map(|m| m.ip);
        let ip = same_network
            .filter(|ip| is_host_in(prefix, *ip))
            .unwrap_or_else(|| derive_ip(prefix, &self.node_key(), 0));

        let previous = slot.take();
        if let Some(p) = previous {
            p.stop(true).await;
        }
        let result = async {
            let session = self
                .start_session(credential, token_text.trim().to_string(), name.clone(), ip)
                .await?;
            match wait_registered(&session).await {
                Ok(ip) => Ok((session, ip)),
                Err(e) => {
                    session.stop(false).await;
                    Err(e)
                }
            }
        }
        .await;
        match result {
            Ok((session, ip)) => {
                self.state
                    .save_membership(&session.member.membership(name.clone(), ip))
                    .map_err(|e| e.to_string())?;
                *slot = Some(session);
                Ok((ip.to_string(), name))
            }
            Err(e) => {
                // Nothing the user had is lost: restore the saved membership, if any.
                drop(slot);
                if let Err(re) = self.resume().await {
                    tracing::warn!("could not restore the previous network: {re}");
                }
                Err(e)
            }
        }
    }

    pub async fn down(&self) -> Result<bool, CommandError> {
        let session = self.session.lock().await.take();
        let was_up = session.is_some();
        if let Some(s) = session {
            s.stop(true).await;
        }
        self.state.clear_membership().map_err(|e| {
            format!("left the network, but cannot remove the saved membership: {e}")
        })?;
        // Leaving withdraws this node's services: the members drop its list with it, and a
        // later `up` (maybe into another network) advertises nothing until told to.
        self.services
            .clear(&self.state)
            .map_err(|e| format!("left the network, but cannot clear the saved services: {e}"))?;
        Ok(was_up)
    }

    /// Advertises a service to the members (kept in the state directory).
    /// Adds (or replaces) the forward of `forward.port`; the forwards then.
    pub fn forward_add(
        &self,
        forward: a2a_proto::api::Forward,
    ) -> Result<Vec<a2a_proto::api::Forward>, CommandError> {
        if !self.platform.userspace() {
            return Err(CommandError::Failed(
                "forwards are for a2ad --userspace: with a TUN device, members reach this \
                 host's ports at its overlay address directly (a server listening on 0.0.0.0 \
                 or on the overlay address)"
                    .into(),
            ));
        }
        if forward.port == 0 || forward.to.port() == 0 {
            return Err(CommandError::Failed(
                "a forward's ports are 1 to 65535".into(),
            ));
        }
        let own = [
            a2a_proto::services::SERVICES_PORT,
            a2a_proto::policy::POLICY_PORT,
        ];
        if own.contains(&forward.port) {
            return Err(CommandError::Failed(format!(
                "port {} of the overlay address is a2ad's own (the service lists on {}, the \
                 policy's exchange on {}): forward another port",
                forward.port, own[0], own[1]
            )));
        }
        let mut list = self.forwards.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = list.clone();
        next.retain(|f| f.port != forward.port || f.proto != forward.proto);
        next.push(forward);
        next.sort_by_key(|f| (f.port, f.proto == a2a_proto::api::ForwardProto::Udp));
        self.state
            .save_forwards(&next)
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        self.platform.set_forwards(&next);
        *list = next.clone();
        Ok(next)
    }

    /// Removes the forward of `port`; the forwards then.
    pub fn forward_rm(&self, port: u16) -> Result<Vec<a2a_proto::api::Forward>, CommandError> {
        let mut list = self.forwards.lock().unwrap_or_else(|e| e.into_inner());
        if !list.iter().any(|f| f.port == port) {
            return Err(CommandError::Failed(format!(
                "no forward of port {port}: see `a2actl forwards`"
            )));
        }
        let next: Vec<_> = list.iter().filter(|f| f.port != port).cloned().collect();
        self.state
            .save_forwards(&next)
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        self.platform.set_forwards(&next);
        *list = next.clone();
        Ok(next)
    }

    pub fn forwards(&self) -> Vec<a2a_proto::api::Forward> {
        self.forwards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub async fn service_add(&self, spec: ServiceSpec) -> Result<Vec<ServiceSpec>, CommandError> {
        Ok(self.services.add(&self.state, spec)?)
    }

    pub async fn service_rm(&self, name: &str) -> Result<Vec<ServiceSpec>, CommandError> {
        Ok(self.services.remove(&self.state, name)?)
    }

    /// Every member's services: this node's own, then each peer's as last fetched from it.
    pub async fn services(&self) -> Vec<ServiceEntry> {
        let slot = self.session.lock().await;
        let own = self.services.list();
        let (name, ip, ip6) = match slot.as_ref() {
            Some(s) => (
                s.name.clone(),
                s.current_ip().to_string(),
                s.current_ip6().to_string(),
            ),
            None => (String::new(), String::new(), String::new()),
        };
        let entry = |node: &str, ip: &str, ip6: &str, a: Advertised, is_self: bool| ServiceEntry {
            node: node.to_string(),
            name: a.spec.name,
            ip: ip.to_string(),
            ip6: ip6.to_string(),
            port: a.spec.port,
            proto: a.spec.proto,
            path: a.spec.path,
            card: a.card,
            is_self,
        };
        let mut out: Vec<ServiceEntry> = own
            .services
            .into_iter()
            .map(|a| entry(&name, &ip, &ip6, a, true))
            .collect();
        if let Some(s) = slot.as_ref() {
            let remote = s
                .remote_services
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let mut peers: Vec<ServiceEntry> = Vec::new();
            for (key, list) in remote {
                let Some(p) = s.peers.by_key(&key) else {
                    continue;
                };
                let info = p.info();
                let (ip, ip6) = (info.ip.to_string(), info.ip6.to_string());
                peers.extend(
                    list.into_iter()
                        .map(|a| entry(&info.name, &ip, &ip6, a, false)),
                );
            }
            peers.sort_by(|a, b| (&a.node, &a.name).cmp(&(&b.node, &b.name)));
            out.extend(peers);
        }
        out
    }

    /// Stops the session without leaving (daemon shutdown): the membership stays saved.
    pub async fn shutdown(&self) {
        if let Some(s) = self.session.lock().await.take() {
            s.stop(false).await;
        }
    }

    /// This node's overlay addresses: IPv4 and IPv6.
    pub async fn ip(&self) -> Result<(String, String), CommandError> {
        match self.session.lock().await.as_ref() {
            Some(s) => Ok((s.current_ip().to_string(), s.current_ip6().to_string())),
            None => Err(CommandError::NotJoined),
        }
    }

    /// The member that holds overlay address `addr` (IPv4 or IPv6, a port allowed), as this
    /// node's membership knows it: this node or a peer whose signed record it holds.
    pub async fn whois(&self, addr: &str) -> Result<WhoisMember, CommandError> {
        let ip = parse_whois_addr(addr).map_err(CommandError::Failed)?;
        let slot = self.session.lock().await;
        let Some(s) = slot.as_ref() else {
            return Err(CommandError::NotJoined);
        };
        if ip == std::net::IpAddr::V4(s.current_ip()) || ip == std::net::IpAddr::V6(s.current_ip6())
        {
            let credential = s.member.credential();
            let (admitted_by, invite, certified_ms) = match &*credential {
                Credential::Secret { .. } => ("token", None, None),
                Credential::Invited { invited, .. } => {
                    let cert =
                        a2a_proto::membership::MemberCert::open(&invited.cert, &invited.network)
                            .ok();
                    (
                        "invite",
                        cert.as_ref().map(|c| c.invite.to_hex()),
                        cert.map(|c| c.issued_ms),
                    )
                }
            };
            return Ok(WhoisMember {
                name: s.name.clone(),
                public_key: self.node_key().to_base64(),
                ip: s.current_ip().to_string(),
                ip6: s.current_ip6().to_string(),
                admitted_by: admitted_by.into(),
                invite,
                certified_ms,
                is_self: true,
                tags: tag_list(&s.policy.read(), &self.node_key()),
            });
        }
        let Some(peer) = s.peers.by_addr(ip) else {
            let prefix = s.member.credential().prefix();
            let prefix6 = ula_prefix(&s.network_id());
            let inside = match ip {
                std::net::IpAddr::V4(v4) => prefix.contains(&v4),
                std::net::IpAddr::V6(v6) => prefix6.contains(&v6),
            };
            let hint = if inside {
                String::new()
            } else {
                format!(" (it is outside this network's overlay, {prefix} and {prefix6})")
            };
            return Err(CommandError::Failed(format!("no member holds {ip}{hint}")));
        };
        let info = peer.info();
        let tags = tag_list(&s.policy.read(), &peer.key);
        Ok(WhoisMember {
            name: info.name,
            public_key: peer.key.to_base64(),
            ip: info.ip.to_string(),
            ip6: info.ip6.to_string(),
            admitted_by: if info.cert.is_some() {
                "invite"
            } else {
                "token"
            }
            .into(),
            invite: info.cert.as_ref().map(|c| c.invite.to_hex()),
            certified_ms: info.cert.as_ref().map(|c| c.issued_ms),
            is_self: false,
            tags,
        })
    }

    pub async fn status(&self) -> Status {
        let slot = self.session.lock().await;
        let Some(s) = slot.as_ref() else {
            return Status {
                self_: None,
                peers: vec![],
                counters: Default::default(),
                policy: None,
            };
        };
        let book = s.policy.read();
        let peers = s
            .peers
            .all()
            .into_iter()
            .map(|p| {
                let info = p.info();
                let (since, tx, rx, _, _) = p.tunn().stats();
                let live = since.is_some_and(|d| d < KEYS_LIFETIME);
                let (path, endpoint) = describe_route(&s.dataplane, &p);
                PeerStatus {
                    name: info.name,
                    ip: info.ip.to_string(),
                    ip6: info.ip6.to_string(),
                    public_key: p.key.to_base64(),
                    path: if live { path } else { "none" }.into(),
                    endpoint,
                    rtt_ms: p
                        .with_path(|path| path.rtt())
                        .map(|d| d.as_secs_f64() * 1000.0),
                    last_handshake_s: since.map(|d| d.as_secs()),
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                    tags: tag_list(&book, &p.key),
                    listing: p.listing().word().map(str::to_string),
                }
            })
            .collect();
        let policy = crate::node::policy::view(&book, &s.dataplane.tracker(), false);
        let registered = matches!(*s.registration.borrow(), Registration::Registered { .. });
        let refused = match &*s.registration.borrow() {
            Registration::Refused(why) => Some(why.clone()),
            _ => None,
        };
        Status {
            self_: Some(SelfStatus {
                name: s.name.clone(),
                ip: s.current_ip().to_string(),
                ip6: s.current_ip6().to_string(),
                public_key: self.node_key().to_base64(),
                registered,
                refused,
                interface: s.interface.clone(),
                dns: s.dns.map(|ip| ip.to_string()),
                tags: tag_list(&book, &self.node_key()),
            }),
            peers,
            policy: Some(policy),
            counters: s
                .counters
                .snapshot()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }
}

/// A member's tags as this node's book holds them.
pub(super) fn tag_list(book: &crate::core::statements::Statements, key: &NodeKey) -> Vec<String> {
    book.tags(key).iter().cloned().collect()
}

/// A peer's path kind and the endpoint it uses: its address, or the coordinator's.
fn describe_route<P: Platform>(dp: &DataPlane<P>, p: &Peer) -> (&'static str, Option<String>) {
    match p.route().route {
        Route::Direct(a) => ("direct", Some(a.to_string())),
        Route::Relay => match dp.relay.load().as_ref() {
            Some(link) if p.relay_id() != 0 => ("relay", Some(link.coordinator.to_string())),
            _ => ("none", p.route().fallback.map(|a| a.to_string())),
        },
    }
}

/// How long `a2actl ping` waits for each answer.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

impl<P: Platform> Daemon<P> {
    async fn dataplane(&self) -> Result<Arc<DataPlane<P>>, CommandError> {
        match self.session.lock().await.as_ref() {
            Some(s) => Ok(s.dataplane.clone()),
            None => Err(CommandError::NotJoined),
        }
    }

    /// One disco probe to `target` (a peer's name or overlay IP) over its current path.
    pub async fn ping(&self, target: &str) -> Result<PingResult, CommandError> {
        let dp = self.dataplane().await?;
        let peer = dp
            .peers
            .find(target)
            .ok_or_else(|| CommandError::NoSuchPeer(target.to_string()))?;
        let (tx, rx) = oneshot::channel();
        dp.path_events
            .send(PathEvent::UserPing(peer.key, tx))
            .await
            .map_err(|_| "the path finder is not running".to_string())?;
        let pong = tokio::time::timeout(PING_TIMEOUT, rx)
            .await
            .ok()
            .and_then(|r| r.ok());
        let (path, endpoint) = match pong.map(|p| p.route) {
            Some(Route::Direct(a)) => ("direct", Some(a.to_string())),
            _ => describe_route(&dp, &peer),
        };
        let info = peer.info();
        Ok(PingResult {
            name: info.name,
            ip: info.ip.to_string(),
            path: path.into(),
            endpoint,
            rtt_ms: pong.map(|p| p.rtt.as_secs_f64() * 1000.0),
        })
    }

    /// IPv6 reachability for netcheck: whether the coordinator answers over IPv6 from the
    /// WireGuard socket (at the connection's address if that is IPv6, else at the token's first
    /// IPv6 endpoint), and the address it saw. `no address` without a global IPv6 address,
    /// `no endpoint` when the token names none, `no answer`, or `reachable`.
    async fn netcheck_ipv6(
        &self,
        dp: &DataPlane<P>,
        coordinator: SocketAddr,
        main: Option<crate::tasks::prober::Answer>,
        local: &[std::net::IpAddr],
        timeout: Duration,
    ) -> (&'static str, Option<String>) {
        let global = local.iter().any(|ip| match ip {
            std::net::IpAddr::V6(v6) => !crate::core::family::is_ula(v6),
            _ => false,
        });
        if !global {
            return ("no address", None);
        }
        let answer = if coordinator.is_ipv6() {
            main
        } else {
            let endpoints = match self.session.lock().await.as_ref() {
                Some(s) => s.member.credential().endpoints().to_vec(),
                None => return ("no endpoint", None),
            };
            let connector = self.platform.connector();
            let mut v6 = None;
            for e in &endpoints {
                if let Ok(addrs) = connector.resolve(e).await {
                    v6 = addrs.into_iter().find(SocketAddr::is_ipv6);
                    if v6.is_some() {
                        break;
                    }
                }
            }
            let Some(c6) = v6 else {
                return ("no endpoint", None);
            };
            dp.prober.probe(&dp.udp, c6, None, 3, timeout).await
        };
        match answer {
            Some(a) => ("reachable", Some(a.observed.to_string())),
            None => ("no answer", None),
        }
    }

    /// Probes the coordinator's two UDP ports from the WireGuard socket.
    pub async fn netcheck(&self) -> Result<NetcheckReport, CommandError> {
        let dp = self.dataplane().await?;
        let link = dp.relay.load_full().ok_or(CommandError::NotConnected(
            "netcheck probes the coordinator this node is registered with",
        ))?;
        let coordinator = link.coordinator;
        let mut alt = coordinator;
        alt.set_port(coordinator.port().wrapping_add(1));
        let timeout = Duration::from_millis(700);
        let main = dp
            .prober
            .probe(&dp.udp, coordinator, None, 3, timeout)
            .await;
        let second = dp.prober.probe(&dp.udp, alt, None, 3, timeout).await;
        let mapping = match (main, second) {
            (Some(a), Some(b)) if a.observed == b.observed => "endpoint-independent",
            (Some(_), Some(_)) => "endpoint-dependent",
            _ => "unknown",
        };
        let (underlay, portmap) = match self.session.lock().await.as_ref() {
            Some(s) => (s.underlay.clone(), s.portmap.clone()),
            None => return Err(CommandError::NotJoined),
        };
        let published = *portmap.published.borrow();
        let portmap = match portmap.report() {
            Some(r) => PortmapReport {
                gateway: r.gateway.map(|g| g.to_string()),
                answered: r.answered.iter().map(|p| p.to_string()).collect(),
                mapped: r.mapping.map(|m| m.external.to_string()),
                protocol: r.mapping.map(|m| m.protocol.name().to_string()),
                lifetime_s: r.mapping.map(|m| m.lifetime.as_secs()),
                published: published.is_some(),
                state: r.state.into(),
            },
            None => PortmapReport {
                state: "off".into(),
                ..Default::default()
            },
        };
        let mut local: Vec<std::net::IpAddr> = underlay
            .local_ipv4()
            .await
            .into_iter()
            .map(Into::into)
            .collect();
        local.extend(
            underlay
                .local_ipv6()
                .await
                .into_iter()
                .map(std::net::IpAddr::V6),
        );
        let (ipv6, reflexive6) = self
            .netcheck_ipv6(&dp, coordinator, main, &local, timeout)
            .await;
        Ok(NetcheckReport {
            ipv6: ipv6.into(),
            reflexive6,
            coordinator: coordinator.to_string(),
            udp: main.is_some(),
            reflexive: main.map(|a| a.observed.to_string()),
            reflexive_alt: second.map(|a| a.observed.to_string()),
            mapping: mapping.into(),
            relay: if link.udp_ok.load(std::sync::atomic::Ordering::Relaxed) {
                "udp"
            } else {
                "tcp"
            }
            .into(),
            coordinator_rtt_ms: main.map(|a| a.rtt.as_secs_f64() * 1000.0),
            local: local.iter().map(|ip| ip.to_string()).collect(),
            portmap,
        })
    }
}

/// Waits until the coordinator has accepted the session's registration.
async fn wait_registered<P: Platform>(s: &Session<P>) -> Result<std::net::Ipv4Addr, CommandError> {
    let mut rx = s.registration.clone();
    let wait = async {
        loop {
            match &*rx.borrow_and_update() {
                Registration::Registered { ip } => return Ok(*ip),
                Registration::Refused(m) => return Err(CommandError::Refused(m.clone())),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(CommandError::Failed("the control client stopped".into()));
            }
        }
    };
    match tokio::time::timeout(UP_TIMEOUT, wait).await {
        Ok(r) => r,
        Err(_) => {
            let why = match &*s.registration.borrow() {
                Registration::Unreachable(m) => m.clone(),
                _ => "no answer".into(),
            };
            Err(CommandError::Failed(format!(
                "could not register with the coordinator within {}s ({why}); check that \
                 a2a-coordinator runs at the token's endpoint and that its TCP and UDP port are reachable",
                UP_TIMEOUT.as_secs()
            )))
        }
    }
}

fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    sanitize_name(host.trim())
}

/// Membership commands: invite, kick, rotate. Each needs the network secret, so only a node
/// that joined with the token can run them.
impl<P: Platform> Daemon<P> {
    #[allow(clippy::type_complexity)]
    async fn member(
        &self,
    ) -> Result<
        (
            Arc<DataPlane<P>>,
            Arc<MemberState>,
            String,
            std::net::Ipv4Addr,
        ),
        CommandError,
    > {
        match self.session.lock().await.as_ref() {
            Some(s) => Ok((
                s.dataplane.clone(),
                s.member.clone(),
                s.name.clone(),
                s.current_ip(),
            )),
            None => Err(CommandError::NotJoined),
        }
    }

    pub(super) fn network_key(
        credential: &Credential,
        what: &'static str,
    ) -> Result<NetworkKey, CommandError> {
        match credential {
            Credential::Secret { token, .. } => Ok(NetworkKey::derive(&token.network_secret)),
            Credential::Invited { .. } => Err(CommandError::NoSecret(what)),
        }
    }

    /// Sends a control message now; an error if the node is not connected.
    pub(super) async fn send_control(
        dp: &DataPlane<P>,
        msg: ControlOut,
    ) -> Result<(), CommandError> {
        let link = dp
            .relay
            .load_full()
            .ok_or(CommandError::NotConnected("try again when it is"))?;
        link.control.send(msg).await.map_err(|_| {
            CommandError::NotConnected("the control connection just closed; try again")
        })
    }

    /// A new invite code good for `uses` joins within `ttl_s` seconds.
    pub async fn invite(
        &self,
        uses: u32,
        ttl_s: u64,
        tags: Vec<String>,
    ) -> Result<String, CommandError> {
        let tags = crate::node::policy::valid_tags(tags)?;
        let (dp, member, _, _) = self.member().await?;
        let credential = member.credential();
        Self::network_key(&credential, "invite")?;
        let ttl_ms = ttl_s.saturating_mul(1000);
        if ttl_ms == 0 || ttl_ms > MAX_INVITE_TTL_MS {
            return Err(CommandError::Failed(format!(
                "--ttl must be between 1s and {}d",
                MAX_INVITE_TTL_MS / 86_400_000
            )));
        }
        if dp.relay.load().is_none() {
            return Err(CommandError::NotConnected(
                "an invite needs it to reach this node",
            ));
        }
        let code = InviteCode {
            secret: rand::random(),
            coordinator_key: credential.coordinator_key(),
            endpoints: credential.endpoints().to_vec(),
        };
        let now = now_ms();
        let id = member
            .invites()
            .open(code.clone(), uses, now + ttl_ms, now)?;
        member.invites().set_tags(&id, tags);
        Self::send_control(&dp, ControlOut::Msg(ClientMsg::InviteOpen { id })).await?;
        tracing::info!("made an invite for {uses} use(s), valid {ttl_s} s");
        Ok(code.encode())
    }

    /// Removes a peer: signs a revocation, drops the peer here, and has the coordinator tell
    /// every member (it also refuses the node from now on).
    pub async fn kick(&self, target: &str) -> Result<(String, String, bool), CommandError> {
        let (dp, member, _, _) = self.member().await?;
        let credential = member.credential();
        let key = Self::network_key(&credential, "kick a peer")?;
        if target == self.node_key().to_base64() {
            return Err(CommandError::Failed(
                "this is this node itself; use `a2actl down` to leave".into(),
            ));
        }
        let peer = dp
            .peers
            .find(target)
            .ok_or_else(|| CommandError::NoSuchPeer(target.to_string()))?;
        let info = peer.info();
        let revocation = Revocation {
            network: key.id(),
            node_key: peer.key,
            issued_ms: now_ms(),
        };
        let signed = Signed::sign(&revocation, &key, REVOKE_CONTEXT);
        if let Some(list) = member.revoke(&revocation, signed.clone()) {
            if let Err(e) = self.state.save_revocations(&list) {
                tracing::warn!("cannot save the revocation list: {e}");
            }
        }
        dp.peers.remove(&peer.key);
        // If the coordinator is unreachable, the revocation is sent when this node registers.
        if let Err(e) = Self::send_control(
            &dp,
            ControlOut::Msg(ClientMsg::Revoke { revocation: signed }),
        )
        .await
        {
            tracing::warn!("revocation kept; it reaches the other members later: {e}");
        }
        tracing::info!("removed peer {} ({})", info.name, info.ip);
        Ok((info.name, info.ip.to_string(), info.cert.is_none()))
    }

    /// Moves the network to a new secret. Every peer in the table (removed ones are not) is
    /// carried: holders of the old secret get the new one, invited nodes a new certificate,
    /// each sealed to its node key. Returns the new token and the names carried.
    pub async fn rotate(&self) -> Result<(String, Vec<String>), CommandError> {
        let (dp, member, name, ip) = self.member().await?;
        let credential = member.credential();
        let old_key = Self::network_key(&credential, "rotate the network secret")?;
        let Credential::Secret { token, .. } = &*credential else {
            unreachable!("network_key checked the credential")
        };
        if dp.relay.load().is_none() {
            return Err(CommandError::NotConnected(
                "the other members learn of the rotation through it",
            ));
        }
        let new_token = JoinToken {
            network_secret: rand::random(),
            ..token.clone()
        };
        let new_key = NetworkKey::derive(&new_token.network_secret);
        let own = x25519_dalek::StaticSecret::from(self.node_private);
        let now = now_ms();
        let mut carried = Vec::new();
        let mut names = Vec::new();
        for p in dp.peers.all() {
            let info = p.info();
            let carry = match &info.cert {
                None => Carry::Secret {
                    secret: NetworkSecret(new_token.network_secret),
                },
                Some(cert) => Carry::Cert {
                    cert: issue_cert(&new_key, p.key, cert.signing_key, cert.invite, now),
                },
            };
            carried.push(RotationNotice::seal(&own, p.key, &new_key.id(), &carry));
            names.push(info.name);
        }
        let notice = RotationNotice {
            old_network: old_key.id(),
            new_network: new_key.id(),
            rotator: self.node_key(),
            issued_ms: now,
            carried,
        };
        let signed = Signed::sign(&notice, &old_key, ROTATE_CONTEXT);
        Self::send_control(&dp, ControlOut::Msg(ClientMsg::Rotate { notice: signed })).await?;
        let text = new_token.encode();
        member.replace_credential(Arc::new(Credential::from_token(new_token)), text.clone());
        if let Err(e) = self.state.save_revocations(&[]) {
            tracing::warn!("cannot clear the saved revocations: {e}");
        }
        self.state
            .save_membership(&member.membership(name, ip))
            .map_err(|e| format!("rotated, but cannot save the new token: {e}"))?;
        // The connection ends after the notice is written; the node registers anew.
        let _ = Self::send_control(&dp, ControlOut::Moved).await;
        tracing::info!(
            "rotated the network secret; {} member(s) carried",
            names.len()
        );
        Ok((text, names))
    }
}
