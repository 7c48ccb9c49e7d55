//! Micro-benchmarks of the register path's parts, with criterion:
//! `cargo bench --bench micro` (after `cargo build --release --workspace --all-targets`).
//!
//! Each measures one cost the cluster pays per registration or per batch, on real keys, real
//! RocksDB and the real apply: signing, `verify_strict`, batch verification (what apply could
//! use), envelope decoding, apply of a batch of registrations, a log append with its fsync, and
//! the export a snapshot is built from. `SIGNPOST_MICRO_INSTANCES` sets the registry size of
//! the snapshot benchmark (default 100000; 1000000 takes minutes to set up).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use prost::Message;
use rand::rngs::StdRng;
use rand::SeedableRng;
use signpost_proto::v1::{BindingPayload, Endpoint, Envelope, RecordPayload};
use signpost_record::{sign_binding, sign_record, PayloadKind, VerifiedSignatures};
use signpost_state::{Command, Outcome, Quotas, Registry, Request};

const T0_MS: u64 = 1_700_000_000_000;
const SERVICES: usize = 1_000;

fn key(seed: u64) -> SigningKey {
    SigningKey::generate(&mut StdRng::seed_from_u64(seed))
}

fn payload(service: &str, instance: &str, sequence: u64) -> RecordPayload {
    RecordPayload {
        service: service.into(),
        instance: instance.into(),
        endpoints: vec![Endpoint {
            host: "10.0.0.1".into(),
            port: 8443,
            protocol: "grpc".into(),
        }],
        metadata: Default::default(),
        tls_identity: format!("spiffe://signpost.local/service/{service}"),
        sequence,
        issued_at_ms: T0_MS,
        ttl_secs: 3_600,
    }
}

/// A registry after genesis with `SERVICES` services bound to `service_key`, and the index of
/// the next entry.
fn registry(service_key: &SigningKey) -> (Registry, u64) {
    let admin = key(1);
    let mut registry = Registry::new();
    let mut revision = 0;
    let mut apply = |registry: &mut Registry, command: Command| {
        revision += 1;
        let request = Request {
            time_ms: T0_MS,
            caller: "spiffe://signpost.local/admin/bench".into(),
            command,
        };
        let applied = registry.apply(revision, &request);
        assert!(
            matches!(applied.outcome, Outcome::Applied { .. }),
            "{:?}",
            applied.outcome
        );
    };
    apply(
        &mut registry,
        Command::Genesis {
            admin_keys: vec![admin.verifying_key().to_bytes()],
            admin_threshold: 1,
            quotas: Quotas {
                instances_per_service_max: 100_000,
                services_max: 100_000,
                state_bytes_max: 8 * 1024 * 1024 * 1024,
            },
        },
    );
    for s in 0..SERVICES {
        let binding = BindingPayload {
            service: format!("svc-{s}"),
            public_keys: vec![service_key.verifying_key().to_bytes().to_vec()],
            version: 1,
            issued_at_ms: T0_MS,
            not_before_ms: 0,
            not_after_ms: 0,
        };
        apply(
            &mut registry,
            Command::Bind {
                envelope: sign_binding(&admin, &binding).encode_to_vec(),
            },
        );
    }
    (registry, revision + 1)
}

fn register_commands(key: &SigningKey, from: usize, count: usize) -> Vec<Request> {
    (from..from + count)
        .map(|i| Request {
            time_ms: T0_MS,
            caller: "spiffe://signpost.local/service/bench".into(),
            command: Command::Register {
                envelope: sign_record(
                    key,
                    &payload(&format!("svc-{}", i % SERVICES), &format!("i{i}"), 1),
                )
                .encode_to_vec(),
            },
        })
        .collect()
}

