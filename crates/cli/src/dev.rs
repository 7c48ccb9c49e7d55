//! `signpost dev`: a local three-node cluster with generated certificates.
//!
//! Layout of the directory (kept across runs, so a second `signpost dev --dir D` restarts the
//! same cluster with its data):
//!
//! ```text
//! D/ca/{ca.crt,ca.key,crl.pem}    the CA; `signpost ca issue --ca-dir D/ca` adds identities
//! D/admin.key, D/admin.key.pub    the genesis admin signing key
//! D/admin-cert.{crt,key}          the admin client certificate used by client.toml
//! D/node<i>/{config.toml,node.crt,node.key,data/,server.log}
//! D/node<i>/checkpoint.key{,.pub}  the node's audit checkpoint key, bound by `dev` to
//!                                  `signpost.checkpoint` once the cluster is up
//! D/client.toml                   what `--config` / SIGNPOST_CONFIG points at
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use signpost_client::{Client, ClientConfig, ClientTls, TrustConfig};
use signpost_identity::{Ca, Identity, IssueOptions};
use signpost_proto::v1::BindingPayload;
use signpost_server::config::{
    AuditConfig, BootstrapConfig, Config, LimitsConfig, MemberConfig, RaftConfig, TlsConfig,
    WatchConfig,
};

const TRUST_DOMAIN: &str = "signpost.local";
/// How long `dev` waits for the cluster to elect a leader and take its genesis entry.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Directory for certificates, keys, configs and data.
    #[arg(long, default_value = "signpost-dev")]
    dir: PathBuf,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Client listeners use BASE+i, Raft listeners BASE+100+i, metrics listeners BASE+200+i.
    #[arg(long = "base-port", default_value_t = 7400)]
    base_port: u16,
    /// A TOML file with keys of a node config's `[limits]` table, at its top level, for every
    /// node instead of the defaults (benches/limits-throughput.toml raises the per-identity
    /// rates for throughput runs).
    #[arg(long)]
    limits: Option<PathBuf>,
    /// Quota in the genesis of a new cluster: most live instances of one service.
    #[arg(long = "instances-per-service-max", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    instances_per_service_max: u32,
    /// Quota in the genesis of a new cluster: most MiB of registry state. Snapshots are at most
    /// 512 MiB, so the state stays below that.
    #[arg(long = "state-mib-max", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=448))]
    state_mib_max: u64,
    /// Followers forward client writes and linearizable reads to the leader (`[raft]
    /// forward_to_leader`) instead of naming it.
    #[arg(long = "forward-to-leader")]
    forward_to_leader: bool,
}

