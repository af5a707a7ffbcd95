//! imagePullSecrets end to end: a pod in the real kube-apiserver names a
//! `kubernetes.io/dockerconfigjson` Secret, the real `fleetlet-hub` relays it in the pod's
//! bundle, and the real `fleetlet-agent` pulls the pod's image with it from a private registry
//! on loopback (htpasswd auth) through Podman. The same pod without the pull secret reports the
//! registry's refusal as `ErrImagePull`/`ImagePullBackOff` in the API.
//!
//! Needs `make env-up`, Debian's docker-registry and apache2-utils, and the agent binary next
//! to the hub's (`cargo build -p fleetlet-agent`).

use std::time::Duration;

use fleetlet_test_support::registry::PrivateRegistry;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

mod common;
use common::{
    AgentSetup, AgentSpec, HubSetup, HubSpec, KubeCleanup, client, create_namespace, node_ready,
    remove_device_containers, unique, wait_for,
};

/// The waiting reason and message of a pod's first container.
fn waiting(p: &Pod) -> Option<(String, String)> {
    let w = p
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .clone()?;
    Some((w.reason.unwrap_or_default(), w.message.unwrap_or_default()))
}

#[tokio::test]
async fn a_pod_pulls_its_private_image_with_the_pull_secret_the_hub_relays() {
    let mut reg = PrivateRegistry::start();
    let image = reg.push("localhost/fleetlet-test/busybox:1", "fleetlet/busybox:1");
    let id = unique("pullsecret");
    let dev = format!("{id}-d");
    let _cleanup = KubeCleanup {
        nodes: vec![dev.clone()],
        namespace: Some(id.clone()),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = HubSetup::write(
        dir.path(),
        HubSpec::new(&id, &[(dev.clone(), format!("{id}-f"))]),
    );
    let _hub = setup.spawn();
    let mut agent_spec = AgentSpec::new(&dev, setup.ports.link);
    agent_spec.podman_socket = reg.podman_socket.clone();
    let _agent = AgentSetup::write(dir.path(), agent_spec).spawn();
    struct RemoveContainers(String);
    impl Drop for RemoveContainers {
        fn drop(&mut self) {
            remove_device_containers(&self.0);
        }
    }
    let _containers = RemoveContainers(dev.clone());
    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("node Ready from its real agent", 90, || async {
        node_ready(&nodes.get(&dev).await.ok()?).then_some(())
    })
    .await;
    create_namespace(&client, &id).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &id);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "regcred"},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": reg.docker_config_json(&reg.username, &reg.password)}
    }))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create pull secret");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &id);
    let pod = |name: &str, pull_secrets: Value| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "nodeName": dev,
                "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "fleetlet", "effect": "NoSchedule"}],
                "terminationGracePeriodSeconds": 1,
                "imagePullSecrets": pull_secrets,
                "containers": [{"name": "app", "image": image, "imagePullPolicy": "Always",
                    "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]}]
            }
        }))
        .expect("pod")
    };
    pods.create(
        &PostParams::default(),
        &pod("private", json!([{"name": "regcred"}])),
    )
    .await
    .expect("create pod");
    pods.create(&PostParams::default(), &pod("anonymous", json!([])))
        .await
        .expect("create pod");
    wait_for("the pod with its pull secret Running", 120, || async {
        let p = pods.get("private").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    // The device's kubelet-like Events: Pulling, then Pulled with the pull's duration and the
    // image's size.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &id);
    let pulled = wait_for("a Pulled Event with the pull's figures", 60, || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.into_iter().find_map(|e| {
            let about = e.regarding.as_ref()?.name.as_deref() == Some("private");
            let note = e.note.clone()?;
            (about && e.reason.as_deref() == Some("Pulled")).then_some(note)
        })
    })
    .await;
    println!("Pulled: {pulled}");
    let prefix = format!("Successfully pulled image \"{image}\" in ");
    let size: Option<u64> = pulled
        .strip_prefix(&prefix)
        .and_then(|rest| rest.split_once(" including waiting). Image size: "))
        .and_then(|(_, size)| size.strip_suffix(" bytes."))
        .and_then(|size| size.parse().ok());
    assert!(
        size.is_some_and(|s| s > 0),
        "the kubelet's Pulled message: {pulled}"
    );
    let (reason, message) = wait_for("the pod without it failing to pull", 60, || async {
        let w = waiting(&pods.get("anonymous").await.ok()?)?;
        (w.0 == "ErrImagePull" || w.0 == "ImagePullBackOff").then_some(w)
    })
    .await;
    println!("without the pull secret: {reason}: {message}");
    assert!(
        message.contains("authentication required") || message.contains("unauthorized"),
        "the API shows the registry's auth error: {message}"
    );
    let hub_log = std::fs::read_to_string(dir.path().join("hub.log")).unwrap_or_default();
    assert!(
        !hub_log.contains(&reg.password),
        "the registry password reached the hub log"
    );
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        let _ = pods.delete("private", &Default::default()).await;
        let _ = pods.delete("anonymous", &Default::default()).await;
    })
    .await;
}
