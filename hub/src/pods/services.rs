//! Service environment variables, as the kubelet sets them: for every Service with a cluster IP
//! in the pod's namespace (when `enableServiceLinks` is not false) and for the `kubernetes`
//! Service of the `default` namespace (always), `{NAME}_SERVICE_HOST`, `{NAME}_SERVICE_PORT`,
//! `{NAME}_SERVICE_PORT_{PORT_NAME}` and the Docker-link style `{NAME}_PORT*` variables.
//!
//! The hub keeps the few fields these need of every Service (one cluster-wide watch, trimmed on
//! the way in) and sends each pod's variables in its bundle; the agent puts them under the
//! container's own (envFrom and env win, and `$(VAR)` may refer to them). Like the kubelet's,
//! they are what the Services were when the container is created: a Service changing later does
//! not re-send or restart anything. They name cluster IPs, which a device reaches only if its
//! network routes them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::watcher;

/// The namespace and name of the Service every pod gets variables for, as on a kubelet.
const MASTER_SERVICE: (&str, &str) = ("default", "kubernetes");

/// What the variables need of one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAddress {
    /// Its cluster IP (set: not empty, not `None`).
    pub cluster_ip: String,
    /// (name, port, protocol) of each of its ports, in order.
    pub ports: Vec<(String, i32, String)>,
}

impl ServiceAddress {
    /// The fields of `svc` the variables need; `None` for a Service without a cluster IP
    /// (headless, ExternalName) or without ports, which get no variables.
    pub fn of(svc: &Service) -> Option<Self> {
        let spec = svc.spec.as_ref()?;
        let ip = spec
            .cluster_ip
            .clone()
            .filter(|ip| !ip.is_empty() && ip != "None")?;
        let ports: Vec<_> = spec
            .ports
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.clone().unwrap_or_default(),
                    p.port,
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                )
            })
            .collect();
        if ports.is_empty() {
            return None;
        }
        Some(Self {
            cluster_ip: ip,
            ports,
        })
    }
}

/// The Services of the cluster, by (namespace, name), as far as the variables need them.
#[derive(Debug, Default)]
pub struct Services {
    items: BTreeMap<(String, String), ServiceAddress>,
    relist: Option<BTreeMap<(String, String), ServiceAddress>>,
    /// The first list is complete.
    pub synced: bool,
}

impl Services {
    /// Folds one watch event.
    pub fn apply(&mut self, ev: watcher::Event<Service>) {
        let key = |s: &Service| {
            (
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default(),
            )
        };
        match ev {
            watcher::Event::Init => self.relist = Some(BTreeMap::new()),
            watcher::Event::InitApply(s) => {
                if let (Some(r), Some(a)) = (self.relist.as_mut(), ServiceAddress::of(&s)) {
                    r.insert(key(&s), a);
                }
            }
            watcher::Event::InitDone => {
                if let Some(r) = self.relist.take() {
                    self.items = r;
                    self.synced = true;
                }
            }
            watcher::Event::Apply(s) => match ServiceAddress::of(&s) {
                Some(a) => {
                    self.items.insert(key(&s), a);
                }
                None => {
                    self.items.remove(&key(&s));
                }
            },
            watcher::Event::Delete(s) => {
                self.items.remove(&key(&s));
            }
        }
    }

    /// The Service variables of `pod`, as the kubelet computes them.
    pub fn env_for(&self, pod: &Pod) -> BTreeMap<String, String> {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let links = pod
            .spec
            .as_ref()
            .and_then(|s| s.enable_service_links)
            .unwrap_or(true);
        let mut chosen: BTreeMap<&str, &ServiceAddress> = BTreeMap::new();
        if links {
            for ((_, name), a) in self
                .items
                .range((ns.to_string(), String::new())..)
                .take_while(|((n, _), _)| n == ns)
            {
                chosen.insert(name, a);
            }
        }
        // The master Service is always there, and wins over a same-named one of the namespace.
        let master = (MASTER_SERVICE.0.to_string(), MASTER_SERVICE.1.to_string());
        if let Some(a) = self.items.get(&master) {
            chosen.insert(MASTER_SERVICE.1, a);
        }
        let mut env = BTreeMap::new();
        for (name, a) in chosen {
            add_service(&mut env, name, a);
        }
        env
    }
}

/// `str` as the prefix of a variable name: upper case, `-` as `_`.
fn var_name(s: &str) -> String {
    s.replace('-', "_").to_uppercase()
}

