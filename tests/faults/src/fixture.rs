//! The real-component fixture of the partition and crash faults: a `fleetlet-hub` and
//! `fleetlet-agent` processes on the local stack, the workload's pods in the API, what Podman runs
//! for them, and the comparison that decides whether the system has converged.
//!
//! Test-only code: setup failures panic (that is the test failing); the comparison itself never
//! panics and reports what it found, so a fault test records an outcome even when it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use fleetlet_test_support::PodmanClient;
use fleetlet_test_support::harness::{
    AgentSetup, AgentSpec, HubSetup, HubSpec, KubeCleanup, Proc, client, create_namespace,
    node_ready, remove_device_containers, unique, wait_for,
};
use http::Method;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::{Value, json};

/// The image every fault workload runs (built by `make env-up`).
pub const TEST_IMAGE: &str = "localhost/fleetlet-test/busybox:1";

/// One container the agents created, as Podman lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ctr {
    /// Podman container id.
    pub id: String,
    /// Device (agent) that created it.
    pub device: String,
    /// Kubernetes pod UID it belongs to.
    pub pod_uid: String,
    /// Container name in the pod; `None` for the Podman pod's infra container.
    pub container: Option<String>,
    /// The Podman pod it is in.
    pub podman_pod: String,
    /// Podman state (`running`, `exited`, `created`, ...).
    pub state: String,
    /// Start time, seconds since the epoch.
    pub started_at: i64,
}

/// Percent-encodes a query value (everything but unreserved characters).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every container (any state) that the agents of `devices` created, from Podman's REST API.
pub async fn fleetlet_containers(
    podman: &PodmanClient,
    devices: &[String],
) -> Result<Vec<Ctr>, fleetlet_test_support::PodmanError> {
    let filters = encode(&json!({"label": ["io.fleetlet.device"]}).to_string());
    let list = podman
        .json(
            Method::GET,
            &format!("/libpod/containers/json?all=true&filters={filters}"),
            None,
        )
        .await?;
    let wanted: BTreeSet<&str> = devices.iter().map(String::as_str).collect();
    let text = |c: &Value, k: &str| c[k].as_str().unwrap_or_default().to_string();
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| wanted.contains(c["Labels"]["io.fleetlet.device"].as_str().unwrap_or("")))
        .map(|c| Ctr {
            id: text(c, "Id"),
            device: text(&c["Labels"], "io.fleetlet.device"),
            pod_uid: text(&c["Labels"], "io.fleetlet.pod-uid"),
            container: c["Labels"]["io.fleetlet.container"]
                .as_str()
                .map(str::to_string),
            podman_pod: text(c, "Pod"),
            state: text(c, "State"),
            started_at: c["StartedAt"].as_i64().unwrap_or(0),
        })
        .collect())
}

/// Running app containers keyed by (pod UID, container name): (container id, start time). Two
/// snapshots being equal means nothing was restarted or replaced in between.
pub fn running_snapshot(ctrs: &[Ctr]) -> BTreeMap<(String, String), (String, i64)> {
    ctrs.iter()
        .filter(|c| c.state == "running")
        .filter_map(|c| {
            let name = c.container.clone()?;
            Some(((c.pod_uid.clone(), name), (c.id.clone(), c.started_at)))
        })
        .collect()
}

/// How the API's pods and Podman's containers compare.
#[derive(Debug, Clone, Default)]
pub struct Agreement {
    /// Pods in the API that are not being deleted.
    pub desired: usize,
    /// Desired pods with a container not running in Podman.
    pub lost: Vec<String>,
    /// Desired pods with more than one container of one name, or more than one Podman pod.
    pub duplicated: Vec<String>,
    /// Pod UIDs that have containers in Podman but are not desired.
    pub orphaned: Vec<String>,
    /// Desired pods whose API status is not Running/Ready with Podman's container ids.
    pub mismatched: Vec<String>,
    /// Nodes that are not Ready.
    pub nodes_not_ready: Vec<String>,
}

impl Agreement {
    /// Whether the system is where it should be with `expected` desired pods.
    pub fn converged(&self, expected: usize) -> bool {
        self.desired == expected
            && self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.orphaned.is_empty()
            && self.mismatched.is_empty()
            && self.nodes_not_ready.is_empty()
    }

