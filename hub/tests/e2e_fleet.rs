//! End to end: the real `fleetlet-hub` binary, three real `fleetlet-agent` processes (own state
//! directories, sharing the stack's Podman) in two fleets, the real control plane. A Deployment
//! with a fleet nodeSelector lands only on fleet a's devices, runs in Podman, shows Running and
//! Ready, streams logs, scales up and down, changes image and is deleted.
//!
//! Needs `make env-up` and the agent binary next to the hub's (`cargo build -p fleetlet-agent`).

use std::collections::BTreeSet;
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use serde_json::json;

mod common;
use common::{
    Proc, app_containers, client, create_namespace, json_str, node_ready, podman,
    remove_device_containers, start_agent, start_hub, unique, wait_for,
};

/// Containers the agent of `device` runs, as (pod name, image, state).
fn device_containers(device: &str) -> Vec<(String, String, String)> {
    app_containers(&[("io.fleetlet.device", device)])
        .iter()
        .map(|c| {
            (
                json_str(&c["Labels"]["io.fleetlet.pod-name"]),
                json_str(&c["Image"]),
                json_str(&c["State"]),
            )
        })
        .collect()
}

/// Deletes what a failed run leaves behind (namespace, Nodes, Podman containers) on drop, so
/// a failing ReplicaSet does not keep creating pods after the test.
struct Cleanup {
    namespace: String,
    devices: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let kubectl = std::env::var("FLEETLET_KUBECTL").unwrap_or_else(|_| "kubectl".into());
        let kc = common::kube_config_path();
        let run = |args: &[&str]| {
            let _ = Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(&kc)
                .args(args)
                .output();
        };
        run(&["delete", "namespace", &self.namespace, "--wait=false"]);
        for d in &self.devices {
            run(&["delete", "node", d, "--wait=false"]);
            remove_device_containers(d);
        }
    }
}

/// Running and Ready pods of the deployment: (name, node, image).
async fn ready_pods(pods: &Api<Pod>) -> Vec<(String, String, String)> {
    let Ok(list) = pods.list(&ListParams::default().labels("app=web")).await else {
        return Vec::new();
    };
    list.items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status.as_ref().is_some_and(|s| {
                s.phase.as_deref() == Some("Running")
                    && s.conditions
                        .iter()
                        .flatten()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .map(|p| {
            let spec = p.spec.clone().unwrap_or_default();
            (
                p.metadata.name.clone().unwrap_or_default(),
                spec.node_name.unwrap_or_default(),
                spec.containers
                    .first()
                    .and_then(|c| c.image.clone())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_fleet_deployment_runs_on_real_agents_only_in_its_fleet() {
    let id = unique("e2e");
    let (a1, a2, b1) = (format!("{id}-a1"), format!("{id}-a2"), format!("{id}-b1"));
    let devices = [a1.as_str(), a2.as_str(), b1.as_str()];
    let _cleanup = Cleanup {
        namespace: id.clone(),
        devices: devices.iter().map(|d| d.to_string()).collect(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // Fleet names of this run only: other work on the shared stack (the demo, other tests) may
    // have Nodes in fleets called "a" and "b".
    let (fleet_a_name, fleet_b_name) = (format!("{id}-a"), format!("{id}-b"));
    let inventory: Vec<(String, String)> = [
        (&a1, &fleet_a_name),
        (&a2, &fleet_a_name),
        (&b1, &fleet_b_name),
    ]
    .iter()
    .map(|(n, f)| (n.to_string(), f.to_string()))
    .collect();
    let (_hub, ports) = start_hub(d, &id, &inventory);
    let agents: Vec<Proc> = devices
        .iter()
        .map(|dev| start_agent(d, dev, ports.link))
        .collect();
    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    for dev in devices {
        wait_for("node Ready from its real agent", 90, || async {
            let n = nodes.get(dev).await.ok()?;
            node_ready(&n).then_some(())
        })
        .await;
    }

    let ns = id.clone();
    create_namespace(&client, &ns).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "nodeSelector": {"flightctl.io/fleet": fleet_a_name},
                    "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "fleetlet", "effect": "NoSchedule"}],
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{"name": "app", "image": "localhost/fleetlet-test/busybox:1",
                                    "command": ["sh", "-c", "echo hello from fleetlet; exec sleep 3600"]}]
                }
            }
        }
    }))
    .expect("deployment");
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let fleet_a: BTreeSet<&str> = [a1.as_str(), a2.as_str()].into_iter().collect();

    let running = wait_for("2 pods Running and Ready", 120, || async {
        let r = ready_pods(&pods).await;
        (r.len() == 2).then_some(r)
    })
    .await;
    println!("Running and Ready: {running:?}");
    for dev in devices {
        println!("podman containers of {dev}: {:?}", device_containers(dev));
    }
    for (pod, node, _) in &running {
        assert!(
            fleet_a.contains(node.as_str()),
            "{pod} is on {node}, outside fleet a"
        );
    }
    let in_podman: usize = [&a1, &a2].iter().map(|d| device_containers(d).len()).sum();
    assert!(in_podman >= 2, "Podman runs the pods' containers");
    assert!(device_containers(&b1).is_empty(), "fleet b runs nothing");
    let logs = pods
        .logs(
            &running[0].0,
            &LogParams {
                container: Some("app".into()),
                ..Default::default()
            },
        )
        .await
        .expect("kubectl logs through the hub");
    assert!(logs.contains("hello from fleetlet"), "{logs:?}");

    // Scale up, then down.
    let scale = |n: i32| json!({"spec": {"replicas": n}});
    deployments
        .patch("web", &PatchParams::default(), &Patch::Merge(scale(3)))
        .await
        .expect("scale up");
    wait_for("3 pods Running and Ready", 120, || async {
        (ready_pods(&pods).await.len() == 3).then_some(())
    })
    .await;
    deployments
        .patch("web", &PatchParams::default(), &Patch::Merge(scale(1)))
        .await
        .expect("scale down");
    wait_for("1 pod left, the others deleted", 120, || async {
        let all = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        (all.items.len() == 1 && ready_pods(&pods).await.len() == 1).then_some(())
    })
    .await;

    // Change the image: the pod is replaced by one with the new image.
    podman(&[
        "tag",
        "localhost/fleetlet-test/busybox:1",
        "localhost/fleetlet-test/busybox:e2e",
    ]);
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "localhost/fleetlet-test/busybox:e2e"}]}}}})),
        )
        .await
        .expect("change image");
    wait_for("new image Running", 120, || async {
        let r = ready_pods(&pods).await;
        let all = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        (all.items.len() == 1 && r.len() == 1 && r[0].2.ends_with(":e2e")).then_some(())
    })
    .await;

    // Delete: pods and their containers go.
    deployments
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete deployment");
    wait_for("pods gone", 120, || async {
        let all = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        all.items.is_empty().then_some(())
    })
    .await;
    wait_for("containers gone from Podman", 60, || async {
        devices
            .iter()
            .all(|d| device_containers(d).is_empty())
            .then_some(())
    })
    .await;

    drop(agents);
    common::assert_no_forbidden(&d.join("hub.log"));
    for dev in devices {
        remove_device_containers(dev);
        let _ = nodes.delete(dev, &DeleteParams::default()).await;
    }
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await;
}
