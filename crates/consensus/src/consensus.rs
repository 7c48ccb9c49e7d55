use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLockReadGuard};
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, Raft, ServerState, SnapshotPolicy};
use signpost_proto::v1::raft_server::RaftServer;
use signpost_state::{Outcome, Request};
use signpost_storage::Store;
use tokio::sync::{broadcast, watch};

use crate::error::ConsensusError;
use crate::log_store::LogStore;
use crate::network::Network;
use crate::raft_service::RaftService;
use crate::state_machine::{Applied, SharedState, StateMachine};
use crate::type_config::{NodeAddr, TypeConfig};

/// How a node takes part in consensus.
#[derive(Debug, Clone)]
pub struct ConsensusConfig {
    /// This node's id (> 0).
    pub node_id: u64,
    /// Directory of the node's RocksDB database.
    pub data_dir: PathBuf,
    /// The initial voters. Used only to initialize a new cluster; afterwards membership lives in
    /// the log.
    pub members: BTreeMap<u64, NodeAddr>,
    /// Trust domain whose node identities may speak Raft to us.
    pub trust_domain: String,
    /// TLS configuration for outgoing Raft connections (node certificate, peers must be nodes).
    pub peer_tls: Arc<rustls::ClientConfig>,
    /// Leader heartbeat period.
    pub heartbeat_ms: u64,
    /// Election timeout range; a follower that hears nothing for this long campaigns.
    pub election_timeout_min_ms: u64,
    /// Upper end of the randomized election timeout.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_after_entries: u64,
    /// Log entries kept behind a snapshot (so slightly lagging followers avoid a snapshot).
    pub log_entries_kept: u64,
}

impl ConsensusConfig {
    /// Defaults tuned for a LAN cluster on small machines: a missed heartbeat or two under load
    /// must not cause an election.
    pub fn new(
        node_id: u64,
        data_dir: PathBuf,
        members: BTreeMap<u64, NodeAddr>,
        trust_domain: String,
        peer_tls: Arc<rustls::ClientConfig>,
    ) -> ConsensusConfig {
        ConsensusConfig {
            node_id,
            data_dir,
            members,
            trust_domain,
            peer_tls,
            heartbeat_ms: 150,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            snapshot_after_entries: 10_000,
            log_entries_kept: 1_000,
        }
    }
}

/// One member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// Member id.
    pub id: u64,
    /// Its addresses.
    pub addr: NodeAddr,
    /// Voter (true) or learner (false).
    pub voter: bool,
}

/// A node's view of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    /// This node's id.
    pub node_id: u64,
    /// "leader", "follower", "candidate" or "learner".
    pub role: &'static str,
    /// Current term.
    pub term: u64,
    /// The leader this node knows of.
    pub leader_id: Option<u64>,
    /// Index of the last entry in the local log.
    pub last_log_index: u64,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Highest index applied to the state machine.
    pub applied_index: u64,
    /// Index covered by the latest snapshot.
    pub snapshot_index: u64,
    /// Highest purged log index.
    pub purged_index: u64,
    /// Members of the current configuration.
    pub members: Vec<MemberStatus>,
}

/// The consensus handle of a node.
#[derive(Clone)]
pub struct Consensus {
    raft: Raft<TypeConfig>,
    state_machine: StateMachine,
    log_store: LogStore,
    config: Arc<ConsensusConfig>,
}

impl std::fmt::Debug for Consensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consensus")
            .field("node_id", &self.config.node_id)
            .finish_non_exhaustive()
    }
}

