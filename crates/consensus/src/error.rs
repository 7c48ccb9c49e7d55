use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageError, StorageIOError};

use crate::type_config::NodeAddr;

/// Wraps any error as openraft's storage error for `subject`, the one error type openraft's
/// storage traits accept.
pub(crate) fn io_error<E: std::error::Error + 'static>(
    subject: ErrorSubject<u64>,
    verb: ErrorVerb,
    e: &E,
) -> StorageError<u64> {
    StorageError::IO {
        source: StorageIOError::new(subject, verb, AnyError::new(e)),
    }
}

/// Errors of the consensus layer, as the server needs to tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    /// This node is not the leader; the request must go to `leader` (if one is known).
    #[error("not the leader; leader is {}", leader.as_ref().map(|(id, a)| format!("node {id} at {}", a.client_addr)).unwrap_or_else(|| "unknown".into()))]
    NotLeader {
        /// The current leader, when this node knows it.
        leader: Option<(u64, NodeAddr)>,
    },
    /// Raft could not complete the request now (no quorum, shutting down); safe to retry.
    #[error("consensus unavailable: {0}")]
    Unavailable(String),
    /// The request is invalid for the cluster (bad membership change and the like).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The local store failed; the node cannot continue safely.
    #[error("storage: {0}")]
    Storage(#[from] signpost_storage::StorageError),
    /// Persisted data could not be decoded.
    #[error("corrupt {what}: {detail}")]
    Corrupt {
        /// Which record.
        what: &'static str,
        /// The decode error.
        detail: String,
    },
    /// The log ends below the committed index this node recorded: it lost acknowledged entries.
    #[error(
        "the Raft log in {dir} ends at index {last}, but this node had recorded index {committed} \
         as committed and synced: the log lost entries it acknowledged (a damaged or truncated \
         write-ahead log?). Refusing to start with a shorter log. To rejoin this node: while a \
         majority of the other members is up, stop it, move {dir} aside, and start it again with \
         an empty data directory; it catches up from the leader"
    )]
    LogBehindWatermark {
        /// Last index in the log.
        last: u64,
        /// The recorded committed index.
        committed: u64,
        /// The database directory.
        dir: String,
    },
    /// The registry state could not be loaded.
    #[error("state: {0}")]
    State(#[from] signpost_state::StateError),
    /// The stored registry was bootstrapped with another genesis admin set than the config's.
    #[error(
        "the registry in {dir} has another genesis admin set than [bootstrap] in this node's \
         config: the data directory belongs to another cluster (or the config does). Refusing \
         to start"
    )]
    ForeignGenesis {
        /// The database directory.
        dir: String,
    },
    /// A backup file that cannot be used, or a restore that cannot proceed.
    #[error("backup: {0}")]
    Backup(String),
    /// The audit log: a proof that cannot be made here, or stored audit data that is corrupt.
    #[error("audit log: {0}")]
    Audit(#[from] signpost_audit::AuditError),
}

impl ConsensusError {
    /// A copy of this error for each waiter of a batch (group commit, batched read index):
    /// one Raft failure answers many callers. The variants Raft returns copy exactly; any other
    /// keeps its message as `Unavailable`.
    pub(crate) fn duplicate(&self) -> ConsensusError {
        match self {
            ConsensusError::NotLeader { leader } => ConsensusError::NotLeader {
                leader: leader.clone(),
            },
            ConsensusError::Invalid(why) => ConsensusError::Invalid(why.clone()),
            ConsensusError::Unavailable(why) => ConsensusError::Unavailable(why.clone()),
            other => ConsensusError::Unavailable(other.to_string()),
        }
    }
}
