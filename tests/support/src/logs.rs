//! Printing component logs when a test fails.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How many lines of each log a failed test prints.
const FAILURE_LINES: usize = 60;
/// Logs are read from their last this many bytes only.
const TAIL_BYTES: u64 = 256 * 1024;

/// Prints the last `lines` lines of `path` to stderr (or why it cannot).
pub(crate) fn dump_file(path: &Path, lines: usize) {
    eprintln!("---- last {lines} lines of {} ----", path.display());
    match tail(path, lines) {
        Ok(text) => eprintln!("{text}"),
        Err(e) => eprintln!("(cannot read {}: {e})", path.display()),
    }
}

/// Prints the tail of every `*.log` in `dir`.
pub(crate) fn dump_dir(dir: &Path, lines: usize) {
    let mut logs: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect(),
        Err(e) => {
            eprintln!("(cannot list component logs in {}: {e})", dir.display());
            return;
        }
    };
    logs.sort();
    for log in logs {
        dump_file(&log, lines);
    }
}

fn tail(path: &Path, lines: usize) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].join("\n"))
}

/// Prints the stack's component logs, and any files added, when dropped during a panic (a
/// failing test). Nothing is printed when the test passes.
#[derive(Debug)]
pub struct LogsOnFailure {
    dir: PathBuf,
    extra: Vec<PathBuf>,
}

impl LogsOnFailure {
    pub(crate) fn new(dir: PathBuf) -> Self {
        LogsOnFailure {
            dir,
            extra: Vec::new(),
        }
    }

    /// Also print this file (e.g. the log of a hub or agent the test started).
    pub fn add_file(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.extra.push(path.into());
        self
    }
}

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("==== test failed: component logs ====");
            dump_dir(&self.dir, FAILURE_LINES);
            for file in &self.extra {
                dump_file(file, FAILURE_LINES);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_returns_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("fleetlet-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("c.log");
        let text: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&file, text).expect("write log");
        assert_eq!(tail(&file, 2).expect("tail"), "line 99\nline 100");
        assert_eq!(tail(&file, 1000).expect("tail").lines().count(), 100);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
