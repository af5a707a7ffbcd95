//! Flightctl as the hub's inventory: devices and fleets polled from Flightctl's REST API.
//!
//! Flightctl has no watch, so the hub lists `GET /api/v1/devices` and `GET /api/v1/fleets` page
//! by page (`limit` + `continue`) every `poll_interval_secs`. A failed poll (unreachable, 401,
//! 403, 5xx, malformed answer) is logged with its reason and retried with exponential backoff
//! and full jitter; the last good device set stays published meanwhile, so a short Flightctl
//! outage never removes a Node. A single malformed device keeps its last good entry (or is left
//! out if it never had one) and is logged; the rest of the list is used.
//!
//! Which devices are *enabled* (get a Node, may connect) is a label selector evaluated on the
//! device labels; decommissioning devices are never enabled.

mod client;
mod model;
mod selector;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use client::{FlightctlClient, FlightctlError, ListResult, percent_encode};
pub use fleetlet_proto::backoff::Backoff;
pub use model::{Device, Fleet, ObjectError};
pub use selector::{LabelSelector, SelectorError};

use super::{DeviceMap, Inventory, InventoryDevice};

/// `[inventory.flightctl]` settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FlightctlConfig {
    /// Flightctl API base URL, e.g. `https://flightctl-api.flightctl.svc:3443`.
    pub api_url: String,
    /// PEM CA bundle that verifies Flightctl's serving certificate.
    pub ca_file: PathBuf,
    /// Bearer token file (a ServiceAccount token in k8s auth mode); re-read when it changes.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Label selector choosing the enabled devices; empty = every device.
    #[serde(default)]
    pub enabled_selector: String,
    /// Seconds between polls when Flightctl answers.
    #[serde(default = "default_poll_interval")]
    pub poll_interval_secs: u64,
    /// Page size (`limit`) of list calls; Flightctl accepts up to 1000.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Upper bound of the retry backoff after failures, in seconds.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_secs: u64,
    /// Timeout of one HTTP request, in seconds.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Fetch `GET /api/v1/devices/{name}/lastseen` for enabled devices whose list entry carries
    /// no `status.lastSeen` (Flightctl 1.x keeps lastSeen out of lists), at most every this many
    /// seconds; 0 turns it off.
    #[serde(default = "default_last_seen_interval")]
    pub last_seen_interval_secs: u64,
    /// Agentless mode (`[inventory.flightctl.agentless]`): devices running only Flightctl's
    /// agent get their pods as Flightctl applications.
    #[serde(default)]
    pub agentless: crate::agentless::AgentlessConfig,
}

fn default_poll_interval() -> u64 {
    30
}
fn default_page_size() -> u32 {
    500
}
fn default_max_backoff() -> u64 {
    300
}
fn default_request_timeout() -> u64 {
    30
}
fn default_last_seen_interval() -> u64 {
    60
}

/// Most pages read for one list (bounds a misbehaving server).
const MAX_PAGES: usize = 10_000;
/// Concurrent lastSeen requests.
const LAST_SEEN_CONCURRENCY: usize = 8;

/// Flightctl's own view of a device, kept beside the inventory for Node conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceHealth {
    /// `status.summary.status`: Online, Degraded, Error, Rebooting, PoweredOff, Unknown, ...
    pub summary_status: Option<String>,
    /// `status.summary.info`.
    pub summary_info: Option<String>,
    /// When Flightctl last heard from the device's flightctl-agent (RFC 3339).
    pub last_seen: Option<String>,
    /// The device is being or has been decommissioned.
    pub decommissioned: bool,
    /// When the hub first saw the current `summary_status`, in an unbroken run of good syncs.
    pub status_since: tokio::time::Instant,
    /// The current `summary_status` was seen by at least two consecutive good syncs: one poll
    /// alone (possibly stale, possibly a blip) never counts toward a Node's readiness.
    pub confirmed: bool,
}

/// Device name → Flightctl health.
pub type HealthMap = Arc<BTreeMap<String, DeviceHealth>>;

