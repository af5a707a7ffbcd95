//! The end-to-end harness shared by the hub's tests and benchmarks and the fault suite: real
//! `fleetlet-hub` and `fleetlet-agent` processes with their link PKI, the stack's Podman, unique
//! names and cleanup guards.
//!
//! These helpers panic on failure: they run only inside tests, where a panic is the failure.
//! Hub and agent binaries are taken from the cargo target directory of the running test
//! (`target/<profile>/`); `cargo test -p fleetlet-hub` builds them itself, other crates need
//! `cargo build -p fleetlet-hub -p fleetlet-agent` first (`make test` / `make faults` do it).

use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

pub use crate::orphans::{
    OWNER_PID_LABEL, OWNER_START_LABEL, owner_env, owner_labels, reap_orphans,
};

/// The stack's directory (`$FLEETLET_DEV_DIR`, default `/var/tmp/fleetlet-dev`).
pub fn dev_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("FLEETLET_DEV_DIR").unwrap_or_else(|_| "/var/tmp/fleetlet-dev".into()),
    )
}

/// The stack's admin kubeconfig.
pub fn kube_config_path() -> PathBuf {
    dev_dir().join("kubeconfig")
}

/// An admin client of the stack's API server.
pub async fn client() -> kube::Client {
    let path = kube_config_path();
    let kc = kube::config::Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("{}: {e} — run `make env-up` first", path.display()));
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    kube::Client::try_from(cfg).expect("client")
}

/// Polls `f` every 200 ms until it yields `Some`, at most `secs` seconds; panics on timeout.
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

/// A name unique to this process and moment: `prefix-<pid>-<hex>`.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{:x}", std::process::id(), nanos % 0xfffff)
}

/// Creates namespace `ns`.
pub async fn create_namespace(client: &kube::Client, ns: &str) {
    reap_orphans();
    let api: Api<Namespace> = Api::all(client.clone());
    let labels: serde_json::Map<String, serde_json::Value> = owner_labels()
        .into_iter()
        .map(|(k, v)| (k, v.into()))
        .collect();
    let body: Namespace =
        serde_json::from_value(json!({"metadata": {"name": ns, "labels": labels}})).expect("ns");
    api.create(&PostParams::default(), &body)
        .await
        .expect("create namespace");
}

/// A serving certificate for 127.0.0.1 signed by the stack's cluster CA (the API server checks
/// kubelet serving certificates against it: --kubelet-certificate-authority).
pub fn issue_kubelet_cert(dir: &Path) -> (PathBuf, PathBuf) {
    issue_kubelet_cert_for(dir, &[])
}

/// [`issue_kubelet_cert`] naming `extra` addresses too.
pub fn issue_kubelet_cert_for(dir: &Path, extra: &[IpAddr]) -> (PathBuf, PathBuf) {
    let pki = dev_dir().join("pki");
    let ca_pem = std::fs::read_to_string(pki.join("ca.crt")).expect("cluster CA");
    // The stack's CA key is SEC1 (openssl ecparam); rcgen reads PKCS#8, which `openssl pkey` writes.
    let out = Command::new("openssl")
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
    let ca_der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA pem")
    };
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
    let mut sans = vec!["127.0.0.1".to_string()];
    sans.extend(extra.iter().map(ToString::to_string));
    let mut params = rcgen::CertificateParams::new(sans).expect("params");
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
            let _ = Command::new(&kubectl)
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
            // The device's containers too: its agent is gone before it could remove them.
            remove_device_containers(n);
        }
    }
}

/// The stack's shared Podman socket.
pub fn podman_socket() -> PathBuf {
    std::env::var("FLEETLET_PODMAN_SOCKET")
        .map_or_else(|_| dev_dir().join("podman/podman.sock"), PathBuf::from)
}

/// A loopback TCP port free right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A binary of this workspace from the running test's target directory (`target/<profile>/`).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable under target/<profile>/deps");
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} missing: run `cargo build -p {name}` first",
        bin.display()
    );
    bin
}

/// The `fleetlet-agent` binary.
pub fn agent_binary() -> PathBuf {
    workspace_binary("fleetlet-agent")
}

/// The `fleetlet-hub` binary.
pub fn hub_binary() -> PathBuf {
    workspace_binary("fleetlet-hub")
}

