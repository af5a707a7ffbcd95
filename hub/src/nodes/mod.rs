//! NodeManager: one Node per enabled inventoried device, kept by server-side apply, with its
//! lease, readiness from the device's stream, and removal once a departed device's pods are gone.
//!
//! This module holds the manager's state (what was applied to each Node), its watch of the
//! hub's own Nodes and the work queue of nodes due; `plan` decides what each due node needs,
//! `apply` writes it; [`object`] builds the bodies, [`readiness`] is the Ready state machine,
//! [`lease`] the node Leases, [`flightctl`] what Flightctl's health adds.

mod apply;
pub mod flightctl;
pub mod lease;
pub mod object;
mod plan;
pub mod readiness;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::NodesConfig;
use crate::devices::LiveSet;
use crate::inventory::DeviceMap;
use crate::inventory::flightctl::HealthMap;
use crate::kubeutil::{is_not_found, status_code, time_string};
use crate::labels::is_valid_node_name;
use crate::metrics::Metrics;
use crate::workqueue::WorkQueue;
use lease::LeaseKeeper;
use object::{ConditionView, FIELD_MANAGER, LEADER_LEASE_ANNOTATION, MANAGED_LABEL, StatusInput};
pub use readiness::{ConditionStatus, NodeEvent, Readiness, ReadyState, Unready};

/// Pods per node name, published by the pod relay once its cache is synced.
pub type PodCounts = Option<Arc<BTreeMap<String, usize>>>;

/// Nodes whose Ready the hub has written as not True, and why: the relay marks their pods not
/// ready, as the node lifecycle controller would had it seen the transition itself.
pub type UnreadyNodes = Arc<BTreeMap<String, Unready>>;

/// Why a Node could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The API call failed; retried on the next pass.
    #[error(transparent)]
    Api(#[from] kube::Error),
    /// A Node of the device's name exists and this hub does not own it (it lacks our
    /// `fleetlet.io/managed-by` instance). Not retryable: the hub leaves that Node alone and
    /// does not serve the device until the Node is gone or the name is changed (re-checked on
    /// every resync).
    #[error("node {node} exists and is not owned by this hub ({owner}); the device is not served")]
    NotOwned {
        /// Node name.
        node: String,
        /// Who holds it, as far as the Node says.
        owner: String,
        /// The Node's UID, for the Event about it.
        uid: Option<String>,
    },
}

impl ApplyError {
    /// Whether the next pass may succeed without anyone changing anything: an API failure may,
    /// a Node held by someone else stays theirs until they delete it.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Api(_))
    }
}

/// Who a Node belongs to, as far as its `fleetlet.io/managed-by` label says.
pub fn node_owner(node: &Node) -> String {
    match node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_LABEL))
    {
        Some(instance) => format!("{MANAGED_LABEL}={instance}"),
        None => format!("no {MANAGED_LABEL} label: a kubelet's or another controller's"),
    }
}

/// Per-node memory of what was applied.
struct NodeState {
    uid: Option<String>,
    applied_labels: Option<BTreeMap<String, String>>,
    applied_status: Option<Value>,
    status_applied_at: Option<Instant>,
    ready: Readiness,
    next_lease: Instant,
    last_capacity: Option<(BTreeMap<String, String>, BTreeMap<String, String>)>,
    last_info: Option<fleetlet_proto::v1::NodeInfo>,
    deleted: bool,
    /// Start of the device's latest agent session (kept after it ends).
    session_started: Option<Instant>,
    /// Since when Flightctl's view holds Ready at False (see [`flightctl::ready_override`]).
    override_since: Option<String>,
    /// Status of the FlightctlDeviceHealthy condition and since when (RFC 3339).
    flightctl_condition: Option<(String, String)>,
    /// The label issues last reported, so each is logged once, not on every pass.
    label_issues: Vec<String>,
    /// A Node of this name exists that the hub does not own: who holds it, and when that was
    /// last checked. The device is not served while this is set.
    not_owned: Option<(String, Instant)>,
    /// The Ready condition as last written to (or read from) the API.
    applied_ready: Option<ReadyState>,
}

impl NodeState {
    fn new(ready: Readiness, next_lease: Instant) -> Self {
        Self {
            uid: None,
            applied_labels: None,
            applied_status: None,
            status_applied_at: None,
            ready,
            next_lease,
            last_capacity: None,
            last_info: None,
            deleted: false,
            session_started: None,
            override_since: None,
            flightctl_condition: None,
            label_issues: Vec::new(),
            applied_ready: None,
            not_owned: None,
        }
    }

