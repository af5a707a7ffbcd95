//! Agentless mode: devices that run only Flightctl's agent get their pods as Flightctl
//! applications in their device spec, and their pods' status from the applications' status.
//!
//! A device of the Flightctl inventory whose labels match `[inventory.flightctl.agentless]
//! selector` (default `fleetlet.io/mode=agentless`) is agentless. For such a device:
//!
//! - the pod relay's desired snapshot ([`Sessions::set_desired`]) is not sent over the link but
//!   handed to [`AgentlessController`], which translates every pod into an inline compose
//!   application (`translate`), reads the Device, replaces the applications and config entries
//!   whose names start with `fleetlet-` (and only those; every other spec field and entry is
//!   kept as it is), and writes it back with its `resourceVersion` (a concurrent writer makes
//!   Flightctl answer 409 and the hub re-reads); then it acknowledges the generation to the relay
//!   as a device would;
//! - pods that cannot be expressed are refused with a Failed status (reason
//!   `AgentlessUnsupported`, the message names the field) and never written;
//! - every `poll_interval_secs` one list of the agentless devices (label selector, paged) gives
//!   their `status.applications`; each fleetlet application's status becomes its pod's status
//!   (`status`), sent to the relay as a full status report of the device, so the relay's own
//!   rules apply: sanitizing, the status writer's pacing, and finishing a deletion once the
//!   device no longer lists the pod after holding a spec without it;
//! - the device counts as connected while Flightctl's summary is anything but `Unknown`
//!   (Flightctl's own "not seen for 5 minutes" or "never seen"); the hub's usual disconnect grace
//!   then makes the Node NotReady, exactly as for a lost link session;
//! - container logs are refused with a message saying why (Flightctl has no log API).
//!
//! Flightctl refuses spec writes to a device owned by a Fleet (its spec comes from the fleet's
//! template), so agentless devices must not be selected by a Fleet; the hub refuses their pods
//! with a message naming the owner.

pub mod status;
pub mod translate;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fleetlet_proto::v1::{Hello, LogRequest, NodeInfo, PodBundle, PodStatusEntry, PodStatusReport};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use http::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::inventory::DeviceMap;
use crate::inventory::flightctl::{FlightctlClient, FlightctlError, LabelSelector, SelectorError};
use crate::sessions::{LogStream, SessionEvent, Sessions};
use status::{AppStatus, PodShape};
use translate::{OWNED_PREFIX, Translated, UNSUPPORTED_REASON};

/// `[inventory.flightctl.agentless]` settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentlessConfig {
    /// Label selector of the agentless devices; empty turns agentless mode off.
    #[serde(default = "default_selector")]
    pub selector: String,
    /// Seconds between reads of the agentless devices' status.
    #[serde(default = "default_poll")]
    pub poll_interval_secs: u64,
    /// Device spec writes in flight at once.
    #[serde(default = "default_concurrency")]
    pub write_concurrency: usize,
    /// Token for spec writes (a role with `update` on `devices`); defaults to the inventory's.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl Default for AgentlessConfig {
    fn default() -> Self {
        Self {
            selector: default_selector(),
            poll_interval_secs: default_poll(),
            write_concurrency: default_concurrency(),
            token_file: None,
        }
    }
}

fn default_selector() -> String {
    "fleetlet.io/mode=agentless".into()
}
fn default_poll() -> u64 {
    5
}
fn default_concurrency() -> usize {
    8
}

