//! Agentless mode against the real Flightctl server and the real kube-apiserver: a device that
//! runs only Flightctl's agent (labelled `fleetlet.io/mode=agentless`) gets the pods bound to its
//! Node as inline compose applications in its Flightctl device spec, written by the real hub
//! binary; the device's reported application status (PUT on Flightctl's agent endpoint with the
//! device's management certificate, as its flightctl-agent does) becomes the pod's status; a pod
//! compose cannot express is refused by field; deleting the pod removes its application and the
//! pod is gone once the device no longer lists it; an application of someone else in the same
//! spec is never touched.
//!
//! The device side here is the test speaking Flightctl's device API; the real flightctl-agent
//! cannot run compose applications on these machines (docs/flightctl.md). Needs `make env-up`.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};
use tokio::time::Instant;

mod common;
use common::flightctl::{
    DeviceCerts, Env, FlightctlCleanup, Report, as_device, device_certs, device_heartbeat, env,
    hub_token_file, report_status, set_device_labels,
};
use common::{
    HubSetup, HubSpec, KubeCleanup, client, create_namespace, node_ready, unique, wait_for,
};
use fleetlet_test_support::Stack;

async fn device_json(fc: &Env, device: &str) -> Value {
    let body = fc
        .admin
        .request(
            http::Method::GET,
            &format!("/api/v1/devices/{device}"),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("reading device {device}: {e}"));
    serde_json::from_slice(&body).expect("device JSON")
}

fn named<'a>(spec: &'a Value, field: &str, prefix: &str) -> Vec<&'a Value> {
    spec[field]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .collect()
}

/// Reports `apps` as the device's `status.applications` (the rest of its status kept), the way
/// its flightctl-agent does.
async fn report_apps(fc: &Env, certs: &DeviceCerts, device: &str, apps: Value) {
    let current = device_json(fc, device).await;
    let mut status = current["status"].clone();
    let healthy = apps
        .as_array()
        .is_none_or(|a| a.iter().all(|x| x["status"] == "Running"));
    status["applications"] = apps;
    status["applicationsSummary"] = json!({
        "status": if healthy { "Healthy" } else { "Degraded" },
        "info": if healthy { "" } else { "an application is not running" },
    });
    let body = json!({"apiVersion": "v1beta1", "kind": "Device",
        "metadata": {"name": device}, "status": status});
    as_device(
        fc,
        certs,
        "PUT",
        &format!("/api/v1/devices/{device}/status"),
        Some(&body),
    );
}

fn app_status(name: &str, status: &str, ready: &str, restarts: i64) -> Value {
    json!({"name": name, "appType": "compose", "embedded": false, "status": status,
        "ready": ready, "restarts": restarts})
}

