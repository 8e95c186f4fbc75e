//! One datagram on the shared UDP socket, read as a2ad and the coordinator read it: the
//! WireGuard/a2a demux, relay data (and the datagram inside it), endpoint probes, replies and
//! relay binds, the disco test, and the endpoint address codec. Every reading must re-encode to
//! the same bytes, and no datagram may have two readings.

#![no_main]

use a2a_fuzz::run;
use a2a_proto::disco::claimed_sender;
use a2a_proto::udp::{
    classify, decode_addr, encode_addr, is_disco, parse_relay_data, write_relay_header,
    A2aDatagram, DatagramKind, A2A_MAGIC, MAX_A2A_DATAGRAM, RELAY_HEADER_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data, || check(data, true)));

fn check(d: &[u8], outer: bool) {
    let kind = classify(d);
    match kind {
        DatagramKind::WireGuard => assert!(matches!(d, [1..=4, 0, 0, 0, ..])),
        DatagramKind::A2a => assert!(d.len() >= 2 && d[0] == A2A_MAGIC),
        DatagramKind::Unknown => assert!(!matches!(d, [1..=4, 0, 0, 0, ..] | [A2A_MAGIC, _, ..])),
    }

    let relay = parse_relay_data(d);
    let control = A2aDatagram::decode(d);
    let disco = is_disco(d);
    let readings = [relay.is_some(), control.is_some(), disco];
    assert!(readings.iter().filter(|r| **r).count() <= 1, "{readings:?}");
    if readings.iter().any(|r| *r) {
        assert_eq!(kind, DatagramKind::A2a);
    }

    if let Some((id, payload)) = relay {
        assert!(!payload.is_empty());
        let mut header = [0u8; RELAY_HEADER_LEN];
        write_relay_header(&mut header, id);
        assert_eq!(&d[..RELAY_HEADER_LEN], &header);
        assert_eq!(&d[RELAY_HEADER_LEN..], payload);
        // a2ad reads the datagram inside relay data like one that came directly.
        if outer {
            check(payload, false);
        }
    }
    if let Some(m) = control {
        let mut out = [0u8; MAX_A2A_DATAGRAM];
        let n = m.encode(&mut out);
        assert_eq!(&out[..n], d);
    }
    let sender = claimed_sender(d);
    assert_eq!(sender.is_some(), disco && d.len() >= 2 + 32 + 24);
    if let Some(k) = sender {
        assert_eq!(&k.0[..], &d[2..34]);
    }
    if let Some(addr) = decode_addr(d) {
        let mut out = [0u8; 19];
        let n = encode_addr(&addr, &mut out);
        assert_eq!(&out[..n], d);
    }
}
