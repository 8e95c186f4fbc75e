//! The harness the in-process tests share (`inprocess.rs`, `swarm.rs`): the real coordinator
//! library on the fake network ([`Hub`]), whole daemons on fake hosts ([`Node`]), and waiting
//! on the daemons' clock. Each test file uses what it needs.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use a2a_coordinator::server::{DatagramSink, Server, UdpPort};
use a2a_daemon::io::fake::{FakeNet, FakePlatform, FakeUdp, Host, TunHandle};
use a2a_daemon::io::state::StateDir;
use a2a_daemon::io::UdpTransport;
use a2a_daemon::node::commands::Daemon;
use a2a_daemon::node::session::DeviceConfig;
use a2a_proto::api::{PeerStatus, Status};
use a2a_proto::udp::MAX_A2A_DATAGRAM;
use a2a_proto::JoinToken;
use boringtun::x25519::{PublicKey, StaticSecret};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub const HUB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const HUB_PORT: u16 = 7600;
pub const NODE_PORT: u16 = 51820;

// ------------------------------------------------------------------------------------------
// The coordinator on the fake network
// ------------------------------------------------------------------------------------------

/// Relay data the coordinator sends outside its UDP loop, queued for the loop's socket.
struct ChannelSink(mpsc::UnboundedSender<(SocketAddr, Vec<u8>)>);

impl DatagramSink for ChannelSink {
    fn send_datagram(&self, to: SocketAddr, datagram: &[u8]) -> bool {
        self.0.send((to, datagram.to_vec())).is_ok()
    }
}

