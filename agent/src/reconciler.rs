//! The `Reconciler`: turns the held desired snapshot into one worker task per pod, removes pods
//! that are no longer desired (also ones left over from before an agent restart, found by their
//! labels), admits pods against allocatable, and wakes workers on Podman events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use fleetlet_proto::v1::PodBundle;
use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use fleetlet_resources::admission::{Allocatable, Requests, admit_to};

use crate::pod::resize::{PodAllocation, ResizeDesire, admit_resize};
use crate::pod::spec::{PodPlan, Resources, parse_pod};
use crate::pod::worker::{Desire, Planned, PodContext, PodWorker, Rejection};
use crate::podman::{ContainerRuntime, labels};
use crate::store::Held;

struct WorkerHandle {
    desire: watch::Sender<Desire>,
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

/// Shared map of pod UID → wake-up handle, for the event watcher.
type WakeMap = Arc<tokio::sync::Mutex<HashMap<String, Arc<Notify>>>>;

/// Reconciles the device's pods against the runtime.
pub struct Reconciler<R> {
    ctx: Arc<PodContext<R>>,
    allocatable: Resources,
    max_pods: usize,
    resync: Duration,
    workers: HashMap<String, WorkerHandle>,
    wakes: WakeMap,
    admitted: BTreeSet<String>,
    last_generation: u64,
    /// A sweep for pods left in Podman is owed before the next periodic resync (the last pass
    /// ran a fallback snapshot, which removes nothing).
    sweep_due: bool,
    /// Each desired pod parsed once (and checked against the device policy), kept while its
    /// Pod JSON is the same: workers and admission read the plan, never the JSON.
    plans: HashMap<String, (bytes::Bytes, Arc<Planned>)>,
    /// Each admitted pod's allocated resources (in-place resize: a pod's new resources replace
    /// them only once they fit next to the other pods' allocations).
    allocations: HashMap<String, PodAllocation>,
}

impl<R: ContainerRuntime> Reconciler<R> {
    /// A reconciler for the pods of `ctx.device`.
    pub fn new(
        ctx: Arc<PodContext<R>>,
        allocatable: Resources,
        max_pods: usize,
        resync: Duration,
    ) -> Self {
        Self {
            ctx,
            allocatable,
            max_pods,
            resync,
            workers: HashMap::new(),
            wakes: Arc::default(),
            admitted: BTreeSet::new(),
            last_generation: 0,
            sweep_due: false,
            plans: HashMap::new(),
            allocations: HashMap::new(),
        }
    }

    /// Run until `shutdown`. Leaves every pod running when it returns.
    pub async fn run(mut self, mut held: watch::Receiver<Held>, shutdown: CancellationToken) {
        let events = tokio::spawn(watch_events(
            self.ctx.rt.clone(),
            self.ctx.device.clone(),
            self.wakes.clone(),
            shutdown.clone(),
        ));
        let mut tick = tokio::time::interval(self.resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The interval's first tick is immediate; the first pass is a full one anyway (adopting
        // or removing what an earlier run left in Podman).
        tick.tick().await;
        let mut full = true;
        loop {
            let current = held.borrow_and_update().clone();
            self.sync(&current, full, &shutdown).await;
            full = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = held.changed() => if r.is_err() { break } else { false },
                _ = tick.tick() => true,
            };
        }
        // Workers watch the same token and return without touching their pods.
        for (_, w) in self.workers.drain() {
            let _ = w.task.await;
        }
        let _ = events.await;
    }

