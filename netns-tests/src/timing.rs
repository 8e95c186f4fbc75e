//! Small helpers every test uses: whether this is CI, printing past libtest's capture, and
//! polling until something holds.

use std::fmt;
use std::io::{self, Write};
use std::time::{Duration, Instant};

/// Whether we run under CI (`CI=true`), where missing privileges are a failure, not a skip.
pub fn in_ci() -> bool {
    matches!(
        std::env::var("CI")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("true") | Ok("1") | Ok("yes")
    )
}

/// Prints a line to the test's real stderr, bypassing libtest's output capture, so that
/// measurements (throughput, join latency) show up in the normal `cargo test` output.
pub fn report(msg: impl fmt::Display) {
    let line = format!("[a2a-netns] {msg}\n");
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

/// Calls `f` every 200 ms until it returns `Ok` or `timeout` passes; returns the last error
/// on timeout.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("still failing after {timeout:?}: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Like [`poll`], but panics with `what` and the last error on timeout.
pub fn wait_for<T>(timeout: Duration, what: &str, f: impl FnMut() -> Result<T, String>) -> T {
    poll(timeout, f).unwrap_or_else(|e| panic!("timed out waiting for {what}: {e}"))
}

/// Waits until `cond` holds, polling every 200 ms; panics with `what` on timeout.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || {
        if cond() {
            Ok(())
        } else {
            Err("condition not met".into())
        }
    })
}
