//! `fleetlet-agent status`: what the device holds and runs, read from the state directory, so it
//! works offline and while the agent is stopped. It says whether the agent runs, the link to the
//! hub (connected to which hub since when, or down since when and why), the held generation and
//! its age, whether a fallback snapshot or an unknown state is in use, and the pods.
//!
//! `--json` prints a [`StatusReport`]: the status file's fields (documented in docs/agent.md)
//! plus `agent_running` and `generation_stored`. Fields are only ever added.

use std::fmt::Write as _;
use std::path::Path;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::link_status::LinkStatus;
use crate::statusfile::{self, StatusFile, StatusFileError};
use crate::store;

/// What `status` shows: the status file and what is checked at the time of asking.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// The status file as the agent last wrote it.
    #[serde(flatten)]
    pub file: StatusFile,
    /// Whether the agent that wrote the file still runs. When false, `link` and the pods are as
    /// the agent last saw them.
    pub agent_running: bool,
    /// When the held generation was stored on this device (RFC 3339 UTC); absent when the device
    /// never got a snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_stored: Option<String>,
}

/// Reads the state directory.
pub fn report(state_dir: &Path) -> Result<StatusReport, StatusFileError> {
    let file = statusfile::read(state_dir)?;
    let agent_running = file.agent.as_ref().is_some_and(|a| a.is_running());
    let generation_stored = (file.generation > 0)
        .then(|| store::stored_at(state_dir, file.desired_fallback.is_some()))
        .flatten()
        .and_then(|t| Timestamp::try_from(t).ok())
        .and_then(|t| Timestamp::from_second(t.as_second()).ok())
        .map(|t| t.to_string());
    Ok(StatusReport {
        file,
        agent_running,
        generation_stored,
    })
}

