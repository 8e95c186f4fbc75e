//! The local API between `a2actl` and `a2ad`: one JSON request line, one JSON response line,
//! over a Unix socket.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

/// Largest request or response line accepted.
pub const MAX_API_LINE: usize = 1 << 20;

/// Reads one line (up to and including the first `\n`, or to the end of the stream) into
/// `line`, but never more than `limit` bytes: a longer line is cut there (and then fails to
/// parse).
pub async fn read_line<R: AsyncRead + Unpin>(
    read: R,
    limit: usize,
    line: &mut Vec<u8>,
) -> std::io::Result<()> {
    BufReader::new(read.take(limit as u64))
        .read_until(b'\n', line)
        .await?;
    Ok(())
}

/// Parses a request line read by [`read_line`]; the error says what is wrong.
pub fn parse_request(line: &[u8]) -> Result<ApiRequest, String> {
    serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ApiRequest {
    Up {
        token: String,
        name: Option<String>,
    },
    Down,
    Status,
    Ip,
    /// One disco probe to a peer (name or overlay IP) over its current path.
    Ping {
        peer: String,
    },
    /// Check this node's view of the underlay: reflexive address, UDP, NAT mapping.
    Netcheck,
    /// Make an invite code good for `uses` joins within `ttl_s` seconds; each member admitted
    /// by it carries `tags`.
    Invite {
        uses: u32,
        ttl_s: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tags: Vec<String>,
    },
    /// Remove a peer (name, overlay IP or public key) from the network.
    Kick {
        peer: String,
    },
    /// Move the network to a new secret, carrying every member not removed.
    RotateToken,
    /// Carry members' TCP connections to this node's overlay address and `forward.port` to
    /// `forward.to` on this host (`a2ad --userspace`); replaces a forward of that port.
    ForwardAdd {
        forward: Forward,
    },
    ForwardRm {
        port: u16,
    },
    Forwards,
    /// The member that holds an overlay address: `addr` is an IPv4 or IPv6 address, with or
    /// without a port (`100.64.1.2:40000`, `[fd..::1]:40000`), as a server sees its caller.
    Whois {
        addr: String,
    },
    /// Advertise a service to the members (replaces one of the same name).
    ServiceAdd {
        service: crate::services::ServiceSpec,
    },
    /// Stop advertising a service.
    ServiceRm {
        name: String,
    },
    /// Every member's services, this node's included.
    Services,
    /// Sign a policy document with the network key and pass it to every member (token
    /// holders only). `text` is the JSON document as written.
    PolicySet {
        text: String,
    },
    /// The policy this node holds and enforces, with its counts by grant.
    PolicyShow,
    /// May `src` open `port` (`tcp:8080`, `udp:53`, `icmp`) on `dst`? Members by name,
    /// overlay address or key.
    PolicyTest {
        src: String,
        dst: String,
        port: String,
    },
    /// Add tags to a member (a statement signed with the network key; token holders only).
    Tag {
        peer: String,
        tags: Vec<String>,
    },
    /// Remove tags from a member.
    Untag {
        peer: String,
        tags: Vec<String>,
    },
    /// Let members log in to this node's sshd as `users` (token holders, without a policy),
    /// and publish `host_key` (`ssh-ed25519 BASE64`) in this node's record.
    SshEnable {
        users: Vec<String>,
        host_key: String,
    },
    /// Stop publishing the host key and answering sshd.
    SshDisable,
    /// sshd's question (`AuthorizedKeysCommand`): may the member publishing this key
    /// (`%t %k`) log in as `user`?
    SshAuthorizedKeys {
        user: String,
        key_type: String,
        key: String,
    },
    /// ssh's question (`KnownHostsCommand`): the host key of `host` (`bob`, `bob.a2a`).
    SshKnownHosts {
        host: String,
    },
    /// What `a2actl ssh PEER` needs: the peer's address and name, and this node's key file.
    SshPeer {
        peer: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ApiResponse {
    Up {
        ip: String,
        name: String,
    },
    Down {
        was_up: bool,
    },
    Status {
        status: Status,
    },
    Ip {
        ip: String,
        /// The IPv6 overlay address (absent from daemons before IPv6 overlay addresses).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip6: Option<String>,
    },
    Pong {
        pong: PingResult,
    },
    Netcheck {
        report: NetcheckReport,
    },
    Invite {
        code: String,
        uses: u32,
        ttl_s: u64,
    },
    /// `holds_secret`: the kicked node joined with the token, so it could rejoin under a new
    /// key until the secret is rotated.
    Kicked {
        name: String,
        ip: String,
        holds_secret: bool,
    },
    /// The new token; `carried`: members moved along.
    Rotated {
        token: String,
        carried: Vec<String>,
    },
    Whois {
        member: WhoisMember,
    },
    /// The node's own services after an add or a remove.
    ServicesSaved {
        services: Vec<crate::services::ServiceSpec>,
    },
    Services {
        services: Vec<ServiceEntry>,
    },
    Policy {
        policy: PolicyView,
    },
    PolicyTest {
        verdict: PolicyVerdict,
    },
    /// A member's tags after `tag` or `untag`.
    Tagged {
        name: String,
        tags: Vec<String>,
    },
    /// The forwards after an add or a remove, or as asked.
    Forwards {
        forwards: Vec<Forward>,
    },
    SshEnabled {
        users: Vec<String>,
        /// `SHA256:…` of the published host key.
        host_key: String,
    },
    SshDisabled {
        was_enabled: bool,
    },
    /// Lines for sshd: none, with the reason in `refused`, when the caller may not log in.
    SshAuthorizedKeys {
        lines: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refused: Option<String>,
    },
    SshKnownHosts {
        lines: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refused: Option<String>,
    },
    SshPeer {
        name: String,
        ip: String,
        /// This node's SSH user key file (OpenSSH format, 0600).
        identity: String,
        /// The peer publishes a host key (`a2actl ssh enable` ran there).
        has_host_key: bool,
    },
    Error {
        message: String,
    },
}

/// A port forward of `a2ad --userspace`: a member's TCP connection to this node's overlay
/// address and `port` is spliced to `to` on this host (or, for UDP, its datagrams relayed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    pub port: u16,
    pub to: std::net::SocketAddr,
    /// TCP when absent (forwards saved before UDP forwards existed).
    #[serde(default)]
    pub proto: ForwardProto,
}

/// The protocol of a [`Forward`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardProto {
    #[default]
    Tcp,
    Udp,
}

impl std::fmt::Display for ForwardProto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ForwardProto::Tcp => "tcp",
            ForwardProto::Udp => "udp",
        })
    }
}

