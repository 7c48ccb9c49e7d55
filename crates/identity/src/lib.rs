//! Certificates and transport security for Signpost.
//!
//! # Model
//!
//! Every process holds a certificate from one Signpost CA (a trust domain). The certificate
//! names exactly one SPIFFE ID, `spiffe://<trust domain>/<kind>/<name>`, with kind `node`,
//! `service`, `admin` or `reader`; that URI SAN *is* the identity. Host names and IP
//! addresses are not identities: nodes move, so clients check the SPIFFE ID instead of the
//! DNS name.
//!
//! Every connection is mutual TLS (TLS 1.3 by default). Both sides verify the peer chain
//! against the CA and the current CRL. The CRL is a file that the CA rewrites atomically on
//! `revoke`; a `Trust` reloads it when the file changes (poll) or on SIGHUP, and the new CRL
//! applies to every handshake that starts afterwards, without a restart. Existing
//! connections are not cut. Session resumption is off, so no handshake skips the CRL.
//!
//! The pieces, in the order a node uses them:
//!
//! - [`Ca`]: `init` a CA directory, `issue` leaf certificates, `revoke` them.
//! - [`Trust`]: roots + reloadable CRLs; [`spawn_crl_watcher`], [`spawn_sighup_reloader`].
//! - [`server_config`] (or [`server_config_for_peers`]) / [`client_config`]: rustls configs
//!   bound to a `Trust`.
//! - [`TlsIncoming`]: accept loop with handshake deadlines and limits, for
//!   `serve_with_incoming`; handlers call [`peer_identity`].
//! - [`connect_channel`]: a lazy tonic `Channel` over the same mutual TLS.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use signpost_identity::{
//!     client_config, connect_channel, server_config, spawn_crl_watcher, Ca, Identity,
//!     IssueOptions, PeerRule, TlsFiles, TlsIncoming, TlsSettings, Trust,
//!     DEFAULT_CRL_POLL_INTERVAL,
//! };
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::path::Path::new("/etc/signpost");
//! let ca = Ca::init(&dir.join("ca"), "prod.example", Duration::from_secs(5 * 365 * 86400))?;
//! ca.issue(&Identity::Node(1), &IssueOptions::default(), &dir.join("node1"))?;
//!
//! let files = TlsFiles {
//!     ca: ca.cert_path(),
//!     cert: dir.join("node1.crt"),
//!     key: dir.join("node1.key"),
//!     crl: Some(ca.crl_path()),
//! };
//! let settings = TlsSettings::default();
//! let trust = Trust::from_files(&files)?;
//! let _watcher = spawn_crl_watcher(trust.clone(), DEFAULT_CRL_POLL_INTERVAL);
//!
//! // Server: tonic::transport::Server::builder().add_service(..).serve_with_incoming(incoming)
//! let incoming =
//!     TlsIncoming::bind("0.0.0.0:7000", server_config(&files, &trust, &settings)?, &settings)
//!         .await?;
//!
//! // Client: a channel to another node, which must present a node identity.
//! let config = client_config(&files, &trust, &settings, PeerRule::AnyNode)?;
//! let channel = connect_channel("10.0.0.2:7000", config, settings.handshake_timeout)?;
//! # drop((incoming, channel));
//! # Ok(())
//! # }
//! ```
#![deny(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    rust_2018_idioms,
    unused_must_use
)]

mod ca;
mod client_cert_verifier;
mod error;
mod fs_util;
mod peer;
mod server_cert_verifier;
mod spiffe_id;
mod tls_config;
mod tls_connector;
mod tls_incoming;
mod trust;

pub use ca::{
    certificate_not_after, Ca, IssueOptions, CA_CERT_FILE, CA_KEY_FILE, CLOCK_SKEW_ALLOWANCE,
    CRL_FILE, CRL_NEXT_UPDATE, EXTRA_SANS_MAX, ISSUED_LOG_FILE, LEAF_VALIDITY_MAX, REVOKED_MAX,
};
pub use error::{IdentityError, Result};
pub use peer::{peer_identity, PeerIdentities, PEER_IDENTITIES_MAX, PEER_IDENTITY_CERT_BYTES_MAX};
pub use spiffe_id::{
    identity_from_cert_der, validate_trust_domain, Identity, SpiffeId, DEFAULT_VALIDITY_NODE,
    DEFAULT_VALIDITY_SHORT, NAME_LEN_MAX, TRUST_DOMAIN_LEN_MAX,
};
pub use tls_config::{
    client_config, client_config_anonymous, client_config_from_files, server_config,
    server_config_for_peers, PeerRule, TlsFiles, TlsSettings, ALPN_H2, DEFAULT_CONNECTIONS_MAX,
    DEFAULT_CONNECTIONS_PER_IP_MAX, DEFAULT_FIRST_BYTE_TIMEOUT, DEFAULT_HANDSHAKES_CONCURRENT_MAX,
    DEFAULT_HANDSHAKES_PER_IP_BURST, DEFAULT_HANDSHAKES_PER_IP_MAX,
    DEFAULT_HANDSHAKES_PER_IP_PER_SEC, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_PREFACE_TIMEOUT,
};
pub use tls_connector::{
    connect_channel, connect_channel_from, TlsConnector, HTTP2_KEEPALIVE_INTERVAL,
    HTTP2_KEEPALIVE_TIMEOUT, HTTP2_MAX_HEADER_LIST_BYTES,
};
pub use tls_incoming::{
    SourceAllowlist, TlsConnection, TlsIncoming, CONNECTIONS_OPEN, HANDSHAKES_REFUSED,
    HTTP2_PREFACE,
};
pub use trust::{spawn_crl_watcher, spawn_sighup_reloader, Trust, DEFAULT_CRL_POLL_INTERVAL};
