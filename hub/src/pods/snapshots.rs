//! Per-device desired snapshots: the device's pods in creation order, admitted against its
//! allocatable, with their ConfigMaps and Secrets bundled, handed to the link when their content
//! changed; pods refused on the way fail in the API with a reason and an Event.

use super::*;

pub(super) fn is_terminal(p: &Pod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// A pod this hub (or a previous replica) failed at admission or refused to relay.
pub(super) fn is_admission_failure(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Failed")
            && s.reason.as_deref().is_some_and(|r| {
                r.starts_with("OutOf")
                    || r == refusal::DAEMONSET_REASON
                    || r == refusal::BUNDLE_REASON
            })
    })
}

/// A pod the device already started (admitted before, e.g. by a previous hub process).
pub(super) fn has_run(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        matches!(s.phase.as_deref(), Some("Running" | "Succeeded" | "Failed"))
            || s.container_statuses.as_ref().is_some_and(|c| !c.is_empty())
    })
}

pub(super) fn snapshot_hash(
    bundles: &[fleetlet_proto::v1::PodBundle],
    termination_grace: &HashMap<String, u64>,
) -> u64 {
    let mut h = DefaultHasher::new();
    let grace: BTreeMap<_, _> = termination_grace.iter().collect();
    grace.hash(&mut h);
    for b in bundles {
        b.pod_json.hash(&mut h);
        // Maps inside messages encode in arbitrary order; hash sorted views instead.
        for cm in &b.config_maps {
            cm.name.hash(&mut h);
            let data: BTreeMap<_, _> = cm.data.iter().collect();
            data.hash(&mut h);
            let bin: BTreeMap<_, _> = cm.binary_data.iter().collect();
            bin.hash(&mut h);
        }
        for s in &b.secrets {
            s.name.hash(&mut h);
            let data: BTreeMap<_, _> = s.data.iter().collect();
            data.hash(&mut h);
        }
        let env: BTreeMap<_, _> = b.service_env.iter().collect();
        env.hash(&mut h);
        b.encoded_len().hash(&mut h);
    }
    bundles.len().hash(&mut h);
    h.finish()
}

impl PodRelay {
    /// Computes and hands out the snapshots of the queued devices: those due, and with them
    /// every one due within the same debounce window (one pass instead of several).
    pub(super) fn flush(&mut self) {
        if !self.synced() {
            // Kept queued: the last cache to list marks every device (see `after_watch`).
            return;
        }
        let window = Instant::now() + self.cfg.debounce;
        let inventory = self.inventory.borrow().clone();
        let owned = self.known_nodes.borrow().clone();
        for device in self.snapshots.drain_due(window) {
            self.snapshots.done(&device);
            // Only devices whose Node the hub owns get a snapshot (see `is_ours`).
            if !inventory.get(&device).is_some_and(|d| d.enabled) || !owned.contains(&device) {
                continue;
            }
            let mut pods = self.pods.on_node(&device);
            pods.sort_by(|a, b| {
                let ka = (
                    a.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    a.metadata.name.clone(),
                );
                let kb = (
                    b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    b.metadata.name.clone(),
                );
                ka.cmp(&kb)
            });
            // A pod whose ConfigMap/Secret is being fetched waits for it: sent without it, the
            // device would fail the container (CreateContainerConfigError) in the meantime. The
            // answer marks the device again.
            if !self.referenced.fetching.is_empty()
                && let Some(r) = pods
                    .iter()
                    .flat_map(|p| referenced::pod_refs(p))
                    .find(|r| self.referenced.fetching.contains(r))
            {
                self.waiting.entry(r).or_default().insert(device);
                continue;
            }
            self.flush_device(&device, &pods);
        }
    }

    pub(super) fn allocatable(&self, device: &str) -> BTreeMap<String, String> {
        let mut alloc = self.cfg.default_allocatable.clone();
        if let Some(cap) = self
            .live
            .borrow()
            .get(device)
            .and_then(|l| l.capacity.clone())
        {
            alloc.extend(cap.capacity);
            alloc.extend(cap.allocatable);
        }
        alloc
    }

