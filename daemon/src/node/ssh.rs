//! The daemon's SSH commands: enable/disable (what this node's sshd accepts and the host key
//! it publishes), sshd's and ssh's questions (`authorized-keys`, `known-hosts`), and what
//! `a2actl ssh PEER` needs. The decisions are `core::ssh`'s.

use std::path::PathBuf;
use std::sync::Mutex;

use a2a_proto::ssh::{openssh_private_key, public_of, user_key_seed, validate_user};
use a2a_proto::ssh::{SshKeys, SshPublicKey};
use tokio::sync::watch;

use crate::core::ssh::{self, Member, PolicyUsers, SshGrants, SshSettings, TokenHolders};
use crate::io::state::StateDir;
use crate::io::Platform;
use crate::node::commands::{CommandError, Daemon};

/// This node's SSH identity and settings, and the keys its record publishes.
pub struct SshBook {
    /// This node's SSH user key (`ssh-ed25519 BASE64`).
    user_key: String,
    identity: PathBuf,
    settings: Mutex<Option<SshSettings>>,
    keys: watch::Sender<Option<SshKeys>>,
}

impl SshBook {
    /// Derives the user key from the node key, writes its file, loads `ssh.json`.
    pub fn load(state: &StateDir, node_private: &[u8; 32]) -> Result<SshBook, String> {
        let seed = user_key_seed(node_private);
        let identity = state
            .write_ssh_identity(&openssh_private_key(&seed, "a2a"))
            .map_err(|e| e.to_string())?;
        let settings = state.ssh_settings().map_err(|e| e.to_string())?;
        let user_key = public_of(&seed).to_openssh();
        let keys = Self::keys_of(&user_key, settings.as_ref());
        Ok(SshBook {
            user_key,
            identity,
            settings: Mutex::new(settings),
            keys: watch::channel(Some(keys)).0,
        })
    }

    fn keys_of(user_key: &str, settings: Option<&SshSettings>) -> SshKeys {
        SshKeys {
            user: Some(user_key.to_string()),
            host: settings.map(|s| s.host_key.clone()),
        }
    }

    /// The keys to publish, for a session's control task.
    pub fn subscribe(&self) -> watch::Receiver<Option<SshKeys>> {
        self.keys.subscribe()
    }

    fn settings(&self) -> Option<SshSettings> {
        self.settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, state: &StateDir, settings: Option<SshSettings>) -> Result<(), String> {
        state
            .save_ssh_settings(settings.as_ref())
            .map_err(|e| format!("cannot save the SSH settings: {e}"))?;
        self.keys
            .send_replace(Some(Self::keys_of(&self.user_key, settings.as_ref())));
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) = settings;
        Ok(())
    }
}

impl<P: Platform> Daemon<P> {
    /// Who may log in as whom without a policy: token holders, as the enabled users (under a
    /// policy, [`PolicyUsers`] from its grants' `"ssh"` users).
    fn ssh_grants<'a>(&self, settings: &'a SshSettings) -> Box<dyn SshGrants + 'a> {
        Box::new(TokenHolders {
            users: &settings.users,
        })
    }

    /// Under a policy, who may log in as whom comes from its grants' `"ssh"` users alone.
    async fn policy_ssh_users(&self) -> Option<PolicyUsers> {
        let slot = self.session.lock().await;
        let s = slot.as_ref()?;
        let members: Vec<(a2a_proto::NodeKey, String)> = s
            .peers
            .all()
            .iter()
            .map(|p| (p.key, p.info().name))
            .collect();
        let book = s.policy.read();
        let version = book.policy()?.version;
        let users = book.ssh_users(
            s.peers.own_key(),
            &s.name,
            members.iter().map(|(k, n)| (*k, n.as_str())),
        )?;
        Some(PolicyUsers { version, users })
    }

    pub async fn ssh_enable(
        &self,
        users: Vec<String>,
        host_key: &str,
    ) -> Result<(Vec<String>, String), CommandError> {
        if users.is_empty() {
            return Err(CommandError::Failed(
                "name at least one local user members may log in as: --user USER".into(),
            ));
        }
        for u in &users {
            validate_user(u).map_err(|e| format!("--user: {e}"))?;
        }
        let key = SshPublicKey::parse(host_key).map_err(|e| format!("the host key: {e}"))?;
        let mut users = users;
        users.sort();
        users.dedup();
        self.ssh.set(
            &self.state,
            Some(SshSettings {
                users: users.clone(),
                host_key: key.to_openssh(),
            }),
        )?;
        tracing::info!("SSH enabled for members, as {}", users.join(", "));
        Ok((users, key.fingerprint()))
    }

    pub async fn ssh_disable(&self) -> Result<bool, CommandError> {
        let was = self.ssh.settings().is_some();
        self.ssh.set(&self.state, None)?;
        Ok(was)
    }

    /// The members this node knows, as the SSH decisions see them.
    async fn with_members<T>(&self, f: impl FnOnce(&[Member<'_>]) -> T) -> Result<T, CommandError> {
        let slot = self.session.lock().await;
        let Some(s) = slot.as_ref() else {
            return Err(CommandError::NotJoined);
        };
        let infos: Vec<_> = s.peers.all().iter().map(|p| (p.key, p.info())).collect();
        let members: Vec<Member<'_>> = infos
            .iter()
            .map(|(key, info)| Member {
                key: *key,
                name: &info.name,
                ip: info.ip,
                ip6: info.ip6,
                token_holder: info.cert.is_none(),
                ssh: &info.ssh,
            })
            .collect();
        Ok(f(&members))
    }

    /// sshd's question: the line that lets the caller in, or why there is none.
    pub async fn ssh_authorized_keys(
        &self,
        user: &str,
        key_type: &str,
        key: &str,
    ) -> Result<Result<String, String>, CommandError> {
        let Some(settings) = self.ssh.settings() else {
            return Ok(Err(
                "SSH is not enabled on this node (`a2actl ssh enable`)".into()
            ));
        };
        let grants: Box<dyn SshGrants + '_> = match self.policy_ssh_users().await {
            Some(users) => Box::new(users),
            None => self.ssh_grants(&settings),
        };
        self.with_members(|members| ssh::authorize(members, user, key_type, key, grants.as_ref()))
            .await
    }

    /// ssh's question: the known_hosts line for `host`, or why there is none.
    pub async fn ssh_known_hosts(
        &self,
        host: &str,
    ) -> Result<Result<String, String>, CommandError> {
        self.with_members(|members| ssh::known_host(members, host))
            .await
    }

    /// The peer's name and overlay address, this node's key file, and whether the peer
    /// publishes a host key.
    pub async fn ssh_peer(
        &self,
        peer: &str,
    ) -> Result<(String, String, String, bool), CommandError> {
        let identity = self.ssh.identity.display().to_string();
        if peer.is_empty() {
            // Only this node's key file (for `a2actl ssh config`).
            return Ok((String::new(), String::new(), identity, false));
        }
        let name = a2a_proto::ssh::member_of_host(peer);
        let slot = self.session.lock().await;
        let Some(s) = slot.as_ref() else {
            return Err(CommandError::NotJoined);
        };
        let p = s
            .peers
            .find(name)
            .ok_or_else(|| CommandError::NoSuchPeer(peer.to_string()))?;
        let info = p.info();
        Ok((
            info.name,
            info.ip.to_string(),
            identity,
            info.ssh.host.is_some(),
        ))
    }
}
