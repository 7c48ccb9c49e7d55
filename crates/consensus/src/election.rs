//! Elections decided by this crate, not by openraft's timer: pre-vote and the leader's quorum
//! lease.
//!
//! openraft 0.9 starts an election whenever a follower's timer runs out, raising its term even
//! when it cannot win. An isolated follower therefore keeps raising its term, and when the
//! partition heals its higher term deposes a healthy leader. openraft also keeps a leader that
//! lost its quorum in the leader role for as long as it is cut off.
//!
//! Signpost turns openraft's own election timer off (`Config::enable_elect = false`) and runs
//! [`ElectionDriver`] instead:
//!
//! - **Pre-vote** (Raft thesis §9.6): a follower that has not heard from a leader for its
//!   randomized timeout asks every voter whether it *would* vote for it. A voter says yes only
//!   if it has itself not heard from a leader for the leader lease (the same bound openraft uses
//!   to refuse real votes) and the candidate's log is at least as up to date as its own. Only
//!   when a quorum of every configuration says yes does the follower call
//!   `Raft::trigger().elect()` and raise its term. A node that cannot win never raises its term.
//! - **Quorum lease**: the leader records when a quorum last acknowledged it (openraft's
//!   `millis_since_quorum_ack`, read when the metrics are published so the age is exact). A
//!   leader whose last quorum acknowledgement is older than the election timeout minimum is no
//!   longer trusted to be the leader: [`Liveness::has_quorum_lease`] is false, and the node
//!   refuses writes, linearizable reads and lease renewals until a quorum answers again. The
//!   lease is shorter than the voters' lease (the election timeout maximum), so an isolated
//!   leader stops serving before the majority can elect another.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{LogId, Raft, ServerState};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::network::Network;
use crate::type_config::TypeConfig;

/// Sentinel for "never" in the millisecond clocks of [`Liveness`].
const NEVER: u64 = u64::MAX;

/// What a node knows about its leader's liveness, shared by the Raft service (which sees the
/// leader's messages) and the election driver.
#[derive(Debug)]
pub struct Liveness {
    base: Instant,
    /// Milliseconds since `base` of the last message accepted from a leader.
    leader_contact_ms: AtomicU64,
    /// Milliseconds since `base` of the last quorum acknowledgement, while this node leads.
    quorum_ack_ms: AtomicU64,
    /// The voters' lease: no vote is granted this soon after hearing from a leader.
    voter_lease: Duration,
    /// The leader's lease: shorter than the voters' so an isolated leader stops first.
    leader_lease: Duration,
    /// Set while the leader hands leadership over: it serves nothing more as leader.
    stepping_down: AtomicBool,
}

impl Liveness {
    pub(crate) fn new(voter_lease: Duration, leader_lease: Duration) -> Arc<Liveness> {
        assert!(
            leader_lease < voter_lease,
            "the leader's lease must end first"
        );
        Arc::new(Liveness {
            base: Instant::now(),
            // A starting node counts as having just heard from a leader: it waits one timeout
            // before campaigning, which lets a running cluster's leader reach it first.
            leader_contact_ms: AtomicU64::new(0),
            quorum_ack_ms: AtomicU64::new(NEVER),
            voter_lease,
            leader_lease,
            stepping_down: AtomicBool::new(false),
        })
    }

    /// Marks this node as handing leadership over (see `Consensus::transfer_leadership`).
    pub(crate) fn step_down(&self) {
        self.stepping_down.store(true, Ordering::Relaxed);
    }

