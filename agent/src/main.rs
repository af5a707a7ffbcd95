//! Thin binary: parse the command line, load the configuration, set up logging, run.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use fleetlet_agent::cli::{Cli, Command};
use fleetlet_agent::{app, logging, statusfile};
use tokio_util::sync::CancellationToken;

/// sysexits EX_USAGE/EX_CONFIG-style code for configuration errors.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, cfg) = match cli.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleetlet-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Command::CheckConfig { .. } => match cfg.validate(&path) {
            Ok(()) => {
                println!("{}: ok (device {})", path.display(), cfg.device_name);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fleetlet-agent: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Status { json, .. } => match statusfile::read(&cfg.state_dir) {
            Ok(f) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&f).unwrap_or_default());
                } else {
                    print!("{}", statusfile::render(&f));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fleetlet-agent: {e}");
                ExitCode::from(1)
            }
        },
        Command::Run { desired_file, .. } => {
            if let Err(e) = cfg.validate(&path) {
                eprintln!("fleetlet-agent: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            logging::init();
            match run(cfg, app::RunOptions { desired_file }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "fleetlet-agent failed");
                    eprintln!("fleetlet-agent: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn run(cfg: fleetlet_agent::config::AgentConfig, opts: app::RunOptions) -> anyhow::Result<()> {
    // One thread is plenty for a device agent and keeps its footprint small.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signals.cancel();
        });
        app::run(cfg, opts, shutdown).await?;
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
