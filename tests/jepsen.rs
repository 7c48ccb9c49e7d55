//! A seeded fault harness in the Jepsen way: concurrent clients record a history (invoke time,
//! completion time, result; a timeout is "unknown") of writes and linearizable reads on a few
//! keys, while a nemesis kills -9, pauses and partitions nodes at random. Then a checker
//! verifies that:
//!
//! - reads are linearizable per key (a register: Wing & Gong's search, with unknown writes
//!   free to take effect at any time after their invocation, or never);
//! - every acknowledged write is present (as that value or one written after it) and no read
//!   returns a value nobody wrote;
//! - a watch stream has no gap, duplicate or reordering: (revision, position within the
//!   revision) strictly increases and every acknowledged write shows up as a put, even two
//!   writes of one key that a leader batched into one entry;
//! - all nodes converge to the same state.
//!
//! `SIGNPOST_JEPSEN_SEED` replays a run; `SIGNPOST_JEPSEN_SECS` (default 20) lengthens it. Every
//! run prints its seed, and a failure prints the history that broke.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use signpost_client::Client;
use signpost_tests::{ClusterOptions, TestCluster};

const READY: Duration = Duration::from_secs(60);
const SERVICE: &str = "jepsen";
const KEYS: usize = 4;
const CLIENTS: u8 = 3;
/// Operations per client, whatever the duration.
const OPS_PER_CLIENT_MAX: usize = 5_000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// Write this value (the instance's port, unique per write).
    Write(u64),
    /// Read: the value seen, or None if the key was absent.
    Read(Option<u64>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// Refused: it did not take effect.
    Fail,
    /// Timed out or unavailable: it may or may not have taken effect.
    Unknown,
}

#[derive(Debug, Clone)]
struct Op {
    process: u8,
    key: usize,
    kind: Kind,
    invoked: Duration,
    /// None for an unknown outcome: it may take effect at any time after `invoked`.
    completed: Option<Duration>,
    outcome: Outcome,
}

type History = Arc<Mutex<Vec<Op>>>;
/// A change the watcher delivered: (revision, position), put (or delete), instance, value of a
/// put.
type WatchedEvent = ((u64, u32), bool, String, Option<u64>);
type Watched = Arc<Mutex<Vec<WatchedEvent>>>;

/// One client process of the history.
struct Process {
    id: u8,
    /// For writes: any node, following the leader.
    client: Client,
    /// For reads: one client per node, each starting at that node.
    readers: Vec<Client>,
    key: signpost_record::SigningKey,
    seed: u64,
    /// The next value to write (values are unique and double as sequences).
    values: Arc<AtomicU64>,
    start: Instant,
    stop: Arc<AtomicBool>,
    history: History,
}

fn instance(key: usize) -> String {
    format!("k{key}")
}

impl Process {
    async fn run(self) {
        let Process {
            id: process,
            client,
            readers,
            key,
            seed,
            values,
            start,
            stop,
            history,
        } = self;
        let mut rng = StdRng::seed_from_u64(seed ^ u64::from(process));
        for _ in 0..OPS_PER_CLIENT_MAX {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let k = rng.gen_range(0..KEYS);
            let invoked = start.elapsed();
            let op = if rng.gen_bool(0.5) {
                // Values double as sequences: unique, and increasing in invocation order.
                let value = values.fetch_add(1, Ordering::SeqCst);
                let mut payload =
                    signpost_tests::record_payload(SERVICE, &instance(k), value, value as u32);
                payload.ttl_secs = 86_400;
                let envelope = signpost_record::sign_record(&key, &payload);
                let result = client.register(envelope).await;
                // Even a refusal is not proof the write did not happen: the client retries, and an
                // earlier attempt may have been applied before a later one was refused as stale.
                let outcome = match &result {
                    Ok(_) => Outcome::Ok,
                    Err(_) => Outcome::Unknown,
                };
                Op {
                    process,
                    key: k,
                    kind: Kind::Write(value),
                    invoked,
                    completed: (outcome != Outcome::Unknown).then(|| start.elapsed()),
                    outcome,
                }
            } else {
                // Each read starts at a random node, so a node that answered from a stale state
                // would be caught.
                let reader = &readers[rng.gen_range(0..readers.len())];
                match reader.resolve(SERVICE, false).await {
                    Ok(resolved) => {
                        let seen = resolved
                            .instances
                            .iter()
                            .find(|i| i.payload.instance == instance(k))
                            .and_then(|i| i.payload.endpoints.first())
                            .map(|e| u64::from(e.port));
                        Op {
                            process,
                            key: k,
                            kind: Kind::Read(seen),
                            invoked,
                            completed: Some(start.elapsed()),
                            outcome: Outcome::Ok,
                        }
                    }
                    // A failed read has no effect: nothing to check.
                    Err(_) => continue,
                }
            };
            history.lock().unwrap().push(op);
            tokio::time::sleep(Duration::from_millis(rng.gen_range(5..40))).await;
        }
    }
}

