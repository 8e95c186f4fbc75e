//! Lossy, slow links: a router whose wan link delays, jitters and drops ([`Impairment`],
//! [`Lab::router_impaired`]).
//!
//! The kernel of the machines these tests run on has no netem, so the two halves are built from
//! what it has:
//! - delay and jitter: a namespace of its own (`<role>-imp`) between the router's `eth0` and the
//!   wan bridge, where `a2a-impair` (`src/bin/a2a-impair.rs`) forwards every frame between its
//!   two interfaces (`rtr0` to the router, `wan0` to the bridge) after `delay ± jitter`, each
//!   direction in FIFO order;
//! - loss: nftables in the router, on its wan interface in both directions (`netdev` ingress and
//!   egress hooks on `eth0`, so on every frame as it crosses the wire, before conntrack or NAT
//!   see it), `numgen random mod 100 < loss_pct drop`, with counters ([`Router::wire_loss`]).
//!
//! Frames, not GSO super-frames, must cross the impaired wire (3 % loss means 3 % of packets,
//! and each packet is delayed on its own): every link that transmits into it is limited to GSO
//! segments of one (`gso_max_segs 1`), namely the router's `eth0`, the bridge's port towards the
//! box, and the `eth0` of every namespace added behind the router (a2ad sends UDP GSO batches,
//! which the kernel would otherwise forward whole through the router).
//!
//! Path delay adds up per box crossed: two nodes behind two routers, each impaired with
//! `delay d`, see a round trip of `4 d` (each datagram crosses two boxes each way).

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use crate::process::require_tools;
use crate::timing::wait_for;
use crate::topology::{ImpairedWan, Impairment, Lab, Nat, Ns, Router, BRIDGE};

/// What the forwarder did in one direction (its JSON on SIGTERM).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwarderCounters {
    pub frames: u64,
    pub bytes: u64,
    pub sent: u64,
    pub full: u64,
    pub send_errors: u64,
    pub gso: u64,
    pub truncated: u64,
    pub max_queue: u64,
}

/// Frames seen and dropped by a router's loss rules, per direction of its wan interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireLoss {
    pub seen_in: u64,
    pub lost_in: u64,
    pub seen_out: u64,
    pub lost_out: u64,
}

/// The replies of a `ping` run.
#[derive(Debug, Clone, PartialEq)]
pub struct PingStats {
    pub sent: u32,
    /// The round-trip time of each reply, in milliseconds, in the order they came.
    pub rtts: Vec<f64>,
}

/// The forwarder binary: next to the binaries under test, else in this test executable's
/// target directory (cargo builds it with the tests of this package).
fn forwarder_bin(ns: &Ns) -> String {
    let mut dirs = vec![ns.bins().dir.clone()];
    if let Ok(exe) = std::env::current_exe() {
        if let Some(deps) = exe.parent() {
            dirs.push(deps.to_path_buf());
            if let Some(target) = deps.parent() {
                dirs.push(target.to_path_buf());
            }
        }
    }
    let found: Option<PathBuf> = dirs
        .iter()
        .map(|d| d.join("a2a-impair"))
        .find(|p| p.is_file());
    match found {
        Some(p) => p.to_string_lossy().into_owned(),
        None => panic!(
            "the lab's impairment forwarder `a2a-impair` is in none of {dirs:?}: build it with \
             `cargo build -p a2a-netns-tests --bin a2a-impair` (or `cargo build --workspace`)"
        ),
    }
}

fn ms(d: Duration) -> String {
    format!("{}", d.as_secs_f64() * 1000.0)
}

fn field(v: &serde_json::Value, key: &str) -> Result<u64, String> {
    v.get(key)
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| format!("no counter {key:?} in {v}"))
}

impl ForwarderCounters {
    fn parse(v: &serde_json::Value) -> Result<Self, String> {
        Ok(ForwarderCounters {
            frames: field(v, "frames")?,
            bytes: field(v, "bytes")?,
            sent: field(v, "sent")?,
            full: field(v, "full")?,
            send_errors: field(v, "send_errors")?,
            gso: field(v, "gso")?,
            truncated: field(v, "truncated")?,
            max_queue: field(v, "max_queue")?,
        })
    }
}

impl ImpairedWan {
    /// Stops the forwarder (SIGTERM) and returns its counters: (router to wan, wan to router).
    /// The link carries nothing afterwards.
    #[track_caller]
    pub fn stop(&self) -> (ForwarderCounters, ForwarderCounters) {
        self.forwarder.assert_running();
        let status = self.forwarder.stop(libc::SIGTERM, Duration::from_secs(5));
        let out = self.forwarder.stdout_text();
        assert!(
            status.is_some_and(|s| s.success()),
            "a2a-impair in {} did not end cleanly on SIGTERM ({status:?}): {out}\n{}",
            self.ns.name,
            self.forwarder.stderr_text()
        );
        let json: serde_json::Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("a2a-impair printed no JSON counters ({e}): {out:?}"));
        let get = |dir: &str| {
            ForwarderCounters::parse(&json[dir])
                .unwrap_or_else(|e| panic!("a2a-impair's counters {dir}: {e}"))
        };
        // Started as `a2a-impair rtr0 wan0`: a is the router's side.
        (get("a_to_b"), get("b_to_a"))
    }
}

