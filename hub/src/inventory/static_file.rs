//! An inventory read from a TOML file, for development, tests and hubs without Flightctl.
//!
//! ```toml
//! [[device]]
//! name = "dev-1"
//! fleet = "edge"          # optional
//! enabled = true          # optional, default true
//! labels = { site = "lab" }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::watch;

use super::{DeviceMap, Inventory, InventoryDevice};

/// Why a static inventory could not be loaded. Not retryable until the file is fixed.
#[derive(Debug, thiserror::Error)]
pub enum StaticInventoryError {
    /// The file could not be read.
    #[error("reading inventory file {path}: {source}")]
    Read {
        /// The inventory file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid inventory TOML.
    #[error("parsing inventory file {path}: {source}")]
    Parse {
        /// The inventory file.
        path: PathBuf,
        /// What the TOML parser said (names the line and field).
        source: toml::de::Error,
    },
    /// Two entries have the same device name.
    #[error("inventory file {path}: device {name:?} is listed twice")]
    Duplicate {
        /// The inventory file.
        path: PathBuf,
        /// The repeated name.
        name: String,
    },
    /// A device entry has an empty name.
    #[error("inventory file {path}: a device has an empty name")]
    EmptyName {
        /// The inventory file.
        path: PathBuf,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InventoryFile {
    #[serde(default)]
    device: Vec<DeviceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceEntry {
    name: String,
    #[serde(default)]
    fleet: Option<String>,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

fn enabled_by_default() -> bool {
    true
}

/// A fixed (or explicitly replaced) device set.
#[derive(Debug, Clone)]
pub struct StaticInventory {
    tx: Arc<watch::Sender<DeviceMap>>,
}

impl StaticInventory {
    /// An inventory holding exactly `devices`.
    pub fn new(devices: impl IntoIterator<Item = InventoryDevice>) -> Self {
        let map = devices
            .into_iter()
            .map(|device| (device.name.clone(), device))
            .collect::<BTreeMap<_, _>>();
        Self {
            tx: Arc::new(watch::Sender::new(Arc::new(map))),
        }
    }

    /// Load the device set from a TOML file (see the module docs for the format).
    pub fn load(path: &Path) -> Result<Self, StaticInventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| StaticInventoryError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parse inventory TOML; `path` only names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, StaticInventoryError> {
        let file: InventoryFile =
            toml::from_str(text).map_err(|source| StaticInventoryError::Parse {
                path: path.to_owned(),
                source,
            })?;
        let mut map = BTreeMap::new();
        for entry in file.device {
            if entry.name.is_empty() {
                return Err(StaticInventoryError::EmptyName {
                    path: path.to_owned(),
                });
            }
            let device = InventoryDevice {
                name: entry.name.clone(),
                labels: entry.labels,
                fleet: entry.fleet,
                enabled: entry.enabled,
            };
            if map.insert(entry.name.clone(), device).is_some() {
                return Err(StaticInventoryError::Duplicate {
                    path: path.to_owned(),
                    name: entry.name,
                });
            }
        }
        Ok(Self {
            tx: Arc::new(watch::Sender::new(Arc::new(map))),
        })
    }

    /// Replace the whole device set (tests, or a reload of the file); readers are notified.
    pub fn replace(&self, devices: impl IntoIterator<Item = InventoryDevice>) {
        let map = devices
            .into_iter()
            .map(|device| (device.name.clone(), device))
            .collect::<BTreeMap<_, _>>();
        self.tx.send_replace(Arc::new(map));
    }
}

impl Inventory for StaticInventory {
    fn devices(&self) -> watch::Receiver<DeviceMap> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_with_defaults() {
        let inv = StaticInventory::parse(
            Path::new("inv.toml"),
            r#"
            [[device]]
            name = "dev-1"
            fleet = "edge"
            labels = { site = "lab" }

            [[device]]
            name = "dev-2"
            enabled = false
            "#,
        )
        .unwrap();
        let devices = inv.devices().borrow().clone();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices["dev-1"].fleet.as_deref(), Some("edge"));
        assert_eq!(devices["dev-1"].labels["site"], "lab");
        assert!(devices["dev-1"].enabled);
        assert!(!devices["dev-2"].enabled);
        assert!(inv.admits("dev-1"));
        assert!(!inv.admits("dev-2"));
        assert!(!inv.admits("dev-3"));
    }

    #[test]
    fn rejects_duplicates_and_unknown_fields() {
        let dup = StaticInventory::parse(
            Path::new("inv.toml"),
            "[[device]]\nname = \"a\"\n[[device]]\nname = \"a\"\n",
        );
        assert!(matches!(dup, Err(StaticInventoryError::Duplicate { name, .. }) if name == "a"));
        let unknown = StaticInventory::parse(
            Path::new("inv.toml"),
            "[[device]]\nname = \"a\"\ncolor = 1\n",
        );
        let err = unknown.unwrap_err().to_string();
        assert!(err.contains("inv.toml") && err.contains("color"), "{err}");
    }

    #[test]
    fn replace_notifies_readers() {
        let inv = StaticInventory::new([]);
        let mut rx = inv.devices();
        inv.replace([InventoryDevice {
            name: "x".into(),
            labels: BTreeMap::new(),
            fleet: None,
            enabled: true,
        }]);
        assert!(rx.has_changed().unwrap());
        assert!(rx.borrow_and_update().contains_key("x"));
    }
}