/// What `a2actl whois --json` prints: the member holding an overlay address, as this node's
/// membership knows it (from the member's signed record and certificate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoisMember {
    pub name: String,
    pub public_key: String,
    pub ip: String,
    pub ip6: String,
    /// `token` (joined with the join token: holds the network secret, can invite, kick and
    /// rotate) or `invite` (admitted by an invite: holds a member certificate only).
    pub admitted_by: String,
    /// The invite it was admitted with (32 hex digits), for an invited member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invite: Option<String>,
    /// When its member certificate was issued (ms since the Unix epoch), for an invited member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certified_ms: Option<u64>,
    /// The address asked about is this node's own.
    #[serde(rename = "self")]
    pub is_self: bool,
    /// The tags the network's key gave the member (what the policy judges it by).
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Parses what `whois` is asked about: an IP address, optionally with a port (`IP:PORT`, and
/// `[IPv6]:PORT`); the port says nothing about the member and is dropped, and an IPv4-mapped
/// IPv6 address (what a dual-stack socket reports for an IPv4 caller) is taken as the IPv4
/// address. The error says what is wrong with the text.
pub fn parse_whois_addr(text: &str) -> Result<std::net::IpAddr, String> {
    use std::net::{IpAddr, SocketAddr};
    let text = text.trim();
    // A dual-stack server socket sees an IPv4 caller as `::ffff:a.b.c.d`.
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(plain(ip));
    }
    if let Ok(sa) = text.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(format!(
                "{text:?}: port 0 is not a port a caller can have (1 to 65535)"
            ));
        }
        return Ok(plain(sa.ip()));
    }
    // Say which part is wrong: the port, or the address.
    let (host, port) = match text.rsplit_once(':') {
        Some((h, p)) if h.starts_with('[') && h.ends_with(']') => (&h[1..h.len() - 1], Some(p)),
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        _ => (text, None),
    };
    if let Some(port) = port {
        if host.parse::<IpAddr>().is_ok() {
            return Err(format!(
                "{text:?}: the port {port:?} is not a number from 1 to 65535"
            ));
        }
    }
    Err(format!(
        "{text:?} is not an IP address (give an overlay IPv4 or IPv6 address, optionally with \
         a port: 100.64.1.2, 100.64.1.2:8080, fd12:3456:789a:1::2, [fd12:3456:789a:1::2]:8080)"
    ))
}

