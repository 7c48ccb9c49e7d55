use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogId, RaftLogReader, StorageError,
    Vote,
};
use signpost_storage::Store;

use crate::codec::{self, RAFT_MESSAGE_BYTES_MAX};
use crate::error::io_error;
use crate::type_config::TypeConfig;

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "purged";

/// Entries returned by one limited read (replication), so a lagging follower cannot make the
/// leader load the whole log into memory at once. Apply reads whole ranges: openraft requires
/// `try_get_log_entries` to return everything asked for.
const LIMITED_READ_ENTRIES_MAX: usize = 4096;

/// How often at most the durable watermark file is rewritten (one fsync each time).
const WATERMARK_INTERVAL: Duration = Duration::from_secs(1);

/// The Raft log on RocksDB. Cloning is cheap; clones share the database.
#[derive(Debug, Clone)]
pub struct LogStore {
    store: Arc<Store>,
    // Mirrors the persisted committed index for status reporting without a disk read.
    committed: Arc<AtomicU64>,
    // When the watermark was last written and what it says; at most one write per
    // WATERMARK_INTERVAL from the commit path, the rest by `flush_watermark`.
    watermark_written: Arc<Mutex<(Option<Instant>, u64)>>,
}

impl LogStore {
    /// A log store over an open database.
    pub fn new(store: Arc<Store>) -> LogStore {
        LogStore {
            store,
            committed: Arc::new(AtomicU64::new(0)),
            watermark_written: Arc::new(Mutex::new((None, 0))),
        }
    }

    /// Refuses a log that ends below the committed index this node recorded outside RocksDB:
    /// entries it synced and acknowledged are gone (a damaged or truncated WAL), and a node
    /// that rejoined with a shorter log could help lose committed data.
    pub async fn check_watermark(&mut self) -> Result<(), crate::ConsensusError> {
        let Some(committed) = self.store.watermark()? else {
            return Ok(());
        };
        let state = self
            .get_log_state()
            .await
            .map_err(|e| crate::ConsensusError::Corrupt {
                what: "raft log",
                detail: e.to_string(),
            })?;
        let last = state.last_log_id.map(|l| l.index).unwrap_or(0);
        if last < committed {
            return Err(crate::ConsensusError::LogBehindWatermark {
                last,
                committed,
                dir: self.store.path().display().to_string(),
            });
        }
        Ok(())
    }

    /// Records `index` as the watermark if it is above the recorded one (and, when
    /// `rate_limited`, if the last write is at least [`WATERMARK_INTERVAL`] old).
    fn record_watermark(
        &self,
        index: u64,
        rate_limited: bool,
    ) -> Result<(), signpost_storage::StorageError> {
        let mut written = self
            .watermark_written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let too_soon = rate_limited
            && written
                .0
                .is_some_and(|at| at.elapsed() < WATERMARK_INTERVAL);
        if too_soon || written.1 >= index {
            return Ok(());
        }
        self.store.record_watermark(index)?;
        *written = (Some(Instant::now()), index);
        Ok(())
    }

    /// Records the committed index if the commit path's rate limit left it unrecorded; called
    /// every [`WATERMARK_INTERVAL`], so the watermark trails the commit index by at most that.
    pub fn flush_watermark(&self) -> Result<(), signpost_storage::StorageError> {
        self.record_watermark(self.committed_index(), false)
    }

    /// Runs [`LogStore::flush_watermark`] every [`WATERMARK_INTERVAL`] until `stop` resolves.
    pub(crate) async fn flush_watermark_periodically(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(WATERMARK_INTERVAL);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.flush_watermark()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "cannot record the committed watermark"),
                Err(e) => tracing::error!(error = %e, "watermark task failed"),
            }
        }
    }

    /// Highest index this node has persisted as committed.
    pub fn committed_index(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &'static str,
        subject: ErrorSubject<u64>,
    ) -> Result<Option<T>, StorageError<u64>> {
        let bytes = self
            .store
            .raft_get(key)
            .map_err(|e| io_error(subject.clone(), ErrorVerb::Read, &e))?;
        match bytes {
            None => Ok(None),
            Some(b) => codec::decode(&b, RAFT_MESSAGE_BYTES_MAX)
                .map(Some)
                .map_err(|e| io_error(subject, ErrorVerb::Read, &e)),
        }
    }

    fn write_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        value: &T,
        subject: ErrorSubject<u64>,
        synced: bool,
    ) -> Result<(), StorageError<u64>> {
        let bytes = codec::encode(value, RAFT_MESSAGE_BYTES_MAX)
            .map_err(|e| io_error(subject.clone(), ErrorVerb::Write, &e))?;
        let written = if synced {
            self.store.raft_put(key, &bytes)
        } else {
            self.store.raft_put_unsynced(key, &bytes)
        };
        written.map_err(|e| io_error(subject, ErrorVerb::Write, &e))
    }

    fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry<TypeConfig>, StorageError<u64>> {
        let entry: Entry<TypeConfig> = codec::decode(bytes, RAFT_MESSAGE_BYTES_MAX)
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Read, &e))?;
        // What we read must be what we wrote under this key.
        if entry.log_id.index != index {
            return Err(io_error(
                ErrorSubject::Logs,
                ErrorVerb::Read,
                &std::io::Error::other(format!(
                    "log key {index} holds entry {}",
                    entry.log_id.index
                )),
            ));
        }
        Ok(entry)
    }
}

