//! Pod readiness gates (`spec.readinessGates`), evaluated by the hub as the kubelet evaluates
//! them: a pod is Ready when its containers are and every gate's condition is `True`.
//!
//! The conditions behind the gates are set by other controllers (a load balancer's, say) in the
//! API, which the device never sees; the hub does. So the device reports its containers'
//! readiness, and the hub writes the Ready condition: when the device's status goes out, and
//! when a gate's condition changes in the API (the pod watch brings it).

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

/// The kubelet's reason for a pod whose containers are ready but whose gates are not.
pub const REASON: &str = "ReadinessGatesNotReady";

/// The gates of `pod` (condition types), empty when it has none.
fn gates(pod: &Pod) -> Vec<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|g| g.condition_type.as_str())
        .collect()
}

/// Whether `pod` has readiness gates.
pub fn has_gates(pod: &Pod) -> bool {
    !gates(pod).is_empty()
}

/// The condition of `type_` in a status JSON's conditions.
fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
}

/// The pod's Ready condition (type, status, reason, message) as the kubelet generates it from
/// the ContainersReady condition and the gate conditions the API holds for the pod.
fn evaluate(
    pod: &Pod,
    containers_ready: Option<&Value>,
) -> (String, Option<String>, Option<String>) {
    let field = |c: Option<&Value>, f: &str| {
        c.and_then(|c| c.get(f))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let ready = field(containers_ready, "status").unwrap_or_else(|| "False".into());
    if ready != "True" {
        return (
            ready,
            field(containers_ready, "reason"),
            field(containers_ready, "message"),
        );
    }
    let api_conditions = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let unready: Vec<String> = gates(pod)
        .into_iter()
        .filter_map(|g| match api_conditions.iter().find(|c| c.type_ == g) {
            None => Some(format!(
                "corresponding condition of pod readiness gate {g:?} does not exist."
            )),
            Some(c) if c.status != "True" => Some(format!(
                "the status of pod readiness gate {g:?} is not \"True\", but {}",
                c.status
            )),
            Some(_) => None,
        })
        .collect();
    if unready.is_empty() {
        ("True".into(), None, None)
    } else {
        (
            "False".into(),
            Some(REASON.into()),
            Some(unready.join(", ")),
        )
    }
}

/// A Ready condition JSON: `status`, `reason` and `message` as evaluated; its transition time
/// kept from `current` when the status is the same, else `now`; `observedGeneration` from
/// `generation`.
fn ready_json(
    (status, reason, message): (String, Option<String>, Option<String>),
    current: Option<&Value>,
    generation: Option<&Value>,
    now: &str,
) -> Value {
    let since = current
        .filter(|c| c.get("status").and_then(Value::as_str) == Some(status.as_str()))
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(now));
    let mut c = json!({
        "type": "Ready",
        "status": status,
        "lastProbeTime": null,
        "lastTransitionTime": since,
        "reason": reason,
        "message": message,
    });
    if let Some(g) = generation {
        c["observedGeneration"] = g.clone();
    }
    c
}

/// Puts the gates into a status a device reported for `pod` (already sanitized): its Ready
/// condition becomes the kubelet's evaluation of its ContainersReady and the pod's gates.
/// Nothing changes for a pod without gates or a status without a Ready condition.
pub fn apply_to_report(pod: &Pod, status: &mut Value, now: &str) {
    if !has_gates(pod) {
        return;
    }
    let Some(reported) = condition(status, "Ready").cloned() else {
        return;
    };
    let evaluated = evaluate(pod, condition(status, "ContainersReady"));
    let api_status =
        serde_json::to_value(pod.status.clone().unwrap_or_default()).unwrap_or(Value::Null);
    let ready = ready_json(
        evaluated,
        condition(&api_status, "Ready"),
        reported.get("observedGeneration"),
        now,
    );
    if let Some(Value::Array(conditions)) = status.get_mut("conditions")
        && let Some(c) = conditions
            .iter_mut()
            .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
    {
        *c = ready;
    }
}

/// The Ready condition to write for `pod` as the API holds it now, when it differs from the one
/// the API has (a gate's condition changed): `None` for a pod without gates, not yet reported
/// by its device, or already right.
pub fn recheck(pod: &Pod, now: &str) -> Option<Value> {
    if !has_gates(pod) {
        return None;
    }
    let api_status = serde_json::to_value(pod.status.as_ref()?).ok()?;
    let containers_ready = condition(&api_status, "ContainersReady")?;
    let current = condition(&api_status, "Ready");
    let evaluated = evaluate(pod, Some(containers_ready));
    let same = current.is_some_and(|c| {
        c.get("status").and_then(Value::as_str) == Some(evaluated.0.as_str())
            && c.get("reason").and_then(Value::as_str) == evaluated.1.as_deref()
            && c.get("message").and_then(Value::as_str) == evaluated.2.as_deref()
    });
    if same {
        return None;
    }
    Some(ready_json(
        evaluated,
        current,
        current.and_then(|c| c.get("observedGeneration")),
        now,
    ))
}

