//! `DesiredStore`: the device's desired pod set, persisted before the agent acts on it.
//!
//! File format (`desired.snapshot`): 8-byte magic `FLTSNAP1`, generation (u64 LE), payload
//! length (u32 LE), CRC-32 of the payload (u32 LE), then the protobuf `DesiredSnapshot`. A short
//! file, a wrong magic, a length mismatch or a checksum mismatch is corruption. The previous good
//! file is kept as `desired.snapshot.prev`, so a corrupt current file falls back to it; a device
//! whose files are all corrupt holds an *unknown* desired state, which the reconciler treats as
//! "change nothing" (never as "no pods").

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleetlet_proto::v1::DesiredSnapshot;
use prost::Message;
use tokio::sync::{Mutex, watch};

const MAGIC: &[u8; 8] = b"FLTSNAP1";
const HEADER_LEN: usize = 8 + 8 + 4 + 4;
const FILE: &str = "desired.snapshot";
const PREV: &str = "desired.snapshot.prev";

/// Errors of the desired store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing a state file failed (disk full, permissions). Retryable.
    #[error("desired state {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A state file is corrupt or truncated. Not retryable: the file must be replaced.
    #[error("desired state {path} is corrupt: {reason}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What the device holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Held {
    /// A known snapshot (generation 0 and no pods on a fresh device).
    Known(Arc<DesiredSnapshot>),
    /// The current file was corrupt; this is the last good (previous) snapshot. Its pods run,
    /// but pods it does not list are left alone: they may belong to the newer, lost generation,
    /// and the hub's next snapshot says which of them to keep.
    Fallback {
        /// The previous good snapshot.
        snapshot: Arc<DesiredSnapshot>,
        /// What was wrong with the current file.
        reason: String,
    },
    /// The state on disk could not be read; keep everything as it is until a new snapshot.
    Unknown {
        /// Why.
        reason: String,
    },
}

impl Held {
    /// The held generation (0 when unknown, so any hub snapshot replaces it).
    pub fn generation(&self) -> u64 {
        match self {
            Held::Known(s) | Held::Fallback { snapshot: s, .. } => s.generation,
            Held::Unknown { .. } => 0,
        }
    }
}

/// The persisted desired snapshot with change notification.
#[derive(Debug)]
pub struct DesiredStore {
    dir: PathBuf,
    write: Mutex<()>,
    held: watch::Sender<Held>,
}

/// What opening the store found.
#[derive(Debug)]
pub struct OpenReport {
    /// Problems found and worked around (corrupt current file, fallback used).
    pub problems: Vec<StoreError>,
}

impl DesiredStore {
    /// Open the store in `dir` (created if missing) and load what it holds.
    pub fn open(dir: &Path) -> Result<(Self, OpenReport), StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let mut problems = Vec::new();
        let current = dir.join(FILE);
        let prev = dir.join(PREV);
        let held = match read_snapshot(&current) {
            Ok(Some(s)) => Held::Known(Arc::new(s)),
            Ok(None) => match read_snapshot(&prev) {
                // Crash between the two renames of `save`: the previous file is the newest.
                Ok(Some(s)) => Held::Known(Arc::new(s)),
                Ok(None) => Held::Known(Arc::new(DesiredSnapshot::default())),
                Err(e) => {
                    let reason = e.to_string();
                    problems.push(e);
                    Held::Unknown { reason }
                }
            },
            Err(e) => {
                let first = e.to_string();
                problems.push(e);
                match read_snapshot(&prev) {
                    Ok(Some(s)) => Held::Fallback {
                        snapshot: Arc::new(s),
                        reason: first,
                    },
                    Ok(None) => Held::Unknown { reason: first },
                    Err(e2) => {
                        problems.push(e2);
                        Held::Unknown { reason: first }
                    }
                }
            }
        };
        let (tx, _) = watch::channel(held);
        Ok((
            Self {
                dir: dir.to_owned(),
                write: Mutex::new(()),
                held: tx,
            },
            OpenReport { problems },
        ))
    }

    /// The generation held (0 when none or unknown).
    pub fn held_generation(&self) -> u64 {
        self.held.borrow().generation()
    }

    /// What the store holds now.
    pub fn held(&self) -> Held {
        self.held.borrow().clone()
    }

    /// Notified on every accepted snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Held> {
        self.held.subscribe()
    }

    /// Persist `snapshot` if it is newer than what is held, then publish it. `Ok(false)` when it
    /// was not newer and was ignored.
    pub async fn apply(&self, snapshot: DesiredSnapshot) -> Result<bool, StoreError> {
        let _guard = self.write.lock().await;
        // Generation 0 means "nothing"; an unknown held state reports generation 0 as well, so
        // any real snapshot replaces it.
        if snapshot.generation <= self.held_generation() {
            return Ok(false);
        }
        let dir = self.dir.clone();
        let encoded = encode(&snapshot);
        tokio::task::spawn_blocking(move || save(&dir, &encoded))
            .await
            .map_err(|e| StoreError::Io {
                path: self.dir.join(FILE),
                source: std::io::Error::other(e.to_string()),
            })??;
        self.held.send_replace(Held::Known(Arc::new(snapshot)));
        Ok(true)
    }
}

