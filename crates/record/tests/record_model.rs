//! Behaviour of the record and signature model, through the public API only.

use std::collections::BTreeSet;

use ed25519_dalek::{SigningKey, VerifyingKey};
use prost::Message;
use rand::rngs::StdRng;
use rand::SeedableRng;
use signpost_proto::v1::{
    AdminSetPayload, BindingPayload, DeregisterPayload, Endpoint, Envelope, MultiEnvelope,
    RecordPayload, Signature,
};
use signpost_record::*;

fn key(seed: u64) -> SigningKey {
    SigningKey::generate(&mut StdRng::seed_from_u64(seed))
}

fn raw(key: &SigningKey) -> [u8; 32] {
    key.verifying_key().to_bytes()
}

fn record(service: &str, instance: &str) -> RecordPayload {
    RecordPayload {
        service: service.into(),
        instance: instance.into(),
        endpoints: vec![Endpoint {
            host: "10.0.0.5".into(),
            port: 443,
            protocol: "grpc".into(),
        }],
        metadata: [("zone".to_string(), "eu-west-1a".to_string())].into(),
        tls_identity: "spiffe://example.org/service/payments".into(),
        sequence: 7,
        issued_at_ms: 1_700_000_000_000,
        ttl_secs: 30,
    }
}

fn binding_payload(service: &str, keys: &[&SigningKey], version: u64) -> BindingPayload {
    BindingPayload {
        service: service.into(),
        public_keys: keys.iter().map(|k| raw(k).to_vec()).collect(),
        version,
        issued_at_ms: 1_700_000_000_000,
        not_before_ms: 0,
        not_after_ms: 0,
    }
}

fn admin_payload(keys: &[&SigningKey], threshold: u32, version: u64) -> AdminSetPayload {
    AdminSetPayload {
        public_keys: keys.iter().map(|k| raw(k).to_vec()).collect(),
        threshold,
        version,
        issued_at_ms: 1_700_000_000_000,
    }
}

fn admin_set(keys: &[&SigningKey], threshold: u32) -> AdminSet {
    let raw_keys: Vec<[u8; 32]> = keys.iter().map(|k| raw(k)).collect();
    AdminSet::new(&raw_keys, threshold, AdminSet::GENESIS_VERSION).unwrap()
}

/// 32 bytes that do not decompress to a curve point.
fn not_a_point() -> [u8; 32] {
    (0u8..=255)
        .map(|b| {
            let mut bytes = [0u8; 32];
            bytes[0] = b;
            bytes[1] = 0x55;
            bytes
        })
        .find(|bytes| VerifyingKey::from_bytes(bytes).is_err())
        .unwrap()
}

fn reason_of<T: std::fmt::Debug>(result: Result<T, RecordError>) -> Reason {
    result.unwrap_err().reason()
}

#[test]
fn every_kind_round_trips_through_sign_and_open() {
    let k = key(1);

    eprintln!("phase: a record opens to the same payload and signer");
    let payload = record("payments", "p1");
    let opened = open_record(&sign_record(&k, &payload)).unwrap();
    assert_eq!(opened.payload, payload);
    assert_eq!(opened.key, raw(&k));

    eprintln!("phase: a record survives envelope encoding and decode_envelope");
    let bytes = sign_record(&k, &payload).encode_to_vec();
    let opened = open_record(&decode_envelope(&bytes).unwrap()).unwrap();
    assert_eq!(opened.payload, payload);

    eprintln!("phase: a deregistration opens");
    let dereg = DeregisterPayload {
        service: "payments".into(),
        instance: "p1".into(),
        sequence: 8,
        issued_at_ms: 1,
    };
    assert_eq!(
        open_deregister(&sign_deregister(&k, &dereg))
            .unwrap()
            .payload,
        dereg
    );

    eprintln!("phase: a binding opens into a Binding");
    let opened = open_binding(&sign_binding(&k, &binding_payload("payments", &[&k], 3))).unwrap();
    assert_eq!(opened.payload.service, "payments");
    assert_eq!(opened.payload.keys, BTreeSet::from([raw(&k)]));
    assert_eq!(opened.payload.version, 3);

    eprintln!("phase: an admin set opens against its predecessor");
    let current = admin_set(&[&k], 1);
    let next = open_admin_set(
        &sign_admin_set(&[&k], &admin_payload(&[&k, &key(2)], 2, 2)),
        &current,
    )
    .unwrap();
    assert_eq!(next.threshold, 2);
    assert_eq!(next.version, 2);
    assert_eq!(next.keys.len(), 2);
}

