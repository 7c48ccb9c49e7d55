//! RocksDB persistence for a Signpost node.
//!
//! One database, five column families, each with one owner:
//!
//! | column family | holds | written by |
//! |---|---|---|
//! | `log` | Raft log entries keyed by big-endian index | the Raft log store |
//! | `raft` | vote, committed and purged log ids | the Raft log store |
//! | `state` | the registry's key/value pairs | the state machine |
//! | `machine` | last applied log id, membership, current snapshot | the state machine |
//! | `audit` | audit records and the hashes of the audit tree's perfect subtrees | the state machine |
//!
//! Every write that Raft counts on is a synced write (`WriteOptions::set_sync`): log appends,
//! truncations, purges, votes, snapshots. So an acknowledged entry survives `kill -9` and power
//! loss. State-machine batches and the committed index are not synced of their own (see
//! [`Store::state_apply`]): the log they are derived from is, and every column family shares
//! one write-ahead log, so the next synced write makes them durable too, in order. After a
//! power loss the state may lag the log, never lead it, and Raft applies the difference again,
//! as etcd does with its backend. A state-machine batch carries the state changes and the
//! last-applied id together, so the two can never disagree after a crash.
//!
//! This crate knows nothing of openraft or of the registry: values are opaque bytes, which keeps
//! RocksDB and openraft each inside one crate.
#![deny(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    rust_2018_idioms,
    unused_must_use
)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

/// Largest value this crate writes or accepts on read. A snapshot is the largest value.
pub const VALUE_BYTES_MAX: usize = 512 * 1024 * 1024;

const CF_LOG: &str = "log";
const CF_RAFT: &str = "raft";
const CF_STATE: &str = "state";
const CF_MACHINE: &str = "machine";
const CF_AUDIT: &str = "audit";
const CFS: [&str; 5] = [CF_LOG, CF_RAFT, CF_STATE, CF_MACHINE, CF_AUDIT];
/// Audit keys: `l` + index (records), `n` + level + index (subtree hashes), `b` (the base).
const AUDIT_LEAF: u8 = b'l';
const AUDIT_NODE: u8 = b'n';
const AUDIT_BASE: &[u8] = b"b";
/// Bytes of an audit tree hash.
pub const AUDIT_HASH_BYTES: usize = 32;
/// File (in the database directory) holding the durable committed watermark.
pub const WATERMARK_FILE: &str = "SIGNPOST-COMMITTED";
const WATERMARK_MAGIC: &str = "signpost-committed-v1";

fn parse_watermark(text: &str) -> Option<u64> {
    let mut words = text.trim_end_matches('\n').split(' ');
    let (magic, index) = (words.next()?, words.next()?);
    if magic != WATERMARK_MAGIC || words.next().is_some() {
        return None;
    }
    index.parse().ok()
}

