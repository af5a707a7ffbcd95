//! The resource metrics pipeline end to end: a real `fleetlet-agent` reports its figures, the
//! real `fleetlet-hub` serves them on the Node's own kubelet port, the stack's metrics-server
//! (built from its Go module, `make env-up`) scrapes `/metrics/resource` there and serves
//! metrics.k8s.io through the API server's aggregation layer: `kubectl top node` and `kubectl top
//! pod` list the device and its pod, and a HorizontalPodAutoscaler (autoscaling/v2, CPU
//! utilization) scales a Deployment aimed at the device's fleet from 1 to at least 2 replicas
//! when its pod burns CPU.
//!
//! Needs `make env-up` and the agent binary next to the hub's (`cargo build -p fleetlet-agent`).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

mod common;
use common::{
    AgentSetup, AgentSpec, HubSetup, HubSpec, KubeCleanup, client, create_namespace,
    free_port_range, kubectl, node_ready, remove_device_containers, unique, wait_for,
};

const TOLERATION: &str = r#"{"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "fleetlet", "effect": "NoSchedule"}"#;

#[tokio::test]
async fn kubectl_top_and_an_hpa_see_a_fleetlet_device() {
    let id = unique("top");
    let dev = format!("{id}-d");
    let fleet = format!("{id}-f");
    let _cleanup = KubeCleanup {
        nodes: vec![dev.clone()],
        namespace: Some(id.clone()),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec = HubSpec::new(&id, &[(dev.clone(), fleet.clone())]);
    spec.kubelet_node_ports = Some(free_port_range(2).expect("free ports"));
    let setup = HubSetup::write(dir.path(), spec);
    let _hub = setup.spawn();
    let mut agent_spec = AgentSpec::new(&dev, setup.ports.link);
    agent_spec.stats_interval_secs = Some(2);
    let _agent = AgentSetup::write(dir.path(), agent_spec).spawn();
    struct Containers(String);
    impl Drop for Containers {
        fn drop(&mut self) {
            remove_device_containers(&self.0);
        }
    }
    let _containers = Containers(dev.clone());

    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("node Ready", 90, || async {
        node_ready(&nodes.get(&dev).await.ok()?).then_some(())
    })
    .await;
    create_namespace(&client, &id).await;

    // A Deployment aimed at the fleet; its one pod burns CPU (request 100m, limit 200m: about
    // 200% of its request).
    let toleration: serde_json::Value = serde_json::from_str(TOLERATION).expect("toleration");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "burn"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "burn"}},
            "template": {
                "metadata": {"labels": {"app": "burn"}},
                "spec": {
                    "nodeSelector": {"flightctl.io/fleet": fleet},
                    "tolerations": [toleration],
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "burn", "image": "localhost/fleetlet-test/busybox:1",
                        "command": ["sh", "-c", "while :; do :; done"],
                        "resources": {"requests": {"cpu": "100m", "memory": "16Mi"},
                                      "limits": {"cpu": "200m", "memory": "64Mi"}},
                    }],
                },
            },
        },
    }))
    .expect("deployment");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &id);
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &id);
    let running = |n: usize| {
        let pods = pods.clone();
        async move {
            let l = pods
                .list(&ListParams::default().labels("app=burn"))
                .await
                .ok()?;
            let count = l
                .items
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count();
            (count >= n).then_some(count)
        }
    };
    wait_for("the Deployment's pod Running on the device", 120, || {
        running(1)
    })
    .await;

    // kubectl top: the device and its pod, from metrics-server's scrapes of the hub.
    let node_line = wait_for("kubectl top node lists the device", 120, || async {
        let (ok, out, _) = kubectl(&["top", "node", &dev, "--no-headers"]);
        ok.then(|| {
            out.lines()
                .find(|l| l.starts_with(&dev))
                .map(str::to_string)
        })
        .flatten()
    })
    .await;
    println!("kubectl top node {dev}: {node_line}");
    let pod_line = wait_for("kubectl top pod lists the pod", 120, || async {
        let (ok, out, _) = kubectl(&["top", "pod", "-n", &id, "--no-headers"]);
        ok.then(|| {
            out.lines()
                .find(|l| l.starts_with("burn-"))
                .map(str::to_string)
        })
        .flatten()
    })
    .await;
    println!("kubectl top pod -n {id}: {pod_line}");
    let cpu_milli: u64 = pod_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.strip_suffix('m'))
        .and_then(|c| c.parse().ok())
        .expect("CPU in millicores");
    assert!(
        (50..=400).contains(&cpu_milli),
        "a loop limited to 200m: {pod_line}"
    );
    let (ok, out, err) = kubectl(&["top", "pod", "-n", &id, "--containers", "--no-headers"]);
    assert!(ok, "{err}");
    assert!(out.contains(" burn "), "{out}");

    // An HPA on CPU utilization (target 50% of the request; the pod uses about 200%).
    let hpa = json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "burn", "namespace": id},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "burn"},
            "minReplicas": 1, "maxReplicas": 3,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 50}}}],
        },
    });
    let file = dir.path().join("hpa.json");
    std::fs::write(&file, hpa.to_string()).expect("hpa file");
    let (ok, _, err) = kubectl(&["apply", "-f", &file.display().to_string()]);
    assert!(ok, "{err}");
    let replicas = wait_for(
        "the HPA scales the Deployment to 2 or more",
        240,
        || async {
            let d = deployments.get("burn").await.ok()?;
            let r = d.spec.as_ref()?.replicas?;
            (r >= 2).then_some(r)
        },
    )
    .await;
    let (_, status, _) = kubectl(&["-n", &id, "get", "hpa", "burn", "--no-headers"]);
    println!("HPA scaled the Deployment to {replicas}: {}", status.trim());
    wait_for("the new replicas run on the device", 120, || running(2)).await;
}
