//! The hub's trust boundaries, tried as each kind of attacker would, against a real hub process,
//! real agents, the real API server and the stack's Podman (the security section of the suite):
//!
//! - an inventory device named like a Node the hub does not own (a kubelet's) is not served:
//!   the Node, its pod and the pod's Secret are left exactly as they were;
//! - a device certificate flooding the hub with status reports for millions of made-up pod UIDs
//!   costs the hub a bounded amount of memory, is cut when over its budget, and the other
//!   device's pods keep starting and reporting;
//! - a pod whose ConfigMaps (~18 MB) cannot fit the link fails alone, its device runs the rest;
//! - a DaemonSet that tolerates every taint (kube-proxy-like) stays off the devices, one that
//!   selects their fleet runs there;
//! - the kubelet endpoint tells an unauthorized caller nothing about which pods exist, caches
//!   token reviews, and closes connections that never handshake or never send a request.

use std::time::Duration;

use bytes::Bytes;
use fleetlet_faults::Outcome;
use fleetlet_proto::v1::{self, agent_message};
use fleetlet_test_support::harness::{
    self, HubSetup, HubSpec, KubeCleanup, Proc, client, create_namespace, hub_metric,
    kubectl_best_effort, remove_device_containers, start_agent, unique, wait_for,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Pod, Secret};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;
use tokio::time::Instant;

mod rig;
use rig::{Rig, WAIT, kubelet_port, link_client, random_hex, record, test_image};

/// The hub process's resident set in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Stops the processes, then removes the test's Nodes, namespace, leader Lease and containers.
struct Cleanup {
    procs: Vec<Proc>,
    devices: Vec<String>,
    lease: String,
    _kube: KubeCleanup,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.procs.clear();
        for d in &self.devices {
            remove_device_containers(d);
        }
        kubectl_best_effort(&[
            "-n",
            "fleetlet-system",
            "delete",
            "lease",
            &self.lease,
            "--ignore-not-found",
        ]);
    }
}

