//! PodBundles: what a device gets for one pod — the Pod JSON without server bookkeeping, plus the
//! data of every ConfigMap and Secret the pod references, so the device never asks the API.

use std::collections::{BTreeMap, BTreeSet};

use fleetlet_proto::v1::{ConfigMapData, PodBundle, SecretData};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use serde_json::Value;

/// Names of the ConfigMaps and Secrets a pod references (in its own namespace).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct References {
    /// ConfigMap names.
    pub config_maps: BTreeSet<String>,
    /// Secret names.
    pub secrets: BTreeSet<String>,
}

/// Every ConfigMap and Secret referenced by volumes (including projected ones), env and envFrom
/// of all containers, init containers and ephemeral containers, and the pod's
/// `imagePullSecrets` (the device pulls with them, as the kubelet does).
pub fn references(pod: &Pod) -> References {
    let mut r = References::default();
    let Some(spec) = &pod.spec else { return r };
    for s in spec.image_pull_secrets.iter().flatten() {
        r.secrets.insert(s.name.clone());
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(name) = v.config_map.as_ref().map(|c| c.name.clone()) {
            r.config_maps.insert(name);
        }
        if let Some(name) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            r.secrets.insert(name);
        }
        // The ServiceAccount token volume never reaches the device (see `pod_json`), so its
        // kube-root-ca.crt is neither sent nor kept.
        if v.projected.is_some()
            && serde_json::to_value(v).is_ok_and(|j| is_service_account_volume(&j))
        {
            continue;
        }
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(c) = &src.config_map {
                r.config_maps.insert(c.name.clone());
            }
            if let Some(s) = &src.secret {
                r.secrets.insert(s.name.clone());
            }
        }
    }
    let mut add_container = |c: &Container| {
        for e in c.env.iter().flatten() {
            if let Some(from) = &e.value_from {
                if let Some(k) = &from.config_map_key_ref {
                    r.config_maps.insert(k.name.clone());
                }
                if let Some(k) = &from.secret_key_ref {
                    r.secrets.insert(k.name.clone());
                }
            }
        }
        for f in c.env_from.iter().flatten() {
            if let Some(c) = &f.config_map_ref {
                r.config_maps.insert(c.name.clone());
            }
            if let Some(s) = &f.secret_ref {
                r.secrets.insert(s.name.clone());
            }
        }
    };
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        add_container(c);
    }
    // An ephemeral container (`kubectl debug`) reads ConfigMaps and Secrets as a container does.
    for e in spec.ephemeral_containers.iter().flatten() {
        let c = Container {
            name: e.name.clone(),
            env: e.env.clone(),
            env_from: e.env_from.clone(),
            ..Default::default()
        };
        add_container(&c);
    }
    r.config_maps.retain(|n| !n.is_empty());
    r.secrets.retain(|n| !n.is_empty());
    r
}

/// True for the projected volume the ServiceAccount admission plugin adds to every pod
/// (`kube-api-access-*`: a token, the cluster CA and the namespace). Devices never talk to the
/// Kubernetes API, so this volume is meaningless there.
fn is_service_account_volume(v: &Value) -> bool {
    let named = v
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| n.starts_with("kube-api-access-"));
    let sources = v
        .get("projected")
        .and_then(|p| p.get("sources"))
        .and_then(Value::as_array);
    named
        && sources.is_some_and(|s| {
            s.iter().any(|x| x.get("serviceAccountToken").is_some())
                && s.iter().all(|x| {
                    x.get("serviceAccountToken").is_some()
                        || x.get("downwardAPI").is_some()
                        || x.get("configMap")
                            .and_then(|c| c.get("name"))
                            .and_then(Value::as_str)
                            == Some("kube-root-ca.crt")
                })
        })
}

/// Removes the ServiceAccount token volume and its mounts from a pod's JSON.
fn strip_service_account_volume(v: &mut Value) {
    let Some(spec) = v.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let mut removed = Vec::new();
    if let Some(vols) = spec.get_mut("volumes").and_then(Value::as_array_mut) {
        vols.retain(|vol| {
            let drop = is_service_account_volume(vol);
            if drop && let Some(n) = vol.get("name").and_then(Value::as_str) {
                removed.push(n.to_string());
            }
            !drop
        });
    }
    if removed.is_empty() {
        return;
    }
    for key in ["containers", "initContainers", "ephemeralContainers"] {
        for c in spec
            .get_mut(key)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(mounts) = c.get_mut("volumeMounts").and_then(Value::as_array_mut) {
                mounts.retain(|m| {
                    !m.get("name")
                        .and_then(Value::as_str)
                        .is_some_and(|n| removed.iter().any(|r| r == n))
                });
            }
        }
    }
}

