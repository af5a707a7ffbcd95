//! The hub at scale on the real control plane (`make env-up`): the real `fleetlet-hub` binary
//! with a static inventory of `BENCH_DEVICES` (500) devices in 10 fleets; every device is a
//! simulated agent in this process (the agent's real link client, `run_link` with an in-memory
//! device state) connecting over real gRPC and mTLS; the hub keeps their Nodes and Leases in
//! the real kube-apiserver.
//!
//! Prints the time from the first connection until every Node is Ready (no
//! `node.kubernetes.io/` taint), then over a steady-state window (`BENCH_STEADY_SECS`, 30 s,
//! after a 10 s settle) the hub process's CPU (from /proc/<pid>/stat) and RSS (sampled from
//! /proc/<pid>/status every second: median and max) and its Kubernetes API requests per second
//! (the hub's own `fleetlet_hub_api_requests_total` on its /metrics), by operation. Figures
//! only. Nodes and Leases are deleted afterwards, also when the run fails.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use fleetlet_agent::link::memory::MemoryDeviceState;
use fleetlet_agent::link::{DeviceState, LinkConfig, run_link};
use fleetlet_proto::v1;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::ListParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{client, node_ready, start_hub, unique};

/// USER_HZ on Linux.
const TICKS_PER_SEC: f64 = 100.0;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Deletes the bench's Nodes (by the hub's managed-by label) and their Leases on drop.
struct Cleanup {
    instance: String,
    nodes: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let kubectl = std::env::var("FLEETLET_KUBECTL").unwrap_or_else(|_| "kubectl".into());
        let kc = common::kube_config_path();
        let run = |args: &[&str]| {
            let _ = std::process::Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(&kc)
                .args(args)
                .output();
        };
        let selector = format!("fleetlet.io/managed-by={}", self.instance);
        run(&["delete", "nodes", "-l", &selector, "--wait=false"]);
        let mut args = vec![
            "delete",
            "leases",
            "-n",
            "kube-node-lease",
            "--ignore-not-found",
            "--wait=false",
        ];
        args.extend(self.nodes.iter().map(String::as_str));
        run(&args);
    }
}

/// (utime + stime in clock ticks, RSS in KiB) of process `pid`.
fn cpu_and_rss(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime is field 14, stime 15: indices 11 and 12 after the state (field 3).
    let ticks = field(11) + field(12);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks, rss)
}

/// The hub's API request counters from its /metrics: operation labels → count.
async fn api_requests(ops_port: u16) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", ops_port)).await else {
        return out;
    };
    let req = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).await.is_err() {
        return out;
    }
    let mut body = String::new();
    if tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body))
        .await
        .is_err()
    {
        return out;
    }
    for l in body.lines() {
        if let Some(rest) = l.strip_prefix("fleetlet_hub_api_requests_total")
            && let Some((labels, value)) = rest.rsplit_once(' ')
            && let Ok(v) = value.trim().parse::<f64>()
        {
            out.insert(labels.to_string(), v as u64);
        }
    }
    out
}

