//! The `byokd` binary: everything lives in the library; this only reports the outcome, as one
//! line and an exit code (README, "Exit codes").

use std::process::ExitCode;

fn main() -> ExitCode {
    match byokd::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the error chain on one line.
            eprintln!("byokd: error: {e:#}");
            ExitCode::from(byokd::cli::exit::code(&e))
        }
    }
}
