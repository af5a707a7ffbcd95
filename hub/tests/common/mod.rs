//! Helpers shared by the hub's integration tests: the local stack's admin client, bounded
//! polling, unique names.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// Pieces of the end-to-end harness: real hub and agent processes, link PKI, Podman.
pub fn podman_socket() -> PathBuf {
    std::env::var("FLEETLET_PODMAN_SOCKET")
        .map_or_else(|_| dev_dir().join("podman/podman.sock"), PathBuf::from)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn agent_binary() -> PathBuf {
    let hub = PathBuf::from(env!("CARGO_BIN_EXE_fleetlet-hub"));
    let agent = hub.with_file_name("fleetlet-agent");
    assert!(
        agent.exists(),
        "{} missing: run `cargo build -p fleetlet-agent` first",
        agent.display()
    );
    agent
}

/// A child process that is killed on drop; its log is printed if the test fails.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn");
        Self {
            name: name.into(),
            child,
            log,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("----- last lines of {} -----", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// The link PKI: a CA, the hub's serving certificate, one client certificate per device (CN =
/// device name, the hub's default identity source).
pub fn link_pki(dir: &Path, devices: &[&str]) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "e2e link CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca.clone().self_signed(&ca_key).expect("ca");
    std::fs::write(dir.join("link-ca.crt"), ca_cert.pem()).expect("write");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let issue = |name: &str, sans: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose| {
        let mut p = rcgen::CertificateParams::new(sans).expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &issuer).expect("sign");
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write");
    };
    issue(
        "hub",
        vec!["127.0.0.1".into(), "localhost".into()],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    for d in devices {
        issue(d, Vec::new(), rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    }
}

pub fn podman(args: &[&str]) -> String {
    let out = Command::new("podman")
        .arg("--url")
        .arg(format!("unix://{}", podman_socket().display()))
        .args(args)
        .output()
        .expect("podman");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn remove_device_containers(device: &str) {
    let filter = format!("label=io.fleetlet.device={device}");
    for id in podman(&["ps", "-aq", "--filter", &filter]).split_whitespace() {
        podman(&["rm", "-f", "-t", "0", id]);
    }
    for id in podman(&["pod", "ps", "-q", "--filter", &filter]).split_whitespace() {
        podman(&["pod", "rm", "-f", id]);
    }
}

/// Ports of a hub started by [`start_hub`].
pub struct HubPorts {
    /// The agent link (gRPC over mTLS).
    pub link: u16,
    /// The ops endpoint (/metrics, health).
    pub ops: u16,
}

/// Applies the shipped namespace and RBAC (`packaging/kubernetes/`) for real, checks every shipped
/// manifest with a server-side dry-run, and writes a kubeconfig holding a token of the shipped
/// ServiceAccount: the hub then runs with exactly the permissions an installation gives it.
pub fn shipped_rbac_kubeconfig(dir: &Path) -> PathBuf {
    let stack = fleetlet_test_support::Stack::shared().expect("local stack (make env-up)");
    let kubectl = stack
        .kubectl()
        .expect("FLEETLET_KUBECTL in the stack's env")
        .to_path_buf();
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kubernetes");
    let run = |args: &[&str]| -> String {
        let out = Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(stack.kubeconfig())
            .args(args)
            .output()
            .expect("run kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let file = |name: &str| manifests.join(name).display().to_string();
    run(&[
        "apply",
        "--server-side",
        "--field-manager=fleetlet-e2e",
        "-f",
        &file("00-namespace.yaml"),
        "-f",
        &file("10-rbac.yaml"),
    ]);
    let dry_run = run(&[
        "apply",
        "--server-side",
        "--dry-run=server",
        "--field-manager=fleetlet-e2e",
        "-f",
        &manifests.display().to_string(),
    ]);
    for kind in [
        "deployment.apps/fleetlet-hub",
        "configmap/fleetlet-hub",
        "service/fleetlet-hub-agents",
        "service/fleetlet-hub-kubelet",
    ] {
        assert!(
            dry_run.contains(kind),
            "server-side dry-run of {kind}: {dry_run}"
        );
    }
    let token = run(&[
        "-n",
        "fleetlet-system",
        "create",
        "token",
        "fleetlet-hub",
        "--duration=2h",
    ]);
    let server = stack.var("FLEETLET_KUBE_APISERVER").expect("apiserver URL");
    let ca = stack.var("FLEETLET_CLUSTER_CA_CERT").expect("cluster CA");
    let path = dir.join("hub-sa.kubeconfig");
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: stack\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: fleetlet-hub\n  user:\n    token: {token}\ncontexts:\n- name: hub\n  context:\n    cluster: stack\n    user: fleetlet-hub\ncurrent-context: hub\n",
        token = token.trim()
    );
    std::fs::write(&path, kubeconfig).expect("write hub kubeconfig");
    path
}

/// Any request the API server refused shows in the hub's log as a 403 / Forbidden error.
pub fn assert_no_forbidden(hub_log: &Path) {
    let log = std::fs::read_to_string(hub_log).unwrap_or_default();
    let forbidden: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("403") || l.to_ascii_lowercase().contains("forbidden"))
        .collect();
    assert!(
        forbidden.is_empty(),
        "the hub hit requests its shipped RBAC forbids:\n{}",
        forbidden.join("\n")
    );
}

/// Writes the link PKI, a static inventory of `devices` (name, fleet) and the hub's config into
/// `dir`, then starts the real `fleetlet-hub` binary with node instance `instance`, under the
/// shipped RBAC and with leader election on (a Lease of its own, named `instance`).
pub fn start_hub(dir: &Path, instance: &str, devices: &[(String, String)]) -> (Proc, HubPorts) {
    let names: Vec<&str> = devices.iter().map(|(n, _)| n.as_str()).collect();
    link_pki(dir, &names);
    let (kubelet_cert, kubelet_key) = issue_kubelet_cert(dir);
    let (link_port, kubelet_port, ops_port) = (free_port(), free_port(), free_port());
    let inventory: String = devices
        .iter()
        .map(|(n, f)| format!("[[device]]\nname = \"{n}\"\nfleet = \"{f}\"\n"))
        .collect();
    std::fs::write(dir.join("devices.toml"), inventory).expect("inventory");
    let pki = dev_dir().join("pki");
    let hub_kubeconfig = shipped_rbac_kubeconfig(dir);
    std::fs::write(
        dir.join("hub.toml"),
        format!(
            r#"kubeconfig = "{kubeconfig}"
[ops]
listen = "127.0.0.1:{ops_port}"
[inventory]
static_file = "{dir}/devices.toml"
[nodes]
instance = "{instance}"
disconnect_grace_secs = 5
[leader_election]
enabled = true
namespace = "fleetlet-system"
name = "{instance}"
[kubelet]
listen = "127.0.0.1:{kubelet_port}"
cert_file = "{kubelet_cert}"
key_file = "{kubelet_key}"
client_ca_file = "{cluster_ca}"
[link]
listen = "127.0.0.1:{link_port}"
client_ca_file = "{dir}/link-ca.crt"
cert_file = "{dir}/hub.crt"
key_file = "{dir}/hub.key"
"#,
            kubeconfig = hub_kubeconfig.display(),
            dir = dir.display(),
            kubelet_cert = kubelet_cert.display(),
            kubelet_key = kubelet_key.display(),
            cluster_ca = pki.join("ca.crt").display(),
        ),
    )
    .expect("hub config");
    let hub = Proc::spawn(
        "fleetlet-hub",
        Command::new(env!("CARGO_BIN_EXE_fleetlet-hub"))
            .arg("run")
            .arg("-c")
            .arg(dir.join("hub.toml"))
            .env("RUST_LOG", "info"),
        dir.join("hub.log"),
    );
    (
        hub,
        HubPorts {
            link: link_port,
            ops: ops_port,
        },
    )
}

/// Starts a real `fleetlet-agent` process for `device` (certificates from [`start_hub`]'s
/// PKI in `dir`, the stack's Podman), connecting to the hub's link on `link_port`.
pub fn start_agent(dir: &Path, device: &str, link_port: u16) -> Proc {
    let state = dir.join(format!("state-{device}"));
    std::fs::create_dir_all(&state).expect("state dir");
    let cfg = dir.join(format!("agent-{device}.toml"));
    std::fs::write(
        &cfg,
        format!(
            r#"device_name = "{device}"
state_dir = "{state}"
podman_socket = "{sock}"
resync_secs = 5
node_ip = "127.0.0.1"
[hub]
endpoint = "https://127.0.0.1:{link_port}"
ca_file = "{dir}/link-ca.crt"
cert_file = "{dir}/{device}.crt"
key_file = "{dir}/{device}.key"
reconnect_max_backoff_secs = 2
"#,
            state = state.display(),
            sock = podman_socket().display(),
            dir = dir.display(),
        ),
    )
    .expect("agent config");
    Proc::spawn(
        device,
        Command::new(agent_binary())
            .arg("--config")
            .arg(&cfg)
            .arg("run")
            .env("RUST_LOG", "info"),
        dir.join(format!("agent-{device}.log")),
    )
}

/// Whether a Node is Ready and carries none of the `node.kubernetes.io/` taints.
pub fn node_ready(n: &k8s_openapi::api::core::v1::Node) -> bool {
    let ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let tainted = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key.starts_with("node.kubernetes.io/")));
    ready && !tainted
}
