//! The encrypted, mutually authenticated control channel: Noise IK (snow) over a byte stream,
//! frames of `u16 length | ciphertext`. A frame's plaintext is a JSON message, or (first byte
//! [`RELAY_FRAME`]) relay data: `00 | relay id (4, big-endian) | WireGuard or disco datagram`,
//! which is how a node without working UDP sends and receives relayed packets. The node (initiator) pins the coordinator's static key
//! from the token; the coordinator learns the node's static key, which is its WireGuard key.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use snow::StatelessTransportState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The Noise protocol of the control channel.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Prologue binding the handshake to a2a's control protocol version 1.
const PROLOGUE: &[u8] = b"a2a control v1";
/// Largest Noise message.
pub const MAX_FRAME: usize = 65535;
const TAG_LEN: usize = 16;
/// First plaintext byte of a relay frame (JSON never starts with it).
pub const RELAY_FRAME: u8 = 0x00;
/// Largest datagram a relay frame carries.
pub const MAX_RELAY_PAYLOAD: usize = MAX_FRAME - TAG_LEN - 5;
/// How long either side waits for the other's handshake message.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest first handshake message the responder reads. The initiator's is 96 bytes (ephemeral
/// key, encrypted static key, empty payload); a longer announced length is refused before any
/// memory is set aside for it, so a connection that never finishes its first frame costs little.
pub const MAX_HANDSHAKE_FRAME: usize = 1024;

/// Why the initiator's handshake failed, by what the node should do about it.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The answer does not authenticate under the pinned key: whoever answered is not the
    /// coordinator the token (or invite code) names. Retrying cannot help.
    #[error(
        "the coordinator failed authentication: its key does not match the one the join token (or invite code) pins; get a new token or invite from this coordinator's network"
    )]
    Refused,
    /// The peer closed the connection without answering: what a coordinator that does not hold
    /// the pinned key does (it cannot read the first message), but also one that is going down.
    #[error(
        "the coordinator closed the connection during the handshake: either it does not hold the key the join token pins (a token of another coordinator, or its state directory was replaced), or it is restarting"
    )]
    Closed,
    /// No answer within [`HANDSHAKE_TIMEOUT`].
    #[error(
        "the coordinator did not answer the handshake within {}s; check that the endpoint is an a2a coordinator and reachable",
        HANDSHAKE_TIMEOUT.as_secs()
    )]
    TimedOut,
    /// The connection failed (reset, for instance: a coordinator too busy to take it).
    #[error("the connection to the coordinator failed during the handshake: {0}")]
    Io(io::Error),
}

impl From<HandshakeError> for io::Error {
    fn from(e: HandshakeError) -> io::Error {
        match e {
            HandshakeError::Io(e) => e,
            other => io::Error::other(other),
        }
    }
}

/// Why a frame of an established channel could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended or failed: the connection is gone.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer sent what is not a frame of this channel (longer than allowed, not decrypting,
    /// not a message): it is broken or hostile, and the channel ends.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl From<FrameError> for io::Error {
    fn from(e: FrameError) -> io::Error {
        match e {
            FrameError::Io(e) => e,
            FrameError::Malformed(m) => io::Error::new(io::ErrorKind::InvalidData, m),
        }
    }
}

fn params() -> snow::params::NoiseParams {
    NOISE_PARAMS.parse().expect("valid Noise parameters")
}

fn noise_err(e: snow::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("noise: {e}"))
}

/// Reads one `u16 length | bytes` frame into `buf` (at most [`MAX_FRAME`] bytes, whatever the
/// peer sends).
pub async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(), FrameError> {
    read_frame_max(io, buf, MAX_FRAME).await
}

/// Reads one frame, refusing one announced longer than `max` before reserving memory for it.
pub async fn read_frame_max<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<(), FrameError> {
    let len = io.read_u16().await? as usize;
    if len > max {
        return Err(FrameError::Malformed(format!(
            "a frame of {len} bytes, longer than the {max} allowed here"
        )));
    }
    buf.resize(len, 0);
    io.read_exact(buf).await?;
    Ok(())
}

