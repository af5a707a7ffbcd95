//! Helpers for tests against the stack's real Flightctl: its settings from the stack's env, an
//! admin client, object creation and deletion, device certificates the way a device gets them,
//! and a loopback relay in front of its API that a test can cut.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleetlet_hub::inventory::flightctl::{FlightctlClient, FlightctlError};
use fleetlet_test_support::Stack;
use http::Method;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// The stack's Flightctl, as a test uses it.
pub struct Env {
    /// The user API, e.g. `https://127.0.0.1:3443`.
    pub api_url: String,
    /// The agent (device) endpoint, e.g. `https://127.0.0.1:7443`.
    pub agent_url: String,
    /// CA of both endpoints' serving certificates.
    pub ca_file: String,
    /// Flightctl's client-signer CA bundle (signs device certificates).
    pub signer_ca_file: String,
    /// A client acting as the flightctl-admin ServiceAccount.
    pub admin: FlightctlClient,
    /// Token file of the flightctl-viewer ServiceAccount (what the hub uses).
    pub viewer_token_file: String,
}

/// Reads the Flightctl settings from the stack's env (`make env-up`).
pub fn env(stack: &Stack) -> Env {
    let var = |name: &str| {
        stack
            .var(name)
            .unwrap_or_else(|| {
                panic!("{name} missing from the stack env: run `make env-up` (Flightctl component)")
            })
            .to_owned()
    };
    let api_url = var("FLIGHTCTL_API_URL");
    let ca_file = var("FLIGHTCTL_CA_FILE");
    let admin = FlightctlClient::new(
        &api_url,
        ca_file.as_ref(),
        Some(var("FLIGHTCTL_ADMIN_TOKEN_FILE").into()),
        Duration::from_secs(30),
    )
    .expect("admin client");
    Env {
        api_url,
        agent_url: var("FLIGHTCTL_AGENT_URL"),
        ca_file,
        signer_ca_file: var("FLIGHTCTL_SIGNER_CA_FILE"),
        admin,
        viewer_token_file: var("FLIGHTCTL_VIEWER_TOKEN_FILE"),
    }
}

/// Creates a Flightctl object of `kind` (plural, e.g. `devices`) as admin.
pub async fn create(admin: &FlightctlClient, kind: &str, body: serde_json::Value) {
    admin
        .request(Method::POST, &format!("/api/v1/{kind}"), Some(&body))
        .await
        .unwrap_or_else(|e| panic!("creating {kind} {body}: {e}"));
}

/// Deletes a Flightctl object as admin; a missing one is fine.
pub async fn delete(admin: &FlightctlClient, kind: &str, name: &str) {
    match admin
        .request(Method::DELETE, &format!("/api/v1/{kind}/{name}"), None)
        .await
    {
        Ok(_) => {}
        Err(FlightctlError::Status { status, .. }) if status == http::StatusCode::NOT_FOUND => {}
        Err(e) => panic!("deleting {kind}/{name}: {e}"),
    }
}

/// Replaces a device's labels as admin (a JSON patch on `/metadata/labels`).
pub async fn set_device_labels(admin: &FlightctlClient, device: &str, labels: serde_json::Value) {
    admin
        .request(
            Method::PATCH,
            &format!("/api/v1/devices/{device}"),
            Some(&json!([{"op": "add", "path": "/metadata/labels", "value": labels}])),
        )
        .await
        .unwrap_or_else(|e| panic!("labelling device {device}: {e}"));
}

/// A Fleet selecting devices labelled `fleetlet-test-fleet=<selector_value>`.
pub fn fleet(name: &str, selector_value: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1beta1", "kind": "Fleet",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"fleetlet-test-fleet": selector_value}},
            "template": {"metadata": {"labels": {"fleetlet-test-fleet": selector_value}}, "spec": {}}
        }
    })
}

/// A Device object with `labels`.
pub fn device(name: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1beta1", "kind": "Device", "metadata": {"name": name, "labels": labels}, "spec": {}})
}