/// A duration in its two largest units: `3d 4h`, `2h 5m`, `4m 10s`, `7s`.
pub fn human_duration(secs: i64) -> String {
    let secs = secs.max(0);
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3_600,
        secs % 3_600 / 60,
        secs % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// `TIME (AGE ago)`, or TIME as given when it does not parse.
fn at(time: &str, now: Timestamp) -> String {
    match time.parse::<Timestamp>() {
        Ok(t) => format!(
            "{time} ({} ago)",
            human_duration(now.as_second() - t.as_second())
        ),
        Err(_) => time.to_owned(),
    }
}

/// The human-readable form, ages relative to `now`.
pub fn render(r: &StatusReport, now: Timestamp) -> String {
    let f = &r.file;
    let mut out = String::new();
    let _ = writeln!(out, "device:        {}", f.device);
    let written = if f.written.is_empty() {
        "unknown".to_owned()
    } else {
        at(&f.written, now)
    };
    match (&f.agent, r.agent_running) {
        (Some(a), true) => {
            let _ = writeln!(
                out,
                "agent:         running (pid {}, version {})",
                a.pid, a.version
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "agent:         NOT RUNNING; below is what it last recorded, at {written}"
            );
        }
    }
    let link = match &f.link {
        None => "unknown (written by an older agent)".to_owned(),
        Some(LinkStatus::NotConfigured) => {
            "not configured (no [hub] in the configuration: desired state from a file)".to_owned()
        }
        Some(LinkStatus::Connecting { endpoint, since }) => {
            format!(
                "connecting to {endpoint}, first attempt at {}",
                at(since, now)
            )
        }
        Some(LinkStatus::Connected { endpoint, since }) => {
            format!("connected to {endpoint} since {}", at(since, now))
        }
        Some(LinkStatus::Down {
            since,
            endpoint,
            last_error,
        }) => format!(
            "DOWN since {}, retrying {endpoint}\n               last error: {last_error}",
            at(since, now)
        ),
        Some(LinkStatus::Stopped { since }) => {
            format!("stopped with the agent at {}", at(since, now))
        }
    };
    let _ = writeln!(out, "link:          {link}");
    if let Some(since) = &f.not_served_since {
        let _ = writeln!(
            out,
            "hub:           NOT SERVED since {} (the hub refuses this device: not in its inventory, or disabled; pods keep running unless remove_pods_when_not_served_secs is set)",
            at(since, now)
        );
    }
    let stored = r
        .generation_stored
        .as_deref()
        .map(|t| format!(", stored {}", at(t, now)))
        .unwrap_or_default();
    let _ = writeln!(out, "generation:    {}{stored}", f.generation);
    let desired = match (&f.desired_unknown, &f.desired_fallback) {
        (Some(reason), _) => {
            format!("UNKNOWN ({reason}); pods are left as they are until the hub sends a snapshot")
        }
        (None, Some(reason)) => {
            format!("PREVIOUS GOOD SNAPSHOT, the current file is unusable ({reason})")
        }
        (None, None) if f.generation == 0 => "none received yet".to_owned(),
        (None, None) => "current".to_owned(),
    };
    let _ = writeln!(out, "desired state: {desired}");
    let _ = writeln!(out, "pods:          {}", f.pods.len());
    if !f.pods.is_empty() {
        let _ = writeln!(
            out,
            "{:<20} {:<32} {:<10} {:<6} {:<8} UID",
            "NAMESPACE", "NAME", "PHASE", "READY", "RESTARTS"
        );
    }
    for p in &f.pods {
        let phase = if p.reason.is_empty() {
            p.phase.clone()
        } else {
            format!("{} ({})", p.phase, p.reason)
        };
        let _ = writeln!(
            out,
            "{:<20} {:<32} {:<10} {:<6} {:<8} {}",
            p.namespace,
            p.name,
            phase,
            format!("{}/{}", p.ready, p.containers),
            p.restarts.values().sum::<u32>(),
            p.uid
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statusfile::{AgentProcess, PodLine};

    fn now() -> Timestamp {
        "2026-12-06T14:00:00Z".parse().expect("time")
    }

    fn file(link: LinkStatus) -> StatusFile {
        StatusFile {
            device: "d1".into(),
            written: "2026-12-06T13:59:00Z".into(),
            agent: Some(AgentProcess {
                pid: 42,
                start_ticks: 1,
                boot_id: "b".into(),
                version: "0.1.0".into(),
            }),
            link: Some(link),
            generation: 7,
            pods: vec![PodLine {
                uid: "u1".into(),
                namespace: "ns".into(),
                name: "web".into(),
                phase: "Running".into(),
                ready: 1,
                containers: 1,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn durations_use_their_two_largest_units() {
        assert_eq!(human_duration(7), "7s");
        assert_eq!(human_duration(250), "4m 10s");
        assert_eq!(human_duration(7_500), "2h 5m");
        assert_eq!(human_duration(273_600), "3d 4h");
        assert_eq!(human_duration(-5), "0s");
    }

    #[test]
    fn a_connected_device_names_its_hub_and_generation_age() {
        let r = StatusReport {
            file: file(LinkStatus::Connected {
                endpoint: "https://hub:7443".into(),
                since: "2026-12-06T13:55:00Z".into(),
            }),
            agent_running: true,
            generation_stored: Some("2026-12-06T13:30:00Z".into()),
        };
        let text = render(&r, now());
        assert!(
            text.contains("agent:         running (pid 42, version 0.1.0)"),
            "{text}"
        );
        assert!(
            text.contains(
                "link:          connected to https://hub:7443 since 2026-12-06T13:55:00Z (5m 0s ago)"
            ),
            "{text}"
        );
        assert!(
            text.contains("generation:    7, stored 2026-12-06T13:30:00Z (30m 0s ago)"),
            "{text}"
        );
        assert!(text.contains("desired state: current"), "{text}");
        assert!(text.contains("ns                   web"), "{text}");
    }

    #[test]
    fn a_down_link_and_a_stopped_agent_and_a_fallback_are_spelled_out() {
        let mut f = file(LinkStatus::Down {
            since: "2026-12-06T12:00:00Z".into(),
            endpoint: "https://hub:7443".into(),
            last_error: "connecting to hub https://hub:7443: connection refused".into(),
        });
        f.desired_fallback = Some("desired.snapshot is corrupt: checksum".into());
        let r = StatusReport {
            file: f,
            agent_running: false,
            generation_stored: None,
        };
        let text = render(&r, now());
        assert!(text.contains("agent:         NOT RUNNING"), "{text}");
        assert!(
            text.contains("at 2026-12-06T13:59:00Z (1m 0s ago)"),
            "{text}"
        );
        assert!(
            text.contains("DOWN since 2026-12-06T12:00:00Z (2h 0m ago), retrying https://hub:7443"),
            "{text}"
        );
        assert!(
            text.contains("last error: connecting to hub https://hub:7443: connection refused")
        );
        assert!(
            text.contains("desired state: PREVIOUS GOOD SNAPSHOT, the current file is unusable"),
            "{text}"
        );
    }

    #[test]
    fn json_report_is_the_file_plus_what_was_checked() {
        let r = StatusReport {
            file: file(LinkStatus::NotConfigured),
            agent_running: true,
            generation_stored: Some("2026-12-06T13:30:00Z".into()),
        };
        let v = serde_json::to_value(&r).expect("json");
        assert_eq!(v["device"], "d1");
        assert_eq!(v["agent_running"], true);
        assert_eq!(v["generation"], 7);
        assert_eq!(v["generation_stored"], "2026-12-06T13:30:00Z");
        assert_eq!(v["link"]["state"], "not_configured");
        assert_eq!(v["agent"]["pid"], 42);
        assert_eq!(v["pods"][0]["name"], "web");
        let back: StatusReport = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, r);
    }

    #[test]
    fn the_report_reads_the_state_directory() {
        let dir = tempfile::tempdir().expect("dir");
        let mut f = file(LinkStatus::NotConfigured);
        f.agent = Some(AgentProcess::current());
        std::fs::write(
            dir.path().join(statusfile::FILE),
            serde_json::to_vec(&f).expect("json"),
        )
        .expect("write");
        let r = report(dir.path()).expect("report");
        assert!(r.agent_running, "this process wrote it and runs");
        // Generation 7 but no snapshot file: no stored time rather than a wrong one.
        assert_eq!(r.generation_stored, None);
        let missing = report(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(
            missing.contains("status.json") && missing.contains("has not run"),
            "{missing}"
        );
    }
}
