//! The `Registry` gRPC service: the path of a write is authorize → admit → pre-check → propose
//! → map the apply outcome. Reads are authorize → (read index) → serve from local state.

use prost::Message;
use sha2::Digest;
use signpost_consensus::audit_log::{EvidenceRequest, ProofTarget, RecordProof};
use signpost_consensus::Consensus;
use signpost_proto::v1::registry_server::Registry;
use signpost_proto::v1::{
    AuditEvidence, AuditEvidenceRequest, BindRequest, DeregisterRequest, Envelope,
    KeepAliveRequest, KeepAliveResponse, ListRequest, ListResponse, MultiEnvelope, RecordInclusion,
    RegisterRequest, ResolveRequest, ResolveResponse, RotateAdminsRequest, ServiceRecords,
    StateProof, WatchEvent, WatchRequest, WriteResponse,
};
use signpost_record::{self as record, Reason};
use signpost_state::{Command, Outcome, Request as LogRequest, ServiceView};
use tonic::{Request, Response, Status, Streaming};

use crate::admission::{Admission, Op, StreamKind, WriteClass};
use crate::authz::Caller;
use crate::error::{consensus_status, refusal};
use crate::lease_keeper::{LeaseKeeper, Renewal};
use crate::watch_hub::{WatchFilter, WatchHub};

/// Shared handles of the client-facing services.
#[derive(Debug, Clone)]
pub struct RegistryService {
    consensus: Consensus,
    trust_domain: String,
    admission: Admission,
    leases: LeaseKeeper,
    watch_hub: WatchHub,
}

impl RegistryService {
    /// A service over `consensus` whose requests pass `admission` before any work.
    pub fn new(
        consensus: Consensus,
        trust_domain: String,
        admission: Admission,
        leases: LeaseKeeper,
        watch_hub: WatchHub,
    ) -> Self {
        RegistryService {
            consensus,
            trust_domain,
            admission,
            leases,
            watch_hub,
        }
    }

    fn not_leader(&self) -> Status {
        consensus_status(signpost_consensus::ConsensusError::NotLeader {
            leader: self.consensus.leader(),
        })
    }

    fn is_leader(&self) -> bool {
        self.consensus.leader().map(|(id, _)| id) == Some(self.consensus.node_id())
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        Caller::from_request(request, &self.trust_domain)
    }

    /// Proposes a command after admission. Shedding is immediate: a full pipeline answers
    /// RESOURCE_EXHAUSTED with a retry hint instead of queueing without bound.
    async fn propose(
        &self,
        caller: &Caller,
        class: WriteClass,
        command: Command,
    ) -> Result<Response<WriteResponse>, Status> {
        let permit = self.admission.proposal(class)?;
        let request = LogRequest {
            time_ms: 0, // stamped by Consensus::propose
            caller: caller.uri(),
            command,
        };
        // The entry is in the log once proposed, whether or not the client waits for it: the
        // slot is held by the proposal itself until its outcome, so clients that give up (or
        // time out on purpose) cannot have more proposals in flight than the limit.
        let consensus = self.consensus.clone();
        let proposal = tokio::spawn(async move {
            let _slot = permit;
            consensus.propose(request).await
        });
        let (_, outcome) = proposal
            .await
            .map_err(|e| Status::internal(format!("proposal task: {e}")))?
            .map_err(consensus_status)?;
        match outcome {
            Outcome::Applied { revision } => {
                metrics::counter!(crate::observe::WRITES_TOTAL, "result" => "applied").increment(1);
                Ok(Response::new(WriteResponse { revision }))
            }
            // Counted at the edge, with the refusals decided before the log.
            Outcome::Rejected { reason, detail } => Err(refusal(reason, &detail)),
        }
    }

