//! Rollback protection: the highest admin-set version and the highest binding version per
//! service that this client has verified. An answer below either is refused, so a node that
//! holds a rotated-out key (or an old, genuine answer) cannot roll the client back to it.
//!
//! The floors live in memory and, when `state_file` is configured, in a small JSON file beside
//! the client config that is rewritten (atomically) whenever a floor rises, so a restarted
//! client keeps them. `trust.min_admin_version` in the config pins a starting floor for a
//! client that has never seen the cluster.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::ClientError;

/// Services whose binding version is remembered; beyond it new services are not tracked (the
/// admin-set floor still applies to them). Bounds the memory and the state file.
const SERVICES_TRACKED_MAX: usize = 100_000;

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    admin_version: u64,
    bindings: BTreeMap<String, u64>,
}

/// The versions below which this client refuses answers.
#[derive(Debug)]
pub(crate) struct Floors {
    stored: Stored,
    file: Option<PathBuf>,
}

impl Floors {
    /// Floors from `file` (if it exists) and the configured minimum admin-set version.
    pub(crate) fn load(
        file: Option<PathBuf>,
        min_admin_version: u64,
    ) -> Result<Floors, ClientError> {
        let mut stored = Stored::default();
        if let Some(path) = &file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    stored = serde_json::from_str(&text).map_err(|e| {
                        ClientError::Config(format!("state file {}: {e}", path.display()))
                    })?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ClientError::Config(format!(
                        "state file {}: {e}",
                        path.display()
                    )))
                }
            }
        }
        stored.admin_version = stored.admin_version.max(min_admin_version);
        Ok(Floors { stored, file })
    }

    /// Refuses an answer whose admin set or binding is older than one already verified.
    pub(crate) fn check(
        &self,
        admin_version: u64,
        service: &str,
        binding_version: u64,
    ) -> Result<(), ClientError> {
        if admin_version < self.stored.admin_version {
            return Err(ClientError::Verification(format!(
                "rollback: the answer's admin set is version {admin_version}, but this client \
                 has verified version {}",
                self.stored.admin_version
            )));
        }
        if let Some(floor) = self.stored.bindings.get(service) {
            if binding_version < *floor {
                return Err(ClientError::Verification(format!(
                    "rollback: the answer's binding of {service} is version {binding_version}, \
                     but this client has verified version {floor}"
                )));
            }
        }
        Ok(())
    }

    /// Raises the floors to a verified answer's versions; persists them if they rose.
    pub(crate) fn raise(&mut self, admin_version: u64, service: &str, binding_version: u64) {
        let mut rose = false;
        if admin_version > self.stored.admin_version {
            self.stored.admin_version = admin_version;
            rose = true;
        }
        let tracked = self.stored.bindings.len();
        match self.stored.bindings.get_mut(service) {
            Some(floor) if binding_version > *floor => {
                *floor = binding_version;
                rose = true;
            }
            Some(_) => {}
            None if tracked < SERVICES_TRACKED_MAX => {
                self.stored
                    .bindings
                    .insert(service.to_string(), binding_version);
                rose = true;
            }
            None => {}
        }
        if rose {
            self.persist();
        }
    }

    fn persist(&self) {
        let Some(path) = &self.file else {
            return;
        };
        let write = || -> std::io::Result<()> {
            let text = serde_json::to_string(&self.stored).map_err(std::io::Error::other)?;
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, path)
        };
        // The in-memory floors still protect this process; a failed write only weakens the
        // protection of the next one, so it is reported, not fatal.
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the client's version floors");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_refuse_older_versions_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state.json");
        let mut floors = Floors::load(Some(file.clone()), 0).unwrap();
        floors.check(1, "payments", 5).unwrap();
        floors.raise(2, "payments", 7);
        assert!(floors.check(1, "payments", 7).is_err(), "older admin set");
        assert!(floors.check(2, "payments", 6).is_err(), "older binding");
        floors.check(2, "payments", 7).unwrap();
        floors.check(2, "orders", 1).unwrap();

        let reloaded = Floors::load(Some(file), 0).unwrap();
        assert!(reloaded.check(1, "payments", 7).is_err());
        assert!(reloaded.check(2, "payments", 6).is_err());
    }

    #[test]
    fn a_pinned_minimum_admin_version_applies_from_the_start() {
        let floors = Floors::load(None, 3).unwrap();
        assert!(floors.check(2, "payments", 1).is_err());
        floors.check(3, "payments", 1).unwrap();
    }
}
