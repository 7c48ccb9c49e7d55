//! `Registry::apply`: one command in, one outcome and the writes it caused out.
//!
//! Every handler checks everything first and mutates only after the last check has passed, so
//! a rejection leaves the state untouched; `apply` asserts that.

use std::collections::BTreeMap;

use prost::Message;
use signpost_record::{
    decode_envelope, decode_multi_envelope, open_admin_set, open_binding, open_deregister_with,
    open_record_with, AdminSet, Reason, RecordError, SignatureCheck, VerifiedSignatures,
    ADMIN_CHAIN_ENTRIES_MAX, PUBLIC_KEY_BYTES,
};

use super::{Admins, BindingEntry, Registry};
use crate::applied::{Applied, Change, Event, EventKind, Outcome};
use crate::audit::audit_leaf;
use crate::request::{Command, Quotas, Request};
use crate::storage_key::StorageKey;
use crate::stored::{
    encode_value, encoded_len, StoredAdminSet, StoredBinding, StoredChainEntry, StoredRecord,
    StoredTombstone,
};

/// How far a signer's `issued_at_ms` may be ahead of the leader's `time_ms`.
pub const MAX_SKEW_MS: u64 = 30_000;
/// How far a signer's `issued_at_ms` may be behind the leader's `time_ms`.
pub const MAX_AGE_MS: u64 = 300_000;
/// Most tombstones one apply drops; the rest wait for the next apply, so no single entry does
/// unbounded work.
pub const TOMBSTONE_DROPS_PER_APPLY_MAX: usize = 1024;
/// The alarm raised while the state is at or above its byte quota.
pub const NOSPACE: &str = "NOSPACE";

type Rejection = RecordError;

fn reject<T>(reason: Reason, detail: impl Into<String>) -> Result<T, Rejection> {
    Err(RecordError::new(reason, detail))
}

/// The writes and events of the apply in progress.
struct Txn<'a> {
    revision: u64,
    time_ms: u64,
    changes: Vec<Change>,
    events: Vec<Event>,
    signatures: SignatureCheck<'a>,
}

impl Txn<'_> {
    fn event(
        &mut self,
        kind: EventKind,
        service: &str,
        instance: &str,
        signed: Option<(Vec<u8>, Vec<u8>)>,
    ) {
        let (record, binding) = signed.unzip();
        // Numbered within this request; apply_entry renumbers across a batch.
        let position = u32::try_from(self.events.len()).unwrap_or(u32::MAX);
        self.events.push(Event {
            revision: self.revision,
            position,
            kind,
            service: service.to_owned(),
            instance: instance.to_owned(),
            record,
            binding,
        });
    }
}

/// After this time a tombstone may go: any write it guards against carries an `issued_at_ms` of
/// at most `issued_at_max_ms`, and is refused as expired by every leader whose clock is within
/// `MAX_SKEW_MS` of the one that dropped it.
fn tombstone_due_ms(issued_at_max_ms: u64) -> u64 {
    issued_at_max_ms.saturating_add(MAX_AGE_MS + MAX_SKEW_MS)
}

impl Registry {
    /// Applies one log entry at `revision` (its log index). Reads nothing but its arguments and
    /// the registry, so every replica computes the same [`Applied`].
    pub fn apply(&mut self, revision: u64, request: &Request) -> Applied {
        self.apply_with(revision, request, None)
    }

