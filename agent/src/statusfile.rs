//! A small status file (`status.json` in the state directory) written atomically whenever pod
//! statuses change: `fleetlet-agent status` reads it offline, and restart counts survive an agent
//! restart through it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::fsutil;
use crate::pod::worker::StatusMap;
use crate::store::Held;

/// File name below the state directory.
pub const FILE: &str = "status.json";

/// Errors reading the status file.
#[derive(Debug, thiserror::Error)]
pub enum StatusFileError {
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

/// Summarise statuses.
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
    let text = std::fs::read(&path).map_err(|source| StatusFileError::Read {
        path: path.clone(),
        source,
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

/// Keep the status file current until `shutdown` (debounced: at most one write per second).
pub async fn keep_written(
    state_dir: PathBuf,
    device: String,
    mut held: watch::Receiver<Held>,
    mut statuses: watch::Receiver<StatusMap>,
    mut not_served: watch::Receiver<Option<String>>,
    shutdown: CancellationToken,
) {
    let path = state_dir.join(FILE);
    let mut last = None;
    loop {
        let file = summarise(
            &device,
            &held.borrow_and_update(),
            &statuses.borrow_and_update(),
            not_served.borrow_and_update().clone(),
        );
        if last.as_ref() != Some(&file) {
            let data = serde_json::to_vec_pretty(&file).unwrap_or_default();
            let p = path.clone();
            match tokio::task::spawn_blocking(move || fsutil::atomic_write(&p, &data, 0o644)).await
            {
                Ok(Ok(())) => last = Some(file),
                Ok(Err(e)) => {
                    warn!(path = %path.display(), error = %e, "writing status file failed")
                }
                Err(e) => warn!(error = %e, "status writer task failed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = held.changed() => if r.is_err() { return },
            r = statuses.changed() => if r.is_err() { return },
            r = not_served.changed() => if r.is_err() { return },
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Human-readable table for `fleetlet-agent status`.
pub fn render(f: &StatusFile) -> String {
    let mut out = format!("device: {}\ngeneration: {}\n", f.device, f.generation);
    if let Some(r) = &f.desired_unknown {
        out.push_str(&format!("desired state: UNKNOWN ({r})\n"));
    }
    if let Some(r) = &f.desired_fallback {
        out.push_str(&format!(
            "desired state: PREVIOUS GOOD SNAPSHOT, current file unusable ({r})\n"
        ));
    }
    if let Some(since) = &f.not_served_since {
        out.push_str(&format!(
            "hub: NOT SERVED since {since} (the hub refuses this device: not in its inventory, or disabled; pods keep running unless remove_pods_when_not_served_secs is set)\n"
        ));
    }
    out.push_str(&format!("pods: {}\n", f.pods.len()));
    if !f.pods.is_empty() {
        out.push_str(&format!(
            "{:<20} {:<32} {:<10} {:<6} {:<8} {}\n",
            "NAMESPACE", "NAME", "PHASE", "READY", "RESTARTS", "UID"
        ));
    }
    for p in &f.pods {
        let phase = if p.reason.is_empty() {
            p.phase.clone()
        } else {
            format!("{} ({})", p.phase, p.reason)
        };
        out.push_str(&format!(
            "{:<20} {:<32} {:<10} {:<6} {:<8} {}\n",
            p.namespace,
            p.name,
            phase,
            format!("{}/{}", p.ready, p.containers),
            p.restarts.values().sum::<u32>(),
            p.uid
        ));
    }
    out
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
        let text = render(&f);
        assert!(
            text.contains("hub: NOT SERVED since 2026-12-06T13:00:00Z"),
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
        assert!(!render(&served).contains("NOT SERVED"));
    }
}
