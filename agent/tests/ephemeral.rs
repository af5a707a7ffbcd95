//! Ephemeral containers (`kubectl debug`) against the real Podman of the local stack: one added
//! to a running pod starts once in the pod's sandbox — its network and IPC namespaces, its
//! target's PID namespace — without touching the pod's container; the agent's own exec, attach
//! and log paths reach it by name; it is never restarted once it ended; and one the device
//! policy forbids (privileged) is refused alone while the pod runs on.

// Test code: a failed step fails the test.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use fleetlet_proto::v1;
use futures::StreamExt;
use serde_json::{Value, json};
use support::{Agent, IMAGE, bundle, container_ids, pod, podman};
use tokio::io::AsyncWriteExt;

const DEVICE: &str = "t-eph-debug";
const UID: &str = "uid-eph-debug";

/// Run `script` with `sh -c` in container `container` of the test pod; its exit code.
async fn exec(container: &str, script: &str) -> i32 {
    let ids = container_ids(DEVICE, UID).await;
    podman()
        .exec(
            &ids[container],
            &["sh".into(), "-c".into(), script.into()],
            Duration::from_secs(10),
        )
        .await
        .unwrap()
}

/// The status entry of ephemeral container `name`, if reported.
fn ephemeral(a: &Agent, name: &str) -> Option<Value> {
    let s = a.status()?;
    let st = &pod(&s, UID)?.status;
    st["ephemeralContainerStatuses"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
}

async fn wait_ephemeral(a: &Agent, what: &str, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
    a.wait_status(what, Duration::from_secs(60), |_| {
        ephemeral(a, name).is_some_and(|c| pred(&c))
    })
    .await;
    ephemeral(a, name).unwrap()
}

/// The namespace link (`pid:[4026…]`) of `kind` of the process `pid`, as the host sees it.
fn ns_of(pid: i64, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Reads `output` until `want` shows (bounded), returning all of it.
async fn read_until(output: &mut fleetlet_agent::link::StreamOutput, want: &str) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !seen.contains(want) {
        let next = tokio::time::timeout_at(deadline, output.next()).await;
        match next {
            Ok(Some(Ok((_, data)))) => seen.push_str(&String::from_utf8_lossy(&data)),
            Ok(Some(Err(e))) => panic!("stream failed: {e}; so far {seen:?}"),
            Ok(None) => break,
            Err(_) => panic!("{want:?} did not show within 15 s; got {seen:?}"),
        }
    }
    seen
}

#[tokio::test]
async fn an_ephemeral_container_debugs_the_running_pod_in_its_namespaces_once() {
    let mut a = Agent::new(DEVICE);
    std::fs::write(a.config(), "[policy]\nallow_privileged = false\n").unwrap();
    let app = json!({"name": "app", "image": IMAGE, "command": ["sleep", "3600"]});
    a.set_desired(
        1,
        vec![bundle(
            UID,
            "debugged",
            json!({"containers": [app.clone()]}),
        )],
    );
    a.start();
    a.wait_status("pod running", Duration::from_secs(60), |s| {
        pod(s, UID).is_some_and(|p| p.phase == "Running" && p.ready == 1)
    })
    .await;
    let app_id = container_ids(DEVICE, UID).await["app"].clone();
    let app_before = podman().inspect_container(&app_id).await.unwrap().unwrap();

    // What `kubectl debug -it debugged --image=busybox --target=app` adds, and a privileged
    // one the device policy forbids.
    let spec = json!({"containers": [app],
        "ephemeralContainers": [
            {"name": "debugger", "image": IMAGE, "stdin": true, "tty": true,
                "targetContainerName": "app", "command": ["sh", "-c", "echo polo; exec sh"]},
            {"name": "root-shell", "image": IMAGE, "command": ["sh"],
                "securityContext": {"privileged": true}}]});
    a.set_desired(2, vec![bundle(UID, "debugged", spec)]);
    a.reload();
    let dbg = wait_ephemeral(&a, "debugger running", "debugger", |c| {
        c["state"]["running"].is_object()
    })
    .await;
    assert_eq!(dbg["ready"], false);
    assert_eq!(dbg["restartCount"], 0);
    assert_eq!(dbg["image"], IMAGE);
    assert!(
        dbg["imageID"].as_str().is_some_and(|i| !i.is_empty()),
        "{dbg}"
    );
    let dbg_id = container_ids(DEVICE, UID).await["debugger"].clone();
    assert_eq!(
        dbg["containerID"].as_str(),
        Some(format!("podman://{dbg_id}").as_str())
    );
    let refused = wait_ephemeral(&a, "root-shell refused", "root-shell", |c| {
        c["state"]["waiting"]["reason"] == "CreateContainerConfigError"
    })
    .await;
    assert_eq!(
        refused["state"]["waiting"]["message"],
        "spec.ephemeralContainers[1].securityContext.privileged: the device policy forbids privileged containers (agent.toml [policy] allow_privileged = false)"
    );
    assert!(
        !container_ids(DEVICE, UID).await.contains_key("root-shell"),
        "never created"
    );

    // The pod's container was not touched.
    let app_after = podman().inspect_container(&app_id).await.unwrap().unwrap();
    assert_eq!(container_ids(DEVICE, UID).await["app"], app_id);
    assert!(app_after.state.running);
    assert_eq!(app_after.state.started_at, app_before.state.started_at);
    let s = a.status().unwrap();
    assert_eq!(pod(&s, UID).unwrap().phase, "Running");
    assert_eq!(pod(&s, UID).unwrap().restarts["app"], 0);

    // The pod's network and IPC namespaces, the target's PID namespace: it sees the target's
    // processes.
    let app_pid = app_after.state.pid;
    let dbg_inspect = podman().inspect_container(&dbg_id).await.unwrap().unwrap();
    for kind in ["net", "ipc", "pid"] {
        assert_eq!(
            ns_of(dbg_inspect.state.pid, kind),
            ns_of(app_pid, kind),
            "{kind} namespace"
        );
    }
    assert_eq!(
        exec("debugger", "ps | grep -v grep | grep -q 'sleep 3600'").await,
        0
    );

    // The agent's exec, log and attach paths find it by its name.
    let rt = Arc::new(podman());
    let mut io = fleetlet_agent::stream_sessions::open_stream(
        &rt,
        DEVICE,
        v1::StreamOpen {
            kind: v1::StreamKind::Exec as i32,
            pod_uid: UID.into(),
            container: "debugger".into(),
            command: vec!["/bin/echo".into(), "marco".into()],
            stdout: true,
            stderr: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    read_until(&mut io.output, "marco").await;
    let logs = fleetlet_agent::device_state::container_logs(
        rt.as_ref(),
        DEVICE,
        v1::LogRequest {
            pod_uid: UID.into(),
            container: "debugger".into(),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    let logs: Vec<_> = logs.collect().await;
    let text: String = logs
        .into_iter()
        .map(|c| String::from_utf8_lossy(&c.unwrap()).into_owned())
        .collect();
    assert!(text.contains("polo"), "{text:?}");
    let mut session = fleetlet_agent::stream_sessions::open_stream(
        &rt,
        DEVICE,
        v1::StreamOpen {
            kind: v1::StreamKind::Attach as i32,
            pod_uid: UID.into(),
            container: "debugger".into(),
            tty: true,
            stdin: true,
            stdout: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut input = session.input.take().expect("stdin attached");
    input.write_all(b"echo marco-$((6*7))\n").await.unwrap();
    input.flush().await.unwrap();
    read_until(&mut session.output, "marco-42").await;
    // Its shell ends: the ephemeral container is over for good.
    input.write_all(b"exit 7\n").await.unwrap();
    input.flush().await.unwrap();
    let done = wait_ephemeral(&a, "debugger terminated", "debugger", |c| {
        c["state"]["terminated"].is_object()
    })
    .await;
    assert_eq!(done["state"]["terminated"]["exitCode"], 7, "{done}");
    // Past a resync (5 s) and then some: not restarted, not made again.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = ephemeral(&a, "debugger").unwrap();
    assert_eq!(after["restartCount"], 0);
    assert_eq!(after["state"]["terminated"]["exitCode"], 7);
    let still = podman().inspect_container(&dbg_id).await.unwrap().unwrap();
    assert!(!still.state.running, "not started again");
    assert_eq!(container_ids(DEVICE, UID).await["debugger"], dbg_id);
    let app_end = podman().inspect_container(&app_id).await.unwrap().unwrap();
    assert_eq!(app_end.state.started_at, app_before.state.started_at);
    assert!(app_end.state.running);
    a.stop();
}