    /// Applies one log entry at `revision`: its request, or each request of a
    /// [`Command::Batch`] in order, all at that revision. One [`Applied`] per request, in order;
    /// each request is atomic on its own (a refused one changes nothing, the others apply).
    pub fn apply_entry(
        &mut self,
        revision: u64,
        request: &Request,
        verified: Option<&VerifiedSignatures>,
    ) -> Vec<Applied> {
        let Command::Batch { requests } = &request.command else {
            return vec![self.apply_with(revision, request, verified)];
        };
        let mut applied: Vec<Applied> = requests
            .iter()
            .enumerate()
            .map(|(position, inner)| {
                let position = u32::try_from(position).unwrap_or(u32::MAX);
                match inner.command {
                    Command::Batch { .. } | Command::Genesis { .. } => {
                        let outcome = Outcome::Rejected {
                            reason: Reason::Malformed,
                            detail: "a batch may not hold a genesis or another batch".into(),
                        };
                        let time_ms = inner.time_ms.max(self.clock_ms);
                        Applied {
                            audit: self.audit_leaf(revision, position, time_ms, inner, &outcome),
                            outcome,
                            changes: Vec::new(),
                            events: Vec::new(),
                        }
                    }
                    _ => self.apply_one(revision, position, inner, verified),
                }
            })
            .collect();
        // All events of the entry share its revision; their order in it tells them apart (two
        // requests of one batch may change the same instance).
        for (position, event) in applied.iter_mut().flat_map(|a| &mut a.events).enumerate() {
            event.position = u32::try_from(position).unwrap_or(u32::MAX);
        }
        applied
    }

    /// [`Registry::apply`] that skips verifying a record or deregistration signature this node
    /// already verified on the same bytes (its admission check, see [`VerifiedSignatures`]).
    /// The result is the same as `apply`'s: the cache only remembers successes of the same
    /// pure check.
    pub fn apply_with(
        &mut self,
        revision: u64,
        request: &Request,
        verified: Option<&VerifiedSignatures>,
    ) -> Applied {
        self.apply_one(revision, 0, request, verified)
    }

    /// The audit record of `request` (see [`audit_leaf`]), carrying the state commitment's root
    /// as the request left it.
    fn audit_leaf(
        &self,
        revision: u64,
        position: u32,
        time_ms: u64,
        request: &Request,
        outcome: &Outcome,
    ) -> Option<Vec<u8>> {
        audit_leaf(
            revision,
            position,
            time_ms,
            request,
            outcome,
            &self.commitment.root(),
        )
    }

    /// [`Registry::apply_with`] of the `position`-th request of the entry at `revision`.
    fn apply_one(
        &mut self,
        revision: u64,
        position: u32,
        request: &Request,
        verified: Option<&VerifiedSignatures>,
    ) -> Applied {
        // Time in apply never runs backwards (I3): an entry stamped before the largest time
        // already applied is applied at that time, so a tombstone dropped under one leader's
        // clock stays dropped only for writes that are too old under every later leader.
        let mut txn = Txn {
            revision,
            time_ms: request.time_ms.max(self.clock_ms),
            changes: Vec::new(),
            events: Vec::new(),
            signatures: verified.map_or(SignatureCheck::Always, SignatureCheck::Reuse),
        };
        let result = match &request.command {
            Command::Genesis {
                admin_keys,
                admin_threshold,
                quotas,
            } => self.genesis_command(&mut txn, admin_keys, *admin_threshold, quotas),
            Command::Register { envelope } => self.register(&mut txn, envelope),
            Command::Deregister { envelope } => self.deregister(&mut txn, envelope),
            Command::Bind { envelope } => self.bind(&mut txn, envelope),
            Command::RotateAdmins { envelope, rebinds } => {
                self.rotate_admins(&mut txn, envelope, rebinds)
            }
            Command::Expire {
                service,
                instance,
                sequence,
            } => self.expire(&mut txn, service, instance, *sequence),
            Command::Noop => Ok(()),
            Command::Batch { .. } => reject(
                Reason::Malformed,
                "a batch is applied request by request (Registry::apply_entry), not as one",
            ),
        };
        match result {
            Ok(()) => {
                self.drop_due_tombstones(&mut txn);
                self.advance_clock(&mut txn);
                let outcome = Outcome::Applied { revision };
                Applied {
                    audit: self.audit_leaf(revision, position, txn.time_ms, request, &outcome),
                    outcome,
                    changes: txn.changes,
                    events: txn.events,
                }
            }
            Err(error) => {
                assert!(
                    txn.changes.is_empty() && txn.events.is_empty(),
                    "invariant: a rejected command ({}) must not write state",
                    error.reason()
                );
                let outcome = Outcome::Rejected {
                    reason: error.reason(),
                    detail: error.detail(),
                };
                Applied {
                    audit: self.audit_leaf(revision, position, txn.time_ms, request, &outcome),
                    outcome,
                    changes: Vec::new(),
                    events: Vec::new(),
                }
            }
        }
    }

