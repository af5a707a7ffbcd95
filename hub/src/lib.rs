//! fleetlet-hub: presents Flightctl devices as Kubernetes nodes and relays their pods.
#![forbid(unsafe_code)]

pub mod agentless;
pub mod app;
pub mod cli;
pub mod config;
pub mod devices;
pub mod events;
pub mod inventory;
pub mod kubelet_api;
pub mod kubeutil;
pub mod labels;
pub mod leader;
pub mod link;
pub mod metrics;
pub mod node_stats;
pub mod nodes;
pub mod pki;
pub mod pods;
pub mod quantity;
pub mod run;
pub mod workqueue;
pub use link::sessions;
