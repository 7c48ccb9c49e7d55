//! `signpost bench`: a bounded load generator for a running cluster.
//!
//! The legitimate workload runs from service identities `bench-0..N` (one per client task, so
//! each honest service has its own admission budget, as in production). With `--flood KIND` it
//! runs twice in one invocation, first alone and then while a flood runs from identities of
//! its own (`service/flood-1..8`, `reader/flood-r1..8`, or no certificate at all), and reports
//! how much of the unflooded throughput the legitimate clients kept.
//!
//! With `--target etcd --endpoints ...` the same closed- or open-loop clients send etcd `Put`
//! (with `--lease`, attached to a lease) for `register` and `Range` (serializable with
//! `--stale`) for `resolve`, with values of the size of a signed record, so one generator
//! measures both systems (`benches/compare-etcd.sh`).
//!
//! `--workload mixed` interleaves resolves, registrations and lease keep-alives in the ratio of
//! `--mix` (smooth round robin per client, the same order every run) and reports each kind
//! apart; `--workload watch` holds `--clients` watch streams on one service while one writer
//! registers, and reports the fan-out delay from each write's send to its event at every
//! watcher (`watch.rs`).
//!
//! The legitimate clients send pre-signed requests over plain gRPC, one connection each, and
//! do not verify answers: the bench measures the cluster, not the client library, and does the
//! same work per request for both targets. Latencies go into HDR histograms.
//!
//! Everything is made before the clock starts (certificates, bindings, signatures) and
//! everything is bounded: the duration, the number of clients, the flood's connections and
//! the number of records per client. Runs longer than [`PRESIGN_SECS_MAX`] (fills) sign each
//! record as they send it instead: a pre-signed record would be older than the registry's
//! replay window (five minutes) by the time it is sent, and refused as `expired`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use signpost_client::{Client, ClientConfig};
use signpost_identity::{Ca, Identity, IssueOptions, PeerRule, TlsFiles, TlsSettings, Trust};
use signpost_proto::etcd;
use signpost_proto::v1::registry_client::RegistryClient;
use signpost_proto::v1::{
    BindingPayload, Endpoint, Envelope, KeepAliveRequest, KeepAliveResponse, ListRequest,
    RecordPayload, RegisterRequest, ResolveRequest, WatchRequest,
};
use signpost_record::SigningKey;
use tonic::transport::Channel;

use crate::commands::now_ms;
use crate::ClientOpts;

mod mix;
mod watch;

use mix::{Mix, Op, Schedule};

/// Most legitimate client tasks.
const CLIENTS_MAX: usize = 1024;
/// Longest phase.
const DURATION_MAX_SECS: u64 = 600;
/// Most instances per register client (--instances).
const INSTANCES_MAX: usize = 100_000;
/// Most flood tasks (each with its own connection).
const FLOOD_CONNECTIONS_MAX: usize = 512;
/// Flood identities per kind.
const FLOOD_IDENTITIES: usize = 8;
/// Records pre-signed per legitimate client and phase, at most.
const SIGNED_PER_CLIENT_MAX: usize = 40_000;
/// Records pre-signed for the whole legitimate workload, at most (about 400 MB of envelopes in
/// the generator); also the most records a run that signs as it sends registers in all.
const SIGNED_TOTAL_MAX: usize = 1_100_000;
/// Longest run (all phases) whose records are signed before the clock: the last one sent is
/// then at most this old plus the preparation, well inside the registry's 300 s replay window.
const PRESIGN_SECS_MAX: u64 = 180;
/// Records pre-signed per flood identity; the flood cycles through them.
const FLOOD_SIGNED_PER_IDENTITY: usize = 2_000;
/// Distinct instances per flood identity (below the default per-service quota).
const FLOOD_INSTANCES: usize = 512;
/// Watch streams the watch flood tries to hold open.
const WATCH_STREAMS: usize = 2_000;
/// Watch streams per connection (below the server's streams_per_connection_max).
const WATCH_STREAMS_PER_CONNECTION: usize = 200;
/// Time-to-live of bench records: long enough to outlive any run.
const RECORD_TTL_SECS: u32 = 3_600;

/// What the legitimate clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Workload {
    /// Signed re-registrations of each client's own instance.
    Register,
    /// Linearizable resolves of each client's own service.
    Resolve,
    /// Resolves, registrations and keep-alives of each client's own instance, in the ratio of
    /// --mix.
    Mixed,
    /// --clients watch streams on one service (spread over the nodes) while one writer
    /// registers at --rate: the delay from each write's send to its event at every watcher.
    Watch,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Register => "register",
            Workload::Resolve => "resolve",
            Workload::Mixed => "mixed",
            Workload::Watch => "watch",
        }
    }

    /// The operations each client sends, in which ratio.
    fn mix(self, mix: Mix) -> Mix {
        match self {
            Workload::Register | Workload::Watch => Mix::only(Op::Register),
            Workload::Resolve => Mix::only(Op::Resolve),
            Workload::Mixed => mix,
        }
    }
}

/// What the flood sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum FloodKind {
    /// Valid signed registrations of new instances from 8 service identities, unthrottled.
    Write,
    /// Registrations whose signatures do not verify.
    BadSignature,
    /// Resolve and list from 8 reader identities, unthrottled.
    Read,
    /// TLS handshakes without a client certificate.
    Handshake,
    /// Thousands of watch streams from one identity, held open.
    Watch,
}

impl FloodKind {
    fn name(self) -> &'static str {
        match self {
            FloodKind::Write => "write",
            FloodKind::BadSignature => "bad-signature",
            FloodKind::Read => "read",
            FloodKind::Handshake => "handshake",
            FloodKind::Watch => "watch",
        }
    }
}

