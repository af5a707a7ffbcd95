//! The pod worker against the in-memory runtime: what each pod field becomes in the container
//! spec, and what the pod's status says when the agent refuses. The same paths run against the
//! real Podman in agent/tests/sandbox.rs.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleetlet_proto::v1::{ConfigMapData, PodBundle};
use k8s_openapi::api::core::v1::PodStatus;
use tokio::sync::watch;

use super::*;
use crate::pod::policy::DevicePolicy;
use crate::podman::fake::FakeRuntime;
use crate::reconciler::plan_pod;

const IMAGE: &str = "localhost/test/busybox:1";

struct Rig {
    _dir: tempfile::TempDir,
    rt: FakeRuntime,
    ctx: Arc<PodContext<FakeRuntime>>,
}

async fn rig(image_user: &str, policy: DevicePolicy) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let rt = FakeRuntime::with_image(IMAGE, image_user).await;
    let ctx = Arc::new(PodContext {
        rt: Arc::new(rt.clone()),
        device: "dev-unit".into(),
        state_dir: dir.path().to_owned(),
        host_ip: "192.0.2.10".into(),
        statuses: watch::Sender::new(Arc::new(BTreeMap::new())),
        restored_restarts: BTreeMap::new(),
        restored_resources: BTreeMap::new(),
        restored_start_times: BTreeMap::new(),
        policy,
        allocatable: Resources {
            cpu_millis: 2000,
            memory_bytes: 2 << 30,
        },
        memory_capacity: 4 << 30,
        oom_score_floor: -1000,
        seccomp_root: dir.path().join("seccomp"),
        pulled_images: crate::pod::pulled_images::PulledImages::load(dir.path()),
        reconcile_stats: Default::default(),
        events: Default::default(),
    });
    Rig { _dir: dir, rt, ctx }
}

fn bundle(spec: serde_json::Value) -> PodBundle {
    PodBundle {
        pod_json: serde_json::to_vec(&serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "uid": "uid-1"},
            "spec": spec
        }))
        .unwrap()
        .into(),
        config_maps: vec![ConfigMapData {
            name: "cm".into(),
            data: [("k".to_string(), "v".to_string())].into(),
            binary_data: Default::default(),
        }],
        secrets: vec![],
        service_env: Default::default(),
    }
}

/// Run worker passes for `b` (as the reconciler would hand it over) and return the status.
async fn run(r: &Rig, b: &PodBundle) -> PodStatus {
    let planned = plan_pod(&b.pod_json, &r.ctx.policy);
    let mut w = PodWorker::new(r.ctx.clone(), "uid-1".into());
    for _ in 0..3 {
        w.reconcile(b, &planned, Ok(())).await;
    }
    let map = r.ctx.statuses.borrow().clone();
    serde_json::from_slice(&map["uid-1"].status_json).unwrap()
}

fn waiting(st: &PodStatus) -> (String, String) {
    let w = st.container_statuses.as_ref().unwrap()[0]
        .state
        .as_ref()
        .unwrap()
        .waiting
        .clone()
        .unwrap();
    (w.reason.unwrap_or_default(), w.message.unwrap_or_default())
}

