//! Pods of a node the hub holds unready: marked Ready=False as the node lifecycle controller
//! would, and restored when the node comes back without a newer device status.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::status::StatusUpdate;
use super::{PodRelay, node_of};
use crate::nodes::Unready;

/// A pod whose Ready condition the relay set to False because its node went unready.
#[derive(Debug)]
pub(super) struct MarkedNotReady {
    /// The pod's node.
    pub(super) node: String,
    /// The pod's Ready condition before (restored if the node comes back and the device sends
    /// nothing newer).
    pub(super) ready_before: Value,
}

impl PodRelay {
    /// Does for the pods of unready nodes what the node lifecycle controller does when it sees a
    /// node's Ready leave True (`MarkPodsNotReady`): their Ready condition turns False (the
    /// rest of the status stays as the device reported it) and a `NodeNotReady` Warning Event
    /// goes out per pod. The controller never does it for fleetlet nodes: it only acts on a
    /// transition it writes itself, and the hub writes the node's Unknown.
    ///
    /// Level-triggered (on every change of the unready set and every tick): a pod is marked
    /// once while its API status still says Ready=True. The mark ends with the device's next
    /// status (a reconnecting agent resends all of them); if the node turns ready without one
    /// (Flightctl's override lifted), the Ready condition from before is written back. A
    /// disconnected node's pods are left alone once the device is connected again, so a
    /// reconnect that outruns the node manager's pass is not undone. Writes go through the
    /// status writer, so they are rate-limited and coalesced with device statuses.
    pub(super) fn sync_not_ready(&mut self) {
        if !self.pods.synced {
            return;
        }
        let unready = self.unready.borrow().clone();
        let live = self.live.borrow().clone();
        let connected = |node: &str| live.get(node).is_some_and(|l| l.connected);
        let now = crate::kubeutil::time_string(k8s_openapi::jiff::Timestamp::now());

        // Nodes that are ready again: restore what the device last said, unless it is away.
        let back: Vec<String> = self
            .pod_state
            .iter()
            .filter(|(_, st)| {
                st.marked
                    .as_ref()
                    .is_some_and(|m| !unready.contains_key(&m.node))
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in back {
            let Some(m) = self.pod_state.get_mut(&uid).and_then(|st| st.marked.take()) else {
                continue;
            };
            if !connected(&m.node) {
                continue;
            }
            // A pod being deleted is on its way out; its readiness is the device's to report.
            let Some(pod) = self
                .pod_by_uid(&uid)
                .filter(|p| p.metadata.deletion_timestamp.is_none())
            else {
                continue;
            };
            let mut ready = m.ready_before;
            ready["lastTransitionTime"] = Value::String(now.clone());
            if let Some(generation) = pod.metadata.generation.filter(|g| *g > 0) {
                ready["observedGeneration"] = json!(generation);
            }
            let update = StatusUpdate {
                uid: uid.clone(),
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                status: json!({ "conditions": [ready] }),
            };
            tracing::info!(pod = %update.name, namespace = %update.namespace, device = %m.node, "node ready again; pod readiness restored");
            if let Err(e) = self.status_tx.try_send(update) {
                tracing::warn!(uid, error = %e, "status queue full; readiness not restored until the next report");
            }
        }
        if unready.is_empty() {
            return;
        }

        let mut to_mark = Vec::new();
        for pod in self.pods.all() {
            let Some(node) = node_of(&pod) else { continue };
            let Some(why) = unready.get(&node) else {
                continue;
            };
            if *why == Unready::Disconnected && connected(&node) {
                continue;
            }
            let Some(uid) = pod.metadata.uid.as_ref() else {
                continue;
            };
            if self
                .pod_state
                .get(uid)
                .is_some_and(|st| st.marked.is_some())
            {
                continue;
            }
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
                .filter(|c| c.status == "True");
            let Some(ready) = ready.and_then(|c| serde_json::to_value(c).ok()) else {
                continue;
            };
            to_mark.push((uid.clone(), node, ready, pod.clone()));
        }
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for (uid, node, ready_before, pod) in to_mark {
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            // The mark is the hub's judgement of the pod as it is now: it carries the pod's
            // current generation. Left at what the device last observed, a pod deleted just
            // before its device went away (deletion bumps the generation) keeps an older
            // observedGeneration, and clients that check it (`kubectl wait
            // --for=condition=Ready=false`) take the mark for stale and wait for good.
            let mut ready = json!({
                "type": "Ready",
                "status": "False",
                "lastTransitionTime": now,
            });
            if let Some(generation) = pod.metadata.generation.filter(|g| *g > 0) {
                ready["observedGeneration"] = json!(generation);
            }
            let update = StatusUpdate {
                uid: uid.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
                status: json!({ "conditions": [ready] }),
            };
            if let Err(e) = self.status_tx.try_send(update) {
                tracing::warn!(pod = %name, %namespace, error = %e, "status queue full; pod marked not ready on a later pass");
                continue;
            }
            *per_node.entry(node.clone()).or_default() += 1;
            self.state(&uid).marked = Some(MarkedNotReady { node, ready_before });
            let ev = self
                .api
                .pod_event(&pod, "MarkNotReady", "NodeNotReady", "Node is not ready");
            tokio::spawn(async move {
                if let Err(error) = ev.await {
                    tracing::warn!(pod = %name, %namespace, %error, "publishing NodeNotReady event");
                }
            });
        }
        for (node, pods) in per_node {
            tracing::info!(device = %node, pods, "node not ready; its pods marked not ready");
        }
    }
}
