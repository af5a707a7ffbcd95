//! One task per pod: the only place that acts on that pod, so two reconciles of one pod never
//! overlap. It is level-triggered: every pass compares the desired pod with what Podman shows,
//! acts, publishes the status and says when to look again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleetlet_os::process::{ProcessState, process_state};
use fleetlet_proto::v1::{PodBundle, PodStatusEntry};
use jiff::Timestamp;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::downward::{self, Addresses};
use super::lifecycle::{Action, ContainerLifecycle, Observation, State, Termination};
use super::policy::DevicePolicy;
use super::probe::{Passed, ProbeTracker, Verdict, probe_output};
use super::resize::{ContainerResources, ResizeDesire, Step};
use super::sandbox;
use super::spec::{
    ContainerPlan, EnvVar, EphemeralPlan, PodPlan, PullPolicy, Resources, RestartPolicy,
};
use super::status::{ContainerView, PodView, failed_status, pod_status};
use super::volumes;
use crate::events::{EventType, container_field_path, go_duration, pod_desc};
use crate::podman::types::is_zero_time;
use crate::podman::{
    ContainerCreate, ContainerInspect, ContainerRuntime, ImageVolume, Mount, Namespace, PodCreate,
    PortMapping, labels,
};

/// Status of every pod, keyed by UID (shared with the link and the status file).
pub type StatusMap = Arc<BTreeMap<String, PodStatusEntry>>;

/// What the worker should make true.
#[derive(Debug, Clone)]
pub enum Desire {
    /// Run this pod. `admission` is `Err((reason, message))` when it was rejected.
    Run {
        /// The bundle.
        bundle: Arc<PodBundle>,
        /// The bundle's pod, parsed once and checked against the device policy.
        plan: Arc<Planned>,
        /// Admission verdict.
        admission: Result<(), (String, String)>,
        /// The pod's allocated resources and any pending resize (in-place pod resize).
        resize: Arc<ResizeDesire>,
    },
    /// Stop and remove the pod.
    Remove {
        /// Grace period in seconds from the API's deletion (`deletionGracePeriodSeconds`);
        /// `None`: the grace the containers were created with (the spec's).
        grace_secs: Option<u64>,
    },
}

/// Why a pod cannot run on this device: a pod status reason and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Status reason (`UnsupportedPodSpec`, `DevicePolicy`, `SysctlForbidden`).
    pub reason: String,
    /// What the user sees, naming the field.
    pub message: String,
}

/// A desired pod after parsing: its plan, or why it is refused.
pub type Planned = Result<Arc<PodPlan>, Rejection>;

/// What every worker shares.
pub struct PodContext<R> {
    /// Container runtime.
    pub rt: Arc<R>,
    /// Device name (label value).
    pub device: String,
    /// State directory (volumes live below it).
    pub state_dir: PathBuf,
    /// Node IP for hostIP / hostNetwork podIP.
    pub host_ip: String,
    /// Published statuses.
    pub statuses: watch::Sender<StatusMap>,
    /// Restart counts restored from the status file (uid → container → count).
    pub restored_restarts: BTreeMap<String, BTreeMap<String, u32>>,
    /// What each running container's cgroup held at the last status before an agent restart
    /// (uid → container → that run), so an applied resize is neither lost nor applied again.
    pub restored_resources: BTreeMap<String, BTreeMap<String, crate::statusfile::RestoredRun>>,
    /// Pod start times restored from the status file (uid → startTime).
    pub restored_start_times: BTreeMap<String, Timestamp>,
    /// The device owner's policy.
    pub policy: DevicePolicy,
    /// Allocatable resources (the downward API reads unset limits as these).
    pub allocatable: Resources,
    /// The device's memory capacity in bytes (the Node's; containers' OOM score adjustment is
    /// relative to it).
    pub memory_capacity: u64,
    /// The lowest OOM score adjustment containers can get here (see
    /// [`super::resize::oom_score_floor`]).
    pub oom_score_floor: i32,
    /// Directory of Localhost seccomp profiles.
    pub seccomp_root: PathBuf,
    /// Which credentials pulled each image.
    pub pulled_images: super::pulled_images::PulledImages,
    /// Duration of every reconcile pass, for the hub's metrics.
    pub reconcile_stats: Arc<crate::reconcile_stats::ReconcileStats>,
    /// Kubernetes Events about the pods, sent to the hub by the link.
    pub events: crate::events::EventRecorder,
}

struct Slot {
    lc: ContainerLifecycle,
    container_id: String,
    image_id: String,
    /// The image volume whose pull failed at the last creation (its reference): the pull
    /// back-off is that image's, not the container's.
    volume_pull_failed: Option<String>,
    run_started: Option<Timestamp>,
    startup: Option<ProbeTracker>,
    readiness: Option<ProbeTracker>,
    liveness: Option<ProbeTracker>,
    /// What the cgroup of the container's current run holds: the start of that run and its
    /// resources (the creation's after every start, an in-place update's after one).
    actuated: Option<(Option<Timestamp>, ContainerResources)>,
    /// The resources the container was created with (its `io.fleetlet.resources` label).
    created_with: Option<ContainerResources>,
}

/// A `PodResizeInProgress` condition as the kubelet's status manager keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InProgress {
    /// "" or `Error`.
    reason: String,
    /// The error, when one.
    message: String,
    /// The generation whose resize is in progress.
    generation: i64,
}

/// Runs one pod until it is removed or the agent shuts down.
pub struct PodWorker<R> {
    ctx: Arc<PodContext<R>>,
    uid: String,
    pod_name: String,
    slots: BTreeMap<String, Slot>,
    start_time: Timestamp,
    /// IP of the pod's infra container (bridge network pods).
    pod_ip: String,
    /// The infra container `pod_ip` was read from: its id and the start time Podman listed
    /// (`None` right after this worker started it). While the listing shows the same run, the
    /// address is still valid and the infra container is not inspected again.
    pod_ip_of: Option<(String, Option<i64>)>,
    /// The Podman pod was there at the last look: its infra container in the container listing
    /// then proves it still is, without listing pods.
    pod_known: bool,
    /// Every init container of the pod has succeeded or (a sidecar) started once.
    sidecars_started: bool,
    /// The sandbox died under a pod that never restarts: its containers were killed and no new
    /// sandbox is built (the kubelet's rule for restartPolicy Never).
    sandbox_lost: bool,
    /// A dead sandbox is being replaced: set until the new Podman pod exists.
    renewing: bool,
    /// What each written volume last got (see [`volumes::prepare`]).
    written_volumes: BTreeMap<String, u64>,
    /// The pod's plan as last seen (preStop hooks run at removal, when no plan comes with it).
    last_plan: Option<Arc<PodPlan>>,
    /// Why the pod ended on the device (reason, message): evicted for an emptyDir over its
    /// sizeLimit, or past its activeDeadlineSeconds. Such a pod stays Failed.
    ended: Option<(&'static str, String)>,
    /// When disk-backed emptyDirs with a sizeLimit were last measured.
    usage_checked: Option<Instant>,
    /// Ephemeral containers created once: never created again, whatever becomes of them (the
    /// kubelet starts an ephemeral container only while it has no status).
    ephemeral_created: std::collections::BTreeSet<String>,
    /// Each pod condition's status as last reported and since when (its lastTransitionTime),
    /// kept as the kubelet's status manager keeps it: the time moves only when the status does.
    condition_since: BTreeMap<String, (String, Timestamp)>,
    /// The allocation and pending resize the reconciler gave with the desire.
    resize: Arc<ResizeDesire>,
    /// The allocation seen at the last pass: a different one starts a resize.
    last_allocation: Option<BTreeMap<String, ContainerResources>>,
    /// The pending resize last reported (its Event is recorded once).
    last_pending: Option<super::resize::Pending>,
    /// An allocated resize not yet actuated in every running container.
    in_progress: Option<InProgress>,
    /// Why the last attempt to actuate a resize failed (this pass).
    resize_errors: Vec<String>,
}

/// The hostname of a pod with its own network, as the kubelet makes it: the pod name cut to 63
/// bytes (a DNS label; the kernel takes at most 64) without a trailing '-' or '.'.
pub fn pod_hostname(pod_name: &str) -> String {
    let mut end = pod_name.len().min(63);
    while !pod_name.is_char_boundary(end) {
        end -= 1;
    }
    pod_name[..end].trim_end_matches(['-', '.']).to_owned()
}

/// Podman pod name for a pod UID on a device.
pub fn podman_pod_name(device: &str, uid: &str) -> String {
    format!("fleetlet-{device}-{uid}")
}

impl<R: ContainerRuntime> PodWorker<R> {
    /// A worker for pod `uid`.
    pub fn new(ctx: Arc<PodContext<R>>, uid: String) -> Self {
        let start_time = ctx
            .restored_start_times
            .get(&uid)
            .copied()
            .unwrap_or_else(Timestamp::now);
        Self {
            pod_name: podman_pod_name(&ctx.device, &uid),
            ctx,
            uid,
            slots: BTreeMap::new(),
            start_time,
            pod_ip: String::new(),
            pod_ip_of: None,
            pod_known: false,
            ended: None,
            last_plan: None,
            written_volumes: BTreeMap::new(),
            sidecars_started: false,
            sandbox_lost: false,
            renewing: false,
            usage_checked: None,
            condition_since: BTreeMap::new(),
            ephemeral_created: Default::default(),
            resize: Arc::default(),
            last_allocation: None,
            last_pending: None,
            in_progress: None,
            resize_errors: Vec::new(),
        }
    }

    /// The worker loop: reconcile whenever the desire changes, Podman reports an event for this
    /// pod (`wake`), or the requeue time passes.
    pub async fn run(
        mut self,
        mut desire: watch::Receiver<Desire>,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) {
        loop {
            let current = desire.borrow_and_update().clone();
            let pass = Instant::now();
            let requeue = match current {
                Desire::Remove { grace_secs } => match self.remove(grace_secs).await {
                    Ok(()) => return,
                    Err(e) => {
                        warn!(pod_uid = %self.uid, error = %e, "removing pod failed; retrying");
                        self.event(
                            "",
                            EventType::Warning,
                            "FailedKillPod",
                            &format!("error killing pod: {e}"),
                        );
                        Duration::from_secs(5)
                    }
                },
                Desire::Run {
                    bundle,
                    plan,
                    admission,
                    resize,
                } => {
                    self.resize = resize;
                    self.reconcile(&bundle, &plan, admission).await
                }
            };
            self.ctx.reconcile_stats.record(pass.elapsed());
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = desire.changed() => if r.is_err() { return },
                _ = wake.notified() => {},
                _ = tokio::time::sleep(requeue) => {},
            }
        }
    }

    /// Records an Event about this pod (`field_path` "" for the pod itself).
    fn event(&self, field_path: &str, kind: EventType, reason: &str, message: &str) {
        self.ctx
            .events
            .record(&self.uid, field_path, kind, reason, message);
    }

    /// Records an Event about container `name` of the pod.
    fn container_event(
        &self,
        plan: &PodPlan,
        name: &str,
        kind: EventType,
        reason: &str,
        message: &str,
    ) {
        record_container_event(
            &self.ctx.events,
            &self.uid,
            plan,
            name,
            kind,
            reason,
            message,
        );
    }

    /// The Warning of an HTTPS hook that succeeded in HTTP (see [`hook_fell_back`]).
    fn hook_fell_back(&self, plan: &PodPlan, ran: &super::hooks::HookRan) {
        hook_fell_back(&self.ctx.events, &self.uid, plan, ran);
    }

