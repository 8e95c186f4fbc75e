//! Policy documents as `a2actl policy set` reads them and members re-parse them, bundles of
//! statements as members fetch them from each other, and digest datagrams: whatever parses
//! survives a round trip through its own JSON, a refusal names a position inside the text, and
//! a document naming tags is refused for an unknown one with that tag's own position.

#![no_main]

use std::collections::BTreeSet;

use a2a_fuzz::run;
use a2a_proto::policy::{parse_digest, Bundle, Policy, PolicyError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data, || {
    let _ = parse_digest(data);
    if let Ok(b) = serde_json::from_slice::<Bundle>(data) {
        let again: Bundle = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(again, b);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count().max(1);
    match Policy::parse(text, None) {
        Ok(p) => {
            let again = Policy::parse(&serde_json::to_string(&p).unwrap(), None).unwrap();
            assert_eq!(again, p);
            // With no tag known, any tag it names is refused, at a line of the text.
            match Policy::parse(text, Some(&BTreeSet::new())) {
                Ok(_) => {}
                Err(PolicyError::UnknownTag { line, .. }) => assert!(line <= lines),
                Err(e) => panic!("parsed without tags, refused with none known: {e}"),
            }
        }
        Err(PolicyError::Syntax { line, .. }) | Err(PolicyError::SshWithoutPort { line, .. }) => {
            assert!(line >= 1 && line <= lines + 1, "line {line} of {lines}")
        }
        Err(_) => {}
    }
}));
