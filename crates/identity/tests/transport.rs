//! Mutual TLS over loopback with real files: who gets in, revocation without restart,
//! handshake limits, and a tonic round trip that sees the caller's SPIFFE ID.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::{
    eventually, init_logging, start_echo_server, start_echo_server_with, try_handshake, Pki,
    TRUST_DOMAIN,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use signpost_identity::{
    client_config, client_config_anonymous, connect_channel, peer_identity, server_config,
    server_config_for_peers, spawn_crl_watcher, Identity, IssueOptions, PeerRule, SpiffeId,
    TlsFiles, TlsIncoming, TlsSettings, Trust,
};
use signpost_proto::v1::cluster_client::ClusterClient;
use signpost_proto::v1::cluster_server::{Cluster, ClusterServer};
use signpost_proto::v1::{StatusRequest, StatusResponse};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn node_id(id: u64) -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, Identity::Node(id)).unwrap()
}

fn client(files: &TlsFiles, trust: &Trust, rule: PeerRule) -> Arc<rustls::ClientConfig> {
    client_config(files, trust, &TlsSettings::default(), rule).unwrap()
}

/// Accepts any server certificate: only for proving what the *server* refuses.
#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn mutual_tls_succeeds_between_two_issued_certificates() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let server_files = pki.issue(Identity::Node(1), "n1");
    let client_files = pki.issue(Identity::Service("payments".into()), "payments");
    let trust = pki.trust();
    let server = start_echo_server(&server_files, &trust, &TlsSettings::default()).await;

    tracing::info!("phase: client (AnyNode) reaches node 1; the server sees the client's id");
    let seen = try_handshake(
        server.addr,
        client(&client_files, &trust, PeerRule::AnyNode),
    )
    .await;
    assert_eq!(seen.unwrap(), "spiffe://test.signpost/service/payments");

    tracing::info!("phase: Exact and SameTrustDomain accept the right server");
    let exact = client(&client_files, &trust, PeerRule::Exact(node_id(1)));
    assert!(try_handshake(server.addr, exact).await.is_ok());
    let same = client(&client_files, &trust, PeerRule::SameTrustDomain);
    assert!(try_handshake(server.addr, same).await.is_ok());

    tracing::info!("phase: the negotiated protocol is TLS 1.3 with ALPN h2");
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client(&client_files, &trust, PeerRule::AnyNode))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (_, session) = tls.get_ref();
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));

    tracing::info!("phase: a TLS 1.2-only client is refused by the default (1.3-only) server");
    let tls12_only = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
    .with_no_client_auth();
    let err = try_handshake(server.addr, Arc::new(tls12_only))
        .await
        .unwrap_err();
    assert!(err.contains("ProtocolVersion"), "{err}");
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let server_files = pki.issue(Identity::Node(1), "n1");
    let trust = pki.trust();
    let server = start_echo_server(&server_files, &trust, &TlsSettings::default()).await;

    tracing::info!("phase: anonymous client gets certificate_required");
    let anonymous =
        client_config_anonymous(&trust, &TlsSettings::default(), PeerRule::AnyNode).unwrap();
    let err = try_handshake(server.addr, anonymous).await.unwrap_err();
    assert!(err.contains("CertificateRequired"), "{err}");
}

