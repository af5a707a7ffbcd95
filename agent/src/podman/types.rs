//! Podman libpod API response types, tolerant of the differences between Podman 4.3, 4.9 and 5.x.
//!
//! Only the fields the agent reads are declared; everything else is ignored, so new fields in a
//! later Podman never break parsing. Where a field changed its JSON type between releases (for
//! example `Config.StopSignal`: a number in 4.x, a string such as `"SIGTERM"` in 5.x; and
//! `Config.Entrypoint`: a string in 4.x, an array in 5.x) a small custom deserializer accepts both.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// One entry of `GET /libpod/containers/json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerSummary {
    /// Container id.
    pub id: String,
    /// Container names (Podman gives one).
    #[serde(default, deserialize_with = "null_as_default")]
    pub names: Vec<String>,
    /// Labels set at creation.
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    /// "running", "exited", "created", ...
    #[serde(default)]
    pub state: String,
    /// Whether this is a pod's infra container.
    #[serde(default)]
    pub is_infra: bool,
    /// Start of the current (or last) run, Unix seconds (0 when never started).
    #[serde(default)]
    pub started_at: i64,
    /// Process id of the running container (0 when not running).
    #[serde(default)]
    pub pid: i64,
    /// Image reference it was created from.
    #[serde(default)]
    pub image: String,
}

/// One entry of `GET /libpod/containers/stats?stream=false`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ContainerStats {
    /// Container id.
    #[serde(rename = "ContainerID", default)]
    pub id: String,
    /// CPU time used since the container started, nanoseconds.
    #[serde(rename = "CPUNano", default)]
    pub cpu_nanos: u64,
    /// Memory charged to the container's cgroup, bytes (page cache included).
    #[serde(rename = "MemUsage", default)]
    pub mem_usage: u64,
}

/// `GET /libpod/containers/{id}/json`, the parts the agent uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerInspect {
    /// Container id.
    pub id: String,
    /// Container name.
    #[serde(default)]
    pub name: String,
    /// Image id the container was created from.
    #[serde(default)]
    pub image: String,
    /// Image reference as given at creation.
    #[serde(default)]
    pub image_name: String,
    /// Runtime state.
    pub state: ContainerState,
    /// Container configuration.
    pub config: ContainerConfig,
    /// Restarts done by Podman's own restart policy (the agent does not use one).
    #[serde(default)]
    pub restart_count: u64,
    /// Network settings (the infra container's carry the pod IP).
    #[serde(default)]
    pub network_settings: Option<NetworkSettings>,
}

/// `NetworkSettings` of a container inspect.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkSettings {
    /// Address on the default network (may be empty).
    #[serde(default, rename = "IPAddress")]
    pub ip_address: String,
    /// Per-network endpoints.
    #[serde(default, deserialize_with = "null_as_default")]
    pub networks: BTreeMap<String, NetworkEndpoint>,
}

/// One network endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NetworkEndpoint {
    /// IPv4 address.
    #[serde(default, rename = "IPAddress")]
    pub ip_address: String,
}

impl ContainerInspect {
    /// The container's first IP address, if it has one.
    pub fn ip(&self) -> Option<String> {
        let n = self.network_settings.as_ref()?;
        std::iter::once(&n.ip_address)
            .chain(n.networks.values().map(|e| &e.ip_address))
            .find(|ip| !ip.is_empty())
            .cloned()
    }
}

/// `State` of a container inspect.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerState {
    /// "created", "running", "exited", "stopped", "paused", ...
    #[serde(default)]
    pub status: String,
    /// The main process's PID on the host (0 when not running).
    #[serde(default)]
    pub pid: i64,
    /// PID of the container's monitor process (conmon).
    #[serde(default)]
    pub conmon_pid: i64,
    /// True while the main process runs.
    #[serde(default)]
    pub running: bool,
    /// Exit code of the last run.
    #[serde(default)]
    pub exit_code: i32,
    /// Killed by the kernel's OOM killer.
    #[serde(default, rename = "OOMKilled")]
    pub oom_killed: bool,
    /// Error Podman recorded when starting failed.
    #[serde(default)]
    pub error: String,
    /// RFC 3339; "0001-01-01T00:00:00Z" when never started.
    #[serde(default)]
    pub started_at: String,
    /// RFC 3339; "0001-01-01T00:00:00Z" when never finished.
    #[serde(default)]
    pub finished_at: String,
    /// The container's cgroup, relative to the cgroup root (and, on cgroup v1, to each
    /// controller's hierarchy).
    #[serde(default)]
    pub cgroup_path: String,
}

