//! Per-device link state shared by the gRPC server and the rest of the hub, and [`Sessions`],
//! the seam through which the Kubernetes side uses it (a trait, so the controllers can be
//! tested with in-memory links while `run` wires the real one).
//!
//! Desired state is level-triggered: each device has one slot holding its newest snapshot in a
//! watch channel. A connected session sends whatever is newest when the device can take it, so a
//! slow device never makes snapshots pile up: older ones are superseded, never queued.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use fleetlet_proto::v1;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use super::LinkError;
pub use crate::devices::{LiveRegistry, LiveSet};
use v1::{LogRequest, PodBundle};

/// A container log as the device streams it.
pub type LogStream = BoxStream<'static, Result<Bytes, LinkError>>;

/// The device link as the controllers use it.
pub trait Sessions: Send + Sync + 'static {
    /// Replaces the whole desired pod set of a device; returns the generation it got.
    /// `termination_grace` holds, by pod UID, the grace period (seconds) of each pod being
    /// deleted (left out of `pods`): the API's deletionGracePeriodSeconds, relayed to the device.
    fn set_desired(
        &self,
        device: &str,
        pods: Vec<PodBundle>,
        termination_grace: HashMap<String, u64>,
    ) -> u64;
    /// True while the device has a live stream.
    fn is_connected(&self, device: &str) -> bool;
    /// The live view of every device (connected since when, node info, capacity), published by
    /// the link as sessions start, report and end: the one place that knows whether a device
    /// is connected.
    fn live(&self) -> watch::Receiver<LiveSet>;
    /// Streams a container log from the device. The error says why not: offline
    /// ([`LinkError::NotConnected`]), congested, or refused by the device.
    fn open_logs(
        &self,
        device: &str,
        req: LogRequest,
    ) -> BoxFuture<'static, Result<LogStream, LinkError>>;
    /// Someone reads the device's resource figures: ask it for readings (see
    /// [`DeviceSessions::request_stats`]). Required, so that a wrapper routing some devices
    /// elsewhere cannot forget to pass it on.
    fn request_stats(&self, device: &str);
    /// Opens an exec, attach or port-forward stream on the device's link; an error (for the
    /// user) when it is offline, at its stream limit or its link is congested. A wrapper that
    /// routes some devices elsewhere must route this too (the default refuses).
    fn open_stream(
        &self,
        device: &str,
        open: fleetlet_proto::v1::StreamOpen,
    ) -> BoxFuture<'static, Result<DeviceStream, LinkError>> {
        let _ = open;
        let device = device.to_string();
        Box::pin(async move {
            Err(LinkError::Device {
                message: format!("streams to device {device} are not supported here"),
                device,
            })
        })
    }
}

/// The two halves of a stream opened with [`Sessions::open_stream`].
pub type DeviceStream = (super::StreamInput, super::StreamOutput);

/// The real link.
impl Sessions for DeviceSessions {
    fn set_desired(
        &self,
        device: &str,
        pods: Vec<PodBundle>,
        termination_grace: HashMap<String, u64>,
    ) -> u64 {
        DeviceSessions::set_desired_with_grace(self, device, pods, termination_grace)
    }

    fn is_connected(&self, device: &str) -> bool {
        DeviceSessions::is_connected(self, device)
    }

    fn live(&self) -> watch::Receiver<LiveSet> {
        DeviceSessions::live(self)
    }

    fn open_logs(
        &self,
        device: &str,
        req: LogRequest,
    ) -> BoxFuture<'static, Result<LogStream, LinkError>> {
        let this = self.clone();
        let device = device.to_string();
        Box::pin(async move { DeviceSessions::open_logs(&this, &device, req).await })
    }

    fn request_stats(&self, device: &str) {
        DeviceSessions::request_stats(self, device);
    }

    fn open_stream(
        &self,
        device: &str,
        open: fleetlet_proto::v1::StreamOpen,
    ) -> BoxFuture<'static, Result<DeviceStream, LinkError>> {
        let this = self.clone();
        let device = device.to_string();
        Box::pin(async move { DeviceSessions::open_stream(&this, &device, open).await })
    }
}

