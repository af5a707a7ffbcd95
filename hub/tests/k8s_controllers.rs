//! The hub's controllers against the real local kube-apiserver, controller-manager and
//! scheduler (`make env-up`). The device side is an in-memory link that records the snapshots
//! the hub hands out and lets the test play the device's session events; the real agent over
//! the real link is covered by the end-to-end test.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetlet_hub::app::start_controllers;
use fleetlet_hub::config::HubConfig;
use fleetlet_hub::inventory::DeviceMap;
use fleetlet_hub::inventory::InventoryDevice;
use fleetlet_hub::metrics::Metrics;
use fleetlet_hub::sessions::{LinkError, LiveRegistry, LiveSet, LogStream, SessionEvent, Sessions};
use fleetlet_proto::v1::{
    Capacity, Hello, LogRequest, NodeInfo, PodBundle, PodStatusEntry, PodStatusReport,
};
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod common;
use common::{KubeCleanup, client, create_namespace, unique, wait_for};

/// What the hub handed to each device: generation and bundles of the latest snapshot.
type Desired = BTreeMap<String, (u64, Vec<PodBundle>)>;

/// An in-memory device link.
struct FakeLink {
    desired: watch::Sender<Desired>,
    live: LiveRegistry,
}

/// The device side's events as the link would publish them: into its live view first, then
/// to the hub's controllers.
#[derive(Clone)]
struct DeviceEvents {
    tx: mpsc::Sender<SessionEvent>,
    live: LiveRegistry,
}

impl DeviceEvents {
    async fn send(&self, ev: SessionEvent) -> Result<(), mpsc::error::SendError<SessionEvent>> {
        self.live.apply(&ev);
        self.tx.send(ev).await
    }
}

impl Sessions for FakeLink {
    fn request_stats(&self, _device: &str) {}

    fn set_desired(
        &self,
        device: &str,
        pods: Vec<PodBundle>,
        _grace: std::collections::HashMap<String, u64>,
    ) -> u64 {
        let mut generation = 0;
        self.desired.send_modify(|d| {
            generation = d.get(device).map_or(1, |(g, _)| g + 1);
            d.insert(device.to_string(), (generation, pods));
        });
        generation
    }
    fn is_connected(&self, _device: &str) -> bool {
        true
    }
    fn live(&self) -> watch::Receiver<LiveSet> {
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
                message: "the in-memory link streams no logs".into(),
            })
        })
    }
}

struct Hub {
    client: kube::Client,
    events: DeviceEvents,
    desired: watch::Receiver<Desired>,
    inventory: watch::Sender<DeviceMap>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

/// Device label the test hubs take each Node's zone from.
const ZONE_DEVICE_LABEL: &str = "fleetlet.test/zone";

fn device(name: &str, fleet: &str) -> InventoryDevice {
    InventoryDevice {
        name: name.into(),
        labels: [("site name".to_string(), "Lab #7".to_string())]
            .into_iter()
            .chain(common::owner_labels())
            .collect(),
        fleet: Some(fleet.into()),
        enabled: true,
    }
}

async fn start_hub(instance: &str, devices: Vec<InventoryDevice>) -> Hub {
    common::reap_orphans();
    let client = client().await;
    let mut cfg = HubConfig::default();
    cfg.nodes.instance = instance.into();
    cfg.nodes.disconnect_grace_secs = 2;
    cfg.nodes.lease_renew_secs = 2;
    // A zone of this test's own: the node lifecycle controller counts NotReady Nodes per zone,
    // and other tests' disconnected Nodes in the shared zone put it into partial disruption,
    // which in a small cluster pauses taint-based eviction (seen in CI).
    cfg.nodes.zone_label = ZONE_DEVICE_LABEL.into();
    let (inv_tx, inv_rx) = watch::channel(Arc::new(
        devices
            .into_iter()
            .map(|mut d| {
                d.labels
                    .insert(ZONE_DEVICE_LABEL.into(), instance.to_string());
                (d.name.clone(), d)
            })
            .collect(),
    ));
    let (desired_tx, desired_rx) = watch::channel(Desired::new());
    let (ev_tx, ev_rx) = mpsc::channel(64);
    let live = LiveRegistry::new();
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    start_controllers(
        &mut tasks,
        client.clone(),
        &cfg,
        instance,
        Arc::new(FakeLink {
            desired: desired_tx,
            live: live.clone(),
        }),
        ev_rx,
        inv_rx,
        None,
        Arc::new(Metrics::new()),
        shutdown.clone(),
    );
    Hub {
        client,
        events: DeviceEvents { tx: ev_tx, live },
        desired: desired_rx,
        inventory: inv_tx,
        shutdown,
        tasks,
    }
}

impl Hub {
    async fn connect(&self, dev: &str, cpu: &str) {
        let info = NodeInfo {
            operating_system: "linux".into(),
            architecture: "arm64".into(),
            kernel_version: "6.1.0-test".into(),
            os_image: "Test OS 1".into(),
            machine_id: format!("machine-{dev}"),
            boot_id: "boot-1".into(),
            container_runtime_version: "podman://4.3.1".into(),
            agent_version: "0.1.0".into(),
            ..Default::default()
        };
        self.events
            .send(SessionEvent::Connected {
                device: dev.into(),
                hello: Hello {
                    device_name: dev.into(),
                    node_info: Some(info.clone()),
                    ..Default::default()
                },
            })
            .await
            .expect("send");
        let res = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        self.events
            .send(SessionEvent::Capacity {
                device: dev.into(),
                capacity: Capacity {
                    capacity: res(&[
                        ("cpu", cpu),
                        ("memory", "2Gi"),
                        ("pods", "10"),
                        ("ephemeral-storage", "20Gi"),
                    ]),
                    allocatable: res(&[("cpu", cpu), ("memory", "1536Mi"), ("pods", "10")]),
                    node_info: Some(info),
                    conditions: Vec::new(),
                },
            })
            .await
            .expect("send");
    }