/// `Config` of a container inspect.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// Labels set at creation.
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    /// Signal sent on stop, normalised to its number (15 for SIGTERM).
    #[serde(default, deserialize_with = "stop_signal")]
    pub stop_signal: Option<u32>,
    /// Entrypoint, normalised to a list (4.x gives a string, 5.x an array).
    #[serde(default, deserialize_with = "string_or_list")]
    pub entrypoint: Vec<String>,
    /// Command.
    #[serde(default, deserialize_with = "string_or_list")]
    pub cmd: Vec<String>,
    /// Seconds between the stop signal and SIGKILL (the pod's grace period).
    #[serde(default)]
    pub stop_timeout: Option<u64>,
}

/// `GET /libpod/images/{name}/json`, the parts the agent uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageInspect {
    /// Image id.
    pub id: String,
    /// Manifest digest, "sha256:...".
    #[serde(default)]
    pub digest: String,
    /// The image's run configuration.
    #[serde(default)]
    pub config: Option<ImageConfig>,
    /// Size in bytes (the kubelet's Pulled Event names it).
    #[serde(default)]
    pub size: u64,
}

/// `Config` of an image inspect, the parts the agent uses.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    /// `USER` of the image ("", "1000", "app", "1000:1000").
    #[serde(default)]
    pub user: String,
}

/// `GET /libpod/containers/{id}/exec` inspect (`/exec/{id}/json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExecInspect {
    /// Still running.
    #[serde(default)]
    pub running: bool,
    /// Exit code once finished.
    #[serde(default)]
    pub exit_code: i32,
}

/// One line of the `GET /libpod/events` stream.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    /// "container", "pod", "image", ...
    #[serde(rename = "Type", default)]
    pub kind: String,
    /// "start", "died", "remove", ...
    #[serde(rename = "Action", default)]
    pub action: String,
    /// The object the event is about.
    #[serde(rename = "Actor", default)]
    pub actor: EventActor,
}

/// `Actor` of an event.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EventActor {
    /// Object id.
    #[serde(rename = "ID", default)]
    pub id: String,
    /// Attributes; for containers, includes their labels.
    #[serde(rename = "Attributes", default, deserialize_with = "null_as_default")]
    pub attributes: BTreeMap<String, String>,
}

/// One line of the image pull stream.
#[derive(Debug, Clone, Deserialize)]
pub struct PullReport {
    /// Set when the pull failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Image id once pulled.
    #[serde(default)]
    pub id: Option<String>,
}

/// Error body of a failed libpod call.
#[derive(Debug, Clone, Deserialize)]
pub struct ErrorBody {
    /// Message, e.g. "no such container".
    #[serde(default, alias = "cause")]
    pub message: String,
}

/// `{"Id": ...}` returned by create calls.
#[derive(Debug, Clone, Deserialize)]
pub struct IdResponse {
    /// Created object id.
    #[serde(rename = "Id", alias = "id")]
    pub id: String,
}

/// `GET /libpod/version`, the parts the agent uses.
#[derive(Debug, Clone, Deserialize)]
pub struct VersionResponse {
    /// Podman version, e.g. "4.3.1" (top-level `Version` in 4.x and 5.x).
    #[serde(rename = "Version", default)]
    pub version: String,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrString {
    Num(u32),
    Str(String),
}

fn stop_signal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Ok(match Option::<NumOrString>::deserialize(d)? {
        None => None,
        Some(NumOrString::Num(0)) => None,
        Some(NumOrString::Num(n)) => Some(n),
        Some(NumOrString::Str(s)) => signal_number(&s),
    })
}

