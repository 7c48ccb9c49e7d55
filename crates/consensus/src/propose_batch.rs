//! Group commit for proposals: requests that arrive while earlier ones are being written go
//! into one log entry together.
//!
//! openraft 0.9 appends each `client_write` as its own log write, and the leader waits for that
//! write's fsync before it handles the next message, so one entry per request meant one leader
//! fsync per request, in series: the ceiling on write throughput, with the disk mostly idle.
//! Here at most [`IN_FLIGHT_BATCHES`] entries are in flight; everything that arrives meanwhile
//! waits and leaves as one [`Command::Batch`] entry (bounded in requests and bytes), so under
//! load one fsync per node carries many registrations, and a lone request still goes at once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use openraft::Raft;
use signpost_state::{Command, Outcome, Request};
use tokio::sync::{oneshot, Notify, Semaphore};

use crate::error::ConsensusError;
use crate::type_config::TypeConfig;

/// Entries proposed and not yet applied, at most: one being written while the next fills.
pub(crate) const IN_FLIGHT_BATCHES: usize = 4;
/// Requests in one entry, at most.
pub(crate) const BATCH_REQUESTS_MAX: usize = 512;
/// Bytes of requests in one entry, at most (far below the Raft message limit).
pub(crate) const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Requests waiting for an entry, at most. Admission bounds proposals in flight far lower; this
/// bound keeps the queue finite whatever calls it.
const QUEUE_MAX: usize = 65_536;

type Answer = Result<(u64, Outcome), ConsensusError>;

struct Pending {
    request: Request,
    bytes: usize,
    tx: oneshot::Sender<Answer>,
}

/// The proposal batcher of one node. Cloning is cheap; clones share the queue.
#[derive(Clone)]
pub(crate) struct ProposalBatcher {
    queue: Arc<Mutex<VecDeque<Pending>>>,
    wake: Arc<Notify>,
}

/// How many requests one entry may carry: [`BATCH_REQUESTS_MAX`], or 1 while batching is off.
type BatchLimit = usize;

/// What a request weighs in an entry: its signed bytes and names, plus a fixed overhead.
fn weight(request: &Request) -> usize {
    let body = match &request.command {
        Command::Register { envelope }
        | Command::Deregister { envelope }
        | Command::Bind { envelope } => envelope.len(),
        Command::RotateAdmins { envelope, rebinds } => {
            envelope.len() + rebinds.iter().map(Vec::len).sum::<usize>()
        }
        Command::Expire {
            service, instance, ..
        } => service.len() + instance.len(),
        Command::Genesis { admin_keys, .. } => admin_keys.len() * 32,
        Command::Noop => 0,
        Command::Batch { requests } => requests.iter().map(weight).sum(),
    };
    body + request.caller.len() + 64
}

impl ProposalBatcher {
    /// Starts the batching task over `raft`; it parks while nothing waits.
    pub(crate) fn spawn(raft: Raft<TypeConfig>, per_entry: BatchLimit) -> ProposalBatcher {
        let per_entry = per_entry.clamp(1, BATCH_REQUESTS_MAX);
        let batcher = ProposalBatcher {
            queue: Arc::new(Mutex::new(VecDeque::new())),
            wake: Arc::new(Notify::new()),
        };
        let queue = Arc::downgrade(&batcher.queue);
        let wake = Arc::clone(&batcher.wake);
        let slots = Arc::new(Semaphore::new(IN_FLIGHT_BATCHES));
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                loop {
                    let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                        return;
                    };
                    let Some(queue) = queue.upgrade() else {
                        return;
                    };
                    let batch = take_batch(&queue, per_entry);
                    if batch.is_empty() {
                        break;
                    }
                    let raft = raft.clone();
                    tokio::spawn(async move {
                        propose_batch(&raft, batch).await;
                        drop(slot);
                    });
                }
            }
        });
        batcher
    }

    /// Proposes `request` in the next entry and waits for its outcome.
    pub(crate) async fn propose(&self, request: Request) -> Answer {
        let (tx, rx) = oneshot::channel();
        {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.len() >= QUEUE_MAX {
                return Err(ConsensusError::Unavailable(
                    "too many proposals waiting".into(),
                ));
            }
            queue.push_back(Pending {
                bytes: weight(&request),
                request,
                tx,
            });
        }
        self.wake.notify_one();
        rx.await
            .unwrap_or_else(|_| Err(ConsensusError::Unavailable("raft stopped".into())))
    }
}

/// The longest prefix of the queue that fits one entry (always at least one request). A
/// genesis travels alone: it may not be part of a batch.
fn take_batch(queue: &Mutex<VecDeque<Pending>>, per_entry: BatchLimit) -> Vec<Pending> {
    let mut queue = queue.lock().unwrap_or_else(|p| p.into_inner());
    let mut batch: Vec<Pending> = Vec::new();
    let mut bytes = 0;
    while let Some(next) = queue.front() {
        let alone = matches!(
            next.request.command,
            Command::Genesis { .. } | Command::Batch { .. }
        );
        let full = batch.len() >= per_entry || bytes + next.bytes > BATCH_BYTES_MAX;
        if !batch.is_empty() && (alone || full) {
            break;
        }
        bytes += next.bytes;
        let Some(next) = queue.pop_front() else { break };
        batch.push(next);
        if alone {
            break;
        }
    }
    batch
}

