//! Envelope decoding and verification of every payload kind: arbitrary bytes must give a
//! verified value or an error, never a panic, whatever the signature says.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = signpost_record::decode_envelope(data) {
        let _ = signpost_record::open_record(&envelope);
        let _ = signpost_record::open_deregister(&envelope);
        let _ = signpost_record::open_binding(&envelope);
    }
});
