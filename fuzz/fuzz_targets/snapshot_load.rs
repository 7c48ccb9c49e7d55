//! Snapshot loading: a snapshot body (format byte and key/value pairs, bincode as the state
//! machine writes it) loaded into a registry must load or be refused, never panic; a loaded
//! registry must export what it loaded.
#![no_main]

use bincode::Options;
use libfuzzer_sys::fuzz_target;

type Body = (u8, Vec<(Vec<u8>, Vec<u8>)>);

fuzz_target!(|data: &[u8]| {
    let Ok((_, pairs)) = bincode::DefaultOptions::new()
        .with_limit(16 * 1024 * 1024)
        .deserialize::<Body>(data)
    else {
        return;
    };
    if let Ok(registry) = signpost_state::Registry::load(pairs) {
        let exported = registry.export();
        let again = signpost_state::Registry::load(exported.clone())
            .expect("a registry's own export loads");
        assert_eq!(again.export(), exported, "export and load round-trip");
    }
});
