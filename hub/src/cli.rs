//! Command line of `fleetlet-hub`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Overrides;

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
    Run(RunArgs),
    /// Create a development PKI for the device link (CA, hub and device certificates).
    Pki(crate::pki::PkiArgs),
}

/// Flags of `fleetlet-hub run`; each overrides the matching value of the config file.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "FLEETLET_HUB_CONFIG")]
    pub config: Option<PathBuf>,
    /// kubeconfig to use instead of in-cluster config / $KUBECONFIG.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long)]
    pub ops_listen: Option<SocketAddr>,
    /// Static inventory file.
    #[arg(long)]
    pub inventory_file: Option<PathBuf>,
    /// Address of the kubelet API (HTTPS).
    #[arg(long)]
    pub kubelet_listen: Option<SocketAddr>,
    /// Address written into every Node for the API server to reach the kubelet API (in a
    /// cluster: the pod IP, so each new leader points the Nodes at itself).
    #[arg(long, env = "FLEETLET_KUBELET_ADVERTISE_ADDRESS")]
    pub kubelet_advertise_address: Option<std::net::IpAddr>,
    /// Take part in leader election.
    #[arg(long)]
    pub leader_elect: Option<bool>,
    /// This replica's identity for leader election and events.
    #[arg(long)]
    pub identity: Option<String>,
    /// Log format: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl RunArgs {
    /// The flag values that override the config file.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            kubeconfig: self.kubeconfig.clone(),
            ops_listen: self.ops_listen,
            inventory_file: self.inventory_file.clone(),
            kubelet_listen: self.kubelet_listen,
            kubelet_advertise_address: self.kubelet_advertise_address,
            leader_elect: self.leader_elect,
            identity: self.identity.clone(),
        }
    }
}
