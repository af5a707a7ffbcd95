//! Pod volumes on the device: emptyDir, hostPath, and the volumes whose files the agent writes
//! (configMap, secret, downwardAPI, projected).
//!
//! Every pod gets `<state_dir>/pods/<uid>/volumes/<name>`; the `pods` tree is 0700, so nothing
//! on the device but root reaches a pod's files. As in the kubelet:
//!
//! - secret, downwardAPI and projected volumes, and emptyDir with `medium: Memory`, are tmpfs
//!   mounts: their data never reaches the device's disk;
//! - configMap, secret, downwardAPI and projected volumes are written with the atomic writer
//!   (a new timestamped directory and one atomic rename of `..data`) and mounted read-only;
//! - fsGroup makes the pod's emptyDir and written volumes group-owned by it (setgid
//!   directories, group read, and write where the volume is writable).
//!
//! Removing the pod unmounts and removes the whole tree, never following a link and never
//! descending into a filesystem still mounted there.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fleetlet_proto::v1::PodBundle;

use super::atomic_writer::{self, FileContent, Payload};
use super::downward::{self, Addresses};
use super::safefs;
use super::spec::{
    DownwardValue, HostPathType, KeyToPath, PodPlan, Projection, Resources, VolumePlan,
};

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
    /// The atomic writer or a safe mount failed. Retryable.
    #[error("volume {volume}: {source}")]
    Write {
        /// Volume name.
        volume: String,
        /// Cause.
        source: atomic_writer::WriteError,
    },
}

/// The mode of an emptyDir on tmpfs: tmpfs's own default (world-writable and sticky), which is
/// what the kubelet's mount without a `mode` option gives.
const EMPTY_DIR_TMPFS_MODE: u32 = 0o1777;

/// What the downward API and volume sizes read from the device.
#[derive(Debug, Clone, Copy)]
pub struct VolumeHost<'a> {
    /// Node allocatable (limits that are not set read as this).
    pub allocatable: Resources,
    /// Addresses.
    pub addresses: Addresses<'a>,
    /// The device policy's `host_path_prefixes`: when set, a hostPath is resolved below its
    /// prefix without following links out of it, and the checked inode is what gets mounted.
    pub host_path_prefixes: &'a [String],
}

/// The directory holding a pod's volumes.
pub fn pod_dir(state_dir: &Path, uid: &str) -> PathBuf {
    state_dir.join("pods").join(uid)
}

/// The directory of one volume.
pub fn volume_dir(state_dir: &Path, uid: &str, volume: &str) -> PathBuf {
    pod_dir(state_dir, uid).join("volumes").join(volume)
}

