//! The coordinator's ends of an established control channel (frames of `u16 length |
//! ciphertext`, the wire format of `a2a_proto::noise_channel`), shaped for many idle
//! connections and for the TCP relay:
//!
//! - [`Reader`] reads ahead: [`READ_IDLE`] bytes at a time while frames come one by one, and
//!   [`READ_BUSY`] at a time once a read fills its buffer (the TCP relay's frames arrive many
//!   to a segment: one system call for dozens of them). Its buffers are given back once the
//!   bytes read are used up and the last read was short, so an idle connection holds at most
//!   a few kilobytes. It decrypts one byte into its plaintext buffer, so that relay data can
//!   leave as a UDP relay datagram from the same bytes, its 6-byte UDP header written over the
//!   5-byte frame header and the byte before it.
//! - [`Outbox`] is a connection's sending side, shared by every task that sends to it: a frame
//!   is encrypted straight into the pending bytes (from a UDP receive buffer or another
//!   connection's read buffer: no copy beyond that one and the one into the socket), and the
//!   connection's writer task sends all that is pending in one write (coalesced). Bounded in
//!   bytes; idle, it holds nothing.

use std::io;
use std::sync::{Arc, Mutex};

use a2a_proto::control::{ClientMsg, ServerMsg};
use a2a_proto::noise_channel::{FrameError, MAX_FRAME, RELAY_FRAME};
use a2a_proto::sync::lock;
use a2a_proto::udp::RELAY_HEADER_LEN;
use snow::StatelessTransportState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// Buffer capacity kept between frames; a larger buffer is given back (a relayed WireGuard
/// datagram, at most ~1.5 KB, always fits).
pub const KEEP: usize = 2048;
/// Pending bytes beyond which relay data for a connection is dropped (queueing more only adds
/// delay to the relayed flow).
pub const RELAY_PENDING: usize = 512 * 1024;
/// Pending bytes beyond which a connection is too slow for its control messages and is closed.
pub const MSG_PENDING: usize = 4 * 1024 * 1024;
const TAG_LEN: usize = 16;
/// Bytes read at a time while frames come one by one (and what an idle connection's read
/// buffer holds): a control message or a relayed datagram fits.
pub const READ_IDLE: usize = 2048;
/// Bytes read at a time once a read filled the buffer: frames are coming back to back.
pub const READ_BUSY: usize = 64 * 1024;
/// Bytes before the relay frame's plaintext in [`Reader`]'s buffer.
const LEAD: usize = RELAY_HEADER_LEN - 5;

/// One frame read by [`Reader::next`].
#[derive(Debug, PartialEq)]
pub enum Frame<'a> {
    Msg(ClientMsg),
    /// Relay data for relay id `dst`: `datagram` is laid out as a UDP relay datagram (its first
    /// [`RELAY_HEADER_LEN`] bytes free for a header, the payload after them).
    Relay {
        dst: u32,
        datagram: &'a mut [u8],
    },
}

/// The reading end: frames read ahead and decrypted into small, reused buffers.
pub struct Reader<R> {
    io: R,
    state: Arc<StatelessTransportState>,
    nonce: u64,
    /// Bytes read and not yet used: `input[used..]`.
    input: Vec<u8>,
    used: usize,
    /// The last read filled its buffer: more is likely waiting, read [`READ_BUSY`] next.
    busy: bool,
    plain: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(io: R, state: Arc<StatelessTransportState>) -> Self {
        Reader {
            io,
            state,
            nonce: 0,
            input: Vec::new(),
            used: 0,
            busy: false,
            plain: Vec::new(),
        }
    }

    /// The next frame; an error ends the channel (a closed stream, or a frame that does not
    /// decrypt or parse).
    pub async fn next(&mut self) -> Result<Frame<'_>, FrameError> {
        if self.plain.capacity() > KEEP {
            self.plain = Vec::new();
        }
        let (start, len) = loop {
            let ahead = &self.input[self.used..];
            let need = match ahead {
                [a, b, rest @ ..] => {
                    let len = u16::from_be_bytes([*a, *b]) as usize;
                    if rest.len() >= len {
                        break (self.used + 2, len);
                    }
                    2 + len
                }
                _ => 2,
            };
            self.read_more(need).await?;
        };
        self.used = start + len;
        self.plain.resize(LEAD + len, 0);
        let n = self
            .state
            .read_message(
                self.nonce,
                &self.input[start..start + len],
                &mut self.plain[LEAD..],
            )
            .map_err(|e| FrameError::Malformed(format!("noise: {e}")))?;
        self.nonce += 1;
        parse(&mut self.plain[..LEAD + n])
    }

    /// Reads until `need` bytes are ahead: what is left of the used bytes moves to the front
    /// (part of one frame at most), and the buffer is sized for the read: small when idle,
    /// large when busy, given back when it is used up after a short read.
    async fn read_more(&mut self, need: usize) -> Result<(), FrameError> {
        self.input.drain(..self.used);
        self.used = 0;
        if self.input.is_empty() && !self.busy && self.input.capacity() > READ_IDLE {
            self.input = Vec::new();
        }
        while self.input.len() < need {
            let size = if self.busy { READ_BUSY } else { READ_IDLE };
            let want = size.max(need);
            if self.input.capacity() < want {
                self.input.reserve_exact(want - self.input.len());
            }
            let room = self.input.capacity() - self.input.len();
            let n = self.io.read_buf(&mut self.input).await?;
            if n == 0 {
                return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            self.busy = n == room;
        }
        Ok(())
    }

    /// Hands the read half back (to read from elsewhere, for instance).
    pub fn into_inner(self) -> R {
        self.io
    }
}

