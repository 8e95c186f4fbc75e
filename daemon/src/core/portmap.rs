//! Port mapping with the home router: PCP (RFC 6887, the MAP opcode) and NAT-PMP (RFC 6886),
//! both on the gateway's UDP port 5351, and UPnP IGD (SSDP, then HTTP and SOAP; codecs in
//! [`upnp`](crate::core::upnp)). [`PortMapper`] is the I/O-free client: it takes `now` and the
//! gateway's answers and returns the requests to send, and holds the current mapping of the
//! node's WireGuard port. The PCP and NAT-PMP codecs ([`pcp_map_request`],
//! [`natpmp_map_request`], [`parse`]) are below it.
//!
//! What it does: when it learns a gateway it sends a PCP MAP request, a NAT-PMP external
//! address request and an SSDP search together (four times, 250 ms, 500 ms and 1 s apart); a
//! PCP answer maps the port at once, a NAT-PMP-only router gets a NAT-PMP map request once it
//! told its external address, and a router that only answered the SSDP search is asked over
//! UPnP (description, GetExternalIPAddress, AddPortMapping). When nothing answers it waits
//! [`PROBE_AGAIN`] before it asks again (a router without a server is not hammered). A mapping
//! is renewed at half its lifetime and deleted on [`stop`](PortMapper::stop). What is
//! *published* is decided by [`publishable`](PortMapper::publishable): only a mapping whose
//! external address equals the reflexive address the coordinator sees, so a router that lies
//! changes nothing but a counter.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use crate::core::upnp::{self, Service, Url};

/// The PCP and NAT-PMP server port on the gateway.
pub const PORT: u16 = 5351;
/// The largest PCP message (RFC 6887 §7): receive buffers need no more (an SSDP answer is
/// smaller too).
pub const MAX_MESSAGE: usize = 1100;
/// The lifetime asked for, in seconds (the server may grant less).
pub const REQUEST_LIFETIME: u32 = 7200;
/// Gaps between the sends of one request: sent at 0, 250 ms, 750 ms and 1.75 s, given up at
/// 3.75 s (RFC 6886 starts at 250 ms and doubles).
const RETRY_GAPS: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_millis(1000),
    Duration::from_millis(2000),
];
/// How long to wait before asking a gateway that did not answer again.
pub const PROBE_AGAIN: Duration = Duration::from_secs(300);
/// Mappings are renewed no more often than this, whatever lifetime the server grants.
const MIN_RENEW: Duration = Duration::from_secs(10);
/// How long the UPnP exchanges (description, external address, mapping) may take together.
const UPNP_DEADLINE: Duration = Duration::from_secs(10);
/// Lifetimes granted beyond a day are taken as a day.
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);

const PCP_VERSION: u8 = 2;
const PCP_OPCODE_MAP: u8 = 1;
const PCP_RESPONSE: u8 = 0x80;
const NATPMP_VERSION: u8 = 0;
const NATPMP_OP_ADDRESS: u8 = 0;
const NATPMP_OP_MAP_UDP: u8 = 1;
const NATPMP_RESPONSE: u8 = 0x80;
/// The result code "unsupported version" (the same in both protocols).
const UNSUPPORTED_VERSION: u16 = 1;
const IPPROTO_UDP: u8 = 17;
/// UPnP's ConflictInMappingEntry: another host holds that external port.
const UPNP_CONFLICT: u32 = 718;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Pcp,
    NatPmp,
    Upnp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pcp => "pcp",
            Protocol::NatPmp => "nat-pmp",
            Protocol::Upnp => "upnp",
        }
    }
}

/// A port mapping the gateway granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub protocol: Protocol,
    pub external: SocketAddrV4,
    pub lifetime: Duration,
    pub granted: Instant,
}

/// How a [`Request`] travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// One datagram from the port mapper's socket.
    Udp,
    /// One HTTP exchange over a new TCP connection; the answer (or its absence) goes to
    /// [`PortMapper::handle_http`].
    Http,
}

/// A request for the gateway (PCP, NAT-PMP: its [`PORT`]; UPnP: the SSDP group, then the
/// gateway's HTTP server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub protocol: Protocol,
    pub to: SocketAddr,
    pub via: Via,
    pub bytes: Vec<u8>,
}

/// Why an answer was dropped (the driver counts it as `portmap_bad`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bad {
    /// Not from the gateway.
    NotFromGateway,
    /// Not a PCP, NAT-PMP, SSDP or UPnP message this client can read (garbage, truncated).
    Malformed(&'static str),
    /// Well formed, but it answers nothing this client asked (another nonce, port or opcode).
    Unexpected(&'static str),
}

/// What the netcheck shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub gateway: Option<Ipv4Addr>,
    /// The protocols whose server answered (`pcp`, `nat-pmp`, `upnp`).
    pub answered: Vec<&'static str>,
    pub mapping: Option<Mapping>,
    /// `no gateway`, `probing`, `mapped`, `none answered`, `refused` or `stopped`.
    pub state: &'static str,
}

/// The UPnP exchange an HTTP answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpStep {
    Describe,
    ExternalIp,
    Add(u16),
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No gateway known.
    Idle,
    /// Asking with PCP MAP, NAT-PMP's external address request and an SSDP search.
    Probing {
        sent: usize,
        next: Instant,
    },
    /// NAT-PMP answered, PCP did not (or refused): asking for the mapping with NAT-PMP.
    NatPmpMapping {
        sent: usize,
        next: Instant,
    },
    /// Only UPnP can map: asking it over HTTP (given up at `deadline`).
    Upnp {
        deadline: Instant,
    },
    /// A mapping is held; renewing from `renew_at` (`sent` requests of this renewal so far).
    Mapped {
        renew_at: Instant,
        expires: Instant,
        sent: usize,
        next: Option<Instant>,
    },
    /// Nothing answered (or every server refused): ask again at `until`.
    Waiting {
        until: Instant,
        refused: bool,
    },
    Stopped,
}