#[test]
fn signature_over_one_kind_is_refused_as_another() {
    let k = key(1);
    let dereg = DeregisterPayload {
        service: "payments".into(),
        instance: "p1".into(),
        sequence: 8,
        issued_at_ms: 1,
    };

    eprintln!("phase: a deregistration envelope does not verify as a record or binding");
    let envelope = sign_deregister(&k, &dereg);
    assert!(verify_envelope(PayloadKind::Deregister, &envelope).is_ok());
    for kind in [
        PayloadKind::Record,
        PayloadKind::Binding,
        PayloadKind::AdminSet,
    ] {
        assert_eq!(
            reason_of(verify_envelope(kind, &envelope)),
            Reason::BadSignature,
            "{kind:?}"
        );
    }
    assert_eq!(reason_of(open_record(&envelope)), Reason::BadSignature);

    eprintln!("phase: the same bytes signed as a record open as a record");
    let same_bytes = sign(PayloadKind::Record, &k, envelope.payload.clone());
    assert!(verify_envelope(PayloadKind::Record, &same_bytes).is_ok());
}

#[test]
fn tampered_payload_is_a_bad_signature() {
    let k = key(1);
    let mut envelope = sign_record(&k, &record("payments", "p1"));

    eprintln!("phase: every single-bit flip of the payload is refused");
    for byte in 0..envelope.payload.len() {
        let mut tampered = envelope.clone();
        tampered.payload[byte] ^= 0x01;
        assert_eq!(reason_of(open_record(&tampered)), Reason::BadSignature);
    }

    eprintln!("phase: appending bytes is refused");
    envelope.payload.push(0);
    assert_eq!(reason_of(open_record(&envelope)), Reason::BadSignature);
}

#[test]
fn a_signature_verified_at_admission_is_reused_once_at_apply_and_never_for_other_bytes() {
    let k = key(1);
    let envelope = sign_record(&k, &record("payments", "p1"));
    let cache = VerifiedSignatures::new(16);

    eprintln!("phase: admission verifies and remembers");
    let admitted = open_record_with(&envelope, SignatureCheck::Remember(&cache)).unwrap();
    assert_eq!(cache.len(), 1);

    eprintln!("phase: apply of the same bytes reuses it, with the same result");
    let applied = open_record_with(&envelope, SignatureCheck::Reuse(&cache)).unwrap();
    assert_eq!(applied, admitted);
    assert_eq!(applied, open_record(&envelope).unwrap());
    assert!(cache.is_empty(), "the reuse consumed the memory");

    eprintln!("phase: other bytes (a tampered payload, a flipped signature) are verified");
    open_record_with(&envelope, SignatureCheck::Remember(&cache)).unwrap();
    let mut tampered = envelope.clone();
    tampered.payload[0] ^= 0x01;
    assert_eq!(
        reason_of(open_record_with(&tampered, SignatureCheck::Reuse(&cache))),
        Reason::BadSignature
    );
    let mut flipped = envelope.clone();
    flipped.signature[0] ^= 0x01;
    assert_eq!(
        reason_of(open_record_with(&flipped, SignatureCheck::Reuse(&cache))),
        Reason::BadSignature
    );

    eprintln!("phase: a refused signature is never remembered");
    let cache = VerifiedSignatures::new(16);
    assert_eq!(
        reason_of(open_record_with(&flipped, SignatureCheck::Remember(&cache))),
        Reason::BadSignature
    );
    assert!(cache.is_empty());

    eprintln!("phase: a record's signature does not stand for a deregistration");
    let cache = VerifiedSignatures::new(16);
    open_record_with(&envelope, SignatureCheck::Remember(&cache)).unwrap();
    assert_eq!(
        reason_of(open_deregister_with(
            &envelope,
            SignatureCheck::Reuse(&cache)
        )),
        Reason::BadSignature
    );
}

#[test]
fn signature_with_another_key_id_is_a_bad_signature() {
    let signer = key(1);
    let other = key(2);
    let mut envelope = sign_record(&signer, &record("payments", "p1"));
    envelope.key_id = raw(&other).to_vec();
    assert_eq!(reason_of(open_record(&envelope)), Reason::BadSignature);
}

