//! An in-process simulation of consensus and apply, the way raft-rs and openraft test
//! themselves: three openraft instances over the real log store and state machine (RocksDB in
//! temporary directories, the registry's real apply), connected by an in-memory router that
//! drops, delays, cuts and isolates messages, with nodes crashed and restarted, all driven by
//! a seed. Time is tokio's paused clock, so a seed runs as fast as the machine allows.
//!
//! Each seed checks: no two nodes (and no node at two moments) applied different entries at
//! one log index (openraft's default mode allows two leaders in one term, as (term, node)
//! leader ids, so that, not one leader per term, is the safety property); every acknowledged registration is in the
//! final state; all nodes converge to the same state and applied index after the faults stop.
//!
//! `SIGNPOST_SIM_SEEDS` (default 500) sets how many seeds run; `SIGNPOST_SIM_SEED` replays
//! one. The fault schedule is a function of the seed; tokio's task interleaving is not, so a
//! replay repeats the faults but not every message timing.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, Raft, ServerState, Snapshot, Vote};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use signpost_consensus::{LogStore, NodeAddr, StateMachine, TypeConfig};
use signpost_proto::v1::{BindingPayload, Endpoint, RecordPayload};
use signpost_state::{Command, Outcome, Quotas, Request};
use signpost_storage::Store;

const NODES: u64 = 3;
const WRITES: usize = 20;

/// The in-memory network: who is running, which links are cut, and the dice.
struct Router {
    nodes: Mutex<BTreeMap<u64, Raft<TypeConfig>>>,
    cut: Mutex<BTreeSet<(u64, u64)>>,
    rng: Mutex<StdRng>,
    drop_percent: u32,
}

#[derive(Debug)]
struct Down(String);

impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Down {}

impl Router {
    /// The target's handle if a message from `from` gets through (after a random delay).
    async fn deliver(&self, from: u64, to: u64) -> Result<Raft<TypeConfig>, Down> {
        let (drop, delay) = {
            let mut rng = self.rng.lock().unwrap();
            (
                rng.gen_range(0..100) < self.drop_percent,
                Duration::from_millis(rng.gen_range(0..8)),
            )
        };
        tokio::time::sleep(delay).await;
        if drop || self.cut.lock().unwrap().contains(&(from, to)) {
            return Err(Down(format!("{from} -> {to} lost")));
        }
        self.nodes
            .lock()
            .unwrap()
            .get(&to)
            .cloned()
            .ok_or_else(|| Down(format!("node {to} is down")))
    }
}

struct SimNetwork {
    from: u64,
    router: Arc<Router>,
}

struct SimConnection {
    from: u64,
    to: u64,
    router: Arc<Router>,
}

impl RaftNetworkFactory<TypeConfig> for SimNetwork {
    type Network = SimConnection;

    async fn new_client(&mut self, target: u64, _node: &NodeAddr) -> SimConnection {
        SimConnection {
            from: self.from,
            to: target,
            router: self.router.clone(),
        }
    }
}

impl RaftNetwork<TypeConfig> for SimConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64>>> {
        let target = self
            .router
            .deliver(self.from, self.to)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        target
            .append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, NodeAddr, RaftError<u64>>> {
        let target = self
            .router
            .deliver(self.from, self.to)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        target
            .vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, NodeAddr, RaftError<u64, InstallSnapshotError>>,
    > {
        Err(RPCError::Network(NetworkError::new(&Down(
            "chunked snapshots are not used".into(),
        ))))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        let target = self
            .router
            .deliver(self.from, self.to)
            .await
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
        target
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))
    }
}

fn members() -> BTreeMap<u64, NodeAddr> {
    (1..=NODES)
        .map(|id| {
            (
                id,
                NodeAddr {
                    raft_addr: format!("sim:{id}"),
                    client_addr: format!("sim:{id}"),
                },
            )
        })
        .collect()
}

/// Opens node `id`'s store in `dir` and starts it on the router. A restarted node may find
/// RocksDB's lock still held for a moment by its previous incarnation's last tasks.
async fn start(id: u64, dir: &Path, router: &Arc<Router>) -> Raft<TypeConfig> {
    let mut tries = 0;
    let store = loop {
        match Store::open(dir) {
            Ok(store) => break Arc::new(store),
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("opening node {id}'s store: {e}"),
        }
    };
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        max_payload_entries: 16,
        // Small, so snapshots are built and sent to lagging nodes during a seed.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(8),
        max_in_snapshot_log_to_keep: 2,
        ..Default::default()
    }
    .validate()
    .expect("config");
    let raft = Raft::new(
        id,
        Arc::new(config),
        SimNetwork {
            from: id,
            router: router.clone(),
        },
        LogStore::new(store.clone()),
        StateMachine::open(store).expect("state machine"),
    )
    .await
    .expect("raft");
    router.nodes.lock().unwrap().insert(id, raft.clone());
    raft
}

