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

fn container_requests(c: &Container) -> Requests {
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

/// The pod's effective requests: the larger of the sum over app containers and the largest
/// init container, plus the pod overhead.
pub fn pod_requests(pod: &Pod) -> Requests {
    let Some(spec) = &pod.spec else {
        return Requests::default();
    };
    let mut sum = Requests::default();
    for c in &spec.containers {
        let r = container_requests(c);
        sum.cpu_milli += r.cpu_milli;
        sum.memory += r.memory;
    }
    for c in spec.init_containers.iter().flatten() {
        let r = container_requests(c);
        sum.cpu_milli = sum.cpu_milli.max(r.cpu_milli);
        sum.memory = sum.memory.max(r.memory);
    }
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

/// Decides whether `pod` fits next to `admitted` (requests of pods already accepted).
pub fn admit(
    allocatable: &BTreeMap<String, String>,
    admitted: &[Requests],
    pod: Requests,
) -> Result<(), Rejection> {
    let used = admitted
        .iter()
        .fold(Requests::default(), |acc, r| Requests {
            cpu_milli: acc.cpu_milli + r.cpu_milli,
            memory: acc.memory + r.memory,
        });
    let alloc_cpu = allocatable
        .get("cpu")
        .and_then(|q| quantity::cpu_millis(q).ok());
    let alloc_mem = allocatable
        .get("memory")
        .and_then(|q| quantity::units(q).ok());
    let alloc_pods = allocatable
        .get("pods")
        .and_then(|q| quantity::units(q).ok());
    if let Some(max) = alloc_pods
        && i128::try_from(admitted.len()).unwrap_or(i128::MAX) + 1 > max
    {
        return Err(reject(
            "pods",
            1,
            i128::try_from(admitted.len()).unwrap_or(i128::MAX),
            max,
        ));
    }
    if let Some(cap) = alloc_cpu
        && pod.cpu_milli > 0
        && used.cpu_milli + pod.cpu_milli > cap
    {
        return Err(reject("cpu", pod.cpu_milli, used.cpu_milli, cap));
    }
    if let Some(cap) = alloc_mem
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
