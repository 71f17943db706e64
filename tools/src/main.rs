//! The `ioreq-mux` command: serve a guest on Xen, replay recorded traces, import QEMU traces,
//! inspect a layout, run benchmarks, run a device model out of process, or write the ACPI
//! tables for the configured ECAM windows.

use clap::{Parser, Subcommand};
use ioreq_mux::{inspect, qemu_import, replay};
use std::io::IsTerminal;
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
    Serve(ioreq_mux::serve::ServeArgs),
    /// Replay a trace through the simulated hypervisor, the multiplexer and simulated device
    /// models; exit 0 only when every access matched the recording.
    Replay(replay::ReplayArgs),
    /// Convert a QEMU `log` trace (memory_region_ops + pci_cfg events) into a replayable trace.
    ImportQemuTrace(qemu_import::ImportArgs),
    /// Show where everything is connected and where a new device can go: the bus tree with
    /// every function, its owner, BARs and windows; free device and bus numbers and hot-plug
    /// per bus; claims and intercepts. From a topology, optionally after replaying a trace;
    /// `--json` for tools (docs/inspect.md).
    Inspect(inspect::InspectArgs),
    /// Measure the multiplexer against Xen-style dispatch and the machine's floors.
    Bench(ioreq_mux::bench::BenchArgs),
    /// Run a built-in device model in its own process, connected to a multiplexer.
    Dm(ioreq_mux::dm::DmArgs),
    /// Write the ACPI tables (MCFG and an SSDT reserving each window) a guest needs to use the
    /// configuration's [[engine.ecam]] windows, for xl's `acpi_firmware=`.
    AcpiTables(ioreq_mux::acpi::AcpiTablesArgs),
    /// (internal) One trace server of `replay --dm-mode process`.
    #[command(hide = true)]
    ReplayDm(ioreq_mux::replay_dm::ReplayDmArgs),
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
            Cmd::ReplayDm(_) => "replay-dm",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = ioreq_mux::logging::init(&cli.log, cli.cmd.default_log()) {
        eprintln!("ioreq-mux {}: {e}", cli.cmd.name());
        return ExitCode::from(2);
    }
    match cli.cmd {
        Cmd::Serve(a) => ioreq_mux::serve::run(&a),
        Cmd::Dm(a) => ioreq_mux::dm::run(&a),
        Cmd::ReplayDm(a) => ioreq_mux::replay_dm::run(&a),
        Cmd::Replay(a) => {
            let progress = !a.json && std::io::stderr().is_terminal();
            let opts = replay::ReplayOptions {
                show: a.show,
                limit: a.limit,
                progress,
                dm_mode: a.dm_mode,
                kill: None,
                dm_exe: None,
            };
            match replay::replay_with(&a.trace, &a.topology, &opts).map(|(r, _)| r) {
                Ok(r) => {
                    if a.json {
                        match serde_json::to_string(&r) {
                            Ok(j) => ioreq_mux::outln!("{j}"),
                            Err(e) => {
                                eprintln!("ioreq-mux replay: {e}");
                                return ExitCode::from(1);
                            }
                        }
                    } else {
                        ioreq_mux::outln!("{r}");
                    }
                    if r.divergences == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("ioreq-mux replay: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::ImportQemuTrace(a) => match qemu_import::run(&a) {
            Ok(stats) => {
                if a.json {
                    match serde_json::to_string(&stats) {
                        Ok(j) => ioreq_mux::outln!("{j}"),
                        Err(e) => {
                            eprintln!("ioreq-mux import-qemu-trace: {e}");
                            return ExitCode::from(1);
                        }
                    }
                } else {
                    ioreq_mux::outln!("{stats}");
                }
                ExitCode::SUCCESS
            }
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
            Ok(windows) => {
                for w in &windows {
                    eprintln!("ioreq-mux acpi-tables: {w}");
                }
                eprintln!(
                    "ioreq-mux acpi-tables: wrote MCFG and SSDT for {} window(s) to {}",
                    windows.len(),
                    a.output.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ioreq-mux acpi-tables: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Cmd::Bench(a) => ioreq_mux::bench::run(&a),
    }
}
