//! `client.toml`: where the cluster is, which certificate to present, which admin keys to trust.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ClientError;

/// A client configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Client listener addresses (host:port) of some or all nodes.
    pub endpoints: Vec<String>,
    /// SPIFFE trust domain of the cluster.
    pub trust_domain: String,
    /// Certificate files.
    pub tls: ClientTls,
    /// Admin keys pinned at bootstrap: every record is verified back to them.
    pub trust: TrustConfig,
    /// Admin signing key (ed25519 seed file) used by `bind` and admin deregistration.
    #[serde(default)]
    pub admin_key: Option<PathBuf>,
    /// Time one attempt of a call may take (one node's answer).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Time a whole call may take, retries included: long enough to span a leader election.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Local address to connect from (multi-homed hosts; tests that partition a client).
    #[serde(default)]
    pub source_ip: Option<std::net::IpAddr>,
    /// File (relative to this config) where the client keeps the highest admin-set and binding
    /// versions it has verified, so a restarted client cannot be rolled back either.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// What the client demands of the audit log with every answer.
    #[serde(default)]
    pub audit: AuditConfig,
}

/// `[audit]`: the audit evidence every Resolve and List answer must carry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Ask for and check the evidence: a quorum-signed checkpoint, proofs that the answer's tree
    /// extends it and every tree this client saw before, and an inclusion proof of each record.
    #[serde(default = "yes")]
    pub verify: bool,
    /// Refuse answers without a checkpoint even before this client has seen one (set it once
    /// the cluster's checkpoint keys are bound). Without it, a client that never saw a
    /// checkpoint accepts answers that carry none; once it has seen one, it demands them.
    #[serde(default)]
    pub require_checkpoint: bool,
    /// Refuse an answer whose checkpoint is older than this: how long a lying node can keep
    /// serving a frozen answer. Nodes sign one every 2 s while there is a leader.
    #[serde(default = "default_checkpoint_max_age_ms")]
    pub checkpoint_max_age_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> AuditConfig {
        AuditConfig {
            verify: true,
            require_checkpoint: false,
            checkpoint_max_age_ms: default_checkpoint_max_age_ms(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_checkpoint_max_age_ms() -> u64 {
    30_000
}

/// Below this, a healthy cluster's checkpoints (every 2 s, plus the cosigning round and clock
/// skew) would be refused as too old.
pub const CHECKPOINT_MAX_AGE_MIN_MS: u64 = 3_000;

fn default_timeout_ms() -> u64 {
    5_000
}

fn default_deadline_ms() -> u64 {
    15_000
}

/// Certificate files presented by the client.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Client certificate (PEM) with a SPIFFE URI SAN.
    pub cert: PathBuf,
    /// Client private key (PEM).
    pub key: PathBuf,
    /// Optional CRL (PEM) to check servers against.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// The pinned genesis admin set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Genesis admin public keys (hex).
    pub admin_keys: Vec<String>,
    /// Genesis threshold.
    #[serde(default = "one")]
    pub admin_threshold: u32,
    /// Refuse answers whose admin set is older than this version (pin it after a rotation,
    /// so even a client that never saw the cluster cannot be shown the old set).
    #[serde(default)]
    pub min_admin_version: u64,
}

fn one() -> u32 {
    1
}

impl ClientConfig {
    /// Reads a config file, resolving relative paths against its directory.
    pub fn load(path: &Path) -> Result<ClientConfig, ClientError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClientError::Config(format!("reading {}: {e}", path.display())))?;
        let mut config: ClientConfig = toml::from_str(&text)
            .map_err(|e| ClientError::Config(format!("parsing {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut config.tls.ca);
        fix(&mut config.tls.cert);
        fix(&mut config.tls.key);
        if let Some(crl) = &mut config.tls.crl {
            fix(crl);
        }
        if let Some(k) = &mut config.admin_key {
            fix(k);
        }
        if let Some(f) = &mut config.state_file {
            fix(f);
        }
        if config.endpoints.is_empty() {
            return Err(ClientError::Config("endpoints must not be empty".into()));
        }
        if config.audit.checkpoint_max_age_ms < CHECKPOINT_MAX_AGE_MIN_MS {
            return Err(ClientError::Config(format!(
                "audit.checkpoint_max_age_ms must be at least {CHECKPOINT_MAX_AGE_MIN_MS}: checkpoints are signed every 2 s"
            )));
        }
        if config.timeout_ms == 0 || config.deadline_ms < config.timeout_ms {
            return Err(ClientError::Config(
                "need 0 < timeout_ms <= deadline_ms (one attempt fits in the call)".into(),
            ));
        }
        Ok(config)
    }
}
