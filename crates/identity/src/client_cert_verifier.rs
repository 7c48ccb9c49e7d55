//! Server side: verifies client certificates against the current CRLs of a `Trust`.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use rustls::{Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::error::IdentityError;
use crate::spiffe_id::identity_from_cert_der;
use crate::tls_config::PeerRule;
use crate::trust::Trust;

/// Delegates chain, validity and revocation checks to the `WebPkiClientVerifier` of the
/// `Trust`'s current revocation state (rebuilt on every CRL reload), then requires a
/// SPIFFE ID that satisfies `rule` (at least: of the local trust domain), so every accepted
/// connection has an identity that `peer_identity` can read.
#[derive(Debug)]
pub(crate) struct SpiffeClientVerifier {
    trust: Trust,
    rule: PeerRule,
    /// Sent in CertificateRequest so clients holding several certificates pick ours. Roots
    /// never change at run time, so this is computed once.
    root_hints: Vec<DistinguishedName>,
}

impl SpiffeClientVerifier {
    pub(crate) fn new(trust: Trust, rule: PeerRule) -> Arc<SpiffeClientVerifier> {
        let root_hints = trust.roots().subjects();
        Arc::new(SpiffeClientVerifier {
            trust,
            rule,
            root_hints,
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let revocation = self.trust.revocation();
        revocation
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = identity_from_cert_der(end_entity).map_err(other_cert_error)?;
        if !self.rule.matches(&id, self.trust.trust_domain()) {
            return Err(other_cert_error(IdentityError::PeerMismatch {
                expected: self.rule.describe(self.trust.trust_domain()),
                actual: id.to_string(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.trust.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.trust.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.supported_verify_schemes()
    }
}

/// Wraps our error so the TLS layer logs a message that names the identity problem.
pub(crate) fn other_cert_error(e: IdentityError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}
