//! Follower forwarding: a follower that admitted a client's write (or linearizable read) hands
//! it to the leader over the node-only Raft channel, so clients need not find the leader.
//!
//! A write is proposed by the leader exactly as if the client had sent it there (the leader
//! stamps the time, group commit applies) and the outcome travels back. A linearizable read
//! asks the leader for a read index (one leadership confirmation, batched with the leader's own
//! reads), then waits until the follower has applied that far and reads its own state, as etcd
//! followers do: the answer is built where the client is, and only one index crosses the wire.
//!
//! Trust: the leader takes the caller named in a forwarded request from the follower, which
//! authorized it at its edge. A compromised member could name any caller, but it could also win
//! an election and propose anything; what bounds it is unchanged: apply verifies every
//! signature against the bindings and the admin set. So only the signed client commands are
//! accepted (register, deregister, bind, rotate admins); the unsigned ones only a leader makes
//! (expiry, genesis, batches, no-ops) are refused, and a forwarded request is never forwarded
//! again.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use signpost_state::{Command, Outcome, Request};
use tokio::sync::Semaphore;

use crate::error::ConsensusError;
use crate::propose_batch::ProposalBatcher;
use crate::read_batch::ReadBatcher;

/// Forwarded requests a leader works on at once, from all followers together; more are refused
/// as unavailable (each follower's own admission bounds what it forwards far lower).
pub const FORWARDED_IN_FLIGHT_MAX: usize = 4_096;
/// How long a follower waits for the leader's answer to a forwarded request, and for its own
/// apply to reach a forwarded read index. Past it the client is told the cluster is unavailable
/// (a forwarded write may still commit, as any write whose answer was lost).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// What a follower asks the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardRequest {
    /// Propose this client write.
    Propose(Request),
    /// Confirm leadership and give the index a linearizable read must wait for.
    ReadIndex,
}

/// The leader's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardAnswer {
    /// The write was applied at `index` with `outcome` (which may be a rejection by apply).
    Proposed {
        /// Log index of the entry that carried it.
        index: u64,
        /// Apply's answer.
        outcome: Outcome,
    },
    /// A read may be served once the follower has applied this index.
    ReadIndex(u64),
    /// The leader could not take the request.
    Refused(Refusal),
}

/// Why a leader did not take a forwarded request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Refusal {
    /// The receiver is not (or no longer) the leader.
    NotLeader,
    /// The leader cannot now (no quorum, too many forwarded requests); safe to retry.
    Unavailable(String),
    /// The request may not be forwarded (a command only a leader makes).
    Invalid(String),
}

impl Refusal {
    fn from_error(e: ConsensusError) -> Refusal {
        match e {
            ConsensusError::NotLeader { .. } => Refusal::NotLeader,
            ConsensusError::Invalid(why) => Refusal::Invalid(why),
            other => Refusal::Unavailable(other.to_string()),
        }
    }

    /// The error a follower reports to its client for the leader's refusal.
    pub(crate) fn into_error(self, leader: u64) -> ConsensusError {
        match self {
            // The leader changed under the request: no leader is known for certain, so the
            // client tries again (the next attempt forwards to the new one).
            Refusal::NotLeader => ConsensusError::NotLeader { leader: None },
            Refusal::Unavailable(why) => {
                ConsensusError::Unavailable(format!("leader {leader} (forwarded): {why}"))
            }
            Refusal::Invalid(why) => {
                ConsensusError::Invalid(format!("leader {leader} (forwarded): {why}"))
            }
        }
    }
}

/// Whether a command may arrive forwarded: only the client commands apply verifies signatures
/// of.
pub fn forwardable(command: &Command) -> bool {
    matches!(
        command,
        Command::Register { .. }
            | Command::Deregister { .. }
            | Command::Bind { .. }
            | Command::RotateAdmins { .. }
    )
}

