//! `ioreq-mux replay`: the command around the replay crate ([`ioreq_mux_replay`]), which
//! this module re-exports.

pub use ioreq_mux_replay::*;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct ReplayArgs {
    /// The trace (`ioreq-mux import-qemu-trace` output).
    pub trace: PathBuf,
    /// The topology: servers, what each owns, intercept settings (TOML).
    #[arg(long)]
    pub topology: PathBuf,
    /// Print one JSON object on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// How many divergences to show in full.
    #[arg(long, default_value_t = 10)]
    pub show: usize,
    /// Stop after this many accesses.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Where the non-chipset servers run: in the multiplexer's process, or each in its own
    /// process speaking the device-model protocol (docs/dm-protocol.md).
    #[arg(long, value_enum, default_value_t = DmModeArg::InProcess)]
    pub dm_mode: DmModeArg,
}

/// [`DmMode`] on the command line.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DmModeArg {
    #[default]
    InProcess,
    Process,
}

impl From<DmModeArg> for DmMode {
    fn from(m: DmModeArg) -> Self {
        match m {
            DmModeArg::InProcess => DmMode::InProcess,
            DmModeArg::Process => DmMode::Process,
        }
    }
}

impl ReplayArgs {
    /// The library's options for these arguments: a progress bar when the report is text
    /// and stderr is a terminal.
    pub fn options(&self) -> ReplayOptions {
        ReplayOptions {
            show: self.show,
            limit: self.limit,
            progress: if self.json {
                None
            } else {
                crate::out::progress_handle(
                    "{spinner} {elapsed} [{bar:30}] {percent}% {human_pos}/{human_len} accesses \
                     (eta {eta}) {msg}",
                    "{spinner} {elapsed} {human_pos} accesses replayed {msg}",
                )
            },
            dm_mode: self.dm_mode.into(),
            kill: None,
            dm_exe: None,
        }
    }
}
