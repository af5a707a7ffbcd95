//! Kubernetes Events about the device's pods, recorded where the kubelet records them and
//! correlated on the device the way client-go's `EventCorrelator` does
//! (`tools/record/events_cache.go`), so a crash-looping pod yields one Event with a rising
//! count instead of a flood, on the device, on the link and in the API server:
//!
//! - **aggregation**: an event equal to an earlier one (same pod, fieldPath, type, reason and
//!   message) is the same Event seen again: its `count` rises and its last time moves. More than
//!   [`AGGREGATE_MAX_MESSAGES`] different messages for one pod, fieldPath, type and reason within
//!   [`AGGREGATE_WINDOW`] are combined into one Event whose message starts with
//!   `(combined from similar events): `, as client-go does;
//! - **spam filter**: a token bucket per pod and event type ([`SPAM_BURST`] events, one more
//!   every [`SPAM_REFILL`]); an occurrence without a token is still counted but not sent until a
//!   later occurrence gets a token (client-go's semantics);
//! - **offline buffer**: Events not yet acknowledged by the hub wait here, at most
//!   [`MAX_PENDING`]; past that the oldest pending one is dropped and its occurrences are counted
//!   in `dropped_total`, which every batch carries to the hub (shown there as a Node Warning
//!   and a metric). The buffer lives in memory only: like the kubelet's, an agent restart loses
//!   Events not yet sent (pod status, which is persisted, stays the level of truth).
//!
//! Sending is the link's job ([`EventRecorder::take_batch`], [`EventRecorder::ack`],
//! [`EventRecorder::reconnected`]); a batch lost with the link is sent again, and the hub
//! recognises a repeat by `(epoch, id, count)`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fleetlet_proto::v1;
use tokio::sync::Notify;

/// Distinct messages per pod, fieldPath, type and reason before they are combined.
pub const AGGREGATE_MAX_MESSAGES: usize = 10;
/// The window of that count.
pub const AGGREGATE_WINDOW: Duration = Duration::from_secs(600);
/// Events per pod and type that may be sent at once.
pub const SPAM_BURST: f64 = 25.0;
/// One more Event per pod and type may be sent after this long.
pub const SPAM_REFILL: Duration = Duration::from_secs(300);
/// Events waiting for the hub by default (`events_buffer`); past it the oldest is dropped.
pub const MAX_PENDING: usize = 512;
/// Events remembered for aggregation (client-go's LRU size).
pub const MAX_REMEMBERED: usize = 4096;
/// Events per batch on the link.
pub const MAX_BATCH: usize = 64;
/// Batches sent and not yet acknowledged; more wait for an ack.
pub const MAX_UNACKED_BATCHES: usize = 4;
/// Longest message kept (the API server's limit for an Event's note is 1 KiB).
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// An Event's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// Normal.
    Normal,
    /// Warning.
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// Identity of an aggregated Event.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    uid: String,
    field_path: String,
    kind: EventType,
    reason: String,
    /// `None` for the combined Event of many different messages.
    message: Option<String>,
}

/// Identity of a group of similar Events (everything but the message).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SimilarKey {
    uid: String,
    field_path: String,
    kind: EventType,
    reason: String,
}

#[derive(Debug)]
struct Similar {
    since_micros: i64,
    messages: HashSet<String>,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    message: String,
    /// Occurrences so far.
    count: u32,
    /// Occurrences the spam filter let through (what may be sent).
    released: u32,
    /// The count carried by the newest batch sent.
    sent: u32,
    /// The count the hub acknowledged.
    acked: u32,
    first_micros: i64,
    last_micros: i64,
    /// When the event became pending (for dropping the oldest first).
    pending_since: u64,
}

