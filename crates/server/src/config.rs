//! Node configuration, read from a TOML file. Relative paths are relative to the file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ServerError;

/// A node's configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's id; must appear in `members` for a new cluster.
    pub node_id: u64,
    /// Directory for the node's RocksDB database.
    pub data_dir: PathBuf,
    /// Listen address (host:port) of the client listener.
    pub client_addr: String,
    /// Listen address (host:port) of the node-only Raft listener.
    pub raft_addr: String,
    /// SPIFFE trust domain of every certificate in the cluster.
    pub trust_domain: String,
    /// Certificates.
    pub tls: TlsConfig,
    /// Initial members, used once to initialize a new cluster; with `join`, the members of
    /// the running cluster this node joins (the only peers it admits until it learns the
    /// membership from the leader).
    pub members: Vec<MemberConfig>,
    /// This node joins a running cluster (an admin adds it with `signpost cluster add`)
    /// instead of initializing one: it must not be listed in `members`.
    #[serde(default)]
    pub join: bool,
    /// Genesis admin keys and quotas, proposed once as the first registry entry.
    pub bootstrap: BootstrapConfig,
    /// Raft timing and log compaction.
    #[serde(default)]
    pub raft: RaftConfig,
    /// Client-side limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Change feed limits.
    #[serde(default)]
    pub watch: WatchConfig,
    /// The audit log's checkpoints.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Plain-HTTP listener for operators: `/metrics` (Prometheus text format), `/healthz`
    /// (the process is alive) and `/readyz` (ready for client traffic). None: no listener. It
    /// serves no registry data, only counters and health; bind it where only monitoring
    /// reaches it.
    #[serde(default)]
    pub metrics_addr: Option<String>,
}

/// Limits of the change feed (Watch).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// Events kept in memory for watchers resuming from a past revision.
    pub history_events_max: usize,
    /// Bytes of events kept in memory for watchers resuming from a past revision.
    pub history_bytes_max: usize,
    /// Events buffered per watcher; a watcher that falls this far behind is cancelled.
    pub watcher_buffer_events: usize,
    /// Bytes buffered per watcher; a watcher that falls this far behind is cancelled.
    pub watcher_buffer_bytes: usize,
    /// Bytes buffered by all watchers of the node together; a watcher whose event would pass
    /// it is cancelled.
    pub watch_buffers_bytes_max: usize,
    /// Concurrent watchers on one node.
    pub watchers_max: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            history_events_max: 100_000,
            history_bytes_max: 64 * 1024 * 1024,
            watcher_buffer_events: 1024,
            watcher_buffer_bytes: 1024 * 1024,
            watch_buffers_bytes_max: 256 * 1024 * 1024,
            watchers_max: 20_000,
        }
    }
}

/// The audit log's checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// This node's checkpoint signing key (an ed25519 key file from `signpost keygen`). Its
    /// public key must be bound, with the other nodes', to the service `signpost.checkpoint`
    /// (`signpost bind signpost.checkpoint --key ...`); a majority of the bound keys must sign
    /// a checkpoint. None: this node neither makes nor cosigns checkpoints.
    pub checkpoint_key: Option<PathBuf>,
    /// Bytes of audit records (with their keys and subtree hashes) this node keeps; older ones
    /// are pruned, never past its latest quorum-signed checkpoint. The tree is not cut: the
    /// records before the first kept one are summarized by their subtree hashes.
    pub retain_bytes: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            checkpoint_key: None,
            retain_bytes: signpost_consensus::DEFAULT_AUDIT_RETAIN_BYTES,
        }
    }
}

