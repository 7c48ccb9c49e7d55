//! openraft's storage conformance suite, run against the RocksDB-backed log store and state
//! machine: the same suite every openraft storage implementation is held to.

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use signpost_consensus::{LogStore, StateMachine, TypeConfig};
use signpost_storage::Store;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("open rocksdb"));
        let sm = StateMachine::open(store.clone()).expect("open state machine");
        Ok((dir, LogStore::new(store), sm))
    }
}

#[test]
fn rocksdb_store_passes_the_openraft_storage_suite() {
    Suite::test_all(RocksBuilder).expect("storage suite");
}

mod reopen {
    use std::sync::Arc;

    use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
    use openraft::{
        CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, Vote,
    };
    use signpost_consensus::{LogStore, StateMachine, TypeConfig};
    use signpost_state::{Command, Request};
    use signpost_storage::Store;

    fn log_id(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn noop(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: log_id(1, index),
            payload: EntryPayload::Normal(Request {
                time_ms: 1,
                caller: "spiffe://signpost.local/node/1".into(),
                command: Command::Noop,
            }),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reopened_store_has_its_vote_log_applied_state_and_snapshot() {
        let dir = tempfile::tempdir().unwrap();

        eprintln!("phase 1: vote, append, apply and snapshot, then close");
        {
            let store = Arc::new(Store::open(dir.path()).unwrap());
            let mut log = LogStore::new(store.clone());
            let mut sm = StateMachine::open(store).unwrap();
            log.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
            let entries: Vec<_> = (1..=10).map(noop).collect();
            log.blocking_append(entries.clone()).await.unwrap();
            log.save_committed(Some(log_id(1, 10))).await.unwrap();
            let outcomes = sm.apply(entries).await.unwrap();
            assert_eq!(outcomes.len(), 10);
            let mut builder = sm.get_snapshot_builder().await;
            let snapshot = builder.build_snapshot().await.unwrap();
            assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 10)));
        }

        eprintln!("phase 2: everything is still there after reopening");
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut log = LogStore::new(store.clone());
        let mut sm = StateMachine::open(store).unwrap();
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(Vote::new_committed(1, 1))
        );
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 10)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(1, 10)));
        assert_eq!(log.try_get_log_entries(1..11).await.unwrap().len(), 10);
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 10)));
        let snapshot = sm
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("snapshot kept");
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 10)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_range_read_returns_every_entry_and_a_limited_read_is_capped() {
        eprintln!("phase 1: 5,000 entries in the log (more than one limited read)");
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut log = LogStore::new(store);
        for chunk in (1..=5_000u64).collect::<Vec<_>>().chunks(500) {
            log.blocking_append(chunk.iter().copied().map(noop).collect::<Vec<_>>())
                .await
                .unwrap();
        }

        eprintln!("phase 2: apply reads the whole committed range; openraft requires it");
        let all = log.try_get_log_entries(1..5_001).await.unwrap();
        assert_eq!(all.len(), 5_000);
        assert_eq!(all.first().map(|e| e.log_id.index), Some(1));
        assert_eq!(all.last().map(|e| e.log_id.index), Some(5_000));

        eprintln!("phase 3: replication reads are capped, never empty");
        let limited = log.limited_get_log_entries(1, 5_001).await.unwrap();
        assert!(!limited.is_empty() && limited.len() < 5_000);
        assert_eq!(
            limited.last().map(|e| e.log_id.index),
            Some(limited.len() as u64)
        );
    }
}
