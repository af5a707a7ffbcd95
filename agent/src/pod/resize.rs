//! In-place pod resize, the kubelet's way (KEP-1287, GA in Kubernetes 1.35).
//!
//! A change of a running pod's container `resources` (made through the `pods/resize`
//! subresource) goes through three steps, as in the kubelet:
//!
//! 1. **Allocation** (the reconciler, which sees every pod of the device): the new requests are
//!    admitted next to the other pods' allocated requests, or the resize stays pending
//!    (`PodResizePending`, reason `Deferred` when other pods hold the room, `Infeasible` when the
//!    device can never hold it). See [`admit_resize`].
//! 2. **Actuation** (the pod's worker): each running container whose cgroup values differ from
//!    its allocation is updated in place (`podman update`), or restarted when its `resizePolicy`
//!    says `RestartContainer` for a resource that changed. See [`step`].
//! 3. **Status**: every container reports `resources` (what its cgroup holds) and
//!    `allocatedResources` (its allocated requests); `PodResizeInProgress` is set while an
//!    allocated resize is not yet actuated and cleared once it is.
//!
//! The cgroup values are the kubelet's: `cpu.shares` from the CPU request (at least 2),
//! a CFS quota per 100 ms period from the CPU limit (at least 1 ms), and the memory limit.

use std::collections::BTreeMap;

use fleetlet_resources::admission::{Allocatable, Requests, admit_to};
use serde::{Deserialize, Serialize};

use super::spec::{parse_bytes, parse_cpu};
use crate::podman::{CpuLimit, MemoryLimit, ResourceLimits};

/// The kubelet's CFS period (100 ms, in microseconds).
pub const QUOTA_PERIOD: u64 = 100_000;
/// The smallest CFS quota the kubelet sets (1 ms).
const MIN_QUOTA: i64 = 1_000;
/// The smallest and largest cgroup v1 `cpu.shares`.
const MIN_SHARES: u64 = 2;
const MAX_SHARES: u64 = 262_144;

/// A container's requests and limits as its spec states them (quantity strings by resource
/// name, requests defaulted from limits as the API server defaults them): what the status'
/// `resources` and `allocatedResources` report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerResources {
    /// requests.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    /// limits.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// The values of [`ContainerResources`] that matter to the cgroup and to the kubelet's resize
/// decision: millicores and bytes, 0 when unset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts {
    /// requests.cpu, millicores.
    pub cpu_request: u64,
    /// limits.cpu, millicores (0: none).
    pub cpu_limit: u64,
    /// requests.memory, bytes.
    pub memory_request: u64,
    /// limits.memory, bytes (0: none).
    pub memory_limit: u64,
}

