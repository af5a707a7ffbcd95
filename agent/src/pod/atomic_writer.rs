//! Writes the files of configMap, secret, downwardAPI and projected volumes the way the
//! kubelet's AtomicWriter does, so a reader in the container sees either the old or the new set
//! of files and never a mix, and so nothing in the volume can redirect the agent's writes.
//!
//! Layout of a volume directory:
//!
//! ```text
//! ..2026_12_06_13_15_00.123456789/   the current data (a timestamped directory)
//! ..data -> ..2026_12_06_13_15_00.123456789
//! key -> ..data/key                   one link per top-level name of the payload
//! ```
//!
//! An update writes a new timestamped directory, points `..data_tmp` at it and renames that over
//! `..data` (one atomic rename), adds links for new names, removes links of names that are gone
//! and finally the old directory. Every operation is relative to the volume's directory
//! descriptor, never follows a symlink, and only ever touches names the writer itself made.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags};
use rustix::io::Errno;

use super::safefs::{self, SafeFsError};

/// The link naming the current data directory.
const DATA: &str = "..data";
/// The link being prepared before the atomic rename.
const DATA_TMP: &str = "..data_tmp";

/// One file of the payload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileContent {
    /// Bytes.
    pub data: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
}

/// Relative path → content.
pub type Payload = BTreeMap<String, FileContent>;

/// Why a payload could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A payload path is absolute, contains `..`, or starts with `..` (reserved). Not retryable.
    #[error("invalid file path {0:?} in volume payload")]
    InvalidPath(String),
    /// A filesystem operation failed. Retryable.
    #[error(transparent)]
    Fs(#[from] SafeFsError),
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(Errno) -> WriteError + use<> {
    let path = path.to_owned();
    move |e| {
        WriteError::Fs(SafeFsError::Io {
            op,
            path,
            source: e.into(),
        })
    }
}

/// Check a payload path as the API server's validation and the kubelet do.
pub fn validate_path(p: &str) -> Result<(), WriteError> {
    let bad = p.is_empty()
        || p.starts_with('/')
        || p.starts_with("..")
        || p.split('/').any(|c| c == ".." || c.is_empty())
        || p.len() > 4096;
    if bad {
        Err(WriteError::InvalidPath(p.to_owned()))
    } else {
        Ok(())
    }
}

/// Make `dir` hold exactly `payload`. Files get `gid` as their group when given (fsGroup), with
/// group read added as the kubelet does for read-only volumes. Returns whether anything changed.
pub fn write(dir: &Path, payload: &Payload, gid: Option<u32>) -> Result<bool, WriteError> {
    for p in payload.keys() {
        validate_path(p)?;
    }
    let root = safefs::open_root(dir)?;
    let old = current_data_dir(&root, dir)?;
    let unchanged = match &old {
        Some(old) => same_content(&root, dir, old, payload, gid),
        None => false,
    };
    if !unchanged {
        let ts = new_data_dir(&root, dir)?;
        let ts_fd = rustix::fs::openat(
            &root,
            ts.as_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io("openat", dir))?;
        let ts_path = dir.join(&ts);
        for (rel, content) in payload {
            write_file(&ts_fd, &ts_path, rel, content, gid)?;
        }
        match rustix::fs::unlinkat(&root, DATA_TMP, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(io("unlink ..data_tmp", dir)(e)),
        }
        // Only a link can be renamed over a link; anything else in its place is not the
        // writer's and goes (without following it).
        if let Ok(st) = rustix::fs::statat(&root, DATA, AtFlags::SYMLINK_NOFOLLOW)
            && FileType::from_raw_mode(st.st_mode) != FileType::Symlink
        {
            safefs::remove_tree_at(&root, dir, OsStr::new(DATA))?;
        }
        rustix::fs::symlinkat(ts.as_str(), &root, DATA_TMP).map_err(io("symlink", dir))?;
        rustix::fs::renameat(&root, DATA_TMP, &root, DATA).map_err(io("rename ..data", dir))?;
    }
    // User-visible links: one per top-level name.
    let wanted: BTreeSet<&str> = payload.keys().filter_map(|p| p.split('/').next()).collect();
    let mut changed = !unchanged;
    for name in &wanted {
        match rustix::fs::statat(&root, *name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => {}
            Err(Errno::NOENT) => {
                rustix::fs::symlinkat(format!("{DATA}/{name}").as_str(), &root, *name)
                    .map_err(io("symlink", dir))?;
                changed = true;
            }
            Err(e) => return Err(io("stat", dir)(e)),
        }
    }
    // Remove what is not ours any more: stale links into ..data and old data directories.
    let entries: Vec<Vec<u8>> = list(&root, dir)?;
    for e in entries {
        let name = OsStr::from_bytes(&e);
        let s = String::from_utf8_lossy(&e);
        if s == DATA || wanted.contains(s.as_ref()) {
            continue;
        }
        let current = rustix::fs::readlinkat(&root, DATA, Vec::new()).ok();
        if s.starts_with("..") {
            let is_current = current
                .as_ref()
                .is_some_and(|c| c.as_bytes() == e.as_slice());
            if !is_current && s.len() > 2 && s != DATA_TMP {
                safefs::remove_tree_at(&root, dir, name)?;
                changed = true;
            }
            continue;
        }
        // A top-level link the writer made for a name no longer in the payload.
        let link = rustix::fs::readlinkat(&root, name, Vec::new());
        if let Ok(t) = link
            && t.as_bytes().starts_with(format!("{DATA}/").as_bytes())
        {
            rustix::fs::unlinkat(&root, name, AtFlags::empty()).map_err(io("unlink", dir))?;
            changed = true;
        }
    }
    Ok(changed)
}

fn list(root: &OwnedFd, dir: &Path) -> Result<Vec<Vec<u8>>, WriteError> {
    let rd = rustix::fs::openat(
        root,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io("open", dir))?;
    Ok(rustix::fs::Dir::read_from(&rd)
        .map_err(io("readdir", dir))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| n != b"." && n != b"..")
        .collect())
}

