use std::collections::{BTreeMap, BTreeSet};

use signpost_record::{AdminSet, Binding};

use crate::commitment::Commitment;
use crate::request::Quotas;
use crate::service_view::{InstanceInfo, ServiceView};
use crate::storage_key::StorageKey;
use crate::stored::{
    encode_value, StoredAdminSet, StoredBinding, StoredChainEntry, StoredRecord, StoredTombstone,
};

mod apply;
mod load;

pub use apply::{MAX_AGE_MS, MAX_SKEW_MS, NOSPACE, TOMBSTONE_DROPS_PER_APPLY_MAX};

/// The registry state machine: admin sets, bindings, live records and tombstones, all in
/// ordered maps so that every iteration (export, list, key rotation, tombstone expiry) has one
/// order on every node.
///
/// See the crate documentation for the rules [`Registry::apply`] enforces.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registry {
    admins: Option<Admins>,
    quotas: Quotas,
    bindings: BTreeMap<String, BindingEntry>,
    /// Live records by service, then instance. A service is present only while it has at
    /// least one live record, so `services.len()` is what the services quota counts.
    services: BTreeMap<String, BTreeMap<String, StoredRecord>>,
    tombstones: BTreeMap<(String, String), StoredTombstone>,
    /// Tombstones ordered by the time after which they may be dropped.
    tombstones_due: BTreeSet<(u64, String, String)>,
    /// Sum of key and value lengths over [`Registry::export`].
    state_bytes: u64,
    /// The largest entry time applied (`c/clock`): apply's time never goes below it, so a
    /// leader whose clock ran ahead cannot be followed by one that makes time run backwards
    /// (which would let a replay slip in after its tombstone was dropped).
    clock_ms: u64,
    /// The commitment to bindings and live records whose root each audit record carries.
    commitment: Commitment,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Admins {
    genesis: AdminSet,
    current: AdminSet,
    /// Encoded `MultiEnvelope`s of the rotations after genesis, in order.
    chain: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct BindingEntry {
    binding: Binding,
    stored: StoredBinding,
    /// The admin key that signed the binding: a rotation that drops it must re-sign the
    /// binding (I6: every stored binding verifies against the current admin set).
    signer: [u8; signpost_record::PUBLIC_KEY_BYTES],
}

impl Registry {
    /// An empty registry without an admin set; the first useful command is
    /// [`crate::Command::Genesis`].
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The service's binding and live records; `None` if it has neither.
    pub fn resolve(&self, service: &str) -> Option<ServiceView> {
        let binding = self.bindings.get(service);
        let records = self.services.get(service);
        if binding.is_none() && records.is_none() {
            return None;
        }
        Some(ServiceView {
            service: service.to_owned(),
            // Records cannot outlive their binding (bindings are never removed), so an empty
            // binding here would mean a service with neither, which returned above.
            binding: binding
                .map(|b| b.stored.envelope.clone())
                .unwrap_or_default(),
            records: records
                .map(|instances| instances.values().map(|r| r.envelope.clone()).collect())
                .unwrap_or_default(),
            instances: records
                .map(|instances| instances.keys().cloned().collect())
                .unwrap_or_default(),
            revisions: records
                .map(|instances| instances.values().map(|r| r.revision).collect())
                .unwrap_or_default(),
        })
    }

    /// Every service with at least one live record, ordered by name.
    pub fn list(&self) -> Vec<ServiceView> {
        self.services
            .keys()
            .filter_map(|service| self.resolve(service))
            .collect()
    }

    /// One page of [`Registry::list`] (or, with `all_bound`, of every bound service, also those
    /// without live records): the services named after `after`, in name order, at most
    /// `services_max` of them and, past the first, at most `bytes_max` bytes of envelopes.
    /// Returns the page and the name to continue after, if more follow. Copies only the page,
    /// so a reader's cost is bounded by what it asked for, not by the registry's size.
    pub fn list_page(
        &self,
        after: &str,
        all_bound: bool,
        services_max: usize,
        bytes_max: usize,
    ) -> (Vec<ServiceView>, Option<String>) {
        use std::ops::Bound::{Excluded, Unbounded};
        let range = (Excluded(after.to_owned()), Unbounded);
        let names: Box<dyn Iterator<Item = &String> + '_> = if all_bound {
            Box::new(
                self.bindings
                    .range::<String, _>(range)
                    .map(|(name, _)| name),
            )
        } else {
            Box::new(
                self.services
                    .range::<String, _>(range)
                    .map(|(name, _)| name),
            )
        };
        let mut page = Vec::new();
        let mut bytes = 0usize;
        for name in names {
            let Some(view) = self.resolve(name) else {
                continue;
            };
            let view_bytes = view.binding.len() + view.records.iter().map(Vec::len).sum::<usize>();
            // The first service always fits, so a page makes progress whatever its size.
            if !page.is_empty() && (page.len() >= services_max || bytes + view_bytes > bytes_max) {
                let last = page.last().map(|v: &ServiceView| v.service.clone());
                return (page, last);
            }
            bytes += view_bytes;
            page.push(view);
        }
        (page, None)
    }

    /// The current binding of `service`.
    pub fn binding(&self, service: &str) -> Option<&Binding> {
        self.bindings.get(service).map(|b| &b.binding)
    }

    /// The current admin set; `None` before genesis.
    pub fn admin_set(&self) -> Option<&AdminSet> {
        self.admins.as_ref().map(|a| &a.current)
    }

    /// The bootstrap admin set that clients pin; `None` before genesis.
    pub fn genesis(&self) -> Option<&AdminSet> {
        self.admins.as_ref().map(|a| &a.genesis)
    }

    /// The encoded `MultiEnvelope`s of every admin rotation after genesis, in order, so a client
    /// pinned to genesis can verify the current admin set.
    pub fn admin_chain(&self) -> Vec<Vec<u8>> {
        self.admins
            .as_ref()
            .map(|a| a.chain.clone())
            .unwrap_or_default()
    }

    /// The quotas fixed at genesis (the defaults before genesis).
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// The last sequence accepted for `service/instance`, live or tombstoned: a registration
    /// must carry a higher one.
    pub fn last_sequence(&self, service: &str, instance: &str) -> Option<u64> {
        self.services
            .get(service)
            .and_then(|s| s.get(instance))
            .map(|r| r.sequence)
            .or_else(|| {
                self.tombstones
                    .get(&(service.to_owned(), instance.to_owned()))
                    .map(|t| t.sequence)
            })
    }

    /// Services with at least one live record: what `Quotas::services_max` counts.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Lease facts of one live instance.
    pub fn instance(&self, service: &str, instance: &str) -> Option<InstanceInfo> {
        let record = self.services.get(service)?.get(instance)?;
        Some(InstanceInfo {
            sequence: record.sequence,
            ttl_secs: record.ttl_secs,
            key: record.key,
        })
    }

    /// Every live instance as `(service, instance, sequence, ttl_secs)`, ordered by service then
    /// instance; the leader uses it to (re)build lease deadlines.
    pub fn instances(&self) -> impl Iterator<Item = (&str, &str, u64, u32)> + '_ {
        self.services.iter().flat_map(|(service, instances)| {
            instances.iter().map(move |(instance, record)| {
                (
                    service.as_str(),
                    instance.as_str(),
                    record.sequence,
                    record.ttl_secs,
                )
            })
        })
    }

    /// Every live instance as (service, instance, revision of the write that stored its
    /// record): where the audit leaf of its current version is.
    pub fn record_revisions(&self) -> impl Iterator<Item = (&str, &str, u64)> + '_ {
        self.services.iter().flat_map(|(service, instances)| {
            instances.iter().map(move |(instance, record)| {
                (service.as_str(), instance.as_str(), record.revision)
            })
        })
    }

    /// Bytes of stored state: the sum of key and value lengths over [`Registry::export`]. This
    /// is what `Quotas::state_bytes_max` limits.
    pub fn state_bytes(&self) -> u64 {
        self.state_bytes
    }

    /// The root of the state commitment (see `signpost_audit::StateTree`): bindings and live
    /// records, as every audit record carries it.
    pub fn state_root(&self) -> signpost_audit::Hash {
        self.commitment.root()
    }

    /// The path of `service` in the state commitment, proving its binding and live records
    /// (which the prover rebuilds from an answer), or that it has neither.
    pub fn state_proof(&self, service: &str) -> signpost_audit::StateProof {
        self.commitment.prove(service)
    }

    /// The largest entry time applied so far (milliseconds since the epoch).
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }

    /// Active alarms: [`NOSPACE`] while the state is at or above its byte quota, which is
    /// exactly when registrations that grow the state are refused.
    pub fn alarms(&self) -> Vec<String> {
        let mut alarms = Vec::new();
        if self.state_bytes >= self.quotas.state_bytes_max {
            alarms.push(NOSPACE.to_owned());
        }
        alarms
    }

    /// The whole state as key/value pairs sorted by key: the snapshot form, and what
    /// [`Registry::load`] reads back.
    pub fn export(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut pairs = Vec::new();
        if let Some(admins) = &self.admins {
            pairs.push((
                StorageKey::AdminGenesis.encode(),
                encode_value(&StoredAdminSet::from_admin_set(&admins.genesis)),
            ));
            pairs.push((
                StorageKey::AdminCurrent.encode(),
                encode_value(&StoredAdminSet::from_admin_set(&admins.current)),
            ));
            for (index, envelope) in admins.chain.iter().enumerate() {
                let index = u32::try_from(index)
                    .unwrap_or_else(|_| panic!("invariant: admin chain is bounded far below u32"));
                pairs.push((
                    StorageKey::AdminChain { index }.encode(),
                    encode_value(&StoredChainEntry {
                        envelope: envelope.clone(),
                    }),
                ));
            }
            pairs.push((StorageKey::Quotas.encode(), encode_value(&self.quotas)));
        }
        for (service, entry) in &self.bindings {
            pairs.push((
                StorageKey::binding(service).encode(),
                encode_value(&entry.stored),
            ));
        }
        for (service, instances) in &self.services {
            for (instance, record) in instances {
                pairs.push((
                    StorageKey::record(service, instance).encode(),
                    encode_value(record),
                ));
            }
        }
        for ((service, instance), tombstone) in &self.tombstones {
            pairs.push((
                StorageKey::tombstone(service, instance).encode(),
                encode_value(tombstone),
            ));
        }
        if self.clock_ms > 0 {
            pairs.push((StorageKey::Clock.encode(), encode_value(&self.clock_ms)));
        }
        pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        pairs
    }
}
