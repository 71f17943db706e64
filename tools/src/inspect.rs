//! `ioreq-mux inspect`: a connectivity view of what the multiplexer holds, from a topology
//! alone or after replaying a trace. In the style of `lspci -tv` and QEMU's `info pci`: the
//! bus tree with every function under its port (IDs, class, owner, BARs with sizes and
//! owners), each bridge's bus numbers and windows, and per bus the free device numbers, the
//! free bus numbers and whether a device can be hot-plugged there; then where a new function
//! can be connected and which BDF (and topology position) it gets. `--json` prints the same as
//! one JSON object, schema [`SCHEMA`], described key by key in docs/inspect.md.
//!
//! Where the facts come from:
//! - Functions, IDs, class, BARs, bridge windows and PCIe capabilities are read through the
//!   engine as the guest would read them (`scan`): PCI_CONFIG requests to
//!   [`Engine::handle`], which routes each one to the function's owner (or master-aborts it).
//!   The bus tree is walked like firmware walks it: every device of a bus, functions 1-7 of
//!   multi-function devices, and the secondary bus of every bridge. After a trace, a trace
//!   server answers from what the trace showed of its functions (the last value read or
//!   written per byte, see `replay::recorded`); an emulated model answers from its state.
//!   Nothing in the `DeviceModel` interface exposes a model's BARs, so there is no state to
//!   read for every kind of model; reading the header is the one way that works for all.
//! - BAR sizes are sized through the owner the way firmware sizes them (PCI Local Bus spec 3.0,
//!   6.2.5.1): decoding off in the command register, all ones written, the answer read, the
//!   BAR and the command register restored. An emulated model drops and re-claims its BAR
//!   ranges on the way (same ranges at the end); a trace server gives the answer the recorded
//!   device gave when firmware sized it.
//! - Owners: the router's function table and position claims (functions), its port and MMIO
//!   tables (BARs that decode). Bus numbers of the bridges the router follows are the ones it
//!   learnt from the guest's writes; `scan` reads the same registers.
//! - Free device numbers, free bus numbers, hot-plug and the BDF a new function gets: `slots`.

mod layout;
mod names;
mod scan;
mod slots;
mod text;

use crate::engine::Engine;
use crate::replay::{ReplayError, Unrecorded, replay_engine, topology_engine};
use ioreq_server::Backend;
use serde::Serialize;
use std::path::PathBuf;
use thiserror::Error;

pub use layout::owner_runs;
pub use slots::{BusRange, SlotCaps, free_buses, free_devices, hotplug, position_of};

/// The `schema` value of `inspect --json`. Bumped when a key changes meaning or goes away;
/// new keys may appear within a version. /2: `hotplug.capable` may be null (not known).
pub const SCHEMA: &str = "ioreq-mux.inspect/2";

