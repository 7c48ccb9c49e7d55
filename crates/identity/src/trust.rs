//! `Trust`: the CA roots plus the current CRLs, shared by every TLS config of a process and
//! swappable at run time.
//!
//! Roots are fixed for the life of the process (rotating a CA is a restart). CRLs are not: a
//! revocation must take effect without restarting nodes, so the parsed CRLs, and the rustls
//! client-certificate verifier built from them, live behind a lock and are replaced as a unit
//! by `reload_crl`. Handshakes take a snapshot (`Arc`) of that unit when they start, so a
//! reload never disturbs a handshake in progress and applies to every new one.
//!
//! A reload that fails (missing file, parse error, wrong signer, CRL number going backwards)
//! keeps the previous CRLs: a broken file must never silently turn revocation off.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, TrustAnchor};
use tokio::task::JoinHandle;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::ca::trust_domain_of_ca;
use crate::error::{IdentityError, Result};
use crate::fs_util;
use crate::tls_config::TlsFiles;

/// How often `spawn_crl_watcher` should look at the CRL file, unless told otherwise.
pub const DEFAULT_CRL_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// CA roots and current CRLs. Cheap to clone (shared state); all clones see every reload.
#[derive(Clone, Debug)]
pub struct Trust {
    inner: Arc<TrustInner>,
}

#[derive(Debug)]
struct TrustInner {
    ca_path: PathBuf,
    crl_path: Option<PathBuf>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    ca_ders: Vec<CertificateDer<'static>>,
    revocation: RwLock<Arc<Revocation>>,
    /// Serialises reloads (watcher and SIGHUP may race) and remembers the file stamp of the
    /// last attempt, so a broken file is reported once rather than on every poll.
    reload_lock: Mutex<Option<FileStamp>>,
}

/// One consistent revocation state: the CRLs and the client verifier built from them.
pub(crate) struct Revocation {
    /// Parsed CRLs, for the client side's own chain verification.
    pub(crate) crls: Vec<webpki::CertRevocationList<'static>>,
    /// The rustls verifier for client certificates, built with these CRLs.
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
    /// CRL number per issuer (raw DER name), to refuse rollbacks.
    numbers: BTreeMap<Vec<u8>, u64>,
    revoked_count: usize,
    generation: u64,
    stamp: Option<FileStamp>,
}

impl std::fmt::Debug for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocation")
            .field("crls", &self.crls.len())
            .field("revoked_count", &self.revoked_count)
            .field("generation", &self.generation)
            .field("stamp", &self.stamp)
            .finish()
    }
}

/// What identifies a version of the CRL file without reading it. The inode changes on an
/// atomic rename (how `Ca::revoke` writes), mtime and length on an in-place edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

impl Trust {
    /// Loads roots from `files.ca` and, when `files.crl` is set, the CRLs from it.
    pub fn from_files(files: &TlsFiles) -> Result<Trust> {
        Trust::load(&files.ca, files.crl.as_deref())
    }

