//! Client side: verifies a server's certificate chain and revocation status against a
//! `Trust`, then its SPIFFE ID against a `PeerRule`. The DNS name is deliberately not
//! checked: nodes move between hosts and are named by SPIFFE ID, not by address.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, Error, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;

use crate::client_cert_verifier::other_cert_error;
use crate::error::IdentityError;
use crate::spiffe_id::identity_from_cert_der;
use crate::tls_config::PeerRule;
use crate::trust::Trust;

#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    trust: Trust,
    rule: PeerRule,
}

impl SpiffeServerVerifier {
    pub(crate) fn new(trust: Trust, rule: PeerRule) -> Arc<SpiffeServerVerifier> {
        Arc::new(SpiffeServerVerifier { trust, rule })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let revocation = self.trust.revocation();
        let crl_refs: Vec<&webpki::CertRevocationList<'static>> = revocation.crls.iter().collect();
        // Same policy as the server side (rustls defaults): whole chain, unknown status is an
        // error, CRL expiry ignored. `new` only fails on an empty list, i.e. no CRL file.
        let revocation_options = webpki::RevocationOptionsBuilder::new(&crl_refs)
            .ok()
            .map(|builder| builder.build());
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.trust.provider().signature_verification_algorithms.all,
            self.trust.anchors(),
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            revocation_options,
            None,
        )
        .map_err(pki_error)?;

        let id = identity_from_cert_der(end_entity).map_err(other_cert_error)?;
        if !self.rule.matches(&id, self.trust.trust_domain()) {
            return Err(other_cert_error(IdentityError::PeerMismatch {
                expected: self.rule.describe(self.trust.trust_domain()),
                actual: id.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
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

/// webpki's verdict as the rustls error rustls' own verifier would give (so alerts and
/// logs look the same on both sides); anything unusual keeps webpki's text.
fn pki_error(error: webpki::Error) -> Error {
    use webpki::Error as E;
    let cert_error = match error {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::InvalidCertValidity => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::CertRevoked => CertificateError::Revoked,
        E::UnknownRevocationStatus => CertificateError::UnknownRevocationStatus,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    Error::InvalidCertificate(cert_error)
}
