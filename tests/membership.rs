//! Membership and maintenance on a live cluster of real processes: growing it and shrinking it
//! while a client writes, handing leadership over, snapshots, and backup and restore into a
//! new cluster. Nothing acknowledged may be lost; refused input loses nothing.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use signpost_tests::{cli, cli_ok, record_with_ttl, ClusterOptions, TestCluster};

const READY: Duration = Duration::from_secs(60);
/// Writes in the background stop after this many, whatever happens.
const WRITES_MAX: u64 = 2_000;

fn admin_env(cluster: &TestCluster) -> Vec<(&'static str, std::path::PathBuf)> {
    vec![("SIGNPOST_CONFIG", cluster.client_toml())]
}

fn run_ok(cluster: &TestCluster, args: &[&str]) -> String {
    let env = admin_env(cluster);
    let env: Vec<(&str, &std::path::Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    cli_ok(args, &env)
}

fn status_json(cluster: &TestCluster) -> serde_json::Value {
    let out = run_ok(cluster, &["status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
}

/// The ids of the voters in `signpost status --json`.
fn voters(status: &serde_json::Value) -> BTreeSet<u64> {
    status["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter(|m| m["voter"].as_bool() == Some(true))
        .map(|m| m["id"].as_u64().expect("id"))
        .collect()
}

/// Registers `orders/w<i>` for i = 0, 1, ... until told to stop, recording each acknowledged
/// instance. Failures (an election, a node leaving) are retried by the client and otherwise
/// skipped: only acknowledgements count.
fn start_writer(
    cluster: &TestCluster,
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<BTreeSet<String>>>) {
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("orders")).unwrap();
    let client = cluster.client_as(&cluster.issue("service", "orders"), &[]);
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let acked_by_writer = Arc::clone(&acked);
    let task = tokio::spawn(async move {
        for i in 0..WRITES_MAX {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let name = format!("w{i}");
            let envelope = record_with_ttl(&key, "orders", &name, 1, 86_400);
            if client.register(envelope).await.is_ok() {
                acked_by_writer.lock().unwrap().insert(name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (task, acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_grows_to_five_and_shrinks_to_three_under_writes_without_losing_any() {
    let mut cluster = TestCluster::start(ClusterOptions::default());
    cluster.wait_ready(READY).await;

    eprintln!("phase 1: only an admin changes membership");
    let reader = cluster.issue("reader", "dash");
    let refused = cli(
        &[
            "cluster",
            "add",
            "9",
            "127.0.0.1:1",
            "127.0.0.1:2",
            "--cert",
            reader.with_extension("crt").to_str().unwrap(),
            "--cert-key",
            reader.with_extension("key").to_str().unwrap(),
        ],
        &[("SIGNPOST_CONFIG", &cluster.client_toml())],
    );
    assert!(!refused.status.success(), "a reader added a member");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("admin-only"), "{stderr}");
    assert_eq!(voters(&status_json(&cluster)), BTreeSet::from([1, 2, 3]));

    eprintln!("phase 2: a client writes throughout");
    let stop = Arc::new(AtomicBool::new(false));
    let (writer, acked) = start_writer(&cluster, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(500)).await;

    eprintln!("phase 3: nodes 4 and 5 join as learners, catch up and become voters");
    for id in [4, 5] {
        cluster.start_joining_node(id);
        let args = cluster.join_args(id);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_ok(&cluster, &args);
        assert!(
            out.contains(&format!("node {id} added as a voter")),
            "{out}"
        );
    }
    let status = status_json(&cluster);
    assert_eq!(voters(&status), BTreeSet::from([1, 2, 3, 4, 5]), "{status}");
    for member in status["members"].as_array().unwrap() {
        assert_eq!(member["reachable"], true, "{member}");
        assert!(
            member["last_contact_ms"].is_u64(),
            "leader's view: {member}"
        );
        assert!(member["lag"].is_u64(), "leader's view: {member}");
    }
    // Adding the same node again is a no-op, not an error (an operator may retry).
    let args = cluster.join_args(5);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(&cluster, &args);

    eprintln!("phase 4: leadership moves to node 4 on request");
    let out = run_ok(&cluster, &["cluster", "transfer-leader", "4"]);
    assert!(out.contains("node 4 leads"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.agreed_leader().await != Some(4) {
        assert!(
            Instant::now() < deadline,
            "node 4 never led\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    eprintln!("phase 5: nodes 1 and 5 leave; the leader refuses to remove itself");
    let env = admin_env(&cluster);
    let env: Vec<(&str, &std::path::Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let itself = cli(&["cluster", "remove", "4"], &env);
    assert!(!itself.status.success(), "the leader removed itself");
    assert!(
        String::from_utf8_lossy(&itself.stderr).contains("transfer leadership first"),
        "{}",
        String::from_utf8_lossy(&itself.stderr)
    );
    for id in [1, 5] {
        let out = run_ok(&cluster, &["cluster", "remove", &id.to_string()]);
        assert!(out.contains(&format!("node {id} removed")), "{out}");
        cluster.forget(id);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    eprintln!("phase 6: three voters remain, and every acknowledged write is on each of them");
    assert_eq!(voters(&status_json(&cluster)), BTreeSet::from([2, 3, 4]));
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "the writer made progress: {}",
        acked.len()
    );
    for node in [2, 3, 4] {
        let resolved = cluster
            .client(&[node])
            .resolve("orders", false)
            .await
            .unwrap_or_else(|e| panic!("resolve via node {node}: {e}\n{}", cluster.logs()));
        let have: BTreeSet<String> = resolved
            .instances
            .into_iter()
            .map(|i| i.payload.instance)
            .collect();
        let lost: Vec<&String> = acked.difference(&have).collect();
        assert!(
            lost.is_empty(),
            "node {node} lost acknowledged writes {lost:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_into_a_new_cluster_with_the_same_signed_records_and_refuses_bad_files() {
    let old = TestCluster::start(ClusterOptions::default());
    old.wait_ready(READY).await;

    eprintln!("phase 1: records and a snapshot in the old cluster");
    let key = signpost_record::read_signing_key(&old.bind_new_key("payments")).unwrap();
    let service = old.client_as(&old.issue("service", "payments"), &[]);
    for i in 0..5 {
        service
            .register(record_with_ttl(
                &key,
                "payments",
                &format!("p{i}"),
                1,
                86_400,
            ))
            .await
            .unwrap();
    }
    let out = run_ok(&old, &["snapshot"]);
    assert_eq!(out.matches("snapshot at index").count(), 3, "{out}");
    let before = old.client(&[]).resolve("payments", false).await.unwrap();

    eprintln!("phase 2: a backup is written once, and never over an existing file");
    let file = old.root().join("registry.backup");
    let out = run_ok(&old, &["backup", "--out", file.to_str().unwrap()]);
    assert!(out.contains("as of revision"), "{out}");
    let env = admin_env(&old);
    let env: Vec<(&str, &std::path::Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let again = cli(&["backup", "--out", file.to_str().unwrap()], &env);
    assert!(!again.status.success(), "a backup overwrote a file");

    eprintln!("phase 3: a corrupted copy and a truncated copy are refused, writing nothing");
    let bytes = std::fs::read(&file).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    let corrupted = scratch.path().join("corrupted.backup");
    std::fs::write(&corrupted, &flipped).unwrap();
    let truncated = scratch.path().join("truncated.backup");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let target_config = old.root().join("node1/config.toml");
    for bad in [&corrupted, &truncated] {
        let restore_dir = scratch.path().join("never");
        let config = std::fs::read_to_string(&target_config).unwrap().replace(
            "data_dir = \"data\"",
            &format!("data_dir = \"{}\"", restore_dir.display()),
        );
        let config_path = scratch.path().join("node.toml");
        std::fs::write(&config_path, config).unwrap();
        let out = cli(
            &[
                "restore",
                bad.to_str().unwrap(),
                "--config",
                config_path.to_str().unwrap(),
            ],
            &[],
        );
        assert!(!out.status.success(), "restored {}", bad.display());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("corrupted"), "{stderr}");
        assert!(
            !restore_dir.exists(),
            "a refused restore wrote {}",
            restore_dir.display()
        );
    }

    eprintln!("phase 4: a cluster with another genesis admin set refuses the backup as foreign");
    let stranger = TestCluster::start(ClusterOptions {
        nodes: 1,
        ..ClusterOptions::default()
    });
    let stranger_config = stranger.root().join("node1/config.toml");
    let foreign_dir = scratch.path().join("foreign");
    let config = std::fs::read_to_string(&stranger_config).unwrap().replace(
        "data_dir = \"data\"",
        &format!("data_dir = \"{}\"", foreign_dir.display()),
    );
    let config_path = scratch.path().join("stranger.toml");
    std::fs::write(&config_path, config).unwrap();
    let out = cli(
        &[
            "restore",
            file.to_str().unwrap(),
            "--config",
            config_path.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!out.status.success(), "a foreign backup was restored");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("foreign"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(stranger);

    eprintln!("phase 5: a new cluster restored from the backup serves the same signed records");
    let restored = TestCluster::start(ClusterOptions {
        identity_from: Some(old.root().to_path_buf()),
        restore_from: Some(file.clone()),
        ..ClusterOptions::default()
    });
    restored.wait_ready(READY).await;
    let after = restored
        .client(&[])
        .resolve("payments", false)
        .await
        .unwrap();
    assert_eq!(
        after.envelopes, before.envelopes,
        "records or signatures differ"
    );
    assert!(
        after.revision >= before.revision,
        "the restored cluster went back in revisions: {} < {}",
        after.revision,
        before.revision
    );
    eprintln!("phase 6: and takes new writes");
    let new_service = restored.client_as(&restored.issue("service", "payments"), &[]);
    new_service
        .register(record_with_ttl(&key, "payments", "p-new", 1, 86_400))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_add_onboards_a_service_in_one_idempotent_command_that_never_overwrites_a_key() {
    let cluster = TestCluster::start(ClusterOptions::default());
    cluster.wait_ready(READY).await;
    let out_dir = cluster.root().join("svc-inventory");
    let ca_dir = cluster.ca_dir();
    let args = [
        "service",
        "add",
        "inventory",
        "--out",
        out_dir.to_str().unwrap(),
        "--ca-dir",
        ca_dir.to_str().unwrap(),
    ];

    eprintln!("phase 1: one command, then the service registers with what it wrote");
    let out = run_ok(&cluster, &args);
    assert!(out.contains("(new)"), "{out}");
    let key_path = out_dir.join("inventory.key");
    let key_before = std::fs::read(&key_path).unwrap();
    let config = out_dir.join("client.toml");
    let register = [
        "register",
        "inventory",
        "--config",
        config.to_str().unwrap(),
        "--key",
        key_path.to_str().unwrap(),
        "--instance",
        "i1",
        "--endpoint",
        "10.0.0.7:9000",
    ];
    let out = cli_ok(&register, &[]);
    assert!(out.contains("registered inventory/i1"), "{out}");

    eprintln!("phase 2: running it again keeps the key and the binding");
    let out = run_ok(&cluster, &args);
    assert!(out.contains("(kept)"), "{out}");
    assert!(out.contains("already in place"), "{out}");
    assert_eq!(
        std::fs::read(&key_path).unwrap(),
        key_before,
        "the key changed"
    );
    let resolved = cluster
        .client(&[])
        .resolve("inventory", false)
        .await
        .unwrap();
    assert_eq!(
        resolved.instances.len(),
        1,
        "the instance survived a second run"
    );

    eprintln!("phase 3: the service's certificate may not write another service");
    let other = cli(
        &[
            "register",
            "payments",
            "--config",
            config.to_str().unwrap(),
            "--key",
            key_path.to_str().unwrap(),
            "--instance",
            "x",
            "--endpoint",
            "10.0.0.7:9000",
        ],
        &[],
    );
    assert!(!other.status.success(), "inventory wrote payments");
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(stderr.contains("own-name-only"), "{stderr}");

    eprintln!("phase 4: an unreadable key file is refused, not replaced");
    std::fs::write(&key_path, b"not a key").unwrap();
    let env = admin_env(&cluster);
    let env: Vec<(&str, &std::path::Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let out = cli(&args, &env);
    assert!(!out.status.success(), "a broken key was replaced");
    assert_eq!(std::fs::read(&key_path).unwrap(), b"not a key");
}