    /// Publish the pod's status; true when it changed.
    fn publish(
        &self,
        namespace: &str,
        name: &str,
        status: &k8s_openapi::api::core::v1::PodStatus,
        removed: bool,
    ) -> bool {
        let status_json = serde_json::to_vec(status).unwrap_or_default();
        let entry = PodStatusEntry {
            uid: self.uid.clone(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            status_json: status_json.into(),
            removed,
        };
        self.ctx.statuses.send_if_modified(|map| {
            if map.get(&self.uid) == Some(&entry) {
                return false;
            }
            Arc::make_mut(map).insert(self.uid.clone(), entry);
            true
        })
    }

    async fn reconcile(
        &mut self,
        bundle: &PodBundle,
        planned: &Planned,
        admission: Result<(), (String, String)>,
    ) -> Duration {
        let plan = match planned {
            Ok(p) => {
                self.last_plan = Some(p.clone());
                p
            }
            Err(Rejection { reason, message }) => {
                let (ns, name, generation) = pod_names(&bundle.pod_json);
                warn!(pod = %name, namespace = %ns, pod_uid = %self.uid, reason = %reason, message = %message, "pod rejected");
                let st = failed_status(
                    reason,
                    message,
                    &self.ctx.host_ip,
                    self.start_time,
                    generation,
                );
                if self.publish(&ns, &name, &st, false) {
                    // The kubelet's Warning for a pod it refuses, with the status's reason.
                    self.event("", EventType::Warning, reason, message);
                }
                return Duration::from_secs(3600);
            }
        };
        let (ns, name) = (plan.meta.namespace.clone(), plan.meta.name.clone());
        if let Err((reason, message)) = admission {
            let st = failed_status(
                &reason,
                &message,
                &self.ctx.host_ip,
                self.start_time,
                plan.meta.generation,
            );
            if self.publish(&ns, &name, &st, false) {
                warn!(pod = %name, namespace = %ns, pod_uid = %self.uid, reason = %reason, message = %message, "pod not admitted");
                self.event("", EventType::Warning, &reason, &message);
            }
            return Duration::from_secs(3600);
        }
        if self.ended.is_none() {
            self.ended = self
                .deadline_passed(plan)
                .or_else(|| self.over_size_limit(plan).map(|why| ("Evicted", why)));
            if let Some((reason, why)) = &self.ended {
                warn!(pod = %name, namespace = %ns, pod_uid = %self.uid, reason = %reason, message = %why, "stopping pod");
                // The kubelet's active-deadline handler records a Normal event, its eviction
                // manager a Warning.
                let kind = if *reason == "DeadlineExceeded" {
                    EventType::Normal
                } else {
                    EventType::Warning
                };
                self.event("", kind, reason, why);
            }
        }
        if let Some((reason, why)) = self.ended.clone() {
            // The kubelet's eviction (an emptyDir over its sizeLimit) and its
            // activeDeadlineSeconds: every container is killed at once and the pod is Failed.
            let grace = (reason == "DeadlineExceeded")
                .then_some(plan.grace_secs)
                .or(Some(0));
            if let Err(e) = self.stop_all(grace).await {
                warn!(pod = %name, namespace = %ns, error = %e, "stopping the pod failed; retrying");
                return Duration::from_secs(2);
            }
            let st = failed_status(
                reason,
                &why,
                &self.ctx.host_ip,
                self.start_time,
                plan.meta.generation,
            );
            self.publish(&ns, &name, &st, false);
            return Duration::from_secs(3600);
        }
        let requeue = match self.drive(plan, bundle).await {
            Ok(d) => d,
            Err(e) => {
                warn!(pod = %name, namespace = %ns, error = %e, "reconcile failed; retrying");
                Duration::from_secs(2)
            }
        };
        let requeue = requeue.min(self.track_resize(plan));
        let requeue = match self.deadline_in(plan) {
            Some(left) => requeue.min(left + Duration::from_millis(50)),
            None => requeue,
        };
        // A container was just started and the next pass follows at once: publish what that
        // pass observes instead of a "ContainerCreating" status that is stale in milliseconds
        // (one status write less per pod start for the hub and the API server).
        if requeue.is_zero() {
            return requeue;
        }
        let mut status = self.status(plan);
        self.add_resize_status(plan, &mut status);
        self.stamp_transitions(&mut status);
        if self.publish(&ns, &name, &status, false) {
            debug!(pod = %name, namespace = %ns, phase = status.phase.as_deref().unwrap_or_default(), "pod status changed");
        }
        requeue
    }

    fn status(&self, plan: &PodPlan) -> k8s_openapi::api::core::v1::PodStatus {
        let empty = ContainerLifecycle::new();
        let view = |c: &'_ ContainerPlan| -> (String, String, String, ContainerLifecycle) {
            match self.slots.get(&c.name) {
                Some(s) => (
                    c.name.clone(),
                    s.image_id.clone(),
                    s.container_id.clone(),
                    s.lc.clone(),
                ),
                None => (c.name.clone(), String::new(), String::new(), empty.clone()),
            }
        };
        let init: Vec<_> = plan.init_containers.iter().map(|c| (c, view(c))).collect();
        let app: Vec<_> = plan.containers.iter().map(|c| (c, view(c))).collect();
        let ephemeral: Vec<_> = plan
            .ephemeral_containers
            .iter()
            .map(|e| {
                let (iid, cid, lc) = match self.slots.get(&e.name) {
                    Some(s) => (s.image_id.clone(), s.container_id.clone(), s.lc.clone()),
                    None => (String::new(), String::new(), empty.clone()),
                };
                (e, iid, cid, lc)
            })
            .collect();
        let pod_ip = if plan.host_network {
            self.ctx.host_ip.as_str()
        } else {
            self.pod_ip.as_str()
        };
        let v = PodView {
            plan,
            init: init
                .iter()
                .map(|(c, (n, iid, cid, lc))| ContainerView {
                    name: n,
                    image: &c.image,
                    image_id: iid,
                    container_id: cid,
                    lifecycle: lc,
                    sidecar: c.sidecar,
                })
                .collect(),
            app: app
                .iter()
                .map(|(c, (n, iid, cid, lc))| ContainerView {
                    name: n,
                    image: &c.image,
                    image_id: iid,
                    container_id: cid,
                    lifecycle: lc,
                    sidecar: c.sidecar,
                })
                .collect(),
            ephemeral: ephemeral
                .iter()
                .map(|(e, iid, cid, lc)| ContainerView {
                    name: &e.name,
                    image: &e.image,
                    image_id: iid,
                    container_id: cid,
                    lifecycle: lc,
                    sidecar: false,
                })
                .collect(),
            host_ip: &self.ctx.host_ip,
            pod_ip,
            start_time: self.start_time,
        };
        pod_status(&v)
    }

