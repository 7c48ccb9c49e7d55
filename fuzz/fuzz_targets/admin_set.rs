//! Admin-set rotations: an arbitrary multi-signed envelope, alone or as a chain, checked
//! against a fixed genesis set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signpost_record::{AdminSet, SigningKey};

/// A valid public key (a fuzzer-chosen array is rarely a curve point).
fn key(seed: u8) -> [u8; 32] {
    SigningKey::from_bytes(&[seed; 32])
        .verifying_key()
        .to_bytes()
}

fuzz_target!(|data: &[u8]| {
    let genesis = AdminSet::new(&[key(7), key(9)], 1, AdminSet::GENESIS_VERSION);
    let Ok(genesis) = genesis else { return };
    if let Ok(envelope) = signpost_record::decode_multi_envelope(data) {
        let _ = signpost_record::open_admin_set(&envelope, &genesis);
        let _ = signpost_record::verify_admin_chain(&genesis, &[envelope.clone(), envelope]);
    }
});
