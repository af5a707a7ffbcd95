//! A device managed by the real flightctl-agent (built from github.com/flightctl/flightctl, the
//! server's release, by tests/env/flightctl/agent/build.sh), end to end against the stack's real
//! Flightctl, kube-apiserver and Podman:
//!
//! 1. the flightctl-agent enrolls (its own enrollment request, named by its key's fingerprint) and
//!    the test approves it with labels that put it in a Flightctl Fleet of the test;
//! 2. the Fleet's template delivers fleetlet-agent's configuration — `/etc/fleetlet/agent.toml`
//!    (hub endpoint, device policy), the hub's CA, a certificate drop-in
//!    (`/etc/flightctl/certs.d/fleetlet.yaml`) and two after-updating hooks;
//! 3. the flightctl-agent obtains the fleetlet link certificate through Flightctl's certificate
//!    path (a CertificateSigningRequest to the `flightctl.io/device-svc-client` signer, made by
//!    its certificate manager from the drop-in, which its hook reloads);
//! 4. fleetlet-agent starts with that configuration and certificate, the real hub (Flightctl
//!    inventory, Flightctl's signer CA as the link's client CA) makes the Node Ready, a pod runs;
//! 5. the Fleet's template changes the hub endpoint: the flightctl-agent writes the new
//!    agent.toml, its hook restarts fleetlet-agent, which connects to the new endpoint while
//!    the pod's container keeps running (same container, no restart).
//!
//! The flightctl-agent runs as root with `FLIGHTCTL_TEST_ROOT_DIR` (Flightctl's own option, which
//! its device simulator uses) pointing at a directory of the test: every file it reads or writes
//! (/etc/flightctl, /var/lib/flightctl, /etc/fleetlet, /var/log/flightctl) lies below it; its
//! `proc` and `sys` are links to the real ones (it reads the default route from /proc/net/route).
//! The host's /etc and /var are not touched. What stands in for systemd, which is not PID 1 here:
//! the test supervises fleetlet-agent (restarts it when it exits, as `Restart=always` would),
//! and the restart hook signals it instead of `systemctl try-restart fleetlet-agent`.
//!
//! Needs `make env-up` and the agent binary next to the hub's (`cargo build -p fleetlet-agent`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use http::Method;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

mod common;
use common::flightctl::{FlightctlCleanup, env, hub_token_file};
use common::{
    HubSetup, HubSpec, KubeCleanup, Proc, agent_binary, client, create_namespace, node_ready,
    podman, remove_device_containers, unique, wait_for,
};
use fleetlet_test_support::Stack;

/// Where the stack's device-side Flightctl binaries are (env-up builds them; the build script is
/// cached and prints the directory).
fn device_bin_dir(stack: &Stack) -> PathBuf {
    if let Some(dir) = stack.var("FLIGHTCTL_DEVICE_BIN_DIR") {
        return dir.into();
    }
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/env/flightctl/agent/build.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run tests/env/flightctl/agent/build.sh");
    assert!(out.status.success(), "building flightctl-agent failed");
    String::from_utf8(out.stdout).expect("utf-8").trim().into()
}