/// What the last poll did, for metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncStatus {
    /// Completed full syncs since start.
    pub syncs: u64,
    /// Failed polls since start.
    pub failures: u64,
    /// HTTP requests sent since start.
    pub requests: u64,
    /// Reason of the latest failure, cleared by the next success.
    pub last_error: Option<String>,
    /// Fleets seen in the latest good sync.
    pub fleets: BTreeSet<String>,
    /// Pages (requests) the device list took in the latest good sync.
    pub device_pages: usize,
    /// Per-device lastSeen requests that failed since start (e.g. 403 without
    /// `devices/lastseen`); their devices keep the previous lastSeen.
    pub last_seen_failures: u64,
}

/// The device set from Flightctl, kept current by a background poller.
#[derive(Debug, Clone)]
pub struct FlightctlInventory {
    devices: watch::Receiver<DeviceMap>,
    health: watch::Receiver<HealthMap>,
    status: watch::Receiver<SyncStatus>,
}

impl Inventory for FlightctlInventory {
    fn devices(&self) -> watch::Receiver<DeviceMap> {
        self.devices.clone()
    }
}

/// Why the Flightctl inventory could not start (configuration; exit 64).
#[derive(Debug, thiserror::Error)]
pub enum FlightctlInventoryError {
    /// The client settings are unusable.
    #[error(transparent)]
    Client(#[from] FlightctlError),
    /// `enabled_selector` does not parse.
    #[error(transparent)]
    Selector(#[from] SelectorError),
    /// A numeric setting is out of range.
    #[error("inventory.flightctl.{field}: {reason}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// Why it is rejected.
        reason: &'static str,
    },
}

impl FlightctlInventory {
    /// Validates `cfg` and starts polling until `shutdown`. The device set is empty until the
    /// first successful sync: wait for [`Self::synced`] before acting on missing devices.
    pub fn spawn(
        cfg: &FlightctlConfig,
        shutdown: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), FlightctlInventoryError> {
        if cfg.poll_interval_secs == 0 {
            return Err(FlightctlInventoryError::Invalid {
                field: "poll_interval_secs",
                reason: "must be at least 1",
            });
        }
        if !(1..=1000).contains(&cfg.page_size) {
            return Err(FlightctlInventoryError::Invalid {
                field: "page_size",
                reason: "must be between 1 and 1000",
            });
        }
        if cfg.request_timeout_secs == 0 {
            return Err(FlightctlInventoryError::Invalid {
                field: "request_timeout_secs",
                reason: "must be at least 1",
            });
        }
        let selector = LabelSelector::parse(&cfg.enabled_selector)?;
        let client = FlightctlClient::new(
            &cfg.api_url,
            &cfg.ca_file,
            cfg.token_file.clone(),
            Duration::from_secs(cfg.request_timeout_secs),
        )?;
        let (devices_tx, devices) = watch::channel(DeviceMap::default());
        let (health_tx, health) = watch::channel(HealthMap::default());
        let (status_tx, status) = watch::channel(SyncStatus::default());
        let poller = Poller {
            client,
            selector,
            page_size: cfg.page_size,
            poll_interval: Duration::from_secs(cfg.poll_interval_secs),
            backoff: Backoff::new(
                Duration::from_secs(1),
                Duration::from_secs(cfg.max_backoff_secs.max(1)),
            ),
            last_seen_interval: (cfg.last_seen_interval_secs > 0)
                .then(|| Duration::from_secs(cfg.last_seen_interval_secs)),
            last_seen_fetched: None,
            last_good: BTreeMap::new(),
            devices_tx,
            health_tx,
            status_tx,
        };
        let task = tokio::spawn(poller.run(shutdown));
        Ok((
            Self {
                devices,
                health,
                status,
            },
            task,
        ))
    }

    /// Flightctl's health view of every device of the latest good sync.
    pub fn health(&self) -> watch::Receiver<HealthMap> {
        self.health.clone()
    }

    /// Poll counters and the latest error.
    pub fn status(&self) -> watch::Receiver<SyncStatus> {
        self.status.clone()
    }

