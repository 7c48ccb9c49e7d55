use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;
use signpost_identity::{PeerRule, SpiffeId, TlsFiles, TlsSettings, Trust};
use signpost_proto::v1::audit_client::AuditClient;
use signpost_proto::v1::cluster_client::ClusterClient;
use signpost_proto::v1::registry_client::RegistryClient;
use signpost_proto::v1::{
    AddMemberRequest, AdminSetPayload, BackupRequest, BindRequest, BindingPayload,
    DeregisterRequest, Envelope, KeepAliveRequest, ListRequest, ListResponse, MembershipResponse,
    MultiEnvelope, RecordInclusion, RegisterRequest, RemoveMemberRequest, ResolveRequest,
    ResolveResponse, RotateAdminsRequest, ServiceRecords, SnapshotRequest, StatusRequest,
    StatusResponse, TransferLeaderRequest, WatchEvent, WatchRequest,
};
use signpost_record::{AdminSet, VerifiedRecord};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::audit_trust::{Asked, AuditTrust, Checked};
use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::watcher::Watcher;
use crate::{LEADER_METADATA, RETRY_AFTER_METADATA};

/// A call retries until its deadline (`deadline_ms`, long enough to span a leader election);
/// this bounds the attempts as well, whatever the pauses.
const ATTEMPTS_MAX: u32 = 1_000;
const BACKOFF_START: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// Longest pause a server's `retry-after-ms` hint can impose on one attempt.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(5);
/// Largest response the client decodes (a List page of a big registry).
const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most pages one List reads: far above a registry at its service quota, so a node that never
/// ends the listing cannot hold the client forever.
const LIST_PAGES_MAX: usize = 100_000;

/// The verified instances of one service.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Service name.
    pub service: String,
    /// Instances whose records verified end to end, ordered by instance id.
    pub instances: Vec<VerifiedRecord>,
    /// The raw envelopes of those instances, in the same order.
    pub envelopes: Vec<Envelope>,
    /// The revision the answer reflects.
    pub revision: u64,
    /// The binding the records were verified against (itself verified to the admin chain).
    pub binding: signpost_record::Binding,
    /// The signed binding, as served.
    pub binding_envelope: Envelope,
    /// The audit tree the answer was read from (size, root), when the client asked for
    /// evidence (`[audit] verify`) and the node served it.
    pub audit_tree: Option<(u64, signpost_audit::Hash)>,
    /// With `audit_tree`: each instance's audit leaf and inclusion proof in that tree, in the
    /// order of `instances` (an empty leaf where the node could not prove one; such an answer
    /// is only accepted while the client demands no checkpoint).
    pub inclusions: Vec<signpost_proto::v1::RecordInclusion>,
}

/// One record per instance, the one with the highest sequence, ordered by instance id: an
/// honest node never serves two, and a node that serves a superseded record beside the
/// current one must not make the client see both.
fn newest_per_instance(
    served: Vec<(VerifiedRecord, Envelope, RecordInclusion)>,
) -> Vec<(VerifiedRecord, Envelope, RecordInclusion)> {
    let mut newest: std::collections::BTreeMap<
        String,
        (VerifiedRecord, Envelope, RecordInclusion),
    > = std::collections::BTreeMap::new();
    for (record, envelope, inclusion) in served {
        let keep = newest
            .get(&record.payload.instance)
            .is_none_or(|(kept, _, _)| record.payload.sequence > kept.payload.sequence);
        if keep {
            newest.insert(
                record.payload.instance.clone(),
                (record, envelope, inclusion),
            );
        }
    }
    newest.into_values().collect()
}

/// The answer to [`Client::list`].
#[derive(Debug, Clone)]
pub struct Listed {
    /// Services whose answer verified end to end, ordered by name.
    pub services: Vec<Resolved>,
    /// Services left out because their answer did not verify, with the reason.
    pub unverified: Vec<(String, String)>,
    /// The revision the answer reflects.
    pub revision: u64,
}

/// A client of a Signpost cluster. Cheap to share behind an `Arc`; channels are reused.
#[derive(Debug)]
pub struct Client {
    endpoints: Vec<String>,
    files: TlsFiles,
    trust: Trust,
    tls: Arc<rustls::ClientConfig>,
    channels: Mutex<HashMap<String, Channel>>,
    // The node to try first: the last known leader, or the last node that answered.
    preferred: Mutex<Option<String>>,
    genesis: AdminSet,
    /// One attempt.
    timeout: Duration,
    /// A whole call, retries included.
    deadline: Duration,
    source_ip: Option<std::net::IpAddr>,
    floors: Mutex<crate::floors::Floors>,
    /// The highest revision of a write acknowledgement or a linearizable answer: a later
    /// linearizable answer at a lower revision comes from a node that is behind or lying.
    revision_floor: AtomicU64,
    /// Every admin set of the longest admin chain verified so far, genesis first.
    admin_sets: Mutex<Vec<AdminSet>>,
    /// The audit log as this client has verified it; `None` when `[audit] verify` is off.
    audit: Option<Mutex<AuditTrust>>,
    /// The origin the cluster's checkpoints name, from the pinned genesis.
    origin: String,
}

