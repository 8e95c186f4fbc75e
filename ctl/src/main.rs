//! a2actl: the command line of a2a. Talks to the local `a2ad` over its Unix socket.

mod assets;
mod client;
mod output;
mod ssh;

use std::path::PathBuf;
use std::process::ExitCode;

use a2a_proto::api::{ApiRequest, ApiResponse};
use a2a_proto::invite::InviteCode;
use a2a_proto::JoinToken;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Join this machine to an a2a network and see its peers.
#[derive(Parser)]
#[command(name = "a2actl", version, about)]
struct Cli {
    /// a2ad's local API socket [default: /run/a2a/a2ad.sock, or STATE_DIR/a2ad.sock when --state-dir is given]
    #[arg(long, env = "A2A_SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// a2ad's state directory (locates its socket when --socket is not given)
    #[arg(long, env = "A2A_STATE_DIR", global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the network of a join token or invite code; prints this node's overlay IPv4 address.
    Up {
        /// The join token printed by a2a-coordinator (a2a1…), or an invite code printed by
        /// `a2actl invite` on a member (a2ai…).
        #[arg(long, value_name = "TOKEN|CODE")]
        join: String,
        /// This node's name in the network (a-z, 0-9, '-'); defaults to the host name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Leave the network and remove the overlay interface.
    Down,
    /// Show this node and its peers.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print this node's overlay IPv4 address (with -6, its IPv6 one).
    Ip {
        /// Print the IPv6 overlay address instead (in the network's unique-local /48).
        #[arg(short = '6')]
        v6: bool,
    },
    /// Who holds an overlay address: the member's name, public key, addresses and whether it
    /// joined with the token or an invite. For servers deciding what a caller may do.
    Whois {
        /// An overlay IPv4 or IPv6 address, optionally with a port (as a server sees its
        /// caller): 100.64.1.2, 100.64.1.2:40000, [fd12:3456:789a:1::2]:40000.
        #[arg(value_name = "IP[:PORT]")]
        addr: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Probe a peer (name or overlay IP) over its current path: path, endpoint and RTT of each probe.
    Ping {
        /// The peer's name or overlay IPv4 or IPv6 address.
        peer: String,
        /// Number of probes, one a second.
        #[arg(short = 'c', long, default_value_t = 4)]
        count: u32,
    },
    /// Check the underlay: reflexive address, whether UDP works, NAT mapping behaviour, relay mode.
    Netcheck {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print an invite code that lets a new machine join (`a2actl up --join CODE`) without the
    /// network secret. Needs a node that joined with the token, online when the code is used.
    Invite {
        /// How many machines may join with the code.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long the code works, e.g. 90s, 10m, 2h, 1d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// A tag each machine joining with the code carries from its first packet (repeat
        /// for several).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
    },
    /// Give a member tags (signed with the network key: neither the member nor the
    /// coordinator can add one). Token holders only.
    Tag {
        /// The member's name, overlay address or public key (this node's own name too).
        peer: String,
        #[arg(required = true, value_name = "TAG")]
        tags: Vec<String>,
    },
    /// Take tags from a member.
    Untag {
        peer: String,
        #[arg(required = true, value_name = "TAG")]
        tags: Vec<String>,
    },
    /// Who may reach whom: set, show or test the network's policy.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Remove a peer (name, overlay IP or public key) from the network: every member drops it
    /// and the coordinator refuses it from now on.
    Kick {
        /// The peer's name, overlay IPv4 or IPv6 address or public key.
        peer: String,
    },
    /// Advertise a service listening on this node's overlay addresses to the other members
    /// (peer to peer: the coordinator never sees it), or stop advertising one.
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// List every member's services, this node's included.
    Services {
        /// Print JSON (node, name, ip, ip6, port, proto, path, card) instead of a table.
        #[arg(long)]
        json: bool,
        /// Only A2A agents whose card has a skill with this id.
        #[arg(long, value_name = "ID")]
        skill: Option<String>,
    },
    /// Carry members' TCP connections to a port of this node to a local program
    /// (`a2ad --userspace`, where no TUN device holds the overlay address).
    Forward {
        #[command(subcommand)]
        action: ForwardAction,
    },
    /// List the port forwards.
    Forwards,
    /// Log in to a member with the system's OpenSSH, authenticated by the overlay (no keys to
    /// hand out, no host-key prompt); `ssh enable` lets members log in here.
    Ssh(ssh::SshArgs),
    /// Manage the network secret.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
}

#[derive(Subcommand)]
enum ForwardAction {
    /// Forward PORT of this node's overlay address (replaces a forward of that port); kept
    /// across restarts.
    Add {
        port: u16,
        /// Where the connections go on this host [default: 127.0.0.1:PORT].
        #[arg(long, value_name = "ADDR")]
        to: Option<std::net::SocketAddr>,
        /// The protocol forwarded: tcp (connections) or udp (datagrams).
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp"])]
        proto: String,
    },
    /// Stop forwarding PORT (TCP and UDP).
    Rm { port: u16 },
}

#[derive(Subcommand)]
enum ServiceAction {
    /// Advertise a service (replaces one of the same name); kept across restarts, withdrawn
    /// by `a2actl down`.
    Add {
        /// The service's name (a-z, 0-9, '-', at most 63).
        name: String,
        /// The port it listens on (on this node's overlay addresses).
        #[arg(long)]
        port: u16,
        /// What speaks on it: a2a (an A2A agent, whose card is read and published), mcp,
        /// http or tcp.
        #[arg(long, default_value = "tcp", value_parser = parse_proto)]
        proto: a2a_proto::services::Proto,
        /// The endpoint path (e.g. /mcp for an MCP server).
        #[arg(long)]
        path: Option<String>,
    },
    /// Stop advertising a service.
    Rm { name: String },
}

fn parse_proto(text: &str) -> Result<a2a_proto::services::Proto, String> {
    a2a_proto::services::Proto::parse(text)
}

#[derive(Subcommand)]
enum PolicyAction {
    /// Sign the policy in FILE (JSON; `-` for standard input) with the network key and pass
    /// it to every member; it replaces the one in force. Token holders only. A policy that
    /// does not parse or names a tag no member carries is refused, and the one in force stays.
    Set { file: PathBuf },
    /// The policy in force on this node, its grants with the flows each allowed, and what
    /// was refused.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Whether SRC may open PORT (tcp:N, udp:N or icmp) on DST, and by which grant; exits 1
    /// when refused.
    Test {
        src: String,
        dst: String,
        port: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Move the network to a new secret and print the new token. Members online (and those that
    /// reconnect while the coordinator runs) come along; kicked and offline-and-forgotten nodes,
    /// and anyone holding only the old token, are left out.
    Rotate,
}

fn main() -> ExitCode {
    let matches = assets::with_generator(Cli::command()).get_matches();
    let result = match assets::generator_dir(&matches) {
        Some(dir) => assets::generate(Cli::command(), &dir),
        None => run(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("a2actl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ping(socket: &std::path::Path, peer: &str, count: u32) -> Result<(), String> {
    let mut answered = 0;
    for i in 0..count.max(1) {
        let started = std::time::Instant::now();
        let request = ApiRequest::Ping {
            peer: peer.to_string(),
        };
        match client::call(socket, &request)? {
            ApiResponse::Pong { pong } => {
                println!("{}", output::ping_line(&pong));
                if pong.rtt_ms.is_some() {
                    answered += 1;
                }
            }
            ApiResponse::Error { message } => return Err(message),
            other => return Err(format!("unexpected answer from a2ad: {other:?}")),
        }
        if i + 1 < count {
            std::thread::sleep(std::time::Duration::from_secs(1).saturating_sub(started.elapsed()));
        }
    }
    if answered == 0 {
        return Err(format!(
            "no probe to {peer} was answered: is it up? see `a2actl status` and `a2actl netcheck`"
        ));
    }
    Ok(())
}

/// The policy document in `file` (`-`: standard input), checked here first so that a
/// document too large or malformed is named even when a2ad is not running.
fn read_policy(file: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let limit = a2a_proto::policy::MAX_POLICY_LEN as u64 + 1;
    let mut text = String::new();
    let read = if file == std::path::Path::new("-") {
        std::io::stdin().take(limit).read_to_string(&mut text)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(limit).read_to_string(&mut text))
    };
    read.map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    if text.len() as u64 >= limit {
        let len = std::fs::metadata(file).map_or(text.len() as u64, |m| m.len());
        return Err(format!(
            "{}: {len} bytes or more, more than the limit of {} bytes: split the policy or use \
             tags; the policy in force is unchanged",
            file.display(),
            a2a_proto::policy::MAX_POLICY_LEN
        ));
    }
    a2a_proto::policy::Policy::parse(&text, None)
        .map_err(|e| format!("{}: {e}; the policy in force is unchanged", file.display()))?;
    Ok(text)
}

fn run(cli: Cli) -> Result<(), String> {
    let (socket, _) = a2a_proto::api::resolve_paths(cli.socket, cli.state_dir);
    if let Command::Ping { peer, count } = &cli.command {
        return ping(&socket, peer, *count);
    }
    let cli = match cli.command {
        Command::Ssh(args) => return ssh::run(&socket, args),
        command => Cli {
            command,
            socket: None,
            state_dir: None,
        },
    };
    let request = match &cli.command {
        Command::Up { join, name } => {
            // Check the token here too, so a bad one is named even when a2ad is not running.
            if InviteCode::is_invite(join) {
                InviteCode::parse(join).map_err(|e| e.to_string())?;
            } else {
                JoinToken::parse(join).map_err(|e| e.to_string())?;
            }
            if let Some(n) = name {
                a2a_proto::record::validate_name(n).map_err(|e| format!("--name: {e}"))?;
            }
            ApiRequest::Up {
                token: join.trim().to_string(),
                name: name.clone(),
            }
        }
        Command::Down => ApiRequest::Down,
        Command::Status { .. } => ApiRequest::Status,
        Command::Ip { .. } => ApiRequest::Ip,
        Command::Whois { addr, .. } => {
            // Checked here too, so bad input is named even when a2ad is not running.
            a2a_proto::api::parse_whois_addr(addr)?;
            ApiRequest::Whois { addr: addr.clone() }
        }
        Command::Ping { .. } | Command::Ssh(_) => unreachable!("handled above"),
        Command::Netcheck { .. } => ApiRequest::Netcheck,
        Command::Invite { uses, ttl, tags } => ApiRequest::Invite {
            uses: *uses,
            ttl_s: ttl.as_secs().max(1),
            tags: tags.clone(),
        },
        Command::Tag { peer, tags } => ApiRequest::Tag {
            peer: peer.clone(),
            tags: tags.clone(),
        },
        Command::Untag { peer, tags } => ApiRequest::Untag {
            peer: peer.clone(),
            tags: tags.clone(),
        },
        Command::Policy {
            action: PolicyAction::Set { file },
        } => ApiRequest::PolicySet {
            text: read_policy(file)?,
        },
        Command::Policy {
            action: PolicyAction::Show { .. },
        } => ApiRequest::PolicyShow,
        Command::Policy {
            action: PolicyAction::Test { src, dst, port, .. },
        } => ApiRequest::PolicyTest {
            src: src.clone(),
            dst: dst.clone(),
            port: port.clone(),
        },
        Command::Kick { peer } => ApiRequest::Kick { peer: peer.clone() },
        Command::Service {
            action:
                ServiceAction::Add {
                    name,
                    port,
                    proto,
                    path,
                },
        } => {
            let service = a2a_proto::services::ServiceSpec {
                name: name.clone(),
                port: *port,
                proto: *proto,
                path: path.clone(),
            };
            service.validate()?;
            ApiRequest::ServiceAdd { service }
        }
        Command::Service {
            action: ServiceAction::Rm { name },
        } => ApiRequest::ServiceRm { name: name.clone() },
        Command::Services { .. } => ApiRequest::Services,
        Command::Forward {
            action: ForwardAction::Add { port, to, proto },
        } => {
            // Only tcp and udp parse (clap's value parser).
            let proto = if proto == "udp" {
                a2a_proto::api::ForwardProto::Udp
            } else {
                a2a_proto::api::ForwardProto::Tcp
            };
            if *port == 0 {
                return Err("a forward's port is 1 to 65535".into());
            }
            ApiRequest::ForwardAdd {
                forward: a2a_proto::api::Forward {
                    port: *port,
                    to: to.unwrap_or_else(|| ([127, 0, 0, 1], *port).into()),
                    proto,
                },
            }
        }
        Command::Forward {
            action: ForwardAction::Rm { port },
        } => ApiRequest::ForwardRm { port: *port },
        Command::Forwards => ApiRequest::Forwards,
        Command::Token {
            action: TokenAction::Rotate,
        } => ApiRequest::RotateToken,
    };
    match client::call(&socket, &request)? {
        ApiResponse::Error { message } => Err(message),
        ApiResponse::Up { ip, .. } => {
            println!("{ip}");
            Ok(())
        }
        ApiResponse::Down { was_up } => {
            if was_up {
                eprintln!("left the network; the overlay interface is removed");
            } else {
                eprintln!("this node was not joined to a network");
            }
            Ok(())
        }
        ApiResponse::Ip { ip, ip6 } => {
            if matches!(cli.command, Command::Ip { v6: true }) {
                let ip6 = ip6.ok_or(
                    "this a2ad reports no IPv6 overlay address: it predates them; upgrade it",
                )?;
                println!("{ip6}");
            } else {
                println!("{ip}");
            }
            Ok(())
        }
        ApiResponse::Whois { member } => {
            if matches!(cli.command, Command::Whois { json: true, .. }) {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&member).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", output::whois_text(&member));
            }
            Ok(())
        }
        ApiResponse::Netcheck { report } => {
            if matches!(cli.command, Command::Netcheck { json: true }) {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", output::netcheck_text(&report));
            }
            Ok(())
        }
        ApiResponse::ServicesSaved { services } => {
            eprintln!(
                "this node advertises {} service(s){}",
                services.len(),
                if services.is_empty() {
                    String::new()
                } else {
                    format!(
                        ": {}",
                        services
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            );
            Ok(())
        }
        ApiResponse::Services { mut services } => {
            let Command::Services { json, skill } = &cli.command else {
                return Err("unexpected services answer from a2ad".into());
            };
            if let Some(id) = skill {
                services.retain(|s| {
                    s.card
                        .as_ref()
                        .is_some_and(|c| c.skills.iter().any(|k| &k.id == id))
                });
            }
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&services).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", output::services_table(&services));
            }
            Ok(())
        }
        ApiResponse::Forwards { forwards } => {
            if matches!(cli.command, Command::Forwards) {
                for f in &forwards {
                    println!("{} {} -> {}", f.proto, f.port, f.to);
                }
            } else {
                eprintln!("{} forward(s)", forwards.len());
            }
            Ok(())
        }
        ApiResponse::Pong { .. } => Err("unexpected ping answer from a2ad".into()),
        ApiResponse::Tagged { name, tags } => {
            if tags.is_empty() {
                eprintln!("{name} carries no tags now");
            } else {
                eprintln!("{name} carries {}", tags.join(", "));
            }
            Ok(())
        }
        ApiResponse::Policy { policy } => {
            let json = matches!(
                cli.command,
                Command::Policy {
                    action: PolicyAction::Show { json: true }
                }
            );
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&policy).map_err(|e| e.to_string())?
                );
            } else if matches!(
                cli.command,
                Command::Policy {
                    action: PolicyAction::Set { .. }
                }
            ) {
                eprintln!(
                    "policy version {} is in force here and goes to every member",
                    policy.version
                );
            } else {
                print!("{}", output::policy_text(&policy));
            }
            Ok(())
        }
        ApiResponse::PolicyTest { verdict } => {
            if matches!(
                cli.command,
                Command::Policy {
                    action: PolicyAction::Test { json: true, .. }
                }
            ) {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&verdict).map_err(|e| e.to_string())?
                );
            } else {
                println!("{}", verdict.reason);
            }
            if verdict.allowed {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        ApiResponse::SshEnabled { .. }
        | ApiResponse::SshDisabled { .. }
        | ApiResponse::SshAuthorizedKeys { .. }
        | ApiResponse::SshKnownHosts { .. }
        | ApiResponse::SshPeer { .. } => Err("unexpected ssh answer from a2ad".into()),
        ApiResponse::Invite { code, uses, ttl_s } => {
            println!("{code}");
            eprintln!(
                "invite for {uses} machine(s), valid {}: run `a2actl up --join CODE` there; this \
                 node must be online when it is used",
                humantime::format_duration(std::time::Duration::from_secs(ttl_s))
            );
            Ok(())
        }
        ApiResponse::Kicked {
            name,
            ip,
            holds_secret,
        } => {
            eprintln!("removed {name} ({ip}); every member drops its packets");
            if holds_secret {
                eprintln!(
                    "warning: {name} joined with the token and still holds the network secret: \
                     it could rejoin under a new key; run `a2actl token rotate` to shut it out"
                );
            }
            Ok(())
        }
        ApiResponse::Rotated { token, carried } => {
            println!("{token}");
            eprintln!(
                "the network moved to a new secret; {} member(s) carried along{}; the old token \
                 no longer joins this network",
                carried.len(),
                if carried.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", carried.join(", "))
                }
            );
            Ok(())
        }
        ApiResponse::Status { status } => {
            let json = matches!(cli.command, Command::Status { json: true });
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", output::status_table(&status));
            }
            Ok(())
        }
    }
}
