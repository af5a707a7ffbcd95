//! Disk trouble on the device, with a real hub, a real agent process and the stack's Podman:
//!
//! - the agent's state directory is a small tmpfs the test mounts and fills: storing the next
//!   snapshot fails with ENOSPC, the agent logs the file and the error, the Node shows
//!   DiskPressure=True (reason DesiredStateNotStored), running pods keep running; once space
//!   returns the agent stores the snapshot by itself and the new pod starts;
//! - the current snapshot file is corrupted while agent and hub are down: the agent reports it,
//!   runs the previous good snapshot without removing anything, and takes the hub's snapshot
//!   when the hub is back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fleetlet_faults::Outcome;
use fleetlet_test_support::wait_for;
use tokio::time::Instant;

mod rig;
use rig::{Rig, WAIT, duplicated, node_condition, record, running, sleeper};

/// A tmpfs mounted over a directory, unmounted (lazily, in case a process still uses it) on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs on {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Writes `name` until the filesystem is full (bounded by the tmpfs size); returns its size.
    fn fill(&self, name: &str) -> u64 {
        let mut f = std::fs::File::create(self.path.join(name)).expect("filler");
        let chunk = vec![0x5au8; 64 * 1024];
        let mut written = 0u64;
        // A 1 MiB tmpfs fills after 16 chunks; 1024 is a hard stop, never reached.
        for _ in 0..1024 {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(28), "filling: {e}");
                    break;
                }
            }
        }
        let _ = f.flush();
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test]
async fn full_state_directory_is_reported_pods_keep_running_and_the_agent_catches_up() {
    let mut rig = Rig::start("fb-disk", 1).await;
    let dev = rig.devices()[0].clone();
    let state = rig.agent(&dev).state_dir.clone();
    // The agent restarts on a fresh 1 MiB state directory (it holds no pods yet).
    rig.kill_agent(&dev);
    let tmpfs = Tmpfs::mount(&state, "1m");
    rig.start_agent(&dev);
    rig.wait_node_ready(&dev).await;

    let keep_uid = rig.create_pod(sleeper("keep", &dev)).await;
    assert!(
        rig.wait_running(&["keep"], WAIT).await,
        "keep Running\n{}",
        rig.logs()
    );
    let keep_before = running(&dev, &keep_uid);
    assert_eq!(
        keep_before.get("c").map(Vec::len),
        Some(1),
        "{keep_before:?}"
    );

    let filled = tmpfs.fill("filler");
    println!("filled the state tmpfs with {filled} bytes");
    let late_uid = rig.create_pod(sleeper("late", &dev)).await;

    // The agent names the file and the OS error.
    let agent_reported = wait_for("agent logs ENOSPC", WAIT, || async {
        let log = rig.agent_log_text(&dev);
        log.lines()
            .find(|l| {
                l.contains("storing desired snapshot failed")
                    && l.contains("No space left on device")
                    && l.contains(&state.join(".desired.snapshot.tmp").display().to_string())
            })
            .map(str::to_string)
    })
    .await;
    let agent_line = match agent_reported {
        Ok(l) => l,
        Err(e) => panic!("{e}\n{}", rig.logs()),
    };
    println!("agent: {agent_line}");
    // The Node shows it: what `kubectl describe node` prints.
    let condition = wait_for("Node DiskPressure=True", WAIT, || async {
        let node = rig.nodes.get_opt(&dev).await.ok().flatten()?;
        node_condition(&node, "DiskPressure").filter(|c| c.0 == "True")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    println!("node condition: {condition:?}");
    assert_eq!(condition.1, "DesiredStateNotStored");
    assert!(
        condition.2.contains("No space left on device") && condition.2.contains("desired.snapshot"),
        "{condition:?}"
    );
    let hub_log = std::fs::read_to_string(rig.hub_log()).unwrap_or_default();
    assert!(
        hub_log.contains("device rejected snapshot"),
        "hub logs the refused snapshot"
    );
    // While full (past a resync of the agent) the running pod is untouched, the new one not started.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(running(&dev, &keep_uid), keep_before, "keep untouched");
    assert_eq!(
        rig.phase("keep").await.map(|p| p.0).as_deref(),
        Some("Running")
    );
    assert!(
        running(&dev, &late_uid).is_empty(),
        "nothing stored, nothing started"
    );
    assert_eq!(
        rig.phase("late").await.map(|p| p.0).as_deref(),
        Some("Pending")
    );

    // Space returns: the agent stores the snapshot by itself (no reconnect, no new rollout).
    std::fs::remove_file(state.join("filler")).expect("free space");
    let freed = Instant::now();
    let caught_up = wait_for("late Running and DiskPressure False", WAIT, || async {
        let node = rig.nodes.get_opt(&dev).await.ok().flatten()?;
        let clear = node_condition(&node, "DiskPressure").is_some_and(|c| c.0 == "False");
        let late = rig.phase("late").await.map(|p| p.0);
        (clear && late.as_deref() == Some("Running")).then_some(())
    })
    .await;
    let converge = freed.elapsed().as_secs_f64();
    let keep_after = running(&dev, &keep_uid);
    let lost = u32::from(keep_after.is_empty()) + u32::from(running(&dev, &late_uid).is_empty());
    let dup = duplicated(&dev, &keep_uid) + duplicated(&dev, &late_uid);
    record(Outcome {
        fault: "state dir full (1 MiB tmpfs, ENOSPC)".into(),
        recovered: caught_up.is_ok() && keep_after == keep_before,
        converge_secs: caught_up.is_ok().then_some(converge),
        pods_lost: lost,
        pods_duplicated: dup,
        detail: format!(
            "Node DiskPressure=True/{} while full; kept pod untouched; new pod started after space returned",
            condition.1
        ),
    });
    caught_up.unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    assert_eq!(keep_after, keep_before, "the kept pod was never restarted");
    assert_eq!((lost, dup), (0, 0));
    assert!(
        rig.agent_log_text(&dev)
            .contains("desired snapshot stored after an earlier failure"),
        "{}",
        rig.logs()
    );
    rig.kill_agent(&dev);
    drop(tmpfs);
}

/// Corrupts `file` in place: `truncate` cuts it in half, else one payload byte is flipped.
fn corrupt(file: &Path, truncate: bool) {
    let mut bytes = std::fs::read(file).expect("snapshot file");
    if truncate {
        bytes.truncate(bytes.len() / 2);
    } else {
        let at = bytes.len() - 5;
        bytes[at] ^= 0xff;
    }
    std::fs::write(file, bytes).expect("write corrupt snapshot");
}

async fn corrupt_snapshot_round(truncate: bool) {
    let what = if truncate { "truncated" } else { "bit-flipped" };
    let mut rig = Rig::start("fb-corrupt", 1).await;
    let dev = rig.devices()[0].clone();
    let state = rig.agent(&dev).state_dir.clone();
    let a = rig.create_pod(sleeper("a", &dev)).await;
    assert!(rig.wait_running(&["a"], WAIT).await, "{}", rig.logs());
    let b = rig.create_pod(sleeper("b", &dev)).await;
    assert!(rig.wait_running(&["a", "b"], WAIT).await, "{}", rig.logs());
    let before = [running(&dev, &a), running(&dev, &b)];
    // The status file is written at most once a second: wait until it holds both pods, so its
    // generation is the one the agent runs them under.
    let held_before = wait_for("status file holds both pods", WAIT, || async {
        fleetlet_agent::statusfile::read(&state)
            .ok()
            .filter(|s| s.generation > 0 && s.pods.len() == 2)
            .map(|s| s.generation)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));

    // Hub and agent down; the current snapshot file is damaged.
    rig.stop_hub();
    rig.kill_agent(&dev);
    let current = state.join("desired.snapshot");
    corrupt(&current, truncate);
    let log_mark = rig.agent_log_text(&dev).len();
    rig.start_agent(&dev);
    let status = wait_for("agent reports the fallback", WAIT, || async {
        fleetlet_agent::statusfile::read(&state)
            .ok()
            .filter(|s| s.desired_fallback.is_some())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.logs()));
    println!(
        "{what}: status generation {} (was {held_before}), fallback: {:?}",
        status.generation, status.desired_fallback
    );
    assert!(
        status.generation < held_before,
        "the previous good snapshot is older"
    );
    let log = rig.agent_log_text(&dev)[log_mark..].to_string();
    let reason = if truncate {
        "truncated"
    } else {
        "checksum mismatch"
    };
    assert!(
        log.lines().any(|l| l.contains("desired state problem")
            && l.contains(&current.display().to_string())
            && l.contains(reason)),
        "agent names the file and the damage:\n{log}"
    );
    // `fleetlet-agent status` shows it to someone on the device.
    let out = Command::new(fleetlet_test_support::harness::agent_binary())
        .args(["status", "--state-dir"])
        .arg(&state)
        .output()
        .expect("fleetlet-agent status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("PREVIOUS GOOD SNAPSHOT"), "{text}");
    // Past a resync: nothing was stopped or restarted, whether or not the old snapshot lists it.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let during = [running(&dev, &a), running(&dev, &b)];
    assert_eq!(
        during, before,
        "pods untouched while on the fallback snapshot"
    );

    // The hub comes back: the agent takes its current snapshot; nothing is duplicated.
    rig.start_hub();
    let back = Instant::now();
    let healed = wait_for("agent holds a fresh snapshot", WAIT, || async {
        fleetlet_agent::statusfile::read(&state)
            .ok()
            .filter(|s| s.desired_fallback.is_none() && s.generation > status.generation)
    })
    .await;
    let converged = healed.is_ok() && rig.wait_running(&["a", "b"], WAIT).await;
    let converge = back.elapsed().as_secs_f64();
    let after = [running(&dev, &a), running(&dev, &b)];
    let lost = after.iter().filter(|m| m.is_empty()).count() as u32;
    let dup = duplicated(&dev, &a) + duplicated(&dev, &b);
    record(Outcome {
        fault: format!("{what} desired.snapshot, agent restart"),
        recovered: converged && after == before,
        converge_secs: converged.then_some(converge),
        pods_lost: lost,
        pods_duplicated: dup,
        detail: format!(
            "reported as {reason}; ran previous good generation {} of {held_before}; hub snapshot taken on reconnect",
            status.generation
        ),
    });
    assert!(converged, "{}", rig.logs());
    assert_eq!(after, before, "same containers throughout");
    assert_eq!((lost, dup), (0, 0));
}

#[tokio::test]
async fn truncated_snapshot_is_reported_and_the_last_good_state_is_kept() {
    corrupt_snapshot_round(true).await;
}

#[tokio::test]
async fn corrupt_snapshot_is_reported_and_the_last_good_state_is_kept() {
    corrupt_snapshot_round(false).await;
}