impl Entry {
    fn pending(&self) -> bool {
        self.released > self.acked
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at_micros: i64,
}

/// The correlator's state; see the module docs.
#[derive(Debug)]
struct Correlator {
    epoch: u64,
    /// Pending events kept at most.
    max_pending: usize,
    next_id: u64,
    next_seq: u64,
    /// Order of pending events, for dropping the oldest.
    next_pending: u64,
    entries: HashMap<Key, Entry>,
    similar: HashMap<SimilarKey, Similar>,
    spam: HashMap<(String, EventType), Bucket>,
    /// Batches sent and not acknowledged: seq → (key, count sent).
    unacked: VecDeque<(u64, Vec<(Key, u32)>)>,
    dropped_total: u64,
    dropped_sent: u64,
    recorded_total: u64,
}

impl Correlator {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            max_pending: MAX_PENDING,
            next_id: 1,
            next_seq: 1,
            next_pending: 0,
            entries: HashMap::new(),
            similar: HashMap::new(),
            spam: HashMap::new(),
            unacked: VecDeque::new(),
            dropped_total: 0,
            dropped_sent: 0,
            recorded_total: 0,
        }
    }

    /// A token for one more sent Event about `uid` of type `kind`.
    fn take_token(&mut self, uid: &str, kind: EventType, now: i64) -> bool {
        let bucket = self.spam.entry((uid.to_owned(), kind)).or_insert(Bucket {
            tokens: SPAM_BURST,
            at_micros: now,
        });
        let elapsed = (now - bucket.at_micros).max(0) as f64 / 1e6;
        bucket.tokens = (bucket.tokens + elapsed / SPAM_REFILL.as_secs_f64()).min(SPAM_BURST);
        bucket.at_micros = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn record(
        &mut self,
        uid: &str,
        field_path: &str,
        kind: EventType,
        reason: &str,
        message: &str,
        now: i64,
    ) {
        self.recorded_total += 1;
        let message = truncate(message);
        // Aggregation of similar events (client-go's EventAggregator).
        let similar_key = SimilarKey {
            uid: uid.to_owned(),
            field_path: field_path.to_owned(),
            kind,
            reason: reason.to_owned(),
        };
        let window = i64::try_from(AGGREGATE_WINDOW.as_micros()).unwrap_or(i64::MAX);
        let similar = self.similar.entry(similar_key).or_insert_with(|| Similar {
            since_micros: now,
            messages: HashSet::new(),
        });
        if now - similar.since_micros > window {
            similar.since_micros = now;
            similar.messages.clear();
        }
        let combined = !similar.messages.contains(&message)
            && similar.messages.len() >= AGGREGATE_MAX_MESSAGES;
        if !combined {
            similar.messages.insert(message.clone());
        }
        let (key, message) = if combined {
            (
                Key {
                    uid: uid.to_owned(),
                    field_path: field_path.to_owned(),
                    kind,
                    reason: reason.to_owned(),
                    message: None,
                },
                truncate(&format!("(combined from similar events): {message}")),
            )
        } else {
            (
                Key {
                    uid: uid.to_owned(),
                    field_path: field_path.to_owned(),
                    kind,
                    reason: reason.to_owned(),
                    message: Some(message.clone()),
                },
                message,
            )
        };
        let released = self.take_token(uid, kind, now);
        let id = self.next_id;
        let pending_order = self.next_pending;
        let entry = self.entries.entry(key).or_insert_with(|| Entry {
            id,
            message: message.clone(),
            count: 0,
            released: 0,
            sent: 0,
            acked: 0,
            first_micros: now,
            last_micros: now,
            pending_since: pending_order,
        });
        if entry.id == id {
            self.next_id += 1;
        }
        let was_pending = entry.pending();
        entry.count = entry.count.saturating_add(1);
        entry.last_micros = now;
        entry.message = message;
        if released {
            entry.released = entry.count;
        }
        if entry.pending() && !was_pending {
            entry.pending_since = pending_order;
            self.next_pending += 1;
        }
        self.bound();
    }

    /// Keeps the pending events within [`MAX_PENDING`] (dropping the oldest, counted) and the
    /// remembered ones within [`MAX_REMEMBERED`] (forgetting the least recent settled ones).
    fn bound(&mut self) {
        let pending = self.entries.values().filter(|e| e.pending()).count();
        if pending > self.max_pending {
            let mut order: Vec<(u64, Key)> = self
                .entries
                .iter()
                .filter(|(_, e)| e.pending())
                .map(|(k, e)| (e.pending_since, k.clone()))
                .collect();
            order.sort_by_key(|(since, _)| *since);
            for (_, key) in order.into_iter().take(pending - self.max_pending) {
                if let Some(e) = self.entries.remove(&key) {
                    self.dropped_total += u64::from(e.released - e.acked);
                }
            }
        }
        if self.entries.len() > MAX_REMEMBERED {
            let mut settled: Vec<(i64, Key)> = self
                .entries
                .iter()
                .filter(|(_, e)| !e.pending() && e.sent <= e.acked)
                .map(|(k, e)| (e.last_micros, k.clone()))
                .collect();
            settled.sort_by_key(|(last, _)| *last);
            let excess = self.entries.len() - MAX_REMEMBERED;
            for (_, key) in settled.into_iter().take(excess) {
                self.entries.remove(&key);
            }
        }
        if self.similar.len() > MAX_REMEMBERED {
            let mut groups: Vec<(i64, SimilarKey)> = self
                .similar
                .iter()
                .map(|(k, s)| (s.since_micros, k.clone()))
                .collect();
            groups.sort_by_key(|(since, _)| *since);
            let excess = self.similar.len() - MAX_REMEMBERED;
            for (_, key) in groups.into_iter().take(excess) {
                self.similar.remove(&key);
            }
        }
        if self.spam.len() > MAX_REMEMBERED {
            let mut buckets: Vec<(i64, (String, EventType))> = self
                .spam
                .iter()
                .map(|(k, b)| (b.at_micros, k.clone()))
                .collect();
            buckets.sort_by_key(|(at, _)| *at);
            let excess = self.spam.len() - MAX_REMEMBERED;
            for (_, key) in buckets.into_iter().take(excess) {
                self.spam.remove(&key);
            }
        }
    }

    fn take_batch(&mut self) -> Option<v1::EventBatch> {
        if self.unacked.len() >= MAX_UNACKED_BATCHES {
            return None;
        }
        let mut due: Vec<(&Key, &Entry)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.released > e.sent && e.released > e.acked)
            .collect();
        if due.is_empty() && self.dropped_total == self.dropped_sent {
            return None;
        }
        due.sort_by_key(|(_, e)| (e.pending_since, e.id));
        due.truncate(MAX_BATCH);
        let picked: Vec<Key> = due.into_iter().map(|(k, _)| k.clone()).collect();
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut events = Vec::with_capacity(picked.len());
        let mut sent = Vec::with_capacity(picked.len());
        for key in picked {
            let Some(e) = self.entries.get_mut(&key) else {
                continue;
            };
            e.sent = e.released;
            events.push(v1::DeviceEvent {
                id: e.id,
                pod_uid: key.uid.clone(),
                field_path: key.field_path.clone(),
                r#type: key.kind.as_str().to_owned(),
                reason: key.reason.clone(),
                message: e.message.clone(),
                count: e.released,
                first_micros: e.first_micros,
                last_micros: e.last_micros,
            });
            sent.push((key, e.released));
        }
        self.dropped_sent = self.dropped_total;
        self.unacked.push_back((seq, sent));
        Some(v1::EventBatch {
            epoch: self.epoch,
            seq,
            events,
            dropped_total: self.dropped_total,
        })
    }

    fn ack(&mut self, epoch: u64, seq: u64) {
        if epoch != self.epoch {
            return;
        }
        while self.unacked.front().is_some_and(|(s, _)| *s <= seq) {
            let Some((_, sent)) = self.unacked.pop_front() else {
                break;
            };
            for (key, count) in sent {
                if let Some(e) = self.entries.get_mut(&key) {
                    e.acked = e.acked.max(count);
                }
            }
        }
    }

    fn reconnected(&mut self) {
        self.unacked.clear();
        for e in self.entries.values_mut() {
            e.sent = e.acked;
        }
        // The hub may not have seen the drop count either.
        self.dropped_sent = 0;
    }
}

