use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{LogId, OptionalSend, Snapshot, Vote};
use signpost_proto::v1::raft_client::RaftClient;
use signpost_proto::v1::{snapshot_chunk, RaftMessage, SnapshotChunk, SnapshotHeader};
use tonic::transport::Channel;

use crate::codec::{self, RAFT_MESSAGE_BYTES_MAX, SNAPSHOT_BYTES_MAX, SNAPSHOT_CHUNK_BYTES_MAX};
use crate::election::{PreVoteRequest, PreVoteResponse, TimeoutNowRequest, TimeoutNowResponse};
use crate::type_config::{NodeAddr, TypeConfig};

/// Size of the chunks a snapshot is streamed in (below the receiver's chunk limit).
const SNAPSHOT_SEND_CHUNK_BYTES: usize = 1024 * 1024;
// A sent chunk must fit under what the receiver accepts.
const _: () = assert!(SNAPSHOT_SEND_CHUNK_BYTES <= SNAPSHOT_CHUNK_BYTES_MAX);
/// Most bytes of log entries one AppendEntries carries (always at least one entry). openraft
/// 0.9 gives every AppendEntries one heartbeat interval to complete and sends the same range
/// again after a timeout, up to `max_payload_entries` entries, each of which may be a group
/// commit of hundreds of requests. Unbounded, a lagging follower under load was sent tens of MiB
/// per RPC that could not finish in 100 ms (nor fit the 64 MiB message limit), forever: it never
/// caught up and the leader lost its quorum lease. Trimmed to this budget, the rest of the range
/// goes in the next RPC (reported to openraft as a partial success).
const APPEND_BYTES_BUDGET: u64 = 1024 * 1024;
const _: () = assert!(APPEND_BYTES_BUDGET < RAFT_MESSAGE_BYTES_MAX as u64);

/// Cuts `rpc`'s entries to [`APPEND_BYTES_BUDGET`] (keeping at least one); returns the log id of
/// the last entry kept when entries were cut.
fn trim_to_budget(rpc: &mut AppendEntriesRequest<TypeConfig>) -> Option<LogId<u64>> {
    let mut bytes = 0u64;
    let mut keep = 0;
    for entry in &rpc.entries {
        let len = codec::encoded_len(entry);
        if keep > 0 && bytes.saturating_add(len) > APPEND_BYTES_BUDGET {
            break;
        }
        bytes = bytes.saturating_add(len);
        keep += 1;
    }
    if keep >= rpc.entries.len() {
        return None;
    }
    rpc.entries.truncate(keep);
    rpc.entries.last().map(|e| e.log_id)
}

/// Connection timeout towards a peer: short, because openraft retries with backoff.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before the second attempt to send a snapshot to a peer that refused or lost the
/// first; doubled per failure in a row up to [`SNAPSHOT_RETRY_PAUSE_MAX`].
const SNAPSHOT_RETRY_PAUSE_FIRST: Duration = Duration::from_millis(500);
/// Longest pause between snapshot attempts to one peer. A snapshot can be hundreds of MiB: a
/// peer that refuses every one (a corrupt or hostile follower) must not turn the leader into
/// a loop that streams them back to back.
const SNAPSHOT_RETRY_PAUSE_MAX: Duration = Duration::from_secs(30);

/// Failed snapshot sends in a row, per peer: each one makes the next wait longer. Kept by the
/// network, so it survives openraft rebuilding its connection after each failure.
#[derive(Debug, Default)]
struct SnapshotBackoff {
    failures: HashMap<u64, u32>,
}

impl SnapshotBackoff {
    /// How long to wait before the next snapshot send to `target`.
    fn pause(&self, target: u64) -> Duration {
        match self.failures.get(&target).copied().unwrap_or(0) {
            0 => Duration::ZERO,
            n => SNAPSHOT_RETRY_PAUSE_FIRST
                .saturating_mul(1u32 << (n - 1).min(16))
                .min(SNAPSHOT_RETRY_PAUSE_MAX),
        }
    }

    fn record(&mut self, target: u64, ok: bool) {
        if ok {
            self.failures.remove(&target);
        } else {
            let n = self.failures.entry(target).or_default();
            *n = n.saturating_add(1);
        }
    }
}

