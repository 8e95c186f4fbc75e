//! One membership at run time: the TUN device, the UDP socket, the data-plane loops and the
//! control client, started together and stopped together.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use a2a_proto::{Credential, NetworkId};
use boringtun::x25519::StaticSecret;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use arc_swap::ArcSwapOption;

use crate::control::{ControlClient, Registration};
use crate::dataplane::{Counters, DataPlane};
use crate::membership::MemberState;
use crate::netconf::NetConf;
use crate::pathfinder::PathFinder;
use crate::peers::PeerTable;
use crate::prober::Prober;
use crate::state::StateDir;
use crate::udpbatch;

/// Disco datagrams and path events queued for the path finder (more are dropped and counted).
const PATH_EVENT_QUEUE: usize = 1024;

/// Overlay MTU: 1500 minus the IPv6 (40) + UDP (8) + WireGuard (32) overheads, as wg-quick.
pub const OVERLAY_MTU: u16 = 1420;

/// What `a2ad` was started with.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub interface: String,
    pub udp_port: u16,
}

pub struct Session {
    /// The credential (swapped when the network rotates), invites and revocations.
    pub member: Arc<MemberState>,
    pub name: String,
    pub interface: String,
    pub ip: watch::Receiver<Ipv4Addr>,
    pub registration: watch::Receiver<Registration>,
    pub peers: Arc<PeerTable>,
    pub counters: Arc<Counters>,
    pub dataplane: Arc<DataPlane>,
    leave: watch::Sender<bool>,
    control: JoinHandle<()>,
    loops: Vec<JoinHandle<()>>,
}

impl Session {
    /// Creates the interface and socket and starts the loops. Errors say what failed and what to
    /// do; on error nothing is left behind.
    pub async fn start(
        device: &DeviceConfig,
        node_private: [u8; 32],
        credential: Credential,
        join_text: String,
        state: StateDir,
        name: String,
        ip: Ipv4Addr,
    ) -> Result<Session, String> {
        let udp = UdpSocket::bind(("0.0.0.0", device.udp_port))
            .await
            .map_err(|e| {
                format!(
                    "cannot bind UDP port {}: {e} (is another a2ad or WireGuard using it? start a2ad with --port)",
                    device.udp_port
                )
            })?;
        let fast = allowed("A2A_TUN_OFFLOAD");
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(&device.interface)
                .mtu(OVERLAY_MTU)
                .offload(offload)
                .build_async()
        };
        let tun = match build(fast) {
            Ok(t) => t,
            Err(e) if fast => {
                tracing::warn!("TUN offload unavailable ({e}); using one packet per read/write");
                build(false).map_err(|e| tun_error(&device.interface, e))?
            }
            Err(e) => return Err(tun_error(&device.interface, e)),
        };
        let tun_offload = tun.tcp_gso();
        let udp_fd = std::os::fd::AsRawFd::as_raw_fd(&udp);
        let udp_gso = allowed("A2A_UDP_GSO") && udpbatch::gso_supported(udp_fd);
        let udp_gro = allowed("A2A_UDP_GRO") && udpbatch::enable_gro(udp_fd);
        tracing::info!(
            "data path: TUN offload {}, UDP GSO {}, UDP GRO {}",
            on_off(tun_offload),
            on_off(udp_gso),
            on_off(udp_gro)
        );
        let tun = Arc::new(tun);
        let netconf = NetConf::new().map_err(|e| format!("cannot open netlink: {e}"))?;
        let tun_index = netconf
            .link_index(&device.interface)
            .await
            .map_err(|e| e.to_string())?;
        netconf
            .configure(tun_index, ip, credential.prefix().prefix_len())
            .await
            .map_err(|e| format!("cannot configure {}: {e}", device.interface))?;

        let member = Arc::new(MemberState::new(credential, join_text, state));
        let peers = Arc::new(PeerTable::new(StaticSecret::from(node_private)));
        let counters = Arc::new(Counters::default());
        counters
            .fast_tun_offload
            .store(tun_offload.into(), Ordering::Relaxed);
        counters
            .fast_udp_gso
            .store(udp_gso.into(), Ordering::Relaxed);
        counters
            .fast_udp_gro
            .store(udp_gro.into(), Ordering::Relaxed);
        let (path_tx, path_rx) = mpsc::channel(PATH_EVENT_QUEUE);
        let dataplane = Arc::new(DataPlane {
            tun,
            udp: Arc::new(udp),
            peers: peers.clone(),
            counters: counters.clone(),
            relay: ArcSwapOption::empty(),
            prober: Prober::default(),
            path_events: path_tx,
        });
        let loops = vec![
            tokio::spawn(dataplane.clone().tun_to_udp()),
            tokio::spawn(dataplane.clone().udp_to_tun()),
            tokio::spawn(dataplane.clone().timers()),
            tokio::spawn(PathFinder::new(dataplane.clone()).run(path_rx)),
        ];
        let (status_tx, status_rx) = watch::channel(Registration::Connecting);
        let (ip_tx, ip_rx) = watch::channel(ip);
        let (leave_tx, leave_rx) = watch::channel(false);
        let client = ControlClient {
            member: member.clone(),
            node_private,
            name: name.clone(),
            udp_port: device.udp_port,
            dataplane: dataplane.clone(),
            counters: counters.clone(),
            netconf,
            tun_index,
            status: status_tx,
            ip: ip_tx,
        };
        let control = tokio::spawn(client.run(leave_rx));
        tracing::info!(
            "interface {} up as {ip}, WireGuard on UDP port {}",
            device.interface,
            device.udp_port
        );
        Ok(Session {
            member,
            name,
            interface: device.interface.clone(),
            ip: ip_rx,
            registration: status_rx,
            peers,
            counters,
            dataplane,
            leave: leave_tx,
            control,
            loops,
        })
    }

    /// Stops everything. With `leave`, first tells the coordinator this node leaves, so the
    /// other members drop it at once. Dropping the TUN device removes the interface.
    pub async fn stop(self, leave: bool) {
        let mut control = self.control;
        let mut finished = false;
        if leave {
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
}

/// The offloads (TUN virtio-net header, UDP GSO/GRO) are used unless `A2A_OFFLOAD=0`, or the
/// one named (`A2A_TUN_OFFLOAD`, `A2A_UDP_GSO`, `A2A_UDP_GRO`) is `0`.
fn allowed(name: &str) -> bool {
    let off = |k: &str| std::env::var(k).is_ok_and(|v| v == "0");
    !off("A2A_OFFLOAD") && !off(name)
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn tun_error(interface: &str, e: std::io::Error) -> String {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return format!(
            "cannot create TUN device {interface}: /dev/net/tun does not exist; load the tun \
             module (`modprobe tun`) or, in a container, pass the device through (--device /dev/net/tun)"
        );
    }
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "cannot create TUN device {interface}: permission denied; a2ad needs root or CAP_NET_ADMIN"
        ),
        Some(libc::EBUSY) => format!(
            "cannot create TUN device {interface}: it is in use by another program; start a2ad with --interface"
        ),
        _ => format!("cannot create TUN device {interface}: {e}"),
    }
}
