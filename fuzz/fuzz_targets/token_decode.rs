//! Join tokens as `a2actl up --join` (and the local API) pass them: whatever parses is the
//! canonical encoding of what it parsed to (lowercase, trimmed), and every refusal names the
//! token and, when truncated, a length longer than what was given.

#![no_main]

use a2a_fuzz::run;
use a2a_proto::token::{JoinToken, TokenError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data, || {
    let text = String::from_utf8_lossy(data);
    match JoinToken::parse(&text) {
        Ok(t) => {
            let encoded = t.encode();
            assert_eq!(encoded, text.trim().to_ascii_lowercase());
            assert_eq!(JoinToken::parse(&encoded).as_ref(), Ok(&t));
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("token"), "{msg}");
            if let TokenError::Truncated { expected, got } = e {
                assert!(expected > got, "{msg}");
            }
        }
    }
}));