/// Creates connections to peers. One gRPC channel per peer address is kept and reused by every
/// RPC and every reconnect, so Raft never pays a TLS handshake per message.
#[derive(Clone)]
pub struct Network {
    tls: Arc<rustls::ClientConfig>,
    local_ip: Option<IpAddr>,
    channels: Arc<Mutex<HashMap<u64, (String, Channel)>>>,
    snapshot_backoff: Arc<Mutex<SnapshotBackoff>>,
    contacts: Contacts,
}

/// When each peer last answered an AppendEntries (a heartbeat or a batch) from this node: the
/// leader's "last contact" per follower that `signpost status` shows.
#[derive(Debug, Clone, Default)]
pub(crate) struct Contacts(Arc<Mutex<HashMap<u64, std::time::Instant>>>);

impl Contacts {
    fn record(&self, peer: u64) {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(peer, std::time::Instant::now());
    }

    /// Time since `peer` last answered, if it ever did.
    pub(crate) fn since(&self, peer: u64) -> Option<Duration> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&peer)
            .map(std::time::Instant::elapsed)
    }
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").finish_non_exhaustive()
    }
}

impl Network {
    /// A network whose connections present the node's certificate and accept only node peers
    /// (as encoded in `tls`), dialled from `local_ip` when given (the address peers admit us by).
    pub fn new(tls: Arc<rustls::ClientConfig>, local_ip: Option<IpAddr>) -> Network {
        Network {
            tls,
            local_ip,
            channels: Arc::new(Mutex::new(HashMap::new())),
            snapshot_backoff: Arc::new(Mutex::new(SnapshotBackoff::default())),
            contacts: Contacts::default(),
        }
    }

    /// When each peer last answered this node's AppendEntries.
    pub(crate) fn contacts(&self) -> &Contacts {
        &self.contacts
    }

    fn channel(
        &self,
        target: u64,
        addr: &str,
    ) -> Result<Channel, signpost_identity::IdentityError> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((known, channel)) = channels.get(&target) {
            if known == addr {
                return Ok(channel.clone());
            }
        }
        let channel = signpost_identity::connect_channel_from(
            addr,
            self.tls.clone(),
            CONNECT_TIMEOUT,
            self.local_ip,
        )?;
        channels.insert(target, (addr.to_string(), channel.clone()));
        Ok(channel)
    }
}

/// The election-control RPCs this crate adds to openraft's (see [`crate::election`]).
#[derive(Debug, Clone, Copy)]
enum ControlRpc {
    PreVote,
    TimeoutNow,
    Forward,
    Cosign,
}

impl Network {
    /// Asks `target` for a pre-vote.
    pub(crate) async fn pre_vote(
        &self,
        target: u64,
        node: &NodeAddr,
        request: &PreVoteRequest,
    ) -> Result<PreVoteResponse, String> {
        self.control(ControlRpc::PreVote, target, node, request)
            .await
    }

    /// Tells `target` to campaign now (leadership transfer).
    pub(crate) async fn timeout_now(
        &self,
        target: u64,
        node: &NodeAddr,
        request: &TimeoutNowRequest,
    ) -> Result<TimeoutNowResponse, String> {
        self.control(ControlRpc::TimeoutNow, target, node, request)
            .await
    }

    /// Hands a client request this follower admitted to the leader `target`.
    pub(crate) async fn forward(
        &self,
        target: u64,
        node: &NodeAddr,
        request: &crate::forward::ForwardRequest,
    ) -> Result<crate::forward::ForwardAnswer, String> {
        self.control(ControlRpc::Forward, target, node, request)
            .await
    }

    /// Asks voter `target` to cosign an audit checkpoint.
    pub(crate) async fn cosign(
        &self,
        target: u64,
        node: &NodeAddr,
        request: &crate::checkpoints::CosignRequest,
    ) -> Result<crate::checkpoints::CosignResponse, String> {
        self.control(ControlRpc::Cosign, target, node, request)
            .await
    }