/// Stands in for the service manager of fleetlet-agent on the device: starts it once its
/// configuration and certificate exist, and again whenever it exits (`Restart=always`); its pid
/// goes to `<root>/run/fleetlet-agent.pid` for the restart hook.
struct Supervisor {
    stop: Arc<AtomicBool>,
    starts: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    fn start(root: &Path, log: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let starts = Arc::new(AtomicU32::new(0));
        let (stop2, starts2, root) = (stop.clone(), starts.clone(), root.to_path_buf());
        let thread = std::thread::spawn(move || {
            let config = root.join("etc/fleetlet/agent.toml");
            let cert = root.join("etc/fleetlet/certs/device.crt");
            let pidfile = root.join("run/fleetlet-agent.pid");
            let mut child: Option<Child> = None;
            // Bounded: at most 20 starts, polled every 100 ms.
            while !stop2.load(Ordering::SeqCst) && starts2.load(Ordering::SeqCst) < 20 {
                if let Some(c) = child.as_mut() {
                    if matches!(c.try_wait(), Ok(Some(_))) {
                        child = None;
                        std::thread::sleep(Duration::from_millis(300));
                    }
                } else if config.exists() && cert.exists() {
                    let out = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)
                        .expect("log");
                    let err = out.try_clone().expect("log");
                    let c = Command::new(agent_binary())
                        .arg("--config")
                        .arg(&config)
                        .arg("run")
                        .env("RUST_LOG", "info")
                        .stdout(Stdio::from(out))
                        .stderr(Stdio::from(err))
                        .spawn()
                        .expect("spawn fleetlet-agent");
                    std::fs::create_dir_all(pidfile.parent().expect("run dir")).expect("run dir");
                    std::fs::write(&pidfile, c.id().to_string()).expect("pidfile");
                    starts2.fetch_add(1, Ordering::SeqCst);
                    child = Some(c);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(mut c) = child {
                let _ = c.kill();
                let _ = c.wait();
            }
        });
        Self {
            stop,
            starts,
            thread: Some(thread),
        }
    }

    fn starts(&self) -> u32 {
        self.starts.load(Ordering::SeqCst)
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The Fleet of the test: devices labelled `fleetlet-test-fleet=<name>` get fleetlet-agent's
/// configuration, the hub's CA, the certificate drop-in and the hooks. Paths inside agent.toml
/// are the device's paths below `root` (the flightctl-agent's test root); on a real device they
/// would be the plain /etc/fleetlet paths.
fn fleet(
    name: &str,
    root: &Path,
    hub_endpoint: &str,
    hub_ca: &str,
    podman_socket: &str,
) -> serde_json::Value {
    let r = root.display();
    let agent_toml = format!(
        r#"device_name = "DEVICE_NAME"
state_dir = "{r}/var/lib/fleetlet"
podman_socket = "{podman_socket}"
resync_secs = 5
node_ip = "127.0.0.1"

[hub]
endpoint = "{hub_endpoint}"
ca_file = "{r}/etc/fleetlet/hub-ca.crt"
cert_file = "{r}/etc/fleetlet/certs/device.crt"
key_file = "{r}/etc/fleetlet/certs/device.key"
reconnect_max_backoff_secs = 2

[policy]
allow_privileged = false
allow_host_network = false
allow_host_path = false
allowed_capabilities = ["NET_BIND_SERVICE"]
"#
    )
    // Rendered per device by Flightctl.
    .replace("DEVICE_NAME", "{{ .metadata.name }}");
    let dropin = r#"- name: fleetlet
  provisioner:
    type: csr
    config:
      signer: flightctl.io/device-svc-client
      common-name: "fleetlet-{{ .metadata.name }}"
      usages: ["clientAuth", "CA:false"]
  storage:
    type: filesystem
    config:
      cert-path: /etc/fleetlet/certs/device.crt
      key-path: /etc/fleetlet/certs/device.key
"#;
    // After an update: a new or changed certificate drop-in makes the flightctl-agent reload
    // (its certificate manager provisions the certificate); a changed agent.toml restarts
    // fleetlet-agent (on a device: `systemctl try-restart fleetlet-agent`).
    let hooks = format!(
        r#"- if:
  - path: /etc/flightctl/certs.d/
    op: [created, updated]
  run: /bin/sh -c 'kill -HUP ${{FLIGHTCTL_AGENT_PID}}'
- if:
  - path: /etc/fleetlet/agent.toml
    op: [updated]
  run: /bin/sh -c 'kill -TERM $(cat {r}/run/fleetlet-agent.pid)'
"#
    );
    json!({
        "apiVersion": "v1beta1", "kind": "Fleet",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"fleetlet-test-fleet": name}},
            "template": {"spec": {"config": [{"name": "fleetlet-agent", "inline": [
                {"path": "/etc/fleetlet/agent.toml", "mode": 0o644, "content": agent_toml},
                {"path": "/etc/fleetlet/hub-ca.crt", "mode": 0o644, "content": hub_ca},
                {"path": "/etc/flightctl/certs.d/fleetlet.yaml", "mode": 0o644, "content": dropin},
                {"path": "/etc/flightctl/hooks.d/afterupdating/fleetlet.yaml", "mode": 0o644,
                 "content": hooks},
            ]}]}}
        }
    })
}

