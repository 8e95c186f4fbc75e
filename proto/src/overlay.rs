//! Overlay addressing: a node's IPv4 address is derived from its key inside the network prefix.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use crate::keys::NodeKey;

/// The overlay prefix used when a token is made without `--prefix` (the CGNAT range, as Tailscale).
pub const DEFAULT_PREFIX: &str = "100.64.0.0/10";

/// The address of `node` in `prefix` for the given `attempt` (0 first; a node whose address is
/// taken by a live node tries the next attempt). Never the network or broadcast address.
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
    Ipv4Addr::from(u32::from(prefix.network()) | host)
}

/// Whether `ip` is a usable host address of `prefix`.
pub fn is_host_in(prefix: Ipv4Net, ip: Ipv4Addr) -> bool {
    prefix.contains(&ip) && ip != prefix.network() && ip != prefix.broadcast()
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
    fn attempts_move_the_address() {
        let prefix: Ipv4Net = DEFAULT_PREFIX.parse().unwrap();
        let k = NodeKey([5; 32]);
        let a: std::collections::HashSet<_> = (0..8).map(|i| derive_ip(prefix, &k, i)).collect();
        assert_eq!(a.len(), 8);
    }
}
