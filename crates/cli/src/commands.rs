//! Client commands: each builds and signs what it sends, then prints a table or JSON.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;
use signpost_client::{Client, ClientConfig};
use signpost_proto::v1::{BindingPayload, DeregisterPayload, Endpoint, RecordPayload};

use crate::output;
use crate::ClientOpts;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn load_config(opts: &ClientOpts) -> anyhow::Result<ClientConfig> {
    let path = opts
        .config
        .clone()
        .context("no client config: pass --config DIR/client.toml or set SIGNPOST_CONFIG")?;
    let mut config = ClientConfig::load(&path)?;
    if let (Some(cert), Some(key)) = (&opts.cert, &opts.cert_key) {
        config.tls.cert = cert.clone();
        config.tls.key = key.clone();
    }
    if let Some(ms) = opts.deadline_ms {
        if ms == 0 {
            bail!("--deadline-ms must be > 0");
        }
        config.deadline_ms = ms;
        config.timeout_ms = config.timeout_ms.min(ms);
    }
    Ok(config)
}

pub(crate) fn connect(opts: &ClientOpts) -> anyhow::Result<(ClientConfig, Client)> {
    let config = load_config(opts)?;
    let client = Client::connect(&config)?;
    Ok((config, client))
}

pub(crate) fn keygen(out: &Path) -> anyhow::Result<()> {
    let key = signpost_record::generate_signing_key();
    signpost_record::write_key_files(out, &key)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} (private, 0600) and {}",
        out.display(),
        signpost_record::public_key_path(out).display()
    );
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct BindArgs {
    /// Service name.
    service: String,
    /// Public key file(s) allowed to sign for the service (FILE.pub from keygen).
    #[arg(long = "pubkey", required = true)]
    pubkeys: Vec<PathBuf>,
    /// Binding version (default: the current time in ms, which only increases).
    #[arg(long)]
    version: Option<u64>,
    /// Admin signing key (default: admin_key from the client config).
    #[arg(long = "admin-key")]
    admin_key: Option<PathBuf>,
    #[command(flatten)]
    opts: ClientOpts,
}

