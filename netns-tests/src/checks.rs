//! Small assertions on what a node produced: addresses inside a prefix, private state files.

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Whether `ip` is inside `cidr` (`a.b.c.d/len`).
pub fn in_prefix(ip: Ipv4Addr, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').expect("CIDR with a /");
    let net: Ipv4Addr = net.parse().expect("CIDR address");
    let len: u32 = len.parse().expect("CIDR length");
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Asserts that no file in `dir` (recursively, sockets excluded) is readable or writable by
/// group or others: the node key and membership are secrets.
#[track_caller]
pub fn assert_private_files(dir: &Path) {
    for entry in fs::read_dir(dir).expect("read state dir").flatten() {
        let meta = entry.metadata().expect("metadata");
        let ft = meta.file_type();
        if ft.is_dir() {
            assert_private_files(&entry.path());
        } else if ft.is_file() {
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(
                mode & 0o077,
                0,
                "{} has mode {mode:o}: state files must not be accessible to group/others",
                entry.path().display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_membership() {
        let ip: Ipv4Addr = "100.77.3.4".parse().unwrap();
        assert!(in_prefix(ip, "100.77.0.0/16"));
        assert!(in_prefix(ip, "100.64.0.0/10"));
        assert!(!in_prefix(ip, "100.78.0.0/16"));
        assert!(!in_prefix("100.128.0.1".parse().unwrap(), "100.64.0.0/10"));
        assert!(in_prefix(ip, "0.0.0.0/0"));
    }
}
