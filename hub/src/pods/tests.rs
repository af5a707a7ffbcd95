//! Unit tests of the relay's logic with an in-memory link and API; the real API server is
//! exercised by the integration tests in `hub/tests/`.

use tokio::sync::Mutex;

use fleetlet_proto::v1::{Capacity, LogRequest, PodBundle, PodStatusEntry, PodStatusReport};

use super::referenced::{Ref, RefKind};
use super::*;
use crate::devices::LiveRegistry;
use crate::inventory::InventoryDevice;
use crate::nodes::Unready;
use crate::sessions::{LinkError, LogStream};

#[derive(Default)]
struct FakeSessions {
    sent: Mutex<Vec<(String, u64, Vec<PodBundle>)>>,
    grace: Mutex<Vec<HashMap<String, u64>>>,
    live: LiveRegistry,
}

impl Sessions for FakeSessions {
    fn request_stats(&self, _device: &str) {}

    fn set_desired(
        &self,
        device: &str,
        pods: Vec<PodBundle>,
        termination_grace: HashMap<String, u64>,
    ) -> u64 {
        let mut sent = self.sent.try_lock().expect("lock");
        let generation = sent.len() as u64 + 1;
        sent.push((device.to_string(), generation, pods));
        self.grace.try_lock().expect("lock").push(termination_grace);
        generation
    }
    fn is_connected(&self, _device: &str) -> bool {
        true
    }
    fn live(&self) -> watch::Receiver<crate::devices::LiveSet> {
        self.live.subscribe()
    }
    fn open_logs(
        &self,
        device: &str,
        _req: LogRequest,
    ) -> BoxFuture<'static, Result<LogStream, LinkError>> {
        let device = device.to_string();
        Box::pin(async {
            Err(LinkError::Device {
                device,
                message: "no logs in this fake".into(),
            })
        })
    }
}

#[derive(Default)]
struct FakeApi {
    deleted: Mutex<Vec<(String, String, String)>>,
    events: Mutex<Vec<(String, String)>>,
    /// What a GET finds.
    objects: Mutex<HashMap<Ref, Fetched>>,
    fetched: Mutex<Vec<Ref>>,
}

impl PodApi for FakeApi {
    fn delete_pod(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> BoxFuture<'static, Result<(), kube::Error>> {
        self.deleted
            .try_lock()
            .expect("lock")
            .push((namespace.into(), name.into(), uid.into()));
        Box::pin(async { Ok(()) })
    }
    fn fetch(
        &self,
        kind: RefKind,
        namespace: &str,
        name: &str,
    ) -> BoxFuture<'static, Result<Option<Fetched>, kube::Error>> {
        let r = (kind, (namespace.to_string(), name.to_string()));
        self.fetched.try_lock().expect("lock").push(r.clone());
        let found = self.objects.try_lock().expect("lock").get(&r).cloned();
        Box::pin(async move { Ok(found) })
    }
    fn node_event(
        &self,
        node: &str,
        _action: &str,
        reason: &str,
        _message: &str,
    ) -> BoxFuture<'static, Result<(), kube::Error>> {
        self.events
            .try_lock()
            .expect("lock")
            .push((format!("node/{node}"), reason.to_string()));
        Box::pin(async { Ok(()) })
    }
    fn pod_event(
        &self,
        pod: &Pod,
        _action: &str,
        reason: &str,
        _message: &str,
    ) -> BoxFuture<'static, Result<(), kube::Error>> {
        self.events.try_lock().expect("lock").push((
            pod.metadata.name.clone().unwrap_or_default(),
            reason.to_string(),
        ));
        Box::pin(async { Ok(()) })
    }
}

struct Harness {
    relay: PodRelay,
    sessions: Arc<FakeSessions>,
    api: Arc<FakeApi>,
    status_rx: mpsc::Receiver<StatusUpdate>,
    live: LiveRegistry,
    _inv_tx: watch::Sender<DeviceMap>,
    known_tx: watch::Sender<Arc<BTreeSet<String>>>,
    unready_tx: watch::Sender<crate::nodes::UnreadyNodes>,
}

fn harness() -> Harness {
    let inv: BTreeMap<String, InventoryDevice> = ["dev-a", "dev-b"]
        .into_iter()
        .map(|n| {
            (
                n.to_string(),
                InventoryDevice {
                    name: n.into(),
                    enabled: true,
                    labels: BTreeMap::new(),
                    fleet: None,
                },
            )
        })
        .collect();
    let (inv_tx, inv_rx) = watch::channel(Arc::new(inv));
    // Both devices' Nodes are the hub's own (the node manager publishes only those).
    let (known_tx, known_rx) = watch::channel(Arc::new(
        ["dev-a", "dev-b"].into_iter().map(String::from).collect(),
    ));
    let (unready_tx, unready_rx) = watch::channel(Arc::new(BTreeMap::new()));
    let sessions = Arc::new(FakeSessions::default());
    let live = sessions.live.clone();
    let api = Arc::new(FakeApi::default());
    let (status_tx, status_rx) = mpsc::channel(64);
    let (mut relay, _handles) = PodRelay::new(
        sessions.clone(),
        api.clone(),
        status_tx,
        Arc::new(Metrics::new()),
        RelayConfig {
            debounce: Duration::from_millis(10),
            default_allocatable: [("cpu", "2"), ("memory", "1Gi"), ("pods", "10")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            bundle_limits: refusal::BundleLimits {
                per_pod: 64 * 1024,
                per_snapshot: 96 * 1024,
            },
            device_ip_ranges: Vec::new(),
        },
        inv_rx,
        live.subscribe(),
        known_rx,
        unready_rx,
    );
    // No Services (the suite's pods get no Service variables), listed.
    relay.handle(Input::Service(watcher::Event::Init));
    relay.handle(Input::Service(watcher::Event::InitDone));
    Harness {
        relay,
        sessions,
        api,
        status_rx,
        live,
        _inv_tx: inv_tx,
        known_tx,
        unready_tx,
    }
}

fn pod(name: &str, node: &str, cpu: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "nodeName": node,
            "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}],
            "containers": [{"name": "c", "image": "busybox", "resources": {"requests": {"cpu": cpu}}}]
        }
    }))
    .expect("pod")
}

