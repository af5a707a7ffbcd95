//! Smoke tests of the local stack (`make env-up`): each proves one real component works the way
//! fleetlet's integration tests rely on.

use std::collections::BTreeMap;
use std::time::Duration;

use fleetlet_test_support::{DEFAULT_TIMEOUT, Stack, wait_for};
use http::Method;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, ReplicaSet};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::{
    Container, Namespace, Node, NodeCondition, NodeSpec, NodeStatus, Pod, PodSpec, PodTemplateSpec,
    ServiceAccount, Taint, Toleration,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};

fn stack() -> &'static Stack {
    Stack::shared().expect("the local stack is up (make env-up)")
}

/// A name unique to this test process and call.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        ..ObjectMeta::default()
    }
}

/// A fresh namespace, usable once the controller-manager made its default ServiceAccount.
async fn namespace(client: &Client, prefix: &str) -> String {
    let name = unique(prefix);
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta(&name),
                ..Namespace::default()
            },
        )
        .await
        .expect("create namespace");
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
    wait_for(
        "the namespace's default ServiceAccount",
        DEFAULT_TIMEOUT,
        || async { accounts.get_opt("default").await.ok().flatten().is_some() },
    )
    .await
    .expect("controller-manager creates the default ServiceAccount");
    name
}

async fn delete_namespace(client: &Client, name: &str) {
    Api::<Namespace>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete namespace");
}

#[tokio::test]
async fn apiserver_is_ready_and_admin_is_cluster_admin() {
    let stack = stack();
    let _logs = stack.logs_on_failure();
    let client = stack.admin_client().await.expect("admin client");
    let readyz = client
        .request_text(
            http::Request::get("/readyz")
                .body(Vec::new())
                .expect("request"),
        )
        .await
        .expect("GET /readyz");
    assert_eq!(readyz, "ok");
    let review = Api::<SelfSubjectReview>::all(client)
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview");
    let groups = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.groups)
        .unwrap_or_default();
    assert!(groups.iter().any(|g| g == "system:masters"), "{groups:?}");
}

#[tokio::test]
async fn service_account_token_is_authenticated_and_authorized_by_rbac() {
    let stack = stack();
    let _logs = stack.logs_on_failure();
    let admin = stack.admin_client().await.expect("admin client");
    let ns = namespace(&admin, "smoke-sa").await;
    let client = stack
        .service_account_client(&ns, "reader")
        .await
        .expect("ServiceAccount client");

    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview as the ServiceAccount");
    let user = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .unwrap_or_default();
    assert_eq!(user, format!("system:serviceaccount:{ns}:reader"));

    let pods: Api<Pod> = Api::namespaced(client, &ns);
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("a ServiceAccount without a Role must be denied, got {other:?}"),
    }

    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(
            &PostParams::default(),
            &Role {
                metadata: meta("pod-reader"),
                rules: Some(vec![PolicyRule {
                    api_groups: Some(vec![String::new()]),
                    resources: Some(vec!["pods".into()]),
                    verbs: vec!["list".into()],
                    ..PolicyRule::default()
                }]),
            },
        )
        .await
        .expect("create Role");
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: meta("reader-reads-pods"),
                role_ref: RoleRef {
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    kind: "Role".into(),
                    name: "pod-reader".into(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: "reader".into(),
                    namespace: Some(ns.clone()),
                    ..Subject::default()
                }]),
            },
        )
        .await
        .expect("create RoleBinding");
    wait_for(
        "the RoleBinding to allow listing pods",
        DEFAULT_TIMEOUT,
        || async { pods.list(&ListParams::default()).await.is_ok() },
    )
    .await
    .expect("RBAC grants the bound Role");
    delete_namespace(&admin, &ns).await;
}

