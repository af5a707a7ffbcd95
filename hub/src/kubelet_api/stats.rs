//! The kubelet's resource views of a device, rendered from its latest [`DeviceFigures`]:
//! `/stats/summary` (stats/v1alpha1 `Summary` JSON), `/metrics/resource` (the kubelet's resource
//! metrics in Prometheus text) and `/runningpods/` (the runtime's pods as a `PodList`).
//!
//! CPU rates (`usageNanoCores`) come from the newest report and the one before it, as the
//! kubelet takes them from cAdvisor's two latest samples; a container or node without an earlier
//! sample (or whose counter went back: a restart) has none yet.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use fleetlet_proto::v1::{
    ContainerResourceStats, FsStats, InterfaceStats, NodeResourceStats, ResourceStats,
};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value, json};

use crate::node_stats::DeviceFigures;

/// RFC 3339 with seconds, as `metav1.Time` serializes.
fn time(unix_secs: i64) -> String {
    Timestamp::from_second(unix_secs)
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// A rate in nanocores from two cumulative CPU readings `dt_nanos` apart.
fn nano_cores(now: u64, before: u64, dt_nanos: i64) -> Option<u64> {
    let dt = u64::try_from(dt_nanos).ok().filter(|d| *d > 0)?;
    let used = now.checked_sub(before)?;
    Some(u64::try_from(u128::from(used) * 1_000_000_000 / u128::from(dt)).unwrap_or(u64::MAX))
}

/// The figures of one report with the rates against the previous one.
struct View<'a> {
    stats: &'a ResourceStats,
    sample_time: String,
    node_cores: Option<u64>,
    /// By container id.
    container_cores: HashMap<&'a str, u64>,
}

impl<'a> View<'a> {
    fn new(f: &'a DeviceFigures) -> Self {
        let stats = f.current.stats.as_ref();
        let sample_time = time(stats.timestamp_unix_nanos.div_euclid(1_000_000_000));
        let (mut node_cores, mut container_cores) = (None, HashMap::new());
        if let Some(prev) = f.previous.as_deref() {
            let dt = stats.timestamp_unix_nanos - prev.timestamp_unix_nanos;
            if let (Some(n), Some(p)) = (&stats.node, &prev.node) {
                node_cores = nano_cores(n.cpu_usage_core_nanos, p.cpu_usage_core_nanos, dt);
            }
            let before: HashMap<&str, &ContainerResourceStats> = prev
                .pods
                .iter()
                .flat_map(|p| &p.containers)
                .map(|c| (c.id.as_str(), c))
                .collect();
            for c in stats.pods.iter().flat_map(|p| &p.containers) {
                if let Some(b) = before.get(c.id.as_str())
                    && let Some(r) = nano_cores(c.cpu_usage_core_nanos, b.cpu_usage_core_nanos, dt)
                {
                    container_cores.insert(c.id.as_str(), r);
                }
            }
        }
        Self {
            stats,
            sample_time,
            node_cores,
            container_cores,
        }
    }

    fn cpu(&self, cores: Option<u64>, total: u64) -> Value {
        let mut v = json!({"time": self.sample_time, "usageCoreNanoSeconds": total});
        if let Some(c) = cores {
            v["usageNanoCores"] = json!(c);
        }
        v
    }

    fn memory(&self, usage: u64, working_set: Option<u64>, rss: Option<u64>) -> Value {
        let mut v = json!({"time": self.sample_time, "usageBytes": usage});
        if let Some(w) = working_set {
            v["workingSetBytes"] = json!(w);
        }
        if let Some(r) = rss {
            v["rssBytes"] = json!(r);
        }
        v
    }

    fn fs(&self, f: &FsStats) -> Value {
        json!({
            "time": self.sample_time,
            "availableBytes": f.available_bytes,
            "capacityBytes": f.capacity_bytes,
            "usedBytes": f.used_bytes,
            "inodesFree": f.inodes_free,
            "inodes": f.inodes,
            "inodesUsed": f.inodes.saturating_sub(f.inodes_free),
        })
    }

    /// The kubelet's network stats: the first interface inline (the kubelet picks eth0), all
    /// of them under `interfaces`.
    fn network(&self, ifaces: &[InterfaceStats]) -> Option<Value> {
        let one = |i: &InterfaceStats| {
            json!({"name": i.name, "rxBytes": i.rx_bytes, "rxErrors": i.rx_errors,
                   "txBytes": i.tx_bytes, "txErrors": i.tx_errors})
        };
        let default = ifaces
            .iter()
            .find(|i| i.name == "eth0")
            .or_else(|| ifaces.first())?;
        let mut v = one(default);
        v["time"] = json!(self.sample_time);
        v["interfaces"] = Value::Array(ifaces.iter().map(one).collect());
        Some(v)
    }
}

