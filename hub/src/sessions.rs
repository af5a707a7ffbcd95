//! What the Kubernetes side of the hub needs from the device link (LINK's `DeviceSessions`) and
//! from the inventory, as small seams so the controllers can be unit-tested with in-memory fakes
//! while `run` wires the real link server.

use std::collections::HashMap;

use bytes::Bytes;
use fleetlet_proto::v1::{LogRequest, PodBundle};
use futures::future::BoxFuture;
use futures::stream::BoxStream;

pub use crate::devices::{LiveRegistry, LiveSet};
pub use crate::link::LinkError;
use tokio::sync::watch;

/// A container log as the device streams it.
pub type LogStream = BoxStream<'static, Result<Bytes, LinkError>>;

/// The device link as the controllers use it.
pub trait Sessions: Send + Sync + 'static {
    /// Replaces the whole desired pod set of a device; returns the generation it got.
    /// `termination_grace` holds, by pod UID, the grace period (seconds) of each pod being
    /// deleted (left out of `pods`): the API's deletionGracePeriodSeconds, relayed to the device.
    fn set_desired(
        &self,
        device: &str,
        pods: Vec<PodBundle>,
        termination_grace: HashMap<String, u64>,
    ) -> u64;
    /// True while the device has a live stream.
    fn is_connected(&self, device: &str) -> bool;
    /// The live view of every device (connected since when, node info, capacity), published by
    /// the link as sessions start, report and end: the one place that knows whether a device
    /// is connected.
    fn live(&self) -> watch::Receiver<LiveSet>;
    /// Streams a container log from the device. The error says why not: offline
    /// ([`LinkError::NotConnected`]), congested, or refused by the device.
    fn open_logs(
        &self,
        device: &str,
        req: LogRequest,
    ) -> BoxFuture<'static, Result<LogStream, LinkError>>;
}

pub use crate::inventory::InventoryDevice as DeviceRecord;
pub use crate::link::SessionEvent;

/// The inventory: current device set, changes notify.
pub type DeviceSet = crate::inventory::DeviceMap;

/// The real link.
impl Sessions for crate::link::DeviceSessions {
    fn set_desired(
        &self,
        device: &str,
        pods: Vec<PodBundle>,
        termination_grace: HashMap<String, u64>,
    ) -> u64 {
        crate::link::DeviceSessions::set_desired_with_grace(self, device, pods, termination_grace)
    }

    fn is_connected(&self, device: &str) -> bool {
        crate::link::DeviceSessions::is_connected(self, device)
    }

    fn live(&self) -> watch::Receiver<LiveSet> {
        crate::link::DeviceSessions::live(self)
    }

    fn open_logs(
        &self,
        device: &str,
        req: LogRequest,
    ) -> BoxFuture<'static, Result<LogStream, LinkError>> {
        let this = self.clone();
        let device = device.to_string();
        Box::pin(async move { crate::link::DeviceSessions::open_logs(&this, &device, req).await })
    }
}
