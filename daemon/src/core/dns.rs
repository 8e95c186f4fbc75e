//! The overlay's names: a zone built from the membership (`NAME.a2a` → the member named NAME)
//! and a resolver that takes one query and says what to do with it — answer these bytes,
//! forward it to the host's resolvers, or drop it (and why, for the counters). I/O-free: the
//! driver (`tasks/dns.rs`) owns the sockets and the clock.
//!
//! The wire format is simple-dns's (parsing and building, with name compression); what this
//! module decides is the zone's content and the limits: a query larger than
//! [`MAX_QUERY_LEN`], or from a source past [`QUERIES_PER_SOURCE`] a second, is dropped; an
//! answer larger than the client can take over UDP (512 bytes, or its EDNS size up to
//! [`MAX_UDP_ANSWER`]) goes out empty with the TC bit, and the client asks again over TCP.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};

use simple_dns::rdata::{RData, A, AAAA, NS, OPT, PTR, SOA, SRV, TXT};
use simple_dns::{
    Name, Packet, PacketFlag, ResourceRecord, CLASS, OPCODE, QCLASS, QTYPE, RCODE, TYPE,
};

use crate::core::limit::PerSecond;

/// The zone: every member is `NAME.a2a.`.
pub const ZONE: &str = "a2a";
/// TTL of every answer: names move when members join, leave or rename, and a cache should
/// see that within seconds.
pub const TTL: u32 = 5;
/// How long a cache keeps "no such name" (the SOA's minimum, RFC 2308).
pub const NEGATIVE_TTL: u32 = 5;
/// A query (UDP datagram or TCP message) larger than this is dropped unread: a question is at
/// most 255 bytes of name, and what else a query carries (EDNS options) is small.
pub const MAX_QUERY_LEN: usize = 4096;
/// The most an answer over UDP may be when the client's EDNS offers more (the 2020 DNS flag
/// day's size: no IP fragmentation on any usual path).
pub const MAX_UDP_ANSWER: usize = 1232;
/// The answer size over UDP for a client without EDNS (RFC 1035).
pub const UDP_MIN: usize = 512;
/// Queries a second from one source address; the rest are dropped and counted. Every program
/// on the host asks from the same address, so this is the host's budget, and each peer's.
pub const QUERIES_PER_SOURCE: u32 = 5000;

/// A member as the zone sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The member's IPv6 overlay address (`None`: answer AAAA with no data).
    pub ip6: Option<Ipv6Addr>,
}

/// A member's service as DNS-SD shows it: `NAME._TYPE._tcp.a2a` SRV → `NODE.a2a:PORT`, TXT
/// with `node=`, `path=` and `skills=` (the card's skill ids, comma-separated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdService {
    /// The member's name (lowercased by the zone; a member not in the zone is left out).
    pub node: String,
    /// The service name (a DNS label).
    pub name: String,
    /// `a2a`, `mcp` or `http` (a `tcp` service has no DNS-SD type).
    pub kind: &'static str,
    pub port: u16,
    pub path: Option<String>,
    pub skills: Vec<String>,
}

/// The DNS-SD service types answered: `_a2a._tcp.a2a`, `_mcp._tcp.a2a`, `_http._tcp.a2a`.
pub const SD_KINDS: [&str; 3] = ["a2a", "mcp", "http"];

/// The names of the overlay, built from the membership.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Zone {
    /// The resolver's own address: `a2a.` A, where its NS points.
    dns_ip: Option<Ipv4Addr>,
    /// Lowercase label → addresses.
    names: BTreeMap<String, (Ipv4Addr, Option<Ipv6Addr>)>,
    /// Members left out: a name that is not a valid DNS label, or the resolver's address.
    invalid: u64,
    /// Names claimed by two or more members (none of them answers).
    conflicts: u64,
    serial: u32,
    /// DNS-SD: members' services (of members in `names` only), sorted.
    services: Vec<SdService>,
    /// Reverse names: the overlay's IPv4 prefix (`in-addr.arpa`) and IPv6 /48 (`ip6.arpa`)
    /// this resolver answers for (`None`: forwarded like any other name).
    reverse4: Option<Ipv4Net>,
    reverse6: Option<Ipv6Net>,
    /// Address → lowercase label of the member holding it (members in `names` only).
    by_addr: BTreeMap<IpAddr, String>,
}

/// What a reverse name (`in-addr.arpa`, `ip6.arpa`) inside the overlay's prefixes is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReverseName {
    /// A whole address.
    Address(IpAddr),
    /// Above an address (fewer labels), inside the prefix: an empty non-terminal; `apex` when
    /// it is the reverse zone's own name.
    Partial { apex: bool },
    /// Below an address, or a label that is no octet (nibble): no such name.
    Invalid,
}

