//! Checkpoints: the tree's size and root at a time, as a C2SP signed note
//! (<https://c2sp.org/tlog-checkpoint>, <https://c2sp.org/signed-note>), cosigned by the nodes.
//!
//! The text is the checkpoint body with one extension line for the time:
//!
//! ```text
//! signpost.audit/3f0c5e1a9b2d4c77
//! 1042
//! 8dFQ6Zb4g0ax0OqXyQ0m0y0m8xK1Qp1c7tG3mXk4S0I=
//! time 1764582000123
//! ```
//!
//! Every node signs it with its own checkpoint key under the origin as the key name (the key
//! id tells the nodes apart), and a checkpoint counts only with signatures of a majority of the
//! checkpoint keys the admins bound ([`Witnesses`]): one node, however compromised, cannot make
//! one alone, and two honest majorities always share a node, so no two quorum checkpoints of
//! one size can differ unless a majority of the checkpoint keys lies.
//!
//! Notes are parsed and signature lines checked by `signed_note` (cloudflare's port of Go's
//! `sumdb/note`); the signatures are ed25519 checked with `verify_strict`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use sha2_011::{Digest, Sha256};
use signed_note::{Note, Signature, Verifier, VerifierList};

use crate::error::AuditError;
use crate::proof::verify_consistency;
use crate::tree::{Hash, HASH_BYTES};

/// The service name whose binding lists the checkpoint keys. A valid service name, so it is
/// bound and rotated with the ordinary admin commands (and the binding verified from the
/// genesis like any other); nothing registers instances under it.
pub const CHECKPOINT_SERVICE: &str = "signpost.checkpoint";
/// Largest checkpoint note accepted: four short lines and a signature line (about 110 bytes)
/// per node of any sane cluster.
pub const CHECKPOINT_NOTE_BYTES_MAX: usize = 16 * 1024;
/// Most checkpoint keys a witness set may hold.
pub const WITNESS_KEYS_MAX: usize = 64;
/// The signature type byte C2SP gives ed25519 in key ids.
const ALG_ED25519: u8 = 1;
/// Domain separation of the origin's hash from every other hash of the admin keys.
const ORIGIN_CONTEXT: &[u8] = b"signpost.v1.audit-origin\0";

/// The origin of a cluster's checkpoints, derived from its genesis admin set, so that a client
/// that pins the genesis knows it and checkpoints of one cluster never pass for another's.
pub fn origin_for(genesis_keys: &[[u8; 32]], threshold: u32) -> String {
    let mut keys = genesis_keys.to_vec();
    keys.sort_unstable();
    let mut hasher = Sha256::new();
    hasher.update(ORIGIN_CONTEXT);
    hasher.update(threshold.to_be_bytes());
    for key in &keys {
        hasher.update(key);
    }
    let digest = hasher.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("signpost.audit/{hex}")
}

/// A checkpoint's content: the tree of `size` records has `root` at `time_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's name (see [`origin_for`]).
    pub origin: String,
    /// Records in the tree.
    pub size: u64,
    /// Its RFC 6962 root.
    pub root: Hash,
    /// Milliseconds since the Unix epoch, from the clock of the node that proposed it (and
    /// within the cosigners' clock-skew bound of theirs).
    pub time_ms: u64,
}

fn malformed(detail: impl Into<String>) -> AuditError {
    AuditError::Checkpoint(detail.into())
}

/// A decimal with no sign, no leading zero (but "0") and no overflow: one spelling per number,
/// so one checkpoint has one text.
fn canonical_u64(line: &str, what: &str) -> Result<u64, AuditError> {
    let value: u64 = line
        .parse()
        .map_err(|_| malformed(format!("{what} {line:?} is not a decimal number")))?;
    if value.to_string() != line {
        return Err(malformed(format!(
            "{what} {line:?} is not in canonical form"
        )));
    }
    Ok(value)
}