#[derive(clap::Args, Debug, Clone)]
pub struct InspectArgs {
    /// The topology (TOML).
    #[arg(long)]
    pub topology: PathBuf,
    /// Replay this trace first and show the layout it left.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Print one JSON object (schema `ioreq-mux.inspect/2`, docs/inspect.md) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Error)]
pub enum InspectError {
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs `inspect`: the text or the JSON to print.
pub fn run(a: &InspectArgs) -> Result<String, InspectError> {
    let (mut engine, unrecorded, replay) = match &a.trace {
        Some(t) => {
            let (report, engine, unrecorded) = replay_engine(t, &a.topology, 0, None)?;
            let replay = ReplaySummary {
                accesses: report.accesses,
                divergences: report.divergences,
            };
            (engine, unrecorded, Some(replay))
        }
        None => {
            let (engine, unrecorded) = topology_engine(&a.topology)?;
            (engine, unrecorded, None)
        }
    };
    let mut view = inspect(
        &mut engine,
        Some(&unrecorded),
        a.topology.display().to_string(),
        a.trace.as_ref().map(|t| t.display().to_string()),
    );
    view.replay = replay;
    if a.json {
        let mut j = serde_json::to_string_pretty(&view)?;
        j.push('\n');
        Ok(j)
    } else {
        Ok(text::render(&view))
    }
}

/// Reads the layout out of `engine` (configuration reads through the owners, see the module
/// documentation). `unrecorded` tells apart the answers of trace servers that the trace did
/// not give (a register the recorded guest never read); without it every answer is taken as
/// known.
pub fn inspect<B: Backend>(
    engine: &mut Engine<B>,
    unrecorded: Option<&Unrecorded>,
    topology: String,
    trace: Option<String>,
) -> Inspection {
    let tree = scan::walk(engine, unrecorded);
    let router = engine.router();
    let claimed_by = |s| {
        router
            .config_owner(s)
            .map(|o| router.server_name(o).to_string())
    };
    let connect = slots::connect_points(&tree.buses, &claimed_by);
    Inspection {
        schema: SCHEMA,
        topology,
        trace,
        replay: None,
        chipset: engine.chipset().to_string(),
        ecam_windows: layout::windows(engine),
        buses: tree.buses,
        functions: tree.functions,
        connect,
        hosted_ports: engine.hosted_ports(),
        claims: layout::claims(engine),
        intercepts: layout::intercepts(engine),
        mmio_hole: layout::mmio_hole(engine),
    }
}

/// Everything `inspect` shows (the JSON object).
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub schema: &'static str,
    pub topology: String,
    pub trace: Option<String>,
    /// The replay of `trace` the layout comes from.
    pub replay: Option<ReplaySummary>,
    pub chipset: String,
    pub ecam_windows: Vec<EcamWindowView>,
    /// Every bus reached, depth first (a bus, then the buses below its first bridge, ...).
    pub buses: Vec<BusView>,
    /// Every function found, depth first (as QEMU's `info pci` lists them).
    pub functions: Vec<FunctionView>,
    /// Where a new function can be connected, one entry per bus with a free device number.
    pub connect: Vec<ConnectPoint>,
    /// The PCI Express ports the multiplexer hosts (`[[port]]`): link, slot, occupancy.
    pub hosted_ports: Vec<crate::engine::HostedPortView>,
    pub claims: ClaimsView,
    pub intercepts: Vec<InterceptView>,
    pub mmio_hole: MmioHoleView,
}

/// How the replay of the trace went: a layout after divergences may not be the recorded one.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ReplaySummary {
    /// Guest accesses replayed.
    pub accesses: u64,
    /// Accesses that did not do what the recorded machine did (`ioreq-mux replay` says which).
    pub divergences: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EcamWindowView {
    pub segment: u16,
    pub base: u64,
    pub size: u64,
    pub start_bus: u8,
    pub end_bus: u8,
}

/// What kind of port a bus hangs off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortType {
    /// The segment's root bus (no bridge above it).
    RootBus,
    RootPort,
    DownstreamPort,
    /// A switch's upstream port: its secondary bus is the switch's internal bus.
    UpstreamPort,
    PcieToPciBridge,
    /// A bridge without a PCI Express capability (conventional PCI-to-PCI bridge).
    PciBridge,
    /// Any other PCIe bridge type.
    OtherBridge,
}

/// What can sit on a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkKind {
    /// A root bus: device numbers 0-31 (root-complex integrated devices, root ports).
    RootComplex,
    /// The link below a root or downstream port: device 0 only (PCIe base spec 4.0, 7.3.1).
    PcieLink,
    /// A switch's internal bus: only the switch's downstream ports.
    SwitchInternal,
    /// A conventional PCI bus: device numbers 0-31.
    Conventional,
}

