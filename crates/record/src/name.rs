use crate::error::{reject, RecordError};
use crate::limits::{INSTANCE_ID_BYTES_MAX, SERVICE_NAME_BYTES_MAX};
use crate::reason::Reason;

/// Checks a service name against the grammar: 1 to [`SERVICE_NAME_BYTES_MAX`] bytes of
/// `[a-z0-9.-]`, starting with a letter, ending with a letter or digit, without `..`.
///
/// Names never contain `/`, which is what lets storage keys use it as a separator.
pub fn validate_service_name(name: &str) -> Result<(), RecordError> {
    let bytes = name.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return reject(Reason::InvalidName, "service name is empty");
    };
    if bytes.len() > SERVICE_NAME_BYTES_MAX {
        return reject(
            Reason::InvalidName,
            format!(
                "service name is {} bytes, above the maximum of {SERVICE_NAME_BYTES_MAX}",
                bytes.len()
            ),
        );
    }
    if let Some(bad) = name
        .chars()
        .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'))
    {
        return reject(
            Reason::InvalidName,
            format!(
                "service name {name:?} contains {:?}; allowed are a-z, 0-9, '-' and '.'",
                bad
            ),
        );
    }
    if !first.is_ascii_lowercase() {
        return reject(
            Reason::InvalidName,
            format!("service name {name:?} must start with a letter"),
        );
    }
    if !(last.is_ascii_lowercase() || last.is_ascii_digit()) {
        return reject(
            Reason::InvalidName,
            format!("service name {name:?} must end with a letter or digit"),
        );
    }
    if name.contains("..") {
        return reject(
            Reason::InvalidName,
            format!("service name {name:?} contains \"..\""),
        );
    }
    Ok(())
}

/// Checks an instance id against the grammar: 1 to [`INSTANCE_ID_BYTES_MAX`] bytes of
/// `[A-Za-z0-9._:-]`, starting with a letter or digit.
pub fn validate_instance_id(id: &str) -> Result<(), RecordError> {
    let bytes = id.as_bytes();
    let Some(first) = bytes.first() else {
        return reject(Reason::InvalidName, "instance id is empty");
    };
    if bytes.len() > INSTANCE_ID_BYTES_MAX {
        return reject(
            Reason::InvalidName,
            format!(
                "instance id is {} bytes, above the maximum of {INSTANCE_ID_BYTES_MAX}",
                bytes.len()
            ),
        );
    }
    if let Some(bad) = id
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return reject(
            Reason::InvalidName,
            format!(
                "instance id {id:?} contains {:?}; allowed are A-Z, a-z, 0-9, '.', '_', ':' and '-'",
                bad
            ),
        );
    }
    if !first.is_ascii_alphanumeric() {
        return reject(
            Reason::InvalidName,
            format!("instance id {id:?} must start with a letter or digit"),
        );
    }
    Ok(())
}