/// Whether `name` is a host-name label (RFC 1123): 1 to 63 letters, digits and '-', not at
/// either end.
pub fn is_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl Zone {
    /// The zone of `members` (this node included), served at `dns_ip`. A member whose name is
    /// not a valid label, or whose address is the resolver's, is left out (counted in
    /// [`invalid`](Self::invalid)); a name that two members claim is left out for both
    /// (counted in [`conflicts`](Self::conflicts)): the resolver cannot tell which is meant,
    /// and a wrong answer sends a program's traffic to the wrong agent, where no answer only
    /// fails. `serial` is the SOA serial (the driver passes the build time in seconds).
    pub fn build(dns_ip: Ipv4Addr, serial: u32, members: impl IntoIterator<Item = Member>) -> Zone {
        let mut claims: BTreeMap<String, Vec<Member>> = BTreeMap::new();
        let mut invalid = 0;
        for m in members {
            if !is_label(&m.name) || m.ip == dns_ip {
                invalid += 1;
                continue;
            }
            claims
                .entry(m.name.to_ascii_lowercase())
                .or_default()
                .push(m);
        }
        let mut names = BTreeMap::new();
        let mut conflicts = 0;
        for (name, ms) in claims {
            match ms.as_slice() {
                [m] => {
                    names.insert(name, (m.ip, m.ip6));
                }
                _ => conflicts += 1,
            }
        }
        // Reverse: an address two members of the zone hold (the coordinator refuses that, so
        // only a forged or stale table) names neither.
        let mut holders: BTreeMap<IpAddr, Vec<&String>> = BTreeMap::new();
        for (name, (ip, ip6)) in &names {
            holders.entry(IpAddr::V4(*ip)).or_default().push(name);
            if let Some(ip6) = ip6 {
                holders.entry(IpAddr::V6(*ip6)).or_default().push(name);
            }
        }
        let by_addr = holders
            .into_iter()
            .filter_map(|(ip, ns)| match ns.as_slice() {
                [n] => Some((ip, (*n).clone())),
                _ => None,
            })
            .collect();
        Zone {
            dns_ip: Some(dns_ip),
            names,
            invalid,
            conflicts,
            serial,
            services: Vec::new(),
            reverse4: None,
            reverse6: None,
            by_addr,
        }
    }

    /// The zone answering reverse names too: PTR of an address inside `v4` (the overlay's
    /// prefix, `in-addr.arpa`) or `v6` (its ULA /48, `ip6.arpa`) is `NAME.a2a.` of the member
    /// holding it (`a2a.` for the resolver's own address), NXDOMAIN when no member of the zone
    /// does. Reverse names outside both stay forwarded.
    pub fn with_reverse(mut self, v4: Ipv4Net, v6: Ipv6Net) -> Zone {
        self.reverse4 = Some(v4.trunc());
        self.reverse6 = Some(v6.trunc());
        self
    }

    /// What `labels` (a whole query name) is in the reverse zones, with the reverse zone's
    /// apex name; `None` outside them.
    fn reverse(&self, labels: &[&[u8]]) -> Option<(ReverseName, String)> {
        let n = labels.len();
        if n < 2 || !labels[n - 1].eq_ignore_ascii_case(b"arpa") {
            return None;
        }
        // Most significant label first.
        let digits: Vec<&[u8]> = labels[..n - 2].iter().rev().copied().collect();
        if labels[n - 2].eq_ignore_ascii_case(b"in-addr") {
            let prefix = self.reverse4?;
            let k = usize::from(prefix.prefix_len()).div_ceil(8).max(1);
            let octet = |l: &[u8]| -> Option<u8> {
                let canonical = !l.is_empty() && l.len() <= 3 && (l == b"0" || l[0] != b'0');
                std::str::from_utf8(l)
                    .ok()?
                    .parse()
                    .ok()
                    .filter(|_| canonical)
            };
            let mut o = [0u8; 4];
            for (slot, label) in o.iter_mut().zip(digits.get(..k)?) {
                *slot = octet(label)?;
            }
            let block = Ipv4Net::new(Ipv4Addr::from(o), (8 * k) as u8).ok()?;
            if !prefix.contains(&block) {
                return None;
            }
            let apex = reverse_apex(&digits[..k], "in-addr.arpa");
            let rest: Option<Vec<u8>> = digits[k..].iter().map(|l| octet(l)).collect();
            let name = match rest {
                Some(r) if k + r.len() == 4 => {
                    o[k..].copy_from_slice(&r);
                    ReverseName::Address(IpAddr::V4(o.into()))
                }
                Some(r) if k + r.len() < 4 => ReverseName::Partial { apex: r.is_empty() },
                _ => ReverseName::Invalid,
            };
            return Some((name, apex));
        }
        if labels[n - 2].eq_ignore_ascii_case(b"ip6") {
            let prefix = self.reverse6?;
            let k = usize::from(prefix.prefix_len()).div_ceil(4).max(1);
            let nibble = |l: &[u8]| -> Option<u8> {
                match l {
                    [c] => (*c as char).to_digit(16).map(|d| d as u8),
                    _ => None,
                }
            };
            let mut o = [0u8; 16];
            let set = |o: &mut [u8; 16], i: usize, v: u8| o[i / 2] |= v << (4 * (1 - i % 2));
            for i in 0..k {
                set(&mut o, i, nibble(digits.get(i)?)?);
            }
            let block = Ipv6Net::new(Ipv6Addr::from(o), (4 * k) as u8).ok()?;
            if !prefix.contains(&block) {
                return None;
            }
            let apex = reverse_apex(&digits[..k], "ip6.arpa");
            let rest: Option<Vec<u8>> = digits[k..].iter().map(|l| nibble(l)).collect();
            let name = match rest {
                Some(r) if k + r.len() == 32 => {
                    for (j, v) in r.into_iter().enumerate() {
                        set(&mut o, k + j, v);
                    }
                    ReverseName::Address(IpAddr::V6(o.into()))
                }
                Some(r) if k + r.len() < 32 => ReverseName::Partial { apex: r.is_empty() },
                _ => ReverseName::Invalid,
            };
            return Some((name, apex));
        }
        None
    }

    /// The zone with the members' services for DNS-SD: a service of a member not in the zone
    /// (invalid or conflicting name), of no DNS-SD type, or with an invalid name is left out.
    /// A service name two members advertise for one type is one instance with both members'
    /// SRV and TXT records (clients pick, as with any SRV set).
    pub fn with_services(mut self, services: impl IntoIterator<Item = SdService>) -> Zone {
        let mut list: Vec<SdService> = services
            .into_iter()
            .filter_map(|mut s| {
                s.node = s.node.to_ascii_lowercase();
                s.name = s.name.to_ascii_lowercase();
                let ok = self.names.contains_key(&s.node)
                    && is_label(&s.name)
                    && SD_KINDS.contains(&s.kind);
                ok.then_some(s)
            })
            .collect();
        list.sort_by(|a, b| (a.kind, &a.name, &a.node).cmp(&(b.kind, &b.name, &b.node)));
        self.services = list;
        self
    }

    /// The addresses of the member named `label` (any case).
    pub fn lookup(&self, label: &str) -> Option<(Ipv4Addr, Option<Ipv6Addr>)> {
        self.names.get(&label.to_ascii_lowercase()).copied()
    }

    /// Members left out for an invalid name (or the resolver's address).
    pub fn invalid(&self) -> u64 {
        self.invalid
    }

    /// Names left out because two members claim them.
    pub fn conflicts(&self) -> u64 {
        self.conflicts
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Whether `other` answers every question as this zone does (the serial aside).
    pub fn same_names(&self, other: &Zone) -> bool {
        self.dns_ip == other.dns_ip
            && self.names == other.names
            && self.services == other.services
            && self.reverse4 == other.reverse4
            && self.reverse6 == other.reverse6
    }
}

/// How a query came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Why a query was dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Not a DNS query: garbage, truncated, a response, no question or several.
    Malformed,
    /// Larger than [`MAX_QUERY_LEN`].
    Oversized,
    /// Its source is past [`QUERIES_PER_SOURCE`] this second.
    RateLimited,
}

