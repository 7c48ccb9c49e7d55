//! What the client believes about the cluster's audit log, and the checks every answer's audit
//! evidence must pass against it.
//!
//! The client keeps the largest quorum-signed checkpoint it has verified (`trusted`) and the
//! largest tree it has accepted answers from (`accepted`, possibly beyond the checkpoint: a
//! record applied after the last checkpoint is proven in the answering node's tree, which no
//! quorum has signed yet). Every answer must come with a checkpoint no older than the configured
//! age, signed by a majority of the bound checkpoint keys, and a tree that extends that
//! checkpoint and both of the client's trees; every record it serves must be an applied
//! registration in that tree. So a node cannot show this client a history that forks from what
//! it saw before, take it back to a smaller tree, serve answers older than the age limit, or
//! serve a record the cluster never logged.
//!
//! Each record of the log carries the root of a commitment to the whole registry state after
//! it (see `signpost_audit::StateTree`). An anchored answer proves its tree's last record, and
//! each service it serves proves its path from that root: the client rebuilds the service's
//! value from the binding and every record served, so a node cannot leave an instance out,
//! serve an older version of one, or deny that a service exists (the proof of absence of a
//! NOT_FOUND), in a tree the checkpoint covers or that a later checkpoint will check.
//!
//! A tree that no quorum has signed yet can be invented by the node that served it. It is
//! checked as soon as a later answer's checkpoint covers it: if that checkpoint's tree does not
//! extend it, the node that served it showed a forked history; the client drops it, keeps an
//! alarm naming the node (see [`crate::Client::audit_alarms`]) and goes on from the checkpoint.

use prost::Message;
use sha2::{Digest, Sha256};
use signpost_audit::{
    name_key, service_value, verify_consistency, verify_inclusion, verify_state_proof, Checkpoint,
    Hash, StateTree, Witnesses, EMPTY,
};
use signpost_proto::v1::audit_record::Op;
use signpost_proto::v1::{
    AuditEvidence, AuditEvidenceRequest, AuditRecord, Envelope, RecordInclusion, RecordPayload,
    ServiceRecords, StateProof,
};

use crate::error::ClientError;

/// Alarms kept; the oldest are dropped beyond it.
const ALARMS_MAX: usize = 64;

/// A tree accepted from one node's answer that no quorum checkpoint covers yet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Accepted {
    size: u64,
    root: Hash,
    from: String,
}

/// The client's audit state; see the module documentation.
#[derive(Debug)]
pub(crate) struct AuditTrust {
    max_age_ms: u64,
    require: bool,
    trusted: Option<Checkpoint>,
    accepted: Option<Accepted>,
    alarms: Vec<String>,
    /// The last checkpoint note whose signatures (and binding) this client verified: answers
    /// and watch events carry the same note for the 2 s until the next, and its signatures
    /// are most of a verifying client's cost per answer (three ed25519 verifications).
    verified_note: Option<VerifiedNote>,
}

/// A note verified under the binding with these exact bytes. Reused only for the same bytes, so
/// the only check it skips that depends on time is the binding's window, for at most the age
/// limit (the note's age is checked on every use).
#[derive(Debug, Clone)]
struct VerifiedNote {
    note: Vec<u8>,
    binding: Vec<u8>,
    checkpoint: Checkpoint,
}

/// What a request asked to be proven: the trust as it was then, which the answer is checked
/// against (it may have moved on meanwhile).
#[derive(Debug, Clone)]
pub(crate) struct Asked {
    trusted: Option<Checkpoint>,
    accepted: Option<Accepted>,
}

impl Asked {
    pub(crate) fn request(&self) -> AuditEvidenceRequest {
        AuditEvidenceRequest {
            prove: true,
            trusted_size: self.trusted.as_ref().map_or(0, |c| c.size),
            accepted_size: self.accepted.as_ref().map_or(0, |a| a.size),
        }
    }
}

/// An answer's evidence that passed [`AuditTrust::check`]: the tree to check its records in,
/// and what [`AuditTrust::commit`] learns from it.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    asked: Asked,
    from: String,
    /// The tree the answer was read from, as served (`None` without evidence).
    tree: Option<(u64, Hash)>,
    /// Whether that tree was proven to extend a quorum-signed checkpoint. Not when the node
    /// serves no checkpoint and this client does not demand one yet: then nothing is checked.
    anchored: bool,
    checkpoint: Option<Checkpoint>,
    /// With `anchored`: the state commitment's root the tree's last record carries, which
    /// every service served must prove its path from.
    state_root: Option<Hash>,
    /// Set when the answer's checkpoint shows the accepted tree was a fork.
    fork: Option<String>,
    /// The note this check verified (not when it matched the one verified before).
    verified_note: Option<VerifiedNote>,
}

fn hash32(bytes: &[u8], what: &str) -> Result<Hash, ClientError> {
    bytes
        .try_into()
        .map_err(|_| refused(format!("{what} is {} bytes, not 32", bytes.len())))
}

fn refused(why: String) -> ClientError {
    ClientError::Verification(format!("audit: {why}"))
}

impl AuditTrust {
    pub(crate) fn new(max_age_ms: u64, require: bool) -> AuditTrust {
        AuditTrust {
            max_age_ms,
            require,
            trusted: None,
            accepted: None,
            alarms: Vec::new(),
            verified_note: None,
        }
    }

