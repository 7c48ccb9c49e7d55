//! `signpost`: run a node, start a local dev cluster, and talk to a cluster.
#![deny(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    rust_2018_idioms,
    unused_must_use
)]

mod audit;
mod bench;
mod ca;
mod commands;
mod dev;
mod drill;
mod maintenance;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// The version and the commit the binary was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SIGNPOST_COMMIT"),
    ")"
);

/// Signpost: a service registry that stays trustworthy when parts of it are not.
#[derive(Debug, Parser)]
#[command(name = "signpost", version = VERSION, about)]
struct Cli {
    /// Log format on stderr: human-readable text, or one JSON object per line for log
    /// shippers.
    #[arg(long = "log-format", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Options shared by every command that talks to a cluster.
#[derive(Debug, Args, Clone)]
pub(crate) struct ClientOpts {
    /// Client configuration (written by `signpost dev` as DIR/client.toml).
    #[arg(long, env = "SIGNPOST_CONFIG", global = true)]
    pub(crate) config: Option<PathBuf>,
    /// Present this certificate instead of the one in the client config.
    #[arg(long, global = true, requires = "cert_key")]
    pub(crate) cert: Option<PathBuf>,
    /// Private key of --cert.
    #[arg(long = "cert-key", global = true, requires = "cert")]
    pub(crate) cert_key: Option<PathBuf>,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Give up on a call after this many milliseconds, retries included (default: the
    /// client config's deadline_ms).
    #[arg(long = "deadline-ms", global = true)]
    pub(crate) deadline_ms: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local three-node cluster with generated certificates (Ctrl-C stops it).
    Dev(dev::DevArgs),
    /// Run one node.
    Server {
        /// Node configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Generate an ed25519 signing key: FILE (0600) and FILE.pub.
    Keygen {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Certificate authority: init, issue, revoke.
    Ca {
        #[command(subcommand)]
        command: ca::CaCommand,
    },
    /// Admin: bind public keys to a service name.
    Bind(commands::BindArgs),
    /// Register (or replace) an instance of a service.
    Register(commands::RegisterArgs),
    /// Remove an instance of a service.
    Deregister(commands::DeregisterArgs),
    /// Show the verified instances of a service.
    Resolve(commands::ResolveArgs),
    /// Show every service with live instances.
    List(commands::ListArgs),
    /// Print changes to a service (or a prefix) as they are applied.
    Watch(commands::WatchArgs),
    /// Show members, leader, term, commit and applied index, lag and last contact per node.
    Status(commands::StatusArgs),
    /// Admin: change membership (add, remove) and hand leadership over.
    Cluster {
        #[command(subcommand)]
        command: maintenance::ClusterCommand,
    },
    /// Admin: build a snapshot now on every member (or one).
    Snapshot(maintenance::SnapshotArgs),
    /// Admin: write a consistent, checksummed backup of the registry to a file.
    Backup(maintenance::BackupArgs),
    /// Prepare a new node's data directory from a backup (run on each new member before it
    /// first starts).
    Restore(maintenance::RestoreArgs),
    /// Failover drill: write and read while killing, pausing or partitioning the leader, then
    /// print each fault's outage and check every acknowledged write is on every node.
    Drill(drill::DrillArgs),
    /// Admin: onboard a service (key, binding, certificate, client config).
    Service {
        #[command(subcommand)]
        command: maintenance::ServiceCommand,
    },
    /// Load generator: legitimate throughput and latency, alone and under a flood.
    Bench(bench::BenchArgs),
    /// Admin: the audit log: tail, export, verify, prove.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Server { .. } => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line an operator can act on; the chain is joined, not a backtrace.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Dev(args) => dev::run(args).await,
        Command::Server { config } => {
            signpost_server::run_from_file(&config).await?;
            Ok(())
        }
        Command::Keygen { out } => commands::keygen(&out),
        Command::Ca { command } => ca::run(command),
        Command::Bind(args) => commands::bind(args).await,
        Command::Register(args) => commands::register(args).await,
        Command::Deregister(args) => commands::deregister(args).await,
        Command::Resolve(args) => commands::resolve(args).await,
        Command::List(args) => commands::list(args).await,
        Command::Watch(args) => commands::watch(args).await,
        Command::Status(args) => commands::status(args).await,
        Command::Cluster { command } => maintenance::cluster(command).await,
        Command::Snapshot(args) => maintenance::snapshot(args).await,
        Command::Backup(args) => maintenance::backup(args).await,
        Command::Restore(args) => maintenance::restore(args),
        Command::Service { command } => maintenance::service(command).await,
        Command::Drill(args) => drill::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Audit { command } => audit::run(command).await,
    }
}
