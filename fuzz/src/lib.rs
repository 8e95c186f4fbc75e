//! What the fuzz targets share: fixed keys and records, a runtime for the async readers, a
//! stand-in for a socket, and a bound on heap growth per input.
//!
//! Every target runs its input inside [`run`], which fails the input when the live heap grew by
//! more than [`FIXED_BUDGET`] + [`PER_INPUT_BYTE`] × its length while it ran: a parser that
//! allocates what a length field *claims* instead of what arrived is caught even when the claim
//! stays under libFuzzer's `-malloc_limit_mb`.

pub mod seeds;

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;
use std::task::{Context, Poll};

use a2a_proto::keys::NetworkKey;
use a2a_proto::noise_channel::{handshake_initiator, handshake_responder, Established};
use a2a_proto::record::{RecordError, MAX_CANDIDATES, MAX_NAME_LEN, MAX_RECORD_LEN};
use a2a_proto::{NetworkId, NodeKey, NodeRecord, SignedRecord};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use x25519_dalek::{PublicKey, StaticSecret};

/// Heap growth any input may cause: the control channel alone keeps two 64 KiB frame buffers.
pub const FIXED_BUDGET: usize = 1 << 20;
/// Heap growth allowed per input byte (a parsed value may well be larger than its text).
pub const PER_INPUT_BYTE: usize = 64;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call is passed to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs one input through `f` and fails it if the heap grew beyond the budget meanwhile.
pub fn run<R>(input: &[u8], f: impl FnOnce() -> R) -> R {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let r = f();
    let grown = PEAK.load(Relaxed).saturating_sub(base);
    let budget = FIXED_BUDGET + PER_INPUT_BYTE * input.len();
    assert!(
        grown <= budget,
        "heap grew by {grown} bytes for a {}-byte input (budget {budget})",
        input.len()
    );
    r
}

/// Runs a future to completion on this thread's runtime (time enabled, for handshake timeouts).
pub fn block_on<F: Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

/// A socket stand-in: reads `input`, keeps what is written.
pub struct Wire<'a> {
    pub input: &'a [u8],
    pub output: Vec<u8>,
}

impl<'a> Wire<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Wire {
            input,
            output: Vec::new(),
        }
    }
}

impl AsyncRead for Wire<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.input).poll_read(cx, buf)
    }
}

impl AsyncWrite for Wire<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.output.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The coordinator's static X25519 private key in every target.
pub const COORDINATOR_SECRET: [u8; 32] = [9; 32];
/// Node A (the sender of disco probes, the node on the control channel).
pub const NODE_A_SECRET: [u8; 32] = [1; 32];
/// Node B (the receiver of disco probes).
pub const NODE_B_SECRET: [u8; 32] = [2; 32];
/// The network secret behind [`network_key`].
pub const NETWORK_SECRET: [u8; 32] = [7; 32];
/// The handshake hash registration proofs in the seeds sign.
pub const HANDSHAKE_HASH: [u8; 32] = [5; 32];

pub fn public(secret: [u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(secret)).to_bytes()
}

pub fn node_key(secret: [u8; 32]) -> NodeKey {
    NodeKey(public(secret))
}

/// The network every record in the seeds is signed for.
pub fn network_key() -> &'static NetworkKey {
    static KEY: OnceLock<NetworkKey> = OnceLock::new();
    KEY.get_or_init(|| NetworkKey::derive(&NETWORK_SECRET))
}

pub fn network_id() -> NetworkId {
    network_key().id()
}

/// Both ends of one established control channel (node A and the coordinator), made once.
pub fn channel() -> &'static (Established, Established) {
    static CHANNEL: OnceLock<(Established, Established)> = OnceLock::new();
    CHANNEL.get_or_init(|| {
        block_on(async {
            let (mut a, mut b) = tokio::io::duplex(1 << 17);
            let coordinator = public(COORDINATOR_SECRET);
            let (client, server) = tokio::join!(
                handshake_initiator(&mut a, &NODE_A_SECRET, &coordinator),
                handshake_responder(&mut b, &COORDINATOR_SECRET),
            );
            (client.expect("initiator"), server.expect("responder"))
        })
    })
}

/// A valid record of node A.
pub fn record() -> NodeRecord {
    NodeRecord {
        network: network_id(),
        node_key: node_key(NODE_A_SECRET),
        name: "alice".into(),
        ip: "100.64.0.7".parse().unwrap(),
        candidates: vec![
            "198.51.100.7:51820".parse().unwrap(),
            "[2001:db8::7]:51820".parse().unwrap(),
        ],
        issued_ms: 1_700_000_000_000,
        ssh: None,
    }
}

/// `decode(encode(m)) == m` for a message that was decoded.
pub fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(m: &T) {
    let json = serde_json::to_vec(m).expect("a parsed message serialises");
    let again: T = serde_json::from_slice(&json).expect("a serialised message parses");
    assert_eq!(&again, m, "{}", String::from_utf8_lossy(&json));
}

/// Verifies `s` as a node or the coordinator does; a record that passes must hold what
/// validation promises and survive re-signing.
pub fn check_record(s: &SignedRecord, network: &NetworkId) -> Result<NodeRecord, RecordError> {
    let v = s.verify(network)?;
    let r = v.record;
    assert!(s.body.len() <= MAX_RECORD_LEN);
    assert!(r.validate().is_ok());
    assert_eq!(
        r.network, *network,
        "a record verifies only in the network it names"
    );
    assert!(!r.name.is_empty() && r.name.len() <= MAX_NAME_LEN);
    assert!(r.candidates.len() <= MAX_CANDIDATES);
    if *network == network_id() && v.cert.is_none() {
        let again = r.sign(network_key());
        assert_eq!(again.verify(network).map(|v| v.record).as_ref(), Ok(&r));
    }
    Ok(r)
}
