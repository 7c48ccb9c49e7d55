//! The Signpost record and signature model.
//!
//! # Model
//!
//! Everything in the registry is a signed payload inside an envelope. The payload is a protobuf
//! message (`RecordPayload`, `DeregisterPayload`, `BindingPayload`, `AdminSetPayload`) encoded
//! **once** by the signer; the envelope carries those exact bytes, the signer's raw 32-byte
//! ed25519 public key (`key_id`) and the signature. Protobuf encoding is not canonical, so a
//! verifier never re-encodes anything: it checks the signature over the bytes it was given and
//! only then decodes them.
//!
//! The signed message is `context ‖ 0x00 ‖ payload`, where the context names the payload kind
//! ([`PayloadKind::context`]): a signature made for one kind never verifies as another.
//! Verification uses `verify_strict`, which refuses non-canonical signatures and small-order
//! keys, so signatures are not malleable.
//!
//! Trust flows down a chain, and this crate has one function per link, used both by nodes at
//! apply and by clients end to end:
//!
//! 1. an [`AdminSet`] is pinned at genesis; each later set is threshold-signed by the previous
//!    one ([`open_admin_set`], [`verify_admin_chain`]);
//! 2. a [`Binding`] says which keys may sign for a service; an admin key signs it
//!    ([`verify_binding`]);
//! 3. a record is signed by a key of its service's binding ([`verify_record_against`]).
//!
//! # Name grammar
//!
//! - A **service name** is 1 to 63 bytes of lowercase ASCII letters, digits, `-` and `.`; it
//!   starts with a letter, ends with a letter or digit, and never contains `..`
//!   ([`validate_service_name`]).
//! - An **instance id** is 1 to 128 bytes of `[A-Za-z0-9._:-]` starting with a letter or digit
//!   ([`validate_instance_id`]).
//!
//! Neither may contain `/`, which storage keys use as a separator.
//!
//! # Field limits
//!
//! See [`limits`]. A record has at most [`ENDPOINTS_MAX`] endpoints, each with a host of 1 to
//! [`HOST_BYTES_MAX`] bytes (letters, digits and `.-_:[]%`, enough for DNS names and IP
//! literals), a port in 1..=65535 and a protocol label of at most [`PROTOCOL_BYTES_MAX`] bytes of
//! `[a-z0-9+.-]` (possibly empty); at most [`METADATA_ENTRIES_MAX`] metadata entries with keys of
//! 1 to [`METADATA_KEY_BYTES_MAX`] bytes of `[a-z0-9._/-]`, values of at most
//! [`METADATA_VALUE_BYTES_MAX`] bytes and at most [`METADATA_BYTES_MAX`] bytes of keys and values
//! together; a `tls_identity` of at most [`TLS_IDENTITY_BYTES_MAX`] bytes; a ttl in
//! [`TTL_SECS_MIN`]..=[`TTL_SECS_MAX`]; and a sequence of at least 1.
//!
//! # Example
//!
//! ```
//! use signpost_proto::v1::RecordPayload;
//! use signpost_record::{generate_signing_key, open_record, sign_record, Reason};
//!
//! let key = generate_signing_key();
//! let payload = RecordPayload {
//!     service: "payments".into(),
//!     instance: "p1".into(),
//!     sequence: 1,
//!     issued_at_ms: 1_700_000_000_000,
//!     ttl_secs: 30,
//!     ..Default::default()
//! };
//! let mut envelope = sign_record(&key, &payload);
//! let verified = open_record(&envelope).unwrap();
//! assert_eq!(verified.payload, payload);
//! assert_eq!(verified.key, key.verifying_key().to_bytes());
//!
//! // One flipped bit in the payload and the signature no longer verifies.
//! envelope.payload[0] ^= 1;
//! assert_eq!(open_record(&envelope).unwrap_err().reason(), Reason::BadSignature);
//! ```
#![deny(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    rust_2018_idioms,
    unused_must_use
)]

mod admin_set;
mod binding;
mod error;
mod key_file;
mod key_set;
pub mod limits;
mod name;
mod payload_kind;
mod reason;
mod sign;
mod validate;
mod verified;
mod verified_cache;
mod verify;

pub use admin_set::{admin_sets_of_chain, open_admin_set, verify_admin_chain, AdminSet};
pub use binding::{verify_binding, verify_record_against, Binding};
pub use error::RecordError;
pub use key_file::{
    parse_public_key_hex, public_key_hex, public_key_path, read_signing_key, read_verifying_key,
    write_key_files,
};
pub use limits::*;
pub use name::{validate_instance_id, validate_service_name};
pub use payload_kind::PayloadKind;
pub use reason::Reason;
pub use sign::{
    generate_signing_key, sign, sign_admin_set, sign_binding, sign_deregister, sign_multi,
    sign_record,
};
pub use validate::{validate_deregister_payload, validate_record_payload};
pub use verified::{
    open_binding, open_deregister, open_deregister_with, open_record, open_record_with,
    SignatureCheck, Verified, VerifiedBinding, VerifiedDeregister, VerifiedRecord,
};
pub use verified_cache::{VerifiedSignatures, VERIFIED_SIGNATURES_DEFAULT};
pub use verify::{
    decode_envelope, decode_multi_envelope, parse_public_key, verify_envelope,
    verify_envelope_cached,
};

/// The ed25519 types this crate's API speaks, re-exported so callers use the same version.
pub use ed25519_dalek::{SigningKey, VerifyingKey};
