//! File operations inside trees a container can write to, done relative to open directory
//! descriptors and never following a symlink the kernel would resolve for us.
//!
//! A pod's volumes are shared with its containers. Anything the agent does there as root must
//! assume that a container has planted symlinks to make the agent act outside the volume (the
//! attacks behind CVE-2017-1002101 and CVE-2021-25741 against the kubelet). Every path below a
//! volume root is therefore walked one component at a time with `openat(O_NOFOLLOW)`; symlinks
//! met on the way are interpreted by this module, within the root, and a walk that would leave
//! the root fails. The result is a file descriptor, so a later swap of a component for a
//! symlink cannot redirect what the agent already holds; `bind_fd` mounts exactly that inode.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// Symlinks followed in one walk before giving up, as Linux's ELOOP limit.
const MAX_LINKS: usize = 40;

/// `f_type` of tmpfs in `statfs`.
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// Why a safe file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SafeFsError {
    /// The path leaves its root (through `..` or a symlink). Not retryable: the volume's
    /// content (or the spec) must change.
    #[error("{path:?} resolves outside of {root}")]
    Escapes {
        /// Root the walk was confined to.
        root: PathBuf,
        /// The relative path asked for.
        path: String,
    },
    /// A component that must be a directory is not one. Not retryable.
    #[error("{path:?} under {root}: {component:?} is not a directory")]
    NotDirectory {
        /// Root of the walk.
        root: PathBuf,
        /// The relative path asked for.
        path: String,
        /// The offending component.
        component: String,
    },
    /// Too many symlinks. Not retryable.
    #[error("{path:?} under {root}: too many levels of symbolic links")]
    Loop {
        /// Root of the walk.
        root: PathBuf,
        /// The relative path asked for.
        path: String,
    },
    /// A system call failed. Retryable unless the cause persists.
    #[error("{op} {path}: {source}")]
    Io {
        /// Operation, e.g. "openat".
        op: &'static str,
        /// Path the operation was about.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(Errno) -> SafeFsError {
    let path = path.into();
    move |e| SafeFsError::Io {
        op,
        path,
        source: e.into(),
    }
}

/// Open a directory the agent owns (following links in `path` itself is fine: it is not
/// reachable by any container) as an `O_PATH` descriptor to walk from.
pub fn open_root(path: &Path) -> Result<OwnedFd, SafeFsError> {
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io("open", path))
}

/// Open `name` in `dir` without following it if it is a symlink.
fn open_nofollow(dir: impl AsFd, name: &OsStr, flags: OFlags) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn file_type(fd: impl AsFd) -> Result<FileType, Errno> {
    Ok(FileType::from_raw_mode(rustix::fs::fstat(fd)?.st_mode))
}

/// Resolve `rel` below `root` (an `O_PATH` directory descriptor) one component at a time. A
/// symlink on the way is read and followed by this function only while it stays below the
/// root: an absolute target or a `..` above the root fails with [`SafeFsError::Escapes`], as
/// the kubelet refuses a subPath that leaves its volume. With `create`, missing directories are
/// made (mode `dir_mode`) with `mkdirat`, which never follows a link. Returns an `O_PATH`
/// descriptor of the object found.
pub fn resolve_beneath(
    root: &OwnedFd,
    root_path: &Path,
    rel: &str,
    create: Option<Mode>,
) -> Result<OwnedFd, SafeFsError> {
    let escapes = || SafeFsError::Escapes {
        root: root_path.to_owned(),
        path: rel.to_owned(),
    };
    if rel.starts_with('/') {
        return Err(escapes());
    }
    let mut stack: Vec<OwnedFd> = vec![root.try_clone().map_err(|e| SafeFsError::Io {
        op: "dup",
        path: root_path.to_owned(),
        source: e,
    })?];
    let mut pending: VecDeque<Vec<u8>> = split(rel.as_bytes());
    let mut links = 0;
    while let Some(comp) = pending.pop_front() {
        match comp.as_slice() {
            b"" | b"." => continue,
            b".." => {
                if stack.len() == 1 {
                    return Err(escapes());
                }
                stack.pop();
                continue;
            }
            _ => {}
        }
        let name = OsStr::from_bytes(&comp);
        let here = || root_path.join(String::from_utf8_lossy(&comp).as_ref());
        let Some(parent) = stack.last() else {
            return Err(escapes());
        };
        let fd = match open_nofollow(parent, name, OFlags::PATH) {
            Err(Errno::NOENT) if create.is_some() => {
                let mode = create.unwrap_or(Mode::from_raw_mode(0o755));
                match rustix::fs::mkdirat(parent, name, mode) {
                    Ok(()) => {
                        // The mode exactly, not what the umask leaves of it (the kubelet's
                        // SafeMakeDir chmods too): set through a descriptor of the new
                        // directory itself, never through a path a link could redirect.
                        let dir = open_nofollow(parent, name, OFlags::RDONLY | OFlags::DIRECTORY)
                            .map_err(io("openat", here()))?;
                        rustix::fs::fchmod(&dir, mode).map_err(io("fchmod", here()))?;
                    }
                    Err(Errno::EXIST) => {}
                    Err(e) => return Err(io("mkdirat", here())(e)),
                }
                open_nofollow(parent, name, OFlags::PATH).map_err(io("openat", here()))?
            }
            r => r.map_err(io("openat", here()))?,
        };
        let ft = file_type(&fd).map_err(io("fstat", here()))?;
        if ft == FileType::Symlink {
            links += 1;
            if links > MAX_LINKS {
                return Err(SafeFsError::Loop {
                    root: root_path.to_owned(),
                    path: rel.to_owned(),
                });
            }
            let target =
                rustix::fs::readlinkat(&fd, "", Vec::new()).map_err(io("readlinkat", here()))?;
            let target = target.as_bytes();
            if target.starts_with(b"/") {
                return Err(escapes());
            }
            for c in split(target).into_iter().rev() {
                pending.push_front(c);
            }
            continue;
        }
        if !pending.is_empty() && ft != FileType::Directory {
            return Err(SafeFsError::NotDirectory {
                root: root_path.to_owned(),
                path: rel.to_owned(),
                component: String::from_utf8_lossy(&comp).into_owned(),
            });
        }
        stack.push(fd);
    }
    stack.pop().ok_or_else(escapes)
}

