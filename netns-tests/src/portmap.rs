//! Port-mapping servers on a [`Router`]: the real miniupnpd (UPnP IGD, NAT-PMP and PCP, with
//! its nftables backend), and a hostile responder on the router's UDP 5351 that answers
//! garbage or lies about the external address.

use std::fs;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::process::{require_tools, Proc};
use crate::timing::wait_for;
use crate::topology::{Ns, Router};

/// The PCP / NAT-PMP port.
pub const PORTMAP_PORT: u16 = 5351;

/// miniupnpd running on a router.
pub struct MiniUpnpd {
    pub proc: Proc,
    ns: Ns,
}

/// What a [`FakePortMapper`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lie {
    /// Random bytes of random length, to every request.
    Garbage,
    /// Well-formed PCP and NAT-PMP answers granting the mapping at this external address
    /// (not the router's).
    WrongAddress(Ipv4Addr),
}

/// A hostile port-mapping server on a router's LAN address, UDP 5351.
pub struct FakePortMapper {
    pub proc: Proc,
}

impl Router {
    /// Starts miniupnpd (Debian's `miniupnpd-nftables`) on this router: UPnP IGD, NAT-PMP and
    /// PCP on the LAN side, mappings for LAN hosts to their own address only (secure mode).
    /// Its DNAT rules go in a table of its own, `inet a2a_upnp`; the router's forward filter
    /// (which drops unsolicited wan traffic) accepts what they DNAT. Waits until it listens.
    pub fn start_miniupnpd(&self) -> MiniUpnpd {
        self.start_miniupnpd_with(true, 86_400)
    }

    /// [`start_miniupnpd`](Self::start_miniupnpd), with NAT-PMP and PCP off when `natpmp` is
    /// false (UPnP IGD only), and PCP / NAT-PMP lifetimes cut to `max_lifetime` seconds.
    pub fn start_miniupnpd_with(&self, natpmp: bool, max_lifetime: u32) -> MiniUpnpd {
        require_tools(&[("miniupnpd", "miniupnpd-nftables"), ("nft", "nftables")]);
        let ns = &self.ns;
        let dir = ns.lab_dir();
        let rules = "table inet a2a_upnp {\n\
              chain forward { type filter hook forward priority filter - 5; policy accept; jump miniupnpd; }\n\
              chain miniupnpd { }\n\
              chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump prerouting_miniupnpd; }\n\
              chain postrouting { type nat hook postrouting priority srcnat - 5; policy accept; jump postrouting_miniupnpd; }\n\
              chain prerouting_miniupnpd { }\n\
              chain postrouting_miniupnpd { }\n\
            }\n";
        let nft = dir.join(format!("{}-upnp.nft", ns.role));
        fs::write(&nft, rules).expect("write miniupnpd's nftables table");
        ns.exec(&["nft", "-f", &nft.to_string_lossy()]).expect_ok();
        ns.exec(&[
            "nft", "insert", "rule", "inet", "a2a_fw", "forward", "ct", "status", "dnat", "accept",
        ])
        .expect_ok();
        let o = self.lan.octets();
        let lan = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
        let conf = format!(
            "ext_ifname=eth0\n\
             listening_ip=lan0\n\
             http_port=0\n\
             enable_natpmp={natpmp}\n\
             enable_upnp=yes\n\
             secure_mode=yes\n\
             system_uptime=no\n\
             min_lifetime={min_lifetime}\n\
             max_lifetime={max_lifetime}\n\
             upnp_table_name=a2a_upnp\n\
             upnp_nat_table_name=a2a_upnp\n\
             upnp_forward_chain=miniupnpd\n\
             upnp_nat_chain=prerouting_miniupnpd\n\
             upnp_nat_postrouting_chain=postrouting_miniupnpd\n\
             allow 1024-65535 {lan} 1024-65535\n\
             deny 0-65535 0.0.0.0/0 0-65535\n",
            natpmp = if natpmp { "yes" } else { "no" },
            min_lifetime = (max_lifetime / 2).min(120),
        );
        let conf_path = dir.join(format!("{}-miniupnpd.conf", ns.role));
        fs::write(&conf_path, conf).expect("write miniupnpd.conf");
        let pid = dir.join(format!("{}-miniupnpd.pid", ns.role));
        let proc = ns.spawn(
            "miniupnpd",
            &[
                "miniupnpd",
                "-f",
                &conf_path.to_string_lossy(),
                "-P",
                &pid.to_string_lossy(),
                "-d",
            ],
        );
        wait_for(
            Duration::from_secs(10),
            "miniupnpd to listen for NAT-PMP/PCP",
            || {
                let log = proc.stderr_text() + &proc.stdout_text();
                if let Some(st) = proc.exit_status() {
                    panic!("miniupnpd exited ({st}):\n{log}");
                }
                if log.contains("Port forwarding is impossible") {
                    panic!("miniupnpd refuses to map ports (a private wan address?):\n{log}");
                }
                let ready = if natpmp {
                    "Listening for NAT-PMP/PCP traffic"
                } else {
                    "HTTP listening on port"
                };
                if log.contains(ready) {
                    Ok(())
                } else {
                    Err(log)
                }
            },
        );
        MiniUpnpd {
            proc,
            ns: self.ns.clone(),
        }
    }

