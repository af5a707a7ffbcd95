//! Node leases in `kube-node-lease`, renewed like a kubelet's: the node lifecycle controller
//! takes a fresh lease as the device's heartbeat.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

use super::object::FIELD_MANAGER;
use crate::kubeutil::{is_not_found, micro_time_json};

/// Namespace of node leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// Renews and removes node leases.
#[derive(Clone)]
pub struct LeaseKeeper {
    api: Api<Lease>,
    duration_secs: u32,
}

impl LeaseKeeper {
    /// A keeper writing leases of `duration_secs` through `client`.
    pub fn new(client: kube::Client, duration_secs: u32) -> Self {
        Self {
            api: Api::namespaced(client, NODE_LEASE_NAMESPACE),
            duration_secs,
        }
    }

    /// Creates or renews the lease of `node`, owned by the Node so it goes with it.
    pub async fn renew(&self, node: &str, node_uid: Option<&str>) -> Result<(), kube::Error> {
        let mut metadata = json!({ "name": node, "namespace": NODE_LEASE_NAMESPACE });
        if let Some(uid) = node_uid {
            metadata["ownerReferences"] = json!([{
                "apiVersion": "v1", "kind": "Node", "name": node, "uid": uid,
            }]);
        }
        let body = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": node,
                "leaseDurationSeconds": self.duration_secs,
                "renewTime": micro_time_json(Timestamp::now()),
            }
        });
        self.api
            .patch(
                node,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map(|_| ())
    }

    /// Removes the lease of a node that is gone; absent is fine.
    pub async fn remove(&self, node: &str) -> Result<(), kube::Error> {
        match self.api.delete(node, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
