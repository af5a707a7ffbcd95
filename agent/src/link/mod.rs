//! The agent's end of the device link: one long-lived gRPC stream to fleetlet-hub over mutual TLS.
//!
//! The link never owns device state. It asks the rest of the agent through [`DeviceState`]:
//! snapshots are persisted by `apply_snapshot` *before* the hub gets an `Ack`, and statuses are
//! read from watch channels, so a reconnect simply resends the current level (full resync)
//! instead of replaying edges that might have been lost.

mod client;
pub mod memory;
mod streams;
mod tls;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleetlet_proto::v1;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Current status of every pod the device knows, keyed by pod UID.
pub type PodStatusMap = Arc<BTreeMap<String, v1::PodStatusEntry>>;

pub use streams::{StreamControl, StreamIo, StreamOutput};

/// A container log as a stream of chunks; an `Err` ends the stream with that message.
pub type LogStream = BoxStream<'static, Result<bytes::Bytes, String>>;

/// What the link needs from the rest of the agent. Implemented by the agent's device state and
/// handed to [`run_link`].
#[tonic::async_trait]
pub trait DeviceState: Send + Sync + 'static {
    /// The link connected, failed or stopped (for `fleetlet-agent status`); ignored by default.
    fn link_changed(&self, _event: crate::link_status::LinkEvent) {}
    /// The device name; must equal the name in the client certificate.
    fn device_name(&self) -> String;
    /// Counters of the agent's reconcile passes, reported to the hub; none by default.
    fn reconcile_stats(&self) -> Option<std::sync::Arc<crate::reconcile_stats::ReconcileStats>> {
        None
    }
    /// The latest resource figures, each new one sent once; none by default.
    fn resource_stats(&self) -> Option<crate::resource_stats::Latest> {
        None
    }
    /// The hub wants resource figures for the next `for_secs` seconds; ignored by default.
    fn want_stats(&self, _for_secs: u32) {}
    /// Events about the device's pods to send to the hub; none by default.
    fn events(&self) -> Option<crate::events::EventRecorder> {
        None
    }
    /// Generation of the desired snapshot held on disk (0 when none).
    fn held_generation(&self) -> u64;
    /// Persist the snapshot atomically, THEN return. `Ok(false)` when it is not newer than the
    /// held one (ignored, still acknowledged). `Err` is reported to the hub as `Ack.error`.
    async fn apply_snapshot(&self, snapshot: v1::DesiredSnapshot) -> Result<bool, String>;
    /// Static facts about the device for `Hello`.
    fn hello_info(&self) -> v1::NodeInfo;
    /// Capacity; `borrow()` is the current value, changes notify.
    fn capacity(&self) -> watch::Receiver<v1::Capacity>;
    /// Current status of every pod the device knows (uid → entry); changes notify.
    fn pod_statuses(&self) -> watch::Receiver<PodStatusMap>;
    /// Stream a container's log for `kubectl logs`.
    async fn logs(&self, req: v1::LogRequest) -> Result<LogStream, String>;
    /// Opens an exec, attach or port-forward session for the hub (`kubectl exec/attach/
    /// port-forward`); the error is shown to the user.
    async fn open_stream(&self, _open: v1::StreamOpen) -> Result<StreamIo, String> {
        Err("this device does not serve exec, attach or port-forward".into())
    }
    /// Records since when (RFC 3339) the hub refuses to serve this device, `None` once it
    /// serves it again (shown by `fleetlet-agent status`).
    fn set_not_served(&self, _since: Option<String>) {}
    /// Stops and removes every pod the device runs for the hub (their secrets go with them):
    /// an empty desired set, stored like a snapshot from the hub.
    async fn remove_all_pods(&self) -> Result<(), String> {
        let empty = v1::DesiredSnapshot {
            generation: self.held_generation().saturating_add(1),
            ..Default::default()
        };
        self.apply_snapshot(empty).await.map(|_| ())
    }
}