impl LogStore {
    async fn read_range(
        &self,
        start: u64,
        end: u64,
        limit: usize,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let store = self.store.clone();
        let raw = tokio::task::spawn_blocking(move || store.log_range(start, end, limit))
            .await
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Read, &e))?
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Read, &e))?;
        raw.iter()
            .map(|(index, bytes)| Self::decode_entry(*index, bytes))
            .collect()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        self.read_range(start, end, LIMITED_READ_ENTRIES_MAX).await
    }

    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        self.read_range(start, end, usize::MAX).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let last_purged: Option<LogId<u64>> = self.read_meta(KEY_PURGED, ErrorSubject::Logs)?;
        let last = self
            .store
            .log_last()
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Read, &e))?;
        let last_log_id = match last {
            Some((index, bytes)) => Some(*Self::decode_entry(index, &bytes)?.get_log_id()),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        // A vote must outlive a power loss: granting two votes in one term breaks Raft.
        self.write_meta(KEY_VOTE, vote, ErrorSubject::Vote, true)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        self.read_meta(KEY_VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        // Unsynced: openraft calls this on its own task for every commit advance, and an fsync
        // here stalled the leader once per batch. A committed index lost with power only means
        // applying less at start-up; the leader tells this node the rest.
        self.write_meta(KEY_COMMITTED, &committed, ErrorSubject::Store, false)?;
        let index = committed.map(|l| l.index).unwrap_or(0);
        self.committed.store(index, Ordering::Relaxed);
        // The committed index is on disk (synced) in RocksDB; the watermark outside it lags by
        // at most WATERMARK_INTERVAL and lets the next start detect a shortened log.
        self.record_watermark(index, true)
            .map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Write, &e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        let committed: Option<Option<LogId<u64>>> =
            self.read_meta(KEY_COMMITTED, ErrorSubject::Store)?;
        let committed = committed.flatten();
        self.committed
            .store(committed.map(|l| l.index).unwrap_or(0), Ordering::Relaxed);
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes = codec::encode(&entry, RAFT_MESSAGE_BYTES_MAX)
                .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Write, &e))?;
            encoded.push((entry.log_id.index, bytes));
        }
        let store = self.store.clone();
        // The write is synced (fsync of the WAL) before we report it flushed: only then may Raft
        // count this node towards a quorum for these entries.
        let result = tokio::task::spawn_blocking(move || store.log_append(&encoded))
            .await
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Write, &e))?;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(io_error(ErrorSubject::Logs, ErrorVerb::Write, &e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.store
            .log_truncate(log_id.index)
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, &e))
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let marker = codec::encode(&log_id, RAFT_MESSAGE_BYTES_MAX)
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, &e))?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.log_purge(log_id.index, KEY_PURGED, &marker))
            .await
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, &e))?
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, &e))
    }
}

/// Writes the Raft metadata of a restored member (see [`crate::backup`]): its log is empty
/// and purged up to `last`, which is committed, and `vote` is the term to campaign after.
pub(crate) fn restore(
    store: &Store,
    vote: Vote<u64>,
    last: LogId<u64>,
) -> Result<(), crate::ConsensusError> {
    let encode_err = |e: bincode::Error| crate::ConsensusError::Backup(e.to_string());
    let purged = codec::encode(&last, RAFT_MESSAGE_BYTES_MAX).map_err(encode_err)?;
    store.log_purge(last.index, KEY_PURGED, &purged)?;
    let committed = codec::encode(&Some(last), RAFT_MESSAGE_BYTES_MAX).map_err(encode_err)?;
    store.raft_put(KEY_COMMITTED, &committed)?;
    let vote = codec::encode(&vote, RAFT_MESSAGE_BYTES_MAX).map_err(encode_err)?;
    store.raft_put(KEY_VOTE, &vote)?;
    Ok(())
}
