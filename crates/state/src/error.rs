/// Everything that can go wrong in this crate. Apply never fails (a refused command is an
/// [`crate::Outcome::Rejected`]); only loading persisted state can.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A persisted key is not one this crate writes.
    #[error("corrupt state key {key}: {detail}")]
    CorruptKey {
        /// The key, with non-printable bytes escaped.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A persisted value does not decode, or contradicts its key or itself.
    #[error("corrupt state value at {key}: {detail}")]
    CorruptValue {
        /// The key, with non-printable bytes escaped.
        key: String,
        /// What is wrong with the value.
        detail: String,
    },
    /// Values that decode one by one but break an invariant together.
    #[error("inconsistent state: {detail}")]
    Inconsistent {
        /// Which invariant, and where.
        detail: String,
    },
}

/// Renders a key for an error message without trusting it to be text.
pub(crate) fn escape_key(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}
