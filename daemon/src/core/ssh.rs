//! Who may log in over SSH, and which host key a member's sshd must show: decisions without
//! I/O, over the members this node knows from their signed records.
//!
//! sshd asks (through `a2actl ssh authorized-keys`, its `AuthorizedKeysCommand`) with the local
//! user and the key the client offers. [`authorize`] answers with one `authorized_keys` line —
//! the key of the member whose signed record publishes it, restricted with `from=` to that
//! member's overlay addresses — or says why not. The client proves it holds the key's private
//! half (derived from the member's node key: nobody else has it), and sshd checks the
//! connection comes from the member's overlay address, which a packet from the overlay carries
//! or is dropped (the inner-source check); a copied public key or a spoofed address alone gets
//! nobody in.
//!
//! Which member may log in as which user is the [`SshGrants`] seam: [`TokenHolders`] is the
//! rule without a policy (members that joined with the token, as the users `a2actl ssh enable
//! --user` lists); the policy's `"ssh": [users]` grants fill the same trait.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use a2a_proto::ssh::{member_of_host, SshKeys, SshPublicKey};
use a2a_proto::NodeKey;
use serde::{Deserialize, Serialize};

/// What `a2actl ssh enable` saved (`ssh.json` in the state directory): the local users token
/// holders may log in as, and the sshd host key this node publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshSettings {
    pub users: Vec<String>,
    /// `ssh-ed25519 BASE64` (canonical, no comment).
    pub host_key: String,
}

/// A member as the SSH decisions see it (from its verified record and certificate).
#[derive(Debug, Clone)]
pub struct Member<'a> {
    pub key: NodeKey,
    pub name: &'a str,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// Joined with the token (holds the network secret); `false` for an invited member.
    pub token_holder: bool,
    /// Its SSH keys (the control client dropped invalid ones).
    pub ssh: &'a SshKeys,
}

impl Member<'_> {
    fn holds(&self, ip: IpAddr) -> bool {
        ip == IpAddr::V4(self.ip) || ip == IpAddr::V6(self.ip6)
    }
}

/// Which member may log in as which local user. Without a policy: [`TokenHolders`]. The
/// policy's grants (`"ssh": ["agent", "deploy"]` on a rule to `tcp:22`) implement it too; the
/// daemon picks the implementation in `Daemon::ssh_grants`.
pub trait SshGrants: Send + Sync {
    /// `Ok(())` when `member` may log in as `user`, else why not (for sshd's log).
    fn may_log_in(&self, member: &Member<'_>, user: &str) -> Result<(), String>;
}

/// The rule under a policy: the users each member's grants to this node name in `"ssh"`
/// (`Statements::ssh_users`).
pub struct PolicyUsers {
    pub version: u64,
    pub users: std::collections::HashMap<NodeKey, std::collections::BTreeSet<String>>,
}

impl SshGrants for PolicyUsers {
    fn may_log_in(&self, member: &Member<'_>, user: &str) -> Result<(), String> {
        if self
            .users
            .get(&member.key)
            .is_some_and(|users| users.contains(user))
        {
            Ok(())
        } else {
            Err(format!(
                "no grant of policy version {} lets {} log in here as {user:?} (a grant to this \
                 node with \"ssh\": [\"{user}\"] does)",
                self.version, member.name
            ))
        }
    }
}

/// The rule without a policy: members that joined with the token, as the listed users.
pub struct TokenHolders<'a> {
    pub users: &'a [String],
}

impl SshGrants for TokenHolders<'_> {
    fn may_log_in(&self, member: &Member<'_>, user: &str) -> Result<(), String> {
        if !member.token_holder {
            return Err(format!(
                "{} joined by invite; without a policy only members that joined with the token \
                 may log in",
                member.name
            ));
        }
        if !self.users.iter().any(|u| u == user) {
            return Err(format!(
                "{user:?} is not a user members may log in as here (`a2actl ssh enable --user`: \
                 {})",
                self.users.join(", ")
            ));
        }
        Ok(())
    }
}