/// The system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Target {
    /// A Signpost cluster (the client config's endpoints).
    Signpost,
    /// An etcd v3 cluster (`--endpoints`, `--etcd-ca`, `--etcd-cert`, `--etcd-key`).
    Etcd,
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// The system under test.
    #[arg(long, value_enum, default_value = "signpost")]
    target: Target,
    /// etcd client URLs' host:port, comma-separated (--target etcd).
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// CA certificate (PEM) etcd's server certificates chain to (--target etcd).
    #[arg(long = "etcd-ca")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to etcd (--target etcd).
    #[arg(long = "etcd-cert")]
    etcd_cert: Option<PathBuf>,
    /// Key (PEM) of --etcd-cert.
    #[arg(long = "etcd-key")]
    etcd_key: Option<PathBuf>,
    /// Attach each etcd client's puts to a lease of its own, granted before the clock starts,
    /// as a registration with a time-to-live is (--target etcd, register).
    #[arg(long)]
    lease: bool,
    /// Resolve from the node asked (Signpost stale resolve, etcd serializable Range) instead
    /// of linearizably.
    #[arg(long)]
    stale: bool,
    /// Ask for audit evidence with every Signpost resolve (the checkpoint and proofs a
    /// verifying client gets): measures what proving answers costs the nodes.
    #[arg(long)]
    audit_proofs: bool,
    /// Send every Signpost client's requests to the members in turn (client i to member
    /// i mod N) instead of writes and linearizable reads to the leader: measures a cluster
    /// whose followers forward (`[raft] forward_to_leader`); without it, followers refuse.
    #[arg(long)]
    spread: bool,
    /// Legitimate workload.
    #[arg(long, value_enum, default_value = "register")]
    workload: Workload,
    /// Resolve this existing service (--workload resolve) from reader identities, instead of
    /// each client binding, registering and resolving a service of its own: measures resolves
    /// of a service a fill run made large.
    #[arg(long = "resolve-service")]
    resolve_service: Option<String>,
    /// RESOLVES:REGISTRATIONS:KEEPALIVES per client for --workload mixed (each 0..=1000).
    /// Etcd keep-alives renew each client's lease, which its puts carry.
    #[arg(long, default_value = "80:15:5")]
    mix: Mix,
    /// Instances each register client cycles through (i0, i1, ...): 1 renews one instance;
    /// more fills the registry (clients × instances in all), for scale measurements.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Legitimate client tasks (1..=1024), each its own service identity.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Operations per second per legitimate client (a steady rate, like an honest service;
    /// keep it within the node's per-identity budget); 0 runs each client closed-loop, as fast
    /// as the cluster answers.
    #[arg(long, default_value_t = 15)]
    rate: u32,
    /// Seconds per measured phase (1..=600).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Also measure while this flood runs.
    #[arg(long, value_enum)]
    flood: Option<FloodKind>,
    /// Run only the flood for --duration (no legitimate workload): a flood generator for tests.
    #[arg(long, requires = "flood")]
    flood_only: bool,
    /// Flood tasks, each with its own connection (1..=512).
    #[arg(long, default_value_t = 64)]
    flood_connections: usize,
    /// CA directory used to issue the bench's certificates (default: DIR/ca next to the
    /// client config).
    #[arg(long = "ca-dir")]
    ca_dir: Option<PathBuf>,
    #[command(flatten)]
    opts: ClientOpts,
}

/// Result of one measured phase of the legitimate workload.
#[derive(Debug, Clone)]
struct Phase {
    ok: u64,
    errors: u64,
    errors_by_code: BTreeMap<String, u64>,
    elapsed: Duration,
    latencies_us: Histogram<u64>,
    first_error: Option<String>,
    // Successful operations and their latencies per kind (one kind but in the mixed and watch
    // workloads).
    by_op: BTreeMap<&'static str, Histogram<u64>>,
    // Workload-specific figures, added to the JSON as they are.
    extra: serde_json::Map<String, Value>,
}

/// Latencies from 1 µs to 60 s at three significant digits: 0.1% error, a few hundred KiB.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|e| panic!("constant histogram bounds are valid: {e}"))
}

/// The ticker of a client sending `rate` operations per second; `None` (closed loop) for 0.
fn pace(rate: u32) -> Option<tokio::time::Interval> {
    (rate > 0).then(|| {
        let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        // A late operation does not cause a catch-up burst: the rate stays steady.
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    })
}

impl Phase {
    /// Counts a failed `op` by its gRPC code; the first failure's message is kept.
    fn count_error(&mut self, op: &str, status: tonic::Status) {
        let (code, message) = op_error(status);
        self.errors += 1;
        *self.errors_by_code.entry(code.to_string()).or_default() += 1;
        self.first_error
            .get_or_insert_with(|| format!("{op}: {code}: {message}"));
    }

    fn empty() -> Phase {
        Phase {
            ok: 0,
            errors: 0,
            errors_by_code: BTreeMap::new(),
            elapsed: Duration::ZERO,
            latencies_us: histogram(),
            first_error: None,
            by_op: BTreeMap::new(),
            extra: serde_json::Map::new(),
        }
    }

