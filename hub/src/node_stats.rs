//! The latest resource figures of every device (the agent's `ResourceStats` reports), kept for
//! the kubelet API's `/stats/summary`, `/metrics/resource` and `/runningpods/`.
//!
//! Bounded: one entry per device that reported, each holding the newest report and the one
//! before it (for CPU rates), a report larger than [`MAX_REPORT_BYTES`] is refused, and the
//! entry goes when the device leaves the inventory. Figures of a disconnected device, or older
//! than about twice the device's reporting interval, are stale: the endpoint then does not
//! serve them as current (see [`StatsStore::fresh`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fleetlet_proto::v1::ResourceStats;
use tokio::time::Instant;

/// Largest report kept (encoded bytes): about 4000 containers' worth.
pub const MAX_REPORT_BYTES: usize = 512 * 1024;

/// Slack added to twice the device's interval before its figures count as stale.
const STALE_SLACK: Duration = Duration::from_secs(10);

/// One received report.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the hub received it (the hub's clock; the report's own timestamp is the device's).
    pub received: Instant,
    /// The report.
    pub stats: Arc<ResourceStats>,
}

/// A device's newest report and the one before it.
#[derive(Debug, Clone)]
pub struct DeviceFigures {
    /// The newest report.
    pub current: Sample,
    /// The report before it, for rates.
    pub previous: Option<Arc<ResourceStats>>,
}

/// Why a report was not kept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    /// Over [`MAX_REPORT_BYTES`].
    #[error("resource report of {0} bytes is over the {MAX_REPORT_BYTES}-byte limit")]
    TooLarge(usize),
    /// Timestamp missing or before the previous report's.
    #[error("resource report timestamp {0} is not after the previous report's")]
    OutOfOrder(i64),
}

/// The figures of every device.
#[derive(Debug, Default)]
pub struct StatsStore {
    devices: RwLock<HashMap<String, DeviceFigures>>,
}

impl StatsStore {
    /// Keeps `stats` as `device`'s newest report.
    pub fn record(&self, device: &str, stats: ResourceStats) -> Result<(), ReportError> {
        let size = prost::Message::encoded_len(&stats);
        if size > MAX_REPORT_BYTES {
            return Err(ReportError::TooLarge(size));
        }
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match devices.get_mut(device) {
            Some(f) => {
                if stats.timestamp_unix_nanos <= f.current.stats.timestamp_unix_nanos {
                    // A clock step back on the device: start over instead of computing a
                    // negative rate.
                    if stats.timestamp_unix_nanos <= 0 {
                        return Err(ReportError::OutOfOrder(stats.timestamp_unix_nanos));
                    }
                    f.previous = None;
                } else {
                    f.previous = Some(f.current.stats.clone());
                }
                f.current = Sample {
                    received: now,
                    stats: Arc::new(stats),
                };
            }
            None => {
                if stats.timestamp_unix_nanos <= 0 {
                    return Err(ReportError::OutOfOrder(stats.timestamp_unix_nanos));
                }
                devices.insert(
                    device.to_string(),
                    DeviceFigures {
                        current: Sample {
                            received: now,
                            stats: Arc::new(stats),
                        },
                        previous: None,
                    },
                );
            }
        }
        Ok(())
    }

    /// The device's figures, fresh or not.
    pub fn get(&self, device: &str) -> Option<DeviceFigures> {
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
            .cloned()
    }

    /// Drops the figures of a device.
    pub fn forget(&self, device: &str) {
        self.devices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(device);
    }

    /// Keeps only the devices `keep` says yes to.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.devices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|d, _| keep(d));
    }

    /// Devices with figures.
    pub fn len(&self) -> usize {
        self.devices.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// No figures at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether figures received at `received` from a device reporting every `interval_secs`
    /// still describe it at `now`: the device is connected and the next report is not overdue
    /// (twice the interval, plus slack).
    pub fn fresh(figures: &DeviceFigures, connected: bool, now: Instant) -> bool {
        let interval = Duration::from_secs(u64::from(figures.current.stats.interval_secs.max(1)));
        connected && now.duration_since(figures.current.received) <= 2 * interval + STALE_SLACK
    }
}

