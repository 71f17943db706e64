//! `ioreq-mux replay-dm`: one trace server of `replay --dm-mode process`, started by replay
//! itself (the library side is [`ioreq_mux_replay::dm`]). It prints its summary as one JSON
//! line on stdout, which replay reads.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug, Clone)]
pub struct ReplayDmArgs {
    #[arg(long)]
    pub socket: PathBuf,
    #[arg(long)]
    pub trace: PathBuf,
    #[arg(long)]
    pub topology: PathBuf,
    #[arg(long)]
    pub server: String,
}

pub fn run(a: &ReplayDmArgs) -> ExitCode {
    let args = ioreq_mux_replay::dm::ReplayDmArgs {
        socket: a.socket.clone(),
        trace: a.trace.clone(),
        topology: a.topology.clone(),
        server: a.server.clone(),
    };
    let outcome = match ioreq_mux_replay::dm::run(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ioreq-mux replay-dm: {e}");
            return ExitCode::from(2);
        }
    };
    if let Ok(j) = serde_json::to_string(&outcome.summary) {
        crate::outln!("{j}");
    }
    match outcome.error {
        None => ExitCode::SUCCESS,
        Some(e) => {
            eprintln!("ioreq-mux replay-dm {}: {e}", a.server);
            ExitCode::from(1)
        }
    }
}