    async fn report(&self, dev: &str, full: bool, pods: Vec<PodStatusEntry>) {
        self.events
            .send(SessionEvent::PodStatus {
                inflight: Default::default(),
                device: dev.into(),
                report: PodStatusReport { full, pods },
            })
            .await
            .expect("send");
    }

    /// Waits until the device's latest snapshot satisfies `f`; returns it.
    async fn snapshot_where(
        &self,
        dev: &str,
        what: &str,
        f: impl Fn(&[PodBundle]) -> bool,
    ) -> Vec<PodBundle> {
        let mut rx = self.desired.clone();
        let dev = dev.to_string();
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            rx.wait_for(|d| d.get(&dev).is_some_and(|(_, b)| f(b))),
        )
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for a snapshot of {dev}: {what}"))
        .expect("link alive");
        r.get(&dev).map(|(_, b)| b.clone()).unwrap_or_default()
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

fn uids(bundles: &[PodBundle]) -> Vec<String> {
    bundles
        .iter()
        .filter_map(|b| serde_json::from_slice::<Value>(&b.pod_json).ok())
        .filter_map(|v| v["metadata"]["uid"].as_str().map(str::to_string))
        .collect()
}

async fn cleanup(client: &kube::Client, ns: &str, nodes: &[&str]) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let _ = pods
        .delete_collection(
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
            &ListParams::default(),
        )
        .await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(ns, &DeleteParams::default())
        .await;
    for n in nodes {
        let _ = Api::<Node>::all(client.clone())
            .delete(n, &DeleteParams::default())
            .await;
    }
}

fn bound_pod(name: &str, node: &str, cpu: &str, config_map: Option<&str>) -> Pod {
    let mut spec = json!({
        "nodeName": node,
        "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "fleetlet", "effect": "NoSchedule"}],
        "containers": [{"name": "app", "image": "localhost/fleetlet-test/busybox:1", "command": ["sleep", "3600"],
                        "resources": {"requests": {"cpu": cpu, "memory": "16Mi"}}}]
    });
    if let Some(cm) = config_map {
        spec["volumes"] = json!([{"name": "cfg", "configMap": {"name": cm}}]);
        spec["containers"][0]["volumeMounts"] = json!([{"name": "cfg", "mountPath": "/cfg"}]);
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("pod")
}

fn ready_condition(node: &Node) -> Option<(String, String)> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone().unwrap_or_default()))
}

async fn node_event(client: &kube::Client, node: &str, reason: &str) -> Option<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let list = events.list(&ListParams::default()).await.ok()?;
    list.items.into_iter().find(|e| {
        e.reason.as_deref() == Some(reason)
            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(node)
    })
}