    fn ops_json(&self) -> Value {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let quantile = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        self.by_op
            .iter()
            .map(|(name, h)| {
                let figures = json!({
                    "ok": h.len(),
                    "ops_s": round2(h.len() as f64 / secs),
                    "p50_ms": round2(quantile(h, 0.5)),
                    "p99_ms": round2(quantile(h, 0.99)),
                    "max_ms": round2(h.max() as f64 / 1000.0),
                });
                (name.to_string(), figures)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        self.latencies_us.value_at_quantile(p / 100.0) as f64 / 1000.0
    }

    fn max_ms(&self) -> f64 {
        self.latencies_us.max() as f64 / 1000.0
    }
}

/// What the flood did, counted by its own tasks.
#[derive(Debug, Default)]
struct FloodStats {
    sent: AtomicU64,
    ok: AtomicU64,
    shed: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    // Instances whose registration was acknowledged, per service (write flood).
    acked: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl FloodStats {
    fn count(&self, result: &Result<(), tonic::Status>) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let counter = match result {
            Ok(()) => &self.ok,
            Err(s) if s.code() == tonic::Code::ResourceExhausted => &self.shed,
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) =>
            {
                &self.failed
            }
            Err(_) => &self.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn json(&self, kind: FloodKind) -> Value {
        let acked = self
            .acked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(service, instances)| (service.clone(), json!(instances.len())))
            .collect::<serde_json::Map<_, _>>();
        json!({
            "kind": kind.name(),
            "sent": self.sent.load(Ordering::Relaxed),
            "ok": self.ok.load(Ordering::Relaxed),
            "shed": self.shed.load(Ordering::Relaxed),
            "refused": self.refused.load(Ordering::Relaxed),
            "failed": self.failed.load(Ordering::Relaxed),
            "acked_instances": acked,
        })
    }
}

/// Everything made before the clock starts.
struct Setup {
    config: ClientConfig,
    admin: Client,
    ca: Ca,
    certs_dir: PathBuf,
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !(1..=CLIENTS_MAX).contains(&args.clients) {
        bail!("--clients must be in 1..={CLIENTS_MAX}");
    }
    if !(1..=DURATION_MAX_SECS).contains(&args.duration) {
        bail!("--duration must be in 1..={DURATION_MAX_SECS} seconds");
    }
    if !(1..=INSTANCES_MAX).contains(&args.instances) {
        bail!("--instances must be in 1..={INSTANCES_MAX}");
    }
    if !(1..=FLOOD_CONNECTIONS_MAX).contains(&args.flood_connections) {
        bail!("--flood-connections must be in 1..={FLOOD_CONNECTIONS_MAX}");
    }
    if args.resolve_service.is_some()
        && (args.workload != Workload::Resolve || args.target != Target::Signpost)
    {
        bail!("--resolve-service is for --workload resolve against Signpost");
    }
    if args.spread
        && (args.target != Target::Signpost
            || args.workload == Workload::Watch
            || args.workload.mix(args.mix).has(Op::KeepAlive))
    {
        bail!(
            "--spread is for Signpost register, resolve and mixed without keep-alives \
             (etcd clients are always spread; keep-alives are the leader's)"
        );
    }
    let duration = Duration::from_secs(args.duration);
    if args.workload == Workload::Watch {
        if args.flood.is_some() || args.lease || args.stale {
            bail!("--workload watch takes neither --flood, --lease nor --stale");
        }
        let measured = match args.target {
            Target::Etcd => watch::run_etcd(&args, duration).await?,
            Target::Signpost => watch::run_signpost(&prepare(&args)?, &args, duration).await?,
        };
        report(&args, None, &measured, None);
        return Ok(());
    }
    if args.target == Target::Etcd {
        if args.flood.is_some() {
            bail!("--flood measures Signpost's admission control; it has no etcd form");
        }
        let legit = Legit::prepare_etcd(&args).await?;
        let measured = legit.run_phase("etcd", duration, 0).await;
        report(&args, None, &measured, None);
        return Ok(());
    }
    if args.lease {
        bail!("--lease is for --target etcd: every Signpost registration has a time-to-live");
    }
    let setup = prepare(&args)?;
    if args.flood_only {
        let Some(kind) = args.flood else {
            bail!("--flood-only needs --flood KIND");
        };
        let flood = Flood::prepare(&setup, kind, args.flood_connections).await?;
        let stats = flood.run_for(duration).await;
        crate::output::print_json(&json!({ "flood": stats.json(kind) }));
        return Ok(());
    }

    let legit = Legit::prepare(&setup, &args).await?;
    let unflooded = legit.run_phase("unflooded", duration, 0).await;
    let Some(kind) = args.flood else {
        report(&args, None, &unflooded, None);
        return Ok(());
    };
    let flood = Flood::prepare(&setup, kind, args.flood_connections).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let flood_task = tokio::spawn(flood.run_until(Arc::clone(&stop)));
    // Let the flood reach full strength before the measurement starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flooded = legit.run_phase(kind.name(), duration, 1).await;
    stop.store(true, Ordering::Release);
    let stats = flood_task.await.context("flood task")?;
    report(&args, Some(&unflooded), &flooded, Some((kind, &stats)));
    Ok(())
}

fn prepare(args: &BenchArgs) -> anyhow::Result<Setup> {
    let config_path = args
        .opts
        .config
        .clone()
        .context("no client config: pass --config DIR/client.toml or set SIGNPOST_CONFIG")?;
    let config = ClientConfig::load(&config_path)?;
    let base = config_path.parent().unwrap_or(Path::new("."));
    let ca_dir = args.ca_dir.clone().unwrap_or_else(|| base.join("ca"));
    let ca =
        Ca::load(&ca_dir).with_context(|| format!("loading the CA in {}", ca_dir.display()))?;
    let certs_dir = base.join("bench-certs");
    std::fs::create_dir_all(&certs_dir)
        .with_context(|| format!("creating {}", certs_dir.display()))?;
    let admin = Client::connect(&config)?;
    Ok(Setup {
        config,
        admin,
        ca,
        certs_dir,
    })
}

impl Setup {
    /// Issues (once per run) a certificate for `identity`; returns the file prefix.
    fn issue(&self, identity: &Identity, name: &str) -> anyhow::Result<PathBuf> {
        let prefix = self.certs_dir.join(name);
        self.ca
            .issue(identity, &IssueOptions::default(), &prefix)
            .with_context(|| format!("issuing a certificate for {name}"))?;
        Ok(prefix)
    }

    fn config_as(&self, prefix: &Path) -> ClientConfig {
        let mut config = self.config.clone();
        config.tls.cert = prefix.with_extension("crt");
        config.tls.key = prefix.with_extension("key");
        config
    }

    /// A fresh signing key bound to `service` by the admin key of the client config.
    async fn bind_new_key(&self, service: &str) -> anyhow::Result<SigningKey> {
        let admin_key_path = self
            .config
            .admin_key
            .clone()
            .context("the client config has no admin_key; the bench binds keys as admin")?;
        let admin_key = signpost_record::read_signing_key(&admin_key_path)
            .with_context(|| format!("reading {}", admin_key_path.display()))?;
        let key = signpost_record::generate_signing_key();
        let payload = BindingPayload {
            service: service.to_string(),
            public_keys: vec![key.verifying_key().to_bytes().to_vec()],
            version: now_ms(),
            issued_at_ms: now_ms(),
            not_before_ms: 0,
            not_after_ms: 0,
        };
        self.admin
            .bind(signpost_record::sign_binding(&admin_key, &payload))
            .await
            .with_context(|| format!("binding a key to {service}"))?;
        Ok(key)
    }

    /// A raw gRPC client presenting `prefix` to `addr`: no retries, no verification.
    fn raw(&self, prefix: &Path, addr: &str) -> anyhow::Result<RegistryClient<Channel>> {
        let files = TlsFiles {
            ca: self.config.tls.ca.clone(),
            cert: prefix.with_extension("crt"),
            key: prefix.with_extension("key"),
            crl: None,
        };
        let tls = signpost_identity::client_config_from_files(&files, PeerRule::AnyNode)?;
        let channel = signpost_identity::connect_channel(addr, tls, Duration::from_secs(3))?;
        Ok(RegistryClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
    }

    /// The client address of the current leader (writes are aimed there).
    async fn leader_addr(&self) -> anyhow::Result<String> {
        let status = self.admin.status().await?;
        status
            .members
            .iter()
            .find(|m| m.id == status.leader_id)
            .map(|m| m.addr.clone())
            .context("the cluster has no leader")
    }
}

/// Records per client and phase: enough for the run, within the memory bounds of signing ahead.
fn records_per_client(args: &BenchArgs, phases: usize) -> usize {
    let per_client = if args.rate > 0 {
        // The paced workload needs exactly duration × rate, plus slack.
        args.duration as usize * args.rate as usize * 11 / 10 + 10
    } else {
        // Closed loop: more than any cluster on one machine answers (about 25,000/s in all).
        args.duration as usize * 25_000 / args.clients
    };
    per_client
        .clamp(1, SIGNED_PER_CLIENT_MAX)
        .min(SIGNED_TOTAL_MAX / (args.clients * phases))
}

fn record(
    key: &SigningKey,
    service: &str,
    instance: &str,
    sequence: u64,
    trust_domain: &str,
) -> Envelope {
    let payload = RecordPayload {
        service: service.into(),
        instance: instance.into(),
        endpoints: vec![Endpoint {
            host: "10.0.0.1".into(),
            port: 8443,
            protocol: "grpc".into(),
        }],
        metadata: Default::default(),
        tls_identity: format!("spiffe://{trust_domain}/service/{service}"),
        sequence,
        issued_at_ms: now_ms(),
        ttl_secs: RECORD_TTL_SECS,
    };
    signpost_record::sign_record(key, &payload)
}

/// The legitimate clients: per task a connection and what it sends.
struct Legit {
    mix: Mix,
    rate: u32,
    tasks: Vec<Arc<LegitTask>>,
    // Records in the first client's answer before the clock (Signpost): the size of what a
    // resolve returns.
    records_per_resolve: Option<usize>,
}

/// One open bidirectional stream used as request/response pairs: one request in flight at a
/// time (keep-alives: each client renews one lease, and waits for the answer).
struct Duplex<Req, Resp> {
    tx: tokio::sync::mpsc::Sender<Req>,
    rx: tonic::Streaming<Resp>,
}

/// Bound of a duplex stream's request queue: one request is in flight at a time.
const DUPLEX_QUEUE: usize = 2;

/// The sender and request stream to open a [`Duplex`] with.
fn duplex_channel<Req>() -> (
    tokio::sync::mpsc::Sender<Req>,
    tokio_stream::wrappers::ReceiverStream<Req>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(DUPLEX_QUEUE);
    (tx, tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Opens a duplex stream by sending `first` and reading its answer: grpc-go servers (etcd)
/// send response headers only with the first message, so the call does not complete before a
/// request is in.
async fn open_duplex<Req, Resp>(
    tx: &tokio::sync::mpsc::Sender<Req>,
    first: Req,
    call: impl std::future::Future<
        Output = Result<tonic::Response<tonic::Streaming<Resp>>, tonic::Status>,
    >,
) -> anyhow::Result<tonic::Streaming<Resp>> {
    tx.send(first)
        .await
        .map_err(|_| anyhow::anyhow!("the request stream closed before it opened"))?;
    let mut rx = call.await?.into_inner();
    rx.message()
        .await?
        .context("the stream ended before its first answer")?;
    Ok(rx)
}

impl<Req, Resp> Duplex<Req, Resp> {
    async fn call(&mut self, request: Req) -> Result<Resp, tonic::Status> {
        self.tx
            .send(request)
            .await
            .map_err(|_| tonic::Status::unavailable("the stream is closed"))?;
        self.rx
            .message()
            .await?
            .ok_or_else(|| tonic::Status::unavailable("the stream ended"))
    }
}

type SignpostKeepAlive = Duplex<KeepAliveRequest, KeepAliveResponse>;

/// Where a Signpost task's registrations come from.
enum Signing {
    /// The workload has no registrations.
    None,
    /// Per phase, records signed before the clock (short runs: signing stays out of the
    /// measurement).
    Ahead(Vec<Vec<Envelope>>),
    /// Records signed as they are sent (long runs), at most `per_phase` per phase.
    AsSent(Box<Signer>),
}

/// What a task needs to sign its `n`th record of a phase when it sends it.
struct Signer {
    key: SigningKey,
    service: String,
    trust_domain: String,
    instances: usize,
    // Sequence of the instance's first registration, before the clock; record n of phase p
    // has base + 1 + p * per_phase + n, so sequences grow as they are sent.
    base: u64,
    per_phase: usize,
}

impl Signer {
    fn sign(&self, phase: usize, n: usize) -> Envelope {
        let sequence = self.base + 1 + (phase * self.per_phase + n) as u64;
        let instance = format!("i{}", n % self.instances);
        record(
            &self.key,
            &self.service,
            &instance,
            sequence,
            &self.trust_domain,
        )
    }
}

impl Signing {
    /// The `n`th registration of `phase`; `None` past the phase's bound.
    fn get(&self, phase: usize, n: usize) -> Option<Envelope> {
        match self {
            Signing::None => None,
            Signing::Ahead(phases) => phases.get(phase)?.get(n).cloned(),
            Signing::AsSent(signer) => (n < signer.per_phase).then(|| signer.sign(phase, n)),
        }
    }
}
type EtcdKeepAlive = Duplex<etcd::LeaseKeepAliveRequest, etcd::LeaseKeepAliveResponse>;

enum LegitTask {
    Signpost {
        // Writes and linearizable reads go to the leader (found before the clock starts;
        // refusals during the run are counted, not followed); stale reads to this task's node.
        client: RegistryClient<Channel>,
        service: String,
        stale: bool,
        // Ask for audit evidence with each resolve.
        audit_proofs: bool,
        // The registrations the task sends, in order.
        signed: Signing,
        // Renewals of the task's instance (mixed workload with keep-alives).
        keepalive: Option<tokio::sync::Mutex<SignpostKeepAlive>>,
    },
    Etcd {
        kv: etcd::kv_client::KvClient<Channel>,
        key: Vec<u8>,
        // A signed record's bytes: etcd stores values of the size Signpost stores.
        value: Vec<u8>,
        lease: i64,
        serializable: bool,
        // Renewals of `lease` (mixed workload with keep-alives).
        keepalive: Option<tokio::sync::Mutex<EtcdKeepAlive>>,
    },
}

/// Outcome of one operation: the gRPC code's name and the message on failure.
type OpResult = Result<(), (&'static str, String)>;

fn op_error(status: tonic::Status) -> (&'static str, String) {
    (
        signpost_client::code_name(status.code()),
        status.message().to_string(),
    )
}

impl LegitTask {
    /// The `n`th operation of kind `op` in `phase`; `None` when the task has run out of
    /// pre-signed records.
    async fn op(&self, op: Op, phase: usize, n: usize) -> Option<OpResult> {
        let result = match (self, op) {
            (LegitTask::Signpost { client, signed, .. }, Op::Register) => {
                let envelope = signed.get(phase, n)?;
                client
                    .clone()
                    .register(RegisterRequest {
                        envelope: Some(envelope),
                    })
                    .await
                    .map(|_| ())
            }
            (
                LegitTask::Signpost {
                    client,
                    service,
                    stale,
                    audit_proofs,
                    ..
                },
                Op::Resolve,
            ) => client
                .clone()
                .resolve(ResolveRequest {
                    service: service.clone(),
                    stale: *stale,
                    audit: audit_proofs.then(|| signpost_proto::v1::AuditEvidenceRequest {
                        prove: true,
                        ..Default::default()
                    }),
                })
                .await
                .map(|_| ()),
            (
                LegitTask::Etcd {
                    kv,
                    key,
                    value,
                    lease,
                    ..
                },
                Op::Register,
            ) => kv
                .clone()
                .put(etcd::PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    lease: *lease,
                })
                .await
                .map(|_| ()),
            (
                LegitTask::Etcd {
                    kv,
                    key,
                    serializable,
                    ..
                },
                Op::Resolve,
            ) => kv
                .clone()
                .range(etcd::RangeRequest {
                    key: key.clone(),
                    serializable: *serializable,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            (
                LegitTask::Signpost {
                    keepalive: Some(stream),
                    service,
                    ..
                },
                Op::KeepAlive,
            ) => {
                let renewal = KeepAliveRequest {
                    service: service.clone(),
                    instance: "i0".into(),
                };
                match stream.lock().await.call(renewal).await {
                    Ok(answer) if answer.ttl_secs == 0 => Err(tonic::Status::not_found(format!(
                        "{service}/i0 is unknown to the leader"
                    ))),
                    Ok(_) => Ok(()),
                    Err(status) => Err(status),
                }
            }
            (
                LegitTask::Etcd {
                    keepalive: Some(stream),
                    lease,
                    ..
                },
                Op::KeepAlive,
            ) => {
                let renewal = etcd::LeaseKeepAliveRequest { id: *lease };
                match stream.lock().await.call(renewal).await {
                    Ok(answer) if answer.ttl <= 0 => Err(tonic::Status::not_found(format!(
                        "lease {lease:x} is unknown"
                    ))),
                    Ok(_) => Ok(()),
                    Err(status) => Err(status),
                }
            }
            (_, Op::KeepAlive) => Err(tonic::Status::failed_precondition(
                "no keep-alive stream was opened for this task",
            )),
        };
        Some(result.map_err(op_error))
    }
}

impl Legit {
    async fn prepare(setup: &Setup, args: &BenchArgs) -> anyhow::Result<Legit> {
        let phases = if args.flood.is_some() { 2 } else { 1 };
        let per_client = records_per_client(args, phases);
        let sign_ahead = args.duration * phases as u64 <= PRESIGN_SECS_MAX;
        let progress = bar(
            args.clients as u64,
            "preparing clients (certificates, keys, signatures)",
        );
        let leader = setup.leader_addr().await?;
        let endpoints = &setup.config.endpoints;
        let mut tasks = Vec::with_capacity(args.clients);
        let base = now_ms() * 1_000;
        let mix = args.workload.mix(args.mix);
        let td = &setup.config.trust_domain;
        let mut records_seen = None;
        for i in 0..args.clients {
            // Each client resolves (and registers) its own service, or, with
            // --resolve-service, is a reader of that existing service: nothing to bind.
            let (service, prefix, signed) = if let Some(service) = &args.resolve_service {
                let name = format!("bench-r{i}");
                let prefix = setup.issue(&Identity::Reader(name.clone()), &name)?;
                (service.clone(), prefix, Signing::None)
            } else {
                let service = format!("bench-{i}");
                let prefix = setup.issue(&Identity::Service(service.clone()), &service)?;
                let key = setup.bind_new_key(&service).await?;
                // The instance exists before the clock starts, so resolves find it and
                // registrations are renewals.
                let client = Client::connect(&setup.config_as(&prefix))?;
                client
                    .register(record(&key, &service, "i0", base, td))
                    .await
                    .with_context(|| format!("registering {service}/i0"))?;
                let signer = Signer {
                    key,
                    service: service.clone(),
                    trust_domain: td.clone(),
                    instances: args.instances,
                    base,
                    per_phase: per_client,
                };
                let signed = match (mix.has(Op::Register), sign_ahead) {
                    (false, _) => Signing::None,
                    (true, true) => Signing::Ahead(
                        (0..phases)
                            .map(|phase| (0..per_client).map(|n| signer.sign(phase, n)).collect())
                            .collect(),
                    ),
                    (true, false) => Signing::AsSent(Box::new(signer)),
                };
                (service, prefix, signed)
            };
            // Mixed clients send everything to the leader (their writes must go there), unless
            // the followers forward.
            let addr = if args.spread || (args.stale && args.workload == Workload::Resolve) {
                &endpoints[i % endpoints.len()]
            } else {
                &leader
            };
            // Connect now, one client at a time: handshakes are not part of the measurement,
            // and 32 at once would meet the per-source handshake cap (8 by default).
            let mut raw = setup.raw(&prefix, addr)?;
            let answer = raw
                .resolve(ResolveRequest {
                    service: service.clone(),
                    stale: true,
                    audit: None,
                })
                .await
                .with_context(|| format!("connecting to {addr} and resolving {service}"))?
                .into_inner();
            records_seen.get_or_insert(answer.service.map_or(0, |s| s.records.len()));
            let keepalive = if mix.has(Op::KeepAlive) {
                let (tx, outbound) = duplex_channel();
                let first = KeepAliveRequest {
                    service: service.clone(),
                    instance: "i0".into(),
                };
                let rx = open_duplex(&tx, first, raw.keep_alive(outbound))
                    .await
                    .with_context(|| format!("opening a keep-alive stream for {service}"))?;
                Some(tokio::sync::Mutex::new(Duplex { tx, rx }))
            } else {
                None
            };
            tasks.push(Arc::new(LegitTask::Signpost {
                client: raw,
                service,
                stale: args.stale,
                audit_proofs: args.audit_proofs,
                signed,
                keepalive,
            }));
            progress.inc(1);
        }
        progress.finish_and_clear();
        Ok(Legit {
            mix,
            rate: args.rate,
            tasks,
            records_per_resolve: records_seen,
        })
    }

    async fn prepare_etcd(args: &BenchArgs) -> anyhow::Result<Legit> {
        let tls = etcd_tls(args)?;
        let value = etcd_value();
        let mix = args.workload.mix(args.mix);
        let progress = bar(args.clients as u64, "preparing etcd clients");
        let mut tasks = Vec::with_capacity(args.clients);
        for i in 0..args.clients {
            let addr = &args.endpoints[i % args.endpoints.len()];
            let channel = etcd_connect(&tls, addr).await?;
            let lease = if args.lease || mix.has(Op::KeepAlive) {
                etcd::lease_client::LeaseClient::new(channel.clone())
                    .lease_grant(etcd::LeaseGrantRequest {
                        ttl: i64::from(RECORD_TTL_SECS),
                        id: 0,
                    })
                    .await
                    .with_context(|| format!("granting a lease at {addr}"))?
                    .into_inner()
                    .id
            } else {
                0
            };
            let key = format!("/signpost-bench/bench-{i}/i0").into_bytes();
            let channel_for_leases = channel.clone();
            let mut kv = etcd::kv_client::KvClient::new(channel);
            // The key exists before the clock starts, as the Signpost instance does.
            kv.put(etcd::PutRequest {
                key: key.clone(),
                value: value.clone(),
                lease,
            })
            .await
            .with_context(|| format!("putting {} at {addr}", String::from_utf8_lossy(&key)))?;
            let keepalive = if mix.has(Op::KeepAlive) {
                let (tx, outbound) = duplex_channel();
                let mut leases = etcd::lease_client::LeaseClient::new(channel_for_leases);
                let first = etcd::LeaseKeepAliveRequest { id: lease };
                let rx = open_duplex(&tx, first, leases.lease_keep_alive(outbound))
                    .await
                    .with_context(|| format!("opening a lease keep-alive stream at {addr}"))?;
                Some(tokio::sync::Mutex::new(Duplex { tx, rx }))
            } else {
                None
            };
            tasks.push(Arc::new(LegitTask::Etcd {
                kv,
                key,
                value: value.clone(),
                lease,
                serializable: args.stale,
                keepalive,
            }));
            progress.inc(1);
        }
        progress.finish_and_clear();
        Ok(Legit {
            mix,
            rate: args.rate,
            tasks,
            records_per_resolve: None,
        })
    }

    async fn run_phase(&self, label: &str, duration: Duration, phase: usize) -> Phase {
        let progress = bar(duration.as_secs(), &format!("{label}: running"));
        let ok = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let deadline = started + duration;
        let mut handles = Vec::new();
        for task in &self.tasks {
            let task = Arc::clone(task);
            let mut schedule = Schedule::new(self.mix);
            let ok = Arc::clone(&ok);
            let mut pace = pace(self.rate);
            handles.push(tokio::spawn(async move {
                let mut latencies = histogram();
                let mut by_op: BTreeMap<&'static str, Histogram<u64>> = BTreeMap::new();
                let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
                let mut first_error = None;
                // Operations sent so far, per kind (registrations index the pre-signed ones).
                let mut sent: BTreeMap<Op, usize> = BTreeMap::new();
                while Instant::now() < deadline {
                    if let Some(pace) = pace.as_mut() {
                        pace.tick().await;
                        if Instant::now() >= deadline {
                            break;
                        }
                    }
                    let op = schedule.next_op();
                    let n = sent.entry(op).or_default();
                    let t0 = Instant::now();
                    // Out of records: the bound on this phase's work.
                    let Some(result) = task.op(op, phase, *n).await else {
                        break;
                    };
                    *n += 1;
                    match result {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            let micros = t0.elapsed().as_micros() as u64;
                            latencies.saturating_record(micros);
                            by_op
                                .entry(op.name())
                                .or_insert_with(histogram)
                                .saturating_record(micros);
                        }
                        Err((code, message)) => {
                            *errors.entry(code).or_default() += 1;
                            first_error
                                .get_or_insert_with(|| format!("{}: {code}: {message}", op.name()));
                        }
                    }
                }
                (latencies, by_op, errors, first_error)
            }));
        }
        let ticker = {
            let progress = progress.clone();
            let ok = Arc::clone(&ok);
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    progress.set_position(started.elapsed().as_secs().min(duration.as_secs()));
                    progress.set_message(format!("ok {}", ok.load(Ordering::Relaxed)));
                }
            })
        };
        let mut phase_result = Phase::empty();
        for handle in handles {
            if let Ok((latencies, by_op, errors, first_error)) = handle.await {
                // Same bounds on both sides, so adding cannot fail.
                let _ = phase_result.latencies_us.add(&latencies);
                for (name, h) in by_op {
                    let _ = phase_result
                        .by_op
                        .entry(name)
                        .or_insert_with(histogram)
                        .add(&h);
                }
                for (code, count) in errors {
                    phase_result.errors += count;
                    *phase_result
                        .errors_by_code
                        .entry(code.to_string())
                        .or_default() += count;
                }
                if phase_result.first_error.is_none() {
                    phase_result.first_error = first_error;
                }
            } else {
                phase_result.errors += 1;
                *phase_result
                    .errors_by_code
                    .entry("TASK_FAILED".into())
                    .or_default() += 1;
            }
        }
        phase_result.elapsed = started.elapsed();
        phase_result.ok = ok.load(Ordering::Relaxed);
        if let (true, Some(records)) = (self.mix.has(Op::Resolve), self.records_per_resolve) {
            phase_result
                .extra
                .insert("records_per_resolve".into(), json!(records));
        }
        ticker.abort();
        progress.finish_and_clear();
        phase_result
    }
}

/// The client TLS configuration for etcd from --etcd-ca, --etcd-cert and --etcd-key.
fn etcd_tls(args: &BenchArgs) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    if args.endpoints.is_empty() {
        bail!("--target etcd needs --endpoints host:port[,host:port...]");
    }
    let read = |flag: &str, path: &Option<PathBuf>| -> anyhow::Result<Vec<u8>> {
        let path = path
            .as_ref()
            .with_context(|| format!("--target etcd needs {flag}"))?;
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    };
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(
            "--etcd-ca",
            &args.etcd_ca,
        )?))
        .identity(tonic::transport::Identity::from_pem(
            read("--etcd-cert", &args.etcd_cert)?,
            read("--etcd-key", &args.etcd_key)?,
        )))
}

