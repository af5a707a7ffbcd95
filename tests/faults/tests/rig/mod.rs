//! Helpers of the disk, bad-input and security faults over the suite's [`Fleet`] fixture (a real
//! hub and real agents on the stack, cleaned up on drop): devices by name, pods from JSON, the
//! pods' phases, what Podman runs for a pod, and the processes' logs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fleetlet_proto::v1::{self, agent_message, device_link_client::DeviceLinkClient};
use fleetlet_test_support::harness::dev_dir;
use futures::StreamExt;
use tokio::time::Instant;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use fleetlet_faults::fixture::Fleet;
use fleetlet_test_support::harness::{self, AgentSetup};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

/// Bound for anything the rig waits on (a bound, not a timing goal).
pub const WAIT: Duration = Duration::from_secs(90);

/// A started [`Fleet`] with name-based access for these tests.
pub struct Rig {
    /// The hub, agents, namespace and cleanup.
    pub fleet: Fleet,
    /// The namespace of the run.
    pub ns: String,
    /// Pods of the namespace.
    pub pods: Api<Pod>,
    /// Nodes.
    pub nodes: Api<Node>,
}

impl Rig {
    /// Starts a hub and `devices` agents and waits for their Nodes to be Ready.
    pub async fn start(prefix: &str, devices: usize) -> Rig {
        let fleet = Fleet::start(prefix, devices, |_| {}, |_| {}).await;
        Rig {
            ns: fleet.id.clone(),
            pods: fleet.pods(),
            nodes: Api::all(fleet.client.clone()),
            fleet,
        }
    }

    /// Device names, in order.
    pub fn devices(&self) -> Vec<String> {
        self.fleet.devices.clone()
    }

    fn index(&self, device: &str) -> usize {
        self.fleet
            .devices
            .iter()
            .position(|d| d == device)
            .expect("a device of the rig")
    }

    /// The written setup of `device`'s agent (its state directory).
    pub fn agent(&self, device: &str) -> &AgentSetup {
        &self.fleet.agents[self.index(device)]
    }

    /// Where PKI, configs, state directories and logs live.
    pub fn dir(&self) -> &std::path::Path {
        self.fleet.dir()
    }

    /// The hub's link port.
    pub fn link_port(&self) -> u16 {
        self.fleet.hub.ports.link
    }

    /// Kills the hub (SIGKILL).
    pub fn stop_hub(&mut self) {
        self.fleet.kill_hub();
    }

    /// Starts the hub again with the same configuration.
    pub fn start_hub(&mut self) {
        self.fleet.restart_hub();
    }

    /// Kills an agent (SIGKILL); its pods keep running in Podman.
    pub fn kill_agent(&mut self, device: &str) {
        let i = self.index(device);
        self.fleet.kill_agent(i);
    }

    /// Starts an agent again with the same configuration and state directory.
    pub fn start_agent(&mut self, device: &str) {
        let i = self.index(device);
        self.fleet.restart_agent(i);
    }

    /// Whether the hub process is running.
    pub fn hub_running(&mut self) -> bool {
        self.fleet.hub_proc.as_mut().is_some_and(|h| h.running())
    }

    /// Whether `device`'s agent process is running.
    pub fn agent_running(&mut self, device: &str) -> bool {
        let i = self.index(device);
        self.fleet.agent_procs[i]
            .as_mut()
            .is_some_and(|a| a.running())
    }

    pub async fn wait_node_ready(&self, device: &str) {
        let nodes = self.nodes.clone();
        let ready = fleetlet_test_support::wait_for(&format!("node {device} Ready"), WAIT, || {
            let nodes = nodes.clone();
            async move {
                nodes
                    .get_opt(device)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|n| node_condition(&n, "Ready").is_some_and(|c| c.0 == "True"))
            }
        })
        .await;
        if let Err(e) = ready {
            panic!("{e}\n{}", self.logs());
        }
    }

    pub fn hub_log(&self) -> PathBuf {
        self.dir().join("hub.log")
    }

    pub fn agent_log(&self, device: &str) -> PathBuf {
        self.dir().join(format!("agent-{device}.log"))
    }

    /// Every log file the rig's processes wrote.
    pub fn log_files(&self) -> Vec<PathBuf> {
        std::iter::once(self.hub_log())
            .chain(self.fleet.devices.iter().map(|d| self.agent_log(d)))
            .collect()
    }

    /// The text of an agent's log.
    pub fn agent_log_text(&self, device: &str) -> String {
        std::fs::read_to_string(self.agent_log(device)).unwrap_or_default()
    }

    /// The tails of every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for f in self.log_files() {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("---- {} ----\n", f.display()));
            out.push_str(&lines[lines.len().saturating_sub(40)..].join("\n"));
            out.push('\n');
        }
        out
    }

    /// Creates a pod from JSON in the rig's namespace; returns its UID.
    pub async fn create_pod(&self, pod: Value) -> String {
        let pod: Pod = serde_json::from_value(pod).expect("pod json");
        let created = self
            .pods
            .create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
        created.metadata.uid.expect("uid")
    }

    /// The pod's phase and reason in the API (None when it does not exist).
    pub async fn phase(&self, name: &str) -> Option<(String, String)> {
        let pod = self.pods.get_opt(name).await.ok().flatten()?;
        let status = pod.status.unwrap_or_default();
        Some((
            status.phase.unwrap_or_default(),
            status.reason.unwrap_or_default(),
        ))
    }

    /// Waits until every named pod is Running in the API; returns false on timeout.
    pub async fn wait_running(&self, names: &[&str], timeout: Duration) -> bool {
        fleetlet_test_support::wait_for("pods Running", timeout, || async {
            for n in names {
                if self.phase(n).await.map(|p| p.0) != Some("Running".into()) {
                    return false;
                }
            }
            true
        })
        .await
        .is_ok()
    }
}

