//! SPIFFE ID grammar, certificate identity extraction, and the file-based CA.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{init_logging, Pki, TRUST_DOMAIN};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use signpost_identity::{
    identity_from_cert_der, Ca, Identity, IdentityError, IssueOptions, PeerIdentities, SpiffeId,
    DEFAULT_VALIDITY_NODE, DEFAULT_VALIDITY_SHORT, PEER_IDENTITIES_MAX,
};
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

fn cert_der(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn crl_number_and_serials(path: &Path) -> (u64, Vec<String>) {
    let der = CertificateRevocationListDer::from_pem_file(path).unwrap();
    let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
    let number = u64::try_from(crl.crl_number().unwrap()).unwrap();
    let serials = crl
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect();
    (number, serials)
}

#[test]
fn spiffe_ids_round_trip_through_text() {
    init_logging();
    let long_name = format!("a{}", "b".repeat(62));
    let long_td = "t".repeat(255);
    let cases = [
        (
            "spiffe://prod.example/node/1",
            Identity::Node(1),
            "prod.example",
        ),
        (
            "spiffe://prod.example/node/18446744073709551615",
            Identity::Node(u64::MAX),
            "prod.example",
        ),
        (
            "spiffe://td/service/payments",
            Identity::Service("payments".into()),
            "td",
        ),
        (
            "spiffe://td/service/a.b-c9",
            Identity::Service("a.b-c9".into()),
            "td",
        ),
        (
            "spiffe://td/admin/alice",
            Identity::Admin("alice".into()),
            "td",
        ),
        ("spiffe://td/admin/0ps", Identity::Admin("0ps".into()), "td"),
        (
            "spiffe://td/reader/dash-board",
            Identity::Reader("dash-board".into()),
            "td",
        ),
    ];
    for (text, identity, td) in cases {
        tracing::info!(text, "phase: parse and print");
        let id = SpiffeId::parse(text).unwrap();
        assert_eq!(id.identity, identity);
        assert_eq!(id.trust_domain, td);
        assert_eq!(id.to_string(), text);
        assert_eq!(text.parse::<SpiffeId>().unwrap(), id);
        assert_eq!(SpiffeId::new(td, identity).unwrap(), id);
    }

    tracing::info!("phase: longest allowed trust domain and name");
    let text = format!("spiffe://{long_td}/service/{long_name}");
    assert_eq!(SpiffeId::parse(&text).unwrap().to_string(), text);
}

#[test]
fn spiffe_id_rejections_say_why() {
    init_logging();
    let too_long_name = format!("a{}", "b".repeat(63));
    let too_long_td = "t".repeat(256);
    let cases: Vec<(String, &str)> = vec![
        ("https://td/node/1".into(), "must start with \"spiffe://\""),
        ("SPIFFE://td/node/1".into(), "must start with \"spiffe://\""),
        ("spiffe://td".into(), "missing /<kind>/<name> path"),
        ("spiffe:///node/1".into(), "trust domain is empty"),
        ("spiffe://Td/node/1".into(), "trust domain contains 'T'"),
        ("spiffe://t_d/node/1".into(), "trust domain contains '_'"),
        ("spiffe://td:443/node/1".into(), "trust domain contains ':'"),
        (format!("spiffe://{too_long_td}/node/1"), "max 255"),
        ("spiffe://td/node".into(), "path must be /<kind>/<name>"),
        ("spiffe://td/node/0".into(), "must be a decimal number > 0"),
        ("spiffe://td/node/007".into(), "without leading zeros"),
        ("spiffe://td/node/+7".into(), "must be a decimal number"),
        ("spiffe://td/node/-1".into(), "must be a decimal number"),
        (
            "spiffe://td/node/18446744073709551616".into(),
            "does not fit in 64 bits",
        ),
        ("spiffe://td/node/1/2".into(), "must be a decimal number"),
        (
            "spiffe://td/robot/r2".into(),
            "unknown identity kind \"robot\"",
        ),
        ("spiffe://td//x".into(), "unknown identity kind \"\""),
        ("spiffe://td/service/".into(), "service name is empty"),
        ("spiffe://td/service/Payments".into(), "contains 'P'"),
        (
            "spiffe://td/service/9lives".into(),
            "must start with a lowercase letter",
        ),
        (
            "spiffe://td/service/pay-".into(),
            "must end with a letter or digit",
        ),
        ("spiffe://td/service/pay/x".into(), "contains '/'"),
        ("spiffe://td/service/pay?x=1".into(), "contains '?'"),
        (format!("spiffe://td/service/{too_long_name}"), "max 63"),
        (
            "spiffe://td/admin/.".into(),
            "must start and end with a letter or digit",
        ),
        (
            "spiffe://td/reader/..".into(),
            "must start and end with a letter or digit",
        ),
        (
            "spiffe://td/reader/-r".into(),
            "must start and end with a letter or digit",
        ),
        ("spiffe://td/admin/".into(), "name is empty"),
    ];
    for (text, reason) in cases {
        tracing::info!(%text, "phase: rejected");
        let err = SpiffeId::parse(&text).unwrap_err();
        assert!(
            matches!(err, IdentityError::InvalidSpiffeId { .. }),
            "{text}: {err:?}"
        );
        assert!(err.to_string().contains(reason), "{text}: {err}");
    }

    tracing::info!("phase: values built by hand are validated too");
    assert!(SpiffeId::new("td", Identity::Node(0)).is_err());
    assert!(SpiffeId::new("td", Identity::Service("Bad".into())).is_err());
    assert!(SpiffeId::new("bad td", Identity::Node(1)).is_err());
}

#[test]
fn issued_certificates_carry_their_identity_and_profile() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let identities = [
        Identity::Node(7),
        Identity::Service("payments".into()),
        Identity::Admin("alice".into()),
        Identity::Reader("dash".into()),
    ];
    for identity in identities {
        tracing::info!(%identity, "phase: issue and read back");
        let name = identity.to_string().replace('/', "-");
        let before = SystemTime::now();
        let serial = pki
            .ca
            .issue(&identity, &IssueOptions::default(), &pki.prefix(&name))
            .unwrap();
        let files = pki.files(&name);
        let der = cert_der(&files.cert);
        let id = identity_from_cert_der(&der).unwrap();
        assert_eq!(id, SpiffeId::new(TRUST_DOMAIN, identity.clone()).unwrap());

        tracing::info!("phase: key file is 0600, serial is the returned hex");
        assert_eq!(mode(&files.key), 0o600);
        let (_, x509) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(hex::encode(x509.raw_serial()), serial);
        assert_eq!(serial.len(), 32);

        tracing::info!("phase: leaf profile (not a CA, digitalSignature, server+client auth)");
        assert!(!x509.is_ca());
        let mut saw_ku = false;
        let mut saw_eku = false;
        for ext in x509.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::KeyUsage(ku) => {
                    saw_ku = true;
                    assert!(ku.digital_signature());
                    assert!(!ku.key_cert_sign());
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    saw_eku = true;
                    assert!(eku.server_auth && eku.client_auth);
                }
                ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca),
                _ => {}
            }
        }
        assert!(saw_ku && saw_eku);

        tracing::info!("phase: default validity depends on the kind");
        let expected = match identity {
            Identity::Node(_) => DEFAULT_VALIDITY_NODE,
            _ => DEFAULT_VALIDITY_SHORT,
        };
        let not_after = x509.validity().not_after.timestamp() as u64;
        let want = (before + expected)
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(not_after.abs_diff(want) <= 5, "{not_after} vs {want}");
    }

    tracing::info!("phase: CA files have the right modes");
    let ca_dir = pki.dir.path().join("ca");
    assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
    assert_eq!(mode(&ca_dir.join("ca.crt")), 0o644);
    let log = std::fs::read_to_string(ca_dir.join("issued.log")).unwrap();
    assert_eq!(log.lines().count(), 4);
    assert!(log.contains("id=spiffe://test.signpost/node/7"));
}

