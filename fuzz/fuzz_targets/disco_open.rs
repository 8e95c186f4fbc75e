//! Disco probes: node B opening what claims to come from node A (fixed keys), first byte even;
//! or, first byte odd, the plaintext parser behind the AEAD (what a peer holding the key could
//! send). What opens must re-seal and re-encode to itself.

#![no_main]

use std::sync::OnceLock;

use a2a_fuzz::{node_key, run, NODE_A_SECRET, NODE_B_SECRET};
use a2a_proto::disco::{
    claimed_sender, decode_body, encode_body, DiscoKey, DiscoMsg, MAX_BODY_LEN, MAX_DISCO_LEN,
};
use a2a_proto::udp::is_disco;
use libfuzzer_sys::fuzz_target;
use x25519_dalek::StaticSecret;

/// (A's key towards B, B's key towards A): the same key, derived at each end.
fn keys() -> &'static (DiscoKey, DiscoKey) {
    static KEYS: OnceLock<(DiscoKey, DiscoKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let a = StaticSecret::from(NODE_A_SECRET);
        let b = StaticSecret::from(NODE_B_SECRET);
        (
            DiscoKey::derive(&a, &node_key(NODE_B_SECRET)),
            DiscoKey::derive(&b, &node_key(NODE_A_SECRET)),
        )
    })
}

/// What A seals, B opens unchanged.
fn reseals(m: &DiscoMsg) {
    let (a_to_b, b_from_a) = keys();
    let mut buf = [0u8; MAX_DISCO_LEN];
    let n = a_to_b.seal(&node_key(NODE_A_SECRET), m, &mut buf);
    assert_eq!(b_from_a.open(&buf[..n]).as_ref(), Some(m));
}

fuzz_target!(|data: &[u8]| run(data, || {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let (_, b_from_a) = keys();
        let sender = claimed_sender(rest);
        if sender.is_some() {
            assert!(is_disco(rest));
        }
        if let Some(m) = b_from_a.open(rest) {
            assert!(is_disco(rest) && rest.len() <= MAX_DISCO_LEN);
            assert_eq!(sender, Some(node_key(NODE_A_SECRET)));
            reseals(&m);
        }
    } else if let Some(m) = decode_body(rest) {
        let mut out = [0u8; MAX_BODY_LEN];
        let n = encode_body(&m, &mut out);
        assert_eq!(&out[..n], rest);
        reseals(&m);
    }
}));