#[tokio::test]
async fn a_device_named_like_a_node_the_hub_does_not_own_is_not_served() {
    let id = unique("tr-own");
    let (taken, served) = (format!("{id}-kubelet"), format!("{id}-d0"));
    let kube = client().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cleanup = Cleanup {
        procs: Vec::new(),
        devices: vec![taken.clone(), served.clone()],
        lease: id.clone(),
        _kube: KubeCleanup {
            nodes: vec![taken.clone(), served.clone()],
            namespace: Some(id.clone()),
        },
    };
    // Before the hub starts: a Node as a kubelet (or another controller) registers it, a Secret
    // and a pod bound to that Node using it.
    let nodes: Api<Node> = Api::all(kube.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": taken, "labels": {"kubernetes.io/hostname": taken, "owner": "a-kubelet"}},
    }))
    .expect("node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create the foreign Node");
    create_namespace(&kube, &id).await;
    let secret_value = format!("trsecret{}", random_hex());
    let secrets: Api<Secret> = Api::namespaced(kube.clone(), &id);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "creds"}, "stringData": {"password": secret_value}
            }))
            .expect("secret"),
        )
        .await
        .expect("create secret");
    let pods: Api<Pod> = Api::namespaced(kube.clone(), &id);
    let pod = |name: &str, node: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "nodeName": node,
                "hostNetwork": true,
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": test_image(),
                    "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
                    "env": [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}}]}]
            }
        }))
        .expect("pod")
    };
    let kubelets_pod = pods
        .create(&PostParams::default(), &pod("kubelets-pod", &taken))
        .await
        .expect("create the kubelet's pod");
    let kubelets_uid = kubelets_pod.metadata.uid.clone().expect("uid");
    let before = nodes.get(&taken).await.expect("node");

    // The hub's inventory holds a device of that name, and a normal one; both agents run.
    let setup = HubSetup::write(
        dir.path(),
        HubSpec::new(
            &id,
            &[(taken.clone(), id.clone()), (served.clone(), id.clone())],
        ),
    );
    cleanup.procs.push(setup.spawn());
    cleanup
        .procs
        .push(start_agent(dir.path(), &taken, setup.ports.link));
    cleanup
        .procs
        .push(start_agent(dir.path(), &served, setup.ports.link));
    // The hub is working: the served device's pod runs.
    wait_for("the served device's Node Ready", 120, || async {
        nodes
            .get_opt(&served)
            .await
            .ok()
            .flatten()
            .filter(harness::node_ready)
    })
    .await;
    pods.create(&PostParams::default(), &pod("served-pod", &served))
        .await
        .expect("create the served pod");
    wait_for("the served pod Running", 90, || async {
        let p = pods.get_opt("served-pod").await.ok().flatten()?;
        (p.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    // The refusal is visible: an Event on that Node, the metric, a log line naming both.
    let events: Api<Event> = Api::all(kube.clone());
    let event = wait_for("NodeNameConflict event", 60, || async {
        events
            .list(&ListParams::default().fields(&format!("involvedObject.name={taken}")))
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("NodeNameConflict"))
    })
    .await;
    let not_owned = hub_metric(setup.ports.ops, "nodes_not_owned").await;
    // A few more node-manager passes and agent reconnect attempts.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let hub_log = std::fs::read_to_string(setup.log()).unwrap_or_default();
    let logged = hub_log
        .lines()
        .any(|l| l.contains("ERROR") && l.contains("not owned by this hub") && l.contains(&taken));
    // The Node exactly as it was: nothing fleetlet manages on it, no label, taint or status of
    // ours; no node Lease renewed for it.
    let after = nodes.get(&taken).await.expect("node");
    let managers: Vec<String> = after
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    // (The node lifecycle controller may taint a Node no kubelet reports for; the hub's taint
    // is the provider taint.)
    let provider_taint = after
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == "virtual-kubelet.io/provider"));
    let untouched = after.metadata.labels == before.metadata.labels
        && !provider_taint
        && !managers.iter().any(|m| m == "fleetlet")
        && after
            .status
            .as_ref()
            .and_then(|s| s.daemon_endpoints.as_ref())
            .and_then(|d| d.kubelet_endpoint.as_ref())
            .is_none_or(|e| e.port != i32::from(setup.ports.kubelet));
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(kube.clone(), "kube-node-lease");
    let no_lease = leases.get_opt(&taken).await.ok().flatten().is_none();
    // Its pod was never sent: nothing runs for it, no status was written, the Secret's value is
    // nowhere on that device.
    let never_ran = rig::containers(&taken, &kubelets_uid).is_empty();
    let status = pods
        .get("kubelets-pod")
        .await
        .expect("pod")
        .status
        .unwrap_or_default();
    let no_status =
        status.container_statuses.is_none() && status.phase.as_deref() != Some("Running");
    let agent_state = dir.path().join(format!("state-{taken}"));
    let mut leaked = false;
    for entry in walk(&agent_state) {
        if std::fs::read(&entry).is_ok_and(|b| {
            b.windows(secret_value.len())
                .any(|w| w == secret_value.as_bytes())
        }) {
            leaked = true;
        }
    }
    let ok = untouched
        && no_lease
        && never_ran
        && no_status
        && !leaked
        && logged
        && not_owned == Some(1.0);
    record(Outcome {
        fault: "inventory device named like a Node the hub does not own".into(),
        recovered: ok,
        converge_secs: None,
        pods_lost: 0,
        pods_duplicated: 0,
        detail: format!(
            "Node untouched {untouched} (managers {managers:?}), no node Lease {no_lease}; its pod never ran {never_ran}, no status {no_status}, secret on device {leaked}; Event {:?}, nodes_not_owned {not_owned:?}, error logged {logged}",
            event.reason
        ),
    });
    assert!(
        untouched,
        "the foreign Node changed: labels {:?} -> {:?}, provider taint {provider_taint}, managers {managers:?}",
        before.metadata.labels, after.metadata.labels
    );
    assert!(no_lease, "a node Lease was renewed for the foreign Node");
    assert!(
        never_ran && no_status && !leaked,
        "the kubelet's pod reached the device"
    );
    assert!(logged, "an error naming the Node");
    assert_eq!(not_owned, Some(1.0));
    drop(cleanup);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    // Bounded by the (small) state directory of one test agent.
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// One status report of 2,048 made-up pod UIDs.
fn forged_report(round: usize, n: usize) -> v1::AgentMessage {
    rig::message(agent_message::Kind::PodStatus(v1::PodStatusReport {
        full: false,
        pods: (0..2048)
            .map(|i| v1::PodStatusEntry {
                uid: format!("{round:04}-{n:08}-{i:04}-{}", "0".repeat(16)),
                namespace: "ns".into(),
                name: "forged".into(),
                status_json: Bytes::from_static(br#"{"phase":"Running"}"#),
                removed: false,
            })
            .collect(),
    }))
}

#[tokio::test]
async fn a_flooding_device_costs_the_hub_a_bounded_amount_and_is_cut() {
    let mut rig = Rig::start("tr-flood", 2).await;
    let devices = rig.devices();
    let (good, flooder) = (devices[0].clone(), devices[1].clone());
    rig.create_pod(rig::sleeper("steady", &good)).await;
    assert!(rig.wait_running(&["steady"], WAIT).await, "{}", rig.logs());
    // The flooder's certificate is used by this test instead of its agent.
    rig.kill_agent(&flooder);
    let pid = rig.fleet.hub_proc.as_ref().expect("hub").id();
    let ops = rig.fleet.hub.ports.ops;
    // Settle, then the baseline.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = rss_kib(pid);
    let port = rig.link_port();
    let rounds = 6;
    let mut sent_uids = 0usize;
    let mut cuts = Vec::new();
    let mut peak = before;
    let flood_started = Instant::now();
    for round in 0..rounds {
        let mut client = link_client(rig.dir(), &flooder, port).await;
        let hello = rig::hello(&flooder);
        // Sent as fast as the link takes them, until the hub ends the stream.
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = counter.clone();
        let outbound = futures::stream::iter([hello]).chain(
            futures::stream::iter(0..100_000usize).map(move |n| {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                forged_report(round, n)
            }),
        );
        let verdict = match client.connect(outbound).await {
            Err(status) => Some(status),
            Ok(response) => {
                let mut inbound = response.into_inner();
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    match tokio::time::timeout_at(deadline, inbound.message()).await {
                        Err(_) => break None,
                        Ok(Ok(Some(_))) => continue,
                        Ok(Ok(None)) => break None,
                        Ok(Err(status)) => break Some(status),
                    }
                }
            }
        };
        let reports = counter.load(std::sync::atomic::Ordering::Relaxed);
        sent_uids += reports * 2048;
        peak = peak.max(rss_kib(pid));
        println!("round {round}: {reports} reports sent, hub said {verdict:?}");
        cuts.push(verdict.is_some_and(|s| {
            s.code() == tonic::Code::ResourceExhausted && s.message().contains("session cut")
        }));
    }
    let flood_secs = flood_started.elapsed().as_secs_f64();
    // Meanwhile and after: the good device's pods keep starting and reporting.
    rig.create_pod(rig::sleeper("during", &good)).await;
    let flowing = rig.wait_running(&["steady", "during"], WAIT).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_kib(pid);
    let hub_alive = rig.hub_running();
    let dropped = hub_metric(ops, "device_input_dropped_total{reason=\"pod_not_bound\"}")
        .await
        .unwrap_or(0.0);
    let cut_metric = hub_metric(ops, "device_sessions_cut_over_budget_total")
        .await
        .unwrap_or(0.0);
    let hub_log = std::fs::read_to_string(rig.hub_log()).unwrap_or_default();
    let logged = hub_log
        .lines()
        .any(|l| l.contains("more than its input budget; session cut") && l.contains(&flooder));
    let growth_kib = after.saturating_sub(before);
    // "A few MiB": the flood's transient buffers, not anything per UID.
    let bounded = growth_kib < 8 * 1024;
    let all_cut = cuts.iter().all(|c| *c);
    println!(
        "flood: {sent_uids} made-up UIDs in {rounds} sessions over {flood_secs:.1} s; hub RSS {before} KiB before, {peak} KiB peak, {after} KiB after; dropped {dropped}; sessions cut {cut_metric}"
    );
    record(Outcome {
        fault: "device floods status reports for made-up pod UIDs".into(),
        recovered: bounded && all_cut && flowing && hub_alive && logged,
        converge_secs: None,
        pods_lost: u32::from(!flowing),
        pods_duplicated: 0,
        detail: format!(
            "{sent_uids} UIDs in {rounds} sessions ({flood_secs:.0} s), each cut over budget: {all_cut}; hub RSS {before} -> {after} KiB (+{growth_kib} KiB, peak {peak}); other device's pods Running: {flowing}; {dropped} entries dropped"
        ),
    });
    assert!(hub_alive, "the hub survived\n{}", rig.logs());
    assert!(all_cut, "every flooding session is cut: {cuts:?}");
    assert!(logged, "the cut is logged naming the device");
    assert!(flowing, "the other device's pods run\n{}", rig.logs());
    assert!(
        bounded,
        "hub RSS grew {growth_kib} KiB ({before} -> {after}) under the flood"
    );
    assert!(sent_uids >= 1_000_000, "the flood sent {sent_uids} UIDs");
}