impl Consensus {
    /// Opens the node's store and starts its Raft instance.
    pub async fn open(config: ConsensusConfig) -> Result<Consensus, ConsensusError> {
        assert!(config.node_id > 0, "node ids start at 1");
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            ConsensusError::Invalid(format!("creating {}: {e}", config.data_dir.display()))
        })?;
        let store = Arc::new(Store::open(&config.data_dir)?);
        let log_store = LogStore::new(store.clone());
        let state_machine = StateMachine::open(store)?;
        let raft_config = openraft::Config {
            cluster_name: "signpost".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            install_snapshot_timeout: 10_000,
            max_payload_entries: 300,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_after_entries),
            max_in_snapshot_log_to_keep: config.log_entries_kept,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ConsensusError::Invalid(e.to_string()))?;
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            Network::new(config.peer_tls.clone()),
            log_store.clone(),
            state_machine.clone(),
        )
        .await
        .map_err(|e| ConsensusError::Unavailable(e.to_string()))?;
        Ok(Consensus {
            raft,
            state_machine,
            log_store,
            config: Arc::new(config),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.config.node_id
    }

    /// The node-only Raft gRPC service, for the Raft listener.
    pub fn raft_service(&self) -> RaftServer<RaftService> {
        RaftService::new(self.raft.clone(), self.config.trust_domain.clone()).into_server()
    }

    /// Initializes a new cluster from the configured members if this node is the lowest member
    /// id and the cluster was never initialized. Exactly one node initializes; a restarted
    /// cluster finds its membership in the log and does nothing. Returns whether it initialized.
    pub async fn bootstrap(&self) -> Result<bool, ConsensusError> {
        let lowest = self.config.members.keys().next().copied();
        if lowest != Some(self.config.node_id) {
            return Ok(false);
        }
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| ConsensusError::Unavailable(e.to_string()))?;
        if initialized {
            return Ok(false);
        }
        match self.raft.initialize(self.config.members.clone()).await {
            Ok(()) => Ok(true),
            // Someone (or an earlier run of ours) already did: initialization is idempotent.
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(false),
            Err(e) => Err(ConsensusError::Invalid(e.to_string())),
        }
    }

    /// Replicates `request` and returns the outcome of applying it (computed by this node, the
    /// leader) together with the log index it was applied at.
    pub async fn propose(&self, request: Request) -> Result<(u64, Outcome), ConsensusError> {
        match self.raft.client_write(request).await {
            Ok(response) => Ok((response.log_id.index, response.data)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ConsensusError::NotLeader {
                    leader: f.leader_id.zip(f.leader_node),
                })
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(ConsensusError::Invalid(e.to_string()))
            }
            Err(RaftError::Fatal(e)) => Err(ConsensusError::Unavailable(e.to_string())),
        }
    }

    /// Read index: confirms leadership with a quorum and waits until this node has applied
    /// everything committed before the call. Reads made after it are linearizable. Returns the
    /// revision the reads will reflect (at least).
    pub async fn read_barrier(&self) -> Result<u64, ConsensusError> {
        match self.raft.ensure_linearizable().await {
            Ok(log_id) => Ok(log_id
                .map(|l| l.index)
                .unwrap_or(0)
                .max(self.state().revision())),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(ConsensusError::NotLeader {
                    leader: f.leader_id.zip(f.leader_node),
                })
            }
            Err(RaftError::APIError(e)) => Err(ConsensusError::Unavailable(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(ConsensusError::Unavailable(e.to_string())),
        }
    }

    /// The local state (may lag the leader unless a [`Consensus::read_barrier`] preceded it).
    /// Hold the guard briefly: apply waits for it.
    pub fn state(&self) -> RwLockReadGuard<'_, SharedState> {
        self.state_machine.read()
    }

    /// Applied batches and snapshot installs, in order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Applied>> {
        self.state_machine.subscribe()
    }

    /// The current leader and its addresses, when known.
    pub fn leader(&self) -> Option<(u64, NodeAddr)> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        let addr = metrics
            .membership_config
            .nodes()
            .find(|(id, _)| **id == leader)
            .map(|(_, a)| a.clone())?;
        Some((leader, addr))
    }

    /// This node's view of the cluster now.
    pub fn status(&self) -> NodeStatus {
        let metrics = self.raft.metrics().borrow().clone();
        self.status_from(&metrics)
    }

    fn status_from(&self, m: &openraft::RaftMetrics<u64, NodeAddr>) -> NodeStatus {
        let voters: BTreeSet<u64> = m.membership_config.voter_ids().collect();
        let members = m
            .membership_config
            .nodes()
            .map(|(id, addr)| MemberStatus {
                id: *id,
                addr: addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        NodeStatus {
            node_id: m.id,
            role: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            },
            term: m.current_term,
            leader_id: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: self.log_store.committed_index(),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            members,
        }
    }

    /// A stream of status changes (role, term, leader), for lease tracking and health.
    pub fn watch_status(&self) -> watch::Receiver<NodeStatus> {
        let (tx, rx) = watch::channel(self.status());
        let mut metrics = self.raft.metrics();
        let this = self.clone();
        tokio::spawn(async move {
            while metrics.changed().await.is_ok() {
                let status = this.status_from(&metrics.borrow_and_update().clone());
                if tx.send(status).is_err() {
                    break;
                }
            }
        });
        rx
    }

    /// Waits until some leader is known, up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64, ConsensusError> {
        let mut metrics = self.raft.metrics();
        let wait = async {
            loop {
                if let Some(leader) = metrics.borrow_and_update().current_leader {
                    return Ok(leader);
                }
                if metrics.changed().await.is_err() {
                    return Err(ConsensusError::Unavailable("raft stopped".into()));
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ConsensusError::Unavailable("no leader elected in time".into()))?
    }

    /// Adds a node as a learner (it catches up from the log or a snapshot), then, if `voter`,
    /// promotes it to voter. Leader only.
    pub async fn add_member(
        &self,
        id: u64,
        addr: NodeAddr,
        voter: bool,
    ) -> Result<(), ConsensusError> {
        self.raft
            .add_learner(id, addr, true)
            .await
            .map_err(map_write_error)?;
        if voter {
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(map_write_error)?;
        }
        Ok(())
    }

    /// Removes a member from the configuration. Leader only.
    pub async fn remove_member(&self, id: u64) -> Result<(), ConsensusError> {
        self.raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(map_write_error)?;
        self.raft
            .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
            .await
            .map_err(map_write_error)?;
        Ok(())
    }

    /// Asks Raft to build a snapshot now (and purge the log behind it per policy).
    pub async fn trigger_snapshot(&self) -> Result<(), ConsensusError> {
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| ConsensusError::Unavailable(e.to_string()))
    }

    /// Stops the Raft instance.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

fn map_write_error(e: RaftError<u64, ClientWriteError<u64, NodeAddr>>) -> ConsensusError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ConsensusError::NotLeader {
            leader: f.leader_id.zip(f.leader_node),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ConsensusError::Invalid(e.to_string())
        }
        RaftError::Fatal(e) => ConsensusError::Unavailable(e.to_string()),
    }
}
