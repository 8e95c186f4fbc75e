//! SSH between members, without I/O: the keys a node publishes in its signed record, the
//! OpenSSH key formats, and the sshd drop-in `a2actl ssh enable` writes.
//!
//! Every member has an Ed25519 SSH *user key* derived from its node private key (HKDF, so it
//! needs no state of its own and cannot drift from the record), kept for the `ssh` client as an
//! OpenSSH private key file in the state directory (0600). A node that ran `a2actl ssh enable`
//! also publishes its sshd's Ed25519 *host key*. Both ride in the node record, whose bytes are
//! signed by the network key (or by the member's certified signing key): the coordinator cannot
//! add, change or move a key without failing the signature every member checks.

use data_encoding::BASE64;
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The only key type a2a publishes or accepts.
pub const KEY_TYPE: &str = "ssh-ed25519";
/// Longest key text accepted in a record (`ssh-ed25519 ` and 68 characters of base64).
pub const MAX_KEY_TEXT: usize = 100;
/// The first line of the sshd drop-in: a file that starts with anything else is not a2a's.
pub const DROPIN_HEADER: &str =
    "# a2a: written by `a2actl ssh enable`, removed by `a2actl ssh disable`; do not edit.";
/// The drop-in's file name in `sshd_config.d`.
pub const DROPIN_NAME: &str = "a2a.conf";
/// The suffix of member host names in the `Host *.a2a` snippet.
pub const HOST_SUFFIX: &str = ".a2a";

/// The SSH keys in a node record (both optional: older nodes publish none, and only a node that
/// enabled its sshd publishes a host key). Each is `ssh-ed25519 BASE64`, no comment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshKeys {
    /// The member's SSH user key: what sshd on other members accepts from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The member's sshd host key: what `ssh` on other members expects from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// An Ed25519 OpenSSH public key (a valid, non-weak curve point).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SshPublicKey(pub [u8; 32]);

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

impl SshPublicKey {
    /// Parses `ssh-ed25519 BASE64 [comment]` (a `.pub` file's line). The error says what is
    /// wrong: another key type, too long, bad base64, a blob that is not an Ed25519 key, a weak
    /// or invalid point.
    pub fn parse(text: &str) -> Result<SshPublicKey, String> {
        let text = text.trim();
        if text.len() > 4 * MAX_KEY_TEXT {
            return Err(format!(
                "an SSH key of {} characters is not an Ed25519 key (at most {MAX_KEY_TEXT})",
                text.len()
            ));
        }
        let mut parts = text.split_whitespace();
        let kind = parts.next().unwrap_or("");
        if kind != KEY_TYPE {
            return Err(format!(
                "an SSH key of type {kind:?}: a2a publishes and accepts only {KEY_TYPE} keys \
                 (make one with `ssh-keygen -t ed25519`)"
            ));
        }
        let b64 = parts
            .next()
            .ok_or("an ssh-ed25519 key without its base64 part")?;
        let blob = crate::keys::base64_strict(b64)
            .ok_or("the ssh-ed25519 key's base64 part does not decode")?;
        let mut expect = Vec::new();
        put_string(&mut expect, KEY_TYPE.as_bytes());
        if blob.len() != expect.len() + 4 + 32 || !blob.starts_with(&expect) {
            return Err("the ssh-ed25519 key's blob is not an Ed25519 public key".into());
        }
        if blob[expect.len()..expect.len() + 4] != 32u32.to_be_bytes() {
            return Err("the ssh-ed25519 key's blob is not an Ed25519 public key".into());
        }
        let key: [u8; 32] = blob[expect.len() + 4..].try_into().expect("length checked");
        let point = ed25519_dalek::VerifyingKey::from_bytes(&key)
            .map_err(|_| "the ssh-ed25519 key is not a point on the curve".to_string())?;
        if point.is_weak() {
            return Err("the ssh-ed25519 key is a weak (small-order) point".into());
        }
        Ok(SshPublicKey(key))
    }

    /// The key blob (SSH wire encoding).
    pub fn blob(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string(&mut out, KEY_TYPE.as_bytes());
        put_string(&mut out, &self.0);
        out
    }

    /// `ssh-ed25519 BASE64`, as in `authorized_keys` and `known_hosts`.
    pub fn to_openssh(&self) -> String {
        format!("{KEY_TYPE} {}", BASE64.encode(&self.blob()))
    }

    /// `SHA256:…` as `ssh-keygen -l` shows it.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.blob());
        format!("SHA256:{}", data_encoding::BASE64_NOPAD.encode(&digest))
    }
}