pub(crate) async fn bind(args: BindArgs) -> anyhow::Result<()> {
    let (config, client) = connect(&args.opts)?;
    let admin_key_path = args
        .admin_key
        .or(config.admin_key.clone())
        .context("no admin key: pass --admin-key or set admin_key in the client config")?;
    let admin_key = signpost_record::read_signing_key(&admin_key_path)
        .with_context(|| format!("reading {}", admin_key_path.display()))?;
    let mut public_keys = Vec::new();
    for path in &args.pubkeys {
        let key = signpost_record::read_verifying_key(path)
            .with_context(|| format!("reading {}", path.display()))?;
        public_keys.push(key.to_bytes().to_vec());
    }
    let payload = BindingPayload {
        service: args.service.clone(),
        public_keys,
        version: args.version.unwrap_or_else(now_ms),
        issued_at_ms: now_ms(),
        not_before_ms: 0,
        not_after_ms: 0,
    };
    let envelope = signpost_record::sign_binding(&admin_key, &payload);
    let revision = client.bind(envelope).await?;
    output::write_result(
        args.opts.json,
        &format!(
            "bound {} key(s) to {} at revision {revision}",
            args.pubkeys.len(),
            args.service
        ),
        json!({"revision": revision, "service": args.service, "version": payload.version}),
    );
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct RegisterArgs {
    /// Service name.
    service: String,
    /// Instance id.
    #[arg(long)]
    instance: String,
    /// Endpoint HOST:PORT, optionally HOST:PORT/PROTOCOL (repeatable).
    #[arg(long = "endpoint", required = true)]
    endpoints: Vec<String>,
    /// Metadata K=V (repeatable).
    #[arg(long = "meta")]
    meta: Vec<String>,
    /// The service's signing key (bound with `signpost bind`).
    #[arg(long)]
    key: PathBuf,
    /// Lease TTL in seconds (5..=86400). Without --keep-alive the instance expires after it.
    #[arg(long, default_value_t = 30)]
    ttl: u32,
    /// Stay in the foreground renewing the lease (every TTL/3) until interrupted.
    #[arg(long = "keep-alive")]
    keep_alive: bool,
    /// TLS identity the instance serves with (default: spiffe://<td>/service/<SERVICE>).
    #[arg(long = "tls-identity")]
    tls_identity: Option<String>,
    /// Sequence number (default: the current time in ms, which only increases).
    #[arg(long)]
    sequence: Option<u64>,
    #[command(flatten)]
    opts: ClientOpts,
}

fn parse_endpoint(text: &str) -> anyhow::Result<Endpoint> {
    let (addr, protocol) = match text.split_once('/') {
        Some((a, p)) => (a, p.to_string()),
        None => (text, "grpc".to_string()),
    };
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("endpoint {text:?} is not HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .with_context(|| format!("endpoint {text:?} has an invalid port"))?;
    if host.is_empty() || port == 0 {
        bail!("endpoint {text:?} needs a host and a port in 1..=65535");
    }
    Ok(Endpoint {
        host: host.to_string(),
        port: u32::from(port),
        protocol,
    })
}

pub(crate) async fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let (config, client) = connect(&args.opts)?;
    let key = signpost_record::read_signing_key(&args.key)
        .with_context(|| format!("reading {}", args.key.display()))?;
    let endpoints = args
        .endpoints
        .iter()
        .map(|e| parse_endpoint(e))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut metadata = HashMap::new();
    for kv in &args.meta {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--meta {kv:?} is not K=V"))?;
        metadata.insert(k.to_string(), v.to_string());
    }
    let now = now_ms();
    let payload = RecordPayload {
        service: args.service.clone(),
        instance: args.instance.clone(),
        endpoints,
        metadata,
        tls_identity: args.tls_identity.unwrap_or_else(|| {
            format!("spiffe://{}/service/{}", config.trust_domain, args.service)
        }),
        sequence: args.sequence.unwrap_or(now),
        issued_at_ms: now,
        ttl_secs: args.ttl,
    };
    signpost_record::validate_record_payload(&payload)?;
    let envelope = signpost_record::sign_record(&key, &payload);
    let revision = client.register(envelope).await?;
    output::write_result(
        args.opts.json,
        &format!(
            "registered {}/{} at revision {revision}",
            args.service, args.instance
        ),
        json!({"revision": revision, "service": args.service, "instance": args.instance, "sequence": payload.sequence}),
    );
    if !args.keep_alive {
        return Ok(());
    }
    let interval = std::time::Duration::from_millis(u64::from(args.ttl) * 1000 / 3);
    let instances = [(args.service.clone(), args.instance.clone())];
    if !args.opts.json {
        eprintln!(
            "renewing every {interval:?}; Ctrl-C to stop (the instance then expires after {}s)",
            args.ttl
        );
    }
    client
        .keep_alive(&instances, interval, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// Service name (or a prefix of names with --prefix).
    service: String,
    /// Match every service whose name starts with SERVICE.
    #[arg(long)]
    prefix: bool,
    /// First revision to deliver (default: changes from now on).
    #[arg(long = "from-revision", default_value_t = 0)]
    from_revision: u64,
    #[command(flatten)]
    opts: ClientOpts,
}

pub(crate) async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let (_, client) = connect(&args.opts)?;
    let mut watcher = client.watch(&args.service, args.prefix, args.from_revision);
    loop {
        let change = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            change = watcher.next() => change?,
        };
        let kind = if change.put { "put" } else { "delete" };
        if args.opts.json {
            let mut value = json!({
                "revision": change.revision, "position": change.position, "type": kind,
                "service": change.service, "instance": change.instance,
            });
            if let Some(record) = change
                .record
                .as_ref()
                .and_then(|r| signpost_record::open_record(r).ok())
            {
                value["endpoints"] = json!(record
                    .payload
                    .endpoints
                    .iter()
                    .map(|e| format!("{}:{}", e.host, e.port))
                    .collect::<Vec<_>>());
            }
            output::print_json(&value);
        } else {
            println!(
                "{:>8}  {kind:<6}  {}/{}",
                change.revision, change.service, change.instance
            );
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct DeregisterArgs {
    /// Service name.
    service: String,
    /// Instance id.
    #[arg(long)]
    instance: String,
    /// The service's signing key (or an admin key).
    #[arg(long)]
    key: PathBuf,
    /// Sequence number (default: the current time in ms).
    #[arg(long)]
    sequence: Option<u64>,
    #[command(flatten)]
    opts: ClientOpts,
}

pub(crate) async fn deregister(args: DeregisterArgs) -> anyhow::Result<()> {
    let (_, client) = connect(&args.opts)?;
    let key = signpost_record::read_signing_key(&args.key)
        .with_context(|| format!("reading {}", args.key.display()))?;
    let now = now_ms();
    let payload = DeregisterPayload {
        service: args.service.clone(),
        instance: args.instance.clone(),
        sequence: args.sequence.unwrap_or(now),
        issued_at_ms: now,
    };
    let envelope = signpost_record::sign_deregister(&key, &payload);
    let revision = client.deregister(envelope).await?;
    output::write_result(
        args.opts.json,
        &format!(
            "deregistered {}/{} at revision {revision}",
            args.service, args.instance
        ),
        json!({"revision": revision, "service": args.service, "instance": args.instance}),
    );
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct ResolveArgs {
    /// Service name.
    service: String,
    /// Read from the local node without a read-index round (may lag).
    #[arg(long)]
    stale: bool,
    #[command(flatten)]
    opts: ClientOpts,
}

pub(crate) async fn resolve(args: ResolveArgs) -> anyhow::Result<()> {
    let (_, client) = connect(&args.opts)?;
    let resolved = client.resolve(&args.service, args.stale).await?;
    if args.opts.json {
        output::print_json(&output::resolved_json(&resolved));
    } else {
        output::print_instances(std::slice::from_ref(&resolved));
    }
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Read from the local node without a read-index round (may lag).
    #[arg(long)]
    stale: bool,
    #[command(flatten)]
    opts: ClientOpts,
}

pub(crate) async fn list(args: ListArgs) -> anyhow::Result<()> {
    let (_, client) = connect(&args.opts)?;
    let listed = client.list(args.stale).await?;
    if args.opts.json {
        output::print_json(&json!({
            "revision": listed.revision,
            "services": listed.services.iter().map(output::resolved_json).collect::<Vec<_>>(),
            "unverified": listed
                .unverified
                .iter()
                .map(|(service, reason)| json!({"service": service, "reason": reason}))
                .collect::<Vec<_>>(),
        }));
    } else {
        output::print_instances(&listed.services);
    }
    // Left out, not hidden: an operator must see that a service's answer did not verify.
    for (service, reason) in &listed.unverified {
        eprintln!("warning: {service} left out: its answer did not verify: {reason}");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    opts: ClientOpts,
}

pub(crate) async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let (_, client) = connect(&args.opts)?;
    let first = client.status().await?;
    // Ask every member for its own view: commit and applied indexes are per node.
    let mut rows = Vec::new();
    for member in &first.members {
        let own = client.status_of(&member.addr).await;
        rows.push((member.clone(), own));
    }
    let leader_id = rows
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .map(|s| s.leader_id)
        .find(|l| *l != 0)
        .unwrap_or(first.leader_id);
    // Only the leader knows how far each member's log is and when it last answered.
    let leader_view = rows
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .find(|s| s.node_id == leader_id && s.role == "leader");
    let views: Vec<output::MemberView> = rows
        .iter()
        .map(|(m, own)| {
            let seen = leader_view.and_then(|l| l.members.iter().find(|x| x.id == m.id));
            output::MemberView {
                member: m.clone(),
                own: own.as_ref().map_err(|e| e.to_string()).cloned(),
                error_code: own
                    .as_ref()
                    .err()
                    .and_then(|e| e.code())
                    .map(signpost_client::code_name),
                lag: leader_view.and_then(|l| {
                    seen.and_then(|x| x.matched_index)
                        .map(|matched| l.last_log_index.saturating_sub(matched))
                }),
                last_contact_ms: seen.and_then(|x| x.last_contact_ms),
                voter: seen.map(|x| x.voter).unwrap_or(m.voter),
            }
        })
        .collect();
    if args.opts.json {
        let members: Vec<_> = views
            .iter()
            .map(|v| {
                let m = &v.member;
                match &v.own {
                    Ok(s) => json!({
                        "id": m.id, "addr": m.addr, "raft_addr": m.raft_addr,
                        // Each node's own report: two nodes that both claim to lead show as such.
                        "role": s.role, "leader_id": s.leader_id, "voter": v.voter,
                        "term": s.term, "commit_index": s.commit_index,
                        "applied_index": s.applied_index, "snapshot_index": s.snapshot_index,
                        "last_log_index": s.last_log_index,
                        "lag": v.lag, "last_contact_ms": v.last_contact_ms,
                        "metrics_addr": (!s.metrics_addr.is_empty()).then_some(&s.metrics_addr),
                        "reachable": true, "alarms": s.alarms,
                    }),
                    Err(e) => json!({
                        "id": m.id, "addr": m.addr, "raft_addr": m.raft_addr,
                        "role": "unreachable", "reachable": false, "error": e,
                        "voter": v.voter, "lag": v.lag, "last_contact_ms": v.last_contact_ms,
                    }),
                }
            })
            .collect();
        output::print_json(
            &json!({"leader_id": leader_id, "term": first.term, "members": members}),
        );
    } else {
        output::print_status(&views);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_endpoint;

    #[test]
    fn endpoints_parse_host_port_and_optional_protocol() {
        let e = parse_endpoint("10.0.0.5:443/https").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.protocol.as_str()),
            ("10.0.0.5", 443, "https")
        );
        let e = parse_endpoint("[::1]:80").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.protocol.as_str()),
            ("::1", 80, "grpc")
        );
        assert!(parse_endpoint("nohost").is_err());
        assert!(parse_endpoint("h:0").is_err());
        assert!(parse_endpoint("h:99999").is_err());
    }
}
