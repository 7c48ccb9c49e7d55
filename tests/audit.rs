//! The audit log against real processes: one tree on every node, a byte changed on one node's
//! disk found at its record, and proofs that an independent RFC 9162 verifier accepts.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use signpost_proto::v1::DeregisterPayload;
use signpost_tests::{
    cli, cli_ok, now_ms, record_with_ttl, signed_record, ClusterOptions, TestCluster,
};

const READY: Duration = Duration::from_secs(60);

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Runs the independent Python verifier on a proof the CLI printed; true if it verifies.
fn rfc9162_accepts(kind: &str, proof: &Value) -> bool {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("support/rfc9162.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(kind)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(proof.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        eprintln!(
            "  rfc9162.py: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    out.status.success()
}

/// `audit verify --json` of one node, retried while the node is still starting.
fn verify_node(env: &[(&str, &Path)], id: u64) -> (bool, Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cli(
            &["audit", "verify", "--node", &id.to_string(), "--json"],
            env,
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        if let Ok(report) = serde_json::from_str::<Value>(&stdout) {
            if report.get("tree_size").is_some() {
                return (out.status.success(), report);
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {id} never answered audit verify: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_holds_one_audit_tree_and_a_byte_changed_on_disk_is_found_at_its_record() {
    let mut cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let config = cluster.client_toml();
    let env = [("SIGNPOST_CONFIG", config.as_path())];

    eprintln!("phase 1: a binding, three registrations and a deregistration");
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let writer = cluster.client_as(&cluster.issue("service", "payments"), &[leader]);
    for (instance, sequence, port) in [("p1", 1, 443), ("p2", 1, 443), ("p1", 2, 444)] {
        writer
            .register(signed_record(&key, "payments", instance, sequence, port))
            .await
            .unwrap();
    }
    let payload = DeregisterPayload {
        service: "payments".into(),
        instance: "p2".into(),
        sequence: 2,
        issued_at_ms: now_ms(),
    };
    writer
        .deregister(signpost_record::sign_deregister(&key, &payload))
        .await
        .unwrap();

    eprintln!("phase 2: the tail names every change, its result and who asked for it");
    let records = json_lines(&cli_ok(&["audit", "tail", "-n", "100", "--json"], &env));
    let ops: Vec<(&str, &str, &str, u64)> = records
        .iter()
        .map(|r| {
            (
                r["op"].as_str().unwrap(),
                r["instance"].as_str().unwrap(),
                r["result"].as_str().unwrap(),
                r["sequence"].as_u64().unwrap(),
            )
        })
        .collect();
    // A bind the test's set-up sent before the genesis entry was applied is refused at apply
    // (no admin set yet) and retried: those refusals are history too.
    let genesis_at = ops.iter().position(|o| o.0 == "genesis").unwrap();
    for early in &records[..genesis_at] {
        assert_eq!(
            (early["op"].as_str(), early["reason"].as_str()),
            (Some("bind"), Some("no_admin_set")),
            "{early}"
        );
    }
    let version = records[genesis_at + 1]["sequence"].as_u64().unwrap();
    assert_eq!(
        ops[genesis_at..],
        [
            ("genesis", "", "applied", 0),
            ("bind", "", "applied", version),
            ("register", "p1", "applied", 1),
            ("register", "p2", "applied", 1),
            ("register", "p1", "applied", 2),
            ("deregister", "p2", "applied", 2),
        ]
    );
    assert_eq!(records[0]["index"], 0);
    let size = records.len() as u64;
    let bind = &records[genesis_at + 1];
    assert!(
        bind["caller"].as_str().unwrap().contains("/admin/"),
        "{bind}"
    );
    let first = &records[genesis_at + 2];
    assert!(first["caller"]
        .as_str()
        .unwrap()
        .ends_with("/service/payments"));
    assert_eq!(first["envelope_sha256"].as_str().unwrap().len(), 64);
    let export = json_lines(&cli_ok(&["audit", "export"], &env));
    assert_eq!(
        export, records,
        "export is the same records, from the first"
    );

    eprintln!("phase 3: every node verifies its copy, and the copies are one history");
    let deadline = Instant::now() + Duration::from_secs(20);
    let report = loop {
        let out = cli(&["audit", "verify", "--json"], &env);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let sizes: Vec<u64> = report["nodes"]
            .as_array()
            .map(|n| n.iter().filter_map(|n| n["tree_size"].as_u64()).collect())
            .unwrap_or_default();
        if out.status.success() && sizes.len() == 3 && sizes.iter().all(|s| *s == size) {
            break report;
        }
        assert!(Instant::now() < deadline, "nodes never agreed: {report}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let heads: Vec<&str> = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["head_hash"].as_str().unwrap())
        .collect();
    assert!(heads.windows(2).all(|w| w[0] == w[1]), "{report}");
    assert_eq!(report["nodes"][0]["head_index"], size - 1);

    eprintln!("phase 4: proofs that an independent RFC 9162 verifier accepts, and a tampered one it does not");
    let proof: Value = serde_json::from_str(&cli_ok(
        &["audit", "prove", "payments", "p1", "--json"],
        &env,
    ))
    .unwrap();
    assert_eq!(
        proof["index"],
        size - 2,
        "p1's current record is its second registration"
    );
    assert_eq!(proof["record"]["sequence"], 2);
    assert!(rfc9162_accepts("inclusion", &proof));
    let mut forged = proof.clone();
    let leaf = forged["leaf"].as_str().unwrap().to_string();
    let flipped = if leaf.ends_with('0') { "1" } else { "0" };
    forged["leaf"] = Value::from(format!("{}{flipped}", &leaf[..leaf.len() - 1]));
    assert!(
        !rfc9162_accepts("inclusion", &forged),
        "the checker can fail"
    );
    for (old, new) in [
        (1, size),
        (2, size),
        (3, size - 1),
        (size - 2, size),
        (size, size),
    ] {
        let (old, new) = (old.to_string(), new.to_string());
        let consistency: Value = serde_json::from_str(&cli_ok(
            &["audit", "consistency", &old, &new, "--json"],
            &env,
        ))
        .unwrap();
        assert!(
            rfc9162_accepts("consistency", &consistency),
            "{old} -> {new}: {consistency}"
        );
    }

    eprintln!("phase 5: questions about trees that do not exist get a clear refusal");
    let has = format!("this node has {size}");
    for (old, new, says) in [
        ("5", "3", "no consistency proof"),
        ("0", "3", "no consistency proof"),
        ("1", "999", has.as_str()),
    ] {
        let out = cli(&["audit", "consistency", old, new], &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{old} -> {new} answered");
        assert!(stderr.contains(says), "{old} -> {new}: {stderr}");
    }
    let out = cli(&["audit", "prove", "payments", "p2"], &env);
    assert!(!out.status.success(), "p2 was deregistered");

    eprintln!("phase 6: a byte changed in a stopped node's store is found at that record");
    let victim = cluster.others(leader)[0];
    let honest = cluster.others(leader)[1];
    // p2's registration.
    let bad = genesis_at as u64 + 3;
    cluster.kill9(victim);
    {
        let data = cluster.root().join(format!("node{victim}")).join("data");
        let store = signpost_storage::Store::open(&data).unwrap();
        let (_, mut leaf) = store.audit_leaves(bad, 1, usize::MAX).unwrap().remove(0);
        let last = leaf.len() - 1;
        leaf[last] ^= 1;
        store.audit_overwrite_leaf(bad, &leaf).unwrap();
    }
    cluster.restart(victim);
    let (ok, tampered) = verify_node(&env, victim);
    assert!(!ok, "verify must fail on node {victim}: {tampered}");
    assert_eq!(tampered["verified"], false);
    assert_eq!(tampered["first_bad_index"], bad, "{tampered}");
    let (ok, clean) = verify_node(&env, honest);
    assert!(ok, "{clean}");
    assert_eq!(
        clean["head_hash"], tampered["head_hash"],
        "the replicated head is the same on every node; only the stored copy was changed"
    );
    let out = cli(&["audit", "verify"], &env);
    assert!(!out.status.success(), "the cluster-wide verify fails too");
}

/// `audit checkpoint --node ID --json`: the verified checkpoint, or the CLI's error.
fn checkpoint_of(env: &[(&str, &Path)], id: u64) -> Result<Value, String> {
    let out = cli(
        &["audit", "checkpoint", "--node", &id.to_string(), "--json"],
        env,
    );
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Waits (at most 30 s) until node `id` holds a verified checkpoint for which `wanted` holds.
async fn wait_checkpoint(
    env: &[(&str, &Path)],
    id: u64,
    what: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = checkpoint_of(env, id);
        if let Ok(checkpoint) = &last {
            if wanted(checkpoint) {
                return checkpoint.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {id} never held a checkpoint {what}: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn checkpoint_key_hex(cluster: &TestCluster, id: u64) -> String {
    std::fs::read_to_string(cluster.root().join(format!("node{id}/checkpoint.key.pub")))
        .unwrap()
        .trim()
        .to_string()
}

fn signers(checkpoint: &Value) -> Vec<String> {
    let mut keys: Vec<String> = checkpoint["signers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_majority_of_the_bound_checkpoint_keys_signs_checkpoints_that_cover_every_change() {
    let mut cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let config = cluster.client_toml();
    let env = [("SIGNPOST_CONFIG", config.as_path())];
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let writer = cluster.client_as(&cluster.issue("service", "payments"), &[leader]);

    eprintln!(
        "phase 1: until checkpoint keys are bound there are no checkpoints, and verify says so"
    );
    let err = checkpoint_of(&env, leader).unwrap_err();
    assert!(err.contains("no checkpoint keys are bound"), "{err}");
    let (ok, report) = verify_node(&env, leader);
    assert!(ok, "{report}");
    assert_eq!(report["checkpoint"], Value::Null, "{report}");

    eprintln!("phase 2: once bound, every node holds a C2SP checkpoint signed by a majority");
    cluster.bind_checkpoint_keys(&[1, 2, 3]);
    let all_keys: Vec<String> = (1..=3).map(|id| checkpoint_key_hex(&cluster, id)).collect();
    for id in 1..=3 {
        let checkpoint = wait_checkpoint(&env, id, "signed by two or three nodes", |c| {
            signers(c).len() >= 2
        })
        .await;
        for signer in signers(&checkpoint) {
            assert!(all_keys.contains(&signer), "{signer} is not a bound key");
        }
        let note = checkpoint["note"].as_str().unwrap();
        let lines: Vec<&str> = note.split('\n').collect();
        assert!(lines[0].starts_with("signpost.audit/"), "{note}");
        assert_eq!(lines[0], checkpoint["origin"], "{note}");
        assert_eq!(lines[1], checkpoint["tree_size"].to_string(), "{note}");
        assert_eq!(lines[2].len(), 44, "a base64 SHA-256: {note}");
        assert!(lines[3].starts_with("time "), "{note}");
        assert_eq!(lines[4], "", "{note}");
        let signature_lines = lines[5..].iter().filter(|l| !l.is_empty()).count();
        assert!(signature_lines >= 2, "{note}");
        assert!(lines[5..]
            .iter()
            .filter(|l| !l.is_empty())
            .all(|l| l.starts_with(&format!("— {} ", lines[0]))));
    }

    eprintln!("phase 3: a registration is covered by a checkpoint within seconds, and verify checks the head against it");
    writer
        .register(signed_record(&key, "payments", "p1", 1, 443))
        .await
        .unwrap();
    let (_, report) = verify_node(&env, leader);
    let size = report["tree_size"].as_u64().unwrap();
    for id in 1..=3 {
        wait_checkpoint(&env, id, &format!("of at least {size} records"), |c| {
            c["tree_size"].as_u64().unwrap() >= size
        })
        .await;
    }
    let out = cli(&["audit", "verify", "--json"], &env);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{report}");
    for node in report["nodes"].as_array().unwrap() {
        assert!(
            node["checkpoint"]["tree_size"].as_u64().unwrap() >= size,
            "{node}"
        );
    }

    eprintln!("phase 4: with a follower down, the other two still make checkpoints");
    let [down, up] = <[u64; 2]>::try_from(cluster.others(leader)).unwrap();
    cluster.kill9(down);
    let stopped_at = now_ms();
    writer
        .register(signed_record(&key, "payments", "p2", 1, 443))
        .await
        .unwrap();
    let (_, report) = verify_node(&env, leader);
    let size = report["tree_size"].as_u64().unwrap();
    let two: Vec<String> = {
        let mut keys = vec![
            checkpoint_key_hex(&cluster, leader),
            checkpoint_key_hex(&cluster, up),
        ];
        keys.sort();
        keys
    };
    wait_checkpoint(&env, leader, "signed by the two live nodes", |c| {
        c["time_ms"].as_u64().unwrap() > stopped_at
            && c["tree_size"].as_u64().unwrap() >= size
            && signers(c) == two
    })
    .await;

    eprintln!("phase 5: rebound to the leader's and the stopped node's keys, the live follower's signature no longer counts: too few signatures");
    cluster.bind_checkpoint_keys(&[leader, down]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let err = loop {
        match checkpoint_of(&env, leader) {
            Err(e) if e.contains("valid signatures") => break e,
            other => assert!(
                Instant::now() < deadline,
                "the old checkpoint still verifies: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        err.contains("1 valid signatures") && err.contains("2 are needed"),
        "{err}"
    );
    // Several rounds later the leader still has no checkpoint the new keys sign.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let err = checkpoint_of(&env, leader).unwrap_err();
    assert!(err.contains("valid signatures"), "{err}");
    let (ok, report) = verify_node(&env, leader);
    assert!(
        !ok,
        "verify must fail without a checkpoint the bound keys sign: {report}"
    );

    eprintln!("phase 6: the stopped node back, checkpoints resume with its signature");
    cluster.restart(down);
    let both: Vec<String> = {
        let mut keys = vec![
            checkpoint_key_hex(&cluster, leader),
            checkpoint_key_hex(&cluster, down),
        ];
        keys.sort();
        keys
    };
    wait_checkpoint(
        &env,
        leader,
        "signed by the leader and the restarted node",
        |c| signers(c) == both,
    )
    .await;
    let (ok, report) = verify_node(&env, leader);
    assert!(ok, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_keeps_its_audit_records_within_the_byte_budget_and_still_proves_from_its_checkpoint(
) {
    const BUDGET: u64 = 64 * 1024;
    let mut cluster = TestCluster::start(ClusterOptions {
        audit_toml: format!("retain_bytes = {BUDGET}\n"),
        ..ClusterOptions::default()
    });
    let leader = cluster.wait_ready(READY).await;
    let config = cluster.client_toml();
    let env = [("SIGNPOST_CONFIG", config.as_path())];
    cluster.bind_checkpoint_keys(&[1, 2, 3]);
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let writer = cluster.client_as(&cluster.issue("service", "payments"), &[leader]);

    eprintln!("phase 1: 800 registrations, several times the budget of records");
    for sequence in 1..=2u64 {
        for batch in 0..(400 / 25) {
            let writes = (0..25).map(|i| {
                let instance = format!("i{}", batch * 25 + i);
                // Leases outlive the test: expiries would add records after the prune.
                let envelope = record_with_ttl(&key, "payments", &instance, sequence, 3600);
                let writer = &writer;
                async move { writer.register(envelope).await }
            });
            for result in futures::future::join_all(writes).await {
                result.unwrap();
            }
        }
    }
    let (_, report) = verify_node(&env, leader);
    let size = report["tree_size"].as_u64().unwrap();
    assert!(size > 800, "{report}");

    eprintln!(
        "phase 2: every node prunes its oldest records and still verifies, checkpoint included"
    );
    let mut firsts = Vec::new();
    for id in 1..=3 {
        let deadline = Instant::now() + Duration::from_secs(40);
        let report = loop {
            let (ok, report) = verify_node(&env, id);
            let first = report["first_index"].as_u64().unwrap_or(0);
            let covered = report["checkpoint"]["tree_size"].as_u64() == Some(size);
            if ok && first > 0 && report["tree_size"].as_u64() == Some(size) && covered {
                break report;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} never pruned (or no longer verifies): {report}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let checkpoint_size = report["checkpoint"]["tree_size"].as_u64().unwrap();
        let first = report["first_index"].as_u64().unwrap();
        assert!(
            first <= checkpoint_size,
            "node {id} pruned past its checkpoint: {report}"
        );
        firsts.push(first);
    }
    // Retention never prunes past a node's latest checkpoint, so a round that ran before the
    // checkpoints covered every record may have left more than the budget; two rounds since
    // they do bring every node within it.
    tokio::time::sleep(signpost_consensus::audit_retention::RETENTION_EVERY * 2).await;
    let out = cli(&["audit", "verify"], &env);
    assert!(
        out.status.success(),
        "the nodes still verify as one history: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    eprintln!("phase 3: pruned records are refused as such; the kept ones are served and proven");
    let out = cli(
        &[
            "audit",
            "export",
            "--from",
            "0",
            "--node",
            &leader.to_string(),
        ],
        &env,
    );
    assert!(!out.status.success(), "record 0 was pruned");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pruned"), "{stderr}");
    let tail = json_lines(&cli_ok(
        &[
            "audit",
            "tail",
            "-n",
            "5",
            "--json",
            "--node",
            &leader.to_string(),
        ],
        &env,
    ));
    assert_eq!(tail.len(), 5);
    assert_eq!(tail[4]["index"], size - 1);
    let proof: Value = serde_json::from_str(&cli_ok(
        &["audit", "prove", "payments", "i399", "--json"],
        &env,
    ))
    .unwrap();
    assert!(rfc9162_accepts("inclusion", &proof), "{proof}");

    eprintln!("phase 3b: live registrations older than every node's base are still proven");
    let leader_first = firsts[leader as usize - 1];
    let proof: Value = serde_json::from_str(&cli_ok(
        &["audit", "prove", "payments", "i0", "--json"],
        &env,
    ))
    .unwrap();
    assert!(rfc9162_accepts("inclusion", &proof), "{proof}");
    assert!(
        proof["index"].as_u64().unwrap() < leader_first,
        "i0's record lies below the base: {proof}"
    );
    for id in 1..=3u64 {
        let mut config = cluster.client_config(None, &[id]);
        config.audit.require_checkpoint = true;
        let client = signpost_client::Client::connect(&config).unwrap();
        let resolved = client
            .resolve("payments", true)
            .await
            .unwrap_or_else(|e| panic!("node {id} could not prove every live record: {e}"));
        assert_eq!(resolved.instances.len(), 400);
        let below = resolved
            .inclusions
            .iter()
            .filter(|i| i.index < firsts[id as usize - 1])
            .count();
        assert!(below > 0, "node {id}: no proven record lies below its base");
    }
    let first = firsts.iter().max().unwrap().to_string();
    let consistency: Value = serde_json::from_str(&cli_ok(
        &["audit", "consistency", &first, "0", "--json"],
        &env,
    ))
    .unwrap();
    assert!(
        rfc9162_accepts("consistency", &consistency),
        "{consistency}"
    );

    eprintln!(
        "phase 4: what a stopped node keeps on disk is within the budget, and not far under it"
    );
    let follower = cluster.others(leader)[0];
    cluster.kill9(follower);
    let data = cluster.root().join(format!("node{follower}/data"));
    let store = signpost_storage::Store::open(&data).unwrap();
    let first = signpost_audit::Frontier::decode(&store.audit_base().unwrap().expect("a base"))
        .unwrap()
        .size();
    assert!(first > 0);
    let kept = store.audit_leaves(first, usize::MAX, usize::MAX).unwrap();
    assert_eq!(kept.len() as u64, size - first, "no gap after the base");
    // Below the base: only records of registrations that were live at the last prune (those
    // replaced since go at the next one), at most one per instance.
    let pinned = store.audit_leaves_sparse(0, first, usize::MAX).unwrap();
    assert!(
        !pinned.is_empty() && pinned.len() <= 400,
        "{}",
        pinned.len()
    );
    let mut instances = std::collections::BTreeSet::new();
    for (index, leaf) in &pinned {
        let record =
            <signpost_proto::v1::AuditRecord as prost::Message>::decode(leaf.as_slice()).unwrap();
        assert!(
            record.applied && record.op == 4,
            "record {index} kept below the base is not a registration: {record:?}"
        );
        assert!(
            instances.insert(record.instance.clone()),
            "two records of {} kept below the base",
            record.instance
        );
    }
    // Counted as retention counts: each record's bytes plus its keys and subtree hashes
    // (signpost_consensus::audit_retention::RECORD_OVERHEAD_BYTES).
    let overhead = signpost_consensus::audit_retention::RECORD_OVERHEAD_BYTES;
    let bytes: u64 = kept.iter().map(|(_, l)| l.len() as u64 + overhead).sum();
    assert!(bytes <= BUDGET, "{bytes} bytes kept, above {BUDGET}");
    assert!(bytes > BUDGET / 2, "only {bytes} bytes kept of {BUDGET}");
}

/// Regression: apply moves the in-memory tree before it writes the batch with the records and
/// subtree hashes, so an answer read in between was proven from hashes not yet stored
/// (FAILED_PRECONDITION "pruned"); found by `signpost bench --workload mixed --audit-proofs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_read_while_registrations_apply_are_proven_from_the_tree_they_were_read_from() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let writer = cluster.client_as(&cluster.issue("service", "payments"), &[leader]);
    writer
        .register(signed_record(&key, "payments", "p0", 1, 443))
        .await
        .unwrap();

    eprintln!("phase 1: 600 registrations while 4 readers ask the leader for proven answers");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let mut registry =
            signpost_tests::raw_registry(&cluster, &cluster.root().join("admin-cert"), leader);
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let (mut answers, mut failures) = (0u32, Vec::new());
            let mut asked = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Acquire) && asked < 50_000 {
                asked += 1;
                let request = signpost_proto::v1::ResolveRequest {
                    service: "payments".into(),
                    stale: true,
                    audit: Some(signpost_proto::v1::AuditEvidenceRequest {
                        prove: true,
                        ..Default::default()
                    }),
                };
                answers += 1;
                match registry.resolve(request).await {
                    Ok(answer) => {
                        let answer = answer.into_inner();
                        let evidence = answer.audit.unwrap();
                        let root: signpost_audit::Hash =
                            evidence.root_hash.as_slice().try_into().unwrap();
                        for inclusion in &answer.service.unwrap().inclusions {
                            if let Err(e) = signpost_audit::verify_inclusion(
                                &inclusion.leaf,
                                inclusion.index,
                                evidence.tree_size,
                                &root,
                                &inclusion.hashes,
                            ) {
                                failures.push(format!("proof of {}: {e}", inclusion.index));
                            }
                        }
                    }
                    // Four readers outrun the admin's read quota: that is admission at work.
                    Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                        answers -= 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(status) => failures.push(status.to_string()),
                }
            }
            (answers, failures)
        }));
    }
    for batch in 0..(600 / 20) {
        let writes = (0..20).map(|i| {
            let envelope = signed_record(&key, "payments", &format!("i{}", batch * 20 + i), 1, 80);
            let writer = &writer;
            async move { writer.register(envelope).await }
        });
        for result in futures::future::join_all(writes).await {
            result.unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Release);

    eprintln!("phase 2: every answer came with proofs that verify");
    let mut total = 0;
    for reader in readers {
        let (answers, failures) = reader.await.unwrap();
        total += answers;
        assert!(
            failures.is_empty(),
            "{} of {answers} failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(3)]
        );
    }
    assert!(
        total > 100,
        "only {total} answers were read during the writes"
    );
}
