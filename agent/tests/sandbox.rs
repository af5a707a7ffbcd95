//! The pod sandbox against the real Podman of the local stack, tried as an attacker with the
//! right to create pods would: the container runs as the uid it asks for with no capabilities
//! and a read-only root, a symlinked subPath cannot reach outside its volume, a container
//! cannot write to its configMap/secret volume and a link it plants never makes the agent write
//! outside the volume, privileged works (or is refused by the device policy), secret data
//! never lands on the device's disk outside the desired state, an image volume is the image
//! read-only in the containers that mount it, and a subPath the agent makes in an emptyDir
//! under fsGroup has the kubelet's mode and group.

// Test code: a failed step fails the test.
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use fleetlet_test_support::disk::files_on_disk_containing;
use serde_json::json;
use support::{Agent, IMAGE, bundle, container_ids, pod, podman};

/// Run `script` with `sh -c` in container `container` of pod `uid`; its exit code.
async fn exec(device: &str, uid: &str, container: &str, script: &str) -> i32 {
    let ids = container_ids(device, uid).await;
    podman()
        .exec(
            &ids[container],
            &["sh".into(), "-c".into(), script.into()],
            Duration::from_secs(10),
        )
        .await
        .unwrap()
}

async fn wait_running(a: &Agent, uid: &str) {
    a.wait_status("pod running", Duration::from_secs(60), |s| {
        pod(s, uid).is_some_and(|p| p.phase == "Running" && p.ready == p.containers)
    })
    .await;
}

fn waiting_reason(a: &Agent, uid: &str, container_index: usize) -> Option<(String, String)> {
    let s = a.status()?;
    let st = &pod(&s, uid)?.status;
    let w = &st["containerStatuses"][container_index]["state"]["waiting"];
    Some((
        w["reason"].as_str()?.to_owned(),
        w["message"].as_str().unwrap_or_default().to_owned(),
    ))
}

