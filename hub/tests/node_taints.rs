//! The taints on fleetlet Nodes come from the hub's configuration: by default the provider taint
//! that keeps ordinary pods off devices; `[nodes] taints` replaces it (or, with `[]`, removes
//! it), against the real API server.

use k8s_openapi::api::core::v1::Node;
use kube::Api;

mod common;
use common::{HubSetup, HubSpec, KubeCleanup, client, unique, wait_for};

fn taints(n: &Node) -> Vec<(String, String, String)> {
    n.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.key, t.value.unwrap_or_default(), t.effect))
        .collect()
}

#[tokio::test]
async fn configured_taints_replace_the_provider_taint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = unique("it-taints");
    let device = format!("{run}-d0");
    let _cleanup = KubeCleanup {
        nodes: vec![device.clone()],
        namespace: None,
    };
    let mut spec = HubSpec::new(&run, &[(device.clone(), format!("{run}-f"))]);
    spec.node_taints =
        Some(r#"[{key = "example.com/site", value = "lab", effect = "NoSchedule"}]"#.to_string());
    let setup = HubSetup::write(dir.path(), spec);
    let hub = setup.spawn();
    let nodes: Api<Node> = Api::all(client().await);
    let got = wait_for("the Node with the configured taint", 60, || async {
        let n = nodes.get_opt(&device).await.ok().flatten()?;
        let t = taints(&n);
        (!t.is_empty()).then_some(t)
    })
    .await;
    assert!(
        got.contains(&("example.com/site".into(), "lab".into(), "NoSchedule".into())),
        "{got:?}"
    );
    assert!(
        !got.iter()
            .any(|(k, _, _)| k == "virtual-kubelet.io/provider"),
        "the provider taint is replaced: {got:?}\n{}",
        std::fs::read_to_string(setup.log()).unwrap_or_default()
    );
    hub.kill9();
}
