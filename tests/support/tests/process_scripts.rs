//! The pidfile handling of the stack and demo scripts (`tests/env/proc.sh`, used by
//! `tests/env/daemons.sh` and `tests/demo/lib.sh`): a daemon whose binary was rebuilt while it
//! ran is still recognised and stopped, its children go with it, and a pidfile naming another
//! process (recycled pid) never gets that process signalled. Runs the real scripts with bash on
//! a private run directory; no stack needed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `script` under `bash -euo pipefail` with the stack scripts sourced and
/// FLEETLET_DEV_DIR pointing at `dev`; returns stdout, panicking with the output on failure.
fn bash(dev: &Path, script: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -euo pipefail\nsource tests/env/lib.sh\nsource tests/env/daemons.sh\n{script}"
        ))
        .current_dir(repo())
        .env("FLEETLET_DEV_DIR", dev)
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "script failed ({}):\n{script}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn alive(pid: u32) -> bool {
    // A zombie (state Z) is gone for our purposes: only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

fn wait_gone(pid: u32) -> bool {
    // Up to 10 s.
    for _ in 0..200 {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn start_ticks(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(19).map(str::to_owned)
}

/// Kills what a failed assertion may have left behind: each process only while it is still the
/// one the test started (same start time), never a recycled pid.
struct Reap(Vec<(u32, Option<String>)>);
impl Reap {
    fn new(pids: &[u32]) -> Self {
        Self(pids.iter().map(|&p| (p, start_ticks(p))).collect())
    }
}
impl Drop for Reap {
    fn drop(&mut self) {
        for (pid, ticks) in &self.0 {
            if ticks.is_some() && start_ticks(*pid) == *ticks && alive(*pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

#[test]
fn a_rebuilt_daemon_and_its_children_are_stopped() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let dev = dir.join("dev");
    // A "daemon" that forks a child and waits, started from a binary we then replace, as
    // `cargo build` replaces fleetlet-hub under a running demo.
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let daemon = bin.join("fake-daemon");
    std::fs::copy("/bin/bash", &daemon).expect("copy bash");
    let out = bash(
        &dev,
        &format!(
            "start_daemon fake {daemon} -c 'sleep 300 & echo $! > {child}; wait'\n\
             for i in $(seq 50); do [ -s {child} ] && break; sleep 0.1; done\n\
             head -n 1 \"$RUN_DIR/fake.pid\" | cut -d' ' -f1",
            daemon = daemon.display(),
            child = dir.join("child.pid").display(),
        ),
    );
    let pid: u32 = out.trim().parse().expect("pid printed");
    let child: u32 = std::fs::read_to_string(dir.join("child.pid"))
        .expect("child pid")
        .trim()
        .parse()
        .expect("child pid number");
    let _reap = Reap::new(&[pid, child]);
    assert!(alive(pid) && alive(child));

    // Rebuild: the running process's /proc/PID/exe now reads "... (deleted)".
    std::fs::remove_file(&daemon).expect("remove binary");
    std::fs::copy("/bin/bash", &daemon).expect("new binary");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe link");
    assert!(exe.to_string_lossy().ends_with("(deleted)"), "{exe:?}");

    // Scripts of older checkouts read the first line as before: `PID EXE`.
    let pidfile = std::fs::read_to_string(dev.join("run/fake.pid")).expect("pidfile");
    let first = pidfile.lines().next().unwrap_or_default();
    assert_eq!(first, format!("{pid} {}", daemon.display()), "{pidfile}");
    let running = bash(&dev, "is_running fake && echo yes || echo no");
    assert_eq!(
        running.trim(),
        "yes",
        "a rebuilt daemon still counts as running"
    );
    bash(&dev, "stop_daemon fake");
    assert!(wait_gone(pid), "the daemon survived stop_daemon");
    assert!(wait_gone(child), "the daemon's child survived stop_daemon");
    assert!(!dev.join("run/fake.pid").exists(), "pidfile removed");
}

#[test]
fn a_pidfile_of_another_process_signals_nothing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let dev = dir.join("dev");
    std::fs::create_dir_all(dev.join("run")).expect("run dir");
    // A live process that is not the one the pidfile recorded: same pid, other start time (what
    // a recycled pid looks like), and an old-format pidfile with another executable.
    let mut bystander = Command::new("sleep").arg("300").spawn().expect("sleep");
    let pid = bystander.id();
    let _reap = Reap::new(&[pid]);
    std::fs::write(
        dev.join("run/recycled.pid"),
        format!("{pid} /usr/bin/other\n1\n"),
    )
    .expect("pidfile");
    std::fs::write(dev.join("run/old.pid"), format!("{pid} /usr/bin/other\n")).expect("pidfile");
    let out = bash(
        &dev,
        "is_running recycled && echo yes || echo no\nis_running old && echo yes || echo no\n\
         stop_daemon recycled\nstop_daemon old",
    );
    assert_eq!(out, "no\nno\n");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        alive(pid),
        "a process the pidfile did not start was signalled"
    );
    assert!(
        !dev.join("run/recycled.pid").exists(),
        "stale pidfile removed"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}

#[test]
fn an_old_format_pidfile_of_a_rebuilt_binary_is_still_recognised() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let dev = dir.join("dev");
    std::fs::create_dir_all(dev.join("run")).expect("run dir");
    let bin = dir.join("old-daemon");
    std::fs::copy("/bin/sleep", &bin).expect("copy sleep");
    let mut old = Command::new(&bin).arg("300").spawn().expect("start");
    let pid = old.id();
    let _reap = Reap::new(&[pid]);
    // Written by the scripts before start times were recorded: `PID EXE` alone, and the binary
    // rebuilt since.
    std::fs::write(
        dev.join("run/old.pid"),
        format!("{pid} {}\n", bin.display()),
    )
    .expect("pidfile");
    std::fs::remove_file(&bin).expect("remove");
    std::fs::copy("/bin/sleep", &bin).expect("rebuild");
    let out = bash(
        &dev,
        "is_running old && echo yes || echo no\nstop_daemon old",
    );
    assert!(out.starts_with("yes"), "{out}");
    // Our child: reap it so it does not linger as a zombie.
    let status = old.wait().expect("wait");
    assert!(!status.success(), "stopped by a signal: {status}");
}
