//! The lifecycle of one container as an explicit state machine.
//!
//! `ContainerLifecycle::observe` is the single transition function: it takes what the runtime
//! shows (or what an action produced) and moves the state; `next_action` says what the
//! reconciler should do about it. `status()` yields the Kubernetes `ContainerState` view.

use std::time::Duration;

use jiff::Timestamp;
use tokio::time::Instant;

use super::spec::RestartPolicy;

/// Initial CrashLoopBackOff delay.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(10);
/// CrashLoopBackOff cap.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// How long ErrImagePull is reported before it turns into ImagePullBackOff.
pub const PULL_ERROR_SHOWN: Duration = Duration::from_secs(5);
/// A container that ran this long before exiting starts over at the initial backoff.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);

/// Why a container is waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// Not created yet (or being created).
    ContainerCreating,
    /// Waiting for init containers.
    PodInitializing,
    /// The last pull failed.
    ErrImagePull,
    /// Pull failed repeatedly; waiting before the next attempt.
    ImagePullBackOff,
    /// Image absent and pullPolicy is Never.
    ErrImageNeverPull,
    /// Referenced ConfigMap/Secret key missing, or similar.
    CreateContainerConfigError,
    /// Podman refused to create or start it.
    CreateContainerError,
    /// Exited; waiting for the backoff before restarting.
    CrashLoopBackOff,
}

impl WaitReason {
    /// The Kubernetes reason string.
    pub fn as_str(&self) -> &'static str {
        match self {
            WaitReason::ContainerCreating => "ContainerCreating",
            WaitReason::PodInitializing => "PodInitializing",
            WaitReason::ErrImagePull => "ErrImagePull",
            WaitReason::ImagePullBackOff => "ImagePullBackOff",
            WaitReason::ErrImageNeverPull => "ErrImageNeverPull",
            WaitReason::CreateContainerConfigError => "CreateContainerConfigError",
            WaitReason::CreateContainerError => "CreateContainerError",
            WaitReason::CrashLoopBackOff => "CrashLoopBackOff",
        }
    }
}

/// A finished run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    /// Exit code.
    pub exit_code: i32,
    /// "Completed", "Error" or "OOMKilled".
    pub reason: String,
    /// When it started.
    pub started_at: Option<Timestamp>,
    /// When it finished.
    pub finished_at: Option<Timestamp>,
    /// Podman container id of that run.
    pub container_id: String,
    /// The termination message (terminationMessagePath, or the log tail with
    /// FallbackToLogsOnError).
    pub message: Option<String>,
}

/// Where a container is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Not running; `reason` says why.
    Waiting {
        /// Reason.
        reason: WaitReason,
        /// Detail for humans.
        message: Option<String>,
    },
    /// Running since `started_at`.
    Running {
        /// Start time.
        started_at: Option<Timestamp>,
    },
    /// Finished and will not be restarted (by policy), or is about to be.
    Terminated(Termination),
}

/// What the runtime shows or what an action produced.
#[derive(Debug, Clone)]
pub enum Observation {
    /// No container exists.
    Absent,
    /// Created but never started.
    Created,
    /// Running.
    Running {
        /// Start time.
        started_at: Option<Timestamp>,
    },
    /// Exited.
    Exited(Termination),
    /// Pull failed with this message.
    PullFailed(String),
    /// Image missing and pullPolicy Never.
    NeverPull(String),
    /// Configuration could not be resolved.
    ConfigError(String),
    /// Create/start failed.
    RuntimeError(String),
}

/// What the reconciler should do next for this container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Pull (if needed), create and start.
    Create,
    /// Start the existing container (again).
    Start,
    /// Nothing until `Instant` (backoff) — then look again.
    WaitUntil(Instant),
    /// Running; probe it.
    Probe,
    /// Finished for good.
    Done,
}

