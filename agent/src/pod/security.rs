//! `securityContext` (pod and container level) parsed into what the container runs with.
//!
//! The container's own settings win over the pod's, as in Kubernetes. Everything is mapped onto
//! Podman or refused with the field named: a pod never runs with less isolation than it asked
//! for because a field was not understood.

use k8s_openapi::api::core::v1 as k8s;

use super::spec::SpecError;

/// seccomp profile of a container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Seccomp {
    /// Not set: Podman's default profile (the kubelet's `seccompDefault: true`).
    #[default]
    Unset,
    /// The runtime's default profile.
    RuntimeDefault,
    /// No filtering.
    Unconfined,
    /// A profile file below the device's seccomp profile root (relative path).
    Localhost(String),
}

/// AppArmor profile of a container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AppArmor {
    /// Not set or Unconfined: nothing to enforce.
    #[default]
    Unconfined,
    /// The runtime's default profile.
    RuntimeDefault,
    /// A profile loaded on the device, by name.
    Localhost(String),
}

/// What the container process runs as and with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SecurityPlan {
    /// runAsUser.
    pub run_as_user: Option<i64>,
    /// runAsGroup.
    pub run_as_group: Option<i64>,
    /// runAsNonRoot.
    pub run_as_non_root: bool,
    /// Supplementary groups: pod supplementalGroups plus fsGroup.
    pub supplemental_groups: Vec<i64>,
    /// privileged.
    pub privileged: bool,
    /// allowPrivilegeEscalation: false sets no_new_privs.
    pub no_new_privileges: bool,
    /// capabilities.add, normalised to `CAP_*`.
    pub cap_add: Vec<String>,
    /// capabilities.drop, normalised to `CAP_*` (or `ALL`).
    pub cap_drop: Vec<String>,
    /// readOnlyRootFilesystem.
    pub read_only_root: bool,
    /// seccompProfile.
    pub seccomp: Seccomp,
    /// procMount: Unmasked.
    pub unmasked_proc: bool,
    /// appArmorProfile (or the legacy annotation).
    pub apparmor: AppArmor,
    /// seLinuxOptions as Podman `--security-opt label=` values.
    pub selinux: Vec<String>,
}

/// Pod-level settings that are not per container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodSecurity {
    /// fsGroup: group owner of the pod's writable and projected volumes.
    pub fs_group: Option<u32>,
    /// fsGroupChangePolicy: OnRootMismatch.
    pub fs_group_on_root_mismatch: bool,
    /// sysctls (name, value), in order.
    pub sysctls: Vec<(String, String)>,
}

/// Linux capabilities a pod may name (without the `CAP_` prefix), as of Linux 6.x.
const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYSLOG",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "WAKE_ALARM",
];

/// Normalise a capability name to `CAP_X`; `ALL` stays `ALL`.
pub fn normalise_capability(field: &str, c: &str) -> Result<String, SpecError> {
    let upper = c.trim().to_ascii_uppercase();
    if upper == "ALL" {
        return Ok(upper);
    }
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    if CAPABILITIES.contains(&bare) {
        Ok(format!("CAP_{bare}"))
    } else {
        Err(SpecError::new(field, format!("unknown capability {c:?}")))
    }
}

fn id(field: &str, v: i64) -> Result<i64, SpecError> {
    if (0..=i64::from(u32::MAX - 1)).contains(&v) {
        Ok(v)
    } else {
        Err(SpecError::new(
            field,
            format!("{v} is not a valid Linux id"),
        ))
    }
}

