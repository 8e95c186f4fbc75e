//! Command-line behaviour that needs neither root nor namespaces: runs everywhere.

use std::path::PathBuf;
use std::time::Duration;

use a2a_netns_tests::{run_host, Bins};

const T: Duration = Duration::from_secs(20);

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir()
        .join("a2a-netns")
        .join(format!("cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A state directory no daemon can be listening in.
fn no_daemon_dir() -> String {
    format!("/nonexistent-a2a-{}/state", std::process::id())
}

#[test]
fn ctl_without_daemon_says_how_to_start_it() {
    let bins = Bins::locate();
    let dir = no_daemon_dir();
    // A well-formed token, so that `up` gets as far as the daemon.
    let coord_state = scratch("coord-token");
    let state = coord_state.to_string_lossy().into_owned();
    let token = run_host(
        &[
            &bins.coordinator,
            "token",
            "--state-dir",
            &state,
            "--endpoint",
            "192.0.2.1:7600",
        ],
        T,
    )
    .expect_ok()
    .stdout
    .trim()
    .to_string();
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["ip"],
        vec!["down"],
        vec!["up", "--join", token.as_str(), "--name", "lonely"],
    ] {
        let mut full = vec![bins.ctl.as_str(), "--state-dir", dir.as_str()];
        full.extend(args.iter().copied());
        let out = run_host(&full, T);
        assert!(
            !out.success() && !out.timed_out,
            "a2actl without a daemon must fail: {out}"
        );
        let err = out.stderr.to_lowercase();
        assert!(
            err.contains("not running"),
            "a2actl should say the daemon is not running: {out}"
        );
        assert!(
            err.contains("a2ad") && err.contains("start"),
            "a2actl should say how to start the daemon (a2ad): {out}"
        );
    }
    let _ = std::fs::remove_dir_all(coord_state);
}

#[test]
fn versions() {
    let bins = Bins::locate();
    for bin in [&bins.ctl, &bins.daemon, &bins.coordinator] {
        let out = run_host(&[bin, "--version"], T).expect_ok();
        assert!(
            out.stdout.chars().any(|c| c.is_ascii_digit()),
            "{bin} --version printed no version: {out}"
        );
    }
}

#[test]
fn coordinator_wildcard_listen_needs_endpoint() {
    let bins = Bins::locate();
    let d = scratch("wildcard");
    let state = d.to_string_lossy().into_owned();
    let out = run_host(
        &[
            &bins.coordinator,
            "--listen",
            "0.0.0.0:0",
            "--state-dir",
            &state,
        ],
        Duration::from_secs(10),
    );
    assert!(
        !out.success() && !out.timed_out,
        "a wildcard --listen without --endpoint must be refused: {out}"
    );
    assert!(
        out.stderr.contains("--endpoint"),
        "the error should point at --endpoint: {out}"
    );
    assert!(
        !out.stdout.contains("a2a1"),
        "no token may be printed: {out}"
    );
    let _ = std::fs::remove_dir_all(d);
}

/// A cluster's TLS file that cannot be read stops the coordinator before it serves or prints
/// a token, with the flag, the file and what it must hold.
#[test]
fn coordinator_with_a_missing_nats_tls_file_says_which_before_serving() {
    let bins = Bins::locate();
    let d = scratch("natstls");
    let state = d.to_string_lossy().into_owned();
    let missing = d.join("missing-ca.pem").to_string_lossy().into_owned();
    let out = run_host(
        &[
            &bins.coordinator,
            "--listen",
            "127.0.0.1:7609",
            "--state-dir",
            &state,
            "--nats",
            "nats://127.0.0.1:1",
            "--nats-ca",
            &missing,
        ],
        Duration::from_secs(10),
    );
    assert!(
        !out.success() && !out.timed_out,
        "a missing --nats-ca must stop the coordinator: {out}"
    );
    assert!(
        out.stderr.contains("--nats-ca")
            && out.stderr.contains(&missing)
            && out.stderr.contains("BEGIN CERTIFICATE"),
        "the error should name the flag, the file and what it must hold: {out}"
    );
    assert!(
        !out.stdout.contains("join token"),
        "no token may be printed: {out}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn coordinator_token_command_makes_new_networks_with_a_stable_key() {
    let bins = Bins::locate();
    let d = scratch("tokens");
    let state = d.to_string_lossy().into_owned();
    let make = || {
        let out = run_host(
            &[
                &bins.coordinator,
                "token",
                "--state-dir",
                &state,
                "--endpoint",
                "192.0.2.1:7600",
                "--prefix",
                "100.99.0.0/16",
            ],
            T,
        )
        .expect_ok();
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "one bare token line expected: {out}");
        assert!(lines[0].starts_with("a2a1"), "{out}");
        lines[0].to_string()
    };
    let (a, b) = (make(), make());
    assert_ne!(a, b, "each `token` call is a new network");
    // The coordinator key lives in the state directory, private.
    let files: Vec<_> = std::fs::read_dir(&d).unwrap().flatten().collect();
    assert!(!files.is_empty(), "no key kept in the state directory");
    a2a_netns_tests::assert_private_files(&d);

    // Bad tokens are named as such even without a daemon.
    let dir = no_daemon_dir();
    for bad in ["garbage", &a[..a.len() / 2], ""] {
        let out = run_host(&[&bins.ctl, "--state-dir", &dir, "up", "--join", bad], T);
        assert!(!out.success(), "{out}");
        assert!(out.stderr.to_lowercase().contains("token"), "{out}");
    }
    let _ = std::fs::remove_dir_all(d);
}