/// Parses decrypted bytes `buf` (`LEAD` bytes, then the frame's plaintext).
fn parse(buf: &mut [u8]) -> Result<Frame<'_>, FrameError> {
    match &buf[LEAD..] {
        [RELAY_FRAME, a, b, c, d, payload @ ..] if !payload.is_empty() => {
            let dst = u32::from_be_bytes([*a, *b, *c, *d]);
            Ok(Frame::Relay { dst, datagram: buf })
        }
        [RELAY_FRAME, ..] => Err(FrameError::Malformed("truncated relay frame".into())),
        plain => serde_json::from_slice(plain)
            .map(Frame::Msg)
            .map_err(|e| FrameError::Malformed(format!("bad message: {e}"))),
    }
}

/// Makes relay datagram `datagram` (a UDP relay datagram's layout: a [`RELAY_HEADER_LEN`]-byte
/// header, then the payload) the plaintext of a relay frame from `src`, in place, and returns
/// it.
pub fn relay_frame(datagram: &mut [u8], src: u32) -> &[u8] {
    datagram[LEAD] = RELAY_FRAME;
    datagram[LEAD + 1..RELAY_HEADER_LEN].copy_from_slice(&src.to_be_bytes());
    &datagram[LEAD..]
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// More is pending than the limit for this kind of frame: the reader is too slow.
    #[error("the connection's queue is full")]
    Full,
    /// The connection is closing or its writer failed.
    #[error("the connection is closed")]
    Closed,
    /// Longer than a frame can carry (or it does not encrypt).
    #[error("too large for one frame")]
    TooLarge,
}

struct Pending {
    nonce: u64,
    /// Frames ready for the socket.
    bytes: Vec<u8>,
    closed: bool,
}

/// A connection's sending side (see the module's notes); its writer task is [`Outbox::drive`].
pub struct Outbox {
    state: Arc<StatelessTransportState>,
    pending: Mutex<Pending>,
    wake: Notify,
}

impl Outbox {
    pub fn new(state: Arc<StatelessTransportState>) -> Arc<Self> {
        Arc::new(Outbox {
            state,
            pending: Mutex::new(Pending {
                nonce: 0,
                bytes: Vec::new(),
                closed: false,
            }),
            wake: Notify::new(),
        })
    }

    /// Queues a control message ([`MSG_PENDING`] bytes at most pending); returns the bytes
    /// of its frame.
    pub fn send_msg(&self, msg: &ServerMsg) -> Result<usize, Refused> {
        let plain = serde_json::to_vec(msg).map_err(|_| Refused::TooLarge)?;
        self.push(&plain, MSG_PENDING)?;
        Ok(2 + plain.len() + TAG_LEN)
    }

    /// Queues relay data, `plain` as [`relay_frame`] made it ([`RELAY_PENDING`] bytes at most
    /// pending).
    pub fn send_relay(&self, plain: &[u8]) -> Result<(), Refused> {
        self.push(plain, RELAY_PENDING)
    }

