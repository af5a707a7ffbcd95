//! In-place pod resize against the real Podman of the local stack (`make env-up`): the
//! `fleetlet-agent` binary runs offline from a desired file whose pod's resources change; the
//! cgroup values are read inside the container, as the Kubernetes e2e tests read them.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{Agent, IMAGE, container_ids, pod, podman};

/// A pod bundle at `generation` whose one container `c1` has `resources` and `resize_policy`.
fn resized(
    uid: &str,
    generation: i64,
    resources: serde_json::Value,
    policy: serde_json::Value,
) -> serde_json::Value {
    json!({
        "pod": {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "resize", "namespace": "test", "uid": uid, "generation": generation},
            "spec": {"hostNetwork": true, "terminationGracePeriodSeconds": 1, "containers": [{
                "name": "c1", "image": IMAGE,
                "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
                "resources": resources, "resizePolicy": policy}]}
        }
    })
}

fn guaranteed(cpu: &str, mem: &str) -> serde_json::Value {
    json!({"requests": {"cpu": cpu, "memory": mem}, "limits": {"cpu": cpu, "memory": mem}})
}

/// True when container `id`'s cgroup holds CFS quota `quota` (µs per 100 ms; -1: none), memory
/// limit `mem` (bytes) and, on cgroup v1, cpu.shares `shares` (cgroup v2 has no exact inverse
/// of the weight conversion, which changed between runtime versions).
async fn cgroup_is(id: &str, quota: i64, mem: u64, shares: u64) -> bool {
    let v2_quota = if quota < 0 {
        "max".to_owned()
    } else {
        quota.to_string()
    };
    let script = format!(
        "if [ -f /sys/fs/cgroup/cpu.max ]; then \
           [ \"$(cat /sys/fs/cgroup/cpu.max)\" = \"{v2_quota} 100000\" ] && \
           [ \"$(cat /sys/fs/cgroup/memory.max)\" = \"{mem}\" ]; \
         else \
           [ \"$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)\" = \"{quota}\" ] && \
           [ \"$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)\" = \"{mem}\" ] && \
           [ \"$(cat /sys/fs/cgroup/cpu/cpu.shares)\" = \"{shares}\" ]; \
         fi"
    );
    podman()
        .exec(
            id,
            &["sh".into(), "-c".into(), script],
            Duration::from_secs(10),
        )
        .await
        .is_ok_and(|code| code == 0)
}

/// Waits (bounded) until the container's cgroup holds the values.
async fn wait_cgroup(a: &Agent, id: &str, quota: i64, mem: u64, shares: u64) {
    for _ in 0..100 {
        if cgroup_is(id, quota, mem, shares).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "container {id}: cgroup never held quota {quota}, memory {mem}, shares {shares}\n{}",
        a.logs()
    );
}

/// `containerStatuses[0]` of the pod as the status file has it.
fn c1(a: &Agent, uid: &str) -> serde_json::Value {
    let s = a.status().expect("a status file");
    pod(&s, uid).expect("the pod's status").status["containerStatuses"][0].clone()
}

