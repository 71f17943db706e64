//! `ioreq-mux import-qemu-trace`: the command around the importer crate
//! ([`ioreq_mux_qemu_import`]), which this module re-exports.

pub use ioreq_mux_qemu_import::*;
use std::path::PathBuf;

/// `import-qemu-trace` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// QEMU trace log (QEMU's `log` trace backend output), plain text or zstd-compressed
    /// (detected by magic bytes)
    pub input: PathBuf,
    /// Trace to write (the ioreq-mux trace format; conventionally NAME.trace.zst)
    #[arg(short, long)]
    pub output: PathBuf,
    /// Count and skip malformed lines instead of stopping at the first one
    #[arg(long)]
    pub lenient: bool,
    /// Print the import statistics as JSON on stdout instead of the human summary
    #[arg(long)]
    pub json: bool,
}

/// Imports `args.input` into `args.output` and returns the statistics. A progress bar is drawn
/// on stderr when it is a terminal. Nothing is printed on stdout: the caller prints the summary
/// (the `Display` of [`ImportStats`], or its JSON when `args.json`).
pub fn run(args: &ImportArgs) -> Result<ImportStats, ImportError> {
    let opts = ImportOptions {
        lenient: args.lenient,
        progress: crate::out::progress_handle(
            "{spinner} [{elapsed_precise}] {wide_bar} {percent}% {bytes}/{total_bytes} of log \
             text ({bytes_per_sec}, eta {eta}) {msg}",
            "{spinner} [{elapsed_precise}] {bytes} of log text ({bytes_per_sec}) {msg}",
        ),
    };
    import_file(&args.input, &args.output, &opts)
}