fn config_map(value: &str) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": "cfg", "namespace": "ns"}, "data": {"k": value}}),
    )
    .expect("cm")
}

/// Feeds initial lists for all three watches.
fn sync(h: &mut Harness, pods: Vec<Pod>, cms: Vec<ConfigMap>) {
    h.relay.handle(Input::Pod(watcher::Event::Init));
    for p in pods {
        h.relay.handle(Input::Pod(watcher::Event::InitApply(p)));
    }
    h.relay.handle(Input::Pod(watcher::Event::InitDone));
    h.relay.handle(Input::ConfigMap(watcher::Event::Init));
    for c in cms {
        h.relay
            .handle(Input::ConfigMap(watcher::Event::InitApply(c)));
    }
    h.relay.handle(Input::ConfigMap(watcher::Event::InitDone));
    h.relay.handle(Input::Secret(watcher::Event::Init));
    h.relay.handle(Input::Secret(watcher::Event::InitDone));
}

fn sent_to(h: &Harness, device: &str) -> Vec<Vec<PodBundle>> {
    h.sessions
        .sent
        .try_lock()
        .expect("lock")
        .iter()
        .filter(|(d, _, _)| d == device)
        .map(|(_, _, b)| b.clone())
        .collect()
}

fn uids(bundles: &[PodBundle]) -> Vec<String> {
    bundles
        .iter()
        .map(|b| {
            let v: Value = serde_json::from_slice(&b.pod_json).expect("json");
            v["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn nothing_is_sent_before_every_cache_is_synced_then_each_device_gets_its_pods() {
    let mut h = harness();
    h.relay.handle(Input::Pod(watcher::Event::Init));
    h.relay.handle(Input::Pod(watcher::Event::InitApply(pod(
        "p1", "dev-a", "100m",
    ))));
    h.relay.handle(Input::Pod(watcher::Event::InitDone));
    h.relay.flush();
    assert!(
        h.sessions.sent.try_lock().expect("lock").is_empty(),
        "an unsynced hub must not send empty sets"
    );
    sync(
        &mut h,
        vec![
            pod("p1", "dev-a", "100m"),
            pod("p2", "dev-b", "100m"),
            pod("other", "real-node", "100m"),
        ],
        vec![config_map("v1")],
    );
    h.relay.flush();
    let a = sent_to(&h, "dev-a");
    assert_eq!(a.len(), 1);
    assert_eq!(uids(&a[0]), ["uid-p1"]);
    assert_eq!(
        a[0][0].config_maps[0].data.get("k").map(String::as_str),
        Some("v1")
    );
    assert_eq!(uids(&sent_to(&h, "dev-b")[0]), ["uid-p2"]);
    assert!(sent_to(&h, "real-node").is_empty());
}

#[tokio::test]
async fn a_referenced_config_map_change_is_resent_and_unrelated_changes_are_not() {
    let mut h = harness();
    sync(
        &mut h,
        vec![pod("p1", "dev-a", "100m")],
        vec![config_map("v1")],
    );
    h.relay.flush();
    // A status-only change of the pod (new resourceVersion, status) produces no new snapshot.
    let mut p = pod("p1", "dev-a", "100m");
    p.metadata.resource_version = Some("99".into());
    p.status = Some(serde_json::from_value(json!({"phase": "Running"})).expect("status"));
    h.relay.handle(Input::Pod(watcher::Event::Apply(p)));
    h.relay.flush();
    assert_eq!(sent_to(&h, "dev-a").len(), 1);
    h.relay
        .handle(Input::ConfigMap(watcher::Event::Apply(config_map("v2"))));
    h.relay.flush();
    let a = sent_to(&h, "dev-a");
    assert_eq!(a.len(), 2);
    assert_eq!(
        a[1][0].config_maps[0].data.get("k").map(String::as_str),
        Some("v2")
    );
}

#[tokio::test]
async fn a_pod_exceeding_allocatable_fails_with_out_of_cpu_and_is_not_relayed() {
    let mut h = harness();
    h.live.apply(&SessionEvent::Capacity {
        device: "dev-a".into(),
        capacity: Capacity {
            allocatable: [("cpu".to_string(), "1".to_string())].into_iter().collect(),
            ..Default::default()
        },
    });
    sync(&mut h, vec![pod("small", "dev-a", "600m")], vec![]);
    h.relay.flush();
    let mut big = pod("big", "dev-a", "600m");
    big.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:00:01Z".parse().expect("ts"),
    ));
    h.relay.handle(Input::Pod(watcher::Event::Apply(big)));
    h.relay.flush();
    let a = sent_to(&h, "dev-a");
    assert_eq!(uids(a.last().expect("sent")), ["uid-small"]);
    let st = h.status_rx.try_recv().expect("rejection status");
    assert_eq!(st.name, "big");
    assert_eq!(st.status["phase"], "Failed");
    assert_eq!(st.status["reason"], "OutOfcpu");
    tokio::task::yield_now().await;
    assert_eq!(
        h.api.events.try_lock().expect("lock").as_slice(),
        [("big".to_string(), "OutOfcpu".to_string())]
    );
}

#[tokio::test]
async fn a_pod_resized_in_place_holds_its_new_requests_at_admission() {
    let mut h = harness();
    h.live.apply(&SessionEvent::Capacity {
        device: "dev-a".into(),
        capacity: Capacity {
            allocatable: [("cpu".to_string(), "1".to_string())].into_iter().collect(),
            ..Default::default()
        },
    });
    sync(&mut h, vec![pod("small", "dev-a", "300m")], vec![]);
    h.relay.flush();
    // Resized in place to 800m: relayed as any spec change.
    let mut grown = pod("small", "dev-a", "800m");
    grown.metadata.generation = Some(2);
    h.relay.handle(Input::Pod(watcher::Event::Apply(grown)));
    h.relay.flush();
    let a = sent_to(&h, "dev-a");
    let last = a.last().expect("sent");
    assert_eq!(uids(last), ["uid-small"]);
    assert!(
        String::from_utf8_lossy(&last[0].pod_json).contains("800m"),
        "the resize reached the device"
    );
    // 300m more no longer fits next to it.
    let mut next = pod("next", "dev-a", "300m");
    next.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:00:01Z".parse().expect("ts"),
    ));
    h.relay.handle(Input::Pod(watcher::Event::Apply(next)));
    h.relay.flush();
    let st = h.status_rx.try_recv().expect("rejection status");
    assert_eq!(st.name, "next");
    assert_eq!(st.status["reason"], "OutOfcpu");
}

