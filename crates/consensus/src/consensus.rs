use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLockReadGuard};
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, Raft, ServerState, SnapshotPolicy};
use signpost_proto::v1::raft_server::RaftServer;
use signpost_state::{Outcome, Request};
use signpost_storage::Store;
use tokio::sync::{broadcast, watch};

use crate::audit_log::AuditLog;
use crate::checkpoints::Checkpoints;
use crate::election::{ElectionDriver, ElectionTiming, Liveness};
use crate::error::ConsensusError;
use crate::forward::{forwardable, ForwardAnswer, ForwardDesk, ForwardRequest, FORWARD_TIMEOUT};
use crate::log_store::LogStore;
use crate::network::Network;
use crate::propose_batch::ProposalBatcher;
use crate::raft_service::RaftService;
use crate::read_batch::ReadBatcher;
use crate::state_machine::{Applied, SharedState, StateMachine};
use crate::type_config::{NodeAddr, TypeConfig};

/// Default leader heartbeat period.
pub const DEFAULT_HEARTBEAT_MS: u64 = 100;
/// Default lower bound of the election timeout; also the leader's quorum lease.
pub const DEFAULT_ELECTION_TIMEOUT_MIN_MS: u64 = 400;
/// Default upper bound of the election timeout; also the voters' lease.
pub const DEFAULT_ELECTION_TIMEOUT_MAX_MS: u64 = 600;

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
    /// Address outgoing Raft connections are made from (the node's Raft listen address), so
    /// peers can admit members by source address. None: the kernel's choice.
    pub local_ip: Option<IpAddr>,
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
    /// Put concurrent proposals into one log entry (`Command::Batch`). Off only while a
    /// cluster is upgraded from a version that cannot read batch entries.
    pub batch_proposals: bool,
    /// A follower hands the client writes and linearizable reads it admitted to the leader
    /// (see [`crate::forward`]) instead of answering "not the leader".
    pub forward_to_leader: bool,
    /// The genesis admin set this node was configured to bootstrap (`[bootstrap]`): a stored
    /// state or a received snapshot with another genesis belongs to another cluster and is
    /// refused, even on a node that has no state yet.
    pub expected_genesis: Option<signpost_record::AdminSet>,
    /// This node's audit checkpoint key; None: it neither makes nor cosigns checkpoints.
    pub checkpoint_key: Option<ed25519_dalek::SigningKey>,
    /// Bytes of audit records this node keeps (see [`crate::audit_retention`]).
    pub audit_retain_bytes: u64,
}

impl ConsensusConfig {
    /// Defaults tuned for a LAN cluster: a leader crash costs well under a second of writes,
    /// while pre-vote keeps a missed heartbeat or two on one follower from causing an election.
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
            local_ip: None,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            election_timeout_min_ms: DEFAULT_ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max_ms: DEFAULT_ELECTION_TIMEOUT_MAX_MS,
            snapshot_after_entries: 10_000,
            log_entries_kept: 1_000,
            batch_proposals: true,
            forward_to_leader: false,
            expected_genesis: None,
            checkpoint_key: None,
            audit_retain_bytes: crate::DEFAULT_AUDIT_RETAIN_BYTES,
        }
    }
}

/// A leader without its quorum lease answers as if no leader were known.
fn leader_lease(raft: &Raft<TypeConfig>, liveness: &Liveness) -> Result<(), ConsensusError> {
    let leading = raft.metrics().borrow().state == ServerState::Leader;
    if leading && !liveness.has_quorum_lease() {
        return Err(ConsensusError::NotLeader { leader: None });
    }
    Ok(())
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
    /// Last log index known to be on that member: on the leader, from replication; on other
    /// nodes only for themselves.
    pub matched_index: Option<u64>,
    /// Milliseconds since that member last answered this node (the leader's view of its
    /// followers) or since this follower last heard from that member as its leader. None:
    /// this node has no such contact to report.
    pub last_contact_ms: Option<u64>,
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
    /// For a leader: a quorum acknowledged it within the leader lease, so it serves writes.
    pub quorum_lease: bool,
    /// For a leader: milliseconds since a quorum last acknowledged it.
    pub millis_since_quorum_ack: Option<u64>,
}

