//! Failover benchmark: how long writes stop when the leader dies (kill -9) or is stopped
//! (SIGTERM), measured as a client sees it: from the signal to the first acknowledged write
//! after it, with the Rust client's own retries and the default Raft timing.
//!
//! `cargo bench --bench failover_bench` after `cargo build --release --workspace --all-targets`;
//! `SIGNPOST_BENCH_RUNS` (default 5) sets the faults per kind. Every fault is undone (the node
//! restarts and catches up) before the next.

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
    let mut n = 0u64;
    let mut write = |client: &signpost_client::Client| {
        n += 1;
        let record = signed_record(&key, "probe", &format!("p{}", n % 64), now_ms(), 9000);
        runtime.block_on(client.register(record))
    };
    write(&client).expect("first write");

    let mut table = Vec::new();
    for kind in ["kill -9", "SIGTERM"] {
        let mut outages = Vec::new();
        let mut term_steps = Vec::new();
        for run in 0..runs {
            let leader = runtime
                .block_on(cluster.agreed_leader())
                .expect("a leader before the fault");
            let term_before = runtime.block_on(cluster.status_of(leader)).unwrap().term;
            write(&client).expect("write before the fault");
            let started = Instant::now();
            if kind == "kill -9" {
                cluster.kill9(leader);
            } else {
                cluster.terminate(leader);
            }
            write(&client).expect("write after the fault");
            let outage = started.elapsed().as_millis();
            let new_leader = runtime.block_on(cluster.agreed_leader()).unwrap_or(0);
            let term_after = runtime
                .block_on(cluster.status_of(new_leader))
                .map(|s| s.term)
                .unwrap_or(0);
            eprintln!(
                "{kind} run {run}: write outage {outage} ms, term {term_before} -> {term_after}"
            );
            outages.push(outage);
            term_steps.push(term_after.saturating_sub(term_before));
            if cluster.pid(leader).is_some() {
                let _ = cluster.wait_exit(leader, Duration::from_secs(10));
            }
            cluster.restart(leader);
            runtime.block_on(cluster.wait_ready(Duration::from_secs(60)));
            std::thread::sleep(Duration::from_secs(1));
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
    println!("| fault | runs | min ms | median ms | max ms | max term steps |");
    println!("|---|---:|---:|---:|---:|---:|");
    for row in table {
        println!("{row}");
    }
}