/// Something that happened on a device's link, for the node and pod managers.
#[derive(Debug, Clone)]
pub enum SessionEvent {
    /// A device completed its hello; it is connected until `Disconnected`.
    Connected {
        /// Device name (from its certificate).
        device: String,
        /// What the device said in its hello.
        hello: v1::Hello,
    },
    /// The device's current session ended (a replacing session does not produce this).
    Disconnected {
        /// Device name.
        device: String,
    },
    /// The device reported its capacity.
    Capacity {
        /// Device name.
        device: String,
        /// The report.
        capacity: v1::Capacity,
    },
    /// The device reported its reconcile figures.
    Stats {
        /// Device name.
        device: String,
        /// The report.
        stats: v1::AgentStats,
    },
    /// The device reported pod statuses (`report.full` after every reconnect).
    PodStatus {
        /// Device name.
        device: String,
        /// The report.
        report: v1::PodStatusReport,
        /// The report's share of its device's in-flight byte budget, released when the last
        /// holder of the event drops it.
        inflight: InFlight,
    },
    /// The device reported Events about its pods.
    Events {
        /// Device name.
        device: String,
        /// The batch (acknowledged to the device once handed on).
        batch: v1::EventBatch,
    },
    /// The device persisted (or rejected) a snapshot.
    Acked {
        /// Device name.
        device: String,
        /// The acknowledged generation.
        generation: u64,
        /// Why the device rejected the snapshot as a whole; `None` when accepted.
        error: Option<String>,
    },
}

/// Bytes of status reports one device may have queued in the hub (received, not yet processed
/// by every subscriber): two messages of the link's maximum size. Past it, the device's stream
/// waits (HTTP/2 flow control then pushes back to the device) until the hub has caught up.
pub const INFLIGHT_BYTES_PER_DEVICE: usize = 2 * fleetlet_proto::MAX_MESSAGE_BYTES;

/// A share of a device's in-flight byte budget held by a queued event.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Option<Arc<tokio::sync::OwnedSemaphorePermit>>);

impl InFlight {
    /// Bytes of the budget this share holds (0 for events made outside the link).
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |p| p.num_permits())
    }
}

/// Limits that keep one device from costing the hub unbounded memory.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Hub→device control messages (log requests/cancels) queued per session.
    pub control_queue: usize,
    /// Log chunks buffered per open log stream.
    pub log_chunk_queue: usize,
    /// How long a log consumer may stall before its stream is cancelled.
    pub log_consumer_timeout: Duration,
    /// Events buffered per subscriber before devices' inbound streams wait.
    pub event_queue: usize,
    /// Exec, attach and port-forward connections open at once per device; more are refused.
    pub max_streams_per_device: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            control_queue: 32,
            log_chunk_queue: 64,
            log_consumer_timeout: Duration::from_secs(10),
            event_queue: 4096,
            max_streams_per_device: 16,
        }
    }
}

/// Counters about the link, for `/metrics` (each exported under the name in its doc, see
/// [`crate::metrics::Metrics::register_link`]) and for tests that check bounds instead of
/// timing.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Snapshots replaced by a newer one before the device took them
    /// (`fleetlet_hub_link_snapshots_superseded_total`).
    pub snapshots_superseded: Counter,
    /// Snapshots handed to a device's stream (`fleetlet_hub_link_snapshots_sent_total`).
    pub snapshots_sent: Counter,
    /// Sessions cut because the device did not take a snapshot within the stall timeout
    /// (`fleetlet_hub_link_sessions_cut_stalled_total`).
    pub sessions_cut_stalled: Counter,
    /// Sessions replaced by a newer connection of the same device
    /// (`fleetlet_hub_link_sessions_replaced_total`).
    pub sessions_replaced: Counter,
    /// Streams refused: identity, inventory, hello, bad message
    /// (`fleetlet_hub_link_streams_rejected_total`).
    pub streams_rejected: Counter,
    /// TLS handshakes that failed: unknown CA, expired certificate, ...
    /// (`fleetlet_hub_link_handshakes_failed_total`).
    pub handshakes_failed: Counter,
    /// Log requests refused because the session's control queue was full
    /// (`fleetlet_hub_link_log_requests_rejected_total`).
    pub log_requests_rejected: Counter,
    /// Currently open sessions (on `/metrics` as `fleetlet_hub_connected_devices`).
    pub sessions_open: AtomicU64,
    /// Sessions cut because the device sent more than its budget
    /// (`fleetlet_hub_device_sessions_cut_over_budget_total`).
    pub sessions_cut_over_budget: Counter,
}

impl LinkStats {
    /// Reads one counter.
    pub fn get(counter: &Counter) -> u64 {
        counter.get()
    }
}

