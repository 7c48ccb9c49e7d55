use tonic::Code;

/// Errors of the Rust client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the request.
    #[error("{}: {message}", code_name(*code))]
    Refused {
        /// gRPC status code.
        code: Code,
        /// The server's message.
        message: String,
        /// Machine-readable reason (`signpost-reason` metadata), when given.
        reason: Option<String>,
    },
    /// No node could be reached (after retries).
    #[error("UNAVAILABLE: no node answered: {0}")]
    Unavailable(String),
    /// The client configuration is invalid.
    #[error("config: {0}")]
    Config(String),
    /// TLS or certificate setup failed.
    #[error("tls: {0}")]
    Tls(#[from] signpost_identity::IdentityError),
    /// The leader no longer knows an instance whose lease we renew (it expired).
    #[error("NOT_FOUND: lease lost: {service}/{instance} is no longer registered")]
    LeaseLost {
        /// Service name.
        service: String,
        /// Instance id.
        instance: String,
    },
    /// A response failed end-to-end verification on every node tried.
    #[error("verification failed: {0}")]
    Verification(String),
}

impl ClientError {
    /// The gRPC code, for refusals.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            ClientError::Unavailable(_) => Some(Code::Unavailable),
            _ => None,
        }
    }

    /// The machine-readable reason, for refusals.
    pub fn reason(&self) -> Option<&str> {
        match self {
            ClientError::Refused { reason, .. } => reason.as_deref(),
            _ => None,
        }
    }

    pub(crate) fn from_status(status: &tonic::Status) -> ClientError {
        ClientError::Refused {
            code: status.code(),
            message: status.message().to_string(),
            reason: status
                .metadata()
                .get(crate::REASON_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        }
    }
}

/// The canonical upper-case name of a gRPC code, as operators see it in docs and logs.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
