//! A file-based certificate authority: one self-signed ECDSA P-256 root that issues SPIFFE
//! leaf certificates and publishes a CRL.
//!
//! Layout of the CA directory:
//!
//! | file | mode | content |
//! |---|---|---|
//! | `ca.crt` | 0644 | the root certificate (distribute to every node and client) |
//! | `ca.key` | 0600 | the root private key (PKCS#8 PEM) |
//! | `crl.pem` | 0644 | the current CRL, always present and signed (distribute like `ca.crt`) |
//! | `issued.log` | 0600 | one line per issued certificate: time, serial, SPIFFE ID, expiry, path |
//!
//! The CRL is its own state: `revoke` reads the current `crl.pem` (after checking its
//! signature), adds a serial, bumps the CRL number and replaces the file atomically. There is
//! no second copy that could disagree with what servers load. Two `revoke` runs at the same
//! time on the same directory can lose one update; the CA is an operator tool, run by one
//! operator at a time.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::error::{IdentityError, Result};
use crate::fs_util::{self, MODE_PUBLIC, MODE_SECRET};
use crate::spiffe_id::{single_uri_san, validate_trust_domain, Identity, SpiffeId};

/// File name of the CA certificate inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the CRL inside the CA directory.
pub const CRL_FILE: &str = "crl.pem";
/// File name of the issuance log inside the CA directory.
pub const ISSUED_LOG_FILE: &str = "issued.log";

/// How far `not_before` is backdated by default, so a peer whose clock is a little behind
/// does not reject a certificate that was just issued.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);
/// Longest leaf lifetime the CA will sign. Leaves are meant to rotate; a year-long leaf is
/// already a long time to depend on the CRL alone.
pub const LEAF_VALIDITY_MAX: Duration = Duration::from_secs(366 * 24 * 60 * 60);
/// Most DNS plus IP SANs on one leaf.
pub const EXTRA_SANS_MAX: usize = 32;
/// Most entries in the CRL. Every server holds the whole list and checks it per handshake;
/// past this, rotate the CA instead of growing the list.
pub const REVOKED_MAX: usize = 100_000;
/// The CRL's `nextUpdate` distance. Signpost distributes the CRL as a file and rustls does not
/// enforce CRL expiry by default, so this is informational; it is long so that a verifier
/// that does enforce it does not lock everyone out between revocations.
pub const CRL_NEXT_UPDATE: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Length of random serial numbers: 128 bits, well above the 64 bits CA/B asks for, and under
/// RFC 5280's 20-octet limit.
const SERIAL_LEN: usize = 16;

/// Options for `Ca::issue`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IssueOptions {
    /// Lifetime counted from `not_before` (or from now when `not_before` is `None`).
    /// `None` takes `Identity::default_validity` (24 h; 30 days for nodes).
    pub validity: Option<Duration>,
    /// Explicit start of validity. `None`: now minus `CLOCK_SKEW_ALLOWANCE`.
    pub not_before: Option<SystemTime>,
    /// Explicit end of validity; overrides `validity`. May be in the past (tests of expiry).
    pub not_after: Option<SystemTime>,
    /// Extra DNS SANs (the identity is the URI SAN; peers do not check these).
    pub dns_names: Vec<String>,
    /// Extra IP SANs.
    pub ip_addrs: Vec<IpAddr>,
}

