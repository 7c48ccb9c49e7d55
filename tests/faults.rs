//! Faults operators and attackers cause, against real processes: partitions that drop packets
//! silently, pauses, kill -9, a full disk, a damaged write-ahead log, floods of idle
//! connections. Each test names the promise it checks; each fault is undone by the harness,
//! also when the test fails.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use signpost_client::{Client, ClientError};
use signpost_record::SigningKey;
use signpost_tests::{
    now_ms, present, record_with_ttl, signed_record, ClusterOptions, TestCluster,
};

const READY: Duration = Duration::from_secs(60);

/// Waits until `condition` holds, polling every 100 ms, or fails with the logs.
async fn eventually<F, Fut>(cluster: &TestCluster, what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers a fresh instance every `period` until stopped; counts successes and failures.
struct Writer {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Writer {
    /// Binds a key to `service`, issues its certificate, and writes every `period` from the
    /// cluster's first client address through every node (calls bounded at 10 s).
    fn for_new_service(cluster: &TestCluster, service: &'static str, period: Duration) -> Writer {
        let key = signpost_record::read_signing_key(&cluster.bind_new_key(service)).unwrap();
        let cert = cluster.issue("service", service);
        let client = cluster.client_from(
            cluster.client_ip(1),
            Some(&cert),
            &[],
            Duration::from_secs(10),
        );
        Writer::start(client, key, service, period)
    }

    fn start(client: Client, key: SigningKey, service: &'static str, period: Duration) -> Writer {
        let client = Arc::new(client);
        Writer::run(move || Ok(client.clone()), key, service, period)
    }

    /// A writer that connects anew (a new client, so new TLS connections) for every write, as
    /// a command-line user does.
    fn start_fresh(
        config: impl Fn() -> Result<signpost_client::ClientConfig, ClientError> + Send + 'static,
        key: SigningKey,
        service: &'static str,
        period: Duration,
    ) -> Writer {
        Writer::run(
            move || config().and_then(|c| Client::connect(&c)).map(Arc::new),
            key,
            service,
            period,
        )
    }

    fn run(
        client: impl Fn() -> Result<Arc<Client>, ClientError> + Send + 'static,
        key: SigningKey,
        service: &'static str,
        period: Duration,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            async move {
                let mut errors = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let record = signed_record(&key, service, &format!("w{n}"), now_ms(), 9000);
                    let result = match client() {
                        Ok(c) => c.register(record).await,
                        Err(e) => Err(e),
                    };
                    match result {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.push(format!("w{n}: {e}"));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(period).await;
                }
                errors
            }
        });
        Writer {
            stop,
            ok,
            failed,
            task,
        }
    }

    async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.task.await.expect("writer task");
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_refuses_writes_at_once_and_the_majority_elects_another() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let old = cluster.wait_ready(READY).await;
    let majority = cluster.others(old);
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let cert = cluster.issue("service", "payments");

    eprintln!("phase 1: cut the leader off from both followers (packets dropped silently)");
    cluster.partition(&[old], &majority);
    tokio::time::sleep(Duration::from_secs(1)).await;

    eprintln!("phase 2: the old leader says it has no quorum, and refuses a write at once");
    let status = cluster
        .status_of(old)
        .await
        .expect("the old leader answers status");
    assert_eq!(status.role, "leader-without-quorum", "{status:?}");
    let only_old = cluster.client_from(
        cluster.client_ip(1),
        Some(&cert),
        &[old],
        Duration::from_secs(3),
    );
    let err = only_old
        .register(signed_record(&key, "payments", "p1", now_ms(), 9000))
        .await
        .expect_err("a leader without a quorum must not take writes");
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");
    assert!(
        err.to_string().contains("no leader"),
        "refused, not timed out: {err}"
    );

    eprintln!("phase 3: a client that reaches every node is served by the majority's new leader");
    let everywhere = cluster.client_from(
        cluster.client_ip(2),
        Some(&cert),
        &[],
        Duration::from_secs(15),
    );
    let revision = everywhere
        .register(signed_record(&key, "payments", "p2", now_ms(), 9001))
        .await
        .expect("the majority serves writes");
    assert!(revision > 0);

    eprintln!(
        "phase 4: `signpost status` shows each node's own role: one leader, one without quorum"
    );
    let out = signpost_tests::cli_ok(
        &["status", "--json", "--deadline-ms", "3000"],
        &[("SIGNPOST_CONFIG", &cluster.client_toml())],
    );
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    let role_of = |id: u64| {
        status["members"]
            .as_array()
            .and_then(|m| m.iter().find(|r| r["id"] == id))
            .map(|r| r["role"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(role_of(old), "leader-without-quorum", "{out}");
    let leaders = majority
        .iter()
        .filter(|id| role_of(**id) == "leader")
        .count();
    assert_eq!(leaders, 1, "{out}");

    eprintln!("phase 5: heal; one leader again, and the write is on every node");
    cluster.heal();
    eventually(
        &cluster,
        "one agreed leader after the heal",
        Duration::from_secs(15),
        || async { cluster.agreed_leader().await.is_some_and(|l| l != 0) },
    )
    .await;
    for id in cluster.ids() {
        let node = cluster.client(&[id]);
        eventually(
            &cluster,
            "the write reaches every node",
            Duration::from_secs(15),
            || async {
                node.resolve("payments", true)
                    .await
                    .is_ok_and(|r| r.instances.iter().any(|i| i.payload.instance == "p2"))
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_an_isolated_leader_for_clients_that_reach_the_majority() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let old = cluster.wait_ready(READY).await;
    let majority = cluster.others(old);
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("jobs")).unwrap();
    let cert = cluster.issue("service", "jobs");
    let ttl = 6u32;
    let ttl_d = Duration::from_secs(u64::from(ttl));

    eprintln!("phase 1: three instances, each renewed by a client with its own address");
    let instances = [
        ("everywhere", 1u8),
        ("majority-only", 2),
        ("minority-only", 3),
    ];
    for (instance, _) in instances {
        cluster
            .client_as(&cert, &[])
            .register(record_with_ttl(&key, "jobs", instance, now_ms(), ttl))
            .await
            .unwrap();
    }
    let mut renewers = Vec::new();
    for (instance, n) in instances {
        let client = cluster.client_from(
            cluster.client_ip(n),
            Some(&cert),
            &[],
            Duration::from_secs(15),
        );
        renewers.push(tokio::spawn(async move {
            let started = Instant::now();
            let result = client
                .keep_alive(
                    &[("jobs".to_string(), instance.to_string())],
                    ttl_d / 3,
                    std::future::pending(),
                )
                .await;
            (result, started.elapsed())
        }));
    }
    tokio::time::sleep(ttl_d / 2).await;

    eprintln!("phase 2: isolate the leader; one client reaches only the majority, one only the old leader");
    let cut_at = Instant::now();
    cluster.cut(cluster.client_ip(2), &[old]);
    cluster.cut(cluster.client_ip(3), &majority);
    cluster.partition(&[old], &majority);

    eprintln!("phase 3: the minority-only client is told its lease is lost within about one TTL");
    let minority = renewers.pop().expect("three renewers");
    let (result, _) = tokio::time::timeout(ttl_d * 3, minority)
        .await
        .expect("the minority-only client was never told")
        .expect("renewer task");
    let told_after = cut_at.elapsed();
    assert!(
        matches!(result, Err(ClientError::LeaseLost { .. })),
        "{result:?}"
    );
    assert!(told_after < ttl_d * 2, "told after {told_after:?}");
    eprintln!(
        "minority-only client told {} ms after the cut",
        told_after.as_millis()
    );

    eprintln!("phase 4: three TTLs later the other two are alive, the minority-only one expired");
    tokio::time::sleep((ttl_d * 3).saturating_sub(cut_at.elapsed())).await;
    let reader = cluster.client(&majority);
    assert!(
        present(&reader, "jobs", "everywhere").await,
        "{}",
        cluster.logs()
    );
    assert!(
        present(&reader, "jobs", "majority-only").await,
        "{}",
        cluster.logs()
    );
    assert!(
        !present(&reader, "jobs", "minority-only").await,
        "{}",
        cluster.logs()
    );
    for renewer in &renewers {
        assert!(
            !renewer.is_finished(),
            "a renewer that reaches the majority gave up"
        );
    }
    for renewer in renewers {
        renewer.abort();
    }
    cluster.heal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_returning_from_a_partition_does_not_depose_the_leader() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let others: Vec<u64> = cluster.others(leader);
    let (lonely, other) = (others[0], others[1]);
    let term = cluster.status_of(leader).await.expect("leader status").term;

    eprintln!("phase 1: a writer works through the whole test");
    let writer = Writer::for_new_service(&cluster, "steady", Duration::from_millis(200));

    eprintln!("phase 2: isolate one follower for 12 s; it must not raise its term");
    cluster.partition(&[lonely], &[leader, other]);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let lonely_term = cluster
        .status_of(lonely)
        .await
        .expect("isolated node answers")
        .term;
    assert_eq!(lonely_term, term, "an isolated follower campaigned");

    eprintln!("phase 3: heal; the leader stays leader in the same term, no write failed");
    cluster.heal();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = cluster.status_of(leader).await.expect("leader status");
    assert_eq!(
        (after.role.as_str(), after.term),
        ("leader", term),
        "{}",
        cluster.logs()
    );
    let (ok, failed, errors) = writer.finish().await;
    assert_eq!(failed, 0, "writes failed: {errors:?}");
    assert!(ok > 40, "the writer wrote {ok} records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_replaced_and_rejoins_as_a_follower_when_resumed() {
    let mut cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let others: Vec<u64> = cluster.others(leader);
    let writer = Writer::for_new_service(&cluster, "paused", Duration::from_millis(100));

    eprintln!("phase 1: SIGSTOP the leader (a long GC pause); the others elect a new one");
    cluster.pause(leader);
    let survivors = cluster.client(&others);
    eventually(
        &cluster,
        "a new leader among the others",
        Duration::from_secs(10),
        || async {
            survivors
                .status()
                .await
                .is_ok_and(|s| s.leader_id != 0 && s.leader_id != leader)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    eprintln!("phase 2: SIGCONT; the old leader follows the new one and no write failed");
    cluster.resume(leader);
    eventually(
        &cluster,
        "one agreed leader again",
        Duration::from_secs(10),
        || async { cluster.agreed_leader().await.is_some_and(|l| l != leader) },
    )
    .await;
    let (ok, failed, errors) = writer.finish().await;
    assert_eq!(failed, 0, "{errors:?}");
    let everywhere = cluster.client(&[leader]);
    eventually(
        &cluster,
        "the resumed node has every write",
        Duration::from_secs(10),
        || async {
            everywhere
                .resolve("paused", true)
                .await
                .is_ok_and(|r| r.instances.len() as u64 == ok)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_made_during_an_election_waits_it_out_and_succeeds() {
    eprintln!(
        "phase 1: a cluster with slow elections (2.5-3.5 s), longer than a fixed retry count spans"
    );
    let mut cluster = TestCluster::start(ClusterOptions {
        raft_timing: Some((200, 1_500, 2_500)),
        ..Default::default()
    });
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("orders")).unwrap();
    let client = cluster.client_as(&cluster.issue("service", "orders"), &[]);
    client
        .register(signed_record(&key, "orders", "before", now_ms(), 9000))
        .await
        .unwrap();

    eprintln!("phase 2: kill -9 the leader and write at once; the call spans the election");
    cluster.kill9(leader);
    let started = Instant::now();
    client
        .register(signed_record(&key, "orders", "during", now_ms(), 9001))
        .await
        .expect("a write during an election succeeds within the call deadline");
    eprintln!(
        "write during the election took {} ms",
        started.elapsed().as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_by_more_than_five_thousand_entries_catches_up_from_the_log() {
    let mut cluster = TestCluster::start(ClusterOptions {
        snapshot_after_entries: 1_000_000,
        log_entries_kept: 1_000_000,
        bootstrap_toml: "instances_per_service_max = 100000\n".into(),
        limits_toml: "writes_per_identity_per_sec = 100000\nwrites_per_identity_burst = 100000\n\
                      proposals_new_registration_percent = 100\n"
            .into(),
        ..Default::default()
    });
    let leader = cluster.wait_ready(READY).await;
    let lagging = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("bulk")).unwrap();
    let client = Arc::new(cluster.client_as(&cluster.issue("service", "bulk"), &[]));

    eprintln!("phase 1: stop a follower, then commit 5,200 registrations without it");
    cluster.kill9(lagging);
    let count = 5_200u64;
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..16u64 {
        let (client, key) = (client.clone(), key.clone());
        tasks.spawn(async move {
            for i in (lane..count).step_by(16) {
                let record = signed_record(&key, "bulk", &format!("i{i}"), now_ms(), 9000);
                client.register(record).await.expect("register");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("writer lane");
    }
    let commit = cluster
        .status_of(leader)
        .await
        .expect("leader")
        .commit_index;

    eprintln!("phase 2: restart it; it catches up from the log, with no snapshot");
    cluster.restart(lagging);
    eventually(
        &cluster,
        "the follower applies everything",
        Duration::from_secs(120),
        || async {
            cluster
                .status_of(lagging)
                .await
                .is_some_and(|s| s.applied_index >= commit)
        },
    )
    .await;
    let status = cluster.status_of(lagging).await.unwrap();
    assert_eq!(
        status.snapshot_index, 0,
        "caught up by snapshot, not from the log"
    );
    let resolved = cluster
        .client(&[lagging])
        .resolve("bulk", true)
        .await
        .unwrap();
    assert_eq!(resolved.instances.len() as u64, count);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_disk_fills_leaves_service_and_rejoins_once_space_is_freed() {
    let mut cluster = TestCluster::start(ClusterOptions {
        small_disk: Some((3, 256)),
        ..Default::default()
    });
    cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("disk")).unwrap();
    let client = cluster.client_as(&cluster.issue("service", "disk"), &[]);

    eprintln!("phase 1: fill node 3's disk to the last byte");
    let filler = cluster.root().join("node3/data/filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 1 << 20];
        while file.write_all(&block).is_ok() {}
        while file.write_all(&block[..4096]).is_ok() {}
    }

    eprintln!("phase 2: writes go on through the other two; node 3 exits non-zero, saying why");
    let mut n = 0;
    let status = loop {
        n += 1;
        client
            .register(signed_record(
                &key,
                "disk",
                &format!("d{n}"),
                now_ms(),
                9000,
            ))
            .await
            .expect("the majority keeps serving writes");
        if let Some(status) = cluster.exited(3) {
            break status;
        }
        assert!(
            n < 200,
            "node 3 kept running on a full disk\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "exit status {status:?}");
    let log = std::fs::read_to_string(cluster.root().join("node3/server.log")).unwrap();
    assert_eq!(
        log.matches("FATAL").count(),
        1,
        "said once, clearly:\n{log}"
    );

    eprintln!("phase 3: free the space and restart: node 3 catches up and serves again");
    std::fs::remove_file(&filler).unwrap();
    cluster.restart(3);
    let node3 = cluster.client(&[3]);
    eventually(
        &cluster,
        "node 3 serves every write",
        Duration::from_secs(60),
        || async {
            node3
                .resolve("disk", true)
                .await
                .is_ok_and(|r| r.instances.len() as u64 == n)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_write_ahead_log_lost_synced_entries_refuses_to_start() {
    let mut cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let victim = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("wal")).unwrap();
    let client = cluster.client_as(&cluster.issue("service", "wal"), &[]);

    eprintln!("phase 1: 60 acknowledged registrations, then time for the watermark");
    for i in 0..60 {
        client
            .register(signed_record(&key, "wal", &format!("w{i}"), now_ms(), 9000))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    eprintln!("phase 2: stop the follower and cut its write-ahead log in half");
    cluster.kill9(victim);
    let data = cluster.root().join(format!("node{victim}/data"));
    let wal = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a write-ahead log file");
    let len = std::fs::metadata(&wal).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    eprintln!("phase 3: it refuses to start, and says how to rejoin");
    cluster.restart(victim);
    let status = cluster.wait_exit(victim, Duration::from_secs(20));
    assert!(!status.success());
    let log =
        std::fs::read_to_string(cluster.root().join(format!("node{victim}/server.log"))).unwrap();
    assert!(log.contains("lost entries it acknowledged"), "{log}");
    assert!(log.contains("To rejoin this node"), "{log}");

    eprintln!("phase 4: the other two still serve every acknowledged write");
    let r = client.resolve("wal", false).await.unwrap();
    assert_eq!(r.instances.len(), 60);
}

/// Opens `per_ip` connections from each of `sources` to `target` that never send a byte, and
/// reopens each one when the server closes it, until `stop`.
fn idle_flood(
    sources: &[IpAddr],
    target: SocketAddr,
    per_ip: usize,
    stop: Arc<AtomicBool>,
    tasks: &mut tokio::task::JoinSet<u64>,
) {
    for source in sources {
        for _ in 0..per_ip {
            let (source, stop) = (*source, stop.clone());
            tasks.spawn(async move {
                let mut opened = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                    let mut held = Duration::ZERO;
                    if socket.bind(SocketAddr::new(source, 0)).is_ok() {
                        if let Ok(Ok(mut tcp)) =
                            tokio::time::timeout(Duration::from_secs(2), socket.connect(target))
                                .await
                        {
                            opened += 1;
                            let since = Instant::now();
                            let mut buf = [0u8; 64];
                            // Held until the server closes it (or the flood ends).
                            let _ = tokio::time::timeout(
                                Duration::from_secs(30),
                                tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
                            )
                            .await;
                            held = since.elapsed();
                        }
                    }
                    // Reopen at once when the server held the connection (that is the attack);
                    // slowly when it was closed at accept, so the flood does not just burn the
                    // CPU the nodes share with it.
                    let pause = if held >= Duration::from_millis(500) {
                        20
                    } else {
                        1_000
                    };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                opened
            });
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_on_every_port_neither_stops_elections_nor_locks_out_clients() {
    let mut cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("honest")).unwrap();
    let cert = cluster.issue("service", "honest");
    let client_toml = cluster.client_toml();
    let honest_ip = cluster.client_ip(1);

    eprintln!("phase 1: 16 addresses x 32 silent connections on every port of every node");
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = tokio::task::JoinSet::new();
    let sources: Vec<IpAddr> = (1..=16).map(|n| cluster.outsider_ip(n)).collect();
    for id in cluster.ids() {
        for addr in [cluster.client_addr(id), cluster.raft_addr(id)] {
            idle_flood(
                &sources,
                addr.parse().unwrap(),
                32,
                stop.clone(),
                &mut flood,
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    eprintln!("phase 2: a certificate holder, connecting anew for every call, is served");
    let writer = Writer::start_fresh(
        move || {
            signpost_client::ClientConfig::load(&client_toml).map(|mut c| {
                c.tls.cert = cert.with_extension("crt");
                c.tls.key = cert.with_extension("key");
                c.source_ip = Some(honest_ip);
                c.deadline_ms = 10_000;
                c
            })
        },
        key,
        "honest",
        Duration::from_millis(250),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    eprintln!("phase 3: kill -9 the leader under the flood; a new one is elected promptly");
    cluster.kill9(leader);
    let killed = Instant::now();
    eventually(
        &cluster,
        "a new leader under the flood",
        Duration::from_secs(10),
        || async { cluster.agreed_leader().await.is_some_and(|l| l != leader) },
    )
    .await;
    eprintln!(
        "new leader {} ms after the kill",
        killed.elapsed().as_millis()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    eprintln!("phase 4: stop the flood; no honest write failed");
    stop.store(true, Ordering::Relaxed);
    flood.abort_all();
    let (ok, failed, errors) = writer.finish().await;
    assert_eq!(
        failed, 0,
        "honest writes failed under the flood: {errors:?}"
    );
    assert!(ok >= 20, "only {ok} honest writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_hands_leadership_to_a_follower_first() {
    let mut cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let term = cluster.status_of(leader).await.expect("leader status").term;

    eprintln!("phase 1: a writer works while the leader is stopped for a restart");
    let writer = Writer::for_new_service(&cluster, "rolling", Duration::from_millis(50));
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.terminate(leader);
    let status = cluster.wait_exit(leader, Duration::from_secs(10));
    assert!(status.success(), "a graceful stop exits 0: {status:?}");

    eprintln!("phase 2: it named its successor, which won the very next term");
    let log =
        std::fs::read_to_string(cluster.root().join(format!("node{leader}/server.log"))).unwrap();
    assert!(log.contains("handed leadership over"), "{log}");
    let successor = cluster
        .agreed_leader()
        .await
        .expect("a leader among the others");
    assert_ne!(successor, leader);
    let now = cluster
        .status_of(successor)
        .await
        .expect("successor status");
    assert_eq!(now.term, term + 1, "one term for one transfer");

    eprintln!("phase 3: no write failed across the hand-over");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failed, errors) = writer.finish().await;
    assert_eq!(failed, 0, "{errors:?}");
    assert!(ok > 10, "the writer wrote {ok} records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_keeps_its_slot_until_its_outcome_even_when_the_client_gives_up() {
    let mut cluster = TestCluster::start(ClusterOptions {
        limits_toml: "proposals_in_flight_max = 4\nproposals_admin_reserved = 1\n\
                      proposals_new_registration_percent = 100\n"
            .into(),
        ..Default::default()
    });
    let leader = cluster.wait_ready(READY).await;
    let followers: Vec<u64> = cluster.others(leader);
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("slots")).unwrap();
    let cert = cluster.issue("service", "slots");
    let registry = signpost_tests::raw_registry(&cluster, &cert, leader);
    let raw = |instance: &str| {
        let mut request = tonic::Request::new(signpost_proto::v1::RegisterRequest {
            envelope: Some(signed_record(&key, "slots", instance, now_ms(), 9000)),
        });
        request.set_timeout(Duration::from_millis(300));
        let mut client = registry.clone();
        async move { client.register(request).await }
    };

    eprintln!(
        "phase 1: both followers stall; three writes enter the log and their clients give up"
    );
    cluster.pause(followers[0]);
    cluster.pause(followers[1]);
    let (a, b, c) = tokio::join!(raw("a"), raw("b"), raw("c"));
    for result in [a, b, c] {
        let status = result.expect_err("nothing commits without a quorum");
        assert!(
            matches!(
                status.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            "{status}"
        );
    }

    eprintln!("phase 2: their slots are still taken: the next write is shed, not proposed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = raw("d").await.expect_err("no slot is free");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");

    eprintln!("phase 3: the followers return; the three commit and the slots come back");
    cluster.resume(followers[0]);
    cluster.resume(followers[1]);
    let client = cluster.client_as(&cert, &[]);
    eventually(
        &cluster,
        "the stalled writes commit",
        Duration::from_secs(15),
        || async {
            client
                .resolve("slots", false)
                .await
                .is_ok_and(|r| r.instances.len() == 3)
        },
    )
    .await;
    client
        .register(signed_record(&key, "slots", "e", now_ms(), 9000))
        .await
        .expect("slots are free again");
}