impl Checkpoint {
    /// The checkpoint's note text (what is signed).
    pub fn text(&self) -> String {
        format!(
            "{}\n{}\n{}\ntime {}\n",
            self.origin,
            self.size,
            BASE64.encode(self.root),
            self.time_ms
        )
    }

    /// Parses a note text: exactly the four lines [`Checkpoint::text`] writes.
    pub fn parse(text: &[u8]) -> Result<Checkpoint, AuditError> {
        if text.len() > CHECKPOINT_NOTE_BYTES_MAX {
            return Err(malformed(format!(
                "{} bytes, above the maximum of {CHECKPOINT_NOTE_BYTES_MAX}",
                text.len()
            )));
        }
        let text = std::str::from_utf8(text).map_err(|_| malformed("not UTF-8"))?;
        let body = text
            .strip_suffix('\n')
            .ok_or_else(|| malformed("the text does not end with a newline"))?;
        let lines: Vec<&str> = body.split('\n').collect();
        let [origin, size, root, time] = lines[..] else {
            return Err(malformed(format!(
                "{} lines; a checkpoint has origin, size, root hash and time",
                lines.len()
            )));
        };
        if origin.is_empty() || origin.contains(char::is_whitespace) || origin.contains('+') {
            return Err(malformed(format!("origin {origin:?} is not a key name")));
        }
        let size = canonical_u64(size, "size")?;
        let root_bytes = BASE64
            .decode(root)
            .map_err(|_| malformed(format!("root hash {root:?} is not base64")))?;
        let root: Hash = root_bytes.try_into().map_err(|b: Vec<u8>| {
            malformed(format!("root hash is {} bytes, not {HASH_BYTES}", b.len()))
        })?;
        let time = time
            .strip_prefix("time ")
            .ok_or_else(|| malformed(format!("fourth line {time:?} is not `time <ms>`")))?;
        let time_ms = canonical_u64(time, "time")?;
        Ok(Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
            time_ms,
        })
    }

    /// Checks that `newer` continues this (trusted) checkpoint's tree: not smaller, the same
    /// root at the same size, and otherwise `proof` proves this tree a prefix of the newer one.
    /// A node that shows one client a fork, or takes it back to a smaller tree, fails here.
    pub fn check_extended_by(
        &self,
        newer: &Checkpoint,
        proof: &[Vec<u8>],
    ) -> Result<(), AuditError> {
        if newer.origin != self.origin {
            return Err(malformed(format!(
                "origin {} is not {}",
                newer.origin, self.origin
            )));
        }
        if newer.size < self.size {
            return Err(AuditError::Rollback {
                trusted: self.size,
                offered: newer.size,
            });
        }
        if newer.size == self.size {
            return if newer.root == self.root {
                Ok(())
            } else {
                Err(AuditError::Fork(format!(
                    "two roots for the tree of {} records",
                    self.size
                )))
            };
        }
        verify_consistency(self.size, &self.root, newer.size, &newer.root, proof)
            .map_err(|e| AuditError::Fork(e.to_string()))
    }
}

/// The key id C2SP recommends for an ed25519 key under `name`.
fn key_id(name: &str, key: &VerifyingKey) -> u32 {
    let mut encoded = vec![ALG_ED25519];
    encoded.extend_from_slice(key.as_bytes());
    signed_note::key_id(name, &encoded)
}

/// One node's checkpoint key, signing under the cluster's origin.
pub struct CheckpointSigner {
    name: String,
    id: u32,
    key: SigningKey,
}

impl std::fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("name", &self.name)
            .field("id", &format_args!("{:08x}", self.id))
            .finish_non_exhaustive()
    }
}

impl CheckpointSigner {
    /// Signs as `origin` with `key`.
    pub fn new(origin: &str, key: SigningKey) -> CheckpointSigner {
        CheckpointSigner {
            name: origin.to_owned(),
            id: key_id(origin, &key.verifying_key()),
            key,
        }
    }

    /// The key name it signs under (the origin).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public half, as bound in the checkpoint binding.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// This node's signature over `checkpoint`'s text (64 bytes).
    pub fn sign_checkpoint(&self, checkpoint: &Checkpoint) -> Vec<u8> {
        self.key.sign(checkpoint.text().as_bytes()).to_vec()
    }
}

