//! Quotas are enforced in apply, so every node agrees; a refusal names the quota it hit.

use std::time::Duration;

use signpost_proto::v1::Envelope;
use signpost_record::SigningKey;
use signpost_tests::{now_ms, ClusterOptions, TestCluster};

const READY: Duration = Duration::from_secs(60);

fn record(key: &SigningKey, service: &str, instance: &str, sequence: u64) -> Envelope {
    let mut payload = signpost_tests::record_payload(service, instance, sequence, 8443);
    payload.ttl_secs = 600;
    signpost_record::sign_record(key, &payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_refusals_name_the_quota_they_hit() {
    eprintln!("phase 1: a cluster whose genesis allows 2 instances per service and 2 services");
    let cluster = TestCluster::start(ClusterOptions {
        bootstrap_toml: "instances_per_service_max = 2\nservices_max = 2\n".to_string(),
        ..Default::default()
    });
    cluster.wait_ready(READY).await;
    let seq = now_ms() * 1_000;
    let mut keys = Vec::new();
    for service in ["alpha", "beta", "gamma"] {
        let key = signpost_record::read_signing_key(&cluster.bind_new_key(service)).unwrap();
        let client = cluster.client_as(&cluster.issue("service", service), &[]);
        keys.push((service, key, client));
    }
    let (_, alpha_key, alpha) = &keys[0];

    eprintln!("phase 2: two instances fit, the third is refused as quota_instances");
    alpha
        .register(record(alpha_key, "alpha", "a1", seq + 1))
        .await
        .expect("a1");
    alpha
        .register(record(alpha_key, "alpha", "a2", seq + 2))
        .await
        .expect("a2");
    let err = alpha
        .register(record(alpha_key, "alpha", "a3", seq + 3))
        .await
        .expect_err("third instance over the quota");
    assert_eq!(err.code(), Some(tonic::Code::ResourceExhausted), "{err}");
    assert_eq!(err.reason(), Some("quota_instances"), "{err}");
    assert!(err.to_string().contains("quota_instances"), "{err}");

    eprintln!("phase 3: renewing an existing instance is not a new instance: accepted");
    alpha
        .register(record(alpha_key, "alpha", "a1", seq + 4))
        .await
        .expect("renewal");

    eprintln!("phase 4: a second service fits, a third is refused as quota_services");
    let (_, beta_key, beta) = &keys[1];
    beta.register(record(beta_key, "beta", "b1", seq + 5))
        .await
        .expect("b1");
    let (_, gamma_key, gamma) = &keys[2];
    let err = gamma
        .register(record(gamma_key, "gamma", "g1", seq + 6))
        .await
        .expect_err("third service over the quota");
    assert_eq!(err.code(), Some(tonic::Code::ResourceExhausted), "{err}");
    assert_eq!(err.reason(), Some("quota_services"), "{err}");

    eprintln!("phase 5: every node agrees: the refused records are nowhere");
    for id in cluster.ids() {
        let resolved = cluster
            .client(&[id])
            .resolve("alpha", true)
            .await
            .expect("alpha");
        let names: Vec<_> = resolved
            .instances
            .iter()
            .map(|r| r.payload.instance.clone())
            .collect();
        assert!(!names.contains(&"a3".to_string()), "node {id}: {names:?}");
    }
}
