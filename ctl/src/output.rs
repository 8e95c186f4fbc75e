//! Human-readable output.

use a2a_proto::api::{NetcheckReport, PingResult, ServiceEntry, Status, WhoisMember};

/// One line of `a2actl ping`.
pub fn ping_line(p: &PingResult) -> String {
    let via = match &p.endpoint {
        Some(e) => format!("{} {e}{}", p.path, family(e)),
        None => p.path.clone(),
    };
    match p.rtt_ms {
        Some(ms) => format!("pong from {} ({}) via {via} in {ms:.2} ms", p.name, p.ip),
        None => format!("no answer from {} ({}) via {via} within 2 s", p.name, p.ip),
    }
}

/// ` over IPv4` or ` over IPv6`: the family of an underlay endpoint (`host:port`).
fn family(endpoint: &str) -> &'static str {
    match endpoint.parse::<std::net::SocketAddr>() {
        Ok(a) if a.is_ipv6() => " over IPv6",
        Ok(_) => " over IPv4",
        Err(_) => "",
    }
}

/// `a2actl netcheck` without `--json`.
pub fn netcheck_text(r: &NetcheckReport) -> String {
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let mapping = match r.mapping.as_str() {
        "endpoint-independent" => {
            "endpoint-independent (the same address for every destination: direct paths work)"
        }
        "endpoint-dependent" => {
            "endpoint-dependent (a new address per destination: hard NAT, expect the relay)"
        }
        _ => "unknown (needs answers from both coordinator ports)",
    };
    let pm = &r.portmap;
    let answered = if pm.answered.is_empty() {
        "none".to_string()
    } else {
        pm.answered.join(", ")
    };
    let portmap = match (&pm.mapped, &pm.protocol) {
        (Some(m), Some(p)) => format!(
            "{m} by {p}{}",
            if pm.published {
                ", published"
            } else {
                ", not published (not the reflexive address)"
            }
        ),
        _ => pm.state.clone(),
    };
    format!(
        "coordinator:   {}\nudp:           {}\nreflexive:     {}\nsecond port:   {}\nmapping:       {mapping}\nrelay:         {}\ncoordinator rtt: {}\nlocal:         {}\nport mapping:  {portmap} (gateway {}; answered: {answered})\nipv6:          {}\nreflexive6:    {}\n",
        r.coordinator,
        if r.udp { "yes" } else { "no (UDP to the coordinator gets no answer)" },
        opt(&r.reflexive),
        opt(&r.reflexive_alt),
        match r.relay.as_str() {
            "udp" => "over UDP",
            "tcp" => "over the control connection (TCP)",
            other => other,
        },
        r.coordinator_rtt_ms
            .map(|ms| format!("{ms:.2} ms"))
            .unwrap_or_else(|| "-".into()),
        if r.local.is_empty() { "-".into() } else { r.local.join(", ") },
        pm.gateway.as_deref().unwrap_or("-"),
        match r.ipv6.as_str() {
            "reachable" => "reachable (the coordinator answers over IPv6)",
            "no answer" => "no answer from the coordinator over IPv6 (UDP over IPv6 blocked?)",
            "no address" => "no global IPv6 address on this host",
            "no endpoint" => "the token names no IPv6 endpoint of the coordinator",
            "" => "-",
            other => other,
        },
        opt(&r.reflexive6),
    )
}

/// `a2actl status` without `--json`.
/// `a2actl whois` without `--json`.
pub fn whois_text(m: &WhoisMember) -> String {
    let admitted = match (m.admitted_by.as_str(), &m.invite) {
        ("token", _) => "the join token (holds the network secret)".to_string(),
        ("invite", Some(id)) => format!("invite {id}"),
        (other, _) => other.to_string(),
    };
    let mut out = format!(
        "{}{}\npublic key:  {}\nip:          {}\nip6:         {}\nadmitted by: {admitted}\n",
        m.name,
        if m.is_self { " (this node)" } else { "" },
        m.public_key,
        m.ip,
        m.ip6,
    );
    if !m.tags.is_empty() {
        out.push_str(&format!("tags:        {}\n", tag_words(&m.tags)));
    }
    out
}

/// `a2actl services`: one line per service, the agent card's name and skills after it.
pub fn services_table(services: &[ServiceEntry]) -> String {
    if services.is_empty() {
        return "no member advertises a service (add one: `a2actl service add NAME --port PORT`)\n"
            .into();
    }
    let mut out = format!(
        "{:<16} {:<20} {:<22} {:<5} {}\n",
        "NODE", "SERVICE", "ADDRESS", "PROTO", "DETAILS"
    );
    for s in services {
        let mut details = s.path.clone().unwrap_or_default();
        if let Some(c) = &s.card {
            let skills: Vec<&str> = c.skills.iter().map(|k| k.id.as_str()).collect();
            details = format!("{details} {:?} skills: {}", c.name, skills.join(","))
                .trim()
                .to_string();
        }
        out.push_str(&format!(
            "{:<16} {:<20} {:<22} {:<5} {}\n",
            s.node,
            s.name,
            format!("{}:{}", s.ip, s.port),
            s.proto.as_str(),
            details
        ));
    }
    out
}