/// What to do with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send these bytes back; `truncated`: the answer did not fit and went out with TC.
    Answer {
        bytes: Vec<u8>,
        truncated: bool,
    },
    /// The name is outside the zone: send the query as it is to the host's resolvers and
    /// their answer back.
    Forward,
    Drop(Dropped),
}

/// The resolver: the zone and the per-source budget.
pub struct Resolver {
    zone: Zone,
    budget: PerSecond<IpAddr>,
    /// When the current budget second began.
    second: Option<Instant>,
}

impl Resolver {
    pub fn new(zone: Zone) -> Resolver {
        Resolver::with_rate(zone, QUERIES_PER_SOURCE)
    }

    /// A resolver allowing `per_second` queries a second from each source.
    pub fn with_rate(zone: Zone, per_second: u32) -> Resolver {
        Resolver {
            zone,
            budget: PerSecond::new(per_second),
            second: None,
        }
    }

    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    pub fn set_zone(&mut self, zone: Zone) {
        self.zone = zone;
    }

    /// Decides what to do with `query`, which came from `from` over `transport` at `now`.
    pub fn handle(
        &mut self,
        now: Instant,
        from: IpAddr,
        query: &[u8],
        transport: Transport,
    ) -> Verdict {
        if query.len() > MAX_QUERY_LEN {
            return Verdict::Drop(Dropped::Oversized);
        }
        if self
            .second
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1))
        {
            self.budget.reset();
            self.second = Some(now);
        }
        if !self.budget.allow(from) {
            return Verdict::Drop(Dropped::RateLimited);
        }
        match Packet::parse(query) {
            Ok(packet) => self.answer(&packet, transport),
            Err(_) => self.unparsed(query),
        }
    }

    /// A query simple-dns cannot read: garbage, or a well-formed question of a type or class
    /// it does not know. The latter is forwarded when outside the zone (the host's resolvers
    /// may know it) and answered NOTIMP inside it.
    fn unparsed(&self, query: &[u8]) -> Verdict {
        let Some(q) = RawQuestion::parse(query) else {
            return Verdict::Drop(Dropped::Malformed);
        };
        if !q.in_zone {
            return Verdict::Forward;
        }
        let mut out = Vec::with_capacity(12 + q.bytes.len());
        out.extend_from_slice(&query[0..2]); // id
        let rd = query[2] & 0x01;
        out.push(0x80 | 0x04 | rd); // QR, AA, RD as asked
        out.push(0x80 | RCODE::NotImplemented as u8); // RA, NOTIMP
        out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(q.bytes);
        Verdict::Answer {
            bytes: out,
            truncated: false,
        }
    }

    fn answer(&self, query: &Packet<'_>, transport: Transport) -> Verdict {
        if query.has_flags(PacketFlag::RESPONSE) || query.questions.len() != 1 {
            return Verdict::Drop(Dropped::Malformed);
        }
        let question = &query.questions[0];
        let labels = question.qname.get_labels();
        let in_zone = labels
            .last()
            .is_some_and(|l| l.as_ref().eq_ignore_ascii_case(ZONE.as_bytes()));
        let raw: Vec<&[u8]> = labels.iter().map(|l| l.as_ref()).collect();
        let reverse = if in_zone {
            None
        } else {
            self.zone.reverse(&raw)
        };
        if !in_zone && reverse.is_none() {
            return Verdict::Forward;
        }
        let mut reply = Packet::new_reply(query.id());
        reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER | PacketFlag::RECURSION_AVAILABLE);
        if query.has_flags(PacketFlag::RECURSION_DESIRED) {
            reply.set_flags(PacketFlag::RECURSION_DESIRED);
        }
        reply.questions.push(question.clone());
        let limit = match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => query.opt().map_or(UDP_MIN, |o| {
                usize::from(o.udp_packet_size).clamp(UDP_MIN, MAX_UDP_ANSWER)
            }),
        };
        if query.opt().is_some() {
            *reply.opt_mut() = Some(OPT {
                opt_codes: Vec::new(),
                udp_packet_size: MAX_UDP_ANSWER as u16,
                version: 0,
            });
        }
        if query.opcode() != OPCODE::StandardQuery {
            *reply.rcode_mut() = RCODE::NotImplemented;
            return finish(reply, limit);
        }
        let class_ok = matches!(question.qclass, QCLASS::CLASS(CLASS::IN) | QCLASS::ANY);
        if !class_ok {
            *reply.rcode_mut() = RCODE::Refused;
            return finish(reply, limit);
        }
        let name = question.qname.clone();
        let qtype = question.qtype;
        let wants = |t: TYPE| qtype == QTYPE::TYPE(t) || qtype == QTYPE::ANY;
        if let Some((rev, zone_name)) = reverse {
            let soa = self.soa_at(Name::new_unchecked(&zone_name).into_owned());
            match rev {
                ReverseName::Address(ip) => {
                    let target = if Some(ip) == self.zone.dns_ip.map(IpAddr::V4) {
                        Some(ZONE.to_string())
                    } else {
                        self.zone.by_addr.get(&ip).map(|n| format!("{n}.{ZONE}"))
                    };
                    match target {
                        Some(t) if wants(TYPE::PTR) => {
                            let t = Name::new_unchecked(&t).into_owned();
                            reply.answers.push(rr(name, RData::PTR(PTR(t))));
                        }
                        Some(_) => {}
                        None => *reply.rcode_mut() = RCODE::NameError,
                    }
                }
                ReverseName::Partial { apex: true } => {
                    if wants(TYPE::SOA) {
                        reply.answers.push(soa.clone());
                    }
                    if wants(TYPE::NS) {
                        reply.answers.push(rr(name, RData::NS(NS(apex()))));
                    }
                }
                ReverseName::Partial { apex: false } => {}
                ReverseName::Invalid => *reply.rcode_mut() = RCODE::NameError,
            }
            if reply.answers.is_empty() {
                reply.name_servers.push(soa);
            }
            return finish(reply, limit);
        }
        match labels.len() {
            // The apex: SOA, NS, and the resolver's own address.
            1 => {
                if wants(TYPE::SOA) {
                    reply.answers.push(self.soa());
                }
                if wants(TYPE::NS) {
                    reply.answers.push(rr(name.clone(), RData::NS(NS(apex()))));
                }
                if wants(TYPE::A) {
                    if let Some(ip) = self.zone.dns_ip {
                        reply
                            .answers
                            .push(rr(name, RData::A(A { address: ip.into() })));
                    }
                }
            }
            2 => {
                let label = String::from_utf8_lossy(labels[0].as_ref());
                match self.zone.lookup(&label) {
                    Some((ip, ip6)) => {
                        if wants(TYPE::A) {
                            reply
                                .answers
                                .push(rr(name.clone(), RData::A(A { address: ip.into() })));
                        }
                        if let Some(ip6) = ip6.filter(|_| wants(TYPE::AAAA)) {
                            reply.answers.push(rr(
                                name,
                                RData::AAAA(AAAA {
                                    address: ip6.into(),
                                }),
                            ));
                        }
                    }
                    None => *reply.rcode_mut() = RCODE::NameError,
                }
            }
            // DNS-SD: `_TYPE._tcp.a2a` PTR → its instances.
            3 if labels[1].as_ref().eq_ignore_ascii_case(b"_tcp") => {
                match sd_kind(labels[0].as_ref()) {
                    Some(kind) => {
                        if wants(TYPE::PTR) {
                            let mut seen = std::collections::BTreeSet::new();
                            for s in self.zone.services.iter().filter(|s| s.kind == kind) {
                                if seen.insert(&s.name) {
                                    let instance = Name::new_unchecked(&format!(
                                        "{}._{kind}._tcp.{ZONE}",
                                        s.name
                                    ))
                                    .into_owned();
                                    reply
                                        .answers
                                        .push(rr(name.clone(), RData::PTR(PTR(instance))));
                                }
                            }
                        }
                    }
                    None => *reply.rcode_mut() = RCODE::NameError,
                }
            }
            // DNS-SD: `NAME._TYPE._tcp.a2a` SRV and TXT.
            4 if labels[2].as_ref().eq_ignore_ascii_case(b"_tcp") => {
                let instance = String::from_utf8_lossy(labels[0].as_ref()).to_ascii_lowercase();
                let found: Vec<&SdService> = match sd_kind(labels[1].as_ref()) {
                    Some(kind) => self
                        .zone
                        .services
                        .iter()
                        .filter(|s| s.kind == kind && s.name == instance)
                        .collect(),
                    None => Vec::new(),
                };
                if found.is_empty() {
                    *reply.rcode_mut() = RCODE::NameError;
                }
                for s in found {
                    if wants(TYPE::SRV) {
                        let target =
                            Name::new_unchecked(&format!("{}.{ZONE}", s.node)).into_owned();
                        reply.answers.push(rr(
                            name.clone(),
                            RData::SRV(SRV {
                                priority: 0,
                                weight: 0,
                                port: s.port,
                                target,
                            }),
                        ));
                    }
                    if wants(TYPE::TXT) {
                        if let Some(txt) = sd_txt(s) {
                            reply.answers.push(rr(name.clone(), RData::TXT(txt)));
                        }
                    }
                }
            }
            // No names below a member's.
            _ => *reply.rcode_mut() = RCODE::NameError,
        }
        if reply.answers.is_empty() {
            // NXDOMAIN or no data: the SOA tells a cache how long to remember it.
            reply.name_servers.push(self.soa());
        }
        finish(reply, limit)
    }

    fn soa(&self) -> ResourceRecord<'static> {
        self.soa_at(apex())
    }

    /// The SOA of the zone named `owner` (`a2a.`, or a reverse zone), served by `a2a.`.
    fn soa_at(&self, owner: Name<'static>) -> ResourceRecord<'static> {
        let soa = SOA {
            mname: apex(),
            rname: Name::new_unchecked("hostmaster.a2a"),
            serial: self.zone.serial,
            refresh: 3600,
            retry: 600,
            expire: 86400,
            minimum: NEGATIVE_TTL,
        };
        ResourceRecord::new(owner, CLASS::IN, NEGATIVE_TTL, RData::SOA(soa))
    }
}