/// The pod as the device gets it: no managedFields, resourceVersion or status, so that the
/// hub's own status writes do not produce a new snapshot; and without the ServiceAccount token
/// volume, which would give a device an API credential it must not need.
pub fn pod_json(pod: &Pod) -> Vec<u8> {
    let mut v = match serde_json::to_value(pod) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    strip_service_account_volume(&mut v);
    if let Some(obj) = v.as_object_mut() {
        obj.remove("status");
        obj.insert("apiVersion".into(), Value::String("v1".into()));
        obj.insert("kind".into(), Value::String("Pod".into()));
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
            meta.remove("resourceVersion");
        }
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Builds a pod's bundle from the cached ConfigMaps and Secrets of its namespace. A referenced
/// object that does not exist is left out; the device reports the pod as the kubelet would
/// (CreateContainerConfigError) unless the reference is optional. A missing image pull secret
/// is not fatal either: the device pulls without it, as the kubelet does.
pub fn build(
    pod: &Pod,
    config_maps: &BTreeMap<(String, String), ConfigMap>,
    secrets: &BTreeMap<(String, String), Secret>,
) -> PodBundle {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let refs = references(pod);
    let config_maps = refs
        .config_maps
        .iter()
        .filter_map(|name| config_maps.get(&(ns.clone(), name.clone())))
        .map(|cm| ConfigMapData {
            name: cm.metadata.name.clone().unwrap_or_default(),
            data: cm.data.clone().unwrap_or_default().into_iter().collect(),
            binary_data: cm
                .binary_data
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, bytes::Bytes::from(v.0)))
                .collect(),
        })
        .collect();
    let secrets = refs
        .secrets
        .iter()
        .filter_map(|name| secrets.get(&(ns.clone(), name.clone())))
        .map(|s| {
            let mut data: std::collections::HashMap<String, bytes::Bytes> = s
                .data
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, bytes::Bytes::from(v.0)))
                .collect();
            // stringData is write-only in the API, but a cached object may still carry it.
            for (k, v) in s.string_data.clone().unwrap_or_default() {
                data.entry(k)
                    .or_insert_with(|| bytes::Bytes::from(v.into_bytes()));
            }
            SecretData {
                name: s.metadata.name.clone().unwrap_or_default(),
                data,
                r#type: s.type_.clone().unwrap_or_default(),
            }
        })
        .collect();
    PodBundle {
        pod_json: pod_json(pod).into(),
        config_maps,
        secrets,
        // Set by the relay, which knows the Services (see `super::services`).
        service_env: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "p", "namespace": "ns", "uid": "u1", "resourceVersion": "42",
                "managedFields": [{"manager": "kubectl"}]
            },
            "spec": {
                "nodeName": "dev-1",
                "volumes": [
                    {"name": "a", "configMap": {"name": "cm-vol"}},
                    {"name": "b", "secret": {"secretName": "sec-vol"}},
                    {"name": "c", "projected": {"sources": [{"configMap": {"name": "cm-proj"}}, {"secret": {"name": "sec-proj"}}]}},
                    {"name": "d", "emptyDir": {}}
                ],
                "initContainers": [{"name": "i", "image": "x", "envFrom": [{"secretRef": {"name": "sec-init"}}]}],
                "containers": [{
                    "name": "c", "image": "x",
                    "env": [
                        {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm-env", "key": "k"}}},
                        {"name": "B", "valueFrom": {"secretKeyRef": {"name": "sec-env", "key": "k"}}},
                        {"name": "C", "value": "plain"}
                    ],
                    "envFrom": [{"configMapRef": {"name": "cm-from"}}]
                }]
            },
            "status": {"phase": "Running"}
        }))
        .expect("pod")
    }

    #[test]
    fn references_cover_volumes_env_and_env_from() {
        let r = references(&pod());
        let cms: Vec<_> = r.config_maps.iter().map(String::as_str).collect();
        let secs: Vec<_> = r.secrets.iter().map(String::as_str).collect();
        assert_eq!(cms, ["cm-env", "cm-from", "cm-proj", "cm-vol"]);
        assert_eq!(secs, ["sec-env", "sec-init", "sec-proj", "sec-vol"]);
    }

    #[test]
    fn ephemeral_containers_references_are_relayed_and_their_token_mounts_stripped() {
        let mut p = pod();
        let spec = p.spec.as_mut().expect("spec");
        spec.volumes.get_or_insert_with(Vec::new).push(
            serde_json::from_value(serde_json::json!({
                "name": "kube-api-access-q1",
                "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}
            }))
            .expect("volume"),
        );
        spec.ephemeral_containers = Some(vec![
            serde_json::from_value(serde_json::json!({
                "name": "debugger", "image": "busybox", "targetContainerName": "c",
                "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "sec-debug", "key": "k"}}}],
                "envFrom": [{"configMapRef": {"name": "cm-debug"}}],
                "volumeMounts": [
                    {"name": "kube-api-access-q1", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
                    {"name": "a", "mountPath": "/a"}
                ]
            }))
            .expect("ephemeral container"),
        ]);
        let r = references(&p);
        assert!(r.secrets.contains("sec-debug"), "{r:?}");
        assert!(r.config_maps.contains("cm-debug"), "{r:?}");
        let v: Value = serde_json::from_slice(&pod_json(&p)).expect("json");
        let e = &v["spec"]["ephemeralContainers"][0];
        assert_eq!(e["targetContainerName"], "c");
        assert_eq!(
            e["volumeMounts"],
            serde_json::json!([{"name": "a", "mountPath": "/a"}])
        );
    }

    #[test]
    fn the_service_account_token_volume_and_its_mounts_are_not_relayed() {
        let mut p = pod();
        let spec = p.spec.as_mut().expect("spec");
        let sa: k8s_openapi::api::core::v1::Volume = serde_json::from_value(serde_json::json!({
            "name": "kube-api-access-x7k2p",
            "projected": {"sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}
            ]}
        }))
        .expect("volume");
        spec.volumes.get_or_insert_with(Vec::new).push(sa);
        spec.containers[0].volume_mounts = Some(vec![
            serde_json::from_value(serde_json::json!({"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})).expect("mount"),
            serde_json::from_value(serde_json::json!({"name": "a", "mountPath": "/a"})).expect("mount"),
        ]);
        let v: Value = serde_json::from_slice(&pod_json(&p)).expect("json");
        let vols: Vec<&str> = v["spec"]["volumes"]
            .as_array()
            .expect("vols")
            .iter()
            .filter_map(|x| x["name"].as_str())
            .collect();
        assert_eq!(
            vols,
            ["a", "b", "c", "d"],
            "user volumes stay, the token volume goes"
        );
        let mounts: Vec<&str> = v["spec"]["containers"][0]["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .filter_map(|x| x["name"].as_str())
            .collect();
        assert_eq!(mounts, ["a"]);
        assert!(
            !references(&p).config_maps.contains("kube-root-ca.crt"),
            "nor is its CA ConfigMap referenced (sent or cached)"
        );
    }

    #[test]
    fn pod_json_drops_server_bookkeeping() {
        let v: Value = serde_json::from_slice(&pod_json(&pod())).expect("json");
        assert!(v.get("status").is_none());
        assert!(v["metadata"].get("managedFields").is_none());
        assert!(v["metadata"].get("resourceVersion").is_none());
        assert_eq!(v["metadata"]["uid"], "u1");
        assert_eq!(v["kind"], "Pod");
        assert_eq!(v["spec"]["nodeName"], "dev-1");
    }

    #[test]
    fn bundle_carries_data_of_existing_references_in_the_pods_namespace() {
        let mut cms = BTreeMap::new();
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cm-vol", "namespace": "ns"}, "data": {"k": "v"}
        }))
        .expect("cm");
        cms.insert(("ns".to_string(), "cm-vol".to_string()), cm.clone());
        let mut other = cm;
        other.metadata.namespace = Some("other".into());
        other.metadata.name = Some("cm-env".into());
        cms.insert(("other".to_string(), "cm-env".to_string()), other);
        let mut secs = BTreeMap::new();
        secs.insert(
            ("ns".to_string(), "sec-env".to_string()),
            Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some("sec-env".into()),
                    ..Default::default()
                },
                data: Some(
                    [("k".to_string(), ByteString(b"s3cr3t".to_vec()))]
                        .into_iter()
                        .collect(),
                ),
                ..Default::default()
            },
        );
        let b = build(&pod(), &cms, &secs);
        assert_eq!(b.config_maps.len(), 1, "cm-env lives in another namespace");
        assert_eq!(
            b.config_maps[0].data.get("k").map(String::as_str),
            Some("v")
        );
        assert_eq!(b.secrets.len(), 1);
        assert_eq!(
            b.secrets[0].data.get("k").map(|b| b.as_ref()),
            Some(&b"s3cr3t"[..])
        );
    }

    #[test]
    fn image_pull_secrets_land_in_the_bundle_with_their_type_and_a_missing_one_is_left_out() {
        let mut p = pod();
        p.spec.as_mut().expect("spec").image_pull_secrets = Some(vec![
            k8s_openapi::api::core::v1::LocalObjectReference {
                name: "regcred".into(),
            },
            k8s_openapi::api::core::v1::LocalObjectReference {
                name: "not-there".into(),
            },
        ]);
        assert!(references(&p).secrets.contains("regcred"));
        assert!(
            references(&p).secrets.contains("not-there"),
            "referenced, so the relay fetches it if it appears later"
        );
        let config = br#"{"auths":{"registry.example:5000":{"auth":"dTpw"}}}"#;
        let mut secs = BTreeMap::new();
        secs.insert(
            ("ns".to_string(), "regcred".to_string()),
            Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some("regcred".into()),
                    namespace: Some("ns".into()),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/dockerconfigjson".into()),
                data: Some(
                    [(".dockerconfigjson".to_string(), ByteString(config.to_vec()))]
                        .into_iter()
                        .collect(),
                ),
                ..Default::default()
            },
        );
        let b = build(&p, &BTreeMap::new(), &secs);
        assert_eq!(b.secrets.len(), 1, "the missing pull secret is not fatal");
        let s = &b.secrets[0];
        assert_eq!(s.name, "regcred");
        assert_eq!(s.r#type, "kubernetes.io/dockerconfigjson");
        assert_eq!(
            s.data.get(".dockerconfigjson").map(|b| b.as_ref()),
            Some(&config[..])
        );
    }
}
