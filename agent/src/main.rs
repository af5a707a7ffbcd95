//! Thin binary: parse the command line and hand over to the library.
#![forbid(unsafe_code)]

use clap::Parser;
use fleetlet_agent::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let name = match cli.command {
        Command::Run => "run",
        Command::Status => "status",
        Command::CheckConfig => "check-config",
    };
    eprintln!("fleetlet-agent {name}: not implemented yet");
    std::process::ExitCode::from(70)
}