/// Certificate files of the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate (PEM) every peer and client must chain to.
    pub ca: PathBuf,
    /// This node's certificate (PEM), with a `spiffe://<td>/node/<id>` URI SAN.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// Certificate revocation list (PEM); reloaded when it changes and on SIGHUP.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// Accept TLS 1.2 as well as 1.3.
    #[serde(default)]
    pub allow_tls12: bool,
    /// A handshake not finished within this time is dropped.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// A connection that sends nothing within this time of being accepted is dropped.
    #[serde(default = "default_first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// A connection that does not send the HTTP/2 preface within this time of its handshake is
    /// dropped.
    #[serde(default = "default_preface_timeout_ms")]
    pub preface_timeout_ms: u64,
}

fn default_handshake_timeout_ms() -> u64 {
    signpost_identity::DEFAULT_HANDSHAKE_TIMEOUT.as_millis() as u64
}

fn default_first_byte_timeout_ms() -> u64 {
    signpost_identity::DEFAULT_FIRST_BYTE_TIMEOUT.as_millis() as u64
}

fn default_preface_timeout_ms() -> u64 {
    signpost_identity::DEFAULT_PREFACE_TIMEOUT.as_millis() as u64
}

/// One initial member.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// Node id.
    pub id: u64,
    /// host:port of its client listener.
    pub client_addr: String,
    /// host:port of its Raft listener.
    pub raft_addr: String,
}

/// What the first leader proposes as the genesis entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapConfig {
    /// Genesis admin public keys (hex ed25519).
    pub admin_keys: Vec<String>,
    /// Signatures needed to change the admin set.
    #[serde(default = "one")]
    pub admin_threshold: u32,
    /// Max live instances of one service.
    #[serde(default = "default_instances_per_service")]
    pub instances_per_service_max: u32,
    /// Max services with live instances.
    #[serde(default = "default_services_max")]
    pub services_max: u32,
    /// Max bytes of registry state; beyond it only deletes are accepted.
    #[serde(default = "default_state_bytes_max")]
    pub state_bytes_max: u64,
}

fn one() -> u32 {
    1
}
fn default_instances_per_service() -> u32 {
    1024
}
fn default_services_max() -> u32 {
    10_000
}
fn default_state_bytes_max() -> u64 {
    256 * 1024 * 1024
}

/// Raft timing and compaction.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Leader heartbeat period.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout; also the leader's quorum lease.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout; also the voters' lease, so a leader
    /// crash costs about this long plus part of the range.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind a snapshot.
    pub log_entries_kept: u64,
    /// Group commit: concurrent writes share one log entry (and one fsync per node). Set it
    /// false on every node while upgrading from a version without it (0.1.0 before group
    /// commit), whose nodes stop with "corrupt raft log" on a batch entry; true once all run
    /// this version.
    pub batch_proposals: bool,
    /// A follower forwards the client writes and linearizable reads it admitted to the leader
    /// over the node-only Raft channel, so clients need not find the leader. Off: a follower
    /// answers UNAVAILABLE `not_leader` naming the leader, and clients go there.
    pub forward_to_leader: bool,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_ms: signpost_consensus::DEFAULT_HEARTBEAT_MS,
            election_timeout_min_ms: signpost_consensus::DEFAULT_ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max_ms: signpost_consensus::DEFAULT_ELECTION_TIMEOUT_MAX_MS,
            snapshot_after_entries: 10_000,
            log_entries_kept: 1_000,
            batch_proposals: true,
            forward_to_leader: false,
        }
    }
}