#[tokio::test]
async fn node_only_listener_refuses_other_identities_during_the_handshake() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let server_files = pki.issue(Identity::Node(1), "n1");
    let node2 = pki.issue(Identity::Node(2), "n2");
    let admin = pki.issue(Identity::Admin("root".into()), "root");
    let trust = pki.trust();
    let settings = TlsSettings::default();
    let config =
        server_config_for_peers(&server_files, &trust, &settings, PeerRule::AnyNode).unwrap();
    let server = start_echo_server_with(config, &settings).await;

    tracing::info!("phase: a node gets in");
    let seen = try_handshake(server.addr, client(&node2, &trust, PeerRule::AnyNode)).await;
    assert_eq!(seen.unwrap(), "spiffe://test.signpost/node/2");

    tracing::info!("phase: an admin (valid certificate, wrong kind) does not");
    let err = try_handshake(server.addr, client(&admin, &trust, PeerRule::AnyNode))
        .await
        .unwrap_err();
    assert!(err.contains("CertificateUnknown"), "{err}");
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let server_files = pki.issue(Identity::Node(1), "n1");
    let trust = pki.trust();
    let server = start_echo_server(&server_files, &trust, &TlsSettings::default()).await;

    tracing::info!("phase: same trust domain, different CA: unknown_ca");
    let foreign = Pki::new(TRUST_DOMAIN);
    foreign.issue(Identity::Node(2), "n2");
    let files = TlsFiles {
        // Trusts our CA (so it accepts the server) but presents the foreign certificate.
        ca: pki.ca.cert_path(),
        ..foreign.files("n2")
    };
    let err = try_handshake(server.addr, client(&files, &trust, PeerRule::AnyNode))
        .await
        .unwrap_err();
    assert!(err.contains("UnknownCA"), "{err}");

    tracing::info!("phase: the client refuses a server from another CA too");
    let foreign_server_files = foreign.issue(Identity::Node(3), "n3");
    let foreign_server = start_echo_server(
        &foreign_server_files,
        &foreign.trust(),
        &TlsSettings::default(),
    )
    .await;
    let ours = pki.issue(Identity::Node(4), "n4");
    let err = try_handshake(
        foreign_server.addr,
        client(&ours, &trust, PeerRule::AnyNode),
    )
    .await
    .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let server_files = pki.issue(Identity::Node(1), "n1");
    let trust = pki.trust();
    let server = start_echo_server(&server_files, &trust, &TlsSettings::default()).await;

    tracing::info!("phase: a certificate that ended an hour ago gets certificate_expired");
    let now = SystemTime::now();
    let expired = IssueOptions {
        not_before: Some(now - Duration::from_secs(2 * 3600)),
        not_after: Some(now - Duration::from_secs(3600)),
        ..IssueOptions::default()
    };
    let files = pki.issue_with(Identity::Reader("old".into()), "old", &expired);
    let err = try_handshake(server.addr, client(&files, &trust, PeerRule::AnyNode))
        .await
        .unwrap_err();
    assert!(err.contains("CertificateExpired"), "{err}");

    tracing::info!("phase: a certificate that starts tomorrow is refused as well");
    let future = IssueOptions {
        not_before: Some(now + Duration::from_secs(24 * 3600)),
        ..IssueOptions::default()
    };
    let files = pki.issue_with(Identity::Reader("early".into()), "early", &future);
    assert!(
        try_handshake(server.addr, client(&files, &trust, PeerRule::AnyNode))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn revoked_client_is_refused_after_reload_without_restart() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let server_files = pki.issue(Identity::Node(1), "n1");
    let alpha = pki.issue(Identity::Service("alpha".into()), "alpha");
    let beta = pki.issue(Identity::Service("beta".into()), "beta");
    let trust = pki.trust();
    let server = start_echo_server(&server_files, &trust, &TlsSettings::default()).await;
    let alpha_config = client(&alpha, &trust, PeerRule::AnyNode);
    let beta_config = client(&beta, &trust, PeerRule::AnyNode);

    tracing::info!("phase: both clients get in");
    assert!(try_handshake(server.addr, alpha_config.clone())
        .await
        .is_ok());
    assert!(try_handshake(server.addr, beta_config.clone())
        .await
        .is_ok());

    tracing::info!("phase: revoked on disk but not reloaded: the loaded CRL still applies");
    let generation = trust.crl_generation();
    pki.ca.revoke(&alpha.cert).unwrap();
    assert!(try_handshake(server.addr, alpha_config.clone())
        .await
        .is_ok());

    tracing::info!("phase: after reload_crl, alpha is refused and beta still gets in");
    trust.reload_crl().unwrap();
    assert_eq!(trust.crl_generation(), generation + 1);
    assert_eq!(trust.revoked_count(), 1);
    let err = try_handshake(server.addr, alpha_config.clone())
        .await
        .unwrap_err();
    assert!(err.contains("CertificateRevoked"), "{err}");
    assert_eq!(
        try_handshake(server.addr, beta_config.clone())
            .await
            .unwrap(),
        "spiffe://test.signpost/service/beta"
    );

    tracing::info!("phase: a garbage CRL file keeps the previous CRL (alpha stays out)");
    let good_crl = std::fs::read(pki.ca.crl_path()).unwrap();
    std::fs::write(pki.ca.crl_path(), b"not a crl").unwrap();
    assert!(trust.reload_crl().is_err());
    assert_eq!(trust.crl_generation(), generation + 1);
    assert!(try_handshake(server.addr, alpha_config.clone())
        .await
        .is_err());

    tracing::info!("phase: an empty CRL file is refused, not read as 'nothing revoked'");
    std::fs::write(pki.ca.crl_path(), b"").unwrap();
    assert!(trust.reload_crl().is_err());
    assert!(try_handshake(server.addr, alpha_config.clone())
        .await
        .is_err());

    tracing::info!("phase: an older CRL (lower number) is refused as a rollback");
    std::fs::write(pki.ca.crl_path(), &good_crl).unwrap();
    trust.reload_crl().unwrap();
    let before_beta = std::fs::read(pki.ca.crl_path()).unwrap();
    pki.ca.revoke(&beta.cert).unwrap();
    trust.reload_crl().unwrap();
    std::fs::write(pki.ca.crl_path(), &before_beta).unwrap();
    let err = trust.reload_crl().unwrap_err();
    assert!(err.to_string().contains("went backwards"), "{err}");
    assert!(try_handshake(server.addr, beta_config.clone())
        .await
        .is_err());

    tracing::info!("phase: a CRL signed by another CA is refused");
    let foreign = Pki::new(TRUST_DOMAIN);
    std::fs::copy(foreign.ca.crl_path(), pki.ca.crl_path()).unwrap();
    let err = trust.reload_crl().unwrap_err();
    assert!(err.to_string().contains("CRL"), "{err}");
    assert!(try_handshake(server.addr, alpha_config).await.is_err());
}