    fn genesis_command(
        &mut self,
        txn: &mut Txn<'_>,
        admin_keys: &[[u8; PUBLIC_KEY_BYTES]],
        admin_threshold: u32,
        quotas: &Quotas,
    ) -> Result<(), Rejection> {
        if let Some(admins) = &self.admins {
            return reject(
                Reason::AlreadyInitialized,
                format!(
                    "genesis already applied; the admin set is at version {}",
                    admins.current.version
                ),
            );
        }
        let genesis = AdminSet::new(admin_keys, admin_threshold, AdminSet::GENESIS_VERSION)?;
        if quotas.instances_per_service_max == 0
            || quotas.services_max == 0
            || quotas.state_bytes_max == 0
        {
            return reject(
                Reason::InvalidField,
                format!("every quota must be at least 1: {quotas:?}"),
            );
        }
        let stored = encode_value(&StoredAdminSet::from_admin_set(&genesis));
        self.write(txn, StorageKey::AdminGenesis, None, Some(stored.clone()));
        self.write(txn, StorageKey::AdminCurrent, None, Some(stored));
        self.write(txn, StorageKey::Quotas, None, Some(encode_value(quotas)));
        self.quotas = *quotas;
        self.admins = Some(Admins {
            current: genesis.clone(),
            genesis,
            chain: Vec::new(),
        });
        Ok(())
    }

    fn register(&mut self, txn: &mut Txn<'_>, bytes: &[u8]) -> Result<(), Rejection> {
        let envelope = decode_envelope(bytes)?;
        let verified = open_record_with(&envelope, txn.signatures)?;
        let payload = &verified.payload;
        let (service, instance) = (payload.service.as_str(), payload.instance.as_str());
        self.authorize(service, &verified.key, txn.time_ms, false)?;
        check_sequence(
            service,
            instance,
            payload.sequence,
            self.last_sequence(service, instance),
        )?;
        check_issued_at(payload.issued_at_ms, txn.time_ms)?;

        // The envelope wrapper is not signed, so it is stored re-encoded (unknown fields
        // dropped); the signed payload bytes inside are kept exactly.
        let record = StoredRecord {
            envelope: envelope.encode_to_vec(),
            sequence: payload.sequence,
            key: verified.key,
            issued_at_ms: payload.issued_at_ms,
            issued_at_max_ms: payload
                .issued_at_ms
                .max(self.issued_at_max_seen(service, instance)),
            ttl_secs: payload.ttl_secs,
            revision: txn.revision,
        };
        self.check_register_quotas(service, instance, &record)?;

        let event_record = record.envelope.clone();
        // authorize() found the binding, so it is there; watchers verify the record against
        // the binding in force now, which a later rotation or re-bind may replace.
        let event_binding = self
            .bindings
            .get(service)
            .map(|b| b.stored.envelope.clone())
            .unwrap_or_default();
        self.put_record(txn, service, instance, record);
        txn.event(
            EventKind::Put,
            service,
            instance,
            Some((event_record, event_binding)),
        );
        Ok(())
    }

    fn deregister(&mut self, txn: &mut Txn<'_>, bytes: &[u8]) -> Result<(), Rejection> {
        let envelope = decode_envelope(bytes)?;
        let verified = open_deregister_with(&envelope, txn.signatures)?;
        let payload = &verified.payload;
        let (service, instance) = (payload.service.as_str(), payload.instance.as_str());
        self.authorize(service, &verified.key, txn.time_ms, true)?;
        let Some(live) = self.services.get(service).and_then(|s| s.get(instance)) else {
            return reject(
                Reason::NotFound,
                format!("{service}/{instance} is not registered"),
            );
        };
        check_sequence(service, instance, payload.sequence, Some(live.sequence))?;
        check_issued_at(payload.issued_at_ms, txn.time_ms)?;
        let issued_at_max_ms = live.issued_at_max_ms.max(payload.issued_at_ms);
        self.bury(txn, service, instance, payload.sequence, issued_at_max_ms);
        Ok(())
    }

