//! The `ioreq-mux` command: serve a guest on Xen, replay recorded traces, import QEMU traces,
//! inspect a layout, run benchmarks, run a device model out of process, or write the ACPI
//! tables for the configured ECAM windows.

use clap::{CommandFactory, Parser, Subcommand};
use ioreq_mux::{inspect, qemu_import, replay};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "ioreq-mux",
    version,
    about = "Xen ioreq-server multiplexer with chipset intercepts and ECAM routing"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    log: ioreq_mux::logging::LogArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve a Xen HVM guest as its ioreq server, in front of the configured device models.
    #[command(after_help = "Examples:
  ioreq-mux serve --domid 7 --config /etc/ioreq-mux/vgpu.toml
      beside QEMU: claim from Xen only what the configured models own
  ioreq-mux serve --domid 7 --config /etc/ioreq-mux/qemu.toml --claim all \\
      --dm-socket /run/ioreq-mux/7.sock
      in front of QEMU and other models in their own processes (QEMU through the preload
      library; xl's device_model_override = the ioreq-mux-qemu wrapper does this: docs/xen.md)")]
    Serve(ioreq_mux::serve::ServeArgs),
    /// Replay a trace through the simulated hypervisor, the multiplexer and simulated device
    /// models; exit 0 only when every access matched the recording.
    #[command(after_help = "Examples:
  ioreq-mux replay seabios.trace.zst --topology configs/qemu-q35-trace.toml
  ioreq-mux replay ovmf.trace.zst --topology configs/qemu-q35-trace.toml --dm-mode process --json")]
    Replay(replay::ReplayArgs),
    /// Convert a QEMU `log` trace (memory_region_ops + pci_cfg events) into a replayable trace.
    #[command(after_help = "Example:
  ioreq-mux import-qemu-trace traces/q35/seabios.log.zst -o seabios.trace.zst
      (traces/capture.sh shows how such a log is recorded)")]
    ImportQemuTrace(qemu_import::ImportArgs),
    /// Show where everything is connected and where a new device can go: the bus tree with
    /// every function, its owner, BARs and windows; free device and bus numbers and hot-plug
    /// per bus; claims and intercepts. From a topology, optionally after replaying a trace;
    /// `--json` for tools (docs/inspect.md).
    #[command(after_help = "Examples:
  ioreq-mux inspect --topology configs/qemu-q35-trace.toml
  ioreq-mux inspect --topology configs/qemu-q35-trace.toml --trace seabios.trace.zst --json
      the layout the firmware left, and where a new function can be connected (docs/inspect.md)")]
    Inspect(inspect::InspectArgs),
    /// Measure the multiplexer against Xen-style dispatch and the machine's floors.
    #[command(after_help = "Examples:
  ioreq-mux bench --quick
  ioreq-mux bench --json > bench.json && python3 scripts/check-bench.py bench.json")]
    Bench(ioreq_mux::bench::BenchArgs),
    /// Run a built-in device model in its own process, connected to a multiplexer.
    #[command(
        after_help = "Example (a function behind QEMU's bridge 00:06.0, on a multiplexer started
with --dm-socket /run/ioreq-mux/7.sock and a kind = \"process\" server named bridge-ep):
  ioreq-mux dm --socket /run/ioreq-mux/7.sock --server bridge-ep --at 00:06.0/01.0 \\
      --vendor 0x1af4 --device 0x1338 --bar mem64:4096:prefetch"
    )]
    Dm(ioreq_mux::dm::DmArgs),
    /// Write the ACPI tables (MCFG and an SSDT reserving each window) a guest needs to use the
    /// configuration's [[engine.ecam]] windows, for xl's `acpi_firmware=`.
    #[command(after_help = "Example:
  ioreq-mux acpi-tables --config /etc/ioreq-mux/qemu.toml -o /etc/xen/ecam.aml
      then acpi_firmware = \"/etc/xen/ecam.aml\" in the guest's xl configuration")]
    AcpiTables(ioreq_mux::acpi::AcpiTablesArgs),
    /// Print a shell completion script.
    Completions(ioreq_mux::manual::CompletionsArgs),
    /// Write the manual pages (roff).
    Man(ioreq_mux::manual::ManArgs),
}

/// `ioreq-mux replay-dm ...`: one trace server of `replay --dm-mode process`, started by
/// replay itself. Parsed apart from [`Cli`] so that it is neither listed nor suggested for a
/// mistyped command.
#[derive(Parser, Debug)]
#[command(name = "ioreq-mux replay-dm")]
struct ReplayDmCli {
    #[command(flatten)]
    args: ioreq_mux::replay_dm::ReplayDmArgs,
    #[command(flatten)]
    log: ioreq_mux::logging::LogArgs,
}

