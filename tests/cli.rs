//! The README's "run" command: `signpost dev` starts a three-node cluster with generated
//! certificates, writes client.toml, and stops every node on a signal.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use signpost_tests::{cli, cli_ok, free_port, signpost_bin};

#[test]
fn signpost_dev_starts_a_usable_three_node_cluster_and_stops_it_on_sigterm() {
    eprintln!("phase 1: start `signpost dev` and wait for its ready line");
    let dir = tempfile::tempdir().unwrap();
    let dev_dir = dir.path().join("dev");
    // Ports base+1..3, base+101..103 and base+201..203 must be free; pick a base from a free port.
    let base = (free_port() / 2).clamp(20_000, 30_000);
    let mut dev = start_dev(&dev_dir, base);
    let client_toml = dev_dir.join("client.toml");
    assert!(client_toml.exists());

    eprintln!("phase 2: status --json lists three members and one leader");
    let env = [("SIGNPOST_CONFIG", client_toml.as_path())];
    let status: serde_json::Value =
        serde_json::from_str(&cli_ok(&["status", "--json"], &env)).expect("status json");
    let members = status["members"].as_array().expect("members");
    assert_eq!(members.len(), 3);
    let leader_id = status["leader_id"].as_u64().expect("leader_id");
    assert!(members
        .iter()
        .any(|m| m["id"].as_u64() == Some(leader_id) && m["role"] == "leader"));
    for m in members {
        assert!(m["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    }

    for m in members {
        let metrics = m["metrics_addr"].as_str().expect("metrics_addr per member");
        assert!(metrics.starts_with("127.0.0.1:"), "{m}");
    }

    eprintln!("phase 3: the quick start of the README works: service add, register, resolve");
    let service_dir = dev_dir.join("payments");
    cli_ok(
        &[
            "service",
            "add",
            "payments",
            "--out",
            service_dir.to_str().unwrap(),
            "--ca-dir",
            dev_dir.join("ca").to_str().unwrap(),
        ],
        &env,
    );
    let key = service_dir.join("payments.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "private key must be 0600");
    }
    cli_ok(
        &[
            "register",
            "payments",
            "--instance",
            "p1",
            "--endpoint",
            "127.0.0.1:9000",
            "--meta",
            "zone=a",
            "--config",
            service_dir.join("client.toml").to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    let resolved: serde_json::Value =
        serde_json::from_str(&cli_ok(&["resolve", "payments", "--json"], &env)).unwrap();
    assert_eq!(resolved["instances"][0]["instance"], "p1");
    assert_eq!(resolved["instances"][0]["endpoints"][0]["port"], 9000);
    assert_eq!(resolved["instances"][0]["metadata"]["zone"], "a");

    eprintln!("phase 4: a refused command exits non-zero with the gRPC code in one line");
    let out = cli(&["resolve", "nonexistent", "--json"], &env);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NOT_FOUND"), "stderr: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "stderr: {stderr}");

    eprintln!("phase 5: SIGTERM stops the cluster and every node exits");
    stop_dev(&mut dev);
    let out = cli(&["status", "--json"], &env);
    assert!(
        !out.status.success(),
        "nodes still answer after dev stopped"
    );

    eprintln!("phase 6: a restart keeps what the nodes logged before it");
    let log = dev_dir.join("node1").join("server.log");
    let before = std::fs::read(&log).unwrap();
    assert!(!before.is_empty());
    let mut dev = start_dev(&dev_dir, base);
    stop_dev(&mut dev);
    let after = std::fs::read(&log).unwrap();
    assert!(
        after.starts_with(&before),
        "the log was truncated on restart"
    );
    assert!(
        after.len() > before.len(),
        "the restarted node logged nothing"
    );
}

/// Starts `signpost dev` in `dir` and returns once it printed its ready line.
fn start_dev(dir: &std::path::Path, base: u16) -> std::process::Child {
    let mut dev = Command::new(signpost_bin())
        .args([
            "dev",
            "--dir",
            dir.to_str().unwrap(),
            "--base-port",
            &base.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn signpost dev");
    let stdout = dev.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let started = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_secs(90).saturating_sub(started.elapsed())) {
            Ok(line) if line.contains("cluster is up") => return dev,
            Ok(_) => {}
            Err(_) => {
                let _ = dev.kill();
                let _ = dev.wait();
                panic!("signpost dev printed no ready line in time");
            }
        }
    }
}

/// SIGTERM to `signpost dev`; it must stop every node and exit 0 within 30 s.
fn stop_dev(dev: &mut std::process::Child) {
    let pid = dev.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = dev.try_wait().unwrap() {
            assert!(status.success(), "signpost dev exited with {status}");
            return;
        }
        assert!(Instant::now() < deadline, "signpost dev did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn version_names_the_release_and_the_commit_it_was_built_from() {
    let out = cli_ok(&["--version"], &[]);
    let line = out.trim();
    assert!(
        line.starts_with(&format!("signpost {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{line}"
    );
    let commit = line
        .split("(commit ")
        .nth(1)
        .and_then(|rest| rest.strip_suffix(')'))
        .expect("a commit");
    let hash = commit.trim_end_matches("-modified");
    assert!(
        hash == "unknown" || (hash.len() == 12 && hash.chars().all(|c| c.is_ascii_hexdigit())),
        "{line}"
    );
}

/// Stops `signpost dev` when dropped, also when a test fails.
struct DevGuard(std::process::Child);

impl Drop for DevGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            stop_dev(&mut self.0);
        }
    }
}

#[test]
fn the_drill_kills_and_pauses_the_leader_of_a_dev_cluster_and_finds_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let dev_dir = dir.path().join("dev");
    let base = (free_port() / 2).clamp(30_000, 40_000);
    let _dev = DevGuard(start_dev(&dev_dir, base));
    let env = [("SIGNPOST_CONFIG", dev_dir.join("client.toml"))];
    let env: Vec<(&str, &std::path::Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let cert = dev_dir.join("drill-cert");
    cli_ok(
        &[
            "ca",
            "issue",
            "--service",
            "drill",
            "--ca-dir",
            dev_dir.join("ca").to_str().unwrap(),
            "--out",
            cert.to_str().unwrap(),
        ],
        &[],
    );
    let leader_before: serde_json::Value =
        serde_json::from_str(&cli_ok(&["status", "--json"], &env)).unwrap();
    let leader_before = leader_before["leader_id"].as_u64().unwrap();
    let pid_file = dev_dir.join(format!("node{leader_before}/pid"));
    let pid_before = std::fs::read_to_string(&pid_file).unwrap();

    eprintln!("phase 1: the drill kills, then pauses, the leader while writing and reading");
    let out = cli_ok(
        &[
            "drill",
            "--target",
            "dev",
            "--dir",
            dev_dir.to_str().unwrap(),
            "--fault",
            "kill",
            "--fault",
            "pause",
            "--fault-secs",
            "2",
            "--settle-secs",
            "2",
            "--service-cert",
            cert.to_str().unwrap(),
            "--json",
        ],
        &env,
    );
    let report: serde_json::Value = serde_json::from_str(&out).expect("drill json");
    eprintln!("  {report}");
    let faults = report["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 2, "{report}");
    assert_eq!(faults[0]["fault"], "kill");
    assert_eq!(faults[0]["node"], leader_before);
    assert_eq!(faults[1]["fault"], "pause");
    for fault in faults {
        assert!(fault["write_outage_ms"].is_u64(), "{fault}");
        assert!(fault["read_outage_ms"].is_u64(), "{fault}");
    }
    assert!(report["acknowledged"].as_u64().unwrap() > 20, "{report}");
    assert_eq!(report["missing"], serde_json::json!([]), "{report}");

    eprintln!("phase 2: signpost dev restarted the killed node");
    let pid_after = std::fs::read_to_string(&pid_file).unwrap();
    assert_ne!(pid_before, pid_after, "the killed node was not restarted");

    eprintln!("phase 3: a partition is refused for a dev cluster, before any fault");
    let refused = cli(
        &[
            "drill",
            "--target",
            "dev",
            "--dir",
            dev_dir.to_str().unwrap(),
            "--fault",
            "partition",
            "--service-cert",
            cert.to_str().unwrap(),
        ],
        &env,
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("cannot partition"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn bench_and_dev_refuse_bad_options_with_a_clear_error_before_doing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let said = |out: &std::process::Output| {
        assert!(!out.status.success(), "a bad option was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    eprintln!("phase 1: an etcd bench without endpoints, or without its certificates");
    let out = cli(&["bench", "--target", "etcd", "--duration", "1"], &[]);
    assert!(said(&out).contains("--endpoints"), "{out:?}");
    let out = cli(
        &[
            "bench",
            "--target",
            "etcd",
            "--endpoints",
            "127.0.0.1:1",
            "--duration",
            "1",
        ],
        &[],
    );
    assert!(said(&out).contains("--etcd-ca"), "{out:?}");

    eprintln!("phase 2: --lease is an etcd notion; a Signpost record always has a TTL");
    let out = cli(&["bench", "--lease", "--duration", "1"], &[]);
    assert!(
        said(&out).contains("--lease is for --target etcd"),
        "{out:?}"
    );

    eprintln!("phase 2b: a mix that is not three small numbers, and options of other workloads");
    for mix in ["80:20", "a:1:1", "0:0:0", "1001:0:0"] {
        let out = cli(&["bench", "--workload", "mixed", "--mix", mix], &[]);
        assert!(said(&out).contains("--mix"), "{mix}: {out:?}");
    }
    let out = cli(
        &["bench", "--workload", "register", "--resolve-service", "a"],
        &[],
    );
    assert!(said(&out).contains("--resolve-service is for"), "{out:?}");
    let out = cli(&["bench", "--workload", "watch", "--flood", "read"], &[]);
    assert!(
        said(&out).contains("--workload watch takes neither"),
        "{out:?}"
    );
    let out = cli(&["dev", "--state-mib-max", "449"], &[]);
    assert!(said(&out).contains("--state-mib-max"), "{out:?}");
    // Keep-alives are the leader's, and etcd clients are spread anyway.
    for extra in [
        &["--workload", "mixed"][..],
        &["--target", "etcd", "--endpoints", "127.0.0.1:1"][..],
    ] {
        let out = cli(&[&["bench", "--spread"][..], extra].concat(), &[]);
        assert!(said(&out).contains("--spread is for"), "{extra:?}: {out:?}");
    }

    eprintln!("phase 3: a limits file with a typo is refused, and no node is started");
    let limits = dir.path().join("limits.toml");
    std::fs::write(&limits, "writes_per_identity_per_second = 5\n").unwrap();
    let dev_dir = dir.path().join("dev");
    let out = cli(
        &[
            "dev",
            "--dir",
            dev_dir.to_str().unwrap(),
            "--limits",
            limits.to_str().unwrap(),
        ],
        &[],
    );
    let err = said(&out);
    assert!(err.contains("not a limits table"), "{err}");
    assert!(
        err.contains("writes_per_identity_per_second"),
        "names the bad key: {err}"
    );
    assert!(!dev_dir.join("node1/pid").exists(), "a node was started");

    eprintln!("phase 4: the shipped throughput limits file is one dev accepts");
    let shipped =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/limits-throughput.toml");
    let parsed: signpost_server::config::LimitsConfig =
        toml::from_str(&std::fs::read_to_string(shipped).unwrap()).expect("valid limits");
    assert!(
        parsed.writes_per_identity_per_sec
            > signpost_server::config::LimitsConfig::default().writes_per_identity_per_sec
    );
}