    /// One line for the report.
    pub fn summary(&self) -> String {
        let show = |v: &Vec<String>| {
            let mut s = v.iter().take(3).cloned().collect::<Vec<_>>().join(",");
            if v.len() > 3 {
                s.push_str(",...");
            }
            s
        };
        format!(
            "desired {} lost {} [{}] duplicated {} [{}] orphaned {} [{}] status-mismatch {} [{}] nodes-not-ready {} [{}]",
            self.desired,
            self.lost.len(),
            show(&self.lost),
            self.duplicated.len(),
            show(&self.duplicated),
            self.orphaned.len(),
            show(&self.orphaned),
            self.mismatched.len(),
            show(&self.mismatched),
            self.nodes_not_ready.len(),
            show(&self.nodes_not_ready),
        )
    }
}

/// Compares the desired pods (with their API status) against Podman's containers.
pub fn compare(pods: &[Pod], ctrs: &[Ctr]) -> Agreement {
    let mut a = Agreement::default();
    let desired: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    a.desired = desired.len();
    let uids: BTreeSet<&str> = desired
        .iter()
        .filter_map(|p| p.metadata.uid.as_deref())
        .collect();
    let mut by_uid: BTreeMap<&str, Vec<&Ctr>> = BTreeMap::new();
    for c in ctrs {
        by_uid.entry(c.pod_uid.as_str()).or_default().push(c);
    }
    for p in desired {
        let name = p.metadata.name.clone().unwrap_or_default();
        let uid = p.metadata.uid.as_deref().unwrap_or_default();
        let mine = by_uid.get(uid).cloned().unwrap_or_default();
        let pods_in_podman: BTreeSet<&str> = mine.iter().map(|c| c.podman_pod.as_str()).collect();
        let spec_names: Vec<String> = p
            .spec
            .iter()
            .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
            .collect();
        let mut running_ids = BTreeMap::new();
        let mut duplicated = pods_in_podman.len() > 1;
        let mut lost = false;
        for cname in &spec_names {
            let same: Vec<&&Ctr> = mine
                .iter()
                .filter(|c| c.container.as_deref() == Some(cname.as_str()))
                .collect();
            duplicated |= same.len() > 1;
            match same.iter().find(|c| c.state == "running") {
                Some(c) => {
                    running_ids.insert(cname.clone(), format!("podman://{}", c.id));
                }
                None => lost = true,
            }
        }
        if duplicated {
            a.duplicated.push(name.clone());
        }
        if lost {
            a.lost.push(name.clone());
        }
        if let Some(why) = status_mismatch(p, &running_ids) {
            a.mismatched.push(format!("{name}: {why}"));
        }
    }
    a.orphaned = by_uid
        .keys()
        .filter(|u| !uids.contains(*u))
        .map(|u| u.to_string())
        .collect();
    a
}

/// Why a pod's API status does not say what Podman runs, if it does not.
fn status_mismatch(p: &Pod, running_ids: &BTreeMap<String, String>) -> Option<String> {
    let Some(status) = p.status.as_ref() else {
        return Some("no status".into());
    };
    if status.phase.as_deref() != Some("Running") {
        return Some(format!("phase {:?}", status.phase));
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return Some("not Ready".into());
    }
    for (name, id) in running_ids {
        let cs = status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| &c.name == name);
        match cs {
            None => return Some(format!("no status for container {name}")),
            Some(cs) if cs.container_id.as_deref() != Some(id.as_str()) => {
                return Some(format!(
                    "container {name} id {:?} but Podman runs {id}",
                    cs.container_id
                ));
            }
            Some(cs)
                if !cs.ready || cs.state.as_ref().and_then(|s| s.running.as_ref()).is_none() =>
            {
                return Some(format!("container {name} not running/ready"));
            }
            Some(_) => {}
        }
    }
    None
}

