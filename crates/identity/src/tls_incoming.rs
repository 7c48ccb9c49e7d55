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
//!
//! Deadlines keep idle connections from holding slots: a connection must send its first byte
//! within `first_byte_timeout`, finish the handshake within `handshake_timeout`, and send the
//! HTTP/2 connection preface within `preface_timeout` after it; anything else is closed
//! before tonic sees it. A listener can also admit only an allowlist of source addresses
//! ([`SourceAllowlist`]): the Raft listener admits only its members, so no outsider can take
//! a slot that Raft needs.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
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

/// The HTTP/2 client connection preface (RFC 9113 §3.4), the first bytes of every gRPC
/// connection.
pub const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The source addresses a listener admits; shared, so it can follow membership changes.
#[derive(Debug, Clone, Default)]
pub struct SourceAllowlist {
    ips: Arc<RwLock<HashSet<IpAddr>>>,
}

impl SourceAllowlist {
    /// An allowlist of `ips`.
    pub fn new(ips: impl IntoIterator<Item = IpAddr>) -> SourceAllowlist {
        let list = SourceAllowlist::default();
        list.set(ips);
        list
    }

    /// Replaces the admitted addresses.
    pub fn set(&self, ips: impl IntoIterator<Item = IpAddr>) {
        let ips: HashSet<IpAddr> = ips.into_iter().collect();
        *self.ips.write().unwrap_or_else(|p| p.into_inner()) = ips;
    }

    /// Whether `ip` is admitted. IPv4-mapped IPv6 addresses match their IPv4 form.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.ips
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ip)
    }
}

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
        TlsIncoming::bind_admitting(addr, config, settings, None).await
    }

    /// [`TlsIncoming::bind`] admitting only connections from `allow`'s addresses (None: any).
    pub async fn bind_admitting(
        addr: &str,
        config: Arc<ServerConfig>,
        settings: &TlsSettings,
        allow: Option<SourceAllowlist>,
    ) -> Result<TlsIncoming> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| IdentityError::Net {
                action: "bind",
                addr: addr.to_string(),
                source,
            })?;
        TlsIncoming::start(listener, config, settings, allow)
    }

    /// Starts accepting on an already bound listener. Must be called inside a tokio runtime.
    pub fn from_listener(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        settings: &TlsSettings,
    ) -> Result<TlsIncoming> {
        TlsIncoming::start(listener, config, settings, None)
    }

    fn start(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        settings: &TlsSettings,
        allow: Option<SourceAllowlist>,
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
            deadlines: Deadlines {
                first_byte: settings.first_byte_timeout.min(settings.handshake_timeout),
                handshake: settings.handshake_timeout,
                preface: settings.preface_timeout,
            },
            allow,
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

/// How long a new connection may take for each step before it is closed.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    first_byte: Duration,
    handshake: Duration,
    preface: Duration,
}

struct AcceptLoop {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    deadlines: Deadlines,
    allow: Option<SourceAllowlist>,
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
            // Dropping `tcp` closes it: that is the whole response to a flood. Outsiders of an
            // allowlisted listener first: they get nothing at all. Then the rate:
            // it is what makes a handshake flood cheap for us. Then connection slots: they are
            // the scarcer, longer-lived resource.
            if let Some(allow) = &self.allow {
                if !allow.admits(peer.ip()) {
                    refused("not_member");
                    tracing::debug!(%peer, "source address is not admitted here; closing");
                    continue;
                }
            }
            if !self.handshake_rate.try_take(peer.ip()) {
                refused("rate");
                tracing::debug!(%peer, "handshake rate of this address exceeded; closing");
                continue;
            }
            let Ok(connection) = Arc::clone(&self.connections).try_acquire_owned() else {
                refused("connections");
                tracing::debug!(%peer, "too many open connections; closing connection");
                continue;
            };
            let Some(connection_ip) = self.connections_per_ip.try_acquire(peer.ip()) else {
                refused("connections_per_ip");
                tracing::debug!(%peer, "too many open connections from this address; closing");
                continue;
            };
            metrics::gauge!(CONNECTIONS_OPEN).increment(1.0);
            let slots = ConnectionSlots {
                _listener: connection,
                _ip: connection_ip,
            };
            let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                refused("handshakes");
                tracing::debug!(%peer, "too many handshakes in progress; closing connection");
                continue;
            };
            let Some(ip_slot) = self.per_ip.try_acquire(peer.ip()) else {
                refused("handshakes_per_ip");
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
                self.deadlines,
                self.accepted.clone(),
                (permit, ip_slot),
                slots,
            ));
        }
    }
}

