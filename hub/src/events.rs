//! EventWriter: turns the Events devices report about their pods (the kubelet's Pulling,
//! Started, BackOff, Unhealthy, ...) into `events.k8s.io/v1` Events in the pod's namespace.
//!
//! Devices aggregate on their side (`agent/src/events.rs`): a repeat of an Event arrives as the
//! same `(device, epoch, id)` with a higher `count`. The first arrival creates an Event named as
//! client-go names them (`<pod>.<hex nanoseconds>`); later ones patch its `series` (count and
//! lastObservedTime), the events-API series mechanism, so a crash-looping pod keeps one Event
//! object however often it restarts. A repeat with a count already written (a batch the device
//! sent again after a reconnect) is dropped.
//!
//! Toward the API server all devices share one bounded queue (updates of one Event coalesce in
//! it) and one token bucket; when the queue is full the oldest waiting Event is dropped and
//! counted on `/metrics` (`fleetlet_hub_device_events_total{reason="dropped_queue_full"}`).
//!
//! Only the pod relay feeds this writer, and only with Events about pods bound to the device's
//! own Node, with namespace, name and uid taken from the API's view (see `pods::PodRelay`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use fleetlet_proto::v1::DeviceEvent;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::kubeutil::status_code;
use crate::metrics::Metrics;
use crate::pods::status::TokenBucket;

/// The reportingController of device Events: they are what a kubelet reports, and tools that
/// look for the kubelet's Events (`kubectl get events --field-selector reportingComponent=kubelet`,
/// dashboards) find them. The reportingInstance is the Node (device) name.
pub const REPORTING_CONTROLLER: &str = "kubelet";

/// Device Events waiting for the API server, all devices together.
pub const MAX_QUEUE: usize = 4096;

/// Events remembered (for series updates and duplicate detection); the least recently
/// written are forgotten first, and a forgotten one that repeats makes a new Event object.
pub const MAX_REMEMBERED: usize = 65_536;

/// What a device Event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Regarding {
    /// A pod bound to the device's Node.
    Pod,
    /// The device's Node itself.
    Node,
}

/// Namespace of Events about Nodes (cluster-scoped), as the kubelet writes them.
pub const NODE_EVENTS_NAMESPACE: &str = "default";

/// One device Event about a pod that the relay verified is bound to `node`, or about `node`.
#[derive(Debug, Clone)]
pub struct DeviceEventWrite {
    /// What the Event is about.
    pub regarding: Regarding,
    /// The device's Node (the reportingInstance).
    pub node: String,
    /// The device's event epoch (one agent run).
    pub epoch: u64,
    /// Pod namespace, from the API (`default` for the Node).
    pub namespace: String,
    /// Pod name, from the API (the Node's name for the Node).
    pub pod_name: String,
    /// Pod uid, from the API (the Node's name for the Node, as the kubelet's node reference).
    pub pod_uid: String,
    /// What the device reported.
    pub event: DeviceEvent,
    /// Failed writes so far.
    pub attempts: u8,
}

type Key = (String, u64, u64);

fn key_of(w: &DeviceEventWrite) -> Key {
    (w.node.clone(), w.epoch, w.event.id)
}

#[derive(Debug, Clone)]
struct Written {
    name: String,
    count: u32,
    at: Instant,
}

/// What the writer decides for an Event coming in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Queued (new, or replacing an older count of the same Event).
    Queued,
    /// Already written with this count or a higher one.
    Duplicate,
}

/// The queue and memory of the writer, apart from the API calls (unit-tested alone).
#[derive(Debug, Default)]
pub struct EventQueue {
    order: VecDeque<Key>,
    pending: HashMap<Key, DeviceEventWrite>,
    written: HashMap<Key, Written>,
    /// Events dropped because the queue was full.
    pub dropped: u64,
}

impl EventQueue {
    /// Takes in an Event; past [`MAX_QUEUE`] the oldest waiting one is dropped.
    pub fn admit(&mut self, w: DeviceEventWrite) -> Admit {
        let key = key_of(&w);
        if self
            .written
            .get(&key)
            .is_some_and(|done| done.count >= w.event.count)
        {
            return Admit::Duplicate;
        }
        if let Some(waiting) = self.pending.get_mut(&key) {
            if waiting.event.count < w.event.count {
                *waiting = w;
            }
            return Admit::Queued;
        }
        if self.order.len() >= MAX_QUEUE
            && let Some(oldest) = self.order.pop_front()
        {
            self.pending.remove(&oldest);
            self.dropped += 1;
        }
        self.order.push_back(key.clone());
        self.pending.insert(key, w);
        Admit::Queued
    }