/// Whether the operations on one key can be ordered, each at one instant between its
/// invocation and completion, so that every read returns the last write before it (a
/// register starting empty). Unknown writes may also be left out. Wing & Gong's search with
/// memoization of (operations done, register value).
fn linearizable(ops: &[Op]) -> bool {
    // An unknown write nobody read can always be left out, and leaving it out never makes
    // another read harder to explain: dropping it keeps the search small.
    let read: HashSet<u64> = ops
        .iter()
        .filter_map(|o| match o.kind {
            Kind::Read(Some(v)) => Some(v),
            _ => None,
        })
        .collect();
    let ops: Vec<&Op> = ops
        .iter()
        .filter(|o| o.outcome != Outcome::Fail)
        .filter(|o| match o.kind {
            Kind::Write(v) => o.outcome == Outcome::Ok || read.contains(&v),
            Kind::Read(_) => true,
        })
        .collect();
    let n = ops.len();
    let must: Vec<bool> = ops.iter().map(|o| o.outcome == Outcome::Ok).collect();
    let mut seen: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let words = n.div_ceil(64);
    // Depth-first over states; each step linearizes one pending operation whose invocation
    // precedes every unlinearized operation's completion.
    let mut stack: Vec<(Vec<u64>, Option<u64>)> = vec![(vec![0; words], None)];
    let done = |set: &Vec<u64>, i: usize| set[i / 64] & (1 << (i % 64)) != 0;
    while let Some((set, value)) = stack.pop() {
        if (0..n).all(|i| done(&set, i) || !must[i]) {
            return true;
        }
        if !seen.insert((set.clone(), value)) {
            continue;
        }
        // The earliest completion among operations not yet linearized bounds what may go next.
        let horizon = (0..n)
            .filter(|i| !done(&set, *i))
            .filter_map(|i| ops[i].completed)
            .min()
            .unwrap_or(Duration::MAX);
        for i in 0..n {
            if done(&set, i) || ops[i].invoked > horizon {
                continue;
            }
            let next = match ops[i].kind {
                Kind::Write(v) => Some(v),
                Kind::Read(r) if r == value => value,
                Kind::Read(_) => continue,
            };
            let mut set = set.clone();
            set[i / 64] |= 1 << (i % 64);
            stack.push((set, next));
        }
    }
    false
}

