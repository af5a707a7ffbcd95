//! In-place resize in the pod worker against the in-memory runtime: what is updated, what is
//! restarted, what the status says. The same paths run against the real Podman in
//! agent/tests/resize.rs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleetlet_proto::v1::PodBundle;
use k8s_openapi::api::core::v1::PodStatus;
use tokio::sync::watch;

use super::*;
use crate::pod::policy::DevicePolicy;
use crate::pod::resize::{PodAllocation, ResizeDesire};
use crate::podman::ResourceLimits;
use crate::podman::fake::FakeRuntime;
use crate::reconciler::plan_pod;

const IMAGE: &str = "localhost/test/busybox:1";

fn ctx(rt: &FakeRuntime, dir: &std::path::Path) -> Arc<PodContext<FakeRuntime>> {
    Arc::new(PodContext {
        rt: Arc::new(rt.clone()),
        device: "dev-resize".into(),
        state_dir: dir.to_owned(),
        host_ip: "192.0.2.10".into(),
        statuses: watch::Sender::new(Arc::new(BTreeMap::new())),
        restored_restarts: BTreeMap::new(),
        restored_resources: BTreeMap::new(),
        restored_start_times: BTreeMap::new(),
        policy: DevicePolicy::default(),
        allocatable: Resources {
            cpu_millis: 2000,
            memory_bytes: 2 << 30,
        },
        memory_capacity: 4 << 30,
        oom_score_floor: -1000,
        seccomp_root: dir.join("seccomp"),
        pulled_images: crate::pod::pulled_images::PulledImages::load(dir),
        reconcile_stats: Default::default(),
        events: Default::default(),
    })
}

fn bundle(generation: i64, resources: serde_json::Value, policy: serde_json::Value) -> PodBundle {
    PodBundle {
        pod_json: serde_json::to_vec(&serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "uid": "uid-r", "generation": generation},
            "spec": {"containers": [{"name": "c1", "image": IMAGE, "command": ["sleep", "1d"],
                "resources": resources, "resizePolicy": policy}]}
        }))
        .unwrap()
        .into(),
        ..Default::default()
    }
}

/// What the reconciler hands over when it allocates the bundle's resources.
fn allocated(b: &PodBundle) -> (Planned, Arc<ResizeDesire>) {
    let planned = plan_pod(&b.pod_json, &DevicePolicy::default());
    let plan = planned.clone().unwrap();
    let allocation = PodAllocation {
        containers: plan
            .all_containers()
            .map(|c| (c.name.clone(), c.resources.clone()))
            .collect(),
        requests: plan.requests,
        generation: plan.meta.generation,
    };
    (
        planned,
        Arc::new(ResizeDesire {
            allocation,
            pending: None,
        }),
    )
}

async fn pass(w: &mut PodWorker<FakeRuntime>, b: &PodBundle, n: usize) -> PodStatus {
    let (planned, resize) = allocated(b);
    w.resize = resize;
    for _ in 0..n {
        w.reconcile(b, &planned, Ok(())).await;
    }
    let map = w.ctx.statuses.borrow().clone();
    serde_json::from_slice(&map["uid-r"].status_json).unwrap()
}

fn res(cpu: &str, mem: &str) -> serde_json::Value {
    serde_json::json!({"requests": {"cpu": cpu, "memory": mem}, "limits": {"cpu": cpu, "memory": mem}})
}

fn resize_conditions(st: &PodStatus) -> Vec<String> {
    st.conditions
        .iter()
        .flatten()
        .filter(|c| c.type_.starts_with("PodResize"))
        .map(|c| format!("{}:{}", c.type_, c.reason.clone().unwrap_or_default()))
        .collect()
}

fn reported(st: &PodStatus) -> (serde_json::Value, serde_json::Value, i32) {
    let c = &st.container_statuses.as_ref().unwrap()[0];
    (
        serde_json::to_value(&c.resources).unwrap(),
        serde_json::to_value(&c.allocated_resources).unwrap(),
        c.restart_count,
    )
}

/// The CFS quota of cgroup limits.
fn quota(l: &ResourceLimits) -> Option<i64> {
    l.cpu.as_ref().and_then(|c| c.quota)
}

/// Reasons of the Events recorded so far (taken from the recorder).
/// The id of the pod's one app container in the fake runtime.
async fn app_container_id(rt: &FakeRuntime) -> String {
    let s = rt.state.lock().await;
    s.containers.values().find(|c| !c.infra).unwrap().id.clone()
}

fn event_reasons(w: &PodWorker<FakeRuntime>) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(b) = w.ctx.events.take_batch() {
        out.extend(b.events.iter().map(|e| e.reason.clone()));
        w.ctx.events.ack(b.epoch, b.seq);
    }
    out
}

