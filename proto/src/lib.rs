//! a2a-proto: what crosses a process boundary in a2a. Join tokens, keys and signed node records,
//! control-channel messages and their Noise framing, the UDP datagram demultiplexer and the local
//! API between `a2actl` and `a2ad`. Everything here except `noise_channel` and `api::read_line`
//! is free of I/O.

pub mod addr;
pub mod api;
pub mod cert;
pub mod cluster;
pub mod control;
pub mod disco;
pub mod invite;
pub mod keyfile;
pub mod keys;
pub mod membership;
pub mod noise_channel;
pub mod overlay;
pub mod policy;
pub mod process;
pub mod record;
pub mod scrape;
pub mod sealed;
pub mod services;
pub mod signed;
pub mod ssh;
pub mod sync;
pub mod time;
pub mod token;
pub mod udp;

pub use keys::{NetworkId, NetworkKey, NodeKey};
pub use membership::Credential;
pub use record::{NodeRecord, SignedRecord};
pub use token::{JoinToken, TokenError};
