//! Leases, keep-alive, the change feed and read consistency, against real processes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use signpost_proto::v1::{DeregisterPayload, WatchRequest};
use signpost_tests::{
    now_ms, present, record_payload, record_with_ttl, signed_record, signpost_bin, ClusterOptions,
    TestCluster,
};

const READY: Duration = Duration::from_secs(60);
/// Stated bound: an instance that stops renewing is gone within TTL + this (one lease tick,
/// one commit round, and the test's polling period).
const EXPIRY_SLACK: Duration = Duration::from_secs(3);

/// Reads `stream` until it ends with an error status, which it returns with how many messages
/// came before it. Panics if the stream goes 10 s without a message, ends without a reason, or
/// delivers more than `messages_max` messages.
async fn until_error<T>(
    stream: &mut tonic::Streaming<T>,
    messages_max: u64,
) -> (u64, tonic::Status) {
    let mut delivered = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the stream hung")
        {
            Ok(Some(_)) => delivered += 1,
            Ok(None) => panic!("the stream ended without a reason after {delivered} messages"),
            Err(status) => return (delivered, status),
        }
        assert!(
            delivered <= messages_max,
            "more than {messages_max} messages and still no end"
        );
    }
}

fn heavy_record(
    key: &signpost_record::SigningKey,
    service: &str,
    instance: &str,
    sequence: u64,
) -> signpost_proto::v1::Envelope {
    let mut payload = record_payload(service, instance, sequence, 8080);
    payload.metadata = (0..4).map(|i| (format!("k{i}"), "x".repeat(900))).collect();
    signpost_record::sign_record(key, &payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_without_renewal_and_survive_a_leader_kill_with_renewal() {
    let mut cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("jobs")).unwrap();
    let cert = cluster.issue("service", "jobs");
    let jobs = cluster.client_as(&cert, &[]);
    let ttl = 5u32;

    eprintln!("phase 1: an instance that never renews disappears after its TTL, not before");
    let registered = Instant::now();
    jobs.register(record_with_ttl(&key, "jobs", "lazy", 1, ttl))
        .await
        .unwrap();
    jobs.register(record_with_ttl(&key, "jobs", "busy", 1, ttl))
        .await
        .unwrap();
    let renewer = tokio::spawn({
        let client = cluster.client_as(&cert, &[]);
        async move {
            client
                .keep_alive(
                    &[("jobs".to_string(), "busy".to_string())],
                    Duration::from_secs(1),
                    std::future::pending(),
                )
                .await
        }
    });
    let ttl_d = Duration::from_secs(u64::from(ttl));
    loop {
        let gone = !present(&jobs, "jobs", "lazy").await;
        let elapsed = registered.elapsed();
        if gone {
            eprintln!(
                "lazy expired {} ms after registration (TTL {ttl}s)",
                elapsed.as_millis()
            );
            assert!(
                elapsed >= ttl_d - Duration::from_millis(500),
                "expired early: {elapsed:?}"
            );
            break;
        }
        assert!(
            elapsed < ttl_d + EXPIRY_SLACK,
            "still there after {elapsed:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        present(&jobs, "jobs", "busy").await,
        "the renewed instance must stay"
    );

    eprintln!("phase 2: kill -9 the leader; the renewed instance outlives two TTLs");
    cluster.kill9(leader);
    tokio::time::sleep(ttl_d * 2 + Duration::from_secs(1)).await;
    let survivors: Vec<u64> = cluster.others(leader);
    let reader = cluster.client(&survivors);
    assert!(
        present(&reader, "jobs", "busy").await,
        "renewed instance expired across failover\n{}",
        cluster.logs()
    );

    eprintln!("phase 3: once renewals stop, it expires too");
    renewer.abort();
    let stopped = Instant::now();
    while present(&reader, "jobs", "busy").await {
        assert!(
            stopped.elapsed() < ttl_d * 2 + EXPIRY_SLACK,
            "busy never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "busy expired {} ms after its renewals stopped",
        stopped.elapsed().as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_every_change_in_order_across_the_loss_of_its_node() {
    let mut cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("feed")).unwrap();
    let cert = cluster.issue("service", "feed");
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let others: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != follower)
        .collect();

    eprintln!("phase 1: a watcher connected to follower {follower}; writes go through the others");
    let mut order = vec![follower];
    order.extend(&others);
    let watch_client = cluster.client(&order);
    let writer = cluster.client_as(&cert, &others);
    let mut expected: Vec<(u64, bool, String)> = Vec::new();
    let rev = writer
        .register(signed_record(&key, "feed", "w0", 1, 1))
        .await
        .unwrap();
    expected.push((rev, true, "w0".into()));
    let mut watcher = watch_client.watch("feed", false, rev);

    eprintln!("phase 2: 40 changes, killing the watcher's node halfway");
    let mut received = Vec::new();
    let first = tokio::time::timeout(Duration::from_secs(20), watcher.next())
        .await
        .expect("first event")
        .unwrap();
    received.push((first.revision, first.put, first.instance));
    for i in 1..40u64 {
        if i == 20 {
            cluster.kill9(follower);
        }
        let name = format!("w{}", i % 10);
        let rev = if i % 4 == 3 {
            let payload = DeregisterPayload {
                service: "feed".into(),
                instance: format!("w{}", (i - 1) % 10),
                sequence: 10_000 + 10 * i,
                issued_at_ms: now_ms(),
            };
            match writer
                .deregister(signpost_record::sign_deregister(&key, &payload))
                .await
            {
                Ok(rev) => {
                    expected.push((rev, false, format!("w{}", (i - 1) % 10)));
                    continue;
                }
                Err(e) => panic!("deregister: {e}"),
            }
        } else {
            writer
                .register(signed_record(&key, "feed", &name, 10_000 + 10 * i, 1))
                .await
                .unwrap()
        };
        expected.push((rev, true, name));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.len() < expected.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let change = tokio::time::timeout(left, watcher.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {} events arrived\n{}",
                    received.len(),
                    expected.len(),
                    cluster.logs()
                )
            })
            .expect("watch");
        received.push((change.revision, change.put, change.instance));
    }

    eprintln!("phase 3: exactly the acknowledged changes, in revision order, no gap, no duplicate");
    expected.sort();
    assert_eq!(received, expected);
}

/// Found by the Jepsen test (seed 3865782496141115698): the leader batches concurrent
/// proposals into one entry, so one revision can hold two puts of one instance, and a watcher
/// that told events apart by (revision, instance) dropped the second as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_delivers_both_changes_of_an_instance_that_one_batched_entry_holds() {
    const ROUNDS_MAX: u64 = 10;
    const CONCURRENT: u64 = 16;
    let mut cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("feed")).unwrap();
    let writer =
        std::sync::Arc::new(cluster.client_as(&cluster.issue("service", "feed"), &[leader]));

    eprintln!("phase 1: registrations of one instance pile up while the followers are paused");
    // (revision, sequence) of every acknowledged registration.
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let mut shared = None;
    for round in 1..=ROUNDS_MAX {
        // Without a quorum nothing commits, so what arrives meanwhile leaves as one batch
        // when the followers come back (well inside the leader lease: no election).
        for id in cluster.others(leader) {
            cluster.pause(id);
        }
        let sends: Vec<_> = (0..CONCURRENT)
            .map(|i| {
                let sequence = round * 1_000 + i;
                let envelope = signed_record(&key, "feed", "i1", sequence, 1 + i as u32);
                let writer = writer.clone();
                tokio::spawn(async move { (writer.register(envelope).await, sequence) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(150)).await;
        for id in cluster.others(leader) {
            cluster.resume(id);
        }
        for sent in sends {
            let (result, sequence) = sent.await.unwrap();
            // Later sequences overtaking earlier ones make those stale; only what was
            // acknowledged counts.
            if let Ok(revision) = result {
                acked.push((revision, sequence));
            }
        }
        acked.sort();
        shared = acked.windows(2).find(|w| w[0].0 == w[1].0).map(|w| w[0].0);
        if shared.is_some() {
            eprintln!("  round {round}: revision {shared:?} holds two registrations of i1");
            break;
        }
    }
    let shared = shared.unwrap_or_else(|| {
        panic!("no two registrations of i1 shared an entry in {ROUNDS_MAX} rounds: {acked:?}")
    });
    assert!(shared > 0);

    eprintln!("phase 2: a watch from the first acknowledged revision delivers every one of them");
    let watch_client = cluster.client(&cluster.ids());
    let mut watcher = watch_client.watch("feed", false, acked[0].0);
    let mut delivered: Vec<((u64, u32), u64)> = Vec::new();
    while delivered.len() < acked.len() {
        let change = tokio::time::timeout(Duration::from_secs(20), watcher.next())
            .await
            .unwrap_or_else(|_| panic!("the watch stalled after {delivered:?}"))
            .expect("watch");
        let record = signpost_record::open_record(change.record.as_ref().expect("a put"))
            .expect("a verified record");
        delivered.push(((change.revision, change.position), record.payload.sequence));
    }
    for pair in delivered.windows(2) {
        assert!(pair[0].0 < pair[1].0, "out of order: {pair:?}");
    }
    let by_revision: Vec<(u64, u64)> = delivered.iter().map(|((r, _), s)| (*r, *s)).collect();
    assert_eq!(
        by_revision, acked,
        "every acknowledged registration, the two of revision {shared} included, once each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_revisions_are_refused_and_a_slow_watcher_is_cancelled_alone() {
    let cluster = TestCluster::start(ClusterOptions {
        extra_config: "[watch]\nhistory_events_max = 50\nwatcher_buffer_events = 16\n".into(),
        // This test is about watchers, not admission: let one writer go as fast as it can.
        limits_toml: "writes_per_identity_per_sec = 100000\nwrites_per_identity_burst = 100000\n"
            .into(),
        ..Default::default()
    });
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("churn")).unwrap();
    let writer = cluster.client_as(&cluster.issue("service", "churn"), &[leader]);

    eprintln!("phase 1: a fast and a slow watcher on separate connections");
    let fast_client = cluster.client(&[leader]);
    let mut slow =
        signpost_tests::raw_registry(&cluster, &cluster.root().join("admin-cert"), leader)
            .watch(WatchRequest {
                service: "churn".into(),
                prefix: false,
                from_revision: 0,
                audit: None,
            })
            .await
            .expect("slow watcher opens")
            .into_inner();

    eprintln!("phase 2: 1500 changes; the fast watcher reads them all while they happen");
    let first_rev = writer
        .register(signed_record(&key, "churn", "c", 1, 1))
        .await
        .unwrap();
    let mut fast = fast_client.watch("churn", false, first_rev);
    // Records carry ~3.5 KiB of metadata so that 1500 of them overflow every HTTP/2 window and
    // reach the slow watcher's own buffer.
    let writes = tokio::spawn(async move {
        let mut last = first_rev;
        for seq in 2..=1500u64 {
            last = writer
                .register(heavy_record(&key, "churn", "c", seq))
                .await
                .expect("writes are never slowed or refused by watchers");
        }
        last
    });
    let mut count = 0u64;
    let mut previous = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while count < 1500 {
        let change = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            fast.next(),
        )
        .await
        .expect("fast watcher stalled")
        .expect("fast watcher");
        assert!(change.revision > previous, "out of order");
        assert!(
            change.put && change.instance == "c",
            "unexpected change {change:?}"
        );
        previous = change.revision;
        count += 1;
    }
    let last_rev = writes.await.unwrap();
    assert_eq!(previous, last_rev);

    eprintln!("phase 3: the slow watcher was cancelled with RESOURCE_EXHAUSTED");
    let (delivered, status) = until_error(&mut slow, 1500).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(delivered < 1500, "the slow watcher was not cancelled");
    eprintln!(
        "slow watcher cancelled after {delivered} events: {}",
        status.message()
    );

    eprintln!("phase 4: a revision older than the kept history is refused as compacted");
    let status = signpost_tests::raw_registry(&cluster, &cluster.root().join("admin-cert"), leader)
        .watch(WatchRequest {
            service: "churn".into(),
            prefix: false,
            from_revision: first_rev,
            audit: None,
        })
        .await
        .expect_err("compacted");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status}");
    assert_eq!(
        status.metadata().get("signpost-reason").unwrap(),
        "compacted"
    );
    let oldest: u64 = status
        .metadata()
        .get("signpost-compacted-revision")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(oldest > first_rev && oldest <= last_rev, "oldest {oldest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_see_writes_made_elsewhere_and_stale_reads_carry_their_revision() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("reads")).unwrap();
    let writer = cluster.client_as(&cluster.issue("service", "reads"), &[leader]);
    let reader = cluster.client(&[follower]);

    for i in 1..=20u64 {
        let rev = writer
            .register(signed_record(&key, "reads", &format!("r{i}"), 1, 1))
            .await
            .unwrap();
        let seen = reader.resolve("reads", false).await.unwrap();
        assert!(
            seen.revision >= rev,
            "linearizable read at {} missed write {rev}",
            seen.revision
        );
        assert_eq!(seen.instances.len() as u64, i);
    }
    let stale = reader.resolve("reads", true).await.unwrap();
    assert!(stale.revision > 0);
    assert!(
        stale.instances.len() as u64 == 20
            || stale.revision < writer.resolve("reads", false).await.unwrap().revision
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_watches_as_json_lines_and_keeps_a_lease_alive_until_interrupted() {
    let cluster = TestCluster::start(ClusterOptions::default());
    cluster.wait_ready(READY).await;
    let key = cluster.bind_new_key("cliwatch");
    let cert = cluster.issue("service", "cliwatch");
    let config = cluster.client_toml();

    eprintln!("phase 1: `signpost watch --json` prints one object per change");
    let mut watch = Command::new(signpost_bin())
        .args([
            "watch",
            "cliwatch",
            "--json",
            "--from-revision",
            "1",
            "--config",
            config.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    eprintln!("phase 2: `register --ttl 5 --keep-alive` keeps the instance past its TTL");
    let mut keeper = Command::new(signpost_bin())
        .args([
            "register",
            "cliwatch",
            "--instance",
            "k1",
            "--endpoint",
            "127.0.0.1:7000",
            "--ttl",
            "5",
            "--keep-alive",
            "--key",
            key.to_str().unwrap(),
            "--cert",
            cert.with_extension("crt").to_str().unwrap(),
            "--cert-key",
            cert.with_extension("key").to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("watch printed the put");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["type"], "put");
    assert_eq!(event["service"], "cliwatch");
    assert_eq!(event["instance"], "k1");
    assert!(event["revision"].as_u64().unwrap() > 0);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let client = cluster.client(&[]);
    assert!(
        present(&client, "cliwatch", "k1").await,
        "keep-alive did not keep the lease"
    );

    eprintln!("phase 3: interrupting the keeper lets the lease expire; watch prints the delete");
    Command::new("kill")
        .args(["-INT", &keeper.id().to_string()])
        .status()
        .unwrap();
    let status = keeper.wait().unwrap();
    assert!(status.success(), "keeper exited with {status}");
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("watch printed the delete");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["type"], "delete");
    assert_eq!(event["instance"], "k1");
    let _ = watch.kill();
    let _ = watch.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_holding_its_maximum_of_watchers_without_reading_keeps_node_memory_bounded() {
    // Defaults but for the writer's rate: 64 watchers per identity, 1 MiB per watcher buffer.
    const WATCHERS: usize = 64;
    const WATCHER_BUFFER_BYTES: u64 = 1024 * 1024;
    const WRITES: u64 = 1500;
    // What the hoarder may cost the node: its buffers, the history of these writes (each about
    // 4.5 KiB with its binding; twice for allocator slack) and 48 MiB for everything else.
    const RSS_GROWTH_BOUND: u64 =
        WATCHERS as u64 * WATCHER_BUFFER_BYTES + 2 * WRITES * 4608 + 48 * 1024 * 1024;
    let cluster = TestCluster::start(ClusterOptions {
        limits_toml: "writes_per_identity_per_sec = 100000\nwrites_per_identity_burst = 100000\n"
            .into(),
        ..Default::default()
    });
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("hoard")).unwrap();
    let writer = cluster.client_as(&cluster.issue("service", "hoard"), &[leader]);
    writer
        .register(heavy_record(&key, "hoard", "h", 1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = cluster.rss_bytes(leader).unwrap();

    eprintln!("phase 1: a reader opens its maximum of {WATCHERS} watchers and never reads");
    let hoarder = cluster.issue("reader", "hoarder");
    // One connection for all of them: HTTP/2 flow control then holds at most one connection
    // window in flight, and everything else the watchers are sent must wait on the node.
    let connection = signpost_tests::raw_registry(&cluster, &hoarder, leader);
    let mut held = Vec::new();
    for _ in 0..WATCHERS {
        let stream = connection
            .clone()
            .watch(WatchRequest {
                service: "hoard".into(),
                prefix: false,
                from_revision: 0,
                audit: None,
            })
            .await
            .expect("watcher within the reader's maximum opens")
            .into_inner();
        held.push(stream);
    }
    let over = connection
        .clone()
        .watch(WatchRequest {
            service: "hoard".into(),
            prefix: false,
            from_revision: 0,
            audit: None,
        })
        .await
        .expect_err("one watcher past the maximum");
    assert_eq!(over.code(), tonic::Code::ResourceExhausted, "{over}");

    eprintln!("phase 2: {WRITES} registrations of about 4 KiB each reach every watcher");
    for seq in 2..=WRITES {
        writer
            .register(heavy_record(&key, "hoard", "h", seq))
            .await
            .expect("writes are never slowed by watchers that do not read");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = cluster.rss_bytes(leader).unwrap();
    let growth = after.saturating_sub(before);
    eprintln!(
        "leader RSS {} MiB -> {} MiB (+{} MiB; bound +{} MiB)",
        before >> 20,
        after >> 20,
        growth >> 20,
        RSS_GROWTH_BOUND >> 20
    );
    assert!(
        growth < RSS_GROWTH_BOUND,
        "a reader that never reads grew the node by {} MiB",
        growth >> 20
    );

    eprintln!("phase 3: a watcher that fell a buffer behind was cancelled as too slow");
    // The unread streams hold the connection's HTTP/2 window; closing them frees it for the
    // one we read.
    let mut last = held.pop().expect("watchers");
    drop(held);
    let (_, status) = until_error(&mut last, WRITES).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_now_whose_node_dies_before_its_first_event_resumes_where_it_started() {
    let mut cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("early")).unwrap();
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let mut order = vec![follower];
    order.extend(cluster.ids().into_iter().filter(|id| *id != follower));
    let watch_client = std::sync::Arc::new(cluster.client(&order));
    let writer = cluster.client_as(&cluster.issue("service", "early"), &[leader]);

    eprintln!("phase 1: a watch 'from now' opens on follower {follower}, before any event");
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let client = std::sync::Arc::clone(&watch_client);
    let task = tokio::spawn(async move {
        let mut watcher = client.watch("early", false, 0);
        for _ in 0..5 {
            let change = watcher.next().await;
            let stop = change.is_err();
            if tx.send(change).await.is_err() || stop {
                return;
            }
        }
    });
    // The stream is open (its START consumed) once the node counts the watcher; a second is
    // plenty on loopback, and the watch is "from now" either way.
    tokio::time::sleep(Duration::from_secs(1)).await;

    eprintln!("phase 2: the node dies; five writes land before the watch can reconnect");
    cluster.kill9(follower);
    let mut written = Vec::new();
    for i in 0..5u64 {
        let revision = writer
            .register(signed_record(&key, "early", &format!("e{i}"), 1, 1))
            .await
            .unwrap();
        written.push(revision);
    }

    eprintln!("phase 3: the watch resumes from its start revision and misses none of them");
    let mut received = Vec::new();
    for _ in 0..5 {
        let change = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("the watch stalled")
            .expect("the watch task ended")
            .expect("watch");
        received.push(change.revision);
    }
    assert_eq!(received, written);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_history_verifies_against_the_binding_in_force_when_each_change_was_applied() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let old = signpost_record::read_signing_key(&cluster.bind_new_key("moving")).unwrap();
    let writer = cluster.client_as(&cluster.issue("service", "moving"), &[leader]);

    eprintln!(
        "phase 1: a record by the old key, then a binding that drops the key, then a new record"
    );
    let first = writer
        .register(signed_record(&old, "moving", "m1", 1, 1))
        .await
        .unwrap();
    let admin_key = signpost_record::read_signing_key(&cluster.root().join("admin.key")).unwrap();
    let new = signpost_record::generate_signing_key();
    cluster
        .client(&[])
        .bind(signpost_tests::signed_binding(
            &admin_key,
            "moving",
            &new,
            now_ms(),
        ))
        .await
        .unwrap();
    let last = writer
        .register(signed_record(&new, "moving", "m2", 1, 1))
        .await
        .unwrap();

    eprintln!("phase 2: a watch of that history delivers all of it, each put verified");
    let client = cluster.client(&[]);
    let mut watcher = client.watch("moving", false, first);
    let mut seen = Vec::new();
    while seen.last().map(|(r, _, _)| *r) != Some(last) {
        let change = tokio::time::timeout(Duration::from_secs(20), watcher.next())
            .await
            .expect("the watch stalled")
            .expect("history by a key unbound since still verifies");
        seen.push((change.revision, change.put, change.instance));
        assert!(seen.len() <= 3, "{seen:?}");
    }
    let kinds: Vec<(bool, &str)> = seen.iter().map(|(_, p, i)| (*p, i.as_str())).collect();
    assert_eq!(kinds, [(true, "m1"), (false, "m1"), (true, "m2")]);
}
