//! Prometheus metrics of a node (`a2ad --metrics ADDR`, off by default): every counter of
//! `a2actl status`, whether the node is registered, and per peer, by name (a node may know its
//! peers), the path kind, the path's RTT, bytes each way and the age of the WireGuard keys.
//! The text is rendered by the Prometheus project's `prometheus-client` from a status snapshot
//! taken at each scrape; the bounded HTTP/1.1 responder shared with the coordinator
//! ([`a2a_proto::scrape`]) serves it at `/metrics`.

use std::sync::Arc;

use a2a_proto::api::Status;
use a2a_proto::scrape;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::io::Platform;
use crate::node::commands::Daemon;

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
    if let Some(policy) = &status.policy {
        let version = Gauge::<i64>::default();
        version.set(policy.version as i64);
        registry.register(
            "policy_version",
            "Version of the policy in force (0: none set, everything allowed)",
            version,
        );
        let refused = Family::<Labels, Counter<u64>>::default();
        for (reason, n) in &policy.refused {
            refused
                .get_or_create(&vec![("reason".to_string(), reason.clone())])
                .inc_by(*n);
        }
        registry.register(
            "policy_refused_packets",
            "Packets the policy refused, by reason",
            refused,
        );
        let allowed = Family::<Labels, Counter<u64>>::default();
        for g in &policy.grants {
            allowed
                .get_or_create(&vec![("grant".to_string(), g.number.to_string())])
                .inc_by(g.allowed);
        }
        registry.register(
            "policy_allowed_flows",
            "New flows each grant allowed",
            allowed,
        );
    }
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String does not fail");
    text
}

/// Serves `/metrics` on `listener` until the task is dropped (the bounded responder of
/// [`a2a_proto::scrape`]), a status snapshot rendered at each scrape.
pub async fn serve<P: Platform>(listener: TcpListener, daemon: Arc<Daemon<P>>) {
    scrape::serve(listener, move || {
        let daemon = daemon.clone();
        async move { render(&daemon.status().await) }
    })
    .await
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
                ip6: "fd00:1:2:3::1".into(),
                public_key: "k".into(),
                registered: true,
                refused: None,
                interface: "a2a0".into(),
                dns: None,
                tags: vec![],
            }),
            peers: vec![PeerStatus {
                name: "bravo".into(),
                ip: "100.64.0.2".into(),
                ip6: "fd00:1:2:3::2".into(),
                public_key: "k2".into(),
                path: "direct".into(),
                endpoint: Some("192.0.2.2:51820".into()),
                rtt_ms: Some(0.25),
                last_handshake_s: Some(12),
                rx_bytes: 1000,
                tx_bytes: 2000,
                tags: vec![],
                listing: None,
            }],
            counters: [
                ("udp_garbage".to_string(), 3),
                ("fast_udp_gso".to_string(), 1),
            ]
            .into_iter()
            .collect(),
            policy: None,
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
            policy: None,
        });
        assert!(empty.contains("a2a_registered 0"), "{empty}");
    }
}
