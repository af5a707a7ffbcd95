//! Prometheus metrics of the hub, and the HTTP endpoint serving them with `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Labels of a pod-phase gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// Pod phase as the API shows it.
    pub phase: String,
}

/// Labels of API request counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// What the request did, e.g. `apply_node`, `patch_pod_status`, `renew_lease`.
    pub op: String,
}

/// Labels of the API answers that are part of normal operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiCodeLabels {
    /// What the request did, as in [`ApiLabels`].
    pub op: String,
    /// The HTTP status the API server answered: "404" or "409".
    pub code: String,
}

/// Labels of per-device gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    /// Device (and Node) name.
    pub device: String,
}

/// Labels of per-device resource gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceResourceLabels {
    /// Device (and Node) name.
    pub device: String,
    /// Resource name as on the Node: "cpu" (cores), "memory" and "ephemeral-storage" (bytes),
    /// "pods" (count).
    pub resource: String,
}

/// Labels of the cached-objects gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// "configmap" or "secret".
    pub kind: String,
}

/// Labels of counters broken down by a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why, as a short snake_case word (never a device or pod name: bounded cardinality).
    pub reason: String,
}

/// Every metric the hub exports.
pub struct Metrics {
    registry: Registry,
    /// Devices with a live stream.
    pub connected_devices: Gauge,
    /// Nodes the hub keeps.
    pub nodes: Gauge,
    /// Pods on fleetlet nodes by phase.
    pub pods: Family<PhaseLabels, Gauge>,
    /// Seconds from a pod's PodScheduled condition to the device reporting it Running.
    pub pod_start_seconds: Histogram,
    /// Seconds from handing a snapshot to the link until the device acknowledged it.
    pub relay_seconds: Histogram,
    /// Kubernetes API requests.
    pub api_requests: Family<ApiLabels, Counter>,
    /// Kubernetes API requests that failed unexpectedly (not the 404/409 answers the hub
    /// expects; those are in `api_not_found_or_conflict`).
    pub api_errors: Family<ApiLabels, Counter>,
    /// Kubernetes API requests answered 404 or 409, which the hub handles as normal outcomes
    /// (the object is already gone, a precondition or resourceVersion conflict).
    pub api_not_found_or_conflict: Family<ApiCodeLabels, Counter>,
    /// Resources a connected device reported, by device and resource.
    pub device_capacity: Family<DeviceResourceLabels, Gauge<f64, AtomicU64>>,
    /// Allocatable resources a connected device reported (capacity minus its reservations).
    pub device_allocatable: Family<DeviceResourceLabels, Gauge<f64, AtomicU64>>,
    /// Encoded size of the pods in each device's current desired snapshot, in bytes.
    pub device_snapshot_bytes: Family<DeviceLabels, Gauge>,
    /// Reconcile passes the device's agent ran since it started (as it reported).
    pub device_reconcile_passes: Family<DeviceLabels, Gauge>,
    /// Their total duration in seconds.
    pub device_reconcile_seconds_sum: Family<DeviceLabels, Gauge<f64, AtomicU64>>,
    /// The longest pass in the device's last report interval, in seconds.
    pub device_reconcile_seconds_max: Family<DeviceLabels, Gauge<f64, AtomicU64>>,
    /// 1 while this replica holds the leader lease (or runs without election), else 0.
    pub leader: Gauge,
    /// ConfigMaps and Secrets held in memory (only those fleetlet pods reference).
    pub cached_objects: Family<KindLabels, Gauge>,
    /// Inventory devices not served because a Node of their name exists that this hub does
    /// not own (a real kubelet's, another controller's or another hub instance's).
    pub nodes_not_owned: Gauge,
    /// Entries of device reports dropped before anything was recorded, by reason.
    pub device_input_dropped: Family<ReasonLabels, Counter>,
    /// Device Events by outcome (`reason` label).
    pub device_events: Family<ReasonLabels, Counter>,
    /// Pods the hub refused to relay to a device, by reason.
    pub pods_refused: Family<ReasonLabels, Counter>,
}