/// The hub's sessions with devices: desired state per device, who is connected, log relays.
#[derive(Clone)]
pub struct DeviceSessions {
    inner: Arc<Inner>,
}

struct Inner {
    devices: RwLock<HashMap<String, Arc<DeviceSlot>>>,
    subscribers: RwLock<Vec<mpsc::Sender<SessionEvent>>>,
    next_session: AtomicU64,
    next_log_request: AtomicU64,
    next_stream: AtomicU64,
    limits: SessionLimits,
    stats: Arc<LinkStats>,
    /// The devices' latest resource figures.
    resource_stats: Arc<crate::node_stats::StatsStore>,
    /// What is known live about each device (connected since when, node info, capacity),
    /// published by the link itself as its sessions start, report and end.
    live: crate::devices::LiveRegistry,
}

/// Everything the hub keeps about one device, connected or not.
pub(crate) struct DeviceSlot {
    /// The newest desired snapshot; `None` until the hub has decided what the device should run
    /// (so a freshly started hub never pushes an empty set over a device's pods).
    desired: watch::Sender<Option<Arc<v1::DesiredSnapshot>>>,
    /// The generation the device last said it holds (hello or ack).
    held: AtomicU64,
    /// The newest generation handed to the device's stream.
    sent: AtomicU64,
    /// Serializes Connected/Disconnected so a replaced session's end never follows its
    /// successor's start.
    order: tokio::sync::Mutex<()>,
    session: RwLock<Option<SessionHandle>>,
    /// Bytes of this device's status reports queued in the hub ([`INFLIGHT_BYTES_PER_DEVICE`]).
    inflight: Arc<tokio::sync::Semaphore>,
}

impl DeviceSlot {
    /// Takes `bytes` of the device's in-flight budget, waiting while it is used up.
    pub(crate) async fn take_inflight(&self, bytes: usize) -> InFlight {
        let n = u32::try_from(bytes.min(INFLIGHT_BYTES_PER_DEVICE)).unwrap_or(u32::MAX);
        InFlight(
            Arc::clone(&self.inflight)
                .acquire_many_owned(n)
                .await
                .ok()
                .map(Arc::new),
        )
    }
}

#[cfg(test)]
mod inflight_tests {
    use super::*;

