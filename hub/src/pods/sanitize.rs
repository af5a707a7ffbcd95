//! What a device may write into its pods' status: only the PodStatus fields an agent produces,
//! with values Kubernetes knows, for containers the pod has. A compromised device must not use
//! its pods' status to steer the cluster (a `podIP` that Services then send traffic to, a
//! `nominatedNodeName`, conditions other controllers act on).

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Map, Value};

/// Top-level PodStatus fields an agent writes; everything else a device sends is dropped.
const AGENT_FIELDS: &[&str] = &[
    "phase",
    "conditions",
    "message",
    "reason",
    "hostIP",
    "hostIPs",
    "podIP",
    "podIPs",
    "startTime",
    "initContainerStatuses",
    "containerStatuses",
    "ephemeralContainerStatuses",
    "qosClass",
    "observedGeneration",
];

/// Pod condition types a kubelet owns.
const KUBELET_CONDITIONS: &[&str] = &[
    "PodScheduled",
    "Initialized",
    "ContainersReady",
    "Ready",
    "PodReadyToStartContainers",
    "PodResizePending",
    "PodResizeInProgress",
];

/// An address range (`10.88.0.0/16`, `fd00::/8`, or one address) a device may report for its
/// pods and itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    net: IpAddr,
    prefix: u8,
}

impl IpRange {
    /// Parses `addr/prefix` or a single address; the error names what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .trim()
            .parse()
            .map_err(|e| format!("{s:?}: not an IP address: {e}"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Self { net, prefix })
    }

    /// Whether `ip` is in the range (never across address families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u8) {
            match ip {
                IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
                IpAddr::V6(v6) => (u128::from(v6), 128),
            }
        };
        let ((net, width), (addr, other)) = (bits(self.net), bits(ip));
        if width != other {
            return false;
        }
        let shift = u32::from(width - self.prefix);
        shift >= 128 || (net >> shift) == (addr >> shift)
    }
}

/// What a device announced about its addresses (in its hello and capacity reports): what its
/// pods may report as `hostIP`, and the bridge network their `podIP`s come from. Empty parts
/// are not checked (an agent that announces nothing, or cannot read its pod network).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Announced {
    /// The device's own addresses.
    pub addresses: Vec<IpAddr>,
    /// Its pods' bridge network(s).
    pub pod_networks: Vec<IpRange>,
}

impl Announced {
    /// What `info` announces; entries that do not parse are left out.
    pub fn of(info: &fleetlet_proto::v1::NodeInfo) -> Self {
        Self {
            addresses: info
                .addresses
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            pod_networks: info
                .pod_networks
                .iter()
                .filter_map(|n| IpRange::parse(n).ok())
                .collect(),
        }
    }
}

/// The addresses of a single field and its list form.
fn addresses_of(out: &Map<String, Value>, single: &str, list: &str) -> Vec<String> {
    let mut addrs: Vec<String> = out
        .get(list)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| listed_ip(e).map(str::to_owned))
        .collect();
    addrs.extend(out.get(single).and_then(Value::as_str).map(str::to_owned));
    addrs
}

/// What the hub knows of the pod a status is for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// Names of its init containers.
    pub init_containers: BTreeSet<String>,
    /// Names of its app containers.
    pub containers: BTreeSet<String>,
    /// Names of its ephemeral containers (`kubectl debug`).
    pub ephemeral_containers: BTreeSet<String>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// `metadata.generation`: the newest a device can have observed.
    pub generation: i64,
}

impl PodFacts {
    /// The facts of `pod`.
    pub fn of(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        Self {
            init_containers: spec
                .and_then(|s| s.init_containers.as_ref())
                .into_iter()
                .flatten()
                .map(|c| c.name.clone())
                .collect(),
            containers: spec
                .into_iter()
                .flat_map(|s| s.containers.iter())
                .map(|c| c.name.clone())
                .collect(),
            ephemeral_containers: spec
                .and_then(|s| s.ephemeral_containers.as_ref())
                .into_iter()
                .flatten()
                .map(|c| c.name.clone())
                .collect(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            generation: pod.metadata.generation.unwrap_or(0),
        }
    }
}

/// A status the hub refuses as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `phase` is not one Kubernetes knows.
    #[error("phase {0:?} is not a pod phase")]
    Phase(String),
    /// An IP field is not an address a pod can have.
    #[error("{field} {value:?} is not an address a pod can have")]
    Address {
        /// The field.
        field: &'static str,
        /// What the device sent.
        value: String,
    },
    /// An address outside the ranges devices may report (`[pods] device_ip_ranges`).
    #[error(
        "{field} {value:?} is outside the address ranges devices may report ([pods] device_ip_ranges)"
    )]
    OutsideAllowed {
        /// The field.
        field: &'static str,
        /// What the device sent.
        value: String,
    },
    /// An address the device did not announce as its own or as its pod network's.
    #[error(
        "{field} {value:?} is neither an address the device announced nor in the pod network it announced"
    )]
    NotAnnounced {
        /// The field.
        field: &'static str,
        /// What the device sent.
        value: String,
    },
    /// A host-network pod's podIP differs from its hostIP.
    #[error("podIP {pod_ip} of a hostNetwork pod differs from its hostIP {host_ip}")]
    HostNetworkIp {
        /// podIP.
        pod_ip: String,
        /// hostIP.
        host_ip: String,
    },
}

