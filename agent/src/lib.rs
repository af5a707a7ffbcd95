//! fleetlet-agent: keeps a device's desired pods on local disk and reconciles them against Podman.
#![forbid(unsafe_code)]

pub mod cli;
pub mod link;