fn phase(p: &Pod) -> Option<&str> {
    p.status.as_ref()?.phase.as_deref()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentless_pods_run_as_flightctl_applications() {
    let stack = Stack::shared().expect("local stack (make env-up)");
    let _logs = stack.logs_on_failure();
    let fc = env(stack);
    let run = unique("fal");
    let device = format!("fleetlet{}", run.replace('-', ""));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // A second agentless device that a Fleet owns: Flightctl lets only the fleet's template set
    // its spec, so the hub refuses its pods.
    let owned = format!("{device}owned");
    let _flightctl_cleanup = FlightctlCleanup {
        admin: fc.admin.clone(),
        objects: vec![
            ("devices".into(), owned.clone()),
            ("fleets".into(), run.clone()),
            ("devices".into(), device.clone()),
            ("enrollmentrequests".into(), device.clone()),
            (
                "certificatesigningrequests".into(),
                format!("fleetlet-{device}"),
            ),
        ],
        csr_prefixes: vec![format!("enroll-{device}-")],
    };
    let _kube_cleanup = KubeCleanup {
        nodes: vec![device.clone(), owned.clone()],
        namespace: Some(run.clone()),
    };

    // The device enrolls (management certificate to report its status with), is marked
    // agentless, and already runs an application of someone else.
    let certs = device_certs(&device, &d.join("certs"));
    set_device_labels(
        &fc.admin,
        &device,
        json!({"fleetlet-run": run, "fleetlet.io/mode": "agentless"}),
    )
    .await;
    let mut dev = device_json(&fc, &device).await;
    dev["spec"]["applications"] = json!([{"name": "theirs", "appType": "container",
        "image": "quay.io/example/theirs:1"}]);
    dev.as_object_mut().expect("object").remove("status");
    fc.admin
        .request(
            http::Method::PUT,
            &format!("/api/v1/devices/{device}"),
            Some(&dev),
        )
        .await
        .expect("someone else's application in the spec");
    device_heartbeat(&fc, &certs, &device);
    report_status(&fc, &certs, &device, Report::Healthy).await;
    common::flightctl::create(&fc.admin, "fleets", common::flightctl::fleet(&run, &run)).await;
    common::flightctl::create(
        &fc.admin,
        "devices",
        common::flightctl::device(
            &owned,
            json!({"fleetlet-run": run, "fleetlet.io/mode": "agentless", "fleetlet-test-fleet": run}),
        ),
    )
    .await;

    // The real hub on the Flightctl inventory with agentless mode, as the shipped Flightctl
    // identity with the shipped rights: hub-rbac.yaml (read) and hub-agentless-rbac.yaml
    // (`update` on devices).
    let hub_token = hub_token_file(d);
    let agentless_rbac = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/kubernetes/flightctl/hub-agentless-rbac.yaml");
    common::kubectl_ok(&[
        "apply",
        "--server-side",
        "--field-manager=fleetlet-e2e",
        "-f",
        agentless_rbac.to_str().expect("utf-8 path"),
    ]);
    let inventory = format!(
        r#"[inventory.flightctl]
api_url = "{api}"
ca_file = "{ca}"
token_file = "{token}"
enabled_selector = "fleetlet-run={run}"
poll_interval_secs = 1
request_timeout_secs = 5
last_seen_interval_secs = 0
[inventory.flightctl.agentless]
selector = "fleetlet.io/mode=agentless"
poll_interval_secs = 1"#,
        api = fc.api_url,
        ca = fc.ca_file,
        token = hub_token.display(),
    );
    let mut spec = HubSpec::new(&run, &[]);
    spec.inventory = Some(inventory);
    spec.client_ca_file = Some(fc.signer_ca_file.clone().into());
    spec.identity_prefix = "fleetlet-".into();
    let hub_setup = HubSetup::write(d, spec);
    let _hub = hub_setup.spawn();

    // Flightctl says Online: the Node is Ready without any link session.
    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(90);
    let node = loop {
        if let Some(n) = nodes.get(&device).await.ok().filter(node_ready) {
            break n;
        }
        if Instant::now() > deadline {
            let dev = device_json(&fc, &device).await;
            let log = std::fs::read_to_string(d.join("hub.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "the agentless device's Node not Ready within 90 s; Flightctl summary {}; hub log (last lines, newest first):\n{}",
                dev["status"]["summary"],
                tail.join("\n")
            );
        }
        // A flightctl-agent fetches its rendered spec all the time: Flightctl's lastSeen.
        device_heartbeat(&fc, &certs, &device);
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    println!(
        "node {device}: Ready, nodeInfo {:?}",
        node.status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .map(|i| (&i.architecture, &i.kubelet_version))
    );

    create_namespace(&client, &run).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &run);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "web-config"},
            "data": {"greeting": "hello from a ConfigMap", "index.html": "<h1>agentless</h1>"}}))
        .expect("cm"),
    )
    .await
    .expect("create ConfigMap");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &run);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "web-secret"},
                "stringData": {"token": "agentless-s3cret"}}))
            .expect("secret"),
        )
        .await
        .expect("create Secret");

    // A pod bound to the device's Node.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &run);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "nodeName": device,
            "restartPolicy": "Always",
            "tolerations": [{"operator": "Exists"}],
            "volumes": [{"name": "site", "configMap": {"name": "web-config", "items": [{"key": "index.html", "path": "index.html"}]}}],
            "containers": [{
                "name": "web",
                "image": "docker.io/library/busybox:1.36",
                "command": ["httpd", "-f", "-p", "8080", "-h", "/www"],
                "env": [
                    {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "web-config", "key": "greeting"}}},
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "web-secret", "key": "token"}}}
                ],
                "ports": [{"containerPort": 8080, "hostPort": 18080}],
                "resources": {"limits": {"cpu": "250m", "memory": "32Mi"}},
                "volumeMounts": [{"name": "site", "mountPath": "/www"}]
            }]
        }
    }))
    .expect("pod");
    let bound = Instant::now();
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let uid = created.metadata.uid.clone().expect("uid");

    // The hub writes it into the device spec: one compose application and its files.
    let app_name = wait_for("the pod's application in the device spec", 60, || async {
        let dev = device_json(&fc, &device).await;
        let apps = named(&dev["spec"], "applications", "fleetlet-");
        apps.first()
            .and_then(|a| a["name"].as_str())
            .map(str::to_owned)
    })
    .await;
    let written = bound.elapsed();
    let dev = device_json(&fc, &device).await;
    println!(
        "device spec written {:.2} s after bind: {app_name}",
        written.as_secs_f64()
    );
    assert!(
        app_name.starts_with(&format!("fleetlet-{run}-web-")),
        "{app_name}"
    );
    assert!(
        app_name.ends_with(&uid[..8]),
        "{app_name} ends with the pod uid's start"
    );
    let theirs = named(&dev["spec"], "applications", "theirs");
    assert_eq!(theirs.len(), 1, "someone else's application is kept");
    let app = named(&dev["spec"], "applications", &app_name)[0].clone();
    assert_eq!(app["appType"], "compose");
    let compose: Value = serde_json::from_str(
        app["inline"][0]["content"]
            .as_str()
            .expect("compose content"),
    )
    .expect("compose JSON");
    let web = &compose["services"]["web"];
    assert_eq!(web["image"], "docker.io/library/busybox:1.36");
    assert_eq!(
        web["entrypoint"],
        json!(["httpd", "-f", "-p", "8080", "-h", "/www"])
    );
    assert_eq!(web["environment"]["GREETING"], "hello from a ConfigMap");
    assert_eq!(web["environment"]["TOKEN"], "agentless-s3cret");
    assert_eq!(web["ports"], json!(["18080:8080/tcp"]));
    assert_eq!(web["cpus"], "0.25");
    assert_eq!(web["restart"], "always");
    let files = named(&dev["spec"], "config", &app_name);
    assert_eq!(files.len(), 1, "the pod's files as a fleetlet config entry");
    let file = &files[0]["inline"][0];
    assert!(
        file["path"]
            .as_str()
            .is_some_and(|p| p.ends_with(&format!("{app_name}/site/index.html")))
    );
    // Flightctl renders what the device's agent gets: the application is in it.
    let rendered = as_device(
        &fc,
        &certs,
        "GET",
        &format!("/api/v1/devices/{device}/rendered"),
        None,
    );
    assert!(
        rendered.contains(&app_name),
        "rendered spec holds the application"
    );

    // The device reports the application starting, then running: the pod follows.
    report_apps(
        &fc,
        &certs,
        &device,
        json!([app_status(&app_name, "Starting", "0/1", 0)]),
    )
    .await;
    let reported = Instant::now();
    report_apps(
        &fc,
        &certs,
        &device,
        json!([app_status(&app_name, "Running", "1/1", 0)]),
    )
    .await;
    let running = wait_for("the pod Running and ready", 60, || async {
        let p = pods.get("web").await.ok()?;
        let ready = p
            .status
            .as_ref()?
            .container_statuses
            .as_ref()?
            .first()?
            .ready;
        (phase(&p) == Some("Running") && ready).then_some(p)
    })
    .await;
    let to_running = bound.elapsed();
    println!(
        "agentless deploy latency: bind -> spec written {:.2} s, device report -> Running in the API {:.2} s, bind -> Running {:.2} s (device side: the test reporting at once)",
        written.as_secs_f64(),
        reported.elapsed().as_secs_f64(),
        to_running.as_secs_f64()
    );
    let cs = &running
        .status
        .as_ref()
        .expect("status")
        .container_statuses
        .as_ref()
        .expect("cs")[0];
    assert_eq!(cs.name, "web");
    assert_eq!(cs.restart_count, 0);

    // The hub's /metrics count what agentless mode did.
    let writes = common::hub_metric(hub_setup.ports.ops, "agentless_spec_writes_total")
        .await
        .unwrap_or_default();
    let requests = common::hub_metric(hub_setup.ports.ops, "agentless_flightctl_requests_total")
        .await
        .unwrap_or_default();
    println!("hub /metrics: {writes} agentless spec writes, {requests} Flightctl requests");
    assert!(
        writes >= 1.0 && requests >= 2.0,
        "{writes} writes, {requests} requests"
    );

    // An update: the ConfigMap changes, the application is replaced in the spec (same name,
    // the new value), someone else's application still there.
    cms.patch(
        "web-config",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"data": {"greeting": "hello again"}})),
    )
    .await
    .expect("update ConfigMap");
    let updated = Instant::now();
    wait_for(
        "the application replaced with the new value",
        60,
        || async {
            let dev = device_json(&fc, &device).await;
            let app = named(&dev["spec"], "applications", &app_name)
                .first()
                .cloned()?;
            let content = app["inline"][0]["content"].as_str()?.to_owned();
            let compose: Value = serde_json::from_str(&content).ok()?;
            (compose["services"]["web"]["environment"]["GREETING"] == "hello again"
                && named(&dev["spec"], "applications", "theirs").len() == 1)
                .then_some(())
        },
    )
    .await;
    println!(
        "ConfigMap update -> application replaced in the device spec {:.2} s",
        updated.elapsed().as_secs_f64()
    );

    // Logs cannot be served in this mode: the hub says why, through the API server.
    let (ok, _, err) = common::kubectl(&["-n", &run, "logs", "web"]);
    println!("kubectl logs on an agentless device: {}", err.trim());
    assert!(!ok && err.contains("agentless mode"), "{err}");

    // Restarts Flightctl reports reach restartCount.
    report_apps(
        &fc,
        &certs,
        &device,
        json!([app_status(&app_name, "Running", "1/1", 2)]),
    )
    .await;
    wait_for("restartCount 2", 30, || async {
        let p = pods.get("web").await.ok()?;
        let n = p.status?.container_statuses?.first()?.restart_count;
        (n == 2).then_some(())
    })
    .await;

    // A pod compose cannot express is refused by field and never written.
    let probed: Pod = serde_json::from_value(json!({
        "metadata": {"name": "probed"},
        "spec": {"nodeName": device, "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "c", "image": "docker.io/library/busybox:1.36",
                "livenessProbe": {"exec": {"command": ["true"]}}}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &probed)
        .await
        .expect("create probed pod");
    let refused = wait_for("the probed pod refused", 60, || async {
        let p = pods.get("probed").await.ok()?;
        (phase(&p) == Some("Failed")).then_some(p)
    })
    .await;
    let st = refused.status.expect("status");
    println!("refused: {:?}: {:?}", st.reason, st.message);
    assert_eq!(st.reason.as_deref(), Some("AgentlessUnsupported"));
    assert!(st.message.unwrap_or_default().contains("livenessProbe"));
    let dev = device_json(&fc, &device).await;
    assert_eq!(named(&dev["spec"], "applications", "fleetlet-").len(), 1);

    // Delete: the application and its files leave the spec, someone else's stays; the pod
    // stays Terminating while the device still lists the application, and is gone once the
    // device reports it removed.
    pods.delete("web", &DeleteParams::default())
        .await
        .expect("delete pod");
    wait_for("the application removed from the spec", 60, || async {
        let dev = device_json(&fc, &device).await;
        (named(&dev["spec"], "applications", &app_name).is_empty()
            && named(&dev["spec"], "config", &app_name).is_empty()
            && named(&dev["spec"], "applications", "theirs").len() == 1)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        pods.get("web").await.is_ok(),
        "the pod waits while the device still lists its application"
    );
    report_apps(&fc, &certs, &device, json!([])).await;
    wait_for("the pod gone", 60, || async {
        pods.get_opt("web").await.ok()?.is_none().then_some(())
    })
    .await;

    // The fleet-owned device: its pod is refused with a message naming the owner.
    wait_for(
        "Flightctl's fleet controller owning the device",
        60,
        || async {
            let dev = device_json(&fc, &owned).await;
            dev["metadata"]["owner"].as_str().map(str::to_owned)
        },
    )
    .await;
    let on_owned: Pod = serde_json::from_value(json!({
        "metadata": {"name": "on-owned"},
        "spec": {"nodeName": owned, "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "c", "image": "docker.io/library/busybox:1.36"}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &on_owned)
        .await
        .expect("create pod on the owned device");
    let refused = wait_for("the pod on the fleet-owned device refused", 60, || async {
        let p = pods.get("on-owned").await.ok()?;
        (phase(&p) == Some("Failed")).then_some(p)
    })
    .await;
    let message = refused.status.and_then(|s| s.message).unwrap_or_default();
    println!("fleet-owned device: {message}");
    assert!(
        message.contains(&format!("owned by Fleet/{run}")),
        "{message}"
    );
    let dev = device_json(&fc, &owned).await;
    assert!(named(&dev["spec"], "applications", "fleetlet-").is_empty());
}
