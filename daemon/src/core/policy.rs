//! Policy enforcement, I/O-free: a verified policy and the members' tags compiled into a lookup
//! per flow, and a bounded connection tracker that classifies each decrypted inbound packet
//! (and each outbound one) as pass or refuse. Driven by `now` (milliseconds); nothing here
//! reads the clock, and nothing in the per-packet path allocates: flow keys are fixed-size, the
//! flow table and each peer's eviction queue are allocated with their bound up front.
//!
//! With no policy set every packet passes, but flows are still tracked, so that when a policy
//! arrives the connections it allows (and the replies to them) carry on.

use std::collections::{BTreeSet, HashMap, VecDeque};

use a2a_proto::policy::{Policy, PortSpec, Selector, Transport};
use a2a_proto::NodeKey;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// TCP flow seen both ways and not closing.
pub const TCP_ESTABLISHED_MS: u64 = 2 * 60 * 60 * 1000;
/// TCP flow not (yet) answered, or closing (FIN seen).
pub const TCP_OTHER_MS: u64 = 2 * 60 * 1000;
/// UDP (or another protocol) flow seen one way.
pub const UDP_MS: u64 = 30 * 1000;
/// UDP flow seen both ways (the kernel's "stream").
pub const UDP_STREAM_MS: u64 = 180 * 1000;
/// ICMP echo.
pub const ICMP_MS: u64 = 30 * 1000;
/// Most flows tracked for one peer; the oldest unanswered go first.
pub const MAX_FLOWS_PER_PEER: usize = 1024;
/// Most flows tracked in all.
pub const MAX_FLOWS: usize = 16 * 1024;

/// The ports a2ad itself serves members on (TCP and UDP): services and cards, the policy.
pub const DAEMON_PORTS: [u16; 2] = [
    a2a_proto::services::SERVICES_PORT,
    a2a_proto::policy::POLICY_PORT,
];

/// A member as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    pub key: NodeKey,
    pub name: &'a str,
    pub tags: &'a BTreeSet<String>,
}

/// Whether `sel` picks the member `name` carrying `tags`.
pub fn matches(sel: &Selector, name: &str, tags: &BTreeSet<String>) -> bool {
    match sel {
        Selector::Any => true,
        Selector::Tag(t) => tags.contains(t),
        Selector::Member(m) => m == name,
    }
}

/// Why a flow is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// No policy is set: everything is allowed.
    NoPolicy,
    /// a2ad's own exchanges between members (service lists, the policy itself), on
    /// [`DAEMON_PORTS`]: never refused, or a policy could cut members off from its own
    /// successor.
    Daemon,
    /// By the grant at this index of the policy.
    Index(u16),
}

#[derive(Debug, Clone, Copy)]
struct Range {
    proto: u8,
    lo: u16,
    hi: u16,
    grant: u16,
}

/// What one direction (a source member to a destination member) allows.
#[derive(Debug, Clone, Default)]
pub struct Allowed {
    any: Option<u16>,
    icmp: Option<u16>,
    ranges: Vec<Range>,
}

impl Allowed {
    fn add(&mut self, grant: u16, port: &PortSpec) {
        match *port {
            PortSpec::Any => {
                self.any.get_or_insert(grant);
            }
            PortSpec::Icmp => {
                self.icmp.get_or_insert(grant);
            }
            PortSpec::Range { transport, lo, hi } => {
                let proto = match transport {
                    Transport::Tcp => PROTO_TCP,
                    Transport::Udp => PROTO_UDP,
                };
                self.ranges.push(Range {
                    proto,
                    lo,
                    hi,
                    grant,
                });
            }
        }
    }

