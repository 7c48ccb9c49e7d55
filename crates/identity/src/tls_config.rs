//! rustls configurations for Signpost's mutual TLS.
//!
//! Both sides present a certificate and verify the other's against the shared `Trust`
//! (current CRLs included). Session resumption is disabled on both sides: a resumed session
//! skips certificate verification, which would let a revoked or expired peer back in without
//! ever meeting the new CRL. Connections are long-lived HTTP/2, so full handshakes are cheap.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::Resumption;
use rustls::server::NoServerSessionStorage;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, ServerConfig, SupportedProtocolVersion};

use crate::client_cert_verifier::SpiffeClientVerifier;
use crate::error::{IdentityError, Result};
use crate::fs_util;
use crate::server_cert_verifier::SpiffeServerVerifier;
use crate::spiffe_id::{identity_from_cert_der, Identity, SpiffeId};
use crate::trust::Trust;

/// The ALPN protocol of gRPC.
pub const ALPN_H2: &[u8] = b"h2";
/// Default bound on concurrent TLS handshakes per listener: far above what a handful of
/// source addresses can hold under the per-IP bound, so a flood from a few addresses cannot
/// take the slots of everybody else.
pub const DEFAULT_HANDSHAKES_CONCURRENT_MAX: usize = 2048;
/// Default bound on concurrent TLS handshakes from one source IP.
pub const DEFAULT_HANDSHAKES_PER_IP_MAX: usize = 8;
/// Default bound on open connections per listener, counted from accept until the connection
/// closes (handshakes in progress included).
pub const DEFAULT_CONNECTIONS_MAX: usize = 4096;
/// Default bound on open connections from one source IP, for the connection's whole lifetime.
pub const DEFAULT_CONNECTIONS_PER_IP_MAX: usize = 512;
/// Default sustained rate of TLS handshakes started per source IP (per second).
pub const DEFAULT_HANDSHAKES_PER_IP_PER_SEC: u32 = 50;
/// Default burst of TLS handshakes started per source IP.
pub const DEFAULT_HANDSHAKES_PER_IP_BURST: u32 = 100;
/// Default time a peer has to complete the TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Default time a peer has to send its first byte (the ClientHello) after connecting: a real
/// client sends it at once, an idle connection only holds a slot.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default time a peer has, after the handshake, to send the HTTP/2 connection preface.
pub const DEFAULT_PREFACE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a process finds its TLS material (all PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s): the roots peers must chain to.
    pub ca: PathBuf,
    /// This process's certificate (leaf first, then any intermediates).
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
    /// The CRL file; `None` disables revocation checking.
    pub crl: Option<PathBuf>,
}

/// Protocol and listener settings shared by clients and servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Also offer TLS 1.2 (default: TLS 1.3 only).
    pub allow_tls12: bool,
    /// Time a peer has to finish the handshake (server: per accepted connection; client:
    /// TCP connect plus handshake in `connect_channel`).
    pub handshake_timeout: Duration,
    /// `TlsIncoming`: most handshakes in progress at once; more connections are closed.
    pub handshakes_concurrent_max: usize,
    /// `TlsIncoming`: most handshakes in progress from one source IP; more are closed.
    pub handshakes_per_ip_max: usize,
    /// `TlsIncoming`: most open connections (handshaking or established); more are closed at
    /// accept.
    pub connections_max: usize,
    /// `TlsIncoming`: most open connections from one source IP, held until the connection
    /// closes, so an address cannot pin the whole listener with idle established connections.
    pub connections_per_ip_max: usize,
    /// `TlsIncoming`: sustained handshakes started per second from one source IP; beyond it
    /// (and the burst) connections are closed at accept, before any TLS work, so a handshake
    /// flood costs the listener an accept and a close per connection, not a signature.
    pub handshakes_per_ip_per_sec: u32,
    /// `TlsIncoming`: burst of handshakes from one source IP.
    pub handshakes_per_ip_burst: u32,
    /// `TlsIncoming`: a connection that sends nothing this long after accept is closed.
    pub first_byte_timeout: Duration,
    /// `TlsIncoming`: a connection that does not send the HTTP/2 preface this long after its
    /// handshake is closed.
    pub preface_timeout: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            allow_tls12: false,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            handshakes_concurrent_max: DEFAULT_HANDSHAKES_CONCURRENT_MAX,
            handshakes_per_ip_max: DEFAULT_HANDSHAKES_PER_IP_MAX,
            connections_max: DEFAULT_CONNECTIONS_MAX,
            connections_per_ip_max: DEFAULT_CONNECTIONS_PER_IP_MAX,
            handshakes_per_ip_per_sec: DEFAULT_HANDSHAKES_PER_IP_PER_SEC,
            handshakes_per_ip_burst: DEFAULT_HANDSHAKES_PER_IP_BURST,
            first_byte_timeout: DEFAULT_FIRST_BYTE_TIMEOUT,
            preface_timeout: DEFAULT_PREFACE_TIMEOUT,
        }
    }
}

/// Which server identities a client accepts (in addition to chain and revocation checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRule {
    /// Any `node/<id>` of the local trust domain (Raft peers, clients of the cluster).
    AnyNode,
    /// Exactly this SPIFFE ID.
    Exact(SpiffeId),
    /// Any identity of the local trust domain.
    SameTrustDomain,
}

