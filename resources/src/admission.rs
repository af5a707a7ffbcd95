//! Admission as the kubelet does it: a pod is accepted only if its requests fit into the node's
//! allocatable next to the pods already accepted; otherwise it fails with `OutOf<resource>`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::quantity;

/// What a pod asks for: CPU in millicores, memory in bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Requests {
    /// Millicores.
    pub cpu_milli: i128,
    /// Bytes.
    pub memory: i128,
}

/// A container's requests (a limit stands in for a missing request, as the API's defaulting
/// makes it).
pub fn container_requests(c: &Container) -> Requests {
    let res = c.resources.as_ref();
    let get = |key: &str| {
        res.and_then(|r| r.requests.as_ref().and_then(|m| m.get(key)))
            .or_else(|| res.and_then(|r| r.limits.as_ref().and_then(|m| m.get(key))))
            .map(|q| q.0.clone())
    };
    Requests {
        cpu_milli: get("cpu")
            .and_then(|q| quantity::cpu_millis(&q).ok())
            .unwrap_or(0),
        memory: get("memory")
            .and_then(|q| quantity::units(&q).ok())
            .unwrap_or(0),
    }
}

impl Requests {
    fn plus(self, o: Requests) -> Requests {
        Requests {
            cpu_milli: self.cpu_milli + o.cpu_milli,
            memory: self.memory + o.memory,
        }
    }

    fn max(self, o: Requests) -> Requests {
        Requests {
            cpu_milli: self.cpu_milli.max(o.cpu_milli),
            memory: self.memory.max(o.memory),
        }
    }
}

/// The pod's effective requests as the kubelet computes them (with sidecars, KEP-753): the
/// larger of (a) the app containers plus every sidecar (an init container with
/// `restartPolicy: Always`) and (b) each regular init container plus the sidecars started
/// before it; then the pod overhead on top.
pub fn pod_requests(pod: &Pod) -> Requests {
    let Some(spec) = &pod.spec else {
        return Requests::default();
    };
    let mut sidecars = Requests::default();
    let mut peak = Requests::default();
    for c in spec.init_containers.iter().flatten() {
        let r = container_requests(c);
        if c.restart_policy.as_deref() == Some("Always") {
            sidecars = sidecars.plus(r);
            peak = peak.max(sidecars);
        } else {
            peak = peak.max(sidecars.plus(r));
        }
    }
    let steady = spec
        .containers
        .iter()
        .fold(sidecars, |acc, c| acc.plus(container_requests(c)));
    let mut sum = peak.max(steady);
    for (k, q) in spec.overhead.iter().flatten() {
        match k.as_str() {
            "cpu" => sum.cpu_milli += quantity::cpu_millis(&q.0).unwrap_or(0),
            "memory" => sum.memory += quantity::units(&q.0).unwrap_or(0),
            _ => {}
        }
    }
    sum
}

/// Why a pod was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// `OutOfcpu`, `OutOfmemory` or `OutOfpods`, as the kubelet names them.
    pub reason: String,
    /// The kubelet's message shape.
    pub message: String,
}

/// What a node offers to pods, parsed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Allocatable {
    /// Millicores (`None`: not limited).
    pub cpu_milli: Option<i128>,
    /// Bytes.
    pub memory: Option<i128>,
    /// Pods.
    pub pods: Option<i128>,
}

impl Allocatable {
    /// From a Node's `status.allocatable` (quantity strings by resource name).
    pub fn from_map(allocatable: &BTreeMap<String, String>) -> Self {
        Self {
            cpu_milli: allocatable
                .get("cpu")
                .and_then(|q| quantity::cpu_millis(q).ok()),
            memory: allocatable
                .get("memory")
                .and_then(|q| quantity::units(q).ok()),
            pods: allocatable
                .get("pods")
                .and_then(|q| quantity::units(q).ok()),
        }
    }
}

/// Decides whether `pod` fits next to `admitted` (requests of pods already accepted).
pub fn admit(
    allocatable: &BTreeMap<String, String>,
    admitted: &[Requests],
    pod: Requests,
) -> Result<(), Rejection> {
    admit_to(&Allocatable::from_map(allocatable), admitted, pod)
}

