//! A container's securityContext mapped onto Podman's container spec.
//!
//! | Kubernetes | Podman (libpod SpecGenerator) |
//! | --- | --- |
//! | runAsUser / runAsGroup | `user` = "uid[:gid]" |
//! | supplementalGroups, fsGroup | `groups` |
//! | runAsNonRoot | checked against runAsUser or the image's USER before creation |
//! | capabilities.add / drop | `cap_add` / `cap_drop` (`CAP_*`, `ALL`) |
//! | privileged | `privileged` |
//! | allowPrivilegeEscalation: false | `no_new_privileges` |
//! | readOnlyRootFilesystem | `read_only_filesystem` (no writable tmpfs added, as in Kubernetes) |
//! | seccompProfile | `seccomp_profile_path`: "" (Podman's default profile), "unconfined", or a file under the profile root |
//! | procMount: Unmasked | `unmask` = ALL |
//! | sysctls | `sysctl` |
//! | appArmorProfile, seLinuxOptions | `apparmor_profile`, `selinux_opts` (AppArmor refused at parse time where the device lacks it; SELinux options ignored there, as CRI runtimes do) |

use std::path::Path;

use super::security::{AppArmor, Seccomp};
use super::spec::{ContainerPlan, PodPlan};
use crate::podman::ContainerCreate;

/// The kubelet's `format.Pod`: `name_namespace(uid)`.
fn pod_ref(plan: &PodPlan) -> String {
    format!(
        "{}_{}({})",
        plan.meta.name, plan.meta.namespace, plan.meta.uid
    )
}

/// The `user` to run as, after the kubelet's runAsNonRoot verification. `image_user` is the
/// image's USER ("" when it has none, which means root).
pub fn user(plan: &PodPlan, c: &ContainerPlan, image_user: &str) -> Result<Option<String>, String> {
    let sec = &c.security;
    let image_name = image_user.split(':').next().unwrap_or_default();
    if sec.run_as_non_root {
        match sec.run_as_user {
            Some(0) => {
                return Err(format!(
                    "container's runAsUser breaks non-root policy (pod: {:?}, container: {})",
                    pod_ref(plan),
                    c.name
                ));
            }
            Some(_) => {}
            None => match image_name.parse::<u32>() {
                Ok(0) => {
                    return Err(format!(
                        "container has runAsNonRoot and image will run as root (pod: {:?}, container: {})",
                        pod_ref(plan),
                        c.name
                    ));
                }
                Ok(_) => {}
                Err(_) if image_name.is_empty() => {
                    return Err(format!(
                        "container has runAsNonRoot and image will run as root (pod: {:?}, container: {})",
                        pod_ref(plan),
                        c.name
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "container has runAsNonRoot and image has non-numeric user ({image_name}), cannot verify user is non-root (pod: {:?}, container: {})",
                        pod_ref(plan),
                        c.name
                    ));
                }
            },
        }
    }
    Ok(match (sec.run_as_user, sec.run_as_group) {
        (Some(u), Some(g)) => Some(format!("{u}:{g}")),
        (Some(u), None) => Some(u.to_string()),
        (None, Some(g)) => Some(format!(
            "{}:{g}",
            if image_name.is_empty() {
                "0"
            } else {
                image_name
            }
        )),
        (None, None) => None,
    })
}