fn resize_conditions(s: &fleetlet_agent::statusfile::StatusFile, uid: &str) -> usize {
    pod(s, uid)
        .and_then(|p| p.status["conditions"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|c| {
            c["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("PodResize"))
        })
        .count()
}

#[tokio::test]
async fn resizes_a_running_container_in_place_up_and_down_and_keeps_it_across_an_agent_restart() {
    let mut a = Agent::new("t-resize");
    let uid = "uid-resize-1";
    let none = json!([]);
    a.set_desired(
        1,
        vec![resized(uid, 1, guaranteed("20m", "35Mi"), none.clone())],
    );
    a.start();
    a.wait_status("pod running", Duration::from_secs(60), |s| {
        pod(s, uid).is_some_and(|p| p.phase == "Running" && p.ready == 1)
    })
    .await;
    let id = container_ids("t-resize", uid).await["c1"].clone();
    // Created with the kubelet's values: 20m → quota 2000, shares 20.
    wait_cgroup(&a, &id, 2000, 35 << 20, 20).await;
    assert_eq!(
        c1(&a, uid)["resources"],
        json!({"limits": {"cpu": "20m", "memory": "35Mi"}, "requests": {"cpu": "20m", "memory": "35Mi"}})
    );
    assert_eq!(
        c1(&a, uid)["allocatedResources"],
        json!({"cpu": "20m", "memory": "35Mi"})
    );

    // Up.
    a.set_desired(
        2,
        vec![resized(uid, 2, guaranteed("35m", "50Mi"), none.clone())],
    );
    a.reload();
    a.wait_status("resized up", Duration::from_secs(30), |s| {
        pod(s, uid).is_some_and(|p| {
            p.status["observedGeneration"] == 2
                && p.status["containerStatuses"][0]["resources"]["limits"]["memory"] == "50Mi"
        }) && resize_conditions(s, uid) == 0
    })
    .await;
    wait_cgroup(&a, &id, 3500, 50 << 20, 35).await;
    // Down, below the start.
    a.set_desired(
        3,
        vec![resized(uid, 3, guaranteed("15m", "30Mi"), none.clone())],
    );
    a.reload();
    a.wait_status("resized down", Duration::from_secs(30), |s| {
        pod(s, uid).is_some_and(|p| {
            p.status["observedGeneration"] == 3
                && p.status["containerStatuses"][0]["resources"]["limits"]["cpu"] == "15m"
        }) && resize_conditions(s, uid) == 0
    })
    .await;
    wait_cgroup(&a, &id, 1500, 30 << 20, 15).await;
    assert_eq!(
        c1(&a, uid)["allocatedResources"],
        json!({"cpu": "15m", "memory": "30Mi"})
    );
    assert_eq!(c1(&a, uid)["restartCount"], 0);
    assert_eq!(
        container_ids("t-resize", uid).await["c1"],
        id,
        "resized in place: the same container"
    );
    let started = podman()
        .inspect_container(&id)
        .await
        .unwrap()
        .unwrap()
        .state
        .started_at;
    let updates_before = a.logs().matches("container resized in place").count();
    assert_eq!(updates_before, 2, "{}", a.logs());

    // An agent restart: the container keeps its resized cgroup (Podman's inspect still shows the
    // creation values), the status still reports them, and nothing is applied again.
    assert!(a.stop().success());
    a.start();
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.wait_status("running after restart", Duration::from_secs(30), |s| {
        pod(s, uid).is_some_and(|p| p.phase == "Running" && p.ready == 1)
    })
    .await;
    // A few resync passes (5 s each).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        a.logs().matches("container resized in place").count(),
        updates_before,
        "no update after the restart\n{}",
        a.logs()
    );
    assert!(cgroup_is(&id, 1500, 30 << 20, 15).await);
    assert_eq!(
        c1(&a, uid)["resources"]["limits"],
        json!({"cpu": "15m", "memory": "30Mi"})
    );
    let after = podman().inspect_container(&id).await.unwrap().unwrap();
    assert_eq!(after.state.started_at, started, "not restarted");
    assert_eq!(resize_conditions(&a.status().unwrap(), uid), 0);
}

#[tokio::test]
async fn restart_container_policy_restarts_on_a_memory_resize_only() {
    let mut a = Agent::new("t-resize-rs");
    let uid = "uid-resize-2";
    let policy = json!([{"resourceName": "memory", "restartPolicy": "RestartContainer"}]);
    a.set_desired(
        1,
        vec![resized(uid, 1, guaranteed("20m", "35Mi"), policy.clone())],
    );
    a.start();
    a.wait_status("pod running", Duration::from_secs(60), |s| {
        pod(s, uid).is_some_and(|p| p.phase == "Running" && p.ready == 1)
    })
    .await;
    let first = container_ids("t-resize-rs", uid).await["c1"].clone();
    // CPU: NotRequired, in place.
    a.set_desired(
        2,
        vec![resized(uid, 2, guaranteed("25m", "35Mi"), policy.clone())],
    );
    a.reload();
    wait_cgroup(&a, &first, 2500, 35 << 20, 25).await;
    assert_eq!(c1(&a, uid)["restartCount"], 0);
    assert_eq!(container_ids("t-resize-rs", uid).await["c1"], first);
    // Memory: RestartContainer.
    a.set_desired(3, vec![resized(uid, 3, guaranteed("25m", "45Mi"), policy)]);
    a.reload();
    a.wait_status(
        "restarted with the new memory",
        Duration::from_secs(60),
        |s| {
            pod(s, uid).is_some_and(|p| {
                p.restarts.get("c1") == Some(&1)
                    && p.ready == 1
                    && p.status["containerStatuses"][0]["resources"]["limits"]["memory"] == "45Mi"
            }) && resize_conditions(s, uid) == 0
        },
    )
    .await;
    let second = container_ids("t-resize-rs", uid).await["c1"].clone();
    assert_ne!(second, first, "the container was made anew");
    wait_cgroup(&a, &second, 2500, 45 << 20, 25).await;
    assert_eq!(
        c1(&a, uid)["lastState"]["terminated"]["containerID"],
        format!("podman://{first}")
    );
}
