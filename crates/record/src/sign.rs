use ed25519_dalek::{Signer, SigningKey};
use prost::Message;
use signpost_proto::v1::{
    AdminSetPayload, BindingPayload, DeregisterPayload, Envelope, MultiEnvelope, RecordPayload,
    Signature,
};

use crate::payload_kind::PayloadKind;

/// Signs `payload` (already encoded) as `kind` with one key.
///
/// The payload bytes are moved into the envelope untouched: they are the bytes that were signed,
/// and verifiers check the signature over exactly these bytes.
pub fn sign(kind: PayloadKind, key: &SigningKey, payload: Vec<u8>) -> Envelope {
    let signature = key.sign(&kind.signed_message(&payload));
    Envelope {
        payload,
        key_id: key.verifying_key().to_bytes().to_vec(),
        signature: signature.to_bytes().to_vec(),
    }
}

/// Signs `payload` (already encoded) as `kind` with each of `keys`, in the given order.
pub fn sign_multi(kind: PayloadKind, keys: &[&SigningKey], payload: Vec<u8>) -> MultiEnvelope {
    let message = kind.signed_message(&payload);
    let signatures = keys
        .iter()
        .map(|key| Signature {
            key_id: key.verifying_key().to_bytes().to_vec(),
            signature: key.sign(&message).to_bytes().to_vec(),
        })
        .collect();
    MultiEnvelope {
        payload,
        signatures,
    }
}

/// Encodes `payload` once and signs those bytes as a record.
pub fn sign_record(key: &SigningKey, payload: &RecordPayload) -> Envelope {
    sign(PayloadKind::Record, key, payload.encode_to_vec())
}

/// Encodes `payload` once and signs those bytes as a deregistration.
pub fn sign_deregister(key: &SigningKey, payload: &DeregisterPayload) -> Envelope {
    sign(PayloadKind::Deregister, key, payload.encode_to_vec())
}

/// Encodes `payload` once and signs those bytes as a binding.
pub fn sign_binding(key: &SigningKey, payload: &BindingPayload) -> Envelope {
    sign(PayloadKind::Binding, key, payload.encode_to_vec())
}

/// Encodes `payload` once and signs those bytes as an admin set with each of `keys`.
pub fn sign_admin_set(keys: &[&SigningKey], payload: &AdminSetPayload) -> MultiEnvelope {
    sign_multi(PayloadKind::AdminSet, keys, payload.encode_to_vec())
}

/// A fresh signing key from the operating system's random number generator.
pub fn generate_signing_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}
