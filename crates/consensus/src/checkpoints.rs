//! Quorum-signed checkpoints of the audit tree (see `signpost_audit::Checkpoint`).
//!
//! Every [`CHECKPOINT_EVERY`] the leader, while it holds its quorum lease, proposes a checkpoint
//! of its applied tree (size, root, its wall clock), signs it with its checkpoint key and asks
//! every other voter to cosign over the Raft listener (`Raft.Cosign`). A voter cosigns only
//! what it can check itself: the request comes from the leader it follows, the time is within
//! the clock-skew bound of its own clock, and its own tree, once applied that far, has the same
//! root at that size (it waits at most [`COSIGN_WAIT`] to get there). The leader keeps the note
//! once a majority of the checkpoint keys signed it, and hands it to the voters in its next
//! request; a voter keeps it only if it verifies and agrees with its own tree.
//!
//! The checkpoint keys are the keys the admins bound to the reserved service name
//! [`CHECKPOINT_SERVICE`]: a binding the admin chain signs, so clients verify the keys from the
//! genesis they pin, and rotate them the way they rotate any binding. Until they are bound, no
//! checkpoint is made. Checkpoints change no replicated state: they are not in the Raft log,
//! and the latest is kept in the node's store (Raft metadata, unsynced: losing it loses nothing
//! the next round does not bring back).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{Raft, ServerState};
use serde::{Deserialize, Serialize};
use signpost_audit::{origin_for, Checkpoint, CheckpointSigner, SignedCheckpoint, Witnesses};
use signpost_storage::Store;

use crate::audit_log::AuditLog;
use crate::election::{wall_clock_ms, Liveness, CLOCK_SKEW_MAX_MS};
use crate::error::ConsensusError;
use crate::network::Network;
use crate::state_machine::StateMachine;
use crate::type_config::TypeConfig;

pub use signpost_audit::CHECKPOINT_SERVICE;
/// How often a leader makes a checkpoint, with or without new records: a client can then
/// refuse checkpoints much older than this.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
/// How long a voter waits for its apply to reach a checkpoint's size before refusing it.
pub const COSIGN_WAIT: Duration = Duration::from_secs(1);
/// How long the leader waits for each cosignature.
const COSIGN_TIMEOUT: Duration = Duration::from_secs(2);
/// The Raft metadata key the latest quorum checkpoint is kept under.
const LATEST_KEY: &str = "audit-checkpoint";

/// A leader's request to cosign a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CosignRequest {
    /// The checkpoint's note text.
    pub text: String,
    /// The latest quorum-signed checkpoint note the leader holds, for the voter to keep.
    pub latest: Option<Vec<u8>>,
}

/// A voter's answer: its checkpoint public key and signature, or why it refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CosignResponse {
    /// `(public key, 64-byte signature)` or the reason for refusing.
    pub outcome: Result<([u8; 32], Vec<u8>), String>,
}

/// This node's part in checkpoints: its key, the latest quorum checkpoint it holds, and the
/// leader's round.
#[derive(Clone)]
pub struct Checkpoints {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: u64,
    key: Option<ed25519_dalek::SigningKey>,
    latest: Mutex<Option<SignedCheckpoint>>,
    store: Arc<Store>,
    state: StateMachine,
    audit: AuditLog,
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoints")
            .field("node_id", &self.inner.node_id)
            .field("has_key", &self.inner.key.is_some())
            .finish_non_exhaustive()
    }
}

fn refuse<T>(why: impl Into<String>) -> Result<T, String> {
    Err(why.into())
}

