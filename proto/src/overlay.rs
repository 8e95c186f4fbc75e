//! Overlay addressing: a node's IPv4 address is derived from its key inside the network prefix;
//! its IPv6 address from its key inside a unique-local /48 derived from the network id.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha256};

use crate::keys::{NetworkId, NodeKey};

/// Prefix length of a network's IPv6 overlay prefix (an RFC 4193 unique-local /48).
pub const ULA_PREFIX_LEN: u8 = 48;

/// The overlay prefix used when a token is made without `--prefix` (the CGNAT range, as Tailscale).
pub const DEFAULT_PREFIX: &str = "100.64.0.0/10";

/// The overlay resolver's address in the default prefix: the one Tailscale users know.
pub const DNS_IP_DEFAULT: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);

/// The address inside `prefix` where every node's a2ad answers DNS for its own host, and that
/// no node is given: 100.100.100.100 when the prefix holds it (the default one does), else the
/// prefix's last host address (the one before broadcast).
pub fn dns_ip(prefix: Ipv4Net) -> Ipv4Addr {
    if is_usable(prefix, DNS_IP_DEFAULT) {
        DNS_IP_DEFAULT
    } else {
        Ipv4Addr::from(u32::from(prefix.broadcast()) - 1)
    }
}

/// Whether `ip` is kept out of node assignment in `prefix` (the resolver's address).
pub fn is_reserved(prefix: Ipv4Net, ip: Ipv4Addr) -> bool {
    ip == dns_ip(prefix)
}

/// The address of `node` in `prefix` for the given `attempt` (0 first; a node whose address is
/// taken by a live node tries the next attempt). Never the network or broadcast address, nor a
/// reserved one ([`is_reserved`]): a derivation landing there takes the next host address.
pub fn derive_ip(prefix: Ipv4Net, node: &NodeKey, attempt: u32) -> Ipv4Addr {
    let mut h = Sha256::new();
    h.update(b"a2a overlay address v1");
    h.update(node.0);
    h.update(attempt.to_le_bytes());
    let digest = h.finalize();
    let n = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
    let host_bits = 32 - u32::from(prefix.prefix_len());
    let usable = (1u64 << host_bits) - 2; // minus network and broadcast
    let host = (u64::from(n) % usable) as u32 + 1;
    let ip = Ipv4Addr::from(u32::from(prefix.network()) | host);
    if !is_reserved(prefix, ip) {
        return ip;
    }
    // The next host, wrapping from the last one to the first.
    let next = host % usable as u32 + 1;
    Ipv4Addr::from(u32::from(prefix.network()) | next)
}

/// Whether `ip` is a host address of `prefix` (not its network or broadcast address).
fn is_usable(prefix: Ipv4Net, ip: Ipv4Addr) -> bool {
    prefix.contains(&ip) && ip != prefix.network() && ip != prefix.broadcast()
}

/// Whether `ip` is an address a node may hold in `prefix`: a host address, not reserved.
pub fn is_host_in(prefix: Ipv4Net, ip: Ipv4Addr) -> bool {
    is_usable(prefix, ip) && !is_reserved(prefix, ip)
}

/// The network's IPv6 overlay prefix: `fd` and 40 bits of a hash of the network id (RFC 4193's
/// global id, from the id instead of a random draw, so every member computes the same one).
pub fn ula_prefix(network: &NetworkId) -> Ipv6Net {
    let mut h = Sha256::new();
    h.update(b"a2a overlay ula v1");
    h.update(network.0);
    let d = h.finalize();
    let mut o = [0u8; 16];
    o[0] = 0xfd;
    o[1..6].copy_from_slice(&d[..5]);
    Ipv6Net::new(Ipv6Addr::from(o), ULA_PREFIX_LEN).expect("48 is a valid prefix length")
}

/// The IPv6 overlay address of `node` in `network`: the network's [`ula_prefix`] and 80 bits of
/// a hash of the node key (as [`derive_ip`] hashes it, but with no attempt: 80 bits leave no
/// collision to move away from). The 16-bit subnet field is never 0: `PREFIX:0::/64` is kept
/// for the daemon's own services (a resolver address no node gets).
///
/// Derived, never signed: every member and the coordinator compute a peer's address from the
/// network id and key they already verified, so a record cannot claim another one.
pub fn derive_ip6(network: &NetworkId, node: &NodeKey) -> Ipv6Addr {
    let mut h = Sha256::new();
    h.update(b"a2a overlay address v6");
    h.update(node.0);
    let d = h.finalize();
    let mut o = ula_prefix(network).network().octets();
    o[6..16].copy_from_slice(&d[..10]);
    if o[6] == 0 && o[7] == 0 {
        o[7] = 1;
    }
    Ipv6Addr::from(o)
}