/// Fill the security fields of `spec` from the container's plan.
pub fn apply(
    plan: &PodPlan,
    c: &ContainerPlan,
    seccomp_root: &Path,
    spec: &mut ContainerCreate,
) -> Result<(), String> {
    let sec = &c.security;
    spec.groups = sec.supplemental_groups.iter().map(i64::to_string).collect();
    spec.privileged = sec.privileged;
    if !sec.privileged {
        spec.cap_add = sec.cap_add.clone();
        spec.cap_drop = sec.cap_drop.clone();
    }
    spec.no_new_privileges = sec.no_new_privileges;
    spec.read_only_filesystem = sec.read_only_root;
    spec.read_write_tmpfs = false;
    spec.seccomp_profile_path = match &sec.seccomp {
        _ if sec.privileged => "unconfined".into(),
        Seccomp::Unset | Seccomp::RuntimeDefault => String::new(),
        Seccomp::Unconfined => "unconfined".into(),
        Seccomp::Localhost(rel) => {
            let path = seccomp_root.join(rel);
            if !path.is_file() {
                return Err(format!(
                    "failed to generate seccomp profile: localhost profile {rel:?} not found at {}",
                    path.display()
                ));
            }
            path.to_string_lossy().into_owned()
        }
    };
    spec.apparmor_profile = match &sec.apparmor {
        AppArmor::Unconfined | AppArmor::RuntimeDefault => String::new(),
        AppArmor::Localhost(name) => name.clone(),
    };
    spec.selinux_opts = sec.selinux.iter().map(|o| format!("label={o}")).collect();
    if sec.unmasked_proc {
        spec.unmask = vec!["ALL".into()];
    }
    spec.sysctl = plan.security.sysctls.iter().cloned().collect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(spec: serde_json::Value) -> PodPlan {
        super::super::spec::parse_pod(
            serde_json::json!({"metadata": {"name": "p", "namespace": "ns", "uid": "u"}, "spec": spec})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn run_as_non_root_is_verified_like_the_kubelet() {
        let p = plan(
            serde_json::json!({"securityContext": {"runAsNonRoot": true},
            "containers": [{"name": "c", "image": "i"}]}),
        );
        let c = &p.containers[0];
        let e = user(&p, c, "").unwrap_err();
        assert_eq!(
            e,
            "container has runAsNonRoot and image will run as root (pod: \"p_ns(u)\", container: c)"
        );
        assert!(user(&p, c, "0:0").is_err());
        assert!(
            user(&p, c, "app")
                .unwrap_err()
                .contains("non-numeric user (app)")
        );
        assert_eq!(user(&p, c, "1000").unwrap(), None);
        let p = plan(
            serde_json::json!({"securityContext": {"runAsNonRoot": true, "runAsUser": 0},
            "containers": [{"name": "c", "image": "i"}]}),
        );
        assert!(
            user(&p, &p.containers[0], "1000")
                .unwrap_err()
                .contains("breaks non-root policy")
        );
        let p = plan(
            serde_json::json!({"securityContext": {"runAsUser": 1000, "runAsGroup": 2000},
            "containers": [{"name": "c", "image": "i"}]}),
        );
        assert_eq!(
            user(&p, &p.containers[0], "").unwrap().as_deref(),
            Some("1000:2000")
        );
    }

    #[test]
    fn restricted_profile_maps_onto_podman() {
        let p = plan(serde_json::json!({
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "fsGroup": 2000,
                "seccompProfile": {"type": "RuntimeDefault"},
                "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]},
            "containers": [{"name": "c", "image": "i", "securityContext": {
                "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}}]}));
        let mut spec = ContainerCreate::default();
        apply(&p, &p.containers[0], Path::new("/nonexistent"), &mut spec).unwrap();
        assert_eq!(spec.groups, vec!["2000"]);
        assert_eq!(spec.cap_drop, vec!["ALL"]);
        assert_eq!(spec.cap_add, vec!["CAP_NET_BIND_SERVICE"]);
        assert!(spec.no_new_privileges && spec.read_only_filesystem && !spec.privileged);
        assert_eq!(spec.seccomp_profile_path, "");
        assert_eq!(spec.sysctl["net.ipv4.ip_unprivileged_port_start"], "0");
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["no_new_privileges"], true);
        assert_eq!(json["read_only_filesystem"], true);
    }

    #[test]
    fn privileged_and_localhost_seccomp() {
        let p = plan(serde_json::json!({"containers": [
            {"name": "a", "image": "i", "securityContext": {"privileged": true}},
            {"name": "b", "image": "i", "securityContext": {"seccompProfile":
                {"type": "Localhost", "localhostProfile": "audit.json"}}}]}));
        let mut spec = ContainerCreate::default();
        apply(&p, &p.containers[0], Path::new("/x"), &mut spec).unwrap();
        assert!(spec.privileged);
        assert_eq!(spec.seccomp_profile_path, "unconfined");
        let d = tempfile::tempdir().unwrap();
        let mut spec = ContainerCreate::default();
        let e = apply(&p, &p.containers[1], d.path(), &mut spec).unwrap_err();
        assert!(e.contains("audit.json"), "{e}");
        std::fs::write(d.path().join("audit.json"), "{}").unwrap();
        apply(&p, &p.containers[1], d.path(), &mut spec).unwrap();
        assert_eq!(
            spec.seccomp_profile_path,
            d.path().join("audit.json").to_string_lossy()
        );
    }
}
