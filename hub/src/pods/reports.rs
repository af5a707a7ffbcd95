//! Pod status reports from devices: bounded and checked (only a pod's own device speaks for it,
//! only what an agent may say, see [`super::sanitize`]), held while the pod cache lists, and
//! handed to the status writer; removals confirmed by the pod's own device.

use super::*;

/// Entries of one status report the relay looks at; a device runs far fewer pods.
pub const MAX_REPORT_ENTRIES: usize = 2_048;

/// Largest PodStatus JSON the relay accepts from a device: a real one is a few KiB (about
/// 350 bytes per container), and the API server would not store a pod much larger than this.
pub const MAX_STATUS_BYTES: usize = 1024 * 1024;

/// Upper bound of statuses kept while the pod cache has not synced yet (one per pod UID).
pub(super) const MAX_EARLY_STATUS: usize = 100_000;

/// Upper bound of those statuses per device: far more pods than a device runs, far fewer than
/// a device inventing UIDs could send.
pub(super) const MAX_EARLY_STATUS_PER_DEVICE: usize = 1_000;

/// Bytes of those statuses per device (a real status is a few KiB).
pub(super) const MAX_EARLY_BYTES_PER_DEVICE: usize = 8 * 1024 * 1024;

/// Bytes of those statuses, all devices together.
pub(super) const MAX_EARLY_BYTES: usize = 256 * 1024 * 1024;

pub(super) fn scheduled_at(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "True")
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0.to_string())
}

impl PodRelay {
    /// Relays the statuses that arrived before the pod cache synced (see `early_status`).
    pub(super) fn replay_early_status(&mut self) {
        self.early_total = 0;
        self.early_bytes = 0;
        self.early_device_bytes.clear();
        let held: Vec<_> = self.early_events.drain(..).collect();
        for (device, batch) in held {
            self.device_events(device, batch);
        }
        let stashed: Vec<_> = self.early_status.drain().collect();
        for (device, entries) in stashed {
            let pods: Vec<_> = entries.into_values().collect();
            tracing::debug!(%device, pods = pods.len(), "relaying statuses that arrived before the pod cache synced");
            self.session(SessionEvent::PodStatus {
                device,
                report: fleetlet_proto::v1::PodStatusReport { full: false, pods },
                inflight: Default::default(),
            });
        }
    }