impl ContainerResources {
    /// From a container's `resources` (requests default to the limits, as the API does).
    pub fn from_spec(r: Option<&k8s_openapi::api::core::v1::ResourceRequirements>) -> Self {
        let Some(r) = r else {
            return Self::default();
        };
        let map = |m: &Option<
            BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
        >| {
            m.iter()
                .flatten()
                .map(|(k, q)| (k.clone(), q.0.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        let limits = map(&r.limits);
        let mut requests = map(&r.requests);
        for (k, v) in &limits {
            requests.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Self { requests, limits }
    }

    /// The CPU and memory amounts (unparsable quantities count as unset; the plan has already
    /// refused them).
    pub fn amounts(&self) -> Amounts {
        let cpu = |m: &BTreeMap<String, String>| m.get("cpu").and_then(|q| parse_cpu(q));
        let mem = |m: &BTreeMap<String, String>| m.get("memory").and_then(|q| parse_bytes(q));
        Amounts {
            cpu_request: cpu(&self.requests).unwrap_or(0),
            cpu_limit: cpu(&self.limits).unwrap_or(0),
            memory_request: mem(&self.requests).unwrap_or(0),
            memory_limit: mem(&self.limits).unwrap_or(0),
        }
    }

    /// Requests as the status' `allocatedResources` (`None` when there are none).
    pub fn requests_json(&self) -> Option<BTreeMap<String, String>> {
        (!self.requests.is_empty()).then(|| self.requests.clone())
    }
}

impl Amounts {
    /// The cgroup settings for these amounts, the kubelet's conversion. `for_update`: an unset
    /// limit is written as unlimited (-1), so an update also removes a limit; at creation it is
    /// left out.
    pub fn linux(&self, for_update: bool) -> ResourceLimits {
        let shares = (self.cpu_request.saturating_mul(1024) / 1000).clamp(MIN_SHARES, MAX_SHARES);
        let quota = if self.cpu_limit > 0 {
            let q = i64::try_from(self.cpu_limit.saturating_mul(QUOTA_PERIOD) / 1000)
                .unwrap_or(i64::MAX);
            Some(q.max(MIN_QUOTA))
        } else {
            for_update.then_some(-1)
        };
        let memory = if self.memory_limit > 0 {
            Some(MemoryLimit {
                limit: i64::try_from(self.memory_limit).unwrap_or(i64::MAX),
            })
        } else {
            for_update.then_some(MemoryLimit { limit: -1 })
        };
        ResourceLimits {
            memory,
            cpu: Some(CpuLimit {
                shares: Some(shares),
                period: quota.map(|_| QUOTA_PERIOD),
                quota,
            }),
        }
    }
}

/// The kubelet's OOM score adjustment of a container (`GetContainerOOMScoreAdjust`):
/// Guaranteed pods -997, BestEffort 1000, Burstable by the share of the device's memory the
/// container requests (a sidecar no more killable than the smallest app container), within
/// 3..=999. `memory_request` is the container's allocated request.
pub fn oom_score_adj(
    plan: &super::spec::PodPlan,
    c: &super::spec::ContainerPlan,
    memory_request: u64,
    memory_capacity: u64,
) -> i32 {
    match super::status::qos(plan) {
        "Guaranteed" => return -997,
        "BestEffort" => return 1000,
        _ => {}
    }
    let capacity = i128::from(memory_capacity.max(1));
    let score = |request: u64| 1000 - (1000 * i128::from(request)) / capacity;
    let mut adj = score(memory_request);
    if c.sidecar {
        let smallest = plan
            .containers
            .iter()
            .map(|a| a.resources.amounts().memory_request)
            .min()
            .unwrap_or(0);
        adj = adj.min(score(smallest));
    }
    if adj < 3 {
        3
    } else if adj == 1000 {
        999
    } else {
        adj as i32
    }
}

/// The lowest OOM score adjustment a container can be given here: any, with CAP_SYS_RESOURCE
/// (the kubelet's -997 for Guaranteed pods needs it); otherwise the kernel refuses to go below
/// the creating process's own value, and the runtime would fail to start the container, so the
/// agent goes no lower than its own (the runtime runs with the same privileges on a device).
pub fn oom_score_floor() -> i32 {
    const CAP_SYS_RESOURCE: u32 = 24;
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    if caps & (1 << CAP_SYS_RESOURCE) != 0 {
        return -1000;
    }
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// `resizePolicy`: which resources restart the container when they change (the default,
/// `NotRequired`, resizes in place).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestartOnResize {
    /// cpu: RestartContainer.
    pub cpu: bool,
    /// memory: RestartContainer.
    pub memory: bool,
}

/// What a running container needs so that its cgroup holds its allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing: its cgroup already holds the allocation.
    None,
    /// Only the recorded values change (a memory request, or an equivalent spelling): no cgroup
    /// write.
    Record,
    /// Update the cgroup in place.
    Update,
    /// Restart the container (its resizePolicy says so for a resource that changed).
    Restart,
}

/// The kubelet's `computePodResizeAction` for one running container: compares what its cgroup
/// holds (`actuated`) with its allocation (`desired`) per resource, and restarts it when any
/// changed resource's policy is RestartContainer.
pub fn step(actuated: &Amounts, desired: &Amounts, policy: RestartOnResize) -> Step {
    if actuated == desired {
        return Step::None;
    }
    let cpu_changed =
        actuated.cpu_request != desired.cpu_request || actuated.cpu_limit != desired.cpu_limit;
    let memory_changed = actuated.memory_request != desired.memory_request
        || actuated.memory_limit != desired.memory_limit;
    if (cpu_changed && policy.cpu) || (memory_changed && policy.memory) {
        return Step::Restart;
    }
    if actuated.linux(true) == desired.linux(true) {
        Step::Record
    } else {
        Step::Update
    }
}

/// The kubelet's check before lowering a memory limit (`validateMemoryResizeAction`): a limit
/// that is added or lowered must stay above what the container uses now. `usage` is the
/// container's memory usage in bytes (`None`: unknown). The error is the kubelet's wording for
/// one container.
pub fn memory_decrease_error(
    container: &str,
    actuated: &Amounts,
    desired: &Amounts,
    usage: Option<u64>,
) -> Option<String> {
    let lowering = desired.memory_limit != 0
        && (actuated.memory_limit == 0 || desired.memory_limit < actuated.memory_limit);
    if !lowering {
        return None;
    }
    match usage {
        None => Some(format!("missing container {container:?} memory usage")),
        Some(used) if used >= desired.memory_limit => Some(format!(
            "attempting to set container {container:?} memory limit ({}) below current usage ({used})",
            desired.memory_limit
        )),
        Some(_) => None,
    }
}

/// The message of a resize that failed on memory: the kubelet's `cannot decrease memory
/// limits: ...` over the aggregate of the containers' errors.
pub fn memory_decrease_message(errors: &[String]) -> String {
    let agg = match errors {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    format!("cannot decrease memory limits: {agg}")
}

/// A pod's allocation: the resources its containers are meant to have (the spec's, once a
/// resize of them was admitted), and the pod generation they were allocated at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodAllocation {
    /// Allocated resources by container name (init and app containers).
    pub containers: BTreeMap<String, ContainerResources>,
    /// The pod's effective requests under this allocation (admission's rule).
    pub requests: Requests,
    /// metadata.generation the allocation was made at.
    pub generation: i64,
}

/// A resize that could not be allocated: the `PodResizePending` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// `Deferred` or `Infeasible`.
    pub reason: String,
    /// Why, in the kubelet's words.
    pub message: String,
    /// metadata.generation of the pending spec.
    pub generation: i64,
}

/// What the worker gets besides the plan: its allocation and any pending resize.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResizeDesire {
    /// Allocated resources.
    pub allocation: PodAllocation,
    /// A resize waiting for room.
    pub pending: Option<Pending>,
}

/// The kubelet's admission of a resize (`handlePodResourcesResize` with its resource-fit
/// predicate): the pod's new requests must fit next to the other pods' allocated requests.
/// When they cannot even fit the device alone the resize is `Infeasible` (the API server
/// normally refuses such a resize before it reaches a node; a device that runs pods from a
/// local file gets the kubelet's older words); when they only lack room now it is `Deferred`,
/// with the predicate's message.
pub fn admit_resize(
    allocatable: &Allocatable,
    others: &[Requests],
    wanted: Requests,
) -> Result<(), (String, String)> {
    for (name, want, cap) in [
        ("cpu", wanted.cpu_milli, allocatable.cpu_milli),
        ("memory", wanted.memory, allocatable.memory),
    ] {
        if let Some(cap) = cap
            && want > cap
        {
            return Err((
                "Infeasible".into(),
                format!(
                    "Node didn't have enough capacity: {name}, requested: {want}, capacity: {cap}"
                ),
            ));
        }
    }
    // The pod itself is not among `others`: it keeps its place in the pod count.
    let alloc = Allocatable {
        pods: None,
        ..*allocatable
    };
    admit_to(&alloc, others, wanted).map_err(|r| {
        let message = r
            .message
            .strip_prefix("Pod was rejected: ")
            .unwrap_or(&r.message)
            .to_owned();
        ("Deferred".into(), message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(req: &[(&str, &str)], lim: &[(&str, &str)]) -> ContainerResources {
        let m = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(k, q)| (k.to_string(), q.to_string()))
                .collect()
        };
        ContainerResources {
            requests: m(req),
            limits: m(lim),
        }
    }

    #[test]
    fn requests_default_to_limits_as_the_api_defaults_them() {
        let spec: k8s_openapi::api::core::v1::ResourceRequirements =
            serde_json::from_value(serde_json::json!({
                "limits": {"cpu": "30m", "memory": "45Mi"},
                "requests": {"cpu": "20m"}
            }))
            .unwrap();
        let r = ContainerResources::from_spec(Some(&spec));
        assert_eq!(
            r,
            res(
                &[("cpu", "20m"), ("memory", "45Mi")],
                &[("cpu", "30m"), ("memory", "45Mi")]
            )
        );
        assert_eq!(
            ContainerResources::from_spec(None),
            ContainerResources::default()
        );
        assert_eq!(ContainerResources::default().requests_json(), None);
    }

    #[test]
    fn cgroup_values_are_the_kubelets() {
        // 25m request, 35m limit, 50Mi limit: shares 25, quota 3500/100000.
        let a = res(
            &[("cpu", "25m"), ("memory", "40Mi")],
            &[("cpu", "35m"), ("memory", "50Mi")],
        )
        .amounts();
        let l = a.linux(false);
        assert_eq!(l.memory, Some(MemoryLimit { limit: 50 << 20 }));
        assert_eq!(
            l.cpu,
            Some(CpuLimit {
                shares: Some(25),
                quota: Some(3500),
                period: Some(QUOTA_PERIOD)
            })
        );
        // No CPU request: the minimum shares; no limits: none at creation, unlimited on update.
        let none = res(&[("memory", "35Mi")], &[]).amounts();
        let c = none.linux(false);
        assert_eq!(c.memory, None);
        assert_eq!(
            c.cpu,
            Some(CpuLimit {
                shares: Some(2),
                quota: None,
                period: None
            })
        );
        let u = none.linux(true);
        assert_eq!(u.memory, Some(MemoryLimit { limit: -1 }));
        assert_eq!(u.cpu.as_ref().and_then(|c| c.quota), Some(-1));
        // A 5m limit is below the smallest quota: 1 ms, as the kubelet's MilliCPUToQuota.
        let tiny = res(&[("cpu", "1m")], &[("cpu", "5m")])
            .amounts()
            .linux(false);
        assert_eq!(tiny.cpu.as_ref().and_then(|c| c.quota), Some(1000));
        assert_eq!(tiny.cpu.as_ref().and_then(|c| c.shares), Some(2));
    }

    #[test]
    fn a_resize_updates_in_place_unless_the_policy_restarts() {
        let before = res(
            &[("cpu", "20m"), ("memory", "35Mi")],
            &[("cpu", "20m"), ("memory", "35Mi")],
        )
        .amounts();
        let cpu_up = res(
            &[("cpu", "25m"), ("memory", "35Mi")],
            &[("cpu", "25m"), ("memory", "35Mi")],
        )
        .amounts();
        let none = RestartOnResize::default();
        assert_eq!(step(&before, &before, none), Step::None);
        assert_eq!(step(&before, &cpu_up, none), Step::Update);
        // Only memory restarts: a CPU change is still in place.
        let mem_restart = RestartOnResize {
            cpu: false,
            memory: true,
        };
        assert_eq!(step(&before, &cpu_up, mem_restart), Step::Update);
        let cpu_restart = RestartOnResize {
            cpu: true,
            memory: false,
        };
        assert_eq!(step(&before, &cpu_up, cpu_restart), Step::Restart);
        // A memory request alone reaches no cgroup value: recorded only.
        let mem_req = res(
            &[("cpu", "20m"), ("memory", "30Mi")],
            &[("cpu", "20m"), ("memory", "35Mi")],
        )
        .amounts();
        assert_eq!(step(&before, &mem_req, none), Step::Record);
        assert_eq!(step(&before, &mem_req, mem_restart), Step::Restart);
        // 2m -> 1m request: both are the minimum shares; the status still changes.
        let a = res(&[("cpu", "2m")], &[("cpu", "10m")]).amounts();
        let b = res(&[("cpu", "1m")], &[("cpu", "10m")]).amounts();
        assert_eq!(step(&a, &b, none), Step::Record);
    }

    #[test]
    fn a_memory_limit_below_usage_is_refused_with_the_kubelets_words() {
        let cur = Amounts {
            memory_limit: 50 << 20,
            ..Default::default()
        };
        let lower = Amounts {
            memory_limit: 40 << 20,
            ..Default::default()
        };
        assert_eq!(
            memory_decrease_error("c1", &cur, &lower, Some(10 << 20)),
            None
        );
        assert_eq!(
            memory_decrease_error("c1", &cur, &lower, Some(45 << 20)).as_deref(),
            Some(
                "attempting to set container \"c1\" memory limit (41943040) below current usage (47185920)"
            )
        );
        assert_eq!(
            memory_decrease_error("c1", &cur, &lower, None).as_deref(),
            Some("missing container \"c1\" memory usage")
        );
        // Raising a limit needs no check; adding one does.
        assert_eq!(memory_decrease_error("c1", &lower, &cur, None), None);
        let unlimited = Amounts::default();
        assert!(memory_decrease_error("c1", &unlimited, &lower, Some(41 << 20)).is_some());
        assert_eq!(
            memory_decrease_message(&["a".into()]),
            "cannot decrease memory limits: a"
        );
        assert_eq!(
            memory_decrease_message(&["a".into(), "b".into()]),
            "cannot decrease memory limits: [a, b]"
        );
    }

    #[test]
    fn oom_score_adjustment_follows_the_qos_class_like_the_kubelets() {
        let pod = |containers: serde_json::Value| {
            crate::pod::spec::parse_pod(
                &serde_json::to_vec(&serde_json::json!({
                    "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
                    "spec": {"containers": containers}
                }))
                .unwrap(),
            )
            .unwrap()
        };
        let gib = 1u64 << 30;
        let g = pod(serde_json::json!([{"name": "a", "image": "i",
            "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]));
        assert_eq!(oom_score_adj(&g, &g.containers[0], gib, 4 * gib), -997);
        let be = pod(serde_json::json!([{"name": "a", "image": "i"}]));
        assert_eq!(oom_score_adj(&be, &be.containers[0], 0, 4 * gib), 1000);
        let b = pod(serde_json::json!([{"name": "a", "image": "i",
            "resources": {"requests": {"memory": "1Gi"}}}]));
        assert_eq!(oom_score_adj(&b, &b.containers[0], gib, 4 * gib), 750);
        // A tiny request rounds to 1000, which is BestEffort's: 999; a huge one stops at 3.
        assert_eq!(oom_score_adj(&b, &b.containers[0], 1 << 20, 4 * gib), 999);
        assert_eq!(oom_score_adj(&b, &b.containers[0], 4 * gib, 4 * gib), 3);
    }

    #[test]
    fn a_resize_is_deferred_without_room_and_infeasible_beyond_the_device() {
        let alloc = Allocatable {
            cpu_milli: Some(2000),
            memory: Some(1 << 30),
            pods: Some(1),
        };
        let others = [Requests {
            cpu_milli: 1500,
            memory: 0,
        }];
        assert_eq!(
            admit_resize(
                &alloc,
                &others,
                Requests {
                    cpu_milli: 500,
                    memory: 0
                }
            ),
            Ok(())
        );
        assert_eq!(
            admit_resize(
                &alloc,
                &others,
                Requests {
                    cpu_milli: 600,
                    memory: 0
                }
            ),
            Err((
                "Deferred".into(),
                "Node didn't have enough resource: cpu, requested: 600, used: 1500, capacity: 2000"
                    .into()
            ))
        );
        assert_eq!(
            admit_resize(
                &alloc,
                &[],
                Requests {
                    cpu_milli: 2500,
                    memory: 0
                }
            ),
            Err((
                "Infeasible".into(),
                "Node didn't have enough capacity: cpu, requested: 2500, capacity: 2000".into()
            ))
        );
    }
}