impl SshKeys {
    /// The user key, if present and valid.
    pub fn user_key(&self) -> Option<Result<SshPublicKey, String>> {
        self.user.as_deref().map(SshPublicKey::parse)
    }

    /// The host key, if present and valid.
    pub fn host_key(&self) -> Option<Result<SshPublicKey, String>> {
        self.host.as_deref().map(SshPublicKey::parse)
    }

    /// Checks what a record carries: each key present must be a valid Ed25519 key written as
    /// `ssh-ed25519 BASE64` exactly (no comment, at most [`MAX_KEY_TEXT`] characters).
    pub fn validate(&self) -> Result<(), String> {
        for (what, text) in [("user", &self.user), ("host", &self.host)] {
            let Some(text) = text else { continue };
            if text.len() > MAX_KEY_TEXT {
                return Err(format!("the SSH {what} key is longer than {MAX_KEY_TEXT}"));
            }
            let key = SshPublicKey::parse(text).map_err(|e| format!("SSH {what} key: {e}"))?;
            if key.to_openssh() != *text {
                return Err(format!("the SSH {what} key is not written canonically"));
            }
        }
        Ok(())
    }
}

/// The Ed25519 seed of a node's SSH user key, derived from its node private key.
pub fn user_key_seed(node_private: &[u8; 32]) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(b"a2a ssh user key v1"), node_private);
    let mut seed = [0u8; 32];
    hk.expand(b"ed25519 seed", &mut seed)
        .expect("32 bytes is a valid HKDF length");
    seed
}

/// The public half of a seed.
pub fn public_of(seed: &[u8; 32]) -> SshPublicKey {
    SshPublicKey(
        ed25519_dalek::SigningKey::from_bytes(seed)
            .verifying_key()
            .to_bytes(),
    )
}

/// An unencrypted OpenSSH private key file (`-----BEGIN OPENSSH PRIVATE KEY-----`) for `seed`,
/// as `ssh-keygen -t ed25519 -N ''` writes one. Deterministic: the same seed gives the same
/// bytes (the check integer is derived from the seed).
pub fn openssh_private_key(seed: &[u8; 32], comment: &str) -> String {
    let public = public_of(seed);
    let check = Sha256::digest([b"a2a ssh check".as_slice(), seed].concat());
    let check = &check[..4];
    let mut private = Vec::new();
    private.extend_from_slice(check);
    private.extend_from_slice(check);
    put_string(&mut private, KEY_TYPE.as_bytes());
    put_string(&mut private, &public.0);
    put_string(&mut private, &[seed.as_slice(), &public.0].concat());
    put_string(&mut private, comment.as_bytes());
    let mut pad = 1u8;
    while private.len() % 8 != 0 {
        private.push(pad);
        pad += 1;
    }
    let mut out = b"openssh-key-v1\0".to_vec();
    put_string(&mut out, b"none");
    put_string(&mut out, b"none");
    put_string(&mut out, b"");
    out.extend_from_slice(&1u32.to_be_bytes());
    put_string(&mut out, &public.blob());
    put_string(&mut out, &private);
    let b64 = BASE64.encode(&out);
    let mut text = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(70) {
        text.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        text.push('\n');
    }
    text.push_str("-----END OPENSSH PRIVATE KEY-----\n");
    text
}

/// The sshd drop-in: sshd asks `ctl` (an absolute path to a2actl, owned by root) which key
/// may log in, with the user (`%u`) and the offered key (`%t %k`), running it as
/// `command_user`. (OpenSSH 9.2 and 8.9, in Debian 12 and Ubuntu 22.04, have no token for the
/// connection in `AuthorizedKeysCommand`: the answer's `from=` option binds the key to the
/// member's overlay addresses instead, and sshd checks it.)
pub fn dropin(ctl: &str, socket: &str, command_user: &str) -> String {
    format!(
        "{DROPIN_HEADER}\n\
         # Members of the a2a overlay log in with the SSH key of their signed node record, from\n\
         # their overlay addresses only, as the users they may log in as (`a2actl ssh enable\n\
         # --user`, or the policy's \"ssh\" grants).\n\
         AuthorizedKeysCommand {ctl} --socket {socket} ssh authorized-keys %u %t %k\n\
         AuthorizedKeysCommandUser {command_user}\n"
    )
}

/// Whether an existing drop-in's text is a2a's (begins with [`DROPIN_HEADER`]).
pub fn is_our_dropin(text: &str) -> bool {
    text.lines().next() == Some(DROPIN_HEADER)
}

