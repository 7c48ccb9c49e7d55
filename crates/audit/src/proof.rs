//! Proofs: generated from stored perfect subtrees by RFC 6962's recursive definitions (PATH and
//! SUBPROOF), verified with `ct-merkle`.

use ct_merkle::{ConsistencyProof, InclusionProof, RootHash};
use sha2_011::Sha256;

use crate::tree::{node_hash, Hash, HASH_BYTES};
use crate::AuditError;

/// Where proofs read perfect subtree hashes from (a node's store).
pub trait NodeSource {
    /// The hash of the perfect subtree of `2^level` leaves starting at `index * 2^level`.
    fn node(&self, level: u8, index: u64) -> Result<Hash, AuditError>;
}

/// The largest power of two strictly below `n` (n >= 2).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// The Merkle tree hash of leaves `[start, start + len)`, `len >= 1`, where `start` is a
/// multiple of the largest power of two not above `len` (as every range of the RFC's recursion
/// is): one stored node for a perfect range, else split as the RFC splits.
pub fn subtree_hash(source: &dyn NodeSource, start: u64, len: u64) -> Result<Hash, AuditError> {
    if len == 0 {
        return Err(AuditError::OutOfRange("the hash of no leaves".into()));
    }
    if len.is_power_of_two() && start.is_multiple_of(len) {
        let level = u8::try_from(len.trailing_zeros()).unwrap_or(u8::MAX);
        return source.node(level, start / len);
    }
    let k = split(len);
    Ok(node_hash(
        &subtree_hash(source, start, k)?,
        &subtree_hash(source, start + k, len - k)?,
    ))
}

