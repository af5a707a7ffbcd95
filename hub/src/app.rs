//! Wiring of the hub's Kubernetes side: the watches, the pod relay, the status writer, the node
//! manager and the session-event dispatcher, all under one shutdown token.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::HubConfig;
use crate::devices::LiveSet;
use crate::inventory::DeviceMap;
use crate::inventory::flightctl::HealthMap;
use crate::metrics::Metrics;
use crate::nodes::{NodeManager, PodCounts};
use crate::pods::kube_api::KubePodApi;
use crate::pods::status::StatusWriter;
use crate::pods::{BOUND_PODS_SELECTOR, Input, PodRelay, RelayConfig};
use crate::sessions::{SessionEvent, Sessions};

/// Name under which the hub reports events.
pub const CONTROLLER_NAME: &str = "fleetlet-hub";

/// Starts every Kubernetes-facing task of the hub on `tasks`; they stop on `shutdown`.
/// `flightctl_health` (with the Flightctl inventory) adds Flightctl's view to the Nodes.
/// The returned receiver turns `Some` once the pod cache is synced (readiness).
#[allow(clippy::too_many_arguments)]
pub fn start_controllers(
    tasks: &mut JoinSet<()>,
    client: kube::Client,
    cfg: &HubConfig,
    identity: &str,
    sessions: Arc<dyn Sessions>,
    events: mpsc::Receiver<SessionEvent>,
    inventory: watch::Receiver<DeviceMap>,
    flightctl_health: Option<watch::Receiver<HealthMap>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> watch::Receiver<PodCounts> {
    start_controllers_with_ports(
        tasks,
        client,
        cfg,
        identity,
        sessions,
        events,
        inventory,
        flightctl_health,
        metrics,
        None,
        shutdown,
    )
}

/// [`start_controllers`] with each Node's own kubelet port taken from `node_ports` (see
/// [`crate::kubelet_api::ports`]).
#[allow(clippy::too_many_arguments)]
pub fn start_controllers_with_ports(
    tasks: &mut JoinSet<()>,
    client: kube::Client,
    cfg: &HubConfig,
    identity: &str,
    sessions: Arc<dyn Sessions>,
    events: mpsc::Receiver<SessionEvent>,
    inventory: watch::Receiver<DeviceMap>,
    flightctl_health: Option<watch::Receiver<HealthMap>>,
    metrics: Arc<Metrics>,
    node_ports: Option<Arc<crate::kubelet_api::ports::NodePorts>>,
    shutdown: CancellationToken,
) -> watch::Receiver<PodCounts> {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: CONTROLLER_NAME.into(),
            instance: Some(identity.to_string()),
        },
    );
    let live = sessions.live();
    let mut node_manager = NodeManager::new(
        client.clone(),
        cfg.nodes.clone(),
        cfg.kubelet.advertise_address,
        cfg.kubelet.port(),
        metrics.clone(),
        recorder.clone(),
    );
    if let Some(health) = flightctl_health {
        node_manager = node_manager.with_flightctl_health(health);
    }
    if let Some(ports) = node_ports {
        node_manager = node_manager.with_node_ports(ports);
    }
    if cfg.leader_election.enabled {
        node_manager = node_manager
            .with_leader_lease(&cfg.leader_election.namespace, &cfg.leader_election.name);
    }
    let known_nodes = node_manager.known_nodes();
    let unready_nodes = node_manager.unready_nodes();
    let (writer, status_tx) = StatusWriter::new(
        client.clone(),
        cfg.pods.status_qps,
        cfg.pods.status_burst,
        metrics.clone(),
    );
    let (event_writer, event_tx) = crate::events::EventWriter::new(
        client.clone(),
        cfg.pods.event_qps,
        cfg.pods.event_burst,
        metrics.clone(),
    );
    tasks.spawn(event_writer.run(shutdown.clone()));
    let (relay, handles) = PodRelay::new(
        sessions,
        Arc::new(KubePodApi::new(client.clone(), recorder, metrics.clone())),
        status_tx,
        metrics.clone(),
        RelayConfig {
            debounce: cfg.debounce(),
            default_allocatable: cfg.nodes.default_capacity.clone(),
            bundle_limits: cfg.pods.bundle_limits(),
            device_ip_ranges: cfg.pods.ip_ranges().unwrap_or_default(),
        },
        inventory.clone(),
        live.clone(),
        known_nodes,
        unready_nodes,
    );
    let relay = relay.with_event_sink(event_tx);
    tasks.spawn(writer.run(shutdown.clone()));
    tasks.spawn(relay.run(shutdown.clone()));
    tasks.spawn(node_manager.run(
        inventory.clone(),
        live.clone(),
        handles.counts.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(dispatch(
        events,
        inventory,
        live,
        handles.inputs.clone(),
        metrics,
        shutdown.clone(),
    ));

    let pods: Api<Pod> = Api::all(client.clone());
    let pod_cfg = watcher::Config::default().fields(BOUND_PODS_SELECTOR);
    // managedFields are stripped on the way in: the relay never reads them, and they are a
    // large share of a pod object held for as long as the pod exists.
    tasks.spawn(forward(
        watcher(pods, pod_cfg).modify(|p: &mut Pod| p.metadata.managed_fields = None),
        handles.inputs.clone(),
        Input::Pod,
        "pods",
        shutdown.clone(),
    ));
    // Services for the pods' Service environment variables (trimmed to what those need as
    // they arrive; see pods::services).
    let services: Api<Service> = Api::all(client.clone());
    tasks.spawn(forward(
        watcher(services, watcher::Config::default()),
        handles.inputs.clone(),
        Input::Service,
        "services",
        shutdown.clone(),
    ));
    // The ConfigMap/Secret watches start once the pods are listed: the relay keeps only the
    // objects pods on fleetlet nodes reference, so their first list is then filtered by a
    // complete set of references instead of leaving a GET per object to make afterwards.
    let cms: Api<ConfigMap> = Api::all(client.clone());
    tasks.spawn(after_pods_listed(
        handles.counts.clone(),
        shutdown.clone(),
        forward(
            watcher(cms, watcher::Config::default()),
            handles.inputs.clone(),
            Input::ConfigMap,
            "configmaps",
            shutdown.clone(),
        ),
    ));
    let secrets: Api<Secret> = Api::all(client);
    tasks.spawn(after_pods_listed(
        handles.counts.clone(),
        shutdown.clone(),
        forward(
            watcher(secrets, watcher::Config::default()),
            handles.inputs,
            Input::Secret,
            "secrets",
            shutdown.clone(),
        ),
    ));
    handles.counts
}

/// Runs `task` once the relay has listed the pods (its pod counts are published).
async fn after_pods_listed(
    mut counts: watch::Receiver<PodCounts>,
    shutdown: CancellationToken,
    task: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        () = shutdown.cancelled() => return,
        r = counts.wait_for(Option::is_some) => if r.is_err() { return },
    }
    tracing::debug!("pods listed; starting a ConfigMap/Secret watch");
    task.await;
}