    fn bind(&mut self, txn: &mut Txn<'_>, bytes: &[u8]) -> Result<(), Rejection> {
        let Some(admins) = &self.admins else {
            return reject(Reason::NoAdminSet, "bind before genesis");
        };
        let entry = self.checked_binding(&admins.current, txn.revision, bytes)?;
        self.install_binding(txn, entry);
        Ok(())
    }

    /// Everything a binding must pass before it may replace the service's current one: it
    /// decodes, its signature verifies, `admins` holds its signer, and its version is above
    /// the current binding's.
    fn checked_binding(
        &self,
        admins: &AdminSet,
        revision: u64,
        bytes: &[u8],
    ) -> Result<BindingEntry, Rejection> {
        let envelope = decode_envelope(bytes)?;
        let verified = open_binding(&envelope)?;
        let binding = verified.payload;
        if !admins.contains(&verified.key) {
            return reject(
                Reason::NotAdmin,
                format!(
                    "binding of {} is signed by {}, not in admin set version {}",
                    binding.service,
                    hex::encode(verified.key),
                    admins.version
                ),
            );
        }
        if let Some(old) = self.bindings.get(&binding.service) {
            if binding.version <= old.binding.version {
                return reject(
                    Reason::StaleVersion,
                    format!(
                        "binding of {} has version {}, current is {}",
                        binding.service, binding.version, old.binding.version
                    ),
                );
            }
        }
        Ok(BindingEntry {
            binding,
            stored: StoredBinding {
                envelope: envelope.encode_to_vec(),
                revision,
            },
            signer: verified.key,
        })
    }

    /// Stores a checked binding. Key rotation: records signed by a key the new binding drops
    /// lose their authority now, not when their leases run out.
    fn install_binding(&mut self, txn: &mut Txn<'_>, entry: BindingEntry) {
        let unbound: Vec<(String, u64, u64)> = self
            .services
            .get(&entry.binding.service)
            .into_iter()
            .flatten()
            .filter(|(_, record)| !entry.binding.contains_key(&record.key))
            .map(|(instance, record)| (instance.clone(), record.sequence, record.issued_at_max_ms))
            .collect();
        let service = entry.binding.service.clone();
        self.put_binding(txn, entry);
        for (instance, sequence, issued_at_max_ms) in unbound {
            self.bury(txn, &service, &instance, sequence, issued_at_max_ms);
        }
    }

    fn rotate_admins(
        &mut self,
        txn: &mut Txn<'_>,
        bytes: &[u8],
        rebinds: &[Vec<u8>],
    ) -> Result<(), Rejection> {
        let Some(admins) = &self.admins else {
            return reject(Reason::NoAdminSet, "admin rotation before genesis");
        };
        if admins.chain.len() >= ADMIN_CHAIN_ENTRIES_MAX {
            return reject(
                Reason::InvalidField,
                format!("the admin chain holds its maximum of {ADMIN_CHAIN_ENTRIES_MAX} rotations"),
            );
        }
        let envelope = decode_multi_envelope(bytes)?;
        let next = open_admin_set(&envelope, &admins.current)?;
        let rebound = self.checked_rebinds(&next, txn.revision, rebinds)?;
        let index = u32::try_from(admins.chain.len())
            .unwrap_or_else(|_| panic!("invariant: admin chain is bounded far below u32"));
        let chain_entry = envelope.encode_to_vec();
        let old_len = encoded_len(&StoredAdminSet::from_admin_set(&admins.current));
        self.write(
            txn,
            StorageKey::AdminChain { index },
            None,
            Some(encode_value(&StoredChainEntry {
                envelope: chain_entry.clone(),
            })),
        );
        self.write(
            txn,
            StorageKey::AdminCurrent,
            Some(old_len),
            Some(encode_value(&StoredAdminSet::from_admin_set(&next))),
        );
        if let Some(admins) = &mut self.admins {
            admins.chain.push(chain_entry);
            admins.current = next;
        }
        for entry in rebound.into_values() {
            self.install_binding(txn, entry);
        }
        Ok(())
    }

