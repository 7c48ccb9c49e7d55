//! Client side transport: a tower connector doing TCP + mutual TLS, and `connect_channel`,
//! which wraps it in a lazy, reusable tonic `Channel`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::error::{IdentityError, Result};

/// Interval of HTTP/2 PINGs on idle channels: finds dead peers (and keeps NAT/conntrack
/// entries alive) without waiting for a request to time out.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Largest header block (trailers included) a channel accepts, raw. A NOT_FOUND carrying a
/// proof of absence in its status details is a few KiB of base64; with a long admin chain it
/// passes hyper's 16 KiB default, and a server keeps the details under 32 KiB before base64.
pub const HTTP2_MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// How long a PING may go unanswered before the connection is considered dead.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A `tower::Service<Uri>` that opens a TCP connection to the URI's host:port and runs the
/// client TLS handshake, both within `connect_timeout`. Peer verification is entirely the
/// `ClientConfig`'s (SPIFFE rule, chain, CRL); the host is used only for SNI.
#[derive(Clone)]
pub struct TlsConnector {
    config: Arc<ClientConfig>,
    connect_timeout: Duration,
    local_ip: Option<IpAddr>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl TlsConnector {
    /// A connector using `config` (see `client_config`).
    pub fn new(config: Arc<ClientConfig>, connect_timeout: Duration) -> TlsConnector {
        TlsConnector {
            config,
            connect_timeout,
            local_ip: None,
        }
    }

    /// Connects from `ip` instead of the address the kernel picks. Nodes dial peers from the
    /// address they listen on, so a peer's Raft listener can admit members by source address.
    pub fn from_local_ip(mut self, ip: Option<IpAddr>) -> TlsConnector {
        self.local_ip = ip;
        self
    }

    /// Connects to `host:port` from `uri` and completes the handshake.
    pub async fn connect(&self, uri: Uri) -> Result<TlsStream<TcpStream>> {
        let addr = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        let (host, port) = host_port(&uri)?;
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| IdentityError::InvalidAddress {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        let config = Arc::clone(&self.config);
        let local_ip = self.local_ip;
        let attempt = async move {
            let net_error = |source| IdentityError::Net {
                action: "connect to",
                addr: format!("{host}:{port}"),
                source,
            };
            let tcp = match local_ip {
                None => TcpStream::connect((host.as_str(), port))
                    .await
                    .map_err(net_error)?,
                Some(ip) => connect_from(ip, &host, port).await.map_err(net_error)?,
            };
            // gRPC messages are small and latency-bound; Nagle only adds delay.
            tcp.set_nodelay(true).map_err(|source| IdentityError::Net {
                action: "set TCP_NODELAY on connection to",
                addr: format!("{host}:{port}"),
                source,
            })?;
            tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await
                .map_err(|source| IdentityError::Net {
                    action: "TLS handshake with",
                    addr: format!("{host}:{port}"),
                    source,
                })
        };
        tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| IdentityError::Timeout {
                action: "connect to",
                addr,
                timeout_ms: self.connect_timeout.as_millis(),
            })?
    }
}

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = IdentityError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move { connector.connect(uri).await.map(TokioIo::new) })
    }
}

/// Connects to the first address of `host:port` of `ip`'s family, from `ip` (any port).
async fn connect_from(ip: IpAddr, host: &str, port: u16) -> std::io::Result<TcpStream> {
    let target = tokio::net::lookup_host((host, port))
        .await?
        .find(|a| a.is_ipv4() == ip.is_ipv4())
        .ok_or_else(|| std::io::Error::other(format!("no address of {host} matches {ip}")))?;
    let socket = if ip.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(target).await
}

/// A lazy tonic channel to `addr` ("host:port") over mutual TLS with `config`. Nothing is
/// dialled until the first request; the channel reconnects on its own and is cheap to
/// clone. `timeout` bounds TCP connect plus handshake, and HTTP/2 keepalive pings detect
/// dead peers on idle channels.
pub fn connect_channel(
    addr: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<Channel> {
    connect_channel_from(addr, config, timeout, None)
}

/// [`connect_channel`] from a chosen local address (None: the kernel's choice).
pub fn connect_channel_from(
    addr: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
    local_ip: Option<IpAddr>,
) -> Result<Channel> {
    let uri =
        format!("http://{addr}")
            .parse::<Uri>()
            .map_err(|e| IdentityError::InvalidAddress {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
    // Validate now rather than on the first request.
    host_port(&uri)?;
    let endpoint = Endpoint::from(uri)
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .http2_max_header_list_size(HTTP2_MAX_HEADER_LIST_BYTES)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(endpoint
        .connect_with_connector_lazy(TlsConnector::new(config, timeout).from_local_ip(local_ip)))
}

fn host_port(uri: &Uri) -> Result<(String, u16)> {
    let invalid = |reason: &str| IdentityError::InvalidAddress {
        addr: uri.to_string(),
        reason: reason.to_string(),
    };
    let host = uri.host().ok_or_else(|| invalid("missing host"))?;
    let port = uri.port_u16().ok_or_else(|| invalid("missing port"))?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(invalid("expected host:port without a path"));
    }
    // Uri keeps the brackets of an IPv6 literal; connect() and ServerName want the address.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host.to_string(), port))
}
