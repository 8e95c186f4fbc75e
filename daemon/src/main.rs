//! a2ad: the a2a node daemon. A userspace WireGuard peer (boringtun's `noise`) behind a TUN
//! device, joined to an a2a network through its coordinator.

use a2a_daemon::io::kernel::Kernel;
use a2a_daemon::io::state::StateDir;
use a2a_daemon::io::userspace::Userspace;
use a2a_daemon::io::Platform;
use a2a_daemon::node::session::DeviceConfig;
use a2a_daemon::node::{api, commands::Daemon, metrics};

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
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default). Bind it to loopback or
    /// a private address: the metrics name this node's peers.
    #[arg(long, env = "A2A_METRICS", value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Leave the host's resolver alone: do not register the overlay resolver with
    /// systemd-resolved for `*.a2a` (it still answers at its address, shown by `a2actl status`).
    /// For hosts that manage DNS otherwise, and for many daemons on one host (tests).
    #[arg(long, env = "A2A_NO_SYSTEM_DNS", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    no_system_dns: bool,
    /// Run without a TUN device and without privileges: the overlay ends in a userspace TCP/IP
    /// stack in a2ad; programs reach members through the SOCKS5 and HTTP proxies, members reach
    /// programs through `a2actl forward add`. For containers, sandboxes and CI jobs.
    #[arg(long, env = "A2A_USERSPACE")]
    userspace: bool,
    /// SOCKS5 proxy address in userspace mode (CONNECT; `socks5h://` resolves NAME.a2a)
    /// [default: 127.0.0.1:1080]
    #[arg(long, env = "A2A_SOCKS5", value_name = "ADDR")]
    socks5: Option<std::net::SocketAddr>,
    /// HTTP proxy address in userspace mode (CONNECT and plain `GET http://NAME.a2a/...`)
    /// [default: 127.0.0.1:3128]
    #[arg(long, env = "A2A_HTTP_PROXY", value_name = "ADDR")]
    http_proxy: Option<std::net::SocketAddr>,
    /// In userspace mode, serve no SOCKS5 proxy.
    #[arg(long, env = "A2A_NO_SOCKS5")]
    no_socks5: bool,
    /// In userspace mode, serve no HTTP proxy.
    #[arg(long, env = "A2A_NO_HTTP_PROXY")]
    no_http_proxy: bool,
    /// Write the man page a2ad.8 into DIR and exit (used by packaging/build-deb).
    #[arg(long, value_name = "DIR", hide = true)]
    generate_man: Option<PathBuf>,
}

/// The kernel's TUN clone device, opened when the overlay interface is created.
const TUN_DEVICE: &str = "/dev/net/tun";

/// Opens the TUN device once at start, so that a machine (or container, or unit) without it makes
/// a2ad fail at once with what to do, not later at `a2actl up`. Nothing is created here: the
/// interface only exists while a network is joined.
fn check_tun_device() -> Result<(), String> {
    let e = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_DEVICE)
    {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let what = match e.raw_os_error() {
        Some(libc::ENOENT) => {
            "load the tun module (`modprobe tun`, and add `tun` to /etc/modules-load.d/ to keep it \
             across reboots) or, in a container, mount the device into it \
             (`--device /dev/net/tun` for docker and podman)"
        }
        Some(libc::ENODEV) | Some(libc::ENXIO) => {
            "the device node exists but the kernel has no TUN driver: load the tun module \
             (`modprobe tun`) or use a kernel built with CONFIG_TUN"
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "run a2ad as root (or with CAP_NET_ADMIN) with access to the device: in a container \
             pass it through (`--device /dev/net/tun`), in a systemd unit allow it \
             (`DeviceAllow=/dev/net/tun rw`)"
        }
        _ => "check that /dev/net/tun is the kernel's TUN device (character device 10:200)",
    };
    Err(format!("cannot open {TUN_DEVICE}: {e}; {what}"))
}

