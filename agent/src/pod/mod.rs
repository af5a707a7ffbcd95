//! A Kubernetes pod on the device: its parsed spec, container lifecycles, volumes, probes,
//! status, and the per-pod worker that reconciles it.

#[cfg(test)]
mod field_table;
pub mod lifecycle;
pub mod probe;
pub mod pull_secrets;
pub mod spec;
pub mod status;
pub mod volumes;
pub mod worker;
