//! a2a-coordinator: the switchboard of an a2a network. It authenticates nodes, hands each the
//! signed records of its network's other members, and tells nodes the address it sees them at.
//! It keeps everything in memory and writes no file but its own identity key.

use a2a_coordinator::limits::Limits;
use a2a_coordinator::{metrics, server};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use a2a_proto::keyfile;
use a2a_proto::overlay::DEFAULT_PREFIX;
use a2a_proto::JoinToken;
use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;
use x25519_dalek::{PublicKey, StaticSecret};

/// The a2a coordinator: a stateless, zero-log switchboard for a2a nodes.
#[derive(Parser)]
#[command(
    name = "a2a-coordinator",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
    /// Write the man page a2a-coordinator.8 into DIR and exit (used by packaging/build-deb).
    #[arg(long, value_name = "DIR", hide = true)]
    generate_man: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Print a join token for another new network and exit.
    Token(TokenArgs),
}

#[derive(Args)]
struct Common {
    /// Directory holding the coordinator's identity key (created 0700 if missing).
    #[arg(
        long,
        env = "A2A_COORDINATOR_STATE_DIR",
        default_value = "/var/lib/a2a-coordinator"
    )]
    state_dir: PathBuf,
    /// Address nodes reach this coordinator at (HOST:PORT); repeat for several. Defaults to
    /// the listen address when that is not a wildcard. In the environment, separate several
    /// with commas.
    #[arg(
        long = "endpoint",
        value_name = "HOST:PORT",
        env = "A2A_COORDINATOR_ENDPOINT",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// Overlay prefix the network's node addresses are derived in.
    #[arg(long, env = "A2A_COORDINATOR_PREFIX", default_value = DEFAULT_PREFIX)]
    prefix: Ipv4Net,
}