/// The `[hub]` table of the agent's configuration: where the hub is and the device's TLS material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// The hub's link endpoint, `https://host:port`.
    pub endpoint: String,
    /// More endpoints of the same hub (its other replicas), tried in turn after `endpoint` when a
    /// connection fails or a replica answers UNAVAILABLE ("not leader"). Empty when one address
    /// (e.g. a Service in front of the replicas) always reaches the leader.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_endpoints: Vec<String>,
    /// PEM bundle of the CA(s) that sign the hub's serving certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate of this device (chain allowed).
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file`.
    pub key_file: PathBuf,
    /// Upper bound of the reconnect backoff, in seconds.
    #[serde(default = "default_max_backoff_secs")]
    pub reconnect_max_backoff_secs: u64,
    /// TLS server name to verify the hub's certificate against; defaults to the endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// HTTP/2 keepalive ping interval, in seconds (interval + timeout bound half-open detection).
    #[serde(default = "default_keepalive_interval_secs")]
    pub keepalive_interval_secs: u64,
    /// How long to wait for a keepalive ping's answer before the link counts as dead, in seconds.
    #[serde(default = "default_keepalive_timeout_secs")]
    pub keepalive_timeout_secs: u64,
    /// When the hub has refused to serve this device (removed from its inventory, or disabled)
    /// for this many seconds without a break, stop and remove the pods it ran for the hub and
    /// wipe their secrets. Unset (the default) keeps them running: an inventory mistake must not
    /// wipe a fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_pods_when_not_served_secs: Option<u64>,
    /// Seconds between reports of the agent's reconcile figures (sent only when they changed).
    #[serde(default = "default_stats_interval_secs")]
    pub stats_interval_secs: u64,
}

fn default_stats_interval_secs() -> u64 {
    60
}

fn default_max_backoff_secs() -> u64 {
    60
}

fn default_keepalive_interval_secs() -> u64 {
    20
}

fn default_keepalive_timeout_secs() -> u64 {
    10
}

impl LinkConfig {
    /// A configuration with the defaults for everything but the endpoint and the TLS files.
    pub fn new(
        endpoint: impl Into<String>,
        ca_file: impl Into<PathBuf>,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            endpoint: endpoint.into(),
            fallback_endpoints: Vec::new(),
            ca_file: ca_file.into(),
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            reconnect_max_backoff_secs: default_max_backoff_secs(),
            server_name: None,
            keepalive_interval_secs: default_keepalive_interval_secs(),
            keepalive_timeout_secs: default_keepalive_timeout_secs(),
            remove_pods_when_not_served_secs: None,
            stats_interval_secs: default_stats_interval_secs(),
        }
    }

    /// Every endpoint in the order they are tried: `endpoint`, then `fallback_endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        std::iter::once(self.endpoint.clone())
            .chain(self.fallback_endpoints.iter().cloned())
            .collect()
    }

    /// Checks that every endpoint is a usable `https://host:port` (the first error wins).
    pub fn validate_endpoints(&self) -> Result<(), LinkClientError> {
        for endpoint in self.endpoints() {
            client::Target::parse(&self.for_endpoint(&endpoint))?;
        }
        Ok(())
    }

    /// This configuration aimed at `endpoint` instead (errors then name the endpoint in use).
    fn for_endpoint(&self, endpoint: &str) -> Self {
        Self {
            endpoint: endpoint.to_owned(),
            ..self.clone()
        }
    }
}

pub use fleetlet_proto::backoff::Backoff;

use crate::link_status::LinkEvent;