/// A usable unicast address (not unspecified, multicast or broadcast).
fn unicast(value: &str) -> Option<IpAddr> {
    let ip: IpAddr = value.parse().ok()?;
    let usable = !ip.is_unspecified()
        && !ip.is_multicast()
        && !matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    usable.then_some(ip)
}

/// The address of a `{"ip": ...}` list entry.
fn listed_ip(entry: &Value) -> Option<&str> {
    entry.get("ip").and_then(Value::as_str)
}

/// Checks a single IP field and its list form; the list's first entry must be the single one.
fn check_ips(
    out: &Map<String, Value>,
    single: &'static str,
    list: &'static str,
) -> Result<Option<IpAddr>, Refused> {
    let bad = |field: &'static str, value: &str| Refused::Address {
        field,
        value: value.to_string(),
    };
    let one = match out.get(single).and_then(Value::as_str) {
        Some(v) => Some(unicast(v).ok_or_else(|| bad(single, v))?),
        None => None,
    };
    if let Some(entries) = out.get(list).and_then(Value::as_array) {
        for (i, e) in entries.iter().enumerate() {
            let v = listed_ip(e).unwrap_or_default();
            let ip = unicast(v).ok_or_else(|| bad(list, v))?;
            if i == 0 && one.is_some_and(|o| o != ip) {
                return Err(bad(list, v));
            }
        }
    }
    Ok(one)
}