    /// Waits until the first full sync has succeeded (or `shutdown`); false on shutdown.
    pub async fn synced(&self, shutdown: &CancellationToken) -> bool {
        let mut status = self.status.clone();
        tokio::select! {
            r = status.wait_for(|s| s.syncs > 0) => r.is_ok(),
            () = shutdown.cancelled() => false,
        }
    }
}

struct Poller {
    client: FlightctlClient,
    selector: LabelSelector,
    page_size: u32,
    poll_interval: Duration,
    backoff: Backoff,
    last_seen_interval: Option<Duration>,
    last_seen_fetched: Option<tokio::time::Instant>,
    /// The last good parse of every device, to keep when a later copy is malformed.
    last_good: BTreeMap<String, Device>,
    devices_tx: watch::Sender<DeviceMap>,
    health_tx: watch::Sender<HealthMap>,
    status_tx: watch::Sender<SyncStatus>,
}

impl Poller {
    async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!(api = %self.client.base_url(), "flightctl inventory: polling");
        loop {
            let delay = match self.poll_once().await {
                Ok(()) => {
                    if self.backoff.failures() > 0 {
                        tracing::info!(
                            api = %self.client.base_url(),
                            failures = self.backoff.failures(),
                            "flightctl inventory: Flightctl answers again"
                        );
                    }
                    self.backoff.reset();
                    self.poll_interval
                }
                Err(err) => {
                    let delay = self.backoff.next_delay();
                    tracing::warn!(
                        api = %self.client.base_url(),
                        reason = err.reason(),
                        error = %err,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        failures = self.backoff.failures(),
                        "flightctl inventory: poll failed; keeping the last good device set"
                    );
                    self.status_tx.send_modify(|s| {
                        s.failures += 1;
                        s.last_error = Some(err.to_string());
                    });
                    delay
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => break,
            }
        }
        tracing::info!("flightctl inventory: stopped");
    }

    fn count_requests(&self, n: usize) {
        self.status_tx
            .send_modify(|s| s.requests += u64::try_from(n).unwrap_or(u64::MAX));
    }

    async fn poll_once(&mut self) -> Result<(), FlightctlError> {
        let fleets = self
            .client
            .list_all("/api/v1/fleets", self.page_size, MAX_PAGES)
            .await;
        let fleets = self.counted(fleets)?;
        let devices = self
            .client
            .list_all("/api/v1/devices", self.page_size, MAX_PAGES)
            .await;
        let devices = self.counted(devices)?;

        let mut fleet_names = BTreeSet::new();
        for (i, item) in fleets.items.iter().enumerate() {
            match model::parse_fleet(item, i) {
                Ok(fleet) => {
                    fleet_names.insert(fleet.name);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "flightctl inventory: skipping malformed fleet")
                }
            }
        }

        let mut parsed: BTreeMap<String, Device> = BTreeMap::new();
        for (i, item) in devices.items.iter().enumerate() {
            match model::parse_device(item, i) {
                Ok(device) => {
                    if parsed.contains_key(&device.name) {
                        tracing::warn!(device = %device.name, "flightctl inventory: device listed twice; keeping the first");
                        continue;
                    }
                    parsed.insert(device.name.clone(), device);
                }
                Err(err) => {
                    let name = model::item_name(item, i);
                    match self.last_good.get(&name) {
                        Some(previous) => {
                            tracing::warn!(device = %name, error = %err, "flightctl inventory: malformed device; keeping its last good state");
                            parsed.insert(name, previous.clone());
                        }
                        None => {
                            tracing::warn!(device = %name, error = %err, "flightctl inventory: malformed device; leaving it out");
                        }
                    }
                }
            }
        }
        self.fetch_last_seen(&mut parsed).await;

        let mut map = BTreeMap::new();
        let mut health = BTreeMap::new();
        let synced_at = tokio::time::Instant::now();
        let previous_health = self.health_tx.borrow().clone();
        for (name, d) in &parsed {
            if let Some(fleet) = &d.fleet
                && !fleet_names.contains(fleet)
            {
                tracing::debug!(device = %name, fleet = %fleet, "flightctl inventory: device owned by a fleet not (yet) listed");
            }
            map.insert(
                name.clone(),
                InventoryDevice {
                    name: name.clone(),
                    labels: d.labels.clone(),
                    fleet: d.fleet.clone(),
                    enabled: !d.decommissioned && self.selector.matches(&d.labels),
                },
            );
            let (status_since, confirmed) = match previous_health.get(name) {
                Some(p) if p.summary_status == d.summary_status => (p.status_since, true),
                _ => (synced_at, false),
            };
            health.insert(
                name.clone(),
                DeviceHealth {
                    summary_status: d.summary_status.clone(),
                    summary_info: d.summary_info.clone(),
                    last_seen: d.last_seen.clone(),
                    decommissioned: d.decommissioned,
                    status_since,
                    confirmed,
                },
            );
        }
        let count = map.len();
        let enabled = map.values().filter(|d| d.enabled).count();
        let changed = self.devices_tx.send_if_modified(|current| {
            if **current == map {
                false
            } else {
                *current = Arc::new(map);
                true
            }
        });
        self.health_tx.send_if_modified(|current| {
            if **current == health {
                false
            } else {
                *current = Arc::new(health);
                true
            }
        });
        self.last_good = parsed;
        let pages = fleets.pages + devices.pages;
        self.status_tx.send_modify(|s| {
            s.syncs += 1;
            s.last_error = None;
            s.fleets = fleet_names;
            s.device_pages = devices.pages;
        });
        if changed {
            tracing::info!(
                devices = count,
                enabled,
                pages,
                "flightctl inventory: device set changed"
            );
        } else {
            tracing::debug!(
                devices = count,
                enabled,
                pages,
                "flightctl inventory: no change"
            );
        }
        Ok(())
    }

