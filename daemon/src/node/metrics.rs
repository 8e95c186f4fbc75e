//! Prometheus metrics of a node (`a2ad --metrics ADDR`, off by default): every counter of
//! `a2actl status`, whether the node is registered, and per peer, by name (a node may know its
//! peers), the path kind, the path's RTT, bytes each way and the age of the WireGuard keys.
//! The text is rendered by the Prometheus project's `prometheus-client` from a status snapshot
//! taken at each scrape; a small HTTP/1.1 responder serves it at `/metrics`.
//!
//! What a scrape may cost is bounded: [`MAX_SCRAPERS`] connections at once (more are closed at
//! once), a request head of at most [`MAX_REQUEST`] bytes read within [`REQUEST_TIMEOUT`].

use std::sync::Arc;
use std::time::Duration;

use a2a_proto::api::Status;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::io::Platform;
use crate::node::commands::Daemon;

/// Scrapes served at once; a connection beyond them is closed unanswered.
pub const MAX_SCRAPERS: usize = 8;
/// Longest request head read.
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a scraper has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

type Labels = Vec<(String, String)>;

/// The metrics text for one status snapshot.
pub fn render(status: &Status) -> String {
    let mut registry = Registry::with_prefix("a2a");
    let registered = Gauge::<i64>::default();
    registered.set(status.self_.as_ref().is_some_and(|s| s.registered).into());
    registry.register(
        "registered",
        "1 while the coordinator has this node registered",
        registered,
    );
    let peers = Gauge::<i64>::default();
    peers.set(status.peers.len() as i64);
    registry.register("peers", "Members in the peer table", peers);
    for (name, value) in &status.counters {
        // `fast_*` are 0/1 states, the rest counts of events.
        if name.starts_with("fast_") {
            let g = Gauge::<i64>::default();
            g.set(*value as i64);
            registry.register(name.as_str(), "1 while this fast path is in use", g);
        } else {
            let c = Counter::<u64>::default();
            c.inc_by(*value);
            registry.register(name.as_str(), "See `a2actl status --json`", c);
        }
    }
    let path = Family::<Labels, Gauge<i64>>::default();
    let rtt = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let rx = Family::<Labels, Counter<u64>>::default();
    let tx = Family::<Labels, Counter<u64>>::default();
    let age = Family::<Labels, Gauge<i64>>::default();
    for p in &status.peers {
        let peer = vec![("peer".to_string(), p.name.clone())];
        for kind in ["direct", "relay", "none"] {
            let mut labels = peer.clone();
            labels.push(("path".into(), kind.into()));
            path.get_or_create(&labels).set((p.path == kind).into());
        }
        if let Some(ms) = p.rtt_ms {
            rtt.get_or_create(&peer).set(ms / 1000.0);
        }
        rx.get_or_create(&peer).inc_by(p.rx_bytes);
        tx.get_or_create(&peer).inc_by(p.tx_bytes);
        if let Some(s) = p.last_handshake_s {
            age.get_or_create(&peer).set(s as i64);
        }
    }
    registry.register(
        "peer_path",
        "1 for the kind of path a peer's packets take now",
        path,
    );
    registry.register(
        "peer_rtt_seconds",
        "Round-trip time of the path in use",
        rtt,
    );
    registry.register("peer_rx_bytes", "Bytes received from the peer", rx);
    registry.register("peer_tx_bytes", "Bytes sent to the peer", tx);
    registry.register(
        "peer_handshake_age_seconds",
        "Seconds since the last WireGuard handshake with the peer",
        age,
    );
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String does not fail");
    text
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve<P: Platform>(listener: TcpListener, daemon: Arc<Daemon<P>>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // too many at once: closed unanswered
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let _ = answer(stream, &daemon).await;
            drop(permit);
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics,
    NotFound,
    BadMethod,
    Malformed,
}

fn parse_head(head: &[u8]) -> Asked {
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return Asked::Malformed;
    };
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(target), Some(version), None) if version.starts_with("HTTP/1.") => {
            match (method, target.split('?').next()) {
                ("GET", Some("/metrics")) => Asked::Metrics,
                ("GET", _) => Asked::NotFound,
                _ => Asked::BadMethod,
            }
        }
        _ => Asked::Malformed,
    }
}

