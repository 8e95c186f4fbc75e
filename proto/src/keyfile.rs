//! Private key files: created once with mode 0600, reused on every later start.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use data_encoding::BASE64;
use rand::RngCore;

/// Reads the X25519 private key at `path`, or creates it (mode 0600, parent directory 0700 if
/// missing). Returns the key and whether it was created now. Errors name the file and the fix.
pub fn load_or_create(path: &Path) -> io::Result<([u8; 32], bool)> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let key = parse_key(&text).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "key file {} is not a base64 32-byte key; restore it from a backup \
                         (removing it gives this machine a new identity)",
                        path.display()
                    ),
                )
            })?;
            let mode = fs::metadata(path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
            }
            Ok((key, false))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| with_path(e, "create state directory", dir))?;
            }
            let mut key = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut key);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| with_path(e, "create key file", path))?;
            f.write_all(format!("{}\n", BASE64.encode(&key)).as_bytes())?;
            f.sync_all()?;
            Ok((key, true))
        }
        Err(e) => Err(with_path(e, "read key file", path)),
    }
}

/// Parses a key file's text: standard base64 of 32 bytes, surrounding white space ignored.
pub fn parse_key(text: &str) -> Option<[u8; 32]> {
    crate::keys::base64_exact(text.trim())
}

/// Wraps an I/O error with what was being done and to which path.
pub fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_text_is_base64_of_exactly_32_bytes() {
        let text = format!("{}\n", BASE64.encode(&[7; 32]));
        assert_eq!(parse_key(&text), Some([7; 32]));
        assert_eq!(parse_key(&format!("  {}  ", text.trim())), Some([7; 32]));
        assert_eq!(parse_key(&BASE64.encode(&[7; 31])), None);
        assert_eq!(parse_key(&BASE64.encode(&[7; 33])), None);
        assert_eq!(parse_key(""), None);
        assert_eq!(parse_key("not base64!"), None);
        // Two padded pieces decode to 32 bytes too, but are not a key's text.
        let two_pieces = format!("{}{}", BASE64.encode(&[7; 29]), BASE64.encode(&[7; 3]));
        assert_eq!(parse_key(&two_pieces), None);
    }

    #[test]
    fn creates_once_with_mode_0600_then_reuses() {
        let dir = std::env::temp_dir().join(format!("a2a-keyfile-{}", std::process::id()));
        let path = dir.join("sub").join("node.key");
        let (k1, created) = load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (k2, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(k1, k2);
        fs::write(&path, "garbage").unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("not a base64 32-byte key"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