    async fn control<Req, Resp>(
        &self,
        rpc: ControlRpc,
        target: u64,
        node: &NodeAddr,
        request: &Req,
    ) -> Result<Resp, String>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
    {
        let channel = self
            .channel(target, &node.raft_addr)
            .map_err(|e| e.to_string())?;
        let data = codec::encode(request, RAFT_MESSAGE_BYTES_MAX).map_err(|e| e.to_string())?;
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
        let message = RaftMessage { data };
        let response = match rpc {
            ControlRpc::PreVote => client.pre_vote(message).await,
            ControlRpc::TimeoutNow => client.timeout_now(message).await,
            ControlRpc::Forward => client.forward(message).await,
            ControlRpc::Cosign => client.cosign(message).await,
        }
        .map_err(|s| s.to_string())?;
        codec::decode(&response.into_inner().data, RAFT_MESSAGE_BYTES_MAX)
            .map_err(|e| e.to_string())
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: u64, node: &NodeAddr) -> Self::Network {
        // An unusable address is not fatal here: every RPC on this connection reports the
        // peer unreachable, and openraft backs off and retries with the next membership.
        let client = self
            .channel(target, &node.raft_addr)
            .map(|channel| {
                RaftClient::new(channel)
                    .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
                    .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            })
            .map_err(|e| e.to_string());
        Connection {
            target,
            client,
            snapshot_backoff: Arc::clone(&self.snapshot_backoff),
            contacts: self.contacts.clone(),
        }
    }
}

/// A connection to one peer.
#[derive(Debug)]
pub struct Connection {
    target: u64,
    client: Result<RaftClient<Channel>, String>,
    snapshot_backoff: Arc<Mutex<SnapshotBackoff>>,
    contacts: Contacts,
}

