//! Wiring of one node: TLS, consensus, the two listeners, bootstrap and genesis.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use signpost_consensus::{Consensus, ConsensusConfig};
use signpost_identity::{PeerRule, SourceAllowlist, TlsFiles, TlsIncoming, TlsSettings, Trust};
use signpost_proto::v1::audit_server::AuditServer;
use signpost_proto::v1::cluster_server::ClusterServer;
use signpost_proto::v1::registry_server::RegistryServer;
use signpost_state::{Command, Quotas, Request as LogRequest};
use tokio::sync::watch;

use crate::admission::{Admission, AdmissionLimits};
use crate::cluster_service::ClusterService;
use crate::config::Config;
use crate::error::ServerError;
use crate::lease_keeper::LeaseKeeper;
use crate::registry_service::RegistryService;
use crate::watch_hub::{WatchHub, WatchHubConfig};

/// How often the genesis task checks whether the registry still needs its genesis entry.
const GENESIS_RETRY: Duration = Duration::from_millis(300);
/// How often the gRPC health status is brought up to date.
const HEALTH_TICK: Duration = Duration::from_millis(250);

/// Runs a node until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let files = TlsFiles {
        ca: config.tls.ca.clone(),
        cert: config.tls.cert.clone(),
        key: config.tls.key.clone(),
        crl: config.tls.crl.clone(),
    };
    let settings = TlsSettings {
        allow_tls12: config.tls.allow_tls12,
        handshake_timeout: Duration::from_millis(config.tls.handshake_timeout_ms),
        handshakes_concurrent_max: config.limits.handshakes_concurrent_max,
        handshakes_per_ip_max: config.limits.handshakes_per_ip_max,
        connections_max: config.limits.connections_max,
        connections_per_ip_max: config.limits.connections_per_ip_max,
        handshakes_per_ip_per_sec: config.limits.handshakes_per_ip_per_sec,
        handshakes_per_ip_burst: config.limits.handshakes_per_ip_burst,
        first_byte_timeout: Duration::from_millis(config.tls.first_byte_timeout_ms),
        preface_timeout: Duration::from_millis(config.tls.preface_timeout_ms),
    };
    let trust = Trust::from_files(&files)?;
    signpost_identity::spawn_crl_watcher(trust.clone(), Duration::from_secs(1));
    signpost_identity::spawn_sighup_reloader(trust.clone())?;
    // The client listener accepts any identity of our trust domain (authorization decides per
    // RPC); the Raft listener refuses every non-node certificate during the handshake.
    let server_tls = signpost_identity::server_config(&files, &trust, &settings)?;
    let raft_tls =
        signpost_identity::server_config_for_peers(&files, &trust, &settings, PeerRule::AnyNode)?;
    let peer_tls = signpost_identity::client_config(&files, &trust, &settings, PeerRule::AnyNode)?;

    let members = config.member_addrs();
    let mut consensus_config = ConsensusConfig::new(
        config.node_id,
        config.data_dir.clone(),
        members,
        config.trust_domain.clone(),
        peer_tls,
    );
    consensus_config.local_ip = listen_ip(&config.raft_addr);
    consensus_config.heartbeat_ms = config.raft.heartbeat_ms;
    consensus_config.election_timeout_min_ms = config.raft.election_timeout_min_ms;
    consensus_config.election_timeout_max_ms = config.raft.election_timeout_max_ms;
    consensus_config.snapshot_after_entries = config.raft.snapshot_after_entries;
    consensus_config.batch_proposals = config.raft.batch_proposals;
    consensus_config.forward_to_leader = config.raft.forward_to_leader;
    consensus_config.log_entries_kept = config.raft.log_entries_kept;
    consensus_config.expected_genesis = Some(config.genesis_admin_set()?);
    consensus_config.audit_retain_bytes = config.audit.retain_bytes;
    if let Some(path) = &config.audit.checkpoint_key {
        let key = signpost_record::read_signing_key(path).map_err(|e| {
            ServerError::Config(format!("audit.checkpoint_key {}: {e}", path.display()))
        })?;
        consensus_config.checkpoint_key = Some(key);
    }
    let consensus = Consensus::open(consensus_config).await?;

    let (stop_tx, stop_rx) = watch::channel(false);

    // Raft listener first: peers may already be waiting for our vote.
    // The client limits do not apply to the Raft listener (I5). It admits only the source
    // addresses of members, following membership changes, so no outsider can take a slot
    // that Raft needs; the library's per-address limits still bound a misbehaving member.
    let raft_settings = TlsSettings {
        allow_tls12: settings.allow_tls12,
        handshake_timeout: settings.handshake_timeout,
        first_byte_timeout: settings.first_byte_timeout,
        preface_timeout: settings.preface_timeout,
        ..TlsSettings::default()
    };
    let members_only = SourceAllowlist::default();
    follow_members(&consensus, members_only.clone()).await;
    let raft_incoming = TlsIncoming::bind_admitting(
        &config.raft_addr,
        raft_tls,
        &raft_settings,
        Some(members_only),
    )
    .await
    .map_err(|e| ServerError::Listener {
        addr: config.raft_addr.clone(),
        detail: e.to_string(),
    })?;
    let raft_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(consensus.raft_service())
        .serve_with_incoming_shutdown(raft_incoming, stopped(stop_rx.clone()));
    let raft_task = tokio::spawn(raft_server);

    let admission = Admission::new(AdmissionLimits::from_config(&config.limits));
    let leases = LeaseKeeper::start(consensus.clone(), &config.trust_domain);
    let watch_hub = WatchHub::start(
        &consensus,
        WatchHubConfig {
            history_events_max: config.watch.history_events_max,
            history_bytes_max: config.watch.history_bytes_max,
            watcher_buffer_events: config.watch.watcher_buffer_events,
            watcher_buffer_bytes: config.watch.watcher_buffer_bytes,
            watch_buffers_bytes_max: config.watch.watch_buffers_bytes_max,
            watchers_max: config.watch.watchers_max,
        },
    );
    let metrics_task = match &config.metrics_addr {
        Some(addr) => Some(
            crate::observe::serve(
                addr,
                crate::observe::Observed {
                    consensus: consensus.clone(),
                    watch_hub: watch_hub.clone(),
                    admission: admission.clone(),
                    leases: leases.clone(),
                    cert: config.tls.cert.clone(),
                },
                stop_rx.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let registry = RegistryService::new(
        consensus.clone(),
        config.trust_domain.clone(),
        admission.clone(),
        leases,
        watch_hub,
    );
    let cluster = ClusterService::new(
        consensus.clone(),
        config.trust_domain.clone(),
        admission.clone(),
        config.metrics_addr.clone(),
    );
    let audit = crate::AuditService::new(
        consensus.clone(),
        config.trust_domain.clone(),
        admission.clone(),
    );
    let client_incoming = TlsIncoming::bind(&config.client_addr, server_tls, &settings)
        .await
        .map_err(|e| ServerError::Listener {
            addr: config.client_addr.clone(),
            detail: e.to_string(),
        })?;
    let max = config.limits.message_bytes_max;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Both reflection versions: grpcurl speaks v1, many tools (Python's grpcio-reflection,
    // older grpcurl) still only v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(signpost_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .map_err(|e| ServerError::Config(format!("reflection descriptors: {e}")))?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| ServerError::Config(format!("reflection descriptors: {e}")))?;
    let client_server = tonic::transport::Server::builder()
        .layer(crate::edge::EdgeLayer::new(
            admission.clone(),
            &config.trust_domain,
        ))
        .max_concurrent_streams(Some(config.limits.streams_per_connection_max))
        .concurrency_limit_per_connection(config.limits.streams_per_connection_max as usize)
        .timeout(Duration::from_millis(config.limits.request_timeout_ms))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(
            RegistryServer::new(registry)
                .max_decoding_message_size(max)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .add_service(
            ClusterServer::new(cluster)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            AuditServer::new(audit)
                .max_decoding_message_size(max)
                .max_encoding_message_size(16 * 1024 * 1024),
        )
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(client_incoming, stopped(stop_rx.clone()));
    let client_task = tokio::spawn(client_server);
    let health_task = tokio::spawn(report_health(consensus.clone(), health_reporter));

    if config.join {
        // Joining nodes never initialize: an admin adds them (`signpost cluster add`) and the
        // leader brings them the log or a snapshot.
        tracing::info!(
            node = config.node_id,
            "joining an existing cluster: waiting to be added by `signpost cluster add`"
        );
    } else if consensus.bootstrap().await? {
        tracing::info!(node = config.node_id, "initialized a new cluster");
    }
    let genesis = tokio::spawn(propose_genesis(consensus.clone(), config.clone(), stop_rx));
    let clock_watch = tokio::spawn(watch_clock_skew(consensus.clone()));
    tracing::info!(
        node = config.node_id,
        client = %config.client_addr,
        raft = %config.raft_addr,
        "node serving"
    );

    // A fatal storage error stops openraft's core for good; a node that kept answering from
    // its last state would serve stale reads and confuse status. It leaves service instead
    // and exits non-zero, for its supervisor to restart it on a disk that works.
    let mut genesis = genesis;
    tokio::pin!(shutdown);
    let fatal = tokio::select! {
        _ = &mut shutdown => None,
        reason = consensus.fatal() => Some(reason),
        refused = &mut genesis => match refused {
            Ok(Some(reason)) => Some(reason),
            // Genesis is in place (or the task was stopped): keep serving until shutdown.
            _ => tokio::select! {
                _ = &mut shutdown => None,
                reason = consensus.fatal() => Some(reason),
            },
        },
    };
    if let Some(reason) = &fatal {
        tracing::error!(
            node = config.node_id,
            %reason,
            "FATAL: consensus stopped (storage failure?); leaving service and exiting so a \
             supervisor can restart the node once the disk is fixed"
        );
    } else {
        tracing::info!(node = config.node_id, "shutting down");
        // A rolling restart should cost a fraction of an election, not a whole one.
        if let Some(leader) = consensus.transfer_leadership(Duration::from_secs(2)).await {
            tracing::info!(node = config.node_id, leader, "handed leadership over");
        }
    }
    let _ = stop_tx.send(true);
    genesis.abort();
    clock_watch.abort();
    health_task.abort();
    if fatal.is_some() {
        // Do not wait for clients to finish: every answer from here on would be stale.
        client_task.abort();
        raft_task.abort();
    }
    let _ = client_task.await;
    let _ = raft_task.await;
    if let Some(task) = metrics_task {
        task.abort();
    }
    consensus.shutdown().await;
    match fatal {
        Some(reason) => Err(ServerError::Fatal(reason)),
        None => Ok(()),
    }
}

/// Keeps the gRPC health status (`grpc.health.v1`) true to the node's readiness: SERVING for
/// the whole server ("") and `signpost.v1.Registry` while the node is a member that hears from
/// a leader (or leads with its quorum) and has applied what it knows committed, within
/// [`crate::observe::READY_APPLY_LAG_MAX`]; NOT_SERVING otherwise, so load balancers and Kubernetes probes send
/// clients elsewhere. `signpost.v1.Cluster` (status) is always SERVING while the process runs.
async fn report_health(consensus: Consensus, reporter: tonic_health::server::HealthReporter) {
    use tonic_health::ServingStatus;
    reporter
        .set_service_status("signpost.v1.Cluster", ServingStatus::Serving)
        .await;
    let mut ready: Option<bool> = None;
    let mut tick = tokio::time::interval(HEALTH_TICK);
    loop {
        tick.tick().await;
        let now = consensus.readiness(crate::observe::READY_APPLY_LAG_MAX);
        if ready == Some(now.is_ok()) {
            continue;
        }
        let status = match &now {
            Ok(()) => {
                tracing::info!("ready: serving clients");
                ServingStatus::Serving
            }
            Err(reason) => {
                tracing::warn!(%reason, "not ready");
                ServingStatus::NotServing
            }
        };
        for service in ["", "signpost.v1.Registry"] {
            reporter.set_service_status(service, status).await;
        }
        ready = Some(now.is_ok());
    }
}

/// Logs once when the registry's clock runs ahead of this node's (and once when it no longer
/// does); `signpost status` shows the `CLOCK_SKEW` alarm meanwhile.
async fn watch_clock_skew(consensus: Consensus) {
    let mut skewed = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let clock_ms = consensus.state().registry.clock_ms();
        let now = crate::cluster_service::clock_skewed(clock_ms);
        if now != skewed {
            if now {
                tracing::warn!(
                    clock_ms,
                    "CLOCK_SKEW: the registry's clock is ahead of this node's by more than \
                     {} ms; some leader's clock ran ahead, and registrations are judged by \
                     the later time until real time catches up",
                    signpost_consensus::CLOCK_SKEW_MAX_MS
                );
            } else {
                tracing::info!("CLOCK_SKEW cleared");
            }
            skewed = now;
        }
    }
}

/// The IP a listen address binds, unless it is a wildcard (then the kernel picks the source).
fn listen_ip(addr: &str) -> Option<std::net::IpAddr> {
    addr.parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
}

/// Keeps `allow` equal to the addresses of the members' Raft listeners (names resolved), and
/// fills it once before returning so the listener never starts empty.
/// How often members' Raft addresses are resolved again: a name (a Kubernetes pod's) may come
/// back with another address after a reschedule, and peers must admit it without a restart.
const MEMBER_RESOLVE_INTERVAL: Duration = Duration::from_secs(10);

/// The addresses to admit, given the last lookups: each member address contributes what it
/// resolved to now, or, when its lookup failed, what it resolved to last (a DNS hiccup must
/// not lock a healthy peer out). Addresses no longer members are forgotten.
fn admitted_ips(
    known: &mut BTreeMap<String, Vec<std::net::IpAddr>>,
    lookups: Vec<(String, Result<Vec<std::net::IpAddr>, String>)>,
) -> Vec<std::net::IpAddr> {
    let current: std::collections::BTreeSet<&String> = lookups.iter().map(|(a, _)| a).collect();
    known.retain(|addr, _| current.contains(addr));
    for (addr, result) in &lookups {
        match result {
            Ok(ips) => {
                known.insert(addr.clone(), ips.clone());
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot resolve a member's Raft address; keeping its last addresses");
            }
        }
    }
    let mut ips: Vec<std::net::IpAddr> = known.values().flatten().copied().collect();
    ips.sort_unstable();
    ips.dedup();
    ips
}

async fn lookup_all(addrs: &[String]) -> Vec<(String, Result<Vec<std::net::IpAddr>, String>)> {
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let result = tokio::net::lookup_host(addr.as_str())
            .await
            .map(|found| found.map(|a| a.ip()).collect())
            .map_err(|e| e.to_string());
        out.push((addr.clone(), result));
    }
    out
}

async fn follow_members(consensus: &Consensus, allow: SourceAllowlist) {
    let mut members = consensus.watch_membership();
    let mut known = BTreeMap::new();
    let first = members.borrow_and_update().clone();
    let mut admitted = admitted_ips(&mut known, lookup_all(&first).await);
    allow.set(admitted.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(MEMBER_RESOLVE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = members.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
            let addrs = members.borrow_and_update().clone();
            let now = admitted_ips(&mut known, lookup_all(&addrs).await);
            if now != admitted {
                tracing::info!(?addrs, ips = ?now, "raft listener admits the members' addresses");
                allow.set(now.clone());
                admitted = now;
            }
        }
    });
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The registry's first entry is the genesis admin set. Whichever node is leader while the
/// registry has none proposes it; apply accepts only the first, so a race between leaders is
/// harmless.
/// Returns the reason if the registry refused the genesis entry: retrying the same entry can
/// never succeed, so the node stops with that error instead.
async fn propose_genesis(
    consensus: Consensus,
    config: Config,
    stop: watch::Receiver<bool>,
) -> Option<String> {
    let keys: Vec<[u8; 32]> = config
        .bootstrap
        .admin_keys
        .iter()
        .filter_map(|k| signpost_record::parse_public_key_hex(k).ok())
        .map(|k| k.to_bytes())
        .collect();
    let quotas = Quotas {
        instances_per_service_max: config.bootstrap.instances_per_service_max,
        services_max: config.bootstrap.services_max,
        state_bytes_max: config.bootstrap.state_bytes_max,
    };
    loop {
        if *stop.borrow() || consensus.state().registry.admin_set().is_some() {
            return None;
        }
        if consensus.leader().map(|(id, _)| id) == Some(consensus.node_id()) {
            let request = LogRequest {
                time_ms: 0, // stamped by Consensus::propose
                caller: format!("spiffe://{}/node/{}", config.trust_domain, config.node_id),
                command: Command::Genesis {
                    admin_keys: keys.clone(),
                    admin_threshold: config.bootstrap.admin_threshold,
                    quotas,
                },
            };
            match consensus.propose(request).await {
                Ok((index, signpost_state::Outcome::Rejected { reason, detail }))
                    if reason != signpost_record::Reason::AlreadyInitialized =>
                {
                    return Some(format!(
                        "the registry refused the genesis entry at index {index} ({reason:?}: \
                         {detail}); check [bootstrap] in the config"
                    ));
                }
                Ok((index, outcome)) => {
                    tracing::info!(index, ?outcome, "proposed genesis");
                }
                Err(e) => tracing::debug!(error = %e, "genesis proposal failed; will retry"),
            }
        }
        tokio::time::sleep(GENESIS_RETRY).await;
    }
}

/// Loads the config at `path` and runs the node until Ctrl-C or SIGTERM.
pub async fn run_from_file(path: &std::path::Path) -> Result<(), ServerError> {
    let config = Config::load(path)?;
    run(config, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn member_addresses_follow_their_names_and_survive_a_failed_lookup() {
        let mut known = BTreeMap::new();
        let a = "signpost-0.peer:7002".to_string();
        let b = "signpost-1.peer:7002".to_string();

        eprintln!("phase 1: both names resolve");
        let ips = admitted_ips(
            &mut known,
            vec![
                (a.clone(), Ok(vec![ip("10.0.0.1")])),
                (b.clone(), Ok(vec![ip("10.0.0.2")])),
            ],
        );
        assert_eq!(ips, vec![ip("10.0.0.1"), ip("10.0.0.2")]);

        eprintln!("phase 2: a rescheduled pod comes back with another address");
        let ips = admitted_ips(
            &mut known,
            vec![
                (a.clone(), Ok(vec![ip("10.0.0.9")])),
                (b.clone(), Ok(vec![ip("10.0.0.2")])),
            ],
        );
        assert_eq!(ips, vec![ip("10.0.0.2"), ip("10.0.0.9")]);

        eprintln!("phase 3: a failed lookup keeps the last addresses");
        let ips = admitted_ips(
            &mut known,
            vec![
                (a.clone(), Err("timeout".into())),
                (b.clone(), Ok(vec![ip("10.0.0.2")])),
            ],
        );
        assert_eq!(ips, vec![ip("10.0.0.2"), ip("10.0.0.9")]);

        eprintln!("phase 4: a member that left is forgotten");
        let ips = admitted_ips(&mut known, vec![(b, Ok(vec![ip("10.0.0.2")]))]);
        assert_eq!(ips, vec![ip("10.0.0.2")]);
    }
}
