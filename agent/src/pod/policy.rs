//! The device owner's policy: what this device never runs, whatever the cluster allows.
//!
//! Cluster policy (Pod Security admission, RBAC) is set by whoever runs the cluster; the device
//! may belong to someone else (a customer site, a vehicle) who wants a floor of their own.
//! `[policy]` in agent.toml sets it; the defaults allow what the kubelet allows, so a device
//! without a policy behaves like a kubelet. Unsafe sysctls follow the kubelet's
//! `--allowed-unsafe-sysctls`: refused unless listed.

use serde::Deserialize;

use super::security::SAFE_SYSCTLS;
use super::spec::{ContainerPlan, PodPlan, VolumePlan};

/// `[policy]` of agent.toml.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicePolicy {
    /// Containers with `privileged: true` may run.
    pub allow_privileged: bool,
    /// Pods with `hostNetwork: true` may run.
    pub allow_host_network: bool,
    /// hostPath volumes may be used.
    pub allow_host_path: bool,
    /// When not empty, hostPath volumes must lie below one of these directories.
    pub host_path_prefixes: Vec<String>,
    /// Capabilities a container may add (names without `CAP_`); `["*"]` allows any.
    pub allowed_capabilities: Vec<String>,
    /// Pod sysctls may be set at all.
    pub allow_sysctls: bool,
    /// Sysctls beyond the kubelet's safe set that pods may set; a trailing `*` matches a prefix
    /// (the kubelet's `--allowed-unsafe-sysctls`).
    pub allowed_unsafe_sysctls: Vec<String>,
}

impl Default for DevicePolicy {
    fn default() -> Self {
        Self {
            allow_privileged: true,
            allow_host_network: true,
            allow_host_path: true,
            host_path_prefixes: Vec::new(),
            allowed_capabilities: vec!["*".into()],
            allow_sysctls: true,
            allowed_unsafe_sysctls: Vec::new(),
        }
    }
}

/// A pod the policy refuses: a status reason and a message naming the field and the setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyViolation {
    /// Pod status reason (`DevicePolicy`, or the kubelet's `SysctlForbidden`).
    pub reason: &'static str,
    /// What and why.
    pub message: String,
}

fn violation(field: &str, what: &str, setting: &str) -> PolicyViolation {
    PolicyViolation {
        reason: "DevicePolicy",
        message: format!(
            "{field}: the device policy forbids {what} (agent.toml [policy] {setting})"
        ),
    }
}

