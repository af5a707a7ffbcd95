//! The pod field fixture (`tests/fixtures/k8s-pod-fields.json`, the source of truth of the unit
//! test `pod::field_table`) against the running kube-apiserver of the local stack
//! (`make env-up`): same Kubernetes version, same field names for every type it lists. When the
//! stack's Kubernetes is upgraded this fails until `tests/env/pod-fields-fixture.sh` regenerates
//! the fixture, and then the unit test names every new field docs/agent.md must describe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn env_file() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dev_dir =
        std::env::var("FLEETLET_DEV_DIR").unwrap_or_else(|_| "/var/tmp/fleetlet-dev".into());
    std::env::var_os("FLEETLET_ENV_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            workspace.join("target/dev/env"),
            Path::new(&dev_dir).join("env"),
        ])
        .find(|p| p.is_file())
        .expect("local stack not up: run `make env-up`")
}

fn stack_vars() -> BTreeMap<String, String> {
    std::fs::read_to_string(env_file())
        .expect("stack env file")
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches(['"', '\'']).to_owned()))
        .collect()
}

fn kubectl(vars: &BTreeMap<String, String>, args: &[&str]) -> Vec<u8> {
    let kubectl = vars
        .get("FLEETLET_KUBECTL")
        .cloned()
        .unwrap_or_else(|| "kubectl".into());
    let out = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(
            vars.get("KUBECONFIG")
                .expect("KUBECONFIG in the stack env file"),
        )
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{kubectl}: {e}"));
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn the_pod_field_fixture_matches_the_running_api_server() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/k8s-pod-fields.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let vars = stack_vars();
    let version: serde_json::Value =
        serde_json::from_slice(&kubectl(&vars, &["version", "-o", "json"])).unwrap();
    let server = version["serverVersion"]["gitVersion"].as_str().unwrap();
    assert_eq!(
        fixture["kubernetesVersion"].as_str(),
        Some(server),
        "the fixture is of another Kubernetes version: run tests/env/pod-fields-fixture.sh"
    );
    let openapi: serde_json::Value =
        serde_json::from_slice(&kubectl(&vars, &["get", "--raw", "/openapi/v3/api/v1"])).unwrap();
    let schemas = &openapi["components"]["schemas"];
    let types = fixture["types"].as_object().unwrap();
    let mut differences = Vec::new();
    for (name, fields) in types {
        let want: Vec<&str> = fields
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        let mut live: Vec<&str> = schemas[format!("io.k8s.api.core.v1.{name}")]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("the API server has no schema for {name}"))
            .keys()
            .map(String::as_str)
            .collect();
        live.sort_unstable();
        if want != live {
            differences.push(format!("{name}: fixture {want:?}, API server {live:?}"));
        }
    }
    assert!(
        differences.is_empty(),
        "run tests/env/pod-fields-fixture.sh:\n{}",
        differences.join("\n")
    );
    eprintln!(
        "fixture matches {server}: {} fields of {} types",
        types
            .values()
            .map(|f| f.as_array().unwrap().len())
            .sum::<usize>(),
        types.len()
    );
}
