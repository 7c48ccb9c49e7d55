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
