//! Behaviour of the registry state machine, with real ed25519 keys. Apply is pure, so no mocks:
//! every test is a log of requests and the registry it produces.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use signpost_proto::v1::{AdminSetPayload, BindingPayload, DeregisterPayload, RecordPayload};
use signpost_record::{
    sign, sign_admin_set, sign_binding, sign_deregister, sign_record, PayloadKind,
    ENVELOPE_BYTES_MAX,
};
use signpost_state::*;

const T0_MS: u64 = 1_700_000_000_000;

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

fn key(seed: u64) -> SigningKey {
    SigningKey::generate(&mut StdRng::seed_from_u64(seed))
}

fn raw(key: &SigningKey) -> [u8; 32] {
    key.verifying_key().to_bytes()
}

/// A registry plus the clock and log index that drive it. Every apply checks the invariants
/// that must hold after any entry.
struct World {
    registry: Registry,
    revision: u64,
    now_ms: u64,
    admins: Vec<SigningKey>,
    log: Vec<Request>,
}

impl World {
    /// A registry after genesis with one admin (threshold 1).
    fn new() -> World {
        World::with(vec![key(1000)], 1, Quotas::default())
    }

    fn with(admins: Vec<SigningKey>, threshold: u32, quotas: Quotas) -> World {
        let mut world = World {
            registry: Registry::new(),
            revision: 0,
            now_ms: T0_MS,
            admins,
            log: Vec::new(),
        };
        let admin_keys = world.admins.iter().map(raw).collect();
        let applied = world.apply(Command::Genesis {
            admin_keys,
            admin_threshold: threshold,
            quotas,
        });
        assert_eq!(applied.outcome, Outcome::Applied { revision: 1 });
        world
    }

    fn apply(&mut self, command: Command) -> Applied {
        self.revision += 1;
        let request = Request {
            time_ms: self.now_ms,
            caller: "spiffe://example.org/test".into(),
            command,
        };
        let before = self.registry.export();
        let applied = self.registry.apply(self.revision, &request);
        self.log.push(request);
        check_invariants(&before, &self.registry, &applied, self.revision);
        applied
    }

    fn reason(&mut self, command: Command) -> Reason {
        match self.apply(command).outcome {
            Outcome::Rejected { reason, .. } => reason,
            Outcome::Applied { .. } => panic!("expected a rejection"),
        }
    }

    fn applied(&mut self, command: Command) -> Applied {
        let applied = self.apply(command);
        assert_eq!(
            applied.outcome,
            Outcome::Applied {
                revision: self.revision
            }
        );
        applied
    }

    fn bind(&mut self, service: &str, keys: &[&SigningKey], version: u64) -> Command {
        let payload = BindingPayload {
            service: service.into(),
            public_keys: keys.iter().map(|k| raw(k).to_vec()).collect(),
            version,
            issued_at_ms: self.now_ms,
            not_before_ms: 0,
            not_after_ms: 0,
        };
        Command::Bind {
            envelope: sign_binding(&self.admins[0], &payload).encode_to_vec(),
        }
    }

    fn record(&self, service: &str, instance: &str, sequence: u64) -> RecordPayload {
        RecordPayload {
            service: service.into(),
            instance: instance.into(),
            endpoints: vec![signpost_proto::v1::Endpoint {
                host: "10.0.0.5".into(),
                port: 443,
                protocol: "grpc".into(),
            }],
            sequence,
            issued_at_ms: self.now_ms,
            ttl_secs: 30,
            ..Default::default()
        }
    }

    fn dereg(&self, service: &str, instance: &str, sequence: u64) -> DeregisterPayload {
        DeregisterPayload {
            service: service.into(),
            instance: instance.into(),
            sequence,
            issued_at_ms: self.now_ms,
        }
    }
}

fn register(key: &SigningKey, payload: &RecordPayload) -> Command {
    Command::Register {
        envelope: sign_record(key, payload).encode_to_vec(),
    }
}

fn deregister(key: &SigningKey, payload: &DeregisterPayload) -> Command {
    Command::Deregister {
        envelope: sign_deregister(key, payload).encode_to_vec(),
    }
}

fn rotate(signers: &[&SigningKey], next: &[&SigningKey], threshold: u32, version: u64) -> Command {
    let payload = AdminSetPayload {
        public_keys: next.iter().map(|k| raw(k).to_vec()).collect(),
        threshold,
        version,
        issued_at_ms: T0_MS,
    };
    Command::RotateAdmins {
        envelope: sign_admin_set(signers, &payload).encode_to_vec(),
        rebinds: Vec::new(),
    }
}

/// A rotation that carries `rebinds`, each re-signing a binding with its given key.
fn rotate_rebinding(
    signers: &[&SigningKey],
    next: &[&SigningKey],
    version: u64,
    rebinds: &[(&SigningKey, &str, &[&SigningKey], u64)],
) -> Command {
    let Command::RotateAdmins { envelope, .. } = rotate(signers, next, 1, version) else {
        unreachable!("rotate builds a rotation");
    };
    let rebinds = rebinds
        .iter()
        .map(|(signer, service, keys, version)| {
            let payload = BindingPayload {
                service: (*service).into(),
                public_keys: keys.iter().map(|k| raw(k).to_vec()).collect(),
                version: *version,
                issued_at_ms: T0_MS,
                not_before_ms: 0,
                not_after_ms: 0,
            };
            sign_binding(signer, &payload).encode_to_vec()
        })
        .collect();
    Command::RotateAdmins { envelope, rebinds }
}

/// What must hold after every apply, applied or not.
fn check_invariants(
    before: &[(Vec<u8>, Vec<u8>)],
    registry: &Registry,
    applied: &Applied,
    revision: u64,
) {
    let after = registry.export();
    let mut replayed: BTreeMap<Vec<u8>, Vec<u8>> = before.iter().cloned().collect();
    for change in &applied.changes {
        match &change.value {
            Some(value) => replayed.insert(change.key.clone(), value.clone()),
            None => replayed.remove(&change.key),
        };
    }
    let after_map: BTreeMap<Vec<u8>, Vec<u8>> = after.iter().cloned().collect();
    assert!(
        replayed == after_map,
        "changes replayed on the old export differ from the new export"
    );
    assert!(
        after.windows(2).all(|w| w[0].0 < w[1].0),
        "export is sorted"
    );
    let bytes: u64 = after.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
    assert_eq!(
        registry.state_bytes(),
        bytes,
        "state_bytes matches the export"
    );
    match &applied.outcome {
        Outcome::Rejected { .. } => {
            assert!(applied.changes.is_empty() && applied.events.is_empty());
            assert!(before == after.as_slice(), "a rejection changed the state");
        }
        Outcome::Applied { revision: r } => {
            assert_eq!(*r, revision);
            assert!(applied.events.iter().all(|e| e.revision == revision));
        }
    }
}

