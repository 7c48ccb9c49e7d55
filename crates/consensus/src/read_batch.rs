//! Read index in batches: one leadership confirmation serves every linearizable read that was
//! waiting when it started.
//!
//! openraft's `ensure_linearizable` confirms leadership with a round of heartbeats to every
//! follower per call, so each linearizable read cost two Raft RPCs on a three-node cluster. As
//! etcd's read loop does, reads that arrive while a confirmation is in flight wait for the next
//! one, which starts after they arrived, so each read still sees every write acknowledged
//! before it began; a burst of reads costs one round of heartbeats instead of one per read.

use std::sync::{Arc, Mutex};

use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::Raft;
use tokio::sync::{oneshot, Notify};

use crate::error::ConsensusError;
use crate::type_config::TypeConfig;

/// Reads waiting for one confirmation, at most. Admission bounds concurrent reads far lower;
/// this bound keeps the queue finite whatever calls it.
const WAITING_MAX: usize = 65_536;

/// What one confirmation gives every read of its batch: the index applied before the reads
/// may run (at least), or why they may not.
type Confirmed = Result<u64, ConsensusError>;

type Waiter = oneshot::Sender<Confirmed>;

/// The read-index batcher of one node. Cloning is cheap; clones share the queue.
#[derive(Clone)]
pub(crate) struct ReadBatcher {
    waiting: Arc<Mutex<Vec<Waiter>>>,
    wake: Arc<Notify>,
}

impl ReadBatcher {
    /// Starts the confirmation task over `raft`; `applied` reads the local applied index. The
    /// task ends when Raft shuts down.
    pub(crate) fn spawn(
        raft: Raft<TypeConfig>,
        applied: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> ReadBatcher {
        let batcher = ReadBatcher {
            waiting: Arc::new(Mutex::new(Vec::new())),
            wake: Arc::new(Notify::new()),
        };
        let this = batcher.clone();
        tokio::spawn(async move {
            loop {
                this.wake.notified().await;
                loop {
                    let batch = std::mem::take(&mut *this.lock());
                    if batch.is_empty() {
                        break;
                    }
                    let confirmed = confirm(&raft, &applied).await;
                    metrics::histogram!(crate::READ_BATCH_SIZE).record(batch.len() as f64);
                    let stopped = matches!(&confirmed, Err(ConsensusError::Unavailable(_)))
                        && raft.metrics().borrow().running_state.is_err();
                    for waiter in batch {
                        // A reader that gave up (its request timed out) is not an error.
                        let _ = waiter.send(match &confirmed {
                            Ok(index) => Ok(*index),
                            Err(e) => Err(e.duplicate()),
                        });
                    }
                    if stopped {
                        return;
                    }
                }
            }
        });
        batcher
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiter>> {
        // Pushing and taking cannot panic half-way; a poisoned queue is still a valid queue.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a leadership confirmation that started after this call, and for this node to
    /// apply everything committed before it. Returns the revision reads will reflect (at least).
    pub(crate) async fn barrier(&self) -> Result<u64, ConsensusError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.lock();
            if waiting.len() >= WAITING_MAX {
                return Err(ConsensusError::Unavailable(
                    "too many linearizable reads waiting".into(),
                ));
            }
            waiting.push(tx);
        }
        self.wake.notify_one();
        match rx.await {
            Ok(confirmed) => confirmed,
            Err(_) => Err(ConsensusError::Unavailable("raft stopped".into())),
        }
    }
}

async fn confirm(raft: &Raft<TypeConfig>, applied: &impl Fn() -> u64) -> Confirmed {
    match raft.ensure_linearizable().await {
        Ok(log_id) => Ok(log_id.map(|l| l.index).unwrap_or(0).max(applied())),
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
            Err(ConsensusError::NotLeader {
                leader: f.leader_id.zip(f.leader_node),
            })
        }
        Err(RaftError::APIError(e)) => Err(ConsensusError::Unavailable(e.to_string())),
        Err(RaftError::Fatal(e)) => Err(ConsensusError::Unavailable(e.to_string())),
    }
}