    /// The Node is gone from the API: forget what was applied to it, so the next pass creates
    /// it again (labels first, then its status) instead of writing the status of a Node that
    /// no longer exists.
    fn forget_node(&mut self) {
        self.uid = None;
        self.applied_labels = None;
        self.applied_status = None;
        self.status_applied_at = None;
        self.applied_ready = None;
    }
}

/// Keeps the Nodes of all devices.
pub struct NodeManager {
    nodes: Api<Node>,
    leases: LeaseKeeper,
    recorder: Recorder,
    cfg: NodesConfig,
    address: IpAddr,
    port: u16,
    metrics: Arc<Metrics>,
    started: Instant,
    state: HashMap<String, NodeState>,
    known: watch::Sender<Arc<BTreeSet<String>>>,
    unready: watch::Sender<UnreadyNodes>,
    flightctl: Option<watch::Receiver<HealthMap>>,
    /// The leader-election Lease this hub leads on (`namespace/name`), when it elects.
    leader_lease: Option<String>,
    leases_api: kube::Client,
    /// Each Node's own kubelet port (`[kubelet] node_ports`), when configured.
    node_ports: Option<Arc<crate::kubelet_api::ports::NodePorts>>,
    /// Nodes already reported as getting no port of their own.
    portless: BTreeSet<String>,
    /// The Nodes carrying this hub's instance label, as the watch last saw them.
    store: Store<Node>,
    /// Feeds `store`; taken by `run`.
    writer: Option<reflector::store::Writer<Node>>,
    /// Nodes to plan, each due at its next deadline or at once after a change.
    queue: WorkQueue<String>,
}

/// How often a device whose Node name is taken by a Node the hub does not own is checked again.
const NOT_OWNED_RECHECK: Duration = Duration::from_secs(60);

impl NodeManager {
    /// A manager writing through `client`.
    pub fn new(
        client: kube::Client,
        cfg: NodesConfig,
        address: IpAddr,
        port: u16,
        metrics: Arc<Metrics>,
        recorder: Recorder,
    ) -> Self {
        let (store, writer) = reflector::store();
        Self {
            nodes: Api::all(client.clone()),
            leases: LeaseKeeper::new(client.clone(), cfg.lease_duration_secs),
            recorder,
            cfg,
            address,
            port,
            metrics,
            started: Instant::now(),
            state: HashMap::new(),
            known: watch::channel(Arc::new(BTreeSet::new())).0,
            unready: watch::channel(Arc::new(BTreeMap::new())).0,
            flightctl: None,
            leader_lease: None,
            leases_api: client,
            node_ports: None,
            portless: BTreeSet::new(),
            store,
            writer: Some(writer),
            queue: WorkQueue::new(),
        }
    }

    /// Gives every Node a kubelet port of its own from `ports` (kept across restarts: read back
    /// from the Node's daemonEndpoints) instead of the shared one.
    #[must_use]
    pub fn with_node_ports(mut self, ports: Arc<crate::kubelet_api::ports::NodePorts>) -> Self {
        self.node_ports = Some(ports);
        self
    }

    /// Marks every Node with the leader-election Lease this hub leads on, and stays off Nodes of
    /// its instance that another hub applies while leading on another live Lease (two
    /// deployments sharing one instance name).
    #[must_use]
    pub fn with_leader_lease(mut self, namespace: &str, name: &str) -> Self {
        self.leader_lease = Some(format!("{namespace}/{name}"));
        self
    }

    /// Adds Flightctl's view of every device: the `FlightctlDeviceHealthy` condition and its part
    /// in `Ready` (see [`flightctl`]).
    #[must_use]
    pub fn with_flightctl_health(mut self, health: watch::Receiver<HealthMap>) -> Self {
        self.flightctl = Some(health);
        self
    }

    /// Names of every Node the manager keeps (including departed devices' nodes not yet
    /// deleted), so the pod relay knows which nodes are fleetlet's.
    pub fn known_nodes(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        self.known.subscribe()
    }

    /// Nodes the hub holds out of Ready in the API (see [`UnreadyNodes`]).
    pub fn unready_nodes(&self) -> watch::Receiver<UnreadyNodes> {
        self.unready.subscribe()
    }

