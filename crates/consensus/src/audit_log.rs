//! The audit log as one node stores it: its head, its records, proofs from its stored subtree
//! hashes, and a full re-verification of what is on its disk.
//!
//! The tree itself is replicated state (the frontier in [`crate::SharedState::audit`], built in
//! apply); the records and subtree hashes are this node's copy, written in the same RocksDB
//! batch as the apply that produced them. Reads here are blocking RocksDB reads: call them from
//! a blocking task.

use std::sync::Arc;

use signpost_audit::{
    consistency_proof, inclusion_proof, leaf_hash, subtree_hash, AuditError, Frontier, Hash,
    NodeSource,
};
use signpost_storage::Store;

use crate::error::ConsensusError;
use crate::state_machine::StateMachine;

/// Records read per page while verifying.
const VERIFY_PAGE: usize = 4096;

/// The tree as this node holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditHead {
    /// Records in the tree.
    pub size: u64,
    /// Its RFC 6962 root.
    pub root: Hash,
    /// The applied revision the tree reflects.
    pub revision: u64,
    /// The first record this node stores (records before it came in a snapshot's frontier).
    pub first_index: u64,
}

/// The result of [`AuditLog::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerification {
    /// The head checked against.
    pub head: AuditHead,
    /// Whether every stored record and hash agrees with the head.
    pub verified: bool,
    /// Records rehashed.
    pub checked: u64,
    /// The first record that does not match (or the leftmost record under the first stored
    /// hash that does not); meaningful only when not verified.
    pub first_bad: u64,
    /// What did not match.
    pub problem: String,
}

/// Stored records, with the head they were read under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecords {
    /// The head when they were read.
    pub head: AuditHead,
    /// `(index, leaf)` in order.
    pub leaves: Vec<(u64, Vec<u8>)>,
}

/// A record and the proof that it is in the tree of `size` records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inclusion {
    /// The tree the proof is for.
    pub size: u64,
    /// Its root.
    pub root: Hash,
    /// The record, as hashed.
    pub leaf: Vec<u8>,
    /// The audit path, bottom-up.
    pub proof: Vec<Hash>,
}

/// The proof that one tree size is a prefix of another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consistency {
    /// The newer size.
    pub new_size: u64,
    /// The older tree's root.
    pub old_root: Hash,
    /// The newer tree's root.
    pub new_root: Hash,
    /// The proof, bottom-up.
    pub proof: Vec<Hash>,
}

/// Read access to the node's audit log.
#[derive(Debug, Clone)]
pub struct AuditLog {
    store: Arc<Store>,
    state: StateMachine,
}

struct StoredNodes<'a>(&'a Store);

impl NodeSource for StoredNodes<'_> {
    fn node(&self, level: u8, index: u64) -> Result<Hash, AuditError> {
        self.0
            .audit_node(level, index)
            .map_err(|e| AuditError::Source(e.to_string()))?
            .ok_or(AuditError::Missing { level, index })
    }
}

impl AuditLog {
    pub(crate) fn new(store: Arc<Store>, state: StateMachine) -> AuditLog {
        AuditLog { store, state }
    }

    fn base(&self) -> Result<Frontier, ConsensusError> {
        match self.store.audit_base()? {
            None => Ok(Frontier::new()),
            Some(bytes) => Ok(Frontier::decode(&bytes)?),
        }
    }

    /// The tree as of the last applied entry.
    pub fn head(&self) -> Result<AuditHead, ConsensusError> {
        let (size, root, revision) = {
            let shared = self.state.read();
            (shared.audit.size(), shared.audit.root(), shared.revision())
        };
        Ok(AuditHead {
            size,
            root,
            revision,
            first_index: self.base()?.size(),
        })
    }