/// Parse the pod-level context.
pub fn parse_pod_security(
    sc: Option<&k8s::PodSecurityContext>,
    host_network: bool,
) -> Result<PodSecurity, SpecError> {
    let Some(sc) = sc else {
        return Ok(PodSecurity::default());
    };
    let f = "spec.securityContext";
    if sc.windows_options.is_some() {
        return Err(SpecError::new(
            format!("{f}.windowsOptions"),
            "Windows options cannot be honoured on a Linux device",
        ));
    }
    if sc.supplemental_groups_policy.as_deref() == Some("Strict") {
        return Err(SpecError::new(
            format!("{f}.supplementalGroupsPolicy"),
            "Strict is not supported by Podman 4 (the image's groups are always merged)",
        ));
    }
    let fs_group = sc
        .fs_group
        .map(|g| id(&format!("{f}.fsGroup"), g).map(|g| g as u32))
        .transpose()?;
    let mut sysctls = Vec::new();
    for (i, s) in sc.sysctls.as_deref().unwrap_or_default().iter().enumerate() {
        let field = format!("{f}.sysctls[{i}]");
        if !namespaced_sysctl(&s.name) {
            return Err(SpecError::new(
                format!("{field}.name"),
                format!("{:?} is not a namespaced sysctl", s.name),
            ));
        }
        if host_network && s.name.starts_with("net.") {
            return Err(SpecError::new(
                format!("{field}.name"),
                format!("{:?} cannot be set with hostNetwork", s.name),
            ));
        }
        if s.value.contains(['\n', '\0']) {
            return Err(SpecError::new(format!("{field}.value"), "invalid value"));
        }
        sysctls.push((s.name.clone(), s.value.clone()));
    }
    Ok(PodSecurity {
        fs_group,
        fs_group_on_root_mismatch: sc.fs_group_change_policy.as_deref() == Some("OnRootMismatch"),
        sysctls,
    })
}

/// Sysctls the kubelet allows without `--allowed-unsafe-sysctls` (pkg/kubelet/sysctl/safe_sysctls.go).
pub const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
];

/// Whether a sysctl is namespaced (settable per container), as the kubelet's list says.
pub fn namespaced_sysctl(name: &str) -> bool {
    let n = name.replace('/', ".");
    matches!(
        n.as_str(),
        "kernel.sem"
            | "kernel.msgmax"
            | "kernel.msgmnb"
            | "kernel.msgmni"
            | "kernel.shmall"
            | "kernel.shmmax"
            | "kernel.shmmni"
            | "kernel.shm_rmid_forced"
    ) || n.starts_with("fs.mqueue.")
        || n.starts_with("net.")
}

fn selinux_enabled() -> bool {
    std::path::Path::new("/sys/fs/selinux/enforce").exists()
}

fn apparmor_enabled() -> bool {
    std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|s| s.trim() == "Y")
}

fn seccomp(field: &str, p: &k8s::SeccompProfile) -> Result<Seccomp, SpecError> {
    match p.type_.as_str() {
        "RuntimeDefault" => Ok(Seccomp::RuntimeDefault),
        "Unconfined" => Ok(Seccomp::Unconfined),
        "Localhost" => {
            let path = p.localhost_profile.clone().unwrap_or_default();
            if path.is_empty() || path.starts_with('/') || path.split('/').any(|c| c == "..") {
                return Err(SpecError::new(
                    format!("{field}.localhostProfile"),
                    "must be a relative path without '..'",
                ));
            }
            Ok(Seccomp::Localhost(path))
        }
        other => Err(SpecError::new(
            format!("{field}.type"),
            format!("unknown seccomp profile type {other:?}"),
        )),
    }
}

fn apparmor(field: &str, p: &k8s::AppArmorProfile) -> Result<AppArmor, SpecError> {
    let a = match p.type_.as_str() {
        "Unconfined" => return Ok(AppArmor::Unconfined),
        "RuntimeDefault" => AppArmor::RuntimeDefault,
        "Localhost" => AppArmor::Localhost(p.localhost_profile.clone().unwrap_or_default()),
        other => {
            return Err(SpecError::new(
                format!("{field}.type"),
                format!("unknown AppArmor profile type {other:?}"),
            ));
        }
    };
    if !apparmor_enabled() {
        return Err(SpecError::new(
            field,
            "AppArmor is not enabled on this device",
        ));
    }
    Ok(a)
}

/// The SELinux label options of `o`; none where the device does not run SELinux, where CRI
/// runtimes (and so the kubelet) ignore them too: there is no label to confine with, and the
/// e2e suite's pods carry `level: s0` on every node.
fn selinux_opts(_field: &str, o: &k8s::SELinuxOptions) -> Result<Vec<String>, SpecError> {
    if !selinux_enabled() {
        return Ok(Vec::new());
    }
    Ok([
        ("user", &o.user),
        ("role", &o.role),
        ("type", &o.type_),
        ("level", &o.level),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}:{v}")))
    .collect())
}

