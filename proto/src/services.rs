//! Services a node advertises to the other members, and the agent cards of its A2A agents.
//!
//! What a2ad serves to members on [`SERVICES_PORT`] (over the overlay, never through the
//! coordinator): a [`ServiceList`] as JSON. Everything here is I/O-free: validation of what a
//! user adds, the bounds a list read from a peer must respect, and the reading of an A2A agent
//! card into the few fields published ([`Card`]).

use serde::{Deserialize, Serialize};

/// TCP port (and UDP port, for the "changed" datagram) on a node's overlay addresses where its
/// a2ad serves its service list to members.
pub const SERVICES_PORT: u16 = 4747;
/// Services one node may advertise.
pub const MAX_SERVICES: usize = 64;
/// Largest service list (the HTTP response, headers included) read from a peer; a larger one
/// is refused whole.
pub const MAX_LIST_BYTES: usize = 256 * 1024;
/// Largest agent card read from a local agent.
pub const MAX_CARD_BYTES: usize = 64 * 1024;
/// Bounds of what is published from a card: longer text is cut, more skills or tags dropped.
pub const MAX_CARD_NAME: usize = 128;
pub const MAX_CARD_DESCRIPTION: usize = 512;
pub const MAX_SKILLS: usize = 16;
pub const MAX_SKILL_TEXT: usize = 64;
pub const MAX_TAGS: usize = 8;
/// Longest endpoint path (`--path`).
pub const MAX_PATH: usize = 256;

/// What listens behind a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// An A2A agent: its card is read from `/.well-known/agent-card.json`.
    A2a,
    /// An MCP server: its endpoint path is published.
    Mcp,
    Http,
    Tcp,
}

impl Proto {
    pub fn parse(text: &str) -> Result<Proto, String> {
        match text {
            "a2a" => Ok(Proto::A2a),
            "mcp" => Ok(Proto::Mcp),
            "http" => Ok(Proto::Http),
            "tcp" => Ok(Proto::Tcp),
            _ => Err(format!("--proto {text:?}: give one of a2a, mcp, http, tcp")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Proto::A2a => "a2a",
            Proto::Mcp => "mcp",
            Proto::Http => "http",
            Proto::Tcp => "tcp",
        }
    }
}

/// A service as the user added it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub port: u16,
    pub proto: Proto,
    /// The endpoint path (`/mcp`, `/rpc`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl ServiceSpec {
    /// Checks a service: its name is a DNS label (as node names are), its port 1 to 65535, its
    /// path absolute, short and printable. The error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        crate::record::validate_name(&self.name).map_err(|e| format!("service {e}"))?;
        if self.port == 0 {
            return Err("--port 0: give the port the service listens on, 1 to 65535".into());
        }
        if let Some(p) = &self.path {
            if !p.starts_with('/') || p.len() > MAX_PATH || !p.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(format!(
                    "--path {p:?}: give an absolute path (starting with '/') of at most \
                     {MAX_PATH} printable ASCII characters"
                ));
            }
        }
        Ok(())
    }
}

/// One skill of an agent card, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skill {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// What is published of an A2A agent card: name, description and skills.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Card {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub skills: Vec<Skill>,
}

/// One advertised service: the spec and, for an A2A agent whose card was read, the card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertised {
    #[serde(flatten)]
    pub spec: ServiceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<Card>,
}

/// What a node serves to members: its services and a version that changes whenever they do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceList {
    pub version: u64,
    pub services: Vec<Advertised>,
}

/// Why a peer's list was refused (each is a daemon counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListRefusal {
    /// More than [`MAX_LIST_BYTES`].
    Oversized,
    /// Not HTTP 200 with a JSON list, or an entry out of bounds.
    Malformed,
}

/// Reads a peer's list from the body of its answer; every entry must be valid and within
/// bounds, else the whole list is refused.
pub fn parse_list(body: &[u8]) -> Result<ServiceList, ListRefusal> {
    if body.len() > MAX_LIST_BYTES {
        return Err(ListRefusal::Oversized);
    }
    let list: ServiceList = serde_json::from_slice(body).map_err(|_| ListRefusal::Malformed)?;
    if list.services.len() > MAX_SERVICES {
        return Err(ListRefusal::Oversized);
    }
    let mut names = std::collections::HashSet::new();
    for s in &list.services {
        if s.spec.validate().is_err() || !names.insert(s.spec.name.as_str()) {
            return Err(ListRefusal::Malformed);
        }
        if let Some(c) = &s.card {
            if !card_within_bounds(c) {
                return Err(ListRefusal::Malformed);
            }
        }
    }
    Ok(list)
}