/// A child process that is killed (SIGKILL) on drop; its log is printed if the test fails.
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

    /// Spawns `cmd` with stdout and stderr appended to `log` (a restarted process keeps one log).
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Self {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .env(crate::orphans::OWNER_ENV, owner_env())
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

    /// The file the process logs to.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether the process is still running (it has not exited).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill9(self) {
        // Drop sends SIGKILL (`Child::kill`) and reaps.
        drop(self);
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

/// The link PKI: a CA, the hub's serving certificate for `hub_ips` (plus localhost), one client
/// certificate per device (CN = device name, the hub's default identity source).
pub fn link_pki_for(dir: &Path, devices: &[&str], hub_ips: &[IpAddr]) {
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
    let mut sans: Vec<String> = vec!["127.0.0.1".into(), "localhost".into()];
    sans.extend(
        hub_ips
            .iter()
            .map(ToString::to_string)
            .filter(|ip| ip != "127.0.0.1"),
    );
    issue("hub", sans, rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    for d in devices {
        issue(d, Vec::new(), rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    }
}

/// [`link_pki_for`] with a hub on loopback only.
pub fn link_pki(dir: &Path, devices: &[&str]) {
    link_pki_for(dir, devices, &[]);
}

/// Runs the podman CLI against `socket` and returns its stdout.
pub fn podman_at(socket: &Path, args: &[&str]) -> String {
    let out = Command::new("podman")
        .arg("--url")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .output()
        .expect("podman");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the podman CLI against the stack's Podman and returns its stdout.
pub fn podman(args: &[&str]) -> String {
    podman_at(&podman_socket(), args)
}

/// Removes every container and pod the agent of `device` created on the stack's Podman.
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
#[derive(Debug, Clone, Copy)]
pub struct HubPorts {
    /// The agent link (gRPC over mTLS).
    pub link: u16,
    /// The ops endpoint (/metrics, health).
    pub ops: u16,
    /// The kubelet endpoint (the Nodes' daemonEndpoints while this hub leads).
    pub kubelet: u16,
}

/// Applies the shipped namespace and RBAC (`packaging/kubernetes/`) for real, checks every shipped
/// manifest with a server-side dry-run, and writes a kubeconfig holding a token of the shipped
/// ServiceAccount: the hub then runs with exactly the permissions an installation gives it.
pub fn shipped_rbac_kubeconfig(dir: &Path) -> PathBuf {
    let stack = crate::Stack::shared().expect("local stack (make env-up)");
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/kubernetes");
    let run = kubectl_ok;
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
        .filter(|l| has_status_403(l) || l.to_ascii_lowercase().contains("forbidden"))
        .collect();
    assert!(
        forbidden.is_empty(),
        "the hub hit requests its shipped RBAC forbids:\n{}",
        forbidden.join("\n")
    );
}

/// Whether `line` holds the number 403 on its own (not inside a timestamp, port or id).
fn has_status_403(line: &str) -> bool {
    let b = line.as_bytes();
    line.match_indices("403").any(|(i, _)| {
        let before = i.checked_sub(1).and_then(|j| b.get(j));
        let after = b.get(i + 3);
        !before.is_some_and(u8::is_ascii_digit) && !after.is_some_and(u8::is_ascii_digit)
    })
}

/// How a test hub is set up: its devices and the knobs the fault suite turns.
#[derive(Debug, Clone)]
pub struct HubSpec {
    /// Node instance and leader-election Lease name.
    pub instance: String,
    /// Inventory: (device name, fleet).
    pub devices: Vec<(String, String)>,
    /// Address the link listens on (loopback, or a veth address for partition tests).
    pub link_ip: IpAddr,
    /// `[nodes] disconnect_grace_secs`.
    pub disconnect_grace_secs: u64,
    /// `[link]` keepalive interval and timeout in seconds; `None` keeps the hub's defaults.
    pub keepalive_secs: Option<(u64, u64)>,
    /// The inventory table verbatim (e.g. `[inventory.flightctl]` ...); `None` writes a static
    /// inventory of `devices`.
    pub inventory: Option<String>,
    /// `[link] client_ca_file`; `None` trusts the test PKI's `link-ca.crt`.
    pub client_ca_file: Option<PathBuf>,
    /// `[link] identity_prefix`, stripped from the certificate's CN to get the device name.
    pub identity_prefix: String,
    /// `[leader_election]` lease duration and retry period in seconds.
    pub leader_secs: (u32, u64),
    /// `[nodes] taints` as a TOML value (e.g. `[]`); `None` keeps the hub's default.
    pub node_taints: Option<String>,
    /// `[kubelet] node_ports` (first, last): each Node gets a kubelet port of its own.
    pub kubelet_node_ports: Option<(u16, u16)>,
    /// Address the kubelet endpoint listens on and Nodes advertise (127.0.0.1 when `None`).
    /// The API server proxies `nodes/proxy` only to non-loopback Node addresses.
    pub kubelet_ip: Option<IpAddr>,
}

impl HubSpec {
    /// A hub on loopback with a 5 s disconnect grace and default keepalives.
    pub fn new(instance: &str, devices: &[(String, String)]) -> Self {
        HubSpec {
            instance: instance.to_string(),
            devices: devices.to_vec(),
            link_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            disconnect_grace_secs: 5,
            keepalive_secs: None,
            inventory: None,
            client_ca_file: None,
            identity_prefix: String::new(),
            leader_secs: (15, 2),
            node_taints: None,
            kubelet_node_ports: None,
            kubelet_ip: None,
        }
    }
}

/// `n` consecutive ports free on 127.0.0.1 right now, below the ephemeral range (so the kernel
/// does not hand them out to other tests' connections meanwhile); `None` after 100 tries.
pub fn free_port_range(n: u16) -> Option<(u16, u16)> {
    for _ in 0..100 {
        let first = 20_000 + rand_below(12_000 - n);
        let held: Vec<TcpListener> = (first..first + n)
            .map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return Some((first, first + n - 1));
        }
    }
    None
}

fn rand_below(n: u16) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    u16::try_from(h.finish() % u64::from(n.max(1))).unwrap_or(0)
}

/// A hub whose PKI, inventory and config are written and can be (re)started any number of times
/// with the same identity and ports (a restart after `kill -9` keeps the agents' certificates valid).
#[derive(Debug, Clone)]
pub struct HubSetup {
    dir: PathBuf,
    /// Replica name: leader-election identity, `<name>.toml`, `<name>.log` ("hub" by default).
    pub name: String,
    /// The hub's ports.
    pub ports: HubPorts,
    /// The spec it was written from.
    pub spec: HubSpec,
}

impl HubSetup {
    /// Writes the link PKI, a static inventory and the hub's config into `dir`, under the shipped
    /// RBAC and with leader election on (a Lease of its own, named after the instance).
    pub fn write(dir: &Path, spec: HubSpec) -> Self {
        reap_orphans();
        let names: Vec<&str> = spec.devices.iter().map(|(n, _)| n.as_str()).collect();
        link_pki_for(dir, &names, &[spec.link_ip]);
        issue_kubelet_cert_for(dir, spec.kubelet_ip.as_slice());
        // The owner labels reach the Nodes as device labels (see `orphans`).
        let owner: Vec<String> = owner_labels()
            .iter()
            .map(|(k, v)| format!("{k:?} = {v:?}"))
            .collect();
        let owner = owner.join(", ");
        let inventory: String = spec
            .devices
            .iter()
            .map(|(n, f)| {
                format!("[[device]]\nname = \"{n}\"\nfleet = \"{f}\"\nlabels = {{ {owner} }}\n")
            })
            .collect();
        std::fs::write(dir.join("devices.toml"), inventory).expect("inventory");
        shipped_rbac_kubeconfig(dir);
        Self::write_replica(dir, spec, "hub")
    }

    /// Another replica of this hub (same PKI, inventory, instance and leader Lease) on fresh
    /// ports, with its own identity, config and log named `name`.
    pub fn replica(&self, name: &str) -> Self {
        Self::write_replica(&self.dir, self.spec.clone(), name)
    }

    fn write_replica(dir: &Path, spec: HubSpec, name: &str) -> Self {
        let (kubelet_cert, kubelet_key) = (dir.join("kubelet.crt"), dir.join("kubelet.key"));
        let link_port = match spec.link_ip {
            IpAddr::V4(ip) if !ip.is_loopback() => free_port_on(spec.link_ip),
            _ => free_port(),
        };
        let (kubelet_port, ops_port) = (free_port(), free_port());
        let inventory = spec.inventory.clone().unwrap_or_else(|| {
            format!(
                "[inventory]\nstatic_file = \"{}/devices.toml\"",
                dir.display()
            )
        });
        let client_ca = spec
            .client_ca_file
            .clone()
            .unwrap_or_else(|| dir.join("link-ca.crt"));
        let pki = dev_dir().join("pki");
        let hub_kubeconfig = dir.join("hub-sa.kubeconfig");
        let keepalive = spec
            .keepalive_secs
            .map(|(i, t)| format!("keepalive_interval_secs = {i}\nkeepalive_timeout_secs = {t}\n"))
            .unwrap_or_default();
        std::fs::write(
            dir.join(format!("{name}.toml")),
            format!(
                r#"kubeconfig = "{kubeconfig}"
[ops]
listen = "127.0.0.1:{ops_port}"
{inventory}
[nodes]
instance = "{instance}"
disconnect_grace_secs = {grace}
{taints}
[leader_election]
enabled = true
namespace = "fleetlet-system"
name = "{instance}"
identity = "{name}"
lease_duration_secs = {lease_secs}
retry_secs = {retry_secs}
[kubelet]
listen = "{kubelet_ip}:{kubelet_port}"
advertise_address = "{kubelet_ip}"
cert_file = "{kubelet_cert}"
key_file = "{kubelet_key}"
client_ca_file = "{cluster_ca}"
{node_ports}
[link]
listen = "{link_addr}"
client_ca_file = "{client_ca}"
cert_file = "{dir}/hub.crt"
key_file = "{dir}/hub.key"
identity_prefix = "{prefix}"
{keepalive}"#,
                client_ca = client_ca.display(),
                prefix = spec.identity_prefix,
                kubeconfig = hub_kubeconfig.display(),
                dir = dir.display(),
                instance = spec.instance,
                grace = spec.disconnect_grace_secs,
                taints = spec
                    .node_taints
                    .as_ref()
                    .map(|t| format!("taints = {t}"))
                    .unwrap_or_default(),
                kubelet_cert = kubelet_cert.display(),
                kubelet_key = kubelet_key.display(),
                kubelet_ip = spec.kubelet_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                node_ports = spec
                    .kubelet_node_ports
                    .map(|(a, b)| format!("node_ports = \"{a}-{b}\""))
                    .unwrap_or_default(),
                cluster_ca = pki.join("ca.crt").display(),
                link_addr = std::net::SocketAddr::new(spec.link_ip, link_port),
                lease_secs = spec.leader_secs.0,
                retry_secs = spec.leader_secs.1,
            ),
        )
        .expect("hub config");
        HubSetup {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            ports: HubPorts {
                link: link_port,
                ops: ops_port,
                kubelet: kubelet_port,
            },
            spec,
        }
    }

    /// Starts the real `fleetlet-hub` binary (its log is appended to `<name>.log`, `hub.log` for
    /// the first replica, in the directory).
    pub fn spawn(&self) -> Proc {
        self.spawn_with(|_| {})
    }

    /// [`HubSetup::spawn`] with `tweak` applied to the command first (e.g. another `RUST_LOG`).
    pub fn spawn_with(&self, tweak: impl FnOnce(&mut Command)) -> Proc {
        let mut cmd = Command::new(hub_binary());
        cmd.arg("run")
            .arg("-c")
            .arg(self.dir.join(format!("{}.toml", self.name)))
            .env("RUST_LOG", "info");
        tweak(&mut cmd);
        Proc::spawn(&format!("fleetlet-hub {}", self.name), &mut cmd, self.log())
    }

    /// The replica's log file.
    pub fn log(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// The link endpoint agents connect to.
    pub fn endpoint(&self) -> String {
        format!(
            "https://{}",
            std::net::SocketAddr::new(self.spec.link_ip, self.ports.link)
        )
    }
}

/// A TCP port free right now on `ip`.
pub fn free_port_on(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Writes the PKI, inventory and config of a loopback hub into `dir` and starts it.
pub fn start_hub(dir: &Path, instance: &str, devices: &[(String, String)]) -> (Proc, HubPorts) {
    let setup = HubSetup::write(dir, HubSpec::new(instance, devices));
    (setup.spawn(), setup.ports)
}

/// How a test agent is set up.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// Device name (its certificate in the PKI directory is `<device>.crt`).
    pub device: String,
    /// The hub's link endpoint, `https://host:port`.
    pub endpoint: String,
    /// `[hub] fallback_endpoints`: other hub replicas, tried in turn.
    pub fallback_endpoints: Vec<String>,
    /// The Podman socket the agent drives.
    pub podman_socket: PathBuf,
    /// `[hub]` keepalive interval and timeout in seconds; `None` keeps the agent's defaults.
    pub keepalive_secs: Option<(u64, u64)>,
    /// Run the agent inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// Client certificate and key (e.g. issued by Flightctl); `None` uses `<device>.{crt,key}`
    /// from the test PKI.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// `[stats] interval_secs`; `None` keeps the agent's default (15 s).
    pub stats_interval_secs: Option<u64>,
    /// More top-level lines of the agent's config (e.g. `events_buffer = 4`).
    pub extra_config: String,
}

impl AgentSpec {
    /// An agent of `device` on the stack's Podman, connecting to `https://127.0.0.1:<link_port>`.
    pub fn new(device: &str, link_port: u16) -> Self {
        AgentSpec {
            device: device.to_string(),
            endpoint: format!("https://127.0.0.1:{link_port}"),
            fallback_endpoints: Vec::new(),
            podman_socket: podman_socket(),
            keepalive_secs: None,
            netns: None,
            cert: None,
            stats_interval_secs: None,
            extra_config: String::new(),
        }
    }
}

/// An agent whose state directory and config are written, restartable with the same state.
#[derive(Debug, Clone)]
pub struct AgentSetup {
    dir: PathBuf,
    config: PathBuf,
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// The spec it was written from.
    pub spec: AgentSpec,
}

impl AgentSetup {
    /// Writes the agent's config (certificates from the hub's PKI in `dir`) and state directory.
    pub fn write(dir: &Path, spec: AgentSpec) -> Self {
        let device = &spec.device;
        let state = dir.join(format!("state-{device}"));
        std::fs::create_dir_all(&state).expect("state dir");
        let cfg = dir.join(format!("agent-{device}.toml"));
        let (cert, key) = spec.cert.clone().unwrap_or_else(|| {
            (
                dir.join(format!("{device}.crt")),
                dir.join(format!("{device}.key")),
            )
        });
        let keepalive = spec
            .keepalive_secs
            .map(|(i, t)| format!("keepalive_interval_secs = {i}\nkeepalive_timeout_secs = {t}\n"))
            .unwrap_or_default();
        let fallback: Vec<String> = spec
            .fallback_endpoints
            .iter()
            .map(|e| format!("{e:?}"))
            .collect();
        let fallback = fallback.join(", ");
        std::fs::write(
            &cfg,
            format!(
                r#"device_name = "{device}"
state_dir = "{state}"
podman_socket = "{sock}"
resync_secs = 5
node_ip = "127.0.0.1"
{extra}
[hub]
endpoint = "{endpoint}"
ca_file = "{dir}/link-ca.crt"
cert_file = "{cert}"
key_file = "{key}"
reconnect_max_backoff_secs = 2
stats_interval_secs = 1
fallback_endpoints = [{fallback}]
{keepalive}{stats}"#,
                stats = spec
                    .stats_interval_secs
                    .map(|i| format!("\n[stats]\ninterval_secs = {i}\n"))
                    .unwrap_or_default(),
                cert = cert.display(),
                key = key.display(),
                state = state.display(),
                sock = spec.podman_socket.display(),
                endpoint = spec.endpoint,
                dir = dir.display(),
                extra = spec.extra_config,
            ),
        )
        .expect("agent config");
        AgentSetup {
            dir: dir.to_path_buf(),
            config: cfg,
            state_dir: state,
            spec,
        }
    }

    /// Starts the real `fleetlet-agent` binary (log appended to `agent-<device>.log`).
    pub fn spawn(&self) -> Proc {
        self.spawn_with(|_| {})
    }

    /// [`AgentSetup::spawn`] with `tweak` applied to the command first (more `run` flags such as
    /// `--resync-secs`, environment such as `RUST_LOG`).
    pub fn spawn_with(&self, tweak: impl FnOnce(&mut Command)) -> Proc {
        let mut cmd = match &self.spec.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(agent_binary());
                c
            }
            None => Command::new(agent_binary()),
        };
        // The agent logs to journald when it is there; the test wants its log in its own file.
        cmd.arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("RUST_LOG", "info")
            .env("FLEETLET_AGENT_LOG", "stderr");
        tweak(&mut cmd);
        Proc::spawn(
            &self.spec.device,
            &mut cmd,
            self.dir.join(format!("agent-{}.log", self.spec.device)),
        )
    }
}

/// Starts a real `fleetlet-agent` process for `device` (certificates from [`start_hub`]'s
/// PKI in `dir`, the stack's Podman), connecting to the hub's link on `link_port`.
pub fn start_agent(dir: &Path, device: &str, link_port: u16) -> Proc {
    AgentSetup::write(dir, AgentSpec::new(device, link_port)).spawn()
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

/// Runs the stack's kubectl as admin and ignores the outcome (cleanup in `Drop`).
pub fn kubectl_best_effort(args: &[&str]) {
    let kubectl = std::env::var("FLEETLET_KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let _ = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(kube_config_path())
        .args(args)
        .output();
}

/// Runs the stack's kubectl as admin: (success, stdout, stderr).
pub fn kubectl(args: &[&str]) -> (bool, String, String) {
    let kubectl = std::env::var("FLEETLET_KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let out = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(kube_config_path())
        .args(args)
        .output()
        .expect("run kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the stack's kubectl as admin and returns its stdout; fails the test when kubectl fails.
pub fn kubectl_ok(args: &[&str]) -> String {
    let (ok, out, err) = kubectl(args);
    assert!(ok, "kubectl {args:?}: {err}");
    out
}

/// The app containers (not pods' infra containers) on the stack's Podman that carry every one
/// of `labels` (`(key, value)`), as `podman ps --format json` entries.
pub fn app_containers(labels: &[(&str, &str)]) -> Vec<serde_json::Value> {
    let mut args = vec!["ps".to_string(), "-a".to_string()];
    for (key, value) in labels {
        args.push("--filter".into());
        args.push(format!("label={key}={value}"));
    }
    args.extend(["--format".to_string(), "json".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let list: Vec<serde_json::Value> = serde_json::from_str(&podman(&args)).unwrap_or_default();
    list.into_iter()
        .filter(|c| c["Labels"]["io.fleetlet.container"].is_string())
        .collect()
}

/// (id, state) of the app containers of pod `uid`, on any device.
pub fn uid_containers(uid: &str) -> Vec<(String, String)> {
    app_containers(&[("io.fleetlet.pod-uid", uid)])
        .iter()
        .map(|c| (json_str(&c["Id"]), json_str(&c["State"])))
        .collect()
}

/// A JSON string's text, empty for anything else.
pub fn json_str(value: &serde_json::Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

/// `(status, reason, message)` of a Node condition.
pub fn node_condition(
    node: &k8s_openapi::api::core::v1::Node,
    type_: &str,
) -> Option<(String, String, String)> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| {
            (
                c.status.clone(),
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

/// (status, lastTransitionTime) of a pod's condition `type_` (e.g. "Ready").
pub fn pod_condition(
    pod: &k8s_openapi::api::core::v1::Pod,
    type_: &str,
) -> Option<(String, String)> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| {
            (
                c.status.clone(),
                c.last_transition_time
                    .as_ref()
                    .map(|t| t.0.to_string())
                    .unwrap_or_default(),
            )
        })
}

/// A kubectl child process (e.g. `logs -f`) with piped stdout and stderr, read while it runs.
pub fn kubectl_spawn(args: &[&str]) -> Child {
    let kubectl = std::env::var("FLEETLET_KUBECTL").unwrap_or_else(|_| "kubectl".into());
    Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(kube_config_path())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl")
}

/// `GET path` on a hub's ops endpoint (plain HTTP/1.0 on loopback): (status code, body), or
/// `None` while nothing answers.
pub async fn ops_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The value of the unlabelled metric `fleetlet_hub_<name>` on a hub's ops endpoint.
pub async fn hub_metric(ops_port: u16, name: &str) -> Option<f64> {
    let (_, body) = ops_get(ops_port, "/metrics").await?;
    let key = format!("fleetlet_hub_{name} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}