/// Checks a local user name given to `--user` (what `useradd` accepts on Debian, without the
/// trailing `$`): 1 to 32 of `a-z 0-9 _ -`, starting with a letter or `_`.
pub fn validate_user(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a local user name (1 to 32 of a-z, 0-9, '_', '-', starting with a \
             letter or '_')"
        ))
    }
}

/// The member name in a host name as ssh passes it (`bob`, `bob.a2a`, `[bob.a2a]:2222`).
pub fn member_of_host(host: &str) -> &str {
    let host = host.trim();
    let host = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host,
    };
    host.strip_suffix(HOST_SUFFIX).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_round_trips_and_a_real_openssh_key_parses() {
        // A key written by ssh-keygen 9.2 (public half of a throwaway key).
        let text = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEnaMSRY/R0QYx/djCOkXCYe+9KESZPWARUr9Q18jg8d root@x";
        let key = SshPublicKey::parse(text).unwrap();
        assert_eq!(
            key.to_openssh(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEnaMSRY/R0QYx/djCOkXCYe+9KESZPWARUr9Q18jg8d"
        );
        assert_eq!(SshPublicKey::parse(&key.to_openssh()).unwrap(), key);
        assert!(key.fingerprint().starts_with("SHA256:"));
    }

    #[test]
    fn malformed_huge_and_foreign_keys_are_refused() {
        let good = public_of(&[7; 32]).to_openssh();
        let keys = SshKeys {
            user: Some(good.clone()),
            host: Some(good.clone()),
        };
        assert!(keys.validate().is_ok());
        let bad = [
            "".to_string(),
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ".to_string(),
            "ssh-ed25519".to_string(),
            "ssh-ed25519 !!!!".to_string(),
            format!("ssh-ed25519 {}", "A".repeat(5000)),
            // Right type, blob of another length.
            format!("ssh-ed25519 {}", BASE64.encode(&[0u8; 40])),
            // Canonical blob of a weak point (the identity).
            SshPublicKey({
                let mut p = [0u8; 32];
                p[0] = 1;
                p
            })
            .to_openssh(),
            // A comment is fine in a .pub file but not in a record.
            format!("{good} root@host"),
        ];
        for text in &bad {
            let k = SshKeys {
                user: None,
                host: Some(text.clone()),
            };
            assert!(k.validate().is_err(), "{text:?} was accepted");
        }
        assert!(SshPublicKey::parse(&format!("{good} root@host")).is_ok());
    }

    #[test]
    fn the_private_key_file_has_openssh_layout_and_the_public_half() {
        let seed = user_key_seed(&[9; 32]);
        assert_eq!(seed, user_key_seed(&[9; 32]));
        assert_ne!(seed, user_key_seed(&[8; 32]));
        let text = openssh_private_key(&seed, "a2a");
        assert!(text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        assert!(text.ends_with("-----END OPENSSH PRIVATE KEY-----\n"));
        let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        let raw = BASE64.decode(b64.as_bytes()).unwrap();
        assert!(raw.starts_with(b"openssh-key-v1\0"));
        let blob = public_of(&seed).blob();
        assert!(raw.windows(blob.len()).any(|w| w == blob.as_slice()));
        assert_eq!(text, openssh_private_key(&seed, "a2a"));
    }

    #[test]
    fn hosts_name_members() {
        assert_eq!(member_of_host("bob.a2a"), "bob");
        assert_eq!(member_of_host("[bob.a2a]:2222"), "bob");
        assert_eq!(member_of_host("bob"), "bob");
    }

    #[test]
    fn the_package_removes_only_a2a_s_dropin() {
        // postrm compares the drop-in's first line with the header, spelt out in shell.
        let postrm = include_str!("../../packaging/debian/postrm");
        assert!(postrm.contains(&format!("'{DROPIN_HEADER}'")));
        assert!(postrm.contains(&format!("/etc/ssh/sshd_config.d/{DROPIN_NAME}")));
    }

    #[test]
    fn users_and_dropins() {
        assert!(validate_user("agent").is_ok());
        assert!(validate_user("_deploy-1").is_ok());
        for bad in ["", "Root", "1x", "a b", "a/b", &"a".repeat(33)] {
            assert!(validate_user(bad).is_err(), "{bad:?}");
        }
        let d = dropin("/usr/bin/a2actl", "/run/a2a/a2ad.sock", "a2a-ssh");
        assert!(is_our_dropin(&d));
        assert!(!is_our_dropin("PermitRootLogin yes\n"));
        assert!(d.contains("AuthorizedKeysCommand /usr/bin/a2actl --socket /run/a2a/a2ad.sock ssh authorized-keys %u %t %k\n"));
    }
}