#[tokio::main]
async fn main() -> ExitCode {
    let n = env_u64("BENCH_DEVICES", 500) as usize;
    let steady = Duration::from_secs(env_u64("BENCH_STEADY_SECS", 30));
    let id = unique("hubscale");
    let devices: Vec<(String, String)> = (0..n)
        .map(|i| (format!("{id}-d{i:03}"), format!("fleet-{}", i % 10)))
        .collect();
    let names: Vec<String> = devices.iter().map(|(d, _)| d.clone()).collect();
    let _cleanup = Cleanup {
        instance: id.clone(),
        nodes: names.clone(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (hub, ports) = start_hub(dir.path(), &id, &devices);
    let pid = hub.id();
    // Let the hub start its listeners and controllers before the devices dial.
    let client = client().await;
    common::wait_for("hub /metrics", 60, || async {
        (!api_requests(ports.ops).await.is_empty()
            || tokio::net::TcpStream::connect(("127.0.0.1", ports.ops))
                .await
                .is_ok())
        .then_some(())
    })
    .await;
    let (cpu0, rss0) = cpu_and_rss(pid);

    let stop = CancellationToken::new();
    let mut tasks = Vec::with_capacity(n);
    let started = Instant::now();
    for name in &names {
        let state = MemoryDeviceState::new(name.clone());
        state.set_capacity(v1::Capacity {
            capacity: [
                ("cpu".to_owned(), "2".to_owned()),
                ("memory".to_owned(), "4Gi".to_owned()),
                ("pods".to_owned(), "110".to_owned()),
            ]
            .into(),
            ..Default::default()
        });
        let cfg = LinkConfig::new(
            format!("https://127.0.0.1:{}", ports.link),
            dir.path().join("link-ca.crt"),
            dir.path().join(format!("{name}.crt")),
            dir.path().join(format!("{name}.key")),
        );
        tasks.push(tokio::spawn(run_link(
            cfg,
            state as Arc<dyn DeviceState>,
            stop.clone(),
        )));
    }

    let nodes: Api<Node> = Api::all(client.clone());
    let selector = format!("fleetlet.io/managed-by={id}");
    let deadline = started + Duration::from_secs(600);
    let mut all_ready = false;
    let mut ready = 0;
    while Instant::now() < deadline {
        ready = nodes
            .list(&ListParams::default().labels(&selector))
            .await
            .map(|l| l.items.iter().filter(|n| node_ready(n)).count())
            .unwrap_or(0);
        if ready == n {
            all_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let to_ready = started.elapsed().as_secs_f64();
    let (cpu1, rss1) = cpu_and_rss(pid);
    let req1: u64 = api_requests(ports.ops).await.values().sum();
    println!(
        "devices: {n} in 10 fleets, simulated in-process over real gRPC/mTLS; real hub process (pid {pid}); real kube-apiserver"
    );
    if !all_ready {
        println!("only {ready}/{n} Nodes Ready after 600 s");
    }
    println!(
        "time until all Nodes Ready: {to_ready:.2} s ({req1} API requests; hub CPU {:.2} s; RSS {rss0} -> {rss1} KiB)",
        cpu1.saturating_sub(cpu0) as f64 / TICKS_PER_SEC
    );

    tokio::time::sleep(Duration::from_secs(10)).await;
    let by_op0 = api_requests(ports.ops).await;
    let (cpu_a, _) = cpu_and_rss(pid);
    let t_a = Instant::now();
    let mut rss_samples = Vec::new();
    while t_a.elapsed() < steady {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_samples.push(cpu_and_rss(pid).1);
    }
    let secs = t_a.elapsed().as_secs_f64();
    let (cpu_b, _) = cpu_and_rss(pid);
    let by_op1 = api_requests(ports.ops).await;
    rss_samples.sort_unstable();
    let rss_med = rss_samples.get(rss_samples.len() / 2).copied().unwrap_or(0);
    let rss_max = rss_samples.last().copied().unwrap_or(0);
    let total0: u64 = by_op0.values().sum();
    let total1: u64 = by_op1.values().sum();
    println!(
        "steady state over {secs:.0} s: {:.1} API requests/s; hub CPU {:.1} % of one core; RSS median {rss_med} KiB, max {rss_max} KiB ({:.1} KiB per device)",
        total1.saturating_sub(total0) as f64 / secs,
        cpu_b.saturating_sub(cpu_a) as f64 / TICKS_PER_SEC / secs * 100.0,
        rss_med as f64 / n as f64
    );
    println!("steady-state API requests/s by operation:");
    for (op, v) in &by_op1 {
        let d = v.saturating_sub(by_op0.get(op).copied().unwrap_or(0));
        if d > 0 {
            println!("  {op}: {:.2}/s", d as f64 / secs);
        }
    }
    stop.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    drop(hub);
    if all_ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