    /// Sets each condition's lastTransitionTime to when its status last changed (now, when it
    /// just did), so Ready says when the pod became ready, not when it started.
    fn stamp_transitions(&mut self, status: &mut k8s_openapi::api::core::v1::PodStatus) {
        let since = &mut self.condition_since;
        let now = Timestamp::now();
        for c in status.conditions.iter_mut().flatten() {
            let entry = since
                .entry(c.type_.clone())
                .or_insert_with(|| (c.status.clone(), now));
            if entry.0 != c.status {
                *entry = (c.status.clone(), now);
            }
            c.last_transition_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                entry.1,
            ));
        }
    }

    /// Time left before activeDeadlineSeconds, counted from the pod's start on the device.
    fn deadline_in(&self, plan: &PodPlan) -> Option<Duration> {
        let deadline = plan.active_deadline_secs?;
        let ran = Timestamp::now()
            .duration_since(self.start_time)
            .as_secs()
            .max(0) as u64;
        Some(Duration::from_secs(deadline.saturating_sub(ran)))
    }

    /// The kubelet's reason and message once activeDeadlineSeconds has passed.
    fn deadline_passed(&self, plan: &PodPlan) -> Option<(&'static str, String)> {
        self.deadline_in(plan).filter(|d| d.is_zero()).map(|_| {
            (
                "DeadlineExceeded",
                "Pod was active on the node longer than the specified deadline".to_owned(),
            )
        })
    }

    /// The eviction message when a disk-backed emptyDir uses more than its sizeLimit (measured
    /// at most every 10 s, like the kubelet's periodic check); `None` while within limits.
    fn over_size_limit(&mut self, plan: &PodPlan) -> Option<String> {
        let limited: Vec<(&str, u64)> = plan
            .volumes
            .iter()
            .filter_map(|v| match v {
                super::spec::VolumePlan::EmptyDir {
                    name,
                    memory: false,
                    size_limit: Some(limit),
                } => Some((name.as_str(), *limit)),
                _ => None,
            })
            .collect();
        if limited.is_empty() {
            return None;
        }
        let now = Instant::now();
        if self
            .usage_checked
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            return None;
        }
        self.usage_checked = Some(now);
        for (name, limit) in limited {
            let dir = volumes::volume_dir(&self.ctx.state_dir, &self.uid, name);
            let used = volumes::disk_usage(&dir);
            if used > limit {
                return Some(format!(
                    "Usage of EmptyDir volume {name:?} exceeds the limit \"{limit}\". "
                ));
            }
        }
        None
    }

    fn pod_labels(&self, plan: &PodPlan) -> BTreeMap<String, String> {
        BTreeMap::from([
            (labels::DEVICE.to_owned(), self.ctx.device.clone()),
            (labels::POD_UID.to_owned(), self.uid.clone()),
            (
                labels::POD_NAMESPACE.to_owned(),
                plan.meta.namespace.clone(),
            ),
            (labels::POD_NAME.to_owned(), plan.meta.name.clone()),
        ])
    }

    fn filter(&self) -> Vec<String> {
        vec![
            format!("{}={}", labels::DEVICE, self.ctx.device),
            format!("{}={}", labels::POD_UID, self.uid),
        ]
    }

    /// One level-triggered pass over the pod: set up its sandbox (volumes, Podman pod, pod
    /// IP), then for each container in order observe it and act on what was seen.
    async fn drive(
        &mut self,
        plan: &PodPlan,
        bundle: &PodBundle,
    ) -> Result<Duration, crate::podman::PodmanError> {
        let now = Instant::now();
        // Volumes first: a missing ConfigMap/Secret keeps every container waiting, nothing runs.
        let vols = volumes::prepare(
            &self.ctx.state_dir,
            plan,
            bundle,
            volumes::VolumeHost {
                allocatable: self.ctx.allocatable,
                addresses: Addresses {
                    host_ip: &self.ctx.host_ip,
                    pod_ip: &self.pod_ip,
                },
                host_path_prefixes: &self.ctx.policy.host_path_prefixes,
            },
            &mut self.written_volumes,
        );
        if let Err(e) = &vols {
            // The kubelet's volume manager: `MountVolume.SetUp failed for volume "v" : why`.
            let (volume, why) = match e {
                volumes::VolumeError::Missing { volume, message } => (volume, message.clone()),
                volumes::VolumeError::Io { volume, source, .. } => (volume, source.to_string()),
                volumes::VolumeError::Write { volume, source } => (volume, source.to_string()),
            };
            self.event(
                "",
                EventType::Warning,
                "FailedMount",
                &format!("MountVolume.SetUp failed for volume {volume:?} : {why}"),
            );
        }
        let existing = self.ensure_pod(plan).await?;
        let restored = self.restored_restarts();
        self.resize_errors.clear();
        // Events and the periodic resync wake the worker; this is only a backstop.
        let mut requeue = Duration::from_secs(300);
        let mut inits_done = true;
        let all: Vec<(bool, &ContainerPlan)> = plan
            .init_containers
            .iter()
            .map(|c| (true, c))
            .chain(plan.containers.iter().map(|c| (false, c)))
            .collect();
        // A pod that does not restart its app containers is over once they all finished; its
        // sidecars are then stopped and not restarted, as the kubelet does.
        let app_finished = plan.restart_policy != RestartPolicy::Always
            && plan
                .containers
                .iter()
                .all(|c| self.slots.get(&c.name).is_some_and(|s| s.lc.finished()));
        if app_finished {
            self.stop_sidecars(plan).await;
        }
        for (is_init, c) in all {
            // Init containers run one at a time, in order; app containers after all of them
            // (sidecars once they started).
            if !inits_done {
                let slot = self.slot(&c.name, &restored);
                if !matches!(slot.lc.state, State::Running { .. } | State::Terminated(_)) {
                    slot.lc.state = State::Waiting {
                        reason: super::lifecycle::WaitReason::PodInitializing,
                        message: None,
                    };
                }
                continue;
            }
            let is_init = is_init && !c.sidecar;
            let hash = spec_hash(c);
            let container_id = self
                .observe_container(
                    plan,
                    c,
                    is_init,
                    &hash,
                    existing.get(&c.name),
                    &restored,
                    now,
                )
                .await?;
            let container_id = match container_id {
                Some(id) => self.resize_container(plan, c, id, &restored).await?,
                None => None,
            };
            let next = self
                .act(
                    plan,
                    c,
                    is_init,
                    &hash,
                    container_id,
                    &vols,
                    bundle,
                    &restored,
                    now,
                )
                .await;
            requeue = requeue.min(next);
            let slot = self.slot(&c.name, &restored);
            // A sidecar gates what follows it only until the pod has started once: a sidecar
            // restarting later does not hold the app containers back.
            let done = if c.sidecar {
                slot.lc.started && matches!(slot.lc.state, State::Running { .. })
                    || app_finished
                    || self.sidecars_started
            } else {
                !is_init || slot.lc.succeeded()
            };
            if !done {
                inits_done = false;
            }
        }
        if inits_done {
            self.sidecars_started = true;
        }
        // Ephemeral containers may start before the pod is initialized (the kubelet's
        // computePodActions), once each.
        for e in &plan.ephemeral_containers {
            let next = self
                .drive_ephemeral(
                    plan,
                    e,
                    existing.get(&e.name),
                    &vols,
                    bundle,
                    &restored,
                    now,
                    app_finished,
                )
                .await?;
            requeue = requeue.min(next);
        }
        Ok(requeue)
    }

    /// One pass over ephemeral container `e`: created and started once in the pod's sandbox,
    /// observed until it ends, never restarted or created again; a refused one waits with why.
    #[allow(clippy::too_many_arguments)]
    async fn drive_ephemeral(
        &mut self,
        plan: &PodPlan,
        e: &EphemeralPlan,
        listed: Option<&String>,
        vols: &Result<BTreeMap<String, PathBuf>, volumes::VolumeError>,
        bundle: &PodBundle,
        restored: &BTreeMap<String, u32>,
        now: Instant,
        pod_over: bool,
    ) -> Result<Duration, crate::podman::PodmanError> {
        let idle = Duration::from_secs(300);
        let c = match &e.container {
            Ok(c) => c,
            Err((reason, message)) => {
                let waiting = State::Waiting {
                    reason: super::lifecycle::WaitReason::CreateContainerConfigError,
                    message: Some(message.clone()),
                };
                let slot = self.slot(&e.name, restored);
                if slot.lc.state != waiting {
                    slot.lc.state = waiting;
                    warn!(pod = %plan.meta.name, namespace = %plan.meta.namespace, container = %e.name, reason = %reason, message = %message, "ephemeral container refused");
                    self.container_event(
                        plan,
                        &e.name,
                        EventType::Warning,
                        "Failed",
                        &format!("Error: {message}"),
                    );
                }
                return Ok(idle);
            }
        };
        if let Some(id) = listed {
            self.ephemeral_created.insert(c.name.clone());
            let running = self
                .slots
                .get(&c.name)
                .is_some_and(|s| matches!(s.lc.state, State::Running { .. }));
            if pod_over && running {
                // The pod is over: its ephemeral containers end with it, as its sidecars do.
                info!(pod = %plan.meta.name, namespace = %plan.meta.namespace, container = %c.name, "app containers finished; stopping ephemeral container");
                if let Err(e) = self
                    .stop_with_hook(plan, Some(c), id, plan.grace_secs, Some(""))
                    .await
                {
                    warn!(pod = %plan.meta.name, container = %c.name, error = %e, "stopping ephemeral container failed");
                }
            }
        } else if self.ephemeral_created.contains(&c.name) || pod_over {
            // Gone after it was made (its sandbox was replaced, or it was removed behind the
            // agent's back), or the pod is over: never made again. One last seen running is
            // over, with the kubelet's words for a container it cannot find.
            let slot = self.slot(&c.name, restored);
            if let State::Running { started_at } = slot.lc.state {
                slot.lc.state = State::Terminated(Termination {
                    exit_code: 137,
                    reason: "ContainerStatusUnknown".into(),
                    started_at,
                    finished_at: Some(Timestamp::now()),
                    container_id: slot.container_id.clone(),
                    message: Some(
                        "The container could not be located when the pod was terminated".into(),
                    ),
                });
                slot.lc.ready = false;
            }
            return Ok(idle);
        }
        let hash = spec_hash(c);
        let id = self
            .observe_container(plan, c, false, &hash, listed, restored, now)
            .await?;
        let next = self
            .act(plan, c, false, &hash, id, vols, bundle, restored, now)
            .await;
        if self
            .slots
            .get(&c.name)
            .is_some_and(|s| !s.container_id.is_empty())
        {
            self.ephemeral_created.insert(c.name.clone());
        }
        Ok(next)
    }

    /// The PID namespace of an ephemeral container with a targetContainerName: its target's,
    /// which must be running (joined by path, as a CRI runtime joins it). `None` when the pod
    /// shares one PID namespace anyway, or the container names no target.
    async fn target_pidns(
        &self,
        plan: &PodPlan,
        c: &ContainerPlan,
    ) -> Result<Option<Namespace>, Observation> {
        let Some(target) = plan
            .ephemeral_containers
            .iter()
            .find(|e| e.name == c.name)
            .and_then(|e| e.target.as_ref())
        else {
            return Ok(None);
        };
        if plan.share_process_namespace {
            return Ok(None);
        }
        let not_running = || {
            Observation::ConfigError(format!(
                "target container {target:?} is not running: an ephemeral container joins the process namespace of a running one"
            ))
        };
        let id = self
            .slots
            .get(target)
            .map(|s| s.container_id.clone())
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                Observation::ConfigError(format!("unable to find target container {target}"))
            })?;
        let inspect = self
            .ctx
            .rt
            .inspect_container(&id)
            .await
            .map_err(|e| Observation::RuntimeError(e.to_string()))?
            .ok_or_else(not_running)?;
        if !inspect.state.running || inspect.state.pid <= 0 {
            return Err(not_running());
        }
        Ok(Some(Namespace {
            nsmode: "path".into(),
            value: format!("/proc/{}/ns/pid", inspect.state.pid),
        }))
    }

    /// Pod setup: the Podman pod exists (created when missing) and, for a pod with its own
    /// network, its infra container runs and its IP is known. Returns container name → id of
    /// the pod's containers as Podman lists them.
    async fn ensure_pod(
        &mut self,
        plan: &PodPlan,
    ) -> Result<BTreeMap<String, String>, crate::podman::PodmanError> {
        let rt = self.ctx.rt.clone();
        // The Podman pod (infra container holds the shared namespaces). Once seen, its infra
        // container in the listing stands for it; a vanished pod is created again in this pass.
        let mut listed = if self.pod_known {
            rt.list_containers(&self.filter()).await?
        } else {
            Vec::new()
        };
        let dead = match listed.iter().find(|c| c.is_infra) {
            _ if self.sandbox_lost => false,
            // A renewal that failed half-way (Podman's removal timed out) goes on.
            _ if self.renewing => true,
            Some(infra) => self.sandbox_dead(infra, &listed).await?,
            None => false,
        };
        if dead {
            if !self.renew_sandbox(plan, &listed).await? {
                return Ok(BTreeMap::new());
            }
            listed.clear();
        }
        if !listed.iter().any(|c| c.is_infra) {
            let pods = rt.list_pods(&self.filter()).await?;
            let mut exists = !pods.is_empty();
            if exists && pods.iter().any(|p| p.infra_id.is_empty()) {
                // A pod without its infra container takes no containers ("pod has no infra
                // container"): what Podman leaves of a dead sandbox whose removal timed out.
                warn!(pod = %plan.meta.name, namespace = %plan.meta.namespace, pod_uid = %self.uid, "podman pod lost its infra container; creating it again");
                self.remove_sandbox().await?;
                exists = false;
            }
            if !exists {
                let mut portmappings = Vec::new();
                if !plan.host_network {
                    for p in plan.containers.iter().flat_map(|c| &c.ports) {
                        if p.host_port != 0 {
                            portmappings.push(PortMapping {
                                container_port: p.container_port,
                                host_port: p.host_port,
                                protocol: p.protocol.clone(),
                                host_ip: p.host_ip.clone(),
                            });
                        }
                    }
                }
                let created = rt
                    .create_pod(&PodCreate {
                        name: self.pod_name.clone(),
                        labels: self.pod_labels(plan),
                        hostname: (!plan.host_network).then(|| {
                            pod_hostname(plan.hostname.as_deref().unwrap_or(&plan.meta.name))
                        }),
                        netns: Namespace {
                            nsmode: if plan.host_network { "host" } else { "bridge" }.into(),
                            value: String::new(),
                        },
                        utsns: plan.host_network.then(|| Namespace {
                            nsmode: "host".into(),
                            value: String::new(),
                        }),
                        portmappings,
                        shared_namespaces: if plan.share_process_namespace {
                            ["ipc", "net", "uts", "pid"].map(String::from).to_vec()
                        } else {
                            Vec::new()
                        },
                        dns_server: plan.dns.servers.clone(),
                        dns_search: plan.dns.searches.clone(),
                        dns_option: plan.dns.options.clone(),
                    })
                    .await;
                if let Err(e) = &created {
                    self.event(
                        "",
                        EventType::Warning,
                        "FailedCreatePodSandBox",
                        &format!("Failed to create pod sandbox: {e}"),
                    );
                }
                created?;
                self.renewing = false;
                info!(pod = %plan.meta.name, namespace = %plan.meta.namespace, pod_uid = %self.uid, "created podman pod");
            }
            listed = rt.list_containers(&self.filter()).await?;
        }
        self.pod_known = listed.iter().any(|c| c.is_infra);
        // A bridge-network pod's address comes from its infra container; start it first so
        // status.podIP is known before any container (and its fieldRef env) is created.
        if !plan.host_network
            && let Some(infra) = listed.iter().find(|c| c.is_infra)
        {
            // Only while the pod has no containers: starting a pod also starts exited
            // containers, which must stay under the restart policy's control.
            let mut started = false;
            if infra.state != "running" && listed.iter().all(|c| c.is_infra) {
                if let Err(e) = rt.start_pod(&self.pod_name).await {
                    self.event(
                        "",
                        EventType::Warning,
                        "FailedCreatePodSandBox",
                        &format!("Failed to create pod sandbox: {e}"),
                    );
                    return Err(e);
                }
                started = true;
            }
            let listed_run = (infra.state == "running").then_some(infra.started_at);
            let same_run = match &self.pod_ip_of {
                Some((id, run)) => {
                    *id == infra.id && listed_run.is_some() && (run.is_none() || *run == listed_run)
                }
                None => false,
            };
            if started || !same_run || self.pod_ip.is_empty() {
                self.pod_ip = rt
                    .inspect_container(&infra.id)
                    .await?
                    .and_then(|i| i.ip())
                    .unwrap_or_default();
            }
            self.pod_ip_of = Some((infra.id.clone(), if started { None } else { listed_run }));
        }
        Ok(listed
            .into_iter()
            .filter_map(|c| c.labels.get(labels::CONTAINER).cloned().map(|n| (n, c.id)))
            .collect())
    }

    /// Whether the pod's sandbox died under it. The infra container holds the namespaces the
    /// containers join; when it has ended while a container still runs, or Podman lists it as
    /// running while its process is gone or a zombie, its namespaces are gone or orphaned and
    /// every container start fails on them ("namespace path: lstat /proc/N/ns/ipc"). A pod
    /// whose containers all ended too (a device reboot) is not a dead sandbox: starting a
    /// container starts the infra container again, with fresh namespaces for all.
    async fn sandbox_dead(
        &self,
        infra: &crate::podman::ContainerSummary,
        listed: &[crate::podman::ContainerSummary],
    ) -> Result<bool, crate::podman::PodmanError> {
        if !listed.iter().any(|c| !c.is_infra) {
            return Ok(false);
        }
        if matches!(infra.state.as_str(), "exited" | "stopped") && infra.started_at > 0 {
            return Ok(listed.iter().any(|c| !c.is_infra && c.state == "running"));
        }
        if infra.state != "running" || infra.pid <= 0 {
            return Ok(false);
        }
        Ok(match process_state(infra.pid) {
            ProcessState::Alive => false,
            ProcessState::Zombie => true,
            // Gone, or in a PID namespace this agent does not see: only Podman's monitor
            // (conmon) being visible tells them apart.
            ProcessState::Absent => {
                self.ctx
                    .rt
                    .inspect_container(&infra.id)
                    .await?
                    .is_some_and(|i| {
                        i.state.conmon_pid > 0
                            && process_state(i.state.conmon_pid) != ProcessState::Absent
                    })
            }
        })
    }

    /// The kubelet's answer to a dead sandbox (PodSandboxChanged: kill the pod, create a new
    /// sandbox): every container is stopped, the Podman pod removed, and the next steps of this
    /// pass build it again and create the containers in it, init containers first. Each
    /// container that was running counts a restart with that run as its lastState; a
    /// container that already ended keeps its state (an app container that succeeded under
    /// OnFailure is not run again), except init containers, which run again. A pod that never
    /// restarts (restartPolicy Never) gets no new sandbox once a container existed: its
    /// containers are stopped and it ends; then this returns false.
    async fn renew_sandbox(
        &mut self,
        plan: &PodPlan,
        listed: &[crate::podman::ContainerSummary],
    ) -> Result<bool, crate::podman::PodmanError> {
        let rt = self.ctx.rt.clone();
        if plan.restart_policy == RestartPolicy::Never {
            self.sandbox_lost = true;
            self.stop_all(None).await?;
            return Ok(false);
        }
        if self.renewing {
            // Resumed after a failure: the containers were stopped and counted before.
            self.stop_all(None).await?;
            self.remove_sandbox().await?;
            return Ok(true);
        }
        self.renewing = true;
        warn!(pod = %plan.meta.name, namespace = %plan.meta.namespace, pod_uid = %self.uid, "pod sandbox died; killing the pod");
        self.event(
            "",
            EventType::Normal,
            "SandboxChanged",
            "Pod sandbox changed, it will be killed and re-created.",
        );
        let was_running: Vec<&str> = listed
            .iter()
            .filter(|c| !c.is_infra && c.state == "running")
            .map(|c| c.id.as_str())
            .collect();
        let stopped = self.stop_all(None).await?;
        let restored = self.restored_restarts();
        let now = Instant::now();
        for c in &stopped {
            let Some(spec) = c
                .labels
                .get(labels::CONTAINER)
                .and_then(|name| plan.container(name).or_else(|| plan.ephemeral(name)))
            else {
                continue;
            };
            let init = plan
                .init_containers
                .iter()
                .any(|i| i.name == spec.name && !i.sidecar);
            let Some(Observation::Exited(t)) =
                rt.inspect_container(&c.id).await?.map(|i| observe(&i))
            else {
                continue;
            };
            let policy = restart_policy(plan, spec, &self.slots);
            let ephemeral = plan.ephemeral(&spec.name).is_some();
            let slot = self.slot(&spec.name, &restored);
            if ephemeral {
                // Never run again: its run ends here.
                slot.lc.observe(Observation::Exited(t), policy, false, now);
            } else if was_running.contains(&c.id.as_str()) || init {
                slot.lc.replaced(t);
            } else {
                // An exit not seen yet is counted as the pod's restart policy counts it.
                slot.lc.observe(Observation::Exited(t), policy, init, now);
            }
        }
        self.remove_sandbox().await?;
        self.pod_known = false;
        self.pod_ip_of = None;
        self.pod_ip.clear();
        self.sidecars_started = false;
        for slot in self.slots.values_mut() {
            slot.container_id.clear();
            slot.run_started = None;
        }
        Ok(true)
    }

    /// Removes the Podman pod and whatever container of it Podman keeps after a removal it
    /// could not finish (an infra container whose monitor is gone outlives its pod).
    async fn remove_sandbox(&self) -> Result<(), crate::podman::PodmanError> {
        let rt = &self.ctx.rt;
        rt.remove_pod(&self.pod_name).await?;
        for c in rt.list_containers(&self.filter()).await? {
            rt.remove_container(&c.id).await?;
        }
        Ok(())
    }

    /// Observation: what Podman shows of container `c`, folded into its lifecycle. A container
    /// whose spec changed is replaced (stopped and removed) here. Returns its id, if it exists.
    #[allow(clippy::too_many_arguments)]
    async fn observe_container(
        &mut self,
        plan: &PodPlan,
        c: &ContainerPlan,
        is_init: bool,
        hash: &str,
        listed: Option<&String>,
        restored: &BTreeMap<String, u32>,
        now: Instant,
    ) -> Result<Option<String>, crate::podman::PodmanError> {
        let rt = self.ctx.rt.clone();
        // Observe.
        let mut container_id = listed.cloned();
        let mut inspect = None;
        if let Some(id) = &container_id {
            inspect = rt.inspect_container(id).await?;
            // An ephemeral container is never replaced (the API forbids changing one; a new
            // agent version hashing it differently must not run it again).
            if let Some(i) = &inspect
                && i.config.labels.get(labels::SPEC_HASH).map(String::as_str) != Some(hash)
                && plan.ephemeral(&c.name).is_none()
            {
                // The desired container changed (e.g. a new image): replace it.
                info!(pod = %plan.meta.name, container = %c.name, "container spec changed; recreating");
                let was_run = !is_zero_time(&i.state.started_at);
                let why = i
                    .state
                    .running
                    .then(|| format!("Container {} definition changed, will be restarted", c.name));
                self.stop_with_hook(plan, Some(c), id, plan.grace_secs, why.as_deref())
                    .await?;
                if was_run
                    && let Some(after) = rt.inspect_container(id).await?
                    && let Observation::Exited(t) = observe(&after)
                {
                    self.slot(&c.name, restored).lc.replaced(t);
                }
                rt.remove_container(id).await?;
                inspect = None;
                container_id = None;
            }
        }
        let mut obs = match &inspect {
            None => Observation::Absent,
            Some(i) => observe(i),
        };
        if let Observation::Exited(t) = &mut obs {
            t.message = self.termination_message(c, t).await;
        }
        let policy = restart_policy(plan, c, &self.slots);
        let (ctx, uid) = (self.ctx.clone(), self.uid.clone());
        let uid = uid.as_str();
        let slot = self.slot(&c.name, restored);
        if let Some(i) = &inspect {
            slot.created_with = i
                .config
                .labels
                .get(labels::RESOURCES)
                .and_then(|l| serde_json::from_str(l).ok());
            slot.container_id = i.id.clone();
            if slot.image_id.is_empty() {
                slot.image_id = i.image.clone();
            }
        }
        let was_running = matches!(slot.lc.state, State::Running { .. });
        let exit_code = match &obs {
            Observation::Exited(t) => Some(t.exit_code),
            _ => None,
        };
        let counted_before = slot.lc.counted_exit();
        let new_run = match &obs {
            Observation::Running { started_at } => slot.run_started != *started_at || !was_running,
            _ => false,
        };
        if let Observation::Running { started_at } = &obs {
            slot.run_started = *started_at;
            if slot.actuated.as_ref().map(|(t, _)| *t) != Some(*started_at)
                && let Some(i) = &inspect
            {
                // A new run: its cgroup holds what the container was created with, unless the
                // status before an agent restart says this very run was resized since.
                let restored = ctx
                    .restored_resources
                    .get(uid)
                    .and_then(|m| m.get(&c.name))
                    .filter(|r| r.is_run(&i.id, *started_at))
                    .map(|r| r.resources.clone());
                let created = i
                    .config
                    .labels
                    .get(labels::RESOURCES)
                    .and_then(|l| serde_json::from_str::<ContainerResources>(l).ok());
                slot.actuated = Some((*started_at, restored.or(created).unwrap_or_default()));
            }
        }
        slot.lc.observe(obs, policy, is_init, now);
        if let Some(code) = exit_code
            && slot.lc.counted_exit() != counted_before
        {
            info!(pod = %plan.meta.name, namespace = %plan.meta.namespace, container = %c.name, exit_code = code, "container exited");
        }
        if new_run {
            slot.startup = c.startup.as_ref().map(|p| ProbeTracker::new(p, now));
            slot.readiness = c.readiness.as_ref().map(|p| ProbeTracker::new(p, now));
            slot.liveness = c.liveness.as_ref().map(|p| ProbeTracker::new(p, now));
            slot.lc.started = c.startup.is_none();
            slot.lc.ready = c.startup.is_none() && c.readiness.is_none();
        }
        Ok(container_id)
    }

    /// Action: what the lifecycle asks for next (create, start, probe, wait). Returns when to
    /// look again.
    #[allow(clippy::too_many_arguments)]
    async fn act(
        &mut self,
        plan: &PodPlan,
        c: &ContainerPlan,
        is_init: bool,
        hash: &str,
        container_id: Option<String>,
        vols: &Result<BTreeMap<String, PathBuf>, volumes::VolumeError>,
        bundle: &PodBundle,
        restored: &BTreeMap<String, u32>,
        now: Instant,
    ) -> Duration {
        let rt = self.ctx.rt.clone();
        let policy = restart_policy(plan, c, &self.slots);
        let mut requeue = Duration::from_secs(300);
        let slot = self.slot(&c.name, restored);
        // Act.
        let action = slot.lc.next_action(container_id.is_some(), now);
        match action {
            Action::WaitUntil(t) => {
                slot.lc.mark_pull_backoff(now);
                let waiting = match &slot.lc.state {
                    State::Waiting { reason, .. } => Some(reason.clone()),
                    _ => None,
                };
                // What the kubelet records on every sync while a container backs off.
                match waiting {
                    Some(super::lifecycle::WaitReason::CrashLoopBackOff) => self.container_event(
                        plan,
                        &c.name,
                        EventType::Warning,
                        "BackOff",
                        &format!(
                            "Back-off restarting failed container {} in pod {}",
                            c.name,
                            pod_desc(&plan.meta.name, &plan.meta.namespace, &self.uid)
                        ),
                    ),
                    Some(super::lifecycle::WaitReason::ImagePullBackOff) => {
                        // An image volume's back-off is the pod's, as its pull.
                        let volume = self
                            .slots
                            .get(&c.name)
                            .and_then(|s| s.volume_pull_failed.clone());
                        let (on, image) = match &volume {
                            Some(v) => (None, v.as_str()),
                            None => (Some(c.name.as_str()), c.image.as_str()),
                        };
                        self.image_event(
                            plan,
                            on,
                            EventType::Normal,
                            "BackOff",
                            &format!("Back-off pulling image {image:?}"),
                        );
                        self.container_event(
                            plan,
                            &c.name,
                            EventType::Warning,
                            "Failed",
                            "Error: ImagePullBackOff",
                        );
                    }
                    _ => {}
                }
                requeue = requeue
                    .min(t.saturating_duration_since(now) + Duration::from_millis(50))
                    .min(super::lifecycle::PULL_ERROR_SHOWN);
            }
            Action::Done => {}
            Action::Start | Action::Create => {
                let restarting = matches!(
                    slot.lc.state,
                    State::Waiting {
                        reason: super::lifecycle::WaitReason::CrashLoopBackOff,
                        ..
                    }
                );
                // Volumes first: a missing ConfigMap/Secret keeps the container waiting.
                let vols = match &vols {
                    Ok(v) => v,
                    Err(e) => {
                        slot.lc.observe(
                            Observation::ConfigError(e.to_string()),
                            policy,
                            is_init,
                            now,
                        );
                        return requeue.min(Duration::from_secs(10));
                    }
                };
                // A container made with other resources than its allocation (resized since) is
                // not started again as it is: a start brings back its creation values, so it
                // is made anew, as the kubelet makes a new container for every run.
                let stale = container_id.as_ref().filter(|_| {
                    self.slots
                        .get(&c.name)
                        .and_then(|s| s.created_with.as_ref())
                        .is_some_and(|r| r.amounts() != self.allocated(c).amounts())
                });
                let container_id = match stale {
                    Some(id) => match rt.remove_container(id).await {
                        Ok(()) => None,
                        Err(e) => {
                            warn!(pod = %plan.meta.name, namespace = %plan.meta.namespace, container = %c.name, error = %e, "removing a container to make it anew failed");
                            return requeue.min(Duration::from_secs(2));
                        }
                    },
                    None => container_id,
                };
                let made = match container_id {
                    // A restart: pin its subPaths again (a reboot drops the pins, and the
                    // kubelet resolves them anew for every run).
                    Some(id) => self
                        .repin(plan, c, vols, bundle)
                        .map(|()| id)
                        .map_err(Observation::ConfigError),
                    None => self.create(plan, c, hash, vols, bundle).await,
                };
                let id = match made {
                    Ok(id) => Some(id),
                    Err(obs) => {
                        // The kubelet's `Error: ...` Warning of a container it could not make.
                        let why = match &obs {
                            Observation::PullFailed(_) => Some("ErrImagePull".to_owned()),
                            Observation::NeverPull(_) => Some("ErrImageNeverPull".to_owned()),
                            Observation::ConfigError(m) | Observation::RuntimeError(m) => {
                                Some(m.clone())
                            }
                            _ => None,
                        };
                        if let Some(why) = why {
                            self.container_event(
                                plan,
                                &c.name,
                                EventType::Warning,
                                "Failed",
                                &format!("Error: {why}"),
                            );
                        }
                        let slot = self.slot(&c.name, restored);
                        slot.lc.observe(obs, policy, is_init, now);
                        requeue = requeue.min(Duration::from_secs(10));
                        None
                    }
                };
                let slot = self.slot(&c.name, restored);
                if let Some(id) = id {
                    slot.container_id = id.clone();
                    if restarting {
                        slot.lc.restarting();
                    }
                    // The kubelet makes a new container for every run and records Created for
                    // each; the agent restarts in place and records the same.
                    self.container_event(
                        plan,
                        &c.name,
                        EventType::Normal,
                        "Created",
                        "Container created",
                    );
                    match rt.start_container(&id).await {
                        Ok(()) => {
                            info!(pod = %plan.meta.name, namespace = %plan.meta.namespace, container = %c.name, "container started");
                            self.container_event(
                                plan,
                                &c.name,
                                EventType::Normal,
                                "Started",
                                "Container started",
                            );
                            if let Some(hook) = &c.post_start {
                                // Other management of the container waits for the hook, as in
                                // the kubelet; a failure kills it and the restart policy decides.
                                let timeout = Duration::from_secs(plan.grace_secs.max(30));
                                let host = self.pod_address(plan);
                                let ran = super::hooks::run_hook(
                                    &*rt, &c.name, &id, &host, hook, timeout,
                                )
                                .await;
                                if let Ok(done) = &ran {
                                    self.hook_fell_back(plan, done);
                                }
                                if let Err(e) = ran {
                                    warn!(pod = %plan.meta.name, namespace = %plan.meta.namespace, container = %c.name, reason = "FailedPostStartHook", message = %e, "postStart hook failed; killing the container");
                                    // Without the hook's output, as the kubelet (it may hold
                                    // secrets).
                                    self.container_event(
                                        plan,
                                        &c.name,
                                        EventType::Warning,
                                        "FailedPostStartHook",
                                        "PostStartHook failed",
                                    );
                                    self.container_event(
                                        plan,
                                        &c.name,
                                        EventType::Normal,
                                        "Killing",
                                        "FailedPostStartHook",
                                    );
                                    if let Err(e) = rt.stop_container(&id, plan.grace_secs).await {
                                        warn!(pod = %plan.meta.name, container = %c.name, error = %e, "stopping container failed");
                                    }
                                }
                            }
                            // Look again right away: the next pass observes it running
                            // and publishes that, without waiting for an event.
                            requeue = Duration::ZERO;
                        }
                        Err(e) => {
                            let why = e.to_string().replace(&id, &c.name);
                            self.container_event(
                                plan,
                                &c.name,
                                EventType::Warning,
                                "Failed",
                                &format!("Error: {why}"),
                            );
                            let slot = self.slot(&c.name, restored);
                            slot.lc.observe(
                                Observation::RuntimeError(e.to_string()),
                                policy,
                                is_init,
                                now,
                            );
                            requeue = requeue.min(Duration::from_secs(10));
                        }
                    }
                }
            }
            Action::Probe => {
                let next = self.probe(plan, c, false).await;
                requeue = requeue.min(next);
            }
        }
        requeue
    }

    /// The resources allocated to container `c`: the reconciler's allocation, or the spec's
    /// when it has none for it.
    fn allocated<'a>(&'a self, c: &'a ContainerPlan) -> &'a ContainerResources {
        self.resize
            .allocation
            .containers
            .get(&c.name)
            .unwrap_or(&c.resources)
    }

    /// In-place resize of container `c` (running as `id`), the kubelet's computePodResizeAction
    /// and doPodResizeAction: its cgroup is updated to its allocation, or it is restarted when
    /// its resizePolicy says RestartContainer for a resource that changed (then `None`: it was
    /// removed and the action step creates it anew with the allocation). A memory limit is not
    /// lowered below what the container uses: that is a resize error, tried again later.
    async fn resize_container(
        &mut self,
        plan: &PodPlan,
        c: &ContainerPlan,
        id: String,
        restored: &BTreeMap<String, u32>,
    ) -> Result<Option<String>, crate::podman::PodmanError> {
        let desired = self.allocated(c).clone();
        let rt = self.ctx.rt.clone();
        let slot = self.slot(&c.name, restored);
        if !matches!(slot.lc.state, State::Running { .. }) {
            return Ok(Some(id));
        }
        let Some((run, actuated)) = slot.actuated.clone() else {
            return Ok(Some(id));
        };
        if actuated == desired {
            return Ok(Some(id));
        }
        let (have, want) = (actuated.amounts(), desired.amounts());
        match super::resize::step(&have, &want, c.restart_on_resize) {
            Step::None | Step::Record => {
                slot.actuated = Some((run, desired));
                Ok(Some(id))
            }
            Step::Update => {
                let lowering = want.memory_limit != 0
                    && (have.memory_limit == 0 || want.memory_limit < have.memory_limit);
                let usage = if lowering {
                    rt.container_stats(std::slice::from_ref(&id))
                        .await?
                        .into_iter()
                        .find(|s| s.id == id)
                        .map(|s| s.mem_usage)
                } else {
                    None
                };
                if let Some(why) =
                    super::resize::memory_decrease_error(&c.name, &have, &want, usage)
                {
                    warn!(pod = %plan.meta.name, namespace = %plan.meta.namespace, container = %c.name, error = %why, "resize not applied");
                    self.resize_errors.push(why);
                    return Ok(Some(id));
                }
                match rt.update_container(&id, &want.linux(true)).await {
                    Ok(()) => {
                        info!(pod = %plan.meta.name, namespace = %plan.meta.namespace, container = %c.name, cpu_request_m = want.cpu_request, cpu_limit_m = want.cpu_limit, memory_limit = want.memory_limit, "container resized in place");
                        if let Some(slot) = self.slots.get_mut(&c.name) {
                            slot.actuated = Some((run, desired));
                        }
                    }
                    Err(e) if e.is_not_found() => return Ok(None),
                    Err(e) => {
                        warn!(pod = %plan.meta.name, namespace = %plan.meta.namespace, container = %c.name, error = %e, "resize not applied");
                        self.resize_errors.push(e.to_string().replace(&id, &c.name));
                    }
                }
                Ok(Some(id))
            }
            Step::Restart => {
                // The kubelet kills the container with this message and starts it anew; the
                // agent makes it anew (Podman keeps creation values across a restart in place),
                // which counts a restart as the kubelet's does.
                info!(pod = %plan.meta.name, namespace = %plan.meta.namespace, container = %c.name, "resize requires restart; recreating");
                let why = format!("Container {} resize requires restart", c.name);
                self.stop_with_hook(plan, Some(c), &id, plan.grace_secs, Some(&why))
                    .await?;
                if let Some(after) = rt.inspect_container(&id).await?
                    && let Observation::Exited(t) = observe(&after)
                {
                    let slot = self.slot(&c.name, restored);
                    slot.lc.replaced(t);
                    slot.actuated = None;
                }
                rt.remove_container(&id).await?;
                Ok(None)
            }
        }
    }

    /// Resize bookkeeping after a pass, as the kubelet's status manager keeps it: a new
    /// allocation starts a resize (`PodResizeInProgress` at its generation), which stays until
    /// every running container's cgroup holds its allocation; an actuation error stays on it as
    /// reason `Error`. Records the kubelet's resize Events. Returns when to look again.
    fn track_resize(&mut self, plan: &PodPlan) -> Duration {
        let allocation = self.resize.allocation.clone();
        if self.last_allocation.as_ref() != Some(&allocation.containers) {
            if self.last_allocation.is_some() && !allocation.containers.is_empty() {
                self.in_progress = Some(InProgress {
                    reason: String::new(),
                    message: String::new(),
                    generation: allocation.generation,
                });
                self.event(
                    "",
                    EventType::Normal,
                    "ResizeStarted",
                    &resize_message("Pod resize started", plan, allocation.generation, ""),
                );
            }
            self.last_allocation = Some(allocation.containers.clone());
        }
        let pending = self.resize.pending.clone();
        if pending != self.last_pending {
            if let Some(p) = &pending {
                let kind = if p.reason == "Infeasible" {
                    "ResizeInfeasible"
                } else {
                    "ResizeDeferred"
                };
                self.event(
                    "",
                    EventType::Warning,
                    kind,
                    &resize_message(
                        &format!("Pod resize {}", p.reason),
                        plan,
                        p.generation,
                        &p.message,
                    ),
                );
            }
            self.last_pending = pending;
        }
        let unactuated = plan.all_containers().any(|c| {
            self.slots.get(&c.name).is_some_and(|s| {
                matches!(s.lc.state, State::Running { .. })
                    && s.actuated
                        .as_ref()
                        .is_some_and(|(_, a)| a.amounts() != self.allocated(c).amounts())
            })
        });
        if !self.resize_errors.is_empty() {
            let mem = self
                .resize_errors
                .iter()
                .all(|e| e.starts_with("attempting to set") || e.starts_with("missing container"));
            let message = if mem {
                super::resize::memory_decrease_message(&self.resize_errors)
            } else {
                self.resize_errors.join("; ")
            };
            let generation = self
                .in_progress
                .as_ref()
                .map_or(plan.meta.generation, |p| p.generation);
            let next = InProgress {
                reason: "Error".into(),
                message: message.clone(),
                generation,
            };
            if self.in_progress.as_ref() != Some(&next) {
                self.event(
                    "",
                    EventType::Warning,
                    "ResizeError",
                    &resize_message("Pod resize error", plan, generation, &message),
                );
                self.in_progress = Some(next);
            }
        } else if unactuated {
            self.in_progress.get_or_insert_with(|| InProgress {
                reason: String::new(),
                message: String::new(),
                generation: plan.meta.generation,
            });
        } else if let Some(done) = self.in_progress.take() {
            self.event(
                "",
                EventType::Normal,
                "ResizeCompleted",
                &resize_message("Pod resize completed", plan, done.generation, ""),
            );
        }
        if self.in_progress.is_some() || self.resize.pending.is_some() {
            // The kubelet retries pending and failed resizes; an event or a new desire comes
            // sooner when something changes.
            Duration::from_secs(10)
        } else {
            Duration::from_secs(300)
        }
    }

    /// The resize parts of the status: each container's `resources` (what its cgroup holds
    /// while it runs, else its allocation) and `allocatedResources`, and the PodResizePending
    /// and PodResizeInProgress conditions.
    fn add_resize_status(
        &mut self,
        plan: &PodPlan,
        status: &mut k8s_openapi::api::core::v1::PodStatus,
    ) {
        use k8s_openapi::api::core::v1::{PodCondition, ResourceRequirements};
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let quantities = |m: &BTreeMap<String, String>| {
            (!m.is_empty()).then(|| {
                m.iter()
                    .map(|(k, v)| (k.clone(), Quantity(v.clone())))
                    .collect::<BTreeMap<_, _>>()
            })
        };
        for list in [
            status.init_container_statuses.iter_mut().flatten(),
            status.container_statuses.iter_mut().flatten(),
        ] {
            for cs in list {
                let Some(c) = plan.container(&cs.name) else {
                    continue;
                };
                let Some(slot) = self.slots.get(&c.name) else {
                    continue;
                };
                if slot.container_id.is_empty() {
                    continue;
                }
                let allocated = self.allocated(c);
                let reported = match (&slot.lc.state, &slot.actuated) {
                    (State::Running { .. }, Some((_, a))) => a,
                    _ => allocated,
                };
                cs.resources = Some(ResourceRequirements {
                    claims: None,
                    limits: quantities(&reported.limits),
                    requests: quantities(&reported.requests),
                });
                cs.allocated_resources = quantities(&allocated.requests);
            }
        }
        let mut add = Vec::new();
        if let Some(p) = &self.resize.pending {
            add.push(PodCondition {
                type_: "PodResizePending".into(),
                status: "True".into(),
                reason: Some(p.reason.clone()),
                message: Some(p.message.clone()),
                observed_generation: (p.generation > 0).then_some(p.generation),
                ..Default::default()
            });
        }
        if let Some(p) = &self.in_progress {
            add.push(PodCondition {
                type_: "PodResizeInProgress".into(),
                status: "True".into(),
                reason: (!p.reason.is_empty()).then(|| p.reason.clone()),
                message: (!p.message.is_empty()).then(|| p.message.clone()),
                observed_generation: (p.generation > 0).then_some(p.generation),
                ..Default::default()
            });
        }
        // A condition that went away starts anew when it comes back.
        self.condition_since
            .retain(|t, _| !t.starts_with("PodResize") || add.iter().any(|c| &c.type_ == t));
        if !add.is_empty() {
            status.conditions.get_or_insert_with(Vec::new).extend(add);
        }
    }

    /// Restart counts of this pod restored from the status file (container → count).
    fn restored_restarts(&self) -> BTreeMap<String, u32> {
        self.ctx
            .restored_restarts
            .get(&self.uid)
            .cloned()
            .unwrap_or_default()
    }

    fn slot(&mut self, name: &str, restored: &BTreeMap<String, u32>) -> &mut Slot {
        self.slots.entry(name.to_owned()).or_insert_with(|| Slot {
            lc: ContainerLifecycle::new()
                .with_restart_count(restored.get(name).copied().unwrap_or(0)),
            container_id: String::new(),
            image_id: String::new(),
            volume_pull_failed: None,
            run_started: None,
            startup: None,
            readiness: None,
            liveness: None,
            actuated: None,
            created_with: None,
        })
    }

    /// Run due probes of a running container; returns when the next one is due.
    async fn probe(&mut self, plan: &PodPlan, c: &ContainerPlan, terminating: bool) -> Duration {
        let rt = self.ctx.rt.clone();
        let host = self.pod_address(plan);
        let now = Instant::now();
        // Every failed attempt is an Unhealthy Warning, as the kubelet's prober records it.
        let events = self.ctx.events.clone();
        let init = plan.init_containers.iter().any(|i| i.name == c.name);
        let field_path = container_field_path(init, &c.name);
        let uid = self.uid.clone();
        let container_id = self
            .slots
            .get(&c.name)
            .map(|s| s.container_id.clone())
            .unwrap_or_default();
        let attempt = |kind: &'static str, p: &'_ super::spec::ProbePlan| {
            let rt = rt.clone();
            let events = events.clone();
            let field_path = field_path.clone();
            let uid = uid.clone();
            let id = container_id.clone();
            let host = host.clone();
            let p = p.clone();
            async move {
                match probe_output(&*rt, &id, &host, &p).await {
                    Ok(Passed::Ok) => true,
                    Ok(Passed::Warning(warning)) => {
                        events.record(
                            &uid,
                            &field_path,
                            EventType::Warning,
                            "ProbeWarning",
                            &format!("{kind} probe warning: {warning}"),
                        );
                        true
                    }
                    Err(output) => {
                        events.record(
                            &uid,
                            &field_path,
                            EventType::Warning,
                            "Unhealthy",
                            &format!("{kind} probe failed: {output}"),
                        );
                        false
                    }
                }
            }
        };
        // A terminating pod is probed for readiness only, as the kubelet's prober does.
        let startup_due = match (&c.startup, self.slots.get(&c.name)) {
            (Some(p), Some(s))
                if !terminating
                    && !s.lc.started
                    && s.startup.as_ref().is_some_and(|t| t.due_in(now).is_zero()) =>
            {
                Some(attempt("Startup", p).await)
            }
            _ => None,
        };
        let Some(slot) = self.slots.get_mut(&c.name) else {
            return Duration::from_secs(30);
        };
        let id = slot.container_id.clone();
        let mut next = Duration::from_secs(30);
        let mut kill = None;
        if let (Some(p), Some(t)) = (&c.startup, &mut slot.startup)
            && !slot.lc.started
        {
            if let Some(ok) = startup_due {
                match t.record(p, ok, Instant::now()) {
                    Verdict::Passed => slot.lc.started = true,
                    Verdict::Failed => kill = Some("startup"),
                    Verdict::Unchanged => {}
                }
            }
            next = next.min(t.due_in(Instant::now()));
        }
        let started = slot.lc.started;
        let readiness_due = slot
            .readiness
            .as_ref()
            .is_some_and(|t| t.due_in(now).is_zero());
        let liveness_due = slot
            .liveness
            .as_ref()
            .is_some_and(|t| t.due_in(now).is_zero());
        let readiness_ok = match &c.readiness {
            Some(p) if started && kill.is_none() && readiness_due => {
                Some(attempt("Readiness", p).await)
            }
            _ => None,
        };
        let liveness_ok = match &c.liveness {
            Some(p) if started && kill.is_none() && liveness_due && !terminating => {
                Some(attempt("Liveness", p).await)
            }
            _ => None,
        };
        let Some(slot) = self.slots.get_mut(&c.name) else {
            return Duration::from_secs(30);
        };
        if slot.lc.started && kill.is_none() {
            if let (Some(p), Some(t)) = (&c.readiness, &mut slot.readiness) {
                if let Some(ok) = readiness_ok {
                    t.record(p, ok, Instant::now());
                    slot.lc.ready = t.passing;
                }
                next = next.min(t.due_in(Instant::now()));
            } else {
                slot.lc.ready = true;
            }
            if let (Some(p), Some(t)) = (&c.liveness, &mut slot.liveness) {
                if let Some(ok) = liveness_ok
                    && t.record(p, ok, Instant::now()) == Verdict::Failed
                {
                    kill = Some("liveness");
                }
                next = next.min(t.due_in(Instant::now()));
            }
        }
        if let Some(probe) = kill {
            info!(pod = %plan.meta.name, namespace = %plan.meta.namespace, container = %c.name, reason = probe, "restarting container");
            slot.lc.ready = false;
            let grace = [&c.liveness, &c.startup]
                .into_iter()
                .flatten()
                .find_map(|p| p.termination_grace)
                .unwrap_or(plan.grace_secs);
            // The kubelet's message; the container restarts unless the policy says Never.
            let mut why = format!("Container {} failed {probe} probe", c.name);
            if restart_policy(plan, c, &self.slots) != RestartPolicy::Never {
                why.push_str(", will be restarted");
            }
            if let Err(e) = self
                .stop_with_hook(plan, Some(c), &id, grace, Some(&why))
                .await
            {
                warn!(pod = %plan.meta.name, container = %c.name, error = %e, "stopping container failed");
            }
            return Duration::from_millis(100);
        }
        next + Duration::from_millis(10)
    }

    /// Make `image` present per `policy`, with the pod's pull secrets, recording the kubelet's
    /// Pulling/Pulled/Failed Events on `container` (`None`: on the pod, as for an image
    /// volume). Returns the image as Podman has it; errors are the observation to record on
    /// the container that needed it.
    async fn ensure_image(
        &self,
        plan: &PodPlan,
        container: Option<&str>,
        image: &str,
        policy: PullPolicy,
        bundle: &PodBundle,
    ) -> Result<crate::podman::ImageInspect, Observation> {
        let rt = self.ctx.rt.clone();
        let present = rt
            .inspect_image(image)
            .await
            .map_err(|e| Observation::RuntimeError(e.to_string()))?;
        // A present image pulled with credentials serves only pods holding one of them
        // (KEP-2535); others pull it again with their own.
        let verified = match &present {
            Some(i) if policy != PullPolicy::Always => {
                let mine = super::pull_secrets::credential_fingerprints(&plan.meta, image, bundle);
                self.ctx.pulled_images.verify(&i.id, &mine).await
                    == super::pulled_images::Verdict::Allowed
            }
            _ => false,
        };
        let never_pull = || {
            // The kubelet says the same whether the image is absent or present but not for
            // this pod's credentials, so as not to reveal it.
            self.image_event(
                plan,
                container,
                EventType::Warning,
                "ErrImageNeverPull",
                &format!(
                    "Container image {:?} is not present with pull policy of Never",
                    image
                ),
            );
        };
        if policy == PullPolicy::Never && !(present.is_some() && verified) {
            never_pull();
        }
        if policy != PullPolicy::Always && present.is_some() && verified {
            self.image_event(
                plan,
                container,
                EventType::Normal,
                "Pulled",
                &format!(
                    "Container image {:?} already present on machine and can be accessed by the pod",
                    image
                ),
            );
        }
        let found = match (policy, present) {
            (PullPolicy::Never, None) => {
                return Err(Observation::NeverPull(format!(
                    "image {:?} is not present and imagePullPolicy is Never",
                    image
                )));
            }
            (PullPolicy::Never, Some(_)) if !verified => {
                return Err(Observation::NeverPull(format!(
                    "image {:?} was pulled with credentials this pod does not have, and imagePullPolicy is Never",
                    image
                )));
            }
            (PullPolicy::IfNotPresent | PullPolicy::Never, Some(i)) if verified => i,
            (PullPolicy::Always | PullPolicy::IfNotPresent, _) => {
                info!(pod = %plan.meta.name, container = container.unwrap_or(""), image = %image, "pulling image");
                self.image_event(
                    plan,
                    container,
                    EventType::Normal,
                    "Pulling",
                    &format!("Pulling image {:?}", image),
                );
                let pull_started = Instant::now();
                let credential =
                    match super::pull_secrets::pull_image(&*rt, &plan.meta, image, bundle).await {
                        Ok(credential) => credential,
                        Err(e) => {
                            self.image_event(
                                plan,
                                container,
                                EventType::Warning,
                                "Failed",
                                &format!("Failed to pull image {:?}: {e}", image),
                            );
                            return Err(Observation::PullFailed(e.to_string()));
                        }
                    };
                let pulled_in = pull_started.elapsed();
                let pulled = rt
                    .inspect_image(image)
                    .await
                    .map_err(|e| Observation::RuntimeError(e.to_string()))?
                    .ok_or_else(|| {
                        Observation::PullFailed(format!("image {:?} missing after pull", image))
                    })?;
                if let Err(e) = self.ctx.pulled_images.record(&pulled.id, credential).await {
                    warn!(pod = %plan.meta.name, image = %image, error = %e, "recording the image pull failed");
                }
                // The agent pulls one image at a time per pod and does not queue pulls, so the
                // pull and the time including waiting are the same.
                let took = go_duration(pulled_in);
                self.image_event(
                    plan,
                    container,
                    EventType::Normal,
                    "Pulled",
                    &format!(
                        "Successfully pulled image {:?} in {took} ({took} including waiting). Image size: {} bytes.",
                        image, pulled.size
                    ),
                );
                pulled
            }
            (PullPolicy::Never, Some(i)) => i,
        };
        Ok(found)
    }

    /// An Event about pulling an image: on `container`, or on the pod itself.
    fn image_event(
        &self,
        plan: &PodPlan,
        container: Option<&str>,
        kind: EventType,
        reason: &str,
        message: &str,
    ) {
        match container {
            Some(name) => self.container_event(plan, name, kind, reason, message),
            None => self.event("", kind, reason, message),
        }
    }

    /// Pull per policy, resolve configuration and create the container. Errors are the
    /// observation to record.
    async fn create(
        &mut self,
        plan: &PodPlan,
        c: &ContainerPlan,
        hash: &str,
        vols: &BTreeMap<String, PathBuf>,
        bundle: &PodBundle,
    ) -> Result<String, Observation> {
        let rt = self.ctx.rt.clone();
        // Image volumes first, as the kubelet pulls them for the pod before it starts any
        // container; their Events are the pod's (no container field path).
        let mut image_volumes = Vec::new();
        for m in &c.mounts {
            let Some(super::spec::VolumePlan::Image {
                reference,
                pull_policy,
                ..
            }) = plan.volumes.iter().find(|v| v.name() == m.volume)
            else {
                continue;
            };
            let pulled = self
                .ensure_image(plan, None, reference, *pull_policy, bundle)
                .await;
            if let Some(slot) = self.slots.get_mut(&c.name) {
                slot.volume_pull_failed = pulled.is_err().then(|| reference.clone());
            }
            image_volumes.push(ImageVolume {
                source: pulled?.id,
                destination: m.path.clone(),
                read_write: false,
            });
        }
        let image = self
            .ensure_image(plan, Some(&c.name), &c.image, c.pull_policy, bundle)
            .await?;
        let image_user = image
            .config
            .as_ref()
            .map(|c| c.user.clone())
            .unwrap_or_default();
        let user = sandbox::user(plan, c, &image_user).map_err(Observation::ConfigError)?;
        let env = resolve_env(plan, c, bundle, &*self.ctx, &self.pod_ip)
            .map_err(Observation::ConfigError)?;
        let mounts = self
            .mounts(plan, c, vols, &env)
            .map_err(Observation::ConfigError)?;
        let mut lbls = self.pod_labels(plan);
        lbls.insert(labels::CONTAINER.into(), c.name.clone());
        lbls.insert(labels::SPEC_HASH.into(), hash.to_owned());
        // The allocated resources (the spec's, unless a resize of them is still pending), in
        // the kubelet's cgroup values; the label says what every start of it brings back.
        let allocated = self.allocated(c).clone();
        lbls.insert(
            labels::RESOURCES.into(),
            serde_json::to_string(&allocated).unwrap_or_default(),
        );
        let resource_limits = Some(allocated.amounts().linux(false));
        let oom_score_adj = Some(
            super::resize::oom_score_adj(
                plan,
                c,
                allocated.amounts().memory_request,
                self.ctx.memory_capacity,
            )
            .max(self.ctx.oom_score_floor),
        );
        let mut spec = ContainerCreate {
            name: format!("{}-{}", self.pod_name, c.name),
            pod: self.pod_name.clone(),
            image: image.id.clone(),
            // `$(VAR)` in command and args expands from the container's environment.
            entrypoint: c
                .command
                .as_ref()
                .map(|v| v.iter().map(|a| expand(a, &env)).collect()),
            // With a `command` but no `args`, the image's CMD must not be appended (Kubernetes).
            command: c
                .args
                .as_ref()
                .map(|v| v.iter().map(|a| expand(a, &env)).collect())
                .or_else(|| c.command.as_ref().map(|_| Vec::new())),
            env,
            work_dir: c.working_dir.clone(),
            labels: lbls,
            mounts,
            resource_limits,
            oom_score_adj,
            stop_signal: c.stop_signal,
            stop_timeout: plan.grace_secs,
            restart_policy: "no".into(),
            user,
            image_volumes,
            ..Default::default()
        };
        sandbox::apply(plan, c, &self.ctx.seccomp_root, &mut spec)
            .map_err(Observation::ConfigError)?;
        spec.terminal = c.tty;
        spec.stdin = c.stdin;
        spec.pidns = self.target_pidns(plan, c).await?;
        let id = rt
            .create_container(&spec)
            .await
            .map_err(|e| Observation::RuntimeError(e.to_string()))?;
        if let Some(slot) = self.slots.get_mut(&c.name) {
            slot.image_id = if image.digest.is_empty() {
                image.id
            } else {
                format!("{}@{}", c.image, image.digest)
            };
        }
        Ok(id)
    }

    /// Pin the subPaths of an existing container again before it starts.
    fn repin(
        &self,
        plan: &PodPlan,
        c: &ContainerPlan,
        vols: &BTreeMap<String, PathBuf>,
        bundle: &PodBundle,
    ) -> Result<(), String> {
        self.termination_log(c, true)?;
        if c.mounts
            .iter()
            .all(|m| m.sub_path.is_none() && m.sub_path_expr.is_none())
        {
            return Ok(());
        }
        let env = resolve_env(plan, c, bundle, &*self.ctx, &self.pod_ip)?;
        self.mounts(plan, c, vols, &env).map(|_| ())
    }

    /// The container's mounts. subPaths are resolved inside their volume and pinned (see
    /// [`super::subpath`]); volumes the agent writes are always read-only.
    fn mounts(
        &self,
        plan: &PodPlan,
        c: &ContainerPlan,
        vols: &BTreeMap<String, PathBuf>,
        env: &BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, String> {
        let pod_dir = volumes::pod_dir(&self.ctx.state_dir, &self.uid);
        let mut mounts = Vec::new();
        for (i, m) in c.mounts.iter().enumerate() {
            // Image volumes are Podman's to mount (`image_volumes`, made in `create`).
            if plan
                .volumes
                .iter()
                .any(|v| v.name() == m.volume && matches!(v, super::spec::VolumePlan::Image { .. }))
            {
                continue;
            }
            let Some(root) = vols.get(&m.volume) else {
                return Err(format!("volume {} not prepared", m.volume));
            };
            let sub = match (&m.sub_path, &m.sub_path_expr) {
                (Some(s), _) => Some(s.clone()),
                (None, Some(expr)) => Some(super::subpath::expand_expr(expr, env)?),
                (None, None) => None,
            };
            let source = match sub.filter(|s| !s.is_empty()) {
                Some(s) => super::subpath::prepare(root, &s, &pod_dir, &m.volume, &c.name, i)
                    .map_err(|e| {
                        format!(
                            "failed to prepare subPath for volumeMount {:?} of container {:?}: {e}",
                            m.volume, c.name
                        )
                    })?,
                None => root.clone(),
            };
            let mut options = vec!["rbind".to_owned()];
            if m.read_only {
                options.push("ro".into());
            }
            mounts.push(Mount {
                destination: m.path.clone(),
                source: source.to_string_lossy().into_owned(),
                kind: "bind".into(),
                options,
            });
        }
        // The kubelet's managed /etc/hosts (shouldMountHostsFile): for a pod with a known
        // address or on the host network, unless the container mounts something there itself.
        if (plan.host_network || !self.pod_ip.is_empty())
            && !c.mounts.iter().any(|m| m.path == ETC_HOSTS)
        {
            mounts.push(Mount {
                destination: ETC_HOSTS.into(),
                source: self.hosts_file(plan)?.to_string_lossy().into_owned(),
                kind: "bind".into(),
                options: vec!["rbind".into(), "rw".into()],
            });
        }
        if let Some(dest) = &c.termination_message_path {
            let log = self.termination_log(c, true)?;
            mounts.push(Mount {
                destination: dest.clone(),
                source: log.to_string_lossy().into_owned(),
                kind: "bind".into(),
                options: vec!["rbind".into(), "rw".into()],
            });
        }
        Ok(mounts)
    }

    /// Writes the pod's hosts file (`<pod_dir>/etc-hosts`, 0644) as the kubelet's
    /// `ensureHostsFile` makes it and returns its path. Rewritten in place only when its
    /// content changes, so running containers (which hold its inode) see the same file.
    fn hosts_file(&self, plan: &PodPlan) -> Result<PathBuf, String> {
        use std::os::unix::fs::PermissionsExt;
        let path = volumes::pod_dir(&self.ctx.state_dir, &self.uid).join("etc-hosts");
        let err = |e: std::io::Error| format!("hosts file {}: {e}", path.display());
        let content = if plan.host_network {
            let host = std::fs::read_to_string(ETC_HOSTS)
                .map_err(|e| format!("reading the device's {ETC_HOSTS}: {e}"))?;
            hosts_file_content(None, &host, &plan.host_aliases)
        } else {
            let hostname = pod_hostname(plan.hostname.as_deref().unwrap_or(&plan.meta.name));
            hosts_file_content(Some((&self.pod_ip, &hostname)), "", &plan.host_aliases)
        };
        if std::fs::read_to_string(&path).ok().as_deref() != Some(content.as_str()) {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(err)?;
            }
            std::fs::write(&path, &content).map_err(err)?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).map_err(err)?;
        Ok(path)
    }

    /// The host file bind-mounted at the container's terminationMessagePath
    /// (`<pod_dir>/containers/<name>/termination-log`, writable by any uid of the container, in
    /// the 0700 pods tree). `fresh` empties it for a new run.
    fn termination_log(&self, c: &ContainerPlan, fresh: bool) -> Result<PathBuf, String> {
        use std::os::unix::fs::PermissionsExt;
        let dir = volumes::pod_dir(&self.ctx.state_dir, &self.uid)
            .join("containers")
            .join(&c.name);
        let path = dir.join("termination-log");
        if c.termination_message_path.is_none() {
            return Ok(path);
        }
        let err = |e: std::io::Error| format!("termination log {}: {e}", path.display());
        std::fs::create_dir_all(&dir).map_err(err)?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(fresh)
            .open(&path)
            .map_err(err)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o666))
            .map_err(err)?;
        Ok(path)
    }

    /// The message of a finished run: what the container wrote to its terminationMessagePath
    /// (at most 4096 bytes, as the kubelet reads), or with FallbackToLogsOnError and a failed run
    /// that wrote nothing, the tail of its log (80 lines, at most 2048 bytes).
    async fn termination_message(&self, c: &ContainerPlan, t: &Termination) -> Option<String> {
        const MAX_FILE: usize = 4096;
        const MAX_LOG: usize = 2048;
        let from_file = c.termination_message_path.as_ref().and_then(|_| {
            let path = volumes::pod_dir(&self.ctx.state_dir, &self.uid)
                .join("containers")
                .join(&c.name)
                .join("termination-log");
            let fd = rustix::fs::open(
                &path,
                rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::NOFOLLOW
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .ok()?;
            let mut buf = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(std::fs::File::from(fd), MAX_FILE as u64),
                &mut buf,
            )
            .ok()?;
            (!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned())
        });
        if from_file.is_some() || !c.termination_message_from_logs || t.exit_code == 0 {
            return from_file;
        }
        // The whole log, keeping only its tail: Podman 4.3's `tail` drops a last line that has
        // no newline yet (`echo -n DONE; false` would read as nothing), which is exactly what a
        // failing container often writes last. Bounded in time; the log of a finished
        // container does not grow.
        let opts = crate::podman::LogOptions::default();
        let mut stream = self.ctx.rt.logs(&t.container_id, &opts).await.ok()?;
        let mut tail = LogTail::new(80, MAX_LOG);
        let read = async {
            while let Some(Ok(chunk)) = futures::StreamExt::next(&mut stream).await {
                tail.push(&chunk);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
        let text = String::from_utf8_lossy(&tail.into_bytes()).into_owned();
        (!text.is_empty()).then_some(text)
    }

    /// Stop the pod's running sidecars in reverse order (each with its preStop hook).
    async fn stop_sidecars(&self, plan: &PodPlan) {
        for c in plan.init_containers.iter().rev().filter(|c| c.sidecar) {
            let Some(slot) = self.slots.get(&c.name) else {
                continue;
            };
            if !matches!(slot.lc.state, State::Running { .. }) || slot.container_id.is_empty() {
                continue;
            }
            info!(pod = %plan.meta.name, namespace = %plan.meta.namespace, container = %c.name, "app containers finished; stopping sidecar");
            if let Err(e) = self
                .stop_with_hook(plan, Some(c), &slot.container_id, plan.grace_secs, Some(""))
                .await
            {
                warn!(pod = %plan.meta.name, container = %c.name, error = %e, "stopping sidecar failed");
            }
        }
    }

    /// Where probes and hooks without a host go: the pod's IP, as the kubelet's prober and
    /// handler runner use it (loopback with the host network: the device's own address).
    fn pod_address(&self, plan: &PodPlan) -> String {
        pod_address(plan, &self.pod_ip)
    }

    /// What stopping this pod's containers needs, owned (see [`Stopper`]).
    fn stopper(&self) -> Stopper<R> {
        Stopper {
            ctx: self.ctx.clone(),
            uid: self.uid.clone(),
            filter: self.filter(),
            plan: self.last_plan.clone(),
            pod_ip: self.pod_ip.clone(),
        }
    }

    /// Stop a container as the kubelet kills one (see [`Stopper::stop_with_hook`]).
    async fn stop_with_hook(
        &self,
        plan: &PodPlan,
        c: Option<&ContainerPlan>,
        id: &str,
        grace_secs: u64,
        why: Option<&str>,
    ) -> Result<(), crate::podman::PodmanError> {
        self.stopper()
            .stop_with_hook(plan, c, id, grace_secs, why)
            .await
    }

    /// Stop every app and init container of the pod at once (see [`Stopper::stop_all`]).
    async fn stop_all(
        &self,
        grace_override: Option<u64>,
    ) -> Result<Vec<crate::podman::ContainerSummary>, crate::podman::PodmanError> {
        self.stopper().stop_all(grace_override).await
    }

    /// One look at a pod whose containers are being stopped: the readiness probes that are due
    /// (liveness and startup are off) and its status published. Returns when to look again.
    async fn terminating_pass(&mut self, plan: &PodPlan) -> Duration {
        let mut next = Duration::from_secs(5);
        let probed: Vec<ContainerPlan> = plan
            .all_containers()
            .filter(|c| c.readiness.is_some())
            .cloned()
            .collect();
        for c in &probed {
            let running = self
                .slots
                .get(&c.name)
                .is_some_and(|s| s.lc.started && matches!(s.lc.state, State::Running { .. }));
            if running {
                next = next.min(self.probe(plan, c, true).await);
            }
        }
        let mut status = self.status(plan);
        self.stamp_transitions(&mut status);
        let (ns, name) = (plan.meta.namespace.clone(), plan.meta.name.clone());
        if self.publish(&ns, &name, &status, false) {
            debug!(pod = %name, namespace = %ns, "terminating pod status changed");
        }
        next
    }

    /// Stop every container with its grace period (SIGTERM, then SIGKILL), then remove them,
    /// the pod and its volumes. `grace_override` (the API's deletion grace) replaces each
    /// container's own stop timeout, as a kubelet honours `kubectl delete --grace-period`.
    async fn remove(
        &mut self,
        grace_override: Option<u64>,
    ) -> Result<(), crate::podman::PodmanError> {
        let rt = self.ctx.rt.clone();
        // The stops (preStop hooks, the grace period) run as a task of their own; meanwhile the
        // pod's readiness is still probed and its status published, so that a container that
        // turns unready while it shuts down shows Ready=False, as the kubelet reports it.
        let stopper = self.stopper();
        let mut stopping = tokio::spawn(async move { stopper.stop_all(grace_override).await });
        let plan = self.last_plan.clone();
        let containers = loop {
            let wait = match &plan {
                Some(plan) => self.terminating_pass(plan).await,
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                stopped = &mut stopping => {
                    break stopped.map_err(|e| crate::podman::PodmanError::Http {
                        endpoint: format!("stop the containers of pod {}", self.uid),
                        message: e.to_string(),
                    })??;
                }
                _ = tokio::time::sleep(wait) => {}
            }
        };
        // The containers' ends, as the kubelet reports them before it deletes a pod: a pod
        // kept by a finalizer shows its containers terminated, with when they finished.
        let final_status = match &plan {
            Some(plan) => Some(self.final_status(plan, &containers).await?),
            None => None,
        };
        for c in &containers {
            rt.remove_container(&c.id).await?;
        }
        rt.remove_pod(&self.pod_name).await?;
        volumes::remove(&self.ctx.state_dir, &self.uid).map_err(|e| {
            crate::podman::PodmanError::Http {
                endpoint: format!("remove volumes of pod {}", self.uid),
                message: e.to_string(),
            }
        })?;
        let (ns, name) = self
            .ctx
            .statuses
            .borrow()
            .get(&self.uid)
            .map(|e| (e.namespace.clone(), e.name.clone()))
            .unwrap_or_default();
        info!(pod = %name, namespace = %ns, pod_uid = %self.uid, "pod removed");
        let status = final_status.unwrap_or_else(|| k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Succeeded".into()),
            reason: Some("Removed".into()),
            ..Default::default()
        });
        let _ = self.publish(&ns, &name, &status, true);
        Ok(())
    }

    /// The status of a pod whose containers were all stopped for its removal: each stopped
    /// container terminated (never to be restarted) with its exit code and finish time, and
    /// the phase the kubelet gives a terminal pod (Succeeded when every app container exited
    /// 0, else Failed).
    async fn final_status(
        &mut self,
        plan: &PodPlan,
        stopped: &[crate::podman::ContainerSummary],
    ) -> Result<k8s_openapi::api::core::v1::PodStatus, crate::podman::PodmanError> {
        let now = Instant::now();
        let restored = self.restored_restarts();
        for c in stopped {
            let Some(name) = c.labels.get(labels::CONTAINER) else {
                continue;
            };
            if plan.container(name).is_none() && plan.ephemeral(name).is_none() {
                continue;
            }
            let Some(Observation::Exited(t)) = self
                .ctx
                .rt
                .inspect_container(&c.id)
                .await?
                .map(|i| observe(&i))
            else {
                continue;
            };
            let init = plan
                .init_containers
                .iter()
                .any(|i| &i.name == name && !i.sidecar);
            self.slot(name, &restored).lc.observe(
                Observation::Exited(t),
                RestartPolicy::Never,
                init,
                now,
            );
        }
        let mut status = self.status(plan);
        self.stamp_transitions(&mut status);
        Ok(status)
    }
}