/// A loaded CA: its certificate, its signing key and its directory.
#[derive(Debug)]
pub struct Ca {
    dir: PathBuf,
    trust_domain: String,
    cert_der: CertificateDer<'static>,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Creates a new CA in `dir` (created if missing, mode 0700) for `trust_domain`, valid for
    /// `validity`. Writes `ca.key` (0600), `ca.crt` and an empty signed `crl.pem`, so servers
    /// can always load a CRL. Refuses to touch a directory that already holds any of them.
    pub fn init(dir: &Path, trust_domain: &str, validity: Duration) -> Result<Ca> {
        validate_trust_domain(trust_domain)?;
        if validity.is_zero() {
            return Err(IdentityError::InvalidIssueOptions(
                "CA validity must be > 0".to_string(),
            ));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| IdentityError::io("create directory", dir, e))?;
        for name in [CA_KEY_FILE, CA_CERT_FILE, CRL_FILE] {
            let file = dir.join(name);
            if file.exists() {
                return Err(IdentityError::CaExists {
                    dir: dir.to_path_buf(),
                    file,
                });
            }
        }

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let not_after = now.checked_add(validity).ok_or_else(|| {
            IdentityError::InvalidIssueOptions("CA validity is out of range".to_string())
        })?;
        let mut params = CertificateParams::default();
        let serial = random_serial();
        params.distinguished_name = ca_name(trust_domain, &serial);
        params.serial_number = Some(serial);
        params.not_before = to_offset(now - CLOCK_SKEW_ALLOWANCE)?;
        params.not_after = to_offset(not_after)?;
        // Path length 0: this root signs leaves only, so a stolen leaf key can never mint
        // certificates.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // The SPIFFE ID of a trust domain's signing certificate is the bare trust domain;
        // `Trust` reads it back from here so configs never repeat it.
        params.subject_alt_names = vec![SanType::URI(ia5(format!("spiffe://{trust_domain}"))?)];
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key)?;

        // The key goes first, with create_new: if two inits race, exactly one wins.
        fs_util::create_new(
            &dir.join(CA_KEY_FILE),
            MODE_SECRET,
            key.serialize_pem().as_bytes(),
        )?;
        fs_util::create_new(&dir.join(CA_CERT_FILE), MODE_PUBLIC, cert.pem().as_bytes())?;