fn truncate(message: &str) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message.to_owned();
    }
    let mut end = MAX_MESSAGE_BYTES - 4;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} ...", &message[..end])
}

fn now_micros() -> i64 {
    jiff::Timestamp::now().as_microsecond()
}

/// Counters of the recorder, for `fleetlet-agent status` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventCounts {
    /// Occurrences recorded since start.
    pub recorded: u64,
    /// Occurrences dropped because the buffer was full.
    pub dropped: u64,
    /// Events waiting for the hub.
    pub pending: usize,
}

/// Records Events about pods; cheap to clone and shared by every pod worker and the link.
#[derive(Clone)]
pub struct EventRecorder {
    inner: Arc<RwLock<Correlator>>,
    ready: Arc<Notify>,
}

impl Default for EventRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for EventRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRecorder")
            .field("counts", &self.counts())
            .finish()
    }
}

impl EventRecorder {
    /// A recorder whose epoch is the wall clock (microseconds), so a restarted agent's Events
    /// are never taken for repeats of the previous run's.
    pub fn new() -> Self {
        Self::with_epoch(u64::try_from(now_micros()).unwrap_or(1).max(1))
    }

    /// A recorder with the given epoch.
    pub fn with_epoch(epoch: u64) -> Self {
        Self {
            inner: Arc::new(RwLock::new(Correlator::new(epoch))),
            ready: Arc::new(Notify::new()),
        }
    }