#[tokio::test]
async fn crl_watcher_applies_a_revocation_when_the_file_changes() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let server_files = pki.issue(Identity::Node(1), "n1");
    let alpha = pki.issue(Identity::Service("alpha".into()), "alpha");
    let beta = pki.issue(Identity::Service("beta".into()), "beta");
    let trust = pki.trust();
    let server = start_echo_server(&server_files, &trust, &TlsSettings::default()).await;
    let watcher = spawn_crl_watcher(trust.clone(), Duration::from_millis(50));
    let alpha_config = client(&alpha, &trust, PeerRule::AnyNode);

    tracing::info!("phase: alpha gets in before the revocation");
    assert!(try_handshake(server.addr, alpha_config.clone())
        .await
        .is_ok());

    tracing::info!("phase: revoke; the watcher notices the new file without any call");
    let generation = trust.crl_generation();
    pki.ca.revoke(&alpha.cert).unwrap();
    eventually("the watcher to reload the CRL", || {
        trust.crl_generation() > generation
    })
    .await;
    let err = try_handshake(server.addr, alpha_config).await.unwrap_err();
    assert!(err.contains("CertificateRevoked"), "{err}");

    tracing::info!("phase: a fresh connection with a non-revoked certificate still works");
    let beta_config = client(&beta, &trust, PeerRule::AnyNode);
    assert!(try_handshake(server.addr, beta_config).await.is_ok());

    tracing::info!("phase: an unchanged file is not reloaded again");
    let settled = trust.crl_generation();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(trust.crl_generation(), settled);
    watcher.abort();
}