/// Answers one scrape on `stream`.
pub async fn answer<S, P>(mut stream: S, daemon: &Daemon<P>) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    P: Platform,
{
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    let asked = match read {
        Ok(Ok(())) => parse_head(&head),
        Ok(Err(e)) => return Err(e),
        Err(_) => Asked::Malformed,
    };
    let (status, kind, body) = match asked {
        Asked::Metrics => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(&daemon.status().await),
        ),
        Asked::NotFound => (
            "404 Not Found",
            "text/plain",
            "a2ad serves its metrics at /metrics\n".into(),
        ),
        Asked::BadMethod => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
        Asked::Malformed => ("400 Bad Request", "text/plain", "bad request\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Whether metrics bound at `addr` would be reachable from beyond this host and its private
/// networks (the caller warns: peer names and traffic figures are not for the internet).
pub fn is_exposed(addr: std::net::SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => {
            // 100.64.0.0/10 (carrier-grade NAT space, and a2a's default overlay) is private too.
            let cgnat = ip.octets()[0] == 100 && ip.octets()[1] & 0xc0 == 64;
            !(ip.is_loopback() || ip.is_private() || ip.is_link_local() || cgnat)
        }
        std::net::IpAddr::V6(ip) => {
            !(ip.is_loopback() || ip.is_unique_local() || ip.is_unicast_link_local())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use a2a_proto::api::{PeerStatus, SelfStatus};

    fn status() -> Status {
        Status {
            self_: Some(SelfStatus {
                name: "alpha".into(),
                ip: "100.64.0.1".into(),
                public_key: "k".into(),
                registered: true,
                refused: None,
                interface: "a2a0".into(),
            }),
            peers: vec![PeerStatus {
                name: "bravo".into(),
                ip: "100.64.0.2".into(),
                public_key: "k2".into(),
                path: "direct".into(),
                endpoint: Some("192.0.2.2:51820".into()),
                rtt_ms: Some(0.25),
                last_handshake_s: Some(12),
                rx_bytes: 1000,
                tx_bytes: 2000,
            }],
            counters: [
                ("udp_garbage".to_string(), 3),
                ("fast_udp_gso".to_string(), 1),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn the_text_holds_counters_and_each_peer_by_name() {
        let text = render(&status());
        for line in [
            "a2a_registered 1",
            "a2a_peers 1",
            "a2a_udp_garbage_total 3",
            "a2a_fast_udp_gso 1",
            "a2a_peer_path{peer=\"bravo\",path=\"direct\"} 1",
            "a2a_peer_path{peer=\"bravo\",path=\"relay\"} 0",
            "a2a_peer_rtt_seconds{peer=\"bravo\"} 0.00025",
            "a2a_peer_rx_bytes_total{peer=\"bravo\"} 1000",
            "a2a_peer_tx_bytes_total{peer=\"bravo\"} 2000",
            "a2a_peer_handshake_age_seconds{peer=\"bravo\"} 12",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
        let empty = render(&Status {
            self_: None,
            peers: vec![],
            counters: Default::default(),
        });
        assert!(empty.contains("a2a_registered 0"), "{empty}");
    }

    #[test]
    fn only_a_get_of_metrics_is_answered_with_them() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asked::Metrics
        );
        assert_eq!(
            parse_head(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Asked::Metrics
        );
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(
            parse_head(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Asked::BadMethod
        );
        assert_eq!(parse_head(b"\x16\x03\x01garbage"), Asked::Malformed);
        assert_eq!(parse_head(b""), Asked::Malformed);
        assert_eq!(
            parse_head(b"GET /metrics SPDY/3 extra\r\n"),
            Asked::Malformed
        );
    }

    #[test]
    fn public_addresses_are_flagged() {
        assert!(!is_exposed("127.0.0.1:9100".parse().unwrap()));
        assert!(!is_exposed("10.1.2.3:9100".parse().unwrap()));
        assert!(!is_exposed("100.64.0.1:9100".parse().unwrap()));
        assert!(!is_exposed("[::1]:9100".parse().unwrap()));
        assert!(is_exposed("0.0.0.0:9100".parse().unwrap()));
        assert!(is_exposed("198.51.100.7:9100".parse().unwrap()));
    }
}
