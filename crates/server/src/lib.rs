//! A Signpost node: the client-facing gRPC services in front of consensus.
//!
//! A node has two listeners, both mutual TLS with no plaintext fallback:
//! - the **client listener** serves `Registry` and `Cluster` to service, reader and admin
//!   certificates, behind authorization and admission control;
//! - the **Raft listener** serves the node-only `Raft` service and nothing else, so client load
//!   can be shed without ever touching consensus traffic.
//!
//! [`run`] wires a node from a [`Config`]; `signpost server --config F` calls it.
#![deny(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    rust_2018_idioms,
    unused_must_use
)]

pub mod admission;
mod audit_service;
pub mod authz;
mod cluster_service;
pub mod config;
pub mod edge;
pub mod error;
pub mod lease_keeper;
mod node;
pub mod observe;
mod registry_service;
pub mod watch_hub;

pub use admission::{Admission, AdmissionLimits, StreamKind, StreamPermit};
pub use audit_service::AuditService;
pub use cluster_service::ClusterService;
pub use config::Config;
pub use error::ServerError;
pub use node::{run, run_from_file};
pub use registry_service::RegistryService;