#[test]
fn malleated_signature_is_refused_by_verify_strict() {
    // Adding the group order L to s gives a second encoding of the same scalar; a lax verifier
    // would accept it, making signatures malleable.
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let k = key(1);
    let mut envelope = sign_record(&k, &record("payments", "p1"));
    let mut carry = 0u16;
    for (i, l) in L.iter().enumerate() {
        let sum = u16::from(envelope.signature[32 + i]) + u16::from(*l) + carry;
        envelope.signature[32 + i] = (sum & 0xff) as u8;
        carry = sum >> 8;
    }
    assert_eq!(carry, 0);
    assert_eq!(reason_of(open_record(&envelope)), Reason::BadSignature);
}

#[test]
fn key_id_and_signature_lengths_and_points_are_checked() {
    let k = key(1);
    let good = sign_record(&k, &record("payments", "p1"));

    eprintln!("phase: key_id of 31 and 33 bytes is malformed");
    for len in [0, 31, 33] {
        let mut envelope = good.clone();
        envelope.key_id.resize(len, 7);
        assert_eq!(reason_of(open_record(&envelope)), Reason::Malformed);
    }

    eprintln!("phase: a key_id that is not a curve point is malformed");
    let mut envelope = good.clone();
    envelope.key_id = not_a_point().to_vec();
    assert_eq!(reason_of(open_record(&envelope)), Reason::Malformed);

    eprintln!("phase: a small-order key_id never verifies");
    let mut envelope = good.clone();
    let mut identity = [0u8; 32];
    identity[0] = 1;
    envelope.key_id = identity.to_vec();
    assert_eq!(reason_of(open_record(&envelope)), Reason::BadSignature);

    eprintln!("phase: a signature that is not 64 bytes is malformed");
    let mut envelope = good;
    envelope.signature.pop();
    assert_eq!(reason_of(open_record(&envelope)), Reason::Malformed);
}

#[test]
fn malformed_bytes_are_malformed() {
    let k = key(1);

    eprintln!("phase: bytes that are not an envelope");
    assert_eq!(
        reason_of(decode_envelope(&[0xff, 0xff, 0xff])),
        Reason::Malformed
    );
    assert_eq!(
        reason_of(decode_multi_envelope(&[0x0a, 0x05, 0x01])),
        Reason::Malformed
    );

    eprintln!("phase: a correctly signed payload that is not a RecordPayload");
    let envelope = sign(PayloadKind::Record, &k, vec![0xff, 0xff, 0xff]);
    assert_eq!(reason_of(open_record(&envelope)), Reason::Malformed);
}

#[test]
fn oversized_input_is_refused_before_decoding() {
    eprintln!("phase: garbage above the envelope limit is oversized, not malformed");
    let bytes = vec![0xffu8; ENVELOPE_BYTES_MAX + 1];
    assert_eq!(reason_of(decode_envelope(&bytes)), Reason::Oversized);
    assert_eq!(reason_of(decode_multi_envelope(&bytes)), Reason::Oversized);

    eprintln!("phase: a signed payload above the payload limit is oversized");
    let k = key(1);
    let envelope = sign(PayloadKind::Record, &k, vec![0u8; PAYLOAD_BYTES_MAX + 1]);
    assert_eq!(reason_of(open_record(&envelope)), Reason::Oversized);

    eprintln!("phase: a payload at the limit is not oversized (it fails later, as malformed)");
    let envelope = sign(PayloadKind::Record, &k, vec![0u8; PAYLOAD_BYTES_MAX]);
    assert_eq!(reason_of(open_record(&envelope)), Reason::Malformed);
}

