//! FlightctlInventory at scale against the real Flightctl of the local stack (`make env-up`):
//! creates N devices (default 500, `BENCH_DEVICES`) in 10 fleets through Flightctl's API, then
//! prints the time of the first full sync until every device is in the inventory with its fleet,
//! and the hub's request rate against Flightctl over a steady-state window (`BENCH_STEADY_SECS`,
//! default 30, poll interval `BENCH_POLL_SECS`, default 10). Figures only; nothing is asserted.
//! The devices and fleets are deleted afterwards.
//!
//! Then agentless mode (point 4 of issue #17): `BENCH_AGENTLESS_DEVICES` (default 50) simulated
//! agentless devices (Device objects labelled `fleetlet.io/mode=agentless`, outside the fleets: a
//! fleet-owned device's spec cannot be written) join the same inventory, and the hub's agentless
//! controller places `BENCH_AGENTLESS_PODS` (default 500) pods on them through Flightctl's API,
//! the pods arriving one after another as fast as the relay would hand them over; it prints
//! agentless pods per minute, the per-pod placement latency (hand-over → device spec written),
//! and what it cost Flightctl: requests, their mean and longest latency, conflicts, failures.

use std::time::Duration;

use fleetlet_hub::inventory::Inventory as _;
use fleetlet_hub::inventory::flightctl::{FlightctlClient, FlightctlConfig, FlightctlInventory};
use futures::StreamExt as _;
use http::Method;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn stack_var(vars: &std::collections::BTreeMap<String, String>, name: &str) -> String {
    vars.get(name)
        .unwrap_or_else(|| panic!("{name} missing: run `make env-up` first"))
        .clone()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let stack = fleetlet_test_support::Stack::shared().expect("local stack (make env-up)");
    let vars = stack.vars();
    let api_url = stack_var(vars, "FLIGHTCTL_API_URL");
    let ca_file = stack_var(vars, "FLIGHTCTL_CA_FILE");
    let devices = env_num("BENCH_DEVICES", 500);
    let steady = env_num("BENCH_STEADY_SECS", 30);
    let poll = env_num("BENCH_POLL_SECS", 10);
    let fleets = 10u64;
    let run = format!("bench-{}", std::process::id());

    let admin = FlightctlClient::new(
        &api_url,
        ca_file.as_ref(),
        Some(stack_var(vars, "FLIGHTCTL_ADMIN_TOKEN_FILE").into()),
        Duration::from_secs(60),
    )
    .expect("admin client");

    let start = Instant::now();
    for f in 0..fleets {
        let name = format!("{run}-f{f}");
        let body = json!({"apiVersion": "v1beta1", "kind": "Fleet", "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"bench-fleet": name}},
                     "template": {"metadata": {"labels": {"bench-fleet": name}}, "spec": {}}}});
        admin
            .request(Method::POST, "/api/v1/fleets", Some(&body))
            .await
            .expect("create fleet");
    }
    let created = futures::stream::iter(0..devices)
        .map(|i| {
            let admin = admin.clone();
            let run = run.clone();
            async move {
                let body = json!({"apiVersion": "v1beta1", "kind": "Device",
                    "metadata": {"name": format!("{run}-d{i}"),
                                 "labels": {"bench-fleet": format!("{run}-f{}", i % fleets), "bench-run": run}},
                    "spec": {}});
                admin.request(Method::POST, "/api/v1/devices", Some(&body)).await
            }
        })
        .buffer_unordered(8)
        .filter(|r| futures::future::ready(r.is_ok()))
        .count()
        .await;
    println!(
        "created {created}/{devices} devices in {fleets} fleets through the Flightctl API in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // Wait until Flightctl's fleet controller has given every device its owner.
    let owned_by = Instant::now();
    let mut owned = 0usize;
    for _ in 0..300 {
        let list = admin.list_all("/api/v1/devices", 1000, 100).await;
        owned = list
            .map(|l| {
                l.items
                    .iter()
                    .filter(|d| {
                        d["metadata"]["labels"]["bench-run"] == run.as_str()
                            && d["metadata"]["owner"].is_string()
                    })
                    .count()
            })
            .unwrap_or(0);
        if owned as u64 >= created as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "Flightctl assigned fleet owners to {owned} devices within {:.1} s",
        owned_by.elapsed().as_secs_f64()
    );

    let cfg = FlightctlConfig {
        api_url,
        ca_file: ca_file.into(),
        token_file: Some(stack_var(vars, "FLIGHTCTL_VIEWER_TOKEN_FILE").into()),
        enabled_selector: format!("bench-run={run}"),
        poll_interval_secs: poll,
        page_size: 500,
        max_backoff_secs: 30,
        request_timeout_secs: 60,
        last_seen_interval_secs: 60,
        agentless: Default::default(),
    };
    let shutdown = CancellationToken::new();
    let sync_start = Instant::now();
    let (inventory, task) = FlightctlInventory::spawn(&cfg, shutdown.clone()).expect("spawn");
    let synced = inventory.synced(&shutdown).await;
    let full_sync = sync_start.elapsed();
    let status = inventory.status().borrow().clone();
    let enabled = inventory
        .devices()
        .borrow()
        .values()
        .filter(|d| d.enabled && d.fleet.is_some())
        .count();
    println!(
        "first full sync: {:.2} s (synced={synced}), {enabled} enabled devices with a fleet, {} device pages, {} requests (incl. lastSeen per enabled device, {} of them failed)",
        full_sync.as_secs_f64(),
        status.device_pages,
        status.requests,
        status.last_seen_failures
    );

    let before = inventory.status().borrow().clone();
    tokio::time::sleep(Duration::from_secs(steady)).await;
    let after = inventory.status().borrow().clone();
    let rate = (after.requests - before.requests) as f64 / steady as f64;
    println!(
        "steady state over {steady} s (poll every {poll} s, lastSeen every 60 s): {} requests, {rate:.2} requests/s against Flightctl; {} failed polls, {} failed lastSeen requests",
        after.requests - before.requests,
        after.failures - before.failures,
        after.last_seen_failures - before.last_seen_failures
    );
    let agentless_devices = env_num("BENCH_AGENTLESS_DEVICES", 50);
    let agentless_pods = env_num("BENCH_AGENTLESS_PODS", 500);
    if agentless_devices > 0 && agentless_pods > 0 {
        agentless_phase(
            &admin,
            &inventory,
            &cfg,
            &stack_var(vars, "FLIGHTCTL_ADMIN_TOKEN_FILE"),
            &run,
            agentless_devices,
            agentless_pods,
        )
        .await;
    }
    shutdown.cancel();
    let _ = task.await;

    let cleanup = Instant::now();
    futures::stream::iter(0..agentless_devices)
        .map(|i| {
            let admin = admin.clone();
            let name = format!("{run}-a{i}");
            async move {
                let _ = admin
                    .request(Method::DELETE, &format!("/api/v1/devices/{name}"), None)
                    .await;
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    futures::stream::iter(0..devices)
        .map(|i| {
            let admin = admin.clone();
            let name = format!("{run}-d{i}");
            async move {
                let _ = admin
                    .request(Method::DELETE, &format!("/api/v1/devices/{name}"), None)
                    .await;
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for f in 0..fleets {
        let _ = admin
            .request(Method::DELETE, &format!("/api/v1/fleets/{run}-f{f}"), None)
            .await;
    }
    println!("cleaned up in {:.1} s", cleanup.elapsed().as_secs_f64());
}

/// A pod as the relay hands it to the agentless controller.
fn bench_pod(run: &str, i: u64, device: &str) -> fleetlet_proto::v1::PodBundle {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("p{i}"), "namespace": run,
            "uid": format!("{:08x}-0000-4000-8000-{:012x}", i, i)},
        "spec": {"nodeName": device, "restartPolicy": "Always", "containers": [{
            "name": "app", "image": "docker.io/library/busybox:1.36",
            "command": ["sleep", "3600"],
            "env": [{"name": "INDEX", "value": i.to_string()}],
            "resources": {"limits": {"cpu": "100m", "memory": "16Mi"}}}]}
    });
    fleetlet_proto::v1::PodBundle {
        pod_json: serde_json::to_vec(&pod).expect("pod JSON").into(),
        ..Default::default()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Agentless placement through Flightctl (see the module doc).
async fn agentless_phase(
    admin: &FlightctlClient,
    inventory: &FlightctlInventory,
    cfg: &FlightctlConfig,
    writer_token: &str,
    run: &str,
    devices: u64,
    pods: u64,
) {
    use fleetlet_hub::sessions::{SessionEvent, Sessions as _};
    let created = Instant::now();
    futures::stream::iter(0..devices)
        .map(|i| {
            let admin = admin.clone();
            let body = json!({"apiVersion": "v1beta1", "kind": "Device",
                "metadata": {"name": format!("{run}-a{i}"),
                    "labels": {"bench-run": run, "fleetlet.io/mode": "agentless"}},
                "spec": {}});
            async move {
                admin
                    .request(Method::POST, "/api/v1/devices", Some(&body))
                    .await
                    .expect("create agentless device");
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    let names: Vec<String> = (0..devices).map(|i| format!("{run}-a{i}")).collect();
    let mut inv = inventory.devices();
    let seen = tokio::time::timeout(
        Duration::from_secs(120),
        inv.wait_for(|m| names.iter().all(|n| m.get(n).is_some_and(|d| d.enabled))),
    )
    .await;
    assert!(
        seen.is_ok(),
        "the inventory did not list the agentless devices"
    );
    println!(
        "agentless: {devices} simulated agentless devices created and in the inventory within {:.1} s",
        created.elapsed().as_secs_f64()
    );

    let mut fc = cfg.clone();
    fc.agentless.token_file = Some(writer_token.into());
    fc.agentless.poll_interval_secs = 5;
    let shutdown = CancellationToken::new();
    let (events_tx, mut events) = tokio::sync::mpsc::channel(4096);
    let link = std::sync::Arc::new(fleetlet_hub::link::DeviceSessions::new(
        fleetlet_hub::link::SessionLimits::default(),
    ));
    let (agentless, task) = fleetlet_hub::agentless::spawn(
        &fc.agentless,
        &fc,
        link,
        inventory.devices(),
        events_tx,
        Default::default(),
        shutdown.clone(),
    )
    .expect("agentless mode");
    let sessions = agentless.sessions.clone();

    // Pods arrive one after another; each hand-over replaces the device's whole pod set, as the
    // relay does. A pod is placed once its device acknowledges a generation at or after its own.
    let mut per_device: Vec<Vec<fleetlet_proto::v1::PodBundle>> =
        vec![Vec::new(); devices as usize];
    let mut handed: Vec<(String, u64, Instant)> = Vec::with_capacity(pods as usize);
    let start = Instant::now();
    let mut acked: std::collections::HashMap<String, (u64, Vec<(u64, Instant)>)> =
        std::collections::HashMap::new();
    for i in 0..pods {
        let d = (i % devices) as usize;
        per_device[d].push(bench_pod(run, i, &names[d]));
        let generation = sessions.set_desired(&names[d], per_device[d].clone(), Default::default());
        handed.push((names[d].clone(), generation, Instant::now()));
        // Keep the event queue drained while handing over.
        while let Ok(ev) = events.try_recv() {
            if let SessionEvent::Acked {
                device, generation, ..
            } = ev
            {
                let e = acked.entry(device).or_default();
                e.0 = e.0.max(generation);
                e.1.push((generation, Instant::now()));
            }
        }
        tokio::task::yield_now().await;
    }
    let last: std::collections::HashMap<String, u64> = handed
        .iter()
        .map(|(d, g, _)| (d.clone(), *g))
        .fold(std::collections::HashMap::new(), |mut m, (d, g)| {
            let e = m.entry(d).or_insert(0);
            *e = (*e).max(g);
            m
        });
    let deadline = Instant::now() + Duration::from_secs(600);
    while !last
        .iter()
        .all(|(d, g)| acked.get(d).is_some_and(|a| a.0 >= *g))
        && Instant::now() < deadline
    {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(SessionEvent::Acked {
                device, generation, ..
            })) => {
                let e = acked.entry(device).or_default();
                e.0 = e.0.max(generation);
                e.1.push((generation, Instant::now()));
            }
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => break,
        }
    }
    let elapsed = start.elapsed();
    let placed = handed
        .iter()
        .filter(|(d, g, _)| acked.get(d).is_some_and(|a| a.0 >= *g))
        .count();
    let mut latencies: Vec<f64> = handed
        .iter()
        .filter_map(|(d, g, at)| {
            let (_, list) = acked.get(d)?;
            let done = list
                .iter()
                .filter(|(ag, _)| ag >= g)
                .map(|(_, t)| *t)
                .min()?;
            Some(done.duration_since(*at).as_secs_f64())
        })
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let stats = agentless.stats.borrow().clone();
    println!(
        "agentless, pods handed over back to back (writes per device coalesce): {placed}/{pods} pods on {devices} devices written into their Flightctl device specs in {:.1} s: {:.0} pods/minute",
        elapsed.as_secs_f64(),
        placed as f64 / elapsed.as_secs_f64() * 60.0
    );
    println!(
        "agentless: per-pod placement (hand-over -> device spec written) p50 {:.2} s, p90 {:.2} s, max {:.2} s",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        latencies.last().copied().unwrap_or_default()
    );
    println!(
        "agentless: cost to Flightctl: {} requests ({} device writes = GET + PUT each, {} status polls of the agentless devices), {:.1} requests/s, mean request {:.1} ms, longest {:.0} ms; {} conflicts, {} failed writes",
        stats.requests,
        stats.writes,
        stats.polls,
        stats.requests as f64 / elapsed.as_secs_f64(),
        stats.request_seconds / stats.requests.max(1) as f64 * 1000.0,
        stats.request_seconds_max * 1000.0,
        stats.conflicts,
        stats.write_failures
    );

    // No coalescing: every device gets one more pod per round and the next round starts when
    // every device has acknowledged it, so each pod costs its device one spec write (GET + PUT).
    let rounds = 5u64;
    let before = agentless.stats.borrow().clone();
    let start = Instant::now();
    let mut round_latencies = Vec::new();
    for r in 0..rounds {
        let mut want = std::collections::HashMap::new();
        let round_start = Instant::now();
        for (d, name) in names.iter().enumerate() {
            per_device[d].push(bench_pod(run, pods + r * devices + d as u64, name));
            want.insert(
                name.clone(),
                sessions.set_desired(name, per_device[d].clone(), Default::default()),
            );
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while !want.is_empty() && Instant::now() < deadline {
            if let Ok(Some(SessionEvent::Acked {
                device, generation, ..
            })) = tokio::time::timeout(Duration::from_secs(5), events.recv()).await
                && want.get(&device).is_some_and(|g| generation >= *g)
            {
                want.remove(&device);
                round_latencies.push(round_start.elapsed().as_secs_f64());
            }
        }
    }
    let elapsed = start.elapsed();
    let after = agentless.stats.borrow().clone();
    round_latencies.sort_by(|a, b| a.total_cmp(b));
    let placed = round_latencies.len();
    let requests = after.requests - before.requests;
    println!(
        "agentless, one write per pod ({rounds} rounds of one new pod on each of the {devices} devices, {} pods already there): {placed} pods in {:.1} s: {:.0} pods/minute; placement p50 {:.2} s, p90 {:.2} s; {requests} requests, {:.1} requests/s, mean request {:.1} ms, longest {:.0} ms; {} conflicts, {} failed writes",
        pods / devices,
        elapsed.as_secs_f64(),
        placed as f64 / elapsed.as_secs_f64() * 60.0,
        percentile(&round_latencies, 0.5),
        percentile(&round_latencies, 0.9),
        requests as f64 / elapsed.as_secs_f64(),
        (after.request_seconds - before.request_seconds) / requests.max(1) as f64 * 1000.0,
        after.request_seconds_max * 1000.0,
        after.conflicts - before.conflicts,
        after.write_failures - before.write_failures
    );
    shutdown.cancel();
    let _ = task.await;
}
