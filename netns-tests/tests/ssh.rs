//! Terminals between agents: the real OpenSSH server and client, authenticated by the overlay.
//! sshd runs in bob's namespace on its overlay address, with its own config that includes the
//! drop-in `a2actl ssh enable` writes; members log in with `a2actl ssh` (no key handed out, no
//! host-key prompt), and only as the users granted. Needs root (see the crate documentation).

use std::path::{Path, PathBuf};
use std::time::Duration;

use a2a_netns_tests::{
    require_tools, run_host, wait_for, CoordOpts, Lab, Node, Output, Proc, OVERLAY_TIMEOUT,
};

/// The user members may log in as, and one they may not.
const GRANTED: &str = "a2a-ssh-agent";
const OTHER: &str = "a2a-ssh-other";

/// Local users made for the test, removed (with their homes) when it ends.
struct Users(Vec<String>);

impl Users {
    fn create(names: &[&str]) -> Users {
        let users = Users(Vec::new());
        let mut users = users;
        for name in names {
            let t = Duration::from_secs(30);
            let _ = run_host(&["userdel", "-r", name], t);
            run_host(&["useradd", "-m", "-s", "/bin/sh", name], t).expect_ok();
            // sshd without PAM refuses a locked account ("!" in shadow): "*" has no password
            // but is not locked.
            run_host(&["usermod", "-p", "*", name], t).expect_ok();
            users.0.push(name.to_string());
        }
        users
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = run_host(&["userdel", "-r", name], Duration::from_secs(30));
        }
    }
}

/// A copy of a2actl in a root-owned directory no one else may write (sshd runs an
/// `AuthorizedKeysCommand` only from such a path), removed at the end.
struct CtlCopy(PathBuf);

