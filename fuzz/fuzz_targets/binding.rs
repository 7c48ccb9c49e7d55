//! Bindings: an arbitrary envelope verified against a fixed admin set, then a second arbitrary
//! envelope (the input's tail) verified as a record against whatever binding came out.
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
    let Ok(admins) = AdminSet::new(&[key(7)], 1, 2) else {
        return;
    };
    let split = data
        .first()
        .map(|b| *b as usize)
        .unwrap_or(0)
        .min(data.len());
    let (head, tail) = data.split_at(split);
    if let Ok(envelope) = signpost_record::decode_envelope(head) {
        if let Ok(binding) = signpost_record::verify_binding(&admins, &envelope, 1_700_000_000_000)
        {
            if let Ok(record) = signpost_record::decode_envelope(tail) {
                let _ = signpost_record::verify_record_against(&binding, &record);
            }
        }
    }
});
