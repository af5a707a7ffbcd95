//! What a killed test run leaves behind, and removing it at the next run's start.
//!
//! A test binary killed with SIGKILL never runs its `Drop` cleanups: its hub and agent children
//! keep running, its Nodes stay (NotReady once the agents are gone) and so do its namespaces.
//! Many NotReady Nodes make the real controller-manager pause taint-based eviction, which then
//! fails unrelated eviction tests. So everything a test starts or creates carries its owner, the
//! test process, as (pid, start time): children in their environment, Nodes (through the test
//! inventory's device labels) and namespaces as labels. The first harness call of a process
//! removes what belongs to owners that are gone, and only that: the shared stack and other
//! engineers' live runs carry no label or a live owner.

use std::sync::OnceLock;

use crate::harness::{kubectl, remove_device_containers};

/// Label with the pid of the test process that created a Node or namespace.
pub const OWNER_PID_LABEL: &str = "fleetlet.test/owner-pid";
/// Label with that process's start time (clock ticks after boot), so a reused pid is no owner.
pub const OWNER_START_LABEL: &str = "fleetlet.test/owner-start";
/// Environment variable `<pid>:<start>` naming the test process that spawned a child.
pub const OWNER_ENV: &str = "FLEETLET_TEST_OWNER";

/// Start time of process `pid` (field 22 of `/proc/<pid>/stat`), `None` if it is gone.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// (pid, start) of this test process.
fn me() -> (u32, u64) {
    let pid = std::process::id();
    (pid, process_start(pid).unwrap_or(0))
}

/// Whether the owner (pid, start) still runs.
fn alive(pid: u32, start: u64) -> bool {
    process_start(pid) == Some(start)
}

/// The owner labels for what this process creates.
pub fn owner_labels() -> [(String, String); 2] {
    let (pid, start) = me();
    [
        (OWNER_PID_LABEL.to_string(), pid.to_string()),
        (OWNER_START_LABEL.to_string(), start.to_string()),
    ]
}

/// The value of [`OWNER_ENV`] for children of this process.
pub fn owner_env() -> String {
    let (pid, start) = me();
    format!("{pid}:{start}")
}

fn parse_owner(pid: &str, start: &str) -> Option<(u32, u64)> {
    Some((pid.parse().ok()?, start.parse().ok()?))
}

/// Kills the processes whose [`OWNER_ENV`] names a test process that is gone.
fn kill_orphaned_children() {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let owner = environ
            .split(|b| *b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix(OWNER_ENV)?.strip_prefix('='))
            .and_then(|v| {
                let (p, s) = v.split_once(':')?;
                parse_owner(p, s)
            });
        if let Some((owner, start)) = owner
            && !alive(owner, start)
        {
            eprintln!("reaping process {pid}: its test process {owner} is gone");
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .output();
        }
    }
}

/// Names of the objects of `kind` whose owner is gone.
fn orphaned(kind: &str) -> Vec<String> {
    let (ok, out, _) = kubectl(&["get", kind, "-l", OWNER_PID_LABEL, "-o", "json"]);
    if !ok {
        return Vec::new();
    }
    let list: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let labels = &item["metadata"]["labels"];
            let owner = parse_owner(
                labels[OWNER_PID_LABEL].as_str()?,
                labels[OWNER_START_LABEL].as_str()?,
            )?;
            (!alive(owner.0, owner.1))
                .then(|| item["metadata"]["name"].as_str().map(str::to_string))
                .flatten()
        })
        .collect()
}

/// Removes, once per test process, what killed test runs left: their processes, their Nodes
/// (with Leases and Podman containers) and their namespaces.
pub fn reap_orphans() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(reap);
}

fn reap() {
    kill_orphaned_children();
    for node in orphaned("nodes") {
        eprintln!("reaping Node {node}: its test process is gone");
        kubectl(&[
            "delete",
            "node",
            &node,
            "--wait=false",
            "--ignore-not-found",
        ]);
        kubectl(&[
            "-n",
            "kube-node-lease",
            "delete",
            "lease",
            &node,
            "--ignore-not-found",
        ]);
        remove_device_containers(&node);
    }
    for ns in orphaned("namespaces") {
        eprintln!("reaping namespace {ns}: its test process is gone");
        kubectl(&[
            "delete",
            "namespace",
            &ns,
            "--wait=false",
            "--ignore-not-found",
        ]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not_its_owner() {
        let (pid, start) = me();
        assert!(start > 0);
        assert!(alive(pid, start));
        assert!(
            !alive(pid, start + 1),
            "same pid, other start: another process"
        );
        assert!(!alive(u32::MAX, start));
        assert_eq!(owner_env(), format!("{pid}:{start}"));
    }

    fn exists(kind: &str, name: &str) -> bool {
        let (ok, out, _) = kubectl(&["get", kind, name, "-o", "jsonpath={.status.phase}"]);
        ok && out != "Terminating"
    }

    /// Against the stack's API server: what a gone owner left is removed, a live owner's stays.
    #[test]
    fn what_a_gone_test_process_left_is_reaped_and_a_live_ones_is_kept() {
        let (pid, start) = me();
        // This pid with another start time: the owner of a killed run whose pid was reused.
        let gone = start + 1;
        let tag = format!(
            "{pid}-{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        let dead_node = format!("orphan-{tag}-dead");
        let live_node = format!("orphan-{tag}-live");
        let dead_ns = format!("orphan-{tag}-ns");
        for (name, owner_start) in [(&dead_node, gone), (&live_node, start)] {
            let body = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {
                "name": name,
                "labels": {OWNER_PID_LABEL: pid.to_string(), OWNER_START_LABEL: owner_start.to_string()}}});
            let path = std::env::temp_dir().join(format!("{name}.json"));
            std::fs::write(&path, body.to_string()).expect("manifest");
            let (ok, _, err) = kubectl(&["create", "-f", path.to_str().expect("path")]);
            let _ = std::fs::remove_file(&path);
            assert!(ok, "{err}");
        }
        let (ok, _, err) = kubectl(&["create", "namespace", &dead_ns]);
        assert!(ok, "{err}");
        let owner = format!("{OWNER_PID_LABEL}={pid}");
        let start_label = format!("{OWNER_START_LABEL}={gone}");
        let (ok, _, err) = kubectl(&["label", "namespace", &dead_ns, &owner, &start_label]);
        assert!(ok, "{err}");
        let mut orphan_child = std::process::Command::new("sleep")
            .arg("300")
            .env(OWNER_ENV, format!("{pid}:{gone}"))
            .spawn()
            .expect("sleep");

        reap();

        let mut left = 150;
        while exists("node", &dead_node) || exists("namespace", &dead_ns) {
            left -= 1;
            assert!(left > 0, "orphans not reaped within 30 s");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let status = orphan_child.wait().expect("wait");
        assert!(!status.success(), "the orphaned child was killed: {status}");
        let kept = exists("node", &live_node);
        kubectl(&["delete", "node", &live_node, "--wait=false"]);
        assert!(kept, "a live owner's Node is kept");
    }
}
