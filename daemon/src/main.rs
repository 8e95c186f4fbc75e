//! a2ad: the a2a node daemon. A userspace WireGuard peer (boringtun's `noise`) behind a TUN
//! device, joined to an a2a network through its coordinator.

mod api;
mod control;
mod daemon;
mod dataplane;
mod netconf;
mod peers;
mod session;
mod state;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

/// The a2a node daemon. Start it once per machine; join a network with `a2actl up --join TOKEN`.
#[derive(Parser)]
#[command(name = "a2ad", version, about)]
struct Args {
    /// Local API socket [default: /run/a2a/a2ad.sock, or STATE_DIR/a2ad.sock when --state-dir is given]
    #[arg(long, env = "A2A_SOCKET")]
    socket: Option<PathBuf>,
    /// State directory: node key and network membership [default: /var/lib/a2a]
    #[arg(long, env = "A2A_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Name of the TUN interface.
    #[arg(long, env = "A2A_INTERFACE", default_value = "a2a0")]
    interface: String,
    /// UDP port for WireGuard traffic.
    #[arg(long, env = "A2A_PORT", default_value_t = 51820)]
    port: u16,
}

fn main() -> ExitCode {
    let args = Args::parse();
    a2a_proto::process::init_logging();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("a2ad: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("a2ad: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    if args.interface.is_empty() || args.interface.len() > 15 {
        return Err(format!(
            "--interface {:?}: an interface name has 1 to 15 characters",
            args.interface
        ));
    }
    let (socket, state_dir) = a2a_proto::api::resolve_paths(args.socket, args.state_dir);
    let device = session::DeviceConfig {
        interface: args.interface,
        udp_port: args.port,
    };
    let daemon = Arc::new(daemon::Daemon::new(
        device,
        state::StateDir::new(&state_dir),
    )?);
    let listener = api::bind(&socket).await?;
    tracing::info!(
        "a2ad {} listening on {}",
        env!("CARGO_PKG_VERSION"),
        socket.display()
    );
    if let Err(e) = daemon.resume().await {
        // Keep serving: the user can fix it with `a2actl up`.
        tracing::error!("could not rejoin the saved network: {e}");
    }
    let api_task = tokio::spawn(api::serve(listener, daemon.clone()));
    a2a_proto::process::shutdown_signal().await;
    tracing::info!("shutting down (membership stays saved)");
    api_task.abort();
    daemon.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
