//! `TlsIncoming`: a TCP listener that hands tonic only connections whose mutual-TLS
//! handshake has completed.
//!
//! The accept loop never waits on a handshake. Each accepted socket gets its own task with a
//! deadline; a silent or slow client costs one task and one permit until the deadline, and
//! never delays anybody else. Permits bound the handshakes in progress overall and per
//! source IP; a connection beyond either bound is closed at once (the kernel backlog is the
//! only queue). Separate slots bound the open connections overall and per source IP for the
//! connection's whole lifetime (they travel inside [`TlsConnection`] and are returned when
//! tonic drops it), so one address cannot hold every connection of the listener either.
//! Finished handshakes go through a bounded channel, so a server that stops pulling
//! connections stops the handshakes from piling up.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::Stream;

use crate::error::{IdentityError, Result};
use crate::tls_config::TlsSettings;

/// Completed handshakes waiting for the server to take them.
const ACCEPTED_QUEUE_MAX: usize = 64;
/// Source IPs whose handshake rate is tracked; beyond it, IPs with a full bucket (nothing to
/// remember) are forgotten, and if that is not enough, all are (a reset only forgives).
const RATE_TRACKED_IPS_MAX: usize = 65_536;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// A stream of established server-side TLS connections, for
/// `tonic::transport::Server::builder().serve_with_incoming(incoming)`.
///
/// tonic implements `Connected` for `tokio_rustls::server::TlsStream<TcpStream>`, so handlers
/// can call `request.peer_certs()` (or `peer_identity`). Items are never `Err`: failed
/// handshakes are logged at debug level and dropped. Dropping the stream stops accepting.
#[derive(Debug)]
pub struct TlsIncoming {
    local_addr: SocketAddr,
    accepted: mpsc::Receiver<TlsConnection>,
    accept_task: JoinHandle<()>,
}

impl TlsIncoming {
    /// Binds `addr` (e.g. "0.0.0.0:7000", or port 0 for tests) and starts accepting. Must be
    /// called inside a tokio runtime.
    pub async fn bind(
        addr: &str,
        config: Arc<ServerConfig>,
        settings: &TlsSettings,
    ) -> Result<TlsIncoming> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| IdentityError::Net {
                action: "bind",
                addr: addr.to_string(),
                source,
            })?;
        TlsIncoming::from_listener(listener, config, settings)
    }

    /// Starts accepting on an already bound listener. Must be called inside a tokio runtime.
    pub fn from_listener(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        settings: &TlsSettings,
    ) -> Result<TlsIncoming> {
        let local_addr = listener.local_addr().map_err(|source| IdentityError::Net {
            action: "query local address of",
            addr: "listener".to_string(),
            source,
        })?;
        if settings.handshakes_concurrent_max == 0
            || settings.handshakes_per_ip_max == 0
            || settings.connections_max == 0
            || settings.connections_per_ip_max == 0
        {
            return Err(IdentityError::InvalidAddress {
                addr: local_addr.to_string(),
                reason: "handshake and connection limits must be > 0".to_string(),
            });
        }
        let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE_MAX);
        let accept_loop = AcceptLoop {
            listener,
            acceptor: TlsAcceptor::from(config),
            handshake_timeout: settings.handshake_timeout,
            permits: Arc::new(Semaphore::new(settings.handshakes_concurrent_max)),
            per_ip: PerIpLimit::new(settings.handshakes_per_ip_max),
            connections: Arc::new(Semaphore::new(settings.connections_max)),
            connections_per_ip: PerIpLimit::new(settings.connections_per_ip_max),
            handshake_rate: PerIpRate::new(
                settings.handshakes_per_ip_per_sec,
                settings.handshakes_per_ip_burst,
            ),
            accepted: tx,
        };
        Ok(TlsIncoming {
            local_addr,
            accepted: rx,
            accept_task: tokio::spawn(accept_loop.run()),
        })
    }

    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Stream for TlsIncoming {
    type Item = std::result::Result<TlsConnection, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.accepted.poll_recv(cx).map(|stream| stream.map(Ok))
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        // Closes the listening socket; handshakes in flight end at their deadline or when
        // they find the channel closed.
        self.accept_task.abort();
    }
}

struct AcceptLoop {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    permits: Arc<Semaphore>,
    per_ip: PerIpLimit,
    connections: Arc<Semaphore>,
    connections_per_ip: PerIpLimit,
    handshake_rate: PerIpRate,
    accepted: mpsc::Sender<TlsConnection>,
}