    /// Starts a responder on this router's LAN address, UDP 5351, that answers every request
    /// as `lie` says. It prints one line per answer.
    pub fn start_fake_portmapper(&self, lie: Lie) -> FakePortMapper {
        require_tools(&[("python3", "python3")]);
        let (mode, ip) = match lie {
            Lie::Garbage => ("garbage", Ipv4Addr::UNSPECIFIED),
            Lie::WrongAddress(ip) => ("lie", ip),
        };
        let script = format!(
            r#"
import os, socket, struct, sys
mode, lie = "{mode}", socket.inet_aton("{ip}")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{lan}", {PORTMAP_PORT}))
print("listening", flush=True)
while True:
    req, peer = s.recvfrom(2048)
    if mode == "garbage":
        n = os.urandom(1)[0] % 80
        out = os.urandom(n)
    elif len(req) >= 2 and req[0] == 0 and req[1] == 0:
        out = struct.pack("!BBHI", 0, 128, 0, 7) + lie
    elif len(req) >= 12 and req[0] == 0 and req[1] == 1:
        internal = req[4:6]
        out = struct.pack("!BBHI", 0, 129, 0, 7) + internal + internal + struct.pack("!I", 3600)
    elif len(req) >= 60 and req[0] == 2 and req[1] == 1:
        out = (bytes([2, 0x81, 0, 0]) + req[4:8] + struct.pack("!I", 7) + bytes(12)
               + req[24:42] + req[40:42] + bytes(10) + b"\xff\xff" + lie)
    else:
        continue
    s.sendto(out, peer)
    print("answered", len(req), "with", len(out), flush=True)
"#,
            lan = self.lan,
        );
        let proc = self
            .ns
            .spawn(&format!("portmap-{mode}"), &["python3", "-c", &script]);
        wait_for(
            Duration::from_secs(10),
            "the fake port mapper to listen",
            || {
                if let Some(st) = proc.exit_status() {
                    panic!(
                        "the fake port mapper exited ({st}):\n{}",
                        proc.stderr_text()
                    );
                }
                if proc.stdout_text().contains("listening") {
                    Ok(())
                } else {
                    Err(proc.stderr_text())
                }
            },
        );
        FakePortMapper { proc }
    }
}

impl FakePortMapper {
    /// How many requests it answered.
    pub fn answered(&self) -> usize {
        self.proc
            .stdout_text()
            .lines()
            .filter(|l| l.starts_with("answered"))
            .count()
    }
}

impl MiniUpnpd {
    /// The UDP port mappings miniupnpd holds now, as `(external port, "internal ip:port")`,
    /// read from its DNAT rules.
    pub fn udp_mappings(&self) -> Vec<(u16, String)> {
        let out = self
            .ns
            .exec(&[
                "nft",
                "list",
                "chain",
                "inet",
                "a2a_upnp",
                "prerouting_miniupnpd",
            ])
            .expect_ok();
        out.stdout
            .lines()
            .filter_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let dport = words.iter().position(|w| *w == "dport")?;
                let to = words.iter().position(|w| *w == "to")?;
                let port = words.get(dport + 1)?.parse().ok()?;
                Some((port, words.get(to + 1)?.to_string()))
            })
            .collect()
    }
}