/// One connection to the etcd member at `addr`.
async fn etcd_connect(
    tls: &tonic::transport::ClientTlsConfig,
    addr: &str,
) -> anyhow::Result<Channel> {
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .with_context(|| format!("etcd endpoint {addr}"))?
        .tls_config(tls.clone())
        .context("etcd TLS configuration")?
        .connect_timeout(Duration::from_secs(3))
        // Bounds each call until its response headers; a stream's messages are not bounded.
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to etcd at {addr}"))
}

/// A value of the size of what a Signpost registration stores: a signed record.
fn etcd_value() -> Vec<u8> {
    let key = signpost_record::generate_signing_key();
    prost::Message::encode_to_vec(&record(&key, "bench-0", "i0", 1, "signpost.local"))
}

/// A prepared flood: identities, clients and payloads, ready to fire.
struct Flood {
    kind: FloodKind,
    workers: Vec<FloodWorker>,
    stats: Arc<FloodStats>,
}

enum FloodWorker {
    Register {
        client: RegistryClient<Channel>,
        service: String,
        envelopes: Arc<Vec<(String, Envelope)>>,
        offset: usize,
    },
    Read {
        client: RegistryClient<Channel>,
        service: String,
    },
    Handshake {
        addr: String,
        tls: Arc<rustls::ClientConfig>,
    },
    Watch {
        client: RegistryClient<Channel>,
        streams: usize,
    },
}