    /// Undoes [`Liveness::step_down`] after a live transfer (done or abandoned).
    pub(crate) fn resume(&self) {
        self.stepping_down.store(false, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// A leader's message was accepted (its vote is at least ours).
    pub(crate) fn leader_contact(&self) {
        self.leader_contact_ms
            .fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// Time since the last accepted leader message.
    pub(crate) fn since_leader_contact(&self) -> Duration {
        let at = self.leader_contact_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(at))
    }

    fn record_quorum_ack(&self, age: Duration) {
        let at = self.now_ms().saturating_sub(age.as_millis() as u64);
        // fetch_max would never move off the NEVER sentinel; a compare loop keeps it simple.
        let mut current = self.quorum_ack_ms.load(Ordering::Relaxed);
        while current == NEVER || current < at {
            match self.quorum_ack_ms.compare_exchange(
                current,
                at,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
    }

    fn clear_quorum_ack(&self) {
        self.quorum_ack_ms.store(NEVER, Ordering::Relaxed);
    }

    /// Time since a quorum last acknowledged this node as leader; None if it is not leading
    /// or was never acknowledged.
    pub fn since_quorum_ack(&self) -> Option<Duration> {
        let at = self.quorum_ack_ms.load(Ordering::Relaxed);
        (at != NEVER).then(|| Duration::from_millis(self.now_ms().saturating_sub(at)))
    }

    /// True while this node leads and a quorum acknowledged it within the leader lease.
    pub fn has_quorum_lease(&self) -> bool {
        !self.stepping_down.load(Ordering::Relaxed)
            && self
                .since_quorum_ack()
                .is_some_and(|age| age < self.leader_lease)
    }

    /// Whether this node would grant a pre-vote now: it has not heard from a leader, nor been
    /// an acknowledged leader, within the voters' lease.
    pub(crate) fn lease_expired(&self, leading: bool) -> bool {
        match (leading, self.since_quorum_ack()) {
            (true, Some(age)) => age >= self.voter_lease,
            // A leader not yet acknowledged (just elected) counts from its campaign, which
            // recorded a leader contact: it must not grant the pre-vote that would depose it
            // before its first heartbeat round.
            (true, None) | (false, _) => self.since_leader_contact() >= self.voter_lease,
        }
    }
}

/// A pre-vote: "would you vote for `candidate` with this log?" Nothing changes on the voter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreVoteRequest {
    /// The node asking; must be the sender of the RPC.
    pub candidate: u64,
    /// The candidate's last log id.
    pub last_log_id: Option<LogId<u64>>,
    /// The candidate's wall clock (ms since the epoch): a leader stamps every entry with it,
    /// so a candidate whose clock disagrees with a voter's by more than
    /// [`CLOCK_SKEW_MAX_MS`] gets no pre-vote and cannot lead.
    pub wall_clock_ms: u64,
}

/// Largest disagreement between a candidate's and a voter's wall clocks for a pre-vote; also
/// how far the registry's clock may run ahead of a node's before it raises `CLOCK_SKEW`.
pub const CLOCK_SKEW_MAX_MS: u64 = 5_000;

/// Milliseconds since the epoch on this node's wall clock (0 if the clock is before 1970): the
/// time a leader stamps entries with, and what nodes compare it against.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The answer to a [`PreVoteRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreVoteResponse {
    /// Whether the voter would vote for the candidate now.
    pub granted: bool,
}

/// "Campaign now": sent by a leader that hands leadership over to `target`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimeoutNowRequest {
    /// The leader stepping down; must be the sender of the RPC.
    pub leader: u64,
}

/// The answer to a [`TimeoutNowRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimeoutNowResponse {
    /// Whether the target will campaign.
    pub accepted: bool,
}

/// The vote lease openraft itself enforces (its `election_timeout_max`). Elections are gated
/// by pre-vote, so openraft's own timers only need to cover a heartbeat; keeping its lease
/// short is what lets a leadership transfer finish in a fraction of the election timeout.
pub(crate) fn raft_vote_lease(heartbeat: Duration) -> (u64, u64) {
    let hb = heartbeat.as_millis() as u64;
    let min = hb + (hb / 20).max(1);
    let max = min + (hb / 20).max(1);
    (min, max)
}

/// Timing of the election driver.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ElectionTiming {
    pub(crate) heartbeat: Duration,
    pub(crate) timeout_min: Duration,
    pub(crate) timeout_max: Duration,
}

/// Runs pre-vote rounds and starts elections; also keeps [`Liveness`]'s quorum clock.
pub(crate) struct ElectionDriver {
    pub(crate) raft: Raft<TypeConfig>,
    pub(crate) network: Network,
    pub(crate) liveness: Arc<Liveness>,
    pub(crate) timing: ElectionTiming,
    pub(crate) node_id: u64,
}

impl ElectionDriver {
    /// Starts the driver and the quorum-clock tracker; both end when Raft stops.
    pub(crate) fn spawn(self) {
        let raft = self.raft.clone();
        let liveness = self.liveness.clone();
        tokio::spawn(track_quorum_acks(raft, liveness));
        tokio::spawn(self.run());
    }

    /// A campaign starts after the voters' lease (the election timeout maximum) plus a random
    /// part of the timeout range, so survivors rarely campaign at the same moment and voters
    /// are past the lease that makes openraft refuse votes.
    fn next_timeout(&self) -> Duration {
        let spread = self.timing.timeout_max - self.timing.timeout_min;
        let jitter = rand::thread_rng().gen_range(0..=spread.as_millis() as u64);
        self.timing.timeout_max + Duration::from_millis(jitter)
    }

    async fn run(self) {
        let period = (self.timing.heartbeat / 2).max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut timeout = self.next_timeout();
        let mut metrics = self.raft.metrics();
        loop {
            tick.tick().await;
            let m = metrics.borrow_and_update().clone();
            if m.running_state.is_err() {
                return;
            }
            if m.state == ServerState::Leader || m.state == ServerState::Shutdown {
                continue;
            }
            let membership = m.membership_config.membership().clone();
            if !membership.voter_ids().any(|id| id == self.node_id) {
                continue;
            }
            if self.liveness.since_leader_contact() < timeout {
                continue;
            }
            let configs = membership.get_joint_config().clone();
            let last_log_id = self.raft.data_metrics().borrow().last_log;
            let granted = self.pre_vote_round(&membership, last_log_id).await;
            let won = configs.iter().all(|config| {
                let yes = config.iter().filter(|id| granted.contains(id)).count();
                yes * 2 > config.len()
            });
            // The round took a network round trip: if meanwhile this node voted for another
            // candidate or heard from a new leader, campaigning now would depose that leader
            // (two rounds won at once, the later one deposes the earlier).
            let contacted = self.liveness.since_leader_contact() < timeout;
            if won && contacted {
                tracing::debug!("heard from a leader during the pre-vote round; not campaigning");
            } else if won {
                tracing::info!(
                    term = m.current_term,
                    granted = ?granted,
                    "pre-vote won; campaigning"
                );
                if self.raft.trigger().elect().await.is_err() {
                    return;
                }
                // The election runs now; give it a full timeout before another attempt.
                self.liveness.leader_contact();
            } else {
                tracing::debug!(granted = ?granted, "pre-vote lost; not campaigning");
                // Pre-votes change nothing, so retrying soon is cheap; the jitter spreads the
                // survivors of a leader crash apart.
                let pause = rand::thread_rng().gen_range(
                    self.timing.heartbeat.as_millis()..=self.timing.heartbeat.as_millis() * 3,
                );
                tokio::time::sleep(Duration::from_millis(pause as u64)).await;
            }
            timeout = self.next_timeout();
        }
    }

