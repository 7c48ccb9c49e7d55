//! A node's memory of signatures it has already verified, so the leader's admission check and
//! its apply of the same bytes cost one `verify_strict`, not two; and of the public keys it has
//! already decompressed, so a service's thousandth registration does not pay for its key's
//! square root again.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};

use crate::error::RecordError;
use crate::limits::PUBLIC_KEY_BYTES;
use crate::payload_kind::PayloadKind;
use crate::verify::parse_public_key;

/// Default number of remembered signatures: far above the proposals a node has in flight, and
/// about 1 MiB with the set's overhead.
pub const VERIFIED_SIGNATURES_DEFAULT: usize = 16_384;

/// Decompressed public keys kept, at most: one per bound service a node sees registering, about
/// 200 bytes each. When full the set starts again empty, which costs one decompression per key.
pub(crate) const PARSED_KEYS_MAX: usize = 4_096;

/// Digests of `(kind, key, signature, payload)` tuples that passed `verify_strict` on this node.
///
/// A hit stands for a verification that already succeeded on these exact bytes, and
/// `verify_strict` is a pure function of them, so using the cache never changes a result: apply
/// stays deterministic across nodes whether or not a node's cache holds an entry. A digest is
/// consumed by the hit that uses it (one admission check pays for one apply), and the oldest is
/// dropped when the cache is full, so memory is bounded by the capacity.
#[derive(Debug)]
pub struct VerifiedSignatures {
    capacity: usize,
    inner: Mutex<Inner>,
    // Raw key to its decompressed point. `VerifyingKey::from_bytes` is a pure function of the
    // 32 bytes, so a hit gives exactly what parsing would: results stay deterministic.
    keys: Mutex<HashMap<[u8; PUBLIC_KEY_BYTES], VerifyingKey>>,
}

#[derive(Debug, Default)]
struct Inner {
    // Digest to the generation it was remembered at.
    digests: HashMap<[u8; 32], u64>,
    // Insertion order, for eviction. May hold digests already consumed or remembered again
    // since (an older generation); evicting one of those leaves the live entry alone.
    order: VecDeque<([u8; 32], u64)>,
    generation: u64,
}

