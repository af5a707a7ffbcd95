//! A real hub and real agents for the disk, bad-input and security faults: the `fleetlet-hub`
//! and `fleetlet-agent` binaries (from `fleetlet_test_support::harness`), the stack's API server
//! and Podman, one namespace for the run, and everything removed again on drop.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use fleetlet_test_support::harness::{
    self, AgentSetup, AgentSpec, HubSetup, HubSpec, KubeCleanup, Proc,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

/// Bound for anything the rig waits on (a bound, not a timing goal).
pub const WAIT: Duration = Duration::from_secs(90);

/// A hub with its devices' agents, in one namespace of the run.
pub struct Rig {
    /// Where PKI, configs, state directories and logs live.
    pub dir: tempfile::TempDir,
    pub hub_setup: HubSetup,
    pub hub: Option<Proc>,
    pub agents: BTreeMap<String, AgentSetup>,
    pub agent_procs: BTreeMap<String, Proc>,
    pub client: kube::Client,
    pub ns: String,
    pub pods: Api<Pod>,
    pub nodes: Api<Node>,
    _cleanup: KubeCleanup,
}

impl Rig {
    /// Writes a hub for `devices` (fleet "f") and their agents; starts nothing yet.
    pub async fn new(prefix: &str, devices: usize) -> Rig {
        let instance = harness::unique(prefix);
        let names: Vec<String> = (0..devices).map(|i| format!("{instance}-d{i}")).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = HubSpec::new(
            &instance,
            &names
                .iter()
                .map(|n| (n.clone(), "f".to_string()))
                .collect::<Vec<_>>(),
        );
        let hub_setup = HubSetup::write(dir.path(), spec);
        let agents = names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    AgentSetup::write(dir.path(), AgentSpec::new(n, hub_setup.ports.link)),
                )
            })
            .collect();
        let client = harness::client().await;
        harness::create_namespace(&client, &instance).await;
        Rig {
            pods: Api::namespaced(client.clone(), &instance),
            nodes: Api::all(client.clone()),
            _cleanup: KubeCleanup {
                nodes: names.clone(),
                namespace: Some(instance.clone()),
            },
            ns: instance,
            dir,
            hub_setup,
            hub: None,
            agents,
            agent_procs: BTreeMap::new(),
            client,
        }
    }

    /// Device names, in order.
    pub fn devices(&self) -> Vec<String> {
        self.agents.keys().cloned().collect()
    }

    pub fn start_hub(&mut self) {
        self.hub = Some(self.hub_setup.spawn());
    }

    /// Kills the hub (SIGKILL).
    pub fn stop_hub(&mut self) {
        if let Some(h) = self.hub.take() {
            h.kill9();
        }
    }

    pub fn start_agent(&mut self, device: &str) {
        let proc = self.agents[device].spawn();
        self.agent_procs.insert(device.to_string(), proc);
    }

    /// Kills an agent (SIGKILL); its pods keep running in Podman.
    pub fn kill_agent(&mut self, device: &str) {
        if let Some(p) = self.agent_procs.remove(device) {
            p.kill9();
        }
    }

    /// Starts the hub and every agent and waits until every Node is Ready.
    pub async fn start_all(&mut self) {
        self.start_hub();
        for d in self.devices() {
            self.start_agent(&d);
        }
        for d in self.devices() {
            self.wait_node_ready(&d).await;
        }
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
        self.dir.path().join("hub.log")
    }

    pub fn agent_log(&self, device: &str) -> PathBuf {
        self.dir.path().join(format!("agent-{device}.log"))
    }

    /// Every log file the rig's processes wrote.
    pub fn log_files(&self) -> Vec<PathBuf> {
        std::iter::once(self.hub_log())
            .chain(self.agents.keys().map(|d| self.agent_log(d)))
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

impl Drop for Rig {
    fn drop(&mut self) {
        // Agents first (they would restart what is removed), then the hub, then the containers.
        for (_, p) in std::mem::take(&mut self.agent_procs) {
            p.kill9();
        }
        self.stop_hub();
        for d in self.agents.keys() {
            harness::remove_device_containers(d);
        }
    }
}

/// `(status, reason, message)` of a Node condition.
pub fn node_condition(node: &Node, type_: &str) -> Option<(String, String, String)> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| {
            (
                c.status.clone(),
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

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
    let json = harness::podman(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=io.fleetlet.device={device}"),
        "--filter",
        &format!("label=io.fleetlet.pod-uid={uid}"),
        "--format",
        "json",
    ]);
    let list: Vec<Value> = serde_json::from_str(&json).unwrap_or_default();
    list.iter()
        .filter_map(|c| {
            let name = c["Labels"]["io.fleetlet.container"].as_str()?;
            Some((
                name.to_string(),
                c["Id"].as_str().unwrap_or_default().to_string(),
                c["State"].as_str().unwrap_or_default().to_string(),
            ))
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

/// Records an outcome for the suite's table (a failure to write the report fails the test).
pub fn record(outcome: fleetlet_faults::Outcome) {
    println!("outcome: {outcome:?}");
    fleetlet_faults::record(&outcome).expect("write the fault report");
}