/// The name `..data` points at, when it is a link to a `..`-directory in this volume.
fn current_data_dir(root: &OwnedFd, dir: &Path) -> Result<Option<String>, WriteError> {
    match rustix::fs::readlinkat(root, DATA, Vec::new()) {
        Ok(t) => {
            let t = t.to_string_lossy().into_owned();
            Ok((t.starts_with("..") && !t.contains('/')).then_some(t))
        }
        Err(Errno::NOENT) | Err(Errno::INVAL) => Ok(None),
        Err(e) => Err(io("readlink ..data", dir)(e)),
    }
}

fn new_data_dir(root: &OwnedFd, dir: &Path) -> Result<String, WriteError> {
    let now = jiff::Timestamp::now();
    let base = now.strftime("..%Y_%m_%d_%H_%M_%S").to_string();
    for n in 0..1000u32 {
        let name = format!("{base}.{:09}", now.subsec_nanosecond() as u32 + n);
        match rustix::fs::mkdirat(root, name.as_str(), Mode::from_raw_mode(0o755)) {
            Ok(()) => {
                // mkdirat applies the umask; the data directory must be traversable.
                let fd = rustix::fs::openat(
                    root,
                    name.as_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io("openat", dir))?;
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755)).map_err(io("chmod", dir))?;
                return Ok(name);
            }
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(io("mkdir", dir)(e)),
        }
    }
    Err(io("mkdir", dir)(Errno::EXIST))
}

fn effective_mode(mode: u32, gid: Option<u32>) -> u32 {
    // SetVolumeOwnership for a read-only volume: group gets read.
    if gid.is_some() {
        (mode | 0o440) & 0o7777
    } else {
        mode & 0o7777
    }
}

fn write_file(
    ts: &OwnedFd,
    ts_path: &Path,
    rel: &str,
    content: &FileContent,
    gid: Option<u32>,
) -> Result<(), WriteError> {
    let (parent_rel, name) = match rel.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, rel),
    };
    let parent = match parent_rel {
        Some(p) => safefs::resolve_beneath(ts, ts_path, p, Some(Mode::from_raw_mode(0o755)))?,
        None => ts.try_clone().map_err(|e| {
            WriteError::Fs(SafeFsError::Io {
                op: "dup",
                path: ts_path.to_owned(),
                source: e,
            })
        })?,
    };
    let path = ts_path.join(rel);
    let fd = rustix::fs::openat(
        &parent,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(io("create", &path))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(&content.data).map_err(|source| {
        WriteError::Fs(SafeFsError::Io {
            op: "write",
            path: path.clone(),
            source,
        })
    })?;
    if let Some(g) = gid {
        rustix::fs::fchown(&f, None, Some(Gid::from_raw(g))).map_err(io("chown", &path))?;
    }
    rustix::fs::fchmod(&f, Mode::from_raw_mode(effective_mode(content.mode, gid)))
        .map_err(io("chmod", &path))?;
    Ok(())
}

