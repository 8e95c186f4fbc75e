//! One membership at run time: the session's I/O (TUN device, UDP socket, underlay), the
//! packet-path loops, the path finder and the control client, started together and stopped
//! together.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use a2a_proto::overlay::{derive_ip6, ULA_PREFIX_LEN};
use a2a_proto::{Credential, NetworkId};
use arc_swap::ArcSwapOption;
use boringtun::x25519::StaticSecret;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::core::control::{Client, Registration};
use crate::core::counters::Counters;
use crate::core::membership::MemberState;
use crate::core::peers::PeerTable;
use crate::core::policy::{Rules, Tracker};
use crate::io::state::StateDir;
use crate::io::{Platform, UdpTransport, Underlay};
use crate::tasks::control::ControlTask;
use crate::tasks::dataplane::DataPlane;
use crate::tasks::dns::DnsTask;
use crate::tasks::now;
use crate::tasks::pathfinder::PathFinder;
use crate::tasks::policy::{PolicyBook, PolicyTask};
use crate::tasks::portmap::{PortMapLink, PortMapTask};
use crate::tasks::prober::Prober;
use crate::tasks::services::{RemoteLists, ServiceBook, ServicesTask};

/// Disco datagrams and path events queued for the path finder (more are dropped and counted).
const PATH_EVENT_QUEUE: usize = 1024;

/// What `a2ad` was started with.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub interface: String,
    pub udp_port: u16,
    /// Serve the overlay's names (tasks/dns.rs) on the resolver's address; the fakes do not.
    pub serve_dns: bool,
    /// Serve this node's services to members and fetch theirs (tasks/services.rs), and pass
    /// the policy member to member (tasks/policy.rs), on the overlay address (the kernel's or
    /// the userspace stack's sockets); the fakes do not (they bind real sockets).
    pub serve_services: bool,
    /// Register that resolver with the host's (systemd-resolved) for `~a2a`; off with
    /// `a2ad --no-system-dns`.
    pub system_dns: bool,
}

pub struct Session<P: Platform> {
    /// The credential (swapped when the network rotates), invites and revocations.
    pub member: Arc<MemberState>,
    pub name: String,
    pub interface: String,
    pub ip: watch::Receiver<Ipv4Addr>,
    pub registration: watch::Receiver<Registration>,
    pub peers: Arc<PeerTable>,
    pub counters: Arc<Counters>,
    pub dataplane: Arc<DataPlane<P>>,
    pub underlay: Arc<P::Underlay>,
    /// The router's port mapping of the WireGuard port.
    pub portmap: Arc<PortMapLink>,
    /// Where the overlay resolver answers, when it does.
    pub dns: Option<Ipv4Addr>,
    /// The service lists fetched from peers.
    pub remote_services: RemoteLists,
    /// The network's policy and tags as this node holds them.
    pub policy: Arc<PolicyBook>,
    services_task: Option<JoinHandle<()>>,
    policy_task: JoinHandle<()>,
    dns_task: Option<JoinHandle<()>>,
    /// Whether the resolver was registered with systemd-resolved (undone at stop).
    system_dns: bool,
    leave: watch::Sender<bool>,
    control: JoinHandle<()>,
    /// Fired when the session stops: the port mapper deletes its mapping.
    portmap_stop: watch::Sender<bool>,
    portmapper: JoinHandle<()>,
    loops: Vec<JoinHandle<()>>,
    /// The overlay address's sockets, when a2ad serves members on it (the leave notice goes
    /// out through them).
    overlay: Option<P::Overlay>,
}

/// Who and where a session is.
pub struct Joining {
    pub node_private: [u8; 32],
    pub credential: Credential,
    pub join_text: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// This node's services, served to members (tasks/services.rs).
    pub services: Arc<ServiceBook>,
    /// The SSH keys to publish in the record.
    pub ssh: watch::Receiver<Option<a2a_proto::ssh::SshKeys>>,
}