impl DeviceFigures {
    /// The same figures keeping only the pods in `bound` (uid → namespace and name, from the
    /// API: the pods bound to this device's Node), named as the API names them. A device
    /// reports its pods' identities itself; served unchecked, a compromised device could
    /// attribute CPU and memory to any pod in any namespace (and so drive another team's HPA).
    #[must_use]
    pub fn bound_to(&self, bound: &HashMap<String, (String, String)>) -> Self {
        let keep = |r: &ResourceStats| {
            let mut r = r.clone();
            r.pods.retain_mut(|p| match bound.get(&p.uid) {
                Some((ns, name)) => {
                    p.namespace.clone_from(ns);
                    p.name.clone_from(name);
                    true
                }
                None => false,
            });
            Arc::new(r)
        };
        Self {
            current: Sample {
                received: self.current.received,
                stats: keep(&self.current.stats),
            },
            previous: self.previous.as_deref().map(keep),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(ts: i64) -> ResourceStats {
        ResourceStats {
            timestamp_unix_nanos: ts,
            interval_secs: 15,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_two_reports_and_goes_stale() {
        let store = StatsStore::default();
        store.record("d", report(1_000)).expect("first");
        assert!(store.get("d").expect("d").previous.is_none());
        store.record("d", report(2_000)).expect("second");
        let f = store.get("d").expect("d");
        assert_eq!(f.current.stats.timestamp_unix_nanos, 2_000);
        assert_eq!(
            f.previous.as_ref().expect("previous").timestamp_unix_nanos,
            1_000
        );
        assert!(StatsStore::fresh(&f, true, Instant::now()));
        assert!(!StatsStore::fresh(&f, false, Instant::now()));
        tokio::time::advance(Duration::from_secs(41)).await;
        assert!(!StatsStore::fresh(&f, true, Instant::now()));
        // A clock step back starts over.
        store.record("d", report(1_500)).expect("step back");
        assert!(store.get("d").expect("d").previous.is_none());
        assert_eq!(
            store.record("d", report(0)),
            Err(ReportError::OutOfOrder(0))
        );
        store.retain(|d| d != "d");
        assert!(store.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn figures_are_served_only_for_pods_bound_to_the_node_under_the_apis_names() {
        let store = StatsStore::default();
        let pod = |uid: &str, ns: &str, name: &str| fleetlet_proto::v1::PodResourceStats {
            uid: uid.into(),
            namespace: ns.into(),
            name: name.into(),
            ..Default::default()
        };
        let mut r = report(1_000);
        // One of its pods, misnamed; and a made-up pod in another team's namespace.
        r.pods = vec![
            pod("u1", "ns", "forged-name"),
            pod("u9", "other-team", "web"),
        ];
        store.record("d", r).expect("record");
        let bound = HashMap::from([("u1".to_string(), ("ns".to_string(), "web-1".to_string()))]);
        let f = store.get("d").expect("d").bound_to(&bound);
        let pods = &f.current.stats.pods;
        assert_eq!(pods.len(), 1);
        assert_eq!(
            (pods[0].namespace.as_str(), pods[0].name.as_str()),
            ("ns", "web-1")
        );
    }

    #[test]
    fn oversized_reports_are_refused() {
        let store = StatsStore::default();
        let mut r = report(1);
        r.pods = (0..20_000)
            .map(|i| fleetlet_proto::v1::PodResourceStats {
                uid: format!("{i:036}"),
                ..Default::default()
            })
            .collect();
        assert!(matches!(
            store.record("d", r),
            Err(ReportError::TooLarge(_))
        ));
        assert!(store.get("d").is_none());
    }
}
