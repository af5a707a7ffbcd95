//! Abuse of a real hub process by a device, and secrets in logs, against the real API server,
//! real agents and the stack's Podman:
//!
//! - device A's certificate saying hello as B is refused;
//! - A's certificate (as A) reporting a status and a removal for B's pod, and sending log chunks
//!   for any request id, changes nothing of B's pod: its status stays, its deletion still waits
//!   for B to stop it, its log stream carries nothing of A's;
//! - the hub's kubelet endpoint answers 401 without or with a bad token and 403 to a token
//!   without nodes/proxy;
//! - no value of a Secret mounted and injected into the pods appears in any log the suite's
//!   processes wrote (hub, agents, the stack's Podman service, journald), and the agent keeps
//!   the secret's files private.
//!
//! A device removed from the inventory is cut off in `hub/tests/link.rs`
//! (`removal_from_inventory_cuts_the_session`), which records its outcome for the table too.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use fleetlet_faults::Outcome;
use fleetlet_proto::v1::{self, agent_message};
use fleetlet_test_support::disk::files_on_disk_containing;
use futures::{AsyncBufReadExt, StreamExt};
use kube::api::{DeleteParams, LogParams, PostParams};
use serde_json::json;
use tokio::time::Instant;

mod rig;
use rig::{
    Rig, WAIT, containers, duplicated, hello, kubelet_get, kubelet_port, link_client, message,
    random_hex, record, running, send_as, test_image,
};

/// A pod on `node` that gets the Secret `creds` as env and as files, prints a heartbeat line and,
/// when `stubborn`, ignores SIGTERM (so its removal takes the whole grace period).
fn secret_pod(name: &str, node: &str, stubborn: bool, grace: i64) -> serde_json::Value {
    let trap = if stubborn {
        "trap '' TERM"
    } else {
        "trap 'exit 0' TERM"
    };
    json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "hostNetwork": true,
            "terminationGracePeriodSeconds": grace,
            "volumes": [{"name": "creds", "secret": {"secretName": "creds"}}],
            "containers": [{
                "name": "c",
                "image": test_image(),
                "command": ["sh", "-c", format!("{trap}; while true; do echo {name}-alive; sleep 1; done")],
                "env": [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}}],
                "volumeMounts": [{"name": "creds", "mountPath": "/etc/creds", "readOnly": true}]
            }]
        }
    })
}

