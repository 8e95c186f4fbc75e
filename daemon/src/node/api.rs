//! The local API socket: one JSON request line in, one JSON response line out.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use a2a_proto::api::{parse_request, read_line, ApiRequest, ApiResponse, MAX_API_LINE};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

use crate::io::Platform;
use crate::node::commands::{CommandError, Daemon};

/// Binds the socket, refusing to steal it from a running daemon.
pub async fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create socket directory {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(format!(
                "another a2ad is already running on {}; stop it first or use --socket",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    // Owner and group only: the status names peers.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    Ok(listener)
}

pub async fn serve<P: Platform>(listener: UnixListener, daemon: Arc<Daemon<P>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let _ = handle(stream, &daemon).await;
        });
    }
}

async fn handle<P: Platform>(stream: UnixStream, daemon: &Daemon<P>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    read_line(read, MAX_API_LINE, &mut line).await?;
    let response = match parse_request(&line) {
        Ok(req) => dispatch(req, daemon).await,
        Err(message) => ApiResponse::Error { message },
    };
    let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Answers one request: what the socket does per line (in-process tests call it directly).
pub async fn dispatch<P: Platform>(req: ApiRequest, daemon: &Daemon<P>) -> ApiResponse {
    let error = |e: CommandError| ApiResponse::Error {
        message: e.to_string(),
    };
    match req {
        ApiRequest::Up { token, name } => match daemon.up(&token, name).await {
            Ok((ip, name)) => ApiResponse::Up { ip, name },
            Err(e) => error(e),
        },
        ApiRequest::Down => match daemon.down().await {
            Ok(was_up) => ApiResponse::Down { was_up },
            Err(e) => error(e),
        },
        ApiRequest::Status => ApiResponse::Status {
            status: daemon.status().await,
        },
        ApiRequest::Ip => match daemon.ip().await {
            Ok((ip, ip6)) => ApiResponse::Ip { ip, ip6: Some(ip6) },
            Err(e) => error(e),
        },
        ApiRequest::Ping { peer } => match daemon.ping(&peer).await {
            Ok(pong) => ApiResponse::Pong { pong },
            Err(e) => error(e),
        },
        ApiRequest::Netcheck => match daemon.netcheck().await {
            Ok(report) => ApiResponse::Netcheck { report },
            Err(e) => error(e),
        },
        ApiRequest::Invite { uses, ttl_s, tags } => match daemon.invite(uses, ttl_s, tags).await {
            Ok(code) => ApiResponse::Invite { code, uses, ttl_s },
            Err(e) => error(e),
        },
        ApiRequest::Kick { peer } => match daemon.kick(&peer).await {
            Ok((name, ip, holds_secret)) => ApiResponse::Kicked {
                name,
                ip,
                holds_secret,
            },
            Err(e) => error(e),
        },
        ApiRequest::Whois { addr } => match daemon.whois(&addr).await {
            Ok(member) => ApiResponse::Whois { member },
            Err(e) => error(e),
        },
        ApiRequest::ServiceAdd { service } => match daemon.service_add(service).await {
            Ok(services) => ApiResponse::ServicesSaved { services },
            Err(e) => error(e),
        },
        ApiRequest::ServiceRm { name } => match daemon.service_rm(&name).await {
            Ok(services) => ApiResponse::ServicesSaved { services },
            Err(e) => error(e),
        },
        ApiRequest::Services => ApiResponse::Services {
            services: daemon.services().await,
        },
        ApiRequest::ForwardAdd { forward } => match daemon.forward_add(forward) {
            Ok(forwards) => ApiResponse::Forwards { forwards },
            Err(e) => error(e),
        },
        ApiRequest::ForwardRm { port } => match daemon.forward_rm(port) {
            Ok(forwards) => ApiResponse::Forwards { forwards },
            Err(e) => error(e),
        },
        ApiRequest::Forwards => ApiResponse::Forwards {
            forwards: daemon.forwards(),
        },
        ApiRequest::SshEnable { users, host_key } => {
            match daemon.ssh_enable(users, &host_key).await {
                Ok((users, host_key)) => ApiResponse::SshEnabled { users, host_key },
                Err(e) => error(e),
            }
        }
        ApiRequest::SshDisable => match daemon.ssh_disable().await {
            Ok(was_enabled) => ApiResponse::SshDisabled { was_enabled },
            Err(e) => error(e),
        },
        ApiRequest::SshAuthorizedKeys {
            user,
            key_type,
            key,
        } => match daemon.ssh_authorized_keys(&user, &key_type, &key).await {
            Ok(Ok(line)) => ApiResponse::SshAuthorizedKeys {
                lines: vec![line],
                refused: None,
            },
            Ok(Err(why)) => ApiResponse::SshAuthorizedKeys {
                lines: vec![],
                refused: Some(why),
            },
            Err(e) => error(e),
        },
        ApiRequest::SshKnownHosts { host } => match daemon.ssh_known_hosts(&host).await {
            Ok(Ok(line)) => ApiResponse::SshKnownHosts {
                lines: vec![line],
                refused: None,
            },
            Ok(Err(why)) => ApiResponse::SshKnownHosts {
                lines: vec![],
                refused: Some(why),
            },
            Err(e) => error(e),
        },
        ApiRequest::SshPeer { peer } => match daemon.ssh_peer(&peer).await {
            Ok((name, ip, identity, has_host_key)) => ApiResponse::SshPeer {
                name,
                ip,
                identity,
                has_host_key,
            },
            Err(e) => error(e),
        },
        ApiRequest::RotateToken => match daemon.rotate().await {
            Ok((token, carried)) => ApiResponse::Rotated { token, carried },
            Err(e) => error(e),
        },
        ApiRequest::PolicySet { text } => match daemon.policy_set(&text).await {
            Ok(policy) => ApiResponse::Policy { policy },
            Err(e) => error(e),
        },
        ApiRequest::PolicyShow => match daemon.policy_show().await {
            Ok(policy) => ApiResponse::Policy { policy },
            Err(e) => error(e),
        },
        ApiRequest::PolicyTest { src, dst, port } => {
            match daemon.policy_test(&src, &dst, &port).await {
                Ok(verdict) => ApiResponse::PolicyTest { verdict },
                Err(e) => error(e),
            }
        }
        ApiRequest::Tag { peer, tags } => match daemon.tag(&peer, tags, false).await {
            Ok((name, tags)) => ApiResponse::Tagged { name, tags },
            Err(e) => error(e),
        },
        ApiRequest::Untag { peer, tags } => match daemon.tag(&peer, tags, true).await {
            Ok((name, tags)) => ApiResponse::Tagged { name, tags },
            Err(e) => error(e),
        },
    }
}