    /// Keeps at most `n` (at least 1) Events waiting for the hub.
    pub fn with_buffer(self, n: usize) -> Self {
        self.lock().max_pending = n.max(1);
        self
    }

    fn lock(&self) -> std::sync::RwLockWriteGuard<'_, Correlator> {
        // Held only for map updates, never across an await: a poisoned lock still holds
        // consistent data.
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records one occurrence of an Event about pod `uid` (at `field_path`, e.g.
    /// `spec.containers{app}`, or "" for the pod); `uid` "" means the device's own Node.
    pub fn record(
        &self,
        uid: &str,
        field_path: &str,
        kind: EventType,
        reason: &str,
        message: &str,
    ) {
        self.record_at(uid, field_path, kind, reason, message, now_micros());
    }

    /// [`Self::record`] at a given time (microseconds since the epoch).
    pub fn record_at(
        &self,
        uid: &str,
        field_path: &str,
        kind: EventType,
        reason: &str,
        message: &str,
        now_micros: i64,
    ) {
        self.lock()
            .record(uid, field_path, kind, reason, message, now_micros);
        self.ready.notify_one();
    }

    /// Waits until something may be ready to send.
    pub async fn changed(&self) {
        self.ready.notified().await;
    }

    /// The next batch to send, if any is due and fewer than [`MAX_UNACKED_BATCHES`] wait for
    /// their ack.
    pub fn take_batch(&self) -> Option<v1::EventBatch> {
        self.lock().take_batch()
    }

    /// The hub took batch `seq` (and those before it).
    pub fn ack(&self, epoch: u64, seq: u64) {
        self.lock().ack(epoch, seq);
        // A slot for another batch may have opened.
        self.ready.notify_one();
    }

    /// A new link: whatever was sent and not acknowledged is sent again.
    pub fn reconnected(&self) {
        self.lock().reconnected();
        self.ready.notify_one();
    }

    /// The counters.
    pub fn counts(&self) -> EventCounts {
        let c = self.lock();
        EventCounts {
            recorded: c.recorded_total,
            dropped: c.dropped_total,
            pending: c.entries.values().filter(|e| e.pending()).count(),
        }
    }
}

/// The Event fieldPath of a container, as the kubelet's `GenerateContainerRef` makes it.
pub fn container_field_path(init: bool, name: &str) -> String {
    if init {
        format!("spec.initContainers{{{name}}}")
    } else {
        format!("spec.containers{{{name}}}")
    }
}

/// A duration as Go's `time.Duration.String()` prints it, after truncating to milliseconds
/// (the kubelet's Pulled message): `512ms`, `1.5s`, `2m3.042s`.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let hours = ms / 3_600_000;
    let minutes = (ms / 60_000) % 60;
    let secs = (ms / 1000) % 60;
    let frac = ms % 1000;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    if frac == 0 {
        out.push_str(&format!("{secs}s"));
    } else {
        let frac = format!("{frac:03}");
        out.push_str(&format!("{secs}.{}s", frac.trim_end_matches('0')));
    }
    out
}

