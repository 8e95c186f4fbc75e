//! What the tasks hand each other: the packet path's way to the coordinator while registered,
//! and the path finder's inputs.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;

use a2a_proto::control::ClientMsg;
use a2a_proto::NodeKey;
use tokio::sync::{mpsc, oneshot};

use crate::core::path::Route;
use crate::core::peers::Via;

/// What the packet path and the commands hand to the control connection.
#[derive(Debug)]
pub enum ControlOut {
    /// Relay data for a relay id, over TCP (UDP to the relay does not work).
    Relay(u32, Vec<u8>),
    /// Ask the coordinator to make this peer probe us.
    Punch(NodeKey),
    /// A control message from a command (invite, kick, rotate).
    Msg(ClientMsg),
    /// This node moved to a rotated network: end the connection and register anew.
    Moved,
}

/// The way to the coordinator's relay while registered.
pub struct RelayLink {
    /// The coordinator's UDP address (relay data and binds).
    pub coordinator: SocketAddr,
    /// True while UDP binds are answered: relay over UDP; else over the control connection.
    pub udp_ok: AtomicBool,
    pub control: mpsc::Sender<ControlOut>,
}

/// The answer to a user's ping: round-trip time and the path it took.
#[derive(Debug, Clone, Copy)]
pub struct UserPong {
    pub rtt: std::time::Duration,
    pub route: Route,
}

/// The path finder's inputs.
pub enum PathEvent {
    /// A disco datagram and how it came.
    Disco(Vec<u8>, Via),
    /// Authenticated WireGuard data came from this peer at an address that is not its path.
    SeenAt(NodeKey, SocketAddr),
    /// The coordinator says this peer is probing us.
    Punch(NodeKey),
    /// This peer is new or published new candidates.
    Candidates(NodeKey),
    /// `a2actl ping`.
    UserPing(NodeKey, oneshot::Sender<UserPong>),
}