#[tokio::test]
async fn scheduler_binds_a_pod_to_a_matching_node() {
    let stack = stack();
    let _logs = stack.logs_on_failure();
    let admin = stack.admin_client().await.expect("admin client");
    let ns = namespace(&admin, "smoke-sched").await;
    let node_name = unique("smoke-node");
    let nodes: Api<Node> = Api::all(admin.clone());
    let taint_key = "fleetlet.test/smoke";

    // A node as a kubelet (here: the hub) would register it: labelled, tainted so that only
    // this test's pod tolerates it, then Ready with capacity through the status subresource.
    nodes
        .create(
            &PostParams::default(),
            &Node {
                metadata: ObjectMeta {
                    name: Some(node_name.clone()),
                    labels: Some(BTreeMap::from([(taint_key.to_string(), node_name.clone())])),
                    ..ObjectMeta::default()
                },
                spec: Some(NodeSpec {
                    taints: Some(vec![Taint {
                        key: taint_key.into(),
                        value: Some(node_name.clone()),
                        effect: "NoSchedule".into(),
                        ..Taint::default()
                    }]),
                    ..NodeSpec::default()
                }),
                ..Node::default()
            },
        )
        .await
        .expect("create Node");
    let capacity = BTreeMap::from([
        ("cpu".to_string(), Quantity("2".into())),
        ("memory".to_string(), Quantity("2Gi".into())),
        ("pods".to_string(), Quantity("10".into())),
    ]);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = Node {
        status: Some(NodeStatus {
            capacity: Some(capacity.clone()),
            allocatable: Some(capacity),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: Some("SmokeTest".into()),
                last_heartbeat_time: Some(now.clone()),
                last_transition_time: Some(now),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        }),
        ..Node::default()
    };
    nodes
        .patch_status(&node_name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("set Node status");

    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &Pod {
            metadata: meta("bind-me"),
            spec: Some(PodSpec {
                node_selector: Some(BTreeMap::from([(taint_key.to_string(), node_name.clone())])),
                tolerations: Some(vec![Toleration {
                    key: Some(taint_key.into()),
                    operator: Some("Equal".into()),
                    value: Some(node_name.clone()),
                    effect: Some("NoSchedule".into()),
                    ..Toleration::default()
                }]),
                containers: vec![Container {
                    name: "main".into(),
                    image: Some(stack.test_image().into()),
                    command: Some(vec!["sleep".into(), "3600".into()]),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            ..Pod::default()
        },
    )
    .await
    .expect("create Pod");

    let bound = wait_for("the scheduler to bind the pod", DEFAULT_TIMEOUT, || async {
        pods.get("bind-me")
            .await
            .ok()
            .and_then(|p| p.spec)
            .and_then(|s| s.node_name)
    })
    .await
    .expect("pod is bound");
    assert_eq!(bound, node_name);

    // No kubelet runs, so the pod is removed at once rather than gracefully.
    pods.delete("bind-me", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete Pod");
    nodes
        .delete(&node_name, &DeleteParams::default())
        .await
        .expect("delete Node");
    delete_namespace(&admin, &ns).await;
}

#[tokio::test]
async fn deployment_controller_creates_replicaset_and_pods() {
    let stack = stack();
    let _logs = stack.logs_on_failure();
    let admin = stack.admin_client().await.expect("admin client");
    let ns = namespace(&admin, "smoke-deploy").await;
    let labels = BTreeMap::from([("app".to_string(), "smoke".to_string())]);
    Api::<Deployment>::namespaced(admin.clone(), &ns)
        .create(
            &PostParams::default(),
            &Deployment {
                metadata: meta("smoke"),
                spec: Some(DeploymentSpec {
                    replicas: Some(2),
                    selector: LabelSelector {
                        match_labels: Some(labels.clone()),
                        ..LabelSelector::default()
                    },
                    template: PodTemplateSpec {
                        metadata: Some(ObjectMeta {
                            labels: Some(labels),
                            ..ObjectMeta::default()
                        }),
                        spec: Some(PodSpec {
                            // No node matches: the pods stay Pending, nothing runs them.
                            node_selector: Some(BTreeMap::from([(
                                "fleetlet.test/none".to_string(),
                                "none".to_string(),
                            )])),
                            containers: vec![Container {
                                name: "main".into(),
                                image: Some(stack.test_image().into()),
                                ..Container::default()
                            }],
                            ..PodSpec::default()
                        }),
                    },
                    ..DeploymentSpec::default()
                }),
                ..Deployment::default()
            },
        )
        .await
        .expect("create Deployment");

    let sets: Api<ReplicaSet> = Api::namespaced(admin.clone(), &ns);
    let set = wait_for("the Deployment's ReplicaSet", DEFAULT_TIMEOUT, || async {
        sets.list(&ListParams::default().labels("app=smoke"))
            .await
            .ok()
            .and_then(|l| l.items.into_iter().next())
    })
    .await
    .expect("deployment controller creates a ReplicaSet");
    let owner = set
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .map(|o| (o.kind, o.name))
        .collect::<Vec<_>>();
    assert_eq!(owner, vec![("Deployment".to_string(), "smoke".to_string())]);

    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let count = wait_for("two pods of the ReplicaSet", DEFAULT_TIMEOUT, || async {
        let n = pods
            .list(&ListParams::default().labels("app=smoke"))
            .await
            .map(|l| l.items.len())
            .unwrap_or(0);
        (n == 2).then_some(n)
    })
    .await
    .expect("replicaset controller creates the pods");
    assert_eq!(count, 2);
    delete_namespace(&admin, &ns).await;
}

/// Runs `command` in a container of the test image (no network) and returns its exit code.
async fn run_in_podman(stack: &Stack, name: &str, command: &[&str]) -> i64 {
    let podman = stack.podman();
    let created = podman
        .json(
            Method::POST,
            "/libpod/containers/create",
            Some(&serde_json::json!({
                "name": name,
                "image": stack.test_image(),
                "command": command,
                "netns": { "nsmode": "none" },
            })),
        )
        .await
        .expect("create container");
    let id = created["Id"].as_str().expect("container id").to_string();
    podman
        .json(
            Method::POST,
            &format!("/libpod/containers/{id}/start"),
            None,
        )
        .await
        .expect("start container");
    let code = podman
        .json(
            Method::POST,
            &format!("/libpod/containers/{id}/wait?condition=exited"),
            None,
        )
        .await
        .expect("wait for container");
    podman
        .json(
            Method::DELETE,
            &format!("/libpod/containers/{id}?force=true"),
            None,
        )
        .await
        .expect("remove container");
    code.as_i64().expect("exit code is a number")
}

#[tokio::test]
async fn podman_runs_the_test_image() {
    let stack = stack();
    let _logs = stack.logs_on_failure();
    assert!(stack.podman().ping().await.expect("ping Podman"));
    let ok = run_in_podman(
        stack,
        &unique("smoke-ok"),
        &[
            "sh",
            "-c",
            "test -x /bin/busybox && [ \"$(ulimit -n)\" = 1024 ]",
        ],
    )
    .await;
    assert_eq!(
        ok, 0,
        "busybox present and the configured nofile ulimit applied"
    );
    let failed = run_in_podman(stack, &unique("smoke-exit"), &["sh", "-c", "exit 3"]).await;
    assert_eq!(failed, 3, "Podman reports the container's real exit code");
}

#[tokio::test]
async fn journald_line_is_read_back() {
    let stack = stack();
    let _logs = stack.logs_on_failure();
    let tag = unique("fleetlet-smoke");
    let line = format!("smoke line for {tag}");
    let mut cat = tokio::process::Command::new("systemd-cat")
        .args(["-t", &tag])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run systemd-cat");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = cat.stdin.take().expect("stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write");
    }
    assert!(cat.wait().await.expect("systemd-cat exits").success());
    let read = wait_for(
        "journalctl to show the line",
        Duration::from_secs(20),
        || async {
            let out = tokio::process::Command::new("journalctl")
                .args(["-t", &tag, "-o", "cat", "--no-pager"])
                .output()
                .await
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.lines().any(|l| l == line).then_some(text)
        },
    )
    .await
    .expect("journald stores the line");
    assert_eq!(read.trim(), line);
}
