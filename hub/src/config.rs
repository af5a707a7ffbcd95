//! The hub's configuration: a TOML file, with a few values overridable by flags. Parsed once,
//! at the edge, into typed values; every error names the file and field.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::labels::is_valid_node_name;
use crate::quantity;

/// A configuration that cannot be used. Never retryable: the operator must fix it (exit 64).
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown/mistyped fields.
    #[error("parsing config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and what.
        source: Box<toml::de::Error>,
    },
    /// A field has a value outside what the hub can work with.
    #[error("invalid config: {field}: {reason}")]
    Invalid {
        /// Dotted field path.
        field: String,
        /// Why.
        reason: String,
    },
}

/// The whole hub configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Path of a kubeconfig; absent means in-cluster or `$KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// Operations endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub ops: OpsConfig,
    /// Where the device list comes from.
    pub inventory: InventoryConfig,
    /// Node keeping.
    pub nodes: NodesConfig,
    /// Pod relay.
    pub pods: PodsConfig,
    /// The kubelet API endpoint for `kubectl logs`.
    pub kubelet: KubeletConfig,
    /// Leader election among hub replicas.
    pub leader_election: LeaderElectionConfig,
    /// The device link server (see the link module); absent runs without one (tests).
    pub link: Option<crate::link::LinkServerConfig>,
}

/// Operations endpoint settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    /// Listen address; loopback by default.
    pub listen: SocketAddr,
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090),
        }
    }
}

/// Inventory source settings: exactly one of the sources.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct InventoryConfig {
    /// Static inventory file (`[[device]] name=.. fleet=.. labels={..}`).
    pub static_file: Option<PathBuf>,
    /// Flightctl as the system of record (`[inventory.flightctl]`).
    pub flightctl: Option<crate::inventory::flightctl::FlightctlConfig>,
}

/// Node keeping settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodesConfig {
    /// How long a device may be disconnected before its Node turns Ready=Unknown.
    pub disconnect_grace_secs: u64,
    /// Node lease duration (kubelet: 40 s).
    pub lease_duration_secs: u32,
    /// Lease renew interval (kubelet: 10 s).
    pub lease_renew_secs: u64,
    /// Node status is re-applied at least this often even when unchanged (kubelet: 5 min).
    pub status_refresh_secs: u64,
    /// Capacity assumed before a device's first report.
    pub default_capacity: BTreeMap<String, String>,
    /// kubeletVersion shown for fleetlet nodes.
    pub kubelet_version: String,
    /// Parallel API requests while reconciling nodes.
    pub concurrency: usize,
    /// Value of the `fleetlet.io/managed-by` label on this hub's Nodes: a hub only ever deletes
    /// Nodes carrying its own value, so separate hub deployments can share a cluster.
    pub instance: String,
    /// Taints on every fleetlet Node. Default: `virtual-kubelet.io/provider=fleetlet:NoSchedule`,
    /// which keeps pods that do not ask for a device off devices. `[]` puts none (for clusters
    /// where a mutating policy adds the tolerations, or that want every pod eligible).
    pub taints: Vec<NodeTaint>,
    /// Device label whose value becomes the Node's `topology.kubernetes.io/zone` ("" for none).
    /// The node lifecycle controller counts disruption per zone: with one zone per site, one
    /// site's outage does not pause taint-based eviction on every other site, and a whole
    /// site going dark is evicted at the normal rate while others are healthy.
    pub zone_label: String,
    /// Device label whose value becomes the Node's `topology.kubernetes.io/region` ("" for none).
    pub region_label: String,
}

/// A taint the hub puts on its Nodes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTaint {
    /// Key.
    pub key: String,
    /// Value (may be empty).
    #[serde(default)]
    pub value: String,
    /// NoSchedule, PreferNoSchedule or NoExecute.
    pub effect: String,
}

