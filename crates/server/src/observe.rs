//! The operators' listener: `/metrics` in the Prometheus text format, `/healthz` and `/readyz`.
//!
//! Plain HTTP on its own address (`metrics_addr`), apart from the mutual-TLS client listener,
//! because scrapers and kubelet probes do not present client certificates. It serves no
//! registry data. Gauges are read from the node when scraped; counters are kept by the
//! `metrics` facade where events happen (admission sheds, apply outcomes).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use signpost_consensus::Consensus;
use tokio::sync::watch;

use crate::admission::Admission;
use crate::error::ServerError;
use crate::lease_keeper::LeaseKeeper;
use crate::watch_hub::WatchHub;

/// The apply lag beyond which `/readyz` (and gRPC health) say not ready.
pub const READY_APPLY_LAG_MAX: u64 = 1_000;

/// Counter of requests shed by admission, by limit (`reason`) and identity class.
pub const SHED_TOTAL: &str = "signpost_admission_shed_total";
/// Counter of write outcomes on the node the client asked, by result and reason: applied
/// (counted where the outcome returns) or refused (counted at the edge, whether refused
/// before the log or at apply).
pub const WRITES_TOTAL: &str = "signpost_writes_total";
/// Counter of leader changes this node observed.
pub const LEADER_CHANGES_TOTAL: &str = "signpost_raft_leader_changes_total";
/// Counter of leases the leader expired.
pub const LEASE_EXPIRIES_TOTAL: &str = "signpost_lease_expiries_total";
/// Gauge, on the leader, of entries each follower lacks.
pub const FOLLOWER_LAG: &str = "signpost_raft_follower_lag_entries";
/// Gauge of the node certificate's not-after time.
pub const CERT_EXPIRY: &str = "signpost_tls_cert_expiry_timestamp_seconds";

/// Latency buckets in seconds: from a local read (well under a millisecond) to a request that
/// ran into the request timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What the scrape handler reads.
#[derive(Clone)]
struct Node {
    consensus: Consensus,
    watch_hub: WatchHub,
    admission: Admission,
    leases: LeaseKeeper,
    cert: std::path::PathBuf,
    prometheus: PrometheusHandle,
}

/// Installs the process-wide metrics recorder (once) and returns the handle that renders it.
pub fn install_recorder() -> Result<PrometheusHandle, ServerError> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(crate::edge::RPC_DURATION.into()),
            LATENCY_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(signpost_consensus::PROPOSAL_DURATION.into()),
                LATENCY_BUCKETS,
            )
        })
        .map_err(|e| ServerError::Config(format!("metrics buckets: {e}")))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| ServerError::Config(format!("metrics recorder: {e}")))?;
    describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

fn describe() {
    metrics::describe_counter!(
        SHED_TOTAL,
        "Requests refused by admission control with RESOURCE_EXHAUSTED."
    );
    metrics::describe_counter!(
        WRITES_TOTAL,
        "Writes through this node, by outcome: applied, or refused with the reason (before the log or at apply)."
    );
    for (name, help) in COUNTERS {
        metrics::describe_counter!(*name, *help);
    }
    for (name, help) in GAUGES {
        metrics::describe_gauge!(*name, *help);
    }
    metrics::describe_histogram!(
        crate::edge::RPC_DURATION,
        metrics::Unit::Seconds,
        "Client RPC latency to the response headers, by method and gRPC code."
    );
    metrics::describe_histogram!(
        signpost_consensus::PROPOSAL_DURATION,
        metrics::Unit::Seconds,
        "Time from proposing a write to its apply on this (leading) node."
    );
    metrics::describe_histogram!(
        signpost_consensus::PROPOSAL_BATCH_SIZE,
        metrics::Unit::Count,
        "Requests one log entry carried (proposals that arrived together share one entry and one fsync)."
    );
    metrics::describe_histogram!(
        signpost_consensus::READ_BATCH_SIZE,
        metrics::Unit::Count,
        "Linearizable reads served by one leadership confirmation (read index round)."
    );
}

