use std::io::Cursor;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use signpost_audit::Frontier;
use signpost_record::{VerifiedSignatures, VERIFIED_SIGNATURES_DEFAULT};
use signpost_state::{Event, Outcome, Registry};
use signpost_storage::{AuditPut, Store};
use tokio::sync::broadcast;

use crate::codec::{self, RAFT_MESSAGE_BYTES_MAX, SNAPSHOT_BYTES_MAX};
use crate::error::io_error;
use crate::error::ConsensusError;
use crate::type_config::{NodeAddr, TypeConfig};

const KEY_APPLIED: &str = "applied";
const KEY_MEMBERSHIP: &str = "membership";
const KEY_SNAPSHOT: &str = "snapshot";
/// The audit tree's frontier as of the last applied entry.
const KEY_AUDIT: &str = "audit";

/// Capacity of the applied-batch broadcast. A subscriber that falls further behind than this
/// sees `Lagged` and must resynchronise; apply never waits for subscribers.
const APPLIED_CHANNEL_CAPACITY: usize = 4096;

/// What one apply batch (or snapshot install) did, for watchers and lease tracking.
#[derive(Debug, Clone)]
pub enum Applied {
    /// Entries applied in order; `revision` is the last applied index.
    Events {
        /// Index of the last entry in the batch.
        revision: u64,
        /// Watch events, in revision order.
        events: Vec<Event>,
    },
    /// The state was replaced by a snapshot: history before `revision` is not available here.
    Reset {
        /// Index the snapshot covers.
        revision: u64,
    },
}

/// The registry as readers see it: consistent with `last_applied`.
#[derive(Debug)]
pub struct SharedState {
    /// The registry state machine.
    pub registry: Registry,
    /// The last applied log id.
    pub last_applied: Option<LogId<u64>>,
    /// The last applied membership.
    pub membership: StoredMembership<u64, NodeAddr>,
    /// The audit tree as of `last_applied`: one leaf per audited command, the same on every
    /// node. The records themselves are in the store.
    pub audit: Frontier,
}

impl SharedState {
    /// Index of the last applied entry (0 before anything was applied).
    pub fn revision(&self) -> u64 {
        self.last_applied.map(|l| l.index).unwrap_or(0)
    }
}

/// Serialized snapshot body: the registry's key/value export and the audit tree's frontier.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    format: u8,
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// [`Frontier::encode`] of the audit tree at the snapshot: a node that installs it carries
    /// on with the same tree without the records before it.
    audit: Vec<u8>,
}

/// 2: with the audit frontier.
const SNAPSHOT_FORMAT: u8 = 2;

/// A stored snapshot: metadata and body together, so they can never disagree.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, NodeAddr>,
    body: Vec<u8>,
}

/// A snapshot body decoded, or why it is not one of ours.
fn decode_snapshot(body: &[u8]) -> Result<SnapshotBody, String> {
    let decoded: SnapshotBody =
        codec::decode(body, SNAPSHOT_BYTES_MAX).map_err(|e| format!("does not decode: {e}"))?;
    if decoded.format != SNAPSHOT_FORMAT {
        return Err(format!("unknown snapshot format {}", decoded.format));
    }
    Ok(decoded)
}

/// Checks a received snapshot body before it goes anywhere near openraft: it must decode, be
/// of our format, load as a registry that `apply` could have produced (every signature
/// verified), and keep this node's genesis admin set if it has one. A snapshot that fails is
/// refused with the reason; the node keeps its state and keeps running.
pub(crate) fn check_snapshot(
    body: &[u8],
    own_genesis: Option<&signpost_record::AdminSet>,
) -> Result<(), String> {
    let body = decode_snapshot(body)?;
    Frontier::decode(&body.audit).map_err(|e| e.to_string())?;
    let registry = Registry::load(body.pairs).map_err(|e| format!("does not load: {e}"))?;
    if let Some(ours) = own_genesis {
        if registry.genesis() != Some(ours) {
            return Err("its genesis admin set is not this cluster's".into());
        }
    }
    Ok(())
}

/// The registry state machine over RocksDB. Cloning is cheap; clones share state.
#[derive(Debug, Clone)]
pub struct StateMachine {
    store: Arc<Store>,
    shared: Arc<RwLock<SharedState>>,
    applied_tx: broadcast::Sender<Arc<Applied>>,
    // Signatures this node's admission already verified; apply reuses them (once each).
    verified: Arc<VerifiedSignatures>,
    // Held by whatever replaces the stored audit base (snapshot install, retention), so the
    // two never interleave their batches.
    audit_base: Arc<tokio::sync::Mutex<()>>,
    // The size of the audit tree whose records and subtree hashes are in the store: apply
    // moves `SharedState::audit` first and writes its batch after, so a reader of the frontier
    // waits for this before proving anything about it.
    audit_stored: Arc<tokio::sync::watch::Sender<u64>>,
}

