//! `run --desired-file PATH`: a desired pod set from a local JSON file, for running without a hub.
//!
//! Format (see docs/agent.md and examples/desired.json):
//! ```json
//! { "generation": 1,
//!   "pods": [ { "pod": { "apiVersion": "v1", "kind": "Pod", "metadata": {...}, "spec": {...} },
//!               "configMaps": [ { "name": "cm", "data": { "k": "v" } } ],
//!               "secrets": [ { "name": "s", "type": "Opaque", "stringData": { "k": "v" },
//!                              "data": { "k2": "base64" } } ] } ] }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fleetlet_proto::v1::{ConfigMapData, DesiredSnapshot, PodBundle, SecretData};
use serde::Deserialize;

/// Errors reading a desired file.
#[derive(Debug, thiserror::Error)]
pub enum DesiredFileError {
    /// Unreadable.
    #[error("desired file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not in the documented format.
    #[error("desired file {path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong (names the field).
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    generation: u64,
    #[serde(default)]
    pods: Vec<Bundle>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Bundle {
    pod: serde_json::Value,
    #[serde(default)]
    config_maps: Vec<ConfigMap>,
    #[serde(default)]
    secrets: Vec<Secret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigMap {
    name: String,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default)]
    binary_data: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Secret {
    name: String,
    /// The Secret's `type`, e.g. `kubernetes.io/dockerconfigjson` for an image pull secret.
    #[serde(default, rename = "type")]
    secret_type: String,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default)]
    string_data: BTreeMap<String, String>,
}

/// Read and convert a desired file.
pub fn load(path: &Path) -> Result<DesiredSnapshot, DesiredFileError> {
    let text = std::fs::read(path).map_err(|source| DesiredFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |message: String| DesiredFileError::Invalid {
        path: path.to_owned(),
        message,
    };
    let file: File = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    if file.generation == 0 {
        return Err(invalid("generation: must be at least 1".into()));
    }
    let mut pods = Vec::new();
    for (i, b) in file.pods.into_iter().enumerate() {
        let mut config_maps = Vec::new();
        for (j, c) in b.config_maps.into_iter().enumerate() {
            let mut binary_data = std::collections::HashMap::new();
            for (k, v) in c.binary_data {
                let bytes = base64_decode(&v).ok_or_else(|| {
                    invalid(format!(
                        "pods[{i}].configMaps[{j}].binaryData.{k}: not base64"
                    ))
                })?;
                binary_data.insert(k, bytes.into());
            }
            config_maps.push(ConfigMapData {
                name: c.name,
                data: c.data.into_iter().collect(),
                binary_data,
            });
        }
        let mut secrets = Vec::new();
        for (j, s) in b.secrets.into_iter().enumerate() {
            let mut data = std::collections::HashMap::new();
            for (k, v) in s.data {
                let bytes = base64_decode(&v).ok_or_else(|| {
                    invalid(format!("pods[{i}].secrets[{j}].data.{k}: not base64"))
                })?;
                data.insert(k, bytes.into());
            }
            for (k, v) in s.string_data {
                data.insert(k, v.into_bytes().into());
            }
            secrets.push(SecretData {
                name: s.name,
                data,
                r#type: s.secret_type,
            });
        }
        let pod_json = serde_json::to_vec(&b.pod).map_err(|e| invalid(e.to_string()))?;
        pods.push(PodBundle {
            pod_json: pod_json.into(),
            config_maps,
            secrets,
            // No cluster, no Services.
            service_env: Default::default(),
        });
    }
    Ok(DesiredSnapshot {
        generation: file.generation,
        pods,
        ..Default::default()
    })
}

/// Standard base64 (with or without padding; line breaks and spaces ignored, as in a
/// Secret's data written by hand).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    LENIENT.decode(compact).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aHVudGVyMg==").unwrap(), b"hunter2");
        assert_eq!(base64_decode("YWI").unwrap(), b"ab");
        assert!(base64_decode("a*b").is_none());
        assert_eq!(base64_decode("aHVu\ndGVy Mg==").unwrap(), b"hunter2");
    }

    #[test]
    fn example_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/desired.json");
        let snap = load(&path).unwrap();
        assert!(snap.generation >= 1);
        assert!(!snap.pods.is_empty());
        for p in &snap.pods {
            crate::pod::spec::parse_pod(&p.pod_json).unwrap();
        }
    }

    #[test]
    fn rejects_unknown_fields_with_a_clear_message() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("d.json");
        std::fs::write(
            &p,
            r#"{"generation": 1, "pods": [{"pod": {}, "configmaps": []}]}"#,
        )
        .unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("configmaps"), "{e}");
    }

    #[test]
    fn a_secret_keeps_its_type() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("d.json");
        std::fs::write(
            &p,
            r#"{"generation": 1, "pods": [{"pod": {}, "secrets": [
                {"name": "regcred", "type": "kubernetes.io/dockerconfigjson",
                 "stringData": {".dockerconfigjson": "{}"}},
                {"name": "plain", "stringData": {"k": "v"}}]}]}"#,
        )
        .unwrap();
        let snap = load(&p).unwrap();
        let secrets = &snap.pods[0].secrets;
        assert_eq!(secrets[0].r#type, "kubernetes.io/dockerconfigjson");
        assert_eq!(
            secrets[1].r#type, "",
            "no type: as an API Secret without one"
        );
    }
}
