//! A coordinator that forges: the real `a2a-coordinator` server with a test-only hook that
//! injects, into every node's control connection, what an attacker who owns the hub would
//! send to add or remove machines. `tests/membership.rs` runs it and shows that no node accepts
//! any of it and no packet from the forged member reaches an agent.
//!
//! Arguments (the subset of a2a-coordinator's the harness passes): `--listen ADDR:PORT
//! --state-dir DIR [--prefix CIDR] [--endpoint HOST:PORT]`. Prints `join token: …` like the real
//! one.
//!
//! Injected after each registration, into the node that registered (and the forged member's
//! record and handshakes into every other member too, so a test can watch them arrive):
//! - `forged-unsigned`: a record with no signature;
//! - `forged`: a record of the forger's own WireGuard key, signed with a key the forger made up,
//!   followed by WireGuard handshake initiations from that key over the relay;
//! - `forged-cert`: a record carrying a member certificate the forger signed itself;
//! - `foreign`: a record correctly signed, but for another network;
//! - every other member's first record again (a replay: stale), and a copy with its overlay
//!   address changed (bad signature);
//! - a revocation of every other member and a rotation notice moving the network, both signed
//!   with the made-up key.
//!
//! With `--policy-attack` it also withholds every policy and tag statement members send it
//! (members must pass them to each other over the overlay), and hands each node that registers
//! the first statements it saw again (a replay of old versions), a policy that opens everything
//! and tags, both signed with the made-up key.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use a2a_coordinator::server::{Injected, Server, Tamper};
use a2a_proto::control::ServerMsg;
use a2a_proto::keys::{REVOKE_CONTEXT, ROTATE_CONTEXT};
use a2a_proto::membership::{issue_cert, node_signing_key, Revocation, RotationNotice, Signed};
use a2a_proto::policy::{PolicyDoc, TagStatement};
use a2a_proto::{JoinToken, NetworkId, NetworkKey, NodeKey, NodeRecord, SignedRecord};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// The relay id the forged member's datagrams claim to come from.
const FORGED_RELAY_ID: u32 = 0x00F0_0001;
/// Handshake initiations sent from the forged member to each node.
const FORGED_INITIATIONS: usize = 8;

struct Forger {
    prefix: ipnet::Ipv4Net,
    /// The forger's made-up network key: signs what only the network key may sign.
    rogue: NetworkKey,
    /// A real network of the forger's own, for correctly signed foreign records.
    foreign: NetworkKey,
    /// The forged member's WireGuard key.
    forged_secret: [u8; 32],
    /// The first record each node registered with, to replay later.
    first_records: Mutex<HashMap<NodeKey, (NetworkId, SignedRecord)>>,
    /// `--policy-attack`: withhold every policy and tag statement, and hand each node that
    /// registers the first statements seen again (old versions) and a policy signed with the
    /// made-up key.
    policy_attack: bool,
    /// The first statements the coordinator passed on (withheld), to replay.
    first_statements: Mutex<Vec<Signed>>,
}

fn host(prefix: ipnet::Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(prefix.network()) + n)
}

/// The SSH keys every forged record carries (and a tampered real record is given): a user key
/// whose private half the ssh test derives from the same seed, and a host key.
fn forged_ssh_keys() -> a2a_proto::ssh::SshKeys {
    a2a_proto::ssh::SshKeys {
        user: Some(a2a_proto::ssh::public_of(&[0x55; 32]).to_openssh()),
        host: Some(a2a_proto::ssh::public_of(&[0x56; 32]).to_openssh()),
    }
}

fn peer_up(record: SignedRecord) -> Injected {
    Injected::Msg(ServerMsg::PeerUp {
        record,
        relay_id: FORGED_RELAY_ID,
    })
}

