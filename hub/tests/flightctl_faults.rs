//! Faults the real Flightctl cannot be made to produce on demand (it validates what it stores and
//! shares its database with other tests): 5xx answers, a body that is not JSON, malformed device
//! objects. A loopback HTTPS server with a throwaway certificate answers like a faulty Flightctl;
//! the happy path and 401/403/unreachable run against the real server in flightctl_inventory.rs.

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