#[test]
fn register_rejections_each_come_from_their_own_cause() {
    let mut w = World::new();
    let k = key(1);
    let stranger = key(2);
    let bind = w.bind("payments", &[&k], 1);
    w.applied(bind);

    eprintln!("phase: a valid registration is applied with a Put event");
    let first = w.record("payments", "p1", 10);
    let applied = w.applied(register(&k, &first));
    assert_eq!(applied.events.len(), 1);
    assert_eq!(applied.events[0].kind, EventKind::Put);
    assert_eq!(
        applied.events[0].record.as_deref(),
        Some(sign_record(&k, &first).encode_to_vec().as_slice())
    );

    eprintln!("phase: tampered payload");
    let mut envelope = sign_record(&k, &w.record("payments", "p1", 11));
    let last = envelope.payload.len() - 1;
    envelope.payload[last] ^= 1;
    let tampered = Command::Register {
        envelope: envelope.encode_to_vec(),
    };
    assert_eq!(w.reason(tampered), Reason::BadSignature);

    eprintln!("phase: signature checked against another key id");
    let mut envelope = sign_record(&stranger, &w.record("payments", "p1", 11));
    envelope.key_id = raw(&k).to_vec();
    let wrong_key = Command::Register {
        envelope: envelope.encode_to_vec(),
    };
    assert_eq!(w.reason(wrong_key), Reason::BadSignature);

    eprintln!("phase: valid signature by a key the binding does not hold");
    let unbound = register(&stranger, &w.record("payments", "p1", 11));
    assert_eq!(w.reason(unbound), Reason::UnboundKey);

    eprintln!("phase: a service nobody bound");
    let unknown = register(&k, &w.record("billing", "b1", 1));
    assert_eq!(w.reason(unknown), Reason::NoBinding);

    eprintln!("phase: the same envelope replayed");
    assert_eq!(w.reason(register(&k, &first)), Reason::StaleSequence);

    eprintln!("phase: a lower sequence (rollback)");
    let rollback = register(&k, &w.record("payments", "p1", 9));
    assert_eq!(w.reason(rollback), Reason::StaleSequence);

    eprintln!("phase: replay after deregistration is refused by the tombstone");
    let dereg = deregister(&k, &w.dereg("payments", "p1", 11));
    w.applied(dereg);
    assert!(w.registry.instance("payments", "p1").is_none());
    assert_eq!(w.reason(register(&k, &first)), Reason::StaleSequence);
    let at_tombstone = register(&k, &w.record("payments", "p1", 11));
    assert_eq!(w.reason(at_tombstone), Reason::StaleSequence);

    eprintln!("phase: issued too far in the future");
    let mut future = w.record("payments", "p2", 1);
    future.issued_at_ms = w.now_ms + MAX_SKEW_MS + 1;
    assert_eq!(w.reason(register(&k, &future)), Reason::FutureIssuedAt);
    future.issued_at_ms = w.now_ms + MAX_SKEW_MS;
    w.applied(register(&k, &future));

    eprintln!("phase: issued too long ago");
    let mut old = w.record("payments", "p3", 1);
    old.issued_at_ms = w.now_ms - MAX_AGE_MS - 1;
    assert_eq!(w.reason(register(&k, &old)), Reason::Expired);
    old.issued_at_ms = w.now_ms - MAX_AGE_MS;
    w.applied(register(&k, &old));

    eprintln!("phase: bytes that are not an envelope");
    let garbage = Command::Register {
        envelope: vec![0xff; 40],
    };
    assert_eq!(w.reason(garbage), Reason::Malformed);
    let not_a_record = Command::Register {
        envelope: sign(PayloadKind::Record, &k, vec![0xff; 8]).encode_to_vec(),
    };
    assert_eq!(w.reason(not_a_record), Reason::Malformed);

    eprintln!("phase: an oversized envelope");
    let oversized = Command::Register {
        envelope: vec![0; ENVELOPE_BYTES_MAX + 1],
    };
    assert_eq!(w.reason(oversized), Reason::Oversized);

    eprintln!("phase: a field outside its limits");
    let mut bad_ttl = w.record("payments", "p4", 1);
    bad_ttl.ttl_secs = 1;
    assert_eq!(w.reason(register(&k, &bad_ttl)), Reason::InvalidField);

    eprintln!("phase: a deregistration envelope is not a registration");
    let cross = Command::Register {
        envelope: sign_deregister(&k, &w.dereg("payments", "p2", 5)).encode_to_vec(),
    };
    assert_eq!(w.reason(cross), Reason::BadSignature);
}

#[test]
fn binding_window_is_checked_at_the_entry_time() {
    let mut w = World::new();
    let k = key(1);
    let payload = BindingPayload {
        service: "payments".into(),
        public_keys: vec![raw(&k).to_vec()],
        version: 1,
        issued_at_ms: T0_MS,
        not_before_ms: T0_MS + 1_000,
        not_after_ms: T0_MS + 2_000,
    };
    w.applied(Command::Bind {
        envelope: sign_binding(&w.admins[0], &payload).encode_to_vec(),
    });

    eprintln!("phase: before, inside and after the window");
    let early = register(&k, &w.record("payments", "p1", 1));
    assert_eq!(w.reason(early), Reason::BindingNotYetValid);
    w.now_ms = T0_MS + 1_000;
    w.applied(register(&k, &w.record("payments", "p1", 1)));
    w.now_ms = T0_MS + 2_001;
    let late = register(&k, &w.record("payments", "p1", 2));
    assert_eq!(w.reason(late), Reason::BindingExpired);
}

#[test]
fn deregistration_rules() {
    let mut w = World::new();
    let k = key(1);
    let stranger = key(2);
    let bind = w.bind("payments", &[&k], 1);
    w.applied(bind);
    w.applied(register(&k, &w.record("payments", "p1", 5)));
    w.applied(register(&k, &w.record("payments", "p2", 5)));

    eprintln!("phase: unknown instance, unbound key, stale sequence");
    let missing = deregister(&k, &w.dereg("payments", "nope", 6));
    assert_eq!(w.reason(missing), Reason::NotFound);
    let unbound = deregister(&stranger, &w.dereg("payments", "p1", 6));
    assert_eq!(w.reason(unbound), Reason::UnboundKey);
    let stale = deregister(&k, &w.dereg("payments", "p1", 5));
    assert_eq!(w.reason(stale), Reason::StaleSequence);

    eprintln!("phase: the service's key removes its instance, with a Delete event");
    let applied = w.applied(deregister(&k, &w.dereg("payments", "p1", 6)));
    assert_eq!(applied.events.len(), 1);
    assert_eq!(applied.events[0].kind, EventKind::Delete);
    assert_eq!(applied.events[0].record, None);
    let again = deregister(&k, &w.dereg("payments", "p1", 7));
    assert_eq!(w.reason(again), Reason::NotFound);

    eprintln!("phase: an admin key may deregister any instance");
    let admin = w.admins[0].clone();
    w.applied(deregister(&admin, &w.dereg("payments", "p2", 6)));
    assert!(w.registry.resolve("payments").unwrap().records.is_empty());

    eprintln!("phase: a higher sequence registers again after deregistration");
    w.applied(register(&k, &w.record("payments", "p1", 7)));
    assert_eq!(w.registry.instance("payments", "p1").unwrap().sequence, 7);
}

#[test]
fn same_log_gives_same_state_and_outcomes() {
    eprintln!("phase: build a log with a mix of applied and rejected entries");
    let w = random_world(7, 400);

    eprintln!("phase: replay it into two fresh registries");
    let mut a = Registry::new();
    let mut b = Registry::new();
    for (index, request) in w.log.iter().enumerate() {
        let revision = index as u64 + 1;
        let applied_a = a.apply(revision, request);
        let applied_b = b.apply(revision, request);
        assert_eq!(applied_a, applied_b, "entry {revision}");
    }
    assert_eq!(a.export(), b.export());
    assert_eq!(a.export(), w.registry.export());
    assert_eq!(a, w.registry);
}

#[test]
fn changes_replayed_on_the_old_export_give_the_new_export() {
    // World::apply checks the property after every entry; this drives many varied entries
    // through it and also round-trips the export through load along the way.
    let w = random_world(42, 3000);
    eprintln!(
        "phase: ended at {} live instances, {} bytes",
        w.registry.instances().count(),
        w.registry.state_bytes()
    );
    assert!(w.registry.instances().count() > 0);

    eprintln!("phase: the log exercised every kind of write, not just rejections");
    let mut replay = Registry::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut tombstones_dropped = 0;
    for (index, request) in w.log.iter().enumerate() {
        let applied = replay.apply(index as u64 + 1, request);
        let label = match &applied.outcome {
            Outcome::Applied { .. } => "applied".to_string(),
            Outcome::Rejected { reason, .. } => reason.to_string(),
        };
        *outcomes.entry(label).or_default() += 1;
        tombstones_dropped += applied
            .changes
            .iter()
            .filter(|c| c.key.starts_with(b"t/") && c.value.is_none())
            .count();
    }
    eprintln!("phase: outcomes {outcomes:?}, tombstones dropped or replaced {tombstones_dropped}");
    assert!(outcomes["applied"] > w.log.len() / 3);
    for reason in [
        "stale_sequence",
        "unbound_key",
        "malformed",
        "not_found",
        "expired",
    ] {
        assert!(outcomes.contains_key(reason), "no {reason} in the log");
    }
    assert!(tombstones_dropped > 0);
}

