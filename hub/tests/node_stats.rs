//! A fleetlet Node's own kubelet port end to end: the real `fleetlet-hub` with `[kubelet]
//! node_ports`, a real `fleetlet-agent` on the stack's Podman reporting resource figures every
//! 2 s, and the real kube-apiserver proxying `/stats/summary`, `/metrics/resource`, `/pods` and
//! `/runningpods/` to the Node's daemonEndpoints. Also: per-node authorization on the port
//! (a token allowed `nodes/stats` on another node only is refused), the shared port refusing
//! node-less paths, stale figures of an offline device, and the port kept across a hub restart.
//!
//! Needs `make env-up` and the agent binary next to the hub's (`cargo build -p fleetlet-agent`).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

mod common;
use common::{
    AgentSetup, AgentSpec, HubSetup, HubSpec, KubeCleanup, client, create_namespace, dev_dir,
    free_port_range, kubectl, node_ready, remove_device_containers, unique, wait_for,
};

/// GET over TLS straight to a hub kubelet port, trusting the cluster CA.
async fn direct_get(addr: SocketAddr, path: &str, token: &str) -> (u16, String) {
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
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())
        .expect("req");
    let resp = sender.send_request(req).await.expect("send");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `kubectl get --raw` through the API server's node proxy.
fn raw(node: &str, path: &str) -> (bool, String, String) {
    kubectl(&["get", "--raw", &format!("/api/v1/nodes/{node}/proxy{path}")])
}

fn kubectl_ok(args: &[&str]) -> String {
    let (ok, out, err) = kubectl(args);
    assert!(ok, "kubectl {args:?}: {err}");
    out
}

/// Cluster-scoped RBAC objects of the test, deleted on drop.
struct Rbac(Vec<String>);

impl Drop for Rbac {
    fn drop(&mut self) {
        for o in &self.0 {
            let _ = kubectl(&["delete", o, "--ignore-not-found", "--wait=false"]);
        }
    }
}

