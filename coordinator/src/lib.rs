//! The coordinator as a library: the I/O-free registry, control protocol (switchboard), relay
//! table and admission limits, and the socket loops that drive them. The `a2a-coordinator`
//! binary is a thin command line over [`server`]; tests build other binaries over it (a
//! coordinator with a forging hook, for instance) or serve it without sockets
//! ([`server::Server::serve_control`], [`server::Server::handle_datagram`]).

pub mod batch;
pub mod bridge;
pub mod channel;
pub mod cluster;
pub mod fanout;
pub mod histogram;
pub mod limits;
pub mod metrics;
pub mod nats;
pub mod registry;
pub mod relay;
pub mod server;
pub mod switchboard;
