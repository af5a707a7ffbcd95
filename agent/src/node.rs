//! What the device offers: capacity, allocatable (capacity minus reservations) and node info.

use std::collections::BTreeMap;
use std::path::Path;

use fleetlet_proto::v1::{Capacity, NodeInfo};

use crate::config::AgentConfig;
use crate::pod::spec::{Resources, parse_bytes, parse_cpu};

/// The agent's version (Cargo package version).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// /proc/sys/kernel/random/boot_id.
pub fn boot_id() -> String {
    read_trim("/proc/sys/kernel/random/boot_id")
}

/// `PRETTY_NAME` of /etc/os-release (falls back to /usr/lib/os-release).
pub fn os_image() -> String {
    for p in ["/etc/os-release", "/usr/lib/os-release"] {
        if let Ok(text) = std::fs::read_to_string(p) {
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("PRETTY_NAME=") {
                    return v.trim_matches('"').to_owned();
                }
            }
        }
    }
    "Linux".into()
}

/// CPU architecture in Kubernetes spelling.
pub fn architecture() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        other => other,
    }
    .into()
}

/// Static node facts.
pub fn node_info(runtime_version: &str) -> NodeInfo {
    NodeInfo {
        operating_system: "linux".into(),
        architecture: architecture(),
        kernel_version: read_trim("/proc/sys/kernel/osrelease"),
        os_image: os_image(),
        machine_id: read_trim("/etc/machine-id"),
        boot_id: boot_id(),
        container_runtime_version: format!("podman://{runtime_version}"),
        agent_version: AGENT_VERSION.into(),
        addresses: Vec::new(),
        pod_networks: Vec::new(),
    }
}

/// Total memory in bytes from /proc/meminfo.
/// The device's memory as its Node's capacity states it (whole KiB).
pub fn memory_capacity() -> u64 {
    memory_bytes() / 1024 * 1024
}

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// Size of the filesystem holding `dir`.
fn storage_bytes(dir: &Path) -> u64 {
    let disks = sysinfo::Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .filter(|d| dir.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.total_space())
        .unwrap_or(0)
}

/// Capacity and allocatable of this device.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeResources {
    /// For the protocol.
    pub capacity: Capacity,
    /// Allocatable CPU/memory for admission.
    pub allocatable: Resources,
}

/// Measure the device and subtract the configured reservations.
pub fn resources(cfg: &AgentConfig, info: NodeInfo) -> NodeResources {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let mem = memory_bytes();
    let storage = storage_bytes(&cfg.state_dir);
    let r_cpu = cfg.reserved.cpu.as_deref().and_then(parse_cpu).unwrap_or(0);
    let r_mem = cfg
        .reserved
        .memory
        .as_deref()
        .and_then(parse_bytes)
        .unwrap_or(0);
    let r_storage = cfg
        .reserved
        .ephemeral_storage
        .as_deref()
        .and_then(parse_bytes)
        .unwrap_or(0);
    let alloc = Resources {
        cpu_millis: (cpus * 1000).saturating_sub(r_cpu),
        memory_bytes: mem.saturating_sub(r_mem),
    };
    let capacity = BTreeMap::from([
        ("cpu".to_owned(), cpus.to_string()),
        ("memory".to_owned(), format!("{}Ki", mem / 1024)),
        ("pods".to_owned(), cfg.max_pods.to_string()),
        ("ephemeral-storage".to_owned(), storage.to_string()),
    ]);
    let allocatable = BTreeMap::from([
        ("cpu".to_owned(), format!("{}m", alloc.cpu_millis)),
        (
            "memory".to_owned(),
            format!("{}Ki", alloc.memory_bytes / 1024),
        ),
        ("pods".to_owned(), cfg.max_pods.to_string()),
        (
            "ephemeral-storage".to_owned(),
            storage.saturating_sub(r_storage).to_string(),
        ),
    ]);
    NodeResources {
        capacity: Capacity {
            capacity: capacity.into_iter().collect(),
            allocatable: allocatable.into_iter().collect(),
            node_info: Some(info),
            conditions: Vec::new(),
        },
        allocatable: alloc,
    }
}

/// The node IP: configured, or the address of the interface with the default route. Opening a
/// UDP socket towards a TEST-NET address sends nothing; it only asks the kernel for the route.
pub fn node_ip(cfg: &AgentConfig) -> String {
    if let Some(ip) = &cfg.node_ip {
        return ip.clone();
    }
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "127.0.0.1".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocatable_subtracts_reservations() {
        let cfg = AgentConfig {
            reserved: crate::config::Reserved {
                cpu: Some("500m".into()),
                memory: Some("64Mi".into()),
                ephemeral_storage: None,
            },
            state_dir: "/".into(),
            ..Default::default()
        };
        let r = resources(&cfg, node_info("4.3.1"));
        let cpus: u64 = r.capacity.capacity["cpu"].parse().unwrap();
        assert_eq!(r.allocatable.cpu_millis, cpus * 1000 - 500);
        assert!(r.allocatable.memory_bytes > 0);
        assert_eq!(
            r.capacity.allocatable["cpu"],
            format!("{}m", cpus * 1000 - 500)
        );
        let info = r.capacity.node_info.unwrap();
        assert_eq!(info.operating_system, "linux");
        assert!(!info.boot_id.is_empty());
        assert_eq!(info.container_runtime_version, "podman://4.3.1");
    }
}