#[tokio::test]
async fn a_pod_whose_config_maps_cannot_fit_fails_alone_and_daemonsets_stay_off_devices() {
    let rig = Rig::start("tr-fit", 1).await;
    let dev = rig.devices()[0].clone();
    let client = rig.fleet.client.clone();
    let ops = rig.fleet.hub.ports.ops;
    // ~18 MB of ConfigMaps referenced by one pod, next to a normal pod on the same device.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &rig.ns);
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for i in 0..18 {
        let name = format!("big-{i:02}");
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": name},
            "data": {"blob": "x".repeat(1_000_000)}
        }))
        .expect("cm");
        cms.create(&PostParams::default(), &cm)
            .await
            .expect("create a 1 MB ConfigMap");
        volumes.push(json!({"name": name, "configMap": {"name": name}}));
        mounts.push(json!({"name": name, "mountPath": format!("/big/{i}")}));
    }
    let mut big = rig::sleeper("too-big", &dev);
    big["spec"]["volumes"] = json!(volumes);
    big["spec"]["containers"][0]["volumeMounts"] = json!(mounts);
    rig.create_pod(big).await;
    rig.create_pod(rig::sleeper("normal", &dev)).await;
    let normal_runs = rig.wait_running(&["normal"], WAIT).await;
    let refused = wait_for("too-big Failed", 60, || async {
        rig.phase("too-big")
            .await
            .filter(|(p, r)| p == "Failed" && r == "PodBundleTooLarge")
    })
    .await;
    let message = rig
        .pods
        .get("too-big")
        .await
        .ok()
        .and_then(|p| p.status?.message)
        .unwrap_or_default();
    let events: Api<Event> = Api::all(client.clone());
    let node_event = wait_for("PodBundleTooLarge event on the Node", 30, || async {
        events
            .list(&ListParams::default().fields(&format!(
                "involvedObject.kind=Node,involvedObject.name={dev}"
            )))
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("PodBundleTooLarge"))
    })
    .await;
    let refused_metric = hub_metric(ops, "pods_refused_total{reason=\"bundle_too_large\"}").await;
    let hub_log = std::fs::read_to_string(rig.hub_log()).unwrap_or_default();
    let link_clean = !hub_log.contains("exceeds the limit");
    println!(
        "too-big: {refused:?} {message}; node event {:?}",
        node_event.message
    );
    let fit_ok = normal_runs
        && message.contains("ConfigMap big-")
        && refused_metric == Some(1.0)
        && link_clean;
    record(Outcome {
        fault: "pod referencing ~18 MB of ConfigMaps next to a normal pod".into(),
        recovered: fit_ok,
        converge_secs: None,
        pods_lost: u32::from(!normal_runs),
        pods_duplicated: 0,
        detail: format!(
            "too-big Failed/PodBundleTooLarge with a Node Event; normal pod Running: {normal_runs}; message names the ConfigMaps: {}; link never over its limit: {link_clean}",
            message.contains("ConfigMap big-")
        ),
    });
    assert!(fit_ok, "{message}\n{}", rig.logs());

    // DaemonSets: one that tolerates every taint (like kube-proxy), kept to this test's Node
    // by hostname so it touches nobody else's; one that selects the device's fleet.
    let daemonsets: Api<k8s_openapi::api::apps::v1::DaemonSet> =
        Api::namespaced(client.clone(), &rig.ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &rig.ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "proxy-creds"}, "stringData": {"token": random_hex()}
            }))
            .expect("secret"),
        )
        .await
        .expect("create secret");
    let ds = |name: &str, selector: serde_json::Value, affinity: serde_json::Value| {
        serde_json::from_value::<k8s_openapi::api::apps::v1::DaemonSet>(json!({
            "metadata": {"name": name},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "nodeSelector": selector,
                        "affinity": affinity,
                        "tolerations": [{"operator": "Exists"}],
                        "hostNetwork": true,
                        "terminationGracePeriodSeconds": 1,
                        "containers": [{"name": "c", "image": test_image(),
                            "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
                            "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "proxy-creds", "key": "token"}}}]}]
                    }
                }
            }
        }))
        .expect("daemonset")
    };
    let only_here = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [dev]}]}]}}});
    daemonsets
        .create(
            &PostParams::default(),
            &ds(
                "proxy-like",
                json!({"kubernetes.io/os": "linux"}),
                only_here,
            ),
        )
        .await
        .expect("create kube-proxy-like DaemonSet");
    daemonsets
        .create(
            &PostParams::default(),
            &ds(
                "fleet-ds",
                json!({"flightctl.io/fleet": rig.fleet.fleet}),
                json!({}),
            ),
        )
        .await
        .expect("create fleet DaemonSet");
    let pod_of = |app: &'static str| {
        let pods = rig.pods.clone();
        async move {
            pods.list(&ListParams::default().labels(&format!("app={app}")))
                .await
                .ok()?
                .items
                .into_iter()
                .next()
        }
    };
    let fleet_pod = wait_for("the fleet DaemonSet's pod Running", 90, || async {
        pod_of("fleet-ds")
            .await
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
    })
    .await;
    let proxy_pod = wait_for("the kube-proxy-like pod refused", 90, || async {
        pod_of("proxy-like").await.filter(|p| {
            p.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("DaemonSetNotForDevices")
        })
    })
    .await;
    let proxy_uid = proxy_pod.metadata.uid.clone().unwrap_or_default();
    let never_ran = rig::containers(&dev, &proxy_uid).is_empty();
    let fleet_runs =
        !rig::running(&dev, fleet_pod.metadata.uid.as_deref().unwrap_or_default()).is_empty();
    record(Outcome {
        fault: "kube-proxy-like DaemonSet next to a fleet DaemonSet".into(),
        recovered: never_ran && fleet_runs,
        converge_secs: None,
        pods_lost: u32::from(!fleet_runs),
        pods_duplicated: 0,
        detail: format!(
            "tolerate-everything DaemonSet pod Failed/DaemonSetNotForDevices, never ran on the device: {never_ran}; fleet DaemonSet pod Running there: {fleet_runs}"
        ),
    });
    assert!(never_ran && fleet_runs, "{}", rig.logs());
    let _ = daemonsets
        .delete_collection(&Default::default(), &ListParams::default())
        .await;
}

