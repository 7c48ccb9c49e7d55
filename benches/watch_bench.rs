//! Watch benchmark: 10,000 concurrent watchers on one node of a local three-node cluster.
//! Reports the node's memory per watcher and the delay from the start of a write to its
//! delivery on every watcher (p50, p99).
//!
//! `cargo bench --bench watch_bench` after `cargo build --release --workspace --all-targets`;
//! `SIGNPOST_BENCH_WATCHERS` (default 10000) and `SIGNPOST_BENCH_WRITES` (default 50).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use signpost_proto::v1::WatchRequest;
use signpost_tests::{raw_registry, signed_record, ClusterOptions, TestCluster};

/// Streams per connection: HTTP/2 caps concurrent streams per connection, so many watchers need
/// many connections (as many clients would have).
const STREAMS_PER_CONNECTION: usize = 200;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let watchers = env_or("SIGNPOST_BENCH_WATCHERS", 10_000).clamp(1, 20_000);
    let writes = env_or("SIGNPOST_BENCH_WRITES", 50).clamp(1, 1_000);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let cluster = TestCluster::start(ClusterOptions {
        limits_toml: "connections_per_ip_max = 1000\nstreams_per_connection_max = 1000\n\
                      stream_opens_per_identity_per_sec = 100000\nstream_opens_per_identity_burst = 100000\n\
                      watchers_per_identity_max = 20000\nstreams_max = 21000\n"
            .into(),
        extra_config: "[watch]\nwatchers_max = 20000\n".into(),
        ..Default::default()
    });
    runtime.block_on(async move {
        let leader = cluster.wait_ready(Duration::from_secs(60)).await;
        let key = signpost_record::read_signing_key(&cluster.bind_new_key("bench")).unwrap();
        let writer = cluster.client_as(&cluster.issue("service", "bench"), &[leader]);
        let reader = cluster.issue("reader", "bench");
        let rss_before = cluster.rss_bytes(leader).unwrap_or(0);

        eprintln!("opening {watchers} watchers on node {leader} ...");
        let starts: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; writes]));
        let delays: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::with_capacity(watchers * writes)));
        let opened = Instant::now();
        let mut tasks = Vec::new();
        let connections = watchers.div_ceil(STREAMS_PER_CONNECTION);
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(watchers);
        for c in 0..connections {
            let client = raw_registry(&cluster, &reader, leader);
            let n = STREAMS_PER_CONNECTION.min(watchers - c * STREAMS_PER_CONNECTION);
            for _ in 0..n {
                let mut client = client.clone();
                let starts = starts.clone();
                let delays = delays.clone();
                let ready = ready_tx.clone();
                tasks.push(tokio::spawn(async move {
                    let request = WatchRequest { service: "bench".into(), prefix: false, from_revision: 0, audit: None };
                    let mut stream = match client.watch(request).await {
                        Ok(s) => s.into_inner(),
                        Err(status) => {
                            eprintln!("watch refused: {status}");
                            return 0usize;
                        }
                    };
                    let _ = ready.send(()).await;
                    let mut seen = 0;
                    while seen < writes {
                        match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
                            Ok(Ok(Some(event))) => {
                                let received = Instant::now();
                                let n: usize = event.instance.trim_start_matches('b').parse().unwrap_or(usize::MAX);
                                let start = starts.lock().unwrap().get(n).copied().flatten();
                                if let Some(start) = start {
                                    delays.lock().unwrap().push(received.duration_since(start).as_micros() as u64);
                                }
                                seen += 1;
                            }
                            _ => break,
                        }
                    }
                    seen
                }));
            }
        }
        drop(ready_tx);
        let mut ready = 0;
        while ready < watchers {
            match tokio::time::timeout(Duration::from_secs(120), ready_rx.recv()).await {
                Ok(Some(())) => ready += 1,
                _ => break,
            }
        }
        // Let the node settle its per-watcher state before measuring.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_after = cluster.rss_bytes(leader).unwrap_or(0);
        eprintln!("{ready} watchers open after {:.1} s", opened.elapsed().as_secs_f64());

        eprintln!("{writes} writes, 100 ms apart ...");
        for i in 0..writes {
            starts.lock().unwrap()[i] = Some(Instant::now());
            writer
                .register(signed_record(&key, "bench", &format!("b{i}"), 1, 8000))
                .await
                .expect("write");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut delivered = 0usize;
        for task in tasks {
            delivered += task.await.unwrap_or(0);
        }
        let mut delays = delays.lock().unwrap().clone();
        delays.sort_unstable();
        let per_watcher = (rss_after.saturating_sub(rss_before)) as f64 / ready.max(1) as f64;
        println!("| watchers open | node RSS before | after | per watcher | deliveries | delay p50 | delay p99 | max |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        println!(
            "| {ready} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {delivered} / {} | {:.2} ms | {:.2} ms | {:.2} ms |",
            rss_before as f64 / 1048576.0,
            rss_after as f64 / 1048576.0,
            per_watcher / 1024.0,
            ready * writes,
            percentile(&delays, 0.50),
            percentile(&delays, 0.99),
            percentile(&delays, 1.0),
        );
    });
}
