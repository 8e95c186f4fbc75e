//! In-memory fakes of the I/O contracts, for fast tests without root or sockets: several whole
//! daemons (real boringtun, real coordinator library) in one process on tokio's paused clock.
//!
//! - [`tun::ChannelTun`]: a TUN device made of two queues; the test injects and receives
//!   packets through its [`TunHandle`].
//! - [`net::FakeNet`]: a switched network of hosts, UDP sockets and byte streams, with NAT
//!   routers and impairments.
//! - [`FakePlatform`]: one host of a [`FakeNet`] as a [`Platform`]; [`FakeUnderlay`] its
//!   addresses.
//!
//! They fake the network and the device beneath the daemon, nothing of the daemon itself.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use super::{FastPaths, Platform, SessionIo, Underlay};

pub mod net;
pub mod tun;

pub use net::{FakeConnector, FakeNet, FakeUdp, Host};
pub use tun::{ChannelTun, TunHandle};

/// The underlay of a fake host: its one address, and the overlay address the daemon gave its
/// interface (recorded, for the test to read; nothing routes by it).
pub struct FakeUnderlay {
    ip: Ipv4Addr,
    overlay: Arc<Mutex<Option<(Ipv4Addr, u8)>>>,
}

impl FakeUnderlay {
    /// The underlay of a host at `ip`, with no overlay address yet.
    pub fn new(ip: Ipv4Addr) -> FakeUnderlay {
        FakeUnderlay {
            ip,
            overlay: Arc::default(),
        }
    }

    /// The overlay address set last, with its prefix length.
    pub fn overlay(&self) -> Option<(Ipv4Addr, u8)> {
        *self.overlay.lock().unwrap()
    }
}

impl Underlay for FakeUnderlay {
    /// The host's address (a private one behind a NAT); no loopback, no overlay address.
    async fn local_ipv4(&self) -> Vec<Ipv4Addr> {
        vec![self.ip]
    }

    /// Records `ip/prefix_len`; never fails.
    async fn set_overlay_address(&self, ip: Ipv4Addr, prefix_len: u8) -> Result<(), String> {
        *self.overlay.lock().unwrap() = Some((ip, prefix_len));
        Ok(())
    }
}

/// One host of a [`FakeNet`] as the platform a daemon runs on. Each `open` binds a [`FakeUdp`]
/// on the host's address and makes a [`ChannelTun`]; the test reaches the device of the session
/// opened last through [`tun`](Self::tun), and its overlay address through
/// [`overlay`](Self::overlay).
///
/// What it does not simulate: interface names (two sessions may both open `a2a0`), the TUN
/// offload (never on), and netlink failures.
pub struct FakePlatform {
    host: Host,
    tun: Mutex<Option<TunHandle>>,
    overlay: Arc<Mutex<Option<(Ipv4Addr, u8)>>>,
}

impl FakePlatform {
    pub fn new(host: Host) -> FakePlatform {
        FakePlatform {
            host,
            tun: Mutex::new(None),
            overlay: Arc::default(),
        }
    }

    /// The host it runs on (to impair it, block it, or change its UDP options).
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The test's handle on the TUN device of the session opened last.
    pub fn tun(&self) -> Option<TunHandle> {
        self.tun.lock().unwrap().clone()
    }

    /// The overlay address the daemon set last (through any session's underlay).
    pub fn overlay(&self) -> Option<(Ipv4Addr, u8)> {
        *self.overlay.lock().unwrap()
    }
}

impl Platform for FakePlatform {
    type Udp = FakeUdp;
    type Tun = ChannelTun;
    type Underlay = FakeUnderlay;
    type Connector = FakeConnector;
    /// Unused: the fakes serve nothing on the overlay address (`serve_services` is off).
    type Overlay = crate::io::kernel::KernelOverlay;

