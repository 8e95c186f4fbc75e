//! The control channel's Noise IK handshake, the one parser anybody on the internet reaches:
//! the coordinator reading a node's first message (first byte even), or a node reading the
//! coordinator's answer (odd), the rest of the input being the stream they read.

#![no_main]

use a2a_fuzz::{block_on, public, run, Wire, COORDINATOR_SECRET, NODE_A_SECRET};
use a2a_proto::noise_channel::{handshake_initiator, handshake_responder, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data, || {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let mut wire = Wire::new(stream);
    if mode & 1 == 0 {
        if let Ok(est) = block_on(handshake_responder(&mut wire, &COORDINATOR_SECRET)) {
            // Accepted (a genuine first message, replayed): it answered with one frame.
            assert_eq!(est.handshake_hash.len(), 32);
            let out = &wire.output;
            assert!(out.len() >= 2 && out.len() <= 2 + MAX_FRAME);
            assert_eq!(u16::from_be_bytes([out[0], out[1]]) as usize, out.len() - 2);
        }
    } else {
        let r = block_on(handshake_initiator(
            &mut wire,
            &NODE_A_SECRET,
            &public(COORDINATOR_SECRET),
        ));
        // The answer must match this handshake's fresh ephemeral key: no fixed bytes can.
        assert!(r.is_err(), "a node accepted a canned coordinator answer");
    }
}));