    /// The re-signed bindings of a rotation to `next`: each a valid binding of a bound service
    /// by a key of `next`, at most one per service, and together covering every binding whose
    /// signer `next` drops. Without that, clients (which verify bindings against the current
    /// admin set) would stop trusting those services the moment the rotation applies.
    fn checked_rebinds(
        &self,
        next: &AdminSet,
        revision: u64,
        rebinds: &[Vec<u8>],
    ) -> Result<BTreeMap<String, BindingEntry>, Rejection> {
        if rebinds.len() > self.bindings.len() {
            return reject(
                Reason::InvalidField,
                format!(
                    "{} re-signed bindings for {} bound services",
                    rebinds.len(),
                    self.bindings.len()
                ),
            );
        }
        let mut rebound = BTreeMap::new();
        for (index, bytes) in rebinds.iter().enumerate() {
            let entry = self.checked_binding(next, revision, bytes).map_err(|e| {
                RecordError::new(
                    e.reason(),
                    format!("re-signed binding {index}: {}", e.detail()),
                )
            })?;
            let service = entry.binding.service.clone();
            if !self.bindings.contains_key(&service) {
                return reject(
                    Reason::NoBinding,
                    format!("re-signed binding {index} is for {service}, which has no binding"),
                );
            }
            if rebound.insert(service.clone(), entry).is_some() {
                return reject(
                    Reason::InvalidField,
                    format!("the rotation re-signs {service} twice"),
                );
            }
        }
        let orphaned = self
            .bindings
            .iter()
            .filter(|(service, entry)| {
                !next.contains(&entry.signer) && !rebound.contains_key(*service)
            })
            .map(|(service, _)| service.as_str())
            .collect::<Vec<_>>();
        if let Some(first) = orphaned.first() {
            return reject(
                Reason::RotationIncomplete,
                format!(
                    "{} binding(s) are signed by a key that leaves the admin set at version {} \
                     and are not re-signed by the rotation (first: {first}); re-sign them with a \
                     key of the new set, or first add the new keys, re-bind, then drop the old",
                    orphaned.len(),
                    next.version
                ),
            );
        }
        Ok(rebound)
    }

    fn expire(
        &mut self,
        txn: &mut Txn<'_>,
        service: &str,
        instance: &str,
        sequence: u64,
    ) -> Result<(), Rejection> {
        let Some(live) = self.services.get(service).and_then(|s| s.get(instance)) else {
            return reject(
                Reason::NotFound,
                format!("{service}/{instance} is not registered"),
            );
        };
        if live.sequence != sequence {
            return reject(
                Reason::StaleSequence,
                format!(
                    "{service}/{instance} is at sequence {}, expiry was for {sequence}",
                    live.sequence
                ),
            );
        }
        let issued_at_max_ms = live.issued_at_max_ms;
        self.bury(txn, service, instance, sequence, issued_at_max_ms);
        Ok(())
    }

    /// May `key` sign for `service` at `time_ms`? A bound key inside the binding's window may;
    /// so may a current admin key where `admin_may_sign`.
    fn authorize(
        &self,
        service: &str,
        key: &[u8; PUBLIC_KEY_BYTES],
        time_ms: u64,
        admin_may_sign: bool,
    ) -> Result<(), Rejection> {
        if admin_may_sign && self.admin_set().is_some_and(|admins| admins.contains(key)) {
            return Ok(());
        }
        let Some(entry) = self.bindings.get(service) else {
            return reject(Reason::NoBinding, format!("no binding for {service}"));
        };
        if !entry.binding.contains_key(key) {
            return reject(
                Reason::UnboundKey,
                format!(
                    "key {} is not bound to {service} (binding version {})",
                    hex::encode(key),
                    entry.binding.version
                ),
            );
        }
        entry.binding.check_window(time_ms)
    }

