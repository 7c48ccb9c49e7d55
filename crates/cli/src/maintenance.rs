//! Operators' commands: membership, snapshots, backup and restore, onboarding a service.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::json;
use signpost_client::{ClientConfig, ClientTls};
use signpost_consensus::backup::{Backup, BACKUP_BYTES_MAX};
use signpost_identity::{Ca, Identity, IssueOptions};
use signpost_proto::v1::BindingPayload;

use crate::commands::{connect, now_ms};
use crate::output;
use crate::ClientOpts;

/// Membership changes wait for a learner to catch up: more than the usual call deadline.
const MEMBERSHIP_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Subcommand)]
pub(crate) enum ClusterCommand {
    /// Add a node: it joins as a learner, catches up, then becomes a voter. Start the node
    /// first with `join = true` and the current members in its config.
    Add {
        /// The new node's id.
        id: u64,
        /// host:port of its client listener.
        client_addr: String,
        /// host:port of its Raft listener.
        raft_addr: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Remove a node (not the leader: transfer leadership first).
    Remove {
        /// The node's id.
        id: u64,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Hand leadership to NODE_ID, or to the most up-to-date voter.
    TransferLeader {
        /// The voter to lead next.
        id: Option<u64>,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

fn membership_opts(opts: &ClientOpts) -> ClientOpts {
    let mut opts = opts.clone();
    if opts.deadline_ms.is_none() {
        opts.deadline_ms = Some(MEMBERSHIP_DEADLINE.as_millis() as u64);
    }
    opts
}

pub(crate) async fn cluster(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Add {
            id,
            client_addr,
            raft_addr,
            opts,
        } => {
            let (_, client) = connect(&membership_opts(&opts))?;
            let after = client.add_member(id, &client_addr, &raft_addr).await?;
            let ids: Vec<u64> = after.members.iter().map(|m| m.id).collect();
            output::write_result(
                opts.json,
                &format!("node {id} added as a voter; members: {ids:?}"),
                json!({"added": id, "members": ids}),
            );
        }
        ClusterCommand::Remove { id, opts } => {
            let (_, client) = connect(&membership_opts(&opts))?;
            let after = client.remove_member(id).await?;
            let ids: Vec<u64> = after.members.iter().map(|m| m.id).collect();
            output::write_result(
                opts.json,
                &format!("node {id} removed; members: {ids:?}"),
                json!({"removed": id, "members": ids}),
            );
        }
        ClusterCommand::TransferLeader { id, opts } => {
            let (_, client) = connect(&opts)?;
            let leader = client.transfer_leader(id).await?;
            output::write_result(
                opts.json,
                &format!("node {leader} leads"),
                json!({"leader_id": leader}),
            );
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct SnapshotArgs {
    /// Only on this node (default: every member).
    #[arg(long)]
    node: Option<u64>,
    #[command(flatten)]
    opts: ClientOpts,
}

pub(crate) async fn snapshot(args: SnapshotArgs) -> anyhow::Result<()> {
    let (_, client) = connect(&args.opts)?;
    let status = client.status().await?;
    let targets: Vec<_> = status
        .members
        .iter()
        .filter(|m| args.node.is_none_or(|n| n == m.id))
        .collect();
    if targets.is_empty() {
        bail!("node {} is not a member", args.node.unwrap_or(0));
    }
    let mut results = Vec::new();
    let mut failed = 0;
    for m in targets {
        match client.snapshot_on(&m.addr).await {
            Ok(index) => {
                if !args.opts.json {
                    println!("node {}: snapshot at index {index}", m.id);
                }
                results.push(json!({"id": m.id, "snapshot_index": index}));
            }
            Err(e) => {
                failed += 1;
                if !args.opts.json {
                    println!("node {}: failed: {e}", m.id);
                }
                results.push(json!({"id": m.id, "error": e.to_string()}));
            }
        }
    }
    if args.opts.json {
        output::print_json(&json!({ "snapshots": results }));
    }
    if failed > 0 {
        bail!("{failed} node(s) did not build a snapshot");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct BackupArgs {
    /// Where to write the backup (refused if it exists).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    opts: ClientOpts,
}

/// Writes `bytes` to `path` only if nothing is there: through a temporary file, synced, then
/// linked into place, so a crash leaves either no file or a whole one.
fn write_new_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist_noclobber(path)
        .map_err(|e| anyhow::anyhow!("writing {}: {}", path.display(), e.error))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

pub(crate) async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    if args.out.exists() {
        bail!("{} exists; choose a new file", args.out.display());
    }
    let (_, client) = connect(&args.opts)?;
    let bytes = client.backup(BACKUP_BYTES_MAX).await?;
    // Check it as a restore will before keeping it: a backup found broken only when it is
    // needed is no backup.
    let backup = Backup::from_bytes(&bytes).context("the backup received does not check")?;
    backup
        .verify(client.genesis())
        .context("the backup received does not verify against this client's [trust]")?;
    write_new_file(&args.out, &bytes)?;
    output::write_result(
        args.opts.json,
        &format!(
            "wrote {} ({} bytes, {} keys) as of revision {}",
            args.out.display(),
            bytes.len(),
            backup.keys(),
            backup.revision()
        ),
        json!({"file": args.out, "bytes": bytes.len(), "revision": backup.revision()}),
    );
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    /// The backup file (from `signpost backup`).
    file: PathBuf,
    /// The configuration of the new node to restore into; its data_dir must be empty and its
    /// `members` are the new cluster. Run once per new node, before starting any of them.
    #[arg(long)]
    config: PathBuf,
}

pub(crate) fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let config = signpost_server::Config::load(&args.config)?;
    if config.join {
        bail!(
            "{} joins a running cluster: restore into a new cluster's members",
            args.config.display()
        );
    }
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let backup = Backup::from_bytes(&bytes)
        .with_context(|| format!("{} is not a usable backup", args.file.display()))?;
    let members = config.member_addrs();
    backup
        .restore(&config.data_dir, &members, &config.genesis_admin_set()?)
        .with_context(|| format!("restoring {}", args.file.display()))?;
    println!(
        "restored revision {} into {}; start the node with {}",
        backup.revision(),
        config.data_dir.display(),
        args.config.display()
    );
    Ok(())
}

#[derive(Debug, Subcommand)]
pub(crate) enum ServiceCommand {
    /// Onboard a service: its signing key (kept if present, never overwritten), a binding of
    /// the key to NAME, a certificate, and a client config, all in --out. Safe to run again.
    Add(ServiceAddArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ServiceAddArgs {
    /// The service name.
    name: String,
    /// Directory for the service's files.
    #[arg(long)]
    out: PathBuf,
    /// The CA directory (from `signpost ca init`).
    #[arg(long = "ca-dir")]
    ca_dir: PathBuf,
    /// Certificate lifetime in hours (default 24 h).
    #[arg(long)]
    validity_hours: Option<u64>,
    #[command(flatten)]
    opts: ClientOpts,
}

pub(crate) async fn service(command: ServiceCommand) -> anyhow::Result<()> {
    let ServiceCommand::Add(args) = command;
    signpost_record::validate_service_name(&args.name)?;
    let (admin_config, client) = connect(&args.opts)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let name = &args.name;

    // 1. The signing key: created once, never replaced.
    let key_path = args.out.join(format!("{name}.key"));
    let (key, created) = if key_path.exists() {
        let key = signpost_record::read_signing_key(&key_path)
            .with_context(|| format!("{} exists but does not read as a key", key_path.display()))?;
        (key, false)
    } else {
        let key = signpost_record::generate_signing_key();
        signpost_record::write_key_files(&key_path, &key)
            .with_context(|| format!("writing {}", key_path.display()))?;
        (key, true)
    };
    let public = key.verifying_key().to_bytes();

    // 2. The binding, unless the service is already bound to exactly this key.
    let bound = client
        .resolve(name, false)
        .await
        .is_ok_and(|r| r.binding.keys.len() == 1 && r.binding.keys.contains(&public));
    let binding_revision = if bound {
        None
    } else {
        let admin_key_path = admin_config
            .admin_key
            .clone()
            .context("no admin key: set admin_key in the client config")?;
        let admin_key = signpost_record::read_signing_key(&admin_key_path)
            .with_context(|| format!("reading {}", admin_key_path.display()))?;
        let payload = BindingPayload {
            service: name.clone(),
            public_keys: vec![public.to_vec()],
            version: now_ms(),
            issued_at_ms: now_ms(),
            not_before_ms: 0,
            not_after_ms: 0,
        };
        Some(
            client
                .bind(signpost_record::sign_binding(&admin_key, &payload))
                .await?,
        )
    };

    // 3. The certificate, issued again when missing.
    let cert_prefix = args.out.join(format!("{name}-cert"));
    let cert_path = cert_prefix.with_extension("crt");
    if !cert_path.exists() {
        let ca = Ca::load(&args.ca_dir)
            .with_context(|| format!("loading CA {}", args.ca_dir.display()))?;
        ca.issue(
            &Identity::Service(name.clone()),
            &IssueOptions {
                validity: args.validity_hours.map(|h| Duration::from_secs(h * 3600)),
                ..Default::default()
            },
            &cert_prefix,
        )?;
    }
    let ca_copy = args.out.join("ca.crt");
    if !ca_copy.exists() {
        std::fs::copy(&admin_config.tls.ca, &ca_copy)
            .with_context(|| format!("copying {}", admin_config.tls.ca.display()))?;
    }

    // 4. The service's client config (its own certificate, the admin's trust anchors).
    let config_path = args.out.join("client.toml");
    let config = ClientConfig {
        tls: ClientTls {
            ca: PathBuf::from("ca.crt"),
            cert: PathBuf::from(format!("{name}-cert.crt")),
            key: PathBuf::from(format!("{name}-cert.key")),
            crl: None,
        },
        admin_key: None,
        state_file: None,
        ..admin_config.clone()
    };
    std::fs::write(&config_path, toml::to_string(&config)?)
        .with_context(|| format!("writing {}", config_path.display()))?;

    let human = format!(
        "service {name}: key {} ({}), binding {}, certificate {}, config {}\n\
         register with: signpost register {name} --config {} --key {} --instance ID --endpoint HOST:PORT",
        key_path.display(),
        if created { "new" } else { "kept" },
        binding_revision.map_or("already in place".to_string(), |r| format!("at revision {r}")),
        cert_path.display(),
        config_path.display(),
        config_path.display(),
        key_path.display(),
    );
    output::write_result(
        args.opts.json,
        &human,
        json!({
            "service": name, "key": key_path, "key_created": created,
            "binding_revision": binding_revision, "certificate": cert_path,
            "config": config_path,
        }),
    );
    Ok(())
}
