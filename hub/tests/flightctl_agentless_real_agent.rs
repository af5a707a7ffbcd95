//! Agentless mode end to end with the real flightctl-agent (Flightctl v1.2.0, built by
//! tests/env/flightctl/agent/build.sh) running the application under the stack's Podman:
//!
//! 1. the flightctl-agent enrolls; the test approves it with the agentless label
//!    (`fleetlet.io/mode=agentless`) and no Fleet;
//! 2. the real hub (Flightctl inventory, agentless mode, the shipped Flightctl rights) makes its
//!    Node Ready from Flightctl's view of the device (no fleetlet-agent anywhere);
//! 3. a pod bound to the Node (env from a ConfigMap, a hostPort) becomes an inline compose
//!    application in the device spec; the flightctl-agent runs it with Podman, reports it
//!    Running, and the pod turns Running in the API; the container answers on the hostPort with
//!    the ConfigMap's value. The deploy latency (bind → Running in the API) is printed;
//! 4. deleting the pod removes the application: the flightctl-agent stops the containers,
//!    reports the application gone, and the pod leaves the API.
//!
//! Environment shims, because this machine has Podman 4.3.1 (no `podman compose`) and Flightctl's
//! agent in test-root mode still runs compose in the unrooted /etc/compose/manifests/<app>:
//! tests/env/flightctl/agentless-shim.sh (podman-compose from PyPI behind a `podman` wrapper) and
//! tests/env/flightctl/agentless-agent.sh (a private mount namespace with /etc as an overlay).
//! The host's /etc is not changed. Needs `make env-up`; runs as root.

use http::Method;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tokio::time::Instant;

mod common;
use common::flightctl::{FlightctlCleanup, env, hub_token_file};
use common::{
    HubSetup, HubSpec, KubeCleanup, Proc, client, create_namespace, free_port_range, node_ready,
    podman, unique, wait_for,
};
use fleetlet_test_support::Stack;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/env/flightctl")
        .join(name)
}