impl VerifiedSignatures {
    /// A cache holding at most `capacity` digests (at least one).
    pub fn new(capacity: usize) -> VerifiedSignatures {
        VerifiedSignatures {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Digests held now.
    pub fn len(&self) -> usize {
        self.lock().digests.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The critical sections cannot panic half-way; a poisoned lock still holds a valid set.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn digest(
        kind: PayloadKind,
        key: &[u8],
        signature: &[u8],
        payload: &[u8],
    ) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(b"signpost.verified-signature.v1\0");
        hash.update(kind.context().as_bytes());
        hash.update([0]);
        // Fixed-length key and signature (checked before this is called), then the payload:
        // the tuple is encoded without ambiguity.
        hash.update(key);
        hash.update(signature);
        hash.update(payload);
        hash.finalize().into()
    }

    pub(crate) fn remember(&self, digest: [u8; 32]) {
        let mut inner = self.lock();
        if inner.digests.contains_key(&digest) {
            return;
        }
        inner.generation += 1;
        let generation = inner.generation;
        inner.digests.insert(digest, generation);
        inner.order.push_back((digest, generation));
        while inner.digests.len() > self.capacity || inner.order.len() > 2 * self.capacity {
            let Some((oldest, at)) = inner.order.pop_front() else {
                break;
            };
            if inner.digests.get(&oldest) == Some(&at) {
                inner.digests.remove(&oldest);
            }
        }
    }

    pub(crate) fn take(&self, digest: &[u8; 32]) -> bool {
        self.lock().digests.remove(digest).is_some()
    }

    /// The verifying key of `raw`, decompressed once and then kept (invalid points are refused
    /// and not kept).
    pub(crate) fn key(&self, raw: &[u8; PUBLIC_KEY_BYTES]) -> Result<VerifyingKey, RecordError> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(key) = keys.get(raw) {
            return Ok(*key);
        }
        let key = parse_public_key(raw)?;
        if keys.len() >= PARSED_KEYS_MAX {
            keys.clear();
        }
        keys.insert(*raw, key);
        Ok(key)
    }

    /// Decompressed keys held now.
    pub fn parsed_keys(&self) -> usize {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> [u8; 32] {
        [n; 32]
    }

    #[test]
    fn a_remembered_signature_is_used_once() {
        let cache = VerifiedSignatures::new(4);
        cache.remember(d(1));
        assert!(cache.take(&d(1)));
        assert!(!cache.take(&d(1)), "a hit consumes the entry");
        assert!(!cache.take(&d(2)), "never remembered");
    }

    #[test]
    fn the_oldest_digest_goes_when_the_cache_is_full() {
        let cache = VerifiedSignatures::new(2);
        cache.remember(d(1));
        cache.remember(d(2));
        cache.remember(d(3));
        assert_eq!(cache.len(), 2);
        assert!(!cache.take(&d(1)), "evicted");
        assert!(cache.take(&d(2)) && cache.take(&d(3)));
    }

    #[test]
    fn a_digest_remembered_again_after_use_survives_the_eviction_of_its_old_copy() {
        let cache = VerifiedSignatures::new(1);
        for _ in 0..10 {
            cache.remember(d(7));
            assert!(
                cache.take(&d(7)),
                "the live entry was evicted with a stale copy"
            );
        }
    }

    #[test]
    fn consumed_digests_do_not_make_the_order_queue_grow_without_bound() {
        let cache = VerifiedSignatures::new(3);
        for n in 0..=200u8 {
            cache.remember(d(n));
            assert!(cache.take(&d(n)));
        }
        let inner = cache.lock();
        assert!(inner.order.len() <= 6, "order holds {}", inner.order.len());
        assert!(inner.digests.is_empty());
    }

    #[test]
    fn a_parsed_key_is_the_key_parsing_gives_and_the_set_stays_bounded() {
        use ed25519_dalek::SigningKey;
        let cache = VerifiedSignatures::new(1);
        // Phase 1: a valid key parses to the same point, fresh or kept.
        let raw = SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes();
        let fresh = parse_public_key(&raw).expect("valid key");
        assert_eq!(cache.key(&raw).expect("valid key"), fresh);
        assert_eq!(cache.key(&raw).expect("kept key"), fresh);
        assert_eq!(cache.parsed_keys(), 1);
        // Phase 2: a point that is not on the curve is refused every time and never kept.
        let mut invalid = [0u8; 32];
        invalid[0] = 2;
        assert!(
            parse_public_key(&invalid).is_err(),
            "the test needs an invalid point"
        );
        for _ in 0..2 {
            assert!(cache.key(&invalid).is_err());
        }
        assert_eq!(cache.parsed_keys(), 1);
        // Phase 3: at the bound the set starts again, so it never holds more than the bound.
        for n in 0..PARSED_KEYS_MAX + 10 {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(n as u64).to_le_bytes());
            let raw = SigningKey::from_bytes(&seed).verifying_key().to_bytes();
            cache.key(&raw).expect("valid key");
            assert!(cache.parsed_keys() <= PARSED_KEYS_MAX);
        }
    }

    #[test]
    fn the_digest_separates_kind_key_signature_and_payload() {
        let base = VerifiedSignatures::digest(PayloadKind::Record, &[1; 32], &[2; 64], b"p");
        assert_ne!(
            base,
            VerifiedSignatures::digest(PayloadKind::Deregister, &[1; 32], &[2; 64], b"p")
        );
        assert_ne!(
            base,
            VerifiedSignatures::digest(PayloadKind::Record, &[9; 32], &[2; 64], b"p")
        );
        assert_ne!(
            base,
            VerifiedSignatures::digest(PayloadKind::Record, &[1; 32], &[9; 64], b"p")
        );
        assert_ne!(
            base,
            VerifiedSignatures::digest(PayloadKind::Record, &[1; 32], &[2; 64], b"q")
        );
    }
}