const COUNTERS: &[(&str, &str)] = &[
    (
        crate::edge::RPC_REQUESTS,
        "Client RPCs by method, gRPC code and identity class.",
    ),
    (
        crate::edge::DENIED_TOTAL,
        "Requests refused by authorization, by rule (service.own-name-only: impersonation attempts).",
    ),
    (
        LEADER_CHANGES_TOTAL,
        "Leader changes observed by this node.",
    ),
    (LEASE_EXPIRIES_TOTAL, "Leases expired by this node as leader."),
    (
        signpost_consensus::SNAPSHOTS_BUILT_TOTAL,
        "Snapshots built by this node.",
    ),
    (
        signpost_consensus::SNAPSHOTS_INSTALLED_TOTAL,
        "Snapshots installed on this node from a leader.",
    ),
    (
        signpost_identity::HANDSHAKES_REFUSED,
        "Connections closed before carrying a request, by reason.",
    ),
];

const GAUGES: &[(&str, &str)] = &[
    ("signpost_raft_term", "Current Raft term."),
    (
        "signpost_raft_is_leader",
        "1 if this node leads with a quorum lease.",
    ),
    (
        "signpost_raft_commit_index",
        "Highest log index known committed.",
    ),
    (
        "signpost_raft_applied_index",
        "Highest log index applied to the registry.",
    ),
    (
        "signpost_raft_last_log_index",
        "Last index in this node's log.",
    ),
    (
        "signpost_raft_members",
        "Members in the current membership.",
    ),
    (
        "signpost_ready",
        "1 if the node is ready for client traffic (see /readyz).",
    ),
    (
        "signpost_registry_services",
        "Services with at least one live instance.",
    ),
    ("signpost_registry_instances", "Live instances."),
    (
        "signpost_registry_state_bytes",
        "Bytes of stored registry state.",
    ),
    (
        "signpost_registry_state_bytes_max",
        "The registry's byte quota.",
    ),
    (
        "signpost_watch_history_bytes",
        "Bytes of watch history kept in memory.",
    ),
    (
        "signpost_watch_buffered_bytes",
        "Bytes buffered for watchers, all together.",
    ),
    (
        "signpost_streams_open",
        "Open watch and keep-alive streams.",
    ),
    (
        "signpost_proposals_in_flight",
        "Writes proposed by this node and not yet applied.",
    ),
    (
        "signpost_identities_tracked",
        "Client identities with admission state.",
    ),
    (
        "signpost_raft_snapshot_index",
        "Log index covered by this node's latest snapshot.",
    ),
    ("signpost_watchers", "Open watchers on this node."),
    ("signpost_leases", "Leases tracked (by the leader)."),
    (
        signpost_identity::CONNECTIONS_OPEN,
        "Connections holding a slot on this node's listeners.",
    ),
    (
        FOLLOWER_LAG,
        "On the leader: entries a follower lacks (last log index minus its matched index).",
    ),
    (
        CERT_EXPIRY,
        "Not-after time of this node's certificate, in seconds since the Unix epoch.",
    ),
    (
        "signpost_audit_records",
        "Records in the audit tree as of the last applied entry.",
    ),
    (
        "signpost_audit_checkpoint_size",
        "Records covered by the latest quorum-signed audit checkpoint this node holds (0: none).",
    ),
    (
        "signpost_audit_checkpoint_timestamp_seconds",
        "Time of the latest quorum-signed audit checkpoint this node holds, in seconds since the Unix epoch (0: none).",
    ),
];

