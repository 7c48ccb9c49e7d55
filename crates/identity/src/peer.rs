//! The caller's identity inside a tonic handler.

use crate::spiffe_id::{identity_from_cert_der, SpiffeId};

/// The SPIFFE ID of the peer that sent `request`, from the certificate verified during the
/// TLS handshake (never from anything in the request itself). UNAUTHENTICATED when the
/// connection carries no peer certificate (not served through `TlsIncoming`) or the
/// certificate names no valid SPIFFE ID.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Result<SpiffeId, tonic::Status> {
    identity_of_leaf(request, identity_from_cert_der)
}

fn identity_of_leaf<T>(
    request: &tonic::Request<T>,
    identity: impl FnOnce(&[u8]) -> crate::Result<SpiffeId>,
) -> Result<SpiffeId, tonic::Status> {
    let certs = request.peer_certs().ok_or_else(|| {
        tonic::Status::unauthenticated("no client certificate on this connection")
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| tonic::Status::unauthenticated("empty client certificate chain"))?;
    identity(leaf).map_err(|e| tonic::Status::unauthenticated(format!("client certificate: {e}")))
}

/// Distinct client certificates whose identities a [`PeerIdentities`] keeps, at most.
pub const PEER_IDENTITIES_MAX: usize = 1_024;
/// Certificates larger than this are parsed every time and never kept, so the set holds at most
/// [`PEER_IDENTITIES_MAX`] × 4 KiB (ours are under 1 KiB).
pub const PEER_IDENTITY_CERT_BYTES_MAX: usize = 4 * 1024;

/// The SPIFFE IDs of the client certificates a listener has seen, by their DER bytes: a
/// connection sends one certificate and then thousands of requests, and parsing its X.509 for
/// each request cost 3% of a node's CPU under a resolve load. The key is the whole certificate,
/// not a hash of it, so two certificates can never share an entry; [`identity_from_cert_der`]
/// is a pure function of those bytes, so a hit answers exactly what parsing would. Refused
/// certificates are not kept, and at the bound the set starts again empty.
#[derive(Debug, Default)]
pub struct PeerIdentities {
    known: std::sync::Mutex<std::collections::HashMap<Box<[u8]>, SpiffeId>>,
}

impl PeerIdentities {
    /// An empty set.
    pub fn new() -> PeerIdentities {
        PeerIdentities::default()
    }

    /// The SPIFFE ID of a certificate a TLS verifier has already accepted (see
    /// [`identity_from_cert_der`]).
    pub fn identity(&self, der: &[u8]) -> crate::Result<SpiffeId> {
        if der.len() > PEER_IDENTITY_CERT_BYTES_MAX {
            return identity_from_cert_der(der);
        }
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = known.get(der) {
            return Ok(id.clone());
        }
        let id = identity_from_cert_der(der)?;
        if known.len() >= PEER_IDENTITIES_MAX {
            known.clear();
        }
        known.insert(der.into(), id.clone());
        Ok(id)
    }

    /// [`peer_identity`], with the certificate's identity kept.
    pub fn of_request<T>(&self, request: &tonic::Request<T>) -> Result<SpiffeId, tonic::Status> {
        identity_of_leaf(request, |der| self.identity(der))
    }

    /// Certificates kept now.
    pub fn len(&self) -> usize {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
