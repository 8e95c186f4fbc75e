//! The I/O-free core: decisions that take `now` and return what to do. Path selection, the
//! peer table and WireGuard routing, the control protocol, membership, the GSO batch, budgets
//! and counters. Nothing here opens a socket, reads a file or reads the clock.

pub mod batch;
pub mod control;
pub mod counters;
pub mod dns;
pub mod family;
pub mod limit;
pub mod membership;
pub mod netstack;
pub mod offline;
pub mod path;
pub mod peers;
pub mod policy;
pub mod portmap;
pub mod proxy;
pub mod refusal;
pub mod services;
pub mod ssh;
pub mod statements;
pub mod upnp;
pub mod wg;
