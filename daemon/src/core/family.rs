//! Which underlay addresses a node publishes as its candidates and which of a peer's candidates
//! it probes, by address family and scope. No I/O.
//!
//! - **Published:** IPv4 as before; IPv6 global unicast and unique-local (ULA, `fc00::/7`)
//!   addresses. Never link-local (`fe80::/10`: meaningless off the link, and ambiguous without
//!   a zone), multicast, loopback, unspecified, or IPv4-mapped/compatible forms.
//! - **Probed:** a peer's candidate is never probed if it is an address nobody can be reached
//!   at (unspecified, multicast, broadcast, loopback, link-local of either family, port 0):
//!   such a candidate is dropped and counted. Of the rest, a node probes IPv4 candidates only if
//!   it has an IPv4 address, global IPv6 ones only if it has a global IPv6 address, and a ULA
//!   only if it has a ULA in the same /48 (one site: a ULA reaches nothing outside the site
//!   that numbered it, and two sites may well have picked the same prefix).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use a2a_proto::addr::canonical;

/// True for a unique-local IPv6 address (`fc00::/7`).
pub fn is_ula(ip: &Ipv6Addr) -> bool {
    ip.segments()[0] & 0xfe00 == 0xfc00
}

/// True for an IPv6 link-local unicast address (`fe80::/10`).
fn is_link_local6(ip: &Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// The /48 of an IPv6 address (a site, for ULAs).
fn site48(ip: &Ipv6Addr) -> [u16; 3] {
    let s = ip.segments();
    [s[0], s[1], s[2]]
}

/// Whether this host may publish one of its IPv6 addresses as a candidate.
pub fn publishable_v6(ip: &Ipv6Addr) -> bool {
    !ip.is_unspecified()
        && !ip.is_loopback()
        && !ip.is_multicast()
        && !is_link_local6(ip)
        && ip.to_ipv4_mapped().is_none()
        // IPv4-compatible (::a.b.c.d, deprecated) and the rest of ::/96.
        && ip.segments()[..6] != [0; 6]
}

/// True if nobody can be reached at `addr` (unspecified, port 0, loopback, link-local,
/// multicast, broadcast; the path finder's [`probe_worthy`] rule, which also guards every probe
/// it sends): never probed, whoever published it.
///
/// [`probe_worthy`]: crate::core::path::probe_worthy
pub fn unreachable(addr: SocketAddr) -> bool {
    !crate::core::path::probe_worthy(addr, &[], None)
}

/// What this host can reach by its own addresses: which families, and which ULA sites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    v4: bool,
    v6_global: bool,
    ula_sites: Vec<[u16; 3]>,
}

impl Default for Reach {
    /// Before the host's addresses are known: IPv4 and global IPv6, no ULA site.
    fn default() -> Self {
        Reach {
            v4: true,
            v6_global: true,
            ula_sites: Vec::new(),
        }
    }
}

impl Reach {
    /// From this host's own addresses (as published: any port) and its reflexive address.
    /// Knowing neither (no address found, UDP to the coordinator blocked), the default: a host
    /// whose only address is on a link left out of `locals` (PPPoE, say) still probes.
    pub fn from_addresses(reflexive: Option<SocketAddr>, locals: &[SocketAddr]) -> Self {
        if reflexive.is_none() && locals.is_empty() {
            return Reach::default();
        }
        let mut r = Reach {
            v4: false,
            v6_global: false,
            ula_sites: Vec::new(),
        };
        for a in reflexive.iter().chain(locals) {
            match canonical(*a).ip() {
                IpAddr::V4(_) => r.v4 = true,
                IpAddr::V6(ip) if is_ula(&ip) => {
                    if !r.ula_sites.contains(&site48(&ip)) {
                        r.ula_sites.push(site48(&ip));
                    }
                }
                IpAddr::V6(ip) if publishable_v6(&ip) => r.v6_global = true,
                IpAddr::V6(_) => {}
            }
        }
        r
    }

