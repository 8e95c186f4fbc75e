//! The control channel after the handshake: a byte stream of `u16 length | ciphertext` frames,
//! read with the channel's own `read_frame` and `open_frame` (decrypt, then relay frame or JSON
//! message), both directions.
//!
//! Input: a direction byte (even: node to coordinator, frames parsed as `ClientMsg`; odd: the
//! other way, `ServerMsg`), then chunks `tag | len (2, big-endian) | bytes`. An even tag seals the
//! bytes as the next frame with the sender's real channel state, so the fuzzer reaches the
//! plaintext parser; an odd tag puts the bytes on the stream as they are.

#![no_main]

use std::fmt::Debug;

use a2a_fuzz::{block_on, channel, round_trip, run};
use a2a_proto::control::{ClientMsg, ServerMsg};
use a2a_proto::noise_channel::{
    open_frame, parse_frame, read_frame, Established, Incoming, MAX_FRAME, RELAY_FRAME,
};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

const TAG_LEN: usize = 16;

fuzz_target!(|data: &[u8]| run(data, || {
    let Some((&direction, rest)) = data.split_first() else {
        return;
    };
    let (node, coordinator) = channel();
    if direction & 1 == 0 {
        frames::<ClientMsg>(rest, node, coordinator);
    } else {
        frames::<ServerMsg>(rest, coordinator, node);
    }
}));

fn frames<T>(data: &[u8], sender: &Established, receiver: &Established)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    // The stream, and for each chunk the plaintext it sealed (None: raw bytes).
    let mut stream = Vec::new();
    let mut sealed: Vec<Option<&[u8]>> = Vec::new();
    let mut rest = data;
    let mut cipher = vec![0u8; MAX_FRAME];
    while let Some((&tag, after)) = rest.split_first() {
        let (len, after) = match after {
            [a, b, body @ ..] => (u16::from_be_bytes([*a, *b]) as usize, body),
            _ => (after.len(), after),
        };
        let (bytes, next) = after.split_at(len.min(after.len()));
        rest = next;
        if tag & 1 == 0 && bytes.len() + TAG_LEN <= MAX_FRAME {
            let nonce = sealed.len() as u64;
            let n = sender
                .state
                .write_message(nonce, bytes, &mut cipher)
                .expect("a plaintext that fits a frame seals");
            stream.extend_from_slice(&(n as u16).to_be_bytes());
            stream.extend_from_slice(&cipher[..n]);
            sealed.push(Some(bytes));
        } else {
            stream.extend_from_slice(bytes);
            sealed.push(None);
        }
    }

    let mut input = &stream[..];
    let mut frame = Vec::new();
    let mut plain = Vec::new();
    for nonce in 0u64.. {
        if block_on(read_frame(&mut input, &mut frame)).is_err() {
            break;
        }
        assert!(frame.len() <= MAX_FRAME);
        let got = open_frame::<T>(&receiver.state, nonce, &frame, &mut plain);
        // While every chunk so far was sealed, frame `nonce` is chunk `nonce`: it must decrypt,
        // and read exactly as its plaintext parses.
        let aligned =
            sealed.len() > nonce as usize && sealed[..=nonce as usize].iter().all(|c| c.is_some());
        if aligned {
            let p = sealed[nonce as usize].unwrap();
            let want = parse_frame::<T>(p);
            match (&got, &want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w),
                (Err(_), Err(_)) => {}
                _ => panic!("frame {nonce}: got {got:?}, its plaintext parses as {want:?}"),
            }
        }
        match got {
            Ok(Incoming::Relay(id, payload)) => {
                assert!(!payload.is_empty());
                if aligned {
                    let p = sealed[nonce as usize].unwrap();
                    assert_eq!(p[0], RELAY_FRAME);
                    assert_eq!(p[1..5], id.to_be_bytes());
                    assert_eq!(&p[5..], &payload[..]);
                }
            }
            Ok(Incoming::Msg(m)) => round_trip(&m),
            Err(_) => break, // the channel closes
        }
    }
}