/// The inclusion proof (RFC 9162 2.1.3) of leaf `index` in the tree of `size` leaves, its
/// hashes bottom-up.
pub fn inclusion_proof(
    source: &dyn NodeSource,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, AuditError> {
    if index >= size {
        return Err(AuditError::OutOfRange(format!(
            "leaf {index} is not in a tree of {size}"
        )));
    }
    let mut path = Vec::new();
    let (mut m, mut start, mut n) = (index, 0u64, size);
    // Walk down from the root, collecting the sibling of each step; reversed at the end.
    while n > 1 {
        let k = split(n);
        if m < k {
            path.push(subtree_hash(source, start + k, n - k)?);
            n = k;
        } else {
            path.push(subtree_hash(source, start, k)?);
            m -= k;
            start += k;
            n -= k;
        }
    }
    path.reverse();
    Ok(path)
}

/// The consistency proof (RFC 9162 2.1.4) that the tree of `old_size` leaves is a prefix of the
/// tree of `new_size`, its hashes bottom-up. Empty when the sizes are equal.
pub fn consistency_proof(
    source: &dyn NodeSource,
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>, AuditError> {
    if old_size == 0 || old_size > new_size {
        return Err(AuditError::OutOfRange(format!(
            "no consistency proof from {old_size} to {new_size} leaves"
        )));
    }
    let mut proof = Vec::new();
    let (mut m, mut start, mut n) = (old_size, 0u64, new_size);
    // `whole`: the old tree is still the whole of the range walked (SUBPROOF's b).
    let mut whole = true;
    while m != n {
        let k = split(n);
        if m <= k {
            proof.push(subtree_hash(source, start + k, n - k)?);
            n = k;
        } else {
            proof.push(subtree_hash(source, start, k)?);
            m -= k;
            start += k;
            n -= k;
            whole = false;
        }
    }
    if !whole {
        proof.push(subtree_hash(source, start, n)?);
    }
    proof.reverse();
    Ok(proof)
}

fn root(hash: &Hash, size: u64) -> RootHash<Sha256> {
    RootHash::new((*hash).into(), size)
}

fn concat(hashes: &[Vec<u8>]) -> Result<Vec<u8>, AuditError> {
    let mut out = Vec::with_capacity(hashes.len() * HASH_BYTES);
    for h in hashes {
        if h.len() != HASH_BYTES {
            return Err(AuditError::BadProof(format!(
                "a proof hash of {} bytes, not {HASH_BYTES}",
                h.len()
            )));
        }
        out.extend_from_slice(h);
    }
    Ok(out)
}

/// Checks that `leaf` is leaf `index` of the tree of `size` leaves whose root is `root_hash`.
pub fn verify_inclusion(
    leaf: &[u8],
    index: u64,
    size: u64,
    root_hash: &Hash,
    proof: &[Vec<u8>],
) -> Result<(), AuditError> {
    if index >= size {
        return Err(AuditError::BadProof(format!(
            "leaf {index} is not in a tree of {size}"
        )));
    }
    let proof = InclusionProof::<Sha256>::try_from_bytes(concat(proof)?)
        .map_err(|e| AuditError::BadProof(format!("{e:?}")))?;
    root(root_hash, size)
        .verify_inclusion(&leaf, index, &proof)
        .map_err(|e| AuditError::BadProof(format!("inclusion of leaf {index} in {size}: {e:?}")))
}

/// Checks that the tree of `old_size` leaves with root `old_root` is a prefix of the tree of
/// `new_size` leaves with root `new_root`. Equal sizes need equal roots and an empty proof.
pub fn verify_consistency(
    old_size: u64,
    old_root: &Hash,
    new_size: u64,
    new_root: &Hash,
    proof: &[Vec<u8>],
) -> Result<(), AuditError> {
    if old_size > new_size {
        return Err(AuditError::BadProof(format!(
            "the tree went back from {old_size} to {new_size} leaves"
        )));
    }
    if old_size == 0 {
        // Every tree extends the empty one.
        return Ok(());
    }
    if old_size == new_size {
        return if proof.is_empty() && old_root == new_root {
            Ok(())
        } else {
            Err(AuditError::BadProof(format!(
                "two different trees of {old_size} leaves"
            )))
        };
    }
    let proof = ConsistencyProof::<Sha256>::try_from_bytes(concat(proof)?)
        .map_err(|e| AuditError::BadProof(format!("{e:?}")))?;
    root(new_root, new_size)
        .verify_consistency(&root(old_root, old_size), &proof)
        .map_err(|e| AuditError::BadProof(format!("consistency {old_size} -> {new_size}: {e:?}")))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ct_merkle::mem_backed_tree::MemoryBackedTree;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::tree::{leaf_hash, Frontier};

    #[derive(Default)]
    struct Stored(HashMap<(u8, u64), Hash>);

    impl NodeSource for Stored {
        fn node(&self, level: u8, index: u64) -> Result<Hash, AuditError> {
            self.0
                .get(&(level, index))
                .copied()
                .ok_or(AuditError::Missing { level, index })
        }
    }

    /// A tree of `n` records: its stored nodes, the records, the root at every size, and
    /// ct-merkle's own tree of the same records.
    struct Grown {
        stored: Stored,
        leaves: Vec<Vec<u8>>,
        roots: Vec<Hash>,
        reference: MemoryBackedTree<Sha256, Vec<u8>>,
    }

    fn grow(n: u64) -> Grown {
        let mut stored = Stored::default();
        let mut frontier = Frontier::new();
        let mut leaves = Vec::new();
        let mut roots = vec![frontier.root()];
        let mut reference = MemoryBackedTree::new();
        for i in 0..n {
            let leaf = format!("record {i}").into_bytes();
            for node in frontier.append(leaf_hash(&leaf)) {
                stored.0.insert((node.level, node.index), node.hash);
            }
            roots.push(frontier.root());
            reference.push(leaf.clone());
            leaves.push(leaf);
        }
        Grown {
            stored,
            leaves,
            roots,
            reference,
        }
    }

    fn bytes(hashes: &[Hash]) -> Vec<Vec<u8>> {
        hashes.iter().map(|h| h.to_vec()).collect()
    }

    #[test]
    fn inclusion_proofs_from_stored_nodes_are_ct_merkles_and_verify() {
        let Grown {
            stored,
            leaves,
            roots,
            reference,
        } = grow(40);
        assert_eq!(&roots[40][..], &reference.root().as_bytes()[..]);
        for size in 1..=40u64 {
            for index in 0..size {
                let proof = inclusion_proof(&stored, index, size).unwrap();
                verify_inclusion(
                    &leaves[index as usize],
                    index,
                    size,
                    &roots[size as usize],
                    &bytes(&proof),
                )
                .unwrap_or_else(|e| panic!("leaf {index} of {size}: {e}"));
            }
        }
        // The whole tree against ct-merkle's own prover.
        for index in 0..40u64 {
            let ours: Vec<u8> = inclusion_proof(&stored, index, 40).unwrap().concat();
            let theirs = reference.prove_inclusion(index as usize);
            assert_eq!(ours, theirs.as_bytes(), "leaf {index}");
        }
    }

    #[test]
    fn consistency_proofs_from_stored_nodes_are_ct_merkles_and_verify() {
        let Grown {
            stored,
            roots,
            reference,
            ..
        } = grow(40);
        for new in 1..=40u64 {
            for old in 1..=new {
                let proof = consistency_proof(&stored, old, new).unwrap();
                verify_consistency(
                    old,
                    &roots[old as usize],
                    new,
                    &roots[new as usize],
                    &bytes(&proof),
                )
                .unwrap_or_else(|e| panic!("{old} -> {new}: {e}"));
            }
        }
        for old in 1..=40u64 {
            let ours: Vec<u8> = consistency_proof(&stored, old, 40).unwrap().concat();
            let theirs = reference.prove_consistency((40 - old) as usize);
            assert_eq!(ours, theirs.as_bytes(), "{old} -> 40");
        }
    }

    #[test]
    fn proofs_that_do_not_hold_are_refused() {
        let Grown {
            stored,
            leaves,
            roots,
            ..
        } = grow(21);
        let proof = bytes(&inclusion_proof(&stored, 5, 21).unwrap());
        let ok = |leaf: &[u8], index, size, root: &Hash, proof: &[Vec<u8>]| {
            verify_inclusion(leaf, index, size, root, proof).is_ok()
        };
        assert!(ok(&leaves[5], 5, 21, &roots[21], &proof));

        eprintln!("phase: another leaf, another index, another size, another root");
        assert!(!ok(&leaves[6], 5, 21, &roots[21], &proof));
        assert!(!ok(&leaves[5], 4, 21, &roots[21], &proof));
        assert!(!ok(&leaves[5], 5, 20, &roots[20], &proof));
        assert!(!ok(&leaves[5], 5, 21, &roots[20], &proof));
        assert!(!ok(&leaves[5], 21, 21, &roots[21], &proof));

        eprintln!("phase: malformed proofs: a flipped bit, a short hash, one hash too many or few");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let mut flipped = proof.clone();
            let h = rng.gen_range(0..flipped.len());
            let b = rng.gen_range(0..HASH_BYTES);
            flipped[h][b] ^= 1 << rng.gen_range(0..8);
            assert!(!ok(&leaves[5], 5, 21, &roots[21], &flipped));
        }
        let mut short = proof.clone();
        short[0].pop();
        assert!(matches!(
            verify_inclusion(&leaves[5], 5, 21, &roots[21], &short),
            Err(AuditError::BadProof(_))
        ));
        assert!(!ok(&leaves[5], 5, 21, &roots[21], &proof[1..]));
        let mut long = proof.clone();
        long.push(vec![0; 32]);
        assert!(!ok(&leaves[5], 5, 21, &roots[21], &long));

        eprintln!("phase: consistency going backwards, forked, or between equal sizes");
        let forward = bytes(&consistency_proof(&stored, 7, 21).unwrap());
        assert!(verify_consistency(7, &roots[7], 21, &roots[21], &forward).is_ok());
        assert!(verify_consistency(21, &roots[21], 7, &roots[7], &forward).is_err());
        assert!(verify_consistency(7, &roots[8], 21, &roots[21], &forward).is_err());
        let (forked, forked_roots) = {
            let mut stored = Stored::default();
            let mut frontier = Frontier::new();
            let mut roots = vec![frontier.root()];
            for i in 0..21u64 {
                // The same history up to 10, then another one.
                let leaf = if i < 10 {
                    format!("record {i}")
                } else {
                    format!("forged {i}")
                };
                for node in frontier.append(leaf_hash(leaf.as_bytes())) {
                    stored.0.insert((node.level, node.index), node.hash);
                }
                roots.push(frontier.root());
            }
            (stored, roots)
        };
        let fork_proof = bytes(&consistency_proof(&forked, 7, 21).unwrap());
        assert!(
            verify_consistency(7, &roots[7], 21, &forked_roots[21], &fork_proof).is_ok(),
            "the fork shares the first 10 records"
        );
        let fork_proof = bytes(&consistency_proof(&forked, 12, 21).unwrap());
        assert!(
            verify_consistency(12, &roots[12], 21, &forked_roots[21], &fork_proof).is_err(),
            "a fork after record 10 is caught from any size past it"
        );
        assert!(verify_consistency(21, &roots[21], 21, &roots[21], &[]).is_ok());
        assert!(verify_consistency(21, &roots[21], 21, &forked_roots[21], &[]).is_err());

        eprintln!("phase: a proof that needs a node this store does not have says which");
        let empty = Stored::default();
        assert_eq!(
            inclusion_proof(&empty, 0, 2),
            Err(AuditError::Missing { level: 0, index: 1 })
        );
        assert!(matches!(
            inclusion_proof(&stored, 21, 21),
            Err(AuditError::OutOfRange(_))
        ));
        assert!(matches!(
            consistency_proof(&stored, 0, 21),
            Err(AuditError::OutOfRange(_))
        ));
        assert!(matches!(
            consistency_proof(&stored, 22, 21),
            Err(AuditError::OutOfRange(_))
        ));
    }
}