/// When the held snapshot was stored: the modification time of its file in `dir` (the previous
/// good file when `fallback`; the previous file also when the current one is missing, as after a
/// crash between `save`'s two renames). `None` on a device that never got a snapshot.
pub fn stored_at(dir: &Path, fallback: bool) -> Option<std::time::SystemTime> {
    let mtime = |name: &str| {
        std::fs::metadata(dir.join(name))
            .and_then(|m| m.modified())
            .ok()
    };
    if fallback {
        mtime(PREV)
    } else {
        mtime(FILE).or_else(|| mtime(PREV))
    }
}

fn encode(s: &DesiredSnapshot) -> Vec<u8> {
    let payload = s.encode_to_vec();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&s.generation.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

fn decode(path: &Path, bytes: &[u8]) -> Result<DesiredSnapshot, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "truncated: {} bytes, header needs {HEADER_LEN}",
            bytes.len()
        )));
    }
    let (header, payload) = bytes.split_at(HEADER_LEN);
    if &header[..8] != MAGIC {
        return Err(corrupt("not a fleetlet snapshot (bad magic)".into()));
    }
    let word =
        |r: std::ops::Range<usize>| header[r].iter().rev().fold(0u64, |a, b| a << 8 | *b as u64);
    let generation = word(8..16);
    let len = word(16..20) as usize;
    let crc = word(20..24) as u32;
    if payload.len() != len {
        return Err(corrupt(format!(
            "truncated: payload is {} bytes, header says {len}",
            payload.len()
        )));
    }
    if crc32fast::hash(payload) != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    let snapshot = DesiredSnapshot::decode(payload).map_err(|e| corrupt(e.to_string()))?;
    if snapshot.generation != generation {
        return Err(corrupt("generation in header and payload differ".into()));
    }
    Ok(snapshot)
}

fn read_snapshot(path: &Path) -> Result<Option<DesiredSnapshot>, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(path, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn save(dir: &Path, encoded: &[u8]) -> Result<(), StoreError> {
    let current = dir.join(FILE);
    let prev = dir.join(PREV);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io { path, source }
    };
    let tmp = dir.join(format!(".{FILE}.tmp"));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(encoded).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    // Keep the last good file as `.prev` only if it is good; never replace a good `.prev`
    // with a corrupt current file.
    if matches!(read_snapshot(&current), Ok(Some(_))) {
        std::fs::rename(&current, &prev).map_err(io(&current))?;
    }
    std::fs::rename(&tmp, &current).map_err(io(&current))?;
    fleetlet_os::fs::sync_dir(dir).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlet_proto::v1::PodBundle;

    fn snap(generation: u64, pods: usize) -> DesiredSnapshot {
        DesiredSnapshot {
            generation,
            pods: (0..pods)
                .map(|i| PodBundle {
                    pod_json: format!("{{\"n\":{i}}}").into_bytes().into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn newer_replaces_older_and_equal_are_ignored() {
        let d = tempfile::tempdir().unwrap();
        let (store, report) = DesiredStore::open(d.path()).unwrap();
        assert!(report.problems.is_empty());
        assert_eq!(store.held_generation(), 0);
        assert!(store.apply(snap(5, 2)).await.unwrap());
        assert!(!store.apply(snap(5, 3)).await.unwrap());
        assert!(!store.apply(snap(4, 1)).await.unwrap());
        assert!(store.apply(snap(7, 1)).await.unwrap());
        let (reopened, _) = DesiredStore::open(d.path()).unwrap();
        match reopened.held() {
            Held::Known(s) => {
                assert_eq!(s.generation, 7);
                assert_eq!(s.pods.len(), 1);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn truncated_current_falls_back_to_previous_good() {
        let d = tempfile::tempdir().unwrap();
        let (store, _) = DesiredStore::open(d.path()).unwrap();
        store.apply(snap(1, 1)).await.unwrap();
        store.apply(snap(2, 2)).await.unwrap();
        let path = d.path().join(FILE);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let (store, report) = DesiredStore::open(d.path()).unwrap();
        assert_eq!(report.problems.len(), 1);
        assert!(report.problems[0].to_string().contains("truncated"));
        assert_eq!(store.held_generation(), 1);
        assert!(
            matches!(store.held(), Held::Fallback { ref reason, .. } if reason.contains("truncated")),
            "{:?}",
            store.held()
        );
        // The next good snapshot must not rotate the corrupt file into `.prev`.
        store.apply(snap(3, 1)).await.unwrap();
        assert_eq!(
            read_snapshot(&d.path().join(PREV))
                .unwrap()
                .unwrap()
                .generation,
            1
        );
    }

    #[tokio::test]
    async fn corrupt_without_fallback_is_unknown_not_empty() {
        let d = tempfile::tempdir().unwrap();
        let (store, _) = DesiredStore::open(d.path()).unwrap();
        store.apply(snap(1, 1)).await.unwrap();
        let path = d.path().join(FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (store, report) = DesiredStore::open(d.path()).unwrap();
        assert!(report.problems[0].to_string().contains("checksum"));
        assert!(matches!(store.held(), Held::Unknown { .. }));
        assert!(store.apply(snap(2, 0)).await.unwrap());
        assert_eq!(store.held_generation(), 2);
    }
}
