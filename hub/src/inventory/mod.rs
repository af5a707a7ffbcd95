//! The hub's view of which devices exist: the trait the rest of the hub reads, and sources for it.
//!
//! The link admits only devices present (and enabled) here; the node manager creates one Node per
//! enabled device. Sources publish the whole set through a watch channel: readers always see the
//! current level, and a missed change notification cannot leave anyone behind.

pub mod flightctl;
mod static_file;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

pub use static_file::{StaticInventory, StaticInventoryError};

/// Every known device, keyed by device name.
pub type DeviceMap = Arc<BTreeMap<String, InventoryDevice>>;

/// One device as the inventory knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryDevice {
    /// Device name; also the identity in its client certificate and the Node name's source.
    pub name: String,
    /// The device's labels as the inventory reports them (not yet sanitized for Kubernetes).
    pub labels: BTreeMap<String, String>,
    /// The fleet the device belongs to, if any.
    pub fleet: Option<String>,
    /// Only enabled devices may connect and get a Node.
    pub enabled: bool,
}

/// A source of the current device set.
pub trait Inventory: Send + Sync + 'static {
    /// The current device set; `borrow()` is the latest, `changed()` wakes on every update.
    fn devices(&self) -> watch::Receiver<DeviceMap>;

    /// Whether `name` may connect right now (present and enabled).
    fn admits(&self, name: &str) -> bool {
        self.devices()
            .borrow()
            .get(name)
            .is_some_and(|device| device.enabled)
    }
}