    pub(super) fn session(&mut self, ev: SessionEvent) {
        match ev {
            SessionEvent::PodStatus {
                device, mut report, ..
            } => {
                // A device is served once its Node is known to be ours. Until then (its Node not
                // created yet, or held by someone else) its statuses wait like those that arrive
                // before the pod cache synced, within the same bounds.
                let servable = self.is_ours(&device);
                if self.pods.synced && !servable && !self.device_enabled(&device) {
                    self.metrics
                        .dropped("device_not_served", report.pods.len() as u64);
                    return;
                }
                if report.pods.len() > MAX_REPORT_ENTRIES {
                    tracing::warn!(%device, entries = report.pods.len(), limit = MAX_REPORT_ENTRIES, "pod status report with too many entries; the rest dropped");
                    self.metrics.dropped(
                        "report_too_many_entries",
                        (report.pods.len() - MAX_REPORT_ENTRIES) as u64,
                    );
                    report.pods.truncate(MAX_REPORT_ENTRIES);
                }
                if report.full {
                    let held = self.acked.get(&device).copied().unwrap_or(0);
                    self.full_report_gen.insert(device.clone(), held);
                    self.reported.insert(device.clone(), HashMap::new());
                }
                // The pods of this report, by UID (an index lookup each, not a scan).
                #[allow(clippy::type_complexity)]
                let by_uid: HashMap<
                    String,
                    (
                        String,
                        String,
                        Option<String>,
                        Option<String>,
                        sanitize::PodFacts,
                    ),
                > = report
                    .pods
                    .iter()
                    .filter_map(|e| {
                        let p = self.pods.by_uid(&e.uid)?;
                        Some((
                            e.uid.clone(),
                            (
                                p.metadata.namespace.clone().unwrap_or_default(),
                                p.metadata.name.clone().unwrap_or_default(),
                                node_of(&p),
                                scheduled_at(&p),
                                sanitize::PodFacts::of(&p),
                            ),
                        ))
                    })
                    .collect();
                let reported = self.reported.entry(device.clone()).or_default();
                let mut check = Vec::new();
                let mut not_bound = 0u64;
                let announced = self
                    .live
                    .borrow()
                    .get(&device)
                    .and_then(|l| l.info.as_ref())
                    .map(sanitize::Announced::of)
                    .unwrap_or_default();
                for entry in report.pods {
                    if entry.status_json.len() > MAX_STATUS_BYTES {
                        tracing::warn!(%device, uid = %entry.uid, bytes = entry.status_json.len(), limit = MAX_STATUS_BYTES, "pod status larger than any real one; dropped");
                        self.metrics.dropped("status_too_large", 1);
                        continue;
                    }
                    if (!self.pods.synced && !by_uid.contains_key(&entry.uid)) || !servable {
                        let held = self.early_status.entry(device.clone()).or_default();
                        let device_bytes =
                            self.early_device_bytes.entry(device.clone()).or_default();
                        let size = entry.status_json.len();
                        let old = held.get(&entry.uid).map(|e| e.status_json.len());
                        let fits = self.early_total + usize::from(old.is_none())
                            <= MAX_EARLY_STATUS
                            && held.len() + usize::from(old.is_none())
                                <= MAX_EARLY_STATUS_PER_DEVICE
                            && *device_bytes - old.unwrap_or(0) + size
                                <= MAX_EARLY_BYTES_PER_DEVICE
                            && self.early_bytes - old.unwrap_or(0) + size <= MAX_EARLY_BYTES;
                        if fits {
                            self.early_total += usize::from(old.is_none());
                            *device_bytes = *device_bytes - old.unwrap_or(0) + size;
                            self.early_bytes = self.early_bytes - old.unwrap_or(0) + size;
                            held.insert(entry.uid.clone(), entry);
                        } else {
                            self.metrics.dropped("early_status_full", 1);
                        }
                        continue;
                    }
                    let bound_here = by_uid
                        .get(&entry.uid)
                        .is_some_and(|(_, _, node, _, _)| node.as_deref() == Some(device.as_str()));
                    if !bound_here {
                        // Dropped before anything is recorded: a device reporting UIDs that are
                        // not its pods (another device's, or made up) costs the hub nothing.
                        not_bound += 1;
                        continue;
                    }
                    if entry.removed {
                        // Only the pod's own device may confirm its removal (checked above): a
                        // removal claimed by another device would let it force-delete that
                        // device's running pod.
                        reported.insert(entry.uid.clone(), true);
                        self.pod_state
                            .entry(entry.uid.clone())
                            .or_default()
                            .confirmed_removed = true;
                        check.push(entry.uid.clone());
                        // The removal carries the pod's last status (its containers
                        // terminated), written like any other as the kubelet writes it before
                        // the deletion: a pod a finalizer keeps shows how its containers ended.
                        if !carries_container_statuses(&entry.status_json) {
                            continue;
                        }
                    } else {
                        reported.insert(entry.uid.clone(), false);
                    }
                    let Some((namespace, name, _, scheduled, facts)) = by_uid.get(&entry.uid)
                    else {
                        continue;
                    };
                    if self.pod_state.get(&entry.uid).is_some_and(|st| st.rejected) {
                        continue;
                    }
                    let status: Value = match serde_json::from_slice(&entry.status_json) {
                        Ok(v @ Value::Object(_)) => v,
                        _ => {
                            tracing::warn!(%device, pod = %name, %namespace, "device sent a pod status that is not a JSON object; ignored");
                            continue;
                        }
                    };
                    // Only what an agent may say, for containers the pod has.
                    let status = match sanitize::sanitize(
                        status,
                        facts,
                        &self.cfg.device_ip_ranges,
                        &announced,
                    ) {
                        Ok((status, notes)) => {
                            if !notes.is_empty() {
                                tracing::warn!(%device, pod = %name, %namespace, dropped = %notes.join("; "), "device sent pod status fields it may not set; dropped");
                                self.metrics.dropped("status_field", notes.len() as u64);
                            }
                            status
                        }
                        Err(refused) => {
                            tracing::warn!(%device, pod = %name, %namespace, error = %refused, "device sent an impossible pod status; ignored");
                            self.metrics.dropped("status_refused", 1);
                            continue;
                        }
                    };
                    // Readiness gates: the device reports its containers' readiness, the hub
                    // (which sees the gates' conditions) decides Ready.
                    let mut status = status;
                    if let Some(pod) = self.pods.by_uid(&entry.uid) {
                        readiness_gates::apply_to_report(
                            &pod,
                            &mut status,
                            &crate::kubeutil::time_string(k8s_openapi::jiff::Timestamp::now()),
                        );
                    }
                    if status.get("phase").and_then(Value::as_str) == Some("Running")
                        && !std::mem::replace(
                            &mut self
                                .pod_state
                                .entry(entry.uid.clone())
                                .or_default()
                                .started_observed,
                            true,
                        )
                    {
                        tracing::debug!(%device, pod = %name, %namespace, "pod reported Running");
                        if let Some(t) = scheduled
                            .as_deref()
                            .and_then(|s| s.parse::<k8s_openapi::jiff::Timestamp>().ok())
                        {
                            let secs = k8s_openapi::jiff::Timestamp::now()
                                .duration_since(t)
                                .as_secs_f64();
                            self.metrics.pod_start_seconds.observe(secs.max(0.0));
                        }
                    }
                    super::status::delete_absent_conditions(&mut status);
                    let update = StatusUpdate {
                        uid: entry.uid.clone(),
                        namespace: namespace.clone(),
                        name: name.clone(),
                        status,
                    };
                    match self.status_tx.try_send(update) {
                        // The device's own word on readiness replaces the relay's mark.
                        Ok(()) => {
                            if let Some(st) = self.pod_state.get_mut(&entry.uid) {
                                st.marked = None;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(pod = %name, %namespace, error = %e, "status queue full; status dropped until the next report")
                        }
                    }
                }
                if not_bound > 0 {
                    // One line per report, not per entry: a flood must not flood the log too.
                    tracing::warn!(%device, entries = not_bound, "status report entries for pods not bound to this device; dropped");
                    self.metrics.dropped("pod_not_bound", not_bound);
                }
                for uid in check {
                    self.check_deletion(&uid);
                }
                if report.full {
                    // Pods the device no longer lists may now be done.
                    self.check_all_deletions();
                }
            }
            SessionEvent::Acked {
                device,
                generation,
                error,
            } => {
                if let Some(e) = error {
                    tracing::warn!(%device, generation, error = %e, "device refused snapshot");
                    return;
                }
                self.acked.insert(device.clone(), generation);
                if let Some(list) = self.sent_at.get_mut(&device) {
                    if let Some((_, at)) = list.iter().find(|(g, _)| *g == generation) {
                        self.metrics
                            .relay_seconds
                            .observe(at.elapsed().as_secs_f64());
                    }
                    list.retain(|(g, _)| *g > generation);
                }
            }
            SessionEvent::Events { device, batch } => self.device_events(device, batch),
            SessionEvent::Connected { .. }
            | SessionEvent::Disconnected { .. }
            | SessionEvent::Capacity { .. }
            | SessionEvent::Stats { .. } => {}
        }
    }
}

/// Whether a reported status names container states (a removal's final status does; the bare
/// `Removed` marker of older agents does not, and is not written).
fn carries_container_statuses(status_json: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default, rename = "containerStatuses")]
        container_statuses: Vec<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Probe>(status_json).is_ok_and(|p| !p.container_statuses.is_empty())
}
