//! WireGuard's timers (rekey, keepalive, handshake retries), driven for every peer on a tick,
//! and the second of the handshake limits. boringtun reads `Instant::now()` itself, so what
//! these timers do follows the real clock, not tokio's (a paused test clock does not move them).

use std::sync::Arc;
use std::time::Duration;

use a2a_proto::udp::RELAY_HEADER_LEN;

use super::{DataPlane, BUF_LEN};
use crate::core::wg::{action, Action};
use crate::io::Platform;

/// How often WireGuard timers are driven.
const TIMER_TICK: Duration = Duration::from_millis(250);

impl<P: Platform> DataPlane<P> {
    pub async fn timers(self: Arc<Self>) {
        let mut out = vec![0u8; BUF_LEN];
        let mut tick = tokio::time::interval(TIMER_TICK);
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            ticks += 1;
            if ticks.is_multiple_of(4) {
                self.peers.reset_handshake_limits();
            }
            for peer in self.peers.all() {
                let act = {
                    let mut t = peer.tunn();
                    let start = out[RELAY_HEADER_LEN..].as_ptr();
                    action(start, t.update_timers(&mut out[RELAY_HEADER_LEN..]))
                };
                if let Action::SendToNetwork(r) = act {
                    self.send_to_peer(&peer, &mut out, r.len()).await;
                }
            }
        }
    }
}