fn signatures(c: &mut Criterion) {
    let k = key(7);
    let record = payload("payments", "p1", 1);
    let envelope = sign_record(&k, &record);
    let bytes = envelope.encode_to_vec();
    let mut group = c.benchmark_group("record");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign", |b| b.iter(|| sign_record(&k, &record)));
    group.bench_function("decode_envelope", |b| {
        b.iter(|| signpost_record::decode_envelope(&bytes).map(|e| e.payload.len()))
    });
    group.bench_function("verify_strict_open_record", |b| {
        b.iter(|| signpost_record::open_record(&envelope).map(|v| v.key))
    });
    let cache = VerifiedSignatures::new(1);
    group.bench_function("open_record_reusing_admission_check", |b| {
        b.iter_batched(
            || {
                signpost_record::open_record_with(
                    &envelope,
                    signpost_record::SignatureCheck::Remember(&cache),
                )
                .map(|v| v.key)
            },
            |_| {
                signpost_record::open_record_with(
                    &envelope,
                    signpost_record::SignatureCheck::Reuse(&cache),
                )
                .map(|v| v.key)
            },
            // Remember, then reuse, one at a time: a batch of setups would remember one digest
            // and leave every reuse after the first to verify.
            BatchSize::PerIteration,
        )
    });
    // A follower's apply: no admission check to reuse, but the service's key was decompressed
    // by an earlier registration.
    let followers = VerifiedSignatures::new(1);
    group.bench_function("open_record_at_apply_key_already_parsed", |b| {
        b.iter(|| {
            signpost_record::open_record_with(
                &envelope,
                signpost_record::SignatureCheck::Reuse(&followers),
            )
            .map(|v| v.key)
        })
    });
    group.finish();

    // Batch verification: what apply would pay per signature if it verified a batch at once
    // (refusing to use it where a single signature fails is what keeps apply deterministic).
    const BATCH: usize = 64;
    let keys: Vec<SigningKey> = (0..BATCH as u64).map(key).collect();
    let envelopes: Vec<Envelope> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| sign_record(k, &payload("payments", &format!("p{i}"), 1)))
        .collect();
    let messages: Vec<Vec<u8>> = envelopes
        .iter()
        .map(|e| PayloadKind::Record.signed_message(&e.payload))
        .collect();
    let message_refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    let sigs: Vec<Signature> = envelopes
        .iter()
        .map(|e| Signature::from_slice(&e.signature).expect("64 bytes"))
        .collect();
    let verifying: Vec<VerifyingKey> = keys.iter().map(SigningKey::verifying_key).collect();
    let mut group = c.benchmark_group("record_batch");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("verify_strict_x64", |b| {
        b.iter(|| {
            verifying
                .iter()
                .zip(&message_refs)
                .zip(&sigs)
                .all(|((k, m), s)| k.verify_strict(m, s).is_ok())
        })
    });
    group.bench_function("verify_batch_x64", |b| {
        b.iter(|| ed25519_dalek::verify_batch(&message_refs, &sigs, &verifying).is_ok())
    });
    group.finish();
}

