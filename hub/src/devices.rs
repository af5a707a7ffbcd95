//! What the hub knows live about each device from its stream: connected or not since when, its
//! node info and its last capacity report. The link's `DeviceSessions` owns the one registry and
//! folds each session event into it before handing the event on; the node manager and the pod
//! relay read it through a watch channel (`Sessions::live`).

use std::collections::BTreeMap;
use std::sync::Arc;

use fleetlet_proto::v1::{Capacity, NodeInfo};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::sessions::SessionEvent;

/// The live view of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveDevice {
    /// True while its stream is up.
    pub connected: bool,
    /// When `connected` last changed.
    pub since: Instant,
    /// Node info from its hello or capacity report.
    pub info: Option<NodeInfo>,
    /// Its last capacity report.
    pub capacity: Option<Capacity>,
}

/// Every device that has talked to this hub since it started.
pub type LiveSet = Arc<BTreeMap<String, LiveDevice>>;

/// Keeps the [`LiveSet`] up to date from session events.
#[derive(Clone)]
pub struct LiveRegistry {
    tx: watch::Sender<LiveSet>,
}

impl Default for LiveRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl LiveRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(BTreeMap::new()));
        Self { tx }
    }

    /// A receiver of the current set and its changes.
    pub fn subscribe(&self) -> watch::Receiver<LiveSet> {
        self.tx.subscribe()
    }

    /// Folds one event into the set; notifies only when something a reader cares about changed.
    pub fn apply(&self, ev: &SessionEvent) {
        self.tx.send_if_modified(|set| {
            let map = Arc::make_mut(set);
            match ev {
                SessionEvent::Connected { device, hello } => {
                    let entry = map.entry(device.clone()).or_insert_with(|| LiveDevice {
                        connected: false,
                        since: Instant::now(),
                        info: None,
                        capacity: None,
                    });
                    entry.connected = true;
                    entry.since = Instant::now();
                    if hello.node_info.is_some() {
                        entry.info.clone_from(&hello.node_info);
                    }
                    true
                }
                SessionEvent::Disconnected { device } => match map.get_mut(device) {
                    Some(entry) if entry.connected => {
                        entry.connected = false;
                        entry.since = Instant::now();
                        true
                    }
                    _ => false,
                },
                SessionEvent::Capacity { device, capacity } => {
                    let entry = map.entry(device.clone()).or_insert_with(|| LiveDevice {
                        connected: true,
                        since: Instant::now(),
                        info: None,
                        capacity: None,
                    });
                    if capacity.node_info.is_some() {
                        entry.info.clone_from(&capacity.node_info);
                    }
                    entry.capacity = Some(capacity.clone());
                    true
                }
                SessionEvent::PodStatus { .. }
                | SessionEvent::Acked { .. }
                | SessionEvent::Events { .. }
                | SessionEvent::Stats { .. } => false,
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlet_proto::v1::Hello;

    #[tokio::test]
    async fn connect_capacity_disconnect() {
        let reg = LiveRegistry::new();
        let mut rx = reg.subscribe();
        reg.apply(&SessionEvent::Connected {
            device: "d".into(),
            hello: Hello {
                node_info: Some(NodeInfo {
                    architecture: "arm64".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        });
        assert!(rx.has_changed().expect("open"));
        let set = rx.borrow_and_update().clone();
        assert!(set["d"].connected);
        assert_eq!(
            set["d"].info.as_ref().map(|i| i.architecture.as_str()),
            Some("arm64")
        );
        reg.apply(&SessionEvent::Capacity {
            device: "d".into(),
            capacity: Capacity::default(),
        });
        assert!(rx.borrow_and_update()["d"].capacity.is_some());
        reg.apply(&SessionEvent::Disconnected { device: "d".into() });
        assert!(!rx.borrow_and_update()["d"].connected);
        // A second disconnect changes nothing and does not wake readers.
        reg.apply(&SessionEvent::Disconnected { device: "d".into() });
        assert!(!rx.has_changed().expect("open"));
    }
}
