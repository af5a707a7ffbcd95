//! Prometheus metrics of the hub, and the HTTP endpoint serving them with `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Kubernetes API requests that failed.
    pub api_errors: Family<ApiLabels, Counter>,
    /// 1 while this replica holds the leader lease (or runs without election), else 0.
    pub leader: Gauge,
    /// ConfigMaps and Secrets held in memory (only those fleetlet pods reference).
    pub cached_objects: Family<KindLabels, Gauge>,
    /// Inventory devices not served because a Node of their name exists that this hub does
    /// not own (a real kubelet's, another controller's or another hub instance's).
    pub nodes_not_owned: Gauge,
    /// Entries of device reports dropped before anything was recorded, by reason.
    pub device_input_dropped: Family<ReasonLabels, Counter>,
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
            "Kubernetes API requests that failed",
            api_errors.clone(),
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
            pods_refused,
            cached_objects,
            connected_devices,
            nodes,
            pods,
            pod_start_seconds,
            relay_seconds,
            api_requests,
            api_errors,
        }
    }

    /// Counts one API request and, when it failed, one error.
    pub fn api<T, E>(&self, op: &str, result: &Result<T, E>) {
        let labels = ApiLabels { op: op.to_string() };
        self.api_requests.get_or_create(&labels).inc();
        if result.is_err() {
            self.api_errors.get_or_create(&labels).inc();
        }
    }

    /// Exports the link's counters kept by the link itself.
    pub fn register_link(&mut self, stats: &crate::link::LinkStats) {
        self.registry.register(
            "device_sessions_cut_over_budget",
            "Device sessions cut because the device sent more than its input budget",
            stats.sessions_cut_over_budget.clone(),
        );
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

/// Errors of the operations endpoint.
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
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(%error, "accepting on the operations endpoint");
                continue;
            }
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
        m.api::<(), ()>("apply_node", &Err(()));
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
