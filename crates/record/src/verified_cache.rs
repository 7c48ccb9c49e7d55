//! A node's memory of signatures it has already verified, so the leader's admission check and
//! its apply of the same bytes cost one `verify_strict`, not two.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::payload_kind::PayloadKind;

/// Default number of remembered signatures: far above the proposals a node has in flight, and
/// about 1 MiB with the set's overhead.
pub const VERIFIED_SIGNATURES_DEFAULT: usize = 16_384;

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
