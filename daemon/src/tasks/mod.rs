//! The tasks that drive the I/O-free core over the I/O contracts: the packet path
//! ([`dataplane`]), the path finder, the endpoint prober and the control client. They take the
//! clock from one place, [`now`], which follows tokio's clock, so tests can run them on a paused
//! clock (boringtun's own timers read the real clock; see [`dataplane::timers`]).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::core::control::Now;

pub mod control;
pub mod dataplane;
pub mod dns;
pub mod events;
pub mod members;
pub mod pathfinder;
pub mod policy;
pub mod portmap;
pub mod prober;
pub mod proxy;
pub mod services;

/// The tasks' clock: tokio's (paused in tests), as a std `Instant` for the core's types.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Now, for timers and for what is signed.
pub fn clock() -> Now {
    Now {
        at: now(),
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }
}

/// Aborts a task when dropped.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
