use std::collections::BTreeSet;
use std::io::Cursor;
use std::sync::Arc;

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest};
use openraft::{LogId, Raft, ServerState, Snapshot, SnapshotMeta, Vote};
use signpost_identity::{Identity, SpiffeId};
use signpost_proto::v1::raft_server::{self, RaftServer};
use signpost_proto::v1::{snapshot_chunk, RaftMessage, SnapshotChunk};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::codec::{self, RAFT_MESSAGE_BYTES_MAX, SNAPSHOT_BYTES_MAX, SNAPSHOT_CHUNK_BYTES_MAX};
use crate::election::{
    Liveness, PreVoteRequest, PreVoteResponse, TimeoutNowRequest, TimeoutNowResponse,
};
use crate::type_config::{NodeAddr, TypeConfig};

/// Largest term or log index accepted from a peer. Honest clusters never come near it (a term a
/// millisecond for a million years); it keeps a lying peer from pushing a counter to where
/// openraft's `+ 1` overflows.
pub const PEER_COUNTER_MAX: u64 = 1 << 62;

/// The node-only `Raft` gRPC service. Mounted on the Raft listener, never on the client one.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft<TypeConfig>,
    trust_domain: String,
    liveness: Arc<Liveness>,
    // Who may speak before this node knows any membership (a new cluster's first contact).
    initial_members: BTreeSet<u64>,
    // The vote lease openraft enforces: a transfer target campaigns once it has passed.
    raft_vote_lease: std::time::Duration,
    // Read to check a received snapshot against this node's genesis.
    state_machine: crate::state_machine::StateMachine,
    // The configured genesis, for a node that has none of its own yet.
    expected_genesis: Option<signpost_record::AdminSet>,
    // Peer certificates' identities, parsed once per certificate rather than once per RPC
    // (heartbeats, appends and, with forwarding on, every forwarded request).
    identities: Arc<signpost_identity::PeerIdentities>,
    // Takes requests followers forward while this node leads.
    desk: crate::forward::ForwardDesk,
    // Answers the leader's cosign requests.
    checkpoints: crate::checkpoints::Checkpoints,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl RaftService {
    /// The service for `raft`, accepting only member node identities of `trust_domain`.
    // One call site (`Consensus::raft_service`), each argument a distinct handle the service
    // needs; a parameter struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        raft: Raft<TypeConfig>,
        trust_domain: String,
        liveness: Arc<Liveness>,
        initial_members: BTreeSet<u64>,
        raft_vote_lease: std::time::Duration,
        state_machine: crate::state_machine::StateMachine,
        expected_genesis: Option<signpost_record::AdminSet>,
        desk: crate::forward::ForwardDesk,
        checkpoints: crate::checkpoints::Checkpoints,
    ) -> RaftService {
        RaftService {
            identities: Arc::new(signpost_identity::PeerIdentities::new()),
            raft,
            trust_domain,
            liveness,
            initial_members,
            raft_vote_lease,
            state_machine,
            expected_genesis,
            desk,
            checkpoints,
        }
    }

    /// The tonic server with the Raft message size limits set.
    pub fn into_server(self) -> RaftServer<RaftService> {
        RaftServer::new(self)
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX)
    }

    /// Only nodes of our trust domain may speak Raft. The decision uses the verified peer
    /// certificate; nothing in the message can change it.
    fn authorize<T>(&self, request: &Request<T>) -> Result<u64, Status> {
        let peer: SpiffeId = self.identities.of_request(request)?;
        match (&peer.identity, peer.trust_domain == self.trust_domain) {
            (Identity::Node(id), true) => Ok(*id),
            _ => Err(Status::permission_denied(format!(
                "rule raft.node-only: {peer} is not a node of trust domain {}",
                self.trust_domain
            ))),
        }
        .and_then(|id| self.check_member(id))
    }

    /// Only members (voters and learners of the applied membership, or of the configured
    /// initial members while this node knows none) may speak Raft: a certificate for another
    /// node id of the CA is not enough.
    fn check_member(&self, id: u64) -> Result<u64, Status> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let mut nodes = m.membership_config.nodes().map(|(n, _)| *n).peekable();
        let member = if nodes.peek().is_none() {
            self.initial_members.contains(&id)
        } else {
            nodes.any(|n| n == id)
        };
        if member {
            Ok(id)
        } else {
            Err(Status::permission_denied(format!(
                "rule raft.members-only: node {id} is not a member of this cluster"
            )))
        }
    }
}