impl Lab {
    /// A router like [`Lab::router`] whose wan link is impaired as `imp` says: a namespace
    /// running `a2a-impair` between its `eth0` and the wan bridge (delay, jitter) and nftables
    /// loss rules on its `eth0` (see the module documentation). Namespaces added behind it
    /// afterwards send wire-sized frames. `role-imp` names the forwarder's namespace.
    pub fn router_impaired(&self, role: &str, nat: Nat, imp: Impairment) -> Router {
        require_tools(&[("nft", "nftables"), ("sysctl", "procps")]);
        assert!(
            imp.jitter <= imp.delay && imp.loss_pct <= 100,
            "impossible impairment {imp:?}: jitter at most the delay, loss at most 100 %"
        );
        let router = self.router(role, nat);
        let inner = &self.inner;
        let r = router.ns.name.clone();
        let host = router.wan_ip().octets()[3];
        let port = inner.hub_port(host.into());
        let forwarder = forwarder_bin(&router.ns);

        // The box: no addresses, no IPv6 (nothing of its own on the wire).
        let name = inner.create_ns(&format!("{role}-imp"));
        let boxed = Ns {
            name: name.clone(),
            role: format!("{role}-imp"),
            wan_ip: None,
            wan_ip6: None,
            lab: inner.clone(),
        };
        boxed
            .exec(&[
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ])
            .expect_ok();
        // Rewire: router eth0 <-> rtr0 [box] wan0 <-> the bridge port. Deleting the bridge
        // port deletes the router's eth0 with it; the router's rules name `eth0`, so they hold.
        inner.host(&["ip", "-n", &self.hub, "link", "del", &port]);
        inner.host(&[
            "ip", "-n", &r, "link", "add", "eth0", "type", "veth", "peer", "name", "rtr0", "netns",
            &name,
        ]);
        inner.host(&[
            "ip", "-n", &name, "link", "add", "wan0", "type", "veth", "peer", "name", &port,
            "netns", &self.hub,
        ]);
        let wan_ip = format!("{}/24", router.wan_ip());
        inner.host(&["ip", "-n", &r, "addr", "add", &wan_ip, "dev", "eth0"]);
        for (ns, dev) in [(r.as_str(), "eth0"), (self.hub.as_str(), port.as_str())] {
            inner.host(&["ip", "-n", ns, "link", "set", dev, "gso_max_segs", "1"]);
        }
        inner.host(&[
            "ip", "-n", &self.hub, "link", "set", &port, "master", BRIDGE, "up",
        ]);
        for dev in ["rtr0", "wan0"] {
            inner.host(&["ip", "-n", &name, "link", "set", dev, "up"]);
        }
        inner.host(&["ip", "-n", &r, "link", "set", "eth0", "up"]);

        let proc = boxed.spawn(
            "impair",
            &[
                &forwarder,
                "rtr0",
                "wan0",
                "--delay",
                &ms(imp.delay),
                "--jitter",
                &ms(imp.jitter),
            ],
        );
        wait_for(
            Duration::from_secs(10),
            &format!("a2a-impair in {name}"),
            || {
                proc.assert_running();
                if proc.stderr_text().contains("a2a-impair: rtr0 <-> wan0") {
                    Ok(())
                } else {
                    Err("not forwarding yet".into())
                }
            },
        );

        // Loss on the wire, both ways; and echo requests answered, so that the wire's round
        // trip can be measured between routers (their firewall drops other unsolicited input).
        let p = imp.loss_pct;
        let rules = format!(
            "table netdev a2a_loss {{\n\
               counter seen_in {{}}\n\
               counter lost_in {{}}\n\
               counter seen_out {{}}\n\
               counter lost_out {{}}\n\
               chain wire_in {{ type filter hook ingress device \"eth0\" priority 0;\n\
                 counter name \"seen_in\"\n\
                 numgen random mod 100 < {p} counter name \"lost_in\" drop\n\
               }}\n\
               chain wire_out {{ type filter hook egress device \"eth0\" priority 0;\n\
                 counter name \"seen_out\"\n\
                 numgen random mod 100 < {p} counter name \"lost_out\" drop\n\
               }}\n\
             }}\n"
        );
        let file = inner.dir.join(format!("{role}-loss.nft"));
        fs::write(&file, rules).expect("write nftables loss rules");
        router
            .ns
            .exec(&["nft", "-f", &file.to_string_lossy()])
            .expect_ok();
        router
            .ns
            .exec(&[
                "nft",
                "insert rule inet a2a_fw input iifname \"eth0\" icmp type echo-request accept",
            ])
            .expect_ok();
        router
            .impaired
            .set(ImpairedWan {
                impairment: imp,
                ns: boxed,
                forwarder: proc,
            })
            .expect("a new router is not impaired yet");
        router
    }
}

