//! Generated protobuf and gRPC types for the `signpost.v1` protocol.
#![allow(missing_docs, clippy::all, unreachable_pub)]

pub mod v1 {
    tonic::include_proto!("signpost.v1");
}

/// The encoded `FileDescriptorSet` of the client-facing `signpost.v1` API (Registry, Cluster and
/// the records they carry; not Raft), served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/signpost_descriptor.bin"));