/// The vote in a peer's message must be the sender's own and its counters bounded.
fn check_vote(from: u64, vote: &Vote<u64>, what: &str) -> Result<(), Status> {
    if vote.leader_id().voted_for() != Some(from) {
        return Err(Status::permission_denied(format!(
            "rule raft.own-vote: {what} from node {from} carries a vote for {:?}",
            vote.leader_id().voted_for()
        )));
    }
    check_counter(vote.leader_id().get_term(), what, "term")
}

fn check_counter(value: u64, what: &str, name: &str) -> Result<(), Status> {
    if value > PEER_COUNTER_MAX {
        return Err(Status::invalid_argument(format!(
            "{what}: {name} {value} is above the bound {PEER_COUNTER_MAX}"
        )));
    }
    Ok(())
}

fn check_log_id(log_id: Option<&LogId<u64>>, what: &str) -> Result<(), Status> {
    if let Some(l) = log_id {
        check_counter(l.leader_id.term, what, "log term")?;
        check_counter(l.index, what, "log index")?;
    }
    Ok(())
}

fn check_append(from: u64, rpc: &AppendEntriesRequest<TypeConfig>) -> Result<(), Status> {
    let what = "AppendEntries";
    check_vote(from, &rpc.vote, what)?;
    check_log_id(rpc.prev_log_id.as_ref(), what)?;
    check_log_id(rpc.leader_commit.as_ref(), what)?;
    for entry in &rpc.entries {
        check_log_id(Some(&entry.log_id), what)?;
    }
    Ok(())
}