/// The effective security plan of container `c` (at `field`) in `pod`.
pub fn parse_container_security(
    field: &str,
    pod: &k8s::PodSpec,
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    c: &k8s::Container,
) -> Result<SecurityPlan, SpecError> {
    let psc = pod.security_context.as_ref();
    let csc = c.security_context.as_ref();
    let f = format!("{field}.securityContext");
    let pf = "spec.securityContext";
    let mut plan = SecurityPlan::default();
    // Values: container first, then pod.
    let pick = |cv: Option<i64>, pv: Option<i64>, name: &str| -> Result<Option<i64>, SpecError> {
        match (cv, pv) {
            (Some(v), _) => id(&format!("{f}.{name}"), v).map(Some),
            (None, Some(v)) => id(&format!("{pf}.{name}"), v).map(Some),
            _ => Ok(None),
        }
    };
    plan.run_as_user = pick(
        csc.and_then(|s| s.run_as_user),
        psc.and_then(|s| s.run_as_user),
        "runAsUser",
    )?;
    plan.run_as_group = pick(
        csc.and_then(|s| s.run_as_group),
        psc.and_then(|s| s.run_as_group),
        "runAsGroup",
    )?;
    plan.run_as_non_root = csc
        .and_then(|s| s.run_as_non_root)
        .or(psc.and_then(|s| s.run_as_non_root))
        .unwrap_or(false);
    if let Some(psc) = psc {
        for (i, g) in psc
            .supplemental_groups
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            plan.supplemental_groups
                .push(id(&format!("{pf}.supplementalGroups[{i}]"), *g)?);
        }
        if let Some(g) = psc.fs_group {
            let g = id(&format!("{pf}.fsGroup"), g)?;
            if !plan.supplemental_groups.contains(&g) {
                plan.supplemental_groups.push(g);
            }
        }
    }
    let Some(sc) = csc else {
        plan.seccomp = match psc.and_then(|s| s.seccomp_profile.as_ref()) {
            Some(p) => seccomp(&format!("{pf}.seccompProfile"), p)?,
            None => Seccomp::Unset,
        };
        plan.apparmor = pod_apparmor(pf, psc, annotations, &c.name)?;
        if let Some(o) = psc.and_then(|s| s.se_linux_options.as_ref()) {
            plan.selinux = selinux_opts(&format!("{pf}.seLinuxOptions"), o)?;
        }
        return Ok(plan);
    };
    plan.privileged = sc.privileged.unwrap_or(false);
    // allowPrivilegeEscalation defaults to true; false (never with privileged or CAP_SYS_ADMIN,
    // which the API server rejects) sets no_new_privs.
    plan.no_new_privileges = sc.allow_privilege_escalation == Some(false) && !plan.privileged;
    if let Some(caps) = &sc.capabilities {
        for (i, cap) in caps.add.as_deref().unwrap_or_default().iter().enumerate() {
            plan.cap_add.push(normalise_capability(
                &format!("{f}.capabilities.add[{i}]"),
                cap,
            )?);
        }
        for (i, cap) in caps.drop.as_deref().unwrap_or_default().iter().enumerate() {
            plan.cap_drop.push(normalise_capability(
                &format!("{f}.capabilities.drop[{i}]"),
                cap,
            )?);
        }
    }
    plan.read_only_root = sc.read_only_root_filesystem.unwrap_or(false);
    plan.seccomp = match (
        &sc.seccomp_profile,
        psc.and_then(|s| s.seccomp_profile.as_ref()),
    ) {
        (Some(p), _) => seccomp(&format!("{f}.seccompProfile"), p)?,
        (None, Some(p)) => seccomp(&format!("{pf}.seccompProfile"), p)?,
        (None, None) => Seccomp::Unset,
    };
    plan.unmasked_proc = match sc.proc_mount.as_deref() {
        None | Some("Default") => false,
        Some("Unmasked") => true,
        Some(other) => {
            return Err(SpecError::new(
                format!("{f}.procMount"),
                format!("unknown value {other:?}"),
            ));
        }
    };
    plan.apparmor = match &sc.app_armor_profile {
        Some(p) => apparmor(&format!("{f}.appArmorProfile"), p)?,
        None => pod_apparmor(pf, psc, annotations, &c.name)?,
    };
    if sc.windows_options.is_some() {
        return Err(SpecError::new(
            format!("{f}.windowsOptions"),
            "Windows options cannot be honoured on a Linux device",
        ));
    }
    match (
        &sc.se_linux_options,
        psc.and_then(|s| s.se_linux_options.as_ref()),
    ) {
        (Some(o), _) => plan.selinux = selinux_opts(&format!("{f}.seLinuxOptions"), o)?,
        (None, Some(o)) => plan.selinux = selinux_opts(&format!("{pf}.seLinuxOptions"), o)?,
        _ => {}
    }
    Ok(plan)
}