impl Metrics {
    /// Creates the registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fleetlet_hub");
        let connected_devices = Gauge::default();
        registry.register(
            "connected_devices",
            "Devices with a live stream",
            connected_devices.clone(),
        );
        let nodes = Gauge::default();
        registry.register("nodes", "Nodes kept by this hub", nodes.clone());
        let pods = Family::<PhaseLabels, Gauge>::default();
        registry.register("pods", "Pods on fleetlet nodes by phase", pods.clone());
        let pod_start_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        registry.register(
            "pod_start_seconds",
            "From PodScheduled to the device reporting Running",
            pod_start_seconds.clone(),
        );
        let relay_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "relay_seconds",
            "From handing a snapshot to the link until the device acknowledged it",
            relay_seconds.clone(),
        );
        let api_requests = Family::<ApiLabels, Counter>::default();
        registry.register(
            "api_requests",
            "Kubernetes API requests",
            api_requests.clone(),
        );
        let api_errors = Family::<ApiLabels, Counter>::default();
        registry.register(
            "api_errors",
            "Kubernetes API requests that failed: no answer, 5xx, or a 4xx other than the 404/409 \
             the hub expects (counted in api_not_found_or_conflict)",
            api_errors.clone(),
        );
        let api_not_found_or_conflict = Family::<ApiCodeLabels, Counter>::default();
        registry.register(
            "api_not_found_or_conflict",
            "Kubernetes API requests answered 404 NotFound or 409 Conflict: normal outcomes for the \
             hub (object already gone, UID precondition or resourceVersion conflict), not errors",
            api_not_found_or_conflict.clone(),
        );
        let device_capacity = Family::<DeviceResourceLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "device_capacity",
            "Capacity a connected device reported: cpu in cores, memory and ephemeral-storage in \
             bytes, pods",
            device_capacity.clone(),
        );
        let device_allocatable = Family::<DeviceResourceLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "device_allocatable",
            "Allocatable resources a connected device reported (capacity minus its reservations)",
            device_allocatable.clone(),
        );
        let device_snapshot_bytes = Family::<DeviceLabels, Gauge>::default();
        registry.register(
            "device_snapshot_bytes",
            "Encoded size of the pods (with their ConfigMap and Secret data) in the device's \
             current desired snapshot, uncompressed",
            device_snapshot_bytes.clone(),
        );
        let device_reconcile_passes = Family::<DeviceLabels, Gauge>::default();
        registry.register(
            "device_reconcile_passes",
            "Reconcile passes (one pod compared with Podman and acted on) the device's agent ran \
             since it started, as it reported (at most once a minute)",
            device_reconcile_passes.clone(),
        );
        let device_reconcile_seconds_sum = Family::<DeviceLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "device_reconcile_seconds_sum",
            "Total duration of those passes; with device_reconcile_passes, the mean pass time",
            device_reconcile_seconds_sum.clone(),
        );
        let device_reconcile_seconds_max = Family::<DeviceLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "device_reconcile_seconds_max",
            "The longest reconcile pass in the device's last report interval",
            device_reconcile_seconds_max.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica leads (serves devices and writes to the API), 0 as a standby",
            leader.clone(),
        );
        let cached_objects = Family::<KindLabels, Gauge>::default();
        registry.register(
            "cached_objects",
            "ConfigMaps and Secrets held in memory: only those pods on fleetlet nodes reference",
            cached_objects.clone(),
        );
        let nodes_not_owned = Gauge::default();
        registry.register(
            "nodes_not_owned",
            "Inventory devices not served: a Node of their name exists that this hub does not own",
            nodes_not_owned.clone(),
        );
        let device_input_dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "device_input_dropped",
            "Entries of device reports dropped before anything was recorded",
            device_input_dropped.clone(),
        );
        let device_events = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "device_events",
            "Events devices reported about their pods, by what became of them (reason: created, series_updated, duplicate, not_bound, invalid, dropped_queue_full, dropped_on_device, api_error)",
            device_events.clone(),
        );
        let pods_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "pods_refused",
            "Pods the hub refused to relay to a device",
            pods_refused.clone(),
        );
        Self {
            registry,
            leader,
            nodes_not_owned,
            device_input_dropped,
            device_events,
            pods_refused,
            cached_objects,
            connected_devices,
            nodes,
            pods,
            pod_start_seconds,
            relay_seconds,
            api_requests,
            api_errors,
            api_not_found_or_conflict,
            device_capacity,
            device_allocatable,
            device_snapshot_bytes,
            device_reconcile_passes,
            device_reconcile_seconds_sum,
            device_reconcile_seconds_max,
        }
    }

    /// Records a device's reconcile figures.
    pub fn set_device_reconcile(&self, device: &str, stats: &fleetlet_proto::v1::AgentStats) {
        let labels = DeviceLabels {
            device: device.to_string(),
        };
        self.device_reconcile_passes
            .get_or_create(&labels)
            .set(i64::try_from(stats.reconcile_passes).unwrap_or(i64::MAX));
        self.device_reconcile_seconds_sum
            .get_or_create(&labels)
            .set(stats.reconcile_seconds_sum.max(0.0));
        self.device_reconcile_seconds_max
            .get_or_create(&labels)
            .set(stats.reconcile_seconds_max.max(0.0));
    }

    /// Drops the reconcile series of a device that disconnected.
    pub fn forget_device_reconcile(&self, device: &str) {
        let labels = DeviceLabels {
            device: device.to_string(),
        };
        self.device_reconcile_passes.remove(&labels);
        self.device_reconcile_seconds_sum.remove(&labels);
        self.device_reconcile_seconds_max.remove(&labels);
    }

    /// Counts one API request and its outcome: a 404 or 409 answer as
    /// `api_not_found_or_conflict{code}`, any other failure as `api_errors`.
    pub fn api<T>(&self, op: &str, result: &Result<T, kube::Error>) {
        let labels = ApiLabels { op: op.to_string() };
        self.api_requests.get_or_create(&labels).inc();
        let Err(error) = result else { return };
        match crate::kubeutil::status_code(error) {
            Some(code @ (404 | 409)) => {
                self.api_not_found_or_conflict
                    .get_or_create(&ApiCodeLabels {
                        op: labels.op,
                        code: code.to_string(),
                    })
                    .inc();
            }
            code => {
                // One line per unexpected API failure, with the operation as a field, so an
                // operator can filter by `op` (the call site logs what it was doing for whom).
                tracing::warn!(op = %labels.op, code = ?code, %error, "Kubernetes API request failed");
                self.api_errors.get_or_create(&labels).inc();
            }
        }
    }

    /// Exports the link's counters kept by the link itself.
    pub fn register_link(&mut self, stats: &crate::link::LinkStats) {
        let counters = [
            (
                "device_sessions_cut_over_budget",
                "Device sessions cut because the device sent more than its input budget",
                &stats.sessions_cut_over_budget,
            ),
            (
                "link_handshakes_failed",
                "TLS handshakes on the device link that failed (unknown CA, expired certificate, timeout)",
                &stats.handshakes_failed,
            ),
            (
                "link_streams_rejected",
                "Device streams refused (identity, inventory, hello, bad message)",
                &stats.streams_rejected,
            ),
            (
                "link_sessions_cut_stalled",
                "Device sessions cut because the device did not take a snapshot within the stall timeout",
                &stats.sessions_cut_stalled,
            ),
            (
                "link_sessions_replaced",
                "Device sessions replaced by a newer connection of the same device",
                &stats.sessions_replaced,
            ),
            (
                "link_snapshots_sent",
                "Desired-state snapshots handed to a device's stream",
                &stats.snapshots_sent,
            ),
            (
                "link_snapshots_superseded",
                "Snapshots replaced by a newer one before the device took them",
                &stats.snapshots_superseded,
            ),
            (
                "link_log_requests_rejected",
                "Log requests refused because the device session's control queue was full",
                &stats.log_requests_rejected,
            ),
        ];
        for (name, help, counter) in counters {
            self.registry.register(name, help, counter.clone());
        }
    }

    /// Counts `n` device Events with `outcome`.
    pub fn device_event(&self, outcome: &str, n: u64) {
        self.device_events
            .get_or_create(&ReasonLabels {
                reason: outcome.to_string(),
            })
            .inc_by(n);
    }

    /// Registers agentless mode's figures (docs/flightctl.md).
    pub fn register_agentless(&mut self, m: &crate::agentless::AgentlessMetrics) {
        m.register(&mut self.registry);
    }

    /// Counts `n` dropped device-report entries under `reason`.
    pub fn dropped(&self, reason: &str, n: u64) {
        self.device_input_dropped
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc_by(n);
    }

    /// Counts one pod refused under `reason`.
    pub fn refused(&self, reason: &str) {
        self.pods_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Records the capacity and allocatable a device reported (quantities that do not parse are
    /// left out).
    pub fn set_device_capacity(&self, device: &str, capacity: &fleetlet_proto::v1::Capacity) {
        for (family, values) in [
            (&self.device_capacity, &capacity.capacity),
            (&self.device_allocatable, &capacity.allocatable),
        ] {
            for (resource, quantity) in values {
                if let Ok(milli) = crate::quantity::parse_milli(quantity) {
                    family
                        .get_or_create(&DeviceResourceLabels {
                            device: device.to_string(),
                            resource: resource.clone(),
                        })
                        .set(milli as f64 / 1000.0);
                }
            }
        }
    }

    /// Drops the capacity series of a device that disconnected (its figures are no longer
    /// current; the Node keeps the last ones).
    pub fn forget_device_capacity(
        &self,
        device: &str,
        capacity: Option<&fleetlet_proto::v1::Capacity>,
    ) {
        let Some(capacity) = capacity else { return };
        for (family, values) in [
            (&self.device_capacity, &capacity.capacity),
            (&self.device_allocatable, &capacity.allocatable),
        ] {
            for resource in values.keys() {
                family.remove(&DeviceResourceLabels {
                    device: device.to_string(),
                    resource: resource.clone(),
                });
            }
        }
    }

    /// Records the size of the pods in the snapshot just handed to `device`'s link.
    pub fn set_snapshot_bytes(&self, device: &str, bytes: usize) {
        self.device_snapshot_bytes
            .get_or_create(&DeviceLabels {
                device: device.to_string(),
            })
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Drops the snapshot-size series of a device the hub no longer serves.
    pub fn forget_snapshot_bytes(&self, device: &str) {
        self.device_snapshot_bytes.remove(&DeviceLabels {
            device: device.to_string(),
        });
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether the hub is ready: leader and its caches synced.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the hub ready or not.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    /// Current readiness.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Errors of the operations endpoint (configuration; not retryable).
#[derive(Debug, Error)]
pub enum OpsError {
    /// The listen address could not be bound (not retryable: configuration).
    #[error("binding the operations endpoint {addr}: {source}")]
    Bind {
        /// Address from the configuration.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Binds the operations endpoint; serve it with [`serve_ops`].
pub async fn bind_ops(addr: SocketAddr) -> Result<TcpListener, OpsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| OpsError::Bind { addr, source })
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve_ops(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Readiness,
    shutdown: CancellationToken,
) {
    let mut listener = fleetlet_os::net::Acceptor::new(listener, "operations endpoint");
    loop {
        let Some((stream, _)) = listener.accept(&shutdown).await else {
            return;
        };
        let metrics = metrics.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                let ready = ready.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(ops_response(
                        req.uri().path(),
                        &metrics,
                        &ready,
                    ))
                }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "operations connection ended");
            }
        });
    }
}

