//! The stand-alone `loadtest` command: the same flags and output as `kurz loadtest`, for driving
//! any server without the kurz binary (the comparison script uses it). Exit code 0 when the run
//! met its p99 target (or had none), 1 when it missed it, 2 on an error.

use std::process::ExitCode;

use clap::Parser;

/// Open-loop HTTP/1.1 load generator for redirect servers (kurz, nginx, HAProxy, ...).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    args: loadtest::Args,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match loadtest::run(&cli.args) {
        Ok(outcome) if outcome.target_met => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(error) => {
            eprintln!("loadtest: {error}");
            ExitCode::from(2)
        }
    }
}
