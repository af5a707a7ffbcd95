//! A short, representative subset of the upstream node conformance suite (`make conformance`
//! runs all of it): tests/conformance/run.sh with a focus on a few tests that together cover
//! written volumes, downward API env, emptyDir on tmpfs, termination messages and logs through
//! the API server, spec updates reaching the device (observedGeneration), the managed /etc/hosts, against two fleetlet Nodes of this test's own (device names, hub instance,
//! netns and ports of its own).
//!
//! Needs `make env-up`, root (`ip netns`) and both binaries built
//! (`cargo build -p fleetlet-hub -p fleetlet-agent`); the first run on a machine builds e2e.test
//! from the Go module cache (minutes), later runs reuse it.

use std::path::Path;
use std::process::Command;

mod common;
use common::{free_port, hub_binary};

/// Each alternative names one upstream test; all must pass.
const SUBSET: &[&str] = &[
    r"\[sig-storage\] ConfigMap should be consumable from pods in volume \[NodeConformance\]",
    r"\[sig-storage\] Secrets should be consumable from pods in volume with defaultMode set",
    r"\[sig-storage\] Projected downwardAPI should provide container's memory limit",
    r"\[sig-storage\] EmptyDir volumes should support \(non-root,0644,tmpfs\)",
    r"\[sig-node\] Downward API should provide pod name, namespace and IP address as env vars",
    r"\[sig-node\] Container Runtime blackbox test on terminated container should report termination message from file when pod succeeds and TerminationMessagePolicy FallbackToLogsOnError is set",
    r"\[sig-node\] Pods Extended \(pod generation\) Pod Generation pod generation should start at 1 and increment per update",
    r"\[sig-node\] Kubelet when scheduling an agnhost Pod with hostAliases should write entries to /etc/hosts",
];

#[test]
fn upstream_conformance_subset_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let name = format!("ct{:x}", std::process::id() & 0xff_ffff);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("conformance-{name}"));
    let bin = hub_binary().parent().expect("bin dir").to_owned();
    let out = Command::new(root.join("tests/conformance/run.sh"))
        .current_dir(root)
        .env("CONFORMANCE_NAME", &name)
        .env("CONFORMANCE_DIR", &dir)
        .env("CONFORMANCE_FOCUS", SUBSET.join("|"))
        .env("CONFORMANCE_PROCS", "3")
        .env("CONFORMANCE_LINK_PORT", free_port().to_string())
        .env("CONFORMANCE_KUBELET_PORT", free_port().to_string())
        .env("CONFORMANCE_OPS_PORT", free_port().to_string())
        .env("FLEETLET_CONFORMANCE_BIN", &bin)
        .output()
        .expect("run tests/conformance/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(dir.join("logs/e2e.log")).unwrap_or_default();
    let tail: String = {
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    };
    assert!(
        out.status.success(),
        "conformance subset failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- e2e.log (tail)\n{tail}"
    );
    let expected = format!("conformance: {} passed, 0 failed, 0 skipped", SUBSET.len());
    assert!(
        stdout.contains(&expected),
        "expected `{expected}`\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
}
