//! The `Audit` gRPC service: this node's copy of the audit log, to admins.
//!
//! The log names every caller of every service, so only admins read it. Each call is admitted
//! as a read; a full verification (one pass over every stored record) runs one at a time per
//! node, in a blocking task, so it cannot crowd out apply or the async runtime.

use std::sync::Arc;

use prost::Message;
use signpost_consensus::audit_log::{AuditHead, AuditLog};
use signpost_consensus::Consensus;
use signpost_proto::v1::audit_server::Audit;
use signpost_proto::v1::{
    AuditConsistencyRequest, AuditHead as ProtoHead, AuditHeadRequest, AuditLeaf, AuditProof,
    AuditProveRequest, AuditRecord, AuditRecordsRequest, AuditRecordsResponse, AuditVerifyRequest,
    AuditVerifyResponse,
};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::admission::{Admission, Op};
use crate::authz::Caller;
use crate::error::consensus_status;

/// Records one `Records` call returns at most.
const RECORDS_PER_CALL_MAX: u32 = 1000;
/// Bytes of records one `Records` call returns at most (past the first record).
const RECORDS_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Full verifications running at once on one node.
const VERIFIES_CONCURRENT_MAX: usize = 1;

/// Serves `Audit` from this node's store.
#[derive(Debug, Clone)]
pub struct AuditService {
    consensus: Consensus,
    trust_domain: String,
    admission: Admission,
    verifies: Arc<Semaphore>,
}

impl AuditService {
    /// An audit service over `consensus` whose requests pass `admission`.
    pub fn new(consensus: Consensus, trust_domain: String, admission: Admission) -> Self {
        AuditService {
            consensus,
            trust_domain,
            admission,
            verifies: Arc::new(Semaphore::new(VERIFIES_CONCURRENT_MAX)),
        }
    }

    /// The head as served, with the latest quorum-signed checkpoint.
    fn head(&self, head: &AuditHead) -> ProtoHead {
        ProtoHead {
            tree_size: head.size,
            root_hash: head.root.to_vec(),
            revision: head.revision,
            first_index: head.first_index,
            checkpoint: self
                .consensus
                .checkpoints()
                .latest()
                .map(|c| c.note)
                .unwrap_or_default(),
        }
    }

    fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let caller = Caller::from_request(request, &self.trust_domain)?;
        caller.check_admin("read the audit log")?;
        let _admitted = self.admission.admit(&caller, Op::Read)?;
        Ok(())
    }

    /// Runs a blocking read of the audit log off the async runtime.
    async fn blocking<T, F>(&self, read: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&AuditLog) -> Result<T, signpost_consensus::ConsensusError> + Send + 'static,
    {
        let log = self.consensus.audit().clone();
        tokio::task::spawn_blocking(move || read(&log))
            .await
            .map_err(|e| Status::internal(format!("audit read task: {e}")))?
            .map_err(consensus_status)
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    async fn head(
        &self,
        request: Request<AuditHeadRequest>,
    ) -> Result<Response<ProtoHead>, Status> {
        self.admit(&request)?;
        let current = self.blocking(|log| log.head()).await?;
        Ok(Response::new(self.head(&current)))
    }

    async fn records(
        &self,
        request: Request<AuditRecordsRequest>,
    ) -> Result<Response<AuditRecordsResponse>, Status> {
        self.admit(&request)?;
        let request = request.into_inner();
        let limit = request.limit.clamp(1, RECORDS_PER_CALL_MAX) as usize;
        let from = request.from_index;
        let read = self
            .blocking(move |log| log.records(from, limit, RECORDS_BYTES_MAX))
            .await?;
        let (current, leaves) = (read.head, read.leaves);
        if leaves.is_empty() && from < current.first_index {
            return Err(consensus_status(
                signpost_audit::AuditError::Missing {
                    level: 0,
                    index: from,
                }
                .into(),
            ));
        }
        let leaves = leaves
            .into_iter()
            .map(|(index, leaf)| {
                // A record that does not decode is still served as stored: verification, not
                // this listing, is what judges it.
                let record = AuditRecord::decode(leaf.as_slice()).ok();
                AuditLeaf {
                    index,
                    leaf,
                    record,
                }
            })
            .collect();
        Ok(Response::new(AuditRecordsResponse {
            leaves,
            head: Some(self.head(&current)),
        }))
    }

    async fn verify(
        &self,
        request: Request<AuditVerifyRequest>,
    ) -> Result<Response<AuditVerifyResponse>, Status> {
        self.admit(&request)?;
        let _one = self.verifies.clone().try_acquire_owned().map_err(|_| {
            crate::error::shed(
                "audit_verify",
                "a verification of the audit log is already running on this node",
                1_000,
            )
        })?;
        let result = self.blocking(|log| log.verify()).await?;
        Ok(Response::new(AuditVerifyResponse {
            verified: result.verified,
            head: Some(self.head(&result.head)),
            records_checked: result.checked,
            first_bad_index: result.first_bad,
            problem: result.problem,
        }))
    }

    async fn prove(
        &self,
        request: Request<AuditProveRequest>,
    ) -> Result<Response<AuditProof>, Status> {
        self.admit(&request)?;
        let AuditProveRequest { index, tree_size } = request.into_inner();
        let proved = self
            .blocking(move |log| log.inclusion(index, tree_size))
            .await?;
        Ok(Response::new(AuditProof {
            tree_size: proved.size,
            root_hash: proved.root.to_vec(),
            index,
            leaf: proved.leaf,
            hashes: proved.proof.iter().map(|h| h.to_vec()).collect(),
            ..AuditProof::default()
        }))
    }

    async fn consistency(
        &self,
        request: Request<AuditConsistencyRequest>,
    ) -> Result<Response<AuditProof>, Status> {
        self.admit(&request)?;
        let AuditConsistencyRequest { old_size, new_size } = request.into_inner();
        let proved = self
            .blocking(move |log| log.consistency(old_size, new_size))
            .await?;
        Ok(Response::new(AuditProof {
            tree_size: proved.new_size,
            root_hash: proved.new_root.to_vec(),
            old_size,
            old_root_hash: proved.old_root.to_vec(),
            hashes: proved.proof.iter().map(|h| h.to_vec()).collect(),
            ..AuditProof::default()
        }))
    }
}
