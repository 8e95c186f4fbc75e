//! The coordinator client's driver: connects over the Noise control channel, and carries out
//! what the I/O-free [`Client`](crate::core::control::Client) decides — registration,
//! heartbeats, peer records, invites, revocations, rotation, reconnecting — on real or fake I/O.
//!
//! While registered it also keeps the relay link: a UDP bind every [`BIND_EVERY`] (which also
//! re-learns the reflexive address, so a roaming node republishes its candidates), relay frames
//! over the connection when UDP binds go unanswered, and punch requests to and from peers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use a2a_proto::control::{ClientMsg, ServerMsg};
use a2a_proto::invite::{InviteAnswer, InviteCode};
use a2a_proto::keys::{CoordinatorKey, RelaySecret, SignerId};
use a2a_proto::membership::{node_signing_key, Invited};
use a2a_proto::noise_channel::{
    handshake_initiator, holds_whole_frame, FrameReader, FrameWriter, HandshakeError, Incoming,
};
use a2a_proto::{Credential, NodeKey};
use tokio::io::{BufReader, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tun_rs::IDEAL_BATCH_SIZE;

use crate::core::control::{Action, Client, End, Next, Registration};
use crate::core::counters::Counters;
use crate::core::path::round_ttl;
use crate::io::state::StateDir;
use crate::io::{Connector, Platform, Underlay};
use crate::tasks::dataplane::DataPlane;
use crate::tasks::events::{ControlOut, PathEvent, RelayLink};
use crate::tasks::policy::PolicyBook;
use crate::tasks::portmap::PortMapLink;
use crate::tasks::{clock, AbortOnDrop};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the coordinator to echo our UDP endpoint.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// The farthest a coordinator is measured ([`Prober::hops`]): beyond, the round TTL is the
/// same anyway.
const MAX_HOPS: u8 = 8;
/// How often the relay bind is refreshed (and the reflexive and local addresses re-checked).
const BIND_EVERY: Duration = Duration::from_secs(5);
/// Frames queued from the packet path for the control connection.
const CONTROL_QUEUE: usize = 4096;
/// Read-ahead buffer of the control connection.
const READ_AHEAD: usize = 64 * 1024;
/// Queued bytes after which the control connection's writer stops gathering and writes.
const WRITE_BATCH: usize = 64 * 1024;

type Stream<P> = <<P as Platform>::Connector as Connector>::Stream;
type Writer<P> = FrameWriter<WriteHalf<Stream<P>>>;

pub struct ControlTask<P: Platform> {
    pub client: Client,
    pub connector: P::Connector,
    pub underlay: Arc<P::Underlay>,
    pub udp_port: u16,
    pub dataplane: Arc<DataPlane<P>>,
    pub node_private: [u8; 32],
    pub state: StateDir,
    pub status: watch::Sender<Registration>,
    /// The current overlay address; changes only when the coordinator reports a conflict.
    pub ip: watch::Sender<std::net::Ipv4Addr>,
    /// The IPv6 overlay address the interface has: it moves with the network id (rotation).
    pub ip6: std::net::Ipv6Addr,
    /// The router's port mapping: this task reports the reflexive address, and publishes the
    /// mapping the port mapper found at it.
    pub portmap: Arc<PortMapLink>,
    /// Where the coordinator's policy and tag statements go (verified there).
    pub policy: Arc<PolicyBook>,
    /// The SSH keys to publish in the record (tasks/ssh.rs keeps them).
    pub ssh: watch::Receiver<Option<a2a_proto::ssh::SshKeys>>,
}

impl<P: Platform> ControlTask<P> {
    /// Runs until `leave` fires (then tells the coordinator) or a permanent refusal.
    pub async fn run(mut self, mut leave: watch::Receiver<bool>) {
        self.restore_peers().await;
        loop {
            self.follow_ip6().await;
            let end = if *leave.borrow() {
                End::Left
            } else {
                self.connection(&mut leave).await
            };
            self.dataplane.relay.store(None);
            self.dataplane.coordinator.store(None);
            if let End::Lost(why) | End::ClosedInHandshake(why) = &end {
                if !matches!(*self.status.borrow(), Registration::Refused(_)) {
                    let _ = self.status.send(Registration::Unreachable(why.clone()));
                }
            }
            match self.client.ended(end) {
                Next::Stop(status) => {
                    if let Some(s) = status {
                        let _ = self.status.send(s);
                    }
                    return;
                }
                Next::MoveAddress(ip) => {
                    let prefix = self.client.credential().prefix();
                    if let Err(e) = self
                        .underlay
                        .set_overlay_address(ip, prefix.prefix_len())
                        .await
                    {
                        tracing::error!("{e}");
                    }
                    let _ = self.ip.send(ip);
                }
                Next::Retry(wait) => {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = leave.changed() => return,
                    }
                }
            }
        }
    }

    /// Brings back the peers of `peers.json` before any coordinator answers: each record
    /// verified again, its tunnel started towards where it was last reached directly. A file
    /// that is not this node's, not of this network, or edited is ignored, with a warning.
    async fn restore_peers(&mut self) {
        let path = self.state.peers_path();
        let file = match self.state.saved_peers() {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                Counters::bump(&self.dataplane.counters.peers_file_refused);
                tracing::warn!("ignoring the saved peers: {e}; the coordinator lists them again");
                return;
            }
        };
        let network = self.client.credential().network_id();
        let saved = match crate::core::offline::open(&file, &self.node_private, &network) {
            Ok(s) => s,
            Err(e) => {
                Counters::bump(&self.dataplane.counters.peers_file_refused);
                tracing::warn!(
                    "ignoring {}: {e}; starting without the saved peers (the coordinator lists \
                     them again)",
                    path.display()
                );
                return;
            }
        };
        let (actions, restored, refused) = self.client.restore(clock(), saved);
        Counters::store(&self.dataplane.counters.peers_restored, restored as u64);
        tracing::info!(
            "restored {restored} peers from {}{}",
            path.display(),
            if refused > 0 {
                format!(" ({refused} records refused: not verified, revoked or taken)")
            } else {
                String::new()
            }
        );
        for action in actions {
            match action {
                Action::Initiate(key) => {
                    if let Some(peer) = self.dataplane.peers.by_key(&key) {
                        self.dataplane.initiate(&peer).await;
                    }
                }
                Action::Candidates(key) => {
                    let _ = self
                        .dataplane
                        .path_events
                        .try_send(PathEvent::Candidates(key));
                }
                _ => {}
            }
        }
    }

    /// Moves the interface's IPv6 overlay address when the network id changed (a rotation
    /// moves the network's /48; peers derive the same new address from their new records), and
    /// the policy book to the new network.
    async fn follow_ip6(&mut self) {
        self.policy.follow(self.client.credential().network_id());
        let own = crate::core::peers::own_key(&self.node_private);
        let ip6 = a2a_proto::overlay::derive_ip6(&self.client.credential().network_id(), &own);
        if ip6 == self.ip6 {
            return;
        }
        match self
            .underlay
            .set_overlay_address6(ip6, a2a_proto::overlay::ULA_PREFIX_LEN)
            .await
        {
            Ok(()) => self.ip6 = ip6,
            Err(e) => tracing::warn!("{e}"),
        }
    }

    async fn locals(&self) -> Vec<SocketAddr> {
        local_addresses(&*self.underlay, self.udp_port).await
    }

    /// One control connection, from connecting to its end.
    async fn connection(&mut self, leave: &mut watch::Receiver<bool>) -> End {
        let cred = self.client.credential();
        let prefer_v6 = self.underlay.local_ipv4().await.is_empty();
        let (stream, coordinator) =
            match connect_any(&self.connector, cred.endpoints(), prefer_v6).await {
                Ok(x) => x,
                Err(e) => return End::Lost(e),
            };
        let mut stream = stream;
        self.dataplane
            .coordinator
            .store(Some(Arc::new(coordinator)));
        // UDP discovery runs during the handshake: without UDP it costs no extra time.
        let coordinator_key = cred.coordinator_key();
        let dp = self.dataplane.clone();
        let (handshake, reflexive, hops) = tokio::join!(
            handshake_initiator(&mut stream, &self.node_private, &coordinator_key),
            async {
                dp.prober
                    .probe(&dp.udp, coordinator, None, 2, PROBE_TIMEOUT)
                    .await
                    .map(|a| a.observed)
            },
            dp.prober
                .hops(&dp.udp, coordinator, MAX_HOPS, PROBE_TIMEOUT)
        );
        let est = match handshake {
            Ok(e) => e,
            Err(e @ HandshakeError::Refused) => return End::Refused(e.to_string()),
            Err(HandshakeError::Closed) => {
                return End::ClosedInHandshake(format!(
                    "coordinator {coordinator} closed the connection during the handshake"
                ))
            }
            Err(e) => return End::Lost(format!("handshake with coordinator failed: {e}")),
        };
        let locals = self.locals().await;
        self.set_round_ttl(reflexive, &locals, hops);
        self.portmap.reflexive.send_replace(reflexive);
        let mut mapped = self.portmap.published.subscribe();
        self.client.mapped(clock(), *mapped.borrow_and_update());
        let mut ssh = self.ssh.clone();
        let keys = ssh.borrow_and_update().clone();
        self.client.set_ssh(clock(), keys);
        // Without a sender (tests), nothing ever changes: stop asking.
        let mut ssh_open = true;
        let register =
            self.client
                .connected(clock(), &est.handshake_hash, reflexive, locals.clone());
        let (r, w) = tokio::io::split(stream);
        // Read ahead: the TCP relay's frames come many to a segment.
        let r = BufReader::with_capacity(READ_AHEAD, r);
        let (reader, mut writer) = est.split(r, w);
        if let Err(e) = writer.send(&register).await {
            return End::Lost(format!("sending registration failed: {e}"));
        }

        // Reading is not cancellation-safe (a frame read half-way would be lost), so one task
        // owns the reader: it hands relay data straight to the packet path and messages here.
        let (msgs_tx, mut msgs) = mpsc::channel::<std::io::Result<ServerMsg>>(256);
        let _reader = AbortOnDrop(tokio::spawn(read_loop::<P>(
            reader,
            self.dataplane.clone(),
            msgs_tx,
        )));
        let (control_tx, mut control_rx) = mpsc::channel(CONTROL_QUEUE);
        let mut link = Link {
            coordinator,
            reflexive,
            control: control_tx,
            binder: None,
        };
        let (addrs_tx, mut addrs_rx) = watch::channel((reflexive, locals));
        let mut sweep = tokio::time::interval(crate::core::control::SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let deadline = self
                .client
                .poll_timeout()
                .map(tokio::time::Instant::from_std);
            let actions = tokio::select! {
                msg = msgs.recv() => match msg {
                    Some(Ok(msg)) => self.client.handle(clock(), msg),
                    Some(Err(e)) => return End::Lost(format!("coordinator connection lost: {e}")),
                    None => return End::Lost("coordinator connection lost".into()),
                },
                out = control_rx.recv() => {
                    // What else is waiting goes in the same write (relay data comes in runs).
                    let mut next = out;
                    let mut moved = false;
                    while let Some(out) = next.take() {
                        let queued = match out {
                            ControlOut::Relay(id, payload) => writer.queue_relay(id, &payload),
                            ControlOut::Punch(to) => writer.queue(&ClientMsg::Punch { to }),
                            ControlOut::Msg(m) => writer.queue(&m),
                            ControlOut::Moved => {
                                moved = true;
                                break;
                            }
                        };
                        if let Err(e) = queued {
                            return End::Lost(format!("coordinator connection lost: {e}"));
                        }
                        if writer.queued() < WRITE_BATCH {
                            next = control_rx.try_recv().ok();
                        }
                    }
                    if let Err(e) = writer.flush().await {
                        return End::Lost(format!("coordinator connection lost: {e}"));
                    }
                    if moved {
                        return End::Moved;
                    }
                    continue;
                }
                _ = sleep_until(deadline) => self.client.handle_timeout(clock()),
                _ = sweep.tick() => self.client.sweep(clock()),
                changed = addrs_rx.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let (reflexive, locals) = addrs_rx.borrow_and_update().clone();
                    self.set_round_ttl(reflexive, &locals, hops);
                    self.portmap.reflexive.send_if_modified(|r| {
                        let changed = *r != reflexive;
                        *r = reflexive;
                        changed
                    });
                    self.client.addresses(clock(), reflexive, &locals)
                }
                changed = mapped.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let m = *mapped.borrow_and_update();
                    self.client.mapped(clock(), m)
                }
                changed = ssh.changed(), if ssh_open => {
                    if changed.is_err() {
                        ssh_open = false;
                        continue;
                    }
                    let keys = ssh.borrow_and_update().clone();
                    self.client.set_ssh(clock(), keys)
                }
                _ = leave.changed() => {
                    leave_gracefully(&mut writer, &mut msgs).await;
                    return End::Left;
                }
            };
            if let Some(end) = self
                .carry_out(actions, &mut writer, &mut link, &addrs_tx)
                .await
            {
                return end;
            }
        }
    }

    /// Sets the TTL of the path finder's upgrade rounds from what this connection learnt.
    fn set_round_ttl(
        &self,
        reflexive: Option<SocketAddr>,
        locals: &[SocketAddr],
        hops: Option<u8>,
    ) {
        let mut own: Vec<SocketAddr> = reflexive
            .into_iter()
            .chain(locals.iter().copied())
            .collect();
        own.dedup();
        self.dataplane.own_addrs.store(Arc::new(own));
        let ttl = round_ttl(reflexive, locals, hops);
        let was = self
            .dataplane
            .round_ttl
            .swap(ttl.unwrap_or(0), Ordering::Relaxed);
        if was != ttl.unwrap_or(0) {
            tracing::info!(
                "upgrade rounds probe with TTL {ttl:?} (coordinator {hops:?} hops away)"
            );
        }
    }

    /// Carries out the client's actions in order; `Some` ends the connection.
    async fn carry_out(
        &self,
        actions: Vec<Action>,
        writer: &mut Writer<P>,
        link: &mut Link,
        addrs: &watch::Sender<(Option<SocketAddr>, Vec<SocketAddr>)>,
    ) -> Option<End> {
        let dp = &self.dataplane;
        for action in actions {
            match action {
                Action::Send(m) => {
                    if let Err(e) = writer.send(&m).await {
                        return Some(End::Lost(format!("coordinator connection lost: {e}")));
                    }
                }
                Action::BindRelay { relay_id, secret } => {
                    // Skipped when UDP already failed: relay over the connection.
                    let udp_ok = match link.reflexive {
                        Some(_) => dp
                            .prober
                            .probe(
                                &dp.udp,
                                link.coordinator,
                                Some((relay_id, secret)),
                                2,
                                PROBE_TIMEOUT,
                            )
                            .await
                            .is_some(),
                        None => false,
                    };
                    let relay = Arc::new(RelayLink {
                        coordinator: link.coordinator,
                        udp_ok: AtomicBool::new(udp_ok),
                        control: link.control.clone(),
                    });
                    dp.relay.store(Some(relay.clone()));
                    link.binder = Some(AbortOnDrop(tokio::spawn(bind_loop(
                        dp.clone(),
                        self.underlay.clone(),
                        self.udp_port,
                        relay,
                        (relay_id, secret),
                        addrs.clone(),
                    ))));
                }
                Action::Initiate(key) => {
                    if let Some(peer) = dp.peers.by_key(&key) {
                        dp.initiate(&peer).await;
                    }
                }
                Action::Candidates(key) => {
                    let _ = dp.path_events.try_send(PathEvent::Candidates(key));
                }
                Action::Punch(key) => {
                    let _ = dp.path_events.try_send(PathEvent::Punch(key));
                }
                Action::Status(s) => {
                    if let Registration::Registered { ip } = &s {
                        tracing::info!("registered with the coordinator as {ip}");
                    }
                    let _ = self.status.send(s);
                }
                Action::SaveRevocations(list) => {
                    if let Err(e) = self.state.save_revocations(&list) {
                        tracing::warn!("cannot save the revocation list: {e}");
                    }
                }
                Action::Statement(signed) => {
                    let _ = self.policy.offer(&signed);
                }
                Action::SavePeers(file) => {
                    if let Err(e) = self.state.save_peers(&file) {
                        tracing::warn!("cannot save the peer list: {e}");
                    }
                }
                Action::SaveMembership(m) => {
                    if let Err(e) = self.state.save_membership(&m) {
                        tracing::warn!("moved to the rotated network, but cannot save it: {e}");
                    }
                }
                Action::End(end) => return Some(end),
            }
        }
        None
    }
}