    #[tokio::test]
    async fn a_device_waits_once_its_queued_reports_fill_its_byte_budget() {
        let sessions = DeviceSessions::default();
        let slot = sessions.slot("dev");
        let first = slot.take_inflight(INFLIGHT_BYTES_PER_DEVICE - 10).await;
        assert_eq!(first.bytes(), INFLIGHT_BYTES_PER_DEVICE - 10);
        // Another report of 1 KiB does not fit until the first one is processed (dropped).
        let waiting = tokio::spawn({
            let slot = Arc::clone(&slot);
            async move { slot.take_inflight(1024).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "over budget: the device's stream waits"
        );
        let copy = first.clone();
        drop(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "still held by another subscriber's copy"
        );
        drop(copy);
        let second = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("released")
            .expect("task");
        assert_eq!(second.bytes(), 1024);
        // Another device's budget is its own.
        assert_eq!(
            sessions.slot("other").take_inflight(1024).await.bytes(),
            1024
        );
    }
}

/// How long one `StatsRequest` asks a device for readings.
pub const STATS_REQUEST_SECS: u32 = 120;

/// The live session of a device.
#[derive(Clone)]
pub(crate) struct SessionHandle {
    pub(crate) id: u64,
    pub(crate) cancel: CancellationToken,
    pub(crate) shared: Arc<SessionShared>,
}

/// What the hub keeps per live session besides its tasks, in one allocation: a hub holds
/// thousands of idle sessions, and a tokio channel per session for the rare log request cost
/// about 1 KiB each (its shared state is cache-padded and its slots come in blocks of 32).
pub(crate) struct SessionShared {
    /// Open log requests and where their chunks go.
    pub(crate) logs: RwLock<HashMap<u64, LogSender>>,
    /// Why the session was cut from outside (replaced, removed from the inventory).
    cut_reason: RwLock<Option<(tonic::Code, String)>>,
    /// Hub→device control messages (log requests and cancels) not yet on the stream.
    control: RwLock<VecDeque<v1::HubMessage>>,
    control_ready: Notify,
    control_limit: usize,
    /// Open exec/attach/port-forward streams.
    streams: RwLock<super::streams::StreamMap>,
    /// When the last `StatsRequest` went out (`now_micros`; 0 before the first).
    stats_asked: AtomicU64,
}

impl SessionHandle {
    fn new(id: u64, control_limit: usize) -> Self {
        Self {
            id,
            cancel: CancellationToken::new(),
            shared: Arc::new(SessionShared {
                logs: RwLock::new(HashMap::new()),
                cut_reason: RwLock::new(None),
                control: RwLock::new(VecDeque::new()),
                control_ready: Notify::new(),
                control_limit,
                streams: RwLock::new(HashMap::new()),
                stats_asked: AtomicU64::new(0),
            }),
        }
    }

    /// End the session; the device gets `code` and `message` as the stream's status.
    pub(crate) fn cut(&self, code: tonic::Code, message: String) {
        write(&self.shared.cut_reason).get_or_insert((code, message));
        self.cancel.cancel();
    }

    /// Why the session was cut, if it was.
    pub(crate) fn cut_reason(&self) -> Option<(tonic::Code, String)> {
        read(&self.shared.cut_reason).clone()
    }

    /// Queue a control message for the device; false when the queue is full.
    pub(crate) fn push_control(&self, message: v1::HubMessage) -> bool {
        {
            let mut queue = write(&self.shared.control);
            if queue.len() >= self.shared.control_limit {
                return false;
            }
            queue.push_back(message);
        }
        // One consumer (the session's outbound stream): a notification sent while it is not
        // waiting is kept as a permit, so none is lost.
        self.shared.control_ready.notify_one();
        true
    }

    /// Queue a stream message for the device (bounded by [`super::streams::STREAM_QUEUE_PER_SESSION`]
    /// besides the control queue's own limit); false when full.
    pub(crate) fn push_stream(&self, message: v1::HubMessage) -> bool {
        {
            let mut queue = write(&self.shared.control);
            if queue.len() >= self.shared.control_limit + super::streams::STREAM_QUEUE_PER_SESSION {
                return false;
            }
            queue.push_back(message);
        }
        self.shared.control_ready.notify_one();
        true
    }

    /// The session's open streams.
    pub(crate) fn streams(&self) -> std::sync::RwLockWriteGuard<'_, super::streams::StreamMap> {
        write(&self.shared.streams)
    }

    /// The next queued control message, waiting for one.
    pub(crate) async fn next_control(&self) -> v1::HubMessage {
        loop {
            if let Some(message) = write(&self.shared.control).pop_front() {
                return message;
            }
            self.shared.control_ready.notified().await;
        }
    }
}

/// Where a device's chunks for one log request go.
pub(crate) type LogSender = mpsc::Sender<Result<Bytes, LinkError>>;

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The next generation: strictly above everything this hub issued and the device holds, and at
/// least the wall clock in microseconds so a restarted hub (or another replica) continues above
/// what an earlier one issued.
fn next_generation(previous: u64, held: u64) -> u64 {
    previous
        .saturating_add(1)
        .max(held.saturating_add(1))
        .max(now_micros())
}

impl Default for DeviceSessions {
    fn default() -> Self {
        Self::new(SessionLimits::default())
    }
}

impl DeviceSessions {
    /// No devices, no sessions.
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            inner: Arc::new(Inner {
                devices: RwLock::new(HashMap::new()),
                subscribers: RwLock::new(Vec::new()),
                next_session: AtomicU64::new(1),
                next_log_request: AtomicU64::new(1),
                next_stream: AtomicU64::new(1),
                limits,
                stats: Arc::new(LinkStats::default()),
                resource_stats: Arc::default(),
                live: crate::devices::LiveRegistry::new(),
            }),
        }
    }

    /// Counters about the link.
    pub fn stats(&self) -> Arc<LinkStats> {
        Arc::clone(&self.inner.stats)
    }

    /// The devices' latest resource figures (`ResourceStats` reports).
    pub fn resource_stats(&self) -> Arc<crate::node_stats::StatsStore> {
        Arc::clone(&self.inner.resource_stats)
    }

    pub(crate) fn slot(&self, device: &str) -> Arc<DeviceSlot> {
        if let Some(slot) = read(&self.inner.devices).get(device) {
            return Arc::clone(slot);
        }
        let mut devices = write(&self.inner.devices);
        Arc::clone(devices.entry(device.to_owned()).or_insert_with(|| {
            Arc::new(DeviceSlot {
                desired: watch::Sender::new(None),
                held: AtomicU64::new(0),
                sent: AtomicU64::new(0),
                order: tokio::sync::Mutex::new(()),
                session: RwLock::new(None),
                inflight: Arc::new(tokio::sync::Semaphore::new(INFLIGHT_BYTES_PER_DEVICE)),
            })
        }))
    }

    /// Replace the whole desired pod set of a device and return its new generation. Pushed to the
    /// device if it is connected, else on its next hello (only when the device's copy is stale).
    pub fn set_desired(&self, device: &str, pods: Vec<v1::PodBundle>) -> u64 {
        self.set_desired_with_grace(device, pods, HashMap::new())
    }

    /// [`Self::set_desired`], with the grace periods (seconds, by pod UID) of pods being deleted:
    /// the device stops those with this grace instead of their spec's.
    pub fn set_desired_with_grace(
        &self,
        device: &str,
        pods: Vec<v1::PodBundle>,
        termination_grace_seconds: HashMap<String, u64>,
    ) -> u64 {
        let slot = self.slot(device);
        let held = slot.held.load(Ordering::Acquire);
        let sent = slot.sent.load(Ordering::Acquire);
        let mut generation = 0;
        slot.desired.send_modify(|desired| {
            let previous = desired.as_ref().map_or(0, |s| s.generation);
            if previous > sent && read(&slot.session).is_some() {
                // The device has not taken the previous snapshot yet; it never will now.
                self.inner.stats.snapshots_superseded.inc();
            }
            generation = next_generation(previous, held);
            *desired = Some(Arc::new(v1::DesiredSnapshot {
                generation,
                pods,
                termination_grace_seconds,
            }));
        });
        tracing::debug!(device, generation, "desired snapshot updated");
        generation
    }

    /// The generation of the device's current desired snapshot, if the hub has set one.
    pub fn desired_generation(&self, device: &str) -> Option<u64> {
        read(&self.inner.devices)
            .get(device)
            .and_then(|slot| slot.desired.borrow().as_ref().map(|s| s.generation))
    }

    /// Cut the sessions of connected devices that `admits` refuses (left the inventory or
    /// were disabled). Returns how many were cut.
    pub(crate) fn cut_unadmitted(&self, admits: impl Fn(&str) -> bool) -> usize {
        let mut cut = 0;
        for (device, slot) in read(&self.inner.devices).iter() {
            if admits(device) {
                continue;
            }
            if let Some(session) = read(&slot.session).as_ref() {
                session.cut(
                    tonic::Code::PermissionDenied,
                    format!("device {device} is no longer in the inventory"),
                );
                cut += 1;
            }
        }
        cut
    }

    /// A new bounded stream of session events. Every subscriber gets every event; a subscriber
    /// that stops reading makes devices' inbound streams wait (backpressure), never grow memory.
    pub fn subscribe(&self) -> mpsc::Receiver<SessionEvent> {
        let (tx, rx) = mpsc::channel(self.inner.limits.event_queue);
        write(&self.inner.subscribers).push(tx);
        rx
    }

    /// The live view of every device, published by the link (see [`crate::devices`]).
    pub fn live(&self) -> watch::Receiver<crate::devices::LiveSet> {
        self.inner.live.subscribe()
    }

    /// Publishes `event`: first into the live view (so it holds before anyone hears of the
    /// event), then to every subscriber.
    pub(crate) async fn emit(&self, event: SessionEvent) {
        self.inner.live.apply(&event);
        let subscribers = read(&self.inner.subscribers).clone();
        let mut closed = false;
        for tx in &subscribers {
            if tx.send(event.clone()).await.is_err() {
                closed = true;
            }
        }
        if closed {
            write(&self.inner.subscribers).retain(|tx| !tx.is_closed());
        }
    }

    /// Whether the device has a live session.
    pub fn is_connected(&self, device: &str) -> bool {
        read(&self.inner.devices)
            .get(device)
            .is_some_and(|slot| read(&slot.session).is_some())
    }

    /// Names of all devices with a live session.
    pub fn connected_devices(&self) -> Vec<String> {
        read(&self.inner.devices)
            .iter()
            .filter(|(_, slot)| read(&slot.session).is_some())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Ask the device to stream a container log. Fails at once when the device is offline or its
    /// link is congested; the stream ends with an error if the session drops. Dropping the
    /// stream cancels the request on the device.
    pub async fn open_logs(
        &self,
        device: &str,
        mut req: v1::LogRequest,
    ) -> Result<BoxStream<'static, Result<Bytes, LinkError>>, LinkError> {
        let session = self
            .live_session(device)
            .ok_or_else(|| LinkError::NotConnected {
                device: device.to_owned(),
            })?;
        let request_id = self.inner.next_log_request.fetch_add(1, Ordering::Relaxed);
        req.request_id = request_id;
        let (tx, rx) = mpsc::channel(self.inner.limits.log_chunk_queue);
        write(&session.shared.logs).insert(request_id, tx);
        let message = v1::HubMessage {
            kind: Some(v1::hub_message::Kind::LogRequest(req)),
        };
        if !session.push_control(message) {
            write(&session.shared.logs).remove(&request_id);
            self.inner.stats.log_requests_rejected.inc();
            return Err(LinkError::Congested {
                device: device.to_owned(),
            });
        }
        let guard = LogGuard {
            request_id,
            session,
        };
        let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            let item = rx.recv().await?;
            Some((item, (rx, guard)))
        });
        Ok(Box::pin(stream))
    }

    /// Ask the device for resource figures for the next [`STATS_REQUEST_SECS`] seconds: someone
    /// reads its Node's stats. Sent at most once per half of that per session, so a scraper
    /// costs the link one small message a minute besides the readings. True when a request went
    /// out.
    pub fn request_stats(&self, device: &str) -> bool {
        let Some(session) = self.live_session(device) else {
            return false;
        };
        let now = now_micros();
        let last = session.shared.stats_asked.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < u64::from(STATS_REQUEST_SECS) * 500_000 {
            return false;
        }
        // Counted as asked only once queued: a request refused by a full control queue is
        // tried again at the next read.
        let queued = session.push_control(v1::HubMessage {
            kind: Some(v1::hub_message::Kind::StatsRequest(v1::StatsRequest {
                for_secs: STATS_REQUEST_SECS,
            })),
        });
        if queued {
            session.shared.stats_asked.store(now, Ordering::Relaxed);
        }
        queued
    }

    /// The device's live session, if it has one.
    fn live_session(&self, device: &str) -> Option<SessionHandle> {
        read(&self.inner.devices)
            .get(device)
            .and_then(|slot| read(&slot.session).clone())
    }

    /// Open an exec, attach or port-forward stream on the device's link. Fails at once when the
    /// device is offline, has [`SessionLimits::max_streams_per_device`] streams open, or its
    /// link is congested. Dropping both halves closes the stream on the device; a dropped link
    /// ends it with an error saying so.
    pub async fn open_stream(
        &self,
        device: &str,
        open: v1::StreamOpen,
    ) -> Result<(super::StreamInput, super::StreamOutput), LinkError> {
        let session = self
            .live_session(device)
            .ok_or_else(|| LinkError::NotConnected {
                device: device.to_owned(),
            })?;
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        super::streams::open(
            device,
            &session,
            id,
            open,
            self.inner.limits.max_streams_per_device,
        )
    }

    /// Make `hello`'s session the device's current one (cutting any previous session) and decide
    /// whether the device's snapshot is stale. Returns the handle pieces the server needs.
    pub(crate) async fn register(&self, device: &str, hello: &v1::Hello) -> Registered {
        let slot = self.slot(device);
        let _order = slot.order.lock().await;
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let handle = SessionHandle::new(id, self.inner.limits.control_queue);
        let previous = write(&slot.session).replace(handle.clone());
        if let Some(previous) = previous {
            self.inner.stats.sessions_replaced.inc();
            tracing::info!(
                device,
                session = previous.id,
                "session replaced by a new connection"
            );
            previous.cut(
                tonic::Code::Aborted,
                format!("session of device {device} replaced by a newer connection"),
            );
        } else {
            self.inner
                .stats
                .sessions_open
                .fetch_add(1, Ordering::Relaxed);
        }
        let held = hello.held_generation;
        slot.held.store(held, Ordering::Release);
        slot.sent.store(held, Ordering::Release);
        // Decide staleness under the watch's lock so a concurrent set_desired cannot slip between
        // the comparison and the re-stamp.
        let mut desired_rx = slot.desired.subscribe();
        slot.desired.send_if_modified(|desired| match desired {
            Some(snapshot) if snapshot.generation < held => {
                // The device holds a generation this hub never issued (another replica, a clock
                // step): re-issue the current set above it so the device takes it.
                let generation = next_generation(snapshot.generation, held);
                *snapshot = Arc::new(v1::DesiredSnapshot {
                    generation,
                    ..(**snapshot).clone()
                });
                true
            }
            _ => false,
        });
        let stale = desired_rx
            .borrow_and_update()
            .as_ref()
            .is_some_and(|s| s.generation != held);
        if stale {
            desired_rx.mark_changed();
        }
        self.emit(SessionEvent::Connected {
            device: device.to_owned(),
            hello: hello.clone(),
        })
        .await;
        Registered {
            handle,
            desired_rx,
            slot: Arc::clone(&slot),
        }
    }

    /// End session `id` of `device`; emits `Disconnected` only if it was still the current one.
    pub(crate) async fn unregister(&self, device: &str, slot: &DeviceSlot, handle: &SessionHandle) {
        let _order = slot.order.lock().await;
        let current = {
            let mut session = write(&slot.session);
            if session.as_ref().is_some_and(|s| s.id == handle.id) {
                session.take();
                true
            } else {
                false
            }
        };
        // Open log streams end with an error instead of hanging.
        let logs = std::mem::take(&mut *write(&handle.shared.logs));
        for (_, tx) in logs {
            let _ = tx.try_send(Err(LinkError::NotConnected {
                device: device.to_owned(),
            }));
        }
        let streams = std::mem::take(&mut *handle.streams());
        super::streams::end_all(device, streams);
        if current {
            self.inner
                .stats
                .sessions_open
                .fetch_sub(1, Ordering::Relaxed);
            self.emit(SessionEvent::Disconnected {
                device: device.to_owned(),
            })
            .await;
        }
    }

    pub(crate) fn record_sent(&self, slot: &DeviceSlot, generation: u64) {
        slot.sent.fetch_max(generation, Ordering::AcqRel);
        self.inner.stats.snapshots_sent.inc();
    }

    pub(crate) fn record_ack(&self, slot: &DeviceSlot, generation: u64) {
        slot.held.fetch_max(generation, Ordering::AcqRel);
    }

    /// Deliver a device's log chunk to whoever opened the request; a consumer that stalls
    /// longer than the configured timeout loses its stream (and the device is told to stop).
    pub(crate) async fn route_log_chunk(
        &self,
        device: &str,
        handle: &SessionHandle,
        chunk: v1::LogChunk,
    ) {
        let request_id = chunk.request_id;
        let Some(tx) = read(&handle.shared.logs).get(&request_id).cloned() else {
            // Cancelled meanwhile; the device stops when the cancel arrives.
            return;
        };
        if !chunk.error.is_empty() {
            write(&handle.shared.logs).remove(&request_id);
            let _ = tx.try_send(Err(LinkError::Device {
                device: device.to_owned(),
                message: chunk.error,
            }));
            return;
        }
        if !chunk.data.is_empty() {
            let sent = tokio::time::timeout(
                self.inner.limits.log_consumer_timeout,
                tx.send(Ok(chunk.data)),
            )
            .await;
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    // The consumer is gone; its guard already sent the cancel.
                    write(&handle.shared.logs).remove(&request_id);
                    return;
                }
                Err(_) => {
                    write(&handle.shared.logs).remove(&request_id);
                    let _ = tx.try_send(Err(LinkError::SlowConsumer {
                        device: device.to_owned(),
                        request_id,
                    }));
                    handle.push_control(v1::HubMessage {
                        kind: Some(v1::hub_message::Kind::LogCancel(v1::LogCancel {
                            request_id,
                        })),
                    });
                    return;
                }
            }
        }
        if chunk.eof {
            // Dropping the sender ends the consumer's stream.
            write(&handle.shared.logs).remove(&request_id);
        }
    }
}

