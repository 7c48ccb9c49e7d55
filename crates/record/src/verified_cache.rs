//! A node's memory of signatures it has already verified, so the leader's admission check and
//! its apply of the same bytes cost one `verify_strict`, not two.

use std::collections::{HashSet, VecDeque};
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
    digests: HashSet<[u8; 32]>,
    // Insertion order, for eviction. May hold digests already consumed; they are skipped.
    order: VecDeque<[u8; 32]>,
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
        if !inner.digests.insert(digest) {
            return;
        }
        inner.order.push_back(digest);
        while inner.digests.len() > self.capacity || inner.order.len() > 2 * self.capacity {
            match inner.order.pop_front() {
                Some(oldest) => {
                    inner.digests.remove(&oldest);
                }
                None => break,
            }
        }
    }

    pub(crate) fn take(&self, digest: &[u8; 32]) -> bool {
        self.lock().digests.remove(digest)
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
