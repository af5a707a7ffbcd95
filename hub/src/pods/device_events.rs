//! Device Events into the API: the trust check (each Event about a pod bound to the reporting
//! device's own Node, written under the API's names for it), the device's own drop count, and
//! the batches that arrive before the pod cache has synced.

use super::*;

/// A device's reports of the Events it dropped (its buffer was full).
#[derive(Debug, Clone, Copy)]
pub(super) struct DeviceDrops {
    /// The agent run the count belongs to.
    epoch: u64,
    /// The count it last reported.
    seen: u64,
    /// Drops not yet told in a Node Warning.
    untold: u64,
    /// When the last Node Warning went out.
    told_at: Option<Instant>,
}

/// At most one `EventsDropped` Warning per Node in this long (the metric counts every drop).
pub(super) const DROPS_TOLD_EVERY: Duration = Duration::from_secs(60);

/// Event batches held until the pod cache synced, all devices together (the oldest go first).
pub(super) const MAX_EARLY_EVENT_BATCHES: usize = 1024;

/// The same per device (a batch is at most 64 Events of at most 1 KiB each: 512 KiB a device).
pub(super) const MAX_EARLY_EVENT_BATCHES_PER_DEVICE: usize = 8;

impl PodRelay {
    /// Device Events: each must be about a pod bound to the reporting device's own Node, and is
    /// written with that pod's namespace, name and uid from the API (never the device's word), so
    /// a device cannot write Events about other devices' pods or into other namespaces. The
    /// device's own drop count becomes a Warning on its Node and a metric.
    pub(super) fn device_events(&mut self, device: String, batch: fleetlet_proto::v1::EventBatch) {
        let total = batch.events.len() as u64;
        if !self.pods.synced || !self.is_ours(&device) {
            if self.pods.synced && !self.device_enabled(&device) {
                self.metrics.device_event("not_bound", total);
                return;
            }
            let mine = self
                .early_events
                .iter()
                .filter(|(d, _)| *d == device)
                .count();
            let oldest = if mine >= MAX_EARLY_EVENT_BATCHES_PER_DEVICE {
                self.early_events.iter().position(|(d, _)| *d == device)
            } else if self.early_events.len() >= MAX_EARLY_EVENT_BATCHES {
                Some(0)
            } else {
                None
            };
            if let Some((_, dropped)) = oldest.and_then(|i| self.early_events.remove(i)) {
                self.metrics
                    .device_event("dropped_queue_full", dropped.events.len() as u64);
            }
            self.early_events.push_back((device, batch));
            return;
        }
        let mut drops = self
            .device_events_dropped
            .get(&device)
            .copied()
            .filter(|d| d.epoch == batch.epoch)
            .unwrap_or(DeviceDrops {
                epoch: batch.epoch,
                seen: 0,
                untold: 0,
                told_at: None,
            });
        if batch.dropped_total > drops.seen {
            let newly = batch.dropped_total - drops.seen;
            drops.seen = batch.dropped_total;
            drops.untold += newly;
            self.metrics.device_event("dropped_on_device", newly);
            tracing::warn!(%device, dropped = newly, "device dropped Events (its buffer was full)");
        }
        let due = drops
            .told_at
            .is_none_or(|at| at.elapsed() >= DROPS_TOLD_EVERY);
        if drops.untold > 0 && due {
            let api = self.api.clone();
            let node = device.clone();
            let message = format!(
                "device {device} dropped {} pod Events (its buffer of unsent Events was full; {} since its agent started)",
                drops.untold, batch.dropped_total
            );
            drops.untold = 0;
            drops.told_at = Some(Instant::now());
            tokio::spawn(async move {
                if let Err(error) = api
                    .node_event(&node, "RecordEvents", "EventsDropped", &message)
                    .await
                {
                    tracing::warn!(node, %error, "publishing the EventsDropped event failed");
                }
            });
        }
        self.device_events_dropped.insert(device.clone(), drops);
        let Some(sink) = self.event_sink.clone() else {
            return;
        };
        // Each Event's pod by its UID (an index lookup, no scan), bound to this device or not
        // written.
        let bound: HashMap<String, (String, String)> = batch
            .events
            .iter()
            .filter(|e| !e.pod_uid.is_empty())
            .filter_map(|e| self.pods.by_uid(&e.pod_uid))
            .filter(|p| node_of(p).as_deref() == Some(device.as_str()))
            .filter_map(|p| {
                Some((
                    p.metadata.uid.clone()?,
                    (
                        p.metadata.namespace.clone().unwrap_or_default(),
                        p.metadata.name.clone().unwrap_or_default(),
                    ),
                ))
            })
            .collect();
        let mut not_bound = 0u64;
        let mut invalid = 0u64;
        for mut event in batch.events {
            if event.pod_uid.is_empty() {
                event.field_path.clear();
                // About the device's own Node: that much any device may say.
                if let Err(why) = crate::events::check(&event) {
                    tracing::debug!(%device, why, "device Event refused");
                    invalid += 1;
                    continue;
                }
                let write = crate::events::DeviceEventWrite {
                    regarding: crate::events::Regarding::Node,
                    node: device.clone(),
                    epoch: batch.epoch,
                    namespace: crate::events::NODE_EVENTS_NAMESPACE.into(),
                    pod_name: device.clone(),
                    pod_uid: device.clone(),
                    event,
                    attempts: 0,
                };
                if sink.try_send(write).is_err() {
                    self.metrics.device_event("dropped_queue_full", 1);
                }
                continue;
            }
            let Some((namespace, pod_name)) = bound.get(&event.pod_uid) else {
                not_bound += 1;
                continue;
            };
            if let Err(why) = crate::events::check(&event) {
                tracing::debug!(%device, why, "device Event refused");
                invalid += 1;
                continue;
            }
            let write = crate::events::DeviceEventWrite {
                regarding: crate::events::Regarding::Pod,
                node: device.clone(),
                epoch: batch.epoch,
                namespace: namespace.clone(),
                pod_name: pod_name.clone(),
                pod_uid: event.pod_uid.clone(),
                event,
                attempts: 0,
            };
            if sink.try_send(write).is_err() {
                self.metrics.device_event("dropped_queue_full", 1);
            }
        }
        if not_bound > 0 {
            // One line per batch: a flood must not flood the log too.
            tracing::warn!(%device, events = not_bound, "Events about pods not bound to this device; dropped");
            self.metrics.device_event("not_bound", not_bound);
        }
        if invalid > 0 {
            tracing::warn!(%device, events = invalid, "invalid Events from the device; dropped");
            self.metrics.device_event("invalid", invalid);
        }
    }
}
