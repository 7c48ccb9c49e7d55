//! The audit log as one node stores it: its head, its records, proofs from its stored subtree
//! hashes, and a full re-verification of what is on its disk.
//!
//! The tree itself is replicated state (the frontier in [`crate::SharedState::audit`], built in
//! apply); the records and subtree hashes are this node's copy, written in the same RocksDB
//! batch as the apply that produced them. Reads here are blocking RocksDB reads: call them from
//! a blocking task.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;
use signpost_audit::{
    consistency_proof, inclusion_proof, leaf_hash, subtree_hash, AuditError, Frontier, Hash,
    NodeSource, HASH_BYTES,
};
use signpost_proto::v1::audit_record::Op;
use signpost_proto::v1::AuditRecord;
use signpost_storage::{AuditPut, Store};

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

/// A served record to prove: the revision of the write that stored it, and its names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProofTarget {
    /// [`signpost_state::ServiceView::revisions`]: the entry whose apply logged it.
    pub revision: u64,
    /// The service.
    pub service: String,
    /// The instance.
    pub instance: String,
    /// When set (a watch event's record), the registration of exactly the envelope with this
    /// SHA-256; otherwise the revision's last registration of the instance, which is what the
    /// state holds (one entry can register an instance twice).
    pub envelope_sha256: Option<Hash>,
}

impl ProofTarget {
    fn is_logged_by(&self, record: &AuditRecord) -> bool {
        is_registration_of(record, &self.service, &self.instance)
            && self
                .envelope_sha256
                .is_none_or(|digest| record.envelope_sha256.as_slice() == digest.as_slice())
    }
}

/// A record's leaf and its inclusion proof.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordProof {
    /// Its leaf index.
    pub index: u64,
    /// The leaf, as hashed.
    pub leaf: Vec<u8>,
    /// The audit path, bottom-up.
    pub proof: Vec<Hash>,
}

/// What an answer needs proven: the tree it was read from and the smaller trees it must extend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvidenceRequest {
    /// The tree the answer was read from: the frontier read together with the registry state
    /// served (it is no longer the head once apply has moved on). Its peaks are every hash a
    /// proof into it needs of its right edge, so those come from memory.
    pub tree: Frontier,
    /// Sizes the proof must show it extends: the checkpoint's, and the two the client named.
    /// Each is proven when not 0 and below the tree's size; otherwise its proof is empty.
    pub extends: [u64; 3],
}

/// Proofs for one answer, see [`AuditLog::evidence`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// Consistency proofs from each of [`EvidenceRequest::extends`] to the answer's tree.
    pub consistency: [Vec<Hash>; 3],
    /// For each target in order: its record's proof, or `None` when this node does not store
    /// the leaf (pruned, or before the snapshot it installed) or finds no such record.
    pub inclusions: Vec<Option<RecordProof>>,
    /// The tree's last record and its proof: the record whose state root commits to the
    /// state the answer was read from. `None` when this node does not store it.
    pub head: Option<RecordProof>,
}

/// Leaves read per page while looking through one revision's records.
const REVISION_PAGE: usize = 256;
/// Most leaves one revision's search looks at: far above the commands one entry batches.
const REVISION_LEAVES_MAX: usize = 65_536;

fn decode_leaf(index: u64, leaf: &[u8]) -> Result<AuditRecord, ConsensusError> {
    AuditRecord::decode(leaf).map_err(|e| {
        AuditError::Source(format!("stored audit record {index} does not decode: {e}")).into()
    })
}

fn is_registration_of(record: &AuditRecord, service: &str, instance: &str) -> bool {
    record.op == Op::Register as i32
        && record.applied
        && record.service == service
        && record.instance == instance
}

/// Read access to the node's audit log.
#[derive(Debug, Clone)]
pub struct AuditLog {
    store: Arc<Store>,
    state: StateMachine,
    /// Where the records of registrations were found: (service, instance, revision, envelope) -> leaf
    /// index, a fact that never changes (the leaf is read and checked again on use). Cleared
    /// when full.
    found: Arc<std::sync::Mutex<HashMap<FoundKey, u64>>>,
    /// The evidence of recent answers, by what it is a function of.
    evidence: Arc<std::sync::Mutex<EvidenceCache>>,
}

