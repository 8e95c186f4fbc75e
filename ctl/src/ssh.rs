//! `a2actl ssh`: the system's OpenSSH between members, authenticated by the overlay.
//!
//! - `ssh enable --user U...` writes the sshd drop-in (`AuthorizedKeysCommand` pointing at this
//!   a2actl) and tells a2ad the users and the host key to publish; `ssh disable` undoes both.
//! - `ssh authorized-keys` (sshd runs it) and `ssh known-hosts` (ssh runs it) ask a2ad.
//! - `ssh PEER [-l USER] [-- COMMAND...]` runs `ssh` with this node's key and the peer's host
//!   key from its signed record; `ssh config` prints a `Host *.a2a` block for scp/rsync/git,
//!   whose `ProxyCommand` is `ssh proxy HOST PORT`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use a2a_proto::api::{ApiRequest, ApiResponse};
use a2a_proto::ssh::{dropin, is_our_dropin, DROPIN_NAME};
use clap::{Args, Subcommand};

use crate::client;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SshArgs {
    #[command(subcommand)]
    action: Option<SshAction>,
    /// The member to log in to (its name, `NAME.a2a` or overlay address).
    peer: Option<String>,
    /// The user to log in as [default: the local user name, as ssh does].
    #[arg(short = 'l', long = "login")]
    login: Option<String>,
    /// sshd's port on the peer.
    #[arg(short = 'p', long, default_value_t = 22)]
    port: u16,
    /// More ssh options (`-o ConnectTimeout=5`), passed to ssh as they are.
    #[arg(short = 'o', value_name = "OPTION")]
    ssh_options: Vec<String>,
    /// The command to run there (after `--`); none for a shell.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Subcommand)]
enum SshAction {
    /// Let members log in to this node's sshd (token holders, as the --user names, until a
    /// policy grants otherwise): writes the drop-in sshd_config.d/a2a.conf and publishes this
    /// node's sshd host key in its signed record. Reload sshd afterwards.
    Enable {
        /// A local user members may log in as (repeat for more).
        #[arg(long = "user", value_name = "USER", required = true)]
        users: Vec<String>,
        /// sshd's Ed25519 host key to publish.
        #[arg(long, default_value = "/etc/ssh/ssh_host_ed25519_key.pub")]
        host_key: PathBuf,
        /// Where sshd reads drop-ins.
        #[arg(long, default_value = "/etc/ssh/sshd_config.d")]
        sshd_config_dir: PathBuf,
        /// The user sshd runs the AuthorizedKeysCommand as: one that may use a2ad's socket
        /// (root, or a member of group a2a).
        #[arg(long, default_value = "root")]
        command_user: String,
    },
    /// Remove the drop-in and stop publishing the host key. Reload sshd afterwards.
    Disable {
        #[arg(long, default_value = "/etc/ssh/sshd_config.d")]
        sshd_config_dir: PathBuf,
    },
    /// Print a `Host *.a2a` block for ~/.ssh/config (scp, rsync, git over ssh).
    Config,
    /// (run by sshd) The authorized_keys line for a member's key: USER TYPE KEY.
    #[command(hide = true)]
    AuthorizedKeys {
        #[arg(num_args = 1.., required = true)]
        args: Vec<String>,
    },
    /// (run by ssh) The known_hosts line of a member: HOST.
    #[command(hide = true)]
    KnownHosts { host: String },
    /// (ProxyCommand) Connect stdin/stdout to HOST's PORT over the overlay.
    #[command(hide = true)]
    Proxy { host: String, port: u16 },
}

/// This a2actl's absolute path (sshd wants one owned by root).
fn ctl_path() -> Result<String, String> {
    let exe = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .map_err(|e| format!("cannot find this a2actl's own path: {e}"))?;
    Ok(exe.display().to_string())
}

fn socket_text(socket: &Path) -> Result<String, String> {
    let abs = if socket.is_absolute() {
        socket.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| e.to_string())?
            .join(socket)
    };
    let text = abs.display().to_string();
    if text.contains(char::is_whitespace) || text.contains('"') {
        return Err(format!(
            "the socket path {text:?} holds spaces or quotes, which sshd_config cannot carry"
        ));
    }
    Ok(text)
}

