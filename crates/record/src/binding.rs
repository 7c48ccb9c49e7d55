use std::collections::BTreeSet;

use signpost_proto::v1::{BindingPayload, Envelope};

use crate::admin_set::AdminSet;
use crate::error::{reject, RecordError};
use crate::key_set::parse_key_set;
use crate::limits::{BINDING_KEYS_MAX, PUBLIC_KEY_BYTES};
use crate::name::validate_service_name;
use crate::reason::Reason;
use crate::verified::{open_binding, open_record, VerifiedRecord};

/// Which keys may sign records for one service, as an admin signed it.
///
/// An empty key set is allowed: it is how an admin revokes every key of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The service name.
    pub service: String,
    /// The raw ed25519 public keys that may sign records for the service.
    pub keys: BTreeSet<[u8; PUBLIC_KEY_BYTES]>,
    /// Strictly increasing per service.
    pub version: u64,
    /// First millisecond (inclusive) at which the binding is valid; 0 means unbounded.
    pub not_before_ms: u64,
    /// Last millisecond (inclusive) at which the binding is valid; 0 means unbounded.
    pub not_after_ms: u64,
}

impl Binding {
    /// Validates a decoded binding payload: service name, keys (at most [`BINDING_KEYS_MAX`],
    /// 32-byte valid points, no duplicates), version at least 1 and an ordered window.
    pub fn from_payload(payload: &BindingPayload) -> Result<Binding, RecordError> {
        validate_service_name(&payload.service)?;
        let keys = parse_key_set(
            "binding",
            payload.public_keys.iter().map(Vec::as_slice),
            BINDING_KEYS_MAX,
        )?;
        if payload.version == 0 {
            return reject(Reason::InvalidField, "binding version must be at least 1");
        }
        if payload.not_before_ms != 0
            && payload.not_after_ms != 0
            && payload.not_before_ms > payload.not_after_ms
        {
            return reject(
                Reason::InvalidField,
                format!(
                    "binding window is empty: not_before_ms {} is after not_after_ms {}",
                    payload.not_before_ms, payload.not_after_ms
                ),
            );
        }
        Ok(Binding {
            service: payload.service.clone(),
            keys,
            version: payload.version,
            not_before_ms: payload.not_before_ms,
            not_after_ms: payload.not_after_ms,
        })
    }

    /// Whether `key` may sign records for the service.
    pub fn contains_key(&self, key: &[u8; PUBLIC_KEY_BYTES]) -> bool {
        self.keys.contains(key)
    }

    /// Checks that `now_ms` lies inside the validity window (both ends inclusive).
    pub fn check_window(&self, now_ms: u64) -> Result<(), RecordError> {
        if self.not_before_ms != 0 && now_ms < self.not_before_ms {
            return reject(
                Reason::BindingNotYetValid,
                format!(
                    "binding of {} (version {}) is valid from {} ms, now is {now_ms} ms",
                    self.service, self.version, self.not_before_ms
                ),
            );
        }
        if self.not_after_ms != 0 && now_ms > self.not_after_ms {
            return reject(
                Reason::BindingExpired,
                format!(
                    "binding of {} (version {}) expired at {} ms, now is {now_ms} ms",
                    self.service, self.version, self.not_after_ms
                ),
            );
        }
        Ok(())
    }
}

/// Verifies a binding end to end: signature, fields, signer in `admins`, and validity at
/// `now_ms`.
pub fn verify_binding(
    admins: &AdminSet,
    binding: &Envelope,
    now_ms: u64,
) -> Result<Binding, RecordError> {
    let verified = open_binding(binding)?;
    if !admins.contains(&verified.key) {
        return reject(
            Reason::NotAdmin,
            format!(
                "binding of {} is signed by {}, not in admin set version {}",
                verified.payload.service,
                hex::encode(verified.key),
                admins.version
            ),
        );
    }
    verified.payload.check_window(now_ms)?;
    Ok(verified.payload)
}

/// Verifies a record end to end against a binding that was itself verified: signature, fields,
/// the record's service is the binding's, and the signer is bound.
pub fn verify_record_against(
    binding: &Binding,
    record: &Envelope,
) -> Result<VerifiedRecord, RecordError> {
    let verified = open_record(record)?;
    if verified.payload.service != binding.service {
        return reject(
            Reason::WrongService,
            format!(
                "record is for service {:?}, binding is for {:?}",
                verified.payload.service, binding.service
            ),
        );
    }
    if !binding.contains_key(&verified.key) {
        return reject(
            Reason::UnboundKey,
            format!(
                "key {} is not bound to {} (binding version {})",
                hex::encode(verified.key),
                binding.service,
                binding.version
            ),
        );
    }
    Ok(verified)
}