    /// The next Event to write, and the name of its Event object if one was created before.
    pub fn pop(&mut self) -> Option<(DeviceEventWrite, Option<String>)> {
        let key = self.order.pop_front()?;
        let w = self.pending.remove(&key)?;
        let name = self.written.get(&key).map(|d| d.name.clone());
        Some((w, name))
    }

    /// Waiting Events.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// `w` is in the API as Event `name`.
    pub fn done(&mut self, w: &DeviceEventWrite, name: String, now: Instant) {
        let key = key_of(w);
        self.written.insert(
            key,
            Written {
                name,
                count: w.event.count,
                at: now,
            },
        );
        if self.written.len() > MAX_REMEMBERED {
            let mut by_age: Vec<(Instant, Key)> = self
                .written
                .iter()
                .map(|(k, d)| (d.at, k.clone()))
                .collect();
            by_age.sort_by_key(|(at, _)| *at);
            let excess = self.written.len() - MAX_REMEMBERED * 3 / 4;
            for (_, k) in by_age.into_iter().take(excess) {
                self.written.remove(&k);
            }
        }
    }

    /// Queues `w` again after [`Self::done`] recorded an older count for it (its series still
    /// needs writing).
    pub fn admit_again(&mut self, w: DeviceEventWrite) {
        let key = key_of(&w);
        if let Some(done) = self.written.get_mut(&key) {
            done.count = 1;
        }
        self.admit(w);
    }

    /// The Event object of `w` is gone (deleted, expired): the next write creates it anew.
    pub fn forget(&mut self, w: &DeviceEventWrite) {
        self.written.remove(&key_of(w));
    }
}

/// The timestamp in an Event's name: its first occurrence in nanoseconds, the sub-microsecond
/// digits (which the device's clock does not have) taken from a hash of what the Event says. Two
/// Events of one pod in the same microsecond so get different names, and the same Event always
/// gets the same name: a restarted hub that writes it again finds it (409) and updates it
/// instead of making a second object.
pub fn event_nanos(w: &DeviceEventWrite) -> i128 {
    // FNV-1a: stable across hub versions and runs, unlike std's RandomState.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [
        w.node.as_str(),
        w.event.field_path.as_str(),
        w.event.r#type.as_str(),
        w.event.reason.as_str(),
        w.event.message.as_str(),
    ] {
        for b in part.bytes().chain([0]) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    i128::from(w.event.first_micros) * 1000 + i128::from(hash % 1000)
}

/// The events.k8s.io/v1 name client-go gives an Event: `<regarding name>.<hex nanoseconds>`.
pub fn event_name(pod_name: &str, nanos: i128) -> String {
    format!("{pod_name}.{:x}", nanos.max(0))
}

fn micro_time(micros: i64) -> Option<MicroTime> {
    k8s_openapi::jiff::Timestamp::from_microsecond(micros)
        .ok()
        .map(MicroTime)
}