#[test]
fn service_name_grammar() {
    let long_ok = format!("a{}", "b".repeat(62));
    let long_bad = format!("a{}", "b".repeat(63));
    for ok in [
        "a",
        "payments",
        "pay-ments.v2",
        "a1",
        "a.b.c",
        long_ok.as_str(),
    ] {
        assert!(validate_service_name(ok).is_ok(), "{ok:?}");
    }
    for (bad, rule) in [
        ("", "empty"),
        (long_bad.as_str(), "longer than 63 bytes"),
        ("Payments", "uppercase"),
        ("pay_ments", "underscore"),
        ("pay/ments", "slash"),
        ("pay ments", "space"),
        ("pâyments", "non-ASCII"),
        ("1payments", "starts with a digit"),
        ("-payments", "starts with a dash"),
        (".payments", "starts with a dot"),
        ("payments-", "ends with a dash"),
        ("payments.", "ends with a dot"),
        ("pay..ments", "double dot"),
    ] {
        eprintln!("phase: service name refused when {rule}");
        assert_eq!(
            reason_of(validate_service_name(bad)),
            Reason::InvalidName,
            "{bad:?}"
        );
    }
}

#[test]
fn instance_id_grammar() {
    let long_ok = "i".repeat(128);
    let long_bad = "i".repeat(129);
    for ok in ["p1", "P1", "0", "host-1.zone_a:8080", long_ok.as_str()] {
        assert!(validate_instance_id(ok).is_ok(), "{ok:?}");
    }
    for (bad, rule) in [
        ("", "empty"),
        (long_bad.as_str(), "longer than 128 bytes"),
        ("-p1", "starts with a dash"),
        ("_p1", "starts with an underscore"),
        (".p1", "starts with a dot"),
        ("p/1", "slash"),
        ("p 1", "space"),
        ("p1é", "non-ASCII"),
    ] {
        eprintln!("phase: instance id refused when {rule}");
        assert_eq!(
            reason_of(validate_instance_id(bad)),
            Reason::InvalidName,
            "{bad:?}"
        );
    }
}