fn to_rpc_error<E: std::error::Error>(status: tonic::Status) -> RPCError<u64, NodeAddr, E> {
    match status.code() {
        // Transport failures surface as Unavailable/Unknown: back off before retrying.
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
            RPCError::Unreachable(Unreachable::new(&status))
        }
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

fn codec_error<E: std::error::Error>(e: bincode::Error) -> RPCError<u64, NodeAddr, E> {
    RPCError::Network(NetworkError::new(&e))
}

impl Connection {
    fn client(&mut self) -> Result<&mut RaftClient<Channel>, tonic::Status> {
        self.client
            .as_mut()
            .map_err(|e| tonic::Status::unavailable(format!("peer address: {e}")))
    }

    async fn call<Req, Resp, E>(
        &mut self,
        kind: &'static str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, NodeAddr, E>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error,
    {
        let data = codec::encode(req, RAFT_MESSAGE_BYTES_MAX).map_err(codec_error)?;
        let mut request = tonic::Request::new(RaftMessage { data });
        request.set_timeout(option.hard_ttl());
        let client = self.client().map_err(to_rpc_error)?;
        let response = match kind {
            "vote" => client.vote(request).await,
            _ => client.append_entries(request).await,
        }
        .map_err(to_rpc_error)?;
        codec::decode(&response.into_inner().data, RAFT_MESSAGE_BYTES_MAX).map_err(codec_error)
    }
}

impl Connection {
    fn backoff_lock(&self) -> std::sync::MutexGuard<'_, SnapshotBackoff> {
        self.snapshot_backoff
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64>>> {
        let cut_after = trim_to_budget(&mut rpc);
        let response = self.call("append_entries", &rpc, &option).await;
        if response.is_ok() {
            self.contacts.record(self.target);
        }
        match (response, cut_after) {
            // The follower holds what was sent; openraft sends the rest next.
            (Ok(AppendEntriesResponse::Success), Some(last)) => {
                Ok(AppendEntriesResponse::PartialSuccess(Some(last)))
            }
            (other, _) => other,
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64>>> {
        self.call("vote", &rpc, &option).await
    }

    /// Not used: snapshots are streamed whole by [`RaftNetwork::full_snapshot`] below, which
    /// openraft's replication calls instead of the chunked protocol.
    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, NodeAddr, RaftError<u64, InstallSnapshotError>>,
    > {
        Err(RPCError::Network(NetworkError::new(&std::io::Error::other(
            "chunked InstallSnapshot is not part of the Signpost protocol; snapshots are streamed",
        ))))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        let body = snapshot.snapshot.into_inner();
        if body.len() > SNAPSHOT_BYTES_MAX {
            return Err(StreamingError::Network(NetworkError::new(
                &std::io::Error::other(format!("snapshot of {} bytes exceeds limit", body.len())),
            )));
        }
        let header = SnapshotHeader {
            vote: codec::encode(&vote, RAFT_MESSAGE_BYTES_MAX)
                .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?,
            meta: codec::encode(&snapshot.meta, RAFT_MESSAGE_BYTES_MAX)
                .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?,
            total_bytes: body.len() as u64,
        };
        let mut chunks = vec![SnapshotChunk {
            chunk: Some(snapshot_chunk::Chunk::Header(header)),
        }];
        for piece in body.chunks(SNAPSHOT_SEND_CHUNK_BYTES) {
            chunks.push(SnapshotChunk {
                chunk: Some(snapshot_chunk::Chunk::Data(piece.to_vec())),
            });
        }
        let mut request = tonic::Request::new(tokio_stream::iter(chunks));
        request.set_timeout(option.hard_ttl().max(Duration::from_secs(60)));
        let target = self.target;
        let mut client = self
            .client()
            .map_err(|status| StreamingError::Unreachable(Unreachable::new(&status)))?
            .clone();
        let pause = self.backoff_lock().pause(target);
        let send = async move {
            if !pause.is_zero() {
                tracing::info!(
                    target,
                    pause_ms = pause.as_millis() as u64,
                    "snapshot send backs off after failures"
                );
                tokio::time::sleep(pause).await;
            }
            client.install_snapshot(request).await
        };
        let response = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = send => r,
        };
        self.backoff_lock().record(target, response.is_ok());
        let response = response.map_err(|status| {
            tracing::warn!(target, %status, "snapshot transfer failed");
            StreamingError::Unreachable(Unreachable::new(&status))
        })?;
        codec::decode(&response.into_inner().data, RAFT_MESSAGE_BYTES_MAX)
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Entry, EntryPayload};
    use signpost_state::{Command, Request};

    /// An entry whose encoding is a little over `bytes` long.
    fn entry(index: u64, bytes: usize) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Request {
                time_ms: 1,
                caller: "spiffe://t/service/a".into(),
                command: Command::Register {
                    envelope: vec![7; bytes],
                },
            }),
        }
    }

    fn request(entries: Vec<Entry<TypeConfig>>) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries,
        }
    }

    #[test]
    fn an_append_carries_at_most_its_byte_budget_and_reports_where_it_cut() {
        let kib = 1024;
        eprintln!("phase: a range under the budget goes whole");
        let mut small = request((1..=10).map(|i| entry(i, 50 * kib)).collect());
        assert_eq!(trim_to_budget(&mut small), None);
        assert_eq!(small.entries.len(), 10);

        eprintln!("phase: a range over the budget is cut before the entry that would pass it");
        let mut large = request((1..=300).map(|i| entry(i, 200 * kib)).collect());
        let cut = trim_to_budget(&mut large).expect("300 x 200 KiB is over the budget");
        assert_eq!(large.entries.len(), 5, "5 x 200 KiB fit in 1 MiB, 6 do not");
        assert_eq!(cut.index, 5, "the last entry sent is the one reported");
        let sent: u64 = large.entries.iter().map(codec::encoded_len).sum();
        assert!(sent <= APPEND_BYTES_BUDGET, "{sent}");

        eprintln!("phase: one entry larger than the budget still goes, alone");
        let mut huge = request(vec![entry(1, 3 * 1024 * kib), entry(2, 10)]);
        let cut = trim_to_budget(&mut huge).expect("cut after the first");
        assert_eq!((huge.entries.len(), cut.index), (1, 1));

        eprintln!("phase: an empty append (a heartbeat) is untouched");
        let mut heartbeat = request(Vec::new());
        assert_eq!(trim_to_budget(&mut heartbeat), None);
    }

    #[test]
    fn snapshot_sends_to_a_peer_that_keeps_failing_back_off_to_a_cap_and_reset_on_success() {
        let mut backoff = SnapshotBackoff::default();
        assert_eq!(
            backoff.pause(2),
            Duration::ZERO,
            "the first send goes at once"
        );
        let mut pauses = Vec::new();
        for _ in 0..10 {
            backoff.record(2, false);
            pauses.push(backoff.pause(2));
        }
        assert_eq!(pauses[0], SNAPSHOT_RETRY_PAUSE_FIRST);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]), "{pauses:?}");
        assert_eq!(*pauses.last().unwrap(), SNAPSHOT_RETRY_PAUSE_MAX);
        assert_eq!(
            backoff.pause(3),
            Duration::ZERO,
            "other peers are not affected"
        );
        backoff.record(2, true);
        assert_eq!(backoff.pause(2), Duration::ZERO);
    }
}