#[derive(Args)]
struct ServeArgs {
    /// TCP and UDP address to serve on; `[::]:PORT` serves IPv4 and IPv6 on one port.
    #[arg(
        long,
        value_name = "ADDR:PORT",
        env = "A2A_COORDINATOR_LISTEN",
        default_value = "0.0.0.0:7600"
    )]
    listen: SocketAddr,
    /// Seconds between two lines of counters (hidden: tests read the counters sooner).
    #[arg(long, value_name = "SECS", hide = true, default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    stats_interval: u64,
    /// UDP sockets on the port (SO_REUSEPORT), one relay loop each; 0: one per core.
    #[arg(
        long,
        value_name = "N",
        env = "A2A_COORDINATOR_UDP_SOCKETS",
        default_value_t = 0
    )]
    udp_sockets: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default): counts and gauges
    /// only, never a node's key, name or address. Bind it to loopback or a private address.
    #[arg(long, env = "A2A_METRICS", value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Milliseconds over which changes to a network's members are gathered into one message
    /// per member; 0 sends one message per change at once, as coordinators before the `peers`
    /// batch did (for nodes older than it).
    #[arg(
        long,
        value_name = "MS",
        env = "A2A_COORDINATOR_FANOUT_WINDOW_MS",
        default_value_t = 50,
        value_parser = clap::value_parser!(u64).range(0..=1000)
    )]
    fanout_window_ms: u64,
    /// Join a coordinator cluster over these NATS servers (core NATS, JetStream not used),
    /// e.g. nats://10.0.0.1:4222,nats://10.0.0.2:4222. Every coordinator of the cluster holds
    /// the same coordinator.key and the full --endpoint list. Without it: one hub, no NATS.
    #[arg(
        long,
        value_name = "URL",
        env = "A2A_COORDINATOR_NATS",
        value_delimiter = ','
    )]
    nats: Vec<String>,
    /// The NATS credentials: a file whose first line is user:password or an nkey seed (SU…).
    #[arg(
        long,
        value_name = "FILE",
        env = "A2A_COORDINATOR_NATS_CREDENTIALS",
        requires = "nats"
    )]
    nats_credentials: Option<PathBuf>,
    /// TLS to NATS with a private CA: the PEM certificate of the CA that signed the NATS
    /// servers' certificates (only it is trusted). Makes TLS required, also for nats:// URLs.
    #[arg(
        long,
        value_name = "FILE",
        env = "A2A_COORDINATOR_NATS_CA",
        requires = "nats"
    )]
    nats_ca: Option<PathBuf>,
    /// A client certificate (PEM) for NATS servers that verify clients (`verify: true`),
    /// with --nats-key. Makes TLS required.
    #[arg(
        long,
        value_name = "FILE",
        env = "A2A_COORDINATOR_NATS_CERT",
        requires_all = ["nats", "nats_key"]
    )]
    nats_cert: Option<PathBuf>,
    /// The private key (PEM) of --nats-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "A2A_COORDINATOR_NATS_KEY",
        requires = "nats_cert"
    )]
    nats_key: Option<PathBuf>,
    /// With --nats: send relay data to other coordinators over NATS only. By default a
    /// coordinator dials every --endpoint and carries relay data over a direct TCP connection
    /// (a bridge) to each other coordinator that answers, past the NATS servers.
    #[arg(long, env = "A2A_COORDINATOR_NO_BRIDGES", requires = "nats")]
    no_bridges: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct TokenArgs {
    /// The listen address, used as the endpoint when no --endpoint is given.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// The coordinator's public key (base64, printed at its start): make the token on another
    /// machine, without the coordinator's state directory, so the hub never sees the secret.
    #[arg(long, value_name = "BASE64")]
    coordinator_key: Option<String>,
    #[command(flatten)]
    common: Common,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(dir) = &cli.generate_man {
        return match generate_man(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("a2a-coordinator: {e}");
                ExitCode::FAILURE
            }
        };
    }
    a2a_proto::process::init_logging();
    let result = match cli.command {
        Some(Command::Token(args)) => print_token(&args),
        None => serve(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("a2a-coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the man pages, generated from the arguments above, into `dir`: a2a-coordinator.8 and
/// one page per subcommand (a2a-coordinator-token.8).
fn generate_man(dir: &Path) -> Result<(), String> {
    fn write(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub.clone(), dir)?;
        }
        clap_mangen::Man::new(cmd).section("8").generate_to(dir)?;
        Ok(())
    }
    let mut cmd = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    cmd.build();
    std::fs::create_dir_all(dir)
        .and_then(|()| write(cmd, dir))
        .map_err(|e| format!("cannot write man pages into {}: {e}", dir.display()))
}

/// Loads or creates the identity key; returns (private, public).
fn identity(state_dir: &Path) -> Result<([u8; 32], [u8; 32]), String> {
    let path = state_dir.join("coordinator.key");
    let (private, created) = keyfile::load_or_create(&path).map_err(|e| e.to_string())?;
    if created {
        tracing::info!("created a new coordinator identity key in the state directory");
    }
    let public = PublicKey::from(&StaticSecret::from(private)).to_bytes();
    Ok((private, public))
}

fn endpoints(common: &Common, listen: Option<SocketAddr>) -> Result<Vec<String>, String> {
    if !common.endpoints.is_empty() {
        for e in &common.endpoints {
            a2a_proto::token::validate_new_endpoint(e).map_err(|m| format!("--endpoint {m}"))?;
        }
        return Ok(common.endpoints.clone());
    }
    match listen {
        Some(l) if !l.ip().is_unspecified() => Ok(vec![l.to_string()]),
        Some(l) => Err(format!(
            "--listen {l} is a wildcard address, which nodes cannot connect to: \
             add --endpoint HOST:PORT (or A2A_COORDINATOR_ENDPOINT=HOST:PORT in the environment, \
             e.g. in /etc/default/a2a-coordinator for the systemd unit) with the address nodes \
             reach this host at"
        )),
        None => {
            Err("give --endpoint HOST:PORT (the address nodes reach the coordinator at)".into())
        }
    }
}

fn new_token(
    common: &Common,
    listen: Option<SocketAddr>,
    public: [u8; 32],
) -> Result<String, String> {
    a2a_proto::token::validate_prefix(common.prefix).map_err(|m| format!("--prefix {m}"))?;
    let endpoints = endpoints(common, listen)?;
    JoinToken::new_network(public, endpoints, common.prefix)
        .map(|t| t.encode())
        .map_err(|e| e.to_string())
}

fn print_token(args: &TokenArgs) -> Result<(), String> {
    // Check the arguments before touching the state directory.
    endpoints(&args.common, args.listen)?;
    let public = match &args.coordinator_key {
        Some(k) => {
            a2a_proto::NodeKey::from_base64(k)
                .ok_or("--coordinator-key is not a base64 32-byte key (copy it from the coordinator's start-up output)")?
                .0
        }
        None => identity(&args.common.state_dir)?.1,
    };
    println!("{}", new_token(&args.common, args.listen, public)?);
    Ok(())
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let endpoint_list = endpoints(&args.common, Some(args.listen))?;
    let (private, public) = identity(&args.common.state_dir)?;
    let token = new_token(&args.common, Some(args.listen), public)?;
    // The cluster's settings and files are checked before anything is served or printed.
    let cluster = if args.nats.is_empty() {
        None
    } else {
        let urls = a2a_coordinator::nats::parse_urls(&args.nats)?;
        let credentials = args
            .nats_credentials
            .as_deref()
            .map(a2a_coordinator::nats::Credentials::read)
            .transpose()?;
        let tls = a2a_coordinator::nats::Tls {
            ca: args.nats_ca.clone(),
            client: args.nats_cert.clone().zip(args.nats_key.clone()),
        }
        .load()?;
        Some((urls, credentials, tls))
    };
    let rt = tokio::runtime::Runtime::new().map_err(|e| format!("cannot start runtime: {e}"))?;
    rt.block_on(async move {
        let tcp = server::listen_tcp(args.listen)
            .map_err(|e| format!("cannot listen on TCP {}: {e}", args.listen))?;
        let loops = match args.udp_sockets {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let udp = server::bind_udp(args.listen, loops)
            .map_err(|e| format!("cannot listen on UDP {}: {e}", args.listen))?;
        // Bound before serving starts, so a taken port fails the start with nothing half done.
        let metrics_listener = match args.metrics {
            Some(addr) => {
                let l = a2a_proto::scrape::bind(addr).await?;
                if a2a_proto::scrape::is_exposed(addr) {
                    tracing::warn!(
                        "metrics on {addr} are reachable beyond this host's private networks: \
                         anyone there can read the hub's load; bind them to 127.0.0.1 or a \
                         private address, or firewall the port"
                    );
                }
                tracing::info!("metrics at http://{addr}/metrics");
                Some(l)
            }
            None => None,
        };
        // The mapping-check port: a second UDP destination, so `a2actl netcheck` can tell an
        // endpoint-independent NAT mapping from one that changes per destination.
        let mut alt_addr = args.listen;
        alt_addr.set_port(args.listen.port().wrapping_add(1));
        let udp_alt = match server::bind_udp(alt_addr, 1) {
            Ok(mut s) => s.pop(),
            Err(e) => {
                tracing::warn!("no NAT mapping check: cannot listen on UDP {alt_addr}: {e}");
                None
            }
        };
        tracing::info!(
            "serving control and TCP relay on {0}, discovery and UDP relay on UDP {0} ({1} \
             socket{2})",
            args.listen,
            udp.len(),
            if udp.len() == 1 { "" } else { "s" }
        );
        // The coordinator's own public key (not a node's): what `a2a-coordinator token
        // --coordinator-key` needs to make a token on another machine.
        println!("coordinator key: {}", data_encoding::BASE64.encode(&public));
        println!("join token: {token}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let limits = Limits::default().fit_fd_limit(raise_fd_limit());
        tracing::info!(
            "limits: {} connections ({} per source), {} unregistered ({} per source), \
             {}/s new connections per source (bursts of {}), registration within {:?}",
            limits.max_connections,
            limits.source_connections,
            limits.max_pending,
            limits.source_pending,
            limits.source_connect_rate.per_sec,
            limits.source_connect_rate.burst,
            limits.register_deadline
        );
        let stats_every = std::time::Duration::from_secs(args.stats_interval);
        let server = server::Server::with_limits(private, limits, stats_every);
        server.set_fanout_window(std::time::Duration::from_millis(args.fanout_window_ms));
        if let Some((urls, credentials, tls)) = cluster {
            a2a_coordinator::nats::join(&server, urls, credentials, tls, &private, &public)
                .await?;
            tracing::info!("cluster: joining over {} NATS server(s)", args.nats.len());
            if let Some(cluster) = server.cluster().filter(|_| !args.no_bridges) {
                a2a_coordinator::bridge::start(
                    cluster.sealer().clone(),
                    cluster.bridges.clone(),
                    endpoint_list,
                );
            }
        }
        // Ends with the runtime.
        if let Some(l) = metrics_listener {
            tokio::spawn(metrics::serve(l, server.clone()));
        }
        tokio::select! {
            r = server.clone().run_group(tcp, udp, udp_alt, server::Offload::from_env()) => r.map_err(|e| format!("listening socket failed: {e}")),
            _ = a2a_proto::process::shutdown_signal() => {
                tracing::info!(
                    "shutting down; all registrations were in memory only; {}",
                    server.stats_line()
                );
                Ok(())
            }
        }
    })
}

/// Raises the soft limit of open files to the hard one (systemd starts services at 1024) and
/// returns the limit in force: every control connection is a file descriptor.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // Refused under a system-call filter without @resources: keep the soft limit.
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}