impl Router {
    /// The impairment of this router's wan link, if it has one ([`Lab::router_impaired`]).
    pub fn impaired_wan(&self) -> Option<&ImpairedWan> {
        self.impaired.get()
    }

    /// The counters of the loss rules of an impaired router ([`Lab::router_impaired`]).
    #[track_caller]
    pub fn wire_loss(&self) -> WireLoss {
        let out = self
            .ns
            .exec(&[
                "nft", "-j", "list", "counters", "table", "netdev", "a2a_loss",
            ])
            .expect_ok();
        let json: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("`nft -j list counters` printed no JSON ({e}): {out}"));
        let mut loss = WireLoss::default();
        for item in json["nftables"].as_array().into_iter().flatten() {
            let Some(c) = item.get("counter") else {
                continue;
            };
            let packets = c["packets"].as_u64().unwrap_or(0);
            match c["name"].as_str() {
                Some("seen_in") => loss.seen_in = packets,
                Some("lost_in") => loss.lost_in = packets,
                Some("seen_out") => loss.seen_out = packets,
                Some("lost_out") => loss.lost_out = packets,
                _ => {}
            }
        }
        loss
    }
}

impl PingStats {
    /// Parses `ping -n`'s output: one `time=X ms` per reply, and "N packets transmitted".
    pub fn parse(text: &str) -> Result<PingStats, String> {
        let sent = text
            .lines()
            .find_map(|l| l.split_once(" packets transmitted"))
            .and_then(|(n, _)| n.trim().parse().ok())
            .ok_or_else(|| format!("no \"packets transmitted\" in {text:?}"))?;
        let rtts = text
            .lines()
            .filter_map(|l| l.split_once(" time=")?.1.strip_suffix(" ms")?.parse().ok())
            .collect();
        Ok(PingStats { sent, rtts })
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.rtts.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The median round trip (ms); `None` without replies. Unlike the mean, not moved by the
    /// few echoes that waited for an ARP reply lost on the wire.
    pub fn median(&self) -> Option<f64> {
        let v = self.sorted();
        v.get(v.len() / 2).copied()
    }

    /// The spread of the middle half of the round trips (ms): the jitter, without the outliers.
    pub fn interquartile(&self) -> Option<f64> {
        let v = self.sorted();
        if v.len() < 4 {
            return None;
        }
        Some(v[v.len() * 3 / 4] - v[v.len() / 4])
    }
}

impl Ns {
    /// `ping -c count` 0.2 s apart; the round-trip times of the replies.
    pub fn ping_stats(&self, ip: std::net::Ipv4Addr, count: u32) -> Result<PingStats, String> {
        let c = count.to_string();
        let ip = ip.to_string();
        let out = self.exec_timeout(
            &["ping", "-n", "-c", &c, "-i", "0.2", "-W", "2", &ip],
            Duration::from_secs(u64::from(count) + 10),
        );
        PingStats::parse(&out.stdout).map_err(|e| format!("{e}: {out}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_replies_are_read() {
        let text = "PING 10.1.0.3 (10.1.0.3) 56(84) bytes of data.\n\
                    64 bytes from 10.1.0.3: icmp_seq=1 ttl=64 time=2110 ms\n\
                    64 bytes from 10.1.0.3: icmp_seq=2 ttl=64 time=41.2 ms\n\
                    64 bytes from 10.1.0.3: icmp_seq=4 ttl=64 time=38.5 ms\n\
                    64 bytes from 10.1.0.3: icmp_seq=5 ttl=64 time=43.0 ms\n\
                    64 bytes from 10.1.0.3: icmp_seq=6 ttl=64 time=36.9 ms\n\n\
                    --- 10.1.0.3 ping statistics ---\n\
                    6 packets transmitted, 5 received, 16.6667% packet loss, time 1000ms\n\
                    rtt min/avg/max/mdev = 36.9/453.9/2110/830.1 ms, pipe 2\n";
        let s = PingStats::parse(text).unwrap();
        assert_eq!(s.sent, 6);
        assert_eq!(s.rtts, vec![2110.0, 41.2, 38.5, 43.0, 36.9]);
        assert_eq!(s.median(), Some(41.2));
        assert_eq!(s.interquartile(), Some(43.0 - 38.5));
        let none = "--- x ping statistics ---\n3 packets transmitted, 0 received, 100% loss\n";
        let s = PingStats::parse(none).unwrap();
        assert_eq!((s.sent, s.median(), s.interquartile()), (3, None, None));
        assert!(PingStats::parse("").is_err());
    }
}
