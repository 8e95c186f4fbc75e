//! A coordinator that records: the real `a2a-coordinator` server with the test-only hook
//! recording everything nodes send it, so a test can show what the hub could learn.
//! `tests/services.rs` runs it and shows that no service name, port or agent card text is in
//! the recording.
//!
//! Arguments (the subset of a2a-coordinator's the harness passes): `--listen ADDR:PORT
//! --state-dir DIR [--prefix CIDR] [--endpoint HOST:PORT] --record FILE`. Prints `join token: …`
//! like the real one.
//!
//! The recording (appended to FILE, written as it comes): for each control message a node
//! sends, decrypted, a line `msg DEBUG` (its Rust Debug rendering) and a line `json JSON` (as
//! it travels inside the Noise channel); for each datagram (over UDP, or relay data framed on a
//! control connection) a line `datagram LEN`, then its LEN bytes as they came, then a newline.

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use a2a_coordinator::server::{Injected, Server, Tamper};
use a2a_proto::control::ClientMsg;
use a2a_proto::{JoinToken, NetworkId, NodeKey, SignedRecord};
use boringtun::x25519::{PublicKey, StaticSecret};

struct Recorder {
    file: Mutex<File>,
}

impl Recorder {
    fn write(&self, bytes: &[u8]) {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        f.write_all(bytes).expect("write the recording");
    }
}

impl Tamper for Recorder {
    fn after_register(&self, _: &NetworkId, _: &SignedRecord) -> Vec<(NodeKey, Injected)> {
        Vec::new()
    }

    fn saw_message(&self, msg: &ClientMsg) {
        let json = serde_json::to_string(msg).unwrap_or_default();
        self.write(format!("msg {msg:?}\njson {json}\n").as_bytes());
    }

    fn saw_datagram(&self, datagram: &[u8]) {
        let mut out = format!("datagram {}\n", datagram.len()).into_bytes();
        out.extend_from_slice(datagram);
        out.push(b'\n');
        self.write(&out);
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen: SocketAddr = arg(&args, "--listen")
        .expect("--listen ADDR:PORT")
        .parse()
        .expect("--listen is ADDR:PORT");
    let state_dir = std::path::PathBuf::from(arg(&args, "--state-dir").expect("--state-dir DIR"));
    let record = arg(&args, "--record").expect("--record FILE");
    let prefix: ipnet::Ipv4Net = arg(&args, "--prefix")
        .unwrap_or_else(|| a2a_proto::overlay::DEFAULT_PREFIX.into())
        .parse()
        .expect("--prefix is a CIDR");
    let endpoint = arg(&args, "--endpoint").unwrap_or_else(|| listen.to_string());
    a2a_proto::process::init_logging();

    let file = File::options()
        .create(true)
        .append(true)
        .open(&record)
        .unwrap_or_else(|e| panic!("cannot open the recording {record}: {e}"));
    let (private, _) = a2a_proto::keyfile::load_or_create(&state_dir.join("coordinator.key"))
        .expect("coordinator key");
    let public = PublicKey::from(&StaticSecret::from(private)).to_bytes();
    let token = JoinToken::new_network(public, vec![endpoint], prefix).expect("token");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let tcp = tokio::net::TcpListener::bind(listen)
            .await
            .expect("TCP listen");
        let udp = tokio::net::UdpSocket::bind(listen)
            .await
            .expect("UDP listen");
        let mut alt = listen;
        alt.set_port(listen.port() + 1);
        let udp_alt = tokio::net::UdpSocket::bind(alt).await.ok();
        println!("join token: {}", token.encode());
        let _ = std::io::stdout().flush();
        let server = Server::new(private);
        server.set_tamper(Arc::new(Recorder {
            file: Mutex::new(file),
        }));
        let _ = server.run(tcp, udp, udp_alt).await;
    });
}