#[tokio::test]
async fn client_enforces_revocation_and_the_peer_rule_on_servers() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let node1 = pki.issue(Identity::Node(1), "n1");
    let service = pki.issue(Identity::Service("payments".into()), "payments");
    let me = pki.issue(Identity::Node(2), "n2");
    let trust = pki.trust();
    let node_server = start_echo_server(&node1, &trust, &TlsSettings::default()).await;
    let service_server = start_echo_server(&service, &trust, &TlsSettings::default()).await;

    tracing::info!("phase: Exact(node/9) refuses node/1");
    let err = try_handshake(
        node_server.addr,
        client(&me, &trust, PeerRule::Exact(node_id(9))),
    )
    .await
    .unwrap_err();
    assert!(err.contains("PeerMismatch"), "{err}");
    assert!(err.contains("spiffe://test.signpost/node/1"), "{err}");

    tracing::info!("phase: AnyNode refuses a service acting as a server");
    let err = try_handshake(service_server.addr, client(&me, &trust, PeerRule::AnyNode))
        .await
        .unwrap_err();
    assert!(err.contains("PeerMismatch"), "{err}");

    tracing::info!("phase: Exact for another trust domain refuses our node");
    let elsewhere = SpiffeId::new("other.domain", Identity::Node(1)).unwrap();
    assert!(try_handshake(
        node_server.addr,
        client(&me, &trust, PeerRule::Exact(elsewhere))
    )
    .await
    .is_err());

    tracing::info!("phase: a revoked server certificate is refused by the client");
    pki.ca.revoke(&node1.cert).unwrap();
    trust.reload_crl().unwrap();
    let err = try_handshake(node_server.addr, client(&me, &trust, PeerRule::AnyNode))
        .await
        .unwrap_err();
    assert!(err.contains("Revoked"), "{err}");
}

#[tokio::test]
async fn silent_client_is_disconnected_after_the_handshake_timeout() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let server_files = pki.issue(Identity::Node(1), "n1");
    let client_files = pki.issue(Identity::Node(2), "n2");
    let trust = pki.trust();
    let timeout = Duration::from_millis(400);
    let settings = TlsSettings {
        handshake_timeout: timeout,
        ..TlsSettings::default()
    };
    let server = start_echo_server(&server_files, &trust, &settings).await;

    tracing::info!("phase: a raw TCP client that sends nothing");
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();

    tracing::info!("phase: meanwhile another client completes its handshake");
    assert!(try_handshake(
        server.addr,
        client(&client_files, &trust, PeerRule::AnyNode)
    )
    .await
    .is_ok());

    tracing::info!("phase: the silent client is closed after the timeout, not before");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(common::PROMPTLY, silent.read(&mut buf))
        .await
        .expect("server never closed the silent connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let elapsed = started.elapsed();
    assert!(elapsed >= timeout, "closed after {elapsed:?}");
    assert!(elapsed < timeout * 10, "closed after {elapsed:?}");
}

