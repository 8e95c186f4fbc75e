//! The real `nats-server` (Debian's `nats-server`) in a namespace of its own, for the
//! coordinator cluster's tests: a configuration written by the test (authentication on,
//! JetStream off, nothing written to disk), one server or a cluster of several.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use crate::coordinator::{CoordOpts, Coordinator, COORDINATOR_PORT};
use crate::process::{
    kill_children, require_tool, tail, traced_file_writes, Proc, TRACE_FILE_CALLS,
};
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
    /// The nats-server, or the strace that runs it ([`NatsServer::trace`]).
    pub proc: Proc,
    pub config: PathBuf,
    /// Where strace writes what nats-server did to files, when it runs under strace.
    pub trace: Option<PathBuf>,
}

impl NatsServer {
    /// `nats://IP:4222`.
    pub fn url(&self) -> String {
        format!(
            "nats://{}:{NATS_PORT}",
            self.ns.wan_ip.expect("a wan address")
        )
    }

    /// SIGKILL (the traced nats-server first: strace killed alone would let it run on).
    pub fn kill(&self) {
        if self.trace.is_some() {
            kill_children(self.proc.pid());
        }
        self.proc.kill();
    }

    /// Stops it and returns the lines of its file-system trace that open a file for writing
    /// or change one: none is allowed (`nats-server` must write nothing).
    pub fn file_writes(&self) -> Vec<String> {
        self.kill();
        let trace = self.trace.as_ref().expect("started under strace");
        let text = fs::read_to_string(trace).expect("read the nats-server trace");
        traced_file_writes(&text)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // The lab kills what it started (strace); the tracee must not outlive it.
        if self.trace.is_some() {
            kill_children(self.proc.pid());
        }
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
    /// PID file; waits until each is ready for clients. `traced`: each runs under
    /// `strace -f` of its file-system calls ([`NatsServer::file_writes`]).
    pub fn nats_cluster(
        &self,
        namespaces: &[Ns],
        auth: &NatsAuth,
        traced: bool,
    ) -> Vec<NatsServer> {
        require_tool("nats-server", "nats-server");
        if traced {
            require_tool("strace", "strace");
        }
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
                let trace = traced.then(|| self.dir().join(format!("nats-{i}.strace")));
                let proc = match &trace {
                    Some(t) => {
                        let t = t.to_string_lossy().into_owned();
                        ns.spawn(
                            "nats-server",
                            &["strace", "-f", "--seccomp-bpf", "-qq", "-o", &t, "-e", TRACE_FILE_CALLS, "nats-server", "-c", &conf],
                        )
                    }
                    None => ns.spawn("nats-server", &["nats-server", "-c", &conf]),
                };
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
                    trace,
                }
            })
            .collect()
    }

    /// `n` coordinators in namespaces `coord1`…, forming one cluster over `nats`: they share
    /// one identity (the first one's `coordinator.key`, copied into the others' state
    /// directories) and the full `--endpoint` list, each is given every NATS server's URL and
    /// `auth`'s credentials, and serves its metrics on its wan address, port
    /// `metrics_port`. `strace`: each runs under strace ([`CoordOpts::strace`]).
    pub fn coordinators_on_nats(
        &self,
        nats: &[NatsServer],
        auth: &NatsAuth,
        n: usize,
        metrics_port: u16,
        strace: bool,
    ) -> Vec<Coordinator> {
        let namespaces: Vec<Ns> = (1..=n).map(|i| self.add_ns(&format!("coord{i}"))).collect();
        let endpoints: Vec<String> = namespaces
            .iter()
            .map(|ns| format!("{}:{COORDINATOR_PORT}", ns.wan_ip.expect("wan address")))
            .collect();
        let urls: Vec<String> = nats.iter().map(NatsServer::url).collect();
        let mut out: Vec<Coordinator> = Vec::new();
        for ns in namespaces {
            let opts = CoordOpts {
                endpoints: endpoints.clone(),
                nats: urls.clone(),
                nats_credentials: Some(auth.file.clone()),
                key_from: out.first().map(|c| c.state_dir.join("coordinator.key")),
                metrics: Some(format!(
                    "{}:{metrics_port}",
                    ns.wan_ip.expect("wan address")
                )),
                strace,
                ..CoordOpts::default()
            };
            out.push(self.coordinator_in(ns, opts));
        }
        out
    }
}