/// What `register` hands the server for one session.
pub(crate) struct Registered {
    pub(crate) handle: SessionHandle,
    pub(crate) desired_rx: watch::Receiver<Option<Arc<v1::DesiredSnapshot>>>,
    pub(crate) slot: Arc<DeviceSlot>,
}

impl DeviceSlot {
    /// A receiver of the device's desired snapshot (current value marked seen).
    pub(crate) fn subscribe_desired(&self) -> watch::Receiver<Option<Arc<v1::DesiredSnapshot>>> {
        self.desired.subscribe()
    }

    /// The newest generation handed to the device's stream.
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }
}

/// Cancels a log request on the device when its consumer drops the stream.
struct LogGuard {
    request_id: u64,
    session: SessionHandle,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if write(&self.session.shared.logs)
            .remove(&self.request_id)
            .is_some()
        {
            let cancel = v1::HubMessage {
                kind: Some(v1::hub_message::Kind::LogCancel(v1::LogCancel {
                    request_id: self.request_id,
                })),
            };
            // Best effort: if the queue is full the device finishes the request on its own
            // (its chunks then find no consumer and are dropped).
            self.session.push_control(cancel);
        }
    }
}

/// Locks are only held for map lookups, never across an await, so a poisoned lock can only come
/// from a panic in such a lookup; the data is still consistent, so keep going.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_strictly_increase_and_exceed_held() {
        let sessions = DeviceSessions::default();
        let g1 = sessions.set_desired("d", vec![]);
        let g2 = sessions.set_desired("d", vec![]);
        assert!(g2 > g1);
        assert!(
            g1 >= now_micros() - 60_000_000,
            "derived from the wall clock"
        );
        let slot = sessions.slot("d");
        slot.held.store(u64::MAX / 2, Ordering::Release);
        let g3 = sessions.set_desired("d", vec![]);
        assert_eq!(g3, u64::MAX / 2 + 1);
        assert_eq!(sessions.desired_generation("d"), Some(g3));
        assert_eq!(sessions.desired_generation("other"), None);
    }

    #[tokio::test]
    async fn hello_with_current_generation_sends_nothing_stale_sends() {
        let sessions = DeviceSessions::default();
        let mut events = sessions.subscribe();
        let generation = sessions.set_desired("d", vec![]);
        let hello = v1::Hello {
            device_name: "d".into(),
            held_generation: generation,
            ..Default::default()
        };
        let mut reg = sessions.register("d", &hello).await;
        assert!(!reg.desired_rx.has_changed().unwrap());
        assert!(
            matches!(events.recv().await, Some(SessionEvent::Connected { device, .. }) if device == "d")
        );
        assert!(sessions.is_connected("d"));

        // A second connection replaces the first; only the second's end says Disconnected.
        let stale = v1::Hello {
            held_generation: generation - 1,
            ..hello.clone()
        };
        let mut reg2 = sessions.register("d", &stale).await;
        assert!(reg.handle.cancel.is_cancelled());
        assert!(reg2.desired_rx.has_changed().unwrap());
        assert!(matches!(
            events.recv().await,
            Some(SessionEvent::Connected { .. })
        ));
        sessions.unregister("d", &reg.slot, &reg.handle).await;
        assert!(sessions.is_connected("d"));
        sessions.unregister("d", &reg2.slot, &reg2.handle).await;
        assert!(!sessions.is_connected("d"));
        assert!(
            matches!(events.recv().await, Some(SessionEvent::Disconnected { device }) if device == "d")
        );
        let _ = (&mut reg.desired_rx, &mut reg2.desired_rx);
    }

    #[tokio::test]
    async fn device_ahead_of_hub_gets_a_restamped_snapshot() {
        let sessions = DeviceSessions::default();
        let generation = sessions.set_desired("d", vec![]);
        let hello = v1::Hello {
            device_name: "d".into(),
            held_generation: generation + 1000,
            ..Default::default()
        };
        let mut reg = sessions.register("d", &hello).await;
        assert!(reg.desired_rx.has_changed().unwrap());
        let now = reg
            .desired_rx
            .borrow_and_update()
            .as_ref()
            .unwrap()
            .generation;
        assert!(now > generation + 1000);
    }

    #[tokio::test]
    async fn nothing_is_pushed_before_the_hub_decides() {
        let sessions = DeviceSessions::default();
        let hello = v1::Hello {
            device_name: "d".into(),
            held_generation: 42,
            ..Default::default()
        };
        let reg = sessions.register("d", &hello).await;
        assert!(!reg.desired_rx.has_changed().unwrap());
        assert!(reg.desired_rx.borrow().is_none());
    }

    #[tokio::test]
    async fn open_logs_fails_when_offline() {
        let sessions = DeviceSessions::default();
        let err = sessions
            .open_logs("nope", v1::LogRequest::default())
            .await
            .err()
            .unwrap();
        assert!(matches!(err, LinkError::NotConnected { ref device } if device == "nope"));
    }
}
