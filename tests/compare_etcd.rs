//! `benches/compare-etcd.sh --quick` works from a checkout: it starts an etcd cluster and a
//! Signpost cluster with mutual TLS, measures both with one generator, kills each leader once,
//! stops everything it started, and ends with one JSON object of figures.
//!
//! This asserts behaviour, never speed: every workload completed operations without errors on
//! both systems and both failovers ended. The figures themselves go to benches/RESULTS.md.

use std::path::Path;
use std::process::Command;

use signpost_tests::signpost_bin;

#[test]
fn the_etcd_comparison_runs_both_systems_and_reports_every_figure() {
    // Phase 1: run the script as an operator would.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/compare-etcd.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--quick")
        .env("SIGNPOST_BIN", signpost_bin())
        .output()
        .expect("running benches/compare-etcd.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "compare-etcd.sh failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );

    // Phase 2: its last line is the JSON summary with every figure the issue names.
    let last = stdout.lines().last().unwrap_or_default();
    let summary: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}\n{stdout}"));
    for key in [
        "signpost_register_ops_s",
        "etcd_put_ops_s",
        "etcd_put_lease_ops_s",
        "signpost_resolve_ops_s",
        "etcd_range_ops_s",
        "signpost_stale_resolve_ops_s",
        "etcd_serializable_range_ops_s",
        "signpost_default_register_ops_s",
        "signpost_default_resolve_ops_s",
        "signpost_mixed_ops_s",
        "etcd_mixed_ops_s",
        "signpost_watch_events_s",
        "etcd_watch_events_s",
        "signpost_watch_p99_ms",
        "etcd_watch_p99_ms",
    ] {
        let value = summary[key].as_f64().unwrap_or(0.0);
        assert!(
            value > 0.0,
            "{key} is {value}: the workload did nothing\n{stdout}"
        );
    }
    // With the raised limits nothing is shed; a stray failure may happen, a failing system not.
    for system in ["signpost", "etcd"] {
        let ok = summary[format!("{system}_ok")].as_u64().unwrap_or(0);
        let errors = summary[format!("{system}_errors")]
            .as_u64()
            .unwrap_or(u64::MAX);
        assert!(
            errors.saturating_mul(100) <= ok,
            "{system}: {errors} errors against {ok} successes\n{stdout}"
        );
    }
    // Every watcher sees every acknowledged write, on both systems.
    for key in ["signpost_watch_missing", "etcd_watch_missing"] {
        assert_eq!(summary[key].as_u64(), Some(0), "{key}: {last}");
    }
    for key in ["register_ratio", "resolve_ratio", "mixed_ratio"] {
        assert!(summary[key].as_f64().is_some(), "{key} missing: {last}");
    }
    for key in ["signpost_failover_ms", "etcd_failover_ms"] {
        let ms = summary[key].as_u64();
        assert!(ms.is_some_and(|ms| ms > 0), "{key} is {ms:?}: {last}");
    }

    // Phase 3: the table names both systems, and nothing it started is left running.
    for row in [
        "register vs Put",
        "mixed: keepalive",
        "watch events delivered",
    ] {
        assert!(stdout.contains(row), "no {row:?} row\n{stdout}");
    }
    let left = Command::new("pgrep")
        .args(["-f", "signpost-compare\\."])
        .output()
        .expect("pgrep");
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "processes of the comparison are still running"
    );
}
