//! Searching a device's disk for data that must not be there (secrets outside the desired
//! state): every regular file below a directory on that directory's own filesystem, so tmpfs
//! volumes and other mounts are skipped.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Files below `dir` (on its filesystem, not following links, `skip`ped paths left out, at most
/// 4 MiB each) that contain `needle`.
pub fn files_on_disk_containing(dir: &Path, needle: &[u8], skip: &[PathBuf]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return found;
    };
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if skip.contains(&p) {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.dev() != top.dev() {
                continue;
            }
            if m.is_dir() {
                dirs.push(p);
            } else if m.is_file()
                && m.len() <= 4 << 20
                && std::fs::read(&p).is_ok_and(|d| d.windows(needle.len()).any(|w| w == needle))
            {
                found.push(p.display().to_string());
            }
        }
    }
    found
}