#[tokio::test]
async fn device_status_goes_to_the_status_writer_only_for_its_own_pods() {
    let mut h = harness();
    sync(&mut h, vec![pod("p1", "dev-a", "100m")], vec![]);
    let entry = |uid: &str| PodStatusEntry {
        uid: uid.into(),
        namespace: "ns".into(),
        name: "p1".into(),
        status_json: bytes::Bytes::from_static(br#"{"phase":"Running"}"#),
        removed: false,
    };
    h.relay.handle(Input::Session(SessionEvent::PodStatus {
        inflight: Default::default(),
        device: "dev-b".into(),
        report: PodStatusReport {
            full: false,
            pods: vec![entry("uid-p1")],
        },
    }));
    assert!(
        h.status_rx.try_recv().is_err(),
        "dev-b may not report dev-a's pod"
    );
    h.relay.handle(Input::Session(SessionEvent::PodStatus {
        inflight: Default::default(),
        device: "dev-a".into(),
        report: PodStatusReport {
            full: true,
            pods: vec![entry("uid-p1")],
        },
    }));
    let st = h.status_rx.try_recv().expect("status");
    assert_eq!(
        (st.uid.as_str(), st.status["phase"].as_str()),
        ("uid-p1", Some("Running"))
    );
}

#[tokio::test]
async fn a_status_reported_before_the_pod_cache_synced_is_written_once_it_has() {
    // A restarted hub accepts devices while it still lists pods; the devices' full status
    // resync lands first and is not sent again unless something changes.
    let mut h = harness();
    let entry = |uid: &str, name: &str| PodStatusEntry {
        uid: uid.into(),
        namespace: "ns".into(),
        name: name.into(),
        status_json: bytes::Bytes::from_static(br#"{"phase":"Running"}"#),
        removed: false,
    };
    h.relay.handle(Input::Session(SessionEvent::PodStatus {
        inflight: Default::default(),
        device: "dev-a".into(),
        report: PodStatusReport {
            full: true,
            pods: vec![entry("uid-p1", "p1"), entry("uid-gone", "gone")],
        },
    }));
    assert!(h.status_rx.try_recv().is_err(), "no pod known yet");
    sync(&mut h, vec![pod("p1", "dev-a", "100m")], vec![]);
    let st = h.status_rx.try_recv().expect("status after the sync");
    assert_eq!(
        (st.uid.as_str(), st.status["phase"].as_str()),
        ("uid-p1", Some("Running"))
    );
    assert!(
        h.status_rx.try_recv().is_err(),
        "a pod the API does not hold gets no status"
    );
}

#[tokio::test]
async fn deletion_waits_for_the_device_then_deletes_with_the_uid() {
    let mut h = harness();
    let mut running = pod("p1", "dev-a", "100m");
    running.status = Some(
        serde_json::from_value(json!({"phase": "Running", "containerStatuses": [{"name": "c", "image": "busybox", "imageID": "", "ready": true, "restartCount": 0}]}))
            .expect("status"),
    );
    sync(&mut h, vec![running.clone()], vec![]);
    h.relay.flush();
    let mut terminating = running;
    terminating.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-01-01T00:01:00Z".parse().expect("ts"),
        ));
    terminating.metadata.deletion_grace_period_seconds = Some(30);
    h.relay
        .handle(Input::Pod(watcher::Event::Apply(terminating)));
    h.relay.flush();
    assert!(
        uids(sent_to(&h, "dev-a").last().expect("sent")).is_empty(),
        "terminating pod leaves the set"
    );
    let grace = h.sessions.grace.try_lock().expect("lock").last().cloned();
    assert_eq!(
        grace,
        Some(HashMap::from([("uid-p1".to_string(), 30)])),
        "the API's deletion grace travels with the snapshot that leaves the pod out"
    );
    tokio::task::yield_now().await;
    assert!(
        h.api.deleted.try_lock().expect("lock").is_empty(),
        "the pod ran; wait for the device"
    );
    // Another device claiming the removal does not count: only dev-a can confirm its pod.
    h.relay.handle(Input::Session(SessionEvent::PodStatus {
        inflight: Default::default(),
        device: "dev-b".into(),
        report: PodStatusReport {
            full: false,
            pods: vec![PodStatusEntry {
                uid: "uid-p1".into(),
                removed: true,
                ..Default::default()
            }],
        },
    }));
    tokio::task::yield_now().await;
    assert!(
        h.api.deleted.try_lock().expect("lock").is_empty(),
        "dev-b may not confirm the removal of dev-a's pod"
    );
    h.relay.handle(Input::Session(SessionEvent::PodStatus {
        inflight: Default::default(),
        device: "dev-a".into(),
        report: PodStatusReport {
            full: false,
            pods: vec![PodStatusEntry {
                uid: "uid-p1".into(),
                removed: true,
                ..Default::default()
            }],
        },
    }));
    tokio::task::yield_now().await;
    assert_eq!(
        h.api.deleted.try_lock().expect("lock").as_slice(),
        [("ns".to_string(), "p1".to_string(), "uid-p1".to_string())]
    );
}

