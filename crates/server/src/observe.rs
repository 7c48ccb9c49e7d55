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
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use signpost_consensus::Consensus;
use tokio::sync::watch;

use crate::admission::Admission;
use crate::error::ServerError;
use crate::watch_hub::WatchHub;

/// The apply lag beyond which `/readyz` (and gRPC health) say not ready.
pub const READY_APPLY_LAG_MAX: u64 = 1_000;

/// Counter of requests shed by admission.
pub const SHED_TOTAL: &str = "signpost_admission_shed_total";
/// Counter of write outcomes at apply on the node that proposed them, by result and reason.
pub const WRITES_TOTAL: &str = "signpost_writes_total";

/// What the scrape handler reads.
#[derive(Clone)]
struct Node {
    consensus: Consensus,
    watch_hub: WatchHub,
    admission: Admission,
    prometheus: PrometheusHandle,
}

/// Installs the process-wide metrics recorder (once) and returns the handle that renders it.
pub fn install_recorder() -> Result<PrometheusHandle, ServerError> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new().build_recorder();
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
        "Writes proposed by this node, by outcome at apply (applied, or the refusal reason)."
    );
    for (name, help) in GAUGES {
        metrics::describe_gauge!(*name, *help);
    }
}

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
];

impl Node {
    fn refresh_gauges(&self) {
        let status = self.consensus.status();
        let state = self.consensus.state();
        let registry = &state.registry;
        let (history, buffered) = self.watch_hub.bytes();
        let leading = status.leader_id == Some(status.node_id) && status.quorum_lease;
        let values: [(&str, f64); 16] = [
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
        ];
        for (name, value) in values {
            metrics::gauge!(name).set(value);
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

/// Serves the operators' listener on `addr` until `stop` turns true.
pub async fn serve(
    addr: &str,
    consensus: Consensus,
    watch_hub: WatchHub,
    admission: Admission,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, ServerError> {
    let prometheus = install_recorder()?;
    let node = Node {
        consensus,
        watch_hub,
        admission,
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
