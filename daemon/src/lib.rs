//! a2ad, the a2a node daemon, as a library in four layers; a layer never imports one above it.
//!
//! 1. [`core`]: I/O-free decisions that take `now` (path selection, the peer table and
//!    WireGuard routing, the control protocol, membership, counters).
//! 2. [`io`]: the narrow I/O contracts (UDP transport, TUN device, underlay, control stream),
//!    their real implementations (tokio sockets with GSO/GRO, tun-rs, netlink, the state
//!    directory) and in-memory fakes.
//! 3. [`tasks`]: the async drivers of the core over the contracts (packet loops, path finder,
//!    prober, control client).
//! 4. [`node`]: the daemon (session, commands, local API).
//!
//! `main.rs` is the `a2ad` binary: arguments, runtime, signals.

pub mod core;
pub mod io;
pub mod node;
pub mod tasks;
