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
async fn health_checks_are_admitted_like_reads_of_the_callers_identity() {
    let cluster = TestCluster::start(ClusterOptions {
        limits_toml: "reads_per_identity_per_sec = 5\nreads_per_identity_burst = 5\n".into(),
        ..Default::default()
    });
    let leader = cluster.wait_ready(READY).await;
    let flooder = cluster.issue("reader", "flooder");
    let probe = cluster.issue("reader", "probe");
    // Health follows readiness every 250 ms: wait for the leader to report it.
    wait_health(
        &cluster,
        &probe,
        leader,
        ServingStatus::Serving,
        Duration::from_secs(10),
    )
    .await;

    eprintln!("phase 1: one identity's burst of health checks is served, the rest is shed");
    let mut served = 0;
    let mut shed = 0;
    let mut one_connection = HealthClient::new(raw_channel(
        &cluster,
        &flooder,
        &cluster.client_addr(leader),
        None,
    ));
    let flood_started = Instant::now();
    for _ in 0..30 {
        let answer = one_connection
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| ServingStatus::try_from(r.into_inner().status));
        match answer {
            Ok(Ok(ServingStatus::Serving)) => served += 1,
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                assert!(
                    status.metadata().get("retry-after-ms").is_some(),
                    "a shed carries a retry hint: {status:?}"
                );
                shed += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    // The burst, plus what refilled (5/s) while the 30 calls were made, however long that took.
    let refilled = (flood_started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        served >= 5 && served <= 5 + refilled + 1,
        "served {served} of 30 with a burst of 5 and {refilled} refilled"
    );
    assert!(
        shed > 0,
        "nothing was shed: the calls took too long to test admission"
    );
    assert_eq!(served + shed, 30);

    eprintln!("phase 2: another identity is still served");
    assert_eq!(
        health(&cluster, &probe, leader, "").await.unwrap(),
        ServingStatus::Serving
    );
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
        json_logs: true,
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
    // An impersonation attempt: the payments certificate writing another service.
    let orders_key = signpost_record::read_signing_key(&cluster.bind_new_key("orders")).unwrap();
    payments
        .register(signpost_tests::signed_record(
            &orders_key,
            "orders",
            "o1",
            1,
            443,
        ))
        .await
        .expect_err("payments wrote orders");

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
    assert!(
        page.contains("signpost_writes_total{result=\"rejected\",reason=\"unbound_key\"} 1"),
        "the refusal at apply is counted by reason:\n{page}"
    );
    assert!(
        page.contains("signpost_denied_total{reason=\"service.own-name-only\"} 1"),
        "the impersonation attempt is counted by rule:\n{page}"
    );
    assert!(
        page.contains("# TYPE signpost_rpc_duration_seconds histogram"),
        "{page}"
    );
    assert!(
        page.contains(
            "signpost_rpc_requests_total{method=\"Register\",code=\"OK\",class=\"service\"} 1"
        ),
        "per-RPC counts by method, code and identity class:\n{page}"
    );
    assert!(
        page.contains("signpost_raft_proposal_duration_seconds_bucket"),
        "{page}"
    );
    let expiry = sample(&page, "signpost_tls_cert_expiry_timestamp_seconds").expect("expiry");
    let now = signpost_tests::now_ms() as f64 / 1000.0;
    assert!(
        expiry > now && expiry < now + 31.0 * 86_400.0,
        "a node certificate lives 30 days: {expiry} vs now {now}"
    );
    let follower = cluster.others(leader)[0];
    let lag = page
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "signpost_raft_follower_lag_entries{{follower=\"{follower}\"}}"
            ))
        })
        .unwrap_or_else(|| panic!("no lag for follower {follower}:\n{page}"));
    let lag: f64 = lag.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(lag < 100.0, "an idle follower is caught up: {lag}");
    let (_, follower_page) = http_get(&cluster.metrics_addr(follower), "/metrics");
    assert_eq!(sample(&follower_page, "signpost_raft_is_leader"), Some(0.0));

    eprintln!("phase 1b: audit gauges: the records are counted; no checkpoint until keys are bound, then a fresh one");
    assert!(
        sample(&page, "signpost_audit_records").is_some_and(|n| n >= 4.0),
        "genesis, two binds and a registration:\n{page}"
    );
    assert_eq!(
        sample(&page, "signpost_audit_checkpoint_timestamp_seconds"),
        Some(0.0),
        "{page}"
    );
    cluster.bind_checkpoint_keys(&[1, 2, 3]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, page) = http_get(&cluster.metrics_addr(follower), "/metrics");
        let at = sample(&page, "signpost_audit_checkpoint_timestamp_seconds").unwrap_or(0.0);
        if at > 0.0 {
            let now = signpost_tests::now_ms() as f64 / 1000.0;
            assert!((now - at).abs() < 60.0, "a fresh checkpoint: {at} vs {now}");
            assert!(
                sample(&page, "signpost_audit_checkpoint_size").is_some_and(|n| n >= 4.0),
                "{page}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {follower} never reported a checkpoint:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    eprintln!("phase 2: the node logs JSON lines; the refusal's line says who, what and why");
    let log =
        std::fs::read_to_string(cluster.root().join(format!("node{leader}/server.log"))).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let refused = lines
        .iter()
        .find(|l| l["reason"] == "service.own-name-only")
        .unwrap_or_else(|| panic!("no access-log line for the impersonation attempt:\n{log}"));
    assert_eq!(refused["target"], "signpost::access", "{refused}");
    assert_eq!(refused["method"], "Register", "{refused}");
    assert_eq!(refused["code"], "PERMISSION_DENIED", "{refused}");
    assert_eq!(
        refused["identity"], "spiffe://signpost.local/service/payments",
        "{refused}"
    );
    assert!(refused["latency_ms"].is_f64(), "{refused}");

    eprintln!("phase 3: /healthz and /readyz answer 200 on a healthy node");
    assert_eq!(
        http_get(&cluster.metrics_addr(follower), "/healthz"),
        (200, "ok\n".into())
    );
    assert_eq!(http_get(&cluster.metrics_addr(follower), "/readyz").0, 200);

    eprintln!("phase 4: a partitioned follower stays alive but is not ready");
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

    eprintln!("phase 5: promtool accepts the page");
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool is needed ({e}); run deploy/setup.sh"));
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(page.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Python interpreter of the venv `deploy/setup.sh` makes for the probe.
fn probe_python() -> std::path::PathBuf {
    let venv = std::env::var_os("SIGNPOST_PYENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/signpost/pyenv")
        });
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run deploy/setup.sh (it installs grpcio there)",
        python.display()
    );
    python
}