#[test]
fn record_field_limits() {
    let base = record("payments", "p1");
    let check = |label: &str, edit: &dyn Fn(&mut RecordPayload), expected: Option<Reason>| {
        eprintln!("phase: {label}");
        let mut payload = base.clone();
        edit(&mut payload);
        let got = validate_record_payload(&payload).err().map(|e| e.reason());
        assert_eq!(got, expected, "{label}");
    };
    let endpoint = |host: &str, port: u32, protocol: &str| Endpoint {
        host: host.into(),
        port,
        protocol: protocol.into(),
    };
    let invalid = Some(Reason::InvalidField);

    check("the base record is valid", &|_| {}, None);
    check(
        "bad service name",
        &|p| p.service = "Pay".into(),
        Some(Reason::InvalidName),
    );
    check(
        "bad instance id",
        &|p| p.instance = "-x".into(),
        Some(Reason::InvalidName),
    );
    check("sequence 0", &|p| p.sequence = 0, invalid);

    check("ttl at minimum", &|p| p.ttl_secs = TTL_SECS_MIN, None);
    check(
        "ttl below minimum",
        &|p| p.ttl_secs = TTL_SECS_MIN - 1,
        invalid,
    );
    check("ttl at maximum", &|p| p.ttl_secs = TTL_SECS_MAX, None);
    check(
        "ttl above maximum",
        &|p| p.ttl_secs = TTL_SECS_MAX + 1,
        invalid,
    );

    check("no endpoints", &|p| p.endpoints.clear(), None);
    check(
        "endpoints at maximum",
        &|p| p.endpoints = vec![endpoint("h", 1, ""); ENDPOINTS_MAX],
        None,
    );
    check(
        "endpoints above maximum",
        &|p| p.endpoints = vec![endpoint("h", 1, ""); ENDPOINTS_MAX + 1],
        invalid,
    );
    check("empty host", &|p| p.endpoints[0].host.clear(), invalid);
    check(
        "host at maximum",
        &|p| p.endpoints[0].host = "h".repeat(HOST_BYTES_MAX),
        None,
    );
    check(
        "host above maximum",
        &|p| p.endpoints[0].host = "h".repeat(HOST_BYTES_MAX + 1),
        invalid,
    );
    check(
        "IPv6 host literal",
        &|p| p.endpoints[0].host = "[fe80::1%eth0]".into(),
        None,
    );
    check(
        "host with a slash",
        &|p| p.endpoints[0].host = "h/x".into(),
        invalid,
    );
    check("port 0", &|p| p.endpoints[0].port = 0, invalid);
    check("port 65535", &|p| p.endpoints[0].port = 65535, None);
    check("port 65536", &|p| p.endpoints[0].port = 65536, invalid);
    check(
        "protocol at maximum",
        &|p| p.endpoints[0].protocol = "a".repeat(PROTOCOL_BYTES_MAX),
        None,
    );
    check(
        "protocol above maximum",
        &|p| p.endpoints[0].protocol = "a".repeat(PROTOCOL_BYTES_MAX + 1),
        invalid,
    );
    check(
        "protocol with allowed punctuation",
        &|p| p.endpoints[0].protocol = "h2+tls.v-1".into(),
        None,
    );
    check(
        "protocol uppercase",
        &|p| p.endpoints[0].protocol = "GRPC".into(),
        invalid,
    );

    let entries = |n: usize, key_len: usize, value_len: usize| {
        (0..n)
            .map(|i| {
                let mut key = format!("k{i:02}");
                key.push_str(&"k".repeat(key_len.saturating_sub(key.len())));
                (key, "v".repeat(value_len))
            })
            .collect()
    };
    check(
        "metadata entries at maximum",
        &|p| p.metadata = entries(METADATA_ENTRIES_MAX, 3, 1),
        None,
    );
    check(
        "metadata entries above maximum",
        &|p| p.metadata = entries(METADATA_ENTRIES_MAX + 1, 3, 1),
        invalid,
    );
    check(
        "metadata empty key",
        &|p| p.metadata = [(String::new(), "v".into())].into(),
        invalid,
    );
    check(
        "metadata key at maximum",
        &|p| p.metadata = entries(1, METADATA_KEY_BYTES_MAX, 1),
        None,
    );
    check(
        "metadata key above maximum",
        &|p| p.metadata = entries(1, METADATA_KEY_BYTES_MAX + 1, 1),
        invalid,
    );
    check(
        "metadata key with allowed punctuation",
        &|p| p.metadata = [("app.kubernetes.io/part-of_x".into(), "v".into())].into(),
        None,
    );
    check(
        "metadata key uppercase",
        &|p| p.metadata = [("Zone".into(), "v".into())].into(),
        invalid,
    );
    check(
        "metadata value at maximum",
        &|p| p.metadata = entries(1, 3, METADATA_VALUE_BYTES_MAX),
        None,
    );
    check(
        "metadata value above maximum",
        &|p| p.metadata = entries(1, 3, METADATA_VALUE_BYTES_MAX + 1),
        invalid,
    );
    // 4 entries of 3 + 1021 bytes are exactly 4096 bytes; one more byte is over.
    check(
        "metadata total at maximum",
        &|p| p.metadata = entries(4, 3, 1021),
        None,
    );
    check(
        "metadata total above maximum",
        &|p| p.metadata = entries(4, 3, 1022),
        invalid,
    );

    check(
        "tls identity at maximum",
        &|p| p.tls_identity = "t".repeat(TLS_IDENTITY_BYTES_MAX),
        None,
    );
    check(
        "tls identity above maximum",
        &|p| p.tls_identity = "t".repeat(TLS_IDENTITY_BYTES_MAX + 1),
        invalid,
    );

    eprintln!("phase: open_record applies the same limits after the signature check");
    let mut payload = base.clone();
    payload.ttl_secs = 1;
    assert_eq!(
        reason_of(open_record(&sign_record(&key(1), &payload))),
        Reason::InvalidField
    );
}

#[test]
fn binding_field_limits() {
    let k = key(1);
    let check = |label: &str, payload: BindingPayload, expected: Option<Reason>| {
        eprintln!("phase: {label}");
        let got = Binding::from_payload(&payload).err().map(|e| e.reason());
        assert_eq!(got, expected, "{label}");
    };
    let keys: Vec<SigningKey> = (0..=BINDING_KEYS_MAX as u64)
        .map(|i| key(100 + i))
        .collect();
    let refs: Vec<&SigningKey> = keys.iter().collect();
    let invalid = Some(Reason::InvalidField);

    check(
        "no keys (revocation)",
        binding_payload("payments", &[], 1),
        None,
    );
    check(
        "keys at maximum",
        binding_payload("payments", &refs[..BINDING_KEYS_MAX], 1),
        None,
    );
    check(
        "keys above maximum",
        binding_payload("payments", &refs, 1),
        invalid,
    );
    check(
        "duplicate key",
        binding_payload("payments", &[&k, &k], 1),
        invalid,
    );
    let mut short = binding_payload("payments", &[&k], 1);
    short.public_keys[0].pop();
    check("key of 31 bytes", short, invalid);
    let mut off_curve = binding_payload("payments", &[], 1);
    off_curve.public_keys.push(not_a_point().to_vec());
    check("key off the curve", off_curve, invalid);
    check("version 0", binding_payload("payments", &[&k], 0), invalid);
    check(
        "bad service name",
        binding_payload("Pay", &[&k], 1),
        Some(Reason::InvalidName),
    );
    let mut inverted = binding_payload("payments", &[&k], 1);
    inverted.not_before_ms = 10;
    inverted.not_after_ms = 5;
    check("window ends before it starts", inverted, invalid);
}

