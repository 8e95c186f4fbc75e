//! What both daemons (`a2ad`, `a2a-coordinator`) do the same way as processes: log to stderr,
//! filtered by `A2A_LOG` (default `info`), and stop on SIGINT or SIGTERM.

/// Sends `tracing` output to stderr, with colours only on a terminal. The NATS client
/// (`a2a-coordinator --nats`) logs at most warnings whatever `A2A_LOG` says: at its debug and
/// trace levels it prints its CONNECT line, NATS password included, and every message.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("A2A_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive("async_nats=warn".parse().expect("a valid directive"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .init();
}

/// Resolves on SIGINT or SIGTERM (systemd's stop).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
