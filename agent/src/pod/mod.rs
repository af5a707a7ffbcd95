//! A Kubernetes pod on the device: its parsed spec, container lifecycles, volumes, probes,
//! status, and the per-pod worker that reconciles it.

pub mod atomic_writer;
pub mod downward;
#[cfg(test)]
mod field_table;
pub mod grpc_probe;
pub mod hooks;
pub mod http_get;
pub mod insecure_tls;
pub mod lifecycle;
pub mod policy;
pub mod probe;
pub mod pull_secrets;
pub mod pulled_images;
pub mod resize;
pub mod safefs;
pub mod sandbox;
pub mod security;
pub mod spec;
pub mod status;
pub mod subpath;
pub mod volumes;
pub mod worker;