impl Flood {
    async fn prepare(setup: &Setup, kind: FloodKind, connections: usize) -> anyhow::Result<Flood> {
        let leader = setup.leader_addr().await?;
        let endpoints = setup.config.endpoints.clone();
        let td = setup.config.trust_domain.clone();
        let mut workers = Vec::new();
        match kind {
            FloodKind::Write | FloodKind::BadSignature => {
                let base = now_ms() * 1_000;
                let mut per_identity = Vec::new();
                for i in 1..=FLOOD_IDENTITIES {
                    let service = format!("flood-{i}");
                    let prefix = setup.issue(&Identity::Service(service.clone()), &service)?;
                    let key = setup.bind_new_key(&service).await?;
                    let envelopes: Vec<(String, Envelope)> = (0..FLOOD_SIGNED_PER_IDENTITY)
                        .map(|j| {
                            let instance = format!("f{}", j % FLOOD_INSTANCES);
                            let mut e = record(&key, &service, &instance, base + j as u64, &td);
                            if kind == FloodKind::BadSignature {
                                // Valid shape, wrong signature: only verification catches it.
                                if let Some(b) = e.signature.first_mut() {
                                    *b ^= 0x01;
                                }
                            }
                            (instance, e)
                        })
                        .collect();
                    per_identity.push((service, prefix, Arc::new(envelopes)));
                }
                for w in 0..connections {
                    let (service, prefix, envelopes) = &per_identity[w % per_identity.len()];
                    workers.push(FloodWorker::Register {
                        client: setup.raw(prefix, &leader)?,
                        service: service.clone(),
                        envelopes: Arc::clone(envelopes),
                        offset: w / per_identity.len(),
                    });
                }
            }
            FloodKind::Read => {
                let mut prefixes = Vec::new();
                for i in 1..=FLOOD_IDENTITIES {
                    let name = format!("flood-r{i}");
                    prefixes.push(setup.issue(&Identity::Reader(name.clone()), &name)?);
                }
                for w in 0..connections {
                    let addr = &endpoints[w % endpoints.len()];
                    workers.push(FloodWorker::Read {
                        client: setup.raw(&prefixes[w % prefixes.len()], addr)?,
                        service: "bench-0".to_string(),
                    });
                }
            }
            FloodKind::Handshake => {
                let files = TlsFiles {
                    ca: setup.config.tls.ca.clone(),
                    cert: setup.config.tls.cert.clone(),
                    key: setup.config.tls.key.clone(),
                    crl: None,
                };
                let trust = Trust::from_files(&files)?;
                let tls = signpost_identity::client_config_anonymous(
                    &trust,
                    &TlsSettings::default(),
                    PeerRule::AnyNode,
                )?;
                for w in 0..connections {
                    workers.push(FloodWorker::Handshake {
                        addr: endpoints[w % endpoints.len()].clone(),
                        tls: Arc::clone(&tls),
                    });
                }
            }
            FloodKind::Watch => {
                let prefix = setup.issue(&Identity::Reader("flood-w1".into()), "flood-w1")?;
                let channels = WATCH_STREAMS.div_ceil(WATCH_STREAMS_PER_CONNECTION);
                for c in 0..channels {
                    let addr = &endpoints[c % endpoints.len()];
                    workers.push(FloodWorker::Watch {
                        client: setup.raw(&prefix, addr)?,
                        streams: WATCH_STREAMS_PER_CONNECTION,
                    });
                }
            }
        }
        Ok(Flood {
            kind,
            workers,
            stats: Arc::new(FloodStats::default()),
        })
    }