fn print_history(ops: &[Op]) -> String {
    let mut ops = ops.to_vec();
    ops.sort_by_key(|o| o.invoked);
    ops.iter()
        .map(|o| {
            format!(
                "  p{} {:>8.3}s..{:<10} {:?} {:?}",
                o.process,
                o.invoked.as_secs_f64(),
                o.completed
                    .map(|c| format!("{:.3}s", c.as_secs_f64()))
                    .unwrap_or_else(|| "?".into()),
                o.kind,
                o.outcome
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_pauses_and_partitions_keep_reads_linearizable_and_writes_durable() {
    let seed: u64 = std::env::var("SIGNPOST_JEPSEN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let secs: u64 = std::env::var("SIGNPOST_JEPSEN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    eprintln!("jepsen: seed {seed} (replay with SIGNPOST_JEPSEN_SEED={seed}), {secs} s");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut cluster = TestCluster::start(ClusterOptions::default());
    cluster.wait_ready(READY).await;
    let key = signpost_record::read_signing_key(&cluster.bind_new_key(SERVICE)).unwrap();
    let cert = cluster.issue("service", SERVICE);

    eprintln!("phase 1: clients and a watcher run while the nemesis strikes");
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let history: History = Arc::new(Mutex::new(Vec::new()));
    let values = Arc::new(AtomicU64::new(1));
    let mut processes = Vec::new();
    for p in 1..=CLIENTS {
        let client = cluster.client_from(
            cluster.client_ip(p),
            Some(&cert),
            &[],
            Duration::from_secs(3),
        );
        let readers = cluster
            .ids()
            .iter()
            .map(|id| {
                let mut order = vec![*id];
                order.extend(cluster.others(*id));
                cluster.client_from(
                    cluster.client_ip(p),
                    Some(&cert),
                    &order,
                    Duration::from_secs(3),
                )
            })
            .collect();
        let process = Process {
            id: p,
            client,
            readers,
            key: key.clone(),
            seed,
            values: values.clone(),
            start,
            stop: stop.clone(),
            history: history.clone(),
        };
        processes.push(tokio::spawn(process.run()));
    }
    let watch_client = cluster.client_from(
        cluster.client_ip(50),
        Some(&cert),
        &[],
        Duration::from_secs(3),
    );
    let watched: Watched = Arc::default();
    let watch_errors: Arc<Mutex<Vec<(Duration, String)>>> = Arc::default();
    // The watcher stops after the clients, once it has caught up with their last writes.
    let stop_watch = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (watched, errors, stop) = (watched.clone(), watch_errors.clone(), stop_watch.clone());
        tokio::spawn(async move {
            let mut w = watch_client.watch(SERVICE, false, 1);
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(500), w.next()).await {
                    Ok(Ok(change)) => {
                        let port = change
                            .record
                            .as_ref()
                            .and_then(|e| signpost_record::open_record(e).ok())
                            .and_then(|r| r.payload.endpoints.first().map(|e| u64::from(e.port)));
                        watched.lock().unwrap().push((
                            (change.revision, change.position),
                            change.put,
                            change.instance,
                            port,
                        ));
                    }
                    Ok(Err(e)) => {
                        errors
                            .lock()
                            .unwrap()
                            .push((start.elapsed(), e.to_string()));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(_) => {}
                }
            }
        })
    };

    let ids = cluster.ids();
    let mut faults = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..1500))).await;
        let victim = ids[rng.gen_range(0..ids.len())];
        let hold = Duration::from_millis(rng.gen_range(500..2500));
        match rng.gen_range(0..4) {
            0 => {
                faults.push(format!("kill -9 node {victim} for {hold:?}"));
                cluster.kill9(victim);
                tokio::time::sleep(hold).await;
                cluster.restart(victim);
            }
            1 => {
                faults.push(format!("pause node {victim} for {hold:?}"));
                cluster.pause(victim);
                tokio::time::sleep(hold).await;
                cluster.resume(victim);
            }
            2 => {
                faults.push(format!(
                    "partition node {victim} from the others for {hold:?}"
                ));
                cluster.partition(&[victim], &cluster.others(victim));
                tokio::time::sleep(hold).await;
                cluster.heal();
            }
            _ => {
                faults.push(format!("no fault for {hold:?}"));
                tokio::time::sleep(hold).await;
            }
        }
    }
    eprintln!("  faults: {}", faults.join("; "));
    // Let the clients run a little on a healed cluster, then stop everything.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for p in processes {
        p.await.unwrap();
    }
    let history = history.lock().unwrap().clone();
    let acked_values: BTreeSet<u64> = history
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .filter_map(|o| match o.kind {
            Kind::Write(v) => Some(v),
            _ => None,
        })
        .collect();
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(10) {
        let seen: BTreeSet<u64> = watched
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, put, _, v)| if *put { *v } else { None })
            .collect();
        if acked_values.is_subset(&seen) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_watch.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let oks = history.iter().filter(|o| o.outcome == Outcome::Ok).count();
    let unknown = history
        .iter()
        .filter(|o| o.outcome == Outcome::Unknown)
        .count();
    eprintln!(
        "  {} operations: {oks} ok, {unknown} unknown, {} failed",
        history.len(),
        history
            .iter()
            .filter(|o| o.outcome == Outcome::Fail)
            .count()
    );
    assert!(
        oks > 50,
        "seed {seed}: too little progress to check anything ({oks} ok)"
    );

    eprintln!("phase 2: reads are linearizable per key");
    for k in 0..KEYS {
        let ops: Vec<Op> = history.iter().filter(|o| o.key == k).cloned().collect();
        assert!(
            linearizable(&ops),
            "seed {seed}: key {k} is not linearizable:\n{}",
            print_history(&ops)
        );
    }

    eprintln!("phase 3: no read returns a value nobody wrote");
    let written: BTreeMap<u64, usize> = history
        .iter()
        .filter_map(|o| match o.kind {
            Kind::Write(v) => Some((v, o.key)),
            _ => None,
        })
        .collect();
    for o in &history {
        if let Kind::Read(Some(v)) = o.kind {
            assert_eq!(
                written.get(&v),
                Some(&o.key),
                "seed {seed}: read {v} of key {} was never written to it",
                o.key
            );
        }
    }

    eprintln!("phase 4: every node converges to the same state, holding every acknowledged write");
    let final_values = |resolved: &signpost_client::Resolved| -> BTreeMap<String, u64> {
        resolved
            .instances
            .iter()
            .map(|i| {
                (
                    i.payload.instance.clone(),
                    i.payload.endpoints.first().map_or(0, |e| u64::from(e.port)),
                )
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let converged = loop {
        let mut states = Vec::new();
        for id in cluster.ids() {
            let state = cluster
                .client(&[id])
                .resolve_on(&cluster.client_addr(id), SERVICE)
                .await
                .map(|r| final_values(&r))
                .map_err(|e| e.to_string());
            states.push(state);
        }
        if let [Ok(first), rest @ ..] = states.as_slice() {
            if rest.iter().all(|s| s.as_ref() == Ok(first)) {
                break first.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: nodes did not converge: {states:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for k in 0..KEYS {
        // The last acknowledged write of a key, or anything written after it, must be there.
        let last_acked = history
            .iter()
            .filter(|o| o.key == k && o.outcome == Outcome::Ok)
            .filter_map(|o| match o.kind {
                Kind::Write(v) => Some(v),
                _ => None,
            })
            .max();
        if let Some(v) = last_acked {
            let now = converged.get(&instance(k)).copied();
            assert!(
                now.is_some_and(|n| n >= v),
                "seed {seed}: key {k} holds {now:?}, but write {v} was acknowledged"
            );
        }
    }

    eprintln!("phase 5: the watch stream has no gap, duplicate or reordering");
    let watched = watched.lock().unwrap().clone();
    for pair in watched.windows(2) {
        // One batched entry can change a key twice, so events are ordered by position within
        // their revision as well.
        assert!(
            pair[0].0 < pair[1].0,
            "seed {seed}: watch went from {:?} to {:?}",
            pair[0],
            pair[1]
        );
    }
    let put_values: BTreeSet<u64> = watched
        .iter()
        .filter(|(_, put, _, _)| *put)
        .filter_map(|(_, _, _, v)| *v)
        .collect();
    // A watcher told to resync (its position compacted away on the node it resumed on) may
    // have a gap after that point by design; before it, it may not.
    let continuous_until = watch_errors
        .lock()
        .unwrap()
        .iter()
        .find(|(_, e)| e.contains("compacted"))
        .map_or(Duration::MAX, |(at, _)| *at);
    let acked_writes: Vec<u64> = history
        .iter()
        .filter(|o| o.outcome == Outcome::Ok && o.completed.is_some_and(|c| c < continuous_until))
        .filter_map(|o| match o.kind {
            Kind::Write(v) => Some(v),
            _ => None,
        })
        .collect();
    let missed: Vec<&u64> = acked_writes
        .iter()
        .filter(|v| !put_values.contains(v))
        .collect();
    assert!(
        missed.is_empty(),
        "seed {seed}: the watch missed acknowledged writes {missed:?} (watch errors: {:?})",
        watch_errors.lock().unwrap()
    );
    eprintln!(
        "  checked {} operations, {} watch events ({} acknowledged writes seen by the watch); seed {seed}",
        history.len(),
        watched.len(),
        acked_writes.len()
    );
}

#[test]
fn the_checker_finds_a_stale_read_and_accepts_an_unknown_write_either_way() {
    let op = |kind, invoked: u64, completed: Option<u64>, outcome| Op {
        process: 1,
        key: 0,
        kind,
        invoked: Duration::from_millis(invoked),
        completed: completed.map(Duration::from_millis),
        outcome,
    };
    // write 1, then (after it completed) a read of nothing: stale.
    let stale = [
        op(Kind::Write(1), 0, Some(10), Outcome::Ok),
        op(Kind::Read(None), 20, Some(30), Outcome::Ok),
    ];
    assert!(!linearizable(&stale));
    // Overlapping: the read may come first.
    let overlapping = [
        op(Kind::Write(1), 0, Some(30), Outcome::Ok),
        op(Kind::Read(None), 10, Some(20), Outcome::Ok),
    ];
    assert!(linearizable(&overlapping));
    // An unknown write may have happened...
    let happened = [
        op(Kind::Write(1), 0, None, Outcome::Unknown),
        op(Kind::Read(Some(1)), 50, Some(60), Outcome::Ok),
    ];
    assert!(linearizable(&happened));
    // ...or not.
    let not = [
        op(Kind::Write(1), 0, None, Outcome::Unknown),
        op(Kind::Read(None), 50, Some(60), Outcome::Ok),
    ];
    assert!(linearizable(&not));
    // A refused write never happened.
    let refused = [
        op(Kind::Write(1), 0, Some(10), Outcome::Fail),
        op(Kind::Read(Some(1)), 50, Some(60), Outcome::Ok),
    ];
    assert!(!linearizable(&refused));
    // Values go back: 2 then 1 read after both writes completed in order 1, 2.
    let back = [
        op(Kind::Write(1), 0, Some(10), Outcome::Ok),
        op(Kind::Write(2), 20, Some(30), Outcome::Ok),
        op(Kind::Read(Some(2)), 40, Some(50), Outcome::Ok),
        op(Kind::Read(Some(1)), 60, Some(70), Outcome::Ok),
    ];
    assert!(!linearizable(&back));
}