fn split(p: &[u8]) -> VecDeque<Vec<u8>> {
    p.split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Whether the descriptor is a directory.
pub fn is_dir(fd: impl AsFd) -> bool {
    file_type(fd).is_ok_and(|t| t == FileType::Directory)
}

/// Bind-mount the object behind `fd` onto `target` (which must exist and be of the same kind).
/// The kernel resolves `/proc/self/fd/N` to the very inode the descriptor holds, so nothing a
/// container does to the path afterwards changes what is mounted.
pub fn bind_fd(fd: &OwnedFd, target: &Path) -> Result<(), SafeFsError> {
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::mount::mount_bind(source.as_str(), target).map_err(io("mount --bind", target))
}

/// Whether `path` is the root of a mount (its device differs from its parent's).
pub fn is_mount_point(path: &Path) -> bool {
    let Some(parent) = path.parent() else {
        return true;
    };
    let stat = |p: &Path| rustix::fs::lstat(p).map(|s| s.st_dev);
    matches!((stat(path), stat(parent)), (Ok(a), Ok(b)) if a != b)
}

/// Whether `path` is a mounted tmpfs.
pub fn is_tmpfs(path: &Path) -> bool {
    is_mount_point(path) && rustix::fs::statfs(path).is_ok_and(|s| s.f_type as u64 == TMPFS_MAGIC)
}

/// Mount a tmpfs on `dir` (made if missing) with the given mode and size, unless one is there.
pub fn mount_tmpfs(dir: &Path, mode: u32, size_bytes: Option<u64>) -> Result<(), SafeFsError> {
    if is_tmpfs(dir) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|source| SafeFsError::Io {
        op: "mkdir",
        path: dir.to_owned(),
        source,
    })?;
    let mut data = format!("mode={mode:o}");
    if let Some(size) = size_bytes {
        data.push_str(&format!(",size={size}"));
    }
    let data = std::ffi::CString::new(data).map_err(|e| SafeFsError::Io {
        op: "mount tmpfs",
        path: dir.to_owned(),
        source: std::io::Error::other(e),
    })?;
    use rustix::mount::MountFlags;
    rustix::mount::mount(
        "tmpfs",
        dir,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        data.as_c_str(),
    )
    .map_err(io("mount tmpfs", dir))
}

/// Every mount point at or below `dir`, deepest first (from /proc/self/mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmount everything mounted at or below `dir` (lazily, so a busy mount cannot wedge pod
/// removal). Called before the tree is removed: deleting through a bind mount would delete
/// the files of the volume (or host path) behind it.
pub fn unmount_all_under(dir: &Path) -> Result<(), SafeFsError> {
    for m in mounts_under(dir) {
        match rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH) {
            Ok(()) | Err(Errno::INVAL) | Err(Errno::NOENT) => {}
            Err(e) => return Err(io("umount", m)(e)),
        }
    }
    Ok(())
}

