//! The persisted value encodings: a one-byte format version, then bincode 1.3 (fixed-width
//! integers, little endian) of a private struct. The structs here are the storage format;
//! changing a field means a new format version.

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use signpost_record::{AdminSet, ENVELOPE_BYTES_MAX, PUBLIC_KEY_BYTES};

/// The only format this version writes and reads.
pub(crate) const FORMAT_VERSION: u8 = 1;

/// No value this crate writes comes near this: the largest is a record holding one envelope.
const VALUE_BYTES_MAX: u64 = 2 * ENVELOPE_BYTES_MAX as u64;

/// A live record. Kept in memory in exactly this form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredRecord {
    /// The encoded `Envelope` served to clients.
    pub(crate) envelope: Vec<u8>,
    pub(crate) sequence: u64,
    pub(crate) key: [u8; PUBLIC_KEY_BYTES],
    pub(crate) issued_at_ms: u64,
    /// The largest `issued_at_ms` of any write accepted for this instance; it decides when the
    /// tombstone left behind may be dropped.
    pub(crate) issued_at_max_ms: u64,
    pub(crate) ttl_secs: u32,
    /// The revision of the write that stored this record.
    pub(crate) revision: u64,
}

/// What remains of a removed instance: enough to refuse replays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredTombstone {
    pub(crate) sequence: u64,
    pub(crate) issued_at_max_ms: u64,
    /// The revision of the removal.
    pub(crate) revision: u64,
}

/// A binding as an admin signed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredBinding {
    /// The encoded `Envelope` of the `BindingPayload`.
    pub(crate) envelope: Vec<u8>,
    pub(crate) revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredAdminSet {
    pub(crate) keys: Vec<[u8; PUBLIC_KEY_BYTES]>,
    pub(crate) threshold: u32,
    pub(crate) version: u64,
}

impl StoredAdminSet {
    pub(crate) fn from_admin_set(set: &AdminSet) -> StoredAdminSet {
        StoredAdminSet {
            keys: set.keys.iter().copied().collect(),
            threshold: set.threshold,
            version: set.version,
        }
    }
}

/// One admin rotation, kept so clients pinned to genesis can follow the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredChainEntry {
    /// The encoded `MultiEnvelope` of the `AdminSetPayload`.
    pub(crate) envelope: Vec<u8>,
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
}

/// Encodes a value for storage.
pub(crate) fn encode_value<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // Without a size limit, bincode can only fail on types it cannot represent (maps or
    // sequences of unknown length); the stored structs have none, so failure is a programming
    // error in this file, not a runtime condition.
    if let Err(e) = options().serialize_into(&mut out, value) {
        panic!("invariant: stored structs always serialize with bincode: {e}");
    }
    out
}

/// The length of [`encode_value`]'s output, without building it.
pub(crate) fn encoded_len<T: Serialize>(value: &T) -> u64 {
    match options().serialized_size(value) {
        Ok(len) => 1 + len,
        Err(e) => panic!("invariant: stored structs always serialize with bincode: {e}"),
    }
}

/// Decodes a stored value, refusing unknown formats, oversized input and trailing bytes.
pub(crate) fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (&format, body) = bytes
        .split_first()
        .ok_or_else(|| "empty value".to_string())?;
    if format != FORMAT_VERSION {
        return Err(format!(
            "format version {format}, this build reads {FORMAT_VERSION}"
        ));
    }
    options()
        .with_limit(VALUE_BYTES_MAX)
        .deserialize(body)
        .map_err(|e| format!("does not decode: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_corruption_is_an_error() {
        let tombstone = StoredTombstone {
            sequence: 7,
            issued_at_max_ms: 1_000,
            revision: 3,
        };
        let bytes = encode_value(&tombstone);
        assert_eq!(bytes.len() as u64, encoded_len(&tombstone));
        assert_eq!(decode_value::<StoredTombstone>(&bytes).unwrap(), tombstone);

        let mut wrong_format = bytes.clone();
        wrong_format[0] = 2;
        assert!(decode_value::<StoredTombstone>(&wrong_format).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode_value::<StoredTombstone>(&trailing).is_err());
        assert!(decode_value::<StoredTombstone>(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_value::<StoredTombstone>(&[]).is_err());

        // A length prefix claiming gigabytes must fail on the limit, not allocate.
        let mut huge = vec![FORMAT_VERSION];
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_value::<StoredChainEntry>(&huge).is_err());
    }
}