    /// The lowest grant index allowing `proto` to `port` (ignored for ICMP), if any.
    pub fn check(&self, proto: u8, port: u16) -> Option<u16> {
        let by_port = match proto {
            PROTO_ICMP | PROTO_ICMPV6 => self.icmp,
            PROTO_TCP | PROTO_UDP => self
                .ranges
                .iter()
                .filter(|r| r.proto == proto && r.lo <= port && port <= r.hi)
                .map(|r| r.grant)
                .min(),
            _ => None,
        };
        match (self.any, by_port) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A policy compiled for this node: per peer, what it may open here (inbound) and what this
/// node may open there (outbound, the peer's view, so the sender drops what the receiver
/// would refuse).
#[derive(Debug, Clone)]
pub enum Rules {
    AllowAll,
    Compiled {
        /// The version of the policy compiled (see [`Rules::versioned`]).
        version: u64,
        grants: usize,
        inbound: HashMap<NodeKey, Allowed>,
        outbound: HashMap<NodeKey, Allowed>,
    },
}

impl Rules {
    /// Compiles `policy` (None: no policy set, everything allowed) for `me` among `members`.
    pub fn compile<'a>(
        policy: Option<&Policy>,
        me: Member<'_>,
        members: impl IntoIterator<Item = Member<'a>>,
    ) -> Rules {
        let Some(policy) = policy else {
            return Rules::AllowAll;
        };
        let mut inbound = HashMap::new();
        let mut outbound = HashMap::new();
        for peer in members {
            if peer.key == me.key {
                continue;
            }
            let mut from_peer = Allowed::default();
            let mut to_peer = Allowed::default();
            for (i, g) in policy.grants.iter().enumerate() {
                let i = i as u16; // at most MAX_GRANTS
                let src = |m: &Member| g.src.iter().any(|s| matches(s, m.name, m.tags));
                let dst = |m: &Member| g.dst.iter().any(|s| matches(s, m.name, m.tags));
                if src(&peer) && dst(&me) {
                    g.ports.iter().for_each(|p| from_peer.add(i, p));
                }
                if src(&me) && dst(&peer) {
                    g.ports.iter().for_each(|p| to_peer.add(i, p));
                }
            }
            inbound.insert(peer.key, from_peer);
            outbound.insert(peer.key, to_peer);
        }
        Rules::Compiled {
            version: 0,
            grants: policy.grants.len(),
            inbound,
            outbound,
        }
    }

    fn check(&self, inbound: bool, peer: &NodeKey, proto: u8, port: u16) -> Option<Grant> {
        if matches!(proto, PROTO_TCP | PROTO_UDP) && DAEMON_PORTS.contains(&port) {
            if let Rules::Compiled { .. } = self {
                return Some(Grant::Daemon);
            }
        }
        match self {
            Rules::AllowAll => Some(Grant::NoPolicy),
            Rules::Compiled {
                inbound: i,
                outbound: o,
                ..
            } => {
                let table = if inbound { i } else { o };
                table.get(peer)?.check(proto, port).map(Grant::Index)
            }
        }
    }

    /// `a2actl policy test`: may `peer` open `proto`/`port` on this node?
    pub fn check_inbound(&self, peer: &NodeKey, proto: u8, port: u16) -> Option<Grant> {
        self.check(true, peer, proto, port)
    }

    /// May this node open `proto`/`port` on `peer` (as `peer` would judge it)?
    pub fn check_outbound(&self, peer: &NodeKey, proto: u8, port: u16) -> Option<Grant> {
        self.check(false, peer, proto, port)
    }

    fn grants(&self) -> usize {
        match self {
            Rules::AllowAll => 0,
            Rules::Compiled { grants, .. } => *grants,
        }
    }

    /// These rules, marked as compiled from policy version `v`.
    pub fn versioned(mut self, v: u64) -> Rules {
        if let Rules::Compiled { version, .. } = &mut self {
            *version = v;
        }
        self
    }

    /// The version of the policy these rules enforce (0: no policy).
    pub fn version(&self) -> u64 {
        match self {
            Rules::AllowAll => 0,
            Rules::Compiled { version, .. } => *version,
        }
    }
}

/// A flow, from this node's side: fixed size, so a lookup allocates nothing. IPv4 addresses
/// are stored IPv4-mapped. For ICMP echo both ports are the echo identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub proto: u8,
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    TcpSyn,
    Tcp {
        rst: bool,
        fin: bool,
    },
    Udp,
    EchoRequest,
    EchoReply,
    /// An ICMP error about a packet; the flow key of that packet as its sender saw it.
    IcmpError(FlowKey),
    IcmpOther,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Header {
    proto: u8,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParseError {
    Malformed,
    Fragment,
}

fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn mapped(v4: &[u8]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12..].copy_from_slice(v4);
    a
}

/// Parses an IP packet's header; `inner` for the packet quoted in an ICMP error (truncated to
/// 8 bytes of transport header, no nested errors).
fn parse(p: &[u8], inner: bool) -> Result<Header, ParseError> {
    use ParseError::*;
    let (proto, src, dst, off) = match p.first().map(|b| b >> 4) {
        Some(4) => {
            if p.len() < 20 {
                return Err(Malformed);
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if ihl < 20 || ihl > p.len() {
                return Err(Malformed);
            }
            if be16(p, 6) & 0x1fff != 0 {
                return Err(Fragment);
            }
            (p[9], mapped(&p[12..16]), mapped(&p[16..20]), ihl)
        }
        Some(6) => {
            if p.len() < 40 {
                return Err(Malformed);
            }
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&p[8..24]);
            dst.copy_from_slice(&p[24..40]);
            let (mut next, mut off) = (p[6], 40usize);
            for _ in 0..8 {
                match next {
                    0 | 43 | 60 => {
                        if off + 2 > p.len() {
                            return Err(Malformed);
                        }
                        next = p[off];
                        off += (usize::from(p[off + 1]) + 1) * 8;
                    }
                    44 => {
                        if off + 8 > p.len() {
                            return Err(Malformed);
                        }
                        if be16(p, off + 2) >> 3 != 0 {
                            return Err(Fragment);
                        }
                        next = p[off];
                        off += 8;
                    }
                    _ => break,
                }
            }
            if matches!(next, 0 | 43 | 44 | 60) || off > p.len() {
                return Err(Malformed);
            }
            (next, src, dst, off)
        }
        _ => return Err(Malformed),
    };
    let l4 = &p[off..];
    let (sport, dport, kind) = match proto {
        PROTO_TCP => {
            let need = if inner { 4 } else { 14 };
            if l4.len() < need {
                return Err(Malformed);
            }
            let flags = if inner { 0 } else { l4[13] };
            let kind = if flags & 0x02 != 0 && flags & 0x10 == 0 {
                Kind::TcpSyn
            } else {
                Kind::Tcp {
                    rst: flags & 0x04 != 0,
                    fin: flags & 0x01 != 0,
                }
            };
            (be16(l4, 0), be16(l4, 2), kind)
        }
        PROTO_UDP => {
            if l4.len() < if inner { 4 } else { 8 } {
                return Err(Malformed);
            }
            (be16(l4, 0), be16(l4, 2), Kind::Udp)
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if l4.len() < 8 {
                return Err(Malformed);
            }
            let v6 = proto == PROTO_ICMPV6;
            let id = be16(l4, 4);
            match (v6, l4[0]) {
                (false, 8) | (true, 128) => (id, id, Kind::EchoRequest),
                (false, 0) | (true, 129) => (id, id, Kind::EchoReply),
                (false, 3 | 11 | 12) | (true, 1..=4) => {
                    if inner {
                        return Err(Malformed);
                    }
                    let q = parse(&l4[8..], true)?;
                    // The quoted packet went from its sender (q.src) to q.dst.
                    let key = FlowKey {
                        proto: q.proto,
                        local: q.src,
                        remote: q.dst,
                        local_port: q.sport,
                        remote_port: q.dport,
                    };
                    (0, 0, Kind::IcmpError(key))
                }
                _ => (0, 0, Kind::IcmpOther),
            }
        }
        _ => (0, 0, Kind::Other),
    };
    Ok(Header {
        proto,
        src,
        dst,
        sport,
        dport,
        kind,
    })
}

/// What the driver sends back for a refused packet (to the sender for inbound, to the local
/// application through the TUN for outbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Nothing: a packet that claims to belong to a flow that does not exist is dropped
    /// silently, so a forged "reply" reflects nothing.
    None,
    /// A TCP RST, for a refused SYN (or a flow the policy no longer allows).
    TcpRst,
    /// ICMP / ICMPv6 administratively prohibited.
    IcmpProhibited,
}

/// Why a packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A new flow no grant allows.
    NoGrant,
    /// Not a new flow, and no tracked flow it belongs to (a forged or stale "reply").
    NoFlow,
    /// A tracked flow the changed policy no longer allows.
    Revoked,
    /// The flow table is full and this peer has no flow to give up.
    TableFull,
    /// Not a well-formed IP packet.
    Malformed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A new flow, allowed (and now tracked).
    NewFlow(Grant),
    /// A packet of a tracked flow (either way), or an ICMP error about one.
    Flow,
    Refuse {
        reason: Reason,
        reply: Reply,
    },
}

/// Counts kept by the tracker, for `a2actl status` once wired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyCounts {
    pub refused_no_grant: u64,
    pub refused_no_flow: u64,
    pub refused_revoked: u64,
    pub refused_table_full: u64,
    pub malformed: u64,
    pub fragments: u64,
    /// Flows dropped from a full peer's share to make room.
    pub evicted: u64,
    /// New flows allowed, by grant index.
    pub allowed_by_grant: Vec<u64>,
    /// New flows refused outbound (the sender-side check).
    pub refused_outbound: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    peer: NodeKey,
    local_origin: bool,
    replied: bool,
    closing: bool,
    seq: u64,
    last_ms: u64,
    generation: u64,
}

impl Entry {
    fn timeout(&self, proto: u8) -> u64 {
        match proto {
            PROTO_TCP if self.replied && !self.closing => TCP_ESTABLISHED_MS,
            PROTO_TCP => TCP_OTHER_MS,
            PROTO_ICMP | PROTO_ICMPV6 => ICMP_MS,
            _ if self.replied => UDP_STREAM_MS,
            _ => UDP_MS,
        }
    }
}

struct PeerFlows {
    count: usize,
    /// Flows in creation order, with their sequence number (stale pairs skipped).
    order: VecDeque<(FlowKey, u64)>,
}

