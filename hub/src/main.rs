//! Thin binary: parse the command line, set up logging, load the configuration and hand over
//! to the library; SIGTERM/SIGINT drain the hub.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use fleetlet_hub::cli::{Cli, Command};
use fleetlet_hub::config::HubConfig;
use tracing_subscriber::EnvFilter;

/// sysexits EX_CONFIG.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_tracing(&args.log_format);
            let cfg = match HubConfig::load(args.config.as_deref(), &args.overrides()) {
                Ok(c) => c,
                Err(e) => {
                    fleetlet_proto::errln!("fleetlet-hub: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let code = e
                        .downcast_ref::<fleetlet_hub::run::RunError>()
                        .filter(|r| r.is_config())
                        .map_or(1, |_| EXIT_CONFIG);
                    tracing::error!(error = %format!("{e:#}"), "fleetlet-hub stopped");
                    ExitCode::from(code)
                }
            }
        }
        Command::Pki(args) => match fleetlet_hub::pki::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                fleetlet_proto::errln!("fleetlet-hub pki: {error}");
                ExitCode::FAILURE
            }
        },
    }
}

fn init_tracing(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(cfg: HubConfig) -> anyhow::Result<()> {
    fleetlet_os::process::run_until_signalled(
        fleetlet_os::process::Runtime::MultiThread,
        |shutdown| async move {
            fleetlet_hub::run::run(cfg, shutdown).await?;
            Ok(())
        },
    )
}
