//! The deployment files operators use, checked offline by the tools operators would use:
//! every Kubernetes manifest in `deploy/kubernetes/` against the Kubernetes OpenAPI schemas
//! (`kubernetes-validate`, which bundles them, from the venv `deploy/setup.sh` makes), and the
//! systemd unit in `deploy/systemd/` with `systemd-analyze verify` and
//! `systemd-analyze security --offline=true` (its exposure score, 0 = fully sandboxed, 10 =
//! not at all). Each check also shows that the tool refuses a broken copy, so a tool that
//! accepts anything cannot make the test pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The highest exposure score `systemd-analyze security` may give deploy/systemd's unit.
/// Measured 1.2 with systemd 252 (Debian bookworm); what remains is the network access a
/// registry needs (PrivateNetwork, IPAddressDeny) and read access to the RTC (ProtectClock).
const EXPOSURE_MAX: f64 = 2.0;

fn deploy_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(sub)
}

/// stdout and stderr together.
fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The venv `deploy/setup.sh` makes (kubernetes-validate and PyYAML live there).
fn pyenv_bin(program: &str) -> PathBuf {
    let venv = std::env::var_os("SIGNPOST_PYENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/signpost/pyenv")
        });
    let bin = venv.join("bin").join(program);
    assert!(
        bin.exists(),
        "{} is missing: run deploy/setup.sh (it installs kubernetes-validate there)",
        bin.display()
    );
    bin
}

/// `kubernetes-validate --strict FILE`: unknown fields are errors, not warnings.
fn kubernetes_validate(file: &Path) -> Output {
    Command::new(pyenv_bin("kubernetes-validate"))
        .arg("--strict")
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("running kubernetes-validate ({e}); run deploy/setup.sh"))
}

