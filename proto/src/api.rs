//! The local API between `a2actl` and `a2ad`: one JSON request line, one JSON response line,
//! over a Unix socket.

use serde::{Deserialize, Serialize};

/// Largest request or response line accepted.
pub const MAX_API_LINE: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ApiRequest {
    Up { token: String, name: Option<String> },
    Down,
    Status,
    Ip,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ApiResponse {
    Up { ip: String, name: String },
    Down { was_up: bool },
    Status { status: Status },
    Ip { ip: String },
    Error { message: String },
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfStatus {
    pub name: String,
    pub ip: String,
    pub public_key: String,
    /// Whether the coordinator currently has this node registered.
    #[serde(default)]
    pub registered: bool,
    #[serde(default)]
    pub interface: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub ip: String,
    pub public_key: String,
    /// `direct`, `relay` or `none`.
    pub path: String,
    pub endpoint: Option<String>,
    pub last_handshake_s: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}