fn ops_response(path: &str, metrics: &Metrics, ready: &Readiness) -> Response<Full<bytes::Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if ready.get() => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: not leader or caches not synced\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(bytes::Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_in_prometheus_text_format() {
        let m = Metrics::new();
        m.connected_devices.set(3);
        m.pods
            .get_or_create(&PhaseLabels {
                phase: "Running".into(),
            })
            .set(2);
        m.api::<()>("apply_node", &Err(api_error(500)));
        m.pod_start_seconds.observe(0.3);
        let text = m.render();
        assert!(text.contains("fleetlet_hub_connected_devices 3"), "{text}");
        assert!(
            text.contains("fleetlet_hub_pods{phase=\"Running\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("fleetlet_hub_api_errors_total{op=\"apply_node\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fleetlet_hub_pod_start_seconds_count 1"),
            "{text}"
        );
    }

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("x", "y")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn expected_not_found_and_conflict_answers_are_not_errors() {
        let m = Metrics::new();
        m.api::<()>("delete_pod", &Err(api_error(404)));
        m.api::<()>("patch_pod_status", &Err(api_error(409)));
        m.api::<()>("patch_pod_status", &Err(api_error(422)));
        m.api("patch_pod_status", &Ok(()));
        let text = m.render();
        assert!(
            text.contains(
                "fleetlet_hub_api_not_found_or_conflict_total{op=\"delete_pod\",code=\"404\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "fleetlet_hub_api_not_found_or_conflict_total{op=\"patch_pod_status\",code=\"409\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("fleetlet_hub_api_errors_total{op=\"patch_pod_status\"} 1"),
            "only the 422 is an error: {text}"
        );
        assert!(
            !text.contains("fleetlet_hub_api_errors_total{op=\"delete_pod\"}"),
            "{text}"
        );
        assert!(
            text.contains("fleetlet_hub_api_requests_total{op=\"patch_pod_status\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn device_capacity_and_snapshot_size_are_exported_and_forgotten() {
        let m = Metrics::new();
        let cap = fleetlet_proto::v1::Capacity {
            capacity: [
                ("cpu".to_string(), "2".to_string()),
                ("memory".to_string(), "1Gi".to_string()),
                ("pods".to_string(), "110".to_string()),
                ("bogus".to_string(), "lots".to_string()),
            ]
            .into(),
            allocatable: [("cpu".to_string(), "1500m".to_string())].into(),
            ..Default::default()
        };
        m.set_device_capacity("dev-1", &cap);
        m.set_snapshot_bytes("dev-1", 2048);
        let text = m.render();
        for line in [
            "fleetlet_hub_device_capacity{device=\"dev-1\",resource=\"cpu\"} 2.0",
            "fleetlet_hub_device_capacity{device=\"dev-1\",resource=\"memory\"} 1073741824.0",
            "fleetlet_hub_device_capacity{device=\"dev-1\",resource=\"pods\"} 110.0",
            "fleetlet_hub_device_allocatable{device=\"dev-1\",resource=\"cpu\"} 1.5",
            "fleetlet_hub_device_snapshot_bytes{device=\"dev-1\"} 2048",
        ] {
            assert!(text.contains(line), "{line} missing: {text}");
        }
        assert!(!text.contains("bogus"), "{text}");
        m.forget_device_capacity("dev-1", Some(&cap));
        m.forget_snapshot_bytes("dev-1");
        let text = m.render();
        assert!(!text.contains("device=\"dev-1\""), "{text}");
    }

    #[test]
    fn the_links_counters_are_on_metrics() {
        let mut m = Metrics::new();
        let stats = crate::link::LinkStats::default();
        m.register_link(&stats);
        stats.handshakes_failed.inc();
        stats.sessions_cut_stalled.inc();
        stats.snapshots_superseded.inc_by(2);
        let text = m.render();
        for line in [
            "fleetlet_hub_link_handshakes_failed_total 1",
            "fleetlet_hub_link_sessions_cut_stalled_total 1",
            "fleetlet_hub_link_snapshots_superseded_total 2",
            "fleetlet_hub_device_sessions_cut_over_budget_total 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn readyz_follows_readiness() {
        let m = Metrics::new();
        let r = Readiness::default();
        assert_eq!(
            ops_response("/readyz", &m, &r).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        r.set(true);
        assert_eq!(ops_response("/readyz", &m, &r).status(), StatusCode::OK);
        assert_eq!(ops_response("/healthz", &m, &r).status(), StatusCode::OK);
        assert_eq!(
            ops_response("/nope", &m, &r).status(),
            StatusCode::NOT_FOUND
        );
    }
}
