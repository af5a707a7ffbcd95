//! Helpers shared by the hub's integration tests: the local stack's admin client, bounded
//! polling, unique names.
#![allow(dead_code)]

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

pub fn kube_config_path() -> std::path::PathBuf {
    let dir = std::env::var("FLEETLET_DEV_DIR").unwrap_or_else(|_| "/var/tmp/fleetlet-dev".into());
    std::path::Path::new(&dir).join("kubeconfig")
}

pub async fn client() -> kube::Client {
    let path = kube_config_path();
    let kc = kube::config::Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("{}: {e} — run `make env-up` first", path.display()));
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    kube::Client::try_from(cfg).expect("client")
}

/// Polls `f` every 200 ms until it yields `Some`, at most `secs` seconds.
pub async fn wait_for<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{:x}", std::process::id(), nanos % 0xfffff)
}

pub async fn create_namespace(client: &kube::Client, ns: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let body: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns");
    api.create(&PostParams::default(), &body)
        .await
        .expect("create namespace");
}

pub fn dev_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(
        std::env::var("FLEETLET_DEV_DIR").unwrap_or_else(|_| "/var/tmp/fleetlet-dev".into()),
    )
}

/// A serving certificate for 127.0.0.1 signed by the stack's cluster CA (the API server checks
/// kubelet serving certificates against it: --kubelet-certificate-authority).
pub fn issue_kubelet_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let pki = dev_dir().join("pki");
    let ca_pem = std::fs::read_to_string(pki.join("ca.crt")).expect("cluster CA");
    // The stack's CA key is SEC1 (openssl ecparam); rcgen reads PKCS#8, which `openssl pkey` writes.
    let out = std::process::Command::new("openssl")
        .arg("pkey")
        .arg("-in")
        .arg(pki.join("ca.key"))
        .output()
        .expect("openssl pkey");
    assert!(
        out.status.success(),
        "openssl pkey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ca_key = rcgen::KeyPair::from_pem(&String::from_utf8_lossy(&out.stdout)).expect("CA key");
    // The issuer is described by the CA's subject; the signature is made with its key.
    let ca_der = rustls_pemfile::certs(&mut ca_pem.as_bytes())
        .next()
        .expect("CA pem")
        .expect("CA pem");
    let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).expect("CA cert");
    let ca_cn = ca_x509
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .expect("CA CN")
        .to_string();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_cn);
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fleetlet-hub-kubelet");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let (c, k) = (dir.join("kubelet.crt"), dir.join("kubelet.key"));
    std::fs::write(&c, cert.pem()).expect("write cert");
    std::fs::write(&k, key.serialize_pem()).expect("write key");
    (c, k)
}

/// Deletes Nodes and a namespace on drop (also when a test fails), through kubectl. Leftover
/// NotReady Nodes would push the node lifecycle controller into partial-disruption mode, which
/// stops taint-based eviction for every later test.
pub struct KubeCleanup {
    /// Nodes to delete.
    pub nodes: Vec<String>,
    /// Namespace to delete, if any.
    pub namespace: Option<String>,
}

impl Drop for KubeCleanup {
    fn drop(&mut self) {
        let kubectl = std::env::var("FLEETLET_KUBECTL").unwrap_or_else(|_| "kubectl".into());
        let kc = kube_config_path();
        let run = |args: &[&str]| {
            let _ = std::process::Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(&kc)
                .args(args)
                .output();
        };
        if let Some(ns) = &self.namespace {
            run(&["delete", "namespace", ns, "--wait=false"]);
        }
        for n in &self.nodes {
            run(&["delete", "node", n, "--wait=false", "--ignore-not-found"]);
        }
    }
}
