//! A small status file (`status.json` in the state directory) written atomically whenever pod
//! statuses, the held desired state or the link change: `fleetlet-agent status` reads it offline
//! (see [`crate::status`]), and restart counts survive an agent restart through it. Its format is
//! the documented `fleetlet-agent status --json` (docs/agent.md): fields are only ever added.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::link_status::{LinkStatus, now_rfc3339};
use crate::pod::worker::StatusMap;
use crate::store::Held;

/// File name below the state directory.
pub const FILE: &str = "status.json";

/// Errors reading the status file.
#[derive(Debug, thiserror::Error)]
pub enum StatusFileError {
    /// There is no status file: the agent never ran with this state directory, or the
    /// configuration points elsewhere.
    #[error(
        "no status file {path}: fleetlet-agent has not run with this state directory \
         (check --config or --state-dir)"
    )]
    Missing {
        /// File.
        path: PathBuf,
    },
    /// Missing or unreadable.
    #[error("status file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid JSON.
    #[error("status file {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
}

/// The file's content.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatusFile {
    /// Device name.
    pub device: String,
    /// When the agent wrote this file (RFC 3339 UTC); it writes on every change, so on a quiet
    /// device this is the time of the last change, not of the last check.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub written: String,
    /// The agent process that writes the file, so a reader can tell whether it still runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentProcess>,
    /// The link to the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkStatus>,
    /// Held desired generation.
    pub generation: u64,
    /// Why the desired state is unknown, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_unknown: Option<String>,
    /// Why the previous good desired snapshot is in use (the current file was corrupt), if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_fallback: Option<String>,
    /// Since when (RFC 3339) the hub refuses to serve this device, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_served_since: Option<String>,
    /// Pods.
    pub pods: Vec<PodLine>,
}

/// The agent process writing the status file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentProcess {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22): with `boot_id` it tells
    /// the writer from a later process that got the same pid.
    pub start_ticks: u64,
    /// The kernel's boot id when the agent started.
    pub boot_id: String,
    /// fleetlet-agent version.
    pub version: String,
}

impl AgentProcess {
    /// This process.
    pub fn current() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            start_ticks: start_ticks(pid).unwrap_or(0),
            boot_id: boot_id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// Whether this very process still runs (same boot, pid and start time, not a zombie).
    pub fn is_running(&self) -> bool {
        self.pid != 0
            && self.boot_id == boot_id()
            && proc_stat_fields(self.pid).is_some_and(|f| {
                !matches!(f.first().map(String::as_str), Some("Z" | "X"))
                    && f.get(19).and_then(|t| t.parse::<u64>().ok()) == Some(self.start_ticks)
            })
    }
}

/// Fields 3.. of `/proc/<pid>/stat` (after the command name, which may hold spaces).
fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn start_ticks(pid: u32) -> Option<u64> {
    proc_stat_fields(pid)?.get(19)?.parse().ok()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// One pod.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PodLine {
    /// UID.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Phase (or "Removed").
    pub phase: String,
    /// Reason, when the pod failed as a whole.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Ready app containers.
    pub ready: u32,
    /// App containers.
    pub containers: u32,
    /// Restart count per container (init and app).
    pub restarts: BTreeMap<String, u32>,
    /// The full Kubernetes PodStatus, for `status --json` and diagnostics.
    #[serde(default)]
    pub status: serde_json::Value,
}

/// Summarise statuses (`written`, `agent` and `link` are left for the writer to fill in).
pub fn summarise(
    device: &str,
    held: &Held,
    statuses: &StatusMap,
    not_served_since: Option<String>,
) -> StatusFile {
    let pods = statuses
        .values()
        .map(|e| {
            let st: k8s_openapi::api::core::v1::PodStatus =
                serde_json::from_slice(&e.status_json).unwrap_or_default();
            let app = st.container_statuses.clone().unwrap_or_default();
            let init = st.init_container_statuses.clone().unwrap_or_default();
            PodLine {
                uid: e.uid.clone(),
                namespace: e.namespace.clone(),
                name: e.name.clone(),
                phase: if e.removed {
                    "Removed".into()
                } else {
                    st.phase.clone().unwrap_or_default()
                },
                reason: st.reason.clone().unwrap_or_default(),
                ready: app.iter().filter(|c| c.ready).count() as u32,
                containers: app.len() as u32,
                restarts: init
                    .iter()
                    .chain(&app)
                    .map(|c| (c.name.clone(), c.restart_count.max(0) as u32))
                    .collect(),
                status: serde_json::from_slice(&e.status_json).unwrap_or_default(),
            }
        })
        .collect();
    StatusFile {
        device: device.to_owned(),
        written: String::new(),
        agent: None,
        link: None,
        generation: held.generation(),
        desired_unknown: match held {
            Held::Unknown { reason } => Some(reason.clone()),
            Held::Known(_) | Held::Fallback { .. } => None,
        },
        desired_fallback: match held {
            Held::Fallback { reason, .. } => Some(reason.clone()),
            Held::Known(_) | Held::Unknown { .. } => None,
        },
        not_served_since,
        pods,
    }
}

