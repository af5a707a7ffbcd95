//! `kubectl logs` through the real kube-apiserver to the hub's kubelet endpoint: TLS with a
//! serving certificate from the cluster CA, the API server's kubelet client certificate, and
//! TokenReview + SubjectAccessReview for bearer tokens. The device end is an in-memory link
//! that answers log requests and can go offline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use fleetlet_hub::app::start_controllers;
use fleetlet_hub::config::HubConfig;
use fleetlet_hub::inventory::DeviceMap;
use fleetlet_hub::inventory::InventoryDevice;
use fleetlet_hub::kubelet_api::{KubeletApi, tls_config};
use fleetlet_hub::metrics::Metrics;
use fleetlet_hub::sessions::{LinkError, LiveRegistry, LiveSet, LogStream, SessionEvent, Sessions};
use fleetlet_proto::v1::{LogRequest, PodBundle};
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::Api;
use kube::api::{DeleteParams, LogParams, PostParams};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod common;
use common::{client, create_namespace, dev_dir, unique, wait_for};

/// Answers log requests with a line describing the request, then two log lines.
struct LogLink {
    online: AtomicBool,
    live: LiveRegistry,
}

impl Sessions for LogLink {
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
        self.online.load(Ordering::SeqCst)
    }
    fn live(&self) -> watch::Receiver<LiveSet> {
        self.live.subscribe()
    }
    fn open_logs(
        &self,
        device: &str,
        req: LogRequest,
    ) -> BoxFuture<'static, Result<LogStream, LinkError>> {
        let online = self.online.load(Ordering::SeqCst);
        let device = device.to_string();
        Box::pin(async move {
            if !online {
                return Err(LinkError::NotConnected { device });
            }
            let head = format!(
                "request container={} follow={} tail={:?} since={:?} timestamps={} previous={} limit={:?}\n",
                req.container,
                req.follow,
                req.tail_lines,
                req.since_seconds,
                req.timestamps,
                req.previous,
                req.limit_bytes
            );
            let chunks: Vec<Result<Bytes, LinkError>> = vec![
                Ok(Bytes::from(head)),
                Ok(Bytes::from_static(b"line one\n")),
                Ok(Bytes::from_static(b"line two\n")),
            ];
            Ok(Box::pin(futures::stream::iter(chunks)) as LogStream)
        })
    }
}

struct Setup {
    client: kube::Client,
    link: Arc<LogLink>,
    addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    _events: mpsc::Sender<SessionEvent>,
    _inventory: watch::Sender<DeviceMap>,
    _dir: tempfile::TempDir,
}

async fn setup(instance: &str, dev: &str) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = common::issue_kubelet_cert(dir.path());
    let client = client().await;
    let listener = KubeletApi::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut cfg = HubConfig::default();
    cfg.nodes.instance = instance.into();
    cfg.kubelet.listen = Some(addr);
    cfg.kubelet.advertise_port = Some(addr.port());
    cfg.kubelet.cert_file = Some(cert);
    cfg.kubelet.key_file = Some(key);
    cfg.kubelet.client_ca_file = Some(dev_dir().join("pki").join("ca.crt"));
    let device = InventoryDevice {
        name: dev.into(),
        // The owner's labels: a killed run's Node is reaped by the next test run.
        labels: fleetlet_test_support::orphans::owner_labels()
            .into_iter()
            .collect(),
        fleet: Some("a".into()),
        enabled: true,
    };
    let (inv_tx, inv_rx) =
        watch::channel(Arc::new([(dev.to_string(), device)].into_iter().collect()));
    let (ev_tx, ev_rx) = mpsc::channel(16);
    let link = Arc::new(LogLink {
        online: AtomicBool::new(true),
        live: LiveRegistry::new(),
    });
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let metrics = Arc::new(Metrics::new());
    start_controllers(
        &mut tasks,
        client.clone(),
        &cfg,
        instance,
        link.clone(),
        ev_rx,
        inv_rx.clone(),
        None,
        metrics.clone(),
        shutdown.clone(),
    );
    let api = Arc::new(KubeletApi::new(
        client.clone(),
        link.clone(),
        inv_rx,
        metrics,
    ));
    tasks.spawn(api.serve(
        listener,
        tls_config(&cfg.kubelet).expect("tls"),
        shutdown.clone(),
    ));
    Setup {
        client,
        link,
        addr,
        shutdown,
        tasks,
        _events: ev_tx,
        _inventory: inv_tx,
        _dir: dir,
    }
}