/// The port-mapping client for one internal UDP port.
pub struct PortMapper {
    internal_port: u16,
    nonce: [u8; 12],
    /// The gateway, and this host's address towards it (PCP's client address, UPnP's
    /// internal client).
    gateway: Option<(Ipv4Addr, Ipv4Addr)>,
    phase: Phase,
    mapping: Option<Mapping>,
    natpmp_external: Option<Ipv4Addr>,
    pcp_answered: bool,
    natpmp_answered: bool,
    upnp_answered: bool,
    /// PCP answered with an error or is not spoken: NAT-PMP or UPnP is used.
    pcp_refused: bool,
    /// This probe already tried NAT-PMP's or UPnP's mapping.
    natpmp_tried: bool,
    upnp_tried: bool,
    /// The description URL from the SSDP answer, the service it names, and its address.
    upnp_location: Option<Url>,
    upnp_service: Option<Service>,
    upnp_external: Option<Ipv4Addr>,
    /// The HTTP exchange under way, if any.
    http_pending: Option<HttpStep>,
    /// The mismatch of the current mapping was already reported.
    mismatch_reported: bool,
}

impl PortMapper {
    /// `nonce`: random, PCP's mapping nonce (kept for renewals and the delete).
    pub fn new(internal_port: u16, nonce: [u8; 12]) -> PortMapper {
        PortMapper {
            internal_port,
            nonce,
            gateway: None,
            phase: Phase::Idle,
            mapping: None,
            natpmp_external: None,
            pcp_answered: false,
            natpmp_answered: false,
            upnp_answered: false,
            pcp_refused: false,
            natpmp_tried: false,
            upnp_tried: false,
            upnp_location: None,
            upnp_service: None,
            upnp_external: None,
            http_pending: None,
            mismatch_reported: false,
        }
    }

    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.gateway.map(|(g, _)| g)
    }

    /// The gateway (and this host's address towards it) is now `gateway`. A new one starts
    /// over: what the old one granted is forgotten (it cannot be reached to delete it).
    pub fn set_gateway(
        &mut self,
        now: Instant,
        gateway: Option<(Ipv4Addr, Ipv4Addr)>,
    ) -> Vec<Request> {
        if gateway == self.gateway || self.phase == Phase::Stopped {
            return vec![];
        }
        let nonce = self.nonce;
        *self = PortMapper::new(self.internal_port, nonce);
        self.gateway = gateway;
        if gateway.is_none() {
            return vec![];
        }
        self.start_probe(now)
    }

    /// The gateway's PCP / NAT-PMP port.
    fn server(&self) -> SocketAddr {
        SocketAddr::from((self.gateway().unwrap_or(Ipv4Addr::UNSPECIFIED), PORT))
    }

    fn client_ip(&self) -> Ipv4Addr {
        self.gateway
            .map(|(_, l)| l)
            .unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    fn udp(&self, protocol: Protocol, bytes: Vec<u8>) -> Request {
        Request {
            protocol,
            to: self.server(),
            via: Via::Udp,
            bytes,
        }
    }

    fn start_probe(&mut self, now: Instant) -> Vec<Request> {
        self.natpmp_tried = false;
        self.upnp_tried = false;
        self.phase = Phase::Probing {
            sent: 1,
            next: now + RETRY_GAPS[0],
        };
        self.probe_requests()
    }

    fn probe_requests(&self) -> Vec<Request> {
        let mut v = vec![];
        if !self.pcp_refused {
            v.push(self.pcp_request(REQUEST_LIFETIME));
        }
        v.push(self.udp(Protocol::NatPmp, natpmp_address_request().to_vec()));
        v.push(Request {
            protocol: Protocol::Upnp,
            to: SocketAddr::V4(upnp::SSDP),
            via: Via::Udp,
            bytes: upnp::search(),
        });
        v
    }

    fn pcp_request(&self, lifetime: u32) -> Request {
        let suggested = self.mapping.map(|m| m.external);
        let bytes = pcp_map_request(
            self.client_ip(),
            self.nonce,
            self.internal_port,
            suggested,
            lifetime,
        );
        self.udp(Protocol::Pcp, bytes.to_vec())
    }

    fn natpmp_request(&self, lifetime: u32) -> Request {
        let suggested = self.mapping.map(|m| m.external.port()).unwrap_or(0);
        let bytes = natpmp_map_request(self.internal_port, suggested, lifetime);
        self.udp(Protocol::NatPmp, bytes.to_vec())
    }

    fn http(&mut self, step: HttpStep, to: SocketAddrV4, bytes: Vec<u8>) -> Vec<Request> {
        self.http_pending = Some(step);
        vec![Request {
            protocol: Protocol::Upnp,
            to: SocketAddr::V4(to),
            via: Via::Http,
            bytes,
        }]
    }

    /// The UPnP request for `step` (none without the service or address it needs).
    fn upnp_request(&mut self, step: HttpStep) -> Vec<Request> {
        match (step, self.upnp_service.clone()) {
            (HttpStep::Describe, _) => match self.upnp_location.clone() {
                Some(url) => self.http(step, url.addr, upnp::get(&url)),
                None => vec![],
            },
            (HttpStep::ExternalIp, Some(s)) => {
                self.http(step, s.control.addr, upnp::get_external_ip(&s))
            }
            (HttpStep::Add(port), Some(s)) => {
                let bytes = upnp::add_port_mapping(
                    &s,
                    port,
                    self.client_ip(),
                    self.internal_port,
                    REQUEST_LIFETIME,
                );
                self.http(step, s.control.addr, bytes)
            }
            (HttpStep::Delete, Some(s)) => match self.mapping {
                Some(m) => {
                    let bytes = upnp::delete_port_mapping(&s, m.external.port());
                    self.http(step, s.control.addr, bytes)
                }
                None => vec![],
            },
            (_, None) => vec![],
        }
    }

    /// The request that renews the current mapping (none while a UPnP exchange runs).
    fn renewal(&mut self, m: Mapping) -> Vec<Request> {
        match m.protocol {
            Protocol::Pcp => vec![self.pcp_request(REQUEST_LIFETIME)],
            Protocol::NatPmp => vec![self.natpmp_request(REQUEST_LIFETIME)],
            Protocol::Upnp if self.http_pending.is_some() => vec![],
            Protocol::Upnp => self.upnp_request(HttpStep::Add(m.external.port())),
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Idle | Phase::Stopped => None,
            Phase::Probing { next, .. } | Phase::NatPmpMapping { next, .. } => Some(next),
            Phase::Upnp { deadline } => Some(deadline),
            Phase::Mapped {
                renew_at,
                expires,
                next,
                ..
            } => Some(next.unwrap_or(renew_at).min(expires)),
            Phase::Waiting { until, .. } => Some(until),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Request> {
        match self.phase {
            Phase::Idle | Phase::Stopped => vec![],
            Phase::Probing { sent, next } if now >= next => {
                let pcp_out = self.pcp_refused || !self.pcp_answered;
                if pcp_out && self.natpmp_external.is_some() {
                    // NAT-PMP told its address and PCP gave nothing: map with NAT-PMP.
                    return self.start_natpmp(now);
                }
                if pcp_out && !self.natpmp_answered && self.upnp_location.is_some() {
                    // Only UPnP answered.
                    return self.start_upnp(now);
                }
                if sent >= RETRY_GAPS.len() {
                    return self.fall_back(now);
                }
                self.phase = Phase::Probing {
                    sent: sent + 1,
                    next: now + RETRY_GAPS[sent],
                };
                self.probe_requests()
            }
            Phase::NatPmpMapping { sent, next } if now >= next => {
                if sent >= RETRY_GAPS.len() {
                    return self.fall_back(now);
                }
                self.phase = Phase::NatPmpMapping {
                    sent: sent + 1,
                    next: now + RETRY_GAPS[sent],
                };
                vec![self.natpmp_request(REQUEST_LIFETIME)]
            }
            Phase::Upnp { deadline } if now >= deadline => {
                self.http_pending = None;
                self.give_up(now);
                vec![]
            }
            Phase::Mapped { expires, .. } if now >= expires => {
                // Renewals went unanswered: the mapping is gone; ask afresh.
                self.mapping = None;
                self.mismatch_reported = false;
                self.start_probe(now)
            }
            Phase::Mapped {
                renew_at,
                expires,
                sent,
                next,
            } if now >= next.unwrap_or(renew_at) => {
                let Some(m) = self.mapping else {
                    return self.start_probe(now);
                };
                if sent >= RETRY_GAPS.len() {
                    // This renewal went unanswered: try again halfway to the expiry.
                    let left = expires.saturating_duration_since(now);
                    self.phase = Phase::Mapped {
                        renew_at: now + (left / 2).max(RETRY_GAPS[0]),
                        expires,
                        sent: 0,
                        next: None,
                    };
                    return vec![];
                }
                self.phase = Phase::Mapped {
                    renew_at,
                    expires,
                    sent: sent + 1,
                    next: Some(now + RETRY_GAPS[sent]),
                };
                self.renewal(m)
            }
            Phase::Waiting { until, .. } if now >= until => self.start_probe(now),
            _ => vec![],
        }
    }

    fn start_natpmp(&mut self, now: Instant) -> Vec<Request> {
        self.natpmp_tried = true;
        self.phase = Phase::NatPmpMapping {
            sent: 1,
            next: now + RETRY_GAPS[0],
        };
        vec![self.natpmp_request(REQUEST_LIFETIME)]
    }

    fn start_upnp(&mut self, now: Instant) -> Vec<Request> {
        self.upnp_tried = true;
        self.phase = Phase::Upnp {
            deadline: now + UPNP_DEADLINE,
        };
        let step = if self.upnp_service.is_some() {
            HttpStep::ExternalIp
        } else {
            HttpStep::Describe
        };
        self.upnp_request(step)
    }

    /// PCP will not map: NAT-PMP if it told its address, else UPnP if it answered the search,
    /// else wait.
    fn fall_back(&mut self, now: Instant) -> Vec<Request> {
        if self.natpmp_external.is_some() && !self.natpmp_tried {
            return self.start_natpmp(now);
        }
        if self.upnp_location.is_some() && !self.upnp_tried {
            return self.start_upnp(now);
        }
        self.give_up(now);
        vec![]
    }

    fn give_up(&mut self, now: Instant) {
        self.http_pending = None;
        self.phase = Phase::Waiting {
            until: now + PROBE_AGAIN,
            refused: self.pcp_answered || self.natpmp_answered || self.upnp_answered,
        };
    }

    fn mapped(&mut self, now: Instant, protocol: Protocol, external: SocketAddrV4, lifetime: u32) {
        let lifetime = Duration::from_secs(lifetime.into()).min(MAX_LIFETIME);
        if self.mapping.map(|m| m.external) != Some(external) {
            self.mismatch_reported = false;
        }
        self.mapping = Some(Mapping {
            protocol,
            external,
            lifetime,
            granted: now,
        });
        self.phase = Phase::Mapped {
            renew_at: now + (lifetime / 2).max(MIN_RENEW),
            expires: now + lifetime,
            sent: 0,
            next: None,
        };
    }

    /// The protocol of the mapping held or being asked for, if one is settled on.
    fn settled(&self) -> Option<Protocol> {
        match self.phase {
            Phase::NatPmpMapping { .. } => Some(Protocol::NatPmp),
            Phase::Upnp { .. } => Some(Protocol::Upnp),
            _ => self.mapping.map(|m| m.protocol),
        }
    }

    /// A datagram that came to the port mapper's socket from `from`. `Err`: dropped (count
    /// it).
    pub fn handle_response(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
    ) -> Result<Vec<Request>, Bad> {
        let Some((gateway, _)) = self.gateway else {
            return Err(Bad::NotFromGateway);
        };
        if from.ip() != IpAddr::V4(gateway) {
            return Err(Bad::NotFromGateway);
        }
        if from.port() != PORT {
            // An SSDP answer (from the gateway's port 1900, or another of its ports).
            let url = upnp::parse_search_answer(data, gateway)
                .ok_or(Bad::Malformed("not an SSDP answer naming the gateway"))?;
            self.upnp_answered = true;
            self.upnp_location = Some(url);
            return Ok(vec![]);
        }
        let asking = matches!(
            self.phase,
            Phase::Probing { .. } | Phase::NatPmpMapping { .. } | Phase::Mapped { .. }
        );
        match parse(data)? {
            Response::PcpMap(r) => {
                if r.nonce != self.nonce {
                    return Err(Bad::Unexpected("PCP answer with another nonce"));
                }
                if r.protocol != IPPROTO_UDP || r.internal_port != self.internal_port {
                    return Err(Bad::Unexpected("PCP answer for another port"));
                }
                self.pcp_answered = true;
                let mine = self.settled().is_none_or(|p| p == Protocol::Pcp);
                if !asking || !mine {
                    return Ok(vec![]);
                }
                if r.result != 0 {
                    self.pcp_refused = true;
                    if self.mapping.is_some() {
                        // The renewal was refused: the mapping is gone.
                        self.mapping = None;
                        return Ok(self.start_probe(now));
                    }
                    return Ok(vec![]);
                }
                let Some(ip) = r.external.to_ipv4_mapped() else {
                    return Err(Bad::Malformed("PCP external address is not IPv4"));
                };
                if ip.is_unspecified() || r.external_port == 0 || r.lifetime == 0 {
                    return Err(Bad::Malformed(
                        "PCP mapping without address, port or lifetime",
                    ));
                }
                self.mapped(
                    now,
                    Protocol::Pcp,
                    SocketAddrV4::new(ip, r.external_port),
                    r.lifetime,
                );
                Ok(vec![])
            }
            Response::PcpOther { .. } => Err(Bad::Unexpected("PCP answer to another opcode")),
            Response::NatPmpAddress { result, external } => {
                self.natpmp_answered = true;
                if result == UNSUPPORTED_VERSION {
                    // A NAT-PMP-only server refusing our PCP request.
                    self.pcp_refused = true;
                    return Ok(vec![]);
                }
                if result != 0 {
                    return Ok(vec![]);
                }
                if external.is_unspecified() {
                    return Err(Bad::Malformed("NAT-PMP external address 0.0.0.0"));
                }
                self.natpmp_external = Some(external);
                Ok(vec![])
            }
            Response::NatPmpMap {
                result,
                internal_port,
                external_port,
                lifetime,
            } => {
                if result == UNSUPPORTED_VERSION {
                    self.natpmp_answered = true;
                    self.pcp_refused = true;
                    return Ok(vec![]);
                }
                if internal_port != self.internal_port {
                    return Err(Bad::Unexpected("NAT-PMP answer for another port"));
                }
                self.natpmp_answered = true;
                let mine = self.settled().is_none_or(|p| p == Protocol::NatPmp);
                if !asking || !mine {
                    // Another protocol mapped the port; this answer only shows it is spoken.
                    return Ok(vec![]);
                }
                if result != 0 {
                    if matches!(self.phase, Phase::NatPmpMapping { .. }) {
                        return Ok(self.fall_back(now));
                    }
                    return Ok(vec![]);
                }
                let Some(ip) = self.natpmp_external else {
                    return Err(Bad::Unexpected(
                        "NAT-PMP mapping before its external address",
                    ));
                };
                if external_port == 0 || lifetime == 0 {
                    return Err(Bad::Malformed("NAT-PMP mapping without port or lifetime"));
                }
                self.mapped(
                    now,
                    Protocol::NatPmp,
                    SocketAddrV4::new(ip, external_port),
                    lifetime,
                );
                Ok(vec![])
            }
        }
    }

    /// The answer to the HTTP request sent last (`None`: no connection, no answer in time, or
    /// cut off at [`upnp::MAX_HTTP`]). `Err`: dropped as garbage (count it).
    pub fn handle_http(
        &mut self,
        now: Instant,
        answer: Option<&[u8]>,
    ) -> Result<Vec<Request>, Bad> {
        let Some(step) = self.http_pending.take() else {
            return Ok(vec![]);
        };
        let mapping_up = matches!(self.phase, Phase::Upnp { .. });
        let renewing = matches!(self.phase, Phase::Mapped { .. })
            && self.mapping.is_some_and(|m| m.protocol == Protocol::Upnp);
        if step == HttpStep::Delete || !(mapping_up || renewing) {
            return Ok(vec![]);
        }
        let Some(answer) = answer else {
            if mapping_up {
                self.give_up(now);
            }
            return Ok(vec![]);
        };
        let result = self.upnp_step(now, step, answer);
        if result.is_err() && mapping_up {
            self.give_up(now);
        }
        result
    }

    fn upnp_step(
        &mut self,
        now: Instant,
        step: HttpStep,
        answer: &[u8],
    ) -> Result<Vec<Request>, Bad> {
        let gateway = self.gateway().ok_or(Bad::NotFromGateway)?;
        match step {
            HttpStep::Describe => {
                let base = self
                    .upnp_location
                    .clone()
                    .ok_or(Bad::Unexpected("a description nobody asked for"))?;
                let (code, body) =
                    upnp::parse_http(answer).ok_or(Bad::Malformed("UPnP description not HTTP"))?;
                if code != 200 {
                    return Err(Bad::Unexpected("no UPnP description there"));
                }
                let service = upnp::parse_description(body, gateway, &base)
                    .ok_or(Bad::Malformed("UPnP description without a WAN connection"))?;
                self.upnp_service = Some(service);
                Ok(self.upnp_request(HttpStep::ExternalIp))
            }
            HttpStep::ExternalIp => {
                let body = upnp::parse_soap(answer)
                    .ok_or(Bad::Malformed("UPnP answer not HTTP"))?
                    .map_err(|_| Bad::Unexpected("UPnP GetExternalIPAddress refused"))?;
                let ip = upnp::parse_external_ip(body)
                    .filter(|ip| !ip.is_unspecified())
                    .ok_or(Bad::Malformed("UPnP external address missing"))?;
                self.upnp_external = Some(ip);
                Ok(self.upnp_request(HttpStep::Add(self.internal_port)))
            }
            HttpStep::Add(port) => {
                match upnp::parse_soap(answer).ok_or(Bad::Malformed("UPnP answer not HTTP"))? {
                    Ok(_) => {
                        let ip = self
                            .upnp_external
                            .ok_or(Bad::Unexpected("no UPnP external address"))?;
                        self.mapped(
                            now,
                            Protocol::Upnp,
                            SocketAddrV4::new(ip, port),
                            REQUEST_LIFETIME,
                        );
                        Ok(vec![])
                    }
                    Err(UPNP_CONFLICT) if port == self.internal_port && self.mapping.is_none() => {
                        // Another host holds that port: try one other, chosen by the nonce.
                        let other =
                            1024 + u16::from_be_bytes([self.nonce[0], self.nonce[1]]) % 64_000;
                        Ok(self.upnp_request(HttpStep::Add(other)))
                    }
                    Err(_) => {
                        if matches!(self.phase, Phase::Upnp { .. }) {
                            self.give_up(now);
                        }
                        Ok(vec![])
                    }
                }
            }
            HttpStep::Delete => Ok(vec![]),
        }
    }

    pub fn mapping(&self) -> Option<Mapping> {
        self.mapping
    }

    /// Whether the mapping may be published as a candidate, given the reflexive address the
    /// coordinator sees: only when their IPs agree. The second value is true once per mapping
    /// whose external IP differs (count it: `portmap_mismatch`).
    pub fn publishable(&mut self, reflexive: Option<SocketAddr>) -> (Option<SocketAddr>, bool) {
        let (Some(m), Some(r)) = (self.mapping, reflexive) else {
            return (None, false);
        };
        if r.ip() == IpAddr::V4(*m.external.ip()) {
            return (Some(SocketAddr::V4(m.external)), false);
        }
        let first = !self.mismatch_reported;
        self.mismatch_reported = true;
        (None, first)
    }

    /// Stops: the requests that delete the mapping (none when there is none).
    pub fn stop(&mut self) -> Vec<Request> {
        let out = match self.mapping.map(|m| m.protocol) {
            Some(Protocol::Pcp) => {
                let bytes =
                    pcp_map_request(self.client_ip(), self.nonce, self.internal_port, None, 0);
                vec![self.udp(Protocol::Pcp, bytes.to_vec())]
            }
            // RFC 6886 §3.4: delete with suggested external port 0 and lifetime 0.
            Some(Protocol::NatPmp) => vec![self.udp(
                Protocol::NatPmp,
                natpmp_map_request(self.internal_port, 0, 0).to_vec(),
            )],
            Some(Protocol::Upnp) => self.upnp_request(HttpStep::Delete),
            None => vec![],
        };
        self.mapping = None;
        self.phase = Phase::Stopped;
        out
    }

    pub fn report(&self) -> Report {
        let mut answered = vec![];
        if self.pcp_answered {
            answered.push(Protocol::Pcp.name());
        }
        if self.natpmp_answered {
            answered.push(Protocol::NatPmp.name());
        }
        if self.upnp_answered {
            answered.push(Protocol::Upnp.name());
        }
        let state = match self.phase {
            Phase::Idle => "no gateway",
            Phase::Probing { .. } | Phase::NatPmpMapping { .. } | Phase::Upnp { .. } => "probing",
            Phase::Mapped { .. } => "mapped",
            Phase::Waiting { refused: false, .. } => "none answered",
            Phase::Waiting { refused: true, .. } => "refused",
            Phase::Stopped => "stopped",
        };
        Report {
            gateway: self.gateway(),
            answered,
            mapping: self.mapping,
            state,
        }
    }
}

// ------------------------------------------------------------------------------------------
// Codecs
// ------------------------------------------------------------------------------------------

/// PCP MAP request for UDP `internal_port` (RFC 6887 §11.1): 24-byte header and 36 bytes of
/// MAP data. `client`: this host's address as the server sees it. Lifetime 0 deletes.
pub fn pcp_map_request(
    client: Ipv4Addr,
    nonce: [u8; 12],
    internal_port: u16,
    suggested: Option<SocketAddrV4>,
    lifetime: u32,
) -> [u8; 60] {
    let mut b = [0u8; 60];
    b[0] = PCP_VERSION;
    b[1] = PCP_OPCODE_MAP;
    b[4..8].copy_from_slice(&lifetime.to_be_bytes());
    b[8..24].copy_from_slice(&client.to_ipv6_mapped().octets());
    b[24..36].copy_from_slice(&nonce);
    b[36] = IPPROTO_UDP;
    b[40..42].copy_from_slice(&internal_port.to_be_bytes());
    let (port, ip) = match suggested {
        Some(s) => (s.port(), s.ip().to_ipv6_mapped()),
        None => (0, Ipv4Addr::UNSPECIFIED.to_ipv6_mapped()),
    };
    b[42..44].copy_from_slice(&port.to_be_bytes());
    b[44..60].copy_from_slice(&ip.octets());
    b
}

/// NAT-PMP external address request (RFC 6886 §3.2).
pub fn natpmp_address_request() -> [u8; 2] {
    [NATPMP_VERSION, NATPMP_OP_ADDRESS]
}

/// NAT-PMP UDP mapping request (RFC 6886 §3.3). Lifetime 0 deletes.
pub fn natpmp_map_request(internal_port: u16, suggested_port: u16, lifetime: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0] = NATPMP_VERSION;
    b[1] = NATPMP_OP_MAP_UDP;
    b[4..6].copy_from_slice(&internal_port.to_be_bytes());
    b[6..8].copy_from_slice(&suggested_port.to_be_bytes());
    b[8..12].copy_from_slice(&lifetime.to_be_bytes());
    b
}

/// A PCP MAP response's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcpMap {
    pub result: u16,
    pub lifetime: u32,
    pub epoch: u32,
    pub nonce: [u8; 12],
    pub protocol: u8,
    pub internal_port: u16,
    pub external_port: u16,
    pub external: Ipv6Addr,
}