impl<P: Platform> Session<P> {
    /// Opens the session's I/O and starts the loops. Errors say what failed and what to do; on
    /// error nothing is left behind.
    pub async fn start(
        platform: &P,
        device: &DeviceConfig,
        state: StateDir,
        joining: Joining,
    ) -> Result<Session<P>, String> {
        let Joining {
            node_private,
            credential,
            join_text,
            name,
            ip,
            services,
            ssh,
        } = joining;
        let prefix_len = credential.prefix().prefix_len();
        let dns_ip = a2a_proto::overlay::dns_ip(credential.prefix());
        let io = platform
            .open(&device.interface, device.udp_port, ip, prefix_len)
            .await?;
        let ip6 = derive_ip6(
            &credential.network_id(),
            &crate::core::peers::own_key(&node_private),
        );
        if let Err(e) = io.underlay.set_overlay_address6(ip6, ULA_PREFIX_LEN).await {
            tracing::warn!("{e}");
        }
        let overlay = io.overlay;
        let counters = Arc::new(Counters::default());
        let policy = Arc::new(PolicyBook::load(
            state.clone(),
            credential.network_id(),
            counters.clone(),
        ));
        let member = Arc::new(MemberState::new(credential, join_text, state.revocations()));
        let peers = Arc::new(PeerTable::new(StaticSecret::from(node_private), now()));
        Counters::set(&counters.fast_tun_offload, io.fast.tun_offload);
        Counters::set(
            &counters.fast_udp_gso,
            io.fast.udp_gso && io.udp.max_segments() > 1,
        );
        Counters::set(&counters.fast_udp_gro, io.fast.udp_gro);
        let (path_tx, path_rx) = mpsc::channel(PATH_EVENT_QUEUE);
        let dataplane = Arc::new(DataPlane {
            tun: io.tun,
            udp: io.udp,
            peers: peers.clone(),
            counters: counters.clone(),
            relay: ArcSwapOption::empty(),
            coordinator: ArcSwapOption::empty(),
            prober: Prober::default(),
            path_events: path_tx,
            round_ttl: Default::default(),
            own_addrs: Default::default(),
            policy: std::sync::Mutex::new(Tracker::new(Rules::AllowAll)),
        });
        let loops = vec![
            tokio::spawn(dataplane.clone().tun_to_udp()),
            tokio::spawn(dataplane.clone().udp_to_tun()),
            tokio::spawn(dataplane.clone().timers()),
            tokio::spawn(PathFinder::new(dataplane.clone()).run(path_rx)),
        ];
        let underlay = Arc::new(io.underlay);
        let (status_tx, status_rx) = watch::channel(Registration::Connecting);
        let (ip_tx, ip_rx) = watch::channel(ip);
        let (leave_tx, leave_rx) = watch::channel(false);
        let portmap = Arc::new(PortMapLink::default());
        let (portmap_stop, portmap_stop_rx) = watch::channel(false);
        let portmapper = tokio::spawn(
            PortMapTask {
                underlay: underlay.clone(),
                udp_port: device.udp_port,
                link: portmap.clone(),
                counters: counters.clone(),
            }
            .run(portmap_stop_rx),
        );
        let task = ControlTask {
            client: Client::new(
                member.clone(),
                peers.clone(),
                counters.clone(),
                node_private,
                name.clone(),
                ip,
            ),
            connector: platform.connector(),
            underlay: underlay.clone(),
            udp_port: device.udp_port,
            dataplane: dataplane.clone(),
            node_private,
            state,
            status: status_tx,
            ip: ip_tx,
            ip6,
            portmap: portmap.clone(),
            policy: policy.clone(),
            ssh,
        };
        let control = tokio::spawn(task.run(leave_rx));
        let policy_task = tokio::spawn(
            PolicyTask {
                book: policy.clone(),
                dataplane: dataplane.clone(),
                peers: peers.clone(),
                counters: counters.clone(),
                name: name.clone(),
                ip: ip_rx.clone(),
                registration: status_rx.clone(),
                gossip: device.serve_services,
                net: overlay.clone(),
            }
            .run(),
        );
        platform.attach(crate::io::SessionView {
            name: name.clone(),
            peers: peers.clone(),
            counters: counters.clone(),
            dns_ip,
            ip: ip_rx.clone(),
        });
        let remote_services = RemoteLists::default();
        let sd_services = {
            let (book, remote, peers, name) = (
                services.clone(),
                remote_services.clone(),
                peers.clone(),
                name.clone(),
            );
            move || crate::tasks::services::sd_services(&book, &remote, &peers, &name)
        };
        let services_task = device.serve_services.then(|| {
            tokio::spawn(
                ServicesTask {
                    net: overlay.clone(),
                    cards_on_overlay: !platform.userspace(),
                    book: services,
                    peers: peers.clone(),
                    counters: counters.clone(),
                    ip: ip_rx.clone(),
                    ip6: {
                        let (member, peers) = (member.clone(), peers.clone());
                        Arc::new(move || {
                            derive_ip6(&member.credential().network_id(), &peers.own_key())
                        })
                    },
                    remote: remote_services.clone(),
                }
                .run(),
            )
        });
        let (mut dns, mut dns_task) = (None, None);
        if device.serve_dns {
            match crate::tasks::dns::bind(dns_ip).await {
                Ok(sockets) => {
                    let task = DnsTask {
                        counters: counters.clone(),
                        peers: peers.clone(),
                        name: name.clone(),
                        ip: ip_rx.clone(),
                        ip6: {
                            let (member, peers) = (member.clone(), peers.clone());
                            Box::new(move || {
                                derive_ip6(&member.credential().network_id(), &peers.own_key())
                            })
                        },
                        dns_ip,
                        upstreams: crate::tasks::dns::host_upstreams(dns_ip),
                        services: Box::new(sd_services),
                        prefixes: {
                            let member = member.clone();
                            Box::new(move || {
                                let c = member.credential();
                                (c.prefix(), a2a_proto::overlay::ula_prefix(&c.network_id()))
                            })
                        },
                    };
                    if task.upstreams.is_empty() {
                        tracing::warn!(
                            "no resolver in /etc/resolv.conf besides a2ad: names outside .a2a \
                             get SERVFAIL from {dns_ip}"
                        );
                    }
                    dns_task = Some(tokio::spawn(task.run(sockets)));
                    dns = Some(dns_ip);
                    tracing::info!(
                        "overlay names (NAME.a2a) answered at {dns_ip}, UDP and TCP port 53"
                    );
                    if device.system_dns {
                        crate::tasks::dns::system::register(&device.interface, dns_ip).await;
                    }
                }
                Err(e) => tracing::warn!("{e}; the overlay's names are not served"),
            }
        }
        if platform.userspace() {
            tracing::info!(
                "userspace stack up as {ip} and {ip6}, WireGuard on UDP port {}",
                device.udp_port
            );
        } else {
            tracing::info!(
                "interface {} up as {ip} and {ip6}, WireGuard on UDP port {}",
                device.interface,
                device.udp_port
            );
        }
        Ok(Session {
            member,
            name,
            interface: device.interface.clone(),
            ip: ip_rx,
            registration: status_rx,
            peers,
            counters,
            dataplane,
            underlay,
            portmap,
            dns,
            remote_services,
            policy,
            services_task,
            policy_task,
            dns_task,
            system_dns: device.system_dns,
            leave: leave_tx,
            control,
            portmap_stop,
            portmapper,
            loops,
            overlay: device.serve_services.then(|| overlay.clone()),
        })
    }

