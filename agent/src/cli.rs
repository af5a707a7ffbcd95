//! Command line of `fleetlet-agent`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{AgentConfig, ConfigError, DEFAULT_CONFIG};

/// fleetlet-agent runs a device's Kubernetes pods with Podman and keeps them running,
/// with or without a link to fleetlet-hub.
#[derive(Debug, Parser)]
#[command(name = "fleetlet-agent", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML). Optional when it is the default path and missing.
    #[arg(long, global = true, env = "FLEETLET_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags that override configuration keys.
#[derive(Debug, Clone, Default, Args)]
pub struct Overrides {
    /// Device name (`device_name`).
    #[arg(long)]
    pub device_name: Option<String>,
    /// State directory (`state_dir`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Podman API socket (`podman_socket`).
    #[arg(long)]
    pub podman_socket: Option<PathBuf>,
    /// Seconds between full resyncs (`resync_secs`).
    #[arg(long)]
    pub resync_secs: Option<u64>,
}

/// The agent's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (started by systemd on a device).
    Run {
        /// Overrides applied on top of the file.
        #[command(flatten)]
        overrides: Overrides,
        /// Take the desired pod set from this JSON file (see docs/agent.md), no hub needed.
        #[arg(long)]
        desired_file: Option<PathBuf>,
    },
    /// Show what this device holds and runs, from local state (works offline).
    Status {
        /// Overrides applied on top of the file.
        #[command(flatten)]
        overrides: Overrides,
        /// Print the status file as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the configuration file and exit (64 when it is invalid).
    CheckConfig {
        /// Overrides applied on top of the file.
        #[command(flatten)]
        overrides: Overrides,
    },
}

impl Cli {
    /// Load the configuration file and apply the flags.
    pub fn load_config(&self) -> Result<(PathBuf, AgentConfig), ConfigError> {
        let (path, required) = match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let mut cfg = AgentConfig::load(&path, required)?;
        let o = match &self.command {
            Command::Run { overrides, .. }
            | Command::Status { overrides, .. }
            | Command::CheckConfig { overrides } => overrides,
        };
        if let Some(v) = &o.device_name {
            cfg.device_name = v.clone();
        }
        if let Some(v) = &o.state_dir {
            cfg.state_dir = v.clone();
        }
        if let Some(v) = &o.podman_socket {
            cfg.podman_socket = v.clone();
        }
        if let Some(v) = o.resync_secs {
            cfg.resync_secs = v;
        }
        Ok((path, cfg))
    }
}