    fn counted(
        &self,
        result: Result<ListResult, FlightctlError>,
    ) -> Result<ListResult, FlightctlError> {
        // A failed list still cost at least one request.
        self.count_requests(result.as_ref().map_or(1, |r| r.pages));
        result
    }

    /// Fills in lastSeen for enabled devices whose list entry lacks it, at most every
    /// `last_seen_interval`; between fetches the previous values are carried over.
    async fn fetch_last_seen(&mut self, parsed: &mut BTreeMap<String, Device>) {
        let Some(interval) = self.last_seen_interval else {
            return;
        };
        let due = self
            .last_seen_fetched
            .is_none_or(|at| at.elapsed() >= interval);
        let wanted: Vec<String> = parsed
            .values()
            .filter(|d| {
                d.last_seen.is_none() && !d.decommissioned && self.selector.matches(&d.labels)
            })
            .map(|d| d.name.clone())
            .collect();
        if !due {
            for name in &wanted {
                if let (Some(d), Some(prev)) = (parsed.get_mut(name), self.last_good.get(name)) {
                    d.last_seen.clone_from(&prev.last_seen);
                }
            }
            return;
        }
        self.last_seen_fetched = Some(tokio::time::Instant::now());
        let client = &self.client;
        let results: Vec<(String, Result<Option<String>, FlightctlError>)> =
            futures::stream::iter(wanted)
                .map(|name| async move {
                    let path =
                        format!("/api/v1/devices/{}/lastseen", client::percent_encode(&name));
                    let r = match client.request(http::Method::GET, &path, None).await {
                        // Never seen: Flightctl 1.2 answers 204 without a body.
                        Ok(body) if body.iter().all(u8::is_ascii_whitespace) => Ok(None),
                        Ok(body) => {
                            model::parse_last_seen(&body).map_err(|e| FlightctlError::Malformed {
                                endpoint: path.clone(),
                                reason: e.0,
                            })
                        }
                        // Older servers answer 404 when there is no lastSeen yet.
                        Err(FlightctlError::Status { status, .. })
                            if status == http::StatusCode::NOT_FOUND =>
                        {
                            Ok(None)
                        }
                        Err(e) => Err(e),
                    };
                    (name, r)
                })
                .buffer_unordered(LAST_SEEN_CONCURRENCY)
                .collect()
                .await;
        self.count_requests(results.len());
        let mut failed = 0usize;
        let mut example = None;
        for (name, r) in results {
            let Some(d) = parsed.get_mut(&name) else {
                continue;
            };
            match r {
                Ok(seen) => d.last_seen = seen,
                Err(err) => {
                    failed += 1;
                    if example.is_none() {
                        example = Some(format!("device {name}: {err}"));
                    }
                    tracing::debug!(device = %name, error = %err, "flightctl inventory: lastSeen not fetched");
                    if let Some(prev) = self.last_good.get(&name) {
                        d.last_seen.clone_from(&prev.last_seen);
                    }
                }
            }
        }
        if failed > 0 {
            self.status_tx.send_modify(|s| {
                s.last_seen_failures += u64::try_from(failed).unwrap_or(u64::MAX);
            });
            tracing::warn!(
                failed,
                example = example.as_deref().unwrap_or_default(),
                "flightctl inventory: some lastSeen requests failed; kept previous values"
            );
        }
    }
}