    /// Stops everything. With `leave`, first tells the coordinator this node leaves, so the
    /// other members drop it at once. Dropping the TUN device removes the interface.
    pub async fn stop(self, leave: bool) {
        // The router's mapping is deleted while the coordinator hears of the leave.
        let _ = self.portmap_stop.send(true);
        let mut portmapper = self.portmapper;
        let mut control = self.control;
        let mut finished = false;
        if leave {
            // The members hear it from this node itself, through its tunnels (so they drop it
            // at once, which the coordinator's word alone would not make them do), then from
            // the coordinator.
            if let Some(net) = &self.overlay {
                let own = *self.ip.borrow();
                crate::tasks::policy::say_leaving(net, own, &self.peers).await;
            }
            let _ = self.leave.send(true);
            finished = tokio::time::timeout(std::time::Duration::from_secs(2), &mut control)
                .await
                .is_ok();
        }
        // Every task holding the device or socket must be gone before they can be reused.
        if !finished {
            control.abort();
            let _ = control.await;
        }
        // (At most one HTTP exchange with a UPnP router, 2 s.)
        if tokio::time::timeout(std::time::Duration::from_millis(2500), &mut portmapper)
            .await
            .is_err()
        {
            portmapper.abort();
        }
        if let Some(t) = self.services_task {
            t.abort();
            let _ = t.await;
        }
        self.policy_task.abort();
        let _ = self.policy_task.await;
        if let Some(t) = self.dns_task {
            t.abort();
            let _ = t.await;
            if self.system_dns {
                crate::tasks::dns::system::revert(&self.interface).await;
            }
        }
        for l in &self.loops {
            l.abort();
        }
        for l in self.loops {
            let _ = l.await;
        }
        self.peers.clear();
    }

    /// The network this session is in now.
    pub fn network_id(&self) -> NetworkId {
        self.member.credential().network_id()
    }

    pub fn current_ip(&self) -> Ipv4Addr {
        *self.ip.borrow()
    }

    /// This node's IPv6 overlay address in the network it is in now.
    pub fn current_ip6(&self) -> Ipv6Addr {
        derive_ip6(&self.network_id(), &self.peers.own_key())
    }
}
