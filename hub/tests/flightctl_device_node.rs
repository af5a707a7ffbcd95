//! A device enrolled in the real Flightctl, end to end: its fleetlet client certificate comes from
//! Flightctl's device-svc-client signer through the CSR API (tests/env/flightctl/device-cert.sh),
//! the real hub takes its inventory from Flightctl and trusts the signer CA for the link, a real
//! agent connects with that certificate, the device's Node turns Ready and a pod runs in Podman.
//! Then, against the same real server: a certificate cannot act as another device; Flightctl's
//! device summary and lastSeen show as the FlightctlDeviceHealthy condition and a Rebooting report
//! takes Ready to False; a relabel moves the Node to another fleet; labels Kubernetes would not
//! take are reported; a Flightctl outage leaves the Node alone.
//!
//! Needs `make env-up` and the agent binary next to the hub's (`cargo build -p fleetlet-agent`).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::json;

mod common;
use common::flightctl::{
    DeviceCerts, FlightctlCleanup, Report, create, device_certs, device_heartbeat, env, fleet,
    hub_token_file, relay_to, report_status, set_device_labels,
};
use common::{
    AgentSetup, AgentSpec, HubSetup, HubSpec, KubeCleanup, Proc, client, create_namespace,
    node_condition, node_ready, podman, remove_device_containers, unique, wait_for,
};
use fleetlet_test_support::Stack;

fn label<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

fn log_has(path: &Path, needles: &[&str]) -> bool {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .any(|l| needles.iter().all(|n| l.contains(n)))
}

/// Starts a real agent of `device` in `dir` presenting `cert`/`key`.
fn agent(dir: &Path, device: &str, link_port: u16, cert: &Path, key: &Path) -> Proc {
    let mut spec = AgentSpec::new(device, link_port);
    spec.cert = Some((cert.to_path_buf(), key.to_path_buf()));
    AgentSetup::write(dir, spec).spawn()
}

