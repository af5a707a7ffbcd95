//! Operations of the real binary: check-config exit codes, sd_notify READY/WATCHDOG to a socket of
//! the test's own, journald fields read back with journalctl, and container logs for the link.

mod support;

use std::process::Command;
use std::time::Duration;

use fleetlet_agent::device_state::container_logs;
use fleetlet_proto::v1::LogRequest;
use futures::StreamExt;
use serde_json::json;
use support::{Agent, IMAGE, bundle, pod, podman};

fn agent_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fleetlet-agent"))
}

#[test]
fn check_config_accepts_good_and_exits_64_on_bad_files() {
    let d = tempfile::tempdir().unwrap();
    let good = d.path().join("good.toml");
    std::fs::write(
        &good,
        "device_name = \"edge-1\"\n[reserved]\ncpu = \"100m\"\n",
    )
    .unwrap();
    let out = agent_cmd()
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));

    let cases = [
        (
            "unknown.toml",
            "device_name = \"e\"\nresync = 3\n",
            "resync",
        ),
        ("syntax.toml", "device_name = \n", "config"),
        (
            "value.toml",
            "device_name = \"e\"\n[reserved]\nmemory = \"lots\"\n",
            "reserved.memory",
        ),
        (
            "name.toml",
            "device_name = \"Not_A_DNS_Name\"\n",
            "device_name",
        ),
    ];
    for (file, text, needle) in cases {
        let p = d.path().join(file);
        std::fs::write(&p, text).unwrap();
        let out = agent_cmd()
            .args(["check-config", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{file}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle) && err.contains(file), "{file}: {err}");
    }
    let out = agent_cmd()
        .args(["check-config", "--config"])
        .arg(d.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    // `run` refuses a bad configuration the same way.
    let out = agent_cmd()
        .args(["run", "--config"])
        .arg(d.path().join("name.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test]
async fn notifies_ready_and_watchdog_on_the_systemd_socket() {
    let sockdir = tempfile::tempdir().unwrap();
    let path = sockdir.path().join("notify.sock");
    let server = tokio::net::UnixDatagram::bind(&path).unwrap();
    let mut a = Agent::new("t-notify")
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .env("WATCHDOG_USEC", "400000");
    a.set_desired(1, vec![]);
    a.start();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got
        .iter()
        .filter(|m: &&String| m.as_str() == "WATCHDOG=1")
        .count()
        < 2
    {
        let n = tokio::time::timeout(Duration::from_secs(20), server.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no notification; got {got:?}\n{}", a.logs()))
            .unwrap();
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(got[0], "READY=1", "{got:?}");
    assert!(a.stop().success());
}

#[tokio::test]
async fn logs_go_to_journald_with_structured_fields() {
    if !std::path::Path::new(fleetlet_agent::logging::JOURNAL_SOCKET).exists() {
        panic!("journald is not running: run `make env-up`");
    }
    let mut a = Agent::new("t-journal").env("FLEETLET_AGENT_LOG", "journald");
    a.set_desired(
        7,
        vec![bundle(
            "uid-journal",
            "journal",
            json!({"hostNetwork": true, "terminationGracePeriodSeconds": 1,
                   "containers": [{"name": "c", "image": IMAGE, "command": ["sh", "-c", "exit 1"]}]}),
        )],
    );
    a.start();
    a.wait_status("pod seen", Duration::from_secs(60), |s| {
        pod(s, "uid-journal").is_some()
    })
    .await;
    // Container exit events are logged with pod/namespace/container fields.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("journalctl")
            .args([
                "-t",
                "fleetlet-agent",
                "-o",
                "json",
                "--no-pager",
                "DEVICE=t-journal",
            ])
            .output()
            .unwrap();
        let start = String::from_utf8_lossy(&out.stdout).to_string();
        let out = Command::new("journalctl")
            .args([
                "-t",
                "fleetlet-agent",
                "-o",
                "json",
                "--no-pager",
                "POD=journal",
                "CONTAINER=c",
            ])
            .output()
            .unwrap();
        let exits = String::from_utf8_lossy(&out.stdout).to_string();
        let has_generation = start.lines().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v["GENERATION"] == "7" && v["SYSLOG_IDENTIFIER"] == "fleetlet-agent"
        });
        let has_exit = exits.lines().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v["NAMESPACE"] == "test" && v["MESSAGE"] == "container exited"
        });
        if has_generation && has_exit {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "journal lacks fields:\n{start}\n{exits}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn container_logs_stream_for_the_link() {
    let mut a = Agent::new("t-logs");
    let uid = "uid-logs";
    a.set_desired(
        1,
        vec![bundle(
            uid,
            "logs",
            json!({"hostNetwork": true, "terminationGracePeriodSeconds": 1,
                   "containers": [{"name": "talk", "image": IMAGE,
                     "command": ["sh", "-c", "for i in 1 2 3; do echo line$i; done; echo err >&2; trap 'exit 0' TERM; while true; do sleep 1; done"]}]}),
        )],
    );
    a.start();
    a.wait_status("running", Duration::from_secs(60), |s| {
        pod(s, uid).is_some_and(|p| p.phase == "Running")
    })
    .await;
    let p = podman();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !text.contains("err") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "log so far: {text:?}"
        );
        let req = LogRequest {
            pod_uid: uid.into(),
            container: "talk".into(),
            ..Default::default()
        };
        let mut s = container_logs(&p, "t-logs", req, None).await.unwrap();
        text.clear();
        while let Some(chunk) = s.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(text.contains("line1\nline2\nline3\n"), "{text:?}");
    let req = LogRequest {
        pod_uid: uid.into(),
        container: "talk".into(),
        tail_lines: Some(1),
        ..Default::default()
    };
    let mut s = container_logs(&p, "t-logs", req, None).await.unwrap();
    let mut tail = String::new();
    while let Some(chunk) = s.next().await {
        tail.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert_eq!(tail.lines().count(), 1, "{tail:?}");
    // Another device cannot read this pod's log.
    let req = LogRequest {
        pod_uid: uid.into(),
        container: "talk".into(),
        ..Default::default()
    };
    let err = container_logs(&p, "t-other-device", req, None)
        .await
        .err()
        .unwrap();
    assert!(err.contains("not found"), "{err}");
}

#[tokio::test]
async fn previous_logs_are_the_previous_runs_part_of_the_log() {
    let mut a = Agent::new("t-prevlogs");
    let uid = "uid-prevlogs";
    a.set_desired(
        1,
        vec![bundle(
            uid,
            "prev",
            json!({"hostNetwork": true, "terminationGracePeriodSeconds": 1,
                   "containers": [{"name": "c", "image": IMAGE,
                     "command": ["sh", "-c", "echo run-$(cat /proc/uptime); sleep 2; exit 1"]}]}),
        )],
    );
    a.start();
    let s = a
        .wait_status("restarted once", Duration::from_secs(60), |s| {
            pod(s, uid).is_some_and(|p| {
                p.restarts.get("c").copied().unwrap_or(0) >= 1
                    && p.status["containerStatuses"][0]["state"]["running"].is_object()
            })
        })
        .await;
    let last = &pod(&s, uid).unwrap().status["containerStatuses"][0]["lastState"]["terminated"];
    let secs = |k: &str| {
        last[k]
            .as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(|t| t.as_second())
            .unwrap()
    };
    let window = (secs("startedAt"), secs("finishedAt"));
    let read = |previous: Option<(i64, i64)>| async move {
        let req = LogRequest {
            pod_uid: uid.into(),
            container: "c".into(),
            previous: previous.is_some(),
            ..Default::default()
        };
        let mut s = container_logs(&podman(), "t-prevlogs", req, previous)
            .await
            .unwrap();
        let mut text = String::new();
        while let Some(chunk) = s.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
        text
    };
    // Wait for the current run's line, then compare.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut all = read(None).await;
    while all.matches("run-").count() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "log: {all:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        all = read(None).await;
    }
    let previous = read(Some(window)).await;
    assert_eq!(
        previous.matches("run-").count(),
        1,
        "previous: {previous:?} all: {all:?}"
    );
    assert!(all.starts_with(previous.trim_end()), "{previous:?} {all:?}");
    // Without a previous run, the kubelet's error.
    let req = LogRequest {
        pod_uid: uid.into(),
        container: "c".into(),
        previous: true,
        ..Default::default()
    };
    let err = container_logs(&podman(), "t-prevlogs", req, None)
        .await
        .err()
        .unwrap();
    assert!(err.contains("previous terminated container"), "{err}");
}