/// The connection tracker and the rules it checks new flows against.
pub struct Tracker {
    rules: Rules,
    generation: u64,
    table: HashMap<FlowKey, Entry>,
    peers: HashMap<NodeKey, PeerFlows>,
    seq: u64,
    max_per_peer: usize,
    max_total: usize,
    counts: PolicyCounts,
    /// The last packet that passed as part of a tracked flow (data, no SYN/FIN/RST): the next
    /// one of the same flow, direction, rules and millisecond passes without a lookup (a
    /// burst of one flow's segments costs one lookup; touching it again would change nothing).
    last: Option<Last>,
    /// Tests only: every packet takes the general path (the differential test compares).
    #[cfg(test)]
    general_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Last {
    key: FlowKey,
    peer: NodeKey,
    inbound: bool,
    generation: u64,
    now_ms: u64,
}

impl Tracker {
    pub fn new(rules: Rules) -> Tracker {
        Tracker::with_limits(rules, MAX_FLOWS_PER_PEER, MAX_FLOWS)
    }

    pub fn with_limits(rules: Rules, max_per_peer: usize, max_total: usize) -> Tracker {
        let mut t = Tracker {
            rules: Rules::AllowAll,
            generation: 0,
            // Grown as flows come (amortized: no allocation per packet), bounded by the limits:
            // a node at rest holds a few hundred bytes here, not the bound's megabytes.
            table: HashMap::new(),
            peers: HashMap::new(),
            seq: 0,
            max_per_peer,
            max_total,
            counts: PolicyCounts::default(),
            last: None,
            #[cfg(test)]
            general_only: false,
        };
        t.set_rules(rules);
        t
    }