fn tag_words(tags: &[String]) -> String {
    tags.iter()
        .map(|t| format!("tag:{t}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `a2actl policy show`: the policy in force, its grants with the flows each allowed, and the
/// packets refused.
pub fn policy_text(p: &a2a_proto::api::PolicyView) -> String {
    if p.version == 0 {
        return "no policy is set: every member reaches every port of every other member \
                (a2actl policy set FILE)\n"
            .into();
    }
    let mut out = format!("policy version {}\n", p.version);
    for g in &p.grants {
        out.push_str(&format!(
            "  grant {}: {} -> {} on {}   ({} flow(s) allowed here)\n",
            g.number,
            g.src.join(","),
            g.dst.join(","),
            g.ports.join(","),
            g.allowed
        ));
    }
    let refused: Vec<String> = p
        .refused
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    out.push_str(&format!(
        "refused here: {}\nflows tracked: {}\n",
        if refused.is_empty() {
            "none".to_string()
        } else {
            refused.join(", ")
        },
        p.flows
    ));
    if let Some(text) = &p.text {
        out.push_str("document:\n");
        out.push_str(text);
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

pub fn status_table(status: &Status) -> String {
    let Some(me) = &status.self_ else {
        return "not joined to a network: run `a2actl up --join TOKEN`\n".into();
    };
    let mut out = format!(
        "{} {} on {}{}\n",
        me.name,
        me.ip,
        me.interface,
        match (&me.refused, me.registered) {
            (Some(why), _) => format!(" (refused by the coordinator: {why})"),
            (None, true) => String::new(),
            (None, false) => " (coordinator unreachable; tunnels keep working)".into(),
        }
    );
    if let Some(dns) = &me.dns {
        out.push_str(&format!("names: NAME.a2a answered at {dns}\n"));
    }
    if !me.tags.is_empty() {
        out.push_str(&format!("tags: {}\n", tag_words(&me.tags)));
    }
    if let Some(p) = status.policy.as_ref().filter(|p| p.version > 0) {
        let refused: u64 = p.refused.values().sum();
        out.push_str(&format!(
            "policy: version {}, {} grant(s), {} flow(s) tracked, {refused} packet(s) refused \
             (a2actl policy show)\n",
            p.version,
            p.grants.len(),
            p.flows
        ));
    }
    if status.peers.is_empty() {
        out.push_str("no peers yet\n");
        return out;
    }
    let rows: Vec<[String; 7]> = status
        .peers
        .iter()
        .map(|p| {
            [
                if p.tags.is_empty() {
                    p.name.clone()
                } else {
                    format!("{} ({})", p.name, tag_words(&p.tags))
                },
                p.ip.clone(),
                match &p.listing {
                    Some(l) => format!("{} ({l})", p.path),
                    None => p.path.clone(),
                },
                p.endpoint.clone().unwrap_or_else(|| "-".into()),
                p.rtt_ms
                    .map(|ms| format!("{ms:.2}ms"))
                    .unwrap_or_else(|| "-".into()),
                p.last_handshake_s
                    .map(|s| format!("{s}s ago"))
                    .unwrap_or_else(|| "never".into()),
                format!("rx {} tx {}", bytes(p.rx_bytes), bytes(p.tx_bytes)),
            ]
        })
        .collect();
    let header = [
        "PEER",
        "IP",
        "PATH",
        "ENDPOINT",
        "RTT",
        "HANDSHAKE",
        "TRAFFIC",
    ]
    .map(String::from);
    let mut widths = [0usize; 7];
    for r in std::iter::once(&header).chain(rows.iter()) {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1}GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1}MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1}KiB", n as f64 / 1024.0),
        n => format!("{n}B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use a2a_proto::api::{PeerStatus, SelfStatus};

    #[test]
    fn netcheck_says_which_port_mapping_protocols_answered() {
        let mut r = NetcheckReport {
            coordinator: "192.0.2.1:7600".into(),
            udp: true,
            reflexive: Some("198.51.100.7:40001".into()),
            reflexive_alt: None,
            mapping: "endpoint-dependent".into(),
            relay: "udp".into(),
            coordinator_rtt_ms: Some(0.4),
            local: vec!["192.168.1.2".into()],
            portmap: a2a_proto::api::PortmapReport {
                gateway: Some("192.168.1.1".into()),
                answered: vec!["pcp".into(), "nat-pmp".into()],
                mapped: Some("198.51.100.7:51820".into()),
                protocol: Some("pcp".into()),
                lifetime_s: Some(7200),
                published: true,
                state: "mapped".into(),
            },
            ipv6: "reachable".into(),
            reflexive6: Some("[2001:db8::2]:51820".into()),
        };
        let text = netcheck_text(&r);
        assert!(
            text.contains("ipv6:          reachable (the coordinator answers over IPv6)\nreflexive6:    [2001:db8::2]:51820\n"),
            "{text}"
        );
        assert!(
            text.contains("port mapping:  198.51.100.7:51820 by pcp, published (gateway 192.168.1.1; answered: pcp, nat-pmp)"),
            "{text}"
        );
        r.portmap = a2a_proto::api::PortmapReport {
            gateway: Some("192.168.1.1".into()),
            state: "none answered".into(),
            ..Default::default()
        };
        assert!(netcheck_text(&r)
            .contains("port mapping:  none answered (gateway 192.168.1.1; answered: none)"));
    }

    #[test]
    fn whois_text_names_the_member_and_how_it_was_admitted() {
        let mut m = WhoisMember {
            name: "bob".into(),
            public_key: "k2".into(),
            ip: "100.64.0.2".into(),
            ip6: "fd00:1:2:3::2".into(),
            admitted_by: "invite".into(),
            invite: Some("ab".repeat(16)),
            certified_ms: Some(5),
            is_self: false,
            tags: vec![],
        };
        let t = whois_text(&m);
        assert!(
            t.starts_with("bob\npublic key:  k2\nip:          100.64.0.2\n"),
            "{t}"
        );
        assert!(
            t.contains(&format!("admitted by: invite {}", "ab".repeat(16))),
            "{t}"
        );
        m.admitted_by = "token".into();
        m.is_self = true;
        let t = whois_text(&m);
        assert!(t.starts_with("bob (this node)\n"), "{t}");
        assert!(t.contains("admitted by: the join token"), "{t}");
    }

    #[test]
    fn services_table_shows_the_card_and_path() {
        use a2a_proto::services::{Card, Proto, Skill};
        assert!(services_table(&[]).contains("no member advertises"));
        let entry = ServiceEntry {
            node: "alice".into(),
            name: "planner".into(),
            ip: "100.64.0.1".into(),
            ip6: "fd00::1".into(),
            port: 9100,
            proto: Proto::A2a,
            path: None,
            card: Some(Card {
                name: "Trip Planner".into(),
                description: String::new(),
                skills: vec![Skill {
                    id: "plan-trip".into(),
                    name: "Plan".into(),
                    tags: vec![],
                }],
            }),
            is_self: false,
        };
        let mcp = ServiceEntry {
            name: "tools".into(),
            port: 9200,
            proto: Proto::Mcp,
            path: Some("/mcp".into()),
            card: None,
            ..entry.clone()
        };
        let t = services_table(&[entry, mcp]);
        assert!(t.contains("100.64.0.1:9100"), "{t}");
        assert!(t.contains("\"Trip Planner\" skills: plan-trip"), "{t}");
        assert!(t.contains("mcp   /mcp"), "{t}");
    }

    #[test]
    fn table_lists_self_and_peers() {
        let st = Status {
            self_: Some(SelfStatus {
                name: "alice".into(),
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
                name: "bob".into(),
                ip: "100.64.0.2".into(),
                ip6: "fd00:1:2:3::2".into(),
                public_key: "k2".into(),
                path: "direct".into(),
                endpoint: Some("10.0.0.2:51820".into()),
                rtt_ms: Some(0.42),
                last_handshake_s: Some(4),
                rx_bytes: 2048,
                tx_bytes: 10,
                tags: vec![],
                listing: None,
            }],
            counters: Default::default(),
            policy: None,
        };
        let t = status_table(&st);
        assert!(t.starts_with("alice 100.64.0.1 on a2a0\n"), "{t}");
        assert!(t.contains("bob"));
        assert!(t.contains("direct"));
        assert!(t.contains("rx 2.0KiB tx 10B"));
        let none = Status {
            self_: None,
            peers: vec![],
            counters: Default::default(),
            policy: None,
        };
        assert!(status_table(&none).contains("a2actl up --join"));
        // An IPv6 endpoint is shown bracketed, as a socket address.
        let mut v6 = st.clone();
        v6.peers[0].endpoint = Some("[2001:db8::5]:51820".into());
        assert!(status_table(&v6).contains("[2001:db8::5]:51820"));
    }

    #[test]
    fn ping_lines_name_the_address_family() {
        let mut p = PingResult {
            name: "bob".into(),
            ip: "100.64.0.2".into(),
            path: "direct".into(),
            endpoint: Some("[2001:db8::5]:51820".into()),
            rtt_ms: Some(0.5),
        };
        assert_eq!(
            ping_line(&p),
            "pong from bob (100.64.0.2) via direct [2001:db8::5]:51820 over IPv6 in 0.50 ms"
        );
        p.path = "relay".into();
        p.endpoint = Some("198.51.100.7:7600".into());
        p.rtt_ms = None;
        assert_eq!(
            ping_line(&p),
            "no answer from bob (100.64.0.2) via relay 198.51.100.7:7600 over IPv4 within 2 s"
        );
    }
}