    /// Stored records from `from`, in order, at most `limit` and (past the first) `bytes_max`
    /// bytes, none beyond the head.
    pub fn records(
        &self,
        from: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<AuditRecords, ConsensusError> {
        let head = self.head()?;
        let limit =
            limit.min(usize::try_from(head.size.saturating_sub(from)).unwrap_or(usize::MAX));
        let leaves = if limit == 0 {
            Vec::new()
        } else {
            self.store.audit_leaves(from, limit, bytes_max)?
        };
        Ok(AuditRecords { head, leaves })
    }

    fn root_at(&self, size: u64, head: &AuditHead) -> Result<Hash, ConsensusError> {
        if size == head.size {
            return Ok(head.root);
        }
        if size == 0 {
            return Ok(signpost_audit::empty_root());
        }
        Ok(subtree_hash(&StoredNodes(&self.store), 0, size)?)
    }

    /// The root of the tree of `size` records, from stored subtree hashes.
    pub fn root_of(&self, size: u64) -> Result<Hash, ConsensusError> {
        let head = self.head()?;
        if size > head.size {
            return Err(AuditError::OutOfRange(format!(
                "a tree of {size} records; this node has {}",
                head.size
            ))
            .into());
        }
        self.root_at(size, &head)
    }

    /// Forgets the records before `base` (at least the current first, at most the head): the
    /// frontier of the tree of `base` records, read from its stored peaks, becomes the base.
    /// Returns false if the base has moved past `base` meanwhile (a snapshot install).
    pub async fn prune_to(&self, base: u64) -> Result<bool, ConsensusError> {
        let lock = self.state.audit_base_lock();
        let _held = lock.lock().await;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let head = this.head()?;
            if base <= head.first_index || base > head.size {
                return Ok(false);
            }
            // The peaks of `base`, left to right, as Frontier::encode lays them out.
            let mut frontier = base.to_be_bytes().to_vec();
            let mut start = 0u64;
            for level in (0..64u8).rev() {
                if (base >> level) & 1 == 1 {
                    let index = start >> level;
                    let hash = StoredNodes(&this.store).node(level, index)?;
                    frontier.extend_from_slice(&hash);
                    start += 1 << level;
                }
            }
            // Refuse to store a base that does not decode: it would make this node's log
            // unreadable.
            Frontier::decode(&frontier)?;
            this.store.audit_prune(base, &frontier)?;
            Ok(true)
        })
        .await
        .map_err(|e| ConsensusError::Unavailable(format!("audit prune task: {e}")))?
    }

    /// Record `index`, the root of the tree of `size` records (0: the head) and the proof that
    /// the record is in it.
    pub fn inclusion(&self, index: u64, size: u64) -> Result<Inclusion, ConsensusError> {
        let head = self.head()?;
        let size = if size == 0 { head.size } else { size };
        if size > head.size {
            return Err(AuditError::OutOfRange(format!(
                "a tree of {size} records; this node has {}",
                head.size
            ))
            .into());
        }
        let proof = inclusion_proof(&StoredNodes(&self.store), index, size)?;
        let root = self.root_at(size, &head)?;
        let leaf = self
            .store
            .audit_leaves(index, 1, usize::MAX)?
            .pop()
            .map(|(_, leaf)| leaf)
            .ok_or(AuditError::Missing { level: 0, index })?;
        Ok(Inclusion {
            size,
            root,
            leaf,
            proof,
        })
    }

    /// The roots of the trees of `old_size` and `new_size` records (0: the head) and the proof
    /// that the first is a prefix of the second.
    pub fn consistency(&self, old_size: u64, new_size: u64) -> Result<Consistency, ConsensusError> {
        let head = self.head()?;
        let new_size = if new_size == 0 { head.size } else { new_size };
        if new_size > head.size {
            return Err(AuditError::OutOfRange(format!(
                "a tree of {new_size} records; this node has {}",
                head.size
            ))
            .into());
        }
        let proof = consistency_proof(&StoredNodes(&self.store), old_size, new_size)?;
        let old_root = self.root_at(old_size, &head)?;
        let new_root = self.root_at(new_size, &head)?;
        Ok(Consistency {
            new_size,
            old_root,
            new_root,
            proof,
        })
    }

    /// Rehashes every stored record from the first, checks each stored subtree hash it
    /// completes, and the root against the head: a record or hash changed on disk is found,
    /// and the first one named. Costs one pass over the stored records.
    pub fn verify(&self) -> Result<AuditVerification, ConsensusError> {
        let head = self.head()?;
        let mut frontier = self.base()?;
        let mut result = AuditVerification {
            head: head.clone(),
            verified: false,
            checked: 0,
            first_bad: frontier.size(),
            problem: String::new(),
        };
        let nodes = StoredNodes(&self.store);
        while frontier.size() < head.size {
            let from = frontier.size();
            let want = usize::try_from(head.size - from)
                .unwrap_or(usize::MAX)
                .min(VERIFY_PAGE);
            let page = self.store.audit_leaves(from, want, usize::MAX)?;
            if page.is_empty() {
                result.first_bad = from;
                result.problem = format!("record {from} is missing");
                return Ok(result);
            }
            for (index, leaf) in page {
                let hash = leaf_hash(&leaf);
                result.checked += 1;
                for node in frontier.append(hash) {
                    let first = node.index << node.level;
                    match nodes.node(node.level, node.index) {
                        Ok(stored) if stored == node.hash => {}
                        Ok(_) if node.level == 0 => {
                            result.first_bad = index;
                            result.problem =
                                format!("record {index} does not match its stored hash");
                            return Ok(result);
                        }
                        Ok(_) => {
                            result.first_bad = first;
                            result.problem = format!(
                                "the stored hash of records {first}..{} does not match them",
                                first + (1u64 << node.level) - 1
                            );
                            return Ok(result);
                        }
                        Err(e) => {
                            result.first_bad = first;
                            result.problem = e.to_string();
                            return Ok(result);
                        }
                    }
                }
            }
        }
        if frontier.root() != head.root {
            result.first_bad = head.size;
            result.problem = "the records rehash to another root than the head".into();
            return Ok(result);
        }
        result.verified = true;
        result.first_bad = 0;
        Ok(result)
    }
}
