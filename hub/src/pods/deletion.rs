//! Kubelet-style pod deletion: a pod being deleted leaves its device's snapshot, and once its
//! device confirms the containers are gone (or it never ran there) the relay finishes the
//! deletion with grace 0 and a UID precondition.

use super::*;

impl PodRelay {
    pub(super) fn check_all_deletions(&mut self) {
        for uid in self.pods.terminating() {
            self.check_deletion(&uid);
        }
    }

    /// Finishes the deletion of a terminating pod once its device confirms it is gone (or
    /// never had it, or is no longer a device of this hub): grace 0 with a UID precondition.
    pub(super) fn check_deletion(&mut self, uid: &str) {
        if !self.pods.synced || self.pod_state.get(uid).is_some_and(|st| st.deleting) {
            return;
        }
        let Some(pod) = self.pod_by_uid(uid) else {
            return;
        };
        if pod.metadata.deletion_timestamp.is_none() {
            return;
        }
        let Some(node) = node_of(&pod) else { return };
        if !self.is_ours(&node) {
            return;
        }
        let reported = self.reported.get(&node).and_then(|m| m.get(uid)).copied();
        let full_gen = self.full_report_gen.get(&node).copied();
        let excluded = self.pod_state.get(uid).and_then(|st| st.excluded_in);
        let ran = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|c| !c.is_empty());
        let reason = if !self.device_enabled(&node) {
            Some("device no longer in the inventory")
        } else if self
            .pod_state
            .get(uid)
            .is_some_and(|st| st.confirmed_removed)
        {
            Some("device confirmed removal")
        } else if reported.is_none() && matches!((full_gen, excluded), (Some(f), Some(e)) if f >= e)
        {
            Some("device holds a snapshot without the pod and does not list it")
        } else if reported.is_none() && !ran {
            Some("device never reported the pod")
        } else {
            None
        };
        let Some(reason) = reason else { return };
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        tracing::info!(pod = %name, namespace = %ns, device = %node, reason, "finishing pod deletion");
        self.state(uid).deleting = true;
        let fut = self.api.delete_pod(&ns, &name, uid);
        let done = self.done_tx.clone();
        let uid = uid.to_string();
        tokio::spawn(async move {
            let ok = match fut.await {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(pod = %name, namespace = %ns, %error, "deleting pod");
                    false
                }
            };
            let _ = done.send(Input::DeleteDone { uid, ok }).await;
        });
    }
}
