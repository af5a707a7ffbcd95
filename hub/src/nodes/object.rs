//! The Node bodies the hub applies: pure functions from what the hub knows about a device to the
//! server-side-apply documents for `nodes` and `nodes/status`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use fleetlet_proto::v1::{Capacity, NodeInfo};
use serde_json::{Value, json};

use crate::inventory::InventoryDevice;
use crate::labels::sanitize_labels;

/// Label carrying the device's Flightctl fleet.
pub const FLEET_LABEL: &str = "flightctl.io/fleet";
/// Label marking Nodes this hub owns, so it finds them again after a restart.
pub const MANAGED_LABEL: &str = "fleetlet.io/managed-by";
/// Annotation naming the leader-election Lease (`namespace/name`) of the hub that applies the
/// Node: two hub deployments configured with the same instance name lead on different Leases,
/// so the second one finds the first one's live Lease here and stays off instead of fighting
/// over the Nodes.
pub const LEADER_LEASE_ANNOTATION: &str = "fleetlet.io/leader-lease";
/// The taint keeping ordinary pods off fleetlet nodes.
pub const PROVIDER_TAINT_KEY: &str = "virtual-kubelet.io/provider";
/// Value of the provider taint.
pub const PROVIDER_TAINT_VALUE: &str = "fleetlet";
/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "fleetlet";

/// Well-known Node label of the zone a Node is in.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Well-known Node label of the region a Node is in.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";

/// The node labels for a device: its sanitized labels, its topology (from the device labels
/// `[nodes] zone_label` and `region_label` name), then the labels the hub owns (which win).
pub fn node_labels(
    device: &InventoryDevice,
    info: Option<&NodeInfo>,
    cfg: &crate::config::NodesConfig,
) -> BTreeMap<String, String> {
    let instance = cfg.instance.as_str();
    let mut labels = sanitize_labels(&device.labels);
    for (from, to) in [
        (&cfg.zone_label, ZONE_LABEL),
        (&cfg.region_label, REGION_LABEL),
    ] {
        if let Some(value) = device
            .labels
            .get(from.as_str())
            .filter(|_| !from.is_empty())
        {
            labels.insert(to.to_string(), crate::labels::sanitize_value(value));
        }
    }
    if let Some(fleet) = &device.fleet {
        labels.insert(
            FLEET_LABEL.to_string(),
            crate::labels::sanitize_value(fleet),
        );
    }
    let os = info
        .map(|i| i.operating_system.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("linux");
    let arch = info
        .map(|i| i.architecture.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("amd64");
    labels.insert("kubernetes.io/os".into(), crate::labels::sanitize_value(os));
    labels.insert(
        "beta.kubernetes.io/os".into(),
        crate::labels::sanitize_value(os),
    );
    labels.insert(
        "kubernetes.io/arch".into(),
        crate::labels::sanitize_value(arch),
    );
    labels.insert(
        "beta.kubernetes.io/arch".into(),
        crate::labels::sanitize_value(arch),
    );
    labels.insert("kubernetes.io/hostname".into(), device.name.clone());
    labels.insert("kubernetes.io/role".into(), "agent".into());
    labels.insert("type".into(), "virtual-kubelet".into());
    labels.insert(MANAGED_LABEL.into(), instance.into());
    labels
}

/// What became of the device labels that do not reach the Node unchanged, one line each, naming
/// the label: dropped (invalid key, a prefix Kubernetes reserves, or a clash after mapping),
/// mapped onto Kubernetes' label rules, or overridden by a label the hub owns. `labels` is the
/// result of [`node_labels`] for the device.
pub fn label_issues(device: &InventoryDevice, labels: &BTreeMap<String, String>) -> Vec<String> {
    use crate::labels::{sanitize_key, sanitize_value};
    let mut issues = Vec::new();
    let mut taken: BTreeMap<String, &str> = BTreeMap::new();
    for (raw_key, raw_value) in &device.labels {
        let Some(key) = sanitize_key(raw_key) else {
            issues.push(format!(
                "label {raw_key:?} dropped: not a valid Kubernetes label key, or under a prefix \
                 Kubernetes reserves (kubernetes.io, k8s.io)"
            ));
            continue;
        };
        if let Some(first) = taken.get(&key) {
            issues.push(format!(
                "label {raw_key:?} dropped: it maps to {key:?} like label {first:?}"
            ));
            continue;
        }
        taken.insert(key.clone(), raw_key);
        let value = sanitize_value(raw_value);
        if labels.get(&key) != Some(&value) {
            issues.push(format!(
                "label {raw_key:?} overridden: the hub owns {key:?} on fleetlet Nodes"
            ));
        } else if key != *raw_key || value != *raw_value {
            issues.push(format!(
                "label {raw_key:?}={raw_value:?} mapped to {key:?}={value:?} (Kubernetes label rules)"
            ));
        }
    }
    issues
}

/// The provider taint as the API shows it.
pub fn provider_taint() -> Value {
    json!({"key": PROVIDER_TAINT_KEY, "value": PROVIDER_TAINT_VALUE, "effect": "NoSchedule"})
}

/// A configured taint as the API shows it.
pub fn taint_value(t: &crate::config::NodeTaint) -> Value {
    let mut v = json!({"key": t.key, "effect": t.effect});
    if !t.value.is_empty() {
        v["value"] = json!(t.value);
    }
    v
}

/// The apply body for the Node object (metadata and spec).
///
/// `spec.taints` is an atomic list in Kubernetes: whoever applies it owns all of it. So the body
/// carries the taints others (the node lifecycle controller) put there, plus `ours` (the
/// configured ones), and the manager re-reads the Node before applying. A taint with one of our
/// keys, or the provider key (a configuration that dropped it), is ours to replace.
pub fn node_body(
    name: &str,
    labels: &BTreeMap<String, String>,
    other_taints: &[Value],
    ours: &[Value],
) -> Value {
    let our_key = |t: &Value| {
        let key = t.get("key").and_then(Value::as_str);
        key == Some(PROVIDER_TAINT_KEY)
            || ours
                .iter()
                .any(|o| o.get("key").and_then(Value::as_str) == key)
    };
    let mut taints: Vec<Value> = other_taints
        .iter()
        .filter(|t| !our_key(t))
        .cloned()
        .collect();
    taints.extend(ours.iter().cloned());
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "labels": labels },
        "spec": { "taints": taints },
    })
}

