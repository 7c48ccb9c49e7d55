use thiserror::Error;

/// What can go wrong with the audit tree, its stored form or a proof.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AuditError {
    /// Stored bytes that are not what this crate wrote.
    #[error("corrupt {what}: {detail}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// A proof asked about leaves or sizes the tree does not have.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// A node hash a proof needs is not stored here (pruned, or installed by snapshot).
    #[error("node at level {level}, index {index} is not stored here")]
    Missing {
        /// Level of the perfect subtree (0: a leaf).
        level: u8,
        /// Its index among the subtrees of that level.
        index: u64,
    },
    /// A proof that does not verify, or is not even shaped like one.
    #[error("proof does not verify: {0}")]
    BadProof(String),
    /// The node source failed for a reason of its own (I/O).
    #[error("reading the tree: {0}")]
    Source(String),
    /// A checkpoint or checkpoint note that is not well formed, or not for this log.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A checkpoint note with a signature by a checkpoint key that does not verify.
    #[error("checkpoint signature: {0}")]
    Signatures(String),
    /// A checkpoint signed by too few of the bound checkpoint keys.
    #[error("checkpoint has {have} valid signatures of checkpoint keys; {need} are needed")]
    Quorum {
        /// Distinct bound keys whose signatures verified.
        have: usize,
        /// A majority of the bound keys.
        need: usize,
    },
    /// A checkpoint of a smaller tree than one already trusted.
    #[error("checkpoint of {offered} records is older than the trusted one of {trusted}")]
    Rollback {
        /// Size of the trusted checkpoint.
        trusted: u64,
        /// Size of the one offered.
        offered: u64,
    },
    /// A checkpoint whose tree is not an extension of the trusted one.
    #[error("checkpoint forks from the trusted tree: {0}")]
    Fork(String),
}
