//! Pods the hub refuses to relay to a device before anything of them (spec, ConfigMaps, Secrets)
//! leaves the hub: DaemonSet pods not meant for devices, and pods whose bundle cannot fit the link.
//!
//! Both end the way a kubelet ends a pod it cannot admit: phase `Failed` with a reason and a
//! message naming the problem, plus a Warning Event.

use fleetlet_proto::v1::PodBundle;
use k8s_openapi::api::core::v1::Pod;
use prost::Message;

use super::admission::Rejection;
use crate::nodes::object::{FLEET_LABEL, MANAGED_LABEL};

/// Pod annotation (set it in a DaemonSet's pod template) by which a DaemonSet says its pods are
/// meant for fleetlet devices even though it does not select them by a fleetlet label.
pub const DAEMONSET_OPT_IN: &str = "fleetlet.io/run-on-devices";

/// Reason of a DaemonSet pod refused on a device.
pub const DAEMONSET_REASON: &str = "DaemonSetNotForDevices";

/// Reason of a pod whose bundle is over the per-pod or per-snapshot limit.
pub const BUNDLE_REASON: &str = "PodBundleTooLarge";

/// Node label keys (and `type=virtual-kubelet`) that only fleetlet Nodes carry.
fn is_fleetlet_selector(key: &str, value: Option<&str>) -> bool {
    key == FLEET_LABEL
        || key == MANAGED_LABEL
        || key.starts_with("fleetlet.io/")
        || key.starts_with("flightctl.io/")
        || (key == "type" && value.is_none_or(|v| v == "virtual-kubelet"))
}

/// Whether `pod` is created by a DaemonSet.
fn daemonset_owner(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind == "DaemonSet")
        .map(|o| o.name.as_str())
}

/// Refuses a DaemonSet pod whose DaemonSet does not target fleetlet nodes explicitly.
///
/// Cluster DaemonSets (kube-proxy, a CNI agent) tolerate every taint, so the scheduler binds
/// their pods to fleetlet Nodes too; relayed, they would run cluster plumbing with its Secrets
/// on a device. A DaemonSet is meant for devices when its pods carry a `nodeSelector` on a
/// fleetlet label (`flightctl.io/fleet`, `fleetlet.io/managed-by`, `type: virtual-kubelet`, any
/// `fleetlet.io/` or `flightctl.io/` key) or the [`DAEMONSET_OPT_IN`] annotation set to "true".
/// Node affinity cannot be told from the pod: the DaemonSet controller replaces a pod's required
/// node affinity with one naming its Node, so a DaemonSet selecting devices by affinity sets the
/// annotation.
pub fn daemonset(pod: &Pod) -> Option<Rejection> {
    let owner = daemonset_owner(pod)?;
    let opted_in = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DAEMONSET_OPT_IN))
        .is_some_and(|v| v == "true");
    let selects_devices = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_selector.as_ref())
        .is_some_and(|sel| {
            sel.iter()
                .any(|(k, v)| is_fleetlet_selector(k, Some(v.as_str())))
        });
    if opted_in || selects_devices {
        return None;
    }
    Some(Rejection {
        reason: DAEMONSET_REASON.into(),
        message: format!(
            "DaemonSet {owner} does not target fleetlet devices (no nodeSelector on a fleetlet \
             label such as {FLEET_LABEL}, and no {DAEMONSET_OPT_IN}=\"true\" pod annotation); \
             its pod is not sent to the device"
        ),
    })
}

/// Limits on what one device's snapshot may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleLimits {
    /// Largest encoded bundle of one pod.
    pub per_pod: usize,
    /// Largest sum of the bundles of one device's snapshot.
    pub per_snapshot: usize,
}

/// What a bundle is made of, largest first, for a message an operator can act on.
fn composition(bundle: &PodBundle) -> String {
    let mut parts: Vec<(usize, String)> = Vec::new();
    for cm in &bundle.config_maps {
        parts.push((cm.encoded_len(), format!("ConfigMap {}", cm.name)));
    }
    for s in &bundle.secrets {
        parts.push((s.encoded_len(), format!("Secret {}", s.name)));
    }
    parts.push((bundle.pod_json.len(), "the pod spec".into()));
    parts.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let shown: Vec<String> = parts
        .iter()
        .take(8)
        .map(|(n, what)| format!("{what} {n} bytes"))
        .collect();
    let mut out = shown.join(", ");
    if parts.len() > 8 {
        out.push_str(&format!(" and {} more", parts.len() - 8));
    }
    out
}

