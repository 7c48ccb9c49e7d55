//! The `Cluster` gRPC service: a node's view of the cluster.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use signpost_consensus::{Consensus, NodeAddr, NodeStatus};
use signpost_proto::v1::cluster_server::Cluster;
use signpost_proto::v1::{
    AddMemberRequest, BackupChunk, BackupRequest, Member, MembershipResponse, RemoveMemberRequest,
    SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse, TransferLeaderRequest,
    TransferLeaderResponse,
};
use tokio::sync::Semaphore;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::admission::{Admission, Op};
use crate::authz::Caller;
use crate::error::consensus_status;

/// How long AddMember waits for a new learner to catch up before answering UNAVAILABLE (it
/// keeps catching up; the operator calls again). Below the client listener's request timeout.
const CATCH_UP_WAIT: Duration = Duration::from_secs(8);
/// How long TransferLeader and Snapshot wait.
const MAINTENANCE_WAIT: Duration = Duration::from_secs(5);
/// Bytes per streamed backup message.
const BACKUP_CHUNK_BYTES: usize = 1024 * 1024;
/// Backups built at once on one node: each holds a copy of the whole state in memory.
const BACKUPS_CONCURRENT_MAX: usize = 1;

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

/// Serves `Cluster`: status to any identity that may read, maintenance to admins.
#[derive(Debug, Clone)]
pub struct ClusterService {
    consensus: Consensus,
    trust_domain: String,
    admission: Admission,
    metrics_addr: String,
    backups: Arc<Semaphore>,
}

impl ClusterService {
    /// A cluster service over `consensus` whose requests pass `admission`; `metrics_addr` is
    /// this node's operators' listener, reported in status.
    pub fn new(
        consensus: Consensus,
        trust_domain: String,
        admission: Admission,
        metrics_addr: Option<String>,
    ) -> Self {
        ClusterService {
            consensus,
            trust_domain,
            admission,
            metrics_addr: metrics_addr.unwrap_or_default(),
            backups: Arc::new(Semaphore::new(BACKUPS_CONCURRENT_MAX)),
        }
    }

    /// The caller, if it is an admin and admission lets the request through. Maintenance is
    /// charged as a write: it proposes entries or costs the leader a state copy.
    fn admin<T>(&self, request: &Request<T>, what: &str) -> Result<Caller, Status> {
        let caller = Caller::from_request(request, &self.trust_domain)?;
        caller.check_admin(what)?;
        let _admitted = self.admission.admit(&caller, Op::Write)?;
        Ok(caller)
    }

    fn members(&self, status: &NodeStatus) -> Vec<Member> {
        members(status)
    }
}

fn members(status: &NodeStatus) -> Vec<Member> {
    let leader = status.leader_id;
    status
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
            voter: m.voter,
            matched_index: m.matched_index,
            last_contact_ms: m.last_contact_ms,
        })
        .collect()
}

type BackupStream = Pin<Box<dyn Stream<Item = Result<BackupChunk, Status>> + Send + 'static>>;

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
        let members = self.members(&status);
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
            metrics_addr: self.metrics_addr.clone(),
            last_log_index: status.last_log_index,
        }))
    }

    async fn add_member(
        &self,
        request: Request<AddMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let caller = self.admin(&request, "change membership")?;
        let r = request.into_inner();
        if r.id == 0 {
            return Err(Status::invalid_argument("node ids start at 1"));
        }
        for (what, addr) in [("addr", &r.addr), ("raft_addr", &r.raft_addr)] {
            if addr.parse::<std::net::SocketAddr>().is_err()
                && addr.rsplit_once(':').is_none_or(|(host, port)| {
                    host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0)
                })
            {
                return Err(Status::invalid_argument(format!(
                    "{what} {addr:?} is not host:port"
                )));
            }
        }
        let addr = NodeAddr {
            raft_addr: r.raft_addr,
            client_addr: r.addr,
        };
        tracing::info!(caller = %caller.uri(), node = r.id, ?addr, "adding member");
        self.consensus
            .add_member(r.id, addr, CATCH_UP_WAIT)
            .await
            .map_err(consensus_status)?;
        tracing::info!(node = r.id, "member added as voter");
        Ok(Response::new(MembershipResponse {
            members: self.members(&self.consensus.status()),
        }))
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let caller = self.admin(&request, "change membership")?;
        let id = request.into_inner().id;
        tracing::info!(caller = %caller.uri(), node = id, "removing member");
        self.consensus
            .remove_member(id)
            .await
            .map_err(consensus_status)?;
        Ok(Response::new(MembershipResponse {
            members: self.members(&self.consensus.status()),
        }))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let caller = self.admin(&request, "transfer leadership")?;
        let id = request.into_inner().id;
        let target = (id != 0).then_some(id);
        tracing::info!(caller = %caller.uri(), ?target, "transferring leadership");
        let leader_id = self
            .consensus
            .transfer_leadership_to(target, MAINTENANCE_WAIT)
            .await
            .map_err(consensus_status)?;
        Ok(Response::new(TransferLeaderResponse { leader_id }))
    }

    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotResponse>, Status> {
        let caller = self.admin(&request, "trigger a snapshot")?;
        tracing::info!(caller = %caller.uri(), "snapshot requested");
        let snapshot_index = self
            .consensus
            .snapshot_now(MAINTENANCE_WAIT)
            .await
            .map_err(consensus_status)?;
        Ok(Response::new(SnapshotResponse { snapshot_index }))
    }

    type BackupStream = BackupStream;

    async fn backup(
        &self,
        request: Request<BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let caller = self.admin(&request, "take a backup")?;
        let permit = self.backups.clone().try_acquire_owned().map_err(|_| {
            crate::error::shed(
                "backups",
                "a backup is already being taken on this node",
                1000,
            )
        })?;
        let backup = self.consensus.backup().await.map_err(consensus_status)?;
        let bytes = backup.to_bytes().map_err(consensus_status)?;
        tracing::info!(
            caller = %caller.uri(),
            revision = backup.revision(),
            bytes = bytes.len(),
            "backup taken"
        );
        let bytes = Arc::new(bytes);
        // The copy is held (and the permit with it) until the stream is done or dropped.
        let stream =
            futures::stream::unfold((0usize, bytes, permit), |(at, bytes, permit)| async move {
                if at >= bytes.len() {
                    return None;
                }
                let end = (at + BACKUP_CHUNK_BYTES).min(bytes.len());
                let chunk = BackupChunk {
                    data: bytes[at..end].to_vec(),
                };
                Some((Ok(chunk), (end, bytes, permit)))
            });
        Ok(Response::new(Box::pin(stream)))
    }
}
