//! Raft RPC decoding as the Raft service does it: bincode with the consensus codec's options
//! (a size limit, no trailing bytes) into openraft's messages over Signpost's payload types.
//! The type configuration mirrors `signpost-consensus` (which links RocksDB and so is not
//! built here); the node type has the same shape as its `NodeAddr`.
#![no_main]

use bincode::Options;
use libfuzzer_sys::fuzz_target;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct NodeAddr {
    raft_addr: String,
    client_addr: String,
}

impl std::fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.raft_addr)
    }
}

openraft::declare_raft_types!(
    TypeConfig:
        D = signpost_state::Request,
        R = signpost_state::Outcome,
        NodeId = u64,
        Node = NodeAddr,
);

const LIMIT: u64 = 64 * 1024 * 1024;

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    bincode::DefaultOptions::new()
        .with_limit(LIMIT)
        .deserialize(bytes)
        .ok()
}

fuzz_target!(|data: &[u8]| {
    let _ = decode::<openraft::raft::AppendEntriesRequest<TypeConfig>>(data);
    let _ = decode::<openraft::raft::VoteRequest<u64>>(data);
    let _ = decode::<openraft::Vote<u64>>(data);
    let _ = decode::<openraft::SnapshotMeta<u64, NodeAddr>>(data);
    let _ = decode::<openraft::Entry<TypeConfig>>(data);
});
