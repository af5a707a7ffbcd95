//! The agent against the real Podman of the local stack (`make env-up`): the `fleetlet-agent`
//! binary runs offline from a desired file; Podman is inspected directly.
//!
//! Every pod a test reaches uses hostNetwork and a loopback port. Each test has its own device
//! name, so tests running in parallel on one Podman also show that devices do not interfere.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use fleetlet_agent::podman::ContainerCreate;
use serde_json::json;
use support::{Agent, IMAGE, bundle, container_ids, free_port, pod, podman};

fn sleeper(name: &str) -> serde_json::Value {
    json!({"name": name, "image": IMAGE, "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]})
}

#[tokio::test]
async fn adopts_running_pods_after_restart_without_recreating_them() {
    let mut a = Agent::new("t-adopt");
    let uid = "uid-adopt-1";
    a.set_desired(1, vec![bundle(uid, "adopt", json!({"hostNetwork": true, "terminationGracePeriodSeconds": 2, "containers": [sleeper("main")]}))]);
    a.start();
    a.wait_status("pod running", Duration::from_secs(60), |s| {
        pod(s, uid).is_some_and(|p| p.phase == "Running" && p.ready == 1)
    })
    .await;
    let before = container_ids("t-adopt", uid).await;
    let started_before = podman()
        .inspect_container(&before["main"])
        .await
        .unwrap()
        .unwrap()
        .state
        .started_at;
    // SIGTERM: graceful exit that leaves the pod running.
    assert!(a.stop().success());
    let still = podman()
        .inspect_container(&before["main"])
        .await
        .unwrap()
        .unwrap();
    assert!(still.state.running, "SIGTERM must leave pods running");
    a.start();
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.wait_status("pod running after restart", Duration::from_secs(30), |s| {
        pod(s, uid).is_some_and(|p| p.phase == "Running" && p.ready == 1)
    })
    .await;
    let after = container_ids("t-adopt", uid).await;
    assert_eq!(
        before, after,
        "the same container is adopted, not recreated"
    );
    let i = podman()
        .inspect_container(&after["main"])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        i.state.started_at, started_before,
        "and it was not restarted"
    );
    assert_eq!(pod(&a.status().unwrap(), uid).unwrap().restarts["main"], 0);
}

#[tokio::test]
async fn two_devices_on_one_podman_do_not_interfere_and_foreign_containers_are_untouched() {
    let mut a = Agent::new("t-dev-a");
    let mut b = Agent::new("t-dev-b");
    let spec = json!({"hostNetwork": true, "terminationGracePeriodSeconds": 1, "containers": [sleeper("c")]});
    a.set_desired(1, vec![bundle("uid-a", "same-name", spec.clone())]);
    b.set_desired(1, vec![bundle("uid-b", "same-name", spec)]);
    // A container nobody labelled: no agent may touch it.
    let p = podman();
    let foreign_name = "fleetlet-test-foreign-container";
    let _ = p.remove_container(foreign_name).await;
    let foreign = p
        .create_container(&ContainerCreate {
            name: foreign_name.into(),
            image: IMAGE.into(),
            command: Some(vec!["sleep".into(), "600".into()]),
            stop_signal: 9,
            restart_policy: "no".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    p.start_container(&foreign).await.unwrap();
    a.start();
    b.start();
    for (agent, uid) in [(&a, "uid-a"), (&b, "uid-b")] {
        agent
            .wait_status("pod running", Duration::from_secs(60), |s| {
                pod(s, uid).is_some_and(|p| p.phase == "Running")
            })
            .await;
    }
    // A drops its pod (desired file reloaded on SIGHUP): only A's pod goes away.
    a.set_desired(2, vec![]);
    a.reload();
    a.wait_status("pod removed", Duration::from_secs(60), |s| {
        s.generation == 2 && pod(s, "uid-a").is_some_and(|p| p.phase == "Removed")
    })
    .await;
    assert!(container_ids("t-dev-a", "uid-a").await.is_empty());
    let b_ids = container_ids("t-dev-b", "uid-b").await;
    assert_eq!(b_ids.len(), 1);
    assert!(
        p.inspect_container(&b_ids["c"])
            .await
            .unwrap()
            .unwrap()
            .state
            .running
    );
    assert!(pod(&b.status().unwrap(), "uid-b").is_some_and(|p| p.phase == "Running"));
    let f = p.inspect_container(&foreign).await.unwrap().unwrap();
    assert!(
        f.state.running,
        "an unlabelled container must not be touched"
    );
    p.remove_container(&foreign).await.unwrap();
}

#[tokio::test]
async fn offline_restart_policies_and_crash_loop_backoff() {
    let mut a = Agent::new("t-restart");
    a.set_desired(
        1,
        vec![
            bundle("uid-always", "always", json!({"hostNetwork": true, "restartPolicy": "Always",
                "containers": [{"name": "crash", "image": IMAGE, "command": ["sh", "-c", "exit 3"]}]})),
            bundle("uid-onfailure", "onfailure", json!({"hostNetwork": true, "restartPolicy": "OnFailure",
                "containers": [{"name": "ok", "image": IMAGE, "command": ["true"]}]})),
            bundle("uid-never", "never", json!({"hostNetwork": true, "restartPolicy": "Never",
                "containers": [{"name": "fail", "image": IMAGE, "command": ["sh", "-c", "exit 7"]}]})),
        ],
    );
    a.start();
    let s = a
        .wait_status("terminal pods", Duration::from_secs(60), |s| {
            pod(s, "uid-onfailure").is_some_and(|p| p.phase == "Succeeded")
                && pod(s, "uid-never").is_some_and(|p| p.phase == "Failed")
        })
        .await;
    let never = &pod(&s, "uid-never").unwrap().status;
    assert_eq!(
        never["containerStatuses"][0]["state"]["terminated"]["exitCode"],
        7
    );
    assert_eq!(never["containerStatuses"][0]["restartCount"], 0);
    // Always: exit 3 → CrashLoopBackOff, restarted after the 10 s backoff, counted.
    let s = a
        .wait_status("crash loop back-off", Duration::from_secs(30), |s| {
            pod(s, "uid-always").is_some_and(|p| {
                p.status["containerStatuses"][0]["state"]["waiting"]["reason"] == "CrashLoopBackOff"
            })
        })
        .await;
    let st = &pod(&s, "uid-always").unwrap().status["containerStatuses"][0];
    assert_eq!(st["lastState"]["terminated"]["exitCode"], 3);
    assert!(
        st["state"]["waiting"]["message"]
            .as_str()
            .unwrap()
            .contains("back-off 10s")
    );
    let s = a
        .wait_status("first restart", Duration::from_secs(40), |s| {
            pod(s, "uid-always").is_some_and(|p| p.restarts["crash"] >= 1)
        })
        .await;
    assert_eq!(pod(&s, "uid-always").unwrap().phase, "Running");
    // Restart counts survive an agent restart (status file).
    a.stop();
    a.start();
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.wait_status("restart count kept", Duration::from_secs(30), |s| {
        pod(s, "uid-always").is_some_and(|p| p.restarts["crash"] >= 1)
    })
    .await;
}

#[tokio::test]
async fn all_pods_come_back_after_every_container_was_removed() {
    let mut a = Agent::new("t-reboot");
    let uids: Vec<String> = (0..3).map(|i| format!("uid-reboot-{i}")).collect();
    a.set_desired(
        1,
        uids.iter()
            .enumerate()
            .map(|(i, u)| bundle(u, &format!("p{i}"), json!({"hostNetwork": true, "terminationGracePeriodSeconds": 1, "containers": [sleeper("c")]})))
            .collect(),
    );
    a.start();
    a.wait_status("all running", Duration::from_secs(60), |s| {
        uids.iter()
            .all(|u| pod(s, u).is_some_and(|p| p.phase == "Running"))
    })
    .await;
    a.stop();
    // A reboot that lost the containers: remove every pod and container of this device.
    let p = podman();
    for pod in p.list_pods(&a.filter()).await.unwrap() {
        // Podman 4.3 can refuse while a container is between "stopped" and "exited"; retry.
        let mut tries = 0;
        while let Err(e) = p.remove_pod(&pod.name).await {
            tries += 1;
            assert!(tries < 20, "{e}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    assert!(p.list_containers(&a.filter()).await.unwrap().is_empty());
    let started = tokio::time::Instant::now();
    a.start();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut running = 0;
        for u in &uids {
            let ids = container_ids("t-reboot", u).await;
            if let Some(id) = ids.get("c")
                && p.inspect_container(id)
                    .await
                    .unwrap()
                    .is_some_and(|i| i.state.running)
            {
                running += 1;
            }
        }
        if running == uids.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pods not back\n{}",
            a.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A figure for the record (the 10 s goal is measured, not asserted).
    eprintln!(
        "all {} pods running again {:?} after agent start (containers removed)",
        uids.len(),
        started.elapsed()
    );

    // A reboot that kept the containers but stopped them: restarted at once, not after a
    // CrashLoopBackOff delay.
    a.stop();
    for c in p.list_containers(&a.filter()).await.unwrap() {
        if !c.is_infra {
            p.stop_container(&c.id, 1).await.unwrap();
        }
    }
    let started = tokio::time::Instant::now();
    a.start();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut running = 0;
        for u in &uids {
            if let Some(id) = container_ids("t-reboot", u).await.get("c")
                && p.inspect_container(id)
                    .await
                    .unwrap()
                    .is_some_and(|i| i.state.running)
            {
                running += 1;
            }
        }
        if running == uids.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pods not back\n{}",
            a.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "all {} pods running again {:?} after agent start (containers stopped)",
        uids.len(),
        started.elapsed()
    );
    let s = a
        .wait_status("restarts counted", Duration::from_secs(30), |s| {
            uids.iter()
                .all(|u| pod(s, u).is_some_and(|p| p.phase == "Running" && p.restarts["c"] == 1))
        })
        .await;
    assert_eq!(s.generation, 1);
}

#[tokio::test]
async fn probes_drive_readiness_and_liveness_restarts() {
    let mut a = Agent::new("t-probes");
    let port = free_port();
    a.set_desired(
        1,
        vec![bundle("uid-probes", "probes", json!({
            "hostNetwork": true,
            "terminationGracePeriodSeconds": 1,
            "volumes": [{"name": "www", "emptyDir": {}}],
            "containers": [
                {"name": "web", "image": IMAGE,
                 "command": ["sh", "-c", format!("echo ok > /www/ok; exec httpd -f -p 127.0.0.1:{port} -h /www")],
                 "volumeMounts": [{"name": "www", "mountPath": "/www"}],
                 "readinessProbe": {"httpGet": {"path": "/ok", "port": port}, "periodSeconds": 1},
                 "livenessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 2}},
                {"name": "unready", "image": IMAGE,
                 "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
                 "readinessProbe": {"exec": {"command": ["cat", "/tmp/ready"]}, "periodSeconds": 1}},
                {"name": "dies", "image": IMAGE,
                 "command": ["sh", "-c", "touch /tmp/healthy; trap 'exit 0' TERM; while true; do sleep 1; done"],
                 "livenessProbe": {"exec": {"command": ["sh", "-c", "rm /tmp/healthy"]}, "periodSeconds": 1, "failureThreshold": 2}},
                {"name": "slow", "image": IMAGE,
                 "command": ["sh", "-c", "sleep 3; touch /tmp/started; trap 'exit 0' TERM; while true; do sleep 1; done"],
                 "startupProbe": {"exec": {"command": ["test", "-f", "/tmp/started"]}, "periodSeconds": 1, "failureThreshold": 30}}
            ]
        }))],
    );
    a.start();
    let s = a
        .wait_status("web ready", Duration::from_secs(60), |s| {
            pod(s, "uid-probes").is_some_and(|p| {
                p.status["containerStatuses"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["name"] == "web" && c["ready"] == true))
            })
        })
        .await;
    let st = &pod(&s, "uid-probes").unwrap().status;
    let ready = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(
        ready["status"], "False",
        "one container is not ready, so the pod is not Ready"
    );
    // Make `unready` ready: the pod's Ready condition follows.
    let ids = container_ids("t-probes", "uid-probes").await;
    assert_eq!(
        podman()
            .exec(
                &ids["unready"],
                &["touch".into(), "/tmp/ready".into()],
                Duration::from_secs(5)
            )
            .await
            .unwrap(),
        0
    );
    // `dies` fails its exec liveness probe (the file is gone after the first run): restarted.
    a.wait_status(
        "ready pod and liveness restart",
        Duration::from_secs(60),
        |s| {
            pod(s, "uid-probes").is_some_and(|p| {
                let ready = p.status["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                });
                ready || p.restarts.get("dies").copied().unwrap_or(0) >= 1
            })
        },
    )
    .await;
    a.wait_status("liveness restart counted", Duration::from_secs(60), |s| {
        pod(s, "uid-probes").is_some_and(|p| p.restarts.get("dies").copied().unwrap_or(0) >= 1)
    })
    .await;
    // The startup probe gates `started` (and readiness) until it passes.
    let s = a
        .wait_status("slow started", Duration::from_secs(60), |s| {
            pod(s, "uid-probes").is_some_and(|p| {
                p.status["containerStatuses"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["name"] == "slow" && c["started"] == true && c["ready"] == true)
                })
            })
        })
        .await;
    assert_eq!(
        pod(&s, "uid-probes").unwrap().restarts["slow"],
        0,
        "startup probe failures below the threshold do not restart"
    );
}

#[tokio::test]
async fn volumes_env_secrets_and_removal_with_grace_period() {
    let mut a = Agent::new("t-volumes");
    let uid = "uid-volumes";
    a.set_desired(
        1,
        vec![json!({
            "pod": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "vols", "namespace": "test", "uid": uid},
                "spec": {
                    "hostNetwork": true,
                    "terminationGracePeriodSeconds": 2,
                    "volumes": [
                        {"name": "sec", "secret": {"secretName": "s", "defaultMode": 0o644, "items": [{"key": "token", "path": "t/token"}]}},
                        {"name": "cfg", "configMap": {"name": "cm", "defaultMode": 0o440}},
                        {"name": "scratch", "emptyDir": {}}
                    ],
                    "initContainers": [
                        {"name": "init1", "image": IMAGE, "command": ["sh", "-c", "echo one >> /scratch/order"], "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
                        {"name": "init2", "image": IMAGE, "command": ["sh", "-c", "echo two >> /scratch/order"], "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}
                    ],
                    "containers": [{
                        "name": "main", "image": IMAGE, "workingDir": "/scratch",
                        "command": ["sh", "-c"],
                        "args": ["env > /scratch/env; pwd > /scratch/pwd; trap '' TERM; while true; do sleep 1; done"],
                        "env": [
                            {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "greeting"}}},
                            {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
                            {"name": "MISSING_OK", "valueFrom": {"secretKeyRef": {"name": "s", "key": "nope", "optional": true}}},
                            {"name": "MY_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                            {"name": "MY_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
                        ],
                        "envFrom": [{"prefix": "CM_", "configMapRef": {"name": "cm"}}],
                        "resources": {"limits": {"memory": "48Mi", "cpu": "250m"}},
                        "volumeMounts": [
                            {"name": "sec", "mountPath": "/sec", "readOnly": true},
                            {"name": "cfg", "mountPath": "/cfg"},
                            {"name": "scratch", "mountPath": "/scratch"}
                        ]
                    }]
                }},
            "configMaps": [{"name": "cm", "data": {"greeting": "hello", "other": "x"}}],
            "secrets": [{"name": "s", "stringData": {"token": "s3cret"}}]
        })],
    );
    a.start();
    let s = a
        .wait_status("pod running", Duration::from_secs(60), |s| {
            pod(s, uid).is_some_and(|p| p.phase == "Running")
        })
        .await;
    let st = &pod(&s, uid).unwrap().status;
    assert_eq!(
        st["initContainerStatuses"][1]["state"]["terminated"]["reason"],
        "Completed"
    );
    // A completed init container is ready, as the kubelet reports it.
    assert_eq!(st["initContainerStatuses"][1]["ready"], true);
    let init = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Initialized")
        .unwrap();
    assert_eq!(init["status"], "True");
    let vol_dir = a.state.path().join("pods").join(uid).join("volumes");
    // Wait for the app to write its files, then check them on the host side of the emptyDir.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !vol_dir.join("scratch/pwd").exists() {
        assert!(tokio::time::Instant::now() < deadline, "{}", a.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        std::fs::read_to_string(vol_dir.join("scratch/order")).unwrap(),
        "one\ntwo\n"
    );
    assert_eq!(
        std::fs::read_to_string(vol_dir.join("scratch/pwd")).unwrap(),
        "/scratch\n"
    );
    let env = std::fs::read_to_string(vol_dir.join("scratch/env")).unwrap();
    for line in [
        "FROM_CM=hello",
        "FROM_SECRET=s3cret",
        &format!("MY_UID={uid}"),
        "MY_NS=test",
        "CM_other=x",
    ] {
        assert!(env.lines().any(|l| l == line), "missing {line} in\n{env}");
    }
    assert!(!env.contains("MISSING_OK"));
    let token = vol_dir.join("sec/t/token");
    let mode = std::fs::metadata(&token).unwrap().permissions().mode() & 0o777;
    // The kubelet's semantics: the file has the mode the pod asked for (a container running as
    // another uid must read it); the device side is protected by the 0700 pods tree and by the
    // volume being a tmpfs, so the secret never reaches the disk.
    assert_eq!(mode, 0o644);
    assert_eq!(
        std::fs::metadata(a.state.path().join("pods"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    assert!(fleetlet_agent::pod::safefs::is_tmpfs(&vol_dir.join("sec")));
    assert_eq!(
        std::fs::metadata(vol_dir.join("cfg/greeting"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o440
    );
    // Limits became cgroup limits.
    let ids = container_ids("t-volumes", uid).await;
    let out = podman().exec(&ids["main"], &["sh".into(), "-c".into(), "test $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max) = 50331648".into()], Duration::from_secs(5)).await.unwrap();
    assert_eq!(out, 0, "memory limit not applied");
    // Removal: `main` ignores SIGTERM, so it is killed after the 2 s grace period.
    let t0 = tokio::time::Instant::now();
    a.set_desired(2, vec![]);
    a.stop();
    a.start();
    a.wait_status("pod removed", Duration::from_secs(60), |s| {
        s.generation == 2 && pod(s, uid).is_some_and(|p| p.phase == "Removed")
    })
    .await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "SIGKILL came before the grace period: {took:?}"
    );
    assert!(container_ids("t-volumes", uid).await.is_empty());
    assert!(
        !a.state.path().join("pods").join(uid).exists(),
        "volumes (and the secret) must be removed with the pod"
    );
    eprintln!("pod with a SIGTERM-ignoring container removed in {took:?} (grace 2 s)");
}

#[tokio::test]
async fn unsupported_pods_unpullable_images_and_overcommit_fail_cleanly() {
    let mut a = Agent::new("t-reject");
    a.set_desired(
        1,
        vec![
            bundle("uid-pvc", "pvc", json!({"hostNetwork": true,
                "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "x"}}],
                "containers": [{"name": "c", "image": IMAGE}]})),
            // Loopback registry that does not exist: the pull fails without leaving the machine.
            bundle("uid-pull", "pull", json!({"hostNetwork": true,
                "containers": [{"name": "c", "image": "localhost/fleetlet-test/does-not-exist:1"}]})),
            bundle("uid-big", "big", json!({"hostNetwork": true,
                "containers": [{"name": "c", "image": IMAGE, "resources": {"requests": {"cpu": "4000"}}}]})),
        ],
    );
    a.start();
    let s = a
        .wait_status("rejections", Duration::from_secs(60), |s| {
            pod(s, "uid-pvc").is_some_and(|p| p.phase == "Failed")
                && pod(s, "uid-big").is_some_and(|p| p.phase == "Failed")
                && pod(s, "uid-pull").is_some_and(|p| {
                    p.status["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImagePull"
                })
        })
        .await;
    let pvc = &pod(&s, "uid-pvc").unwrap().status;
    assert_eq!(pvc["reason"], "UnsupportedPodSpec");
    assert!(
        pvc["message"]
            .as_str()
            .unwrap()
            .contains("spec.volumes[0].persistentVolumeClaim")
    );
    assert_eq!(pod(&s, "uid-big").unwrap().status["reason"], "OutOfcpu");
    assert!(
        container_ids("t-reject", "uid-pvc").await.is_empty(),
        "nothing is half-started"
    );
    assert!(container_ids("t-reject", "uid-big").await.is_empty());
    a.wait_status("image pull back-off", Duration::from_secs(30), |s| {
        pod(s, "uid-pull").is_some_and(|p| {
            p.status["containerStatuses"][0]["state"]["waiting"]["reason"] == "ImagePullBackOff"
        })
    })
    .await;
}

#[tokio::test]
async fn corrupt_desired_state_is_reported_and_pods_are_left_alone() {
    let mut a = Agent::new("t-corrupt");
    let uid = "uid-corrupt";
    a.set_desired(1, vec![bundle(uid, "keep", json!({"hostNetwork": true, "terminationGracePeriodSeconds": 1, "containers": [sleeper("c")]}))]);
    a.start();
    a.wait_status("running", Duration::from_secs(60), |s| {
        pod(s, uid).is_some_and(|p| p.phase == "Running")
    })
    .await;
    a.stop();
    let ids = container_ids("t-corrupt", uid).await;
    // Truncate the stored snapshot and drop the desired file: the agent must not take that for
    // "no pods" and stop the workload.
    let snap = a.state.path().join("desired.snapshot");
    let bytes = std::fs::read(&snap).unwrap();
    std::fs::write(&snap, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(&a.desired).unwrap();
    a.start();
    a.wait_status("unknown state reported", Duration::from_secs(30), |s| {
        s.desired_unknown.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await; // past one resync
    assert!(a.logs().contains("truncated"), "{}", a.logs());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetlet-agent"))
        .args(["status", "--state-dir"])
        .arg(a.state.path())
        .env("FLEETLET_AGENT_CONFIG", a.config())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("desired state: UNKNOWN"), "{text}");
    let after = container_ids("t-corrupt", uid).await;
    assert_eq!(ids, after);
    assert!(
        podman()
            .inspect_container(&after["c"])
            .await
            .unwrap()
            .unwrap()
            .state
            .running
    );
}

#[tokio::test]
async fn bridge_network_pods_report_their_ip_to_status_and_env() {
    // The only traffic to the pod's address is the readiness probe, into the pod's own network
    // namespace (created by this test through Podman): the prober uses the pod IP, as the
    // kubelet's does, not the node's address.
    let mut a = Agent::new("t-bridge");
    let uid = "uid-bridge";
    a.set_desired(
        1,
        vec![bundle(uid, "bridge", json!({
            "terminationGracePeriodSeconds": 1,
            "volumes": [{"name": "out", "emptyDir": {}}],
            "containers": [{"name": "c", "image": IMAGE,
                "command": ["sh", "-c", "echo $POD_IP > /out/ip; echo ok > /out/ok; exec httpd -f -p 8080 -h /out"],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "readinessProbe": {"httpGet": {"path": "/ok", "port": 8080}, "periodSeconds": 1},
                "volumeMounts": [{"name": "out", "mountPath": "/out"}]}]
        }))],
    );
    a.start();
    let s = a
        .wait_status(
            "running and ready with a pod IP",
            Duration::from_secs(60),
            |s| {
                pod(s, uid).is_some_and(|p| {
                    p.phase == "Running"
                        && p.status["podIP"].is_string()
                        && p.status["containerStatuses"][0]["ready"] == true
                })
            },
        )
        .await;
    let ip = pod(&s, uid).unwrap().status["podIP"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "{ip}");
    let file = a.state.path().join("pods").join(uid).join("volumes/out/ip");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !file.exists() {
        assert!(tokio::time::Instant::now() < deadline, "{}", a.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), ip);
}

#[tokio::test]
async fn termination_messages_and_active_deadline() {
    let mut a = Agent::new("t-termmsg");
    a.set_desired(
        1,
        vec![
            bundle(
                "uid-file",
                "file",
                json!({"hostNetwork": true, "restartPolicy": "Never",
                "containers": [{"name": "c", "image": IMAGE,
                    "securityContext": {"runAsUser": 1000, "readOnlyRootFilesystem": true},
                    "command": ["sh", "-c", "echo bye > /dev/termination-log; exit 2"]}]}),
            ),
            bundle(
                "uid-logs",
                "logs",
                json!({"hostNetwork": true, "restartPolicy": "Never",
                "containers": [{"name": "c", "image": IMAGE,
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "command": ["sh", "-c", "echo first; echo oops; exit 1"]}]}),
            ),
            bundle(
                "uid-deadline",
                "deadline",
                json!({"hostNetwork": true,
                "activeDeadlineSeconds": 3, "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": IMAGE, "command": ["sleep", "3600"]}]}),
            ),
        ],
    );
    a.start();
    let s = a
        .wait_status("terminations", Duration::from_secs(60), |s| {
            ["uid-file", "uid-logs", "uid-deadline"]
                .iter()
                .all(|u| pod(s, u).is_some_and(|p| p.phase == "Failed"))
        })
        .await;
    let term = |uid: &str| {
        pod(&s, uid).unwrap().status["containerStatuses"][0]["state"]["terminated"].clone()
    };
    assert_eq!(term("uid-file")["message"], "bye\n");
    assert_eq!(term("uid-file")["exitCode"], 2);
    let logs = term("uid-logs")["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(logs.contains("oops"), "{logs:?}");
    let deadline = &pod(&s, "uid-deadline").unwrap().status;
    assert_eq!(deadline["reason"], "DeadlineExceeded");
    assert!(
        container_ids("t-termmsg", "uid-deadline")
            .await
            .values()
            .next()
            .is_some(),
        "the container stays (stopped) until the pod is deleted"
    );
}

#[tokio::test]
async fn lifecycle_hooks_run_like_the_kubelets() {
    let mut a = Agent::new("t-hooks");
    let out = tempfile::tempdir().unwrap();
    let host = out.path().to_string_lossy().into_owned();
    let hooked = bundle(
        "uid-hooks",
        "hooks",
        json!({"hostNetwork": true,
        "terminationGracePeriodSeconds": 5,
        "volumes": [{"name": "out", "hostPath": {"path": host, "type": "Directory"}}],
        "containers": [{"name": "c", "image": IMAGE,
            "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
            "volumeMounts": [{"name": "out", "mountPath": "/out"}],
            "lifecycle": {
                "postStart": {"exec": {"command": ["sh", "-c", "echo started > /out/poststart"]}},
                "preStop": {"exec": {"command": ["sh", "-c", "echo stopping > /out/prestop"]}}}}]}),
    );
    let failing = bundle(
        "uid-hookfail",
        "hookfail",
        json!({"hostNetwork": true,
        "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "c", "image": IMAGE, "command": ["sleep", "3600"],
            "lifecycle": {"postStart": {"exec": {"command": ["false"]}}}}]}),
    );
    a.set_desired(1, vec![hooked.clone(), failing]);
    a.start();
    a.wait_status(
        "hooked pod running, failing hook restarts",
        Duration::from_secs(90),
        |s| {
            pod(s, "uid-hooks").is_some_and(|p| p.phase == "Running")
                && pod(s, "uid-hookfail")
                    .is_some_and(|p| p.restarts.get("c").copied().unwrap_or(0) >= 1)
        },
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(out.path().join("poststart")).unwrap(),
        "started\n"
    );
    assert!(!out.path().join("prestop").exists());
    a.set_desired(2, vec![]);
    a.reload();
    a.wait_status("pods removed", Duration::from_secs(60), |s| {
        pod(s, "uid-hooks").is_some_and(|p| p.phase == "Removed")
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(out.path().join("prestop")).unwrap(),
        "stopping\n",
        "preStop ran before the container was stopped"
    );
}

#[tokio::test]
async fn sidecar_init_containers_run_beside_the_app_and_end_with_it() {
    let mut a = Agent::new("t-sidecar");
    let uid = "uid-sidecar";
    a.set_desired(
        1,
        vec![bundle(uid, "sidecar", json!({"hostNetwork": true, "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "volumes": [{"name": "shared", "emptyDir": {}}],
            "initContainers": [
                {"name": "side", "image": IMAGE, "restartPolicy": "Always",
                 "command": ["sh", "-c", "trap 'exit 0' TERM; echo up > /shared/side; while true; do sleep 1; done"],
                 "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
                 "startupProbe": {"exec": {"command": ["test", "-f", "/shared/side"]}, "periodSeconds": 1}},
                {"name": "setup", "image": IMAGE,
                 "command": ["sh", "-c", "test -f /shared/side && echo ok > /shared/setup"],
                 "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}],
            "containers": [{"name": "app", "image": IMAGE,
                "command": ["sh", "-c", "test -f /shared/setup && sleep 3"],
                "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}]}))],
    );
    a.start();
    let s = a
        .wait_status(
            "pod running with its sidecar",
            Duration::from_secs(60),
            |s| {
                pod(s, uid).is_some_and(|p| {
                    p.phase == "Running"
                        && p.status["initContainerStatuses"][0]["state"]["running"].is_object()
                })
            },
        )
        .await;
    let init = &pod(&s, uid).unwrap().status["initContainerStatuses"];
    assert_eq!(init[0]["started"], true, "sidecar started: {init:#}");
    assert_eq!(
        init[1]["state"]["terminated"]["exitCode"], 0,
        "setup ran after the sidecar started"
    );
    let s = a
        .wait_status("pod succeeded", Duration::from_secs(60), |s| {
            pod(s, uid).is_some_and(|p| p.phase == "Succeeded")
        })
        .await;
    let init = &pod(&s, uid).unwrap().status["initContainerStatuses"];
    // The app finished: the sidecar is stopped, and not restarted.
    a.wait_status("sidecar stopped", Duration::from_secs(30), |s| {
        pod(s, uid).is_some_and(|p| {
            p.status["initContainerStatuses"][0]["state"]["terminated"].is_object()
        })
    })
    .await;
    eprintln!("sidecar after the pod ended: {:#}", init[0]);
}

/// The infra container of a pod, by the pod's uid on device `device`: (id, pid, conmon pid).
async fn infra_of(device: &str, uid: &str) -> (String, i64, i64) {
    let p = podman();
    let f = vec![
        format!("{}={device}", fleetlet_agent::podman::labels::DEVICE),
        format!("{}={uid}", fleetlet_agent::podman::labels::POD_UID),
    ];
    let infra = p
        .list_containers(&f)
        .await
        .expect("list containers")
        .into_iter()
        .find(|c| c.is_infra)
        .expect("infra container");
    let i = p
        .inspect_container(&infra.id)
        .await
        .expect("inspect")
        .expect("infra");
    (infra.id, i.state.pid, i.state.conmon_pid)
}

fn kill9(pid: i64) {
    assert!(pid > 0);
    let ok = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -KILL {pid}");
}

/// A pod's sandbox dying under it, as the kubelet handles it (PodSandboxChanged): the pod is
/// killed and built again in a new sandbox, init containers run again and each container that
/// ran counts a restart with that run as lastState. Two ways a sandbox dies: its infra process
/// is killed while the containers run on in its orphaned namespaces, or its monitor (conmon)
/// goes first and the infra process stays a zombie that Podman still lists as running, where
/// every container start failed with "namespace path: lstat /proc/N/ns/ipc" (seen in CI).
#[tokio::test]
async fn a_dead_pod_sandbox_is_killed_and_recreated_like_the_kubelet_does() {
    let mut a = Agent::new("t-sandbox");
    a.set_desired(
        1,
        vec![
            bundle("uid-sbx-net", "net", json!({
                "terminationGracePeriodSeconds": 1,
                "volumes": [{"name": "v", "emptyDir": {}}],
                "initContainers": [{"name": "init", "image": IMAGE, "command": ["sh", "-c", "date +%s%N >> /v/inits"],
                                    "volumeMounts": [{"name": "v", "mountPath": "/v"}]}],
                "containers": [{"name": "c", "image": IMAGE, "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
                                "volumeMounts": [{"name": "v", "mountPath": "/v"}]}]
            })),
            bundle("uid-sbx-host", "host", json!({
                "hostNetwork": true,
                "terminationGracePeriodSeconds": 1,
                "containers": [sleeper("c")]
            })),
        ],
    );
    a.start();
    let running = |uid: &'static str, restarts: u32| {
        move |s: &fleetlet_agent::statusfile::StatusFile| {
            pod(s, uid).is_some_and(|p| {
                p.phase == "Running"
                    && p.restarts.get("c") == Some(&restarts)
                    && p.status["containerStatuses"][0]["state"]["running"].is_object()
            })
        }
    };
    a.wait_status("both pods running", Duration::from_secs(60), |s| {
        running("uid-sbx-net", 0)(s) && running("uid-sbx-host", 0)(s)
    })
    .await;

    // 1. The infra process is killed; the container runs on in the old namespaces.
    let (old_infra, pid, _) = infra_of("t-sandbox", "uid-sbx-net").await;
    kill9(pid);
    let s = a
        .wait_status(
            "pod net running again in a new sandbox",
            Duration::from_secs(60),
            running("uid-sbx-net", 1),
        )
        .await;
    let st = &pod(&s, "uid-sbx-net").unwrap().status;
    assert!(
        st["containerStatuses"][0]["lastState"]["terminated"].is_object(),
        "{st}"
    );
    assert!(!st["podIP"].as_str().unwrap_or_default().is_empty(), "{st}");
    assert_eq!(
        pod(&s, "uid-sbx-net").unwrap().restarts.get("init"),
        Some(&1),
        "the init container ran again"
    );
    let (new_infra, new_pid, _) = infra_of("t-sandbox", "uid-sbx-net").await;
    assert_ne!(new_infra, old_infra);
    assert!(new_pid > 0);

    // 2. conmon dies, then the infra process: a zombie Podman lists as running. The pod is
    // rebuilt at its next pass, here when its container exits.
    let (old_infra, pid, conmon) = infra_of("t-sandbox", "uid-sbx-host").await;
    kill9(conmon);
    kill9(pid);
    let ids = container_ids("t-sandbox", "uid-sbx-host").await;
    podman().stop_container(&ids["c"], 1).await.unwrap();
    a.wait_status(
        "pod host running again in a new sandbox",
        Duration::from_secs(90),
        running("uid-sbx-host", 1),
    )
    .await;
    let (new_infra, _, _) = infra_of("t-sandbox", "uid-sbx-host").await;
    assert_ne!(new_infra, old_infra);

    // Pod net was not touched by the second pod's trouble.
    let s = a.status().expect("status");
    assert_eq!(pod(&s, "uid-sbx-net").unwrap().restarts.get("c"), Some(&1));
    a.set_desired(2, vec![]);
    a.reload();
    a.wait_status("pods removed", Duration::from_secs(60), |s| {
        s.generation == 2 && s.pods.iter().all(|p| p.phase == "Removed")
    })
    .await;
    assert!(container_ids("t-sandbox", "uid-sbx-net").await.is_empty());
    assert!(container_ids("t-sandbox", "uid-sbx-host").await.is_empty());
}

/// A pod being deleted is still probed for readiness while its containers shut down (liveness
/// is not), and its status published: a container that turns unready in its SIGTERM handler
/// shows Ready=False before the pod is gone, as the kubelet reports it.
#[tokio::test]
async fn a_terminating_pod_is_probed_for_readiness_until_its_containers_exit() {
    let mut a = Agent::new("t-terminating");
    let script = "trap 'rm -f /tmp/ready; sleep 6; exit 0' TERM; touch /tmp/ready; while true; do sleep 1; done";
    a.set_desired(
        1,
        vec![bundle("uid-term", "term", json!({
            "hostNetwork": true,
            "terminationGracePeriodSeconds": 20,
            "containers": [{"name": "c", "image": IMAGE, "command": ["sh", "-c", script],
                            "readinessProbe": {"exec": {"command": ["cat", "/tmp/ready"]}, "periodSeconds": 1, "failureThreshold": 1},
                            "livenessProbe": {"exec": {"command": ["cat", "/tmp/ready"]}, "periodSeconds": 1, "failureThreshold": 1}}]
        }))],
    );
    a.start();
    let ready = |s: &fleetlet_agent::statusfile::StatusFile| {
        pod(s, "uid-term").is_some_and(|p| p.phase == "Running" && p.ready == 1)
    };
    a.wait_status("pod ready", Duration::from_secs(60), ready)
        .await;
    a.set_desired(2, vec![]);
    a.reload();
    let s = a
        .wait_status(
            "Ready=False while terminating",
            Duration::from_secs(15),
            |s| {
                pod(s, "uid-term").is_some_and(|p| {
                    p.phase == "Running"
                        && p.status["conditions"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|c| c["type"] == "Ready" && c["status"] == "False")
                })
            },
        )
        .await;
    // Liveness is off while terminating: the failing liveness probe restarted nothing.
    assert_eq!(pod(&s, "uid-term").unwrap().restarts.get("c"), Some(&0));
    a.wait_status("pod removed", Duration::from_secs(30), |s| {
        pod(s, "uid-term").is_some_and(|p| p.phase == "Removed")
    })
    .await;
    assert!(container_ids("t-terminating", "uid-term").await.is_empty());
}
