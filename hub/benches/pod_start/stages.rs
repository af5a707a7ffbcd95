//! Stage timestamps of each pod's start, read back from the logs of the real hub and agent
//! processes (tracing's default text format: an RFC 3339 timestamp with microseconds, the level,
//! the target, the message, then `key=value` fields) and matched to the bench's own observations.

use std::collections::HashMap;
use std::path::Path;

use k8s_openapi::jiff::Timestamp;

/// One log line: when, its message and its fields.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: Timestamp,
    pub message: String,
    pub fields: HashMap<String, String>,
}

impl Line {
    fn field(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }
}

/// Removes ANSI colour sequences (`ESC [ ... m`), which tracing writes unless told otherwise.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for n in chars.by_ref() {
                if n.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Parses one line; `None` for lines that are not tracing events (continuations, other output).
fn parse_line(raw: &str) -> Option<Line> {
    let line = strip_ansi(raw);
    let mut parts = line.split_whitespace();
    let at: Timestamp = parts.next()?.parse().ok()?;
    let _level = parts.next()?;
    let target = parts.next()?;
    if !target.ends_with(':') {
        return None;
    }
    let rest: Vec<&str> = parts.collect();
    // The message runs until the first `key=value` token; values here have no spaces.
    let split = rest
        .iter()
        .position(|t| {
            t.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        })
        .unwrap_or(rest.len());
    let message = rest[..split].join(" ");
    let fields = rest[split..]
        .iter()
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect();
    Some(Line {
        at,
        message,
        fields,
    })
}

/// Every tracing line of the log at `path` (empty when it cannot be read).
pub fn read_log(path: &Path) -> Vec<Line> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(parse_line)
        .collect()
}

/// What the bench itself saw of one pod.
#[derive(Debug, Clone)]
pub struct Observed {
    pub name: String,
    pub node: String,
    pub bound: Timestamp,
    pub running: Timestamp,
}

/// The stage boundaries of one pod, in order; `None` where a log line was not found.
pub const STAGES: [&str; 9] = [
    "bound (watch) -> hub hands snapshot to link",
    "hub hands snapshot -> agent receives it",
    "agent receives -> snapshot persisted (fsync) and acked",
    "persisted -> podman pod created",
    "podman pod created -> container started",
    "container started -> agent publishes Running",
    "agent publishes Running -> hub receives it",
    "hub receives Running -> pods/status written",
    "pods/status written -> watch sees Running+Ready",
];

/// The logs of one run, indexed for matching.
pub struct RunLogs {
    hub: Vec<Line>,
    agents: HashMap<String, Vec<Line>>,
}

impl RunLogs {
    /// Reads the hub's log and the log of every agent (`device` → log path).
    pub fn read(hub: &Path, agents: &[(String, std::path::PathBuf)]) -> Self {
        Self {
            hub: read_log(hub),
            agents: agents
                .iter()
                .map(|(d, p)| (d.clone(), read_log(p)))
                .collect(),
        }
    }

    fn first_hub(&self, after: Timestamp, f: impl Fn(&Line) -> bool) -> Option<&Line> {
        self.hub.iter().find(|l| l.at >= after && f(l))
    }

    fn first_agent(&self, device: &str, f: impl Fn(&Line) -> bool) -> Option<&Line> {
        self.agents.get(device)?.iter().find(|l| f(l))
    }

    /// The timestamps of the stage boundaries of `pod` (10 points for 9 stages). The hub's
    /// snapshot is the first one handed for the pod's device after the pod was bound (minus a
    /// little slack: the hub's watch may see the binding before the bench's does).
    pub fn points(&self, pod: &Observed, namespace: &str) -> [Option<Timestamp>; 10] {
        let slack = k8s_openapi::jiff::SignedDuration::from_millis(200);
        let after = pod.bound.checked_sub(slack).unwrap_or(pod.bound);
        let handed = self.first_hub(after, |l| {
            l.message == "snapshot handed to the link" && l.field("device") == Some(&pod.node)
        });
        let generation = handed
            .and_then(|l| l.field("generation"))
            .map(str::to_owned);
        let by_gen = |msg: &str| {
            generation.as_deref().and_then(|g| {
                self.first_agent(&pod.node, |l| {
                    l.message == msg && l.field("generation") == Some(g)
                })
            })
        };
        let received = by_gen("desired snapshot received");
        let stored = by_gen("desired snapshot stored");
        let by_pod = |msg: &str, extra: &dyn Fn(&Line) -> bool| {
            self.first_agent(&pod.node, |l| {
                l.message == msg && l.field("pod") == Some(&pod.name) && extra(l)
            })
        };
        let pod_created = by_pod("created podman pod", &|_| true);
        let started = by_pod("container started", &|_| true);
        let published = by_pod("pod status changed", &|l| {
            l.field("phase") == Some("Running")
        });
        let is_pod =
            |l: &Line| l.field("pod") == Some(&pod.name) && l.field("namespace") == Some(namespace);
        let hub_received =
            self.first_hub(after, |l| l.message == "pod reported Running" && is_pod(l));
        let written = self.first_hub(after, |l| {
            l.message == "pod status written" && l.field("phase") == Some("Running") && is_pod(l)
        });
        [
            Some(pod.bound),
            handed.map(|l| l.at),
            received.map(|l| l.at),
            stored.map(|l| l.at),
            pod_created.map(|l| l.at),
            started.map(|l| l.at),
            published.map(|l| l.at),
            hub_received.map(|l| l.at),
            written.map(|l| l.at),
            Some(pod.running),
        ]
    }
}
