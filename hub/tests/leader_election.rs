//! Leader election on a real coordination Lease: a second replica waits while the first renews
//! and takes over once the first stops; with real hub processes, real agents and real Podman,
//! the agents follow the leader.

use std::time::Duration;

use fleetlet_hub::leader::LeaderElector;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

mod common;
use common::{
    AgentSetup, AgentSpec, HubSetup, HubSpec, KubeCleanup, assert_no_forbidden, client,
    create_namespace, hub_metric, kubectl_best_effort, node_ready, ops_get,
    remove_device_containers, uid_containers, unique, wait_for,
};

#[tokio::test]
async fn a_standby_waits_while_the_leader_renews_and_takes_over_when_it_stops() {
    let client = client().await;
    let name = unique("it-leader");
    let duration = Duration::from_secs(4);
    let retry = Duration::from_millis(500);
    let mut a = LeaderElector::new(
        client.clone(),
        "default",
        &name,
        "replica-a",
        duration,
        retry,
    );
    let mut b = LeaderElector::new(
        client.clone(),
        "default",
        &name,
        "replica-b",
        duration,
        retry,
    );
    assert!(
        a.try_acquire_or_renew().await.expect("a"),
        "first replica takes the free lease"
    );

    // A keeps renewing in the background; B must not get in for several lease durations.
    let stop_a = CancellationToken::new();
    let a_task = {
        let stop = stop_a.clone();
        tokio::spawn(async move {
            a.keep(&stop).await;
            a
        })
    };
    for _ in 0..20 {
        assert!(
            !b.try_acquire_or_renew().await.expect("b"),
            "standby must wait while the leader renews"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A dies (stops renewing): B takes over once A's record has been stale for a lease duration.
    stop_a.cancel();
    let mut a = a_task.await.expect("a task");
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        if b.try_acquire_or_renew().await.unwrap_or(false) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "standby did not take over within 30 s"
        );
        tokio::time::sleep(retry).await;
    }
    println!(
        "takeover after the leader stopped: {:?} (lease duration {duration:?})",
        started.elapsed()
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let lease = leases.get(&name).await.expect("lease");
    let spec = lease.spec.expect("spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(1));
    // The old leader sees it lost.
    assert!(
        !a.try_acquire_or_renew().await.expect("a"),
        "the old leader must not take it back"
    );
    let _ = leases.delete(&name, &DeleteParams::default()).await;
}

fn sleeper(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "handover"}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "fleetlet", "effect": "NoSchedule"}],
            "containers": [{"name": "app", "image": "localhost/fleetlet-test/busybox:1",
                            "command": ["sh", "-c", "exec sleep 3600"]}]
        }
    }))
    .expect("pod")
}

async fn running_uid(pods: &Api<Pod>, name: &str) -> Option<String> {
    let p = pods.get(name).await.ok()?;
    let running = p.status.as_ref()?.phase.as_deref() == Some("Running");
    running.then(|| p.metadata.uid.clone()).flatten()
}