/// The real coordinator library serving the fake network at `HUB_IP`: control streams from a
/// fake listener, its two UDP ports from fake sockets. Dropping it (or `stop`) ends every task,
/// which closes every control stream as a killed process would.
pub struct Hub {
    server: Arc<Server>,
    host: Host,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Hub {
    pub fn start(host: &Host, key: [u8; 32]) -> Hub {
        let server = Server::new(key);
        let main = Arc::new(host.bind_udp(HUB_PORT).expect("hub UDP port"));
        let alt = Arc::new(host.bind_udp(HUB_PORT + 1).expect("hub UDP alt port"));
        let listener = host.listen_tcp(HUB_PORT).expect("hub TCP port");
        let (tx, mut rx) = mpsc::unbounded_channel();
        server.set_datagram_sink(Arc::new(ChannelSink(tx)));
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let mut t = tasks.lock().unwrap();
        let (s, conns) = (server.clone(), tasks.clone());
        t.push(tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let conn = tokio::spawn(s.clone().serve_control(stream, peer));
                conns.lock().unwrap().push(conn);
            }
        }));
        // Member changes leave in batches once their window has passed.
        t.push(tokio::spawn(server.clone().fanout_loop()));
        for (udp, port) in [(main.clone(), UdpPort::Main), (alt, UdpPort::Alt)] {
            t.push(tokio::spawn(serve_udp(server.clone(), udp, port)));
        }
        t.push(tokio::spawn(async move {
            while let Some((to, d)) = rx.recv().await {
                let _ = main.send(&d, d.len(), to).await;
            }
        }));
        drop(t);
        Hub {
            server,
            host: host.clone(),
            tasks,
        }
    }

    /// As `kill -9`: every task ends and every control stream is cut.
    pub fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        self.host.cut_streams();
    }

    pub fn counters(&self) -> String {
        self.server.stats_line()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve_udp(server: Arc<Server>, udp: Arc<FakeUdp>, port: UdpPort) {
    let mut buf = vec![0u8; 65536];
    let mut reply = [0u8; MAX_A2A_DATAGRAM];
    loop {
        udp.readable().await;
        while let Ok(Some(got)) = udp.try_recv(&mut buf) {
            for d in buf[..got.len].chunks_mut(got.segment.max(1)) {
                if let Some((to, out)) = server.handle_datagram(got.from, port, d, &mut reply) {
                    let _ = udp.send(out, out.len(), to).await;
                }
            }
        }
    }
}

pub fn coordinator_key() -> ([u8; 32], [u8; 32]) {
    let private: [u8; 32] = rand::random();
    let public = PublicKey::from(&StaticSecret::from(private)).to_bytes();
    (private, public)
}

pub fn token(coordinator_public: [u8; 32]) -> String {
    JoinToken {
        coordinator_key: coordinator_public,
        network_secret: rand::random(),
        prefix: "100.64.0.0/10".parse().unwrap(),
        endpoints: vec![format!("{HUB_IP}:{HUB_PORT}")],
    }
    .encode()
}

// ------------------------------------------------------------------------------------------
// Nodes
// ------------------------------------------------------------------------------------------

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A state directory of its own, removed when the node is dropped.
struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let n = DIRS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("a2a-inproc-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Node {
    pub name: String,
    pub daemon: Daemon<FakePlatform>,
    pub ip: Ipv4Addr,
    _dir: TempDir,
}

impl Node {
    /// A daemon on `host` that joins with `token` as `name`.
    pub async fn join(host: &Host, name: &str, token: &str) -> Node {
        let dir = TempDir::new();
        let device = DeviceConfig {
            interface: "a2a0".into(),
            udp_port: NODE_PORT,
            serve_dns: false,
            serve_services: false,
            system_dns: false,
        };
        let daemon = Daemon::new(
            FakePlatform::new(host.clone()),
            device,
            StateDir::new(&dir.0),
        )
        .unwrap();
        let (ip, _) = daemon
            .up(token, Some(name.into()))
            .await
            .unwrap_or_else(|e| panic!("{name}: up failed: {e}"));
        Node {
            name: name.into(),
            daemon,
            ip: ip.parse().unwrap(),
            _dir: dir,
        }
    }

    pub fn tun(&self) -> TunHandle {
        self.daemon.platform().tun().expect("a session is open")
    }

    pub async fn status(&self) -> Status {
        self.daemon.status().await
    }

    pub async fn peer(&self, other: &Node) -> Option<PeerStatus> {
        self.status()
            .await
            .peers
            .into_iter()
            .find(|p| p.name == other.name)
    }

    pub async fn path_to(&self, other: &Node) -> String {
        self.peer(other)
            .await
            .map(|p| p.path)
            .unwrap_or_else(|| "absent".into())
    }

    pub async fn counter(&self, name: &str) -> u64 {
        *self
            .status()
            .await
            .counters
            .get(name)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Sends `payload` in a UDP packet from this node's overlay address to `to`'s.
    pub fn send(&self, to: &Node, payload: &[u8]) {
        self.tun().inject(ipv4_udp(self.ip, to.ip, payload));
    }
}

/// Waits (on the daemons' clock) until `cond` holds, checking every 50 ms.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next packet `node`'s TUN device gets whose UDP payload is `payload`, within `within`
/// (other packets, such as keepalives' absence or earlier probes, are skipped).
pub async fn receive(node: &Node, payload: &[u8], within: Duration) -> Option<Vec<u8>> {
    let tun = node.tun();
    tokio::time::timeout(within, async {
        loop {
            let p = tun.recv().await?;
            if p.len() >= 28 && &p[28..] == payload {
                return Some(p);
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Sends from `a` to `b` until one arrives (the first may wait for a handshake).
pub async fn reaches(a: &Node, b: &Node, payload: &[u8]) -> bool {
    for _ in 0..20 {
        a.send(b, payload);
        if receive(b, payload, Duration::from_millis(500))
            .await
            .is_some()
        {
            return true;
        }
    }
    false
}

/// An IPv4/UDP packet with a correct header checksum.
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = p[..20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&4000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// A network with a coordinator and its token.
pub struct World {
    pub net: FakeNet,
    pub hub_host: Host,
    pub hub: Hub,
    pub key: [u8; 32],
    pub token: String,
}

impl World {
    /// The public host 198.51.100.`n`.
    pub fn public(&self, n: u8) -> Host {
        self.net.host(Ipv4Addr::new(198, 51, 100, n))
    }

    /// A node on the public host 198.51.100.`n`, joined as `name`.
    pub async fn join(&self, n: u8, name: &str) -> Node {
        Node::join(&self.public(n), name, &self.token).await
    }
}

/// Waits until `a`'s path to `b` is direct.
pub async fn wait_direct(a: &Node, b: &Node, within: Duration) {
    wait_until(within, "a direct path", || async {
        a.path_to(b).await == "direct"
    })
    .await;
}

pub fn world() -> World {
    let net = FakeNet::with_seed(7);
    let hub_host = net.host(HUB_IP);
    let (key, public) = coordinator_key();
    let hub = Hub::start(&hub_host, key);
    World {
        net,
        hub_host,
        hub,
        key,
        token: token(public),
    }
}
