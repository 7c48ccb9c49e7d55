//! The registry's state commitment: a sparse Merkle tree over 256-bit keys (SHA-256 of a
//! name) in its compact form, where a subtree holding one entry is that entry's leaf hash, so
//! an update or a proof touches O(log n) nodes whatever the key's bits.
//!
//! - empty subtree: 32 zero bytes ([`EMPTY`])
//! - one entry: `SHA-256(0x10 || key || value)`
//! - more: `SHA-256(0x11 || left || right)`, split on the key's next bit (most significant
//!   first)
//!
//! The registry keeps two levels: per service, a tree of its live instances (key: SHA-256 of
//! the instance id, value: SHA-256 of the signed record envelope); over services, a tree whose
//! value is `SHA-256(0x12 || binding envelope hash || instances root)`. Every audit record
//! carries the root after its command, so a client that has a service's whole answer rebuilds
//! that service's value itself and needs only the path to the root: an answer that leaves out
//! an instance, or serves an older version, does not reach the root the log commits to.
//!
//! Written here rather than taken from a crate: the maintained ones (jmt, sparse-merkle-tree)
//! keep versioned nodes in a store of their own with their own pruning, while this tree lives in
//! the replicated state (rebuilt from it at load, never stored) and its proofs must be checked
//! by a client that rebuilds a subtree from the records it was served.

use std::cmp::Ordering;

use sha2_011::{Digest, Sha256};

use crate::{AuditError, Hash};

/// The hash of an empty subtree.
pub const EMPTY: Hash = [0; 32];
/// Bits of a key, so the most siblings a proof can have.
pub const KEY_BITS: usize = 256;

const LEAF: u8 = 0x10;
const BRANCH: u8 = 0x11;
const SERVICE: u8 = 0x12;

/// The key of a service or an instance: SHA-256 of its name.
pub fn name_key(name: &str) -> Hash {
    Sha256::digest(name.as_bytes()).into()
}

/// The hash a subtree holding only `key` -> `value` has.
pub fn state_leaf_hash(key: &Hash, value: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([LEAF]);
    hasher.update(key);
    hasher.update(value);
    hasher.finalize().into()
}