/// The leader's side: takes forwarded requests from members.
#[derive(Clone)]
pub(crate) struct ForwardDesk {
    proposals: ProposalBatcher,
    reads: ReadBatcher,
    // Checked before each forwarded request, as for the leader's own clients.
    lease: Arc<dyn Fn() -> Result<(), ConsensusError> + Send + Sync>,
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for ForwardDesk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardDesk")
            .field("in_flight_free", &self.in_flight.available_permits())
            .finish_non_exhaustive()
    }
}

impl ForwardDesk {
    pub(crate) fn new(
        proposals: ProposalBatcher,
        reads: ReadBatcher,
        lease: Arc<dyn Fn() -> Result<(), ConsensusError> + Send + Sync>,
    ) -> ForwardDesk {
        ForwardDesk {
            proposals,
            reads,
            lease,
            in_flight: Arc::new(Semaphore::new(FORWARDED_IN_FLIGHT_MAX)),
        }
    }

    /// Answers one forwarded request. Never forwards: a node that is not the leader refuses.
    pub(crate) async fn take(&self, request: ForwardRequest) -> ForwardAnswer {
        let Ok(_slot) = self.in_flight.try_acquire() else {
            metrics::counter!(crate::FORWARDED_TOTAL, "side" => "leader", "result" => "busy")
                .increment(1);
            return ForwardAnswer::Refused(Refusal::Unavailable(format!(
                "{FORWARDED_IN_FLIGHT_MAX} forwarded requests are in flight"
            )));
        };
        if let Err(e) = (self.lease)() {
            return ForwardAnswer::Refused(Refusal::from_error(e));
        }
        let answer = match request {
            ForwardRequest::Propose(request) if !forwardable(&request.command) => {
                ForwardAnswer::Refused(Refusal::Invalid(
                    "only signed client commands may be forwarded".into(),
                ))
            }
            ForwardRequest::Propose(mut request) => {
                // The leader's clock decides, whatever the follower put there.
                request.time_ms = 0;
                match self.proposals.propose(request).await {
                    Ok((index, outcome)) => ForwardAnswer::Proposed { index, outcome },
                    Err(e) => ForwardAnswer::Refused(Refusal::from_error(e)),
                }
            }
            ForwardRequest::ReadIndex => match self.reads.barrier().await {
                Ok(index) => ForwardAnswer::ReadIndex(index),
                Err(e) => ForwardAnswer::Refused(Refusal::from_error(e)),
            },
        };
        let result = match &answer {
            ForwardAnswer::Refused(_) => "refused",
            _ => "ok",
        };
        metrics::counter!(crate::FORWARDED_TOTAL, "side" => "leader", "result" => result)
            .increment(1);
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_signed_client_commands_may_be_forwarded() {
        let signed = [
            Command::Register { envelope: vec![1] },
            Command::Deregister { envelope: vec![1] },
            Command::Bind { envelope: vec![1] },
            Command::RotateAdmins {
                envelope: vec![1],
                rebinds: vec![],
            },
        ];
        for command in &signed {
            assert!(forwardable(command), "{command:?} is a client command");
        }
        let leader_only = [
            Command::Noop,
            Command::Expire {
                service: "payments".into(),
                instance: "i1".into(),
                sequence: 1,
            },
            Command::Batch { requests: vec![] },
        ];
        for command in &leader_only {
            assert!(
                !forwardable(command),
                "{command:?} is made by a leader only"
            );
        }
    }

    #[test]
    fn a_refusal_tells_the_client_to_retry_or_why_not() {
        assert!(matches!(
            Refusal::NotLeader.into_error(2),
            ConsensusError::NotLeader { leader: None }
        ));
        assert!(matches!(
            Refusal::Unavailable("no quorum".into()).into_error(2),
            ConsensusError::Unavailable(why) if why.contains("leader 2") && why.contains("no quorum")
        ));
        assert!(matches!(
            Refusal::Invalid("x".into()).into_error(2),
            ConsensusError::Invalid(_)
        ));
    }
}
