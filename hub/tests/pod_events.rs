//! Events like the kubelet's, end to end: real `fleetlet-agent`s on the stack's Podman, the real
//! `fleetlet-hub` (under its shipped RBAC) and the real kube-apiserver. What a pod's life
//! produces is read back from the Events API and with `kubectl get events`.
//!
//! Needs `make env-up` and the agent binary next to the hub's (`cargo build -p fleetlet-agent`).

use std::time::Duration;

use fleetlet_faults::fixture::Fleet;
use fleetlet_proto::v1::{self, agent_message, device_link_client::DeviceLinkClient};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

mod common;
use common::{free_port, hub_metric, kubectl, wait_for};

const IMAGE: &str = "localhost/fleetlet-test/busybox:1";

async fn create_pod(fleet: &Fleet, node: &str, name: &str, mut spec: Value) -> String {
    spec["nodeName"] = json!(node);
    spec["tolerations"] = json!([{"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "fleetlet", "effect": "NoSchedule"}]);
    let pod: Pod =
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("pod");
    let created = fleet
        .pods()
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    created.metadata.uid.expect("uid")
}

/// The Events of pod `uid`, as the events.k8s.io/v1 API shows them.
async fn events_of(events: &Api<Event>, uid: &str) -> Vec<Event> {
    events
        .list(&Default::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.uid.as_deref()) == Some(uid))
                .collect()
        })
        .unwrap_or_default()
}

fn reason(e: &Event) -> &str {
    e.reason.as_deref().unwrap_or_default()
}

fn note(e: &Event) -> &str {
    e.note.as_deref().unwrap_or_default()
}

fn count(e: &Event) -> i32 {
    e.series.as_ref().map_or(1, |s| s.count)
}

fn field_path(e: &Event) -> &str {
    e.regarding
        .as_ref()
        .and_then(|r| r.field_path.as_deref())
        .unwrap_or_default()
}

/// Waits until pod `uid` has an Event with `reason` whose note satisfies `pred`; returns it.
async fn wait_event(
    events: &Api<Event>,
    uid: &str,
    what: &str,
    reason_is: &str,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    wait_for(what, 120, || async {
        events_of(events, uid)
            .await
            .into_iter()
            .find(|e| reason(e) == reason_is && pred(e))
    })
    .await
}

fn summary(list: &[Event]) -> String {
    list.iter()
        .map(|e| {
            format!(
                "{} {} x{} [{}] {}",
                e.type_.as_deref().unwrap_or_default(),
                reason(e),
                count(e),
                field_path(e),
                note(e)
            )
        })
        .collect::<Vec<_>>()
        .join("\n  ")
}

/// A gRPC client of the hub's link holding `device`'s certificate from the test PKI.
async fn link_client(fleet: &Fleet, device: &str) -> DeviceLinkClient<Channel> {
    let dir = fleet.dir();
    let read = |name: String| std::fs::read(dir.join(name)).expect("PKI file");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("link-ca.crt".into())))
        .identity(Identity::from_pem(
            read(format!("{device}.crt")),
            read(format!("{device}.key")),
        ))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{}", fleet.hub.ports.link))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect to the hub's link");
    DeviceLinkClient::new(channel)
}