/// Limits on the client listener: sizes, connections, admission control. Every limit here is
/// per node; the README's limits table lists them with their defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest gRPC message accepted on the client listener.
    pub message_bytes_max: usize,
    /// Open connections (handshaking or established) on the client listener.
    pub connections_max: usize,
    /// Open connections from one source IP, for the connection's lifetime.
    pub connections_per_ip_max: usize,
    /// TLS handshakes in progress on the client listener.
    pub handshakes_concurrent_max: usize,
    /// TLS handshakes in progress from one source IP.
    pub handshakes_per_ip_max: usize,
    /// Sustained TLS handshakes started per second from one source IP.
    pub handshakes_per_ip_per_sec: u32,
    /// Burst of TLS handshakes from one source IP.
    pub handshakes_per_ip_burst: u32,
    /// Concurrent gRPC streams per connection.
    pub streams_per_connection_max: u32,
    /// Proposals in flight to Raft from this node; above it writes are shed.
    pub proposals_in_flight_max: usize,
    /// Of `proposals_in_flight_max`, slots only admin identities may use.
    pub proposals_admin_reserved: usize,
    /// Percent of the non-admin proposal slots that registrations of new instances may use;
    /// the rest is kept for renewals, keep-alives and deregistrations.
    pub proposals_new_registration_percent: usize,
    /// Reads (resolve, list) served at once by this node.
    pub reads_in_flight_max: usize,
    /// Sustained writes per second per identity.
    pub writes_per_identity_per_sec: u32,
    /// Burst of writes per identity.
    pub writes_per_identity_burst: u32,
    /// Sustained reads per second per identity.
    pub reads_per_identity_per_sec: u32,
    /// Burst of reads per identity.
    pub reads_per_identity_burst: u32,
    /// Sustained watch/keep-alive stream opens per second per identity.
    pub stream_opens_per_identity_per_sec: u32,
    /// Burst of stream opens per identity.
    pub stream_opens_per_identity_burst: u32,
    /// Open watch streams per identity on this node.
    pub watchers_per_identity_max: usize,
    /// Open keep-alive streams per identity on this node.
    pub keepalives_per_identity_max: usize,
    /// Open watch and keep-alive streams on this node.
    pub streams_max: usize,
    /// Identities whose rate state this node tracks at once.
    pub identities_tracked_max: usize,
    /// An identity unseen this long, without open streams, may be forgotten.
    pub identity_idle_ms: u64,
    /// Per-request timeout on the client listener.
    pub request_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            message_bytes_max: 64 * 1024,
            connections_max: signpost_identity::DEFAULT_CONNECTIONS_MAX,
            connections_per_ip_max: signpost_identity::DEFAULT_CONNECTIONS_PER_IP_MAX,
            handshakes_concurrent_max: signpost_identity::DEFAULT_HANDSHAKES_CONCURRENT_MAX,
            handshakes_per_ip_max: signpost_identity::DEFAULT_HANDSHAKES_PER_IP_MAX,
            handshakes_per_ip_per_sec: signpost_identity::DEFAULT_HANDSHAKES_PER_IP_PER_SEC,
            handshakes_per_ip_burst: signpost_identity::DEFAULT_HANDSHAKES_PER_IP_BURST,
            streams_per_connection_max: 256,
            proposals_in_flight_max: 256,
            proposals_admin_reserved: 32,
            proposals_new_registration_percent: 25,
            reads_in_flight_max: 256,
            writes_per_identity_per_sec: 20,
            writes_per_identity_burst: 40,
            reads_per_identity_per_sec: 100,
            reads_per_identity_burst: 200,
            stream_opens_per_identity_per_sec: 10,
            stream_opens_per_identity_burst: 100,
            watchers_per_identity_max: 64,
            keepalives_per_identity_max: 64,
            streams_max: 10_000,
            identities_tracked_max: 10_000,
            identity_idle_ms: 60_000,
            request_timeout_ms: 10_000,
        }
    }
}