/// Whether `ip` is a node address of `network`'s IPv6 overlay prefix (inside it, outside the
/// reserved subnet 0).
pub fn is_node_ip6(network: &NetworkId, ip: Ipv6Addr) -> bool {
    let o = ip.octets();
    ula_prefix(network).contains(&ip) && (o[6], o[7]) != (0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_addresses_are_usable_hosts_and_stable() {
        let prefix: Ipv4Net = "10.9.8.0/28".parse().unwrap();
        for i in 0..500u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            let ip = derive_ip(prefix, &NodeKey(key), 0);
            assert!(is_host_in(prefix, ip), "{ip}");
            assert_eq!(ip, derive_ip(prefix, &NodeKey(key), 0));
        }
    }

    #[test]
    fn the_resolver_address_is_in_the_prefix_and_never_assigned() {
        let default: Ipv4Net = DEFAULT_PREFIX.parse().unwrap();
        assert_eq!(dns_ip(default), Ipv4Addr::new(100, 100, 100, 100));
        let small: Ipv4Net = "10.9.8.0/28".parse().unwrap();
        assert_eq!(dns_ip(small), Ipv4Addr::new(10, 9, 8, 14));
        for prefix in [default, small] {
            assert!(!is_host_in(prefix, dns_ip(prefix)));
            assert!(is_reserved(prefix, dns_ip(prefix)));
        }
        // In a /28 (14 hosts), 500 keys surely hit the reserved host if it were not skipped.
        for i in 0..500u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            for attempt in 0..3 {
                let ip = derive_ip(small, &NodeKey(key), attempt);
                assert_ne!(ip, dns_ip(small));
                assert!(is_host_in(small, ip), "{ip}");
            }
        }
    }

    #[test]
    fn attempts_move_the_address() {
        let prefix: Ipv4Net = DEFAULT_PREFIX.parse().unwrap();
        let k = NodeKey([5; 32]);
        let a: std::collections::HashSet<_> = (0..8).map(|i| derive_ip(prefix, &k, i)).collect();
        assert_eq!(a.len(), 8);
    }

    #[test]
    fn ipv6_addresses_have_a_fixed_test_vector() {
        let net = NetworkId([1; 32]);
        let key = NodeKey([2; 32]);
        assert_eq!(ula_prefix(&net).to_string(), "fda6:6238:91cc::/48");
        assert_eq!(
            derive_ip6(&net, &key).to_string(),
            "fda6:6238:91cc:e47e:e686:635d:7b4a:30df"
        );
    }

    #[test]
    fn ipv6_addresses_are_unique_local_in_the_network_prefix_and_stable() {
        let net = NetworkId([7; 32]);
        let prefix = ula_prefix(&net);
        assert_eq!(prefix.prefix_len(), 48);
        assert_eq!(prefix.network().octets()[0], 0xfd);
        assert!(prefix.network().is_unique_local());
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            let ip = derive_ip6(&net, &NodeKey(key));
            assert!(is_node_ip6(&net, ip), "{ip}");
            assert_eq!(ip, derive_ip6(&net, &NodeKey(key)));
            assert!(seen.insert(ip), "two keys got {ip}");
        }
        // Another network: another prefix, the same host part.
        let other = NetworkId([8; 32]);
        let (a, b) = (
            derive_ip6(&net, &NodeKey([3; 32])),
            derive_ip6(&other, &NodeKey([3; 32])),
        );
        assert_ne!(ula_prefix(&other), prefix);
        assert!(!is_node_ip6(&net, b));
        assert_eq!(a.octets()[6..], b.octets()[6..]);
        // The reserved subnet 0 and addresses outside the prefix are not node addresses.
        let mut o = prefix.network().octets();
        o[15] = 0x53;
        assert!(!is_node_ip6(&net, Ipv6Addr::from(o)));
        assert!(!is_node_ip6(&net, "fe80::1".parse().unwrap()));
    }
}
