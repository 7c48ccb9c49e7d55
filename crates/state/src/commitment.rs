//! The registry's state commitment (see [`signpost_audit::StateTree`]): per service, its
//! binding's hash and a tree of its live records; over services, a tree of those. Kept up to
//! date by apply, rebuilt from the state at load (it is never stored), and its root goes into
//! every audit record, so the log commits to the whole state at every revision.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use signpost_audit::{name_key, service_value, Hash, StateProof, StateTree, EMPTY};

use crate::stored::StoredRecord;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct ServiceState {
    binding: Hash,
    instances: StateTree,
}

impl ServiceState {
    fn value(&self) -> Hash {
        service_value(&self.binding, &self.instances.root())
    }

    fn is_empty(&self) -> bool {
        self.binding == EMPTY && self.instances.is_empty()
    }
}

fn digest(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Commitment {
    services: StateTree,
    parts: BTreeMap<String, ServiceState>,
}

impl Commitment {
    /// The commitment to `bindings` (service -> binding envelope) and `records` (service ->
    /// instance -> record), built bottom-up.
    pub(crate) fn build<'a>(
        bindings: impl Iterator<Item = (&'a String, &'a [u8])>,
        records: &BTreeMap<String, BTreeMap<String, StoredRecord>>,
    ) -> Commitment {
        let mut parts: BTreeMap<String, ServiceState> = bindings
            .map(|(service, envelope)| {
                (
                    service.clone(),
                    ServiceState {
                        binding: digest(envelope),
                        instances: StateTree::new(),
                    },
                )
            })
            .collect();
        for (service, instances) in records {
            let entries = instances
                .iter()
                .map(|(instance, record)| (name_key(instance), digest(&record.envelope)))
                .collect();
            // Instance ids are distinct map keys, so their SHA-256 keys are distinct too.
            let tree = StateTree::from_entries(entries).unwrap_or_else(|e| {
                panic!("invariant: the instances of {service} have distinct keys: {e}")
            });
            parts.entry(service.clone()).or_default().instances = tree;
        }
        let entries = parts
            .iter()
            .map(|(service, part)| (name_key(service), part.value()))
            .collect();
        let services = StateTree::from_entries(entries)
            .unwrap_or_else(|e| panic!("invariant: service names have distinct keys: {e}"));
        Commitment { services, parts }
    }

    /// The root every audit record carries.
    pub(crate) fn root(&self) -> Hash {
        self.services.root()
    }

    pub(crate) fn put_record(&mut self, service: &str, instance: &str, envelope: &[u8]) {
        self.part(service)
            .instances
            .insert(name_key(instance), digest(envelope));
        self.refresh(service);
    }

    pub(crate) fn remove_record(&mut self, service: &str, instance: &str) {
        self.part(service).instances.remove(&name_key(instance));
        self.refresh(service);
    }

    pub(crate) fn put_binding(&mut self, service: &str, envelope: &[u8]) {
        self.part(service).binding = digest(envelope);
        self.refresh(service);
    }

    /// The path of `service` in the tree of services: proves its value, or its absence.
    pub(crate) fn prove(&self, service: &str) -> StateProof {
        self.services.prove(&name_key(service))
    }

    fn part(&mut self, service: &str) -> &mut ServiceState {
        self.parts.entry(service.to_owned()).or_default()
    }

    fn refresh(&mut self, service: &str) {
        let key = name_key(service);
        match self.parts.get(service) {
            Some(part) if !part.is_empty() => {
                self.services.insert(key, part.value());
            }
            _ => {
                self.parts.remove(service);
                self.services.remove(&key);
            }
        }
    }
}