/// Create (or refresh) every volume of `plan`; idempotent. Returns the host path to bind for
/// each volume. `written` remembers, per written volume, a fingerprint of what it last got: the
/// worker calls this on every pass (probes included), and a volume whose payload did not change
/// is not read back and compared again as long as it is still there.
pub fn prepare(
    state_dir: &Path,
    plan: &PodPlan,
    bundle: &PodBundle,
    host: VolumeHost<'_>,
    written: &mut BTreeMap<String, u64>,
) -> Result<BTreeMap<String, PathBuf>, VolumeError> {
    let pods = state_dir.join("pods");
    let mut out = BTreeMap::new();
    let fs_group = plan.security.fs_group;
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
        let safe = |path: &Path| {
            let volume = name.clone();
            let path = path.to_owned();
            move |e: safefs::SafeFsError| VolumeError::Io {
                volume,
                path,
                source: std::io::Error::other(e.to_string()),
            }
        };
        mkdir(&pods, 0o700).map_err(io(&pods))?;
        let dir = volume_dir(state_dir, &plan.meta.uid, &name);
        match v {
            VolumePlan::EmptyDir {
                memory, size_limit, ..
            } => {
                let fresh = !dir.exists();
                if *memory {
                    let size = memory_volume_size(plan, *size_limit);
                    // A tmpfs root is 1777 as the kubelet mounts it (no mode option): the
                    // sticky bit shows in the volume and in the subPath directories made in it.
                    safefs::mount_tmpfs(&dir, EMPTY_DIR_TMPFS_MODE, size).map_err(safe(&dir))?;
                } else {
                    mkdir(&dir, 0o777).map_err(io(&dir))?;
                }
                if fresh || *memory && std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_none())
                {
                    // emptyDir is world-writable in Kubernetes; umask would strip that.
                    let mut mode = if *memory { EMPTY_DIR_TMPFS_MODE } else { 0o777 };
                    if let Some(g) = fs_group {
                        chown_group(&dir, g).map_err(io(&dir))?;
                        mode |= 0o2000;
                    }
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                        .map_err(io(&dir))?;
                }
                out.insert(name, dir);
            }
            VolumePlan::HostPath { path, kind, .. } => {
                let p = PathBuf::from(path);
                check_host_path(&p, *kind).map_err(|message| VolumeError::Missing {
                    volume: name.clone(),
                    message,
                })?;
                let p = match pin_host_path(
                    &p,
                    host.host_path_prefixes,
                    &pod_dir(state_dir, &plan.meta.uid),
                    &name,
                ) {
                    Ok(pinned) => pinned,
                    Err(message) => {
                        return Err(VolumeError::Missing {
                            volume: name,
                            message,
                        });
                    }
                };
                out.insert(name, p);
            }
            // Podman mounts the image itself (the worker pulls it before each container that
            // mounts it is created): nothing on the device's disk to prepare.
            VolumePlan::Image { .. } => {}
            VolumePlan::Projected {
                sources,
                default_mode,
                kind,
                ..
            } => {
                let payload = payload(&name, kind, sources, *default_mode, plan, bundle, host)?;
                let fingerprint = {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    (&payload, fs_group).hash(&mut h);
                    h.finish()
                };
                let present = if v.memory_backed() {
                    safefs::is_tmpfs(&dir)
                } else {
                    std::fs::symlink_metadata(dir.join("..data")).is_ok()
                };
                if present && written.get(&name) == Some(&fingerprint) {
                    out.insert(name, dir);
                    continue;
                }
                if v.memory_backed() {
                    // Sized for what the agent writes, with room for an update beside it.
                    let bytes: usize = payload.values().map(|f| f.data.len() + 4096).sum();
                    let size = (bytes as u64 * 2).max(1 << 20);
                    safefs::mount_tmpfs(&dir, 0o755, Some(size)).map_err(safe(&dir))?;
                } else {
                    mkdir(&dir, 0o755).map_err(io(&dir))?;
                }
                let meta = std::fs::metadata(&dir).map_err(io(&dir))?;
                let mut mode = 0o755;
                if let Some(g) = fs_group {
                    if meta.gid() != g {
                        chown_group(&dir, g).map_err(io(&dir))?;
                    }
                    mode |= 0o2550;
                }
                if meta.mode() & 0o7777 != mode {
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                        .map_err(io(&dir))?;
                }
                atomic_writer::write(&dir, &payload, fs_group).map_err(|source| {
                    VolumeError::Write {
                        volume: name.clone(),
                        source,
                    }
                })?;
                written.insert(name.clone(), fingerprint);
                out.insert(name, dir);
            }
        }
    }
    Ok(out)
}

/// Under a `host_path_prefixes` policy: resolve `path` below the prefix it names, one
/// component at a time without following a link out of it, and bind-mount the inode found at
/// `<pod_dir>/volume-hostpaths/<volume>` (kept while it is mounted). Without the policy the
/// path is used as it is, as the kubelet does.
fn pin_host_path(
    path: &Path,
    prefixes: &[String],
    pod_dir: &Path,
    volume: &str,
) -> Result<PathBuf, String> {
    if prefixes.is_empty() {
        return Ok(path.to_owned());
    }
    let Some((prefix, rel)) = prefixes.iter().find_map(|p| {
        path.strip_prefix(p)
            .ok()
            .map(|rel| (Path::new(p), rel.to_string_lossy().into_owned()))
    }) else {
        return Err(format!(
            "hostPath {} is outside the device policy's host_path_prefixes",
            path.display()
        ));
    };
    let target = pod_dir.join("volume-hostpaths").join(volume);
    if safefs::is_mount_point(&target) {
        return Ok(target);
    }
    let root = safefs::open_root(prefix).map_err(|e| e.to_string())?;
    let fd = safefs::resolve_beneath(&root, prefix, &rel, None).map_err(|e| {
        format!(
            "hostPath {}: {e} (device policy host_path_prefixes)",
            path.display()
        )
    })?;
    if safefs::is_dir(&fd) {
        mkdir(&target, 0o700).map_err(|e| e.to_string())?;
    } else {
        if let Some(parent) = target.parent() {
            mkdir(parent, 0o700).map_err(|e| e.to_string())?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&target)
            .map_err(|e| e.to_string())?;
    }
    safefs::bind_fd(&fd, &target).map_err(|e| e.to_string())?;
    Ok(target)
}

