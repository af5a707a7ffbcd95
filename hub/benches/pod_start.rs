//! Pod start latency on the real control plane (`make env-up`): the real `fleetlet-hub` binary,
//! `BENCH_AGENTS` (10) real `fleetlet-agent` processes over the real mTLS link (production
//! resync interval), the stack's Podman, kube-scheduler binding bare busybox pods.
//!
//! Two figures, each over its own set of pods:
//!
//! - **steady arrival** (the latency figure): `BENCH_STEADY_PODS` (100) pods created one after
//!   the other, one every `BENCH_INTERVAL_MS` (1000) ms, spread by the scheduler over the agents;
//! - **burst** (a throughput figure): `BENCH_BURST_PODS` (100) pods created at once (16 creates in
//!   flight), which queue behind the one Podman service the agents share.
//!
//! A pod watch started before the pods are created records, on the wall clock, when it first
//! sees each pod bound (spec.nodeName set) and when it first sees it Running and Ready; the
//! figures are p50 / p90 / p99 / max of bound → Running+Ready (targets p50 <= 0.5 s,
//! p99 <= 1 s). The stages in between are read from the hub's and agents' logs (`stages.rs`),
//! so the time is attributed to hub, link, disk, Podman and API. Before the pods, the Podman
//! floor is measured directly: the REST calls the agent makes for such a pod, timed one by one.
//! Figures only. Everything is removed afterwards (namespace, Nodes, the devices' Podman pods),
//! also when the run fails; every wait is bounded.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use fleetlet_agent::podman::{ContainerCreate, Namespace, PodCreate, PodmanClient};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio::sync::mpsc;

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "pod_start/stages.rs"]
mod stages;
use common::{
    AgentSetup, AgentSpec, HubSetup, HubSpec, KubeCleanup, client, create_namespace, node_ready,
    unique,
};
use stages::{Observed, RunLogs, STAGES};

/// Bound on every phase of the run.
const PHASE_SECS: u64 = 300;
/// Podman floor samples.
const FLOOR_RUNS: usize = 5;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Removes the devices' Podman pods on drop (after the agents are gone).
struct PodmanCleanup(Vec<String>);

impl Drop for PodmanCleanup {
    fn drop(&mut self) {
        for d in &self.0 {
            common::remove_device_containers(d);
        }
    }
}

#[derive(Default, Clone)]
struct Seen {
    node: Option<String>,
    bound: Option<Timestamp>,
    running: Option<Timestamp>,
}

fn running_ready(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Running")
            && s.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn stats(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let mean = if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    };
    format!(
        "n={:3} p50={:.3} p90={:.3} p99={:.3} max={:.3} mean={:.3} s",
        v.len(),
        percentile(&v, 50.0),
        percentile(&v, 90.0),
        percentile(&v, 99.0),
        v.last().copied().unwrap_or(f64::NAN),
        mean
    )
}

fn secs(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64()
}

/// A bare busybox pod in the run's own fleet.
fn bench_pod(name: &str, fleet: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"flightctl.io/fleet": fleet},
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "fleetlet", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": "localhost/fleetlet-test/busybox:1",
                            "command": ["sleep", "3600"]}]
        }
    }))
    .expect("pod")
}

/// Times the Podman calls the agent makes to start a bridge-network pod with one container,
/// straight against the stack's Podman service, `FLOOR_RUNS` times. Objects carry no fleetlet
/// device label, so no agent touches them; they are removed after each sample.
async fn podman_floor(id: &str) {
    let rt = PodmanClient::new(common::podman_socket());
    let image = std::env::var("FLEETLET_TEST_IMAGE")
        .unwrap_or_else(|_| "localhost/fleetlet-test/busybox:1".into());
    let steps = [
        "pod create",
        "pod start (infra, network)",
        "inspect infra",
        "inspect image",
        "container create",
        "container start",
        "inspect container",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); steps.len() + 1];
    for i in 0..FLOOR_RUNS {
        let name = format!("{id}-floor-{i}");
        let labels = std::collections::BTreeMap::from([("io.fleetlet.bench".into(), id.into())]);
        let mut t = Timestamp::now();
        let t0 = t;
        let mut lap = |k: usize, samples: &mut Vec<Vec<f64>>| {
            let now = Timestamp::now();
            samples[k].push(secs(t, now));
            t = now;
        };
        let run = async {
            rt.create_pod(&PodCreate {
                name: name.clone(),
                labels: labels.clone(),
                hostname: Some("floor".into()),
                netns: Namespace {
                    nsmode: "bridge".into(),
                    value: String::new(),
                },
                utsns: None,
                portmappings: Vec::new(),
                ..Default::default()
            })
            .await?;
            lap(0, &mut samples);
            rt.start_pod(&name).await?;
            lap(1, &mut samples);
            let infra = rt
                .list_containers(&[format!("io.fleetlet.bench={id}")])
                .await?;
            if let Some(c) = infra.first() {
                rt.inspect_container(&c.id).await?;
            }
            lap(2, &mut samples);
            let img = rt.inspect_image(&image).await?;
            lap(3, &mut samples);
            let cid = rt
                .create_container(&ContainerCreate {
                    name: format!("{name}-app"),
                    pod: name.clone(),
                    image: img.map(|i| i.id).unwrap_or_else(|| image.clone()),
                    entrypoint: Some(vec!["sleep".into(), "3600".into()]),
                    command: Some(Vec::new()),
                    labels: labels.clone(),
                    stop_signal: 15,
                    stop_timeout: 1,
                    restart_policy: "no".into(),
                    ..Default::default()
                })
                .await?;
            lap(4, &mut samples);
            rt.start_container(&cid).await?;
            lap(5, &mut samples);
            rt.inspect_container(&cid).await?;
            lap(6, &mut samples);
            Ok::<_, fleetlet_agent::podman::PodmanError>(())
        };
        let r = run.await;
        samples[steps.len()].push(secs(t0, Timestamp::now()));
        if let Err(e) = r {
            eprintln!("pod start bench: podman floor sample {i}: {e}");
        }
        if let Err(e) = rt.remove_pod(&name).await {
            eprintln!("pod start bench: removing {name}: {e}");
        }
    }
    println!("Podman floor (REST calls of one bridge pod with one container, {FLOOR_RUNS} runs):");
    for (k, step) in steps.iter().enumerate() {
        println!("  {step:<28} {}", stats(samples[k].clone()));
    }
    println!("  {:<28} {}", "total", stats(samples[steps.len()].clone()));
}

