//! Test harness: real `signpost` processes on loopback with real certificates and RocksDB.
//!
//! Every node listens on an address of its own in 127.0.0.0/8 (all of it is loopback on
//! Linux), and dials its peers from it, so traffic between two chosen nodes, or between a
//! client's address and a node, can be dropped silently with a firewall rule.
//!
//! Every fault is one call: [`TestCluster::kill9`], [`TestCluster::restart`],
//! [`TestCluster::pause`] / [`TestCluster::resume`], [`TestCluster::partition`] /
//! [`TestCluster::heal`], [`TestCluster::cut`] (a client address from nodes). Every fault is
//! undone when the cluster is dropped, also when the test fails. Every wait is bounded and
//! fails the test with the node logs when it runs out.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use signpost_client::{Client, ClientConfig};

/// The `signpost` binary under test: `SIGNPOST_BIN`, or the one cargo built next to the test.
pub fn signpost_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SIGNPOST_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/signpost
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("signpost"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --release -p signpost-cli` (same profile as the tests)",
        bin.display()
    );
    bin
}

/// Runs the CLI and returns its output.
pub fn cli(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(signpost_bin());
    cmd.args(args).stdin(Stdio::null());
    cmd.env_remove("SIGNPOST_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running signpost")
}

/// Runs the CLI and asserts success, returning stdout.
pub fn cli_ok(args: &[&str], env: &[(&str, &Path)]) -> String {
    let out = cli(args, env);
    assert!(
        out.status.success(),
        "signpost {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free loopback port (the OS picks; the tiny race with other tests is acceptable).
pub fn free_port() -> u16 {
    free_port_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// A free port on `ip`.
pub fn free_port_on(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `N` distinct free ports on `ip`: every socket stays bound until all are picked, so the OS
/// cannot hand out the same port twice (a node's listeners would then collide).
pub fn free_ports_on<const N: usize>(ip: IpAddr) -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind((ip, 0)).expect("free port"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("bound port").port())
}

/// A /24 of loopback addresses of its own for each cluster of this process:
/// 127.<from the pid>.<a counter>.0/24, so firewall rules of one test never touch another's.
fn subnet() -> (u8, u8) {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let a = 20 + (std::process::id() % 200) as u8;
    let b = NEXT.fetch_add(1, Ordering::Relaxed);
    (a, b)
}

/// Runs a command that changes the machine (firewall, signals, mounts) and asserts it worked.
fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("running {program}: {e} (is it installed? run deploy/setup.sh)")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One firewall rule that drops packets from `from` to `to` silently (no reset, no ICMP):
/// what a cut cable or a partitioned switch looks like to TCP.
fn drop_rule(from: IpAddr, to: IpAddr) -> Vec<String> {
    [
        "INPUT",
        "-s",
        &from.to_string(),
        "-d",
        &to.to_string(),
        "-j",
        "DROP",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Gives the node in `dir` an audit checkpoint key (`checkpoint.key`, `.pub`): inert until an
/// admin binds it (see [`TestCluster::bind_checkpoint_keys`]).
fn checkpoint_keygen(dir: &Path) {
    cli_ok(
        &[
            "keygen",
            "--out",
            dir.join("checkpoint.key").to_str().unwrap(),
        ],
        &[],
    );
}

/// Knobs for a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of nodes.
    pub nodes: u64,
    /// Snapshot after this many entries.
    pub snapshot_after_entries: u64,
    /// Log entries kept behind a snapshot.
    pub log_entries_kept: u64,
    /// Extra TOML appended to every node config (e.g. a `[watch]` section).
    pub extra_config: String,
    /// Extra `key = value` lines for every node's `[bootstrap]` section (quotas).
    pub bootstrap_toml: String,
    /// Extra `key = value` lines for every node's `[limits]` section.
    pub limits_toml: String,
    /// `[raft]` timing (heartbeat, election min, election max in ms); None: the defaults.
    pub raft_timing: Option<(u64, u64, u64)>,
    /// Extra `key = value` lines for every node's `[raft]` section.
    pub raft_toml: String,
    /// Nodes whose data directory is a tmpfs of this many MiB (a disk that can fill up).
    pub small_disk: Option<(u64, u64)>,
    /// Give every node a `metrics_addr` (see [`TestCluster::metrics_addr`]).
    pub metrics: bool,
    /// Reuse the CA and admin key of the cluster rooted here (a new cluster of the same
    /// deployment, e.g. to restore a backup into) instead of creating new ones.
    pub identity_from: Option<PathBuf>,
    /// Run `signpost restore FILE` for every node before starting it.
    pub restore_from: Option<PathBuf>,
    /// Nodes log JSON lines (`--log-format json`) instead of text.
    pub json_logs: bool,
    /// Extra `key = value` lines for every node's `[audit]` section.
    pub audit_toml: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            snapshot_after_entries: 10_000,
            log_entries_kept: 1_000,
            extra_config: String::new(),
            bootstrap_toml: String::new(),
            limits_toml: String::new(),
            raft_timing: None,
            raft_toml: String::new(),
            small_disk: None,
            metrics: false,
            identity_from: None,
            restore_from: None,
            json_logs: false,
            audit_toml: String::new(),
        }
    }
}

struct Node {
    ip: IpAddr,
    client_addr: String,
    raft_addr: String,
    metrics_addr: String,
    child: Option<Child>,
    paused: bool,
}

/// A cluster of real `signpost server` processes.
pub struct TestCluster {
    /// Root directory (kept alive for the cluster's lifetime; kept after it when
    /// SIGNPOST_KEEP_TEST_DIRS is set).
    pub dir: tempfile::TempDir,
    nodes: BTreeMap<u64, Node>,
    subnet: (u8, u8),
    /// Firewall rules in force (iptables arguments after -I/-D).
    rules: Mutex<Vec<Vec<String>>>,
    /// tmpfs mounts to undo.
    mounts: Vec<PathBuf>,
    options: ClusterOptions,
    admin_pub: String,
}

/// Trust domain of test clusters.
pub const TRUST_DOMAIN: &str = "signpost.local";

impl TestCluster {
    /// Creates a CA, node certificates, an admin key and certificate, and starts every node.
    pub fn start(options: ClusterOptions) -> TestCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let ca = root.join("ca");
        match &options.identity_from {
            Some(from) => {
                sh(
                    "cp",
                    &[
                        "-r",
                        from.join("ca").to_str().unwrap(),
                        ca.to_str().unwrap(),
                    ],
                );
                for file in [
                    "admin.key",
                    "admin.key.pub",
                    "admin-cert.crt",
                    "admin-cert.key",
                ] {
                    std::fs::copy(from.join(file), root.join(file)).expect("copy identity");
                }
            }
            None => {
                cli_ok(&["ca", "init", "--ca-dir", ca.to_str().unwrap()], &[]);
                cli_ok(
                    &["keygen", "--out", root.join("admin.key").to_str().unwrap()],
                    &[],
                );
                cli_ok(
                    &[
                        "ca",
                        "issue",
                        "--admin",
                        "admin",
                        "--ca-dir",
                        ca.to_str().unwrap(),
                        "--out",
                        root.join("admin-cert").to_str().unwrap(),
                    ],
                    &[],
                );
            }
        }
        let admin_pub = std::fs::read_to_string(root.join("admin.key.pub")).expect("admin pub");
        let subnet = subnet();
        let mut nodes = BTreeMap::new();
        for id in 1..=options.nodes {
            let ip = IpAddr::V4(Ipv4Addr::new(127, subnet.0, subnet.1, id as u8));
            let [client, raft, metrics] = free_ports_on::<3>(ip);
            nodes.insert(
                id,
                Node {
                    ip,
                    client_addr: format!("{ip}:{client}"),
                    raft_addr: format!("{ip}:{raft}"),
                    metrics_addr: format!("{ip}:{metrics}"),
                    child: None,
                    paused: false,
                },
            );
        }
        let mut mounts = Vec::new();
        for id in nodes.keys() {
            let nd = root.join(format!("node{id}"));
            std::fs::create_dir_all(&nd).unwrap();
            if let Some((small, mib)) = options.small_disk {
                if small == *id {
                    let data = nd.join("data");
                    std::fs::create_dir_all(&data).unwrap();
                    sh(
                        "mount",
                        &[
                            "-t",
                            "tmpfs",
                            "-o",
                            &format!("size={mib}m"),
                            "tmpfs",
                            data.to_str().unwrap(),
                        ],
                    );
                    mounts.push(data);
                }
            }
            // The node's address as an IP SAN: third-party tools (grpcurl, Python's grpcio)
            // check the server's name; Signpost's own peers check the SPIFFE id.
            cli_ok(
                &[
                    "ca",
                    "issue",
                    "--node",
                    &id.to_string(),
                    "--ca-dir",
                    ca.to_str().unwrap(),
                    "--out",
                    nd.join("node").to_str().unwrap(),
                    "--ip",
                    &nodes[id].ip.to_string(),
                ],
                &[],
            );
            checkpoint_keygen(&nd);
        }
        let client = format!(
            "endpoints = [{}]\ntrust_domain = \"{TRUST_DOMAIN}\"\nadmin_key = \"admin.key\"\n\n\
             [tls]\nca = \"ca/ca.crt\"\ncert = \"admin-cert.crt\"\nkey = \"admin-cert.key\"\n\n\
             [trust]\nadmin_keys = [\"{}\"]\nadmin_threshold = 1\n",
            nodes
                .values()
                .map(|n| format!("\"{}\"", n.client_addr))
                .collect::<Vec<_>>()
                .join(", "),
            admin_pub.trim()
        );
        std::fs::write(root.join("client.toml"), client).unwrap();
        let mut cluster = TestCluster {
            dir,
            nodes,
            subnet,
            rules: Mutex::new(Vec::new()),
            mounts,
            options,
            admin_pub: admin_pub.trim().to_string(),
        };
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        for id in &ids {
            let config = cluster.node_config(*id, &ids, false);
            let path = cluster.root().join(format!("node{id}/config.toml"));
            std::fs::write(&path, config).unwrap();
            if let Some(backup) = &cluster.options.restore_from {
                cli_ok(
                    &[
                        "restore",
                        backup.to_str().unwrap(),
                        "--config",
                        path.to_str().unwrap(),
                    ],
                    &[],
                );
            }
        }
        for id in ids {
            cluster.spawn(id);
        }
        cluster
    }

    /// Node `id`'s configuration, with `members` as its `[[members]]` and `join` as given.
    fn node_config(&self, id: u64, members: &[u64], join: bool) -> String {
        let options = &self.options;
        let node = &self.nodes[&id];
        let raft_timing = options
            .raft_timing
            .map(|(h, min, max)| {
                format!(
                    "heartbeat_ms = {h}\nelection_timeout_min_ms = {min}\nelection_timeout_max_ms = {max}\n"
                )
            })
            .unwrap_or_default();
        let members: String = members
            .iter()
            .map(|m| {
                let n = &self.nodes[m];
                format!(
                    "[[members]]\nid = {m}\nclient_addr = \"{}\"\nraft_addr = \"{}\"\n\n",
                    n.client_addr, n.raft_addr
                )
            })
            .collect();
        let metrics_line = if options.metrics {
            format!("metrics_addr = \"{}\"\n", node.metrics_addr)
        } else {
            String::new()
        };
        format!(
            "{metrics_line}node_id = {id}\njoin = {join}\ndata_dir = \"data\"\nclient_addr = \"{}\"\nraft_addr = \"{}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n\n\
             [tls]\nca = \"../ca/ca.crt\"\ncert = \"node.crt\"\nkey = \"node.key\"\ncrl = \"../ca/crl.pem\"\n\n\
             [bootstrap]\nadmin_keys = [\"{}\"]\nadmin_threshold = 1\n{}\n\n\
             [raft]\n{raft_timing}{}\n\
             snapshot_after_entries = {}\nlog_entries_kept = {}\n\n[limits]\n{}\n\n\
             [audit]\ncheckpoint_key = \"checkpoint.key\"\n{}\n\n{}\n\n{members}",
            node.client_addr,
            node.raft_addr,
            self.admin_pub,
            options.bootstrap_toml,
            options.raft_toml,
            options.snapshot_after_entries,
            options.log_entries_kept,
            options.limits_toml,
            options.audit_toml,
            options.extra_config,
        )
    }

    /// Prepares node `id` (a new address in this cluster's range, a node certificate, a config
    /// with `join = true` listing the running members) and starts it. An admin then adds it
    /// with `signpost cluster add` (see [`TestCluster::join_args`]).
    pub fn start_joining_node(&mut self, id: u64) {
        assert!(!self.nodes.contains_key(&id), "node {id} exists");
        let ip = IpAddr::V4(Ipv4Addr::new(127, self.subnet.0, self.subnet.1, id as u8));
        let [client, raft, metrics] = free_ports_on::<3>(ip);
        let members: Vec<u64> = self.nodes.keys().copied().collect();
        self.nodes.insert(
            id,
            Node {
                ip,
                client_addr: format!("{ip}:{client}"),
                raft_addr: format!("{ip}:{raft}"),
                metrics_addr: format!("{ip}:{metrics}"),
                child: None,
                paused: false,
            },
        );
        let nd = self.root().join(format!("node{id}"));
        std::fs::create_dir_all(&nd).unwrap();
        cli_ok(
            &[
                "ca",
                "issue",
                "--node",
                &id.to_string(),
                "--ca-dir",
                self.ca_dir().to_str().unwrap(),
                "--out",
                nd.join("node").to_str().unwrap(),
            ],
            &[],
        );
        checkpoint_keygen(&nd);
        let config = self.node_config(id, &members, true);
        std::fs::write(nd.join("config.toml"), config).unwrap();
        self.spawn(id);
    }

    /// Binds the checkpoint keys of `ids` to `signpost.checkpoint` (as the admin), so those
    /// nodes make and cosign audit checkpoints.
    pub fn bind_checkpoint_keys(&self, ids: &[u64]) {
        let mut args = vec!["bind".to_string(), "signpost.checkpoint".to_string()];
        for id in ids {
            args.push("--pubkey".into());
            args.push(
                self.root()
                    .join(format!("node{id}/checkpoint.key.pub"))
                    .display()
                    .to_string(),
            );
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_ok(&args, &[("SIGNPOST_CONFIG", self.client_toml().as_path())]);
    }

    /// The arguments of `signpost cluster add` for node `id`.
    pub fn join_args(&self, id: u64) -> Vec<String> {
        vec![
            "cluster".into(),
            "add".into(),
            id.to_string(),
            self.client_addr(id),
            self.raft_addr(id),
        ]
    }

    /// Stops node `id` for good (after `signpost cluster remove`): kills it and forgets it.
    pub fn forget(&mut self, id: u64) {
        self.kill9(id);
        self.nodes.remove(&id);
    }

    /// Root directory.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the admin client config.
    pub fn client_toml(&self) -> PathBuf {
        self.root().join("client.toml")
    }

    /// The CA directory.
    pub fn ca_dir(&self) -> PathBuf {
        self.root().join("ca")
    }

    /// Client address of a node.
    pub fn client_addr(&self, id: u64) -> String {
        self.nodes[&id].client_addr.clone()
    }

    /// The operators' HTTP address of a node (only served with `ClusterOptions::metrics`).
    pub fn metrics_addr(&self, id: u64) -> String {
        self.nodes[&id].metrics_addr.clone()
    }

    /// Raft address of a node.
    pub fn raft_addr(&self, id: u64) -> String {
        self.nodes[&id].raft_addr.clone()
    }

    /// Node ids.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Node ids other than `id` (the followers, given the leader).
    pub fn others(&self, id: u64) -> Vec<u64> {
        self.nodes.keys().copied().filter(|n| *n != id).collect()
    }

    /// Process id of a running node.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes[&id].child.as_ref().map(Child::id)
    }

    /// Resident memory of a running node in bytes, from /proc/<pid>/status (VmRSS).
    pub fn rss_bytes(&self, id: u64) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid(id)?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    fn spawn(&mut self, id: u64) {
        let nd = self.root().join(format!("node{id}"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(nd.join("server.log"))
            .unwrap();
        let format = if self.options.json_logs {
            "json"
        } else {
            "text"
        };
        let child = Command::new(signpost_bin())
            .args(["--log-format", format])
            .arg("server")
            .arg("--config")
            .arg(nd.join("config.toml"))
            .env("RUST_LOG", "info,openraft=warn,openraft::replication=off")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn signpost server");
        self.nodes.get_mut(&id).unwrap().child = Some(child);
    }

    /// SIGKILL: no shutdown, no flush beyond what was synced.
    pub fn kill9(&mut self, id: u64) {
        if let Some(mut child) = self.nodes.get_mut(&id).unwrap().child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    /// SIGTERM: the node shuts down gracefully; reap it with [`TestCluster::wait_exit`].
    pub fn terminate(&mut self, id: u64) {
        let pid = self.pid(id).expect("node is running").to_string();
        sh("kill", &["-TERM", &pid]);
    }

    /// Starts a stopped node again with the same config and data.
    pub fn restart(&mut self, id: u64) {
        assert!(self.nodes[&id].child.is_none(), "node {id} is running");
        self.spawn(id);
    }

    /// The exit status of a node whose process ended by itself, if it did.
    pub fn exited(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let node = self.nodes.get_mut(&id).unwrap();
        let status = node.child.as_mut()?.try_wait().expect("try_wait")?;
        node.child = None;
        Some(status)
    }

    /// Waits for a node's process to exit by itself; returns its exit status.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> std::process::ExitStatus {
        assert!(self.nodes[&id].child.is_some(), "node {id} is not running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited(id) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} still running after {timeout:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing, like a long GC pause or a
    /// stalled VM.
    pub fn pause(&mut self, id: u64) {
        let pid = self.pid(id).expect("node is running").to_string();
        sh("kill", &["-STOP", &pid]);
        self.nodes.get_mut(&id).unwrap().paused = true;
    }

    /// SIGCONT after [`TestCluster::pause`].
    pub fn resume(&mut self, id: u64) {
        let pid = self.pid(id).expect("node is running").to_string();
        sh("kill", &["-CONT", &pid]);
        self.nodes.get_mut(&id).unwrap().paused = false;
    }

    /// The loopback address node `id` listens on and dials from.
    pub fn node_ip(&self, id: u64) -> IpAddr {
        self.nodes[&id].ip
    }

    /// A loopback address for the `n`th client of this cluster (1..=99), distinct from every
    /// node's, so a client can be cut from chosen nodes.
    pub fn client_ip(&self, n: u8) -> IpAddr {
        assert!((1..100).contains(&n));
        IpAddr::V4(Ipv4Addr::new(127, self.subnet.0, self.subnet.1, 100 + n))
    }

    /// A loopback address of this cluster's range for attackers (1..=50).
    pub fn outsider_ip(&self, n: u8) -> IpAddr {
        assert!((1..=50).contains(&n));
        IpAddr::V4(Ipv4Addr::new(127, self.subnet.0, self.subnet.1, 200 + n))
    }

    fn add_rule(&self, rule: Vec<String>) {
        let mut args: Vec<&str> = vec!["-w", "-I"];
        args.extend(rule.iter().map(String::as_str));
        sh("iptables", &args);
        self.rules.lock().unwrap().push(rule);
    }

    /// Drops every packet between the addresses of `a` and those of `b`, both ways, silently.
    pub fn cut_ips(&self, a: &[IpAddr], b: &[IpAddr]) {
        for x in a {
            for y in b {
                self.add_rule(drop_rule(*x, *y));
                self.add_rule(drop_rule(*y, *x));
            }
        }
    }

    /// Partitions nodes `a` from nodes `b` (both ways, packets dropped silently).
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        let a: Vec<IpAddr> = a.iter().map(|id| self.node_ip(*id)).collect();
        let b: Vec<IpAddr> = b.iter().map(|id| self.node_ip(*id)).collect();
        self.cut_ips(&a, &b);
    }

    /// Cuts a client address from nodes.
    pub fn cut(&self, client: IpAddr, nodes: &[u64]) {
        let nodes: Vec<IpAddr> = nodes.iter().map(|id| self.node_ip(*id)).collect();
        self.cut_ips(&[client], &nodes);
    }

    /// Removes every rule added by this cluster.
    pub fn heal(&self) {
        let rules = std::mem::take(&mut *self.rules.lock().unwrap());
        for rule in rules {
            let mut args: Vec<&str> = vec!["-w", "-D"];
            args.extend(rule.iter().map(String::as_str));
            // A rule may already be gone if a test removed it by hand; nothing to undo then.
            let _ = Command::new("iptables").args(&args).output();
        }
    }

    /// The node logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for id in self.nodes.keys() {
            let path = self.root().join(format!("node{id}/server.log"));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            // Replication retry noise from openraft hides what matters.
            let tail: Vec<&str> = text
                .lines()
                .filter(|l| {
                    !l.contains("openraft::replication") && !l.contains("replication_handler")
                })
                .rev()
                .take(60)
                .collect();
            out.push_str(&format!("---- node {id} ----\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// The cluster's client config presenting `cert_prefix` (the admin certificate if None),
    /// talking to the given nodes (all if empty).
    pub fn client_config(&self, cert_prefix: Option<&Path>, only: &[u64]) -> ClientConfig {
        let mut config = ClientConfig::load(&self.client_toml()).expect("client.toml");
        if let Some(prefix) = cert_prefix {
            config.tls.cert = prefix.with_extension("crt");
            config.tls.key = prefix.with_extension("key");
        }
        if !only.is_empty() {
            config.endpoints = only.iter().map(|id| self.client_addr(*id)).collect();
        }
        config
    }

    /// A client with the admin identity, talking to the given nodes (all if empty).
    pub fn client(&self, only: &[u64]) -> Client {
        Client::connect(&self.client_config(None, only)).expect("client")
    }

    /// A client presenting `cert_prefix` (the admin certificate if None), connecting from
    /// `source` (see [`TestCluster::client_ip`]) to the given nodes (all if empty), with a
    /// per-call deadline.
    pub fn client_from(
        &self,
        source: IpAddr,
        cert_prefix: Option<&Path>,
        only: &[u64],
        deadline: Duration,
    ) -> Client {
        let mut config = self.client_config(cert_prefix, only);
        config.source_ip = Some(source);
        config.timeout_ms = config.timeout_ms.min(deadline.as_millis() as u64);
        config.deadline_ms = deadline.as_millis() as u64;
        Client::connect(&config).expect("client")
    }

    /// Node `id`'s own status, or None if it does not answer within 2 s.
    pub async fn status_of(&self, id: u64) -> Option<signpost_proto::v1::StatusResponse> {
        let client = self.client(&[id]).with_deadline(Duration::from_secs(2));
        client.status_of(&self.client_addr(id)).await.ok()
    }

    /// A client presenting another certificate.
    pub fn client_as(&self, cert_prefix: &Path, only: &[u64]) -> Client {
        Client::connect(&self.client_config(Some(cert_prefix), only)).expect("client")
    }

    /// Waits until every running node agrees on one leader and the registry took its genesis
    /// entry; returns the leader id.
    pub async fn wait_ready(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(leader) = self.agreed_leader().await {
                // Genesis is applied once the leader shows a committed entry beyond the
                // membership entries; resolve of an unknown name then says NOT_FOUND rather
                // than UNAVAILABLE.
                let c = self.client(&[leader]);
                match c.resolve("readiness-probe", true).await {
                    Err(e) if e.code() == Some(tonic::Code::NotFound) => return leader,
                    _ => {}
                }
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ready after {timeout:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The leader every running node reports, if they agree.
    pub async fn agreed_leader(&self) -> Option<u64> {
        let mut leader = None;
        for (id, node) in &self.nodes {
            if node.child.is_none() {
                continue;
            }
            let status = self
                .client(&[*id])
                .status_of(&node.client_addr)
                .await
                .ok()?;
            if status.leader_id == 0 || leader.is_some_and(|l| l != status.leader_id) {
                return None;
            }
            leader = Some(status.leader_id);
        }
        leader
    }

    /// Issues a certificate from the cluster CA; returns the prefix.
    pub fn issue(&self, kind: &str, name: &str) -> PathBuf {
        let prefix = self.root().join(format!("{}-{}", kind, name));
        cli_ok(
            &[
                "ca",
                "issue",
                &format!("--{kind}"),
                name,
                "--ca-dir",
                self.ca_dir().to_str().unwrap(),
                "--out",
                prefix.to_str().unwrap(),
            ],
            &[],
        );
        prefix
    }

    /// Generates a signing key for a service and binds it (as admin); returns the key path.
    pub fn bind_new_key(&self, service: &str) -> PathBuf {
        let key = self.root().join(format!("{service}.key"));
        cli_ok(&["keygen", "--out", key.to_str().unwrap()], &[]);
        let pubkey = self.root().join(format!("{service}.key.pub"));
        cli_ok(
            &["bind", service, "--pubkey", pubkey.to_str().unwrap()],
            &[("SIGNPOST_CONFIG", &self.client_toml())],
        );
        key
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.heal();
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                if node.paused {
                    let _ = Command::new("kill")
                        .args(["-CONT", &child.id().to_string()])
                        .output();
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for mount in &self.mounts {
            let _ = Command::new("umount").arg(mount).output();
        }
        if std::env::var_os("SIGNPOST_KEEP_TEST_DIRS").is_some() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            eprintln!("kept test cluster directory {}", kept.keep().display());
        }
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An unsigned registration payload of `service/instance` at `sequence`: endpoint
/// 10.0.0.1:`port`, issued now, TTL 30 s. Tests adjust fields before signing.
pub fn record_payload(
    service: &str,
    instance: &str,
    sequence: u64,
    port: u32,
) -> signpost_proto::v1::RecordPayload {
    signpost_proto::v1::RecordPayload {
        service: service.into(),
        instance: instance.into(),
        endpoints: vec![signpost_proto::v1::Endpoint {
            host: "10.0.0.1".into(),
            port,
            protocol: "grpc".into(),
        }],
        metadata: Default::default(),
        tls_identity: format!("spiffe://{TRUST_DOMAIN}/service/{service}"),
        sequence,
        issued_at_ms: now_ms(),
        ttl_secs: 30,
    }
}

/// A signed registration like [`signed_record`] with TTL `ttl` seconds.
pub fn record_with_ttl(
    key: &signpost_record::SigningKey,
    service: &str,
    instance: &str,
    sequence: u64,
    ttl: u32,
) -> signpost_proto::v1::Envelope {
    let mut payload = record_payload(service, instance, sequence, 8080);
    payload.ttl_secs = ttl;
    signpost_record::sign_record(key, &payload)
}

/// Whether a linearizable resolve through `client` shows `service/instance` (false on error).
pub async fn present(client: &Client, service: &str, instance: &str) -> bool {
    match client.resolve(service, false).await {
        Ok(r) => r.instances.iter().any(|i| i.payload.instance == instance),
        Err(_) => false,
    }
}

/// The raw Resolve answer for `service` from node 1, stale, as the admin sees it: genuine
/// material a rogue node can replay.
pub async fn raw_resolve(
    cluster: &TestCluster,
    service: &str,
) -> signpost_proto::v1::ResolveResponse {
    raw_registry(cluster, &cluster.root().join("admin-cert"), 1)
        .resolve(signpost_proto::v1::ResolveRequest {
            service: service.into(),
            stale: true,
            audit: None,
        })
        .await
        .expect("raw resolve")
        .into_inner()
}

/// A signed registration of `service/instance` at `sequence`, endpoint 10.0.0.1:`port`.
pub fn signed_record(
    key: &signpost_record::SigningKey,
    service: &str,
    instance: &str,
    sequence: u64,
    port: u32,
) -> signpost_proto::v1::Envelope {
    signpost_record::sign_record(key, &record_payload(service, instance, sequence, port))
}

/// A binding of `service` to `key` alone at `version`, signed by `admin`, issued now and valid
/// without bounds.
pub fn signed_binding(
    admin: &signpost_record::SigningKey,
    service: &str,
    key: &signpost_record::SigningKey,
    version: u64,
) -> signpost_proto::v1::Envelope {
    signpost_record::sign_binding(
        admin,
        &signpost_proto::v1::BindingPayload {
            service: service.into(),
            public_keys: vec![key.verifying_key().to_bytes().to_vec()],
            version,
            issued_at_ms: now_ms(),
            not_before_ms: 0,
            not_after_ms: 0,
        },
    )
}

/// A mutual-TLS channel presenting `cert_prefix`.crt/.key to `addr`, dialled from `from` (the
/// kernel's choice if None), with none of the Rust client's own checks.
pub fn raw_channel(
    cluster: &TestCluster,
    cert_prefix: &Path,
    addr: &str,
    from: Option<IpAddr>,
) -> tonic::transport::Channel {
    let files = signpost_identity::TlsFiles {
        ca: cluster.ca_dir().join("ca.crt"),
        cert: cert_prefix.with_extension("crt"),
        key: cert_prefix.with_extension("key"),
        crl: None,
    };
    let config =
        signpost_identity::client_config_from_files(&files, signpost_identity::PeerRule::AnyNode)
            .expect("client config");
    signpost_identity::connect_channel_from(addr, config, Duration::from_secs(3), from)
        .expect("channel")
}

/// A raw gRPC Registry client presenting `cert_prefix`.crt/.key to node `id`: what an attacker
/// uses, with none of the Rust client's own checks.
pub fn raw_registry(
    cluster: &TestCluster,
    cert_prefix: &Path,
    id: u64,
) -> signpost_proto::v1::registry_client::RegistryClient<tonic::transport::Channel> {
    let channel = raw_channel(cluster, cert_prefix, &cluster.client_addr(id), None);
    signpost_proto::v1::registry_client::RegistryClient::new(channel)
        .max_encoding_message_size(1024 * 1024)
}

/// A raw gRPC Raft client presenting `cert_prefix`.crt/.key to node `target`'s Raft listener,
/// dialling from `from`: what a rogue node uses.
pub fn raw_raft(
    cluster: &TestCluster,
    cert_prefix: &Path,
    target: u64,
    from: IpAddr,
) -> signpost_proto::v1::raft_client::RaftClient<tonic::transport::Channel> {
    let channel = raw_channel(cluster, cert_prefix, &cluster.raft_addr(target), Some(from));
    signpost_proto::v1::raft_client::RaftClient::new(channel)
}
