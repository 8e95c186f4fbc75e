//! Signed node records, as the coordinator and every node verify them. First byte mod 3:
//! 0: a signed record (JSON) checked against the fixed network; 1: a record body the target signs
//! with the network key (what a member could publish), so the body parser is reached; 2: a
//! network id (32 bytes, chosen by whoever registers) and a signed record (JSON).

#![no_main]

use a2a_fuzz::{check_record, network_id, network_key, run};
use a2a_proto::keys::RECORD_CONTEXT;
use a2a_proto::record::{sanitize_name, validate_name, RecordError, MAX_RECORD_LEN};
use a2a_proto::{NetworkId, SignedRecord};
use data_encoding::BASE64;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data, || {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(s) = serde_json::from_slice::<SignedRecord>(rest) {
                let _ = check_record(&s, &network_id());
            }
        }
        1 => {
            let body = String::from_utf8_lossy(rest).into_owned();
            let sig = BASE64.encode(&network_key().sign(RECORD_CONTEXT, body.as_bytes()));
            let s = SignedRecord {
                body,
                sig,
                cert: None,
            };
            match check_record(&s, &network_id()) {
                Err(RecordError::TooLarge) => assert!(s.body.len() > MAX_RECORD_LEN),
                Err(RecordError::BadSignature) => panic!("a genuine signature was refused"),
                Err(RecordError::Unsigned) => panic!("a signed record was called unsigned"),
                // A body naming another network is foreign, whoever signed it.
                Err(RecordError::Foreign)
                | Err(RecordError::Malformed(_) | RecordError::Invalid(_))
                | Ok(_) => {}
            }
        }
        _ => {
            if let Some((id, json)) = rest.split_first_chunk::<32>() {
                if let Ok(s) = serde_json::from_slice::<SignedRecord>(json) {
                    let _ = check_record(&s, &NetworkId(*id));
                }
            }
        }
    }
    // Any host name becomes a valid node name.
    let name = sanitize_name(&String::from_utf8_lossy(rest));
    assert!(validate_name(&name).is_ok(), "{name:?}");
}));