/// Runs a stack script that prints a directory.
fn printed_dir(script: &Path) -> PathBuf {
    let out = Command::new(script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(out.status.success(), "{} failed", script.display());
    String::from_utf8(out.stdout).expect("utf-8").trim().into()
}

fn enrollment_id(root: &Path) -> Option<String> {
    let banner = std::fs::read_to_string(root.join("etc/issue.d/flightctl-banner.issue")).ok()?;
    let at = banner.find("/enroll/")?;
    let id: String = banner[at + "/enroll/".len()..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    (!id.is_empty()).then_some(id)
}

/// Podman containers and pods whose names carry `needle` (`ID name` lines).
fn containers(needle: &str) -> Vec<String> {
    podman(&["ps", "-a", "--format", "{{.ID}} {{.Names}} {{.Status}}"])
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// Removes the compose containers, pods and networks of the test on drop.
struct ComposeLeftovers(String);

impl Drop for ComposeLeftovers {
    fn drop(&mut self) {
        for line in containers(&self.0) {
            if let Some(id) = line.split_whitespace().next() {
                let _ = Command::new("podman").args(["rm", "-f", id]).output();
            }
        }
        let pods = podman(&["pod", "ps", "--format", "{{.ID}} {{.Name}}"]);
        for line in pods.lines().filter(|l| l.contains(&self.0)) {
            if let Some(id) = line.split_whitespace().next() {
                let _ = Command::new("podman")
                    .args(["pod", "rm", "-f", id])
                    .output();
            }
        }
        for net in podman(&["network", "ls", "--format", "{{.Name}}"])
            .lines()
            .filter(|n| n.contains(&self.0))
        {
            let _ = Command::new("podman")
                .args(["network", "rm", "-f", net])
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_flightctl_agent_runs_agentless_pods_under_podman() {
    let stack = Stack::shared().expect("local stack (make env-up)");
    let _logs = stack.logs_on_failure();
    let fc = env(stack);
    let bin: PathBuf = match stack.var("FLIGHTCTL_DEVICE_BIN_DIR") {
        Some(d) => d.into(),
        None => printed_dir(&script("agent/build.sh")),
    };
    let shim = printed_dir(&script("agentless-shim.sh"));
    let image = stack
        .var("FLEETLET_TEST_IMAGE")
        .unwrap_or("localhost/fleetlet-test/busybox:1")
        .to_owned();
    let run = unique("fal-ra");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let root = d.join("root");
    for sub in ["etc/flightctl", "var/lib/flightctl", "etc/compose"] {
        std::fs::create_dir_all(root.join(sub)).expect("device root");
    }
    std::os::unix::fs::symlink("/proc", root.join("proc")).expect("proc link");
    std::os::unix::fs::symlink("/sys", root.join("sys")).expect("sys link");
    // Declared before the hub so that it is dropped after it: a Node deleted while the hub
    // still runs is applied again by the hub (its device is still in the inventory) and outlives
    // the test.
    let mut kube_cleanup = KubeCleanup {
        nodes: Vec::new(),
        namespace: Some(run.clone()),
    };
    let mut flightctl_cleanup = FlightctlCleanup {
        admin: fc.admin.clone(),
        objects: Vec::new(),
        csr_prefixes: vec![format!("enroll-{run}-")],
    };
    let _leftovers = ComposeLeftovers(format!("fleetlet-{run}"));

    // The hub with agentless mode, as the shipped Flightctl identity and rights.
    let hub_token = hub_token_file(d);
    common::kubectl_ok(&[
        "apply",
        "--server-side",
        "--field-manager=fleetlet-e2e",
        "-f",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/kubernetes/flightctl/hub-agentless-rbac.yaml")
            .to_str()
            .expect("utf-8 path"),
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

    // The flightctl-agent: enrollment config from the CLI, short intervals.
    let cli = Command::new(format!(
        "{}/flightctl",
        stack.var("FLIGHTCTL_BIN_DIR").expect("flightctl bin")
    ))
    .args([
        "--config-dir",
        stack.var("FLIGHTCTL_CLI_CONFIG_DIR").expect("cli config"),
    ])
    .args([
        "certificate",
        "request",
        "-n",
        &format!("enroll-{run}"),
        "-o",
        "embedded",
        "-d",
    ])
    .arg(d)
    .output()
    .expect("flightctl certificate request");
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let mut config = String::from_utf8(cli.stdout).expect("utf-8");
    config.push_str("spec-fetch-interval: 2s\nstatus-update-interval: 2s\nlog-level: debug\n");
    std::fs::write(root.join("etc/flightctl/config.yaml"), config).expect("config.yaml");
    let mut cmd = Command::new(script("agentless-agent.sh"));
    cmd.arg(d).arg(bin.join("flightctl-agent")).arg(&shim);
    // The agent's podman (the shim) talks to the stack's Podman service.
    cmd.env("FLEETLET_PODMAN_SOCKET", common::podman_socket());
    let agent_log = d.join("flightctl-agent.log");
    let _flightctl_agent = Proc::spawn("flightctl-agent", &mut cmd, agent_log.clone());

    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let device = loop {
        if let Some(id) = enrollment_id(&root) {
            break id;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&agent_log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "no enrollment id from the flightctl-agent within 60 s; its log, newest first:\n{}",
                tail.join("\n")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    for kind in ["devices", "enrollmentrequests"] {
        flightctl_cleanup
            .objects
            .push((kind.into(), device.clone()));
    }
    flightctl_cleanup.csr_prefixes.push(device.clone());
    kube_cleanup.nodes.push(device.clone());
    let approval = json!({"approved": true,
        "labels": {"fleetlet-run": run, "fleetlet.io/mode": "agentless"}});
    wait_for("the enrollment request approved", 60, || async {
        fc.admin
            .request(
                Method::PUT,
                &format!("/api/v1/enrollmentrequests/{device}/approval"),
                Some(&approval),
            )
            .await
            .ok()
    })
    .await;
    println!("flightctl-agent enrolled as {device}");

    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("the agentless device's Node Ready", 120, || async {
        let n = nodes.get(&device).await.ok()?;
        node_ready(&n).then_some(())
    })
    .await;

    create_namespace(&client, &run).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &run);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "greeting"},
            "data": {"text": "hello through Flightctl"}}))
        .expect("cm"),
    )
    .await
    .expect("create ConfigMap");
    // A hostPort below the ephemeral range: Podman's DNAT rule for it matches every local
    // address, so it must never be a port the kernel could hand a listener bound to port 0.
    let (port, _) = free_port_range(1).expect("a free port below the ephemeral range");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &run);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "nodeName": device,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{
                "name": "web",
                "image": image,
                "command": ["sh", "-c", "mkdir -p /srv && echo \"$GREETING\" > /srv/greeting && exec httpd -f -p 8080 -h /srv"],
                "env": [{"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "greeting", "key": "text"}}}],
                "ports": [{"containerPort": 8080, "hostPort": port}],
                "resources": {"limits": {"cpu": "200m", "memory": "32Mi"}}
            }]
        }
    }))
    .expect("pod");
    let bound = Instant::now();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    wait_for("the pod Running and ready", 240, || async {
        let p = pods.get("web").await.ok()?;
        let st = p.status?;
        let ready = st.container_statuses?.first()?.ready;
        (st.phase.as_deref() == Some("Running") && ready).then_some(())
    })
    .await;
    let latency = bound.elapsed();
    println!(
        "agentless deploy latency with the real flightctl-agent: bind -> Running in the API {:.2} s",
        latency.as_secs_f64()
    );
    let running = wait_for("the compose container in Podman", 30, || async {
        let c = containers(&format!("fleetlet-{run}"));
        (!c.is_empty()).then_some(c)
    })
    .await;
    println!("Podman: {running:?}");
    assert!(
        running
            .iter()
            .any(|l| l.contains("_web_") && l.contains("Up")),
        "the compose container runs in Podman: {running:?}"
    );
    let body = wait_for(
        "the container answering on its hostPort",
        30,
        || async move {
            let out = Command::new("curl")
                .args(["-sf", "--max-time", "2"])
                .arg(format!("http://127.0.0.1:{port}/greeting"))
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        },
    )
    .await;
    assert_eq!(body, "hello through Flightctl");

    // Delete: the flightctl-agent stops and removes the application, the pod leaves the API.
    let deleted = Instant::now();
    pods.delete("web", &DeleteParams::default())
        .await
        .expect("delete pod");
    wait_for("the pod gone", 240, || async {
        pods.get_opt("web").await.ok()?.is_none().then_some(())
    })
    .await;
    println!(
        "delete -> pod gone {:.2} s",
        deleted.elapsed().as_secs_f64()
    );
    let left: Vec<String> = containers(&format!("fleetlet-{run}"))
        .into_iter()
        .filter(|l| l.contains("Up"))
        .collect();
    assert!(left.is_empty(), "no container of the pod runs: {left:?}");
    assert!(
        !Path::new("/etc/compose").exists(),
        "the host's /etc is untouched"
    );
}
