//! The crate's single error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in `signpost-identity`.
///
/// Messages name the file, the identity or the rule involved, because the operator reading
/// them has to fix a file or a certificate, not the code.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A SPIFFE ID (or one of its parts) does not follow the grammar.
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    InvalidSpiffeId {
        /// The rejected text.
        input: String,
        /// Which rule it broke.
        reason: String,
    },

    /// A certificate carries no URI SAN, so it names no SPIFFE identity.
    #[error("certificate has no URI SAN (expected exactly one spiffe:// URI)")]
    UriSanMissing,

    /// A certificate carries more than one URI SAN, so its identity is ambiguous.
    #[error("certificate has {count} URI SANs (expected exactly one spiffe:// URI)")]
    UriSanMultiple {
        /// How many URI SANs were found.
        count: usize,
    },

    /// DER or PEM that does not parse as the expected certificate, key or CRL.
    #[error("cannot parse {what}: {reason}")]
    Parse {
        /// What was being parsed, including the file when there is one.
        what: String,
        /// The parser's complaint.
        reason: String,
    },

    /// A file system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being attempted ("read", "create", "rename", ...).
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },

    /// `Ca::init` found an existing CA and refused to overwrite it.
    #[error("a CA already exists in {dir} (found {file}); refusing to overwrite it")]
    CaExists {
        /// The CA directory.
        dir: PathBuf,
        /// The file that is already there.
        file: PathBuf,
    },

    /// The CA directory is inconsistent (e.g. key and certificate do not belong together).
    #[error("invalid CA in {dir}: {reason}")]
    InvalidCa {
        /// The CA directory.
        dir: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A certificate handed to the CA was not issued by it.
    #[error("{path} was not issued by this CA: {reason}")]
    NotIssuedByCa {
        /// The certificate file.
        path: PathBuf,
        /// Why it is not ours.
        reason: String,
    },

    /// Issue options that cannot produce a usable certificate.
    #[error("invalid issue options: {0}")]
    InvalidIssueOptions(String),

    /// rcgen refused to build or sign a certificate or CRL.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),

    /// A CRL file that cannot be used with this CA.
    #[error("unusable CRL {path}: {reason}")]
    InvalidCrl {
        /// The CRL file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// rustls rejected a configuration (certificate/key mismatch, bad key, ...).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),

    /// rustls could not build a certificate verifier from the roots and CRLs.
    #[error("TLS verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),

    /// The peer's SPIFFE ID does not satisfy the configured rule.
    #[error("peer {actual} does not match the expected peer ({expected})")]
    PeerMismatch {
        /// The rule, as text.
        expected: String,
        /// The peer's SPIFFE ID.
        actual: String,
    },

    /// An address that cannot be dialled or bound.
    #[error("invalid address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A network operation failed.
    #[error("{action} {addr}: {source}")]
    Net {
        /// What was being attempted ("connect to", "bind", "TLS handshake with", ...).
        action: &'static str,
        /// The peer or local address.
        addr: String,
        /// The underlying error.
        source: io::Error,
    },

    /// A network operation did not finish in time.
    #[error("{action} {addr} timed out after {timeout_ms} ms")]
    Timeout {
        /// What was being attempted.
        action: &'static str,
        /// The peer address.
        addr: String,
        /// The limit that was exceeded.
        timeout_ms: u128,
    },

    /// Installing a signal handler failed.
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(#[source] io::Error),
}

/// Result alias for this crate.
pub type Result<T, E = IdentityError> = std::result::Result<T, E>;

impl IdentityError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        IdentityError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn parse(what: impl Into<String>, reason: impl ToString) -> Self {
        IdentityError::Parse {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}