/// The enrollment id the flightctl-agent shows in its banner (`.../enroll/<id>`).
fn enrollment_id(root: &Path) -> Option<String> {
    let banner = std::fs::read_to_string(root.join("etc/issue.d/flightctl-banner.issue")).ok()?;
    let at = banner.find("/enroll/")?;
    let id: String = banner[at + "/enroll/".len()..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    (!id.is_empty()).then_some(id)
}

/// The device's running containers (`ID name status` lines).
fn containers(device: &str) -> String {
    podman(&[
        "ps",
        "--filter",
        "status=running",
        "--filter",
        &format!("label=io.fleetlet.device={device}"),
        "--format",
        "{{.ID}} {{.Names}} {{.Status}}",
    ])
}

/// Removes the device's Podman containers on drop.
struct Containers(String);

impl Drop for Containers {
    fn drop(&mut self) {
        remove_device_containers(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_flightctl_agent_delivers_fleetlet_config_and_certificate() {
    let stack = Stack::shared().expect("local stack (make env-up)");
    let _logs = stack.logs_on_failure();
    let fc = env(stack);
    let bin = device_bin_dir(stack);
    let run = unique("fra");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let root = d.join("device-root");
    for sub in ["etc/flightctl", "var/lib/flightctl", "run"] {
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
        objects: vec![("fleets".into(), run.clone())],
        csr_prefixes: vec![format!("enroll-{run}-")],
    };

    // The hub: Flightctl inventory (devices of this run), Flightctl's signer CA for the link.
    let hub_token = hub_token_file(d);
    let inventory = format!(
        r#"[inventory.flightctl]
api_url = "{api}"
ca_file = "{ca}"
token_file = "{token}"
enabled_selector = "fleetlet-run={run}"
poll_interval_secs = 1
max_backoff_secs = 2
request_timeout_secs = 5
last_seen_interval_secs = 5"#,
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
    let link_port = hub_setup.ports.link;
    let hub_ca = std::fs::read_to_string(d.join("link-ca.crt")).expect("hub CA");
    let podman_socket = stack.var("FLEETLET_PODMAN_SOCKET").expect("podman socket");

    // The Fleet first, so that the device's first rendered spec carries everything.
    fc.admin
        .request(
            Method::POST,
            "/api/v1/fleets",
            Some(&fleet(
                &run,
                &root,
                &format!("https://127.0.0.1:{link_port}"),
                &hub_ca,
                podman_socket,
            )),
        )
        .await
        .expect("create fleet");

    // The flightctl-agent's enrollment configuration: an enrollment certificate from the CLI
    // (embedded), the stack's agent endpoint, short intervals.
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

    let t0 = Instant::now();
    let mut cmd = Command::new(bin.join("flightctl-agent"));
    cmd.args(["--config", "/etc/flightctl/config.yaml"])
        .env("FLIGHTCTL_TEST_ROOT_DIR", &root);
    if let Some(conf) = stack.var("CONTAINERS_CONF") {
        cmd.env("CONTAINERS_CONF", conf);
    }
    let _flightctl_agent = Proc::spawn("flightctl-agent", &mut cmd, d.join("flightctl-agent.log"));

    // 1. Enrollment: the flightctl-agent's own request, approved with the labels of this run.
    let device = wait_for("the flightctl-agent's enrollment id", 60, || async {
        enrollment_id(&root)
    })
    .await;
    let _containers = Containers(device.clone());
    for kind in ["devices", "enrollmentrequests"] {
        flightctl_cleanup
            .objects
            .push((kind.into(), device.clone()));
    }
    flightctl_cleanup.csr_prefixes.push(device.clone());
    flightctl_cleanup
        .csr_prefixes
        .push(format!("fleetlet-{device}"));
    kube_cleanup.nodes.push(device.clone());
    println!("flightctl-agent enrolls as {device}");
    let approval =
        json!({"approved": true, "labels": {"fleetlet-run": run, "fleetlet-test-fleet": run}});
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
    let approved_at = t0.elapsed();

    // 2 + 3. The template's files, then the certificate from Flightctl's signer.
    let agent_toml = root.join("etc/fleetlet/agent.toml");
    let cert_file = root.join("etc/fleetlet/certs/device.crt");
    wait_for(
        "agent.toml delivered by the flightctl-agent",
        240,
        || async { agent_toml.exists().then_some(()) },
    )
    .await;
    let delivered_at = t0.elapsed();
    let toml = std::fs::read_to_string(&agent_toml).expect("agent.toml");
    assert!(
        toml.contains(&format!("device_name = \"{device}\"")),
        "{toml}"
    );
    assert!(toml.contains("allow_privileged = false"), "{toml}");
    assert_eq!(
        std::fs::read_to_string(root.join("etc/fleetlet/hub-ca.crt")).expect("hub CA"),
        hub_ca
    );
    wait_for(
        "the fleetlet certificate from Flightctl's signer",
        120,
        || async { cert_file.exists().then_some(()) },
    )
    .await;
    let cert_at = t0.elapsed();
    let pem = std::fs::read(&cert_file).expect("cert");
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
        .expect("CN")
        .to_owned();
    assert_eq!(cn, format!("fleetlet-{device}"));
    assert_eq!(
        fleetlet_hub::link::flightctl_fingerprint(&x509).expect("extension"),
        Some(device.clone())
    );
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile", &fc.signer_ca_file])
        .arg(&cert_file)
        .output()
        .expect("openssl");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    // Nothing of the device outside its root.
    for p in [
        "/etc/flightctl",
        "/var/lib/flightctl",
        "/etc/fleetlet",
        "/var/log/flightctl",
    ] {
        assert!(!Path::new(p).exists(), "{p} exists on the host");
    }

    // 4. fleetlet-agent with the delivered configuration and certificate; the Node turns Ready.
    let supervisor = Supervisor::start(&root, d.join("fleetlet-agent.log"));
    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    wait_for("the device's Node Ready", 120, || async {
        let n = nodes.get(&device).await.ok()?;
        node_ready(&n).then_some(())
    })
    .await;
    let ready_at = t0.elapsed();
    println!(
        "flightctl-agent started -> approved {:.1} s, template files delivered {:.1} s, fleetlet certificate {:.1} s, Node Ready {:.1} s",
        approved_at.as_secs_f64(),
        delivered_at.as_secs_f64(),
        cert_at.as_secs_f64(),
        ready_at.as_secs_f64()
    );

    create_namespace(&client, &run).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &run);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {
            "nodeName": device,
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
    let container_id = |p: &Pod| -> Option<String> {
        p.status
            .as_ref()?
            .container_statuses
            .as_ref()?
            .first()?
            .container_id
            .clone()
    };
    let before = wait_for("the pod Running on the device", 120, || async {
        let p = pods.get("app").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then(|| container_id(&p))?
    })
    .await;
    let podman_before = containers(&device);
    println!("pod running: {before}\n{podman_before}");
    assert!(podman_before.contains("-app "), "{podman_before}");

    // 5. The template changes the hub endpoint (127.0.0.1 -> localhost, the hub's certificate
    // names both). It reaches fleetlet-agent only through the flightctl-agent.
    let new_endpoint = format!("https://localhost:{link_port}");
    let changed = Instant::now();
    fc.admin
        .request(
            Method::PUT,
            &format!("/api/v1/fleets/{run}"),
            Some(&fleet(&run, &root, &new_endpoint, &hub_ca, podman_socket)),
        )
        .await
        .expect("update fleet");
    wait_for(
        "the new agent.toml written by the flightctl-agent",
        300,
        || async {
            std::fs::read_to_string(&agent_toml)
                .ok()?
                .contains(&new_endpoint)
                .then_some(())
        },
    )
    .await;
    let rewritten = changed.elapsed();
    wait_for("fleetlet-agent restarted by the hook", 60, || async {
        (supervisor.starts() >= 2).then_some(())
    })
    .await;
    let agent_config = root.join("etc/fleetlet/agent.toml");
    let status = wait_for(
        "fleetlet-agent connected to the new endpoint",
        120,
        || async {
            let out = Command::new(agent_binary())
                .arg("--config")
                .arg(&agent_config)
                .arg("status")
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains(&format!("connected to {new_endpoint}"))
                .then_some(text)
        },
    )
    .await;
    let reconnected = changed.elapsed();
    println!(
        "template change -> agent.toml rewritten {:.1} s, fleetlet-agent connected to {new_endpoint} {:.1} s\n{status}",
        rewritten.as_secs_f64(),
        reconnected.as_secs_f64()
    );
    wait_for("the Node Ready again", 60, || async {
        let n = nodes.get(&device).await.ok()?;
        node_ready(&n).then_some(())
    })
    .await;
    // The pod kept its container: same ID in the API and in Podman, never restarted.
    let p = pods.get("app").await.expect("pod");
    assert_eq!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Running")
    );
    assert_eq!(container_id(&p).as_deref(), Some(before.as_str()));
    let restarts = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map(|c| c.restart_count);
    assert_eq!(restarts, Some(0));
    let podman_after = containers(&device);
    let ids = |text: &str| -> Vec<String> {
        let mut v: Vec<String> = text
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        ids(&podman_before),
        ids(&podman_after),
        "{podman_before} vs {podman_after}"
    );
    println!("after the change, the same container: {podman_after}");
    drop(supervisor);
}
