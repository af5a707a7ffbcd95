//! A pass of the node manager: for each node due, what its Node, status, Lease and Events
//! should be now (from the inventory, the device's live view and Flightctl's health), compared
//! with what was last applied; the plans are executed by [`super::apply`], and each node is
//! queued again for its next deadline.

use super::apply::Outcome;
use super::*;

/// What one pass decided to do for one node.
pub(super) struct Plan {
    pub(super) name: String,
    pub(super) labels: Option<BTreeMap<String, String>>,
    /// Label problems to announce in an Event once the labels are applied.
    pub(super) label_issues: Vec<String>,
    /// Flightctl took the Node out of Ready: (reason, message) for a Warning Event.
    pub(super) flightctl_not_ready: Option<(String, String)>,
    /// (what to compare next time, what to write).
    pub(super) status: Option<(Value, Value)>,
    /// The Ready condition `status` writes.
    pub(super) ready: ReadyState,
    pub(super) lease: bool,
    pub(super) event: Option<NodeEvent>,
    pub(super) delete: bool,
    pub(super) uid: Option<String>,
    /// Who held the Node when it was last found not owned (announced only on a change).
    pub(super) not_owned: Option<String>,
}

/// A node is planned at most this often by its own deadlines (a change queues it at once).
pub(super) const MIN_REQUEUE: Duration = Duration::from_secs(1);

/// How often a departed device's node, waiting for its pods to go, is looked at again.
pub(super) const DEPARTED_RECHECK: Duration = Duration::from_secs(10);

impl NodeManager {
    /// The kubelet port `node` advertises: its own, or the shared one (without a range, or with
    /// the range exhausted, which is reported once per node).
    pub(super) fn kubelet_port(
        ports: Option<&crate::kubelet_api::ports::NodePorts>,
        portless: &mut BTreeSet<String>,
        shared: u16,
        node: &str,
    ) -> u16 {
        let Some(ports) = ports else {
            return shared;
        };
        match ports.assign(node, None) {
            Ok(p) => {
                portless.remove(node);
                p
            }
            Err(e) => {
                if portless.insert(node.to_string()) {
                    tracing::error!(error = %e, "node advertises the shared kubelet port: its stats, metrics and pods are not served");
                }
                shared
            }
        }
    }