pub fn run(socket: &Path, args: SshArgs) -> Result<(), String> {
    match args.action {
        Some(SshAction::Enable {
            users,
            host_key,
            sshd_config_dir,
            command_user,
        }) => enable(socket, users, &host_key, &sshd_config_dir, &command_user),
        Some(SshAction::Disable { sshd_config_dir }) => disable(socket, &sshd_config_dir),
        Some(SshAction::Config) => {
            print!("{}", config_snippet(socket)?);
            Ok(())
        }
        Some(SshAction::AuthorizedKeys { args }) => authorized_keys(socket, &args),
        Some(SshAction::KnownHosts { host }) => {
            match client::call(socket, &ApiRequest::SshKnownHosts { host })? {
                ApiResponse::SshKnownHosts { lines, refused } => {
                    for l in lines {
                        println!("{l}");
                    }
                    if let Some(why) = refused {
                        eprintln!("a2actl: {why}");
                    }
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Some(SshAction::Proxy { host, port }) => proxy(socket, &host, port),
        None => {
            let peer = args
                .peer
                .ok_or("name the member to log in to: a2actl ssh PEER [-l USER] [-- COMMAND]")?;
            connect(
                socket,
                &peer,
                args.login,
                args.port,
                &args.ssh_options,
                &args.command,
            )
        }
    }
}

fn unexpected(r: ApiResponse) -> Result<(), String> {
    match r {
        ApiResponse::Error { message } => Err(message),
        other => Err(format!("unexpected answer from a2ad: {other:?}")),
    }
}

fn enable(
    socket: &Path,
    users: Vec<String>,
    host_key: &Path,
    dir: &Path,
    command_user: &str,
) -> Result<(), String> {
    let key = std::fs::read_to_string(host_key).map_err(|e| {
        format!(
            "cannot read sshd's host key {}: {e} (is openssh-server installed? give another with \
             --host-key)",
            host_key.display()
        )
    })?;
    a2a_proto::ssh::validate_user(command_user).map_err(|e| format!("--command-user: {e}"))?;
    let text = dropin(&ctl_path()?, &socket_text(socket)?, command_user);
    let path = dir.join(DROPIN_NAME);
    match std::fs::read_to_string(&path) {
        Ok(existing) if existing == text => {}
        Ok(existing) if !is_our_dropin(&existing) => {
            return Err(format!(
                "{} exists and is not a2a's (it does not start with a2a's header): left as it \
                 is; move it away or merge it by hand, then run `a2actl ssh enable` again",
                path.display()
            ))
        }
        Ok(_) | Err(_) => {
            if !dir.is_dir() {
                return Err(format!(
                    "{} is not a directory: is openssh-server installed? (--sshd-config-dir)",
                    dir.display()
                ));
            }
            let tmp = dir.join(format!(".{DROPIN_NAME}.tmp"));
            std::fs::write(&tmp, &text)
                .and_then(|_| {
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
                })
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
    }
    let request = ApiRequest::SshEnable {
        users,
        host_key: key,
    };
    match client::call(socket, &request) {
        Ok(ApiResponse::SshEnabled { users, host_key }) => {
            eprintln!(
                "members that joined with the token may log in as {} ({} is published as this \
                 node's host key); {} written: reload sshd (systemctl reload ssh)",
                users.join(", "),
                host_key,
                path.display()
            );
            Ok(())
        }
        other => {
            // a2ad did not take it: leave no drop-in pointing at it.
            let _ = std::fs::remove_file(&path);
            match other {
                Ok(r) => unexpected(r),
                Err(e) => Err(e),
            }
        }
    }
}

fn disable(socket: &Path, dir: &Path) -> Result<(), String> {
    let path = dir.join(DROPIN_NAME);
    match std::fs::read_to_string(&path) {
        Ok(existing) if !is_our_dropin(&existing) => {
            return Err(format!(
                "{} is not a2a's (it does not start with a2a's header): left as it is",
                path.display()
            ))
        }
        Ok(_) => std::fs::remove_file(&path)
            .map_err(|e| format!("cannot remove {}: {e}", path.display()))?,
        Err(_) => {}
    }
    match client::call(socket, &ApiRequest::SshDisable)? {
        ApiResponse::SshDisabled { .. } => {
            eprintln!(
                "{} removed and the host key no longer published: reload sshd",
                path.display()
            );
            Ok(())
        }
        other => unexpected(other),
    }
}

/// sshd's `AuthorizedKeysCommand`: prints the line (or nothing, the reason on stderr). Exits 0
/// either way: sshd reads no line as "no key".
fn authorized_keys(socket: &Path, args: &[String]) -> Result<(), String> {
    let [user, key_type, key] = args else {
        return Err(format!(
            "expected USER TYPE KEY (sshd's %u %t %k), got {} argument(s)",
            args.len()
        ));
    };
    let request = ApiRequest::SshAuthorizedKeys {
        user: user.clone(),
        key_type: key_type.clone(),
        key: key.clone(),
    };
    match client::call(socket, &request)? {
        ApiResponse::SshAuthorizedKeys { lines, refused } => {
            for l in lines {
                println!("{l}");
            }
            if let Some(why) = refused {
                eprintln!("a2actl: refused: {why}");
            }
            Ok(())
        }
        other => unexpected(other),
    }
}

fn peer_info(socket: &Path, peer: &str) -> Result<(String, String, String), String> {
    match client::call(
        socket,
        &ApiRequest::SshPeer {
            peer: peer.to_string(),
        },
    )? {
        ApiResponse::SshPeer {
            name,
            ip,
            identity,
            has_host_key,
        } => {
            if !has_host_key {
                return Err(format!(
                    "{name} publishes no SSH host key: run `a2actl ssh enable` there"
                ));
            }
            Ok((name, ip, identity))
        }
        ApiResponse::Error { message } => Err(message),
        other => Err(format!("unexpected answer from a2ad: {other:?}")),
    }
}

/// The ssh options every a2a connection uses: this node's key only, the host key from the
/// record only (no known_hosts file read or written), no prompt.
fn options(socket: &Path, identity: &str) -> Result<Vec<(String, String)>, String> {
    let ctl = ctl_path()?;
    let sock = socket_text(socket)?;
    Ok(vec![
        ("IdentityFile".into(), identity.to_string()),
        ("IdentitiesOnly".into(), "yes".into()),
        ("IdentityAgent".into(), "none".into()),
        ("PasswordAuthentication".into(), "no".into()),
        ("KbdInteractiveAuthentication".into(), "no".into()),
        ("StrictHostKeyChecking".into(), "yes".into()),
        ("UserKnownHostsFile".into(), "/dev/null".into()),
        ("GlobalKnownHostsFile".into(), "/dev/null".into()),
        ("UpdateHostKeys".into(), "no".into()),
        ("CheckHostIP".into(), "no".into()),
        (
            "KnownHostsCommand".into(),
            format!("{ctl} --socket {sock} ssh known-hosts %H"),
        ),
    ])
}

fn connect(
    socket: &Path,
    peer: &str,
    login: Option<String>,
    port: u16,
    extra: &[String],
    command: &[String],
) -> Result<(), String> {
    let (name, ip, identity) = peer_info(socket, peer)?;
    let mut cmd = std::process::Command::new("ssh");
    // The first value of an option wins in ssh: the caller's come first.
    for o in extra {
        cmd.arg("-o").arg(o);
    }
    for (k, v) in options(socket, &identity)? {
        cmd.arg("-o").arg(format!("{k}={v}"));
    }
    cmd.arg("-o").arg(format!(
        "HostKeyAlias={name}{}",
        a2a_proto::ssh::HOST_SUFFIX
    ));
    cmd.arg("-p").arg(port.to_string());
    if let Some(l) = login {
        cmd.arg("-l").arg(l);
    }
    cmd.arg(&ip);
    if !command.is_empty() {
        cmd.arg("--").args(command);
    }
    let e = cmd.exec();
    Err(format!(
        "cannot run ssh: {e} (install openssh-client: apt-get install openssh-client)"
    ))
}

/// A `Host *.a2a` block: `ssh bob.a2a`, `scp f bob.a2a:`, `git clone bob.a2a:repo`.
pub fn config_snippet(socket: &Path) -> Result<String, String> {
    let ctl = ctl_path()?;
    let sock = socket_text(socket)?;
    let mut out = String::from(
        "# a2a: members as NAME.a2a, authenticated by the overlay (printed by `a2actl ssh config`)\n\
         Host *.a2a\n",
    );
    out.push_str(&format!(
        "    ProxyCommand {ctl} --socket {sock} ssh proxy %h %p\n"
    ));
    // The key file is the daemon's; its path comes from the state directory.
    let key = identity_path(socket)?;
    for (k, v) in options(socket, &key)? {
        out.push_str(&format!("    {k} {v}\n"));
    }
    Ok(out)
}

/// This node's key file, as a2ad reports it.
fn identity_path(socket: &Path) -> Result<String, String> {
    // An empty peer asks for this node's key file only.
    match client::call(
        socket,
        &ApiRequest::SshPeer {
            peer: String::new(),
        },
    )? {
        ApiResponse::SshPeer { identity, .. } => Ok(identity),
        ApiResponse::Error { message } => Err(message),
        other => Err(format!("unexpected answer from a2ad: {other:?}")),
    }
}

/// `ProxyCommand`: stdin/stdout to the member's overlay address.
fn proxy(socket: &Path, host: &str, port: u16) -> Result<(), String> {
    let (name, ip, _) = peer_info(socket, host)?;
    let stream = TcpStream::connect((ip.as_str(), port))
        .map_err(|e| format!("cannot reach {name} ({ip}:{port}) over the overlay: {e}"))?;
    let mut up = stream.try_clone().map_err(|e| e.to_string())?;
    let mut down = stream;
    let t = std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let _ = std::io::copy(&mut stdin, &mut up);
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut buf = [0u8; 64 * 1024];
    let mut stdout = std::io::stdout().lock();
    loop {
        match down.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stdout
                    .write_all(&buf[..n])
                    .and_then(|_| stdout.flush())
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(t);
    Ok(())
}
