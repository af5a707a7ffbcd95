//! A pod as a Flightctl application: one inline `compose` application per pod (one service per
//! container) and, for its ConfigMap and Secret volumes, one inline config entry of the device
//! spec whose files the compose services mount read-only.
//!
//! Flightctl's compose validator parses every inline file of a compose application as a compose
//! file (one base and one override at most), so the pod's files cannot ride inside the
//! application; they go into `spec.config` under the same fleetlet-owned name instead.
//!
//! What a compose application on Flightctl cannot express is refused with a reason and a message
//! naming the field, never silently dropped: probes, lifecycle hooks, init and ephemeral
//! containers, volumes other than ConfigMap/Secret/emptyDir, security settings compose cannot
//! carry, imagePullSecrets, downward-API values other than the pod's own names.

use std::collections::BTreeMap;

use base64::Engine as _;
use fleetlet_proto::v1::PodBundle;
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, Volume};
use serde_json::{Map, Value, json};

/// Prefix of every application and config entry fleetlet owns in a device spec; anything else
/// in the spec is never touched.
pub const OWNED_PREFIX: &str = "fleetlet-";

/// Reason of a pod refused by agentless mode.
pub const UNSUPPORTED_REASON: &str = "AgentlessUnsupported";

/// Where the pod's ConfigMap/Secret files are written on the device (by Flightctl's agent,
/// from the device spec's inline config): `<FILES_ROOT>/<application>/<volume>/<key>`.
pub const FILES_ROOT: &str = "/var/lib/fleetlet-agentless";

/// Flightctl's limit on application and config names (a DNS-1123 label).
const MAX_NAME: usize = 63;

/// One pod as Flightctl sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    /// The application's name (`fleetlet-<namespace>-<name>-<uid prefix>`).
    pub name: String,
    /// The `spec.applications[]` entry.
    pub application: Value,
    /// The `spec.config[]` entry carrying the pod's files, when it has any.
    pub config: Option<Value>,
    /// Container names in pod order (the compose services).
    pub containers: Vec<String>,
}

/// Why a pod cannot run in agentless mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

/// The application name of a pod: deterministic, a DNS-1123 label, unique per pod UID.
pub fn app_name(namespace: &str, name: &str, uid: &str) -> String {
    let mut middle: String = format!("{namespace}-{name}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let uid: String = uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    let room = MAX_NAME - OWNED_PREFIX.len() - 1 - uid.len();
    middle.truncate(room);
    let middle = middle.trim_matches('-');
    format!("{OWNED_PREFIX}{middle}-{uid}")
}

/// An image Flightctl accepts: a fully qualified reference (registry host with a dot or a port,
/// or `localhost`).
fn check_image(container: &str, image: &str) -> Result<(), Unsupported> {
    let host = image.split_once('/').map(|(h, _)| h);
    let qualified = host.is_some_and(|h| h.contains('.') || h.contains(':') || h == "localhost");
    if !qualified {
        return Err(Unsupported(format!(
            "container {container}: image {image:?} is not fully qualified; Flightctl accepts only full references (e.g. docker.io/library/{image})"
        )));
    }
    // The rest as the OCI distribution grammar has it, so that Flightctl's own check (which
    // would refuse the whole device spec, every pod of the device with it) never fails.
    let bad = |why: &str| {
        Err(Unsupported(format!(
            "container {container}: image {image:?}: {why}"
        )))
    };
    let rest = &image[host.map_or(0, |h| h.len() + 1)..];
    let (rest, digest) = match rest.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (rest, None),
    };
    let (path, tag) = match rest.rsplit_once(':') {
        Some((p, t)) => (p, Some(t)),
        None => (rest, None),
    };
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && c.bytes()
                .last()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    };
    if !path.split('/').all(component_ok) {
        return bad("repository path components must be lowercase letters, digits and . _ -");
    }
    if let Some(t) = tag {
        let first_ok = t
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !first_ok
            || t.len() > 128
            || !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return bad("invalid tag");
        }
    }
    if let Some(d) = digest {
        let ok = d.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if !ok {
            return bad("invalid digest (sha256:<64 hex>)");
        }
    }
    Ok(())
}