/// One container's lifecycle.
#[derive(Debug, Clone)]
pub struct ContainerLifecycle {
    /// Current state.
    pub state: State,
    /// Restarts so far.
    pub restart_count: u32,
    /// The previous run's end.
    pub last_termination: Option<Termination>,
    /// Ready (readiness probe passing, or running without one).
    pub ready: bool,
    /// Startup probe passed (or none).
    pub started: bool,
    /// Earliest next start attempt (CrashLoopBackOff / ImagePullBackOff).
    backoff_until: Option<Instant>,
    /// Delay to apply after the next failure.
    next_delay: Duration,
    /// Consecutive pull failures.
    pull_failures: u32,
    /// When the last pull failed.
    pull_failed_at: Option<Instant>,
    /// Finish time of the last exit already counted, so one exit is counted once.
    counted_finish: Option<Timestamp>,
    /// Nothing observed yet in this agent run.
    first_observation: bool,
}

impl Default for ContainerLifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl ContainerLifecycle {
    /// A container not created yet.
    pub fn new() -> Self {
        Self {
            state: State::Waiting {
                reason: WaitReason::ContainerCreating,
                message: None,
            },
            restart_count: 0,
            last_termination: None,
            ready: false,
            started: false,
            backoff_until: None,
            next_delay: BACKOFF_INITIAL,
            pull_failures: 0,
            pull_failed_at: None,
            counted_finish: None,
            first_observation: true,
        }
    }

    /// Restore counters persisted across an agent restart.
    pub fn with_restart_count(mut self, n: u32) -> Self {
        self.restart_count = n;
        self
    }

    /// The transition function. `policy` decides whether an exited container is restarted;
    /// `is_init` makes `Always` behave like `OnFailure`, as the kubelet does for init containers.
    pub fn observe(
        &mut self,
        obs: Observation,
        policy: RestartPolicy,
        is_init: bool,
        now: Instant,
    ) {
        let first = std::mem::replace(&mut self.first_observation, false);
        match obs {
            Observation::Absent | Observation::Created => {
                // Keep a backoff/terminated state: those decide whether to create again.
                if matches!(self.state, State::Running { .. }) {
                    self.state = State::Waiting {
                        reason: WaitReason::ContainerCreating,
                        message: None,
                    };
                }
                self.ready = false;
            }
            Observation::Running { started_at } => {
                self.pull_failures = 0;
                if !matches!(self.state, State::Running { .. }) {
                    self.started = false;
                    self.ready = false;
                }
                self.state = State::Running { started_at };
            }
            Observation::Exited(t) => {
                self.ready = false;
                self.started = false;
                let fresh = self.counted_finish != t.finished_at || t.finished_at.is_none();
                if !fresh && !matches!(self.state, State::Running { .. }) {
                    return;
                }
                self.counted_finish = t.finished_at;
                let ran = match (t.started_at, t.finished_at) {
                    (Some(s), Some(f)) => f.duration_since(s).unsigned_abs(),
                    _ => Duration::ZERO,
                };
                if ran >= BACKOFF_RESET_AFTER {
                    self.next_delay = BACKOFF_INITIAL;
                }
                let restart = match policy {
                    RestartPolicy::Always if !is_init => true,
                    RestartPolicy::Always | RestartPolicy::OnFailure => t.exit_code != 0,
                    RestartPolicy::Never => false,
                };
                if restart && first {
                    // Exited before this agent run (a reboot that kept the stopped containers,
                    // or an agent restart): like the kubelet, whose backoff lives in memory,
                    // restart at once.
                    self.backoff_until = None;
                    self.last_termination = Some(t);
                    self.state = State::Waiting {
                        reason: WaitReason::CrashLoopBackOff,
                        message: Some(
                            "restarting container that exited before the agent started".into(),
                        ),
                    };
                } else if restart {
                    self.backoff_until = Some(now + self.next_delay);
                    let message = format!(
                        "back-off {}s restarting failed container",
                        self.next_delay.as_secs()
                    );
                    self.next_delay = (self.next_delay * 2).min(BACKOFF_MAX);
                    self.last_termination = Some(t);
                    self.state = State::Waiting {
                        reason: WaitReason::CrashLoopBackOff,
                        message: Some(message),
                    };
                } else {
                    self.state = State::Terminated(t);
                }
            }
            Observation::PullFailed(message) => {
                self.pull_failures += 1;
                self.pull_failed_at = Some(now);
                let delay = (BACKOFF_INITIAL * 2u32.saturating_pow(self.pull_failures - 1))
                    .min(BACKOFF_MAX);
                self.backoff_until = Some(now + delay);
                // The first failure reports ErrImagePull; later ones (while backing off)
                // ImagePullBackOff, as the kubelet does.
                let reason = if self.pull_failures == 1 {
                    WaitReason::ErrImagePull
                } else {
                    WaitReason::ImagePullBackOff
                };
                self.state = State::Waiting {
                    reason,
                    message: Some(message),
                };
            }
            Observation::NeverPull(message) => {
                self.backoff_until = Some(now + BACKOFF_INITIAL);
                self.state = State::Waiting {
                    reason: WaitReason::ErrImageNeverPull,
                    message: Some(message),
                };
            }
            Observation::ConfigError(message) => {
                self.backoff_until = Some(now + BACKOFF_INITIAL);
                self.state = State::Waiting {
                    reason: WaitReason::CreateContainerConfigError,
                    message: Some(message),
                };
            }
            Observation::RuntimeError(message) => {
                self.backoff_until = Some(now + BACKOFF_INITIAL);
                self.state = State::Waiting {
                    reason: WaitReason::CreateContainerError,
                    message: Some(message),
                };
            }
        }
    }