/// Whether `buffered` (bytes read ahead from a channel) holds at least one whole frame, so the
/// next read returns without waiting on the socket.
pub fn holds_whole_frame(buffered: &[u8]) -> bool {
    match buffered {
        [a, b, rest @ ..] => rest.len() >= u16::from_be_bytes([*a, *b]) as usize,
        _ => false,
    }
}

/// One frame read from the channel once it is established; `P` is the relay payload, owned
/// (the default) or borrowed from the reader's buffer ([`FrameReader::recv_frame_ref`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<T, P = Vec<u8>> {
    Msg(T),
    /// Relay data: the relay id (destination from a node, source from the coordinator) and the
    /// datagram.
    Relay(u32, P),
}

impl<T> Incoming<T, &[u8]> {
    /// The same frame with its relay payload copied out.
    pub fn into_owned(self) -> Incoming<T> {
        match self {
            Incoming::Msg(m) => Incoming::Msg(m),
            Incoming::Relay(id, p) => Incoming::Relay(id, p.to_vec()),
        }
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(io: &mut W, frame: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(2 + frame.len());
    out.extend_from_slice(&(frame.len() as u16).to_be_bytes());
    out.extend_from_slice(frame);
    io.write_all(&out).await?;
    io.flush().await
}

/// An established channel, before it is split into halves.
pub struct Established {
    pub state: StatelessTransportState,
    /// The Noise handshake hash: unique to this connection, used to bind proofs to it.
    pub handshake_hash: Vec<u8>,
    /// The peer's static public key.
    pub remote_static: [u8; 32],
}

impl Established {
    pub fn split<R, W>(self, read: R, write: W) -> (FrameReader<R>, FrameWriter<W>) {
        let state = Arc::new(self.state);
        (
            FrameReader {
                io: read,
                state: state.clone(),
                nonce: 0,
                cipher: Vec::new(),
                plain: Vec::new(),
            },
            FrameWriter {
                io: write,
                state,
                nonce: 0,
                out: Vec::new(),
                plain: Vec::new(),
            },
        )
    }
}

/// Runs the initiator side (the node), pinning the coordinator's key `remote_public`.
///
/// Error contract: [`HandshakeError::Refused`] when the answer does not authenticate (a forged
/// or different coordinator: permanent), [`HandshakeError::Closed`] when the peer closed without
/// answering, [`HandshakeError::TimedOut`] after [`HANDSHAKE_TIMEOUT`], [`HandshakeError::Io`]
/// for anything else the connection did (a reset, for instance).
pub async fn handshake_initiator<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    local_private: &[u8; 32],
    remote_public: &[u8; 32],
) -> Result<Established, HandshakeError> {
    let local = |e: snow::Error| HandshakeError::Io(noise_err(e));
    let mut hs = snow::Builder::new(params())
        .prologue(PROLOGUE)
        .and_then(|b| b.local_private_key(local_private))
        .and_then(|b| b.remote_public_key(remote_public))
        .and_then(|b| b.build_initiator())
        .map_err(local)?;
    let mut msg = vec![0u8; MAX_FRAME];
    let n = hs.write_message(&[], &mut msg).map_err(local)?;
    write_frame(io, &msg[..n])
        .await
        .map_err(HandshakeError::Io)?;
    let mut frame = Vec::new();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(io, &mut frame)).await {
        Err(_) => return Err(HandshakeError::TimedOut),
        Ok(Err(FrameError::Io(e))) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(HandshakeError::Closed)
        }
        Ok(Err(FrameError::Io(e))) => return Err(HandshakeError::Io(e)),
        // An answer that is no handshake message does not authenticate either.
        Ok(Err(FrameError::Malformed(_))) => return Err(HandshakeError::Refused),
        Ok(Ok(())) => {}
    }
    hs.read_message(&frame, &mut msg)
        .map_err(|_| HandshakeError::Refused)?;
    finish(hs).map_err(HandshakeError::Io)
}