pub use harness::node_condition;

/// A pod bound to `node` running one busybox container that exits on SIGTERM.
pub fn sleeper(name: &str, node: &str) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "hostNetwork": true,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "c",
                "image": test_image(),
                "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]
            }]
        }
    })
}

/// The stack's test image.
pub fn test_image() -> String {
    fleetlet_test_support::Stack::shared()
        .map(|s| s.test_image().to_string())
        .unwrap_or_else(|_| "localhost/fleetlet-test/busybox:1".into())
}

/// App containers Podman runs for pod `uid` of `device`: (container name, id, state).
pub fn containers(device: &str, uid: &str) -> Vec<(String, String, String)> {
    harness::app_containers(&[("io.fleetlet.device", device), ("io.fleetlet.pod-uid", uid)])
        .iter()
        .map(|c| {
            (
                harness::json_str(&c["Labels"]["io.fleetlet.container"]),
                harness::json_str(&c["Id"]),
                harness::json_str(&c["State"]),
            )
        })
        .collect()
}

/// Running app container ids of pod `uid` of `device`, by container name.
pub fn running(device: &str, uid: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, id, state) in containers(device, uid) {
        if state == "running" {
            out.entry(name).or_default().push(id);
        }
    }
    out
}

/// Container names of pod `uid` that run more than once (duplicates).
pub fn duplicated(device: &str, uid: &str) -> u32 {
    running(device, uid)
        .values()
        .filter(|ids| ids.len() > 1)
        .count() as u32
}

/// Records an outcome for the suite's table (and prints it).
pub fn record(outcome: fleetlet_faults::Outcome) {
    fleetlet_faults::fixture::record_outcome(&outcome);
}

/// A gRPC client of the hub's link holding `device`'s certificate from the rig's PKI.
pub async fn link_client(dir: &Path, device: &str, port: u16) -> DeviceLinkClient<Channel> {
    let read = |name: String| std::fs::read(dir.join(name)).expect("PKI file");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("link-ca.crt".into())))
        .identity(Identity::from_pem(
            read(format!("{device}.crt")),
            read(format!("{device}.key")),
        ))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect to the hub's link");
    DeviceLinkClient::new(channel)
}

pub fn message(kind: agent_message::Kind) -> v1::AgentMessage {
    v1::AgentMessage { kind: Some(kind) }
}

pub fn hello(name: &str) -> v1::AgentMessage {
    message(agent_message::Kind::Hello(v1::Hello {
        device_name: name.into(),
        ..Default::default()
    }))
}

/// Opens a stream, sends `messages` (and keeps the stream open); returns the hub's verdict: the
/// error status it ended the stream with, or `None` while it keeps the stream (bounded wait).
pub async fn send_as(
    client: &mut DeviceLinkClient<Channel>,
    messages: Vec<v1::AgentMessage>,
    wait: Duration,
) -> Option<tonic::Status> {
    let outbound = futures::stream::iter(messages).chain(futures::stream::pending());
    let response = match client.connect(outbound).await {
        Ok(r) => r,
        Err(status) => return Some(status),
    };
    let mut inbound = response.into_inner();
    let deadline = Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, inbound.message()).await {
            Err(_) => return None,
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return Some(tonic::Status::ok("closed")),
            Ok(Err(status)) => return Some(status),
        }
    }
}

/// 16 random bytes as hex, from the kernel.
pub fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    let mut f = std::fs::File::open("/dev/urandom").expect("urandom");
    std::io::Read::read_exact(&mut f, &mut bytes).expect("random bytes");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// HTTP status of a GET to the hub's kubelet endpoint (curl, trusting the cluster CA).
pub fn kubelet_get(port: u16, path: &str, token: Option<&str>) -> u16 {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "20",
    ])
    .arg("--cacert")
    .arg(dev_dir().join("pki/ca.crt"))
    .arg(format!("https://127.0.0.1:{port}{path}"));
    if let Some(t) = token {
        cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    let out = cmd.output().expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// The `[kubelet] listen` port of the rig's hub config.
pub fn kubelet_port(rig: &Rig) -> u16 {
    let cfg = std::fs::read_to_string(rig.dir().join("hub.toml")).expect("hub.toml");
    let section = cfg.split("[kubelet]").nth(1).expect("[kubelet] table");
    let listen = section
        .lines()
        .find_map(|l| l.strip_prefix("listen = \""))
        .expect("kubelet listen");
    listen
        .trim_end_matches('"')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("kubelet port")
}

/// (HTTP status, body) of a GET to the hub's kubelet endpoint (curl, trusting the cluster CA).
pub fn kubelet_get_body(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-w", "\n%{http_code}", "--max-time", "20"])
        .arg("--cacert")
        .arg(dev_dir().join("pki/ca.crt"))
        .arg(format!("https://127.0.0.1:{port}{path}"));
    if let Some(t) = token {
        cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    let out = cmd.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Seconds a TLS connection to the kubelet endpoint that completes its handshake and then sends
/// nothing stays open (`openssl s_client`, which exits when the server closes); `None` when it
/// is still open after 30 s.
pub async fn silent_tls_connection_lifetime(port: u16) -> Option<f64> {
    let started = Instant::now();
    let mut child = tokio::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-CAfile")
        .arg(dev_dir().join("pki/ca.crt"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl s_client");
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(_) => Some(started.elapsed().as_secs_f64()),
        Err(_) => None,
    }
}
