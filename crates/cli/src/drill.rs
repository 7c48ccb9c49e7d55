//! `signpost drill`: a failover drill. It writes and reads against a cluster while it kills,
//! pauses or partitions the leader of the moment, one fault at a time, then prints each
//! fault's outage and checks that every acknowledged registration is on every node.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde_json::json;
use signpost_client::Client;
use signpost_proto::v1::{BindingPayload, Endpoint, RecordPayload};

use crate::commands::{connect, now_ms};
use crate::output;
use crate::ClientOpts;

/// Registrations made by one drill, whatever happens.
const WRITES_MAX: u64 = 100_000;
/// Instances live long enough to outlast the drill without renewals.
const TTL_SECS: u32 = 3_600;
/// How long every node gets to hold every acknowledged write after the last fault.
const CONVERGE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Target {
    /// The cluster of deploy/docker/compose.yaml (docker kill/start, pause/unpause,
    /// network disconnect/connect).
    Compose,
    /// A `signpost dev` cluster (kill -9, which `signpost dev` restarts; SIGSTOP/SIGCONT).
    Dev,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Fault {
    /// Kill the leader's process (SIGKILL), then start it again.
    Kill,
    /// Freeze the leader (no CPU, sockets kept), then thaw it.
    Pause,
    /// Cut the leader off the network, then reconnect it (compose only).
    Partition,
}

#[derive(Debug, Args)]
pub(crate) struct DrillArgs {
    /// Where the cluster runs.
    #[arg(long, value_enum)]
    target: Target,
    /// The `signpost dev` directory (--target dev).
    #[arg(long, default_value = "signpost-dev")]
    dir: PathBuf,
    /// The compose file (--target compose).
    #[arg(long = "compose-file", default_value = "deploy/docker/compose.yaml")]
    compose_file: PathBuf,
    /// Faults in order, each on the leader of the moment (repeatable).
    #[arg(long = "fault", value_enum, default_values_t = [Fault::Kill, Fault::Pause])]
    faults: Vec<Fault>,
    /// Seconds each fault lasts before it is undone.
    #[arg(long = "fault-secs", default_value_t = 5)]
    fault_secs: u64,
    /// Seconds of load before each fault and after the last.
    #[arg(long = "settle-secs", default_value_t = 5)]
    settle_secs: u64,
    /// Certificate prefix (PREFIX.crt, PREFIX.key) of the service the drill writes as, issued
    /// by the cluster's CA; the drill makes a signing key and binds it (admin config).
    #[arg(long = "service-cert")]
    service_cert: PathBuf,
    /// The service name of --service-cert.
    #[arg(long, default_value = "drill")]
    service: String,
    #[command(flatten)]
    opts: ClientOpts,
}

/// Carries out faults on one kind of deployment.
trait Nemesis {
    fn apply(&self, fault: Fault, node: u64) -> anyhow::Result<()>;
    fn undo(&self, fault: Fault, node: u64) -> anyhow::Result<()>;
}

fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

struct ComposeNemesis {
    compose: Vec<String>,
    /// Node id to its address on the compose network (for reconnecting it).
    ips: std::collections::BTreeMap<u64, String>,
}

impl ComposeNemesis {
    fn new(file: &Path, ips: std::collections::BTreeMap<u64, String>) -> ComposeNemesis {
        let v2 = Command::new("docker")
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        let mut compose: Vec<String> = if v2 {
            vec!["docker".into(), "compose".into()]
        } else {
            vec!["docker-compose".into()]
        };
        compose.extend(["-f".into(), file.display().to_string()]);
        ComposeNemesis { compose, ips }
    }

    fn container(&self, node: u64) -> anyhow::Result<String> {
        let mut args: Vec<&str> = self.compose[1..].iter().map(String::as_str).collect();
        let service = format!("node{node}");
        args.extend(["ps", "-q", service.as_str()]);
        let id = sh(&self.compose[0], &args)?;
        if id.is_empty() {
            bail!("no container for {service}");
        }
        Ok(id)
    }
}

/// The compose network (project `signpost`, network `signpost`).
const COMPOSE_NETWORK: &str = "signpost_signpost";

impl Nemesis for ComposeNemesis {
    fn apply(&self, fault: Fault, node: u64) -> anyhow::Result<()> {
        let c = self.container(node)?;
        match fault {
            Fault::Kill => sh("docker", &["kill", &c]),
            Fault::Pause => sh("docker", &["pause", &c]),
            Fault::Partition => sh("docker", &["network", "disconnect", COMPOSE_NETWORK, &c]),
        }
        .map(drop)
    }

    fn undo(&self, fault: Fault, node: u64) -> anyhow::Result<()> {
        let c = self.container(node)?;
        match fault {
            Fault::Kill => sh("docker", &["start", &c]),
            Fault::Pause => sh("docker", &["unpause", &c]),
            Fault::Partition => {
                let ip = self
                    .ips
                    .get(&node)
                    .with_context(|| format!("no address known for node {node}"))?;
                sh(
                    "docker",
                    &["network", "connect", "--ip", ip, COMPOSE_NETWORK, &c],
                )
            }
        }
        .map(drop)
    }
}

struct DevNemesis {
    dir: PathBuf,
}

impl DevNemesis {
    fn pid(&self, node: u64) -> anyhow::Result<String> {
        let path = self.dir.join(format!("node{node}/pid"));
        let pid = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (is `signpost dev` running?)", path.display()))?;
        let pid = pid.trim();
        if pid.is_empty() || !pid.chars().all(|c| c.is_ascii_digit()) {
            bail!("{} does not hold a process id", path.display());
        }
        Ok(pid.to_string())
    }
}

impl Nemesis for DevNemesis {
    fn apply(&self, fault: Fault, node: u64) -> anyhow::Result<()> {
        let pid = self.pid(node)?;
        match fault {
            Fault::Kill => sh("kill", &["-KILL", &pid]),
            Fault::Pause => sh("kill", &["-STOP", &pid]),
            Fault::Partition => bail!("--target dev cannot partition (one host, one address)"),
        }
        .map(drop)
    }

    fn undo(&self, fault: Fault, node: u64) -> anyhow::Result<()> {
        match fault {
            // `signpost dev` restarts a node that died.
            Fault::Kill => Ok(()),
            Fault::Pause => sh("kill", &["-CONT", &self.pid(node)?]).map(drop),
            Fault::Partition => Ok(()),
        }
    }
}

/// Completed operations: when each succeeded, and the instances acknowledged.
#[derive(Default)]
struct History {
    writes: Vec<Instant>,
    reads: Vec<Instant>,
    acked: BTreeSet<String>,
    write_errors: u64,
    read_errors: u64,
}

/// The longest stretch in (from, to] without a completion in `times`.
fn longest_gap(times: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut worst = Duration::ZERO;
    for at in times.iter().filter(|t| **t > from && **t <= to) {
        worst = worst.max(at.duration_since(last));
        last = *at;
    }
    worst.max(to.duration_since(last))
}

fn record(service: &str, instance: &str, trust_domain: &str) -> RecordPayload {
    RecordPayload {
        service: service.to_string(),
        instance: instance.to_string(),
        endpoints: vec![Endpoint {
            host: "127.0.0.1".into(),
            port: 9,
            protocol: "grpc".into(),
        }],
        metadata: Default::default(),
        tls_identity: format!("spiffe://{trust_domain}/service/{service}"),
        sequence: now_ms(),
        issued_at_ms: now_ms(),
        ttl_secs: TTL_SECS,
    }
}

async fn leader(client: &Client, within: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(status) = client.status().await {
            if status.leader_id != 0 {
                return Ok(status.leader_id);
            }
        }
        if Instant::now() >= deadline {
            bail!("no leader within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn run(args: DrillArgs) -> anyhow::Result<()> {
    if args.target == Target::Dev && args.faults.contains(&Fault::Partition) {
        bail!("--target dev cannot partition: use --fault kill and --fault pause");
    }
    let (admin_config, admin) = connect(&args.opts)?;
    let status = admin
        .status()
        .await
        .context("reading the cluster's members")?;
    let nemesis: Box<dyn Nemesis + Send + Sync> = match args.target {
        Target::Compose => {
            let ips = status
                .members
                .iter()
                .filter_map(|m| {
                    let host = m.raft_addr.rsplit_once(':')?.0;
                    Some((m.id, host.to_string()))
                })
                .collect();
            Box::new(ComposeNemesis::new(&args.compose_file, ips))
        }
        Target::Dev => Box::new(DevNemesis {
            dir: args.dir.clone(),
        }),
    };

    // The drill's own service: a fresh signing key, bound by the admin.
    let admin_key_path = admin_config
        .admin_key
        .clone()
        .context("no admin key in the client config: the drill binds its own key")?;
    let admin_key = signpost_record::read_signing_key(&admin_key_path)
        .with_context(|| format!("reading {}", admin_key_path.display()))?;
    let key = signpost_record::generate_signing_key();
    admin
        .bind(signpost_record::sign_binding(
            &admin_key,
            &BindingPayload {
                service: args.service.clone(),
                public_keys: vec![key.verifying_key().to_bytes().to_vec()],
                version: now_ms(),
                issued_at_ms: now_ms(),
                not_before_ms: 0,
                not_after_ms: 0,
            },
        ))
        .await
        .context("binding the drill's key")?;
    let mut service_config = admin_config.clone();
    service_config.tls.cert = args.service_cert.with_extension("crt");
    service_config.tls.key = args.service_cert.with_extension("key");
    service_config.state_file = None;
    let writer_client = Client::connect(&service_config)?;
    let reader_client = Client::connect(&service_config)?;

    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let run_id = now_ms();
    let writer = {
        let (history, stop, service) = (history.clone(), stop.clone(), args.service.clone());
        let td = admin_config.trust_domain.clone();
        tokio::spawn(async move {
            for i in 0..WRITES_MAX {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let instance = format!("d{run_id}-{i}");
                let envelope =
                    signpost_record::sign_record(&key, &record(&service, &instance, &td));
                let result = writer_client.register(envelope).await;
                {
                    let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Ok(_) => {
                            h.writes.push(Instant::now());
                            h.acked.insert(instance);
                        }
                        Err(_) => h.write_errors += 1,
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let reader = {
        let (history, stop, service) = (history.clone(), stop.clone(), args.service.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = reader_client.resolve(&service, false).await.is_ok();
                {
                    let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
                    if ok {
                        h.reads.push(Instant::now());
                    } else {
                        h.read_errors += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let settle = Duration::from_secs(args.settle_secs);
    let hold = Duration::from_secs(args.fault_secs);
    let mut rows = Vec::new();
    for fault in &args.faults {
        tokio::time::sleep(settle).await;
        let node = leader(&admin, Duration::from_secs(30)).await?;
        if !args.opts.json {
            println!("fault: {fault:?} on the leader, node {node}, for {hold:?}");
        }
        let started = Instant::now();
        nemesis.apply(*fault, node)?;
        tokio::time::sleep(hold).await;
        nemesis.undo(*fault, node)?;
        let new_leader = leader(&admin, Duration::from_secs(30)).await?;
        // The outage ends with the first completion after the fault; give it the settle time.
        tokio::time::sleep(settle).await;
        let end = Instant::now();
        let (writes, reads) = {
            let h = history.lock().unwrap_or_else(|p| p.into_inner());
            (
                longest_gap(&h.writes, started, end),
                longest_gap(&h.reads, started, end),
            )
        };
        rows.push((*fault, node, new_leader, writes, reads));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    let _ = reader.await;

    // Every acknowledged registration, on every node (each node's own state).
    let (acked, write_errors, read_errors) = {
        let h = history.lock().unwrap_or_else(|p| p.into_inner());
        (h.acked.clone(), h.write_errors, h.read_errors)
    };
    let status = admin.status().await?;
    let mut missing = Vec::new();
    for m in &status.members {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let have: BTreeSet<String> = match admin.resolve_on(&m.addr, &args.service).await {
                Ok(r) => r
                    .instances
                    .into_iter()
                    .map(|i| i.payload.instance)
                    .collect(),
                Err(_) => BTreeSet::new(),
            };
            let lacking = acked.difference(&have).count();
            if lacking == 0 {
                break;
            }
            if Instant::now() >= deadline {
                missing.push((m.id, lacking));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    let faults: Vec<_> = rows
        .iter()
        .map(|(fault, node, new_leader, w, r)| {
            json!({
                "fault": format!("{fault:?}").to_lowercase(), "node": node,
                "leader_after": new_leader,
                "write_outage_ms": w.as_millis() as u64, "read_outage_ms": r.as_millis() as u64,
            })
        })
        .collect();
    if args.opts.json {
        output::print_json(&json!({
            "faults": faults, "acknowledged": acked.len(), "write_errors": write_errors,
            "read_errors": read_errors,
            "missing": missing.iter().map(|(id, n)| json!({"node": id, "missing": n})).collect::<Vec<_>>(),
        }));
    } else {
        println!();
        println!("FAULT      NODE  LEADER AFTER  WRITE OUTAGE  READ OUTAGE");
        for (fault, node, new_leader, w, r) in &rows {
            println!(
                "{:<9}  {node:<4}  {new_leader:<12}  {:>9} ms  {:>8} ms",
                format!("{fault:?}").to_lowercase(),
                w.as_millis(),
                r.as_millis()
            );
        }
        println!(
            "\n{} registrations acknowledged ({write_errors} write and {read_errors} read attempts failed during faults)",
            acked.len()
        );
    }
    if !missing.is_empty() {
        bail!(
            "acknowledged registrations missing after {CONVERGE:?}: {}",
            missing
                .iter()
                .map(|(id, n)| format!("node {id} lacks {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !args.opts.json {
        println!("every acknowledged registration is on every node");
    }
    Ok(())
}
