//! Underlay socket addresses as a2a compares and stores them.

use std::net::SocketAddr;

/// An IPv4-mapped IPv6 address (what a dual-stack socket reports for an IPv4 peer) as plain
/// IPv4, so one peer has one address whichever socket saw it.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_become_ipv4_and_others_stay() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(canonical(a("[::ffff:192.0.2.1]:7")), a("192.0.2.1:7"));
        assert_eq!(canonical(a("192.0.2.1:7")), a("192.0.2.1:7"));
        assert_eq!(canonical(a("[2001:db8::1]:7")), a("[2001:db8::1]:7"));
        // IPv4-compatible (deprecated, ::a.b.c.d) is not mapped.
        assert_eq!(canonical(a("[::192.0.2.1]:7")), a("[::192.0.2.1]:7"));
    }
}
