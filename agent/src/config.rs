//! The agent's configuration: a TOML file, overridable by command-line flags.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::link::LinkConfig;

/// Default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/fleetlet/agent.toml";

/// Errors loading the configuration (the binary exits with code 64 on these).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message (names the key and line).
        message: String,
    },
    /// A value is out of range or missing.
    #[error("config {path}: {field}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// Key.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Device name: the Node name and the label on every Podman object (required).
    #[serde(default)]
    pub device_name: String,
    /// Where the desired snapshot, volumes and the status file live.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Podman API socket.
    #[serde(default = "default_socket")]
    pub podman_socket: PathBuf,
    /// Seconds between full resyncs against Podman.
    #[serde(default = "default_resync")]
    pub resync_secs: u64,
    /// Node IP reported as hostIP (and podIP of hostNetwork pods); detected when absent.
    #[serde(default)]
    pub node_ip: Option<String>,
    /// Maximum number of pods.
    #[serde(default = "default_max_pods")]
    pub max_pods: u32,
    /// Resources held back from pods.
    #[serde(default)]
    pub reserved: Reserved,
    /// The link to fleetlet-hub; absent = run from local desired state only.
    #[serde(default)]
    pub hub: Option<LinkConfig>,
    /// Directory of seccomp profiles that pods name as `Localhost` (default
    /// `<state_dir>/seccomp`, as the kubelet's `<root-dir>/seccomp`).
    #[serde(default)]
    pub seccomp_profile_root: Option<PathBuf>,
    /// What this device never runs, whatever the cluster allows.
    #[serde(default)]
    pub policy: crate::pod::policy::DevicePolicy,
    /// Resource figures sent to the hub (`/stats/summary`, `kubectl top`).
    #[serde(default)]
    pub stats: crate::resource_stats::StatsConfig,
    /// Pod Events kept for the hub while the link is down; past it the oldest is dropped (and
    /// the drop counted and reported to the hub).
    #[serde(default = "default_events_buffer")]
    pub events_buffer: usize,
}

fn default_events_buffer() -> usize {
    crate::events::MAX_PENDING
}

/// Reservations subtracted from capacity to get allocatable.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Reserved {
    /// CPU quantity, e.g. "100m".
    #[serde(default)]
    pub cpu: Option<String>,
    /// Memory quantity, e.g. "256Mi".
    #[serde(default)]
    pub memory: Option<String>,
    /// Ephemeral storage quantity, e.g. "1Gi".
    #[serde(default, rename = "ephemeral-storage")]
    pub ephemeral_storage: Option<String>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/fleetlet")
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/podman/podman.sock")
}
fn default_resync() -> u64 {
    60
}
fn default_max_pods() -> u32 {
    110
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            device_name: String::new(),
            state_dir: default_state_dir(),
            podman_socket: default_socket(),
            resync_secs: default_resync(),
            node_ip: None,
            max_pods: default_max_pods(),
            reserved: Reserved::default(),
            hub: None,
            seccomp_profile_root: None,
            policy: Default::default(),
            stats: Default::default(),
            events_buffer: default_events_buffer(),
        }
    }
}

impl AgentConfig {
    /// Where Localhost seccomp profiles are looked up.
    pub fn seccomp_root(&self) -> PathBuf {
        self.seccomp_profile_root
            .clone()
            .unwrap_or_else(|| self.state_dir.join("seccomp"))
    }

    /// Load `path`; a missing file is an error only when `required`.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Self::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let cfg: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().to_owned(),
        })?;
        Ok(cfg)
    }

    /// Check values after flags were applied.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field: field.into(),
            message: message.into(),
        };
        if self.device_name.is_empty() {
            return Err(invalid("device_name", "required (or --device-name)"));
        }
        let ok = self.device_name.len() <= 63
            && self
                .device_name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !ok {
            return Err(invalid(
                "device_name",
                "must be a DNS name: lowercase letters, digits, '-' and '.', at most 63",
            ));
        }
        if self.resync_secs == 0 {
            return Err(invalid("resync_secs", "must be at least 1"));
        }
        if self.stats.interval_secs > crate::resource_stats::MAX_INTERVAL_SECS {
            return Err(invalid(
                "stats.interval_secs",
                "at most 3600 (0 turns resource figures off)",
            ));
        }
        if self.events_buffer == 0 {
            return Err(invalid("events_buffer", "must be at least 1"));
        }
        if let Some(hub) = &self.hub
            && let Err(e) = hub.validate_endpoints()
        {
            return Err(invalid(
                "hub.endpoint / hub.fallback_endpoints",
                &e.to_string(),
            ));
        }
        if let Some(ip) = &self.node_ip
            && ip.parse::<std::net::IpAddr>().is_err()
        {
            return Err(invalid("node_ip", "not an IP address"));
        }
        if let Some(c) = &self.reserved.cpu
            && crate::pod::spec::parse_cpu(c).is_none()
        {
            return Err(invalid("reserved.cpu", "not a CPU quantity"));
        }
        for (field, q) in [
            ("reserved.memory", &self.reserved.memory),
            (
                "reserved.ephemeral-storage",
                &self.reserved.ephemeral_storage,
            ),
        ] {
            if let Some(q) = q
                && crate::pod::spec::parse_bytes(q).is_none()
            {
                return Err(invalid(field, "not a quantity"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_file_and_rejects_unknown_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("agent.toml");
        std::fs::write(
            &p,
            r#"
device_name = "edge-1"
state_dir = "/tmp/x"
[reserved]
cpu = "250m"
memory = "128Mi"
[hub]
endpoint = "https://127.0.0.1:7443"
ca_file = "/etc/fleetlet/ca.pem"
cert_file = "/etc/fleetlet/device.pem"
key_file = "/etc/fleetlet/device.key"
"#,
        )
        .unwrap();
        let c = AgentConfig::load(&p, true).unwrap();
        c.validate(&p).unwrap();
        assert_eq!(c.reserved.cpu.as_deref(), Some("250m"));
        assert_eq!(c.hub.unwrap().reconnect_max_backoff_secs, 60);
        std::fs::write(&p, "device_nam = \"x\"\n").unwrap();
        let e = AgentConfig::load(&p, true).unwrap_err().to_string();
        assert!(e.contains("device_nam"), "{e}");
        std::fs::write(&p, "device_name = \"Bad_Name\"\n").unwrap();
        let c = AgentConfig::load(&p, true).unwrap();
        assert!(
            c.validate(&p)
                .unwrap_err()
                .to_string()
                .contains("device_name")
        );
    }
}