/// Whether the data directory `old` holds exactly `payload` (content, mode and group).
fn same_content(
    root: &OwnedFd,
    dir: &Path,
    old: &str,
    payload: &Payload,
    gid: Option<u32>,
) -> bool {
    let Ok(old_fd) = safefs::resolve_beneath(root, dir, old, None) else {
        return false;
    };
    let old_path = dir.join(old);
    let mut count = 0usize;
    for (rel, content) in payload {
        let Ok(fd) = safefs::resolve_beneath(&old_fd, &old_path, rel, None) else {
            return false;
        };
        let Ok(st) = rustix::fs::fstat(&fd) else {
            return false;
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile
            || st.st_mode & 0o7777 != effective_mode(content.mode, gid)
            || gid.is_some_and(|g| st.st_gid != g)
            || st.st_size as usize != content.data.len()
        {
            return false;
        }
        // Re-open readable through the checked descriptor.
        let Ok(data) = std::fs::read(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        )) else {
            return false;
        };
        if data != content.data {
            return false;
        }
        count += 1;
    }
    // No extra files (a removed key must disappear).
    count_files(&old_fd) == Some(count)
}

fn count_files(dir: &OwnedFd) -> Option<usize> {
    let rd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut n = 0;
    for e in rustix::fs::Dir::read_from(&rd).ok()? {
        let e = e.ok()?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        match e.file_type() {
            FileType::Directory => {
                let sub = rustix::fs::openat(
                    &rd,
                    e.file_name(),
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .ok()?;
                n += count_files(&sub)?;
            }
            _ => n += 1,
        }
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    fn payload(items: &[(&str, &str, u32)]) -> Payload {
        items
            .iter()
            .map(|(p, d, m)| {
                (
                    p.to_string(),
                    FileContent {
                        data: d.as_bytes().to_vec(),
                        mode: *m,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn writes_links_and_swaps_atomically() {
        let d = tempfile::tempdir().unwrap();
        let v = d.path().join("vol");
        std::fs::create_dir(&v).unwrap();
        assert!(
            write(
                &v,
                &payload(&[("a", "1", 0o644), ("sub/b", "2", 0o400)]),
                None
            )
            .unwrap()
        );
        assert_eq!(std::fs::read_to_string(v.join("a")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(v.join("sub/b")).unwrap(), "2");
        assert_eq!(
            std::fs::read_link(v.join("a")).unwrap(),
            Path::new("..data/a")
        );
        assert_eq!(
            std::fs::metadata(v.join("sub/b")).unwrap().mode() & 0o777,
            0o400
        );
        let first = std::fs::read_link(v.join(DATA)).unwrap();
        // Same payload: nothing changes.
        assert!(
            !write(
                &v,
                &payload(&[("a", "1", 0o644), ("sub/b", "2", 0o400)]),
                None
            )
            .unwrap()
        );
        assert_eq!(std::fs::read_link(v.join(DATA)).unwrap(), first);
        // Key removed, one changed: the old directory and link go.
        assert!(write(&v, &payload(&[("a", "3", 0o644)]), None).unwrap());
        assert_eq!(std::fs::read_to_string(v.join("a")).unwrap(), "3");
        assert!(!v.join("sub").exists());
        assert!(!v.join(&first).exists());
        let names: Vec<_> = std::fs::read_dir(&v)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn planted_links_never_redirect_writes() {
        let d = tempfile::tempdir().unwrap();
        let v = d.path().join("vol");
        let outside = d.path().join("outside");
        std::fs::create_dir(&v).unwrap();
        std::fs::create_dir(&outside).unwrap();
        write(&v, &payload(&[("a", "1", 0o644)]), None).unwrap();
        // A container with write access replaces ..data and plants a link where the next
        // write would create a directory.
        std::fs::remove_file(v.join(DATA)).unwrap();
        symlink(&outside, v.join(DATA)).unwrap();
        symlink(&outside, v.join("..data_tmp")).unwrap();
        symlink(&outside, v.join("evil")).unwrap();
        write(
            &v,
            &payload(&[("a", "2", 0o644), ("dir/x", "y", 0o644)]),
            None,
        )
        .unwrap();
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing written outside"
        );
        assert_eq!(std::fs::read_to_string(v.join("a")).unwrap(), "2");
        assert!(
            v.join("evil").symlink_metadata().is_ok(),
            "a link it did not make is left"
        );
    }

    #[test]
    fn fs_group_owns_files_with_group_read() {
        let d = tempfile::tempdir().unwrap();
        let v = d.path().join("vol");
        std::fs::create_dir(&v).unwrap();
        write(&v, &payload(&[("k", "v", 0o400)]), Some(4321)).unwrap();
        let m = std::fs::metadata(v.join("k")).unwrap();
        assert_eq!(m.gid(), 4321);
        assert_eq!(m.mode() & 0o777, 0o440);
    }

    #[test]
    fn bad_paths_are_refused() {
        for p in ["/abs", "../x", "a/../b", "..hidden", ""] {
            assert!(validate_path(p).is_err(), "{p}");
        }
    }
}
