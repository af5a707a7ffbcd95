//! The Kubernetes `PodStatus` of a pod, built from its container lifecycles.

use jiff::Timestamp;
use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::lifecycle::{ContainerLifecycle, State, Termination};
use super::spec::{PodPlan, RestartPolicy};

/// One container as the status needs it.
#[derive(Debug, Clone)]
pub struct ContainerView<'a> {
    /// Container name.
    pub name: &'a str,
    /// Image as specified.
    pub image: &'a str,
    /// Image id ("sha256:...") once known.
    pub image_id: &'a str,
    /// Current Podman container id.
    pub container_id: &'a str,
    /// Its lifecycle.
    pub lifecycle: &'a ContainerLifecycle,
    /// An init container with restartPolicy Always.
    pub sidecar: bool,
}

/// Everything a pod status is built from.
#[derive(Debug, Clone)]
pub struct PodView<'a> {
    /// The pod.
    pub plan: &'a PodPlan,
    /// Init containers in order.
    pub init: Vec<ContainerView<'a>>,
    /// App containers.
    pub app: Vec<ContainerView<'a>>,
    /// Ephemeral containers, in spec order (they never decide the phase or readiness).
    pub ephemeral: Vec<ContainerView<'a>>,
    /// Node address.
    pub host_ip: &'a str,
    /// Pod address.
    pub pod_ip: &'a str,
    /// When the agent accepted the pod.
    pub start_time: Timestamp,
}

