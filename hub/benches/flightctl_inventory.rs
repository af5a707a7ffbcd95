//! FlightctlInventory at scale against the real Flightctl of the local stack (`make env-up`):
//! creates N devices (default 500, `BENCH_DEVICES`) in 10 fleets through Flightctl's API, then
//! prints the time of the first full sync until every device is in the inventory with its fleet,
//! and the hub's request rate against Flightctl over a steady-state window (`BENCH_STEADY_SECS`,
//! default 30, poll interval `BENCH_POLL_SECS`, default 10). Figures only; nothing is asserted.
//! The devices and fleets are deleted afterwards.

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
    shutdown.cancel();
    let _ = task.await;

    let cleanup = Instant::now();
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