/// What `tests/env/flightctl/device-cert.sh` leaves for one enrolled device.
pub struct DeviceCerts {
    /// The fleetlet client certificate (signer flightctl.io/device-svc-client, CN
    /// `fleetlet-<device>`).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The device's management certificate (CN `device:<device>`), as its flightctl-agent holds.
    pub management_cert: PathBuf,
    /// The key of the management certificate.
    pub management_key: PathBuf,
}

/// Enrolls `device` in the real Flightctl and obtains its certificates through the CSR API, the
/// way a device does (`tests/env/flightctl/device-cert.sh`). `device` needs 16+ characters.
pub fn device_certs(device: &str, out: &Path) -> DeviceCerts {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/env/flightctl/device-cert.sh");
    let result = Command::new(&script)
        .arg(device)
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        result.status.success(),
        "device-cert.sh {device}: {}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    DeviceCerts {
        cert: out.join("fleetlet.crt"),
        key: out.join("fleetlet.key"),
        management_cert: out.join("management.crt"),
        management_key: out.join("device.key"),
    }
}

/// A loopback TCP relay to the real Flightctl API that the test can cut and restore. The relay
/// keeps the server certificate's name (127.0.0.1), so TLS verifies through it.
pub struct Relay {
    /// Where the relay listens.
    pub addr: std::net::SocketAddr,
    /// While true, new connections are closed at once and open ones end within 100 ms.
    pub cut: Arc<AtomicBool>,
}

/// Starts a relay to `target` (`host:port`).
pub async fn relay(target: String) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = listener.local_addr().expect("relay addr");
    let cut = Arc::new(AtomicBool::new(false));
    let flag = cut.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if flag.load(Ordering::SeqCst) {
                // Cut: close at once, as a dead server would (connection reset / EOF).
                let _ = inbound.shutdown().await;
                continue;
            }
            let target = target.clone();
            let flag = flag.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(&target).await else {
                    return;
                };
                let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                // A cut also ends open (pooled) connections.
                let watch_cut = async {
                    while !flag.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                };
                tokio::select! {
                    _ = copy => {}
                    () = watch_cut => {}
                }
            });
        }
    });
    Relay { addr, cut }
}

/// A relay in front of the API at `api_url` (`https://host:port`).
pub async fn relay_to(api_url: &str) -> Relay {
    let target = api_url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    relay(target).await
}

/// Deletes Flightctl objects on drop (also when a test fails): `(kind, name)` pairs, e.g.
/// `("devices", "dev-1")`, deleted in order.
pub struct FlightctlCleanup {
    /// An admin client.
    pub admin: FlightctlClient,
    /// What to delete.
    pub objects: Vec<(String, String)>,
    /// Delete every CertificateSigningRequest whose name starts with one of these (e.g. the
    /// `enroll-<device>-<suffix>` requests device-cert.sh makes).
    pub csr_prefixes: Vec<String>,
}