    /// ErrImagePull is shown for a while after a failed pull; then ImagePullBackOff until the
    /// next attempt, as the kubelet shows it.
    pub fn mark_pull_backoff(&mut self, now: Instant) {
        if self
            .pull_failed_at
            .is_none_or(|at| now.saturating_duration_since(at) < PULL_ERROR_SHOWN)
        {
            return;
        }
        if let State::Waiting {
            reason: reason @ WaitReason::ErrImagePull,
            ..
        } = &mut self.state
        {
            *reason = WaitReason::ImagePullBackOff;
        }
    }

    /// The container's spec changed (e.g. a new image) and its run `t` was killed to create it
    /// anew: as for the kubelet, that counts as a restart, the killed run becomes the last state,
    /// and no back-off applies.
    pub fn replaced(&mut self, t: Termination) {
        self.restart_count += 1;
        self.counted_finish = t.finished_at;
        self.last_termination = Some(t);
        self.backoff_until = None;
        self.ready = false;
        self.started = false;
        self.state = State::Waiting {
            reason: WaitReason::ContainerCreating,
            message: None,
        };
    }

    /// A restart is about to happen (the backoff elapsed): count it.
    pub fn restarting(&mut self) {
        self.restart_count += 1;
        self.backoff_until = None;
    }

    /// What to do, given whether a container exists in the runtime.
    pub fn next_action(&self, exists: bool, now: Instant) -> Action {
        if let Some(until) = self.backoff_until
            && now < until
        {
            return Action::WaitUntil(until);
        }
        match &self.state {
            State::Running { .. } => Action::Probe,
            State::Terminated(_) => Action::Done,
            State::Waiting { reason, .. } => match reason {
                WaitReason::CrashLoopBackOff if exists => Action::Start,
                _ if exists => Action::Start,
                _ => Action::Create,
            },
        }
    }

    /// Finish time of the last exit that was counted (changes once per exit).
    pub fn counted_exit(&self) -> Option<Timestamp> {
        self.counted_finish
    }

    /// True when the container finished for good with exit code 0.
    pub fn succeeded(&self) -> bool {
        matches!(&self.state, State::Terminated(t) if t.exit_code == 0)
    }

