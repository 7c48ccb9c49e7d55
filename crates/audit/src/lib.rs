//! The audit log's Merkle tree, as in Certificate Transparency (RFC 6962, RFC 9162): SHA-256,
//! leaves hashed as `H(0x00 || leaf)`, interior nodes as `H(0x01 || left || right)`, a tree of
//! any size split at the largest power of two below it.
//!
//! The replicated part is a [`Frontier`]: the tree's size and the roots of its perfect
//! subtrees, a few hundred bytes that give the root and take the next leaf, so every node
//! computes the same root at every revision without holding the leaves in memory. Appending
//! yields the perfect subtrees it completed ([`Node`]); a node stores those with the leaves,
//! and answers proofs from them through a [`NodeSource`], reading O(log² n) of them at worst.
//!
//! The registry's state is committed to by a sparse Merkle tree ([`StateTree`]) whose root
//! every audit record carries, so an answer can be proven whole and current, not only logged.
//!
//! Proofs are generated here (by the RFC's recursive definitions) and verified with the
//! `ct-merkle` crate, an independent implementation; the tests check each against the other.

mod checkpoint;
mod error;
mod proof;
mod state_tree;
mod tree;

pub use checkpoint::{
    origin_for, Checkpoint, CheckpointSigner, SignedCheckpoint, Witnesses,
    CHECKPOINT_NOTE_BYTES_MAX, CHECKPOINT_SERVICE,
};
pub use error::AuditError;
pub use proof::{
    consistency_proof, inclusion_proof, subtree_hash, verify_consistency, verify_inclusion,
    NodeSource,
};
pub use state_tree::{
    name_key, service_value, state_leaf_hash, verify_state_proof, StateProof, StateTree, EMPTY,
    KEY_BITS,
};
pub use tree::{empty_root, leaf_hash, node_hash, Frontier, Hash, Node, HASH_BYTES};
