//! Which encrypted datagrams go out together in one UDP GSO send. A GSO send carries datagrams
//! for one address back to back, all of one size except perhaps a shorter last one; the kernel
//! takes at most so many segments and so many bytes. No I/O: the transmit loop encrypts into
//! [`GsoBatch::spare`], says what it wrote with [`GsoBatch::push`], and sends [`GsoBatch::ready`]
//! when told to.

use std::net::SocketAddr;

/// Encrypted datagrams for one address, back to back in one buffer.
pub struct GsoBatch {
    buf: Vec<u8>,
    len: usize,
    count: usize,
    segment: usize,
    /// A shorter datagram ended the batch: nothing more may join.
    closed: bool,
    addr: SocketAddr,
    max_segments: usize,
    max_bytes: usize,
    /// Where a pushed datagram that waits for [`carry_over`](Self::carry_over) is, and its
    /// length (kept across [`clear`](Self::clear), which sending the earlier ones calls).
    pending: Option<(usize, usize)>,
}

/// What became of a pushed datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// It is in the batch.
    Joined,
    /// It is longer than the datagrams before it, which must go first: send [`GsoBatch::ready`]
    /// (those), then call [`GsoBatch::carry_over`], which makes it the start of the next batch.
    SendEarlierFirst,
}

/// The batch to send: `data` holds `count` datagrams of `segment` bytes (the last may be
/// shorter), all for `addr`.
#[derive(Debug, PartialEq, Eq)]
pub struct Ready<'a> {
    pub data: &'a [u8],
    pub segment: usize,
    pub count: usize,
    pub addr: SocketAddr,
}

impl GsoBatch {
    /// A batch of at most `max_segments` datagrams and `max_bytes` bytes; `slack` is room past
    /// `max_bytes` for the datagram being encrypted when the batch is nearly full.
    pub fn new(max_segments: usize, max_bytes: usize, slack: usize) -> Self {
        GsoBatch {
            buf: vec![0u8; max_bytes + slack],
            len: 0,
            count: 0,
            segment: 0,
            closed: false,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            max_segments: max_segments.max(1),
            max_bytes,
            pending: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Fewer segments from now on (the transport lost its GSO, say).
    pub fn set_max_segments(&mut self, n: usize) {
        self.max_segments = n.max(1);
    }

    /// Whether a datagram of up to `max_len` bytes for `addr` can join; when not, the caller
    /// sends [`ready`](Self::ready) and [`clear`](Self::clear)s first.
    pub fn fits(&self, addr: SocketAddr, max_len: usize) -> bool {
        self.count == 0
            || (self.addr == addr
                && !self.closed
                && self.count < self.max_segments
                && self.len + max_len <= self.max_bytes)
    }

    /// The free room after the batched datagrams, for the caller to encrypt the next one into.
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    /// The caller wrote a datagram for `addr` at `spare()[at..at + len]`.
    pub fn push(&mut self, addr: SocketAddr, at: usize, len: usize) -> Pushed {
        let pos = self.len;
        if at != 0 {
            self.buf.copy_within(pos + at..pos + at + len, pos);
        }
        if self.count == 0 {
            self.addr = addr;
            self.segment = len;
        } else if len > self.segment {
            // Kept past `len` until carry_over moves it to the front.
            self.pending = Some((pos, len));
            return Pushed::SendEarlierFirst;
        } else if len < self.segment {
            // A shorter datagram can only be the last of a GSO send.
            self.closed = true;
        }
        self.len = pos + len;
        self.count += 1;
        Pushed::Joined
    }

    /// After [`Pushed::SendEarlierFirst`] and sending the earlier datagrams: the longer one
    /// starts the next batch.
    pub fn carry_over(&mut self) {
        let Some((pos, len)) = self.pending.take() else {
            return;
        };
        let addr = self.addr;
        self.buf.copy_within(pos..pos + len, 0);
        self.clear();
        self.addr = addr;
        self.segment = len;
        self.len = len;
        self.count = 1;
    }

    /// The datagrams to send now (empty when there are none).
    pub fn ready(&self) -> Ready<'_> {
        Ready {
            data: &self.buf[..self.len],
            segment: self.segment,
            count: self.count,
            addr: self.addr,
        }
    }

    pub fn clear(&mut self) {
        self.len = 0;
        self.count = 0;
        self.segment = 0;
        self.closed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    /// Pushes a datagram of `len` bytes of `byte` for `addr`, written at offset `at` of spare.
    fn push(b: &mut GsoBatch, addr: SocketAddr, len: usize, byte: u8) -> Pushed {
        let at = 3;
        b.spare()[at..at + len].fill(byte);
        b.push(addr, at, len)
    }

    #[test]
    fn equal_datagrams_for_one_address_join_up_to_the_segment_limit() {
        let mut b = GsoBatch::new(3, 10_000, 2000);
        for i in 0..3 {
            assert!(b.fits(a(1), 100));
            assert_eq!(push(&mut b, a(1), 100, i), Pushed::Joined);
        }
        assert!(!b.fits(a(1), 100), "three segments at most");
        let r = b.ready();
        assert_eq!(
            (r.count, r.segment, r.data.len(), r.addr),
            (3, 100, 300, a(1))
        );
        assert!(r.data[..100].iter().all(|&x| x == 0));
        assert!(r.data[200..].iter().all(|&x| x == 2));
        b.clear();
        assert!(b.is_empty() && b.fits(a(2), 100));
    }

    #[test]
    fn another_address_or_too_many_bytes_does_not_fit() {
        let mut b = GsoBatch::new(64, 250, 2000);
        push(&mut b, a(1), 100, 1);
        assert!(!b.fits(a(2), 100), "one address per send");
        assert!(b.fits(a(1), 150));
        assert!(
            !b.fits(a(1), 151),
            "the byte limit counts the datagram to come"
        );
    }

    #[test]
    fn a_shorter_datagram_is_the_last_one() {
        let mut b = GsoBatch::new(64, 10_000, 2000);
        push(&mut b, a(1), 100, 1);
        assert_eq!(push(&mut b, a(1), 60, 2), Pushed::Joined);
        assert!(!b.fits(a(1), 60), "closed by the shorter one");
        let r = b.ready();
        assert_eq!((r.count, r.segment, r.data.len()), (2, 100, 160));
    }

    #[test]
    fn a_longer_datagram_sends_the_earlier_ones_first_and_starts_the_next_batch() {
        let mut b = GsoBatch::new(64, 10_000, 2000);
        push(&mut b, a(1), 60, 1);
        push(&mut b, a(1), 60, 2);
        assert_eq!(push(&mut b, a(1), 100, 3), Pushed::SendEarlierFirst);
        let r = b.ready();
        assert_eq!((r.count, r.segment, r.data.len()), (2, 60, 120));
        b.clear(); // as sending them does
        b.carry_over();
        let r = b.ready();
        assert_eq!((r.count, r.segment, r.data.len()), (1, 100, 100));
        assert!(r.data.iter().all(|&x| x == 3));
        assert_eq!(push(&mut b, a(1), 100, 4), Pushed::Joined);
        assert_eq!(b.ready().count, 2);
    }

    #[test]
    fn without_gso_every_datagram_is_a_batch_of_one() {
        let mut b = GsoBatch::new(64, 10_000, 2000);
        b.set_max_segments(1);
        push(&mut b, a(1), 100, 1);
        assert!(!b.fits(a(1), 100));
    }
}