/// One bound checkpoint key as a note verifier, with ed25519's strict checks.
struct StrictVerifier {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl Verifier for StrictVerifier {
    fn name(&self) -> &str {
        &self.name
    }

    fn key_id(&self) -> u32 {
        self.id
    }

    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        ed25519_dalek::Signature::from_slice(sig)
            .map(|sig| self.key.verify_strict(msg, &sig).is_ok())
            .unwrap_or(false)
    }
}

/// A checkpoint note whose signatures reached the quorum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// What it says.
    pub checkpoint: Checkpoint,
    /// The note as signed, with every signature line.
    pub note: Vec<u8>,
    /// The bound keys whose signatures verified.
    pub signers: Vec<[u8; 32]>,
}

/// The checkpoint keys the admins bound, and the quorum a checkpoint needs: a majority of them.
#[derive(Debug, Clone)]
pub struct Witnesses {
    origin: String,
    keys: Vec<VerifyingKey>,
}

impl Witnesses {
    /// The witnesses of `origin`'s checkpoints: at least one key, at most
    /// [`WITNESS_KEYS_MAX`], each a valid ed25519 point.
    pub fn new(origin: &str, keys: &[[u8; 32]]) -> Result<Witnesses, AuditError> {
        if keys.is_empty() || keys.len() > WITNESS_KEYS_MAX {
            return Err(malformed(format!(
                "{} checkpoint keys; between 1 and {WITNESS_KEYS_MAX} are needed",
                keys.len()
            )));
        }
        let mut verifying = Vec::with_capacity(keys.len());
        for key in keys {
            let key = VerifyingKey::from_bytes(key)
                .map_err(|_| malformed("a checkpoint key is not an ed25519 public key"))?;
            if !verifying.contains(&key) {
                verifying.push(key);
            }
        }
        Ok(Witnesses {
            origin: origin.to_owned(),
            keys: verifying,
        })
    }

    /// Signatures a checkpoint needs.
    pub fn quorum(&self) -> usize {
        self.keys.len() / 2 + 1
    }

    /// The origin checkpoints must name.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether `key` is one of the witnesses.
    pub fn contains(&self, key: &[u8; 32]) -> bool {
        self.keys.iter().any(|k| k.as_bytes() == key)
    }

    fn verifiers(&self) -> VerifierList {
        VerifierList::new(
            self.keys
                .iter()
                .map(|key| {
                    Box::new(StrictVerifier {
                        name: self.origin.clone(),
                        id: key_id(&self.origin, key),
                        key: *key,
                    }) as Box<dyn Verifier>
                })
                .collect(),
        )
    }

    /// Parses and checks a checkpoint note: well formed, for this origin, and signed by at
    /// least [`Witnesses::quorum`] distinct witnesses. Signatures by unknown keys are ignored
    /// (the note may carry others' cosignatures); a bad signature by a witness fails the note.
    pub fn verify(&self, note: &[u8]) -> Result<SignedCheckpoint, AuditError> {
        if note.len() > CHECKPOINT_NOTE_BYTES_MAX {
            return Err(malformed(format!(
                "note of {} bytes, above the maximum of {CHECKPOINT_NOTE_BYTES_MAX}",
                note.len()
            )));
        }
        let parsed =
            Note::from_bytes(note).map_err(|e| malformed(format!("not a signed note: {e}")))?;
        let checkpoint = Checkpoint::parse(parsed.text())?;
        if checkpoint.origin != self.origin {
            return Err(malformed(format!(
                "origin {} is not this cluster's ({})",
                checkpoint.origin, self.origin
            )));
        }
        let verified = match parsed.verify(&self.verifiers()) {
            Ok((verified, _unknown)) => verified,
            Err(signed_note::NoteError::UnverifiedNote) => Vec::new(),
            Err(e) => return Err(AuditError::Signatures(e.to_string())),
        };
        let signers: Vec<[u8; 32]> = self
            .keys
            .iter()
            .filter(|key| {
                let id = key_id(&self.origin, key);
                verified.iter().any(|s| s.id() == id)
            })
            .map(|key| key.to_bytes())
            .collect();
        if signers.len() < self.quorum() {
            return Err(AuditError::Quorum {
                have: signers.len(),
                need: self.quorum(),
            });
        }
        Ok(SignedCheckpoint {
            checkpoint,
            note: note.to_vec(),
            signers,
        })
    }