/// The nodes' limits: the defaults, or `--limits FILE` (unknown keys are refused, so a typo
/// cannot silently leave a default in place).
fn limits(args: &DevArgs) -> anyhow::Result<LimitsConfig> {
    let Some(path) = &args.limits else {
        return Ok(LimitsConfig::default());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{}: not a limits table", path.display()))
}

fn node_dir(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node{id}"))
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Creates whatever is missing in `dir`; existing CA, keys and data are reused.
fn prepare(args: &DevArgs) -> anyhow::Result<ClientConfig> {
    let dir = &args.dir;
    if !(1..=7).contains(&args.nodes) {
        bail!("--nodes must be between 1 and 7");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_dir = dir.join("ca");
    let ca = if ca_dir.join("ca.crt").exists() {
        Ca::load(&ca_dir)?
    } else {
        Ca::init(&ca_dir, TRUST_DOMAIN, Duration::from_secs(365 * 86_400))?
    };
    let admin_key_path = dir.join("admin.key");
    if !admin_key_path.exists() {
        signpost_record::write_key_files(
            &admin_key_path,
            &signpost_record::generate_signing_key(),
        )?;
    }
    let admin_pub =
        signpost_record::read_verifying_key(&signpost_record::public_key_path(&admin_key_path))?;
    let admin_pub_hex = signpost_record::public_key_hex(&admin_pub);
    // Client certificates are short-lived; re-issue on every start so a dev cluster left for a
    // day still works.
    ca.issue(
        &Identity::Admin("admin".into()),
        &IssueOptions::default(),
        &dir.join("admin-cert"),
    )?;

    let limits = limits(args)?;
    let members: Vec<MemberConfig> = (1..=args.nodes)
        .map(|id| MemberConfig {
            id,
            client_addr: format!("127.0.0.1:{}", args.base_port + id as u16),
            raft_addr: format!("127.0.0.1:{}", args.base_port + 100 + id as u16),
        })
        .collect();
    for member in &members {
        let nd = node_dir(dir, member.id);
        std::fs::create_dir_all(&nd).with_context(|| format!("creating {}", nd.display()))?;
        ca.issue(
            &Identity::Node(member.id),
            &IssueOptions {
                dns_names: vec!["localhost".into()],
                ip_addrs: vec!["127.0.0.1".parse().context("loopback address")?],
                ..Default::default()
            },
            &nd.join("node"),
        )?;
        let checkpoint_key = nd.join("checkpoint.key");
        if !checkpoint_key.exists() {
            signpost_record::write_key_files(
                &checkpoint_key,
                &signpost_record::generate_signing_key(),
            )?;
        }
        let config = Config {
            node_id: member.id,
            data_dir: PathBuf::from("data"),
            client_addr: member.client_addr.clone(),
            raft_addr: member.raft_addr.clone(),
            trust_domain: TRUST_DOMAIN.into(),
            tls: TlsConfig {
                ca: PathBuf::from("../ca/ca.crt"),
                cert: PathBuf::from("node.crt"),
                key: PathBuf::from("node.key"),
                crl: Some(PathBuf::from("../ca/crl.pem")),
                allow_tls12: false,
                handshake_timeout_ms: signpost_identity::DEFAULT_HANDSHAKE_TIMEOUT.as_millis()
                    as u64,
                first_byte_timeout_ms: signpost_identity::DEFAULT_FIRST_BYTE_TIMEOUT.as_millis()
                    as u64,
                preface_timeout_ms: signpost_identity::DEFAULT_PREFACE_TIMEOUT.as_millis() as u64,
            },
            members: members.clone(),
            join: false,
            bootstrap: BootstrapConfig {
                admin_keys: vec![admin_pub_hex.clone()],
                admin_threshold: 1,
                instances_per_service_max: args.instances_per_service_max,
                services_max: 10_000,
                state_bytes_max: args.state_mib_max * 1024 * 1024,
            },
            raft: RaftConfig {
                forward_to_leader: args.forward_to_leader,
                ..RaftConfig::default()
            },
            limits: limits.clone(),
            watch: WatchConfig::default(),
            audit: AuditConfig {
                checkpoint_key: Some(PathBuf::from("checkpoint.key")),
                ..AuditConfig::default()
            },
            metrics_addr: Some(format!(
                "127.0.0.1:{}",
                args.base_port + 200 + member.id as u16
            )),
        };
        write_file(
            &nd.join("config.toml"),
            &toml::to_string_pretty(&config).context("encoding node config")?,
        )?;
    }
    let client = ClientConfig {
        endpoints: members.iter().map(|m| m.client_addr.clone()).collect(),
        trust_domain: TRUST_DOMAIN.into(),
        tls: ClientTls {
            ca: PathBuf::from("ca/ca.crt"),
            cert: PathBuf::from("admin-cert.crt"),
            key: PathBuf::from("admin-cert.key"),
            crl: None,
        },
        trust: TrustConfig {
            admin_keys: vec![admin_pub_hex],
            admin_threshold: 1,
            min_admin_version: 0,
        },
        admin_key: Some(PathBuf::from("admin.key")),
        timeout_ms: 5_000,
        deadline_ms: 15_000,
        source_ip: None,
        state_file: None,
        audit: signpost_client::AuditConfig::default(),
    };
    Ok(client)
}

/// Binds the nodes' checkpoint keys to `signpost.checkpoint` unless exactly they are bound, so
/// the cluster makes quorum-signed audit checkpoints. Retries until the genesis is applied.
async fn bind_checkpoint_keys(
    client: &Client,
    dir: &Path,
    nodes: u64,
    started: Instant,
) -> anyhow::Result<()> {
    let service = signpost_audit::CHECKPOINT_SERVICE;
    let mut keys = std::collections::BTreeSet::new();
    for id in 1..=nodes {
        let path = signpost_record::public_key_path(&node_dir(dir, id).join("checkpoint.key"));
        keys.insert(signpost_record::read_verifying_key(&path)?.to_bytes());
    }
    let admin_key = signpost_record::read_signing_key(&dir.join("admin.key"))?;
    loop {
        let bound = match client.resolve(service, false).await {
            Ok(resolved) => Some(resolved.binding.keys),
            Err(_) => None,
        };
        if bound.as_ref() == Some(&keys) {
            return Ok(());
        }
        let payload = BindingPayload {
            service: service.into(),
            public_keys: keys.iter().map(|k| k.to_vec()).collect(),
            version: crate::commands::now_ms(),
            issued_at_ms: crate::commands::now_ms(),
            not_before_ms: 0,
            not_after_ms: 0,
        };
        match client
            .bind(signpost_record::sign_binding(&admin_key, &payload))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() > READY_TIMEOUT => {
                bail!("could not bind the checkpoint keys: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Restarts of one node after which `signpost dev` gives up on it (a node that keeps dying
/// has a problem a restart will not fix: see its log).
const RESTARTS_MAX: u32 = 100;
/// Pause before a node that exited is started again.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Starts node `id` of the dev cluster in `dir`, appending to its log, and records its process
/// id in `node<id>/pid` (for failover drills: `kill -9`, `kill -STOP`).
fn spawn_node(exe: &Path, dir: &Path, id: u64) -> anyhow::Result<Child> {
    let nd = node_dir(dir, id);
    // Appended, not truncated: what happened before a restart is what an operator looks for.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(nd.join("server.log"))
        .with_context(|| format!("opening {}/server.log", nd.display()))?;
    let child = std::process::Command::new(exe)
        .arg("server")
        .arg("--config")
        .arg(nd.join("config.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log file")?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting node {id}"))?;
    write_file(&nd.join("pid"), &format!("{}\n", child.id()))?;
    Ok(child)
}

struct Children(Vec<(u64, Child)>);

impl Children {
    fn stop(&mut self) {
        for (_, child) in &self.0 {
            // SIGTERM lets each node close its listeners and RocksDB cleanly.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (id, child) in &mut self.0 {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!("node {id} did not stop in time; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        self.0.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) async fn run(args: DevArgs) -> anyhow::Result<()> {
    let mut client_config = prepare(&args)?;
    let dir = args.dir.canonicalize().context("resolving --dir")?;
    let exe = std::env::current_exe().context("locating the signpost binary")?;
    let mut children = Children(Vec::new());
    for id in 1..=args.nodes {
        children.0.push((id, spawn_node(&exe, &dir, id)?));
    }
    let client_toml = dir.join("client.toml");
    write_file(
        &client_toml,
        &toml::to_string_pretty(&client_config).context("encoding client config")?,
    )?;
    client_config = ClientConfig::load(&client_toml)?;
    let client = Client::connect(&client_config)?;

    let started = Instant::now();
    let leader = loop {
        if let Some(dead) = children
            .0
            .iter_mut()
            .find_map(|(id, c)| c.try_wait().ok().flatten().map(|s| (*id, s)))
        {
            bail!(
                "node {} exited during startup ({}); see {}/server.log",
                dead.0,
                dead.1,
                node_dir(&dir, dead.0).display()
            );
        }
        if let Ok(status) = client.status().await {
            if status.leader_id != 0 {
                break status.leader_id;
            }
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "no leader after {READY_TIMEOUT:?}; see {}/node*/server.log",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bind_checkpoint_keys(&client, &dir, args.nodes, started).await?;
    let cfg = client_toml.display();
    println!(
        "signpost dev cluster is up: {} nodes, leader is node {leader} ({:.1}s)",
        args.nodes,
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("  export SIGNPOST_CONFIG={cfg}");
    println!("  signpost status");
    println!(
        "  signpost service add payments --out {d}/payments --ca-dir {d}/ca",
        d = dir.display()
    );
    println!(
        "  signpost register payments --instance p1 --endpoint 127.0.0.1:9000 --config {d}/payments/client.toml --key {d}/payments/payments.key",
        d = dir.display()
    );
    println!("  signpost resolve payments");
    println!();
    println!(
        "logs: {}/node*/server.log — Ctrl-C stops the cluster",
        dir.display()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let mut restarts: std::collections::BTreeMap<u64, u32> = std::collections::BTreeMap::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = poll.tick() => {
                // Like a supervisor's restart policy: a node that dies (kill -9 in a failover
                // drill, a crash) comes back with its data after a pause.
                for (id, child) in &mut children.0 {
                    let Ok(Some(status)) = child.try_wait() else { continue };
                    let log = node_dir(&dir, *id).join("server.log");
                    let count = restarts.entry(*id).or_insert(0u32);
                    if *count >= RESTARTS_MAX {
                        continue;
                    }
                    *count += 1;
                    eprintln!(
                        "node {id} exited ({status}); restarting it in {RESTART_DELAY:?} (see {})",
                        log.display()
                    );
                    tokio::time::sleep(RESTART_DELAY).await;
                    *child = spawn_node(&exe, &dir, *id)?;
                }
                let all_gave_up = children.0.iter_mut().all(|(id, c)| {
                    matches!(c.try_wait(), Ok(Some(_)))
                        && restarts.get(id).is_some_and(|n| *n >= RESTARTS_MAX)
                });
                if all_gave_up {
                    bail!("every node kept exiting; see {}/node*/server.log", dir.display());
                }
            }
        }
    }
    println!("stopping the cluster…");
    children.stop();
    Ok(())
}