/// A running hub with agents, a namespace for the workload, and cleanup of all of it on drop.
pub struct Fleet {
    /// Run-unique id: namespace, fleet, hub instance and device-name prefix.
    pub id: String,
    /// The fleet name in the inventory (all devices are in it).
    pub fleet: String,
    /// Device names.
    pub devices: Vec<String>,
    /// The hub's written setup (restartable).
    pub hub: HubSetup,
    /// The running hub, if any.
    pub hub_proc: Option<Proc>,
    /// The agents' written setups (restartable).
    pub agents: Vec<AgentSetup>,
    /// The running agents.
    pub agent_procs: Vec<Option<Proc>>,
    /// Admin client of the API server.
    pub client: kube::Client,
    /// The Podman the checks read (the stack's; sees every container in the shared storage).
    pub podman: PodmanClient,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// Starts a hub and `n` agents (devices `<id>-d<i>` in fleet `<id>`), waits for their Nodes
    /// to be Ready and creates the namespace `<id>`. `hub` and `agent` adjust the specs.
    pub async fn start(
        prefix: &str,
        n: usize,
        hub: impl FnOnce(&mut HubSpec),
        agent: impl Fn(&mut AgentSpec),
    ) -> Fleet {
        let id = unique(prefix);
        let devices: Vec<String> = (0..n).map(|i| format!("{id}-d{i}")).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let inventory: Vec<(String, String)> =
            devices.iter().map(|d| (d.clone(), id.clone())).collect();
        let mut spec = HubSpec::new(&id, &inventory);
        hub(&mut spec);
        let client = client().await;
        let stack = fleetlet_test_support::Stack::shared().expect("local stack (make env-up)");
        let mut fleet = Fleet {
            fleet: id.clone(),
            devices: devices.clone(),
            hub: HubSetup::write(dir.path(), spec),
            hub_proc: None,
            agents: Vec::new(),
            agent_procs: Vec::new(),
            client,
            podman: stack.podman(),
            dir,
            id,
        };
        fleet.hub_proc = Some(fleet.hub.spawn());
        for d in &devices {
            let mut a = AgentSpec::new(d, fleet.hub.ports.link);
            a.endpoint = fleet.hub.endpoint();
            agent(&mut a);
            let setup = AgentSetup::write(fleet.dir.path(), a);
            fleet.agent_procs.push(Some(setup.spawn()));
            fleet.agents.push(setup);
        }
        fleet.wait_nodes_ready(120).await;
        create_namespace(&fleet.client, &fleet.id).await;
        fleet
    }