/// Errors of the storage layer. Every one of them is fatal for the node's Raft instance:
/// a store that cannot write or read back what it wrote must stop, not limp on.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// RocksDB refused an operation.
    #[error("rocksdb at {path}: {source}")]
    Rocks {
        /// Database directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rocksdb::Error,
    },
    /// A column family the store needs is missing (the database was not created by Signpost).
    #[error("column family {0} is missing")]
    MissingColumnFamily(&'static str),
    /// A key or value read back from disk does not have the shape this crate writes.
    #[error("corrupt {what}: {detail}")]
    Corrupt {
        /// Which record was corrupt.
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// A caller tried to write a value larger than [`VALUE_BYTES_MAX`].
    #[error("value of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// Length of the rejected value.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, StorageError>;

/// A change to the `state` column family: `None` deletes the key.
pub type StateChange = (Vec<u8>, Option<Vec<u8>>);

/// A write to the `audit` column family, made in the same batch as the apply that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditPut {
    /// Record number `index`, as hashed into the tree.
    Leaf {
        /// Leaf index.
        index: u64,
        /// The encoded record.
        leaf: Vec<u8>,
    },
    /// The hash of the perfect subtree of `2^level` records from `index * 2^level`.
    Node {
        /// Height above the records.
        level: u8,
        /// Position among the subtrees of that level.
        index: u64,
        /// The subtree's hash.
        hash: [u8; AUDIT_HASH_BYTES],
    },
}

fn audit_leaf_key(index: u64) -> [u8; 9] {
    let mut key = [AUDIT_LEAF; 9];
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}

fn audit_node_key(level: u8, index: u64) -> [u8; 10] {
    let mut key = [AUDIT_NODE; 10];
    key[1] = level;
    key[2..].copy_from_slice(&index.to_be_bytes());
    key
}

fn parse_index(key: &[u8], tag: u8) -> Option<u64> {
    match key {
        [t, rest @ ..] if *t == tag => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

/// The node's RocksDB database.
#[derive(Debug)]
pub struct Store {
    db: DB,
    path: PathBuf,
    // Synced writes (each one fsync of the write-ahead log) since open, for metrics and for the
    // tests that hold the write path to its fsync budget.
    syncs: AtomicU64,
}

impl Store {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // One WAL for all column families: a batch that spans `state` and `machine` is atomic.
        opts.set_atomic_flush(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_max_open_files(512);
        opts.set_keep_log_file_num(4);
        let cfs = CFS.iter().map(|name| {
            let mut cf_opts = Options::default();
            cf_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(*name, cf_opts)
        });
        let db =
            DB::open_cf_descriptors(&opts, dir, cfs).map_err(|source| StorageError::Rocks {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Store {
            db,
            path: dir.to_path_buf(),
            syncs: AtomicU64::new(0),
        })
    }

    /// Synced writes (fsyncs of the write-ahead log) this store made since it was opened.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// The directory this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or(StorageError::MissingColumnFamily(name))
    }

    fn rocks(&self, source: rocksdb::Error) -> StorageError {
        StorageError::Rocks {
            path: self.path.clone(),
            source,
        }
    }

    fn write_synced(&self, batch: WriteBatch) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(|e| self.rocks(e))?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes through the write-ahead log without waiting for the disk. The write reaches the
    /// operating system before this returns, so it survives the process being killed; it
    /// survives power loss once any later synced write returns (one log, written in order).
    fn write_unsynced(&self, batch: WriteBatch) -> Result<()> {
        self.db
            .write_opt(batch, &WriteOptions::default())
            .map_err(|e| self.rocks(e))
    }

    fn check_len(value: &[u8]) -> Result<()> {
        if value.len() > VALUE_BYTES_MAX {
            return Err(StorageError::TooLarge {
                len: value.len(),
                max: VALUE_BYTES_MAX,
            });
        }
        Ok(())
    }

    // ----- Raft log -------------------------------------------------------------------------

    /// Appends log entries and returns only once they are synced to disk.
    ///
    /// Entries must have strictly increasing indexes; the caller (Raft) guarantees it, and the
    /// store asserts it because a gap would silently corrupt the log.
    pub fn log_append(&self, entries: &[(u64, Vec<u8>)]) -> Result<()> {
        let cf = self.cf(CF_LOG)?;
        let mut batch = WriteBatch::default();
        let mut previous: Option<u64> = None;
        for (index, value) in entries {
            if let Some(p) = previous {
                assert!(*index == p + 1, "log append with a gap: {p} then {index}");
            }
            previous = Some(*index);
            Self::check_len(value)?;
            batch.put_cf(cf, index.to_be_bytes(), value);
        }
        self.write_synced(batch)
    }

    /// Entries with `start <= index < end`, at most `limit` of them, in index order.
    pub fn log_range(&self, start: u64, end: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let cf = self.cf(CF_LOG)?;
        let start_key = start.to_be_bytes();
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(cf, IteratorMode::From(&start_key, Direction::Forward))
        {
            let (key, value) = item.map_err(|e| self.rocks(e))?;
            let index = decode_index(&key)?;
            if index >= end || out.len() >= limit {
                break;
            }
            out.push((index, value.into_vec()));
        }
        Ok(out)
    }

    /// The entry with the highest index, if any.
    pub fn log_last(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let cf = self.cf(CF_LOG)?;
        match self.db.iterator_cf(cf, IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (key, value) = item.map_err(|e| self.rocks(e))?;
                Ok(Some((decode_index(&key)?, value.into_vec())))
            }
        }
    }

    /// Deletes every entry with `index >= from` (conflicting suffix), synced.
    pub fn log_truncate(&self, from: u64) -> Result<()> {
        let cf = self.cf(CF_LOG)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, from.to_be_bytes(), u64::MAX.to_be_bytes());
        // delete_range's end is exclusive; u64::MAX itself is never a real index.
        self.write_synced(batch)
    }

    /// Deletes every entry with `index <= upto` and records `purged` under `purged_key` in the
    /// `raft` family in the same synced batch, so the purge marker and the log agree after a crash.
    pub fn log_purge(&self, upto: u64, purged_key: &str, purged: &[u8]) -> Result<()> {
        let log = self.cf(CF_LOG)?;
        let raft = self.cf(CF_RAFT)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(raft, purged_key.as_bytes(), purged);
        batch.delete_range_cf(log, 0u64.to_be_bytes(), (upto + 1).to_be_bytes());
        self.write_synced(batch)
    }

    // ----- Raft metadata --------------------------------------------------------------------

    /// Reads a Raft metadata value (vote, committed, purged).
    pub fn raft_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.get(CF_RAFT, key.as_bytes())
    }

    /// Writes a Raft metadata value, synced.
    pub fn raft_put(&self, key: &str, value: &[u8]) -> Result<()> {
        Self::check_len(value)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_RAFT)?, key.as_bytes(), value);
        self.write_synced(batch)
    }

    /// Writes a Raft metadata value that may be lost with power (the committed index: losing
    /// it only means applying again from the log), durable with the next synced write.
    pub fn raft_put_unsynced(&self, key: &str, value: &[u8]) -> Result<()> {
        Self::check_len(value)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_RAFT)?, key.as_bytes(), value);
        self.write_unsynced(batch)
    }

    // ----- State machine --------------------------------------------------------------------

    /// Reads a state-machine metadata value (last applied, membership, snapshot).
    pub fn machine_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.get(CF_MACHINE, key.as_bytes())
    }

    /// Writes state-machine metadata alone, synced.
    pub fn machine_put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.state_commit(&[], &[(key, value)])
    }

    /// Applies state changes and machine metadata in one synced, atomic batch.
    pub fn state_commit(&self, changes: &[StateChange], machine: &[(&str, &[u8])]) -> Result<()> {
        let batch = self.state_batch(changes, machine)?;
        self.write_synced(batch)
    }

    /// Applies state changes and machine metadata (which must include the last-applied id) in
    /// one atomic batch, without an fsync of its own: the caller's log holds what produced it,
    /// durably, and re-applies it after a power loss. This is what keeps apply at no fsync per
    /// batch while the log pays one.
    pub fn state_apply(
        &self,
        changes: &[StateChange],
        machine: &[(&str, &[u8])],
        audit: &[AuditPut],
    ) -> Result<()> {
        let mut batch = self.state_batch(changes, machine)?;
        Self::audit_to(&mut batch, self.cf(CF_AUDIT)?, audit)?;
        self.write_unsynced(batch)
    }

    fn audit_to(
        batch: &mut WriteBatch,
        cf: &rocksdb::ColumnFamily,
        audit: &[AuditPut],
    ) -> Result<()> {
        for put in audit {
            match put {
                AuditPut::Leaf { index, leaf } => {
                    Self::check_len(leaf)?;
                    batch.put_cf(cf, audit_leaf_key(*index), leaf);
                }
                AuditPut::Node { level, index, hash } => {
                    batch.put_cf(cf, audit_node_key(*level, *index), hash);
                }
            }
        }
        Ok(())
    }

    fn state_batch(
        &self,
        changes: &[StateChange],
        machine: &[(&str, &[u8])],
    ) -> Result<WriteBatch> {
        let state = self.cf(CF_STATE)?;
        let meta = self.cf(CF_MACHINE)?;
        let mut batch = WriteBatch::default();
        for (key, value) in changes {
            match value {
                Some(v) => {
                    Self::check_len(v)?;
                    batch.put_cf(state, key, v);
                }
                None => batch.delete_cf(state, key),
            }
        }
        for (key, value) in machine {
            Self::check_len(value)?;
            batch.put_cf(meta, key.as_bytes(), value);
        }
        Ok(batch)
    }

    /// Every pair of the `state` family in key order.
    pub fn state_scan(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let cf = self.cf(CF_STATE)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (key, value) = item.map_err(|e| self.rocks(e))?;
            out.push((key.into_vec(), value.into_vec()));
        }
        Ok(out)
    }

    /// Replaces the whole `state` family with `pairs` and writes `machine` metadata, atomically
    /// and synced: installing a snapshot never leaves a half-old, half-new state behind.
    ///
    /// The audit records go too: the ones before the snapshot are not in it, so this node's
    /// stored records restart after it, from `audit_base` (opaque to this crate: what the
    /// tree looked like at the snapshot).
    pub fn state_replace(
        &self,
        pairs: &[(Vec<u8>, Vec<u8>)],
        machine: &[(&str, &[u8])],
        audit_base: &[u8],
        audit_puts: &[AuditPut],
    ) -> Result<()> {
        let state = self.cf(CF_STATE)?;
        let meta = self.cf(CF_MACHINE)?;
        let audit = self.cf(CF_AUDIT)?;
        let mut batch = WriteBatch::default();
        // Every audit key starts with a letter, so this range holds them all.
        batch.delete_range_cf(audit, [0u8].as_slice(), [0xffu8].as_slice());
        Self::check_len(audit_base)?;
        batch.put_cf(audit, AUDIT_BASE, audit_base);
        Self::audit_to(&mut batch, audit, audit_puts)?;
        // Delete key by key rather than by range: state keys are arbitrary bytes with no
        // natural upper bound for a range.
        for item in self.db.iterator_cf(state, IteratorMode::Start) {
            let (key, _) = item.map_err(|e| self.rocks(e))?;
            batch.delete_cf(state, key);
        }
        for (key, value) in pairs {
            Self::check_len(value)?;
            batch.put_cf(state, key, value);
        }
        for (key, value) in machine {
            Self::check_len(value)?;
            batch.put_cf(meta, key.as_bytes(), value);
        }
        self.write_synced(batch)
    }

    // ----- audit ----------------------------------------------------------------------------

    /// Stored audit records from index `from` on, in order: at most `limit` of them and, past
    /// the first, at most `bytes_max` bytes. Stops at the first missing index.
    pub fn audit_leaves(
        &self,
        from: u64,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut bytes = 0usize;
        for item in self.audit_leaf_entries(from)? {
            if out.len() >= limit {
                break;
            }
            let (index, value) = item?;
            let expected = from + out.len() as u64;
            if index != expected {
                break;
            }
            if !out.is_empty() && bytes + value.len() > bytes_max {
                break;
            }
            bytes += value.len();
            out.push((index, value.into_vec()));
        }
        Ok(out)
    }

    /// The stored audit records from index `from` on, in index order, up to the last one.
    fn audit_leaf_entries(
        &self,
        from: u64,
    ) -> Result<impl Iterator<Item = Result<(u64, Box<[u8]>)>> + '_> {
        let cf = self.cf(CF_AUDIT)?;
        let start = audit_leaf_key(from);
        let iter = self
            .db
            .iterator_cf(cf, IteratorMode::From(&start, Direction::Forward));
        Ok(iter.map_while(move |item| match item {
            Err(e) => Some(Err(self.rocks(e))),
            Ok((key, value)) => parse_index(&key, AUDIT_LEAF).map(|index| Ok((index, value))),
        }))
    }

    /// Stored audit record `index`, if stored: one point read.
    pub fn audit_leaf(&self, index: u64) -> Result<Option<Vec<u8>>> {
        self.get(CF_AUDIT, &audit_leaf_key(index))
    }

    /// Stored audit records with indexes in `[from, end)`, in order, gaps allowed (below the
    /// base, only the records of live registrations are kept): at most `limit` of them.
    pub fn audit_leaves_sparse(
        &self,
        from: u64,
        end: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.audit_leaf_entries(from)? {
            if out.len() >= limit {
                break;
            }
            let (index, value) = item?;
            if index >= end {
                break;
            }
            out.push((index, value.into_vec()));
        }
        Ok(out)
    }

    /// The index of the first stored audit record, if any.
    pub fn audit_first_index(&self) -> Result<Option<u64>> {
        let cf = self.cf(CF_AUDIT)?;
        let start = audit_leaf_key(0);
        let mut iter = self
            .db
            .iterator_cf(cf, IteratorMode::From(&start, Direction::Forward));
        match iter.next() {
            Some(item) => {
                let (key, _) = item.map_err(|e| self.rocks(e))?;
                Ok(parse_index(&key, AUDIT_LEAF))
            }
            None => Ok(None),
        }
    }

    /// The stored hash of the perfect audit subtree `(level, index)`, if stored.
    pub fn audit_node(&self, level: u8, index: u64) -> Result<Option<[u8; AUDIT_HASH_BYTES]>> {
        let cf = self.cf(CF_AUDIT)?;
        let Some(value) = self
            .db
            .get_cf(cf, audit_node_key(level, index))
            .map_err(|e| self.rocks(e))?
        else {
            return Ok(None);
        };
        let hash: [u8; AUDIT_HASH_BYTES] =
            value
                .as_slice()
                .try_into()
                .map_err(|_| StorageError::Corrupt {
                    what: "audit node",
                    detail: format!(
                        "level {level} index {index}: {} bytes, not {AUDIT_HASH_BYTES}",
                        value.len()
                    ),
                })?;
        Ok(Some(hash))
    }

    /// What the stored audit records continue from (see [`Store::state_replace`]); `None` on
    /// a node that has every record since the first.
    pub fn audit_base(&self) -> Result<Option<Vec<u8>>> {
        self.get(CF_AUDIT, AUDIT_BASE)
    }

    /// Forgets the stored audit records before `base` and every stored subtree hash that lies
    /// inside them, except the peaks of the tree of `base` records (its perfect subtrees, one
    /// per set bit): those, and `base_frontier` stored as the new base, are what proofs about
    /// any tree of at least `base` records need of the records before it. Apply only writes
    /// records at the head and subtrees that end after it, so it never touches what this
    /// deletes. `keep` (records and subtree hashes inside the pruned range that proofs of live
    /// registrations need) is written back in the same batch, after the deletes.
    pub fn audit_prune(&self, base: u64, base_frontier: &[u8], keep: &[AuditPut]) -> Result<()> {
        let cf = self.cf(CF_AUDIT)?;
        let mut batch = WriteBatch::default();
        Self::check_len(base_frontier)?;
        batch.put_cf(cf, AUDIT_BASE, base_frontier);
        batch.delete_range_cf(cf, audit_leaf_key(0), audit_leaf_key(base));
        for level in 0..64u8 {
            // Subtrees (level, i) with i < base >> level lie inside the first `base` records;
            // when bit `level` of base is set, the last of them is a peak and stays.
            let inside = base >> level;
            if inside == 0 {
                break;
            }
            let end = inside - (inside & 1);
            if end > 0 {
                batch.delete_range_cf(cf, audit_node_key(level, 0), audit_node_key(level, end));
            }
        }
        Self::audit_to(&mut batch, cf, keep)?;
        self.write_synced(batch)
    }

    /// Rewrites stored record `index` as given, bypassing the tree: exactly what someone
    /// holding the disk could do. For the tests and drills of `signpost audit verify`, which
    /// must catch it.
    pub fn audit_overwrite_leaf(&self, index: u64, leaf: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_AUDIT)?, audit_leaf_key(index), leaf);
        self.write_synced(batch)
    }

    fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let handle = self.cf(cf)?;
        let value = self.db.get_cf(handle, key).map_err(|e| self.rocks(e))?;
        if let Some(v) = &value {
            if v.len() > VALUE_BYTES_MAX {
                return Err(StorageError::Corrupt {
                    what: "value",
                    detail: format!("{} bytes exceeds the limit", v.len()),
                });
            }
        }
        Ok(value)
    }

    // ----- durable watermark ----------------------------------------------------------------

    fn watermark_path(&self) -> PathBuf {
        self.path.join(WATERMARK_FILE)
    }

    /// The committed index last recorded by [`Store::record_watermark`], if any.
    ///
    /// It lives in its own small file, outside RocksDB's write-ahead log, so damage to the WAL
    /// cannot take it down with the entries it vouches for.
    pub fn watermark(&self) -> Result<Option<u64>> {
        let path = self.watermark_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StorageError::Corrupt {
                    what: "durable watermark",
                    detail: format!("{}: {e}", path.display()),
                })
            }
        };
        parse_watermark(&text)
            .map(Some)
            .ok_or_else(|| StorageError::Corrupt {
                what: "durable watermark",
                detail: format!("{}: unreadable content {text:?}", path.display()),
            })
    }

    /// Records that every log entry up to `index` is committed and was synced here: written to
    /// a temporary file, synced, renamed over the old one and the directory synced, so a crash
    /// leaves either the old or the new value.
    pub fn record_watermark(&self, index: u64) -> Result<()> {
        use std::io::Write;
        let io = |e: std::io::Error| StorageError::Corrupt {
            what: "durable watermark",
            detail: format!("writing {}: {e}", self.watermark_path().display()),
        };
        let tmp = self.path.join(format!("{WATERMARK_FILE}.tmp"));
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(format!("{WATERMARK_MAGIC} {index}\n").as_bytes())
            .map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, self.watermark_path()).map_err(io)?;
        std::fs::File::open(&self.path)
            .and_then(|dir| dir.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

fn decode_index(key: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| StorageError::Corrupt {
        what: "log key",
        detail: format!("expected 8 bytes, found {}", key.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_survives_reopen_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.watermark().unwrap(), None, "a new store has none");
            store.record_watermark(41).unwrap();
            store.record_watermark(46).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.watermark().unwrap(), Some(46));
        std::fs::write(
            dir.path().join(WATERMARK_FILE),
            "signpost-committed-v1 4x6\n",
        )
        .unwrap();
        assert!(matches!(
            store.watermark(),
            Err(StorageError::Corrupt { .. })
        ));
    }

    fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
        range
            .map(|i| (i, format!("entry-{i}").into_bytes()))
            .collect()
    }

    #[test]
    fn log_survives_reopen_and_truncate_and_purge_are_durable() {
        let dir = tempfile::tempdir().unwrap();

        // Phase 1: append, read back, reopen: everything written is still there.
        {
            let store = Store::open(dir.path()).unwrap();
            store.log_append(&entries(1..=10)).unwrap();
            store.raft_put("vote", b"v1").unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.log_range(0, u64::MAX, 100).unwrap(), entries(1..=10));
        assert_eq!(store.raft_get("vote").unwrap().as_deref(), Some(&b"v1"[..]));
        assert_eq!(store.log_last().unwrap().map(|e| e.0), Some(10));

        // Phase 2: range bounds and limits are honoured.
        assert_eq!(store.log_range(3, 6, 100).unwrap(), entries(3..=5));
        assert_eq!(store.log_range(3, 100, 2).unwrap(), entries(3..=4));

        // Phase 3: truncate removes the suffix, purge the prefix with its marker.
        store.log_truncate(8).unwrap();
        store.log_purge(3, "purged", b"p3").unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.log_range(0, u64::MAX, 100).unwrap(), entries(4..=7));
        assert_eq!(
            store.raft_get("purged").unwrap().as_deref(),
            Some(&b"p3"[..])
        );
    }

    #[test]
    fn state_commit_and_replace_are_atomic_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            // Phase 1: a commit writes pairs and the applied marker together.
            store
                .state_commit(
                    &[
                        (b"a".to_vec(), Some(b"1".to_vec())),
                        (b"b".to_vec(), Some(b"2".to_vec())),
                    ],
                    &[("applied", b"5")],
                )
                .unwrap();
            store
                .state_commit(&[(b"a".to_vec(), None)], &[("applied", b"6")])
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.state_scan().unwrap(),
            vec![(b"b".to_vec(), b"2".to_vec())]
        );
        assert_eq!(
            store.machine_get("applied").unwrap().as_deref(),
            Some(&b"6"[..])
        );

        // Phase 2: replace drops every old pair.
        store
            .state_replace(
                &[(b"z".to_vec(), b"9".to_vec())],
                &[("applied", b"9")],
                b"",
                &[],
            )
            .unwrap();
        assert_eq!(
            store.state_scan().unwrap(),
            vec![(b"z".to_vec(), b"9".to_vec())]
        );
    }

    #[test]
    fn only_log_writes_pay_an_fsync_and_an_unsynced_apply_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            // Phase 1: applying state and saving the committed index cost no fsync.
            store
                .state_apply(
                    &[(b"k".to_vec(), Some(b"v".to_vec()))],
                    &[("applied", b"7")],
                    &[],
                )
                .unwrap();
            store.raft_put_unsynced("committed", b"c7").unwrap();
            assert_eq!(store.syncs(), 0, "apply and commit must not fsync");
            // Phase 2: a log append pays exactly one, which also covers what came before it.
            store.log_append(&entries(1..=3)).unwrap();
            assert_eq!(store.syncs(), 1);
            store.state_commit(&[], &[("snapshot", b"s")]).unwrap();
            assert_eq!(store.syncs(), 2, "snapshots and other metadata stay synced");
        }
        // Phase 3: a reopen (as after kill -9) sees the unsynced writes.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.state_scan().unwrap(),
            vec![(b"k".to_vec(), b"v".to_vec())]
        );
        assert_eq!(
            store.machine_get("applied").unwrap().as_deref(),
            Some(&b"7"[..])
        );
        assert_eq!(
            store.raft_get("committed").unwrap().as_deref(),
            Some(&b"c7"[..])
        );
    }

    #[test]
    fn audit_records_and_hashes_are_written_with_the_apply_and_cleared_by_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();

        eprintln!("phase 1: records 0..5 and their hashes go in with the state they came from");
        let puts: Vec<AuditPut> = (0..5u64)
            .flat_map(|i| {
                [
                    AuditPut::Leaf {
                        index: i,
                        leaf: vec![i as u8; 3],
                    },
                    AuditPut::Node {
                        level: 0,
                        index: i,
                        hash: [i as u8; AUDIT_HASH_BYTES],
                    },
                ]
            })
            .collect();
        store.state_apply(&[], &[("applied", b"5")], &puts).unwrap();
        assert_eq!(store.audit_first_index().unwrap(), Some(0));
        assert_eq!(store.audit_base().unwrap(), None);
        assert_eq!(store.audit_node(0, 3).unwrap(), Some([3; AUDIT_HASH_BYTES]));
        assert_eq!(store.audit_node(1, 0).unwrap(), None);

        eprintln!("phase 2: reads are bounded by count and bytes, and stop at a gap");
        let all = store.audit_leaves(0, 100, usize::MAX).unwrap();
        assert_eq!(
            all.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        assert_eq!(store.audit_leaves(1, 2, usize::MAX).unwrap().len(), 2);
        assert_eq!(
            store.audit_leaves(0, 100, 7).unwrap().len(),
            2,
            "3 + 3 bytes, not 9"
        );
        assert_eq!(
            store.audit_leaves(0, 100, 0).unwrap().len(),
            1,
            "at least one"
        );
        assert!(store.audit_leaves(5, 100, usize::MAX).unwrap().is_empty());

        eprintln!("phase 3: a snapshot install clears them and leaves its base");
        let peak = AuditPut::Node {
            level: 3,
            index: 0,
            hash: [8; AUDIT_HASH_BYTES],
        };
        store
            .state_replace(&[], &[("applied", b"9")], b"base", &[peak])
            .unwrap();
        assert_eq!(store.audit_first_index().unwrap(), None);
        assert_eq!(store.audit_node(0, 3).unwrap(), None);
        assert_eq!(store.audit_node(3, 0).unwrap(), Some([8; AUDIT_HASH_BYTES]));
        assert_eq!(store.audit_base().unwrap().as_deref(), Some(&b"base"[..]));
    }

    #[test]
    fn pruning_forgets_the_records_before_the_base_and_keeps_only_its_peaks_among_their_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();

        eprintln!("phase 1: 13 records and every perfect subtree over them");
        let mut puts: Vec<AuditPut> = (0..13u64)
            .map(|i| AuditPut::Leaf {
                index: i,
                leaf: vec![i as u8; 4],
            })
            .collect();
        for level in 0..4u8 {
            for index in 0..(13u64 >> level) {
                puts.push(AuditPut::Node {
                    level,
                    index,
                    hash: [level * 16 + index as u8; AUDIT_HASH_BYTES],
                });
            }
        }
        store
            .state_apply(&[], &[("applied", b"13")], &puts)
            .unwrap();
        let stored = |store: &Store| -> Vec<(u8, u64)> {
            let mut out = Vec::new();
            for level in 0..4u8 {
                for index in 0..16u64 {
                    if store.audit_node(level, index).unwrap().is_some() {
                        out.push((level, index));
                    }
                }
            }
            out
        };

        eprintln!("phase 2: pruned to 6 = 4 + 2 records");
        store.audit_prune(6, b"frontier of 6", &[]).unwrap();
        assert_eq!(store.audit_first_index().unwrap(), Some(6));
        assert_eq!(
            store.audit_base().unwrap().as_deref(),
            Some(&b"frontier of 6"[..])
        );
        assert_eq!(store.audit_leaves(0, 100, usize::MAX).unwrap(), vec![]);
        assert_eq!(store.audit_leaves(6, 100, usize::MAX).unwrap().len(), 7);
        let mut expected = vec![(0, 6), (0, 7), (0, 8), (0, 9), (0, 10), (0, 11), (0, 12)];
        // The peaks of 6: records 0..4 (level 2, index 0) and 4..6 (level 1, index 2).
        expected.extend([
            (1, 2),
            (1, 3),
            (1, 4),
            (1, 5),
            (2, 0),
            (2, 1),
            (2, 2),
            (3, 0),
        ]);
        expected.sort();
        assert_eq!(stored(&store), expected);

        eprintln!("phase 3: pruning again to 8 keeps the one peak of 8 and nothing inside it");
        store.audit_prune(8, b"frontier of 8", &[]).unwrap();
        assert_eq!(store.audit_first_index().unwrap(), Some(8));
        let mut expected = vec![(0, 8), (0, 9), (0, 10), (0, 11), (0, 12)];
        expected.extend([(1, 4), (1, 5), (2, 2), (3, 0)]);
        expected.sort();
        assert_eq!(stored(&store), expected);
        assert_eq!(store.audit_leaves_sparse(0, 8, 100).unwrap(), vec![]);

        eprintln!("phase 4: pruning to 12 writes back what it is told to keep, after the deletes");
        let keep = [
            AuditPut::Leaf {
                index: 9,
                leaf: vec![9; 4],
            },
            AuditPut::Node {
                level: 0,
                index: 8,
                hash: [8; AUDIT_HASH_BYTES],
            },
            AuditPut::Node {
                level: 1,
                index: 5,
                hash: [21; AUDIT_HASH_BYTES],
            },
        ];
        store.audit_prune(12, b"frontier of 12", &keep).unwrap();
        assert_eq!(store.audit_first_index().unwrap(), Some(9));
        assert_eq!(
            store.audit_leaves_sparse(0, 12, 100).unwrap(),
            vec![(9, vec![9; 4])]
        );
        assert_eq!(
            store.audit_leaves_sparse(0, 13, 100).unwrap(),
            vec![(9, vec![9; 4]), (12, vec![12; 4])]
        );
        assert_eq!(
            store.audit_leaves_sparse(10, 13, 1).unwrap(),
            vec![(12, vec![12; 4])]
        );
        let expected = vec![(0, 8), (0, 12), (1, 5), (2, 2), (3, 0)];
        assert_eq!(stored(&store), expected);
    }

    #[test]
    #[should_panic(expected = "log append with a gap")]
    fn appending_entries_with_a_gap_is_a_broken_invariant() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let _ = store.log_append(&[(1, vec![]), (3, vec![])]);
    }
}