    /// The note of `checkpoint` with the given (key, signature) pairs, then checked as
    /// [`Witnesses::verify`] does: what a leader assembles from its cosigners' answers.
    pub fn assemble(
        &self,
        checkpoint: &Checkpoint,
        signatures: &[([u8; 32], Vec<u8>)],
    ) -> Result<SignedCheckpoint, AuditError> {
        let mut lines = Vec::with_capacity(signatures.len());
        for (key, signature) in signatures {
            let key = VerifyingKey::from_bytes(key)
                .map_err(|_| malformed("a cosigner's key is not an ed25519 public key"))?;
            let line = Signature::new(
                self.origin.clone(),
                key_id(&self.origin, &key),
                signature.clone(),
            )
            .map_err(|e| AuditError::Signatures(e.to_string()))?;
            lines.push(line);
        }
        let note = Note::new(checkpoint.text().as_bytes(), &lines)
            .map_err(|e| malformed(format!("not a note text: {e}")))?;
        self.verify(&note.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::proof::{consistency_proof, NodeSource};
    use crate::tree::{leaf_hash, Frontier};

    const ORIGIN: &str = "signpost.audit/0011223344556677";

    fn keys(n: usize, seed: u64) -> Vec<SigningKey> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| SigningKey::from_bytes(&rng.gen::<[u8; 32]>()))
            .collect()
    }

    fn witnesses(keys: &[SigningKey]) -> Witnesses {
        let public: Vec<[u8; 32]> = keys.iter().map(|k| k.verifying_key().to_bytes()).collect();
        Witnesses::new(ORIGIN, &public).unwrap()
    }

    fn checkpoint(size: u64) -> Checkpoint {
        Checkpoint {
            origin: ORIGIN.into(),
            size,
            root: [7; 32],
            time_ms: 1_764_582_000_123,
        }
    }

    fn cosign(checkpoint: &Checkpoint, by: &[SigningKey]) -> Vec<([u8; 32], Vec<u8>)> {
        by.iter()
            .map(|k| {
                let signer = CheckpointSigner::new(ORIGIN, k.clone());
                (signer.public_key(), signer.sign_checkpoint(checkpoint))
            })
            .collect()
    }

    #[test]
    fn a_checkpoint_text_round_trips_and_has_one_spelling() {
        let c = checkpoint(1042);
        let text = c.text();
        assert_eq!(Checkpoint::parse(text.as_bytes()).unwrap(), c);
        assert!(text.starts_with(&format!("{ORIGIN}\n1042\n")));
        assert!(text.ends_with("\ntime 1764582000123\n"));

        for bad in [
            text.replace("\n1042\n", "\n01042\n"),
            text.replace("\n1042\n", "\n+1042\n"),
            text.replace("\n1042\n", "\n-1\n"),
            text.replace("time ", "time  "),
            text.replace("time ", "at "),
            text.trim_end().to_owned(),
            format!("{text}extra\n"),
            text.replace(&BASE64.encode([7u8; 32]), &BASE64.encode([7u8; 31])),
            text.replace(&BASE64.encode([7u8; 32]), "not base64!"),
            text.replace(ORIGIN, "two words"),
        ] {
            let err = Checkpoint::parse(bad.as_bytes()).unwrap_err();
            assert!(
                matches!(err, AuditError::Checkpoint(_)),
                "{bad:?} gave {err}"
            );
        }
    }

