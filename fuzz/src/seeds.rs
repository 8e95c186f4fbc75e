//! Valid inputs for each target, written to `corpus/<target>/` by `examples/gen_seeds.rs`. A few
//! per target: libFuzzer grows the rest (in `work/`, never committed).

use a2a_proto::api::ApiRequest;
use a2a_proto::control::{ClientMsg, RefuseReason, ServerMsg};
use a2a_proto::disco::{encode_body, DiscoKey, DiscoMsg, MAX_BODY_LEN, MAX_DISCO_LEN};
use a2a_proto::invite::{InviteId, InviteProof};
use a2a_proto::keys::{RelaySecret, Signature, SignerId, REGISTER_CONTEXT};
use a2a_proto::noise_channel::{handshake_initiator, MAX_FRAME, RELAY_FRAME};
use a2a_proto::udp::{encode_addr, write_relay_header, A2aDatagram, MAX_A2A_DATAGRAM};
use a2a_proto::{JoinToken, NodeRecord};
use data_encoding::BASE64;
use x25519_dalek::StaticSecret;

use crate::*;

/// Named seeds of one target; empty for a target without any.
pub fn for_target(target: &str) -> Vec<(String, Vec<u8>)> {
    let seeds: Vec<(&str, Vec<u8>)> = match target {
        "api_request" => api_request(),
        "control_msg" => control_msg(),
        "disco_open" => disco_open(),
        "keyfile" => keyfile(),
        "noise_frame" => noise_frame(),
        "noise_handshake" => noise_handshake(),
        "record_verify" => record_verify(),
        "token_decode" => token_decode(),
        "invite_decode" => invite_decode(),
        "udp_datagram" => udp_datagram(),
        _ => Vec::new(),
    };
    seeds.into_iter().map(|(n, b)| (n.to_string(), b)).collect()
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

fn api_request() -> Vec<(&'static str, Vec<u8>)> {
    let token = token().encode();
    let line = |r: &ApiRequest| {
        // First byte 0: the daemon's real line limit.
        let mut v = vec![0];
        v.extend(json(r));
        v.push(b'\n');
        v
    };
    let mut cut = line(&ApiRequest::Status);
    cut[0] = 8; // an 8-byte limit cuts the line
    vec![
        (
            "up",
            line(&ApiRequest::Up {
                token,
                name: Some("worker-1".into()),
            }),
        ),
        ("status", line(&ApiRequest::Status)),
        ("ping", line(&ApiRequest::Ping { peer: "bob".into() })),
        ("netcheck-down-ip", {
            let mut v = line(&ApiRequest::Netcheck);
            v.extend(json(&ApiRequest::Down));
            v.extend(b"\n");
            v.extend(json(&ApiRequest::Ip));
            v
        }),
        ("status-cut", cut),
    ]
}

fn signed() -> a2a_proto::SignedRecord {
    record().sign(network_key())
}

fn client_msgs() -> Vec<(&'static str, ClientMsg)> {
    vec![
        (
            "register",
            ClientMsg::Register {
                batches: true,
                network: network_id(),
                proof: Some(Signature(
                    network_key().sign(REGISTER_CONTEXT, &HANDSHAKE_HASH),
                )),
                record: signed(),
            },
        ),
        ("update", ClientMsg::Update { record: signed() }),
        ("heartbeat", ClientMsg::Heartbeat),
        ("leave", ClientMsg::Leave),
        (
            "punch",
            ClientMsg::Punch {
                to: node_key(NODE_B_SECRET),
            },
        ),
        (
            "revoke",
            ClientMsg::Revoke {
                revocation: a2a_proto::membership::Signed::sign(
                    &a2a_proto::membership::Revocation {
                        network: network_id(),
                        node_key: node_key(NODE_B_SECRET),
                        issued_ms: 1,
                    },
                    network_key(),
                    a2a_proto::keys::REVOKE_CONTEXT,
                ),
            },
        ),
        (
            "redeem",
            ClientMsg::Redeem {
                invite: InviteId([0; 16]),
                signing_key: SignerId::from_base64(&BASE64.encode(&[1; 32]))
                    .expect("a valid Ed25519 key"),
                proof: InviteProof([2; 32]),
            },
        ),
    ]
}

fn server_msgs() -> Vec<(&'static str, ServerMsg)> {
    vec![
        (
            "registered",
            ServerMsg::Registered {
                heartbeat_s: 10,
                relay_id: 7,
                relay_secret: RelaySecret([3; 16]),
                peers: 1,
            },
        ),
        (
            "refused",
            ServerMsg::Refused {
                reason: RefuseReason::AddressInUse,
                message: "taken".into(),
            },
        ),
        (
            "peer-up",
            ServerMsg::PeerUp {
                record: signed(),
                relay_id: 8,
            },
        ),
        (
            "punch",
            ServerMsg::Punch {
                from: node_key(NODE_B_SECRET),
            },
        ),
        (
            "peer-down",
            ServerMsg::PeerDown {
                node_key: node_key(NODE_B_SECRET),
            },
        ),
        (
            "peers",
            ServerMsg::Peers {
                down: vec![node_key(NODE_B_SECRET)],
                up: vec![a2a_proto::control::PeerEntry {
                    record: signed(),
                    relay_id: 8,
                }],
            },
        ),
        ("heartbeat-ack", ServerMsg::HeartbeatAck),
    ]
}

fn control_msg() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<_> = client_msgs()
        .into_iter()
        .map(|(n, m)| (n, json(&m)))
        .collect();
    v.extend(server_msgs().into_iter().map(|(n, m)| match n {
        "punch" => ("punch-from", json(&m)),
        _ => (n, json(&m)),
    }));
    v
}

