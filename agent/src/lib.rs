//! fleetlet-agent: keeps a device's desired pods on local disk and reconciles them against Podman.
#![forbid(unsafe_code)]

pub mod cli;
pub mod fsutil;
pub mod link;
pub mod pod;
pub mod podman;
pub mod store;