    /// Binds UDP `udp_port` on the host (failing, as a real bind, while another socket holds
    /// it), makes a [`ChannelTun`] and sets the overlay address. [`FastPaths`] say what the
    /// fakes do: UDP GSO when the host's sockets take more than one segment, GRO when they
    /// coalesce, never TUN offload.
    async fn open(
        &self,
        _interface: &str,
        udp_port: u16,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<SessionIo<Self>, String> {
        let udp = self
            .host
            .bind_udp(udp_port)
            .map_err(|e| format!("cannot bind UDP port {udp_port}: {e}"))?;
        let options = self.host.udp_options();
        let (tun, handle) = ChannelTun::new();
        let underlay = FakeUnderlay {
            ip: self.host.ip(),
            overlay: self.overlay.clone(),
        };
        underlay.set_overlay_address(ip, prefix_len).await?;
        *self.tun.lock().unwrap() = Some(handle);
        Ok(SessionIo {
            udp,
            tun,
            underlay,
            overlay: crate::io::kernel::KernelOverlay,
            fast: FastPaths {
                tun_offload: false,
                udp_gso: options.max_segments > 1,
                udp_gro: options.gro,
            },
        })
    }

    fn connector(&self) -> FakeConnector {
        self.host.connector()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::io::{Connector, TunDevice, TunReader, TunWriter, UdpTransport};
    use net::{NatKind, UdpOptions};

    #[tokio::test(start_paused = true)]
    async fn a_session_opens_a_socket_and_a_device_the_test_can_reach() {
        let net = FakeNet::new();
        let nat = net.nat("203.0.113.1".parse().unwrap(), NatKind::Easy);
        let platform = FakePlatform::new(nat.host("192.168.1.2".parse().unwrap()));
        let io = platform
            .open("a2a0", 51820, "100.64.0.7".parse().unwrap(), 10)
            .await
            .unwrap();
        assert_eq!(io.udp.local_addr(), "192.168.1.2:51820".parse().unwrap());
        assert_eq!(
            io.fast,
            FastPaths {
                tun_offload: false,
                udp_gso: true,
                udp_gro: false
            }
        );
        assert_eq!(
            io.underlay.local_ipv4().await,
            ["192.168.1.2".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            platform.overlay(),
            Some(("100.64.0.7".parse().unwrap(), 10))
        );
        io.underlay
            .set_overlay_address("100.64.0.8".parse().unwrap(), 10)
            .await
            .unwrap();
        assert_eq!(
            platform.overlay(),
            Some(("100.64.0.8".parse().unwrap(), 10))
        );

        let tun = platform.tun().unwrap();
        tun.inject(vec![0x45; 20]);
        let mut bufs = vec![vec![0u8; 1500]];
        let mut sizes = vec![0];
        let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
        assert_eq!(
            io.tun.reader().read(&mut slices, &mut sizes).await.unwrap(),
            1
        );
        io.tun.writer().write(&mut bufs, 0).await.unwrap();
        assert_eq!(tun.recv().await.unwrap().len(), 1500);

        let err = platform
            .open("a2a1", 51820, "100.64.0.9".parse().unwrap(), 10)
            .await
            .err()
            .unwrap();
        assert!(err.contains("cannot bind UDP port 51820"), "{err}");
        drop(io);
        assert!(platform
            .open("a2a0", 51820, "100.64.0.7".parse().unwrap(), 10)
            .await
            .is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_fast_paths_and_connector_are_the_hosts() {
        let net = FakeNet::new();
        let host = net.host("10.0.0.1".parse().unwrap());
        host.set_udp_options(UdpOptions {
            max_segments: 1,
            gro: true,
        });
        let platform = FakePlatform::new(host);
        let io = platform
            .open("a2a0", 0, "100.64.0.7".parse().unwrap(), 10)
            .await
            .unwrap();
        assert_eq!((io.fast.udp_gso, io.fast.udp_gro), (false, true));
        assert_eq!(io.udp.max_segments(), 1);

        let listener = net.listen_tcp("10.0.0.2:443".parse().unwrap()).unwrap();
        let _stream = platform
            .connector()
            .connect("10.0.0.2:443".parse().unwrap())
            .await
            .unwrap();
        let (_, peer): (_, SocketAddr) = listener.accept().await.unwrap();
        assert_eq!(peer.ip().to_string(), "10.0.0.1");
    }

    /// The daemon's session runs on the fakes: it binds, opens the device, sets the address,
    /// reads what the test injects, keeps retrying a coordinator that refuses, and gives the
    /// port back when stopped.
    #[tokio::test(start_paused = true)]
    async fn a_session_runs_and_stops_on_the_fakes() {
        use crate::core::counters::Counters;
        use crate::node::session::{DeviceConfig, Joining, Session};

        let net = FakeNet::new();
        net.host("198.51.100.1".parse().unwrap()); // up, but nothing listens
        let token = a2a_proto::JoinToken::new_network(
            [7; 32],
            vec!["198.51.100.1:7000".into()],
            "100.64.0.0/10".parse().unwrap(),
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("a2a-fake-session-{}", std::process::id()));
        let platform = FakePlatform::new(net.host("10.0.0.1".parse().unwrap()));
        let device = DeviceConfig {
            interface: "a2a0".into(),
            udp_port: 51820,
            serve_dns: false,
            serve_services: false,
            system_dns: false,
        };
        let ip: Ipv4Addr = "100.64.0.7".parse().unwrap();
        let session = Session::start(
            &platform,
            &device,
            crate::io::state::StateDir::new(&dir),
            Joining {
                node_private: [9; 32],
                credential: a2a_proto::Credential::from_token(token),
                join_text: String::new(),
                name: "n1".into(),
                ip,
                services: Default::default(),
                ssh: tokio::sync::watch::channel(None).1,
            },
        )
        .await
        .unwrap();
        assert_eq!(platform.overlay(), Some((ip, 10)));
        assert!(
            platform.host().bind_udp(51820).is_err(),
            "the session holds it"
        );

        // An IPv4 packet to an overlay address nobody has.
        let mut packet = vec![0u8; 20];
        packet[0] = 0x45;
        packet[3] = 20;
        packet[12..16].copy_from_slice(&ip.octets());
        packet[16..20].copy_from_slice(&[100, 64, 0, 9]);
        platform.tun().unwrap().inject(packet);
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        assert_eq!(Counters::get(&session.counters.tun_no_route), 1);

        session.stop(false).await;
        assert!(platform.host().bind_udp(51820).is_ok(), "given back");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