/// Refuses a bundle over the per-pod limit, or one that would take the snapshot (`used` bytes
/// so far, pods in creation order) over the per-snapshot limit. Returns its size otherwise.
pub fn bundle_size(
    bundle: &PodBundle,
    used: usize,
    limits: BundleLimits,
) -> Result<usize, Rejection> {
    let size = bundle.encoded_len();
    if size > limits.per_pod {
        return Err(Rejection {
            reason: BUNDLE_REASON.into(),
            message: format!(
                "the pod's bundle (spec with its ConfigMaps and Secrets) is {size} bytes, over \
                 the per-pod limit of {} bytes: {}",
                limits.per_pod,
                composition(bundle)
            ),
        });
    }
    if used.saturating_add(size) > limits.per_snapshot {
        return Err(Rejection {
            reason: BUNDLE_REASON.into(),
            message: format!(
                "the pod's bundle is {size} bytes and the device's other pods already take \
                 {used} bytes of the per-device snapshot limit of {} bytes: {}",
                limits.per_snapshot,
                composition(bundle)
            ),
        });
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlet_proto::v1::ConfigMapData;
    use serde_json::json;

    fn ds_pod(node_selector: serde_json::Value, annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": "kube-proxy-x", "namespace": "kube-system", "uid": "u1",
                "annotations": annotations,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                    "name": "kube-proxy", "uid": "ds1", "controller": true}]
            },
            "spec": {"nodeSelector": node_selector, "containers": [{"name": "c", "image": "i"}],
                     "tolerations": [{"operator": "Exists"}]}
        }))
        .expect("pod")
    }

    #[test]
    fn a_daemonset_that_tolerates_everything_is_refused() {
        let r =
            daemonset(&ds_pod(json!({"kubernetes.io/os": "linux"}), json!({}))).expect("refused");
        assert_eq!(r.reason, DAEMONSET_REASON);
        assert!(r.message.contains("DaemonSet kube-proxy"), "{}", r.message);
    }

    #[test]
    fn a_daemonset_selecting_a_fleet_or_opting_in_runs() {
        assert!(daemonset(&ds_pod(json!({FLEET_LABEL: "a"}), json!({}))).is_none());
        assert!(daemonset(&ds_pod(json!({"type": "virtual-kubelet"}), json!({}))).is_none());
        assert!(daemonset(&ds_pod(json!({}), json!({DAEMONSET_OPT_IN: "true"}))).is_none());
        assert!(
            daemonset(&ds_pod(
                json!({"type": "other"}),
                json!({DAEMONSET_OPT_IN: "no"})
            ))
            .is_some()
        );
    }

    #[test]
    fn pods_of_other_controllers_are_not_daemonset_pods() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "ownerReferences": [{"apiVersion": "apps/v1",
                "kind": "ReplicaSet", "name": "rs", "uid": "r", "controller": true}]},
            "spec": {"containers": [{"name": "c", "image": "i"}]}
        }))
        .expect("pod");
        assert!(daemonset(&pod).is_none());
    }

    #[test]
    fn bundle_limits_name_the_largest_objects() {
        let big = |name: &str, n: usize| ConfigMapData {
            name: name.into(),
            data: [("k".to_string(), "x".repeat(n))].into_iter().collect(),
            binary_data: Default::default(),
        };
        let bundle = PodBundle {
            pod_json: b"{}".to_vec().into(),
            config_maps: vec![big("small", 10), big("huge", 5000)],
            ..Default::default()
        };
        let limits = BundleLimits {
            per_pod: 1000,
            per_snapshot: 10_000,
        };
        let r = bundle_size(&bundle, 0, limits).expect_err("over per-pod");
        assert_eq!(r.reason, BUNDLE_REASON);
        assert!(
            r.message.find("ConfigMap huge").expect("named")
                < r.message.find("ConfigMap small").expect("named"),
            "{}",
            r.message
        );
        let roomy = BundleLimits {
            per_pod: 8000,
            per_snapshot: 10_000,
        };
        let size = bundle_size(&bundle, 0, roomy).expect("fits");
        assert!(bundle_size(&bundle, 10_000 - size + 1, roomy).is_err());
        assert!(bundle_size(&bundle, 10_000 - size, roomy).is_ok());
    }
}
