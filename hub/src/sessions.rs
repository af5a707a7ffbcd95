//! What the Kubernetes side of the hub needs from the device link (LINK's `DeviceSessions`) and
//! from the inventory, as small seams so the controllers can be unit-tested with in-memory fakes
//! while `run` wires the real link server.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use fleetlet_proto::v1::{Capacity, Hello, LogRequest, PodBundle, PodStatusReport};
use futures::future::BoxFuture;
use futures::stream::BoxStream;

/// A container log as the device streams it.
pub type LogStream = BoxStream<'static, Result<Bytes, String>>;

/// The device link as the controllers use it.
pub trait Sessions: Send + Sync + 'static {
    /// Replaces the whole desired pod set of a device; returns the generation it got.
    fn set_desired(&self, device: &str, pods: Vec<PodBundle>) -> u64;
    /// True while the device has a live stream.
    fn is_connected(&self, device: &str) -> bool;
    /// Streams a container log from the device; an error when it is offline or refuses.
    fn open_logs(
        &self,
        device: &str,
        req: LogRequest,
    ) -> BoxFuture<'static, Result<LogStream, String>>;
}

/// Something that happened on a device's stream.
#[derive(Debug, Clone)]
pub enum SessionEvent {
    /// The device opened a stream and said hello.
    Connected {
        /// Device name (from its certificate).
        device: String,
        /// Its hello.
        hello: Hello,
    },
    /// The device's stream ended.
    Disconnected {
        /// Device name.
        device: String,
    },
    /// The device reported capacity.
    Capacity {
        /// Device name.
        device: String,
        /// What it offers.
        capacity: Capacity,
    },
    /// The device reported pod statuses.
    PodStatus {
        /// Device name.
        device: String,
        /// The statuses.
        report: PodStatusReport,
    },
    /// The device persisted (or refused) a snapshot.
    Acked {
        /// Device name.
        device: String,
        /// Generation it now holds.
        generation: u64,
        /// Why it refused the snapshot, if it did.
        error: Option<String>,
    },
}

/// One device of the inventory, as the controllers need it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceRecord {
    /// Device name; also the Node name.
    pub name: String,
    /// The device's own labels (unsanitized).
    pub labels: BTreeMap<String, String>,
    /// The fleet the device belongs to.
    pub fleet: Option<String>,
    /// Disabled devices get no Node.
    pub enabled: bool,
}

/// The inventory: current device set, changes notify.
pub type DeviceSet = Arc<BTreeMap<String, DeviceRecord>>;