#[tokio::test]
async fn a_device_cannot_touch_another_devices_pods_and_no_secret_is_logged() {
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut rig = Rig::start("fb-sec", 2).await;
    let devices = rig.devices();
    let (a, b) = (devices[0].clone(), devices[1].clone());
    let secret_value = format!("fbsecret{}", random_hex());
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(rig.fleet.client.clone(), &rig.ns);
    let secret = serde_json::from_value(json!({
        "metadata": {"name": "creds"},
        "stringData": {"password": secret_value}
    }))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let a_uid = rig.create_pod(secret_pod("pa", &a, false, 1)).await;
    let b_uid = rig.create_pod(secret_pod("pb", &b, true, 15)).await;
    assert!(
        rig.wait_running(&["pa", "pb"], WAIT).await,
        "{}",
        rig.logs()
    );
    let b_before = running(&b, &b_uid);
    let port = rig.link_port();

    // 1. A's certificate, hello as B.
    let mut as_a = link_client(rig.dir(), &a, port).await;
    let verdict = send_as(&mut as_a, vec![hello(&b)], Duration::from_secs(10)).await;
    println!("hello as B with A's certificate: {verdict:?}");
    let impersonation_refused = verdict
        .as_ref()
        .is_some_and(|s| s.code() == tonic::Code::PermissionDenied && s.message().contains(&b));

    // 2. A (as itself) reports B's pod Failed and removed, and pushes log chunks for any request.
    let b_log = rig
        .pods
        .log_stream(
            "pb",
            &LogParams {
                container: Some("c".into()),
                follow: true,
                tail_lines: Some(1),
                ..Default::default()
            },
        )
        .await
        .expect("follow pb's log");
    let marker = format!("injected-by-a-{}", random_hex());
    let mut abuse = vec![
        hello(&a),
        message(agent_message::Kind::PodStatus(v1::PodStatusReport {
            full: false,
            pods: vec![v1::PodStatusEntry {
                uid: b_uid.clone(),
                namespace: rig.ns.clone(),
                name: "pb".into(),
                status_json: Bytes::from_static(br#"{"phase":"Failed","reason":"ForgedByA"}"#),
                removed: false,
            }],
        })),
        message(agent_message::Kind::PodStatus(v1::PodStatusReport {
            full: false,
            pods: vec![v1::PodStatusEntry {
                uid: b_uid.clone(),
                removed: true,
                ..Default::default()
            }],
        })),
    ];
    abuse.extend((0..256u64).map(|request_id| {
        message(agent_message::Kind::LogChunk(v1::LogChunk {
            request_id,
            data: Bytes::from(format!("{marker}\n")),
            eof: false,
            error: String::new(),
        }))
    }));
    let verdict = send_as(&mut as_a, abuse, Duration::from_secs(3)).await;
    println!("A reporting for B's pod: {verdict:?}");
    // B's log stream: B's own lines keep coming, none of A's.
    let mut lines = b_log.lines();
    let mut seen = Vec::new();
    let read_until = Instant::now() + Duration::from_secs(4);
    // At most 50 lines or 4 s.
    for _ in 0..50 {
        match tokio::time::timeout_at(read_until, lines.next()).await {
            Ok(Some(Ok(line))) => seen.push(line),
            _ => break,
        }
    }
    drop(lines);
    let log_clean =
        seen.iter().any(|l| l.contains("pb-alive")) && !seen.iter().any(|l| l.contains(&marker));
    println!("pb's log while A pushed chunks: {seen:?}");
    // Past the status writer's coalescing: B's pod is still Running, not A's forged status.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let phase = rig.phase("pb").await;
    let status_kept = phase
        .as_ref()
        .is_some_and(|p| p.0 == "Running" && p.1 != "ForgedByA");
    // Deleting B's pod: it stays until B has stopped it (SIGTERM ignored, 15 s grace), though A
    // claimed its removal. With A's claim honoured the hub would delete it at once.
    rig.pods
        .delete("pb", &DeleteParams::default())
        .await
        .expect("delete pb");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let still_there = rig.pods.get_opt("pb").await.ok().flatten().is_some();
    // Podman shows a container inside its stop grace period as "stopping".
    let b_now = containers(&b, &b_uid);
    let b_still_runs = b_before.get("c").is_some_and(|ids| {
        ids.iter().all(|id| {
            b_now
                .iter()
                .any(|(_, i, state)| i == id && matches!(state.as_str(), "running" | "stopping"))
        })
    });
    println!(
        "4 s after deleting pb: in the API {still_there}, containers {b_now:?} (before {b_before:?})"
    );
    let gone = fleetlet_test_support::wait_for("pb deleted after B stopped it", WAIT, || async {
        rig.pods.get_opt("pb").await.ok().flatten().is_none() && running(&b, &b_uid).is_empty()
    })
    .await
    .is_ok();
    let hub_log = std::fs::read_to_string(rig.hub_log()).unwrap_or_default();
    let hub_warned = hub_log.contains("status report entries for pods not bound to this device");
    // A's real agent is back (its session replaced ours) and its pod untouched.
    rig.wait_node_ready(&a).await;
    let a_fine = rig.phase("pa").await.map(|p| p.0).as_deref() == Some("Running")
        && duplicated(&a, &a_uid) == 0;
    record(Outcome {
        fault: "device A's cert: hello as B, status/removal/logs for B's pod".into(),
        recovered: impersonation_refused
            && status_kept
            && log_clean
            && still_there
            && b_still_runs
            && gone
            && a_fine,
        converge_secs: None,
        pods_lost: u32::from(!a_fine) + u32::from(!b_still_runs),
        pods_duplicated: duplicated(&a, &a_uid),
        detail: format!(
            "hello as B: {}; B's pod {}; deletion waited for B: {}; B's log clean: {log_clean}",
            if impersonation_refused {
                "refused"
            } else {
                "NOT refused"
            },
            phase.map(|p| p.0).unwrap_or_default(),
            still_there && b_still_runs
        ),
    });
    assert!(impersonation_refused, "hello as B refused");
    assert!(status_kept, "B's pod status untouched by A");
    assert!(
        log_clean,
        "B's log carries B's lines and none of A's: {seen:?}"
    );
    assert!(
        still_there && b_still_runs,
        "deletion waits for B, not A's claim"
    );
    assert!(gone, "B's pod deleted once B stopped it\n{}", rig.logs());
    assert!(hub_warned, "the hub logs what it ignored");
    assert!(a_fine, "A's own pod unaffected");

    // 3. The kubelet endpoint, straight: no token, a bad token, a token without nodes/proxy.
    let kport = kubelet_port(&rig);
    let path = format!("/containerLogs/{}/pa/c?tailLines=1", rig.ns);
    let none = kubelet_get(kport, &path, None);
    let bad = kubelet_get(kport, &path, Some("not-a-token"));
    let stack = fleetlet_test_support::Stack::shared().expect("stack");
    let token = stack
        .service_account_token(&rig.ns, "nobody", 600)
        .await
        .expect("token");
    let unauthorized = kubelet_get(kport, &path, Some(&token));
    println!("kubelet endpoint: no token {none}, bad token {bad}, no nodes/proxy {unauthorized}");
    let kubelet_ok = (none, bad, unauthorized) == (401, 401, 403);
    record(Outcome {
        fault: "kubelet endpoint without/with bad/unauthorized token".into(),
        recovered: kubelet_ok,
        converge_secs: None,
        pods_lost: 0,
        pods_duplicated: 0,
        detail: format!("HTTP {none} / {bad} / {unauthorized} (want 401 / 401 / 403)"),
    });
    assert!(kubelet_ok, "{none} {bad} {unauthorized}");

    // 4. Secrets: private on the device, in no log.
    let mut files = Vec::new();
    let volumes = rig
        .agent(&a)
        .state_dir
        .join("pods")
        .join(&a_uid)
        .join("volumes/creds");
    collect_files(&volumes, &mut files);
    // The files keep the pod's defaultMode (a container of another uid must read them, as in
    // Kubernetes); on the device they sit on a tmpfs (never on the disk) under a pods tree only
    // root may enter.
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).map_or(0o777, |m| m.permissions().mode() & 0o777)
    };
    let pods_tree = mode(&rig.agent(&a).state_dir.join("pods"));
    let on_tmpfs = fleetlet_agent::pod::safefs::is_tmpfs(&volumes);
    let private = !files.is_empty() && pods_tree == 0o700 && on_tmpfs;
    rig.kill_agent(&a);
    rig.kill_agent(&b);
    rig.stop_hub();
    let mut logs = rig.log_files();
    logs.push(stack.log_dir().join("podman.log"));
    let mut leaks: Vec<String> = logs
        .iter()
        .filter(|f| {
            std::fs::read(f).is_ok_and(|t| {
                t.windows(secret_value.len())
                    .any(|w| w == secret_value.as_bytes())
            })
        })
        .map(|f| f.display().to_string())
        .collect();
    let journal = Command::new("journalctl")
        .args(["--no-pager", "-o", "export", "--since"])
        .arg(format!("@{started_unix}"))
        .output();
    let journal_checked = match &journal {
        Ok(out) if out.status.success() => {
            if String::from_utf8_lossy(&out.stdout).contains(&secret_value) {
                leaks.push("journald".into());
            }
            true
        }
        _ => false,
    };
    println!(
        "searched {} log files and journald ({journal_checked}) for the secret; leaks: {leaks:?}; secret files private: {private} ({} files, tmpfs {on_tmpfs}, pods tree {pods_tree:o})",
        logs.len(),
        files.len()
    );
    record(Outcome {
        fault: "secret values in logs / on disk".into(),
        recovered: leaks.is_empty() && private,
        converge_secs: None,
        pods_lost: 0,
        pods_duplicated: 0,
        detail: format!(
            "{} log files{} searched, leaks: {}; secret files on tmpfs under a 0700 tree: {private}",
            logs.len(),
            if journal_checked { " + journald" } else { "" },
            if leaks.is_empty() {
                "none".to_string()
            } else {
                leaks.join(", ")
            }
        ),
    });
    assert!(leaks.is_empty(), "secret value found in {leaks:?}");
    assert!(private, "secret files private: {files:?}");
}

