//! PodRelay: the one cluster-wide watch of bound pods (plus the ConfigMaps and Secrets they
//! reference) turned into per-device desired snapshots; pod status from devices back into the
//! API; admission and kubelet-style deletion.
//!
//! The relay is a single task owning all of its state (no locks): watch events, session events,
//! inventory changes and timers arrive on channels and are folded in one at a time. This module
//! holds that state and the dispatch; each concern the state serves is a module of its own:
//!
//! - `store`: the pods, a reflector store indexed by UID, node and referenced object;
//! - `cache` and [`referenced`]: the ConfigMaps and Secrets pods reference, and only those;
//! - `snapshots`: per-device snapshots (admission, bundles, refusals), computed for the
//!   devices the shared [`crate::workqueue::WorkQueue`] has due after a short debounce and
//!   handed to the link only when their content changed;
//! - `reports`: pod statuses from devices into the [`status`] writer;
//! - `device_events`: device Events into the Event writer;
//! - `deletion`: finishing deletions once the pod's device confirms;
//! - `not_ready`: pods marked not ready while their Node is.

pub mod admission;
pub mod bundle;
mod cache;
mod deletion;
mod device_events;
pub mod kube_api;
mod not_ready;
pub mod readiness_gates;
pub mod referenced;
pub mod refusal;
mod reports;
pub mod sanitize;
pub mod services;
mod snapshots;
pub mod status;
mod store;

pub use reports::{MAX_REPORT_ENTRIES, MAX_STATUS_BYTES};

use cache::{Cache, deleted_key};
use device_events::DeviceDrops;
#[cfg(test)]
use reports::{MAX_EARLY_BYTES_PER_DEVICE, MAX_EARLY_STATUS_PER_DEVICE};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::runtime::watcher;
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::devices::LiveSet;
use crate::inventory::DeviceMap;
use crate::metrics::{Metrics, PhaseLabels};
use crate::nodes::{PodCounts, UnreadyNodes};
use crate::sessions::{SessionEvent, Sessions};
use crate::workqueue::WorkQueue;
use admission::Requests;
use not_ready::MarkedNotReady;
use referenced::{Key, Ref, RefKind, Referenced};
use status::StatusUpdate;
use store::PodStore;

/// Field selector of the one pod watch: every pod bound to some node. Field selectors cannot
/// say "one of these nodes", and fleetlet nodes carry no label a pod could be selected by, so
/// the relay filters by node membership itself.
pub const BOUND_PODS_SELECTOR: &str = "spec.nodeName!=";

/// Side effects of the relay on the API beyond status writes; behind a trait for unit tests.
pub trait PodApi: Send + Sync + 'static {
    /// Deletes the pod with grace 0 and a UID precondition.
    fn delete_pod(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> BoxFuture<'static, Result<(), kube::Error>>;
    /// Reads one ConfigMap or Secret; `None` when it does not exist.
    fn fetch(
        &self,
        kind: RefKind,
        namespace: &str,
        name: &str,
    ) -> BoxFuture<'static, Result<Option<Fetched>, kube::Error>>;
    /// Publishes a Warning event about Node `node`; `action` is what the hub was doing.
    fn node_event(
        &self,
        node: &str,
        action: &str,
        reason: &str,
        message: &str,
    ) -> BoxFuture<'static, Result<(), kube::Error>>;
    /// Publishes a Warning event about the pod; `action` is what the hub was doing.
    fn pod_event(
        &self,
        pod: &Pod,
        action: &str,
        reason: &str,
        message: &str,
    ) -> BoxFuture<'static, Result<(), kube::Error>>;
}

/// A ConfigMap or Secret read with a GET.
#[derive(Debug, Clone)]
pub enum Fetched {
    /// A ConfigMap.
    ConfigMap(ConfigMap),
    /// A Secret.
    Secret(Secret),
}

/// Everything that flows into the relay. Pod events are large, but each is moved once from the
/// watch to the relay; boxing would only add an allocation per event.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Input {
    /// A pod watch event.
    Pod(watcher::Event<Pod>),
    /// A ConfigMap watch event.
    ConfigMap(watcher::Event<ConfigMap>),
    /// A Secret watch event.
    Secret(watcher::Event<Secret>),
    /// A Service watch event (for the pods' Service environment variables).
    Service(watcher::Event<Service>),
    /// Something from a device stream.
    Session(SessionEvent),
    /// A deletion started by the relay finished.
    DeleteDone {
        /// Pod UID.
        uid: String,
        /// Whether the pod is gone.
        ok: bool,
    },
    /// A GET of a newly referenced ConfigMap or Secret answered.
    Fetched {
        /// What was read.
        what: Ref,
        /// The object, `None` if it does not exist, or the error.
        result: Result<Option<Fetched>, kube::Error>,
    },
}