fn pod_apparmor(
    pf: &str,
    psc: Option<&k8s::PodSecurityContext>,
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    container: &str,
) -> Result<AppArmor, SpecError> {
    if let Some(p) = psc.and_then(|s| s.app_armor_profile.as_ref()) {
        return apparmor(&format!("{pf}.appArmorProfile"), p);
    }
    // The annotation the API server still accepts (and mirrors into the field on create).
    let key = format!("container.apparmor.security.beta.kubernetes.io/{container}");
    match annotations.and_then(|a| a.get(&key)).map(String::as_str) {
        None | Some("unconfined") => Ok(AppArmor::Unconfined),
        Some("runtime/default") => apparmor(
            &format!("metadata.annotations[{key}]"),
            &k8s::AppArmorProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            },
        ),
        Some(v) => apparmor(
            &format!("metadata.annotations[{key}]"),
            &k8s::AppArmorProfile {
                type_: "Localhost".into(),
                localhost_profile: Some(v.trim_start_matches("localhost/").to_owned()),
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> k8s::PodSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn container_settings_override_the_pods() {
        let pod = spec(serde_json::json!({
            "securityContext": {"runAsUser": 1000, "runAsGroup": 3000, "fsGroup": 2000,
                "supplementalGroups": [4000], "runAsNonRoot": true,
                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "image": "i",
                "securityContext": {"runAsUser": 1001, "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"], "add": ["net_bind_service"]}}}]
        }));
        let p =
            parse_container_security("spec.containers[0]", &pod, None, &pod.containers[0]).unwrap();
        assert_eq!(p.run_as_user, Some(1001));
        assert_eq!(p.run_as_group, Some(3000));
        assert!(p.run_as_non_root && p.no_new_privileges && p.read_only_root);
        assert_eq!(p.supplemental_groups, vec![4000, 2000]);
        assert_eq!(p.cap_drop, vec!["ALL"]);
        assert_eq!(p.cap_add, vec!["CAP_NET_BIND_SERVICE"]);
        assert_eq!(p.seccomp, Seccomp::RuntimeDefault);
    }

    #[test]
    fn what_the_device_cannot_do_is_refused_by_field() {
        let pod = spec(serde_json::json!({
            "containers": [{"name": "c", "image": "i",
                "securityContext": {"capabilities": {"add": ["CAP_MAKE_COFFEE"]}}}]
        }));
        let e = parse_container_security("spec.containers[0]", &pod, None, &pod.containers[0])
            .unwrap_err();
        assert_eq!(
            e.field,
            "spec.containers[0].securityContext.capabilities.add[0]"
        );
        let e = parse_pod_security(
            Some(
                &serde_json::from_value(
                    serde_json::json!({"sysctls": [{"name": "kernel.panic", "value": "1"}]}),
                )
                .unwrap(),
            ),
            false,
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.securityContext.sysctls[0].name");
        if !selinux_enabled() {
            let pod = spec(serde_json::json!({
                "containers": [{"name": "c", "image": "i",
                    "securityContext": {"seLinuxOptions": {"level": "s0:c1"}}}]
            }));
            // Ignored without SELinux, as CRI runtimes ignore it.
            let plan =
                parse_container_security("spec.containers[0]", &pod, None, &pod.containers[0])
                    .expect("seLinuxOptions without SELinux");
            assert!(plan.selinux.is_empty());
        }
        if !apparmor_enabled() {
            let pod = spec(serde_json::json!({
                "containers": [{"name": "c", "image": "i",
                    "securityContext": {"appArmorProfile": {"type": "RuntimeDefault"}}}]
            }));
            let e = parse_container_security("spec.containers[0]", &pod, None, &pod.containers[0])
                .unwrap_err();
            assert_eq!(
                e.field,
                "spec.containers[0].securityContext.appArmorProfile"
            );
            assert!(e.message.contains("AppArmor is not enabled"), "{e}");
        }
    }

    #[test]
    fn namespaced_sysctls() {
        assert!(namespaced_sysctl("net.ipv4.tcp_syncookies"));
        assert!(namespaced_sysctl("kernel.shm_rmid_forced"));
        assert!(namespaced_sysctl("fs.mqueue.msg_max"));
        assert!(!namespaced_sysctl("kernel.panic"));
        assert!(!namespaced_sysctl("vm.swappiness"));
    }
}