fn collect_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p);
        if meta.as_ref().is_ok_and(|m| m.is_dir()) {
            collect_files(&p, out);
        } else if meta.is_ok_and(|m| m.is_file()) {
            out.push(p);
        }
    }
}

/// `podman exec` of `script` in container `id`; its exit code.
fn podman_exec(id: &str, script: &str) -> i32 {
    let stack = fleetlet_test_support::Stack::shared().expect("local stack");
    Command::new("podman")
        .arg("--url")
        .arg(format!("unix://{}", stack.podman_socket().display()))
        .args(["exec", id, "sh", "-c", script])
        .output()
        .map(|o| o.status.code().unwrap_or(-1))
        .unwrap_or(-1)
}

/// The first container's waiting reason and message of pod `name`, from the API server.
async fn waiting(rig: &Rig, name: &str) -> Option<(String, String)> {
    let pod = rig.pods.get_opt(name).await.ok().flatten()?;
    let w = pod
        .status?
        .container_statuses?
        .first()?
        .state
        .as_ref()?
        .waiting
        .clone()?;
    Some((w.reason.unwrap_or_default(), w.message.unwrap_or_default()))
}

#[tokio::test]
async fn pods_of_a_restricted_namespace_cannot_escape_onto_the_device() {
    let rig = Rig::start("fb-sbx", 1).await;
    let device = rig.devices()[0].clone();
    // Before the namespace is restricted: a privileged pod (privileged works as privileged) and
    // a pod with a secret volume (its data never reaches the device's disk).
    let marker = format!("fbsbx{}", random_hex());
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(rig.fleet.client.clone(), &rig.ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "vault"},
                "stringData": {"token": marker}}))
            .expect("secret"),
        )
        .await
        .expect("create secret");
    let priv_uid = rig
        .create_pod(json!({"metadata": {"name": "sbx-priv"}, "spec": {
            "nodeName": device, "hostNetwork": true, "terminationGracePeriodSeconds": 1,
            "volumes": [{"name": "vault", "secret": {"secretName": "vault"}}],
            "containers": [{"name": "c", "image": test_image(), "command": ["sleep", "3600"],
                "securityContext": {"privileged": true},
                "volumeMounts": [{"name": "vault", "mountPath": "/vault"}]}]}}))
        .await;
    assert!(
        rig.wait_running(&["sbx-priv"], WAIT).await,
        "{}",
        rig.logs()
    );
    let priv_id = running(&device, &priv_uid)
        .get("c")
        .and_then(|ids| ids.first().cloned())
        .expect("privileged container running");
    // Every capability the device has (its bounding set; a machine may lack some).
    let host_bnd = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    let all_caps = podman_exec(
        &priv_id,
        &format!("grep -q '^CapEff:.*{host_bnd}$' /proc/self/status"),
    ) == 0;
    let state = rig.agent(&device).state_dir.clone();
    // Read from the device side: an exec's command line would itself be stored by Podman.
    let secret_seen = podman_exec(&priv_id, "test -s /vault/token") == 0
        && std::fs::read_to_string(
            state
                .join("pods")
                .join(&priv_uid)
                .join("volumes/vault/token"),
        )
        .is_ok_and(|t| t == marker);
    let skip = [
        state.join("desired.snapshot"),
        state.join("desired.snapshot.prev"),
    ];
    let mut on_disk = files_on_disk_containing(&state, marker.as_bytes(), &skip);
    on_disk.extend(files_on_disk_containing(
        Path::new("/var/lib/containers"),
        marker.as_bytes(),
        &[],
    ));
    record(Outcome {
        fault: "privileged pod; secret volume data on the device's disk".into(),
        recovered: all_caps && secret_seen && on_disk.is_empty(),
        converge_secs: None,
        pods_lost: 0,
        pods_duplicated: duplicated(&device, &priv_uid),
        detail: format!(
            "privileged has every capability {all_caps}; secret readable in the pod {secret_seen}; found on disk outside the 0600 desired state: {on_disk:?}"
        ),
    });
    assert!(
        all_caps && secret_seen && on_disk.is_empty(),
        "{on_disk:?}\n{}",
        rig.logs()
    );
    // The namespace enforces Pod Security "restricted": everything below is what a user with
    // only the right to create pods there can submit.
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
        kube::Api::all(rig.fleet.client.clone());
    namespaces
        .patch(
            &rig.ns,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest"}}})),
        )
        .await
        .expect("label the namespace restricted");
    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(rig.fleet.client.clone(), &rig.ns);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"k": "v"}}))
            .expect("configmap"),
    )
    .await
    .expect("create configmap");
    let restricted = |name: &str, extra: serde_json::Value| {
        let mut pod = json!({
            "metadata": {"name": name},
            "spec": {
                "nodeName": device,
                "terminationGracePeriodSeconds": 1,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "fsGroup": 2000,
                    "seccompProfile": {"type": "RuntimeDefault"}},
                "volumes": [{"name": "data", "emptyDir": {}},
                            {"name": "cfg", "configMap": {"name": "cfg"}}],
                "containers": [{
                    "name": "c", "image": test_image(), "command": ["sleep", "3600"],
                    "securityContext": {"allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]
                }]
            }
        });
        if let (Some(spec), Some(extra)) = (pod["spec"].as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                spec.insert(k.clone(), v.clone());
            }
        }
        pod
    };

    // 1. A restricted pod runs as the uid it asks for, with no capabilities and a read-only root.
    let uid = rig.create_pod(restricted("sbx-ok", json!({}))).await;
    assert!(rig.wait_running(&["sbx-ok"], WAIT).await, "{}", rig.logs());
    let id = running(&device, &uid)
        .get("c")
        .and_then(|ids| ids.first().cloned())
        .expect("container running");
    let as_uid = podman_exec(&id, "test \"$(id -u)\" = 1000") == 0;
    let no_caps = podman_exec(
        &id,
        "grep -q '^CapEff:.*0000000000000000$' /proc/self/status && grep -q '^CapBnd:.*0000000000000000$' /proc/self/status",
    ) == 0;
    let ro_root = podman_exec(&id, "touch /x") != 0;
    let nnp = podman_exec(&id, "grep -q '^NoNewPrivs:.*1$' /proc/self/status") == 0;
    // 2. Its configMap volume is read-only, so no link can be planted for the agent's refresh.
    let cfg_ro = podman_exec(&id, "echo x > /cfg/new || ln -s / /cfg/..data_tmp") != 0;
    record(Outcome {
        fault: "restricted pod: uid, capabilities, root fs, configMap volume".into(),
        recovered: as_uid && no_caps && ro_root && nnp && cfg_ro,
        converge_secs: None,
        pods_lost: 0,
        pods_duplicated: duplicated(&device, &uid),
        detail: format!(
            "uid 1000 {as_uid}, no capabilities {no_caps}, read-only root {ro_root}, no_new_privs {nnp}, configMap read-only {cfg_ro}"
        ),
    });

    // 3. An init container turns the subPath into a link to the device's root.
    let escape_uid = rig
        .create_pod(restricted(
            "sbx-subpath",
            json!({
                "initContainers": [{"name": "plant", "image": test_image(),
                    "command": ["sh", "-c", "ln -sfn / /data/escape"],
                    "securityContext": {"allowPrivilegeEscalation": false,
                        "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                "containers": [{"name": "c", "image": test_image(), "command": ["sleep", "3600"],
                    "securityContext": {"allowPrivilegeEscalation": false,
                        "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [{"name": "data", "mountPath": "/host", "subPath": "escape/etc"}]}]
            }),
        ))
        .await;
    let deadline = Instant::now() + WAIT;
    let mut seen = None;
    while Instant::now() < deadline {
        if let Some((reason, message)) = waiting(&rig, "sbx-subpath").await
            && reason == "CreateContainerConfigError"
        {
            seen = Some(message);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let refused = seen.as_deref().is_some_and(|m| m.contains("outside"));
    let nothing_ran = !running(&device, &escape_uid).contains_key("c");
    record(Outcome {
        fault: "symlinked subPath to the device's root (restricted namespace)".into(),
        recovered: refused && nothing_ran,
        converge_secs: None,
        pods_lost: 0,
        pods_duplicated: 0,
        detail: format!(
            "CreateContainerConfigError: {}; container never created: {nothing_ran}",
            seen.unwrap_or_else(|| "not seen".into())
        ),
    });
    assert!(
        as_uid && no_caps && ro_root && nnp && cfg_ro,
        "{}",
        rig.logs()
    );
    assert!(refused && nothing_ran, "{}", rig.logs());
}