/// The relay side of one connection.
struct Link {
    coordinator: SocketAddr,
    reflexive: Option<SocketAddr>,
    control: mpsc::Sender<ControlOut>,
    binder: Option<AbortOnDrop>,
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Redeems an invite code at its coordinator: proves the code for this node's key, and opens
/// the inviter's sealed answer (the member certificate) into a credential to register with.
pub async fn redeem_invite<C: Connector>(
    connector: &C,
    code: &InviteCode,
    node_private: &[u8; 32],
) -> Result<Invited, String> {
    // IPv4 first: on a host without IPv4 that fails at once (no route) and IPv6 is next.
    let (mut stream, coordinator) = connect_any(connector, &code.endpoints, false).await?;
    let est = handshake_initiator(&mut stream, node_private, &code.coordinator_key)
        .await
        .map_err(|e| format!("handshake with coordinator {coordinator} failed: {e}"))?;
    let node_key = NodeKey(
        boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(*node_private))
            .to_bytes(),
    );
    let signing_key = SignerId::from(node_signing_key(node_private).verifying_key());
    let (r, w) = tokio::io::split(stream);
    let (mut reader, mut writer) = est.split(r, w);
    writer
        .send(&ClientMsg::Redeem {
            invite: code.id(),
            proof: code.proof(&node_key, &signing_key),
            signing_key,
        })
        .await
        .map_err(|e| format!("coordinator connection lost: {e}"))?;
    let answer = tokio::time::timeout(Duration::from_secs(15), reader.recv::<ServerMsg>())
        .await
        .map_err(|_| "no answer to the invite within 15 s".to_string())?
        .map_err(|e| format!("coordinator closed the connection: {e}"))?;
    let sealed = match answer {
        ServerMsg::InviteAdmitted { sealed } => sealed,
        ServerMsg::Refused { message, .. } => return Err(format!("invite refused: {message}")),
        _ => return Err("unexpected answer from the coordinator".into()),
    };
    let Some(InviteAnswer::Admitted {
        network,
        prefix,
        cert,
    }) = code.open_answer(&node_key, &sealed)
    else {
        return Err(
            "the answer to the invite is not sealed with this invite: refusing it (a forged \
             coordinator?)"
                .into(),
        );
    };
    let invited = Invited {
        coordinator_key: CoordinatorKey(code.coordinator_key),
        endpoints: code.endpoints.clone(),
        prefix,
        network,
        cert,
    };
    // Checks that the certificate is for this node and this network.
    Credential::from_invited(invited.clone(), node_private)?;
    Ok(invited)
}

