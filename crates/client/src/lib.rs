//! The Signpost Rust client.
//!
//! The client talks mutual TLS to any node and follows the leader for writes and linearizable
//! reads. It trusts no node: every record it returns was verified end to end, back to the admin
//! keys pinned in its configuration (genesis set → admin rotations → binding → record). A node
//! that serves a forged, unbound or tampered record is skipped and another node is asked.
//!
//! Writes are retried on leader changes, shedding and transport errors. A retried registration
//! is safe: it carries the same sequence number, so apply either takes it once or refuses the
//! duplicate as `stale_sequence`, which the client then confirms against the stored record.
//!
//! ```no_run
//! # async fn demo() -> Result<(), signpost_client::ClientError> {
//! let config = signpost_client::ClientConfig::load("dev/client.toml".as_ref())?;
//! let client = signpost_client::Client::connect(&config)?;
//! let payments = client.resolve("payments", false).await?;
//! for instance in &payments.instances {
//!     println!("{} {:?}", instance.payload.instance, instance.payload.endpoints);
//! }
//! # Ok(()) }
//! ```
#![deny(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    rust_2018_idioms,
    unused_must_use
)]

mod audit_trust;
mod client;
mod config;
mod error;
mod floors;
mod watcher;

pub use client::{Client, Listed, Resolved};
pub use config::{AuditConfig, ClientConfig, ClientTls, TrustConfig, CHECKPOINT_MAX_AGE_MIN_MS};
pub use error::{code_name, ClientError};
pub use watcher::{Change, Watcher};

/// Metadata key carrying the machine-readable reason of a refusal.
pub const REASON_METADATA: &str = signpost_proto::wire::REASON;
/// Metadata key carrying the leader's client address.
pub const LEADER_METADATA: &str = signpost_proto::wire::LEADER;
/// Metadata key carrying a retry hint in milliseconds.
pub const RETRY_AFTER_METADATA: &str = signpost_proto::wire::RETRY_AFTER_MS;