impl Node {
    fn refresh_gauges(&self) {
        let status = self.consensus.status();
        let (checkpoint_size, checkpoint_ms) = self
            .consensus
            .checkpoints()
            .latest()
            .map_or((0, 0), |c| (c.checkpoint.size, c.checkpoint.time_ms));
        let state = self.consensus.state();
        let registry = &state.registry;
        let (history, buffered) = self.watch_hub.bytes();
        let leading = status.leader_id == Some(status.node_id) && status.quorum_lease;
        let values: [(&str, f64); 22] = [
            ("signpost_raft_term", status.term as f64),
            ("signpost_raft_is_leader", f64::from(u8::from(leading))),
            ("signpost_raft_commit_index", status.commit_index as f64),
            ("signpost_raft_applied_index", status.applied_index as f64),
            ("signpost_raft_last_log_index", status.last_log_index as f64),
            ("signpost_raft_members", status.members.len() as f64),
            (
                "signpost_ready",
                f64::from(u8::from(
                    self.consensus.readiness(READY_APPLY_LAG_MAX).is_ok(),
                )),
            ),
            (
                "signpost_registry_services",
                registry.service_count() as f64,
            ),
            (
                "signpost_registry_instances",
                registry.instances().count() as f64,
            ),
            (
                "signpost_registry_state_bytes",
                registry.state_bytes() as f64,
            ),
            (
                "signpost_registry_state_bytes_max",
                registry.quotas().state_bytes_max as f64,
            ),
            ("signpost_watch_history_bytes", history as f64),
            ("signpost_watch_buffered_bytes", buffered as f64),
            (
                "signpost_streams_open",
                self.admission.streams_open() as f64,
            ),
            (
                "signpost_proposals_in_flight",
                self.admission.proposals_in_flight() as f64,
            ),
            (
                "signpost_identities_tracked",
                self.admission.identities_tracked() as f64,
            ),
            ("signpost_raft_snapshot_index", status.snapshot_index as f64),
            ("signpost_watchers", self.watch_hub.watchers() as f64),
            ("signpost_leases", self.leases.leases() as f64),
            ("signpost_audit_records", state.audit.size() as f64),
            ("signpost_audit_checkpoint_size", checkpoint_size as f64),
            (
                "signpost_audit_checkpoint_timestamp_seconds",
                checkpoint_ms as f64 / 1000.0,
            ),
        ];
        for (name, value) in values {
            metrics::gauge!(name).set(value);
        }
        // Only the leader knows lags; elsewhere they read 0, so a former leader's last view
        // does not linger as a false alarm.
        for member in status.members.iter().filter(|m| m.id != status.node_id) {
            let lag = match member.matched_index {
                Some(matched) if leading => status.last_log_index.saturating_sub(matched),
                None if leading => status.last_log_index,
                _ => 0,
            };
            metrics::gauge!(FOLLOWER_LAG, "follower" => member.id.to_string()).set(lag as f64);
        }
        match signpost_identity::certificate_not_after(&self.cert) {
            Ok(at) => metrics::gauge!(CERT_EXPIRY).set(at as f64),
            Err(e) => tracing::warn!(error = %e, "cannot read the node certificate's expiry"),
        }
    }
}

async fn metrics_page(State(node): State<Node>) -> String {
    node.refresh_gauges();
    node.prometheus.render()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(node): State<Node>) -> (StatusCode, String) {
    match node.consensus.readiness(READY_APPLY_LAG_MAX) {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// What the operators' listener reports on.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The node's consensus handle.
    pub consensus: Consensus,
    /// Its change feed.
    pub watch_hub: WatchHub,
    /// Its admission control.
    pub admission: Admission,
    /// Its lease table.
    pub leases: LeaseKeeper,
    /// Its certificate file (for the expiry gauge).
    pub cert: std::path::PathBuf,
}

/// Counts changes of the known leader (a new leader, not "no leader" in between).
async fn count_leader_changes(consensus: Consensus) {
    let mut status = consensus.watch_status();
    let mut last = status.borrow_and_update().leader_id;
    while status.changed().await.is_ok() {
        let now = status.borrow_and_update().leader_id;
        if now.is_some() && now != last {
            if last.is_some() {
                metrics::counter!(LEADER_CHANGES_TOTAL).increment(1);
            }
            last = now;
        }
    }
}

/// Serves the operators' listener on `addr` until `stop` turns true.
pub async fn serve(
    addr: &str,
    parts: Observed,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, ServerError> {
    let prometheus = install_recorder()?;
    tokio::spawn(count_leader_changes(parts.consensus.clone()));
    let node = Node {
        consensus: parts.consensus,
        watch_hub: parts.watch_hub,
        admission: parts.admission,
        leases: parts.leases,
        cert: parts.cert,
        prometheus,
    };
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(node);
    let listener =
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| ServerError::Listener {
                addr: addr.to_string(),
                detail: e.to_string(),
            })?;
    tracing::info!(addr, "metrics, healthz and readyz listener");
    Ok(tokio::spawn(async move {
        let shutdown = async move {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    return;
                }
            }
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "metrics listener stopped");
        }
    }))
}
