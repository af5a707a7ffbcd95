//! Executing a node's plan against the API: the Node by server-side apply (never taking over a
//! Node the hub does not own, never writing back another controller's taints from a stale
//! read), its status, its Lease, its Events; deleting a departed device's Node.

use super::plan::Plan;
use super::*;

/// What came of a plan.
pub(super) struct Outcome {
    pub(super) name: String,
    pub(super) uid: Option<String>,
    pub(super) labels_applied: Option<BTreeMap<String, String>>,
    pub(super) status_applied: Option<Value>,
    pub(super) ready_applied: Option<ReadyState>,
    pub(super) lease_renewed: bool,
    pub(super) deleted: bool,
    /// The Node turned out not to be ours: who holds it.
    pub(super) not_owned: Option<String>,
    /// The Node is gone from the API (a status write found none): it is created again.
    pub(super) gone: bool,
}

impl NodeManager {
    /// Whether the Lease `namespace/name` is held right now (by a live holder). A Lease the hub
    /// cannot read counts as held: staying off is the safe side.
    pub(super) async fn lease_is_live(&self, lease: &str) -> bool {
        let Some((namespace, name)) = lease.split_once('/') else {
            return false;
        };
        let api: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.leases_api.clone(), namespace);
        let r = api.get_opt(name).await;
        self.metrics.api("get_leader_lease", &r);
        let spec = match r {
            Ok(Some(l)) => l.spec.unwrap_or_default(),
            Ok(None) => return false,
            Err(_) => return true,
        };
        let holder = spec.holder_identity.unwrap_or_default();
        let (Some(renewed), Some(secs)) = (spec.renew_time, spec.lease_duration_seconds) else {
            return !holder.is_empty();
        };
        // Twice the duration: clock skew between the hubs must not make a live Lease look stale.
        let until =
            renewed.0 + std::time::Duration::from_secs(2 * u64::try_from(secs).unwrap_or(0));
        !holder.is_empty() && until > Timestamp::now()
    }

    pub(super) async fn execute(&self, plan: Plan, heartbeat: &str) -> Outcome {
        let mut out = Outcome {
            name: plan.name.clone(),
            uid: None,
            labels_applied: None,
            status_applied: None,
            ready_applied: None,
            lease_renewed: false,
            deleted: false,
            not_owned: None,
            gone: false,
        };
        let name = plan.name.as_str();
        if plan.delete {
            // The UID precondition: a Node someone else created under the same name after ours
            // went away is never deleted.
            let params = DeleteParams {
                preconditions: plan.uid.clone().map(|uid| kube::api::Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            let r = self.nodes.delete(name, &params).await;
            self.metrics.api("delete_node", &r);
            match r {
                Ok(_) => out.deleted = true,
                Err(e) if is_not_found(&e) => out.deleted = true,
                Err(e) if status_code(&e) == Some(409) => {
                    tracing::warn!(node = name, error = %e, "the node was replaced by one this hub did not create; left alone");
                    out.deleted = true;
                }
                Err(error) => {
                    tracing::warn!(node = name, %error, "deleting the node of a departed device")
                }
            }
            if out.deleted {
                tracing::info!(
                    node = name,
                    "device left the inventory and has no pods; node deleted"
                );
                let r = self.leases.remove(name).await;
                self.metrics.api("delete_lease", &r);
                if let Err(error) = r {
                    tracing::warn!(node = name, %error, "deleting node lease");
                }
            }
            return out;
        }
        let mut uid = plan.uid.clone();
        if let Some(labels) = plan.labels {
            match self.apply_node(name, &labels).await {
                Ok(applied_uid) => {
                    if uid.is_none() {
                        tracing::info!(node = name, "node applied");
                    }
                    uid = applied_uid;
                    out.uid.clone_from(&uid);
                    out.labels_applied = Some(labels);
                }
                Err(ApplyError::NotOwned {
                    owner,
                    uid: node_uid,
                    ..
                }) => {
                    if plan.not_owned.as_deref() != Some(owner.as_str()) {
                        self.announce_not_owned(name, node_uid.as_deref(), &owner)
                            .await;
                    }
                    out.not_owned = Some(owner);
                    return out;
                }
                Err(ApplyError::Api(e)) if status_code(&e) == Some(409) => {
                    tracing::info!(
                        node = name,
                        "the node changed since it was read; applying again on the next pass"
                    );
                    return out;
                }
                Err(error) => {
                    tracing::warn!(node = name, %error, retryable = error.is_retryable(), "applying node");
                    return out;
                }
            }
        }
        if let Some((cmp, mut body)) = plan.status {
            if let Some(conds) = body["status"]["conditions"].as_array_mut() {
                for c in conds {
                    c["lastHeartbeatTime"] = Value::String(heartbeat.to_string());
                }
            }
            let r = self
                .nodes
                .patch_status(
                    name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await;
            self.metrics.api("apply_node_status", &r);
            match r {
                Ok(_) => {
                    out.status_applied = Some(cmp);
                    out.ready_applied = Some(plan.ready.clone());
                }
                Err(e) if is_not_found(&e) => {
                    tracing::info!(node = name, "the node is gone; creating it again");
                    out.gone = true;
                    return out;
                }
                Err(error) => tracing::warn!(node = name, %error, "applying node status"),
            }
        }
        if plan.lease {
            let r = self.leases.renew(name, uid.as_deref()).await;
            self.metrics.api("renew_lease", &r);
            match r {
                Ok(()) => out.lease_renewed = true,
                Err(error) => tracing::warn!(node = name, %error, "renewing node lease"),
            }
        }
        if let Some(ev) = plan.event {
            let (reason, type_, note) = match ev {
                NodeEvent::Disconnected => (
                    "DeviceDisconnected",
                    EventType::Warning,
                    format!("device {name} disconnected from the hub longer than the grace period"),
                ),
                NodeEvent::Reconnected => (
                    "DeviceReconnected",
                    EventType::Normal,
                    format!("device {name} reconnected to the hub"),
                ),
            };
            tracing::info!(node = name, reason, "node event");
            self.publish(name, uid.as_deref(), type_, reason, note, "NodeReadiness")
                .await;
        }
        if let Some((reason, message)) = plan.flightctl_not_ready {
            self.publish(
                name,
                uid.as_deref(),
                EventType::Warning,
                &reason,
                format!("device {name}: {message}"),
                "NodeReadiness",
            )
            .await;
        }
        if out.labels_applied.is_some() && !plan.label_issues.is_empty() {
            let mut note = format!("device {name}: {}", plan.label_issues.join("; "));
            if note.len() > 1000 {
                let mut end = 1000;
                while !note.is_char_boundary(end) {
                    end -= 1;
                }
                note.truncate(end);
                note.push_str(" ...");
            }
            self.publish(
                name,
                uid.as_deref(),
                EventType::Warning,
                "InvalidDeviceLabels",
                note,
                "NodeLabels",
            )
            .await;
        }
        out
    }

    /// Publishes an Event about Node `name`; a failure is logged, never fatal.
    pub(super) async fn publish(
        &self,
        name: &str,
        uid: Option<&str>,
        type_: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(name.to_string()),
            uid: uid.map(str::to_owned),
            ..Default::default()
        };
        let r = self
            .recorder
            .publish(
                &Event {
                    type_,
                    reason: reason.into(),
                    note: Some(note),
                    action: action.into(),
                    secondary: None,
                },
                &reference,
            )
            .await;
        self.metrics.api("create_event", &r);
        if let Err(error) = r {
            tracing::warn!(node = name, %error, "publishing node event");
        }
    }

    /// Tells the operator, the Node's Events and `/metrics` that a device is not served because
    /// its Node name is taken (the metric is the `nodes_not_owned` gauge).
    pub(super) async fn announce_not_owned(&self, name: &str, uid: Option<&str>, owner: &str) {
        tracing::error!(
            device = name,
            node = name,
            owner,
            instance = %self.cfg.instance,
            "a Node named like the device exists and is not owned by this hub; the device is not served and the Node is left alone"
        );
        self.publish(
            name,
            uid,
            EventType::Warning,
            "NodeNameConflict",
            format!(
                "inventory device {name} is not served by fleetlet-hub instance {}: this Node is not owned by it ({owner})",
                self.cfg.instance
            ),
            "NodeOwnership",
        )
        .await;
    }

    pub(super) fn count_not_owned(&self) {
        let n = self
            .state
            .values()
            .filter(|s| s.not_owned.is_some())
            .count();
        self.metrics
            .nodes_not_owned
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Applies labels and taints, keeping taints others set (the list is atomic). Returns the uid.
    ///
    /// Only a Node this hub owns is applied to: a missing Node is created (a create fails if
    /// someone else created one meanwhile, where an apply would take it over), and an existing
    /// Node without this hub's instance label is refused with [`ApplyError::NotOwned`].
    ///
    /// The Node is read from the watched store (a GET only when the store has none of that
    /// name: a Node not ours, or one the watch has not delivered yet). The apply carries the
    /// resourceVersion it read, so a taint another controller added or removed since is never
    /// written back from a stale copy: the API server refuses the apply (409) and the next pass
    /// reads again.
    pub(super) async fn apply_node(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<String>, ApplyError> {
        let current = match self.store.get(&ObjectRef::new(name)) {
            Some(node) => Some(node),
            None => {
                let r = self.nodes.get_opt(name).await;
                self.metrics.api("get_node", &r);
                r?.map(Arc::new)
            }
        };
        let ours: Vec<Value> = self.cfg.taints.iter().map(object::taint_value).collect();
        let Some(current) = current else {
            let mut body = object::node_body(name, labels, &[], &ours);
            if let Some(lease) = &self.leader_lease {
                body["metadata"]["annotations"] =
                    serde_json::json!({ LEADER_LEASE_ANNOTATION: lease });
            }
            let node: Node = serde_json::from_value(body)
                .map_err(|e| ApplyError::Api(kube::Error::SerdeError(e)))?;
            let r = self.nodes.create(&PostParams::default(), &node).await;
            self.metrics.api("create_node", &r);
            return match r {
                Ok(created) => Ok(created.metadata.uid),
                // Created by someone else since the GET: the next pass looks at whose it is.
                Err(e) => Err(ApplyError::Api(e)),
            };
        };
        let owned = current
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_LABEL))
            .is_some_and(|v| *v == self.cfg.instance);
        if !owned {
            return Err(ApplyError::NotOwned {
                node: name.to_string(),
                owner: node_owner(&current),
                uid: current.metadata.uid.clone(),
            });
        }
        let theirs = current
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LEADER_LEASE_ANNOTATION));
        if let (Some(ours), Some(theirs)) = (&self.leader_lease, theirs)
            && ours != theirs
            && self.lease_is_live(theirs).await
        {
            return Err(ApplyError::NotOwned {
                node: name.to_string(),
                owner: format!(
                    "another fleetlet-hub with instance {} leads on Lease {theirs} (this hub: {ours}); two hub deployments share one instance name",
                    self.cfg.instance
                ),
                uid: current.metadata.uid.clone(),
            });
        }
        let others: Vec<Value> = current
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_deref())
            .unwrap_or_default()
            .iter()
            .filter_map(|t| serde_json::to_value(t).ok())
            .collect();
        let mut body = object::node_body(name, labels, &others, &ours);
        if let Some(lease) = &self.leader_lease {
            body["metadata"]["annotations"] = serde_json::json!({ LEADER_LEASE_ANNOTATION: lease });
        }
        // The apply carries the UID and resourceVersion it read: if the Node was replaced or
        // changed since, the API server refuses it instead of taking the new one over or
        // writing back taints from the old copy.
        body["metadata"]["uid"] = serde_json::json!(current.metadata.uid);
        body["metadata"]["resourceVersion"] = serde_json::json!(current.metadata.resource_version);
        let r = self
            .nodes
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await;
        self.metrics.api("apply_node", &r);
        Ok(r?.metadata.uid)
    }
}