/// One node condition the hub writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionView {
    /// Condition type.
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
    /// RFC 3339 time of the last status change.
    pub last_transition: String,
}

/// Everything `nodes/status` carries.
#[derive(Debug, Clone)]
pub struct StatusInput<'a> {
    /// Node name.
    pub name: &'a str,
    /// capacity and allocatable.
    pub capacity: &'a BTreeMap<String, String>,
    /// allocatable.
    pub allocatable: &'a BTreeMap<String, String>,
    /// Node info from the device (absent before its first hello).
    pub info: Option<&'a NodeInfo>,
    /// kubeletVersion to show.
    pub kubelet_version: &'a str,
    /// Conditions, Ready first.
    pub conditions: &'a [ConditionView],
    /// Where the API server reaches the hub's kubelet endpoint.
    pub address: IpAddr,
    /// Its port.
    pub port: u16,
    /// RFC 3339 heartbeat time.
    pub heartbeat: &'a str,
}

/// The apply body for `nodes/status`.
pub fn status_body(s: &StatusInput<'_>) -> Value {
    let info = s.info.cloned().unwrap_or_default();
    let or = |v: &str, d: &str| {
        if v.is_empty() {
            d.to_string()
        } else {
            v.to_string()
        }
    };
    let conditions: Vec<Value> = s
        .conditions
        .iter()
        .map(|c| {
            json!({
                "type": c.type_,
                "status": c.status,
                "reason": c.reason,
                "message": c.message,
                "lastHeartbeatTime": s.heartbeat,
                "lastTransitionTime": c.last_transition,
            })
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": s.name },
        "status": {
            "capacity": s.capacity,
            "allocatable": s.allocatable,
            "nodeInfo": {
                "machineID": info.machine_id,
                "systemUUID": info.machine_id,
                "bootID": info.boot_id,
                "kernelVersion": info.kernel_version,
                "osImage": info.os_image,
                "containerRuntimeVersion": info.container_runtime_version,
                "kubeletVersion": s.kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": or(&info.operating_system, "linux"),
                "architecture": or(&info.architecture, "amd64"),
            },
            "conditions": conditions,
            "addresses": [ { "type": "InternalIP", "address": s.address.to_string() } ],
            "daemonEndpoints": { "kubeletEndpoint": { "Port": s.port } },
        }
    })
}