    async fn run_for(self, duration: Duration) -> Arc<FloodStats> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopper = {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                tokio::time::sleep(duration).await;
                stop.store(true, Ordering::Release);
            })
        };
        let progress = bar(duration.as_secs(), &format!("flood {}", self.kind.name()));
        let stats = self.run_until(stop).await;
        stopper.abort();
        progress.finish_and_clear();
        stats
    }

    async fn run_until(self, stop: Arc<AtomicBool>) -> Arc<FloodStats> {
        let mut handles = Vec::new();
        for worker in self.workers {
            let stats = Arc::clone(&self.stats);
            let stop = Arc::clone(&stop);
            handles.push(tokio::spawn(worker.run(stats, stop)));
        }
        for handle in handles {
            let _ = handle.await;
        }
        self.stats
    }
}

impl FloodWorker {
    async fn run(self, stats: Arc<FloodStats>, stop: Arc<AtomicBool>) {
        let stopped = || stop.load(Ordering::Acquire);
        match self {
            FloodWorker::Register {
                mut client,
                service,
                envelopes,
                offset,
            } => {
                let mut n = offset;
                while !stopped() {
                    // Ignores every retry hint on purpose: this is the abuser.
                    let (instance, envelope) = &envelopes[n % envelopes.len()];
                    n += 1;
                    let result = client
                        .register(RegisterRequest {
                            envelope: Some(envelope.clone()),
                        })
                        .await
                        .map(|_| ());
                    if result.is_ok() {
                        stats
                            .acked
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(service.clone())
                            .or_default()
                            .insert(instance.clone());
                    }
                    stats.count(&result);
                }
            }
            FloodWorker::Read {
                mut client,
                service,
            } => {
                let mut n = 0u64;
                while !stopped() {
                    n += 1;
                    let result = if n.is_multiple_of(4) {
                        client
                            .list(ListRequest {
                                stale: false,
                                ..Default::default()
                            })
                            .await
                            .map(|_| ())
                    } else {
                        client
                            .resolve(ResolveRequest {
                                service: service.clone(),
                                stale: false,
                                audit: None,
                            })
                            .await
                            .map(|_| ())
                    };
                    stats.count(&result);
                }
            }
            FloodWorker::Handshake { addr, tls } => {
                let connector = tokio_rustls::TlsConnector::from(tls);
                let host = addr
                    .rsplit_once(':')
                    .map(|(h, _)| h.to_string())
                    .unwrap_or_else(|| addr.clone());
                let Ok(name) = rustls_pki_types::ServerName::try_from(host) else {
                    return;
                };
                while !stopped() {
                    let attempt = async {
                        let tcp = tokio::net::TcpStream::connect(&addr).await?;
                        let mut tls = connector.connect(name.clone(), tcp).await?;
                        // TLS 1.3: the server judges the (missing) client certificate after
                        // the client finished; reading shows the refusal.
                        let mut buf = [0u8; 1];
                        tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await
                    };
                    let result = tokio::time::timeout(Duration::from_secs(2), attempt).await;
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                    match result {
                        Ok(Ok(n)) if n > 0 => stats.ok.fetch_add(1, Ordering::Relaxed),
                        _ => stats.refused.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
            FloodWorker::Watch { client, streams } => {
                let mut held = Vec::new();
                for _ in 0..streams {
                    if stopped() {
                        break;
                    }
                    let mut c = client.clone();
                    let result = c
                        .watch(WatchRequest {
                            service: "bench-0".into(),
                            prefix: false,
                            from_revision: 0,
                            audit: None,
                        })
                        .await;
                    match result {
                        Ok(stream) => {
                            held.push(stream.into_inner());
                            stats.count(&Ok(()));
                        }
                        Err(status) => stats.count(&Err(status)),
                    }
                }
                // Hold the streams open until the flood ends.
                while !stopped() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                drop(held);
            }
        }
    }
}

fn bar(len: u64, message: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(message.to_string());
    bar
}

fn report(
    args: &BenchArgs,
    unflooded: Option<&Phase>,
    measured: &Phase,
    flood: Option<(FloodKind, &FloodStats)>,
) {
    let workload = args.workload.name();
    let target = match args.target {
        Target::Signpost => "signpost",
        Target::Etcd => "etcd",
    };
    let mut value = json!({
        "target": target,
        "lease": args.lease,
        "stale": args.stale,
        "workload": workload,
        "clients": args.clients,
        "rate_per_client": args.rate,
        "instances_per_client": args.instances,
        "duration_s": args.duration,
        "throughput_ops_s": round2(measured.throughput()),
        "p50_ms": round2(measured.percentile_ms(50.0)),
        "p90_ms": round2(measured.percentile_ms(90.0)),
        "p99_ms": round2(measured.percentile_ms(99.0)),
        "max_ms": round2(measured.max_ms()),
        "ok": measured.ok,
        "errors": measured.errors,
        "errors_by_code": measured.errors_by_code,
        "first_error": measured.first_error,
        "ops": measured.ops_json(),
    });
    if args.workload == Workload::Mixed {
        value["mix"] = json!(args.mix.text());
    }
    for (k, v) in &measured.extra {
        value[k.as_str()] = v.clone();
    }
    if let (Some(base), Some((kind, stats))) = (unflooded, flood) {
        let kept = measured.throughput() / base.throughput().max(1e-9);
        value["unflooded_throughput_ops_s"] = json!(round2(base.throughput()));
        value["unflooded_p50_ms"] = json!(round2(base.percentile_ms(50.0)));
        value["unflooded_p99_ms"] = json!(round2(base.percentile_ms(99.0)));
        value["unflooded_ok"] = json!(base.ok);
        value["unflooded_errors"] = json!(base.errors);
        value["legit_throughput_ops_s"] = json!(round2(measured.throughput()));
        value["kept"] = json!(round2(kept));
        value["flood"] = stats.json(kind);
    }
    if args.opts.json {
        crate::output::print_json(&value);
        return;
    }
    println!(
        "{:<16} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "phase", "ops/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "ok", "errors"
    );
    let row = |name: &str, p: &Phase| {
        println!(
            "{:<16} {:>12.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9} {:>7}",
            name,
            p.throughput(),
            p.percentile_ms(50.0),
            p.percentile_ms(90.0),
            p.percentile_ms(99.0),
            p.max_ms(),
            p.ok,
            p.errors
        );
        for (code, count) in &p.errors_by_code {
            println!("{:<16}   {code}: {count}", "");
        }
    };
    if let Some(base) = unflooded {
        row("unflooded", base);
    }
    let name = flood.map(|(k, _)| k.name()).unwrap_or(target);
    row(name, measured);
    if measured.by_op.len() > 1 {
        for (op, h) in &measured.by_op {
            println!(
                "  {:<14} {:>12.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9}",
                op,
                h.len() as f64 / measured.elapsed.as_secs_f64().max(1e-9),
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.9) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.max() as f64 / 1000.0,
                h.len(),
            );
        }
    }
    for (k, v) in &measured.extra {
        println!("{k}: {v}");
    }
    if let (Some(base), Some((kind, stats))) = (unflooded, flood) {
        println!(
            "kept {:.0}% of the unflooded throughput; flood {}: sent {}, ok {}, shed {}, refused {}, failed {}",
            100.0 * measured.throughput() / base.throughput().max(1e-9),
            kind.name(),
            stats.sent.load(Ordering::Relaxed),
            stats.ok.load(Ordering::Relaxed),
            stats.shed.load(Ordering::Relaxed),
            stats.refused.load(Ordering::Relaxed),
            stats.failed.load(Ordering::Relaxed),
        );
    }
    if let Some(e) = &measured.first_error {
        println!("first error: {e}");
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(per_phase: usize) -> Signer {
        Signer {
            key: SigningKey::from_bytes(&[7; 32]),
            service: "bench-0".into(),
            trust_domain: "example.org".into(),
            instances: 3,
            base: 1_000,
            per_phase,
        }
    }

    #[test]
    fn records_signed_as_sent_are_fresh_valid_and_in_sequence() {
        // Given a task that signs as it sends, 4 records per phase over 3 instances.
        let signing = Signing::AsSent(Box::new(signer(4)));

        // When it is asked for the records of two phases and one past the bound.
        let first = signing.get(0, 0).expect("first record");
        let last = signing.get(1, 3).expect("last record of phase 1");
        let past = signing.get(1, 4);

        // Then each verifies, is issued now, and sequences continue across phases.
        let before = now_ms();
        let opened_first = signpost_record::open_record(&first).expect("verifies");
        let opened_last = signpost_record::open_record(&last).expect("verifies");
        assert_eq!(opened_first.payload.sequence, 1_001);
        assert_eq!(opened_first.payload.instance, "i0");
        assert_eq!(opened_last.payload.sequence, 1_000 + 1 + 4 + 3);
        assert_eq!(
            opened_last.payload.instance, "i0",
            "record 3 of 3 instances wraps"
        );
        assert!(opened_last.payload.issued_at_ms + 60_000 >= before);
        assert!(past.is_none(), "a phase stops at its bound");
    }

    #[test]
    fn records_signed_ahead_are_the_ones_signed_as_sent_would_give() {
        // Given the same signer used ahead of the clock and as records are sent.
        let signer = signer(2);
        let ahead = Signing::Ahead(vec![(0..2).map(|n| signer.sign(0, n)).collect()]);
        let as_sent = Signing::AsSent(Box::new(signer));

        // Then both give the same sequences and instances, and both stop at the bound.
        for n in 0..2 {
            let a = signpost_record::open_record(&ahead.get(0, n).unwrap()).unwrap();
            let b = signpost_record::open_record(&as_sent.get(0, n).unwrap()).unwrap();
            assert_eq!(
                (a.payload.sequence, a.payload.instance),
                (b.payload.sequence, b.payload.instance)
            );
        }
        assert!(ahead.get(0, 2).is_none() && as_sent.get(0, 2).is_none());
        assert!(Signing::None.get(0, 0).is_none());
    }
}