#[tokio::test]
async fn handshakes_beyond_the_per_ip_cap_are_closed_at_once() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let server_files = pki.issue(Identity::Node(1), "n1");
    let client_files = pki.issue(Identity::Node(2), "n2");
    let trust = pki.trust();
    let settings = TlsSettings {
        handshake_timeout: Duration::from_secs(30),
        first_byte_timeout: Duration::from_secs(30),
        handshakes_per_ip_max: 2,
        ..TlsSettings::default()
    };
    let server = start_echo_server(&server_files, &trust, &settings).await;

    tracing::info!("phase: two silent connections use up 127.0.0.1's budget");
    let _a = TcpStream::connect(server.addr).await.unwrap();
    let _b = TcpStream::connect(server.addr).await.unwrap();
    // Give the accept loop time to take both before the third arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;

    tracing::info!("phase: the third is closed immediately, long before the 30 s timeout");
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("excess connection was not closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let err = try_handshake(
        server.addr,
        client(&client_files, &trust, PeerRule::AnyNode),
    )
    .await;
    assert!(err.is_err(), "a handshake beyond the cap got in");

    tracing::info!("phase: when the silent ones leave, handshakes are accepted again");
    drop((_a, _b));
    let config = client(&client_files, &trust, PeerRule::AnyNode);
    let deadline = Instant::now() + common::PROMPTLY;
    loop {
        if try_handshake(server.addr, config.clone()).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "budget never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Answers Status with the caller's node id (0 if not a node) and its SPIFFE ID as `role`.
struct WhoAmI;

#[tonic::async_trait]
impl Cluster for WhoAmI {
    async fn status(
        &self,
        request: tonic::Request<StatusRequest>,
    ) -> Result<tonic::Response<StatusResponse>, tonic::Status> {
        let peer = peer_identity(&request)?;
        Ok(tonic::Response::new(StatusResponse {
            node_id: peer.node_id().unwrap_or(0),
            role: peer.to_string(),
            ..StatusResponse::default()
        }))
    }

    // The rest of the Cluster service is not what these transport tests are about.
    async fn add_member(
        &self,
        _: tonic::Request<signpost_proto::v1::AddMemberRequest>,
    ) -> Result<tonic::Response<signpost_proto::v1::MembershipResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("transport test"))
    }

    async fn remove_member(
        &self,
        _: tonic::Request<signpost_proto::v1::RemoveMemberRequest>,
    ) -> Result<tonic::Response<signpost_proto::v1::MembershipResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("transport test"))
    }

    async fn transfer_leader(
        &self,
        _: tonic::Request<signpost_proto::v1::TransferLeaderRequest>,
    ) -> Result<tonic::Response<signpost_proto::v1::TransferLeaderResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("transport test"))
    }

    async fn snapshot(
        &self,
        _: tonic::Request<signpost_proto::v1::SnapshotRequest>,
    ) -> Result<tonic::Response<signpost_proto::v1::SnapshotResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("transport test"))
    }

    type BackupStream =
        futures::stream::Empty<Result<signpost_proto::v1::BackupChunk, tonic::Status>>;

    async fn backup(
        &self,
        _: tonic::Request<signpost_proto::v1::BackupRequest>,
    ) -> Result<tonic::Response<Self::BackupStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("transport test"))
    }
}

#[tokio::test]
async fn tonic_round_trip_handler_sees_the_callers_spiffe_id() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let server_files = pki.issue(Identity::Node(1), "n1");
    let node2 = pki.issue(Identity::Node(2), "n2");
    let reader = pki.issue(Identity::Reader("dash".into()), "dash");
    let trust = pki.trust();
    let settings = TlsSettings::default();

    let incoming = TlsIncoming::bind(
        "127.0.0.1:0",
        server_config(&server_files, &trust, &settings).unwrap(),
        &settings,
    )
    .await
    .unwrap();
    let addr = incoming.local_addr();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ClusterServer::new(WhoAmI))
            .serve_with_incoming(incoming),
    );

    tracing::info!("phase: node 2 calls Status; the handler reports node 2");
    let channel = connect_channel(
        &addr.to_string(),
        client(&node2, &trust, PeerRule::Exact(node_id(1))),
        Duration::from_secs(5),
    )
    .unwrap();
    let mut cluster = ClusterClient::new(channel.clone());
    let reply = cluster.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(reply.node_id, 2);
    assert_eq!(reply.role, "spiffe://test.signpost/node/2");

    tracing::info!("phase: the channel is reusable (second call, cloned client)");
    let reply = ClusterClient::new(channel)
        .status(StatusRequest {})
        .await
        .unwrap();
    assert_eq!(reply.into_inner().node_id, 2);

    tracing::info!("phase: a reader sees itself as a reader");
    let channel = connect_channel(
        &format!("localhost:{}", addr.port()),
        client(&reader, &trust, PeerRule::AnyNode),
        Duration::from_secs(5),
    )
    .unwrap();
    let reply = ClusterClient::new(channel)
        .status(StatusRequest {})
        .await
        .unwrap();
    assert_eq!(
        reply.into_inner().role,
        "spiffe://test.signpost/reader/dash"
    );

    tracing::info!("phase: a channel whose peer rule fails reports UNAVAILABLE, not success");
    let channel = connect_channel(
        &addr.to_string(),
        client(&node2, &trust, PeerRule::Exact(node_id(5))),
        Duration::from_secs(5),
    )
    .unwrap();
    let status = ClusterClient::new(channel)
        .status(StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    tracing::info!("phase: a request without TLS connect info is UNAUTHENTICATED");
    let status = peer_identity(&tonic::Request::new(())).unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    tracing::info!("phase: malformed addresses are refused up front");
    let config = client(&node2, &trust, PeerRule::AnyNode);
    assert!(connect_channel("no-port", config.clone(), Duration::from_secs(1)).is_err());
    assert!(connect_channel("host:1/path", config, Duration::from_secs(1)).is_err());

    server.abort();
}