    #[test]
    fn a_majority_of_the_witnesses_makes_a_checkpoint_and_fewer_do_not() {
        let nodes = keys(5, 1);
        let w = witnesses(&nodes);
        assert_eq!(w.quorum(), 3);
        let c = checkpoint(10);

        let three = w.assemble(&c, &cosign(&c, &nodes[..3])).unwrap();
        assert_eq!(three.checkpoint, c);
        assert_eq!(three.signers.len(), 3);
        assert_eq!(w.verify(&three.note).unwrap(), three);

        let two = w.assemble(&c, &cosign(&c, &nodes[..2])).unwrap_err();
        assert!(
            matches!(two, AuditError::Quorum { have: 2, need: 3 }),
            "{two}"
        );
    }

    #[test]
    fn unknown_and_repeated_signatures_do_not_count_toward_the_quorum() {
        let nodes = keys(3, 2);
        let strangers = keys(5, 3);
        let w = witnesses(&nodes);
        let c = checkpoint(10);

        // One witness and five keys nobody bound: one signature counts.
        let mut sigs = cosign(&c, &nodes[..1]);
        sigs.extend(cosign(&c, &strangers));
        let err = w.assemble(&c, &sigs).unwrap_err();
        assert!(
            matches!(err, AuditError::Quorum { have: 1, need: 2 }),
            "{err}"
        );

        // The same witness's signature twice is one signature.
        let once = cosign(&c, &nodes[..1]);
        let twice: Vec<_> = once.iter().chain(once.iter()).cloned().collect();
        let err = w.assemble(&c, &twice).unwrap_err();
        assert!(
            matches!(err, AuditError::Quorum { have: 1, need: 2 }),
            "{err}"
        );

        // A note signed only by strangers has no witness signature at all.
        let err = w.assemble(&c, &cosign(&c, &strangers)).unwrap_err();
        assert!(
            matches!(err, AuditError::Quorum { have: 0, need: 2 }),
            "{err}"
        );
    }

    #[test]
    fn a_witness_signature_over_other_content_fails_the_note() {
        let nodes = keys(3, 4);
        let w = witnesses(&nodes);
        let c = checkpoint(10);
        let good = w.assemble(&c, &cosign(&c, &nodes)).unwrap();

        // The same signatures on a text with another size: every one fails.
        let text = String::from_utf8(good.note.clone()).unwrap();
        let forged = text.replacen("\n10\n", "\n11\n", 1);
        let err = w.verify(forged.as_bytes()).unwrap_err();
        assert!(matches!(err, AuditError::Signatures(_)), "{err}");

        // One witness's signature over another checkpoint, beside two good ones.
        let other = checkpoint(11);
        let mut sigs = cosign(&c, &nodes[..2]);
        sigs.extend(cosign(&other, &nodes[2..]));
        let err = w.assemble(&c, &sigs).unwrap_err();
        assert!(matches!(err, AuditError::Signatures(_)), "{err}");
    }