/// Feeds one watch into the relay, with kube-runtime's backoff on errors.
async fn forward<K, S>(
    stream: S,
    tx: mpsc::Sender<Input>,
    wrap: fn(watcher::Event<K>) -> Input,
    what: &'static str,
    shutdown: CancellationToken,
) where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    K: Send + 'static,
{
    let mut stream = std::pin::pin!(stream.default_backoff());
    loop {
        let item = tokio::select! {
            () = shutdown.cancelled() => return,
            i = stream.next() => i,
        };
        match item {
            Some(Ok(ev)) => {
                if tx.send(wrap(ev)).await.is_err() {
                    return;
                }
            }
            Some(Err(error)) => {
                tracing::warn!(watch = what, %error, "watch failed; retrying with backoff")
            }
            None => return,
        }
    }
}

/// Logs session events, keeps the per-device metrics and hands statuses and acks to the relay.
/// The live view itself is the link's (it published the event there before sending it).
async fn dispatch(
    mut events: mpsc::Receiver<SessionEvent>,
    inventory: watch::Receiver<DeviceMap>,
    live: watch::Receiver<LiveSet>,
    relay: mpsc::Sender<Input>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            () = shutdown.cancelled() => return,
            e = events.recv() => match e { Some(e) => e, None => return },
        };
        // The fleet in the log lines lets an operator follow one fleet's devices.
        let fleet = |device: &str| {
            inventory
                .borrow()
                .get(device)
                .and_then(|d| d.fleet.clone())
                .unwrap_or_default()
        };
        match &ev {
            SessionEvent::Connected { device, .. } => {
                tracing::info!(%device, fleet = %fleet(device), "device connected");
            }
            SessionEvent::Disconnected { device } => {
                tracing::info!(%device, fleet = %fleet(device), "device disconnected");
                let last = live.borrow().get(device).and_then(|d| d.capacity.clone());
                metrics.forget_device_capacity(device, last.as_ref());
                metrics.forget_device_reconcile(device);
            }
            SessionEvent::Capacity { device, capacity } => {
                metrics.set_device_capacity(device, capacity);
            }
            SessionEvent::Stats { device, stats } => {
                metrics.set_device_reconcile(device, stats);
            }
            _ => {}
        }
        let connected = live.borrow().values().filter(|d| d.connected).count();
        metrics
            .connected_devices
            .set(i64::try_from(connected).unwrap_or(i64::MAX));
        if matches!(
            ev,
            SessionEvent::PodStatus { .. }
                | SessionEvent::Acked { .. }
                | SessionEvent::Events { .. }
        ) && relay.send(Input::Session(ev)).await.is_err()
        {
            return;
        }
    }
}
