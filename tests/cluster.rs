//! A three-node cluster of real processes: election, replication, failover, restart, and
//! catch-up by snapshot. No acknowledged registration may ever be lost.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use signpost_tests::{cli, cli_ok, signed_record, ClusterOptions, TestCluster};

const READY: Duration = Duration::from_secs(60);

async fn instances(cluster: &TestCluster, node: u64, service: &str) -> BTreeSet<String> {
    cluster
        .client(&[node])
        .resolve(service, true)
        .await
        .map(|r| {
            r.instances
                .into_iter()
                .map(|i| i.payload.instance)
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `node` serves exactly `expected` for `service` from its local state.
async fn wait_converged(
    cluster: &TestCluster,
    node: u64,
    service: &str,
    expected: &BTreeSet<String>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if &instances(cluster, node, service).await == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {node} did not converge on {} instances\n{}",
            expected.len(),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_sent_to_a_follower_is_resolvable_on_every_node() {
    eprintln!("phase 1: three nodes elect a leader and apply genesis");
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();

    eprintln!("phase 2: bind a key and register through a follower only");
    let key_path = cluster.bind_new_key("payments");
    let key = signpost_record::read_signing_key(&key_path).unwrap();
    let follower_only = cluster.client_as(&cluster.issue("service", "payments"), &[follower]);
    let revision = follower_only
        .register(signed_record(&key, "payments", "p1", 1, 9000))
        .await
        .expect("register via follower");
    assert!(revision > 0);

    eprintln!("phase 3: every node serves the record, verified end to end");
    let expected = BTreeSet::from(["p1".to_string()]);
    for id in cluster.ids() {
        wait_converged(&cluster, id, "payments", &expected).await;
        let linearizable = cluster
            .client(&[id])
            .resolve("payments", false)
            .await
            .unwrap();
        assert_eq!(linearizable.instances.len(), 1);
        assert_eq!(linearizable.instances[0].payload.endpoints[0].port, 9000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_forwarding_a_follower_takes_writes_and_linearizable_reads_itself() {
    use signpost_proto::v1::{RegisterRequest, ResolveRequest};

    eprintln!("phase 1: three nodes with forward_to_leader, and one service bound");
    let cluster = TestCluster::start(ClusterOptions {
        raft_toml: "forward_to_leader = true".into(),
        ..ClusterOptions::default()
    });
    let leader = cluster.wait_ready(READY).await;
    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let service = cluster.issue("service", "payments");
    let reader = cluster.issue("reader", "r1");

    eprintln!("phase 2: a raw write to a follower (no client redirect) is applied");
    let mut at_follower = signpost_tests::raw_registry(&cluster, &service, followers[0]);
    let revision = at_follower
        .register(RegisterRequest {
            envelope: Some(signed_record(&key, "payments", "p1", 1, 9000)),
        })
        .await
        .expect("a follower forwards the write to the leader")
        .into_inner()
        .revision;
    assert!(revision > 0);

    eprintln!("phase 3: a linearizable read at the other follower sees it at once");
    let answer = signpost_tests::raw_registry(&cluster, &reader, followers[1])
        .resolve(ResolveRequest {
            service: "payments".into(),
            stale: false,
            audit: None,
        })
        .await
        .expect("a follower confirms the read index with the leader")
        .into_inner();
    assert!(
        answer.revision >= revision,
        "the read is not older than the write"
    );
    assert_eq!(answer.service.unwrap().records.len(), 1);

    eprintln!("phase 4: apply still judges a forwarded write: a replayed sequence is refused");
    let status = at_follower
        .register(RegisterRequest {
            envelope: Some(signed_record(&key, "payments", "p1", 1, 9001)),
        })
        .await
        .expect_err("the same sequence again is stale");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");
    assert!(status.message().starts_with("stale_sequence"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_forwarding_a_follower_names_the_leader_instead() {
    use signpost_proto::v1::RegisterRequest;

    eprintln!("phase 1: three nodes with the default (no forwarding)");
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let service = cluster.issue("service", "payments");

    eprintln!("phase 2: a raw write to a follower is refused with the leader's address");
    let status = signpost_tests::raw_registry(&cluster, &service, follower)
        .register(RegisterRequest {
            envelope: Some(signed_record(&key, "payments", "p1", 1, 9000)),
        })
        .await
        .expect_err("a follower does not propose");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");
    assert!(status.message().starts_with("not_leader"), "{status}");
    assert!(
        status.message().contains(&cluster.client_addr(leader)),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_another_and_loses_no_acknowledged_registration() {
    eprintln!("phase 1: a ready cluster with some acknowledged registrations");
    let mut cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("orders")).unwrap();
    let orders_cert = cluster.issue("service", "orders");
    let client = cluster.client_as(&orders_cert, &[]);
    let mut acknowledged = BTreeSet::new();
    for i in 0..20u64 {
        let name = format!("o{i}");
        client
            .register(signed_record(&key, "orders", &name, 1, 8000 + i as u32))
            .await
            .expect("register before failover");
        acknowledged.insert(name);
    }

    eprintln!("phase 2: kill -9 the leader (node {leader}); a new leader is elected");
    let killed_at = Instant::now();
    cluster.kill9(leader);
    let new_leader = loop {
        if let Some(l) = cluster.agreed_leader().await {
            if l != leader {
                break l;
            }
        }
        assert!(
            killed_at.elapsed() < READY,
            "no new leader\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "failover: node {new_leader} leads {} ms after the kill",
        killed_at.elapsed().as_millis()
    );

    eprintln!("phase 3: registrations continue through the survivors");
    let survivors: Vec<u64> = cluster.others(leader);
    let client = cluster.client_as(&orders_cert, &survivors);
    for i in 20..40u64 {
        let name = format!("o{i}");
        client
            .register(signed_record(&key, "orders", &name, 1, 8000 + i as u32))
            .await
            .expect("register after failover");
        acknowledged.insert(name);
    }

    eprintln!("phase 4: the killed node restarts and catches up; nothing acknowledged is lost");
    cluster.restart(leader);
    for id in cluster.ids() {
        wait_converged(&cluster, id, "orders", &acknowledged).await;
    }
    let linearizable = cluster.client(&[]).resolve("orders", false).await.unwrap();
    let names: BTreeSet<String> = linearizable
        .instances
        .into_iter()
        .map(|i| i.payload.instance)
        .collect();
    assert_eq!(names, acknowledged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_purged_entries_catches_up_by_snapshot() {
    eprintln!("phase 1: a cluster that snapshots every 20 entries and keeps 5 behind");
    let mut cluster = TestCluster::start(ClusterOptions {
        snapshot_after_entries: 20,
        log_entries_kept: 5,
        ..Default::default()
    });
    let leader = cluster.wait_ready(READY).await;
    let lagging = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("inventory")).unwrap();

    eprintln!("phase 2: stop node {lagging}, then write well past a snapshot");
    let applied_before = cluster
        .client(&[lagging])
        .status_of(&cluster.client_addr(lagging))
        .await
        .unwrap()
        .applied_index;
    cluster.kill9(lagging);
    let others: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != lagging)
        .collect();
    let client = cluster.client_as(&cluster.issue("service", "inventory"), &others);
    let mut expected = BTreeSet::new();
    for i in 0..80u64 {
        let name = format!("i{i}");
        client
            .register(signed_record(&key, "inventory", &name, 1, 7000 + i as u32))
            .await
            .expect("register while a node is down");
        expected.insert(name);
    }
    // Purging follows the snapshot asynchronously; wait for it, bounded.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leader_id = cluster.agreed_leader().await.unwrap_or(leader);
        let status = cluster
            .client(&[leader_id])
            .status_of(&cluster.client_addr(leader_id))
            .await
            .unwrap();
        if status.purged_index > applied_before {
            eprintln!(
                "leader purged up to {} (the stopped node had applied {applied_before})",
                status.purged_index
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leader never purged entries the stopped node missed: {status:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    eprintln!("phase 3: the node restarts and can only catch up by installing a snapshot");
    cluster.restart(lagging);
    wait_converged(&cluster, lagging, "inventory", &expected).await;
    let status = cluster
        .client(&[lagging])
        .status_of(&cluster.client_addr(lagging))
        .await
        .unwrap();
    assert!(
        status.snapshot_index > applied_before,
        "node {lagging} has no snapshot: {status:?}"
    );
    let log =
        std::fs::read_to_string(cluster.root().join(format!("node{lagging}/server.log"))).unwrap();
    assert!(
        log.contains("installed snapshot"),
        "node {lagging} never installed a snapshot"
    );

    eprintln!("phase 4: it carries on the same audit tree from the snapshot's frontier");
    client
        .register(signed_record(&key, "inventory", "after", 1, 7999))
        .await
        .unwrap();
    let config = cluster.client_toml();
    let env = [("SIGNPOST_CONFIG", config.as_path())];
    let deadline = Instant::now() + Duration::from_secs(20);
    let report = loop {
        let out = cli(&["audit", "verify", "--json"], &env);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let sizes: BTreeSet<u64> = report["nodes"]
            .as_array()
            .map(|n| n.iter().filter_map(|n| n["tree_size"].as_u64()).collect())
            .unwrap_or_default();
        if out.status.success() && sizes.len() == 1 {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "the nodes' audit logs never agreed: {report}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let nodes = report["nodes"].as_array().unwrap();
    let heads: BTreeSet<&str> = nodes
        .iter()
        .map(|n| n["head_hash"].as_str().unwrap())
        .collect();
    assert_eq!(heads.len(), 1, "one tree on every node: {report}");
    let installed = nodes.iter().find(|n| n["id"] == lagging).unwrap();
    let first = installed["first_index"].as_u64().unwrap();
    assert!(
        first > 0,
        "node {lagging} holds the records after its snapshot only: {installed}"
    );
    let proof: serde_json::Value = serde_json::from_str(&cli_ok(
        &[
            "audit",
            "prove",
            "inventory",
            "after",
            "--node",
            &lagging.to_string(),
            "--json",
        ],
        &env,
    ))
    .unwrap();
    assert_eq!(proof["verified"], true);
    assert!(proof["index"].as_u64().unwrap() >= first, "{proof}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_longer_than_a_page_is_read_page_by_page_and_bad_page_tokens_are_refused() {
    const SERVICES: usize = 230;
    let cluster = TestCluster::start(ClusterOptions {
        limits_toml: "writes_per_identity_per_sec = 100000\nwrites_per_identity_burst = 100000\n\
                      reads_per_identity_per_sec = 100000\nreads_per_identity_burst = 100000\n"
            .into(),
        ..Default::default()
    });
    let leader = cluster.wait_ready(READY).await;
    let admin_key = signpost_record::read_signing_key(&cluster.root().join("admin.key")).unwrap();
    let service_key = signpost_record::generate_signing_key();
    let admin = cluster.client(&[leader]);
    let names: Vec<String> = (0..SERVICES).map(|i| format!("svc-{i:03}")).collect();
    for name in &names {
        admin
            .bind(signpost_tests::signed_binding(
                &admin_key,
                name,
                &service_key,
                1,
            ))
            .await
            .unwrap();
    }

    eprintln!("phase 1: default pages hold 100 services; following the tokens lists each once");
    let mut raw =
        signpost_tests::raw_registry(&cluster, &cluster.root().join("admin-cert"), leader);
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = raw
            .list(signpost_proto::v1::ListRequest {
                all_bound: true,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.services.len() <= 100, "{}", page.services.len());
        seen.extend(page.services.into_iter().map(|s| s.service));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 10, "the listing does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, names);

    eprintln!("phase 2: a limit above the maximum is read as the maximum (1000)");
    let one = raw
        .list(signpost_proto::v1::ListRequest {
            all_bound: true,
            limit: 1_000_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.services.len(), SERVICES);
    assert!(one.next_page_token.is_empty());

    eprintln!("phase 3: a page token that is not a service name is refused");
    let status = raw
        .list(signpost_proto::v1::ListRequest {
            page_token: "Not A Name!".into(),
            ..Default::default()
        })
        .await
        .expect_err("a bad page token was accepted");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");

    eprintln!("phase 4: the client reads every page (here: to re-sign every binding)");
    let next = signpost_proto::v1::AdminSetPayload {
        public_keys: vec![service_key.verifying_key().to_bytes().to_vec()],
        threshold: 1,
        version: 2,
        issued_at_ms: signpost_tests::now_ms(),
    };
    let rebinds = admin.rebinds_for(&next, &service_key).await.unwrap();
    assert_eq!(rebinds.len(), SERVICES);
}