fn container_working_set(c: &ContainerResourceStats) -> Option<u64> {
    c.memory_working_set_bytes
}

/// `/stats/summary` for `node`; `only_cpu_and_memory` as the kubelet's query parameter.
pub fn summary(node: &str, f: &DeviceFigures, only_cpu_and_memory: bool) -> Value {
    let v = View::new(f);
    let n: NodeResourceStats = v.stats.node.unwrap_or_default();
    let mut node_v = json!({
        "nodeName": node,
        "startTime": time(n.start_unix),
        "cpu": v.cpu(v.node_cores, n.cpu_usage_core_nanos),
        "memory": {
            "time": v.sample_time,
            "availableBytes": n.memory_available_bytes,
            "usageBytes": n.memory_usage_bytes,
            "workingSetBytes": n.memory_working_set_bytes,
            "rssBytes": n.memory_rss_bytes,
        },
    });
    if !only_cpu_and_memory {
        if let Some(fs) = &n.fs {
            node_v["fs"] = v.fs(fs);
        }
        if let Some(img) = &n.image_fs {
            node_v["runtime"] = json!({"imageFs": v.fs(img)});
        }
    }
    let mut pods = Vec::new();
    for p in &v.stats.pods {
        let mut containers = Vec::new();
        let (mut cpu_total, mut cores, mut mem, mut ws, mut rss) =
            (0u64, Some(0u64), 0u64, Some(0u64), Some(0u64));
        for c in &p.containers {
            let c_cores = v.container_cores.get(c.id.as_str()).copied();
            cpu_total = cpu_total.saturating_add(c.cpu_usage_core_nanos);
            cores = cores.zip(c_cores).map(|(a, b)| a.saturating_add(b));
            mem = mem.saturating_add(c.memory_usage_bytes);
            ws = ws
                .zip(container_working_set(c))
                .map(|(a, b)| a.saturating_add(b));
            rss = rss
                .zip(c.memory_rss_bytes)
                .map(|(a, b)| a.saturating_add(b));
            containers.push(json!({
                "name": c.name,
                "startTime": time(c.start_unix),
                "cpu": v.cpu(c_cores, c.cpu_usage_core_nanos),
                "memory": v.memory(c.memory_usage_bytes, c.memory_working_set_bytes, c.memory_rss_bytes),
            }));
        }
        let mut pod_v = json!({
            "podRef": {"name": p.name, "namespace": p.namespace, "uid": p.uid},
            "startTime": time(p.start_unix),
            "containers": containers,
            "cpu": v.cpu(cores, cpu_total),
            "memory": v.memory(mem, ws, rss),
        });
        if !only_cpu_and_memory && let Some(net) = v.network(&p.interfaces) {
            pod_v["network"] = net;
        }
        pods.push(pod_v);
    }
    json!({"node": node_v, "pods": pods})
}