    pub(crate) fn asked(&self) -> Asked {
        Asked {
            trusted: self.trusted.clone(),
            accepted: self.accepted.clone(),
        }
    }

    /// The largest quorum-signed checkpoint verified so far.
    pub(crate) fn trusted(&self) -> Option<&Checkpoint> {
        self.trusted.as_ref()
    }

    pub(crate) fn alarms(&self) -> &[String] {
        &self.alarms
    }

    /// Checks `evidence`, served by `from` in answer to `asked`. `witnesses` turns the served
    /// checkpoint binding into the keys whose majority must sign (verifying the binding to the
    /// admin chain is the caller's part).
    pub(crate) fn check(
        &self,
        asked: Asked,
        from: &str,
        evidence: Option<&AuditEvidence>,
        witnesses: impl FnOnce(&Envelope) -> Result<Witnesses, ClientError>,
        now_ms: u64,
    ) -> Result<Checked, ClientError> {
        let Some(evidence) = evidence.filter(|e| !e.checkpoint.is_empty()) else {
            if self.require || asked.trusted.is_some() {
                return Err(refused(format!(
                    "{from} served no quorum-signed checkpoint"
                )));
            }
            return Ok(Checked {
                asked,
                from: from.to_owned(),
                tree: evidence.and_then(|e| {
                    Some((e.tree_size, hash32(&e.root_hash, "the tree's root").ok()?))
                }),
                anchored: false,
                checkpoint: None,
                state_root: None,
                fork: None,
                verified_note: None,
            });
        };
        let binding = evidence
            .checkpoint_binding
            .as_ref()
            .ok_or_else(|| refused(format!("{from} served a checkpoint without its keys")))?;
        let binding_bytes = binding.encode_to_vec();
        let mut verified_note = None;
        let checkpoint = match &self.verified_note {
            Some(known) if known.note == evidence.checkpoint && known.binding == binding_bytes => {
                known.checkpoint.clone()
            }
            _ => {
                let signed = witnesses(binding)?
                    .verify(&evidence.checkpoint)
                    .map_err(|e| {
                        refused(format!(
                            "{from} served a checkpoint that does not verify: {e}"
                        ))
                    })?;
                verified_note = Some(VerifiedNote {
                    note: evidence.checkpoint.clone(),
                    binding: binding_bytes,
                    checkpoint: signed.checkpoint.clone(),
                });
                signed.checkpoint
            }
        };
        let age_ms = now_ms.saturating_sub(checkpoint.time_ms);
        if age_ms > self.max_age_ms {
            return Err(refused(format!(
                "{from} served a checkpoint {:.1} s old; at most {:.1} s is accepted",
                age_ms as f64 / 1000.0,
                self.max_age_ms as f64 / 1000.0
            )));
        }
        let size = evidence.tree_size;
        let root = hash32(&evidence.root_hash, "the tree's root")?;
        if checkpoint.size > size {
            return Err(refused(format!(
                "{from} read its answer from a tree of {size} records, below its own checkpoint of {}",
                checkpoint.size
            )));
        }
        verify_consistency(
            checkpoint.size,
            &checkpoint.root,
            size,
            &root,
            &evidence.checkpoint_consistency,
        )
        .map_err(|e| refused(format!("{from}'s tree does not extend its checkpoint: {e}")))?;
        if let Some(trusted) = &asked.trusted {
            if trusted.size > size {
                return Err(refused(format!(
                    "{from} answered from a tree of {size} records; this client already verified a checkpoint of {} (rolled back)",
                    trusted.size
                )));
            }
            verify_consistency(
                trusted.size,
                &trusted.root,
                size,
                &root,
                &evidence.trusted_consistency,
            )
            .map_err(|e| {
                refused(format!(
                    "{from}'s tree does not extend the checkpoint of {} records this client verified (a forked history): {e}",
                    trusted.size
                ))
            })?;
        }
        let mut fork = None;
        if let Some(accepted) = asked.accepted.as_ref().filter(|a| a.size <= size) {
            let extends = verify_consistency(
                accepted.size,
                &accepted.root,
                size,
                &root,
                &evidence.accepted_consistency,
            );
            match extends {
                Ok(()) => {}
                // A quorum signed a tree that covers the accepted one and does not contain it:
                // the node that served the accepted tree lied.
                Err(e) if checkpoint.size >= accepted.size => {
                    fork = Some(format!(
                        "{} served a tree of {} records that the quorum-signed checkpoint of {} records (served by {from}) does not extend: a forked history ({e})",
                        accepted.from, accepted.size, checkpoint.size
                    ));
                }
                Err(e) => {
                    return Err(refused(format!(
                        "{from}'s tree does not extend the tree of {} records accepted from {}, and no checkpoint covers either yet: {e}",
                        accepted.size, accepted.from
                    )))
                }
            }
        }
        let state_root = head_state_root(from, evidence, size, &root)?;
        Ok(Checked {
            asked,
            from: from.to_owned(),
            tree: Some((size, root)),
            anchored: true,
            checkpoint: Some(checkpoint),
            state_root: Some(state_root),
            fork,
            verified_note,
        })
    }

