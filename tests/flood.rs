//! Availability under flood: while an honest service registers and resolves at a steady rate,
//! each flood in turn hits the same real cluster. The honest service must keep succeeding
//! (shed requests are retried per the hint by the client), no election may happen, memory
//! stays bounded, and afterwards the state holds exactly the acknowledged registrations.
//!
//! The floods come from `signpost bench --flood KIND --flood-only`, the same generator an
//! operator runs by hand, as a separate process with identities of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use signpost_proto::v1::Envelope;
use signpost_record::SigningKey;
use signpost_tests::{now_ms, signpost_bin, ClusterOptions, TestCluster};

const READY: Duration = Duration::from_secs(60);
/// How long each flood runs.
const FLOOD_SECS: u64 = 6;
/// A flood process that has not finished by then fails the test.
const FLOOD_DEADLINE: Duration = Duration::from_secs(60);
/// The honest service's pace: one registration and one resolve per tick.
const LEGIT_TICK: Duration = Duration::from_millis(100);
/// Resident memory every node must stay under during the floods.
const RSS_BOUND_BYTES: u64 = 512 * 1024 * 1024;

/// Small budgets so that each flood is many times what admission lets through.
const LIMITS: &str = "writes_per_identity_per_sec = 20\n\
                      writes_per_identity_burst = 20\n\
                      reads_per_identity_per_sec = 100\n\
                      reads_per_identity_burst = 100\n\
                      stream_opens_per_identity_per_sec = 20\n\
                      stream_opens_per_identity_burst = 50\n\
                      watchers_per_identity_max = 64\n";

fn record(key: &SigningKey, service: &str, instance: &str, sequence: u64) -> Envelope {
    let mut payload = signpost_tests::record_payload(service, instance, sequence, 8443);
    // Outlives the whole test, so the final count is not blurred by expiry.
    payload.ttl_secs = 3_600;
    signpost_record::sign_record(key, &payload)
}

