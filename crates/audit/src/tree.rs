use sha2_011::{Digest, Sha256};

use crate::AuditError;

/// Bytes of a SHA-256 hash.
pub const HASH_BYTES: usize = 32;

/// A node or root hash.
pub type Hash = [u8; HASH_BYTES];

/// Leaves at most: far beyond any registry, and keeps every index arithmetic below overflow
/// (ct-merkle's own bound is `u64::MAX / 2 + 1`).
const SIZE_MAX: u64 = 1 << 62;

/// `SHA-256(0x00 || leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0u8]);
    hasher.update(leaf);
    hasher.finalize().into()
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([1u8]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The root of the empty tree: `SHA-256()` of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// A perfect subtree completed by an append: `2^level` leaves from `index * 2^level`. Level 0
/// is the leaf hash itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    /// Height above the leaves.
    pub level: u8,
    /// Position among the subtrees of that level.
    pub index: u64,
    /// Its Merkle tree hash.
    pub hash: Hash,
}

/// An append-only Merkle tree reduced to what the next append and the root need: its size and
/// the hashes of its perfect subtrees, largest (leftmost) first, one per set bit of the size.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frontier {
    size: u64,
    peaks: Vec<Hash>,
}

impl Frontier {
    /// The empty tree.
    pub fn new() -> Frontier {
        Frontier::default()
    }

    /// Leaves in the tree.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf (by its [`leaf_hash`]); returns every perfect subtree this completed,
    /// the leaf first, for whoever stores nodes for proofs.
    pub fn append(&mut self, leaf: Hash) -> Vec<Node> {
        assert!(self.size < SIZE_MAX, "audit tree full at {SIZE_MAX} leaves");
        let mut index = self.size;
        let mut hash = leaf;
        let mut level = 0u8;
        let mut nodes = vec![Node { level, index, hash }];
        // Each trailing one bit of the old size is a peak the new leaf's subtree now completes.
        while (self.size >> level) & 1 == 1 {
            let left = self
                .peaks
                .pop()
                .unwrap_or_else(|| panic!("invariant: one peak per set bit of the size"));
            hash = node_hash(&left, &hash);
            level += 1;
            index >>= 1;
            nodes.push(Node { level, index, hash });
        }
        self.peaks.push(hash);
        self.size += 1;
        nodes
    }

    /// The RFC 6962 Merkle tree hash of all leaves.
    pub fn root(&self) -> Hash {
        let mut peaks = self.peaks.iter().rev();
        let Some(last) = peaks.next() else {
            return empty_root();
        };
        peaks.fold(*last, |right, left| node_hash(left, &right))
    }

    /// The perfect subtrees, as `(level, index, hash)` left to right: what a verifier that
    /// starts from this frontier (a node that installed a snapshot) needs of the leaves before.
    pub fn peaks(&self) -> Vec<Node> {
        let mut start = 0u64;
        let mut out = Vec::with_capacity(self.peaks.len());
        let mut peaks = self.peaks.iter();
        for level in (0..64u8).rev() {
            if (self.size >> level) & 1 == 1 {
                let Some(hash) = peaks.next() else { break };
                out.push(Node {
                    level,
                    index: start >> level,
                    hash: *hash,
                });
                start += 1 << level;
            }
        }
        out
    }

    /// `size` (8 bytes, big-endian), then the peaks.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.peaks.len() * HASH_BYTES);
        out.extend_from_slice(&self.size.to_be_bytes());
        for peak in &self.peaks {
            out.extend_from_slice(peak);
        }
        out
    }

    /// Reads [`Frontier::encode`]'s form back, refusing anything it could not have written.
    pub fn decode(bytes: &[u8]) -> Result<Frontier, AuditError> {
        let corrupt = |detail: String| AuditError::Corrupt {
            what: "audit frontier",
            detail,
        };
        let (size, rest) = bytes
            .split_first_chunk::<8>()
            .ok_or_else(|| corrupt(format!("{} bytes, shorter than a size", bytes.len())))?;
        let size = u64::from_be_bytes(*size);
        if size > SIZE_MAX {
            return Err(corrupt(format!("size {size} above {SIZE_MAX}")));
        }
        let expected = size.count_ones() as usize;
        if rest.len() != expected * HASH_BYTES {
            return Err(corrupt(format!(
                "size {size} needs {expected} peaks, found {} bytes of them",
                rest.len()
            )));
        }
        let peaks = rest
            .chunks_exact(HASH_BYTES)
            .map(|c| {
                let mut hash = [0u8; HASH_BYTES];
                hash.copy_from_slice(c);
                hash
            })
            .collect();
        Ok(Frontier { size, peaks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6962's MTH, straight from its definition, over all leaves.
    fn mth(leaves: &[Vec<u8>]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaf_hash(&leaves[0]),
            n => {
                let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    #[test]
    fn the_frontier_root_is_the_rfc_6962_tree_hash_at_every_size() {
        let mut frontier = Frontier::new();
        let mut leaves = Vec::new();
        assert_eq!(frontier.root(), mth(&leaves));
        for i in 0..70u32 {
            let leaf = format!("leaf {i}").into_bytes();
            frontier.append(leaf_hash(&leaf));
            leaves.push(leaf);
            assert_eq!(frontier.root(), mth(&leaves), "size {}", leaves.len());
        }
    }

    #[test]
    fn the_empty_root_and_one_leaf_match_the_rfc_9162_test_values() {
        // SHA-256 of the empty string, and of 0x00 alone (the empty leaf).
        assert_eq!(
            hex(&empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
    }

    fn hex(h: &Hash) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn appends_report_every_perfect_subtree_they_complete() {
        let mut frontier = Frontier::new();
        let leaves: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i]).collect();
        let mut nodes = Vec::new();
        for leaf in &leaves {
            nodes.extend(frontier.append(leaf_hash(leaf)));
        }
        // 8 leaves, 4 pairs, 2 quads, 1 root.
        assert_eq!(nodes.len(), 15);
        let top = nodes.iter().find(|n| n.level == 3).unwrap();
        assert_eq!((top.index, top.hash), (0, mth(&leaves)));
        let quad = nodes.iter().find(|n| n.level == 2 && n.index == 1).unwrap();
        assert_eq!(quad.hash, mth(&leaves[4..8]));
    }

    #[test]
    fn a_frontier_survives_encoding_and_bad_bytes_are_refused() {
        let mut frontier = Frontier::new();
        for i in 0..13u8 {
            frontier.append(leaf_hash(&[i]));
        }
        let bytes = frontier.encode();
        assert_eq!(Frontier::decode(&bytes).unwrap(), frontier);
        assert_eq!(frontier.peaks().len(), 3, "13 = 8 + 4 + 1");
        assert_eq!(
            frontier
                .peaks()
                .iter()
                .map(|n| (n.level, n.index))
                .collect::<Vec<_>>(),
            [(3, 0), (2, 2), (0, 12)]
        );

        for (bad, why) in [
            (bytes[..7].to_vec(), "shorter than a size"),
            (bytes[..bytes.len() - 1].to_vec(), "peaks"),
            ([bytes.clone(), vec![0; 32]].concat(), "peaks"),
            ([&u64::MAX.to_be_bytes()[..], &bytes[8..]].concat(), "above"),
        ] {
            let err = Frontier::decode(&bad).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
        }
    }
}
