//! Generated protobuf and gRPC types for the `signpost.v1` protocol.
#![allow(missing_docs, clippy::all, unreachable_pub)]

pub mod v1 {
    tonic::include_proto!("signpost.v1");
}