/// [`admit`] against a parsed allocatable.
pub fn admit_to(
    allocatable: &Allocatable,
    admitted: &[Requests],
    pod: Requests,
) -> Result<(), Rejection> {
    let used = admitted
        .iter()
        .fold(Requests::default(), |acc, r| acc.plus(*r));
    let count = i128::try_from(admitted.len()).unwrap_or(i128::MAX);
    if let Some(max) = allocatable.pods
        && count + 1 > max
    {
        return Err(reject("pods", 1, count, max));
    }
    if let Some(cap) = allocatable.cpu_milli
        && pod.cpu_milli > 0
        && used.cpu_milli + pod.cpu_milli > cap
    {
        return Err(reject("cpu", pod.cpu_milli, used.cpu_milli, cap));
    }
    if let Some(cap) = allocatable.memory
        && pod.memory > 0
        && used.memory + pod.memory > cap
    {
        return Err(reject("memory", pod.memory, used.memory, cap));
    }
    Ok(())
}

fn reject(resource: &str, requested: i128, used: i128, capacity: i128) -> Rejection {
    Rejection {
        reason: format!("OutOf{resource}"),
        message: format!(
            "Pod was rejected: Node didn't have enough resource: {resource}, requested: {requested}, used: {used}, capacity: {capacity}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(containers: serde_json::Value, init: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": containers, "initContainers": init}
        }))
        .expect("pod")
    }

    fn alloc(cpu: &str, mem: &str, pods: &str) -> BTreeMap<String, String> {
        [("cpu", cpu), ("memory", mem), ("pods", pods)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn requests_sum_containers_and_take_the_largest_init_container() {
        let p = pod(
            serde_json::json!([
                {"name": "a", "image": "x", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}},
                {"name": "b", "image": "x", "resources": {"limits": {"cpu": "500m"}}}
            ]),
            serde_json::json!([{"name": "i", "image": "x", "resources": {"requests": {"cpu": "2", "memory": "1Mi"}}}]),
        );
        assert_eq!(
            pod_requests(&p),
            Requests {
                cpu_milli: 2000,
                memory: 64 * 1024 * 1024
            }
        );
    }

    #[test]
    fn sidecars_add_up_with_the_app_and_before_later_init_containers() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {
                "initContainers": [
                    {"name": "s1", "image": "x", "restartPolicy": "Always", "resources": {"requests": {"cpu": "500m"}}},
                    {"name": "i", "image": "x", "resources": {"requests": {"cpu": "2"}}},
                    {"name": "s2", "image": "x", "restartPolicy": "Always", "resources": {"requests": {"cpu": "300m"}}}],
                "containers": [{"name": "a", "image": "x", "resources": {"requests": {"cpu": "1"}}}],
                "overhead": {"cpu": "100m"}
            }
        }))
        .expect("pod");
        // max(500m + 2, 500m + 300m + 1) + 100m overhead
        assert_eq!(pod_requests(&p).cpu_milli, 2600);
    }

    #[test]
    fn a_pod_that_does_not_fit_is_rejected_with_the_kubelet_reason() {
        let a = alloc("2", "1Gi", "110");
        let big_cpu = Requests {
            cpu_milli: 1500,
            memory: 0,
        };
        assert!(admit(&a, &[], big_cpu).is_ok());
        let err = admit(&a, &[big_cpu], big_cpu).expect_err("3 cpus on 2");
        assert_eq!(err.reason, "OutOfcpu");
        assert!(
            err.message
                .contains("requested: 1500, used: 1500, capacity: 2000"),
            "{}",
            err.message
        );
        let err = admit(
            &a,
            &[],
            Requests {
                cpu_milli: 0,
                memory: 2 << 30,
            },
        )
        .expect_err("2Gi on 1Gi");
        assert_eq!(err.reason, "OutOfmemory");
    }

    #[test]
    fn best_effort_pods_only_count_against_the_pod_limit() {
        let a = alloc("0", "0", "2");
        let none = Requests::default();
        assert!(admit(&a, &[none], none).is_ok());
        assert_eq!(
            admit(&a, &[none, none], none).expect_err("3rd pod").reason,
            "OutOfpods"
        );
    }
}