#[tokio::test]
async fn a_connection_that_never_sends_the_http2_preface_is_closed_after_its_deadline() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let server_files = pki.issue(Identity::Node(1), "n1");
    let client_files = pki.issue(Identity::Node(2), "n2");
    let trust = pki.trust();
    let preface = Duration::from_millis(500);
    let settings = TlsSettings {
        preface_timeout: preface,
        ..TlsSettings::default()
    };
    let server = start_echo_server(&server_files, &trust, &settings).await;

    tracing::info!("phase: a certificate holder completes TLS, then sends nothing");
    let started = Instant::now();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut tls =
        tokio_rustls::TlsConnector::from(client(&client_files, &trust, PeerRule::AnyNode))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("handshake");

    tracing::info!("phase: the server closes it after the preface deadline, not before");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(common::PROMPTLY, tls.read(&mut buf))
        .await
        .expect("server never closed the connection without a preface");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let elapsed = started.elapsed();
    assert!(elapsed >= preface, "closed after {elapsed:?}");
    assert!(elapsed < preface * 10, "closed after {elapsed:?}");

    tracing::info!("phase: a client that sends the preface is served");
    assert!(try_handshake(
        server.addr,
        client(&client_files, &trust, PeerRule::AnyNode)
    )
    .await
    .is_ok());
}

#[tokio::test]
async fn an_allowlisted_listener_closes_other_sources_before_any_tls() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let server_files = pki.issue(Identity::Node(1), "n1");
    let client_files = pki.issue(Identity::Node(2), "n2");
    let trust = pki.trust();
    let settings = TlsSettings::default();
    let config = server_config(&server_files, &trust, &settings).unwrap();
    let allow = signpost_identity::SourceAllowlist::new(["127.0.0.1".parse().unwrap()]);
    let mut incoming =
        TlsIncoming::bind_admitting("127.0.0.1:0", config, &settings, Some(allow.clone()))
            .await
            .unwrap();
    let addr = incoming.local_addr();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        use tokio_stream::StreamExt;
        while let Some(Ok(mut stream)) = incoming.next().await {
            tokio::spawn(async move {
                let _ = stream.write_all(b"node/1\n").await;
                let _ = stream.flush().await;
                let mut sink = [0u8; 64];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });

    tracing::info!("phase: the admitted address completes a handshake");
    assert!(
        try_handshake(addr, client(&client_files, &trust, PeerRule::AnyNode))
            .await
            .is_ok()
    );

    tracing::info!("phase: once 127.0.0.1 is no longer admitted, it is closed at accept");
    allow.set(["127.0.0.9".parse().unwrap()]);
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf))
        .await
        .expect("an outsider was left open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