/// Registrations whose leaf index [`AuditLog`] remembers (about 100 bytes each).
const FOUND_CACHE_MAX: usize = 100_000;
/// Bytes of proofs [`AuditLog`] keeps for answers asked again about the same tree (a
/// read-heavy registry): cleared when full.
const EVIDENCE_CACHE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// A registration: service, instance, revision.
type FoundKey = (String, String, u64, Option<Hash>);

/// What one answer's evidence is a function of.
type EvidenceKey = (u64, Hash, [u64; 3], Vec<ProofTarget>);

#[derive(Debug, Default)]
struct EvidenceCache {
    entries: HashMap<EvidenceKey, Evidence>,
    bytes: usize,
}

impl Evidence {
    /// About what it holds in memory.
    fn size_bytes(&self) -> usize {
        let proofs = || self.inclusions.iter().flatten().chain(&self.head);
        let hashes: usize = self.consistency.iter().map(Vec::len).sum::<usize>()
            + proofs().map(|p| p.proof.len()).sum::<usize>();
        let leaves: usize = proofs().map(|p| p.leaf.len()).sum();
        hashes * HASH_BYTES + leaves + 64 * (self.inclusions.len() + 1)
    }
}

struct StoredNodes<'a>(&'a Store);

/// Stored subtree hashes, with the peaks of one tree in memory first.
struct PeakedNodes<'a> {
    peaks: Vec<signpost_audit::Node>,
    store: &'a Store,
}