/// Read the status file of `state_dir`.
pub fn read(state_dir: &Path) -> Result<StatusFile, StatusFileError> {
    let path = state_dir.join(FILE);
    let text = std::fs::read(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => StatusFileError::Missing { path: path.clone() },
        _ => StatusFileError::Read {
            path: path.clone(),
            source,
        },
    })?;
    serde_json::from_slice(&text).map_err(|e| StatusFileError::Parse {
        path,
        message: e.to_string(),
    })
}

/// Restart counts by pod UID and container, from a previous run.
pub fn restored_restarts(state_dir: &Path) -> BTreeMap<String, BTreeMap<String, u32>> {
    read(state_dir)
        .map(|f| f.pods.into_iter().map(|p| (p.uid, p.restarts)).collect())
        .unwrap_or_default()
}

/// When each pod started on this device (its status' startTime), from a previous run: an
/// agent restart does not restart the clock of activeDeadlineSeconds.
pub fn restored_start_times(state_dir: &Path) -> BTreeMap<String, jiff::Timestamp> {
    read(state_dir)
        .map(|f| {
            f.pods
                .into_iter()
                .filter_map(|p| {
                    let t = p.status.get("startTime")?.as_str()?.parse().ok()?;
                    Some((p.uid, t))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A running container's run as the status before an agent restart reported it: its id, when
/// that run started, and the resources its cgroup held (`containerStatuses[].resources`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredRun {
    /// Podman container id.
    pub container_id: String,
    /// state.running.startedAt (whole seconds, as the status has it).
    pub started_at: Option<jiff::Timestamp>,
    /// What its cgroup held.
    pub resources: crate::pod::resize::ContainerResources,
}

impl RestoredRun {
    /// Whether container `id` started at `started_at` is this run (the status keeps whole
    /// seconds).
    pub fn is_run(&self, id: &str, started_at: Option<jiff::Timestamp>) -> bool {
        self.container_id == id
            && self.started_at.map(|t| t.as_second()) == started_at.map(|t| t.as_second())
    }
}

/// The resources of each running container at the last status of a previous run, by pod UID
/// and container: an in-place resize applied before an agent restart stays known as applied.
pub fn restored_resources(state_dir: &Path) -> BTreeMap<String, BTreeMap<String, RestoredRun>> {
    let Ok(file) = read(state_dir) else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for p in file.pods {
        let Ok(st) = serde_json::from_value::<k8s_openapi::api::core::v1::PodStatus>(p.status)
        else {
            continue;
        };
        let runs: BTreeMap<String, RestoredRun> = st
            .init_container_statuses
            .into_iter()
            .flatten()
            .chain(st.container_statuses.into_iter().flatten())
            .filter_map(|c| {
                let running = c.state.as_ref()?.running.as_ref()?;
                let id = c.container_id.as_deref()?.strip_prefix("podman://")?;
                let r = c.resources.as_ref()?;
                let strings = |m: &Option<
                    BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
                >| {
                    m.iter()
                        .flatten()
                        .map(|(k, q)| (k.clone(), q.0.clone()))
                        .collect()
                };
                Some((
                    c.name.clone(),
                    RestoredRun {
                        container_id: id.to_owned(),
                        started_at: running.started_at.as_ref().map(|t| t.0),
                        resources: crate::pod::resize::ContainerResources {
                            requests: strings(&r.requests),
                            limits: strings(&r.limits),
                        },
                    },
                ))
            })
            .collect();
        if !runs.is_empty() {
            out.insert(p.uid, runs);
        }
    }
    out
}

/// What the status file is written from.
pub struct StatusSources {
    /// The held desired state.
    pub held: watch::Receiver<Held>,
    /// Pod statuses.
    pub statuses: watch::Receiver<StatusMap>,
    /// The link to the hub.
    pub link: watch::Receiver<LinkStatus>,
    /// Since when the hub refuses this device as not served (`None`: it does not).
    pub not_served: watch::Receiver<Option<String>>,
}

/// Shortest time between two writes of the status file: a burst of pod changes costs a few
/// fsyncs a second on the device's storage, not one per change.
const MIN_WRITE_INTERVAL: Duration = Duration::from_millis(250);

/// Keep the status file current until `shutdown` (at most one write per [`MIN_WRITE_INTERVAL`]), and
/// write it once more on the way out so it says the agent stopped.
pub async fn keep_written(
    state_dir: PathBuf,
    device: String,
    mut src: StatusSources,
    shutdown: CancellationToken,
) {
    let path = state_dir.join(FILE);
    let agent = AgentProcess::current();
    let mut last = None;
    loop {
        let mut file = summarise(
            &device,
            &src.held.borrow_and_update(),
            &src.statuses.borrow_and_update(),
            src.not_served.borrow_and_update().clone(),
        );
        file.agent = Some(agent.clone());
        file.link = Some(src.link.borrow_and_update().clone());
        if last.as_ref() != Some(&file) {
            let compared = file.clone();
            file.written = now_rfc3339();
            if write(&path, &file).await {
                last = Some(compared);
            }
        }
        // At most one write per MIN_WRITE_INTERVAL, but the first change after a quiet spell is
        // written at once: `status` right after a pod started shows it.
        let next_write = tokio::time::Instant::now() + MIN_WRITE_INTERVAL;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = src.held.changed() => if r.is_err() { break },
            r = src.statuses.changed() => if r.is_err() { break },
            r = src.link.changed() => if r.is_err() { break },
            r = src.not_served.changed() => if r.is_err() { break },
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next_write) => {}
        }
    }
    // The link's task may not have said "stopped" yet: the file says it for it.
    let mut file = summarise(
        &device,
        &src.held.borrow(),
        &src.statuses.borrow(),
        src.not_served.borrow().clone(),
    );
    file.agent = Some(agent);
    file.link = Some(match src.link.borrow().clone() {
        LinkStatus::NotConfigured => LinkStatus::NotConfigured,
        _ => LinkStatus::Stopped {
            since: now_rfc3339(),
        },
    });
    file.written = now_rfc3339();
    write(&path, &file).await;
}

/// Writes `file` atomically; false (logged) when that failed.
async fn write(path: &Path, file: &StatusFile) -> bool {
    let data = match serde_json::to_vec_pretty(file) {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "encoding the status file failed");
            return false;
        }
    };
    let p = path.to_owned();
    match tokio::task::spawn_blocking(move || fleetlet_os::fs::write_atomic(&p, &data, 0o644)).await
    {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            warn!(path = %path.display(), error = %e, "writing status file failed");
            false
        }
        Err(e) => {
            warn!(error = %e, "status writer task failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_device_the_hub_does_not_serve_says_so() {
        let f = summarise(
            "edge-1",
            &Held::Unknown {
                reason: "none yet".into(),
            },
            &Arc::new(BTreeMap::new()),
            Some("2026-12-06T13:00:00Z".into()),
        );
        let report = |file: &StatusFile| crate::status::StatusReport {
            file: file.clone(),
            agent_running: true,
            generation_stored: None,
        };
        let now = jiff::Timestamp::now();
        let text = crate::status::render(&report(&f), now);
        assert!(
            text.contains("NOT SERVED since 2026-12-06T13:00:00Z"),
            "{text}"
        );
        let back: StatusFile =
            serde_json::from_slice(&serde_json::to_vec(&f).expect("json")).expect("parse");
        assert_eq!(back, f);
        let served = summarise(
            "edge-1",
            &Held::Unknown {
                reason: "none yet".into(),
            },
            &Arc::new(BTreeMap::new()),
            None,
        );
        assert!(!crate::status::render(&report(&served), now).contains("NOT SERVED"));
    }
}
