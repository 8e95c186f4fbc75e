//! In-memory fakes of the I/O contracts, for fast tests without root or sockets.
//!
//! - [`tun::ChannelTun`]: a TUN device made of two queues; the test injects and receives
//!   packets through its [`TunHandle`].
//! - [`net::FakeNet`]: a switched network of hosts, UDP sockets and byte streams, with NAT
//!   routers and impairments.

pub mod net;
pub mod tun;

pub use net::{FakeConnector, FakeNet, FakeUdp, Host};
pub use tun::{ChannelTun, TunHandle};
