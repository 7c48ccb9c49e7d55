//! The client listener's edge: one tower layer in front of every gRPC service, as etcd chains
//! its interceptors. For each request it
//!
//! - reads the caller's verified SPIFFE identity from the TLS connection once and hands it to
//!   the handlers (request extensions), which authorize from it; the identity of each
//!   certificate is parsed once per listener ([`PeerIdentities`]), not once per request;
//! - after the handler answers, records the request's latency per method and code
//!   (`signpost_rpc_duration_seconds`), counts it per method, code and identity class
//!   (`signpost_rpc_requests_total`), counts sheds per limit and class
//!   (`signpost_admission_shed_total`) and authorization denials per rule
//!   (`signpost_denied_total`);
//! - writes one access-log line (target `signpost::access`) with identity, method, code,
//!   reason and latency: refusals at `info` (sheds at `debug`, so a flood does not become a
//!   log flood; the shed counter shows it), successes at `debug`.
//!
//! Health checks and reflection, which no handler of ours serves, are admitted here as reads
//! of the caller's identity, so probing cannot bypass admission control. Per-identity
//! admission of our own services stays in the handlers' first line (`Admission::admit`): the
//! write class that decides a proposal's priority slot is known only once the request is
//! decoded and the registry consulted. Deadlines are the server's request timeout and the client's
//! `grpc-timeout`, both enforced by tonic around this layer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use signpost_identity::{Identity, PeerIdentities, SpiffeId};
use tonic::codegen::http;

use crate::admission::{Admission, Op};
use crate::authz::Caller;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

/// Histogram of request latency (to response headers), by method and code.
pub const RPC_DURATION: &str = "signpost_rpc_duration_seconds";
/// Counter of requests by method, code and identity class.
pub const RPC_REQUESTS: &str = "signpost_rpc_requests_total";
/// Counter of authorization denials by rule.
pub const DENIED_TOTAL: &str = "signpost_denied_total";

/// The identity the edge verified, in the request's extensions.
#[derive(Debug, Clone)]
pub struct EdgeIdentity(pub SpiffeId);

/// The layer; see the module documentation.
#[derive(Debug, Clone)]
pub struct EdgeLayer {
    admission: Admission,
    trust_domain: std::sync::Arc<str>,
    identities: std::sync::Arc<PeerIdentities>,
}

impl EdgeLayer {
    /// The edge of a node whose admission control is `admission`.
    pub fn new(admission: Admission, trust_domain: &str) -> EdgeLayer {
        EdgeLayer {
            admission,
            trust_domain: trust_domain.into(),
            identities: std::sync::Arc::new(PeerIdentities::new()),
        }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            admission: self.admission.clone(),
            trust_domain: self.trust_domain.clone(),
            identities: self.identities.clone(),
        }
    }
}

/// The service the layer wraps around the gRPC router.
#[derive(Debug, Clone)]
pub struct Edge<S> {
    inner: S,
    admission: Admission,
    trust_domain: std::sync::Arc<str>,
    // Shared by every connection of the listener: one X.509 parse per certificate, not per
    // request.
    identities: std::sync::Arc<PeerIdentities>,
}

/// Methods served by libraries rather than our handlers, admitted at the edge.
fn admitted_here(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

/// The label for a caller's kind of identity: bounded, unlike the identity itself.
pub fn identity_class(id: Option<&SpiffeId>) -> &'static str {
    match id.map(|id| &id.identity) {
        Some(Identity::Admin(_)) => "admin",
        Some(Identity::Service(_)) => "service",
        Some(Identity::Reader(_)) => "reader",
        Some(Identity::Node(_)) => "node",
        None => "unknown",
    }
}

fn verified_identity<B>(
    request: &http::Request<B>,
    identities: &PeerIdentities,
) -> Option<SpiffeId> {
    let info = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    identities.identity(certs.first()?).ok()
}

/// A gRPC method path as a bounded label: unknown paths (a scanner probing) become "other".
fn method_label(path: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "/signpost.v1.Registry/Register",
        "/signpost.v1.Registry/Deregister",
        "/signpost.v1.Registry/Bind",
        "/signpost.v1.Registry/RotateAdmins",
        "/signpost.v1.Registry/Resolve",
        "/signpost.v1.Registry/List",
        "/signpost.v1.Registry/Watch",
        "/signpost.v1.Registry/KeepAlive",
        "/signpost.v1.Cluster/Status",
        "/signpost.v1.Cluster/AddMember",
        "/signpost.v1.Cluster/RemoveMember",
        "/signpost.v1.Cluster/TransferLeader",
        "/signpost.v1.Cluster/Snapshot",
        "/signpost.v1.Cluster/Backup",
        "/signpost.v1.Audit/Head",
        "/signpost.v1.Audit/Records",
        "/signpost.v1.Audit/Verify",
        "/signpost.v1.Audit/Prove",
        "/signpost.v1.Audit/Consistency",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ];
    KNOWN
        .iter()
        .find(|k| **k == path)
        .map(|k| k.rsplit('/').next().unwrap_or(k))
        .unwrap_or("other")
}

fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A header value that is one of `allowed` (label values must stay bounded).
fn bounded<'a>(headers: &http::HeaderMap, key: &str, allowed: &[&'a str]) -> Option<&'a str> {
    let value = headers.get(key)?.to_str().ok()?;
    allowed.iter().find(|a| **a == value).copied()
}