/// One line of `a2actl services --json`: a member's service. `node`, `ip` and `ip6` come
/// from the member's signed record (the list itself came over the tunnel from that member).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    pub node: String,
    pub name: String,
    pub ip: String,
    pub ip6: String,
    pub port: u16,
    pub proto: crate::services::Proto,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The agent card's name, description and skills (`--proto a2a`, when it was read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<crate::services::Card>,
    /// The service is this node's own.
    #[serde(rename = "self")]
    pub is_self: bool,
}

/// The outcome of one `a2actl ping` probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingResult {
    pub name: String,
    pub ip: String,
    /// `direct` or `relay`: the path the probe took.
    pub path: String,
    /// The peer's address (direct) or the coordinator's (relay).
    pub endpoint: Option<String>,
    /// Round-trip time; `None` when no answer came in time.
    pub rtt_ms: Option<f64>,
}

/// What `a2actl netcheck` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetcheckReport {
    /// The coordinator's UDP address that was probed.
    pub coordinator: String,
    /// Whether UDP to the coordinator round-trips.
    pub udp: bool,
    /// This node's WireGuard socket as the coordinator sees it.
    pub reflexive: Option<String>,
    /// The same socket as seen at the coordinator's second port (mapping check).
    pub reflexive_alt: Option<String>,
    /// `endpoint-independent` (same mapping for both destinations: easy NAT or none),
    /// `endpoint-dependent` (a new mapping per destination: hard NAT) or `unknown`.
    pub mapping: String,
    /// How relayed packets travel: `udp`, `tcp` (over the control connection) or `none`.
    pub relay: String,
    pub coordinator_rtt_ms: Option<f64>,
    /// This node's local addresses published as candidates.
    pub local: Vec<String>,
    /// The router's port mapping (PCP, NAT-PMP) of the WireGuard port.
    #[serde(default)]
    pub portmap: PortmapReport,
    /// IPv6 reachability: `reachable` (the coordinator answered over IPv6), `no answer`,
    /// `no address` (no global IPv6 address here) or `no endpoint` (the token names no IPv6
    /// endpoint of the coordinator).
    #[serde(default)]
    pub ipv6: String,
    /// This node's WireGuard socket as the coordinator sees it over IPv6.
    #[serde(default)]
    pub reflexive6: Option<String>,
}

/// What `a2actl netcheck` says about port mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortmapReport {
    /// The default gateway asked (on UDP 5351).
    pub gateway: Option<String>,
    /// The protocols whose server answered: `pcp`, `nat-pmp`.
    pub answered: Vec<String>,
    /// The external address the router mapped the WireGuard port to.
    pub mapped: Option<String>,
    /// The protocol of that mapping.
    pub protocol: Option<String>,
    /// The lifetime the router granted it, in seconds (renewed at half).
    #[serde(default)]
    pub lifetime_s: Option<u64>,
    /// Whether the mapping is published as a candidate (only when it is at the reflexive
    /// address the coordinator sees).
    pub published: bool,
    /// `no gateway`, `probing`, `mapped`, `none answered`, `refused`, `stopped`, or `off`
    /// (no port mapper runs).
    pub state: String,
}

/// The policy a node holds and enforces (`a2actl policy show --json`; also in `status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    /// 0 when no policy is set (everything is allowed).
    pub version: u64,
    /// The document as signed; absent in `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_ms: Option<u64>,
    /// Each grant with the new flows it allowed into this node and out of it.
    pub grants: Vec<GrantView>,
    /// Packets refused, by reason (`no_grant`, `no_flow`, `revoked`, `table_full`,
    /// `malformed`, `outbound`).
    pub refused: std::collections::BTreeMap<String, u64>,
    /// Flows tracked now.
    pub flows: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    /// 1-based, as `policy test` names it.
    pub number: u32,
    pub src: Vec<String>,
    pub dst: Vec<String>,
    pub ports: Vec<String>,
    pub allowed: u64,
}