#[test]
fn load_of_export_is_the_same_registry() {
    eprintln!("phase: empty registry");
    let empty = Registry::new();
    assert_eq!(Registry::load(empty.export()).unwrap(), empty);

    eprintln!("phase: a registry with admins, rotations, bindings, records and tombstones");
    let mut w = random_world(3, 500);
    let a2 = key(1001);
    let version = w.registry.admin_set().unwrap().version + 1;
    let rotation = rotate(&[&w.admins[0]], &[&w.admins[0], &a2], 1, version);
    w.applied(rotation);
    let export = w.registry.export();
    assert!(export.iter().any(|(k, _)| k.starts_with(b"t/")));
    assert!(export.iter().any(|(k, _)| k.starts_with(b"a/chain/")));
    let loaded = Registry::load(export.clone()).unwrap();
    assert_eq!(loaded, w.registry);
    assert_eq!(loaded.export(), export);

    eprintln!("phase: the loaded registry keeps applying identically");
    let mut original = w.registry.clone();
    let mut reloaded = loaded;
    let request = Request {
        time_ms: w.now_ms + 10 * MAX_AGE_MS,
        caller: String::new(),
        command: Command::Noop,
    };
    assert_eq!(
        original.apply(w.revision + 1, &request),
        reloaded.apply(w.revision + 1, &request)
    );
    assert_eq!(original, reloaded);

    eprintln!("phase: pair order does not matter");
    let mut reversed = export.clone();
    reversed.reverse();
    assert_eq!(Registry::load(reversed).unwrap(), w.registry);
}

#[test]
fn load_refuses_corrupt_state() {
    let mut w = World::new();
    let k = key(1);
    let bind = w.bind("payments", &[&k], 1);
    w.applied(bind);
    w.applied(register(&k, &w.record("payments", "p1", 5)));
    w.applied(register(&k, &w.record("payments", "p2", 5)));
    w.applied(deregister(&k, &w.dereg("payments", "p2", 6)));
    let export = w.registry.export();
    let position = |prefix: &[u8]| {
        export
            .iter()
            .position(|(k, _)| k.starts_with(prefix))
            .unwrap()
    };
    let load_with = |edit: &dyn Fn(&mut Pairs)| {
        let mut pairs = export.clone();
        edit(&mut pairs);
        Registry::load(pairs)
    };

    eprintln!("phase: the untouched export loads");
    assert!(load_with(&|_| {}).is_ok());

    eprintln!("phase: an unknown key");
    let error = load_with(&|p| p.push((b"z/what".to_vec(), vec![1]))).unwrap_err();
    assert!(matches!(error, StateError::CorruptKey { .. }), "{error}");

    eprintln!("phase: every single-byte corruption of every value is refused or harmless");
    // Flipping a byte of a value must never panic; it either fails to load or (for bytes that
    // carry no meaning to the checks, like a revision) loads a registry that still verifies.
    for index in 0..export.len() {
        for offset in 0..export[index].1.len() {
            let _ = load_with(&|p| p[index].1[offset] ^= 0x40);
        }
    }

    eprintln!("phase: a flipped bit in a signed record is refused");
    let record = position(b"r/payments/p1");
    let signed_offset = export[record].1.len() / 2;
    let error = load_with(&|p| p[record].1[signed_offset] ^= 1).unwrap_err();
    assert!(matches!(error, StateError::CorruptValue { .. }), "{error}");

    eprintln!("phase: an unknown format version");
    let error = load_with(&|p| p[record].1[0] = 9).unwrap_err();
    assert!(error.to_string().contains("format version"), "{error}");

    eprintln!("phase: a record under another instance's key");
    let error = load_with(&|p| p[record].0 = b"r/payments/p9".to_vec()).unwrap_err();
    assert!(matches!(error, StateError::CorruptValue { .. }), "{error}");

    eprintln!("phase: a record without its binding");
    let binding = position(b"b/payments");
    let error = load_with(&|p| {
        p.remove(binding);
    })
    .unwrap_err();
    assert!(matches!(error, StateError::Inconsistent { .. }), "{error}");

    eprintln!("phase: a record that is also tombstoned");
    let tombstone = position(b"t/payments/p2");
    let error = load_with(&|p| p[tombstone].0 = b"t/payments/p1".to_vec()).unwrap_err();
    assert!(matches!(error, StateError::Inconsistent { .. }), "{error}");

    eprintln!("phase: a duplicated key");
    let error = load_with(&|p| p.push(p[record].clone())).unwrap_err();
    assert!(error.to_string().contains("twice"), "{error}");

    eprintln!("phase: current admin set without genesis");
    let genesis = position(b"a/genesis");
    let error = load_with(&|p| {
        p.remove(genesis);
    })
    .unwrap_err();
    assert!(matches!(error, StateError::Inconsistent { .. }), "{error}");

    eprintln!("phase: a current admin set the chain does not lead to");
    let current = position(b"a/current");
    let other_admins = World::with(vec![key(77)], 1, Quotas::default())
        .registry
        .export();
    let foreign = other_admins
        .iter()
        .find(|(k, _)| k == b"a/current")
        .unwrap()
        .1
        .clone();
    let error = load_with(&|p| p[current].1 = foreign.clone()).unwrap_err();
    assert!(matches!(error, StateError::Inconsistent { .. }), "{error}");

    eprintln!("phase: a well-signed binding by a key outside the current admin set");
    let mut forger = World::with(vec![key(77)], 1, Quotas::default());
    let forged = forger.bind("payments", &[&k], 1);
    forger.applied(forged);
    let forged_binding = forger
        .registry
        .export()
        .into_iter()
        .find(|(k, _)| k == b"b/payments")
        .unwrap()
        .1;
    let error = load_with(&|p| p[binding].1 = forged_binding.clone()).unwrap_err();
    assert!(
        error.to_string().contains("not in the current admin set"),
        "{error}"
    );
}

#[test]
fn an_admin_rotation_must_re_sign_every_binding_whose_signer_it_drops() {
    let (a, b) = (key(1001), key(1002));
    let (pk, ok) = (key(1), key(2));
    let mut w = World::with(vec![a.clone()], 1, Quotas::default());
    for (service, k) in [("payments", &pk), ("orders", &ok)] {
        let bind = w.bind(service, &[k], 1);
        w.applied(bind);
        w.applied(register(k, &w.record(service, "i1", 1)));
    }

    eprintln!("phase: a rotation from a to b that re-signs nothing is refused, state untouched");
    let before = w.registry.export();
    assert_eq!(
        w.reason(rotate(&[&a], &[&b], 1, 2)),
        Reason::RotationIncomplete
    );
    eprintln!("phase: re-signing only one of the two is not enough either");
    let partial = rotate_rebinding(&[&a], &[&b], 2, &[(&b, "payments", &[&pk], 2)]);
    assert_eq!(w.reason(partial), Reason::RotationIncomplete);

    eprintln!("phase: every re-signed binding must itself be valid under the new set");
    let by_old = rotate_rebinding(
        &[&a],
        &[&b],
        2,
        &[(&a, "payments", &[&pk], 2), (&b, "orders", &[&ok], 2)],
    );
    assert_eq!(w.reason(by_old), Reason::NotAdmin);
    let same_version = rotate_rebinding(
        &[&a],
        &[&b],
        2,
        &[(&b, "payments", &[&pk], 1), (&b, "orders", &[&ok], 2)],
    );
    assert_eq!(w.reason(same_version), Reason::StaleVersion);
    let unbound = rotate_rebinding(
        &[&a],
        &[&b],
        2,
        &[(&b, "payments", &[&pk], 2), (&b, "ghost", &[&ok], 2)],
    );
    assert_eq!(w.reason(unbound), Reason::NoBinding);
    let twice = rotate_rebinding(
        &[&a],
        &[&b],
        2,
        &[(&b, "payments", &[&pk], 2), (&b, "payments", &[&pk], 3)],
    );
    assert_eq!(w.reason(twice), Reason::InvalidField);
    let too_many = rotate_rebinding(
        &[&a],
        &[&b],
        2,
        &[
            (&b, "payments", &[&pk], 2),
            (&b, "orders", &[&ok], 2),
            (&b, "orders", &[&ok], 3),
        ],
    );
    assert_eq!(w.reason(too_many), Reason::InvalidField);
    assert_eq!(
        w.registry.export(),
        before,
        "refused rotations wrote nothing"
    );

    eprintln!("phase: a complete rotation applies: new set, re-signed bindings, records kept");
    let complete = rotate_rebinding(
        &[&a],
        &[&b],
        2,
        &[(&b, "payments", &[&pk], 2), (&b, "orders", &[&ok], 2)],
    );
    w.applied(complete);
    assert_eq!(w.registry.admin_set().unwrap().version, 2);
    assert_eq!(w.registry.binding("payments").unwrap().version, 2);
    assert_eq!(w.registry.binding("orders").unwrap().version, 2);
    assert_eq!(w.registry.resolve("payments").unwrap().records.len(), 1);
    assert_eq!(w.registry.resolve("orders").unwrap().records.len(), 1);
    assert_eq!(Registry::load(w.registry.export()).unwrap(), w.registry);

    eprintln!("phase: every stored binding verifies against the current admin set");
    let admins = w.registry.admin_set().unwrap().clone();
    for service in ["payments", "orders"] {
        let view = w.registry.resolve(service).unwrap();
        let envelope = signpost_record::decode_envelope(&view.binding).unwrap();
        signpost_record::verify_binding(&admins, &envelope, T0_MS).unwrap();
    }

    eprintln!("phase: the retired key can no longer bind");
    w.admins = vec![a.clone()];
    let by_retired = w.bind("payments", &[&pk], 3);
    assert_eq!(w.reason(by_retired), Reason::NotAdmin);

    eprintln!("phase: a rotation that keeps the signer of every binding needs no re-signing");
    let c = key(1003);
    w.applied(rotate(&[&b], &[&b, &c], 1, 3));
}