fn branch_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([BRANCH]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// A service's value in the tree of services: its binding (SHA-256 of the binding envelope,
/// [`EMPTY`] for none) and the root of the tree of its live instances.
pub fn service_value(binding: &Hash, instances_root: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([SERVICE]);
    hasher.update(binding);
    hasher.update(instances_root);
    hasher.finalize().into()
}

fn bit(key: &Hash, depth: usize) -> usize {
    usize::from((key[depth / 8] >> (7 - depth % 8)) & 1)
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Node {
    #[default]
    Empty,
    Leaf {
        key: Hash,
        value: Hash,
        hash: Hash,
    },
    /// Holds at least two entries (the compact form has no branch over one).
    Branch(Box<Branch>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Branch {
    hash: Hash,
    children: [Node; 2],
}

impl Node {
    fn leaf(key: Hash, value: Hash) -> Node {
        Node::Leaf {
            key,
            value,
            hash: state_leaf_hash(&key, &value),
        }
    }

    fn branch(children: [Node; 2]) -> Node {
        Node::Branch(Box::new(Branch {
            hash: branch_hash(&children[0].hash(), &children[1].hash()),
            children,
        }))
    }

    fn hash(&self) -> Hash {
        match self {
            Node::Empty => EMPTY,
            Node::Leaf { hash, .. } => *hash,
            Node::Branch(branch) => branch.hash,
        }
    }

    /// The subtree at `depth` holding exactly `leaves` (sorted, distinct keys).
    fn build(leaves: &[(Hash, Hash)], depth: usize) -> Node {
        match leaves {
            [] => Node::Empty,
            [(key, value)] => Node::leaf(*key, *value),
            _ => {
                let split = leaves.partition_point(|(key, _)| bit(key, depth) == 0);
                Node::branch([
                    Node::build(&leaves[..split], depth + 1),
                    Node::build(&leaves[split..], depth + 1),
                ])
            }
        }
    }

    /// The subtree at `depth` holding the two leaves `a` and `b` (distinct keys).
    fn split(a: Node, b: Node, depth: usize) -> Node {
        let (Node::Leaf { key: ka, .. }, Node::Leaf { key: kb, .. }) = (&a, &b) else {
            unreachable!("invariant: split joins two leaves");
        };
        let (side_a, side_b) = (bit(ka, depth), bit(kb, depth));
        match side_a.cmp(&side_b) {
            Ordering::Less => Node::branch([a, b]),
            Ordering::Greater => Node::branch([b, a]),
            Ordering::Equal => {
                let both = Node::split(a, b, depth + 1);
                if side_a == 0 {
                    Node::branch([both, Node::Empty])
                } else {
                    Node::branch([Node::Empty, both])
                }
            }
        }
    }

    fn insert(&mut self, depth: usize, key: Hash, value: Hash) -> Option<Hash> {
        match self {
            Node::Empty => {
                *self = Node::leaf(key, value);
                None
            }
            Node::Leaf {
                key: k, value: v, ..
            } if *k == key => {
                let old = *v;
                *self = Node::leaf(key, value);
                Some(old)
            }
            Node::Leaf { .. } => {
                let existing = std::mem::take(self);
                *self = Node::split(existing, Node::leaf(key, value), depth);
                None
            }
            Node::Branch(branch) => {
                let old = branch.children[bit(&key, depth)].insert(depth + 1, key, value);
                branch.hash = branch_hash(&branch.children[0].hash(), &branch.children[1].hash());
                old
            }
        }
    }

    fn remove(&mut self, depth: usize, key: &Hash) -> Option<Hash> {
        match self {
            Node::Empty => None,
            Node::Leaf { key: k, value, .. } => {
                if k != key {
                    return None;
                }
                let old = *value;
                *self = Node::Empty;
                Some(old)
            }
            Node::Branch(branch) => {
                let old = branch.children[bit(key, depth)].remove(depth + 1, key)?;
                let collapsed = match &mut branch.children {
                    // One entry left: the compact form holds it as its leaf, here.
                    [lone @ Node::Leaf { .. }, Node::Empty]
                    | [Node::Empty, lone @ Node::Leaf { .. }] => Some(std::mem::take(lone)),
                    [Node::Empty, Node::Empty] => Some(Node::Empty),
                    [left, right] => {
                        let hash = branch_hash(&left.hash(), &right.hash());
                        branch.hash = hash;
                        None
                    }
                };
                if let Some(node) = collapsed {
                    *self = node;
                }
                Some(old)
            }
        }
    }
}

/// Where a key's path ends, and the hashes beside it on the way from the root.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StateProof {
    /// The sibling of each node on the key's path, from the root's children down.
    pub siblings: Vec<Hash>,
    /// The entry (key, value) whose leaf ends the path: the key's own, or, when the key is
    /// absent, another sharing the path's bits. `None`: the path ends in an empty subtree.
    pub leaf: Option<(Hash, Hash)>,
}

/// A sparse Merkle tree in memory; see the module documentation for its hashes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StateTree {
    root: Node,
    len: usize,
}

impl StateTree {
    /// The empty tree.
    pub fn new() -> StateTree {
        StateTree::default()
    }

    /// The tree of `entries`, built bottom-up in O(n) hashes. Refuses a key given twice.
    pub fn from_entries(mut entries: Vec<(Hash, Hash)>) -> Result<StateTree, AuditError> {
        entries.sort_unstable_by_key(|entry| entry.0);
        if let Some(twice) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(AuditError::BadProof(format!(
                "key {} appears twice",
                hex_prefix(&twice[0].0)
            )));
        }
        Ok(StateTree {
            root: Node::build(&entries, 0),
            len: entries.len(),
        })
    }

    /// The root hash ([`EMPTY`] for no entries).
    pub fn root(&self) -> Hash {
        self.root.hash()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets `key` to `value`; returns the value it replaced.
    pub fn insert(&mut self, key: Hash, value: Hash) -> Option<Hash> {
        let old = self.root.insert(0, key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `key`; returns its value if it was present.
    pub fn remove(&mut self, key: &Hash) -> Option<Hash> {
        let old = self.root.remove(0, key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The path of `key`: proves its value, or that it is absent.
    pub fn prove(&self, key: &Hash) -> StateProof {
        let mut siblings = Vec::new();
        let mut node = &self.root;
        let mut depth = 0;
        loop {
            match node {
                Node::Empty => {
                    return StateProof {
                        siblings,
                        leaf: None,
                    }
                }
                Node::Leaf { key, value, .. } => {
                    return StateProof {
                        siblings,
                        leaf: Some((*key, *value)),
                    }
                }
                Node::Branch(branch) => {
                    let side = bit(key, depth);
                    siblings.push(branch.children[1 - side].hash());
                    node = &branch.children[side];
                    depth += 1;
                }
            }
        }
    }
}

fn hex_prefix(hash: &Hash) -> String {
    hash[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks that in the tree with `root`, `key` holds `value` (`None`: is absent), as `proof`
/// shows.
pub fn verify_state_proof(
    root: &Hash,
    key: &Hash,
    value: Option<&Hash>,
    proof: &StateProof,
) -> Result<(), AuditError> {
    let depth = proof.siblings.len();
    if depth > KEY_BITS {
        return Err(AuditError::BadProof(format!(
            "a state proof of {depth} siblings; keys have {KEY_BITS} bits"
        )));
    }
    let end = match (value, &proof.leaf) {
        (Some(value), Some((k, v))) if k == key && v == value => state_leaf_hash(k, v),
        (Some(_), Some((k, _))) if k == key => {
            return Err(AuditError::BadProof(
                "the state holds another value for the key".into(),
            ))
        }
        (Some(_), _) => {
            return Err(AuditError::BadProof(
                "the state proof shows the key absent".into(),
            ))
        }
        (None, None) => EMPTY,
        (None, Some((k, _))) if k == key => {
            return Err(AuditError::BadProof(
                "the state proof shows the key present".into(),
            ))
        }
        (None, Some((k, v))) => {
            if (0..depth).any(|d| bit(k, d) != bit(key, d)) {
                return Err(AuditError::BadProof(
                    "the state proof ends at an entry off the key's path".into(),
                ));
            }
            state_leaf_hash(k, v)
        }
    };
    let mut hash = end;
    for (d, sibling) in proof.siblings.iter().enumerate().rev() {
        hash = if bit(key, d) == 0 {
            branch_hash(&hash, sibling)
        } else {
            branch_hash(sibling, &hash)
        };
    }
    if &hash != root {
        return Err(AuditError::BadProof(
            "the state proof does not lead to the committed root".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> Hash {
        name_key(&format!("instance-{n}"))
    }

    fn value(n: u32) -> Hash {
        name_key(&format!("value-{n}"))
    }

    /// The root by the definition, recursively over a set, as an independent check of the
    /// incremental tree.
    fn reference_root(entries: &[(Hash, Hash)], depth: usize) -> Hash {
        match entries {
            [] => EMPTY,
            [(k, v)] => state_leaf_hash(k, v),
            _ => {
                let (left, right): (Vec<_>, Vec<_>) =
                    entries.iter().partition(|(k, _)| bit(k, depth) == 0);
                branch_hash(
                    &reference_root(&left, depth + 1),
                    &reference_root(&right, depth + 1),
                )
            }
        }
    }

    #[test]
    fn inserts_and_removes_in_any_order_give_the_root_of_the_set() {
        // Phase 1: grow one entry at a time; every root is the set's.
        let mut tree = StateTree::new();
        assert_eq!(tree.root(), EMPTY);
        let mut set = Vec::new();
        for n in 0..300 {
            assert_eq!(tree.insert(key(n), value(n)), None);
            set.push((key(n), value(n)));
            assert_eq!(tree.root(), reference_root(&set, 0), "after inserting {n}");
        }
        assert_eq!(tree.len(), 300);
        // Phase 2: replacing a value returns the old one and changes the root.
        let before = tree.root();
        assert_eq!(tree.insert(key(7), value(1000)), Some(value(7)));
        assert_ne!(tree.root(), before);
        assert_eq!(tree.insert(key(7), value(7)), Some(value(1000)));
        assert_eq!(tree.root(), before);
        // Phase 3: the same set built at once has the same shape, not only the same root.
        let built = StateTree::from_entries(set.clone()).expect("distinct keys");
        assert_eq!(built, tree);
        // Phase 4: remove every other, then the rest; the compact form collapses back.
        for n in (0..300).step_by(2) {
            assert_eq!(tree.remove(&key(n)), Some(value(n)));
            assert_eq!(tree.remove(&key(n)), None, "removed twice");
        }
        set.retain(|(k, _)| (0..300).step_by(2).all(|n| key(n) != *k));
        assert_eq!(tree.root(), reference_root(&set, 0));
        assert_eq!(
            tree,
            StateTree::from_entries(set.clone()).expect("distinct keys")
        );
        for n in (1..300).step_by(2) {
            tree.remove(&key(n));
        }
        assert_eq!(tree, StateTree::new());
        assert_eq!(tree.root(), EMPTY);
    }

    #[test]
    fn a_key_given_twice_is_refused() {
        let twice = vec![(key(1), value(1)), (key(2), value(2)), (key(1), value(3))];
        assert!(StateTree::from_entries(twice).is_err());
    }

    #[test]
    fn proofs_show_presence_and_absence_and_nothing_else() {
        let mut tree = StateTree::new();
        for n in 0..100 {
            tree.insert(key(n), value(n));
        }
        let root = tree.root();
        // Present: its value verifies, any other value or absence does not.
        let proof = tree.prove(&key(5));
        verify_state_proof(&root, &key(5), Some(&value(5)), &proof).expect("present");
        assert!(verify_state_proof(&root, &key(5), Some(&value(6)), &proof).is_err());
        assert!(verify_state_proof(&root, &key(5), None, &proof).is_err());
        // Absent: proven absent, not present with any value.
        let absent = key(1000);
        let proof = tree.prove(&absent);
        verify_state_proof(&root, &absent, None, &proof).expect("absent");
        assert!(verify_state_proof(&root, &absent, Some(&value(1000)), &proof).is_err());
        // A present key's proof does not pass for another key as absent unless its path ends
        // there; a proof against another root fails.
        let present = tree.prove(&key(9));
        assert!(verify_state_proof(&root, &key(8), None, &present).is_err());
        assert!(verify_state_proof(&EMPTY, &key(9), Some(&value(9)), &present).is_err());
        // Tampered siblings, a dropped sibling, too many siblings.
        let mut bent = tree.prove(&key(3));
        bent.siblings[0][0] ^= 1;
        assert!(verify_state_proof(&root, &key(3), Some(&value(3)), &bent).is_err());
        let mut short = tree.prove(&key(3));
        short.siblings.pop();
        assert!(verify_state_proof(&root, &key(3), Some(&value(3)), &short).is_err());
        let long = StateProof {
            siblings: vec![EMPTY; KEY_BITS + 1],
            leaf: None,
        };
        assert!(verify_state_proof(&root, &absent, None, &long).is_err());
        // The empty tree proves every key absent.
        let empty = StateTree::new();
        verify_state_proof(&EMPTY, &key(1), None, &empty.prove(&key(1))).expect("empty");
        // A one-entry tree: its root is the leaf.
        let mut one = StateTree::new();
        one.insert(key(1), value(1));
        verify_state_proof(&one.root(), &key(1), Some(&value(1)), &one.prove(&key(1)))
            .expect("lone entry");
        verify_state_proof(&one.root(), &key(2), None, &one.prove(&key(2))).expect("absent");
    }

    #[test]
    fn a_subtree_of_whole_service_cannot_drop_or_age_an_instance() {
        let entries: Vec<_> = (0..20).map(|n| (key(n), value(n))).collect();
        let whole = StateTree::from_entries(entries.clone()).expect("distinct");
        let binding = name_key("binding");
        let committed = service_value(&binding, &whole.root());
        let mut services = StateTree::new();
        services.insert(name_key("payments"), committed);
        services.insert(name_key("orders"), value(99));
        let root = services.root();
        let proof = services.prove(&name_key("payments"));
        let rebuilt = |entries: Vec<(Hash, Hash)>| {
            let instances = StateTree::from_entries(entries).expect("distinct").root();
            service_value(&binding, &instances)
        };
        verify_state_proof(
            &root,
            &name_key("payments"),
            Some(&rebuilt(entries.clone())),
            &proof,
        )
        .expect("the whole service");
        let mut hidden = entries.clone();
        hidden.remove(4);
        assert!(
            verify_state_proof(&root, &name_key("payments"), Some(&rebuilt(hidden)), &proof)
                .is_err()
        );
        let mut aged = entries;
        aged[4].1 = value(1004);
        assert!(
            verify_state_proof(&root, &name_key("payments"), Some(&rebuilt(aged)), &proof).is_err()
        );
    }
}
