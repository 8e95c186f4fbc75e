//! The coordinator's Prometheus metrics (`a2a-coordinator --metrics ADDR`, off by default):
//! the gauges and counters of its counters line, as `a2a_coordinator_<name>` and
//! `a2a_coordinator_<name>_total`, rendered by the Prometheus project's `prometheus-client`
//! from a [`Snapshot`] taken at each scrape and served by the bounded responder shared with
//! `a2ad` ([`a2a_proto::scrape`]).
//!
//! Aggregates only, and no labels: the coordinator never writes or prints a node's key, name,
//! address, peers, services or policy, and no metric may carry a network id, node key, name or
//! address either. A [`Snapshot`] holds numbers under fixed names and nothing else, so the text
//! cannot.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::histogram::HistogramSnapshot;
use crate::server::{Server, Snapshot};

/// A histogram already counted ([`crate::histogram::Histogram`]), for the encoder.
#[derive(Debug)]
struct Counted(HistogramSnapshot);

impl TypedMetric for Counted {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Counted {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = &self.0;
        encoder.encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The metrics text for one snapshot.
pub fn render(snapshot: &Snapshot) -> String {
    let mut registry = Registry::with_prefix("a2a_coordinator");
    for (name, help, value) in &snapshot.gauges {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(*value).unwrap_or(i64::MAX));
        registry.register(*name, *help, g);
    }
    for (name, help, value) in &snapshot.counters {
        let c = Counter::<u64>::default();
        c.inc_by(*value);
        registry.register(*name, *help, c);
    }
    registry.register_with_unit(
        "handshake",
        "Noise handshakes of accepted control connections, from the accept to the handshake's end",
        prometheus_client::registry::Unit::Seconds,
        Counted(snapshot.handshakes.clone()),
    );
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String does not fail");
    text
}

/// Serves `/metrics` on `listener` until the task is dropped, a snapshot of `server` rendered
/// at each scrape.
pub async fn serve(listener: TcpListener, server: Arc<Server>) {
    a2a_proto::scrape::serve(listener, move || {
        let text = render(&server.snapshot());
        async move { text }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gauge_and_counter_is_in_the_text_by_its_name() {
        let snapshot = Snapshot {
            gauges: vec![("members", "Live registrations", 3)],
            counters: vec![
                ("relayed_udp", "Datagrams relayed", 7),
                ("relayed_udp_bytes", "Bytes relayed", 7000),
            ],
            handshakes: {
                let h = crate::histogram::Histogram::default();
                h.observe(std::time::Duration::from_millis(3));
                h.observe(std::time::Duration::from_millis(30));
                h.snapshot()
            },
        };
        let text = render(&snapshot);
        for line in [
            "# TYPE a2a_coordinator_handshake_seconds histogram",
            "a2a_coordinator_handshake_seconds_bucket{le=\"0.001\"} 0",
            "a2a_coordinator_handshake_seconds_bucket{le=\"0.005\"} 1",
            "a2a_coordinator_handshake_seconds_bucket{le=\"0.05\"} 2",
            "a2a_coordinator_handshake_seconds_bucket{le=\"+Inf\"} 2",
            "a2a_coordinator_handshake_seconds_count 2",
            "# HELP a2a_coordinator_members Live registrations.",
            "# TYPE a2a_coordinator_members gauge",
            "a2a_coordinator_members 3",
            "# TYPE a2a_coordinator_relayed_udp counter",
            "a2a_coordinator_relayed_udp_total 7",
            "a2a_coordinator_relayed_udp_bytes_total 7000",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
    }

    /// The real server's snapshot: every counter of the counters line is a metric, every
    /// gauge too, and no sample line has a label (where an identifier could go).
    #[test]
    fn the_servers_snapshot_holds_every_counter_and_no_label() {
        let server = Server::new([7; 32]);
        server
            .counters
            .relayed_tcp_bytes
            .fetch_add(1234, std::sync::atomic::Ordering::Relaxed);
        let snapshot = server.snapshot();
        let text = render(&snapshot);
        let line = server.stats_line();
        let mut names = 0;
        for pair in line.trim_start_matches("live ").split_whitespace() {
            let (name, value) = pair.split_once('=').expect("name=value");
            let gauge = snapshot.gauges.iter().any(|g| g.0 == name);
            let metric = if gauge {
                format!("a2a_coordinator_{name} {value}")
            } else {
                format!("a2a_coordinator_{name}_total {value}")
            };
            assert!(
                text.lines().any(|l| l == metric),
                "{metric} missing in:\n{text}"
            );
            names += 1;
        }
        assert_eq!(names, snapshot.gauges.len() + snapshot.counters.len());
        assert!(text.contains("a2a_coordinator_relayed_tcp_bytes_total 1234"));
        for want in [
            "members",
            "networks",
            "connections",
            "relay_slots",
            "relay_udp_bindings",
            "udp_sockets",
        ] {
            assert!(
                snapshot.gauges.iter().any(|g| g.0 == want),
                "no gauge {want}"
            );
        }
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = l.split_once(' ').expect("name value");
            // The one label is a histogram bucket's bound (`le`), a number the code chose.
            let name = match name.split_once('{') {
                Some((n, labels)) => {
                    let bound = labels
                        .strip_prefix("le=\"")
                        .and_then(|b| b.strip_suffix("\"}"))
                        .unwrap_or_else(|| panic!("a label that could carry identifiers: {l}"));
                    assert!(bound == "+Inf" || bound.parse::<f64>().is_ok(), "{l}");
                    n
                }
                None => name,
            };
            assert!(name.starts_with("a2a_coordinator_"), "{l}");
            assert!(value.parse::<f64>().is_ok(), "{l}");
        }
    }

    /// The example Grafana dashboard (`docs/grafana-coordinator.json`) asks only for metrics
    /// the coordinator serves.
    #[test]
    fn the_example_dashboard_names_only_metrics_that_exist() {
        let dashboard = include_str!("../../docs/grafana-coordinator.json");
        let _: serde_json::Value = serde_json::from_str(dashboard).expect("the dashboard is JSON");
        let text = render(&Server::new([7; 32]).snapshot());
        let served: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split([' ', '{']).next())
            .collect();
        let mut asked = 0;
        for (at, _) in dashboard.match_indices("a2a_coordinator_") {
            let name: String = dashboard[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                served.contains(&name.as_str()),
                "the dashboard asks for {name}"
            );
            asked += 1;
        }
        assert!(asked >= 20, "{asked}");
    }
}
