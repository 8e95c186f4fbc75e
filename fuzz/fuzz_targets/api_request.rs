//! a2ad's local API socket: one request line, read with the daemon's own `read_line` and line
//! limit, then parsed. First byte: the limit (0: the daemon's real one, `MAX_API_LINE`; n: n
//! bytes, so that cut lines are reached); the rest is what the client sends.

#![no_main]

use a2a_fuzz::{block_on, round_trip, run};
use a2a_proto::api::{parse_request, read_line, MAX_API_LINE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data, || {
    let Some((&limit, stream)) = data.split_first() else {
        return;
    };
    let limit = match limit {
        0 => MAX_API_LINE,
        n => n as usize,
    };
    let mut line = Vec::new();
    block_on(read_line(stream, limit, &mut line)).expect("reading a slice cannot fail");
    assert!(line.len() <= limit);
    assert!(stream.starts_with(&line));
    match line.iter().position(|&b| b == b'\n') {
        Some(i) => assert_eq!(i + 1, line.len(), "one line only"),
        None => assert_eq!(line.len(), limit.min(stream.len())),
    }
    if let Ok(request) = parse_request(&line) {
        round_trip(&request);
    }
}));
