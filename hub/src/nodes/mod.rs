//! NodeManager: one Node per enabled inventoried device, kept by server-side apply, with its
//! lease, readiness from the device's stream, and removal once a departed device's pods are gone.

pub mod flightctl;
pub mod lease;
pub mod object;
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

/// What one pass decided to do for one node.
struct Plan {
    name: String,
    labels: Option<BTreeMap<String, String>>,
    /// Label problems to announce in an Event once the labels are applied.
    label_issues: Vec<String>,
    /// Flightctl took the Node out of Ready: (reason, message) for a Warning Event.
    flightctl_not_ready: Option<(String, String)>,
    /// (what to compare next time, what to write).
    status: Option<(Value, Value)>,
    /// The Ready condition `status` writes.
    ready: ReadyState,
    lease: bool,
    event: Option<NodeEvent>,
    delete: bool,
    uid: Option<String>,
    /// Who held the Node when it was last found not owned (announced only on a change).
    not_owned: Option<String>,
}

/// What came of a plan.
struct Outcome {
    name: String,
    uid: Option<String>,
    labels_applied: Option<BTreeMap<String, String>>,
    status_applied: Option<Value>,
    ready_applied: Option<ReadyState>,
    lease_renewed: bool,
    deleted: bool,
    /// The Node turned out not to be ours: who holds it.
    not_owned: Option<String>,
    /// The Node is gone from the API (a status write found none): it is created again.
    gone: bool,
}

/// How often a device whose Node name is taken by a Node the hub does not own is checked again.
const NOT_OWNED_RECHECK: Duration = Duration::from_secs(60);

/// A node is planned at most this often by its own deadlines (a change queues it at once).
const MIN_REQUEUE: Duration = Duration::from_secs(1);

