//! The agent's implementation of the link's `DeviceState`: the store, capacity, statuses and
//! container logs the link relays to the hub.

use std::sync::Arc;

use fleetlet_proto::v1;
use futures::StreamExt;
use tokio::sync::watch;

use crate::link::{DeviceState, LogStream, PodStatusMap};
use crate::link_status::{LinkEvent, LinkTracker};
use crate::podman::{ContainerRuntime, LogOptions, labels};
use crate::store::DesiredStore;

/// Device state backed by the real store and runtime.
pub struct AgentDeviceState<R> {
    /// The link's state for the status file.
    pub link: LinkTracker,
    /// Device name.
    pub device: String,
    /// Desired store.
    pub store: Arc<DesiredStore>,
    /// Node info for hello.
    pub node_info: v1::NodeInfo,
    /// Capacity, with the node conditions the agent reports; the storage condition is set here.
    pub capacity: watch::Sender<v1::Capacity>,
    /// Pod statuses.
    pub statuses: watch::Receiver<PodStatusMap>,
    /// Runtime (for logs).
    pub rt: Arc<R>,
    /// Since when the hub refuses to serve the device, for the status file.
    pub not_served: watch::Sender<Option<String>>,
    /// The pod workers' reconcile passes.
    pub reconcile_stats: Arc<crate::reconcile_stats::ReconcileStats>,
    /// The latest resource figures and the hub's demand for them (none when
    /// `[stats] interval_secs = 0`).
    pub resource_stats: Option<(crate::resource_stats::Latest, crate::resource_stats::Demand)>,
    /// Events about the pods, for the hub.
    pub events: crate::events::EventRecorder,
}

#[tonic::async_trait]
impl<R: ContainerRuntime> DeviceState for AgentDeviceState<R> {
    fn link_changed(&self, event: LinkEvent) {
        self.link.record(event);
    }

    fn device_name(&self) -> String {
        self.device.clone()
    }

    fn reconcile_stats(&self) -> Option<Arc<crate::reconcile_stats::ReconcileStats>> {
        Some(self.reconcile_stats.clone())
    }

    fn resource_stats(&self) -> Option<crate::resource_stats::Latest> {
        self.resource_stats
            .as_ref()
            .map(|(latest, _)| latest.clone())
    }

    fn want_stats(&self, for_secs: u32) {
        if let Some((_, demand)) = &self.resource_stats {
            demand.want(for_secs);
        }
    }

    fn events(&self) -> Option<crate::events::EventRecorder> {
        Some(self.events.clone())
    }

    fn held_generation(&self) -> u64 {
        self.store.held_generation()
    }

    async fn apply_snapshot(&self, snapshot: v1::DesiredSnapshot) -> Result<bool, String> {
        let generation = snapshot.generation;
        let r = self.store.apply(snapshot).await.map_err(|e| e.to_string());
        match &r {
            Ok(stored) => {
                if *stored {
                    tracing::info!(generation, "desired snapshot stored");
                }
                if set_storage_condition(&self.capacity, None) {
                    tracing::info!(generation, "desired state storage works again");
                }
            }
            Err(error) => {
                set_storage_condition(&self.capacity, Some((generation, error)));
            }
        }
        r
    }

    fn hello_info(&self) -> v1::NodeInfo {
        self.node_info.clone()
    }

    fn capacity(&self) -> watch::Receiver<v1::Capacity> {
        self.capacity.subscribe()
    }

    fn pod_statuses(&self) -> watch::Receiver<PodStatusMap> {
        self.statuses.clone()
    }

    async fn logs(&self, req: v1::LogRequest) -> Result<LogStream, String> {
        let previous = req
            .previous
            .then(|| previous_run(&self.statuses.borrow(), &req.pod_uid, &req.container))
            .flatten();
        container_logs(&*self.rt, &self.device, req, previous).await
    }

    async fn open_stream(&self, open: v1::StreamOpen) -> Result<crate::link::StreamIo, String> {
        crate::stream_sessions::open_stream(&self.rt, &self.device, open).await
    }

    fn set_not_served(&self, since: Option<String>) {
        self.not_served.send_replace(since);
    }
}

/// Reason of the `DiskPressure` condition while the desired state cannot be written.
pub const STORAGE_FAILED_REASON: &str = "DesiredStateNotStored";

