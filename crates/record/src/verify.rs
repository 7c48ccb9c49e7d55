use ed25519_dalek::{Signature, VerifyingKey};
use prost::Message;
use signpost_proto::v1::{Envelope, MultiEnvelope};

use crate::error::{reject, RecordError};
use crate::limits::{ENVELOPE_BYTES_MAX, PAYLOAD_BYTES_MAX, PUBLIC_KEY_BYTES, SIGNATURE_BYTES};
use crate::payload_kind::PayloadKind;
use crate::reason::Reason;
use crate::verified_cache::VerifiedSignatures;

/// Decodes an [`Envelope`], refusing oversized input before spending any work on it.
pub fn decode_envelope(bytes: &[u8]) -> Result<Envelope, RecordError> {
    check_envelope_bytes(bytes.len())?;
    Envelope::decode(bytes)
        .map_err(|e| RecordError::new(Reason::Malformed, format!("envelope does not decode: {e}")))
}

/// Decodes a [`MultiEnvelope`], refusing oversized input before spending any work on it.
pub fn decode_multi_envelope(bytes: &[u8]) -> Result<MultiEnvelope, RecordError> {
    check_envelope_bytes(bytes.len())?;
    MultiEnvelope::decode(bytes).map_err(|e| {
        RecordError::new(
            Reason::Malformed,
            format!("multi-signature envelope does not decode: {e}"),
        )
    })
}

/// Checks sizes, the key id and the signature of `envelope` as a payload of `kind`, and returns
/// the verifying key. The payload is not decoded here; see the `open_*` functions.
///
/// Verification is `verify_strict`: non-canonical signatures and small-order keys are refused,
/// so one payload has exactly one valid signature per key and signatures are not malleable.
pub fn verify_envelope(
    kind: PayloadKind,
    envelope: &Envelope,
) -> Result<VerifyingKey, RecordError> {
    check_envelope_bytes(envelope.encoded_len())?;
    check_payload_bytes(envelope.payload.len())?;
    let key = parse_public_key(&envelope.key_id)?;
    let signature = parse_signature(&envelope.signature)?;
    verify_signature(kind, &envelope.payload, &key, &signature)?;
    Ok(key)
}

/// [`verify_envelope`] with a node's [`VerifiedSignatures`]: a signature this node verified
/// before (and remembered) is not verified again; one it verifies now is remembered when
/// `remember` is set (the admission check) and not otherwise (apply, which consumes). Returns
/// the raw key, whose point a successful verification has already proven valid.
pub fn verify_envelope_cached(
    kind: PayloadKind,
    envelope: &Envelope,
    cache: &VerifiedSignatures,
    remember: bool,
) -> Result<[u8; PUBLIC_KEY_BYTES], RecordError> {
    check_envelope_bytes(envelope.encoded_len())?;
    check_payload_bytes(envelope.payload.len())?;
    let raw_key = key_bytes(&envelope.key_id)?;
    let raw_signature: [u8; SIGNATURE_BYTES] = parse_signature(&envelope.signature)?.to_bytes();
    let digest = VerifiedSignatures::digest(kind, &raw_key, &raw_signature, &envelope.payload);
    if !remember && cache.take(&digest) {
        return Ok(raw_key);
    }
    let key = cache.key(&raw_key)?;
    verify_signature(
        kind,
        &envelope.payload,
        &key,
        &Signature::from_bytes(&raw_signature),
    )?;
    if remember {
        cache.remember(digest);
    }
    Ok(raw_key)
}

/// Everything [`verify_envelope`] checks but the signature itself: sizes and the lengths of key
/// id and signature. Returns the raw key.
pub(crate) fn check_shapes(envelope: &Envelope) -> Result<[u8; PUBLIC_KEY_BYTES], RecordError> {
    check_envelope_bytes(envelope.encoded_len())?;
    check_payload_bytes(envelope.payload.len())?;
    let raw_key = key_bytes(&envelope.key_id)?;
    parse_signature(&envelope.signature)?;
    Ok(raw_key)
}

/// Parses a raw 32-byte ed25519 public key, refusing wrong lengths and invalid curve points.
pub fn parse_public_key(bytes: &[u8]) -> Result<VerifyingKey, RecordError> {
    let raw = key_bytes(bytes)?;
    VerifyingKey::from_bytes(&raw).map_err(|_| {
        RecordError::new(
            Reason::Malformed,
            format!("key {} is not a valid ed25519 point", hex::encode(raw)),
        )
    })
}

pub(crate) fn key_bytes(bytes: &[u8]) -> Result<[u8; PUBLIC_KEY_BYTES], RecordError> {
    bytes.try_into().map_err(|_| {
        RecordError::new(
            Reason::Malformed,
            format!(
                "key id is {} bytes, expected {PUBLIC_KEY_BYTES}",
                bytes.len()
            ),
        )
    })
}

pub(crate) fn parse_signature(bytes: &[u8]) -> Result<Signature, RecordError> {
    let raw: [u8; SIGNATURE_BYTES] = bytes.try_into().map_err(|_| {
        RecordError::new(
            Reason::Malformed,
            format!(
                "signature is {} bytes, expected {SIGNATURE_BYTES}",
                bytes.len()
            ),
        )
    })?;
    Ok(Signature::from_bytes(&raw))
}

pub(crate) fn verify_signature(
    kind: PayloadKind,
    payload: &[u8],
    key: &VerifyingKey,
    signature: &Signature,
) -> Result<(), RecordError> {
    key.verify_strict(&kind.signed_message(payload), signature)
        .map_err(|_| {
            RecordError::new(
                Reason::BadSignature,
                format!(
                    "signature by {} does not verify as a {} payload",
                    hex::encode(key.as_bytes()),
                    kind.context()
                ),
            )
        })
}

pub(crate) fn check_envelope_bytes(len: usize) -> Result<(), RecordError> {
    if len > ENVELOPE_BYTES_MAX {
        return reject(
            Reason::Oversized,
            format!("envelope is {len} bytes, above the maximum of {ENVELOPE_BYTES_MAX}"),
        );
    }
    Ok(())
}

pub(crate) fn check_payload_bytes(len: usize) -> Result<(), RecordError> {
    if len > PAYLOAD_BYTES_MAX {
        return reject(
            Reason::Oversized,
            format!("payload is {len} bytes, above the maximum of {PAYLOAD_BYTES_MAX}"),
        );
    }
    Ok(())
}