#[test]
fn extra_dns_and_ip_sans_do_not_change_the_identity() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let options = IssueOptions {
        dns_names: vec!["node1.internal".into()],
        ip_addrs: vec!["10.0.0.5".parse().unwrap(), "::1".parse().unwrap()],
        ..IssueOptions::default()
    };
    let files = pki.issue_with(Identity::Node(1), "n1", &options);
    let id = identity_from_cert_der(&cert_der(&files.cert)).unwrap();
    assert_eq!(id.to_string(), "spiffe://test.signpost/node/1");
}

/// Builds a self-signed certificate with the given SANs, for identity-extraction checks.
fn self_signed_with_sans(sans: Vec<SanType>) -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.self_signed(&key).unwrap().der().clone()
}

fn uri(text: &str) -> SanType {
    SanType::URI(text.try_into().unwrap())
}

#[test]
fn certificates_without_exactly_one_valid_spiffe_uri_are_refused() {
    init_logging();

    tracing::info!("phase: two URI SANs");
    let der = self_signed_with_sans(vec![
        uri("spiffe://td/node/1"),
        uri("spiffe://td/admin/root"),
    ]);
    let err = identity_from_cert_der(&der).unwrap_err();
    assert!(
        matches!(err, IdentityError::UriSanMultiple { count: 2 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("2 URI SANs"));

    tracing::info!("phase: no URI SAN (DNS only)");
    let der = self_signed_with_sans(vec![SanType::DnsName("node1".try_into().unwrap())]);
    let err = identity_from_cert_der(&der).unwrap_err();
    assert!(matches!(err, IdentityError::UriSanMissing), "{err:?}");

    tracing::info!("phase: no SAN extension at all");
    let der = self_signed_with_sans(vec![]);
    assert!(matches!(
        identity_from_cert_der(&der).unwrap_err(),
        IdentityError::UriSanMissing
    ));

    tracing::info!("phase: a non-spiffe URI");
    let der = self_signed_with_sans(vec![uri("https://td/node/1")]);
    let err = identity_from_cert_der(&der).unwrap_err();
    assert!(err.to_string().contains("spiffe://"), "{err}");

    tracing::info!("phase: an unknown kind");
    let der = self_signed_with_sans(vec![uri("spiffe://td/robot/r2")]);
    let err = identity_from_cert_der(&der).unwrap_err();
    assert!(err.to_string().contains("unknown identity kind"), "{err}");

    tracing::info!("phase: not a certificate");
    assert!(matches!(
        identity_from_cert_der(b"garbage").unwrap_err(),
        IdentityError::Parse { .. }
    ));
}

#[test]
fn ca_init_refuses_to_overwrite_and_load_restores_it() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let ca_dir = pki.dir.path().join("ca");

    tracing::info!("phase: second init in the same directory is refused");
    let err = Ca::init(&ca_dir, TRUST_DOMAIN, common::CA_VALIDITY).unwrap_err();
    assert!(matches!(err, IdentityError::CaExists { .. }), "{err:?}");

    tracing::info!("phase: an invalid trust domain is refused before touching the disk");
    let other = pki.dir.path().join("other");
    assert!(Ca::init(&other, "Bad_TD", common::CA_VALIDITY).is_err());
    assert!(!other.exists());

    tracing::info!("phase: init writes an empty CRL, number 1");
    let (number, serials) = crl_number_and_serials(&pki.ca.crl_path());
    assert_eq!(number, 1);
    assert!(serials.is_empty());

    tracing::info!("phase: a loaded CA issues certificates that chain to the same root");
    let loaded = Ca::load(&ca_dir).unwrap();
    assert_eq!(loaded.trust_domain(), TRUST_DOMAIN);
    loaded
        .issue(
            &Identity::Node(3),
            &IssueOptions::default(),
            &pki.prefix("n3"),
        )
        .unwrap();
    let leaf = cert_der(&pki.prefix("n3.crt"));
    let root = cert_der(&pki.ca.cert_path());
    let (_, leaf) = X509Certificate::from_der(&leaf).unwrap();
    let (_, root) = X509Certificate::from_der(&root).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();
    assert_eq!(leaf.issuer().as_raw(), root.subject().as_raw());

    tracing::info!("phase: a key that does not belong to the certificate is refused");
    let swapped = pki.dir.path().join("swapped");
    let fresh = Ca::init(&swapped, TRUST_DOMAIN, common::CA_VALIDITY).unwrap();
    drop(fresh);
    std::fs::copy(ca_dir.join("ca.key"), swapped.join("ca.key")).unwrap();
    let err = Ca::load(&swapped).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
}

#[test]
fn revoke_adds_the_serial_and_bumps_the_crl_number() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let a = pki.issue(Identity::Service("alpha".into()), "alpha");
    let b = pki.issue(Identity::Service("beta".into()), "beta");

    tracing::info!("phase: first revocation");
    let serial_a = pki.ca.revoke(&a.cert).unwrap();
    let (number, serials) = crl_number_and_serials(&pki.ca.crl_path());
    assert_eq!((number, serials), (2, vec![serial_a.clone()]));

    tracing::info!("phase: revoking again changes nothing");
    assert_eq!(pki.ca.revoke(&a.cert).unwrap(), serial_a);
    assert_eq!(crl_number_and_serials(&pki.ca.crl_path()).0, 2);

    tracing::info!("phase: second revocation keeps the first; CA reloaded from disk");
    let ca = Ca::load(&pki.dir.path().join("ca")).unwrap();
    let serial_b = ca.revoke(&b.cert).unwrap();
    let (number, serials) = crl_number_and_serials(&pki.ca.crl_path());
    assert_eq!(number, 3);
    assert_eq!(serials, vec![serial_a, serial_b]);

    tracing::info!("phase: revoke by serial, for lost certificate files");
    let serial_c = pki
        .ca
        .issue(
            &Identity::Node(9),
            &IssueOptions::default(),
            &pki.prefix("n9"),
        )
        .unwrap();
    pki.ca.revoke_serial(&serial_c).unwrap();
    let (number, serials) = crl_number_and_serials(&pki.ca.crl_path());
    assert_eq!(number, 4);
    assert!(serials.contains(&serial_c));

    tracing::info!("phase: a certificate from another CA is not ours to revoke");
    let foreign = Pki::new(TRUST_DOMAIN);
    let f = foreign.issue(Identity::Node(1), "f1");
    let err = pki.ca.revoke(&f.cert).unwrap_err();
    assert!(
        matches!(err, IdentityError::NotIssuedByCa { .. }),
        "{err:?}"
    );
    assert_eq!(crl_number_and_serials(&pki.ca.crl_path()).0, 4);

    tracing::info!("phase: no temp files left behind");
    let leftovers: Vec<_> = std::fs::read_dir(pki.dir.path().join("ca"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn issue_options_that_cannot_work_are_refused() {
    init_logging();
    let pki = Pki::new(TRUST_DOMAIN);
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cases = [
        (
            "ends before it starts",
            IssueOptions {
                not_before: Some(now),
                not_after: Some(now - hour),
                ..IssueOptions::default()
            },
        ),
        (
            "a validity too large to represent",
            IssueOptions {
                validity: Some(Duration::MAX),
                ..IssueOptions::default()
            },
        ),
        (
            "longer than the leaf maximum",
            IssueOptions {
                validity: Some(Duration::from_secs(400 * 24 * 3600)),
                ..IssueOptions::default()
            },
        ),
        (
            "zero lifetime",
            IssueOptions {
                validity: Some(Duration::ZERO),
                not_before: Some(now),
                ..IssueOptions::default()
            },
        ),
        (
            "a DNS name that is not IA5",
            IssueOptions {
                dns_names: vec!["nöde".into()],
                ..IssueOptions::default()
            },
        ),
    ];
    for (what, options) in cases {
        tracing::info!(what, "phase: refused");
        let err = pki
            .ca
            .issue(&Identity::Node(1), &options, &pki.prefix("x"))
            .unwrap_err();
        assert!(
            matches!(err, IdentityError::InvalidIssueOptions(_)),
            "{what}: {err:?}"
        );
    }
    assert!(!pki.prefix("x.crt").exists());

    tracing::info!("phase: a node certificate (30 days) would outlive a 2-day CA");
    let short = Ca::init(
        &pki.dir.path().join("short-ca"),
        TRUST_DOMAIN,
        Duration::from_secs(2 * 24 * 3600),
    )
    .unwrap();
    let err = short
        .issue(
            &Identity::Node(1),
            &IssueOptions::default(),
            &pki.prefix("z"),
        )
        .unwrap_err();
    assert!(err.to_string().contains("outlive the CA"), "{err}");

    tracing::info!("phase: an identity that breaks the grammar is refused");
    let err = pki
        .ca
        .issue(
            &Identity::Service("Not-Valid".into()),
            &IssueOptions::default(),
            &pki.prefix("y"),
        )
        .unwrap_err();
    assert!(
        matches!(err, IdentityError::InvalidSpiffeId { .. }),
        "{err:?}"
    );
}

#[test]
fn a_kept_peer_identity_is_what_parsing_gives_and_the_set_stays_bounded() {
    init_logging();
    let identities = PeerIdentities::new();

    tracing::info!("phase: a certificate parses to the same identity, fresh or kept");
    let payments = self_signed_with_sans(vec![uri("spiffe://td/service/payments")]);
    let fresh = identity_from_cert_der(&payments).unwrap();
    assert_eq!(identities.identity(&payments).unwrap(), fresh);
    assert_eq!(identities.identity(&payments).unwrap(), fresh);
    assert_eq!(identities.len(), 1);

    tracing::info!("phase: another certificate is another entry, never the first one's");
    let orders = self_signed_with_sans(vec![uri("spiffe://td/service/orders")]);
    assert_eq!(
        identities.identity(&orders).unwrap().to_string(),
        "spiffe://td/service/orders"
    );
    assert_eq!(identities.len(), 2);

    tracing::info!("phase: a refused certificate is refused every time and never kept");
    let two = self_signed_with_sans(vec![
        uri("spiffe://td/node/1"),
        uri("spiffe://td/admin/root"),
    ]);
    for _ in 0..2 {
        assert!(matches!(
            identities.identity(&two).unwrap_err(),
            IdentityError::UriSanMultiple { count: 2 }
        ));
    }
    assert_eq!(identities.len(), 2);

    tracing::info!("phase: past the bound the set starts again; it never holds more");
    for n in 0..PEER_IDENTITIES_MAX + 5 {
        let der = self_signed_with_sans(vec![uri(&format!("spiffe://td/service/s{n}"))]);
        assert_eq!(
            identities.identity(&der).unwrap().to_string(),
            format!("spiffe://td/service/s{n}")
        );
        assert!(identities.len() <= PEER_IDENTITIES_MAX);
    }
    assert_eq!(identities.identity(&payments).unwrap(), fresh);
}
