//! Keeps the audit records this node stores within a byte budget.
//!
//! The tree itself is never cut: its frontier is replicated state. What goes are this node's
//! oldest stored records and the subtree hashes inside them, in chunks of about an eighth of
//! the budget, down to three quarters of it, through [`AuditLog::prune_to`], which keeps what
//! proofs about any later tree need (the frontier at the new base). The new base never passes
//! the latest quorum-signed checkpoint this node holds, so a proof from that checkpoint to the
//! head can always be made here; while checkpoints stall, the stored records may pass the
//! budget by what was applied since the last one.
//!
//! Bytes are counted as the records' own bytes plus [`RECORD_OVERHEAD_BYTES`] each (their
//! keys and the subtree hashes stored beside them), tallied by reading each record once: the
//! whole stored log at start (bounded by the budget), then what each round added.

use std::collections::VecDeque;
use std::time::Duration;

use crate::audit_log::AuditLog;
use crate::checkpoints::Checkpoints;
use crate::error::ConsensusError;

/// How often the stored bytes are checked.
pub const RETENTION_EVERY: Duration = Duration::from_secs(5);
/// Stored bytes counted per record beyond its own: a 9-byte key, and on average two subtree
/// hashes (its own leaf hash and one interior node) of 32 bytes under 10-byte keys.
pub const RECORD_OVERHEAD_BYTES: u64 = 9 + 2 * (10 + 32);
/// Smallest budget accepted.
pub const RETAIN_BYTES_MIN: u64 = 64 * 1024;
/// Records read per page while tallying.
const TALLY_PAGE: usize = 4096;

/// Chunks of consecutive stored records with their byte counts.
#[derive(Debug, Default)]
struct Tally {
    /// The first stored record the chunks start at.
    first: u64,
    /// One past the last record counted.
    end: u64,
    /// `(end, bytes)` of each closed chunk, oldest first; chunk k runs from the previous end.
    closed: VecDeque<(u64, u64)>,
    /// Bytes of the records after the last closed chunk.
    open_bytes: u64,
    total: u64,
}

impl Tally {
    fn starting_at(first: u64) -> Tally {
        Tally {
            first,
            end: first,
            ..Tally::default()
        }
    }

    fn count(&mut self, bytes: u64, chunk_bytes: u64) {
        let bytes = bytes + RECORD_OVERHEAD_BYTES;
        self.end += 1;
        self.open_bytes += bytes;
        self.total += bytes;
        if self.open_bytes >= chunk_bytes {
            self.closed.push_back((self.end, self.open_bytes));
            self.open_bytes = 0;
        }
    }

    /// The base that brings the total to `target` or below by dropping whole chunks, never
    /// past `limit`; with the bytes it drops.
    fn cut(&self, target: u64, limit: u64) -> Option<(u64, u64)> {
        let mut total = self.total;
        let mut cut = None;
        for (end, bytes) in &self.closed {
            if total <= target || *end > limit {
                break;
            }
            total -= bytes;
            cut = Some((*end, self.total - total));
        }
        cut
    }

    fn drop_to(&mut self, base: u64) {
        while let Some((end, bytes)) = self.closed.front().copied() {
            if end > base {
                break;
            }
            self.closed.pop_front();
            self.total -= bytes;
        }
        self.first = base;
    }
}

/// The retention task of one node.
pub(crate) struct Retention {
    pub(crate) log: AuditLog,
    pub(crate) checkpoints: Checkpoints,
    pub(crate) retain_bytes: u64,
}

impl Retention {
    /// Runs until the runtime stops.
    pub(crate) fn spawn(self) {
        tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut tick = tokio::time::interval(RETENTION_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut warned = false;
            loop {
                tick.tick().await;
                match self.round(&mut tally).await {
                    Ok(()) => warned = false,
                    Err(e) if !warned => {
                        tracing::warn!(error = %e, "audit retention round failed");
                        warned = true;
                    }
                    Err(_) => {}
                }
            }
        });
    }

    async fn round(&self, tally: &mut Tally) -> Result<(), ConsensusError> {
        let chunk_bytes = (self.retain_bytes / 8).max(1);
        let log = self.log.clone();
        let head = tokio::task::spawn_blocking(move || log.head())
            .await
            .map_err(|e| ConsensusError::Unavailable(e.to_string()))??;
        if tally.first != head.first_index || tally.end < tally.first || tally.end > head.size {
            *tally = Tally::starting_at(head.first_index);
        }
        while tally.end < head.size {
            let (log, from) = (self.log.clone(), tally.end);
            let page =
                tokio::task::spawn_blocking(move || log.records(from, TALLY_PAGE, usize::MAX))
                    .await
                    .map_err(|e| ConsensusError::Unavailable(e.to_string()))??;
            if page.leaves.is_empty() {
                break;
            }
            for (_, leaf) in &page.leaves {
                tally.count(leaf.len() as u64, chunk_bytes);
            }
        }
        if tally.total <= self.retain_bytes {
            return Ok(());
        }
        let limit = match self.checkpoints.latest() {
            Some(latest) => latest.checkpoint.size.min(head.size),
            None => head.size,
        };
        let Some((base, bytes)) = tally.cut(self.retain_bytes / 4 * 3, limit) else {
            tracing::debug!(
                stored_bytes = tally.total,
                limit,
                "audit records over budget, but none can go before the latest checkpoint"
            );
            return Ok(());
        };
        if self.log.prune_to(base).await? {
            tracing::info!(
                from = tally.first,
                to = base,
                bytes,
                "pruned audit records beyond the retention budget"
            );
            metrics::counter!(crate::AUDIT_PRUNED_RECORDS_TOTAL).increment(base - tally.first);
            tally.drop_to(base);
        } else {
            *tally = Tally::default();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_cuts_whole_chunks_down_to_the_target_and_never_past_the_limit() {
        let mut tally = Tally::starting_at(100);
        // 40 records of 6 bytes of their own: each counts 6 + the overhead.
        let each = 6 + RECORD_OVERHEAD_BYTES;
        for _ in 0..40 {
            tally.count(6, each * 10);
        }
        assert_eq!(tally.total, 40 * each);
        assert_eq!(
            tally.closed.iter().map(|c| c.0).collect::<Vec<_>>(),
            [110, 120, 130, 140]
        );

        // Down to 25 records' worth: two chunks go.
        assert_eq!(tally.cut(25 * each, 140), Some((120, 20 * each)));
        // Already under the target: nothing.
        assert_eq!(tally.cut(40 * each, 140), None);
        // The limit stops the cut at the chunk that ends at or before it.
        assert_eq!(tally.cut(0, 125), Some((120, 20 * each)));
        assert_eq!(tally.cut(0, 109), None);

        tally.drop_to(120);
        assert_eq!((tally.first, tally.total), (120, 20 * each));
        assert_eq!(tally.closed.len(), 2);
    }
}