/// One connection's way in, each step under its deadline: first byte, TLS handshake, HTTP/2
/// preface. The handshake permits are released when it ends, whatever the outcome.
async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    deadlines: Deadlines,
    accepted: mpsc::Sender<TlsConnection>,
    permits: (OwnedSemaphorePermit, PerIpSlot),
    slots: ConnectionSlots,
) {
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(deadlines.first_byte, tcp.readable()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            refused("first_byte_error");
            tracing::debug!(%peer, error = %e, "connection failed before its first byte");
            return;
        }
        Err(_) => {
            refused("first_byte_timeout");
            tracing::debug!(%peer, timeout = ?deadlines.first_byte, "no first byte in time; closing");
            return;
        }
    }
    let left = deadlines.handshake.saturating_sub(started.elapsed());
    let mut stream = match tokio::time::timeout(left, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            refused("tls_error");
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            refused("tls_timeout");
            tracing::debug!(%peer, timeout = ?deadlines.handshake, "TLS handshake timed out");
            return;
        }
    };
    // The handshake is done: its slots go back before we wait on the preface.
    drop(permits);
    let mut preface = [0u8; HTTP2_PREFACE.len()];
    match tokio::time::timeout(deadlines.preface, stream.read_exact(&mut preface)).await {
        Ok(Ok(_)) if &preface == HTTP2_PREFACE => {}
        Ok(Ok(_)) => {
            refused("not_http2");
            tracing::debug!(%peer, "connection did not start with the HTTP/2 preface; closing");
            return;
        }
        Ok(Err(e)) => {
            refused("preface_error");
            tracing::debug!(%peer, error = %e, "connection failed before the HTTP/2 preface");
            return;
        }
        Err(_) => {
            refused("preface_timeout");
            tracing::debug!(%peer, timeout = ?deadlines.preface, "no HTTP/2 preface in time; closing");
            return;
        }
    }
    let stream = TlsConnection {
        stream,
        replay: 0,
        _slots: slots,
    };
    // Err only when the TlsIncoming is gone; the connection is dropped with it.
    let _ = accepted.send(stream).await;
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

/// Counter of connections closed before they could carry a request, by reason.
pub const HANDSHAKES_REFUSED: &str = "signpost_tls_handshakes_refused_total";
/// Gauge of connections holding a slot (handshaking or established), all listeners.
pub const CONNECTIONS_OPEN: &str = "signpost_tls_connections_open";

fn refused(reason: &'static str) {
    metrics::counter!(HANDSHAKES_REFUSED, "reason" => reason).increment(1);
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

impl Drop for ConnectionSlots {
    fn drop(&mut self) {
        metrics::gauge!(CONNECTIONS_OPEN).decrement(1.0);
    }
}

/// An established server-side mutual-TLS connection from [`TlsIncoming`]. It holds the
/// connection's slots in the listener's connection limits until it is dropped; otherwise it
/// is the `TlsStream` (tonic sees the same connect info, so `peer_identity` works unchanged).
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    // Bytes of the HTTP/2 preface (read to check it) already handed back to the server.
    replay: usize,
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
        if self.replay < HTTP2_PREFACE.len() {
            let rest = &HTTP2_PREFACE[self.replay..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.replay += n;
            return Poll::Ready(Ok(()));
        }
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
