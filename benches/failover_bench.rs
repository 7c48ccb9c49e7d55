//! Failover benchmark: how long writes stop when the leader dies (kill -9) or is stopped for a
//! rolling restart (SIGTERM), as a client sees it. A writer registers back to back through the
//! Rust client (its own retries, the default Raft timing); the outage of a fault is the longest
//! gap between two acknowledged writes around it.
//!
//! `cargo bench --bench failover_bench` after `cargo build --release --workspace --all-targets`;
//! `SIGNPOST_BENCH_RUNS` (default 5) sets the faults per kind. Every fault is undone (the node
//! restarts and catches up) before the next.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use signpost_tests::{now_ms, signed_record, ClusterOptions, TestCluster};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[u128], p: f64) -> u128 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The longest gap between consecutive acknowledgements in `[from, to]`, counting from the
/// last acknowledgement before `from`.
fn longest_gap(acks: &[Instant], from: Instant, to: Instant) -> Duration {
    let start = acks.iter().rposition(|a| *a <= from).unwrap_or(0);
    acks[start..]
        .windows(2)
        .take_while(|w| w[0] <= to)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(Duration::MAX)
}

async fn agreed_leader(cluster: &TestCluster) -> u64 {
    for _ in 0..200 {
        if let Some(l) = cluster.agreed_leader().await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no agreed leader within 10 s");
}

fn main() {
    let runs = env_or("SIGNPOST_BENCH_RUNS", 5).clamp(1, 50);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mut cluster = TestCluster::start(ClusterOptions {
        limits_toml: "writes_per_identity_per_sec = 10000\nwrites_per_identity_burst = 10000\n"
            .into(),
        ..Default::default()
    });
    runtime.block_on(cluster.wait_ready(Duration::from_secs(60)));
    let key = signpost_record::read_signing_key(&cluster.bind_new_key("probe")).unwrap();
    let client = cluster
        .client_as(&cluster.issue("service", "probe"), &[])
        .with_deadline(Duration::from_secs(30));

    let acks = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = runtime.spawn({
        let (acks, stop) = (acks.clone(), stop.clone());
        async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let record = signed_record(&key, "probe", &format!("p{}", n % 64), now_ms(), 9000);
                if client.register(record).await.is_ok() {
                    acks.lock().unwrap().push(Instant::now());
                }
            }
        }
    });

    let mut table = Vec::new();
    for kind in ["kill -9", "SIGTERM"] {
        let mut outages = Vec::new();
        let mut term_steps = Vec::new();
        for run in 0..runs {
            let leader = runtime.block_on(agreed_leader(&cluster));
            let term_before = runtime.block_on(cluster.status_of(leader)).unwrap().term;
            std::thread::sleep(Duration::from_secs(1));
            let fault = Instant::now();
            if kind == "kill -9" {
                cluster.kill9(leader);
            } else {
                cluster.terminate(leader);
                let _ = cluster.wait_exit(leader, Duration::from_secs(10));
            }
            std::thread::sleep(Duration::from_secs(3));
            let outage = longest_gap(&acks.lock().unwrap(), fault, Instant::now()).as_millis();
            let new_leader = runtime.block_on(agreed_leader(&cluster));
            let term_after = runtime
                .block_on(cluster.status_of(new_leader))
                .map(|s| s.term)
                .unwrap_or(0);
            eprintln!(
                "{kind} run {run}: write outage {outage} ms, leader {leader} -> {new_leader}, term {term_before} -> {term_after}"
            );
            outages.push(outage);
            term_steps.push(term_after.saturating_sub(term_before));
            cluster.restart(leader);
            runtime.block_on(cluster.wait_ready(Duration::from_secs(60)));
        }
        outages.sort_unstable();
        table.push(format!(
            "| {kind} | {runs} | {} | {} | {} | {} |",
            outages[0],
            percentile(&outages, 0.5),
            outages[outages.len() - 1],
            term_steps.iter().max().copied().unwrap_or(0),
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = runtime.block_on(writer);
    println!("| fault | runs | min ms | median ms | max ms | max term steps |");
    println!("|---|---:|---:|---:|---:|---:|");
    for row in table {
        println!("{row}");
    }
}