        let ca = Ca {
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            cert_der: cert.der().clone(),
            not_after,
            issuer: Issuer::new(params, key),
        };
        let crl = ca.sign_crl(1, Vec::new())?;
        fs_util::create_new(&dir.join(CRL_FILE), MODE_PUBLIC, crl.as_bytes())?;
        tracing::info!(dir = %dir.display(), trust_domain, "CA initialised");
        Ok(ca)
    }

    /// Loads the CA in `dir`, checking that the key belongs to the certificate and that the
    /// certificate is a CA naming its trust domain.
    pub fn load(dir: &Path) -> Result<Ca> {
        let invalid = |reason: String| IdentityError::InvalidCa {
            dir: dir.to_path_buf(),
            reason,
        };
        let cert_der = fs_util::read_cert(&dir.join(CA_CERT_FILE))?;
        let key_path = dir.join(CA_KEY_FILE);
        let key_pem = String::from_utf8(fs_util::read_bounded(&key_path)?)
            .map_err(|e| IdentityError::parse(key_path.display().to_string(), e))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| IdentityError::parse(key_path.display().to_string(), e))?;

        let (_, x509) = X509Certificate::from_der(&cert_der)
            .map_err(|e| IdentityError::parse(CA_CERT_FILE, e))?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(invalid(format!(
                "{CA_KEY_FILE} does not belong to {CA_CERT_FILE}"
            )));
        }
        if !x509.is_ca() {
            return Err(invalid(format!("{CA_CERT_FILE} is not a CA certificate")));
        }
        let trust_domain = trust_domain_of_ca(&cert_der).map_err(|e| invalid(e.to_string()))?;
        let not_after = from_timestamp(x509.validity().not_after.timestamp());
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            trust_domain,
            cert_der,
            not_after,
            issuer,
        })
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Path of the CA certificate (`dir/ca.crt`).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// Path of the CRL (`dir/crl.pem`).
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join(CRL_FILE)
    }

    /// Issues a leaf for `identity` and writes `PREFIX.key` (0600) then `PREFIX.crt`, each
    /// replaced atomically (so reissuing to the same prefix rotates in place). Returns the
    /// serial number in lowercase hex.
    ///
    /// The leaf is ECDSA P-256 with exactly one URI SAN (the SPIFFE ID) plus the optional
    /// DNS/IP SANs, a random 128-bit serial, key usage digitalSignature, extended key usage
    /// serverAuth + clientAuth (nodes and services both serve and call) and CA:FALSE.
    pub fn issue(
        &self,
        identity: &Identity,
        options: &IssueOptions,
        out_prefix: &Path,
    ) -> Result<String> {
        let spiffe_id = SpiffeId::new(self.trust_domain.clone(), identity.clone())?;
        let (not_before, not_after) = self.leaf_validity(identity, options)?;
        if options.dns_names.len() + options.ip_addrs.len() > EXTRA_SANS_MAX {
            return Err(IdentityError::InvalidIssueOptions(format!(
                "{} DNS/IP SANs (max {EXTRA_SANS_MAX})",
                options.dns_names.len() + options.ip_addrs.len()
            )));
        }

        let mut sans = vec![SanType::URI(ia5(spiffe_id.to_string())?)];
        for dns in &options.dns_names {
            sans.push(SanType::DnsName(ia5(dns.clone())?));
        }
        sans.extend(options.ip_addrs.iter().map(|ip| SanType::IpAddress(*ip)));

        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        let mut params = CertificateParams::default();
        params.distinguished_name = leaf_name(identity);
        params.serial_number = Some(serial);
        params.not_before = to_offset(not_before)?;
        params.not_after = to_offset(not_after)?;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let (cert_path, key_path) = output_paths(out_prefix)?;
        // Key first: a reader that sees the new certificate finds its key already in place.
        fs_util::write_atomic(&key_path, MODE_SECRET, key.serialize_pem().as_bytes())?;
        fs_util::write_atomic(&cert_path, MODE_PUBLIC, cert.pem().as_bytes())?;
        self.log_issued(&serial_hex, &spiffe_id, not_after, &cert_path)?;
        tracing::info!(serial = %serial_hex, id = %spiffe_id, cert = %cert_path.display(), "issued certificate");
        Ok(serial_hex)
    }

    /// Revokes the certificate in `cert_path` (PEM): checks it was signed by this CA, adds its
    /// serial to the CRL and rewrites `crl.pem` atomically with the next CRL number. Returns
    /// the serial in lowercase hex. Revoking an already revoked certificate changes nothing.
    pub fn revoke(&self, cert_path: &Path) -> Result<String> {
        let der = fs_util::read_cert(cert_path)?;
        let not_ours = |reason: String| IdentityError::NotIssuedByCa {
            path: cert_path.to_path_buf(),
            reason,
        };
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| IdentityError::parse(cert_path.display().to_string(), e))?;
        let (_, ca) = X509Certificate::from_der(&self.cert_der)
            .map_err(|e| IdentityError::parse(CA_CERT_FILE, e))?;
        if cert.issuer().as_raw() != ca.subject().as_raw() {
            return Err(not_ours(format!("issuer is {}", cert.issuer())));
        }
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|e| not_ours(format!("signature does not verify with the CA key: {e}")))?;
        let serial = cert.raw_serial().to_vec();
        self.revoke_serial_bytes(&serial)?;
        Ok(hex::encode(serial))
    }

    /// Revokes by serial number (hex, as returned by `issue` and written to `issued.log`),
    /// for when the certificate file itself is gone.
    pub fn revoke_serial(&self, serial_hex: &str) -> Result<()> {
        let serial = hex::decode(serial_hex)
            .map_err(|e| IdentityError::parse(format!("serial {serial_hex:?}"), e))?;
        if serial.is_empty() || serial.len() > 20 {
            return Err(IdentityError::parse(
                format!("serial {serial_hex:?}"),
                "must be 1 to 20 bytes",
            ));
        }
        self.revoke_serial_bytes(&serial)
    }

    fn revoke_serial_bytes(&self, serial: &[u8]) -> Result<()> {
        let current = self.read_crl()?;
        if current
            .revoked
            .iter()
            .any(|r| r.serial_number.as_ref() == serial)
        {
            tracing::info!(serial = %hex::encode(serial), "certificate already revoked");
            return Ok(());
        }
        if current.revoked.len() >= REVOKED_MAX {
            return Err(IdentityError::InvalidCrl {
                path: self.crl_path(),
                reason: format!("CRL already holds {REVOKED_MAX} entries; rotate the CA"),
            });
        }
        let mut revoked = current.revoked;
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(serial),
            revocation_time: to_offset(SystemTime::now())?,
            reason_code: None,
            invalidity_date: None,
        });
        let number = current
            .number
            .checked_add(1)
            .ok_or_else(|| IdentityError::InvalidCrl {
                path: self.crl_path(),
                reason: "CRL number would overflow".to_string(),
            })?;
        let pem = self.sign_crl(number, revoked)?;
        fs_util::write_atomic(&self.crl_path(), MODE_PUBLIC, pem.as_bytes())?;
        tracing::info!(serial = %hex::encode(serial), crl_number = number, "certificate revoked");
        Ok(())
    }

    fn sign_crl(&self, number: u64, revoked: Vec<RevokedCertParams>) -> Result<String> {
        let now = SystemTime::now();
        let params = CertificateRevocationListParams {
            this_update: to_offset(now)?,
            next_update: to_offset(now + CRL_NEXT_UPDATE)?,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    /// The revoked entries and number of the current `crl.pem`, after checking that this CA
    /// signed it: a CRL we did not sign must not be extended and re-signed.
    fn read_crl(&self) -> Result<CrlState> {
        let path = self.crl_path();
        let invalid = |reason: String| IdentityError::InvalidCrl {
            path: path.clone(),
            reason,
        };
        let pem = fs_util::read_bounded(&path)?;
        let der = CertificateRevocationListDer::from_pem_slice(&pem)
            .map_err(|e| invalid(e.to_string()))?;
        let (_, crl) =
            CertificateRevocationList::from_der(&der).map_err(|e| invalid(e.to_string()))?;
        let (_, ca) = X509Certificate::from_der(&self.cert_der)
            .map_err(|e| IdentityError::parse(CA_CERT_FILE, e))?;
        crl.verify_signature(ca.public_key())
            .map_err(|e| invalid(format!("not signed by this CA: {e}")))?;
        let number = crl
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| invalid("missing or oversized CRL number".to_string()))?;
        let revoked = crl
            .iter_revoked_certificates()
            .map(|entry| RevokedCertParams {
                serial_number: SerialNumber::from_slice(entry.raw_serial()),
                revocation_time: entry.revocation_date.to_datetime(),
                reason_code: None,
                invalidity_date: None,
            })
            .collect();
        Ok(CrlState { number, revoked })
    }

    fn leaf_validity(
        &self,
        identity: &Identity,
        options: &IssueOptions,
    ) -> Result<(SystemTime, SystemTime)> {
        let now = SystemTime::now();
        let start = options.not_before.unwrap_or(now);
        let not_before = options.not_before.unwrap_or(now - CLOCK_SKEW_ALLOWANCE);
        let not_after = match options.not_after {
            Some(t) => t,
            None => start
                .checked_add(
                    options
                        .validity
                        .unwrap_or_else(|| identity.default_validity()),
                )
                .ok_or_else(|| {
                    IdentityError::InvalidIssueOptions("validity is out of range".to_string())
                })?,
        };
        let lifetime = not_after.duration_since(not_before).map_err(|_| {
            IdentityError::InvalidIssueOptions("not_after must be after not_before".to_string())
        })?;
        if lifetime.is_zero() || lifetime > LEAF_VALIDITY_MAX + CLOCK_SKEW_ALLOWANCE {
            return Err(IdentityError::InvalidIssueOptions(format!(
                "lifetime {} s is outside (0, {} s]",
                lifetime.as_secs(),
                LEAF_VALIDITY_MAX.as_secs()
            )));
        }
        // A leaf that outlives its root would be rejected after the root expires anyway;
        // failing now tells the operator to rotate the CA first.
        if not_after > self.not_after {
            return Err(IdentityError::InvalidIssueOptions(format!(
                "certificate would outlive the CA (CA expires at unix time {})",
                unix_secs(self.not_after)
            )));
        }
        Ok((not_before, not_after))
    }

    fn log_issued(
        &self,
        serial_hex: &str,
        id: &SpiffeId,
        not_after: SystemTime,
        cert_path: &Path,
    ) -> Result<()> {
        let path = self.dir.join(ISSUED_LOG_FILE);
        let line = format!(
            "{} serial={serial_hex} id={id} not_after={} cert={}\n",
            unix_secs(SystemTime::now()),
            unix_secs(not_after),
            cert_path.display()
        );
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(MODE_SECRET)
            .open(&path)
            .map_err(|e| IdentityError::io("open", &path, e))?;
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(|e| IdentityError::io("append to", &path, e))
    }
}

