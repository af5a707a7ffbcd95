//! Prints the fault suite's table and fails when a fault did not recover or lost or duplicated pods.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    let path = fleetlet_faults::report_path();
    let outcomes = match fleetlet_faults::read_report(&path) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("faults-summary: {e}");
            return ExitCode::from(2);
        }
    };
    if outcomes.is_empty() {
        eprintln!("faults-summary: no outcomes in {}", path.display());
        return ExitCode::from(2);
    }
    print!("{}", fleetlet_faults::render_table(&outcomes));
    let failed = outcomes
        .iter()
        .filter(|o| !fleetlet_faults::passed(o))
        .count();
    println!(
        "{} faults, {} recovered with nothing lost or duplicated, {} failed",
        outcomes.len(),
        outcomes.len() - failed,
        failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
