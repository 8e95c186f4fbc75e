//! Overlay addressing: a node's IPv4 address is derived from its key inside the network prefix.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use crate::keys::NodeKey;

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
}
