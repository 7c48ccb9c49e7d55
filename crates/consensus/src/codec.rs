//! The byte codec for Raft messages, log entries and snapshots.
//!
//! bincode with an explicit size limit on both encode and decode: a peer (or a corrupt file)
//! cannot make a node allocate more than the limit while decoding.

use serde::{de::DeserializeOwned, Serialize};

use bincode::Options;

/// Largest encoded Raft RPC (an AppendEntries batch). Also the gRPC message limit of the Raft
/// listener.
pub const RAFT_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Largest snapshot a node builds, sends or accepts.
pub const SNAPSHOT_BYTES_MAX: usize = 512 * 1024 * 1024;
/// Largest chunk of a streamed snapshot.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 4 * 1024 * 1024;

fn options(limit: usize) -> impl Options {
    bincode::DefaultOptions::new().with_limit(limit as u64)
}

/// Encodes `value`, failing if the encoding would exceed `limit` bytes.
pub fn encode<T: Serialize>(value: &T, limit: usize) -> Result<Vec<u8>, bincode::Error> {
    options(limit).serialize(value)
}

/// The length of `value`'s encoding, without encoding it (saturating on error).
pub fn encoded_len<T: Serialize>(value: &T) -> u64 {
    bincode::DefaultOptions::new()
        .serialized_size(value)
        .unwrap_or(u64::MAX)
}

/// Decodes a `T`, failing on trailing bytes, malformed input or more than `limit` bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, bincode::Error> {
    if bytes.len() > limit {
        return Err(Box::new(bincode::ErrorKind::SizeLimit));
    }
    options(limit).deserialize(bytes)
}