impl Default for NodesConfig {
    fn default() -> Self {
        Self {
            disconnect_grace_secs: 20,
            lease_duration_secs: 40,
            lease_renew_secs: 10,
            status_refresh_secs: 300,
            default_capacity: [
                ("cpu", "1"),
                ("memory", "1Gi"),
                ("pods", "110"),
                ("ephemeral-storage", "10Gi"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            kubelet_version: "v1.36.0-fleetlet".to_string(),
            concurrency: 16,
            instance: "fleetlet-hub".to_string(),
            taints: vec![NodeTaint {
                key: crate::nodes::object::PROVIDER_TAINT_KEY.to_string(),
                value: crate::nodes::object::PROVIDER_TAINT_VALUE.to_string(),
                effect: "NoSchedule".to_string(),
            }],
            zone_label: String::new(),
            region_label: String::new(),
        }
    }
}

/// Pod relay settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PodsConfig {
    /// Changes to a device's pods within this window go out as one snapshot.
    pub debounce_ms: u64,
    /// Sustained pod status writes per second.
    pub status_qps: f64,
    /// Status writes allowed in a burst.
    pub status_burst: u32,
    /// Sustained writes per second of the Events devices report about their pods, all devices
    /// together (creates and series updates).
    pub event_qps: f64,
    /// Event writes allowed in a burst.
    pub event_burst: u32,
    /// Largest bundle (spec plus ConfigMap and Secret data) of one pod, in bytes; a larger pod
    /// fails with `PodBundleTooLarge` instead of making its device's snapshot unsendable.
    pub max_pod_bundle_bytes: usize,
    /// Largest sum of one device's bundles, in bytes; pods that would go over it (newest
    /// first) fail with `PodBundleTooLarge`. Must stay below the link's message limit.
    pub max_snapshot_bytes: usize,
    /// Address ranges (CIDR) devices may report as their pods' `podIP`/`hostIP`: the devices'
    /// own networks and their pods' bridge networks. Empty (the default) accepts any unicast
    /// address; set it so a compromised device cannot point its pods' Service endpoints at an
    /// address outside them.
    pub device_ip_ranges: Vec<String>,
}

impl Default for PodsConfig {
    fn default() -> Self {
        Self {
            debounce_ms: 20,
            status_qps: 50.0,
            status_burst: 100,
            event_qps: 20.0,
            event_burst: 100,
            max_pod_bundle_bytes: 8 * 1024 * 1024,
            max_snapshot_bytes: 14 * 1024 * 1024,
            device_ip_ranges: Vec::new(),
        }
    }
}

impl PodsConfig {
    /// The parsed `device_ip_ranges`; the error names the bad entry.
    pub fn ip_ranges(&self) -> Result<Vec<crate::pods::sanitize::IpRange>, String> {
        self.device_ip_ranges
            .iter()
            .map(|r| crate::pods::sanitize::IpRange::parse(r))
            .collect()
    }

    /// The bundle limits the relay applies.
    pub fn bundle_limits(&self) -> crate::pods::refusal::BundleLimits {
        crate::pods::refusal::BundleLimits {
            per_pod: self.max_pod_bundle_bytes,
            per_snapshot: self.max_snapshot_bytes,
        }
    }
}

/// kubelet API endpoint settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubeletConfig {
    /// Listen address of the HTTPS endpoint; none disables it.
    pub listen: Option<SocketAddr>,
    /// Address written into every Node's InternalIP (how the API server reaches the hub).
    pub advertise_address: IpAddr,
    /// Port written into every Node's daemonEndpoints; defaults to the listen port.
    pub advertise_port: Option<u16>,
    /// Serving certificate (PEM).
    pub cert_file: Option<PathBuf>,
    /// Serving key (PEM).
    pub key_file: Option<PathBuf>,
    /// CA that signs client certificates (the cluster CA, which signs the API server's
    /// kubelet client certificate).
    pub client_ca_file: Option<PathBuf>,
    /// Ports (`"10300-10999"`) from which each fleetlet Node gets a kubelet port of its own,
    /// published in its daemonEndpoints and listened on at the listen address's IP: how
    /// `/stats/summary`, `/metrics/resource`, `/pods` and `/runningpods/` (which name no node)
    /// reach the right device. Absent: every Node advertises the shared port, which serves
    /// `/containerLogs` only. At most 4096 ports; a Node that finds none free is reported and
    /// advertises the shared port.
    pub node_ports: Option<crate::kubelet_api::ports::PortRange>,
    /// `kubectl exec`/`attach`/`port-forward` connections open at once per device (each
    /// port-forward connection counts); more are refused with a message saying so.
    pub max_streams_per_device: usize,
}

impl Default for KubeletConfig {
    fn default() -> Self {
        Self {
            listen: None,
            advertise_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            advertise_port: None,
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            node_ports: None,
            max_streams_per_device: 16,
        }
    }
}

impl KubeletConfig {
    /// The port Nodes advertise.
    pub fn port(&self) -> u16 {
        self.advertise_port
            .or(self.listen.map(|l| l.port()))
            .unwrap_or(10250)
    }
}

