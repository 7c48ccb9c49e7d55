//! The threat model as tests: each one an attack against a real cluster, and what stops it.

use std::pin::Pin;
use std::time::{Duration, Instant};

use sha2::Digest;
use signpost_client::{Client, ClientConfig};
use signpost_identity::{Ca, Identity, IssueOptions, TlsFiles, TlsIncoming, TlsSettings, Trust};
use signpost_proto::v1::registry_server::{Registry, RegistryServer};
use signpost_proto::v1::*;
use signpost_record::SigningKey;
use signpost_tests::{cli, now_ms, signed_record, ClusterOptions, TestCluster, TRUST_DOMAIN};
use tonic::{Request, Response, Status, Streaming};

const READY: Duration = Duration::from_secs(60);

fn reason(e: &signpost_client::ClientError) -> String {
    e.reason().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_tampering_and_replay_are_refused() {
    let cluster = TestCluster::start(ClusterOptions::default());
    cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    cluster.bind_new_key("orders");
    let payments = cluster.client_as(&cluster.issue("service", "payments"), &[]);
    let orders = cluster.client_as(&cluster.issue("service", "orders"), &[]);

    eprintln!("attack 1: the orders certificate registers payments");
    let err = orders
        .register(signed_record(&key, "payments", "evil", 1, 6666))
        .await
        .expect_err("orders may not write payments");
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("service.own-name-only"), "{err}");

    eprintln!("attack 2: a valid payments certificate with a record signed by an unbound key");
    let rogue = signpost_record::generate_signing_key();
    let err = payments
        .register(signed_record(&rogue, "payments", "p1", 1, 6666))
        .await
        .expect_err("unbound key");
    assert_eq!(reason(&err), "unbound_key", "{err}");
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied));

    eprintln!("attack 3: replay of a captured registration, and a rolled-back sequence");
    let captured = signed_record(&key, "payments", "p1", 10, 443);
    payments
        .register(captured.clone())
        .await
        .expect("first registration");
    let newer = signed_record(&key, "payments", "p1", 11, 444);
    payments.register(newer).await.expect("newer registration");
    let err = payments.register(captured).await.expect_err("replay");
    assert_eq!(reason(&err), "stale_sequence", "{err}");
    let err = payments
        .register(signed_record(&key, "payments", "p1", 5, 445))
        .await
        .expect_err("rollback");
    assert_eq!(reason(&err), "stale_sequence", "{err}");
    let resolved = payments.resolve("payments", false).await.unwrap();
    assert_eq!(resolved.instances[0].payload.endpoints[0].port, 444);

    eprintln!("attack 4: a payload altered after signing, sent past any client-side checks");
    let mut raw =
        signpost_tests::raw_registry(&cluster, &cluster.root().join("service-payments"), 1);
    let mut tampered = signed_record(&key, "payments", "p2", 1, 443);
    let last = tampered.payload.len() - 1;
    tampered.payload[last] ^= 0x01;
    let status = raw
        .register(RegisterRequest {
            envelope: Some(tampered),
        })
        .await
        .expect_err("tampered");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    assert_eq!(
        status.metadata().get("signpost-reason").unwrap(),
        "bad_signature"
    );

    eprintln!("bad input: malformed payload bytes, a missing envelope, an oversized message");
    let garbage = Envelope {
        payload: vec![0xff; 40],
        key_id: key.verifying_key().to_bytes().to_vec(),
        signature: vec![0; 64],
    };
    let status = raw
        .register(RegisterRequest {
            envelope: Some(garbage),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::InvalidArgument | tonic::Code::Unauthenticated
        ),
        "{status}"
    );
    let status = raw
        .register(RegisterRequest { envelope: None })
        .await
        .unwrap_err();
    assert_eq!(
        status.metadata().get("signpost-reason").unwrap(),
        "malformed",
        "{status}"
    );
    let huge = Envelope {
        payload: vec![0; 200 * 1024],
        key_id: vec![0; 32],
        signature: vec![0; 64],
    };
    let status = raw
        .register(RegisterRequest {
            envelope: Some(huge),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument
        ),
        "oversized message: {status}"
    );
    eprintln!("oversized refused: {status}");
    eprintln!("nothing was lost: the earlier registration is intact");
    let resolved = payments.resolve("payments", false).await.unwrap();
    assert_eq!(resolved.instances.len(), 1);
    assert_eq!(resolved.instances[0].payload.endpoints[0].port, 444);

    eprintln!("attack 7: a reader registers; a service binds");
    let reader = cluster.client_as(&cluster.issue("reader", "dashboards"), &[]);
    let err = reader
        .register(signed_record(&key, "payments", "p3", 1, 443))
        .await
        .expect_err("readers may not register");
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err}");
    reader
        .resolve("payments", true)
        .await
        .expect("readers may resolve");
    let binding = BindingPayload {
        service: "payments".into(),
        public_keys: vec![rogue.verifying_key().to_bytes().to_vec()],
        version: now_ms(),
        issued_at_ms: now_ms(),
        not_before_ms: 0,
        not_after_ms: 0,
    };
    let err = payments
        .bind(signpost_record::sign_binding(&rogue, &binding))
        .await
        .expect_err("services may not bind");
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err}");

    eprintln!("the CLI reports a refusal with the gRPC code name");
    let out = cli(
        &[
            "bind",
            "payments",
            "--pubkey",
            cluster.root().join("orders.key.pub").to_str().unwrap(),
            "--cert",
            cluster
                .root()
                .join("service-payments.crt")
                .to_str()
                .unwrap(),
            "--cert-key",
            cluster
                .root()
                .join("service-payments.key")
                .to_str()
                .unwrap(),
        ],
        &[("SIGNPOST_CONFIG", &cluster.client_toml())],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_removes_records_of_the_removed_key_and_admin_rotation_needs_the_threshold() {
    let cluster = TestCluster::start(ClusterOptions::default());
    cluster.wait_ready(READY).await;
    let admin_key = signpost_record::read_signing_key(&cluster.root().join("admin.key")).unwrap();
    let admin = cluster.client(&[]);
    let old = signpost_record::read_signing_key(&cluster.bind_new_key("search")).unwrap();
    let search = cluster.client_as(&cluster.issue("service", "search"), &[]);
    search
        .register(signed_record(&old, "search", "s1", 1, 80))
        .await
        .unwrap();

    eprintln!("phase 1: a binding version that drops the old key removes its live records");
    let new = signpost_record::generate_signing_key();
    let bind = |keys: &[&SigningKey]| {
        signpost_record::sign_binding(
            &admin_key,
            &BindingPayload {
                service: "search".into(),
                public_keys: keys
                    .iter()
                    .map(|k| k.verifying_key().to_bytes().to_vec())
                    .collect(),
                version: now_ms(),
                issued_at_ms: now_ms(),
                not_before_ms: 0,
                not_after_ms: 0,
            },
        )
    };
    admin.bind(bind(&[&new])).await.unwrap();
    let err = search
        .resolve("search", false)
        .await
        .map(|r| r.instances.len());
    assert!(
        matches!(err, Ok(0) | Err(_)),
        "record of the removed key survived: {err:?}"
    );
    search
        .register(signed_record(&new, "search", "s1", 2, 81))
        .await
        .unwrap();
    assert_eq!(
        search
            .resolve("search", false)
            .await
            .unwrap()
            .instances
            .len(),
        1
    );

    eprintln!("phase 2: a rotation that drops the key every binding is signed by, without re-signing them, is refused");
    let admins: Vec<SigningKey> = (0..3)
        .map(|_| signpost_record::generate_signing_key())
        .collect();
    let set = |version: u64, keys: &[&SigningKey], threshold: u32| AdminSetPayload {
        public_keys: keys
            .iter()
            .map(|k| k.verifying_key().to_bytes().to_vec())
            .collect(),
        threshold,
        version,
        issued_at_ms: now_ms(),
    };
    let two_of_three = set(2, &[&admins[0], &admins[1], &admins[2]], 2);
    let err = admin
        .rotate_admins(
            signpost_record::sign_admin_set(&[&admin_key], &two_of_three),
            Vec::new(),
        )
        .await
        .expect_err("a rotation that would orphan bindings was applied");
    assert_eq!(reason(&err), "rotation_incomplete", "{err}");
    assert_eq!(
        search
            .resolve("search", false)
            .await
            .unwrap()
            .instances
            .len(),
        1,
        "the refused rotation changed nothing"
    );

    eprintln!("phase 3: genesis admin rotates to a 2-of-3 set, re-signing every binding");
    let rebinds = admin
        .rebinds_for(&two_of_three, &admins[0])
        .await
        .expect("bindings to re-sign");
    assert!(!rebinds.is_empty());
    admin
        .rotate_admins(
            signpost_record::sign_admin_set(&[&admin_key], &two_of_three),
            rebinds,
        )
        .await
        .expect("genesis admin (threshold 1) rotates");

    eprintln!("phase 4: resolve and list keep working across the rotation");
    let resolved = search
        .resolve("search", false)
        .await
        .expect("a re-signed binding verifies against admin set v2");
    assert_eq!(resolved.instances.len(), 1);
    let listed = search.list(false).await.unwrap();
    assert!(listed.unverified.is_empty(), "{:?}", listed.unverified);

    eprintln!("phase 5: one admin alone cannot replace the set; two can");
    let takeover = set(3, &[&admins[0]], 1);
    let err = admin
        .rotate_admins(
            signpost_record::sign_admin_set(&[&admins[0]], &takeover),
            Vec::new(),
        )
        .await
        .expect_err("one of a 2-of-3 set is not enough");
    assert_eq!(reason(&err), "threshold_not_met", "{err}");
    let rebinds = admin.rebinds_for(&takeover, &admins[0]).await.unwrap();
    assert!(
        rebinds.is_empty(),
        "admins[0] signed every binding and stays: nothing to re-sign"
    );
    admin
        .rotate_admins(
            signpost_record::sign_admin_set(&[&admins[0], &admins[2]], &takeover),
            rebinds,
        )
        .await
        .expect("two signatures meet the threshold");
    assert_eq!(
        search
            .resolve("search", false)
            .await
            .unwrap()
            .instances
            .len(),
        1
    );

    eprintln!("phase 6: retired keys can no longer bind; a current admin re-binds");
    let err = admin
        .bind(bind(&[&old]))
        .await
        .expect_err("genesis key is no longer an admin");
    assert_eq!(reason(&err), "not_admin", "{err}");
    let by_retired = signpost_tests::signed_binding(&admins[1], "search", &old, u64::MAX / 2);
    let err = admin
        .bind(by_retired)
        .await
        .expect_err("a key retired at v3 bound after the rotation");
    assert_eq!(reason(&err), "not_admin", "{err}");
    let rebind = signpost_tests::signed_binding(&admins[0], "search", &new, now_ms());
    admin.bind(rebind).await.expect("current admin re-binds");

    eprintln!("phase 7: clients verify the record through genesis -> v2 -> v3 -> binding");
    let resolved = search
        .resolve("search", false)
        .await
        .expect("chain verifies from genesis");
    assert_eq!(resolved.instances.len(), 1);
}

/// A Registry server run by an attacker who holds a node certificate: it serves `honest` with
/// the records replaced by a forged `payments` record signed by `forger` (if any), plus `extra`
/// records beside them.
#[derive(Clone)]
struct RogueRegistry {
    honest: ResolveResponse,
    forger: Option<SigningKey>,
    extra: Vec<Envelope>,
    /// What its Watch streams send (then it ends them); if empty, Watch is unimplemented.
    watch: Vec<WatchEvent>,
    /// If set, what Resolve serves from its second call on (a genuine but older answer).
    later: Option<ResolveResponse>,
    resolves: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// If set, Resolve answers this way instead, audit evidence included.
    tamper: Option<Tamper>,
}

impl RogueRegistry {
    /// A rogue that answers Resolve as `tamper` says (`honest` serves its other calls).
    fn tampering(honest: &ResolveResponse, tamper: Tamper) -> RogueRegistry {
        RogueRegistry {
            honest: honest.clone(),
            forger: None,
            extra: Vec::new(),
            watch: Vec::new(),
            later: None,
            resolves: Default::default(),
            tamper: Some(tamper),
        }
    }
}

type Upstream = signpost_proto::v1::registry_client::RegistryClient<tonic::transport::Channel>;

/// How a rogue node lies to a client that checks the audit log.
#[derive(Clone)]
enum Tamper {
    /// Forwards the client's request (its audit request included) to an honest node and adds a
    /// record nobody registered, signed with the service's stolen key, that it cannot prove.
    Unlogged {
        upstream: signpost_proto::v1::registry_client::RegistryClient<tonic::transport::Channel>,
        record: Envelope,
    },
    /// Serves this genuine answer, evidence and all, whatever is asked (an old checkpoint),
    /// after forwarding the first request to `first_honest` if set.
    Replay {
        first_honest:
            Option<signpost_proto::v1::registry_client::RegistryClient<tonic::transport::Channel>>,
        answer: ResolveResponse,
    },
    /// Serves this answer once (a tree of its own making), then is unavailable.
    Once(ResolveResponse),
    /// Forwards to an honest node and leaves the last instance out of the answer, with its
    /// proof: every record it serves is genuine and logged.
    Hide { upstream: Upstream },
    /// Forwards to an honest node and serves, instead of `instance`'s current record, its older
    /// `record`, whose genuine leaf `index` `audit` (an honest node) proves in the answer's
    /// tree: a frozen view made only of logged records.
    Freeze {
        upstream: Upstream,
        audit: signpost_proto::v1::audit_client::AuditClient<tonic::transport::Channel>,
        instance: String,
        record: Envelope,
        index: u64,
    },
    /// Denies the service exists: NOT_FOUND with these status details (a genuine proof of
    /// absence of another service, or nothing).
    Deny { details: Vec<u8> },
}

type Stream<T> = Pin<Box<dyn futures_core::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Registry for RogueRegistry {
    async fn register(
        &self,
        _: Request<RegisterRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        Ok(Response::new(WriteResponse { revision: 1 }))
    }
    async fn deregister(
        &self,
        _: Request<DeregisterRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        Ok(Response::new(WriteResponse { revision: 1 }))
    }
    async fn bind(&self, _: Request<BindRequest>) -> Result<Response<WriteResponse>, Status> {
        Ok(Response::new(WriteResponse { revision: 1 }))
    }
    async fn rotate_admins(
        &self,
        _: Request<RotateAdminsRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        Ok(Response::new(WriteResponse { revision: 1 }))
    }
    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let calls = self
            .resolves
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        match &self.tamper {
            None => {}
            Some(Tamper::Unlogged { upstream, record }) => {
                let mut answer = upstream
                    .clone()
                    .resolve(request.into_inner())
                    .await?
                    .into_inner();
                let service = answer.service.as_mut().unwrap();
                service.records.push(record.clone());
                service.inclusions.push(RecordInclusion::default());
                return Ok(Response::new(answer));
            }
            Some(Tamper::Replay {
                first_honest: Some(upstream),
                ..
            }) if calls == 0 => {
                return upstream.clone().resolve(request.into_inner()).await;
            }
            Some(Tamper::Replay { answer, .. }) => return Ok(Response::new(answer.clone())),
            Some(Tamper::Once(answer)) if calls == 0 => return Ok(Response::new(answer.clone())),
            Some(Tamper::Once(_)) => return Err(Status::unavailable("rogue went away")),
            Some(Tamper::Hide { upstream }) => {
                let mut answer = upstream
                    .clone()
                    .resolve(request.into_inner())
                    .await?
                    .into_inner();
                let service = answer.service.as_mut().unwrap();
                service.records.pop();
                service.inclusions.pop();
                return Ok(Response::new(answer));
            }
            Some(Tamper::Freeze {
                upstream,
                audit,
                instance,
                record,
                index,
            }) => {
                let mut answer = upstream
                    .clone()
                    .resolve(request.into_inner())
                    .await?
                    .into_inner();
                let tree_size = answer.audit.as_ref().unwrap().tree_size;
                let proof = audit
                    .clone()
                    .prove(AuditProveRequest {
                        index: *index,
                        tree_size,
                    })
                    .await?
                    .into_inner();
                let service = answer.service.as_mut().unwrap();
                let at = service
                    .records
                    .iter()
                    .position(|r| {
                        <RecordPayload as prost::Message>::decode(r.payload.as_slice())
                            .unwrap()
                            .instance
                            == *instance
                    })
                    .unwrap();
                service.records[at] = record.clone();
                service.inclusions[at] = RecordInclusion {
                    index: *index,
                    leaf: proof.leaf,
                    hashes: proof.hashes,
                };
                return Ok(Response::new(answer));
            }
            Some(Tamper::Deny { details }) => {
                return Err(Status::with_details(
                    tonic::Code::NotFound,
                    "not_found: service is not registered",
                    details.clone().into(),
                ))
            }
        }
        if let (Some(later), true) = (&self.later, calls > 0) {
            return Ok(Response::new(later.clone()));
        }
        let mut forged = self.honest.clone();
        let service = forged.service.as_mut().unwrap();
        if let Some(forger) = &self.forger {
            // Point payments at the attacker's box, signed with the attacker's key.
            service.records = vec![signed_record(forger, "payments", "p1", u64::MAX / 2, 31337)];
        }
        service.records.extend(self.extra.iter().cloned());
        Ok(Response::new(forged))
    }
    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        if self.watch.is_empty() {
            return Err(Status::unavailable("rogue"));
        }
        // A rogue that wants to serve watches answers the client's admin-chain refresh.
        Ok(Response::new(ListResponse {
            admin_chain: self.honest.admin_chain.clone(),
            revision: self.honest.revision,
            ..Default::default()
        }))
    }
    type KeepAliveStream = Stream<KeepAliveResponse>;
    async fn keep_alive(
        &self,
        _: Request<Streaming<KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        Err(Status::unimplemented("rogue"))
    }
    type WatchStream = Stream<WatchEvent>;
    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        if self.watch.is_empty() {
            return Err(Status::unimplemented("rogue"));
        }
        let events: Vec<Result<WatchEvent, Status>> = self.watch.iter().cloned().map(Ok).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }
}