    pub(super) fn flush_device(&mut self, device: &str, pods: &[Arc<Pod>]) {
        let allocatable = self.allocatable(device);
        let mut bundles = Vec::new();
        let mut terminating = Vec::new();
        let mut grace = HashMap::new();
        // A pod admitted before holds what it was admitted with or, once resized in place to
        // more, its current requests (the scheduler's rule during a resize: the larger of the
        // spec and what was allocated), so a new pod is not relayed into room a resize took.
        let mut admitted_here: Vec<Requests> = pods
            .iter()
            .filter(|p| !is_terminal(p))
            .filter_map(|p| {
                let held = p
                    .metadata
                    .uid
                    .as_ref()
                    .and_then(|u| self.pod_state.get(u)?.admitted)?;
                let now = admission::pod_requests(p);
                Some(Requests {
                    cpu_milli: held.cpu_milli.max(now.cpu_milli),
                    memory: held.memory.max(now.memory),
                })
            })
            .collect();
        self.pending_admission.remove(device);
        let mut snapshot_bytes = 0usize;
        for pod in pods {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            if self.pod_state.get(&uid).is_some_and(|st| st.rejected) || is_admission_failure(pod) {
                continue;
            }
            if pod.metadata.deletion_timestamp.is_none()
                && let Some(refusal) = refusal::daemonset(pod)
            {
                // Refused before its bundle is built: neither its spec nor its Secrets leave
                // the hub.
                self.metrics.refused("daemonset_not_for_devices");
                self.reject(pod, &uid, &refusal);
                continue;
            }
            if pod.metadata.deletion_timestamp.is_some() {
                // The API's deletion grace (`kubectl delete --grace-period=N`) wins over the
                // spec's terminationGracePeriodSeconds, as on a kubelet.
                if let Some(secs) = pod
                    .metadata
                    .deletion_grace_period_seconds
                    .and_then(|s| u64::try_from(s).ok())
                {
                    grace.insert(uid.clone(), secs);
                }
                terminating.push(uid);
                continue;
            }
            if self
                .pod_state
                .get(&uid)
                .is_none_or(|st| st.admitted.is_none())
            {
                let req = admission::pod_requests(pod);
                if has_run(pod) {
                    self.state(&uid).admitted = Some(req);
                } else {
                    match admission::admit(&allocatable, &admitted_here, req) {
                        Ok(()) => {
                            self.state(&uid).admitted = Some(req);
                            admitted_here.push(req);
                        }
                        Err(rejection) => {
                            self.reject(pod, &uid, &rejection);
                            self.pending_admission.insert(device.to_string());
                            continue;
                        }
                    }
                }
            }
            let mut bundle = bundle::build(pod, &self.config_maps.items, &self.secrets.items);
            bundle.service_env = self.services.env_for(pod).into_iter().collect();
            match refusal::bundle_size(&bundle, snapshot_bytes, self.cfg.bundle_limits) {
                Ok(size) => snapshot_bytes += size,
                Err(refusal) => {
                    // One pod that cannot fit fails alone; the device keeps getting the others.
                    self.metrics.refused("bundle_too_large");
                    self.reject(pod, &uid, &refusal);
                    if let Some(req) = self.state(&uid).admitted.take()
                        && let Some(i) = admitted_here.iter().position(|r| *r == req)
                    {
                        admitted_here.remove(i);
                    }
                    let node_event = self.api.node_event(
                        device,
                        "Relay",
                        refusal::BUNDLE_REASON,
                        &format!(
                            "pod {}/{}: {}",
                            pod.metadata.namespace.as_deref().unwrap_or_default(),
                            pod.metadata.name.as_deref().unwrap_or_default(),
                            refusal.message
                        ),
                    );
                    let device = device.to_string();
                    tokio::spawn(async move {
                        if let Err(error) = node_event.await {
                            tracing::warn!(node = %device, %error, "publishing node event");
                        }
                    });
                    continue;
                }
            }
            bundles.push(bundle);
        }
        let hash = snapshot_hash(&bundles, &grace);
        if self.last_sent.get(device) == Some(&hash) {
            return;
        }
        let count = bundles.len();
        self.metrics
            .set_snapshot_bytes(device, bundles.iter().map(Message::encoded_len).sum());
        let generation = self.sessions.set_desired(device, bundles, grace);
        tracing::debug!(%device, generation, pods = count, terminating = terminating.len(), "snapshot handed to the link");
        self.last_sent.insert(device.to_string(), hash);
        let list = self.sent_at.entry(device.to_string()).or_default();
        list.push((generation, Instant::now()));
        if list.len() > 64 {
            list.remove(0);
        }
        for uid in terminating {
            self.state(&uid).excluded_in.get_or_insert(generation);
        }
    }

    pub(super) fn reject(&mut self, pod: &Pod, uid: &str, rejection: &admission::Rejection) {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        tracing::warn!(pod = %name, namespace = %ns, reason = %rejection.reason, message = %rejection.message, "pod rejected at admission");
        self.state(uid).rejected = true;
        let update = StatusUpdate {
            uid: uid.to_string(),
            namespace: ns.clone(),
            name: name.clone(),
            status: json!({ "phase": "Failed", "reason": rejection.reason, "message": rejection.message }),
        };
        if let Err(e) = self.status_tx.try_send(update) {
            tracing::warn!(pod = %name, namespace = %ns, error = %e, "status queue full; rejection not written");
        }
        let ev = self
            .api
            .pod_event(pod, "Admit", &rejection.reason, &rejection.message);
        tokio::spawn(async move {
            if let Err(error) = ev.await {
                tracing::warn!(pod = %name, namespace = %ns, %error, "publishing admission event");
            }
        });
    }
}