#[test]
fn admin_set_rules() {
    let a = key(1);
    let b = key(2);
    let c = key(3);
    let outsider = key(4);
    let current = admin_set(&[&a, &b, &c], 2);
    let next = admin_payload(&[&a, &b], 1, 2);

    eprintln!("phase: one admin alone cannot rotate a 2-of-3 set");
    assert_eq!(
        reason_of(open_admin_set(&sign_admin_set(&[&a], &next), &current)),
        Reason::ThresholdNotMet
    );

    eprintln!("phase: the same admin signing twice still counts once");
    assert_eq!(
        reason_of(open_admin_set(&sign_admin_set(&[&a, &a], &next), &current)),
        Reason::ThresholdNotMet
    );

    eprintln!("phase: signatures by keys outside the set are ignored, not counted");
    assert_eq!(
        reason_of(open_admin_set(
            &sign_admin_set(&[&a, &outsider], &next),
            &current
        )),
        Reason::ThresholdNotMet
    );
    let mut junk_from_outsider = sign_admin_set(&[&a, &b], &next);
    junk_from_outsider.signatures.push(Signature {
        key_id: raw(&outsider).to_vec(),
        signature: vec![0; 64],
    });
    assert!(open_admin_set(&junk_from_outsider, &current).is_ok());

    eprintln!("phase: two distinct admins meet the threshold");
    let rotated = open_admin_set(&sign_admin_set(&[&c, &a], &next), &current).unwrap();
    assert_eq!(rotated, admin_set_with_version(&[&a, &b], 1, 2));

    eprintln!("phase: an invalid signature by a current admin is an error");
    let mut forged = sign_admin_set(&[&a, &b, &c], &next);
    forged.signatures[2].signature[0] ^= 1;
    assert_eq!(
        reason_of(open_admin_set(&forged, &current)),
        Reason::BadSignature
    );

    eprintln!("phase: the version must be exactly current + 1");
    for version in [1, 3] {
        let payload = admin_payload(&[&a], 1, version);
        assert_eq!(
            reason_of(open_admin_set(
                &sign_admin_set(&[&a, &b], &payload),
                &current
            )),
            Reason::StaleVersion,
            "version {version}"
        );
    }

    eprintln!("phase: the next set's own shape is validated");
    for (payload, label) in [
        (admin_payload(&[], 1, 2), "no keys"),
        (admin_payload(&[&a, &b], 0, 2), "threshold 0"),
        (admin_payload(&[&a, &b], 3, 2), "threshold above key count"),
        (admin_payload(&[&a, &a], 1, 2), "duplicate key"),
    ] {
        assert_eq!(
            reason_of(open_admin_set(
                &sign_admin_set(&[&a, &b], &payload),
                &current
            )),
            Reason::InvalidField,
            "{label}"
        );
    }
    let many: Vec<SigningKey> = (0..=ADMIN_KEYS_MAX as u64).map(|i| key(200 + i)).collect();
    let many_refs: Vec<&SigningKey> = many.iter().collect();
    assert_eq!(
        reason_of(open_admin_set(
            &sign_admin_set(&[&a, &b], &admin_payload(&many_refs, 1, 2)),
            &current
        )),
        Reason::InvalidField
    );

    eprintln!("phase: a binding signature is not an admin set signature");
    let cross = MultiEnvelope {
        payload: next.encode_to_vec(),
        signatures: [&a, &b]
            .iter()
            .map(|k| {
                let e = sign(PayloadKind::Binding, k, next.encode_to_vec());
                Signature {
                    key_id: e.key_id,
                    signature: e.signature,
                }
            })
            .collect(),
    };
    assert_eq!(
        reason_of(open_admin_set(&cross, &current)),
        Reason::BadSignature
    );

    eprintln!("phase: AdminSet::new validates like a payload");
    assert_eq!(reason_of(AdminSet::new(&[], 1, 1)), Reason::InvalidField);
    assert_eq!(
        reason_of(AdminSet::new(&[raw(&a), raw(&a)], 1, 1)),
        Reason::InvalidField
    );
}

