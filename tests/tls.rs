//! Mutual TLS at the edges of real nodes: who is refused, and where.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use signpost_identity::{Ca, Identity, IssueOptions, PeerRule, TlsFiles, TlsSettings, Trust};
use signpost_proto::v1::registry_client::RegistryClient;
use signpost_proto::v1::{ListRequest, RaftMessage};
use signpost_tests::{cli_ok, raw_raft, ClusterOptions, TestCluster};
use tonic::transport::Channel;

const READY: Duration = Duration::from_secs(60);

fn trust(cluster: &TestCluster) -> Trust {
    Trust::load(&cluster.ca_dir().join("ca.crt"), None).expect("trust")
}

fn channel(addr: &str, config: Arc<rustls::ClientConfig>) -> Channel {
    signpost_identity::connect_channel(addr, config, Duration::from_secs(3)).expect("channel")
}

fn channel_as(cluster: &TestCluster, prefix: &Path, addr: &str) -> Channel {
    let files = TlsFiles {
        ca: cluster.ca_dir().join("ca.crt"),
        cert: prefix.with_extension("crt"),
        key: prefix.with_extension("key"),
        crl: None,
    };
    let config = signpost_identity::client_config_from_files(&files, PeerRule::AnyNode)
        .expect("client config");
    channel(addr, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_certificate_of_our_ca_are_refused_at_the_handshake() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let addr = cluster.client_addr(leader);

    eprintln!("phase 1: the admin certificate works (the control)");
    let admin = channel_as(&cluster, &cluster.root().join("admin-cert"), &addr);
    RegistryClient::new(admin)
        .list(ListRequest {
            stale: true,
            ..Default::default()
        })
        .await
        .expect("admin may list");

    eprintln!("phase 2: no client certificate at all");
    let anonymous = signpost_identity::client_config_anonymous(
        &trust(&cluster),
        &TlsSettings::default(),
        PeerRule::AnyNode,
    )
    .unwrap();
    let err = RegistryClient::new(channel(&addr, anonymous))
        .list(ListRequest {
            stale: true,
            ..Default::default()
        })
        .await
        .expect_err("a client without a certificate must be refused");
    eprintln!("refused: {err}");

    eprintln!("phase 3: a certificate from another CA");
    let other = cluster.root().join("other-ca");
    cli_ok(&["ca", "init", "--ca-dir", other.to_str().unwrap()], &[]);
    let stranger = cluster.root().join("stranger");
    cli_ok(
        &[
            "ca",
            "issue",
            "--admin",
            "admin",
            "--ca-dir",
            other.to_str().unwrap(),
            "--out",
            stranger.to_str().unwrap(),
        ],
        &[],
    );
    // The stranger trusts our CA (so the server side is what refuses).
    let err = RegistryClient::new(channel_as(&cluster, &stranger, &addr))
        .list(ListRequest {
            stale: true,
            ..Default::default()
        })
        .await
        .expect_err("a certificate from another CA must be refused");
    eprintln!("refused: {err}");

    eprintln!("phase 4: an expired certificate from our own CA");
    let ca = Ca::load(&cluster.ca_dir()).unwrap();
    let expired = cluster.root().join("expired");
    let hour = Duration::from_secs(3600);
    ca.issue(
        &Identity::Reader("late".into()),
        &IssueOptions {
            not_before: Some(SystemTime::now() - 3 * hour),
            not_after: Some(SystemTime::now() - hour),
            ..Default::default()
        },
        &expired,
    )
    .unwrap();
    let err = RegistryClient::new(channel_as(&cluster, &expired, &addr))
        .list(ListRequest {
            stale: true,
            ..Default::default()
        })
        .await
        .expect_err("an expired certificate must be refused");
    eprintln!("refused: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_member_nodes_from_member_addresses_may_speak_raft() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let peer = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let peer_ip = cluster.node_ip(peer);

    eprintln!(
        "phase 1: a member's certificate from the member's address reaches the Raft service \
         (garbage is refused as malformed)"
    );
    let member = cluster.issue("node", &peer.to_string());
    let status = raw_raft(&cluster, &member, leader, peer_ip)
        .vote(RaftMessage {
            data: vec![0xff; 3],
        })
        .await
        .expect_err("garbage is not a vote");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");

    eprintln!("phase 2: the same certificate from another address is closed at accept");
    let status = raw_raft(&cluster, &member, leader, cluster.outsider_ip(1))
        .vote(RaftMessage {
            data: vec![0xff; 3],
        })
        .await
        .expect_err("an outsider address must not get in");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");

    eprintln!("phase 3: a node certificate of the CA for a non-member id is refused");
    let stranger = cluster.issue("node", "9");
    let status = raw_raft(&cluster, &stranger, leader, peer_ip)
        .vote(RaftMessage {
            data: vec![0xff; 3],
        })
        .await
        .expect_err("node 9 is not a member");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(status.message().contains("raft.members-only"), "{status}");

    eprintln!("phase 4: service, reader and admin certificates are refused");
    for (kind, name) in [
        ("service", "payments"),
        ("reader", "ops"),
        ("admin", "root"),
    ] {
        let prefix = cluster.issue(kind, name);
        let status = raw_raft(&cluster, &prefix, leader, peer_ip)
            .vote(RaftMessage { data: vec![] })
            .await
            .expect_err("non-node identities must be refused");
        assert_ne!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{kind} got past authorization: {status}"
        );
        eprintln!("{kind} refused: {status}");
    }

    eprintln!("phase 5: the cluster is unaffected");
    assert_eq!(cluster.agreed_leader().await, Some(leader));
}