#[tokio::test]
async fn restricted_pod_runs_as_asked() {
    let r = rig("", DevicePolicy::default()).await;
    let st = run(
        &r,
        &bundle(serde_json::json!({
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 3000,
                "fsGroup": 2000, "seccompProfile": {"type": "RuntimeDefault"}},
            "volumes": [{"name": "cfg", "configMap": {"name": "cm"}}],
            "containers": [{"name": "app", "image": IMAGE,
                "volumeMounts": [{"name": "cfg", "mountPath": "/cfg", "readOnly": false}],
                "securityContext": {"allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}}}]
        })),
    )
    .await;
    assert_eq!(st.phase.as_deref(), Some("Running"), "{st:?}");
    let spec = r.rt.spec_of("app").await.unwrap();
    assert_eq!(spec.user.as_deref(), Some("1000:3000"));
    assert_eq!(spec.groups, vec!["2000"]);
    assert_eq!(spec.cap_drop, vec!["ALL"]);
    assert!(spec.cap_add.is_empty());
    assert!(spec.no_new_privileges && spec.read_only_filesystem && !spec.privileged);
    assert_eq!(spec.mounts[0].destination, "/cfg");
    assert!(
        spec.mounts[0].options.contains(&"ro".to_owned()),
        "configMap mounts are read-only whatever readOnly says"
    );
}

#[tokio::test]
async fn run_as_non_root_with_a_root_image_is_a_config_error() {
    let r = rig("", DevicePolicy::default()).await;
    let st = run(
        &r,
        &bundle(serde_json::json!({
            "securityContext": {"runAsNonRoot": true},
            "containers": [{"name": "app", "image": IMAGE}]
        })),
    )
    .await;
    let (reason, message) = waiting(&st);
    assert_eq!(reason, "CreateContainerConfigError");
    assert!(message.contains("image will run as root"), "{message}");
    assert!(r.rt.spec_of("app").await.is_none(), "nothing created");
}

#[tokio::test]
async fn a_subpath_out_of_its_volume_never_mounts() {
    let r = rig("", DevicePolicy::default()).await;
    // What an init container would have left in the emptyDir.
    let vol = volumes::volume_dir(&r.ctx.state_dir, "uid-1", "data");
    std::fs::create_dir_all(&vol).unwrap();
    std::os::unix::fs::symlink("/", vol.join("escape")).unwrap();
    let st = run(
        &r,
        &bundle(serde_json::json!({
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [{"name": "app", "image": IMAGE,
                "volumeMounts": [{"name": "data", "mountPath": "/host", "subPath": "escape/etc"}]}]
        })),
    )
    .await;
    let (reason, message) = waiting(&st);
    assert_eq!(reason, "CreateContainerConfigError");
    assert!(
        message.contains("failed to prepare subPath for volumeMount \"data\" of container \"app\""),
        "{message}"
    );
    assert!(message.contains("resolves outside"), "{message}");
    assert!(r.rt.spec_of("app").await.is_none(), "nothing created");
}

#[tokio::test]
async fn device_policy_and_unsupported_fields_fail_the_pod_by_name() {
    let strict = DevicePolicy {
        allow_privileged: false,
        ..DevicePolicy::default()
    };
    let r = rig("", strict).await;
    let st = run(
        &r,
        &bundle(serde_json::json!({
            "containers": [{"name": "app", "image": IMAGE,
                "securityContext": {"privileged": true}}]
        })),
    )
    .await;
    assert_eq!(st.phase.as_deref(), Some("Failed"));
    assert_eq!(st.reason.as_deref(), Some("DevicePolicy"));
    assert!(st.message.unwrap().contains("allow_privileged = false"));
    assert!(r.rt.state.lock().await.pods.is_empty(), "nothing created");

    let r = rig("", DevicePolicy::default()).await;
    let st = run(
        &r,
        &bundle(serde_json::json!({
            "volumes": [{"name": "t", "projected": {"sources": [
                {"serviceAccountToken": {"path": "token"}}]}}],
            "containers": [{"name": "app", "image": IMAGE}]
        })),
    )
    .await;
    assert_eq!(st.reason.as_deref(), Some("UnsupportedPodSpec"));
    assert!(
        st.message
            .unwrap()
            .starts_with("spec.volumes[0].projected.sources[0].serviceAccountToken")
    );
}

#[tokio::test]
async fn privileged_runs_privileged_and_sysctls_reach_the_container() {
    let r = rig("", DevicePolicy::default()).await;
    let st = run(
        &r,
        &bundle(serde_json::json!({
            "securityContext": {"sysctls": [{"name": "net.ipv4.tcp_syncookies", "value": "0"}]},
            "containers": [{"name": "app", "image": IMAGE,
                "securityContext": {"privileged": true, "capabilities": {"drop": ["ALL"]}}}]
        })),
    )
    .await;
    assert_eq!(st.phase.as_deref(), Some("Running"));
    let spec = r.rt.spec_of("app").await.unwrap();
    assert!(spec.privileged);
    assert!(spec.cap_drop.is_empty(), "privileged has every capability");
    assert_eq!(spec.seccomp_profile_path, "unconfined");
    assert_eq!(spec.sysctl["net.ipv4.tcp_syncookies"], "0");
}

#[tokio::test]
async fn downward_env_and_resource_refs() {
    let r = rig("1000", DevicePolicy::default()).await;
    run(
        &r,
        &bundle(serde_json::json!({
            "serviceAccountName": "sa",
            "containers": [{"name": "app", "image": IMAGE,
                "resources": {"limits": {"memory": "64Mi"}},
                "env": [
                    {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                    {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                    {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}}]}]
        })),
    )
    .await;
    let spec = r.rt.spec_of("app").await.unwrap();
    assert_eq!(spec.env["MEM"], "64");
    assert_eq!(spec.env["CPU"], "2", "no CPU limit: the node's allocatable");
    assert_eq!(spec.env["SA"], "sa");
}

#[tokio::test]
async fn service_variables_sit_under_the_containers_own() {
    let r = rig("", DevicePolicy::default()).await;
    let mut b = bundle(serde_json::json!({
        "containers": [{"name": "app", "image": IMAGE,
            "env": [
                {"name": "DB_SERVICE_PORT", "value": "override"},
                {"name": "URL", "value": "http://$(DB_SERVICE_HOST):$(DB_SERVICE_PORT)"}]}]
    }));
    b.service_env = [
        ("DB_SERVICE_HOST".to_string(), "10.0.0.7".to_string()),
        ("DB_SERVICE_PORT".to_string(), "5432".to_string()),
        (
            "KUBERNETES_SERVICE_HOST".to_string(),
            "10.0.0.1".to_string(),
        ),
    ]
    .into();
    run(&r, &b).await;
    let spec = r.rt.spec_of("app").await.unwrap();
    assert_eq!(spec.env["KUBERNETES_SERVICE_HOST"], "10.0.0.1");
    assert_eq!(spec.env["DB_SERVICE_HOST"], "10.0.0.7");
    assert_eq!(
        spec.env["DB_SERVICE_PORT"], "override",
        "the container's own win"
    );
    assert_eq!(
        spec.env["URL"], "http://10.0.0.7:override",
        "$(VAR) sees Service variables and earlier entries"
    );
}

#[tokio::test(start_paused = true)]
async fn an_empty_dir_over_its_size_limit_evicts_the_pod() {
    let r = rig("", DevicePolicy::default()).await;
    let b = bundle(serde_json::json!({
        "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "64Ki"}}],
        "containers": [{"name": "app", "image": IMAGE,
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}]
    }));
    let st = run(&r, &b).await;
    assert_eq!(st.phase.as_deref(), Some("Running"));
    // The container fills the volume.
    let vol = volumes::volume_dir(&r.ctx.state_dir, "uid-1", "scratch");
    std::fs::write(vol.join("fill"), vec![7u8; 256 << 10]).unwrap();
    let planned = plan_pod(&b.pod_json, &r.ctx.policy);
    let mut w = PodWorker::new(r.ctx.clone(), "uid-1".into());
    w.reconcile(&b, &planned, Ok(())).await;
    tokio::time::advance(std::time::Duration::from_secs(11)).await;
    w.reconcile(&b, &planned, Ok(())).await;
    let map = r.ctx.statuses.borrow().clone();
    let st: PodStatus = serde_json::from_slice(&map["uid-1"].status_json).unwrap();
    assert_eq!(st.phase.as_deref(), Some("Failed"));
    assert_eq!(st.reason.as_deref(), Some("Evicted"));
    assert_eq!(
        st.message.as_deref(),
        Some("Usage of EmptyDir volume \"scratch\" exceeds the limit \"65536\". ")
    );
    let s = r.rt.state.lock().await;
    assert!(
        s.containers
            .values()
            .all(|c| c.infra || c.state != "running"),
        "every container stopped"
    );
}

#[tokio::test]
async fn the_termination_message_is_what_the_container_wrote() {
    let r = rig("", DevicePolicy::default()).await;
    let b = bundle(serde_json::json!({
        "restartPolicy": "Never",
        "containers": [{"name": "app", "image": IMAGE}]
    }));
    let st = run(&r, &b).await;
    assert_eq!(st.phase.as_deref(), Some("Running"));
    let spec = r.rt.spec_of("app").await.unwrap();
    let log = spec
        .mounts
        .iter()
        .find(|m| m.destination == "/dev/termination-log")
        .expect("termination log mounted");
    std::fs::write(&log.source, "disk full").unwrap();
    r.rt.exit("app", 3).await;
    let st = run(&r, &b).await;
    let t = st.container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!((t.exit_code, t.message.as_deref()), (3, Some("disk full")));
}

#[tokio::test]
async fn active_deadline_fails_the_pod_like_the_kubelet() {
    let mut r = rig("", DevicePolicy::default()).await;
    Arc::get_mut(&mut r.ctx)
        .unwrap()
        .restored_start_times
        .insert(
            "uid-1".into(),
            jiff::Timestamp::now() - jiff::SignedDuration::from_secs(120),
        );
    let st = run(
        &r,
        &bundle(serde_json::json!({
            "activeDeadlineSeconds": 60,
            "containers": [{"name": "app", "image": IMAGE}]
        })),
    )
    .await;
    assert_eq!(st.phase.as_deref(), Some("Failed"));
    assert_eq!(st.reason.as_deref(), Some("DeadlineExceeded"));
    assert_eq!(
        st.message.as_deref(),
        Some("Pod was active on the node longer than the specified deadline")
    );
}

#[tokio::test]
async fn an_image_change_is_a_restart_with_the_last_state() {
    let r = rig("", DevicePolicy::default()).await;
    r.rt.state
        .lock()
        .await
        .images
        .insert("localhost/test/busybox:2".into(), String::new());
    let planned_for =
        |image: &str| bundle(serde_json::json!({"containers": [{"name": "app", "image": image}]}));
    let one = planned_for(IMAGE);
    let two = planned_for("localhost/test/busybox:2");
    let mut w = PodWorker::new(r.ctx.clone(), "uid-1".into());
    for b in [&one, &one, &two, &two, &two] {
        let planned = plan_pod(&b.pod_json, &r.ctx.policy);
        w.reconcile(b, &planned, Ok(())).await;
    }
    let map = r.ctx.statuses.borrow().clone();
    let st: PodStatus = serde_json::from_slice(&map["uid-1"].status_json).unwrap();
    let cs = &st.container_statuses.unwrap()[0];
    assert_eq!(cs.restart_count, 1);
    assert_eq!(cs.image, "localhost/test/busybox:2");
    assert!(cs.state.as_ref().unwrap().running.is_some());
    let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(last.exit_code, 137);
}

#[tokio::test]
async fn sidecars_start_in_order_keep_running_and_end_with_the_pod() {
    let r = rig("", DevicePolicy::default()).await;
    let b = bundle(serde_json::json!({
        "restartPolicy": "Never",
        "initContainers": [
            {"name": "side", "image": IMAGE, "restartPolicy": "Always"},
            {"name": "setup", "image": IMAGE}],
        "containers": [{"name": "app", "image": IMAGE}]
    }));
    let planned = plan_pod(&b.pod_json, &r.ctx.policy);
    let mut w = PodWorker::new(r.ctx.clone(), "uid-1".into());
    let status = |r: &Rig| -> PodStatus {
        let map = r.ctx.statuses.borrow().clone();
        serde_json::from_slice(&map["uid-1"].status_json).unwrap()
    };
    for _ in 0..3 {
        w.reconcile(&b, &planned, Ok(())).await;
    }
    // The sidecar runs; the regular init container ran after it and now must finish.
    assert!(r.rt.spec_of("side").await.is_some());
    assert!(
        r.rt.spec_of("app").await.is_none(),
        "app waits for the init container"
    );
    r.rt.exit("setup", 0).await;
    for _ in 0..3 {
        w.reconcile(&b, &planned, Ok(())).await;
    }
    let st = status(&r);
    assert_eq!(st.phase.as_deref(), Some("Running"));
    let side = &st.init_container_statuses.as_ref().unwrap()[0];
    assert!(side.state.as_ref().unwrap().running.is_some(), "{side:?}");
    // A sidecar that exits is restarted even though the pod's policy is Never.
    r.rt.exit("side", 1).await;
    for _ in 0..3 {
        w.reconcile(&b, &planned, Ok(())).await;
    }
    let side = status(&r).init_container_statuses.unwrap()[0].clone();
    assert!(
        side.restart_count == 1
            || side
                .state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .is_some_and(|w| w.reason.as_deref() == Some("CrashLoopBackOff")),
        "{side:?}"
    );
    // The app finishes: the pod succeeds and its sidecar is stopped, not restarted.
    r.rt.exit("app", 0).await;
    for _ in 0..3 {
        w.reconcile(&b, &planned, Ok(())).await;
    }
    let st = status(&r);
    assert_eq!(
        st.phase.as_deref(),
        Some("Succeeded"),
        "{}",
        serde_json::to_string_pretty(&st).unwrap()
    );
}

/// What the worker records, in order, with the kubelet's reasons and fieldPaths.
fn recorded(r: &Rig) -> Vec<(String, String, String, String, u32)> {
    let mut out = Vec::new();
    while let Some(b) = r.ctx.events.take_batch() {
        for e in &b.events {
            out.push((
                e.r#type.clone(),
                e.reason.clone(),
                e.field_path.clone(),
                e.message.clone(),
                e.count,
            ));
        }
        r.ctx.events.ack(b.epoch, b.seq);
    }
    out
}

#[tokio::test]
async fn a_pod_start_and_a_refusal_record_the_kubelets_events() {
    let r = rig("", DevicePolicy::default()).await;
    let st = run(
        &r,
        &bundle(serde_json::json!({
            "initContainers": [{"name": "init", "image": IMAGE}],
            "containers": [{"name": "app", "image": IMAGE}]
        })),
    )
    .await;
    let events = recorded(&r);
    let reasons: Vec<(&str, &str)> = events
        .iter()
        .map(|(_, reason, path, _, _)| (reason.as_str(), path.as_str()))
        .collect();
    assert!(
        reasons.starts_with(&[
            ("Pulled", "spec.initContainers{init}"),
            ("Created", "spec.initContainers{init}"),
            ("Started", "spec.initContainers{init}"),
        ]),
        "{events:?} (status {st:?})"
    );
    let (kind, _, _, message, count) = &events[0];
    assert_eq!(kind, "Normal");
    assert_eq!(
        message,
        &format!(
            "Container image \"{IMAGE}\" already present on machine and can be accessed by the pod"
        )
    );
    assert_eq!(*count, 1);

    // A pod the agent refuses: one Warning with the status's reason, not one per pass.
    let r = rig("", DevicePolicy::default()).await;
    run(
        &r,
        &bundle(serde_json::json!({
            "volumes": [{"name": "t", "projected": {"sources": [
                {"serviceAccountToken": {"path": "token"}}]}}],
            "containers": [{"name": "app", "image": IMAGE}]
        })),
    )
    .await;
    let events = recorded(&r);
    assert_eq!(events.len(), 1, "{events:?}");
    let (kind, reason, path, message, count) = &events[0];
    assert_eq!(
        (kind.as_str(), reason.as_str(), path.as_str(), *count),
        ("Warning", "UnsupportedPodSpec", "", 1)
    );
    assert!(message.contains("serviceAccountToken"), "{message}");

    // An image that is absent with pullPolicy Never.
    let r = rig("", DevicePolicy::default()).await;
    run(
        &r,
        &bundle(serde_json::json!({
            "containers": [{"name": "app", "image": "localhost/absent:1", "imagePullPolicy": "Never"}]
        })),
    )
    .await;
    let events = recorded(&r);
    let first_two: Vec<(&str, &str)> = events
        .iter()
        .take(2)
        .map(|(_, reason, _, message, _)| (reason.as_str(), message.as_str()))
        .collect();
    assert_eq!(
        first_two,
        [
            (
                "ErrImageNeverPull",
                "Container image \"localhost/absent:1\" is not present with pull policy of Never"
            ),
            ("Failed", "Error: ErrImageNeverPull"),
        ]
    );
}

/// A pod JSON with `spec` at `generation`, as the API serves it after each change.
fn bundle_at(spec: serde_json::Value, generation: i64) -> PodBundle {
    let mut b = bundle(spec);
    let mut v: serde_json::Value = serde_json::from_slice(&b.pod_json).unwrap();
    v["metadata"]["generation"] = generation.into();
    b.pod_json = serde_json::to_vec(&v).unwrap().into();
    b
}

async fn pass(w: &mut PodWorker<FakeRuntime>, r: &Rig, b: &PodBundle) -> PodStatus {
    let planned = plan_pod(&b.pod_json, &r.ctx.policy);
    for _ in 0..3 {
        w.reconcile(b, &planned, Ok(())).await;
    }
    let map = r.ctx.statuses.borrow().clone();
    serde_json::from_slice(&map["uid-1"].status_json).unwrap()
}

fn ephemeral_state(st: &PodStatus, name: &str) -> k8s_openapi::api::core::v1::ContainerStatus {
    st.ephemeral_container_statuses
        .iter()
        .flatten()
        .find(|s| s.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no ephemeralContainerStatuses entry for {name}: {st:?}"))
}

#[tokio::test]
async fn an_ephemeral_container_joins_the_running_pod_once_without_disturbing_it() {
    let r = rig("", DevicePolicy::default()).await;
    let mut w = PodWorker::new(r.ctx.clone(), "uid-1".into());
    let app = serde_json::json!({"name": "app", "image": IMAGE});
    let st = pass(
        &mut w,
        &r,
        &bundle_at(serde_json::json!({"containers": [app.clone()]}), 1),
    )
    .await;
    assert_eq!(st.phase.as_deref(), Some("Running"), "{st:?}");
    let app_id = st.container_statuses.as_ref().unwrap()[0]
        .container_id
        .clone();
    let with_debugger = serde_json::json!({"containers": [app.clone()],
        "ephemeralContainers": [{"name": "debugger", "image": IMAGE, "stdin": true, "tty": true,
            "targetContainerName": "app", "command": ["sh"]}]});
    let st = pass(&mut w, &r, &bundle_at(with_debugger.clone(), 2)).await;
    let app_status = &st.container_statuses.as_ref().unwrap()[0];
    assert_eq!(
        app_status.container_id, app_id,
        "the app container was not replaced"
    );
    assert_eq!(app_status.restart_count, 0);
    assert_eq!(st.observed_generation, Some(2));
    let dbg = ephemeral_state(&st, "debugger");
    assert!(dbg.state.as_ref().unwrap().running.is_some(), "{dbg:?}");
    assert!(!dbg.ready, "ephemeral containers are never ready");
    assert!(
        dbg.container_id
            .as_deref()
            .is_some_and(|c| c.starts_with("podman://"))
    );
    assert_eq!(dbg.image, IMAGE);
    let spec = r.rt.spec_of("debugger").await.unwrap();
    assert!(
        spec.terminal && spec.stdin,
        "kubectl debug -it: a terminal and open stdin"
    );
    let pidns = spec.pidns.expect("joins its target's PID namespace");
    assert_eq!(pidns.nsmode, "path");
    assert!(
        pidns.value.starts_with("/proc/4") && pidns.value.ends_with("/ns/pid"),
        "{}",
        pidns.value
    );
    assert_eq!(
        spec.pod,
        r.rt.spec_of("app").await.unwrap().pod,
        "same sandbox"
    );
    // It ends: never started again, the pod and its app container untouched.
    r.rt.exit("debugger", 3).await;
    let st = pass(&mut w, &r, &bundle_at(with_debugger, 2)).await;
    let dbg = ephemeral_state(&st, "debugger");
    let t = dbg
        .state
        .as_ref()
        .unwrap()
        .terminated
        .clone()
        .expect("terminated");
    assert_eq!(t.exit_code, 3);
    assert_eq!(dbg.restart_count, 0);
    assert_eq!(st.phase.as_deref(), Some("Running"));
    let created =
        r.rt.state
            .lock()
            .await
            .containers
            .values()
            .filter(|c| {
                c.labels
                    .get(crate::podman::labels::CONTAINER)
                    .map(String::as_str)
                    == Some("debugger")
            })
            .count();
    assert_eq!(created, 1, "created once");
    // Another agent version hashing the container differently does not make it again.
    for c in r.rt.state.lock().await.containers.values_mut() {
        if c.labels
            .get(crate::podman::labels::CONTAINER)
            .map(String::as_str)
            == Some("debugger")
        {
            c.labels
                .insert(crate::podman::labels::SPEC_HASH.into(), "older".into());
        }
    }
    let again = serde_json::json!({"containers": [app],
        "ephemeralContainers": [{"name": "debugger", "image": IMAGE, "stdin": true, "tty": true,
            "targetContainerName": "app", "command": ["sh"]}]});
    let st = pass(&mut w, &r, &bundle_at(again, 2)).await;
    assert_eq!(
        ephemeral_state(&st, "debugger")
            .state
            .unwrap()
            .terminated
            .unwrap()
            .exit_code,
        3
    );
    assert_eq!(
        r.rt.state.lock().await.containers.len(),
        3,
        "infra, app and the one debugger: nothing replaced"
    );
    let events: Vec<String> = recorded(&r)
        .into_iter()
        .filter(|e| e.2 == "spec.ephemeralContainers{debugger}")
        .map(|e| e.1)
        .collect();
    assert!(
        events.contains(&"Created".to_owned()) && events.contains(&"Started".to_owned()),
        "{events:?}"
    );
}

#[tokio::test]
async fn an_ephemeral_container_is_no_way_around_the_device_policy_or_run_as_non_root() {
    let policy = DevicePolicy {
        allow_privileged: false,
        ..DevicePolicy::default()
    };
    let r = rig("", policy).await;
    let mut w = PodWorker::new(r.ctx.clone(), "uid-1".into());
    let st = pass(
        &mut w,
        &r,
        &bundle_at(
            serde_json::json!({"containers": [{"name": "app", "image": IMAGE}],
                "ephemeralContainers": [
                    {"name": "root-shell", "image": IMAGE,
                        "securityContext": {"privileged": true}},
                    {"name": "nonroot", "image": IMAGE,
                        "securityContext": {"runAsNonRoot": true}},
                    {"name": "ghost-target", "image": IMAGE, "targetContainerName": "nope"}]}),
            2,
        ),
    )
    .await;
    assert_eq!(
        st.phase.as_deref(),
        Some("Running"),
        "the pod runs on: {st:?}"
    );
    let waiting = |name: &str| {
        let w = ephemeral_state(&st, name)
            .state
            .unwrap()
            .waiting
            .unwrap_or_else(|| panic!("{name} is not waiting"));
        (w.reason.unwrap(), w.message.unwrap_or_default())
    };
    let (reason, message) = waiting("root-shell");
    assert_eq!(reason, "CreateContainerConfigError");
    assert_eq!(
        message,
        "spec.ephemeralContainers[0].securityContext.privileged: the device policy forbids privileged containers (agent.toml [policy] allow_privileged = false)"
    );
    let (reason, message) = waiting("nonroot");
    assert_eq!(reason, "CreateContainerConfigError");
    assert!(message.contains("image will run as root"), "{message}");
    let (_, message) = waiting("ghost-target");
    assert!(message.contains("targetContainerName"), "{message}");
    for name in ["root-shell", "nonroot", "ghost-target"] {
        assert!(
            r.rt.spec_of(name).await.is_none(),
            "{name} was never created"
        );
    }
}

#[tokio::test]
async fn an_image_volume_is_pulled_for_the_pod_and_handed_to_podman_read_only() {
    // Pulled with its pullPolicy (Always: even though present), its Events on the pod.
    let r = rig("", DevicePolicy::default()).await;
    let st = run(
        &r,
        &bundle(serde_json::json!({
            "volumes": [{"name": "data", "image": {"reference": IMAGE, "pullPolicy": "Always"}}],
            "containers": [{"name": "app", "image": IMAGE,
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]
        })),
    )
    .await;
    let spec = r.rt.spec_of("app").await.expect("container created");
    assert_eq!(
        spec.image_volumes,
        // By the ID the pull resolved: the image mounted is the one pulled.
        [crate::podman::ImageVolume {
            source: format!("id-{IMAGE}"),
            destination: "/data".into(),
            read_write: false,
        }]
    );
    assert!(
        spec.mounts.iter().all(|m| m.destination != "/data"),
        "not a bind mount too: {:?}",
        spec.mounts
    );
    let events = recorded(&r);
    let volume_pull: Vec<(&str, &str)> = events
        .iter()
        .filter(|(_, _, path, _, _)| path.is_empty())
        .map(|(_, reason, _, message, _)| (reason.as_str(), message.as_str()))
        .take(2)
        .collect();
    assert_eq!(volume_pull.len(), 2, "{events:?} (status {st:?})");
    assert_eq!(
        volume_pull[0],
        ("Pulling", &*format!("Pulling image \"{IMAGE}\""))
    );
    assert_eq!(volume_pull[1].0, "Pulled");
    assert!(
        volume_pull[1]
            .1
            .starts_with(&format!("Successfully pulled image \"{IMAGE}\" in ")),
        "{volume_pull:?}"
    );

    // An image volume that cannot be pulled keeps the container from being created: the pull
    // error on the pod, ErrImagePull on the container that mounts it.
    let r = rig("", DevicePolicy::default()).await;
    let st = run(
        &r,
        &bundle(serde_json::json!({
            "volumes": [{"name": "data", "image": {"reference": "localhost/absent:1"}}],
            "containers": [{"name": "app", "image": IMAGE,
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]
        })),
    )
    .await;
    assert!(r.rt.spec_of("app").await.is_none());
    let (reason, message) = waiting(&st);
    assert!(
        reason == "ErrImagePull" || reason == "ImagePullBackOff",
        "{reason}: {message}"
    );
    assert!(message.contains("localhost/absent:1"), "{message}");
    let events = recorded(&r);
    assert!(
        events
            .iter()
            .any(|(kind, reason, path, message, _)| kind == "Warning"
                && reason == "Failed"
                && path.is_empty()
                && message.starts_with("Failed to pull image \"localhost/absent:1\": ")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(_, reason, path, message, _)| reason == "Failed"
                && path == "spec.containers{app}"
                && message == "Error: ErrImagePull"),
        "{events:?}"
    );
}
