//! `ioreq-mux dm`: a built-in PCIe endpoint (IDs, class, BARs, a PCI Express capability, and
//! in its 4 KiB configuration space a Device Serial Number extended capability at 0x100
//! chained to an Advanced Error Reporting one at 0x140) served from its own process,
//! connected to a multiplexer's device-model socket (docs/dm-protocol.md).
//!
//! ```text
//! ioreq-mux dm --socket /run/ioreq-mux/dm.sock --server vgpu \
//!     --at 00:05.0 --vendor 0x10de --device 0x1eb8 --class 0x030000 \
//!     --bar mem64:0x100000 --bar io:0x40 --serial 0x1122334455667788
//! ioreq-mux dm --socket /run/ioreq-mux/dm.sock --server vgpu --config dm.toml
//! ```
//!
//! With `--config`, the server's `[server.function."..."]` tables (and `owns.ports` /
//! `owns.mmio` as fixed register ranges) define the model when its `kind` is `emulated`; a
//! `kind = "process"` entry (the multiplexer's view: its `owns` is the grant, not a claim)
//! contributes nothing but the name check, and the function comes from the flags.
//!
//! The multiplexer must list the server as `kind = "process"` with an `owns` that covers
//! the function and every place firmware may put its BARs.
//!
//! # Exit codes
//! | code | meaning |
//! |------|---------|
//! | 0 | stopped: SIGINT/SIGTERM (the server is destroyed first), or the multiplexer shut down |
//! | 1 | the connection failed or was dropped (and `--reconnect-ms` was not given or gave up), or the multiplexer refused the server (name, uid, grant) |
//! | 2 | bad arguments or configuration |

use crate::config::{Config, ServerKind, parse_placement, parse_range};
use crate::models::{BarKind, BarSpec, EmulatedModel, FunctionKind, FunctionSpec};
use ioreq_server::RangeKind;
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::oop::wire::Code;
use ioreq_server::oop::{ClientError, ClientOptions, Ended, Stopper, serve_with};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tracing::{error, info, warn};

fn parse_num<T: TryFrom<u64>>(t: &str) -> Result<T, String> {
    let t = t.trim();
    let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(&h.replace('_', ""), 16),
        None => t.replace('_', "").parse(),
    }
    .map_err(|_| format!("'{t}' is not a number"))?;
    T::try_from(v).map_err(|_| format!("{t} is out of range"))
}

fn parse_u8(t: &str) -> Result<u8, String> {
    parse_num(t)
}

fn parse_u16(t: &str) -> Result<u16, String> {
    parse_num(t)
}

fn parse_u32(t: &str) -> Result<u32, String> {
    parse_num(t)
}

fn parse_u64(t: &str) -> Result<u64, String> {
    parse_num(t)
}

/// `KIND:SIZE[:prefetch]` with KIND `io`, `mem32` or `mem64`.
pub fn parse_bar(t: &str) -> Result<BarSpec, String> {
    let mut parts = t.split(':');
    let kind = match parts.next().unwrap_or_default() {
        "io" => BarKind::Io,
        "mem32" => BarKind::Mem32,
        "mem64" => BarKind::Mem64,
        k => return Err(format!("BAR kind '{k}' is not io, mem32 or mem64")),
    };
    let size: u64 = parse_num(parts.next().ok_or("BAR needs KIND:SIZE")?)?;
    let prefetchable = match parts.next() {
        None => false,
        Some("prefetch") => true,
        Some(o) => return Err(format!("unknown BAR flag '{o}' (prefetch)")),
    };
    if parts.next().is_some() {
        return Err("BAR is KIND:SIZE[:prefetch]".into());
    }
    let bar = BarSpec {
        kind,
        size,
        prefetchable,
    };
    bar.check().map_err(|e| e.to_string())?;
    Ok(bar)
}

fn parse_bufioreq(t: &str) -> Result<BufioreqMode, String> {
    match t {
        "off" => Ok(BufioreqMode::Off),
        "legacy" => Ok(BufioreqMode::Legacy),
        "atomic" => Ok(BufioreqMode::Atomic),
        o => Err(format!("'{o}' is not off, legacy or atomic")),
    }
}

