use std::io::Cursor;

use openraft::{Raft, Snapshot, SnapshotMeta, Vote};
use signpost_identity::{Identity, SpiffeId};
use signpost_proto::v1::raft_server::{self, RaftServer};
use signpost_proto::v1::{snapshot_chunk, RaftMessage, SnapshotChunk};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::codec::{self, RAFT_MESSAGE_BYTES_MAX, SNAPSHOT_BYTES_MAX, SNAPSHOT_CHUNK_BYTES_MAX};
use crate::type_config::{NodeAddr, TypeConfig};

/// The node-only `Raft` gRPC service. Mounted on the Raft listener, never on the client one.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft<TypeConfig>,
    trust_domain: String,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl RaftService {
    /// The service for `raft`, accepting only node identities of `trust_domain`.
    pub fn new(raft: Raft<TypeConfig>, trust_domain: String) -> RaftService {
        RaftService { raft, trust_domain }
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
        let peer: SpiffeId = signpost_identity::peer_identity(request)?;
        match (&peer.identity, peer.trust_domain == self.trust_domain) {
            (Identity::Node(id), true) => Ok(*id),
            _ => Err(Status::permission_denied(format!(
                "rule raft.node-only: {peer} is not a node of trust domain {}",
                self.trust_domain
            ))),
        }
    }
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
        self.authorize(&request)?;
        let rpc = decode(&request.into_inner().data, "AppendEntries")?;
        let response = self
            .raft
            .append_entries(rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        encode(&response)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.authorize(&request)?;
        let rpc = decode(&request.into_inner().data, "Vote")?;
        let response = self
            .raft
            .vote(rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
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
        let meta: SnapshotMeta<u64, NodeAddr> = decode(&header.meta, "snapshot meta")?;
        let mut body = Vec::with_capacity(total);
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
        encode(&response)
    }
}
