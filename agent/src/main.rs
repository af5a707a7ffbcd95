//! Thin binary: parse the command line, load the configuration, set up logging, run.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use fleetlet_agent::cli::{Cli, Command};
use fleetlet_agent::{app, logging, status};
use fleetlet_proto::{errln, outln, stdio};

/// sysexits EX_USAGE/EX_CONFIG-style code for configuration errors.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, cfg) = match cli.load_config() {
        Ok(c) => c,
        Err(e) => {
            errln!("fleetlet-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Command::CheckConfig { .. } => match cfg.validate(&path) {
            Ok(()) => printed(outln!(
                "{}: ok (device {})",
                path.display(),
                cfg.device_name
            )),
            Err(e) => {
                errln!("fleetlet-agent: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Status { json, .. } => match status::report(&cfg.state_dir) {
            Ok(r) if json => match serde_json::to_string_pretty(&r) {
                Ok(text) => printed(outln!("{text}")),
                Err(e) => {
                    errln!("fleetlet-agent: encoding the status: {e}");
                    ExitCode::from(1)
                }
            },
            Ok(r) => printed(stdio::out(&status::render(&r, jiff::Timestamp::now()))),
            Err(e) => {
                errln!("fleetlet-agent: {e}");
                ExitCode::from(1)
            }
        },
        Command::Run { desired_file, .. } => {
            if let Err(e) = cfg.validate(&path) {
                errln!("fleetlet-agent: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            logging::init(&cfg.device_name);
            match run(cfg, app::RunOptions { desired_file }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "fleetlet-agent failed");
                    errln!("fleetlet-agent: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Exit code after printing to stdout: success, or 1 when stdout failed for another reason than a
/// reader that went away.
fn printed(result: std::io::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("fleetlet-agent: writing to stdout: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cfg: fleetlet_agent::config::AgentConfig, opts: app::RunOptions) -> anyhow::Result<()> {
    // One thread is plenty for a device agent and keeps its footprint small.
    fleetlet_os::process::run_until_signalled(
        fleetlet_os::process::Runtime::CurrentThread,
        |shutdown| async move {
            app::run(cfg, opts, shutdown).await?;
            Ok(())
        },
    )
}
