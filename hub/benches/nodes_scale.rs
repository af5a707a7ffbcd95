//! Node keeping at scale against the real kube-apiserver (`make env-up`): N simulated devices
//! (default 500, `BENCH_DEVICES`) in 10 fleets connect at once through an in-memory link (the
//! gRPC/mTLS link is LINK's and is measured by its own benchmark). Prints the time until every
//! Node is Ready, then the hub's API request rate, CPU and RSS over a steady-state window
//! (`BENCH_STEADY_SECS`, default 30). Figures only; nothing is asserted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleetlet_hub::app::start_controllers;
use fleetlet_hub::config::HubConfig;
use fleetlet_hub::inventory::InventoryDevice;
use fleetlet_hub::metrics::Metrics;
use fleetlet_hub::sessions::{LinkError, LiveRegistry, LiveSet, LogStream, SessionEvent, Sessions};
use fleetlet_proto::v1::{Capacity, Hello, LogRequest, NodeInfo, PodBundle};
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

struct NullLink {
    live: LiveRegistry,
}

impl Sessions for NullLink {
    fn request_stats(&self, _device: &str) {}

    fn set_desired(
        &self,
        _device: &str,
        _pods: Vec<PodBundle>,
        _grace: std::collections::HashMap<String, u64>,
    ) -> u64 {
        1
    }
    fn is_connected(&self, _device: &str) -> bool {
        true
    }
    fn live(&self) -> watch::Receiver<LiveSet> {
        self.live.subscribe()
    }
    fn open_logs(
        &self,
        device: &str,
        _req: LogRequest,
    ) -> BoxFuture<'static, Result<LogStream, LinkError>> {
        let device = device.to_string();
        Box::pin(async {
            Err(LinkError::Device {
                device,
                message: "no logs in the benchmark".into(),
            })
        })
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (utime + stime in clock ticks, RSS in KiB) of this process.
fn cpu_and_rss() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is field 3 → index 0; utime is field 14 → index 11.
    let ticks = fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks, rss)
}

fn api_requests(metrics: &Metrics) -> u64 {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("fleetlet_hub_api_requests_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

#[tokio::main]
async fn main() {
    let n = env_num("BENCH_DEVICES", 500) as usize;
    let steady = Duration::from_secs(env_num("BENCH_STEADY_SECS", 30));
    let dir = std::env::var("FLEETLET_DEV_DIR").unwrap_or_else(|_| "/var/tmp/fleetlet-dev".into());
    let kc = kube::config::Kubeconfig::read_from(format!("{dir}/kubeconfig"))
        .expect("kubeconfig: run `make env-up`");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    let client = kube::Client::try_from(cfg).expect("client");
    let instance = format!("bench-{}", std::process::id());
    let devices: BTreeMap<String, InventoryDevice> = (0..n)
        .map(|i| {
            let name = format!("{instance}-{i:05}");
            (
                name.clone(),
                InventoryDevice {
                    name,
                    labels: BTreeMap::new(),
                    fleet: Some(format!("fleet-{}", i % 10)),
                    enabled: true,
                },
            )
        })
        .collect();
    let names: Vec<String> = devices.keys().cloned().collect();
    let mut hub_cfg = HubConfig::default();
    hub_cfg.nodes.instance = instance.clone();
    let (_inv_tx, inv_rx) = watch::channel(Arc::new(devices));
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    // The link publishes what it learns into its live view before handing the event on.
    let live = LiveRegistry::new();
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let (cpu0, _) = cpu_and_rss();
    let started = Instant::now();
    start_controllers(
        &mut tasks,
        client.clone(),
        &hub_cfg,
        &instance,
        Arc::new(NullLink { live: live.clone() }),
        ev_rx,
        inv_rx,
        None,
        metrics.clone(),
        shutdown.clone(),
    );
    let res = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    for name in &names {
        let info = NodeInfo {
            operating_system: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        };
        for ev in [
            SessionEvent::Connected {
                device: name.clone(),
                hello: Hello {
                    node_info: Some(info.clone()),
                    ..Default::default()
                },
            },
            SessionEvent::Capacity {
                device: name.clone(),
                capacity: Capacity {
                    capacity: res(&[("cpu", "4"), ("memory", "8Gi"), ("pods", "110")]),
                    allocatable: res(&[("cpu", "4"), ("memory", "8Gi"), ("pods", "110")]),
                    node_info: Some(info),
                    conditions: Vec::new(),
                },
            },
        ] {
            live.apply(&ev);
            let _ = ev_tx.send(ev).await;
        }
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let selector = format!("fleetlet.io/managed-by={instance}");
    let deadline = started + Duration::from_secs(600);
    loop {
        let ready = nodes
            .list(&ListParams::default().labels(&selector))
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|n| {
                        n.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                    })
                    .count()
            })
            .unwrap_or(0);
        if ready == n {
            break;
        }
        if Instant::now() > deadline {
            println!("only {ready}/{n} nodes Ready after 600 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let to_ready = started.elapsed();
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let (cpu1, rss1) = cpu_and_rss();
    let req1 = api_requests(&metrics);
    println!("devices: {n} in 10 fleets (in-memory link, real kube-apiserver on this host)");
    println!(
        "time until all Nodes Ready: {:.2} s ({} API requests, hub CPU {:.2} s)",
        to_ready.as_secs_f64(),
        req1,
        (cpu1 - cpu0) as f64 / ticks_per_sec
    );
    tokio::time::sleep(steady).await;
    let (cpu2, rss2) = cpu_and_rss();
    let req2 = api_requests(&metrics);
    let secs = steady.as_secs_f64();
    println!(
        "steady state over {secs:.0} s: {:.1} API requests/s, hub CPU {:.1} % of one core, RSS {} KiB (after ready: {} KiB), {:.1} KiB RSS per device",
        (req2 - req1) as f64 / secs,
        (cpu2 - cpu1) as f64 / ticks_per_sec / secs * 100.0,
        rss2,
        rss1,
        rss2 as f64 / n as f64
    );
    println!("API requests by operation:");
    for l in metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("fleetlet_hub_api_requests_total{"))
    {
        println!("  {l}");
    }
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    // Clean up: nodes and their leases.
    let _ = nodes
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&selector),
        )
        .await;
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    for name in &names {
        let _ = leases.delete(name, &DeleteParams::default()).await;
    }
}
