//! The coordinator as a library: the I/O-free registry and relay table, and the socket loops
//! that drive them. The `a2a-coordinator` binary is a thin command line over [`server`]; tests
//! build other binaries over it (a coordinator with a forging hook, for instance).

pub mod limits;
pub mod registry;
pub mod relay;
pub mod server;
