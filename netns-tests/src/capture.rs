//! Packet captures with `tcpdump` in a namespace ([`Capture`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::{require_tool, Proc};
use crate::timing::{poll, wait_until};
use crate::topology::Ns;

/// `tcpdump -i IFACE -w FILE` in a namespace, running until [`stop`](Self::stop) or
/// [`finish`](Self::finish).
pub struct Capture {
    proc: Proc,
    file: PathBuf,
}

impl Capture {
    /// Starts tcpdump on `iface` of `ns`, writing every packet to `file`, and waits until it
    /// listens. Panics at once, naming the package, when tcpdump is not installed.
    pub fn start(ns: &Ns, iface: &str, file: PathBuf) -> Capture {
        require_tool("tcpdump", "tcpdump");
        let f = file.to_string_lossy().into_owned();
        // -Z root: write the file as root (Debian's tcpdump would switch to its own user);
        // --immediate-mode and -U: each packet is written as it comes (not a buffer at a time,
        // which would lose the last ones at exit); -B: a 32 MiB kernel buffer.
        let proc = ns.spawn(
            &format!("tcpdump-{iface}"),
            &[
                "tcpdump",
                "-i",
                iface,
                "-n",
                "-s",
                "0",
                "--immediate-mode",
                "-U",
                "-B",
                "32768",
                "-Z",
                "root",
                "-w",
                &f,
            ],
        );
        // tcpdump announces itself on stderr once listening.
        wait_until(
            Duration::from_secs(15),
            &format!("tcpdump on {iface} in {} to listen", ns.name),
            || {
                proc.assert_running();
                proc.stderr_text().contains("listening on")
            },
        );
        Capture { proc, file }
    }

    /// The capture file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Waits (up to 10 s) until the capture file holds `needle`; whether it does.
    pub fn wait_for(&self, needle: &[u8]) -> bool {
        poll(Duration::from_secs(10), || {
            if contains(&fs::read(&self.file).unwrap_or_default(), needle) {
                Ok(())
            } else {
                Err(String::new())
            }
        })
        .is_ok()
    }

    /// Stops tcpdump (SIGINT, so it flushes; SIGKILL after 10 s). The file stays for reading.
    pub fn stop(&self) {
        self.proc.stop(libc::SIGINT, Duration::from_secs(10));
    }

    /// Stops tcpdump and returns the capture and tcpdump's summary (its "packets" lines).
    pub fn finish(self) -> (Vec<u8>, String) {
        self.stop();
        let summary = self
            .proc
            .stderr_text()
            .lines()
            .filter(|l| l.contains("packets"))
            .collect::<Vec<_>>()
            .join("; ");
        let data = fs::read(&self.file).expect("read the packet capture");
        (data, summary)
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