/// The reverse zone's name from its most significant labels first (`64.100.in-addr.arpa`).
fn reverse_apex(digits: &[&[u8]], suffix: &str) -> String {
    let mut out = String::new();
    for d in digits.iter().rev() {
        out.push_str(&String::from_utf8_lossy(d).to_ascii_lowercase());
        out.push('.');
    }
    out.push_str(suffix);
    out
}

/// The DNS-SD type of a `_TYPE` label.
fn sd_kind(label: &[u8]) -> Option<&'static str> {
    SD_KINDS
        .iter()
        .find(|k| {
            label.len() == k.len() + 1
                && label[0] == b'_'
                && label[1..].eq_ignore_ascii_case(k.as_bytes())
        })
        .copied()
}

/// The TXT record of a service (RFC 6763 key=value strings, each at most 255 bytes: a skill
/// list that would not fit is cut at a whole id).
fn sd_txt(s: &SdService) -> Option<TXT<'static>> {
    let mut strings = vec![format!("node={}", s.node)];
    if let Some(p) = &s.path {
        strings.push(format!("path={p}"));
    }
    if !s.skills.is_empty() {
        let mut skills = String::from("skills=");
        for (i, id) in s.skills.iter().enumerate() {
            let add = if i == 0 { id.clone() } else { format!(",{id}") };
            if skills.len() + add.len() > 255 {
                break;
            }
            skills.push_str(&add);
        }
        strings.push(skills);
    }
    let mut txt = TXT::new();
    for t in strings.into_iter().filter(|t| t.len() <= 255) {
        txt.add_char_string(
            simple_dns::CharacterString::new(t.as_bytes())
                .ok()?
                .into_owned(),
        );
    }
    Some(txt)
}

fn apex() -> Name<'static> {
    Name::new_unchecked(ZONE)
}

fn rr<'a>(name: Name<'a>, rdata: RData<'a>) -> ResourceRecord<'a> {
    ResourceRecord::new(name, CLASS::IN, TTL, rdata)
}

/// The answer's bytes, or, when they exceed `limit`, the answer without its records and with
/// the TC bit (the client asks again over TCP).
fn finish(mut reply: Packet<'_>, limit: usize) -> Verdict {
    let bytes = match reply.build_bytes_vec_compressed() {
        Ok(b) => b,
        Err(_) => return Verdict::Drop(Dropped::Malformed),
    };
    if bytes.len() <= limit {
        return Verdict::Answer {
            bytes,
            truncated: false,
        };
    }
    reply.answers.clear();
    reply.name_servers.clear();
    reply.additional_records.clear();
    reply.set_flags(PacketFlag::TRUNCATION);
    match reply.build_bytes_vec_compressed() {
        Ok(bytes) if bytes.len() <= limit => Verdict::Answer {
            bytes,
            truncated: true,
        },
        _ => Verdict::Drop(Dropped::Malformed),
    }
}