    fn issued_at_max_seen(&self, service: &str, instance: &str) -> u64 {
        if let Some(live) = self.services.get(service).and_then(|s| s.get(instance)) {
            return live.issued_at_max_ms;
        }
        self.tombstones
            .get(&(service.to_owned(), instance.to_owned()))
            .map_or(0, |t| t.issued_at_max_ms)
    }

    fn check_register_quotas(
        &self,
        service: &str,
        instance: &str,
        record: &StoredRecord,
    ) -> Result<(), Rejection> {
        let instances = self.services.get(service);
        let replaces = instances.and_then(|s| s.get(instance));
        if replaces.is_none() {
            match instances {
                Some(instances) => {
                    if instances.len() >= self.quotas.instances_per_service_max as usize {
                        return reject(
                            Reason::QuotaInstances,
                            format!(
                                "{service} has {} live instances, the maximum is {}",
                                instances.len(),
                                self.quotas.instances_per_service_max
                            ),
                        );
                    }
                }
                None => {
                    if self.services.len() >= self.quotas.services_max as usize {
                        return reject(
                            Reason::QuotaServices,
                            format!(
                                "{} services have live instances, the maximum is {}",
                                self.services.len(),
                                self.quotas.services_max
                            ),
                        );
                    }
                }
            }
        }
        let record_key_len = StorageKey::record(service, instance).encode().len() as u64;
        let added = record_key_len + encoded_len(record);
        let mut removed = replaces.map_or(0, |old| record_key_len + encoded_len(old));
        let tombstone_key = (service.to_owned(), instance.to_owned());
        if let Some(tombstone) = self.tombstones.get(&tombstone_key) {
            removed += StorageKey::tombstone(service, instance).encode().len() as u64
                + encoded_len(tombstone);
        }
        if added > removed && self.state_bytes >= self.quotas.state_bytes_max {
            return reject(
                Reason::QuotaStateBytes,
                format!(
                    "state is {} bytes, at or above the quota of {}; only writes that do not grow it are accepted",
                    self.state_bytes, self.quotas.state_bytes_max
                ),
            );
        }
        Ok(())
    }

    /// Stores a live record, replacing any previous record or tombstone of the instance.
    fn put_record(
        &mut self,
        txn: &mut Txn<'_>,
        service: &str,
        instance: &str,
        record: StoredRecord,
    ) {
        self.remove_tombstone(txn, service, instance);
        let old_len = self
            .services
            .get(service)
            .and_then(|s| s.get(instance))
            .map(encoded_len);
        self.write(
            txn,
            StorageKey::record(service, instance),
            old_len,
            Some(encode_value(&record)),
        );
        self.commitment
            .put_record(service, instance, &record.envelope);
        self.services
            .entry(service.to_owned())
            .or_default()
            .insert(instance.to_owned(), record);
    }

    /// Removes a live record and leaves a tombstone holding its last sequence, unless any
    /// replay would already be refused as expired. Emits the Delete event.
    fn bury(
        &mut self,
        txn: &mut Txn<'_>,
        service: &str,
        instance: &str,
        sequence: u64,
        issued_at_max_ms: u64,
    ) {
        let Some(instances) = self.services.get_mut(service) else {
            panic!("invariant: bury({service}/{instance}) is only called for live records");
        };
        let Some(old) = instances.remove(instance) else {
            panic!("invariant: bury({service}/{instance}) is only called for live records");
        };
        if instances.is_empty() {
            self.services.remove(service);
        }
        self.commitment.remove_record(service, instance);
        self.write(
            txn,
            StorageKey::record(service, instance),
            Some(encoded_len(&old)),
            None,
        );
        let due_ms = tombstone_due_ms(issued_at_max_ms);
        if txn.time_ms <= due_ms {
            let tombstone = StoredTombstone {
                sequence,
                issued_at_max_ms,
                revision: txn.revision,
            };
            self.write(
                txn,
                StorageKey::tombstone(service, instance),
                None,
                Some(encode_value(&tombstone)),
            );
            self.tombstones
                .insert((service.to_owned(), instance.to_owned()), tombstone);
            self.tombstones_due
                .insert((due_ms, service.to_owned(), instance.to_owned()));
        }
        txn.event(EventKind::Delete, service, instance, None);
    }