/// Leader election settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaderElectionConfig {
    /// Off for a single replica.
    pub enabled: bool,
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity; defaults to hostname + pid.
    pub identity: Option<String>,
    /// How long a leader's claim lasts without renewal.
    pub lease_duration_secs: u32,
    /// How often the leader renews and a standby retries.
    pub retry_secs: u64,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            namespace: "kube-system".to_string(),
            name: "fleetlet-hub".to_string(),
            identity: None,
            lease_duration_secs: 15,
            retry_secs: 2,
        }
    }
}

/// Flag overrides applied on top of the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `--ops-listen`.
    pub ops_listen: Option<SocketAddr>,
    /// `--inventory-file`.
    pub inventory_file: Option<PathBuf>,
    /// `--kubelet-listen`.
    pub kubelet_listen: Option<SocketAddr>,
    /// `--kubelet-advertise-address`.
    pub kubelet_advertise_address: Option<IpAddr>,
    /// `--leader-elect`.
    pub leader_elect: Option<bool>,
    /// `--identity`.
    pub identity: Option<String>,
}

impl HubConfig {
    /// Reads the file (if any), applies flag overrides and validates the result.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut cfg = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Self::parse(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_path_buf(),
                    source: Box::new(source),
                })?
            }
            None => Self::default(),
        };
        cfg.apply(overrides);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text (no validation).
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.kubeconfig {
            self.kubeconfig = Some(v.clone());
        }
        if let Some(v) = o.ops_listen {
            self.ops.listen = v;
        }
        if let Some(v) = &o.inventory_file {
            self.inventory.static_file = Some(v.clone());
        }
        if let Some(v) = o.kubelet_listen {
            self.kubelet.listen = Some(v);
        }
        if let Some(v) = o.kubelet_advertise_address {
            self.kubelet.advertise_address = v;
        }
        if let Some(v) = o.leader_elect {
            self.leader_election.enabled = v;
        }
        if let Some(v) = &o.identity {
            self.leader_election.identity = Some(v.clone());
        }
    }

    /// Checks every value the hub relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            field: field.to_string(),
            reason,
        };
        if let Some(link) = &self.link {
            link.device_budget
                .check()
                .map_err(|reason| invalid("link.device_budget", reason))?;
        }
        let n = &self.nodes;
        for (i, t) in n.taints.iter().enumerate() {
            if !matches!(
                t.effect.as_str(),
                "NoSchedule" | "PreferNoSchedule" | "NoExecute"
            ) {
                return Err(invalid(
                    &format!("nodes.taints[{i}].effect"),
                    format!(
                        "{:?} is not NoSchedule, PreferNoSchedule or NoExecute",
                        t.effect
                    ),
                ));
            }
            let key_ok = !t.key.is_empty()
                && t.key.len() <= 316
                && t.key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
            if !key_ok {
                return Err(invalid(
                    &format!("nodes.taints[{i}].key"),
                    format!("{:?} is not a valid taint key", t.key),
                ));
            }
        }
        if n.lease_duration_secs == 0 || n.lease_renew_secs == 0 {
            return Err(invalid(
                "nodes.lease_*",
                "lease duration and renew interval must be positive".into(),
            ));
        }
        if n.lease_renew_secs >= u64::from(n.lease_duration_secs) {
            return Err(invalid(
                "nodes.lease_renew_secs",
                format!(
                    "{} must be shorter than lease_duration_secs {}",
                    n.lease_renew_secs, n.lease_duration_secs
                ),
            ));
        }
        if n.status_refresh_secs == 0 {
            return Err(invalid(
                "nodes.status_refresh_secs",
                "must be positive".into(),
            ));
        }
        if n.instance.is_empty() || !crate::labels::is_valid_value(&n.instance) {
            return Err(invalid(
                "nodes.instance",
                format!("{:?} is not a valid label value", n.instance),
            ));
        }
        if n.concurrency == 0 {
            return Err(invalid("nodes.concurrency", "must be positive".into()));
        }
        for (k, v) in &n.default_capacity {
            quantity::parse_milli(v)
                .map_err(|e| invalid(&format!("nodes.default_capacity.{k}"), e.to_string()))?;
        }
        let p = &self.pods;
        if !(p.status_qps.is_finite() && p.status_qps > 0.0) {
            return Err(invalid(
                "pods.status_qps",
                format!("{} is not a positive rate", p.status_qps),
            ));
        }
        if p.status_burst == 0 {
            return Err(invalid("pods.status_burst", "must be positive".into()));
        }
        if !(p.event_qps.is_finite() && p.event_qps > 0.0) {
            return Err(invalid(
                "pods.event_qps",
                format!("{} is not a positive rate", p.event_qps),
            ));
        }
        if p.event_burst == 0 {
            return Err(invalid("pods.event_burst", "must be positive".into()));
        }
        p.ip_ranges()
            .map_err(|reason| invalid("pods.device_ip_ranges", reason))?;
        // Room for the snapshot's own framing and the termination graces next to the bundles.
        let link_room = fleetlet_proto::MAX_MESSAGE_BYTES - 256 * 1024;
        if p.max_snapshot_bytes == 0 || p.max_snapshot_bytes > link_room {
            return Err(invalid(
                "pods.max_snapshot_bytes",
                format!(
                    "{} must be positive and at most {link_room} (the link's message limit of {} bytes, less room for framing)",
                    p.max_snapshot_bytes,
                    fleetlet_proto::MAX_MESSAGE_BYTES
                ),
            ));
        }
        if p.max_pod_bundle_bytes == 0 || p.max_pod_bundle_bytes > p.max_snapshot_bytes {
            return Err(invalid(
                "pods.max_pod_bundle_bytes",
                format!(
                    "{} must be positive and at most pods.max_snapshot_bytes ({})",
                    p.max_pod_bundle_bytes, p.max_snapshot_bytes
                ),
            ));
        }
        let k = &self.kubelet;
        if k.listen.is_some() && (k.cert_file.is_none() || k.key_file.is_none()) {
            return Err(invalid(
                "kubelet",
                "listen requires cert_file and key_file".into(),
            ));
        }
        if let Some(range) = k.node_ports {
            let Some(listen) = k.listen else {
                return Err(invalid(
                    "kubelet.node_ports",
                    "needs kubelet.listen (the address the Nodes' ports are opened on)".into(),
                ));
            };
            for (what, port) in [
                ("listen", Some(listen.port())),
                ("advertise_port", k.advertise_port),
            ] {
                if let Some(port) = port.filter(|p| range.contains(*p)) {
                    return Err(invalid(
                        "kubelet.node_ports",
                        format!(
                            "{}-{} holds kubelet.{what}'s port {port}",
                            range.first, range.last
                        ),
                    ));
                }
            }
        }
        let l = &self.leader_election;
        if l.enabled {
            if l.lease_duration_secs == 0
                || l.retry_secs == 0
                || l.retry_secs >= u64::from(l.lease_duration_secs)
            {
                return Err(invalid(
                    "leader_election",
                    "retry_secs must be positive and shorter than lease_duration_secs".into(),
                ));
            }
            if l.namespace.is_empty() || !is_valid_node_name(&l.name) {
                return Err(invalid(
                    "leader_election.name",
                    format!("{:?} is not a valid Lease name", l.name),
                ));
            }
        }
        match (&self.inventory.static_file, &self.inventory.flightctl) {
            (None, None) => {
                return Err(invalid(
                    "inventory",
                    "an inventory source is required: static_file or [inventory.flightctl]".into(),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "inventory",
                    "static_file and flightctl are exclusive".into(),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// Debounce window as a duration.
    pub fn debounce(&self) -> Duration {
        Duration::from_millis(self.pods.debounce_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses_and_validates() {
        let cfg = HubConfig::parse(
            r#"
            kubeconfig = "/etc/kube/config"
            [ops]
            listen = "127.0.0.1:9100"
            [inventory]
            static_file = "/etc/fleetlet/devices.toml"
            [nodes]
            disconnect_grace_secs = 5
            default_capacity = { cpu = "2", memory = "2Gi", pods = "20" }
            [pods]
            status_qps = 20.0
            [kubelet]
            listen = "127.0.0.1:10250"
            advertise_address = "127.0.0.1"
            cert_file = "/pki/kubelet.crt"
            key_file = "/pki/kubelet.key"
            client_ca_file = "/pki/ca.crt"
            [leader_election]
            enabled = true
            namespace = "fleetlet"
            [link]
            listen = "0.0.0.0:7443"
            client_ca_file = "/pki/devices-ca.crt"
            cert_file = "/pki/hub.crt"
            key_file = "/pki/hub.key"
            "#,
        )
        .expect("parses");
        cfg.validate().expect("valid");
        assert_eq!(cfg.nodes.disconnect_grace_secs, 5);
        assert_eq!(cfg.nodes.lease_duration_secs, 40);
        assert_eq!(cfg.kubelet.port(), 10250);
        assert!(cfg.link.is_some());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = HubConfig::parse("[nodes]\ndisconect_grace_secs = 5\n").expect_err("typo");
        assert!(err.to_string().contains("disconect_grace_secs"), "{err}");
    }

    #[test]
    fn node_taints_are_configurable_and_checked() {
        let none = HubConfig::parse("[nodes]\ntaints = []\n").expect("no taints");
        assert!(none.nodes.taints.is_empty());
        assert_eq!(
            HubConfig::default().nodes.taints.len(),
            1,
            "the provider taint by default"
        );
        let mut cfg = HubConfig::parse(
            "[inventory]\nstatic_file = \"/x\"\n[nodes]\ntaints = [{key = \"example.com/edge\", effect = \"NoExecute\"}]\n",
        )
        .expect("a taint");
        cfg.validate().expect("valid");
        cfg.nodes.taints[0].effect = "Sometimes".into();
        let err = cfg.validate().expect_err("bad effect").to_string();
        assert!(err.contains("nodes.taints[0].effect"), "{err}");
    }

    #[test]
    fn node_ports_parse_and_are_checked() {
        let base =
            "[inventory]\nstatic_file = \"/x\"\n[kubelet]\ncert_file = \"/c\"\nkey_file = \"/k\"\n";
        let cfg = HubConfig::parse(&format!(
            "{base}listen = \"127.0.0.1:10250\"\nnode_ports = \"10300-10999\"\n"
        ))
        .expect("parses");
        cfg.validate().expect("valid");
        assert_eq!(cfg.kubelet.node_ports.map(|r| r.len()), Some(700));
        let err = HubConfig::parse(&format!("{base}node_ports = \"10999-10300\"\n"))
            .expect_err("reversed")
            .to_string();
        assert!(err.contains("node_ports") || err.contains("above"), "{err}");
        let err = HubConfig::parse(&format!("{base}node_ports = \"10300-10400\"\n"))
            .expect("parses")
            .validate()
            .expect_err("no listen")
            .to_string();
        assert!(
            err.contains("kubelet.node_ports") && err.contains("listen"),
            "{err}"
        );
        let err = HubConfig::parse(&format!(
            "{base}listen = \"127.0.0.1:10350\"\nnode_ports = \"10300-10400\"\n"
        ))
        .expect("parses")
        .validate()
        .expect_err("overlap")
        .to_string();
        assert!(err.contains("10350"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_field() {
        let mut cfg = HubConfig::default();
        cfg.inventory.static_file = Some("/x".into());
        cfg.validate().expect("defaults are valid");
        cfg.nodes.lease_renew_secs = 40;
        let err = cfg.validate().expect_err("renew >= duration").to_string();
        assert!(err.contains("nodes.lease_renew_secs"), "{err}");
        let mut cfg2 = HubConfig::default();
        cfg2.inventory.static_file = Some("/x".into());
        cfg2.nodes
            .default_capacity
            .insert("cpu".into(), "lots".into());
        let err = cfg2.validate().expect_err("bad quantity").to_string();
        assert!(err.contains("nodes.default_capacity.cpu"), "{err}");
    }

    #[test]
    fn exactly_one_inventory_source() {
        let cfg = HubConfig::parse(
            "[inventory.flightctl]\napi_url = \"https://127.0.0.1:3443\"\nca_file = \"/pki/ca.crt\"\n",
        )
        .expect("parses");
        cfg.validate().expect("flightctl alone is a source");
        let mut both = cfg.clone();
        both.inventory.static_file = Some("/x".into());
        let err = both.validate().expect_err("two sources").to_string();
        assert!(err.contains("exclusive"), "{err}");
        let none = HubConfig::default()
            .validate()
            .expect_err("no source")
            .to_string();
        assert!(none.contains("inventory"), "{none}");
    }

    #[test]
    fn overrides_win_over_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.toml");
        std::fs::write(
            &path,
            "[inventory]\nstatic_file = \"/a\"\n[ops]\nlisten = \"127.0.0.1:1\"\n",
        )
        .expect("write");
        let o = Overrides {
            ops_listen: Some("127.0.0.1:2".parse().expect("addr")),
            inventory_file: Some("/b".into()),
            kubelet_advertise_address: Some("10.1.2.3".parse().expect("ip")),
            ..Overrides::default()
        };
        let cfg = HubConfig::load(Some(&path), &o).expect("loads");
        assert_eq!(cfg.ops.listen.port(), 2);
        assert_eq!(cfg.kubelet.advertise_address.to_string(), "10.1.2.3");
        assert_eq!(cfg.inventory.static_file.as_deref(), Some(Path::new("/b")));
        let missing =
            HubConfig::load(Some(&dir.path().join("nope.toml")), &o).expect_err("missing");
        assert!(matches!(missing, ConfigError::Read { .. }));
    }
}