#[tokio::test]
async fn the_kubelet_endpoint_tells_an_unauthorized_caller_nothing_and_closes_idle_connections() {
    let rig = Rig::start("tr-kapi", 1).await;
    let dev = rig.devices()[0].clone();
    rig.create_pod(rig::sleeper("exists", &dev)).await;
    assert!(rig.wait_running(&["exists"], WAIT).await, "{}", rig.logs());
    let kport = kubelet_port(&rig);
    let ops = rig.fleet.hub.ports.ops;
    let stack = fleetlet_test_support::Stack::shared().expect("stack");
    let token = stack
        .service_account_token(&rig.ns, "nobody", 600)
        .await
        .expect("token");
    // The same answer for a pod that exists and one that does not.
    let existing = rig::kubelet_get_body(
        kport,
        &format!("/containerLogs/{}/exists/c", rig.ns),
        Some(&token),
    );
    let missing = rig::kubelet_get_body(
        kport,
        &format!("/containerLogs/{}/no-such-pod/c", rig.ns),
        Some(&token),
    );
    let healthz = rig::kubelet_get(kport, "/healthz", None);
    let same = existing == missing && existing.0 == 403;
    // Token reviews are cached: repeating the request costs no further TokenReview.
    let reviews = || hub_metric(ops, "api_requests_total{op=\"create_tokenreview\"}");
    let before = reviews().await.unwrap_or(0.0);
    for _ in 0..5 {
        rig::kubelet_get(kport, "/containerLogs/x/y/z", Some(&token));
    }
    let after = reviews().await.unwrap_or(0.0);
    let cached = after == before;
    // A connection that never handshakes, and one that handshakes and never sends a request,
    // are both closed.
    let started = Instant::now();
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", kport))
        .await
        .expect("connect");
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        // EOF or an error: the hub closed it.
        loop {
            match raw.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok();
    let idle_closed_after = started.elapsed().as_secs_f64();
    let silent_closed_after = rig::silent_tls_connection_lifetime(kport).await;
    println!(
        "unauthorized: existing pod {existing:?}, missing pod {missing:?}; /healthz {healthz}; token reviews {before} -> {after}; idle TCP closed {closed} after {idle_closed_after:.1} s; silent TLS closed after {silent_closed_after:?}"
    );
    let ok =
        same && healthz == 401 && cached && closed && silent_closed_after.is_some_and(|s| s < 30.0);
    record(Outcome {
        fault: "kubelet endpoint: unauthorized lookups, token cache, idle connections".into(),
        recovered: ok,
        converge_secs: None,
        pods_lost: 0,
        pods_duplicated: 0,
        detail: format!(
            "unauthorized caller: HTTP {} for an existing and {} for a missing pod (same body: {}); /healthz {healthz} without a token; 5 repeats cost {} TokenReviews; never-handshaking connection closed after {idle_closed_after:.0} s, silent TLS connection after {:.0} s",
            existing.0,
            missing.0,
            existing.1 == missing.1,
            after - before,
            silent_closed_after.unwrap_or(f64::NAN)
        ),
    });
    assert!(same, "{existing:?} vs {missing:?}");
    assert_eq!(healthz, 401);
    assert!(cached, "token reviews {before} -> {after}");
    assert!(
        closed && silent_closed_after.is_some(),
        "idle connections closed"
    );
}

#[tokio::test]
async fn a_second_hub_with_the_same_instance_name_stays_off_the_first_ones_nodes() {
    let id = unique("tr-twin");
    let dev = format!("{id}-d0");
    let kube = client().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cleanup = Cleanup {
        procs: Vec::new(),
        devices: vec![dev.clone()],
        lease: id.clone(),
        _kube: KubeCleanup {
            nodes: vec![dev.clone()],
            namespace: None,
        },
    };
    // Hub A leads on Lease <id>; hub B is a separate deployment with the same instance name and
    // the same device in its inventory, leading on Lease <id>-twin.
    let a = HubSetup::write(dir.path(), HubSpec::new(&id, &[(dev.clone(), id.clone())]));
    let b = a.replica("twin");
    let twin_lease = format!("{id}-twin");
    let b_cfg = dir.path().join("twin.toml");
    let text = std::fs::read_to_string(&b_cfg).expect("twin config");
    std::fs::write(
        &b_cfg,
        text.replace(
            &format!("name = \"{id}\""),
            &format!("name = \"{twin_lease}\""),
        ),
    )
    .expect("twin config");
    cleanup.procs.push(a.spawn());
    cleanup
        .procs
        .push(start_agent(dir.path(), &dev, a.ports.link));
    let nodes: Api<Node> = Api::all(kube.clone());
    wait_for("the Node Ready from hub A", 120, || async {
        nodes
            .get_opt(&dev)
            .await
            .ok()
            .flatten()
            .filter(harness::node_ready)
    })
    .await;
    cleanup.procs.push(b.spawn());
    wait_for("hub B reports the Node not its own", 60, || async {
        (hub_metric(b.ports.ops, "nodes_not_owned").await == Some(1.0)).then_some(())
    })
    .await;
    // Hub A keeps the Node: its Lease on it, Ready, heartbeats by A only.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let node = nodes.get(&dev).await.expect("node");
    let annotated = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("fleetlet.io/leader-lease"))
        .cloned();
    let kept = annotated.as_deref() == Some(&format!("fleetlet-system/{id}"))
        && harness::node_ready(&node);
    let b_log = std::fs::read_to_string(b.log()).unwrap_or_default();
    let logged = b_log
        .lines()
        .any(|l| l.contains("two hub deployments share one instance name") && l.contains(&dev));
    kubectl_best_effort(&[
        "-n",
        "fleetlet-system",
        "delete",
        "lease",
        &twin_lease,
        "--ignore-not-found",
    ]);
    record(Outcome {
        fault: "two hub deployments with the same instance name".into(),
        recovered: kept && logged,
        converge_secs: None,
        pods_lost: 0,
        pods_duplicated: 0,
        detail: format!(
            "the second hub saw the first one's live Lease on the Node and stayed off (nodes_not_owned 1, error logged {logged}); Node kept by the first: {kept} (lease annotation {annotated:?})"
        ),
    });
    assert!(kept, "hub A keeps its Node: {node:?}");
    assert!(logged, "hub B logs the shared instance name");
    drop(cleanup);
}

