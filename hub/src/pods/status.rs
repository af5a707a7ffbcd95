//! StatusWriter: writes pod statuses to `pods/status`, coalesced per pod (only the newest status
//! of a pod waits in the queue) and paced by a token bucket so a reconnect storm of thousands of
//! devices cannot flood the API server. A few writes run at once, never two for the same pod, so
//! one slow round trip does not hold up every other pod's status.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::kubeutil::status_code;
use crate::metrics::Metrics;
use crate::workqueue::WorkQueue;

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes a token now, or says how long until one is there.
    pub fn try_take(&mut self) -> Result<(), Duration> {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// One status to write.
#[derive(Debug, Clone)]
pub struct StatusUpdate {
    /// Pod UID (also the precondition of the write).
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The `status` object to merge.
    pub status: Value,
}

/// Status writes in flight at most (each for another pod); the token bucket sets the rate.
const MAX_IN_FLIGHT: usize = 4;

/// A status write in flight: the update, its attempt count, and the outcome.
type InFlight = BoxFuture<'static, (StatusUpdate, u32, Result<(), kube::Error>)>;

/// Writes the statuses sent to the channel [`StatusWriter::new`] returns.
pub struct StatusWriter {
    rx: mpsc::Receiver<StatusUpdate>,
    client: kube::Client,
    bucket: TokenBucket,
    metrics: Arc<Metrics>,
    /// Pods with a status to write, by UID: due now, or after a failed write's back-off.
    queue: WorkQueue<String>,
    /// The status each queued pod waits to have written, with the failed attempts behind it.
    pending: HashMap<String, (StatusUpdate, u32)>,
}

/// Backoff of a failing write: 200 ms doubling to 30 s. Retries never give up: the status is the
/// truth the device reported, and a newer one replaces it anyway.
fn retry_delay(attempts: u32) -> Duration {
    Duration::from_millis(200)
        .saturating_mul(1 << attempts.min(8))
        .min(Duration::from_secs(30))
}

impl StatusWriter {
    /// A writer and the sender to feed it.
    pub fn new(
        client: kube::Client,
        qps: f64,
        burst: u32,
        metrics: Arc<Metrics>,
    ) -> (Self, mpsc::Sender<StatusUpdate>) {
        let (tx, rx) = mpsc::channel(4096);
        (
            Self {
                rx,
                client,
                bucket: TokenBucket::new(qps, burst),
                metrics,
                queue: WorkQueue::new(),
                pending: HashMap::new(),
            },
            tx,
        )
    }

    /// Queues `u` after `delay`. A status already waiting for the pod is merged with it, the
    /// older first: the API would apply both patches in turn, and one merged patch has the same
    /// effect (a partial one, such as the relay's Ready=False, must not drop the device's full
    /// status queued before it). The merged one is due at the earlier of the two times.
    fn enqueue(&mut self, u: StatusUpdate, attempts: u32, delay: Duration) {
        let uid = u.uid.clone();
        match self.pending.get_mut(&uid) {
            Some(slot) if attempts > 0 => {
                // A failed write coming back: what was queued meanwhile is newer and goes on top.
                let newer = std::mem::replace(&mut slot.0, u);
                merge_status(&mut slot.0.status, newer.status);
                slot.0.namespace = newer.namespace;
                slot.0.name = newer.name;
            }
            Some(slot) => {
                let StatusUpdate {
                    uid,
                    namespace,
                    name,
                    status,
                } = u;
                let mut merged = std::mem::take(&mut slot.0.status);
                merge_status(&mut merged, status);
                slot.0 = StatusUpdate {
                    uid,
                    namespace,
                    name,
                    status: merged,
                };
                slot.1 = attempts.min(slot.1);
            }
            None => {
                self.pending.insert(uid.clone(), (u, attempts));
            }
        }
        self.queue.add_after(uid, delay);
    }

    /// Runs until `shutdown` or until every sender is gone and the queue is empty. Up to
    /// `MAX_IN_FLIGHT` writes run at once, one per pod at most (the queue holds a pod back while
    /// its write is in flight), so a pod's statuses are written in order; meanwhile the channel
    /// keeps draining into the coalescing queue.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut closed = false;
        let mut inflight: FuturesUnordered<InFlight> = FuturesUnordered::new();
        loop {
            if closed && self.queue.is_empty() && inflight.is_empty() {
                return;
            }
            let mut wait = None;
            let room = inflight.len() < MAX_IN_FLIGHT;
            if room && self.queue.next_due().is_some_and(|at| at <= Instant::now()) {
                match self.bucket.try_take() {
                    Ok(()) => {
                        if let Some(uid) = self.queue.pop_due(Instant::now()) {
                            match self.pending.remove(&uid) {
                                Some((u, attempts)) => {
                                    inflight.push(Box::pin(write(self.client.clone(), u, attempts)))
                                }
                                None => self.queue.done(&uid),
                            }
                        }
                        continue;
                    }
                    Err(d) => wait = Some(d),
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                msg = self.rx.recv(), if !closed => match msg {
                    Some(u) => self.enqueue(u, 0, Duration::ZERO),
                    None => closed = true,
                },
                Some((u, attempts, r)) = inflight.next(), if !inflight.is_empty() => {
                    self.queue.done(&u.uid);
                    self.finish(u, attempts, r);
                }
                () = self.queue.due(), if room && wait.is_none() => {}
                () = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
            }
        }
    }

    fn finish(&mut self, u: StatusUpdate, attempts: u32, r: Result<(), kube::Error>) {
        self.metrics.api("patch_pod_status", &r);
        match r {
            Ok(()) => {
                let phase = u.status.get("phase").and_then(Value::as_str).unwrap_or("");
                tracing::debug!(pod = %u.name, namespace = %u.namespace, phase, "pod status written");
            }
            Err(e) if matches!(status_code(&e), Some(404 | 409 | 422)) => {
                tracing::debug!(pod = %u.name, namespace = %u.namespace, error = %e, "pod status not written; pod gone or replaced");
            }
            Err(error) => {
                let delay = retry_delay(attempts);
                tracing::warn!(pod = %u.name, namespace = %u.namespace, %error, retry_in_ms = delay.as_millis() as u64, "writing pod status; will retry");
                // Tried again after the back-off, with whatever arrived meanwhile merged on top
                // (and then due at once).
                self.enqueue(u, attempts.saturating_add(1), delay);
            }
        }
    }
}

/// Conditions a device's status ends by leaving them out: the in-place resize conditions,
/// which the kubelet removes once a resize is no longer pending or in progress.
const CLEARED_BY_ABSENCE: &[&str] = &["PodResizePending", "PodResizeInProgress"];

/// A strategic merge patch keeps a condition the patch does not name: for each condition of
/// [`CLEARED_BY_ABSENCE`] a device's full status (one with `conditions`) leaves out, this adds
/// the delete directive that removes it from the API's status (a no-op when it is not there).
pub fn delete_absent_conditions(status: &mut Value) {
    let Some(Value::Array(conditions)) = status.get_mut("conditions") else {
        return;
    };
    for t in CLEARED_BY_ABSENCE {
        if !conditions
            .iter()
            .any(|c| c.get("type").and_then(Value::as_str) == Some(t))
        {
            conditions.push(json!({"type": t, "$patch": "delete"}));
        }
    }
}

/// `newer` applied onto `older` the way a strategic merge patch applies to a pod status:
/// top-level fields are replaced, `conditions` are merged by `type` (each condition's fields
/// overlaid on the one before).
fn merge_status(older: &mut Value, newer: Value) {
    let (Some(old), Value::Object(new)) = (older.as_object_mut(), newer) else {
        return;
    };
    for (key, value) in new {
        match (key.as_str(), old.get_mut(&key), value) {
            ("conditions", Some(Value::Array(have)), Value::Array(add)) => {
                for cond in add {
                    let existing = have
                        .iter_mut()
                        .find(|c| c.get("type").is_some() && c.get("type") == cond.get("type"));
                    match (existing.and_then(Value::as_object_mut), cond) {
                        // A delete directive replaces the condition, and a condition replaces
                        // a delete directive (overlaying them would keep `$patch`).
                        (Some(e), Value::Object(fields))
                            if e.contains_key("$patch") || fields.contains_key("$patch") =>
                        {
                            *e = fields
                        }
                        (Some(e), Value::Object(fields)) => e.extend(fields),
                        (_, cond) => have.push(cond),
                    }
                }
            }
            (_, _, value) => {
                old.insert(key, value);
            }
        }
    }
}

/// Merges `u.status` into the pod's status. The uid in the patch is a precondition: a pod
/// re-created under the same name has another uid and the API server refuses to change it.
async fn write(
    client: kube::Client,
    u: StatusUpdate,
    attempts: u32,
) -> (StatusUpdate, u32, Result<(), kube::Error>) {
    let api: Api<Pod> = Api::namespaced(client, &u.namespace);
    let patch = json!({ "metadata": { "uid": u.uid }, "status": u.status });
    let r = api
        .patch_status(&u.name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .map(|_| ());
    (u, attempts, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesced_statuses_merge_like_successive_patches() {
        let mut queued = json!({
            "phase": "Running",
            "conditions": [
                {"type": "ContainersReady", "status": "True"},
                {"type": "Ready", "status": "True", "reason": "R"}
            ],
            "containerStatuses": [{"name": "a", "ready": true}]
        });
        merge_status(
            &mut queued,
            json!({"conditions": [
                {"type": "Ready", "status": "False", "lastTransitionTime": "t1"},
                {"type": "New", "status": "True"}
            ]}),
        );
        assert_eq!(
            queued,
            json!({
                "phase": "Running",
                "conditions": [
                    {"type": "ContainersReady", "status": "True"},
                    {"type": "Ready", "status": "False", "reason": "R", "lastTransitionTime": "t1"},
                    {"type": "New", "status": "True"}
                ],
                "containerStatuses": [{"name": "a", "ready": true}]
            }),
            "a partial status keeps the full one queued before it"
        );
        merge_status(
            &mut queued,
            json!({"phase": "Succeeded", "containerStatuses": []}),
        );
        assert_eq!(queued["phase"], "Succeeded");
        assert_eq!(queued["containerStatuses"], json!([]));
    }

    #[test]
    fn retries_back_off_to_a_cap() {
        assert_eq!(retry_delay(0), Duration::from_millis(200));
        assert_eq!(retry_delay(1), Duration::from_millis(400));
        assert_eq!(retry_delay(4), Duration::from_millis(3200));
        assert_eq!(retry_delay(8), Duration::from_secs(30));
        assert_eq!(retry_delay(u32::MAX), Duration::from_secs(30));
    }

    fn writer() -> StatusWriter {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        let client = kube::Client::try_from(config).expect("client");
        StatusWriter::new(client, 10.0, 10, Arc::new(Metrics::new())).0
    }

    fn update(status: Value) -> StatusUpdate {
        StatusUpdate {
            uid: "u-1".into(),
            namespace: "ns".into(),
            name: "p".into(),
            status,
        }
    }

    #[test]
    fn resize_conditions_a_device_leaves_out_are_deleted_and_a_later_one_replaces_the_delete() {
        let mut st = json!({"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "PodResizeInProgress", "status": "True", "observedGeneration": 2}
        ]});
        delete_absent_conditions(&mut st);
        assert_eq!(
            st["conditions"],
            json!([
                {"type": "Ready", "status": "True"},
                {"type": "PodResizeInProgress", "status": "True", "observedGeneration": 2},
                {"type": "PodResizePending", "$patch": "delete"}
            ])
        );
        // A partial status (no conditions) says nothing about them.
        let mut partial = json!({"phase": "Running"});
        delete_absent_conditions(&mut partial);
        assert_eq!(partial, json!({"phase": "Running"}));
        // Queued one after the other: the newer word on each condition wins whole.
        let mut done = json!({"conditions": [{"type": "Ready", "status": "True"}]});
        delete_absent_conditions(&mut done);
        let mut older = st.clone();
        merge_status(&mut older, done.clone());
        assert_eq!(
            older["conditions"][1],
            json!({"type": "PodResizeInProgress", "$patch": "delete"})
        );
        merge_status(&mut done, st);
        assert_eq!(
            done["conditions"][2],
            json!({"type": "PodResizeInProgress", "status": "True", "observedGeneration": 2})
        );
    }

    fn server_error() -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("etcd is slow", "InternalError")
                .with_code(500)
                .boxed(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_waits_its_back_off_and_a_newer_status_goes_on_top_at_once() {
        let mut w = writer();
        w.enqueue(update(json!({"phase": "Running"})), 0, Duration::ZERO);
        let t0 = Instant::now();
        let uid = w.queue.pop_due(t0).expect("due at once");
        let (u, attempts) = w.pending.remove(&uid).expect("pending");
        w.queue.done(&uid);
        w.finish(u, attempts, Err(server_error()));
        assert_eq!(w.queue.next_due(), Some(t0 + retry_delay(0)), "backed off");
        assert_eq!(w.pending["u-1"].1, 1, "one failed attempt behind it");

        // Taken again, failing again, while a newer partial status arrives.
        tokio::time::advance(retry_delay(0)).await;
        let uid = w
            .queue
            .pop_due(Instant::now())
            .expect("due after the back-off");
        let (u, attempts) = w.pending.remove(&uid).expect("pending");
        w.enqueue(
            update(json!({"conditions": [{"type": "Ready", "status": "False"}]})),
            0,
            Duration::ZERO,
        );
        assert_eq!(
            w.queue.pop_due(Instant::now()),
            None,
            "never two writes of one pod at once"
        );
        w.queue.done(&uid);
        w.finish(u, attempts, Err(server_error()));
        let (merged, attempts) = &w.pending["u-1"];
        assert_eq!(
            merged.status,
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}),
            "the failed status under the newer one, as the two patches would apply"
        );
        assert_eq!(*attempts, 0, "the newer status has not failed yet");
        assert_eq!(
            w.queue.pop_due(Instant::now()),
            Some("u-1".into()),
            "due at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_gone_is_not_retried() {
        let mut w = writer();
        w.enqueue(update(json!({"phase": "Running"})), 0, Duration::ZERO);
        let uid = w.queue.pop_due(Instant::now()).expect("due");
        let (u, attempts) = w.pending.remove(&uid).expect("pending");
        w.queue.done(&uid);
        let gone = kube::Error::Api(
            kube::core::Status::failure("not found", "NotFound")
                .with_code(404)
                .boxed(),
        );
        w.finish(u, attempts, Err(gone));
        assert!(w.queue.is_empty() && w.pending.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_a_burst_then_paces() {
        let mut b = TokenBucket::new(10.0, 3);
        for _ in 0..3 {
            assert!(b.try_take().is_ok());
        }
        let wait = b.try_take().expect_err("empty");
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::from_millis(90),
            "{wait:?}"
        );
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.try_take().is_ok());
        assert!(b.try_take().is_err());
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..3 {
            assert!(b.try_take().is_ok(), "refills up to the burst");
        }
        assert!(b.try_take().is_err(), "never more than the burst");
    }
}
