//! a2a-relay-blast: two members of a fresh network relay UDP data through a real coordinator,
//! for measuring its relay by hand. Not part of a2a.
//!
//! ```text
//! a2a-relay-blast --coordinator HOST:PORT --coordinator-key KEY [--seconds S] [--pps N]
//!                 [--size BYTES]
//! ```
//!
//! Both register (real Noise handshakes and signed records) and bind their relay slots over
//! UDP; then A sends relay data for B at N datagrams a second (default 60 000, under the
//! coordinator's per-sender bucket of 250 000) of BYTES bytes (default 1400), 32 at a time with
//! UDP GSO where the kernel has it, for S seconds (default 5), while B receives with UDP GRO and
//! checks their order. Prints one JSON object: datagrams sent and received, received Mbit/s,
//! datagrams out of order.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use a2a_proto::control::{ClientMsg, ServerMsg};
use a2a_proto::keys::{RelaySecret, Signature, REGISTER_CONTEXT};
use a2a_proto::noise_channel::{handshake_initiator, FrameReader, FrameWriter};
use a2a_proto::udp::{write_relay_header, A2aDatagram, MAX_A2A_DATAGRAM, RELAY_HEADER_LEN};
use a2a_proto::{NetworkKey, NodeKey, NodeRecord};
use a2a_udpbatch as udpbatch;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

type Channel = (FrameReader<OwnedReadHalf>, FrameWriter<OwnedWriteHalf>);

fn value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let need = |name: &str| {
        value(&args, name).unwrap_or_else(|| {
            eprintln!("a2a-relay-blast: {name} is required");
            std::process::exit(2)
        })
    };
    let hub: SocketAddr = need("--coordinator")
        .parse()
        .expect("--coordinator IP:PORT");
    let key = a2a_proto::keys::base64_exact::<32>(&need("--coordinator-key"))
        .expect("--coordinator-key: a base64 32-byte key");
    let num = |name: &str, default: u64| {
        value(&args, name).map_or(default, |v| v.parse().expect("a number"))
    };
    let seconds = num("--seconds", 5);
    let pps = num("--pps", 60_000).max(1);
    let size = (num("--size", 1400) as usize).clamp(RELAY_HEADER_LEN + 8, 1472);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let net = NetworkKey::derive(&rand::random());
    let ((_a_ch, a_id, a_secret), (_b_ch, b_id, b_secret)) = rt.block_on(async {
        let a = member(hub, &key, &net, 1).await;
        let b = member(hub, &key, &net, 2).await;
        (a, b)
    });
    let a = bound(hub, a_id, &a_secret);
    let b = bound(hub, b_id, &b_secret);
    let _ = a_id;
    let done = Arc::new(AtomicBool::new(false));
    let receiver = {
        let done = done.clone();
        std::thread::spawn(move || receive(b, &done))
    };
    let sent = send(&a, hub, b_id, size, pps, Duration::from_secs(seconds));
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::Relaxed);
    let (received, bytes, reordered) = receiver.join().expect("the receiver");
    println!(
        "{}",
        serde_json::json!({
            "sent": sent,
            "received": received,
            "mbit_s": (bytes as f64 * 8.0 / seconds as f64 / 1e6 * 10.0).round() / 10.0,
            "reordered": reordered,
            "size": size,
        })
    );
    // Keeps the control connections open until here.
    drop(rt);
}