impl Drop for FlightctlCleanup {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let objects = std::mem::take(&mut self.objects);
        let prefixes = std::mem::take(&mut self.csr_prefixes);
        // Drop cannot await; a thread with its own runtime works inside or outside a runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let csrs = if prefixes.is_empty() {
                    Vec::new()
                } else {
                    admin
                        .list_all("/api/v1/certificatesigningrequests", 1000, 100)
                        .await
                        .map(|l| l.items)
                        .unwrap_or_default()
                };
                let matching = csrs.iter().filter_map(|csr| {
                    let name = csr["metadata"]["name"].as_str()?;
                    prefixes
                        .iter()
                        .any(|p| name.starts_with(p.as_str()))
                        .then(|| ("certificatesigningrequests".to_owned(), name.to_owned()))
                });
                let all: Vec<(String, String)> = objects.into_iter().chain(matching).collect();
                for (kind, name) in all {
                    let _ = admin
                        .request(Method::DELETE, &format!("/api/v1/{kind}/{name}"), None)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Runs curl against Flightctl's agent endpoint as the device (its management certificate), the
/// way its flightctl-agent talks to Flightctl. Returns the body; panics on an HTTP error.
pub fn as_device(
    env: &Env,
    certs: &DeviceCerts,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> String {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail-with-body", "--max-time", "30", "-X", method])
        .arg("--cacert")
        .arg(&env.ca_file)
        .arg("--cert")
        .arg(&certs.management_cert)
        .arg("--key")
        .arg(&certs.management_key)
        .arg(format!("{}{path}", env.agent_url));
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(b.to_string());
    }
    let out = cmd.output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{method} {path} as the device: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The device's flightctl-agent polls its rendered spec; Flightctl counts that as a heartbeat
/// (lastSeen, saved within 15 s).
pub fn device_heartbeat(env: &Env, certs: &DeviceCerts, device: &str) {
    as_device(
        env,
        certs,
        "GET",
        &format!("/api/v1/devices/{device}/rendered"),
        None,
    );
}

/// What a device's flightctl-agent may report, and Flightctl then summarizes.
#[derive(Debug, Clone, Copy)]
pub enum Report {
    /// Healthy resources, not updating: summary Online.
    Healthy,
    /// Rebooting for an update (condition Updating=True, reason Rebooting): summary Rebooting.
    Rebooting,
    /// CPU critical: summary Error.
    CpuCritical,
}

/// Reports the device's status as the device does (`PUT /api/v1/devices/{name}/status` on the
/// agent endpoint with its management certificate); Flightctl computes the summary from it.
pub async fn report_status(env: &Env, certs: &DeviceCerts, device: &str, report: Report) {
    let current = env
        .admin
        .request(Method::GET, &format!("/api/v1/devices/{device}"), None)
        .await
        .unwrap_or_else(|e| panic!("reading device {device}: {e}"));
    let current: serde_json::Value = serde_json::from_slice(&current).expect("device JSON");
    let mut status = current["status"].clone();
    let updating = match report {
        Report::Rebooting => json!({"type": "Updating", "status": "True", "reason": "Rebooting",
            "message": "rebooting into a new OS image", "lastTransitionTime": "2026-01-01T00:00:00Z"}),
        _ => json!({"type": "Updating", "status": "False", "reason": "Updated",
            "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}),
    };
    status["conditions"] = json!([updating]);
    let cpu = if matches!(report, Report::CpuCritical) {
        "Critical"
    } else {
        "Healthy"
    };
    status["resources"] = json!({"cpu": cpu, "memory": "Healthy", "disk": "Healthy"});
    let body = json!({"apiVersion": "v1beta1", "kind": "Device",
        "metadata": {"name": device}, "status": status});
    as_device(
        env,
        certs,
        "PUT",
        &format!("/api/v1/devices/{device}/status"),
        Some(&body),
    );
}

/// The hub's identity in Flightctl as an installation sets it up: the shipped namespace and RBAC
/// (ServiceAccount `fleetlet-system/fleetlet-hub-flightctl`, the hub's Flightctl-only identity)
/// and the shipped Flightctl role and binding
/// (`packaging/kubernetes/flightctl/hub-rbac.yaml`: get/list devices, devices/lastseen, fleets
/// in Flightctl's RBAC namespace) applied for real; writes a token of that ServiceAccount to
/// `dir/flightctl-hub.token` (0600). The test then runs the hub with exactly the shipped rights.
pub fn hub_token_file(dir: &Path) -> PathBuf {
    // Namespace, ServiceAccount and cluster RBAC of the hub, as shipped.
    super::shipped_rbac_kubeconfig(dir);
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/kubernetes/flightctl/hub-rbac.yaml");
    let run = super::kubectl_ok;
    run(&[
        "apply",
        "--server-side",
        "--field-manager=fleetlet-e2e",
        "-f",
        manifest.to_str().expect("utf-8 path"),
    ]);
    let token = run(&[
        "-n",
        "fleetlet-system",
        "create",
        "token",
        "fleetlet-hub-flightctl",
        "--duration=2h",
    ]);
    let file = dir.join("flightctl-hub.token");
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&file)
            .expect("token file");
        f.write_all(token.trim().as_bytes()).expect("write token");
    }
    file
}