/// One Service's variables.
fn add_service(env: &mut BTreeMap<String, String>, name: &str, a: &ServiceAddress) {
    let prefix = var_name(name);
    let ip = &a.cluster_ip;
    let Some((_, first_port, first_proto)) = a.ports.first() else {
        return;
    };
    env.insert(format!("{prefix}_SERVICE_HOST"), ip.clone());
    env.insert(format!("{prefix}_SERVICE_PORT"), first_port.to_string());
    for (port_name, port, _) in &a.ports {
        if !port_name.is_empty() {
            env.insert(
                format!("{prefix}_SERVICE_PORT_{}", var_name(port_name)),
                port.to_string(),
            );
        }
    }
    // IPv6 addresses in brackets, as Go's net.JoinHostPort writes them.
    let host_port = |port: i32| {
        if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    };
    env.insert(
        format!("{prefix}_PORT"),
        format!(
            "{}://{}",
            first_proto.to_lowercase(),
            host_port(*first_port)
        ),
    );
    for (_, port, proto) in &a.ports {
        let p = format!("{prefix}_PORT_{port}_{}", proto.to_uppercase());
        let lower = proto.to_lowercase();
        env.insert(p.clone(), format!("{lower}://{}", host_port(*port)));
        env.insert(format!("{p}_PROTO"), lower);
        env.insert(format!("{p}_PORT"), port.to_string());
        env.insert(format!("{p}_ADDR"), ip.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(ns: &str, name: &str, ip: &str, ports: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": {"clusterIP": ip, "ports": ports}
        }))
        .expect("service")
    }

    fn pod(ns: &str, links: Option<bool>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": "p"},
            "spec": {"containers": [], "enableServiceLinks": links}
        }))
        .expect("pod")
    }

    fn listed(services: Vec<Service>) -> Services {
        let mut s = Services::default();
        s.apply(watcher::Event::Init);
        for x in services {
            s.apply(watcher::Event::InitApply(x));
        }
        s.apply(watcher::Event::InitDone);
        s
    }

    #[test]
    fn variables_are_the_kubelets() {
        let s = listed(vec![
            svc(
                "ns",
                "fooservice",
                "10.0.0.11",
                json!([{"name": "http", "port": 8765, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]),
            ),
            svc(
                "default",
                "kubernetes",
                "10.0.0.1",
                json!([{"name": "https", "port": 443}]),
            ),
            svc("other", "elsewhere", "10.0.0.9", json!([{"port": 1}])),
            svc("ns", "headless", "None", json!([{"port": 2}])),
        ]);
        let env = s.env_for(&pod("ns", None));
        let expect: BTreeMap<String, String> = [
            ("FOOSERVICE_SERVICE_HOST", "10.0.0.11"),
            ("FOOSERVICE_SERVICE_PORT", "8765"),
            ("FOOSERVICE_SERVICE_PORT_HTTP", "8765"),
            ("FOOSERVICE_PORT", "tcp://10.0.0.11:8765"),
            ("FOOSERVICE_PORT_8765_TCP", "tcp://10.0.0.11:8765"),
            ("FOOSERVICE_PORT_8765_TCP_PROTO", "tcp"),
            ("FOOSERVICE_PORT_8765_TCP_PORT", "8765"),
            ("FOOSERVICE_PORT_8765_TCP_ADDR", "10.0.0.11"),
            ("FOOSERVICE_PORT_53_UDP", "udp://10.0.0.11:53"),
            ("FOOSERVICE_PORT_53_UDP_PROTO", "udp"),
            ("FOOSERVICE_PORT_53_UDP_PORT", "53"),
            ("FOOSERVICE_PORT_53_UDP_ADDR", "10.0.0.11"),
            ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("KUBERNETES_SERVICE_PORT_HTTPS", "443"),
            ("KUBERNETES_PORT", "tcp://10.0.0.1:443"),
            ("KUBERNETES_PORT_443_TCP", "tcp://10.0.0.1:443"),
            ("KUBERNETES_PORT_443_TCP_PROTO", "tcp"),
            ("KUBERNETES_PORT_443_TCP_PORT", "443"),
            ("KUBERNETES_PORT_443_TCP_ADDR", "10.0.0.1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            env, expect,
            "other namespaces and headless Services give none"
        );
    }

    #[test]
    fn without_service_links_only_the_master_service() {
        let s = listed(vec![
            svc("ns", "a-b", "10.0.0.11", json!([{"port": 80}])),
            svc("default", "kubernetes", "fd00::1", json!([{"port": 443}])),
        ]);
        let env = s.env_for(&pod("ns", Some(false)));
        assert!(env.keys().all(|k| k.starts_with("KUBERNETES_")), "{env:?}");
        assert_eq!(env["KUBERNETES_PORT"], "tcp://[fd00::1]:443");
        let env = s.env_for(&pod("ns", Some(true)));
        assert_eq!(
            env["A_B_SERVICE_HOST"], "10.0.0.11",
            "dashes become underscores"
        );
    }

    #[test]
    fn the_watch_keeps_the_view_current() {
        let mut s = listed(vec![svc("ns", "a", "10.0.0.2", json!([{"port": 80}]))]);
        assert!(s.synced);
        s.apply(watcher::Event::Apply(svc(
            "ns",
            "a",
            "None",
            json!([{"port": 80}]),
        )));
        assert!(s.env_for(&pod("ns", None)).is_empty(), "became headless");
        s.apply(watcher::Event::Apply(svc(
            "ns",
            "b",
            "10.0.0.3",
            json!([{"port": 81}]),
        )));
        s.apply(watcher::Event::Delete(svc(
            "ns",
            "b",
            "10.0.0.3",
            json!([]),
        )));
        assert!(s.env_for(&pod("ns", None)).is_empty(), "deleted");
    }
}