/// Every document of a YAML file, as JSON (PyYAML from the same venv does the parsing).
fn yaml_documents(file: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(pyenv_bin("python"))
        .args([
            "-c",
            "import json, sys, yaml; \
             print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(file)
        .output()
        .expect("running python");
    assert!(out.status.success(), "{}: {}", file.display(), said(&out));
    match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        Ok(serde_json::Value::Array(docs)) => docs,
        other => panic!("{}: {other:?}", file.display()),
    }
}

/// The resource of `kind` named `name` among (kind, name, document) triples.
fn find_resource<'a>(
    resources: &'a [(String, String, serde_json::Value)],
    kind: &str,
    name: &str,
) -> &'a serde_json::Value {
    &resources
        .iter()
        .find(|(k, n, _)| k == kind && n == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in deploy/kubernetes"))
        .2
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas_offline() {
    let dir = deploy_dir("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());

    eprintln!("phase 1: every manifest passes kubernetes-validate --strict");
    let mut resources = Vec::new();
    for file in &files {
        let out = kubernetes_validate(file);
        assert!(
            out.status.success(),
            "{} does not validate:\n{}",
            file.display(),
            said(&out)
        );
        for doc in yaml_documents(file) {
            let kind = doc["kind"].as_str().unwrap_or("?").to_string();
            let name = doc["metadata"]["name"].as_str().unwrap_or("?").to_string();
            assert!(
                said(&out).contains(&format!("{}/{name}", kind.to_lowercase())),
                "kubernetes-validate did not check {kind}/{name}:\n{}",
                said(&out)
            );
            resources.push((kind, name, doc));
        }
    }
    let find = |kind: &str, name: &str| find_resource(&resources, kind, name);

    eprintln!("phase 2: the manifests say what a three-node deployment needs");
    let sts = find("StatefulSet", "signpost");
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    assert_eq!(sts["spec"]["serviceName"], "signpost-peer");
    assert!(sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .is_some_and(|v| !v.is_empty()));
    let peer = find("Service", "signpost-peer");
    assert_eq!(peer["spec"]["clusterIP"], "None");
    assert_eq!(peer["spec"]["publishNotReadyAddresses"], true);
    find("Service", "signpost");
    assert_eq!(
        find("PodDisruptionBudget", "signpost")["spec"]["maxUnavailable"],
        1
    );
    find("ConfigMap", "signpost-config");
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    for bound in ["requests", "limits"] {
        assert!(
            container["resources"][bound]["memory"].is_string(),
            "resources.{bound}.memory"
        );
    }

    eprintln!("phase 3: a StatefulSet with a wrong type or an unknown field is refused");
    let text = std::fs::read_to_string(dir.join("statefulset.yaml")).expect("statefulset.yaml");
    let scratch = tempfile::tempdir().expect("tempdir");
    for (what, from, to, expect) in [
        (
            "replicas as a string",
            "replicas: 3",
            "replicas: \"three\"",
            "spec.replicas",
        ),
        (
            "an unknown field",
            "podManagementPolicy: Parallel",
            "podManagementPolicy: Parallel\n  replicaCount: 3",
            "replicaCount",
        ),
    ] {
        assert!(text.contains(from), "statefulset.yaml has no `{from}`");
        let broken = scratch.path().join("statefulset.yaml");
        std::fs::write(&broken, text.replacen(from, to, 1)).expect("writing the broken copy");
        let out = kubernetes_validate(&broken);
        assert!(
            !out.status.success(),
            "kubernetes-validate accepted {what}:\n{}",
            said(&out)
        );
        assert!(
            said(&out).contains(expect),
            "the refusal of {what} names `{expect}`:\n{}",
            said(&out)
        );
    }
}

/// `systemd-analyze ARGS`; panics saying how to get it when it is missing.
fn systemd_analyze(args: &[&str], unit: &Path) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .unwrap_or_else(|e| {
            panic!("systemd-analyze is needed ({e}); run deploy/setup.sh (Debian package systemd)")
        })
}

/// The overall exposure `systemd-analyze security --offline=true` gives a unit file.
fn exposure(unit: &Path) -> f64 {
    let out = systemd_analyze(&["security", "--offline=true", "--no-pager"], unit);
    let text = said(&out);
    assert!(
        out.status.success(),
        "systemd-analyze security {}: {}\n{text}",
        unit.display(),
        out.status
    );
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    // "→ Overall exposure level for signpost.service: 1.2 OK 🙂"
    line.rsplit(':')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"))
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify_and_is_hardened() {
    let unit = deploy_dir("systemd/signpost.service");
    let text = std::fs::read_to_string(&unit).expect("deploy/systemd/signpost.service");
    let scratch = tempfile::tempdir().expect("tempdir");

    eprintln!("phase 1: systemd-analyze verify accepts the unit without a single warning");
    // verify checks that ExecStart's program exists and is executable: point a copy at the
    // binary under test instead of /usr/local/bin/signpost, which the test does not install.
    let exec_start = "ExecStart=/usr/local/bin/signpost ";
    assert!(text.contains(exec_start), "the unit runs {exec_start}…");
    let bin = signpost_tests::signpost_bin();
    let runnable = scratch.path().join("signpost.service");
    std::fs::write(
        &runnable,
        text.replacen(exec_start, &format!("ExecStart={} ", bin.display()), 1),
    )
    .expect("writing the copy");
    let out = systemd_analyze(&["verify"], &runnable);
    assert!(
        out.status.success() && said(&out).trim().is_empty(),
        "systemd-analyze verify: {}\n{}",
        out.status,
        said(&out)
    );

    eprintln!("phase 2: verify reports a misspelled directive (it is not silent on everything)");
    let misspelled = scratch.path().join("misspelled/signpost.service");
    std::fs::create_dir_all(misspelled.parent().unwrap()).unwrap();
    std::fs::write(
        &misspelled,
        std::fs::read_to_string(&runnable).unwrap().replacen(
            "ProtectSystem=strict",
            "ProtectSytem=strict",
            1,
        ),
    )
    .unwrap();
    let out = systemd_analyze(&["verify"], &misspelled);
    assert!(
        said(&out).contains("Unknown key 'ProtectSytem'"),
        "verify did not report the typo:\n{}",
        said(&out)
    );

    eprintln!("phase 3: the unit carries the hardening and scores below {EXPOSURE_MAX}");
    for directive in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "AmbientCapabilities=\n",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "StateDirectory=signpost",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
        "LockPersonality=yes",
        "Restart=on-failure",
        "LimitNOFILE=",
    ] {
        assert!(text.contains(directive), "the unit lacks {directive:?}");
    }
    let score = exposure(&unit);
    eprintln!("exposure score of deploy/systemd/signpost.service: {score}");
    assert!(
        score < EXPOSURE_MAX,
        "exposure {score} is not below {EXPOSURE_MAX}"
    );

    eprintln!("phase 4: the same unit without its sandboxing scores much worse");
    // Keep what runs the service; drop every line that restricts it.
    let keep = [
        "[",
        "Description=",
        "After=",
        "Wants=",
        "Type=",
        "ExecStart=",
        "ExecReload=",
        "Restart=",
        "WantedBy=",
    ];
    let bare: String = text
        .lines()
        .filter(|l| keep.iter().any(|k| l.starts_with(k)))
        .map(|l| format!("{l}\n"))
        .collect();
    let bare_unit = scratch.path().join("bare/signpost.service");
    std::fs::create_dir_all(bare_unit.parent().unwrap()).unwrap();
    std::fs::write(&bare_unit, bare).unwrap();
    let bare_score = exposure(&bare_unit);
    eprintln!("exposure score without the sandboxing: {bare_score}");
    assert!(
        bare_score >= 5.0 && bare_score > score + 3.0,
        "the bare unit scores {bare_score}, the hardened one {score}"
    );
}