/// Relay ticks (2 s) between retries of failed GETs.
const FETCH_RETRY_TICKS: u32 = 5;

/// Tunables of the relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Changes within this window go out as one snapshot.
    pub debounce: Duration,
    /// Allocatable assumed before a device reports one.
    pub default_allocatable: BTreeMap<String, String>,
    /// How large one pod's bundle and one device's snapshot may be.
    pub bundle_limits: refusal::BundleLimits,
    /// Address ranges devices may report for themselves and their pods (empty: any unicast).
    pub device_ip_ranges: Vec<sanitize::IpRange>,
}

/// What the relay keeps about one pod, by UID: one struct, so forgetting a pod is one removal
/// and no two maps can disagree about it.
#[derive(Debug, Default)]
struct PodState {
    /// Its resource requests once admitted on its device.
    admitted: Option<Requests>,
    /// Refused (admission, DaemonSet, bundle size): failed in the API, never sent.
    rejected: bool,
    /// Its device reported it removed.
    confirmed_removed: bool,
    /// Generation of the first snapshot that left it out while it terminates.
    excluded_in: Option<u64>,
    /// Its Running was observed (pod start latency measured once).
    started_observed: bool,
    /// Marked not ready because its node is: what to restore. A status from the device ends
    /// the mark.
    marked: Option<MarkedNotReady>,
    /// Its final deletion is in flight.
    deleting: bool,
}

impl PodState {
    /// Nothing worth keeping.
    fn is_empty(&self) -> bool {
        self.admitted.is_none()
            && !self.rejected
            && !self.confirmed_removed
            && self.excluded_in.is_none()
            && !self.started_observed
            && self.marked.is_none()
            && !self.deleting
    }

    /// Forgets everything but an in-flight deletion (its answer still arrives).
    fn forget(&mut self) {
        *self = Self {
            deleting: self.deleting,
            ..Self::default()
        };
    }
}

/// The relay task.
pub struct PodRelay {
    sessions: Arc<dyn Sessions>,
    api: Arc<dyn PodApi>,
    status_tx: mpsc::Sender<StatusUpdate>,
    metrics: Arc<Metrics>,
    cfg: RelayConfig,
    inputs: mpsc::Receiver<Input>,
    inventory: watch::Receiver<DeviceMap>,
    live: watch::Receiver<LiveSet>,
    known_nodes: watch::Receiver<Arc<BTreeSet<String>>>,
    unready: watch::Receiver<UnreadyNodes>,
    /// What the relay keeps about each pod, by UID (see [`PodState`]).
    pod_state: HashMap<String, PodState>,
    counts: watch::Sender<PodCounts>,
    pods: PodStore,
    config_maps: Cache<ConfigMap>,
    secrets: Cache<Secret>,
    /// What the Service environment variables need of every Service.
    services: services::Services,
    /// The ConfigMaps/Secrets pods on fleetlet nodes reference: the only ones cached.
    referenced: Referenced,
    /// GETs waiting for a slot (each also in `referenced.fetching`).
    fetch_queue: VecDeque<Ref>,
    fetches_in_flight: usize,
    /// Devices whose snapshot waits for a GET, by the object it waits for.
    waiting: HashMap<Ref, BTreeSet<String>>,
    ticks: u32,
    /// Latest known device-side state per device: uid → removed.
    reported: HashMap<String, HashMap<String, bool>>,
    /// Generation a device held when its latest full report arrived.
    full_report_gen: HashMap<String, u64>,
    acked: HashMap<String, u64>,
    /// Reports (statuses, removals) that arrived before the pod cache's first sync (a restarted
    /// hub accepts devices while it still lists pods, or the device's Node is not known to be
    /// ours yet), device → uid → entry; replayed once the cache has synced. A device sends a
    /// status again only when it changes, so dropping these would leave the API's status stale
    /// for good. Kept per device so one device's reports can never replace another's.
    early_status: HashMap<String, HashMap<String, fleetlet_proto::v1::PodStatusEntry>>,
    /// Entries and status bytes in `early_status`: all devices together, and per device.
    early_total: usize,
    early_bytes: usize,
    early_device_bytes: HashMap<String, usize>,
    last_sent: HashMap<String, u64>,
    sent_at: HashMap<String, Vec<(u64, Instant)>>,
    pending_admission: BTreeSet<String>,
    /// Devices whose snapshot is to be computed again, due one debounce after the first change.
    snapshots: WorkQueue<String>,
    done_tx: mpsc::Sender<Input>,
    counts_stale: bool,
    /// Where verified device Events go (the [`crate::events::EventWriter`]); `None` drops them.
    event_sink: Option<mpsc::Sender<crate::events::DeviceEventWrite>>,
    /// Per device, what it said about Events it dropped.
    device_events_dropped: HashMap<String, DeviceDrops>,
    /// Event batches that arrived before the pod cache synced or the device's Node was known
    /// to be ours (a restarted hub accepts devices while it still lists pods; the device was
    /// told they were taken), replayed then; at most [`MAX_EARLY_EVENT_BATCHES`].
    early_events: VecDeque<(String, fleetlet_proto::v1::EventBatch)>,
}