/// Creates `names` in `pods`, either all at once (16 in flight) or one every `interval`.
async fn create_pods(pods: &Api<Pod>, fleet: &str, names: &[String], interval: Option<Duration>) {
    match interval {
        Some(every) => {
            let mut tick = tokio::time::interval(every);
            for name in names {
                tick.tick().await;
                if let Err(e) = pods
                    .create(&PostParams::default(), &bench_pod(name, fleet))
                    .await
                {
                    eprintln!("pod start bench: create {name}: {e}");
                }
            }
        }
        None => {
            let results = futures::stream::iter(names)
                .map(|name| {
                    let pods = pods.clone();
                    async move {
                        pods.create(&PostParams::default(), &bench_pod(name, fleet))
                            .await
                            .map_err(|e| (name, e))
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<_>>()
                .await;
            for r in results {
                if let Err((name, e)) = r {
                    eprintln!("pod start bench: create {name}: {e}");
                }
            }
        }
    }
}

/// Folds watch observations until every pod in `names` was seen Running+Ready (bounded).
async fn wait_running(
    rx: &mut mpsc::UnboundedReceiver<(String, Option<String>, bool, Timestamp)>,
    seen: &mut HashMap<String, Seen>,
    names: &[String],
) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(PHASE_SECS);
    let count = |seen: &HashMap<String, Seen>| {
        names
            .iter()
            .filter(|n| seen.get(*n).is_some_and(|s| s.running.is_some()))
            .count()
    };
    while count(seen) < names.len() {
        let Ok(Some((name, node, running, at))) =
            tokio::time::timeout_at(deadline, rx.recv()).await
        else {
            eprintln!(
                "pod start bench: only {}/{} pods Running+Ready after {PHASE_SECS} s",
                count(seen),
                names.len()
            );
            break;
        };
        let s = seen.entry(name).or_default();
        if node.is_some() && s.bound.is_none() {
            s.bound = Some(at);
            s.node = node;
        }
        if running && s.running.is_none() {
            s.running = Some(at);
        }
    }
    count(seen)
}

/// Deletes every pod of the namespace and waits (bounded) until they are gone, so the next
/// phase starts with idle devices.
async fn delete_all(pods: &Api<Pod>) {
    let _ = pods
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    let gone = tokio::time::timeout(Duration::from_secs(180), async {
        loop {
            match pods.list(&ListParams::default()).await {
                Ok(l) if l.items.is_empty() => return,
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    })
    .await;
    if gone.is_err() {
        eprintln!("pod start bench: pods still present after 180 s; forcing cleanup");
    }
}

/// Prints the figures of one phase and its stage breakdown.
fn report(
    label: &str,
    names: &[String],
    seen: &HashMap<String, Seen>,
    logs: &RunLogs,
    namespace: &str,
) {
    let observed: Vec<Observed> = names
        .iter()
        .filter_map(|n| {
            let s = seen.get(n)?;
            Some(Observed {
                name: n.clone(),
                node: s.node.clone()?,
                bound: s.bound?,
                running: s.running?,
            })
        })
        .collect();
    println!();
    println!(
        "== {label}: {}/{} pods Running+Ready",
        observed.len(),
        names.len()
    );
    println!(
        "bound -> Running+Ready (target p50 <= 0.5 s, p99 <= 1 s): {}",
        stats(observed.iter().map(|o| secs(o.bound, o.running)).collect())
    );
    let mut per_stage: Vec<Vec<f64>> = vec![Vec::new(); STAGES.len()];
    let mut complete = 0;
    for o in &observed {
        let p = logs.points(o, namespace);
        if p.iter().all(Option::is_some) {
            complete += 1;
        }
        for (k, w) in p.windows(2).enumerate() {
            if let [Some(a), Some(b)] = w {
                per_stage[k].push(secs(*a, *b));
            }
        }
    }
    println!(
        "stages (from hub and agent logs; {complete}/{} pods with every stage found):",
        observed.len()
    );
    for (k, name) in STAGES.iter().enumerate() {
        println!("  {name:<56} {}", stats(per_stage[k].clone()));
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let agents = env_usize("BENCH_AGENTS", 10);
    let steady_n = env_usize("BENCH_STEADY_PODS", 100);
    let burst_n = env_usize("BENCH_BURST_PODS", 100);
    let interval = Duration::from_millis(env_usize("BENCH_INTERVAL_MS", 1000) as u64);
    let id = unique("podstart");
    let devices: Vec<(String, String)> = (0..agents)
        .map(|i| (format!("{id}-d{i:02}"), id.clone()))
        .collect();
    let names: Vec<String> = devices.iter().map(|(n, _)| n.clone()).collect();
    // Drop order is reverse declaration: agents and hub die first, then Podman, then the API.
    let _kube_cleanup = KubeCleanup {
        nodes: names.clone(),
        namespace: Some(id.clone()),
    };
    let _podman_cleanup = PodmanCleanup(names.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    // Debug lines of the relay and status writer, of the agents' link and pod workers: the
    // stage timestamps. The agents keep the production resync interval (60 s).
    let hub = HubSetup::write(dir.path(), HubSpec::new(&id, &devices));
    let _hub = hub.spawn_with(|cmd| {
        cmd.env("RUST_LOG", "info,fleetlet_hub::pods=debug");
    });
    let ports = hub.ports;
    let _agents: Vec<_> = names
        .iter()
        .map(|n| {
            AgentSetup::write(dir.path(), AgentSpec::new(n, ports.link)).spawn_with(|cmd| {
                cmd.args(["--resync-secs", "60"])
                    .env(
                        "RUST_LOG",
                        "info,fleetlet_agent::pod::worker=debug,fleetlet_agent::link=debug",
                    )
                    .env("FLEETLET_AGENT_LOG", "stderr");
            })
        })
        .collect();

    podman_floor(&id).await;

    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let t0 = tokio::time::Instant::now();
    common::wait_for(
        "every Node Ready from its real agent",
        PHASE_SECS,
        || async {
            let list = nodes.list(&ListParams::default()).await.ok()?;
            let ready = list
                .items
                .iter()
                .filter(|n| {
                    n.metadata
                        .name
                        .as_ref()
                        .is_some_and(|name| names.contains(name))
                        && node_ready(n)
                })
                .count();
            (ready == names.len()).then_some(())
        },
    )
    .await;
    println!(
        "{agents} agents connected, Nodes Ready in {:.2} s",
        t0.elapsed().as_secs_f64()
    );

    create_namespace(&client, &id).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &id);
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Option<String>, bool, Timestamp)>();
    let watch_api = pods.clone();
    let watch = tokio::spawn(async move {
        let stream = watcher::watcher(watch_api, watcher::Config::default());
        futures::pin_mut!(stream);
        while let Ok(Some(ev)) = stream.try_next().await {
            let at = Timestamp::now();
            let objs: Vec<Pod> = match ev {
                Event::Apply(p) | Event::InitApply(p) => vec![p],
                _ => Vec::new(),
            };
            for p in objs {
                let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
                let name = p.metadata.name.clone().unwrap_or_default();
                if tx.send((name, node, running_ready(&p), at)).is_err() {
                    return;
                }
            }
        }
    });
    // Let the watch establish before anything is created.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut seen: HashMap<String, Seen> = HashMap::new();
    let steady: Vec<String> = (0..steady_n).map(|i| format!("s{i:03}")).collect();
    let burst: Vec<String> = (0..burst_n).map(|i| format!("b{i:03}")).collect();
    let mut ok = true;

    // Steady arrival. The waiting runs concurrently with the creates so the watch queue is
    // folded as it comes.
    let creating = create_pods(&pods, &id, &steady, Some(interval));
    let (_, done) = tokio::join!(creating, wait_running(&mut rx, &mut seen, &steady));
    ok &= done == steady.len();
    delete_all(&pods).await;

    // Burst.
    let creating = create_pods(&pods, &id, &burst, None);
    let (_, done) = tokio::join!(creating, wait_running(&mut rx, &mut seen, &burst));
    ok &= done == burst.len();
    watch.abort();

    let agent_logs: Vec<(String, std::path::PathBuf)> = names
        .iter()
        .map(|n| (n.clone(), dir.path().join(format!("agent-{n}.log"))))
        .collect();
    let logs = RunLogs::read(&hub.log(), &agent_logs);
    println!("{agents} real agents, one shared Podman service");
    report(
        &format!("steady arrival, one pod every {} ms", interval.as_millis()),
        &steady,
        &seen,
        &logs,
        &id,
    );
    report(
        "burst, all pods created at once (throughput, not latency)",
        &burst,
        &seen,
        &logs,
        &id,
    );

    // Orderly teardown: delete the pods so the agents remove them from Podman, bounded.
    delete_all(&pods).await;
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