/// Runs the responder side (the coordinator).
pub async fn handshake_responder<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    local_private: &[u8; 32],
) -> io::Result<Established> {
    let mut hs = snow::Builder::new(params())
        .prologue(PROLOGUE)
        .and_then(|b| b.local_private_key(local_private))
        .and_then(|b| b.build_responder())
        .map_err(noise_err)?;
    let mut frame = Vec::new();
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        read_frame_max(io, &mut frame, MAX_HANDSHAKE_FRAME),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))??;
    let mut msg = vec![0u8; MAX_FRAME];
    hs.read_message(&frame, &mut msg).map_err(noise_err)?;
    let n = hs.write_message(&[], &mut msg).map_err(noise_err)?;
    write_frame(io, &msg[..n]).await?;
    finish(hs)
}

fn finish(hs: snow::HandshakeState) -> io::Result<Established> {
    let remote_static: [u8; 32] = hs
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no remote static key"))?;
    let handshake_hash = hs.get_handshake_hash().to_vec();
    let state = hs.into_stateless_transport_mode().map_err(noise_err)?;
    Ok(Established {
        state,
        handshake_hash,
        remote_static,
    })
}

/// Receiving half: decrypts frames and parses JSON messages.
pub struct FrameReader<R> {
    io: R,
    state: Arc<StatelessTransportState>,
    nonce: u64,
    cipher: Vec<u8>,
    plain: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// The next message; an error on a closed, corrupted or unparsable stream, or on relay
    /// data (not expected where this is used: before registration).
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        match self.recv_frame().await? {
            Incoming::Msg(m) => Ok(m),
            Incoming::Relay(..) => Err(FrameError::Malformed(
                "relay data before registration".into(),
            )),
        }
    }

    /// The reading half it reads from.
    pub fn get_ref(&self) -> &R {
        &self.io
    }

    /// The next message or relay frame.
    pub async fn recv_frame<T: DeserializeOwned>(&mut self) -> Result<Incoming<T>, FrameError> {
        self.recv_frame_ref().await.map(Incoming::into_owned)
    }

    /// The next message or relay frame, its relay payload borrowed from this reader's buffer
    /// until the next read (the TCP relay's packets: no copy, no allocation per packet).
    pub async fn recv_frame_ref<T: DeserializeOwned>(
        &mut self,
    ) -> Result<Incoming<T, &[u8]>, FrameError> {
        read_frame(&mut self.io, &mut self.cipher).await?;
        // Any error ends the channel, so the nonce need not be kept on one.
        let n = decrypt(&self.state, self.nonce, &self.cipher, &mut self.plain);
        self.nonce += 1;
        parse_frame_ref(&self.plain[..n?])
    }
}

/// Decrypts frame number `nonce` (`cipher`) into `plain`; the plaintext's length.
fn decrypt(
    state: &StatelessTransportState,
    nonce: u64,
    cipher: &[u8],
    plain: &mut Vec<u8>,
) -> Result<usize, FrameError> {
    plain.resize(cipher.len(), 0);
    state
        .read_message(nonce, cipher, plain)
        .map_err(|e| FrameError::Malformed(format!("noise: {e}")))
}

/// Decrypts frame number `nonce` of a channel (`cipher`, the bytes [`read_frame`] returned) into
/// `plain` and parses it with [`parse_frame`]. Pure: what [`FrameReader::recv_frame`] does once
/// a frame has been read.
pub fn open_frame<T: DeserializeOwned>(
    state: &StatelessTransportState,
    nonce: u64,
    cipher: &[u8],
    plain: &mut Vec<u8>,
) -> Result<Incoming<T>, FrameError> {
    let n = decrypt(state, nonce, cipher, plain)?;
    parse_frame(&plain[..n])
}

/// Parses a decrypted frame: relay data (first byte [`RELAY_FRAME`], a relay id, a non-empty
/// datagram) or one JSON message.
pub fn parse_frame<T: DeserializeOwned>(plain: &[u8]) -> Result<Incoming<T>, FrameError> {
    parse_frame_ref(plain).map(Incoming::into_owned)
}

/// [`parse_frame`], the relay payload borrowed from `plain`.
pub fn parse_frame_ref<T: DeserializeOwned>(
    plain: &[u8],
) -> Result<Incoming<T, &[u8]>, FrameError> {
    match plain {
        [RELAY_FRAME, a, b, c, d, payload @ ..] if !payload.is_empty() => Ok(Incoming::Relay(
            u32::from_be_bytes([*a, *b, *c, *d]),
            payload,
        )),
        [RELAY_FRAME, ..] => Err(FrameError::Malformed("truncated relay frame".into())),
        _ => serde_json::from_slice(plain)
            .map(Incoming::Msg)
            .map_err(|e| FrameError::Malformed(format!("bad message: {e}"))),
    }
}