/// Remove `name` in `dir` recursively without following symlinks and without crossing into
/// another filesystem: a directory on another device (a mount left behind) stops the removal
/// with an error instead of emptying whatever is mounted there.
pub fn remove_tree_at(dir: &OwnedFd, dir_path: &Path, name: &OsStr) -> Result<(), SafeFsError> {
    let path = dir_path.join(name);
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(s) => s,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(io("stat", path)(e)),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(io("unlink", path));
    }
    let parent_dev = rustix::fs::fstat(dir)
        .map_err(io("fstat", dir_path))?
        .st_dev;
    if st.st_dev != parent_dev {
        return Err(SafeFsError::Io {
            op: "remove",
            path,
            source: std::io::Error::other("a filesystem is still mounted there"),
        });
    }
    let sub = open_nofollow(dir, name, OFlags::RDONLY | OFlags::DIRECTORY)
        .map_err(io("openat", &path))?;
    let names: Vec<Vec<u8>> = rustix::fs::Dir::read_from(&sub)
        .map_err(io("readdir", &path))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| n != b"." && n != b"..")
        .collect();
    for n in names {
        remove_tree_at(&sub, &path, OsStr::from_bytes(&n))?;
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(io("rmdir", path))
}

/// Remove the directory tree at `path` (agent-owned), unmounting what is mounted in it first.
pub fn remove_tree(path: &Path) -> Result<(), SafeFsError> {
    if !path.exists() {
        return Ok(());
    }
    unmount_all_under(path)?;
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let parent_fd = open_root(parent)?;
    remove_tree_at(&parent_fd, parent, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, PathBuf, OwnedFd) {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("vol");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/file"), "x").unwrap();
        std::fs::write(d.path().join("outside"), "secret").unwrap();
        let fd = open_root(&root).unwrap();
        (d, root, fd)
    }

    fn target(fd: &OwnedFd) -> PathBuf {
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap()
    }

    #[test]
    fn plain_paths_and_inner_symlinks_resolve_inside() {
        let (_d, root, fd) = setup();
        let f = resolve_beneath(&fd, &root, "a/b/file", None).unwrap();
        assert_eq!(target(&f), root.join("a/b/file"));
        symlink("b", root.join("a/link")).unwrap();
        symlink("../a/b/file", root.join("a/rel")).unwrap();
        assert_eq!(
            target(&resolve_beneath(&fd, &root, "a/link/file", None).unwrap()),
            root.join("a/b/file")
        );
        assert_eq!(
            target(&resolve_beneath(&fd, &root, "a/rel", None).unwrap()),
            root.join("a/b/file")
        );
    }

    #[test]
    fn symlinks_and_dotdot_out_of_the_root_fail() {
        let (_d, root, fd) = setup();
        symlink("/", root.join("abs")).unwrap();
        symlink("../../outside", root.join("a/up")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        for p in [
            "abs",
            "abs/etc/passwd",
            "a/up",
            "../outside",
            "a/../../outside",
        ] {
            let e = resolve_beneath(&fd, &root, p, None).unwrap_err();
            assert!(matches!(e, SafeFsError::Escapes { .. }), "{p}: {e}");
        }
        assert!(matches!(
            resolve_beneath(&fd, &root, "loop", None).unwrap_err(),
            SafeFsError::Loop { .. }
        ));
        assert!(matches!(
            resolve_beneath(&fd, &root, "a/b/file/x", None).unwrap_err(),
            SafeFsError::NotDirectory { .. }
        ));
    }

    #[test]
    fn creates_missing_directories_without_following_links() {
        let (d, root, fd) = setup();
        let made =
            resolve_beneath(&fd, &root, "new/dir", Some(Mode::from_raw_mode(0o750))).unwrap();
        assert!(is_dir(&made));
        assert!(root.join("new/dir").is_dir());
        // A dangling link to outside is not created through.
        symlink(d.path().join("made-outside"), root.join("dangling")).unwrap();
        assert!(
            resolve_beneath(&fd, &root, "dangling/x", Some(Mode::from_raw_mode(0o750))).is_err()
        );
        assert!(!d.path().join("made-outside").exists());
    }

    #[test]
    fn remove_tree_does_not_follow_links_out() {
        let (d, root, _fd) = setup();
        symlink(d.path(), root.join("a/escape")).unwrap();
        remove_tree(&root).unwrap();
        assert!(!root.exists());
        assert_eq!(
            std::fs::read_to_string(d.path().join("outside")).unwrap(),
            "secret"
        );
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