/// The kubelet's `format.Pod`: `name_namespace(uid)`.
pub fn pod_desc(name: &str, namespace: &str, uid: &str) -> String {
    format!("{name}_{namespace}({uid})")
}

/// Summary of a batch for tests and logs: reason → count.
pub fn summarize(batch: &v1::EventBatch) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for e in &batch.events {
        *out.entry(e.reason.clone()).or_default() += e.count;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn batch(r: &EventRecorder) -> v1::EventBatch {
        r.take_batch().expect("a batch")
    }

    #[test]
    fn repeats_aggregate_into_one_event_with_a_count() {
        let r = EventRecorder::with_epoch(7);
        for i in 0..5 {
            r.record_at(
                "u1",
                "spec.containers{app}",
                EventType::Warning,
                "BackOff",
                "Back-off restarting failed container app in pod p_ns(u1)",
                i * S,
            );
        }
        let b = batch(&r);
        assert_eq!(b.epoch, 7);
        assert_eq!(b.events.len(), 1);
        let e = &b.events[0];
        assert_eq!((e.count, e.first_micros, e.last_micros), (5, 0, 4 * S));
        assert_eq!(e.field_path, "spec.containers{app}");
        assert_eq!(e.r#type, "Warning");
        // More of the same after the batch: the same id, a higher count.
        r.record_at(
            "u1",
            "spec.containers{app}",
            EventType::Warning,
            "BackOff",
            "Back-off restarting failed container app in pod p_ns(u1)",
            10 * S,
        );
        let b2 = batch(&r);
        assert_eq!(b2.events.len(), 1);
        assert_eq!((b2.events[0].id, b2.events[0].count), (e.id, 6));
        assert!(b2.seq > b.seq);
    }

    #[test]
    fn many_different_messages_are_combined_like_client_go() {
        let r = EventRecorder::with_epoch(1);
        for i in 0..15 {
            r.record_at(
                "u",
                "",
                EventType::Warning,
                "Failed",
                &format!("error {i}"),
                i * S,
            );
        }
        let b = batch(&r);
        assert_eq!(b.events.len(), 11, "ten distinct, then one combined");
        let combined = b
            .events
            .iter()
            .find(|e| e.message.starts_with("(combined from similar events): "))
            .expect("combined event");
        assert_eq!(combined.count, 5);
        assert_eq!(combined.message, "(combined from similar events): error 14");
        // After the window a new message stands on its own again.
        r.record_at("u", "", EventType::Warning, "Failed", "error 99", 700 * S);
        let b = batch(&r);
        assert_eq!(b.events[0].message, "error 99");
    }

    #[test]
    fn the_spam_filter_holds_back_occurrences_until_a_token_refills() {
        let r = EventRecorder::with_epoch(1);
        // 30 different events about one pod at once: 25 go out.
        for i in 0..30 {
            r.record_at("u", "", EventType::Normal, &format!("R{i}"), "m", 0);
        }
        let mut sent = 0;
        while let Some(b) = r.take_batch() {
            sent += b.events.len();
            r.ack(b.epoch, b.seq);
        }
        assert_eq!(sent, 25);
        // Another pod has its own bucket.
        r.record_at("v", "", EventType::Normal, "R", "m", 0);
        assert_eq!(batch(&r).events.len(), 1);
        // Five minutes later one more token: a held-back event goes out with its count.
        r.record_at("u", "", EventType::Normal, "R29", "m", 301 * S);
        let b = batch(&r);
        assert_eq!(b.events.len(), 1);
        assert_eq!((b.events[0].reason.as_str(), b.events[0].count), ("R29", 2));
    }

    #[test]
    fn unacknowledged_batches_are_resent_after_a_reconnect_and_acked_ones_are_not() {
        let r = EventRecorder::with_epoch(3);
        r.record_at("u", "", EventType::Normal, "A", "a", 0);
        let first = batch(&r);
        r.ack(3, first.seq);
        r.record_at("u", "", EventType::Normal, "B", "b", S);
        let lost = batch(&r);
        assert_eq!(summarize(&lost), BTreeMap::from([("B".to_owned(), 1)]));
        assert!(r.take_batch().is_none(), "nothing new");
        r.reconnected();
        let again = batch(&r);
        assert_eq!(summarize(&again), BTreeMap::from([("B".to_owned(), 1)]));
        assert_eq!(again.events[0].id, lost.events[0].id, "same identity");
        // An ack of another epoch (a previous agent run) changes nothing.
        r.ack(2, again.seq);
        r.reconnected();
        assert!(r.take_batch().is_some());
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_and_reports_how_many() {
        let r = EventRecorder::with_epoch(1);
        // One pod per event so the spam filter lets all through.
        for i in 0..(MAX_PENDING as i64 + 10) {
            r.record_at(&format!("u{i}"), "", EventType::Normal, "Pulled", "m", i);
        }
        let counts = r.counts();
        assert_eq!(counts.dropped, 10);
        assert_eq!(counts.pending, MAX_PENDING);
        let b = batch(&r);
        assert_eq!(b.dropped_total, 10);
        assert!(
            b.events
                .iter()
                .all(|e| e.pod_uid != "u0" && e.pod_uid != "u9"),
            "the oldest went"
        );
        assert!(b.events.iter().any(|e| e.pod_uid == "u10"));
    }

    #[test]
    fn at_most_a_few_batches_wait_for_their_ack() {
        let r = EventRecorder::with_epoch(1);
        for i in 0..(MAX_BATCH * (MAX_UNACKED_BATCHES + 1)) {
            r.record_at(&format!("u{i}"), "", EventType::Normal, "X", "m", 0);
        }
        let mut seqs = Vec::new();
        while let Some(b) = r.take_batch() {
            seqs.push(b.seq);
        }
        assert_eq!(seqs.len(), MAX_UNACKED_BATCHES);
        r.ack(1, seqs[1]);
        assert_eq!(r.take_batch().map(|b| b.events.len()), Some(MAX_BATCH));
    }

    #[test]
    fn go_durations_print_like_go() {
        assert_eq!(go_duration(Duration::from_micros(512_400)), "512ms");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_millis(2000)), "2s");
        assert_eq!(go_duration(Duration::from_millis(123_042)), "2m3.042s");
        assert_eq!(go_duration(Duration::from_millis(3_600_000)), "1h0m0s");
        assert_eq!(go_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn long_messages_are_cut() {
        let r = EventRecorder::with_epoch(1);
        r.record_at("u", "", EventType::Warning, "Failed", &"é".repeat(2000), 0);
        let b = batch(&r);
        assert!(b.events[0].message.len() <= MAX_MESSAGE_BYTES);
        assert!(b.events[0].message.ends_with(" ..."));
    }
}
