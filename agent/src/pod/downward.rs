//! Downward API values (env and volumes), formatted as the kubelet formats them.

use std::collections::BTreeMap;

use super::spec::{FieldRef, PodPlan, ResourceRef, Resources};

/// Addresses known when a value is read.
#[derive(Debug, Clone, Copy)]
pub struct Addresses<'a> {
    /// Node address.
    pub host_ip: &'a str,
    /// Pod address (the node's for hostNetwork pods).
    pub pod_ip: &'a str,
}

/// The value of a pod field.
pub fn field_value(plan: &PodPlan, f: &FieldRef, addr: Addresses<'_>) -> String {
    match f {
        FieldRef::PodName => plan.meta.name.clone(),
        FieldRef::Namespace => plan.meta.namespace.clone(),
        FieldRef::Uid => plan.meta.uid.clone(),
        FieldRef::NodeName => plan.node_name.clone(),
        FieldRef::ServiceAccountName => plan.service_account.clone(),
        FieldRef::Labels => format_map(&plan.labels),
        FieldRef::Annotations => format_map(&plan.annotations),
        FieldRef::Label(k) => plan.labels.get(k).cloned().unwrap_or_default(),
        FieldRef::Annotation(k) => plan.annotations.get(k).cloned().unwrap_or_default(),
        FieldRef::HostIp | FieldRef::HostIps => addr.host_ip.to_owned(),
        FieldRef::PodIp | FieldRef::PodIps => {
            if plan.host_network {
                addr.host_ip.to_owned()
            } else {
                addr.pod_ip.to_owned()
            }
        }
    }
}

/// The value of a container resource; a limit that is not set reads as the node's allocatable,
/// as the kubelet does.
pub fn resource_value(plan: &PodPlan, r: &ResourceRef, allocatable: Resources) -> String {
    let Some(c) = plan.container(&r.container) else {
        return String::new();
    };
    let limits = c.limits.unwrap_or_default();
    let v = match r.resource.as_str() {
        "limits.cpu" => nonzero(limits.cpu_millis).unwrap_or(allocatable.cpu_millis),
        "limits.memory" => nonzero(limits.memory_bytes).unwrap_or(allocatable.memory_bytes),
        "requests.cpu" => c.requests.cpu_millis,
        "requests.memory" => c.requests.memory_bytes,
        _ => 0,
    };
    v.div_ceil(r.divisor.max(1)).to_string()
}

fn nonzero(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

/// `key="value"` lines sorted by key, values quoted like Go's `%q` (the kubelet's FormatMap).
pub fn format_map(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={}", go_quote(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Go's `strconv.Quote`.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{07}' => out.push_str("\\a"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\u{0b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_formatted_like_the_kubelet() {
        let m = BTreeMap::from([
            ("b".to_string(), "two words".to_string()),
            ("a".to_string(), "q\"uote\n".to_string()),
        ]);
        assert_eq!(format_map(&m), "a=\"q\\\"uote\\n\"\nb=\"two words\"");
    }

    #[test]
    fn resources_round_up_and_default_to_allocatable() {
        let plan = super::super::spec::parse_pod(
            serde_json::json!({"metadata": {"name": "p", "uid": "u"}, "spec": {"containers": [
                {"name": "a", "image": "i", "resources": {"limits": {"cpu": "250m", "memory": "64Mi"}}},
                {"name": "b", "image": "i"}]}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let alloc = Resources {
            cpu_millis: 2000,
            memory_bytes: 1 << 30,
        };
        let r = |c: &str, res: &str, divisor: u64| {
            resource_value(
                &plan,
                &ResourceRef {
                    container: c.into(),
                    resource: res.into(),
                    divisor,
                },
                alloc,
            )
        };
        assert_eq!(r("a", "limits.cpu", 1000), "1");
        assert_eq!(r("a", "limits.cpu", 1), "250");
        assert_eq!(r("a", "limits.memory", 1 << 20), "64");
        assert_eq!(r("b", "limits.cpu", 1000), "2");
        assert_eq!(r("b", "limits.memory", 1), (1u64 << 30).to_string());
    }
}