/// The restart policy of container `c`: the pod's, but Always for a sidecar until the pod's app
/// containers have all finished (then Never: a finished pod does not restart its sidecars).
fn restart_policy(
    plan: &PodPlan,
    c: &ContainerPlan,
    slots: &BTreeMap<String, Slot>,
) -> RestartPolicy {
    // Ephemeral containers are never restarted.
    if plan.ephemeral_containers.iter().any(|e| e.name == c.name) {
        return RestartPolicy::Never;
    }
    if !c.sidecar {
        return plan.restart_policy;
    }
    let app_finished = plan.restart_policy != RestartPolicy::Always
        && plan
            .containers
            .iter()
            .all(|a| slots.get(&a.name).is_some_and(|s| s.lc.finished()));
    if app_finished {
        RestartPolicy::Never
    } else {
        RestartPolicy::Always
    }
}

/// Map an inspect to what the lifecycle understands.
fn observe(i: &ContainerInspect) -> Observation {
    let ts = |s: &str| {
        if is_zero_time(s) {
            None
        } else {
            s.parse::<Timestamp>().ok()
        }
    };
    match i.state.status.as_str() {
        "running" | "paused" | "stopping" => Observation::Running {
            started_at: ts(&i.state.started_at),
        },
        "exited" | "stopped" if !is_zero_time(&i.state.started_at) => {
            let reason = if i.state.oom_killed {
                "OOMKilled"
            } else if i.state.exit_code == 0 {
                "Completed"
            } else {
                "Error"
            };
            Observation::Exited(Termination {
                exit_code: i.state.exit_code,
                reason: reason.into(),
                started_at: ts(&i.state.started_at),
                finished_at: ts(&i.state.finished_at),
                container_id: i.id.clone(),
                message: None,
            })
        }
        "exited" | "stopped" if !i.state.error.is_empty() => {
            Observation::RuntimeError(i.state.error.clone())
        }
        _ => Observation::Created,
    }
}