/// Why a connection attempt or session failed. All are retried with backoff by [`run_link`];
/// `Tls` and `Endpoint` need an operator (or a rotation) to fix the files or configuration.
#[derive(Debug, thiserror::Error)]
pub enum LinkClientError {
    /// The configured endpoint is not a usable `https://host:port`.
    #[error("hub endpoint {endpoint:?}: {message}")]
    Endpoint {
        /// The configured endpoint.
        endpoint: String,
        /// What is wrong with it.
        message: String,
    },
    /// A TLS file could not be loaded.
    #[error("link TLS material {path}: {message}")]
    Tls {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// TCP, TLS or HTTP/2 connection setup failed (hub down, unknown CA, expired certificate...).
    #[error("connecting to hub {endpoint}: {message}")]
    Connect {
        /// The hub endpoint.
        endpoint: String,
        /// The error with its causes.
        message: String,
    },
    /// The hub refused the stream (identity, inventory, hello).
    #[error("hub {endpoint} refused the link: {code:?}: {message}")]
    Rejected {
        /// The hub endpoint.
        endpoint: String,
        /// gRPC status code.
        code: tonic::Code,
        /// The hub's explanation.
        message: String,
    },
    /// The stream ended with an error (dropped connection, keepalive timeout, hub cut it).
    #[error("link to hub {endpoint} failed: {code:?}: {message}")]
    Stream {
        /// The hub endpoint.
        endpoint: String,
        /// gRPC status code.
        code: tonic::Code,
        /// The reason.
        message: String,
    },
    /// The outbound half of the stream closed under us.
    #[error("link stream closed")]
    StreamClosed,
    /// The hub does not serve this device: it is not (or no longer) in the hub's inventory, or
    /// disabled there. Retried like the others, but reported as such.
    #[error("hub {endpoint} does not serve this device: {message}")]
    NotServed {
        /// The hub endpoint.
        endpoint: String,
        /// The hub's explanation.
        message: String,
    },
}

/// What the link remembers of the hub's refusal to serve the device.
struct Refusal {
    since: tokio::time::Instant,
    pods_removed: bool,
}

/// Connect once and run one session until it ends; the error says why it could not connect or
/// why it ended. For diagnostics and tests; the agent runs [`run_link`].
pub async fn run_link_once(
    cfg: &LinkConfig,
    state: Arc<dyn DeviceState>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<(), LinkClientError> {
    let target = client::Target::parse(cfg)?;
    let mut tls = tls::ClientTls::new(
        cfg.ca_file.clone(),
        cfg.cert_file.clone(),
        cfg.key_file.clone(),
    );
    let config = tls.current()?;
    client::run_session(cfg, &target, config, &state, shutdown, || {}).await?;
    Ok(())
}

/// The current wall-clock time as RFC 3339 (seconds).
fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Delay before the first retry is drawn from `[0, RECONNECT_BASE)`, doubling per failure.
const RECONNECT_BASE: Duration = Duration::from_secs(1);

/// Keep the link to the hub up until `shutdown` fires: connect, hello, apply snapshots, report
/// status; reconnect with exponential backoff and full jitter after every failure. Never returns
/// early on errors: a device must come back on its own once the hub or its network does.
///
/// With several endpoints (hub replicas), a failed attempt or a lost session moves on to the next
/// endpoint at once; the backoff delay is taken once per round through all of them.
pub async fn run_link(
    cfg: LinkConfig,
    state: Arc<dyn DeviceState>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let device = state.device_name();
    let mut backoff = Backoff::new(
        RECONNECT_BASE,
        Duration::from_secs(cfg.reconnect_max_backoff_secs.max(1)),
    );
    let mut tls = tls::ClientTls::new(
        cfg.ca_file.clone(),
        cfg.cert_file.clone(),
        cfg.key_file.clone(),
    );
    let endpoints = cfg.endpoints();
    let mut refusal: Option<Refusal> = None;
    // Where the current round of attempts started; a full round without success backs off.
    let mut current = 0usize;
    let mut round_start = 0usize;
    while !shutdown.is_cancelled() {
        let endpoint_cfg = cfg.for_endpoint(&endpoints[current]);
        let endpoint = endpoint_cfg.endpoint.clone();
        state.link_changed(LinkEvent::Connecting {
            endpoint: endpoint.clone(),
        });
        let mut connected = false;
        let attempt = async {
            let target = client::Target::parse(&endpoint_cfg)?;
            let config = tls.current()?;
            client::run_session(&endpoint_cfg, &target, config, &state, &shutdown, || {
                connected = true;
                backoff.reset();
                state.link_changed(LinkEvent::Connected {
                    endpoint: endpoint.clone(),
                });
                if refusal.take().is_some() {
                    tracing::info!(device, endpoint = %endpoint_cfg.endpoint, "the hub serves this device again");
                    state.set_not_served(None);
                }
            })
            .await
        };
        let result = attempt.await;
        match result {
            Ok(client::SessionEnd::Shutdown) => break,
            Ok(client::SessionEnd::ClosedByHub) => {
                tracing::info!(device, endpoint = %endpoint_cfg.endpoint, "hub closed the link");
                state.link_changed(LinkEvent::Down {
                    endpoint,
                    error: "the hub closed the link".into(),
                });
            }
            Err(error @ LinkClientError::NotServed { .. }) => {
                state.link_changed(LinkEvent::Down {
                    endpoint,
                    error: error.to_string(),
                });
                let r = refusal.get_or_insert_with(|| {
                    tracing::error!(
                        device,
                        %error,
                        "the hub does not serve this device (not in its inventory, or disabled); its pods keep running"
                    );
                    state.set_not_served(Some(now_rfc3339()));
                    Refusal {
                        since: tokio::time::Instant::now(),
                        pods_removed: false,
                    }
                });
                if let Some(limit) = cfg.remove_pods_when_not_served_secs
                    && !r.pods_removed
                    && r.since.elapsed() >= Duration::from_secs(limit)
                {
                    tracing::warn!(
                        device,
                        refused_for_secs = r.since.elapsed().as_secs(),
                        "the hub has refused this device longer than remove_pods_when_not_served_secs; stopping and removing its pods"
                    );
                    match state.remove_all_pods().await {
                        Ok(()) => r.pods_removed = true,
                        Err(error) => {
                            tracing::error!(device, %error, "removing the pods of a device the hub no longer serves")
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(device, %error, "link to hub down");
                state.link_changed(LinkEvent::Down {
                    endpoint,
                    error: error.to_string(),
                });
            }
        }
        if connected {
            // A session ran here: a new round starts from this endpoint's successor.
            round_start = current;
        }
        current = (current + 1) % endpoints.len();
        if current != round_start && endpoints.len() > 1 {
            tracing::info!(device, endpoint = %endpoints[current], "trying the next hub endpoint");
            continue;
        }
        let delay = backoff.next_delay();
        tracing::debug!(
            device,
            delay_ms = delay.as_millis(),
            "reconnecting after delay"
        );
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    state.link_changed(LinkEvent::Stopped);
    tracing::info!(device, "link stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_tried_in_order_and_each_is_checked() {
        let mut cfg = LinkConfig::new("https://hub-a:7443", "ca", "cert", "key");
        cfg.fallback_endpoints = vec!["https://hub-b:7443".into()];
        assert_eq!(
            cfg.endpoints(),
            vec![
                "https://hub-a:7443".to_string(),
                "https://hub-b:7443".into()
            ]
        );
        assert!(cfg.validate_endpoints().is_ok());
        cfg.fallback_endpoints.push("http://hub-c:7443".into());
        let err = cfg.validate_endpoints().unwrap_err().to_string();
        assert!(err.contains("http://hub-c:7443"), "{err}");
    }
}