/// Capacity and allocatable from a device report, falling back to `defaults` for missing keys;
/// allocatable falls back to capacity.
pub fn resources(
    report: Option<&Capacity>,
    defaults: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut capacity = defaults.clone();
    let mut allocatable = defaults.clone();
    if let Some(r) = report {
        for (k, v) in &r.capacity {
            capacity.insert(k.clone(), v.clone());
            allocatable.insert(k.clone(), v.clone());
        }
        for (k, v) in &r.allocatable {
            allocatable.insert(k.clone(), v.clone());
        }
    }
    (capacity, allocatable)
}

/// The pressure conditions: as the device reported them, `False` otherwise.
pub fn pressure_conditions(report: Option<&Capacity>, since: &str) -> Vec<ConditionView> {
    ["MemoryPressure", "DiskPressure", "PIDPressure"]
        .iter()
        .map(|t| {
            let reported = report.and_then(|r| r.conditions.iter().find(|c| c.r#type == *t));
            match reported {
                Some(c) if matches!(c.status.as_str(), "True" | "False" | "Unknown") => {
                    ConditionView {
                        type_: (*t).to_string(),
                        status: c.status.clone(),
                        reason: if c.reason.is_empty() {
                            format!("Device{t}{}", c.status)
                        } else {
                            c.reason.clone()
                        },
                        message: c.message.clone(),
                        last_transition: since.to_string(),
                    }
                }
                _ => ConditionView {
                    type_: (*t).to_string(),
                    status: "False".into(),
                    reason: format!("DeviceHasNo{t}"),
                    message: format!("device reports no {t}"),
                    last_transition: since.to_string(),
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlet_proto::v1::NodeCondition;

    fn device() -> InventoryDevice {
        InventoryDevice {
            name: "dev-1".into(),
            labels: [
                ("site name".to_string(), "HQ".to_string()),
                ("type".to_string(), "spoof".to_string()),
            ]
            .into_iter()
            .collect(),
            fleet: Some("fleet-a".into()),
            enabled: true,
        }
    }

    fn nodes_cfg() -> crate::config::NodesConfig {
        crate::config::NodesConfig {
            instance: "hub-1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn zone_and_region_come_from_the_configured_device_labels() {
        let mut d = device();
        d.labels.insert("site".into(), "Plant 7".into());
        d.labels.insert("geo".into(), "eu-west".into());
        let plain = node_labels(&d, None, &nodes_cfg());
        assert!(!plain.contains_key(ZONE_LABEL) && !plain.contains_key(REGION_LABEL));
        let cfg = crate::config::NodesConfig {
            zone_label: "site".into(),
            region_label: "geo".into(),
            ..nodes_cfg()
        };
        let l = node_labels(&d, None, &cfg);
        assert_eq!(l.get(ZONE_LABEL).map(String::as_str), Some("Plant-7"));
        assert_eq!(l.get(REGION_LABEL).map(String::as_str), Some("eu-west"));
        // A device without the label gets no zone.
        d.labels.remove("site");
        assert!(!node_labels(&d, None, &cfg).contains_key(ZONE_LABEL));
    }

    #[test]
    fn labels_carry_fleet_os_arch_and_type_and_hub_labels_win() {
        let info = NodeInfo {
            operating_system: "linux".into(),
            architecture: "arm64".into(),
            ..Default::default()
        };
        let l = node_labels(&device(), Some(&info), &nodes_cfg());
        assert_eq!(l.get(MANAGED_LABEL).map(String::as_str), Some("hub-1"));
        assert_eq!(l.get(FLEET_LABEL).map(String::as_str), Some("fleet-a"));
        assert_eq!(
            l.get("kubernetes.io/arch").map(String::as_str),
            Some("arm64")
        );
        assert_eq!(l.get("kubernetes.io/os").map(String::as_str), Some("linux"));
        assert_eq!(
            l.get("kubernetes.io/hostname").map(String::as_str),
            Some("dev-1")
        );
        assert_eq!(l.get("type").map(String::as_str), Some("virtual-kubelet"));
        assert_eq!(l.get("site-name").map(String::as_str), Some("HQ"));
    }

    #[test]
    fn label_issues_name_every_label_that_does_not_pass_unchanged() {
        let mut d = device();
        d.labels
            .insert("kubernetes.io/hostname".into(), "evil".into());
        d.labels.insert("site_name".into(), "ok".into());
        d.labels.insert("zone".into(), "a b".into());
        d.labels.insert("site-name".into(), "clash".into());
        let labels = node_labels(&d, None, &nodes_cfg());
        let issues = label_issues(&d, &labels);
        let joined = issues.join("\n");
        assert!(
            joined.contains("\"kubernetes.io/hostname\" dropped"),
            "{joined}"
        );
        assert!(joined.contains("\"type\" overridden"), "{joined}");
        assert!(
            joined.contains("\"site name\"=\"HQ\" mapped to \"site-name\"=\"HQ\""),
            "{joined}"
        );
        assert!(
            joined.contains("\"site-name\" dropped: it maps to"),
            "{joined}"
        );
        assert!(
            joined.contains("\"zone\"=\"a b\" mapped to \"zone\"=\"a-b\""),
            "{joined}"
        );
        assert!(
            !joined.contains("site_name"),
            "valid labels pass silently: {joined}"
        );
        assert_eq!(issues.len(), 5, "{joined}");
    }

    #[test]
    fn node_body_keeps_foreign_taints_and_adds_ours_once() {
        let foreign = json!({"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"});
        let body = node_body(
            "dev-1",
            &BTreeMap::new(),
            &[foreign.clone(), provider_taint()],
            &[provider_taint()],
        );
        let taints = body["spec"]["taints"].as_array().expect("taints");
        assert_eq!(taints.len(), 2);
        assert_eq!(taints[0], foreign);
        assert_eq!(taints[1], provider_taint());
    }

    #[test]
    fn configured_taints_replace_the_provider_taint_or_remove_it() {
        let foreign = json!({"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"});
        let existing = [foreign.clone(), provider_taint()];
        let none = node_body("dev-1", &BTreeMap::new(), &existing, &[]);
        assert_eq!(none["spec"]["taints"], json!([foreign.clone()]));
        let site = taint_value(&crate::config::NodeTaint {
            key: "example.com/site".into(),
            value: String::new(),
            effect: "PreferNoSchedule".into(),
        });
        let custom = node_body(
            "dev-1",
            &BTreeMap::new(),
            &existing,
            std::slice::from_ref(&site),
        );
        assert_eq!(
            custom["spec"]["taints"],
            json!([foreign, {"key": "example.com/site", "effect": "PreferNoSchedule"}])
        );
    }

    #[test]
    fn resources_fall_back_to_defaults_then_capacity() {
        let defaults: BTreeMap<String, String> = [
            ("cpu".to_string(), "1".to_string()),
            ("pods".to_string(), "110".to_string()),
        ]
        .into_iter()
        .collect();
        let (c, a) = resources(None, &defaults);
        assert_eq!(c, defaults);
        assert_eq!(a, defaults);
        let report = Capacity {
            capacity: [("cpu".to_string(), "4".to_string())].into_iter().collect(),
            allocatable: [("cpu".to_string(), "3500m".to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let (c, a) = resources(Some(&report), &defaults);
        assert_eq!(c.get("cpu").map(String::as_str), Some("4"));
        assert_eq!(a.get("cpu").map(String::as_str), Some("3500m"));
        assert_eq!(a.get("pods").map(String::as_str), Some("110"));
    }

    #[test]
    fn pressure_conditions_default_to_false_and_follow_reports() {
        let report = Capacity {
            conditions: vec![NodeCondition {
                r#type: "DiskPressure".into(),
                status: "True".into(),
                reason: "".into(),
                message: "disk 95% full".into(),
            }],
            ..Default::default()
        };
        let c = pressure_conditions(Some(&report), "2026-01-01T00:00:00Z");
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].status, "False");
        assert_eq!(c[1].status, "True");
        assert_eq!(c[1].message, "disk 95% full");
    }

    #[test]
    fn status_body_points_at_the_hub() {
        let caps = BTreeMap::new();
        let conds = vec![ConditionView {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "DeviceConnected".into(),
            message: "m".into(),
            last_transition: "t".into(),
        }];
        let body = status_body(&StatusInput {
            name: "dev-1",
            capacity: &caps,
            allocatable: &caps,
            info: None,
            kubelet_version: "v1",
            conditions: &conds,
            address: "127.0.0.1".parse().expect("ip"),
            port: 10250,
            heartbeat: "h",
        });
        assert_eq!(
            body["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"],
            10250
        );
        assert_eq!(body["status"]["addresses"][0]["address"], "127.0.0.1");
        assert_eq!(body["status"]["conditions"][0]["lastHeartbeatTime"], "h");
        assert_eq!(body["status"]["nodeInfo"]["operatingSystem"], "linux");
    }
}