/// A normal pod, a crash loop, a failing readiness probe, a missing ConfigMap (volume and
/// env), a failing pull, a field the agent refuses, and a device that tries to write Events
/// about another device's pod.
#[tokio::test]
async fn a_pods_life_shows_the_kubelets_events() {
    let mut fleet = Fleet::start("podev", 2, |_| {}, |_| {}).await;
    let (d0, d1) = (fleet.devices[0].clone(), fleet.devices[1].clone());
    let events: Api<Event> = Api::namespaced(fleet.client.clone(), &fleet.id);
    let closed_port = free_port();
    let web = create_pod(
        &fleet,
        &d0,
        "web",
        json!({"containers": [{"name": "app", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
            "command": ["sh", "-c", "exec sleep 3600"],
            "readinessProbe": {"tcpSocket": {"host": "127.0.0.1", "port": closed_port},
                               "periodSeconds": 1}}]}),
    )
    .await;
    let crash = create_pod(
        &fleet,
        &d0,
        "crash",
        json!({"containers": [{"name": "app", "image": IMAGE, "command": ["sh", "-c", "exit 1"]}]}),
    )
    .await;
    let live = create_pod(
        &fleet,
        &d0,
        "live",
        json!({"containers": [{"name": "app", "image": IMAGE,
            "command": ["sh", "-c", "exec sleep 3600"],
            "livenessProbe": {"tcpSocket": {"host": "127.0.0.1", "port": closed_port},
                              "periodSeconds": 1, "failureThreshold": 2}}]}),
    )
    .await;
    let nocm = create_pod(
        &fleet,
        &d0,
        "nocm",
        json!({"volumes": [{"name": "cfg", "configMap": {"name": "missing"}}],
               "containers": [{"name": "app", "image": IMAGE, "command": ["sleep", "3600"],
                               "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]}]}),
    )
    .await;
    let noenv = create_pod(
        &fleet,
        &d0,
        "noenv",
        json!({"containers": [{"name": "app", "image": IMAGE, "command": ["sleep", "3600"],
            "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k"}}}]}]}),
    )
    .await;
    let pullfail = create_pod(
        &fleet,
        &d0,
        "pullfail",
        json!({"containers": [{"name": "app", "image": "localhost/fleetlet-test/nonexistent:1",
                               "imagePullPolicy": "IfNotPresent"}]}),
    )
    .await;
    let refused = create_pod(
        &fleet,
        &d0,
        "refused",
        json!({"volumes": [{"name": "t", "projected": {"sources": [
                  {"serviceAccountToken": {"path": "token"}}]}}],
               "containers": [{"name": "app", "image": IMAGE}]}),
    )
    .await;

    // A normal start: Pulled (present), Created, Started at the container, from the device's
    // "kubelet".
    let started = wait_event(&events, &web, "web Started", "Started", |_| true).await;
    assert_eq!(note(&started), "Container started");
    assert_eq!(field_path(&started), "spec.containers{app}");
    assert_eq!(started.reporting_controller.as_deref(), Some("kubelet"));
    assert_eq!(started.reporting_instance.as_deref(), Some(d0.as_str()));
    assert!(
        started
            .metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("web.")),
        "named like client-go names Events: {:?}",
        started.metadata.name
    );
    let pulled = wait_event(&events, &web, "web Pulled", "Pulled", |_| true).await;
    assert_eq!(
        note(&pulled),
        format!(
            "Container image \"{IMAGE}\" already present on machine and can be accessed by the pod"
        )
    );
    wait_event(&events, &web, "web Created", "Created", |e| {
        note(e) == "Container created"
    })
    .await;
    // The readiness probe fails: Unhealthy, one Event object with a rising count.
    let unhealthy = wait_event(&events, &web, "web Unhealthy x3", "Unhealthy", |e| {
        count(e) >= 3
    })
    .await;
    assert_eq!(
        note(&unhealthy),
        format!(
            "Readiness probe failed: dial tcp 127.0.0.1:{closed_port}: connect: connection refused"
        )
    );
    assert_eq!(unhealthy.type_.as_deref(), Some("Warning"));

    // A failing liveness probe: Unhealthy, then the kubelet's Killing.
    wait_event(&events, &live, "live Unhealthy", "Unhealthy", |e| {
        note(e).starts_with("Liveness probe failed: dial tcp 127.0.0.1:")
    })
    .await;
    wait_event(&events, &live, "live Killing", "Killing", |e| {
        note(e) == "Container app failed liveness probe, will be restarted"
    })
    .await;

    // The crash loop: BackOff aggregated into one Event object whose series counts.
    let backoff = wait_event(&events, &crash, "crash BackOff x2", "BackOff", |e| {
        count(e) >= 2
    })
    .await;
    assert_eq!(
        note(&backoff),
        format!(
            "Back-off restarting failed container app in pod crash_{}({crash})",
            fleet.id
        )
    );
    assert!(backoff.series.as_ref().is_some_and(|s| s.count >= 2));
    let crash_events = events_of(&events, &crash).await;
    let objects = |r: &str| crash_events.iter().filter(|e| reason(e) == r).count();
    assert_eq!(
        (objects("BackOff"), objects("Started"), objects("Created")),
        (1, 1, 1),
        "one Event object per kind, counted: {}",
        summary(&crash_events)
    );

    // A missing ConfigMap: the volume manager's FailedMount, and the env's config error.
    let mount = wait_event(&events, &nocm, "nocm FailedMount", "FailedMount", |_| true).await;
    assert!(
        note(&mount).starts_with("MountVolume.SetUp failed for volume \"cfg\" : "),
        "{}",
        note(&mount)
    );
    let config = wait_event(&events, &noenv, "noenv Failed", "Failed", |_| true).await;
    assert!(note(&config).starts_with("Error: "), "{}", note(&config));
    assert_eq!(config.type_.as_deref(), Some("Warning"));

    // A pull that fails: Pulling, Failed, then the image pull back-off.
    wait_event(&events, &pullfail, "pullfail Pulling", "Pulling", |e| {
        note(e) == "Pulling image \"localhost/fleetlet-test/nonexistent:1\""
    })
    .await;
    wait_event(
        &events,
        &pullfail,
        "pullfail Failed to pull",
        "Failed",
        |e| note(e).starts_with("Failed to pull image \"localhost/fleetlet-test/nonexistent:1\": "),
    )
    .await;
    wait_event(&events, &pullfail, "pullfail ErrImagePull", "Failed", |e| {
        note(e) == "Error: ErrImagePull"
    })
    .await;
    wait_event(&events, &pullfail, "pullfail back-off", "BackOff", |e| {
        note(e) == "Back-off pulling image \"localhost/fleetlet-test/nonexistent:1\""
    })
    .await;

    // A field the agent does not support: a Warning with the status's reason.
    let unsupported = wait_event(
        &events,
        &refused,
        "UnsupportedPodSpec",
        "UnsupportedPodSpec",
        |_| true,
    )
    .await;
    assert_eq!(unsupported.type_.as_deref(), Some("Warning"));
    assert!(
        note(&unsupported).contains("serviceAccountToken"),
        "{}",
        note(&unsupported)
    );

    // kubectl shows them like a kubelet's.
    let (_, table, _) = kubectl(&[
        "get",
        "events",
        "-n",
        &fleet.id,
        "--field-selector",
        "involvedObject.name=crash",
    ]);
    println!("kubectl get events (crash):\n{table}");
    assert!(
        table.contains("BackOff") && table.contains("Started"),
        "{table}"
    );
    let (_, described, _) = kubectl(&["describe", "pod", "crash", "-n", &fleet.id]);
    let events_part = described
        .split_once("Events:")
        .map(|(_, e)| e.to_owned())
        .unwrap_or_default();
    println!("kubectl describe pod crash, Events:{events_part}");
    assert!(
        events_part
            .lines()
            .any(|l| l.contains("BackOff") && l.contains("kubelet")),
        "describe shows the Events from the kubelet: {events_part}"
    );
    for (name, uid) in [
        ("web", &web),
        ("crash", &crash),
        ("live", &live),
        ("nocm", &nocm),
        ("noenv", &noenv),
        ("pullfail", &pullfail),
        ("refused", &refused),
    ] {
        println!("{name}:\n  {}", summary(&events_of(&events, uid).await));
    }

    // Deleting a pod stops its containers: Killing, as the kubelet says it.
    fleet
        .pods()
        .delete("web", &Default::default())
        .await
        .expect("delete web");
    wait_event(&events, &web, "web Killing", "Killing", |e| {
        note(e) == "Stopping container app" && field_path(e) == "spec.containers{app}"
    })
    .await;

    // The agent's start is an Event on its Node, in `default` like the kubelet's.
    let node_events: Api<Event> = Api::namespaced(fleet.client.clone(), "default");
    let starting = wait_for("a Starting Event on the Node", 60, || async {
        node_events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                reason(e) == "Starting"
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(d0.as_str())
            })
    })
    .await;
    assert_eq!(note(&starting), "Starting fleetlet-agent.");
    assert_eq!(
        starting.regarding.as_ref().and_then(|r| r.kind.as_deref()),
        Some("Node")
    );
    assert_eq!(starting.reporting_instance.as_deref(), Some(d0.as_str()));

    // Device d1 claims Events about d0's pod and about a made-up one: refused, nothing written.
    fleet.kill_agent(1);
    let ops = fleet.hub.ports.ops;
    let not_bound = "device_events_total{reason=\"not_bound\"}";
    let before = hub_metric(ops, not_bound).await.unwrap_or(0.0);
    let forged = |id: u64, uid: &str| v1::DeviceEvent {
        id,
        pod_uid: uid.into(),
        field_path: String::new(),
        r#type: "Warning".into(),
        reason: "Forged".into(),
        message: "written by another device".into(),
        count: 1,
        first_micros: 1,
        last_micros: 1,
    };
    let messages = vec![
        v1::AgentMessage {
            kind: Some(agent_message::Kind::Hello(v1::Hello {
                device_name: d1.clone(),
                ..Default::default()
            })),
        },
        v1::AgentMessage {
            kind: Some(agent_message::Kind::Events(v1::EventBatch {
                epoch: 1,
                seq: 1,
                events: vec![
                    forged(1, &web),
                    forged(2, "00000000-0000-0000-0000-000000000000"),
                ],
                dropped_total: 0,
            })),
        },
    ];
    let mut client = link_client(&fleet, &d1).await;
    let outbound = futures::stream::iter(messages).chain(futures::stream::pending());
    let response = client.connect(outbound).await.expect("stream");
    let mut inbound = response.into_inner();
    // The hub takes the batch (it acknowledges it) but writes nothing of it.
    let acked = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match inbound.message().await {
                Ok(Some(v1::HubMessage {
                    kind: Some(v1::hub_message::Kind::EventAck(a)),
                })) => return a,
                Ok(Some(_)) => continue,
                other => panic!("the hub ended the forged stream: {other:?}"),
            }
        }
    })
    .await
    .expect("the forged batch acknowledged");
    assert_eq!((acked.epoch, acked.seq), (1, 1));
    let after = wait_for("the refusals counted", 30, || async {
        let n = hub_metric(ops, not_bound).await?;
        (n >= before + 2.0).then_some(n)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = events.list(&Default::default()).await.expect("events");
    assert!(
        all.items.iter().all(|e| reason(e) != "Forged"),
        "no Event written for a pod that is not the device's"
    );
    println!("forged Events from {d1}: refused (not_bound {before} -> {after})");
}

/// Events that happen while the device cannot reach the hub wait on the device and arrive once
/// the hub is back, as the same Event objects with higher counts.
#[tokio::test]
async fn events_made_while_the_hub_is_away_arrive_when_it_returns() {
    let mut fleet = Fleet::start("evcut", 1, |_| {}, |_| {}).await;
    let d0 = fleet.devices[0].clone();
    let events: Api<Event> = Api::namespaced(fleet.client.clone(), &fleet.id);
    let crash = create_pod(
        &fleet,
        &d0,
        "crash",
        json!({"containers": [{"name": "app", "image": IMAGE, "command": ["sh", "-c", "exit 1"]}]}),
    )
    .await;
    let first = wait_event(&events, &crash, "crash Started", "Started", |_| true).await;
    let before = count(&first);
    fleet.kill_hub();
    // The container keeps crashing and restarting (back-off 10 s, then 20 s) meanwhile.
    tokio::time::sleep(Duration::from_secs(35)).await;
    fleet.restart_hub();
    let after = wait_event(
        &events,
        &crash,
        "Started counted past the cut",
        "Started",
        |e| count(e) > before + 1,
    )
    .await;
    let list = events_of(&events, &crash).await;
    let started = list.iter().filter(|e| reason(e) == "Started").count();
    println!(
        "Started x{before} before the hub went away, x{} after it returned; {started} Started Event object(s):\n  {}",
        count(&after),
        summary(&list)
    );
    assert_eq!(started, 1, "the same Event object, updated");
    assert_eq!(after.metadata.name, first.metadata.name);
}

/// A device whose Event buffer overflows while the hub is away drops the oldest Events and
/// says how many: a Warning on its Node and a count on the hub's `/metrics`.
#[tokio::test]
async fn an_overflowing_device_buffer_drops_the_oldest_and_reports_the_count() {
    let mut fleet = Fleet::start(
        "evdrop",
        1,
        |_| {},
        |a| a.extra_config = "events_buffer = 2".into(),
    )
    .await;
    let d0 = fleet.devices[0].clone();
    let events: Api<Event> = Api::namespaced(fleet.client.clone(), &fleet.id);
    // Three pods that each record an Unhealthy Warning every second once their probe starts
    // (25 s after the start, after the start-up burst): three Events
    // changing all the time during the cut, one more than the device keeps. (Crash loops were
    // used before: their back-off, 40 s by the time a slow machine got to the cut, could leave
    // the cut quiet.)
    let mut uids = Vec::new();
    for name in ["c1", "c2", "c3"] {
        uids.push(
            create_pod(
                &fleet,
                &d0,
                name,
                json!({"containers": [{"name": "app", "image": IMAGE,
                    "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
                    "readinessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1, "initialDelaySeconds": 25}}]}),
            )
            .await,
        );
    }
    // Running, as the API shows it (not their Started Events: a buffer this small may drop
    // those in the start-up burst on a loaded machine).
    let pods = fleet.pods();
    wait_for("the pods Running", 120, || async {
        for name in ["c1", "c2", "c3"] {
            let p = pods.get(name).await.ok()?;
            (p.status?.phase.as_deref() == Some("Running")).then_some(())?;
        }
        Some(())
    })
    .await;
    // A buffer this small may already have overflowed in the start-up burst (Pulled, Created,
    // Started of two pods at once); the drops the device reported so far, as its total:
    let ops = fleet.hub.ports.ops;
    let metric = "device_events_total{reason=\"dropped_on_device\"}";
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = hub_metric(ops, metric).await.unwrap_or(0.0);
    fleet.kill_hub();
    // Three Unhealthy Events change every second meanwhile; the device keeps two.
    tokio::time::sleep(Duration::from_secs(35)).await;
    fleet.restart_hub();
    // The restarted hub counts the device's total afresh: more than before the cut.
    let dropped = wait_for("the device's drop count on /metrics", 90, || async {
        let n = hub_metric(ops, metric).await?;
        (n > before).then_some(n)
    })
    .await;
    let all: Api<Event> = Api::all(fleet.client.clone());
    let warning = wait_for("an EventsDropped Warning on the Node", 60, || async {
        all.list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                // The one the restarted hub published: its total is past the pre-cut one.
                let total = note(e)
                    .rsplit_once("; ")
                    .and_then(|(_, t)| t.split_once(' '))
                    .and_then(|(n, _)| n.parse::<f64>().ok());
                reason(e) == "EventsDropped"
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(d0.as_str())
                    && total.is_some_and(|t| t > before)
            })
    })
    .await;
    println!(
        "dropped on the device: {before} before the cut, {dropped} in all after it; Node Warning: {}",
        note(&warning)
    );
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(note(&warning).contains("dropped"), "{}", note(&warning));
    // What the device kept arrived.
    for uid in &uids {
        println!("  {}", summary(&events_of(&events, uid).await));
    }
}