    /// Asks every other voter; returns the ids that granted, this node included.
    async fn pre_vote_round(
        &self,
        membership: &openraft::Membership<u64, crate::NodeAddr>,
        last_log_id: Option<LogId<u64>>,
    ) -> BTreeSet<u64> {
        let request = PreVoteRequest {
            candidate: self.node_id,
            last_log_id,
            wall_clock_ms: wall_clock_ms(),
        };
        let deadline = self.timing.heartbeat * 3;
        let asks = membership
            .voter_ids()
            .filter(|id| *id != self.node_id)
            .filter_map(|id| membership.get_node(&id).map(|addr| (id, addr.clone())))
            .map(|(id, addr)| {
                let network = self.network.clone();
                let request = request.clone();
                async move {
                    let answer =
                        tokio::time::timeout(deadline, network.pre_vote(id, &addr, &request)).await;
                    match answer {
                        Ok(Ok(r)) if r.granted => Some(id),
                        Ok(Ok(_)) => None,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = id, error = %e, "pre-vote failed");
                            None
                        }
                        Err(_) => None,
                    }
                }
            });
        let mut granted: BTreeSet<u64> = futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect();
        granted.insert(self.node_id);
        granted
    }
}

/// Keeps the leader's quorum clock from openraft's metrics. The age is read when the metrics are
/// published, so it is exact at that instant; between publications the age only grows.
async fn track_quorum_acks(raft: Raft<TypeConfig>, liveness: Arc<Liveness>) {
    let mut metrics = raft.metrics();
    loop {
        {
            let m = metrics.borrow_and_update();
            match (m.state, m.millis_since_quorum_ack) {
                (ServerState::Leader, Some(ms)) => {
                    liveness.record_quorum_ack(Duration::from_millis(ms))
                }
                (ServerState::Leader, None) => {}
                _ => liveness.clear_quorum_ack(),
            }
        }
        if metrics.changed().await.is_err() {
            liveness.clear_quorum_ack();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_leader_has_no_lease_until_a_quorum_acknowledges_it() {
        let l = Liveness::new(Duration::from_millis(600), Duration::from_millis(400));
        assert!(!l.has_quorum_lease());
        l.record_quorum_ack(Duration::ZERO);
        assert!(l.has_quorum_lease());
        l.clear_quorum_ack();
        assert!(!l.has_quorum_lease());
    }

    #[test]
    fn an_acknowledgement_older_than_the_leader_lease_is_no_lease() {
        let l = Liveness::new(Duration::from_millis(600), Duration::from_millis(400));
        std::thread::sleep(Duration::from_millis(450));
        l.record_quorum_ack(Duration::from_millis(420));
        assert!(
            !l.has_quorum_lease(),
            "acknowledged 420 ms ago, lease 400 ms"
        );
        l.record_quorum_ack(Duration::from_millis(10));
        assert!(l.has_quorum_lease(), "a newer acknowledgement renews it");
        // An older report never moves the clock back.
        l.record_quorum_ack(Duration::from_millis(440));
        assert!(l.has_quorum_lease());
    }

    #[test]
    fn a_voter_grants_pre_votes_only_after_its_lease_since_the_leader_ran_out() {
        let l = Liveness::new(Duration::from_millis(200), Duration::from_millis(100));
        l.leader_contact();
        assert!(!l.lease_expired(false));
        std::thread::sleep(Duration::from_millis(220));
        assert!(l.lease_expired(false));
        l.leader_contact();
        assert!(!l.lease_expired(false));
    }

    #[test]
    fn a_leader_refuses_pre_votes_while_just_elected_or_freshly_acknowledged() {
        let l = Liveness::new(Duration::from_millis(200), Duration::from_millis(100));
        // Campaigning records a leader contact.
        l.leader_contact();
        assert!(
            !l.lease_expired(true),
            "just elected, before its first heartbeat round"
        );
        std::thread::sleep(Duration::from_millis(220));
        assert!(
            l.lease_expired(true),
            "elected a lease ago and never acknowledged"
        );
        l.record_quorum_ack(Duration::ZERO);
        assert!(!l.lease_expired(true));
    }
}
