//! End to end: the real `fleetlet-hub` binary, three real `fleetlet-agent` processes (own state
//! directories, sharing the stack's Podman) in two fleets, the real control plane. A Deployment
//! with a fleet nodeSelector lands only on fleet a's devices, runs in Podman, shows Running and
//! Ready, streams logs, scales up and down, changes image and is deleted.
//!
//! Needs `make env-up` and the agent binary next to the hub's (`cargo build -p fleetlet-agent`).

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

mod common;
use common::{client, create_namespace, dev_dir, unique, wait_for};

fn podman_socket() -> PathBuf {
    std::env::var("FLEETLET_PODMAN_SOCKET")
        .map_or_else(|_| dev_dir().join("podman/podman.sock"), PathBuf::from)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn agent_binary() -> PathBuf {
    let hub = PathBuf::from(env!("CARGO_BIN_EXE_fleetlet-hub"));
    let agent = hub.with_file_name("fleetlet-agent");
    assert!(
        agent.exists(),
        "{} missing: run `cargo build -p fleetlet-agent` first",
        agent.display()
    );
    agent
}

/// A child process that is killed on drop; its log is printed if the test fails.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn");
        Self {
            name: name.into(),
            child,
            log,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("----- last lines of {} -----", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// The link PKI: a CA, the hub's serving certificate, one client certificate per device (CN =
/// device name, the hub's default identity source).
fn link_pki(dir: &Path, devices: &[&str]) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "e2e link CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca.clone().self_signed(&ca_key).expect("ca");
    std::fs::write(dir.join("link-ca.crt"), ca_cert.pem()).expect("write");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let issue = |name: &str, sans: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose| {
        let mut p = rcgen::CertificateParams::new(sans).expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &issuer).expect("sign");
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write");
    };
    issue(
        "hub",
        vec!["127.0.0.1".into(), "localhost".into()],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    for d in devices {
        issue(d, Vec::new(), rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    }
}

fn podman(args: &[&str]) -> String {
    let out = Command::new("podman")
        .arg("--url")
        .arg(format!("unix://{}", podman_socket().display()))
        .args(args)
        .output()
        .expect("podman");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Containers the agent of `device` runs, as (pod name, image, state).
fn device_containers(device: &str) -> Vec<(String, String, String)> {
    let json = podman(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=io.fleetlet.device={device}"),
        "--format",
        "json",
    ]);
    let list: Vec<Value> = serde_json::from_str(&json).unwrap_or_default();
    list.iter()
        .filter(|c| c["Labels"]["io.fleetlet.container"].is_string())
        .map(|c| {
            (
                c["Labels"]["io.fleetlet.pod-name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                c["Image"].as_str().unwrap_or_default().to_string(),
                c["State"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn remove_device_containers(device: &str) {
    let filter = format!("label=io.fleetlet.device={device}");
    for id in podman(&["ps", "-aq", "--filter", &filter]).split_whitespace() {
        podman(&["rm", "-f", "-t", "0", id]);
    }
    for id in podman(&["pod", "ps", "-q", "--filter", &filter]).split_whitespace() {
        podman(&["pod", "rm", "-f", id]);
    }
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
    link_pki(d, &devices);
    let (kubelet_cert, kubelet_key) = common::issue_kubelet_cert(d);
    let (link_port, kubelet_port, ops_port) = (free_port(), free_port(), free_port());
    std::fs::write(
        d.join("devices.toml"),
        format!(
            "[[device]]\nname = \"{a1}\"\nfleet = \"a\"\n[[device]]\nname = \"{a2}\"\nfleet = \"a\"\n[[device]]\nname = \"{b1}\"\nfleet = \"b\"\n"
        ),
    )
    .expect("inventory");
    let pki = dev_dir().join("pki");
    std::fs::write(
        d.join("hub.toml"),
        format!(
            r#"kubeconfig = "{kubeconfig}"
[ops]
listen = "127.0.0.1:{ops_port}"
[inventory]
static_file = "{dir}/devices.toml"
[nodes]
instance = "{id}"
disconnect_grace_secs = 5
[kubelet]
listen = "127.0.0.1:{kubelet_port}"
cert_file = "{kubelet_cert}"
key_file = "{kubelet_key}"
client_ca_file = "{cluster_ca}"
[link]
listen = "127.0.0.1:{link_port}"
client_ca_file = "{dir}/link-ca.crt"
cert_file = "{dir}/hub.crt"
key_file = "{dir}/hub.key"
"#,
            kubeconfig = common::kube_config_path().display(),
            dir = d.display(),
            kubelet_cert = kubelet_cert.display(),
            kubelet_key = kubelet_key.display(),
            cluster_ca = pki.join("ca.crt").display(),
        ),
    )
    .expect("hub config");
    let _hub = Proc::spawn(
        "fleetlet-hub",
        Command::new(env!("CARGO_BIN_EXE_fleetlet-hub"))
            .arg("run")
            .arg("-c")
            .arg(d.join("hub.toml"))
            .env("RUST_LOG", "info"),
        d.join("hub.log"),
    );
    let agent = agent_binary();
    let mut agents = Vec::new();
    for dev in devices {
        let state = d.join(format!("state-{dev}"));
        std::fs::create_dir_all(&state).expect("state dir");
        let cfg = d.join(format!("agent-{dev}.toml"));
        std::fs::write(
            &cfg,
            format!(
                r#"device_name = "{dev}"
state_dir = "{state}"
podman_socket = "{sock}"
resync_secs = 5
node_ip = "127.0.0.1"
[hub]
endpoint = "https://127.0.0.1:{link_port}"
ca_file = "{dir}/link-ca.crt"
cert_file = "{dir}/{dev}.crt"
key_file = "{dir}/{dev}.key"
reconnect_max_backoff_secs = 2
"#,
                state = state.display(),
                sock = podman_socket().display(),
                dir = d.display(),
            ),
        )
        .expect("agent config");
        agents.push(Proc::spawn(
            dev,
            Command::new(&agent)
                .arg("--config")
                .arg(&cfg)
                .arg("run")
                .env("RUST_LOG", "info"),
            d.join(format!("agent-{dev}.log")),
        ));
    }

    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    for dev in devices {
        wait_for("node Ready from its real agent", 90, || async {
            let n = nodes.get(dev).await.ok()?;
            let ready = n
                .status
                .as_ref()?
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let tainted = n
                .spec
                .as_ref()?
                .taints
                .iter()
                .flatten()
                .any(|t| t.key.starts_with("node.kubernetes.io/"));
            (ready && !tainted).then_some(())
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
                    "nodeSelector": {"flightctl.io/fleet": "a"},
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
    for dev in devices {
        remove_device_containers(dev);
        let _ = nodes.delete(dev, &DeleteParams::default()).await;
    }
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await;
}