    /// A new policy or new tags: new flows are checked against it at once, tracked flows on
    /// their next packet.
    pub fn set_rules(&mut self, rules: Rules) {
        // Recompiled for new members, the counts by grant carry on; a policy of another
        // length starts them again.
        if self.counts.allowed_by_grant.len() != rules.grants() {
            self.counts.allowed_by_grant = vec![0; rules.grants()];
        }
        self.rules = rules;
        self.generation += 1;
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn counts(&self) -> &PolicyCounts {
        &self.counts
    }

    pub fn flows(&self) -> usize {
        self.table.len()
    }

    /// Forgets flows past their timeout; call every few seconds.
    pub fn expire(&mut self, now_ms: u64) {
        let peers = &mut self.peers;
        self.table.retain(|k, e| {
            let live = now_ms <= e.last_ms.saturating_add(e.timeout(k.proto));
            if !live {
                if let Some(pf) = peers.get_mut(&e.peer) {
                    pf.count -= 1;
                }
            }
            live
        });
        let max = self.max_per_peer;
        for pf in self.peers.values_mut() {
            if pf.order.len() > max {
                let table = &self.table;
                pf.order
                    .retain(|(k, s)| table.get(k).is_some_and(|e| e.seq == *s));
            }
        }
        self.peers.retain(|_, pf| pf.count > 0);
    }

    fn remove(&mut self, key: &FlowKey) {
        self.last = None;
        if let Some(e) = self.table.remove(key) {
            if let Some(pf) = self.peers.get_mut(&e.peer) {
                pf.count -= 1;
            }
        }
    }

    /// The tracked flow for `key`, if live; an expired one is forgotten.
    fn live(&mut self, now_ms: u64, key: &FlowKey) -> Option<Entry> {
        let e = *self.table.get(key)?;
        if now_ms > e.last_ms.saturating_add(e.timeout(key.proto)) {
            self.remove(key);
            return None;
        }
        Some(e)
    }

    fn refuse(&mut self, reason: Reason, reply: Reply) -> Verdict {
        if matches!(self.rules, Rules::AllowAll) && reason != Reason::Malformed {
            // No policy: everything but malformed packets passes as before; flows are tracked
            // (when there is room) only so that a policy set later keeps the connections it
            // allows.
            return Verdict::Flow;
        }
        let c = &mut self.counts;
        match reason {
            Reason::NoGrant => c.refused_no_grant += 1,
            Reason::NoFlow => c.refused_no_flow += 1,
            Reason::Revoked => c.refused_revoked += 1,
            Reason::TableFull => c.refused_table_full += 1,
            Reason::Malformed => c.malformed += 1,
        }
        Verdict::Refuse { reason, reply }
    }

    fn allowed(&mut self, grant: Grant) -> Verdict {
        if let Grant::Index(i) = grant {
            if let Some(n) = self.counts.allowed_by_grant.get_mut(usize::from(i)) {
                *n += 1;
            }
        }
        Verdict::NewFlow(grant)
    }

    /// Makes room in `peer`'s share: the oldest flow not answered yet goes first, else the
    /// oldest.
    fn evict_one(&mut self, peer: &NodeKey) {
        self.last = None;
        let Some(pf) = self.peers.get_mut(peer) else {
            return;
        };
        let mut fallback = None;
        for _ in 0..pf.order.len() {
            let Some((k, s)) = pf.order.pop_front() else {
                break;
            };
            match self.table.get(&k) {
                Some(e) if e.seq == s && !e.replied => {
                    self.table.remove(&k);
                    pf.count -= 1;
                    self.counts.evicted += 1;
                    if let Some(f) = fallback {
                        pf.order.push_front(f);
                    }
                    return;
                }
                Some(e) if e.seq == s => {
                    // Answered: keep its place, look further.
                    if fallback.is_none() {
                        fallback = Some((k, s));
                    } else {
                        pf.order.push_back((k, s));
                    }
                }
                _ => {} // stale
            }
        }
        if let Some((k, _)) = fallback {
            self.table.remove(&k);
            pf.count -= 1;
            self.counts.evicted += 1;
        }
    }

    fn track(&mut self, now_ms: u64, key: FlowKey, peer: NodeKey, local_origin: bool) -> bool {
        let full_share = self
            .peers
            .get(&peer)
            .is_some_and(|pf| pf.count >= self.max_per_peer);
        if full_share {
            self.evict_one(&peer);
        }
        if self.table.len() >= self.max_total {
            return false;
        }
        self.seq += 1;
        let max = self.max_per_peer;
        let pf = self.peers.entry(peer).or_insert_with(|| PeerFlows {
            count: 0,
            order: VecDeque::new(),
        });
        if pf.order.len() >= 2 * max {
            let table = &self.table;
            pf.order
                .retain(|(k, s)| table.get(k).is_some_and(|e| e.seq == *s));
        }
        pf.order.push_back((key, self.seq));
        pf.count += 1;
        self.table.insert(
            key,
            Entry {
                peer,
                local_origin,
                replied: false,
                closing: false,
                seq: self.seq,
                last_ms: now_ms,
                generation: self.generation,
            },
        );
        true
    }

    fn touch(&mut self, now_ms: u64, key: &FlowKey, kind: Kind, answer: bool) {
        if let Kind::Tcp { rst: true, .. } = kind {
            self.remove(key);
            return;
        }
        if let Some(e) = self.table.get_mut(key) {
            e.last_ms = now_ms;
            e.replied |= answer;
            if let Kind::Tcp { fin: true, .. } = kind {
                e.closing = true;
            }
        }
    }

    /// The common case in one hash lookup: a plain packet (see [`Tracker::remembered`]) of a
    /// flow tracked under the current rules and still live is touched in place and passes,
    /// exactly as the general path would pass it (which looks the flow up three times: live,
    /// touch, and again to remember it). `inbound`: the packet came from `peer` (its flow's
    /// entry must be this peer's). Anything else (no entry, expired, another peer's, older
    /// rules) returns `None` and takes the general path.
    fn tracked_plain(
        &mut self,
        now_ms: u64,
        key: &FlowKey,
        peer: &NodeKey,
        inbound: bool,
    ) -> Option<Verdict> {
        #[cfg(test)]
        if self.general_only {
            return None;
        }
        let generation = self.generation;
        let e = self.table.get_mut(key)?;
        let live = now_ms <= e.last_ms.saturating_add(e.timeout(key.proto));
        if !live || e.generation != generation || (inbound && e.peer != *peer) {
            return None;
        }
        e.last_ms = now_ms;
        // A packet the other side sends answers the flow: inbound on a flow this node
        // opened, outbound on one the peer opened.
        e.replied |= e.local_origin == inbound;
        Some(Verdict::Flow)
    }

    fn refusal_reply(kind: Kind) -> Reply {
        match kind {
            Kind::TcpSyn | Kind::Tcp { .. } => Reply::TcpRst,
            _ => Reply::IcmpProhibited,
        }
    }

    /// The packet as [`Tracker::last`] would remember it, and whether it is a plain data
    /// packet (no SYN, FIN or RST; UDP) that may pass on the remembered verdict.
    fn remembered(
        &self,
        key: FlowKey,
        peer: NodeKey,
        inbound: bool,
        now_ms: u64,
        kind: Kind,
    ) -> (Last, bool) {
        let last = Last {
            key,
            peer,
            inbound,
            generation: self.generation,
            now_ms,
        };
        let plain = matches!(
            kind,
            Kind::Tcp {
                rst: false,
                fin: false
            } | Kind::Udp
        );
        (last, plain)
    }

    /// A decrypted packet from `peer` (its inner source already checked against the peer's
    /// overlay address): pass it to the TUN or refuse it.
    pub fn inbound(&mut self, now_ms: u64, peer: NodeKey, packet: &[u8]) -> Verdict {
        let h = match parse(packet, false) {
            Ok(h) => h,
            Err(ParseError::Malformed) => return self.refuse(Reason::Malformed, Reply::None),
            Err(ParseError::Fragment) => {
                // A later fragment has no ports: its first fragment was judged, and without
                // it the receiving kernel reassembles nothing. Passed, counted.
                self.counts.fragments += 1;
                return Verdict::Flow;
            }
        };
        if let Kind::IcmpError(quoted) = h.kind {
            // About a packet this node sent: its flow must be tracked, with this peer.
            return match self.live(now_ms, &quoted) {
                Some(e) if e.peer == peer => Verdict::Flow,
                _ => self.refuse(Reason::NoFlow, Reply::None),
            };
        }
        let key = FlowKey {
            proto: h.proto,
            local: h.dst,
            remote: h.src,
            local_port: h.dport,
            remote_port: h.sport,
        };
        let (last, plain) = self.remembered(key, peer, true, now_ms, h.kind);
        if plain && self.last == Some(last) {
            return Verdict::Flow;
        }
        if plain {
            if let Some(v) = self.tracked_plain(now_ms, &key, &peer, true) {
                self.last = Some(last);
                return v;
            }
        }
        let new_flow = matches!(
            h.kind,
            Kind::TcpSyn | Kind::Udp | Kind::EchoRequest | Kind::IcmpOther | Kind::Other
        );
        let verdict = match self.live(now_ms, &key) {
            Some(e) if e.peer != peer => self.refuse(Reason::NoFlow, Reply::None),
            // An echo request never rides on our own echo's entry: it needs a grant.
            Some(e) if e.local_origin && h.kind != Kind::EchoRequest => {
                // A reply to a flow this node opened: still allowed out, under changed rules?
                if e.generation != self.generation {
                    if self.rules.check_outbound(&peer, h.proto, h.sport).is_none() {
                        self.remove(&key);
                        return self.refuse(Reason::Revoked, Reply::None);
                    }
                    if let Some(e) = self.table.get_mut(&key) {
                        e.generation = self.generation;
                    }
                }
                self.touch(now_ms, &key, h.kind, true);
                Verdict::Flow
            }
            Some(e) if !e.local_origin => {
                if e.generation != self.generation {
                    match self.rules.check_inbound(&peer, h.proto, h.dport) {
                        Some(_) => {
                            if let Some(e) = self.table.get_mut(&key) {
                                e.generation = self.generation;
                            }
                        }
                        None => {
                            self.remove(&key);
                            return self.refuse(Reason::Revoked, Self::refusal_reply(h.kind));
                        }
                    }
                }
                self.touch(now_ms, &key, h.kind, false);
                Verdict::Flow
            }
            _ if !new_flow => self.refuse(Reason::NoFlow, Reply::None),
            _ => match self.rules.check_inbound(&peer, h.proto, h.dport) {
                None => self.refuse(Reason::NoGrant, Self::refusal_reply(h.kind)),
                Some(g) => {
                    let tracked = h.kind == Kind::IcmpOther
                        || self.table.contains_key(&key)
                        || self.track(now_ms, key, peer, false);
                    if tracked {
                        self.allowed(g)
                    } else {
                        self.refuse(Reason::TableFull, Self::refusal_reply(h.kind))
                    }
                }
            },
        };
        if plain && verdict == Verdict::Flow && self.table.contains_key(&key) {
            self.last = Some(last);
        }
        verdict
    }

    /// A packet read from the TUN for `peer`: send it, or refuse it (the peer would).
    pub fn outbound(&mut self, now_ms: u64, peer: NodeKey, packet: &[u8]) -> Verdict {
        let h = match parse(packet, false) {
            Ok(h) => h,
            // Our own kernel's packets: let the receiver judge what cannot be parsed here.
            Err(_) => return Verdict::Flow,
        };
        if let Kind::IcmpError(_) = h.kind {
            return Verdict::Flow;
        }
        let key = FlowKey {
            proto: h.proto,
            local: h.src,
            remote: h.dst,
            local_port: h.sport,
            remote_port: h.dport,
        };
        let (last, plain) = self.remembered(key, peer, false, now_ms, h.kind);
        if plain && self.last == Some(last) {
            return Verdict::Flow;
        }
        if plain {
            if let Some(v) = self.tracked_plain(now_ms, &key, &peer, false) {
                self.last = Some(last);
                return v;
            }
        }
        let verdict = match self.live(now_ms, &key) {
            Some(e) if !e.local_origin && h.kind != Kind::EchoRequest => {
                // A reply to a flow the peer opened: is that flow still allowed in?
                if e.generation != self.generation {
                    if self.rules.check_inbound(&peer, h.proto, h.sport).is_none() {
                        self.remove(&key);
                        self.counts.refused_revoked += 1;
                        return Verdict::Refuse {
                            reason: Reason::Revoked,
                            reply: Self::refusal_reply(h.kind),
                        };
                    }
                    if let Some(e) = self.table.get_mut(&key) {
                        e.generation = self.generation;
                    }
                }
                self.touch(now_ms, &key, h.kind, true);
                Verdict::Flow
            }
            Some(e) if e.local_origin && e.generation == self.generation => {
                self.touch(now_ms, &key, h.kind, false);
                Verdict::Flow
            }
            existing => match self.rules.check_outbound(&peer, h.proto, h.dport) {
                None => {
                    if existing.is_some() {
                        self.remove(&key);
                    }
                    self.counts.refused_outbound += 1;
                    Verdict::Refuse {
                        reason: if existing.is_some() {
                            Reason::Revoked
                        } else {
                            Reason::NoGrant
                        },
                        reply: Self::refusal_reply(h.kind),
                    }
                }
                Some(g) => match existing {
                    Some(_) => {
                        if let Some(e) = self.table.get_mut(&key) {
                            e.generation = self.generation;
                        }
                        self.touch(now_ms, &key, h.kind, false);
                        Verdict::Flow
                    }
                    None if h.kind == Kind::IcmpOther || self.track(now_ms, key, peer, true) => {
                        Verdict::NewFlow(g)
                    }
                    None => self.refuse(Reason::TableFull, Self::refusal_reply(h.kind)),
                },
            },
        };
        if plain && verdict == Verdict::Flow && self.table.contains_key(&key) {
            self.last = Some(last);
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"grants": [{"src": ["tag:planner"], "dst": ["tag:worker"], "ports": ["tcp:8080", "icmp"]}]}"#;
    const P: NodeKey = NodeKey([1; 32]);
    const W: NodeKey = NodeKey([2; 32]);
    const U: NodeKey = NodeKey([3; 32]);
    const P4: [u8; 4] = [100, 64, 0, 1];
    const W4: [u8; 4] = [100, 64, 0, 2];
    const U4: [u8; 4] = [100, 64, 0, 3];
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const RST: u8 = 0x04;

    fn v6(last: u8) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[15] = last;
        a
    }

    fn ip4(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        let len = (20 + l4.len()) as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    fn ip6(next: u8, src: [u8; 16], dst: [u8; 16], l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut u = vec![0u8; 12];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u
    }

    fn icmp(ty: u8, id: u16) -> Vec<u8> {
        let mut i = vec![ty, 0, 0, 0, 0, 0, 0, 1];
        i[4..6].copy_from_slice(&id.to_be_bytes());
        i
    }

    fn tags(t: &[&str]) -> BTreeSet<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    /// Rules for `me` among planner, worker and an untagged member.
    fn rules_for(text: Option<&str>, me: NodeKey) -> Rules {
        let policy = text.map(|t| Policy::parse(t, None).unwrap());
        let (planner, worker, none) = (tags(&["planner"]), tags(&["worker"]), tags(&[]));
        let members = [
            Member {
                key: P,
                name: "planner-1",
                tags: &planner,
            },
            Member {
                key: W,
                name: "worker-1",
                tags: &worker,
            },
            Member {
                key: U,
                name: "stray",
                tags: &none,
            },
        ];
        let me = *members.iter().find(|m| m.key == me).unwrap();
        Rules::compile(policy.as_ref(), me, members)
    }

    fn refused(reason: Reason, reply: Reply) -> Verdict {
        Verdict::Refuse { reason, reply }
    }

    const GRANT0: Verdict = Verdict::NewFlow(Grant::Index(0));

    #[test]
    fn planner_reaches_worker_8080_only_and_the_untagged_member_nothing() {
        let mut w = Tracker::new(rules_for(Some(EXAMPLE), W));
        assert_eq!(
            w.inbound(0, P, &ip4(PROTO_TCP, P4, W4, &tcp(40000, 8080, SYN))),
            GRANT0
        );
        assert_eq!(
            w.inbound(0, P, &ip4(PROTO_TCP, P4, W4, &tcp(40001, 9090, SYN))),
            refused(Reason::NoGrant, Reply::TcpRst)
        );
        assert_eq!(
            w.inbound(0, U, &ip4(PROTO_TCP, U4, W4, &tcp(40000, 8080, SYN))),
            refused(Reason::NoGrant, Reply::TcpRst)
        );
        // UDP to 8080 is not tcp:8080.
        assert_eq!(
            w.inbound(0, P, &ip4(PROTO_UDP, P4, W4, &udp(40000, 8080))),
            refused(Reason::NoGrant, Reply::IcmpProhibited)
        );
        // The worker's answers pass, and the flow's later packets both ways.
        assert_eq!(
            w.outbound(1, P, &ip4(PROTO_TCP, W4, P4, &tcp(8080, 40000, SYN | ACK))),
            Verdict::Flow
        );
        assert_eq!(
            w.inbound(2, P, &ip4(PROTO_TCP, P4, W4, &tcp(40000, 8080, ACK))),
            Verdict::Flow
        );
        assert_eq!(w.counts().refused_no_grant, 3);
        assert_eq!(w.counts().allowed_by_grant, vec![1]);
        // `policy test`.
        assert_eq!(
            w.rules().check_inbound(&P, PROTO_TCP, 8080),
            Some(Grant::Index(0))
        );
        assert_eq!(w.rules().check_inbound(&U, PROTO_TCP, 8080), None);
    }

    #[test]
    fn the_same_over_ipv6() {
        let mut w = Tracker::new(rules_for(Some(EXAMPLE), W));
        let (p6, w6) = (v6(1), v6(2));
        assert_eq!(
            w.inbound(0, P, &ip6(PROTO_TCP, p6, w6, &tcp(40000, 8080, SYN))),
            GRANT0
        );
        assert_eq!(
            w.inbound(0, P, &ip6(PROTO_TCP, p6, w6, &tcp(40000, 9090, SYN))),
            refused(Reason::NoGrant, Reply::TcpRst)
        );
        // Behind a hop-by-hop extension header.
        let mut hbh = vec![PROTO_TCP, 0, 0, 0, 0, 0, 0, 0];
        hbh.extend_from_slice(&tcp(40002, 8080, SYN));
        assert_eq!(w.inbound(0, P, &ip6(0, p6, w6, &hbh)), GRANT0);
        assert_eq!(
            w.inbound(0, P, &ip6(PROTO_ICMPV6, p6, w6, &icmp(128, 7))),
            GRANT0
        );
        assert_eq!(
            w.inbound(0, U, &ip6(PROTO_ICMPV6, v6(3), w6, &icmp(128, 7))),
            refused(Reason::NoGrant, Reply::IcmpProhibited)
        );
        assert_eq!(
            w.outbound(1, P, &ip6(PROTO_ICMPV6, w6, p6, &icmp(129, 7))),
            Verdict::Flow
        );
    }

    #[test]
    fn replies_to_flows_this_node_opened_pass_and_nothing_else_does() {
        let mut p = Tracker::new(rules_for(Some(EXAMPLE), P));
        assert_eq!(
            p.outbound(0, W, &ip4(PROTO_TCP, P4, W4, &tcp(40000, 8080, SYN))),
            GRANT0
        );
        assert_eq!(
            p.inbound(1, W, &ip4(PROTO_TCP, W4, P4, &tcp(8080, 40000, SYN | ACK))),
            Verdict::Flow
        );
        // The worker may not open anything on the planner.
        assert_eq!(
            p.inbound(1, W, &ip4(PROTO_TCP, W4, P4, &tcp(40000, 8080, SYN))),
            refused(Reason::NoGrant, Reply::TcpRst)
        );
        // The "reply" must come from the peer the flow is with.
        assert_eq!(
            p.inbound(1, U, &ip4(PROTO_TCP, W4, P4, &tcp(8080, 40000, ACK))),
            refused(Reason::NoFlow, Reply::None)
        );
        // Echo: our request's reply passes; a reply to nothing does not.
        assert_eq!(
            p.outbound(0, W, &ip4(PROTO_ICMP, P4, W4, &icmp(8, 9))),
            GRANT0
        );
        assert_eq!(
            p.inbound(1, W, &ip4(PROTO_ICMP, W4, P4, &icmp(0, 9))),
            Verdict::Flow
        );
        assert_eq!(
            p.inbound(1, W, &ip4(PROTO_ICMP, W4, P4, &icmp(0, 10))),
            refused(Reason::NoFlow, Reply::None)
        );
        // A worker echo request with our echo's identifier still needs a grant.
        assert_eq!(
            p.inbound(1, W, &ip4(PROTO_ICMP, W4, P4, &icmp(8, 9))),
            refused(Reason::NoGrant, Reply::IcmpProhibited)
        );
        // The sender drops what the receiver would refuse.
        assert_eq!(
            p.outbound(2, W, &ip4(PROTO_TCP, P4, W4, &tcp(40001, 9090, SYN))),
            refused(Reason::NoGrant, Reply::TcpRst)
        );
        assert_eq!(
            p.outbound(2, U, &ip4(PROTO_TCP, P4, U4, &tcp(40001, 8080, SYN))),
            refused(Reason::NoGrant, Reply::TcpRst)
        );
        assert_eq!(p.counts().refused_outbound, 2);
    }

    #[test]
    fn ping_only_where_granted() {
        let mut w = Tracker::new(rules_for(Some(EXAMPLE), W));
        assert_eq!(
            w.inbound(0, P, &ip4(PROTO_ICMP, P4, W4, &icmp(8, 1))),
            GRANT0
        );
        assert_eq!(
            w.outbound(0, P, &ip4(PROTO_ICMP, W4, P4, &icmp(0, 1))),
            Verdict::Flow
        );
        assert_eq!(
            w.inbound(0, U, &ip4(PROTO_ICMP, U4, W4, &icmp(8, 1))),
            refused(Reason::NoGrant, Reply::IcmpProhibited)
        );
        // The worker may not ping the planner (no grant worker -> planner).
        assert_eq!(
            w.outbound(0, P, &ip4(PROTO_ICMP, W4, P4, &icmp(8, 2))),
            refused(Reason::NoGrant, Reply::IcmpProhibited)
        );
    }

    #[test]
    fn fake_replies_to_flows_that_do_not_exist_are_refused_silently() {
        let mut w = Tracker::new(rules_for(Some(EXAMPLE), W));
        for flags in [ACK, SYN | ACK, RST, ACK | 0x01] {
            assert_eq!(
                w.inbound(0, U, &ip4(PROTO_TCP, U4, W4, &tcp(443, 40000, flags))),
                refused(Reason::NoFlow, Reply::None),
                "{flags:#x}"
            );
        }
        // An ICMP error quoting a packet this node never sent.
        let quoted = ip4(PROTO_TCP, W4, U4, &tcp(40000, 443, SYN));
        let mut err = vec![3, 13, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&quoted[..28]);
        assert_eq!(
            w.inbound(0, U, &ip4(PROTO_ICMP, U4, W4, &err)),
            refused(Reason::NoFlow, Reply::None)
        );
        assert_eq!(w.counts().refused_no_flow, 5);
        assert_eq!(w.flows(), 0);
        // One about a flow it did send passes.
        let mut p = Tracker::new(rules_for(Some(EXAMPLE), P));
        p.outbound(0, W, &ip4(PROTO_TCP, P4, W4, &tcp(40000, 8080, SYN)));
        let quoted = ip4(PROTO_TCP, P4, W4, &tcp(40000, 8080, SYN));
        let mut err = vec![3, 4, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&quoted[..28]);
        assert_eq!(
            p.inbound(1, W, &ip4(PROTO_ICMP, W4, P4, &err)),
            Verdict::Flow
        );
    }

    #[test]
    fn a_flow_flood_from_one_peer_is_bounded_and_counted() {
        let mut w = Tracker::with_limits(rules_for(Some(EXAMPLE), W), 4, 64);
        // One answered flow first: it survives the flood.
        assert_eq!(
            w.inbound(0, P, &ip4(PROTO_TCP, P4, W4, &tcp(1000, 8080, SYN))),
            GRANT0
        );
        w.outbound(0, P, &ip4(PROTO_TCP, W4, P4, &tcp(8080, 1000, SYN | ACK)));
        for sport in 2000..2100 {
            assert_eq!(
                w.inbound(1, P, &ip4(PROTO_TCP, P4, W4, &tcp(sport, 8080, SYN))),
                GRANT0
            );
        }
        assert_eq!(w.flows(), 4);
        assert_eq!(w.counts().evicted, 97);
        assert_eq!(
            w.inbound(2, P, &ip4(PROTO_TCP, P4, W4, &tcp(1000, 8080, ACK))),
            Verdict::Flow
        );
        // The newest flood flows are the ones kept.
        assert_eq!(
            w.inbound(2, P, &ip4(PROTO_TCP, P4, W4, &tcp(2099, 8080, ACK))),
            Verdict::Flow
        );
        assert_eq!(
            w.inbound(2, P, &ip4(PROTO_TCP, P4, W4, &tcp(2000, 8080, ACK))),
            refused(Reason::NoFlow, Reply::None)
        );
        // Bounded growth: a flood ten times longer grows neither the table nor the peer's
        // queue past what the first one needed (the bound, not the flood, sizes them).
        let table_capacity = w.table.capacity();
        let queue_capacity = w.peers[&P].order.capacity();
        assert!(queue_capacity <= 2 * 4 + 1 + 8, "{queue_capacity}");
        for sport in 3000..4000 {
            w.inbound(3, P, &ip4(PROTO_TCP, P4, W4, &tcp(sport, 8080, SYN)));
        }
        assert_eq!(w.flows(), 4);
        assert_eq!(w.table.capacity(), table_capacity);
        assert_eq!(w.peers[&P].order.capacity(), queue_capacity);
        // The late flood's newest flows are the ones kept.
        for sport in 3997..4000 {
            assert_eq!(
                w.inbound(3, P, &ip4(PROTO_TCP, P4, W4, &tcp(sport, 8080, ACK))),
                Verdict::Flow
            );
        }
        // Another peer still gets its share, and the table as a whole is bounded too.
        let any = r#"{"grants": [{"src": ["*"], "dst": ["*"], "ports": ["*"]}]}"#;
        let mut open = Tracker::with_limits(rules_for(Some(any), W), 4, 5);
        let mut none = Tracker::with_limits(rules_for(None, W), 4, 5);
        for t in [&mut open, &mut none] {
            for sport in 0..10 {
                t.inbound(0, P, &ip4(PROTO_UDP, P4, W4, &udp(sport, 53)));
            }
        }
        assert_eq!(
            open.inbound(0, U, &ip4(PROTO_UDP, U4, W4, &udp(1, 53))),
            Verdict::NewFlow(Grant::Index(0))
        );
        assert_eq!(
            open.inbound(0, U, &ip4(PROTO_UDP, U4, W4, &udp(2, 53))),
            refused(Reason::TableFull, Reply::IcmpProhibited)
        );
        assert_eq!(open.flows(), 5);
        assert_eq!(open.counts().refused_table_full, 1);
        // Without a policy a full table refuses nothing: the flow is only not tracked.
        assert_eq!(
            none.inbound(0, U, &ip4(PROTO_UDP, U4, W4, &udp(1, 53))),
            Verdict::NewFlow(Grant::NoPolicy)
        );
        assert_eq!(
            none.inbound(0, U, &ip4(PROTO_UDP, U4, W4, &udp(2, 53))),
            Verdict::Flow
        );
        assert_eq!(none.flows(), 5);
        assert_eq!(none.counts().refused_table_full, 0);
    }

    #[test]
    fn a_policy_change_applies_to_new_flows_at_once_and_to_tracked_flows_on_their_next_packet() {
        let mut w = Tracker::new(rules_for(Some(EXAMPLE), W));
        let syn = ip4(PROTO_TCP, P4, W4, &tcp(40000, 8080, SYN));
        assert_eq!(w.inbound(0, P, &syn), GRANT0);
        w.outbound(0, P, &ip4(PROTO_TCP, W4, P4, &tcp(8080, 40000, SYN | ACK)));
        let only_9090 =
            r#"{"grants": [{"src": ["planner-1"], "dst": ["*"], "ports": ["tcp:9000-9100"]}]}"#;
        w.set_rules(rules_for(Some(only_9090), W));
        assert_eq!(
            w.inbound(1, P, &ip4(PROTO_TCP, P4, W4, &tcp(40001, 8080, SYN))),
            refused(Reason::NoGrant, Reply::TcpRst)
        );
        assert_eq!(
            w.inbound(1, P, &ip4(PROTO_TCP, P4, W4, &tcp(40002, 9090, SYN))),
            GRANT0
        );
        // The tracked 8080 flow is torn down with a RST on its next packet.
        assert_eq!(
            w.inbound(2, P, &ip4(PROTO_TCP, P4, W4, &tcp(40000, 8080, ACK))),
            refused(Reason::Revoked, Reply::TcpRst)
        );
        assert_eq!(
            w.inbound(3, P, &ip4(PROTO_TCP, P4, W4, &tcp(40000, 8080, ACK))),
            refused(Reason::NoFlow, Reply::None)
        );
        // A flow still allowed carries on.
        w.set_rules(rules_for(Some(only_9090), W));
        assert_eq!(
            w.inbound(4, P, &ip4(PROTO_TCP, P4, W4, &tcp(40002, 9090, ACK))),
            Verdict::Flow
        );
        // Outbound flows are re-checked against the peer's view too.
        let mut p = Tracker::new(rules_for(Some(EXAMPLE), P));
        p.outbound(0, W, &syn);
        p.set_rules(rules_for(Some(r#"{"grants": []}"#), P));
        assert_eq!(
            p.outbound(1, W, &ip4(PROTO_TCP, P4, W4, &tcp(40000, 8080, ACK))),
            refused(Reason::Revoked, Reply::TcpRst)
        );
    }

    #[test]
    fn a_burst_of_one_flow_passes_on_one_lookup_and_never_outlives_its_flow() {
        let mut w = Tracker::new(rules_for(Some(EXAMPLE), W));
        let syn = ip4(PROTO_TCP, P4, W4, &tcp(40000, 8080, SYN));
        assert_eq!(w.inbound(0, P, &syn), GRANT0);
        let data = ip4(PROTO_TCP, P4, W4, &tcp(40000, 8080, ACK));
        for _ in 0..100 {
            assert_eq!(w.inbound(5, P, &data), Verdict::Flow);
        }
        // The same segment from another peer is still nobody's flow.
        assert_eq!(w.inbound(5, U, &data), refused(Reason::NoFlow, Reply::None));
        // A RST the other way ends the flow: the next segment is refused, not passed on the
        // remembered verdict.
        w.outbound(5, P, &ip4(PROTO_TCP, W4, P4, &tcp(8080, 40000, RST)));
        assert_eq!(w.inbound(5, P, &data), refused(Reason::NoFlow, Reply::None));
        // New rules in the same millisecond: judged again.
        let mut w = Tracker::new(rules_for(Some(EXAMPLE), W));
        w.inbound(0, P, &syn);
        assert_eq!(w.inbound(1, P, &data), Verdict::Flow);
        w.set_rules(rules_for(Some(r#"{"grants": []}"#), W));
        assert_eq!(
            w.inbound(1, P, &data),
            refused(Reason::Revoked, Reply::TcpRst)
        );
    }

    #[test]
    fn the_one_lookup_path_decides_as_the_general_path_does() {
        // Two trackers, one taking the general path for every packet, fed the same stream of
        // packets (both directions, two peers, every TCP flag the tracker reads, UDP, clock
        // steps across the timeouts, a policy change): same verdicts, same counts, same
        // table, entry by entry.
        const BOTH_WAYS: &str = r#"{"grants": [
            {"src": ["tag:planner"], "dst": ["tag:worker"], "ports": ["tcp:8080", "udp:9090"]},
            {"src": ["tag:worker"], "dst": ["tag:planner"], "ports": ["tcp:9090", "udp:8080"]}]}"#;
        let mut fast = Tracker::with_limits(rules_for(Some(BOTH_WAYS), W), 8, 64);
        let mut general = Tracker::with_limits(rules_for(Some(BOTH_WAYS), W), 8, 64);
        general.general_only = true;
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut now = 0u64;
        let mut fast_passes = 0;
        for step in 0..20_000 {
            now += match next(400) {
                0 => 200_000,
                1..=4 => 40_000,
                5..=20 => 1_000,
                n => n % 3,
            };
            if step % 5_000 == 4_999 {
                let text = [EXAMPLE, BOTH_WAYS][(step / 5_000) % 2];
                fast.set_rules(rules_for(Some(text), W));
                general.set_rules(rules_for(Some(text), W));
            }
            let (peer, addr) = [(P, P4), (P, P4), (P, P4), (U, U4)][next(4) as usize];
            let (sport, dport) = (
                [40000, 40001][next(2) as usize],
                [8080, 9090][next(2) as usize],
            );
            let flags =
                [SYN, SYN | ACK, ACK, ACK, ACK, ACK, ACK, 0x01 | ACK, RST][next(9) as usize];
            let l4 = if next(4) == 0 {
                (PROTO_UDP, udp(sport, dport))
            } else {
                (PROTO_TCP, tcp(sport, dport, flags))
            };
            let (a, b) = if next(2) == 0 {
                let packet = ip4(l4.0, addr, W4, &l4.1);
                (
                    fast.inbound(now, peer, &packet),
                    general.inbound(now, peer, &packet),
                )
            } else {
                let packet = ip4(l4.0, W4, addr, &{
                    // The same ports seen from this side.
                    let mut t = l4.1.clone();
                    t[0..2].copy_from_slice(&dport.to_be_bytes());
                    t[2..4].copy_from_slice(&sport.to_be_bytes());
                    t
                });
                (
                    fast.outbound(now, peer, &packet),
                    general.outbound(now, peer, &packet),
                )
            };
            assert_eq!(a, b, "step {step}");
            if a == Verdict::Flow {
                fast_passes += 1;
            }
            assert_eq!(fast.counts(), general.counts(), "step {step}");
            assert_eq!(fast.table, general.table, "step {step}");
        }
        // The stream exercised the tracked-flow path, not only refusals.
        assert!(
            fast_passes > 2_000,
            "{fast_passes} packets passed as tracked flows; {:?}",
            fast.counts()
        );
    }

    #[test]
    fn replies_to_a_flow_the_changed_policy_revokes_stop_too() {
        // The worker answers the planner's flow; the policy then drops the grant: the
        // worker's next answer is refused (with a RST to its own program), and so is the
        // planner's next reply on a flow the planner opened.
        let mut w = Tracker::new(rules_for(Some(EXAMPLE), W));
        let syn = ip4(PROTO_TCP, P4, W4, &tcp(40000, 8080, SYN));
        assert_eq!(w.inbound(0, P, &syn), GRANT0);
        let answer = ip4(PROTO_TCP, W4, P4, &tcp(8080, 40000, SYN | ACK));
        assert_eq!(w.outbound(0, P, &answer), Verdict::Flow);
        w.set_rules(rules_for(Some(r#"{"grants": []}"#), W));
        assert_eq!(
            w.outbound(1, P, &ip4(PROTO_TCP, W4, P4, &tcp(8080, 40000, ACK))),
            refused(Reason::Revoked, Reply::TcpRst)
        );
        assert_eq!(w.counts().refused_revoked, 1);
        let mut p = Tracker::new(rules_for(Some(EXAMPLE), P));
        assert!(matches!(p.outbound(0, W, &syn), Verdict::NewFlow(_)));
        assert_eq!(p.inbound(0, W, &answer), Verdict::Flow);
        p.set_rules(rules_for(Some(r#"{"grants": []}"#), P));
        assert_eq!(
            p.inbound(1, W, &ip4(PROTO_TCP, W4, P4, &tcp(8080, 40000, ACK))),
            refused(Reason::Revoked, Reply::None)
        );
        // Rules recompiled unchanged (a new member, say) keep such flows going.
        let mut w = Tracker::new(rules_for(Some(EXAMPLE), W));
        w.inbound(0, P, &syn);
        w.set_rules(rules_for(Some(EXAMPLE), W));
        assert_eq!(w.outbound(1, P, &answer), Verdict::Flow);
    }

    #[test]
    fn flows_time_out_like_the_kernels_shortened() {
        let udp_grant = r#"{"grants": [{"src": ["tag:planner"], "dst": ["*"], "ports": ["udp:53", "tcp:8080"]}]}"#;
        let mut w = Tracker::new(rules_for(Some(udp_grant), W));
        let q = ip4(PROTO_UDP, P4, W4, &udp(5000, 53));
        assert_eq!(w.inbound(0, P, &q), GRANT0);
        w.expire(UDP_MS);
        assert_eq!(w.flows(), 1);
        w.expire(UDP_MS + 1);
        assert_eq!(w.flows(), 0);
        // Answered, it lives 180 s.
        w.inbound(0, P, &q);
        w.outbound(1, P, &ip4(PROTO_UDP, W4, P4, &udp(53, 5000)));
        w.expire(1 + UDP_STREAM_MS);
        assert_eq!(w.flows(), 1);
        w.expire(2 + UDP_STREAM_MS);
        assert_eq!(w.flows(), 0);
        // TCP: 2 min unanswered, 2 h established; a RST ends it at once.
        w.inbound(0, P, &ip4(PROTO_TCP, P4, W4, &tcp(1, 8080, SYN)));
        w.expire(TCP_OTHER_MS + 1);
        assert_eq!(w.flows(), 0);
        w.inbound(0, P, &ip4(PROTO_TCP, P4, W4, &tcp(1, 8080, SYN)));
        w.outbound(0, P, &ip4(PROTO_TCP, W4, P4, &tcp(8080, 1, SYN | ACK)));
        w.expire(TCP_ESTABLISHED_MS);
        assert_eq!(w.flows(), 1);
        assert_eq!(
            w.inbound(
                TCP_ESTABLISHED_MS,
                P,
                &ip4(PROTO_TCP, P4, W4, &tcp(1, 8080, RST))
            ),
            Verdict::Flow
        );
        assert_eq!(w.flows(), 0);
        // An expired flow is not found even before a sweep.
        w.inbound(0, P, &ip4(PROTO_TCP, P4, W4, &tcp(2, 8080, SYN)));
        assert_eq!(
            w.inbound(
                TCP_OTHER_MS + 1,
                P,
                &ip4(PROTO_TCP, P4, W4, &tcp(2, 8080, ACK))
            ),
            refused(Reason::NoFlow, Reply::None)
        );
        assert_eq!(w.flows(), 0);
    }

    #[test]
    fn no_policy_allows_everything_and_bad_packets_are_dropped_and_counted() {
        let mut w = Tracker::new(rules_for(None, W));
        assert_eq!(
            w.inbound(0, U, &ip4(PROTO_TCP, U4, W4, &tcp(1, 22, SYN))),
            Verdict::NewFlow(Grant::NoPolicy)
        );
        assert_eq!(
            w.inbound(0, U, &ip4(47, U4, W4, &[0; 4])),
            Verdict::NewFlow(Grant::NoPolicy)
        );
        for bad in [
            &[][..],
            &[0x45, 0, 0][..],
            &ip4(PROTO_TCP, U4, W4, &[0; 10])[..],
            &ip4(PROTO_ICMP, U4, W4, &[8, 0, 0])[..],
            &ip6(PROTO_UDP, v6(3), v6(2), &[0; 3])[..],
            &ip6(0, v6(3), v6(2), &[PROTO_TCP, 200])[..],
            &[0x20; 40][..],
        ] {
            assert_eq!(
                w.inbound(0, U, bad),
                refused(Reason::Malformed, Reply::None),
                "{bad:?}"
            );
        }
        assert_eq!(w.counts().malformed, 7);
        let mut frag = ip4(PROTO_UDP, U4, W4, &udp(1, 53));
        frag[6..8].copy_from_slice(&5u16.to_be_bytes());
        assert_eq!(
            w.inbound(0, U, &frag),
            Verdict::Flow,
            "later fragments pass"
        );
        assert_eq!(w.counts().fragments, 1);
    }
}