/// Why agentless mode could not start (configuration).
#[derive(Debug, thiserror::Error)]
pub enum AgentlessError {
    /// The selector does not parse.
    #[error("inventory.flightctl.agentless.selector: {0}")]
    Selector(#[from] SelectorError),
    /// The client settings are unusable.
    #[error(transparent)]
    Client(#[from] FlightctlError),
    /// A numeric setting is out of range.
    #[error("inventory.flightctl.agentless.{0}: must be at least 1")]
    Invalid(&'static str),
}

/// Counters of agentless mode, for benchmarks and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentlessStats {
    /// HTTP requests sent to Flightctl (GET + PUT of devices, list pages).
    pub requests: u64,
    /// Device spec writes that succeeded.
    pub writes: u64,
    /// Writes that failed (after the one retry on a conflict).
    pub write_failures: u64,
    /// 409 answers (a concurrent writer), each followed by a re-read.
    pub conflicts: u64,
    /// Status polls.
    pub polls: u64,
    /// Sum and maximum of the latency of Flightctl requests, in seconds.
    pub request_seconds: f64,
    /// Longest single request.
    pub request_seconds_max: f64,
    /// Pods refused as not expressible.
    pub refused: u64,
}

/// Agentless mode's figures on the hub's `/metrics` (`fleetlet_hub_agentless_*`).
#[derive(Clone)]
pub struct AgentlessMetrics {
    /// Requests sent to Flightctl.
    pub requests: prometheus_client::metrics::counter::Counter,
    /// Device spec writes that succeeded.
    pub writes: prometheus_client::metrics::counter::Counter,
    /// Device spec writes that failed.
    pub write_failures: prometheus_client::metrics::counter::Counter,
    /// 409 answers to spec writes.
    pub conflicts: prometheus_client::metrics::counter::Counter,
    /// Pods refused as not expressible.
    pub refused: prometheus_client::metrics::counter::Counter,
    /// Latency of Flightctl requests.
    pub request_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for AgentlessMetrics {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            writes: Default::default(),
            write_failures: Default::default(),
            conflicts: Default::default(),
            refused: Default::default(),
            request_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 12),
            ),
        }
    }
}

impl AgentlessMetrics {
    /// Registers every figure in `registry` (prefix `agentless_`).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let r = registry.sub_registry_with_prefix("agentless");
        r.register(
            "flightctl_requests",
            "Requests agentless mode sent to Flightctl",
            self.requests.clone(),
        );
        r.register(
            "spec_writes",
            "Device spec writes of agentless mode that succeeded",
            self.writes.clone(),
        );
        r.register(
            "spec_write_failures",
            "Device spec writes of agentless mode that failed",
            self.write_failures.clone(),
        );
        r.register(
            "spec_write_conflicts",
            "409 answers to device spec writes (re-read and written again)",
            self.conflicts.clone(),
        );
        r.register(
            "pods_refused",
            "Pods refused because a Flightctl compose application cannot express them",
            self.refused.clone(),
        );
        r.register(
            "flightctl_request_seconds",
            "Latency of agentless mode's Flightctl requests",
            self.request_seconds.clone(),
        );
    }
}

/// The desired pods of one agentless device.
#[derive(Debug, Clone, Default)]
struct Desired {
    generation: u64,
    pods: Vec<PodBundle>,
}

type DesiredMap = BTreeMap<String, Desired>;

/// Routes each device to the link or to Flightctl: the [`Sessions`] the relay and the kubelet
/// API use when agentless mode is on.
pub struct AgentlessSessions {
    link: Arc<dyn Sessions>,
    selector: LabelSelector,
    inventory: watch::Receiver<DeviceMap>,
    desired: watch::Sender<DesiredMap>,
    connected: Arc<RwLock<BTreeSet<String>>>,
    /// The live view the controllers read: the link's events and this controller's folded into
    /// one (`start` applies each on its way to the relay), as devices of both kinds have Nodes.
    live: Arc<crate::devices::LiveRegistry>,
}

impl AgentlessSessions {
    /// Whether `device` is agentless now (in the inventory with matching labels).
    pub fn is_agentless(&self, device: &str) -> bool {
        is_agentless(&self.selector, &self.inventory, device)
    }
}

fn is_agentless(
    selector: &LabelSelector,
    inventory: &watch::Receiver<DeviceMap>,
    device: &str,
) -> bool {
    inventory
        .borrow()
        .get(device)
        .is_some_and(|d| selector.matches(&d.labels))
}

impl Sessions for AgentlessSessions {
    fn set_desired(
        &self,
        device: &str,
        pods: Vec<PodBundle>,
        termination_grace: HashMap<String, u64>,
    ) -> u64 {
        if !self.is_agentless(device) {
            // A device that left agentless mode: its fleetlet applications are removed once.
            self.desired.send_if_modified(|m| match m.get_mut(device) {
                Some(d) if !d.pods.is_empty() => {
                    d.pods.clear();
                    d.generation += 1;
                    true
                }
                _ => false,
            });
            return self.link.set_desired(device, pods, termination_grace);
        }
        // Flightctl's agent stops a removed application its own way; the grace is not relayed.
        let mut generation = 0;
        self.desired.send_modify(|m| {
            let d = m.entry(device.to_string()).or_default();
            d.generation += 1;
            d.pods = pods;
            generation = d.generation;
        });
        generation
    }

    fn is_connected(&self, device: &str) -> bool {
        if self.is_agentless(device) {
            return self
                .connected
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(device);
        }
        self.link.is_connected(device)
    }