/// The kubelet's hostPath type check (and creation for the *OrCreate types).
fn check_host_path(p: &Path, kind: HostPathType) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let path = p.display();
    let meta = std::fs::metadata(p);
    let fail = |what: &str| {
        Err(format!(
            "hostPath type check failed: {path} is not a {what}"
        ))
    };
    match kind {
        HostPathType::Unchecked => Ok(()),
        HostPathType::DirectoryOrCreate if meta.is_err() => {
            mkdir(p, 0o755).map_err(|e| format!("hostPath {path}: cannot create directory: {e}"))
        }
        HostPathType::FileOrCreate if meta.is_err() => {
            if let Some(parent) = p.parent() {
                mkdir(parent, 0o755)
                    .map_err(|e| format!("hostPath {path}: cannot create directory: {e}"))?;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(p)
                .map(|_| ())
                .map_err(|e| format!("hostPath {path}: cannot create file: {e}"))
        }
        _ => {
            let Ok(m) = meta else {
                return Err(format!("hostPath {path} does not exist"));
            };
            let t = m.file_type();
            match kind {
                HostPathType::DirectoryOrCreate | HostPathType::Directory if !t.is_dir() => {
                    fail("directory")
                }
                HostPathType::FileOrCreate | HostPathType::File if !t.is_file() => fail("file"),
                HostPathType::Socket if !t.is_socket() => fail("socket file"),
                HostPathType::CharDevice if !t.is_char_device() => fail("character device"),
                HostPathType::BlockDevice if !t.is_block_device() => fail("block device"),
                _ => Ok(()),
            }
        }
    }
}