    /// True when the container finished for good.
    pub fn finished(&self) -> bool {
        matches!(self.state, State::Terminated(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32, started: i64, finished: i64) -> Observation {
        Observation::Exited(Termination {
            exit_code: code,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            started_at: Some(Timestamp::from_second(started).unwrap()),
            finished_at: Some(Timestamp::from_second(finished).unwrap()),
            container_id: "c".into(),
            message: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn crash_loop_backoff_doubles_to_cap_and_counts_once() {
        let mut l = ContainerLifecycle::new();
        let now = Instant::now();
        l.observe(
            Observation::Running { started_at: None },
            RestartPolicy::Always,
            false,
            now,
        );
        let mut delays = Vec::new();
        for i in 0..7 {
            l.observe(
                exit(1, 100 + i * 2, 101 + i * 2),
                RestartPolicy::Always,
                false,
                now,
            );
            // Observing the same exit again changes nothing.
            l.observe(
                exit(1, 100 + i * 2, 101 + i * 2),
                RestartPolicy::Always,
                false,
                now,
            );
            match l.next_action(true, now) {
                Action::WaitUntil(t) => delays.push((t - now).as_secs()),
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                l.state,
                State::Waiting {
                    reason: WaitReason::CrashLoopBackOff,
                    ..
                }
            ));
            assert_eq!(
                l.next_action(true, now + Duration::from_secs(301)),
                Action::Start
            );
            l.restarting();
            l.observe(
                Observation::Running { started_at: None },
                RestartPolicy::Always,
                false,
                now,
            );
        }
        assert_eq!(delays, vec![10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(l.restart_count, 7);
        // Ten minutes of running resets the backoff.
        l.observe(exit(1, 1000, 1700), RestartPolicy::Always, false, now);
        assert_eq!(
            l.next_action(true, now),
            Action::WaitUntil(now + BACKOFF_INITIAL)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn exits_from_before_the_agent_started_restart_at_once() {
        let now = Instant::now();
        let mut l = ContainerLifecycle::new().with_restart_count(4);
        l.observe(exit(137, 1, 2), RestartPolicy::Always, false, now);
        assert_eq!(l.next_action(true, now), Action::Start);
        l.restarting();
        assert_eq!(l.restart_count, 5);
        l.observe(
            Observation::Running { started_at: None },
            RestartPolicy::Always,
            false,
            now,
        );
        l.observe(exit(1, 3, 4), RestartPolicy::Always, false, now);
        assert_eq!(
            l.next_action(true, now),
            Action::WaitUntil(now + BACKOFF_INITIAL)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn policies_decide_restarts() {
        let now = Instant::now();
        let mut never = ContainerLifecycle::new();
        never.observe(exit(1, 1, 2), RestartPolicy::Never, false, now);
        assert_eq!(never.next_action(true, now), Action::Done);
        let mut on_failure = ContainerLifecycle::new();
        on_failure.observe(exit(0, 1, 2), RestartPolicy::OnFailure, false, now);
        assert!(on_failure.succeeded());
        let mut init = ContainerLifecycle::new();
        init.observe(exit(0, 1, 2), RestartPolicy::Always, true, now);
        assert!(
            init.succeeded(),
            "init containers that succeed are done even with Always"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pull_failures_go_err_then_backoff() {
        let now = Instant::now();
        let mut l = ContainerLifecycle::new();
        l.observe(
            Observation::PullFailed("no".into()),
            RestartPolicy::Always,
            false,
            now,
        );
        assert!(matches!(
            l.state,
            State::Waiting {
                reason: WaitReason::ErrImagePull,
                ..
            }
        ));
        assert_eq!(
            l.next_action(false, now),
            Action::WaitUntil(now + Duration::from_secs(10))
        );
        l.mark_pull_backoff(now + Duration::from_secs(1));
        assert!(matches!(
            l.state,
            State::Waiting {
                reason: WaitReason::ErrImagePull,
                ..
            }
        ));
        l.mark_pull_backoff(now + PULL_ERROR_SHOWN);
        assert!(matches!(
            l.state,
            State::Waiting {
                reason: WaitReason::ImagePullBackOff,
                ..
            }
        ));
        l.observe(
            Observation::PullFailed("no".into()),
            RestartPolicy::Always,
            false,
            now,
        );
        assert_eq!(
            l.next_action(false, now),
            Action::WaitUntil(now + Duration::from_secs(20))
        );
    }
}
