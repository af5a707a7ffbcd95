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
    /// HTTP GET; any answer is success (the kubelet's handler does not look at the status:
    /// only a request that gets no answer fails the hook).
    HttpGet(HttpGetAction),
    /// Sleep this long.
    Sleep(Duration),
}

/// The kubelet's minimum time a container gets to stop after its preStop hook.
pub const MIN_STOP_AFTER_PRESTOP: Duration = Duration::from_secs(2);

/// What a hook that ran did besides succeeding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookRan {
    /// An HTTPS handler a plain HTTP server answered, retried in HTTP with success: the message
    /// of the kubelet's `LifecycleHTTPFallback` Warning about the pod.
    pub http_fallback: Option<String>,
}

/// Run `hook` in `container_id` (named `container`), bounded by `timeout`. The error says what
/// failed, in the kubelet's words.
pub async fn run_hook<R: ContainerRuntime>(
    rt: &R,
    container: &str,
    container_id: &str,
    default_host: &str,
    hook: &HookAction,
    timeout: Duration,
) -> Result<HookRan, String> {
    match hook {
        HookAction::Exec(cmd) => match rt.exec(container_id, cmd, timeout).await {
            Ok(0) => Ok(HookRan::default()),
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
            match get.hook_status(default_host, timeout).await {
                Ok(r) => Ok(HookRan {
                    http_fallback: r.http_fallback,
                }),
                Err(e) => Err(format!(
                    "HTTP lifecycle hook ({path}) for Container {container:?} failed - error: {e}"
                )),
            }
        }
        HookAction::Sleep(d) => {
            tokio::time::sleep((*d).min(timeout)).await;
            Ok(HookRan::default())
        }
    }
}
