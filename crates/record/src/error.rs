use std::io;
use std::path::PathBuf;

use crate::reason::Reason;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A payload, envelope, name or key was refused; `reason` is the stable code.
    #[error("{reason}: {detail}")]
    Rejected {
        /// The machine-readable code.
        reason: Reason,
        /// What exactly was wrong, for a human.
        detail: String,
    },
    /// A key file could not be read or written.
    #[error("key file {}: {source}", path.display())]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl RecordError {
    /// A rejection with `reason` and a human-readable `detail`.
    pub fn new(reason: Reason, detail: impl Into<String>) -> RecordError {
        RecordError::Rejected {
            reason,
            detail: detail.into(),
        }
    }

    /// The machine-readable code. Key file I/O errors are local configuration problems, not
    /// protocol rejections; they report [`Reason::Malformed`].
    pub fn reason(&self) -> Reason {
        match self {
            RecordError::Rejected { reason, .. } => *reason,
            RecordError::KeyFile { .. } => Reason::Malformed,
        }
    }

    /// The human-readable detail, without the reason code.
    pub fn detail(&self) -> String {
        match self {
            RecordError::Rejected { detail, .. } => detail.clone(),
            RecordError::KeyFile { .. } => self.to_string(),
        }
    }
}

/// Shorthand for building a rejection inside this crate.
pub(crate) fn reject<T>(reason: Reason, detail: impl Into<String>) -> Result<T, RecordError> {
    Err(RecordError::new(reason, detail))
}