    /// One level-triggered pass over the nodes `due`: each is planned from the current view of
    /// its device, written, and queued again for its next deadline.
    pub(super) async fn pass(
        &mut self,
        inventory: &DeviceMap,
        live: &LiveSet,
        pod_counts: Option<&BTreeMap<String, usize>>,
        due: &[String],
    ) {
        let now = Instant::now();
        let wall = time_string(Timestamp::now());
        let grace = Duration::from_secs(self.cfg.disconnect_grace_secs);
        let refresh = Duration::from_secs(self.cfg.status_refresh_secs);
        let health_map = self.flightctl.as_ref().map(|rx| rx.borrow().clone());
        let mut plans = Vec::new();
        let wanted: BTreeSet<String> = inventory
            .values()
            .filter(|d| d.enabled && is_valid_node_name(&d.name))
            .map(|d| d.name.clone())
            .collect();
        for dev in due
            .iter()
            .filter_map(|name| inventory.get(name))
            .filter(|d| d.enabled)
        {
            if !is_valid_node_name(&dev.name) {
                tracing::warn!(device = %dev.name, "device name is not a valid Node name; no Node for it");
                continue;
            }
            let ld = live.get(&dev.name);
            let st = self
                .state
                .entry(dev.name.clone())
                .or_insert_with(|| NodeState::new(Readiness::not_connected(&wall), now));
            st.deleted = false;
            // Someone else's Node: leave it exactly as it is; look again now and then.
            let not_owned = match &st.not_owned {
                Some((_, at)) if now.duration_since(*at) < NOT_OWNED_RECHECK => continue,
                Some((owner, _)) => Some(owner.clone()),
                None => None,
            };
            if not_owned.is_some() {
                st.applied_labels = None;
            }
            if let Some(info) = ld.and_then(|l| l.info.clone()) {
                st.last_info = Some(info);
            }
            let connected = ld.is_some_and(|l| l.connected);
            if let Some(l) = ld.filter(|l| l.connected) {
                st.session_started = Some(l.since);
            }
            let away_for =
                now.duration_since(ld.map_or(self.started, |l| l.since.max(self.started)));
            let event = st.ready.step(connected, away_for, grace, &wall);

            let labels = object::node_labels(dev, st.last_info.as_ref(), &self.cfg);
            let mut label_issues = Vec::new();
            if st.applied_labels.as_ref() != Some(&labels) {
                let issues = object::label_issues(dev, &labels);
                if issues != st.label_issues {
                    for issue in &issues {
                        tracing::warn!(device = %dev.name, issue = %issue, "device label not usable as is on its Node");
                    }
                    st.label_issues.clone_from(&issues);
                    label_issues = issues;
                }
            }
            let labels_plan = (st.applied_labels.as_ref() != Some(&labels)).then_some(labels);

            let (capacity, allocatable) = match ld.and_then(|l| l.capacity.as_ref()) {
                Some(report) => object::resources(Some(report), &self.cfg.default_capacity),
                None => st
                    .last_capacity
                    .clone()
                    .unwrap_or_else(|| object::resources(None, &self.cfg.default_capacity)),
            };
            st.last_capacity = Some((capacity.clone(), allocatable.clone()));
            let fc = health_map.as_ref().and_then(|m| m.get(&dev.name));
            let mut flightctl_not_ready = None;
            let ready = match flightctl::ready_override(
                fc,
                st.ready.state.is_ready(),
                st.session_started,
            ) {
                Some((reason, message)) => {
                    if st.override_since.is_none() {
                        tracing::info!(node = %dev.name, %reason, "Flightctl reports the device going down; node not ready");
                        flightctl_not_ready = Some((reason.clone(), message.clone()));
                    }
                    let since = st.override_since.get_or_insert_with(|| wall.clone());
                    (
                        ReadyState::Other {
                            status: ConditionStatus::False,
                            reason,
                        },
                        message,
                        since.clone(),
                    )
                }
                None => {
                    if st.override_since.take().is_some() && st.ready.state.is_ready() {
                        // Back from False: that is a transition too.
                        st.ready.since.clone_from(&wall);
                    }
                    (
                        st.ready.state.clone(),
                        st.ready.message.clone(),
                        st.ready.since.clone(),
                    )
                }
            };
            let (ready_plan, message, last_transition) = ready;
            let mut conditions = vec![ConditionView {
                type_: "Ready".into(),
                status: ready_plan.status().as_str().into(),
                reason: ready_plan.reason().into(),
                message,
                last_transition,
            }];
            conditions.extend(object::pressure_conditions(
                ld.and_then(|l| l.capacity.as_ref()),
                &st.ready.since,
            ));
            let mut compared = conditions.clone();
            if let Some(h) = fc {
                let status = flightctl::condition_status(h.summary_status.as_deref());
                let since = match &st.flightctl_condition {
                    Some((s, since)) if s == status => since.clone(),
                    _ => wall.clone(),
                };
                st.flightctl_condition = Some((status.to_owned(), since.clone()));
                conditions.push(flightctl::condition(h, &since, true));
                compared.push(flightctl::condition(h, &since, false));
            }
            let port = Self::kubelet_port(
                self.node_ports.as_deref(),
                &mut self.portless,
                self.port,
                &dev.name,
            );
            let input = StatusInput {
                name: &dev.name,
                capacity: &capacity,
                allocatable: &allocatable,
                info: st.last_info.as_ref(),
                kubelet_version: &self.cfg.kubelet_version,
                conditions: &compared,
                address: self.address,
                port,
                heartbeat: "",
            };
            // Compare without the heartbeat and lastSeen: only a change or the refresh interval
            // writes.
            let cmp = object::status_body(&input);
            let stale = st
                .status_applied_at
                .is_none_or(|t| now.duration_since(t) >= refresh);
            let status_plan = (st.applied_status.as_ref() != Some(&cmp) || stale).then(|| {
                let full = object::status_body(&StatusInput {
                    conditions: &conditions,
                    ..input.clone()
                });
                (cmp, full)
            });
            let lease = connected && now >= st.next_lease;
            if labels_plan.is_some()
                || status_plan.is_some()
                || lease
                || event.is_some()
                || flightctl_not_ready.is_some()
            {
                plans.push(Plan {
                    name: dev.name.clone(),
                    labels: labels_plan,
                    label_issues,
                    flightctl_not_ready,
                    status: status_plan,
                    ready: ready_plan,
                    lease,
                    event,
                    delete: false,
                    uid: st.uid.clone(),
                    not_owned,
                });
            }
        }
        // Nodes of devices that left the inventory (or were disabled): delete once no pod is
        // bound to them any more. Pods are only known once the relay has synced.
        let mut forget = Vec::new();
        for (name, st) in due.iter().filter_map(|n| Some((n, self.state.get(n)?))) {
            if wanted.contains(name) || st.deleted {
                continue;
            }
            if st.not_owned.is_some() || st.uid.is_none() {
                // Never ours (or never created): nothing to delete, only to forget.
                forget.push(name.clone());
                continue;
            }
            let pods_left = pod_counts.map(|c| c.get(name).copied().unwrap_or(0));
            if pods_left == Some(0) {
                plans.push(Plan {
                    name: name.clone(),
                    labels: None,
                    label_issues: Vec::new(),
                    flightctl_not_ready: None,
                    status: None,
                    ready: ReadyState::NotConnected,
                    lease: false,
                    event: None,
                    delete: true,
                    uid: st.uid.clone(),
                    not_owned: None,
                });
            }
        }
        for name in forget {
            self.state.remove(&name);
        }
        self.count_not_owned();
        self.sync_ports(&wanted);
        if plans.is_empty() {
            self.queue_deadlines(due, live, &wanted, now);
            return;
        }
        let outcomes: Vec<Outcome> =
            futures::stream::iter(plans.into_iter().map(|p| self.execute(p, &wall)))
                .buffer_unordered(self.cfg.concurrency)
                .collect()
                .await;
        let renew = Duration::from_secs(self.cfg.lease_renew_secs);
        for o in outcomes {
            let Some(st) = self.state.get_mut(&o.name) else {
                continue;
            };
            if o.uid.is_some() {
                st.uid = o.uid;
            }
            let applied = o.labels_applied.is_some();
            if let Some(l) = o.labels_applied {
                st.applied_labels = Some(l);
            }
            if let Some(s) = o.status_applied {
                st.applied_status = Some(s);
                st.status_applied_at = Some(now);
            }
            if let Some(r) = o.ready_applied {
                st.applied_ready = Some(r);
            }
            if o.lease_renewed {
                st.next_lease = now + renew;
            }
            if o.deleted {
                st.deleted = true;
            }
            if o.gone {
                st.forget_node();
            }
            match o.not_owned {
                Some(owner) => {
                    st.not_owned = Some((owner, now));
                    st.uid = None;
                }
                None if applied => st.not_owned = None,
                None => {}
            }
        }
        self.count_not_owned();
        self.state.retain(|_, s| !s.deleted);
        self.sync_ports(&wanted);
        self.queue_deadlines(due, live, &wanted, now);
        let count = self.state.len();
        self.metrics
            .nodes
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Queues each node of `due` again for its next deadline: its lease renewal while its
    /// device is connected, the end of its disconnect grace while it is not, its status
    /// refresh, the recheck of a Node name someone else holds. A departed device's node waits
    /// for its pods, whose count changes queue it, and is looked at again now and then. Never
    /// sooner than [`MIN_REQUEUE`]: a write that failed leaves its deadline passed, and is
    /// tried again after that.
    pub(super) fn queue_deadlines(
        &mut self,
        due: &[String],
        live: &LiveSet,
        wanted: &BTreeSet<String>,
        now: Instant,
    ) {
        let grace = Duration::from_secs(self.cfg.disconnect_grace_secs);
        let refresh = Duration::from_secs(self.cfg.status_refresh_secs);
        for name in due {
            let Some(st) = self.state.get(name) else {
                continue;
            };
            let ld = live.get(name);
            let connected = ld.is_some_and(|l| l.connected);
            let mut next = now + DEPARTED_RECHECK;
            if wanted.contains(name) {
                next = st.status_applied_at.map_or(now, |t| t + refresh);
                if connected {
                    next = next.min(st.next_lease);
                } else {
                    let away_since = ld.map_or(self.started, |l| l.since.max(self.started));
                    if now < away_since + grace {
                        next = next.min(away_since + grace);
                    }
                }
                if let Some((_, at)) = &st.not_owned {
                    next = *at + NOT_OWNED_RECHECK;
                }
            }
            self.queue.add_at(name.clone(), next.max(now + MIN_REQUEUE));
        }
    }

    /// Ports stay with their Nodes until the Nodes are gone, and are served while the devices
    /// are in the inventory (and the Node is ours).
    pub(super) fn sync_ports(&self, wanted: &BTreeSet<String>) {
        let Some(ports) = &self.node_ports else {
            return;
        };
        let kept: BTreeSet<String> = self.state.keys().cloned().collect();
        let served: BTreeSet<String> = self
            .state
            .iter()
            .filter(|(n, st)| wanted.contains(*n) && st.not_owned.is_none() && st.uid.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        ports.sync(&kept, &served);
    }
}