fn server_tls(
    cluster: &TestCluster,
    prefix: &std::path::Path,
) -> std::sync::Arc<rustls::ServerConfig> {
    let files = TlsFiles {
        ca: cluster.ca_dir().join("ca.crt"),
        cert: prefix.with_extension("crt"),
        key: prefix.with_extension("key"),
        crl: None,
    };
    let trust = Trust::from_files(&files).unwrap();
    signpost_identity::server_config(&files, &trust, &TlsSettings::default()).unwrap()
}

/// Serves `rogue` over mutual TLS with the certificate at `cert_prefix`, on a free loopback
/// port; returns its address.
async fn serve_rogue(
    cluster: &TestCluster,
    cert_prefix: &std::path::Path,
    rogue: RogueRegistry,
) -> std::net::SocketAddr {
    let incoming = TlsIncoming::bind(
        "127.0.0.1:0",
        server_tls(cluster, cert_prefix),
        &TlsSettings::default(),
    )
    .await
    .unwrap();
    let addr = incoming.local_addr();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistryServer::new(rogue))
            .serve_with_incoming(incoming),
    );
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_node_cannot_make_a_client_accept_a_forged_record() {
    let cluster = TestCluster::start(ClusterOptions::default());
    cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let payments = cluster.client_as(&cluster.issue("service", "payments"), &[]);
    payments
        .register(signed_record(&key, "payments", "p1", 1, 443))
        .await
        .unwrap();
    let honest = cluster.client(&[]);

    eprintln!("phase 1: start a rogue Registry server with a stolen node certificate");
    let raw = signpost_tests::raw_resolve(&cluster, "payments").await;
    let stolen = cluster.issue("node", "66");
    let rogue = RogueRegistry {
        honest: raw,
        forger: Some(signpost_record::generate_signing_key()),
        extra: Vec::new(),
        watch: Vec::new(),
        later: None,
        resolves: Default::default(),
        tamper: None,
    };
    let rogue_addr = serve_rogue(&cluster, &stolen, rogue).await.to_string();

    eprintln!("phase 2: a client that only knows the rogue node gets no record at all");
    let mut config = ClientConfig::load(&cluster.client_toml()).unwrap();
    config.endpoints = vec![rogue_addr.clone()];
    let only_rogue = Client::connect(&config).unwrap();
    let err = only_rogue
        .resolve("payments", true)
        .await
        .expect_err("forged record accepted");
    assert!(
        matches!(err, signpost_client::ClientError::Verification(_)),
        "{err}"
    );

    eprintln!("phase 3: a client that tries the rogue first falls back to an honest node");
    config.endpoints = vec![rogue_addr, cluster.client_addr(1), cluster.client_addr(2)];
    let mixed = Client::connect(&config).unwrap();
    let resolved = mixed
        .resolve("payments", true)
        .await
        .expect("honest answer");
    assert_eq!(resolved.instances[0].payload.endpoints[0].port, 443);
    let honest_view = honest.resolve("payments", false).await.unwrap();
    assert_eq!(honest_view.instances[0].payload.endpoints[0].port, 443);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_certificates_fail_the_handshake_after_the_crl_reload_without_restart() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let reader_prefix = cluster.issue("reader", "temp");
    let member = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let node_prefix = cluster.issue("node", &member.to_string());

    eprintln!("phase 1: both certificates work before revocation");
    cluster
        .client_as(&reader_prefix, &[leader])
        .list(true)
        .await
        .expect("reader lists");
    // A second certificate for a member id, used from that member's address: it reaches the
    // Raft service until revoked (revocation is by serial, so the real member is unaffected).
    let raft = |prefix: std::path::PathBuf| {
        signpost_tests::raw_raft(&cluster, &prefix, leader, cluster.node_ip(member))
    };
    let status = raft(node_prefix.clone())
        .vote(RaftMessage { data: vec![1] })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "a member certificate should reach Raft: {status}"
    );

    eprintln!("phase 2: revoke both with the CLI; the nodes reload the CRL by themselves");
    let ca = cluster.ca_dir();
    for prefix in [&reader_prefix, &node_prefix] {
        signpost_tests::cli_ok(
            &[
                "ca",
                "revoke",
                "--ca-dir",
                ca.to_str().unwrap(),
                prefix.with_extension("crt").to_str().unwrap(),
            ],
            &[],
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // A new client each time: revocation applies to new handshakes.
        let reader_refused = cluster
            .client_as(&reader_prefix, &[leader])
            .list(true)
            .await
            .is_err();
        let node_status = raft(node_prefix.clone())
            .vote(RaftMessage { data: vec![1] })
            .await
            .unwrap_err();
        let node_refused = node_status.code() != tonic::Code::InvalidArgument;
        if reader_refused && node_refused {
            break;
        }
        assert!(Instant::now() < deadline, "revocation not enforced (reader refused: {reader_refused}, node refused: {node_refused})");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    eprintln!("phase 3: other identities are unaffected and the cluster kept its leader");
    cluster
        .client(&[leader])
        .list(true)
        .await
        .expect("admin still lists");
    assert_eq!(cluster.agreed_leader().await, Some(leader));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_connector_refuses_an_endpoint_whose_certificate_does_not_match_the_record() {
    let cluster = TestCluster::start(ClusterOptions::default());
    cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let payments = cluster.client_as(&cluster.issue("service", "payments"), &[]);

    eprintln!("phase 1: an instance endpoint serving with the billing certificate");
    let ca = Ca::load(&cluster.ca_dir()).unwrap();
    let billing = cluster.root().join("billing-server");
    ca.issue(
        &Identity::Service("billing".into()),
        &IssueOptions::default(),
        &billing,
    )
    .unwrap();
    let rogue = RogueRegistry {
        honest: ResolveResponse::default(),
        forger: Some(signpost_record::generate_signing_key()),
        extra: Vec::new(),
        watch: Vec::new(),
        later: None,
        resolves: Default::default(),
        tamper: None,
    };
    let port = serve_rogue(&cluster, &billing, rogue).await.port();

    eprintln!("phase 2: the payments record points at it, naming the payments identity");
    payments
        .register(signed_record(&key, "payments", "p1", 1, port as u32))
        .await
        .unwrap();
    let mut record = payments
        .resolve("payments", false)
        .await
        .unwrap()
        .instances
        .remove(0);
    record.payload.endpoints[0].host = "127.0.0.1".into();
    assert_eq!(
        record.payload.tls_identity,
        format!("spiffe://{TRUST_DOMAIN}/service/payments")
    );
    let channel = payments.connect_instance(&record).unwrap();
    let err = signpost_proto::v1::registry_client::RegistryClient::new(channel)
        .list(ListRequest {
            stale: true,
            ..Default::default()
        })
        .await
        .expect_err("the connector must refuse a certificate other than the record's identity");
    eprintln!("refused: {err}");

    eprintln!("phase 3: the same endpoint is accepted when the record names billing (the control)");
    record.payload.tls_identity = format!("spiffe://{TRUST_DOMAIN}/service/billing");
    let channel = payments.connect_instance(&record).unwrap();
    let status = signpost_proto::v1::registry_client::RegistryClient::new(channel)
        .list(ListRequest {
            stale: true,
            ..Default::default()
        })
        .await
        .expect_err("the stub answers list with UNAVAILABLE");
    assert_eq!(
        status.message(),
        "rogue",
        "handshake should have succeeded: {status}"
    );
}

/// An InstallSnapshot stream as a member would send it: header (vote, meta, size), then data.
async fn send_snapshot(
    cluster: &TestCluster,
    as_member: u64,
    target: u64,
    term: u64,
    body: Vec<u8>,
) -> Result<(), Status> {
    use openraft::{CommittedLeaderId, LogId, SnapshotMeta, StoredMembership, Vote};
    use signpost_consensus::codec;
    let cert = cluster.issue("node", &as_member.to_string());
    let vote = Vote::new_committed(term, as_member);
    let meta: SnapshotMeta<u64, signpost_consensus::NodeAddr> = SnapshotMeta {
        last_log_id: Some(LogId::new(CommittedLeaderId::new(term, as_member), 1_000)),
        last_membership: StoredMembership::default(),
        snapshot_id: "forged".into(),
    };
    let header = SnapshotHeader {
        vote: codec::encode(&vote, codec::RAFT_MESSAGE_BYTES_MAX).unwrap(),
        meta: codec::encode(&meta, codec::RAFT_MESSAGE_BYTES_MAX).unwrap(),
        total_bytes: body.len() as u64,
    };
    let chunks = vec![
        SnapshotChunk {
            chunk: Some(snapshot_chunk::Chunk::Header(header)),
        },
        SnapshotChunk {
            chunk: Some(snapshot_chunk::Chunk::Data(body)),
        },
    ];
    signpost_tests::raw_raft(cluster, &cert, target, cluster.node_ip(as_member))
        .install_snapshot(tokio_stream::iter(chunks))
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_does_not_load_or_is_of_another_cluster_is_refused_and_the_node_serves_on()
{
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let others: Vec<u64> = cluster.others(leader);
    let (liar, target) = (others[0], others[1]);
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let payments = cluster.client_as(&cluster.issue("service", "payments"), &[]);
    payments
        .register(signed_record(&key, "payments", "p1", now_ms(), 443))
        .await
        .unwrap();
    let term = cluster.status_of(target).await.unwrap().term;

    eprintln!("attack 1: a member sends a 13-byte garbage snapshot with a higher vote");
    let status = send_snapshot(&cluster, liar, target, term + 1, vec![0x5a; 13])
        .await
        .expect_err("garbage must be refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert!(status.message().contains("refused snapshot"), "{status}");

    eprintln!("attack 2: a self-consistent registry of another genesis");
    let mut forged = signpost_state::Registry::new();
    let rogue_admin = signpost_record::generate_signing_key();
    forged.apply(
        1,
        &signpost_state::Request {
            time_ms: now_ms(),
            caller: String::new(),
            command: signpost_state::Command::Genesis {
                admin_keys: vec![rogue_admin.verifying_key().to_bytes()],
                admin_threshold: 1,
                quotas: signpost_state::Quotas {
                    instances_per_service_max: 10,
                    services_max: 10,
                    state_bytes_max: 1 << 20,
                },
            },
        },
    );
    let body = signpost_consensus::codec::encode(
        // Snapshot format 2: the registry's pairs, then the audit tree's frontier.
        &(
            2u8,
            forged.export(),
            signpost_audit::Frontier::new().encode(),
        ),
        signpost_consensus::codec::SNAPSHOT_BYTES_MAX,
    )
    .unwrap();
    let status = send_snapshot(&cluster, liar, target, term + 1, body)
        .await
        .expect_err("another cluster's registry must be refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert!(status.message().contains("genesis"), "{status}");

    eprintln!("the target kept its term and state, and the cluster keeps working");
    let after = cluster
        .status_of(target)
        .await
        .expect("the target still runs");
    assert_eq!(
        after.term, term,
        "the refused snapshot's vote was never seen"
    );
    payments
        .register(signed_record(&key, "payments", "p2", now_ms(), 443))
        .await
        .expect("writes go on");
    let resolved = cluster
        .client(&[target])
        .resolve("payments", false)
        .await
        .unwrap();
    assert_eq!(resolved.instances.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_node_cannot_roll_a_client_back_to_a_rotated_out_admin_set_or_key() {
    let cluster = TestCluster::start(ClusterOptions::default());
    cluster.wait_ready(READY).await;
    let old_key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let payments = cluster.client_as(&cluster.issue("service", "payments"), &[]);
    payments
        .register(signed_record(&old_key, "payments", "p1", 1, 443))
        .await
        .unwrap();

    eprintln!("phase 1: keep an old, genuine answer: genesis admin set, binding of the old key");
    let old_answer = signpost_tests::raw_resolve(&cluster, "payments").await;

    eprintln!("phase 2: rotate the admin set to v2 and re-bind payments to a new key");
    let genesis_admin =
        signpost_record::read_signing_key(&cluster.root().join("admin.key")).unwrap();
    let new_admin = signpost_record::generate_signing_key();
    let admin = cluster.client(&[]);
    let v2 = AdminSetPayload {
        public_keys: vec![new_admin.verifying_key().to_bytes().to_vec()],
        threshold: 1,
        version: 2,
        issued_at_ms: now_ms(),
    };
    let rebinds = admin.rebinds_for(&v2, &new_admin).await.unwrap();
    admin
        .rotate_admins(
            signpost_record::sign_admin_set(&[&genesis_admin], &v2),
            rebinds,
        )
        .await
        .unwrap();
    let new_key = signpost_record::generate_signing_key();
    admin
        .bind(signpost_tests::signed_binding(
            &new_admin,
            "payments",
            &new_key,
            now_ms(),
        ))
        .await
        .unwrap();
    payments
        .register(signed_record(&new_key, "payments", "p1", 2, 443))
        .await
        .unwrap();

    eprintln!("phase 3: a client verifies the current answer and saves its version floors");
    let state = cluster.root().join("client-state.json");
    let mut config = ClientConfig::load(&cluster.client_toml()).unwrap();
    config.state_file = Some(state.clone());
    let honest = Client::connect(&config).unwrap();
    assert_eq!(
        honest.resolve("payments", false).await.unwrap().instances[0]
            .payload
            .endpoints[0]
            .port,
        443
    );
    assert!(state.exists(), "floors saved");

    eprintln!(
        "phase 4: a rogue node serves the old set and binding, with a record signed by the old key"
    );
    let stolen = cluster.issue("node", "66");
    let rogue = RogueRegistry {
        honest: old_answer,
        forger: Some(old_key.clone()),
        extra: Vec::new(),
        watch: Vec::new(),
        later: None,
        resolves: Default::default(),
        tamper: None,
    };
    let rogue_addr = serve_rogue(&cluster, &stolen, rogue).await.to_string();

    eprintln!("phase 5: a restarted client with the saved floors refuses it and falls back");
    config.endpoints = vec![rogue_addr.clone()];
    let err = Client::connect(&config)
        .unwrap()
        .resolve("payments", true)
        .await
        .expect_err("a rolled-back answer was accepted");
    assert!(err.to_string().contains("rollback"), "{err}");
    config.endpoints = vec![
        rogue_addr.clone(),
        cluster.client_addr(1),
        cluster.client_addr(2),
    ];
    let resolved = Client::connect(&config)
        .unwrap()
        .resolve("payments", true)
        .await
        .expect("an honest node answers");
    assert_eq!(resolved.instances[0].payload.endpoints[0].port, 443);

    eprintln!("phase 6: a fresh client with min_admin_version = 2 refuses it too");
    let mut fresh = ClientConfig::load(&cluster.client_toml()).unwrap();
    fresh.endpoints = vec![rogue_addr];
    fresh.trust.min_admin_version = 2;
    let err = Client::connect(&fresh)
        .unwrap()
        .resolve("payments", true)
        .await
        .expect_err("the old admin set was accepted");
    assert!(err.to_string().contains("rollback"), "{err}");

    eprintln!(
        "phase 7: the current chain with a binding the retired admin signed after the rotation is refused"
    );
    let mut current = signpost_tests::raw_resolve(&cluster, "payments").await;
    current.service.as_mut().unwrap().binding = Some(signpost_tests::signed_binding(
        &genesis_admin,
        "payments",
        &old_key,
        u64::MAX / 2,
    ));
    let rogue = RogueRegistry {
        honest: current,
        forger: Some(old_key.clone()),
        extra: Vec::new(),
        watch: Vec::new(),
        later: None,
        resolves: Default::default(),
        tamper: None,
    };
    let stolen = cluster.issue("node", "67");
    let rogue_addr = serve_rogue(&cluster, &stolen, rogue).await.to_string();
    let mut fresh = ClientConfig::load(&cluster.client_toml()).unwrap();
    fresh.endpoints = vec![rogue_addr];
    let err = Client::connect(&fresh)
        .unwrap()
        .resolve("payments", true)
        .await
        .expect_err("a binding by a retired admin was accepted");
    assert!(err.to_string().contains("not in admin set"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_keys_and_stale_sequences_are_refused_before_the_log() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let payments = cluster.client_as(&cluster.issue("service", "payments"), &[leader]);
    payments
        .register(signed_record(&key, "payments", "p1", 10, 443))
        .await
        .unwrap();
    let commit = cluster.status_of(leader).await.unwrap().commit_index;

    eprintln!("attack 1: registrations signed by a key the admins never bound");
    let stranger = signpost_record::generate_signing_key();
    for i in 0..10 {
        let err = payments
            .register(signed_record(
                &stranger,
                "payments",
                &format!("x{i}"),
                1,
                6666,
            ))
            .await
            .expect_err("an unbound key must be refused");
        assert_eq!(reason(&err), "unbound_key", "{err}");
    }

    eprintln!("attack 2: replays below the stored sequence");
    for sequence in 1..=10 {
        let err = payments
            .register(signed_record(&key, "payments", "p1", sequence, 6666))
            .await
            .expect_err("a stale sequence must be refused");
        assert_eq!(reason(&err), "stale_sequence", "{err}");
    }

    eprintln!("none of them reached the log");
    assert_eq!(
        cluster.status_of(leader).await.unwrap().commit_index,
        commit
    );
    payments
        .register(signed_record(&key, "payments", "p1", 11, 443))
        .await
        .expect("the next sequence is accepted");
    assert!(cluster.status_of(leader).await.unwrap().commit_index > commit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_keeps_one_record_per_instance_the_newest_whatever_a_node_serves() {
    let cluster = TestCluster::start(ClusterOptions::default());
    cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let payments = cluster.client_as(&cluster.issue("service", "payments"), &[]);
    let old = signed_record(&key, "payments", "p1", 1, 443);
    payments.register(old.clone()).await.unwrap();
    payments
        .register(signed_record(&key, "payments", "p1", 2, 444))
        .await
        .unwrap();

    eprintln!("phase 1: a rogue node serves the current record and, beside it, the superseded one");
    let current = signpost_tests::raw_resolve(&cluster, "payments").await;
    let rogue = RogueRegistry {
        honest: current,
        forger: None,
        extra: vec![old],
        watch: Vec::new(),
        later: None,
        resolves: Default::default(),
        tamper: None,
    };
    let rogue_addr = serve_rogue(&cluster, &cluster.issue("node", "66"), rogue)
        .await
        .to_string();

    eprintln!("phase 2: the client keeps one record for p1, the one with the higher sequence");
    let mut config = ClientConfig::load(&cluster.client_toml()).unwrap();
    config.endpoints = vec![rogue_addr];
    let resolved = Client::connect(&config)
        .unwrap()
        .resolve("payments", true)
        .await
        .expect("both records verify");
    assert_eq!(resolved.instances.len(), 1, "{:?}", resolved.instances);
    assert_eq!(resolved.instances[0].payload.sequence, 2);
    assert_eq!(resolved.envelopes.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_node_cannot_make_a_watcher_skip_forge_or_stall() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("feed")).unwrap();
    let writer = cluster.client_as(&cluster.issue("service", "feed"), &[leader]);
    let first = writer
        .register(signed_record(&key, "feed", "f1", 1, 443))
        .await
        .unwrap();
    let second = writer
        .register(signed_record(&key, "feed", "f2", 1, 443))
        .await
        .unwrap();

    eprintln!("phase 1: a genuine event, as an honest node serves it");
    let mut honest_stream =
        signpost_tests::raw_registry(&cluster, &cluster.root().join("admin-cert"), leader)
            .watch(WatchRequest {
                service: "feed".into(),
                prefix: false,
                from_revision: first,
                audit: None,
            })
            .await
            .unwrap()
            .into_inner();
    let start = honest_stream.message().await.unwrap().unwrap();
    assert_eq!(start.kind, watch_event::Kind::Start as i32);
    assert_eq!(start.revision, first, "the stream names where it starts");
    let genuine = honest_stream.message().await.unwrap().unwrap();
    assert_eq!(genuine.revision, first);
    assert!(
        genuine.binding.is_some(),
        "puts carry the binding they were verified against"
    );
    let chain = signpost_tests::raw_resolve(&cluster, "feed").await;
    let start_at = |revision: u64, applied: u64| WatchEvent {
        revision,
        kind: watch_event::Kind::Start as i32,
        applied_revision: applied,
        ..Default::default()
    };
    let mut forged = genuine.clone();
    forged.record = Some(signed_record(
        &signpost_record::generate_signing_key(),
        "feed",
        "f1",
        9,
        6666,
    ));
    let lies: Vec<(&str, Vec<WatchEvent>)> = vec![
        (
            "an event beyond the node's applied revision (u64::MAX)",
            vec![
                start_at(first, second),
                WatchEvent {
                    revision: u64::MAX,
                    applied_revision: second,
                    ..genuine.clone()
                },
            ],
        ),
        ("a stream without its start revision", vec![genuine.clone()]),
        (
            "a start other than the one asked for",
            vec![start_at(first + 1, second), genuine.clone()],
        ),
        (
            "a put signed by a key the binding does not hold",
            vec![start_at(first, second), forged],
        ),
    ];
    for (index, (lie, events)) in lies.into_iter().enumerate() {
        eprintln!("phase {}: a rogue serves {lie}", index + 2);
        let rogue = RogueRegistry {
            honest: chain.clone(),
            forger: None,
            extra: Vec::new(),
            watch: events,
            later: None,
            resolves: Default::default(),
            tamper: None,
        };
        let stolen = cluster.issue("node", &format!("{}", 70 + index));
        let rogue_addr = serve_rogue(&cluster, &stolen, rogue).await.to_string();
        let mut config = ClientConfig::load(&cluster.client_toml()).unwrap();
        config.endpoints = vec![rogue_addr, cluster.client_addr(leader)];
        let client = Client::connect(&config).unwrap();
        let mut watcher = client.watch("feed", false, first);
        let mut seen = Vec::new();
        for _ in 0..2 {
            let change = tokio::time::timeout(Duration::from_secs(20), watcher.next())
                .await
                .unwrap_or_else(|_| panic!("{lie}: the watcher stalled"))
                .unwrap_or_else(|e| panic!("{lie}: {e}"));
            seen.push((change.revision, change.instance));
        }
        assert_eq!(
            seen,
            [(first, "f1".to_string()), (second, "f2".to_string())],
            "{lie}: the honest history, whole and in order"
        );
    }

    eprintln!("phase 6: two changes of one instance in one revision (a batched entry) both arrive");
    // Found by the Jepsen test: the watcher told events apart by (revision, instance) and
    // dropped the second change of an instance that one batched entry held.
    let mut again = genuine.clone();
    again.record = Some(signed_record(&key, "feed", "f1", 2, 444));
    again.position = 1;
    let rogue = RogueRegistry {
        honest: chain.clone(),
        forger: None,
        extra: Vec::new(),
        watch: vec![start_at(first, second), genuine.clone(), again],
        later: None,
        resolves: Default::default(),
        tamper: None,
    };
    let stolen = cluster.issue("node", "79");
    let rogue_addr = serve_rogue(&cluster, &stolen, rogue).await.to_string();
    let mut config = ClientConfig::load(&cluster.client_toml()).unwrap();
    config.endpoints = vec![rogue_addr, cluster.client_addr(leader)];
    let client = Client::connect(&config).unwrap();
    let mut watcher = client.watch("feed", false, first);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let change = tokio::time::timeout(Duration::from_secs(20), watcher.next())
            .await
            .expect("the watcher stalled")
            .unwrap();
        let sequence = signpost_record::open_record(change.record.as_ref().unwrap())
            .unwrap()
            .payload
            .sequence;
        seen.push((change.revision, change.position, change.instance, sequence));
    }
    assert_eq!(
        seen,
        [
            (first, 0, "f1".to_string(), 1),
            (first, 1, "f1".to_string(), 2),
            (second, 0, "f2".to_string(), 1)
        ],
        "both changes of f1, then the honest node's next revision, nothing twice"
    );

    eprintln!("phase 7: an honest node refuses a start beyond what it has applied");
    let status = signpost_tests::raw_registry(&cluster, &cluster.root().join("admin-cert"), leader)
        .watch(WatchRequest {
            service: "feed".into(),
            prefix: false,
            from_revision: u64::MAX,
            audit: None,
        })
        .await
        .expect_err("a future revision is not waited for");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status}");
    assert_eq!(
        status.metadata().get("signpost-reason").unwrap(),
        "future_revision"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_stored_genesis_is_not_its_configured_one_refuses_to_start() {
    let mut cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let follower = cluster.others(leader)[0];
    // The genesis entry is applied everywhere once a write has been.
    cluster.bind_new_key("payments");

    eprintln!("phase 1: node {follower} restarts with another [bootstrap] admin key");
    cluster.kill9(follower);
    let config = cluster
        .root()
        .join(format!("node{follower}"))
        .join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let other: String = signpost_record::generate_signing_key()
        .verifying_key()
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let line = text
        .lines()
        .find(|l| l.starts_with("admin_keys"))
        .unwrap()
        .to_string();
    std::fs::write(
        &config,
        text.replace(&line, &format!("admin_keys = [\"{other}\"]")),
    )
    .unwrap();
    cluster.restart(follower);

    eprintln!("phase 2: it refuses to start, naming the mismatch");
    let status = cluster.wait_exit(follower, Duration::from_secs(30));
    assert!(!status.success(), "a node of another genesis started");
    let log = std::fs::read_to_string(
        cluster
            .root()
            .join(format!("node{follower}"))
            .join("server.log"),
    )
    .unwrap();
    assert!(log.contains("another genesis admin set"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refuses_a_linearizable_answer_older_than_one_it_has_seen() {
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    let payments = cluster.client_as(&cluster.issue("service", "payments"), &[leader]);
    payments
        .register(signed_record(&key, "payments", "p1", 1, 443))
        .await
        .unwrap();
    let old = signpost_tests::raw_resolve(&cluster, "payments").await;
    payments
        .register(signed_record(&key, "payments", "p2", 1, 443))
        .await
        .unwrap();
    let current = signpost_tests::raw_resolve(&cluster, "payments").await;
    let old_revision = old.revision;
    assert!(old_revision < current.revision);

    eprintln!("phase 1: a rogue serves the current answer, then a genuine but older one");
    let rogue = RogueRegistry {
        honest: current.clone(),
        forger: None,
        extra: Vec::new(),
        watch: Vec::new(),
        later: Some(old),
        resolves: Default::default(),
        tamper: None,
    };
    let rogue_addr = serve_rogue(&cluster, &cluster.issue("node", "68"), rogue)
        .await
        .to_string();
    let mut config = ClientConfig::load(&cluster.client_toml()).unwrap();
    config.endpoints = vec![rogue_addr, cluster.client_addr(leader)];
    let client = Client::connect(&config).unwrap();
    let first = client.resolve("payments", false).await.unwrap();
    assert_eq!(first.revision, current.revision);
    assert_eq!(first.instances.len(), 2);
    assert!(client.revision_floor() >= current.revision);

    eprintln!("phase 2: the older answer is refused and an honest node answers instead");
    let second = client.resolve("payments", false).await.unwrap();
    assert!(second.revision >= current.revision, "{}", second.revision);
    assert_eq!(
        second.instances.len(),
        2,
        "the rolled-back view was accepted"
    );

    eprintln!("phase 3: a stale read may lag (it says so by its revision) and is not refused");
    let only_rogue = {
        let mut c = config.clone();
        c.endpoints.truncate(1);
        Client::connect(&c).unwrap()
    };
    let stale = only_rogue.resolve("payments", true).await.unwrap();
    assert_eq!(stale.revision, old_revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_is_taken_only_from_members_and_only_for_signed_commands() {
    use signpost_consensus::codec;
    use signpost_consensus::forward::{ForwardAnswer, ForwardRequest, Refusal};
    use signpost_state::{Command, Request as LogRequest};

    let decode = |message: RaftMessage| -> ForwardAnswer {
        codec::decode(&message.data, codec::RAFT_MESSAGE_BYTES_MAX).expect("a forward answer")
    };
    let forward = |request: &ForwardRequest| RaftMessage {
        data: codec::encode(request, codec::RAFT_MESSAGE_BYTES_MAX).unwrap(),
    };
    let as_admin = |command: Command| {
        ForwardRequest::Propose(LogRequest {
            time_ms: 0,
            caller: format!("spiffe://{TRUST_DOMAIN}/admin/ops"),
            command,
        })
    };

    eprintln!("phase 1: a cluster, and a second certificate of a member used from its address");
    let cluster = TestCluster::start(ClusterOptions::default());
    let leader = cluster.wait_ready(READY).await;
    let member = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("payments")).unwrap();
    cluster
        .client_as(&cluster.issue("service", "payments"), &[leader])
        .register(signed_record(&key, "payments", "p1", 1, 9000))
        .await
        .unwrap();
    let rogue = cluster.issue("node", &member.to_string());
    let mut raft = signpost_tests::raw_raft(&cluster, &rogue, leader, cluster.node_ip(member));

    eprintln!("phase 2: an unsigned expiry, a batch or a no-op is refused, and nothing changes");
    for command in [
        Command::Expire {
            service: "payments".into(),
            instance: "p1".into(),
            sequence: 1,
        },
        Command::Batch { requests: vec![] },
        Command::Noop,
    ] {
        let answer = decode(
            raft.forward(forward(&as_admin(command.clone())))
                .await
                .expect("a member reaches the desk")
                .into_inner(),
        );
        assert!(
            matches!(answer, ForwardAnswer::Refused(Refusal::Invalid(_))),
            "{command:?} must not be forwarded: {answer:?}"
        );
    }
    let resolved = cluster
        .client(&[leader])
        .resolve("payments", false)
        .await
        .unwrap();
    assert_eq!(resolved.instances.len(), 1, "the instance was not expired");

    eprintln!(
        "phase 3: a signed command with a broken signature is proposed, and apply refuses it"
    );
    let mut forged = signed_record(&key, "payments", "p1", 2, 6666);
    forged.signature[0] ^= 1;
    let answer = decode(
        raft.forward(forward(&as_admin(Command::Register {
            envelope: prost::Message::encode_to_vec(&forged),
        })))
        .await
        .unwrap()
        .into_inner(),
    );
    assert!(
        matches!(
            &answer,
            ForwardAnswer::Proposed {
                outcome: signpost_state::Outcome::Rejected { reason, .. },
                ..
            } if *reason == signpost_record::Reason::BadSignature
        ),
        "apply verifies a forwarded record: {answer:?}"
    );
    let resolved = cluster
        .client(&[leader])
        .resolve("payments", false)
        .await
        .unwrap();
    assert_eq!(resolved.instances[0].payload.endpoints[0].port, 9000);

    eprintln!("phase 4: a node certificate of the CA for a non-member id is refused");
    let stranger = cluster.issue("node", "9");
    let status = signpost_tests::raw_raft(&cluster, &stranger, leader, cluster.node_ip(member))
        .forward(forward(&ForwardRequest::ReadIndex))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
}

/// A raw Resolve of `service` by the admin from node `id`, asking for audit evidence from
/// scratch (as a fresh client does).
async fn resolve_with_evidence(cluster: &TestCluster, id: u64, service: &str) -> ResolveResponse {
    signpost_tests::raw_registry(cluster, &cluster.root().join("admin-cert"), id)
        .resolve(ResolveRequest {
            service: service.into(),
            stale: true,
            audit: Some(AuditEvidenceRequest {
                prove: true,
                ..Default::default()
            }),
        })
        .await
        .expect("raw resolve with evidence")
        .into_inner()
}

/// Waits until node `id` answers for `service` with a quorum-signed checkpoint that covers its
/// whole tree; returns that answer.
async fn covered_answer(cluster: &TestCluster, id: u64, service: &str) -> ResolveResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = resolve_with_evidence(cluster, id, service).await;
        let evidence = answer.audit.clone().expect("evidence was asked for");
        if !evidence.checkpoint.is_empty() {
            let text = String::from_utf8_lossy(&evidence.checkpoint).to_string();
            let size: u64 = text.lines().nth(1).unwrap().parse().unwrap();
            if size == evidence.tree_size {
                return answer;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {id} never served a checkpoint covering its tree"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Every audit record node `id` stores, in order (the test cluster never prunes).
async fn all_leaves(cluster: &TestCluster, id: u64) -> Vec<Vec<u8>> {
    let channel = signpost_tests::raw_channel(
        cluster,
        &cluster.root().join("admin-cert"),
        &cluster.client_addr(id),
        None,
    );
    let mut audit = signpost_proto::v1::audit_client::AuditClient::new(channel);
    let mut leaves = Vec::new();
    loop {
        let page = audit
            .records(AuditRecordsRequest {
                from_index: leaves.len() as u64,
                limit: 1000,
            })
            .await
            .unwrap()
            .into_inner();
        if page.leaves.is_empty() {
            return leaves;
        }
        leaves.extend(page.leaves.into_iter().map(|l| l.leaf));
    }
}

/// An audit tree in memory: what a rogue computes to serve a history of its own.
#[derive(Default)]
struct ForgedTree {
    frontier: signpost_audit::Frontier,
    nodes: std::collections::HashMap<(u8, u64), signpost_audit::Hash>,
}

impl signpost_audit::NodeSource for ForgedTree {
    fn node(
        &self,
        level: u8,
        index: u64,
    ) -> Result<signpost_audit::Hash, signpost_audit::AuditError> {
        self.nodes
            .get(&(level, index))
            .copied()
            .ok_or(signpost_audit::AuditError::Missing { level, index })
    }
}

impl ForgedTree {
    fn append(&mut self, leaf: &[u8]) {
        for node in self.frontier.append(signpost_audit::leaf_hash(leaf)) {
            self.nodes.insert((node.level, node.index), node.hash);
        }
    }
}

fn hex_hashes(proof: Vec<signpost_audit::Hash>) -> Vec<Vec<u8>> {
    proof.into_iter().map(|h| h.to_vec()).collect()
}

/// Resolves payments from `rogue` alone, which `config`'s client must refuse with a message
/// holding `refusal` (a verification failure, never NOT_FOUND), then from it and node 2, which
/// must answer; returns that answer.
async fn refused_then_answered(
    cluster: &TestCluster,
    mut config: ClientConfig,
    rogue: &str,
    refusal: &str,
) -> signpost_client::Resolved {
    config.endpoints = vec![rogue.to_owned()];
    let err = Client::connect(&config)
        .unwrap()
        .resolve("payments", true)
        .await
        .expect_err("the rogue's answer was accepted");
    assert_ne!(err.code(), Some(tonic::Code::NotFound), "{err}");
    assert!(err.to_string().contains(refusal), "{err}");
    config.endpoints = vec![rogue.to_owned(), cluster.client_addr(2)];
    Client::connect(&config)
        .unwrap()
        .resolve("payments", true)
        .await
        .expect("an honest node answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_checks_answers_against_quorum_checkpoints_and_catches_a_node_that_lies_about_the_log(
) {
    let cluster = TestCluster::start(ClusterOptions::default());
    cluster.wait_ready(READY).await;
    let key_path = cluster.bind_new_key("payments");
    let key = signpost_record::read_signing_key(&key_path).unwrap();
    let payments = cluster.client_as(&cluster.issue("service", "payments"), &[]);
    payments
        .register(signed_record(&key, "payments", "p1", 1, 443))
        .await
        .unwrap();

    eprintln!("phase 1: before checkpoint keys are bound, answers carry no checkpoint and a client accepts them");
    let bare = resolve_with_evidence(&cluster, 1, "payments").await;
    assert!(bare.audit.as_ref().unwrap().checkpoint.is_empty());
    let honest = cluster.client(&[]);
    honest.resolve("payments", false).await.unwrap();
    assert_eq!(honest.audit_checkpoint(), None);
    let mut strict_config = cluster.client_config(None, &[]);
    strict_config.audit.require_checkpoint = true;
    let strict = Client::connect(&strict_config).unwrap();
    let refused = strict.resolve("payments", true).await.unwrap_err();
    assert!(
        refused.to_string().contains("no quorum-signed checkpoint"),
        "{refused}"
    );

    eprintln!("phase 2: keys bound; every node proves its answers from a quorum checkpoint");
    cluster.bind_checkpoint_keys(&cluster.ids());
    let genuine = covered_answer(&cluster, 1, "payments").await;
    let evidence = genuine.audit.clone().unwrap();
    let service = genuine.service.clone().unwrap();
    assert_eq!(service.inclusions.len(), 1);
    assert!(!service.inclusions[0].leaf.is_empty());
    for id in cluster.ids() {
        covered_answer(&cluster, id, "payments").await;
        let mut only = cluster.client_config(None, &[id]);
        only.audit.require_checkpoint = true;
        let client = Client::connect(&only).unwrap();
        let resolved = client.resolve("payments", true).await.unwrap();
        assert_eq!(resolved.instances[0].payload.endpoints[0].port, 443);
        let (size, _) = client
            .audit_checkpoint()
            .expect("a checkpoint was verified");
        assert!(size >= evidence.tree_size, "node {id}: {size}");
    }

    eprintln!(
        "phase 3: a rogue adds a validly signed record nobody registered: it cannot prove it"
    );
    let admin_registry =
        || signpost_tests::raw_registry(&cluster, &cluster.root().join("admin-cert"), 1);
    let unlogged = signed_record(&key, "payments", "p9", 1, 6666);
    let rogue = RogueRegistry::tampering(
        &genuine,
        Tamper::Unlogged {
            upstream: admin_registry(),
            record: unlogged,
        },
    );
    let stolen = cluster.issue("node", "66");
    let unlogged_addr = serve_rogue(&cluster, &stolen, rogue).await.to_string();
    let fell_back = refused_then_answered(
        &cluster,
        cluster.client_config(None, &[]),
        &unlogged_addr,
        "cannot prove payments/p9",
    )
    .await;
    assert_eq!(fell_back.instances.len(), 1, "only p1 is registered");

    eprintln!("phase 4: a rogue replays a genuine answer: refused once its checkpoint is too old");
    let rogue = RogueRegistry::tampering(
        &genuine,
        Tamper::Replay {
            first_honest: None,
            answer: genuine.clone(),
        },
    );
    let replay_addr = serve_rogue(&cluster, &stolen, rogue).await.to_string();
    let mut config = cluster.client_config(None, &[]);
    config.endpoints = vec![replay_addr.clone()];
    config.audit.checkpoint_max_age_ms = signpost_client::CHECKPOINT_MAX_AGE_MIN_MS;
    let replayed_to = Client::connect(&config).unwrap();
    // (Its checkpoint has aged through phase 3 already; the wait makes sure. The side of the
    // limit where it is accepted is the client's unit test.)
    tokio::time::sleep(Duration::from_millis(
        signpost_client::CHECKPOINT_MAX_AGE_MIN_MS + 1_000,
    ))
    .await;
    let err = replayed_to
        .resolve("payments", true)
        .await
        .expect_err("an old checkpoint was accepted");
    assert!(err.to_string().contains("s old; at most 3.0 s"), "{err}");
    config.endpoints = vec![replay_addr.clone(), cluster.client_addr(2)];
    Client::connect(&config)
        .unwrap()
        .resolve("payments", true)
        .await
        .expect("an honest node's checkpoint is fresh");

    eprintln!(
        "phase 5: the same replay to a client that has seen a larger checkpoint is a rollback"
    );
    payments
        .register(signed_record(&key, "payments", "p2", 1, 444))
        .await
        .unwrap();
    covered_answer(&cluster, 1, "payments").await;
    let rogue = RogueRegistry::tampering(
        &genuine,
        Tamper::Replay {
            first_honest: Some(signpost_tests::raw_registry(
                &cluster,
                &cluster.root().join("admin-cert"),
                1,
            )),
            answer: genuine.clone(),
        },
    );
    let rollback_addr = serve_rogue(&cluster, &stolen, rogue).await.to_string();
    let mut config = cluster.client_config(None, &[]);
    config.endpoints = vec![rollback_addr];
    config.audit.checkpoint_max_age_ms = 3_600_000;
    let victim = Client::connect(&config).unwrap();
    let first = victim.resolve("payments", true).await.unwrap();
    assert_eq!(first.instances.len(), 2, "the first answer is forwarded");
    let (trusted, _) = victim.audit_checkpoint().unwrap();
    assert!(trusted > evidence.tree_size);
    let err = victim
        .resolve("payments", true)
        .await
        .expect_err("a rollback was accepted");
    assert!(err.to_string().contains("(rolled back)"), "{err}");

    eprintln!(
        "phase 6: a rogue serves a tree of its own, the honest log plus a forged registration"
    );
    let base = covered_answer(&cluster, 1, "payments").await;
    let base_evidence = base.audit.clone().unwrap();
    let leaves = all_leaves(&cluster, 1).await;
    let mut tree = ForgedTree::default();
    for leaf in &leaves[..base_evidence.tree_size as usize] {
        tree.append(leaf);
    }
    assert_eq!(tree.frontier.root().to_vec(), base_evidence.root_hash);
    let forged = signed_record(&key, "payments", "p1", 1 << 40, 31337);
    // Its state: payments with the forged record alone, which its last record commits to.
    let digest = |bytes: Vec<u8>| -> signpost_audit::Hash { sha2::Sha256::digest(bytes).into() };
    let binding = base.service.as_ref().unwrap().binding.clone().unwrap();
    let instances = signpost_audit::StateTree::from_entries(vec![(
        signpost_audit::name_key("p1"),
        digest(prost::Message::encode_to_vec(&forged)),
    )])
    .unwrap();
    let mut state = signpost_audit::StateTree::new();
    state.insert(
        signpost_audit::name_key("payments"),
        signpost_audit::service_value(
            &digest(prost::Message::encode_to_vec(&binding)),
            &instances.root(),
        ),
    );
    let leaf = AuditRecord {
        state_root: state.root().to_vec(),
        revision: base.revision + 1,
        op: audit_record::Op::Register as i32,
        service: "payments".into(),
        instance: "p1".into(),
        applied: true,
        envelope_sha256: sha2::Sha256::digest(prost::Message::encode_to_vec(&forged)).to_vec(),
        sequence: 1 << 40,
        ..Default::default()
    };
    let leaf = prost::Message::encode_to_vec(&leaf);
    let index = tree.frontier.size();
    tree.append(&leaf);
    let size = tree.frontier.size();
    let mut answer = base.clone();
    let service = answer.service.as_mut().unwrap();
    service.records = vec![forged];
    let hashes = hex_hashes(signpost_audit::inclusion_proof(&tree, index, size).unwrap());
    service.inclusions = vec![RecordInclusion {
        index,
        leaf: leaf.clone(),
        hashes: hashes.clone(),
    }];
    service.state = Some(StateProof::default());
    answer.audit = Some(AuditEvidence {
        tree_size: size,
        root_hash: tree.frontier.root().to_vec(),
        checkpoint_consistency: hex_hashes(
            signpost_audit::consistency_proof(&tree, base_evidence.tree_size, size).unwrap(),
        ),
        trusted_consistency: Vec::new(),
        accepted_consistency: Vec::new(),
        head_leaf: leaf,
        head_inclusion: hashes,
        ..base_evidence
    });
    let rogue = RogueRegistry::tampering(&genuine, Tamper::Once(answer));
    let fork_addr = serve_rogue(&cluster, &stolen, rogue).await.to_string();
    let mut config = cluster.client_config(None, &[]);
    config.endpoints = vec![
        fork_addr.clone(),
        cluster.client_addr(1),
        cluster.client_addr(2),
    ];
    let victim = Client::connect(&config).unwrap();
    // The limit of what a client can check at once: no quorum has signed anything beyond the
    // checkpoint yet, so a record "applied since" is the node's word, proven in its own tree.
    let fooled = victim
        .resolve("payments", true)
        .await
        .expect("a tree beyond the latest checkpoint is taken on the node's word");
    assert_eq!(fooled.instances[0].payload.endpoints[0].port, 31337);
    assert!(victim.audit_alarms().is_empty());

    eprintln!(
        "phase 7: once a quorum checkpoint covers that size, the next answer names the rogue"
    );
    payments
        .register(signed_record(&key, "payments", "p3", 1, 445))
        .await
        .unwrap();
    let covering = covered_answer(&cluster, 1, "payments").await;
    assert!(covering.audit.unwrap().tree_size >= size);
    // A node whose copy of the checkpoint still lags cannot decide yet and is skipped.
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        match victim.resolve("payments", true).await {
            Ok(after) => break after,
            Err(e) if Instant::now() < deadline => eprintln!("not yet: {e}"),
            Err(e) => panic!("no honest node answered: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let ports: Vec<u32> = after
        .instances
        .iter()
        .map(|i| i.payload.endpoints[0].port)
        .collect();
    assert_eq!(ports, vec![443, 444, 445]);
    let alarms = victim.audit_alarms();
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert!(
        alarms[0].starts_with(&format!("{fork_addr} served a tree of {size} records"))
            && alarms[0].contains("a forked history"),
        "{alarms:?}"
    );

    eprintln!("phase 8: a rogue leaves an instance out of an honest answer: the state proof fails");
    let rogue = RogueRegistry::tampering(
        &genuine,
        Tamper::Hide {
            upstream: admin_registry(),
        },
    );
    let hide_addr = serve_rogue(&cluster, &stolen, rogue).await.to_string();
    let whole = refused_then_answered(
        &cluster,
        cluster.client_config(None, &[]),
        &hide_addr,
        "is not the whole current state of the service",
    )
    .await;
    assert_eq!(whole.instances.len(), 3);

    eprintln!(
        "phase 9: a rogue freezes p1 at its first version, logged and proven in the current tree"
    );
    payments
        .register(signed_record(&key, "payments", "p1", 2, 4443))
        .await
        .unwrap();
    covered_answer(&cluster, 1, "payments").await;
    let genuine_p1 = genuine.service.as_ref().unwrap();
    let rogue = RogueRegistry::tampering(
        &genuine,
        Tamper::Freeze {
            upstream: admin_registry(),
            audit: signpost_proto::v1::audit_client::AuditClient::new(signpost_tests::raw_channel(
                &cluster,
                &cluster.root().join("admin-cert"),
                &cluster.client_addr(1),
                None,
            )),
            instance: "p1".into(),
            record: genuine_p1.records[0].clone(),
            index: genuine_p1.inclusions[0].index,
        },
    );
    let freeze_addr = serve_rogue(&cluster, &stolen, rogue).await.to_string();
    let current = refused_then_answered(
        &cluster,
        cluster.client_config(None, &[]),
        &freeze_addr,
        "is not the whole current state of the service",
    )
    .await;
    let ports: Vec<u32> = current
        .instances
        .iter()
        .map(|i| i.payload.endpoints[0].port)
        .collect();
    assert_eq!(ports, vec![4443, 444, 445]);

    eprintln!("phase 10: NOT_FOUND is proven; a rogue cannot deny a service that exists");
    let mut strict_config = cluster.client_config(None, &[2]);
    strict_config.audit.require_checkpoint = true;
    let strict = Client::connect(&strict_config).unwrap();
    let absent = strict
        .resolve("ghost", true)
        .await
        .expect_err("ghost is not registered");
    assert_eq!(absent.code(), Some(tonic::Code::NotFound), "{absent}");
    let ghost = admin_registry()
        .resolve(ResolveRequest {
            service: "ghost".into(),
            stale: true,
            audit: Some(AuditEvidenceRequest {
                prove: true,
                ..Default::default()
            }),
        })
        .await
        .expect_err("ghost is not registered");
    assert!(!ghost.details().is_empty(), "the absence carries its proof");
    for (details, refusal) in [
        (
            ghost.details().to_vec(),
            "does not prove the service absent",
        ),
        (Vec::new(), "served no quorum-signed checkpoint"),
    ] {
        let rogue = RogueRegistry::tampering(&genuine, Tamper::Deny { details });
        let deny_addr = serve_rogue(&cluster, &stolen, rogue).await.to_string();
        let mut config = cluster.client_config(None, &[]);
        config.audit.require_checkpoint = true;
        let found = refused_then_answered(&cluster, config, &deny_addr, refusal).await;
        assert_eq!(found.instances.len(), 3);
    }

    eprintln!("phase 11: watched puts are proven too; a rogue's unlogged put is refused");
    let mut watch_config = cluster.client_config(None, &[2]);
    watch_config.audit.require_checkpoint = true;
    let watching = Client::connect(&watch_config).unwrap();
    let from = covered_answer(&cluster, 2, "payments").await.revision + 1;
    let mut watcher = watching.watch("payments", false, from);
    payments
        .register(signed_record(&key, "payments", "p4", 1, 446))
        .await
        .unwrap();
    let change = tokio::time::timeout(Duration::from_secs(20), watcher.next())
        .await
        .expect("the put arrives")
        .expect("and verifies");
    assert!(change.put && change.instance == "p4", "{change:?}");
    assert!(watching.audit_checkpoint().is_some());
    let proven = covered_answer(&cluster, 2, "payments").await;
    let unlogged_put = WatchEvent {
        revision: proven.revision,
        kind: watch_event::Kind::Put as i32,
        service: "payments".into(),
        instance: "p9".into(),
        record: Some(signed_record(&key, "payments", "p9", 1, 6666)),
        binding: proven.service.as_ref().unwrap().binding.clone(),
        applied_revision: proven.revision,
        audit: proven.audit.clone(),
        inclusion: Some(RecordInclusion::default()),
        position: 0,
    };
    let start = WatchEvent {
        revision: proven.revision,
        kind: watch_event::Kind::Start as i32,
        applied_revision: proven.revision,
        ..Default::default()
    };
    let rogue = RogueRegistry {
        watch: vec![start, unlogged_put],
        tamper: None,
        ..RogueRegistry::tampering(
            &proven,
            Tamper::Deny {
                details: Vec::new(),
            },
        )
    };
    let watch_addr = serve_rogue(&cluster, &stolen, rogue).await.to_string();
    watch_config.endpoints = vec![watch_addr];
    let fooled = Client::connect(&watch_config).unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        fooled.watch("payments", false, proven.revision).next(),
    )
    .await
    .expect("the watcher gives up")
    .expect_err("an unlogged put was delivered");
    assert!(
        err.to_string().contains("cannot prove payments/p9"),
        "{err}"
    );
}
