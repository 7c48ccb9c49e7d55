//! Writes the seed corpus: one valid input per target (signed with the same keys the targets
//! trust), so a short fuzzing run starts from inputs that reach the deep checks. Run once:
//! `cargo +nightly run --release --bin make_seeds` in this directory.

use bincode::Options;
use prost::Message;
use signpost_proto::v1::{
    AdminSetPayload, BindingPayload, DeregisterPayload, Endpoint, RecordPayload,
};
use signpost_record::SigningKey;

const NOW_MS: u64 = 1_700_000_000_000;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = std::path::Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed");
}

fn main() {
    let admin = SigningKey::from_bytes(&[7; 32]);
    let service_key = SigningKey::from_bytes(&[11; 32]);
    let record = RecordPayload {
        service: "payments".into(),
        instance: "p1".into(),
        endpoints: vec![Endpoint {
            host: "10.0.0.1".into(),
            port: 443,
            protocol: "grpc".into(),
        }],
        metadata: [("zone".to_string(), "a".to_string())].into(),
        tls_identity: "spiffe://signpost.local/service/payments".into(),
        sequence: 1,
        issued_at_ms: NOW_MS,
        ttl_secs: 30,
    };
    let record_env = signpost_record::sign_record(&service_key, &record);
    let binding = BindingPayload {
        service: "payments".into(),
        public_keys: vec![service_key.verifying_key().to_bytes().to_vec()],
        version: 1,
        issued_at_ms: NOW_MS,
        not_before_ms: 0,
        not_after_ms: 0,
    };
    let binding_env = signpost_record::sign_binding(&admin, &binding);
    let deregister = DeregisterPayload {
        service: "payments".into(),
        instance: "p1".into(),
        sequence: 2,
        issued_at_ms: NOW_MS,
    };
    write("envelope", "record", &record_env.encode_to_vec());
    write("envelope", "binding", &binding_env.encode_to_vec());
    write(
        "envelope",
        "deregister",
        &signpost_record::sign_deregister(&service_key, &deregister).encode_to_vec(),
    );
    let rotation = AdminSetPayload {
        public_keys: vec![SigningKey::from_bytes(&[9; 32])
            .verifying_key()
            .to_bytes()
            .to_vec()],
        threshold: 1,
        version: 2,
        issued_at_ms: NOW_MS,
    };
    write(
        "admin_set",
        "rotation",
        &signpost_record::sign_admin_set(&[&admin], &rotation).encode_to_vec(),
    );
    let binding_bytes = binding_env.encode_to_vec();
    let mut paired = vec![binding_bytes.len() as u8];
    if binding_bytes.len() < 256 {
        paired.extend_from_slice(&binding_bytes);
        paired.extend_from_slice(&record_env.encode_to_vec());
        write("binding", "binding-and-record", &paired);
    }

    let mut registry = signpost_state::Registry::new();
    let requests = [
        signpost_state::Command::Genesis {
            admin_keys: vec![admin.verifying_key().to_bytes()],
            admin_threshold: 1,
            quotas: signpost_state::Quotas {
                instances_per_service_max: 1024,
                services_max: 1024,
                state_bytes_max: 1 << 30,
            },
        },
        signpost_state::Command::Bind {
            envelope: binding_env.encode_to_vec(),
        },
        signpost_state::Command::Register {
            envelope: record_env.encode_to_vec(),
        },
    ];
    let options = bincode::DefaultOptions::new().with_limit(64 * 1024 * 1024);
    let mut entries = Vec::new();
    for (i, command) in requests.into_iter().enumerate() {
        let request = signpost_state::Request {
            time_ms: NOW_MS,
            caller: "spiffe://signpost.local/node/1".into(),
            command,
        };
        let applied = registry.apply(i as u64 + 1, &request);
        assert!(
            matches!(applied.outcome, signpost_state::Outcome::Applied { .. }),
            "seed command {i} applies: {:?}",
            applied.outcome
        );
        entries.push(request);
    }
    let body: (u8, Vec<(Vec<u8>, Vec<u8>)>) = (1, registry.export());
    write(
        "snapshot_load",
        "registry",
        &options.serialize(&body).expect("encode"),
    );
    // A Raft entry payload as the log carries it: (log id, payload) in openraft's serde shape
    // is produced by the target's own types; the request alone is a useful seed too.
    write(
        "raft_rpc",
        "request",
        &options.serialize(&entries[2]).expect("encode"),
    );
}
