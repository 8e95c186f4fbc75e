//! The cluster's driver (`--nats`): one connection to the NATS servers with the official
//! `async-nats` client, core NATS only. It subscribes to the cluster's subject and this
//! instance's, hands every message to [`Server::cluster_receive`], publishes what the cluster
//! core ([`crate::cluster`]) queued, and runs its timer. Everything it carries is sealed; it
//! prints nothing about nodes (only that NATS connected or dropped, with no address).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{rustls, ConnectOptions, ServerAddr};
use futures_util::StreamExt;

use crate::cluster::{Cluster, Sealer};
use crate::server::{ClusterLink, Server};

/// Messages waiting for NATS at most (relay data beyond it is dropped and counted).
pub const PUBLISH_QUEUE: usize = 16 * 1024;

/// Queued messages taken (and packed) at once at most.
pub const PUBLISH_BATCH: usize = 1024;

/// How a coordinator authenticates to NATS.
#[derive(Clone)]
pub enum Credentials {
    UserPassword {
        user: String,
        password: String,
    },
    /// An nkey seed (`SU…`).
    Nkey(String),
}

impl Credentials {
    /// The file's first line: `user:password`, or an nkey seed.
    pub fn read(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the NATS credentials {}: {e}; it holds one line, user:password or \
                 an nkey seed (SU…)",
                path.display()
            )
        })?;
        let line = text.lines().next().unwrap_or("").trim();
        if line.starts_with("SU") && !line.contains(':') {
            return Ok(Credentials::Nkey(line.to_string()));
        }
        match line.split_once(':') {
            Some((user, password)) if !user.is_empty() && !password.is_empty() => {
                Ok(Credentials::UserPassword {
                    user: user.to_string(),
                    password: password.to_string(),
                })
            }
            _ => Err(format!(
                "the NATS credentials {} are neither user:password nor an nkey seed (SU…) on \
                 their first line",
                path.display()
            )),
        }
    }
}

/// How long the NATS connection may be silent before the client sends a PING. async-nats
/// counts a connection dead at the third tick with two PINGs unanswered, and anything the
/// server sends resets the tick; a TCP connection cut in the middle fails no write for
/// minutes (the kernel retransmits for up to 15), so the PING is what finds it dead. With the
/// default 60 s, a dead connection (a cut, or a middlebox that lost its state and drops the
/// packets without a reset) went unnoticed for 3 minutes: the coordinator published into
/// it and stayed apart from the cluster that long after the network was back. 5 s finds it
/// in 10–15 s; at steady state it sends nothing more, since the other coordinators' presence
/// (every 2 s) resets the tick, and a lone coordinator sends a PING every 5 s.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);

/// TLS to the NATS servers (`--nats-ca`, `--nats-cert`, `--nats-key`): their certificates are
/// checked against `ca` (a private CA; the system's roots when `None`), and `client` (a
/// certificate and its key) is shown to servers that verify clients. Either one makes TLS
/// required, whatever the URLs say.
#[derive(Clone, Debug, Default)]
pub struct Tls {
    pub ca: Option<PathBuf>,
    pub client: Option<(PathBuf, PathBuf)>,
}

impl Tls {
    /// Whether any TLS option was given.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }

    /// Reads and checks the files, once, before the coordinator serves (and prints its
    /// token): a wrong one stops it with the file's name instead of failing every connection
    /// later.
    pub fn load(&self) -> Result<LoadedTls, String> {
        Ok(LoadedTls {
            config: self.config()?,
            client: self.client.clone(),
        })
    }