fn refuse(field: &str) -> Unsupported {
    Unsupported(format!(
        "{field} cannot be expressed as a Flightctl compose application (agentless mode)"
    ))
}

/// Translates one pod bundle.
pub fn translate(bundle: &PodBundle) -> Result<Translated, Unsupported> {
    let pod: Pod = serde_json::from_slice(&bundle.pod_json)
        .map_err(|e| Unsupported(format!("pod JSON: {e}")))?;
    let meta = &pod.metadata;
    let namespace = meta.namespace.clone().unwrap_or_default();
    let pod_name = meta.name.clone().unwrap_or_default();
    let uid = meta.uid.clone().unwrap_or_default();
    let name = app_name(&namespace, &pod_name, &uid);
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| Unsupported("pod has no spec".into()))?;

    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(refuse("spec.initContainers"));
    }
    if spec
        .ephemeral_containers
        .as_ref()
        .is_some_and(|c| !c.is_empty())
    {
        return Err(refuse("spec.ephemeralContainers"));
    }
    if spec
        .image_pull_secrets
        .as_ref()
        .is_some_and(|s| !s.is_empty())
    {
        return Err(Unsupported(
            "spec.imagePullSecrets: Flightctl pulls with the device's own registry credentials; agentless mode does not deliver pull secrets".into(),
        ));
    }
    if spec.host_pid == Some(true) {
        return Err(refuse("spec.hostPID"));
    }
    if spec.host_ipc == Some(true) {
        return Err(refuse("spec.hostIPC"));
    }
    if let Some(sc) = &spec.security_context {
        let v = serde_json::to_value(sc).unwrap_or(Value::Null);
        let allowed = ["runAsUser", "runAsGroup"];
        if let Some(bad) = v
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys())
            .find(|k| !allowed.contains(&k.as_str()))
        {
            return Err(refuse(&format!("spec.securityContext.{bad}")));
        }
    }
    let restart = match spec.restart_policy.as_deref().unwrap_or("Always") {
        "Always" => "always",
        "OnFailure" => "on-failure",
        "Never" => "no",
        other => return Err(Unsupported(format!("restartPolicy {other:?} is unknown"))),
    };

    // Files of the pod's ConfigMap and Secret volumes, by volume name.
    let mut files: Vec<Value> = Vec::new();
    let mut volume_mounts: BTreeMap<String, String> = BTreeMap::new();
    let mut named_volumes: Map<String, Value> = Map::new();
    for v in spec.volumes.iter().flatten() {
        volume(
            bundle,
            &name,
            v,
            &mut files,
            &mut volume_mounts,
            &mut named_volumes,
        )?;
    }

    let mut services = Map::new();
    let mut containers = Vec::new();
    for c in &spec.containers {
        let service = container(
            bundle,
            &pod,
            c,
            restart,
            spec.host_network == Some(true),
            spec.security_context.as_ref(),
            &volume_mounts,
        )?;
        containers.push(c.name.clone());
        services.insert(c.name.clone(), service);
    }
    let mut compose = json!({ "services": services });
    if !named_volumes.is_empty() {
        compose["volumes"] = Value::Object(named_volumes);
    }
    // YAML is a superset of JSON: the compose file is written as JSON, stable key order.
    let content = serde_json::to_string_pretty(&compose)
        .map_err(|e| Unsupported(format!("encoding compose file: {e}")))?;
    let application = json!({
        "name": name,
        "appType": "compose",
        "inline": [{ "path": "podman-compose.yaml", "content": content }],
    });
    let config = (!files.is_empty()).then(|| json!({ "name": name, "inline": files }));
    Ok(Translated {
        name,
        application,
        config,
        containers,
    })
}