/// Two real hub processes of one instance, real agents with both hubs' endpoints, real Podman:
/// the standby turns devices away while the leader serves them; after `kill -9` of the leader the
/// standby takes the Lease, the agents reconnect to it, the Nodes stay Ready and point at the new
/// leader's kubelet endpoint, a deletion and a new pod are relayed, and no pod UID runs twice.
#[tokio::test]
async fn agents_follow_the_leader_when_it_is_killed() {
    let id = unique("ho");
    let (dev_a, dev_b) = (format!("{id}-a"), format!("{id}-b"));
    let _cleanup = KubeCleanup {
        nodes: vec![dev_a.clone(), dev_b.clone()],
        namespace: Some(id.clone()),
    };
    struct Containers(Vec<String>);
    impl Drop for Containers {
        fn drop(&mut self) {
            for d in &self.0 {
                remove_device_containers(d);
            }
        }
    }
    let _containers = Containers(vec![dev_a.clone(), dev_b.clone()]);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let fleet = format!("{id}-f");
    let mut spec = HubSpec::new(
        &id,
        &[
            (dev_a.clone(), fleet.clone()),
            (dev_b.clone(), fleet.clone()),
        ],
    );
    spec.leader_secs = (8, 1);
    let setup1 = HubSetup::write(d, spec);
    let setup2 = setup1.replica("hub-2");
    let (p1, p2) = (setup1.ports, setup2.ports);
    let client = client().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "fleetlet-system");
    // kubectl, not the async client: a Drop cannot wait on the test's own runtime.
    struct DropLease(String);
    impl Drop for DropLease {
        fn drop(&mut self) {
            kubectl_best_effort(&[
                "-n",
                "fleetlet-system",
                "delete",
                "lease",
                &self.0,
                "--ignore-not-found",
            ]);
        }
    }
    let _lease = DropLease(id.clone());

    let hub1 = setup1.spawn();
    wait_for("the first hub leads and is ready", 60, || async {
        let (code, _) = ops_get(p1.ops, "/readyz").await?;
        (code == 200).then_some(())
    })
    .await;
    let _hub2 = setup2.spawn();
    wait_for("hub-2 up as a standby", 30, || async {
        (hub_metric(p2.ops, "leader").await? == 0.0).then_some(())
    })
    .await;
    let (code, body) = ops_get(p2.ops, "/readyz").await.expect("hub-2 readyz");
    println!("standby /readyz: {code} {}", body.trim());
    assert_eq!(code, 503, "a standby must not be ready");

    // The agents list the standby FIRST: it must turn them away so they end up on the leader.
    let agent = |dev: &str| {
        let mut spec = AgentSpec::new(dev, p2.link);
        spec.fallback_endpoints = vec![setup1.endpoint()];
        AgentSetup::write(d, spec).spawn()
    };
    let _agent_a = agent(&dev_a);
    let _agent_b = agent(&dev_b);
    let nodes: Api<Node> = Api::all(client.clone());
    for dev in [&dev_a, &dev_b] {
        wait_for("node Ready through the first hub", 90, || async {
            node_ready(&nodes.get(dev).await.ok()?).then_some(())
        })
        .await;
    }
    assert_eq!(hub_metric(p1.ops, "connected_devices").await, Some(2.0));
    assert_eq!(hub_metric(p2.ops, "connected_devices").await, Some(0.0));
    let agent_log =
        std::fs::read_to_string(d.join(format!("agent-{dev_a}.log"))).unwrap_or_default();
    let refused = agent_log
        .lines()
        .find(|l| l.contains("not leader"))
        .unwrap_or_else(|| {
            panic!("the standby (first endpoint) must have turned the agent away:\n{agent_log}")
        });
    println!("agent turned away by the standby: {refused}");

    create_namespace(&client, &id).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &id);
    let placement = [("p1", &dev_a), ("p2", &dev_b), ("p3", &dev_a)];
    for (name, node) in placement {
        pods.create(&PostParams::default(), &sleeper(name, node))
            .await
            .expect("create pod");
    }
    let mut uids = Vec::new();
    for (name, _) in placement {
        uids.push(
            wait_for("pod Running through the first hub", 120, || {
                running_uid(&pods, name)
            })
            .await,
        );
    }
    let before: Vec<Vec<(String, String)>> = uids.iter().map(|u| uid_containers(u)).collect();
    for (uid, c) in uids.iter().zip(&before) {
        assert_eq!(c.len(), 1, "pod {uid}: exactly one container: {c:?}");
        assert_eq!(c[0].1, "running", "pod {uid}: {c:?}");
    }

    // kill -9 the leader.
    let old_lease = leases.get(&id).await.expect("leader lease");
    assert_eq!(
        old_lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref()),
        Some("hub")
    );
    hub1.kill9();
    let killed = tokio::time::Instant::now();
    wait_for("hub-2 takes the lease", 60, || async {
        (hub_metric(p2.ops, "leader").await? == 1.0).then_some(())
    })
    .await;
    let takeover = killed.elapsed();
    wait_for("both agents reconnected to hub-2", 60, || async {
        (hub_metric(p2.ops, "connected_devices").await? == 2.0).then_some(())
    })
    .await;
    let reconnected = killed.elapsed();
    wait_for("hub-2 ready", 60, || async {
        (ops_get(p2.ops, "/readyz").await?.0 == 200).then_some(())
    })
    .await;
    println!(
        "after kill -9 of the first hub: hub-2 leads after {takeover:?} (lease 8 s), both agents on hub-2 after {reconnected:?}"
    );
    let lease = leases.get(&id).await.expect("leader lease");
    let spec = lease.spec.expect("lease spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("hub-2"));
    assert_eq!(
        spec.lease_transitions,
        old_lease
            .spec
            .and_then(|s| s.lease_transitions)
            .map(|t| t + 1)
    );

    // The Nodes are Ready and their kubelet endpoint is now hub-2's.
    for dev in [&dev_a, &dev_b] {
        wait_for("node Ready and pointing at hub-2", 60, || async {
            let n = nodes.get(dev).await.ok()?;
            let port = n
                .status
                .as_ref()?
                .daemon_endpoints
                .as_ref()?
                .kubelet_endpoint
                .as_ref()?
                .port;
            (node_ready(&n) && port == i32::from(p2.kubelet)).then_some(())
        })
        .await;
    }
    // The pods kept running: the same containers, never started a second time.
    for (uid, c) in uids.iter().zip(&before) {
        assert_eq!(
            &uid_containers(uid),
            c,
            "pod {uid} must keep its one container"
        );
    }

    // Statuses keep flowing through hub-2: a deletion stops the container and removes the pod...
    pods.delete("p3", &DeleteParams::default())
        .await
        .expect("delete p3");
    wait_for("p3 gone from the API", 60, || async {
        matches!(pods.get_opt("p3").await, Ok(None)).then_some(())
    })
    .await;
    let left = uid_containers(&uids[2]);
    assert!(
        left.iter().all(|(_, state)| state != "running"),
        "p3's container must be stopped before the pod leaves the API: {left:?}"
    );
    wait_for("p3's container removed from Podman", 30, || async {
        uid_containers(&uids[2]).is_empty().then_some(())
    })
    .await;
    // ... and a new pod starts and reports Running.
    pods.create(&PostParams::default(), &sleeper("p4", &dev_b))
        .await
        .expect("create p4");
    let uid4 = wait_for("p4 Running through hub-2", 120, || running_uid(&pods, "p4")).await;
    for uid in [&uids[0], &uids[1], &uid4] {
        let c = uid_containers(uid);
        assert_eq!(c.len(), 1, "pod {uid} runs exactly once: {c:?}");
        assert_eq!(c[0].1, "running", "pod {uid}: {c:?}");
    }
    assert_no_forbidden(&setup2.log());
}
