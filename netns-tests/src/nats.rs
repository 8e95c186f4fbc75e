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

/// The nftables table [`cut_off_from_nats`] adds (deleting it ends the cut).
pub const NATS_CUT_TABLE: &str = "a2a_natscut";

/// Drops the traffic between `ns` and the NATS servers (their client port), both ways, until
/// the table [`NATS_CUT_TABLE`] is deleted in `ns`.
pub fn cut_off_from_nats(ns: &Ns, nats: &[NatsServer]) {
    ns.exec(&["nft", "add", "table", "inet", NATS_CUT_TABLE])
        .expect_ok();
    for chain in [
        "out { type filter hook output",
        "in { type filter hook input",
    ] {
        let chain = format!("add chain inet {NATS_CUT_TABLE} {chain} priority -30; }}");
        ns.exec(&["nft", &chain]).expect_ok();
    }
    for s in nats {
        let ip = s.ns.wan_ip.expect("a wan address");
        for rule in [
            format!("add rule inet {NATS_CUT_TABLE} out ip daddr {ip} tcp dport {NATS_PORT} drop"),
            format!("add rule inet {NATS_CUT_TABLE} in ip saddr {ip} tcp sport {NATS_PORT} drop"),
        ] {
            ns.exec(&["nft", &rule]).expect_ok();
        }
    }
}

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
    /// TLS on the client port ([`Lab::nats_tls`]): the servers present `server`, require a
    /// client certificate signed by `ca` (`verify: true`), and the coordinators are given
    /// `--nats-ca` and `--nats-cert`/`--nats-key`.
    pub tls: Option<NatsTls>,
}

/// A private CA and what it signed (PEM files, made with the `openssl` CLI).
#[derive(Clone, Debug)]
pub struct NatsTls {
    pub ca: PathBuf,
    /// The servers' certificate and key (every server's wan address as an IP SAN).
    pub server: (PathBuf, PathBuf),
    /// A client certificate and key.
    pub client: (PathBuf, PathBuf),
}

/// Runs `openssl ARGS` on the host; panics with its output if it fails.
fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
        NatsAuth {
            password,
            file,
            tls: None,
        }
    }

    /// A private CA named `name` (files `NAME-ca.pem` … in the lab's directory) with a server
    /// certificate for the wan addresses of `servers` and a client certificate, all made with
    /// the `openssl` CLI (EC P-256 keys, valid for a day).
    pub fn nats_tls(&self, name: &str, servers: &[Ns]) -> NatsTls {
        require_tool("openssl", "openssl");
        let f = |s: &str| self.dir().join(format!("{name}-{s}"));
        let p = |b: &PathBuf| b.to_string_lossy().into_owned();
        let (ca, ca_key) = (f("ca.pem"), f("ca.key"));
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend(["-days", "1", "-subj"]);
        let subj = format!("/CN={name} test CA");
        let (ca_s, ca_key_s) = (p(&ca), p(&ca_key));
        args.extend([subj.as_str(), "-keyout", &ca_key_s, "-out", &ca_s]);
        openssl(&args);
        let sans: Vec<String> = servers
            .iter()
            .map(|n| format!("IP:{}", n.wan_ip.expect("wan address")))
            .collect();
        let sign = |role: &str, ext: String| {
            let (cert, key, csr, extf) = (
                f(&format!("{role}.pem")),
                f(&format!("{role}.key")),
                f(&format!("{role}.csr")),
                f(&format!("{role}.ext")),
            );
            fs::write(&extf, ext).expect("write the extensions");
            let (cert_s, key_s, csr_s, ext_s) = (p(&cert), p(&key), p(&csr), p(&extf));
            let subj = format!("/CN={name} {role}");
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-subj", &subj, "-keyout", &key_s, "-out", &csr_s]);
            openssl(&args);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr_s,
                "-CA",
                &ca_s,
                "-CAkey",
                &ca_key_s,
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &ext_s,
                "-out",
                &cert_s,
            ]);
            (cert, key)
        };
        let server = sign(
            "server",
            format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\n",
                sans.join(",")
            ),
        );
        let client = sign("client", "extendedKeyUsage=clientAuth\n".to_string());
        NatsTls { ca, server, client }
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
                // TLS on the client port: a client certificate signed by the CA required.
                let tls = match &auth.tls {
                    Some(t) => format!(
                        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  \
                         verify: true\n  timeout: 2\n}}\n",
                        t.server.0.display(),
                        t.server.1.display(),
                        t.ca.display()
                    ),
                    None => String::new(),
                };
                // The coordinators' user may use the cluster's subjects and nothing else.
                let config = format!(
                    "server_name: nats-{i}\nlisten: \"{ip}:{NATS_PORT}\"\njetstream: disabled\n\
                     authorization {{\n  users: [\n    {{ user: \"{NATS_USER}\", password: \"{pw}\", \
                     permissions: {{ publish: [\"a2a.>\"], subscribe: [\"a2a.>\"] }} }}\n  ]\n}}\n\
                     {cluster}{tls}",
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
                nats_ca: auth.tls.as_ref().map(|t| t.ca.clone()),
                nats_client_cert: auth.tls.as_ref().map(|t| t.client.clone()),
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
