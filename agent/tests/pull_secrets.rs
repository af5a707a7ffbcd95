//! imagePullSecrets against a real private registry (distribution 2.8 with htpasswd auth on
//! loopback) and the real Podman of the local stack (`make env-up`): a pod naming a pull secret
//! pulls with it and runs (also a legacy `.dockercfg` one, and a good credential after a refused
//! one); without it (or with a wrong password) the pull fails with the registry's own error; a
//! malformed pull secret is named, never quoted; and the credential never shows up in the
//! agent's log or status file.

mod support;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use fleetlet_test_support::registry::PrivateRegistry;
use serde_json::json;
use support::{Agent, IMAGE, bundle, pod};

fn waiting(s: &fleetlet_agent::statusfile::StatusFile, uid: &str) -> (String, String) {
    let w = pod(s, uid)
        .map(|p| p.status["containerStatuses"][0]["state"]["waiting"].clone())
        .unwrap_or_default();
    (
        w["reason"].as_str().unwrap_or_default().to_owned(),
        w["message"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn a_private_image_runs_with_its_pull_secret_and_fails_with_the_registrys_error_without() {
    let mut reg = PrivateRegistry::start();
    let image = reg.push(IMAGE, "fleetlet/busybox:1");
    let spec = |secrets: serde_json::Value| {
        json!({"hostNetwork": true, "terminationGracePeriodSeconds": 1,
            "imagePullSecrets": secrets,
            "containers": [{"name": "c", "image": &image, "imagePullPolicy": "Always",
                "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]}]})
    };
    let secret = |name: &str, password: &str| {
        json!({"name": name, "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": reg.docker_config_json(&reg.username, password)}})
    };
    let with = |mut b: serde_json::Value, secrets: Vec<serde_json::Value>| {
        b["secrets"] = json!(secrets);
        b
    };
    let wrong_password = format!("{}-wrong", reg.password);
    // The legacy type: `.dockercfg` holds the `auths` map alone.
    let dockercfg = json!({"name": "legacycred", "type": "kubernetes.io/dockercfg",
        "stringData": {".dockercfg": json!({&reg.host: {"username": &reg.username, "password": &reg.password}}).to_string()}});
    let malformed = json!({"name": "brokencred", "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": "{\"auths\": [\"not a map\"]}"}});
    let mut a = Agent::new("t-pullsecret").podman_socket(&reg.podman_socket);
    a.set_desired(
        1,
        vec![
            with(
                bundle("uid-auth", "auth", spec(json!([{"name": "regcred"}]))),
                vec![secret("regcred", &reg.password)],
            ),
            // No pull secret at all: an anonymous pull, which the registry refuses.
            bundle("uid-anon", "anon", spec(json!([]))),
            // A pull secret the bundle lacks (the Secret does not exist): not fatal, anonymous.
            bundle("uid-missing", "missing", spec(json!([{"name": "gone"}]))),
            // A pull secret with the wrong password: tried, refused.
            with(
                bundle("uid-wrong", "wrong", spec(json!([{"name": "badcred"}]))),
                vec![secret("badcred", &wrong_password)],
            ),
            // Two credentials for the registry (a rotation): the refused one is tried first,
            // then the good one, as the kubelet does.
            with(
                bundle(
                    "uid-rotate",
                    "rotate",
                    spec(json!([{"name": "badcred"}, {"name": "regcred"}])),
                ),
                vec![
                    secret("badcred", &wrong_password),
                    secret("regcred", &reg.password),
                ],
            ),
            with(
                bundle(
                    "uid-legacy",
                    "legacy",
                    spec(json!([{"name": "legacycred"}])),
                ),
                vec![dockercfg],
            ),
            // A pull secret that is not a Docker config: the pull fails naming it.
            with(
                bundle(
                    "uid-broken",
                    "broken",
                    spec(json!([{"name": "brokencred"}])),
                ),
                vec![malformed],
            ),
        ],
    );
    a.start();
    let s = a
        .wait_status("pull outcomes", Duration::from_secs(90), |s| {
            ["uid-auth", "uid-rotate", "uid-legacy"]
                .iter()
                .all(|u| pod(s, u).is_some_and(|p| p.phase == "Running"))
                && ["uid-anon", "uid-missing", "uid-wrong", "uid-broken"]
                    .iter()
                    .all(|u| {
                        let (reason, _) = waiting(s, u);
                        reason == "ErrImagePull" || reason == "ImagePullBackOff"
                    })
        })
        .await;
    for uid in ["uid-auth", "uid-rotate", "uid-legacy"] {
        let running = &pod(&s, uid).unwrap().status["containerStatuses"][0];
        assert!(
            running["state"]["running"].is_object(),
            "{uid}: the pod with its pull secret runs: {running:#}"
        );
    }
    let (_, broken) = waiting(&s, "uid-broken");
    eprintln!("uid-broken: {broken}");
    assert!(
        broken.contains("brokencred") && broken.contains(".dockerconfigjson"),
        "a malformed pull secret is named: {broken}"
    );
    assert!(!broken.contains("not a map"), "nor quoted: {broken}");
    for uid in ["uid-anon", "uid-missing", "uid-wrong"] {
        let (reason, message) = waiting(&s, uid);
        eprintln!("{uid}: {reason}: {message}");
        assert!(
            message.contains("unauthorized") || message.contains("authentication required"),
            "{uid}: the message shows the registry's auth error: {message}"
        );
        assert!(
            message.contains(&reg.host),
            "{uid}: names the registry: {message}"
        );
    }
    let log = a.logs();
    assert!(
        log.contains("image pull secret not found"),
        "the missing pull secret is warned about"
    );
    // Nowhere in the state directory but the 0600 desired-state store (and the desired file
    // this test wrote): neither the passwords nor the base64 `auth` fields that carry them.
    let secrets: Vec<String> = [&reg.password, &wrong_password]
        .into_iter()
        .flat_map(|p| {
            let auth: serde_json::Value =
                serde_json::from_str(&reg.docker_config_json(&reg.username, p)).unwrap();
            [
                p.clone(),
                auth["auths"][&reg.host]["auth"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            ]
        })
        .collect();
    let mut checked = 0;
    let mut dirs = vec![a.state.path().to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if name.starts_with("desired.snapshot") {
                assert_eq!(meta.mode() & 0o077, 0, "{name} is readable by others");
            } else if meta.is_file() && name != "desired.json" {
                let content = std::fs::read(entry.path()).unwrap();
                let content = String::from_utf8_lossy(&content);
                for s in &secrets {
                    assert!(
                        !content.contains(s.as_str()),
                        "a credential reached {}",
                        entry.path().display()
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 2, "the agent log and status file were checked");
    a.wait_status("image pull back-off", Duration::from_secs(30), |s| {
        waiting(s, "uid-anon").0 == "ImagePullBackOff"
    })
    .await;
}

#[tokio::test]
async fn a_cached_private_image_serves_only_pods_with_its_credentials() {
    let mut reg = PrivateRegistry::start();
    let image = reg.push(IMAGE, "fleetlet/cached:1");
    let pod_spec = |policy: &str, secrets: serde_json::Value| {
        json!({"hostNetwork": true, "terminationGracePeriodSeconds": 1,
            "imagePullSecrets": secrets,
            "containers": [{"name": "c", "image": &image, "imagePullPolicy": policy,
                "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]}]})
    };
    let regcred = json!({"name": "regcred", "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": reg.docker_config_json(&reg.username, &reg.password)}});
    let mut owner = bundle(
        "uid-owner",
        "owner",
        pod_spec("Always", json!([{"name": "regcred"}])),
    );
    owner["secrets"] = json!([regcred.clone()]);
    let mut a = Agent::new("t-pullcache").podman_socket(&reg.podman_socket);
    a.set_desired(1, vec![owner.clone()]);
    a.start();
    a.wait_status(
        "the owner pulls the private image",
        Duration::from_secs(60),
        |s| pod(s, "uid-owner").is_some_and(|p| p.phase == "Running"),
    )
    .await;
    // The image is now on the device. A pod without the credentials must not get it from the
    // cache; one with them does, without pulling.
    let freeloader = bundle("uid-free", "free", pod_spec("IfNotPresent", json!([])));
    let never = bundle("uid-never", "never", pod_spec("Never", json!([])));
    let mut friend = bundle(
        "uid-friend",
        "friend",
        pod_spec("IfNotPresent", json!([{"name": "regcred"}])),
    );
    friend["secrets"] = json!([regcred]);
    a.set_desired(2, vec![owner, freeloader, never, friend]);
    a.reload();
    let s = a
        .wait_status("cache verdicts", Duration::from_secs(60), |s| {
            pod(s, "uid-friend").is_some_and(|p| p.phase == "Running")
                && matches!(
                    waiting(s, "uid-free").0.as_str(),
                    "ErrImagePull" | "ImagePullBackOff"
                )
                && waiting(s, "uid-never").0 == "ErrImageNeverPull"
        })
        .await;
    let (_, message) = waiting(&s, "uid-free");
    assert!(
        message.contains("unauthorized") || message.contains("authentication required"),
        "the freeloader had to pull and was refused: {message}"
    );
    let (_, message) = waiting(&s, "uid-never");
    assert!(
        message.contains("credentials this pod does not have"),
        "{message}"
    );
    let record = std::fs::read_to_string(a.state.path().join("pulled-images.json")).unwrap();
    assert!(
        !record.contains(&reg.password),
        "only fingerprints are recorded"
    );
}