    /// Learns from an answer that passed [`AuditTrust::check`] (and whose records did): a larger
    /// checkpoint, a larger accepted tree, a fork it revealed.
    pub(crate) fn commit(&mut self, checked: Checked) {
        if let Some(note) = checked.verified_note {
            self.verified_note = Some(note);
        }
        if let Some(fork) = checked.fork {
            tracing::error!(alarm = %fork, "audit: a node served a forked history");
            if self.alarms.len() >= ALARMS_MAX {
                self.alarms.remove(0);
            }
            self.alarms.push(fork);
            if self.accepted == checked.asked.accepted {
                self.accepted = None;
            }
        }
        if let Some(checkpoint) = checked.checkpoint {
            if self
                .trusted
                .as_ref()
                .is_none_or(|t| checkpoint.size > t.size)
            {
                self.trusted = Some(checkpoint);
            }
        }
        let trusted_size = self.trusted.as_ref().map_or(0, |c| c.size);
        // The accepted tree this answer was checked against is covered by the checkpoint now
        // trusted: nothing left to confirm.
        if self.accepted == checked.asked.accepted
            && self
                .accepted
                .as_ref()
                .is_some_and(|a| a.size <= trusted_size)
        {
            self.accepted = None;
        }
        if let (Some((size, root)), true) = (checked.tree, checked.anchored) {
            let known = self.accepted.as_ref().map_or(trusted_size, |a| a.size);
            if size > known.max(trusted_size) {
                self.accepted = Some(Accepted {
                    size,
                    root,
                    from: checked.from,
                });
            }
        }
    }
}

/// The state root carried by the last record of the tree of `size` records with `root`, as
/// `evidence` proves it.
fn head_state_root(
    from: &str,
    evidence: &AuditEvidence,
    size: u64,
    root: &Hash,
) -> Result<Hash, ClientError> {
    if evidence.head_leaf.is_empty() || size == 0 {
        return Err(refused(format!(
            "{from} cannot prove the state its answer was read from (no last record of its tree)"
        )));
    }
    verify_inclusion(
        &evidence.head_leaf,
        size - 1,
        size,
        root,
        &evidence.head_inclusion,
    )
    .map_err(|e| {
        refused(format!(
            "{from}'s last record is not the last of its tree of {size}: {e}"
        ))
    })?;
    let head = AuditRecord::decode(evidence.head_leaf.as_slice())
        .map_err(|e| refused(format!("{from}'s last record does not decode: {e}")))?;
    hash32(&head.state_root, "the last record's state root")
}

impl Checked {
    /// Checks that `records` is the whole of its service (binding and every live record) in
    /// the state the answer was read from, or, with neither, that the service does not exist
    /// there. Nothing to check when the answer has no checkpoint.
    pub(crate) fn check_service(&self, records: &ServiceRecords) -> Result<(), ClientError> {
        let Some(state_root) = &self.state_root else {
            return Ok(());
        };
        let service = &records.service;
        let proof = records.state.as_ref().ok_or_else(|| {
            refused(format!(
                "{} served {service} without a proof that it is the whole service",
                self.from
            ))
        })?;
        let proof = decode_state_proof(proof)?;
        let value = if records.binding.is_none() && records.records.is_empty() {
            None
        } else {
            let binding = records
                .binding
                .as_ref()
                .map_or(EMPTY, |b| Sha256::digest(b.encode_to_vec()).into());
            let mut entries = Vec::with_capacity(records.records.len());
            for envelope in &records.records {
                let payload = RecordPayload::decode(envelope.payload.as_slice())
                    .map_err(|e| refused(format!("a record of {service} does not decode: {e}")))?;
                let digest: Hash = Sha256::digest(envelope.encode_to_vec()).into();
                entries.push((name_key(&payload.instance), digest));
            }
            let instances = StateTree::from_entries(entries).map_err(|e| {
                refused(format!(
                    "{} served {service} with an instance twice: {e}",
                    self.from
                ))
            })?;
            Some(service_value(&binding, &instances.root()))
        };
        let key = name_key(service);
        let mut proof = proof;
        // A present service's entry is the one just rebuilt: the node does not send it.
        if let (Some(value), None) = (&value, &proof.leaf) {
            proof.leaf = Some((key, *value));
        }
        verify_state_proof(state_root, &key, value.as_ref(), &proof).map_err(|e| {
            let what = if value.is_some() {
                "is not the whole current state of the service (an instance left out, or an older version served)"
            } else {
                "does not prove the service absent"
            };
            refused(format!(
                "{}'s answer for {service} {what}: {e}",
                self.from
            ))
        })
    }
}

fn decode_state_proof(proof: &StateProof) -> Result<signpost_audit::StateProof, ClientError> {
    if proof.siblings.len() > signpost_audit::KEY_BITS {
        return Err(refused(format!(
            "a state proof of {} siblings",
            proof.siblings.len()
        )));
    }
    let siblings = proof
        .siblings
        .iter()
        .map(|h| hash32(h, "a state proof's sibling"))
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = if proof.other_key.is_empty() && proof.other_value.is_empty() {
        None
    } else {
        Some((
            hash32(&proof.other_key, "a state proof's entry key")?,
            hash32(&proof.other_value, "a state proof's entry value")?,
        ))
    };
    Ok(signpost_audit::StateProof { siblings, leaf })
}

impl Checked {
    /// The tree the answer was read from (size, root), if it came with evidence.
    pub(crate) fn tree(&self) -> Option<(u64, Hash)> {
        self.tree
    }

