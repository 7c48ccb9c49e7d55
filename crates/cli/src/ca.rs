//! `signpost ca`: a small file-based CA for SPIFFE-style certificates.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Subcommand};
use signpost_identity::{Ca, Identity, IssueOptions};

#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// Create a CA (ca.crt, ca.key, crl.pem) in --ca-dir.
    Init {
        /// CA directory.
        #[arg(long = "ca-dir")]
        ca_dir: PathBuf,
        /// SPIFFE trust domain.
        #[arg(long, default_value = "signpost.local")]
        trust_domain: String,
        /// CA lifetime in days.
        #[arg(long, default_value_t = 3650)]
        validity_days: u64,
    },
    /// Issue a certificate: PREFIX.crt and PREFIX.key.
    #[command(group(ArgGroup::new("kind").required(true).args(["node", "service", "admin", "reader"])))]
    Issue {
        /// Node id.
        #[arg(long)]
        node: Option<u64>,
        /// Service name.
        #[arg(long)]
        service: Option<String>,
        /// Admin name.
        #[arg(long)]
        admin: Option<String>,
        /// Reader name.
        #[arg(long)]
        reader: Option<String>,
        /// CA directory.
        #[arg(long = "ca-dir")]
        ca_dir: PathBuf,
        /// Output prefix.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in hours (default: 24 h; nodes 30 days).
        #[arg(long)]
        validity_hours: Option<u64>,
        /// Extra DNS names (for operators' tools; peers check the SPIFFE id).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Extra IP addresses.
        #[arg(long = "ip")]
        ip: Vec<std::net::IpAddr>,
    },
    /// Revoke a certificate: adds it to the CA's crl.pem, which nodes reload.
    Revoke {
        /// CA directory.
        #[arg(long = "ca-dir")]
        ca_dir: PathBuf,
        /// The certificate to revoke.
        cert: PathBuf,
    },
}

pub(crate) fn run(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init {
            ca_dir,
            trust_domain,
            validity_days,
        } => {
            Ca::init(
                &ca_dir,
                &trust_domain,
                Duration::from_secs(validity_days * 86_400),
            )
            .with_context(|| format!("creating a CA in {}", ca_dir.display()))?;
            println!(
                "created CA for trust domain {trust_domain} in {}",
                ca_dir.display()
            );
            Ok(())
        }
        CaCommand::Issue {
            node,
            service,
            admin,
            reader,
            ca_dir,
            out,
            validity_hours,
            dns,
            ip,
        } => {
            let identity = match (node, service, admin, reader) {
                (Some(id), _, _, _) => Identity::Node(id),
                (_, Some(s), _, _) => Identity::Service(s),
                (_, _, Some(a), _) => Identity::Admin(a),
                (_, _, _, Some(r)) => Identity::Reader(r),
                _ => anyhow::bail!("one of --node, --service, --admin, --reader is required"),
            };
            let ca =
                Ca::load(&ca_dir).with_context(|| format!("loading CA {}", ca_dir.display()))?;
            let options = IssueOptions {
                validity: validity_hours.map(|h| Duration::from_secs(h * 3600)),
                dns_names: dns,
                ip_addrs: ip,
                ..Default::default()
            };
            let serial = ca.issue(&identity, &options, &out)?;
            println!(
                "issued {}.crt and {}.key (serial {serial})",
                out.display(),
                out.display()
            );
            Ok(())
        }
        CaCommand::Revoke { ca_dir, cert } => {
            let ca =
                Ca::load(&ca_dir).with_context(|| format!("loading CA {}", ca_dir.display()))?;
            let serial = ca.revoke(&cert)?;
            println!(
                "revoked serial {serial}; {} updated (nodes reload it within seconds)",
                ca.crl_path().display()
            );
            Ok(())
        }
    }
}