/// `tag | len (2) | bytes`: an even tag seals the bytes as the next frame.
fn chunk(out: &mut Vec<u8>, seal: bool, bytes: &[u8]) {
    out.push(if seal { 0 } else { 1 });
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn relay_plain(id: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![RELAY_FRAME];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn noise_frame() -> Vec<(&'static str, Vec<u8>)> {
    // First byte: direction, 0 node to coordinator (ClientMsg), 1 the other way (ServerMsg).
    let mut to_coordinator = vec![0];
    for (_, m) in client_msgs() {
        chunk(&mut to_coordinator, true, &json(&m));
    }
    chunk(
        &mut to_coordinator,
        true,
        &relay_plain(8, &[4, 0, 0, 0, 1, 2, 3]),
    );
    let mut to_node = vec![1];
    for (_, m) in server_msgs() {
        chunk(&mut to_node, true, &json(&m));
    }
    chunk(&mut to_node, true, &relay_plain(7, &[0xA2, 0x10, 1]));
    let mut raw = vec![0];
    chunk(&mut raw, false, &[0, 20, 1, 2, 3]);
    chunk(&mut raw, true, &json(&ClientMsg::Heartbeat));
    let mut big = vec![1];
    chunk(
        &mut big,
        true,
        &relay_plain(1, &vec![9; MAX_FRAME - 16 - 5]),
    );
    vec![
        ("to-coordinator", to_coordinator),
        ("to-node", to_node),
        ("raw-then-sealed", raw),
        ("largest-relay", big),
    ]
}

fn noise_handshake() -> Vec<(&'static str, Vec<u8>)> {
    // First byte even: the coordinator reads a node's first message; odd: a node reads the
    // coordinator's answer.
    let mut wire = Wire::new(&[]);
    let _ = block_on(handshake_initiator(
        &mut wire,
        &NODE_A_SECRET,
        &public(COORDINATOR_SECRET),
    ));
    let mut first = vec![0];
    first.extend_from_slice(&wire.output);
    let mut answer = vec![1];
    answer.extend_from_slice(&[0, 48]);
    answer.extend_from_slice(&[0x55; 48]);
    vec![("first-message", first), ("an-answer", answer)]
}

fn disco_open() -> Vec<(&'static str, Vec<u8>)> {
    // First byte even: a sealed datagram from node A to node B; odd: an opened body.
    let a = StaticSecret::from(NODE_A_SECRET);
    let key = DiscoKey::derive(&a, &node_key(NODE_B_SECRET));
    let msgs = [
        ("ping", "body-ping", DiscoMsg::Ping { tx: [1; 12] }),
        (
            "pong4",
            "body-pong4",
            DiscoMsg::Pong {
                tx: [2; 12],
                observed: "198.51.100.4:40000".parse().unwrap(),
            },
        ),
        (
            "pong6",
            "body-pong6",
            DiscoMsg::Pong {
                tx: [3; 12],
                observed: "[2001:db8::1]:51820".parse().unwrap(),
            },
        ),
    ];
    let mut v = Vec::new();
    for (name, body_name, m) in msgs {
        let mut sealed = [0u8; MAX_DISCO_LEN];
        let n = key.seal(&node_key(NODE_A_SECRET), &m, &mut sealed);
        let mut s = vec![0];
        s.extend_from_slice(&sealed[..n]);
        v.push((name, s));
        let mut body = [0u8; MAX_BODY_LEN];
        let n = encode_body(&m, &mut body);
        let mut b = vec![1];
        b.extend_from_slice(&body[..n]);
        v.push((body_name, b));
    }
    v
}

fn keyfile() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("key", format!("{}\n", BASE64.encode(&[7; 32])).into_bytes()),
        ("short", BASE64.encode(&[7; 31]).into_bytes()),
    ]
}