/// `a2actl policy test`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVerdict {
    pub allowed: bool,
    /// The grant that allows it (1-based); absent when refused or when no policy is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<u32>,
    /// One line: what was tested and why it is allowed or refused.
    pub reason: String,
}

/// What `a2actl status --json` prints. Field names are a contract: keep them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    #[serde(rename = "self")]
    pub self_: Option<SelfStatus>,
    pub peers: Vec<PeerStatus>,
    /// Counters of dropped input and other events, for operators.
    #[serde(default)]
    pub counters: std::collections::BTreeMap<String, u64>,
    /// The policy enforced, with counts by grant (absent before policies existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfStatus {
    pub name: String,
    pub ip: String,
    /// The IPv6 overlay address (in the network's unique-local /48).
    #[serde(default)]
    pub ip6: String,
    pub public_key: String,
    /// Whether the coordinator currently has this node registered.
    #[serde(default)]
    pub registered: bool,
    /// Why the coordinator refused this node, when it did (kicked, rotated out, bad token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    #[serde(default)]
    pub interface: String,
    /// Where this node's a2ad answers DNS for NAME.a2a (UDP and TCP port 53), when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// The tags the network's key gave this node.
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub ip: String,
    #[serde(default)]
    pub ip6: String,
    pub public_key: String,
    /// `direct`, `relay` or `none`.
    pub path: String,
    /// The peer's address on a direct path; the coordinator's on a relayed one.
    pub endpoint: Option<String>,
    /// Latest measured round-trip time of the path in use, in milliseconds.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    pub last_handshake_s: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    #[serde(default)]
    pub tags: Vec<String>,
    /// `unlisted` (the coordinator no longer lists it; kept while its direct path is alive)
    /// or `saved` (restored from the state directory, no coordinator has listed it yet);
    /// `None` when the coordinator lists it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listing: Option<String>,
}

/// Where `a2ad` keeps its state when no `--state-dir` is given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/a2a";
/// Where `a2ad` listens when neither `--socket` nor `--state-dir` is given.
pub const DEFAULT_SOCKET: &str = "/run/a2a/a2ad.sock";

