//! The hub's end of the device link: `fleetlet.v1.DeviceLink/Connect` over mutual TLS 1.3.
//!
//! [`DeviceSessions`] is the API the rest of the hub uses (set a device's desired pods, watch
//! sessions and statuses, open log streams); [`serve`] runs the gRPC server that feeds it.

pub mod budget;
mod server;
pub mod sessions;
mod streams;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::inventory::Inventory;

use serde::{Deserialize, Serialize};

pub use server::LinkServer;
pub use sessions::{
    DeviceSessions, INFLIGHT_BYTES_PER_DEVICE, InFlight, LinkStats, SessionEvent, SessionLimits,
};
#[cfg(test)]
pub(crate) use streams::route as route_stream_message;
pub use streams::{OUTPUT_WINDOW, StreamEvent, StreamInput, StreamOutput};
pub use tls::{device_identity as identity_of, flightctl_fingerprint};

/// Errors of the link API and server.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// The device has no live session (offline, or not yet reconnected). Retryable later.
    #[error("device {device} is not connected")]
    NotConnected {
        /// Device name.
        device: String,
    },
    /// The device's outbound queue is full (it is not reading). Retryable later.
    #[error("link to device {device} is congested")]
    Congested {
        /// Device name.
        device: String,
    },
    /// The device reported an error for a log request. Not retryable as is.
    #[error("device {device}: {message}")]
    Device {
        /// Device name.
        device: String,
        /// What the device said.
        message: String,
    },
    /// The log consumer did not keep up and its stream was cancelled. Retryable (a new
    /// request).
    #[error("log stream {request_id} of device {device} cancelled: consumer too slow")]
    SlowConsumer {
        /// Device name.
        device: String,
        /// The log request.
        request_id: u64,
    },
    /// The device has as many exec/attach/port-forward streams open as allowed.
    #[error(
        "device {device} already has {limit} exec/attach/port-forward sessions open (at most {limit} at once: [kubelet] max_streams_per_device); close one and retry"
    )]
    TooManyStreams {
        /// Device name.
        device: String,
        /// The limit.
        limit: usize,
    },
    /// The stream ended (the device closed it, or the link dropped).
    #[error("the stream to device {device} has ended")]
    StreamEnded {
        /// Device name.
        device: String,
    },
    /// TLS material could not be loaded. Not retryable until the files are fixed.
    #[error("TLS material {path}: {message}")]
    Tls {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The listener could not be bound or failed. Not retryable: the hub exits.
    #[error("link listener {addr}: {message}")]
    Listen {
        /// Listen address.
        addr: SocketAddr,
        /// What the OS said.
        message: String,
    },
}

impl LinkError {
    /// Whether the same request may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::NotConnected { .. }
            | Self::Congested { .. }
            | Self::SlowConsumer { .. }
            | Self::TooManyStreams { .. } => true,
            Self::Device { .. }
            | Self::StreamEnded { .. }
            | Self::Tls { .. }
            | Self::Listen { .. } => false,
        }
    }
}

/// Which part of a verified client certificate names the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum IdentitySource {
    /// The subject's common name (what Flightctl's device signer issues).
    #[default]
    CommonName,
    /// The first URI subject alternative name.
    UriSan,
}

/// The `[link]` table of the hub's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkServerConfig {
    /// Address the link listens on, e.g. `0.0.0.0:7443`.
    pub listen: SocketAddr,
    /// PEM bundle of the CA(s) whose client certificates are accepted (the hub's own device CA
    /// or Flightctl's device CA).
    pub client_ca_file: PathBuf,
    /// PEM serving certificate (chain allowed).
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file`.
    pub key_file: PathBuf,
    /// Which certificate field names the device.
    #[serde(default)]
    pub identity_source: IdentitySource,
    /// A prefix the identity must carry and that is stripped to get the device name
    /// (e.g. `"device:"` or `"spiffe://fleet/device/"`); empty means none.
    #[serde(default)]
    pub identity_prefix: String,
    /// HTTP/2 keepalive ping interval, in seconds.
    #[serde(default = "default_keepalive_interval_secs")]
    pub keepalive_interval_secs: u64,
    /// How long a keepalive ping may go unanswered before the connection is dropped, in seconds.
    #[serde(default = "default_keepalive_timeout_secs")]
    pub keepalive_timeout_secs: u64,
    /// How long a new stream may take to send its hello, in seconds.
    #[serde(default = "default_hello_timeout_secs")]
    pub hello_timeout_secs: u64,
    /// How long a device may leave a snapshot untaken before its session is cut, in seconds.
    #[serde(default = "default_stall_timeout_secs")]
    pub stall_timeout_secs: u64,
    /// How often the TLS files are checked for changes, in seconds.
    #[serde(default = "default_reload_interval_secs")]
    pub reload_interval_secs: u64,
    /// Warn this many days before the serving certificate or a CA expires.
    #[serde(default = "default_expiry_warning_days")]
    pub expiry_warning_days: u64,
    /// gzip snapshots sent to devices that accept it. Off by default: snapshots go out only
    /// when a device's desired state changes and are a few KiB, while gzip costs the hub
    /// lasting per-stream buffers (~2.5 KB, heaptrack) and a transient compressor per message;
    /// measured with 2,000 devices, ~7 KiB more hub RSS per connected device after a
    /// reconnect storm (docs/link.md). Turn it on for links where bytes cost more than hub memory.
    #[serde(default)]
    pub compress_snapshots: bool,
    /// Refuse client certificates without Flightctl's device-fingerprint extension (on with
    /// Flightctl-issued device certificates). A certificate that carries the extension must
    /// name the same device in it as in its identity either way.
    #[serde(default)]
    pub require_device_fingerprint: bool,
    /// What one device may send before its session is cut (`[link.device_budget]`).
    #[serde(default)]
    pub device_budget: budget::BudgetConfig,
}

fn default_keepalive_interval_secs() -> u64 {
    20
}
fn default_keepalive_timeout_secs() -> u64 {
    10
}
fn default_hello_timeout_secs() -> u64 {
    30
}
fn default_stall_timeout_secs() -> u64 {
    60
}
fn default_reload_interval_secs() -> u64 {
    30
}
fn default_expiry_warning_days() -> u64 {
    14
}

impl LinkServerConfig {
    /// A configuration with defaults for everything but the address and the TLS files.
    pub fn new(
        listen: SocketAddr,
        client_ca_file: impl Into<PathBuf>,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            listen,
            client_ca_file: client_ca_file.into(),
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            identity_source: IdentitySource::default(),
            identity_prefix: String::new(),
            keepalive_interval_secs: default_keepalive_interval_secs(),
            keepalive_timeout_secs: default_keepalive_timeout_secs(),
            hello_timeout_secs: default_hello_timeout_secs(),
            stall_timeout_secs: default_stall_timeout_secs(),
            reload_interval_secs: default_reload_interval_secs(),
            expiry_warning_days: default_expiry_warning_days(),
            compress_snapshots: false,
            require_device_fingerprint: false,
            device_budget: budget::BudgetConfig::default(),
        }
    }
}

/// Serve the device link until `shutdown` fires: accept mutual-TLS connections on
/// `config.listen`, admit devices found in `inventory`, and feed `sessions`.
pub async fn serve(
    config: LinkServerConfig,
    sessions: DeviceSessions,
    inventory: Arc<dyn Inventory>,
    shutdown: CancellationToken,
) -> Result<(), LinkError> {
    LinkServer::bind(config)
        .await?
        .serve(sessions, inventory, shutdown)
        .await
}
