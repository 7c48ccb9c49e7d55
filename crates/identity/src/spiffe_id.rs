//! SPIFFE identities: `spiffe://<trust domain>/<kind>/<name>` and their place in certificates.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{IdentityError, Result};

/// Longest trust domain, per the SPIFFE spec's DNS-like limit.
pub const TRUST_DOMAIN_LEN_MAX: usize = 255;
/// Longest service/admin/reader name (one DNS label, like the registry's service names).
pub const NAME_LEN_MAX: usize = 63;
/// Default lifetime of service, admin and reader certificates: short, because they are cheap
/// to reissue and revocation is only as fast as CRL distribution.
pub const DEFAULT_VALIDITY_SHORT: Duration = Duration::from_secs(24 * 60 * 60);
/// Default lifetime of node certificates: nodes are long-lived processes with operator-managed
/// files, so they rotate monthly rather than daily.
pub const DEFAULT_VALIDITY_NODE: Duration = Duration::from_secs(30 * 24 * 60 * 60);

const SCHEME: &str = "spiffe://";

/// What a certificate holder is, within one trust domain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Identity {
    /// A Signpost node, by its Raft node id (> 0).
    Node(u64),
    /// A registered service; may write only its own records.
    Service(String),
    /// An administrator (binding and membership operations).
    Admin(String),
    /// A read-only client.
    Reader(String),
}

impl Identity {
    /// The path segment naming the kind: `node`, `service`, `admin` or `reader`.
    pub fn kind(&self) -> &'static str {
        match self {
            Identity::Node(_) => "node",
            Identity::Service(_) => "service",
            Identity::Admin(_) => "admin",
            Identity::Reader(_) => "reader",
        }
    }

    /// Certificate lifetime used when `IssueOptions` does not set one.
    pub fn default_validity(&self) -> Duration {
        match self {
            Identity::Node(_) => DEFAULT_VALIDITY_NODE,
            Identity::Service(_) | Identity::Admin(_) | Identity::Reader(_) => {
                DEFAULT_VALIDITY_SHORT
            }
        }
    }

    /// Checks the name grammar for this kind (the enum's fields are public, so a value may
    /// have been built without going through `parse`).
    pub fn validate(&self) -> Result<()> {
        let checked = match self {
            Identity::Node(0) => Err("node id must be > 0".to_string()),
            Identity::Node(_) => Ok(()),
            Identity::Service(name) => check_service_name(name),
            Identity::Admin(name) | Identity::Reader(name) => check_principal_name(name),
        };
        checked.map_err(|reason| IdentityError::InvalidSpiffeId {
            input: self.to_string(),
            reason,
        })
    }

    /// Parses the `<kind>/<name>` path (without the leading slash).
    fn parse_path(path: &str) -> std::result::Result<Identity, String> {
        let Some((kind, name)) = path.split_once('/') else {
            return Err("path must be /<kind>/<name>".to_string());
        };
        let identity = match kind {
            "node" => Identity::Node(parse_node_id(name)?),
            "service" => Identity::Service(name.to_string()),
            "admin" => Identity::Admin(name.to_string()),
            "reader" => Identity::Reader(name.to_string()),
            other => {
                return Err(format!(
                    "unknown identity kind {other:?} (expected node, service, admin or reader)"
                ))
            }
        };
        match &identity {
            Identity::Node(_) => {}
            Identity::Service(name) => check_service_name(name)?,
            Identity::Admin(name) | Identity::Reader(name) => check_principal_name(name)?,
        }
        Ok(identity)
    }
}

impl fmt::Display for Identity {
    /// `<kind>/<name>`, the SPIFFE path without the leading slash.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(id) => write!(f, "node/{id}"),
            Identity::Service(name) | Identity::Admin(name) | Identity::Reader(name) => {
                write!(f, "{}/{name}", self.kind())
            }
        }
    }
}

/// A SPIFFE ID: trust domain plus identity. Displays as `spiffe://<td>/<kind>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    /// Lowercase `[a-z0-9.-]`, 1–255 characters.
    pub trust_domain: String,
    /// Who, within the trust domain.
    pub identity: Identity,
}

impl SpiffeId {
    /// Builds a SPIFFE ID after checking both parts.
    pub fn new(trust_domain: impl Into<String>, identity: Identity) -> Result<SpiffeId> {
        let id = SpiffeId {
            trust_domain: trust_domain.into(),
            identity,
        };
        id.validate()?;
        Ok(id)
    }