fn record_verify() -> Vec<(&'static str, Vec<u8>)> {
    // First byte mod 3: 0 a signed record (JSON) for the fixed network; 1 a record body, signed
    // by the target; 2 a network id (32) then a signed record.
    let s = signed();
    let mut json_signed = vec![0];
    json_signed.extend(json(&s));
    let mut body = vec![1];
    body.extend(s.body.as_bytes());
    let mut many = record();
    many.candidates = (0..16)
        .map(|i| format!("10.0.0.{i}:{}", 1000 + i).parse().unwrap())
        .collect();
    let mut many_body = vec![1];
    many_body.extend(serde_json::to_vec(&many).unwrap());
    let mut other_net = vec![2];
    other_net.extend_from_slice(&network_id().0);
    other_net.extend(json(&s));
    let invalid = NodeRecord {
        name: "Not-Valid".into(),
        ..record()
    };
    let mut invalid_body = vec![1];
    invalid_body.extend(serde_json::to_vec(&invalid).unwrap());
    vec![
        ("signed", json_signed),
        ("body", body),
        ("body-16-candidates", many_body),
        ("network-and-record", other_net),
        ("body-invalid-name", invalid_body),
    ]
}

fn token() -> JoinToken {
    JoinToken {
        coordinator_key: public(COORDINATOR_SECRET),
        network_secret: NETWORK_SECRET,
        prefix: "100.64.0.0/10".parse().unwrap(),
        endpoints: vec!["hub.example.org:7600".into(), "[2001:db8::1]:7600".into()],
    }
}

fn token_decode() -> Vec<(&'static str, Vec<u8>)> {
    let t = token();
    let one = JoinToken {
        endpoints: vec!["h:1".into()],
        prefix: "10.0.0.0/28".parse().unwrap(),
        ..t.clone()
    };
    let s = t.encode();
    vec![
        ("token", s.clone().into_bytes()),
        ("one-endpoint", one.encode().into_bytes()),
        (
            "upper-spaced",
            format!("  {}\n", s.to_uppercase()).into_bytes(),
        ),
        ("cut", s.as_bytes()[..60].to_vec()),
    ]
}

fn udp_datagram() -> Vec<(&'static str, Vec<u8>)> {
    let mut v = Vec::new();
    for (name, m) in [
        ("probe", A2aDatagram::EndpointProbe { nonce: [1; 8] }),
        (
            "reply4",
            A2aDatagram::EndpointReply {
                nonce: [2; 8],
                observed: "203.0.113.9:51820".parse().unwrap(),
            },
        ),
        (
            "reply6",
            A2aDatagram::EndpointReply {
                nonce: [3; 8],
                observed: "[2001:db8::9]:51820".parse().unwrap(),
            },
        ),
        (
            "bind",
            A2aDatagram::RelayBind {
                nonce: [4; 8],
                relay_id: 7,
                secret: RelaySecret([5; 16]),
            },
        ),
    ] {
        let mut buf = [0u8; MAX_A2A_DATAGRAM];
        let n = m.encode(&mut buf);
        v.push((name, buf[..n].to_vec()));
    }
    let mut relay = vec![0u8; 6];
    write_relay_header(&mut relay, 9);
    relay.extend_from_slice(&[4, 0, 0, 0, 1, 2, 3, 4]);
    v.push(("relay-wireguard", relay));
    let mut relay_disco = vec![0u8; 6];
    write_relay_header(&mut relay_disco, 9);
    relay_disco.extend_from_slice(&[0xA2, 0x10]);
    relay_disco.extend_from_slice(&[0; 70]);
    v.push(("relay-disco", relay_disco));
    v.push(("wireguard-init", {
        let mut w = vec![1, 0, 0, 0];
        w.extend_from_slice(&[0; 144]);
        w
    }));
    let mut addr = [0u8; 19];
    let n = encode_addr(&"[::ffff:10.0.0.1]:80".parse().unwrap(), &mut addr);
    v.push(("addr", addr[..n].to_vec()));
    v
}

fn invite_decode() -> Vec<(&'static str, Vec<u8>)> {
    let code = a2a_proto::invite::InviteCode {
        secret: [7; 16],
        coordinator_key: public(COORDINATOR_SECRET),
        endpoints: vec!["hub.example.org:7600".into(), "[2001:db8::1]:7600".into()],
    };
    let s = code.encode();
    vec![
        ("code", s.clone().into_bytes()),
        (
            "upper-spaced",
            format!("  {}\n", s.to_uppercase()).into_bytes(),
        ),
        ("cut", s.as_bytes()[..40].to_vec()),
        ("token-prefix", b"a2a1abcdef".to_vec()),
    ]
}
