//! The agent's implementation of the link's `DeviceState`: the store, capacity, statuses and
//! container logs the link relays to the hub.

use std::sync::Arc;

use fleetlet_proto::v1;
use futures::StreamExt;
use tokio::sync::watch;

use crate::link::{DeviceState, LogStream, PodStatusMap};
use crate::podman::{ContainerRuntime, LogOptions, labels};
use crate::store::DesiredStore;

/// Device state backed by the real store and runtime.
pub struct AgentDeviceState<R> {
    /// Device name.
    pub device: String,
    /// Desired store.
    pub store: Arc<DesiredStore>,
    /// Node info for hello.
    pub node_info: v1::NodeInfo,
    /// Capacity.
    pub capacity: watch::Receiver<v1::Capacity>,
    /// Pod statuses.
    pub statuses: watch::Receiver<PodStatusMap>,
    /// Runtime (for logs).
    pub rt: Arc<R>,
}

#[tonic::async_trait]
impl<R: ContainerRuntime> DeviceState for AgentDeviceState<R> {
    fn device_name(&self) -> String {
        self.device.clone()
    }

    fn held_generation(&self) -> u64 {
        self.store.held_generation()
    }

    async fn apply_snapshot(&self, snapshot: v1::DesiredSnapshot) -> Result<bool, String> {
        let generation = snapshot.generation;
        let r = self.store.apply(snapshot).await.map_err(|e| e.to_string());
        if let Ok(true) = r {
            tracing::info!(generation, "desired snapshot stored");
        }
        r
    }

    fn hello_info(&self) -> v1::NodeInfo {
        self.node_info.clone()
    }

    fn capacity(&self) -> watch::Receiver<v1::Capacity> {
        self.capacity.clone()
    }

    fn pod_statuses(&self) -> watch::Receiver<PodStatusMap> {
        self.statuses.clone()
    }

    async fn logs(&self, req: v1::LogRequest) -> Result<LogStream, String> {
        container_logs(&*self.rt, &self.device, req).await
    }
}

/// The log of container `req.container` of pod `req.pod_uid` on `device`.
pub async fn container_logs<R: ContainerRuntime>(
    rt: &R,
    device: &str,
    req: v1::LogRequest,
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
    let Some(c) = found.first() else {
        return Err(format!(
            "container {:?} of pod {} not found on this device",
            req.container, req.pod_uid
        ));
    };
    if req.previous {
        // The agent restarts a container in place, so its log already holds previous runs.
        return Err("previous=true is not supported: the log includes earlier runs".into());
    }
    let now = jiff::Timestamp::now().as_second();
    let opts = LogOptions {
        follow: req.follow,
        tail: req.tail_lines,
        since_unix: req.since_unix.or(req.since_seconds.map(|s| now - s)),
        timestamps: req.timestamps,
    };
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