#[tokio::test]
async fn a_pod_the_device_never_ran_is_deleted_at_once() {
    let mut h = harness();
    let mut p = pod("p1", "dev-a", "100m");
    p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:01:00Z".parse().expect("ts"),
    ));
    sync(&mut h, vec![p], vec![]);
    tokio::task::yield_now().await;
    assert_eq!(h.api.deleted.try_lock().expect("lock").len(), 1);
}

mod properties {
    use super::*;
    use fleetlet_proto::v1::AgentMessage;
    use proptest::prelude::*;
    use prost::Message;

    fn status_json() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            Just(br#"{"phase":"Running"}"#.to_vec()),
            Just(br#"{"phase":7,"conditions":"x","containerStatuses":[{"name":null}]}"#.to_vec()),
            Just(br#"[1,2]"#.to_vec()),
            Just(br#"{"phase":"Failed","reason":"Forged","startTime":"not a time"}"#.to_vec()),
        ]
    }

    fn entry() -> impl Strategy<Value = PodStatusEntry> {
        (
            prop::sample::select(vec!["uid-p1", "uid-p2", "", "uid-unknown"]),
            "[ -~]{0,12}",
            status_json(),
            any::<bool>(),
        )
            .prop_map(|(uid, name, json, removed)| PodStatusEntry {
                uid: uid.into(),
                namespace: "ns".into(),
                name,
                status_json: bytes::Bytes::from(json),
                removed,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever devices report, the relay neither panics nor lets a device write the status
        /// of, or confirm the removal of, a pod bound to another device.
        #[test]
        fn arbitrary_reports_never_cross_devices(
            reports in prop::collection::vec(
                (prop::sample::select(vec!["dev-a", "dev-b", "stranger"]), any::<bool>(),
                 prop::collection::vec(entry(), 0..6)),
                0..8),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            rt.block_on(async {
                let mut h = harness();
                let mut terminating = pod("p1", "dev-a", "100m");
                terminating.status = Some(serde_json::from_value(json!({"phase": "Running",
                    "containerStatuses": [{"name": "c", "image": "busybox", "imageID": "", "ready": true, "restartCount": 0}]}))
                    .expect("status"));
                terminating.metadata.deletion_timestamp = Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-01-01T00:01:00Z".parse().expect("ts")));
                sync(&mut h, vec![terminating, pod("p2", "dev-b", "100m")], vec![config_map("v")]);
                let owner = |uid: &str| match uid {
                    "uid-p1" => Some("dev-a"),
                    "uid-p2" => Some("dev-b"),
                    _ => None,
                };
                let mut may_report = std::collections::HashSet::new();
                let mut may_remove = std::collections::HashSet::new();
                for (device, _, pods) in &reports {
                    for e in pods {
                        if owner(&e.uid) == Some(*device) {
                            // A removal carries the pod's last status, written too.
                            if e.removed {
                                may_remove.insert(e.uid.clone());
                            }
                            may_report.insert(e.uid.clone());
                        }
                    }
                }
                for (device, full, pods) in reports {
                    h.relay.handle(Input::Session(SessionEvent::PodStatus {
                        inflight: Default::default(),
                        device: device.into(),
                        report: PodStatusReport { full, pods },
                    }));
                }
                tokio::task::yield_now().await;
                while let Ok(update) = h.status_rx.try_recv() {
                    // Only a pod's own device reports it: p1 is dev-a's, p2 dev-b's.
                    prop_assert!(may_report.contains(&update.uid), "status of {} from another device", update.uid);
                    prop_assert!(update.status.is_object());
                }
                // p1 ran and is terminating: its deletion is finished only on dev-a's word.
                for (_, _, uid) in h.api.deleted.try_lock().expect("lock").iter() {
                    prop_assert!(may_remove.contains(uid), "{uid} deleted without its device");
                }
                Ok(())
            })?;
        }

        /// Any bytes as an agent message: decoded or refused, never a panic.
        #[test]
        fn agent_message_bytes_decode_or_fail(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
            let _ = AgentMessage::decode(bytes.as_slice());
        }
    }
}

fn ready_pod(name: &str, node: &str) -> Pod {
    let mut p = pod(name, node, "100m");
    p.status = Some(
        serde_json::from_value(json!({"phase": "Running", "conditions": [
            {"type": "ContainersReady", "status": "True"},
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:05Z"}
        ]}))
        .expect("status"),
    );
    p
}

fn drain(h: &mut Harness) -> Vec<StatusUpdate> {
    std::iter::from_fn(|| h.status_rx.try_recv().ok()).collect()
}

#[tokio::test]
async fn pods_of_a_disconnected_node_are_marked_not_ready_once_and_the_device_status_ends_it() {
    let mut h = harness();
    // Deleted just before its device went away: a graceful deletion bumps the generation.
    let mut p1 = ready_pod("p1", "dev-a");
    p1.metadata.generation = Some(2);
    sync(&mut h, vec![p1, ready_pod("p2", "dev-b")], vec![]);
    h.unready_tx.send_replace(Arc::new(
        [("dev-a".to_string(), Unready::Disconnected)]
            .into_iter()
            .collect(),
    ));
    h.relay.sync_not_ready();
    let sent = drain(&mut h);
    assert_eq!(sent.len(), 1, "only the pod of the unready node: {sent:?}");
    assert_eq!(sent[0].name, "p1");
    let conds = sent[0].status["conditions"].as_array().expect("conditions");
    assert_eq!(conds.len(), 1, "only Ready is touched, as k8s does");
    assert_eq!(conds[0]["type"], "Ready");
    assert_eq!(conds[0]["status"], "False");
    assert_eq!(
        conds[0]["observedGeneration"], 2,
        "the mark judges the pod as it is now (kubectl wait checks it)"
    );
    tokio::task::yield_now().await;
    assert_eq!(
        h.api.events.try_lock().expect("lock").as_slice(),
        [("p1".to_string(), "NodeNotReady".to_string())]
    );
    // Level-triggered, but once: the next pass (API status not yet updated) sends nothing.
    h.relay.sync_not_ready();
    assert!(drain(&mut h).is_empty());

    // The device reconnects and reports: its status goes out and the mark ends; a stale unready
    // set (the node manager has not passed yet) does not mark the pod again.
    h.live.apply(&SessionEvent::Connected {
        device: "dev-a".into(),
        hello: Default::default(),
    });
    h.relay.handle(Input::Session(SessionEvent::PodStatus {
        inflight: Default::default(),
        device: "dev-a".into(),
        report: PodStatusReport {
            full: true,
            pods: vec![PodStatusEntry {
                uid: "uid-p1".into(),
                namespace: "ns".into(),
                name: "p1".into(),
                status_json: bytes::Bytes::from_static(
                    br#"{"phase":"Running","conditions":[{"type":"Ready","status":"True"}]}"#,
                ),
                removed: false,
            }],
        },
    }));
    assert_eq!(drain(&mut h).len(), 1, "the device's own status");
    h.relay.sync_not_ready();
    assert!(drain(&mut h).is_empty(), "connected again: left alone");
}

#[tokio::test]
async fn readiness_is_restored_when_a_flightctl_override_ends_without_a_device_status() {
    let mut h = harness();
    h.live.apply(&SessionEvent::Connected {
        device: "dev-a".into(),
        hello: Default::default(),
    });
    sync(&mut h, vec![ready_pod("p1", "dev-a")], vec![]);
    h.unready_tx.send_replace(Arc::new(
        [("dev-a".to_string(), Unready::Down)].into_iter().collect(),
    ));
    h.relay.sync_not_ready();
    let marked = drain(&mut h);
    assert_eq!(
        marked[0].status["conditions"][0]["status"], "False",
        "Down marks even while connected"
    );
    h.unready_tx.send_replace(Arc::new(BTreeMap::new()));
    h.relay.sync_not_ready();
    let restored = drain(&mut h);
    assert_eq!(restored.len(), 1);
    let ready = &restored[0].status["conditions"][0];
    assert_eq!(
        (ready["type"].as_str(), ready["status"].as_str()),
        (Some("Ready"), Some("True"))
    );
    assert_ne!(
        ready["lastTransitionTime"], "2026-01-01T00:00:05Z",
        "a restore is a transition"
    );
    h.relay.sync_not_ready();
    assert!(drain(&mut h).is_empty());
}

/// Hands the relay the answers of the GETs it started.
async fn deliver_fetches(h: &mut Harness) {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    while let Ok(input) = h.relay.inputs.try_recv() {
        h.relay.handle(input);
    }
}

fn named_config_map(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": "ns"}, "data": {"k": value}}),
    )
    .expect("cm")
}

fn pod_with_config_map(name: &str, config_map: &str) -> Pod {
    let mut p = pod(name, "dev-a", "100m");
    if let Some(spec) = p.spec.as_mut() {
        spec.volumes = Some(
            serde_json::from_value(json!([{"name": "cfg", "configMap": {"name": config_map}}]))
                .expect("volumes"),
        );
    }
    p
}

#[tokio::test]
async fn only_referenced_config_maps_are_cached_and_a_new_reference_is_fetched_first() {
    let mut h = harness();
    sync(
        &mut h,
        vec![
            pod("p1", "dev-a", "100m"),
            pod("elsewhere", "real-node", "100m"),
        ],
        vec![config_map("v1"), named_config_map("unrelated", "x")],
    );
    assert_eq!(
        h.relay.config_maps.items.keys().collect::<Vec<_>>(),
        [&("ns".to_string(), "cfg".to_string())],
        "unrelated ConfigMaps are not kept"
    );
    h.relay
        .handle(Input::ConfigMap(watcher::Event::Apply(named_config_map(
            "unrelated-2",
            "y",
        ))));
    assert_eq!(h.relay.config_maps.items.len(), 1);
    h.relay.flush();
    assert_eq!(sent_to(&h, "dev-a").len(), 1);

    // A new pod references a ConfigMap the hub has not kept: its device waits for the GET.
    let r = (RefKind::ConfigMap, ("ns".to_string(), "cfg2".to_string()));
    h.api.objects.try_lock().expect("lock").insert(
        r.clone(),
        Fetched::ConfigMap(named_config_map("cfg2", "fetched")),
    );
    h.relay
        .handle(Input::Pod(watcher::Event::Apply(pod_with_config_map(
            "p2", "cfg2",
        ))));
    h.relay.flush();
    assert_eq!(sent_to(&h, "dev-a").len(), 1, "held back while fetching");
    deliver_fetches(&mut h).await;
    assert_eq!(
        h.api.fetched.try_lock().expect("lock").as_slice(),
        std::slice::from_ref(&r)
    );
    h.relay.flush();
    let a = sent_to(&h, "dev-a");
    assert_eq!(a.len(), 2);
    let b2 = a[1]
        .iter()
        .find(|b| b.config_maps.iter().any(|c| c.name == "cfg2"))
        .expect("bundle with cfg2");
    assert_eq!(
        b2.config_maps[0].data.get("k").map(String::as_str),
        Some("fetched")
    );

    // Its update through the watch is kept and re-sent; once its pod is gone it is dropped.
    h.relay
        .handle(Input::ConfigMap(watcher::Event::Apply(named_config_map(
            "cfg2", "updated",
        ))));
    h.relay.flush();
    assert_eq!(sent_to(&h, "dev-a").len(), 3);
    h.relay
        .handle(Input::Pod(watcher::Event::Delete(pod_with_config_map(
            "p2", "cfg2",
        ))));
    assert!(
        !h.relay
            .config_maps
            .items
            .contains_key(&("ns".to_string(), "cfg2".to_string())),
        "no longer referenced: dropped"
    );
    assert_eq!(h.relay.config_maps.items.len(), 1);
}

#[tokio::test]
async fn a_pod_that_arrives_before_the_config_map_and_secret_lists_goes_out_once_they_are_in() {
    let mut h = harness();
    h.relay.handle(Input::Pod(watcher::Event::Init));
    h.relay.handle(Input::Pod(watcher::Event::InitDone));
    let mut p = pod("early", "dev-a", "100m");
    if let Some(spec) = p.spec.as_mut() {
        spec.volumes = None;
    }
    h.relay.handle(Input::Pod(watcher::Event::Apply(p)));
    h.relay.flush();
    assert!(sent_to(&h, "dev-a").is_empty(), "not synced yet");
    assert!(
        h.relay.snapshots.contains(&"dev-a".to_string()),
        "kept queued until the caches have listed"
    );
    // Both lists hold nothing this hub keeps, so no object changes; the flush is scheduled anyway.
    for ev in [watcher::Event::Init, watcher::Event::InitDone] {
        h.relay.handle(Input::ConfigMap(ev));
    }
    h.relay.handle(Input::Secret(watcher::Event::Init));
    h.relay.handle(Input::Secret(watcher::Event::InitApply(
        serde_json::from_value(json!({"metadata": {"name": "unrelated", "namespace": "ns"}}))
            .expect("secret"),
    )));
    h.relay.handle(Input::Secret(watcher::Event::InitDone));
    assert!(
        h.relay.snapshots.contains(&"dev-a".to_string()),
        "the last list queues every device"
    );
    h.relay.flush();
    assert_eq!(uids(&sent_to(&h, "dev-a")[0]), ["uid-early"]);
}

fn running_entry(uid: &str) -> PodStatusEntry {
    PodStatusEntry {
        uid: uid.into(),
        namespace: "ns".into(),
        name: "x".into(),
        status_json: bytes::Bytes::from_static(br#"{"phase":"Running"}"#),
        removed: false,
    }
}

#[tokio::test]
async fn a_flood_of_reports_about_pods_not_bound_to_the_device_records_nothing() {
    let mut h = harness();
    sync(&mut h, vec![pod("p1", "dev-a", "100m")], vec![]);
    // 100 reports of 2,048 made-up UIDs each (and one more than a report may carry).
    for round in 0..100 {
        let pods = (0..=MAX_REPORT_ENTRIES)
            .map(|i| running_entry(&format!("made-up-{round}-{i}")))
            .collect();
        h.relay.handle(Input::Session(SessionEvent::PodStatus {
            inflight: Default::default(),
            device: "dev-a".into(),
            report: PodStatusReport { full: false, pods },
        }));
    }
    assert!(
        h.relay.reported.get("dev-a").is_none_or(HashMap::is_empty),
        "nothing is kept about UIDs that are not the device's pods"
    );
    assert!(h.relay.early_status.is_empty());
    assert!(h.status_rx.try_recv().is_err());
    let metrics = h.relay.metrics.render();
    assert!(
        metrics
            .contains("fleetlet_hub_device_input_dropped_total{reason=\"pod_not_bound\"} 204800"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "fleetlet_hub_device_input_dropped_total{reason=\"report_too_many_entries\"} 100"
        ),
        "{metrics}"
    );
    // Its own pod still reports.
    h.relay.handle(Input::Session(SessionEvent::PodStatus {
        inflight: Default::default(),
        device: "dev-a".into(),
        report: PodStatusReport {
            full: false,
            pods: vec![running_entry("uid-p1")],
        },
    }));
    assert_eq!(h.status_rx.try_recv().expect("status").uid, "uid-p1");
}

#[tokio::test]
async fn statuses_before_the_pod_cache_synced_are_bounded_per_device() {
    let mut h = harness();
    let pods = (0..MAX_EARLY_STATUS_PER_DEVICE + 500)
        .map(|i| running_entry(&format!("early-{i}")))
        .collect();
    h.relay.handle(Input::Session(SessionEvent::PodStatus {
        inflight: Default::default(),
        device: "dev-a".into(),
        report: PodStatusReport { full: true, pods },
    }));
    assert_eq!(
        h.relay.early_status["dev-a"].len(),
        MAX_EARLY_STATUS_PER_DEVICE
    );
    assert_eq!(h.relay.early_total, MAX_EARLY_STATUS_PER_DEVICE);
    // Another device still has room.
    h.relay.handle(Input::Session(SessionEvent::PodStatus {
        inflight: Default::default(),
        device: "dev-b".into(),
        report: PodStatusReport {
            full: true,
            pods: vec![running_entry("early-b")],
        },
    }));
    assert!(h.relay.early_status["dev-b"].contains_key("early-b"));
    // dev-b reporting dev-a's UIDs before the sync replaces nothing of dev-a's.
    h.relay.handle(Input::Session(SessionEvent::PodStatus {
        inflight: Default::default(),
        device: "dev-b".into(),
        report: PodStatusReport {
            full: false,
            pods: vec![running_entry("early-0")],
        },
    }));
    assert!(h.relay.early_status["dev-a"].contains_key("early-0"));
}

#[tokio::test]
async fn a_device_whose_node_is_not_the_hubs_gets_nothing_and_writes_nothing() {
    let mut h = harness();
    // dev-b's name is taken by a Node the hub does not own: the node manager never publishes it.
    h.known_tx
        .send_replace(Arc::new(["dev-a".to_string()].into_iter().collect()));
    sync(
        &mut h,
        vec![pod("p1", "dev-a", "100m"), pod("kubelets", "dev-b", "100m")],
        vec![config_map("v1")],
    );
    h.relay.flush();
    assert_eq!(uids(&sent_to(&h, "dev-a")[0]), ["uid-p1"]);
    assert!(
        sent_to(&h, "dev-b").is_empty(),
        "the other Node's pod must never reach the device"
    );
    h.relay.handle(Input::Session(SessionEvent::PodStatus {
        inflight: Default::default(),
        device: "dev-b".into(),
        report: PodStatusReport {
            full: true,
            pods: vec![PodStatusEntry {
                removed: true,
                ..running_entry("uid-kubelets")
            }],
        },
    }));
    assert!(h.status_rx.try_recv().is_err(), "no status written");
    tokio::task::yield_now().await;
    assert!(h.api.deleted.try_lock().expect("lock").is_empty());
}

fn daemonset_pod(name: &str, node: &str, node_selector: Value, annotations: Value) -> Pod {
    let mut p = pod(name, node, "10m");
    p.metadata.owner_references = Some(vec![
        serde_json::from_value(json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "name": name, "uid": format!("ds-{name}"), "controller": true}))
        .expect("owner"),
    ]);
    p.metadata.annotations = serde_json::from_value(annotations).expect("annotations");
    if let Some(spec) = p.spec.as_mut() {
        spec.node_selector = serde_json::from_value(node_selector).expect("selector");
    }
    p
}

#[tokio::test]
async fn daemonset_pods_reach_devices_only_when_their_daemonset_targets_fleetlet_nodes() {
    let mut h = harness();
    sync(
        &mut h,
        vec![
            daemonset_pod(
                "kube-proxy",
                "dev-a",
                json!({"kubernetes.io/os": "linux"}),
                json!({}),
            ),
            daemonset_pod(
                "fleet-agent",
                "dev-a",
                json!({"flightctl.io/fleet": "a"}),
                json!({}),
            ),
            daemonset_pod(
                "opted-in",
                "dev-a",
                json!({}),
                json!({"fleetlet.io/run-on-devices": "true"}),
            ),
        ],
        vec![config_map("v1")],
    );
    h.relay.flush();
    let mut sent = uids(&sent_to(&h, "dev-a")[0]);
    sent.sort();
    assert_eq!(sent, ["uid-fleet-agent", "uid-opted-in"]);
    let st = h.status_rx.try_recv().expect("refusal status");
    assert_eq!(
        (
            st.name.as_str(),
            st.status["phase"].as_str(),
            st.status["reason"].as_str()
        ),
        (
            "kube-proxy",
            Some("Failed"),
            Some(refusal::DAEMONSET_REASON)
        )
    );
    tokio::task::yield_now().await;
    assert!(h.api.events.try_lock().expect("lock").contains(&(
        "kube-proxy".to_string(),
        refusal::DAEMONSET_REASON.to_string()
    )));
}

#[tokio::test]
async fn a_pod_whose_bundle_cannot_fit_fails_alone() {
    let mut h = harness();
    let big: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "big", "namespace": "ns"},
        "data": {"k": "x".repeat(100 * 1024)}
    }))
    .expect("cm");
    let mut huge = pod("huge", "dev-a", "10m");
    if let Some(spec) = huge.spec.as_mut() {
        spec.volumes = Some(vec![
            serde_json::from_value(json!({"name": "big", "configMap": {"name": "big"}}))
                .expect("volume"),
        ]);
    }
    sync(
        &mut h,
        vec![pod("small", "dev-a", "10m"), huge],
        vec![config_map("v1"), big],
    );
    h.relay.flush();
    assert_eq!(uids(&sent_to(&h, "dev-a")[0]), ["uid-small"]);
    let st = h.status_rx.try_recv().expect("refusal status");
    assert_eq!(st.name, "huge");
    assert_eq!(st.status["reason"], refusal::BUNDLE_REASON);
    let message = st.status["message"].as_str().unwrap_or_default();
    assert!(message.contains("ConfigMap big"), "{message}");
    tokio::task::yield_now().await;
    let events = h.api.events.try_lock().expect("lock").clone();
    assert!(events.contains(&("huge".to_string(), refusal::BUNDLE_REASON.to_string())));
    assert!(events.contains(&("node/dev-a".to_string(), refusal::BUNDLE_REASON.to_string())));
}