    /// Loads the CA certificate(s) in `ca` (PEM; several for a rotation overlap, all of one
    /// trust domain, which is read from their `spiffe://<td>` URI SAN) and the CRLs in `crl`.
    /// Without a CRL file there is no revocation checking. A CRL file that is given must
    /// load now: startup fails rather than running without revocation.
    pub fn load(ca: &Path, crl: Option<&Path>) -> Result<Trust> {
        let ca_ders = fs_util::read_certs(ca)?;
        let mut trust_domain: Option<String> = None;
        let mut roots = RootCertStore::empty();
        for der in &ca_ders {
            let td = trust_domain_of_ca(der)?;
            match &trust_domain {
                Some(first) if *first != td => {
                    return Err(IdentityError::InvalidCa {
                        dir: ca.to_path_buf(),
                        reason: format!("CA certificates name two trust domains: {first}, {td}"),
                    })
                }
                _ => trust_domain = Some(td),
            }
            roots.add(der.clone())?;
        }
        let trust_domain = trust_domain
            .ok_or_else(|| IdentityError::parse(ca.display().to_string(), "no CA certificate"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(roots);

        let revocation = match crl {
            Some(path) => {
                let stamp = file_stamp(path);
                load_revocation(path, &ca_ders, &roots, &provider, 1, stamp)?
            }
            None => Revocation {
                crls: Vec::new(),
                client_verifier: build_client_verifier(&roots, &provider, Vec::new())?,
                numbers: BTreeMap::new(),
                revoked_count: 0,
                generation: 1,
                stamp: None,
            },
        };
        let stamp = revocation.stamp;
        Ok(Trust {
            inner: Arc::new(TrustInner {
                ca_path: ca.to_path_buf(),
                crl_path: crl.map(Path::to_path_buf),
                trust_domain,
                provider,
                roots,
                ca_ders,
                revocation: RwLock::new(Arc::new(revocation)),
                reload_lock: Mutex::new(stamp),
            }),
        })
    }

    /// The trust domain of the CA.
    pub fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }

    /// The CRL file, if revocation is configured.
    pub fn crl_path(&self) -> Option<&Path> {
        self.inner.crl_path.as_deref()
    }

    /// Counts successful CRL loads (1 after `load`); lets callers and tests see that a reload
    /// happened.
    pub fn crl_generation(&self) -> u64 {
        self.revocation().generation
    }

    /// Number of revoked serials in the current CRLs.
    pub fn revoked_count(&self) -> usize {
        self.revocation().revoked_count
    }

    /// Re-reads the CRL file and, if it is valid, makes it the one every new handshake uses.
    /// On failure logs a warning, keeps the current CRLs and returns the error. Does
    /// blocking file I/O: from async code, call it via `spawn_blocking`.
    pub fn reload_crl(&self) -> Result<()> {
        let Some(path) = self.inner.crl_path.as_deref() else {
            return Ok(());
        };
        let mut last_attempt = self.lock_reload();
        let stamp = file_stamp(path);
        *last_attempt = stamp;
        self.reload_locked(path, stamp)
    }

    /// Reloads only if the file's stamp differs from the last attempt. Returns whether a
    /// reload was attempted.
    pub(crate) fn reload_crl_if_changed(&self) -> bool {
        let Some(path) = self.inner.crl_path.as_deref() else {
            return false;
        };
        let mut last_attempt = self.lock_reload();
        let stamp = file_stamp(path);
        if stamp == *last_attempt {
            return false;
        }
        *last_attempt = stamp;
        // reload_locked logs the outcome; the watcher has nobody to return it to.
        let _ = self.reload_locked(path, stamp);
        true
    }

    fn reload_locked(&self, path: &Path, stamp: Option<FileStamp>) -> Result<()> {
        let current = self.revocation();
        let loaded = load_revocation(
            path,
            &self.inner.ca_ders,
            &self.inner.roots,
            &self.inner.provider,
            current.generation + 1,
            stamp,
        )
        .and_then(|next| refuse_rollback(path, &current, next));
        match loaded {
            Ok(next) => {
                tracing::info!(
                    crl = %path.display(),
                    revoked = next.revoked_count,
                    generation = next.generation,
                    "CRL loaded"
                );
                let next = Arc::new(next);
                *self
                    .inner
                    .revocation
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = next;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    crl = %path.display(),
                    error = %e,
                    "CRL reload failed; keeping the previous CRL"
                );
                Err(e)
            }
        }
    }

    fn lock_reload(&self) -> MutexGuard<'_, Option<FileStamp>> {
        // The guarded value is a plain stamp; a panic elsewhere cannot leave it inconsistent.
        self.inner
            .reload_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current revocation state (a snapshot; later reloads do not change it).
    pub(crate) fn revocation(&self) -> Arc<Revocation> {
        Arc::clone(
            &self
                .inner
                .revocation
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    pub(crate) fn provider(&self) -> &Arc<CryptoProvider> {
        &self.inner.provider
    }

    pub(crate) fn roots(&self) -> &Arc<RootCertStore> {
        &self.inner.roots
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.inner.roots.roots
    }

    pub(crate) fn ca_path(&self) -> &Path {
        &self.inner.ca_path
    }

    pub(crate) fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.inner.provider.signature_verification_algorithms,
        )
    }

    pub(crate) fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.inner.provider.signature_verification_algorithms,
        )
    }

    pub(crate) fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Polls the CRL file every `interval` (`DEFAULT_CRL_POLL_INTERVAL` is 1 s) and reloads it
/// when its inode, length or mtime changes. Runs until the returned task is aborted; returns
/// at once when `trust` has no CRL file. Must be called inside a tokio runtime.
pub fn spawn_crl_watcher(trust: Trust, interval: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        if trust.crl_path().is_none() {
            tracing::debug!("no CRL file configured; CRL watcher not running");
            return;
        }
        let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let trust = trust.clone();
            // stat + read are blocking file I/O; keep them off the async workers.
            if let Err(e) = tokio::task::spawn_blocking(move || trust.reload_crl_if_changed()).await
            {
                tracing::warn!(error = %e, "CRL watcher poll failed");
            }
        }
    })
}

