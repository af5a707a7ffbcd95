//! `kubectl debug` end to end: the real kubectl adds ephemeral containers through the real
//! kube-apiserver's `ephemeralcontainers` subresource; the real `fleetlet-hub` relays the changed
//! pod over the device link to a real `fleetlet-agent`, which starts them in the pod's sandbox
//! on the stack's Podman; their status comes back in `status.ephemeralContainerStatuses`, and
//! `kubectl exec`, `logs` and `debug -it` (attach) reach them through the hub.
//!
//! Needs `make env-up` and the agent binary next to the hub's (`cargo build -p fleetlet-agent`).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};
use tokio::time::Instant;

mod common;
use common::{
    HubSetup, HubSpec, KubeCleanup, client, create_namespace, kube_config_path, kubectl,
    node_ready, remove_device_containers, start_agent, unique, wait_for,
};

fn image() -> String {
    std::env::var("FLEETLET_TEST_IMAGE")
        .unwrap_or_else(|_| "localhost/fleetlet-test/busybox:1".into())
}

fn kubectl_path() -> String {
    std::env::var("FLEETLET_KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// Waits for `child` with a bound (killed past it): (exit code, stdout, stderr).
fn wait_output(mut child: std::process::Child, bound: Duration) -> (Option<i32>, String, String) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut out = String::new();
            let mut err = String::new();
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return (status.code(), out, err);
        }
        if started.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kubectl did not finish within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The status of ephemeral container `name` of `pod`.
fn ephemeral_status(pod: &Pod, name: &str) -> Option<Value> {
    let statuses = pod.status.as_ref()?.ephemeral_container_statuses.as_ref()?;
    let s = statuses.iter().find(|s| s.name == name)?;
    serde_json::to_value(s).ok()
}

#[tokio::test]
async fn kubectl_debug_runs_ephemeral_containers_through_the_hub() {
    let id = unique("ephem");
    let dev = format!("{id}-d");
    let _cleanup = KubeCleanup {
        nodes: vec![dev.clone()],
        namespace: Some(id.clone()),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = HubSetup::write(
        dir.path(),
        HubSpec::new(&id, &[(dev.clone(), format!("{id}-f"))]),
    );
    let _hub = setup.spawn();
    let agent = start_agent(dir.path(), &dev, setup.ports.link);
    struct Cleanup(String, Option<common::Proc>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            self.1.take();
            remove_device_containers(&self.0);
        }
    }
    let _agent = Cleanup(dev.clone(), Some(agent));
    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("node Ready from its real agent", 90, || async {
        node_ready(&nodes.get(&dev).await.ok()?).then_some(())
    })
    .await;
    create_namespace(&client, &id).await;
    let ns = id.clone();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "target"},
        "spec": {
            "nodeName": dev,
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Equal",
                "value": "fleetlet", "effect": "NoSchedule"}],
            "containers": [{"name": "app", "image": image(), "command": ["sleep", "3600"]}]
        }
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let running = wait_for("pod Running on the device", 120, || async {
        let p = pods.get("target").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(p)
    })
    .await;
    let app_before = running
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .clone();

    // `kubectl debug` adds an ephemeral container through the subresource.
    let started = Instant::now();
    let (ok, out, err) = kubectl(&[
        "-n",
        &ns,
        "debug",
        "target",
        "--image",
        &image(),
        "--target",
        "app",
        "-c",
        "debugger",
        "--profile",
        "general",
        "--",
        "sh",
        "-c",
        "while true; do echo polo; sleep 1; done",
    ]);
    assert!(ok, "kubectl debug: {out} {err}");
    let with_debugger = wait_for("debugger running on the device", 90, || async {
        let p = pods.get("target").await.ok()?;
        let s = ephemeral_status(&p, "debugger")?;
        s["state"]["running"].is_object().then_some(p)
    })
    .await;
    println!(
        "kubectl debug: ephemeral container running {:?} after the patch",
        started.elapsed()
    );
    assert_eq!(with_debugger.metadata.generation, Some(2));
    let status = with_debugger.status.as_ref().unwrap();
    assert_eq!(
        status.observed_generation,
        Some(2),
        "the device ran the new spec"
    );
    let app_after = &status.container_statuses.as_ref().unwrap()[0];
    assert_eq!(
        app_after.container_id, app_before.container_id,
        "app untouched"
    );
    assert_eq!(app_after.restart_count, 0);
    assert_eq!(
        serde_json::to_value(&app_after.state).unwrap(),
        serde_json::to_value(&app_before.state).unwrap(),
        "app still in the same run"
    );
    let dbg = ephemeral_status(&with_debugger, "debugger").unwrap();
    assert_eq!(dbg["ready"], false);
    assert!(
        dbg["containerID"]
            .as_str()
            .is_some_and(|c| c.starts_with("podman://")),
        "{dbg}"
    );

    // exec and logs reach it through the hub; it sees the target's processes.
    let (ok, out, err) = kubectl(&[
        "-n",
        &ns,
        "exec",
        "target",
        "-c",
        "debugger",
        "--",
        "sh",
        "-c",
        "echo marco; ps | grep -v grep | grep -c 'sleep 3600'",
    ]);
    assert!(ok, "kubectl exec: {out} {err}");
    assert_eq!(out, "marco\n1\n", "{err}");
    let logs = wait_for("debugger logs", 30, || async {
        let (ok, out, _) = kubectl(&["-n", &ns, "logs", "target", "-c", "debugger"]);
        (ok && out.contains("polo")).then_some(out)
    })
    .await;
    assert!(logs.lines().all(|l| l == "polo"), "{logs:?}");

    // `kubectl debug -it`: a terminal, stdin, attached through the hub. `script` gives kubectl
    // a terminal; the shell's answer and its exit come back.
    let command = format!(
        "{} --kubeconfig {} -n {ns} debug -it target --image {} -c shell --profile general -- sh",
        kubectl_path(),
        kube_config_path().display(),
        image()
    );
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script");
    let mut stdin = child.stdin.take().expect("stdin");
    // Typed once the session is attached (kubectl prints its hint first).
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(8));
        let _ = stdin.write_all(b"echo marco-$((6*7)); exit 5\n");
        let _ = stdin.flush();
        std::thread::sleep(Duration::from_secs(60));
    });
    let (code, out, err) = wait_output(child, Duration::from_secs(90));
    println!("kubectl debug -it: exit {code:?}, output {out:?}, stderr {err:?}");
    assert!(out.contains("marco-42"), "{out:?} {err:?}");
    let shell_done = wait_for("shell terminated", 60, || async {
        let p = pods.get("target").await.ok()?;
        let s = ephemeral_status(&p, "shell")?;
        s["state"]["terminated"].is_object().then_some(s)
    })
    .await;
    assert_eq!(
        shell_done["state"]["terminated"]["exitCode"], 5,
        "{shell_done}"
    );
    assert_eq!(shell_done["restartCount"], 0);

    // Both reported, the ended one not restarted, the pod's own container still in its run.
    let p = pods.get("target").await.expect("pod");
    let names: Vec<String> = p
        .status
        .as_ref()
        .and_then(|s| s.ephemeral_container_statuses.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["debugger", "shell"]);
    let app_end = &p
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0];
    assert_eq!(app_end.container_id, app_before.container_id);
    assert_eq!(app_end.restart_count, 0);
    assert_eq!(p.status.as_ref().unwrap().phase.as_deref(), Some("Running"));
}
