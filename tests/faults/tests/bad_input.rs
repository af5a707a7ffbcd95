//! Bad input: property tests of the agent's decoding of what the hub sends (snapshots, pod
//! bundles, the stored snapshot file) with bounded case counts, and malformed pods through the
//! real API server to a real hub and agent, which must answer each with a clear pod status
//! reason while neither crashes and other pods keep running.
//!
//! The hub's decoding of agent messages is property-tested in `hub/src/pods/tests.rs` (the
//! relay) and its framing in `hub/tests/link.rs` (malformed and oversized messages on the wire).

use bytes::Bytes;
use fleetlet_agent::pod::spec::parse_pod;
use fleetlet_agent::reconciler::pod_uid;
use fleetlet_agent::store::{DesiredStore, Held};
use fleetlet_faults::Outcome;
use fleetlet_proto::v1;
use proptest::prelude::*;
use prost::Message;
use serde_json::{Map, Value, json};

mod rig;
use rig::{Rig, WAIT, duplicated, record, running, sleeper, test_image};

/// Keys a Pod spec or container has, so generated objects hit the parser's real paths.
fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "name",
        "image",
        "command",
        "args",
        "env",
        "value",
        "valueFrom",
        "secretKeyRef",
        "configMapKeyRef",
        "fieldRef",
        "fieldPath",
        "key",
        "envFrom",
        "resources",
        "requests",
        "limits",
        "cpu",
        "memory",
        "ports",
        "containerPort",
        "hostPort",
        "protocol",
        "volumeMounts",
        "mountPath",
        "subPath",
        "readOnly",
        "volumes",
        "emptyDir",
        "hostPath",
        "path",
        "configMap",
        "secret",
        "secretName",
        "items",
        "mode",
        "defaultMode",
        "sizeLimit",
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
        "exec",
        "httpGet",
        "tcpSocket",
        "port",
        "initialDelaySeconds",
        "periodSeconds",
        "restartPolicy",
        "imagePullPolicy",
        "terminationGracePeriodSeconds",
        "hostNetwork",
        "securityContext",
        "initContainers",
        "containers",
        "x",
    ])
    .prop_map(str::to_string)
}