#[test]
fn list_pages_cover_every_service_once_within_their_limits() {
    let mut w = World::new();
    let k = key(1);
    let names: Vec<String> = (0..25).map(|i| format!("svc-{i:02}")).collect();
    for name in &names {
        let bind = w.bind(name, &[&k], 1);
        w.applied(bind);
    }
    for name in names.iter().step_by(2) {
        w.applied(register(&k, &w.record(name, "i1", 1)));
    }

    eprintln!("phase: pages of at most 4 services cover the 13 live ones, in order, once");
    let mut seen = Vec::new();
    let mut after = String::new();
    for _ in 0..100 {
        let (page, next) = w.registry.list_page(&after, false, 4, usize::MAX);
        assert!(!page.is_empty() && page.len() <= 4, "{}", page.len());
        seen.extend(page.into_iter().map(|v| v.service));
        match next {
            Some(n) => after = n,
            None => break,
        }
    }
    let live: Vec<String> = names.iter().step_by(2).cloned().collect();
    assert_eq!(seen, live);

    eprintln!("phase: with all_bound, the 12 bound services without records are listed too");
    let (page, next) = w.registry.list_page("", true, 1000, usize::MAX);
    assert_eq!(page.len(), 25);
    assert!(next.is_none());
    assert!(page.iter().filter(|v| v.records.is_empty()).count() == 12);

    eprintln!("phase: a byte budget smaller than one service still makes progress, one per page");
    let (page, next) = w.registry.list_page("", false, 1000, 1);
    assert_eq!(page.len(), 1);
    assert_eq!(next.as_deref(), Some("svc-00"));
    let (page, _) = w.registry.list_page("svc-00", false, 1000, 1);
    assert_eq!(page[0].service, "svc-02");

    eprintln!("phase: past the last name there is nothing");
    let (page, next) = w.registry.list_page("svc-24", true, 10, usize::MAX);
    assert!(page.is_empty() && next.is_none());
}

#[test]
fn key_rotation_removes_records_of_the_removed_key() {
    let mut w = World::new();
    let old = key(1);
    let new = key(2);
    let kept = key(3);
    let bind = w.bind("payments", &[&old, &kept], 1);
    w.applied(bind);
    w.applied(register(&old, &w.record("payments", "p1", 1)));
    w.applied(register(&old, &w.record("payments", "p2", 1)));
    w.applied(register(&kept, &w.record("payments", "p3", 1)));

    eprintln!("phase: the rebinding drops `old`; its two records go, `kept`'s stays");
    let rebind = w.bind("payments", &[&new, &kept], 2);
    let applied = w.applied(rebind);
    let deleted: Vec<&str> = applied
        .events
        .iter()
        .filter(|e| e.kind == EventKind::Delete)
        .map(|e| e.instance.as_str())
        .collect();
    assert_eq!(deleted, ["p1", "p2"]);
    let view = w.registry.resolve("payments").unwrap();
    assert_eq!(view.records.len(), 1);
    assert!(w.registry.instance("payments", "p3").is_some());

    eprintln!("phase: the removed key can no longer register; the new key can");
    let old_again = register(&old, &w.record("payments", "p1", 2));
    assert_eq!(w.reason(old_again), Reason::UnboundKey);
    w.applied(register(&new, &w.record("payments", "p1", 2)));

    eprintln!("phase: tombstones keep the removed records' sequences");
    let replay = register(&new, &w.record("payments", "p2", 1));
    assert_eq!(w.reason(replay), Reason::StaleSequence);

    eprintln!("phase: binding versions only go up, and only admins bind");
    let stale = w.bind("payments", &[&old], 2);
    assert_eq!(w.reason(stale), Reason::StaleVersion);
    let self_bound = Command::Bind {
        envelope: sign_binding(
            &new,
            &BindingPayload {
                service: "payments".into(),
                public_keys: vec![raw(&new).to_vec()],
                version: 9,
                ..Default::default()
            },
        )
        .encode_to_vec(),
    };
    assert_eq!(w.reason(self_bound), Reason::NotAdmin);

    eprintln!("phase: an empty binding revokes everything");
    let revoke = w.bind("payments", &[], 3);
    w.applied(revoke);
    assert!(w.registry.resolve("payments").unwrap().records.is_empty());
    assert!(w.registry.list().is_empty());
}

#[test]
fn admin_rotation_needs_the_threshold() {
    let (a, b, c) = (key(1001), key(1002), key(1003));
    let mut w = World::with(vec![a.clone(), b.clone(), c.clone()], 2, Quotas::default());
    let d = key(1004);

    eprintln!("phase: one admin alone cannot rotate a 2-of-3 set, even signing twice");
    let alone = rotate(&[&a], &[&a, &d], 1, 2);
    assert_eq!(w.reason(alone), Reason::ThresholdNotMet);
    let twice = rotate(&[&a, &a], &[&a, &d], 1, 2);
    assert_eq!(w.reason(twice), Reason::ThresholdNotMet);

    eprintln!("phase: two admins rotate to {{a, d}}, 1-of-2");
    w.applied(rotate(&[&a, &b], &[&a, &d], 1, 2));
    assert_eq!(w.registry.admin_set().unwrap().version, 2);
    assert_eq!(w.registry.admin_chain().len(), 1);
    assert_eq!(w.registry.genesis().unwrap().version, 1);
    assert_eq!(w.registry.genesis().unwrap().keys.len(), 3);

    eprintln!("phase: a replayed rotation is a stale version (a alone now meets 1-of-2)");
    let replay = rotate(&[&a, &b], &[&a, &d], 1, 2);
    assert_eq!(w.reason(replay), Reason::StaleVersion);

    eprintln!("phase: the removed admin alone cannot rotate any more");
    let by_removed = rotate(&[&b], &[&b], 1, 3);
    assert_eq!(w.reason(by_removed), Reason::ThresholdNotMet);

    eprintln!("phase: the removed admin can no longer bind; the new one can");
    w.admins = vec![b.clone()];
    let by_removed = w.bind("payments", &[&key(1)], 1);
    assert_eq!(w.reason(by_removed), Reason::NotAdmin);
    w.admins = vec![d.clone()];
    let by_new = w.bind("payments", &[&key(1)], 1);
    w.applied(by_new);

    eprintln!("phase: the chain verifies from genesis to the current set");
    let chain: Vec<_> = w
        .registry
        .admin_chain()
        .iter()
        .map(|bytes| signpost_record::decode_multi_envelope(bytes).unwrap())
        .collect();
    let end = signpost_record::verify_admin_chain(w.registry.genesis().unwrap(), &chain).unwrap();
    assert_eq!(&end, w.registry.admin_set().unwrap());
}

#[test]
fn admin_chain_is_bounded() {
    let mut w = World::new();
    let admin = w.admins[0].clone();
    eprintln!("phase: {ADMIN_CHAIN_ENTRIES_MAX} rotations are accepted");
    for version in 2..=(ADMIN_CHAIN_ENTRIES_MAX as u64 + 1) {
        w.applied(rotate(&[&admin], &[&admin], 1, version));
    }
    assert_eq!(w.registry.admin_chain().len(), ADMIN_CHAIN_ENTRIES_MAX);
    eprintln!("phase: the next one is refused");
    let one_more = rotate(&[&admin], &[&admin], 1, ADMIN_CHAIN_ENTRIES_MAX as u64 + 2);
    assert_eq!(w.reason(one_more), Reason::InvalidField);
    assert_eq!(Registry::load(w.registry.export()).unwrap(), w.registry);
}