#[tokio::test]
async fn nodes_are_applied_with_labels_taint_capacity_and_a_renewed_lease() {
    let instance = unique("it-nodes");
    let dev = format!("{instance}-d1");
    let _cleanup = KubeCleanup {
        nodes: vec![dev.clone()],
        namespace: None,
    };
    let hub = start_hub(&instance, vec![device(&dev, "fleet-a")]).await;
    let nodes: Api<Node> = Api::all(hub.client.clone());

    // Before the device connects: Node exists, not ready, default capacity.
    // The Node and its status are two applies; wait for both.
    let node = wait_for("node created with status", 30, || async {
        nodes
            .get_opt(&dev)
            .await
            .ok()
            .flatten()
            .filter(|n| ready_condition(n).is_some())
    })
    .await;
    assert_eq!(
        ready_condition(&node).map(|c| c.0).as_deref(),
        Some("Unknown")
    );

    hub.connect(&dev, "2").await;
    let node = wait_for("node ready with reported capacity", 30, || async {
        let n = nodes.get_opt(&dev).await.ok().flatten()?;
        let cpu = n.status.as_ref()?.capacity.as_ref()?.get("cpu")?.0.clone();
        (ready_condition(&n)?.0 == "True" && cpu == "2").then_some(n)
    })
    .await;
    let labels = node.metadata.labels.clone().unwrap_or_default();
    for (k, v) in [
        ("flightctl.io/fleet", "fleet-a"),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "arm64"),
        ("type", "virtual-kubelet"),
        ("kubernetes.io/hostname", dev.as_str()),
        ("site-name", "Lab--7"),
    ] {
        assert_eq!(labels.get(k).map(String::as_str), Some(v), "label {k}");
    }
    let spec = node.spec.clone().unwrap_or_default();
    assert!(
        spec.taints
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == "virtual-kubelet.io/provider"
                && t.value.as_deref() == Some("fleetlet")
                && t.effect == "NoSchedule"),
        "provider taint"
    );
    let status = node.status.clone().unwrap_or_default();
    let info = status.node_info.clone().unwrap_or_default();
    assert_eq!(info.kernel_version, "6.1.0-test");
    assert_eq!(info.container_runtime_version, "podman://4.3.1");
    assert_eq!(
        status
            .allocatable
            .unwrap_or_default()
            .get("memory")
            .map(|q| q.0.as_str()),
        Some("1536Mi")
    );
    assert_eq!(
        status
            .daemon_endpoints
            .and_then(|d| d.kubelet_endpoint)
            .map(|e| e.port),
        Some(10250)
    );
    let conditions: Vec<(String, String)> = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .map(|c| (c.type_, c.status))
        .collect();
    for t in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
        assert!(
            conditions.contains(&(t.to_string(), "False".to_string())),
            "{t} False in {conditions:?}"
        );
    }
    // Fields are owned by the fleetlet field manager through server-side apply.
    let managers: Vec<(String, String)> = node
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            (
                m.manager.unwrap_or_default(),
                m.operation.unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        managers.contains(&("fleetlet".into(), "Apply".into())),
        "{managers:?}"
    );

    // The lease: holder is the node, 40 s, renewed.
    let leases: Api<Lease> = Api::namespaced(hub.client.clone(), "kube-node-lease");
    let first = wait_for("node lease", 30, || async {
        let l = leases.get_opt(&dev).await.ok().flatten()?;
        l.spec.clone()?.renew_time
    })
    .await;
    let lease = leases.get(&dev).await.expect("lease");
    let spec = lease.spec.clone().unwrap_or_default();
    assert_eq!(spec.holder_identity.as_deref(), Some(dev.as_str()));
    assert_eq!(spec.lease_duration_seconds, Some(40));
    assert_eq!(
        lease
            .metadata
            .owner_references
            .unwrap_or_default()
            .first()
            .map(|o| o.kind.as_str()),
        Some("Node")
    );
    wait_for("lease renewal", 30, || async {
        let t = leases.get(&dev).await.ok()?.spec?.renew_time?;
        (t.0 > first.0).then_some(())
    })
    .await;

    // Disconnect: after the 2 s grace Ready=Unknown/DeviceDisconnected with an Event; reconnect
    // turns it back with DeviceReconnected.
    hub.events
        .send(SessionEvent::Disconnected {
            device: dev.clone(),
        })
        .await
        .expect("send");
    wait_for("Ready=Unknown DeviceDisconnected", 30, || async {
        let n = nodes.get(&dev).await.ok()?;
        (ready_condition(&n)? == ("Unknown".into(), "DeviceDisconnected".into())).then_some(())
    })
    .await;
    wait_for("DeviceDisconnected event", 30, || {
        node_event(&hub.client, &dev, "DeviceDisconnected")
    })
    .await;
    hub.connect(&dev, "2").await;
    wait_for("Ready=True again", 30, || async {
        let n = nodes.get(&dev).await.ok()?;
        (ready_condition(&n)?.0 == "True").then_some(())
    })
    .await;
    wait_for("DeviceReconnected event", 30, || {
        node_event(&hub.client, &dev, "DeviceReconnected")
    })
    .await;

    // Leaving the inventory: no pods, so the Node and its lease go.
    hub.inventory.send_replace(Arc::new(BTreeMap::new()));
    wait_for("node deleted", 30, || async {
        matches!(nodes.get_opt(&dev).await, Ok(None)).then_some(())
    })
    .await;
    hub.stop().await;
}

