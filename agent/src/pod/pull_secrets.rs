//! Image pulls with the pod's `imagePullSecrets`, the way the kubelet pulls
//! (`kuberuntime_image.go`): the credentials of the pull secrets that match the image's
//! registry are tried in turn until one pull succeeds; with none matching, the image is pulled
//! anonymously. A pull secret the bundle lacks (the Secret does not exist in the pod's
//! namespace) is not fatal: the pull goes on without it and a warning is logged.

use fleetlet_proto::v1::PodBundle;
use serde::Deserialize;
use tracing::{debug, warn};

use super::spec::PodMeta;
use crate::podman::{ContainerRuntime, PodmanError};
use crate::registry_auth::{Keyring, PullSecretError, RegistryAuth};

/// A failed pull.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// A pull secret cannot be read. Not retryable until the Secret is fixed.
    #[error(transparent)]
    Secret(#[from] PullSecretError),
    /// Every attempt failed (one per matching credential, or one anonymous attempt); the
    /// runtime's errors in order. Retried with the image pull back-off.
    #[error("{}", join(.0))]
    Failed(Vec<PodmanError>),
}

fn join(errors: &[PodmanError]) -> String {
    match errors {
        [one] => one.to_string(),
        many => format!(
            "[{}]",
            many.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[derive(Deserialize)]
struct PodRefs {
    #[serde(default)]
    spec: Option<SpecRefs>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecRefs {
    #[serde(default)]
    image_pull_secrets: Option<Vec<NameRef>>,
}

#[derive(Deserialize)]
struct NameRef {
    #[serde(default)]
    name: Option<String>,
}

/// The names in the pod's `spec.imagePullSecrets`, in order.
pub fn pull_secret_names(bundle: &PodBundle) -> Vec<String> {
    serde_json::from_slice::<PodRefs>(&bundle.pod_json)
        .ok()
        .and_then(|p| p.spec)
        .and_then(|s| s.image_pull_secrets)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.name.filter(|n| !n.is_empty()))
        .collect()
}

/// The keyring of the pod's pull secrets found in its bundle; warns about each one missing.
pub fn keyring(meta: &PodMeta, bundle: &PodBundle) -> Result<Keyring, PullSecretError> {
    let mut keyring = Keyring::default();
    for name in pull_secret_names(bundle) {
        match bundle.secrets.iter().find(|s| s.name == name) {
            Some(s) => keyring.add_secret(&s.name, &s.r#type, &s.data)?,
            None => warn!(
                pod = %meta.name,
                namespace = %meta.namespace,
                secret = %name,
                "image pull secret not found; the image is pulled without it"
            ),
        }
    }
    Ok(keyring)
}

/// Pulls `image` for the pod of `bundle` with the credentials its pull secrets hold for the
/// image's registry. Returns the fingerprint of the credential that pulled it (`None`:
/// anonymously), for [`super::pulled_images`].
pub async fn pull_image<R: ContainerRuntime>(
    rt: &R,
    meta: &PodMeta,
    image: &str,
    bundle: &PodBundle,
) -> Result<Option<String>, PullError> {
    let keyring = keyring(meta, bundle)?;
    let creds = keyring.lookup(image);
    let attempts = creds.len();
    let used = pull_in_turn(&creds, |i, auth| {
        if auth.is_some() {
            debug!(pod = %meta.name, namespace = %meta.namespace, image, attempt = i + 1, of = attempts, "pulling with a pull secret credential");
        }
        rt.pull_image(image, auth)
    })
    .await?;
    let registry = super::pulled_images::registry_of(image);
    Ok(used.map(|i| super::pulled_images::fingerprint(&registry, creds[i])))
}

/// Fingerprints of the pod's credentials for `image`'s registry (a pull secret that cannot be
/// read counts as none).
pub fn credential_fingerprints(meta: &PodMeta, image: &str, bundle: &PodBundle) -> Vec<String> {
    let registry = super::pulled_images::registry_of(image);
    keyring(meta, bundle)
        .map(|k| {
            k.lookup(image)
                .into_iter()
                .map(|a| super::pulled_images::fingerprint(&registry, a))
                .collect()
        })
        .unwrap_or_default()
}

/// The kubelet's order: anonymously when no credential matches; otherwise each credential in
/// turn until one pull succeeds, never anonymously after they all failed.
/// Returns the index of the credential that pulled (`None`: anonymous).
async fn pull_in_turn<'a, F, Fut>(
    creds: &[&'a RegistryAuth],
    mut pull: F,
) -> Result<Option<usize>, PullError>
where
    F: FnMut(usize, Option<&'a RegistryAuth>) -> Fut,
    Fut: std::future::Future<Output = Result<(), PodmanError>>,
{
    if creds.is_empty() {
        return pull(0, None)
            .await
            .map(|()| None)
            .map_err(|e| PullError::Failed(vec![e]));
    }
    let mut errors = Vec::new();
    for (i, auth) in creds.iter().enumerate() {
        match pull(i, Some(auth)).await {
            Ok(()) => return Ok(Some(i)),
            Err(e) => errors.push(e),
        }
    }
    Err(PullError::Failed(errors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlet_proto::v1::SecretData;

    fn bundle(pod: serde_json::Value, secrets: Vec<SecretData>) -> PodBundle {
        PodBundle {
            pod_json: serde_json::to_vec(&pod).unwrap().into(),
            config_maps: vec![],
            secrets,
            service_env: Default::default(),
        }
    }

    fn meta() -> PodMeta {
        PodMeta {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "p".into(),
            generation: 1,
        }
    }

    #[test]
    fn names_come_from_the_pod_and_a_missing_secret_is_skipped() {
        let b = bundle(
            serde_json::json!({"spec": {"imagePullSecrets": [{"name": "gone"}, {"name": "regcred"}, {}],
                "containers": []}}),
            vec![
                SecretData {
                    name: "regcred".into(),
                    data: [(
                        ".dockerconfigjson".to_string(),
                        bytes::Bytes::from_static(
                            br#"{"auths":{"127.0.0.1:5000":{"username":"u","password":"p"}}}"#,
                        ),
                    )]
                    .into(),
                    r#type: "kubernetes.io/dockerconfigjson".into(),
                },
                SecretData {
                    name: "volume-only".into(),
                    data: [(
                        ".dockerconfigjson".to_string(),
                        bytes::Bytes::from_static(
                            br#"{"auths":{"127.0.0.1:5000":{"username":"x","password":"y"}}}"#,
                        ),
                    )]
                    .into(),
                    r#type: "kubernetes.io/dockerconfigjson".into(),
                },
            ],
        );
        assert_eq!(pull_secret_names(&b), ["gone", "regcred"]);
        let k = keyring(&meta(), &b).unwrap();
        let found = k.lookup("127.0.0.1:5000/fleetlet/busybox:1");
        assert_eq!(
            found
                .iter()
                .map(|a| a.username.as_str())
                .collect::<Vec<_>>(),
            ["u"],
            "a Secret the pod does not name as a pull secret is not used"
        );
    }

    #[test]
    fn a_pod_without_pull_secrets_has_an_empty_keyring() {
        let b = bundle(serde_json::json!({"spec": {"containers": []}}), vec![]);
        assert!(keyring(&meta(), &b).unwrap().is_empty());
    }

    fn refused(user: &str) -> PodmanError {
        PodmanError::Pull {
            image: "r.example/i".into(),
            message: format!("{user}: unauthorized"),
        }
    }

    #[tokio::test]
    async fn credentials_are_tried_in_turn_and_never_followed_by_an_anonymous_pull() {
        let a = RegistryAuth {
            username: "old".into(),
            password: "p1".into(),
        };
        let b = RegistryAuth {
            username: "new".into(),
            password: "p2".into(),
        };
        let tried = std::cell::RefCell::new(Vec::new());
        let pull = |ok: &'static str| {
            let tried = &tried;
            move |_: usize, auth: Option<&RegistryAuth>| {
                let user = auth.map_or("anonymous".to_owned(), |a| a.username.clone());
                tried.borrow_mut().push(user.clone());
                std::future::ready(if user == ok {
                    Ok(())
                } else {
                    Err(refused(&user))
                })
            }
        };
        pull_in_turn(&[&a, &b], pull("new")).await.unwrap();
        assert_eq!(
            *tried.borrow(),
            ["old", "new"],
            "stops at the first success"
        );
        tried.borrow_mut().clear();
        let e = pull_in_turn(&[&a, &b], pull("anonymous"))
            .await
            .unwrap_err();
        assert_eq!(*tried.borrow(), ["old", "new"], "no anonymous fallback");
        assert_eq!(
            e.to_string(),
            "[pulling r.example/i: old: unauthorized, pulling r.example/i: new: unauthorized]"
        );
        tried.borrow_mut().clear();
        pull_in_turn(&[], pull("anonymous")).await.unwrap();
        assert_eq!(*tried.borrow(), ["anonymous"], "no matching credential");
    }
}