fn check_vote_request(from: u64, rpc: &VoteRequest<u64>) -> Result<(), Status> {
    check_vote(from, &rpc.vote, "Vote")?;
    check_log_id(rpc.last_log_id.as_ref(), "Vote")
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, Status> {
    codec::decode(bytes, RAFT_MESSAGE_BYTES_MAX)
        .map_err(|e| Status::invalid_argument(format!("malformed {what}: {e}")))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    codec::encode(value, RAFT_MESSAGE_BYTES_MAX)
        .map(|data| Response::new(RaftMessage { data }))
        .map_err(|e| Status::internal(format!("encoding response: {e}")))
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let from = self.authorize(&request)?;
        let rpc: AppendEntriesRequest<TypeConfig> =
            decode(&request.into_inner().data, "AppendEntries")?;
        check_append(from, &rpc)?;
        let committed = rpc.vote.is_committed();
        let response = self
            .raft
            .append_entries(rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        // Any answer but "your vote is lower than mine" means we accept the sender as leader.
        if committed && !matches!(response, AppendEntriesResponse::HigherVote(_)) {
            self.liveness.leader_contact();
        }
        encode(&response)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let from = self.authorize(&request)?;
        let rpc: VoteRequest<u64> = decode(&request.into_inner().data, "Vote")?;
        check_vote_request(from, &rpc)?;
        let response = self
            .raft
            .vote(rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if response.vote_granted {
            // As etcd resets its election timer on granting a vote: the candidate we just
            // voted for needs a heartbeat's time to reach us as leader, and campaigning (or
            // granting another pre-vote) before then would depose it at once.
            self.liveness.leader_contact();
        }
        encode(&response)
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let from = self.authorize(&request)?;
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(SnapshotChunk {
                chunk: Some(snapshot_chunk::Chunk::Header(h)),
            })) => h,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "snapshot stream must start with a header",
                ))
            }
        };
        let total = usize::try_from(header.total_bytes)
            .ok()
            .filter(|t| *t <= SNAPSHOT_BYTES_MAX)
            .ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "snapshot of {} bytes exceeds the {SNAPSHOT_BYTES_MAX} byte limit",
                    header.total_bytes
                ))
            })?;
        let vote: Vote<u64> = decode(&header.vote, "snapshot vote")?;
        check_vote(from, &vote, "InstallSnapshot")?;
        let meta: SnapshotMeta<u64, NodeAddr> = decode(&header.meta, "snapshot meta")?;
        check_log_id(meta.last_log_id.as_ref(), "InstallSnapshot")?;
        // Grows with what actually arrives: a header's claim alone allocates nothing.
        let mut body = Vec::new();
        while let Some(chunk) = stream.next().await {
            let data = match chunk?.chunk {
                Some(snapshot_chunk::Chunk::Data(d)) => d,
                _ => return Err(Status::invalid_argument("unexpected snapshot chunk")),
            };
            if data.len() > SNAPSHOT_CHUNK_BYTES_MAX {
                return Err(Status::resource_exhausted(format!(
                    "snapshot chunk of {} bytes exceeds the {SNAPSHOT_CHUNK_BYTES_MAX} byte limit",
                    data.len()
                )));
            }
            if body.len() + data.len() > total {
                return Err(Status::invalid_argument(
                    "snapshot stream is longer than its header says",
                ));
            }
            body.extend_from_slice(&data);
        }
        if body.len() != total {
            return Err(Status::invalid_argument(format!(
                "snapshot stream ended after {} of {total} bytes",
                body.len()
            )));
        }
        // Checked before openraft sees the vote or the body: a snapshot that cannot be installed
        // would otherwise stop this node's Raft core for good.
        let genesis = self
            .state_machine
            .read()
            .registry
            .genesis()
            .cloned()
            .or_else(|| self.expected_genesis.clone());
        let checked = tokio::task::spawn_blocking(move || {
            crate::state_machine::check_snapshot(&body, genesis.as_ref()).map(|()| body)
        })
        .await
        .map_err(|e| Status::internal(format!("snapshot check: {e}")))?;
        let body = match checked {
            Ok(body) => body,
            Err(reason) => {
                tracing::warn!(from, snapshot = %meta.snapshot_id, %reason, "refused a snapshot");
                return Err(Status::invalid_argument(format!(
                    "refused snapshot: {reason}"
                )));
            }
        };
        tracing::info!(from, snapshot = %meta.snapshot_id, bytes = total, "receiving snapshot");
        let snapshot = Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(body)),
        };
        let response = self
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if response.vote == vote {
            self.liveness.leader_contact();
        }
        encode(&response)
    }

    async fn forward(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        // Members only: the forwarded caller is taken on the member's word (see
        // `crate::forward` for why that widens nothing apply does not check anyway).
        self.authorize(&request)?;
        let rpc: crate::forward::ForwardRequest = decode(&request.into_inner().data, "Forward")?;
        encode(&self.desk.take(rpc).await)
    }

    async fn cosign(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let from = self.authorize(&request)?;
        let rpc: crate::checkpoints::CosignRequest = decode(&request.into_inner().data, "Cosign")?;
        let leader = self.raft.metrics().borrow().current_leader;
        encode(&self.checkpoints.cosign(from, leader, rpc).await)
    }

    async fn pre_vote(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let from = self.authorize(&request)?;
        let rpc: PreVoteRequest = decode(&request.into_inner().data, "PreVote")?;
        if rpc.candidate != from {
            return Err(Status::permission_denied(format!(
                "rule raft.own-vote: pre-vote from node {from} names candidate {}",
                rpc.candidate
            )));
        }
        check_log_id(rpc.last_log_id.as_ref(), "PreVote")?;
        let leading = self.raft.metrics().borrow().state == ServerState::Leader;
        let my_last = self.raft.data_metrics().borrow().last_log;
        let skew_ms = crate::election::wall_clock_ms().abs_diff(rpc.wall_clock_ms);
        let clock_ok = skew_ms <= crate::election::CLOCK_SKEW_MAX_MS;
        if !clock_ok {
            tracing::warn!(
                candidate = from,
                skew_ms,
                "CLOCK_SKEW: refusing a pre-vote to a node whose clock differs from ours; \
                 it cannot lead until its clock is fixed"
            );
        }
        let granted =
            clock_ok && self.liveness.lease_expired(leading) && rpc.last_log_id >= my_last;
        tracing::debug!(candidate = from, granted, "pre-vote");
        encode(&PreVoteResponse { granted })
    }

    async fn timeout_now(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let from = self.authorize(&request)?;
        let rpc: TimeoutNowRequest = decode(&request.into_inner().data, "TimeoutNow")?;
        let (leader, voter) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|id| id == m.id);
            (m.current_leader, voter)
        };
        // Only the current leader may hand its leadership over, and only to a voter.
        let accepted = rpc.leader == from && leader == Some(from) && voter;
        if accepted {
            let (raft, liveness, lease) = (
                self.raft.clone(),
                self.liveness.clone(),
                self.raft_vote_lease,
            );
            tokio::spawn(async move {
                // The other voters refuse votes until openraft's lease since the leader's last
                // heartbeat has passed; campaigning earlier would only waste a term.
                let margin = std::time::Duration::from_millis(10);
                let wait = (lease + margin).saturating_sub(liveness.since_leader_contact());
                tokio::time::sleep(wait.min(std::time::Duration::from_secs(1))).await;
                tracing::info!(from, "leadership handed to us; campaigning");
                if let Err(e) = raft.trigger().elect().await {
                    tracing::warn!(error = %e, "could not campaign");
                }
            });
        }
        encode(&TimeoutNowResponse { accepted })
    }
}
