//! A [`DeviceState`] kept in memory: for link tests and the link benchmark, where the point is the
//! wire and not the disk. The agent itself uses its on-disk store.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use fleetlet_proto::v1;
use tokio::sync::watch;

use super::{DeviceState, LogStream, PodStatusMap};

/// An in-memory device: holds the newest snapshot, exposes settable capacity and pod statuses,
/// and serves a fixed log text.
pub struct MemoryDeviceState {
    name: String,
    held: AtomicU64,
    snapshots: RwLock<Vec<v1::DesiredSnapshot>>,
    capacity: watch::Sender<v1::Capacity>,
    pods: watch::Sender<PodStatusMap>,
    log_text: RwLock<Vec<u8>>,
    applied: watch::Sender<u64>,
    not_served: watch::Sender<Option<String>>,
    resource_stats: watch::Sender<Option<Arc<v1::ResourceStats>>>,
}

impl MemoryDeviceState {
    /// A device named `name` holding no snapshot.
    pub fn new(name: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            held: AtomicU64::new(0),
            snapshots: RwLock::new(Vec::new()),
            capacity: watch::Sender::new(v1::Capacity::default()),
            pods: watch::Sender::new(Arc::new(BTreeMap::new())),
            log_text: RwLock::new(Vec::new()),
            applied: watch::Sender::new(0),
            not_served: watch::Sender::new(None),
            resource_stats: watch::Sender::new(None),
        })
    }

    /// Publishes a resource reading (the link sends each new one once).
    pub fn set_resource_stats(&self, stats: v1::ResourceStats) {
        self.resource_stats.send_replace(Some(Arc::new(stats)));
    }

    /// Since when the hub refuses to serve the device, as the link last recorded it.
    pub fn not_served(&self) -> watch::Receiver<Option<String>> {
        self.not_served.subscribe()
    }

    /// Every snapshot stored so far, oldest first.
    pub fn snapshots(&self) -> Vec<v1::DesiredSnapshot> {
        self.snapshots
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Wakes whenever a snapshot is stored; the value is the held generation.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Replace the reported capacity.
    pub fn set_capacity(&self, capacity: v1::Capacity) {
        self.capacity.send_replace(capacity);
    }

    /// Set (or replace) one pod's status entry.
    pub fn set_pod_status(&self, entry: v1::PodStatusEntry) {
        self.pods.send_modify(|pods| {
            Arc::make_mut(pods).insert(entry.uid.clone(), entry);
        });
    }

    /// The text every log request returns.
    pub fn set_log_text(&self, text: &[u8]) {
        *self
            .log_text
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = text.to_vec();
    }
}

#[tonic::async_trait]
impl DeviceState for MemoryDeviceState {
    fn device_name(&self) -> String {
        self.name.clone()
    }

    fn resource_stats(&self) -> Option<crate::resource_stats::Latest> {
        Some(self.resource_stats.subscribe())
    }

    fn held_generation(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    async fn apply_snapshot(&self, snapshot: v1::DesiredSnapshot) -> Result<bool, String> {
        let generation = snapshot.generation;
        if generation <= self.held.load(Ordering::Acquire) {
            return Ok(false);
        }
        self.snapshots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(snapshot);
        self.held.store(generation, Ordering::Release);
        self.applied.send_replace(generation);
        Ok(true)
    }

    fn set_not_served(&self, since: Option<String>) {
        self.not_served.send_replace(since);
    }

    fn hello_info(&self) -> v1::NodeInfo {
        v1::NodeInfo {
            operating_system: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        }
    }

    fn capacity(&self) -> watch::Receiver<v1::Capacity> {
        self.capacity.subscribe()
    }

    fn pod_statuses(&self) -> watch::Receiver<PodStatusMap> {
        self.pods.subscribe()
    }

    async fn logs(&self, req: v1::LogRequest) -> Result<LogStream, String> {
        if req.container.is_empty() {
            return Err(format!("pod {}: no container named", req.pod_uid));
        }
        let text = bytes::Bytes::from(
            self.log_text
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        );
        Ok(Box::pin(futures::stream::iter([Ok(text)])))
    }
}