/// Runs tests/grpc_probe.py (Python grpcio) against node `id` as the admin.
fn python_probe(cluster: &TestCluster, id: u64) -> serde_json::Value {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc_probe.py");
    let root = cluster.root();
    let out = std::process::Command::new(probe_python())
        .arg(script)
        .args(["--addr", &cluster.client_addr(id)])
        .args(["--ca", root.join("ca/ca.crt").to_str().unwrap()])
        .args(["--cert", root.join("admin-cert.crt").to_str().unwrap()])
        .args(["--key", root.join("admin-cert.key").to_str().unwrap()])
        .args(["--service", "", "--service", "signpost.v1.Registry"])
        .args([
            "--service",
            "signpost.v1.Cluster",
            "--service",
            "no.such.Service",
        ])
        .output()
        .expect("run the probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("probe output {stdout}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_sees_health_and_reflection_as_any_grpc_tool_would() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;

    eprintln!("phase 1: a serving node, as grpcio-health-checking and grpcio-reflection see it");
    let probe = cluster.issue("reader", "probe");
    wait_health(
        &cluster,
        &probe,
        leader,
        ServingStatus::Serving,
        Duration::from_secs(10),
    )
    .await;
    let seen = python_probe(&cluster, leader);
    assert_eq!(seen["health"][""], "SERVING", "{seen}");
    assert_eq!(seen["health"]["signpost.v1.Registry"], "SERVING", "{seen}");
    assert_eq!(seen["health"]["signpost.v1.Cluster"], "SERVING", "{seen}");
    assert_eq!(
        seen["health"]["no.such.Service"], "error: NOT_FOUND",
        "{seen}"
    );
    for version in ["v1", "v1alpha"] {
        let listed = seen["reflection"][version].as_array().unwrap_or_else(|| {
            panic!("reflection {version}: {seen}");
        });
        for service in [
            "signpost.v1.Registry",
            "signpost.v1.Cluster",
            "grpc.health.v1.Health",
        ] {
            assert!(listed.iter().any(|s| s == service), "{version}: {seen}");
        }
        assert!(
            !listed.iter().any(|s| s == "signpost.v1.Raft"),
            "Raft is not on the client listener: {seen}"
        );
    }
    assert_eq!(seen["describes_registry"], true, "{seen}");

    eprintln!("phase 2: a follower cut off from the others reports NOT_SERVING to the same client");
    let follower = cluster.others(leader)[0];
    cluster.partition(&[follower], &cluster.others(follower));
    let started = Instant::now();
    loop {
        let seen = python_probe(&cluster, follower);
        if seen["health"][""] == "NOT_SERVING" {
            assert_eq!(
                seen["health"]["signpost.v1.Registry"], "NOT_SERVING",
                "{seen}"
            );
            assert_eq!(seen["health"]["signpost.v1.Cluster"], "SERVING", "{seen}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still {seen} after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.heal();
}

/// `promtool SUBCOMMAND FILE`; panics saying how to get promtool when it is missing.
fn promtool(subcommand: &[&str], file: &std::path::Path) -> std::process::Output {
    std::process::Command::new("promtool")
        .args(subcommand)
        .arg(file)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool is needed to check deploy/prometheus/ ({e}); run deploy/setup.sh")
        })
}

/// promtool's stdout and stderr together.
fn promtool_said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    let rules = dir.join("alerts.yml");
    let unit_tests = dir.join("alerts_test.yml");
    let rules_text = std::fs::read_to_string(&rules).expect("deploy/prometheus/alerts.yml");
    let tests_text =
        std::fs::read_to_string(&unit_tests).expect("deploy/prometheus/alerts_test.yml");

    eprintln!("phase 1: promtool check rules accepts alerts.yml");
    let out = promtool(&["check", "rules"], &rules);
    assert!(
        out.status.success(),
        "promtool check rules {}: {}\n{}",
        rules.display(),
        out.status,
        promtool_said(&out)
    );

    eprintln!("phase 2: every alert has a case that fires and one that does not, and they pass");
    let alerts: Vec<&str> = rules_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 8, "alerts in alerts.yml: {alerts:?}");
    let lines: Vec<&str> = tests_text.lines().map(str::trim).collect();
    for alert in &alerts {
        let name = format!("alertname: {alert}");
        let expected: Vec<&str> = lines
            .windows(2)
            .filter(|pair| pair[0] == name)
            .map(|pair| pair[1])
            .collect();
        assert!(
            expected.contains(&"exp_alerts:"),
            "alerts_test.yml has no case in which {alert} fires"
        );
        assert!(
            expected.contains(&"exp_alerts: []"),
            "alerts_test.yml has no case in which {alert} stays quiet"
        );
    }
    let out = promtool(&["test", "rules"], &unit_tests);
    assert!(
        out.status.success(),
        "promtool test rules {}: {}\n{}",
        unit_tests.display(),
        out.status,
        promtool_said(&out)
    );

    eprintln!("phase 3: a copy with one expression broken is refused");
    let intact = "expr: signpost_ready == 0";
    assert!(rules_text.contains(intact), "alerts.yml has no `{intact}`");
    let scratch = tempfile::tempdir().expect("tempdir");
    let broken = scratch.path().join("alerts.yml");
    std::fs::write(
        &broken,
        rules_text.replacen(intact, "expr: (signpost_ready == 0", 1),
    )
    .expect("writing the broken copy");
    let out = promtool(&["check", "rules"], &broken);
    let said = promtool_said(&out);
    assert!(
        !out.status.success(),
        "promtool accepted an unbalanced parenthesis:\n{said}"
    );
    assert!(
        said.contains("SignpostNodeNotReady") && said.contains("parse error"),
        "the refusal names the broken alert and the parse error:\n{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_linearizable_reads_share_leadership_confirmations_and_see_prior_writes() {
    const READS: usize = 64;
    let cluster = TestCluster::start(ClusterOptions {
        metrics: true,
        ..Default::default()
    });
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let payments = cluster.client_as(&cluster.issue("service", "payments"), &[leader]);

    eprintln!("phase 1: a write is acknowledged");
    payments
        .register(signpost_tests::signed_record(
            &key, "payments", "p1", 1, 443,
        ))
        .await
        .unwrap();

    eprintln!("phase 2: {READS} linearizable resolves at once, multiplexed on one connection");
    let admin = cluster.root().join("admin-cert");
    let connection = signpost_tests::raw_registry(&cluster, &admin, leader);
    let reads = (0..READS).map(|_| {
        let mut client = connection.clone();
        async move {
            client
                .resolve(signpost_proto::v1::ResolveRequest {
                    service: "payments".into(),
                    stale: false,
                    audit: None,
                })
                .await
        }
    });
    let answers = futures::future::join_all(reads).await;
    for answer in answers {
        let answer = answer.expect("a linearizable resolve").into_inner();
        let records = answer.service.map(|s| s.records.len()).unwrap_or(0);
        assert_eq!(records, 1, "every read sees the acknowledged write");
    }

    eprintln!("phase 3: fewer confirmations than reads, and every read was served by one");
    let (_, page) = http_get(&cluster.metrics_addr(leader), "/metrics");
    let served = sample(&page, "signpost_raft_read_batch_size_sum").expect("batch sizes");
    let rounds = sample(&page, "signpost_raft_read_batch_size_count").expect("batch count");
    assert!(served >= READS as f64, "{served} reads confirmed: {page}");
    assert!(
        rounds < served,
        "{rounds} confirmations for {served} reads: none was shared"
    );
}
