//! In-memory fakes of the I/O contracts, for fast tests without root or sockets.
//!
//! - [`tun::ChannelTun`]: a TUN device made of two queues; the test injects and receives
//!   packets through its [`TunHandle`].

pub mod tun;

pub use tun::{ChannelTun, TunHandle};