    fn open_logs(
        &self,
        device: &str,
        req: LogRequest,
    ) -> BoxFuture<'static, Result<LogStream, crate::link::LinkError>> {
        if self.is_agentless(device) {
            let device = device.to_string();
            return Box::pin(async move {
                Err(crate::link::LinkError::Device {
                    message: format!(
                        "device {device} runs in agentless mode (pods as Flightctl applications): Flightctl v1.2 has no API for container logs, so kubectl logs cannot be served"
                    ),
                    device,
                })
            });
        }
        self.link.open_logs(device, req)
    }

    fn live(&self) -> watch::Receiver<crate::devices::LiveSet> {
        self.live.subscribe()
    }

    fn request_stats(&self, device: &str) {
        // An agentless device has no agent to measure it.
        if !self.is_agentless(device) {
            self.link.request_stats(device);
        }
    }

    fn open_stream(
        &self,
        device: &str,
        open: fleetlet_proto::v1::StreamOpen,
    ) -> BoxFuture<'static, Result<crate::sessions::DeviceStream, crate::link::LinkError>> {
        if self.is_agentless(device) {
            let device = device.to_string();
            return Box::pin(async move {
                Err(crate::link::LinkError::Device {
                    message: format!(
                        "device {device} runs in agentless mode (pods as Flightctl applications): exec, attach and port-forward need fleetlet-agent on the device"
                    ),
                    device,
                })
            });
        }
        self.link.open_stream(device, open)
    }
}

/// One pod the controller wrote (or refused), by application name.
#[derive(Debug, Clone)]
struct Written {
    device: String,
    uid: String,
    namespace: String,
    name: String,
    shape: PodShape,
    /// Left out of the device's spec; kept until the device no longer lists it, so that its
    /// pod stays Terminating while the application still runs.
    removing: bool,
}

/// The task that writes device specs and reads application status.
pub struct AgentlessController {
    client: FlightctlClient,
    selector: LabelSelector,
    selector_text: String,
    page_size: u32,
    poll_interval: Duration,
    concurrency: usize,
    inventory: watch::Receiver<DeviceMap>,
    desired: watch::Receiver<DesiredMap>,
    events: mpsc::Sender<SessionEvent>,
    connected: Arc<RwLock<BTreeSet<String>>>,
    stats: watch::Sender<AgentlessStats>,
    metrics: AgentlessMetrics,
    /// Generation last written per device.
    applied: HashMap<String, u64>,
    /// Applications the hub wrote, by name.
    apps: HashMap<String, Written>,
    /// Pods already refused (uid).
    refused: BTreeSet<String>,
    /// When each application was first seen Running (RFC 3339).
    running_since: HashMap<String, String>,
    /// Hash of the last full report per device (unchanged reports are not resent).
    last_report: HashMap<String, u64>,
}

/// What `spawn` returns.
pub struct Agentless {
    /// The sessions to hand the relay and the kubelet API.
    pub sessions: Arc<AgentlessSessions>,
    /// The controller's counters.
    pub stats: watch::Receiver<AgentlessStats>,
}

/// Starts agentless mode. `events` is where its session events (connected, acknowledged
/// generations, pod statuses) go: the same stream as the link's.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    cfg: &AgentlessConfig,
    flightctl: &crate::inventory::flightctl::FlightctlConfig,
    link: Arc<dyn Sessions>,
    inventory: watch::Receiver<DeviceMap>,
    events: mpsc::Sender<SessionEvent>,
    metrics: AgentlessMetrics,
    shutdown: CancellationToken,
) -> Result<(Agentless, tokio::task::JoinHandle<()>), AgentlessError> {
    if cfg.poll_interval_secs == 0 {
        return Err(AgentlessError::Invalid("poll_interval_secs"));
    }
    if cfg.write_concurrency == 0 {
        return Err(AgentlessError::Invalid("write_concurrency"));
    }
    let selector = LabelSelector::parse(&cfg.selector)?;
    let client = FlightctlClient::new(
        &flightctl.api_url,
        &flightctl.ca_file,
        cfg.token_file
            .clone()
            .or_else(|| flightctl.token_file.clone()),
        Duration::from_secs(flightctl.request_timeout_secs.max(1)),
    )?;
    let (desired_tx, desired_rx) = watch::channel(DesiredMap::new());
    let connected = Arc::new(RwLock::new(BTreeSet::new()));
    let (stats_tx, stats_rx) = watch::channel(AgentlessStats::default());
    let controller = AgentlessController {
        client,
        selector: selector.clone(),
        selector_text: cfg.selector.clone(),
        page_size: flightctl.page_size.clamp(1, 1000),
        poll_interval: Duration::from_secs(cfg.poll_interval_secs),
        concurrency: cfg.write_concurrency,
        inventory: inventory.clone(),
        desired: desired_rx,
        events,
        connected: connected.clone(),
        stats: stats_tx,
        metrics,
        applied: HashMap::new(),
        apps: HashMap::new(),
        refused: BTreeSet::new(),
        running_since: HashMap::new(),
        last_report: HashMap::new(),
    };
    let task = tokio::spawn(controller.run(shutdown));
    Ok((
        Agentless {
            sessions: Arc::new(AgentlessSessions {
                link,
                selector,
                inventory,
                desired: desired_tx,
                connected,
                live: Arc::new(crate::devices::LiveRegistry::new()),
            }),
            stats: stats_rx,
        },
        task,
    ))
}