/// An answer from the gateway's port 5351.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    PcpMap(PcpMap),
    /// A PCP response to another opcode (ANNOUNCE, PEER), or an error too short to carry MAP
    /// data.
    PcpOther {
        opcode: u8,
        result: u16,
    },
    /// `external` is 0.0.0.0 in an error answer (which may be as short as 4 bytes).
    NatPmpAddress {
        result: u16,
        external: Ipv4Addr,
    },
    NatPmpMap {
        result: u16,
        internal_port: u16,
        external_port: u16,
        lifetime: u32,
    },
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads an answer; anything else (garbage, truncated, a request) is an error.
pub fn parse(b: &[u8]) -> Result<Response, Bad> {
    if b.len() > MAX_MESSAGE {
        return Err(Bad::Malformed("longer than any PCP message"));
    }
    match b.first() {
        Some(&PCP_VERSION) => parse_pcp(b),
        Some(&NATPMP_VERSION) => parse_natpmp(b),
        Some(_) => Err(Bad::Malformed("neither PCP nor NAT-PMP")),
        None => Err(Bad::Malformed("empty")),
    }
}

fn parse_pcp(b: &[u8]) -> Result<Response, Bad> {
    if b.len() < 24 || !b.len().is_multiple_of(4) {
        return Err(Bad::Malformed("PCP message of a bad length"));
    }
    if b[1] & PCP_RESPONSE == 0 {
        return Err(Bad::Malformed("PCP request, not a response"));
    }
    let opcode = b[1] & !PCP_RESPONSE;
    let result = u16::from(b[3]);
    if opcode != PCP_OPCODE_MAP || b.len() < 60 {
        return Ok(Response::PcpOther { opcode, result });
    }
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&b[24..36]);
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[44..60]);
    Ok(Response::PcpMap(PcpMap {
        result,
        lifetime: be32(b, 4),
        epoch: be32(b, 8),
        nonce,
        protocol: b[36],
        internal_port: be16(b, 40),
        external_port: be16(b, 42),
        external: Ipv6Addr::from(ip),
    }))
}

