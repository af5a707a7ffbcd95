//! Container lifecycle hooks (postStart, preStop) and `lifecycle.stopSignal`, as the kubelet runs
//! them: postStart right after the container starts (a failure kills it, and its restart policy
//! decides what follows); preStop before the stop signal, within the pod's grace period, after
//! which the container gets what is left of the grace (at least 2 s) to stop.

use std::time::Duration;

use super::probe::HttpGetAction;
use crate::podman::ContainerRuntime;

/// What a hook does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookAction {
    /// Run a command in the container.
    Exec(Vec<String>),
    /// HTTP GET; any status from 200 to 399 is success.
    HttpGet(HttpGetAction),
    /// Sleep this long.
    Sleep(Duration),
}

/// The kubelet's minimum time a container gets to stop after its preStop hook.
pub const MIN_STOP_AFTER_PRESTOP: Duration = Duration::from_secs(2);

/// Run `hook` in `container_id` (named `container`), bounded by `timeout`. The error says what
/// failed, in the kubelet's words.
pub async fn run_hook<R: ContainerRuntime>(
    rt: &R,
    container: &str,
    container_id: &str,
    default_host: &str,
    hook: &HookAction,
    timeout: Duration,
) -> Result<(), String> {
    match hook {
        HookAction::Exec(cmd) => match rt.exec(container_id, cmd, timeout).await {
            Ok(0) => Ok(()),
            Ok(code) => Err(format!(
                "Exec lifecycle hook ({cmd:?}) for Container {container:?} failed - error: command '{}' exited with {code}",
                cmd.join(" ")
            )),
            Err(e) => Err(format!(
                "Exec lifecycle hook ({cmd:?}) for Container {container:?} failed - error: {e}"
            )),
        },
        HookAction::HttpGet(get) => {
            let path = &get.path;
            match get.status(default_host, timeout).await {
                Ok(code) if (200..400).contains(&code) => Ok(()),
                Ok(code) => Err(format!(
                    "HTTP lifecycle hook ({path}) for Container {container:?} failed - error: HTTP status {code}"
                )),
                Err(e) => Err(format!(
                    "HTTP lifecycle hook ({path}) for Container {container:?} failed - error: {e}"
                )),
            }
        }
        HookAction::Sleep(d) => {
            tokio::time::sleep((*d).min(timeout)).await;
            Ok(())
        }
    }
}

/// A stop signal name (`SIGTERM`, `SIGUSR1`, `SIGRTMIN+1`, …) as its Linux number.
pub fn signal_number(name: &str) -> Option<u32> {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    if let Some(i) = NAMES.iter().position(|n| *n == name) {
        return Some(i as u32 + 1);
    }
    let rt = |rest: &str, base: i64, sign: i64| -> Option<u32> {
        let n: i64 = if rest.is_empty() {
            0
        } else {
            rest.parse().ok()?
        };
        let v = base + sign * n;
        (34..=64).contains(&v).then_some(v as u32)
    };
    if let Some(rest) = name.strip_prefix("SIGRTMIN") {
        return match rest.strip_prefix('+') {
            Some(n) => rt(n, 34, 1),
            None => rt(
                rest.trim_start_matches('-'),
                34,
                if rest.is_empty() { 1 } else { -1 },
            ),
        };
    }
    if let Some(rest) = name.strip_prefix("SIGRTMAX") {
        return match rest.strip_prefix('-') {
            Some(n) => rt(n, 64, -1),
            None if rest.is_empty() => Some(64),
            None => None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("SIGUSR1"), Some(10));
        assert_eq!(signal_number("SIGKILL"), Some(9));
        assert_eq!(signal_number("SIGRTMIN"), Some(34));
        assert_eq!(signal_number("SIGRTMIN+2"), Some(36));
        assert_eq!(signal_number("SIGRTMAX-1"), Some(63));
        assert_eq!(signal_number("SIGNOPE"), None);
    }
}
