use std::collections::BTreeSet;

use prost::Message;
use signpost_proto::v1::{AdminSetPayload, MultiEnvelope};

use crate::error::{reject, RecordError};
use crate::key_set::parse_key_set;
use crate::limits::{ADMIN_CHAIN_ENTRIES_MAX, ADMIN_KEYS_MAX, PUBLIC_KEY_BYTES, SIGNATURES_MAX};
use crate::payload_kind::PayloadKind;
use crate::reason::Reason;
use crate::verified::decode_payload;
use crate::verify::{
    check_envelope_bytes, check_payload_bytes, key_bytes, parse_public_key, parse_signature,
    verify_signature,
};

/// The keys allowed to sign bindings, and how many of them must sign the next admin set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSet {
    /// Raw ed25519 public keys.
    pub keys: BTreeSet<[u8; PUBLIC_KEY_BYTES]>,
    /// Distinct keys of this set that must sign the next set; `1..=keys.len()`.
    pub threshold: u32,
    /// Strictly increasing by one per rotation; genesis is [`AdminSet::GENESIS_VERSION`].
    pub version: u64,
}

impl AdminSet {
    /// The version of the bootstrap admin set.
    pub const GENESIS_VERSION: u64 = 1;

    /// Builds a validated admin set: 1..=[`ADMIN_KEYS_MAX`] valid keys without duplicates, and
    /// a threshold in `1..=keys`.
    pub fn new(
        keys: &[[u8; PUBLIC_KEY_BYTES]],
        threshold: u32,
        version: u64,
    ) -> Result<AdminSet, RecordError> {
        let keys = parse_key_set(
            "admin set",
            keys.iter().map(|k| k.as_slice()),
            ADMIN_KEYS_MAX,
        )?;
        AdminSet::checked(keys, threshold, version)
    }

    /// Validates a decoded admin set payload (everything but its version's place in a chain).
    pub fn from_payload(payload: &AdminSetPayload) -> Result<AdminSet, RecordError> {
        let keys = parse_key_set(
            "admin set",
            payload.public_keys.iter().map(Vec::as_slice),
            ADMIN_KEYS_MAX,
        )?;
        AdminSet::checked(keys, payload.threshold, payload.version)
    }

    fn checked(
        keys: BTreeSet<[u8; PUBLIC_KEY_BYTES]>,
        threshold: u32,
        version: u64,
    ) -> Result<AdminSet, RecordError> {
        if keys.is_empty() {
            return reject(Reason::InvalidField, "admin set has no keys");
        }
        let keys_len = u32::try_from(keys.len()).unwrap_or(u32::MAX);
        if threshold == 0 || threshold > keys_len {
            return reject(
                Reason::InvalidField,
                format!("admin threshold {threshold} outside 1..={keys_len}"),
            );
        }
        if version == 0 {
            return reject(Reason::InvalidField, "admin set version must be at least 1");
        }
        Ok(AdminSet {
            keys,
            threshold,
            version,
        })
    }

    /// Whether `key` is one of the admin keys.
    pub fn contains(&self, key: &[u8; PUBLIC_KEY_BYTES]) -> bool {
        self.keys.contains(key)
    }
}

/// Verifies `envelope` as the admin set that follows `current`, and returns it.
///
/// At least `current.threshold` distinct keys of `current` must have signed; a key that signed
/// twice counts once, signatures by keys outside `current` are ignored (but, like every entry,
/// must have a 32-byte key id and a 64-byte signature, else `malformed`), and an invalid
/// signature by a key of `current` is an error (it is either corruption or an attack, never
/// noise). At most [`SIGNATURES_MAX`] signatures are examined (`oversized` beyond). The
/// payload is decoded only after the signatures are counted, and its version must be
/// `current.version + 1`.
pub fn open_admin_set(
    envelope: &MultiEnvelope,
    current: &AdminSet,
) -> Result<AdminSet, RecordError> {
    check_envelope_bytes(envelope.encoded_len())?;
    check_payload_bytes(envelope.payload.len())?;
    if envelope.signatures.len() > SIGNATURES_MAX {
        return reject(
            Reason::Oversized,
            format!(
                "{} signatures, above the maximum of {SIGNATURES_MAX}",
                envelope.signatures.len()
            ),
        );
    }
    let mut signers = BTreeSet::new();
    for signature in &envelope.signatures {
        let key_id = key_bytes(&signature.key_id)?;
        let parsed = parse_signature(&signature.signature)?;
        if !current.contains(&key_id) {
            continue;
        }
        let key = parse_public_key(&key_id)?;
        verify_signature(PayloadKind::AdminSet, &envelope.payload, &key, &parsed)?;
        signers.insert(key_id);
    }
    if signers.len() < current.threshold as usize {
        return reject(
            Reason::ThresholdNotMet,
            format!(
                "{} distinct keys of admin set version {} signed, {} required",
                signers.len(),
                current.version,
                current.threshold
            ),
        );
    }
    let payload: AdminSetPayload = decode_payload(PayloadKind::AdminSet, &envelope.payload)?;
    let next = AdminSet::from_payload(&payload)?;
    let expected = current.version.checked_add(1).ok_or_else(|| {
        RecordError::new(Reason::StaleVersion, "admin set version is at its maximum")
    })?;
    if next.version != expected {
        return reject(
            Reason::StaleVersion,
            format!(
                "admin set version {} does not follow version {}",
                next.version, current.version
            ),
        );
    }
    Ok(next)
}

/// Follows `chain`, the rotations after `genesis` in order, and returns the admin set it ends
/// at. A client pinned to `genesis` uses this to learn the current admin set from a server it
/// does not trust.
pub fn verify_admin_chain(
    genesis: &AdminSet,
    chain: &[MultiEnvelope],
) -> Result<AdminSet, RecordError> {
    let mut sets = admin_sets_of_chain(genesis, chain)?;
    Ok(sets.pop().unwrap_or_else(|| genesis.clone()))
}

/// Follows `chain` like [`verify_admin_chain`] and returns every admin set on the way, genesis
/// first and the current set last. A watcher uses it to verify a binding of the past, signed
/// by an admin of its time.
pub fn admin_sets_of_chain(
    genesis: &AdminSet,
    chain: &[MultiEnvelope],
) -> Result<Vec<AdminSet>, RecordError> {
    if chain.len() > ADMIN_CHAIN_ENTRIES_MAX {
        return reject(
            Reason::Oversized,
            format!(
                "admin chain has {} entries, above the maximum of {ADMIN_CHAIN_ENTRIES_MAX}",
                chain.len()
            ),
        );
    }
    let mut sets = vec![genesis.clone()];
    for (index, envelope) in chain.iter().enumerate() {
        let current = sets.last().unwrap_or(genesis);
        let next = open_admin_set(envelope, current).map_err(|e| {
            RecordError::new(
                e.reason(),
                format!("admin chain entry {index}: {}", e.detail()),
            )
        })?;
        sets.push(next);
    }
    Ok(sets)
}