impl super::PodRelay {
    /// After a watch event for pod `uid`: writes its Ready condition again when a gate's
    /// condition changed in the API. Not for a pod the hub holds not ready for its Node (the
    /// mark wins), nor one that is going or gone.
    pub(super) fn recheck_gates(&mut self, uid: &str) {
        let Some(pod) = self.pods.by_uid(uid) else {
            return;
        };
        let Some(node) = super::node_of(&pod) else {
            return;
        };
        if !has_gates(&pod)
            || !self.is_ours(&node)
            || pod.metadata.deletion_timestamp.is_some()
            || super::snapshots::is_terminal(&pod)
            || self.unready.borrow().contains_key(&node)
            || self
                .pod_state
                .get(uid)
                .is_some_and(|st| st.marked.is_some() || st.rejected)
        {
            return;
        }
        let now = crate::kubeutil::time_string(k8s_openapi::jiff::Timestamp::now());
        let Some(ready) = recheck(&pod, &now) else {
            return;
        };
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        tracing::debug!(pod = %name, %namespace, status = %ready["status"], "readiness gates changed; Ready written again");
        let update = super::status::StatusUpdate {
            uid: uid.to_string(),
            namespace,
            name,
            status: json!({ "conditions": [ready] }),
        };
        if let Err(e) = self.status_tx.try_send(update) {
            tracing::warn!(error = %e, "status queue full; readiness gates evaluated on the next change");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(conditions: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "spec": {"containers": [], "readinessGates": [
                {"conditionType": "example.com/lb"}, {"conditionType": "example.com/dns"}
            ]},
            "status": {"phase": "Running", "conditions": conditions}
        }))
        .expect("pod")
    }

    fn report() -> Value {
        json!({"phase": "Running", "conditions": [
            {"type": "ContainersReady", "status": "True"},
            {"type": "Ready", "status": "True", "observedGeneration": 1}
        ]})
    }

    #[test]
    fn a_report_is_not_ready_until_every_gate_is_true() {
        let p = pod(json!([{"type": "example.com/lb", "status": "False"}]));
        let mut s = report();
        apply_to_report(&p, &mut s, "2026-01-01T00:00:01Z");
        let ready = &s["conditions"][1];
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], REASON);
        assert_eq!(
            ready["message"],
            "the status of pod readiness gate \"example.com/lb\" is not \"True\", but False, corresponding condition of pod readiness gate \"example.com/dns\" does not exist."
        );
        assert_eq!(ready["observedGeneration"], 1);
        assert_eq!(ready["lastTransitionTime"], "2026-01-01T00:00:01Z");

        let p = pod(json!([
            {"type": "example.com/lb", "status": "True"},
            {"type": "example.com/dns", "status": "True"},
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
        ]));
        let mut s = report();
        apply_to_report(&p, &mut s, "2026-01-01T00:00:01Z");
        assert_eq!(s["conditions"][1]["status"], "True");
        assert_eq!(s["conditions"][1]["reason"], Value::Null);
        assert_eq!(
            s["conditions"][1]["lastTransitionTime"], "2026-01-01T00:00:00Z",
            "no transition: the API's time stays"
        );
    }

    #[test]
    fn unready_containers_decide_before_the_gates() {
        let p = pod(json!([]));
        let mut s = json!({"conditions": [
            {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady", "message": "containers with unready status: [a]"},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "message": "containers with unready status: [a]"}
        ]});
        apply_to_report(&p, &mut s, "2026-01-01T00:00:01Z");
        assert_eq!(s["conditions"][1]["reason"], "ContainersNotReady");
        assert_eq!(
            s["conditions"][1]["message"],
            "containers with unready status: [a]"
        );
    }

    #[test]
    fn a_gate_changing_in_the_api_rewrites_ready_once() {
        let gated = json!([
            {"type": "ContainersReady", "status": "True"},
            {"type": "Ready", "status": "False", "reason": REASON,
             "message": "corresponding condition of pod readiness gate \"example.com/lb\" does not exist., corresponding condition of pod readiness gate \"example.com/dns\" does not exist.",
             "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 2}
        ]);
        assert_eq!(
            recheck(&pod(gated.clone()), "2026-01-01T00:00:01Z"),
            None,
            "already right"
        );
        let mut opened = gated.as_array().unwrap().clone();
        opened.push(json!({"type": "example.com/lb", "status": "True"}));
        opened.push(json!({"type": "example.com/dns", "status": "True"}));
        let c =
            recheck(&pod(Value::Array(opened.clone())), "2026-01-01T00:00:01Z").expect("rewritten");
        assert_eq!(c["status"], "True");
        assert_eq!(c["lastTransitionTime"], "2026-01-01T00:00:01Z");
        assert_eq!(c["observedGeneration"], 2);
        // Once written, nothing more.
        opened[1] = c;
        assert_eq!(
            recheck(&pod(Value::Array(opened)), "2026-01-01T00:00:02Z"),
            None
        );
        // Not reported by its device yet: nothing to evaluate.
        assert_eq!(recheck(&pod(json!([])), "2026-01-01T00:00:01Z"), None);
    }
}
