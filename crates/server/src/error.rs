//! Server errors and the one place where reasons become gRPC status codes.

use signpost_consensus::ConsensusError;
use signpost_record::Reason;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// Metadata key carrying the machine-readable reason of a refusal.
pub const REASON_METADATA: &str = signpost_proto::wire::REASON;
/// Metadata key carrying the leader's client address when a node is not the leader.
pub const LEADER_METADATA: &str = signpost_proto::wire::LEADER;
/// Metadata key carrying a retry hint (milliseconds) on RESOURCE_EXHAUSTED/UNAVAILABLE.
pub const RETRY_AFTER_METADATA: &str = signpost_proto::wire::RETRY_AFTER_MS;

/// Errors that stop a node from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error("config: {0}")]
    Config(String),
    /// Certificates or TLS setup failed.
    #[error("tls: {0}")]
    Tls(#[from] signpost_identity::IdentityError),
    /// Consensus failed to start.
    #[error("consensus: {0}")]
    Consensus(#[from] ConsensusError),
    /// A listener failed.
    #[error("listener {addr}: {detail}")]
    Listener {
        /// Address of the listener.
        addr: String,
        /// What failed.
        detail: String,
    },
    /// Consensus stopped for good while serving (a storage failure): the node left service.
    #[error("fatal: {0}; the node left service (fix the disk, then restart it)")]
    Fatal(String),
}

/// The gRPC code for an apply or pre-check refusal. Every reason has exactly one code.
pub fn reason_code(reason: Reason) -> Code {
    use Reason::*;
    match reason {
        Malformed | Oversized | InvalidName | InvalidField | FutureIssuedAt => {
            Code::InvalidArgument
        }
        BadSignature => Code::Unauthenticated,
        NotAdmin | ThresholdNotMet | NoBinding | UnboundKey | WrongService => {
            Code::PermissionDenied
        }
        BindingNotYetValid | BindingExpired | StaleSequence | StaleVersion | Expired
        | RotationIncomplete => Code::FailedPrecondition,
        NotFound => Code::NotFound,
        AlreadyInitialized => Code::AlreadyExists,
        QuotaInstances | QuotaServices | QuotaStateBytes => Code::ResourceExhausted,
        NoAdminSet => Code::Unavailable,
    }
}

/// A refusal with its reason in the message and in `signpost-reason` metadata.
pub fn refusal(reason: Reason, detail: &str) -> Status {
    let mut status = Status::new(
        reason_code(reason),
        format!("{}: {detail}", reason.as_str()),
    );
    status
        .metadata_mut()
        .insert(REASON_METADATA, MetadataValue::from_static(reason.as_str()));
    status
}

/// A PERMISSION_DENIED naming the authorization rule that refused.
pub fn denied(rule: &str, detail: &str) -> Status {
    let mut status = Status::permission_denied(format!("rule {rule}: {detail}"));
    if let Ok(v) = MetadataValue::try_from(rule) {
        status.metadata_mut().insert(signpost_proto::wire::RULE, v);
    }
    status
}

/// RESOURCE_EXHAUSTED with a retry hint.
pub fn shed(limit: &'static str, what: &str, retry_after_ms: u64) -> Status {
    let mut status = Status::resource_exhausted(format!("{what}; retry after {retry_after_ms} ms"));
    status
        .metadata_mut()
        .insert(RETRY_AFTER_METADATA, MetadataValue::from(retry_after_ms));
    status.metadata_mut().insert(
        signpost_proto::wire::SHED,
        MetadataValue::from_static(limit),
    );
    status
}

/// Maps a consensus error for a client: "not the leader" carries the leader's address so the
/// client can follow it.
pub fn consensus_status(e: ConsensusError) -> Status {
    match e {
        ConsensusError::NotLeader {
            leader: Some((id, addr)),
        } => {
            let mut status = Status::failed_precondition(format!(
                "not_leader: the leader is node {id} at {}",
                addr.client_addr
            ));
            status
                .metadata_mut()
                .insert(REASON_METADATA, MetadataValue::from_static("not_leader"));
            if let Ok(v) = MetadataValue::try_from(addr.client_addr.as_str()) {
                status.metadata_mut().insert(LEADER_METADATA, v);
            }
            status
        }
        ConsensusError::NotLeader { leader: None } => {
            // Elections take well under a second: a short hint, so clients notice the new
            // leader soon without polling hard.
            let mut status =
                Status::unavailable("no leader with a quorum is known here; retry shortly");
            status
                .metadata_mut()
                .insert(RETRY_AFTER_METADATA, MetadataValue::from(50u64));
            status
        }
        ConsensusError::Unavailable(m) => {
            let mut status = Status::unavailable(m);
            status
                .metadata_mut()
                .insert(RETRY_AFTER_METADATA, MetadataValue::from(200u64));
            status
        }
        ConsensusError::Invalid(m) => Status::invalid_argument(m),
        ConsensusError::Backup(m) => Status::failed_precondition(m),
        ConsensusError::Audit(e) => audit_status(e),
        e @ (ConsensusError::Storage(_)
        | ConsensusError::Corrupt { .. }
        | ConsensusError::LogBehindWatermark { .. }
        | ConsensusError::ForeignGenesis { .. }
        | ConsensusError::State(_)) => Status::internal(e.to_string()),
    }
}

/// An audit log error for a client: a question about records or sizes the tree does not have
/// is OUT_OF_RANGE, records this node no longer stores FAILED_PRECONDITION (`pruned`: ask a
/// node that has them), a checkpoint that does not hold FAILED_PRECONDITION, damage INTERNAL.
fn audit_status(e: signpost_audit::AuditError) -> Status {
    use signpost_audit::AuditError;
    match e {
        AuditError::OutOfRange(m) | AuditError::BadProof(m) => Status::out_of_range(m),
        e @ AuditError::Missing { .. } => {
            let mut status = Status::failed_precondition(format!(
                "pruned: {e}; the records it needs came here in a snapshot or were pruned"
            ));
            status
                .metadata_mut()
                .insert(REASON_METADATA, MetadataValue::from_static("pruned"));
            status
        }
        e @ (AuditError::Corrupt { .. } | AuditError::Source(_)) => Status::internal(e.to_string()),
        // A checkpoint that does not hold against this node's keys or tree: the cluster is not
        // in a state to answer with one (keys rebound, no quorum yet).
        e @ (AuditError::Checkpoint(_)
        | AuditError::Signatures(_)
        | AuditError::Quorum { .. }
        | AuditError::Rollback { .. }
        | AuditError::Fork(_)) => Status::failed_precondition(e.to_string()),
    }
}
