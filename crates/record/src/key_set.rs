use std::collections::BTreeSet;

use ed25519_dalek::VerifyingKey;

use crate::error::{reject, RecordError};
use crate::limits::PUBLIC_KEY_BYTES;
use crate::reason::Reason;

/// Parses a list of public keys carried inside a payload (binding or admin set) into a set.
///
/// Every key must be a valid, non-small-order point: a weak key in a binding or admin set could
/// never produce a strictly verifiable signature, so it is a mistake worth refusing early.
/// Duplicates are refused rather than merged, because a duplicated admin key would silently
/// make a threshold look more distributed than it is.
pub(crate) fn parse_key_set<'a>(
    what: &str,
    keys: impl ExactSizeIterator<Item = &'a [u8]>,
    keys_max: usize,
) -> Result<BTreeSet<[u8; PUBLIC_KEY_BYTES]>, RecordError> {
    if keys.len() > keys_max {
        return reject(
            Reason::InvalidField,
            format!(
                "{what}: {} keys, above the maximum of {keys_max}",
                keys.len()
            ),
        );
    }
    let mut set = BTreeSet::new();
    for (index, bytes) in keys.enumerate() {
        let raw: [u8; PUBLIC_KEY_BYTES] = bytes.try_into().map_err(|_| {
            RecordError::new(
                Reason::InvalidField,
                format!(
                    "{what}: key {index} is {} bytes, expected {PUBLIC_KEY_BYTES}",
                    bytes.len()
                ),
            )
        })?;
        check_key(what, &raw)?;
        if !set.insert(raw) {
            return reject(
                Reason::InvalidField,
                format!("{what}: key {} is listed twice", hex::encode(raw)),
            );
        }
    }
    Ok(set)
}

pub(crate) fn check_key(what: &str, raw: &[u8; PUBLIC_KEY_BYTES]) -> Result<(), RecordError> {
    match VerifyingKey::from_bytes(raw) {
        Ok(key) if !key.is_weak() => Ok(()),
        Ok(_) => reject(
            Reason::InvalidField,
            format!("{what}: key {} has small order", hex::encode(raw)),
        ),
        Err(_) => reject(
            Reason::InvalidField,
            format!(
                "{what}: key {} is not a valid ed25519 point",
                hex::encode(raw)
            ),
        ),
    }
}
