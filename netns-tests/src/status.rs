//! `a2actl status --json`, parsed and checked against its contract ([`Status`]).

use std::net::Ipv4Addr;

/// `a2actl status --json`, checked against the contract.
#[derive(Debug, Clone)]
pub struct Status {
    /// `self`; `None` when the node has not joined (null or absent).
    pub me: Option<SelfStatus>,
    pub peers: Vec<PeerStatus>,
    pub raw: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfStatus {
    pub name: String,
    pub ip: Ipv4Addr,
    pub public_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: String,
    pub ip: Ipv4Addr,
    pub public_key: String,
    pub path: String,
    pub endpoint: Option<String>,
    pub last_handshake_s: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// `unlisted` or `saved` when a2ad keeps a peer the coordinator does not list; `None` when
    /// it is listed.
    pub listing: Option<String>,
}

fn field<'a>(v: &'a serde_json::Value, key: &str) -> Result<&'a serde_json::Value, String> {
    v.get(key)
        .ok_or_else(|| format!("missing field {key:?} in {v}"))
}

fn str_field(v: &serde_json::Value, key: &str) -> Result<String, String> {
    field(v, key)?
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("field {key:?} is not a string in {v}"))
}

fn ip_field(v: &serde_json::Value, key: &str) -> Result<Ipv4Addr, String> {
    str_field(v, key)?
        .parse()
        .map_err(|e| format!("field {key:?} is not an IPv4 address ({e}) in {v}"))
}

fn u64_field(v: &serde_json::Value, key: &str) -> Result<u64, String> {
    field(v, key)?
        .as_u64()
        .ok_or_else(|| format!("field {key:?} is not an unsigned integer in {v}"))
}

impl Status {
    pub fn parse(json: &str) -> Result<Status, String> {
        let raw: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("status is not JSON ({e}): {json}"))?;
        let me = match raw.get("self") {
            None | Some(serde_json::Value::Null) => None,
            Some(s) => Some(SelfStatus {
                name: str_field(s, "name")?,
                ip: ip_field(s, "ip")?,
                public_key: str_field(s, "public_key")?,
            }),
        };
        let peers = field(&raw, "peers")?
            .as_array()
            .ok_or_else(|| format!("\"peers\" is not an array: {raw}"))?
            .iter()
            .map(|p| {
                let path = str_field(p, "path")?;
                if !matches!(path.as_str(), "direct" | "relay" | "none") {
                    return Err(format!("path {path:?} is not direct|relay|none in {p}"));
                }
                let endpoint = match field(p, "endpoint")? {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(s) => Some(s.clone()),
                    other => return Err(format!("endpoint {other} is not a string or null")),
                };
                let last_handshake_s = match field(p, "last_handshake_s")? {
                    serde_json::Value::Null => None,
                    v => Some(v.as_u64().ok_or_else(|| {
                        format!("last_handshake_s {v} is not an unsigned integer or null")
                    })?),
                };
                Ok(PeerStatus {
                    name: str_field(p, "name")?,
                    ip: ip_field(p, "ip")?,
                    public_key: str_field(p, "public_key")?,
                    path,
                    endpoint,
                    last_handshake_s,
                    rx_bytes: u64_field(p, "rx_bytes")?,
                    tx_bytes: u64_field(p, "tx_bytes")?,
                    listing: p
                        .get("listing")
                        .and_then(|v| v.as_str())
                        .map(str::to_string),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Status { me, peers, raw })
    }

    pub fn peer(&self, name: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsing_checks_the_contract() {
        let ok = r#"{"self": {"name": "a", "ip": "100.64.0.1", "public_key": "k"},
            "peers": [{"name": "b", "ip": "100.64.0.2", "public_key": "k2", "path": "direct",
            "endpoint": "10.1.0.3:51820", "last_handshake_s": null, "rx_bytes": 1,
            "tx_bytes": 2}]}"#;
        let st = Status::parse(ok).unwrap();
        assert_eq!(st.me.as_ref().unwrap().name, "a");
        assert_eq!(st.peer("b").unwrap().path, "direct");
        assert_eq!(st.peer("b").unwrap().last_handshake_s, None);

        let not_joined = r#"{"self": null, "peers": []}"#;
        assert!(Status::parse(not_joined).unwrap().me.is_none());

        for bad in [
            ok.replace("\"direct\"", "\"sideways\""),
            ok.replace("\"rx_bytes\": 1,", ""),
            ok.replace("100.64.0.2", "nope"),
            r#"{"self": null}"#.to_string(),
            "not json".to_string(),
        ] {
            assert!(Status::parse(&bad).is_err(), "{bad}");
        }
    }
}