    /// Checks that `envelope`, the record of `service`/`instance` at `sequence`, is an applied
    /// registration in the answer's tree, as `inclusion` proves. Nothing to check when the
    /// answer has no checkpoint (see [`AuditTrust::check`]).
    pub(crate) fn check_record(
        &self,
        service: &str,
        instance: &str,
        sequence: u64,
        envelope: &Envelope,
        inclusion: Option<&RecordInclusion>,
    ) -> Result<(), ClientError> {
        let (Some((size, root)), true) = (&self.tree, self.anchored) else {
            return Ok(());
        };
        let name = format!("{service}/{instance}");
        let inclusion = inclusion.filter(|i| !i.leaf.is_empty()).ok_or_else(|| {
            refused(format!(
                "{} cannot prove {name} sequence {sequence} is in the audit log",
                self.from
            ))
        })?;
        let record = AuditRecord::decode(inclusion.leaf.as_slice())
            .map_err(|e| refused(format!("the audit leaf of {name} does not decode: {e}")))?;
        let digest = Sha256::digest(envelope.encode_to_vec());
        let matches = record.op == Op::Register as i32
            && record.applied
            && record.service == service
            && record.instance == instance
            && record.sequence == sequence
            && record.envelope_sha256.as_slice() == digest.as_slice();
        if !matches {
            return Err(refused(format!(
                "the audit leaf {} served for {name} sequence {sequence} is another command ({} {}/{} sequence {}, applied {})",
                inclusion.index,
                Op::try_from(record.op).map_or("unknown op", |op| op.as_str_name()),
                record.service, record.instance, record.sequence, record.applied
            )));
        }
        verify_inclusion(
            &inclusion.leaf,
            inclusion.index,
            *size,
            root,
            &inclusion.hashes,
        )
        .map_err(|e| {
            refused(format!(
                "{name} is not in the tree of {size} records {} served: {e}",
                self.from
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ed25519_dalek::SigningKey;
    use signpost_audit::{
        consistency_proof, inclusion_proof, leaf_hash, CheckpointSigner, Frontier, NodeSource,
    };

    use super::*;

    const ORIGIN: &str = "signpost.audit/00112233aabbccdd";
    const NOW: u64 = 1_700_000_000_000;
    const MAX_AGE: u64 = 30_000;

    /// An audit log in memory: the leaves, every stored subtree hash, and the state root the
    /// next record carries.
    #[derive(Default)]
    struct Log {
        leaves: Vec<Vec<u8>>,
        frontier: Frontier,
        nodes: HashMap<(u8, u64), Hash>,
        state_root: Hash,
    }

    impl NodeSource for Log {
        fn node(&self, level: u8, index: u64) -> Result<Hash, signpost_audit::AuditError> {
            self.nodes
                .get(&(level, index))
                .copied()
                .ok_or(signpost_audit::AuditError::Missing { level, index })
        }
    }

    impl Log {
        fn append(&mut self, leaf: Vec<u8>) -> u64 {
            let index = self.leaves.len() as u64;
            for node in self.frontier.append(leaf_hash(&leaf)) {
                self.nodes.insert((node.level, node.index), node.hash);
            }
            self.leaves.push(leaf);
            index
        }

        /// A REGISTER leaf of `envelope`; returns its index.
        fn register(
            &mut self,
            service: &str,
            instance: &str,
            sequence: u64,
            envelope: &Envelope,
        ) -> u64 {
            self.append(
                AuditRecord {
                    revision: self.leaves.len() as u64 + 1,
                    op: Op::Register as i32,
                    service: service.into(),
                    instance: instance.into(),
                    applied: true,
                    sequence,
                    envelope_sha256: Sha256::digest(envelope.encode_to_vec()).to_vec(),
                    state_root: self.state_root.to_vec(),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
        }

        fn noise(&mut self, n: usize) {
            for i in 0..n {
                self.append(
                    AuditRecord {
                        revision: self.leaves.len() as u64 + 1,
                        op: Op::Bind as i32,
                        service: format!("other-{i}"),
                        applied: true,
                        state_root: self.state_root.to_vec(),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                );
            }
        }

        fn size(&self) -> u64 {
            self.leaves.len() as u64
        }

        fn root(&self) -> Hash {
            self.frontier.root()
        }

        fn consistency(&self, old: u64) -> Vec<Vec<u8>> {
            if old == 0 || old >= self.size() {
                return Vec::new();
            }
            hashes(consistency_proof(self, old, self.size()).unwrap())
        }

        fn inclusion(&self, index: u64) -> RecordInclusion {
            RecordInclusion {
                index,
                leaf: self.leaves[index as usize].clone(),
                hashes: hashes(inclusion_proof(self, index, self.size()).unwrap()),
            }
        }
    }

    fn hashes(proof: Vec<Hash>) -> Vec<Vec<u8>> {
        proof.into_iter().map(|h| h.to_vec()).collect()
    }

    struct Cluster {
        keys: Vec<SigningKey>,
        witnesses: Witnesses,
    }

    impl Cluster {
        fn new() -> Cluster {
            let keys: Vec<SigningKey> = (1..=3u8)
                .map(|i| SigningKey::from_bytes(&[i; 32]))
                .collect();
            let public: Vec<[u8; 32]> = keys.iter().map(|k| k.verifying_key().to_bytes()).collect();
            Cluster {
                witnesses: Witnesses::new(ORIGIN, &public).unwrap(),
                keys,
            }
        }

        /// A checkpoint of `log`'s first `size` records at `time_ms`, signed by `signers` of
        /// the three keys.
        fn checkpoint(&self, log: &Log, size: u64, time_ms: u64, signers: usize) -> Vec<u8> {
            let mut prefix = Log::default();
            for leaf in &log.leaves[..size as usize] {
                prefix.append(leaf.clone());
            }
            let checkpoint = Checkpoint {
                origin: ORIGIN.into(),
                size,
                root: prefix.root(),
                time_ms,
            };
            let signatures: Vec<([u8; 32], Vec<u8>)> = self.keys[..signers]
                .iter()
                .map(|k| {
                    let signer = CheckpointSigner::new(ORIGIN, k.clone());
                    (signer.public_key(), signer.sign_checkpoint(&checkpoint))
                })
                .collect();
            // Fewer than a quorum: assembled under a witness set of the first signer alone, so
            // tests can serve a note the cluster's witnesses refuse.
            let witnesses = if signers < 2 {
                Witnesses::new(ORIGIN, &[signatures[0].0]).unwrap()
            } else {
                self.witnesses.clone()
            };
            witnesses.assemble(&checkpoint, &signatures).unwrap().note
        }

        /// The evidence an honest node serves from `log` with a checkpoint at `checkpoint_size`.
        fn evidence(
            &self,
            log: &Log,
            checkpoint_size: u64,
            asked: &Asked,
            time_ms: u64,
        ) -> AuditEvidence {
            let request = asked.request();
            let head = log.inclusion(log.size() - 1);
            AuditEvidence {
                checkpoint: self.checkpoint(log, checkpoint_size, time_ms, 3),
                checkpoint_binding: Some(Envelope::default()),
                tree_size: log.size(),
                root_hash: log.root().to_vec(),
                checkpoint_consistency: log.consistency(checkpoint_size),
                trusted_consistency: log.consistency(request.trusted_size),
                accepted_consistency: log.consistency(request.accepted_size),
                head_leaf: head.leaf,
                head_inclusion: head.hashes,
            }
        }
    }

    fn envelope(tag: u8) -> Envelope {
        Envelope {
            payload: vec![tag; 8],
            signature: vec![tag; 64],
            ..Default::default()
        }
    }

    fn check(
        trust: &AuditTrust,
        cluster: &Cluster,
        from: &str,
        evidence: &AuditEvidence,
    ) -> Result<Checked, ClientError> {
        let witnesses = cluster.witnesses.clone();
        trust.check(trust.asked(), from, Some(evidence), |_| Ok(witnesses), NOW)
    }

    /// A client that took an honest answer from `log` with a checkpoint at `size`.
    fn trusting(cluster: &Cluster, log: &Log, size: u64) -> AuditTrust {
        let mut trust = AuditTrust::new(MAX_AGE, false);
        let evidence = cluster.evidence(log, size, &trust.asked(), NOW);
        trust.commit(check(&trust, cluster, "n1", &evidence).unwrap());
        trust
    }

    fn problem(result: Result<Checked, ClientError>) -> String {
        result.expect_err("the evidence was accepted").to_string()
    }

    #[test]
    fn an_honest_answer_passes_and_raises_the_trusted_checkpoint() {
        let cluster = Cluster::new();
        let mut log = Log::default();
        log.noise(5);
        let p1 = envelope(1);
        let index = log.register("payments", "p1", 7, &p1);
        log.noise(3);
        let mut trust = AuditTrust::new(MAX_AGE, false);

        let evidence = cluster.evidence(&log, 7, &trust.asked(), NOW - 1_000);
        let checked = check(&trust, &cluster, "n1", &evidence).unwrap();
        checked
            .check_record("payments", "p1", 7, &p1, Some(&log.inclusion(index)))
            .unwrap();
        trust.commit(checked);
        assert_eq!(trust.trusted().map(|c| c.size), Some(7));
        assert_eq!(trust.asked().request().accepted_size, 9);

        // The next answer, from a grown log, must extend both.
        log.noise(4);
        let evidence = cluster.evidence(&log, 12, &trust.asked(), NOW);
        let checked = check(&trust, &cluster, "n2", &evidence).unwrap();
        trust.commit(checked);
        assert_eq!(trust.trusted().map(|c| c.size), Some(12));
        assert_eq!(trust.asked().request().accepted_size, 13);
        assert!(trust.alarms().is_empty());
    }

    #[test]
    fn without_checkpoints_answers_pass_until_one_was_seen_or_one_is_required() {
        let cluster = Cluster::new();
        let mut log = Log::default();
        log.noise(4);
        let lenient = AuditTrust::new(MAX_AGE, false);
        let checked = lenient
            .check(lenient.asked(), "n1", None, |_| unreachable!(), NOW)
            .unwrap();
        // Nothing anchors the records, so none is checked.
        checked
            .check_record("s", "i", 1, &envelope(1), None)
            .unwrap();

        let strict = AuditTrust::new(MAX_AGE, true);
        assert!(
            problem(strict.check(strict.asked(), "n1", None, |_| unreachable!(), NOW))
                .contains("no quorum-signed checkpoint")
        );

        let mut seen = AuditTrust::new(MAX_AGE, false);
        let evidence = cluster.evidence(&log, 4, &seen.asked(), NOW);
        seen.commit(check(&seen, &cluster, "n1", &evidence).unwrap());
        let mut bare = evidence.clone();
        bare.checkpoint.clear();
        assert!(
            problem(seen.check(seen.asked(), "n2", Some(&bare), |_| unreachable!(), NOW))
                .contains("no quorum-signed checkpoint")
        );
    }

    #[test]
    fn a_checkpoint_past_the_age_limit_or_without_a_quorum_is_refused() {
        let cluster = Cluster::new();
        let mut log = Log::default();
        log.noise(6);
        let trust = AuditTrust::new(MAX_AGE, false);

        let at_limit = cluster.evidence(&log, 6, &trust.asked(), NOW - MAX_AGE);
        check(&trust, &cluster, "n1", &at_limit).unwrap();
        let past = cluster.evidence(&log, 6, &trust.asked(), NOW - MAX_AGE - 1);
        assert!(problem(check(&trust, &cluster, "n1", &past)).contains("s old"));

        let mut minority = at_limit.clone();
        minority.checkpoint = cluster.checkpoint(&log, 6, NOW, 1);
        assert!(problem(check(&trust, &cluster, "n1", &minority)).contains("does not verify"));
        let mut majority = at_limit;
        majority.checkpoint = cluster.checkpoint(&log, 6, NOW, 2);
        check(&trust, &cluster, "n1", &majority).unwrap();
    }

    #[test]
    fn a_tree_smaller_than_the_trusted_checkpoint_or_not_extending_it_is_refused() {
        let cluster = Cluster::new();
        let mut log = Log::default();
        log.noise(10);
        let trust = trusting(&cluster, &log, 10);

        // Rolled back: an older, genuine answer.
        let mut old = Log::default();
        old.noise(8);
        let rolled_back = cluster.evidence(&old, 8, &trust.asked(), NOW);
        assert!(problem(check(&trust, &cluster, "rogue", &rolled_back)).contains("rolled back"));

        // Forked: another history of the same length and beyond, even with a quorum-signed
        // checkpoint of its own (keys stolen from a majority would be needed for that).
        let mut fork = Log::default();
        fork.noise(9);
        fork.append(b"rewritten".to_vec());
        fork.noise(2);
        let forked = cluster.evidence(&fork, 12, &trust.asked(), NOW);
        assert!(problem(check(&trust, &cluster, "rogue", &forked)).contains("forked history"));
    }

    #[test]
    fn malformed_evidence_is_refused_with_the_reason() {
        let cluster = Cluster::new();
        let mut log = Log::default();
        log.noise(5);
        let trust = trusting(&cluster, &log, 3);
        log.noise(6);
        let good = cluster.evidence(&log, 8, &trust.asked(), NOW);
        check(&trust, &cluster, "n1", &good).unwrap();

        let mut short_root = good.clone();
        short_root.root_hash.pop();
        assert!(problem(check(&trust, &cluster, "n1", &short_root)).contains("not 32"));
        let mut bad_hash = good.clone();
        bad_hash.trusted_consistency[0][0] ^= 1;
        assert!(problem(check(&trust, &cluster, "n1", &bad_hash)).contains("forked history"));
        let mut truncated = good.clone();
        truncated.checkpoint_consistency.pop();
        assert!(problem(check(&trust, &cluster, "n1", &truncated))
            .contains("does not extend its checkpoint"));
        let mut below = good.clone();
        below.checkpoint = cluster.checkpoint(&log, 11, NOW, 3);
        below.tree_size = 10;
        assert!(problem(check(&trust, &cluster, "n1", &below)).contains("below its own checkpoint"));
        let mut garbage = good;
        garbage.checkpoint = b"not a note".to_vec();
        assert!(problem(check(&trust, &cluster, "n1", &garbage)).contains("does not verify"));
    }

    #[test]
    fn a_record_must_be_an_applied_registration_of_exactly_that_envelope_in_the_tree() {
        let cluster = Cluster::new();
        let mut log = Log::default();
        let p1 = envelope(1);
        let index = log.register("payments", "p1", 3, &p1);
        let other = log.register("payments", "p2", 3, &envelope(2));
        log.noise(2);
        let trust = AuditTrust::new(MAX_AGE, false);
        let checked = check(
            &trust,
            &cluster,
            "n1",
            &cluster.evidence(&log, 4, &trust.asked(), NOW),
        )
        .unwrap();
        let proof = log.inclusion(index);
        checked
            .check_record("payments", "p1", 3, &p1, Some(&proof))
            .unwrap();

        let missing = checked
            .check_record("payments", "p1", 3, &p1, None)
            .unwrap_err();
        assert!(missing.to_string().contains("cannot prove"), "{missing}");
        let pruned = RecordInclusion::default();
        assert!(checked
            .check_record("payments", "p1", 3, &p1, Some(&pruned))
            .is_err());
        let another_envelope = checked
            .check_record("payments", "p1", 3, &envelope(9), Some(&proof))
            .unwrap_err();
        assert!(
            another_envelope.to_string().contains("another command"),
            "{another_envelope}"
        );
        let older_sequence = checked
            .check_record("payments", "p1", 2, &p1, Some(&proof))
            .unwrap_err();
        assert!(older_sequence.to_string().contains("another command"));
        let someone_else = checked
            .check_record("payments", "p1", 3, &p1, Some(&log.inclusion(other)))
            .unwrap_err();
        assert!(someone_else.to_string().contains("another command"));
        let mut wrong_path = proof.clone();
        wrong_path.hashes[0][5] ^= 1;
        let not_in = checked
            .check_record("payments", "p1", 3, &p1, Some(&wrong_path))
            .unwrap_err();
        assert!(
            not_in.to_string().contains("is not in the tree"),
            "{not_in}"
        );
        let mut wrong_index = proof;
        wrong_index.index = 1;
        assert!(checked
            .check_record("payments", "p1", 3, &p1, Some(&wrong_index))
            .is_err());
    }

    #[test]
    fn a_tree_beyond_the_checkpoint_that_a_later_checkpoint_contradicts_raises_an_alarm() {
        let cluster = Cluster::new();
        let mut honest = Log::default();
        honest.noise(6);
        let mut trust = trusting(&cluster, &honest, 6);

        // phase 1: a rogue extends the checkpointed tree with a record of its own.
        let mut forged = Log::default();
        for leaf in &honest.leaves {
            forged.append(leaf.clone());
        }
        let evil = envelope(66);
        let index = forged.register("payments", "p1", 9, &evil);
        let served = cluster.evidence(&forged, 6, &trust.asked(), NOW);
        let checked = check(&trust, &cluster, "rogue", &served).unwrap();
        checked
            .check_record("payments", "p1", 9, &evil, Some(&forged.inclusion(index)))
            .unwrap();
        trust.commit(checked);
        assert_eq!(trust.asked().request().accepted_size, 7);

        // phase 2: an honest node whose tree is larger but not yet checkpointed past it cannot
        // decide who lied: the answer is refused, the alarm not yet raised.
        honest.noise(4);
        let undecided = cluster.evidence(&honest, 6, &trust.asked(), NOW);
        assert!(problem(check(&trust, &cluster, "n2", &undecided)).contains("no checkpoint covers"));
        assert!(trust.alarms().is_empty());

        // phase 3: once a quorum checkpoint covers it, the rogue is named and its tree dropped.
        let covered = cluster.evidence(&honest, 9, &trust.asked(), NOW);
        let checked = check(&trust, &cluster, "n2", &covered).unwrap();
        trust.commit(checked);
        assert_eq!(trust.alarms().len(), 1);
        assert!(
            trust.alarms()[0].starts_with("rogue served a tree of 7 records"),
            "{:?}",
            trust.alarms()
        );
        assert_eq!(trust.trusted().map(|c| c.size), Some(9));
        assert_eq!(trust.asked().request().accepted_size, 10);
    }

    /// A service of `instances` (instance, port) as a node serves it, with the state it is in
    /// (beside one other service): the state's root and the service's proof.
    fn service_in_state(instances: &[(&str, u16)]) -> (ServiceRecords, Hash, StateProof) {
        let binding = envelope(0xb0);
        let records: Vec<Envelope> = instances
            .iter()
            .map(|(instance, port)| Envelope {
                payload: RecordPayload {
                    service: "payments".into(),
                    instance: (*instance).into(),
                    sequence: u64::from(*port),
                    ..Default::default()
                }
                .encode_to_vec(),
                signature: vec![1; 64],
                ..Default::default()
            })
            .collect();
        let entries = records
            .iter()
            .zip(instances)
            .map(|(r, (instance, _))| {
                (name_key(instance), Sha256::digest(r.encode_to_vec()).into())
            })
            .collect();
        let value = service_value(
            &Sha256::digest(binding.encode_to_vec()).into(),
            &StateTree::from_entries(entries).unwrap().root(),
        );
        let mut state = StateTree::new();
        state.insert(name_key("payments"), value);
        state.insert(name_key("orders"), [7; 32]);
        let proof = state.prove(&name_key("payments"));
        let records = ServiceRecords {
            service: "payments".into(),
            binding: Some(binding),
            records,
            inclusions: Vec::new(),
            state: Some(StateProof {
                siblings: proof.siblings.iter().map(|h| h.to_vec()).collect(),
                ..Default::default()
            }),
        };
        let absent = state.prove(&name_key("ghost"));
        let (other_key, other_value) = absent
            .leaf
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .unwrap_or_default();
        let absence = StateProof {
            siblings: absent.siblings.iter().map(|h| h.to_vec()).collect(),
            other_key,
            other_value,
        };
        (records, state.root(), absence)
    }

    #[test]
    fn an_answer_must_prove_the_last_record_of_its_tree_and_the_state_root_it_carries() {
        let cluster = Cluster::new();
        let trust = AuditTrust::new(MAX_AGE, true);
        let mut log = Log {
            state_root: [5; 32],
            ..Log::default()
        };
        log.noise(9);
        let honest = cluster.evidence(&log, 9, &trust.asked(), NOW);
        let checked = check(&trust, &cluster, "n1", &honest).expect("honest");
        assert_eq!(checked.state_root, Some([5; 32]));

        let without = AuditEvidence {
            head_leaf: Vec::new(),
            ..honest.clone()
        };
        assert!(problem(check(&trust, &cluster, "n1", &without))
            .contains("cannot prove the state its answer was read from"));
        let not_last = AuditEvidence {
            head_leaf: log.leaves[7].clone(),
            head_inclusion: log.inclusion(7).hashes,
            ..honest.clone()
        };
        assert!(problem(check(&trust, &cluster, "n1", &not_last))
            .contains("is not the last of its tree of 9"));
        let mut bent = honest.clone();
        bent.head_inclusion[0][0] ^= 1;
        assert!(problem(check(&trust, &cluster, "n1", &bent)).contains("is not the last"));
        let mut short_root = Log::default();
        for revision in 1..=9 {
            short_root.append(
                AuditRecord {
                    revision,
                    ..Default::default()
                }
                .encode_to_vec(),
            );
        }
        let short = cluster.evidence(&short_root, 9, &trust.asked(), NOW);
        assert!(problem(check(&trust, &cluster, "n1", &short))
            .contains("the last record's state root is 0 bytes"));
    }

    #[test]
    fn a_service_must_be_whole_and_current_in_the_committed_state() {
        let cluster = Cluster::new();
        let trust = AuditTrust::new(MAX_AGE, true);
        let (whole, root, absence) = service_in_state(&[("p1", 1), ("p2", 2), ("p3", 3)]);
        let mut log = Log {
            state_root: root,
            ..Log::default()
        };
        log.noise(4);
        let evidence = cluster.evidence(&log, 4, &trust.asked(), NOW);
        let checked = check(&trust, &cluster, "n1", &evidence).expect("honest");

        // Phase 1: the whole service passes; so does a proven absence of another.
        checked.check_service(&whole).expect("the whole service");
        let ghost = ServiceRecords {
            service: "ghost".into(),
            state: Some(absence.clone()),
            ..Default::default()
        };
        checked.check_service(&ghost).expect("ghost is absent");

        // Phase 2: an instance left out, an older version, an instance twice, another binding.
        let mut hidden = whole.clone();
        hidden.records.remove(1);
        let why = checked.check_service(&hidden).unwrap_err().to_string();
        assert!(why.contains("is not the whole current state"), "{why}");
        let (older, _, _) = service_in_state(&[("p1", 1), ("p2", 1), ("p3", 3)]);
        let older = ServiceRecords {
            state: whole.state.clone(),
            ..older
        };
        assert!(checked.check_service(&older).is_err());
        let mut twice = whole.clone();
        twice.records.push(twice.records[0].clone());
        let why = checked.check_service(&twice).unwrap_err().to_string();
        assert!(why.contains("an instance twice"), "{why}");
        let rebound = ServiceRecords {
            binding: Some(envelope(0xb1)),
            ..whole.clone()
        };
        assert!(checked.check_service(&rebound).is_err());

        // Phase 3: denying a service that exists, with another's absence proof or none.
        let denied = ServiceRecords {
            service: "payments".into(),
            state: Some(absence),
            ..Default::default()
        };
        let why = checked.check_service(&denied).unwrap_err().to_string();
        assert!(why.contains("does not prove the service absent"), "{why}");
        let unproven = ServiceRecords {
            state: None,
            ..whole.clone()
        };
        let why = checked.check_service(&unproven).unwrap_err().to_string();
        assert!(
            why.contains("without a proof that it is the whole service"),
            "{why}"
        );
        let mut malformed = whole.clone();
        malformed.state.as_mut().unwrap().siblings[0].pop();
        let why = checked.check_service(&malformed).unwrap_err().to_string();
        assert!(why.contains("not 32"), "{why}");

        // Phase 4: an answer without a checkpoint (none required yet) checks nothing.
        let lax = AuditTrust::new(MAX_AGE, false);
        let unanchored = lax
            .check(lax.asked(), "n1", None, |_| unreachable!(), NOW)
            .expect("no checkpoint seen or required");
        unanchored.check_service(&hidden).expect("nothing to check");
    }

    #[test]
    fn a_note_verified_once_is_not_verified_again_but_still_ages() {
        let cluster = Cluster::new();
        let mut trust = AuditTrust::new(MAX_AGE, true);
        let mut log = Log::default();
        log.noise(6);
        let evidence = cluster.evidence(&log, 6, &trust.asked(), NOW);
        let checked = check(&trust, &cluster, "n1", &evidence).expect("honest");
        trust.commit(checked);
        let no_keys = |_: &Envelope| -> Result<Witnesses, ClientError> {
            Err(ClientError::Verification("keys asked for again".into()))
        };
        // The same note and binding: the signatures are not checked again.
        let again = cluster.evidence(&log, 6, &trust.asked(), NOW);
        trust
            .check(trust.asked(), "n2", Some(&again), no_keys, NOW + 1_000)
            .expect("the note verified before");
        // Its age still counts.
        let why = trust
            .check(
                trust.asked(),
                "n2",
                Some(&again),
                no_keys,
                NOW + MAX_AGE + 1,
            )
            .unwrap_err()
            .to_string();
        assert!(why.contains("s old"), "{why}");
        // Another note, or the same under another binding, is verified.
        log.noise(1);
        let next = cluster.evidence(&log, 7, &trust.asked(), NOW + 2_000);
        let why = trust
            .check(trust.asked(), "n2", Some(&next), no_keys, NOW + 2_000)
            .unwrap_err()
            .to_string();
        assert!(why.contains("keys asked for again"), "{why}");
        let rebound = AuditEvidence {
            checkpoint_binding: Some(envelope(0xcc)),
            ..again
        };
        assert!(trust
            .check(trust.asked(), "n2", Some(&rebound), no_keys, NOW + 1_000)
            .is_err());
    }
}