/// Number of a signal given as "SIGTERM", "TERM", "15" or a realtime one ("SIGRTMIN+2",
/// "SIGRTMAX-1"); Linux numbering.
pub fn signal_number(name: &str) -> Option<u32> {
    const NAMES: [&str; 31] = [
        "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
        "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
        "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
    ];
    let n = name.trim();
    if let Ok(v) = n.parse::<u32>() {
        return Some(v);
    }
    let n = n.strip_prefix("SIG").unwrap_or(n);
    if let Some(i) = NAMES.iter().position(|s| *s == n) {
        return Some(i as u32 + 1);
    }
    let realtime = |base: i64, offset: &str, sign: i64| -> Option<u32> {
        let k: i64 = if offset.is_empty() {
            0
        } else {
            offset.parse().ok()?
        };
        let v = base + sign * k;
        (34..=64).contains(&v).then_some(v as u32)
    };
    if let Some(rest) = n.strip_prefix("RTMIN") {
        return match rest.strip_prefix('+') {
            Some(k) => realtime(34, k, 1),
            None if rest.is_empty() => Some(34),
            None => None,
        };
    }
    if let Some(rest) = n.strip_prefix("RTMAX") {
        return match rest.strip_prefix('-') {
            Some(k) => realtime(64, k, -1),
            None if rest.is_empty() => Some(64),
            None => None,
        };
    }
    None
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrList {
    Str(String),
    List(Vec<String>),
}

fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match Option::<StrOrList>::deserialize(d)? {
        None => Vec::new(),
        Some(StrOrList::Str(s)) if s.is_empty() => Vec::new(),
        // Podman 4.x joins the entrypoint with spaces; splitting back is the best it allows.
        Some(StrOrList::Str(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(StrOrList::List(v)) => v,
    })
}

/// True for Podman's "never happened" timestamp.
pub fn is_zero_time(t: &str) -> bool {
    t.is_empty() || t.starts_with("0001-01-01")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> ContainerInspect {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn podman_4_3_inspect_recorded_here_parses() {
        let c = fixture("podman-4.3.1-container-inspect.json");
        assert_eq!(c.config.stop_signal, Some(15));
        assert!(c.config.entrypoint.is_empty());
        assert_eq!(c.config.cmd, vec!["sh", "-c", "sleep 1000"]);
        assert!(c.state.running);
        assert_eq!(c.image_name, "localhost/fleetlet-test/busybox:1");
        assert!(is_zero_time(&c.state.finished_at));
    }

    #[test]
    fn podman_4_9_string_entrypoint_parses() {
        let c = fixture("podman-4.9-container-inspect.json");
        assert_eq!(c.config.stop_signal, Some(15));
        assert_eq!(c.config.entrypoint, vec!["/bin/sh", "-c"]);
    }

    #[test]
    fn podman_5_signal_name_and_entrypoint_array_parse() {
        let c = fixture("podman-5.x-container-inspect.json");
        assert_eq!(c.config.stop_signal, Some(15));
        assert_eq!(c.config.entrypoint, vec!["/bin/sh", "-c"]);
        assert!(c.config.labels.is_empty(), "null labels become empty");
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_number("SIGKILL"), Some(9));
        assert_eq!(signal_number("TERM"), Some(15));
        assert_eq!(signal_number("2"), Some(2));
        assert_eq!(signal_number("SIGUSR1"), Some(10));
        assert_eq!(signal_number("SIGRTMIN"), Some(34));
        assert_eq!(signal_number("SIGRTMIN+2"), Some(36));
        assert_eq!(signal_number("SIGRTMAX-1"), Some(63));
        assert_eq!(signal_number("SIGNOPE"), None);
        assert_eq!(signal_number("SIGNOPE"), None);
    }

    #[test]
    fn events_and_pull_reports_parse() {
        let e: Event = serde_json::from_str(
            r#"{"ID":"abc","Status":"died","Type":"container","Action":"died","Actor":{"ID":"abc","Attributes":{"io.fleetlet.pod-uid":"u1","containerExitCode":"1"}},"time":1,"timeNano":1}"#,
        )
        .unwrap();
        assert_eq!(e.action, "died");
        assert_eq!(e.actor.attributes["io.fleetlet.pod-uid"], "u1");
        let p: PullReport = serde_json::from_str(r#"{"error":"connection refused"}"#).unwrap();
        assert_eq!(p.error.as_deref(), Some("connection refused"));
    }
}
