//! The compose deployment, failed over the way operators test it: build the image locally,
//! start `deploy/docker/compose.yaml`, register and resolve from the host, then `docker kill`
//! the leader, cut the next leader off the network, and `docker pause` a follower, while a
//! client keeps writing. Nothing acknowledged may be lost; each fault's write outage is
//! printed.
//!
//! Needs Docker with compose (v2 plugin or docker-compose 1.29) and root for `docker`; the
//! project is named `signpost`, so it must not run beside another compose cluster of that name.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use signpost_client::{Client, ClientConfig};
use signpost_tests::{cli, cli_ok, record_with_ttl, signpost_bin};

const NETWORK: &str = "signpost_signpost";
/// Writes in the background stop after this many, whatever happens.
const WRITES_MAX: u64 = 5_000;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/docker")
}

fn node_ip(id: u64) -> String {
    format!("172.28.0.{}", 10 + id)
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e} (run deploy/setup.sh)"))
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The compose cluster; `down -v` when dropped, also when a test fails.
struct Compose {
    compose: Vec<String>,
    client_dir: tempfile::TempDir,
}

impl Compose {
    fn up() -> Compose {
        let file = deploy_dir().join("compose.yaml");
        let compose: Vec<String> = if run("docker", &["compose", "version"]).status.success() {
            vec!["docker".into(), "compose".into()]
        } else {
            vec!["docker-compose".into()]
        };
        let mut compose = compose;
        compose.extend(["-f".into(), file.display().to_string()]);
        let cluster = Compose {
            compose,
            client_dir: tempfile::tempdir().expect("tempdir"),
        };
        // A cluster left over by an interrupted run would hold old data and a CA of its own.
        cluster.compose_ok(&["down", "-v", "--remove-orphans"]);
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(deploy_dir().join("build-image.sh"))
            .env("SIGNPOST_BIN", signpost_bin())
            .output()
            .expect("build-image.sh");
        assert!(
            out.status.success(),
            "build-image.sh: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "  image built in {:.1} s: {}",
            started.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("stripped") || l.contains("image"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        cluster.compose_ok(&["up", "-d"]);
        run_ok(
            "bash",
            &[
                deploy_dir().join("client-config.sh").to_str().unwrap(),
                "--out",
                cluster.client_dir.path().to_str().unwrap(),
                "--service",
                "orders",
                "--service",
                "drill",
            ],
        );
        cluster
    }

    fn compose_ok(&self, args: &[&str]) -> String {
        let mut all: Vec<&str> = self.compose[1..].iter().map(String::as_str).collect();
        all.extend(args);
        run_ok(&self.compose[0], &all)
    }

    fn container(&self, id: u64) -> String {
        self.compose_ok(&["ps", "-q", &format!("node{id}")])
            .trim()
            .to_string()
    }

    fn client_toml(&self) -> PathBuf {
        self.client_dir.path().join("client.toml")
    }

    fn client(&self, only: &[u64], deadline: Duration) -> Client {
        let mut config = ClientConfig::load(&self.client_toml()).expect("client.toml");
        if !only.is_empty() {
            config.endpoints = only
                .iter()
                .map(|id| format!("{}:7001", node_ip(*id)))
                .collect();
        }
        config.deadline_ms = deadline.as_millis() as u64;
        config.timeout_ms = config.timeout_ms.min(config.deadline_ms);
        Client::connect(&config).expect("client")
    }

    fn service_client(&self) -> Client {
        let mut config = ClientConfig::load(&self.client_toml()).expect("client.toml");
        config.tls.cert = self.client_dir.path().join("orders-cert.crt");
        config.tls.key = self.client_dir.path().join("orders-cert.key");
        config.deadline_ms = 5_000;
        Client::connect(&config).expect("client")
    }

    /// The leader all `among` nodes report, once they agree.
    async fn leader_among(&self, among: &[u64], within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let mut seen = BTreeSet::new();
            for id in among {
                let c = self.client(&[*id], Duration::from_secs(1));
                match c.status_of(&format!("{}:7001", node_ip(*id))).await {
                    // A leader outside `among` is one the asking nodes have not yet noticed
                    // is gone.
                    Ok(s) if among.contains(&s.leader_id) && s.role != "leader-without-quorum" => {
                        seen.insert(s.leader_id);
                    }
                    _ => {
                        seen.insert(0);
                    }
                }
            }
            if seen.len() == 1 && !seen.contains(&0) {
                return *seen.iter().next().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {among:?} after {within:?}: {seen:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `/readyz` of node `id` asked from inside its container (the host may be cut off).
    fn ready_inside(&self, id: u64) -> String {
        let out = run(
            "docker",
            &[
                "exec",
                &self.container(id),
                "bash",
                "-c",
                "exec 3<>/dev/tcp/127.0.0.1/7003 && printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3",
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn logs(&self) -> String {
        let mut all: Vec<&str> = self.compose[1..].iter().map(String::as_str).collect();
        all.extend(["logs", "--tail", "40"]);
        let out = run(&self.compose[0], &all);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let mut all: Vec<&str> = self.compose[1..].iter().map(String::as_str).collect();
        all.extend(["down", "-v", "--remove-orphans"]);
        let _ = Command::new(&self.compose[0]).args(&all).output();
    }
}

/// Acknowledged writes, with the time of each acknowledgement.
type Acks = Arc<Mutex<Vec<(Instant, String)>>>;

fn start_writer(
    client: Client,
    key: signpost_record::SigningKey,
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<()>, Acks) {
    let acks: Acks = Arc::new(Mutex::new(Vec::new()));
    let mine = Arc::clone(&acks);
    let task = tokio::spawn(async move {
        for i in 0..WRITES_MAX {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let name = format!("o{i}");
            if client
                .register(record_with_ttl(&key, "orders", &name, 1, 86_400))
                .await
                .is_ok()
            {
                mine.lock().unwrap().push((Instant::now(), name));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    (task, acks)
}

/// The longest time without an acknowledged write between `from` and `to`.
fn outage(acks: &Acks, from: Instant, to: Instant) -> Duration {
    let acks = acks.lock().unwrap();
    let mut last = from;
    let mut worst = Duration::ZERO;
    for (at, _) in acks.iter().filter(|(at, _)| *at > from && *at <= to) {
        worst = worst.max(at.duration_since(last));
        last = *at;
    }
    worst.max(to.duration_since(last))
}

/// Waits until every acknowledged write has been acknowledged after `since` at least once, so
/// the writer has recovered from a fault.
async fn wait_for_writes_after(acks: &Acks, since: Instant, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if acks.lock().unwrap().iter().any(|(at, _)| *at > since) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no write acknowledged within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_cluster_fails_over_on_kill_partition_and_pause_without_losing_writes() {
    let cluster = Compose::up();
    let all = [1, 2, 3];

    eprintln!("phase 1: three healthy nodes; register and resolve from the host");
    let leader = cluster.leader_among(&all, Duration::from_secs(90)).await;
    let env = [("SIGNPOST_CONFIG", cluster.client_toml())];
    let env: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let key_path = cluster.client_dir.path().join("orders.key");
    cli_ok(&["keygen", "--out", key_path.to_str().unwrap()], &[]);
    cli_ok(
        &[
            "bind",
            "orders",
            "--pubkey",
            key_path.with_extension("key.pub").to_str().unwrap(),
        ],
        &env,
    );
    // The nodes' audit checkpoint keys, as the certs step left them for the admin to bind.
    let mut bind = vec!["bind".to_string(), "signpost.checkpoint".to_string()];
    for id in all {
        bind.push("--pubkey".into());
        let pubkey = cluster
            .client_dir
            .path()
            .join(format!("checkpoint-node{id}.pub"));
        bind.push(pubkey.display().to_string());
    }
    cli_ok(&bind.iter().map(String::as_str).collect::<Vec<_>>(), &env);
    let key = signpost_record::read_signing_key(&key_path).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (writer, acks) = start_writer(cluster.service_client(), key, Arc::clone(&stop));
    wait_for_writes_after(&acks, Instant::now(), Duration::from_secs(20)).await;
    let resolved = cluster
        .client(&[], Duration::from_secs(5))
        .resolve("orders", false)
        .await
        .expect("resolve from the host");
    assert!(!resolved.instances.is_empty());

    eprintln!(
        "phase 2: docker kill the leader (node {leader}); the others elect one and writes go on"
    );
    let killed_at = Instant::now();
    run_ok("docker", &["kill", &cluster.container(leader)]);
    let rest: Vec<u64> = all.iter().copied().filter(|n| *n != leader).collect();
    let second = cluster.leader_among(&rest, Duration::from_secs(30)).await;
    let elected = killed_at.elapsed();
    wait_for_writes_after(&acks, Instant::now(), Duration::from_secs(20)).await;
    let kill_outage = outage(&acks, killed_at, Instant::now());

    eprintln!("phase 3: the old leader starts again and catches up");
    run_ok("docker", &["start", &cluster.container(leader)]);
    cluster.leader_among(&all, Duration::from_secs(60)).await;

    eprintln!("phase 4: the leader (node {second}) is cut off the network: it stops being ready, the majority goes on");
    let cut_at = Instant::now();
    run_ok(
        "docker",
        &["network", "disconnect", NETWORK, &cluster.container(second)],
    );
    let majority: Vec<u64> = all.iter().copied().filter(|n| *n != second).collect();
    cluster
        .leader_among(&majority, Duration::from_secs(30))
        .await;
    let cut_elected = cut_at.elapsed();
    wait_for_writes_after(&acks, Instant::now(), Duration::from_secs(20)).await;
    let cut_outage = outage(&acks, cut_at, Instant::now());
    let deadline = Instant::now() + Duration::from_secs(10);
    let minority = loop {
        let said = cluster.ready_inside(second);
        if said.contains(" 503 ") {
            break said;
        }
        assert!(
            Instant::now() < deadline,
            "the cut-off node still says it is ready: {said}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(minority.contains("not ready"), "{minority}");
    let unready_after = cut_at.elapsed();

    eprintln!("phase 5: heal; the cut-off node rejoins");
    run_ok(
        "docker",
        &[
            "network",
            "connect",
            "--ip",
            &node_ip(second),
            NETWORK,
            &cluster.container(second),
        ],
    );
    let now_leading = cluster.leader_among(&all, Duration::from_secs(60)).await;

    let follower = all.iter().copied().find(|n| *n != now_leading).unwrap();
    eprintln!("phase 6: docker pause a follower (node {follower}) for 5 s; writes go on");
    let paused_at = Instant::now();
    run_ok("docker", &["pause", &cluster.container(follower)]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    run_ok("docker", &["unpause", &cluster.container(follower)]);
    let pause_outage = outage(&acks, paused_at, Instant::now());
    cluster.leader_among(&all, Duration::from_secs(30)).await;

    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    eprintln!(
        "  write outage: kill -9 of the leader {:.0} ms (new leader after {:.0} ms); leader cut \
         off {:.0} ms (new leader after {:.0} ms, the cut-off node not ready after {:.0} ms); \
         follower paused {:.0} ms",
        kill_outage.as_secs_f64() * 1000.0,
        elected.as_secs_f64() * 1000.0,
        cut_outage.as_secs_f64() * 1000.0,
        cut_elected.as_secs_f64() * 1000.0,
        unready_after.as_secs_f64() * 1000.0,
        pause_outage.as_secs_f64() * 1000.0,
    );

    eprintln!("phase 7: every acknowledged write is on every node");
    let acked: BTreeSet<String> = acks
        .lock()
        .unwrap()
        .iter()
        .map(|(_, n)| n.clone())
        .collect();
    assert!(
        acked.len() > 50,
        "the writer made progress: {}",
        acked.len()
    );
    for id in all {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let have: BTreeSet<String> = cluster
                .client(&[id], Duration::from_secs(3))
                .resolve("orders", true)
                .await
                .map(|r| {
                    r.instances
                        .into_iter()
                        .map(|i| i.payload.instance)
                        .collect()
                })
                .unwrap_or_default();
            let lost: Vec<&String> = acked.difference(&have).collect();
            if lost.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} lacks {} acknowledged writes, e.g. {:?}\n{}",
                lost.len(),
                lost.iter().take(5).collect::<Vec<_>>(),
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    eprintln!("phase 8: the failover drill runs against the compose cluster");
    let out = cli_ok(
        &[
            "drill",
            "--target",
            "compose",
            "--compose-file",
            deploy_dir().join("compose.yaml").to_str().unwrap(),
            "--fault",
            "kill",
            "--fault",
            "partition",
            "--fault",
            "pause",
            "--fault-secs",
            "2",
            "--settle-secs",
            "3",
            "--service-cert",
            cluster
                .client_dir
                .path()
                .join("drill-cert")
                .to_str()
                .unwrap(),
            "--json",
        ],
        &env,
    );
    let report: serde_json::Value = serde_json::from_str(&out).expect("drill json");
    eprintln!("  drill: {report}");
    assert_eq!(
        report["faults"].as_array().map(Vec::len),
        Some(3),
        "{report}"
    );
    assert_eq!(report["missing"], serde_json::json!([]), "{report}");

    eprintln!("phase 9: after every fault, each node's audit log verifies against a quorum-signed checkpoint");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cli(&["audit", "verify", "--json"], &env);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let checkpoints = report["nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter(|n| n["checkpoint"]["tree_size"].as_u64().is_some())
                    .count()
            })
            .unwrap_or(0);
        if out.status.success() && checkpoints == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "audit verify never held on all three nodes: {report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