/// The Event object for the first write of `w` under `name`.
pub fn new_event(w: &DeviceEventWrite, name: &str) -> Event {
    let e = &w.event;
    let first =
        micro_time(e.first_micros).or_else(|| Some(MicroTime(k8s_openapi::jiff::Timestamp::now())));
    Event {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(w.namespace.clone()),
            ..Default::default()
        },
        event_time: first,
        series: series(w),
        reporting_controller: Some(REPORTING_CONTROLLER.into()),
        reporting_instance: Some(w.node.clone()),
        // The events API requires an action; the kubelet's reason names what it was doing.
        action: Some(e.reason.clone()),
        reason: Some(e.reason.clone()),
        note: Some(e.message.clone()),
        type_: Some(e.r#type.clone()),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some(
                match w.regarding {
                    Regarding::Pod => "Pod",
                    Regarding::Node => "Node",
                }
                .into(),
            ),
            namespace: (w.regarding == Regarding::Pod).then(|| w.namespace.clone()),
            name: Some(w.pod_name.clone()),
            uid: Some(w.pod_uid.clone()),
            field_path: (!e.field_path.is_empty()).then(|| e.field_path.clone()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn series(w: &DeviceEventWrite) -> Option<EventSeries> {
    (w.event.count >= 2).then(|| EventSeries {
        count: i32::try_from(w.event.count).unwrap_or(i32::MAX),
        last_observed_time: micro_time(w.event.last_micros)
            .unwrap_or(MicroTime(k8s_openapi::jiff::Timestamp::now())),
    })
}

/// Why a device Event is not acceptable as it is, naming the field.
pub fn check(e: &DeviceEvent) -> Result<(), String> {
    if e.r#type != "Normal" && e.r#type != "Warning" {
        return Err(format!("type {:?} is not Normal or Warning", e.r#type));
    }
    let reason_ok = !e.reason.is_empty()
        && e.reason.len() <= 128
        && e.reason.chars().all(|c| c.is_ascii_alphanumeric());
    if !reason_ok {
        return Err(format!("reason {:?} is not a CamelCase word", e.reason));
    }
    if e.message.len() > 1024 {
        return Err(format!(
            "message of {} bytes is over 1 KiB",
            e.message.len()
        ));
    }
    if e.field_path.len() > 512 {
        return Err("fieldPath is over 512 bytes".into());
    }
    if e.count == 0 {
        return Err("count is 0".into());
    }
    Ok(())
}

/// Writes device Events to the API server; see the module docs.
pub struct EventWriter {
    rx: mpsc::Receiver<DeviceEventWrite>,
    client: kube::Client,
    bucket: TokenBucket,
    metrics: Arc<Metrics>,
    queue: EventQueue,
}

impl EventWriter {
    /// A writer and the sender to feed it, writing at most `qps` Events per second
    /// (`burst` at once).
    pub fn new(
        client: kube::Client,
        qps: f64,
        burst: u32,
        metrics: Arc<Metrics>,
    ) -> (Self, mpsc::Sender<DeviceEventWrite>) {
        let (tx, rx) = mpsc::channel(1024);
        (
            Self {
                rx,
                client,
                bucket: TokenBucket::new(qps, burst),
                metrics,
                queue: EventQueue::default(),
            },
            tx,
        )
    }

    fn take_in(&mut self, w: DeviceEventWrite) {
        let dropped = self.queue.dropped;
        match self.queue.admit(w) {
            Admit::Queued => {}
            Admit::Duplicate => self.metrics.device_event("duplicate", 1),
        }
        if self.queue.dropped > dropped {
            self.metrics
                .device_event("dropped_queue_full", self.queue.dropped - dropped);
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut wait: Option<Instant> = None;
        loop {
            let ready = !self.queue.is_empty();
            tokio::select! {
                () = shutdown.cancelled() => return,
                w = self.rx.recv() => match w {
                    Some(w) => self.take_in(w),
                    None => return,
                },
                () = async {
                    if let Some(at) = wait {
                        tokio::time::sleep_until(at).await;
                    }
                }, if ready => {
                    wait = None;
                    match self.bucket.try_take() {
                        Err(d) => wait = Some(Instant::now() + d),
                        Ok(()) => {
                            if let Some((w, name)) = self.queue.pop() {
                                self.write(w, name).await;
                            }
                        }
                    }
                }
            }
        }
    }

    async fn write(&mut self, w: DeviceEventWrite, name: Option<String>) {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &w.namespace);
        if let Some(name) = name {
            let Some(s) = series(&w) else {
                return;
            };
            let body = json!({ "series": {
                "count": s.count,
                "lastObservedTime": s.last_observed_time,
            }});
            let r = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
                .await;
            self.metrics.api("patch_event", &r);
            match r {
                Ok(_) => {
                    self.metrics.device_event("series_updated", 1);
                    self.queue.done(&w, name, Instant::now());
                    return;
                }
                Err(e) if status_code(&e) == Some(404) => {
                    // Expired or deleted: a new Event object, as client-go does.
                    self.queue.forget(&w);
                }
                Err(error) => {
                    self.failed(w, &error, "updating an Event's series failed");
                    return;
                }
            }
        }
        let name = event_name(&w.pod_name, event_nanos(&w));
        let event = new_event(&w, &name);
        let r = api.create(&PostParams::default(), &event).await;
        self.metrics.api("create_event", &r);
        match r {
            Ok(_) => {
                self.metrics.device_event("created", 1);
                self.queue.done(&w, name, Instant::now());
            }
            Err(e) if status_code(&e) == Some(409) => {
                // The same Event, written by an earlier run of the hub that forgot it (the
                // name follows from the Event's pod, first time and content): update its series.
                self.queue.done(&w, name, Instant::now());
                if w.event.count >= 2 {
                    self.queue.admit_again(w);
                } else {
                    self.metrics.device_event("duplicate", 1);
                }
            }
            Err(error) => self.failed(w, &error, "creating an Event failed"),
        }
    }

    /// A write that failed: one the API server refused (4xx) is dropped; one it did not answer
    /// or failed on (5xx, 429, a transport error) goes to the back of the queue, at most
    /// [`MAX_ATTEMPTS`] times in all, as client-go keeps Events while the server is away.
    fn failed(&mut self, mut w: DeviceEventWrite, error: &kube::Error, what: &str) {
        let transient = status_code(error).is_none_or(|c| c == 429 || c >= 500);
        w.attempts = w.attempts.saturating_add(1);
        if transient && w.attempts < MAX_ATTEMPTS {
            tracing::debug!(node = %w.node, pod = %w.pod_name, %error, attempts = w.attempts, "{what}; trying again");
            self.queue.admit(w);
            return;
        }
        tracing::warn!(node = %w.node, namespace = %w.namespace, pod = %w.pod_name, reason = %w.event.reason, %error, "{what}; dropped");
        self.metrics.device_event("api_error", 1);
    }
}

/// Writes of one Event tried at most (client-go's maxTriesPerEvent).
pub const MAX_ATTEMPTS: u8 = 12;

#[cfg(test)]
mod tests {
    use super::*;

    fn write(node: &str, id: u64, count: u32) -> DeviceEventWrite {
        DeviceEventWrite {
            regarding: Regarding::Pod,
            node: node.into(),
            epoch: 1,
            namespace: "ns".into(),
            pod_name: "web-0".into(),
            pod_uid: "u".into(),
            event: DeviceEvent {
                id,
                pod_uid: "u".into(),
                field_path: "spec.containers{app}".into(),
                r#type: "Warning".into(),
                reason: "BackOff".into(),
                message: "Back-off restarting failed container app in pod web-0_ns(u)".into(),
                count,
                first_micros: 1_700_000_000_000_000,
                last_micros: 1_700_000_060_000_000,
            },
            attempts: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn repeats_coalesce_and_written_counts_are_not_written_again() {
        let mut q = EventQueue::default();
        assert_eq!(q.admit(write("d", 1, 1)), Admit::Queued);
        assert_eq!(q.admit(write("d", 1, 3)), Admit::Queued);
        assert_eq!(q.admit(write("d", 1, 2)), Admit::Queued);
        assert_eq!(q.len(), 1, "one Event, its newest count");
        let (w, name) = q.pop().expect("queued");
        assert_eq!((w.event.count, name), (3, None));
        q.done(&w, "web-0.abc".into(), Instant::now());
        // The device sends the same batch again after a reconnect.
        assert_eq!(q.admit(write("d", 1, 3)), Admit::Duplicate);
        assert_eq!(q.admit(write("d", 1, 2)), Admit::Duplicate);
        // A later occurrence updates the same Event object.
        assert_eq!(q.admit(write("d", 1, 4)), Admit::Queued);
        let (w, name) = q.pop().expect("queued");
        assert_eq!((w.event.count, name.as_deref()), (4, Some("web-0.abc")));
        // Another device's id 1 is another Event.
        assert_eq!(q.admit(write("e", 1, 1)), Admit::Queued);
        assert_eq!(q.pop().map(|(_, n)| n), Some(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_drops_the_oldest() {
        let mut q = EventQueue::default();
        for id in 0..(MAX_QUEUE as u64 + 5) {
            q.admit(write("d", id, 1));
        }
        assert_eq!(q.len(), MAX_QUEUE);
        assert_eq!(q.dropped, 5);
        assert_eq!(q.pop().map(|(w, _)| w.event.id), Some(5));
    }

    #[test]
    fn events_look_like_client_gos() {
        let w = write("dev-1", 1, 5);
        assert_eq!(
            event_name("web-0", 1_700_000_000_000_000_000),
            "web-0.17979cfe362a0000"
        );
        let e = new_event(&w, "web-0.1");
        assert_eq!(e.reporting_instance.as_deref(), Some("dev-1"));
        assert_eq!(e.reporting_controller.as_deref(), Some("kubelet"));
        let r = e.regarding.expect("regarding");
        assert_eq!(r.field_path.as_deref(), Some("spec.containers{app}"));
        assert_eq!(r.uid.as_deref(), Some("u"));
        let s = e.series.expect("series");
        assert_eq!(s.count, 5);
        let single = new_event(&write("d", 2, 1), "x");
        assert!(
            single.series.is_none(),
            "the API wants a series count of at least 2"
        );
    }

    #[test]
    fn bad_device_events_are_named() {
        let mut e = write("d", 1, 1).event;
        assert!(check(&e).is_ok());
        e.r#type = "Error".into();
        assert!(check(&e).unwrap_err().contains("type"));
        e.r#type = "Normal".into();
        e.reason = "Not a word".into();
        assert!(check(&e).unwrap_err().contains("reason"));
        e.reason = "Ok".into();
        e.count = 0;
        assert!(check(&e).unwrap_err().contains("count"));
    }
}