#[test]
fn genesis_happens_once_and_gates_admin_commands() {
    eprintln!("phase: before genesis there is no admin set");
    let mut registry = Registry::new();
    let admin = key(1000);
    let request = |command| Request {
        time_ms: T0_MS,
        caller: String::new(),
        command,
    };
    let bind = Command::Bind {
        envelope: sign_binding(
            &admin,
            &BindingPayload {
                service: "payments".into(),
                version: 1,
                ..Default::default()
            },
        )
        .encode_to_vec(),
    };
    let outcome = registry.apply(1, &request(bind)).outcome;
    assert!(matches!(
        outcome,
        Outcome::Rejected {
            reason: Reason::NoAdminSet,
            ..
        }
    ));
    assert!(registry.admin_set().is_none() && registry.genesis().is_none());

    eprintln!("phase: genesis with a threshold above the key count is refused");
    let bad = Command::Genesis {
        admin_keys: vec![raw(&admin)],
        admin_threshold: 2,
        quotas: Quotas::default(),
    };
    assert!(matches!(
        registry.apply(2, &request(bad)).outcome,
        Outcome::Rejected {
            reason: Reason::InvalidField,
            ..
        }
    ));

    eprintln!("phase: the first valid genesis applies; a second is refused");
    let mut w = World::new();
    let again = Command::Genesis {
        admin_keys: vec![raw(&key(5))],
        admin_threshold: 1,
        quotas: Quotas::default(),
    };
    assert_eq!(w.reason(again), Reason::AlreadyInitialized);
    assert_eq!(
        w.registry.admin_set().unwrap().keys,
        [raw(&w.admins[0])].into()
    );
}

#[test]
fn quotas_refuse_with_their_reason_and_removals_always_work() {
    let k = key(1);

    eprintln!("phase: instances per service");
    let quotas = Quotas {
        instances_per_service_max: 2,
        services_max: 2,
        state_bytes_max: u64::MAX,
    };
    let mut w = World::with(vec![key(1000)], 1, quotas);
    for service in ["a", "b", "c"] {
        let bind = w.bind(service, &[&k], 1);
        w.applied(bind);
    }
    w.applied(register(&k, &w.record("a", "i1", 1)));
    w.applied(register(&k, &w.record("a", "i2", 1)));
    let third = register(&k, &w.record("a", "i3", 1));
    assert_eq!(w.reason(third), Reason::QuotaInstances);
    eprintln!("phase: replacing an existing instance is not a new instance");
    w.applied(register(&k, &w.record("a", "i2", 2)));

    eprintln!("phase: services with live instances");
    w.applied(register(&k, &w.record("b", "i1", 1)));
    let third_service = register(&k, &w.record("c", "i1", 1));
    assert_eq!(w.reason(third_service), Reason::QuotaServices);
    w.applied(deregister(&k, &w.dereg("b", "i1", 2)));
    w.applied(register(&k, &w.record("c", "i1", 1)));

    eprintln!("phase: state bytes");
    let mut w = World::new();
    let bind = w.bind("a", &[&k], 1);
    w.applied(bind);
    w.applied(register(&k, &w.record("a", "i0", 1)));
    // Pick a quota that the next registration crosses.
    let quota = w.registry.state_bytes() + 100;
    let mut w = World::with(
        vec![key(1000)],
        1,
        Quotas {
            state_bytes_max: quota,
            ..Quotas::default()
        },
    );
    let bind = w.bind("a", &[&k], 1);
    w.applied(bind);
    w.applied(register(&k, &w.record("a", "i0", 1)));
    assert!(w.registry.alarms().is_empty());
    w.applied(register(&k, &w.record("a", "i1", 1)));
    assert!(w.registry.state_bytes() >= quota);
    assert_eq!(w.registry.alarms(), vec![NOSPACE.to_string()]);
    let growth = register(&k, &w.record("a", "i2", 1));
    assert_eq!(w.reason(growth), Reason::QuotaStateBytes);

    eprintln!("phase: while over, a same-size replacement and every removal still apply");
    w.applied(register(&k, &w.record("a", "i1", 2)));
    let admin = w.admins[0].clone();
    w.applied(Command::Expire {
        service: "a".into(),
        instance: "i0".into(),
        sequence: 1,
    });
    w.applied(deregister(&admin, &w.dereg("a", "i1", 3)));
    assert!(w.registry.alarms().is_empty());
    w.applied(register(&k, &w.record("a", "i2", 1)));
}

#[test]
fn tombstone_is_dropped_only_after_the_replay_window() {
    let mut w = World::new();
    let k = key(1);
    let bind = w.bind("payments", &[&k], 1);
    w.applied(bind);
    let first = w.record("payments", "p1", 1);
    w.applied(register(&k, &first));
    w.now_ms += 1_000;
    w.applied(deregister(&k, &w.dereg("payments", "p1", 2)));
    let issued_at_max_ms = w.now_ms;
    let has_tombstone = |w: &World| {
        w.registry
            .export()
            .iter()
            .any(|(key, _)| key == b"t/payments/p1")
    };
    assert!(has_tombstone(&w));

    // Every applied entry that moves time forward records the registry clock; the other
    // changes are what this test is about.
    let without_clock = |changes: Vec<Change>| -> Vec<Change> {
        changes
            .into_iter()
            .filter(|c| c.key != b"c/clock")
            .collect()
    };

    eprintln!("phase: at the edge of the window the tombstone stays");
    w.now_ms = issued_at_max_ms + MAX_AGE_MS + MAX_SKEW_MS;
    let applied = w.applied(Command::Noop);
    assert!(without_clock(applied.changes).is_empty());
    assert!(has_tombstone(&w));

    eprintln!("phase: a rejected entry past the window drops nothing");
    w.now_ms += 1;
    let rejected = register(&key(9), &w.record("payments", "p1", 3));
    assert_eq!(w.reason(rejected), Reason::UnboundKey);
    assert!(has_tombstone(&w));

    eprintln!("phase: the next applied entry past the window drops it, in its changes");
    let applied = w.applied(Command::Noop);
    assert_eq!(
        without_clock(applied.changes),
        vec![Change {
            key: b"t/payments/p1".to_vec(),
            value: None
        }]
    );
    assert!(!has_tombstone(&w));

    eprintln!("phase: the original record replayed now is refused as expired");
    assert_eq!(w.reason(register(&k, &first)), Reason::Expired);

    eprintln!("phase: an expiry after the window leaves no tombstone at all");
    let late = w.record("payments", "p2", 1);
    w.applied(register(&k, &late));
    w.now_ms += MAX_AGE_MS + MAX_SKEW_MS + 1;
    w.applied(Command::Expire {
        service: "payments".into(),
        instance: "p2".into(),
        sequence: 1,
    });
    assert!(!w
        .registry
        .export()
        .iter()
        .any(|(key, _)| key.starts_with(b"t/")));
}

#[test]
fn expire_with_a_stale_sequence_does_nothing() {
    let mut w = World::new();
    let k = key(1);
    let bind = w.bind("payments", &[&k], 1);
    w.applied(bind);
    w.applied(register(&k, &w.record("payments", "p1", 1)));
    w.applied(register(&k, &w.record("payments", "p1", 2)));

    eprintln!("phase: expiry for the superseded sequence is refused and changes nothing");
    let stale = Command::Expire {
        service: "payments".into(),
        instance: "p1".into(),
        sequence: 1,
    };
    assert_eq!(w.reason(stale), Reason::StaleSequence);
    assert_eq!(w.registry.instance("payments", "p1").unwrap().sequence, 2);

    eprintln!("phase: expiry of an unknown instance");
    let unknown = Command::Expire {
        service: "payments".into(),
        instance: "p9".into(),
        sequence: 1,
    };
    assert_eq!(w.reason(unknown), Reason::NotFound);

    eprintln!("phase: expiry for the current sequence removes it and keeps a tombstone");
    let applied = w.applied(Command::Expire {
        service: "payments".into(),
        instance: "p1".into(),
        sequence: 2,
    });
    assert_eq!(applied.events[0].kind, EventKind::Delete);
    assert!(w.registry.instance("payments", "p1").is_none());
    let replay = register(&k, &w.record("payments", "p1", 2));
    assert_eq!(w.reason(replay), Reason::StaleSequence);
}