/// GET over TLS straight to the hub's kubelet endpoint, trusting the cluster CA.
async fn direct_get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    for c in fleetlet_proto::pem::load_certs(&dev_dir().join("pki").join("ca.crt")).expect("ca") {
        roots.add(c).expect("root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("tls");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header("host", addr.to_string());
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new()).expect("req"))
        .await
        .expect("send");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn kubectl_logs_reach_the_device_through_the_api_server_and_tokens_are_checked() {
    let instance = unique("it-logs");
    let dev = format!("{instance}-d1");
    let ns = instance.clone();
    let mut s = setup(&instance, &dev).await;
    create_namespace(&s.client, &ns).await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"nodeName": dev, "containers": [{"name": "app", "image": "localhost/fleetlet-test/busybox:1"}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    // The Node (with our address and port) must exist before the API server can proxy.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(s.client.clone());
    wait_for("node", 30, || async {
        nodes.get_opt(&dev).await.ok().flatten()
    })
    .await;

    // Through the API server, which authenticates to us with its kubelet client certificate.
    let lp = LogParams {
        container: Some("app".into()),
        tail_lines: Some(2),
        since_seconds: Some(60),
        timestamps: true,
        ..Default::default()
    };
    let logs = wait_for("logs via the API server", 30, || async {
        pods.logs("web", &lp).await.ok()
    })
    .await;
    assert!(
        logs.starts_with("request container=app follow=false tail=Some(2) since=Some(60) timestamps=true previous=false"),
        "{logs}"
    );
    assert!(logs.ends_with("line one\nline two\n"), "{logs}");

    // An unknown container is refused.
    let bad = pods
        .logs(
            "web",
            &LogParams {
                container: Some("nope".into()),
                ..Default::default()
            },
        )
        .await;
    assert!(bad.is_err(), "unknown container must fail");

    // Offline device: a clear error.
    s.link.online.store(false, Ordering::SeqCst);
    let err = pods
        .logs(
            "web",
            &LogParams {
                container: Some("app".into()),
                ..Default::default()
            },
        )
        .await
        .expect_err("offline");
    assert!(err.to_string().contains("offline"), "{err}");
    s.link.online.store(true, Ordering::SeqCst);

    // Directly, with bearer tokens: none → 401; a ServiceAccount without nodes/proxy → 403;
    // after binding it to system:kubelet-api-admin → 200.
    let path = format!("/containerLogs/{ns}/web/app?tailLines=1");
    assert_eq!(direct_get(s.addr, &path, None).await.0, 401);
    let sas: Api<ServiceAccount> = Api::namespaced(s.client.clone(), &ns);
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "reader"}})).expect("sa");
    sas.create(&PostParams::default(), &sa)
        .await
        .expect("create sa");
    let tr = sas
        .create_token_request("reader", &PostParams::default(), &TokenRequest::default())
        .await
        .expect("token");
    let token = tr.status.and_then(|st| st.token).expect("token");
    let (code, body) = direct_get(s.addr, &path, Some(&token)).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("nodes") && body.contains("proxy"), "{body}");
    assert_eq!(direct_get(s.addr, &path, Some("not-a-token")).await.0, 401);
    let crbs: Api<ClusterRoleBinding> = Api::all(s.client.clone());
    let crb_name = format!("{instance}-reader");
    let crb: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": crb_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:kubelet-api-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}]
    }))
    .expect("crb");
    crbs.create(&PostParams::default(), &crb)
        .await
        .expect("create crb");
    // The denial above is cached for 30 s, as a kubelet caches it.
    let body = wait_for("authorized direct logs", 60, || async {
        let (code, body) = direct_get(s.addr, &path, Some(&token)).await;
        (code == 200).then_some(body)
    })
    .await;
    assert!(
        body.contains("tail=Some(1)") && body.contains("line two"),
        "{body}"
    );

    let _ = crbs.delete(&crb_name, &DeleteParams::default()).await;
    let _ = pods
        .delete(
            "web",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await;
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(s.client.clone())
        .delete(&ns, &DeleteParams::default())
        .await;
    let _ = nodes.delete(&dev, &DeleteParams::default()).await;
    s.shutdown.cancel();
    while s.tasks.join_next().await.is_some() {}
}
