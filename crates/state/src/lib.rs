//! The deterministic registry state machine.
//!
//! # Model
//!
//! The registry is a pure function of the Raft log. Each entry carries a [`Request`]: the
//! leader's clock at proposal (`time_ms`), the caller's verified identity (for the audit trail
//! only) and a [`Command`]. [`Registry::apply`] reads nothing else: no clock, no randomness, no
//! I/O. It returns an [`Applied`]: the [`Outcome`] for the proposer, the key/value [`Change`]s
//! for the store, and the [`Event`]s for watchers. Every map is a `BTreeMap`, so every iteration
//! that reaches the state, an export or an event has one order on every node.
//!
//! A rejected command changes nothing: its `changes` and `events` are empty. An applied command
//! carries its log index as `revision`, in the outcome, in its events and in what it stores.
//! Applied to the previous [`Registry::export`] in order, `changes` yield the new export.
//!
//! # Rules
//!
//! Checks run in the order listed; the first failure is the rejection reason.
//!
//! **Genesis** `{admin_keys, admin_threshold, quotas}`: `already_initialized` if an admin set
//! exists; `invalid_field` unless the keys are 1..=16 distinct valid ed25519 keys, the threshold
//! is in `1..=keys` and every quota is at least 1. Stores the admin set as version 1, both as
//! genesis and as current, and the quotas.
//!
//! **Register** `{envelope}` (an `Envelope` of a `RecordPayload`):
//! 1. `oversized` / `malformed`: the envelope decodes within the size limits;
//! 2. `malformed` / `bad_signature`: the key id and signature are well formed and the signature
//!    verifies strictly over the domain-separated payload;
//! 3. `malformed` / `invalid_name` / `invalid_field`: the payload decodes and every field is
//!    valid (see `signpost_record`);
//! 4. `no_binding`: a binding exists for the service;
//! 5. `unbound_key`: the signing key is in the binding;
//! 6. `binding_not_yet_valid` / `binding_expired`: `time_ms` is inside the binding's window;
//! 7. `stale_sequence`: the sequence is above the last accepted sequence of the instance,
//!    live or tombstoned;
//! 8. `future_issued_at`: `issued_at_ms <= time_ms + MAX_SKEW_MS`;
//! 9. `expired`: `issued_at_ms + MAX_AGE_MS >= time_ms`;
//! 10. `quota_instances`: a new instance of a service with `instances_per_service_max` live
//!     instances; `quota_services`: the first instance of a service while `services_max`
//!     services have live instances; `quota_state_bytes`: a write that grows the state while
//!     [`Registry::state_bytes`] is at or above `state_bytes_max` (writes that do not grow it,
//!     and all removals, are always accepted; [`Registry::alarms`] reports `NOSPACE` meanwhile).
//!     The check is on the state before the write, so one write may cross the quota; the
//!     overshoot is bounded by one record. Admin commands (Bind, RotateAdmins) are not subject
//!     to the byte quota: revoking a key or rotating compromised admins must never be blocked
//!     by a full registry, and they are signed by the operators who set the quota.
//!
//! On success the record replaces any record or tombstone of the instance and a Put event is
//! emitted. The stored envelope is re-encoded (the wrapper is not signed; the signed payload
//! bytes are kept exactly).
//!
//! **Deregister** `{envelope}` (an `Envelope` of a `DeregisterPayload`): steps 1-3 as for
//! Register; then, unless the signer is a current admin key, steps 4-6; then `not_found` unless
//! the instance is live; then steps 7-9 against the live record. Removes the record, leaving a
//! tombstone, and emits a Delete event.
//!
//! **Bind** `{envelope}` (an `Envelope` of a `BindingPayload`): `no_admin_set` before genesis;
//! steps 1-3; `not_admin` unless the signer is a current admin key; `stale_version` unless the
//! version is above the service's current binding version. The binding's window is not checked
//! here (a binding may be staged before it starts). Replaces the binding, then removes every
//! live record of the service whose signing key the new binding does not hold (key rotation),
//! leaving tombstones and emitting Delete events.
//!
//! **RotateAdmins** `{envelope}` (a `MultiEnvelope` of an `AdminSetPayload`): `no_admin_set`
//! before genesis; `invalid_field` once the admin chain holds `ADMIN_CHAIN_ENTRIES_MAX` (64)
//! rotations; then `signpost_record::open_admin_set` against the current set (`oversized`,
//! `malformed`, `bad_signature`, `threshold_not_met`, `invalid_field`, `stale_version`).
//! Then `rebinds`, each checked like a Bind but against the *new* set, for a bound service,
//! at most one per service and no more than there are bindings (`invalid_field`,
//! `no_binding`, `not_admin`, `stale_version`, ...); `rotation_incomplete` if a binding whose
//! signer the new set drops is not among them. Replaces the current set, appends the envelope
//! to the admin chain, and installs the re-signed bindings as Bind does. Every stored binding
//! is therefore always signed by a key of the current admin set.
//!
//! **Expire** `{service, instance, sequence}`: `not_found` unless the instance is live;
//! `stale_sequence` unless its sequence equals `sequence` (a re-registration won the race).
//! Removes the record, leaving a tombstone, and emits a Delete event.
//!
//! **Noop**: applied, nothing else.
//!
//! **Tombstones.** Removing an instance keeps `(sequence, issued_at_max_ms)`, the largest
//! `issued_at_ms` of any write accepted for it, so replays of older writes stay refused. A
//! tombstone is dropped by the first applied entry with
//! `time_ms > issued_at_max_ms + MAX_AGE_MS + MAX_SKEW_MS`: from then on any replay is refused
//! as `expired` by every leader whose clock is within `MAX_SKEW_MS` of this one. Drops happen
//! after the command of each applied (never a rejected) entry, oldest first, at most
//! `TOMBSTONE_DROPS_PER_APPLY_MAX` per entry, and are part of that entry's `changes`. A removal
//! already past that time leaves no tombstone at all.
//!
//! The `caller` is never used for authorization: that happened at the server edge, from the
//! client certificate.
//!
//! # Persisted form
//!
//! [`Registry::export`] produces ASCII keys `r/<service>/<instance>` (live record),
//! `t/<service>/<instance>` (tombstone), `b/<service>` (binding), `a/genesis`, `a/current`,
//! `a/chain/<index as 8 hex digits>` and `q/quotas`. Names never contain `/`. Values are a
//! format version byte followed by bincode 1.3 of a private struct. [`Registry::load`] checks
//! all of it, including every signature, before accepting it.
//!
//! # Example
//!
//! ```
//! use signpost_proto::v1::{BindingPayload, RecordPayload};
//! use signpost_record::{generate_signing_key, sign_binding, sign_record};
//! use signpost_state::{Command, Outcome, Quotas, Registry, Request};
//! use prost::Message;
//!
//! let admin = generate_signing_key();
//! let service_key = generate_signing_key();
//! let now_ms = 1_700_000_000_000;
//! let request = |command| Request { time_ms: now_ms, caller: "spiffe://example.org/admin".into(), command };
//!
//! let mut registry = Registry::new();
//! registry.apply(1, &request(Command::Genesis {
//!     admin_keys: vec![admin.verifying_key().to_bytes()],
//!     admin_threshold: 1,
//!     quotas: Quotas::default(),
//! }));
//! let binding = sign_binding(&admin, &BindingPayload {
//!     service: "payments".into(),
//!     public_keys: vec![service_key.verifying_key().to_bytes().to_vec()],
//!     version: 1,
//!     ..Default::default()
//! });
//! registry.apply(2, &request(Command::Bind { envelope: binding.encode_to_vec() }));
//! let record = sign_record(&service_key, &RecordPayload {
//!     service: "payments".into(),
//!     instance: "p1".into(),
//!     sequence: 1,
//!     issued_at_ms: now_ms,
//!     ttl_secs: 30,
//!     ..Default::default()
//! });
//! let applied = registry.apply(3, &request(Command::Register { envelope: record.encode_to_vec() }));
//! assert_eq!(applied.outcome, Outcome::Applied { revision: 3 });
//! assert_eq!(registry.resolve("payments").unwrap().records.len(), 1);
//! ```
#![deny(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    rust_2018_idioms,
    unused_must_use
)]

mod applied;
mod audit;
mod commitment;
mod error;
mod registry;
mod request;
mod service_view;
mod storage_key;
mod stored;

pub use applied::{Applied, Change, Event, EventKind, Outcome};
pub use error::StateError;
pub use registry::{Registry, MAX_AGE_MS, MAX_SKEW_MS, NOSPACE, TOMBSTONE_DROPS_PER_APPLY_MAX};
pub use request::{Command, Quotas, Request};
pub use service_view::{InstanceInfo, ServiceView};
pub use signpost_record::{AdminSet, Binding, Reason, ADMIN_CHAIN_ENTRIES_MAX};