fn volume(
    bundle: &PodBundle,
    app: &str,
    v: &Volume,
    files: &mut Vec<Value>,
    mounts: &mut BTreeMap<String, String>,
    named: &mut Map<String, Value>,
) -> Result<(), Unsupported> {
    let dir = format!("{FILES_ROOT}/{app}/{}", v.name);
    let mut add = |key_to_path: Vec<(String, String)>,
                   data: &dyn Fn(&str) -> Option<Vec<u8>>,
                   mode: Option<i32>,
                   what: &str|
     -> Result<(), Unsupported> {
        for (key, path) in key_to_path {
            let bytes = data(&key).ok_or_else(|| {
                Unsupported(format!("volume {}: {what} has no key {key:?}", v.name))
            })?;
            if path.split('/').any(|p| p == ".." || p.is_empty()) {
                return Err(Unsupported(format!(
                    "volume {}: item path {path:?} is not a relative path",
                    v.name
                )));
            }
            files.push(json!({
                "path": format!("{dir}/{path}"),
                "content": base64::engine::general_purpose::STANDARD.encode(&bytes),
                "contentEncoding": "base64",
                "mode": mode.unwrap_or(0o644),
            }));
        }
        mounts.insert(v.name.clone(), dir.clone());
        Ok(())
    };
    if let Some(cm) = &v.config_map {
        let found = bundle.config_maps.iter().find(|d| d.name == cm.name);
        let Some(found) = found else {
            if cm.optional == Some(true) {
                mounts.insert(v.name.clone(), dir.clone());
                return Ok(());
            }
            return Err(Unsupported(format!(
                "volume {}: ConfigMap {:?} not found",
                v.name, cm.name
            )));
        };
        let mut keys: Vec<String> = found
            .data
            .keys()
            .chain(found.binary_data.keys())
            .cloned()
            .collect();
        keys.sort();
        let items: Vec<(String, String)> = match &cm.items {
            Some(items) => items
                .iter()
                .map(|i| (i.key.clone(), i.path.clone()))
                .collect(),
            None => keys.into_iter().map(|k| (k.clone(), k)).collect(),
        };
        let data = |k: &str| {
            found
                .data
                .get(k)
                .map(|s| s.as_bytes().to_vec())
                .or_else(|| found.binary_data.get(k).map(|b| b.to_vec()))
        };
        return add(items, &data, cm.default_mode, "ConfigMap");
    }
    if let Some(sec) = &v.secret {
        let secret_name = sec.secret_name.clone().unwrap_or_default();
        let found = bundle.secrets.iter().find(|d| d.name == secret_name);
        let Some(found) = found else {
            if sec.optional == Some(true) {
                mounts.insert(v.name.clone(), dir.clone());
                return Ok(());
            }
            return Err(Unsupported(format!(
                "volume {}: Secret {secret_name:?} not found",
                v.name
            )));
        };
        let items: Vec<(String, String)> = match &sec.items {
            Some(items) => items
                .iter()
                .map(|i| (i.key.clone(), i.path.clone()))
                .collect(),
            None => found.data.keys().map(|k| (k.clone(), k.clone())).collect(),
        };
        let data = |k: &str| found.data.get(k).map(|b| b.to_vec());
        return add(items, &data, sec.default_mode.or(Some(0o600)), "Secret");
    }
    if let Some(ed) = &v.empty_dir {
        if ed.medium.as_deref() == Some("Memory") {
            return Err(refuse(&format!(
                "volume {}: emptyDir medium Memory",
                v.name
            )));
        }
        // A compose named volume, private to this application (compose prefixes the project).
        named.insert(v.name.clone(), json!({}));
        mounts.insert(v.name.clone(), format!("named:{}", v.name));
        return Ok(());
    }
    Err(refuse(&format!(
        "volume {} (only configMap, secret and emptyDir volumes)",
        v.name
    )))
}