async fn terms(cluster: &TestCluster) -> BTreeMap<u64, u64> {
    let mut terms = BTreeMap::new();
    for id in cluster.ids() {
        // A fresh connection: right after the handshake flood this address may still be over
        // its handshake rate for a moment, so a few bounded retries.
        let mut attempt = 0;
        let status = loop {
            match cluster
                .client(&[id])
                .status_of(&cluster.client_addr(id))
                .await
            {
                Ok(status) => break status,
                Err(e) if attempt < 20 => {
                    attempt += 1;
                    eprintln!("  status of node {id}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("status of node {id}: {e}"),
            }
        };
        terms.insert(id, status.term);
    }
    terms
}

/// What the honest service did during one flood.
#[derive(Default)]
struct Legit {
    acknowledged: BTreeSet<String>,
    registrations: u64,
    resolves: u64,
    failures: Vec<String>,
    rss_max: BTreeMap<u64, u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_clients_stay_served_and_raft_stays_stable_under_each_flood() {
    let started = Instant::now();
    eprintln!("phase 1: a three-node cluster with small per-identity budgets");
    let cluster = TestCluster::start(ClusterOptions {
        limits_toml: LIMITS.to_string(),
        ..Default::default()
    });
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("legit")).unwrap();
    let legit = cluster.client_as(&cluster.issue("service", "legit"), &[]);
    let mut acknowledged = BTreeSet::new();
    let mut sequence = now_ms() * 1_000;
    let mut flood_acked: BTreeMap<String, u64> = BTreeMap::new();

    for kind in ["write", "bad-signature", "read", "handshake", "watch"] {
        eprintln!("phase 2.{kind}: flood {kind} for {FLOOD_SECS} s while the honest service works");
        let terms_before = terms(&cluster).await;
        let mut flood = tokio::process::Command::new(signpost_bin())
            .args([
                "bench",
                "--flood",
                kind,
                "--flood-only",
                "--duration",
                &FLOOD_SECS.to_string(),
                "--json",
            ])
            .env("SIGNPOST_CONFIG", cluster.client_toml())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn signpost bench");
        let mut stdout = flood.stdout.take().expect("bench stdout");
        let reader = tokio::spawn(async move {
            let mut out = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut out).await;
            out
        });
        let deadline = Instant::now() + FLOOD_DEADLINE;
        let mut during = Legit::default();
        let exit = loop {
            if let Some(status) = flood.try_wait().expect("bench wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "flood {kind} did not end in time"
            );
            sequence += 1;
            let instance = format!("{kind}-{}", during.registrations);
            let tick = Instant::now();
            match legit
                .register(record(&key, "legit", &instance, sequence))
                .await
            {
                Ok(_) => {
                    during.acknowledged.insert(instance);
                }
                Err(e) => during.failures.push(format!("register {instance}: {e}")),
            }
            during.registrations += 1;
            match legit.resolve("legit", false).await {
                Ok(_) => {}
                Err(e) => during.failures.push(format!("resolve: {e}")),
            }
            during.resolves += 1;
            for id in cluster.ids() {
                let rss = cluster.rss_bytes(id).unwrap_or(0);
                let max = during.rss_max.entry(id).or_default();
                *max = (*max).max(rss);
            }
            if let Some(rest) = LEGIT_TICK.checked_sub(tick.elapsed()) {
                tokio::time::sleep(rest).await;
            }
        };
        let stderr = match flood.stderr.take() {
            Some(mut e) => {
                let mut text = String::new();
                let _ = tokio::io::AsyncReadExt::read_to_string(&mut e, &mut text).await;
                text
            }
            None => String::new(),
        };
        let out = reader.await.expect("bench output");
        assert!(
            exit.success(),
            "bench --flood {kind} failed: {stderr}\n{out}"
        );
        let report: serde_json::Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("bench output is not JSON ({e}): {out}"));
        eprintln!(
            "  flood {kind}: {} | honest: {} registrations, {} resolves, {} failures, max RSS MiB {:?}",
            report["flood"],
            during.registrations,
            during.resolves,
            during.failures.len(),
            during
                .rss_max
                .iter()
                .map(|(id, b)| (*id, b / (1024 * 1024)))
                .collect::<Vec<_>>()
        );

        eprintln!("phase 3.{kind}: the honest service was served throughout");
        assert!(
            during.failures.is_empty(),
            "honest requests failed under flood {kind}: {:?}\n{}",
            &during.failures[..during.failures.len().min(5)],
            cluster.logs()
        );
        assert!(during.registrations >= 5, "the honest service barely ran");
        assert!(
            report["flood"]["sent"].as_u64().unwrap_or(0) > during.registrations,
            "the flood sent less than the honest service: {report}"
        );

        eprintln!("phase 4.{kind}: no election, memory under {RSS_BOUND_BYTES} bytes");
        let terms_after = terms(&cluster).await;
        assert_eq!(
            terms_before,
            terms_after,
            "a term changed during flood {kind}\n{}",
            cluster.logs()
        );
        for (id, rss) in &during.rss_max {
            assert!(
                *rss > 0 && *rss < RSS_BOUND_BYTES,
                "node {id} used {rss} bytes under flood {kind}"
            );
        }
        if kind == "write" {
            if let Some(acked) = report["flood"]["acked_instances"].as_object() {
                for (service, count) in acked {
                    flood_acked.insert(service.clone(), count.as_u64().unwrap_or(0));
                }
            }
            eprintln!(
                "phase 5.write: the flood's services hold exactly its acknowledged instances"
            );
            let admin = cluster.client(&[]);
            for (service, count) in &flood_acked {
                let resolved = admin.resolve(service, false).await.expect("resolve flood");
                assert_eq!(
                    resolved.instances.len() as u64,
                    *count,
                    "{service}: acknowledged {count}, resolved {}",
                    resolved.instances.len()
                );
            }
            let admitted: u64 = flood_acked.values().sum();
            let sent = report["flood"]["sent"].as_u64().unwrap_or(0);
            assert!(
                admitted * 2 < sent,
                "admission let most of the flood through: {admitted} of {sent}"
            );
        }
        acknowledged.extend(during.acknowledged);
    }

    eprintln!("phase 6: the state holds exactly the honest acknowledged registrations");
    let resolved = legit.resolve("legit", false).await.expect("final resolve");
    let stored: BTreeSet<String> = resolved
        .instances
        .iter()
        .map(|r| r.payload.instance.clone())
        .collect();
    assert_eq!(stored, acknowledged);
    assert_eq!(
        cluster.agreed_leader().await,
        Some(leader),
        "leadership moved"
    );
    eprintln!("done in {:?}", started.elapsed());
}
