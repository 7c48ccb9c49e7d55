//! The persisted key layout. Every key is ASCII: a one-letter kind, `/`, then the names. Names
//! never contain `/` (see the record crate's name grammar), so the layout is unambiguous and
//! sorts by service, then instance.

use signpost_record::{validate_instance_id, validate_service_name};

use crate::error::{escape_key, StateError};

const RECORD_PREFIX: &str = "r/";
const TOMBSTONE_PREFIX: &str = "t/";
const BINDING_PREFIX: &str = "b/";
const ADMIN_CURRENT: &str = "a/current";
const ADMIN_GENESIS: &str = "a/genesis";
const ADMIN_CHAIN_PREFIX: &str = "a/chain/";
const QUOTAS: &str = "q/quotas";
const CLOCK: &str = "c/clock";

/// Where one piece of registry state lives in the key/value export.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum StorageKey {
    /// `r/<service>/<instance>`: a live record.
    Record { service: String, instance: String },
    /// `t/<service>/<instance>`: the last sequence of a removed instance.
    Tombstone { service: String, instance: String },
    /// `b/<service>`: the binding of a service.
    Binding { service: String },
    /// `a/current`: the current admin set.
    AdminCurrent,
    /// `a/genesis`: the bootstrap admin set.
    AdminGenesis,
    /// `a/chain/<8 hex digits>`: the n-th admin rotation after genesis; fixed-width big-endian
    /// hex so the keys sort in chain order.
    AdminChain { index: u32 },
    /// `q/quotas`: the quotas fixed at genesis.
    Quotas,
    /// `c/clock`: the largest entry time applied so far; time in apply never goes below it.
    Clock,
}

impl StorageKey {
    pub(crate) fn record(service: &str, instance: &str) -> StorageKey {
        StorageKey::Record {
            service: service.to_owned(),
            instance: instance.to_owned(),
        }
    }

    pub(crate) fn tombstone(service: &str, instance: &str) -> StorageKey {
        StorageKey::Tombstone {
            service: service.to_owned(),
            instance: instance.to_owned(),
        }
    }

    pub(crate) fn binding(service: &str) -> StorageKey {
        StorageKey::Binding {
            service: service.to_owned(),
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let text = match self {
            StorageKey::Record { service, instance } => {
                format!("{RECORD_PREFIX}{service}/{instance}")
            }
            StorageKey::Tombstone { service, instance } => {
                format!("{TOMBSTONE_PREFIX}{service}/{instance}")
            }
            StorageKey::Binding { service } => format!("{BINDING_PREFIX}{service}"),
            StorageKey::AdminCurrent => ADMIN_CURRENT.to_owned(),
            StorageKey::AdminGenesis => ADMIN_GENESIS.to_owned(),
            StorageKey::AdminChain { index } => format!("{ADMIN_CHAIN_PREFIX}{index:08x}"),
            StorageKey::Quotas => QUOTAS.to_owned(),
            StorageKey::Clock => CLOCK.to_owned(),
        };
        text.into_bytes()
    }

    /// Parses a persisted key, validating the names it carries.
    pub(crate) fn parse(key: &[u8]) -> Result<StorageKey, StateError> {
        let corrupt = |detail: String| StateError::CorruptKey {
            key: escape_key(key),
            detail,
        };
        let text = std::str::from_utf8(key).map_err(|_| corrupt("not UTF-8".into()))?;
        if let Some(rest) = text.strip_prefix(RECORD_PREFIX) {
            let (service, instance) = split_names(rest).map_err(corrupt)?;
            return Ok(StorageKey::Record { service, instance });
        }
        if let Some(rest) = text.strip_prefix(TOMBSTONE_PREFIX) {
            let (service, instance) = split_names(rest).map_err(corrupt)?;
            return Ok(StorageKey::Tombstone { service, instance });
        }
        if let Some(service) = text.strip_prefix(BINDING_PREFIX) {
            validate_service_name(service).map_err(|e| corrupt(e.to_string()))?;
            return Ok(StorageKey::binding(service));
        }
        if let Some(hex_index) = text.strip_prefix(ADMIN_CHAIN_PREFIX) {
            let well_formed = hex_index.len() == 8
                && hex_index
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !well_formed {
                return Err(corrupt("chain index is not 8 lowercase hex digits".into()));
            }
            let index = u32::from_str_radix(hex_index, 16)
                .map_err(|e| corrupt(format!("chain index: {e}")))?;
            return Ok(StorageKey::AdminChain { index });
        }
        match text {
            ADMIN_CURRENT => Ok(StorageKey::AdminCurrent),
            ADMIN_GENESIS => Ok(StorageKey::AdminGenesis),
            QUOTAS => Ok(StorageKey::Quotas),
            CLOCK => Ok(StorageKey::Clock),
            _ => Err(corrupt("unknown key".into())),
        }
    }
}

fn split_names(rest: &str) -> Result<(String, String), String> {
    let (service, instance) = rest
        .split_once('/')
        .ok_or_else(|| "missing '/' between service and instance".to_string())?;
    validate_service_name(service).map_err(|e| e.to_string())?;
    validate_instance_id(instance).map_err(|e| e.to_string())?;
    Ok((service.to_owned(), instance.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_round_trips_and_sorts_chain_in_order() {
        let keys = [
            StorageKey::record("payments", "p1"),
            StorageKey::tombstone("payments", "p:1"),
            StorageKey::binding("pay.v2"),
            StorageKey::AdminCurrent,
            StorageKey::AdminGenesis,
            StorageKey::AdminChain { index: 0 },
            StorageKey::AdminChain { index: 0xabc },
            StorageKey::Quotas,
            StorageKey::Clock,
        ];
        for key in keys {
            assert_eq!(StorageKey::parse(&key.encode()).unwrap(), key);
        }
        assert!(
            StorageKey::AdminChain { index: 9 }.encode()
                < StorageKey::AdminChain { index: 10 }.encode()
        );
        for bad in [
            &b"r/payments"[..],
            b"r/Payments/p1",
            b"r/payments/p1/x",
            b"b/",
            b"a/chain/1",
            b"a/chain/0000000G",
            b"x/y",
            b"\xff",
        ] {
            assert!(StorageKey::parse(bad).is_err(), "{}", escape_key(bad));
        }
    }
}