/// tmpfs size of a memory emptyDir: its sizeLimit, capped by the pod's memory limit when every
/// container has one (the kubelet's sizing of memory-backed volumes); unset otherwise (the
/// kernel's default, half the memory, and the container's memory cgroup is charged either way).
fn memory_volume_size(plan: &PodPlan, size_limit: Option<u64>) -> Option<u64> {
    let pod_limit = plan
        .containers
        .iter()
        .map(|c| c.limits.map(|l| l.memory_bytes).filter(|m| *m > 0))
        .sum::<Option<u64>>();
    match (size_limit, pod_limit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn chown_group(dir: &Path, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, None, Some(gid))
}

/// The files of a written volume.
fn payload(
    volume: &str,
    kind: &str,
    sources: &[Projection],
    default_mode: u32,
    plan: &PodPlan,
    bundle: &PodBundle,
    host: VolumeHost<'_>,
) -> Result<Payload, VolumeError> {
    let mut out = Payload::new();
    let missing = |message: String| VolumeError::Missing {
        volume: volume.to_owned(),
        message,
    };
    for src in sources {
        match src {
            Projection::Object {
                secret,
                source,
                items,
                optional,
            } => {
                let what = if *secret { "secret" } else { "configmap" };
                let Some(data) = lookup(bundle, *secret, source) else {
                    if *optional {
                        continue;
                    }
                    return Err(missing(format!("{what} {source:?} not found")));
                };
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
                        return Err(missing(format!(
                            "{what} {source:?} has no key {:?} ({kind} volume)",
                            f.key
                        )));
                    };
                    out.insert(
                        f.path.clone(),
                        FileContent {
                            data: content.clone(),
                            mode: f.mode.unwrap_or(default_mode),
                        },
                    );
                }
            }
            Projection::Downward(files) => {
                for f in files {
                    let value = match &f.value {
                        DownwardValue::Field(r) => downward::field_value(plan, r, host.addresses),
                        DownwardValue::Resource(r) => {
                            downward::resource_value(plan, r, host.allocatable)
                        }
                    };
                    out.insert(
                        f.path.clone(),
                        FileContent {
                            data: value.into_bytes(),
                            mode: f.mode.unwrap_or(default_mode),
                        },
                    );
                }
            }
        }
    }
    // A file path may not be a prefix directory of another (the API server checks this for a
    // projected volume; a conflict from two sources is resolved here by refusing).
    let paths: BTreeSet<&str> = out.keys().map(String::as_str).collect();
    for p in &paths {
        if let Some(other) = paths.iter().find(|o| o.starts_with(&format!("{p}/"))) {
            return Err(missing(format!(
                "file {p:?} conflicts with {other:?} in the same volume"
            )));
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

/// Remove a pod's volume tree (secrets included): unmount what the agent mounted there (tmpfs
/// volumes, pinned subPaths), then remove the files without following links or crossing into
/// another filesystem.
pub fn remove(state_dir: &Path, uid: &str) -> Result<(), safefs::SafeFsError> {
    safefs::remove_tree(&pod_dir(state_dir, uid))
}

/// Bytes a directory tree takes on disk (allocated blocks, as `du`), not following links and
/// not crossing into other filesystems; bounded to one million entries.
pub fn disk_usage(dir: &Path) -> u64 {
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let mut total = 0u64;
    let mut stack = vec![dir.to_owned()];
    let mut seen = 0usize;
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            seen += 1;
            if seen > 1_000_000 {
                return total;
            }
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.dev() != top.dev() {
                continue;
            }
            total = total.saturating_add(m.blocks() * 512);
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
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

    fn host() -> VolumeHost<'static> {
        VolumeHost {
            allocatable: Resources {
                cpu_millis: 2000,
                memory_bytes: 1 << 30,
            },
            addresses: Addresses {
                host_ip: "192.0.2.1",
                pod_ip: "",
            },
            host_path_prefixes: &[],
        }
    }

    #[test]
    fn host_path_types_are_checked_and_created() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("file");
        std::fs::write(&f, "x").unwrap();
        assert!(check_host_path(&f, HostPathType::File).is_ok());
        assert_eq!(
            check_host_path(&f, HostPathType::Directory).unwrap_err(),
            format!(
                "hostPath type check failed: {} is not a directory",
                f.display()
            )
        );
        let made = d.path().join("new/f");
        check_host_path(&made, HostPathType::FileOrCreate).unwrap();
        assert!(made.is_file());
        assert!(check_host_path(&d.path().join("missing"), HostPathType::Socket).is_err());
    }

    #[test]
    fn host_paths_under_a_prefix_policy_do_not_follow_links_out() {
        let d = tempfile::tempdir().unwrap();
        let prefix = d.path().join("srv");
        std::fs::create_dir_all(prefix.join("data")).unwrap();
        std::os::unix::fs::symlink("/etc", prefix.join("link")).unwrap();
        let prefixes = [prefix.to_string_lossy().into_owned()];
        let e =
            pin_host_path(&prefix.join("link"), &prefixes, &d.path().join("pod"), "h").unwrap_err();
        assert!(e.contains("outside"), "{e}");
        let e =
            pin_host_path(Path::new("/etc"), &prefixes, &d.path().join("pod"), "h").unwrap_err();
        assert!(e.contains("outside"), "{e}");
    }

    #[test]
    fn configmap_items_downward_and_projected_files() {
        let d = tempfile::tempdir().unwrap();
        let plan = crate::pod::spec::parse_pod(
            serde_json::json!({
                "metadata": {"name": "p", "uid": "u1", "labels": {"app": "web"}},
                "spec": {
                    "volumes": [
                        {"name": "c", "configMap": {"name": "cm", "items": [{"key": "a", "path": "sub/x", "mode": 0o600}]}},
                        {"name": "d", "downwardAPI": {"items": [
                            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                            {"path": "cpu", "resourceFieldRef": {"containerName": "c", "resource": "limits.cpu", "divisor": "1m"}}]}},
                        {"name": "e", "emptyDir": {}}
                    ],
                    "containers": [{"name": "c", "image": "i:1",
                        "volumeMounts": [{"name": "c", "mountPath": "/c"}]}]
                }
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert!(
            plan.containers[0].mounts[0].read_only,
            "configMap mounts are read-only"
        );
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
            service_env: Default::default(),
        };
        // downwardAPI volumes are tmpfs mounts: only root can mount, so this unit test covers
        // the configMap part where it cannot.
        match prepare(d.path(), &plan, &bundle, host(), &mut BTreeMap::new()) {
            Ok(v) => {
                let c = &v["c"];
                assert_eq!(std::fs::read_to_string(c.join("sub/x")).unwrap(), "A");
                assert!(!c.join("b").exists());
                let dv = &v["d"];
                assert_eq!(
                    std::fs::read_to_string(dv.join("labels")).unwrap(),
                    "app=\"web\""
                );
                assert_eq!(std::fs::read_to_string(dv.join("cpu")).unwrap(), "2000");
                assert!(safefs::is_tmpfs(dv));
                remove(d.path(), "u1").unwrap();
                assert!(!pod_dir(d.path(), "u1").exists());
            }
            Err(e) => assert!(e.to_string().contains("mount tmpfs"), "{e}"),
        }
    }
}