#[tokio::test]
async fn a_resize_is_applied_in_place_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::with_image(IMAGE, "").await;
    let mut w = PodWorker::new(ctx(&rt, dir.path()), "uid-r".into());
    let st = pass(
        &mut w,
        &bundle(1, res("20m", "35Mi"), serde_json::json!([])),
        3,
    )
    .await;
    assert_eq!(st.phase.as_deref(), Some("Running"), "{st:?}");
    let created = rt.spec_of("c1").await.unwrap().resource_limits.unwrap();
    assert_eq!(
        quota(&created),
        Some(2000),
        "20m limit: quota 2000 per 100ms"
    );
    assert_eq!(created.cpu.as_ref().unwrap().shares, Some(20));
    assert_eq!(created.memory.as_ref().unwrap().limit, 35 << 20);
    let (resources, allocated_res, restarts) = reported(&st);
    assert_eq!(
        resources,
        serde_json::json!({"limits": {"cpu": "20m", "memory": "35Mi"}, "requests": {"cpu": "20m", "memory": "35Mi"}})
    );
    assert_eq!(
        allocated_res,
        serde_json::json!({"cpu": "20m", "memory": "35Mi"})
    );
    assert_eq!(restarts, 0);
    assert!(resize_conditions(&st).is_empty());
    let id = app_container_id(&rt).await;

    // Up: the running container is updated, not recreated; the first status of generation 2
    // already shows it done.
    let st = pass(
        &mut w,
        &bundle(2, res("25m", "40Mi"), serde_json::json!([])),
        1,
    )
    .await;
    assert_eq!(st.observed_generation, Some(2));
    let updates = rt.state.lock().await.updates.clone();
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert_eq!(updates[0].0, id, "the same container");
    assert_eq!(quota(&updates[0].1), Some(2500));
    assert_eq!(updates[0].1.memory.as_ref().unwrap().limit, 40 << 20);
    let (resources, _, restarts) = reported(&st);
    assert_eq!(resources["limits"]["cpu"], "25m");
    assert_eq!(resources["requests"]["memory"], "40Mi");
    assert_eq!(restarts, 0);
    assert!(resize_conditions(&st).is_empty(), "{:?}", st.conditions);
    // Nothing more to do: later passes do not update again.
    pass(
        &mut w,
        &bundle(2, res("25m", "40Mi"), serde_json::json!([])),
        2,
    )
    .await;
    assert_eq!(rt.state.lock().await.updates.len(), 1);
    assert!(rt.state.lock().await.containers.contains_key(&id));
    // A resize makes the kubelet's Events: started, completed.
    let events = event_reasons(&w);
    assert!(events.iter().any(|r| r == "ResizeStarted"), "{events:?}");
    assert!(events.iter().any(|r| r == "ResizeCompleted"), "{events:?}");
}

#[tokio::test]
async fn a_memory_limit_below_usage_waits_with_the_kubelets_error() {
    let dir = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::with_image(IMAGE, "").await;
    let mut w = PodWorker::new(ctx(&rt, dir.path()), "uid-r".into());
    pass(
        &mut w,
        &bundle(1, res("20m", "45Mi"), serde_json::json!([])),
        3,
    )
    .await;
    let id = app_container_id(&rt).await;
    rt.state.lock().await.stats.insert(
        id.clone(),
        crate::podman::ContainerStats {
            id: id.clone(),
            cpu_nanos: 0,
            mem_usage: 42 << 20,
        },
    );
    let st = pass(
        &mut w,
        &bundle(2, res("20m", "40Mi"), serde_json::json!([])),
        1,
    )
    .await;
    assert!(rt.state.lock().await.updates.is_empty());
    let c = st
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodResizeInProgress")
        .expect("in progress");
    assert_eq!(c.reason.as_deref(), Some("Error"));
    assert_eq!(
        c.message.as_deref(),
        Some(
            "cannot decrease memory limits: attempting to set container \"c1\" memory limit (41943040) below current usage (44040192)"
        )
    );
    assert_eq!(c.observed_generation, Some(2));
    // Still the old limit in the status until it is applied.
    assert_eq!(reported(&st).0["limits"]["memory"], "45Mi");
    // Usage drops: the next pass applies it and the condition goes.
    rt.state.lock().await.stats.get_mut(&id).unwrap().mem_usage = 10 << 20;
    let st = pass(
        &mut w,
        &bundle(2, res("20m", "40Mi"), serde_json::json!([])),
        1,
    )
    .await;
    assert_eq!(rt.state.lock().await.updates.len(), 1);
    assert!(resize_conditions(&st).is_empty(), "{:?}", st.conditions);
    assert_eq!(reported(&st).0["limits"]["memory"], "40Mi");
}

