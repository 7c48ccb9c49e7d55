//! `Registry::load`: rebuilds the registry from its key/value export and checks, value by value
//! and then as a whole, that it is a state `apply` could have produced.
//!
//! [`Registry::load`] verifies every signature again: a snapshot from a peer or a backup is
//! trusted to be durable, not to be correct, and a record that does not verify must never be
//! served as if it did. [`Registry::load_own`] is the restart path: the node reads back what its
//! own apply verified before storing it, so record signatures are not verified a second time
//! (at a million records that is 40 s of CPU); every structural check still runs, and RocksDB's
//! block checksums catch a flipped bit on disk. When signatures are verified, record values are
//! decoded and verified on every core: they are independent of each other, and one
//! `std::thread::scope` over equal chunks is all the parallelism this one loop needs.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};

use signpost_proto::v1::MultiEnvelope;
use signpost_record::{
    decode_envelope, decode_multi_envelope, open_binding, open_record_with, verify_admin_chain,
    AdminSet, SignatureCheck, ADMIN_CHAIN_ENTRIES_MAX,
};

use super::{apply::MAX_AGE_MS, apply::MAX_SKEW_MS, Admins, BindingEntry, Registry};
use crate::commitment::Commitment;
use crate::error::{escape_key, StateError};
use crate::request::Quotas;
use crate::storage_key::StorageKey;
use crate::stored::{
    decode_value, StoredAdminSet, StoredBinding, StoredChainEntry, StoredRecord, StoredTombstone,
};

type Names = (String, String);

/// Fewer records than this are decoded on the calling thread: threads would cost more.
const PARALLEL_RECORDS_MIN: usize = 4096;
/// Most threads a load uses.
const LOAD_THREADS_MAX: usize = 16;

/// Whether record signatures are verified while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Signatures {
    #[default]
    Verify,
    VerifiedBeforeStoring,
}

/// A record pair whose value is decoded (and verified) after the scan, on every core.
struct PendingRecord {
    key: Vec<u8>,
    service: String,
    instance: String,
    value: Vec<u8>,
}

#[derive(Default)]
struct Loader {
    signatures: Signatures,
    pending: Vec<PendingRecord>,
    genesis: Option<AdminSet>,
    current: Option<AdminSet>,
    chain: BTreeMap<u32, (Vec<u8>, MultiEnvelope)>,
    quotas: Option<Quotas>,
    bindings: BTreeMap<String, BindingEntry>,
    records: BTreeMap<Names, StoredRecord>,
    tombstones: BTreeMap<Names, StoredTombstone>,
    clock_ms: Option<u64>,
    state_bytes: u64,
}

