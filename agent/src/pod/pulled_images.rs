//! Which credentials pulled each image, so a pod cannot run a private image it has no
//! credentials for just because another pod pulled it onto the device: the kubelet's
//! "ensure secret pulled images" check (KEP-2535, on by default since 1.35, with its default
//! policy `NeverVerifyPreloadedImages`).
//!
//! The record (`<state_dir>/pulled-images.json`, 0600, written atomically) maps an image id to
//! whether it was pulled anonymously and the SHA-256 of each credential that pulled it. An image
//! with no record was there before the agent pulled anything (preloaded) and serves every pod.
//! An image pulled with credentials serves a pod with `IfNotPresent` only when one of the pod's
//! matching credentials pulled it; otherwise the agent pulls again with the pod's credentials (a
//! failure is the pod's `ErrImagePull`), and with `Never` the pod waits with
//! `ErrImageNeverPull`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::registry_auth::RegistryAuth;

const FILE: &str = "pulled-images.json";

/// How one image came onto the device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRecord {
    /// Pulled at least once without credentials: any pod may use it.
    #[serde(default)]
    pub anonymous: bool,
    /// SHA-256 (hex) of each `registry/user:password` that pulled it.
    #[serde(default)]
    pub credentials: BTreeSet<String>,
}

/// The device's pull records, kept in memory and on disk.
#[derive(Debug)]
pub struct PulledImages {
    path: PathBuf,
    records: Mutex<BTreeMap<String, PullRecord>>,
}

/// What the check says about an image that is present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The pod may use it.
    Allowed,
    /// It was pulled with credentials the pod does not hold: pull again with the pod's.
    MustPull,
}

/// The fingerprint of a credential for `image`'s registry.
pub fn fingerprint(registry: &str, auth: &RegistryAuth) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{registry}\0{}\0{}", auth.username, auth.password).as_bytes(),
    );
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The registry host of an image reference ("docker.io" when it names none), as the keyring
/// normalises it.
pub fn registry_of(image: &str) -> String {
    crate::registry_auth::normalized_repository(image)
        .split('/')
        .next()
        .unwrap_or("docker.io")
        .to_owned()
}

impl PulledImages {
    /// The records of `state_dir` (empty when there are none or the file is unreadable: the
    /// next pull writes it anew).
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(FILE);
        let records = std::fs::read(&path)
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default();
        Self {
            path,
            records: Mutex::new(records),
        }
    }

    /// Record that `image_id` was pulled with `credential` (a fingerprint) or anonymously.
    pub async fn record(&self, image_id: &str, credential: Option<String>) -> std::io::Result<()> {
        let mut records = self.records.lock().await;
        let r = records.entry(image_id.to_owned()).or_default();
        let changed = match credential {
            Some(c) => r.credentials.insert(c),
            None => !std::mem::replace(&mut r.anonymous, true),
        };
        if !changed {
            return Ok(());
        }
        let data = serde_json::to_vec(&*records).map_err(std::io::Error::other)?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || fleetlet_os::fs::write_atomic(&path, &data, 0o600))
            .await
            .map_err(std::io::Error::other)?
    }

    /// May a pod holding `credentials` (fingerprints of its matching pull-secret credentials)
    /// use the present image `image_id`?
    pub async fn verify(&self, image_id: &str, credentials: &[String]) -> Verdict {
        match self.records.lock().await.get(image_id) {
            None => Verdict::Allowed,
            Some(r) if r.anonymous => Verdict::Allowed,
            Some(r) if credentials.iter().any(|c| r.credentials.contains(c)) => Verdict::Allowed,
            Some(_) => Verdict::MustPull,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(p: &str) -> RegistryAuth {
        RegistryAuth {
            username: "u".into(),
            password: p.into(),
        }
    }

    #[tokio::test]
    async fn a_private_image_serves_only_pods_with_its_credentials() {
        let d = tempfile::tempdir().unwrap();
        let imgs = PulledImages::load(d.path());
        assert_eq!(
            imgs.verify("sha-pre", &[]).await,
            Verdict::Allowed,
            "preloaded"
        );
        let good = fingerprint("reg:5000", &auth("right"));
        let bad = fingerprint("reg:5000", &auth("wrong"));
        imgs.record("sha-priv", Some(good.clone())).await.unwrap();
        assert_eq!(imgs.verify("sha-priv", &[]).await, Verdict::MustPull);
        assert_eq!(imgs.verify("sha-priv", &[bad]).await, Verdict::MustPull);
        assert_eq!(imgs.verify("sha-priv", &[good]).await, Verdict::Allowed);
        imgs.record("sha-pub", None).await.unwrap();
        assert_eq!(imgs.verify("sha-pub", &[]).await, Verdict::Allowed);
        // Kept across restarts, private to root.
        let again = PulledImages::load(d.path());
        assert_eq!(again.verify("sha-priv", &[]).await, Verdict::MustPull);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join(FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn registries_of_references() {
        assert_eq!(registry_of("127.0.0.1:5000/a/b:1"), "127.0.0.1:5000");
        assert_eq!(registry_of("localhost/x:1"), "localhost");
        assert_eq!(registry_of("busybox"), "docker.io");
        assert_eq!(registry_of("library/busybox"), "docker.io");
    }
}