#[tokio::test]
async fn a_device_cannot_steer_its_pods_endpoints_outside_the_allowed_ranges() {
    let mut h = harness();
    h.relay.cfg.device_ip_ranges = vec![sanitize::IpRange::parse("10.88.0.0/16").expect("range")];
    sync(&mut h, vec![pod("p1", "dev-a", "100m")], vec![]);
    let report = |status: &'static [u8]| SessionEvent::PodStatus {
        inflight: Default::default(),
        device: "dev-a".into(),
        report: PodStatusReport {
            full: false,
            pods: vec![PodStatusEntry {
                status_json: bytes::Bytes::from_static(status),
                ..running_entry("uid-p1")
            }],
        },
    };
    h.relay.handle(Input::Session(report(
        br#"{"phase":"Running","podIP":"10.96.0.10","podIPs":[{"ip":"10.96.0.10"}],"nominatedNodeName":"x"}"#,
    )));
    assert!(
        h.status_rx.try_recv().is_err(),
        "a podIP outside the ranges is never written"
    );
    h.relay.handle(Input::Session(report(
        br#"{"phase":"Running","podIP":"10.88.0.7","podIPs":[{"ip":"10.88.0.7"}],"nominatedNodeName":"x"}"#,
    )));
    let st = h.status_rx.try_recv().expect("status");
    assert_eq!(st.status["podIP"], "10.88.0.7");
    assert!(st.status.get("nominatedNodeName").is_none());
}