/// Removes the devices' Podman containers on drop.
struct Containers(Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        for d in &self.0 {
            remove_device_containers(d);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flightctl_enrolled_device_runs_pods_and_its_node_follows_flightctl() {
    let stack = Stack::shared().expect("local stack (make env-up)");
    let _logs = stack.logs_on_failure();
    let fc = env(stack);
    let run = unique("fdn");
    // Enrolled device names are fingerprints in Flightctl: 16+ characters.
    let tag = run.replace('-', "");
    let (dev_a, dev_b) = (format!("fleetlet{tag}a"), format!("fleetlet{tag}b"));
    let (fleet_a, fleet_b) = (format!("{run}-a"), format!("{run}-b"));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut flightctl_cleanup = FlightctlCleanup {
        admin: fc.admin.clone(),
        objects: Vec::new(),
        csr_prefixes: vec![format!("enroll-{dev_a}-"), format!("enroll-{dev_b}-")],
    };
    for dev in [&dev_a, &dev_b] {
        for kind in ["devices", "enrollmentrequests"] {
            flightctl_cleanup
                .objects
                .push((kind.to_owned(), dev.clone()));
        }
        flightctl_cleanup.objects.push((
            "certificatesigningrequests".to_owned(),
            format!("fleetlet-{dev}"),
        ));
    }
    for f in [&fleet_a, &fleet_b] {
        flightctl_cleanup.objects.push(("fleets".into(), f.clone()));
    }
    let _kube_cleanup = KubeCleanup {
        nodes: vec![dev_a.clone(), dev_b.clone()],
        namespace: Some(run.clone()),
    };
    let _containers = Containers(vec![dev_a.clone(), dev_b.clone()]);

    // 1. Each device enrolls and gets its fleetlet certificate from Flightctl's signer.
    let certs_a: DeviceCerts = device_certs(&dev_a, &d.join("certs-a"));
    let certs_b: DeviceCerts = device_certs(&dev_b, &d.join("certs-b"));
    for (dev, certs) in [(&dev_a, &certs_a), (&dev_b, &certs_b)] {
        let pem = std::fs::read(&certs.cert).expect("device cert");
        let der = {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::CertificateDer::from_pem_slice(&pem).expect("a PEM certificate")
        };
        let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("X.509");
        let cn = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .expect("CN");
        assert_eq!(cn, format!("fleetlet-{dev}"));
        // Flightctl's signer also writes the device fingerprint (its name) into its extension,
        // which the hub checks against the CN.
        assert_eq!(
            fleetlet_hub::link::flightctl_fingerprint(&x509).expect("extension readable"),
            Some(dev.clone())
        );
    }

    // Fleets, and labels: A also carries labels a Node cannot take as they are.
    create(&fc.admin, "fleets", fleet(&fleet_a, &fleet_a)).await;
    create(&fc.admin, "fleets", fleet(&fleet_b, &fleet_b)).await;
    let labels_a = json!({"fleetlet-run": run, "fleetlet-test-fleet": fleet_a, "site": "lab",
        "kubernetes.io/hostname": "spoofed", "type": "spoof"});
    set_device_labels(&fc.admin, &dev_a, labels_a.clone()).await;
    set_device_labels(
        &fc.admin,
        &dev_b,
        json!({"fleetlet-run": run, "fleetlet-test-fleet": fleet_a}),
    )
    .await;
    // A heartbeat from A's flightctl-agent, so Flightctl has a lastSeen for it.
    device_heartbeat(&fc, &certs_a, &dev_a);

    // 2. The real hub: Flightctl inventory (through a relay the test can cut) as a ServiceAccount
    // with only the rights the hub needs; the link trusts Flightctl's signer CA and maps the
    // certificate's CN fleetlet-<name> to the Flightctl device <name>.
    let relay = relay_to(&fc.api_url).await;
    let hub_token = hub_token_file(d);
    let inventory = format!(
        r#"[inventory.flightctl]
api_url = "https://{relay}"
ca_file = "{ca}"
token_file = "{token}"
enabled_selector = "fleetlet-run={run}"
poll_interval_secs = 1
max_backoff_secs = 2
request_timeout_secs = 5
last_seen_interval_secs = 1"#,
        relay = relay.addr,
        ca = fc.ca_file,
        token = hub_token.display(),
    );
    let mut spec = HubSpec::new(&run, &[]);
    spec.inventory = Some(inventory);
    spec.client_ca_file = Some(fc.signer_ca_file.clone().into());
    spec.identity_prefix = "fleetlet-".into();
    let hub_setup = HubSetup::write(d, spec);
    let _hub = hub_setup.spawn();
    let ports = &hub_setup.ports;
    let hub_log = d.join("hub.log");
    let _agent_a = agent(d, &dev_a, ports.link, &certs_a.cert, &certs_a.key);

    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let node_a = wait_for("device A's Node Ready from its real agent", 120, || async {
        let n = nodes.get(&dev_a).await.ok()?;
        node_ready(&n).then_some(n)
    })
    .await;
    println!("node {dev_a}: labels {:?}", node_a.metadata.labels.as_ref());
    assert_eq!(label(&node_a, "flightctl.io/fleet"), Some(fleet_a.as_str()));
    assert_eq!(label(&node_a, "site"), Some("lab"));
    assert_eq!(
        label(&node_a, "kubernetes.io/hostname"),
        Some(dev_a.as_str())
    );
    assert_eq!(label(&node_a, "type"), Some("virtual-kubelet"));

    // Labels a Node cannot take: a log line and a Warning Event naming device and label.
    assert!(
        log_has(&hub_log, &[&dev_a, "kubernetes.io/hostname", "dropped"]),
        "hub logs the dropped label"
    );
    assert!(
        log_has(&hub_log, &[&dev_a, "type", "overridden"]),
        "hub logs the overridden label"
    );
    let events: Api<Event> = Api::all(client.clone());
    let event = wait_for("InvalidDeviceLabels event on A's Node", 30, || {
        node_event(&events, &dev_a, "InvalidDeviceLabels")
    })
    .await;
    let note = event.message.unwrap_or_default();
    println!("event InvalidDeviceLabels: {note}");
    assert!(
        note.contains("kubernetes.io/hostname") && note.contains(&dev_a),
        "{note}"
    );

    // 3. A pod bound to A's Node runs in Podman.
    create_namespace(&client, &run).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &run);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {
            "nodeName": dev_a,
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Equal",
                             "value": "fleetlet", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": stack.test_image(),
                            "command": ["sh", "-c", "exec sleep 3600"]}]
        }
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    wait_for("pod Running on A", 120, || async {
        let p = pods.get("app").await.ok()?;
        (p.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    let in_podman = podman(&[
        "ps",
        "--filter",
        "status=running",
        "--filter",
        &format!("label=io.fleetlet.device={dev_a}"),
        "--format",
        "{{.Names}} {{.Status}}",
    ]);
    println!("running podman containers of {dev_a}:\n{in_podman}");
    assert!(in_podman.contains("-app "), "{in_podman}");

    // 4. A certificate acts only for its own device. A's certificate claiming B is refused, and
    // so is B's management certificate (same CA, CN device:<name>: not a fleetlet identity).
    let impostor_dir = d.join("impostor");
    std::fs::create_dir_all(&impostor_dir).expect("dir");
    std::fs::copy(d.join("link-ca.crt"), impostor_dir.join("link-ca.crt")).expect("ca");
    let impostor = agent(
        &impostor_dir,
        &dev_b,
        ports.link,
        &certs_a.cert,
        &certs_a.key,
    );
    wait_for("hub refuses A's certificate naming B", 30, || async {
        log_has(&hub_log, &["hello names another device", &dev_a, &dev_b]).then_some(())
    })
    .await;
    drop(impostor);
    let mgmt_dir = d.join("management");
    std::fs::create_dir_all(&mgmt_dir).expect("dir");
    std::fs::copy(d.join("link-ca.crt"), mgmt_dir.join("link-ca.crt")).expect("ca");
    let management = agent(
        &mgmt_dir,
        &dev_b,
        ports.link,
        &certs_b.management_cert,
        &certs_b.management_key,
    );
    wait_for("hub refuses B's management certificate", 30, || async {
        log_has(
            &hub_log,
            &[
                "no usable identity",
                "does not start with the configured prefix",
            ],
        )
        .then_some(())
    })
    .await;
    drop(management);
    let node_b = nodes
        .get(&dev_b)
        .await
        .expect("B's Node exists (enabled device)");
    assert!(
        !node_ready(&node_b),
        "no session was admitted for B: {:?}",
        node_condition(&node_b, "Ready")
    );
    // B's own certificate works.
    let _agent_b = agent(d, &dev_b, ports.link, &certs_b.cert, &certs_b.key);
    wait_for(
        "device B's Node Ready with its own certificate",
        60,
        || async {
            let n = nodes.get(&dev_b).await.ok()?;
            node_ready(&n).then_some(())
        },
    )
    .await;

    // 5. Flightctl's view on the Node. lastSeen first (Flightctl saves heartbeats every 15 s).
    wait_for("Flightctl records A's lastSeen", 40, || async {
        let body = fc
            .admin
            .request(
                http::Method::GET,
                &format!("/api/v1/devices/{dev_a}/lastseen"),
                None,
            )
            .await
            .ok()?;
        (!body.is_empty()).then_some(())
    })
    .await;
    report_status(&fc, &certs_a, &dev_a, Report::Healthy).await;
    let online = wait_for("FlightctlDeviceHealthy=True/Online", 60, || async {
        let n = nodes.get(&dev_a).await.ok()?;
        let c = node_condition(&n, "FlightctlDeviceHealthy")?;
        (c.0 == "True" && c.1 == "Online" && c.2.contains("lastSeen 20")).then_some(c)
    })
    .await;
    println!("FlightctlDeviceHealthy: {online:?}");

    report_status(&fc, &certs_a, &dev_a, Report::Rebooting).await;
    let (ready, healthy) = wait_for("Ready=False/FlightctlDeviceRebooting", 60, || async {
        let n = nodes.get(&dev_a).await.ok()?;
        let ready = node_condition(&n, "Ready")?;
        (ready.0 == "False" && ready.1 == "FlightctlDeviceRebooting")
            .then(|| (ready, node_condition(&n, "FlightctlDeviceHealthy")))
    })
    .await;
    println!(
        "while Flightctl reports Rebooting: Ready {ready:?}, FlightctlDeviceHealthy {healthy:?}"
    );
    let healthy = healthy.expect("FlightctlDeviceHealthy condition");
    let going_down = wait_for("FlightctlDeviceRebooting event on A's Node", 30, || {
        node_event(&events, &dev_a, "FlightctlDeviceRebooting")
    })
    .await;
    assert_eq!(going_down.type_.as_deref(), Some("Warning"));
    assert_eq!(
        (healthy.0.as_str(), healthy.1.as_str()),
        ("False", "Rebooting")
    );
    assert!(healthy.2.contains("lastSeen 20"), "{healthy:?}");

    report_status(&fc, &certs_a, &dev_a, Report::Healthy).await;
    wait_for(
        "Ready=True again once Flightctl reports Online",
        60,
        || async {
            let n = nodes.get(&dev_a).await.ok()?;
            let ready = node_condition(&n, "Ready")?;
            let healthy = node_condition(&n, "FlightctlDeviceHealthy")?;
            (ready.0 == "True" && healthy.1 == "Online").then_some(())
        },
    )
    .await;

    report_status(&fc, &certs_a, &dev_a, Report::CpuCritical).await;
    let error = wait_for("FlightctlDeviceHealthy=False/Error", 60, || async {
        let n = nodes.get(&dev_a).await.ok()?;
        let c = node_condition(&n, "FlightctlDeviceHealthy")?;
        (c.1 == "Error").then_some(c)
    })
    .await;
    println!("with CPU critical: FlightctlDeviceHealthy {error:?}");
    // Several polls later Ready is still True: Error does not take a connected device out.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let n = nodes.get(&dev_a).await.expect("node A");
    assert_eq!(
        node_condition(&n, "Ready").map(|c| c.0),
        Some("True".to_owned()),
        "Error keeps Ready"
    );
    report_status(&fc, &certs_a, &dev_a, Report::Healthy).await;

    // 6. A relabelled into fleet B: its Node follows.
    let mut relabelled = labels_a.clone();
    relabelled["fleetlet-test-fleet"] = json!(fleet_b);
    set_device_labels(&fc.admin, &dev_a, relabelled).await;
    wait_for("A's Node moves to fleet B", 60, || async {
        let n = nodes.get(&dev_a).await.ok()?;
        (label(&n, "flightctl.io/fleet") == Some(fleet_b.as_str())
            && label(&n, "fleetlet-test-fleet") == Some(fleet_b.as_str()))
        .then_some(())
    })
    .await;

    // 7. Flightctl unreachable for a while: polls fail and are logged, the Nodes stay as they
    // are (same uid, Ready, labels) and the pod keeps running.
    let before = nodes.get(&dev_a).await.expect("node A");
    relay.cut.store(true, Ordering::SeqCst);
    wait_for("hub logs failed polls", 30, || async {
        log_has(&hub_log, &["poll failed", "unreachable"]).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = nodes
        .get(&dev_a)
        .await
        .expect("node A kept while Flightctl is down");
    assert_eq!(during.metadata.uid, before.metadata.uid, "not recreated");
    assert!(node_ready(&during), "still Ready");
    assert_eq!(
        during.metadata.labels, before.metadata.labels,
        "labels kept"
    );
    let pod_phase = pods.get("app").await.ok().and_then(|p| p.status?.phase);
    assert_eq!(pod_phase.as_deref(), Some("Running"));
    relay.cut.store(false, Ordering::SeqCst);
    wait_for("hub follows Flightctl again", 30, || async {
        log_has(&hub_log, &["Flightctl answers again"]).then_some(())
    })
    .await;
    let after = nodes.get(&dev_a).await.expect("node A");
    assert_eq!(after.metadata.uid, before.metadata.uid);

    pods.delete("app", &DeleteParams::default())
        .await
        .expect("delete pod");
    wait_for("pod gone", 60, || async {
        pods.get_opt("app").await.ok()?.is_none().then_some(())
    })
    .await;
    drop(flightctl_cleanup);
}

/// The first Event with `reason` about Node `node`.
async fn node_event(events: &Api<Event>, node: &str, reason: &str) -> Option<Event> {
    let list = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={node}")))
        .await
        .ok()?;
    list.items
        .into_iter()
        .find(|e| e.reason.as_deref() == Some(reason))
}