#[tokio::test]
async fn a_device_cannot_point_its_pods_at_addresses_it_does_not_have() {
    let mut rig = Rig::start("tr-addr", 1).await;
    let dev = rig.devices()[0].clone();
    // A pod on the device's bridge network: its podIP is from the pod network the agent
    // announced (Podman's default network).
    let mut web = rig::sleeper("web", &dev);
    web["spec"]["hostNetwork"] = json!(false);
    let uid = rig.create_pod(web).await;
    assert!(rig.wait_running(&["web"], WAIT).await, "{}", rig.logs());
    let pod_ip = |rig: &Rig| {
        let pods = rig.pods.clone();
        async move {
            pods.get("web")
                .await
                .ok()
                .and_then(|p| p.status)
                .and_then(|s| s.pod_ip)
        }
    };
    let real_ip = wait_for("web's podIP", 60, || pod_ip(&rig)).await;
    // The device's certificate now claims the pod moved to a cluster Service address.
    rig.kill_agent(&dev);
    let mut client = link_client(rig.dir(), &dev, rig.link_port()).await;
    let forged = rig::message(agent_message::Kind::PodStatus(v1::PodStatusReport {
        full: false,
        pods: vec![v1::PodStatusEntry {
            uid: uid.clone(),
            namespace: rig.ns.clone(),
            name: "web".into(),
            status_json: Bytes::from(
                json!({"phase": "Running", "podIP": "10.96.0.10", "podIPs": [{"ip": "10.96.0.10"}],
                       "nominatedNodeName": "elsewhere"})
                .to_string(),
            ),
            removed: false,
        }],
    }));
    let verdict = rig::send_as(
        &mut client,
        vec![rig::hello(&dev), forged],
        Duration::from_secs(3),
    )
    .await;
    // Past the status writer's coalescing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = pod_ip(&rig).await;
    let nominated = rig
        .pods
        .get("web")
        .await
        .ok()
        .and_then(|p| p.status)
        .and_then(|s| s.nominated_node_name);
    let hub_log = std::fs::read_to_string(rig.hub_log()).unwrap_or_default();
    let logged = hub_log.lines().any(|l| {
        l.contains("impossible pod status") && l.contains("neither an address the device announced")
    });
    rig.start_agent(&dev);
    let kept = after.as_deref() == Some(real_ip.as_str()) && nominated.is_none();
    println!(
        "forged podIP: hub said {verdict:?}; podIP {real_ip} -> {after:?}; nominatedNodeName {nominated:?}; logged {logged}"
    );
    record(Outcome {
        fault: "device reports its pod at an address it does not have".into(),
        recovered: kept && logged,
        converge_secs: None,
        pods_lost: 0,
        pods_duplicated: 0,
        detail: format!(
            "bridge pod at {real_ip} (announced pod network); a status claiming 10.96.0.10 and a nominatedNodeName was not written (podIP now {after:?}), logged: {logged}"
        ),
    });
    assert!(
        kept,
        "podIP {real_ip} -> {after:?}, nominated {nominated:?}"
    );
    assert!(logged, "the hub logs the refused status");
}
