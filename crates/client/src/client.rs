use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use signpost_identity::{PeerRule, SpiffeId, TlsFiles, TlsSettings, Trust};
use signpost_proto::v1::cluster_client::ClusterClient;
use signpost_proto::v1::registry_client::RegistryClient;
use signpost_proto::v1::{
    BindRequest, DeregisterRequest, Envelope, KeepAliveRequest, ListRequest, MultiEnvelope,
    RegisterRequest, ResolveRequest, RotateAdminsRequest, ServiceRecords, StatusRequest,
    StatusResponse, WatchEvent, WatchRequest,
};
use signpost_record::{AdminSet, VerifiedRecord};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::watcher::Watcher;
use crate::{LEADER_METADATA, RETRY_AFTER_METADATA};

/// Attempts per call before giving up. Each failed attempt backs off, so a call spans a leader
/// election (a few seconds) but never loops forever.
const ATTEMPTS_MAX: u32 = 12;
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(1_000);
/// A keep-alive session gives up after this long without one successful renewal.
const KEEP_ALIVE_GIVE_UP: Duration = Duration::from_secs(30);
/// Largest response the client decodes (a full List of a big registry).
const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

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
    timeout: Duration,
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
        })
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
        let channel =
            signpost_identity::connect_channel(addr, self.tls.clone(), Duration::from_secs(3))
                .map_err(|e| tonic::Status::invalid_argument(format!("endpoint {addr}: {e}")))?;
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
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
            Some(p) if attempt == 0 => p,
            _ => self.endpoints[(attempt as usize) % self.endpoints.len()].clone(),
        }
    }

    fn prefer(&self, addr: Option<String>) {
        *self
            .preferred
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = addr;
    }

    /// Runs `call` against the cluster with leader following and bounded retries.
    async fn with_retries<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut backoff = BACKOFF_START;
        let mut redirect: Option<String> = None;
        let mut last: Option<tonic::Status> = None;
        for attempt in 0..ATTEMPTS_MAX {
            let addr = redirect.take().unwrap_or_else(|| self.target(attempt));
            let result = tokio::time::timeout(self.timeout, call(addr.clone())).await;
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
            match classify(&status) {
                Next::Redirect(leader) => {
                    tracing::debug!(from = %addr, to = %leader, "following the leader");
                    self.prefer(Some(leader.clone()));
                    redirect = Some(leader);
                }
                Next::Wait(pause) => {
                    tokio::time::sleep(pause.min(BACKOFF_MAX * 5)).await;
                    redirect = Some(addr);
                }
                Next::Backoff(hint) => {
                    tracing::debug!(node = %addr, %status, "node unavailable; trying another");
                    self.prefer(None);
                    tokio::time::sleep(hint.unwrap_or(backoff).min(BACKOFF_MAX)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Next::Fail => return Err(ClientError::from_status(&status)),
            }
            last = Some(status);
        }
        Err(ClientError::Unavailable(
            last.map(|s| s.message().to_string()).unwrap_or_default(),
        ))
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
    }

    /// Replaces the admin set (threshold-signed).
    pub async fn rotate_admins(&self, envelope: MultiEnvelope) -> Result<u64, ClientError> {
        self.with_retries(|addr| {
            let envelope = envelope.clone();
            async move {
                self.registry(&addr)?
                    .rotate_admins(RotateAdminsRequest {
                        envelope: Some(envelope),
                    })
                    .await
                    .map(|r| r.into_inner().revision)
            }
        })
        .await
    }

    /// Resolves a service: linearizable unless `stale`. Only records that verify end to end are
    /// returned; a node whose answer does not verify is skipped for another.
    pub async fn resolve(&self, service: &str, stale: bool) -> Result<Resolved, ClientError> {
        let mut failures = Vec::new();
        for _ in 0..self.endpoints.len().max(1) {
            let response = self
                .with_retries(|addr| async move {
                    let r = self
                        .registry(&addr)?
                        .resolve(ResolveRequest {
                            service: service.to_string(),
                            stale,
                        })
                        .await?;
                    Ok((addr, r.into_inner()))
                })
                .await?;
            let (addr, response) = response;
            match self.verify(
                response.service.unwrap_or_default(),
                &response.admin_chain,
                response.revision,
            ) {
                Ok(resolved) if resolved.service == service => return Ok(resolved),
                Ok(resolved) => failures.push(format!(
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

    /// Lists every service with live instances, each verified end to end.
    pub async fn list(&self, stale: bool) -> Result<Vec<Resolved>, ClientError> {
        let mut failures = Vec::new();
        for _ in 0..self.endpoints.len().max(1) {
            let (addr, response) = self
                .with_retries(|addr| async move {
                    let r = self.registry(&addr)?.list(ListRequest { stale }).await?;
                    Ok((addr, r.into_inner()))
                })
                .await?;
            let verified: Result<Vec<Resolved>, ClientError> = response
                .services
                .into_iter()
                .map(|s| self.verify(s, &response.admin_chain, response.revision))
                .collect();
            match verified {
                Ok(v) => return Ok(v),
                Err(e) => failures.push(format!("{addr}: {e}")),
            }
            self.rotate_away_from(&addr);
        }
        Err(ClientError::Verification(failures.join("; ")))
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

    /// Verifies one service's answer back to the pinned genesis admin keys. Individual records
    /// that fail are dropped (and logged); a binding that fails fails the whole answer.
    fn verify(
        &self,
        records: ServiceRecords,
        admin_chain: &[MultiEnvelope],
        revision: u64,
    ) -> Result<Resolved, ClientError> {
        let admins = signpost_record::verify_admin_chain(&self.genesis, admin_chain)
            .map_err(|e| ClientError::Verification(format!("admin chain: {e}")))?;
        let binding_envelope = records.binding.ok_or_else(|| {
            ClientError::Verification(format!(
                "service {} came without a binding",
                records.service
            ))
        })?;
        let binding = signpost_record::verify_binding(&admins, &binding_envelope, now_ms())
            .map_err(|e| ClientError::Verification(format!("binding: {e}")))?;
        if binding.service != records.service {
            return Err(ClientError::Verification(format!(
                "binding is for {} but the answer is for {}",
                binding.service, records.service
            )));
        }
        let mut instances = Vec::new();
        let mut envelopes = Vec::new();
        for envelope in records.records {
            match signpost_record::verify_record_against(&binding, &envelope) {
                Ok(record) => {
                    instances.push(record);
                    envelopes.push(envelope);
                }
                Err(e) => {
                    tracing::warn!(service = %records.service, error = %e, "dropping a record that failed verification");
                    return Err(ClientError::Verification(format!("record: {e}")));
                }
            }
        }
        Ok(Resolved {
            service: records.service,
            instances,
            envelopes,
            revision,
            binding,
        })
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

    pub(crate) async fn open_watch(
        &self,
        request: WatchRequest,
    ) -> Result<Streaming<WatchEvent>, ClientError> {
        self.with_retries(|addr| {
            let request = request.clone();
            async move {
                self.registry(&addr)?
                    .watch(request)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Renews the leases of `instances` every `interval` over one KeepAlive stream to the
    /// leader, until `stop` resolves. Follows the leader and reconnects (bounded) on failure.
    /// Returns `LeaseLost` as soon as the leader says an instance is unknown.
    pub async fn keep_alive(
        &self,
        instances: &[(String, String)],
        interval: Duration,
        stop: impl Future<Output = ()>,
    ) -> Result<(), ClientError> {
        tokio::pin!(stop);
        let mut failures = 0u32;
        // Renewals must ride out a leader election (seconds), so the retry bound is time
        // without a successful renewal rather than a small count.
        let mut failing_since: Option<Instant> = None;
        let mut redirect: Option<String> = None;
        loop {
            let addr = redirect.take().unwrap_or_else(|| self.target(failures));
            let (tx, rx) = tokio::sync::mpsc::channel::<KeepAliveRequest>(instances.len() * 2 + 1);
            let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
            let opened = tokio::select! {
                _ = &mut stop => return Ok(()),
                r = async { self.registry(&addr)?.keep_alive(outbound).await } => r,
            };
            let status = match opened {
                Ok(response) => {
                    let mut replies = response.into_inner();
                    let mut tick = tokio::time::interval(interval);
                    loop {
                        tokio::select! {
                            _ = &mut stop => return Ok(()),
                            _ = tick.tick() => {
                                for (service, instance) in instances {
                                    let request = KeepAliveRequest { service: service.clone(), instance: instance.clone() };
                                    if tx.send(request).await.is_err() {
                                        break;
                                    }
                                }
                            }
                            reply = replies.message() => match reply {
                                Ok(Some(r)) if r.ttl_secs == 0 => {
                                    return Err(ClientError::LeaseLost { service: r.service, instance: r.instance });
                                }
                                Ok(Some(_)) => {
                                    failures = 0;
                                    failing_since = None;
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
            let since = *failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() > KEEP_ALIVE_GIVE_UP {
                return Err(ClientError::from_status(&status));
            }
            match classify(&status) {
                Next::Redirect(leader) => {
                    self.prefer(Some(leader.clone()));
                    redirect = Some(leader);
                }
                Next::Wait(pause) | Next::Backoff(Some(pause)) => {
                    tokio::time::sleep(pause.min(BACKOFF_MAX)).await;
                }
                Next::Backoff(None) => {
                    self.prefer(None);
                    tokio::time::sleep((BACKOFF_START * failures.min(20)).min(BACKOFF_MAX)).await;
                }
                Next::Fail => return Err(ClientError::from_status(&status)),
            }
        }
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
}