    fn remove_tombstone(&mut self, txn: &mut Txn<'_>, service: &str, instance: &str) {
        let key = (service.to_owned(), instance.to_owned());
        let Some(tombstone) = self.tombstones.remove(&key) else {
            return;
        };
        let due = (tombstone_due_ms(tombstone.issued_at_max_ms), key.0, key.1);
        assert!(
            self.tombstones_due.remove(&due),
            "invariant: every tombstone of {service}/{instance} is in the due index"
        );
        self.write(
            txn,
            StorageKey::tombstone(service, instance),
            Some(encoded_len(&tombstone)),
            None,
        );
    }

    fn put_binding(&mut self, txn: &mut Txn<'_>, entry: BindingEntry) {
        let service = entry.binding.service.clone();
        let old_len = self
            .bindings
            .get(&service)
            .map(|old| encoded_len(&old.stored));
        self.write(
            txn,
            StorageKey::binding(&service),
            old_len,
            Some(encode_value(&entry.stored)),
        );
        self.commitment
            .put_binding(&service, &entry.stored.envelope);
        self.bindings.insert(service, entry);
    }

    /// Records the entry's time as the registry's clock if it moved forward. Only applied
    /// entries move it, so a refused entry writes nothing, as ever.
    fn advance_clock(&mut self, txn: &mut Txn<'_>) {
        if txn.time_ms <= self.clock_ms {
            return;
        }
        let old_len = (self.clock_ms > 0).then(|| encoded_len(&self.clock_ms));
        self.write(
            txn,
            StorageKey::Clock,
            old_len,
            Some(encode_value(&txn.time_ms)),
        );
        self.clock_ms = txn.time_ms;
    }

    /// Drops the tombstones whose replay window has closed by `txn.time_ms`, oldest first.
    fn drop_due_tombstones(&mut self, txn: &mut Txn<'_>) {
        for _ in 0..TOMBSTONE_DROPS_PER_APPLY_MAX {
            let Some((due_ms, service, instance)) = self.tombstones_due.first().cloned() else {
                return;
            };
            if txn.time_ms <= due_ms {
                return;
            }
            self.remove_tombstone(txn, &service, &instance);
        }
    }

    /// Records one key/value write and keeps `state_bytes` equal to the export's size.
    /// `old_value_len` is the length of the value being replaced or deleted, if any.
    fn write(
        &mut self,
        txn: &mut Txn<'_>,
        key: StorageKey,
        old_value_len: Option<u64>,
        value: Option<Vec<u8>>,
    ) {
        let key = key.encode();
        let key_len = key.len() as u64;
        if let Some(old_len) = old_value_len {
            self.state_bytes = self
                .state_bytes
                .checked_sub(key_len + old_len)
                .unwrap_or_else(|| {
                    panic!("invariant: state_bytes covers every stored key and value")
                });
        }
        if let Some(value) = &value {
            self.state_bytes += key_len + value.len() as u64;
        }
        txn.changes.push(Change { key, value });
    }
}

fn check_sequence(
    service: &str,
    instance: &str,
    sequence: u64,
    last: Option<u64>,
) -> Result<(), Rejection> {
    match last {
        Some(last) if sequence <= last => reject(
            Reason::StaleSequence,
            format!("{service}/{instance}: sequence {sequence} is not above {last}"),
        ),
        _ => Ok(()),
    }
}

fn check_issued_at(issued_at_ms: u64, time_ms: u64) -> Result<(), Rejection> {
    if issued_at_ms > time_ms.saturating_add(MAX_SKEW_MS) {
        return reject(
            Reason::FutureIssuedAt,
            format!(
                "issued_at_ms {issued_at_ms} is more than {MAX_SKEW_MS} ms after the leader's {time_ms}"
            ),
        );
    }
    if issued_at_ms.saturating_add(MAX_AGE_MS) < time_ms {
        return reject(
            Reason::Expired,
            format!(
                "issued_at_ms {issued_at_ms} is more than {MAX_AGE_MS} ms before the leader's {time_ms}"
            ),
        );
    }
    Ok(())
}