#[tokio::test]
async fn a_device_may_only_claim_the_addresses_it_announced() {
    let mut h = harness();
    h.live.apply(&SessionEvent::Connected {
        device: "dev-a".into(),
        hello: fleetlet_proto::v1::Hello {
            node_info: Some(fleetlet_proto::v1::NodeInfo {
                addresses: vec!["192.0.2.7".into()],
                pod_networks: vec!["10.88.0.0/16".into()],
                ..Default::default()
            }),
            ..Default::default()
        },
    });
    sync(&mut h, vec![pod("p1", "dev-a", "100m")], vec![]);
    let report = |status: &'static [u8]| SessionEvent::PodStatus {
        inflight: Default::default(),
        device: "dev-a".into(),
        report: PodStatusReport {
            full: false,
            pods: vec![PodStatusEntry {
                status_json: bytes::Bytes::from_static(status),
                ..running_entry("uid-p1")
            }],
        },
    };
    h.relay.handle(Input::Session(report(
        br#"{"phase":"Running","hostIP":"192.0.2.7","podIP":"198.51.100.1"}"#,
    )));
    assert!(h.status_rx.try_recv().is_err(), "not its pod network");
    h.relay.handle(Input::Session(report(
        br#"{"phase":"Running","hostIP":"192.0.2.7","podIP":"10.88.1.2"}"#,
    )));
    assert_eq!(
        h.status_rx.try_recv().expect("status").status["podIP"],
        "10.88.1.2"
    );
}

