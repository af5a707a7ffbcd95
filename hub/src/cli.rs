//! Command line of `fleetlet-hub`.

use clap::{Parser, Subcommand};

/// fleetlet-hub presents every enabled Flightctl device as a Kubernetes Node and relays the
/// pods bound to those nodes to the devices over gRPC with mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "fleetlet-hub", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The hub's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the hub (in the cluster).
    Run,
}
