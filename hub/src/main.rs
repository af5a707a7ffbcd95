//! Thin binary: parse the command line and hand over to the library.
#![forbid(unsafe_code)]

use clap::Parser;
use fleetlet_hub::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run => eprintln!("fleetlet-hub run: not implemented yet"),
    }
    std::process::ExitCode::from(70)
}
