//! Consensus for Signpost: one replicated registry log, driven by openraft.
//!
//! The model: every write is a [`signpost_state::Request`] appended to the Raft log by the
//! leader. Once a quorum has the entry, every node's [`StateMachine`] applies it with
//! [`signpost_state::Registry::apply`], a pure function, so every replica reaches the same state
//! and returns the same [`signpost_state::Outcome`]. The outcome computed on the leader is the
//! answer to the client.
//!
//! This is the only crate that links openraft. It owns:
//! - the type configuration and the byte codec for Raft messages ([`codec`]);
//! - the log store ([`LogStore`]) and state machine ([`StateMachine`]) over RocksDB through
//!   `signpost-storage`;
//! - the gRPC network: the client side ([`Network`]) and the node-only `Raft` service
//!   ([`RaftService`]);
//! - [`Consensus`], the handle the server uses to propose, read and observe.
#![deny(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    rust_2018_idioms,
    unused_must_use
)]
// openraft's trait signatures dictate `StorageError` (a large type) as the error of every
// storage method; boxing it is not an option.
#![allow(clippy::result_large_err)]

pub mod audit_log;
pub mod audit_retention;
pub mod backup;
pub mod checkpoints;
pub mod codec;
mod consensus;
mod election;
mod error;
pub mod forward;
mod log_store;
mod network;
mod propose_batch;
mod raft_service;
mod read_batch;
mod state_machine;
mod type_config;

/// Counter of snapshots this node built.
pub const SNAPSHOTS_BUILT_TOTAL: &str = "signpost_raft_snapshots_built_total";
/// Counter of snapshots this node installed from a leader.
pub const SNAPSHOTS_INSTALLED_TOTAL: &str = "signpost_raft_snapshots_installed_total";
/// Histogram of the time from proposing a write to its apply on this (leading) node.
pub const PROPOSAL_DURATION: &str = "signpost_raft_proposal_duration_seconds";
/// Histogram of the requests one log entry carried (group commit of proposals).
pub const PROPOSAL_BATCH_SIZE: &str = "signpost_raft_proposal_batch_size";
/// Histogram of the linearizable reads one leadership confirmation served.
pub const READ_BATCH_SIZE: &str = "signpost_raft_read_batch_size";
/// Counter of forwarded requests: `side` follower (sent) or leader (taken), `op` (followers:
/// write or read), `result`.
pub const FORWARDED_TOTAL: &str = "signpost_raft_forwarded_total";
/// Counter of the leader's checkpoint rounds, by `result` (signed: a quorum signed it).
pub const CHECKPOINTS_TOTAL: &str = "signpost_audit_checkpoints_total";
/// Counter of audit records this node pruned beyond its retention budget.
pub const AUDIT_PRUNED_RECORDS_TOTAL: &str = "signpost_audit_pruned_records_total";
/// Default budget of stored audit records per node, in bytes.
pub const DEFAULT_AUDIT_RETAIN_BYTES: u64 = 1024 * 1024 * 1024;

pub use consensus::{
    Consensus, ConsensusConfig, MemberStatus, NodeStatus, DEFAULT_ELECTION_TIMEOUT_MAX_MS,
    DEFAULT_ELECTION_TIMEOUT_MIN_MS, DEFAULT_HEARTBEAT_MS,
};
pub use election::{
    wall_clock_ms, Liveness, PreVoteRequest, PreVoteResponse, TimeoutNowRequest,
    TimeoutNowResponse, CLOCK_SKEW_MAX_MS,
};
pub use error::ConsensusError;
pub use log_store::LogStore;
pub use network::Network;
pub use raft_service::{RaftService, PEER_COUNTER_MAX};
pub use state_machine::{Applied, SharedState, StateMachine};
pub use type_config::{NodeAddr, TypeConfig};