    /// One level-triggered pass: desired pods get a worker, others are removed. A `full` pass
    /// (periodic resync) also makes every worker look at Podman again and removes pods left in
    /// Podman without a worker; a pass for a new snapshot only touches the pods it changed, so
    /// starting one pod does not send every other pod's worker to Podman.
    async fn sync(&mut self, held: &Held, full: bool, shutdown: &CancellationToken) {
        self.workers.retain(|_, w| !w.task.is_finished());
        {
            let mut wakes = self.wakes.lock().await;
            wakes.retain(|uid, _| self.workers.contains_key(uid));
        }
        // On a fallback snapshot only its own pods are acted on; nothing is removed.
        let (snapshot, remove_others) = match held {
            Held::Known(s) => (s.clone(), true),
            Held::Fallback { snapshot, reason } => {
                warn!(reason = %reason, generation = snapshot.generation, "running the previous good desired state; pods it does not list are left alone");
                (snapshot.clone(), false)
            }
            Held::Unknown { reason } => {
                // Never treat unreadable state as "no pods": keep everything as it is.
                warn!(reason = %reason, "desired state unknown; leaving pods untouched");
                return;
            }
        };
        let generation = snapshot.generation;
        let mut desired: BTreeMap<String, Arc<PodBundle>> = BTreeMap::new();
        let mut order = Vec::new();
        for bundle in &snapshot.pods {
            let uid = match pod_uid(&bundle.pod_json) {
                Some(uid) => uid,
                None => {
                    warn!(generation, "desired pod without metadata.uid ignored");
                    continue;
                }
            };
            order.push(uid.clone());
            desired.insert(uid, Arc::new(bundle.clone()));
        }
        // Parse each pod once per version of its JSON.
        self.plans.retain(|u, _| desired.contains_key(u));
        for (uid, bundle) in &desired {
            let fresh = match self.plans.get(uid) {
                Some((json, _)) => *json != bundle.pod_json,
                None => true,
            };
            if fresh {
                let planned = plan_pod(&bundle.pod_json, &self.ctx.policy);
                self.plans
                    .insert(uid.clone(), (bundle.pod_json.clone(), Arc::new(planned)));
            }
        }
        // Admission, in snapshot order; pods admitted before stay admitted.
        self.admitted.retain(|u| desired.contains_key(u));
        // The kubelet's rule, shared with the hub (fleetlet-resources): the same requests, the
        // same reasons and messages.
        let allocatable = Allocatable {
            cpu_milli: Some(i128::from(self.allocatable.cpu_millis)),
            memory: Some(i128::from(self.allocatable.memory_bytes)),
            pods: Some(i128::try_from(self.max_pods).unwrap_or(i128::MAX)),
        };
        let mut verdicts = BTreeMap::new();
        let plans = &self.plans;
        let plan_of = |uid: &str| {
            plans
                .get(uid)
                .and_then(|(_, p)| p.as_ref().as_ref().ok().cloned())
        };
        self.allocations.retain(|u, _| self.admitted.contains(u));
        // Pods admitted before hold their allocated requests (not a resize still pending).
        let mut admitted: Vec<(String, Requests)> = Vec::new();
        for uid in order.iter().filter(|u| self.admitted.contains(*u)) {
            let held = match (self.allocations.get(uid), plan_of(uid)) {
                (Some(a), _) => a.requests,
                (None, Some(p)) => {
                    self.allocations.insert(uid.clone(), allocation_of(&p));
                    p.requests
                }
                (None, None) => Requests::default(),
            };
            admitted.push((uid.clone(), held));
            verdicts.insert(uid.clone(), Ok(()));
        }
        let newcomers: Vec<String> = order
            .iter()
            .filter(|u| !self.admitted.contains(*u))
            .cloned()
            .collect();
        // In-place resize, the kubelet's allocation: an admitted pod whose containers' resources
        // changed gets them allocated when they fit next to the other pods' allocations;
        // otherwise the resize is pending (Deferred, or Infeasible beyond the device).
        let mut pending = BTreeMap::new();
        for i in 0..admitted.len() {
            let uid = admitted[i].0.clone();
            let (Some(plan), Some(current)) = (plan_of(&uid), self.allocations.get(&uid)) else {
                continue;
            };
            let wanted = allocation_of(&plan);
            if wanted.containers == current.containers {
                continue;
            }
            let others: Vec<Requests> = admitted
                .iter()
                .filter(|(u, _)| *u != uid)
                .map(|(_, r)| *r)
                .collect();
            match admit_resize(&allocatable, &others, wanted.requests) {
                Ok(()) => {
                    info!(pod = %plan.meta.name, namespace = %plan.meta.namespace, generation = wanted.generation, "pod resize allocated");
                    admitted[i].1 = wanted.requests;
                    self.allocations.insert(uid, wanted);
                }
                Err((reason, message)) => {
                    pending.insert(
                        uid,
                        crate::pod::resize::Pending {
                            reason,
                            message,
                            generation: plan.meta.generation,
                        },
                    );
                }
            }
        }
        let mut admitted: Vec<Requests> = admitted.into_iter().map(|(_, r)| r).collect();
        for uid in &newcomers {
            let r = plan_of(uid).map(|p| p.requests).unwrap_or_default();
            let verdict = match admit_to(&allocatable, &admitted, r) {
                Ok(()) => {
                    admitted.push(r);
                    self.admitted.insert(uid.clone());
                    if let Some(p) = plan_of(uid) {
                        self.allocations.insert(uid.clone(), allocation_of(&p));
                    }
                    Ok(())
                }
                Err(e) => Err((e.reason, e.message)),
            };
            verdicts.insert(uid.clone(), verdict);
        }
        for (uid, bundle) in &desired {
            let plan = match self.plans.get(uid) {
                Some((_, p)) => p.clone(),
                None => Arc::new(plan_pod(&bundle.pod_json, &self.ctx.policy)),
            };
            let resize = Arc::new(ResizeDesire {
                allocation: self.allocations.get(uid).cloned().unwrap_or_default(),
                pending: pending.remove(uid),
            });
            let desire = Desire::Run {
                bundle: bundle.clone(),
                plan,
                admission: verdicts.remove(uid).unwrap_or(Ok(())),
                resize,
            };
            self.set_desire(uid, desire, full, shutdown).await;
        }
        // Workers of pods no longer desired remove them.
        let gone: Vec<String> = self
            .workers
            .keys()
            .filter(|u| remove_others && !desired.contains_key(*u))
            .cloned()
            .collect();
        // The API's deletion grace of a pod being deleted, when the hub relayed one.
        let removal = |uid: &str| Desire::Remove {
            grace_secs: snapshot.termination_grace_seconds.get(uid).copied(),
        };
        for uid in gone {
            self.set_desire(&uid, removal(&uid), full, shutdown).await;
        }
        // After a fallback snapshot, the first real one sweeps at once instead of at the next resync.
        self.sweep_due |= !remove_others;
        if remove_others && (full || self.sweep_due) {
            self.sweep_due = false;
            // Pods in Podman that carry this device's label but have no worker: left from before a
            // restart and no longer desired. Containers of other devices or without labels are
            // never listed here, so they are never touched.
            let filter = [format!("{}={}", labels::DEVICE, self.ctx.device)];
            let mut found: BTreeSet<String> = BTreeSet::new();
            match self.ctx.rt.list_pods(&filter).await {
                Ok(pods) => found.extend(
                    pods.into_iter()
                        .filter_map(|p| p.labels.and_then(|l| l.get(labels::POD_UID).cloned())),
                ),
                Err(e) => warn!(error = %e, "listing pods failed"),
            }
            match self.ctx.rt.list_containers(&filter).await {
                Ok(cs) => found.extend(
                    cs.into_iter()
                        .filter_map(|c| c.labels.get(labels::POD_UID).cloned()),
                ),
                Err(e) => warn!(error = %e, "listing containers failed"),
            }
            for uid in found {
                if !desired.contains_key(&uid) && !self.workers.contains_key(&uid) {
                    info!(pod_uid = %uid, generation, "removing pod that is no longer desired");
                    self.set_desire(&uid, removal(&uid), full, shutdown).await;
                }
            }
        }
        // A removed pod's status (removed=true) stays published until the next generation, so
        // the hub sees it even if the link was down at the time; then it is dropped.
        if generation != self.last_generation {
            self.last_generation = generation;
            let workers = &self.workers;
            self.ctx.statuses.send_if_modified(|map| {
                let before = map.len();
                Arc::make_mut(map).retain(|uid, e| {
                    !e.removed || desired.contains_key(uid) || workers.contains_key(uid)
                });
                map.len() != before
            });
        }
        debug!(
            generation,
            pods = desired.len(),
            workers = self.workers.len(),
            "synced"
        );
    }

