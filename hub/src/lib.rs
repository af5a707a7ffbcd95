//! fleetlet-hub: presents Flightctl devices as Kubernetes nodes and relays their pods.
#![forbid(unsafe_code)]

pub mod cli;
pub mod inventory;
pub mod link;
