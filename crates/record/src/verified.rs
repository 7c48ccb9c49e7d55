use prost::Message;
use signpost_proto::v1::{BindingPayload, DeregisterPayload, Envelope, RecordPayload};

use crate::binding::Binding;
use crate::error::RecordError;
use crate::limits::PUBLIC_KEY_BYTES;
use crate::payload_kind::PayloadKind;
use crate::reason::Reason;
use crate::validate::{validate_deregister_payload, validate_record_payload};
use crate::verified_cache::VerifiedSignatures;
use crate::verify::{check_shapes, verify_envelope, verify_envelope_cached};

/// A payload whose signature verified and whose every field passed validation.
///
/// This says nothing about authorization (whether `key` may sign for the payload's service);
/// that is the caller's check against a [`Binding`] or an [`crate::AdminSet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<P> {
    /// The decoded, validated payload.
    pub payload: P,
    /// The raw ed25519 public key that signed it.
    pub key: [u8; PUBLIC_KEY_BYTES],
}

/// A verified `RecordPayload`.
pub type VerifiedRecord = Verified<RecordPayload>;
/// A verified `DeregisterPayload`.
pub type VerifiedDeregister = Verified<DeregisterPayload>;
/// A verified `BindingPayload`, parsed into a [`Binding`].
pub type VerifiedBinding = Verified<Binding>;

/// Verifies `envelope` as a record, then decodes and validates the payload.
pub fn open_record(envelope: &Envelope) -> Result<VerifiedRecord, RecordError> {
    let key = verify_envelope(PayloadKind::Record, envelope)?.to_bytes();
    finish_record(envelope, key)
}

/// Verifies `envelope` as a deregistration, then decodes and validates the payload.
pub fn open_deregister(envelope: &Envelope) -> Result<VerifiedDeregister, RecordError> {
    let key = verify_envelope(PayloadKind::Deregister, envelope)?.to_bytes();
    finish_deregister(envelope, key)
}

/// How an `open_*_with` call uses the node's [`VerifiedSignatures`].
#[derive(Debug, Clone, Copy)]
pub enum SignatureCheck<'a> {
    /// Verify, and remember a success for a later [`SignatureCheck::Reuse`] (admission).
    Remember(&'a VerifiedSignatures),
    /// Skip verification if this node remembered these exact bytes as verified, consuming the
    /// memory; verify otherwise (apply).
    Reuse(&'a VerifiedSignatures),
    /// Always verify.
    Always,
    /// Do not verify the signature: these exact bytes were verified by this node before it
    /// stored them in its own store (a restart reading back what its apply wrote). Sizes and
    /// the shapes of key and signature are still checked. Never for bytes from a peer, a client
    /// or a backup: those are [`SignatureCheck::Always`].
    VerifiedBeforeStoring,
}

fn check(
    kind: PayloadKind,
    envelope: &Envelope,
    mode: SignatureCheck<'_>,
) -> Result<[u8; PUBLIC_KEY_BYTES], RecordError> {
    match mode {
        SignatureCheck::Remember(cache) => verify_envelope_cached(kind, envelope, cache, true),
        SignatureCheck::Reuse(cache) => verify_envelope_cached(kind, envelope, cache, false),
        SignatureCheck::Always => Ok(verify_envelope(kind, envelope)?.to_bytes()),
        SignatureCheck::VerifiedBeforeStoring => check_shapes(envelope),
    }
}

/// [`open_record`] that may reuse or remember this node's earlier verification of the same
/// bytes (see [`VerifiedSignatures`]); the result is the same either way.
pub fn open_record_with(
    envelope: &Envelope,
    mode: SignatureCheck<'_>,
) -> Result<VerifiedRecord, RecordError> {
    let key = check(PayloadKind::Record, envelope, mode)?;
    finish_record(envelope, key)
}

/// [`open_deregister`] that may reuse or remember this node's earlier verification.
pub fn open_deregister_with(
    envelope: &Envelope,
    mode: SignatureCheck<'_>,
) -> Result<VerifiedDeregister, RecordError> {
    let key = check(PayloadKind::Deregister, envelope, mode)?;
    finish_deregister(envelope, key)
}

fn finish_record(
    envelope: &Envelope,
    key: [u8; PUBLIC_KEY_BYTES],
) -> Result<VerifiedRecord, RecordError> {
    let payload: RecordPayload = decode_payload(PayloadKind::Record, &envelope.payload)?;
    validate_record_payload(&payload)?;
    Ok(Verified { payload, key })
}

fn finish_deregister(
    envelope: &Envelope,
    key: [u8; PUBLIC_KEY_BYTES],
) -> Result<VerifiedDeregister, RecordError> {
    let payload: DeregisterPayload = decode_payload(PayloadKind::Deregister, &envelope.payload)?;
    validate_deregister_payload(&payload)?;
    Ok(Verified { payload, key })
}

/// Verifies `envelope` as a binding, then decodes and validates the payload. Whether the signer
/// is an admin is not checked here; see [`crate::verify_binding`].
pub fn open_binding(envelope: &Envelope) -> Result<VerifiedBinding, RecordError> {
    let key = verify_envelope(PayloadKind::Binding, envelope)?;
    let payload: BindingPayload = decode_payload(PayloadKind::Binding, &envelope.payload)?;
    Ok(Verified {
        payload: Binding::from_payload(&payload)?,
        key: key.to_bytes(),
    })
}

/// Decodes payload bytes whose signature has already been checked.
pub(crate) fn decode_payload<P: Message + Default>(
    kind: PayloadKind,
    bytes: &[u8],
) -> Result<P, RecordError> {
    P::decode(bytes).map_err(|e| {
        RecordError::new(
            Reason::Malformed,
            format!("{} payload does not decode: {e}", kind.context()),
        )
    })
}