/// Connects to the first coordinator address that answers: every address the endpoints name,
/// in their order, but those of the preferred family first ([`coordinator_order`]).
async fn connect_any<C: Connector>(
    connector: &C,
    endpoints: &[String],
    prefer_v6: bool,
) -> Result<(C::Stream, SocketAddr), String> {
    let mut last = String::from("no endpoint");
    let mut addrs = Vec::new();
    for endpoint in endpoints {
        match connector.resolve(endpoint).await {
            Ok(a) => addrs.extend(a),
            Err(e) => last = format!("cannot resolve {endpoint}: {e}"),
        }
    }
    for addr in coordinator_order(addrs, prefer_v6) {
        match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(addr)).await {
            Ok(Ok(s)) => return Ok((s, addr)),
            Ok(Err(e)) => last = format!("cannot connect to coordinator {addr}: {e}"),
            Err(_) => last = format!("coordinator {addr} did not answer"),
        }
    }
    Err(last)
}

/// The order a node tries a coordinator's addresses in: IPv4 ones first when the host has an
/// IPv4 address (the coordinator's answer over IPv4 is how the node learns its reflexive IPv4
/// address, which IPv4-only peers need to punch to it; its IPv6 addresses need no discovery,
/// there being no NAT66), IPv6 ones first when it has none; each family in the token's order,
/// and the other family when the first fails.
fn coordinator_order(mut addrs: Vec<SocketAddr>, prefer_v6: bool) -> Vec<SocketAddr> {
    addrs.dedup();
    addrs.sort_by_key(|a| a.is_ipv6() != prefer_v6);
    addrs
}