impl Cmd {
    /// The log filter when no option or `$IOREQ_MUX_LOG` chooses one: the long-running
    /// commands say what they do; the others speak only of trouble.
    fn default_log(&self) -> &'static str {
        match self {
            Cmd::Serve(_) | Cmd::Dm(_) => "info",
            _ => "warn",
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Cmd::Serve(_) => "serve",
            Cmd::Replay(_) => "replay",
            Cmd::ImportQemuTrace(_) => "import-qemu-trace",
            Cmd::Inspect(_) => "inspect",
            Cmd::Bench(_) => "bench",
            Cmd::Dm(_) => "dm",
            Cmd::AcpiTables(_) => "acpi-tables",
            Cmd::Completions(_) => "completions",
            Cmd::Man(_) => "man",
        }
    }
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "replay-dm") {
        let c = ReplayDmCli::parse_from(std::env::args_os().skip(1));
        if let Err(e) = ioreq_mux::logging::init(&c.log, "warn") {
            eprintln!("ioreq-mux replay-dm: {e}");
            return ExitCode::from(2);
        }
        return ioreq_mux::replay_dm::run(&c.args);
    }
    let cli = Cli::parse();
    if let Err(e) = ioreq_mux::logging::init(&cli.log, cli.cmd.default_log()) {
        eprintln!("ioreq-mux {}: {e}", cli.cmd.name());
        return ExitCode::from(2);
    }
    match cli.cmd {
        Cmd::Serve(a) => ioreq_mux::serve::run(&a),
        Cmd::Dm(a) => ioreq_mux::dm::run(&a),
        Cmd::Completions(a) => {
            let script = ioreq_mux::manual::completions(&mut Cli::command(), a.shell);
            ioreq_mux::out::print(&String::from_utf8_lossy(&script));
            ExitCode::SUCCESS
        }
        Cmd::Man(a) => man(&a),
        Cmd::Replay(a) => replay(&a),
        Cmd::ImportQemuTrace(a) => match qemu_import::run(&a) {
            Ok(stats) => report("import-qemu-trace", &stats, a.json, ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("ioreq-mux import-qemu-trace: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Inspect(a) => match inspect::run(&a) {
            Ok(text) => {
                ioreq_mux::out::print(&text);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ioreq-mux inspect: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::AcpiTables(a) => match ioreq_mux::acpi::run(&a) {
            Ok(r) => report("acpi-tables", &r, a.json, ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("ioreq-mux acpi-tables: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Cmd::Bench(a) => ioreq_mux::bench::run(&a),
    }
}

fn man(a: &ioreq_mux::manual::ManArgs) -> ExitCode {
    let written = match &a.out_dir {
        Some(dir) => ioreq_mux::manual::write_pages(&Cli::command(), dir).map(|files| {
            for f in files {
                eprintln!("ioreq-mux man: wrote {}", f.display());
            }
        }),
        None => ioreq_mux::manual::page(Cli::command())
            .map(|roff| ioreq_mux::out::print(&String::from_utf8_lossy(&roff))),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ioreq-mux man: {e}");
            ExitCode::from(1)
        }
    }
}

/// `ioreq-mux replay`: exit 0 with no divergence, 1 with some, 2 when it could not replay.
fn replay(a: &replay::ReplayArgs) -> ExitCode {
    let opts = a.options();
    match replay::replay_with(&a.trace, &a.topology, &opts) {
        Ok((r, _)) => {
            let code = if r.divergences == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
            report("replay", &r, a.json, code)
        }
        Err(e) => {
            eprintln!("ioreq-mux replay: {e}");
            ExitCode::from(2)
        }
    }
}

/// Prints a command's report on stdout, as one JSON object with `--json`, else as text;
/// returns `code`, or 1 if the report could not be serialized.
fn report<R: serde::Serialize + std::fmt::Display>(
    command: &str,
    r: &R,
    json: bool,
    code: ExitCode,
) -> ExitCode {
    if !json {
        ioreq_mux::outln!("{r}");
        return code;
    }
    match serde_json::to_string(r) {
        Ok(j) => {
            ioreq_mux::outln!("{j}");
            code
        }
        Err(e) => {
            eprintln!("ioreq-mux {command}: {e}");
            ExitCode::from(1)
        }
    }
}
