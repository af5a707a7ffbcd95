//! examples/flightctl/fleet.yaml on the real Flightctl server: applied with the real `flightctl`
//! CLI, a device labelled into the fleet gets a rendered spec whose inline files are a valid
//! fleetlet agent configuration for that device, the hub CA and the flightctl-agent cert drop-in.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use fleetlet_agent::config::AgentConfig;
use fleetlet_hub::inventory::flightctl::{FlightctlClient, FlightctlError};
use fleetlet_test_support::{Stack, wait_for};
use http::Method;
use serde_json::Value;

fn var(stack: &Stack, name: &str) -> String {
    stack
        .var(name)
        .unwrap_or_else(|| panic!("{name} missing from the stack env: run `make env-up`"))
        .to_owned()
}

/// The example with its placeholders filled in (whole-line HUB_CA_PEM keeps its indentation).
fn fill_template(example: &str, fleet: &str, endpoint: &str, ca_pem: &str) -> String {
    let mut out = String::new();
    for line in example.lines() {
        if line.trim() == "HUB_CA_PEM" {
            let indent = &line[..line.len() - line.trim_start().len()];
            for ca_line in ca_pem.trim().lines() {
                out.push_str(indent);
                out.push_str(ca_line);
                out.push('\n');
            }
            continue;
        }
        let line = line
            .replace("\"HUB_ENDPOINT\"", &format!("\"{endpoint}\""))
            .replace("fleetlet-edge", fleet);
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn flightctl(stack: &Stack, args: &[&str]) -> String {
    let bin = PathBuf::from(var(stack, "FLIGHTCTL_BIN_DIR")).join("flightctl");
    let out = Command::new(&bin)
        .arg("--config-dir")
        .arg(var(stack, "FLIGHTCTL_CLI_CONFIG_DIR"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "flightctl {args:?} failed: {text}");
    text
}

fn inline_files(rendered: &Value) -> Vec<(String, String)> {
    let mut files = Vec::new();
    for config in rendered["spec"]["config"].as_array().into_iter().flatten() {
        for file in config["inline"].as_array().into_iter().flatten() {
            let path = file["path"].as_str().unwrap_or_default().to_owned();
            let content = file["content"].as_str().unwrap_or_default();
            let content = if file["contentEncoding"] == "base64" {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(content)
                    .expect("base64 content");
                String::from_utf8(raw).expect("utf-8 content")
            } else {
                content.to_owned()
            };
            files.push((path, content));
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_template_renders_the_agent_configuration_for_each_device() {
    let stack = Stack::shared().expect("local stack (make env-up)");
    let _logs = stack.logs_on_failure();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let run = format!("ft-{}-{nanos:x}", std::process::id());
    let fleet = format!("{run}-fleet");
    let device = format!("{run}-dev");
    let ca_pem = std::fs::read_to_string(var(stack, "FLIGHTCTL_CA_FILE")).expect("CA");
    let endpoint = "https://127.0.0.1:18443";

    let example_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/flightctl/fleet.yaml");
    let example = std::fs::read_to_string(&example_path).expect("example fleet");
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet_file = dir.path().join("fleet.yaml");
    std::fs::write(
        &fleet_file,
        fill_template(&example, &fleet, endpoint, &ca_pem),
    )
    .expect("write");
    let device_file = dir.path().join("device.yaml");
    std::fs::write(
        &device_file,
        format!(
            "apiVersion: flightctl.io/v1beta1\nkind: Device\nmetadata:\n  name: {device}\n  labels:\n    fleet: {fleet}\nspec: {{}}\n"
        ),
    )
    .expect("write");
    let applied = flightctl(stack, &["apply", "-f", fleet_file.to_str().expect("utf-8")]);
    assert!(
        applied.contains("201") || applied.contains("200"),
        "{applied}"
    );
    flightctl(
        stack,
        &["apply", "-f", device_file.to_str().expect("utf-8")],
    );

    let admin = FlightctlClient::new(
        &var(stack, "FLIGHTCTL_API_URL"),
        var(stack, "FLIGHTCTL_CA_FILE").as_ref(),
        Some(var(stack, "FLIGHTCTL_ADMIN_TOKEN_FILE").into()),
        Duration::from_secs(30),
    )
    .expect("client");
    let rendered_path = format!("/api/v1/devices/{device}/rendered");
    let rendered = wait_for(
        "the device's rendered spec",
        Duration::from_secs(60),
        || {
            let admin = admin.clone();
            let path = rendered_path.clone();
            async move {
                let body = admin.request(Method::GET, &path, None).await.ok()?;
                let value: Value = serde_json::from_slice(&body).ok()?;
                (inline_files(&value).len() == 3).then_some(value)
            }
        },
    )
    .await
    .expect("Flightctl renders the fleet template for the device");
    assert_eq!(rendered["metadata"]["owner"], format!("Fleet/{fleet}"));
    let files = inline_files(&rendered);
    let file = |p: &str| {
        files
            .iter()
            .find(|(path, _)| path == p)
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| panic!("{p} not in the rendered spec: {files:?}"))
    };

    // agent.toml: a valid fleetlet agent configuration naming this very device.
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(&agent_toml, file("/etc/fleetlet/agent.toml")).expect("write");
    let cfg = AgentConfig::load(&agent_toml, true).expect("rendered agent.toml parses");
    cfg.validate(&agent_toml)
        .expect("rendered agent.toml is valid");
    assert_eq!(cfg.device_name, device);
    let hub = cfg.hub.expect("[hub] section");
    assert_eq!(hub.endpoint, endpoint);
    assert_eq!(hub.cert_file, Path::new("/etc/fleetlet/certs/device.crt"));

    assert_eq!(file("/etc/fleetlet/hub-ca.crt").trim(), ca_pem.trim());
    let dropin = file("/etc/flightctl/certs.d/fleetlet.yaml");
    assert!(
        dropin.contains("signer: flightctl.io/device-svc-client"),
        "{dropin}"
    );
    assert!(
        dropin.contains(&format!("common-name: \"fleetlet-{device}\"")),
        "{dropin}"
    );
    assert!(
        dropin.contains("cert-path: /etc/fleetlet/certs/device.crt"),
        "{dropin}"
    );

    for (kind, name) in [("devices", &device), ("fleets", &fleet)] {
        match admin
            .request(Method::DELETE, &format!("/api/v1/{kind}/{name}"), None)
            .await
        {
            Ok(_) => {}
            Err(FlightctlError::Status { status, .. }) if status == http::StatusCode::NOT_FOUND => {
            }
            Err(e) => panic!("cleanup {kind}/{name}: {e}"),
        }
    }
}