/// Sending half: serialises messages to JSON and encrypts them into frames. Frames can be
/// queued ([`queue`](Self::queue), [`queue_relay`](Self::queue_relay)) and written together
/// with one [`flush`](Self::flush) (the TCP relay's many small frames, one system call);
/// [`send`](Self::send) and [`send_relay`](Self::send_relay) queue and flush at once.
pub struct FrameWriter<W> {
    io: W,
    state: Arc<StatelessTransportState>,
    nonce: u64,
    /// Queued frames (`u16 length | ciphertext` each), not yet written.
    out: Vec<u8>,
    plain: Vec<u8>,
}

/// Bytes of queued frames kept between flushes; a larger buffer is given back.
const KEEP_QUEUED: usize = 256 * 1024;

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> io::Result<()> {
        self.queue(msg)?;
        self.flush().await
    }

    /// Sends relay data for `relay_id`.
    pub async fn send_relay(&mut self, relay_id: u32, payload: &[u8]) -> io::Result<()> {
        self.queue_relay(relay_id, payload)?;
        self.flush().await
    }

    /// Encrypts a message into the queue.
    pub fn queue<T: Serialize>(&mut self, msg: &T) -> io::Result<()> {
        self.plain.clear();
        serde_json::to_writer(&mut self.plain, msg).map_err(io::Error::other)?;
        self.seal_plain()
    }

    /// Encrypts relay data for `relay_id` into the queue.
    pub fn queue_relay(&mut self, relay_id: u32, payload: &[u8]) -> io::Result<()> {
        if payload.is_empty() || payload.len() > MAX_RELAY_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "relay payload empty or too large",
            ));
        }
        self.plain.clear();
        self.plain.push(RELAY_FRAME);
        self.plain.extend_from_slice(&relay_id.to_be_bytes());
        self.plain.extend_from_slice(payload);
        self.seal_plain()
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Writes every queued frame (one write when the socket takes them all).
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let written = self.io.write_all(&self.out).await;
            self.out.clear();
            if self.out.capacity() > KEEP_QUEUED {
                self.out = Vec::new();
            }
            written?;
        }
        self.io.flush().await
    }

    fn seal_plain(&mut self) -> io::Result<()> {
        if self.plain.len() + TAG_LEN > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "control message too large",
            ));
        }
        let at = self.out.len();
        self.out.resize(at + 2 + self.plain.len() + TAG_LEN, 0);
        let n = match self
            .state
            .write_message(self.nonce, &self.plain, &mut self.out[at + 2..])
        {
            Ok(n) => n,
            Err(e) => {
                self.out.truncate(at);
                return Err(noise_err(e));
            }
        };
        self.nonce += 1;
        self.out[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
        self.out.truncate(at + 2 + n);
        Ok(())
    }

    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.io.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x25519_dalek::{PublicKey, StaticSecret};

    fn keypair(seed: u8) -> ([u8; 32], [u8; 32]) {
        let s = StaticSecret::from([seed; 32]);
        (s.to_bytes(), PublicKey::from(&s).to_bytes())
    }

    #[tokio::test]
    async fn both_sides_authenticate_and_exchange_messages() {
        let (server_priv, server_pub) = keypair(1);
        let (client_priv, client_pub) = keypair(2);
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let est = handshake_responder(&mut b, &server_priv).await.unwrap();
            assert_eq!(est.remote_static, client_pub);
            let hash = est.handshake_hash.clone();
            let (r, w) = tokio::io::split(b);
            let (mut r, mut w) = est.split(r, w);
            let got: String = r.recv().await.unwrap();
            w.send(&format!("echo {got}")).await.unwrap();
            // Relay data and messages interleave; `recv` refuses relay data.
            assert_eq!(
                r.recv_frame::<String>().await.unwrap(),
                Incoming::Relay(7, vec![4, 0, 0, 0, 1])
            );
            assert_eq!(
                r.recv_frame::<String>().await.unwrap(),
                Incoming::Msg("after".to_string())
            );
            hash
        });
        let est = handshake_initiator(&mut a, &client_priv, &server_pub)
            .await
            .unwrap();
        assert_eq!(est.remote_static, server_pub);
        let hash = est.handshake_hash.clone();
        let (r, w) = tokio::io::split(a);
        let (mut r, mut w) = est.split(r, w);
        w.send(&"hi".to_string()).await.unwrap();
        let reply: String = r.recv().await.unwrap();
        assert_eq!(reply, "echo hi");
        w.send_relay(7, &[4, 0, 0, 0, 1]).await.unwrap();
        w.send(&"after".to_string()).await.unwrap();
        assert_eq!(server.await.unwrap(), hash);
    }

    #[test]
    fn truncated_relay_frames_are_refused() {
        assert!(parse_frame::<String>(&[RELAY_FRAME, 0, 0, 0, 1]).is_err());
        assert!(parse_frame::<String>(&[RELAY_FRAME]).is_err());
        assert!(parse_frame::<String>(b"{not json").is_err());
        assert!(parse_frame::<String>(b"").is_err());
        assert_eq!(
            parse_frame::<String>(&[RELAY_FRAME, 0, 0, 1, 2, 9]).unwrap(),
            Incoming::Relay(0x0102, vec![9])
        );
        assert_eq!(
            parse_frame::<String>(b"\"x\"").unwrap(),
            Incoming::Msg("x".to_string())
        );
    }

    /// Both ends of an established channel, without the frame I/O.
    async fn states() -> (Established, Established) {
        let (server_priv, server_pub) = keypair(1);
        let (client_priv, _) = keypair(2);
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move { handshake_responder(&mut b, &server_priv).await });
        let client = handshake_initiator(&mut a, &client_priv, &server_pub)
            .await
            .unwrap();
        (client, server.await.unwrap().unwrap())
    }

    #[tokio::test]
    async fn queued_frames_go_in_one_write_and_read_back_in_order_through_a_read_ahead() {
        let (client, server) = states().await;
        let (a, b) = tokio::io::duplex(1 << 20);
        let (_, w) = tokio::io::split(a);
        let (_, mut w) = client.split(tokio::io::empty(), w);
        for i in 0..100u32 {
            w.queue_relay(i, &[i as u8; 1000]).unwrap();
        }
        w.queue(&"last".to_string()).unwrap();
        assert!(w.queued() > 100 * 1000);
        w.flush().await.unwrap();
        assert_eq!(w.queued(), 0);
        let (r, _) = tokio::io::split(b);
        let (mut r, _) = server.split(tokio::io::BufReader::new(r), tokio::io::sink());
        for i in 0..100u32 {
            assert_eq!(
                r.recv_frame::<String>().await.unwrap(),
                Incoming::Relay(i, vec![i as u8; 1000])
            );
        }
        assert_eq!(
            r.recv_frame::<String>().await.unwrap(),
            Incoming::Msg("last".to_string())
        );
        assert!(!holds_whole_frame(r.get_ref().buffer()));
    }

    #[test]
    fn a_whole_frame_is_its_length_prefix_and_that_many_bytes() {
        assert!(!holds_whole_frame(&[]));
        assert!(!holds_whole_frame(&[0]));
        assert!(holds_whole_frame(&[0, 0]));
        assert!(!holds_whole_frame(&[0, 3, 1, 2]));
        assert!(holds_whole_frame(&[0, 3, 1, 2, 3]));
        assert!(holds_whole_frame(&[0, 3, 1, 2, 3, 9]));
        let mut big = vec![1u8, 0];
        big.extend(vec![0u8; 255]);
        assert!(!holds_whole_frame(&big));
        big.push(0);
        assert!(holds_whole_frame(&big));
    }

    #[tokio::test]
    async fn frames_open_only_at_their_nonce_and_with_their_bytes() {
        let (client, server) = states().await;
        let mut cipher = vec![0u8; MAX_FRAME];
        let n = client
            .state
            .write_message(3, b"\"hi\"", &mut cipher)
            .unwrap();
        let mut plain = Vec::new();
        assert_eq!(
            open_frame::<String>(&server.state, 3, &cipher[..n], &mut plain).unwrap(),
            Incoming::Msg("hi".to_string())
        );
        assert!(open_frame::<String>(&server.state, 2, &cipher[..n], &mut plain).is_err());
        for cut in 0..n {
            assert!(open_frame::<String>(&server.state, 3, &cipher[..cut], &mut plain).is_err());
        }
        cipher[0] ^= 1;
        assert!(open_frame::<String>(&server.state, 3, &cipher[..n], &mut plain).is_err());
    }

    #[tokio::test]
    async fn read_frame_takes_the_length_prefix_and_refuses_short_streams() {
        let mut buf = Vec::new();
        let mut stream: &[u8] = &[0, 3, 1, 2, 3, 0, 0, 0, 5, 1];
        read_frame(&mut stream, &mut buf).await.unwrap();
        assert_eq!(buf, [1, 2, 3]);
        read_frame(&mut stream, &mut buf).await.unwrap();
        assert!(buf.is_empty());
        let err = read_frame(&mut stream, &mut buf).await.unwrap_err();
        assert!(
            matches!(&err, FrameError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof),
            "{err:?}"
        );
        let mut stream: &[u8] = &[7];
        assert!(read_frame(&mut stream, &mut buf).await.is_err());
    }

    #[tokio::test]
    async fn an_oversized_first_handshake_frame_is_refused_unread() {
        let (server_priv, _) = keypair(1);
        let (mut a, mut b) = tokio::io::duplex(1 << 17);
        let server = tokio::spawn(async move { handshake_responder(&mut b, &server_priv).await });
        // Announces a 64 KiB frame and sends only its first bytes: refused on the length alone.
        a.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
        let err = server.await.unwrap().err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A real initiator's first message fits.
        let (_, server_pub) = keypair(1);
        let (client_priv, _) = keypair(2);
        let mut hs = snow::Builder::new(params())
            .prologue(PROLOGUE)
            .and_then(|b| b.local_private_key(&client_priv))
            .and_then(|b| b.remote_public_key(&server_pub))
            .and_then(|b| b.build_initiator())
            .unwrap();
        let mut msg = vec![0u8; MAX_FRAME];
        let n = hs.write_message(&[], &mut msg).unwrap();
        assert!(n <= MAX_HANDSHAKE_FRAME, "{n}");
    }

    #[tokio::test]
    async fn a_forged_coordinator_is_refused() {
        let (_, server_pub) = keypair(1);
        let (forger_priv, _) = keypair(3);
        let (client_priv, _) = keypair(2);
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            // The forger does not hold the pinned key: it cannot even read the first message.
            let _ = handshake_responder(&mut b, &forger_priv).await;
        });
        let err = handshake_initiator(&mut a, &client_priv, &server_pub).await;
        assert!(
            matches!(err, Err(HandshakeError::Closed)),
            "{:?}",
            err.err()
        );
    }

    #[tokio::test]
    async fn an_answer_under_another_key_is_refused_and_a_silent_close_is_closed() {
        let (_, server_pub) = keypair(1);
        let (client_priv, _) = keypair(2);
        // A peer that answers with bytes that are no handshake message under the pinned key.
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut frame = Vec::new();
            read_frame(&mut b, &mut frame).await.unwrap();
            write_frame(&mut b, &[7; 48]).await.unwrap();
            let _ = read_frame(&mut b, &mut frame).await;
        });
        let err = handshake_initiator(&mut a, &client_priv, &server_pub).await;
        assert!(
            matches!(err, Err(HandshakeError::Refused)),
            "{:?}",
            err.err()
        );
        let msg = HandshakeError::Refused.to_string();
        assert!(
            msg.contains("does not match") && msg.contains("get a new token"),
            "{msg}"
        );
        // A peer that reads the first message and closes.
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut frame = Vec::new();
            read_frame(&mut b, &mut frame).await.unwrap();
        });
        let err = handshake_initiator(&mut a, &client_priv, &server_pub).await;
        assert!(
            matches!(err, Err(HandshakeError::Closed)),
            "{:?}",
            err.err()
        );
    }
}