    fn push(&self, plain: &[u8], limit: usize) -> Result<(), Refused> {
        if plain.len() + TAG_LEN > MAX_FRAME {
            return Err(Refused::TooLarge);
        }
        let mut p = lock(&self.pending);
        if p.closed {
            return Err(Refused::Closed);
        }
        if p.bytes.len() >= limit {
            return Err(Refused::Full);
        }
        let at = p.bytes.len();
        p.bytes.resize(at + 2 + plain.len() + TAG_LEN, 0);
        let nonce = p.nonce;
        let n = match self
            .state
            .write_message(nonce, plain, &mut p.bytes[at + 2..])
        {
            Ok(n) => n,
            Err(_) => {
                p.bytes.truncate(at);
                return Err(Refused::TooLarge);
            }
        };
        p.nonce += 1;
        p.bytes[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
        p.bytes.truncate(at + 2 + n);
        let first = at == 0;
        drop(p);
        if first {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Accepts nothing more; the writer sends what is pending, then shuts the stream down.
    pub fn close(&self) {
        lock(&self.pending).closed = true;
        self.wake.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.pending).closed
    }

    /// The writer task: sends what is pending, all of it in one write, until closed (then
    /// shuts `io` down) or a write fails (then closes). Idle, it gives its buffers back.
    pub async fn drive<W: AsyncWrite + Unpin>(self: Arc<Self>, mut io: W) -> io::Result<()> {
        let mut out = Vec::new();
        loop {
            let idle = {
                let mut p = lock(&self.pending);
                if p.bytes.is_empty() {
                    if p.closed {
                        break;
                    }
                    if p.bytes.capacity() > KEEP {
                        p.bytes = Vec::new();
                    }
                    true
                } else {
                    std::mem::swap(&mut p.bytes, &mut out);
                    false
                }
            };
            if idle {
                if out.capacity() > KEEP {
                    out = Vec::new();
                }
                // A permit stored by a push between the check and here wakes this at once.
                self.wake.notified().await;
                continue;
            }
            let sent = async {
                io.write_all(&out).await?;
                io.flush().await
            }
            .await;
            out.clear();
            if let Err(e) = sent {
                self.close();
                return Err(e);
            }
        }
        io.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use a2a_proto::noise_channel::{handshake_initiator, handshake_responder, Incoming};
    use a2a_proto::udp::{parse_relay_data, write_relay_header};
    use x25519_dalek::{PublicKey, StaticSecret};

    /// A node's proto channel and the coordinator's [`Reader`] and [`Outbox`] over one duplex
    /// stream.
    async fn pair() -> (
        a2a_proto::noise_channel::FrameReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
        a2a_proto::noise_channel::FrameWriter<tokio::io::WriteHalf<tokio::io::DuplexStream>>,
        Reader<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
        Arc<Outbox>,
    ) {
        let server = StaticSecret::from([1; 32]);
        let server_pub = PublicKey::from(&server).to_bytes();
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let hub = tokio::spawn(async move {
            let e = handshake_responder(&mut b, &server.to_bytes())
                .await
                .unwrap();
            (e, b)
        });
        let node = handshake_initiator(&mut a, &[2; 32], &server_pub)
            .await
            .unwrap();
        let (e, b) = hub.await.unwrap();
        let (nr, nw) = tokio::io::split(a);
        let (node_rx, node_tx) = node.split(nr, nw);
        let (br, bw) = tokio::io::split(b);
        let state = Arc::new(e.state);
        let outbox = Outbox::new(state.clone());
        tokio::spawn(outbox.clone().drive(bw));
        (node_rx, node_tx, Reader::new(br, state), outbox)
    }

    #[tokio::test]
    async fn frames_read_into_small_buffers_and_relay_data_reads_as_a_datagram() {
        let (_rx, mut tx, mut reader, _out) = pair().await;
        tx.send(&ClientMsg::Heartbeat).await.unwrap();
        assert_eq!(
            reader.next().await.unwrap(),
            Frame::Msg(ClientMsg::Heartbeat)
        );
        tx.send_relay(7, &[4, 0, 0, 0, 1]).await.unwrap();
        match reader.next().await.unwrap() {
            Frame::Relay { dst, datagram } => {
                assert_eq!(dst, 7);
                write_relay_header(datagram, 9);
                assert_eq!(parse_relay_data(datagram), Some((9, &[4, 0, 0, 0, 1][..])));
            }
            other => panic!("{other:?}"),
        }
        // A large frame is read, and its buffers are given back before the next one.
        let big = vec![7u8; 60_000];
        tx.send_relay(8, &big).await.unwrap();
        assert!(matches!(
            reader.next().await.unwrap(),
            Frame::Relay { dst: 8, .. }
        ));
        tx.send(&ClientMsg::Heartbeat).await.unwrap();
        assert_eq!(
            reader.next().await.unwrap(),
            Frame::Msg(ClientMsg::Heartbeat)
        );
        // Waiting for the next frame, it holds small buffers only.
        let waited = tokio::time::timeout(std::time::Duration::from_millis(20), reader.next());
        assert!(waited.await.is_err(), "nothing was sent");
        assert!(reader.input.capacity() <= READ_IDLE && reader.plain.capacity() <= KEEP);
    }

    #[tokio::test]
    async fn frames_back_to_back_are_read_many_at_a_time_and_each_whole() {
        let (_rx, mut tx, mut reader, _out) = pair().await;
        // Sizes that straddle every read's end: frames split across reads come out whole.
        let sizes: Vec<usize> = (0..500).map(|i| 1 + (i * 37) % 1500).collect();
        for (i, &n) in sizes.iter().enumerate() {
            tx.queue_relay(i as u32, &vec![i as u8; n]).unwrap();
        }
        tx.queue(&ClientMsg::Heartbeat).unwrap();
        tx.flush().await.unwrap();
        for (i, &n) in sizes.iter().enumerate() {
            match reader.next().await.unwrap() {
                Frame::Relay { dst, datagram } => {
                    assert_eq!(dst, i as u32);
                    assert_eq!(datagram.len(), RELAY_HEADER_LEN + n, "frame {i}");
                    assert!(datagram[RELAY_HEADER_LEN..].iter().all(|&b| b == i as u8));
                }
                other => panic!("{other:?}"),
            }
            if i == 100 {
                assert!(reader.busy, "reads of a backlog fill the buffer");
            }
        }
        assert_eq!(
            reader.next().await.unwrap(),
            Frame::Msg(ClientMsg::Heartbeat)
        );
    }

    #[tokio::test]
    async fn queued_frames_arrive_in_order_and_an_idle_outbox_holds_nothing() {
        let (mut rx, _tx, _reader, out) = pair().await;
        let mut d = vec![0u8; RELAY_HEADER_LEN + 1400];
        for i in 0..100u32 {
            d[RELAY_HEADER_LEN..RELAY_HEADER_LEN + 4].copy_from_slice(&i.to_be_bytes());
            out.send_relay(relay_frame(&mut d, 5)).unwrap();
        }
        out.send_msg(&ServerMsg::HeartbeatAck).unwrap();
        for i in 0..100u32 {
            match rx.recv_frame::<ServerMsg>().await.unwrap() {
                Incoming::Relay(5, p) => assert_eq!(p[..4], i.to_be_bytes()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            rx.recv_frame::<ServerMsg>().await.unwrap(),
            Incoming::Msg(ServerMsg::HeartbeatAck)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(lock(&out.pending).bytes.capacity() <= KEEP);
        out.close();
        assert_eq!(out.send_msg(&ServerMsg::HeartbeatAck), Err(Refused::Closed));
        assert!(
            rx.recv_frame::<ServerMsg>().await.is_err(),
            "closed after the flush"
        );
    }

    #[test]
    fn relay_data_over_the_limit_is_refused_and_messages_still_pass() {
        let (e, _) = established_states();
        let out = Outbox::new(Arc::new(e));
        let mut d = vec![0u8; RELAY_HEADER_LEN + 1400];
        let mut queued = 0;
        while out.send_relay(relay_frame(&mut d, 1)).is_ok() {
            queued += 1;
        }
        // Each frame: length, relay header, payload, tag.
        let frame = 2 + 5 + 1400 + TAG_LEN;
        assert!(queued * frame >= RELAY_PENDING && (queued - 1) * frame < RELAY_PENDING);
        assert_eq!(out.send_relay(relay_frame(&mut d, 1)), Err(Refused::Full));
        assert!(out.send_msg(&ServerMsg::HeartbeatAck).is_ok());
        let too_big = vec![0u8; MAX_FRAME];
        assert_eq!(out.send_relay(&too_big), Err(Refused::TooLarge));
    }

    /// An established responder state, made without a runtime.
    fn established_states() -> (StatelessTransportState, StatelessTransportState) {
        let params: snow::params::NoiseParams =
            a2a_proto::noise_channel::NOISE_PARAMS.parse().unwrap();
        let server = StaticSecret::from([1; 32]);
        let server_pub = PublicKey::from(&server).to_bytes();
        let mut i = snow::Builder::new(params.clone())
            .local_private_key(&[2; 32])
            .unwrap()
            .remote_public_key(&server_pub)
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut r = snow::Builder::new(params)
            .local_private_key(&server.to_bytes())
            .unwrap()
            .build_responder()
            .unwrap();
        let mut m = [0u8; 1024];
        let mut p = [0u8; 1024];
        let n = i.write_message(&[], &mut m).unwrap();
        r.read_message(&m[..n], &mut p).unwrap();
        let n = r.write_message(&[], &mut m).unwrap();
        i.read_message(&m[..n], &mut p).unwrap();
        (
            r.into_stateless_transport_mode().unwrap(),
            i.into_stateless_transport_mode().unwrap(),
        )
    }
}