/// Arguments of `ioreq-mux dm`.
#[derive(clap::Args, Debug, Clone)]
pub struct DmArgs {
    /// The multiplexer's device-model socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// The server's name in the multiplexer's configuration (`kind = "process"`).
    #[arg(long)]
    pub server: String,
    /// A configuration file (a topology, docs/configuration.md) whose `[[server]]` of this
    /// name describes the model: its functions, BARs and fixed ranges. Without it, the
    /// flags below describe one function.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the function given by flags sits: a BDF (`00:05.0`) or a position behind
    /// bridges (`00:02.0/00.0`).
    #[arg(long, value_name = "BDF|POSITION")]
    pub at: Option<String>,
    /// Vendor ID of the function (register 0x00), e.g. 0x1af4.
    #[arg(long, value_parser = parse_u16)]
    pub vendor: Option<u16>,
    /// Device ID of the function (register 0x02).
    #[arg(long, value_parser = parse_u16)]
    pub device: Option<u16>,
    /// Class code: base class, subclass, programming interface.
    #[arg(long, value_parser = parse_u32, default_value = "0xff0000")]
    pub class: u32,
    /// Revision ID (register 0x08).
    #[arg(long, value_parser = parse_u8, default_value = "0")]
    pub revision: u8,
    /// A BAR as KIND:SIZE[:prefetch], KIND io, mem32 or mem64; repeat for more (in order).
    #[arg(long = "bar", value_parser = parse_bar, value_name = "KIND:SIZE")]
    pub bars: Vec<BarSpec>,
    /// A conventional PCI function (256-byte config space, no PCIe capabilities).
    #[arg(long)]
    pub no_pcie: bool,
    /// Leave out the Advanced Error Reporting extended capability. By default a PCIe function
    /// has two, chained: Device Serial Number at 0x100, then AER at 0x140 (PCIe base spec 4.0,
    /// 7.8.4: status bits write-1-to-clear, masks and severities writable, spec defaults).
    #[arg(long)]
    pub no_aer: bool,
    /// Device Serial Number (extended capability at 0x100).
    #[arg(long, value_parser = parse_u64, default_value = "0")]
    pub serial: u64,
    /// Subsystem vendor ID (register 0x2c).
    #[arg(long, value_parser = parse_u16, default_value = "0")]
    pub subsystem_vendor: u16,
    /// Subsystem ID (register 0x2e).
    #[arg(long, value_parser = parse_u16, default_value = "0")]
    pub subsystem: u16,
    /// Fixed port registers (A, A-B or A+LEN), repeatable.
    #[arg(long = "ports", value_name = "RANGE")]
    pub ports: Vec<String>,
    /// Fixed MMIO registers (A, A-B or A+LEN), repeatable.
    #[arg(long = "mmio", value_name = "RANGE")]
    pub mmio: Vec<String>,
    /// Buffered ring to ask for: off, legacy or atomic.
    #[arg(long, value_parser = parse_bufioreq, default_value = "atomic")]
    pub bufioreq: BufioreqMode,
    /// Keep polling the slots this many microseconds after a request before sleeping.
    #[arg(long, default_value_t = 0)]
    pub spin_us: u64,
    /// After the connection is lost, connect again after this many milliseconds (with a
    /// fresh model: the device resets, as after a crash).
    #[arg(long)]
    pub reconnect_ms: Option<u64>,
    /// With --reconnect-ms: give up after this many connections (0: never).
    #[arg(long, default_value_t = 0)]
    pub max_connections: u32,
}

impl DmArgs {
    /// Arguments for a function at `at`, everything else default.
    pub fn new(socket: PathBuf, server: &str) -> Self {
        DmArgs {
            socket,
            server: server.to_string(),
            config: None,
            at: None,
            vendor: None,
            device: None,
            class: 0xff0000,
            revision: 0,
            bars: vec![],
            no_pcie: false,
            no_aer: false,
            serial: 0,
            subsystem_vendor: 0,
            subsystem: 0,
            ports: vec![],
            mmio: vec![],
            bufioreq: BufioreqMode::Atomic,
            spin_us: 0,
            reconnect_ms: None,
            max_connections: 0,
        }
    }
}

/// Builds the model the arguments describe.
pub fn build_model(a: &DmArgs) -> Result<EmulatedModel, String> {
    let mut m = EmulatedModel::new(&a.server);
    let mut parts = 0usize;
    if let Some(path) = &a.config {
        let cfg = Config::load(path).map_err(|e| e.to_string())?;
        let s = cfg
            .servers
            .iter()
            .find(|s| s.name == a.server)
            .ok_or_else(|| format!("{}: no server named '{}'", path.display(), a.server))?;
        match s.kind {
            ServerKind::Emulated => {
                m = s.emulated_model();
                parts += s.functions.len() + s.claims.len();
            }
            ServerKind::Process => {}
            ServerKind::Trace => {
                return Err(format!(
                    "{}: server '{}' is a trace server",
                    path.display(),
                    a.server
                ));
            }
        }
    }
    if let Some(at) = &a.at {
        let placement = parse_placement(at).map_err(|e| format!("--at: {e}"))?;
        let spec = FunctionSpec {
            vendor: a.vendor.ok_or("--at needs --vendor")?,
            device: a.device.ok_or("--at needs --device")?,
            class: a.class,
            revision: a.revision,
            kind: FunctionKind::Endpoint,
            multifunction: false,
            bars: a.bars.clone(),
            pcie: !a.no_pcie,
            aer: !a.no_aer,
            subsystem_vendor: a.subsystem_vendor,
            subsystem: a.subsystem,
            serial: a.serial,
        };
        spec.check().map_err(|e| format!("--at {at}: {e}"))?;
        m = m.with_function(placement, &spec);
        parts += 1;
    } else if a.vendor.is_some() || a.device.is_some() || !a.bars.is_empty() {
        return Err(
            "--vendor, --device and --bar describe a function: give its place with --at".into(),
        );
    }
    for (kind, list, flag) in [
        (RangeKind::Port, &a.ports, "--ports"),
        (RangeKind::Mmio, &a.mmio, "--mmio"),
    ] {
        for t in list {
            m = m.with_range(parse_range(kind, t).map_err(|e| format!("{flag} {t}: {e}"))?);
            parts += 1;
        }
    }
    if parts == 0 {
        return Err(
            "nothing to serve: give a function with --at/--vendor/--device, or --config with the server's functions"
                .into(),
        );
    }
    Ok(m)
}