fn parse_natpmp(b: &[u8]) -> Result<Response, Bad> {
    if b.len() < 4 {
        return Err(Bad::Malformed("truncated NAT-PMP answer"));
    }
    let op = b[1];
    if op & NATPMP_RESPONSE == 0 {
        return Err(Bad::Malformed("NAT-PMP request, not a response"));
    }
    let result = be16(b, 2);
    // Error answers may stop after the header (or the epoch); success needs every field.
    match op & !NATPMP_RESPONSE {
        NATPMP_OP_ADDRESS => {
            if result != 0 {
                return Ok(Response::NatPmpAddress {
                    result,
                    external: Ipv4Addr::UNSPECIFIED,
                });
            }
            if b.len() < 12 {
                return Err(Bad::Malformed("truncated NAT-PMP address answer"));
            }
            Ok(Response::NatPmpAddress {
                result,
                external: Ipv4Addr::new(b[8], b[9], b[10], b[11]),
            })
        }
        NATPMP_OP_MAP_UDP => {
            if b.len() < 16 {
                if result != 0 {
                    return Ok(Response::NatPmpMap {
                        result,
                        internal_port: 0,
                        external_port: 0,
                        lifetime: 0,
                    });
                }
                return Err(Bad::Malformed("truncated NAT-PMP mapping answer"));
            }
            Ok(Response::NatPmpMap {
                result,
                internal_port: be16(b, 8),
                external_port: be16(b, 10),
                lifetime: be32(b, 12),
            })
        }
        _ => Err(Bad::Malformed("NAT-PMP answer to another opcode")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
    const ME: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
    const EXT: Ipv4Addr = Ipv4Addr::new(44, 0, 0, 7);
    const NONCE: [u8; 12] = [5; 12];
    const PORT_IN: u16 = 51820;

    fn gw() -> SocketAddr {
        SocketAddr::from((GW, PORT))
    }

    fn pcp_answer(nonce: [u8; 12], result: u8, ext: Ipv4Addr, port: u16, life: u32) -> Vec<u8> {
        let mut b = vec![0u8; 60];
        b[0] = 2;
        b[1] = 0x81;
        b[3] = result;
        b[4..8].copy_from_slice(&life.to_be_bytes());
        b[24..36].copy_from_slice(&nonce);
        b[36] = 17;
        b[40..42].copy_from_slice(&PORT_IN.to_be_bytes());
        b[42..44].copy_from_slice(&port.to_be_bytes());
        b[44..60].copy_from_slice(&ext.to_ipv6_mapped().octets());
        b
    }

    fn natpmp_address(ext: Ipv4Addr) -> Vec<u8> {
        let mut b = vec![0, 128, 0, 0, 0, 0, 0, 9];
        b.extend_from_slice(&ext.octets());
        b
    }

    fn natpmp_map(port: u16, life: u32) -> Vec<u8> {
        let mut b = vec![0, 129, 0, 0, 0, 0, 0, 9];
        b.extend_from_slice(&PORT_IN.to_be_bytes());
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&life.to_be_bytes());
        b
    }

    fn started(t0: Instant) -> (PortMapper, Vec<Request>) {
        let mut m = PortMapper::new(PORT_IN, NONCE);
        let out = m.set_gateway(t0, Some((GW, ME)));
        (m, out)
    }

    #[test]
    fn requests_have_the_rfc_layouts() {
        let b = pcp_map_request(ME, NONCE, PORT_IN, None, 7200);
        assert_eq!(&b[..4], &[2, 1, 0, 0]);
        assert_eq!(be32(&b, 4), 7200);
        assert_eq!(&b[8..24], &ME.to_ipv6_mapped().octets());
        assert_eq!(&b[24..36], &NONCE);
        assert_eq!(b[36], 17);
        assert_eq!(be16(&b, 40), PORT_IN);
        assert_eq!(natpmp_address_request(), [0, 0]);
        let n = natpmp_map_request(PORT_IN, 0, 7200);
        assert_eq!(&n[..4], &[0, 1, 0, 0]);
        assert_eq!(be16(&n, 4), PORT_IN);
        assert_eq!(be32(&n, 8), 7200);
    }

    #[test]
    fn a_pcp_answer_maps_the_port_and_is_renewed_at_half_its_lifetime() {
        let t0 = Instant::now();
        let (mut m, out) = started(t0);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].protocol, Protocol::Pcp);
        assert_eq!(out[1].protocol, Protocol::NatPmp);
        assert_eq!(out[2].protocol, Protocol::Upnp);
        assert_eq!(out[2].to, SocketAddr::V4(upnp::SSDP));
        assert!(out.iter().all(|r| r.via == Via::Udp));
        m.handle_response(t0, gw(), &pcp_answer(NONCE, 0, EXT, 40000, 120))
            .unwrap();
        let mapping = m.mapping().unwrap();
        assert_eq!(mapping.external, SocketAddrV4::new(EXT, 40000));
        assert_eq!(mapping.protocol, Protocol::Pcp);
        assert_eq!(m.report().state, "mapped");
        assert_eq!(m.report().answered, vec!["pcp"]);
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(60)));
        assert!(m.handle_timeout(t0 + Duration::from_secs(59)).is_empty());
        let renew = m.handle_timeout(t0 + Duration::from_secs(60));
        assert_eq!(renew.len(), 1);
        assert_eq!(renew[0].protocol, Protocol::Pcp);
        // The renewal suggests the address it holds.
        assert_eq!(be16(&renew[0].bytes, 42), 40000);
        let t1 = t0 + Duration::from_secs(61);
        m.handle_response(t1, gw(), &pcp_answer(NONCE, 0, EXT, 40000, 120))
            .unwrap();
        assert_eq!(m.poll_timeout(), Some(t1 + Duration::from_secs(60)));
        // Stop deletes it: lifetime 0, same nonce.
        let del = m.stop();
        assert_eq!(del.len(), 1);
        assert_eq!(be32(&del[0].bytes, 4), 0);
        assert_eq!(&del[0].bytes[24..36], &NONCE);
        assert_eq!(m.report().state, "stopped");
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn a_natpmp_only_router_is_mapped_with_natpmp() {
        let t0 = Instant::now();
        let (mut m, _) = started(t0);
        // It refuses the PCP request with its own version and tells its address.
        m.handle_response(t0, gw(), &[0, 129, 0, 1, 0, 0, 0, 9])
            .unwrap();
        m.handle_response(t0, gw(), &natpmp_address(EXT)).unwrap();
        let out = m.handle_timeout(t0 + Duration::from_millis(250));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].protocol, Protocol::NatPmp);
        assert_eq!(out[0].bytes[1], 1);
        m.handle_response(t0, gw(), &natpmp_map(40001, 3600))
            .unwrap();
        let mapping = m.mapping().unwrap();
        assert_eq!(mapping.external, SocketAddrV4::new(EXT, 40001));
        assert_eq!(mapping.protocol, Protocol::NatPmp);
        assert_eq!(m.report().answered, vec!["nat-pmp"]);
        let del = m.stop();
        assert_eq!(del[0].bytes.as_slice(), &natpmp_map_request(PORT_IN, 0, 0));
    }

    #[test]
    fn silence_backs_off_for_minutes() {
        let t0 = Instant::now();
        let (mut m, out) = started(t0);
        let mut sends = out.len();
        let mut t = t0;
        while let Some(next) = m.poll_timeout() {
            if next > t0 + Duration::from_secs(10) {
                break;
            }
            t = next;
            sends += m.handle_timeout(t).len();
        }
        assert_eq!(sends, 12, "four rounds of PCP, NAT-PMP and SSDP");
        assert_eq!(m.report().state, "none answered");
        assert!(m.report().answered.is_empty());
        assert_eq!(m.poll_timeout(), Some(t + PROBE_AGAIN));
        assert_eq!(m.handle_timeout(t + PROBE_AGAIN).len(), 3);
    }

    #[test]
    fn unanswered_renewals_lose_the_mapping_at_expiry() {
        let t0 = Instant::now();
        let (mut m, _) = started(t0);
        m.handle_response(t0, gw(), &pcp_answer(NONCE, 0, EXT, 40000, 100))
            .unwrap();
        let mut t = t0;
        while m.mapping().is_some() {
            t = m.poll_timeout().unwrap();
            m.handle_timeout(t);
            assert!(t <= t0 + Duration::from_secs(100));
        }
        assert_eq!(t, t0 + Duration::from_secs(100));
        assert_eq!(m.report().state, "probing");
    }

    #[test]
    fn garbage_and_truncated_answers_are_dropped() {
        let t0 = Instant::now();
        let (mut m, _) = started(t0);
        let good = pcp_answer(NONCE, 0, EXT, 40000, 120);
        for (what, bytes) in [
            ("empty", vec![]),
            ("random", vec![0x17, 0x99, 1, 2, 3]),
            ("truncated PCP", good[..20].to_vec()),
            ("odd PCP length", good[..59].to_vec()),
            (
                "truncated NAT-PMP address",
                natpmp_address(EXT)[..8].to_vec(),
            ),
            ("truncated NAT-PMP map", natpmp_map(1, 1)[..12].to_vec()),
            ("NAT-PMP of 3 bytes", vec![0, 128, 0]),
            (
                "a request",
                pcp_map_request(ME, NONCE, PORT_IN, None, 1).to_vec(),
            ),
            ("too long", vec![2; 1200]),
            ("another nonce", pcp_answer([6; 12], 0, EXT, 40000, 120)),
            (
                "no address",
                pcp_answer(NONCE, 0, Ipv4Addr::UNSPECIFIED, 40000, 120),
            ),
            ("no lifetime", pcp_answer(NONCE, 0, EXT, 40000, 0)),
            ("no NAT-PMP address yet", natpmp_map(40000, 60)),
        ] {
            assert!(
                m.handle_response(t0, gw(), &bytes).is_err(),
                "{what} was accepted"
            );
        }
        let elsewhere = SocketAddr::from((Ipv4Addr::new(192, 168, 1, 66), PORT));
        assert_eq!(
            m.handle_response(t0, elsewhere, &good),
            Err(Bad::NotFromGateway)
        );
        assert!(m.mapping().is_none());
        assert_eq!(m.report().state, "probing");
        // The real answer still works afterwards.
        m.handle_response(t0, gw(), &good).unwrap();
        assert!(m.mapping().is_some());
    }

    #[test]
    fn a_mapping_is_published_only_at_the_reflexive_address() {
        let t0 = Instant::now();
        let (mut m, _) = started(t0);
        let reflexive = Some(SocketAddr::from((EXT, 61000)));
        assert_eq!(m.publishable(reflexive), (None, false));
        m.handle_response(t0, gw(), &pcp_answer(NONCE, 0, EXT, 40000, 120))
            .unwrap();
        assert_eq!(
            m.publishable(reflexive),
            (Some(SocketAddr::from((EXT, 40000))), false)
        );
        assert_eq!(m.publishable(None), (None, false));
        // A liar: counted once, never published.
        let (mut liar, _) = started(t0);
        let lie = Ipv4Addr::new(44, 0, 0, 250);
        liar.handle_response(t0, gw(), &pcp_answer(NONCE, 0, lie, 40000, 120))
            .unwrap();
        assert_eq!(liar.publishable(reflexive), (None, true));
        assert_eq!(liar.publishable(reflexive), (None, false));
    }

    #[test]
    fn a_new_gateway_starts_over_and_no_gateway_sends_nothing() {
        let t0 = Instant::now();
        let mut m = PortMapper::new(PORT_IN, NONCE);
        assert!(m.set_gateway(t0, None).is_empty());
        assert_eq!(m.report().state, "no gateway");
        assert_eq!(m.poll_timeout(), None);
        assert_eq!(m.set_gateway(t0, Some((GW, ME))).len(), 3);
        assert!(m.set_gateway(t0, Some((GW, ME))).is_empty());
        m.handle_response(t0, gw(), &pcp_answer(NONCE, 0, EXT, 40000, 120))
            .unwrap();
        let other = Ipv4Addr::new(10, 9, 9, 1);
        assert_eq!(m.set_gateway(t0, Some((other, ME))).len(), 3);
        assert!(m.mapping().is_none());
        // The old gateway's answers are now foreign.
        assert_eq!(
            m.handle_response(t0, gw(), &pcp_answer(NONCE, 0, EXT, 40000, 120)),
            Err(Bad::NotFromGateway)
        );
    }

    fn http_ok(body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    const DESCRIPTION: &str = "<root><service><serviceType>\
        urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>\
        <controlURL>/ctl/IPConn</controlURL></service></root>";

    fn ssdp_answer() -> Vec<u8> {
        b"HTTP/1.1 200 OK\r\nLOCATION: http://192.168.1.1:5000/rootDesc.xml\r\n\r\n".to_vec()
    }

    #[test]
    fn a_upnp_only_router_is_mapped_over_http_renewed_and_deleted() {
        let t0 = Instant::now();
        let (mut m, _) = started(t0);
        let ssdp_from = SocketAddr::from((GW, 1900));
        m.handle_response(t0, ssdp_from, &ssdp_answer()).unwrap();
        assert_eq!(m.report().answered, vec!["upnp"]);
        // PCP and NAT-PMP stay silent: at the next tick UPnP is asked.
        let out = m.handle_timeout(t0 + Duration::from_millis(250));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].via, Via::Http);
        assert_eq!(out[0].to, SocketAddr::from((GW, 5000)));
        assert!(out[0].bytes.starts_with(b"GET /rootDesc.xml HTTP/1.1\r\n"));
        let out = m.handle_http(t0, Some(&http_ok(DESCRIPTION))).unwrap();
        assert!(String::from_utf8_lossy(&out[0].bytes).contains("#GetExternalIPAddress"));
        let ext = "<NewExternalIPAddress>44.0.0.7</NewExternalIPAddress>";
        let out = m.handle_http(t0, Some(&http_ok(ext))).unwrap();
        let add = String::from_utf8_lossy(&out[0].bytes).into_owned();
        assert!(add.contains("#AddPortMapping"));
        assert!(add.contains("<NewInternalClient>192.168.1.2</NewInternalClient>"));
        assert!(add.contains(&format!("<NewExternalPort>{PORT_IN}</NewExternalPort>")));
        assert!(m.handle_http(t0, Some(&http_ok(""))).unwrap().is_empty());
        let mapping = m.mapping().unwrap();
        assert_eq!(mapping.protocol, Protocol::Upnp);
        assert_eq!(mapping.external, SocketAddrV4::new(EXT, PORT_IN));
        assert_eq!(m.report().state, "mapped");
        // Renewed at half the lease, one request at a time.
        let half = t0 + Duration::from_secs(3600);
        let renew = m.handle_timeout(half);
        assert_eq!(renew.len(), 1);
        assert!(String::from_utf8_lossy(&renew[0].bytes).contains("#AddPortMapping"));
        assert!(m
            .handle_timeout(half + Duration::from_millis(250))
            .is_empty());
        m.handle_http(half, Some(&http_ok(""))).unwrap();
        assert_eq!(m.poll_timeout(), Some(half + Duration::from_secs(3600)));
        let del = m.stop();
        assert_eq!(del.len(), 1);
        assert!(String::from_utf8_lossy(&del[0].bytes).contains("#DeletePortMapping"));
    }

    #[test]
    fn upnp_garbage_or_silence_gives_up_and_foreign_ssdp_answers_are_dropped() {
        let t0 = Instant::now();
        let (mut m, _) = started(t0);
        let stranger = SocketAddr::from((Ipv4Addr::new(192, 168, 1, 66), 1900));
        assert_eq!(
            m.handle_response(t0, stranger, &ssdp_answer()),
            Err(Bad::NotFromGateway)
        );
        let pointing_away = b"HTTP/1.1 200 OK\r\nLOCATION: http://192.168.1.66:5000/d.xml\r\n\r\n";
        assert!(m
            .handle_response(t0, SocketAddr::from((GW, 1900)), pointing_away)
            .is_err());
        m.handle_response(t0, SocketAddr::from((GW, 1900)), &ssdp_answer())
            .unwrap();
        m.handle_timeout(t0 + Duration::from_millis(250));
        assert!(m.handle_http(t0, Some(b"\x00garbage")).is_err());
        assert_eq!(m.report().state, "refused");
        assert!(m.mapping().is_none());
        // Next time, no answer at all: given up as well.
        let later = t0 + PROBE_AGAIN;
        m.handle_timeout(later);
        m.handle_timeout(later + Duration::from_millis(250));
        assert!(m.handle_http(later, None).unwrap().is_empty());
        assert_eq!(m.report().state, "refused");
    }
}
