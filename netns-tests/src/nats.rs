//! The real `nats-server` (Debian's `nats-server`) in a namespace of its own, for the
//! coordinator cluster's tests: a configuration written by the test (authentication on,
//! JetStream off, nothing written to disk), one server or a cluster of several.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use crate::process::{require_tool, tail, Proc};
use crate::timing::wait_for;
use crate::topology::{Lab, Ns};

/// The client port.
pub const NATS_PORT: u16 = 4222;
/// The route port between servers of one NATS cluster.
pub const NATS_ROUTE_PORT: u16 = 6222;
/// The one user the coordinators connect as.
pub const NATS_USER: &str = "a2a-coordinator";

/// A running nats-server.
pub struct NatsServer {
    pub ns: Ns,
    pub proc: Proc,
    pub config: PathBuf,
}

impl NatsServer {
    /// `nats://IP:4222`.
    pub fn url(&self) -> String {
        format!(
            "nats://{}:{NATS_PORT}",
            self.ns.wan_ip.expect("a wan address")
        )
    }

    pub fn kill(&self) {
        self.proc.kill();
    }
}

/// The NATS credentials of a lab: the password the servers require, and the file the
/// coordinators read it from (`--nats-credentials`).
pub struct NatsAuth {
    pub password: String,
    pub file: PathBuf,
}

impl Lab {
    /// Credentials for the lab's NATS servers: a random password, written as `user:password`
    /// to a file (0600).
    pub fn nats_auth(&self) -> NatsAuth {
        let password = data_encoding::HEXLOWER.encode(&crate::garbage::Rng::new().bytes(16));
        let file = self.dir().join("nats-credentials");
        fs::write(&file, format!("{NATS_USER}:{password}\n")).expect("write NATS credentials");
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).expect("chmod");
        NatsAuth { password, file }
    }

    /// Starts `nats-server` in each of `namespaces` as one NATS cluster (routes between all
    /// of them when more than one), requiring `auth`'s user, JetStream off, no log file, no
    /// PID file; waits until each is ready for clients.
    pub fn nats_cluster(&self, namespaces: &[Ns], auth: &NatsAuth) -> Vec<NatsServer> {
        require_tool("nats-server", "nats-server");
        let routes: Vec<String> = namespaces
            .iter()
            .map(|n| {
                format!(
                    "nats-route://{NATS_USER}:{}@{}:{NATS_ROUTE_PORT}",
                    auth.password,
                    n.wan_ip.expect("wan address")
                )
            })
            .collect();
        namespaces
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let ip = ns.wan_ip.expect("wan address");
                let cluster = if namespaces.len() > 1 {
                    format!(
                        "cluster {{\n  name: a2a\n  listen: \"{ip}:{NATS_ROUTE_PORT}\"\n  \
                         authorization {{ user: \"{NATS_USER}\", password: \"{pw}\" }}\n  \
                         routes: [\n{routes}\n  ]\n}}\n",
                        pw = auth.password,
                        routes = routes
                            .iter()
                            .map(|r| format!("    \"{r}\""))
                            .collect::<Vec<_>>()
                            .join("\n")
                    )
                } else {
                    String::new()
                };
                // The coordinators' user may use the cluster's subjects and nothing else.
                let config = format!(
                    "server_name: nats-{i}\nlisten: \"{ip}:{NATS_PORT}\"\njetstream: disabled\n\
                     authorization {{\n  users: [\n    {{ user: \"{NATS_USER}\", password: \"{pw}\", \
                     permissions: {{ publish: [\"a2a.>\"], subscribe: [\"a2a.>\"] }} }}\n  ]\n}}\n\
                     {cluster}",
                    pw = auth.password
                );
                let path = self.dir().join(format!("nats-{i}.conf"));
                fs::write(&path, config).expect("write nats-server config");
                let conf = path.to_string_lossy().into_owned();
                let proc = ns.spawn("nats-server", &["nats-server", "-c", &conf]);
                wait_for(Duration::from_secs(20), "nats-server ready", || {
                    if proc.exit_status().is_some() {
                        panic!(
                            "nats-server exited at start\n--- stderr ---\n{}",
                            tail(&proc.stderr_text(), 40)
                        );
                    }
                    if proc.stderr_text().contains("Server is ready") {
                        Ok(())
                    } else {
                        Err("no \"Server is ready\" yet".to_string())
                    }
                });
                NatsServer {
                    ns: ns.clone(),
                    proc,
                    config: path,
                }
            })
            .collect()
    }
}