#[tokio::test]
async fn pods_are_relayed_admitted_status_written_and_deleted_like_a_kubelet() {
    let instance = unique("it-pods");
    let dev = format!("{instance}-d1");
    let ns = instance.clone();
    let _cleanup = KubeCleanup {
        nodes: vec![dev.clone()],
        namespace: Some(ns.clone()),
    };
    let hub = start_hub(&instance, vec![device(&dev, "fleet-a")]).await;
    create_namespace(&hub.client, &ns).await;
    hub.connect(&dev, "1").await;
    let pods: Api<Pod> = Api::namespaced(hub.client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(hub.client.clone(), &ns);
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"greeting": "hello"}}))
            .expect("cm");
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("create cm");

    // A pod bound to the device goes out in a snapshot with its ConfigMap's data, without
    // managedFields and status.
    let web = pods
        .create(
            &PostParams::default(),
            &bound_pod("web", &dev, "500m", Some("cfg")),
        )
        .await
        .expect("pod");
    let web_uid = web.metadata.uid.clone().expect("uid");
    let snap = hub
        .snapshot_where(&dev, "web with cfg", |b| {
            uids(b).contains(&web_uid) && !b[0].config_maps.is_empty()
        })
        .await;
    let pod_json: Value = serde_json::from_slice(&snap[0].pod_json).expect("json");
    assert!(pod_json["metadata"].get("managedFields").is_none());
    assert!(pod_json.get("status").is_none());
    assert_eq!(
        snap[0].config_maps[0]
            .data
            .get("greeting")
            .map(String::as_str),
        Some("hello")
    );

    // Status from the device lands in the API.
    let running = json!({
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1",
        "startTime": "2026-01-01T00:00:00Z",
        "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}, {"type": "Initialized", "status": "True"}],
        "containerStatuses": [{"name": "app", "ready": true, "started": true, "restartCount": 0,
            "image": "localhost/fleetlet-test/busybox:1", "imageID": "sha256:abc",
            "state": {"running": {"startedAt": "2026-01-01T00:00:01Z"}}}]
    });
    hub.report(
        &dev,
        true,
        vec![PodStatusEntry {
            uid: web_uid.clone(),
            namespace: ns.clone(),
            name: "web".into(),
            status_json: Bytes::from(serde_json::to_vec(&running).expect("json")),
            removed: false,
        }],
    )
    .await;
    wait_for("web Running in the API", 30, || async {
        let p = pods.get("web").await.ok()?;
        let st = p.status?;
        (st.phase.as_deref() == Some("Running")
            && st.container_statuses.is_some_and(|c| c[0].ready))
        .then_some(())
    })
    .await;
    // PodScheduled, set at binding, survives the device's status (strategic merge by type).
    let p = pods.get("web").await.expect("web");
    let types: Vec<String> = p
        .status
        .unwrap_or_default()
        .conditions
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.type_)
        .collect();
    assert!(types.contains(&"Ready".to_string()), "{types:?}");

    // Changing the referenced ConfigMap re-sends the bundle.
    cms.patch(
        "cfg",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"greeting": "bonjour"}})),
    )
    .await
    .expect("patch cm");
    hub.snapshot_where(&dev, "new cfg data", |b| {
        b.first()
            .and_then(|x| x.config_maps.first())
            .and_then(|c| c.data.get("greeting"))
            .map(String::as_str)
            == Some("bonjour")
    })
    .await;

    // An in-place image change (the one spec change Kubernetes allows) is relayed.
    pods.patch(
        "web",
        &PatchParams::default(),
        &Patch::Strategic(json!({"spec": {"containers": [{"name": "app", "image": "localhost/fleetlet-test/busybox:2"}]}})),
    )
    .await
    .expect("change image");
    hub.snapshot_where(&dev, "new image", |b| {
        b.first()
            .and_then(|x| serde_json::from_slice::<Value>(&x.pod_json).ok())
            .is_some_and(|v| {
                v["spec"]["containers"][0]["image"] == "localhost/fleetlet-test/busybox:2"
            })
    })
    .await;

    // Admission: 500m + 600m > 1 cpu → OutOfcpu, Failed, an Event, never relayed.
    let big = pods
        .create(
            &PostParams::default(),
            &bound_pod("big", &dev, "600m", None),
        )
        .await
        .expect("pod");
    let big_uid = big.metadata.uid.clone().expect("uid");
    wait_for("big Failed OutOfcpu", 30, || async {
        let st = pods.get("big").await.ok()?.status?;
        (st.phase.as_deref() == Some("Failed") && st.reason.as_deref() == Some("OutOfcpu"))
            .then_some(())
    })
    .await;
    let events: Api<Event> = Api::namespaced(hub.client.clone(), &ns);
    wait_for("OutOfcpu event", 30, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("OutOfcpu")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("big")
            })
            .then_some(())
    })
    .await;
    assert!(
        !uids(
            &hub.desired
                .borrow()
                .get(&dev)
                .map(|x| x.1.clone())
                .unwrap_or_default()
        )
        .contains(&big_uid)
    );

    // Deletion: the pod leaves the snapshot but stays (terminating) until the device confirms.
    pods.delete(
        "web",
        &DeleteParams {
            grace_period_seconds: Some(30),
            ..Default::default()
        },
    )
    .await
    .expect("delete");
    hub.snapshot_where(&dev, "web removed", |b| !uids(b).contains(&web_uid))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = pods
        .get("web")
        .await
        .expect("web still there while the device stops it");
    assert!(p.metadata.deletion_timestamp.is_some());
    hub.report(
        &dev,
        false,
        vec![PodStatusEntry {
            uid: web_uid.clone(),
            namespace: ns.clone(),
            name: "web".into(),
            removed: true,
            ..Default::default()
        }],
    )
    .await;
    wait_for("web deleted", 30, || async {
        matches!(pods.get_opt("web").await, Ok(None)).then_some(())
    })
    .await;

    // A force-deleted pod disappears from the next snapshot.
    let quick = pods
        .create(
            &PostParams::default(),
            &bound_pod("quick", &dev, "100m", None),
        )
        .await
        .expect("pod");
    let quick_uid = quick.metadata.uid.clone().expect("uid");
    hub.snapshot_where(&dev, "quick relayed", |b| uids(b).contains(&quick_uid))
        .await;
    pods.delete(
        "quick",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .expect("force");
    hub.snapshot_where(&dev, "quick gone", |b| !uids(b).contains(&quick_uid))
        .await;

    cleanup(&hub.client, &ns, &[&dev]).await;
    hub.stop().await;
}

