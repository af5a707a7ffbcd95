//! The fault suite's shared record of outcomes.
//!
//! Every fault test calls [`record`] once per fault it injected, after it has checked the system
//! converged (or found it did not). The outcomes are appended as JSON lines to one report file, and
//! `make faults` prints them as a table with the `faults-summary` binary, which also fails when any
//! fault did not recover or lost or duplicated a pod.
//!
//! The long variants (minutes-long partitions, a minute of flapping) run only when
//! [`full_suite`] is true (`FLEETLET_FAULTS_FULL=1`, set by `make faults`); `make test` runs the
//! representative short variants.
#![forbid(unsafe_code)]

pub mod fixture;

use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What one injected fault did to the system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Short name of the fault as injected, e.g. "partition 30 s" or "kill -9 hub during rollout".
    pub fault: String,
    /// Whether the system came back to the desired state with true statuses.
    pub recovered: bool,
    /// Seconds from the end of the fault (heal, restart) until the system had converged.
    pub converge_secs: Option<f64>,
    /// Pods that should run and did not come back.
    pub pods_lost: u32,
    /// Pods (or containers of one pod UID) that ran more than once.
    pub pods_duplicated: u32,
    /// One line on what was checked or what went wrong.
    pub detail: String,
}

/// Errors of the report file.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("fault report {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fault report {path} line {line}: {source}")]
    Parse {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

/// Where outcomes go: `$FLEETLET_FAULTS_REPORT`, else `target/faults/report.jsonl` of the workspace.
pub fn report_path() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEETLET_FAULTS_REPORT") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/faults/report.jsonl")
}

/// True when the long variants of the faults should run (`FLEETLET_FAULTS_FULL=1`).
pub fn full_suite() -> bool {
    std::env::var("FLEETLET_FAULTS_FULL").is_ok_and(|v| v == "1")
}

/// Appends one outcome to the report (one `write` of one line, so parallel tests do not interleave).
pub fn record(outcome: &Outcome) -> Result<(), ReportError> {
    let path = report_path();
    let io = |source| ReportError::Io {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut line = serde_json::to_string(outcome).map_err(|source| ReportError::Parse {
        path: path.clone(),
        line: 0,
        source,
    })?;
    line.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io)?;
    file.write_all(line.as_bytes()).map_err(io)
}

/// Reads every outcome recorded so far (an absent report is empty).
pub fn read_report(path: &std::path::Path) -> Result<Vec<Outcome>, ReportError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ReportError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| ReportError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// Whether an outcome passes the suite's bar: recovered, nothing lost, nothing duplicated.
pub fn passed(o: &Outcome) -> bool {
    o.recovered && o.pods_lost == 0 && o.pods_duplicated == 0
}

/// Renders outcomes as the suite's summary table.
pub fn render_table(outcomes: &[Outcome]) -> String {
    let fault_w = outcomes
        .iter()
        .map(|o| o.fault.len())
        .chain([5])
        .max()
        .unwrap_or(5);
    let mut out = format!(
        "{:<fault_w$}  {:<9}  {:>10}  {:>4}  {:>10}  detail\n",
        "fault", "recovered", "converge s", "lost", "duplicated"
    );
    for o in outcomes {
        let secs = o
            .converge_secs
            .map_or_else(|| "-".to_owned(), |s| format!("{s:.2}"));
        out.push_str(&format!(
            "{:<fault_w$}  {:<9}  {:>10}  {:>4}  {:>10}  {}\n",
            o.fault,
            if o.recovered { "yes" } else { "NO" },
            secs,
            o.pods_lost,
            o.pods_duplicated,
            o.detail
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(fault: &str, recovered: bool, lost: u32) -> Outcome {
        Outcome {
            fault: fault.into(),
            recovered,
            converge_secs: Some(1.5),
            pods_lost: lost,
            pods_duplicated: 0,
            detail: "checked".into(),
        }
    }

    #[test]
    fn report_round_trips_and_table_marks_failures() {
        let dir = std::env::temp_dir().join(format!("fleetlet-faults-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("report.jsonl");
        let _ = std::fs::remove_file(&path);
        let a = outcome("partition 30 s", true, 0);
        let b = outcome("kill -9 agent", false, 1);
        for o in [&a, &b] {
            let mut line = serde_json::to_string(o).unwrap();
            line.push('\n');
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap();
            f.write_all(line.as_bytes()).unwrap();
        }
        let read = read_report(&path).unwrap();
        assert_eq!(read, vec![a.clone(), b.clone()]);
        assert!(passed(&a));
        assert!(!passed(&b));
        let table = render_table(&read);
        assert!(table.contains("partition 30 s  yes"), "{table}");
        assert!(table.contains("kill -9 agent   NO"), "{table}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn malformed_report_line_names_the_line() {
        let dir = std::env::temp_dir().join(format!("fleetlet-faults-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("report.jsonl");
        std::fs::write(&path, "{\"fault\":1}\n").unwrap();
        let err = read_report(&path).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
