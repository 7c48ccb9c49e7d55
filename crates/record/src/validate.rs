use signpost_proto::v1::{DeregisterPayload, Endpoint, RecordPayload};

use crate::error::{reject, RecordError};
use crate::limits::{
    ENDPOINTS_MAX, HOST_BYTES_MAX, METADATA_BYTES_MAX, METADATA_ENTRIES_MAX,
    METADATA_KEY_BYTES_MAX, METADATA_VALUE_BYTES_MAX, PROTOCOL_BYTES_MAX, TLS_IDENTITY_BYTES_MAX,
    TTL_SECS_MAX, TTL_SECS_MIN,
};
use crate::name::{validate_instance_id, validate_service_name};
use crate::reason::Reason;

/// Checks every field of a record against the name grammar and the limits in [`crate::limits`].
///
/// Clients call this before signing; verifiers call it (through [`crate::open_record`]) after the
/// signature check. Problems are reported in a fixed order (names, sequence, ttl, endpoints in
/// order, metadata by key, tls identity) so every node words a rejection the same way.
pub fn validate_record_payload(payload: &RecordPayload) -> Result<(), RecordError> {
    validate_service_name(&payload.service)?;
    validate_instance_id(&payload.instance)?;
    validate_sequence(payload.sequence)?;
    if !(TTL_SECS_MIN..=TTL_SECS_MAX).contains(&payload.ttl_secs) {
        return reject(
            Reason::InvalidField,
            format!(
                "ttl_secs is {}, outside {TTL_SECS_MIN}..={TTL_SECS_MAX}",
                payload.ttl_secs
            ),
        );
    }
    validate_endpoints(&payload.endpoints)?;
    validate_metadata(payload.metadata.iter())?;
    if payload.tls_identity.len() > TLS_IDENTITY_BYTES_MAX {
        return reject(
            Reason::InvalidField,
            format!(
                "tls_identity is {} bytes, above the maximum of {TLS_IDENTITY_BYTES_MAX}",
                payload.tls_identity.len()
            ),
        );
    }
    Ok(())
}

/// Checks every field of a deregistration.
pub fn validate_deregister_payload(payload: &DeregisterPayload) -> Result<(), RecordError> {
    validate_service_name(&payload.service)?;
    validate_instance_id(&payload.instance)?;
    validate_sequence(payload.sequence)
}

// Zero is the "never written" sequence, so a write must be above it to be orderable.
fn validate_sequence(sequence: u64) -> Result<(), RecordError> {
    if sequence == 0 {
        return reject(Reason::InvalidField, "sequence must be at least 1");
    }
    Ok(())
}

fn validate_endpoints(endpoints: &[Endpoint]) -> Result<(), RecordError> {
    if endpoints.len() > ENDPOINTS_MAX {
        return reject(
            Reason::InvalidField,
            format!(
                "{} endpoints, above the maximum of {ENDPOINTS_MAX}",
                endpoints.len()
            ),
        );
    }
    for (index, endpoint) in endpoints.iter().enumerate() {
        validate_endpoint(index, endpoint)?;
    }
    Ok(())
}

fn validate_endpoint(index: usize, endpoint: &Endpoint) -> Result<(), RecordError> {
    let host = &endpoint.host;
    if host.is_empty() || host.len() > HOST_BYTES_MAX {
        return reject(
            Reason::InvalidField,
            format!(
                "endpoint {index}: host is {} bytes, expected 1..={HOST_BYTES_MAX}",
                host.len()
            ),
        );
    }
    // DNS names, IPv4 and IPv6 literals (with brackets and zone ids); nothing that could smuggle
    // whitespace, a path or a URL into a client's connect call.
    if let Some(bad) = host.chars().find(|&c| {
        !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']' | '%'))
    }) {
        return reject(
            Reason::InvalidField,
            format!("endpoint {index}: host {host:?} contains {bad:?}"),
        );
    }
    if !(1..=u32::from(u16::MAX)).contains(&endpoint.port) {
        return reject(
            Reason::InvalidField,
            format!("endpoint {index}: port {} outside 1..=65535", endpoint.port),
        );
    }
    let protocol = &endpoint.protocol;
    if protocol.len() > PROTOCOL_BYTES_MAX {
        return reject(
            Reason::InvalidField,
            format!(
                "endpoint {index}: protocol is {} bytes, above the maximum of {PROTOCOL_BYTES_MAX}",
                protocol.len()
            ),
        );
    }
    if let Some(bad) = protocol
        .chars()
        .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '.' | '-')))
    {
        return reject(
            Reason::InvalidField,
            format!("endpoint {index}: protocol {protocol:?} contains {bad:?}; allowed are a-z, 0-9, '+', '.' and '-'"),
        );
    }
    Ok(())
}

fn validate_metadata<'a>(
    entries: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), RecordError> {
    if entries.len() > METADATA_ENTRIES_MAX {
        return reject(
            Reason::InvalidField,
            format!(
                "{} metadata entries, above the maximum of {METADATA_ENTRIES_MAX}",
                entries.len()
            ),
        );
    }
    // The decoded map may iterate in a per-process random order; sorting makes the first
    // reported problem, and so the rejection detail, identical on every node.
    let mut sorted: Vec<(&String, &String)> = entries.collect();
    sorted.sort_unstable();
    let mut total_bytes = 0usize;
    for (key, value) in sorted {
        validate_metadata_key(key)?;
        if value.len() > METADATA_VALUE_BYTES_MAX {
            return reject(
                Reason::InvalidField,
                format!(
                    "metadata {key:?}: value is {} bytes, above the maximum of {METADATA_VALUE_BYTES_MAX}",
                    value.len()
                ),
            );
        }
        total_bytes += key.len() + value.len();
    }
    if total_bytes > METADATA_BYTES_MAX {
        return reject(
            Reason::InvalidField,
            format!("metadata is {total_bytes} bytes, above the maximum of {METADATA_BYTES_MAX}"),
        );
    }
    Ok(())
}

fn validate_metadata_key(key: &str) -> Result<(), RecordError> {
    if key.is_empty() || key.len() > METADATA_KEY_BYTES_MAX {
        return reject(
            Reason::InvalidField,
            format!(
                "metadata key {key:?} is {} bytes, expected 1..={METADATA_KEY_BYTES_MAX}",
                key.len()
            ),
        );
    }
    if let Some(bad) = key.chars().find(|&c| {
        !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '/' | '-'))
    }) {
        return reject(
            Reason::InvalidField,
            format!(
                "metadata key {key:?} contains {bad:?}; allowed are a-z, 0-9, '.', '_', '/' and '-'"
            ),
        );
    }
    Ok(())
}