    #[test]
    fn a_checkpoint_of_another_cluster_or_a_malformed_note_is_refused() {
        let nodes = keys(3, 5);
        let w = witnesses(&nodes);
        let mut other = checkpoint(10);
        other.origin = "signpost.audit/ffffffffffffffff".into();
        let foreign = Witnesses::new(
            &other.origin,
            &nodes
                .iter()
                .map(|k| k.verifying_key().to_bytes())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let signed: Vec<_> = nodes
            .iter()
            .map(|k| {
                let s = CheckpointSigner::new(&other.origin, k.clone());
                (s.public_key(), s.sign_checkpoint(&other))
            })
            .collect();
        let note = foreign.assemble(&other, &signed).unwrap().note;
        let err = w.verify(&note).unwrap_err();
        assert!(matches!(err, AuditError::Checkpoint(_)), "{err}");

        for bad in [
            &b""[..],
            b"no signature block\n",
            b"\xff\xfe\n\n",
            &vec![b'a'; CHECKPOINT_NOTE_BYTES_MAX + 1],
        ] {
            let err = w.verify(bad).unwrap_err();
            assert!(matches!(err, AuditError::Checkpoint(_)), "{err}");
        }
        assert!(Witnesses::new(ORIGIN, &[]).is_err());
    }

    #[test]
    fn a_verifier_key_in_the_go_sumdb_format_checks_our_signature_lines() {
        let nodes = keys(3, 6);
        let c = checkpoint(10);
        let signed = witnesses(&nodes).assemble(&c, &cosign(&c, &nodes)).unwrap();
        // "<name>+<key id hex>+<base64(0x01 || key)>", as Go's note.NewVerifier reads it.
        let vkey = signed_note::new_ed25519_verifier_key(ORIGIN, &nodes[1].verifying_key());
        let verifier = signed_note::StandardVerifier::new(&vkey).unwrap();
        let list = VerifierList::new(vec![Box::new(verifier)]);
        let note = Note::from_bytes(&signed.note).unwrap();
        let (verified, unknown) = note.verify(&list).unwrap();
        assert_eq!((verified.len(), unknown.len()), (1, 2));
    }

    #[test]
    fn origins_differ_by_genesis_and_do_not_depend_on_key_order() {
        let a = [[1u8; 32], [2u8; 32]];
        let b = [[2u8; 32], [1u8; 32]];
        assert_eq!(origin_for(&a, 1), origin_for(&b, 1));
        assert_ne!(origin_for(&a, 1), origin_for(&a, 2));
        assert_ne!(origin_for(&a, 1), origin_for(&a[..1], 1));
        assert!(signed_note::is_key_name_valid(&origin_for(&a, 1)));
    }

    struct Nodes(std::collections::HashMap<(u8, u64), Hash>);

    impl NodeSource for Nodes {
        fn node(&self, level: u8, index: u64) -> Result<Hash, AuditError> {
            self.0
                .get(&(level, index))
                .copied()
                .ok_or(AuditError::Missing { level, index })
        }
    }

    #[test]
    fn a_trusted_checkpoint_accepts_only_extensions_of_its_tree() {
        let mut frontier = Frontier::new();
        let mut nodes = Nodes(Default::default());
        let mut roots = vec![frontier.root()];
        for i in 0..20u64 {
            for node in frontier.append(leaf_hash(&i.to_be_bytes())) {
                nodes.0.insert((node.level, node.index), node.hash);
            }
            roots.push(frontier.root());
        }
        let at = |size: u64| Checkpoint {
            origin: ORIGIN.into(),
            size,
            root: roots[size as usize],
            time_ms: size,
        };
        let trusted = at(7);

        // Phase 1: larger trees with a consistency proof, and the same tree again, are taken.
        let proof: Vec<Vec<u8>> = consistency_proof(&nodes, 7, 20)
            .unwrap()
            .iter()
            .map(|h| h.to_vec())
            .collect();
        trusted.check_extended_by(&at(20), &proof).unwrap();
        trusted.check_extended_by(&at(7), &[]).unwrap();

        // Phase 2: a smaller tree is a rollback, whatever it proves.
        let err = trusted.check_extended_by(&at(6), &[]).unwrap_err();
        assert!(
            matches!(
                err,
                AuditError::Rollback {
                    trusted: 7,
                    offered: 6
                }
            ),
            "{err}"
        );

        // Phase 3: another root at the trusted size, or a larger tree whose proof does not
        // reach the trusted root, is a fork.
        let mut forked = at(7);
        forked.root = [9; 32];
        let err = trusted.check_extended_by(&forked, &[]).unwrap_err();
        assert!(matches!(err, AuditError::Fork(_)), "{err}");
        let mut other = at(20);
        other.root = [9; 32];
        let err = trusted.check_extended_by(&other, &proof).unwrap_err();
        assert!(matches!(err, AuditError::Fork(_)), "{err}");
        let err = trusted.check_extended_by(&at(20), &proof[1..]).unwrap_err();
        assert!(matches!(err, AuditError::Fork(_)), "{err}");
    }
}
