//! Pod start latency on the real control plane (`make env-up`): the real `fleetlet-hub` binary,
//! `BENCH_AGENTS` (10) real `fleetlet-agent` processes over the real mTLS link, the stack's
//! Podman, kube-scheduler binding `BENCH_PODS` (100) bare pods created at once.
//!
//! A pod watch started before the pods are created records, with this process's monotonic
//! clock, when it first sees each pod bound (spec.nodeName set) and when it first sees it Running
//! and Ready. Prints the count and p50 / p90 / p99 / max of binding → Running+Ready (targets
//! p50 <= 0.5 s, p99 <= 1 s), and of creation → Running+Ready for context. Figures only.
//! Everything is removed afterwards (namespace, Nodes, the devices' Podman pods), also when the
//! run fails; every wait is bounded.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio::time::Instant;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{KubeCleanup, client, create_namespace, node_ready, start_agent, start_hub, unique};

/// Bound on every phase of the run.
const PHASE_SECS: u64 = 300;

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

#[derive(Default, Clone, Copy)]
struct Seen {
    created: Option<Instant>,
    bound: Option<Instant>,
    running: Option<Instant>,
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

fn print_stats(what: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    println!(
        "{what}: n={} p50={:.3} s p90={:.3} s p99={:.3} s max={:.3} s",
        v.len(),
        percentile(&v, 50.0),
        percentile(&v, 90.0),
        percentile(&v, 99.0),
        v.last().copied().unwrap_or(f64::NAN)
    );
}

#[tokio::main]
async fn main() -> ExitCode {
    let agents = env_usize("BENCH_AGENTS", 10);
    let pods_n = env_usize("BENCH_PODS", 100);
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
    let (_hub, ports) = start_hub(dir.path(), &id, &devices);
    let _agents: Vec<_> = names
        .iter()
        .map(|n| start_agent(dir.path(), n, ports.link))
        .collect();

    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let t0 = Instant::now();
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
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, bool, bool)>();
    let watch_api = pods.clone();
    let watch = tokio::spawn(async move {
        let stream = watcher::watcher(watch_api, watcher::Config::default());
        futures::pin_mut!(stream);
        while let Ok(Some(ev)) = stream.try_next().await {
            let objs: Vec<Pod> = match ev {
                Event::Apply(p) | Event::InitApply(p) => vec![p],
                _ => Vec::new(),
            };
            for p in objs {
                let bound = p.spec.as_ref().is_some_and(|s| s.node_name.is_some());
                let name = p.metadata.name.clone().unwrap_or_default();
                if tx.send((name, bound, running_ready(&p))).is_err() {
                    return;
                }
            }
        }
    });
    // Let the watch establish before anything is created.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut seen: HashMap<String, Seen> = HashMap::new();
    let creates = futures::stream::iter(0..pods_n)
        .map(|i| {
            let pods = pods.clone();
            let fleet = id.clone();
            async move {
                let name = format!("p{i:03}");
                // The fleet is the run's own: other work on the shared stack has its own Nodes.
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {
                        "nodeSelector": {"flightctl.io/fleet": fleet},
                        "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "fleetlet", "effect": "NoSchedule"}],
                        "terminationGracePeriodSeconds": 1,
                        "containers": [{"name": "app", "image": "localhost/fleetlet-test/busybox:1",
                                        "command": ["sleep", "3600"]}]
                    }
                }))
                .expect("pod");
                let at = Instant::now();
                pods.create(&PostParams::default(), &pod)
                    .await
                    .map(|_| (name, at))
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    for c in creates {
        match c {
            Ok((name, at)) => seen.entry(name).or_default().created = Some(at),
            Err(e) => eprintln!("pod start bench: create: {e}"),
        }
    }

    let deadline = Instant::now() + Duration::from_secs(PHASE_SECS);
    let mut done = 0;
    while done < pods_n {
        let Ok(Some((name, bound, running))) = tokio::time::timeout_at(deadline, rx.recv()).await
        else {
            eprintln!(
                "pod start bench: only {done}/{pods_n} pods Running+Ready after {PHASE_SECS} s"
            );
            break;
        };
        let now = Instant::now();
        let s = seen.entry(name).or_default();
        if bound && s.bound.is_none() {
            s.bound = Some(now);
        }
        if running && s.running.is_none() {
            s.running = Some(now);
            done += 1;
        }
    }
    watch.abort();

    let mut bind_to_run = Vec::new();
    let mut create_to_run = Vec::new();
    for s in seen.values() {
        if let (Some(b), Some(r)) = (s.bound, s.running) {
            bind_to_run.push(r.duration_since(b).as_secs_f64());
        }
        if let (Some(c), Some(r)) = (s.created, s.running) {
            create_to_run.push(r.duration_since(c).as_secs_f64());
        }
    }
    println!("pods Running+Ready: {done}/{pods_n} over {agents} real agents");
    print_stats(
        "binding -> Running+Ready (target p50 <= 0.5 s, p99 <= 1 s)",
        bind_to_run,
    );
    print_stats("creation -> Running+Ready", create_to_run);

    // Orderly teardown: delete the pods so the agents remove them from Podman, bounded.
    let _ = pods
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    let gone = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match pods.list(&ListParams::default()).await {
                Ok(l) if l.items.is_empty() => return,
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    })
    .await;
    if gone.is_err() {
        eprintln!("pod start bench: pods still present after 120 s; forcing cleanup");
    }
    if done == pods_n {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