impl CtlCopy {
    fn new(lab: &Lab) -> CtlCopy {
        let dir = PathBuf::from(format!(
            "/run/a2a-ssh-test-{}-{}",
            std::process::id(),
            lab.name()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let ctl = dir.join("a2actl");
        std::fs::copy(&lab.bins().ctl, &ctl).unwrap();
        std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        CtlCopy(ctl)
    }

    fn path(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for CtlCopy {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `a2actl` (the root-owned copy) with the node's state directory.
fn ctl(node: &Node, copy: &CtlCopy, args: &[&str]) -> Output {
    let state = node.state_dir.to_string_lossy().into_owned();
    let c = copy.path();
    let mut full = vec![c.as_str(), "--state-dir", &state];
    full.extend_from_slice(args);
    node.ns.exec_timeout(&full, Duration::from_secs(90))
}

/// sshd's files for a node: its own config (including the drop-in directory), host key, pid.
struct Sshd {
    dir: PathBuf,
}

impl Sshd {
    fn prepare(lab: &Lab, node: &Node) -> Sshd {
        let dir = lab.dir().join(format!("{}-sshd", node.name));
        std::fs::create_dir_all(dir.join("sshd_config.d")).unwrap();
        let key = dir.join("host_key");
        let k = key.to_string_lossy().into_owned();
        run_host(
            &[
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "bob-host",
                "-f",
                &k,
            ],
            Duration::from_secs(30),
        )
        .expect_ok();
        // Privilege separation needs its empty directory.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let config = format!(
            "Include {dropins}/*.conf\n\
             ListenAddress {ip}:22\n\
             HostKey {key}\n\
             UsePAM no\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             AuthorizedKeysFile none\n\
             PidFile {pid}\n\
             LogLevel VERBOSE\n\
             Subsystem sftp internal-sftp\n",
            dropins = dir.join("sshd_config.d").display(),
            ip = node.overlay_ip(),
            key = k,
            pid = dir.join("sshd.pid").display(),
        );
        std::fs::write(dir.join("sshd_config"), config).unwrap();
        Sshd { dir }
    }

    fn dropins(&self) -> String {
        self.dir
            .join("sshd_config.d")
            .to_string_lossy()
            .into_owned()
    }

    fn host_pub(&self) -> String {
        self.dir.join("host_key.pub").to_string_lossy().into_owned()
    }
}

/// `a2actl ssh PEER -l USER -- COMMAND` from `node`, giving up on the TCP connection after 5 s.
fn ssh(node: &Node, peer: &str, user: &str, command: &str) -> Output {
    node.ctl(&[
        "ssh",
        peer,
        "-l",
        user,
        "-o",
        "ConnectTimeout=5",
        "-o",
        "BatchMode=yes",
        "--",
        command,
    ])
}

fn sha256(path: &Path) -> String {
    let p = path.to_string_lossy().into_owned();
    let out = run_host(&["sha256sum", &p], Duration::from_secs(30)).expect_ok();
    out.stdout.split_whitespace().next().unwrap().to_string()
}

#[test]
fn members_log_in_over_ssh_as_granted_and_nobody_else() {
    let Some(lab) = Lab::new("ssh") else {
        return;
    };
    require_tools(&[
        ("sshd", "openssh-server"),
        ("ssh", "openssh-client"),
        ("scp", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("useradd", "passwd"),
    ]);
    let users = Users::create(&[GRANTED, OTHER]);
    let copy = CtlCopy::new(&lab);
    let coord = lab.coordinator(Default::default());
    let alice = lab.node("alice");
    let bob = lab.node("bob");
    alice.up_ok(&coord.token);
    bob.up_ok(&coord.token);
    let code = alice.ctl(&["invite", "--uses", "1"]).expect_ok();
    let carol = lab.node("carol");
    carol.up_ok(code.stdout.trim());
    for n in [&alice, &bob, &carol] {
        let others: Vec<&str> = ["alice", "bob", "carol"]
            .into_iter()
            .filter(|x| *x != n.name)
            .collect();
        n.wait_peers(&others, OVERLAY_TIMEOUT);
    }

    // Each member's SSH key file is the daemon's, 0600, and its public half is what the
    // record carries (ssh-keygen reads the file a2ad wrote).
    let identity = alice.state_dir.join("ssh_ed25519");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&identity).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} is {mode:o}", identity.display());
    let id = identity.to_string_lossy().into_owned();
    let alice_key = run_host(&["ssh-keygen", "-y", "-f", &id], Duration::from_secs(10))
        .expect_ok()
        .stdout;
    let alice_key: Vec<&str> = alice_key.split_whitespace().collect();
    assert_eq!(alice_key[0], "ssh-ed25519");

    // Before bob enables SSH, alice is told why it cannot log in (no prompt, no attempt).
    let out = ssh(&alice, "bob", GRANTED, "true").expect_fail();
    assert!(out.stderr.contains("no SSH host key"), "{out}");

    // bob: a drop-in that is not a2a's is never overwritten.
    let sshd = Sshd::prepare(&lab, &bob);
    let foreign = Path::new(&sshd.dropins()).join("a2a.conf");
    std::fs::write(&foreign, "PermitRootLogin yes\n").unwrap();
    let enable = [
        "ssh",
        "enable",
        "--user",
        GRANTED,
        "--host-key",
        &sshd.host_pub(),
        "--sshd-config-dir",
        &sshd.dropins(),
    ];
    let out = ctl(&bob, &copy, &enable).expect_fail();
    assert!(out.stderr.contains("not a2a's"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&foreign).unwrap(),
        "PermitRootLogin yes\n"
    );
    std::fs::remove_file(&foreign).unwrap();
    ctl(&bob, &copy, &enable).expect_ok();
    // Enabling again (a2a's own drop-in) is fine.
    ctl(&bob, &copy, &enable).expect_ok();
    let dropin = std::fs::read_to_string(&foreign).unwrap();
    assert!(dropin.contains("AuthorizedKeysCommand "), "{dropin}");
    // sshd accepts the whole configuration (-t) and starts on bob's overlay address.
    let config = sshd.dir.join("sshd_config").to_string_lossy().into_owned();
    bob.ns
        .exec(&["/usr/sbin/sshd", "-t", "-f", &config])
        .expect_ok();
    let _sshd = bob
        .ns
        .spawn("sshd", &["/usr/sbin/sshd", "-D", "-e", "-f", &config]);

    // alice logs in as the granted user once bob's record with its host key reached her; the
    // command runs on bob (the connection is alice's overlay address to bob's).
    let (a, b) = (alice.overlay_ip(), bob.overlay_ip());
    let out = wait_for(OVERLAY_TIMEOUT, "alice to log in to bob over ssh", || {
        let out = ssh(
            &alice,
            "bob",
            GRANTED,
            "uname -n; echo $SSH_CONNECTION; id -un",
        );
        if out.success() {
            Ok(out)
        } else {
            Err(out.to_string())
        }
    });
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(!lines[0].is_empty());
    assert!(
        lines[1].starts_with(&format!("{a} ")) && lines[1].contains(&format!(" {b} 22")),
        "SSH_CONNECTION is {:?}",
        lines[1]
    );
    assert_eq!(lines[2], GRANTED);

    // A user not granted: refused (by sshd: a2ad answered no key).
    let out = ssh(&alice, "bob", OTHER, "true").expect_fail();
    assert!(out.stderr.contains("Permission denied"), "{out}");
    // The invited member, without a policy: refused.
    let out = ssh(&carol, "bob", GRANTED, "true").expect_fail();
    assert!(out.stderr.contains("Permission denied"), "{out}");
    // What bob's a2ad tells sshd for each, asked as sshd asks: alice's key, from her overlay
    // addresses only (sshd checks the connection against `from=`).
    let ask = |user: &str| {
        ctl(
            &bob,
            &copy,
            &["ssh", "authorized-keys", user, alice_key[0], alice_key[1]],
        )
        .expect_ok()
    };
    let yes = ask(GRANTED);
    let alice_ip6 = alice.ctl(&["ip", "-6"]).expect_ok().stdout;
    assert_eq!(
        yes.stdout.trim(),
        format!(
            "from=\"{a},{}\" {} {} a2a:alice",
            alice_ip6.trim(),
            alice_key[0],
            alice_key[1]
        )
    );
    let no = ask(OTHER);
    assert!(
        no.stdout.trim().is_empty() && no.stderr.contains("refused"),
        "{no}"
    );

    // scp of 10 MB through the printed `Host *.a2a` block (ProxyCommand over the overlay).
    let config = alice.ctl(&["ssh", "config"]).expect_ok().stdout;
    assert!(config.contains("Host *.a2a"), "{config}");
    let cfg = lab.dir().join("alice-ssh-config");
    std::fs::write(&cfg, &config).unwrap();
    let file = lab.dir().join("ten-megabytes");
    let f = file.to_string_lossy().into_owned();
    run_host(
        &[
            "dd",
            "if=/dev/urandom",
            &format!("of={f}"),
            "bs=1M",
            "count=10",
        ],
        Duration::from_secs(30),
    )
    .expect_ok();
    let c = cfg.to_string_lossy().into_owned();
    let target = format!("{GRANTED}@bob.a2a:ten-megabytes");
    alice
        .ns
        .exec_timeout(
            &["scp", "-F", &c, "-o", "BatchMode=yes", &f, &target],
            Duration::from_secs(120),
        )
        .expect_ok();
    let copied = PathBuf::from(format!("/home/{GRANTED}/ten-megabytes"));
    assert_eq!(sha256(&copied), sha256(&file), "the copy differs");

    // With the hub down, the members and their keys are still known: alice still logs in.
    coord.kill();
    let out = ssh(&alice, "bob", GRANTED, "id -un").expect_ok();
    assert_eq!(out.stdout.trim(), GRANTED);

    // bob kicks alice (the hub still down: bob drops her at once and sends the revocation when
    // it registers again): a2ad answers no key for her any more, and she cannot log in.
    bob.ctl(&["kick", "alice"]).expect_ok();
    let after = ask(GRANTED);
    assert!(after.stdout.trim().is_empty(), "{after}");
    ssh(&alice, "bob", GRANTED, "true").expect_fail();

    // Under a policy, its grants' "ssh" users alone decide (the hub still down: the policy
    // reaches carol from bob over the overlay). carol, invited and refused so far, may log in
    // as GRANTED; as OTHER, which the grant does not name, she may not.
    bob.ctl(&["tag", "carol", "ops"]).expect_ok();
    let policy = format!(
        r#"{{"grants": [{{"src": ["tag:ops"], "dst": ["bob"], "ports": ["tcp:22"], "ssh": ["{GRANTED}"]}}]}}"#
    );
    let file = lab.dir().join("ssh-policy.json");
    std::fs::write(&file, &policy).unwrap();
    let f = file.to_string_lossy().into_owned();
    // SSH users without tcp:22 in the grant's ports are refused, naming the line.
    let bad = lab.dir().join("ssh-policy-bad.json");
    std::fs::write(&bad, policy.replace("tcp:22", "tcp:2222")).unwrap();
    let out = bob
        .ctl(&["policy", "set", &bad.to_string_lossy()])
        .expect_fail();
    assert!(
        out.stderr.contains("tcp:22") && out.stderr.contains("line 1"),
        "{out}"
    );
    bob.ctl(&["policy", "set", &f]).expect_ok();
    let out = wait_for(
        OVERLAY_TIMEOUT,
        "carol to log in to bob under the policy",
        || {
            let out = ssh(&carol, "bob", GRANTED, "id -un");
            if out.success() {
                Ok(out)
            } else {
                Err(out.to_string())
            }
        },
    );
    assert_eq!(out.stdout.trim(), GRANTED);
    let out = ssh(&carol, "bob", OTHER, "true").expect_fail();
    assert!(out.stderr.contains("Permission denied"), "{out}");

    // disable removes the drop-in and the published host key.
    ctl(
        &bob,
        &copy,
        &["ssh", "disable", "--sshd-config-dir", &sshd.dropins()],
    )
    .expect_ok();
    assert!(!foreign.exists());
    drop(users);
}

/// `a2actl ssh enable --user USER` on `node` with the test's drop-in directory and host key,
/// then sshd started on its overlay address.
fn enable_and_start(node: &Node, copy: &CtlCopy, sshd: &Sshd, user: &str) -> Proc {
    ctl(
        node,
        copy,
        &[
            "ssh",
            "enable",
            "--user",
            user,
            "--host-key",
            &sshd.host_pub(),
            "--sshd-config-dir",
            &sshd.dropins(),
        ],
    )
    .expect_ok();
    let config = sshd.dir.join("sshd_config").to_string_lossy().into_owned();
    node.ns
        .spawn("sshd", &["/usr/sbin/sshd", "-D", "-e", "-f", &config])
}

#[test]
fn a_forging_coordinator_plants_no_ssh_key() {
    let Some(lab) = Lab::new("ssh_forged") else {
        return;
    };
    require_tools(&[
        ("sshd", "openssh-server"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("useradd", "passwd"),
    ]);
    const USER: &str = "a2a-ssh-forged";
    let _users = Users::create(&[USER]);
    let copy = CtlCopy::new(&lab);
    // At every registration it hands out records (forged, self-certified, and real ones
    // tampered with) carrying SSH keys it holds the private halves of.
    let coord = lab.coordinator(CoordOpts {
        forging: true,
        ..Default::default()
    });
    let alice = lab.node("alice");
    let bob = lab.node("bob");
    alice.up_ok(&coord.token);
    bob.up_ok(&coord.token);
    alice.wait_peers(&["bob"], OVERLAY_TIMEOUT);
    bob.wait_peers(&["alice"], OVERLAY_TIMEOUT);
    let sshd = Sshd::prepare(&lab, &bob);
    let _sshd = enable_and_start(&bob, &copy, &sshd, USER);
    // The genuine member gets in (so the refusals below are not a broken setup).
    wait_for(OVERLAY_TIMEOUT, "alice to log in to bob", || {
        let out = ssh(&alice, "bob", USER, "true");
        out.success().then_some(()).ok_or(out.to_string())
    });
    assert!(
        bob.counter("records_bad_signature") > 0,
        "no forgery was tried"
    );

    // The forger's user key: bob's a2ad answers sshd nothing for it ...
    let forged = a2a_proto::ssh::public_of(&[0x55; 32]).to_openssh();
    let forged: Vec<&str> = forged.split_whitespace().collect();
    let out = ctl(
        &bob,
        &copy,
        &["ssh", "authorized-keys", USER, forged[0], forged[1]],
    )
    .expect_ok();
    assert!(out.stdout.trim().is_empty(), "{out}");
    assert!(out.stderr.contains("no member publishes"), "{out}");
    // ... and the real ssh with the forger's private key, even from a member's address, is
    // refused by bob's sshd.
    let key = lab.dir().join("forged_key");
    std::fs::write(
        &key,
        a2a_proto::ssh::openssh_private_key(&[0x55; 32], "forged"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let k = key.to_string_lossy().into_owned();
    let target = format!("{USER}@{}", bob.overlay_ip());
    let out = alice.ns.exec_timeout(
        &[
            "ssh",
            "-i",
            &k,
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=5",
            &target,
            "true",
        ],
        Duration::from_secs(30),
    );
    let out = out.expect_fail();
    assert!(out.stderr.contains("Permission denied"), "{out}");

    // alice trusts bob's own host key, never the forger's.
    let real = std::fs::read_to_string(sshd.host_pub()).unwrap();
    let real: Vec<&str> = real.split_whitespace().collect();
    let known = alice.ctl(&["ssh", "known-hosts", "bob.a2a"]).expect_ok();
    assert_eq!(
        known.stdout.trim(),
        format!("bob.a2a {} {}", real[0], real[1])
    );
    let forged_host = a2a_proto::ssh::public_of(&[0x56; 32]).to_openssh();
    assert!(!known.stdout.contains(&forged_host));
    let none = alice.ctl(&["ssh", "known-hosts", "forged"]).expect_ok();
    assert!(none.stdout.trim().is_empty(), "{none}");
}