#[test]
fn reads_reflect_the_state() {
    let mut w = World::new();
    let k = key(1);
    let bind = w.bind("payments", &[&k], 1);
    w.applied(bind);
    let bind = w.bind("billing", &[&k], 1);
    w.applied(bind);
    for instance in ["p2", "p1", "p3"] {
        w.applied(register(&k, &w.record("payments", instance, 1)));
    }

    eprintln!("phase: resolve orders records by instance and carries the binding");
    let view = w.registry.resolve("payments").unwrap();
    let instances: Vec<String> = view
        .records
        .iter()
        .map(|bytes| {
            let envelope = signpost_record::decode_envelope(bytes).unwrap();
            signpost_record::open_record(&envelope)
                .unwrap()
                .payload
                .instance
        })
        .collect();
    assert_eq!(instances, ["p1", "p2", "p3"]);
    let binding = signpost_record::decode_envelope(&view.binding).unwrap();
    let binding =
        signpost_record::verify_binding(w.registry.admin_set().unwrap(), &binding, w.now_ms)
            .unwrap();
    for bytes in &view.records {
        let envelope = signpost_record::decode_envelope(bytes).unwrap();
        signpost_record::verify_record_against(&binding, &envelope).unwrap();
    }

    eprintln!("phase: a bound service without records resolves, but is not listed");
    assert!(w.registry.resolve("billing").unwrap().records.is_empty());
    assert!(w.registry.resolve("nothing").is_none());
    let listed: Vec<String> = w.registry.list().into_iter().map(|v| v.service).collect();
    assert_eq!(listed, ["payments"]);

    eprintln!("phase: lease facts");
    let info = w.registry.instance("payments", "p1").unwrap();
    assert_eq!((info.sequence, info.ttl_secs, info.key), (1, 30, raw(&k)));
    let all: Vec<_> = w.registry.instances().collect();
    assert_eq!(
        all,
        [
            ("payments", "p1", 1, 30),
            ("payments", "p2", 1, 30),
            ("payments", "p3", 1, 30)
        ]
    );
}

#[test]
fn log_types_round_trip_through_bincode() {
    let request = Request {
        time_ms: 5,
        caller: "spiffe://x/y".into(),
        command: Command::Genesis {
            admin_keys: vec![[7; 32]],
            admin_threshold: 1,
            quotas: Quotas::default(),
        },
    };
    let bytes = bincode::serialize(&request).unwrap();
    assert_eq!(bincode::deserialize::<Request>(&bytes).unwrap(), request);
    let outcome = Outcome::Rejected {
        reason: Reason::QuotaStateBytes,
        detail: "full".into(),
    };
    let bytes = bincode::serialize(&outcome).unwrap();
    assert_eq!(bincode::deserialize::<Outcome>(&bytes).unwrap(), outcome);
}

