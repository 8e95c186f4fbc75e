//! Control messages as JSON, both directions: whatever parses must survive a round trip, and the
//! fields the coordinator and node check next (proof, records, statements, sealed answers) must
//! not panic. Keys and secrets are decoded by the parse itself (typed fields).

#![no_main]

use a2a_fuzz::{check_record, network_id, round_trip, run, HANDSHAKE_HASH};
use a2a_proto::control::{ClientMsg, ServerMsg};
use a2a_proto::invite::InviteCode;
use a2a_proto::keys::REGISTER_CONTEXT;
use a2a_proto::membership::{Revocation, RotationNotice};
use a2a_proto::policy::{PolicyDoc, TagStatement};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data, || {
    if let Ok(m) = serde_json::from_slice::<ClientMsg>(data) {
        round_trip(&m);
        coordinator_reads(&m);
    }
    if let Ok(m) = serde_json::from_slice::<ServerMsg>(data) {
        round_trip(&m);
        node_reads(&m);
    }
}));

/// What the coordinator's registry does with a client message.
pub fn coordinator_reads(m: &ClientMsg) {
    match m {
        ClientMsg::Register {
            network,
            proof,
            record,
            ..
        } => {
            if proof.is_some_and(|p| network.verify(REGISTER_CONTEXT, &HANDSHAKE_HASH, &p.0)) {
                let _ = check_record(record, network);
            }
        }
        ClientMsg::Update { record } => {
            let _ = check_record(record, &network_id());
        }
        ClientMsg::Revoke { revocation } => {
            let _ = Revocation::open(revocation, &network_id());
        }
        ClientMsg::Rotate { notice } => {
            let _ = RotationNotice::open(notice, &network_id());
        }
        ClientMsg::Statement { signed } => {
            if PolicyDoc::open(signed, &network_id()).is_err() {
                let _ = TagStatement::open(signed, &network_id());
            }
        }
        ClientMsg::Heartbeat
        | ClientMsg::Leave
        | ClientMsg::Punch { .. }
        | ClientMsg::InviteOpen { .. }
        | ClientMsg::InviteClose { .. }
        | ClientMsg::Redeem { .. }
        | ClientMsg::InviteAdmit { .. }
        | ClientMsg::InviteDeny { .. } => {}
    }
}

/// What a node does with a coordinator message.
pub fn node_reads(m: &ServerMsg) {
    match m {
        ServerMsg::PeerUp { record, .. } => {
            let _ = check_record(record, &network_id());
        }
        ServerMsg::Peers { up, .. } => {
            for e in up {
                let _ = check_record(&e.record, &network_id());
            }
        }
        ServerMsg::Revoked { revocation } => {
            let _ = Revocation::open(revocation, &network_id());
        }
        ServerMsg::Moved { notice } => {
            if let Ok(n) = RotationNotice::open(notice, &network_id()) {
                let _ = n.carry_for(&x25519_dalek::StaticSecret::from([7u8; 32]));
            }
        }
        ServerMsg::Statement { signed } => {
            if PolicyDoc::open(signed, &network_id()).is_err() {
                let _ = TagStatement::open(signed, &network_id());
            }
        }
        ServerMsg::InviteAdmitted { sealed } => {
            let code = InviteCode {
                secret: [9; 16],
                coordinator_key: [1; 32],
                endpoints: vec!["h:1".into()],
            };
            let _ = code.open_answer(&a2a_proto::NodeKey([2; 32]), sealed);
        }
        _ => {}
    }
}
