//! a2actl: the command line of a2a. Talks to the local `a2ad` over its Unix socket.

mod assets;
mod client;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use a2a_proto::api::{ApiRequest, ApiResponse};
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
    /// Join the network of a join token; prints this node's overlay IPv4 address.
    Up {
        /// The join token printed by a2a-coordinator (a2a1…).
        #[arg(long, value_name = "TOKEN")]
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
    /// Print this node's overlay IPv4 address.
    Ip,
    /// Probe a peer (name or overlay IP) over its current path: path, endpoint and RTT of each probe.
    Ping {
        /// The peer's name or overlay IPv4 address.
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

fn run(cli: Cli) -> Result<(), String> {
    let (socket, _) = a2a_proto::api::resolve_paths(cli.socket, cli.state_dir);
    if let Command::Ping { peer, count } = &cli.command {
        return ping(&socket, peer, *count);
    }
    let request = match &cli.command {
        Command::Up { join, name } => {
            // Check the token here too, so a bad one is named even when a2ad is not running.
            JoinToken::parse(join).map_err(|e| e.to_string())?;
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
        Command::Ip => ApiRequest::Ip,
        Command::Ping { .. } => unreachable!("handled above"),
        Command::Netcheck { .. } => ApiRequest::Netcheck,
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
        ApiResponse::Ip { ip } => {
            println!("{ip}");
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
        ApiResponse::Pong { .. } => Err("unexpected ping answer from a2ad".into()),
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