/// Arbitrary JSON, biased to values a Pod parser must judge (quantities, ports, modes).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        "[ -~]{0,16}".prop_map(Value::from),
        prop::sample::select(vec![
            "1",
            "-1",
            "0",
            "500m",
            "1e308",
            "18446744073709551615",
            "9E",
            "9Ei",
            "1e30",
            "0.0001m",
            "64Mi",
            "NaN",
            "inf",
            "",
            "http",
            "TCP",
            "Always",
            "Never",
            "/",
            "..",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            prop::collection::btree_map(key(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A valid pod with arbitrary values put into its spec and first container, and up to 300
/// containers.
fn mutated_pod() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec((key(), json_value()), 0..4),
        prop::collection::vec((key(), json_value()), 0..4),
        1usize..300,
    )
        .prop_map(|(spec_fields, container_fields, n)| {
            let mut first = json!({"name": "c0", "image": "busybox"});
            for (k, v) in container_fields {
                first[k] = v;
            }
            let mut containers = vec![first];
            containers.extend((1..n).map(|i| json!({"name": format!("c{i}"), "image": "busybox"})));
            let mut spec = json!({"containers": containers});
            for (k, v) in spec_fields {
                spec[k] = v;
            }
            serde_json::to_vec(&json!({
                "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
                "spec": spec
            }))
            .unwrap_or_default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any bytes as a pod: a plan or an error naming a field, never a panic.
    #[test]
    fn pod_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        if let Err(e) = parse_pod(&bytes) {
            prop_assert!(!e.field.is_empty() && !e.message.is_empty());
        }
        let _ = pod_uid(&bytes);
    }

    /// Structurally plausible but arbitrary pods: every rejection names its field.
    #[test]
    fn mutated_pods_are_planned_or_rejected_with_a_field(pod in mutated_pod()) {
        match parse_pod(&pod) {
            Ok(plan) => prop_assert!(!plan.containers.is_empty()),
            Err(e) => prop_assert!(
                e.field == "pod" || e.field.starts_with("spec") || e.field.starts_with("metadata"),
                "{e}"
            ),
        }
    }

    /// A snapshot as it comes off the wire, with bytes flipped: decoding fails or yields pods the
    /// agent can judge without panicking.
    #[test]
    fn damaged_snapshots_decode_or_fail(
        pods in prop::collection::vec(mutated_pod(), 0..4),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
    ) {
        let snapshot = v1::DesiredSnapshot {
            generation: 7,
            pods: pods.into_iter().map(|p| v1::PodBundle { pod_json: Bytes::from(p), ..Default::default() }).collect(),
            ..Default::default()
        };
        let mut wire = snapshot.encode_to_vec();
        if !wire.is_empty() {
            for (at, b) in flips {
                let i = at.index(wire.len());
                wire[i] ^= b;
            }
        }
        if let Ok(decoded) = v1::DesiredSnapshot::decode(wire.as_slice()) {
            for bundle in &decoded.pods {
                let _ = pod_uid(&bundle.pod_json);
                let _ = parse_pod(&bundle.pod_json);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever lies in the state directory, opening the store reports it and never claims an
    /// empty desired set for a file it could not read.
    #[test]
    fn arbitrary_state_files_are_reported_not_taken_for_no_pods(
        current in prop::collection::vec(any::<u8>(), 0..512),
        prev in prop::option::of(prop::collection::vec(any::<u8>(), 0..512)),
    ) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        std::fs::write(dir.path().join("desired.snapshot"), &current).map_err(|e| TestCaseError::fail(e.to_string()))?;
        if let Some(p) = &prev {
            std::fs::write(dir.path().join("desired.snapshot.prev"), p).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let (store, report) = DesiredStore::open(dir.path()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match store.held() {
            Held::Known(s) => prop_assert!(report.problems.is_empty() && s.generation > 0, "{:?}", report.problems),
            Held::Fallback { .. } | Held::Unknown { .. } => prop_assert!(!report.problems.is_empty()),
        }
    }
}

/// When a pod's (phase, reason, first container's reason) counts as settled.
type Settled = Box<dyn Fn(&str, &str, &str) -> bool>;

/// Creates a pod; `Err(message)` when the API server refuses it.
async fn try_create(rig: &Rig, pod: Value) -> Result<String, String> {
    let pod: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(pod).map_err(|e| e.to_string())?;
    rig.pods
        .create(&kube::api::PostParams::default(), &pod)
        .await
        .map(|p| p.metadata.uid.unwrap_or_default())
        .map_err(|e| e.to_string())
}

fn pod_with(name: &str, node: &str, spec: Value) -> Value {
    let mut pod = sleeper(name, node);
    for (k, v) in spec.as_object().cloned().unwrap_or_default() {
        pod["spec"][k] = v;
    }
    pod
}

/// Waits for the pod's phase and reason (and the first container's waiting/terminated reason)
/// to satisfy `done`; returns what it saw last.
async fn settle(rig: &Rig, name: &str, done: impl Fn(&str, &str, &str) -> bool) -> (bool, String) {
    let last = std::cell::RefCell::new(String::new());
    let ok = fleetlet_test_support::wait_for(&format!("{name} settles"), WAIT, || {
        let pods = rig.pods.clone();
        let name = name.to_string();
        let last = &last;
        let done = &done;
        async move {
            let Some(p) = pods.get_opt(&name).await.ok().flatten() else {
                return false;
            };
            let v = serde_json::to_value(p.status.unwrap_or_default()).unwrap_or_default();
            let phase = v["phase"].as_str().unwrap_or_default().to_string();
            let reason = v["reason"].as_str().unwrap_or_default().to_string();
            let c = &v["containerStatuses"][0]["state"];
            let creason = c["waiting"]["reason"]
                .as_str()
                .or(c["terminated"]["reason"].as_str())
                .unwrap_or_default()
                .to_string();
            *last.borrow_mut() = format!(
                "phase={phase} reason={reason} container={creason} message={}",
                v["message"]
                    .as_str()
                    .or(c["waiting"]["message"].as_str())
                    .unwrap_or_default()
            );
            done(&phase, &reason, &creason)
        }
    })
    .await
    .is_ok();
    (ok, last.into_inner())
}

#[tokio::test]
async fn malformed_pods_get_clear_reasons_and_nothing_crashes() {
    let mut rig = Rig::start("fb-bad", 1).await;
    let dev = rig.devices()[0].clone();
    let keep_uid = rig.create_pod(sleeper("keep", &dev)).await;
    assert!(rig.wait_running(&["keep"], WAIT).await, "{}", rig.logs());
    let keep_before = running(&dev, &keep_uid);
    let mut results: Vec<(String, bool, String)> = Vec::new();

    // What the API server itself refuses never reaches fleetlet.
    for (case, pod) in [
        ("invalid name", pod_with("Bad_Name!", &dev, json!({}))),
        (
            "negative cpu request",
            pod_with(
                "negcpu",
                &dev,
                json!({"containers": [{"name": "c", "image": test_image(),
                "resources": {"requests": {"cpu": "-1"}}}]}),
            ),
        ),
    ] {
        let r = try_create(&rig, pod).await;
        println!("{case}: {r:?}");
        results.push((
            format!("{case}: refused by the API server"),
            r.is_err(),
            format!("{r:?}"),
        ));
    }

    // Admitted by the API server: each must end in a clear reason.
    let huge_env = "x".repeat(1024 * 1024);
    let many: Vec<Value> = (0..100)
        .map(|i| json!({"name": format!("c{i}"), "image": test_image(), "command": ["true"]}))
        .collect();
    let cases: Vec<(&str, Value, Settled)> = vec![
        (
            "1 MiB env value",
            pod_with(
                "hugeenv",
                &dev,
                json!({"containers": [{"name": "c", "image": test_image(),
                "command": ["sleep", "3600"], "env": [{"name": "HUGE", "value": huge_env}]}]}),
            ),
            Box::new(|phase, reason, _| phase == "Failed" && reason == "UnsupportedPodSpec"),
        ),
        (
            "100 containers",
            pod_with(
                "many",
                &dev,
                json!({"restartPolicy": "Never", "containers": many}),
            ),
            Box::new(|phase, _, _| phase == "Succeeded"),
        ),
        (
            "absurd cpu request (100000 cores)",
            pod_with(
                "absurdcpu",
                &dev,
                json!({"containers": [{"name": "c", "image": test_image(),
                "resources": {"requests": {"cpu": "100000"}}}]}),
            ),
            Box::new(|phase, reason, _| phase == "Failed" && reason == "OutOfcpu"),
        ),
        (
            "absurd memory (3 x 9E)",
            pod_with(
                "absurdmem",
                &dev,
                json!({"containers": (0..3).map(|i| json!({"name": format!("c{i}"),
                "image": test_image(), "resources": {"requests": {"memory": "9E"}}})).collect::<Vec<_>>()}),
            ),
            Box::new(|phase, reason, _| phase == "Failed" && reason == "OutOfmemory"),
        ),
        (
            "unsupported hostPID",
            pod_with("hostpid", &dev, json!({"hostPID": true})),
            Box::new(|phase, reason, _| phase == "Failed" && reason == "UnsupportedPodSpec"),
        ),
        (
            "unsupported PVC volume",
            pod_with(
                "pvc",
                &dev,
                json!({"volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "x"}}]}),
            ),
            Box::new(|phase, reason, _| phase == "Failed" && reason == "UnsupportedPodSpec"),
        ),
    ];
    for (case, pod, done) in cases {
        let name = pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let created = try_create(&rig, pod).await;
        let (ok, seen) = match created {
            Ok(_) => settle(&rig, &name, done).await,
            Err(e) => (false, format!("refused by the API server: {e}")),
        };
        println!("{case}: {ok} {seen}");
        results.push((case.to_string(), ok, seen));
    }

    // Neither side crashed, the kept pod never noticed.
    let hub_alive = rig.hub_running();
    let agent_alive = rig.agent_running(&dev);
    let keep_after = running(&dev, &keep_uid);
    let keep_ok = keep_after == keep_before
        && rig.phase("keep").await.map(|p| p.0).as_deref() == Some("Running");
    for (case, ok, seen) in &results {
        record(Outcome {
            fault: format!("malformed pod: {case}"),
            recovered: *ok && hub_alive && agent_alive && keep_ok,
            converge_secs: None,
            pods_lost: u32::from(!keep_ok),
            pods_duplicated: duplicated(&dev, &keep_uid),
            detail: seen.chars().take(160).collect(),
        });
    }
    assert!(
        hub_alive && agent_alive,
        "hub and agent still running\n{}",
        rig.logs()
    );
    assert!(keep_ok, "the other pod kept running untouched");
    let failed: Vec<_> = results.iter().filter(|r| !r.1).collect();
    assert!(failed.is_empty(), "{failed:#?}\n{}", rig.logs());
}
