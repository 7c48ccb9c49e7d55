//! Backups: a consistent copy of the registry in one checksummed file, and restoring a new
//! cluster from it (as `etcdutl snapshot restore` does: run once per new member, each with
//! its own node configuration, before the nodes first start).
//!
//! File layout: `MAGIC` (16 bytes, the last byte is the format version), the SHA-256 of the
//! body (32 bytes), then the body (bincode of [`BackupBody`]). The checksum catches a damaged
//! or truncated file; it is not what makes a backup trustworthy. Every record, binding and
//! admin set in the body carries its own signature, and a restore loads the body exactly as a
//! node loads a snapshot (every signature verified against the admin chain from the genesis),
//! so a tampered backup cannot plant a record, and a backup of another cluster (another
//! genesis admin set than the node's `[bootstrap]`) is refused as foreign.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use openraft::{CommittedLeaderId, LogId, Membership, StoredMembership, Vote};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use signpost_record::AdminSet;
use signpost_state::Registry;
use signpost_storage::Store;

use crate::codec::{self, SNAPSHOT_BYTES_MAX};
use crate::error::ConsensusError;
use crate::type_config::NodeAddr;

/// First bytes of every backup file; the last byte is the format version.
pub const MAGIC: &[u8; 16] = b"SIGNPOST-BACKUP\x01";
const DIGEST_BYTES: usize = 32;
/// Largest backup file accepted: a snapshot's worth of state plus framing.
pub const BACKUP_BYTES_MAX: usize = SNAPSHOT_BYTES_MAX + 64 * 1024;

/// What a backup holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BackupBody {
    /// The log index the state is as of: the restored cluster continues from it, so clients
    /// that remember a revision are not rolled back.
    revision: u64,
    /// Term of the entry at `revision`.
    term: u64,
    /// The registry's key/value export.
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A backup in memory, checked.
#[derive(Debug, Clone)]
pub struct Backup {
    body: BackupBody,
}

fn invalid(detail: impl std::fmt::Display) -> ConsensusError {
    ConsensusError::Backup(detail.to_string())
}

