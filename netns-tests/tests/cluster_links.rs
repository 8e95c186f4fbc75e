//! The coordinator cluster's links to NATS (README, *A coordinator cluster on NATS*): TLS
//! with a private CA (`--nats-ca`, `--nats-cert`, `--nats-key`), certificates made by the
//! test with the `openssl` CLI, the real `nats-server` requiring TLS and a client
//! certificate. Needs root, `nats-server`, `openssl`, `strace`, `nft` and `curl` (installed
//! by `./run-tests`).

use std::time::{Duration, Instant};

use a2a_netns_tests::{
    report, require_tools, CoordOpts, Coordinator, Lab, Nat, Router, COORDINATOR_PORT,
    OVERLAY_TIMEOUT,
};

const METRICS_PORT: u16 = 9310;

/// A router of `nat` kind whose LAN reaches only `reach` of the coordinators (the others are
/// cut off: TCP answered with a reset, the rest dropped).
fn router(lab: &Lab, name: &str, coords: &[&Coordinator], reach: &Coordinator) -> Router {
    let r = lab.router(name, Nat::Easy);
    for c in coords {
        if c.addr != reach.addr {
            r.cut_off_from(*c.addr.ip());
        }
    }
    r
}

/// `token` with `only` as its one endpoint.
fn token_only(token: &str, only: &Coordinator) -> String {
    let mut t = a2a_proto::JoinToken::parse(token).expect("a valid token");
    t.endpoints = vec![only.addr.to_string()];
    t.encode()
}

/// A coordinator of the cluster (its identity, copied from `from`) started by hand with its
/// own TLS options.
fn coordinator_with(lab: &Lab, name: &str, from: &Coordinator, opts: CoordOpts) -> Coordinator {
    let ns = lab.add_ns(name);
    let endpoint = format!("{}:{COORDINATOR_PORT}", ns.wan_ip.expect("wan address"));
    lab.coordinator_in(
        ns,
        CoordOpts {
            endpoints: vec![endpoint],
            key_from: Some(from.state_dir.join("coordinator.key")),
            ..opts
        },
    )
}

/// One `nats-server` requiring TLS on its client port, its certificate signed by a private
/// CA made by the test, and a client certificate signed by it (`verify: true`). c1 and c2
/// are given that CA (`--nats-ca`), a client certificate and plain `nats://` URLs (the CA
/// makes TLS required): alpha (reaches only c1) and bravo (only c2) list each other. c3,
/// holding the cluster's key too, is given another CA: it does not join (charlie, on c3
/// only, lists nobody; alpha and bravo never list charlie) and its log says the server's
/// certificate was refused and why. c4, given the right CA but no client certificate, is
/// refused by the server. The nats-server opens no file for writing (strace).
#[test]
fn tls_with_a_private_ca_joins_and_a_wrong_ca_is_refused() {
    let Some(lab) = Lab::new("cltls") else {
        return;
    };
    require_tools(&[
        ("nats-server", "nats-server"),
        ("openssl", "openssl"),
        ("strace", "strace"),
        ("nft", "nftables"),
        ("curl", "curl"),
    ]);
    let nats_ns = [lab.add_ns("nats1")];
    let mut auth = lab.nats_auth();
    let tls = lab.nats_tls("good", &nats_ns);
    auth.tls = Some(tls.clone());
    let wrong = lab.nats_tls("wrong", &nats_ns);
    let nats = lab.nats_cluster(&nats_ns, &auth, true);
    let started = Instant::now();
    let coords = lab.coordinators_on_nats(&nats, &auth, 2, METRICS_PORT, false);
    let (c1, c2) = (&coords[0], &coords[1]);
    let base = CoordOpts {
        nats: vec![nats[0].url()],
        nats_credentials: Some(auth.file.clone()),
        ..CoordOpts::default()
    };
    // The wrong CA, the right client certificate.
    let c3 = coordinator_with(
        &lab,
        "coord3",
        c1,
        CoordOpts {
            nats_ca: Some(wrong.ca.clone()),
            nats_client_cert: Some(tls.client.clone()),
            ..base.clone()
        },
    );
    // The right CA, no client certificate.
    let c4 = coordinator_with(
        &lab,
        "coord4",
        c1,
        CoordOpts {
            nats_ca: Some(tls.ca.clone()),
            ..base.clone()
        },
    );
    let all = [c1, c2, &c3, &c4];
    let r_alpha = router(&lab, "rtr-alpha", &all, c1);
    let r_bravo = router(&lab, "rtr-bravo", &all, c2);
    let r_charlie = router(&lab, "rtr-charlie", &all, &c3);
    let alpha = lab.node_behind(&r_alpha, "alpha");
    let bravo = lab.node_behind(&r_bravo, "bravo");
    let charlie = lab.node_behind(&r_charlie, "charlie");
    alpha.up_ok(&c1.token);
    bravo.up_ok(&c1.token);
    charlie.up_ok(&token_only(&c1.token, &c3));
    let up = Instant::now();
    alpha.wait_listed(&["bravo"], OVERLAY_TIMEOUT);
    bravo.wait_listed(&["alpha"], OVERLAY_TIMEOUT);
    report(format!(
        "cluster tls: alpha (c1) and bravo (c2) list each other {} ms after bravo's `up` \
         returned, over TLS with a private CA",
        up.elapsed().as_millis()
    ));
    // c3 had every chance to join: presence every 2 s, a sync at each connection.
    std::thread::sleep(Duration::from_secs(8));
    charlie.wait_listed(&[], Duration::from_secs(1));
    alpha.wait_listed(&["bravo"], Duration::from_secs(1));
    bravo.wait_listed(&["alpha"], Duration::from_secs(1));
    let log = |c: &Coordinator| c.proc().stderr_text();
    for (name, c) in [("c1", c1), ("c2", c2)] {
        assert!(
            log(c).contains("cluster: connected to NATS"),
            "{name} did not connect:\n{}",
            log(c)
        );
    }
    let l3 = log(&c3);
    assert!(
        !l3.contains("cluster: connected to NATS"),
        "c3 (the wrong CA) connected:\n{l3}"
    );
    let refusal = l3
        .lines()
        .find(|l| l.contains("refused a NATS server's TLS certificate"))
        .unwrap_or_else(|| panic!("c3's log does not say why it did not join:\n{l3}"));
    assert!(refusal.contains("--nats-ca"), "{refusal}");
    report(format!("cluster tls: c3 (another CA) says: {refusal}"));
    let l4 = log(&c4);
    assert!(
        !l4.contains("cluster: connected to NATS"),
        "c4 (no client certificate) connected to a server that verifies clients:\n{l4}"
    );
    report(format!(
        "cluster tls: c4 (no client certificate) not connected {} s after its start",
        started.elapsed().as_secs()
    ));
    for n in &nats {
        let writes = n.file_writes();
        assert!(
            writes.is_empty(),
            "nats-server wrote:\n{}",
            writes.join("\n")
        );
    }
    drop((r_alpha, r_bravo, r_charlie));
}