/// The pause before retry `attempt` (0-based): exponential with "equal jitter" (half fixed,
/// half random), so clients that failed together do not retry together.
fn backoff(attempt: u32) -> Duration {
    use rand::Rng;
    let ceiling = BACKOFF_START
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    let half = ceiling / 2;
    half + rand::thread_rng().gen_range(Duration::ZERO..=half)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

enum Next {
    /// Retry at once against this address (the leader).
    Redirect(String),
    /// Retry after a pause, against another node.
    Backoff(Option<Duration>),
    /// Retry after a pause, against the same node (shed).
    Wait(Duration),
    /// Give up with this error.
    Fail,
}

fn classify(status: &tonic::Status) -> Next {
    let retry_after = status
        .metadata()
        .get(RETRY_AFTER_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    match status.code() {
        Code::FailedPrecondition => match status
            .metadata()
            .get(LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
        {
            Some(leader) => Next::Redirect(leader.to_string()),
            None => Next::Fail,
        },
        Code::ResourceExhausted if retry_after.is_some() => {
            Next::Wait(retry_after.unwrap_or(BACKOFF_START))
        }
        // Transport failures (connection refused, reset, TLS) arrive as Unavailable/Unknown.
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled => {
            Next::Backoff(retry_after)
        }
        _ => Next::Fail,
    }
}

impl Client {
    /// A client for the cluster in `config`. Connections are made lazily.
    pub fn connect(config: &ClientConfig) -> Result<Client, ClientError> {
        let files = TlsFiles {
            ca: config.tls.ca.clone(),
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
            crl: config.tls.crl.clone(),
        };
        let trust = Trust::from_files(&files)?;
        let tls = signpost_identity::client_config(
            &files,
            &trust,
            &TlsSettings::default(),
            PeerRule::AnyNode,
        )?;
        let mut keys = Vec::new();
        for k in &config.trust.admin_keys {
            keys.push(
                signpost_record::parse_public_key_hex(k)
                    .map_err(|e| ClientError::Config(format!("trust.admin_keys: {e}")))?
                    .to_bytes(),
            );
        }
        let genesis = AdminSet::new(
            &keys,
            config.trust.admin_threshold,
            AdminSet::GENESIS_VERSION,
        )
        .map_err(|e| ClientError::Config(format!("trust: {e}")))?;
        Ok(Client {
            endpoints: config.endpoints.clone(),
            files,
            trust,
            tls,
            channels: Mutex::new(HashMap::new()),
            preferred: Mutex::new(None),
            genesis,
            timeout: Duration::from_millis(config.timeout_ms),
            deadline: Duration::from_millis(config.deadline_ms),
            source_ip: config.source_ip,
            floors: Mutex::new(crate::floors::Floors::load(
                config.state_file.clone(),
                config.trust.min_admin_version,
            )?),
            revision_floor: AtomicU64::new(0),
            admin_sets: Mutex::new(Vec::new()),
            audit: config.audit.verify.then(|| {
                Mutex::new(AuditTrust::new(
                    config.audit.checkpoint_max_age_ms,
                    config.audit.require_checkpoint,
                ))
            }),
            origin: signpost_audit::origin_for(&keys, config.trust.admin_threshold),
        })
    }

    fn audit_trust(&self) -> Option<std::sync::MutexGuard<'_, AuditTrust>> {
        self.audit
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// The largest quorum-signed audit checkpoint this client has verified (size, root).
    pub fn audit_checkpoint(&self) -> Option<(u64, signpost_audit::Hash)> {
        self.audit_trust()?.trusted().map(|c| (c.size, c.root))
    }

    /// Forked histories this client caught: a node served a tree that a later quorum-signed
    /// checkpoint does not extend. Each names the node. Also logged at error level.
    pub fn audit_alarms(&self) -> Vec<String> {
        self.audit_trust()
            .map(|t| t.alarms().to_vec())
            .unwrap_or_default()
    }

    /// Checks an answer's audit evidence (see [`AuditTrust::check`]); `None` when the client
    /// does not verify the audit log.
    fn check_audit(
        &self,
        asked: Option<Asked>,
        from: &str,
        evidence: Option<&signpost_proto::v1::AuditEvidence>,
        admins: &AdminSet,
    ) -> Result<Option<Checked>, ClientError> {
        let (Some(asked), Some(trust)) = (asked, self.audit_trust()) else {
            return Ok(None);
        };
        trust
            .check(
                asked,
                from,
                evidence,
                |binding| self.witnesses(admins, binding),
                now_ms(),
            )
            .map(Some)
    }

    fn commit_audit(&self, checked: Option<Checked>) {
        if let (Some(checked), Some(mut trust)) = (checked, self.audit_trust()) {
            trust.commit(checked);
        }
    }

    /// The checkpoint keys a served binding of `signpost.checkpoint` names, verified like any
    /// binding: signed by the current admin set, not older than one this client saw.
    fn witnesses(
        &self,
        admins: &AdminSet,
        envelope: &Envelope,
    ) -> Result<signpost_audit::Witnesses, ClientError> {
        let binding = signpost_record::verify_binding(admins, envelope, now_ms())
            .map_err(|e| ClientError::Verification(format!("checkpoint binding: {e}")))?;
        if binding.service != signpost_audit::CHECKPOINT_SERVICE {
            return Err(ClientError::Verification(format!(
                "the checkpoint keys came in a binding of {}",
                binding.service
            )));
        }
        let mut floors = self
            .floors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        floors.check(admins.version, &binding.service, binding.version)?;
        floors.raise(admins.version, &binding.service, binding.version);
        drop(floors);
        let keys: Vec<[u8; 32]> = binding.keys.iter().copied().collect();
        signpost_audit::Witnesses::new(&self.origin, &keys)
            .map_err(|e| ClientError::Verification(format!("checkpoint keys: {e}")))
    }

    /// The same client with another per-call deadline (retries included) and per-attempt
    /// timeout (capped by the deadline).
    pub fn with_deadline(mut self, deadline: Duration) -> Client {
        self.deadline = deadline;
        self.timeout = self.timeout.min(deadline);
        self
    }

    /// The genesis admin set this client trusts (`[trust]`).
    pub fn genesis(&self) -> &AdminSet {
        &self.genesis
    }

    /// The configured endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn channel(&self, addr: &str) -> Result<Channel, tonic::Status> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let channel = signpost_identity::connect_channel_from(
            addr,
            self.tls.clone(),
            Duration::from_secs(3).min(self.timeout),
            self.source_ip,
        )
        .map_err(|e| tonic::Status::invalid_argument(format!("endpoint {addr}: {e}")))?;
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// The `Audit` service of node `addr` (admins only), for `signpost audit`.
    pub fn audit_on(&self, addr: &str) -> Result<AuditClient<Channel>, ClientError> {
        Ok(AuditClient::new(
            self.channel(addr)
                .map_err(|s| ClientError::from_status(&s))?,
        )
        .max_decoding_message_size(RESPONSE_BYTES_MAX))
    }

    fn registry(&self, addr: &str) -> Result<RegistryClient<Channel>, tonic::Status> {
        Ok(RegistryClient::new(self.channel(addr)?).max_decoding_message_size(RESPONSE_BYTES_MAX))
    }

    fn target(&self, attempt: u32) -> String {
        let preferred = self
            .preferred
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        match preferred {
            Some(p) => p,
            None => self.endpoints[(attempt as usize) % self.endpoints.len()].clone(),
        }
    }

    fn prefer(&self, addr: Option<String>) {
        *self
            .preferred
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = addr;
    }

    /// Runs `call` against the cluster with leader following, retrying until the call's
    /// deadline: a redirect is followed at once, a node that is down or has no leader is left
    /// for the next one after a jittered backoff, a shed request waits for the server's hint.
    async fn with_retries<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + self.deadline;
        let mut redirect: Option<String> = None;
        let mut last: Option<tonic::Status> = None;
        let mut failures = 0u32;
        for attempt in 0..ATTEMPTS_MAX {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let addr = redirect.take().unwrap_or_else(|| self.target(attempt));
            let result = tokio::time::timeout(self.timeout.min(left), call(addr.clone())).await;
            let status = match result {
                Ok(Ok(value)) => {
                    self.prefer(Some(addr));
                    return Ok(value);
                }
                Ok(Err(status)) => status,
                Err(_) => {
                    tonic::Status::deadline_exceeded(format!("{addr} did not answer in time"))
                }
            };
            let pause = match classify(&status) {
                Next::Redirect(leader) if leader != addr => {
                    tracing::debug!(from = %addr, to = %leader, "following the leader");
                    self.prefer(Some(leader.clone()));
                    redirect = Some(leader);
                    Duration::ZERO
                }
                // A node that names itself as the leader but refused: treat it as unavailable.
                Next::Redirect(_) => {
                    self.rotate_away_from(&addr);
                    failures += 1;
                    backoff(failures)
                }
                Next::Wait(hint) => {
                    redirect = Some(addr);
                    hint.min(RETRY_AFTER_MAX)
                }
                Next::Backoff(hint) => {
                    tracing::debug!(node = %addr, %status, "node unavailable; trying another");
                    self.rotate_away_from(&addr);
                    failures += 1;
                    hint.unwrap_or_else(|| backoff(failures)).min(BACKOFF_MAX)
                }
                Next::Fail => return Err(ClientError::from_status(&status)),
            };
            last = Some(status);
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(pause.min(left)).await;
        }
        Err(ClientError::Unavailable(format!(
            "no answer within the {} ms call deadline: {}",
            self.deadline.as_millis(),
            last.map(|s| s.message().to_string()).unwrap_or_default()
        )))
    }

    /// The highest revision this client has seen acknowledged or read linearizably.
    pub fn revision_floor(&self) -> u64 {
        self.revision_floor.load(Ordering::Acquire)
    }

    fn saw_revision(&self, revision: u64) {
        self.revision_floor.fetch_max(revision, Ordering::AcqRel);
    }

    /// Refuses a linearizable answer below what this client has already seen: the cluster
    /// never goes back, so such an answer is from a node that is behind (and wrongly claims
    /// to be current) or lying.
    fn check_not_behind(&self, addr: &str, revision: u64) -> Result<(), ClientError> {
        let floor = self.revision_floor();
        if revision < floor {
            return Err(ClientError::Verification(format!(
                "{addr} answered at revision {revision}, below revision {floor} which this \
                 client has already seen: revisions never go backwards"
            )));
        }
        Ok(())
    }

    /// Registers (or replaces) an instance. Returns the revision it was applied at.
    pub async fn register(&self, envelope: Envelope) -> Result<u64, ClientError> {
        let verified = signpost_record::open_record(&envelope)
            .map_err(|e| ClientError::Config(format!("refusing to send an invalid record: {e}")))?;
        let result = self
            .with_retries(|addr| {
                let envelope = envelope.clone();
                async move {
                    self.registry(&addr)?
                        .register(RegisterRequest {
                            envelope: Some(envelope),
                        })
                        .await
                        .map(|r| r.into_inner().revision)
                }
            })
            .await;
        match result {
            // An earlier attempt may have been applied before its answer was lost; the retry
            // is then a duplicate. If the stored record is exactly ours, the write succeeded.
            Err(ClientError::Refused {
                reason: Some(ref r),
                ..
            }) if r == "stale_sequence" => {
                let resolved = self.resolve(&verified.payload.service, false).await?;
                let ours = resolved
                    .envelopes
                    .iter()
                    .any(|e| e.payload == envelope.payload);
                if ours {
                    Ok(resolved.revision)
                } else {
                    result
                }
            }
            other => other,
        }
        .inspect(|revision| self.saw_revision(*revision))
    }

    /// Deregisters an instance (envelope carries a signed DeregisterPayload).
    pub async fn deregister(&self, envelope: Envelope) -> Result<u64, ClientError> {
        self.with_retries(|addr| {
            let envelope = envelope.clone();
            async move {
                self.registry(&addr)?
                    .deregister(DeregisterRequest {
                        envelope: Some(envelope),
                    })
                    .await
                    .map(|r| r.into_inner().revision)
            }
        })
        .await
        .inspect(|revision| self.saw_revision(*revision))
    }

    /// Binds keys to a service (admin certificate and admin-signed envelope).
    pub async fn bind(&self, envelope: Envelope) -> Result<u64, ClientError> {
        self.with_retries(|addr| {
            let envelope = envelope.clone();
            async move {
                self.registry(&addr)?
                    .bind(BindRequest {
                        envelope: Some(envelope),
                    })
                    .await
                    .map(|r| r.into_inner().revision)
            }
        })
        .await
        .inspect(|revision| self.saw_revision(*revision))
    }

    /// Replaces the admin set (threshold-signed), carrying `rebinds`: every binding signed by a
    /// key the new set drops, re-signed by a key of the new set (see [`Client::rebinds_for`]);
    /// without them the cluster refuses the rotation with `rotation_incomplete`.
    pub async fn rotate_admins(
        &self,
        envelope: MultiEnvelope,
        rebinds: Vec<Envelope>,
    ) -> Result<u64, ClientError> {
        self.with_retries(|addr| {
            let request = RotateAdminsRequest {
                envelope: Some(envelope.clone()),
                rebinds: rebinds.clone(),
            };
            async move {
                self.registry(&addr)?
                    .rotate_admins(request)
                    .await
                    .map(|r| r.into_inner().revision)
            }
        })
        .await
        .inspect(|revision| self.saw_revision(*revision))
    }

    /// The bindings a rotation to `next` must carry: each bound service whose binding is signed
    /// by a key `next` does not hold, re-signed by `signer` (a key of `next`) with the same keys
    /// and window at the next version. Fails if a bound service does not verify: a binding the
    /// client cannot verify is not one it should vouch for.
    pub async fn rebinds_for(
        &self,
        next: &AdminSetPayload,
        signer: &ed25519_dalek::SigningKey,
    ) -> Result<Vec<Envelope>, ClientError> {
        let listed = self.list_pages(false, true).await?;
        if let Some((service, reason)) = listed.unverified.first() {
            return Err(ClientError::Verification(format!(
                "cannot re-sign the binding of {service}, which does not verify: {reason}"
            )));
        }
        let mut rebinds = Vec::new();
        for service in listed.services {
            let kept = next
                .public_keys
                .iter()
                .any(|k| k.as_slice() == service.binding_envelope.key_id.as_slice());
            if kept {
                continue;
            }
            let binding = &service.binding;
            rebinds.push(signpost_record::sign_binding(
                signer,
                &BindingPayload {
                    service: binding.service.clone(),
                    public_keys: binding.keys.iter().map(|k| k.to_vec()).collect(),
                    version: binding.version.saturating_add(1),
                    issued_at_ms: now_ms(),
                    not_before_ms: binding.not_before_ms,
                    not_after_ms: binding.not_after_ms,
                },
            ));
        }
        Ok(rebinds)
    }

    /// Resolves a service: linearizable unless `stale`. Only records that verify end to end are
    /// returned; a node whose answer does not verify is skipped for another.
    pub async fn resolve(&self, service: &str, stale: bool) -> Result<Resolved, ClientError> {
        let mut failures = Vec::new();
        for _ in 0..self.endpoints.len().max(1) {
            let asked = self.audit_trust().map(|t| t.asked());
            let audit = asked.as_ref().map(Asked::request);
            let response = self
                .with_retries(|addr| async move {
                    let answer = self
                        .registry(&addr)?
                        .resolve(ResolveRequest {
                            service: service.to_string(),
                            stale,
                            audit,
                        })
                        .await;
                    match answer {
                        Ok(r) => Ok((addr, r.into_inner(), None)),
                        // A proof of absence rides in the details of NOT_FOUND: checked below
                        // like any answer, so a node cannot hide a service by denying it.
                        Err(status) if audit.is_some() && status.code() == Code::NotFound => {
                            let details =
                                ResolveResponse::decode(status.details()).unwrap_or_default();
                            Ok((addr, details, Some(ClientError::from_status(&status))))
                        }
                        Err(status) => Err(status),
                    }
                })
                .await?;
            let (addr, response, absent) = response;
            let checked = if stale || (absent.is_some() && response.revision == 0) {
                Ok(())
            } else {
                self.check_not_behind(&addr, response.revision)
            };
            let verified = checked
                .and_then(|()| {
                    // A proof of absence may leave a long chain out (it travels in trailers):
                    // the admin sets this client verified before stand in.
                    if absent.is_some() && response.admin_chain.is_empty() {
                        Ok(self.latest_admin_set())
                    } else {
                        self.current_admin_set(&response.admin_chain)
                    }
                })
                .and_then(|admins| {
                    let audit = self.check_audit(asked, &addr, response.audit.as_ref(), &admins)?;
                    let records = response.service.unwrap_or_default();
                    if let Some(absent) = absent {
                        if let Some(audit) = &audit {
                            audit.check_service(&ServiceRecords {
                                service: service.to_owned(),
                                state: records.state,
                                ..ServiceRecords::default()
                            })?;
                        }
                        return Ok((Err(absent), audit));
                    }
                    let resolved =
                        self.verify(records, &admins, response.revision, audit.as_ref())?;
                    Ok((Ok(resolved), audit))
                });
            match verified {
                Ok((Err(absent), audit)) => {
                    self.commit_audit(audit);
                    return Err(absent);
                }
                Ok((Ok(resolved), audit)) if resolved.service == service => {
                    self.commit_audit(audit);
                    if !stale {
                        self.saw_revision(resolved.revision);
                    }
                    return Ok(resolved);
                }
                Ok((Ok(resolved), _)) => failures.push(format!(
                    "{addr} answered for {} instead of {service}",
                    resolved.service
                )),
                Err(e) => failures.push(format!("{addr}: {e}")),
            }
            tracing::warn!(node = %addr, "answer failed verification; asking another node");
            self.rotate_away_from(&addr);
        }
        Err(ClientError::Verification(failures.join("; ")))
    }

    /// Lists every service with live instances, each verified end to end, page by page.
    ///
    /// A service whose answer does not verify (its binding expired, or a node serves it
    /// corrupted) is reported in [`Listed::unverified`] and left out; it does not fail the
    /// others. If some do not verify, the other nodes are asked too and the answer with the
    /// fewest failures is returned, so a single lying node cannot hide a service by corrupting
    /// it. An admin chain that does not verify, a linearizable page below a revision already
    /// seen, or a page token that does not advance fails that node's whole answer.
    pub async fn list(&self, stale: bool) -> Result<Listed, ClientError> {
        self.list_pages(stale, false).await
    }

    async fn list_pages(&self, stale: bool, all_bound: bool) -> Result<Listed, ClientError> {
        let mut failures = Vec::new();
        let mut best: Option<Listed> = None;
        for _ in 0..self.endpoints.len().max(1) {
            let (addr, answer) = self.list_from_one_node(stale, all_bound).await?;
            self.rotate_away_from(&addr);
            let listed = match answer {
                Ok(listed) => listed,
                Err(e) => {
                    failures.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            if listed.unverified.is_empty() {
                if !stale {
                    self.saw_revision(listed.revision);
                }
                return Ok(listed);
            }
            tracing::warn!(node = %addr, unverified = listed.unverified.len(), "some services did not verify; asking another node");
            if best
                .as_ref()
                .is_none_or(|b| listed.unverified.len() < b.unverified.len())
            {
                best = Some(listed);
            }
        }
        best.ok_or_else(|| ClientError::Verification(failures.join("; ")))
    }

    /// Reads every page from the node that answers the first (the client keeps preferring the
    /// node that answered). The outer error is the call's own (no node answered); the inner
    /// one says why this node's answer is not trusted.
    async fn list_from_one_node(
        &self,
        stale: bool,
        all_bound: bool,
    ) -> Result<(String, Result<Listed, ClientError>), ClientError> {
        let mut listed = Listed {
            services: Vec::new(),
            unverified: Vec::new(),
            revision: 0,
        };
        let mut token = String::new();
        let mut first_addr: Option<String> = None;
        for _ in 0..LIST_PAGES_MAX {
            let asked = self.audit_trust().map(|t| t.asked());
            let (addr, page) = self
                .with_retries(|addr| {
                    let request = ListRequest {
                        stale,
                        limit: 0,
                        page_token: token.clone(),
                        all_bound,
                        audit: asked.as_ref().map(Asked::request),
                    };
                    async move {
                        let r = self.registry(&addr)?.list(request).await?;
                        Ok((addr, r.into_inner()))
                    }
                })
                .await?;
            let first = first_addr.get_or_insert_with(|| addr.clone()).clone();
            let checked = self
                .check_page(&addr, &page, &token, &listed, stale)
                .and_then(|admins| {
                    let audit = self.check_audit(asked, &addr, page.audit.as_ref(), &admins)?;
                    Ok((admins, audit))
                });
            let (admins, audit) = match checked {
                Ok(checked) => checked,
                Err(e) => return Ok((first, Err(e))),
            };
            listed.revision = listed.revision.max(page.revision);
            for service in page.services {
                let name = service.service.clone();
                match self.verify(service, &admins, page.revision, audit.as_ref()) {
                    Ok(resolved) => listed.services.push(resolved),
                    Err(e) => listed.unverified.push((name, e.to_string())),
                }
            }
            self.commit_audit(audit);
            if page.next_page_token.is_empty() {
                return Ok((first, Ok(listed)));
            }
            token = page.next_page_token;
        }
        Ok((
            first_addr.unwrap_or_default(),
            Err(ClientError::Verification(format!(
                "the listing did not end within {LIST_PAGES_MAX} pages"
            ))),
        ))
    }

    /// What must hold of every List page before its services are looked at; returns the
    /// current admin set its chain leads to, against which each service is then verified.
    fn check_page(
        &self,
        addr: &str,
        page: &ListResponse,
        token: &str,
        so_far: &Listed,
        stale: bool,
    ) -> Result<AdminSet, ClientError> {
        let admins = self.current_admin_set(&page.admin_chain)?;
        if !stale {
            self.check_not_behind(addr, page.revision)?;
            if page.revision < so_far.revision {
                return Err(ClientError::Verification(format!(
                    "{addr} served a page at revision {} after one at {}",
                    page.revision, so_far.revision
                )));
            }
        }
        // Pages are in name order: every name must come after the token, and the next token
        // after the names, or a node could make a listing go round forever.
        let mut after = token;
        for service in &page.services {
            if service.service.as_str() <= after {
                return Err(ClientError::Verification(format!(
                    "{addr} served {} out of order (after {after:?})",
                    service.service
                )));
            }
            after = &service.service;
        }
        if !page.next_page_token.is_empty() && page.next_page_token.as_str() < after {
            return Err(ClientError::Verification(format!(
                "{addr} served a page token that goes backwards"
            )));
        }
        if !page.next_page_token.is_empty() && page.services.is_empty() {
            return Err(ClientError::Verification(format!(
                "{addr} served an empty page that is not the last"
            )));
        }
        Ok(admins)
    }

    fn rotate_away_from(&self, addr: &str) {
        let next = self
            .endpoints
            .iter()
            .position(|e| e == addr)
            .map(|i| self.endpoints[(i + 1) % self.endpoints.len()].clone())
            .or_else(|| self.endpoints.first().cloned());
        self.prefer(next);
    }

    /// Follows an answer's admin chain from the pinned genesis and returns the current admin
    /// set; every set on the way is remembered for verifying watch history.
    fn current_admin_set(&self, chain: &[MultiEnvelope]) -> Result<AdminSet, ClientError> {
        let sets = signpost_record::admin_sets_of_chain(&self.genesis, chain)
            .map_err(|e| ClientError::Verification(format!("admin chain: {e}")))?;
        let current = sets.last().cloned().unwrap_or_else(|| self.genesis.clone());
        self.remember_admin_sets(sets);
        Ok(current)
    }

    /// Verifies one service's answer against `admins`, the current admin set its answer's
    /// chain leads to (see [`Client::current_admin_set`]), and against the versions this client
    /// has already verified (no rollback). Any part that fails (binding, a single record) fails
    /// the whole answer: a node that serves one bad record is not trusted for the rest, and the
    /// caller asks another node.
    fn verify(
        &self,
        records: ServiceRecords,
        admins: &AdminSet,
        revision: u64,
        audit: Option<&Checked>,
    ) -> Result<Resolved, ClientError> {
        // Checked here, reported after the records: a record that is not logged at all is the
        // more precise complaint.
        let whole = audit.map(|audit| audit.check_service(&records));
        let binding_envelope = records.binding.ok_or_else(|| {
            ClientError::Verification(format!(
                "service {} came without a binding",
                records.service
            ))
        })?;
        let binding = signpost_record::verify_binding(admins, &binding_envelope, now_ms())
            .map_err(|e| ClientError::Verification(format!("binding: {e}")))?;
        if binding.service != records.service {
            return Err(ClientError::Verification(format!(
                "binding is for {} but the answer is for {}",
                binding.service, records.service
            )));
        }
        let mut floors = self
            .floors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        floors.check(admins.version, &binding.service, binding.version)?;
        let mut served = Vec::new();
        for (i, envelope) in records.records.into_iter().enumerate() {
            let verified = signpost_record::verify_record_against(&binding, &envelope)
                .map_err(|e| ClientError::Verification(format!("record: {e}")))
                .and_then(|record| {
                    if let Some(audit) = audit {
                        audit.check_record(
                            &records.service,
                            &record.payload.instance,
                            record.payload.sequence,
                            &envelope,
                            records.inclusions.get(i),
                        )?;
                    }
                    Ok(record)
                });
            match verified {
                Ok(record) => {
                    let inclusion = records.inclusions.get(i).cloned().unwrap_or_default();
                    served.push((record, envelope, inclusion));
                }
                Err(e) => {
                    tracing::warn!(service = %records.service, error = %e, "a record failed verification; refusing the whole answer");
                    return Err(e);
                }
            }
        }
        whole.transpose()?;
        floors.raise(admins.version, &binding.service, binding.version);
        drop(floors);
        let mut instances = Vec::new();
        let mut envelopes = Vec::new();
        let mut inclusions = Vec::new();
        for (record, envelope, inclusion) in newest_per_instance(served) {
            instances.push(record);
            envelopes.push(envelope);
            inclusions.push(inclusion);
        }
        let audit_tree = audit.and_then(Checked::tree);
        if audit_tree.is_none() {
            inclusions.clear();
        }
        Ok(Resolved {
            service: records.service,
            instances,
            envelopes,
            revision,
            binding,
            binding_envelope,
            audit_tree,
            inclusions,
        })
    }

    /// Learns the current admin chain (from a one-service List page) so that bindings signed by
    /// admins added since genesis verify. A chain that does not verify is an error; a shorter
    /// one than already known changes nothing.
    pub(crate) async fn refresh_admin_sets(&self) -> Result<(), ClientError> {
        let page = self
            .with_retries(|addr| async move {
                let request = ListRequest {
                    stale: true,
                    limit: 1,
                    page_token: String::new(),
                    all_bound: true,
                    audit: None,
                };
                self.registry(&addr)?
                    .list(request)
                    .await
                    .map(|r| r.into_inner())
            })
            .await?;
        self.current_admin_set(&page.admin_chain).map(|_| ())
    }

    /// The newest admin set this client has verified (genesis if none since).
    fn latest_admin_set(&self) -> AdminSet {
        self.admin_sets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .last()
            .cloned()
            .unwrap_or_else(|| self.genesis.clone())
    }

    fn remember_admin_sets(&self, sets: Vec<AdminSet>) {
        let mut known = self
            .admin_sets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if sets.len() > known.len() {
            *known = sets;
        }
    }

    /// Verifies a binding of the past (a watch event's): signed by a key of any admin set on
    /// the chain this client verified, and for `service`. Its version and window are not
    /// checked: it is history, not a binding to use now.
    pub(crate) fn verify_past_binding(
        &self,
        service: &str,
        envelope: &Envelope,
    ) -> Result<signpost_record::Binding, ClientError> {
        let opened = signpost_record::open_binding(envelope)
            .map_err(|e| ClientError::Verification(format!("binding: {e}")))?;
        if opened.payload.service != service {
            return Err(ClientError::Verification(format!(
                "binding is for {} but the event is for {service}",
                opened.payload.service
            )));
        }
        let known = self
            .admin_sets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let by_genesis = self.genesis.contains(&opened.key);
        if !by_genesis && !known.iter().any(|set| set.contains(&opened.key)) {
            return Err(ClientError::Verification(format!(
                "binding of {service} is signed by {}, which no admin set this client verified holds",
                hex::encode(opened.key)
            )));
        }
        Ok(opened.payload)
    }

    /// A channel to an instance's first endpoint that refuses the connection unless the
    /// instance presents exactly the TLS identity its signed record names (service discovery
    /// validation: a hijacked address cannot impersonate the service).
    pub fn connect_instance(&self, record: &VerifiedRecord) -> Result<Channel, ClientError> {
        let expected = SpiffeId::parse(&record.payload.tls_identity).map_err(|e| {
            ClientError::Verification(format!("record has no usable TLS identity: {e}"))
        })?;
        let endpoint = record
            .payload
            .endpoints
            .first()
            .ok_or_else(|| ClientError::Verification("record has no endpoint".to_string()))?;
        let host = if endpoint.host.contains(':') {
            format!("[{}]", endpoint.host)
        } else {
            endpoint.host.clone()
        };
        let config = signpost_identity::client_config(
            &self.files,
            &self.trust,
            &TlsSettings::default(),
            PeerRule::Exact(expected),
        )?;
        Ok(signpost_identity::connect_channel(
            &format!("{host}:{}", endpoint.port),
            config,
            self.timeout,
        )?)
    }

    /// Watches a service (or a prefix of names) from `from_revision` (0 = from now).
    pub fn watch(&self, service: &str, prefix: bool, from_revision: u64) -> Watcher<'_> {
        Watcher::new(self, service, prefix, from_revision)
    }

    pub(crate) fn forget_preferred(&self) {
        let current = self
            .preferred
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        match current {
            Some(addr) => self.rotate_away_from(&addr),
            None => self.prefer(self.endpoints.get(1 % self.endpoints.len()).cloned()),
        }
    }

    /// Opens a watch stream on some node; returns the node's address and the stream.
    pub(crate) async fn open_watch(
        &self,
        request: WatchRequest,
    ) -> Result<(String, Streaming<WatchEvent>), ClientError> {
        self.with_retries(|addr| {
            let request = request.clone();
            async move {
                let stream = self.registry(&addr)?.watch(request).await?;
                Ok((addr, stream.into_inner()))
            }
        })
        .await
    }

    /// What a stream opened now asks the audit log to prove; `None` when the client does not
    /// verify the audit log.
    pub(crate) fn audit_asked(&self) -> Option<Asked> {
        self.audit_trust().map(|t| t.asked())
    }

    /// Checks the audit evidence of a watched put whose record (`record`, verified) `from`
    /// served in a stream that asked `asked`: as a Resolve answer's, without the state proof
    /// (an event is one change, not a whole service).
    pub(crate) fn check_watched_put(
        &self,
        asked: &Asked,
        from: &str,
        event: &WatchEvent,
        record: &VerifiedRecord,
    ) -> Result<(), ClientError> {
        let admins = self.latest_admin_set();
        let checked = self.check_audit(Some(asked.clone()), from, event.audit.as_ref(), &admins)?;
        if let (Some(checked), Some(envelope)) = (&checked, event.record.as_ref()) {
            checked.check_record(
                &event.service,
                &event.instance,
                record.payload.sequence,
                envelope,
                event.inclusion.as_ref(),
            )?;
        }
        self.commit_audit(checked);
        Ok(())
    }

    /// Renews the leases of `instances` every `interval` (a third of their TTL) over one
    /// KeepAlive stream to the leader, until `stop` resolves.
    ///
    /// Each renewal must be answered within half an interval; a node that does not answer in
    /// time (partitioned, paused, or a leader that lost its quorum) is left at once for another,
    /// so a lease is renewed through whichever node the majority follows. Returns `LeaseLost`
    /// as soon as the leader says an instance is unknown, or once no renewal was confirmed for
    /// a whole TTL (as the leader last granted it): the registry has then expired the
    /// instance, and its owner must know.
    pub async fn keep_alive(
        &self,
        instances: &[(String, String)],
        interval: Duration,
        stop: impl Future<Output = ()>,
    ) -> Result<(), ClientError> {
        tokio::pin!(stop);
        let reply_deadline = interval / 2;
        // The lease the leader grants, from its answers; until one arrives, the usual three
        // renewals per TTL.
        let mut ttl = interval * 3;
        let mut failures = 0u32;
        let mut confirmed_at = Instant::now();
        let mut redirect: Option<String> = None;
        let lost = || {
            let (service, instance) = instances.first().cloned().unwrap_or_default();
            ClientError::LeaseLost { service, instance }
        };
        loop {
            let addr = redirect.take().unwrap_or_else(|| self.target(failures));
            let (tx, rx) = tokio::sync::mpsc::channel::<KeepAliveRequest>(instances.len() * 2 + 1);
            let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
            let opened = tokio::select! {
                _ = &mut stop => return Ok(()),
                r = tokio::time::timeout(
                    reply_deadline,
                    async { self.registry(&addr)?.keep_alive(outbound).await },
                ) => r.unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("keep-alive stream did not open in time"))),
            };
            let status = match opened {
                Ok(response) => {
                    let mut replies = response.into_inner();
                    let mut tick = tokio::time::interval(interval);
                    // When the oldest unanswered renewal must be answered by.
                    let mut answer_by: Option<tokio::time::Instant> = None;
                    loop {
                        let overdue = async {
                            match answer_by {
                                Some(at) => tokio::time::sleep_until(at).await,
                                None => std::future::pending().await,
                            }
                        };
                        tokio::select! {
                            _ = &mut stop => return Ok(()),
                            _ = tick.tick() => {
                                for (service, instance) in instances {
                                    let request = KeepAliveRequest { service: service.clone(), instance: instance.clone() };
                                    if tx.send(request).await.is_err() {
                                        break;
                                    }
                                }
                                answer_by.get_or_insert(tokio::time::Instant::now() + reply_deadline);
                            }
                            _ = overdue => break tonic::Status::deadline_exceeded(format!("{addr} did not answer a renewal within {} ms", reply_deadline.as_millis())),
                            reply = replies.message() => match reply {
                                Ok(Some(r)) if r.ttl_secs == 0 => {
                                    return Err(ClientError::LeaseLost { service: r.service, instance: r.instance });
                                }
                                Ok(Some(r)) => {
                                    failures = 0;
                                    confirmed_at = Instant::now();
                                    ttl = Duration::from_secs(u64::from(r.ttl_secs));
                                    answer_by = None;
                                    self.prefer(Some(addr.clone()));
                                }
                                Ok(None) => break tonic::Status::unavailable("keep-alive stream closed"),
                                Err(status) => break status,
                            }
                        }
                    }
                }
                Err(status) => status,
            };
            failures = failures.saturating_add(1);
            if confirmed_at.elapsed() >= ttl {
                tracing::warn!(%status, "no renewal confirmed for a whole TTL; the lease is lost");
                return Err(lost());
            }
            let pause = match classify(&status) {
                Next::Redirect(leader) if leader != addr => {
                    self.prefer(Some(leader.clone()));
                    redirect = Some(leader);
                    Duration::ZERO
                }
                Next::Wait(pause) => pause.min(BACKOFF_MAX),
                Next::Redirect(_) | Next::Backoff(_) => {
                    tracing::debug!(node = %addr, %status, "renewing through another node");
                    self.rotate_away_from(&addr);
                    backoff(failures)
                }
                Next::Fail => return Err(ClientError::from_status(&status)),
            };
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// What node `addr` itself holds for `service` (a stale read of its own state, verified
    /// like any answer): for checking that every node converged.
    pub async fn resolve_on(&self, addr: &str, service: &str) -> Result<Resolved, ClientError> {
        let mut client = self
            .registry(addr)
            .map_err(|s| ClientError::from_status(&s))?;
        let request = ResolveRequest {
            service: service.to_string(),
            stale: true,
            audit: None,
        };
        let response = tokio::time::timeout(self.timeout, client.resolve(request))
            .await
            .map_err(|_| ClientError::Unavailable(format!("{addr} did not answer in time")))?
            .map_err(|s| ClientError::from_status(&s))?
            .into_inner();
        let admins = self.current_admin_set(&response.admin_chain)?;
        let resolved = self.verify(
            response.service.unwrap_or_default(),
            &admins,
            response.revision,
            None,
        )?;
        if resolved.service != service {
            return Err(ClientError::Verification(format!(
                "{addr} answered for {} instead of {service}",
                resolved.service
            )));
        }
        Ok(resolved)
    }

    /// Status of one node (by client address).
    pub async fn status_of(&self, addr: &str) -> Result<StatusResponse, ClientError> {
        let channel = self
            .channel(addr)
            .map_err(|s| ClientError::from_status(&s))?;
        let mut client = ClusterClient::new(channel);
        let response = tokio::time::timeout(self.timeout, client.status(StatusRequest {}))
            .await
            .map_err(|_| ClientError::Unavailable(format!("{addr} did not answer in time")))?;
        response
            .map(|r| r.into_inner())
            .map_err(|s| ClientError::from_status(&s))
    }

    /// Status from the first node that answers.
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        self.with_retries(|addr| async move {
            ClusterClient::new(self.channel(&addr)?)
                .status(StatusRequest {})
                .await
                .map(|r| r.into_inner())
        })
        .await
    }

    /// Adds node `id` (learner, then voter once caught up); admin only. Retries until the
    /// call's deadline while the learner catches up.
    pub async fn add_member(
        &self,
        id: u64,
        addr: &str,
        raft_addr: &str,
    ) -> Result<MembershipResponse, ClientError> {
        self.with_retries(|target| {
            let request = AddMemberRequest {
                id,
                addr: addr.to_string(),
                raft_addr: raft_addr.to_string(),
            };
            async move {
                ClusterClient::new(self.channel(&target)?)
                    .add_member(request)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Removes node `id`; admin only.
    pub async fn remove_member(&self, id: u64) -> Result<MembershipResponse, ClientError> {
        self.with_retries(|target| async move {
            ClusterClient::new(self.channel(&target)?)
                .remove_member(RemoveMemberRequest { id })
                .await
                .map(|r| r.into_inner())
        })
        .await
    }

    /// Hands leadership to `id` (None: the most up-to-date voter); returns the new leader.
    pub async fn transfer_leader(&self, id: Option<u64>) -> Result<u64, ClientError> {
        self.with_retries(|target| async move {
            ClusterClient::new(self.channel(&target)?)
                .transfer_leader(TransferLeaderRequest {
                    id: id.unwrap_or(0),
                })
                .await
                .map(|r| r.into_inner().leader_id)
        })
        .await
    }

    /// Builds a snapshot on the node at `addr`; returns the index it covers.
    pub async fn snapshot_on(&self, addr: &str) -> Result<u64, ClientError> {
        let mut client = ClusterClient::new(
            self.channel(addr)
                .map_err(|s| ClientError::from_status(&s))?,
        );
        let response = tokio::time::timeout(self.deadline, client.snapshot(SnapshotRequest {}))
            .await
            .map_err(|_| ClientError::Unavailable(format!("{addr} did not answer in time")))?;
        response
            .map(|r| r.into_inner().snapshot_index)
            .map_err(|s| ClientError::from_status(&s))
    }

    /// The bytes of a backup file taken by the leader, at most `bytes_max`. The caller checks
    /// them (`signpost_consensus::backup::Backup::from_bytes`) before trusting them.
    pub async fn backup(&self, bytes_max: usize) -> Result<Vec<u8>, ClientError> {
        let mut stream = self
            .with_retries(|target| async move {
                ClusterClient::new(self.channel(&target)?)
                    .max_decoding_message_size(RESPONSE_BYTES_MAX)
                    .backup(BackupRequest {})
                    .await
                    .map(|r| r.into_inner())
            })
            .await?;
        let mut out = Vec::new();
        let read = async {
            while let Some(chunk) = stream
                .message()
                .await
                .map_err(|s| ClientError::from_status(&s))?
            {
                if out.len() + chunk.data.len() > bytes_max {
                    return Err(ClientError::Verification(format!(
                        "the backup is larger than {bytes_max} bytes"
                    )));
                }
                out.extend_from_slice(&chunk.data);
            }
            Ok(())
        };
        tokio::time::timeout(self.deadline, read)
            .await
            .map_err(|_| {
                ClientError::Unavailable(format!(
                    "the backup did not arrive within the {} ms call deadline",
                    self.deadline.as_millis()
                ))
            })??;
        Ok(out)
    }
}