/// How often a departed device's node, waiting for its pods to go, is looked at again.
const DEPARTED_RECHECK: Duration = Duration::from_secs(10);

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

    /// The kubelet port `node` advertises: its own, or the shared one (without a range, or with
    /// the range exhausted, which is reported once per node).
    fn kubelet_port(
        ports: Option<&crate::kubelet_api::ports::NodePorts>,
        portless: &mut BTreeSet<String>,
        shared: u16,
        node: &str,
    ) -> u16 {
        let Some(ports) = ports else {
            return shared;
        };
        match ports.assign(node, None) {
            Ok(p) => {
                portless.remove(node);
                p
            }
            Err(e) => {
                if portless.insert(node.to_string()) {
                    tracing::error!(error = %e, "node advertises the shared kubelet port: its stats, metrics and pods are not served");
                }
                shared
            }
        }
    }

    /// Marks every Node with the leader-election Lease this hub leads on, and stays off Nodes of
    /// its instance that another hub applies while leading on another live Lease (two
    /// deployments sharing one instance name).
    #[must_use]
    pub fn with_leader_lease(mut self, namespace: &str, name: &str) -> Self {
        self.leader_lease = Some(format!("{namespace}/{name}"));
        self
    }

    /// Whether the Lease `namespace/name` is held right now (by a live holder). A Lease the hub
    /// cannot read counts as held: staying off is the safe side.
    async fn lease_is_live(&self, lease: &str) -> bool {
        let Some((namespace, name)) = lease.split_once('/') else {
            return false;
        };
        let api: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.leases_api.clone(), namespace);
        let r = api.get_opt(name).await;
        self.metrics.api("get_leader_lease", &r);
        let spec = match r {
            Ok(Some(l)) => l.spec.unwrap_or_default(),
            Ok(None) => return false,
            Err(_) => return true,
        };
        let holder = spec.holder_identity.unwrap_or_default();
        let (Some(renewed), Some(secs)) = (spec.renew_time, spec.lease_duration_seconds) else {
            return !holder.is_empty();
        };
        // Twice the duration: clock skew between the hubs must not make a live Lease look stale.
        let until =
            renewed.0 + std::time::Duration::from_secs(2 * u64::try_from(secs).unwrap_or(0));
        !holder.is_empty() && until > Timestamp::now()
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

    /// One level-triggered pass over the nodes `due`: each is planned from the current view of
    /// its device, written, and queued again for its next deadline.
    async fn pass(
        &mut self,
        inventory: &DeviceMap,
        live: &LiveSet,
        pod_counts: Option<&BTreeMap<String, usize>>,
        due: &[String],
    ) {
        let now = Instant::now();
        let wall = time_string(Timestamp::now());
        let grace = Duration::from_secs(self.cfg.disconnect_grace_secs);
        let refresh = Duration::from_secs(self.cfg.status_refresh_secs);
        let health_map = self.flightctl.as_ref().map(|rx| rx.borrow().clone());
        let mut plans = Vec::new();
        let wanted: BTreeSet<String> = inventory
            .values()
            .filter(|d| d.enabled && is_valid_node_name(&d.name))
            .map(|d| d.name.clone())
            .collect();
        for dev in due
            .iter()
            .filter_map(|name| inventory.get(name))
            .filter(|d| d.enabled)
        {
            if !is_valid_node_name(&dev.name) {
                tracing::warn!(device = %dev.name, "device name is not a valid Node name; no Node for it");
                continue;
            }
            let ld = live.get(&dev.name);
            let st = self
                .state
                .entry(dev.name.clone())
                .or_insert_with(|| NodeState::new(Readiness::not_connected(&wall), now));
            st.deleted = false;
            // Someone else's Node: leave it exactly as it is; look again now and then.
            let not_owned = match &st.not_owned {
                Some((_, at)) if now.duration_since(*at) < NOT_OWNED_RECHECK => continue,
                Some((owner, _)) => Some(owner.clone()),
                None => None,
            };
            if not_owned.is_some() {
                st.applied_labels = None;
            }
            if let Some(info) = ld.and_then(|l| l.info.clone()) {
                st.last_info = Some(info);
            }
            let connected = ld.is_some_and(|l| l.connected);
            if let Some(l) = ld.filter(|l| l.connected) {
                st.session_started = Some(l.since);
            }
            let away_for =
                now.duration_since(ld.map_or(self.started, |l| l.since.max(self.started)));
            let event = st.ready.step(connected, away_for, grace, &wall);

            let labels = object::node_labels(dev, st.last_info.as_ref(), &self.cfg);
            let mut label_issues = Vec::new();
            if st.applied_labels.as_ref() != Some(&labels) {
                let issues = object::label_issues(dev, &labels);
                if issues != st.label_issues {
                    for issue in &issues {
                        tracing::warn!(device = %dev.name, issue = %issue, "device label not usable as is on its Node");
                    }
                    st.label_issues.clone_from(&issues);
                    label_issues = issues;
                }
            }
            let labels_plan = (st.applied_labels.as_ref() != Some(&labels)).then_some(labels);

            let (capacity, allocatable) = match ld.and_then(|l| l.capacity.as_ref()) {
                Some(report) => object::resources(Some(report), &self.cfg.default_capacity),
                None => st
                    .last_capacity
                    .clone()
                    .unwrap_or_else(|| object::resources(None, &self.cfg.default_capacity)),
            };
            st.last_capacity = Some((capacity.clone(), allocatable.clone()));
            let fc = health_map.as_ref().and_then(|m| m.get(&dev.name));
            let mut flightctl_not_ready = None;
            let ready = match flightctl::ready_override(
                fc,
                st.ready.state.is_ready(),
                st.session_started,
            ) {
                Some((reason, message)) => {
                    if st.override_since.is_none() {
                        tracing::info!(node = %dev.name, %reason, "Flightctl reports the device going down; node not ready");
                        flightctl_not_ready = Some((reason.clone(), message.clone()));
                    }
                    let since = st.override_since.get_or_insert_with(|| wall.clone());
                    (
                        ReadyState::Other {
                            status: ConditionStatus::False,
                            reason,
                        },
                        message,
                        since.clone(),
                    )
                }
                None => {
                    if st.override_since.take().is_some() && st.ready.state.is_ready() {
                        // Back from False: that is a transition too.
                        st.ready.since.clone_from(&wall);
                    }
                    (
                        st.ready.state.clone(),
                        st.ready.message.clone(),
                        st.ready.since.clone(),
                    )
                }
            };
            let (ready_plan, message, last_transition) = ready;
            let mut conditions = vec![ConditionView {
                type_: "Ready".into(),
                status: ready_plan.status().as_str().into(),
                reason: ready_plan.reason().into(),
                message,
                last_transition,
            }];
            conditions.extend(object::pressure_conditions(
                ld.and_then(|l| l.capacity.as_ref()),
                &st.ready.since,
            ));
            let mut compared = conditions.clone();
            if let Some(h) = fc {
                let status = flightctl::condition_status(h.summary_status.as_deref());
                let since = match &st.flightctl_condition {
                    Some((s, since)) if s == status => since.clone(),
                    _ => wall.clone(),
                };
                st.flightctl_condition = Some((status.to_owned(), since.clone()));
                conditions.push(flightctl::condition(h, &since, true));
                compared.push(flightctl::condition(h, &since, false));
            }
            let port = Self::kubelet_port(
                self.node_ports.as_deref(),
                &mut self.portless,
                self.port,
                &dev.name,
            );
            let input = StatusInput {
                name: &dev.name,
                capacity: &capacity,
                allocatable: &allocatable,
                info: st.last_info.as_ref(),
                kubelet_version: &self.cfg.kubelet_version,
                conditions: &compared,
                address: self.address,
                port,
                heartbeat: "",
            };
            // Compare without the heartbeat and lastSeen: only a change or the refresh interval
            // writes.
            let cmp = object::status_body(&input);
            let stale = st
                .status_applied_at
                .is_none_or(|t| now.duration_since(t) >= refresh);
            let status_plan = (st.applied_status.as_ref() != Some(&cmp) || stale).then(|| {
                let full = object::status_body(&StatusInput {
                    conditions: &conditions,
                    ..input.clone()
                });
                (cmp, full)
            });
            let lease = connected && now >= st.next_lease;
            if labels_plan.is_some()
                || status_plan.is_some()
                || lease
                || event.is_some()
                || flightctl_not_ready.is_some()
            {
                plans.push(Plan {
                    name: dev.name.clone(),
                    labels: labels_plan,
                    label_issues,
                    flightctl_not_ready,
                    status: status_plan,
                    ready: ready_plan,
                    lease,
                    event,
                    delete: false,
                    uid: st.uid.clone(),
                    not_owned,
                });
            }
        }
        // Nodes of devices that left the inventory (or were disabled): delete once no pod is
        // bound to them any more. Pods are only known once the relay has synced.
        let mut forget = Vec::new();
        for (name, st) in due.iter().filter_map(|n| Some((n, self.state.get(n)?))) {
            if wanted.contains(name) || st.deleted {
                continue;
            }
            if st.not_owned.is_some() || st.uid.is_none() {
                // Never ours (or never created): nothing to delete, only to forget.
                forget.push(name.clone());
                continue;
            }
            let pods_left = pod_counts.map(|c| c.get(name).copied().unwrap_or(0));
            if pods_left == Some(0) {
                plans.push(Plan {
                    name: name.clone(),
                    labels: None,
                    label_issues: Vec::new(),
                    flightctl_not_ready: None,
                    status: None,
                    ready: ReadyState::NotConnected,
                    lease: false,
                    event: None,
                    delete: true,
                    uid: st.uid.clone(),
                    not_owned: None,
                });
            }
        }
        for name in forget {
            self.state.remove(&name);
        }
        self.count_not_owned();
        self.sync_ports(&wanted);
        if plans.is_empty() {
            self.queue_deadlines(due, live, &wanted, now);
            return;
        }
        let outcomes: Vec<Outcome> =
            futures::stream::iter(plans.into_iter().map(|p| self.execute(p, &wall)))
                .buffer_unordered(self.cfg.concurrency)
                .collect()
                .await;
        let renew = Duration::from_secs(self.cfg.lease_renew_secs);
        for o in outcomes {
            let Some(st) = self.state.get_mut(&o.name) else {
                continue;
            };
            if o.uid.is_some() {
                st.uid = o.uid;
            }
            let applied = o.labels_applied.is_some();
            if let Some(l) = o.labels_applied {
                st.applied_labels = Some(l);
            }
            if let Some(s) = o.status_applied {
                st.applied_status = Some(s);
                st.status_applied_at = Some(now);
            }
            if let Some(r) = o.ready_applied {
                st.applied_ready = Some(r);
            }
            if o.lease_renewed {
                st.next_lease = now + renew;
            }
            if o.deleted {
                st.deleted = true;
            }
            if o.gone {
                st.forget_node();
            }
            match o.not_owned {
                Some(owner) => {
                    st.not_owned = Some((owner, now));
                    st.uid = None;
                }
                None if applied => st.not_owned = None,
                None => {}
            }
        }
        self.count_not_owned();
        self.state.retain(|_, s| !s.deleted);
        self.sync_ports(&wanted);
        self.queue_deadlines(due, live, &wanted, now);
        let count = self.state.len();
        self.metrics
            .nodes
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Queues each node of `due` again for its next deadline: its lease renewal while its
    /// device is connected, the end of its disconnect grace while it is not, its status
    /// refresh, the recheck of a Node name someone else holds. A departed device's node waits
    /// for its pods, whose count changes queue it, and is looked at again now and then. Never
    /// sooner than [`MIN_REQUEUE`]: a write that failed leaves its deadline passed, and is
    /// tried again after that.
    fn queue_deadlines(
        &mut self,
        due: &[String],
        live: &LiveSet,
        wanted: &BTreeSet<String>,
        now: Instant,
    ) {
        let grace = Duration::from_secs(self.cfg.disconnect_grace_secs);
        let refresh = Duration::from_secs(self.cfg.status_refresh_secs);
        for name in due {
            let Some(st) = self.state.get(name) else {
                continue;
            };
            let ld = live.get(name);
            let connected = ld.is_some_and(|l| l.connected);
            let mut next = now + DEPARTED_RECHECK;
            if wanted.contains(name) {
                next = st.status_applied_at.map_or(now, |t| t + refresh);
                if connected {
                    next = next.min(st.next_lease);
                } else {
                    let away_since = ld.map_or(self.started, |l| l.since.max(self.started));
                    if now < away_since + grace {
                        next = next.min(away_since + grace);
                    }
                }
                if let Some((_, at)) = &st.not_owned {
                    next = *at + NOT_OWNED_RECHECK;
                }
            }
            self.queue.add_at(name.clone(), next.max(now + MIN_REQUEUE));
        }
    }

    /// Ports stay with their Nodes until the Nodes are gone, and are served while the devices
    /// are in the inventory (and the Node is ours).
    fn sync_ports(&self, wanted: &BTreeSet<String>) {
        let Some(ports) = &self.node_ports else {
            return;
        };
        let kept: BTreeSet<String> = self.state.keys().cloned().collect();
        let served: BTreeSet<String> = self
            .state
            .iter()
            .filter(|(n, st)| wanted.contains(*n) && st.not_owned.is_none() && st.uid.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        ports.sync(&kept, &served);
    }

    async fn execute(&self, plan: Plan, heartbeat: &str) -> Outcome {
        let mut out = Outcome {
            name: plan.name.clone(),
            uid: None,
            labels_applied: None,
            status_applied: None,
            ready_applied: None,
            lease_renewed: false,
            deleted: false,
            not_owned: None,
            gone: false,
        };
        let name = plan.name.as_str();
        if plan.delete {
            // The UID precondition: a Node someone else created under the same name after ours
            // went away is never deleted.
            let params = DeleteParams {
                preconditions: plan.uid.clone().map(|uid| kube::api::Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            let r = self.nodes.delete(name, &params).await;
            self.metrics.api("delete_node", &r);
            match r {
                Ok(_) => out.deleted = true,
                Err(e) if is_not_found(&e) => out.deleted = true,
                Err(e) if status_code(&e) == Some(409) => {
                    tracing::warn!(node = name, error = %e, "the node was replaced by one this hub did not create; left alone");
                    out.deleted = true;
                }
                Err(error) => {
                    tracing::warn!(node = name, %error, "deleting the node of a departed device")
                }
            }
            if out.deleted {
                tracing::info!(
                    node = name,
                    "device left the inventory and has no pods; node deleted"
                );
                let r = self.leases.remove(name).await;
                self.metrics.api("delete_lease", &r);
                if let Err(error) = r {
                    tracing::warn!(node = name, %error, "deleting node lease");
                }
            }
            return out;
        }
        let mut uid = plan.uid.clone();
        if let Some(labels) = plan.labels {
            match self.apply_node(name, &labels).await {
                Ok(applied_uid) => {
                    if uid.is_none() {
                        tracing::info!(node = name, "node applied");
                    }
                    uid = applied_uid;
                    out.uid.clone_from(&uid);
                    out.labels_applied = Some(labels);
                }
                Err(ApplyError::NotOwned {
                    owner,
                    uid: node_uid,
                    ..
                }) => {
                    if plan.not_owned.as_deref() != Some(owner.as_str()) {
                        self.announce_not_owned(name, node_uid.as_deref(), &owner)
                            .await;
                    }
                    out.not_owned = Some(owner);
                    return out;
                }
                Err(ApplyError::Api(e)) if status_code(&e) == Some(409) => {
                    tracing::info!(
                        node = name,
                        "the node changed since it was read; applying again on the next pass"
                    );
                    return out;
                }
                Err(error) => {
                    tracing::warn!(node = name, %error, retryable = error.is_retryable(), "applying node");
                    return out;
                }
            }
        }
        if let Some((cmp, mut body)) = plan.status {
            if let Some(conds) = body["status"]["conditions"].as_array_mut() {
                for c in conds {
                    c["lastHeartbeatTime"] = Value::String(heartbeat.to_string());
                }
            }
            let r = self
                .nodes
                .patch_status(
                    name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await;
            self.metrics.api("apply_node_status", &r);
            match r {
                Ok(_) => {
                    out.status_applied = Some(cmp);
                    out.ready_applied = Some(plan.ready.clone());
                }
                Err(e) if is_not_found(&e) => {
                    tracing::info!(node = name, "the node is gone; creating it again");
                    out.gone = true;
                    return out;
                }
                Err(error) => tracing::warn!(node = name, %error, "applying node status"),
            }
        }
        if plan.lease {
            let r = self.leases.renew(name, uid.as_deref()).await;
            self.metrics.api("renew_lease", &r);
            match r {
                Ok(()) => out.lease_renewed = true,
                Err(error) => tracing::warn!(node = name, %error, "renewing node lease"),
            }
        }
        if let Some(ev) = plan.event {
            let (reason, type_, note) = match ev {
                NodeEvent::Disconnected => (
                    "DeviceDisconnected",
                    EventType::Warning,
                    format!("device {name} disconnected from the hub longer than the grace period"),
                ),
                NodeEvent::Reconnected => (
                    "DeviceReconnected",
                    EventType::Normal,
                    format!("device {name} reconnected to the hub"),
                ),
            };
            tracing::info!(node = name, reason, "node event");
            self.publish(name, uid.as_deref(), type_, reason, note, "NodeReadiness")
                .await;
        }
        if let Some((reason, message)) = plan.flightctl_not_ready {
            self.publish(
                name,
                uid.as_deref(),
                EventType::Warning,
                &reason,
                format!("device {name}: {message}"),
                "NodeReadiness",
            )
            .await;
        }
        if out.labels_applied.is_some() && !plan.label_issues.is_empty() {
            let mut note = format!("device {name}: {}", plan.label_issues.join("; "));
            if note.len() > 1000 {
                let mut end = 1000;
                while !note.is_char_boundary(end) {
                    end -= 1;
                }
                note.truncate(end);
                note.push_str(" ...");
            }
            self.publish(
                name,
                uid.as_deref(),
                EventType::Warning,
                "InvalidDeviceLabels",
                note,
                "NodeLabels",
            )
            .await;
        }
        out
    }

    /// Publishes an Event about Node `name`; a failure is logged, never fatal.
    async fn publish(
        &self,
        name: &str,
        uid: Option<&str>,
        type_: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(name.to_string()),
            uid: uid.map(str::to_owned),
            ..Default::default()
        };
        let r = self
            .recorder
            .publish(
                &Event {
                    type_,
                    reason: reason.into(),
                    note: Some(note),
                    action: action.into(),
                    secondary: None,
                },
                &reference,
            )
            .await;
        self.metrics.api("create_event", &r);
        if let Err(error) = r {
            tracing::warn!(node = name, %error, "publishing node event");
        }
    }

    /// Tells the operator, the Node's Events and `/metrics` that a device is not served because
    /// its Node name is taken (the metric is the `nodes_not_owned` gauge).
    async fn announce_not_owned(&self, name: &str, uid: Option<&str>, owner: &str) {
        tracing::error!(
            device = name,
            node = name,
            owner,
            instance = %self.cfg.instance,
            "a Node named like the device exists and is not owned by this hub; the device is not served and the Node is left alone"
        );
        self.publish(
            name,
            uid,
            EventType::Warning,
            "NodeNameConflict",
            format!(
                "inventory device {name} is not served by fleetlet-hub instance {}: this Node is not owned by it ({owner})",
                self.cfg.instance
            ),
            "NodeOwnership",
        )
        .await;
    }

    fn count_not_owned(&self) {
        let n = self
            .state
            .values()
            .filter(|s| s.not_owned.is_some())
            .count();
        self.metrics
            .nodes_not_owned
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Applies labels and taints, keeping taints others set (the list is atomic). Returns the uid.
    ///
    /// Only a Node this hub owns is applied to: a missing Node is created (a create fails if
    /// someone else created one meanwhile, where an apply would take it over), and an existing
    /// Node without this hub's instance label is refused with [`ApplyError::NotOwned`].
    ///
    /// The Node is read from the watched store (a GET only when the store has none of that
    /// name: a Node not ours, or one the watch has not delivered yet). The apply carries the
    /// resourceVersion it read, so a taint another controller added or removed since is never
    /// written back from a stale copy: the API server refuses the apply (409) and the next pass
    /// reads again.
    async fn apply_node(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<String>, ApplyError> {
        let current = match self.store.get(&ObjectRef::new(name)) {
            Some(node) => Some(node),
            None => {
                let r = self.nodes.get_opt(name).await;
                self.metrics.api("get_node", &r);
                r?.map(Arc::new)
            }
        };
        let ours: Vec<Value> = self.cfg.taints.iter().map(object::taint_value).collect();
        let Some(current) = current else {
            let mut body = object::node_body(name, labels, &[], &ours);
            if let Some(lease) = &self.leader_lease {
                body["metadata"]["annotations"] =
                    serde_json::json!({ LEADER_LEASE_ANNOTATION: lease });
            }
            let node: Node = serde_json::from_value(body)
                .map_err(|e| ApplyError::Api(kube::Error::SerdeError(e)))?;
            let r = self.nodes.create(&PostParams::default(), &node).await;
            self.metrics.api("create_node", &r);
            return match r {
                Ok(created) => Ok(created.metadata.uid),
                // Created by someone else since the GET: the next pass looks at whose it is.
                Err(e) => Err(ApplyError::Api(e)),
            };
        };
        let owned = current
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_LABEL))
            .is_some_and(|v| *v == self.cfg.instance);
        if !owned {
            return Err(ApplyError::NotOwned {
                node: name.to_string(),
                owner: node_owner(&current),
                uid: current.metadata.uid.clone(),
            });
        }
        let theirs = current
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LEADER_LEASE_ANNOTATION));
        if let (Some(ours), Some(theirs)) = (&self.leader_lease, theirs)
            && ours != theirs
            && self.lease_is_live(theirs).await
        {
            return Err(ApplyError::NotOwned {
                node: name.to_string(),
                owner: format!(
                    "another fleetlet-hub with instance {} leads on Lease {theirs} (this hub: {ours}); two hub deployments share one instance name",
                    self.cfg.instance
                ),
                uid: current.metadata.uid.clone(),
            });
        }
        let others: Vec<Value> = current
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_deref())
            .unwrap_or_default()
            .iter()
            .filter_map(|t| serde_json::to_value(t).ok())
            .collect();
        let mut body = object::node_body(name, labels, &others, &ours);
        if let Some(lease) = &self.leader_lease {
            body["metadata"]["annotations"] = serde_json::json!({ LEADER_LEASE_ANNOTATION: lease });
        }
        // The apply carries the UID and resourceVersion it read: if the Node was replaced or
        // changed since, the API server refuses it instead of taking the new one over or
        // writing back taints from the old copy.
        body["metadata"]["uid"] = serde_json::json!(current.metadata.uid);
        body["metadata"]["resourceVersion"] = serde_json::json!(current.metadata.resource_version);
        let r = self
            .nodes
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await;
        self.metrics.api("apply_node", &r);
        Ok(r?.metadata.uid)
    }
}