    /// A node that never connected (DeviceNotConnected) has no pods that were ever ready, and
    /// right after a hub restart every node is in that state until its agent is back: those are
    /// not published, so a restart never flaps pods.
    fn publish_unready(&self) {
        let unready: BTreeMap<String, Unready> = self
            .state
            .iter()
            .filter_map(|(name, st)| Some((name.clone(), st.applied_ready.as_ref()?.unready()?)))
            .collect();
        self.unready.send_if_modified(|cur| {
            if **cur == unready {
                false
            } else {
                *cur = Arc::new(unready);
                true
            }
        });
    }

    /// Only Nodes the hub created or found carrying its instance label are published: the relay
    /// serves a device only once its Node is known to be ours, so a device whose name collides
    /// with someone else's Node never gets that Node's pods (or their Secrets).
    fn publish_known(&self) {
        let names: BTreeSet<String> = self
            .state
            .iter()
            .filter(|(_, st)| st.uid.is_some() && st.not_owned.is_none())
            .map(|(name, _)| name.clone())
            .collect();
        self.known.send_if_modified(|cur| {
            if **cur == names {
                false
            } else {
                *cur = Arc::new(names);
                true
            }
        });
    }

    /// Runs until `shutdown`. Node names wait in one work queue: a change of the inventory,
    /// of a device's live view, of Flightctl's health or of a node's pod count queues the
    /// nodes it concerns at once; each node processed is queued again for its own next deadline
    /// (lease renewal, disconnect grace, status refresh, a failed write's retry); a pass plans
    /// only the nodes due. The hub's Nodes are watched (a reflector store, managedFields
    /// stripped), not re-listed, and every node is planned again on the periodic resync.
    pub async fn run(
        mut self,
        mut inventory: watch::Receiver<DeviceMap>,
        mut live: watch::Receiver<LiveSet>,
        mut pods: watch::Receiver<PodCounts>,
        shutdown: CancellationToken,
    ) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        let selector = format!("{MANAGED_LABEL}={}", self.cfg.instance);
        let node_events = watcher(
            self.nodes.clone(),
            watcher::Config::default().labels(&selector),
        )
        .default_backoff()
        .modify(|n: &mut Node| n.metadata.managed_fields = None)
        .reflect(writer);
        let mut node_events = std::pin::pin!(node_events);
        let mut listed = false;
        let mut seeded = false;
        let mut resync = tokio::time::interval(Duration::from_secs(60));
        let mut health = self.flightctl.clone();
        // What the last pass saw, to queue only the nodes a change concerns.
        let mut seen_inventory = inventory.borrow_and_update().clone();
        let mut seen_live = live.borrow_and_update().clone();
        let mut seen_pods = pods.borrow_and_update().clone();
        let mut seen_health = health.as_mut().map(|h| h.borrow_and_update().clone());
        loop {
            if listed && !seeded {
                self.seed();
                seeded = true;
                let names: Vec<String> = seen_inventory
                    .keys()
                    .chain(self.state.keys())
                    .cloned()
                    .collect();
                for name in names {
                    self.queue.add(name);
                }
            }
            if seeded {
                let due = self.queue.drain_due(Instant::now());
                if !due.is_empty() {
                    for name in &due {
                        self.queue.done(name);
                    }
                    self.pass(&seen_inventory, &seen_live, seen_pods.as_deref(), &due)
                        .await;
                    self.publish_known();
                    self.publish_unready();
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = inventory.changed() => {
                    let now = inventory.borrow_and_update().clone();
                    self.queue_changed(&seen_inventory, &now);
                    seen_inventory = now;
                }
                _ = live.changed() => {
                    let now = live.borrow_and_update().clone();
                    self.queue_changed(&seen_live, &now);
                    seen_live = now;
                }
                _ = pods.changed() => {
                    let now = pods.borrow_and_update().clone();
                    match (&seen_pods, &now) {
                        (Some(before), Some(after)) => self.queue_changed(before, after),
                        _ => self.queue_all(&seen_inventory),
                    }
                    seen_pods = now;
                }
                ev = node_events.next() => match ev {
                    Some(Ok(watcher::Event::InitDone)) => listed = true,
                    Some(Ok(watcher::Event::Delete(node))) => {
                        if let Some(name) = self.node_deleted(&node) {
                            self.queue.add(name);
                        }
                    }
                    // The store has it; the node's next pass reads it.
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        tracing::warn!(%error, "watching fleetlet nodes; retrying with backoff");
                    }
                    None => return,
                },
                r = async { health.as_mut()?.changed().await.ok() }, if health.is_some() => {
                    match (r, health.as_mut()) {
                        (Some(()), Some(rx)) => {
                            let now = rx.borrow_and_update().clone();
                            match &seen_health {
                                Some(before) => self.queue_changed(before, &now),
                                None => self.queue_all(&seen_inventory),
                            }
                            seen_health = Some(now);
                        }
                        // The inventory stopped; keep the last view, stop listening.
                        _ => health = None,
                    }
                }
                _ = resync.tick() => { seeded = false; }
                () = self.queue.due(), if seeded => {}
            }
        }
    }

    /// Queues every node whose entry differs between `before` and `after`.
    fn queue_changed<V: PartialEq>(
        &mut self,
        before: &BTreeMap<String, V>,
        after: &BTreeMap<String, V>,
    ) {
        let changed: Vec<String> = before
            .iter()
            .filter(|(k, v)| after.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .chain(after.keys().filter(|k| !before.contains_key(*k)))
            .cloned()
            .collect();
        for name in changed {
            self.queue.add(name);
        }
    }

    /// Queues every inventoried device's node and every node the manager keeps.
    fn queue_all(&mut self, inventory: &DeviceMap) {
        let names: Vec<String> = inventory.keys().chain(self.state.keys()).cloned().collect();
        for name in names {
            self.queue.add(name);
        }
    }

    /// One of the hub's Nodes was deleted. If it is the one the manager applied (same UID) and
    /// its device is still inventoried, the next pass creates it again; a departed device's
    /// Node the manager deleted itself is already forgotten.
    fn node_deleted(&mut self, node: &Node) -> Option<String> {
        let name = node.metadata.name.as_deref()?;
        let st = self.state.get_mut(name)?;
        if st.uid.is_some() && st.uid == node.metadata.uid {
            tracing::info!(
                node = name,
                "node deleted by someone else; the device still needs it"
            );
            st.forget_node();
            return Some(name.to_string());
        }
        None
    }

    /// Learns the Nodes this hub owns from the watched store (after a restart: their
    /// readiness, capacity and uid).
    fn seed(&mut self) {
        let now = time_string(Timestamp::now());
        for node in self.store.state() {
            let Some(name) = node.metadata.name.clone() else {
                continue;
            };
            // A Node another hub of the same instance name applies (its Lease on it) is not
            // taken as ours here: the pass checks that hub's Lease before applying to it.
            let lease = node
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LEADER_LEASE_ANNOTATION));
            if let (Some(ours), Some(theirs)) = (&self.leader_lease, lease)
                && ours != theirs
            {
                continue;
            }
            let entry = self
                .state
                .entry(name.clone())
                .or_insert_with(|| NodeState::new(Readiness::not_connected(&now), Instant::now()));
            entry.uid.clone_from(&node.metadata.uid);
            entry.deleted = false;
            let status = node.status.clone().unwrap_or_default();
            if let Some(ports) = &self.node_ports {
                let advertised = status
                    .daemon_endpoints
                    .as_ref()
                    .and_then(|d| d.kubelet_endpoint.as_ref())
                    .and_then(|e| u16::try_from(e.port).ok());
                if let Err(e) = ports.assign(&name, advertised) {
                    tracing::error!(error = %e, "node keeps no kubelet port of its own");
                }
            }
            if entry.last_capacity.is_none()
                && let (Some(c), Some(a)) = (&status.capacity, &status.allocatable)
            {
                let c = c.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
                let a = a.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
                entry.last_capacity = Some((c, a));
            }
            if entry.last_info.is_none()
                && let Some(i) = &status.node_info
            {
                entry.last_info = Some(fleetlet_proto::v1::NodeInfo {
                    operating_system: i.operating_system.clone(),
                    architecture: i.architecture.clone(),
                    kernel_version: i.kernel_version.clone(),
                    os_image: i.os_image.clone(),
                    machine_id: i.machine_id.clone(),
                    boot_id: i.boot_id.clone(),
                    container_runtime_version: i.container_runtime_version.clone(),
                    agent_version: String::new(),
                    addresses: Vec::new(),
                    pod_networks: Vec::new(),
                });
            }
            if entry.applied_status.is_none()
                && let Some(ready) = status
                    .conditions
                    .as_ref()
                    .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            {
                let state = ReadyState::from_condition(
                    &ready.status,
                    ready.reason.as_deref().unwrap_or_default(),
                );
                entry.applied_ready = Some(state.clone());
                entry.ready = Readiness {
                    announced_disconnect: state == ReadyState::Disconnected,
                    state,
                    message: ready.message.clone().unwrap_or_default(),
                    since: ready
                        .last_transition_time
                        .as_ref()
                        .map(|t| time_string(t.0))
                        .unwrap_or(now.clone()),
                };
            }
        }
    }
}