impl DevicePolicy {
    /// Check a parsed pod against the policy.
    pub fn check(&self, plan: &PodPlan) -> Result<(), PolicyViolation> {
        if plan.host_network && !self.allow_host_network {
            return Err(violation(
                "spec.hostNetwork",
                "the host network",
                "allow_host_network = false",
            ));
        }
        for (i, v) in plan.volumes.iter().enumerate() {
            if let VolumePlan::HostPath { path, .. } = v {
                let field = format!("spec.volumes[{i}].hostPath");
                if !self.allow_host_path {
                    return Err(violation(
                        &field,
                        "hostPath volumes",
                        "allow_host_path = false",
                    ));
                }
                if !self.host_path_prefixes.is_empty() && path.split('/').any(|c| c == "..") {
                    return Err(violation(
                        &field,
                        &format!("hostPath {path:?} with '..'"),
                        &format!("host_path_prefixes = {:?}", self.host_path_prefixes),
                    ));
                }
                if !self.host_path_prefixes.is_empty()
                    && !self
                        .host_path_prefixes
                        .iter()
                        .any(|p| std::path::Path::new(path).starts_with(p))
                {
                    return Err(violation(
                        &field,
                        &format!("hostPath {path:?}"),
                        &format!("host_path_prefixes = {:?}", self.host_path_prefixes),
                    ));
                }
            }
        }
        for (i, c) in plan.all_containers().enumerate() {
            let (kind, idx) = plan.container_field(i);
            self.check_container(&format!("spec.{kind}[{idx}]"), c)?;
        }
        for (i, (name, _)) in plan.security.sysctls.iter().enumerate() {
            let field = format!("spec.securityContext.sysctls[{i}]");
            if !self.allow_sysctls {
                return Err(violation(&field, "sysctls", "allow_sysctls = false"));
            }
            let n = name.replace('/', ".");
            let allowed = SAFE_SYSCTLS.contains(&n.as_str())
                || self
                    .allowed_unsafe_sysctls
                    .iter()
                    .any(|a| match a.strip_suffix('*') {
                        Some(prefix) => n.starts_with(prefix),
                        None => *a == n,
                    });
            if !allowed {
                // The kubelet's reason and wording for a sysctl outside its allowlist.
                return Err(PolicyViolation {
                    reason: "SysctlForbidden",
                    message: format!(
                        "forbidden sysctl: {name:?} not allowlisted (agent.toml [policy] allowed_unsafe_sysctls)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Check one container (`field` is its spec path): privileged and added capabilities.
    /// Ephemeral containers are checked alone with this (see [`DevicePolicy::refuse_ephemeral`]).
    pub fn check_container(&self, field: &str, c: &ContainerPlan) -> Result<(), PolicyViolation> {
        let field = format!("{field}.securityContext");
        if c.security.privileged && !self.allow_privileged {
            return Err(violation(
                &format!("{field}.privileged"),
                "privileged containers",
                "allow_privileged = false",
            ));
        }
        if !self.allowed_capabilities.iter().any(|c| c == "*") {
            for cap in &c.security.cap_add {
                let bare = cap.strip_prefix("CAP_").unwrap_or(cap);
                let ok = self
                    .allowed_capabilities
                    .iter()
                    .any(|a| a.trim_start_matches("CAP_").eq_ignore_ascii_case(bare));
                if !ok {
                    return Err(violation(
                        &format!("{field}.capabilities.add"),
                        &format!("adding {cap}"),
                        &format!("allowed_capabilities = {:?}", self.allowed_capabilities),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Refuses each ephemeral container the policy forbids, exactly as it would forbid the
    /// same settings on any other container; the pod itself runs on (an ephemeral container is
    /// added to a running pod, which must not end because a debugging session was refused).
    pub fn refuse_ephemeral(&self, plan: &mut PodPlan) {
        for (i, e) in plan.ephemeral_containers.iter_mut().enumerate() {
            if let Ok(c) = &e.container
                && let Err(v) = self.check_container(&format!("spec.ephemeralContainers[{i}]"), c)
            {
                e.container = Err((v.reason.to_owned(), v.message));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(spec: serde_json::Value) -> PodPlan {
        super::super::spec::parse_pod(
            serde_json::json!({"metadata": {"name": "p", "uid": "u"}, "spec": spec})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn default_policy_is_kubelet_faithful() {
        let p = plan(serde_json::json!({"hostNetwork": true,
            "volumes": [{"name": "h", "hostPath": {"path": "/etc"}}],
            "containers": [{"name": "c", "image": "i", "securityContext": {"privileged": true,
                "capabilities": {"add": ["NET_ADMIN"]}}}]}));
        assert_eq!(DevicePolicy::default().check(&p), Ok(()));
    }

    #[test]
    fn forbidden_settings_name_field_and_policy() {
        let strict = DevicePolicy {
            allow_privileged: false,
            host_path_prefixes: vec!["/srv/data".into()],
            allowed_capabilities: vec!["NET_BIND_SERVICE".into()],
            ..DevicePolicy::default()
        };
        let e = strict
            .check(&plan(
                serde_json::json!({"containers": [{"name": "c", "image": "i",
                "securityContext": {"privileged": true}}]}),
            ))
            .unwrap_err();
        assert_eq!(e.reason, "DevicePolicy");
        assert!(
            e.message
                .starts_with("spec.containers[0].securityContext.privileged"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("allow_privileged = false"),
            "{}",
            e.message
        );
        let e = strict
            .check(&plan(
                serde_json::json!({"volumes": [{"name": "h", "hostPath": {"path": "/etc"}}],
                "containers": [{"name": "c", "image": "i"}]}),
            ))
            .unwrap_err();
        assert!(e.message.contains("hostPath \"/etc\""), "{}", e.message);
        let e = strict
            .check(&plan(
                serde_json::json!({"initContainers": [{"name": "i", "image": "i",
                "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}],
                "containers": [{"name": "c", "image": "i"}]}),
            ))
            .unwrap_err();
        assert!(
            e.message.starts_with("spec.initContainers[0]"),
            "{}",
            e.message
        );
        assert!(
            strict
                .check(&plan(
                    serde_json::json!({"containers": [{"name": "c", "image": "i",
                "securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE"]}}}]})
                ))
                .is_ok()
        );
    }

    #[test]
    fn unsafe_sysctls_need_the_allowlist() {
        let p = plan(serde_json::json!({"securityContext": {"sysctls": [
            {"name": "net.ipv4.tcp_syncookies", "value": "1"},
            {"name": "kernel.msgmax", "value": "65536"}]},
            "containers": [{"name": "c", "image": "i"}]}));
        let e = DevicePolicy::default().check(&p).unwrap_err();
        assert_eq!(e.reason, "SysctlForbidden");
        let allowed = DevicePolicy {
            allowed_unsafe_sysctls: vec!["kernel.msg*".into()],
            ..DevicePolicy::default()
        };
        assert_eq!(allowed.check(&p), Ok(()));
    }
}