    /// On the leader, refuses before the log what apply would refuse for certain: a key the
    /// service's binding does not hold, a sequence not above the last one accepted. The leader
    /// has applied every write it acknowledged, so an honest client is never refused here for a
    /// write it just made; a follower (whose state may lag) leaves the checks to apply.
    fn precheck_against_state(&self, verified: &record::VerifiedRecord) -> Result<(), Status> {
        if !self.is_leader() {
            return Ok(());
        }
        let p = &verified.payload;
        let state = self.consensus.state();
        let refusal_now = match state.registry.binding(&p.service) {
            None => Some((
                Reason::NoBinding,
                format!("no binding for service {}", p.service),
            )),
            Some(binding) if !binding.keys.contains(&verified.key) => Some((
                Reason::UnboundKey,
                format!(
                    "key {} is not bound to {}",
                    hex::encode(verified.key),
                    p.service
                ),
            )),
            Some(_) => None,
        };
        if let Some((reason, detail)) = refusal_now {
            // A binding committed but not yet applied here (a leader just elected) could still
            // bind the key; refuse early only when this node has applied all it knows.
            drop(state);
            let status = self.consensus.status();
            if status.applied_index >= status.commit_index {
                return Err(refusal(reason, &detail));
            }
            return Ok(());
        }
        if let Some(last) = state.registry.last_sequence(&p.service, &p.instance) {
            if p.sequence <= last {
                return Err(refusal(
                    Reason::StaleSequence,
                    &format!(
                        "sequence {} of {}/{} is not above {last}",
                        p.sequence, p.service, p.instance
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The priority of a write (see `admission`): admins first, then renewals of instances
    /// that exist and deregistrations, then new registrations.
    fn write_class(&self, caller: &Caller, existing: Option<(&str, &str)>) -> WriteClass {
        if caller.is_admin() {
            return WriteClass::Admin;
        }
        match existing {
            None => WriteClass::Maintain,
            Some((service, instance)) => {
                let state = self.consensus.state();
                match state.registry.instance(service, instance) {
                    Some(_) => WriteClass::Maintain,
                    None => WriteClass::New,
                }
            }
        }
    }

    /// Linearizable reads go through the leader's read index; stale reads are local.
    async fn read_revision(&self, stale: bool) -> Result<u64, Status> {
        if stale {
            return Ok(self.consensus.state().revision());
        }
        self.consensus
            .read_barrier()
            .await
            .map_err(consensus_status)
    }

    /// The audit evidence `ask` asks for (`None` unless it does) of an answer read from the
    /// tree `tree` (its frontier, read with the state served): the checkpoint (read before that
    /// state, so never larger than the tree), consistency proofs to the tree, the tree's last
    /// record (whose state root the services' state proofs lead to) and an inclusion proof of
    /// each served record, filled into `services`. Blocking reads run off the async workers.
    async fn evidence(
        &self,
        ask: Option<&AuditEvidenceRequest>,
        checkpoint: Option<signpost_audit::SignedCheckpoint>,
        tree: signpost_audit::Frontier,
        checkpoint_binding: Option<Vec<u8>>,
        views: &[ServiceView],
        services: &mut [ServiceRecords],
    ) -> Result<Option<AuditEvidence>, Status> {
        let Some(ask) = ask.filter(|a| a.prove) else {
            return Ok(None);
        };
        let targets: Vec<ProofTarget> = views
            .iter()
            .flat_map(|view| {
                view.instances
                    .iter()
                    .zip(&view.revisions)
                    .map(|(instance, &revision)| ProofTarget {
                        revision,
                        service: view.service.clone(),
                        instance: instance.clone(),
                        envelope_sha256: None,
                    })
            })
            .collect();
        let (evidence, proofs) = prove_records(
            &self.consensus,
            ask,
            checkpoint,
            tree,
            checkpoint_binding,
            targets,
        )
        .await?;
        let mut proofs = proofs.into_iter();
        for service in services.iter_mut() {
            service.inclusions = service
                .records
                .iter()
                .map(|_| inclusion(proofs.next().flatten()))
                .collect();
        }
        Ok(Some(evidence))
    }

    /// `read` of the registry, with the revision and audit tree it was read at, and (when the
    /// answer is to be proven) the checkpoint binding, all under one lock.
    fn read_at<T>(
        &self,
        prove: bool,
        read: impl FnOnce(&signpost_state::Registry) -> T,
    ) -> ReadAt<T> {
        let state = self.consensus.state();
        ReadAt {
            answer: read(&state.registry),
            revision: state.revision(),
            tree: state.audit.clone(),
            checkpoint_binding: prove
                .then(|| {
                    state
                        .registry
                        .resolve(signpost_audit::CHECKPOINT_SERVICE)
                        .map(|view| view.binding)
                        .filter(|binding| !binding.is_empty())
                })
                .flatten(),
        }
    }

    fn admin_chain(&self) -> Result<Vec<MultiEnvelope>, Status> {
        let chain = self.consensus.state().registry.admin_chain();
        chain
            .iter()
            .map(|bytes| {
                MultiEnvelope::decode(bytes.as_slice())
                    .map_err(|e| Status::internal(format!("stored admin chain is corrupt: {e}")))
            })
            .collect()
    }
}

/// A record's proof as served (empty where the node has none).
fn inclusion(proof: Option<RecordProof>) -> RecordInclusion {
    proof
        .map(|p| RecordInclusion {
            index: p.index,
            leaf: p.leaf,
            hashes: p.proof.iter().map(|h| h.to_vec()).collect(),
        })
        .unwrap_or_default()
}

/// The evidence of an answer read from `tree` (see [`RegistryService::evidence`]) and the
/// proofs of `targets`' records in it, in order.
async fn prove_records(
    consensus: &Consensus,
    ask: &AuditEvidenceRequest,
    checkpoint: Option<signpost_audit::SignedCheckpoint>,
    tree: signpost_audit::Frontier,
    checkpoint_binding: Option<Vec<u8>>,
    targets: Vec<ProofTarget>,
) -> Result<(AuditEvidence, Vec<Option<RecordProof>>), Status> {
    let checkpoint_size = checkpoint.as_ref().map_or(0, |c| c.checkpoint.size);
    let (tree_size, root) = (tree.size(), tree.root());
    let request = EvidenceRequest {
        tree,
        extends: [checkpoint_size, ask.trusted_size, ask.accepted_size],
    };
    let audit = consensus.audit().clone();
    audit
        .stored(tree_size, EVIDENCE_STORED_WAIT)
        .await
        .map_err(consensus_status)?;
    let evidence = match audit.cached_evidence(&request, &targets) {
        Some(evidence) => evidence,
        None => tokio::task::spawn_blocking(move || audit.evidence(&request, &targets))
            .await
            .map_err(|e| Status::unavailable(format!("audit evidence task: {e}")))?
            .map_err(consensus_status)?,
    };
    let hashes = |proof: &Vec<signpost_audit::Hash>| -> Vec<Vec<u8>> {
        proof.iter().map(|h| h.to_vec()).collect()
    };
    let [from_checkpoint, from_trusted, from_accepted] = &evidence.consistency;
    let head = evidence.head.unwrap_or_default();
    let served = AuditEvidence {
        checkpoint: checkpoint.map(|c| c.note).unwrap_or_default(),
        checkpoint_binding: checkpoint_binding
            .map(|b| {
                Envelope::decode(b.as_slice())
                    .map_err(|e| Status::internal(format!("stored binding is corrupt: {e}")))
            })
            .transpose()?,
        tree_size,
        root_hash: root.to_vec(),
        checkpoint_consistency: hashes(from_checkpoint),
        trusted_consistency: hashes(from_trusted),
        accepted_consistency: hashes(from_accepted),
        head_leaf: head.leaf,
        head_inclusion: hashes(&head.proof),
    };
    Ok((served, evidence.inclusions))
}

/// The node's tree now and the checkpoint binding, read together.
fn current_tree(consensus: &Consensus) -> (signpost_audit::Frontier, Option<Vec<u8>>) {
    let state = consensus.state();
    let binding = state
        .registry
        .resolve(signpost_audit::CHECKPOINT_SERVICE)
        .map(|view| view.binding)
        .filter(|binding| !binding.is_empty());
    (state.audit.clone(), binding)
}

/// A watch event with its evidence, for a stream that asked: a put's record proven in the
/// node's tree as it sends it (which holds the record: events go out after their batch is
/// stored). Deletes carry none.
async fn prove_event(
    consensus: &Consensus,
    ask: &AuditEvidenceRequest,
    mut event: WatchEvent,
) -> Result<WatchEvent, Status> {
    if event.kind != signpost_proto::v1::watch_event::Kind::Put as i32 {
        return Ok(event);
    }
    let checkpoint = consensus.checkpoints().latest();
    let (tree, binding) = current_tree(consensus);
    // Exactly this put's record: one entry can register an instance twice, and each put is
    // its own event.
    let envelope_sha256 = event.record.as_ref().map(|record| {
        let digest: signpost_audit::Hash = sha2::Sha256::digest(record.encode_to_vec()).into();
        digest
    });
    let target = ProofTarget {
        revision: event.revision,
        service: event.service.clone(),
        instance: event.instance.clone(),
        envelope_sha256,
    };
    let (evidence, proofs) =
        prove_records(consensus, ask, checkpoint, tree, binding, vec![target]).await?;
    event.audit = Some(evidence);
    event.inclusion = Some(inclusion(proofs.into_iter().next().flatten()));
    Ok(event)
}

/// Most bytes of a NOT_FOUND's status details (before base64): they travel in the trailers,
/// whose size clients bound (`signpost_identity::HTTP2_MAX_HEADER_LIST_BYTES`).
const ABSENCE_DETAILS_BYTES_MAX: usize = 32 * 1024;

/// The encoded proof of absence; without the admin chain when that would pass
/// [`ABSENCE_DETAILS_BYTES_MAX`] (only a long chain can: the evidence is a few KiB). A client
/// then checks the checkpoint binding against the admin sets it already verified.
fn absence_details(mut details: ResolveResponse) -> Vec<u8> {
    if details.encoded_len() > ABSENCE_DETAILS_BYTES_MAX {
        details.admin_chain.clear();
    }
    details.encode_to_vec()
}

/// Longest an answer waits for the audit tree it was read from to be written (apply writes its
/// batch right after moving the state; milliseconds).
const EVIDENCE_STORED_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Replies buffered per keep-alive stream; a client that stops reading stalls only itself.
const KEEP_ALIVE_BUFFER: usize = 64;
/// Services in a List page when the request does not say.
const LIST_PAGE_SERVICES_DEFAULT: usize = 100;
/// Most services in one List page.
const LIST_PAGE_SERVICES_MAX: usize = 1_000;
/// Envelope bytes after which a List page ends (after its first service), so every page fits
/// the 64 MiB response limit whatever the registry holds.
const LIST_PAGE_BYTES_MAX: usize = 4 * 1024 * 1024;

fn required(envelope: Option<Envelope>) -> Result<Envelope, Status> {
    envelope.ok_or_else(|| refusal(Reason::Malformed, "the request carries no envelope"))
}

fn precheck<T>(result: Result<T, record::RecordError>) -> Result<T, Status> {
    result.map_err(|e| refusal(e.reason(), &e.to_string()))
}

fn service_records(view: &ServiceView) -> Result<ServiceRecords, Status> {
    let corrupt =
        |e: prost::DecodeError| Status::internal(format!("stored record is corrupt: {e}"));
    let binding = if view.binding.is_empty() {
        None
    } else {
        Some(Envelope::decode(view.binding.as_slice()).map_err(corrupt)?)
    };
    let records = view
        .records
        .iter()
        .map(|r| Envelope::decode(r.as_slice()).map_err(corrupt))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ServiceRecords {
        service: view.service.clone(),
        binding,
        records,
        inclusions: Vec::new(),
        state: None,
    })
}

/// The wire form of a service's path in the state commitment. The entry ending the path is
/// sent only when it is another service's (an absence): a present service's the client rebuilds
/// from what it was served.
fn state_proof(service: &str, proof: signpost_audit::StateProof) -> StateProof {
    let own = signpost_audit::name_key(service);
    let (other_key, other_value) = match proof.leaf {
        Some((key, value)) if key != own => (key.to_vec(), value.to_vec()),
        _ => (Vec::new(), Vec::new()),
    };
    StateProof {
        siblings: proof.siblings.iter().map(|h| h.to_vec()).collect(),
        other_key,
        other_value,
    }
}

/// What one read takes from the state in one go, so the evidence proves the tree the answer
/// was read from.
struct ReadAt<T> {
    answer: T,
    revision: u64,
    tree: signpost_audit::Frontier,
    checkpoint_binding: Option<Vec<u8>>,
}

type EventStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchEvent, Status>> + Send + 'static>>;
type KeepAliveStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<KeepAliveResponse, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let caller = self.caller(&request)?;
        let _admitted = self.admission.admit(&caller, Op::Write)?;
        let envelope = required(request.into_inner().envelope)?;
        // Cheap rejection before the log: garbage never costs a Raft round. A success is
        // remembered, so this node's apply of the same bytes does not verify them again.
        let verified = precheck(record::open_record_with(
            &envelope,
            record::SignatureCheck::Remember(self.consensus.verified_signatures()),
        ))?;
        caller.check_register(&verified.payload.service)?;
        self.precheck_against_state(&verified)?;
        let p = &verified.payload;
        let class = self.write_class(&caller, Some((&p.service, &p.instance)));
        self.propose(
            &caller,
            class,
            Command::Register {
                envelope: envelope.encode_to_vec(),
            },
        )
        .await
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let caller = self.caller(&request)?;
        let _admitted = self.admission.admit(&caller, Op::Write)?;
        let envelope = required(request.into_inner().envelope)?;
        let verified = precheck(record::open_deregister_with(
            &envelope,
            record::SignatureCheck::Remember(self.consensus.verified_signatures()),
        ))?;
        caller.check_deregister(&verified.payload.service)?;
        self.propose(
            &caller,
            self.write_class(&caller, None),
            Command::Deregister {
                envelope: envelope.encode_to_vec(),
            },
        )
        .await
    }

    async fn bind(&self, request: Request<BindRequest>) -> Result<Response<WriteResponse>, Status> {
        let caller = self.caller(&request)?;
        let _admitted = self.admission.admit(&caller, Op::Write)?;
        caller.check_admin("change bindings")?;
        let envelope = required(request.into_inner().envelope)?;
        precheck(record::open_binding(&envelope))?;
        self.propose(
            &caller,
            WriteClass::Admin,
            Command::Bind {
                envelope: envelope.encode_to_vec(),
            },
        )
        .await
    }

    async fn rotate_admins(
        &self,
        request: Request<RotateAdminsRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let caller = self.caller(&request)?;
        let _admitted = self.admission.admit(&caller, Op::Write)?;
        caller.check_admin("change the admin set")?;
        let request = request.into_inner();
        let envelope = request
            .envelope
            .ok_or_else(|| refusal(Reason::Malformed, "the request carries no envelope"))?;
        // Garbage never costs a Raft round: every re-signed binding must at least open.
        for rebind in &request.rebinds {
            precheck(record::open_binding(rebind))?;
        }
        self.propose(
            &caller,
            WriteClass::Admin,
            Command::RotateAdmins {
                envelope: envelope.encode_to_vec(),
                rebinds: request.rebinds.iter().map(Message::encode_to_vec).collect(),
            },
        )
        .await
    }

    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let caller = self.caller(&request)?;
        let _admitted = self.admission.admit(&caller, Op::Read)?;
        caller.check_read()?;
        let request = request.into_inner();
        precheck(record::validate_service_name(&request.service))?;
        let barrier = self.read_revision(request.stale).await?;
        let checkpoint = self.consensus.checkpoints().latest();
        let prove = request.audit.as_ref().is_some_and(|a| a.prove);
        let read = self.read_at(prove, |registry| {
            let proof = prove.then(|| registry.state_proof(&request.service));
            (registry.resolve(&request.service), proof)
        });
        debug_assert!(read.revision >= barrier || request.stale);
        let (view, proof) = read.answer;
        let not_found = || {
            refusal(
                Reason::NotFound,
                &format!("service {} is not registered", request.service),
            )
        };
        if view.is_none() && !prove {
            return Err(not_found());
        }
        let mut services = [match &view {
            Some(view) => service_records(view)?,
            None => ServiceRecords {
                service: request.service.clone(),
                ..ServiceRecords::default()
            },
        }];
        services[0].state = proof.map(|p| state_proof(&request.service, p));
        let audit = self
            .evidence(
                request.audit.as_ref(),
                checkpoint,
                read.tree,
                read.checkpoint_binding,
                view.as_slice(),
                &mut services,
            )
            .await?;
        let [service] = services;
        let answer = ResolveResponse {
            service: Some(service),
            revision: read.revision,
            admin_chain: self.admin_chain()?,
            audit,
        };
        if view.is_none() {
            // The proof of absence rides in the status details, so NOT_FOUND stays NOT_FOUND
            // for every client while a verifying one can check it.
            let absent = not_found();
            return Err(Status::with_details_and_metadata(
                absent.code(),
                absent.message(),
                absence_details(answer).into(),
                absent.metadata().clone(),
            ));
        }
        Ok(Response::new(answer))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let caller = self.caller(&request)?;
        let _admitted = self.admission.admit(&caller, Op::Read)?;
        caller.check_read()?;
        let request = request.into_inner();
        let limit = match request.limit {
            0 => LIST_PAGE_SERVICES_DEFAULT,
            n => (n as usize).min(LIST_PAGE_SERVICES_MAX),
        };
        if !request.page_token.is_empty() {
            precheck(record::validate_service_name(&request.page_token))?;
        }
        // Charged before the work, for the most the page can hold: the caller pays for what
        // it asked for whether or not the registry is that big.
        self.admission.charge_reads(
            &caller.uri(),
            (limit / crate::admission::LIST_SERVICES_PER_TOKEN) as f64,
        );
        self.read_revision(request.stale).await?;
        let checkpoint = self.consensus.checkpoints().latest();
        let prove = request.audit.as_ref().is_some_and(|a| a.prove);
        let read = self.read_at(prove, |registry| {
            let (views, next) = registry.list_page(
                &request.page_token,
                request.all_bound,
                limit,
                LIST_PAGE_BYTES_MAX,
            );
            let proofs: Vec<_> = if prove {
                views
                    .iter()
                    .map(|view| registry.state_proof(&view.service))
                    .collect()
            } else {
                Vec::new()
            };
            (views, next, proofs)
        });
        let (views, next, proofs) = read.answer;
        let records: usize = views.iter().map(|v| v.records.len()).sum();
        self.admission.charge_answer(&caller, records);
        let mut services = views
            .iter()
            .map(service_records)
            .collect::<Result<Vec<_>, _>>()?;
        for (service, proof) in services.iter_mut().zip(proofs) {
            service.state = Some(state_proof(&service.service, proof));
        }
        let audit = self
            .evidence(
                request.audit.as_ref(),
                checkpoint,
                read.tree,
                read.checkpoint_binding,
                &views,
                &mut services,
            )
            .await?;
        Ok(Response::new(ListResponse {
            services,
            revision: read.revision,
            admin_chain: self.admin_chain()?,
            next_page_token: next.unwrap_or_default(),
            audit,
        }))
    }

    type KeepAliveStream = KeepAliveStream;

    async fn keep_alive(
        &self,
        request: Request<Streaming<KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let caller = self.caller(&request)?;
        // Leases live on the leader; a client connected elsewhere is told where to go.
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let permit = self.admission.open_stream(&caller, StreamKind::KeepAlive)?;
        let mut incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(KEEP_ALIVE_BUFFER);
        let leases = self.leases.clone();
        let not_leader = self.not_leader();
        let admission = self.admission.clone();
        let identity = caller.uri();
        tokio::spawn(async move {
            // The stream's admission slot is given back when this task ends.
            let _permit = permit;
            loop {
                let message = match incoming.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => return,
                    Err(status) => {
                        tracing::debug!(%status, "keep-alive stream ended");
                        return;
                    }
                };
                // Metered by backpressure: a caller past its read rate is not read from until
                // its debt is repaid, and HTTP/2 flow control then slows its sender.
                let pause = admission.charge_reads(
                    &identity,
                    1.0 / crate::admission::KEEPALIVES_PER_TOKEN as f64,
                );
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                let reply = match caller.check_register(&message.service) {
                    Err(status) => Err(status),
                    Ok(()) => match leases.renew(&message.service, &message.instance) {
                        Renewal::Renewed(ttl_secs) => Ok(KeepAliveResponse {
                            service: message.service,
                            instance: message.instance,
                            ttl_secs,
                        }),
                        Renewal::Unknown => Ok(KeepAliveResponse {
                            service: message.service,
                            instance: message.instance,
                            ttl_secs: 0,
                        }),
                        Renewal::NotLeader => Err(not_leader.clone()),
                    },
                };
                let stop = reply.is_err();
                if tx.send(reply).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.caller(&request)?;
        let permit = self.admission.open_stream(&caller, StreamKind::Watch)?;
        caller.check_read()?;
        let request = request.into_inner();
        if request.prefix {
            if request.service.len() > record::SERVICE_NAME_BYTES_MAX {
                return Err(refusal(Reason::InvalidName, "watch prefix is too long"));
            }
        } else {
            precheck(record::validate_service_name(&request.service))?;
        }
        let filter = WatchFilter {
            service: request.service,
            prefix: request.prefix,
        };
        let admission = self.admission.clone();
        let identity = caller.uri();
        let pace: crate::watch_hub::Pacer = Box::new(move |events| {
            admission.charge_reads(
                &identity,
                events as f64 / crate::admission::WATCH_EVENTS_PER_TOKEN as f64,
            )
        });
        let stream = self.watch_hub.watch(filter, request.from_revision, pace)?;
        // The permit lives inside the stream, so the watcher's slot is given back when tonic
        // drops the stream (client gone or watcher cancelled).
        let stream = futures::StreamExt::map(stream, move |event| {
            let _held = &permit;
            event
        });
        let Some(ask) = request.audit.filter(|a| a.prove) else {
            return Ok(Response::new(Box::pin(stream)));
        };
        // One event at a time per stream: proofs are made as the watcher reads, so a slow
        // watcher slows only its own stream.
        let consensus = self.consensus.clone();
        let stream = futures::StreamExt::then(stream, move |event| {
            let consensus = consensus.clone();
            async move { prove_event(&consensus, &ask, event?).await }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_of_absence_leaves_out_an_admin_chain_too_long_for_the_trailers() {
        let rotation = |bytes: usize| MultiEnvelope {
            payload: vec![7; bytes],
            ..MultiEnvelope::default()
        };
        let answer = |chain: Vec<MultiEnvelope>| ResolveResponse {
            service: Some(ServiceRecords {
                service: "ghost".into(),
                ..ServiceRecords::default()
            }),
            revision: 9,
            admin_chain: chain,
            audit: Some(AuditEvidence {
                checkpoint: vec![1; 500],
                ..AuditEvidence::default()
            }),
        };
        // A short chain stays: the client verifies the checkpoint binding from it.
        let kept = absence_details(answer(vec![rotation(2_000); 3]));
        let decoded = ResolveResponse::decode(kept.as_slice()).unwrap();
        assert_eq!(decoded.admin_chain.len(), 3);
        // One past the budget goes, the proof stays.
        let long = answer(vec![rotation(2_000); 17]);
        assert!(long.encoded_len() > ABSENCE_DETAILS_BYTES_MAX);
        let cut = absence_details(long);
        assert!(cut.len() <= ABSENCE_DETAILS_BYTES_MAX);
        let decoded = ResolveResponse::decode(cut.as_slice()).unwrap();
        assert!(decoded.admin_chain.is_empty());
        assert_eq!(decoded.audit.unwrap().checkpoint.len(), 500);
        assert_eq!(decoded.service.unwrap().service, "ghost");
    }
}
