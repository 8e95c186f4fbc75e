//! End-to-end test harness for a2a: real binaries (`a2a-coordinator`, `a2ad`, `a2actl`) in Linux
//! network namespaces, with real TUN devices.
//!
//! A [`Lab`] is one isolated topology: a "wan" namespace holding a Linux bridge, and any number
//! of namespaces (coordinator, nodes, attackers) each connected to that bridge by a veth pair and
//! given an address in `10.<x>.0.0/24`. Everything a lab creates is named after the test process
//! id and a per-process counter, so tests can run in parallel (and next to another `cargo test`)
//! without colliding. Dropping the lab (also while a test panics) kills every process it started
//! and deletes its namespaces; when the test failed, the logs of every process are printed and
//! kept on disk.
//!
//! Root is needed. Without it (or when `ip netns add` fails) [`Lab::new`] returns `None` after
//! printing "skipped: needs root", except when `CI=true`, where it panics: CI must not silently
//! skip the end-to-end tests.
//!
//! Binaries are taken from `$A2A_BIN_DIR`, else from the cargo target directory of the test
//! executable (`target/debug/deps/x` -> `target/debug`).
//!
//! The modules, each depending only on those listed before it:
//! - `timing`: [`in_ci`], [`report`], [`poll`], [`wait_for`], [`wait_until`];
//! - `process`: the binaries ([`Bins`]), commands with a time limit ([`Output`],
//!   [`run_host`]), background processes ([`Proc`]), [`require_tool`] and [`require_tools`],
//!   file-system traces by strace (what they show written);
//! - [`garbage`]: hostile bytes;
//! - `topology`: [`Lab`], namespaces ([`Ns`]), NAT routers ([`Router`], [`Nat`]);
//! - `impair`: lossy, slow wan links ([`Impairment`], [`Lab::router_impaired`]) with the
//!   `a2a-impair` forwarder (the one exception to the order: a [`Router`] holds its
//!   [`ImpairedWan`], and `Lab::add_ns_behind` asks whether it has one);
//! - `services`: programs run in a namespace (HTTP server, curl, ping, iperf3);
//! - `capture`: tcpdump ([`Capture`]);
//! - `status`: `a2actl status --json` ([`Status`]);
//! - `checks`: [`in_prefix`], [`assert_private_files`];
//! - `coordinator`: [`Coordinator`], [`CoordOpts`] (and [`Lab::coordinator`]), its metrics
//!   ([`scrape_metrics`], [`metric`]);
//! - `nats`: the real `nats-server` for the coordinator cluster ([`NatsServer`],
//!   [`Lab::nats_cluster`], [`NatsAuth`]) and a cluster of coordinators over it
//!   ([`Lab::coordinators_on_nats`]);
//! - `node`: [`Node`] (and [`Lab::node`], [`Lab::node_behind`]);
//! - `container`: a machine with systemd as PID 1 in a lab namespace ([`Container`], booted
//!   with systemd-nspawn from a cached Debian root, [`Lab::container`]);
//! - `portmap`: port-mapping servers on a router: miniupnpd ([`MiniUpnpd`]) and a hostile one
//!   ([`FakePortMapper`]).

mod capture;
mod checks;
mod container;
mod coordinator;
pub mod garbage;
mod impair;
mod nats;
mod node;
mod portmap;
mod process;
mod services;
mod status;
mod timing;
mod topology;

pub use capture::Capture;
pub use checks::{assert_private_files, in_prefix};
pub use container::{container_root, Bind, Container};
pub use coordinator::{
    coordinator_counter, metric, scrape_metrics, CoordOpts, Coordinator, COORDINATOR_PORT,
    DEFAULT_PREFIX,
};
pub use impair::{ForwarderCounters, PingStats, WireLoss};
pub use nats::{
    cut_off_from_nats, NatsAuth, NatsServer, NatsTls, NATS_CUT_TABLE, NATS_PORT, NATS_USER,
};
pub use node::{Node, NODE_PORT, OVERLAY_TIMEOUT};
pub use portmap::{FakePortMapper, Lie, MiniUpnpd, PORTMAP_PORT};
pub use process::{cpu_time, require_tool, require_tools, run_host, Bins, Output, Proc};
pub use services::{HttpServer, HTTP_PORT, IPERF_PORT};
pub use status::{PeerStatus, SelfStatus, Status};
pub use timing::{in_ci, poll, report, wait_for, wait_until};
pub use topology::{ImpairedWan, Impairment};
pub use topology::{Lab, Nat, Ns, Router};
