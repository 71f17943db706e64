//! `ioreq-mux bench` (being written).

use std::process::ExitCode;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Finish in under a minute.
    #[arg(long)]
    pub quick: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_a: &BenchArgs) -> ExitCode {
    eprintln!("ioreq-mux bench: not implemented yet");
    ExitCode::from(2)
}