/// Pod phase. Sidecars (restartable init containers) never decide it: the pod is over when its
/// app containers are, as in the kubelet.
pub fn phase(v: &PodView<'_>) -> &'static str {
    let regular = || v.init.iter().filter(|c| !c.sidecar);
    let init_failed = regular().any(|c| c.lifecycle.finished() && !c.lifecycle.succeeded());
    if init_failed && v.plan.restart_policy == RestartPolicy::Never {
        return "Failed";
    }
    if !regular().all(|c| c.lifecycle.succeeded()) {
        return "Pending";
    }
    let all_finished = v.app.iter().all(|c| c.lifecycle.finished());
    if all_finished {
        return if v.app.iter().all(|c| c.lifecycle.succeeded()) {
            "Succeeded"
        } else {
            "Failed"
        };
    }
    let any_up = v.app.iter().any(|c| {
        matches!(c.lifecycle.state, State::Running { .. })
            || c.lifecycle.restart_count > 0
            || c.lifecycle.finished()
    });
    if any_up { "Running" } else { "Pending" }
}

/// The init containers that keep the pod from being Initialized: a regular one until it
/// succeeded, a sidecar until it started (or ended with the pod).
fn incomplete_init<'a>(v: &'a PodView<'_>) -> Vec<&'a str> {
    v.init
        .iter()
        .filter(|c| {
            !if c.sidecar {
                c.lifecycle.finished()
                    || c.lifecycle.started && matches!(c.lifecycle.state, State::Running { .. })
            } else {
                c.lifecycle.succeeded()
            }
        })
        .map(|c| c.name)
        .collect()
}

/// The containers whose readiness counts and are not ready: sidecars, then app containers.
fn unready<'a>(v: &'a PodView<'_>) -> Vec<&'a str> {
    v.init
        .iter()
        .filter(|c| c.sidecar)
        .chain(v.app.iter())
        .filter(|c| !c.lifecycle.ready)
        .map(|c| c.name)
        .collect()
}

/// A list of names as Go's `%s` prints a `[]string`: `[a b]`.
fn go_list(names: &[&str]) -> String {
    format!("[{}]", names.join(" "))
}

fn time(t: Option<Timestamp>) -> Option<Time> {
    t.map(Time)
}

fn terminated(t: &Termination) -> k8s::ContainerStateTerminated {
    k8s::ContainerStateTerminated {
        exit_code: t.exit_code,
        reason: Some(t.reason.clone()),
        started_at: time(t.started_at),
        finished_at: time(t.finished_at),
        container_id: (!t.container_id.is_empty()).then(|| format!("podman://{}", t.container_id)),
        message: t.message.clone(),
        ..Default::default()
    }
}

fn container_status(c: &ContainerView<'_>) -> k8s::ContainerStatus {
    let l = c.lifecycle;
    let state = match &l.state {
        State::Waiting { reason, message } => k8s::ContainerState {
            waiting: Some(k8s::ContainerStateWaiting {
                reason: Some(reason.as_str().into()),
                message: message.clone(),
            }),
            ..Default::default()
        },
        State::Running { started_at } => k8s::ContainerState {
            running: Some(k8s::ContainerStateRunning {
                started_at: time(*started_at),
            }),
            ..Default::default()
        },
        State::Terminated(t) => k8s::ContainerState {
            terminated: Some(terminated(t)),
            ..Default::default()
        },
    };
    k8s::ContainerStatus {
        name: c.name.to_owned(),
        image: c.image.to_owned(),
        image_id: c.image_id.to_owned(),
        container_id: (!c.container_id.is_empty()).then(|| format!("podman://{}", c.container_id)),
        ready: l.ready,
        started: Some(matches!(l.state, State::Running { .. }) && l.started),
        restart_count: l.restart_count as i32,
        state: Some(state),
        last_state: l.last_termination.as_ref().map(|t| k8s::ContainerState {
            terminated: Some(terminated(t)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An init container's status: one that is not a sidecar is ready once it completed (exit 0),
/// as the kubelet's prober manager marks it.
fn init_container_status(c: &ContainerView<'_>) -> k8s::ContainerStatus {
    let mut s = container_status(c);
    if !c.sidecar
        && let State::Terminated(t) = &c.lifecycle.state
    {
        s.ready = t.exit_code == 0;
    }
    s
}

/// An ephemeral container's status: the same state shapes as a container's, never ready (it
/// is not probed and serves nothing), never restarted.
fn ephemeral_status(c: &ContainerView<'_>) -> k8s::ContainerStatus {
    let mut s = container_status(c);
    s.ready = false;
    s
}

/// status.observedGeneration and each condition's: the pod generation the status describes, as
/// the kubelet reports it (PodObservedGenerationTracking); none for a pod without one.
fn observed(generation: i64) -> Option<i64> {
    (generation > 0).then_some(generation)
}

fn condition(
    kind: &str,
    ok: bool,
    reason: Option<&str>,
    message: Option<String>,
    since: Timestamp,
    generation: i64,
) -> k8s::PodCondition {
    k8s::PodCondition {
        observed_generation: observed(generation),
        type_: kind.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: (!ok)
            .then(|| reason.unwrap_or_default().to_owned())
            .filter(|r| !r.is_empty()),
        message: message.filter(|_| !ok),
        last_transition_time: Some(Time(since)),
        ..Default::default()
    }
}

/// The Kubernetes PodStatus.
pub fn pod_status(v: &PodView<'_>) -> k8s::PodStatus {
    let phase = phase(v);
    let incomplete = incomplete_init(v);
    // Sidecars' readiness counts, as in the kubelet.
    let unready = unready(v);
    let since = v.start_time;
    let generation = v.plan.meta.generation;
    let terminal = phase == "Succeeded" || phase == "Failed";
    // The kubelet's reasons and messages (pkg/kubelet/status/generate.go): a finished pod's
    // containers are not ready because it completed; otherwise the names say which.
    let (ready_reason, ready_message) = if terminal {
        ("PodCompleted", None)
    } else {
        (
            "ContainersNotReady",
            Some(format!(
                "containers with unready status: {}",
                go_list(&unready)
            )),
        )
    };
    let containers_ready = unready.is_empty() && !terminal;
    let init_message = format!(
        "containers with incomplete status: {}",
        go_list(&incomplete)
    );
    k8s::PodStatus {
        phase: Some(phase.into()),
        conditions: Some(vec![
            condition("PodScheduled", true, None, None, since, generation),
            condition(
                "Initialized",
                incomplete.is_empty(),
                Some("ContainersNotInitialized"),
                Some(init_message),
                since,
                generation,
            ),
            condition(
                "ContainersReady",
                containers_ready,
                Some(ready_reason),
                ready_message.clone(),
                since,
                generation,
            ),
            condition(
                "Ready",
                containers_ready,
                Some(ready_reason),
                ready_message,
                since,
                generation,
            ),
        ]),
        host_ip: Some(v.host_ip.to_owned()).filter(|s| !s.is_empty()),
        host_ips: Some(vec![k8s::HostIP {
            ip: v.host_ip.to_owned(),
        }])
        .filter(|_| !v.host_ip.is_empty()),
        pod_ip: Some(v.pod_ip.to_owned()).filter(|s| !s.is_empty()),
        pod_ips: Some(vec![k8s::PodIP {
            ip: v.pod_ip.to_owned(),
        }])
        .filter(|_| !v.pod_ip.is_empty()),
        start_time: Some(Time(v.start_time)),
        init_container_statuses: Some(v.init.iter().map(init_container_status).collect())
            .filter(|s: &Vec<_>| !s.is_empty()),
        container_statuses: Some(v.app.iter().map(container_status).collect()),
        ephemeral_container_statuses: Some(v.ephemeral.iter().map(ephemeral_status).collect())
            .filter(|s: &Vec<_>| !s.is_empty()),
        qos_class: Some(qos(v.plan).into()),
        observed_generation: observed(generation),
        ..Default::default()
    }
}

/// A pod that is not run at all: failed with `reason` and `message`.
pub fn failed_status(
    reason: &str,
    message: &str,
    host_ip: &str,
    now: Timestamp,
    generation: i64,
) -> k8s::PodStatus {
    k8s::PodStatus {
        observed_generation: observed(generation),
        phase: Some("Failed".into()),
        reason: Some(reason.into()),
        message: Some(message.into()),
        host_ip: Some(host_ip.to_owned()).filter(|s| !s.is_empty()),
        start_time: Some(Time(now)),
        conditions: Some(vec![condition(
            "PodScheduled",
            true,
            None,
            None,
            now,
            generation,
        )]),
        ..Default::default()
    }
}

pub fn qos(plan: &PodPlan) -> &'static str {
    let all = plan.init_containers.iter().chain(&plan.containers);
    let mut any = false;
    let mut guaranteed = true;
    for c in all {
        if c.requests.cpu_millis > 0 || c.requests.memory_bytes > 0 || c.limits.is_some() {
            any = true;
        }
        match c.limits {
            Some(l)
                if l.cpu_millis > 0
                    && l.memory_bytes > 0
                    && l.cpu_millis == c.requests.cpu_millis
                    && l.memory_bytes == c.requests.memory_bytes => {}
            _ => guaranteed = false,
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}