/// One bus and what can still be connected to it.
#[derive(Debug, Clone, Serialize)]
pub struct BusView {
    pub segment: u16,
    pub bus: u8,
    /// The bridge whose secondary bus this is (`None`: a root bus).
    pub port: Option<String>,
    pub port_type: PortType,
    pub link: LinkKind,
    /// Last bus number routed below this bus (the port's subordinate bus; for a root bus, the
    /// last bus of its segment).
    pub subordinate_bus: u8,
    /// Device numbers in use.
    pub devices: Vec<u8>,
    /// Device numbers a new function may take (`slots::free_devices`).
    pub free_devices: Vec<u8>,
    /// Bus numbers in (this bus, subordinate] that no bridge below uses.
    pub free_buses: Vec<BusRange>,
    pub hotplug: HotplugView,
    /// The topology position of this bus: root bus, then devfn per bridge (`owns.position`
    /// of a function here is this plus `/dd.f`).
    pub position: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HotplugView {
    /// `None` (JSON null): not known, the port's Slot Capabilities were never read by the
    /// recorded guest.
    pub capable: Option<bool>,
    /// Why: what was read (`pcie_slot`), what the bus is (`conventional_bus`, `root_bus`,
    /// `switch_internal`), that the port has no slot (`no_slot`), or that the trace did not
    /// show it (`pcie_slot_not_recorded`).
    pub reason: HotplugReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HotplugReason {
    /// The port's Slot Capabilities say Hot-Plug Capable (PCIe base spec 4.0, 7.5.3.9).
    PcieSlot,
    /// The port's Slot Capabilities do not say Hot-Plug Capable.
    PcieSlotNotCapable,
    /// The port implements a slot, but the trace never showed its Slot Capabilities (the
    /// recorded guest did not read them): not known.
    PcieSlotNotRecorded,
    /// The port's PCI Express Capabilities say no slot is implemented (7.5.3.2).
    NoSlot,
    /// A conventional bus behind a bridge, with a free device number (capable) or none.
    ConventionalBus,
    RootBus,
    SwitchInternal,
}

/// One PCI function.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionView {
    pub bdf: String,
    pub segment: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
    /// The bridge above (`None` on a root bus).
    pub parent: Option<String>,
    /// Server its configuration accesses go to.
    pub owner: Option<String>,
    pub vendor_id: u16,
    pub device_id: u16,
    /// Class code: base class, sub-class, programming interface (24 bits).
    pub class: u32,
    pub class_name: String,
    pub revision: u8,
    /// Header layout (0 endpoint, 1 PCI-to-PCI bridge, 2 CardBus bridge).
    pub header_type: u8,
    pub multifunction: bool,
    pub subsystem_vendor_id: Option<u16>,
    pub subsystem_id: Option<u16>,
    /// Device/port type from the PCI Express capability (`None`: no such capability).
    pub pcie_type: Option<PcieType>,
    pub bars: Vec<BarView>,
    pub bridge: Option<BridgeView>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PcieType {
    Endpoint,
    LegacyEndpoint,
    RootPort,
    UpstreamPort,
    DownstreamPort,
    PcieToPciBridge,
    PciToPcieBridge,
    RootComplexIntegratedEndpoint,
    RootComplexEventCollector,
    Reserved,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
    /// Expansion ROM (index 6, as QEMU numbers it).
    Rom,
}

/// One BAR, as the guest sized and placed it.
#[derive(Debug, Clone, Serialize)]
pub struct BarView {
    /// 0-5; 6 for the expansion ROM.
    pub index: u8,
    pub kind: BarKind,
    pub prefetchable: bool,
    /// The address programmed (meaningful only while `decoding`).
    pub address: u64,
    pub size: u64,
    /// Decoding enabled (command register, ROM enable bit) at a non-zero address.
    pub decoding: bool,
    /// Server that claims the range (only while decoding).
    pub owner: Option<String>,
}

/// A bridge's bus numbers and windows (PCI-to-PCI Bridge spec 1.2, 3.2.5).
#[derive(Debug, Clone, Serialize)]
pub struct BridgeView {
    pub primary_bus: u8,
    pub secondary_bus: u8,
    pub subordinate_bus: u8,
    pub io_window: WindowView,
    pub memory_window: WindowView,
    pub prefetchable_window: WindowView,
}

/// A bridge window; it forwards nothing when `base > limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WindowView {
    pub base: u64,
    pub limit: u64,
    pub enabled: bool,
}

/// Where a new function can go.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectPoint {
    pub segment: u16,
    pub bus: u8,
    pub port: Option<String>,
    pub port_type: PortType,
    pub link: LinkKind,
    /// The BDF a new function gets (first free device number, function 0).
    pub bdf: String,
    /// What to write in the topology (`owns.position`) to claim it wherever firmware numbers
    /// the buses.
    pub position: String,
    pub hotplug: HotplugView,
    /// A server whose claim already covers that BDF (a BDF range on a root bus, say): the new
    /// model can only have it if that claim is narrowed.
    pub claimed_by: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClaimsView {
    /// Functions claimed by BDF, as runs of consecutive functions of one bus and owner.
    pub functions: Vec<FunctionRun>,
    pub positions: Vec<PositionView>,
    pub ports: Vec<RangeView>,
    pub mmio: Vec<RangeView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionRun {
    pub first: String,
    pub last: String,
    pub owner: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PositionView {
    pub position: String,
    pub resolved: Option<String>,
    pub owner: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RangeView {
    pub first: u64,
    pub last: u64,
    pub owner: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct InterceptView {
    pub intercept: String,
    pub register: String,
    pub function: String,
    pub offset: u16,
    pub width: u16,
    pub phase: chipset_intercept::Phase,
    pub value: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MmioHoleView {
    pub tolud: Option<u64>,
    pub touud: Option<u64>,
    pub low_ram_top: Option<u64>,
    pub high_ram_top: Option<u64>,
}