fn card_within_bounds(c: &Card) -> bool {
    c.name.chars().count() <= MAX_CARD_NAME
        && c.description.chars().count() <= MAX_CARD_DESCRIPTION
        && c.skills.len() <= MAX_SKILLS
        && c.skills.iter().all(|s| {
            [&s.id, &s.name]
                .iter()
                .all(|t| t.chars().count() <= MAX_SKILL_TEXT)
                && s.tags.len() <= MAX_TAGS
                && s.tags.iter().all(|t| t.chars().count() <= MAX_SKILL_TEXT)
        })
}

/// Why an agent card was not published (each is a daemon counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardRefusal {
    /// More than [`MAX_CARD_BYTES`].
    Oversized,
    /// Not JSON, or JSON without a string `name`.
    Malformed,
}

fn cut(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// Reads an A2A agent card (`/.well-known/agent-card.json`): its `name` (required),
/// `description` and `skills` (each with a string `id`; `name` and `tags` optional). Text
/// beyond the bounds is cut and skills or tags beyond them dropped, so a large card is
/// published in part; other fields are not read.
pub fn parse_card(body: &[u8]) -> Result<Card, CardRefusal> {
    if body.len() > MAX_CARD_BYTES {
        return Err(CardRefusal::Oversized);
    }
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| CardRefusal::Malformed)?;
    let name = v
        .get("name")
        .and_then(|n| n.as_str())
        .filter(|n| !n.trim().is_empty())
        .ok_or(CardRefusal::Malformed)?;
    let text = |v: &serde_json::Value, key: &str| {
        v.get(key)
            .and_then(|t| t.as_str())
            .map(|t| cut(t, MAX_SKILL_TEXT))
    };
    let skills = v
        .get("skills")
        .and_then(|s| s.as_array())
        .map(|skills| {
            skills
                .iter()
                .filter_map(|s| {
                    let id = text(s, "id").filter(|id| !id.is_empty())?;
                    Some(Skill {
                        id,
                        name: text(s, "name").unwrap_or_default(),
                        tags: s
                            .get("tags")
                            .and_then(|t| t.as_array())
                            .map(|tags| {
                                tags.iter()
                                    .filter_map(|t| t.as_str())
                                    .map(|t| cut(t, MAX_SKILL_TEXT))
                                    .take(MAX_TAGS)
                                    .collect()
                            })
                            .unwrap_or_default(),
                    })
                })
                .take(MAX_SKILLS)
                .collect()
        })
        .unwrap_or_default();
    Ok(Card {
        name: cut(name, MAX_CARD_NAME),
        description: v
            .get("description")
            .and_then(|d| d.as_str())
            .map(|d| cut(d, MAX_CARD_DESCRIPTION))
            .unwrap_or_default(),
        skills,
    })
}

/// The body of an HTTP/1.x response read whole (the connection closed at its end): `None`
/// unless the status is 200 and the headers end; a `Content-Length` cuts the body to it.
pub fn http_body(response: &[u8]) -> Option<&[u8]> {
    let end = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&response[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?;
    let mut parts = status.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") || parts.next()? != "200" {
        return None;
    }
    let body = &response[end + 4..];
    for line in lines {
        let (k, v) = line.split_once(':')?;
        if k.trim().eq_ignore_ascii_case("transfer-encoding")
            && !v.trim().eq_ignore_ascii_case("identity")
        {
            // Chunked bodies are not read: requests are HTTP/1.0, which servers do not chunk.
            return None;
        }
        if k.trim().eq_ignore_ascii_case("content-length") {
            let n: usize = v.trim().parse().ok()?;
            return body.get(..n);
        }
    }
    Some(body)
}

/// The "changed" datagram a node sends to each member (UDP [`SERVICES_PORT`] on the member's
/// overlay address) when its list changes: magic and the new version.
pub const CHANGED_MAGIC: &[u8; 6] = b"a2asv1";

pub fn changed_datagram(version: u64) -> [u8; 14] {
    let mut d = [0u8; 14];
    d[..6].copy_from_slice(CHANGED_MAGIC);
    d[6..].copy_from_slice(&version.to_be_bytes());
    d
}