    /// Parses `spiffe://<td>/node/<id>`, `/service/<name>`, `/admin/<name>` or `/reader/<name>`.
    ///
    /// The accepted form is canonical: exactly one spelling per identity, so the text
    /// round-trips through `Display` and can be compared as a string.
    pub fn parse(input: &str) -> Result<SpiffeId> {
        let invalid = |reason: String| IdentityError::InvalidSpiffeId {
            input: input.to_string(),
            reason,
        };
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("must start with \"spiffe://\"".to_string()))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("missing /<kind>/<name> path".to_string()))?;
        check_trust_domain(trust_domain).map_err(invalid)?;
        let identity = Identity::parse_path(path).map_err(invalid)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_string(),
            identity,
        })
    }

    /// Checks the trust domain and the identity's name grammar.
    pub fn validate(&self) -> Result<()> {
        check_trust_domain(&self.trust_domain).map_err(|reason| {
            IdentityError::InvalidSpiffeId {
                input: self.to_string(),
                reason,
            }
        })?;
        self.identity.validate()
    }

    /// The node id, when this is a node identity.
    pub fn node_id(&self) -> Option<u64> {
        match self.identity {
            Identity::Node(id) => Some(id),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.trust_domain, self.identity)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<SpiffeId> {
        SpiffeId::parse(s)
    }
}

/// Checks a trust domain on its own (e.g. before `Ca::init`).
pub fn validate_trust_domain(trust_domain: &str) -> Result<()> {
    check_trust_domain(trust_domain).map_err(|reason| IdentityError::InvalidSpiffeId {
        input: format!("{SCHEME}{trust_domain}"),
        reason,
    })
}

/// The SPIFFE ID of a DER certificate: it must carry exactly one URI SAN, and that URI must
/// parse as a Signpost SPIFFE ID. The certificate's signature and validity are NOT checked
/// here; call this only on certificates that a verifier has already accepted.
pub fn identity_from_cert_der(der: &[u8]) -> Result<SpiffeId> {
    let uri = single_uri_san(der)?;
    SpiffeId::parse(&uri)
}

/// The only URI SAN of a DER certificate.
pub(crate) fn single_uri_san(der: &[u8]) -> Result<String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::parse("X.509 certificate", e))?;
    // A duplicated SAN extension is an error here (x509-parser refuses it), which is what we
    // want: two extensions would be two places to look for the identity.
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::parse("subjectAltName extension", e))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(IdentityError::UriSanMissing),
        [uri] => Ok((*uri).to_string()),
        more => Err(IdentityError::UriSanMultiple { count: more.len() }),
    }
}

fn check_trust_domain(td: &str) -> std::result::Result<(), String> {
    if td.is_empty() {
        return Err("trust domain is empty".to_string());
    }
    if td.len() > TRUST_DOMAIN_LEN_MAX {
        return Err(format!(
            "trust domain is {} characters (max {TRUST_DOMAIN_LEN_MAX})",
            td.len()
        ));
    }
    if let Some(c) = td.chars().find(|c| !is_name_char(*c)) {
        return Err(format!(
            "trust domain contains {c:?} (allowed: lowercase a-z, 0-9, '.', '-')"
        ));
    }
    Ok(())
}

fn parse_node_id(text: &str) -> std::result::Result<u64, String> {
    // Digits only, no leading zero: `u64::from_str` would accept "+7" and "007", which would
    // give one node several spellings.
    let canonical =
        !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) && !text.starts_with('0');
    if !canonical {
        return Err(format!(
            "node id {text:?} must be a decimal number > 0 without leading zeros"
        ));
    }
    text.parse::<u64>()
        .map_err(|_| format!("node id {text:?} does not fit in 64 bits"))
}

/// Service names follow the registry's grammar: a DNS-label-like name starting with a
/// lowercase letter and ending with a letter or digit.
fn check_service_name(name: &str) -> std::result::Result<(), String> {
    check_name_chars("service name", name)?;
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!(
            "service name {name:?} must start with a lowercase letter"
        ));
    }
    if !name.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return Err(format!(
            "service name {name:?} must end with a letter or digit"
        ));
    }
    Ok(())
}

/// Admin and reader names: same alphabet, and alphanumeric at both ends so that names such
/// as "." or ".." (which look like paths in logs and file names) cannot exist.
fn check_principal_name(name: &str) -> std::result::Result<(), String> {
    check_name_chars("name", name)?;
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !name.starts_with(alnum) || !name.ends_with(alnum) {
        return Err(format!(
            "name {name:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

fn check_name_chars(what: &str, name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > NAME_LEN_MAX {
        return Err(format!(
            "{what} is {} characters (max {NAME_LEN_MAX})",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| !is_name_char(*c)) {
        return Err(format!(
            "{what} {name:?} contains {c:?} (allowed: lowercase a-z, 0-9, '.', '-')"
        ));
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-'
}