#[tokio::test]
async fn restart_container_policy_restarts_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::with_image(IMAGE, "").await;
    let mut w = PodWorker::new(ctx(&rt, dir.path()), "uid-r".into());
    let policy =
        serde_json::json!([{"resourceName": "memory", "restartPolicy": "RestartContainer"}]);
    pass(&mut w, &bundle(1, res("20m", "35Mi"), policy.clone()), 3).await;
    let first = app_container_id(&rt).await;
    // CPU only: in place.
    let st = pass(&mut w, &bundle(2, res("25m", "35Mi"), policy.clone()), 2).await;
    assert_eq!(reported(&st).2, 0);
    assert_eq!(rt.state.lock().await.updates.len(), 1);
    // Memory: restarted with the new limit, one restart counted.
    let st = pass(&mut w, &bundle(3, res("25m", "40Mi"), policy.clone()), 3).await;
    let s = rt.state.lock().await;
    assert!(
        !s.containers.contains_key(&first),
        "the old container is gone"
    );
    let c = s.containers.values().find(|c| !c.infra).unwrap();
    assert_eq!(c.state, "running");
    let created = c.spec.resource_limits.clone().unwrap();
    assert_eq!(created.memory.as_ref().unwrap().limit, 40 << 20);
    assert_eq!(quota(&created), Some(2500));
    assert_eq!(s.updates.len(), 1, "not updated in place");
    drop(s);
    let (resources, _, restarts) = reported(&st);
    assert_eq!(restarts, 1);
    assert_eq!(resources["limits"]["memory"], "40Mi");
    assert!(resize_conditions(&st).is_empty(), "{:?}", st.conditions);
    assert_eq!(st.phase.as_deref(), Some("Running"));
}

#[tokio::test]
async fn a_pending_resize_keeps_the_allocation_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::with_image(IMAGE, "").await;
    let mut w = PodWorker::new(ctx(&rt, dir.path()), "uid-r".into());
    let b1 = bundle(1, res("20m", "35Mi"), serde_json::json!([]));
    pass(&mut w, &b1, 3).await;
    // The reconciler could not allocate generation 2: the allocation stays generation 1's.
    let b2 = bundle(2, res("3", "35Mi"), serde_json::json!([]));
    let (_, keep) = allocated(&b1);
    w.resize = Arc::new(ResizeDesire {
        allocation: keep.allocation.clone(),
        pending: Some(crate::pod::resize::Pending {
            reason: "Deferred".into(),
            message:
                "Node didn't have enough resource: cpu, requested: 3000, used: 0, capacity: 2000"
                    .into(),
            generation: 2,
        }),
    });
    let planned = plan_pod(&b2.pod_json, &DevicePolicy::default());
    w.reconcile(&b2, &planned, Ok(())).await;
    let map = w.ctx.statuses.borrow().clone();
    let st: PodStatus = serde_json::from_slice(&map["uid-r"].status_json).unwrap();
    assert_eq!(resize_conditions(&st), vec!["PodResizePending:Deferred"]);
    assert!(rt.state.lock().await.updates.is_empty());
    assert_eq!(reported(&st).0["limits"]["cpu"], "20m");
    assert_eq!(
        reported(&st).1["cpu"],
        "20m",
        "allocatedResources stay the allocation"
    );
    assert!(event_reasons(&w).iter().any(|r| r == "ResizeDeferred"));
}

#[tokio::test(start_paused = true)]
async fn a_resized_container_that_crashes_is_made_anew_with_its_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::with_image(IMAGE, "").await;
    let mut w = PodWorker::new(ctx(&rt, dir.path()), "uid-r".into());
    pass(
        &mut w,
        &bundle(1, res("20m", "35Mi"), serde_json::json!([])),
        3,
    )
    .await;
    let b2 = bundle(2, res("25m", "40Mi"), serde_json::json!([]));
    pass(&mut w, &b2, 1).await;
    assert_eq!(rt.state.lock().await.updates.len(), 1);
    let first = app_container_id(&rt).await;
    // It crashes; after the back-off a start in place would bring back the creation values
    // (35Mi), so it is made anew with the allocation instead.
    rt.exit("c1", 1).await;
    pass(&mut w, &b2, 1).await;
    tokio::time::advance(Duration::from_secs(11)).await;
    let st = pass(&mut w, &b2, 2).await;
    let s = rt.state.lock().await;
    assert!(!s.containers.contains_key(&first));
    let c = s.containers.values().find(|c| !c.infra).unwrap();
    assert_eq!(c.state, "running");
    let limits = c.spec.resource_limits.clone().unwrap();
    assert_eq!(limits.memory.unwrap().limit, 40 << 20);
    drop(s);
    assert_eq!(reported(&st).2, 1, "one restart, the crash's");
    assert_eq!(reported(&st).0["limits"]["memory"], "40Mi");
    assert!(resize_conditions(&st).is_empty(), "{:?}", st.conditions);
}