/// A SERVFAIL answer to `query` (its id and question, RD as asked): what a client gets when no
/// upstream answered a forwarded query. `None` for what is no query.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    error_answer(query, RCODE::ServerFailure)
}

/// A REFUSED answer to `query`: a forward the resolver will not make for that source.
pub fn refused(query: &[u8]) -> Option<Vec<u8>> {
    error_answer(query, RCODE::Refused)
}

fn error_answer(query: &[u8], rcode: RCODE) -> Option<Vec<u8>> {
    let q = RawQuestion::parse(query)?;
    let mut out = Vec::with_capacity(12 + q.bytes.len());
    out.extend_from_slice(&query[0..2]);
    out.push(0x80 | (query[2] & 0x01)); // QR, RD as asked
    out.push(0x80 | rcode as u8); // RA, the error
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(q.bytes);
    Some(out)
}

/// The question of a query read by hand, for the queries simple-dns refuses (an unknown type
/// or class): a query header with one question, its name uncompressed.
struct RawQuestion<'a> {
    /// The question's bytes (name, type, class), as they came.
    bytes: &'a [u8],
    in_zone: bool,
}

impl<'a> RawQuestion<'a> {
    fn parse(query: &'a [u8]) -> Option<RawQuestion<'a>> {
        if query.len() < 12 {
            return None;
        }
        let is_response = query[2] & 0x80 != 0;
        let qdcount = u16::from_be_bytes([query[4], query[5]]);
        if is_response || qdcount != 1 {
            return None;
        }
        let mut at = 12;
        let mut last: Option<&[u8]> = None;
        loop {
            let len = usize::from(*query.get(at)?);
            if len == 0 {
                at += 1;
                break;
            }
            if len > 63 || at - 12 > 255 {
                return None; // a compression pointer, or too long a name
            }
            last = Some(query.get(at + 1..at + 1 + len)?);
            at += 1 + len;
        }
        let end = at + 4;
        let bytes = query.get(12..end)?;
        let in_zone = last.is_some_and(|l| l.eq_ignore_ascii_case(ZONE.as_bytes()));
        Some(RawQuestion { bytes, in_zone })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::Question;

    const DNS: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);
    const HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1));

    fn member(name: &str, ip: [u8; 4]) -> Member {
        Member {
            name: name.into(),
            ip: ip.into(),
            ip6: None,
        }
    }

    fn resolver() -> Resolver {
        Resolver::new(Zone::build(
            DNS,
            1,
            [
                member("alice", [100, 64, 0, 1]),
                member("bob", [100, 64, 0, 2]),
            ],
        ))
    }

    fn query(name: &str, qtype: TYPE) -> Vec<u8> {
        let mut q = Packet::new_query(0x1234);
        q.set_flags(PacketFlag::RECURSION_DESIRED);
        q.questions.push(Question::new(
            Name::new_unchecked(name),
            qtype.into(),
            CLASS::IN.into(),
            false,
        ));
        q.build_bytes_vec().unwrap()
    }

    fn ask(r: &mut Resolver, bytes: &[u8]) -> Verdict {
        r.handle(Instant::now(), HOST, bytes, Transport::Udp)
    }

    /// The answer packet's bytes, parsed (the caller keeps the bytes alive).
    fn answered(v: Verdict) -> Vec<u8> {
        match v {
            Verdict::Answer { bytes, .. } => bytes,
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[test]
    fn dns_sd_browses_members_services() {
        let sd = |node: &str, name: &str, kind: &'static str, port: u16| SdService {
            node: node.into(),
            name: name.into(),
            kind,
            port,
            path: None,
            skills: vec![],
        };
        let mut planner = sd("alice", "planner", "a2a", 9100);
        planner.skills = vec!["plan-trip".into(), "book-hotel".into()];
        let mut tools = sd("bob", "tools", "mcp", 9200);
        tools.path = Some("/mcp".into());
        let zone = Zone::build(
            DNS,
            1,
            [
                member("alice", [100, 64, 0, 1]),
                member("bob", [100, 64, 0, 2]),
            ],
        )
        .with_services([
            planner,
            tools,
            sd("bob", "planner", "a2a", 9101),
            sd("mallory", "ghost", "a2a", 1), // not a member in the zone
            sd("bob", "raw", "tcp", 1),       // no DNS-SD type
        ]);
        let mut r = Resolver::new(zone);
        let bytes = answered(ask(&mut r, &query("_a2a._tcp.a2a", TYPE::PTR)));
        let p = Packet::parse(&bytes).unwrap();
        let ptrs: Vec<String> = p
            .answers
            .iter()
            .filter_map(|r| match &r.rdata {
                RData::PTR(n) => Some(n.0.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(ptrs, vec!["planner._a2a._tcp.a2a"]);
        // The instance two members offer: both SRV targets, each with its TXT.
        let bytes = answered(ask(&mut r, &query("planner._a2a._tcp.a2a", TYPE::SRV)));
        let p = Packet::parse(&bytes).unwrap();
        let mut srv: Vec<(String, u16)> = p
            .answers
            .iter()
            .filter_map(|r| match &r.rdata {
                RData::SRV(s) => Some((s.target.to_string(), s.port)),
                _ => None,
            })
            .collect();
        srv.sort();
        assert_eq!(
            srv,
            vec![("alice.a2a".into(), 9100), ("bob.a2a".into(), 9101)]
        );
        let bytes = answered(ask(&mut r, &query("tools._mcp._tcp.a2a", TYPE::TXT)));
        let p = Packet::parse(&bytes).unwrap();
        let RData::TXT(txt) = &p.answers[0].rdata else {
            panic!("{:?}", p.answers)
        };
        let attrs = txt.attributes();
        assert_eq!(attrs["path"].as_deref(), Some("/mcp"));
        assert_eq!(attrs["node"].as_deref(), Some("bob"));
        let bytes = answered(ask(&mut r, &query("planner._a2a._tcp.a2a", TYPE::TXT)));
        let p = Packet::parse(&bytes).unwrap();
        let skills: Vec<String> = p
            .answers
            .iter()
            .filter_map(|r| match &r.rdata {
                RData::TXT(t) => t.attributes().get("skills").cloned().flatten(),
                _ => None,
            })
            .collect();
        assert_eq!(skills, vec!["plan-trip,book-hotel"]);
        // Unknown instances and types: NXDOMAIN; a known type with no instance: no data.
        for name in ["ghost._a2a._tcp.a2a", "x._smtp._tcp.a2a", "_smtp._tcp.a2a"] {
            let bytes = answered(ask(&mut r, &query(name, TYPE::SRV)));
            assert_eq!(
                Packet::parse(&bytes).unwrap().rcode(),
                RCODE::NameError,
                "{name}"
            );
        }
        let bytes = answered(ask(&mut r, &query("_http._tcp.a2a", TYPE::PTR)));
        let p = Packet::parse(&bytes).unwrap();
        assert_eq!(p.rcode(), RCODE::NoError);
        assert!(p.answers.is_empty());
    }

    fn a_records(p: &Packet<'_>) -> Vec<Ipv4Addr> {
        p.answers
            .iter()
            .filter_map(|r| match &r.rdata {
                RData::A(a) => Some(Ipv4Addr::from(a.address)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_member_name_answers_its_address() {
        let mut r = resolver();
        let bytes = answered(ask(&mut r, &query("bob.a2a", TYPE::A)));
        let p = Packet::parse(&bytes).unwrap();
        assert_eq!(p.id(), 0x1234);
        assert_eq!(p.rcode(), RCODE::NoError);
        assert!(p.has_flags(PacketFlag::RESPONSE | PacketFlag::AUTHORITATIVE_ANSWER));
        assert!(p.has_flags(PacketFlag::RECURSION_DESIRED));
        assert_eq!(a_records(&p), vec![Ipv4Addr::new(100, 64, 0, 2)]);
        assert_eq!(p.answers[0].ttl, TTL);
    }

    #[test]
    fn names_are_case_insensitive_and_keep_the_asked_case() {
        let mut r = resolver();
        let bytes = answered(ask(&mut r, &query("BoB.A2A", TYPE::A)));
        let p = Packet::parse(&bytes).unwrap();
        assert_eq!(a_records(&p), vec![Ipv4Addr::new(100, 64, 0, 2)]);
        assert_eq!(p.questions[0].qname.to_string(), "BoB.A2A");
    }

    #[test]
    fn an_unknown_name_in_the_zone_is_nxdomain_with_the_soa() {
        let mut r = resolver();
        for name in ["carol.a2a", "x.bob.a2a"] {
            let bytes = answered(ask(&mut r, &query(name, TYPE::A)));
            let p = Packet::parse(&bytes).unwrap();
            assert_eq!(p.rcode(), RCODE::NameError, "{name}");
            assert!(p.answers.is_empty());
            assert!(matches!(p.name_servers[0].rdata, RData::SOA(_)));
        }
    }

    #[test]
    fn aaaa_of_a_known_name_without_ipv6_is_no_data_not_nxdomain() {
        let mut r = resolver();
        let bytes = answered(ask(&mut r, &query("alice.a2a", TYPE::AAAA)));
        let p = Packet::parse(&bytes).unwrap();
        assert_eq!(p.rcode(), RCODE::NoError);
        assert!(p.answers.is_empty());
        assert!(matches!(p.name_servers[0].rdata, RData::SOA(_)));
        // Once members have IPv6 addresses, AAAA answers them.
        let ip6: Ipv6Addr = "fd00::1".parse().unwrap();
        let mut r = Resolver::new(Zone::build(
            DNS,
            1,
            [Member {
                name: "alice".into(),
                ip: [100, 64, 0, 1].into(),
                ip6: Some(ip6),
            }],
        ));
        let bytes = answered(ask(&mut r, &query("alice.a2a", TYPE::AAAA)));
        let p = Packet::parse(&bytes).unwrap();
        assert!(matches!(&p.answers[0].rdata, RData::AAAA(a) if Ipv6Addr::from(a.address) == ip6));
    }

    #[test]
    fn the_apex_has_soa_ns_and_the_resolver_address() {
        let mut r = resolver();
        for (t, want) in [
            (TYPE::SOA, TYPE::SOA),
            (TYPE::NS, TYPE::NS),
            (TYPE::A, TYPE::A),
        ] {
            let bytes = answered(ask(&mut r, &query("a2a", t)));
            let p = Packet::parse(&bytes).unwrap();
            assert_eq!(p.rcode(), RCODE::NoError);
            assert_eq!(p.answers.len(), 1);
            assert_eq!(p.answers[0].rdata.type_code(), want);
        }
        let bytes = answered(ask(&mut r, &query("a2a", TYPE::A)));
        assert_eq!(a_records(&Packet::parse(&bytes).unwrap()), vec![DNS]);
    }

    #[test]
    fn names_outside_the_zone_are_forwarded() {
        let mut r = resolver();
        for name in ["example.com", "a2a.example.com", "bob.a2a.com", "com"] {
            assert_eq!(
                ask(&mut r, &query(name, TYPE::A)),
                Verdict::Forward,
                "{name}"
            );
        }
        // A type simple-dns does not know (65280, private use): forwarded outside the zone,
        // NOTIMP inside it.
        let mut q = query("example.com", TYPE::A);
        let n = q.len();
        q[n - 4..n - 2].copy_from_slice(&65280u16.to_be_bytes());
        assert_eq!(ask(&mut r, &q), Verdict::Forward);
        let mut q = query("bob.a2a", TYPE::A);
        let n = q.len();
        q[n - 4..n - 2].copy_from_slice(&65280u16.to_be_bytes());
        let bytes = answered(ask(&mut r, &q));
        assert_eq!(&bytes[0..2], &[0x12, 0x34]);
        assert_eq!(bytes[3] & 0x0f, RCODE::NotImplemented as u8);
        assert_eq!(&bytes[12..], &q[12..]);
    }

    #[test]
    fn servfail_keeps_the_id_and_question() {
        let q = query("example.com", TYPE::A);
        let s = servfail(&q).unwrap();
        let p = Packet::parse(&s).unwrap();
        assert_eq!(p.id(), 0x1234);
        assert_eq!(p.rcode(), RCODE::ServerFailure);
        assert!(p.has_flags(PacketFlag::RESPONSE));
        assert_eq!(p.questions[0].qname.to_string(), "example.com");
        assert_eq!(servfail(&[1, 2, 3]), None);
        let r = refused(&q).unwrap();
        assert_eq!(Packet::parse(&r).unwrap().rcode(), RCODE::Refused);
    }

    #[test]
    fn malformed_queries_are_dropped() {
        let mut r = resolver();
        let good = query("bob.a2a", TYPE::A);
        let mut response = good.clone();
        response[2] |= 0x80;
        let mut two = good.clone();
        two[5] = 2;
        let mut none = good.clone();
        none[5] = 0;
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0; 5],
            good[..good.len() - 3].to_vec(),
            response,
            two,
            none,
            vec![0xff; 300],
        ];
        for c in cases {
            assert_eq!(ask(&mut r, &c), Verdict::Drop(Dropped::Malformed), "{c:?}");
        }
        assert_eq!(
            ask(&mut r, &vec![0; MAX_QUERY_LEN + 1]),
            Verdict::Drop(Dropped::Oversized)
        );
        // Random bytes never crash it.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            let mut d: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            if d.len() > 12 {
                d[2] &= 0x7f;
                d[4] = 0;
                d[5] = 1;
            }
            let _ = r.handle(
                Instant::now(),
                IpAddr::V4([10, 0, 0, 1].into()),
                &d,
                Transport::Udp,
            );
        }
    }

    #[test]
    fn an_answer_too_large_for_udp_goes_out_empty_with_tc() {
        let mut reply = Packet::new_reply(7);
        let name = Name::new_unchecked("bob.a2a");
        for i in 0..100u32 {
            reply
                .answers
                .push(rr(name.clone(), RData::A(A { address: i })));
        }
        match finish(reply.clone(), UDP_MIN) {
            Verdict::Answer { bytes, truncated } => {
                assert!(truncated);
                assert!(bytes.len() <= UDP_MIN);
                let p = Packet::parse(&bytes).unwrap();
                assert!(p.has_flags(PacketFlag::TRUNCATION));
                assert!(p.answers.is_empty());
            }
            other => panic!("{other:?}"),
        }
        match finish(reply, usize::from(u16::MAX)) {
            Verdict::Answer { bytes, truncated } => {
                assert!(!truncated);
                assert_eq!(Packet::parse(&bytes).unwrap().answers.len(), 100);
            }
            other => panic!("{other:?}"),
        }
        // Every real answer of the zone fits in 512 bytes, even for the longest name.
        let long = "a".repeat(63);
        let mut r = Resolver::new(Zone::build(DNS, 1, [member(&long, [100, 64, 0, 9])]));
        let bytes = answered(ask(&mut r, &query(&format!("{long}.a2a"), TYPE::A)));
        assert!(bytes.len() <= UDP_MIN);
    }

    #[test]
    fn the_edns_size_is_honoured_up_to_the_cap() {
        let mut q = Packet::new_query(1);
        q.questions.push(Question::new(
            Name::new_unchecked("bob.a2a"),
            TYPE::A.into(),
            CLASS::IN.into(),
            false,
        ));
        *q.opt_mut() = Some(OPT {
            opt_codes: vec![],
            udp_packet_size: 4096,
            version: 0,
        });
        let bytes = q.build_bytes_vec().unwrap();
        let mut r = resolver();
        let out = answered(ask(&mut r, &bytes));
        let p = Packet::parse(&out).unwrap();
        assert_eq!(
            p.opt().map(|o| o.udp_packet_size),
            Some(MAX_UDP_ANSWER as u16)
        );
        assert_eq!(a_records(&p), vec![Ipv4Addr::new(100, 64, 0, 2)]);
    }

    #[test]
    fn each_source_has_its_own_budget_a_second() {
        let mut r = Resolver::with_rate(resolver().zone.clone(), 10);
        let q = query("bob.a2a", TYPE::A);
        let t0 = Instant::now();
        let other = IpAddr::V4([100, 64, 0, 2].into());
        for _ in 0..10 {
            assert!(matches!(
                r.handle(t0, HOST, &q, Transport::Udp),
                Verdict::Answer { .. }
            ));
        }
        assert_eq!(
            r.handle(t0, HOST, &q, Transport::Udp),
            Verdict::Drop(Dropped::RateLimited)
        );
        assert!(matches!(
            r.handle(t0, other, &q, Transport::Udp),
            Verdict::Answer { .. }
        ));
        let later = t0 + Duration::from_secs(1);
        assert!(matches!(
            r.handle(later, HOST, &q, Transport::Udp),
            Verdict::Answer { .. }
        ));
    }

    #[test]
    fn invalid_names_and_claimed_twice_names_are_left_out() {
        let zone = Zone::build(
            DNS,
            1,
            [
                member("alice", [100, 64, 0, 1]),
                member("bob", [100, 64, 0, 2]),
                member("BOB", [100, 64, 0, 3]),
                member("under_score", [100, 64, 0, 4]),
                member(&"x".repeat(64), [100, 64, 0, 5]),
                member("-dash", [100, 64, 0, 6]),
                member("thief", [100, 100, 100, 100]),
            ],
        );
        assert_eq!(zone.invalid(), 4);
        assert_eq!(zone.conflicts(), 1);
        assert_eq!(zone.lookup("bob"), None, "two claims: neither answers");
        assert_eq!(zone.lookup("ALICE"), Some(([100, 64, 0, 1].into(), None)));
        let mut r = Resolver::new(zone);
        let bytes = answered(ask(&mut r, &query("bob.a2a", TYPE::A)));
        assert_eq!(Packet::parse(&bytes).unwrap().rcode(), RCODE::NameError);
    }

    #[test]
    fn other_classes_and_opcodes_get_no_records() {
        let mut r = resolver();
        let mut q = Packet::new_query(3);
        q.questions.push(Question::new(
            Name::new_unchecked("bob.a2a"),
            TYPE::A.into(),
            CLASS::CH.into(),
            false,
        ));
        let bytes = answered(ask(&mut r, &q.build_bytes_vec().unwrap()));
        let p = Packet::parse(&bytes).unwrap();
        assert_eq!(p.rcode(), RCODE::Refused);
        assert!(p.answers.is_empty());
    }

    /// The `ip6.arpa` name of `ip`.
    fn ip6_arpa(ip: Ipv6Addr) -> String {
        let mut out = String::new();
        for b in ip.octets().iter().rev() {
            out.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
        }
        out + "ip6.arpa"
    }

    fn reverse_resolver() -> (Resolver, Ipv6Addr) {
        let alice6: Ipv6Addr = "fd12:3456:789a:1::1".parse().unwrap();
        let zone = Zone::build(
            DNS,
            1,
            [
                Member {
                    name: "Alice".into(),
                    ip: [100, 64, 0, 1].into(),
                    ip6: Some(alice6),
                },
                member("bob", [100, 64, 0, 2]),
            ],
        )
        .with_reverse(
            "100.64.0.0/10".parse().unwrap(),
            "fd12:3456:789a::/48".parse().unwrap(),
        );
        (Resolver::new(zone), alice6)
    }

    fn ptrs(p: &Packet<'_>) -> Vec<String> {
        p.answers
            .iter()
            .filter_map(|r| match &r.rdata {
                RData::PTR(n) => Some(n.0.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn reverse_names_of_overlay_addresses_name_their_members() {
        let (mut r, alice6) = reverse_resolver();
        for (name, want) in [
            ("1.0.64.100.in-addr.arpa", "alice.a2a"),
            ("2.0.64.100.IN-ADDR.ARPA", "bob.a2a"),
            ("100.100.100.100.in-addr.arpa", "a2a"),
            (&ip6_arpa(alice6), "alice.a2a"),
            (&ip6_arpa(alice6).to_ascii_uppercase(), "alice.a2a"),
        ] {
            let bytes = answered(ask(&mut r, &query(name, TYPE::PTR)));
            let p = Packet::parse(&bytes).unwrap();
            assert_eq!(p.rcode(), RCODE::NoError, "{name}");
            assert!(p.has_flags(PacketFlag::AUTHORITATIVE_ANSWER));
            assert_eq!(ptrs(&p), vec![want.to_string()], "{name}");
            assert_eq!(p.answers[0].ttl, TTL);
        }
        // Another type of a held address: no data, not NXDOMAIN.
        let bytes = answered(ask(&mut r, &query("1.0.64.100.in-addr.arpa", TYPE::A)));
        let p = Packet::parse(&bytes).unwrap();
        assert_eq!(p.rcode(), RCODE::NoError);
        assert!(p.answers.is_empty());
    }

    #[test]
    fn reverse_names_no_member_holds_are_nxdomain_with_the_reverse_soa() {
        let (mut r, alice6) = reverse_resolver();
        let mut unheld = alice6.octets();
        unheld[15] = 2;
        let unheld6 = ip6_arpa(Ipv6Addr::from(unheld));
        for (name, zone) in [
            ("9.0.64.100.in-addr.arpa", "64.100.in-addr.arpa"),
            ("255.255.127.100.in-addr.arpa", "127.100.in-addr.arpa"),
            // Below an address, or labels that are no octet (nibble): no such name.
            ("x.1.0.64.100.in-addr.arpa", "64.100.in-addr.arpa"),
            ("01.0.64.100.in-addr.arpa", "64.100.in-addr.arpa"),
            ("1.0.300.64.100.in-addr.arpa", "64.100.in-addr.arpa"),
            (&unheld6, "a.9.8.7.6.5.4.3.2.1.d.f.ip6.arpa"),
            (
                &format!("0.{}", ip6_arpa(alice6)),
                "a.9.8.7.6.5.4.3.2.1.d.f.ip6.arpa",
            ),
        ] {
            let bytes = answered(ask(&mut r, &query(name, TYPE::PTR)));
            let p = Packet::parse(&bytes).unwrap();
            assert_eq!(p.rcode(), RCODE::NameError, "{name}");
            assert!(p.answers.is_empty(), "{name}");
            let soa = &p.name_servers[0];
            assert!(matches!(soa.rdata, RData::SOA(_)), "{name}");
            assert_eq!(soa.name.to_string(), zone, "{name}");
        }
        // A member whose name two claim has no reverse name either.
        let zone = Zone::build(
            DNS,
            1,
            [
                member("bob", [100, 64, 0, 2]),
                member("bob", [100, 64, 0, 3]),
            ],
        )
        .with_reverse(
            "100.64.0.0/10".parse().unwrap(),
            "fd12:3456:789a::/48".parse().unwrap(),
        );
        let mut r = Resolver::new(zone);
        let bytes = answered(ask(&mut r, &query("2.0.64.100.in-addr.arpa", TYPE::PTR)));
        assert_eq!(Packet::parse(&bytes).unwrap().rcode(), RCODE::NameError);
    }

    #[test]
    fn names_above_an_address_in_the_prefix_are_empty_not_absent() {
        let (mut r, _) = reverse_resolver();
        // Inside the /10: no data (members may be below it), SOA at the reverse zone's name.
        for name in [
            "0.64.100.in-addr.arpa",
            "3.2.1.a.9.8.7.6.5.4.3.2.1.d.f.ip6.arpa",
        ] {
            let bytes = answered(ask(&mut r, &query(name, TYPE::PTR)));
            let p = Packet::parse(&bytes).unwrap();
            assert_eq!(p.rcode(), RCODE::NoError, "{name}");
            assert!(p.answers.is_empty());
            assert!(matches!(p.name_servers[0].rdata, RData::SOA(_)));
        }
        let bytes = answered(ask(&mut r, &query("64.100.in-addr.arpa", TYPE::SOA)));
        let p = Packet::parse(&bytes).unwrap();
        assert_eq!(p.answers.len(), 1);
        assert_eq!(p.answers[0].name.to_string(), "64.100.in-addr.arpa");
    }

    #[test]
    fn reverse_names_outside_the_overlay_are_forwarded() {
        let (mut r, alice6) = reverse_resolver();
        let mut other = alice6.octets();
        other[5] ^= 1; // another /48
        for name in [
            "1.1.168.192.in-addr.arpa".to_string(),
            "1.0.0.10.in-addr.arpa".into(),
            "1.0.128.100.in-addr.arpa".into(), // 100.128.0.1: past the /10
            "1.0.63.100.in-addr.arpa".into(),
            "100.in-addr.arpa".into(), // wider than the prefix
            "in-addr.arpa".into(),
            "arpa".into(),
            "x.100.in-addr.arpa".into(), // not an address at all
            ip6_arpa(Ipv6Addr::from(other)),
            ip6_arpa("2001:db8::1".parse().unwrap()),
            "d.f.ip6.arpa".into(),
        ] {
            assert_eq!(
                ask(&mut r, &query(&name, TYPE::PTR)),
                Verdict::Forward,
                "{name}"
            );
        }
        // A zone built without the prefixes forwards every reverse name, as before.
        let mut plain = resolver();
        assert_eq!(
            ask(&mut plain, &query("1.0.64.100.in-addr.arpa", TYPE::PTR)),
            Verdict::Forward
        );
    }

    #[test]
    fn a_zone_rebuilt_from_the_same_members_is_the_same() {
        let a = Zone::build(DNS, 1, [member("alice", [100, 64, 0, 1])]);
        let b = Zone::build(DNS, 2, [member("alice", [100, 64, 0, 1])]);
        let c = Zone::build(DNS, 3, [member("alicia", [100, 64, 0, 1])]);
        assert!(a.same_names(&b));
        assert!(!a.same_names(&c));
    }
}