fn container(
    bundle: &PodBundle,
    pod: &Pod,
    c: &Container,
    restart: &str,
    host_network: bool,
    pod_sc: Option<&k8s_openapi::api::core::v1::PodSecurityContext>,
    mounts: &BTreeMap<String, String>,
) -> Result<Value, Unsupported> {
    let field = |f: &str| format!("container {}: {f}", c.name);
    let image = c
        .image
        .clone()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| Unsupported(field("no image")))?;
    check_image(&c.name, &image)?;
    if c.liveness_probe.is_some() {
        return Err(refuse(&field("livenessProbe")));
    }
    if c.readiness_probe.is_some() {
        return Err(refuse(&field("readinessProbe")));
    }
    if c.startup_probe.is_some() {
        return Err(refuse(&field("startupProbe")));
    }
    if c.lifecycle.is_some() {
        return Err(refuse(&field("lifecycle hooks")));
    }
    if c.volume_devices.as_ref().is_some_and(|d| !d.is_empty()) {
        return Err(refuse(&field("volumeDevices")));
    }
    let mut s = Map::new();
    s.insert("image".into(), json!(image));
    s.insert("restart".into(), json!(restart));
    if let Some(cmd) = &c.command {
        s.insert("entrypoint".into(), json!(cmd));
    }
    if let Some(args) = &c.args {
        s.insert("command".into(), json!(args));
    }
    if let Some(wd) = &c.working_dir {
        s.insert("working_dir".into(), json!(wd));
    }
    if c.tty == Some(true) {
        s.insert("tty".into(), json!(true));
    }
    if c.stdin == Some(true) {
        s.insert("stdin_open".into(), json!(true));
    }
    if host_network {
        s.insert("network_mode".into(), json!("host"));
    }
    let env = environment(bundle, pod, c)?;
    if !env.is_empty() {
        s.insert("environment".into(), Value::Object(env));
    }
    let mut ports = Vec::new();
    for p in c.ports.iter().flatten() {
        let proto = p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase();
        if proto == "sctp" {
            return Err(refuse(&field("SCTP port")));
        }
        if let Some(host) = p.host_port {
            let ip = p
                .host_ip
                .as_deref()
                .map(|ip| format!("{ip}:"))
                .unwrap_or_default();
            ports.push(json!(format!("{ip}{host}:{}/{proto}", p.container_port)));
        } else if host_network {
            // With the host's network the container port is the host port.
        }
        // A containerPort without hostPort is informational on a kubelet too: not published.
    }
    if !ports.is_empty() {
        s.insert("ports".into(), json!(ports));
    }
    if let Some(limits) = c.resources.as_ref().and_then(|r| r.limits.as_ref()) {
        for (k, q) in limits {
            match k.as_str() {
                "cpu" => {
                    let milli = fleetlet_resources::quantity::cpu_millis(&q.0)
                        .map_err(|e| Unsupported(field(&format!("cpu limit {:?}: {e}", q.0))))?;
                    let cpus = format!("{}.{:03}", milli / 1000, milli % 1000);
                    s.insert("cpus".into(), json!(cpus.trim_end_matches('0')));
                }
                "memory" => {
                    let bytes = fleetlet_resources::quantity::units(&q.0)
                        .map_err(|e| Unsupported(field(&format!("memory limit {:?}: {e}", q.0))))?;
                    s.insert("mem_limit".into(), json!(format!("{bytes}b")));
                }
                "ephemeral-storage" => {}
                other => {
                    return Err(refuse(&field(&format!("resource limit {other}"))));
                }
            }
        }
    }
    let mut user = pod_sc
        .and_then(|sc| sc.run_as_user)
        .map(|u| (u, pod_sc.and_then(|sc| sc.run_as_group)));
    if let Some(sc) = &c.security_context {
        let v = serde_json::to_value(sc).unwrap_or(Value::Null);
        for (k, val) in v.as_object().into_iter().flatten() {
            match k.as_str() {
                "runAsUser" | "runAsGroup" => {}
                "readOnlyRootFilesystem" => {
                    s.insert("read_only".into(), val.clone());
                }
                "allowPrivilegeEscalation" if val == &json!(false) => {
                    s.insert("security_opt".into(), json!(["no-new-privileges"]));
                }
                "privileged" if val == &json!(false) => {}
                "capabilities" => {
                    if let Some(add) = val.get("add").filter(|a| !a.is_null()) {
                        s.insert("cap_add".into(), add.clone());
                    }
                    if let Some(drop) = val.get("drop").filter(|a| !a.is_null()) {
                        s.insert("cap_drop".into(), drop.clone());
                    }
                }
                other => return Err(refuse(&field(&format!("securityContext.{other}")))),
            }
        }
        if let Some(u) = sc.run_as_user {
            user = Some((u, sc.run_as_group.or(user.and_then(|(_, g)| g))));
        }
    }
    if let Some((u, g)) = user {
        let spec = match g {
            Some(g) => format!("{u}:{g}"),
            None => u.to_string(),
        };
        s.insert("user".into(), json!(spec));
    }
    let mut vols = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        if m.sub_path.is_some() || m.sub_path_expr.is_some() {
            return Err(refuse(&field(&format!("volumeMount {} subPath", m.name))));
        }
        let Some(src) = mounts.get(&m.name) else {
            return Err(Unsupported(field(&format!(
                "volumeMount {}: no such volume",
                m.name
            ))));
        };
        let (src, ro) = match src.strip_prefix("named:") {
            Some(named) => (named.to_owned(), m.read_only == Some(true)),
            // ConfigMap and Secret files are read-only, as on a kubelet.
            None => (src.clone(), true),
        };
        vols.push(json!(format!(
            "{src}:{}{}",
            m.mount_path,
            if ro { ":ro" } else { "" }
        )));
    }
    if !vols.is_empty() {
        s.insert("volumes".into(), json!(vols));
    }
    Ok(Value::Object(s))
}

