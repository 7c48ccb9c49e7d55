//! The `Cluster` gRPC service: a node's view of the cluster.

use signpost_consensus::Consensus;
use signpost_proto::v1::cluster_server::Cluster;
use signpost_proto::v1::{Member, StatusRequest, StatusResponse};
use tonic::{Request, Response, Status};

use crate::admission::{Admission, Op};
use crate::authz::Caller;

/// Alarm raised while the registry's clock (the largest entry time applied) is ahead of this
/// node's wall clock by more than `CLOCK_SKEW_MAX_MS`: some leader's clock ran ahead, and
/// registrations from clients with correct clocks are refused as too old until real time
/// catches up.
pub(crate) const CLOCK_SKEW: &str = "CLOCK_SKEW";

/// Whether the registry clock `clock_ms` is too far ahead of this node's wall clock.
pub(crate) fn clock_skewed(clock_ms: u64) -> bool {
    clock_ms
        > signpost_consensus::wall_clock_ms().saturating_add(signpost_consensus::CLOCK_SKEW_MAX_MS)
}

/// Serves `Cluster.Status` to any authenticated client identity.
#[derive(Debug, Clone)]
pub struct ClusterService {
    consensus: Consensus,
    trust_domain: String,
    admission: Admission,
}

impl ClusterService {
    /// A status service over `consensus` whose requests pass `admission` like reads.
    pub fn new(consensus: Consensus, trust_domain: String, admission: Admission) -> Self {
        ClusterService {
            consensus,
            trust_domain,
            admission,
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let caller = Caller::from_request(&request, &self.trust_domain)?;
        // Status is cheap but not free (it reads the state and the Raft metrics): a flood of
        // it is held to the caller's read rate like any other read.
        let _admitted = self.admission.admit(&caller, Op::Read)?;
        caller.check_read()?;
        let status = self.consensus.status();
        let mut alarms = self.consensus.state().registry.alarms();
        if clock_skewed(self.consensus.state().registry.clock_ms()) {
            alarms.push(CLOCK_SKEW.to_string());
        }
        let leader = status.leader_id;
        let members = status
            .members
            .iter()
            .map(|m| Member {
                id: m.id,
                addr: m.addr.client_addr.clone(),
                raft_addr: m.addr.raft_addr.clone(),
                role: if Some(m.id) == leader {
                    "leader".to_string()
                } else if m.voter {
                    "follower".to_string()
                } else {
                    "learner".to_string()
                },
            })
            .collect();
        Ok(Response::new(StatusResponse {
            node_id: status.node_id,
            leader_id: leader.unwrap_or(0),
            term: status.term,
            commit_index: status.commit_index,
            applied_index: status.applied_index,
            members,
            // A leader cut off from its quorum says so: it serves no writes.
            role: if status.role == "leader" && !status.quorum_lease {
                "leader-without-quorum".to_string()
            } else {
                status.role.to_string()
            },
            snapshot_index: status.snapshot_index,
            purged_index: status.purged_index,
            alarms,
        }))
    }
}