impl Forger {
    fn record(&self, network: NetworkId, key: NodeKey, name: &str, n: u32) -> NodeRecord {
        NodeRecord {
            network,
            node_key: key,
            name: name.into(),
            ip: host(self.prefix, n),
            candidates: vec![],
            issued_ms: u64::MAX / 2,
            ssh: Some(forged_ssh_keys()),
        }
    }

    fn forged_key(&self) -> NodeKey {
        NodeKey(PublicKey::from(&StaticSecret::from(self.forged_secret)).to_bytes())
    }
}

impl Tamper for Forger {
    fn withhold(&self, msg: &ServerMsg) -> bool {
        if !self.policy_attack {
            return false;
        }
        if let ServerMsg::Statement { signed } = msg {
            let mut firsts = self.first_statements.lock().unwrap();
            if firsts.len() < 8 && !firsts.contains(signed) {
                firsts.push(signed.clone());
            }
            return true;
        }
        false
    }

    fn after_register(
        &self,
        network: &NetworkId,
        record: &SignedRecord,
    ) -> Vec<(NodeKey, Injected)> {
        let Ok(target) = serde_json::from_str::<NodeRecord>(&record.body) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let forged = self.forged_key();
        let forged_record = self
            .record(*network, forged, "forged", 201)
            .sign(&self.rogue);

        // No signature at all.
        let mut unsigned = self
            .record(*network, NodeKey([0x11; 32]), "forged-unsigned", 200)
            .sign(&self.rogue);
        unsigned.sig.clear();
        out.push(peer_up(unsigned));

        // The forged member: a real WireGuard key, a record signed with a made-up key.
        out.push(peer_up(forged_record.clone()));

        // A certificate the forger issued itself, for a signing key it holds.
        let signer = node_signing_key(&[0x22; 32]);
        let cert = issue_cert(
            &self.rogue,
            NodeKey([0x33; 32]),
            signer.verifying_key().into(),
            a2a_proto::invite::InviteId([0; 16]),
            1,
        );
        out.push(peer_up(
            self.record(*network, NodeKey([0x33; 32]), "forged-cert", 202)
                .sign_with_cert(&signer, &cert),
        ));

        // Correctly signed, for another network.
        out.push(peer_up(
            self.record(self.foreign.id(), NodeKey([0x44; 32]), "foreign", 203)
                .sign(&self.foreign),
        ));

        let mut firsts = self.first_records.lock().unwrap();
        let mut others = Vec::new();
        for (key, (net, first)) in firsts.iter() {
            if net != network || *key == target.node_key {
                continue;
            }
            others.push(*key);
            // A replay of an older record: stale.
            out.push(peer_up(first.clone()));
            // The same record with its address moved: the signature no longer covers it.
            if let Ok(mut body) = serde_json::from_str::<NodeRecord>(&first.body) {
                body.ip = host(self.prefix, 204);
                body.issued_ms += 1_000_000;
                body.ssh = Some(forged_ssh_keys());
                out.push(peer_up(SignedRecord {
                    body: serde_json::to_string(&body).unwrap(),
                    ..first.clone()
                }));
            }
            // Removing a member without the network key.
            let revocation = Revocation {
                network: *network,
                node_key: *key,
                issued_ms: 1,
            };
            out.push(Injected::Msg(ServerMsg::Revoked {
                revocation: Signed::sign(&revocation, &self.rogue, REVOKE_CONTEXT),
            }));
        }
        firsts
            .entry(target.node_key)
            .or_insert((*network, record.clone()));
        drop(firsts);

        // Moving the network to one the forger controls.
        let notice = RotationNotice {
            old_network: *network,
            new_network: self.foreign.id(),
            rotator: forged,
            issued_ms: 1,
            carried: vec![],
        };
        out.push(Injected::Msg(ServerMsg::Moved {
            notice: Signed::sign(&notice, &self.rogue, ROTATE_CONTEXT),
        }));

        if self.policy_attack {
            // Old statements again (a replay: older than what members hold by now).
            for signed in self.first_statements.lock().unwrap().iter() {
                out.push(Injected::Msg(ServerMsg::Statement {
                    signed: signed.clone(),
                }));
            }
            // A policy opening everything, signed with the made-up key, of a high version.
            let forged = PolicyDoc::sign(
                &self.rogue,
                999,
                1,
                r#"{"grants": [{"src": ["*"], "dst": ["*"], "ports": ["*"]}]}"#,
                None,
            )
            .expect("a valid policy");
            out.push(Injected::Msg(ServerMsg::Statement { signed: forged }));
            // Tags signed with the made-up key, for the registering node and the forged member.
            for node_key in [target.node_key, self.forged_key()] {
                let tags = TagStatement {
                    network: *network,
                    node_key,
                    version: 999,
                    issued_ms: 1,
                    tags: ["planner", "worker"]
                        .iter()
                        .map(|t| t.to_string())
                        .collect(),
                };
                if let Ok(signed) = tags.sign(&self.rogue) {
                    out.push(Injected::Msg(ServerMsg::Statement { signed }));
                }
            }
        }

        let mut out: Vec<(NodeKey, Injected)> =
            out.into_iter().map(|i| (target.node_key, i)).collect();
        // The forged member announced to the others too.
        for key in &others {
            out.push((*key, peer_up(forged_record.clone())));
        }
        // Handshake initiations from the forged member, relayed, to everyone.
        for key in others.iter().chain([&target.node_key]) {
            for i in 0..FORGED_INITIATIONS {
                let mut tunn = Tunn::new(
                    StaticSecret::from(self.forged_secret),
                    PublicKey::from(key.0),
                    None,
                    None,
                    i as u32,
                    None,
                );
                let mut buf = vec![0u8; 256];
                if let TunnResult::WriteToNetwork(init) =
                    tunn.format_handshake_initiation(&mut buf, true)
                {
                    out.push((
                        *key,
                        Injected::Relay {
                            from: FORGED_RELAY_ID,
                            datagram: init.to_vec(),
                        },
                    ));
                }
            }
        }
        out
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen: SocketAddr = arg(&args, "--listen")
        .expect("--listen ADDR:PORT")
        .parse()
        .expect("--listen is ADDR:PORT");
    let state_dir = std::path::PathBuf::from(arg(&args, "--state-dir").expect("--state-dir DIR"));
    let prefix: ipnet::Ipv4Net = arg(&args, "--prefix")
        .unwrap_or_else(|| a2a_proto::overlay::DEFAULT_PREFIX.into())
        .parse()
        .expect("--prefix is a CIDR");
    let endpoint = arg(&args, "--endpoint").unwrap_or_else(|| listen.to_string());
    a2a_proto::process::init_logging();

    let (private, _) = a2a_proto::keyfile::load_or_create(&state_dir.join("coordinator.key"))
        .expect("coordinator key");
    let public = PublicKey::from(&StaticSecret::from(private)).to_bytes();
    let token = JoinToken::new_network(public, vec![endpoint], prefix).expect("token");

    let forger = Forger {
        prefix,
        rogue: NetworkKey::derive(&rand::random()),
        foreign: NetworkKey::derive(&rand::random()),
        forged_secret: rand::random(),
        first_records: Mutex::new(HashMap::new()),
        policy_attack: args.iter().any(|a| a == "--policy-attack"),
        first_statements: Mutex::new(Vec::new()),
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let tcp = tokio::net::TcpListener::bind(listen)
            .await
            .expect("TCP listen");
        let udp = tokio::net::UdpSocket::bind(listen)
            .await
            .expect("UDP listen");
        let mut alt = listen;
        alt.set_port(listen.port() + 1);
        let udp_alt = tokio::net::UdpSocket::bind(alt).await.ok();
        println!("join token: {}", token.encode());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let server = Server::new(private);
        server.set_tamper(Arc::new(forger));
        let _ = server.run(tcp, udp, udp_alt).await;
    });
}