/// The `authorized_keys` line for a login as `user` with the offered key (`key_type`,
/// `key_b64`: sshd's `%t %k`), or why there is none.
pub fn authorize(
    members: &[Member<'_>],
    user: &str,
    key_type: &str,
    key_b64: &str,
    grants: &dyn SshGrants,
) -> Result<String, String> {
    let offered = SshPublicKey::parse(&format!("{key_type} {key_b64}"))
        .map_err(|e| format!("the offered key is not a member's: {e}"))?;
    let user_key = |m: &Member<'_>| m.ssh.user_key().and_then(Result::ok);
    let mut holders = members.iter().filter(|m| user_key(m) == Some(offered));
    let member = holders.next().ok_or_else(|| {
        format!(
            "no member publishes the offered key {}",
            offered.fingerprint()
        )
    })?;
    // A key two members publish names neither: refuse rather than guess.
    if let Some(other) = holders.next() {
        return Err(format!(
            "{} publishes the same SSH user key as {}: refused for both",
            member.name, other.name
        ));
    }
    grants.may_log_in(member, user)?;
    Ok(format!(
        "from=\"{},{}\" {} a2a:{}",
        member.ip,
        member.ip6,
        offered.to_openssh(),
        member.name
    ))
}

/// The `known_hosts` line for `host` (`bob`, `bob.a2a`, `[bob.a2a]:2222` or an overlay
/// address, as ssh's `%H` gives it): the member's host key from its signed record, or why there is
/// none. A host key two members publish is refused (neither can be told from the other).
pub fn known_host(members: &[Member<'_>], host: &str) -> Result<String, String> {
    let host = host.trim();
    let name = member_of_host(host);
    let member = members
        .iter()
        .find(|m| m.name == name || name.parse::<IpAddr>().is_ok_and(|ip| m.holds(ip)))
        .ok_or_else(|| format!("no member is named or addressed {name:?}"))?;
    let key = match member.ssh.host_key() {
        Some(Ok(k)) => k,
        Some(Err(e)) => return Err(format!("{}'s SSH host key is invalid: {e}", member.name)),
        None => {
            return Err(format!(
                "{} publishes no SSH host key: run `a2actl ssh enable` there",
                member.name
            ))
        }
    };
    if let Some(other) = members
        .iter()
        .find(|m| m.key != member.key && m.ssh.host_key().and_then(Result::ok) == Some(key))
    {
        return Err(format!(
            "{} publishes the same SSH host key as {}: neither is trusted",
            member.name, other.name
        ));
    }
    // The line names the host as ssh asked for it (`bob.a2a`, `[bob.a2a]:2222`, an address).
    Ok(format!("{host} {}", key.to_openssh()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use a2a_proto::ssh::public_of;

    fn keys(user: u8, host: Option<u8>) -> SshKeys {
        SshKeys {
            user: Some(public_of(&[user; 32]).to_openssh()),
            host: host.map(|h| public_of(&[h; 32]).to_openssh()),
        }
    }

    fn member<'a>(n: u8, name: &'a str, token_holder: bool, ssh: &'a SshKeys) -> Member<'a> {
        Member {
            key: NodeKey([n; 32]),
            name,
            ip: Ipv4Addr::new(100, 64, 0, n),
            ip6: format!("fd00::{n}").parse().unwrap(),
            token_holder,
            ssh,
        }
    }

    fn b64(seed: u8) -> String {
        public_of(&[seed; 32]).to_openssh()[12..].to_string()
    }

    #[test]
    fn the_caller_logs_in_with_its_own_key_as_a_listed_user() {
        let (ka, kc) = (keys(1, None), keys(3, None));
        let members = [
            member(1, "alice", true, &ka),
            member(3, "carol", false, &kc),
        ];
        let users = ["agent".to_string()];
        let grants = TokenHolders { users: &users };
        let line = authorize(&members, "agent", "ssh-ed25519", &b64(1), &grants).unwrap();
        assert_eq!(
            line,
            format!(
                "from=\"100.64.0.1,fd00::1\" {} a2a:alice",
                public_of(&[1; 32]).to_openssh()
            )
        );
        // Another user; a key no member publishes.
        assert!(authorize(&members, "root", "ssh-ed25519", &b64(1), &grants).is_err());
        let e = authorize(&members, "agent", "ssh-ed25519", &b64(7), &grants);
        assert!(e.unwrap_err().contains("no member publishes"));
        // The invited member, with its own key, without a policy.
        let e = authorize(&members, "agent", "ssh-ed25519", &b64(3), &grants);
        assert!(e.unwrap_err().contains("invite"));
        // Garbage from sshd.
        assert!(authorize(&members, "agent", "ssh-rsa", "AAAA", &grants).is_err());
    }

    #[test]
    fn a_reused_user_or_host_key_is_refused() {
        let (ka, kb) = (keys(1, Some(10)), keys(1, Some(10)));
        let members = [member(1, "alice", true, &ka), member(2, "bob", true, &kb)];
        let users = ["agent".to_string()];
        let grants = TokenHolders { users: &users };
        let e = authorize(&members, "agent", "ssh-ed25519", &b64(1), &grants);
        assert!(e.unwrap_err().contains("same SSH user key"));
        assert!(known_host(&members, "bob.a2a")
            .unwrap_err()
            .contains("same SSH host key"));
    }

    #[test]
    fn known_hosts_names_the_member_and_its_host_key() {
        let (ka, kb) = (keys(1, None), keys(2, Some(20)));
        let members = [member(1, "alice", true, &ka), member(2, "bob", true, &kb)];
        let line = known_host(&members, "[bob.a2a]:2222").unwrap();
        assert_eq!(
            line,
            format!("[bob.a2a]:2222 {}", public_of(&[20; 32]).to_openssh())
        );
        let line = known_host(&members, "100.64.0.2").unwrap();
        assert!(line.starts_with("100.64.0.2 ssh-ed25519 "), "{line}");
        assert!(known_host(&members, "alice")
            .unwrap_err()
            .contains("no SSH host key"));
        assert!(known_host(&members, "nobody.a2a")
            .unwrap_err()
            .contains("no member"));
        let bad = SshKeys {
            user: None,
            host: Some("ssh-ed25519 AAAA".into()),
        };
        let members = [member(4, "dave", true, &bad)];
        assert!(known_host(&members, "dave")
            .unwrap_err()
            .contains("invalid"));
    }
}
