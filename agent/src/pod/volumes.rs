//! Pod volumes on the device: emptyDir, hostPath, configMap and secret.
//!
//! Every pod gets `<state_dir>/pods/<uid>/volumes/<name>`; the `pods` tree is 0700 and secret
//! files never carry world permission bits. Removing the pod removes the whole tree.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fleetlet_proto::v1::PodBundle;

use super::spec::{KeyToPath, PodPlan, VolumePlan};
use crate::fsutil;

/// A volume ready to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// Bind-mount this host path.
    Bind(PathBuf),
    /// A fresh tmpfs (emptyDir medium Memory).
    Tmpfs,
}

/// Why a volume could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A referenced ConfigMap/Secret or key is missing (not optional). Retried on the next
    /// snapshot or resync.
    #[error("volume {volume}: {message}")]
    Missing {
        /// Volume name.
        volume: String,
        /// What is missing.
        message: String,
    },
    /// Filesystem error. Retryable.
    #[error("volume {volume} at {path}: {source}")]
    Io {
        /// Volume name.
        volume: String,
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// The directory holding a pod's volumes.
pub fn pod_dir(state_dir: &Path, uid: &str) -> PathBuf {
    state_dir.join("pods").join(uid)
}

/// Create (or refresh) every volume of `plan`; idempotent.
pub fn prepare(
    state_dir: &Path,
    plan: &PodPlan,
    bundle: &PodBundle,
) -> Result<BTreeMap<String, Prepared>, VolumeError> {
    let pods = state_dir.join("pods");
    let base = pod_dir(state_dir, &plan.meta.uid).join("volumes");
    let mut out = BTreeMap::new();
    for v in &plan.volumes {
        let name = v.name().to_owned();
        let io = |path: &Path| {
            let volume = name.clone();
            let path = path.to_owned();
            move |source| VolumeError::Io {
                volume,
                path,
                source,
            }
        };
        mkdir(&pods, 0o700).map_err(io(&pods))?;
        match v {
            VolumePlan::EmptyDir { memory: true, .. } => {
                out.insert(name, Prepared::Tmpfs);
            }
            VolumePlan::EmptyDir { .. } => {
                let dir = base.join(&name);
                mkdir(&dir, 0o777).map_err(io(&dir))?;
                // emptyDir is world-writable in Kubernetes; umask would strip that.
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
                    .map_err(io(&dir))?;
                out.insert(name, Prepared::Bind(dir));
            }
            VolumePlan::HostPath {
                path, create_dir, ..
            } => {
                let p = PathBuf::from(path);
                if *create_dir {
                    mkdir(&p, 0o755).map_err(io(&p))?;
                } else if !p.exists() {
                    return Err(VolumeError::Missing {
                        volume: name,
                        message: format!("hostPath {path} does not exist"),
                    });
                }
                out.insert(name, Prepared::Bind(p));
            }
            VolumePlan::Files {
                secret,
                source,
                items,
                default_mode,
                optional,
                ..
            } => {
                let data = lookup(bundle, *secret, source);
                let kind = if *secret { "Secret" } else { "ConfigMap" };
                let Some(data) = data.or_else(|| optional.then(BTreeMap::new)) else {
                    return Err(VolumeError::Missing {
                        volume: name,
                        message: format!("{kind} {source:?} not found"),
                    });
                };
                let dir = base.join(&name);
                mkdir(&dir, if *secret { 0o750 } else { 0o755 }).map_err(io(&dir))?;
                let files: Vec<KeyToPath> = if items.is_empty() {
                    data.keys()
                        .map(|k| KeyToPath {
                            key: k.clone(),
                            path: k.clone(),
                            mode: None,
                        })
                        .collect()
                } else {
                    items.clone()
                };
                for f in files {
                    let Some(content) = data.get(&f.key) else {
                        if *optional {
                            continue;
                        }
                        return Err(VolumeError::Missing {
                            volume: name,
                            message: format!("{kind} {source:?} has no key {:?}", f.key),
                        });
                    };
                    let mut mode = f.mode.unwrap_or(*default_mode);
                    if *secret {
                        // Secrets are never world-readable on the device, whatever the mode says.
                        mode &= 0o770;
                    }
                    let path = dir.join(&f.path);
                    if let Some(parent) = path.parent() {
                        mkdir(parent, 0o755).map_err(io(parent))?;
                    }
                    let same = std::fs::read(&path).is_ok_and(|old| old == *content)
                        && std::fs::metadata(&path)
                            .is_ok_and(|m| m.permissions().mode() & 0o777 == mode);
                    if !same {
                        fsutil::atomic_write(&path, content, mode).map_err(io(&path))?;
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                            .map_err(io(&path))?;
                    }
                }
                out.insert(name, Prepared::Bind(dir));
            }
        }
    }
    Ok(out)
}

/// The data of a ConfigMap (`secret == false`) or Secret from the bundle.
pub fn lookup(bundle: &PodBundle, secret: bool, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
    if secret {
        bundle.secrets.iter().find(|s| s.name == name).map(|s| {
            s.data
                .iter()
                .map(|(k, v)| (k.clone(), v.to_vec()))
                .collect()
        })
    } else {
        bundle.config_maps.iter().find(|c| c.name == name).map(|c| {
            c.data
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                .chain(c.binary_data.iter().map(|(k, v)| (k.clone(), v.to_vec())))
                .collect()
        })
    }
}

/// Remove a pod's volume tree (secrets included).
pub fn remove(state_dir: &Path, uid: &str) -> std::io::Result<()> {
    match std::fs::remove_dir_all(pod_dir(state_dir, uid)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn mkdir(p: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlet_proto::v1::{ConfigMapData, SecretData};

    #[test]
    fn secret_files_are_never_world_readable_and_items_select_keys() {
        let d = tempfile::tempdir().unwrap();
        let plan = crate::pod::spec::parse_pod(
            serde_json::json!({
                "metadata": {"name": "p", "uid": "u1"},
                "spec": {
                    "volumes": [
                        {"name": "s", "secret": {"secretName": "sec", "defaultMode": 0o644}},
                        {"name": "c", "configMap": {"name": "cm", "items": [{"key": "a", "path": "sub/x", "mode": 0o600}]}},
                        {"name": "e", "emptyDir": {}}
                    ],
                    "containers": [{"name": "c", "image": "i:1"}]
                }
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let bundle = PodBundle {
            pod_json: Default::default(),
            config_maps: vec![ConfigMapData {
                name: "cm".into(),
                data: [("a".to_string(), "A".to_string()), ("b".into(), "B".into())].into(),
                binary_data: Default::default(),
            }],
            secrets: vec![SecretData {
                name: "sec".into(),
                data: [("token".to_string(), bytes::Bytes::from_static(b"hunter2"))].into(),
                ..Default::default()
            }],
        };
        let v = prepare(d.path(), &plan, &bundle).unwrap();
        let Prepared::Bind(s) = &v["s"] else { panic!() };
        let mode = std::fs::metadata(s.join("token"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o640);
        let Prepared::Bind(c) = &v["c"] else { panic!() };
        assert_eq!(std::fs::read_to_string(c.join("sub/x")).unwrap(), "A");
        assert!(!c.join("b").exists());
        remove(d.path(), "u1").unwrap();
        assert!(!pod_dir(d.path(), "u1").exists());
    }
}