/// The version in a "changed" datagram, or `None` when it is not one.
pub fn parse_changed(d: &[u8]) -> Option<u64> {
    if d.len() != 14 || &d[..6] != CHANGED_MAGIC {
        return None;
    }
    Some(u64::from_be_bytes(d[6..].try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, port: u16) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            port,
            proto: Proto::Http,
            path: None,
        }
    }

    #[test]
    fn specs_are_validated() {
        assert!(spec("web", 80).validate().is_ok());
        assert!(spec("Web", 80).validate().is_err());
        assert!(spec("-x", 80).validate().is_err());
        assert!(spec(&"a".repeat(64), 80).validate().is_err());
        assert!(spec("web", 0)
            .validate()
            .unwrap_err()
            .contains("1 to 65535"));
        let mut s = spec("web", 80);
        s.path = Some("mcp".into());
        assert!(s.validate().is_err());
        s.path = Some("/mcp".into());
        assert!(s.validate().is_ok());
        assert!(Proto::parse("smtp").is_err());
        assert_eq!(Proto::parse("a2a"), Ok(Proto::A2a));
    }

    #[test]
    fn lists_out_of_bounds_are_refused_whole() {
        let good = ServiceList {
            version: 3,
            services: vec![Advertised {
                spec: spec("web", 80),
                card: None,
            }],
        };
        let bytes = serde_json::to_vec(&good).unwrap();
        assert_eq!(parse_list(&bytes), Ok(good));
        assert_eq!(parse_list(b"not json"), Err(ListRefusal::Malformed));
        assert_eq!(
            parse_list(&vec![b' '; MAX_LIST_BYTES + 1]),
            Err(ListRefusal::Oversized)
        );
        let many = ServiceList {
            version: 1,
            services: (0..=MAX_SERVICES)
                .map(|i| Advertised {
                    spec: spec(&format!("s{i}"), 80),
                    card: None,
                })
                .collect(),
        };
        assert_eq!(
            parse_list(&serde_json::to_vec(&many).unwrap()),
            Err(ListRefusal::Oversized)
        );
        let bad = br#"{"version":1,"services":[{"name":"BAD","port":80,"proto":"http"}]}"#;
        assert_eq!(parse_list(bad), Err(ListRefusal::Malformed));
        let dup = br#"{"version":1,"services":[{"name":"a","port":80,"proto":"http"},{"name":"a","port":81,"proto":"tcp"}]}"#;
        assert_eq!(parse_list(dup), Err(ListRefusal::Malformed));
        let long_card = format!(
            r#"{{"version":1,"services":[{{"name":"a","port":80,"proto":"a2a","card":{{"name":"{}"}}}}]}}"#,
            "x".repeat(MAX_CARD_NAME + 1)
        );
        assert_eq!(
            parse_list(long_card.as_bytes()),
            Err(ListRefusal::Malformed)
        );
    }

    #[test]
    fn cards_are_read_within_bounds() {
        let card = br#"{"name":"Planner","description":"plans","version":"1.0",
            "skills":[{"id":"plan","name":"Plan a trip","tags":["travel","plan"]},
                      {"name":"no id"},{"id":"x"}]}"#;
        let c = parse_card(card).unwrap();
        assert_eq!(c.name, "Planner");
        assert_eq!(c.skills.len(), 2);
        assert_eq!(c.skills[0].tags, vec!["travel", "plan"]);
        assert_eq!(parse_card(b"<html>"), Err(CardRefusal::Malformed));
        assert_eq!(parse_card(b"{\"skills\":[]}"), Err(CardRefusal::Malformed));
        assert_eq!(
            parse_card(&vec![b' '; MAX_CARD_BYTES + 1]),
            Err(CardRefusal::Oversized)
        );
        let skills: Vec<String> = (0..40)
            .map(|i| {
                format!(
                    r#"{{"id":"s{i}","tags":[{}]}}"#,
                    vec!["\"t\""; 20].join(",")
                )
            })
            .collect();
        let big = format!(
            r#"{{"name":"{}","description":"{}","skills":[{}]}}"#,
            "n".repeat(500),
            "d".repeat(5000),
            skills.join(",")
        );
        let c = parse_card(big.as_bytes()).unwrap();
        assert!(card_within_bounds(&c));
        assert_eq!(c.skills.len(), MAX_SKILLS);
    }

    #[test]
    fn http_bodies_need_200() {
        assert_eq!(
            http_body(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}xx"),
            Some(&b"{}"[..])
        );
        assert_eq!(http_body(b"HTTP/1.1 200 OK\r\n\r\nabc"), Some(&b"abc"[..]));
        assert_eq!(http_body(b"HTTP/1.0 404 Not Found\r\n\r\n{}"), None);
        assert_eq!(http_body(b"HTTP/1.0 200 OK\r\n"), None);
        assert_eq!(
            http_body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}"),
            None
        );
        assert_eq!(
            http_body(b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\n{}"),
            None
        );
    }

    #[test]
    fn changed_datagrams_round_trip() {
        assert_eq!(parse_changed(&changed_datagram(42)), Some(42));
        assert_eq!(parse_changed(b"a2asv1"), None);
        assert_eq!(parse_changed(&[0; 14]), None);
    }
}