    /// The directory holding PKI, configs, state and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until every Node is Ready and untainted.
    pub async fn wait_nodes_ready(&self, secs: u64) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        for d in &self.devices {
            wait_for("node Ready from its real agent", secs, || async {
                let n = nodes.get(d).await.ok()?;
                node_ready(&n).then_some(())
            })
            .await;
        }
    }

    /// The Ready condition's status of each Node ("True", "Unknown", ...).
    pub async fn node_ready_status(&self) -> BTreeMap<String, String> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let mut out = BTreeMap::new();
        for d in &self.devices {
            let s = match nodes.get(d).await {
                Ok(n) => n
                    .status
                    .and_then(|s| s.conditions)
                    .into_iter()
                    .flatten()
                    .find(|c| c.type_ == "Ready")
                    .map_or_else(|| "none".to_string(), |c| c.status),
                Err(e) => format!("error: {e}"),
            };
            out.insert(d.clone(), s);
        }
        out
    }

    /// Pods api of the namespace.
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.id)
    }

    /// Creates a bare pod bound to `node` running `sleep`. With `tolerate_partition`, it tolerates
    /// the unreachable/not-ready NoExecute taints for ever (an edge workload that must stay put).
    pub async fn create_pod(&self, name: &str, node: &str, tolerate_partition: bool) {
        let mut tolerations = vec![
            json!({"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "fleetlet", "effect": "NoSchedule"}),
        ];
        if tolerate_partition {
            for key in [
                "node.kubernetes.io/unreachable",
                "node.kubernetes.io/not-ready",
            ] {
                tolerations.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute"}));
            }
        }
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": "fault"}},
            "spec": {
                "nodeName": node,
                "tolerations": tolerations,
                "terminationGracePeriodSeconds": 2,
                "containers": [{"name": "app", "image": TEST_IMAGE,
                                "command": ["sh", "-c", "exec sleep 36000"]}]
            }
        }))
        .expect("pod");
        self.pods()
            .create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
    }

    /// Creates a Deployment of `replicas` sleeping pods on this fleet's devices.
    pub async fn create_deployment(&self, name: &str, replicas: i32) {
        let api: Api<k8s_openapi::api::apps::v1::Deployment> =
            Api::namespaced(self.client.clone(), &self.id);
        let d = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "nodeSelector": {"flightctl.io/fleet": self.fleet},
                        "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "fleetlet", "effect": "NoSchedule"}],
                        "terminationGracePeriodSeconds": 2,
                        "containers": [{"name": "app", "image": TEST_IMAGE,
                                        "command": ["sh", "-c", "exec sleep 36000"]}]
                    }
                }
            }
        }))
        .expect("deployment");
        api.create(&PostParams::default(), &d)
            .await
            .expect("create deployment");
    }

    /// Containers of this fleet's devices in Podman (`podman` = the Podman to ask).
    pub async fn containers_via(&self, podman: &PodmanClient) -> Option<Vec<Ctr>> {
        fleetlet_containers(podman, &self.devices).await.ok()
    }

    /// Containers of this fleet's devices, from the stack's Podman.
    pub async fn containers(&self) -> Option<Vec<Ctr>> {
        self.containers_via(&self.podman).await
    }

    /// The API's pods and Podman's containers compared now (`None` when either cannot be read).
    pub async fn agreement(&self) -> Option<Agreement> {
        let pods = self.pods().list(&ListParams::default()).await.ok()?.items;
        let ctrs = self.containers().await?;
        let mut a = compare(&pods, &ctrs);
        a.nodes_not_ready = self
            .node_ready_status()
            .await
            .into_iter()
            .filter(|(_, s)| s != "True")
            .map(|(n, s)| format!("{n}={s}"))
            .collect();
        Some(a)
    }

    /// Polls until the system has converged on `expected` desired pods or `timeout` passes.
    /// Returns the seconds it took (`None` if it did not) and the last comparison.
    pub async fn converge(&self, expected: usize, timeout: Duration) -> (Option<f64>, Agreement) {
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        let mut last = Agreement::default();
        // Bounded: at most timeout / 250 ms rounds.
        while tokio::time::Instant::now() < deadline {
            if let Some(a) = self.agreement().await {
                if a.converged(expected) {
                    return (Some(start.elapsed().as_secs_f64()), a);
                }
                last = a;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        (None, last)
    }

    /// Kills (SIGKILL) the hub.
    pub fn kill_hub(&mut self) {
        if let Some(p) = self.hub_proc.take() {
            p.kill9();
        }
    }

    /// Starts the hub again with the same configuration.
    pub fn restart_hub(&mut self) {
        self.hub_proc = Some(self.hub.spawn());
    }

    /// Kills (SIGKILL) agent `i`.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(p) = self.agent_procs[i].take() {
            p.kill9();
        }
    }

    /// Starts agent `i` again with the same configuration and state directory.
    pub fn restart_agent(&mut self, i: usize) {
        self.agent_procs[i] = Some(self.agents[i].spawn());
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Agents first, so nothing recreates the containers being removed.
        for p in self.agent_procs.iter_mut() {
            drop(p.take());
        }
        drop(self.hub_proc.take());
        if std::thread::panicking() {
            for log in ["hub.log"].iter().map(|l| self.dir.path().join(l)).chain(
                self.devices
                    .iter()
                    .map(|d| self.dir.path().join(format!("agent-{d}.log"))),
            ) {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("----- last lines of {} -----", log.display());
                for l in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{l}");
                }
            }
        }
        for d in &self.devices {
            remove_device_containers(d);
        }
        let kubectl = std::env::var("FLEETLET_KUBECTL").unwrap_or_else(|_| "kubectl".into());
        let _ = std::process::Command::new(kubectl)
            .arg("--kubeconfig")
            .arg(fleetlet_test_support::harness::kube_config_path())
            .args([
                "-n",
                "fleetlet-system",
                "delete",
                "lease",
                &self.id,
                "--ignore-not-found",
            ])
            .output();
        drop(KubeCleanup {
            nodes: self.devices.clone(),
            namespace: Some(self.id.clone()),
        });
    }
}

/// Records an outcome, printing it too (the report file is what `faults-summary` reads).
pub fn record_outcome(outcome: &crate::Outcome) {
    println!("fault outcome: {outcome:?}");
    if let Err(e) = crate::record(outcome) {
        eprintln!("cannot record the fault outcome: {e}");
    }
}