    /// Whether a (reachable) candidate is worth probing from this host.
    pub fn can_probe(&self, addr: SocketAddr) -> bool {
        match canonical(addr).ip() {
            IpAddr::V4(_) => self.v4,
            IpAddr::V6(ip) if is_ula(&ip) => self.ula_sites.contains(&site48(&ip)),
            IpAddr::V6(_) => self.v6_global,
        }
    }

    /// The candidates of a peer this host probes, canonical, in their order, without
    /// duplicates.
    pub fn usable(&self, candidates: &[SocketAddr]) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::with_capacity(candidates.len());
        for a in candidates.iter().map(|a| canonical(*a)) {
            if !unreachable(a) && self.can_probe(a) && !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }
}

/// How many of a peer's candidates nobody can be reached at (dropped and counted).
pub fn unreachable_count(candidates: &[SocketAddr]) -> usize {
    candidates.iter().filter(|a| unreachable(**a)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn link_local_multicast_and_unspecified_are_never_published_or_probed() {
        for bad in [
            "[fe80::1]:51820",
            "[febf::1]:51820",
            "[ff02::1]:51820",
            "[::]:51820",
            "[::1]:51820",
            "[::ffff:0.0.0.0]:51820",
            "0.0.0.0:51820",
            "224.0.0.1:51820",
            "255.255.255.255:51820",
            "127.0.0.1:51820",
            "169.254.1.1:51820",
            "10.0.0.1:0",
            "[2001:db8::1]:0",
        ] {
            assert!(unreachable(a(bad)), "{bad}");
        }
        for good in [
            "10.0.0.1:51820",
            "[2001:db8::1]:51820",
            "[fd12:3456:789a::1]:51820",
            "[::ffff:192.0.2.1]:51820",
        ] {
            assert!(!unreachable(a(good)), "{good}");
        }
        assert!(publishable_v6(&"2001:db8::5".parse().unwrap()));
        assert!(publishable_v6(&"fd00::5".parse().unwrap()));
        assert!(!publishable_v6(&"fe80::5".parse().unwrap()));
        assert!(!publishable_v6(&"::192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn candidates_are_probed_by_what_this_host_reaches() {
        let cands = [
            a("[fe80::1]:51820"),
            a("198.51.100.7:4000"),
            a("[2001:db8:1::5]:51820"),
            a("[fd00:1:2:3::5]:51820"),
            a("[fd00:9:9::5]:51820"),
            a("[ff02::1]:51820"),
            a("[::ffff:198.51.100.7]:4000"),
        ];
        assert_eq!(unreachable_count(&cands), 2);
        // Dual-stack with a ULA of site fd00:1:2::/48.
        let dual = Reach::from_addresses(
            None,
            &[
                a("10.0.0.2:51820"),
                a("[2001:db8:2::9]:51820"),
                a("[fd00:1:2:7::9]:51820"),
                a("[fe80::9]:51820"),
            ],
        );
        assert_eq!(
            dual.usable(&cands),
            vec![
                a("198.51.100.7:4000"),
                a("[2001:db8:1::5]:51820"),
                a("[fd00:1:2:3::5]:51820"),
            ]
        );
        // IPv6-only: no IPv4 candidate; a link-local does not make a host IPv6-capable.
        let v6 = Reach::from_addresses(None, &[a("[2001:db8:2::9]:51820")]);
        assert_eq!(v6.usable(&cands), vec![a("[2001:db8:1::5]:51820")]);
        let v4 = Reach::from_addresses(None, &[a("10.0.0.2:51820"), a("[fe80::9]:51820")]);
        assert_eq!(v4.usable(&cands), vec![a("198.51.100.7:4000")]);
        // IPv4 known only from the reflexive address (the local one on a link left out).
        let ppp = Reach::from_addresses(Some(a("203.0.113.9:4000")), &[]);
        assert_eq!(ppp.usable(&cands), vec![a("198.51.100.7:4000")]);
        // Nothing known: IPv4 and global IPv6 probed, no ULA.
        let unknown = Reach::from_addresses(None, &[]);
        assert_eq!(
            unknown.usable(&cands),
            vec![a("198.51.100.7:4000"), a("[2001:db8:1::5]:51820")]
        );
    }
}