impl AcceptLoop {
    async fn run(mut self) {
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            };
            // Dropping `tcp` closes it: that is the whole response to a flood. The rate first:
            // it is what makes a handshake flood cheap for us. Then connection slots: they are
            // the scarcer, longer-lived resource.
            if !self.handshake_rate.try_take(peer.ip()) {
                tracing::debug!(%peer, "handshake rate of this address exceeded; closing");
                continue;
            }
            let Ok(connection) = Arc::clone(&self.connections).try_acquire_owned() else {
                tracing::debug!(%peer, "too many open connections; closing connection");
                continue;
            };
            let Some(connection_ip) = self.connections_per_ip.try_acquire(peer.ip()) else {
                tracing::debug!(%peer, "too many open connections from this address; closing");
                continue;
            };
            let slots = ConnectionSlots {
                _listener: connection,
                _ip: connection_ip,
            };
            let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                tracing::debug!(%peer, "too many handshakes in progress; closing connection");
                continue;
            };
            let Some(ip_slot) = self.per_ip.try_acquire(peer.ip()) else {
                tracing::debug!(%peer, "too many handshakes from this address; closing connection");
                continue;
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            tokio::spawn(handshake(
                tcp,
                peer,
                self.acceptor.clone(),
                self.handshake_timeout,
                self.accepted.clone(),
                (permit, ip_slot),
                slots,
            ));
        }
    }
}

/// One handshake under its deadline; the permits are released when it ends.
async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    timeout: Duration,
    accepted: mpsc::Sender<TlsConnection>,
    _permits: (OwnedSemaphorePermit, PerIpSlot),
    slots: ConnectionSlots,
) {
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            let stream = TlsConnection {
                stream,
                _slots: slots,
            };
            // Err only when the TlsIncoming is gone; the connection is dropped with it.
            let _ = accepted.send(stream).await;
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, ?timeout, "TLS handshake timed out"),
    }
}

/// Counts handshakes (or connections) in progress per source IP. The map holds only IPs with a
/// slot taken, so it is bounded by the matching global limit.
#[derive(Clone)]
struct PerIpLimit {
    max: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerIpLimit {
    fn new(max: usize) -> PerIpLimit {
        PerIpLimit {
            max,
            counts: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn try_acquire(&self, ip: IpAddr) -> Option<PerIpSlot> {
        let mut counts = self.lock();
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(PerIpSlot {
            ip,
            limit: self.clone(),
        })
    }

    fn release(&self, ip: IpAddr) {
        let mut counts = self.lock();
        if let Some(count) = counts.get_mut(&ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&ip);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Plain counters: a panic while holding the lock cannot leave them half-updated.
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One handshake's claim on its source IP's budget, returned on drop.
struct PerIpSlot {
    ip: IpAddr,
    limit: PerIpLimit,
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        self.limit.release(self.ip);
    }
}

/// Token buckets of handshakes started per source IP. Owned by the accept loop alone, so no
/// lock; bounded by `RATE_TRACKED_IPS_MAX`.
struct PerIpRate {
    per_sec: f64,
    burst: f64,
    buckets: HashMap<IpAddr, (f64, std::time::Instant)>,
}

impl PerIpRate {
    fn new(per_sec: u32, burst: u32) -> PerIpRate {
        PerIpRate {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
        }
    }

    fn try_take(&mut self, ip: IpAddr) -> bool {
        let now = std::time::Instant::now();
        if self.buckets.len() >= RATE_TRACKED_IPS_MAX && !self.buckets.contains_key(&ip) {
            let (per_sec, burst) = (self.per_sec, self.burst);
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec < burst
            });
            if self.buckets.len() >= RATE_TRACKED_IPS_MAX {
                self.buckets.clear();
            }
        }
        let (tokens, at) = self.buckets.entry(ip).or_insert((self.burst, now));
        let elapsed = now.saturating_duration_since(*at).as_secs_f64();
        *tokens = (*tokens + elapsed * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The listener-wide and per-IP connection slots of one connection, returned on drop.
struct ConnectionSlots {
    _listener: OwnedSemaphorePermit,
    _ip: PerIpSlot,
}

/// An established server-side mutual-TLS connection from [`TlsIncoming`]. It holds the
/// connection's slots in the listener's connection limits until it is dropped; otherwise it
/// is the `TlsStream` (tonic sees the same connect info, so `peer_identity` works unchanged).
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    _slots: ConnectionSlots,
}

impl std::fmt::Debug for TlsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnection")
            .field("peer", &self.stream.get_ref().0.peer_addr().ok())
            .finish()
    }
}

impl TlsConnection {
    /// The TCP stream and the rustls session (peer certificates, negotiated protocol).
    pub fn get_ref(&self) -> (&TcpStream, &rustls::ServerConnection) {
        self.stream.get_ref()
    }
}

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
