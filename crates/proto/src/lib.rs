//! Generated protobuf and gRPC types for the `signpost.v1` protocol.
#![allow(missing_docs, clippy::all, unreachable_pub)]

pub mod v1 {
    tonic::include_proto!("signpost.v1");
}

/// A wire-compatible subset of etcd's v3 API (KV, Lease, Watch, Maintenance), client side only, for
/// measuring etcd with the same load generator (`signpost bench --target etcd`).
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// The encoded `FileDescriptorSet` of the client-facing `signpost.v1` API (Registry, Cluster and
/// the records they carry; not Raft), served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/signpost_descriptor.bin"));

/// The wire vocabulary beyond the protobuf messages: gRPC metadata keys that servers set on
/// refusals and clients read. Defined once, here, for both sides.
pub mod wire {
    /// The machine-readable reason of a refusal (`bad_signature`, `not_leader`, ...).
    pub const REASON: &str = "signpost-reason";
    /// The authorization rule that denied a request (`service.own-name-only`, ...).
    pub const RULE: &str = "signpost-rule";
    /// The leader's client address, on a `not_leader` refusal.
    pub const LEADER: &str = "signpost-leader";
    /// A retry hint in milliseconds, on shed or unavailable answers.
    pub const RETRY_AFTER_MS: &str = "retry-after-ms";
    /// Which admission limit shed a request (`rate`, `writes_in_flight`, ...), for metrics.
    pub const SHED: &str = "signpost-shed";
    /// The oldest revision a watch can still resume from, on a compacted refusal.
    pub const COMPACTED_REVISION: &str = "signpost-compacted-revision";
}
