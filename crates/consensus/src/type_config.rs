use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

/// Where a member can be reached. Stored in the Raft membership, so every node learns the
/// addresses of the others from the log, not from its own config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// host:port of the node-only Raft listener.
    pub raft_addr: String,
    /// host:port of the client listener (what clients are redirected to).
    pub client_addr: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} client={}", self.raft_addr, self.client_addr)
    }
}

openraft::declare_raft_types!(
    /// Signpost's openraft type configuration.
    pub TypeConfig:
        D = signpost_state::Request,
        // One outcome per request of the entry: one, or one per request of a Command::Batch.
        R = Vec<signpost_state::Outcome>,
        NodeId = u64,
        Node = NodeAddr,
);