/// The consensus handle of a node.
#[derive(Clone)]
pub struct Consensus {
    raft: Raft<TypeConfig>,
    state_machine: StateMachine,
    log_store: LogStore,
    liveness: Arc<Liveness>,
    // The network openraft uses; leadership transfer reuses its connections.
    network: Network,
    // Linearizable reads share leadership confirmations.
    reads: ReadBatcher,
    // Concurrent proposals share log entries (group commit).
    proposals: ProposalBatcher,
    audit: AuditLog,
    checkpoints: Checkpoints,
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
        let mut log_store = LogStore::new(store.clone());
        log_store.check_watermark().await?;
        let state_machine = StateMachine::open(store.clone())?;
        let audit = AuditLog::new(store.clone(), state_machine.clone());
        let checkpoints = Checkpoints::open(
            config.node_id,
            config.checkpoint_key.clone(),
            store,
            state_machine.clone(),
            audit.clone(),
        )?;
        if let (Some(expected), Some(stored)) = (
            &config.expected_genesis,
            state_machine.read().registry.genesis(),
        ) {
            if expected != stored {
                return Err(ConsensusError::ForeignGenesis {
                    dir: config.data_dir.display().to_string(),
                });
            }
        }
        // openraft's own election timing only sets the vote lease it enforces (and its vote RPC
        // timeout): elections are started and gated by the pre-vote driver below, with the
        // configured timeouts.
        let (raft_election_min, raft_election_max) =
            crate::election::raft_vote_lease(Duration::from_millis(config.heartbeat_ms));
        let raft_config = openraft::Config {
            cluster_name: "signpost".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: raft_election_min,
            election_timeout_max: raft_election_max,
            install_snapshot_timeout: 10_000,
            max_payload_entries: 300,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_after_entries),
            max_in_snapshot_log_to_keep: config.log_entries_kept,
            // Elections are started by the pre-vote driver (crate::election), never by
            // openraft's own timer, so a node that cannot win never raises its term.
            enable_elect: false,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ConsensusError::Invalid(e.to_string()))?;
        let network = Network::new(config.peer_tls.clone(), config.local_ip);
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network.clone(),
            log_store.clone(),
            state_machine.clone(),
        )
        .await
        .map_err(|e| ConsensusError::Unavailable(e.to_string()))?;
        let timing = ElectionTiming {
            heartbeat: Duration::from_millis(config.heartbeat_ms),
            timeout_min: Duration::from_millis(config.election_timeout_min_ms),
            timeout_max: Duration::from_millis(config.election_timeout_max_ms),
        };
        let liveness = Liveness::new(timing.timeout_max, timing.timeout_min);
        tokio::spawn(log_store.clone().flush_watermark_periodically({
            let this = raft.clone();
            async move {
                let mut metrics = this.metrics();
                while metrics.changed().await.is_ok() {
                    if metrics.borrow().running_state.is_err() {
                        return;
                    }
                }
            }
        }));
        ElectionDriver {
            raft: raft.clone(),
            network: network.clone(),
            liveness: liveness.clone(),
            timing,
            node_id: config.node_id,
        }
        .spawn();
        checkpoints
            .clone()
            .spawn(raft.clone(), network.clone(), liveness.clone());
        crate::audit_retention::Retention {
            log: audit.clone(),
            checkpoints: checkpoints.clone(),
            retain_bytes: config
                .audit_retain_bytes
                .max(crate::audit_retention::RETAIN_BYTES_MIN),
        }
        .spawn();
        let reads = ReadBatcher::spawn(raft.clone(), {
            let state_machine = state_machine.clone();
            move || state_machine.read().revision()
        });
        let proposals = ProposalBatcher::spawn(
            raft.clone(),
            if config.batch_proposals {
                crate::propose_batch::BATCH_REQUESTS_MAX
            } else {
                1
            },
        );
        Ok(Consensus {
            audit,
            checkpoints,
            raft,
            state_machine,
            log_store,
            liveness,
            network,
            reads,
            proposals,
            config: Arc::new(config),
        })
    }

    /// True while this node leads with a quorum acknowledgement inside the leader lease; a
    /// leader cut off from its quorum stops serving writes, linearizable reads and renewals.
    pub fn has_quorum_lease(&self) -> bool {
        self.liveness.has_quorum_lease()
    }

    /// A leader without its quorum lease answers as if no leader were known: clients move to
    /// another node at once instead of waiting on a write that cannot commit.
    fn check_leader_lease(&self) -> Result<(), ConsensusError> {
        leader_lease(&self.raft, &self.liveness)
    }

    /// The leader to forward a client request to: when forwarding is on, this node is not the
    /// leader and knows who is.
    fn forward_target(&self) -> Option<(u64, NodeAddr)> {
        if !self.config.forward_to_leader {
            return None;
        }
        if self.raft.metrics().borrow().state == ServerState::Leader {
            return None;
        }
        self.leader().filter(|(id, _)| *id != self.config.node_id)
    }

    /// Sends `request` to the leader and waits (bounded) for its answer.
    async fn forward(
        &self,
        (leader, addr): (u64, NodeAddr),
        request: ForwardRequest,
    ) -> Result<ForwardAnswer, ConsensusError> {
        let op = match request {
            ForwardRequest::Propose(_) => "write",
            ForwardRequest::ReadIndex => "read",
        };
        let sent = tokio::time::timeout(
            FORWARD_TIMEOUT,
            self.network.forward(leader, &addr, &request),
        )
        .await;
        let (result, answer) = match sent {
            Err(_) => (
                "timeout",
                Err(ConsensusError::Unavailable(format!(
                    "leader {leader} did not answer a forwarded {op} within {} s",
                    FORWARD_TIMEOUT.as_secs()
                ))),
            ),
            Ok(Err(e)) => (
                "unreachable",
                Err(ConsensusError::Unavailable(format!(
                    "forwarding a {op} to leader {leader} at {}: {e}",
                    addr.raft_addr
                ))),
            ),
            Ok(Ok(ForwardAnswer::Refused(why))) => ("refused", Err(why.into_error(leader))),
            Ok(Ok(answer)) => ("ok", Ok(answer)),
        };
        metrics::counter!(crate::FORWARDED_TOTAL, "side" => "follower", "op" => op, "result" => result)
            .increment(1);
        answer
    }

    /// Resolves with the reason when Raft has stopped for good (a storage error, or shutdown).
    pub async fn fatal(&self) -> String {
        let mut metrics = self.raft.metrics();
        loop {
            if let Err(e) = &metrics.borrow_and_update().running_state {
                return e.to_string();
            }
            if metrics.changed().await.is_err() {
                return "raft stopped".to_string();
            }
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.config.node_id
    }

    /// The node-only Raft gRPC service, for the Raft listener.
    pub fn raft_service(&self) -> RaftServer<RaftService> {
        let (_, raft_vote_lease) =
            crate::election::raft_vote_lease(Duration::from_millis(self.config.heartbeat_ms));
        RaftService::new(
            self.raft.clone(),
            self.config.trust_domain.clone(),
            self.liveness.clone(),
            self.config.members.keys().copied().collect(),
            Duration::from_millis(raft_vote_lease),
            self.state_machine.clone(),
            self.config.expected_genesis.clone(),
            ForwardDesk::new(self.proposals.clone(), self.reads.clone(), {
                let raft = self.raft.clone();
                let liveness = self.liveness.clone();
                Arc::new(move || leader_lease(&raft, &liveness))
            }),
            self.checkpoints.clone(),
        )
        .into_server()
    }

    /// Hands leadership to the most up-to-date voter before this node stops (a rolling
    /// restart): stops taking writes, lets the target catch up, stops heartbeats and tells the
    /// target to campaign as soon as the voters' short openraft lease allows. Returns the new
    /// leader, or None if this node was not leading or no transfer happened within `timeout`
    /// (the cluster then elects a leader as after a crash).
    pub async fn transfer_leadership(&self, timeout: Duration) -> Option<u64> {
        self.hand_over(None, timeout).await
    }

    /// Hands leadership to `target` (or, if None, to the most up-to-date voter) while this node
    /// keeps running (`signpost cluster transfer-leader`). Writes pause here until the new
    /// leader is known; if the transfer does not happen within `timeout`, this node resumes
    /// leading. Returns the leader afterwards.
    pub async fn transfer_leadership_to(
        &self,
        target: Option<u64>,
        timeout: Duration,
    ) -> Result<u64, ConsensusError> {
        let me = self.config.node_id;
        if self.raft.metrics().borrow().state != ServerState::Leader {
            return Err(ConsensusError::NotLeader {
                leader: self.leader(),
            });
        }
        if let Some(t) = target {
            let voters: BTreeSet<u64> = self
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .collect();
            if !voters.contains(&t) {
                return Err(ConsensusError::Invalid(format!(
                    "node {t} is not a voter of this cluster"
                )));
            }
            if t == me {
                return Ok(me);
            }
        }
        let result = self.hand_over(target, timeout).await;
        // The transfer either happened (heartbeats and the step-down flag matter only while
        // leading) or did not, and this node must lead normally again.
        self.liveness.resume();
        self.raft.runtime_config().heartbeat(true);
        result.ok_or_else(|| {
            ConsensusError::Unavailable(format!(
                "leadership was not handed over within {} ms; node {me} still leads",
                timeout.as_millis()
            ))
        })
    }

    async fn hand_over(&self, wanted: Option<u64>, timeout: Duration) -> Option<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut metrics = self.raft.metrics();
        let me = self.config.node_id;
        if metrics.borrow().state != ServerState::Leader {
            return None;
        }
        self.liveness.step_down();
        // The target must hold everything this leader has; entries in flight get a moment.
        let target = loop {
            let m = metrics.borrow_and_update().clone();
            let last = m.last_log_index;
            let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
            let best = m
                .replication
                .iter()
                .flatten()
                .filter(|(id, _)| **id != me && voters.contains(id))
                .filter(|(id, _)| wanted.is_none_or(|w| w == **id))
                .max_by_key(|(_, matched)| matched.map(|l| l.index))
                .map(|(id, matched)| (*id, matched.map(|l| l.index)));
            match best {
                Some((id, matched)) if matched == last => break id,
                _ if tokio::time::Instant::now() >= deadline => return None,
                _ => {
                    let _ = tokio::time::timeout_at(deadline, metrics.changed()).await;
                }
            }
        };
        let addr = member_addr(&self.raft, target)?;
        self.raft.runtime_config().heartbeat(false);
        let request = crate::election::TimeoutNowRequest { leader: me };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, self.network.timeout_now(target, &addr, &request)).await {
            Ok(Ok(r)) if r.accepted => {}
            other => {
                tracing::warn!(
                    target,
                    ?other,
                    "leadership transfer refused; stopping without it"
                );
                return None;
            }
        }
        let handed = async {
            loop {
                if let Some(leader) = metrics.borrow_and_update().current_leader {
                    if leader != me {
                        return leader;
                    }
                }
                if metrics.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let leader = tokio::time::timeout_at(deadline, handed).await.ok();
        tracing::info!(target, ?leader, "leadership handed over");
        leader
    }

    /// The Raft addresses of the current members (or of the configured initial members while
    /// this node knows no membership): the only sources the Raft listener admits.
    pub fn member_raft_addrs(&self) -> Vec<String> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let addrs: Vec<String> = m
            .membership_config
            .nodes()
            .map(|(_, a)| a.raft_addr.clone())
            .collect();
        if addrs.is_empty() {
            return self
                .config
                .members
                .values()
                .map(|a| a.raft_addr.clone())
                .collect();
        }
        addrs
    }

    /// Membership changes (and every other metrics change), for listeners that follow it.
    pub fn watch_membership(&self) -> watch::Receiver<Vec<String>> {
        let (tx, rx) = watch::channel(self.member_raft_addrs());
        let mut metrics = self.raft.metrics();
        let this = self.clone();
        tokio::spawn(async move {
            while metrics.changed().await.is_ok() {
                let addrs = this.member_raft_addrs();
                tx.send_if_modified(|current| {
                    let changed = *current != addrs;
                    if changed {
                        *current = addrs;
                    }
                    changed
                });
                if tx.is_closed() {
                    break;
                }
            }
        });
        rx
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
    ///
    /// Concurrent proposals share one log entry (`crate::propose_batch`, group commit). The
    /// entry time (`time_ms`) is stamped there, once per entry, from this leader's clock,
    /// whatever the caller put there: the one place the registry's notion of "now" comes from.
    /// On a follower with `forward_to_leader`, a client command goes to the leader instead
    /// (the outcome is the leader's).
    pub async fn propose(&self, request: Request) -> Result<(u64, Outcome), ConsensusError> {
        if let Some(leader) = self
            .forward_target()
            .filter(|_| forwardable(&request.command))
        {
            return match self
                .forward(leader, ForwardRequest::Propose(request))
                .await?
            {
                ForwardAnswer::Proposed { index, outcome } => Ok((index, outcome)),
                other => Err(ConsensusError::Unavailable(format!(
                    "the leader answered a forwarded write with {other:?}"
                ))),
            };
        }
        self.check_leader_lease()?;
        self.proposals.propose(request).await
    }

    /// Read index: confirms leadership with a quorum and waits until this node has applied
    /// everything committed before the call. Reads made after it are linearizable. Returns the
    /// revision the reads will reflect (at least). Concurrent calls share one confirmation
    /// that started after each of them (see [`crate::read_batch`]). On a follower with
    /// `forward_to_leader`, the leader confirms and this node waits to apply up to its index.
    pub async fn read_barrier(&self) -> Result<u64, ConsensusError> {
        if let Some(leader) = self.forward_target() {
            let index = match self.forward(leader, ForwardRequest::ReadIndex).await? {
                ForwardAnswer::ReadIndex(index) => index,
                other => {
                    return Err(ConsensusError::Unavailable(format!(
                        "the leader answered a forwarded read index with {other:?}"
                    )))
                }
            };
            // The read is linearizable once this node has applied what the leader had
            // committed when it confirmed its leadership.
            self.raft
                .wait(Some(FORWARD_TIMEOUT))
                .applied_index_at_least(Some(index), "forwarded read index")
                .await
                .map_err(|e| {
                    ConsensusError::Unavailable(format!(
                        "this node did not apply up to the leader's read index {index}: {e}"
                    ))
                })?;
            return Ok(self.state().revision().max(index));
        }
        self.check_leader_lease()?;
        self.reads.barrier().await
    }

    /// The local state (may lag the leader unless a [`Consensus::read_barrier`] preceded it).
    /// Hold the guard briefly: apply waits for it.
    pub fn state(&self) -> RwLockReadGuard<'_, SharedState> {
        self.state_machine.read()
    }

    /// This node's copy of the audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The audit log's quorum-signed checkpoints as this node holds them.
    pub fn checkpoints(&self) -> &Checkpoints {
        &self.checkpoints
    }

    /// Applied batches and snapshot installs, in order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Applied>> {
        self.state_machine.subscribe()
    }

    /// The current leader and its addresses, when known.
    pub fn leader(&self) -> Option<(u64, NodeAddr)> {
        let leader = self.raft.metrics().borrow().current_leader?;
        // We "lead" without a quorum: nobody should be sent here.
        if leader == self.config.node_id && !self.liveness.has_quorum_lease() {
            return None;
        }
        Some((leader, member_addr(&self.raft, leader)?))
    }

    /// Signatures this node verified at admission, reused once each by its apply.
    pub fn verified_signatures(&self) -> &signpost_record::VerifiedSignatures {
        self.state_machine.verified_signatures()
    }

    /// Whether this node should receive client traffic, or why not: it must be a member, hear
    /// from a leader within the voters' lease (or lead holding its quorum lease), and have
    /// applied all but at most `apply_lag_max` of the entries it knows committed.
    pub fn readiness(&self, apply_lag_max: u64) -> Result<(), String> {
        let metrics = self.raft.metrics().borrow().clone();
        let me = self.config.node_id;
        if !metrics.membership_config.nodes().any(|(id, _)| *id == me) {
            return Err("not a member of a cluster (yet)".into());
        }
        match metrics.current_leader {
            None => return Err("no leader known".into()),
            Some(leader) if leader == me => {
                if !self.liveness.has_quorum_lease() {
                    return Err("leader without a quorum".into());
                }
            }
            Some(leader) => {
                if self.liveness.lease_expired(false) {
                    return Err(format!(
                        "no message from leader {leader} within the election timeout"
                    ));
                }
            }
        }
        let status = self.status_from(&metrics);
        if status.applied_index.saturating_add(apply_lag_max) < status.commit_index {
            return Err(format!(
                "applied index {} is more than {apply_lag_max} behind commit index {}",
                status.applied_index, status.commit_index
            ));
        }
        Ok(())
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
            .map(|(id, addr)| {
                let (matched_index, last_contact_ms) = self.contact_of(m, *id);
                MemberStatus {
                    id: *id,
                    addr: addr.clone(),
                    voter: voters.contains(id),
                    matched_index,
                    last_contact_ms,
                }
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
            quorum_lease: m.state == ServerState::Leader && self.liveness.has_quorum_lease(),
            millis_since_quorum_ack: self
                .liveness
                .since_quorum_ack()
                .map(|d| d.as_millis() as u64),
        }
    }

    /// What this node knows of member `id`'s log and of its last contact with it.
    fn contact_of(
        &self,
        m: &openraft::RaftMetrics<u64, NodeAddr>,
        id: u64,
    ) -> (Option<u64>, Option<u64>) {
        let millis = |d: Duration| d.as_millis().min(u128::from(u64::MAX)) as u64;
        if id == m.id {
            return (m.last_log_index, Some(0));
        }
        if let Some(replication) = &m.replication {
            let matched = replication.get(&id).copied().flatten().map(|l| l.index);
            let contact = self.network.contacts().since(id).map(millis);
            return (matched, contact);
        }
        if m.current_leader == Some(id) {
            return (None, Some(millis(self.liveness.since_leader_contact())));
        }
        (None, None)
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

    /// Adds node `id` as a learner, waits (up to `timeout`) until it holds the log up to the
    /// entry that added it, then promotes it to voter. Leader only. Idempotent: a voter with the
    /// same addresses is left as it is, so an operator whose call timed out can run it again
    /// (the learner keeps catching up meanwhile). A member id with other addresses is refused.
    pub async fn add_member(
        &self,
        id: u64,
        addr: NodeAddr,
        timeout: Duration,
    ) -> Result<(), ConsensusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.check_leader_lease()?;
        if self.raft.metrics().borrow().state != ServerState::Leader {
            return Err(ConsensusError::NotLeader {
                leader: self.leader(),
            });
        }
        {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            let membership = m.membership_config.membership();
            if let Some(known) = membership.get_node(&id) {
                if *known != addr {
                    return Err(ConsensusError::Invalid(format!(
                        "node {id} is already a member at {} (raft {}); remove it first",
                        known.client_addr, known.raft_addr
                    )));
                }
                if membership.voter_ids().any(|v| v == id) {
                    return Ok(());
                }
            }
        }
        let added = self
            .raft
            .add_learner(id, addr, false)
            .await
            .map_err(map_write_error)?;
        let target = added.log_id.index;
        let mut metrics = self.raft.metrics();
        loop {
            let matched = {
                let m = metrics.borrow_and_update();
                if m.state != ServerState::Leader {
                    return Err(ConsensusError::NotLeader {
                        leader: self.leader(),
                    });
                }
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&id).copied().flatten())
                    .map(|l| l.index)
            };
            if matched.is_some_and(|i| i >= target) {
                break;
            }
            let caught_up = tokio::time::timeout_at(deadline, metrics.changed()).await;
            if caught_up.is_err() {
                return Err(ConsensusError::Unavailable(format!(
                    "node {id} joined as a learner but has not caught up yet (it holds up to \
                     index {}, needs {target}); it keeps catching up: run the command again to \
                     promote it",
                    matched.unwrap_or(0)
                )));
            }
        }
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(map_write_error)?;
        Ok(())
    }

    /// Removes node `id` from the cluster (voter or learner). Leader only, and not the leader
    /// itself (transfer leadership first). Refuses to remove the last voter. Idempotent: a node
    /// that is not a member is already removed.
    pub async fn remove_member(&self, id: u64) -> Result<(), ConsensusError> {
        self.check_leader_lease()?;
        let leading = self.raft.metrics().borrow().state == ServerState::Leader;
        if !leading {
            return Err(ConsensusError::NotLeader {
                leader: self.leader(),
            });
        }
        if id == self.config.node_id {
            return Err(ConsensusError::Invalid(
                "a leader does not remove itself; transfer leadership first".into(),
            ));
        }
        let (member, voters) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            let membership = m.membership_config.membership();
            (
                membership.get_node(&id).is_some(),
                membership.voter_ids().collect::<BTreeSet<u64>>(),
            )
        };
        if !member {
            return Ok(());
        }
        if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(ConsensusError::Invalid(format!(
                    "node {id} is the last voter"
                )));
            }
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(map_write_error)?;
        }
        self.raft
            .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
            .await
            .map_err(map_write_error)?;
        Ok(())
    }

    /// Builds a snapshot of everything applied now and waits (up to `timeout`) until it is
    /// stored; returns the index it covers.
    pub async fn snapshot_now(&self, timeout: Duration) -> Result<u64, ConsensusError> {
        let applied = self.state().revision();
        let mut metrics = self.raft.metrics();
        self.trigger_snapshot().await?;
        let built = async {
            loop {
                let at = metrics
                    .borrow_and_update()
                    .snapshot
                    .map(|l| l.index)
                    .unwrap_or(0);
                if at >= applied {
                    return Ok(at);
                }
                if metrics.changed().await.is_err() {
                    return Err(ConsensusError::Unavailable("raft stopped".into()));
                }
            }
        };
        tokio::time::timeout(timeout, built).await.map_err(|_| {
            ConsensusError::Unavailable(format!(
                "no snapshot covering index {applied} within {} ms",
                timeout.as_millis()
            ))
        })?
    }

    /// A consistent copy of the registry as of a linearizable read (leader only): the file
    /// `signpost backup` writes and `signpost restore` reads (see [`crate::backup`]).
    pub async fn backup(&self) -> Result<crate::backup::Backup, ConsensusError> {
        self.read_barrier().await?;
        let (pairs, last_applied) = {
            let state = self.state();
            (state.registry.export(), state.last_applied)
        };
        let Some(last) = last_applied else {
            return Err(ConsensusError::Unavailable(
                "nothing applied yet: no backup of an empty cluster".into(),
            ));
        };
        crate::backup::Backup::new(last.index, last.leader_id.term, pairs)
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

fn member_addr(raft: &Raft<TypeConfig>, id: u64) -> Option<NodeAddr> {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&id)
        .cloned()
}

pub(crate) fn map_write_error(
    e: RaftError<u64, ClientWriteError<u64, NodeAddr>>,
) -> ConsensusError {
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