#[tokio::test]
async fn restricted_pod_runs_as_its_uid_without_capabilities_and_with_a_read_only_root() {
    let mut a = Agent::new("t-sbx-restricted");
    let uid = "uid-sbx-restricted";
    a.set_desired(
        1,
        vec![bundle(
            uid,
            "restricted",
            json!({
                "hostNetwork": true,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 3000,
                    "fsGroup": 2000, "seccompProfile": {"type": "RuntimeDefault"}},
                "volumes": [{"name": "scratch", "emptyDir": {}}],
                "containers": [{"name": "app", "image": IMAGE,
                    "command": ["sh", "-c", "touch /scratch/mine; sleep 3600"],
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                    "securityContext": {"allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}}}]
            }),
        )],
    );
    a.start();
    wait_running(&a, uid).await;
    let dev = "t-sbx-restricted";
    assert_eq!(
        exec(dev, uid, "app", "test \"$(id -u)\" = 1000").await,
        0,
        "uid"
    );
    assert_eq!(
        exec(dev, uid, "app", "test \"$(id -g)\" = 3000").await,
        0,
        "gid"
    );
    assert_eq!(
        exec(dev, uid, "app", "id -G | grep -qw 2000").await,
        0,
        "fsGroup"
    );
    for cap in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            exec(
                dev,
                uid,
                "app",
                &format!("grep -q '^{cap}:.*0000000000000000$' /proc/self/status")
            )
            .await,
            0,
            "{cap} must be empty"
        );
    }
    assert_eq!(
        exec(
            dev,
            uid,
            "app",
            "grep -q '^NoNewPrivs:.*1$' /proc/self/status"
        )
        .await,
        0
    );
    assert_eq!(
        exec(dev, uid, "app", "grep -q '^Seccomp:.*2$' /proc/self/status").await,
        0
    );
    assert_ne!(
        exec(dev, uid, "app", "touch /rootfs-write").await,
        0,
        "root is read-only"
    );
    assert_ne!(
        exec(dev, uid, "app", "touch /tmp/x").await,
        0,
        "no writable /tmp added"
    );
    // The emptyDir is group-owned by fsGroup with setgid, so the file is too.
    let vol = a
        .state
        .path()
        .join("pods")
        .join(uid)
        .join("volumes/scratch");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !vol.join("mine").exists() {
        assert!(tokio::time::Instant::now() < deadline, "{}", a.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = std::fs::metadata(vol.join("mine")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1000, 2000));
    assert_eq!(std::fs::metadata(&vol).unwrap().mode() & 0o2000, 0o2000);
}

#[tokio::test]
async fn run_as_non_root_refuses_a_root_image() {
    let mut a = Agent::new("t-sbx-nonroot");
    let uid = "uid-sbx-nonroot";
    a.set_desired(
        1,
        vec![bundle(
            uid,
            "nonroot",
            json!({"hostNetwork": true, "securityContext": {"runAsNonRoot": true},
                "containers": [{"name": "app", "image": IMAGE, "command": ["sleep", "3600"]}]}),
        )],
    );
    a.start();
    a.wait_status("config error", Duration::from_secs(60), |_| {
        waiting_reason(&a, uid, 0).is_some_and(|(r, _)| r == "CreateContainerConfigError")
    })
    .await;
    let (_, message) = waiting_reason(&a, uid, 0).unwrap();
    assert!(message.contains("image will run as root"), "{message}");
    assert!(container_ids("t-sbx-nonroot", uid).await.is_empty());
}

#[tokio::test]
async fn a_symlinked_subpath_cannot_reach_outside_its_volume() {
    let mut a = Agent::new("t-sbx-subpath");
    let uid = "uid-sbx-subpath";
    // The init container plants links in the shared emptyDir: one to the device's root, one
    // inside the volume. The app container mounts both as subPaths.
    let pod = |escape: &str| {
        bundle(
            uid,
            "subpath",
            json!({
                "hostNetwork": true,
                "volumes": [{"name": "data", "emptyDir": {}}],
                "initContainers": [{"name": "plant", "image": IMAGE, "command": ["sh", "-c",
                    "mkdir -p /data/real && echo inside > /data/real/f && ln -sfn / /data/escape && ln -sfn real /data/inner"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                "containers": [{"name": "app", "image": IMAGE, "command": ["sleep", "3600"],
                    "volumeMounts": [
                        {"name": "data", "mountPath": "/inner", "subPath": "inner"},
                        {"name": "data", "mountPath": "/host", "subPath": escape}]}]
            }),
        )
    };
    a.set_desired(1, vec![pod("escape/etc")]);
    a.start();
    a.wait_status("subPath refused", Duration::from_secs(60), |_| {
        waiting_reason(&a, uid, 0).is_some_and(|(r, _)| r == "CreateContainerConfigError")
    })
    .await;
    let (_, message) = waiting_reason(&a, uid, 0).unwrap();
    assert!(
        message.contains("failed to prepare subPath for volumeMount \"data\" of container \"app\""),
        "{message}"
    );
    assert!(message.contains("outside"), "{message}");
    assert!(
        !container_ids("t-sbx-subpath", uid)
            .await
            .contains_key("app"),
        "nothing mounted, nothing created"
    );
    // A link that stays inside the volume is followed, as the kubelet follows it.
    a.set_desired(2, vec![pod("real")]);
    a.reload();
    wait_running(&a, uid).await;
    assert_eq!(
        exec(
            "t-sbx-subpath",
            uid,
            "app",
            "test \"$(cat /inner/f)\" = inside"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn containers_cannot_write_their_configmap_or_secret_volume_and_refreshes_stay_inside() {
    let mut a = Agent::new("t-sbx-atomic");
    let uid = "uid-sbx-atomic";
    let outside = tempfile::tempdir().unwrap();
    let pod = |value: &str| {
        json!({
            "pod": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "atomic", "namespace": "test", "uid": uid, "labels": {"tier": "edge"}},
                "spec": {"hostNetwork": true,
                    "volumes": [
                        {"name": "cfg", "configMap": {"name": "cm"}},
                        {"name": "sec", "secret": {"secretName": "s"}},
                        {"name": "all", "projected": {"sources": [
                            {"configMap": {"name": "cm", "items": [{"key": "k", "path": "cm/k"}]}},
                            {"secret": {"name": "s"}},
                            {"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}]}}],
                    "containers": [{"name": "app", "image": IMAGE, "command": ["sleep", "3600"],
                        "volumeMounts": [
                            {"name": "cfg", "mountPath": "/cfg", "readOnly": false},
                            {"name": "sec", "mountPath": "/sec"},
                            {"name": "all", "mountPath": "/all"}]}]}},
            "configMaps": [{"name": "cm", "data": {"k": value}}],
            "secrets": [{"name": "s", "stringData": {"token": "t0ken"}}]
        })
    };
    a.set_desired(1, vec![pod("one")]);
    a.start();
    wait_running(&a, uid).await;
    let dev = "t-sbx-atomic";
    for dir in ["/cfg", "/sec", "/all"] {
        assert_ne!(
            exec(dev, uid, "app", &format!("echo x > {dir}/new")).await,
            0,
            "{dir} writable"
        );
        assert_ne!(
            exec(
                dev,
                uid,
                "app",
                &format!("ln -s {} {dir}/..data_tmp", outside.path().display())
            )
            .await,
            0,
            "{dir}: a link could be planted"
        );
    }
    assert_eq!(exec(dev, uid, "app", "test \"$(cat /all/cm/k)\" = one && test \"$(cat /all/token)\" = t0ken && grep -q 'tier=\"edge\"' /all/labels").await, 0);
    // The host side of the secret and projected volumes is a tmpfs.
    let vols = a.state.path().join("pods").join(uid).join("volumes");
    assert!(fleetlet_agent::pod::safefs::is_tmpfs(&vols.join("sec")));
    assert!(fleetlet_agent::pod::safefs::is_tmpfs(&vols.join("all")));
    // Simulate a container that got write access to the volume (the old, writable mount):
    // plant links where the next refresh writes. The refresh must stay inside the volume.
    std::os::unix::fs::symlink(outside.path(), vols.join("cfg/..data_tmp")).unwrap();
    a.set_desired(2, vec![pod("two")]);
    a.reload();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while exec(dev, uid, "app", "test \"$(cat /cfg/k)\" = two").await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refresh not seen\n{}",
            a.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "written outside the volume"
    );
}

#[tokio::test]
async fn privileged_runs_privileged_unless_the_device_policy_forbids_it() {
    let mut a = Agent::new("t-sbx-priv");
    let uid = "uid-sbx-priv";
    let spec = json!({"hostNetwork": true, "containers": [{"name": "app", "image": IMAGE,
        "command": ["sleep", "3600"], "securityContext": {"privileged": true}}]});
    a.set_desired(1, vec![bundle(uid, "priv", spec.clone())]);
    a.start();
    wait_running(&a, uid).await;
    assert_ne!(
        exec(
            "t-sbx-priv",
            uid,
            "app",
            "grep -q '^CapEff:.*0000000000000000$' /proc/self/status"
        )
        .await,
        0
    );
    // Every capability the device has (its bounding set; a machine may lack some).
    let host_bnd = host_capability_bounding_set();
    assert_eq!(
        exec(
            "t-sbx-priv",
            uid,
            "app",
            &format!("grep -q '^CapEff:.*{host_bnd}$' /proc/self/status")
        )
        .await,
        0,
        "privileged must have every capability of the device ({host_bnd})"
    );
    a.stop();
    drop(a);

    let mut b = Agent::new("t-sbx-nopriv");
    std::fs::write(b.config(), "[policy]\nallow_privileged = false\n").unwrap();
    b.set_desired(1, vec![bundle(uid, "priv", spec)]);
    b.start();
    let s = b
        .wait_status("policy refusal", Duration::from_secs(60), |s| {
            pod(s, uid).is_some_and(|p| p.phase == "Failed")
        })
        .await;
    let st = &pod(&s, uid).unwrap().status;
    assert_eq!(st["reason"], "DevicePolicy");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("spec.containers[0].securityContext.privileged")
    );
    assert!(container_ids("t-sbx-nopriv", uid).await.is_empty());
}

/// This process's capability bounding set as /proc shows it (hex).
fn host_capability_bounding_set() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test]
async fn secret_volumes_never_reach_the_disk() {
    let mut a = Agent::new("t-sbx-secret");
    let uid = "uid-sbx-secret";
    let marker = format!(
        "fleetlet-secret-marker-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    a.set_desired(
        1,
        vec![json!({
            "pod": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "secret", "namespace": "test", "uid": uid},
                "spec": {"hostNetwork": true,
                    "volumes": [{"name": "sec", "secret": {"secretName": "s"}}],
                    "containers": [{"name": "app", "image": IMAGE, "command": ["sleep", "3600"],
                        "volumeMounts": [{"name": "sec", "mountPath": "/sec"}]}]}},
            "secrets": [{"name": "s", "stringData": {"token": marker}}]
        })],
    );
    a.start();
    wait_running(&a, uid).await;
    // Checked from the device side: an exec's command line would itself be stored by Podman.
    assert_eq!(
        exec("t-sbx-secret", uid, "app", "test -s /sec/token").await,
        0
    );
    let token = a
        .state
        .path()
        .join("pods")
        .join(uid)
        .join("volumes/sec/token");
    assert_eq!(std::fs::read_to_string(token).unwrap(), marker);
    let state = a.state.path();
    let desired = state.join("desired.snapshot");
    let mode = std::fs::metadata(&desired).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "desired state must be 0600");
    // The desired state (0600) is where the secret is allowed; the test's desired.json is the
    // input a hub would have sent.
    let skip = [
        desired.clone(),
        state.join("desired.snapshot.prev"),
        state.join("desired.json"),
    ];
    let mut found = files_on_disk_containing(state, marker.as_bytes(), &skip);
    found.extend(files_on_disk_containing(
        Path::new("/var/lib/containers"),
        marker.as_bytes(),
        &[],
    ));
    assert!(found.is_empty(), "secret data on disk: {found:?}");
}

#[tokio::test]
async fn an_image_volume_mounts_the_image_read_only_where_the_pod_asks() {
    let mut a = Agent::new("t-sbx-imgvol");
    let uid = "uid-sbx-imgvol";
    let absent = "uid-sbx-imgvol-absent";
    a.set_desired(
        1,
        vec![
            bundle(
                uid,
                "imgvol",
                json!({
                    "hostNetwork": true, "terminationGracePeriodSeconds": 1,
                    // The stack's test image, already in Podman's store: IfNotPresent uses it.
                    "volumes": [{"name": "img", "image": {"reference": IMAGE, "pullPolicy": "IfNotPresent"}}],
                    "containers": [
                        {"name": "app", "image": IMAGE, "command": ["sleep", "3600"],
                            "volumeMounts": [{"name": "img", "mountPath": "/volume"}]},
                        {"name": "other", "image": IMAGE, "command": ["sleep", "3600"]}]
                }),
            ),
            bundle(
                absent,
                "imgvol-absent",
                json!({
                    "hostNetwork": true, "terminationGracePeriodSeconds": 1,
                    "volumes": [{"name": "img", "image": {"reference": "localhost/fleetlet-test/absent:1", "pullPolicy": "Never"}}],
                    "containers": [{"name": "app", "image": IMAGE, "command": ["sleep", "3600"],
                        "volumeMounts": [{"name": "img", "mountPath": "/volume"}]}]
                }),
            ),
        ],
    );
    a.start();
    wait_running(&a, uid).await;
    // The image's files, read-only even to root, in the container that mounts it only.
    assert_eq!(
        exec(
            "t-sbx-imgvol",
            uid,
            "app",
            "test -x /volume/bin/busybox && test -f /volume/etc/passwd"
        )
        .await,
        0
    );
    assert_ne!(
        exec("t-sbx-imgvol", uid, "app", "touch /volume/planted").await,
        0,
        "an image volume is read-only"
    );
    assert_eq!(
        exec(
            "t-sbx-imgvol",
            uid,
            "app",
            "grep ' /volume ' /proc/mounts | grep -q '[ ,]ro[ ,]'"
        )
        .await,
        0
    );
    assert_ne!(
        exec("t-sbx-imgvol", uid, "other", "test -e /volume").await,
        0
    );
    // An image volume with pullPolicy Never whose image is not there: the container waits.
    a.wait_status("image volume never pulled", Duration::from_secs(60), |_| {
        waiting_reason(&a, absent, 0).is_some_and(|(r, _)| r == "ErrImageNeverPull")
    })
    .await;
    let (_, message) = waiting_reason(&a, absent, 0).unwrap();
    assert!(
        message.contains("localhost/fleetlet-test/absent:1"),
        "{message}"
    );
    assert!(
        !container_ids("t-sbx-imgvol", absent)
            .await
            .contains_key("app"),
        "no container without its image volume"
    );
}

#[tokio::test]
async fn a_new_subpath_of_a_tmpfs_empty_dir_under_fs_group_is_setgid_and_sticky() {
    // The kubelet's e2e "nonexistent volume subPath should have the correct mode and owner
    // using FSGroup": the directory it makes has the volume root's mode (tmpfs 1777, setgid
    // for the fsGroup) and group.
    let mut a = Agent::new("t-sbx-fsgsub");
    let uid = "uid-sbx-fsgsub";
    a.set_desired(
        1,
        vec![bundle(
            uid,
            "fsgsub",
            json!({
                "hostNetwork": true, "terminationGracePeriodSeconds": 1,
                "securityContext": {"fsGroup": 123},
                "volumes": [{"name": "v", "emptyDir": {"medium": "Memory"}}],
                "containers": [{"name": "app", "image": IMAGE, "command": ["sleep", "3600"],
                    "securityContext": {"runAsUser": 1001},
                    "volumeMounts": [
                        {"name": "v", "mountPath": "/test-volume", "subPath": "test-sub"},
                        {"name": "v", "mountPath": "/root-volume"}]}]
            }),
        )],
    );
    a.start();
    wait_running(&a, uid).await;
    for (path, want) in [
        ("/test-volume", "drwxrwsrwt 0 123"),
        ("/root-volume", "drwxrwsrwt 0 123"),
    ] {
        assert_eq!(
            exec(
                "t-sbx-fsgsub",
                uid,
                "app",
                &format!("test \"$(stat -c '%A %u %g' {path})\" = '{want}'")
            )
            .await,
            0,
            "{path} is not {want}"
        );
    }
    // The non-root user writes there, and what it makes takes the fsGroup.
    assert_eq!(
        exec(
            "t-sbx-fsgsub",
            uid,
            "app",
            "touch /test-volume/f && test \"$(stat -c %g /test-volume/f)\" = 123"
        )
        .await,
        0
    );
}