impl PeerRule {
    /// Whether `peer` satisfies the rule, for a process in `local_trust_domain`.
    pub fn matches(&self, peer: &SpiffeId, local_trust_domain: &str) -> bool {
        match self {
            PeerRule::AnyNode => {
                peer.trust_domain == local_trust_domain
                    && matches!(peer.identity, Identity::Node(_))
            }
            PeerRule::Exact(expected) => peer == expected,
            PeerRule::SameTrustDomain => peer.trust_domain == local_trust_domain,
        }
    }

    pub(crate) fn describe(&self, local_trust_domain: &str) -> String {
        match self {
            PeerRule::AnyNode => format!("any node of spiffe://{local_trust_domain}"),
            PeerRule::Exact(id) => id.to_string(),
            PeerRule::SameTrustDomain => format!("any identity of spiffe://{local_trust_domain}"),
        }
    }
}

impl fmt::Display for PeerRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerRule::AnyNode => f.write_str("any node"),
            PeerRule::Exact(id) => write!(f, "{id}"),
            PeerRule::SameTrustDomain => f.write_str("same trust domain"),
        }
    }
}

/// A server config that requires a client certificate chaining to `trust`'s roots, not
/// revoked by its current CRLs (reloads apply to new handshakes without a restart), and
/// carrying a SPIFFE ID of the local trust domain. Presents `files.cert`/`files.key`
/// (roots and CRLs come from `trust`, not from `files.ca`/`files.crl`). ALPN "h2".
pub fn server_config(
    files: &TlsFiles,
    trust: &Trust,
    settings: &TlsSettings,
) -> Result<Arc<ServerConfig>> {
    server_config_for_peers(files, trust, settings, PeerRule::SameTrustDomain)
}

/// `server_config` that also refuses, during the handshake, clients whose SPIFFE ID does
/// not satisfy `allowed`; e.g. `PeerRule::AnyNode` on the Raft listener, so only nodes can
/// even open a connection there (I5). Authorization in handlers is still needed for finer
/// rules; this is the outer wall.
pub fn server_config_for_peers(
    files: &TlsFiles,
    trust: &Trust,
    settings: &TlsSettings,
    allowed: PeerRule,
) -> Result<Arc<ServerConfig>> {
    let (certs, key) = load_own_identity(files, trust)?;
    let mut config = ServerConfig::builder_with_provider(Arc::clone(trust.provider()))
        .with_protocol_versions(protocol_versions(settings))?
        .with_client_cert_verifier(SpiffeClientVerifier::new(trust.clone(), allowed))
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client config that presents `files.cert`/`files.key` and accepts a server whose
/// certificate chains to `trust`'s roots, is not revoked by the current CRLs, and whose
/// SPIFFE ID satisfies `expected`. The server's DNS name is not checked. ALPN "h2".
pub fn client_config(
    files: &TlsFiles,
    trust: &Trust,
    settings: &TlsSettings,
    expected: PeerRule,
) -> Result<Arc<ClientConfig>> {
    let (certs, key) = load_own_identity(files, trust)?;
    let config = client_builder(trust, settings, expected)?.with_client_auth_cert(certs, key)?;
    Ok(finish_client(config))
}

/// [`client_config`] with the trust loaded from `files` and default settings: what a one-off
/// client (a tool, a test, a benchmark) needs.
pub fn client_config_from_files(files: &TlsFiles, expected: PeerRule) -> Result<Arc<ClientConfig>> {
    let trust = Trust::from_files(files)?;
    client_config(files, &trust, &TlsSettings::default(), expected)
}

/// Like `client_config` but presenting no certificate. Signpost servers refuse it; it
/// exists so tests can prove that.
pub fn client_config_anonymous(
    trust: &Trust,
    settings: &TlsSettings,
    expected: PeerRule,
) -> Result<Arc<ClientConfig>> {
    let config = client_builder(trust, settings, expected)?.with_no_client_auth();
    Ok(finish_client(config))
}

fn client_builder(
    trust: &Trust,
    settings: &TlsSettings,
    expected: PeerRule,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>> {
    Ok(
        ClientConfig::builder_with_provider(Arc::clone(trust.provider()))
            .with_protocol_versions(protocol_versions(settings))?
            .dangerous()
            .with_custom_certificate_verifier(SpiffeServerVerifier::new(trust.clone(), expected)),
    )
}

fn finish_client(mut config: ClientConfig) -> Arc<ClientConfig> {
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&TLS13];
static TLS13_AND_TLS12: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];

fn protocol_versions(settings: &TlsSettings) -> &'static [&'static SupportedProtocolVersion] {
    if settings.allow_tls12 {
        TLS13_AND_TLS12
    } else {
        TLS13_ONLY
    }
}

type OwnIdentity = (
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
);

/// Loads this process's certificate and key, and checks that the certificate names a
/// SPIFFE ID of the trust domain: a process with the wrong certificate should fail at
/// startup, not with puzzling handshake errors on its peers.
fn load_own_identity(files: &TlsFiles, trust: &Trust) -> Result<OwnIdentity> {
    let certs = fs_util::read_certs(&files.cert)?;
    let key = fs_util::read_private_key(&files.key)?;
    let leaf = certs
        .first()
        .ok_or_else(|| IdentityError::parse(files.cert.display().to_string(), "no certificate"))?;
    let id = identity_from_cert_der(leaf)?;
    if id.trust_domain != trust.trust_domain() {
        return Err(IdentityError::PeerMismatch {
            expected: format!(
                "own certificate in spiffe://{} (CA {})",
                trust.trust_domain(),
                trust.ca_path().display()
            ),
            actual: id.to_string(),
        });
    }
    Ok((certs, key))
}