/// Stops `stopper` on SIGINT or SIGTERM (blocked in this thread, which must be the one that
/// serves: threads it starts inherit the mask).
fn stop_on_signals(stopper: &Stopper) {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    if set.thread_block().is_err() {
        return;
    }
    let Ok(sfd) = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC) else {
        let _ = set.thread_unblock();
        return;
    };
    let s = stopper.clone();
    let spawned = std::thread::Builder::new()
        .name("dm-signals".into())
        .spawn(move || {
            if let Ok(Some(sig)) = sfd.read_signal() {
                info!(signal = sig.ssi_signo, "stopping");
                s.stop();
            }
        });
    if spawned.is_err() {
        let _ = set.thread_unblock();
    }
}

/// Runs `ioreq-mux dm`.
pub fn run(a: &DmArgs) -> ExitCode {
    if let Err(e) = build_model(a) {
        eprintln!("ioreq-mux dm: {e}");
        return ExitCode::from(2);
    }
    let stopper = match Stopper::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ioreq-mux dm: {e}");
            return ExitCode::from(1);
        }
    };
    stop_on_signals(&stopper);
    let opts = ClientOptions {
        bufioreq: a.bufioreq,
        spin: Duration::from_micros(a.spin_us),
        stop: Some(stopper),
    };
    let mut connections = 0u32;
    loop {
        let mut model = match build_model(a) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("ioreq-mux dm: {e}");
                return ExitCode::from(2);
            }
        };
        connections += 1;
        let r = serve_with(&a.socket, &mut model, &opts);
        let fatal = match &r {
            Ok(Ended::Stopped) => {
                info!(server = %a.server, "stopped");
                return ExitCode::SUCCESS;
            }
            Ok(Ended::Closed { code, message }) => {
                info!(server = %a.server, %code, %message, "the multiplexer closed the connection");
                if *code == Code::ESHUTDOWN {
                    return ExitCode::SUCCESS;
                }
                false
            }
            // The multiplexer's configuration refuses us: trying again will not help.
            Err(ClientError::Attach(_)) => true,
            Err(ClientError::Refused { code, .. }) => {
                matches!(
                    *code,
                    Code::EACCES | Code::ENOENT | Code::EPERM | Code::EINVAL
                )
            }
            Err(_) => false,
        };
        if let Err(e) = &r {
            error!(server = %a.server, error = %e, "device model connection ended");
        }
        let again = a
            .reconnect_ms
            .filter(|_| !fatal && (a.max_connections == 0 || connections < a.max_connections));
        match again {
            Some(ms) => {
                warn!(server = %a.server, after_ms = ms, "reconnecting");
                std::thread::sleep(Duration::from_millis(ms));
            }
            None => return ExitCode::from(1),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bar_syntax() {
        assert_eq!(
            parse_bar("mem64:0x100000:prefetch").unwrap(),
            BarSpec {
                kind: BarKind::Mem64,
                size: 0x10_0000,
                prefetchable: true
            }
        );
        assert_eq!(parse_bar("io:32").unwrap().kind, BarKind::Io);
        assert!(parse_bar("io:32:prefetch").is_err());
        assert!(parse_bar("mem32:3000").is_err());
        assert!(parse_bar("rom:4096").is_err());
        assert!(parse_bar("mem32").is_err());
    }

    #[test]
    fn model_from_flags_or_config() {
        let mut a = DmArgs::new("/nonexistent".into(), "ep");
        assert!(build_model(&a).unwrap_err().contains("nothing to serve"));
        a.vendor = Some(0x1af4);
        assert!(build_model(&a).unwrap_err().contains("--at"));
        a.at = Some("00:05.0".into());
        assert!(build_model(&a).unwrap_err().contains("--device"));
        a.device = Some(0x1337);
        a.bars = vec![parse_bar("mem32:0x1000").unwrap()];
        build_model(&a).unwrap();
        a.ports = vec!["0x10000".into()];
        assert!(build_model(&a).unwrap_err().contains("--ports"));
    }
}