#[tokio::test]
async fn statuses_kept_before_the_sync_are_bounded_in_bytes_per_device() {
    let mut h = harness();
    let big = bytes::Bytes::from(format!(
        r#"{{"phase":"Running","message":"{}"}}"#,
        "x".repeat(512 * 1024)
    ));
    let pods = (0..100)
        .map(|i| PodStatusEntry {
            status_json: big.clone(),
            ..running_entry(&format!("big-{i}"))
        })
        .collect();
    h.relay.handle(Input::Session(SessionEvent::PodStatus {
        inflight: Default::default(),
        device: "dev-a".into(),
        report: PodStatusReport { full: true, pods },
    }));
    let held: usize = h.relay.early_status["dev-a"]
        .values()
        .map(|e| e.status_json.len())
        .sum();
    assert!(held <= MAX_EARLY_BYTES_PER_DEVICE, "{held}");
    assert!(h.relay.early_status["dev-a"].len() < 100);
    assert_eq!(h.relay.early_device_bytes["dev-a"], held);
}

fn device_event(id: u64, uid: &str, reason: &str) -> fleetlet_proto::v1::DeviceEvent {
    fleetlet_proto::v1::DeviceEvent {
        id,
        pod_uid: uid.into(),
        field_path: "spec.containers{c}".into(),
        r#type: "Normal".into(),
        reason: reason.into(),
        message: "Container started".into(),
        count: 1,
        first_micros: 1,
        last_micros: 1,
    }
}