fn signed_binding(
    admin: &signpost_record::SigningKey,
    key: &signpost_record::SigningKey,
) -> Vec<u8> {
    let envelope = signpost_record::sign_binding(
        admin,
        &BindingPayload {
            service: "sim".into(),
            public_keys: vec![key.verifying_key().to_bytes().to_vec()],
            version: 1,
            issued_at_ms: signpost_consensus::wall_clock_ms(),
            not_before_ms: 0,
            not_after_ms: 0,
        },
    );
    prost::Message::encode_to_vec(&envelope)
}

fn signed_record(key: &signpost_record::SigningKey, instance: &str, sequence: u64) -> Vec<u8> {
    let envelope = signpost_record::sign_record(
        key,
        &RecordPayload {
            service: "sim".into(),
            instance: instance.into(),
            endpoints: vec![Endpoint {
                host: "10.0.0.1".into(),
                port: 1000 + sequence as u32,
                protocol: "grpc".into(),
            }],
            metadata: Default::default(),
            tls_identity: "spiffe://sim/service/sim".into(),
            sequence,
            issued_at_ms: signpost_consensus::wall_clock_ms(),
            ttl_secs: 86_400,
        },
    );
    prost::Message::encode_to_vec(&envelope)
}

/// Proposes `command` to whichever node leads, for up to 50 tries; the outcome if it
/// committed, None if it may or may not have.
async fn propose(router: &Arc<Router>, command: Command) -> Option<Outcome> {
    for _ in 0..50 {
        let nodes: Vec<Raft<TypeConfig>> = router.nodes.lock().unwrap().values().cloned().collect();
        for raft in nodes {
            if raft.metrics().borrow().state != ServerState::Leader {
                continue;
            }
            let request = Request {
                time_ms: signpost_consensus::wall_clock_ms(),
                caller: "spiffe://sim/admin/sim".into(),
                command: command.clone(),
            };
            let result =
                tokio::time::timeout(Duration::from_secs(2), raft.client_write(request)).await;
            if let Ok(Ok(response)) = result {
                return response.data.into_iter().next();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// One seed: returns a description of what broke, if anything.
async fn run_seed(seed: u64, root: &Path) -> Result<(usize, usize), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let router = Arc::new(Router {
        nodes: Mutex::new(BTreeMap::new()),
        cut: Mutex::new(BTreeSet::new()),
        rng: Mutex::new(StdRng::seed_from_u64(seed.wrapping_mul(31))),
        drop_percent: rng.gen_range(0..10),
    });
    let dirs: BTreeMap<u64, PathBuf> = (1..=NODES)
        .map(|id| (id, root.join(format!("s{seed}-n{id}"))))
        .collect();
    for (id, dir) in &dirs {
        start(*id, dir, &router).await;
    }
    let first = router.nodes.lock().unwrap()[&1].clone();
    first
        .initialize(members())
        .await
        .map_err(|e| e.to_string())?;

    // Safety sampling (state machine safety): the log id each node applied at each index.
    // openraft's default mode allows two leaders in one term (a leader id is (term, node)),
    // so the property to check is that no two nodes, and no node at two moments, applied
    // different entries at one index.
    let applied: Arc<Mutex<BTreeMap<u64, openraft::LogId<u64>>>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let sampling = {
        let (router, applied, violations) = (router.clone(), applied.clone(), violations.clone());
        tokio::spawn(async move {
            loop {
                let nodes: Vec<(u64, Raft<TypeConfig>)> = router
                    .nodes
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(id, r)| (*id, r.clone()))
                    .collect();
                for (id, raft) in nodes {
                    let Some(last) = raft.metrics().borrow().last_applied else {
                        continue;
                    };
                    let mut applied = applied.lock().unwrap();
                    let seen = applied.entry(last.index).or_insert(last);
                    if *seen != last {
                        violations.lock().unwrap().push(format!(
                            "node {id} applied {last} at index {}, another node applied {seen}",
                            last.index
                        ));
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let admin = signpost_record::generate_signing_key();
    let key = signpost_record::generate_signing_key();
    let setup = [
        Command::Genesis {
            admin_keys: vec![admin.verifying_key().to_bytes()],
            admin_threshold: 1,
            quotas: Quotas::default(),
        },
        Command::Bind {
            envelope: signed_binding(&admin, &key),
        },
    ];
    for command in setup {
        match propose(&router, command).await {
            Some(Outcome::Applied { .. }) => {}
            other => return Err(format!("setup did not apply: {other:?}")),
        }
    }

    let mut acknowledged = BTreeSet::new();
    let mut faults = 0;
    for i in 0..WRITES {
        // A fault before about every third write, undone a little later.
        if rng.gen_range(0..3) == 0 {
            faults += 1;
            let victim = rng.gen_range(1..=NODES);
            match rng.gen_range(0..3) {
                0 => {
                    // Crash and restart.
                    let raft = router.nodes.lock().unwrap().remove(&victim);
                    if let Some(raft) = raft {
                        raft.shutdown().await.map_err(|e| e.to_string())?;
                        drop(raft);
                        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..400))).await;
                        start(victim, &dirs[&victim], &router).await;
                    }
                }
                1 => {
                    // Isolate one node both ways.
                    let mut cut = router.cut.lock().unwrap();
                    for other in (1..=NODES).filter(|n| *n != victim) {
                        cut.insert((victim, other));
                        cut.insert((other, victim));
                    }
                }
                _ => {
                    // Heal everything.
                    router.cut.lock().unwrap().clear();
                }
            }
        }
        let instance = format!("i{}", i % 5);
        let sequence = i as u64 + 1;
        let register = Command::Register {
            envelope: signed_record(&key, &instance, sequence),
        };
        // Every fourth write shares its entry with another, as the leader's group commit
        // does: a batch must apply the same on every node, through crashes and snapshots.
        let command = if i % 4 == 3 {
            let request = |command| Request {
                time_ms: signpost_consensus::wall_clock_ms(),
                caller: "spiffe://sim/service/sim".into(),
                command,
            };
            Command::Batch {
                requests: vec![
                    request(register),
                    request(Command::Register {
                        envelope: signed_record(&key, &format!("b{}", i % 5), sequence),
                    }),
                ],
            }
        } else {
            register
        };
        let outcome = propose(&router, command).await;
        if let Some(Outcome::Applied { .. }) = outcome {
            acknowledged.insert((instance, sequence));
        }
    }

    // The faults stop: everything heals and every node gets to catch up.
    router.cut.lock().unwrap().clear();
    let converged = async {
        loop {
            let nodes: Vec<Raft<TypeConfig>> =
                router.nodes.lock().unwrap().values().cloned().collect();
            let applied: BTreeSet<Option<u64>> = nodes
                .iter()
                .map(|r| r.metrics().borrow().last_applied.map(|l| l.index))
                .collect();
            let last_log: BTreeSet<Option<u64>> = nodes
                .iter()
                .map(|r| r.metrics().borrow().last_log_index)
                .collect();
            if nodes.len() == NODES as usize && applied.len() == 1 && last_log.len() == 1 {
                let a = applied.into_iter().next().flatten();
                if a.is_some() && a == last_log.into_iter().next().flatten() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), converged)
        .await
        .is_err()
    {
        return Err("the nodes did not converge within 60 s of (virtual) time".into());
    }
    sampling.abort();

    // Same state everywhere, holding every acknowledged write (or a later one of its instance).
    let mut states = BTreeSet::new();
    let mut holding: BTreeMap<String, u64> = BTreeMap::new();
    let nodes: Vec<(u64, Raft<TypeConfig>)> = router
        .nodes
        .lock()
        .unwrap()
        .iter()
        .map(|(id, r)| (*id, r.clone()))
        .collect();
    for (id, raft) in &nodes {
        raft.shutdown().await.map_err(|e| e.to_string())?;
        let _ = id;
    }
    router.nodes.lock().unwrap().clear();
    drop(nodes);
    for dir in dirs.values() {
        // Reopen each store as a restarted node would and read its state.
        let mut tries = 0;
        let store = loop {
            match Store::open(dir) {
                Ok(s) => break Arc::new(s),
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(format!("reopening {}: {e}", dir.display())),
            }
        };
        let sm = StateMachine::open(store).map_err(|e| e.to_string())?;
        let shared = sm.read();
        states.insert(format!("{:?}", shared.registry.export()));
        for (service, instance, sequence, _) in shared.registry.instances() {
            if service == "sim" {
                holding.insert(instance.to_string(), sequence);
            }
        }
    }
    if states.len() != 1 {
        return Err(format!("{} different final states", states.len()));
    }
    for (instance, sequence) in &acknowledged {
        if holding.get(instance).is_none_or(|held| held < sequence) {
            return Err(format!(
                "acknowledged {instance} at sequence {sequence}, but the state holds {:?}",
                holding.get(instance)
            ));
        }
    }
    let violations = violations.lock().unwrap().clone();
    if !violations.is_empty() {
        return Err(format!(
            "different entries applied at one index: {violations:?}"
        ));
    }
    Ok((acknowledged.len(), faults))
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn seeded_faults_never_lose_an_acknowledged_write_or_apply_two_entries_at_one_index() {
    let seeds: Vec<u64> = match std::env::var("SIGNPOST_SIM_SEED") {
        Ok(one) => vec![one.parse().expect("SIGNPOST_SIM_SEED is a number")],
        Err(_) => {
            let count: u64 = std::env::var("SIGNPOST_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(500);
            let base: u64 = rand::random::<u32>().into();
            (base..base + count).collect()
        }
    };
    // Memory-backed when the machine has it: the simulation is about orderings, not disks,
    // and fsync on a real disk would make 500 seeds take minutes.
    let shm = Path::new("/dev/shm");
    let root = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let (mut writes, mut faults) = (0, 0);
    for seed in &seeds {
        match run_seed(*seed, root.path()).await {
            Ok((w, f)) => {
                writes += w;
                faults += f;
            }
            Err(what) => panic!("seed {seed}: {what} (replay: SIGNPOST_SIM_SEED={seed})"),
        }
        // Each seed's stores go; the next seed starts clean.
        for entry in std::fs::read_dir(root.path()).unwrap().flatten() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    eprintln!(
        "simulation: {} seeds from {}, {writes} acknowledged writes checked, {faults} faults",
        seeds.len(),
        seeds[0]
    );
}