/// Go's `strconv.FormatFloat(v, 'g', -1, 64)`, which Prometheus' text format uses: the shortest
/// digits that read back as `v`, in exponent form from 1e6 up and below 1e-4.
pub fn go_float(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !v.is_finite() {
        return if v.is_nan() {
            "NaN".into()
        } else if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "d.ddde<exp>".
    let e = format!("{v:e}");
    let (mantissa, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let s = format!("{v}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// One sample: label pairs (sorted by name), value, timestamp in ms.
type MetricSample = (Vec<(&'static str, String)>, f64, Option<i64>);

/// One family of the resource metrics.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<MetricSample>,
}

fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `/metrics/resource` as the kubelet's resource metrics collector writes it; `figures` is
/// `None` when the device's figures are missing or stale, which the kubelet reports as a
/// scrape error with no samples.
pub fn resource_metrics(figures: Option<&DeviceFigures>) -> String {
    let mut fams: BTreeMap<&'static str, Family> = BTreeMap::new();
    let mut add = |name: &'static str,
                   help: &'static str,
                   kind: &'static str,
                   labels: Vec<(&'static str, String)>,
                   value: f64,
                   ts: Option<i64>| {
        fams.entry(name)
            .or_insert_with(|| Family {
                name,
                help,
                kind,
                samples: Vec::new(),
            })
            .samples
            .push((labels, value, ts));
    };
    let error = f64::from(u8::from(figures.is_none()));
    if let Some(f) = figures {
        let stats = f.current.stats.as_ref();
        let ts = Some(stats.timestamp_unix_nanos.div_euclid(1_000_000));
        if let Some(n) = &stats.node {
            add(
                "node_cpu_usage_seconds_total",
                "[STABLE] Cumulative cpu time consumed by the node in core-seconds",
                "counter",
                Vec::new(),
                n.cpu_usage_core_nanos as f64 / 1e9,
                ts,
            );
            add(
                "node_memory_working_set_bytes",
                "[STABLE] Current working set of the node in bytes",
                "gauge",
                Vec::new(),
                n.memory_working_set_bytes as f64,
                ts,
            );
        }
        for p in &stats.pods {
            let (mut cpu, mut ws) = (0u64, Some(0u64));
            for c in &p.containers {
                let labels = vec![
                    ("container", c.name.clone()),
                    ("namespace", p.namespace.clone()),
                    ("pod", p.name.clone()),
                ];
                if c.start_unix > 0 {
                    add(
                        "container_start_time_seconds",
                        "[STABLE] Start time of the container since unix epoch in seconds",
                        "gauge",
                        labels.clone(),
                        c.start_unix as f64,
                        None,
                    );
                }
                add(
                    "container_cpu_usage_seconds_total",
                    "[STABLE] Cumulative cpu time consumed by the container in core-seconds",
                    "counter",
                    labels.clone(),
                    c.cpu_usage_core_nanos as f64 / 1e9,
                    ts,
                );
                if let Some(w) = c.memory_working_set_bytes {
                    add(
                        "container_memory_working_set_bytes",
                        "[STABLE] Current working set of the container in bytes",
                        "gauge",
                        labels,
                        w as f64,
                        ts,
                    );
                }
                cpu = cpu.saturating_add(c.cpu_usage_core_nanos);
                ws = ws
                    .zip(c.memory_working_set_bytes)
                    .map(|(a, b)| a.saturating_add(b));
            }
            let labels = vec![("namespace", p.namespace.clone()), ("pod", p.name.clone())];
            add(
                "pod_cpu_usage_seconds_total",
                "[STABLE] Cumulative cpu time consumed by the pod in core-seconds",
                "counter",
                labels.clone(),
                cpu as f64 / 1e9,
                ts,
            );
            if let Some(w) = ws {
                add(
                    "pod_memory_working_set_bytes",
                    "[STABLE] Current working set of the pod in bytes",
                    "gauge",
                    labels,
                    w as f64,
                    ts,
                );
            }
        }
    }
    add(
        "resource_scrape_error",
        "[STABLE] 1 if there was an error while getting container metrics, 0 otherwise",
        "gauge",
        Vec::new(),
        error,
        None,
    );
    add(
        "scrape_error",
        "[ALPHA] (Deprecated since 1.29.0) 1 if there was an error while getting container metrics, 0 otherwise",
        "gauge",
        Vec::new(),
        error,
        None,
    );
    let mut out = String::new();
    for fam in fams.values_mut() {
        fam.samples.sort_by(|a, b| a.0.cmp(&b.0));
        let _ = writeln!(out, "# HELP {} {}", fam.name, fam.help);
        let _ = writeln!(out, "# TYPE {} {}", fam.name, fam.kind);
        for (labels, value, ts) in &fam.samples {
            out.push_str(fam.name);
            if !labels.is_empty() {
                let l: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", label_value(v)))
                    .collect();
                let _ = write!(out, "{{{}}}", l.join(","));
            }
            let _ = write!(out, " {}", go_float(*value));
            if let Some(ts) = ts {
                let _ = write!(out, " {ts}");
            }
            out.push('\n');
        }
    }
    out
}

/// `/runningpods/`: the pods whose containers the device's runtime reports running, as the
/// kubelet returns its runtime cache (name, namespace, uid; containers with name and image).
pub fn running_pods(f: &DeviceFigures) -> Value {
    let items: Vec<Value> = f
        .current
        .stats
        .pods
        .iter()
        .map(|p| {
            let containers: Vec<Value> = p
                .containers
                .iter()
                .map(|c| json!({"name": c.name, "image": c.image, "resources": {}}))
                .collect();
            json!({
                "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid,
                             "creationTimestamp": null},
                "spec": {"containers": containers},
                "status": {},
            })
        })
        .collect();
    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
}

/// A `PodList` body for `/pods`, from the pods bound to the node.
pub fn pod_list(pods: Vec<Value>) -> Value {
    let mut m = Map::new();
    m.insert("kind".into(), json!("PodList"));
    m.insert("apiVersion".into(), json!("v1"));
    m.insert("metadata".into(), json!({}));
    m.insert("items".into(), Value::Array(pods));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use fleetlet_proto::v1::PodResourceStats;

    use super::*;
    use crate::node_stats::Sample;

    const T0: i64 = 1_767_323_045_000_000_000; // 2026-01-02T03:04:05Z

    fn container(id: &str, cpu: u64, ws: Option<u64>) -> ContainerResourceStats {
        ContainerResourceStats {
            name: format!("c-{id}"),
            id: id.into(),
            image: "busybox:1".into(),
            start_unix: 1_767_323_000,
            cpu_usage_core_nanos: cpu,
            memory_usage_bytes: 3_000_000,
            memory_working_set_bytes: ws,
            memory_rss_bytes: ws.map(|w| w / 2),
        }
    }

    fn report(ts: i64, node_cpu: u64, containers: Vec<ContainerResourceStats>) -> ResourceStats {
        ResourceStats {
            timestamp_unix_nanos: ts,
            interval_secs: 15,
            node: Some(NodeResourceStats {
                start_unix: 1_767_000_000,
                cpu_usage_core_nanos: node_cpu,
                memory_usage_bytes: 900,
                memory_working_set_bytes: 800,
                memory_rss_bytes: 700,
                memory_available_bytes: 100,
                fs: Some(FsStats {
                    capacity_bytes: 10,
                    available_bytes: 4,
                    used_bytes: 6,
                    inodes: 5,
                    inodes_free: 2,
                }),
                image_fs: None,
            }),
            pods: vec![PodResourceStats {
                uid: "u1".into(),
                namespace: "ns".into(),
                name: "web".into(),
                start_unix: 1_767_323_000,
                containers,
                interfaces: vec![InterfaceStats {
                    name: "eth0".into(),
                    rx_bytes: 11,
                    rx_errors: 0,
                    tx_bytes: 22,
                    tx_errors: 1,
                }],
            }],
        }
    }

    fn figures(prev: Option<ResourceStats>, cur: ResourceStats) -> DeviceFigures {
        DeviceFigures {
            current: Sample {
                received: tokio::time::Instant::now(),
                stats: Arc::new(cur),
            },
            previous: prev.map(Arc::new),
        }
    }

    #[test]
    fn summary_has_rates_from_two_reports() {
        // 15 s apart; the node used 3 CPU-seconds (0.2 cores), container a 1.5 s (0.1 cores);
        // container b is new (no rate yet).
        let prev = report(
            T0 - 15_000_000_000,
            10_000_000_000,
            vec![container("a", 500_000_000, Some(1000))],
        );
        let cur = report(
            T0,
            13_000_000_000,
            vec![
                container("a", 2_000_000_000, Some(1000)),
                container("b", 7, Some(24)),
            ],
        );
        let s = summary("dev-1", &figures(Some(prev), cur), false);
        assert_eq!(s["node"]["nodeName"], "dev-1");
        assert_eq!(s["node"]["cpu"]["usageNanoCores"], 200_000_000);
        assert_eq!(s["node"]["cpu"]["usageCoreNanoSeconds"], 13_000_000_000u64);
        assert_eq!(s["node"]["cpu"]["time"], "2026-01-02T03:04:05Z");
        assert_eq!(s["node"]["memory"]["workingSetBytes"], 800);
        assert_eq!(s["node"]["fs"]["inodesUsed"], 3);
        let pod = &s["pods"][0];
        assert_eq!(
            pod["podRef"],
            json!({"name": "web", "namespace": "ns", "uid": "u1"})
        );
        let a = &pod["containers"][0];
        assert_eq!(a["name"], "c-a");
        assert_eq!(a["cpu"]["usageNanoCores"], 100_000_000);
        assert_eq!(a["memory"]["rssBytes"], 500);
        assert!(pod["containers"][1]["cpu"].get("usageNanoCores").is_none());
        // A pod rate needs every container's rate.
        assert!(pod["cpu"].get("usageNanoCores").is_none());
        assert_eq!(pod["cpu"]["usageCoreNanoSeconds"], 2_000_000_007u64);
        assert_eq!(pod["memory"]["workingSetBytes"], 1024);
        assert_eq!(pod["network"]["name"], "eth0");
        assert_eq!(pod["network"]["txErrors"], 1);
        let only = summary("dev-1", &figures(None, report(T0, 1, vec![])), true);
        assert!(only["node"].get("fs").is_none());
        assert!(only["node"]["cpu"].get("usageNanoCores").is_none());
    }

    #[test]
    fn go_float_formatting_matches_prometheus() {
        assert_eq!(go_float(0.0), "0");
        assert_eq!(go_float(1.0), "1");
        assert_eq!(go_float(0.469473638), "0.469473638");
        assert_eq!(go_float(999_999.0), "999999");
        assert_eq!(go_float(2_125_824.0), "2.125824e+06");
        assert_eq!(go_float(1.5e21), "1.5e+21");
        assert_eq!(go_float(0.00001), "1e-05");
        assert_eq!(go_float(0.0001), "0.0001");
        assert_eq!(go_float(1_767_323_000.0), "1.767323e+09");
        assert_eq!(go_float(1_696_687_543.241_331_8), "1.6966875432413318e+09");
    }

    #[test]
    fn resource_metrics_text_is_the_kubelets() {
        let cur = report(
            T0,
            13_000_000_000,
            vec![
                container("a", 2_000_000_000, Some(1000)),
                container("b", 500_000_000, None),
            ],
        );
        let text = resource_metrics(Some(&figures(None, cur)));
        let expected = "\
# HELP container_cpu_usage_seconds_total [STABLE] Cumulative cpu time consumed by the container in core-seconds
# TYPE container_cpu_usage_seconds_total counter
container_cpu_usage_seconds_total{container=\"c-a\",namespace=\"ns\",pod=\"web\"} 2 1767323045000
container_cpu_usage_seconds_total{container=\"c-b\",namespace=\"ns\",pod=\"web\"} 0.5 1767323045000
# HELP container_memory_working_set_bytes [STABLE] Current working set of the container in bytes
# TYPE container_memory_working_set_bytes gauge
container_memory_working_set_bytes{container=\"c-a\",namespace=\"ns\",pod=\"web\"} 1000 1767323045000
# HELP container_start_time_seconds [STABLE] Start time of the container since unix epoch in seconds
# TYPE container_start_time_seconds gauge
container_start_time_seconds{container=\"c-a\",namespace=\"ns\",pod=\"web\"} 1.767323e+09
container_start_time_seconds{container=\"c-b\",namespace=\"ns\",pod=\"web\"} 1.767323e+09
# HELP node_cpu_usage_seconds_total [STABLE] Cumulative cpu time consumed by the node in core-seconds
# TYPE node_cpu_usage_seconds_total counter
node_cpu_usage_seconds_total 13 1767323045000
# HELP node_memory_working_set_bytes [STABLE] Current working set of the node in bytes
# TYPE node_memory_working_set_bytes gauge
node_memory_working_set_bytes 800 1767323045000
# HELP pod_cpu_usage_seconds_total [STABLE] Cumulative cpu time consumed by the pod in core-seconds
# TYPE pod_cpu_usage_seconds_total counter
pod_cpu_usage_seconds_total{namespace=\"ns\",pod=\"web\"} 2.5 1767323045000
# HELP resource_scrape_error [STABLE] 1 if there was an error while getting container metrics, 0 otherwise
# TYPE resource_scrape_error gauge
resource_scrape_error 0
# HELP scrape_error [ALPHA] (Deprecated since 1.29.0) 1 if there was an error while getting container metrics, 0 otherwise
# TYPE scrape_error gauge
scrape_error 0
";
        assert_eq!(text, expected);
        let stale = resource_metrics(None);
        assert!(stale.contains("\nscrape_error 1\n") && !stale.contains("node_cpu"));
    }

    #[test]
    fn running_pods_list_the_runtime_view() {
        let l = running_pods(&figures(None, report(T0, 1, vec![container("a", 1, None)])));
        assert_eq!(l["kind"], "PodList");
        assert_eq!(l["items"][0]["metadata"]["uid"], "u1");
        assert_eq!(
            l["items"][0]["spec"]["containers"][0],
            json!({"name": "c-a", "image": "busybox:1", "resources": {}})
        );
    }
}