    async fn set_desire(
        &mut self,
        uid: &str,
        desire: Desire,
        resync: bool,
        shutdown: &CancellationToken,
    ) {
        if let Some(w) = self.workers.get(uid) {
            let changed = !same_desire(&w.desire.borrow(), &desire);
            if changed {
                w.desire.send_replace(desire);
            } else if resync {
                // Level-triggered resync: let the worker look again.
                w.wake.notify_one();
            }
            return;
        }
        let (tx, rx) = watch::channel(desire);
        let wake = Arc::new(Notify::new());
        self.wakes.lock().await.insert(uid.to_owned(), wake.clone());
        let worker = PodWorker::new(self.ctx.clone(), uid.to_owned());
        let task = tokio::spawn(worker.run(rx, wake.clone(), shutdown.child_token()));
        self.workers.insert(
            uid.to_owned(),
            WorkerHandle {
                desire: tx,
                wake,
                task,
            },
        );
    }
}

fn same_desire(a: &Desire, b: &Desire) -> bool {
    match (a, b) {
        (Desire::Remove { grace_secs: g1 }, Desire::Remove { grace_secs: g2 }) => g1 == g2,
        (
            Desire::Run {
                bundle: b1,
                admission: a1,
                resize: r1,
                ..
            },
            Desire::Run {
                bundle: b2,
                admission: a2,
                resize: r2,
                ..
            },
        ) => b1 == b2 && a1 == a2 && r1 == r2,
        _ => false,
    }
}

/// A pod's allocation when its spec's resources are allocated as they are.
fn allocation_of(plan: &PodPlan) -> PodAllocation {
    PodAllocation {
        containers: plan
            .all_containers()
            .map(|c| (c.name.clone(), c.resources.clone()))
            .collect(),
        requests: plan.requests,
        generation: plan.meta.generation,
    }
}

/// Parse a pod and check it against the device policy: the plan every worker pass uses, or
/// why the pod cannot run here.
pub fn plan_pod(pod_json: &[u8], policy: &crate::pod::policy::DevicePolicy) -> Planned {
    let mut plan: PodPlan = parse_pod(pod_json).map_err(|e| {
        if e.field == crate::pod::spec::OS_FIELD {
            // The kubelet's admission refusal, reason and words as in its predicate.
            Rejection {
                reason: "PodOSNotSupported".into(),
                message: "Failed to admit pod as the OS field doesn't match node OS".into(),
            }
        } else {
            Rejection {
                reason: "UnsupportedPodSpec".into(),
                message: e.to_string(),
            }
        }
    })?;
    policy.check(&plan).map_err(|v| Rejection {
        reason: v.reason.into(),
        message: v.message,
    })?;
    policy.refuse_ephemeral(&mut plan);
    Ok(Arc::new(plan))
}

/// The `metadata.uid` of a pod JSON.
pub fn pod_uid(pod_json: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Meta {
        uid: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Pod {
        metadata: Meta,
    }
    serde_json::from_slice::<Pod>(pod_json)
        .ok()?
        .metadata
        .uid
        .filter(|u| !u.is_empty())
}

/// Follow Podman's container events for this device and wake the pod's worker. Reconnects
/// with a short pause when the stream ends; the periodic resync covers anything missed.
async fn watch_events<R: ContainerRuntime>(
    rt: Arc<R>,
    device: String,
    wakes: WakeMap,
    shutdown: CancellationToken,
) {
    let filter = [format!("{}={}", labels::DEVICE, device)];
    while !shutdown.is_cancelled() {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = rt.events(&filter) => s,
        };
        match stream {
            Ok(mut events) => loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = events.next() => n,
                };
                match next {
                    Some(Ok(ev)) => {
                        if let Some(uid) = ev.actor.attributes.get(labels::POD_UID) {
                            debug!(pod_uid = %uid, action = %ev.action, "podman event");
                            if let Some(w) = wakes.lock().await.get(uid) {
                                w.notify_one();
                            }
                        }
                    }
                    Some(Err(e)) => {
                        debug!(error = %e, "podman event stream error");
                        break;
                    }
                    None => break,
                }
            },
            Err(e) => warn!(error = %e, "cannot follow podman events"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {},
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fleetlet_proto::v1::DesiredSnapshot;

    use super::*;
    use crate::pod::policy::DevicePolicy;
    use crate::podman::fake::FakeRuntime;

    const IMAGE: &str = "localhost/test/busybox:1";

    fn bundle(uid: &str, cpu: &str) -> PodBundle {
        PodBundle {
            pod_json: serde_json::to_vec(&serde_json::json!({
                "metadata": {"name": uid, "namespace": "ns", "uid": uid},
                "spec": {"containers": [{"name": "c", "image": IMAGE,
                    "resources": {"requests": {"cpu": cpu}}}]}
            }))
            .unwrap()
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_for_another_os_is_refused_as_the_kubelet_admits_it() {
        let pod = serde_json::to_vec(&serde_json::json!({
            "metadata": {"name": "w", "namespace": "ns", "uid": "w"},
            "spec": {"os": {"name": "windows"}, "containers": [{"name": "c", "image": IMAGE}]}
        }))
        .unwrap();
        let r = plan_pod(&pod, &DevicePolicy::default()).unwrap_err();
        assert_eq!(r.reason, "PodOSNotSupported");
        assert_eq!(
            r.message,
            "Failed to admit pod as the OS field doesn't match node OS"
        );
    }

    fn held(generation: u64, pods: Vec<PodBundle>) -> Held {
        Held::Known(Arc::new(DesiredSnapshot {
            generation,
            pods,
            ..Default::default()
        }))
    }

    async fn reconciler() -> (Reconciler<FakeRuntime>, FakeRuntime, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let rt = FakeRuntime::with_image(IMAGE, "").await;
        let ctx = Arc::new(PodContext {
            rt: Arc::new(rt.clone()),
            device: "dev-rec".into(),
            state_dir: dir.path().to_owned(),
            host_ip: "192.0.2.10".into(),
            statuses: watch::Sender::new(Arc::new(BTreeMap::new())),
            restored_restarts: BTreeMap::new(),
            restored_resources: BTreeMap::new(),
            restored_start_times: BTreeMap::new(),
            policy: DevicePolicy::default(),
            allocatable: Resources {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
            },
            memory_capacity: 1 << 30,
            oom_score_floor: -1000,
            seccomp_root: dir.path().join("seccomp"),
            pulled_images: crate::pod::pulled_images::PulledImages::load(dir.path()),
            reconcile_stats: Default::default(),
            events: Default::default(),
        });
        let allocatable = ctx.allocatable;
        (
            Reconciler::new(ctx, allocatable, 10, Duration::from_secs(60)),
            rt,
            dir,
        )
    }

    async fn phase(r: &Reconciler<FakeRuntime>, uid: &str) -> Option<(String, String)> {
        for _ in 0..200 {
            if let Some(e) = r.ctx.statuses.borrow().get(uid) {
                let st: k8s_openapi::api::core::v1::PodStatus =
                    serde_json::from_slice(&e.status_json).unwrap();
                if let Some(p) = st.phase.filter(|p| p != "Pending") {
                    return Some((p, st.reason.unwrap_or_default()));
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    #[tokio::test]
    async fn admits_in_order_parses_once_and_removes_what_is_no_longer_desired() {
        let (mut r, rt, _dir) = reconciler().await;
        let shutdown = CancellationToken::new();
        let first = held(1, vec![bundle("a", "600m"), bundle("b", "600m")]);
        r.sync(&first, true, &shutdown).await;
        assert_eq!(
            phase(&r, "a").await,
            Some(("Running".into(), String::new()))
        );
        assert_eq!(
            phase(&r, "b").await,
            Some(("Failed".into(), "OutOfcpu".into()))
        );
        // The same JSON is not parsed again.
        let before = r.plans["a"].1.clone();
        r.sync(
            &held(2, vec![bundle("a", "600m"), bundle("b", "600m")]),
            false,
            &shutdown,
        )
        .await;
        assert!(Arc::ptr_eq(&before, &r.plans["a"].1));
        // a goes; b stays refused (admission is decided once).
        r.sync(&held(3, vec![bundle("b", "600m")]), false, &shutdown)
            .await;
        let mut removed = false;
        for _ in 0..200 {
            removed = r.ctx.statuses.borrow().get("a").is_some_and(|e| e.removed);
            if removed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(removed, "a's removal was published");
        assert!(
            rt.state
                .lock()
                .await
                .pods
                .values()
                .all(|p| !p.name.ends_with("-a"))
        );
        shutdown.cancel();
    }

    fn pod_at(uid: &str, cpu: &str, generation: i64) -> PodBundle {
        PodBundle {
            pod_json: serde_json::to_vec(&serde_json::json!({
                "metadata": {"name": uid, "namespace": "ns", "uid": uid, "generation": generation},
                "spec": {"containers": [{"name": "c", "image": IMAGE,
                    "resources": {"requests": {"cpu": cpu}}}]}
            }))
            .unwrap()
            .into(),
            ..Default::default()
        }
    }

    /// The allocated CPU request of `uid`'s container and its pending resize, as handed over.
    fn resize_of(
        r: &Reconciler<FakeRuntime>,
        uid: &str,
    ) -> (String, Option<(String, String, i64)>) {
        let Desire::Run { resize, .. } = r.workers[uid].desire.borrow().clone() else {
            panic!("{uid} is not running");
        };
        (
            resize.allocation.containers["c"].requests["cpu"].clone(),
            resize
                .pending
                .as_ref()
                .map(|p| (p.reason.clone(), p.message.clone(), p.generation)),
        )
    }

    #[tokio::test]
    async fn a_resize_is_allocated_when_it_fits_next_to_the_other_pods_and_pending_otherwise() {
        let (mut r, _rt, _dir) = reconciler().await;
        let shutdown = CancellationToken::new();
        r.sync(
            &held(1, vec![pod_at("a", "300m", 1), pod_at("b", "300m", 1)]),
            true,
            &shutdown,
        )
        .await;
        assert_eq!(resize_of(&r, "a"), ("300m".into(), None));
        // a grows into the free room (1000m allocatable, b holds 300m).
        r.sync(
            &held(2, vec![pod_at("a", "600m", 2), pod_at("b", "300m", 1)]),
            false,
            &shutdown,
        )
        .await;
        assert_eq!(resize_of(&r, "a"), ("600m".into(), None));
        // b cannot grow next to a: deferred, keeping its allocation.
        r.sync(
            &held(3, vec![pod_at("a", "600m", 2), pod_at("b", "500m", 2)]),
            false,
            &shutdown,
        )
        .await;
        assert_eq!(
            resize_of(&r, "b"),
            (
                "300m".into(),
                Some((
                    "Deferred".into(),
                    "Node didn't have enough resource: cpu, requested: 500, used: 600, capacity: 1000"
                        .into(),
                    2
                ))
            )
        );
        // a asks for more than the device has: infeasible.
        r.sync(
            &held(4, vec![pod_at("a", "2", 3), pod_at("b", "500m", 2)]),
            false,
            &shutdown,
        )
        .await;
        assert_eq!(
            resize_of(&r, "a"),
            (
                "600m".into(),
                Some((
                    "Infeasible".into(),
                    "Node didn't have enough capacity: cpu, requested: 2000, capacity: 1000".into(),
                    3
                ))
            )
        );
        // a shrinks back: room for b's deferred resize, which is allocated in the same pass.
        r.sync(
            &held(5, vec![pod_at("a", "300m", 4), pod_at("b", "500m", 2)]),
            false,
            &shutdown,
        )
        .await;
        assert_eq!(resize_of(&r, "a"), ("300m".into(), None));
        assert_eq!(resize_of(&r, "b"), ("500m".into(), None));
        // A newcomer is admitted against the allocations (800m held): 300m does not fit.
        r.sync(
            &held(
                6,
                vec![
                    pod_at("a", "300m", 4),
                    pod_at("b", "500m", 2),
                    pod_at("c", "300m", 1),
                ],
            ),
            false,
            &shutdown,
        )
        .await;
        assert_eq!(
            phase(&r, "c").await,
            Some(("Failed".into(), "OutOfcpu".into()))
        );
        shutdown.cancel();
    }
}
