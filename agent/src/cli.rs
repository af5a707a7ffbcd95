//! Command line of `fleetlet-agent`.

use clap::{Parser, Subcommand};

/// fleetlet-agent runs a device's Kubernetes pods with Podman and keeps them running,
/// with or without a link to fleetlet-hub.
#[derive(Debug, Parser)]
#[command(name = "fleetlet-agent", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The agent's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (started by systemd on a device).
    Run,
    /// Show what this device holds and runs, from local state (works offline).
    Status,
    /// Check the configuration file and exit.
    CheckConfig,
}