/// Plays the device side for the fleet test: while a device is "connected", every pod in its
/// snapshot is reported Running and Ready, and pods it ran that left the snapshot are reported
/// removed. Disconnected devices do nothing (and keep "running" what they had).
async fn simulate_devices(
    mut desired: watch::Receiver<Desired>,
    connected: watch::Receiver<BTreeMap<String, bool>>,
    events: mpsc::Sender<SessionEvent>,
    stop: CancellationToken,
) {
    let mut running: BTreeMap<String, BTreeMap<String, (String, String)>> = BTreeMap::new();
    let mut connected_rx = connected;
    loop {
        let snapshot = desired.borrow_and_update().clone();
        let online = connected_rx.borrow_and_update().clone();
        for (dev, (_, bundles)) in &snapshot {
            if !online.get(dev).copied().unwrap_or(false) {
                continue;
            }
            let mine = running.entry(dev.clone()).or_default();
            let mut entries = Vec::new();
            let mut wanted = BTreeMap::new();
            for b in bundles {
                let Ok(v) = serde_json::from_slice::<Value>(&b.pod_json) else {
                    continue;
                };
                let uid = v["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let ns = v["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let name = v["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let status = json!({
                    "phase": "Running", "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
                    "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}, {"type": "Initialized", "status": "True"}],
                    "containerStatuses": [{"name": "app", "ready": true, "started": true, "restartCount": 0,
                        "image": "localhost/fleetlet-test/busybox:1", "imageID": "sha256:sim",
                        "state": {"running": {"startedAt": "2026-01-01T00:00:01Z"}}}]
                });
                entries.push(PodStatusEntry {
                    uid: uid.clone(),
                    namespace: ns.clone(),
                    name: name.clone(),
                    status_json: Bytes::from(serde_json::to_vec(&status).unwrap_or_default()),
                    removed: false,
                });
                wanted.insert(uid, (ns, name));
            }
            for (uid, (ns, name)) in mine.iter() {
                if !wanted.contains_key(uid) {
                    entries.push(PodStatusEntry {
                        uid: uid.clone(),
                        namespace: ns.clone(),
                        name: name.clone(),
                        removed: true,
                        ..Default::default()
                    });
                }
            }
            *mine = wanted;
            let _ = events
                .send(SessionEvent::PodStatus {
                    inflight: Default::default(),
                    device: dev.clone(),
                    report: PodStatusReport {
                        full: true,
                        pods: entries,
                    },
                })
                .await;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            r = desired.changed() => if r.is_err() { return },
            r = connected_rx.changed() => if r.is_err() { return },
        }
    }
}