impl NodeSource for PeakedNodes<'_> {
    fn node(&self, level: u8, index: u64) -> Result<Hash, AuditError> {
        match self
            .peaks
            .iter()
            .find(|p| p.level == level && p.index == index)
        {
            Some(peak) => Ok(peak.hash),
            None => StoredNodes(self.store).node(level, index),
        }
    }
}

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
        AuditLog {
            store,
            state,
            found: Arc::default(),
            evidence: Arc::default(),
        }
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
            let keep = this.live_below(base)?;
            this.store.audit_prune(base, &frontier, &keep)?;
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

    /// The proofs an answer read from the tree of `request.size` records carries: that tree
    /// extends each size in `request.extends`, and each target's record is in it. Reads
    /// O(log n) leaves per target to find it (leaves are in revision order) and O(log² n)
    /// stored hashes per proof.
    pub fn evidence(
        &self,
        request: &EvidenceRequest,
        targets: &[ProofTarget],
    ) -> Result<Evidence, ConsensusError> {
        let evidence = self.evidence_uncached(request, targets)?;
        let bytes = evidence.size_bytes();
        if bytes <= EVIDENCE_CACHE_BYTES_MAX / 16 {
            let mut cache = self
                .evidence
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if cache.bytes + bytes > EVIDENCE_CACHE_BYTES_MAX {
                *cache = EvidenceCache::default();
            }
            let key = (
                request.tree.size(),
                request.tree.root(),
                request.extends,
                targets.to_vec(),
            );
            if cache.entries.insert(key, evidence.clone()).is_none() {
                cache.bytes += bytes;
            }
        }
        Ok(evidence)
    }

    /// Waits (at most `wait`) until the tree of `size` records is in the store, so proofs about
    /// a frontier just read from the state can be made from it.
    pub async fn stored(&self, size: u64, wait: std::time::Duration) -> Result<(), ConsensusError> {
        let mut stored = self.state.audit_stored();
        let reached = tokio::time::timeout(wait, stored.wait_for(|s| *s >= size))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
        if reached {
            Ok(())
        } else {
            Err(ConsensusError::Unavailable(format!(
                "the audit tree of {size} records is not in this node's store yet"
            )))
        }
    }

    /// The evidence [`AuditLog::evidence`] made for the same tree, sizes and records, if it
    /// still has it: memory only, so callers on the async workers ask this first.
    pub fn cached_evidence(
        &self,
        request: &EvidenceRequest,
        targets: &[ProofTarget],
    ) -> Option<Evidence> {
        let key = (
            request.tree.size(),
            request.tree.root(),
            request.extends,
            targets.to_vec(),
        );
        self.evidence
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entries
            .get(&key)
            .cloned()
    }

    fn evidence_uncached(
        &self,
        request: &EvidenceRequest,
        targets: &[ProofTarget],
    ) -> Result<Evidence, ConsensusError> {
        let size = request.tree.size();
        let nodes = PeakedNodes {
            peaks: request.tree.peaks(),
            store: &self.store,
        };
        let mut consistency: [Vec<Hash>; 3] = Default::default();
        for (proof, &old) in consistency.iter_mut().zip(&request.extends) {
            if old != 0 && old < size {
                *proof = consistency_proof(&nodes, old, size)?;
            }
        }
        let mut inclusions = Vec::with_capacity(targets.len());
        for target in targets {
            let found = self.find_record_cached(target, size)?;
            inclusions.push(match found {
                None => None,
                Some((index, leaf)) => Some(RecordProof {
                    index,
                    leaf,
                    proof: inclusion_proof(&nodes, index, size)?,
                }),
            });
        }
        let head = match size.checked_sub(1) {
            Some(index) => match self.store.audit_leaf(index)? {
                Some(leaf) => Some(RecordProof {
                    index,
                    leaf,
                    proof: inclusion_proof(&nodes, index, size)?,
                }),
                None => None,
            },
            None => None,
        };
        Ok(Evidence {
            consistency,
            inclusions,
            head,
        })
    }

    /// [`AuditLog::find_record`], remembering where it found each record: a read-heavy
    /// registry proves the same records over and over.
    fn find_record_cached(
        &self,
        target: &ProofTarget,
        size: u64,
    ) -> Result<Option<(u64, Vec<u8>)>, ConsensusError> {
        let key = (
            target.service.clone(),
            target.instance.clone(),
            target.revision,
            target.envelope_sha256,
        );
        let known = self
            .found
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&key)
            .copied();
        if let Some(index) = known.filter(|&index| index < size) {
            if let Some(leaf) = self.store.audit_leaf(index)? {
                let record = decode_leaf(index, &leaf)?;
                if record.revision == target.revision && target.is_logged_by(&record) {
                    return Ok(Some((index, leaf)));
                }
            }
        }
        let found = self.find_record(target, size)?;
        if let Some((index, _)) = &found {
            let mut cache = self
                .found
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if cache.len() >= FOUND_CACHE_MAX {
                cache.clear();
            }
            cache.insert(key, *index);
        }
        Ok(found)
    }

    /// The leaf of the applied registration of `target` logged at its revision, among the
    /// stored leaves below `size` (those after the base, and those kept below it for live
    /// registrations): a binary search, by seeks, for the revision's first stored leaf, then
    /// the last matching leaf of that revision (one entry can register an instance twice; the
    /// state holds the last).
    fn find_record(
        &self,
        target: &ProofTarget,
        size: u64,
    ) -> Result<Option<(u64, Vec<u8>)>, ConsensusError> {
        // Invariant: stored leaves below `lo` are of earlier revisions, stored leaves from `hi`
        // (below `size`) of this one or later.
        let (mut lo, mut hi) = (0u64, size);
        // Most records served are recent: gallop back from the head by point reads while the
        // leaves are contiguous (from the base on), then search what is left.
        let base = self.base()?.size();
        let mut step = 1u64;
        while hi > base && step <= hi - base {
            let probe = hi - step;
            let Some(leaf) = self.store.audit_leaf(probe)? else {
                break;
            };
            if decode_leaf(probe, &leaf)?.revision < target.revision {
                lo = probe + 1;
                break;
            }
            hi = probe;
            step = step.saturating_mul(2);
        }
        if lo > 0 {
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                let leaf = self.store.audit_leaf(mid)?.ok_or(AuditError::Missing {
                    level: 0,
                    index: mid,
                })?;
                if decode_leaf(mid, &leaf)?.revision < target.revision {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.store.audit_leaves_sparse(mid, hi, 1)?.pop() {
                None => hi = mid,
                Some((index, leaf)) => {
                    if decode_leaf(index, &leaf)?.revision < target.revision {
                        lo = index + 1;
                    } else {
                        hi = mid;
                    }
                }
            }
        }
        let mut found = None;
        let mut at = lo;
        let mut seen = 0usize;
        'pages: while at < size && seen < REVISION_LEAVES_MAX {
            let page = self.store.audit_leaves_sparse(at, size, REVISION_PAGE)?;
            if page.is_empty() {
                break;
            }
            for (index, leaf) in page {
                seen += 1;
                at = index + 1;
                let record = decode_leaf(index, &leaf)?;
                if record.revision != target.revision {
                    break 'pages;
                }
                if target.is_logged_by(&record) {
                    found = Some((index, leaf));
                }
            }
        }
        Ok(found)
    }

    /// What a prune to `base` must keep below it so that every live registration whose record
    /// lies there can still be proven: its record, and the subtree hashes of its audit path
    /// inside its peak of `base` (every other hash its proofs need is a peak or lies after the
    /// base). One pass over the stored records below `base`; bounded by the live instances.
    fn live_below(&self, base: u64) -> Result<Vec<AuditPut>, ConsensusError> {
        // Records of revisions after the first kept record's are all after the base.
        let after = match self.store.audit_leaves(base, 1, usize::MAX)?.pop() {
            Some((index, leaf)) => decode_leaf(index, &leaf)?.revision,
            None => u64::MAX,
        };
        let live: HashMap<(String, String), u64> = {
            let shared = self.state.read();
            shared
                .registry
                .record_revisions()
                .filter(|(_, _, revision)| *revision <= after)
                .map(|(s, i, r)| ((s.to_owned(), i.to_owned()), r))
                .collect()
        };
        let mut found: HashMap<(String, String), (u64, Vec<u8>)> = HashMap::new();
        let mut at = 0;
        while !live.is_empty() && at < base {
            let page = self.store.audit_leaves_sparse(at, base, VERIFY_PAGE)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            at = last + 1;
            for (index, leaf) in page {
                let record = decode_leaf(index, &leaf)?;
                let key = (record.service.clone(), record.instance.clone());
                if live.get(&key) == Some(&record.revision)
                    && is_registration_of(&record, &key.0, &key.1)
                {
                    found.insert(key, (index, leaf));
                }
            }
        }
        let nodes = StoredNodes(&self.store);
        let mut keep = Vec::new();
        let mut kept_nodes = std::collections::HashSet::new();
        let mut kept: Vec<(u64, Vec<u8>)> = found.into_values().collect();
        // The last record below the base is the head while nothing is applied after it, and
        // the head's state root is what proves an answer whole (see `Evidence::head`).
        if let Some(last) = base.checked_sub(1) {
            if !kept.iter().any(|(index, _)| *index == last) {
                if let Some(leaf) = self.store.audit_leaf(last)? {
                    kept.push((last, leaf));
                }
            }
        }
        for (index, leaf) in kept {
            // The peak of `base` holding the record: the set bit of `base` whose run covers it.
            let mut start = 0u64;
            let mut peak_level = 0u8;
            for level in (0..64u8).rev() {
                if (base >> level) & 1 == 1 {
                    if index < start + (1u64 << level) {
                        peak_level = level;
                        break;
                    }
                    start += 1u64 << level;
                }
            }
            // A path hash this node lacks (a record kept by an older version without its
            // path) makes the record unprovable here anyway: keep neither.
            let path: Result<Vec<(u8, u64, Hash)>, AuditError> = (0..peak_level)
                .map(|level| {
                    let sibling = (index >> level) ^ 1;
                    nodes
                        .node(level, sibling)
                        .map(|hash| (level, sibling, hash))
                })
                .collect();
            let Ok(path) = path else {
                tracing::warn!(
                    index,
                    "a live registration's audit path is incomplete; not kept"
                );
                continue;
            };
            for (level, sibling, hash) in path {
                if kept_nodes.insert((level, sibling)) {
                    keep.push(AuditPut::Node {
                        level,
                        index: sibling,
                        hash,
                    });
                }
            }
            keep.push(AuditPut::Leaf { index, leaf });
        }
        Ok(keep)
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
        // The records kept below the base for live registrations: each must still prove into
        // the head from the hashes kept with it.
        let mut at = 0;
        while at < head.first_index {
            let page = self
                .store
                .audit_leaves_sparse(at, head.first_index, VERIFY_PAGE)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            at = last + 1;
            for (index, leaf) in page {
                result.checked += 1;
                let proven = inclusion_proof(&nodes, index, head.size).and_then(|proof| {
                    let proof: Vec<Vec<u8>> = proof.iter().map(|h| h.to_vec()).collect();
                    signpost_audit::verify_inclusion(&leaf, index, head.size, &head.root, &proof)
                });
                if let Err(e) = proven {
                    result.first_bad = index;
                    result.problem = format!(
                        "record {index}, kept below the base for a live registration, does not prove into the head: {e}"
                    );
                    return Ok(result);
                }
            }
        }
        result.verified = true;
        result.first_bad = 0;
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(revision: u64, position: u32, instance: &str, applied: bool) -> Vec<u8> {
        AuditRecord {
            revision,
            position,
            op: Op::Register as i32,
            service: "payments".into(),
            instance: instance.into(),
            applied,
            sequence: revision,
            envelope_sha256: envelope_of(revision, position).to_vec(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// The envelope hash the leaf at `position` of `revision` names.
    fn envelope_of(revision: u64, position: u32) -> Hash {
        sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            format!("{revision}/{position}"),
        ))
        .into()
    }

    /// A log of `revisions` entries of three commands each: p0 applied, p1 refused, p0 applied
    /// again (the state holds the second); returns it and its stored tree.
    fn log_of(revisions: u64) -> (tempfile::TempDir, AuditLog, Frontier) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let state = StateMachine::open(Arc::clone(&store)).unwrap();
        let mut frontier = Frontier::new();
        let mut puts = Vec::new();
        for revision in 1..=revisions {
            for (position, (instance, applied)) in [("p0", true), ("p1", false), ("p0", true)]
                .into_iter()
                .enumerate()
            {
                let bytes = leaf(revision, position as u32, instance, applied);
                let index = frontier.size();
                for node in frontier.append(leaf_hash(&bytes)) {
                    puts.push(AuditPut::Node {
                        level: node.level,
                        index: node.index,
                        hash: node.hash,
                    });
                }
                puts.push(AuditPut::Leaf { index, leaf: bytes });
            }
        }
        store.state_apply(&[], &[], &puts).unwrap();
        (dir, AuditLog::new(store, state), frontier)
    }

    fn target(revision: u64, instance: &str) -> ProofTarget {
        ProofTarget {
            envelope_sha256: None,
            revision,
            service: "payments".into(),
            instance: instance.into(),
        }
    }

    #[test]
    fn a_registration_is_found_at_the_last_applied_leaf_of_its_revision_wherever_it_lies() {
        let (_dir, log, frontier) = log_of(100);
        let size = frontier.size();

        eprintln!("phase 1: every revision, near the head (gallop) and far from it (search)");
        for revision in 1..=100 {
            let (index, _) = log
                .find_record(&target(revision, "p0"), size)
                .unwrap()
                .expect("found");
            assert_eq!(index, (revision - 1) * 3 + 2, "revision {revision}");
        }

        eprintln!("phase 2: a refused command or another revision is none; a smaller tree holds only the first");
        assert_eq!(log.find_record(&target(50, "p1"), size).unwrap(), None);
        assert_eq!(log.find_record(&target(101, "p0"), size).unwrap(), None);
        let first_of_last = log.find_record(&target(100, "p0"), size - 1).unwrap();
        assert_eq!(first_of_last.map(|f| f.0), Some(size - 3));

        eprintln!("phase 2b: a watch event's target names its envelope: the first of two puts");
        let first_put = ProofTarget {
            envelope_sha256: Some(envelope_of(50, 0)),
            ..target(50, "p0")
        };
        assert_eq!(
            log.find_record_cached(&first_put, size)
                .unwrap()
                .map(|f| f.0),
            Some(49 * 3)
        );
        let unknown = ProofTarget {
            envelope_sha256: Some([9; 32]),
            ..target(50, "p0")
        };
        assert_eq!(log.find_record_cached(&unknown, size).unwrap(), None);
        assert_eq!(
            log.find_record_cached(&target(50, "p0"), size)
                .unwrap()
                .map(|f| f.0),
            Some(49 * 3 + 2),
            "the state's (last) registration is still found by its own key"
        );

        eprintln!("phase 3: the evidence proves it, and the cached lookup agrees");
        let request = EvidenceRequest {
            tree: frontier.clone(),
            extends: [10, 0, size],
        };
        let evidence = log.evidence(&request, &[target(7, "p0")]).unwrap();
        let proof = evidence.inclusions[0].clone().expect("proven");
        let hashes: Vec<Vec<u8>> = proof.proof.iter().map(|h| h.to_vec()).collect();
        signpost_audit::verify_inclusion(&proof.leaf, proof.index, size, &frontier.root(), &hashes)
            .unwrap();
        assert!(evidence.consistency[1].is_empty() && evidence.consistency[2].is_empty());
        assert!(!evidence.consistency[0].is_empty());
        assert_eq!(
            log.cached_evidence(&request, &[target(7, "p0")]),
            Some(evidence)
        );
        assert_eq!(
            log.find_record_cached(&target(7, "p0"), size)
                .unwrap()
                .map(|f| f.0),
            Some(20)
        );
    }

    #[test]
    fn a_record_kept_below_the_base_is_found_and_proven_after_the_prune() {
        let (_dir, log, frontier) = log_of(40);
        let size = frontier.size();
        let nodes = StoredNodes(&log.store);

        eprintln!(
            "phase 1: prune to 64, keeping revision 5's registration and its path in its peak"
        );
        let index = 14u64;
        let mut keep = vec![AuditPut::Leaf {
            index,
            leaf: leaf(5, 2, "p0", true),
        }];
        for level in 0..6u8 {
            let sibling = (index >> level) ^ 1;
            keep.push(AuditPut::Node {
                level,
                index: sibling,
                hash: nodes.node(level, sibling).unwrap(),
            });
        }
        let mut base = Frontier::new();
        for revision in 1..=40u64 {
            for (position, (instance, applied)) in [("p0", true), ("p1", false), ("p0", true)]
                .into_iter()
                .enumerate()
            {
                if base.size() < 64 {
                    base.append(leaf_hash(&leaf(
                        revision,
                        position as u32,
                        instance,
                        applied,
                    )));
                }
            }
        }
        log.store.audit_prune(64, &base.encode(), &keep).unwrap();

        eprintln!("phase 2: the kept record is found below the base, one after it too");
        let found = log
            .find_record(&target(5, "p0"), size)
            .unwrap()
            .expect("kept");
        assert_eq!(found.0, index);
        assert_eq!(
            log.find_record(&target(6, "p0"), size).unwrap(),
            None,
            "pruned"
        );
        assert_eq!(
            log.find_record(&target(30, "p0"), size)
                .unwrap()
                .map(|f| f.0),
            Some(89)
        );

        eprintln!("phase 3: it proves into the head from what was kept");
        let proof: Vec<Vec<u8>> = inclusion_proof(&nodes, index, size)
            .unwrap()
            .iter()
            .map(|h| h.to_vec())
            .collect();
        signpost_audit::verify_inclusion(&found.1, index, size, &frontier.root(), &proof).unwrap();
    }
}