    /// With a CA: the client configuration (roots = that CA only, and a verifier that says
    /// why a server's certificate is refused).
    fn config(&self) -> Result<Option<rustls::ClientConfig>, String> {
        let client = match &self.client {
            Some((cert, key)) => Some((read_certs(cert, "--nats-cert")?, read_key(key)?)),
            None => None,
        };
        let Some(ca) = &self.ca else {
            return Ok(None);
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(ca, "--nats-ca")? {
            roots.add(cert).map_err(|e| {
                format!(
                    "--nats-ca {}: a certificate in it is not a usable CA ({e}); give the PEM \
                     certificate of the CA that signed the NATS servers' certificates",
                    ca.display()
                )
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("--nats-ca {}: {e}", ca.display()))?;
        let verifier = Arc::new(LoggedVerifier {
            inner,
            ca: ca.clone(),
            last: std::sync::Mutex::new(None),
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS to NATS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        Ok(Some(match client {
            Some((certs, key)) => builder.with_client_auth_cert(certs, key).map_err(|e| {
                format!(
                    "--nats-cert and --nats-key do not make a client certificate ({e}): the key \
                     must be the certificate's"
                )
            })?,
            None => builder.with_no_client_auth(),
        }))
    }
}

/// [`Tls`] read and checked ([`Tls::load`]).
pub struct LoadedTls {
    /// With `--nats-ca` (and the client certificate, if any, in it).
    config: Option<rustls::ClientConfig>,
    /// A client certificate under the system's roots (no `--nats-ca`): async-nats reads it.
    client: Option<(PathBuf, PathBuf)>,
}

fn read_certs(
    path: &Path,
    flag: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let bad = |e: &dyn std::fmt::Display| {
        format!(
            "cannot read {flag} {}: {e}; it must be a PEM file of certificates (BEGIN \
             CERTIFICATE)",
            path.display()
        )
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no certificate in it"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>, String> {
    use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!(
            "cannot read --nats-key {}: {e}; it must be the PEM private key (BEGIN PRIVATE KEY, \
             RSA or EC) of the --nats-cert certificate",
            path.display()
        )
    })
}

/// Verifies NATS servers' certificates under the `--nats-ca` roots and says why one is
/// refused (async-nats reports a failed connection only at its debug level, which also
/// prints the CONNECT line with the password): at most once a minute, or when the reason
/// changes.
#[derive(Debug)]
struct LoggedVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    ca: PathBuf,
    last: std::sync::Mutex<Option<(String, Instant)>>,
}

/// How often the same refusal is printed again.
const REFUSAL_REPEAT: Duration = Duration::from_secs(60);

impl rustls::client::danger::ServerCertVerifier for LoggedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let r = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if let Err(e) = &r {
            let why = e.to_string();
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            let repeat = match &*last {
                Some((w, at)) => *w != why || at.elapsed() >= REFUSAL_REPEAT,
                None => true,
            };
            if repeat {
                tracing::warn!(
                    "cluster: refused a NATS server's TLS certificate ({why}): it must be \
                     signed by the CA in --nats-ca {} and name the host or IP address of its \
                     --nats URL; not joining the cluster through that server",
                    self.ca.display()
                );
                *last = Some((why, Instant::now()));
            }
        }
        r
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Parses `--nats` URLs (`nats://HOST:4222`, `tls://…`).
pub fn parse_urls(urls: &[String]) -> Result<Vec<ServerAddr>, String> {
    if urls.is_empty() {
        return Err("--nats needs at least one URL, e.g. nats://10.0.0.1:4222".into());
    }
    urls.iter()
        .map(|u| {
            u.parse::<ServerAddr>()
                .map_err(|e| format!("--nats {u} is not a NATS URL ({e}); e.g. nats://HOST:4222"))
        })
        .collect()
}

/// Joins the cluster: connects (in the background, retrying for ever: a coordinator cut off
/// from NATS keeps serving its own nodes and merges when NATS is back), subscribes, and
/// spawns the loops. `private`/`public`: the coordinator identity the cluster shares.
pub async fn join(
    server: &Arc<Server>,
    urls: Vec<ServerAddr>,
    credentials: Option<Credentials>,
    tls: LoadedTls,
    private: &[u8; 32],
    public: &[u8; 32],
) -> Result<(), String> {
    let sealer = Arc::new(Sealer::new(private, public, rand::random()));
    let (tx, mut rx) = tokio::sync::mpsc::channel(PUBLISH_QUEUE);
    let link = Arc::new(ClusterLink::new(
        Cluster::new(sealer.clone(), Instant::now()),
        tx,
    ));
    server.set_cluster(link.clone());

    // Each (re)connection: ask the others for what they hold (they may have changed while we
    // were away), and say we are here.
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::channel::<()>(4);
    let mut options = ConnectOptions::new()
        .name("a2a-coordinator")
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(PING_INTERVAL)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts as u64 * 250).min(2000))
        })
        .event_callback(move |event| {
            let connected_tx = connected_tx.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("cluster: connected to NATS");
                        let _ = connected_tx.try_send(());
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(
                            "cluster: disconnected from NATS; serving this coordinator's own \
                             nodes meanwhile, reconnecting"
                        );
                    }
                    _ => {}
                }
            }
        });
    options = match credentials {
        Some(Credentials::UserPassword { user, password }) => {
            options.user_and_password(user, password)
        }
        Some(Credentials::Nkey(seed)) => options.nkey(seed),
        None => options,
    };
    if tls.config.is_some() || tls.client.is_some() {
        options = options.require_tls(true);
        options = match tls.config {
            Some(config) => options.tls_client_config(config),
            // A client certificate under the system's roots.
            None => match &tls.client {
                Some((cert, key)) => options.add_client_certificate(cert.clone(), key.clone()),
                None => options,
            },
        };
    }
    let client = options
        .connect(urls)
        .await
        .map_err(|e| format!("cannot connect to NATS: {e}"))?;
    let subscribe = |subject: String| {
        let client = client.clone();
        async move {
            client
                .subscribe(subject)
                .await
                .map_err(|e| format!("cannot subscribe on NATS: {e}"))
        }
    };
    let all = subscribe(sealer.subject_all()).await?;
    let mine = subscribe(sealer.subject_to(&sealer.me())).await?;
    for mut sub in [all, mine] {
        let server = server.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                server.cluster_receive(msg.subject.as_str(), &msg.payload);
            }
        });
    }
    // Publisher: takes what is queued at once (after one turn of the scheduler, so that the
    // rest of a burst the relay paths are queueing lands too), packs the relay data into as
    // few sealed messages as it fits (`Sealer::pack`), publishes them.
    let publisher = client.clone();
    let packer = link.clone();
    tokio::spawn(async move {
        let mut queued = Vec::with_capacity(PUBLISH_BATCH);
        while rx.recv_many(&mut queued, PUBLISH_BATCH).await > 0 {
            if queued.len() < PUBLISH_BATCH {
                tokio::task::yield_now().await;
                while queued.len() < PUBLISH_BATCH {
                    match rx.try_recv() {
                        Ok(o) => queued.push(o),
                        Err(_) => break,
                    }
                }
            }
            let packed = packer
                .sealer()
                .pack(queued.drain(..), a2a_proto::time::now_ms());
            // The relay envelopes (the last ones) go over a bridge where one is up.
            let first_relay = packed.publish.len() - packed.relay_messages as usize;
            for (i, p) in packed.publish.into_iter().enumerate() {
                let payload = if i < first_relay {
                    p.payload
                } else {
                    match packer.bridges.send(&p.subject, p.payload) {
                        Ok(()) => continue,
                        Err(back) => {
                            packer
                                .relay_messages_out
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            back
                        }
                    }
                };
                let _ = publisher.publish(p.subject, payload.into()).await;
            }
        }
    });
    // Timer: presence and expiry; a (re)connection starts afresh.
    let server = server.clone();
    tokio::spawn(async move {
        loop {
            let at = link.core().poll_timeout();
            let at = tokio::time::Instant::from_std(at.max(Instant::now()));
            let step = tokio::select! {
                _ = tokio::time::sleep_until(at) => {
                    link.core().tick(Instant::now(), a2a_proto::time::now_ms())
                }
                Some(()) = connected_rx.recv() => {
                    link.core().start(Instant::now(), a2a_proto::time::now_ms())
                }
            };
            server.cluster_apply(step);
        }
    });
    Ok(())
}