impl Backup {
    pub(crate) fn new(
        revision: u64,
        term: u64,
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Backup, ConsensusError> {
        Ok(Backup {
            body: BackupBody {
                revision,
                term,
                pairs,
            },
        })
    }

    /// The revision (log index) the backup is as of.
    pub fn revision(&self) -> u64 {
        self.body.revision
    }

    /// Number of stored keys (records, bindings, admin sets and bookkeeping).
    pub fn keys(&self) -> usize {
        self.body.pairs.len()
    }

    /// The file: magic, checksum, body.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ConsensusError> {
        let body = codec::encode(&self.body, BACKUP_BYTES_MAX - MAGIC.len() - DIGEST_BYTES)
            .map_err(|e| invalid(format!("the state does not fit in a backup: {e}")))?;
        let mut out = Vec::with_capacity(MAGIC.len() + DIGEST_BYTES + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&Sha256::digest(&body));
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Reads a backup file's bytes, refusing anything that is not an intact Signpost backup
    /// whose state loads with every signature verified.
    pub fn from_bytes(bytes: &[u8]) -> Result<Backup, ConsensusError> {
        if bytes.len() > BACKUP_BYTES_MAX {
            return Err(invalid(format!(
                "{} bytes is more than a backup can be ({BACKUP_BYTES_MAX})",
                bytes.len()
            )));
        }
        let Some(rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
            return Err(invalid("not a Signpost backup (unknown header)"));
        };
        if rest.len() < DIGEST_BYTES {
            return Err(invalid("truncated: the checksum is missing"));
        }
        let (digest, body) = rest.split_at(DIGEST_BYTES);
        if Sha256::digest(body).as_slice() != digest {
            return Err(invalid(
                "corrupted: the checksum does not match the contents (damaged or truncated file)",
            ));
        }
        let body: BackupBody = codec::decode(body, BACKUP_BYTES_MAX)
            .map_err(|e| invalid(format!("the contents do not decode: {e}")))?;
        if body.revision == 0 {
            return Err(invalid("the backup is of revision 0"));
        }
        Ok(Backup { body })
    }

    /// Loads the state as a node would (every signature verified) and checks that its genesis
    /// admin set is `expected`.
    pub fn verify(&self, expected: &AdminSet) -> Result<Registry, ConsensusError> {
        let registry = Registry::load(self.body.pairs.clone())
            .map_err(|e| invalid(format!("the state does not load: {e}")))?;
        match registry.genesis() {
            Some(genesis) if genesis == expected => Ok(registry),
            Some(_) => Err(invalid(
                "foreign: the backup's genesis admin set is not the one in this node's \
                 [bootstrap] (a backup of another cluster)",
            )),
            None => Err(invalid("the backup holds no genesis admin set")),
        }
    }

    /// Writes a restored member into the empty `data_dir`: the state as of the backup's
    /// revision, a snapshot of it, and `members` as the cluster's voters (the new cluster's
    /// `members` in its configuration, the same on every node restored). The nodes then start
    /// as a cluster that has applied up to that revision and elect a leader.
    pub fn restore(
        &self,
        data_dir: &Path,
        members: &BTreeMap<u64, NodeAddr>,
        expected: &AdminSet,
    ) -> Result<(), ConsensusError> {
        self.verify(expected)?;
        let Some(lowest) = members.keys().next().copied() else {
            return Err(invalid("the configuration lists no members"));
        };
        if let Ok(mut entries) = std::fs::read_dir(data_dir) {
            if entries.next().is_some() {
                return Err(invalid(format!(
                    "{} is not empty: restore only into a new node's data directory",
                    data_dir.display()
                )));
            }
        }
        std::fs::create_dir_all(data_dir)
            .map_err(|e| invalid(format!("creating {}: {e}", data_dir.display())))?;
        let store = Arc::new(Store::open(data_dir)?);
        let log_id = LogId::new(
            CommittedLeaderId::new(self.body.term, lowest),
            self.body.revision,
        );
        let voters: BTreeSet<u64> = members.keys().copied().collect();
        let membership =
            StoredMembership::new(Some(log_id), Membership::new(vec![voters], members.clone()));
        crate::state_machine::restore(&store, self.body.pairs.clone(), log_id, membership)?;
        // The term of the last entry as a vote nobody holds: the first election is then at
        // a later term than every entry in the log, as Raft requires.
        crate::log_store::restore(&store, Vote::new(self.body.term, lowest), log_id)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_state::{Command, Quotas, Request};

    fn admin_set(key: &signpost_record::SigningKey) -> AdminSet {
        AdminSet::new(
            &[key.verifying_key().to_bytes()],
            1,
            AdminSet::GENESIS_VERSION,
        )
        .unwrap()
    }

    /// A registry whose genesis is `admin`'s key, exported.
    fn registry_pairs(admin: &signpost_record::SigningKey) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut registry = Registry::new();
        let genesis = Request {
            time_ms: 1,
            caller: "spiffe://t/node/1".into(),
            command: Command::Genesis {
                admin_keys: vec![admin.verifying_key().to_bytes()],
                admin_threshold: 1,
                quotas: Quotas::default(),
            },
        };
        registry.apply(1, &genesis);
        registry.export()
    }

    fn members() -> BTreeMap<u64, NodeAddr> {
        (1..=3)
            .map(|id| {
                (
                    id,
                    NodeAddr {
                        raft_addr: format!("127.0.0.1:{}", 7500 + id),
                        client_addr: format!("127.0.0.1:{}", 7400 + id),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_backup_file_round_trips_and_any_damage_is_refused_as_corrupted() {
        let admin = signpost_record::generate_signing_key();
        let backup = Backup::new(42, 3, registry_pairs(&admin)).unwrap();
        let bytes = backup.to_bytes().unwrap();

        let read = Backup::from_bytes(&bytes).unwrap();
        assert_eq!(read.revision(), 42);
        assert_eq!(read.keys(), backup.keys());
        read.verify(&admin_set(&admin)).unwrap();

        for at in [MAGIC.len(), MAGIC.len() + DIGEST_BYTES, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x80;
            let refused = Backup::from_bytes(&damaged).unwrap_err().to_string();
            assert!(refused.contains("corrupted"), "byte {at}: {refused}");
        }
        let refused = Backup::from_bytes(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(refused.to_string().contains("corrupted"), "{refused}");
        let refused = Backup::from_bytes(&bytes[..MAGIC.len() + 3]).unwrap_err();
        assert!(refused.to_string().contains("truncated"), "{refused}");
        let refused = Backup::from_bytes(b"SQLite format 3\0 and more").unwrap_err();
        assert!(
            refused.to_string().contains("not a Signpost backup"),
            "{refused}"
        );
    }

    #[test]
    fn a_backup_of_another_cluster_is_refused_as_foreign_and_writes_nothing() {
        let admin = signpost_record::generate_signing_key();
        let stranger = signpost_record::generate_signing_key();
        let backup = Backup::new(7, 1, registry_pairs(&admin)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");

        let refused = backup
            .restore(&data, &members(), &admin_set(&stranger))
            .unwrap_err();
        assert!(refused.to_string().contains("foreign"), "{refused}");
        assert!(
            !data.exists(),
            "a refused restore created {}",
            data.display()
        );
    }

    #[test]
    fn a_restore_goes_only_into_an_empty_directory() {
        let admin = signpost_record::generate_signing_key();
        let backup = Backup::new(7, 1, registry_pairs(&admin)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("CURRENT"), b"someone's database").unwrap();

        let refused = backup
            .restore(&data, &members(), &admin_set(&admin))
            .unwrap_err();
        assert!(refused.to_string().contains("not empty"), "{refused}");
        assert_eq!(
            std::fs::read(data.join("CURRENT")).unwrap(),
            b"someone's database"
        );

        let fresh = dir.path().join("fresh");
        backup
            .restore(&fresh, &members(), &admin_set(&admin))
            .unwrap();
        assert!(
            fresh.join("CURRENT").exists(),
            "a RocksDB database was written"
        );
    }
}