#[tokio::test]
async fn device_events_are_written_only_for_the_devices_own_pods_and_wait_for_the_cache() {
    let mut h = harness();
    let (tx, mut rx) = mpsc::channel(16);
    h.relay = h.relay.with_event_sink(tx);
    let batch = |device: &str, events| {
        Input::Session(SessionEvent::Events {
            device: device.into(),
            batch: fleetlet_proto::v1::EventBatch {
                epoch: 7,
                seq: 1,
                events,
                dropped_total: 0,
            },
        })
    };
    // Before the pod cache synced: held, checked once it has.
    h.relay
        .handle(batch("dev-a", vec![device_event(1, "uid-p1", "Pulled")]));
    assert!(rx.try_recv().is_err());
    sync(
        &mut h,
        vec![pod("p1", "dev-a", "100m"), pod("p2", "dev-b", "100m")],
        vec![],
    );
    let w = rx.try_recv().expect("the held batch, written");
    assert_eq!(
        (
            w.node.as_str(),
            w.namespace.as_str(),
            w.pod_name.as_str(),
            w.epoch
        ),
        ("dev-a", "ns", "p1", 7)
    );
    // dev-b claims dev-a's pod and a made-up one; with a bad one of its own pod.
    h.relay.handle(batch(
        "dev-b",
        vec![
            device_event(1, "uid-p1", "Forged"),
            device_event(2, "uid-nope", "Forged"),
            device_event(3, "uid-p2", "Not a reason"),
        ],
    ));
    assert!(rx.try_recv().is_err(), "nothing of dev-b's claims written");
    h.relay
        .handle(batch("dev-b", vec![device_event(4, "uid-p2", "Started")]));
    let w = rx.try_recv().expect("dev-b's own pod");
    assert_eq!(
        (w.pod_name.as_str(), w.event.reason.as_str()),
        ("p2", "Started")
    );
    // An Event without a pod is about the reporting device's own Node, whatever it claims.
    let mut starting = device_event(5, "", "Starting");
    starting.field_path = "spec.containers{x}".into();
    h.relay.handle(batch("dev-b", vec![starting]));
    let w = rx.try_recv().expect("dev-b's Node");
    assert_eq!(
        (
            w.regarding,
            w.pod_name.as_str(),
            w.namespace.as_str(),
            w.event.field_path.as_str()
        ),
        (crate::events::Regarding::Node, "dev-b", "default", "")
    );
    // A drop count from the device becomes a Warning on its Node.
    h.relay.handle(Input::Session(SessionEvent::Events {
        device: "dev-a".into(),
        batch: fleetlet_proto::v1::EventBatch {
            epoch: 7,
            seq: 2,
            events: vec![],
            dropped_total: 5,
        },
    }));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let node_events = h.api.events.try_lock().expect("lock").clone();
    assert!(
        node_events
            .iter()
            .any(|(node, reason)| node == "node/dev-a" && reason == "EventsDropped"),
        "{node_events:?}"
    );
}
