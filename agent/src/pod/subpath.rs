//! subPath mounts, made safe the way the kubelet makes them (pkg/volume/util/subpath).
//!
//! A subPath names a path inside a volume that a container (an init container, another app
//! container) may have written: any component can be a symlink meant to point the mount at the
//! device's root filesystem. The agent resolves the subPath component by component below the
//! volume root without letting the kernel follow links ([`safefs::resolve_beneath`]), then
//! bind-mounts the descriptor it holds onto a private path under the pod's directory
//! (`volume-subpaths/<volume>/<container>/<mount index>`), and hands Podman that path. What is
//! mounted is the inode that was checked, whatever the container does to the path afterwards.
//! The private mount is made again before every start of the container (a reboot drops it).

use std::path::{Path, PathBuf};

use rustix::fs::Mode;

use super::safefs::{self, SafeFsError};

/// Where a pod's subPath mounts are pinned.
pub fn subpaths_dir(pod_dir: &Path) -> PathBuf {
    pod_dir.join("volume-subpaths")
}

/// Resolve `sub_path` inside `volume_root` and pin it at the mount's private path; returns that
/// path. Missing directories on the way are created (mode 0755 before umask, as the kubelet
/// does), never through a link.
pub fn prepare(
    volume_root: &Path,
    sub_path: &str,
    pod_dir: &Path,
    volume: &str,
    container: &str,
    index: usize,
) -> Result<PathBuf, SafeFsError> {
    let root = safefs::open_root(volume_root)?;
    // Missing directories get the volume root's mode (an emptyDir's 0777, with setgid under an
    // fsGroup), as the kubelet creates them, so the pod's users can write where they could.
    let mode = rustix::fs::fstat(&root).map_or(0o755, |st| st.st_mode & 0o7777);
    let fd = safefs::resolve_beneath(
        &root,
        volume_root,
        sub_path,
        Some(Mode::from_raw_mode(mode)),
    )?;
    let target = subpaths_dir(pod_dir)
        .join(volume)
        .join(container)
        .join(index.to_string());
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| SafeFsError::Io {
            op: "mkdir",
            path: p.to_owned(),
            source,
        })
    };
    // A pin from an earlier start goes: the subPath is resolved anew for every run, as the
    // kubelet does for every new container.
    if safefs::is_mount_point(&target) {
        safefs::unmount_all_under(&target)?;
    }
    let is_dir = safefs::is_dir(&fd);
    match std::fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() == is_dir => {}
        Ok(_) => {
            safefs::remove_tree(&target)?;
        }
        Err(_) => {}
    }
    if is_dir {
        mkdir(&target)?;
    } else {
        if let Some(parent) = target.parent() {
            mkdir(parent)?;
        }
        if std::fs::symlink_metadata(&target).is_err() {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&target)
                .map_err(|source| SafeFsError::Io {
                    op: "create",
                    path: target.clone(),
                    source,
                })?;
        }
    }
    safefs::bind_fd(&fd, &target)?;
    Ok(target)
}

/// Expand `$(VAR)` in a subPathExpr from the container's environment, as the kubelet does (a
/// reference to an unknown variable stays as written); the result must stay relative without
/// `..`.
pub fn expand_expr(
    expr: &str,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<String, String> {
    let out = super::worker::expand(expr, env);
    if out.starts_with('/') || out.split('/').any(|c| c == "..") {
        return Err(format!(
            "subPathExpr {expr:?} expands to {out:?}, which is not a relative path inside the volume"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_expand_and_stay_inside() {
        let env = std::collections::BTreeMap::from([
            ("POD".to_string(), "web-0".to_string()),
            ("UP".to_string(), "..".to_string()),
        ]);
        assert_eq!(expand_expr("logs/$(POD)", &env).unwrap(), "logs/web-0");
        assert_eq!(expand_expr("$(NOPE)x", &env).unwrap(), "$(NOPE)x");
        assert!(expand_expr("$(UP)/etc", &env).is_err());
    }
}
