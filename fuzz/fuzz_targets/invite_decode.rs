//! Invite codes as `a2actl up --join` passes them, and the inviter's sealed answer a redeemer
//! opens: whatever parses re-encodes to the same code (lowercase, trimmed), every refusal names
//! the invite code, and an answer opens only if it was sealed for that code and node key.

#![no_main]

use a2a_fuzz::run;
use a2a_proto::invite::{InviteCode, InviteError};
use a2a_proto::sealed::Sealed;
use a2a_proto::NodeKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data, || {
    let text = String::from_utf8_lossy(data);
    match InviteCode::parse(&text) {
        Ok(c) => {
            let encoded = c.encode();
            assert_eq!(encoded, text.trim().to_ascii_lowercase());
            assert_eq!(InviteCode::parse(&encoded).as_ref(), Ok(&c));
            assert!(InviteCode::is_invite(&encoded));
            assert_eq!(c.id().to_hex().len(), 32);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("invite code"), "{msg}");
            if let InviteError::Truncated { expected, got } = e {
                assert!(expected > got, "{msg}");
            }
        }
    }
    // The same bytes as a sealed answer: never opens for a code that did not seal it.
    let code = InviteCode {
        secret: [3; 16],
        coordinator_key: [4; 32],
        endpoints: vec!["198.51.100.1:7600".into()],
    };
    if let Some(sealed) = a2a_proto::keys::base64_strict(&text).and_then(Sealed::from_bytes) {
        assert!(code.open_answer(&NodeKey([5; 32]), &sealed).is_none());
    }
}));