/// The container's environment with ConfigMap/Secret references and the pod's own names
/// resolved (what the kubelet would set), later entries overriding earlier ones.
fn environment(
    bundle: &PodBundle,
    pod: &Pod,
    c: &Container,
) -> Result<Map<String, Value>, Unsupported> {
    let mut env = Map::new();
    let field = |f: String| format!("container {}: {f}", c.name);
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match bundle.config_maps.iter().find(|d| d.name == r.name) {
                Some(d) => {
                    for (k, v) in &d.data {
                        env.insert(format!("{prefix}{k}"), json!(v));
                    }
                }
                None if r.optional == Some(true) => {}
                None => {
                    return Err(Unsupported(field(format!(
                        "envFrom ConfigMap {:?} not found",
                        r.name
                    ))));
                }
            }
        }
        if let Some(r) = &from.secret_ref {
            match bundle.secrets.iter().find(|d| d.name == r.name) {
                Some(d) => {
                    for (k, v) in &d.data {
                        env.insert(format!("{prefix}{k}"), json!(String::from_utf8_lossy(v)));
                    }
                }
                None if r.optional == Some(true) => {}
                None => {
                    return Err(Unsupported(field(format!(
                        "envFrom Secret {:?} not found",
                        r.name
                    ))));
                }
            }
        }
    }
    for e in c.env.iter().flatten() {
        if let Some(v) = env_value(bundle, pod, e).map_err(|m| Unsupported(field(m)))? {
            env.insert(e.name.clone(), json!(v));
        }
    }
    Ok(env)
}