async fn propose_batch(raft: &Raft<TypeConfig>, mut batch: Vec<Pending>) {
    // The leader's clock, read once per entry: the only notion of "now" apply has.
    let time_ms = crate::wall_clock_ms();
    let started = std::time::Instant::now();
    metrics::histogram!(crate::PROPOSAL_BATCH_SIZE).record(batch.len() as f64);
    let entry = if batch.len() == 1 {
        let mut request = batch[0].request.clone();
        request.time_ms = time_ms;
        request
    } else {
        Request {
            time_ms,
            caller: String::new(),
            command: Command::Batch {
                requests: batch
                    .iter_mut()
                    .map(|p| {
                        let mut request = std::mem::replace(
                            &mut p.request,
                            Request {
                                time_ms: 0,
                                caller: String::new(),
                                command: Command::Noop,
                            },
                        );
                        request.time_ms = time_ms;
                        request
                    })
                    .collect(),
            },
        }
    };
    match raft.client_write(entry).await {
        Ok(response) => {
            metrics::histogram!(crate::PROPOSAL_DURATION).record(started.elapsed().as_secs_f64());
            let index = response.log_id.index;
            let mut outcomes = response.data.into_iter();
            for pending in batch {
                let answer = match outcomes.next() {
                    Some(outcome) => Ok((index, outcome)),
                    // Apply gives one outcome per request; fewer is a broken invariant, but a
                    // caller must still get an answer.
                    None => Err(ConsensusError::Unavailable(format!(
                        "entry {index} was applied without an outcome for every request"
                    ))),
                };
                let _ = pending.tx.send(answer);
            }
        }
        Err(e) => {
            let error = crate::consensus::map_write_error(e);
            for pending in batch {
                // A caller that gave up (its request timed out) is not an error.
                let _ = pending.tx.send(Err(error.duplicate()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(command: Command) -> (Pending, oneshot::Receiver<Answer>) {
        let (tx, rx) = oneshot::channel();
        let request = Request {
            time_ms: 0,
            caller: "spiffe://t/service/s".into(),
            command,
        };
        (
            Pending {
                bytes: weight(&request),
                request,
                tx,
            },
            rx,
        )
    }

    fn queue(commands: Vec<Command>) -> Mutex<VecDeque<Pending>> {
        Mutex::new(commands.into_iter().map(|c| pending(c).0).collect())
    }

    fn register(bytes: usize) -> Command {
        Command::Register {
            envelope: vec![0; bytes],
        }
    }

    #[test]
    fn an_entry_takes_what_waits_up_to_its_request_and_byte_limits() {
        // Phase 1: everything waiting fits one entry.
        let q = queue((0..5).map(|_| register(100)).collect());
        assert_eq!(take_batch(&q, BATCH_REQUESTS_MAX).len(), 5);
        assert!(take_batch(&q, BATCH_REQUESTS_MAX).is_empty());

        // Phase 2: the request limit (1 while batching is off, for rolling upgrades).
        let q = queue((0..5).map(|_| register(100)).collect());
        assert_eq!(take_batch(&q, 1).len(), 1);
        assert_eq!(take_batch(&q, 3).len(), 3);
        assert_eq!(take_batch(&q, 3).len(), 1);

        // Phase 3: the byte limit, yet a single oversized request still leaves alone.
        let big = BATCH_BYTES_MAX / 2;
        let q = queue(vec![
            register(big),
            register(big),
            register(BATCH_BYTES_MAX),
        ]);
        assert_eq!(
            take_batch(&q, BATCH_REQUESTS_MAX).len(),
            1,
            "two halves plus overhead do not fit"
        );
        assert_eq!(take_batch(&q, BATCH_REQUESTS_MAX).len(), 1);
        assert_eq!(take_batch(&q, BATCH_REQUESTS_MAX).len(), 1);
    }

    #[test]
    fn a_genesis_travels_alone() {
        let genesis = || Command::Genesis {
            admin_keys: vec![[1; 32]],
            admin_threshold: 1,
            quotas: Default::default(),
        };
        let q = queue(vec![register(10), genesis(), register(10), register(10)]);
        assert_eq!(
            take_batch(&q, BATCH_REQUESTS_MAX).len(),
            1,
            "stops before the genesis"
        );
        let alone = take_batch(&q, BATCH_REQUESTS_MAX);
        assert_eq!(alone.len(), 1);
        assert!(matches!(alone[0].request.command, Command::Genesis { .. }));
        assert_eq!(take_batch(&q, BATCH_REQUESTS_MAX).len(), 2);
    }
}