/// What `revoke` needs from the current CRL.
struct CrlState {
    number: u64,
    revoked: Vec<RevokedCertParams>,
}

/// The trust domain named by a CA certificate's single `spiffe://<td>` URI SAN.
pub(crate) fn trust_domain_of_ca(cert_der: &[u8]) -> Result<String> {
    let uri = single_uri_san(cert_der)?;
    let td = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| IdentityError::InvalidSpiffeId {
            input: uri.clone(),
            reason: "CA URI SAN must be spiffe://<trust domain>".to_string(),
        })?;
    validate_trust_domain(td)?;
    Ok(td.to_string())
}

fn output_paths(prefix: &Path) -> Result<(PathBuf, PathBuf)> {
    let name = prefix.file_name().ok_or_else(|| {
        IdentityError::InvalidIssueOptions(format!(
            "output prefix {} has no file name",
            prefix.display()
        ))
    })?;
    let with_ext = |ext: &str| {
        let mut file = name.to_os_string();
        file.push(ext);
        prefix.with_file_name(file)
    };
    Ok((with_ext(".crt"), with_ext(".key")))
}

/// The CA's subject. The serial-derived unit makes every CA's name unique, even for the
/// same trust domain: chain building and CRL matching go by issuer name, and two roots with
/// one name (say, old and new during a rotation) would make both ambiguous.
fn ca_name(trust_domain: &str, serial: &SerialNumber) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Signpost");
    let id: String = hex::encode(serial.to_bytes()).chars().take(16).collect();
    dn.push(DnType::OrganizationalUnitName, format!("ca-{id}"));
    // CommonName is limited to 64 characters; the trust domain (up to 255) is in the SAN.
    let mut cn = format!("Signpost CA {trust_domain}");
    cn.truncate(64);
    dn.push(DnType::CommonName, cn);
    dn
}

