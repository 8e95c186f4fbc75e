//! The node's state directory: its private key (`node.key`, 0600) and its network membership
//! (`network.json`, 0600: the join token or invite credential, the node name and its overlay
//! address), so that a restarted daemon rejoins by itself with the same key and address, and the
//! signed revocations it has seen (`revoked.json`), so removed nodes stay removed.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use a2a_proto::keyfile::{self, with_path};
use a2a_proto::membership::Signed;
use serde::Serialize;

pub use crate::core::membership::Membership;

#[derive(Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    /// The node's X25519 private key, created on first use.
    pub fn node_key(&self) -> io::Result<[u8; 32]> {
        let (key, created) = keyfile::load_or_create(&self.dir.join("node.key"))?;
        if created {
            tracing::info!("created a new node key in {}", self.dir.display());
        }
        Ok(key)
    }

    fn membership_path(&self) -> PathBuf {
        self.dir.join("network.json")
    }

    /// The saved membership; `Ok(None)` when the node has not joined. A corrupted file is an
    /// error naming it (it is never silently discarded).
    pub fn membership(&self) -> io::Result<Option<Membership>> {
        let path = self.membership_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is corrupted ({e}); remove it and run `a2actl up --join TOKEN` again",
                        path.display()
                    ),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(with_path(e, "read", &path)),
        }
    }

    /// Saves the membership atomically (write to a temporary file, fsync, rename), with the
    /// IPv6 overlay address derived for this node's key.
    pub fn save_membership(&self, m: &Membership) -> io::Result<()> {
        let mut m = m.clone();
        let key = self.node_key()?;
        let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(key));
        m.ip6 = m.derived_ip6(&a2a_proto::NodeKey(public.to_bytes()));
        self.save_json("network.json", &m)
    }

    fn save_json<T: Serialize>(&self, name: &str, value: &T) -> io::Result<()> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(value).map_err(io::Error::other)?)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| with_path(e, "write", &path))
    }

    /// This node's services (`services.json`); none when the file is missing. A corrupted
    /// file is an error naming it.
    pub fn services(&self) -> io::Result<crate::core::services::SavedServices> {
        let path = self.dir.join("services.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is corrupted ({e}); fix or remove it (the services in it are then \
                         no longer advertised)",
                        path.display()
                    ),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Default::default()),
            Err(e) => Err(with_path(e, "read", &path)),
        }
    }

    pub fn save_services(&self, s: &crate::core::services::SavedServices) -> io::Result<()> {
        self.save_json("services.json", s)
    }

    /// The port forwards of `a2ad --userspace` (`forwards.json`); none when the file is
    /// missing. A corrupted file is an error naming it.
    pub fn forwards(&self) -> io::Result<Vec<a2a_proto::api::Forward>> {
        let path = self.dir.join("forwards.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is corrupted ({e}); fix or remove it (then add the forwards again \
                         with `a2actl forward add`)",
                        path.display()
                    ),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(with_path(e, "read", &path)),
        }
    }

    pub fn save_forwards(&self, f: &[a2a_proto::api::Forward]) -> io::Result<()> {
        self.save_json("forwards.json", &f)
    }

    /// What `a2actl ssh enable` saved (`ssh.json`); `None` when SSH is not enabled. A corrupted
    /// file is an error naming it.
    pub fn ssh_settings(&self) -> io::Result<Option<crate::core::ssh::SshSettings>> {
        let path = self.dir.join("ssh.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is corrupted ({e}); remove it and run `a2actl ssh enable` again",
                        path.display()
                    ),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(with_path(e, "read", &path)),
        }
    }

    /// Saves (or, with `None`, removes) the SSH settings.
    pub fn save_ssh_settings(&self, s: Option<&crate::core::ssh::SshSettings>) -> io::Result<()> {
        match s {
            Some(s) => self.save_json("ssh.json", s),
            None => match fs::remove_file(self.dir.join("ssh.json")) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    /// Writes this node's SSH user key file (`ssh_ed25519`, 0600, OpenSSH format) when it is
    /// missing or differs; returns its path.
    pub fn write_ssh_identity(&self, text: &str) -> io::Result<PathBuf> {
        let path = self.dir.join("ssh_ed25519");
        if fs::read_to_string(&path).ok().as_deref() == Some(text) {
            return Ok(path);
        }
        fs::create_dir_all(&self.dir).map_err(|e| with_path(e, "create", &self.dir))?;
        let tmp = self.dir.join("ssh_ed25519.tmp");
        let write = || -> io::Result<()> {
            let _ = fs::remove_file(&tmp);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| with_path(e, "write", &path))?;
        Ok(path)
    }

    pub fn clear_membership(&self) -> io::Result<()> {
        for name in ["network.json", "revoked.json", "peers.json"] {
            match fs::remove_file(self.dir.join(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// The saved revocations (each is checked against the network when loaded); an unreadable
    /// file counts as none, with a warning.
    pub fn revocations(&self) -> Vec<Signed> {
        let path = self.dir.join("revoked.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!("ignoring {}: {e}", path.display());
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    pub fn save_revocations(&self, list: &[Signed]) -> io::Result<()> {
        self.save_json("revoked.json", &list)
    }

    pub fn peers_path(&self) -> PathBuf {
        self.dir.join("peers.json")
    }

    /// The saved peer list (`peers.json`, sealed by this node; core/offline.rs opens it);
    /// `Ok(None)` when there is none. An unreadable or unparsable file is an error naming it
    /// (the caller starts without it, saying so).
    pub fn saved_peers(&self) -> io::Result<Option<crate::core::offline::SavedFile>> {
        let path = self.peers_path();
        match fs::metadata(&path) {
            Ok(m) if m.len() > crate::core::offline::MAX_FILE as u64 + 4096 => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is larger than a saved peer list can be", path.display()),
                ))
            }
            _ => {}
        }
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a saved peer list ({e})", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(with_path(e, "read", &path)),
        }
    }

    pub fn save_peers(&self, file: &crate::core::offline::SavedFile) -> io::Result<()> {
        self.save_json("peers.json", file)
    }

    /// The saved policy and tag statements (`policy.json`; each is verified when loaded); an
    /// unreadable file counts as none, with a warning (members pass them again).
    pub fn policy(&self) -> a2a_proto::policy::Bundle {
        let path = self.dir.join("policy.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!("ignoring {}: {e}", path.display());
                Default::default()
            }),
            Err(_) => Default::default(),
        }
    }

    pub fn save_policy(&self, bundle: &a2a_proto::policy::Bundle) -> io::Result<()> {
        self.save_json("policy.json", bundle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn membership_round_trips_privately() {
        let dir = std::env::temp_dir().join(format!("a2a-state-{}", std::process::id()));
        let s = StateDir::new(&dir);
        let k = s.node_key().unwrap();
        assert_eq!(s.node_key().unwrap(), k);
        assert_eq!(s.membership().unwrap(), None);
        let m = Membership {
            token: "a2a1x".into(),
            invited: None,
            name: "n".into(),
            ip: "100.64.0.1".parse().unwrap(),
            ip6: None,
        };
        s.save_membership(&m).unwrap();
        assert_eq!(s.membership().unwrap(), Some(m.clone()));
        let mode = fs::metadata(dir.join("network.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A file from before IPv6 overlay addresses (no `ip6`) still loads.
        fs::write(
            dir.join("network.json"),
            r#"{"token":"a2a1x","name":"n","ip":"100.64.0.1"}"#,
        )
        .unwrap();
        assert_eq!(s.membership().unwrap(), Some(m));
        fs::write(dir.join("network.json"), "{").unwrap();
        assert!(s
            .membership()
            .unwrap_err()
            .to_string()
            .contains("corrupted"));
        s.clear_membership().unwrap();
        assert_eq!(s.membership().unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