fn env_value(bundle: &PodBundle, pod: &Pod, e: &EnvVar) -> Result<Option<String>, String> {
    let Some(from) = &e.value_from else {
        return Ok(Some(e.value.clone().unwrap_or_default()));
    };
    if let Some(k) = &from.config_map_key_ref {
        let v = bundle
            .config_maps
            .iter()
            .find(|d| d.name == k.name)
            .and_then(|d| d.data.get(&k.key).cloned());
        return match v {
            Some(v) => Ok(Some(v)),
            None if k.optional == Some(true) => Ok(None),
            None => Err(format!(
                "env {}: key {:?} of ConfigMap {:?} not found",
                e.name, k.key, k.name
            )),
        };
    }
    if let Some(k) = &from.secret_key_ref {
        let v = bundle
            .secrets
            .iter()
            .find(|d| d.name == k.name)
            .and_then(|d| d.data.get(&k.key))
            .map(|b| String::from_utf8_lossy(b).into_owned());
        return match v {
            Some(v) => Ok(Some(v)),
            None if k.optional == Some(true) => Ok(None),
            None => Err(format!(
                "env {}: key {:?} of Secret {:?} not found",
                e.name, k.key, k.name
            )),
        };
    }
    if let Some(f) = &from.field_ref {
        let m = &pod.metadata;
        let v = match f.field_path.as_str() {
            "metadata.name" => m.name.clone(),
            "metadata.namespace" => m.namespace.clone(),
            "metadata.uid" => m.uid.clone(),
            "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            "spec.serviceAccountName" => pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone()),
            other => {
                return Err(format!(
                    "env {}: fieldRef {other} cannot be resolved in agentless mode (only metadata.name, metadata.namespace, metadata.uid, spec.nodeName, spec.serviceAccountName)",
                    e.name
                ));
            }
        };
        return Ok(Some(v.unwrap_or_default()));
    }
    Err(format!(
        "env {}: resourceFieldRef cannot be resolved in agentless mode",
        e.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlet_proto::v1::{ConfigMapData, SecretData};

    fn bundle(pod: Value) -> PodBundle {
        PodBundle {
            pod_json: serde_json::to_vec(&pod).expect("json").into(),
            config_maps: vec![ConfigMapData {
                name: "cfg".into(),
                data: [("greeting".to_string(), "hello".to_string())].into(),
                binary_data: Default::default(),
            }],
            secrets: vec![SecretData {
                name: "sec".into(),
                data: [("token".to_string(), bytes::Bytes::from_static(b"s3cret"))].into(),
                r#type: "Opaque".into(),
            }],
            service_env: Default::default(),
        }
    }

    fn pod(spec: Value) -> Value {
        json!({"metadata": {"name": "web.1", "namespace": "Demo", "uid": "0a1b2c3d-4e5f-6789"}, "spec": spec})
    }

    fn compose(t: &Translated) -> Value {
        let text = t.application["inline"][0]["content"]
            .as_str()
            .expect("content");
        serde_json::from_str(text).expect("compose JSON")
    }

    #[test]
    fn names_are_dns_labels_and_deterministic() {
        let n = app_name("demo", "web.1", "0a1b2c3d-4e5f");
        assert_eq!(n, "fleetlet-demo-web-1-0a1b2c3d");
        let long = app_name(&"n".repeat(63), &"p".repeat(253), "ffffffff-0000");
        assert!(long.len() <= 63, "{long}");
        assert!(long.ends_with("-ffffffff"));
        assert!(long.starts_with(OWNED_PREFIX));
        assert_eq!(
            long,
            app_name(&"n".repeat(63), &"p".repeat(253), "ffffffff-0000")
        );
    }

    #[test]
    fn a_full_pod_becomes_a_compose_application() {
        let b = bundle(pod(json!({
            "restartPolicy": "OnFailure",
            "volumes": [
                {"name": "conf", "configMap": {"name": "cfg"}},
                {"name": "creds", "secret": {"secretName": "sec"}},
                {"name": "scratch", "emptyDir": {}}
            ],
            "containers": [{
                "name": "app",
                "image": "docker.io/library/busybox:1.36",
                "command": ["sh", "-c"],
                "args": ["echo $GREETING; sleep 3600"],
                "env": [
                    {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "token"}}},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "PLAIN", "value": "x"}
                ],
                "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
                "ports": [{"containerPort": 80, "hostPort": 8080}, {"containerPort": 9090}],
                "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}},
                "volumeMounts": [
                    {"name": "conf", "mountPath": "/etc/app"},
                    {"name": "creds", "mountPath": "/run/creds"},
                    {"name": "scratch", "mountPath": "/tmp/scratch"}
                ],
                "securityContext": {"runAsUser": 1000, "readOnlyRootFilesystem": true}
            }]
        })));
        let t = translate(&b).expect("translates");
        assert_eq!(t.name, "fleetlet-demo-web-1-0a1b2c3d");
        assert_eq!(t.application["appType"], "compose");
        assert_eq!(t.application["inline"][0]["path"], "podman-compose.yaml");
        let c = compose(&t);
        let app = &c["services"]["app"];
        assert_eq!(app["image"], "docker.io/library/busybox:1.36");
        assert_eq!(app["entrypoint"], json!(["sh", "-c"]));
        assert_eq!(app["command"], json!(["echo $GREETING; sleep 3600"]));
        assert_eq!(app["restart"], "on-failure");
        assert_eq!(app["environment"]["GREETING"], "hello");
        assert_eq!(app["environment"]["TOKEN"], "s3cret");
        assert_eq!(app["environment"]["POD"], "web.1");
        assert_eq!(app["environment"]["PLAIN"], "x");
        assert_eq!(app["environment"]["CFG_greeting"], "hello");
        assert_eq!(app["ports"], json!(["8080:80/tcp"]));
        assert_eq!(app["cpus"], "0.5");
        assert_eq!(app["mem_limit"], format!("{}b", 64 * 1024 * 1024));
        assert_eq!(app["user"], "1000");
        assert_eq!(app["read_only"], true);
        let dir = format!("{FILES_ROOT}/{}", t.name);
        assert_eq!(
            app["volumes"],
            json!([
                format!("{dir}/conf:/etc/app:ro"),
                format!("{dir}/creds:/run/creds:ro"),
                "scratch:/tmp/scratch"
            ])
        );
        assert_eq!(c["volumes"], json!({"scratch": {}}));
        let config = t.config.expect("files");
        assert_eq!(config["name"], t.name);
        let files = config["inline"].as_array().expect("files");
        assert_eq!(files.len(), 2);
        assert_eq!(files[0]["path"], format!("{dir}/conf/greeting"));
        assert_eq!(files[0]["content"], "aGVsbG8=");
        assert_eq!(files[0]["mode"], 0o644);
        assert_eq!(files[1]["path"], format!("{dir}/creds/token"));
        assert_eq!(files[1]["mode"], 0o600);
        assert_eq!(t.containers, vec!["app".to_string()]);
    }

    #[test]
    fn what_compose_cannot_express_is_refused_by_field() {
        let base = json!({"name": "app", "image": "docker.io/library/busybox:1.36"});
        let with = |k: &str, v: Value| {
            let mut c = base.clone();
            c[k] = v;
            pod(json!({"containers": [c]}))
        };
        let cases = [
            (
                with("livenessProbe", json!({"exec": {"command": ["true"]}})),
                "livenessProbe",
            ),
            (
                with("readinessProbe", json!({"exec": {"command": ["true"]}})),
                "readinessProbe",
            ),
            (
                with("startupProbe", json!({"exec": {"command": ["true"]}})),
                "startupProbe",
            ),
            (
                with(
                    "lifecycle",
                    json!({"preStop": {"exec": {"command": ["true"]}}}),
                ),
                "lifecycle",
            ),
            (
                with("securityContext", json!({"privileged": true})),
                "securityContext.privileged",
            ),
            (with("image", json!("busybox")), "not fully qualified"),
            (
                with("image", json!("docker.io/library/BusyBox:1")),
                "lowercase",
            ),
            (
                with("image", json!("docker.io/library/busybox:-1")),
                "invalid tag",
            ),
            (
                with("image", json!("docker.io/library/busybox@sha256:xyz")),
                "invalid digest",
            ),
            (
                with(
                    "env",
                    json!([{"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]),
                ),
                "fieldRef status.podIP",
            ),
            (
                pod(json!({"initContainers": [base.clone()], "containers": [base.clone()]})),
                "initContainers",
            ),
            (
                pod(
                    json!({"volumes": [{"name": "h", "hostPath": {"path": "/"}}], "containers": [base.clone()]}),
                ),
                "volume h",
            ),
            (
                pod(json!({"imagePullSecrets": [{"name": "sec"}], "containers": [base.clone()]})),
                "imagePullSecrets",
            ),
            (
                pod(
                    json!({"securityContext": {"sysctls": [{"name": "a", "value": "b"}]}, "containers": [base.clone()]}),
                ),
                "securityContext.sysctls",
            ),
        ];
        for (p, needle) in cases {
            let err = translate(&bundle(p)).expect_err(needle);
            assert!(err.0.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn good_image_references_pass() {
        for image in [
            "docker.io/library/busybox:1.36",
            "localhost/fleetlet-test/busybox:1",
            "quay.io/org/app",
            "registry.example.com:5000/a/b-c_d.e:v1.2_3",
            "docker.io/library/busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(check_image("c", image).is_ok(), "{image}");
        }
    }

    #[test]
    fn missing_references_are_refused_unless_optional() {
        let p = pod(
            json!({"containers": [{"name": "a", "image": "localhost/x:1",
            "env": [{"name": "V", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k"}}}]}]}),
        );
        assert!(
            translate(&bundle(p))
                .expect_err("missing")
                .0
                .contains("nope")
        );
        let p = pod(
            json!({"containers": [{"name": "a", "image": "localhost/x:1",
            "env": [{"name": "V", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": true}}}]}]}),
        );
        let t = translate(&bundle(p)).expect("optional");
        assert!(compose(&t)["services"]["a"].get("environment").is_none());
    }
}