fn apply(c: &mut Criterion) {
    const BATCH: usize = 256;
    let k = key(9);
    let (base, next) = registry(&k);
    let requests = register_commands(&k, 0, BATCH);
    let mut group = c.benchmark_group("state");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    group.bench_function("apply_256_registrations", |b| {
        b.iter_batched(
            || base.clone(),
            |mut registry| {
                for (i, request) in requests.iter().enumerate() {
                    registry.apply(next + i as u64, request);
                }
                registry.state_bytes()
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn log_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = signpost_storage::Store::open(dir.path()).expect("open store");
    let entry = vec![0x5a; 400];
    let mut index = 0u64;
    let mut group = c.benchmark_group("storage");
    for batch in [1usize, 64] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("log_append_fsync_{batch}_entries"), |b| {
            b.iter(|| {
                let entries: Vec<(u64, Vec<u8>)> = (0..batch)
                    .map(|_| {
                        index += 1;
                        (index, entry.clone())
                    })
                    .collect();
                store.log_append(&entries).expect("append")
            })
        });
    }
    group.finish();
}

fn snapshot(c: &mut Criterion) {
    let instances: usize = std::env::var("SIGNPOST_MICRO_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let k = key(11);
    let (mut registry, mut next) = registry(&k);
    for chunk in (0..instances).step_by(10_000) {
        for request in register_commands(&k, chunk, 10_000.min(instances - chunk)) {
            registry.apply(next, &request);
            next += 1;
        }
    }
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    group.bench_function(format!("export_and_encode_{instances}_instances"), |b| {
        b.iter(|| {
            let pairs = registry.export();
            bincode::serialize(&pairs).map(|bytes| bytes.len())
        })
    });
    group.finish();
}

/// The audit tree at `SIGNPOST_MICRO_AUDIT_RECORDS` records (default 1M): what one append
/// costs apply, and what an inclusion proof costs a node to make and a client to check.
fn audit(c: &mut Criterion) {
    use std::collections::HashMap;

    use signpost_audit::{AuditError, Frontier, Hash, NodeSource};

    struct Nodes(HashMap<(u8, u64), Hash>);
    impl NodeSource for Nodes {
        fn node(&self, level: u8, index: u64) -> Result<Hash, AuditError> {
            self.0
                .get(&(level, index))
                .copied()
                .ok_or(AuditError::Missing { level, index })
        }
    }

    let records: u64 = std::env::var("SIGNPOST_MICRO_AUDIT_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // A typical record: a registration's audit leaf is about 200 bytes.
    let leaf = |i: u64| format!("{i:0>200}").into_bytes();
    let mut frontier = Frontier::new();
    let mut nodes = Nodes(HashMap::new());
    for i in 0..records {
        for n in frontier.append(signpost_audit::leaf_hash(&leaf(i))) {
            nodes.0.insert((n.level, n.index), n.hash);
        }
    }
    let root = frontier.root();
    let index = records / 3;
    let proof: Vec<Vec<u8>> = signpost_audit::inclusion_proof(&nodes, index, records)
        .expect("proof")
        .iter()
        .map(|h| h.to_vec())
        .collect();
    eprintln!(
        "audit: inclusion proof of record {index} of {records}: {} hashes, {} bytes",
        proof.len(),
        proof.len() * 32
    );
    let mut group = c.benchmark_group("audit");
    group.bench_function("append_one_record", |b| {
        b.iter_batched(
            || frontier.clone(),
            |mut f| f.append(signpost_audit::leaf_hash(&leaf(records))),
            BatchSize::SmallInput,
        )
    });
    group.bench_function(format!("inclusion_proof_at_{records}"), |b| {
        b.iter(|| signpost_audit::inclusion_proof(&nodes, index, records))
    });
    group.bench_function(format!("verify_inclusion_at_{records}"), |b| {
        b.iter(|| signpost_audit::verify_inclusion(&leaf(index), index, records, &root, &proof))
    });
    group.bench_function(format!("consistency_proof_at_{records}"), |b| {
        b.iter(|| signpost_audit::consistency_proof(&nodes, index, records))
    });
    // What a verifying client checks per answer besides the note: its tree extends the
    // checkpoint and the trees it holds (one of these each).
    let old_root = {
        let mut prefix = Frontier::new();
        for i in 0..index {
            prefix.append(signpost_audit::leaf_hash(&leaf(i)));
        }
        prefix.root()
    };
    let consistency: Vec<Vec<u8>> = signpost_audit::consistency_proof(&nodes, index, records)
        .expect("proof")
        .iter()
        .map(|h| h.to_vec())
        .collect();
    eprintln!(
        "audit: consistency proof {index} -> {records}: {} hashes, {} bytes",
        consistency.len(),
        consistency.len() * 32
    );
    group.bench_function(format!("verify_consistency_at_{records}"), |b| {
        b.iter(|| {
            signpost_audit::verify_consistency(index, &old_root, records, &root, &consistency)
                .expect("verifies")
        })
    });

    // A checkpoint of this tree cosigned by three nodes: what a client checks per checkpoint.
    let origin = "signpost.audit/0011223344556677";
    let checkpoint = signpost_audit::Checkpoint {
        origin: origin.into(),
        size: records,
        root,
        time_ms: 1_764_582_000_000,
    };
    let signers: Vec<signpost_audit::CheckpointSigner> = (0..3)
        .map(|_| {
            signpost_audit::CheckpointSigner::new(
                origin,
                ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
            )
        })
        .collect();
    let keys: Vec<[u8; 32]> = signers.iter().map(|s| s.public_key()).collect();
    let witnesses = signpost_audit::Witnesses::new(origin, &keys).expect("witnesses");
    let signatures: Vec<([u8; 32], Vec<u8>)> = signers
        .iter()
        .map(|s| (s.public_key(), s.sign_checkpoint(&checkpoint)))
        .collect();
    let note = witnesses
        .assemble(&checkpoint, &signatures)
        .expect("note")
        .note;
    eprintln!(
        "audit: a checkpoint note signed by 3 nodes: {} bytes",
        note.len()
    );
    group.bench_function("cosign_checkpoint", |b| {
        b.iter(|| signers[0].sign_checkpoint(&checkpoint))
    });
    group.bench_function("verify_checkpoint_of_3_signatures", |b| {
        b.iter(|| witnesses.verify(&note).expect("verifies"))
    });
    group.finish();
}

/// The state commitment: what apply pays per registration, a restart per instance, and a
/// verifying client per service answer.
fn state_commitment(c: &mut Criterion) {
    use signpost_audit::{name_key, service_value, verify_state_proof, StateTree};

    let instances: u32 = std::env::var("SIGNPOST_MICRO_STATE_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let entries = |n: u32, salt: &str| -> Vec<([u8; 32], [u8; 32])> {
        (0..n)
            .map(|i| (name_key(&format!("i{i}")), name_key(&format!("{salt}{i}"))))
            .collect()
    };
    let mut group = c.benchmark_group("state");
    group.sample_size(10);
    group.bench_function(format!("commitment_build_{instances}"), |b| {
        b.iter_batched(
            || entries(instances, "v"),
            |e| StateTree::from_entries(e).expect("distinct"),
            BatchSize::LargeInput,
        )
    });
    group.finish();

    let mut tree = StateTree::from_entries(entries(instances, "v")).expect("distinct");
    let proof = tree.prove(&name_key("i7"));
    eprintln!(
        "state: a path in a tree of {instances} entries: {} siblings, {} bytes",
        proof.siblings.len(),
        proof.siblings.len() * 32
    );
    let mut group = c.benchmark_group("state");
    let mut next = 0u32;
    group.bench_function(format!("commitment_replace_one_of_{instances}"), |b| {
        b.iter(|| {
            next = next.wrapping_add(1);
            tree.insert(
                name_key(&format!("i{}", next % instances)),
                name_key(&format!("w{next}")),
            )
        })
    });
    // A client's check of one Resolve answer of a service of 100 instances in a registry of
    // `instances` services: rebuild the service's instance tree, then its path to the root.
    let service = entries(100, "r");
    let binding = name_key("binding");
    let value = service_value(
        &binding,
        &StateTree::from_entries(service.clone())
            .expect("distinct")
            .root(),
    );
    tree.insert(name_key("payments"), value);
    let root = tree.root();
    let path = tree.prove(&name_key("payments"));
    group.bench_function("client_check_service_of_100", |b| {
        b.iter(|| {
            let rebuilt = StateTree::from_entries(service.clone()).expect("distinct");
            let value = service_value(&binding, &rebuilt.root());
            verify_state_proof(&root, &name_key("payments"), Some(&value), &path).expect("whole")
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    signatures,
    apply,
    log_append,
    snapshot,
    audit,
    state_commitment
);
criterion_main!(benches);
