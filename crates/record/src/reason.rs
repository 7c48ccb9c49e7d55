use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::RecordError;

/// Why a write or a verification was refused: a stable, machine-readable code.
///
/// The snake_case strings from [`Reason::as_str`] travel to clients (the `signpost-reason` gRPC
/// metadata) and the variants travel in Raft log outcomes, where bincode encodes them by
/// position: add new reasons at the end only, and never rename a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Bytes that do not decode, or a field of the wrong length (key id, signature).
    Malformed,
    /// An envelope, payload or list above its byte or count limit.
    Oversized,
    /// A signature that does not verify (strictly) over the domain-separated payload.
    BadSignature,
    /// The registry has no admin set yet (no genesis).
    NoAdminSet,
    /// The signing key is not in the current admin set.
    NotAdmin,
    /// Fewer distinct current admin keys signed than the threshold requires.
    ThresholdNotMet,
    /// No binding exists for the service.
    NoBinding,
    /// The signing key is not bound to the service.
    UnboundKey,
    /// The binding's `not_before_ms` is in the future.
    BindingNotYetValid,
    /// The binding's `not_after_ms` is in the past.
    BindingExpired,
    /// The sequence is not above the last accepted sequence of the instance.
    StaleSequence,
    /// The version is not above the current version (binding, admin set).
    StaleVersion,
    /// `issued_at_ms` is further in the future than the allowed clock skew.
    FutureIssuedAt,
    /// `issued_at_ms` is older than the allowed age.
    Expired,
    /// A service name or instance id outside the name grammar.
    InvalidName,
    /// A field outside its limits (endpoints, metadata, ttl, keys, threshold, ...).
    InvalidField,
    /// The instance (or service) does not exist.
    NotFound,
    /// Genesis was already applied.
    AlreadyInitialized,
    /// The service already has the maximum number of instances.
    QuotaInstances,
    /// The registry already has the maximum number of services.
    QuotaServices,
    /// The registry's stored state is at or above its byte quota.
    QuotaStateBytes,
    /// The record names a different service than the binding it was checked against.
    WrongService,
    /// An admin rotation that would leave a binding signed by a key outside the new admin
    /// set; the rotation must carry that binding re-signed by a key of the new set.
    RotationIncomplete,
}

impl Reason {
    /// Every reason, in declaration order.
    pub const ALL: [Reason; 23] = [
        Reason::Malformed,
        Reason::Oversized,
        Reason::BadSignature,
        Reason::NoAdminSet,
        Reason::NotAdmin,
        Reason::ThresholdNotMet,
        Reason::NoBinding,
        Reason::UnboundKey,
        Reason::BindingNotYetValid,
        Reason::BindingExpired,
        Reason::StaleSequence,
        Reason::StaleVersion,
        Reason::FutureIssuedAt,
        Reason::Expired,
        Reason::InvalidName,
        Reason::InvalidField,
        Reason::NotFound,
        Reason::AlreadyInitialized,
        Reason::QuotaInstances,
        Reason::QuotaServices,
        Reason::QuotaStateBytes,
        Reason::WrongService,
        Reason::RotationIncomplete,
    ];

    /// The stable snake_case code, e.g. `"bad_signature"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::Oversized => "oversized",
            Reason::BadSignature => "bad_signature",
            Reason::NoAdminSet => "no_admin_set",
            Reason::NotAdmin => "not_admin",
            Reason::ThresholdNotMet => "threshold_not_met",
            Reason::NoBinding => "no_binding",
            Reason::UnboundKey => "unbound_key",
            Reason::BindingNotYetValid => "binding_not_yet_valid",
            Reason::BindingExpired => "binding_expired",
            Reason::StaleSequence => "stale_sequence",
            Reason::StaleVersion => "stale_version",
            Reason::FutureIssuedAt => "future_issued_at",
            Reason::Expired => "expired",
            Reason::InvalidName => "invalid_name",
            Reason::InvalidField => "invalid_field",
            Reason::NotFound => "not_found",
            Reason::AlreadyInitialized => "already_initialized",
            Reason::QuotaInstances => "quota_instances",
            Reason::QuotaServices => "quota_services",
            Reason::QuotaStateBytes => "quota_state_bytes",
            Reason::WrongService => "wrong_service",
            Reason::RotationIncomplete => "rotation_incomplete",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Reason {
    type Err = RecordError;

    fn from_str(s: &str) -> Result<Reason, RecordError> {
        Reason::ALL
            .iter()
            .copied()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                RecordError::new(Reason::Malformed, format!("unknown reason code {s:?}"))
            })
    }
}
