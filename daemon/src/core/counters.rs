//! Counts of dropped input and notable events, shown by `a2actl status`. The struct and its
//! snapshot come from one list, so a counter cannot be added to one and forgotten in the other.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Every counter of the node; each is bumped with [`Counters::bump`].
        #[derive(Default)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl Counters {
            /// Every counter by name, in the order of the list.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    udp_garbage,
    udp_unknown_peer,
    udp_a2a_malformed,
    wg_rejected,
    /// Handshake initiations whose timestamp is not newer than the last one accepted from that
    /// peer: replays (boringtun refuses them), counted apart from `wg_rejected`.
    wg_handshake_replays,
    wg_cookies_sent,
    /// Cookie replies from peers accepted: our handshake met a peer under load, and the next
    /// one will carry the cookie's MAC2.
    wg_cookies_received,
    /// Handshake messages with a valid cookie dropped while under load, their source being over
    /// its share (`HANDSHAKES_PER_SOURCE` a second).
    wg_handshake_rate_limited,
    /// Decrypted IPv4 packets whose source is not the sending peer's overlay address.
    inner_source_mismatch,
    /// The same for IPv6: a source other than the peer's IPv6 overlay address.
    inner_source_mismatch6,
    tun_no_route,
    /// Packets read from the TUN device that are neither IPv4 nor IPv6.
    tun_not_ip,
    no_endpoint,
    send_errors,
    records_unsigned,
    records_bad_signature,
    records_foreign,
    records_malformed,
    records_stale,
    records_revoked,
    records_address_conflict,
    /// Peers restored from `peers.json` at start (verified again; a gauge).
    peers_restored,
    /// Saved peer lists refused as a whole at start: edited, another node's or network's.
    peers_file_refused,
    /// Peers dropped because the coordinator no longer listed them and nothing came from them
    /// directly for UNLISTED_QUIET.
    peers_unlisted_dropped,
    /// Peers dropped at once: the peer said through its own tunnel that it leaves (`a2actl
    /// down` on it), and the coordinator no longer lists it.
    peers_left,
    /// Leave notices from members (UDP 4748, through their tunnels).
    leave_notices,
    membership_bad_signature,
    invites_redeemed,
    invites_denied,
    relay_not_from_coordinator,
    relay_queue_full,
    disco_unknown_sender,
    /// Probes not sent: the peer published an address no probe should go to (unspecified,
    /// loopback, link-local, multicast or broadcast, port 0, the coordinator's, or one of this
    /// node's own); also each such candidate of a record, dropped when the record is applied.
    candidates_ignored,
    /// Records whose SSH keys are malformed, too long, not Ed25519 or a weak point: the
    /// member is applied without them (nobody logs in as it, no host key is trusted for it).
    ssh_keys_invalid,
    disco_bad,
    disco_rate_limited,
    disco_stale_pong,
    path_upgrades,
    path_fallbacks,
    /// Answers on the port-mapping socket dropped: garbage, truncated, not from the gateway,
    /// or answering nothing asked.
    portmap_bad,
    /// Mappings whose external address is not the reflexive address the coordinator sees (a
    /// router that lies, or a NAT beyond it): not published.
    portmap_mismatch,
    /// A direct path moved to another address that answered clearly better (lower RTT, or
    /// IPv6 at equal RTT).
    path_moves,
    /// Queries the overlay resolver answered from the zone.
    dns_answered,
    /// Queries outside the zone sent to the host's resolvers.
    dns_forwarded,
    /// Forwarded queries no upstream answered in time (the client got SERVFAIL).
    dns_forward_failed,
    /// Queries from a peer (through the tunnel) for a name outside the zone: REFUSED, the
    /// host's resolvers are not the overlay's.
    dns_forward_refused,
    /// Queries to the resolver that are no DNS query (garbage, a response, no question).
    dns_malformed,
    /// Queries larger than the resolver reads, or TCP messages cut short.
    dns_oversized,
    /// Queries dropped: their source was past its share a second.
    dns_rate_limited,
    /// Queries dropped: too many forwards in flight, or too many TCP connections.
    dns_busy,
    /// Answers that did not fit in UDP and went out empty with TC.
    dns_truncated,
    /// Members left out of the zone now: a name that is no DNS label (a gauge).
    dns_invalid_names,
    /// Names left out of the zone now: claimed by two members (a gauge).
    dns_name_conflicts,
    /// Service lists fetched from peers and accepted.
    services_fetched,
    /// Peers' service lists refused: larger than MAX_LIST_BYTES or more than MAX_SERVICES.
    services_list_oversized,
    /// Peers' service lists refused: not HTTP 200 with a valid JSON list.
    services_list_malformed,
    /// Fetches of a peer's list that failed: no connection, or no whole answer within the
    /// fetch timeout (a slow peer).
    services_fetch_failed,
    /// Connections and datagrams to the service port from an address no member holds: closed
    /// unanswered.
    services_not_member,
    /// Datagrams to the service port that are no "changed" datagram; and connections whose
    /// request is no `GET /a2a/services`.
    services_bad_request,
    /// Agent cards read and published.
    cards_read,
    /// Agent cards not published: larger than MAX_CARD_BYTES.
    cards_oversized,
    /// Agent cards not published: not JSON, or without a `name`.
    cards_malformed,
    /// Agent cards not published: the agent did not answer 200 within the card timeout.
    cards_unreachable,
    /// Policy and tag statements taken (newer than what this node held), from the
    /// coordinator, from members or from a command.
    policy_statements_taken,
    /// Statements refused: their signature is not the network key's, or they do not parse.
    /// What a forging coordinator or member sends ends here.
    policy_statements_refused,
    /// Bundles of statements fetched from members over the overlay.
    policy_bundles_fetched,
    /// Fetches of a member's bundle that failed: no connection, no whole answer in time,
    /// larger than MAX_BUNDLE_BYTES, or not a bundle.
    policy_fetch_failed,
    /// Connections and datagrams to the policy port from an address no member holds, and
    /// datagrams there that are no digest: dropped.
    policy_bad_request,
    /// Userspace mode (`a2ad --userspace`): proxy connections (SOCKS5, HTTP) served.
    proxy_connections,
    /// Proxy connections closed unserved: the limit of connections at once was reached.
    proxy_over_limit,
    /// Proxy requests refused: malformed, or larger than the header limit.
    proxy_malformed,
    /// Proxy connections closed because the request did not arrive in time (slowloris).
    proxy_handshake_timeout,
    /// Proxy requests refused: the destination is not a member (outside the overlay, or an
    /// unknown name), so nothing leaks to the host's network.
    proxy_not_allowed,
    /// Proxy requests whose member did not accept the connection (refused, no answer).
    proxy_connect_failed,
    /// SOCKS5 UDP associations opened (UDP ASSOCIATE served).
    proxy_udp_associations,
    /// Datagrams from SOCKS5 UDP clients carried to members.
    proxy_udp_datagrams,
    /// Datagrams from SOCKS5 UDP clients dropped as malformed, fragmented (FRAG not 0) or
    /// larger than one overlay packet carries.
    proxy_udp_malformed,
    /// Datagrams from SOCKS5 UDP clients dropped: the destination is not a member.
    proxy_udp_not_allowed,
    /// Datagrams of SOCKS5 UDP associations dropped otherwise: from another address than the
    /// association's client, or at a full queue (either way).
    proxy_udp_dropped,
    /// Packets between the data plane and the userspace stack dropped at a full queue (either
    /// way; TCP sends them again).
    stack_queue_full,
    /// Members' connections to a forwarded port carried to the local target.
    forward_accepted,
    /// Members' connections to a forwarded port whose local target refused or did not answer
    /// (for a UDP forward: a relay socket to it could not be opened).
    forward_target_unreachable,
    /// Members' datagrams to a UDP forward carried to the local target.
    forward_udp_datagrams,
    /// Datagrams of UDP forwards dropped: beyond the flows a forward keeps at once, or at a full
    /// queue (either way).
    forward_udp_dropped,
    /// 1 while the matching fast path is in use (set at start-up; UDP GSO may turn off later).
    fast_tun_offload,
    fast_udp_gso,
    fast_udp_gro,
}

impl Counters {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets a 0/1 counter (the `fast_*` ones).
    pub fn set(c: &AtomicU64, on: bool) {
        c.store(on.into(), Ordering::Relaxed);
    }

    /// Sets a gauge (the `dns_invalid_names` kind).
    pub fn store(c: &AtomicU64, v: u64) {
        c.store(v, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_names_every_counter_once_in_order() {
        let c = Counters::default();
        Counters::bump(&c.udp_garbage);
        Counters::bump(&c.udp_garbage);
        Counters::set(&c.fast_udp_gro, true);
        let snap = c.snapshot();
        assert_eq!(snap[0], ("udp_garbage", 2));
        assert_eq!(snap.last(), Some(&("fast_udp_gro", 1)));
        let mut names: Vec<_> = snap.iter().map(|(n, _)| *n).collect();
        let len = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), len);
        assert_eq!(len, 87);
    }
}
