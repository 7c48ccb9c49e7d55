//! Shared test fixtures: a CA in a temp dir, issued identities, a TLS echo server and a raw
//! TLS client. Each integration test binary uses a different subset.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use signpost_identity::{
    identity_from_cert_der, server_config, Ca, Identity, IssueOptions, TlsFiles, TlsIncoming,
    TlsSettings, Trust,
};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

pub const TRUST_DOMAIN: &str = "test.signpost";
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Generous bound for anything that should happen "promptly" in a test.
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// Installs a log subscriber once per test binary, so phase lines show with --nocapture.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A CA in its own temp dir, plus a place for issued certificates.
pub struct Pki {
    pub dir: TempDir,
    pub ca: Ca,
}

impl Pki {
    pub fn new(trust_domain: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(&dir.path().join("ca"), trust_domain, CA_VALIDITY).unwrap();
        Pki { dir, ca }
    }

    pub fn prefix(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues `identity` under `name` with default options.
    pub fn issue(&self, identity: Identity, name: &str) -> TlsFiles {
        self.issue_with(identity, name, &IssueOptions::default())
    }

    pub fn issue_with(&self, identity: Identity, name: &str, options: &IssueOptions) -> TlsFiles {
        self.ca
            .issue(&identity, options, &self.prefix(name))
            .unwrap();
        self.files(name)
    }

    /// TLS files for an already issued `name`, trusting this CA and its CRL.
    pub fn files(&self, name: &str) -> TlsFiles {
        TlsFiles {
            ca: self.ca.cert_path(),
            cert: self.prefix(&format!("{name}.crt")),
            key: self.prefix(&format!("{name}.key")),
            crl: Some(self.ca.crl_path()),
        }
    }

    pub fn trust(&self) -> Trust {
        Trust::from_files(&self.files("unused")).unwrap()
    }
}

/// A TLS server (TlsIncoming) that writes the client's SPIFFE ID and a newline to every
/// connection that completes the handshake, then keeps it open until the client leaves.
pub struct EchoServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_echo_server(
    files: &TlsFiles,
    trust: &Trust,
    settings: &TlsSettings,
) -> EchoServer {
    start_echo_server_with(server_config(files, trust, settings).unwrap(), settings).await
}

pub async fn start_echo_server_with(
    config: Arc<ServerConfig>,
    settings: &TlsSettings,
) -> EchoServer {
    let mut incoming = TlsIncoming::bind("127.0.0.1:0", config, settings)
        .await
        .unwrap();
    let addr = incoming.local_addr();
    let task = tokio::spawn(async move {
        while let Some(Ok(mut stream)) = incoming.next().await {
            tokio::spawn(async move {
                let line = {
                    let (_, session) = stream.get_ref();
                    let leaf = &session.peer_certificates().unwrap()[0];
                    format!("{}\n", identity_from_cert_der(leaf).unwrap())
                };
                if stream.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
                let _ = stream.flush().await;
                let mut sink = [0u8; 64];
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    EchoServer { addr, task }
}

/// Connects with `config` and returns the line the echo server sends (the identity it saw
/// for us), or the error text. With TLS 1.3 the client finishes its side of the handshake
/// before the server has judged the client certificate, so a refusal shows up as an alert
/// on the first read, not as a connect error: reading the line is what proves acceptance.
pub async fn try_handshake(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<String, String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("tcp: {e}"))?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        // The listener admits only gRPC connections: the HTTP/2 preface comes first.
        tls.write_all(signpost_identity::HTTP2_PREFACE)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut line = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let n = tls.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("closed after {:?}", String::from_utf8_lossy(&line)));
            }
            line.extend_from_slice(&buf[..n]);
            if line.ends_with(b"\n") {
                line.pop();
                return Ok(String::from_utf8(line).unwrap());
            }
        }
    };
    tokio::time::timeout(PROMPTLY, attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".to_string()))
}

/// Polls `condition` every 20 ms until it holds or `PROMPTLY` passes.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