impl Checkpoints {
    pub(crate) fn open(
        node_id: u64,
        key: Option<ed25519_dalek::SigningKey>,
        store: Arc<Store>,
        state: StateMachine,
        audit: AuditLog,
    ) -> Result<Checkpoints, ConsensusError> {
        let this = Checkpoints {
            inner: Arc::new(Inner {
                node_id,
                key,
                latest: Mutex::new(None),
                store,
                state,
                audit,
            }),
        };
        if let Some(note) = this.inner.store.raft_get(LATEST_KEY)? {
            match this.witnesses().map(|w| w.verify(&note)) {
                Some(Ok(signed)) => *this.lock() = Some(signed),
                Some(Err(e)) => tracing::warn!(error = %e, "dropping the stored checkpoint"),
                None => {}
            }
        }
        Ok(this)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<SignedCheckpoint>> {
        // A panic while holding this lock leaves a complete value (assignments only).
        self.inner
            .latest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The cluster's checkpoint origin, from the genesis this node applied.
    pub fn origin(&self) -> Option<String> {
        let shared = self.inner.state.read();
        shared.registry.genesis().map(|genesis| {
            let keys: Vec<[u8; 32]> = genesis.keys.iter().copied().collect();
            origin_for(&keys, genesis.threshold)
        })
    }

    /// This node's checkpoint signer under the origin (none before the genesis is applied).
    fn signer(&self) -> Option<CheckpointSigner> {
        let origin = self.origin()?;
        Some(CheckpointSigner::new(&origin, self.inner.key.clone()?))
    }

    /// The checkpoint keys bound now, with the origin; `None` until both exist.
    pub fn witnesses(&self) -> Option<Witnesses> {
        let origin = self.origin()?;
        let keys: Vec<[u8; 32]> = {
            let shared = self.inner.state.read();
            shared
                .registry
                .binding(CHECKPOINT_SERVICE)?
                .keys
                .iter()
                .copied()
                .collect()
        };
        match Witnesses::new(&origin, &keys) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "the checkpoint binding is not usable");
                None
            }
        }
    }

    /// The latest quorum-signed checkpoint this node holds.
    pub fn latest(&self) -> Option<SignedCheckpoint> {
        self.lock().clone()
    }

    /// This node's root of the tree of `size` records, once its apply has reached it (waiting
    /// at most `wait`).
    async fn own_root(&self, size: u64, wait: Duration) -> Result<signpost_audit::Hash, String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let applied = self.inner.state.read().audit.size();
            if applied >= size {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return refuse(format!(
                    "this node has applied {applied} audit records, fewer than the {size} \
                     the checkpoint covers"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let audit = self.inner.audit.clone();
        tokio::task::spawn_blocking(move || audit.root_of(size))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Keeps `note` as the latest checkpoint if it verifies against the bound keys, agrees
    /// with this node's own tree, and is newer than the one held.
    async fn offer(&self, note: &[u8], wait: Duration) -> Result<(), String> {
        let witnesses = self
            .witnesses()
            .ok_or("no checkpoint keys are bound on this node")?;
        let signed = witnesses.verify(note).map_err(|e| e.to_string())?;
        let root = self.own_root(signed.checkpoint.size, wait).await?;
        if root != signed.checkpoint.root {
            tracing::error!(
                size = signed.checkpoint.size,
                "a quorum-signed checkpoint disagrees with this node's audit tree"
            );
            return refuse("the checkpoint's root is not this node's root at its size");
        }
        let newer = match &*self.lock() {
            None => true,
            Some(held) => {
                (signed.checkpoint.size, signed.checkpoint.time_ms)
                    > (held.checkpoint.size, held.checkpoint.time_ms)
            }
        };
        if newer {
            if let Err(e) = self.inner.store.raft_put_unsynced(LATEST_KEY, note) {
                tracing::warn!(error = %e, "could not store the checkpoint");
            }
            *self.lock() = Some(signed);
        }
        Ok(())
    }

    /// A voter's side of `Raft.Cosign`: `from` is the authenticated member asking, `leader`
    /// the leader this node follows.
    pub(crate) async fn cosign(
        &self,
        from: u64,
        leader: Option<u64>,
        request: CosignRequest,
    ) -> CosignResponse {
        CosignResponse {
            outcome: self.cosign_checked(from, leader, request).await,
        }
    }

    async fn cosign_checked(
        &self,
        from: u64,
        leader: Option<u64>,
        request: CosignRequest,
    ) -> Result<([u8; 32], Vec<u8>), String> {
        if leader != Some(from) {
            return refuse(format!(
                "node {from} is not the leader this node follows ({leader:?})"
            ));
        }
        let signer = self
            .signer()
            .ok_or("this node has no checkpoint key (or no genesis yet)")?;
        let checkpoint = Checkpoint::parse(request.text.as_bytes()).map_err(|e| e.to_string())?;
        if checkpoint.origin != signer.name() {
            return refuse(format!(
                "origin {} is not this cluster's ({})",
                checkpoint.origin,
                signer.name()
            ));
        }
        let skew = checkpoint.time_ms.abs_diff(wall_clock_ms());
        if skew > CLOCK_SKEW_MAX_MS {
            return refuse(format!(
                "the checkpoint's time is {skew} ms from this node's clock (at most \
                 {CLOCK_SKEW_MAX_MS})"
            ));
        }
        let root = self.own_root(checkpoint.size, COSIGN_WAIT).await?;
        if root != checkpoint.root {
            tracing::error!(
                leader = from,
                size = checkpoint.size,
                "the leader asked to cosign a root this node's audit tree does not have"
            );
            return refuse("the root is not this node's root at that size");
        }
        if let Some(latest) = request.latest {
            if let Err(e) = self.offer(&latest, Duration::ZERO).await {
                tracing::debug!(error = %e, "not keeping the leader's latest checkpoint");
            }
        }
        Ok((signer.public_key(), signer.sign_checkpoint(&checkpoint)))
    }

    /// One leader round: checkpoint the applied tree, collect cosignatures, keep the note if
    /// a quorum signed it. `Ok(None)`: nothing to do (no key, no binding, not a witness).
    async fn round(
        &self,
        raft: &Raft<TypeConfig>,
        network: &Network,
    ) -> Result<Option<SignedCheckpoint>, String> {
        let (Some(signer), Some(witnesses)) = (self.signer(), self.witnesses()) else {
            return Ok(None);
        };
        if !witnesses.contains(&signer.public_key()) {
            return Ok(None);
        }
        let checkpoint = {
            let shared = self.inner.state.read();
            Checkpoint {
                origin: witnesses.origin().to_owned(),
                size: shared.audit.size(),
                root: shared.audit.root(),
                time_ms: wall_clock_ms(),
            }
        };
        let request = CosignRequest {
            text: checkpoint.text(),
            latest: self.latest().map(|l| l.note),
        };
        let membership = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .clone();
        let asks = membership
            .voter_ids()
            .filter(|id| *id != self.inner.node_id)
            .filter_map(|id| membership.get_node(&id).map(|addr| (id, addr.clone())))
            .map(|(id, addr)| {
                let (network, request) = (network.clone(), request.clone());
                async move {
                    let answer =
                        tokio::time::timeout(COSIGN_TIMEOUT, network.cosign(id, &addr, &request))
                            .await;
                    match answer {
                        Ok(Ok(CosignResponse { outcome: Ok(sig) })) => Some(sig),
                        Ok(Ok(CosignResponse { outcome: Err(why) })) => {
                            tracing::debug!(peer = id, why, "cosignature refused");
                            None
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = id, error = %e, "cosign failed");
                            None
                        }
                        Err(_) => None,
                    }
                }
            });
        let mut signatures = vec![(signer.public_key(), signer.sign_checkpoint(&checkpoint))];
        signatures.extend(futures::future::join_all(asks).await.into_iter().flatten());
        let signed = witnesses
            .assemble(&checkpoint, &signatures)
            .map_err(|e| e.to_string())?;
        self.offer(&signed.note, Duration::ZERO).await?;
        Ok(Some(signed))
    }

    /// Runs leader rounds every [`CHECKPOINT_EVERY`] until Raft stops.
    pub(crate) fn spawn(self, raft: Raft<TypeConfig>, network: Network, liveness: Arc<Liveness>) {
        if self.inner.key.is_none() {
            tracing::info!("no checkpoint key configured: this node cosigns no checkpoints");
            return;
        }
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tick.tick().await;
                let state = {
                    let m = raft.metrics();
                    let m = m.borrow();
                    if m.running_state.is_err() {
                        return;
                    }
                    m.state
                };
                if state == ServerState::Shutdown {
                    return;
                }
                if state != ServerState::Leader || !liveness.has_quorum_lease() {
                    continue;
                }
                match self.round(&raft, &network).await {
                    Ok(Some(signed)) => {
                        if failing {
                            tracing::info!(size = signed.checkpoint.size, "checkpoints resumed");
                        }
                        failing = false;
                        metrics::counter!(crate::CHECKPOINTS_TOTAL, "result" => "signed")
                            .increment(1);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "no quorum-signed checkpoint this round");
                        }
                        failing = true;
                        metrics::counter!(crate::CHECKPOINTS_TOTAL, "result" => "failed")
                            .increment(1);
                    }
                }
            }
        });
    }
}