const SHED_LIMITS: &[&str] = &[
    "rate",
    "reads_in_flight",
    "writes_in_flight",
    "streams",
    "stream_quota",
    "identities",
    "watchers",
    "backups",
];

const RULES: &[&str] = &[
    "trust-domain",
    "service.own-name-only",
    "register.services-only",
    "admin-only",
    "node.raft-only",
];

/// Methods that write, as labelled.
const WRITES: &[&str] = &["Register", "Deregister", "Bind", "RotateAdmins"];

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, RB> Service<http::Request<B>> for Edge<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let method = method_label(request.uri().path());
        let identity = verified_identity(&request, &self.identities);
        let class = identity_class(identity.as_ref());
        let who = identity
            .as_ref()
            .map_or_else(|| "-".to_string(), ToString::to_string);
        let admitted = admitted_here(request.uri().path()).then(|| self.admit(identity.as_ref()));
        if let Some(id) = identity {
            request.extensions_mut().insert(EdgeIdentity(id));
        }
        // The clone that was polled ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let _slot = match admitted {
                Some(Err(status)) => {
                    let response = status.into_http::<RB>();
                    observe(&response, method, class, &who, started);
                    return Ok(response);
                }
                Some(Ok(slot)) => Some(slot),
                None => None,
            };
            let result = inner.call(request).await;
            if let Ok(response) = &result {
                observe(response, method, class, &who, started);
            }
            result
        })
    }
}

impl<S> Edge<S> {
    /// Admission of a health or reflection call: a read of the caller's identity.
    fn admit(
        &self,
        identity: Option<&SpiffeId>,
    ) -> Result<crate::admission::Admitted, tonic::Status> {
        let Some(id) = identity else {
            return Err(tonic::Status::unauthenticated(
                "no client certificate on this connection",
            ));
        };
        if id.trust_domain != *self.trust_domain {
            return Err(crate::error::denied(
                "trust-domain",
                &format!("{id} is not in trust domain {}", self.trust_domain),
            ));
        }
        let caller = Caller { id: id.clone() };
        self.admission.admit(&caller, Op::Read)
    }
}

/// Records a finished request's metrics and access-log line (see the module documentation).
fn observe<RB>(
    response: &http::Response<RB>,
    method: &'static str,
    class: &'static str,
    who: &str,
    started: Instant,
) {
    let elapsed = started.elapsed();
    let headers = response.headers();
    // Refusals are "trailers-only" responses: their status is in the headers. A
    // response without one is a success so far (a stream may still end in error).
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32);
    let code_name = code_label(code);
    metrics::histogram!(RPC_DURATION, "method" => method, "code" => code_name)
        .record(elapsed.as_secs_f64());
    metrics::counter!(RPC_REQUESTS, "method" => method, "code" => code_name, "class" => class)
        .increment(1);
    let reason = headers
        .get(signpost_proto::wire::REASON)
        .or_else(|| headers.get(signpost_proto::wire::RULE))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    match code {
        tonic::Code::Ok => tracing::debug!(
            target: "signpost::access", identity = %who, method, code = code_name,
            latency_ms, "request"
        ),
        tonic::Code::ResourceExhausted => {
            let limit =
                bounded(headers, signpost_proto::wire::SHED, SHED_LIMITS).unwrap_or("other");
            metrics::counter!(
                crate::observe::SHED_TOTAL, "reason" => limit, "class" => class
            )
            .increment(1);
            tracing::debug!(
                target: "signpost::access", identity = %who, method, code = code_name,
                reason = limit, latency_ms, "request shed"
            );
        }
        _ => {
            // A write refused for a reason of the record model, before the log or at apply:
            // one count per refusal, whichever decided it (a redirect is not a refusal).
            if WRITES.contains(&method) {
                if let Some(reason) = headers
                    .get(signpost_proto::wire::REASON)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<signpost_record::Reason>().ok())
                {
                    metrics::counter!(
                        crate::observe::WRITES_TOTAL,
                        "result" => "rejected",
                        "reason" => reason.as_str()
                    )
                    .increment(1);
                }
            }
            if let Some(rule) = bounded(headers, signpost_proto::wire::RULE, RULES) {
                metrics::counter!(DENIED_TOTAL, "reason" => rule).increment(1);
            }
            tracing::info!(
                target: "signpost::access", identity = %who, method, code = code_name,
                reason, latency_ms, "request refused"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_stay_bounded_whatever_a_client_sends() {
        assert_eq!(method_label("/signpost.v1.Registry/Register"), "Register");
        assert_eq!(method_label("/signpost.v1.Registry/Nope"), "other");
        assert_eq!(method_label("/x"), "other");

        let mut headers = http::HeaderMap::new();
        headers.insert(signpost_proto::wire::SHED, "rate".parse().unwrap());
        assert_eq!(
            bounded(&headers, signpost_proto::wire::SHED, SHED_LIMITS),
            Some("rate")
        );
        headers.insert(signpost_proto::wire::SHED, "made-up".parse().unwrap());
        assert_eq!(
            bounded(&headers, signpost_proto::wire::SHED, SHED_LIMITS),
            None
        );
    }
}