/// A stable hash of the container's desired configuration (FNV-1a over its debug form). Its
/// resources and resizePolicy are left out: a change of them is an in-place resize, not a new
/// container.
fn spec_hash(c: &ContainerPlan) -> String {
    let c = ContainerPlan {
        limits: None,
        requests: Resources::default(),
        resources: ContainerResources::default(),
        restart_on_resize: Default::default(),
        ..c.clone()
    };
    let text = format!("{c:?}");
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The container's environment as the kubelet builds it: the pod's Service variables (from the
/// hub) lowest, then envFrom, then env (later entries win; `$(VAR)` sees all of them).
fn resolve_env<R>(
    plan: &PodPlan,
    c: &ContainerPlan,
    bundle: &PodBundle,
    ctx: &PodContext<R>,
    pod_ip: &str,
) -> Result<BTreeMap<String, String>, String> {
    let addresses = Addresses {
        host_ip: &ctx.host_ip,
        pod_ip,
    };
    let mut env: BTreeMap<String, String> = bundle
        .service_env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for from in &c.env_from {
        let kind = if from.config_map {
            "configmap"
        } else {
            "secret"
        };
        match volumes::lookup(bundle, !from.config_map, &from.name) {
            Some(data) => {
                for (k, v) in data {
                    env.insert(
                        format!("{}{k}", from.prefix),
                        String::from_utf8_lossy(&v).into_owned(),
                    );
                }
            }
            None if from.optional => {}
            None => return Err(format!("{kind} \"{}\" not found", from.name)),
        }
    }
    for e in &c.env {
        match e {
            EnvVar::Value(k, v) => {
                env.insert(k.clone(), expand(v, &env));
            }
            EnvVar::ConfigMapKey {
                name,
                map,
                key,
                optional,
            }
            | EnvVar::SecretKey {
                name,
                secret: map,
                key,
                optional,
            } => {
                let secret = matches!(e, EnvVar::SecretKey { .. });
                let kind = if secret { "secret" } else { "configmap" };
                match volumes::lookup(bundle, secret, map).and_then(|d| d.get(key).cloned()) {
                    Some(v) => {
                        env.insert(name.clone(), String::from_utf8_lossy(&v).into_owned());
                    }
                    None if *optional => {}
                    None => {
                        return Err(format!(
                            "couldn't find key {key} in {kind} {}/{map}",
                            plan.meta.namespace
                        ));
                    }
                }
            }
            EnvVar::Field(k, f) => {
                env.insert(k.clone(), downward::field_value(plan, f, addresses));
            }
            EnvVar::Resource(k, r) => {
                env.insert(
                    k.clone(),
                    downward::resource_value(plan, r, ctx.allocatable),
                );
            }
        }
    }
    Ok(env)
}

/// Kubernetes' `$(VAR)` expansion of env values against earlier variables.
pub fn expand(v: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(v.len());
    let mut rest = v;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(j) if env.contains_key(&after[..j]) => {
                out.push_str(&env[&after[..j]]);
                rest = &after[j + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Namespace and name of a pod JSON that did not parse as a plan (best effort, for status).
/// What stopping a pod's containers needs, owned, so that the stops can run as a task of their
/// own while the worker goes on probing readiness and publishing the pod's status (the kubelet
/// probes a terminating pod's readiness until its containers have exited).
struct Stopper<R> {
    ctx: Arc<PodContext<R>>,
    uid: String,
    filter: Vec<String>,
    plan: Option<Arc<PodPlan>>,
    pod_ip: String,
}

impl<R: ContainerRuntime> Stopper<R> {
    /// Records an Event about container `name` of the pod.
    fn container_event(
        &self,
        plan: &PodPlan,
        name: &str,
        kind: EventType,
        reason: &str,
        message: &str,
    ) {
        record_container_event(
            &self.ctx.events,
            &self.uid,
            plan,
            name,
            kind,
            reason,
            message,
        );
    }

    /// Stop a container as the kubelet kills one: its preStop hook first (bounded by the
    /// grace period), then the stop signal with what is left of the grace (at least 2 s), then
    /// SIGKILL.
    async fn stop_with_hook(
        &self,
        plan: &PodPlan,
        c: Option<&ContainerPlan>,
        id: &str,
        grace_secs: u64,
        why: Option<&str>,
    ) -> Result<(), crate::podman::PodmanError> {
        let rt = &self.ctx.rt;
        let mut grace = Duration::from_secs(grace_secs);
        if let (Some(c), Some(why)) = (c, why) {
            let message = if why.is_empty() {
                format!("Stopping container {}", c.name)
            } else {
                why.to_owned()
            };
            self.container_event(plan, &c.name, EventType::Normal, "Killing", &message);
        }
        if let Some(c) = c
            && let Some(hook) = &c.pre_stop
            && grace_secs > 0
        {
            let started = Instant::now();
            let host = pod_address(plan, &self.pod_ip);
            let ran = super::hooks::run_hook(&**rt, &c.name, id, &host, hook, grace).await;
            if let Ok(done) = &ran {
                hook_fell_back(&self.ctx.events, &self.uid, plan, done);
            }
            if let Err(e) = ran {
                warn!(pod = %plan.meta.name, namespace = %plan.meta.namespace, container = %c.name, reason = "FailedPreStopHook", message = %e, "preStop hook failed");
                self.container_event(
                    plan,
                    &c.name,
                    EventType::Warning,
                    "FailedPreStopHook",
                    "PreStopHook failed",
                );
            }
            grace = grace
                .saturating_sub(started.elapsed())
                .max(super::hooks::MIN_STOP_AFTER_PRESTOP);
        }
        rt.stop_container(id, whole_secs_up(grace)).await
    }

    /// Stop every app and init container of the pod at once, each with the pod's grace period
    /// (or `grace_override`, the API's deletion grace). Returns the containers (infra excluded).
    async fn stop_all(
        &self,
        grace_override: Option<u64>,
    ) -> Result<Vec<crate::podman::ContainerSummary>, crate::podman::PodmanError> {
        let rt = self.ctx.rt.clone();
        // The infra container carries the pod's labels too; it goes with the pod.
        let containers: Vec<_> = rt
            .list_containers(&self.filter)
            .await?
            .into_iter()
            .filter(|c| !c.is_infra)
            .collect();
        // Each container carries the pod's grace period as its stop timeout (also after an agent
        // restart, when the pod spec may be gone). Stop them all at once so the pod's grace is
        // not multiplied by its container count.
        if containers.iter().any(|c| c.state == "running") {
            info!(pod_uid = %self.uid, deletion_grace_secs = ?grace_override, "stopping pod");
        }
        let plan = self.plan.clone();
        let started = Instant::now();
        // Sidecars stop after the other containers, in reverse order, within the same grace
        // (the kubelet's termination order for restartable init containers).
        let sidecar_rank = |name: &str| {
            plan.as_ref().and_then(|p| {
                p.init_containers
                    .iter()
                    .filter(|c| c.sidecar)
                    .position(|c| c.name == name)
            })
        };
        let running: Vec<(String, String)> = containers
            .iter()
            .filter(|c| c.state == "running")
            .map(|c| {
                (
                    c.id.clone(),
                    c.labels.get(labels::CONTAINER).cloned().unwrap_or_default(),
                )
            })
            .collect();
        let (mut sidecars, others): (Vec<_>, Vec<_>) = running
            .into_iter()
            .partition(|(_, n)| sidecar_rank(n).is_some());
        sidecars.sort_by_key(|(_, n)| std::cmp::Reverse(sidecar_rank(n)));
        let stop = |id: String, name: String| {
            let rt = rt.clone();
            let plan = plan.clone();
            async move {
                let grace = match (grace_override, rt.inspect_container(&id).await?) {
                    (_, None) => return Ok(()),
                    (Some(secs), Some(_)) => secs,
                    (None, Some(i)) => i.config.stop_timeout.unwrap_or(30),
                };
                // What is left of the pod's grace when sidecars come last (rounded up: the
                // milliseconds spent listing must not cost the preStop hook a whole second).
                let grace = if grace == 0 {
                    0
                } else {
                    whole_secs_up(
                        Duration::from_secs(grace)
                            .saturating_sub(started.elapsed())
                            .max(super::hooks::MIN_STOP_AFTER_PRESTOP),
                    )
                };
                debug!(container = %id, grace_secs = grace, "stopping container");
                match &plan {
                    Some(plan) => {
                        let c = plan.container(&name).or_else(|| plan.ephemeral(&name));
                        self.stop_with_hook(plan, c, &id, grace, Some("")).await
                    }
                    None => rt.stop_container(&id, grace).await,
                }
            }
        };
        for r in futures::future::join_all(others.into_iter().map(|(id, n)| stop(id, n))).await {
            r?;
        }
        for (id, name) in sidecars {
            stop(id, name).await?;
        }
        Ok(containers)
    }
}

/// `d` in whole seconds, rounded up (Podman's stop timeout is whole seconds; rounding down
/// would take up to a second off the grace a container is owed).
fn whole_secs_up(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Records an Event about container `name` of pod `uid` (its field path says init or app
/// container, as the kubelet's).
fn record_container_event(
    events: &crate::events::EventRecorder,
    uid: &str,
    plan: &PodPlan,
    name: &str,
    kind: EventType,
    reason: &str,
    message: &str,
) {
    let init = plan.init_containers.iter().any(|c| c.name == name);
    let field_path = if plan.ephemeral_containers.iter().any(|e| e.name == name) {
        format!("spec.ephemeralContainers{{{name}}}")
    } else {
        container_field_path(init, name)
    };
    events.record(uid, &field_path, kind, reason, message);
}

/// As the kubelet: an HTTPS lifecycle handler answered in plain HTTP and retried in HTTP with
/// success is a `LifecycleHTTPFallback` Warning about the pod (and a log line).
fn hook_fell_back(
    events: &crate::events::EventRecorder,
    uid: &str,
    plan: &PodPlan,
    ran: &super::hooks::HookRan,
) {
    if let Some(message) = &ran.http_fallback {
        warn!(pod = %plan.meta.name, namespace = %plan.meta.namespace, reason = "LifecycleHTTPFallback", %message, "HTTPS lifecycle hook got an HTTP response");
        events.record(
            uid,
            "",
            EventType::Warning,
            "LifecycleHTTPFallback",
            message,
        );
    }
}

/// Where probes and hooks reach a pod: its IP, or loopback on the host network (and before the
/// IP is known).
fn pod_address(plan: &PodPlan, pod_ip: &str) -> String {
    if plan.host_network || pod_ip.is_empty() {
        "127.0.0.1".into()
    } else {
        pod_ip.to_owned()
    }
}

/// Where a container finds its hosts file.
const ETC_HOSTS: &str = "/etc/hosts";

/// The content of a pod's /etc/hosts as the kubelet writes it (`managedHostsFileContent`,
/// `nodeHostsFileContent`): for a pod with its own network (`own` = its IP and hostname) the
/// localhost lines and its own entry, for a host-network pod the device's hosts file
/// (`host`), then the pod's hostAliases.
fn hosts_file_content(
    own: Option<(&str, &str)>,
    host: &str,
    aliases: &[(String, Vec<String>)],
) -> String {
    let mut out = String::new();
    match own {
        Some((ip, hostname)) => {
            out.push_str("# Kubernetes-managed hosts file.\n");
            out.push_str("127.0.0.1\tlocalhost\n");
            out.push_str("::1\tlocalhost ip6-localhost ip6-loopback\n");
            out.push_str("fe00::0\tip6-localnet\n");
            out.push_str("fe00::0\tip6-mcastprefix\n");
            out.push_str("fe00::1\tip6-allnodes\n");
            out.push_str("fe00::2\tip6-allrouters\n");
            out.push_str(&format!("{ip}\t{hostname}\n"));
        }
        None => {
            out.push_str("# Kubernetes-managed hosts file (host network).\n");
            out.push_str(host);
        }
    }
    if !aliases.is_empty() {
        out.push_str("\n# Entries added by HostAliases.\n");
        for (ip, names) in aliases {
            out.push_str(&format!("{ip}\t{}\n", names.join("\t")));
        }
    }
    out
}

/// The kubelet's resize Event message: `prefix: {"containers":[...],"generation":N}` with
/// each container's resources from the spec (and the error, when one).
fn resize_message(prefix: &str, plan: &PodPlan, generation: i64, error: &str) -> String {
    let list = |cs: &[ContainerPlan]| -> Vec<serde_json::Value> {
        cs.iter()
            .map(|c| serde_json::json!({"name": c.name, "resources": c.resources}))
            .collect()
    };
    let mut summary =
        serde_json::json!({"containers": list(&plan.containers), "generation": generation});
    if !plan.init_containers.is_empty() {
        summary["initContainers"] = list(&plan.init_containers).into();
    }
    if !error.is_empty() {
        summary["error"] = error.into();
    }
    format!("{prefix}: {summary}")
}

/// Namespace, name and generation of a pod the agent could not parse into a plan.
fn pod_names(pod_json: &[u8]) -> (String, String, i64) {
    let v: serde_json::Value = serde_json::from_slice(pod_json).unwrap_or_default();
    let get = |k: &str| v["metadata"][k].as_str().unwrap_or_default().to_owned();
    (
        get("namespace"),
        get("name"),
        v["metadata"]["generation"].as_i64().unwrap_or(0).max(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_files_are_written_like_the_kubelets() {
        let aliases = vec![
            (
                "123.45.67.89".to_string(),
                vec!["foo".to_string(), "bar".to_string()],
            ),
            ("::2".to_string(), vec!["six".to_string()]),
        ];
        assert_eq!(
            hosts_file_content(Some(("10.88.0.7", "web")), "", &aliases),
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n\
             10.88.0.7\tweb\n\n# Entries added by HostAliases.\n123.45.67.89\tfoo\tbar\n::2\tsix\n"
        );
        assert_eq!(
            hosts_file_content(None, "127.0.0.1 localhost\n", &[]),
            "# Kubernetes-managed hosts file (host network).\n127.0.0.1 localhost\n"
        );
    }

    #[test]
    fn what_is_left_of_a_grace_period_rounds_up_to_whole_seconds() {
        assert_eq!(whole_secs_up(Duration::from_millis(29_990)), 30);
        assert_eq!(whole_secs_up(Duration::from_secs(30)), 30);
        assert_eq!(whole_secs_up(Duration::from_nanos(1)), 1);
        assert_eq!(whole_secs_up(Duration::ZERO), 0);
    }

    #[test]
    fn pod_hostnames_are_dns_labels_like_the_kubelets() {
        assert_eq!(pod_hostname("web"), "web");
        let long = format!("{}-{}", "a".repeat(62), "b".repeat(100));
        assert_eq!(pod_hostname(&long), "a".repeat(62));
        assert_eq!(pod_hostname(&"c".repeat(253)).len(), 63);
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod sandbox_tests;

/// The last `lines` lines of a log, at most `bytes` bytes, kept while it streams by.
struct LogTail {
    buf: std::collections::VecDeque<u8>,
    lines: usize,
    bytes: usize,
}

impl LogTail {
    fn new(lines: usize, bytes: usize) -> Self {
        Self {
            buf: std::collections::VecDeque::new(),
            lines,
            bytes,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        let keep = &chunk[chunk.len().saturating_sub(self.bytes)..];
        self.buf.extend(keep);
        let over = self.buf.len().saturating_sub(self.bytes);
        self.buf.drain(..over);
    }

    /// The tail: the last `lines` lines (a last line without newline counts) of what is kept.
    fn into_bytes(self) -> Vec<u8> {
        let v: Vec<u8> = self.buf.into();
        let body = v.strip_suffix(b"\n").unwrap_or(&v);
        let start = body
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, b)| **b == b'\n')
            .nth(self.lines.saturating_sub(1))
            .map_or(0, |(i, _)| i + 1);
        v[start..].to_vec()
    }
}

#[cfg(test)]
mod log_tail_tests {
    use super::LogTail;

    #[test]
    fn keeps_the_last_lines_and_bytes_including_an_unterminated_last_line() {
        let mut t = LogTail::new(2, 100);
        t.push(b"a\nb\n");
        t.push(b"c\nDONE");
        assert_eq!(t.into_bytes(), b"c\nDONE");
        let mut t = LogTail::new(2, 100);
        t.push(b"a\nb\nc\n");
        assert_eq!(t.into_bytes(), b"b\nc\n");
        let mut t = LogTail::new(80, 4);
        t.push(b"0123456789");
        assert_eq!(t.into_bytes(), b"6789");
        assert!(LogTail::new(80, 10).into_bytes().is_empty());
    }
}

#[cfg(test)]
#[path = "resize_worker_tests.rs"]
mod resize_tests;
