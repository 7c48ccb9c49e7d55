//! What operators and their tools see of a running node: the gRPC health checking protocol
//! (`grpc.health.v1`, as Kubernetes gRPC probes and `grpc_health_probe` use it) and server
//! reflection (`grpc.reflection.v1`, as grpcurl uses it), both on the client listener, over the
//! same mutual TLS as everything else.

use std::time::{Duration, Instant};

use signpost_tests::{raw_channel, ClusterOptions, TestCluster};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

const READY: Duration = Duration::from_secs(60);

async fn health(
    cluster: &TestCluster,
    cert: &std::path::Path,
    id: u64,
    service: &str,
) -> Result<ServingStatus, tonic::Status> {
    let channel = raw_channel(cluster, cert, &cluster.client_addr(id), None);
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown))
}

/// Polls until node `id` reports `want` for the whole server, or panics after `within`.
async fn wait_health(
    cluster: &TestCluster,
    cert: &std::path::Path,
    id: u64,
    want: ServingStatus,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let now = health(cluster, cert, id, "").await;
        if now.as_ref().ok() == Some(&want) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "node {id} reports {now:?}, not {want:?}, after {within:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_readiness_through_a_partition_and_its_heal() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let probe = cluster.issue("reader", "probe");

    eprintln!("phase 1: every node of a healthy cluster is SERVING");
    for id in cluster.ids() {
        wait_health(
            &cluster,
            &probe,
            id,
            ServingStatus::Serving,
            Duration::from_secs(10),
        )
        .await;
    }
    for service in ["signpost.v1.Registry", "signpost.v1.Cluster"] {
        assert_eq!(
            health(&cluster, &probe, leader, service).await.unwrap(),
            ServingStatus::Serving,
            "{service}"
        );
    }
    let unknown = health(&cluster, &probe, leader, "no.such.Service")
        .await
        .expect_err("an unknown service has no status");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown}");

    eprintln!("phase 2: a follower cut off from the others turns NOT_SERVING");
    let follower = cluster.others(leader)[0];
    cluster.partition(&[follower], &cluster.others(follower));
    let took = wait_health(
        &cluster,
        &probe,
        follower,
        ServingStatus::NotServing,
        Duration::from_secs(10),
    )
    .await;
    eprintln!("  NOT_SERVING {} ms after the cut", took.as_millis());
    assert_eq!(
        health(&cluster, &probe, follower, "signpost.v1.Cluster")
            .await
            .unwrap(),
        ServingStatus::Serving,
        "status stays available on a node that is not ready"
    );

    eprintln!("phase 3: after the heal it is SERVING again");
    cluster.heal();
    let took = wait_health(
        &cluster,
        &probe,
        follower,
        ServingStatus::Serving,
        Duration::from_secs(15),
    )
    .await;
    eprintln!("  SERVING {} ms after the heal", took.as_millis());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_api_and_serves_its_descriptors() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let probe = cluster.issue("reader", "grpcurl");
    let mut client = ServerReflectionClient::new(raw_channel(
        &cluster,
        &probe,
        &cluster.client_addr(leader),
        None,
    ));
    let ask = |request: MessageRequest| {
        tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        }])
    };

    eprintln!("phase 1: the service list names the API, health and reflection");
    let mut answers = client
        .server_reflection_info(ask(MessageRequest::ListServices(String::new())))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "signpost.v1.Registry",
        "signpost.v1.Cluster",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n.contains("Raft")),
        "the Raft service is not on the client listener: {names:?}"
    );

    eprintln!("phase 2: the file that defines the Registry service, with what it imports");
    let mut answers = client
        .server_reflection_info(ask(MessageRequest::FileContainingSymbol(
            "signpost.v1.Registry".into(),
        )))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a file descriptor response");
    };
    let joined: Vec<u8> = files.file_descriptor_proto.concat();
    let text = String::from_utf8_lossy(&joined);
    assert!(text.contains("signpost/v1/registry.proto"), "{text}");
    assert!(
        text.contains("signpost/v1/record.proto"),
        "imports come along"
    );

    eprintln!("phase 3: an unknown symbol gets NOT_FOUND, not a hang");
    let mut answers = client
        .server_reflection_info(ask(MessageRequest::FileContainingSymbol(
            "no.such.Symbol".into(),
        )))
        .await
        .unwrap()
        .into_inner();
    let answer = tokio::time::timeout(Duration::from_secs(5), answers.message())
        .await
        .expect("reflection answers");
    let status = answer.expect_err("an unknown symbol was described");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status}");
}

/// A plain HTTP/1.1 GET on loopback; returns the status code and the body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics_addr");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// The value of an unlabelled sample in a Prometheus text page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_serves_prometheus_text_healthz_and_readyz() {
    let cluster = TestCluster::start(ClusterOptions {
        metrics: true,
        ..Default::default()
    });
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let payments = cluster.client_as(&cluster.issue("service", "payments"), &[leader]);
    payments
        .register(signpost_tests::signed_record(
            &key, "payments", "p1", 1, 443,
        ))
        .await
        .unwrap();
    let stranger = signpost_record::generate_signing_key();
    payments
        .register(signpost_tests::signed_record(
            &stranger, "payments", "p2", 1, 443,
        ))
        .await
        .expect_err("an unbound key");

    eprintln!("phase 1: /metrics on the leader, in the Prometheus text format");
    let (code, page) = http_get(&cluster.metrics_addr(leader), "/metrics");
    assert_eq!(code, 200, "{page}");
    for name in [
        "signpost_raft_term",
        "signpost_raft_commit_index",
        "signpost_registry_state_bytes_max",
        "signpost_watch_history_bytes",
        "signpost_streams_open",
    ] {
        assert!(
            page.contains(&format!("# TYPE {name} gauge")),
            "{name} missing:\n{page}"
        );
    }
    assert_eq!(
        sample(&page, "signpost_raft_is_leader"),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "signpost_registry_instances"),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "signpost_registry_services"),
        Some(1.0),
        "{page}"
    );
    assert_eq!(sample(&page, "signpost_ready"), Some(1.0), "{page}");
    assert!(
        page.contains("signpost_writes_total{result=\"applied\"}"),
        "{page}"
    );
    let follower = cluster.others(leader)[0];
    let (_, follower_page) = http_get(&cluster.metrics_addr(follower), "/metrics");
    assert_eq!(sample(&follower_page, "signpost_raft_is_leader"), Some(0.0));

    eprintln!("phase 2: /healthz and /readyz answer 200 on a healthy node");
    assert_eq!(
        http_get(&cluster.metrics_addr(follower), "/healthz"),
        (200, "ok\n".into())
    );
    assert_eq!(http_get(&cluster.metrics_addr(follower), "/readyz").0, 200);

    eprintln!("phase 3: a partitioned follower stays alive but is not ready");
    cluster.partition(&[follower], &cluster.others(follower));
    let started = Instant::now();
    let (code, body) = loop {
        let (code, body) = http_get(&cluster.metrics_addr(follower), "/readyz");
        if code != 200 || started.elapsed() > Duration::from_secs(10) {
            break (code, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("not ready: "), "{body}");
    assert_eq!(http_get(&cluster.metrics_addr(follower), "/healthz").0, 200);
    cluster.heal();

    eprintln!("phase 4: promtool accepts the page, when it is installed");
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(page.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) => eprintln!("  promtool not installed ({e}); skipped"),
    }
}