/// This node's local addresses with the WireGuard port.
async fn local_addresses<U: Underlay>(underlay: &U, port: u16) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = underlay
        .local_ipv4()
        .await
        .into_iter()
        .map(|ip| SocketAddr::new(ip.into(), port))
        .collect();
    v.extend(
        underlay
            .local_ipv6()
            .await
            .into_iter()
            .map(|ip| SocketAddr::new(ip.into(), port)),
    );
    v.sort();
    v.dedup();
    v
}

/// Refreshes the UDP relay bind every [`BIND_EVERY`]; reports the reflexive address (as the
/// bind's answer shows it) and local addresses whenever they change.
async fn bind_loop<P: Platform>(
    dp: Arc<DataPlane<P>>,
    underlay: Arc<P::Underlay>,
    port: u16,
    link: Arc<RelayLink>,
    relay: (u32, RelaySecret),
    addrs: watch::Sender<(Option<SocketAddr>, Vec<SocketAddr>)>,
) {
    let mut every = tokio::time::interval(BIND_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        let answer = dp
            .prober
            .probe(&dp.udp, link.coordinator, Some(relay), 2, PROBE_TIMEOUT)
            .await;
        let was = link.udp_ok.swap(answer.is_some(), Ordering::Relaxed);
        if was != answer.is_some() {
            tracing::info!(
                "relay over {}",
                if answer.is_some() {
                    "UDP"
                } else {
                    "the control connection (UDP to the coordinator gets no answer)"
                }
            );
        }
        let locals = local_addresses(&*underlay, port).await;
        let reflexive = answer.map(|a| a.observed).or(addrs.borrow().0);
        addrs.send_if_modified(|cur| {
            let new = (reflexive, locals);
            if *cur != new {
                *cur = new;
                true
            } else {
                false
            }
        });
    }
}

