//! Pod deletion grace and `kubectl logs` end to end: the real `fleetlet-hub` binary, a real
//! `fleetlet-agent` on the stack's Podman, the real kube-apiserver and the real kubectl.
//!
//! Needs `make env-up` and the agent binary next to the hub's (`cargo build -p fleetlet-agent`).

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

mod common;
use common::{
    HubPorts, HubSetup, HubSpec, KubeCleanup, Proc, client, create_namespace, hub_metric, kubectl,
    kubectl_spawn, node_condition, node_ready, pod_condition, remove_device_containers,
    start_agent, uid_containers, unique, wait_for,
};

/// One hub, one real agent, one namespace; everything is removed on drop.
struct Setup {
    dev: String,
    ns: String,
    client: kube::Client,
    ports: HubPorts,
    agent: Option<Proc>,
    _hub: Proc,
    _cleanup: KubeCleanup,
    // Last: the processes print their logs from it when a test fails.
    dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.agent.take();
        remove_device_containers(&self.dev);
    }
}

impl Setup {
    async fn start(prefix: &str) -> Self {
        Self::start_with(prefix, |_| {}).await
    }

    /// [`Setup::start`] with `tweak` applied to the hub's spec first.
    async fn start_with(prefix: &str, tweak: impl FnOnce(&mut HubSpec)) -> Self {
        let id = unique(prefix);
        let dev = format!("{id}-d");
        let cleanup = KubeCleanup {
            nodes: vec![dev.clone()],
            namespace: Some(id.clone()),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spec = HubSpec::new(&id, &[(dev.clone(), format!("{id}-f"))]);
        tweak(&mut spec);
        let setup = HubSetup::write(dir.path(), spec);
        let (hub, ports) = (setup.spawn(), setup.ports);
        let agent = start_agent(dir.path(), &dev, ports.link);
        let client = client().await;
        let nodes: Api<Node> = Api::all(client.clone());
        wait_for("node Ready from its real agent", 90, || async {
            node_ready(&nodes.get(&dev).await.ok()?).then_some(())
        })
        .await;
        create_namespace(&client, &id).await;
        Self {
            dev,
            ns: id,
            client,
            ports,
            dir,
            agent: Some(agent),
            _hub: hub,
            _cleanup: cleanup,
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates a pod bound to the device from `spec` (nodeName and toleration added) and waits
    /// until it runs; returns its UID.
    async fn run_pod(&self, name: &str, mut spec: Value) -> String {
        spec["nodeName"] = json!(self.dev);
        spec["tolerations"] = json!([{"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "fleetlet", "effect": "NoSchedule"}]);
        let pod: Pod =
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("pod");
        let pods = self.pods();
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
        wait_for("pod Running on the device", 120, || async {
            let p = pods.get(name).await.ok()?;
            (p.status.as_ref()?.phase.as_deref() == Some("Running"))
                .then(|| p.metadata.uid.clone())
                .flatten()
        })
        .await
    }

    fn hub_log(&self) -> PathBuf {
        self.dir.path().join("hub.log")
    }
}

/// Lines of a child's stdout, read on a thread so the test can wait with a bound.
fn line_reader(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The counter in a line `<prefix>-<n>`.
fn counter(line: &str, prefix: &str) -> Option<u32> {
    line.strip_prefix(prefix)?
        .strip_prefix('-')?
        .trim()
        .parse()
        .ok()
}

/// `kubectl logs` with `-c`, `--tail`, `--since`, `-f` (new lines while following; the stream
/// ends when the container exits and when the client hangs up), and an offline device.
#[tokio::test]
async fn kubectl_logs_follow_tail_since_container_and_offline() {
    let mut s = Setup::start("logs").await;
    s.run_pod(
        "two",
        json!({
            "containers": [
                {"name": "a", "image": "localhost/fleetlet-test/busybox:1",
                 "command": ["sh", "-c", "i=0; while [ $i -lt 900 ]; do echo a-$i; i=$((i+1)); sleep 1; done; sleep 3600"]},
                {"name": "b", "image": "localhost/fleetlet-test/busybox:1",
                 "command": ["sh", "-c", "echo b-1; echo b-2; echo b-3; exec sleep 3600"]}
            ]
        }),
    )
    .await;
    let ns = s.ns.clone();
    let logs = |extra: &[&str]| {
        let mut args = vec!["-n", ns.as_str(), "logs", "two"];
        args.extend_from_slice(extra);
        kubectl(&args)
    };
    // -c picks the container.
    let b = wait_for("kubectl logs -c b", 30, || async {
        let (ok, out, _) = logs(&["-c", "b"]);
        (ok && out.lines().count() == 3).then_some(out)
    })
    .await;
    assert_eq!(b, "b-1\nb-2\nb-3\n");
    // --tail.
    let (ok, out, err) = logs(&["-c", "b", "--tail=1"]);
    assert!(ok, "{err}");
    assert_eq!(out, "b-3\n");
    // --since: only the last seconds of a container that prints one line a second.
    wait_for("container a printed for 8 s", 60, || async {
        let (ok, out, _) = logs(&["-c", "a", "--tail=1"]);
        (ok && out
            .lines()
            .next()
            .and_then(|l| counter(l, "a"))
            .is_some_and(|n| n >= 8))
        .then_some(())
    })
    .await;
    let (ok, out, err) = logs(&["-c", "a", "--since=3s"]);
    assert!(ok, "{err}");
    let since: Vec<u32> = out.lines().filter_map(|l| counter(l, "a")).collect();
    let (_, all, _) = logs(&["-c", "a"]);
    let newest = all
        .lines()
        .filter_map(|l| counter(l, "a"))
        .max()
        .unwrap_or(0);
    println!("--since=3s: {since:?} (newest line a-{newest})");
    assert!(!since.is_empty() && since.len() <= 6, "--since=3s: {out:?}");
    assert!(
        since[0] >= 2,
        "--since=3s returned the start of the log: {out:?}"
    );

    // -f: lines written after the request arrive while following; hanging up ends it.
    let mut follow = kubectl_spawn(&["-n", &ns, "logs", "-f", "two", "-c", "a", "--tail=1"]);
    let lines = line_reader(&mut follow);
    let first = lines
        .recv_timeout(Duration::from_secs(30))
        .ok()
        .and_then(|l| counter(&l, "a"))
        .expect("first followed line");
    let mut later = first;
    for _ in 0..60 {
        match lines.recv_timeout(Duration::from_secs(1)) {
            Ok(l) => later = counter(&l, "a").unwrap_or(later),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("follow stream ended early: {e}"),
        }
        if later >= first + 3 {
            break;
        }
    }
    println!("kubectl logs -f: a-{first} .. a-{later} arrived while following");
    assert!(
        later >= first + 3,
        "no new lines while following: {first} .. {later}"
    );
    let _ = follow.kill();
    let _ = follow.wait();

    // --previous: the run before the last restart (the agent restarts a container in place; the
    // previous run is its part of the log). Each run lasts well under a second, as a crash at
    // start-up does: its line is stamped after the whole second its status says it finished.
    s.run_pod(
        "crash",
        json!({"containers": [{"name": "c", "image": "localhost/fleetlet-test/busybox:1",
            "command": ["sh", "-c", "echo run-$(cat /proc/uptime); exit 1"]}]}),
    )
    .await;
    let previous = wait_for("kubectl logs --previous after a restart", 60, || async {
        let (ok, out, _) = kubectl(&["-n", &ns, "logs", "crash", "--previous"]);
        (ok && out.matches("run-").count() == 1).then_some(out)
    })
    .await;
    let (_, all, _) = kubectl(&["-n", &ns, "logs", "crash"]);
    println!("--previous: {previous:?}; whole log: {all:?}");
    // One run of the whole log (which one depends on how far the crash loop got).
    assert!(
        all.lines().any(|l| l == previous.trim_end()),
        "{previous:?} {all:?}"
    );

    // -f ends by itself when the container exits.
    s.run_pod(
        "short",
        json!({
            "restartPolicy": "Never",
            "containers": [{"name": "s", "image": "localhost/fleetlet-test/busybox:1",
                            "command": ["sh", "-c", "for i in 1 2 3 4 5 6; do echo s-$i; sleep 1; done"]}]
        }),
    )
    .await;
    let mut follow = kubectl_spawn(&["-n", &ns, "logs", "-f", "short"]);
    let lines = line_reader(&mut follow);
    let mut exited = None;
    for _ in 0..120 {
        if let Ok(Some(status)) = follow.try_wait() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let Some(status) = exited else {
        let _ = follow.kill();
        panic!("kubectl logs -f did not end after the container exited");
    };
    let got: Vec<String> = lines.try_iter().collect();
    println!("kubectl logs -f on an exiting container: {status}, lines {got:?}");
    assert!(status.success(), "kubectl logs -f exit: {status}");
    assert_eq!(got.last().map(String::as_str), Some("s-6"), "{got:?}");

    // The device goes offline: a clear error instead of a hang.
    s.agent.take();
    wait_for("the hub sees the device gone", 60, || async {
        (hub_metric(s.ports.ops, "connected_devices").await? == 0.0).then_some(())
    })
    .await;
    let (ok, out, err) = logs(&["-c", "b"]);
    println!("offline device: kubectl logs -> {}", err.trim());
    assert!(!ok, "logs of an offline device must fail: {out}");
    assert!(err.contains("offline"), "{err}");
    common::assert_no_forbidden(&s.hub_log());
}

/// `kubectl delete pod --grace-period=N` on a container that ignores SIGTERM: the device kills it
/// after about N seconds, not after the spec's much longer terminationGracePeriodSeconds.
#[tokio::test]
async fn kubectl_delete_grace_period_overrides_the_spec_on_the_device() {
    let s = Setup::start("grace").await;
    let uid = s
        .run_pod(
            "stubborn",
            json!({
                "terminationGracePeriodSeconds": 300,
                "containers": [{"name": "app", "image": "localhost/fleetlet-test/busybox:1",
                                "command": ["sh", "-c", "trap '' TERM; echo ignoring TERM; while true; do sleep 1; done"]}]
            }),
        )
        .await;
    wait_for("the container running in Podman", 30, || async {
        let c = uid_containers(&uid);
        (c.len() == 1 && c[0].1 == "running").then_some(())
    })
    .await;
    let started = tokio::time::Instant::now();
    let (ok, out, err) = kubectl(&[
        "-n",
        &s.ns,
        "delete",
        "pod",
        "stubborn",
        "--grace-period=3",
        "--wait=false",
    ]);
    assert!(ok, "kubectl delete: {out} {err}");
    let p = s.pods().get("stubborn").await.expect("pod");
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(3));
    // Bounded well below the spec's 300 s: only the relayed deletion grace can end it this soon.
    wait_for("the container stopped on the device", 60, || async {
        let c = uid_containers(&uid);
        (c.is_empty()
            || c.iter()
                .all(|(_, state)| state != "running" && state != "stopping"))
        .then_some(())
    })
    .await;
    let stopped = started.elapsed();
    wait_for("the pod gone from the API", 60, || async {
        matches!(s.pods().get_opt("stubborn").await, Ok(None)).then_some(())
    })
    .await;
    let gone = started.elapsed();
    println!(
        "SIGTERM-ignoring container, spec grace 300 s, --grace-period=3: stopped after {stopped:?}, pod gone from the API after {gone:?}"
    );
    // Loose bounds: SIGKILL came after the grace (not at once) and long before 300 s.
    assert!(
        stopped >= Duration::from_secs(2),
        "killed before its grace: {stopped:?}"
    );
    assert!(stopped < Duration::from_secs(60), "{stopped:?}");
}

/// A deleted pod that a finalizer keeps shows how its containers ended, as the kubelet writes
/// the final status before it deletes: each container terminated with its exit code and finish
/// time, the phase terminal; once the finalizer goes, so does the pod.
#[tokio::test]
async fn a_deleted_pod_kept_by_a_finalizer_shows_its_containers_terminated() {
    let s = Setup::start("final").await;
    let finalizer = "fleetlet.io/test-keep";
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "kept", "finalizers": [finalizer]},
        "spec": {
            "nodeName": s.dev,
            "tolerations": [{"operator": "Exists"}],
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {"name": "polite", "image": "localhost/fleetlet-test/busybox:1",
                 "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]},
                {"name": "stubborn", "image": "localhost/fleetlet-test/busybox:1",
                 "command": ["sh", "-c", "trap '' TERM; while true; do sleep 1; done"]}
            ]
        }
    }))
    .expect("pod");
    let pods = s.pods();
    // The finalizer goes whatever happens, so the namespace can be deleted (a client of its
    // own: the test's runtime is blocked while this drop runs).
    struct Unkeep(String);
    impl Drop for Unkeep {
        fn drop(&mut self) {
            let ns = self.0.clone();
            let _ = std::thread::spawn(move || {
                tokio::runtime::Runtime::new()
                    .expect("runtime")
                    .block_on(async {
                        let pods: Api<Pod> = Api::namespaced(client().await, &ns);
                        let patch = json!({"metadata": {"finalizers": null}});
                        let _ = pods
                            .patch(
                                "kept",
                                &kube::api::PatchParams::default(),
                                &kube::api::Patch::Merge(&patch),
                            )
                            .await;
                    })
            })
            .join();
        }
    }
    let _unkeep = Unkeep(s.ns.clone());
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    wait_for("pod Running", 120, || async {
        let p = pods.get("kept").await.ok()?;
        (p.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    pods.delete("kept", &Default::default())
        .await
        .expect("delete pod");
    let p = wait_for("both containers terminated in the API", 60, || async {
        let p = pods.get("kept").await.ok()?;
        let all_terminated = p
            .status
            .as_ref()?
            .container_statuses
            .as_ref()?
            .iter()
            .all(|c| c.state.as_ref().is_some_and(|st| st.terminated.is_some()));
        all_terminated.then_some(p)
    })
    .await;
    let status = p.status.expect("status");
    let ended = |name: &str| {
        status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == name)
            .and_then(|c| c.state.clone()?.terminated)
            .unwrap_or_else(|| panic!("{name} terminated"))
    };
    let (polite, stubborn) = (ended("polite"), ended("stubborn"));
    println!(
        "final status: phase {:?}; polite exit {} ({:?}), stubborn exit {} ({:?})",
        status.phase, polite.exit_code, polite.reason, stubborn.exit_code, stubborn.reason
    );
    assert_eq!(polite.exit_code, 0, "{polite:?}");
    assert_eq!(polite.reason.as_deref(), Some("Completed"));
    assert_eq!(
        stubborn.exit_code, 137,
        "killed after its grace: {stubborn:?}"
    );
    assert_eq!(stubborn.reason.as_deref(), Some("Error"));
    assert!(polite.finished_at.is_some() && stubborn.finished_at.is_some());
    assert_eq!(
        status.phase.as_deref(),
        Some("Failed"),
        "one container failed"
    );
    let ready = pod_condition(&pods.get("kept").await.expect("pod"), "Ready").map(|(s, _)| s);
    assert_eq!(ready.as_deref(), Some("False"));
    assert!(
        uid_containers(p.metadata.uid.as_deref().expect("uid")).is_empty(),
        "the containers are removed from Podman"
    );
    let patch = json!({"metadata": {"finalizers": null}});
    pods.patch(
        "kept",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .expect("remove the finalizer");
    wait_for("the pod gone once its finalizer is", 30, || async {
        matches!(pods.get_opt("kept").await, Ok(None)).then_some(())
    })
    .await;
}

/// The hub turns a Node Ready=Unknown itself, so the node lifecycle controller never marks its
/// pods: the hub does (Ready=False, a NodeNotReady Event) while Podman keeps running them, and
/// the device's statuses after it reconnects make them Ready again, with the same container.
#[tokio::test]
async fn pods_of_a_disconnected_device_turn_not_ready_and_ready_again_on_reconnect() {
    let mut s = Setup::start_with("unready", |h| h.disconnect_grace_secs = 3).await;
    let uid = s
        .run_pod(
            "steady",
            json!({"containers": [{"name": "app", "image": "localhost/fleetlet-test/busybox:1",
                                   "command": ["sh", "-c", "exec sleep 3600"]}]}),
        )
        .await;
    let pods = s.pods();
    let ready_since = wait_for("pod Ready=True", 60, || async {
        let (st, since) = pod_condition(&pods.get("steady").await.ok()?, "Ready")?;
        (st == "True").then_some(since)
    })
    .await;
    let before = uid_containers(&uid);
    assert!(before.len() == 1 && before[0].1 == "running", "{before:?}");
    // The agent reports its reconcile passes; the hub exports them per device.
    let passes = format!("device_reconcile_passes{{device=\"{}\"}}", s.dev);
    let seconds = format!("device_reconcile_seconds_sum{{device=\"{}\"}}", s.dev);
    let ops = s.ports.ops;
    let (n, secs) = wait_for("the device's reconcile figures on /metrics", 30, || async {
        let n = hub_metric(ops, &passes).await?;
        let secs = hub_metric(ops, &seconds).await?;
        (n > 0.0 && secs > 0.0).then_some((n, secs))
    })
    .await;
    eprintln!(
        "reconcile passes {n}, total {secs:.4} s, mean {:.2} ms",
        secs / n * 1000.0
    );

    // The agent dies (SIGKILL): its container stays with Podman.
    s.agent.take();
    let nodes: Api<Node> = Api::all(s.client.clone());
    wait_for("node Ready=Unknown (DeviceDisconnected)", 60, || async {
        let (st, reason, _) = node_condition(&nodes.get(&s.dev).await.ok()?, "Ready")?;
        (st == "Unknown" && reason == "DeviceDisconnected").then_some(())
    })
    .await;
    assert_eq!(
        hub_metric(ops, &passes).await,
        None,
        "a disconnected device's reconcile figures are dropped"
    );
    let not_ready_since = wait_for("pod Ready=False", 60, || async {
        let (st, since) = pod_condition(&pods.get("steady").await.ok()?, "Ready")?;
        (st == "False").then_some(since)
    })
    .await;
    let p = pods.get("steady").await.expect("pod");
    println!(
        "disconnected: pod Ready True (since {ready_since}) -> False (since {not_ready_since}), phase {:?}",
        p.status.as_ref().and_then(|st| st.phase.clone())
    );
    assert_eq!(
        uid_containers(&uid),
        before,
        "the device keeps running the pod"
    );
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(s.client.clone(), &s.ns);
    wait_for("a NodeNotReady event on the pod", 30, || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("NodeNotReady")
                    && e.involved_object.name.as_deref() == Some("steady")
            })
            .then_some(())
    })
    .await;

    // The agent comes back with its state: it adopts the container and reports, Ready again.
    s.agent = Some(start_agent(s.dir.path(), &s.dev, s.ports.link));
    wait_for("node Ready again", 60, || async {
        node_ready(&nodes.get(&s.dev).await.ok()?).then_some(())
    })
    .await;
    let again = wait_for("pod Ready=True again", 60, || async {
        let (st, since) = pod_condition(&pods.get("steady").await.ok()?, "Ready")?;
        (st == "True").then_some(since)
    })
    .await;
    println!("reconnected: pod Ready=True again (since {again})");
    assert_eq!(
        uid_containers(&uid),
        before,
        "same container, never a second one for the UID"
    );
    common::assert_no_forbidden(&s.hub_log());
}

/// The hub keeps only the ConfigMaps and Secrets that pods on its nodes reference
/// (`fleetlet_hub_cached_objects`), yet a referenced ConfigMap the pod brings along later is
/// fetched, and its change still reaches the device.
#[tokio::test]
async fn only_referenced_config_maps_and_secrets_are_cached_and_changes_still_reach_the_device() {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let s = Setup::start("scope").await;
    let gauge = |kind: &'static str| {
        let ops = s.ports.ops;
        async move { hub_metric(ops, &format!("cached_objects{{kind=\"{kind}\"}}")).await }
    };
    let cms: Api<ConfigMap> = Api::namespaced(s.client.clone(), &s.ns);
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    for i in 0..5 {
        let cm: ConfigMap = serde_json::from_value(
            json!({"metadata": {"name": format!("unrelated-{i}")}, "data": {"k": "x"}}),
        )
        .expect("cm");
        cms.create(&PostParams::default(), &cm).await.expect("cm");
        let sec: Secret = serde_json::from_value(
            json!({"metadata": {"name": format!("unrelated-{i}")}, "stringData": {"k": "x"}}),
        )
        .expect("secret");
        secrets
            .create(&PostParams::default(), &sec)
            .await
            .expect("secret");
    }
    // The API server holds many more (kube-root-ca.crt in every namespace, the other tests'
    // objects); the hub holds none of them.
    let all_cms = Api::<ConfigMap>::all(s.client.clone())
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .len();
    wait_for("the gauges published", 30, || async {
        (gauge("configmap").await? == 0.0 && gauge("secret").await? == 0.0).then_some(())
    })
    .await;
    println!("cluster has {all_cms} ConfigMaps; the hub caches 0 ConfigMaps and 0 Secrets");

    // A pod referencing a ConfigMap and a Secret that exist: both are cached and delivered.
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "app"}, "data": {"k": "v1"}}))
            .expect("cm");
    cms.create(&PostParams::default(), &cm).await.expect("cm");
    let sec: Secret =
        serde_json::from_value(json!({"metadata": {"name": "tok"}, "stringData": {"t": "s1"}}))
            .expect("secret");
    secrets
        .create(&PostParams::default(), &sec)
        .await
        .expect("secret");
    let uid = s
        .run_pod(
            "reader",
            json!({
                "volumes": [{"name": "cfg", "configMap": {"name": "app"}}],
                "containers": [{"name": "app", "image": "localhost/fleetlet-test/busybox:1",
                                "command": ["sh", "-c", "exec sleep 3600"],
                                "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "t"}}}],
                                "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]}]
            }),
        )
        .await;
    wait_for("one ConfigMap and one Secret cached", 30, || async {
        (gauge("configmap").await? == 1.0 && gauge("secret").await? == 1.0).then_some(())
    })
    .await;
    let file = s
        .dir
        .path()
        .join(format!("state-{}", s.dev))
        .join("pods")
        .join(&uid)
        .join("volumes/cfg/k");
    assert_eq!(std::fs::read_to_string(&file).expect("cfg file"), "v1");

    // A change of the referenced ConfigMap reaches the device.
    let mut cm = cms.get("app").await.expect("cm");
    cm.data = Some([("k".to_string(), "v2".to_string())].into_iter().collect());
    cms.replace("app", &PostParams::default(), &cm)
        .await
        .expect("update cm");
    wait_for("the device writes the new ConfigMap value", 60, || async {
        (std::fs::read_to_string(&file).ok()? == "v2").then_some(())
    })
    .await;
    // Unrelated changes do not enter the cache.
    let mut other = cms.get("unrelated-0").await.expect("cm");
    other.data = Some([("k".to_string(), "y".to_string())].into_iter().collect());
    cms.replace("unrelated-0", &PostParams::default(), &other)
        .await
        .expect("update cm");
    // Once the pod is gone, so is what it referenced.
    let (ok, out, err) = kubectl(&["-n", &s.ns, "delete", "pod", "reader", "--wait=true"]);
    assert!(ok, "{out} {err}");
    wait_for("nothing cached once the pod is gone", 60, || async {
        (gauge("configmap").await? == 0.0 && gauge("secret").await? == 0.0).then_some(())
    })
    .await;
    common::assert_no_forbidden(&s.hub_log());
}