/// Keeps what an agent may say about a pod with `facts`; refuses a status whose phase or
/// addresses cannot be true, or whose addresses lie outside `allowed` (when not empty: the
/// address ranges the operator says devices and their pod networks use, so a device cannot point
/// its pods' Service endpoints at any other address). Dropped parts are returned as notes.
pub fn sanitize(
    status: Value,
    facts: &PodFacts,
    allowed: &[IpRange],
    announced: &Announced,
) -> Result<(Value, Vec<String>), Refused> {
    let Value::Object(map) = status else {
        return Ok((Value::Object(Map::new()), vec!["not an object".into()]));
    };
    let mut notes = Vec::new();
    let mut out = Map::new();
    for (k, v) in map {
        if AGENT_FIELDS.contains(&k.as_str()) {
            out.insert(k, v);
        } else {
            notes.push(format!("field {k} dropped"));
        }
    }
    if let Some(phase) = out.get("phase")
        && !matches!(
            phase.as_str(),
            Some("Pending" | "Running" | "Succeeded" | "Failed" | "Unknown")
        )
    {
        return Err(Refused::Phase(
            phase
                .as_str()
                .map_or_else(|| phase.to_string(), str::to_owned),
        ));
    }
    // An observedGeneration is the pod generation the device ran: never one the API has not
    // given it (that would tell a rollout a spec is in effect that never reached the device).
    let observable = |v: &Value| v.as_i64().is_some_and(|g| g >= 0 && g <= facts.generation);
    if out
        .get("observedGeneration")
        .is_some_and(|g| !observable(g))
    {
        notes.push(format!(
            "observedGeneration {} dropped: the pod's generation is {}",
            out["observedGeneration"], facts.generation
        ));
        out.remove("observedGeneration");
    }
    if let Some(Value::Array(conditions)) = out.get_mut("conditions") {
        for c in conditions.iter_mut() {
            if let Some(obj) = c.as_object_mut()
                && obj
                    .get("observedGeneration")
                    .is_some_and(|g| !observable(g))
            {
                notes.push(format!(
                    "condition observedGeneration {} dropped",
                    obj["observedGeneration"]
                ));
                obj.remove("observedGeneration");
            }
        }
        conditions.retain(|c| {
            let known = c
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| KUBELET_CONDITIONS.contains(&t))
                && c.get("status")
                    .and_then(Value::as_str)
                    .is_some_and(|s| matches!(s, "True" | "False" | "Unknown"));
            if !known {
                notes.push(format!("condition {c} dropped"));
            }
            known
        });
    }
    for (field, names) in [
        ("initContainerStatuses", &facts.init_containers),
        ("containerStatuses", &facts.containers),
        ("ephemeralContainerStatuses", &facts.ephemeral_containers),
    ] {
        if let Some(Value::Array(statuses)) = out.get_mut(field) {
            statuses.retain(|s| {
                let ok = s
                    .get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| names.contains(n));
                if !ok {
                    notes.push(format!("{field} entry for an unknown container dropped"));
                }
                ok
            });
        }
    }
    let host_ip = check_ips(&out, "hostIP", "hostIPs")?;
    let pod_ip = check_ips(&out, "podIP", "podIPs")?;
    // What the device itself may claim: its own addresses, and its pod network for pods with
    // their own network namespace.
    let pod_may_use = |ip: IpAddr| {
        if facts.host_network {
            announced.addresses.is_empty() || announced.addresses.contains(&ip)
        } else {
            announced.pod_networks.is_empty()
                || announced.pod_networks.iter().any(|r| r.contains(ip))
        }
    };
    for (single, list) in [("hostIP", "hostIPs"), ("podIP", "podIPs")] {
        for a in addresses_of(&out, single, list) {
            let Some(ip) = unicast(&a) else { continue };
            let claimable = if single == "hostIP" {
                announced.addresses.is_empty() || announced.addresses.contains(&ip)
            } else {
                pod_may_use(ip)
            };
            if !claimable {
                return Err(Refused::NotAnnounced {
                    field: single,
                    value: a,
                });
            }
        }
    }
    if !allowed.is_empty() {
        for (list, field) in [("hostIPs", "hostIP"), ("podIPs", "podIP")] {
            for a in addresses_of(&out, field, list) {
                let inside = unicast(&a).is_some_and(|ip| allowed.iter().any(|r| r.contains(ip)));
                if !inside {
                    return Err(Refused::OutsideAllowed { field, value: a });
                }
            }
        }
    }
    if facts.host_network
        && let (Some(p), Some(h)) = (pod_ip, host_ip)
        && p != h
    {
        return Err(Refused::HostNetworkIp {
            pod_ip: p.to_string(),
            host_ip: h.to_string(),
        });
    }
    Ok((Value::Object(out), notes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn facts(host_network: bool) -> PodFacts {
        PodFacts {
            init_containers: ["init".to_string()].into_iter().collect(),
            containers: ["app".to_string()].into_iter().collect(),
            ephemeral_containers: ["debugger".to_string()].into_iter().collect(),
            host_network,
            generation: 3,
        }
    }

    #[test]
    fn an_observed_generation_beyond_the_pods_is_dropped() {
        let status = |g: i64| {
            json!({"phase": "Running", "observedGeneration": g,
                   "conditions": [{"type": "Ready", "status": "True", "observedGeneration": g}]})
        };
        let (s, notes) =
            sanitize(status(3), &facts(false), &[], &Announced::default()).expect("valid");
        assert_eq!(s["observedGeneration"], 3);
        assert_eq!(s["conditions"][0]["observedGeneration"], 3);
        assert!(notes.is_empty(), "{notes:?}");
        let (s, notes) =
            sanitize(status(4), &facts(false), &[], &Announced::default()).expect("valid");
        assert!(s.get("observedGeneration").is_none());
        assert!(s["conditions"][0].get("observedGeneration").is_none());
        assert_eq!(s["conditions"][0]["status"], "True");
        assert_eq!(notes.len(), 2, "{notes:?}");
    }

    #[test]
    fn only_agent_fields_and_known_containers_and_conditions_pass() {
        let (s, notes) = sanitize(
            json!({
                "phase": "Running",
                "nominatedNodeName": "elsewhere",
                "conditions": [
                    {"type": "Ready", "status": "True"},
                    {"type": "DisruptionTarget", "status": "True"},
                    {"type": "Ready", "status": "Maybe"}
                ],
                "containerStatuses": [{"name": "app"}, {"name": "ghost"}],
                "initContainerStatuses": [{"name": "init"}],
                "ephemeralContainerStatuses": [{"name": "debugger"}, {"name": "app"}],
                "podIP": "10.88.0.5", "podIPs": [{"ip": "10.88.0.5"}]
            }),
            &facts(false),
            &[],
            &Announced::default(),
        )
        .expect("valid");
        assert!(s.get("nominatedNodeName").is_none());
        assert_eq!(
            s["conditions"],
            json!([{"type": "Ready", "status": "True"}])
        );
        assert_eq!(s["containerStatuses"], json!([{"name": "app"}]));
        assert_eq!(s["initContainerStatuses"], json!([{"name": "init"}]));
        // Only the pod's own ephemeral containers: "app" is an app container, not one of them.
        assert_eq!(
            s["ephemeralContainerStatuses"],
            json!([{"name": "debugger"}])
        );
        assert_eq!(notes.len(), 5, "{notes:?}");
    }

    #[test]
    fn impossible_phases_and_addresses_are_refused() {
        assert_eq!(
            sanitize(
                json!({"phase": "Hijacked"}),
                &facts(false),
                &[],
                &Announced::default()
            ),
            Err(Refused::Phase("Hijacked".into()))
        );
        assert_eq!(
            sanitize(
                json!({"phase": 7}),
                &facts(false),
                &[],
                &Announced::default()
            ),
            Err(Refused::Phase("7".into()))
        );
        for ip in ["0.0.0.0", "255.255.255.255", "224.0.0.1", "not-an-ip", "::"] {
            assert!(
                sanitize(
                    json!({"podIP": ip}),
                    &facts(false),
                    &[],
                    &Announced::default()
                )
                .is_err(),
                "{ip}"
            );
        }
        assert!(
            sanitize(
                json!({"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.2"}]}),
                &facts(false),
                &[],
                &Announced::default()
            )
            .is_err(),
            "the list must start with the single address"
        );
        assert!(matches!(
            sanitize(
                json!({"hostIP": "192.0.2.1", "podIP": "198.51.100.7"}),
                &facts(true),
                &[],
                &Announced::default()
            ),
            Err(Refused::HostNetworkIp { .. })
        ));
        assert!(
            sanitize(
                json!({"hostIP": "192.0.2.1", "podIP": "192.0.2.1"}),
                &facts(true),
                &[],
                &Announced::default()
            )
            .is_ok()
        );
    }

    #[test]
    fn addresses_outside_the_allowed_ranges_are_refused() {
        let allowed = [
            IpRange::parse("192.0.2.0/24").expect("range"),
            IpRange::parse("10.88.0.0/16").expect("range"),
        ];
        let ok =
            json!({"hostIP": "192.0.2.7", "podIP": "10.88.3.4", "podIPs": [{"ip": "10.88.3.4"}]});
        assert!(sanitize(ok, &facts(false), &allowed, &Announced::default()).is_ok());
        let steered = json!({"hostIP": "192.0.2.7", "podIP": "10.96.0.1"});
        assert!(matches!(
            sanitize(steered, &facts(false), &allowed, &Announced::default()),
            Err(Refused::OutsideAllowed { field: "podIP", .. })
        ));
        assert!(IpRange::parse("10.0.0.0/33").is_err());
        assert!(
            IpRange::parse("fd00::/8")
                .expect("v6")
                .contains("fd12::1".parse().expect("ip"))
        );
        assert!(
            !IpRange::parse("fd00::/8")
                .expect("v6")
                .contains("10.0.0.1".parse().expect("ip"))
        );
        assert!(
            IpRange::parse("0.0.0.0/0")
                .expect("all")
                .contains("1.2.3.4".parse().expect("ip"))
        );
    }

    #[test]
    fn a_device_may_claim_only_what_it_announced() {
        let announced = Announced::of(&fleetlet_proto::v1::NodeInfo {
            addresses: vec!["192.0.2.7".into()],
            pod_networks: vec!["10.88.0.0/16".into()],
            ..Default::default()
        });
        let bridge = |pod_ip: &str| json!({"hostIP": "192.0.2.7", "podIP": pod_ip});
        assert!(sanitize(bridge("10.88.0.9"), &facts(false), &[], &announced).is_ok());
        assert!(matches!(
            sanitize(bridge("10.96.0.10"), &facts(false), &[], &announced),
            Err(Refused::NotAnnounced { field: "podIP", .. })
        ));
        assert!(matches!(
            sanitize(
                json!({"hostIP": "192.0.2.99"}),
                &facts(false),
                &[],
                &announced
            ),
            Err(Refused::NotAnnounced {
                field: "hostIP",
                ..
            })
        ));
        // A host-network pod's podIP is the device's own address, not its pod network's.
        let host = json!({"hostIP": "192.0.2.7", "podIP": "192.0.2.7"});
        assert!(sanitize(host, &facts(true), &[], &announced).is_ok());
    }
}
