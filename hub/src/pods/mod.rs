//! PodRelay: the one cluster-wide watch of bound pods (plus the ConfigMaps and Secrets they
//! reference) turned into per-device desired snapshots; pod status from devices back into the
//! API; admission and kubelet-style deletion.
//!
//! The relay is a single task owning all of its state (no locks): watch events, session events,
//! inventory changes and timers arrive on channels and are folded in one at a time. Snapshots
//! are computed level-triggered per dirty device after a short debounce and only handed to the
//! link when their content changed.

pub mod admission;
pub mod bundle;
pub mod kube_api;
mod not_ready;
pub mod referenced;
pub mod refusal;
pub mod sanitize;
pub mod status;
mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
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

/// A cache fed by a watcher, rebuilt atomically on every re-list.
struct Cache<K> {
    items: BTreeMap<(String, String), K>,
    relist: Option<BTreeMap<(String, String), K>>,
    synced: bool,
}

impl<K: kube::Resource> Cache<K> {
    fn new() -> Self {
        Self {
            items: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
    fn key(o: &K) -> (String, String) {
        (
            o.meta().namespace.clone().unwrap_or_default(),
            o.meta().name.clone().unwrap_or_default(),
        )
    }
    /// Folds an event, storing only objects whose key `keep` accepts; returns the keys whose
    /// object changed (all keys on a re-list).
    fn apply(
        &mut self,
        ev: watcher::Event<K>,
        keep: impl Fn(&Key) -> bool,
    ) -> Vec<(String, String)> {
        match ev {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(o) => {
                let k = Self::key(&o);
                if let Some(r) = self.relist.as_mut().filter(|_| keep(&k)) {
                    r.insert(k, o);
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                if let Some(r) = self.relist.take() {
                    let mut changed: BTreeSet<_> = self.items.keys().cloned().collect();
                    changed.extend(r.keys().cloned());
                    self.items = r;
                    self.synced = true;
                    changed.into_iter().collect()
                } else {
                    Vec::new()
                }
            }
            watcher::Event::Apply(o) => {
                let k = Self::key(&o);
                if keep(&k) {
                    self.items.insert(k.clone(), o);
                    vec![k]
                } else if self.items.remove(&k).is_some() {
                    vec![k]
                } else {
                    Vec::new()
                }
            }
            watcher::Event::Delete(o) => {
                let k = Self::key(&o);
                self.items.remove(&k);
                vec![k]
            }
        }
    }
}

/// Relay ticks (2 s) between retries of failed GETs.
const FETCH_RETRY_TICKS: u32 = 5;

/// Entries of one status report the relay looks at; a device runs far fewer pods.
pub const MAX_REPORT_ENTRIES: usize = 2_048;

/// Largest PodStatus JSON the relay accepts from a device: a real one is a few KiB (about
/// 350 bytes per container), and the API server would not store a pod much larger than this.
pub const MAX_STATUS_BYTES: usize = 1024 * 1024;

/// Upper bound of statuses kept while the pod cache has not synced yet (one per pod UID).
const MAX_EARLY_STATUS: usize = 100_000;

/// Upper bound of those statuses per device: far more pods than a device runs, far fewer than
/// a device inventing UIDs could send.
const MAX_EARLY_STATUS_PER_DEVICE: usize = 1_000;

/// Bytes of those statuses per device (a real status is a few KiB).
const MAX_EARLY_BYTES_PER_DEVICE: usize = 8 * 1024 * 1024;

/// Bytes of those statuses, all devices together.
const MAX_EARLY_BYTES: usize = 256 * 1024 * 1024;

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

/// A device's reports of the Events it dropped (its buffer was full).
#[derive(Debug, Clone, Copy)]
struct DeviceDrops {
    /// The agent run the count belongs to.
    epoch: u64,
    /// The count it last reported.
    seen: u64,
    /// Drops not yet told in a Node Warning.
    untold: u64,
    /// When the last Node Warning went out.
    told_at: Option<Instant>,
}

/// At most one `EventsDropped` Warning per Node in this long (the metric counts every drop).
const DROPS_TOLD_EVERY: Duration = Duration::from_secs(60);

/// Event batches held until the pod cache synced, all devices together (the oldest go first).
const MAX_EARLY_EVENT_BATCHES: usize = 1024;
/// The same per device (a batch is at most 64 Events of at most 1 KiB each: 512 KiB a device).
const MAX_EARLY_EVENT_BATCHES_PER_DEVICE: usize = 8;

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

    /// Device Events: each must be about a pod bound to the reporting device's own Node, and is
    /// written with that pod's namespace, name and uid from the API (never the device's word), so
    /// a device cannot write Events about other devices' pods or into other namespaces. The
    /// device's own drop count becomes a Warning on its Node and a metric.
    fn device_events(&mut self, device: String, batch: fleetlet_proto::v1::EventBatch) {
        let total = batch.events.len() as u64;
        if !self.pods.synced || !self.is_ours(&device) {
            if self.pods.synced && !self.device_enabled(&device) {
                self.metrics.device_event("not_bound", total);
                return;
            }
            let mine = self
                .early_events
                .iter()
                .filter(|(d, _)| *d == device)
                .count();
            let oldest = if mine >= MAX_EARLY_EVENT_BATCHES_PER_DEVICE {
                self.early_events.iter().position(|(d, _)| *d == device)
            } else if self.early_events.len() >= MAX_EARLY_EVENT_BATCHES {
                Some(0)
            } else {
                None
            };
            if let Some((_, dropped)) = oldest.and_then(|i| self.early_events.remove(i)) {
                self.metrics
                    .device_event("dropped_queue_full", dropped.events.len() as u64);
            }
            self.early_events.push_back((device, batch));
            return;
        }
        let mut drops = self
            .device_events_dropped
            .get(&device)
            .copied()
            .filter(|d| d.epoch == batch.epoch)
            .unwrap_or(DeviceDrops {
                epoch: batch.epoch,
                seen: 0,
                untold: 0,
                told_at: None,
            });
        if batch.dropped_total > drops.seen {
            let newly = batch.dropped_total - drops.seen;
            drops.seen = batch.dropped_total;
            drops.untold += newly;
            self.metrics.device_event("dropped_on_device", newly);
            tracing::warn!(%device, dropped = newly, "device dropped Events (its buffer was full)");
        }
        let due = drops
            .told_at
            .is_none_or(|at| at.elapsed() >= DROPS_TOLD_EVERY);
        if drops.untold > 0 && due {
            let api = self.api.clone();
            let node = device.clone();
            let message = format!(
                "device {device} dropped {} pod Events (its buffer of unsent Events was full; {} since its agent started)",
                drops.untold, batch.dropped_total
            );
            drops.untold = 0;
            drops.told_at = Some(Instant::now());
            tokio::spawn(async move {
                if let Err(error) = api
                    .node_event(&node, "RecordEvents", "EventsDropped", &message)
                    .await
                {
                    tracing::warn!(node, %error, "publishing the EventsDropped event failed");
                }
            });
        }
        self.device_events_dropped.insert(device.clone(), drops);
        let Some(sink) = self.event_sink.clone() else {
            return;
        };
        // Each Event's pod by its UID (an index lookup, no scan), bound to this device or not
        // written.
        let bound: HashMap<String, (String, String)> = batch
            .events
            .iter()
            .filter(|e| !e.pod_uid.is_empty())
            .filter_map(|e| self.pods.by_uid(&e.pod_uid))
            .filter(|p| node_of(p).as_deref() == Some(device.as_str()))
            .filter_map(|p| {
                Some((
                    p.metadata.uid.clone()?,
                    (
                        p.metadata.namespace.clone().unwrap_or_default(),
                        p.metadata.name.clone().unwrap_or_default(),
                    ),
                ))
            })
            .collect();
        let mut not_bound = 0u64;
        let mut invalid = 0u64;
        for mut event in batch.events {
            if event.pod_uid.is_empty() {
                event.field_path.clear();
                // About the device's own Node: that much any device may say.
                if let Err(why) = crate::events::check(&event) {
                    tracing::debug!(%device, why, "device Event refused");
                    invalid += 1;
                    continue;
                }
                let write = crate::events::DeviceEventWrite {
                    regarding: crate::events::Regarding::Node,
                    node: device.clone(),
                    epoch: batch.epoch,
                    namespace: crate::events::NODE_EVENTS_NAMESPACE.into(),
                    pod_name: device.clone(),
                    pod_uid: device.clone(),
                    event,
                    attempts: 0,
                };
                if sink.try_send(write).is_err() {
                    self.metrics.device_event("dropped_queue_full", 1);
                }
                continue;
            }
            let Some((namespace, pod_name)) = bound.get(&event.pod_uid) else {
                not_bound += 1;
                continue;
            };
            if let Err(why) = crate::events::check(&event) {
                tracing::debug!(%device, why, "device Event refused");
                invalid += 1;
                continue;
            }
            let write = crate::events::DeviceEventWrite {
                regarding: crate::events::Regarding::Pod,
                node: device.clone(),
                epoch: batch.epoch,
                namespace: namespace.clone(),
                pod_name: pod_name.clone(),
                pod_uid: event.pod_uid.clone(),
                event,
                attempts: 0,
            };
            if sink.try_send(write).is_err() {
                self.metrics.device_event("dropped_queue_full", 1);
            }
        }
        if not_bound > 0 {
            // One line per batch: a flood must not flood the log too.
            tracing::warn!(%device, events = not_bound, "Events about pods not bound to this device; dropped");
            self.metrics.device_event("not_bound", not_bound);
        }
        if invalid > 0 {
            tracing::warn!(%device, events = invalid, "invalid Events from the device; dropped");
            self.metrics.device_event("invalid", invalid);
        }
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
        self.pods.synced && self.config_maps.synced && self.secrets.synced
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

    /// Relays the statuses that arrived before the pod cache synced (see `early_status`).
    fn replay_early_status(&mut self) {
        self.early_total = 0;
        self.early_bytes = 0;
        self.early_device_bytes.clear();
        let held: Vec<_> = self.early_events.drain(..).collect();
        for (device, batch) in held {
            self.device_events(device, batch);
        }
        let stashed: Vec<_> = self.early_status.drain().collect();
        for (device, entries) in stashed {
            let pods: Vec<_> = entries.into_values().collect();
            tracing::debug!(%device, pods = pods.len(), "relaying statuses that arrived before the pod cache synced");
            self.session(SessionEvent::PodStatus {
                device,
                report: fleetlet_proto::v1::PodStatusReport { full: false, pods },
                inflight: Default::default(),
            });
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

    fn session(&mut self, ev: SessionEvent) {
        match ev {
            SessionEvent::PodStatus {
                device, mut report, ..
            } => {
                // A device is served once its Node is known to be ours. Until then (its Node not
                // created yet, or held by someone else) its statuses wait like those that arrive
                // before the pod cache synced, within the same bounds.
                let servable = self.is_ours(&device);
                if self.pods.synced && !servable && !self.device_enabled(&device) {
                    self.metrics
                        .dropped("device_not_served", report.pods.len() as u64);
                    return;
                }
                if report.pods.len() > MAX_REPORT_ENTRIES {
                    tracing::warn!(%device, entries = report.pods.len(), limit = MAX_REPORT_ENTRIES, "pod status report with too many entries; the rest dropped");
                    self.metrics.dropped(
                        "report_too_many_entries",
                        (report.pods.len() - MAX_REPORT_ENTRIES) as u64,
                    );
                    report.pods.truncate(MAX_REPORT_ENTRIES);
                }
                if report.full {
                    let held = self.acked.get(&device).copied().unwrap_or(0);
                    self.full_report_gen.insert(device.clone(), held);
                    self.reported.insert(device.clone(), HashMap::new());
                }
                // The pods of this report, by UID (an index lookup each, not a scan).
                #[allow(clippy::type_complexity)]
                let by_uid: HashMap<
                    String,
                    (
                        String,
                        String,
                        Option<String>,
                        Option<String>,
                        sanitize::PodFacts,
                    ),
                > = report
                    .pods
                    .iter()
                    .filter_map(|e| {
                        let p = self.pods.by_uid(&e.uid)?;
                        Some((
                            e.uid.clone(),
                            (
                                p.metadata.namespace.clone().unwrap_or_default(),
                                p.metadata.name.clone().unwrap_or_default(),
                                node_of(&p),
                                scheduled_at(&p),
                                sanitize::PodFacts::of(&p),
                            ),
                        ))
                    })
                    .collect();
                let reported = self.reported.entry(device.clone()).or_default();
                let mut check = Vec::new();
                let mut not_bound = 0u64;
                let announced = self
                    .live
                    .borrow()
                    .get(&device)
                    .and_then(|l| l.info.as_ref())
                    .map(sanitize::Announced::of)
                    .unwrap_or_default();
                for entry in report.pods {
                    if entry.status_json.len() > MAX_STATUS_BYTES {
                        tracing::warn!(%device, uid = %entry.uid, bytes = entry.status_json.len(), limit = MAX_STATUS_BYTES, "pod status larger than any real one; dropped");
                        self.metrics.dropped("status_too_large", 1);
                        continue;
                    }
                    if (!self.pods.synced && !by_uid.contains_key(&entry.uid)) || !servable {
                        let held = self.early_status.entry(device.clone()).or_default();
                        let device_bytes =
                            self.early_device_bytes.entry(device.clone()).or_default();
                        let size = entry.status_json.len();
                        let old = held.get(&entry.uid).map(|e| e.status_json.len());
                        let fits = self.early_total + usize::from(old.is_none())
                            <= MAX_EARLY_STATUS
                            && held.len() + usize::from(old.is_none())
                                <= MAX_EARLY_STATUS_PER_DEVICE
                            && *device_bytes - old.unwrap_or(0) + size
                                <= MAX_EARLY_BYTES_PER_DEVICE
                            && self.early_bytes - old.unwrap_or(0) + size <= MAX_EARLY_BYTES;
                        if fits {
                            self.early_total += usize::from(old.is_none());
                            *device_bytes = *device_bytes - old.unwrap_or(0) + size;
                            self.early_bytes = self.early_bytes - old.unwrap_or(0) + size;
                            held.insert(entry.uid.clone(), entry);
                        } else {
                            self.metrics.dropped("early_status_full", 1);
                        }
                        continue;
                    }
                    let bound_here = by_uid
                        .get(&entry.uid)
                        .is_some_and(|(_, _, node, _, _)| node.as_deref() == Some(device.as_str()));
                    if !bound_here {
                        // Dropped before anything is recorded: a device reporting UIDs that are
                        // not its pods (another device's, or made up) costs the hub nothing.
                        not_bound += 1;
                        continue;
                    }
                    if entry.removed {
                        // Only the pod's own device may confirm its removal (checked above): a
                        // removal claimed by another device would let it force-delete that
                        // device's running pod.
                        reported.insert(entry.uid.clone(), true);
                        self.pod_state
                            .entry(entry.uid.clone())
                            .or_default()
                            .confirmed_removed = true;
                        check.push(entry.uid);
                        continue;
                    }
                    reported.insert(entry.uid.clone(), false);
                    let Some((namespace, name, _, scheduled, facts)) = by_uid.get(&entry.uid)
                    else {
                        continue;
                    };
                    if self.pod_state.get(&entry.uid).is_some_and(|st| st.rejected) {
                        continue;
                    }
                    let status: Value = match serde_json::from_slice(&entry.status_json) {
                        Ok(v @ Value::Object(_)) => v,
                        _ => {
                            tracing::warn!(%device, pod = %name, %namespace, "device sent a pod status that is not a JSON object; ignored");
                            continue;
                        }
                    };
                    // Only what an agent may say, for containers the pod has.
                    let status = match sanitize::sanitize(
                        status,
                        facts,
                        &self.cfg.device_ip_ranges,
                        &announced,
                    ) {
                        Ok((status, notes)) => {
                            if !notes.is_empty() {
                                tracing::warn!(%device, pod = %name, %namespace, dropped = %notes.join("; "), "device sent pod status fields it may not set; dropped");
                                self.metrics.dropped("status_field", notes.len() as u64);
                            }
                            status
                        }
                        Err(refused) => {
                            tracing::warn!(%device, pod = %name, %namespace, error = %refused, "device sent an impossible pod status; ignored");
                            self.metrics.dropped("status_refused", 1);
                            continue;
                        }
                    };
                    if status.get("phase").and_then(Value::as_str) == Some("Running")
                        && !std::mem::replace(
                            &mut self
                                .pod_state
                                .entry(entry.uid.clone())
                                .or_default()
                                .started_observed,
                            true,
                        )
                    {
                        tracing::debug!(%device, pod = %name, %namespace, "pod reported Running");
                        if let Some(t) = scheduled
                            .as_deref()
                            .and_then(|s| s.parse::<k8s_openapi::jiff::Timestamp>().ok())
                        {
                            let secs = k8s_openapi::jiff::Timestamp::now()
                                .duration_since(t)
                                .as_secs_f64();
                            self.metrics.pod_start_seconds.observe(secs.max(0.0));
                        }
                    }
                    let update = StatusUpdate {
                        uid: entry.uid.clone(),
                        namespace: namespace.clone(),
                        name: name.clone(),
                        status,
                    };
                    match self.status_tx.try_send(update) {
                        // The device's own word on readiness replaces the relay's mark.
                        Ok(()) => {
                            if let Some(st) = self.pod_state.get_mut(&entry.uid) {
                                st.marked = None;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(pod = %name, %namespace, error = %e, "status queue full; status dropped until the next report")
                        }
                    }
                }
                if not_bound > 0 {
                    // One line per report, not per entry: a flood must not flood the log too.
                    tracing::warn!(%device, entries = not_bound, "status report entries for pods not bound to this device; dropped");
                    self.metrics.dropped("pod_not_bound", not_bound);
                }
                for uid in check {
                    self.check_deletion(&uid);
                }
                if report.full {
                    // Pods the device no longer lists may now be done.
                    self.check_all_deletions();
                }
            }
            SessionEvent::Acked {
                device,
                generation,
                error,
            } => {
                if let Some(e) = error {
                    tracing::warn!(%device, generation, error = %e, "device refused snapshot");
                    return;
                }
                self.acked.insert(device.clone(), generation);
                if let Some(list) = self.sent_at.get_mut(&device) {
                    if let Some((_, at)) = list.iter().find(|(g, _)| *g == generation) {
                        self.metrics
                            .relay_seconds
                            .observe(at.elapsed().as_secs_f64());
                    }
                    list.retain(|(g, _)| *g > generation);
                }
            }
            SessionEvent::Events { device, batch } => self.device_events(device, batch),
            SessionEvent::Connected { .. }
            | SessionEvent::Disconnected { .. }
            | SessionEvent::Capacity { .. }
            | SessionEvent::Stats { .. } => {}
        }
    }

    fn check_all_deletions(&mut self) {
        for uid in self.pods.terminating() {
            self.check_deletion(&uid);
        }
    }

    /// Finishes the deletion of a terminating pod once its device confirms it is gone (or
    /// never had it, or is no longer a device of this hub): grace 0 with a UID precondition.
    fn check_deletion(&mut self, uid: &str) {
        if !self.pods.synced || self.pod_state.get(uid).is_some_and(|st| st.deleting) {
            return;
        }
        let Some(pod) = self.pod_by_uid(uid) else {
            return;
        };
        if pod.metadata.deletion_timestamp.is_none() {
            return;
        }
        let Some(node) = node_of(&pod) else { return };
        if !self.is_ours(&node) {
            return;
        }
        let reported = self.reported.get(&node).and_then(|m| m.get(uid)).copied();
        let full_gen = self.full_report_gen.get(&node).copied();
        let excluded = self.pod_state.get(uid).and_then(|st| st.excluded_in);
        let ran = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|c| !c.is_empty());
        let reason = if !self.device_enabled(&node) {
            Some("device no longer in the inventory")
        } else if self
            .pod_state
            .get(uid)
            .is_some_and(|st| st.confirmed_removed)
        {
            Some("device confirmed removal")
        } else if reported.is_none() && matches!((full_gen, excluded), (Some(f), Some(e)) if f >= e)
        {
            Some("device holds a snapshot without the pod and does not list it")
        } else if reported.is_none() && !ran {
            Some("device never reported the pod")
        } else {
            None
        };
        let Some(reason) = reason else { return };
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        tracing::info!(pod = %name, namespace = %ns, device = %node, reason, "finishing pod deletion");
        self.state(uid).deleting = true;
        let fut = self.api.delete_pod(&ns, &name, uid);
        let done = self.done_tx.clone();
        let uid = uid.to_string();
        tokio::spawn(async move {
            let ok = match fut.await {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(pod = %name, namespace = %ns, %error, "deleting pod");
                    false
                }
            };
            let _ = done.send(Input::DeleteDone { uid, ok }).await;
        });
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
            for pod in self.pods.all() {
                let Some(node) = node_of(&pod) else { continue };
                if !self.is_ours(&node) {
                    continue;
                }
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

    /// Computes and hands out the snapshots of the queued devices: those due, and with them
    /// every one due within the same debounce window (one pass instead of several).
    fn flush(&mut self) {
        if !self.synced() {
            // Kept queued: the last cache to list marks every device (see `after_watch`).
            return;
        }
        let window = Instant::now() + self.cfg.debounce;
        let inventory = self.inventory.borrow().clone();
        let owned = self.known_nodes.borrow().clone();
        for device in self.snapshots.drain_due(window) {
            self.snapshots.done(&device);
            // Only devices whose Node the hub owns get a snapshot (see `is_ours`).
            if !inventory.get(&device).is_some_and(|d| d.enabled) || !owned.contains(&device) {
                continue;
            }
            let mut pods = self.pods.on_node(&device);
            pods.sort_by(|a, b| {
                let ka = (
                    a.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    a.metadata.name.clone(),
                );
                let kb = (
                    b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    b.metadata.name.clone(),
                );
                ka.cmp(&kb)
            });
            // A pod whose ConfigMap/Secret is being fetched waits for it: sent without it, the
            // device would fail the container (CreateContainerConfigError) in the meantime. The
            // answer marks the device again.
            if !self.referenced.fetching.is_empty()
                && let Some(r) = pods
                    .iter()
                    .flat_map(|p| referenced::pod_refs(p))
                    .find(|r| self.referenced.fetching.contains(r))
            {
                self.waiting.entry(r).or_default().insert(device);
                continue;
            }
            self.flush_device(&device, &pods);
        }
    }

    fn allocatable(&self, device: &str) -> BTreeMap<String, String> {
        let mut alloc = self.cfg.default_allocatable.clone();
        if let Some(cap) = self
            .live
            .borrow()
            .get(device)
            .and_then(|l| l.capacity.clone())
        {
            alloc.extend(cap.capacity);
            alloc.extend(cap.allocatable);
        }
        alloc
    }

    fn flush_device(&mut self, device: &str, pods: &[Arc<Pod>]) {
        let allocatable = self.allocatable(device);
        let mut bundles = Vec::new();
        let mut terminating = Vec::new();
        let mut grace = HashMap::new();
        let mut admitted_here: Vec<Requests> = pods
            .iter()
            .filter(|p| !is_terminal(p))
            .filter_map(|p| {
                p.metadata
                    .uid
                    .as_ref()
                    .and_then(|u| self.pod_state.get(u)?.admitted)
            })
            .collect();
        self.pending_admission.remove(device);
        let mut snapshot_bytes = 0usize;
        for pod in pods {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            if self.pod_state.get(&uid).is_some_and(|st| st.rejected) || is_admission_failure(pod) {
                continue;
            }
            if pod.metadata.deletion_timestamp.is_none()
                && let Some(refusal) = refusal::daemonset(pod)
            {
                // Refused before its bundle is built: neither its spec nor its Secrets leave
                // the hub.
                self.metrics.refused("daemonset_not_for_devices");
                self.reject(pod, &uid, &refusal);
                continue;
            }
            if pod.metadata.deletion_timestamp.is_some() {
                // The API's deletion grace (`kubectl delete --grace-period=N`) wins over the
                // spec's terminationGracePeriodSeconds, as on a kubelet.
                if let Some(secs) = pod
                    .metadata
                    .deletion_grace_period_seconds
                    .and_then(|s| u64::try_from(s).ok())
                {
                    grace.insert(uid.clone(), secs);
                }
                terminating.push(uid);
                continue;
            }
            if self
                .pod_state
                .get(&uid)
                .is_none_or(|st| st.admitted.is_none())
            {
                let req = admission::pod_requests(pod);
                if has_run(pod) {
                    self.state(&uid).admitted = Some(req);
                } else {
                    match admission::admit(&allocatable, &admitted_here, req) {
                        Ok(()) => {
                            self.state(&uid).admitted = Some(req);
                            admitted_here.push(req);
                        }
                        Err(rejection) => {
                            self.reject(pod, &uid, &rejection);
                            self.pending_admission.insert(device.to_string());
                            continue;
                        }
                    }
                }
            }
            let bundle = bundle::build(pod, &self.config_maps.items, &self.secrets.items);
            match refusal::bundle_size(&bundle, snapshot_bytes, self.cfg.bundle_limits) {
                Ok(size) => snapshot_bytes += size,
                Err(refusal) => {
                    // One pod that cannot fit fails alone; the device keeps getting the others.
                    self.metrics.refused("bundle_too_large");
                    self.reject(pod, &uid, &refusal);
                    if let Some(req) = self.state(&uid).admitted.take()
                        && let Some(i) = admitted_here.iter().position(|r| *r == req)
                    {
                        admitted_here.remove(i);
                    }
                    let node_event = self.api.node_event(
                        device,
                        "Relay",
                        refusal::BUNDLE_REASON,
                        &format!(
                            "pod {}/{}: {}",
                            pod.metadata.namespace.as_deref().unwrap_or_default(),
                            pod.metadata.name.as_deref().unwrap_or_default(),
                            refusal.message
                        ),
                    );
                    let device = device.to_string();
                    tokio::spawn(async move {
                        if let Err(error) = node_event.await {
                            tracing::warn!(node = %device, %error, "publishing node event");
                        }
                    });
                    continue;
                }
            }
            bundles.push(bundle);
        }
        let hash = snapshot_hash(&bundles, &grace);
        if self.last_sent.get(device) == Some(&hash) {
            return;
        }
        let count = bundles.len();
        self.metrics
            .set_snapshot_bytes(device, bundles.iter().map(Message::encoded_len).sum());
        let generation = self.sessions.set_desired(device, bundles, grace);
        tracing::debug!(%device, generation, pods = count, terminating = terminating.len(), "snapshot handed to the link");
        self.last_sent.insert(device.to_string(), hash);
        let list = self.sent_at.entry(device.to_string()).or_default();
        list.push((generation, Instant::now()));
        if list.len() > 64 {
            list.remove(0);
        }
        for uid in terminating {
            self.state(&uid).excluded_in.get_or_insert(generation);
        }
    }

    fn reject(&mut self, pod: &Pod, uid: &str, rejection: &admission::Rejection) {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        tracing::warn!(pod = %name, namespace = %ns, reason = %rejection.reason, message = %rejection.message, "pod rejected at admission");
        self.state(uid).rejected = true;
        let update = StatusUpdate {
            uid: uid.to_string(),
            namespace: ns.clone(),
            name: name.clone(),
            status: json!({ "phase": "Failed", "reason": rejection.reason, "message": rejection.message }),
        };
        if let Err(e) = self.status_tx.try_send(update) {
            tracing::warn!(pod = %name, namespace = %ns, error = %e, "status queue full; rejection not written");
        }
        let ev = self
            .api
            .pod_event(pod, "Admit", &rejection.reason, &rejection.message);
        tokio::spawn(async move {
            if let Err(error) = ev.await {
                tracing::warn!(pod = %name, namespace = %ns, %error, "publishing admission event");
            }
        });
    }
}

/// The key of the object a watch event deletes.
fn deleted_key<K: kube::Resource>(ev: &watcher::Event<K>) -> Option<Key> {
    match ev {
        watcher::Event::Delete(o) => Some(Cache::<K>::key(o)),
        _ => None,
    }
}

fn node_of(p: &Pod) -> Option<String> {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
}

fn scheduled_at(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "True")
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0.to_string())
}

fn is_terminal(p: &Pod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// A pod this hub (or a previous replica) failed at admission or refused to relay.
fn is_admission_failure(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Failed")
            && s.reason.as_deref().is_some_and(|r| {
                r.starts_with("OutOf")
                    || r == refusal::DAEMONSET_REASON
                    || r == refusal::BUNDLE_REASON
            })
    })
}

/// A pod the device already started (admitted before, e.g. by a previous hub process).
fn has_run(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        matches!(s.phase.as_deref(), Some("Running" | "Succeeded" | "Failed"))
            || s.container_statuses.as_ref().is_some_and(|c| !c.is_empty())
    })
}

fn snapshot_hash(
    bundles: &[fleetlet_proto::v1::PodBundle],
    termination_grace: &HashMap<String, u64>,
) -> u64 {
    let mut h = DefaultHasher::new();
    let grace: BTreeMap<_, _> = termination_grace.iter().collect();
    grace.hash(&mut h);
    for b in bundles {
        b.pod_json.hash(&mut h);
        // Maps inside messages encode in arbitrary order; hash sorted views instead.
        for cm in &b.config_maps {
            cm.name.hash(&mut h);
            let data: BTreeMap<_, _> = cm.data.iter().collect();
            data.hash(&mut h);
            let bin: BTreeMap<_, _> = cm.binary_data.iter().collect();
            bin.hash(&mut h);
        }
        for s in &b.secrets {
            s.name.hash(&mut h);
            let data: BTreeMap<_, _> = s.data.iter().collect();
            data.hash(&mut h);
        }
        b.encoded_len().hash(&mut h);
    }
    bundles.len().hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests;