async fn leave_gracefully<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    msgs: &mut mpsc::Receiver<std::io::Result<ServerMsg>>,
) {
    let _ = writer.send(&ClientMsg::Leave).await;
    let _ = writer.shutdown().await;
    // Wait briefly for the coordinator to close, so the leave is processed before we vanish.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(Ok(_)) = msgs.recv().await {}
    })
    .await;
}

/// Owns the connection's reading half: relay data goes to the packet path, messages (and the
/// error that ends the stream) to the connection.
async fn read_loop<P: Platform>(
    mut reader: FrameReader<BufReader<ReadHalf<Stream<P>>>>,
    dp: Arc<DataPlane<P>>,
    msgs: mpsc::Sender<std::io::Result<ServerMsg>>,
) {
    // Relayed packets are written to the TUN device in batches: once nothing more is read
    // ahead (before waiting on the socket), or when the batch is full.
    let mut buf = dp.tun_batch(IDEAL_BATCH_SIZE);
    loop {
        if !holds_whole_frame(reader.get_ref().buffer()) {
            dp.flush_rx(&mut buf).await;
        }
        match reader.recv_frame_ref::<ServerMsg>().await {
            Ok(Incoming::Relay(src, payload)) => {
                dp.receive_relayed_tcp(src, payload, &mut buf).await;
                if buf.is_full() {
                    dp.flush_rx(&mut buf).await;
                }
            }
            Ok(Incoming::Msg(m)) => {
                if msgs.send(Ok(m)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = msgs.send(Err(e.into())).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_addresses_of_the_preferred_family_come_first() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let token = vec![
            a("[2001:db8::7]:7600"),
            a("198.51.100.7:7600"),
            a("[2001:db8::8]:7600"),
            a("198.51.100.8:7600"),
        ];
        assert_eq!(
            coordinator_order(token.clone(), false),
            vec![token[1], token[3], token[0], token[2]]
        );
        assert_eq!(
            coordinator_order(token.clone(), true),
            vec![token[0], token[2], token[1], token[3]]
        );
    }
}