impl Registry {
    /// Rebuilds a registry from the pairs of [`Registry::export`] (in any order), refusing
    /// anything `apply` could not have written: unknown keys, undecodable values, values that
    /// contradict their key, signatures that do not verify, an admin chain that does not lead
    /// to the current admin set, records without a binding that authorizes them.
    pub fn load(kvs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> Result<Registry, StateError> {
        Loader::new(Signatures::Verify).run(kvs)
    }

    /// [`Registry::load`] for the pairs this node's own apply wrote to its own store (a
    /// restart): the same checks, except that record signatures, which apply verified before
    /// storing them, are not verified again. Never for a snapshot, a backup or anything else
    /// that came from outside the node.
    pub fn load_own(
        kvs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Result<Registry, StateError> {
        Loader::new(Signatures::VerifiedBeforeStoring).run(kvs)
    }
}

impl Loader {
    fn new(signatures: Signatures) -> Loader {
        Loader {
            signatures,
            ..Loader::default()
        }
    }

    fn run(
        mut self,
        kvs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Result<Registry, StateError> {
        for (key, value) in kvs {
            self.add(key, value)?;
        }
        self.add_records()?;
        self.finish()
    }

    /// Decodes and verifies the pending records (a load that verifies signatures) on up to
    /// [`LOAD_THREADS_MAX`] threads, then inserts them in scan order, so the first corrupt or
    /// duplicated record is the one reported.
    fn add_records(&mut self) -> Result<(), StateError> {
        // Only a verifying load defers records (the restart path decodes them while scanning).
        let pending = std::mem::take(&mut self.pending);
        let check = SignatureCheck::Always;
        let decode_all = |part: &[PendingRecord]| -> Vec<Result<StoredRecord, String>> {
            part.iter()
                .map(|p| decode_record(&p.service, &p.instance, &p.value, check))
                .collect()
        };
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(LOAD_THREADS_MAX);
        let decoded: Vec<Result<StoredRecord, String>> =
            if pending.len() < PARALLEL_RECORDS_MIN || threads < 2 {
                decode_all(&pending)
            } else {
                let chunk = pending.len().div_ceil(threads);
                std::thread::scope(|scope| {
                    let handles: Vec<_> = pending
                        .chunks(chunk)
                        .map(|part| scope.spawn(move || decode_all(part)))
                        .collect();
                    let mut all = Vec::with_capacity(pending.len());
                    for handle in handles {
                        match handle.join() {
                            Ok(part) => all.extend(part),
                            Err(panic) => std::panic::resume_unwind(panic),
                        }
                    }
                    all
                })
            };
        for (p, result) in pending.into_iter().zip(decoded) {
            let corrupt = |detail: String| StateError::CorruptValue {
                key: escape_key(&p.key),
                detail,
            };
            let record = result.map_err(corrupt)?;
            if !insert_new(&mut self.records, (p.service, p.instance), record) {
                return Err(corrupt("key appears twice".into()));
            }
        }
        Ok(())
    }

    fn add(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), StateError> {
        let corrupt = |detail: String| StateError::CorruptValue {
            key: escape_key(&key),
            detail,
        };
        self.state_bytes += (key.len() + value.len()) as u64;
        let inserted = match StorageKey::parse(&key)? {
            StorageKey::AdminGenesis => {
                let set = decode_admin_set(&value).map_err(corrupt)?;
                if set.version != AdminSet::GENESIS_VERSION {
                    return Err(corrupt(format!("genesis has version {}", set.version)));
                }
                fill(&mut self.genesis, set)
            }
            StorageKey::AdminCurrent => {
                let set = decode_admin_set(&value).map_err(corrupt)?;
                fill(&mut self.current, set)
            }
            StorageKey::AdminChain { index } => {
                let stored: StoredChainEntry = decode_value(&value).map_err(corrupt)?;
                let envelope =
                    decode_multi_envelope(&stored.envelope).map_err(|e| corrupt(e.to_string()))?;
                insert_new(&mut self.chain, index, (stored.envelope, envelope))
            }
            StorageKey::Quotas => {
                let quotas: Quotas = decode_value(&value).map_err(corrupt)?;
                if quotas.instances_per_service_max == 0
                    || quotas.services_max == 0
                    || quotas.state_bytes_max == 0
                {
                    return Err(corrupt(format!("a quota is zero: {quotas:?}")));
                }
                fill(&mut self.quotas, quotas)
            }
            StorageKey::Binding { service } => {
                let entry = decode_binding(&service, &value).map_err(corrupt)?;
                insert_new(&mut self.bindings, service, entry)
            }
            StorageKey::Record { service, instance }
                if self.signatures == Signatures::VerifiedBeforeStoring =>
            {
                // Nothing to verify, so decoding is cheap: decode now and let the scanned
                // value go, which keeps a restart's peak memory at the registry's size.
                let check = SignatureCheck::VerifiedBeforeStoring;
                let record = decode_record(&service, &instance, &value, check).map_err(corrupt)?;
                insert_new(&mut self.records, (service, instance), record)
            }
            StorageKey::Record { service, instance } => {
                self.pending.push(PendingRecord {
                    key: key.clone(),
                    service,
                    instance,
                    value,
                });
                true
            }
            StorageKey::Clock => {
                let clock: u64 = decode_value(&value).map_err(corrupt)?;
                if clock == 0 {
                    return Err(corrupt("a clock of 0 is never stored".into()));
                }
                fill(&mut self.clock_ms, clock)
            }
            StorageKey::Tombstone { service, instance } => {
                let tombstone: StoredTombstone = decode_value(&value).map_err(corrupt)?;
                if tombstone.sequence == 0 {
                    return Err(corrupt("tombstone with sequence 0".into()));
                }
                insert_new(&mut self.tombstones, (service, instance), tombstone)
            }
        };
        if !inserted {
            return Err(corrupt("key appears twice".into()));
        }
        Ok(())
    }

    fn finish(self) -> Result<Registry, StateError> {
        let inconsistent = |detail: String| StateError::Inconsistent { detail };
        let admins = match (self.genesis, self.current) {
            (None, None) => {
                if !self.chain.is_empty() || self.quotas.is_some() {
                    return Err(inconsistent(
                        "admin chain or quotas without a genesis admin set".into(),
                    ));
                }
                None
            }
            (Some(genesis), Some(current)) => {
                Some(check_admins(genesis, current, self.chain).map_err(inconsistent)?)
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(inconsistent(
                    "exactly one of a/genesis and a/current is present".into(),
                ))
            }
        };
        let quotas = match (&admins, self.quotas) {
            (Some(_), Some(quotas)) => quotas,
            (Some(_), None) => return Err(inconsistent("genesis without q/quotas".into())),
            (None, _) => Quotas::default(),
        };
        if admins.is_none() && !self.bindings.is_empty() {
            return Err(inconsistent("bindings without an admin set".into()));
        }
        // I6: apply only stores bindings signed by the admin set in force, and a rotation
        // re-signs every binding whose signer it drops, so every binding verifies against the
        // current set. One that does not was forged (a snapshot from a lying leader).
        if let Some(admins) = &admins {
            for (service, entry) in &self.bindings {
                if !admins.current.contains(&entry.signer) {
                    return Err(inconsistent(format!(
                        "the binding of {service} is signed by {}, which is not in the current \
                         admin set (version {})",
                        hex::encode(entry.signer),
                        admins.current.version
                    )));
                }
            }
        }

        let mut services: BTreeMap<String, BTreeMap<String, StoredRecord>> = BTreeMap::new();
        for ((service, instance), record) in self.records {
            let bound = self
                .bindings
                .get(&service)
                .is_some_and(|b| b.binding.contains_key(&record.key));
            if !bound {
                return Err(inconsistent(format!(
                    "{service}/{instance} is signed by {}, which its binding does not hold",
                    hex::encode(record.key)
                )));
            }
            if self
                .tombstones
                .contains_key(&(service.clone(), instance.clone()))
            {
                return Err(inconsistent(format!(
                    "{service}/{instance} is both live and tombstoned"
                )));
            }
            services
                .entry(service)
                .or_default()
                .insert(instance, record);
        }
        let tombstones_due: BTreeSet<(u64, String, String)> = self
            .tombstones
            .iter()
            .map(|((service, instance), t)| {
                (
                    t.issued_at_max_ms.saturating_add(MAX_AGE_MS + MAX_SKEW_MS),
                    service.clone(),
                    instance.clone(),
                )
            })
            .collect();
        let commitment = Commitment::build(
            self.bindings
                .iter()
                .map(|(service, entry)| (service, entry.stored.envelope.as_slice())),
            &services,
        );
        Ok(Registry {
            commitment,
            admins,
            quotas,
            bindings: self.bindings,
            services,
            tombstones: self.tombstones,
            tombstones_due,
            state_bytes: self.state_bytes,
            clock_ms: self.clock_ms.unwrap_or(0),
        })
    }
}

fn check_admins(
    genesis: AdminSet,
    current: AdminSet,
    chain: BTreeMap<u32, (Vec<u8>, MultiEnvelope)>,
) -> Result<Admins, String> {
    if chain.len() > ADMIN_CHAIN_ENTRIES_MAX {
        return Err(format!(
            "admin chain has {} entries, above the maximum of {ADMIN_CHAIN_ENTRIES_MAX}",
            chain.len()
        ));
    }
    // Keys are 0..n without gaps exactly when the largest index is n - 1.
    if let Some((&last, _)) = chain.last_key_value() {
        if last as usize + 1 != chain.len() {
            return Err(format!(
                "admin chain has {} entries but its last index is {last}",
                chain.len()
            ));
        }
    }
    let (encoded, decoded): (Vec<Vec<u8>>, Vec<MultiEnvelope>) = chain.into_values().unzip();
    let followed =
        verify_admin_chain(&genesis, &decoded).map_err(|e| format!("admin chain: {e}"))?;
    if followed != current {
        return Err(format!(
            "admin chain ends at version {}, a/current is version {}",
            followed.version, current.version
        ));
    }
    Ok(Admins {
        genesis,
        current,
        chain: encoded,
    })
}

fn decode_admin_set(value: &[u8]) -> Result<AdminSet, String> {
    let stored: StoredAdminSet = decode_value(value)?;
    AdminSet::new(&stored.keys, stored.threshold, stored.version).map_err(|e| e.to_string())
}

fn decode_binding(service: &str, value: &[u8]) -> Result<BindingEntry, String> {
    let stored: StoredBinding = decode_value(value)?;
    let envelope = decode_envelope(&stored.envelope).map_err(|e| e.to_string())?;
    let verified = open_binding(&envelope).map_err(|e| e.to_string())?;
    let binding = verified.payload;
    if binding.service != service {
        return Err(format!("binding is for {:?}", binding.service));
    }
    Ok(BindingEntry {
        binding,
        stored,
        signer: verified.key,
    })
}

fn decode_record(
    service: &str,
    instance: &str,
    value: &[u8],
    check: SignatureCheck<'_>,
) -> Result<StoredRecord, String> {
    let record: StoredRecord = decode_value(value)?;
    let envelope = decode_envelope(&record.envelope).map_err(|e| e.to_string())?;
    let verified = open_record_with(&envelope, check).map_err(|e| e.to_string())?;
    let payload = &verified.payload;
    let agrees = payload.service == service
        && payload.instance == instance
        && payload.sequence == record.sequence
        && payload.issued_at_ms == record.issued_at_ms
        && payload.ttl_secs == record.ttl_secs
        && verified.key == record.key
        && record.issued_at_max_ms >= record.issued_at_ms;
    if !agrees {
        return Err(format!(
            "stored fields disagree with the signed record {}/{} sequence {}",
            payload.service, payload.instance, payload.sequence
        ));
    }
    Ok(record)
}

/// Fills an empty slot; `false` if it was already filled (a duplicate key).
fn fill<T>(slot: &mut Option<T>, value: T) -> bool {
    if slot.is_some() {
        return false;
    }
    *slot = Some(value);
    true
}

/// Inserts a new key; `false` if it was already present (a duplicate key).
fn insert_new<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: V) -> bool {
    match map.entry(key) {
        Entry::Occupied(_) => false,
        Entry::Vacant(slot) => {
            slot.insert(value);
            true
        }
    }
}