/// A ServiceAccount token allowed `get` on `rules` (`resource`, optional resource name).
fn token_with(ns: &str, name: &str, rules: &[(&str, Option<&str>)], rbac: &mut Rbac) -> String {
    kubectl_ok(&["-n", ns, "create", "serviceaccount", name]);
    let role = format!("{ns}-{name}");
    let mut rule_args: Vec<Value> = Vec::new();
    for (resource, rname) in rules {
        let mut r = json!({"apiGroups": [""], "resources": [resource], "verbs": ["get"]});
        if let Some(n) = rname {
            r["resourceNames"] = json!([n]);
        }
        rule_args.push(r);
    }
    let role_doc = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": role}, "rules": rule_args,
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
    });
    rbac.0.push(format!("clusterrole/{role}"));
    rbac.0.push(format!("clusterrolebinding/{role}"));
    let file = std::env::temp_dir().join(format!("{role}.json"));
    std::fs::write(
        &file,
        json!({"apiVersion": "v1", "kind": "List", "items": [role_doc, binding]}).to_string(),
    )
    .expect("rbac file");
    kubectl_ok(&["apply", "-f", &file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    kubectl_ok(&["-n", ns, "create", "token", name, "--duration=1h"])
        .trim()
        .to_string()
}

fn node_port(n: &Node) -> Option<u16> {
    let p = n
        .status
        .as_ref()?
        .daemon_endpoints
        .as_ref()?
        .kubelet_endpoint
        .as_ref()?
        .port;
    u16::try_from(p).ok()
}

#[tokio::test]
async fn node_ports_serve_stats_metrics_and_pods_through_the_api_server() {
    let id = unique("stats");
    let dev = format!("{id}-d");
    let _cleanup = KubeCleanup {
        nodes: vec![dev.clone()],
        namespace: Some(id.clone()),
    };
    let mut rbac = Rbac(Vec::new());
    let dir = tempfile::tempdir().expect("tempdir");
    let range = free_port_range(4).expect("four free ports");
    // The API server proxies nodes/proxy only to a non-loopback Node address: the hub's kubelet
    // endpoint listens on the root end of a test veth (198.18.0.0/15).
    let netns = fleetlet_test_support::netns::TestNetns::create("fst").expect("test netns");
    let kubelet_ip = std::net::IpAddr::V4(netns.host_ip);
    let mut spec = HubSpec::new(&id, &[(dev.clone(), format!("{id}-f"))]);
    spec.kubelet_node_ports = Some(range);
    spec.kubelet_ip = Some(kubelet_ip);
    let setup = HubSetup::write(dir.path(), spec);
    let mut hub = Some(setup.spawn());
    let mut agent_spec = AgentSpec::new(&dev, setup.ports.link);
    agent_spec.stats_interval_secs = Some(2);
    let agent_setup = AgentSetup::write(dir.path(), agent_spec);
    let mut agent = Some(agent_setup.spawn());
    struct Containers(String);
    impl Drop for Containers {
        fn drop(&mut self) {
            remove_device_containers(&self.0);
        }
    }
    let _containers = Containers(dev.clone());

    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let port = wait_for("node Ready with its own kubelet port", 90, || async {
        let n = nodes.get(&dev).await.ok()?;
        node_ready(&n).then(|| node_port(&n)).flatten()
    })
    .await;
    println!(
        "node {dev}: kubelet port {port} (range {}-{}, shared port {})",
        range.0, range.1, setup.ports.kubelet
    );
    assert!((range.0..=range.1).contains(&port), "port {port} in range");

    create_namespace(&client, &id).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &id);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "burn"},
        "spec": {
            "nodeName": dev,
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "fleetlet", "effect": "NoSchedule"}],
            "containers": [{
                "name": "burn", "image": "localhost/fleetlet-test/busybox:1",
                "command": ["sh", "-c", "while :; do :; done"],
                "resources": {"limits": {"cpu": "200m", "memory": "64Mi"}},
            }],
        }
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let uid = wait_for("pod Running on the device", 120, || async {
        let p = pods.get("burn").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running"))
            .then(|| p.metadata.uid.clone())
            .flatten()
    })
    .await;

    // /stats/summary through the API server: the pod with a CPU rate and a working set.
    let summary: Value = wait_for("the pod's CPU rate in /stats/summary", 60, || async {
        let (ok, out, _) = raw(&dev, "/stats/summary");
        let v: Value = serde_json::from_str(&out).ok().filter(|_| ok)?;
        let pod = v["pods"]
            .as_array()?
            .iter()
            .find(|p| p["podRef"]["uid"] == json!(uid))?;
        let c = &pod["containers"][0];
        (c["cpu"]["usageNanoCores"].as_u64()? > 0 && c["memory"]["workingSetBytes"].is_u64())
            .then(|| v.clone())
    })
    .await;
    let pod_s = summary["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["podRef"]["uid"] == json!(uid))
        .expect("our pod")
        .clone();
    let c = &pod_s["containers"][0];
    println!(
        "summary: node cpu {} nanocores, node working set {} B, fs {}/{} B; pod burn: {} nanocores (limit 200m), working set {} B, rss {} B, network {}",
        summary["node"]["cpu"]["usageNanoCores"],
        summary["node"]["memory"]["workingSetBytes"],
        summary["node"]["fs"]["usedBytes"],
        summary["node"]["fs"]["capacityBytes"],
        c["cpu"]["usageNanoCores"],
        c["memory"]["workingSetBytes"],
        c["memory"]["rssBytes"],
        pod_s["network"],
    );
    assert_eq!(summary["node"]["nodeName"], json!(dev));
    assert_eq!(pod_s["podRef"]["name"], "burn");
    assert_eq!(c["name"], "burn");
    let cores = c["cpu"]["usageNanoCores"].as_u64().expect("rate");
    assert!(
        (50_000_000..=400_000_000).contains(&cores),
        "a loop limited to 200m burns about 0.2 cores: {cores}"
    );
    assert!(summary["node"]["cpu"]["usageCoreNanoSeconds"].as_u64() > Some(0));
    assert!(summary["node"]["fs"]["capacityBytes"].as_u64() > Some(0));
    let (ok, only, err) = raw(&dev, "/stats/summary?only_cpu_and_memory=true");
    assert!(ok, "{err}");
    let only: Value = serde_json::from_str(&only).expect("json");
    assert!(only["node"].get("fs").is_none() && only["node"]["cpu"].is_object());

    // /metrics/resource: the kubelet's resource metrics for the pod.
    let (ok, text, err) = raw(&dev, "/metrics/resource");
    assert!(ok, "{err}");
    let ours = |name: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "{name}{{container=\"burn\",namespace=\"{id}\",pod=\"burn\"}} "
                ))
            })
            .map(str::to_string)
    };
    for m in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_start_time_seconds",
    ] {
        let line = ours(m).unwrap_or_else(|| panic!("{m} for the pod in:\n{text}"));
        println!("{line}");
    }
    assert!(text.contains(&format!(
        "pod_cpu_usage_seconds_total{{namespace=\"{id}\",pod=\"burn\"}} "
    )));
    assert!(text.contains("\nnode_cpu_usage_seconds_total "));
    assert!(text.contains("\nscrape_error 0\n"), "{text}");

    // /pods: the API's pods bound to the node; /runningpods/: the runtime's view.
    let (ok, out, err) = raw(&dev, "/pods");
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(list["kind"], "PodList");
    let names: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["burn"]);
    assert_eq!(list["items"][0]["status"]["phase"], "Running");
    let (ok, out, err) = raw(&dev, "/runningpods/");
    assert!(ok, "{err}");
    let running: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(running["items"][0]["metadata"]["uid"], json!(uid));
    assert_eq!(
        running["items"][0]["spec"]["containers"][0]["image"],
        "localhost/fleetlet-test/busybox:1"
    );

    // Per-node authorization on the node's port, the kubelet's way.
    let here = token_with(
        &id,
        "here",
        &[("nodes/stats", Some(&dev)), ("nodes/proxy", None)],
        &mut rbac,
    );
    let other_node = format!("{id}-other");
    let elsewhere = token_with(
        &id,
        "elsewhere",
        &[("nodes/stats", Some(&other_node))],
        &mut rbac,
    );
    let node_addr = SocketAddr::new(kubelet_ip, port);
    let (status, body) = wait_for("RBAC in effect", 30, || async {
        let r = direct_get(node_addr, "/stats/summary", &here).await;
        (r.0 == 200).then_some(r)
    })
    .await;
    assert!(body.contains("\"nodeName\""), "{status}: {body}");
    let (status, body) = direct_get(node_addr, "/stats/summary", &elsewhere).await;
    println!("nodes/stats on {other_node} only, on {dev}'s port: {status} {body}");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("stats"), "{body}");
    // `here` may read stats but /pods needs nodes/pods or nodes/proxy on the node: it has proxy.
    assert_eq!(direct_get(node_addr, "/pods", &here).await.0, 200);
    assert_eq!(direct_get(node_addr, "/pods", &elsewhere).await.0, 403);
    // The shared port serves node-less paths to nobody: it cannot tell which node is meant.
    let shared = SocketAddr::new(kubelet_ip, setup.ports.kubelet);
    let (status, body) = direct_get(shared, "/stats/summary", &here).await;
    println!("shared port /stats/summary: {status} {body}");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("node_ports"), "{body}");

    // Offline: figures are stale, not served as current.
    agent.take();
    let (_, err) = wait_for("stats refused while the device is offline", 60, || async {
        let (ok, out, err) = raw(&dev, "/stats/summary");
        (!ok).then_some((out, err))
    })
    .await;
    println!("offline /stats/summary: {}", err.trim());
    // The API server turns the hub's 503 ("device ... is offline") into its own message.
    assert!(err.contains("ServiceUnavailable"), "{err}");
    let (status, body) = direct_get(node_addr, "/stats/summary", &here).await;
    println!("offline, straight to the port: {status} {body}");
    assert_eq!(status, 503);
    assert!(body.contains("offline"), "{body}");
    let (ok, text, err) = raw(&dev, "/metrics/resource");
    assert!(ok, "{err}");
    assert!(
        text.contains("\nscrape_error 1\n") && !text.contains("container_cpu"),
        "{text}"
    );

    // The port stays with the Node across a hub restart.
    hub.take();
    hub = Some(setup.spawn());
    agent = Some(agent_setup.spawn());
    wait_for("node Ready again after the hub restart", 90, || async {
        node_ready(&nodes.get(&dev).await.ok()?).then_some(())
    })
    .await;
    let after = node_port(&nodes.get(&dev).await.expect("node")).expect("port");
    assert_eq!(after, port, "the Node keeps its kubelet port");
    wait_for("stats again after the restart", 60, || async {
        let (ok, out, _) = raw(&dev, "/stats/summary");
        (ok && out.contains(&uid)).then_some(())
    })
    .await;
    drop(agent);
    drop(hub);
}
