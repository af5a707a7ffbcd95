//! The relay's [`PodApi`] against the real API server.

use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{DeleteParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource};

use super::referenced::RefKind;
use super::{Fetched, PodApi};
use crate::kubeutil::is_not_found;
use crate::metrics::Metrics;

/// Deletes pods and publishes pod events through a kube client.
pub struct KubePodApi {
    client: kube::Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
}

impl KubePodApi {
    /// A pod API writing through `client`.
    pub fn new(client: kube::Client, recorder: Recorder, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            recorder,
            metrics,
        }
    }
}

impl PodApi for KubePodApi {
    fn delete_pod(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> BoxFuture<'static, Result<(), kube::Error>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let name = name.to_string();
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let r = api.delete(&name, &dp).await;
            metrics.api("delete_pod", &r);
            match r {
                Ok(_) => Ok(()),
                // Gone already, or replaced by a pod with another uid (409): nothing to finish.
                Err(e) if is_not_found(&e) || crate::kubeutil::status_code(&e) == Some(409) => {
                    Ok(())
                }
                Err(e) => Err(e),
            }
        })
    }

    fn fetch(
        &self,
        kind: RefKind,
        namespace: &str,
        name: &str,
    ) -> BoxFuture<'static, Result<Option<Fetched>, kube::Error>> {
        let client = self.client.clone();
        let namespace = namespace.to_string();
        let name = name.to_string();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            match kind {
                RefKind::ConfigMap => {
                    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
                    let r = api.get_opt(&name).await;
                    metrics.api("get_configmap", &r);
                    r.map(|o| o.map(Fetched::ConfigMap))
                }
                RefKind::Secret => {
                    let api: Api<Secret> = Api::namespaced(client, &namespace);
                    let r = api.get_opt(&name).await;
                    metrics.api("get_secret", &r);
                    r.map(|o| o.map(Fetched::Secret))
                }
            }
        })
    }

    fn node_event(
        &self,
        node: &str,
        action: &str,
        reason: &str,
        message: &str,
    ) -> BoxFuture<'static, Result<(), kube::Error>> {
        let recorder = self.recorder.clone();
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.to_string()),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_string(),
            note: Some(truncate_note(message)),
            action: action.to_string(),
            secondary: None,
        };
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let r = recorder.publish(&event, &reference).await;
            metrics.api("create_event", &r);
            r
        })
    }

    fn pod_event(
        &self,
        pod: &Pod,
        action: &str,
        reason: &str,
        message: &str,
    ) -> BoxFuture<'static, Result<(), kube::Error>> {
        let recorder = self.recorder.clone();
        let reference = pod.object_ref(&());
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_string(),
            note: Some(truncate_note(message)),
            action: action.to_string(),
            secondary: None,
        };
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let r = recorder.publish(&event, &reference).await;
            metrics.api("create_event", &r);
            r
        })
    }
}

/// An Event's note is limited to 1 KiB by the API server; longer ones are cut at a character
/// boundary with a marker.
fn truncate_note(message: &str) -> String {
    const LIMIT: usize = 1000;
    if message.len() <= LIMIT {
        return message.to_string();
    }
    let mut end = LIMIT;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} ...", &message[..end])
}
