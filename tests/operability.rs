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
