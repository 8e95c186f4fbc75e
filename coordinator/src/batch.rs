//! Which relayed datagrams leave in one UDP GSO send. Free of I/O.
//!
//! A receive with UDP_GRO returns one buffer of datagrams from one sender, all `segment` bytes
//! but the last. The relay rewrites each one's header in place (same length) and routes it; a
//! run of consecutive datagrams routed to the same address is already laid out as a GSO send
//! wants it (equal segments, the last may be shorter), so it leaves from the receive buffer in
//! one `sendmsg`, copied by nothing but the kernel. [`Batcher`] decides where runs end:
//! another destination, a datagram not forwarded over UDP (queued on a control connection,
//! dropped, a probe), a short datagram (it must be the last of its run), the segment or byte
//! limit of one send.

use std::net::SocketAddr;
use std::ops::Range;

pub use a2a_udpbatch::{MAX_GSO_BYTES, MAX_SEGMENTS};

/// Consecutive datagrams of one buffer for one address: one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub to: SocketAddr,
    /// Where in the buffer.
    pub bytes: Range<usize>,
    /// The size of each datagram but the last, which may be shorter.
    pub segment: usize,
}

impl Run {
    /// How many datagrams it carries.
    pub fn count(&self) -> usize {
        self.bytes.len().div_ceil(self.segment.max(1))
    }
}

/// Groups the datagrams of a buffer, pushed in order, into runs.
///
/// Call [`Batcher::push`] for each datagram forwarded over UDP and [`Batcher::cut`] for each
/// that is not (or at the end of the buffer); each returns the run to send now, if one ended.
#[derive(Debug)]
pub struct Batcher {
    cur: Option<Run>,
    /// 1 when GSO is off: every datagram is a run of its own.
    max_segments: usize,
    /// The current run ended with a short datagram: nothing may join it.
    closed: bool,
}

impl Batcher {
    /// `max_segments`: [`MAX_SEGMENTS`] with UDP GSO, 1 without.
    pub fn new(max_segments: usize) -> Self {
        Batcher {
            cur: None,
            max_segments: max_segments.clamp(1, MAX_SEGMENTS),
            closed: false,
        }
    }

    /// Sets the limit for the runs to come (GSO found refused: 1).
    pub fn set_max_segments(&mut self, n: usize) {
        self.max_segments = n.clamp(1, MAX_SEGMENTS);
    }

    /// The datagram at `bytes` of the buffer goes to `to`.
    pub fn push(&mut self, to: SocketAddr, bytes: Range<usize>) -> Option<Run> {
        let len = bytes.len();
        if let Some(run) = self.cur.as_mut() {
            let joins = !self.closed
                && run.to == to
                && run.bytes.end == bytes.start
                && len <= run.segment
                && run.count() < self.max_segments
                && run.bytes.len() + len <= MAX_GSO_BYTES;
            if joins {
                run.bytes.end = bytes.end;
                self.closed = len < run.segment;
                return None;
            }
        }
        let done = self.cur.replace(Run {
            to,
            bytes,
            segment: len,
        });
        self.closed = false;
        done
    }

    /// A datagram not forwarded over UDP, or the end of the buffer: the current run ends.
    pub fn cut(&mut self) -> Option<Run> {
        self.closed = false;
        self.cur.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    /// Feeds datagrams of `sizes` laid end to end, each to the port given (0: not forwarded).
    fn runs(max: usize, datagrams: &[(u16, usize)]) -> Vec<Run> {
        let mut b = Batcher::new(max);
        let mut out = Vec::new();
        let mut at = 0;
        for &(port, len) in datagrams {
            let r = if port == 0 {
                b.cut()
            } else {
                b.push(a(port), at..at + len)
            };
            out.extend(r);
            at += len;
        }
        out.extend(b.cut());
        out
    }

    fn run(port: u16, bytes: Range<usize>, segment: usize) -> Run {
        Run {
            to: a(port),
            bytes,
            segment,
        }
    }

    #[test]
    fn one_destination_is_one_send_with_a_short_last_datagram() {
        let got = runs(64, &[(1, 100), (1, 100), (1, 100), (1, 40)]);
        assert_eq!(got, vec![run(1, 0..340, 100)]);
        assert_eq!(got[0].count(), 4);
    }

    #[test]
    fn runs_end_at_another_destination_or_a_datagram_not_forwarded() {
        let got = runs(
            64,
            &[(1, 100), (1, 100), (2, 100), (0, 100), (2, 100), (2, 100)],
        );
        assert_eq!(
            got,
            vec![
                run(1, 0..200, 100),
                run(2, 200..300, 100),
                run(2, 400..600, 100)
            ]
        );
    }

    #[test]
    fn nothing_joins_after_a_short_or_longer_datagram() {
        let got = runs(
            64,
            &[(1, 100), (1, 50), (1, 50), (1, 50), (1, 100), (1, 120)],
        );
        assert_eq!(
            got,
            vec![
                run(1, 0..150, 100),
                run(1, 150..250, 50),
                run(1, 250..350, 100),
                run(1, 350..470, 120)
            ]
        );
    }

    #[test]
    fn segment_and_byte_limits_split_runs() {
        let got = runs(2, &[(1, 100); 5]);
        assert_eq!(
            got,
            vec![
                run(1, 0..200, 100),
                run(1, 200..400, 100),
                run(1, 400..500, 100)
            ]
        );
        // 1400-byte datagrams: 46 fit in 65 000 bytes.
        let got = runs(64, &[(1, 1400); 50]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].count(), 46);
        assert_eq!(got[1].count(), 4);
    }

    #[test]
    fn without_gso_every_datagram_is_its_own_send() {
        let got = runs(1, &[(1, 100); 3]);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|r| r.count() == 1));
    }
}