/// Starts agentless mode beside the link for `run`: returns the sessions to use and one event
/// stream carrying the link's events and the controller's. Events of the link for a device that
/// is agentless (a fleetlet-agent connecting with a certificate of such a device) are dropped
/// with a warning: that device's pods are Flightctl's to run.
pub fn start(
    tasks: &mut tokio::task::JoinSet<()>,
    flightctl: &crate::inventory::flightctl::FlightctlConfig,
    link: Arc<dyn Sessions>,
    inventory: watch::Receiver<DeviceMap>,
    mut link_events: mpsc::Receiver<SessionEvent>,
    metrics: AgentlessMetrics,
    shutdown: CancellationToken,
) -> Result<(Arc<dyn Sessions>, mpsc::Receiver<SessionEvent>), AgentlessError> {
    let (tx, rx) = mpsc::channel(4096);
    let (ctl_tx, mut ctl_rx) = mpsc::channel(4096);
    let (agentless, task) = spawn(
        &flightctl.agentless,
        flightctl,
        link,
        inventory,
        ctl_tx,
        metrics,
        shutdown.clone(),
    )?;
    tasks.spawn(async move {
        let _ = task.await;
    });
    let live = agentless.sessions.live.clone();
    {
        // The controller's events (agentless devices' connects, statuses, acks).
        let (tx, live, shutdown) = (tx.clone(), live.clone(), shutdown.clone());
        tasks.spawn(async move {
            loop {
                let ev = tokio::select! {
                    () = shutdown.cancelled() => return,
                    e = ctl_rx.recv() => match e { Some(e) => e, None => return },
                };
                live.apply(&ev);
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        });
    }
    let sessions = agentless.sessions.clone();
    tasks.spawn(async move {
        loop {
            let ev = tokio::select! {
                () = shutdown.cancelled() => return,
                e = link_events.recv() => match e { Some(e) => e, None => return },
            };
            let device = match &ev {
                SessionEvent::Connected { device, .. }
                | SessionEvent::Disconnected { device }
                | SessionEvent::Capacity { device, .. }
                | SessionEvent::Stats { device, .. }
                | SessionEvent::PodStatus { device, .. }
                | SessionEvent::Events { device, .. }
                | SessionEvent::Acked { device, .. } => device.clone(),
            };
            if sessions.is_agentless(&device) {
                if matches!(ev, SessionEvent::Connected { .. }) {
                    tracing::warn!(%device, "a fleetlet agent connected for an agentless device; its link events are ignored (the device's pods run as Flightctl applications)");
                }
                continue;
            }
            live.apply(&ev);
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    Ok((agentless.sessions, rx))
}

/// The outcome of writing one device's spec.
struct WriteResult {
    device: String,
    generation: u64,
    /// Pods written: application name → what the controller keeps of it.
    written: Vec<(String, Written)>,
    /// Pods refused: uid → (namespace, name, message).
    refused: Vec<(String, String, String, String)>,
    error: Option<String>,
    /// Flightctl rejected the spec itself (4xx other than 409): not retried until the pods change.
    rejected: bool,
    requests: u64,
    conflicts: u64,
    latencies: Vec<f64>,
}

impl AgentlessController {
    async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!(selector = %self.selector_text, "agentless mode: pods of matching devices become Flightctl applications");
        let mut next_poll = Instant::now();
        loop {
            self.write_pending().await;
            if Instant::now() >= next_poll {
                self.poll().await;
                next_poll = Instant::now() + self.poll_interval;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                r = self.desired.changed() => if r.is_err() { break },
                () = tokio::time::sleep_until(next_poll) => {}
            }
        }
        tracing::info!("agentless mode: stopped");
    }

    fn agentless(&self, device: &str) -> bool {
        self.inventory
            .borrow()
            .get(device)
            .is_some_and(|d| d.enabled && self.selector.matches(&d.labels))
    }

    /// Writes every device whose desired generation is newer than the one written.
    async fn write_pending(&mut self) {
        let desired = self.desired.borrow_and_update().clone();
        let todo: Vec<(String, Desired)> = desired
            .into_iter()
            .filter(|(device, d)| self.applied.get(device) != Some(&d.generation))
            .collect();
        if todo.is_empty() {
            return;
        }
        let client = self.client.clone();
        let results: Vec<WriteResult> = futures::stream::iter(todo)
            .map(|(device, d)| {
                let client = client.clone();
                async move { write_device(&client, device, d).await }
            })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        for r in results {
            self.metrics.requests.inc_by(r.requests);
            self.metrics.conflicts.inc_by(r.conflicts);
            for l in &r.latencies {
                self.metrics.request_seconds.observe(*l);
            }
            if r.error.is_some() {
                self.metrics.write_failures.inc();
            } else {
                self.metrics.writes.inc();
            }
            self.stats.send_modify(|s| {
                s.requests += r.requests;
                s.conflicts += r.conflicts;
                for l in &r.latencies {
                    s.request_seconds += l;
                    s.request_seconds_max = s.request_seconds_max.max(*l);
                }
                if r.error.is_some() {
                    s.write_failures += 1;
                } else {
                    s.writes += 1;
                }
            });
            if let Some(error) = &r.error {
                if r.rejected {
                    // Flightctl refuses this spec: writing it again cannot help. The relay logs
                    // the refusal; the next change of the device's pods is tried afresh.
                    tracing::warn!(device = %r.device, generation = r.generation, %error, "agentless mode: Flightctl rejected the device spec; not retried until the device's pods change");
                    self.applied.insert(r.device.clone(), r.generation);
                    self.emit(SessionEvent::Acked {
                        device: r.device.clone(),
                        generation: r.generation,
                        error: Some(error.clone()),
                    })
                    .await;
                } else {
                    // Retried at the next pass (the generation stays unwritten).
                    tracing::warn!(device = %r.device, generation = r.generation, %error, "agentless mode: device spec not written; retried");
                }
                continue;
            }
            self.applied.insert(r.device.clone(), r.generation);
            for w in self.apps.values_mut().filter(|w| w.device == r.device) {
                w.removing = true;
            }
            self.apps.extend(r.written);
            let mut entries = Vec::new();
            for (uid, namespace, name, message) in r.refused {
                if !self.refused.insert(uid.clone()) {
                    continue;
                }
                self.stats.send_modify(|s| s.refused += 1);
                self.metrics.refused.inc();
                tracing::warn!(device = %r.device, pod = %name, %namespace, %message, "agentless mode: pod refused");
                let status =
                    json!({"phase": "Failed", "reason": UNSUPPORTED_REASON, "message": message});
                entries.push(PodStatusEntry {
                    uid,
                    namespace,
                    name,
                    status_json: serde_json::to_vec(&status).unwrap_or_default().into(),
                    removed: false,
                });
            }
            if !entries.is_empty() {
                self.emit(SessionEvent::PodStatus {
                    device: r.device.clone(),
                    report: PodStatusReport {
                        full: false,
                        pods: entries,
                    },
                    inflight: Default::default(),
                })
                .await;
            }
            self.emit(SessionEvent::Acked {
                device: r.device.clone(),
                generation: r.generation,
                error: None,
            })
            .await;
            // The next poll sends a full report even if nothing changed on the device: the
            // relay may finish deletions now that the device holds a spec without them.
            self.last_report.remove(&r.device);
        }
    }

    async fn emit(&self, ev: SessionEvent) {
        if self.events.send(ev).await.is_err() {
            tracing::debug!("agentless mode: event stream closed");
        }
    }

    /// Reads the agentless devices' status: connectivity and application status.
    async fn poll(&mut self) {
        let path = format!(
            "/api/v1/devices?labelSelector={}",
            crate::inventory::flightctl::percent_encode(&self.selector_text)
        );
        let started = Instant::now();
        let listed = self.client.list_all(&path, self.page_size, 10_000).await;
        let elapsed = started.elapsed().as_secs_f64();
        let listed = match listed {
            Ok(l) => {
                self.metrics.requests.inc_by(l.pages as u64);
                self.metrics
                    .request_seconds
                    .observe(elapsed / l.pages.max(1) as f64);
                self.stats.send_modify(|s| {
                    s.polls += 1;
                    s.requests += l.pages as u64;
                    s.request_seconds += elapsed;
                    s.request_seconds_max =
                        s.request_seconds_max.max(elapsed / l.pages.max(1) as f64);
                });
                l.items
            }
            Err(e) => {
                self.metrics.requests.inc();
                self.stats.send_modify(|s| s.requests += 1);
                tracing::warn!(reason = e.reason(), error = %e, "agentless mode: reading device status failed; Nodes and pods keep their state");
                return;
            }
        };
        let mut seen = BTreeSet::new();
        for item in &listed {
            let Some(device) = item["metadata"]["name"].as_str().map(str::to_owned) else {
                continue;
            };
            if !self.agentless(&device) {
                continue;
            }
            seen.insert(device.clone());
            self.connectivity(&device, item).await;
            self.report(&device, item).await;
        }
        // Agentless devices Flightctl no longer lists (deleted, relabelled) are disconnected.
        let gone: Vec<String> = self
            .connected
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|d| !seen.contains(*d))
            .cloned()
            .collect();
        for device in gone {
            self.set_connected(&device, false, None).await;
        }
    }

    async fn set_connected(&self, device: &str, up: bool, info: Option<NodeInfo>) {
        let changed = {
            let mut set = self
                .connected
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if up {
                set.insert(device.to_string())
            } else {
                set.remove(device)
            }
        };
        if !changed {
            return;
        }
        let ev = if up {
            SessionEvent::Connected {
                device: device.to_string(),
                hello: Hello {
                    device_name: device.to_string(),
                    agent_version: info
                        .as_ref()
                        .map(|i| i.agent_version.clone())
                        .unwrap_or_default(),
                    node_info: info,
                    ..Default::default()
                },
            }
        } else {
            SessionEvent::Disconnected {
                device: device.to_string(),
            }
        };
        self.emit(ev).await;
    }

    async fn connectivity(&self, device: &str, item: &Value) {
        let up = connected(item);
        let sys = &item["status"]["systemInfo"];
        let s = |k: &str| sys[k].as_str().unwrap_or_default().to_owned();
        let info = NodeInfo {
            operating_system: s("operatingSystem"),
            architecture: s("architecture"),
            boot_id: s("bootID"),
            agent_version: format!("flightctl-agent {}", s("agentVersion")),
            container_runtime_version: "flightctl".into(),
            ..Default::default()
        };
        self.set_connected(device, up, Some(info)).await;
    }

    /// A full status report of the device's fleetlet applications, when it changed.
    async fn report(&mut self, device: &str, item: &Value) {
        let info = item["status"]["applicationsSummary"]["info"].as_str();
        let reported: Vec<AppStatus> = item["status"]["applications"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(AppStatus::parse)
            .filter(|a| a.name.starts_with(OWNED_PREFIX))
            .collect();
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let mut entries = Vec::new();
        for app in &reported {
            let Some(w) = self.apps.get(&app.name).filter(|w| w.device == device) else {
                continue;
            };
            if app.status == "Running" {
                self.running_since
                    .entry(app.name.clone())
                    .or_insert_with(|| now.clone());
            }
            let since = self.running_since.get(&app.name).map(String::as_str);
            let Some(status) = status::pod_status(&w.shape, app, since, info) else {
                continue;
            };
            entries.push(PodStatusEntry {
                uid: w.uid.clone(),
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                status_json: serde_json::to_vec(&status).unwrap_or_default().into(),
                removed: false,
            });
        }
        // Applications left out of the spec that the device no longer lists are gone: their
        // pods may now finish deleting (the relay sees them missing from this full report).
        let listed: BTreeSet<&str> = reported.iter().map(|a| a.name.as_str()).collect();
        self.apps
            .retain(|name, w| w.device != device || !w.removing || listed.contains(name.as_str()));
        let apps = &self.apps;
        self.running_since
            .retain(|name, _| listed.contains(name.as_str()) || apps.contains_key(name));
        let hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::hash::DefaultHasher::new();
            for e in &entries {
                e.uid.hash(&mut h);
                e.status_json.hash(&mut h);
            }
            h.finish()
        };
        if self.last_report.get(device) == Some(&hash) {
            return;
        }
        self.last_report.insert(device.to_string(), hash);
        self.emit(SessionEvent::PodStatus {
            device: device.to_string(),
            report: PodStatusReport {
                full: true,
                pods: entries,
            },
            inflight: Default::default(),
        })
        .await;
    }
}

/// Whether Flightctl hears from the device: its summary is anything but `Unknown` (which
/// Flightctl computes when the device was not seen for 5 minutes, or never).
fn connected(device: &Value) -> bool {
    let summary = device["status"]["summary"]["status"].as_str().unwrap_or("");
    !summary.is_empty() && summary != "Unknown"
}

/// Translates `d`'s pods and writes them into the device's spec (one re-read and retry on a
/// conflict).
async fn write_device(client: &FlightctlClient, device: String, d: Desired) -> WriteResult {
    let mut result = WriteResult {
        device: device.clone(),
        generation: d.generation,
        written: Vec::new(),
        refused: Vec::new(),
        error: None,
        rejected: false,
        requests: 0,
        conflicts: 0,
        latencies: Vec::new(),
    };
    let mut translated: Vec<Translated> = Vec::new();
    for bundle in &d.pods {
        let pod: k8s_openapi::api::core::v1::Pod = match serde_json::from_slice(&bundle.pod_json) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%device, error = %e, "agentless mode: pod JSON unreadable; skipped");
                continue;
            }
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        match translate::translate(bundle) {
            Ok(t) => {
                let spec = pod.spec.clone().unwrap_or_default();
                result.written.push((
                    t.name.clone(),
                    Written {
                        device: device.clone(),
                        uid,
                        namespace,
                        name,
                        shape: PodShape {
                            containers: spec
                                .containers
                                .iter()
                                .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
                                .collect(),
                            restart_policy: spec
                                .restart_policy
                                .clone()
                                .unwrap_or_else(|| "Always".into()),
                        },
                        removing: false,
                    },
                ));
                translated.push(t);
            }
            Err(e) => result.refused.push((uid, namespace, name, e.0)),
        }
    }
    let path = format!(
        "/api/v1/devices/{}",
        crate::inventory::flightctl::percent_encode(&device)
    );
    for attempt in 0..2 {
        let started = Instant::now();
        let current = client.request(Method::GET, &path, None).await;
        result.requests += 1;
        result.latencies.push(started.elapsed().as_secs_f64());
        let current: Value = match current.map(|b| serde_json::from_slice(&b)) {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                result.error = Some(format!("reading device: not JSON: {e}"));
                return result;
            }
            Err(e) => {
                result.error = Some(format!("reading device: {e}"));
                return result;
            }
        };
        if let Some(owner) = current["metadata"]["owner"]
            .as_str()
            .filter(|o| !o.is_empty())
        {
            // Flightctl lets only the owner (a Fleet's template) set this device's spec.
            let message = format!(
                "device {device} is owned by {owner} in Flightctl, which lets only the fleet's template set its spec; agentless devices must not be selected by a Fleet"
            );
            for (_, w) in result.written.drain(..) {
                result
                    .refused
                    .push((w.uid, w.namespace, w.name, message.clone()));
            }
            // Nothing is written: Flightctl would refuse it, and the fleet's template owns the
            // spec (fleetlet entries written before the device joined the fleet are its now).
            return result;
        }
        let Some(body) = merged_device(&current, &translated) else {
            return result; // Nothing to change.
        };
        let started = Instant::now();
        let put = client.request(Method::PUT, &path, Some(&body)).await;
        result.requests += 1;
        result.latencies.push(started.elapsed().as_secs_f64());
        match put {
            Ok(_) => return result,
            Err(FlightctlError::Status { status, .. })
                if status == http::StatusCode::CONFLICT && attempt == 0 =>
            {
                result.conflicts += 1;
            }
            Err(e) => {
                result.rejected = matches!(&e, FlightctlError::Status { status, .. }
                    if status.is_client_error());
                result.error = Some(format!("writing device spec: {e}"));
                return result;
            }
        }
    }
    result.error = Some("writing device spec: conflicts twice in a row".into());
    result
}