fn sm_error<E: std::error::Error + 'static>(verb: ErrorVerb, e: &E) -> StorageError<u64> {
    io_error(ErrorSubject::StateMachine, verb, e)
}

impl StateMachine {
    /// Loads the state machine from the store (empty on a new node).
    pub fn open(store: Arc<Store>) -> Result<StateMachine, ConsensusError> {
        let pairs = store.state_scan()?;
        // Our own apply verified every record before storing it; snapshots from peers go
        // through `Registry::load`, which verifies again.
        let registry = Registry::load_own(pairs)?;
        // Stored as Option<LogId> (None until the first apply), so decode that shape.
        let last_applied: Option<LogId<u64>> =
            decode_opt::<Option<LogId<u64>>>(&store, KEY_APPLIED)?.flatten();
        let membership = decode_opt(&store, KEY_MEMBERSHIP)?.unwrap_or_default();
        let audit = match store.machine_get(KEY_AUDIT)? {
            None => Frontier::new(),
            Some(bytes) => Frontier::decode(&bytes).map_err(|e| ConsensusError::Corrupt {
                what: KEY_AUDIT,
                detail: e.to_string(),
            })?,
        };
        let (applied_tx, _) = broadcast::channel(APPLIED_CHANNEL_CAPACITY);
        let audit_stored = Arc::new(tokio::sync::watch::Sender::new(audit.size()));
        Ok(StateMachine {
            store,
            shared: Arc::new(RwLock::new(SharedState {
                registry,
                last_applied,
                membership,
                audit,
            })),
            applied_tx,
            verified: Arc::new(VerifiedSignatures::new(VERIFIED_SIGNATURES_DEFAULT)),
            audit_base: Arc::new(tokio::sync::Mutex::new(())),
            audit_stored,
        })
    }

    /// Follows the size of the audit tree that is in the store (see the field).
    pub(crate) fn audit_stored(&self) -> tokio::sync::watch::Receiver<u64> {
        self.audit_stored.subscribe()
    }

    fn stored_audit_size(&self, size: u64) {
        self.audit_stored.send_if_modified(|stored| {
            let grows = size > *stored;
            if grows {
                *stored = size;
            }
            grows
        });
    }

    /// The signatures this node verified before proposing them, for its admission check to
    /// fill and its apply to reuse.
    pub fn verified_signatures(&self) -> &VerifiedSignatures {
        &self.verified
    }

    /// Read access to the registry and its revision.
    pub fn read(&self) -> RwLockReadGuard<'_, SharedState> {
        // A poisoned lock means a panic during apply: state may be half-updated, so stopping
        // is the only safe answer.
        self.shared
            .read()
            .unwrap_or_else(|_| panic!("state machine lock poisoned by a panic during apply"))
    }

    /// The lock over the stored audit base (see [`crate::audit_log::AuditLog::prune_to`]).
    pub(crate) fn audit_base_lock(&self) -> Arc<tokio::sync::Mutex<()>> {
        self.audit_base.clone()
    }

    /// Subscribe to applied batches (watch, leases).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Applied>> {
        self.applied_tx.subscribe()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, SharedState> {
        self.shared
            .write()
            .unwrap_or_else(|_| panic!("state machine lock poisoned by a panic during apply"))
    }

    fn snapshot_id(last: Option<LogId<u64>>) -> String {
        match last {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
            None => "empty".to_string(),
        }
    }
}

