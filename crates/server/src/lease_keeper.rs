//! Leases: instances stay registered while they renew, without a Raft write per renewal.
//!
//! Model (as etcd's leases): only the leader tracks deadlines, in memory, on its monotonic
//! clock. `KeepAlive` renewals reach the leader and push a deadline forward. When a deadline
//! passes, the leader proposes `Command::Expire { service, instance, sequence }`; apply removes
//! the instance on every node only if its sequence is unchanged, so an expiry racing with a
//! re-registration removes nothing.
//!
//! A new leader knows no renewal times, so it grants every instance a full TTL from the moment
//! it became leader: a leader change never expires a live instance early.
//!
//! Expiry happens within TTL + [`TICK`] + one commit round of the last renewal.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use signpost_consensus::{Applied, Consensus};
use signpost_state::{Command, EventKind, Outcome, Request};
use tokio::sync::broadcast;

/// How often the leader looks for expired leases.
pub const TICK: Duration = Duration::from_millis(250);
/// Expiries proposed per tick; the rest wait for the next tick.
const EXPIRIES_PER_TICK_MAX: usize = 256;

type Key = (String, String);

#[derive(Debug, Default)]
struct Table {
    /// Term in which this table was built; None when this node is not the leader.
    term: Option<u64>,
    deadlines: HashMap<Key, (u64, Instant)>,
}

/// The leader's lease table.
#[derive(Debug, Clone)]
pub struct LeaseKeeper {
    consensus: Consensus,
    table: Arc<Mutex<Table>>,
    caller: String,
}

/// Outcome of a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed for this many seconds.
    Renewed(u32),
    /// The instance is not registered (expired or never was).
    Unknown,
    /// This node is not the leader.
    NotLeader,
}

impl LeaseKeeper {
    /// Starts the keeper's background task.
    pub fn start(consensus: Consensus, trust_domain: &str) -> LeaseKeeper {
        let keeper = LeaseKeeper {
            caller: format!("spiffe://{trust_domain}/node/{}", consensus.node_id()),
            consensus,
            table: Arc::new(Mutex::new(Table::default())),
        };
        let runner = keeper.clone();
        tokio::spawn(async move { runner.run().await });
        keeper
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Leases this node tracks (0 unless it leads).
    pub fn leases(&self) -> usize {
        self.table().deadlines.len()
    }

    /// Renews `service/instance` on the leader.
    pub fn renew(&self, service: &str, instance: &str) -> Renewal {
        let Some(info) = self.consensus.state().registry.instance(service, instance) else {
            return Renewal::Unknown;
        };
        let mut table = self.table();
        // A renewal is a promise that the instance stays registered for a TTL; only a leader
        // that a quorum acknowledged within its lease can keep it. A leader cut off from its
        // quorum refuses, so the client renews through the majority's new leader instead.
        if table.term.is_none() || !self.consensus.has_quorum_lease() {
            return Renewal::NotLeader;
        }
        let deadline = Instant::now() + Duration::from_secs(u64::from(info.ttl_secs));
        table.deadlines.insert(
            (service.to_string(), instance.to_string()),
            (info.sequence, deadline),
        );
        Renewal::Renewed(info.ttl_secs)
    }

    /// Rebuilds the table when this node becomes leader: every instance gets a full TTL.
    fn sync_leadership(&self) {
        let status = self.consensus.status();
        let leading = status.leader_id == Some(status.node_id) && status.role == "leader";
        let mut table = self.table();
        match (leading, table.term) {
            (true, Some(term)) if term == status.term => {}
            (true, _) => {
                let now = Instant::now();
                let state = self.consensus.state();
                table.deadlines = state
                    .registry
                    .instances()
                    .map(|(service, instance, sequence, ttl)| {
                        (
                            (service.to_string(), instance.to_string()),
                            (sequence, now + Duration::from_secs(u64::from(ttl))),
                        )
                    })
                    .collect();
                table.term = Some(status.term);
                tracing::info!(
                    term = status.term,
                    leases = table.deadlines.len(),
                    "leading: every lease granted a full TTL"
                );
            }
            (false, Some(_)) => {
                table.term = None;
                table.deadlines.clear();
            }
            (false, None) => {}
        }
    }

    /// Keeps deadlines in step with registrations and removals.
    fn observe(&self, batch: &Applied) {
        let mut table = self.table();
        if table.term.is_none() {
            return;
        }
        match batch {
            Applied::Events { events, .. } => {
                let state = self.consensus.state();
                for event in events {
                    let key = (event.service.clone(), event.instance.clone());
                    match event.kind {
                        EventKind::Put => {
                            if let Some(info) =
                                state.registry.instance(&event.service, &event.instance)
                            {
                                let deadline =
                                    Instant::now() + Duration::from_secs(u64::from(info.ttl_secs));
                                table.deadlines.insert(key, (info.sequence, deadline));
                            }
                        }
                        EventKind::Delete => {
                            table.deadlines.remove(&key);
                        }
                    }
                }
            }
            // A leader never installs a snapshot; rebuild on the next leadership check.
            Applied::Reset { .. } => table.term = None,
        }
    }

    fn due(&self) -> Vec<(Key, u64)> {
        let table = self.table();
        if table.term.is_none() {
            return Vec::new();
        }
        let now = Instant::now();
        // Oldest deadlines first, so a backlog drains fairly.
        let mut due: BTreeMap<Instant, Vec<(Key, u64)>> = BTreeMap::new();
        for (key, (sequence, deadline)) in &table.deadlines {
            if *deadline <= now {
                due.entry(*deadline)
                    .or_default()
                    .push((key.clone(), *sequence));
            }
        }
        due.into_values()
            .flatten()
            .take(EXPIRIES_PER_TICK_MAX)
            .collect()
    }

    async fn run(self) {
        let mut applied = self.consensus.subscribe();
        let mut status = self.consensus.watch_status();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = status.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.sync_leadership();
                }
                batch = applied.recv() => match batch {
                    Ok(batch) => self.observe(&batch),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Missed registrations: rebuild from state (full TTLs, never early).
                        self.table().term = None;
                        self.sync_leadership();
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    self.sync_leadership();
                    self.expire_due().await;
                }
            }
        }
    }

    async fn expire_due(&self) {
        for ((service, instance), sequence) in self.due() {
            let request = Request {
                time_ms: 0, // stamped by Consensus::propose
                caller: self.caller.clone(),
                command: Command::Expire {
                    service: service.clone(),
                    instance: instance.clone(),
                    sequence,
                },
            };
            match self.consensus.propose(request).await {
                Ok((_, Outcome::Applied { revision })) => {
                    tracing::info!(%service, %instance, revision, "lease expired");
                    metrics::counter!(crate::observe::LEASE_EXPIRIES_TOTAL).increment(1);
                    self.table().deadlines.remove(&(service, instance));
                }
                Ok((_, Outcome::Rejected { reason, .. })) => {
                    // Re-registered or already gone: the Put/Delete event updates the table;
                    // drop a stale entry so it is not proposed again.
                    let mut table = self.table();
                    if table
                        .deadlines
                        .get(&(service.clone(), instance.clone()))
                        .map(|d| d.0)
                        == Some(sequence)
                    {
                        table.deadlines.remove(&(service, instance));
                    }
                    tracing::debug!(?reason, "expiry not applied");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "expiry proposal failed; will retry");
                    return;
                }
            }
        }
    }
}