/// Reloads the CRL on every SIGHUP (the operator's "I just revoked something, apply it now").
/// Runs until the returned task is aborted. Must be called inside a tokio runtime.
pub fn spawn_sighup_reloader(trust: Trust) -> Result<JoinHandle<()>> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(IdentityError::Signal)?;
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading CRL");
            let trust = trust.clone();
            // reload_crl logs its own failure and keeps the previous CRL.
            let _ = tokio::task::spawn_blocking(move || trust.reload_crl()).await;
        }
    }))
}

fn file_stamp(path: &Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        mtime: meta.modified().ok(),
    })
}

fn build_client_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>> {
    // Defaults kept on purpose: revocation is checked along the whole chain, an unknown
    // status is an error, CRL expiry is ignored (the CRL is a distributed file, not fetched).
    Ok(
        WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(provider))
            .with_crls(crls)
            .build()?,
    )
}

/// Reads, checks and parses the CRL file into a complete `Revocation`.
fn load_revocation(
    path: &Path,
    ca_ders: &[CertificateDer<'static>],
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    generation: u64,
    stamp: Option<FileStamp>,
) -> Result<Revocation> {
    let invalid = |reason: String| IdentityError::InvalidCrl {
        path: path.to_path_buf(),
        reason,
    };
    let pem = fs_util::read_bounded(path)?;
    let ders = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid(e.to_string()))?;
    // An empty file would mean "nothing is revoked" by accident; refuse it.
    if ders.is_empty() {
        return Err(invalid("no X509 CRL block".to_string()));
    }

    let mut crls = Vec::with_capacity(ders.len());
    let mut numbers = BTreeMap::new();
    let mut revoked_count = 0;
    for der in &ders {
        let checked = check_crl(der, ca_ders).map_err(invalid)?;
        revoked_count += checked.revoked_count;
        numbers.insert(checked.issuer, checked.number);
        let parsed = webpki::OwnedCertRevocationList::from_der(der)
            .map_err(|e| invalid(format!("rejected by webpki: {e}")))?;
        crls.push(webpki::CertRevocationList::from(parsed));
    }
    let client_verifier = build_client_verifier(roots, provider, ders)?;
    Ok(Revocation {
        crls,
        client_verifier,
        numbers,
        revoked_count,
        generation,
        stamp,
    })
}

struct CheckedCrl {
    issuer: Vec<u8>,
    number: u64,
    revoked_count: usize,
}

/// A CRL must be signed by one of our CAs: webpki would otherwise treat it as not
/// authoritative, and with "unknown status is an error" every handshake would fail.
fn check_crl(
    der: &[u8],
    ca_ders: &[CertificateDer<'static>],
) -> std::result::Result<CheckedCrl, String> {
    let (_, crl) = CertificateRevocationList::from_der(der).map_err(|e| e.to_string())?;
    let issuer = crl.issuer().as_raw();
    let mut matched = false;
    for ca_der in ca_ders {
        let (_, ca) = X509Certificate::from_der(ca_der).map_err(|e| e.to_string())?;
        if ca.subject().as_raw() != issuer {
            continue;
        }
        matched = true;
        if crl.verify_signature(ca.public_key()).is_ok() {
            let number = crl
                .crl_number()
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| "missing or oversized CRL number".to_string())?;
            return Ok(CheckedCrl {
                issuer: issuer.to_vec(),
                number,
                revoked_count: crl.iter_revoked_certificates().count(),
            });
        }
    }
    Err(if matched {
        format!(
            "signature by {} does not verify with the CA key",
            crl.issuer()
        )
    } else {
        format!("issued by {}, which is not a trusted CA", crl.issuer())
    })
}

/// An older CRL would un-revoke certificates: refuse CRL numbers that go backwards.
fn refuse_rollback(path: &Path, current: &Revocation, next: Revocation) -> Result<Revocation> {
    for (issuer, number) in &current.numbers {
        match next.numbers.get(issuer) {
            Some(n) if n < number => {
                return Err(IdentityError::InvalidCrl {
                    path: path.to_path_buf(),
                    reason: format!("CRL number went backwards ({n} < {number})"),
                })
            }
            Some(_) => {}
            None => {
                return Err(IdentityError::InvalidCrl {
                    path: path.to_path_buf(),
                    reason: "the CRL of a trusted CA disappeared from the file".to_string(),
                })
            }
        }
    }
    Ok(next)
}
