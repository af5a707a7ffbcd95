//! Faults the real Flightctl cannot be made to produce on demand (it validates what it stores and
//! shares its database with other tests): 5xx answers, a body that is not JSON, malformed device
//! objects, device labels that break Kubernetes' syntax. A loopback HTTPS server with a throwaway
//! certificate answers like a faulty Flightctl; the happy path and 401/403/unreachable run
//! against the real server in flightctl_inventory.rs and flightctl_device_node.rs. The second
//! test runs the real hub binary on such a server against the real kube-apiserver: the Node of a
//! device sees no churn through all of it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetlet_hub::inventory::Inventory;
use fleetlet_hub::inventory::flightctl::{FlightctlConfig, FlightctlInventory};
use fleetlet_test_support::wait_for;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod common;

const WAIT: Duration = Duration::from_secs(30);

#[derive(Clone)]
enum Answer {
    Json(serde_json::Value),
    Status(u16),
    Raw(&'static str),
}

/// Starts the faulty server; returns its URL, CA file and the knob deciding the device answers.
async fn faulty_server(
    dir: &std::path::Path,
) -> (String, std::path::PathBuf, watch::Sender<Answer>) {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, certified.cert.pem()).expect("write ca");
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls versions")
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .expect("server tls");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("https://{}", listener.local_addr().expect("addr"));
    let (knob, answer) = watch::channel(Answer::Json(json!({"items": []})));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let answer = answer.borrow().clone();
                    async move {
                        let (status, body) = if req.uri().path() == "/api/v1/fleets" {
                            (
                                200,
                                json!({"items": [{"metadata": {"name": "edge"}}]}).to_string(),
                            )
                        } else {
                            match answer {
                                Answer::Json(v) => (200, v.to_string()),
                                Answer::Status(code) => {
                                    (code, "{\"message\":\"database unavailable\"}".to_owned())
                                }
                                Answer::Raw(text) => (200, text.to_owned()),
                            }
                        };
                        hyper::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (url, ca_file, knob)
}

fn device(name: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({"metadata": {"name": name, "labels": labels, "owner": "Fleet/edge"},
           "status": {"summary": {"status": "Online"}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_malformed_answers_keep_the_last_good_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, ca_file, answer) = faulty_server(dir.path()).await;
    answer.send_replace(Answer::Json(json!({"items": [
        device("dev-a", json!({"site": "lab"})),
        device("dev-b", json!({"site": "lab"})),
    ]})));
    let cfg = FlightctlConfig {
        api_url: url,
        ca_file,
        token_file: None,
        enabled_selector: String::new(),
        poll_interval_secs: 1,
        page_size: 100,
        max_backoff_secs: 1,
        request_timeout_secs: 5,
        last_seen_interval_secs: 0,
        agentless: Default::default(),
    };
    let shutdown = CancellationToken::new();
    let (inventory, task) = FlightctlInventory::spawn(&cfg, shutdown.clone()).expect("spawn");
    assert!(inventory.synced(&shutdown).await);
    let devices = inventory.devices();
    assert_eq!(devices.borrow().len(), 2);
    assert_eq!(
        devices
            .borrow()
            .get("dev-a")
            .and_then(|d| d.fleet.clone())
            .as_deref(),
        Some("edge")
    );
    let status = inventory.status();

    // 503: failures are recorded with the status; the devices stay.
    answer.send_replace(Answer::Status(503));
    let before = status.borrow().failures;
    wait_for("503 recorded", WAIT, || {
        let s = status.borrow().clone();
        async move { s.failures >= before + 2 && s.last_error.is_some_and(|e| e.contains("503")) }
    })
    .await
    .expect("503 reported");
    assert_eq!(devices.borrow().len(), 2, "a 5xx does not drop devices");

    // 200 with a body that is not JSON.
    answer.send_replace(Answer::Raw("<html>proxy error</html>"));
    wait_for("malformed answer recorded", WAIT, || {
        let s = status.borrow().clone();
        async move { s.last_error.is_some_and(|e| e.contains("malformed")) }
    })
    .await
    .expect("malformed reported");
    assert_eq!(
        devices.borrow().len(),
        2,
        "a malformed answer does not drop devices"
    );

    // One malformed device keeps its last good state; one without a name is left out; the
    // well-formed one is updated.
    answer.send_replace(Answer::Json(json!({"items": [
        device("dev-a", json!({"site": "moved"})),
        {"metadata": {"name": "dev-b", "labels": {"site": 7}}},
        {"metadata": {"labels": {"site": "x"}}},
    ]})));
    wait_for("dev-a updated", WAIT, || {
        let inv = inventory.clone();
        async move {
            inv.devices()
                .borrow()
                .get("dev-a")
                .and_then(|d| d.labels.get("site").cloned())
                == Some("moved".to_owned())
        }
    })
    .await
    .expect("well-formed device follows");
    let map = devices.borrow().clone();
    assert_eq!(map.len(), 2, "{map:?}");
    assert_eq!(
        map.get("dev-b")
            .and_then(|d| d.labels.get("site").cloned())
            .as_deref(),
        Some("lab"),
        "malformed dev-b keeps its last good labels"
    );
    assert!(status.borrow().last_error.is_none());

    shutdown.cancel();
    task.await.expect("poller ends");
}

fn log_has(path: &std::path::Path, needles: &[&str]) -> bool {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .any(|l| needles.iter().all(|n| l.contains(n)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_hub_keeps_nodes_through_flightctl_faults_and_maps_invalid_labels() {
    use common::{HubSetup, HubSpec, KubeCleanup, client, unique};
    use k8s_openapi::api::core::v1::{Event, Node};
    use kube::Api;
    use kube::api::ListParams;

    let run = unique("ffn");
    let dev = format!("{run}-a");
    let _cleanup = KubeCleanup {
        nodes: vec![dev.clone()],
        namespace: None,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (url, ca_file, answer) = faulty_server(d).await;
    // Labels another source could hand over: a key with a space, a value with a space.
    let good = json!({"items": [
        device(&dev, json!({"site name": "HQ", "zone": "a b", "fleetlet-run": run})),
    ]});
    answer.send_replace(Answer::Json(good.clone()));
    let mut spec = HubSpec::new(&run, &[]);
    spec.inventory = Some(format!(
        "[inventory.flightctl]\napi_url = \"{url}\"\nca_file = \"{}\"\npoll_interval_secs = 1\nmax_backoff_secs = 1\nrequest_timeout_secs = 5\nlast_seen_interval_secs = 0",
        ca_file.display()
    ));
    let setup = HubSetup::write(d, spec);
    let _hub = setup.spawn();
    let hub_log = d.join("hub.log");

    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let node = common::wait_for("the device's Node", 90, || async {
        let n = nodes.get(&dev).await.ok()?;
        let labels = n.metadata.labels.clone()?;
        (labels.get("site-name").map(String::as_str) == Some("HQ")).then_some(n)
    })
    .await;
    let labels = node.metadata.labels.clone().expect("labels");
    assert_eq!(labels.get("zone").map(String::as_str), Some("a-b"));
    assert_eq!(
        labels.get("flightctl.io/fleet").map(String::as_str),
        Some("edge")
    );
    assert!(
        log_has(&hub_log, &[&dev, "site name", "mapped to"]),
        "the hub logs the mapped label"
    );
    let events: Api<Event> = Api::all(client.clone());
    let note = common::wait_for("InvalidDeviceLabels event", 30, || async {
        let list = events
            .list(&ListParams::default().fields(&format!("involvedObject.name={dev}")))
            .await
            .ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("InvalidDeviceLabels"))
            .and_then(|e| e.message)
    })
    .await;
    println!("event InvalidDeviceLabels: {note}");
    assert!(
        note.contains("site name") && note.contains("zone"),
        "{note}"
    );

    // Each fault for a few polls; after each, the Node is the same object with the same labels.
    let faults: [(Answer, &[&str]); 3] = [
        (Answer::Status(503), &["poll failed", "server_error"]),
        (
            Answer::Raw("<html>proxy error</html>"),
            &["poll failed", "malformed"],
        ),
        (
            Answer::Json(json!({"items": [{"metadata": {"name": dev, "labels": {"site": 7}}}]})),
            &["malformed device; keeping its last good state", &dev],
        ),
    ];
    for (fault, logged) in faults {
        answer.send_replace(fault);
        common::wait_for("the fault logged", 30, || async {
            log_has(&hub_log, logged).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = nodes.get(&dev).await.expect("the Node is kept");
        assert_eq!(
            now.metadata.uid, node.metadata.uid,
            "not recreated ({logged:?})"
        );
        assert_eq!(
            now.metadata.labels, node.metadata.labels,
            "labels kept ({logged:?})"
        );
        answer.send_replace(Answer::Json(good.clone()));
    }

    // Only a good answer without the device removes its Node (it has no pods).
    answer.send_replace(Answer::Json(json!({"items": []})));
    common::wait_for(
        "the Node of a device gone from Flightctl is deleted",
        60,
        || async { nodes.get_opt(&dev).await.ok()?.is_none().then_some(()) },
    )
    .await;
}
