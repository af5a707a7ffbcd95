//! FlightctlInventory against the real Flightctl server of the local stack (`make env-up`):
//! devices and fleets created through Flightctl's API, relabelled and deleted; k8s-mode auth with
//! ServiceAccount tokens; 401, 403 and an unreachable server keep the last good device set.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetlet_hub::inventory::Inventory;
use fleetlet_hub::inventory::flightctl::{FlightctlConfig, FlightctlInventory};
use fleetlet_test_support::{Stack, wait_for};
use http::Method;
use serde_json::json;
use tokio_util::sync::CancellationToken;

mod common;
use common::flightctl::{create, delete, device, env, fleet, relay_to};

const WAIT: Duration = Duration::from_secs(60);

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

fn config(api_url: &str, ca_file: &str, token_file: &str, selector: &str) -> FlightctlConfig {
    FlightctlConfig {
        api_url: api_url.to_owned(),
        ca_file: ca_file.into(),
        token_file: Some(token_file.into()),
        enabled_selector: selector.to_owned(),
        poll_interval_secs: 1,
        page_size: 2,
        max_backoff_secs: 2,
        request_timeout_secs: 5,
        last_seen_interval_secs: 1,
        agentless: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_devices_fleets_relabel_and_delete_on_the_real_server() {
    let stack = Stack::shared().expect("local stack (make env-up)");
    let _logs = stack.logs_on_failure();
    let env = env(stack);
    let run = unique("fi");
    let (fleet_a, fleet_b) = (format!("{run}-a"), format!("{run}-b"));
    let (d1, d2, d3) = (
        format!("{run}-d1"),
        format!("{run}-d2"),
        format!("{run}-d3"),
    );
    create(&env.admin, "fleets", fleet(&fleet_a, &fleet_a)).await;
    create(&env.admin, "fleets", fleet(&fleet_b, &fleet_b)).await;
    create(&env.admin, "devices", device(&d1, json!({"fleetlet-test-fleet": fleet_a, "fleetlet-run": run, "fleetlet": "enabled", "site": "lab"}))).await;
    create(
        &env.admin,
        "devices",
        device(
            &d2,
            json!({"fleetlet-test-fleet": fleet_b, "fleetlet-run": run, "fleetlet": "enabled"}),
        ),
    )
    .await;
    create(
        &env.admin,
        "devices",
        device(
            &d3,
            json!({"fleetlet-test-fleet": fleet_a, "fleetlet-run": run}),
        ),
    )
    .await;

    // The hub reads as the flightctl-viewer ServiceAccount (k8s auth), 2 items per page.
    let shutdown = CancellationToken::new();
    let cfg = config(
        &env.api_url,
        &env.ca_file,
        &env.viewer_token_file,
        "fleetlet=enabled",
    );
    let (inventory, task) = FlightctlInventory::spawn(&cfg, shutdown.clone()).expect("spawn");
    assert!(inventory.synced(&shutdown).await);
    let devices = inventory.devices();

    // Fleet ownership is set by Flightctl's fleet controller (worker) from the fleet selectors.
    wait_for("devices owned by their fleets", WAIT, || {
        let map = devices.borrow().clone();
        let (d1, d2, d3, fa, fb) = (
            d1.clone(),
            d2.clone(),
            d3.clone(),
            fleet_a.clone(),
            fleet_b.clone(),
        );
        async move {
            map.get(&d1)
                .is_some_and(|d| d.fleet.as_deref() == Some(fa.as_str()) && d.enabled)
                && map
                    .get(&d2)
                    .is_some_and(|d| d.fleet.as_deref() == Some(fb.as_str()) && d.enabled)
                && map
                    .get(&d3)
                    .is_some_and(|d| d.fleet.as_deref() == Some(fa.as_str()) && !d.enabled)
        }
    })
    .await
    .expect("inventory follows Flightctl");
    let snapshot = devices.borrow().clone();
    let first = snapshot.get(&d1).expect("d1");
    assert_eq!(first.labels.get("site").map(String::as_str), Some("lab"));
    let status = inventory.status().borrow().clone();
    assert!(
        status.device_pages >= 2,
        "3+ devices with limit=2 take several pages: {status:?}"
    );
    assert!(status.fleets.contains(&fleet_a) && status.fleets.contains(&fleet_b));
    // Flightctl's own view: never connected, so its summary is Unknown.
    let health = inventory.health().borrow().clone();
    assert_eq!(
        health.get(&d1).and_then(|h| h.summary_status.as_deref()),
        Some("Unknown")
    );

    // Relabel d2 into fleet A: it follows, with its new labels.
    env.admin
        .request(
            Method::PATCH,
            &format!("/api/v1/devices/{d2}"),
            Some(&json!([{"op": "replace", "path": "/metadata/labels/fleetlet-test-fleet", "value": fleet_a}])),
        )
        .await
        .expect("relabel d2");
    wait_for("d2 moves to fleet A", WAIT, || {
        let map = devices.borrow().clone();
        let (d2, fa) = (d2.clone(), fleet_a.clone());
        async move {
            map.get(&d2).is_some_and(|d| {
                d.fleet.as_deref() == Some(fa.as_str())
                    && d.labels.get("fleetlet-test-fleet") == Some(&fa)
            })
        }
    })
    .await
    .expect("relabelled device follows");

    // Disable d1 by label: stays listed, no longer enabled.
    env.admin
        .request(
            Method::PATCH,
            &format!("/api/v1/devices/{d1}"),
            Some(&json!([{"op": "remove", "path": "/metadata/labels/fleetlet"}])),
        )
        .await
        .expect("unlabel d1");
    wait_for("d1 disabled", WAIT, || {
        let inv = inventory.clone();
        let d1 = d1.clone();
        async move { inv.devices().borrow().get(&d1).is_some_and(|d| !d.enabled) && !inv.admits(&d1) }
    })
    .await
    .expect("selector decides enabled");

    // Delete d3: it leaves the inventory.
    delete(&env.admin, "devices", &d3).await;
    wait_for("d3 gone", WAIT, || {
        let map = devices.borrow().clone();
        let d3 = d3.clone();
        async move { !map.contains_key(&d3) }
    })
    .await
    .expect("deleted device leaves");

    shutdown.cancel();
    task.await.expect("poller ends on shutdown");
    for d in [&d1, &d2, &d3] {
        delete(&env.admin, "devices", d).await;
    }
    for f in [&fleet_a, &fleet_b] {
        delete(&env.admin, "fleets", f).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_keep_the_last_good_inventory() {
    let stack = Stack::shared().expect("local stack (make env-up)");
    let _logs = stack.logs_on_failure();
    let env = env(stack);
    let run = unique("ff");
    let dev = format!("{run}-d");
    create(
        &env.admin,
        "devices",
        device(&dev, json!({"fleetlet-run": run})),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    let selector = format!("fleetlet-run={run}");

    // 401: a token the kube-apiserver does not know. Nothing syncs; the reason is recorded.
    std::fs::write(&token_file, "not-a-valid-token").expect("write token");
    let relay = relay_to(&env.api_url).await;
    // The relay keeps the server certificate's name: 127.0.0.1.
    let relay_url = format!("https://{}", relay.addr);
    let shutdown = CancellationToken::new();
    let cfg = config(
        &relay_url,
        &env.ca_file,
        token_file.to_str().expect("utf-8"),
        &selector,
    );
    let (inventory, task) = FlightctlInventory::spawn(&cfg, shutdown.clone()).expect("spawn");
    let status = inventory.status();
    wait_for("a 401 recorded", WAIT, || {
        let s = status.borrow().clone();
        async move { s.last_error.is_some_and(|e| e.contains("401")) && s.syncs == 0 }
    })
    .await
    .expect("401 is reported");

    // 403: a valid ServiceAccount token without any Flightctl role.
    let token = stack
        .service_account_token("flightctl", "fleetlet-test-norole", 3600)
        .await
        .expect("token");
    std::fs::write(&token_file, &token).expect("write token");
    wait_for("a 403 recorded", WAIT, || {
        let s = status.borrow().clone();
        async move { s.last_error.is_some_and(|e| e.contains("403")) && s.syncs == 0 }
    })
    .await
    .expect("403 is reported after the token file changed");

    // The viewer's token: the file is re-read and the inventory syncs.
    std::fs::copy(&env.viewer_token_file, &token_file).expect("copy viewer token");
    wait_for("synced with the viewer token", WAIT, || {
        let inv = inventory.clone();
        let dev = dev.clone();
        async move { inv.admits(&dev) }
    })
    .await
    .expect("syncs once the token works");

    // Unreachable: the relay refuses; polls fail, the device set stays.
    relay.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    let failures_before = status.borrow().failures;
    wait_for("failed polls while cut", WAIT, || {
        let s = status.borrow().clone();
        async move {
            s.failures >= failures_before + 2
                && s.last_error.is_some_and(|e| e.contains("unreachable"))
        }
    })
    .await
    .expect("unreachable is reported");
    assert!(
        inventory.admits(&dev),
        "the last good inventory is kept while Flightctl is down"
    );

    // Meanwhile the device is deleted in Flightctl; once reachable again the hub follows.
    delete(&env.admin, "devices", &dev).await;
    relay.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_for("device gone after reconnect", WAIT, || {
        let inv = inventory.clone();
        let dev = dev.clone();
        async move { !inv.devices().borrow().contains_key(&dev) }
    })
    .await
    .expect("follows Flightctl again");
    assert!(status.borrow().last_error.is_none());

    shutdown.cancel();
    task.await.expect("poller ends");
}
