//! The configuration shipped in packaging/kubernetes must be one the hub accepts: a typo there
//! would only show when an operator installs it.

use fleetlet_hub::config::HubConfig;

/// The literal block `key: |` of the ConfigMap, without its indentation.
fn configmap_block(yaml: &str, key: &str) -> String {
    let header = format!("  {key}: |");
    let mut lines = yaml.lines().skip_while(|l| l.trim_end() != header).skip(1);
    let mut block = String::new();
    for line in lines.by_ref() {
        if !line.is_empty() && !line.starts_with("    ") {
            break;
        }
        block.push_str(line.strip_prefix("    ").unwrap_or(""));
        block.push('\n');
    }
    block
}

#[test]
fn shipped_hub_config_parses_and_validates() {
    let yaml = include_str!("../../packaging/kubernetes/20-config.yaml");
    let text = configmap_block(yaml, "hub.toml");
    assert!(text.contains("[link]"), "hub.toml block not found:\n{text}");
    let cfg = HubConfig::parse(&text).expect("shipped hub.toml parses");
    cfg.validate().expect("shipped hub.toml validates");
    assert!(
        cfg.leader_election.enabled,
        "two replicas need leader election"
    );
    assert!(
        cfg.inventory.flightctl.is_some() && cfg.inventory.static_file.is_none(),
        "Flightctl is the default inventory"
    );
    let link = cfg.link.expect("[link]");
    assert_eq!(
        link.identity_prefix, "fleetlet-",
        "Flightctl-issued device certificates carry CN fleetlet-<device>"
    );
    assert!(
        link.require_device_fingerprint,
        "Flightctl-issued certificates carry the device fingerprint; the hub checks it"
    );
}

#[test]
fn shipped_inventory_parses() {
    let yaml = include_str!("../../packaging/kubernetes/20-config.yaml");
    let text = configmap_block(yaml, "devices.toml");
    let parsed: toml::Value = toml::from_str(&text).expect("devices.toml is TOML");
    assert!(parsed.get("device").is_none(), "ships with no devices");
}

#[test]
fn the_flightctl_inventory_never_gets_the_hubs_kubernetes_token() {
    let yaml = include_str!("../../packaging/kubernetes/20-config.yaml");
    let cfg = HubConfig::parse(&configmap_block(yaml, "hub.toml")).expect("parses");
    let token = cfg
        .inventory
        .flightctl
        .and_then(|f| f.token_file)
        .expect("a Flightctl token file");
    assert!(
        !token.starts_with("/var/run/secrets/kubernetes.io/serviceaccount"),
        "the hub's own ServiceAccount token would reach Flightctl: {}",
        token.display()
    );
    let deployment = include_str!("../../packaging/kubernetes/40-deployment.yaml");
    assert!(deployment.contains("mountPath: /etc/fleetlet/flightctl-token"));
    assert!(deployment.contains("secretName: fleetlet-hub-flightctl-token"));
    assert!(token.starts_with("/etc/fleetlet/flightctl-token/"));
    let rbac = include_str!("../../packaging/kubernetes/flightctl/hub-rbac.yaml");
    assert!(rbac.contains("name: fleetlet-hub-flightctl\n"), "{rbac}");
}