#[tokio::test]
async fn a_fleet_deployment_lands_only_on_its_fleet_and_is_evicted_from_a_disconnected_device() {
    use k8s_openapi::api::apps::v1::Deployment;
    let instance = unique("it-fleet");
    let ns = instance.clone();
    let (a1, a2, b1) = (
        format!("{instance}-a1"),
        format!("{instance}-a2"),
        format!("{instance}-b1"),
    );
    let _cleanup = KubeCleanup {
        nodes: vec![a1.clone(), a2.clone(), b1.clone()],
        namespace: Some(ns.clone()),
    };
    // Fleets of this test only: the other tests of this file run at the same time with Nodes of
    // their own, and a shared fleet name let the scheduler put this Deployment's pods on them
    // (the node test then waited in vain for its pod-less Node to be deleted).
    let (fleet_a, fleet_b) = (format!("{instance}-fa"), format!("{instance}-fb"));
    let hub = start_hub(
        &instance,
        vec![
            device(&a1, &fleet_a),
            device(&a2, &fleet_a),
            device(&b1, &fleet_b),
        ],
    )
    .await;
    create_namespace(&hub.client, &ns).await;
    for d in [&a1, &a2, &b1] {
        hub.connect(d, "4").await;
    }
    let (online_tx, online_rx) = watch::channel(
        [&a1, &a2, &b1]
            .iter()
            .map(|d| (d.to_string(), true))
            .collect::<BTreeMap<_, _>>(),
    );
    let sim_stop = CancellationToken::new();
    let sim = tokio::spawn(simulate_devices(
        hub.desired.clone(),
        online_rx,
        hub.events.tx.clone(),
        sim_stop.clone(),
    ));
    let nodes: Api<Node> = Api::all(hub.client.clone());
    for d in [&a1, &a2, &b1] {
        wait_for("node Ready without startup taints", 60, || async {
            let n = nodes.get(d).await.ok()?;
            let tainted = n
                .spec
                .as_ref()?
                .taints
                .iter()
                .flatten()
                .any(|t| t.key.starts_with("node.kubernetes.io/"));
            (ready_condition(&n)?.0 == "True" && !tainted).then_some(())
        })
        .await;
    }

    assert_eq!(
        nodes
            .get(&a1)
            .await
            .expect("node")
            .metadata
            .labels
            .unwrap_or_default()
            .get("topology.kubernetes.io/zone"),
        Some(&instance),
        "the Node's zone comes from the configured device label"
    );

    let deployments: Api<Deployment> = Api::namespaced(hub.client.clone(), &ns);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "nodeSelector": {"flightctl.io/fleet": fleet_a},
                    "tolerations": [
                        {"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "fleetlet", "effect": "NoSchedule"},
                        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 2},
                        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 2}
                    ],
                    "containers": [{"name": "app", "image": "localhost/fleetlet-test/busybox:1", "command": ["sleep", "3600"],
                                    "resources": {"requests": {"cpu": "100m", "memory": "16Mi"}}}]
                }
            }
        }
    }))
    .expect("deployment");
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
    let pods: Api<Pod> = Api::namespaced(hub.client.clone(), &ns);
    let placed = wait_for("2 Running Ready pods on fleet a", 60, || async {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        let ready: Vec<(String, String)> = list
            .items
            .iter()
            .filter(|p| {
                p.status.as_ref().is_some_and(|s| {
                    s.phase.as_deref() == Some("Running")
                        && s.conditions
                            .iter()
                            .flatten()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .map(|p| {
                (
                    p.metadata.name.clone().unwrap_or_default(),
                    p.spec
                        .as_ref()
                        .and_then(|s| s.node_name.clone())
                        .unwrap_or_default(),
                )
            })
            .collect();
        (ready.len() == 2).then_some(ready)
    })
    .await;
    for (pod, node) in &placed {
        assert!(
            node == &a1 || node == &a2,
            "{pod} landed on {node}, not on fleet a"
        );
    }
    wait_for("deployment available", 30, || async {
        let d = deployments.get("web").await.ok()?;
        (d.status?.available_replicas == Some(2)).then_some(())
    })
    .await;
    assert!(
        uids(
            &hub.desired
                .borrow()
                .get(&b1)
                .map(|x| x.1.clone())
                .unwrap_or_default()
        )
        .is_empty()
    );

    // Cut a device that runs a pod (this needs a zone not in partial disruption, hence this
    // test's own zone): after the grace its Node is Ready=Unknown, the real node
    // lifecycle controller taints it unreachable, the taint manager evicts after 2 s, and the
    // ReplicaSet's replacement goes to the other device of fleet a.
    let victim = placed[0].1.clone();
    let other = if victim == a1 { a2.clone() } else { a1.clone() };
    let victim_pods: Vec<String> = placed
        .iter()
        .filter(|(_, n)| *n == victim)
        .map(|(p, _)| p.clone())
        .collect();
    online_tx.send_modify(|m| {
        m.insert(victim.clone(), false);
    });
    hub.events
        .send(SessionEvent::Disconnected {
            device: victim.clone(),
        })
        .await
        .expect("send");
    wait_for(
        "replacement Running on the other fleet-a device",
        120,
        || async {
            let list = pods
                .list(&ListParams::default().labels("app=web"))
                .await
                .ok()?;
            let on_other = list
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| {
                    p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(other.as_str())
                })
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count();
            (on_other == 2).then_some(())
        },
    )
    .await;
    // The evicted pod stays terminating while its device is away (it may still run there).
    for p in &victim_pods {
        let pod = pods
            .get(p)
            .await
            .expect("evicted pod still present while the device is away");
        assert!(
            pod.metadata.deletion_timestamp.is_some(),
            "{p} is terminating"
        );
    }
    // Reconnect: the device gets a snapshot without the pod, reports it removed, and the hub
    // finishes the deletion.
    online_tx.send_modify(|m| {
        m.insert(victim.clone(), true);
    });
    hub.connect(&victim, "4").await;
    for p in &victim_pods {
        wait_for(
            "evicted pod deleted after the device confirmed",
            60,
            || async { matches!(pods.get_opt(p).await, Ok(None)).then_some(()) },
        )
        .await;
    }
    wait_for("DeviceReconnected event", 30, || {
        node_event(&hub.client, &victim, "DeviceReconnected")
    })
    .await;

    sim_stop.cancel();
    let _ = sim.await;
    let _ = deployments.delete("web", &DeleteParams::default()).await;
    cleanup(&hub.client, &ns, &[&a1, &a2, &b1]).await;
    hub.stop().await;
}

#[tokio::test]
async fn a_node_the_hub_does_not_own_survives_its_device_leaving_the_inventory() {
    let instance = unique("it-foreign");
    let (taken, ours) = (format!("{instance}-kubelet"), format!("{instance}-d1"));
    let _cleanup = KubeCleanup {
        nodes: vec![taken.clone(), ours.clone()],
        namespace: None,
    };
    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": taken}})).expect("node");
    let created = nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create the foreign Node");
    let hub = start_hub(
        &instance,
        vec![device(&taken, "fleet-a"), device(&ours, "fleet-a")],
    )
    .await;
    hub.connect(&taken, "1").await;
    hub.connect(&ours, "1").await;
    wait_for("NodeNameConflict event", 30, || {
        node_event(&hub.client, &taken, "NodeNameConflict")
    })
    .await;
    wait_for("our Node applied", 30, || async {
        nodes.get_opt(&ours).await.ok().flatten()
    })
    .await;
    // Both devices leave the inventory: ours is deleted, the foreign one stays.
    hub.inventory.send_replace(Arc::new(BTreeMap::new()));
    wait_for("our Node deleted", 30, || async {
        matches!(nodes.get_opt(&ours).await, Ok(None)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = nodes
        .get(&taken)
        .await
        .expect("the foreign Node is still there");
    assert_eq!(still.metadata.uid, created.metadata.uid);
    assert!(
        !still
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .any(|m| m.manager.as_deref() == Some("fleetlet")),
        "the hub never wrote to it"
    );
    hub.stop().await;
}

fn taint_keys(node: &Node) -> Vec<String> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|ts| ts.iter().map(|t| t.key.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_node_deleted_by_someone_else_is_created_again_and_foreign_taints_follow_their_owner() {
    let instance = unique("it-recreate");
    let dev = format!("{instance}-d1");
    let _cleanup = KubeCleanup {
        nodes: vec![dev.clone()],
        namespace: None,
    };
    let hub = start_hub(&instance, vec![device(&dev, "fleet-a")]).await;
    hub.connect(&dev, "1").await;
    let nodes: Api<Node> = Api::all(hub.client.clone());
    let first = wait_for("node ready", 30, || async {
        let n = nodes.get_opt(&dev).await.ok().flatten()?;
        (ready_condition(&n)?.0 == "True").then_some(n)
    })
    .await;

    // Another controller adds its taint; a label change makes the hub apply the Node again,
    // and the other controller's taint stays.
    let other = "example.com/other-controller";
    nodes
        .patch(
            &dev,
            &PatchParams::apply("other-controller").force(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Node", "metadata": {"name": dev},
                "spec": {"taints": [
                    {"key": "virtual-kubelet.io/provider", "value": "fleetlet", "effect": "NoSchedule"},
                    {"key": other, "effect": "NoExecute"}
                ]}
            })),
        )
        .await
        .expect("the other controller's taint");
    let mut relabelled = device(&dev, "fleet-a");
    relabelled.labels.insert("stage".into(), "one".into());
    hub.inventory
        .send_replace(Arc::new([(dev.clone(), relabelled.clone())].into()));
    let n = wait_for("the new label applied", 30, || async {
        let n = nodes.get(&dev).await.ok()?;
        (n.metadata.labels.as_ref()?.get("stage")? == "one").then_some(n)
    })
    .await;
    assert!(
        taint_keys(&n).contains(&other.to_string()),
        "{:?}",
        taint_keys(&n)
    );

    // The other controller takes its taint away (an update, as the node lifecycle controller
    // does); the hub's next apply does not bring it back.
    let mut current = nodes.get(&dev).await.expect("node");
    if let Some(spec) = current.spec.as_mut() {
        spec.taints
            .get_or_insert_with(Vec::new)
            .retain(|t| t.key != other);
    }
    current.metadata.managed_fields = None;
    nodes
        .replace(&dev, &PostParams::default(), &current)
        .await
        .expect("the other controller removes its taint");
    relabelled.labels.insert("stage".into(), "two".into());
    hub.inventory
        .send_replace(Arc::new([(dev.clone(), relabelled.clone())].into()));
    let n = wait_for("the second label applied", 30, || async {
        let n = nodes.get(&dev).await.ok()?;
        (n.metadata.labels.as_ref()?.get("stage")? == "two").then_some(n)
    })
    .await;
    let keys = taint_keys(&n);
    assert!(!keys.contains(&other.to_string()), "re-applied: {keys:?}");
    assert!(
        keys.contains(&"virtual-kubelet.io/provider".to_string()),
        "{keys:?}"
    );

    // Someone deletes the Node while the device is inventoried: the hub creates it again, with
    // its labels and status.
    nodes
        .delete(&dev, &DeleteParams::default())
        .await
        .expect("delete the node");
    let again = wait_for("the node created again, ready", 60, || async {
        let n = nodes.get_opt(&dev).await.ok().flatten()?;
        (n.metadata.uid != first.metadata.uid && ready_condition(&n)?.0 == "True").then_some(n)
    })
    .await;
    assert_eq!(
        again
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("stage"))
            .map(String::as_str),
        Some("two")
    );
    hub.stop().await;
}

/// Readiness gates: the device reports its containers ready; the hub, which sees the gate's
/// condition in the API (another controller sets it), holds Ready at False with the kubelet's
/// reason until the gate is True, then writes Ready True, as a kubelet evaluates them.
#[tokio::test]
async fn readiness_gates_are_evaluated_by_the_hub_against_the_api() {
    let instance = unique("it-gates");
    let dev = format!("{instance}-d1");
    let ns = instance.clone();
    let _cleanup = KubeCleanup {
        nodes: vec![dev.clone()],
        namespace: Some(ns.clone()),
    };
    let hub = start_hub(&instance, vec![device(&dev, "fleet-a")]).await;
    create_namespace(&hub.client, &ns).await;
    hub.connect(&dev, "1").await;
    let pods: Api<Pod> = Api::namespaced(hub.client.clone(), &ns);
    let mut pod = bound_pod("gated", &dev, "100m", None);
    if let Some(spec) = pod.spec.as_mut() {
        spec.readiness_gates = Some(vec![k8s_openapi::api::core::v1::PodReadinessGate {
            condition_type: "example.com/lb-ready".into(),
        }]);
    }
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let uid = created.metadata.uid.clone().expect("uid");
    hub.snapshot_where(&dev, "the gated pod", |b| uids(b).contains(&uid))
        .await;
    let running = json!({
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1",
        "startTime": "2026-01-01T00:00:00Z",
        "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}, {"type": "Initialized", "status": "True"}],
        "containerStatuses": [{"name": "app", "ready": true, "started": true, "restartCount": 0,
            "image": "localhost/fleetlet-test/busybox:1", "imageID": "sha256:abc",
            "state": {"running": {"startedAt": "2026-01-01T00:00:01Z"}}}]
    });
    hub.report(
        &dev,
        true,
        vec![PodStatusEntry {
            uid: uid.clone(),
            namespace: ns.clone(),
            name: "gated".into(),
            status_json: Bytes::from(serde_json::to_vec(&running).expect("json")),
            removed: false,
        }],
    )
    .await;
    let ready = |p: &Pod| {
        p.status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| {
                (
                    c.status.clone(),
                    c.reason.clone().unwrap_or_default(),
                    c.message.clone().unwrap_or_default(),
                )
            })
    };
    let held = wait_for("Ready held False by the gate", 30, || async {
        let p = pods.get("gated").await.ok()?;
        let r = ready(&p)?;
        (r.0 == "False" && p.status?.phase.as_deref() == Some("Running")).then_some(r)
    })
    .await;
    assert_eq!(held.1, "ReadinessGatesNotReady");
    assert_eq!(
        held.2,
        "corresponding condition of pod readiness gate \"example.com/lb-ready\" does not exist."
    );
    // Another controller opens the gate: the hub writes Ready True without the device.
    pods.patch_status(
        "gated",
        &PatchParams::default(),
        &Patch::Strategic(json!({"status": {"conditions": [
            {"type": "example.com/lb-ready", "status": "True"}
        ]}})),
    )
    .await
    .expect("open the gate");
    wait_for("Ready True once the gate is", 30, || async {
        let p = pods.get("gated").await.ok()?;
        (ready(&p)?.0 == "True").then_some(())
    })
    .await;
    // And closes it again.
    pods.patch_status(
        "gated",
        &PatchParams::default(),
        &Patch::Strategic(json!({"status": {"conditions": [
            {"type": "example.com/lb-ready", "status": "False"}
        ]}})),
    )
    .await
    .expect("close the gate");
    let closed = wait_for("Ready False again", 30, || async {
        let p = pods.get("gated").await.ok()?;
        let r = ready(&p)?;
        (r.0 == "False").then_some(r)
    })
    .await;
    assert_eq!(
        closed.2,
        "the status of pod readiness gate \"example.com/lb-ready\" is not \"True\", but False"
    );
}