/// Sets (`Some`) or clears (`None`) the `DiskPressure` condition the device reports while it
/// cannot persist its desired state (full or failing state directory). The hub shows it on the
/// Node, where `kubectl describe node` shows the file and the error to an operator, and the
/// node lifecycle controller keeps new pods off the device until it clears. Returns whether the
/// reported conditions changed.
pub fn set_storage_condition(
    capacity: &watch::Sender<v1::Capacity>,
    failure: Option<(u64, &str)>,
) -> bool {
    capacity.send_if_modified(|c| {
        let before = c.conditions.clone();
        c.conditions.retain(|x| x.r#type != "DiskPressure");
        if let Some((generation, error)) = failure {
            c.conditions.push(v1::NodeCondition {
                r#type: "DiskPressure".into(),
                status: "True".into(),
                reason: STORAGE_FAILED_REASON.into(),
                message: format!(
                    "cannot store desired snapshot generation {generation}; running pods are kept: {error}"
                ),
            });
        }
        c.conditions != before
    })
}

/// The log of container `req.container` of pod `req.pod_uid` on `device`.
/// When the previous run of container `name` of pod `uid` started and finished (Unix seconds),
/// from its published status (`lastState.terminated`).
pub fn previous_run(statuses: &PodStatusMap, uid: &str, name: &str) -> Option<(i64, i64)> {
    let entry = statuses.get(uid)?;
    let status: k8s_openapi::api::core::v1::PodStatus =
        serde_json::from_slice(&entry.status_json).ok()?;
    let t = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .find(|c| c.name == name)?
        .last_state
        .as_ref()?
        .terminated
        .clone()?;
    Some((t.started_at?.0.as_second(), t.finished_at?.0.as_second()))
}

/// The log of a pod's container. With `req.previous`, `previous` is the time window of the
/// container's previous run: the agent restarts a container in place, so its log holds every
/// run, and the previous one is the part written between that run's start and finish.
pub async fn container_logs<R: ContainerRuntime>(
    rt: &R,
    device: &str,
    req: v1::LogRequest,
    previous: Option<(i64, i64)>,
) -> Result<LogStream, String> {
    let filter = [
        format!("{}={device}", labels::DEVICE),
        format!("{}={}", labels::POD_UID, req.pod_uid),
        format!("{}={}", labels::CONTAINER, req.container),
    ];
    let found = rt
        .list_containers(&filter)
        .await
        .map_err(|e| e.to_string())?;
    tracing::debug!(
        pod_uid = %req.pod_uid,
        container = %req.container,
        found = ?found.iter().map(|c| (c.id.as_str(), c.state.as_str())).collect::<Vec<_>>(),
        follow = req.follow,
        "log request"
    );
    let Some(c) = found.first() else {
        return Err(format!(
            "container {:?} of pod {} not found on this device",
            req.container, req.pod_uid
        ));
    };
    let now = jiff::Timestamp::now().as_second();
    let mut opts = LogOptions {
        follow: req.follow,
        tail: req.tail_lines,
        since_unix: req.since_unix.or(req.since_seconds.map(|s| now - s)),
        until_unix: None,
        timestamps: req.timestamps,
    };
    if req.previous {
        // The kubelet's wording when there is no previous instance.
        let Some((started, finished)) = previous else {
            return Err(format!(
                "previous terminated container {:?} in pod {:?} not found",
                req.container, req.pod_uid
            ));
        };
        opts.follow = false;
        opts.since_unix = Some(opts.since_unix.map_or(started, |s| s.max(started)));
        // The status holds whole seconds and Podman keeps the lines at or before `until`: the
        // last line of a run that finished at 12:00:44.8 is stamped after 12:00:44, so the
        // window ends a second later (the next run starts after its back-off, 10 s at least,
        // or after an agent restart).
        opts.until_unix = Some(finished.saturating_add(1));
    }
    let stream = rt.logs(&c.id, &opts).await.map_err(|e| e.to_string())?;
    let stream = stream.map(|r| r.map_err(|e| e.to_string()));
    Ok(match req.limit_bytes {
        Some(limit) if limit >= 0 => {
            let mut left = limit as usize;
            stream
                .take_while(move |r| {
                    let go = left > 0;
                    if let Ok(b) = r {
                        left = left.saturating_sub(b.len());
                    }
                    futures::future::ready(go)
                })
                .boxed()
        }
        _ => stream.boxed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_condition_is_set_once_and_cleared() {
        let capacity = watch::Sender::new(v1::Capacity {
            conditions: vec![v1::NodeCondition {
                r#type: "MemoryPressure".into(),
                status: "False".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let mut rx = capacity.subscribe();
        let error = "desired state /s/.desired.snapshot.tmp: No space left on device (os error 28)";
        assert!(set_storage_condition(&capacity, Some((7, error))));
        assert!(rx.has_changed().unwrap_or(false));
        let c = rx.borrow_and_update().clone();
        let disk = c
            .conditions
            .iter()
            .find(|c| c.r#type == "DiskPressure")
            .expect("DiskPressure set");
        assert_eq!(
            (disk.status.as_str(), disk.reason.as_str()),
            ("True", STORAGE_FAILED_REASON)
        );
        assert!(disk.message.contains("generation 7") && disk.message.contains(error));
        // The same failure again does not wake the link.
        assert!(!set_storage_condition(&capacity, Some((7, error))));
        assert!(set_storage_condition(&capacity, None));
        let c = rx.borrow_and_update().clone();
        assert_eq!(c.conditions.len(), 1, "other conditions stay: {c:?}");
        assert!(!set_storage_condition(&capacity, None));
    }
}
