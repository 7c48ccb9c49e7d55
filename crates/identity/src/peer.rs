//! The caller's identity inside a tonic handler.

use crate::spiffe_id::{identity_from_cert_der, SpiffeId};

/// The SPIFFE ID of the peer that sent `request`, from the certificate verified during the
/// TLS handshake (never from anything in the request itself). UNAUTHENTICATED when the
/// connection carries no peer certificate (not served through `TlsIncoming`) or the
/// certificate names no valid SPIFFE ID.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Result<SpiffeId, tonic::Status> {
    let certs = request.peer_certs().ok_or_else(|| {
        tonic::Status::unauthenticated("no client certificate on this connection")
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| tonic::Status::unauthenticated("empty client certificate chain"))?;
    identity_from_cert_der(leaf)
        .map_err(|e| tonic::Status::unauthenticated(format!("client certificate: {e}")))
}
