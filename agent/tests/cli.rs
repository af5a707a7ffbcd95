//! The real `fleetlet-agent` binary as an operator uses it: every subcommand survives a reader
//! that went away (`| head`, closed stdout or stderr) without a panic, and `status` tells a
//! running agent from a stopped one and says what the link to the hub is doing (here: down,
//! with the error of its last attempt, since no hub listens). Needs no stack: the agent runs with
//! a Podman socket that does not exist and a desired file without pods.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetlet-agent"));
    cmd.env("FLEETLET_AGENT_LOG", "stderr").env("NO_COLOR", "1");
    cmd
}

/// A free loopback port nobody listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

struct Device {
    _dir: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
    desired: PathBuf,
}

fn device(name: &str, with_hub: bool) -> Device {
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state");
    let config = dir.path().join("agent.toml");
    let mut text = format!(
        "device_name = \"{name}\"\nstate_dir = \"{}\"\npodman_socket = \"{}\"\nresync_secs = 5\n",
        state.display(),
        dir.path().join("no-podman.sock").display()
    );
    if with_hub {
        // The TLS files need not exist for the link to report why it is down.
        text.push_str(&format!(
            "[hub]\nendpoint = \"https://127.0.0.1:{}\"\nca_file = \"{d}/ca.pem\"\n\
             cert_file = \"{d}/dev.pem\"\nkey_file = \"{d}/dev-key.pem\"\n\
             reconnect_max_backoff_secs = 1\n",
            closed_port(),
            d = dir.path().display()
        ));
    }
    std::fs::write(&config, text).expect("config");
    let desired = dir.path().join("desired.json");
    std::fs::write(&desired, r#"{"generation": 3, "pods": []}"#).expect("desired");
    Device {
        _dir: dir,
        config,
        state,
        desired,
    }
}

/// Runs `cmd` with stdout (or stderr) a pipe whose reader is already closed.
fn with_closed(cmd: &mut Command, stream: &str) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    match stream {
        "stdout" => cmd.stdout(Stdio::from(writer)).stderr(Stdio::piped()),
        _ => cmd.stderr(Stdio::from(writer)).stdout(Stdio::piped()),
    };
    cmd.output().expect("runs")
}

fn assert_no_panic(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && out.status.code() != Some(101),
        "{what} panicked ({}): {stderr}",
        out.status
    );
}

fn wait_for_status(state: &Path, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let mut last = serde_json::Value::Null;
    // Up to 30 s.
    for _ in 0..150 {
        let out = agent()
            .args(["status", "--json", "--state-dir"])
            .arg(state)
            .output()
            .expect("status");
        if out.status.success() {
            last = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if pred(&last) {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("status never showed {what}; last: {last:#}");
}

/// Stops the agent at the end, also when an assertion failed.
struct Running(Child);
impl Running {
    fn stop(&mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        // Up to 20 s.
        for _ in 0..400 {
            if let Ok(Some(status)) = self.0.try_wait() {
                let mut log = String::new();
                if let Some(mut e) = self.0.stderr.take() {
                    let _ = e.read_to_string(&mut log);
                }
                assert!(status.success(), "agent exited with {status}: {log}");
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        panic!("agent did not stop within 20 s of SIGTERM");
    }
}
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(d: &Device) -> Running {
    Running(
        agent()
            .arg("--config")
            .arg(&d.config)
            .args(["run", "--desired-file"])
            .arg(&d.desired)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agent starts"),
    )
}

#[test]
fn status_shows_the_link_down_with_its_error_and_a_stopped_agent() {
    let d = device("cli-status", true);
    let mut a = start(&d);
    wait_for_status(&d.state, "the link down with an error", |v| {
        v["agent_running"] == true
            && v["link"]["state"] == "down"
            && v["link"]["last_error"]
                .as_str()
                .is_some_and(|e| !e.is_empty())
            && v["generation"] == 3
    });
    let out = agent()
        .arg("--config")
        .arg(&d.config)
        .arg("status")
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("agent:         running (pid "), "{text}");
    assert!(text.contains("link:          DOWN since "), "{text}");
    assert!(text.contains("last error: "), "{text}");
    assert!(text.contains("generation:    3, stored "), "{text}");
    assert!(text.contains("desired state: current"), "{text}");

    let log = a.stop();
    // Stopped cleanly: the file says so, and status does not take the dead pid for the agent.
    let v: serde_json::Value = serde_json::from_slice(
        &agent()
            .args(["status", "--json", "--state-dir"])
            .arg(&d.state)
            .output()
            .expect("status")
            .stdout,
    )
    .expect("json");
    assert_eq!(v["agent_running"], false, "{v:#}\n{log}");
    assert_eq!(v["link"]["state"], "stopped", "{v:#}");
    let text = String::from_utf8_lossy(
        &agent()
            .args(["status", "--state-dir"])
            .arg(&d.state)
            .output()
            .expect("status")
            .stdout,
    )
    .into_owned();
    assert!(text.contains("agent:         NOT RUNNING"), "{text}");
}

#[test]
fn status_without_a_hub_says_the_link_is_not_configured() {
    let d = device("cli-nohub", false);
    let mut a = start(&d);
    wait_for_status(&d.state, "link not configured", |v| {
        v["link"]["state"] == "not_configured" && v["agent_running"] == true
    });
    a.stop();
}

#[test]
fn no_subcommand_panics_on_a_closed_pipe() {
    let d = device("cli-pipes", false);
    // A status file to print: a short run of the agent.
    let mut a = start(&d);
    wait_for_status(&d.state, "a status file", |v| v["generation"] == 3);
    a.stop();
    let cfg = d.config.to_str().expect("utf-8 path");
    let bad = d.config.with_file_name("bad.toml");
    std::fs::write(&bad, "device_name = 7\n").expect("bad config");
    let bad = bad.to_str().expect("utf-8 path");
    let cases: Vec<Vec<&str>> = vec![
        vec!["--help"],
        vec!["--version"],
        vec!["status", "--help"],
        vec!["--config", cfg, "status"],
        vec!["--config", cfg, "status", "--json"],
        vec!["--config", cfg, "check-config"],
        vec!["--config", bad, "check-config"],
        vec!["--config", bad, "run"],
        vec!["--config", bad, "status"],
        vec!["--state-dir-typo"],
    ];
    for args in &cases {
        for stream in ["stdout", "stderr"] {
            let out = with_closed(agent().args(args), stream);
            assert_no_panic(
                &format!("fleetlet-agent {args:?} with {stream} closed"),
                &out,
            );
        }
    }
    // And the exit codes stay meaningful: printing to a closed pipe is no failure, a bad
    // configuration still is.
    let ok = with_closed(agent().args(["--config", cfg, "status"]), "stdout");
    assert!(ok.status.success(), "{ok:?}");
    let bad_run = with_closed(agent().args(["--config", bad, "check-config"]), "stderr");
    assert_eq!(bad_run.status.code(), Some(64), "{bad_run:?}");
}

#[test]
fn run_survives_a_closed_stderr_and_stops_on_sigterm() {
    let d = device("cli-run-pipe", false);
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut a = Running(
        agent()
            .arg("--config")
            .arg(&d.config)
            .args(["run", "--desired-file"])
            .arg(&d.desired)
            .stdout(Stdio::null())
            .stderr(Stdio::from(writer))
            .spawn()
            .expect("agent starts"),
    );
    wait_for_status(&d.state, "the agent running", |v| {
        v["agent_running"] == true && v["generation"] == 3
    });
    a.stop();
}