/// Drives a registry through `steps` seeded pseudo-random entries: valid and invalid
/// registrations, replays, deregistrations, rebinds, expiries, admin rotations and clock jumps.
fn random_world(seed: u64, steps: usize) -> World {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = World::new();
    let services = ["alpha", "beta", "gamma"];
    let instances = ["i1", "i2", "i3", "i4"];
    let keys: Vec<SigningKey> = (0..6).map(|i| key(500 + i)).collect();
    let mut binding_versions: BTreeMap<&str, u64> = BTreeMap::new();
    let mut bound: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut sequences: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut sent: Vec<Command> = Vec::new();
    let mut admin_version = 1;

    for service in services {
        let chosen = vec![rng.gen_range(0..keys.len())];
        let refs: Vec<&SigningKey> = chosen.iter().map(|&i| &keys[i]).collect();
        let bind = w.bind(service, &refs, 1);
        w.applied(bind);
        binding_versions.insert(service, 1);
        bound.insert(service, chosen);
    }

    for step in 0..steps {
        let service = services[rng.gen_range(0..services.len())];
        let instance = instances[rng.gen_range(0..instances.len())];
        let bound_keys = &bound[service];
        let signer = if !bound_keys.is_empty() && rng.gen_bool(0.9) {
            &keys[bound_keys[rng.gen_range(0..bound_keys.len())]]
        } else {
            &keys[rng.gen_range(0..keys.len())]
        };
        let next_sequence = sequences.get(&(service, instance)).copied().unwrap_or(0) + 1;
        let command = match rng.gen_range(0..100) {
            0..=44 => {
                let mut payload = w.record(service, instance, next_sequence);
                payload.issued_at_ms = w.now_ms - rng.gen_range(0..MAX_AGE_MS / 2);
                sequences.insert((service, instance), next_sequence);
                register(signer, &payload)
            }
            45..=54 => {
                let payload = w.dereg(service, instance, next_sequence);
                sequences.insert((service, instance), next_sequence);
                deregister(signer, &payload)
            }
            55..=64 if !sent.is_empty() => sent[rng.gen_range(0..sent.len())].clone(),
            65..=69 => {
                let version = binding_versions[service] + 1;
                binding_versions.insert(service, version);
                let count = rng.gen_range(0..=2);
                let chosen: Vec<usize> = (0..count).map(|_| rng.gen_range(0..keys.len())).collect();
                let mut chosen_sorted = chosen.clone();
                chosen_sorted.sort_unstable();
                chosen_sorted.dedup();
                let refs: Vec<&SigningKey> = chosen_sorted.iter().map(|&i| &keys[i]).collect();
                bound.insert(service, chosen_sorted.clone());
                w.bind(service, &refs, version)
            }
            70..=79 => {
                let sequence = w
                    .registry
                    .instance(service, instance)
                    .map(|i| i.sequence)
                    .unwrap_or(1);
                let sequence = if rng.gen_bool(0.8) {
                    sequence
                } else {
                    sequence + 1
                };
                Command::Expire {
                    service: service.into(),
                    instance: instance.into(),
                    sequence,
                }
            }
            80..=81 => {
                admin_version += 1;
                let admin = w.admins[0].clone();
                rotate(&[&admin], &[&admin], 1, admin_version)
            }
            82..=84 => Command::Register {
                envelope: (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect(),
            },
            _ => Command::Noop,
        };
        if rng.gen_bool(0.1) {
            w.now_ms += rng.gen_range(0..2 * (MAX_AGE_MS + MAX_SKEW_MS));
        } else {
            w.now_ms += rng.gen_range(0..1_000);
        }
        if matches!(
            command,
            Command::Register { .. } | Command::Deregister { .. }
        ) {
            sent.push(command.clone());
        }
        w.apply(command);
        if step % 250 == 0 {
            assert_eq!(Registry::load(w.registry.export()).unwrap(), w.registry);
        }
    }
    assert_eq!(Registry::load(w.registry.export()).unwrap(), w.registry);
    w
}

#[test]
fn a_leader_clock_that_ran_ahead_cannot_let_a_deregistered_record_be_replayed() {
    let mut w = World::new();
    let k = key(1);
    let bind = w.bind("payments", &[&k], 1);
    w.applied(bind);
    let start_ms = w.now_ms;

    eprintln!("phase: register at sequence 10, deregister at 11");
    let original = w.record("payments", "p1", 10);
    w.applied(register(&k, &original));
    w.applied(deregister(&k, &w.dereg("payments", "p1", 11)));

    eprintln!("phase: a leader an hour ahead applies an entry; the tombstone's window closes");
    w.now_ms = start_ms + 3_600_000;
    w.applied(Command::Noop);
    assert_eq!(w.registry.clock_ms(), start_ms + 3_600_000);
    assert!(!w
        .registry
        .export()
        .iter()
        .any(|(k, _)| k.starts_with(b"t/")));

    eprintln!("phase: a leader with the right clock takes over; the replay is still too old");
    w.now_ms = start_ms + 5_000;
    assert_eq!(w.reason(register(&k, &original)), Reason::Expired);
    assert!(w
        .registry
        .resolve("payments")
        .is_none_or(|v| v.records.is_empty()));

    eprintln!("phase: the clock survives export and load");
    let loaded = Registry::load(w.registry.export()).unwrap();
    assert_eq!(loaded.clock_ms(), start_ms + 3_600_000);
}

#[test]
fn a_batch_entry_applies_each_request_in_order_at_one_revision_with_its_own_outcome() {
    let mut w = World::new();
    let k = key(1);
    let bind = w.bind("payments", &[&k], 1);
    w.applied(bind);
    let request = |w: &World, command| Request {
        time_ms: w.now_ms,
        caller: "spiffe://example.org/service/payments".into(),
        command,
    };

    eprintln!("phase: two registrations, a replay of the first, and a third, in one entry");
    let p1 = w.record("payments", "p1", 10);
    let p2 = w.record("payments", "p2", 10);
    let p3 = w.record("payments", "p3", 10);
    let batch = Request {
        time_ms: w.now_ms,
        caller: String::new(),
        command: Command::Batch {
            requests: vec![
                request(&w, register(&k, &p1)),
                request(&w, register(&k, &p2)),
                request(&w, register(&k, &p1)),
                request(&w, register(&k, &p3)),
            ],
        },
    };
    w.revision += 1;
    let revision = w.revision;
    let applied = w.registry.apply_entry(revision, &batch, None);
    let outcomes: Vec<&Outcome> = applied.iter().map(|a| &a.outcome).collect();
    assert_eq!(outcomes.len(), 4, "one outcome per request");
    assert_eq!(outcomes[0], &Outcome::Applied { revision });
    assert_eq!(outcomes[1], &Outcome::Applied { revision });
    assert!(
        matches!(
            outcomes[2],
            Outcome::Rejected {
                reason: Reason::StaleSequence,
                ..
            }
        ),
        "the replay inside the batch sees the registration before it: {:?}",
        outcomes[2]
    );
    assert_eq!(outcomes[3], &Outcome::Applied { revision });
    assert!(applied[2].changes.is_empty() && applied[2].events.is_empty());
    assert!(applied
        .iter()
        .flat_map(|a| &a.events)
        .all(|e| e.revision == revision));
    assert_eq!(
        w.registry.resolve("payments").map(|v| v.records.len()),
        Some(3)
    );

    eprintln!("phase: the same requests one entry each give the same state");
    let mut single = World::new();
    let bind = single.bind("payments", &[&k], 1);
    single.applied(bind);
    for p in [&p1, &p2, &p1, &p3] {
        single.apply(register(&k, p));
    }
    // Records differ only in the revision they carry (one entry against four), so the keys
    // are compared: the same instances are live, nothing else was written.
    let keys = |registry: &Registry| -> Vec<Vec<u8>> {
        registry
            .export()
            .into_iter()
            .map(|(key, _)| key)
            .filter(|key| !key.starts_with(b"c/"))
            .collect()
    };
    assert_eq!(keys(&w.registry), keys(&single.registry));

    eprintln!("phase: a genesis or a batch inside a batch is refused, the rest applies");
    let p4 = w.record("payments", "p4", 10);
    let nested = Request {
        time_ms: w.now_ms,
        caller: String::new(),
        command: Command::Batch {
            requests: vec![
                request(
                    &w,
                    Command::Batch {
                        requests: vec![request(&w, register(&k, &p4))],
                    },
                ),
                request(
                    &w,
                    Command::Genesis {
                        admin_keys: vec![raw(&k)],
                        admin_threshold: 1,
                        quotas: Quotas::default(),
                    },
                ),
                request(&w, register(&k, &p4)),
            ],
        },
    };
    w.revision += 1;
    let applied = w.registry.apply_entry(w.revision, &nested, None);
    assert!(matches!(
        applied[0].outcome,
        Outcome::Rejected {
            reason: Reason::Malformed,
            ..
        }
    ));
    assert!(matches!(
        applied[1].outcome,
        Outcome::Rejected {
            reason: Reason::Malformed,
            ..
        }
    ));
    assert_eq!(
        applied[2].outcome,
        Outcome::Applied {
            revision: w.revision
        }
    );

    eprintln!("phase: a batch given to the one-request apply is refused, not half-applied");
    w.revision += 1;
    let refused = w.registry.apply(w.revision, &batch);
    assert!(matches!(
        refused.outcome,
        Outcome::Rejected {
            reason: Reason::Malformed,
            ..
        }
    ));
}

#[test]
fn events_of_one_entry_are_numbered_in_order_even_when_they_change_one_instance_twice() {
    let mut w = World::new();
    let k = key(1);
    let bind = w.bind("payments", &[&k], 1);
    w.applied(bind);
    let request = |w: &World, command| Request {
        time_ms: w.now_ms,
        caller: "spiffe://example.org/service/payments".into(),
        command,
    };

    eprintln!("phase: a single registration is event 0 of its revision");
    let single = w.apply(register(&k, &w.record("payments", "p1", 1)));
    let positions: Vec<(u64, u32)> = single
        .events
        .iter()
        .map(|e| (e.revision, e.position))
        .collect();
    assert_eq!(positions, [(w.revision, 0)]);

    eprintln!("phase: one entry registers p1 twice, a refused replay between, then p3");
    let again = w.record("payments", "p1", 2);
    let batch = Request {
        time_ms: w.now_ms,
        caller: String::new(),
        command: Command::Batch {
            requests: vec![
                request(&w, register(&k, &again)),
                request(&w, register(&k, &again)),
                request(&w, register(&k, &w.record("payments", "p1", 3))),
                request(&w, register(&k, &w.record("payments", "p3", 1))),
            ],
        },
    };
    w.revision += 1;
    let applied = w.registry.apply_entry(w.revision, &batch, None);
    assert!(applied[1].events.is_empty(), "the replay is refused");
    let events: Vec<(u64, u32, &str)> = applied
        .iter()
        .flat_map(|a| &a.events)
        .map(|e| (e.revision, e.position, e.instance.as_str()))
        .collect();
    assert_eq!(
        events,
        [
            (w.revision, 0, "p1"),
            (w.revision, 1, "p1"),
            (w.revision, 2, "p3")
        ],
        "both changes of p1 are events of their own, told apart by position"
    );
}

/// Applies `command` straight to `registry` (no per-apply invariant check: this builds large
/// states, where exporting before every apply would be quadratic).
fn apply_fast(registry: &mut Registry, revision: u64, command: Command) {
    let request = Request {
        time_ms: T0_MS,
        caller: "spiffe://example.org/test".into(),
        command,
    };
    let applied = registry.apply(revision, &request);
    assert_eq!(applied.outcome, Outcome::Applied { revision });
}

#[test]
fn a_restart_trusts_only_the_signatures_its_own_apply_verified() {
    eprintln!("phase: a state with more records than one thread loads (3 x 1,500)");
    let admin = key(1000);
    let service_key = key(1);
    let mut registry = Registry::new();
    let mut revision = 1;
    apply_fast(
        &mut registry,
        revision,
        Command::Genesis {
            admin_keys: vec![raw(&admin)],
            admin_threshold: 1,
            quotas: Quotas {
                instances_per_service_max: 2_000,
                ..Quotas::default()
            },
        },
    );
    let services = ["alpha", "beta", "gamma"];
    for service in services {
        revision += 1;
        let payload = BindingPayload {
            service: service.into(),
            public_keys: vec![raw(&service_key).to_vec()],
            version: 1,
            issued_at_ms: T0_MS,
            not_before_ms: 0,
            not_after_ms: 0,
        };
        let envelope = sign_binding(&admin, &payload).encode_to_vec();
        apply_fast(&mut registry, revision, Command::Bind { envelope });
    }
    let mut signatures = BTreeMap::new();
    for service in services {
        for i in 0..1_500 {
            revision += 1;
            let instance = format!("i{i:04}");
            let payload = RecordPayload {
                service: service.into(),
                instance: instance.clone(),
                sequence: 1,
                issued_at_ms: T0_MS,
                ttl_secs: 3_600,
                ..Default::default()
            };
            let envelope = sign_record(&service_key, &payload);
            signatures.insert(
                format!("r/{service}/{instance}"),
                envelope.signature.clone(),
            );
            apply_fast(
                &mut registry,
                revision,
                Command::Register {
                    envelope: envelope.encode_to_vec(),
                },
            );
        }
    }
    let export = registry.export();

    eprintln!("phase: both loads rebuild the same registry");
    assert_eq!(Registry::load(export.clone()).unwrap(), registry);
    assert_eq!(Registry::load_own(export.clone()).unwrap(), registry);

    eprintln!("phase: a broken signature deep in the parallel part");
    let target = "r/gamma/i1200";
    let index = export
        .iter()
        .position(|(k, _)| k == target.as_bytes())
        .unwrap();
    let signature = &signatures[target];
    let offset = export[index]
        .1
        .windows(signature.len())
        .position(|w| w == signature.as_slice())
        .expect("the stored value holds the envelope's signature");
    let mut broken = export.clone();
    broken[index].1[offset + 7] ^= 0x01;
    let error = Registry::load(broken.clone()).unwrap_err();
    assert!(
        matches!(&error, StateError::CorruptValue { key, .. } if key == target),
        "load (snapshots, backups) names the record whose signature fails: {error}"
    );
    assert!(
        Registry::load_own(broken).is_ok(),
        "a restart does not verify its own records' signatures again"
    );

    eprintln!("phase: a restart still refuses anything apply could not have written");
    let mut moved = export.clone();
    moved[index].0 = b"r/gamma/i9999".to_vec();
    let error = Registry::load_own(moved).unwrap_err();
    assert!(
        matches!(&error, StateError::CorruptValue { .. }),
        "a record under another instance's key: {error}"
    );
    let mut doubled = export.clone();
    doubled.push(export[index].clone());
    let error = Registry::load_own(doubled).unwrap_err();
    assert!(error.to_string().contains("twice"), "{error}");
    let mut other_signer = export.clone();
    let key_id = raw(&service_key);
    let at = other_signer[index]
        .1
        .windows(32)
        .position(|w| w == key_id.as_slice())
        .expect("the stored value holds the signer's key");
    other_signer[index].1[at] ^= 0x01;
    let error = Registry::load_own(other_signer).unwrap_err();
    assert!(
        matches!(&error, StateError::CorruptValue { .. }),
        "a record whose signer differs from the stored key: {error}"
    );
}

#[test]
fn every_applied_or_refused_command_is_one_audit_record_that_names_caller_and_result() {
    use sha2::Digest;
    use signpost_proto::v1::{audit_record::Op, AuditRecord};
    let record_of = |applied: &Applied| {
        AuditRecord::decode(applied.audit.as_deref().expect("audited")).expect("decodes")
    };
    let mut w = World::new();
    let k = key(1);

    eprintln!("phase: a binding is recorded as applied, by its version");
    let binding = w.bind("payments", &[&k], 1);
    let bind = w.applied(binding);
    let r = record_of(&bind);
    assert_eq!((Op::try_from(r.op), r.applied), (Ok(Op::Bind), true));
    assert_eq!((r.service.as_str(), r.sequence), ("payments", 1));
    assert_eq!(r.revision, w.revision);

    eprintln!("phase: a registration carries its caller, names, sequence and envelope hash");
    let payload = w.record("payments", "p1", 5);
    let command = register(&k, &payload);
    let Command::Register { envelope } = &command else {
        unreachable!()
    };
    let digest = sha2::Sha256::digest(envelope).to_vec();
    let applied = w.applied(command.clone());
    let r = record_of(&applied);
    assert_eq!(Op::try_from(r.op), Ok(Op::Register));
    assert_eq!(
        (r.service.as_str(), r.instance.as_str(), r.sequence),
        ("payments", "p1", 5)
    );
    assert_eq!(r.caller, "spiffe://example.org/test");
    assert_eq!(r.time_ms, w.now_ms);
    assert_eq!(r.envelope_sha256, digest);
    assert!(r.applied && r.reason.is_empty());

    eprintln!("phase: the replay is refused, changes nothing, and is recorded with its reason");
    let refused = w.apply(command);
    assert!(refused.changes.is_empty() && refused.events.is_empty());
    let r = record_of(&refused);
    assert!(!r.applied);
    assert_eq!(r.reason, "stale_sequence");
    assert_eq!(
        r.instance, "p1",
        "a refused command keeps the names it claimed"
    );
    assert!(r.detail.contains("sequence 5"));

    eprintln!("phase: junk is recorded as refused with no names; a no-op is not recorded");
    let junk = w.apply(Command::Register {
        envelope: vec![0xff; 40],
    });
    let r = record_of(&junk);
    assert_eq!((r.applied, r.reason.as_str()), (false, "malformed"));
    assert!(r.service.is_empty() && r.instance.is_empty());
    assert_eq!(r.envelope_sha256.len(), 32);
    assert!(w.apply(Command::Noop).audit.is_none());

    eprintln!("phase: an expiry is recorded; records are the same bytes on a second replica");
    let expired = w.applied(Command::Expire {
        service: "payments".into(),
        instance: "p1".into(),
        sequence: 5,
    });
    let r = record_of(&expired);
    assert_eq!(Op::try_from(r.op), Ok(Op::Expire));
    assert_eq!(r.caller, "spiffe://example.org/test");
    let mut replica = Registry::new();
    let replayed: Vec<Option<Vec<u8>>> = w
        .log
        .iter()
        .enumerate()
        .map(|(i, request)| replica.apply(i as u64 + 1, request).audit)
        .collect();
    assert_eq!(replayed.len() as u64, w.revision);
    assert_eq!(replayed.last(), Some(&expired.audit));
    assert_eq!(replayed[replayed.len() - 3], junk.audit);
    assert_eq!(
        replayed.iter().filter(|l| l.is_none()).count(),
        1,
        "only the no-op is not audited"
    );
}

/// The state commitment as a client rebuilds it from what Resolve serves: the binding and every
/// live record of the service.
fn rebuilt_value(view: &ServiceView) -> signpost_audit::Hash {
    use sha2::Digest;
    let entries = view
        .records
        .iter()
        .zip(&view.instances)
        .map(|(record, instance)| {
            (
                signpost_audit::name_key(instance),
                sha2::Sha256::digest(record).into(),
            )
        })
        .collect();
    let instances = signpost_audit::StateTree::from_entries(entries).expect("distinct instances");
    signpost_audit::service_value(
        &sha2::Sha256::digest(&view.binding).into(),
        &instances.root(),
    )
}

#[test]
fn every_audit_record_commits_to_the_whole_state_after_its_command() {
    use signpost_proto::v1::AuditRecord;
    let root_in = |applied: &Applied| {
        AuditRecord::decode(applied.audit.as_deref().expect("audited"))
            .expect("decodes")
            .state_root
    };
    let proves = |registry: &Registry, service: &str| {
        let value = registry.resolve(service).map(|view| rebuilt_value(&view));
        signpost_audit::verify_state_proof(
            &registry.state_root(),
            &signpost_audit::name_key(service),
            value.as_ref(),
            &registry.state_proof(service),
        )
    };
    let mut w = World::new();
    let k = key(1);

    eprintln!("phase: each applied command's record carries the root after it");
    let genesis_root = w.registry.state_root();
    assert_eq!(genesis_root, signpost_audit::EMPTY, "no binding, no record");
    let binding = w.bind("payments", &[&k], 1);
    let bound = w.applied(binding);
    assert_eq!(root_in(&bound), w.registry.state_root().to_vec());
    assert_ne!(w.registry.state_root(), genesis_root, "a binding is state");
    let before_p2 = {
        w.applied(register(&k, &w.record("payments", "p1", 5)));
        w.registry.state_root()
    };
    let p2 = w.applied(register(&k, &w.record("payments", "p2", 5)));
    assert_eq!(root_in(&p2), w.registry.state_root().to_vec());
    assert_ne!(w.registry.state_root(), before_p2);

    eprintln!("phase: every service proves its whole binding and records; others their absence");
    proves(&w.registry, "payments").expect("payments whole");
    proves(&w.registry, "ghost").expect("ghost absent");

    eprintln!("phase: a refused command leaves the root; a removal restores the earlier one");
    let after_p2 = w.registry.state_root();
    let refused = w.apply(register(&k, &w.record("payments", "p2", 5)));
    assert_eq!(root_in(&refused), after_p2.to_vec());
    w.applied(deregister(&k, &w.dereg("payments", "p2", 6)));
    assert_eq!(
        w.registry.state_root(),
        before_p2,
        "tombstones are not part of what clients are served"
    );
    let newer = w.applied(register(&k, &w.record("payments", "p1", 7)));
    assert_ne!(
        w.registry.state_root(),
        before_p2,
        "a new version is a new state"
    );
    assert_eq!(root_in(&newer), w.registry.state_root().to_vec());
    proves(&w.registry, "payments").expect("the new version");

    eprintln!("phase: a random log: every record's root is the state's, every service proves");
    let mut w = random_world(11, 400);
    for service in ["alpha", "beta", "gamma", "nothing-here"] {
        proves(&w.registry, service).expect("whole or absent");
    }
    let loaded = Registry::load(w.registry.export()).unwrap();
    assert_eq!(loaded.state_root(), w.registry.state_root());
    let again = w.apply(Command::Expire {
        service: "nothing-here".into(),
        instance: "i".into(),
        sequence: 1,
    });
    assert_eq!(root_in(&again), w.registry.state_root().to_vec());
}