/// The handles `run` wires: where watch and session events go.
pub struct RelayHandles {
    /// Send watch and session events here.
    pub inputs: mpsc::Sender<Input>,
    /// Pods per fleetlet node, for the node manager.
    pub counts: watch::Receiver<PodCounts>,
}

impl PodRelay {
    /// Builds the relay.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        sessions: Arc<dyn Sessions>,
        api: Arc<dyn PodApi>,
        status_tx: mpsc::Sender<StatusUpdate>,
        metrics: Arc<Metrics>,
        cfg: RelayConfig,
        inventory: watch::Receiver<DeviceMap>,
        live: watch::Receiver<LiveSet>,
        known_nodes: watch::Receiver<Arc<BTreeSet<String>>>,
        unready: watch::Receiver<UnreadyNodes>,
    ) -> (Self, RelayHandles) {
        let (tx, rx) = mpsc::channel(4096);
        let (counts_tx, counts_rx) = watch::channel(None);
        let (mut relay, handles) = (
            Self {
                sessions,
                api,
                status_tx,
                metrics,
                cfg,
                inputs: rx,
                inventory,
                live,
                known_nodes,
                unready,
                pod_state: HashMap::new(),
                counts: counts_tx,
                pods: PodStore::new(),
                config_maps: Cache::new(),
                secrets: Cache::new(),
                services: services::Services::default(),
                referenced: Referenced::default(),
                fetch_queue: VecDeque::new(),
                fetches_in_flight: 0,
                waiting: HashMap::new(),
                ticks: 0,
                reported: HashMap::new(),
                full_report_gen: HashMap::new(),
                acked: HashMap::new(),
                early_status: HashMap::new(),
                early_total: 0,
                early_bytes: 0,
                early_device_bytes: HashMap::new(),
                last_sent: HashMap::new(),
                sent_at: HashMap::new(),
                pending_admission: BTreeSet::new(),
                snapshots: WorkQueue::new(),
                done_tx: tx.clone(),
                counts_stale: true,
                event_sink: None,
                device_events_dropped: HashMap::new(),
                early_events: VecDeque::new(),
            },
            RelayHandles {
                inputs: tx,
                counts: counts_rx,
            },
        );
        relay.mark_all();
        (relay, handles)
    }

    /// Sends the Events devices report about their own pods to `sink` (after the trust check).
    pub fn with_event_sink(mut self, sink: mpsc::Sender<crate::events::DeviceEventWrite>) -> Self {
        self.event_sink = Some(sink);
        self
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                input = self.inputs.recv() => match input {
                    Some(i) => self.handle(i),
                    None => return,
                },
                r = self.inventory.changed() => {
                    if r.is_err() { return; }
                    self.mark_all();
                    self.counts_stale = true;
                    self.rebuild_refs();
                }
                r = self.live.changed() => {
                    if r.is_err() { return; }
                    // Allocatable may have grown: retry pods waiting for admission.
                    let pending: Vec<String> = self.pending_admission.iter().cloned().collect();
                    for d in pending { self.mark(&d); }
                }
                r = self.known_nodes.changed() => {
                    if r.is_err() { return; }
                    self.counts_stale = true;
                    self.rebuild_refs();
                    // A device becomes servable once its Node is known to be ours.
                    self.mark_all();
                    if self.pods.synced {
                        self.replay_early_status();
                    }
                }
                r = self.unready.changed() => {
                    if r.is_err() { return; }
                    self.sync_not_ready();
                }
                // Until every cache has listed, snapshots wait queued (the last list marks all).
                () = self.snapshots.due(), if self.synced() => self.flush(),
                _ = tick.tick() => self.periodic(),
            }
        }
    }

    fn synced(&self) -> bool {
        self.pods.synced && self.config_maps.synced && self.secrets.synced && self.services.synced
    }

    /// True when `node` is a Node this hub owns (the node manager created it or found it
    /// carrying its instance label). A device whose name collides with a Node the hub does not
    /// own is in the inventory but not here: its pods are never relayed, its reports never
    /// written, that Node's pods never deleted.
    fn is_ours(&self, node: &str) -> bool {
        self.known_nodes.borrow().contains(node)
    }

    fn device_enabled(&self, node: &str) -> bool {
        self.inventory.borrow().get(node).is_some_and(|d| d.enabled)
    }

    /// Queues `device`'s snapshot, due one debounce after its first change since the last one.
    fn mark(&mut self, device: &str) {
        self.snapshots
            .add_after(device.to_string(), self.cfg.debounce);
    }

    /// Queues the snapshot of every device served (an inventory or Node ownership change, a
    /// re-list); devices no longer served keep no snapshot metric.
    fn mark_all(&mut self) {
        let inventory = self.inventory.borrow().clone();
        let owned = self.known_nodes.borrow().clone();
        let served: BTreeSet<String> = inventory
            .values()
            .filter(|d| d.enabled && owned.contains(&d.name))
            .map(|d| d.name.clone())
            .collect();
        let metrics = &self.metrics;
        self.last_sent.retain(|d, _| {
            served.contains(d) || {
                metrics.forget_snapshot_bytes(d);
                false
            }
        });
        for device in served {
            self.mark(&device);
        }
    }

    /// Folds one input into the state.
    pub fn handle(&mut self, input: Input) {
        match input {
            Input::Pod(ev) => {
                // The pod as stored before this event: its node and references are what the
                // event may take away.
                let before = match &ev {
                    watcher::Event::Apply(p) | watcher::Event::Delete(p) => {
                        self.pods.get(&PodStore::key(p))
                    }
                    _ => None,
                };
                let (uid, deleted, changed_node) = match &ev {
                    watcher::Event::Apply(p) | watcher::Event::Delete(p) => (
                        p.metadata.uid.clone(),
                        matches!(ev, watcher::Event::Delete(_)),
                        if matches!(ev, watcher::Event::Delete(_)) {
                            None
                        } else {
                            node_of(p)
                        },
                    ),
                    _ => (None, false, None),
                };
                let old_node = before.as_deref().and_then(node_of);
                // References of the pod before and after, for the ConfigMap/Secret scope.
                let (old_refs, new_refs) = match &ev {
                    watcher::Event::Apply(p) | watcher::Event::Delete(p) => (
                        before
                            .as_deref()
                            .map(|o| self.refs_of(o))
                            .unwrap_or_default(),
                        if deleted { Vec::new() } else { self.refs_of(p) },
                    ),
                    _ => (Vec::new(), Vec::new()),
                };
                let touched = matches!(ev, watcher::Event::Apply(_) | watcher::Event::Delete(_));
                let relisted = self.pods.apply(&ev);
                if !touched && !relisted {
                    return;
                }
                self.counts_stale = true;
                if relisted {
                    // The store was replaced: drop memory of pods that are gone, recompute all.
                    let live: HashSet<String> = self
                        .pods
                        .all()
                        .iter()
                        .filter_map(|p| p.metadata.uid.clone())
                        .collect();
                    for (uid, st) in &mut self.pod_state {
                        if !live.contains(uid) {
                            st.forget();
                        }
                    }
                    self.pod_state.retain(|_, st| !st.is_empty());
                    self.mark_all();
                    self.check_all_deletions();
                    self.replay_early_status();
                    self.rebuild_refs();
                    // Also the signal that starts the ConfigMap/Secret watches (see app.rs).
                    self.publish_counts();
                    return;
                }
                if !old_refs.is_empty() || !new_refs.is_empty() {
                    let new = self.referenced.add(&new_refs);
                    let gone = self.referenced.remove(&old_refs);
                    self.drop_unreferenced(&gone);
                    self.queue_fetches(new);
                }
                if let Some(n) = old_node {
                    self.mark(&n);
                }
                if let Some(n) = changed_node {
                    self.mark(&n);
                }
                if let Some(uid) = uid {
                    if deleted {
                        self.forget(&uid);
                    } else {
                        self.check_deletion(&uid);
                        self.recheck_gates(&uid);
                    }
                }
            }
            Input::ConfigMap(ev) => {
                if matches!(ev, watcher::Event::Init) {
                    self.referenced
                        .listing_new
                        .retain(|r| r.0 != RefKind::ConfigMap);
                }
                let listed = matches!(ev, watcher::Event::InitDone);
                let deleted = deleted_key(&ev);
                let referenced = &self.referenced;
                let changed = self.config_maps.apply(ev, |k| {
                    referenced.contains(&(RefKind::ConfigMap, k.clone()))
                });
                self.after_watch(RefKind::ConfigMap, &changed, deleted, listed);
                self.mark_referencing(&changed, RefKind::ConfigMap);
            }
            Input::Secret(ev) => {
                if matches!(ev, watcher::Event::Init) {
                    self.referenced
                        .listing_new
                        .retain(|r| r.0 != RefKind::Secret);
                }
                let listed = matches!(ev, watcher::Event::InitDone);
                let deleted = deleted_key(&ev);
                let referenced = &self.referenced;
                let changed = self
                    .secrets
                    .apply(ev, |k| referenced.contains(&(RefKind::Secret, k.clone())));
                self.after_watch(RefKind::Secret, &changed, deleted, listed);
                self.mark_referencing(&changed, RefKind::Secret);
            }
            Input::Service(ev) => {
                let listed = matches!(ev, watcher::Event::InitDone);
                self.services.apply(ev);
                // Like the kubelet, pods wait for the first list; a later change re-sends
                // nothing (the variables are what the Services were when a container starts).
                if listed && self.synced() {
                    self.mark_all();
                }
            }
            Input::Fetched { what, result } => self.fetched(what, result),
            Input::Session(ev) => self.session(ev),
            Input::DeleteDone { uid, ok } => {
                if let Some(st) = self.pod_state.get_mut(&uid) {
                    st.deleting = false;
                    if st.is_empty() {
                        self.pod_state.remove(&uid);
                    }
                }
                if !ok {
                    tracing::debug!(uid, "pod deletion failed; retried on the next pass");
                }
            }
        }
    }

    fn forget(&mut self, uid: &str) {
        if let Some(st) = self.pod_state.get_mut(uid) {
            st.forget();
            if st.is_empty() {
                self.pod_state.remove(uid);
            }
        }
    }

    /// The relay's record of pod `uid`, created empty.
    fn state(&mut self, uid: &str) -> &mut PodState {
        self.pod_state.entry(uid.to_string()).or_default()
    }

    /// Queues the snapshots of the devices whose pods reference a changed ConfigMap or Secret
    /// (an index lookup per object, not a scan of every pod).
    fn mark_referencing(&mut self, changed: &[(String, String)], kind: RefKind) {
        if changed.is_empty() || !self.synced() {
            if !changed.is_empty() {
                self.mark_all();
            }
            return;
        }
        let devices: BTreeSet<String> = changed
            .iter()
            .flat_map(|key| self.pods.nodes_referencing(&(kind, key.clone())))
            .collect();
        for d in devices {
            self.mark(&d);
        }
    }

    fn pod_by_uid(&self, uid: &str) -> Option<Arc<Pod>> {
        self.pods.by_uid(uid)
    }

    fn periodic(&mut self) {
        self.check_all_deletions();
        self.sync_not_ready();
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(FETCH_RETRY_TICKS) && !self.referenced.failed.is_empty() {
            let failed: Vec<Ref> = self.referenced.failed.drain().collect();
            self.queue_fetches(failed);
        }
        self.publish_counts();
    }

    /// Publishes pods per node (and the phase gauges) when they may have changed.
    fn publish_counts(&mut self) {
        if self.counts_stale && self.pods.synced {
            self.counts_stale = false;
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            let mut phases: BTreeMap<&'static str, i64> =
                ["Pending", "Running", "Succeeded", "Failed", "Unknown"]
                    .into_iter()
                    .map(|p| (p, 0))
                    .collect();
            // Only the hub's own Nodes' pods (through the node index), not every bound pod.
            let owned = self.known_nodes.borrow().clone();
            for (node, pod) in owned.iter().flat_map(|n| {
                self.pods
                    .on_node(n)
                    .into_iter()
                    .map(move |p| (n.clone(), p))
            }) {
                let phase = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .unwrap_or("Pending");
                let key = match phase {
                    "Running" => "Running",
                    "Succeeded" => "Succeeded",
                    "Failed" => "Failed",
                    "Unknown" => "Unknown",
                    _ => "Pending",
                };
                *phases.entry(key).or_default() += 1;
                if !matches!(key, "Succeeded" | "Failed") {
                    *counts.entry(node).or_default() += 1;
                }
            }
            for (phase, n) in phases {
                self.metrics
                    .pods
                    .get_or_create(&PhaseLabels {
                        phase: phase.to_string(),
                    })
                    .set(n);
            }
            self.counts.send_replace(Some(Arc::new(counts)));
        }
    }
}

fn node_of(p: &Pod) -> Option<String> {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests;
