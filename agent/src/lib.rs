//! fleetlet-agent: keeps a device's desired pods on local disk and reconciles them against Podman.
#![forbid(unsafe_code)]

pub mod app;
pub mod cli;
pub mod config;
pub mod desired_file;
pub mod device_state;
pub mod events;
pub mod link;
pub mod link_status;
pub mod logging;
pub mod node;
pub mod notify;
pub mod pod;
pub mod podman;
pub mod reconcile_stats;
pub mod reconciler;
pub mod registry_auth;
pub mod resource_stats;
pub mod status;
pub mod statusfile;
pub mod store;
pub mod stream_sessions;
