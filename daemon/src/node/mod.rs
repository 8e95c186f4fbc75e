//! The daemon: one optional session (a membership at run time), the commands over it, the
//! local API socket, and what `a2ad` does from start to stop.

pub mod api;
pub mod commands;
pub mod metrics;
pub mod policy;
pub mod session;
pub mod ssh;