fn admin_set_with_version(keys: &[&SigningKey], threshold: u32, version: u64) -> AdminSet {
    let raw_keys: Vec<[u8; 32]> = keys.iter().map(|k| raw(k)).collect();
    AdminSet::new(&raw_keys, threshold, version).unwrap()
}

#[test]
fn admin_chain_is_followed_from_genesis() {
    let a = key(1);
    let b = key(2);
    let c = key(3);
    let genesis = admin_set(&[&a], 1);
    let step1 = sign_admin_set(&[&a], &admin_payload(&[&a, &b, &c], 2, 2));
    let step2 = sign_admin_set(&[&b, &c], &admin_payload(&[&c], 1, 3));

    eprintln!("phase: an empty chain ends at genesis");
    assert_eq!(verify_admin_chain(&genesis, &[]).unwrap(), genesis);

    eprintln!("phase: two rotations end at the last set");
    let end = verify_admin_chain(&genesis, &[step1.clone(), step2.clone()]).unwrap();
    assert_eq!(end, admin_set_with_version(&[&c], 1, 3));

    eprintln!("phase: out of order, the chain breaks");
    assert_eq!(
        reason_of(verify_admin_chain(
            &genesis,
            &[step2.clone(), step1.clone()]
        )),
        Reason::ThresholdNotMet
    );

    eprintln!("phase: a step signed by the removed key alone is refused");
    let rogue = sign_admin_set(&[&a], &admin_payload(&[&a], 1, 3));
    assert_eq!(
        reason_of(verify_admin_chain(&genesis, &[step1, rogue])),
        Reason::ThresholdNotMet
    );

    eprintln!("phase: a chain longer than the bound is refused");
    let long = vec![step2; ADMIN_CHAIN_ENTRIES_MAX + 1];
    assert_eq!(
        reason_of(verify_admin_chain(&genesis, &long)),
        Reason::Oversized
    );
}

#[test]
fn binding_is_verified_against_admins_and_window() {
    let admin = key(1);
    let service_key = key(2);
    let admins = admin_set(&[&admin], 1);
    let mut payload = binding_payload("payments", &[&service_key], 1);
    payload.not_before_ms = 1_000;
    payload.not_after_ms = 2_000;
    let envelope = sign_binding(&admin, &payload);

    eprintln!("phase: inside the window, both ends inclusive");
    for now in [1_000, 1_500, 2_000] {
        let binding = verify_binding(&admins, &envelope, now).unwrap();
        assert_eq!(binding.keys, BTreeSet::from([raw(&service_key)]));
    }

    eprintln!("phase: before and after the window");
    assert_eq!(
        reason_of(verify_binding(&admins, &envelope, 999)),
        Reason::BindingNotYetValid
    );
    assert_eq!(
        reason_of(verify_binding(&admins, &envelope, 2_001)),
        Reason::BindingExpired
    );

    eprintln!("phase: zero bounds mean unbounded");
    let open_ended = sign_binding(&admin, &binding_payload("payments", &[&service_key], 1));
    for now in [0, u64::MAX] {
        assert!(verify_binding(&admins, &open_ended, now).is_ok());
    }

    eprintln!("phase: a binding signed by a non-admin is refused");
    let self_signed = sign_binding(&service_key, &payload);
    assert_eq!(
        reason_of(verify_binding(&admins, &self_signed, 1_500)),
        Reason::NotAdmin
    );

    eprintln!("phase: records are checked against the binding");
    let binding = verify_binding(&admins, &envelope, 1_500).unwrap();
    let good = sign_record(&service_key, &record("payments", "p1"));
    assert_eq!(
        verify_record_against(&binding, &good).unwrap().key,
        raw(&service_key)
    );
    let unbound = sign_record(&key(3), &record("payments", "p1"));
    assert_eq!(
        reason_of(verify_record_against(&binding, &unbound)),
        Reason::UnboundKey
    );
    let other_service = sign_record(&service_key, &record("billing", "b1"));
    assert_eq!(
        reason_of(verify_record_against(&binding, &other_service)),
        Reason::WrongService
    );
}