/// The device with its fleetlet-owned applications and config entries replaced by `pods`'s;
/// `None` when that changes nothing. Every other field and entry is kept as it is.
fn merged_device(current: &Value, pods: &[Translated]) -> Option<Value> {
    let spec = current.get("spec").cloned().unwrap_or_else(|| json!({}));
    let owned = |v: &Value| {
        v.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| n.starts_with(OWNED_PREFIX))
    };
    let keep = |field: &str| -> Vec<Value> {
        spec.get(field)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|v| !owned(v))
            .cloned()
            .collect()
    };
    let mut apps = keep("applications");
    apps.extend(pods.iter().map(|t| t.application.clone()));
    let mut config = keep("config");
    config.extend(pods.iter().filter_map(|t| t.config.clone()));
    let same = |field: &str, new: &[Value]| {
        let old: &[Value] = spec
            .get(field)
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice);
        old == new
    };
    if same("applications", &apps) && same("config", &config) {
        return None;
    }
    let mut new_spec = spec.clone();
    new_spec["applications"] = Value::Array(apps);
    new_spec["config"] = Value::Array(config);
    let mut metadata = current
        .get("metadata")
        .cloned()
        .unwrap_or_else(|| json!({}));
    if let Some(m) = metadata.as_object_mut() {
        // Server-set fields the API does not take back; resourceVersion stays for the check.
        for k in [
            "creationTimestamp",
            "generation",
            "owner",
            "deletionTimestamp",
        ] {
            m.remove(k);
        }
    }
    Some(json!({
        "apiVersion": current.get("apiVersion").cloned().unwrap_or_else(|| json!("flightctl.io/v1beta1")),
        "kind": "Device",
        "metadata": metadata,
        "spec": new_spec,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translated(name: &str) -> Translated {
        Translated {
            name: name.into(),
            application: json!({"name": name, "appType": "compose", "inline": []}),
            config: Some(json!({"name": name, "inline": []})),
            containers: vec!["c".into()],
        }
    }

    #[test]
    fn connectivity_follows_flightctl_summary() {
        let with = |s: &str| json!({"status": {"summary": {"status": s}}});
        assert!(connected(&with("Online")));
        assert!(connected(&with("Degraded")));
        assert!(connected(&with("Rebooting")));
        assert!(!connected(&with("Unknown")));
        assert!(!connected(&json!({"status": {}})));
        assert!(!connected(&json!({})));
    }

    #[test]
    fn only_fleetlet_entries_are_replaced() {
        let current = json!({
            "apiVersion": "flightctl.io/v1beta1", "kind": "Device",
            "metadata": {"name": "d", "resourceVersion": "7", "generation": 3, "labels": {"a": "b"}},
            "spec": {
                "os": {"image": "quay.io/x/os:1"},
                "applications": [
                    {"name": "theirs", "appType": "container", "image": "quay.io/x/app:1"},
                    {"name": "fleetlet-old-pod-12345678", "appType": "compose", "inline": []}
                ],
                "config": [{"name": "their-config", "inline": []}]
            },
            "status": {"summary": {"status": "Online"}}
        });
        let merged =
            merged_device(&current, &[translated("fleetlet-new-pod-87654321")]).expect("changes");
        assert_eq!(merged["metadata"]["resourceVersion"], "7");
        assert!(merged["metadata"].get("generation").is_none());
        assert_eq!(merged["metadata"]["labels"], json!({"a": "b"}));
        assert!(merged.get("status").is_none());
        assert_eq!(merged["spec"]["os"], current["spec"]["os"]);
        let names: Vec<&str> = merged["spec"]["applications"]
            .as_array()
            .expect("apps")
            .iter()
            .map(|a| a["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, ["theirs", "fleetlet-new-pod-87654321"]);
        let configs: Vec<&str> = merged["spec"]["config"]
            .as_array()
            .expect("config")
            .iter()
            .map(|a| a["name"].as_str().expect("name"))
            .collect();
        assert_eq!(configs, ["their-config", "fleetlet-new-pod-87654321"]);
        // Writing the same again changes nothing.
        let mut again = current.clone();
        again["spec"] = merged["spec"].clone();
        assert!(merged_device(&again, &[translated("fleetlet-new-pod-87654321")]).is_none());
        // No pods: only the fleetlet entries go.
        let emptied = merged_device(&current, &[]).expect("changes");
        assert_eq!(
            emptied["spec"]["applications"]
                .as_array()
                .expect("apps")
                .len(),
            1
        );
        assert_eq!(
            emptied["spec"]["config"].as_array().expect("config").len(),
            1
        );
    }
}