impl Config {
    /// Reads and validates a config file, resolving relative paths against its directory.
    pub fn load(path: &Path) -> Result<Config, ServerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServerError::Config(format!("reading {}: {e}", path.display())))?;
        let mut config: Config = toml::from_str(&text)
            .map_err(|e| ServerError::Config(format!("parsing {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.tls.ca);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        if let Some(crl) = &mut self.tls.crl {
            fix(crl);
        }
        if let Some(key) = &mut self.audit.checkpoint_key {
            fix(key);
        }
    }

    /// The configured members as consensus addresses (the initial cluster, or the running
    /// cluster a joining node is added to).
    pub fn member_addrs(&self) -> std::collections::BTreeMap<u64, signpost_consensus::NodeAddr> {
        self.members
            .iter()
            .map(|m| {
                (
                    m.id,
                    signpost_consensus::NodeAddr {
                        raft_addr: m.raft_addr.clone(),
                        client_addr: m.client_addr.clone(),
                    },
                )
            })
            .collect()
    }

    /// The genesis admin set `[bootstrap]` describes: what this node's registry must start
    /// from, whether it proposes the genesis entry or receives it.
    pub fn genesis_admin_set(&self) -> Result<signpost_record::AdminSet, ServerError> {
        let mut keys = Vec::new();
        for key in &self.bootstrap.admin_keys {
            let parsed = signpost_record::parse_public_key_hex(key)
                .map_err(|e| ServerError::Config(format!("bootstrap.admin_keys: {e}")))?;
            keys.push(parsed.to_bytes());
        }
        signpost_record::AdminSet::new(
            &keys,
            self.bootstrap.admin_threshold,
            signpost_record::AdminSet::GENESIS_VERSION,
        )
        .map_err(|e| ServerError::Config(format!("bootstrap: {e}")))
    }

    /// Checks what can be checked without touching the network.
    pub fn validate(&self) -> Result<(), ServerError> {
        let bad = |m: String| Err(ServerError::Config(m));
        if self.node_id == 0 {
            return bad("node_id must be > 0".into());
        }
        if self.members.is_empty() {
            return bad("members must list at least this node".into());
        }
        let listed = self.members.iter().any(|m| m.id == self.node_id);
        if self.join && listed {
            return bad(format!(
                "join = true, but node {} is listed in members: a joining node lists the \
                 members of the cluster it joins, without itself",
                self.node_id
            ));
        }
        if !self.join && !listed {
            return bad(format!(
                "node {} is not listed in members (set join = true to join a running cluster)",
                self.node_id
            ));
        }
        let mut ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.members.len() || ids.contains(&0) {
            return bad("member ids must be unique and > 0".into());
        }
        if self.bootstrap.admin_keys.is_empty() {
            return bad("bootstrap.admin_keys must not be empty".into());
        }
        let retain_min = signpost_consensus::audit_retention::RETAIN_BYTES_MIN;
        if self.audit.retain_bytes < retain_min {
            return bad(format!(
                "audit.retain_bytes is {}, below the minimum of {retain_min}",
                self.audit.retain_bytes
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for key in &self.bootstrap.admin_keys {
            let parsed = signpost_record::parse_public_key_hex(key)
                .map_err(|e| ServerError::Config(format!("bootstrap.admin_keys: {e}")))?;
            // A small-order key verifies signatures that anyone can make; a duplicate would
            // count one signer twice towards the threshold.
            if parsed.is_weak() {
                return bad(format!(
                    "bootstrap.admin_keys: {key} is a small-order (weak) key"
                ));
            }
            if !seen.insert(parsed.to_bytes()) {
                return bad(format!("bootstrap.admin_keys: {key} appears twice"));
            }
        }
        let t = self.bootstrap.admin_threshold as usize;
        if t == 0 || t > self.bootstrap.admin_keys.len() {
            return bad("bootstrap.admin_threshold must be in 1..=len(admin_keys)".into());
        }
        if self.raft.election_timeout_min_ms <= self.raft.heartbeat_ms * 2
            || self.raft.election_timeout_max_ms <= self.raft.election_timeout_min_ms
        {
            return bad(
                "raft: need heartbeat*2 < election_timeout_min < election_timeout_max".into(),
            );
        }
        let w = &self.watch;
        if w.history_events_max == 0
            || w.watcher_buffer_events == 0
            || w.watchers_max == 0
            || w.history_bytes_max == 0
            || w.watch_buffers_bytes_max == 0
        {
            return bad("watch: every limit must be > 0".into());
        }
        // One event of the largest size must fit, or a watcher could never make progress.
        let event_max = 2 * signpost_record::ENVELOPE_BYTES_MAX + 1024;
        if w.watcher_buffer_bytes < event_max || w.history_bytes_max < event_max {
            return bad(format!(
                "watch: watcher_buffer_bytes and history_bytes_max must be at least {event_max} \
                 (one event of the largest size)"
            ));
        }
        let l = &self.limits;
        if l.proposals_admin_reserved >= l.proposals_in_flight_max {
            return bad(
                "limits.proposals_admin_reserved must be below proposals_in_flight_max".into(),
            );
        }
        if [
            l.connections_max,
            l.connections_per_ip_max,
            l.handshakes_concurrent_max,
            l.handshakes_per_ip_max,
            l.reads_in_flight_max,
            l.identities_tracked_max,
        ]
        .contains(&0)
        {
            return bad(
                "limits: connection, handshake, read and identity maxima must be > 0".into(),
            );
        }
        if self.limits.message_bytes_max < 16 * 1024 {
            return bad("limits.message_bytes_max must be at least 16384 (one envelope)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with_admin_keys(keys: &[String]) -> Config {
        let keys = keys
            .iter()
            .map(|k| format!("\"{k}\""))
            .collect::<Vec<_>>()
            .join(", ");
        toml::from_str(&format!(
            "node_id = 1\ndata_dir = \"d\"\nclient_addr = \"127.0.0.1:1\"\nraft_addr = \"127.0.0.1:2\"\n\
             trust_domain = \"t\"\n[tls]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n\
             [bootstrap]\nadmin_keys = [{keys}]\n[[members]]\nid = 1\nclient_addr = \"127.0.0.1:1\"\n\
             raft_addr = \"127.0.0.1:2\"\n"
        ))
        .expect("config parses")
    }

    fn key_hex() -> String {
        hex::encode(
            signpost_record::generate_signing_key()
                .verifying_key()
                .to_bytes(),
        )
    }

    #[test]
    fn a_node_joins_only_when_it_says_so_and_is_not_listed_among_the_members() {
        let mut config = config_with_admin_keys(&[key_hex()]);
        assert!(config.validate().is_ok(), "a listed node that initializes");

        config.join = true;
        let listed_and_joining = config.validate();
        assert!(
            matches!(&listed_and_joining, Err(ServerError::Config(m)) if m.contains("is listed in members")),
            "{listed_and_joining:?}"
        );

        config.node_id = 2;
        assert!(config.validate().is_ok(), "an unlisted node that joins");

        config.join = false;
        let unlisted = config.validate();
        assert!(
            matches!(&unlisted, Err(ServerError::Config(m)) if m.contains("set join = true")),
            "{unlisted:?}"
        );
    }

    #[test]
    fn admin_keys_must_be_distinct_and_not_small_order() {
        let good = key_hex();
        assert!(config_with_admin_keys(std::slice::from_ref(&good))
            .validate()
            .is_ok());

        let twice = config_with_admin_keys(&[good.clone(), good.clone()]).validate();
        assert!(matches!(twice, Err(ServerError::Config(m)) if m.contains("appears twice")));

        // The identity point: a valid encoding of a small-order key.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = config_with_admin_keys(&[hex::encode(identity)]).validate();
        assert!(matches!(weak, Err(ServerError::Config(m)) if m.contains("small-order")));
    }

    #[test]
    fn the_audit_retention_budget_has_a_floor() {
        let min = signpost_consensus::audit_retention::RETAIN_BYTES_MIN;
        let mut config = config_with_admin_keys(&[key_hex()]);
        config.audit.retain_bytes = min;
        assert!(config.validate().is_ok());
        config.audit.retain_bytes = min - 1;
        let low = config.validate();
        assert!(
            matches!(&low, Err(ServerError::Config(m)) if m.contains("audit.retain_bytes")),
            "{low:?}"
        );
    }
}