/// Resolves the socket and state directory the same way in `a2ad` and `a2actl`: an explicit
/// `--socket` wins; otherwise an explicit `--state-dir` puts the socket inside it (so several
/// nodes can run on one machine with `--state-dir` alone); otherwise the system defaults.
pub fn resolve_paths(
    socket: Option<std::path::PathBuf>,
    state_dir: Option<std::path::PathBuf>,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let socket = match (&socket, &state_dir) {
        (Some(s), _) => s.clone(),
        (None, Some(d)) => d.join("a2ad.sock"),
        (None, None) => DEFAULT_SOCKET.into(),
    };
    (
        socket,
        state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_saved_before_udp_forwards_is_tcp() {
        let old: Forward = serde_json::from_str(r#"{"port":9999,"to":"127.0.0.1:9000"}"#).unwrap();
        assert_eq!(old.proto, ForwardProto::Tcp);
        let udp = Forward {
            port: 53,
            to: "127.0.0.1:5353".parse().unwrap(),
            proto: ForwardProto::Udp,
        };
        let text = serde_json::to_string(&udp).unwrap();
        assert!(text.contains(r#""proto":"udp""#), "{text}");
        assert_eq!(serde_json::from_str::<Forward>(&text).unwrap(), udp);
        assert!(
            serde_json::from_str::<Forward>(r#"{"port":1,"to":"127.0.0.1:1","proto":"sctp"}"#)
                .is_err()
        );
    }
    use std::path::PathBuf;

    #[tokio::test]
    async fn requests_are_one_line_of_at_most_the_limit() {
        let mut line = Vec::new();
        read_line(
            &b"{\"cmd\":\"status\"}\n{\"cmd\":\"ip\"}\n"[..],
            MAX_API_LINE,
            &mut line,
        )
        .await
        .unwrap();
        assert_eq!(parse_request(&line), Ok(ApiRequest::Status));
        // No newline: the whole stream is the line.
        line.clear();
        read_line(&b"{\"cmd\":\"ip\"}"[..], MAX_API_LINE, &mut line)
            .await
            .unwrap();
        assert_eq!(parse_request(&line), Ok(ApiRequest::Ip));
        // Longer than the limit: cut, and refused.
        line.clear();
        read_line(&b"{\"cmd\":\"status\"}\n"[..], 10, &mut line)
            .await
            .unwrap();
        assert_eq!(line, b"{\"cmd\":\"st");
        let err = parse_request(&line).unwrap_err();
        assert!(err.starts_with("malformed request"), "{err}");
        // Not UTF-8: refused with a message, like any other malformed request.
        assert!(parse_request(b"{\"cmd\":\"\xff\"}").is_err());
        assert!(parse_request(b"").is_err());
    }

    #[test]
    fn socket_follows_state_dir_unless_given() {
        let (s, d) = resolve_paths(None, None);
        assert_eq!(
            (s, d),
            (
                PathBuf::from(DEFAULT_SOCKET),
                PathBuf::from(DEFAULT_STATE_DIR)
            )
        );
        let (s, _) = resolve_paths(None, Some("/tmp/n1".into()));
        assert_eq!(s, PathBuf::from("/tmp/n1/a2ad.sock"));
        let (s, d) = resolve_paths(Some("/x.sock".into()), Some("/tmp/n1".into()));
        assert_eq!((s, d), (PathBuf::from("/x.sock"), PathBuf::from("/tmp/n1")));
    }

    #[test]
    fn status_json_has_the_contract_fields() {
        let st = Status {
            self_: Some(SelfStatus {
                name: "a".into(),
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
                name: "b".into(),
                ip: "100.64.0.2".into(),
                ip6: "fd00:1:2:3::2".into(),
                public_key: "k2".into(),
                path: "direct".into(),
                endpoint: Some("10.0.0.2:51820".into()),
                rtt_ms: Some(0.4),
                last_handshake_s: Some(3),
                rx_bytes: 1,
                tx_bytes: 2,
                tags: vec![],
                listing: None,
            }],
            counters: Default::default(),
            policy: None,
        };
        let v: serde_json::Value = serde_json::to_value(&st).unwrap();
        for f in ["name", "ip", "ip6", "public_key"] {
            assert!(v["self"].get(f).is_some(), "{f}");
        }
        for f in [
            "name",
            "ip",
            "ip6",
            "public_key",
            "path",
            "endpoint",
            "last_handshake_s",
            "rx_bytes",
            "tx_bytes",
        ] {
            assert!(v["peers"][0].get(f).is_some(), "{f}");
        }
    }

    #[test]
    fn whois_takes_an_address_with_or_without_a_port_and_says_what_is_wrong() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        for (text, want) in [
            ("100.64.1.2", "100.64.1.2"),
            (" 100.64.1.2:8080 ", "100.64.1.2"),
            ("fd12:3456:789a:1::2", "fd12:3456:789a:1::2"),
            ("[fd12:3456:789a:1::2]:65535", "fd12:3456:789a:1::2"),
            ("::ffff:100.64.1.2", "100.64.1.2"),
            ("[::ffff:100.64.1.2]:8080", "100.64.1.2"),
        ] {
            assert_eq!(parse_whois_addr(text), Ok(ip(want)), "{text}");
        }
        for (text, says) in [
            (
                "100.64.1.2:70000",
                "port \"70000\" is not a number from 1 to 65535",
            ),
            ("[fd12::2]:99999", "port \"99999\""),
            ("100.64.1.2:http", "port \"http\""),
            ("100.64.1.2:0", "port 0"),
            ("planner", "is not an IP address"),
            ("100.64.1", "is not an IP address"),
            ("", "is not an IP address"),
            ("fd12::2:80x", "is not an IP address"),
        ] {
            let e = parse_whois_addr(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
        // The request and answer have their wire names.
        let req: ApiRequest =
            serde_json::from_str(r#"{"cmd":"whois","addr":"100.64.1.2"}"#).unwrap();
        assert_eq!(
            req,
            ApiRequest::Whois {
                addr: "100.64.1.2".into()
            }
        );
        // An `ip` answer from an older daemon (no ip6) still parses.
        let old: ApiResponse =
            serde_json::from_str(r#"{"result":"ip","ip":"100.64.0.1"}"#).unwrap();
        assert_eq!(
            old,
            ApiResponse::Ip {
                ip: "100.64.0.1".into(),
                ip6: None
            }
        );
    }
}