#[test]
fn reason_codes_are_stable_strings() {
    eprintln!("phase: as_str, Display and FromStr agree for every reason");
    let mut seen = BTreeSet::new();
    for reason in Reason::ALL {
        let s = reason.as_str();
        assert!(seen.insert(s), "duplicate code {s}");
        assert_eq!(reason.to_string(), s);
        assert_eq!(s.parse::<Reason>().unwrap(), reason);
        assert_eq!(serde_json::to_string(&reason).unwrap(), format!("\"{s}\""));
    }
    assert_eq!(Reason::BadSignature.as_str(), "bad_signature");
    assert_eq!(Reason::QuotaStateBytes.as_str(), "quota_state_bytes");
    assert!("no_such_reason".parse::<Reason>().is_err());

    eprintln!("phase: errors carry their reason and detail");
    let error = RecordError::new(Reason::NotFound, "instance p1 of payments");
    assert_eq!(error.reason(), Reason::NotFound);
    assert_eq!(error.to_string(), "not_found: instance p1 of payments");
}

#[test]
fn key_files_round_trip_with_private_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("payments.key");
    let k = key(1);

    eprintln!("phase: write, then read both halves back");
    write_key_files(&path, &k).unwrap();
    assert_eq!(read_signing_key(&path).unwrap().to_bytes(), k.to_bytes());
    let pub_path = public_key_path(&path);
    assert_eq!(pub_path, dir.path().join("payments.key.pub"));
    assert_eq!(read_verifying_key(&pub_path).unwrap(), k.verifying_key());
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, format!("{}\n", hex::encode(k.to_bytes())));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        eprintln!("phase: the secret is mode 0600");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    eprintln!("phase: an existing key is never overwritten");
    assert!(write_key_files(&path, &key(2)).is_err());
    assert_eq!(read_signing_key(&path).unwrap().to_bytes(), k.to_bytes());

    eprintln!("phase: surrounding whitespace is accepted");
    let spaced = dir.path().join("spaced.pub");
    std::fs::write(
        &spaced,
        format!("  \n{}\r\n\n", public_key_hex(&k.verifying_key())),
    )
    .unwrap();
    assert_eq!(read_verifying_key(&spaced).unwrap(), k.verifying_key());

    eprintln!("phase: wrong length and bad hex are clear errors");
    let short = dir.path().join("short.key");
    std::fs::write(&short, "abcd\n").unwrap();
    let error = read_signing_key(&short).unwrap_err();
    assert_eq!(error.reason(), Reason::Malformed);
    assert!(
        error.to_string().contains("expected 64 hex digits"),
        "{error}"
    );
    let bad_hex = dir.path().join("bad.key");
    std::fs::write(&bad_hex, "zz".repeat(32)).unwrap();
    let error = read_signing_key(&bad_hex).unwrap_err();
    assert!(error.to_string().contains("invalid hex"), "{error}");

    eprintln!("phase: a missing file names the path");
    let error = read_signing_key(&dir.path().join("missing.key")).unwrap_err();
    assert!(error.to_string().contains("missing.key"), "{error}");

    eprintln!("phase: public key hex round trip and point check");
    let hex_key = public_key_hex(&k.verifying_key());
    assert_eq!(parse_public_key_hex(&hex_key).unwrap(), k.verifying_key());
    assert_eq!(
        reason_of(parse_public_key_hex(&hex::encode(not_a_point()))),
        Reason::Malformed
    );
}

#[test]
fn envelope_with_unknown_fields_still_verifies_over_its_payload_bytes() {
    // The envelope wrapper is not signed; only the payload bytes are. Extra fields in the
    // wrapper do not matter, which is why verifiers never need to re-encode it.
    let k = key(1);
    let envelope = sign_record(&k, &record("payments", "p1"));
    let mut bytes = envelope.encode_to_vec();
    bytes.extend_from_slice(&[0x78, 0x01]); // field 15, varint 1
    let decoded: Envelope = decode_envelope(&bytes).unwrap();
    assert!(open_record(&decoded).is_ok());
}
