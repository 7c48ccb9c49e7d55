//! Flood benchmark: starts a local three-node cluster (real `signpost server` processes with
//! the default limits), then for each workload runs `signpost bench --flood KIND` for every
//! flood and prints the legitimate clients' throughput and p50/p99 latency without and with
//! the flood. The goal: at least 90% of the unflooded throughput and a p99 at most 3x.
//!
//! `cargo bench --bench flood_bench` after `cargo build --release --workspace --all-targets`;
//! `SIGNPOST_BENCH_SECS` (default 5) sets the seconds per phase, `SIGNPOST_BENCH_CLIENTS`
//! (default 8) the legitimate clients, `SIGNPOST_BENCH_WRITE_RATE` (default 15) and
//! `SIGNPOST_BENCH_READ_RATE` (default 50) each client's steady rate in operations per second
//! (0: as fast as the cluster answers). The legitimate
//! clients are paced because the question is whether honest services at their normal rate
//! keep being served; a closed-loop client that saturates the cluster by itself measures
//! only how capacity is shared.

use std::time::Duration;

use signpost_tests::{signpost_bin, ClusterOptions, TestCluster};

const FLOODS: [&str; 5] = ["write", "bad-signature", "read", "handshake", "watch"];
const WORKLOADS: [&str; 2] = ["register", "resolve"];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let secs = env_or("SIGNPOST_BENCH_SECS", 5).clamp(1, 60);
    let clients = env_or("SIGNPOST_BENCH_CLIENTS", 8).clamp(1, 64);
    let write_rate = env_or("SIGNPOST_BENCH_WRITE_RATE", 15).clamp(0, 10_000);
    let read_rate = env_or("SIGNPOST_BENCH_READ_RATE", 50).clamp(0, 10_000);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let cluster = TestCluster::start(ClusterOptions::default());
    runtime.block_on(cluster.wait_ready(Duration::from_secs(60)));
    eprintln!(
        "cluster ready in {}; {clients} clients at {write_rate} writes/s or {read_rate} reads/s each, {secs} s per phase",
        cluster.root().display()
    );

    let mut rows = Vec::new();
    for workload in WORKLOADS {
        // Within the default per-identity budgets (20 writes/s, 100 reads/s): honest services.
        let rate = if workload == "register" {
            write_rate
        } else {
            read_rate
        };
        for flood in FLOODS {
            // Lets per-address handshake budgets refill after the previous run.
            std::thread::sleep(Duration::from_secs(2));
            eprintln!("running {workload} under {flood} ...");
            let out = std::process::Command::new(signpost_bin())
                .args([
                    "bench",
                    "--workload",
                    workload,
                    "--clients",
                    &clients.to_string(),
                    "--rate",
                    &rate.to_string(),
                    "--duration",
                    &secs.to_string(),
                    "--flood",
                    flood,
                    "--json",
                ])
                .env("SIGNPOST_CONFIG", cluster.client_toml())
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .output()
                .expect("running signpost bench");
            let text = String::from_utf8_lossy(&out.stdout);
            match serde_json::from_str::<serde_json::Value>(text.trim()) {
                Ok(v) if out.status.success() => rows.push((workload, flood, v)),
                _ => eprintln!("signpost bench {workload} --flood {flood} failed: {text}"),
            }
        }
    }

    println!(
        "| workload | flood | unflooded ops/s | p50 ms | p99 ms | flooded ops/s | p50 ms | p99 ms | kept | p99 ratio | errors | flood sent / shed |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (workload, flood, v) in &rows {
        let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
        let p99_ratio = f("p99_ms") / f("unflooded_p99_ms").max(1e-9);
        println!(
            "| {workload} | {flood} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0}% | {:.2}x | {} | {} / {} |",
            f("unflooded_throughput_ops_s"),
            f("unflooded_p50_ms"),
            f("unflooded_p99_ms"),
            f("legit_throughput_ops_s"),
            f("p50_ms"),
            f("p99_ms"),
            100.0 * f("kept"),
            p99_ratio,
            v["errors"].as_u64().unwrap_or(0) + v["unflooded_errors"].as_u64().unwrap_or(0),
            v["flood"]["sent"].as_u64().unwrap_or(0),
            v["flood"]["shed"].as_u64().unwrap_or(0),
        );
    }
}
