//! Key files (node.key, coordinator.key): a key is read only from its one canonical text,
//! base64 of 32 bytes, white space around it ignored.

#![no_main]

use a2a_fuzz::run;
use a2a_proto::keyfile::parse_key;
use data_encoding::BASE64;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data, || {
    let text = String::from_utf8_lossy(data);
    if let Some(key) = parse_key(&text) {
        assert_eq!(BASE64.encode(&key), text.trim());
    }
}));