/// Writes the man page, generated from the arguments above, into `dir`.
fn generate_man(dir: &std::path::Path) -> Result<(), String> {
    let path = dir.join("a2ad.8");
    let mut page = Vec::new();
    clap_mangen::Man::new(<Args as clap::CommandFactory>::command())
        .section("8")
        .render(&mut page)
        .map_err(|e| format!("cannot render the man page: {e}"))?;
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&path, page))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(dir) = &args.generate_man {
        return match generate_man(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("a2ad: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let proxy_flags =
        args.socks5.is_some() || args.http_proxy.is_some() || args.no_socks5 || args.no_http_proxy;
    if !args.userspace && proxy_flags {
        eprintln!(
            "a2ad: --socks5, --http-proxy, --no-socks5 and --no-http-proxy are for userspace \
             mode: add --userspace (with a TUN device, programs reach members directly)"
        );
        return ExitCode::FAILURE;
    }
    // Before anything is bound or created, so a failure leaves nothing half set up.
    if !args.userspace {
        if let Err(e) = check_tun_device() {
            eprintln!(
                "a2ad: {e}\n\
                 a2ad: or, without a TUN device and without privileges, start it as \
                 `a2ad --userspace --state-dir DIR`: programs then reach members through a \
                 SOCKS5 proxy (127.0.0.1:1080) and an HTTP proxy (127.0.0.1:3128), and members \
                 reach this host through `a2actl forward add PORT`"
            );
            return ExitCode::FAILURE;
        }
    }
    a2a_proto::process::init_logging();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("a2ad: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if args.userspace {
        rt.block_on(run_userspace(args))
    } else {
        rt.block_on(run(args, Kernel, None))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("a2ad: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Userspace mode: the daemon on the userspace platform, with its proxies bound before it
/// starts (a taken port fails the start).
async fn run_userspace(args: Args) -> Result<(), String> {
    let platform = Userspace::new();
    let socks5 = match args.no_socks5 {
        true => None,
        false => {
            let addr = args.socks5.unwrap_or(([127, 0, 0, 1], 1080).into());
            Some(a2a_daemon::tasks::proxy::bind(addr, "SOCKS5", "--socks5").await?)
        }
    };
    let http = match args.no_http_proxy {
        true => None,
        false => {
            let addr = args.http_proxy.unwrap_or(([127, 0, 0, 1], 3128).into());
            Some(a2a_daemon::tasks::proxy::bind(addr, "HTTP", "--http-proxy").await?)
        }
    };
    if let Some(l) = &socks5 {
        tracing::info!(
            "SOCKS5 proxy on {} (ALL_PROXY=socks5h://{0})",
            l.local_addr().map_err(|e| e.to_string())?
        );
    }
    if let Some(l) = &http {
        tracing::info!(
            "HTTP proxy on {} (HTTP_PROXY=http://{0})",
            l.local_addr().map_err(|e| e.to_string())?
        );
    }
    tracing::info!(
        "userspace mode: no TUN device; the overlay resolver is not served (names resolve in \
         the proxies); the service lists and the policy's exchange run on the stack"
    );
    let proxies = tokio::spawn(a2a_daemon::tasks::proxy::serve(
        socks5,
        http,
        platform.clone(),
    ));
    run(args, platform, Some(proxies)).await
}

async fn run<P: Platform>(
    args: Args,
    platform: P,
    proxies: Option<tokio::task::JoinHandle<()>>,
) -> Result<(), String> {
    if args.interface.is_empty() || args.interface.len() > 15 {
        return Err(format!(
            "--interface {:?}: an interface name has 1 to 15 characters",
            args.interface
        ));
    }
    let (socket, state_dir) = a2a_proto::api::resolve_paths(args.socket, args.state_dir);
    // In userspace mode the resolver is off: it binds kernel sockets on the resolver's address
    // for the host's programs, which reach members through the proxies instead. The service
    // lists and the policy's exchange run on the platform's overlay sockets (the stack's).
    let kernel = !args.userspace;
    let device = DeviceConfig {
        interface: args.interface,
        udp_port: args.port,
        serve_dns: kernel,
        serve_services: true,
        system_dns: kernel && !args.no_system_dns,
    };
    let daemon = Arc::new(Daemon::new(platform, device, StateDir::new(&state_dir))?);
    // Bound before anything starts, so a taken port fails the start with nothing half done.
    let metrics_listener = match args.metrics {
        Some(addr) => {
            let l = a2a_proto::scrape::bind(addr).await?;
            if a2a_proto::scrape::is_exposed(addr) {
                tracing::warn!(
                    "metrics on {addr} are reachable beyond this host's private networks and \
                     name this node's peers; bind them to 127.0.0.1 or a private address"
                );
            }
            tracing::info!("metrics at http://{addr}/metrics");
            Some(l)
        }
        None => None,
    };
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
    let metrics_task = metrics_listener.map(|l| tokio::spawn(metrics::serve(l, daemon.clone())));
    a2a_proto::process::shutdown_signal().await;
    tracing::info!("shutting down (membership stays saved)");
    api_task.abort();
    if let Some(t) = proxies {
        t.abort();
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    daemon.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