fn leaf_name(identity: &Identity) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationalUnitName, identity.kind());
    // Names are at most 63 characters, so they fit CommonName's 64. Informational only:
    // identity comes from the URI SAN.
    let cn = match identity {
        Identity::Node(id) => id.to_string(),
        Identity::Service(name) | Identity::Admin(name) | Identity::Reader(name) => name.clone(),
    };
    dn.push(DnType::CommonName, cn);
    dn
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; SERIAL_LEN];
    rand::thread_rng().fill_bytes(&mut bytes);
    // Positive (high bit clear) and no leading zero byte, so the DER INTEGER is exactly
    // these bytes and the hex we print matches what parsers report.
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

fn ia5(text: String) -> Result<Ia5String> {
    Ia5String::try_from(text.clone())
        .map_err(|e| IdentityError::InvalidIssueOptions(format!("{text:?} is not IA5: {e}")))
}

/// 9999-12-31T23:59:59Z, the last instant X.509 (GeneralizedTime) and `time` can express.
const TIME_MAX_UNIX_SECS: u64 = 253_402_300_799;

fn to_offset(t: SystemTime) -> Result<OffsetDateTime> {
    // Checked here because `OffsetDateTime::from` panics outside its range, and before 1970
    // is not a time this CA has any reason to write.
    let in_range = t
        .duration_since(UNIX_EPOCH)
        .is_ok_and(|d| d.as_secs() <= TIME_MAX_UNIX_SECS);
    if !in_range {
        return Err(IdentityError::InvalidIssueOptions(
            "times must lie between 1970 and 9999".to_string(),
        ));
    }
    Ok(OffsetDateTime::from(t))
}

fn from_timestamp(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The not-after time of the first certificate in the PEM file at `path`, in seconds since the
/// Unix epoch (for the certificate-expiry metric an operator alerts on).
pub fn certificate_not_after(path: &Path) -> Result<i64> {
    let der = CertificateDer::from_pem_file(path)
        .map_err(|e| IdentityError::parse(path.display().to_string(), e))?;
    let (_, x509) = X509Certificate::from_der(&der)
        .map_err(|e| IdentityError::parse(path.display().to_string(), e))?;
    Ok(x509.validity().not_after.timestamp())
}