fn decode_opt<T: serde::de::DeserializeOwned>(
    store: &Store,
    key: &'static str,
) -> Result<Option<T>, ConsensusError> {
    match store.machine_get(key)? {
        None => Ok(None),
        Some(bytes) => codec::decode(&bytes, SNAPSHOT_BYTES_MAX)
            .map(Some)
            .map_err(|e| ConsensusError::Corrupt {
                what: key,
                detail: e.to_string(),
            }),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let (pairs, last_applied, membership, audit) = {
            let shared = self.read();
            (
                shared.registry.export(),
                shared.last_applied,
                shared.membership.clone(),
                shared.audit.encode(),
            )
        };
        let body = codec::encode(
            &SnapshotBody {
                format: SNAPSHOT_FORMAT,
                pairs,
                audit,
            },
            SNAPSHOT_BYTES_MAX,
        )
        .map_err(|e| sm_error(ErrorVerb::Write, &e))?;
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id: Self::snapshot_id(last_applied),
        };
        let stored = codec::encode(
            &StoredSnapshot {
                meta: meta.clone(),
                body: body.clone(),
            },
            SNAPSHOT_BYTES_MAX + 4096,
        )
        .map_err(|e| sm_error(ErrorVerb::Write, &e))?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.machine_put(KEY_SNAPSHOT, &stored))
            .await
            .map_err(|e| sm_error(ErrorVerb::Write, &e))?
            .map_err(|e| sm_error(ErrorVerb::Write, &e))?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = body.len(), "built snapshot");
        metrics::counter!(crate::SNAPSHOTS_BUILT_TOTAL).increment(1);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(body)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, NodeAddr>), StorageError<u64>> {
        let shared = self.read();
        Ok((shared.last_applied, shared.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Outcome>>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut outcomes = Vec::new();
        let mut changes = Vec::new();
        let mut events = Vec::new();
        let mut audit = Vec::new();
        let (last_applied, membership, frontier, audit_size) = {
            let mut shared = self.write();
            for entry in entries {
                let index = entry.log_id.index;
                // Applying an entry twice or going backwards is a broken invariant. (Gaps are
                // allowed by openraft's storage contract, e.g. right after a snapshot install.)
                if let Some(prev) = shared.last_applied {
                    assert!(
                        index > prev.index,
                        "apply out of order: last applied {} then {}",
                        prev.index,
                        index
                    );
                }
                match entry.payload {
                    EntryPayload::Blank => {
                        outcomes.push(vec![Outcome::Applied { revision: index }])
                    }
                    EntryPayload::Normal(request) => {
                        let applied =
                            shared
                                .registry
                                .apply_entry(index, &request, Some(&self.verified));
                        let mut entry_outcomes = Vec::with_capacity(applied.len());
                        for one in applied {
                            changes.extend(one.changes.into_iter().map(|c| (c.key, c.value)));
                            events.extend(one.events);
                            entry_outcomes.push(one.outcome);
                            if let Some(leaf) = one.audit {
                                let index = shared.audit.size();
                                let nodes = shared.audit.append(signpost_audit::leaf_hash(&leaf));
                                audit.push(AuditPut::Leaf { index, leaf });
                                audit.extend(nodes.into_iter().map(|n| AuditPut::Node {
                                    level: n.level,
                                    index: n.index,
                                    hash: n.hash,
                                }));
                            }
                        }
                        outcomes.push(entry_outcomes);
                    }
                    EntryPayload::Membership(m) => {
                        shared.membership = StoredMembership::new(Some(entry.log_id), m);
                        outcomes.push(vec![Outcome::Applied { revision: index }]);
                    }
                }
                shared.last_applied = Some(entry.log_id);
            }
            (
                shared.last_applied,
                shared.membership.clone(),
                shared.audit.encode(),
                shared.audit.size(),
            )
        };
        if outcomes.is_empty() {
            return Ok(outcomes);
        }
        let applied_bytes = codec::encode(&last_applied, RAFT_MESSAGE_BYTES_MAX)
            .map_err(|e| sm_error(ErrorVerb::Write, &e))?;
        let membership_bytes = codec::encode(&membership, RAFT_MESSAGE_BYTES_MAX)
            .map_err(|e| sm_error(ErrorVerb::Write, &e))?;
        let store = self.store.clone();
        // No fsync here: the entries are durable in the log, and after a power loss Raft applies
        // from the last-applied id stored in this very batch (see signpost_storage::Store).
        tokio::task::spawn_blocking(move || {
            store.state_apply(
                &changes,
                &[
                    (KEY_APPLIED, &applied_bytes),
                    (KEY_MEMBERSHIP, &membership_bytes),
                    (KEY_AUDIT, &frontier),
                ],
                &audit,
            )
        })
        .await
        .map_err(|e| sm_error(ErrorVerb::Write, &e))?
        .map_err(|e| sm_error(ErrorVerb::Write, &e))?;
        self.stored_audit_size(audit_size);
        let revision = last_applied.map(|l| l.index).unwrap_or(0);
        // Nobody listening is fine: send only fails when there are no receivers.
        let _ = self
            .applied_tx
            .send(Arc::new(Applied::Events { revision, events }));
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, NodeAddr>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let body = snapshot.into_inner();
        let audit_base = self.audit_base.clone();
        let _audit_base = audit_base.lock().await;
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let decoded = decode_snapshot(&body)
            .map_err(|e| io_error(subject.clone(), ErrorVerb::Read, &std::io::Error::other(e)))?;
        let pairs = decoded.pairs;
        // Validate the whole snapshot before touching the store: a bad snapshot must leave the
        // old state intact.
        let frontier = Frontier::decode(&decoded.audit)
            .map_err(|e| io_error(subject.clone(), ErrorVerb::Read, &e))?;
        let audit = decoded.audit;
        // The snapshot's perfect subtrees, stored so that proofs of the records after it can
        // use them as siblings.
        let peaks: Vec<AuditPut> = frontier
            .peaks()
            .into_iter()
            .map(|n| AuditPut::Node {
                level: n.level,
                index: n.index,
                hash: n.hash,
            })
            .collect();
        let registry = Registry::load(pairs.clone())
            .map_err(|e| io_error(subject.clone(), ErrorVerb::Read, &e))?;
        let applied_bytes = codec::encode(&meta.last_log_id, RAFT_MESSAGE_BYTES_MAX)
            .map_err(|e| sm_error(ErrorVerb::Write, &e))?;
        let membership_bytes = codec::encode(&meta.last_membership, RAFT_MESSAGE_BYTES_MAX)
            .map_err(|e| sm_error(ErrorVerb::Write, &e))?;
        let stored = codec::encode(
            &StoredSnapshot {
                meta: meta.clone(),
                body,
            },
            SNAPSHOT_BYTES_MAX + 4096,
        )
        .map_err(|e| sm_error(ErrorVerb::Write, &e))?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            store.state_replace(
                &pairs,
                &[
                    (KEY_APPLIED, &applied_bytes),
                    (KEY_MEMBERSHIP, &membership_bytes),
                    (KEY_SNAPSHOT, &stored),
                    (KEY_AUDIT, &audit),
                ],
                &audit,
                &peaks,
            )
        })
        .await
        .map_err(|e| sm_error(ErrorVerb::Write, &e))?
        .map_err(|e| sm_error(ErrorVerb::Write, &e))?;
        let audit_size = frontier.size();
        {
            let mut shared = self.write();
            shared.registry = registry;
            shared.last_applied = meta.last_log_id;
            shared.membership = meta.last_membership.clone();
            shared.audit = frontier;
        }
        self.stored_audit_size(audit_size);
        let revision = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        tracing::info!(snapshot = %meta.snapshot_id, revision, "installed snapshot");
        metrics::counter!(crate::SNAPSHOTS_INSTALLED_TOTAL).increment(1);
        let _ = self.applied_tx.send(Arc::new(Applied::Reset { revision }));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let stored: Option<StoredSnapshot> = match self
            .store
            .machine_get(KEY_SNAPSHOT)
            .map_err(|e| sm_error(ErrorVerb::Read, &e))?
        {
            None => None,
            Some(bytes) => Some(
                codec::decode(&bytes, SNAPSHOT_BYTES_MAX + 4096)
                    .map_err(|e| sm_error(ErrorVerb::Read, &e))?,
            ),
        };
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.body)),
        }))
    }
}