/// A member with node secret `n`: registered, its control channel kept.
async fn member(
    hub: SocketAddr,
    key: &[u8; 32],
    net: &NetworkKey,
    n: u8,
) -> (Channel, u32, RelaySecret) {
    let private: [u8; 32] = rand::random();
    let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(private));
    let node_key = NodeKey(public.to_bytes());
    let mut s = TcpStream::connect(hub).await.expect("connect");
    let est = handshake_initiator(&mut s, &private, key)
        .await
        .expect("handshake");
    let record = NodeRecord {
        network: net.id(),
        node_key,
        name: format!("blast{n}"),
        ip: a2a_proto::overlay::derive_ip("100.64.0.0/10".parse().unwrap(), &node_key, 0),
        candidates: vec![],
        issued_ms: a2a_proto::time::now_ms(),
        ssh: None,
    }
    .sign(net);
    let proof = Some(Signature(net.sign(REGISTER_CONTEXT, &est.handshake_hash)));
    let (r, w) = s.into_split();
    let (mut r, mut w) = est.split(r, w);
    w.send(&ClientMsg::Register {
        batches: true,
        network: net.id(),
        proof,
        record,
    })
    .await
    .expect("register");
    match r.recv::<ServerMsg>().await.expect("an answer") {
        ServerMsg::Registered {
            relay_id,
            relay_secret,
            ..
        } => ((r, w), relay_id, relay_secret),
        other => panic!("not registered: {other:?}"),
    }
}

/// A UDP socket with its relay slot bound.
fn bound(hub: SocketAddr, id: u32, secret: &RelaySecret) -> UdpSocket {
    let s = UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut d = [0u8; MAX_A2A_DATAGRAM];
    let len = A2aDatagram::RelayBind {
        nonce: [7; 8],
        relay_id: id,
        secret: *secret,
    }
    .encode(&mut d);
    s.send_to(&d[..len], hub).expect("bind");
    s.recv_from(&mut d).expect("a bind answer");
    s
}

/// Sends for `time` at `pps`, in batches of 32; returns the datagrams sent.
fn send(a: &UdpSocket, hub: SocketAddr, to: u32, size: usize, pps: u64, time: Duration) -> u64 {
    const BATCH: usize = 32;
    let gso = udpbatch::gso_supported(a.as_raw_fd());
    let mut buf = vec![0u8; size * BATCH];
    let start = Instant::now();
    let mut seq = 0u64;
    while start.elapsed() < time {
        for d in buf.chunks_mut(size) {
            write_relay_header(d, to);
            d[RELAY_HEADER_LEN..RELAY_HEADER_LEN + 8].copy_from_slice(&seq.to_be_bytes());
            seq += 1;
        }
        let sent = if gso {
            udpbatch::send_segments(a.as_raw_fd(), &buf, size as u16, hub).is_ok()
        } else {
            buf.chunks(size).all(|d| a.send_to(d, hub).is_ok())
        };
        if !sent {
            // A full buffer: give it a moment (these count as sent and lost).
            std::thread::sleep(Duration::from_micros(200));
        }
        let due = start + Duration::from_secs_f64(seq as f64 / pps as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    seq
}

/// Receives until `done`; returns (datagrams, bytes, datagrams with a lower number than one
/// before them).
fn receive(b: UdpSocket, done: &AtomicBool) -> (u64, u64, u64) {
    let gro = udpbatch::enable_gro(b.as_raw_fd());
    let _ = gro;
    b.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let (mut n, mut bytes, mut reordered, mut last) = (0u64, 0u64, 0u64, None::<u64>);
    let mut peek = [0u8; 1];
    while !done.load(Ordering::Relaxed) {
        if b.peek_from(&mut peek).is_err() {
            continue;
        }
        let Ok((len, _, seg)) = udpbatch::recv_segments(b.as_raw_fd(), &mut buf) else {
            continue;
        };
        for d in buf[..len].chunks(seg) {
            if d.len() < RELAY_HEADER_LEN + 8 {
                continue;
            }
            let s = u64::from_be_bytes(
                d[RELAY_HEADER_LEN..RELAY_HEADER_LEN + 8]
                    .try_into()
                    .unwrap(),
            );
            if last.is_some_and(|l| s < l) {
                reordered += 1;
            }
            last = Some(last.map_or(s, |l| l.max(s)));
            n += 1;
            bytes += d.len() as u64;
        }
    }
    (n, bytes, reordered)
}