/// Writes a restored state into a new store (see [`crate::backup`]): the pairs as of
/// `last_applied`, `membership`, and a snapshot of both so peers can be sent it at once. A
/// backup holds the registry, not its audit history: the restored cluster starts a new audit
/// tree (the old one stays verifiable from the old nodes' stores and exports).
pub(crate) fn restore(
    store: &Store,
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    last_applied: LogId<u64>,
    membership: StoredMembership<u64, NodeAddr>,
) -> Result<(), ConsensusError> {
    let encode_err = |e: bincode::Error| ConsensusError::Backup(e.to_string());
    let audit = Frontier::new().encode();
    let body = codec::encode(
        &SnapshotBody {
            format: SNAPSHOT_FORMAT,
            pairs: pairs.clone(),
            audit: audit.clone(),
        },
        SNAPSHOT_BYTES_MAX,
    )
    .map_err(encode_err)?;
    let meta = SnapshotMeta {
        last_log_id: Some(last_applied),
        last_membership: membership.clone(),
        snapshot_id: StateMachine::snapshot_id(Some(last_applied)),
    };
    let stored = codec::encode(&StoredSnapshot { meta, body }, SNAPSHOT_BYTES_MAX + 4096)
        .map_err(encode_err)?;
    let applied = codec::encode(&Some(last_applied), RAFT_MESSAGE_BYTES_MAX).map_err(encode_err)?;
    let membership = codec::encode(&membership, RAFT_MESSAGE_BYTES_MAX).map_err(encode_err)?;
    store.state_replace(
        &pairs,
        &[
            (KEY_APPLIED, &applied),
            (KEY_MEMBERSHIP, &membership),
            (KEY_SNAPSHOT, &stored),
            (KEY_AUDIT, &audit),
        ],
        &audit,
        &[],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn blank(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[tokio::test]
    async fn applying_a_batch_costs_no_fsync_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut sm = StateMachine::open(Arc::clone(&store)).unwrap();

        // Phase 1: two batches applied; the log (not this) is what pays for durability.
        sm.apply(vec![blank(1), blank(2)]).await.unwrap();
        sm.apply(vec![blank(3)]).await.unwrap();
        assert_eq!(store.syncs(), 0, "apply must not fsync");

        // Phase 2: a reopen (the process killed, the OS kept its writes) resumes after index 3.
        drop(sm);
        drop(store);
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut sm = StateMachine::open(store).unwrap();
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(3));
    }
}
