//! Walks the bus tree through the engine, reading each function's header as the guest would:
//! PCI_CONFIG requests handed to [`Engine::handle`], which runs the intercepts and routes each
//! to the function's owner (an unowned function master-aborts and reads all ones).

use super::names::class_name;
use super::slots::{self, SlotCaps};
use super::{BarKind, BarView, BridgeView, BusView, FunctionView, PcieType, PortType, WindowView};
use crate::engine::Engine;
use crate::models::{
    PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_IO_MASK, PCI_BASE_ADDRESS_MEM_MASK,
    PCI_BASE_ADDRESS_MEM_PREFETCH, PCI_BASE_ADDRESS_MEM_TYPE_64, PCI_BASE_ADDRESS_MEM_TYPE_MASK,
    PCI_BASE_ADDRESS_SPACE_IO, PCI_BRIDGE_NUM_BARS, PCI_CAP_ID_EXP, PCI_CAP_LIST_NEXT,
    PCI_CAPABILITY_LIST, PCI_CLASS_PROG, PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MEMORY,
    PCI_DEVICE_ID, PCI_EXP_FLAGS, PCI_EXP_FLAGS_SLOT, PCI_EXP_FLAGS_TYPE_MASK,
    PCI_EXP_FLAGS_TYPE_SHIFT, PCI_EXP_SLTCAP, PCI_EXP_SLTCAP_HPC, PCI_EXP_TYPE_DOWNSTREAM,
    PCI_EXP_TYPE_ENDPOINT, PCI_EXP_TYPE_LEG_END, PCI_EXP_TYPE_PCI_BRIDGE, PCI_EXP_TYPE_PCIE_BRIDGE,
    PCI_EXP_TYPE_RC_EC, PCI_EXP_TYPE_RC_END, PCI_EXP_TYPE_ROOT_PORT, PCI_EXP_TYPE_UPSTREAM,
    PCI_HEADER_TYPE, PCI_HEADER_TYPE_MULTIFUNCTION, PCI_IO_BASE, PCI_IO_BASE_UPPER16, PCI_IO_LIMIT,
    PCI_IO_LIMIT_UPPER16, PCI_IO_RANGE_MASK, PCI_IO_RANGE_SHIFT, PCI_IO_RANGE_TYPE_32,
    PCI_IO_WINDOW_GRANULE, PCI_MEMORY_BASE, PCI_MEMORY_LIMIT, PCI_MEMORY_RANGE_MASK,
    PCI_MEMORY_RANGE_SHIFT, PCI_MEMORY_WINDOW_GRANULE, PCI_NUM_BARS, PCI_PREF_BASE_UPPER32,
    PCI_PREF_LIMIT_UPPER32, PCI_PREF_MEMORY_BASE, PCI_PREF_MEMORY_LIMIT, PCI_PREF_RANGE_TYPE_64,
    PCI_RANGE_TYPE_MASK, PCI_REVISION_ID, PCI_ROM_ADDRESS, PCI_ROM_ADDRESS_ENABLE,
    PCI_ROM_ADDRESS_MASK, PCI_ROM_ADDRESS1, PCI_STATUS, PCI_STATUS_CAP_LIST, PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID, PCI_VENDOR_ID,
};
use crate::replay::Unrecorded;
use bdf_router::address::{DEVICES_PER_BUS, FUNCTIONS_PER_DEVICE};
use bdf_router::bridges::{
    PCI_HEADER_TYPE_BRIDGE, PCI_HEADER_TYPE_MASK, PCI_PRIMARY_BUS, PCI_SECONDARY_BUS,
    PCI_SUBORDINATE_BUS,
};
use bdf_router::{Sbdf, ServerIdx};
use ioreq_server::{Backend, Dir, Ioreq, Position, size_mask};
use std::collections::HashSet;

/// Capabilities followed at most (a list that loops ends here; 48 fit in 192 bytes).
const MAX_CAPABILITIES: usize = 48;
/// First byte after the standard header, where capabilities may start (PCI 3.0, 6.7).
const CAPABILITIES_START: u32 = 0x40;

/// The buses and functions found, depth first.
#[derive(Debug, Default)]
pub(super) struct Tree {
    pub buses: Vec<BusView>,
    pub functions: Vec<FunctionView>,
}

/// Configuration reads and writes through the engine, as the guest makes them.
struct Config<'a, B: Backend> {
    e: &'a mut Engine<B>,
    /// Counts the trace servers' answers the trace did not give (after a replay).
    unrecorded: Option<&'a Unrecorded>,
}

impl<B: Backend> Config<'_, B> {
    fn access(&mut self, s: Sbdf, reg: usize, size: u32, dir: Dir, data: u32) -> u32 {
        let req = Ioreq::pci_config(s.to_xen(), reg as u32, dir, size, data.into());
        (self.e.handle(0, &req) & size_mask(size)) as u32
    }

    fn r8(&mut self, s: Sbdf, reg: usize) -> u8 {
        self.access(s, reg, 1, Dir::Read, 0) as u8
    }

    fn r16(&mut self, s: Sbdf, reg: usize) -> u16 {
        self.access(s, reg, 2, Dir::Read, 0) as u16
    }

    fn r32(&mut self, s: Sbdf, reg: usize) -> u32 {
        self.access(s, reg, 4, Dir::Read, 0)
    }

    /// A read whose answer is known: `None` when a trace server answered it with bytes the
    /// recorded guest never accessed (they read 0 and say nothing of the device).
    fn r32_known(&mut self, s: Sbdf, reg: usize) -> Option<u32> {
        let before = self.unrecorded.map(Unrecorded::count);
        let v = self.r32(s, reg);
        (self.unrecorded.map(Unrecorded::count) == before).then_some(v)
    }

    fn w16(&mut self, s: Sbdf, reg: usize, v: u16) {
        self.access(s, reg, 2, Dir::Write, v.into());
    }

    fn w32(&mut self, s: Sbdf, reg: usize, v: u32) {
        self.access(s, reg, 4, Dir::Write, v);
    }

    /// Writes `pattern`, reads the answer, restores the register: (value before, answer).
    fn probe(&mut self, s: Sbdf, reg: usize, pattern: u32) -> (u32, u32) {
        let before = self.r32(s, reg);
        self.w32(s, reg, pattern);
        let answer = self.r32(s, reg);
        self.w32(s, reg, before);
        (before, answer)
    }

    fn owner_name(&self, o: Option<ServerIdx>) -> Option<String> {
        o.map(|o| self.e.router().server_name(o).to_string())
    }
}

/// A bus to scan: where it is and what is above it.
#[derive(Debug, Clone)]
struct BusAt {
    segment: u16,
    bus: u8,
    root_bus: u8,
    /// devfn per bridge from the root bus down to this bus.
    path: Vec<u8>,
    port: Option<Sbdf>,
    port_type: PortType,
    slot: Option<SlotCaps>,
    subordinate: u8,
}

/// A function as read, with what the walk needs beyond its view.
struct Found {
    view: FunctionView,
    slot: Option<SlotCaps>,
}

struct Walker<'a, B: Backend> {
    cfg: Config<'a, B>,
    tree: Tree,
    visited: HashSet<(u16, u8)>,
}

/// Walks every root bus (segment 0 bus 0, and the first bus of every ECAM window) down.
/// `unrecorded` tells apart what trace servers answer without knowing it.
pub(super) fn walk<B: Backend>(e: &mut Engine<B>, unrecorded: Option<&Unrecorded>) -> Tree {
    let roots = root_buses(e);
    let mut w = Walker {
        cfg: Config { e, unrecorded },
        tree: Tree::default(),
        visited: HashSet::new(),
    };
    for (segment, bus, last) in roots {
        w.bus(BusAt {
            segment,
            bus,
            root_bus: bus,
            path: vec![],
            port: None,
            port_type: PortType::RootBus,
            slot: None,
            subordinate: last,
        });
    }
    w.tree
}

/// (segment, root bus, last bus) of every segment the guest can reach.
fn root_buses<B: Backend>(e: &Engine<B>) -> Vec<(u16, u8, u8)> {
    let windows = e.router().windows();
    let mut roots: Vec<(u16, u8, u8)> = windows
        .iter()
        .map(|w| (w.segment, w.start_bus, w.end_bus))
        .collect();
    if !roots.iter().any(|r| r.0 == 0) {
        roots.push((0, 0, u8::MAX));
    }
    roots.sort_unstable();
    roots.dedup_by_key(|r| (r.0, r.1));
    roots
}

impl<B: Backend> Walker<'_, B> {
    fn bus(&mut self, at: BusAt) {
        if !self.visited.insert((at.segment, at.bus)) {
            return;
        }
        let index = self.tree.buses.len();
        self.tree.buses.push(slots::bus_view(
            at.segment,
            at.bus,
            at.port.map(|p| p.to_string()),
            at.port_type,
            at.subordinate,
            position(&at),
        ));
        let parent = at.port.map(|p| p.to_string());
        let mut devices = vec![];
        let mut below = vec![];
        for dev in 0..DEVICES_PER_BUS {
            let found = self.device(&at, dev, parent.as_deref());
            if !found.is_empty() {
                devices.push(dev);
            }
            for f in found {
                let child = self.child_bus(&at, &f);
                if let Some(b) = &f.view.bridge {
                    below.push((b.secondary_bus, b.subordinate_bus));
                }
                self.tree.functions.push(f.view);
                if let Some(c) = child {
                    self.bus(c);
                }
            }
        }
        slots::fill_bus(&mut self.tree.buses[index], devices, &below, at.slot);
    }

    /// Function 0 of `dev` and, for a multi-function device, the others present.
    fn device(&mut self, at: &BusAt, dev: u8, parent: Option<&str>) -> Vec<Found> {
        let at0 = Sbdf::from_devfn(at.segment, at.bus, dev << 3);
        let Some(f0) = self.function(at0, parent) else {
            return vec![];
        };
        let multi = f0.view.multifunction;
        let mut out = vec![f0];
        if multi {
            for func in 1..FUNCTIONS_PER_DEVICE {
                let s = Sbdf::from_devfn(at.segment, at.bus, dev << 3 | func);
                out.extend(self.function(s, parent));
            }
        }
        out
    }

    /// The bus behind a bridge, if a configuration cycle can get there from `at`.
    fn child_bus(&self, at: &BusAt, f: &Found) -> Option<BusAt> {
        let b = f.view.bridge.as_ref()?;
        let reachable = b.secondary_bus > at.bus
            && b.secondary_bus <= b.subordinate_bus
            && b.subordinate_bus <= at.subordinate;
        if !reachable {
            return None;
        }
        let mut path = at.path.clone();
        path.push(f.view.device << 3 | f.view.function);
        Some(BusAt {
            segment: at.segment,
            bus: b.secondary_bus,
            root_bus: at.root_bus,
            path,
            port: Some(Sbdf::from_devfn(
                at.segment,
                at.bus,
                f.view.device << 3 | f.view.function,
            )),
            port_type: slots::port_type(f.view.pcie_type),
            slot: f.slot,
            subordinate: b.subordinate_bus,
        })
    }

    fn function(&mut self, s: Sbdf, parent: Option<&str>) -> Option<Found> {
        let c = &mut self.cfg;
        let vendor = c.r16(s, PCI_VENDOR_ID);
        if vendor == 0xffff || vendor == 0 {
            return None;
        }
        let device_id = c.r16(s, PCI_DEVICE_ID);
        let revision = c.r8(s, PCI_REVISION_ID);
        let class = c.r32(s, PCI_REVISION_ID) >> (8 * (PCI_CLASS_PROG - PCI_REVISION_ID));
        let header = c.r8(s, PCI_HEADER_TYPE);
        let layout = header & PCI_HEADER_TYPE_MASK;
        let is_bridge = layout == PCI_HEADER_TYPE_BRIDGE;
        let (pcie_type, slot) = pcie(c, s);
        let subsystem = (layout == 0).then(|| {
            (
                c.r16(s, PCI_SUBSYSTEM_VENDOR_ID),
                c.r16(s, PCI_SUBSYSTEM_ID),
            )
        });
        let bars = bars(c, s, is_bridge);
        let bridge = is_bridge.then(|| bridge(c, s));
        let owner = c.owner_name(c.e.router().config_owner(s));
        let view = FunctionView {
            bdf: s.to_string(),
            segment: s.segment,
            bus: s.bus,
            device: s.device,
            function: s.function,
            parent: parent.map(str::to_string),
            owner,
            vendor_id: vendor,
            device_id,
            class,
            class_name: class_name(class).to_string(),
            revision,
            header_type: layout,
            multifunction: header & PCI_HEADER_TYPE_MULTIFUNCTION != 0,
            subsystem_vendor_id: subsystem.map(|s| s.0),
            subsystem_id: subsystem.map(|s| s.1),
            pcie_type,
            bars,
            bridge,
        };
        Some(Found { view, slot })
    }
}

/// The topology position of the bus `at` (`ssss:bb`, then `/dd.f` per bridge; the first
/// hop after a colon, as [`Position`] writes it).
fn position(at: &BusAt) -> String {
    Position {
        segment: at.segment,
        root_bus: at.root_bus,
        path: at.path.clone(),
    }
    .to_string()
}

/// Offset of the PCI Express capability, following the capability list (PCI 3.0, 6.7).
fn pcie_capability<B: Backend>(c: &mut Config<'_, B>, s: Sbdf) -> Option<usize> {
    if c.r16(s, PCI_STATUS) & PCI_STATUS_CAP_LIST == 0 {
        return None;
    }
    let mut at = u32::from(c.r8(s, PCI_CAPABILITY_LIST)) & !3;
    for _ in 0..MAX_CAPABILITIES {
        if at < CAPABILITIES_START {
            return None;
        }
        let reg = at as usize;
        if c.r8(s, reg) == PCI_CAP_ID_EXP {
            return Some(reg);
        }
        at = u32::from(c.r8(s, reg + PCI_CAP_LIST_NEXT)) & !3;
    }
    None
}

/// The device/port type and, for a port, its slot (PCIe base spec 4.0, 7.5.3.2, 7.5.3.9).
fn pcie<B: Backend>(c: &mut Config<'_, B>, s: Sbdf) -> (Option<PcieType>, Option<SlotCaps>) {
    let Some(cap) = pcie_capability(c, s) else {
        return (None, None);
    };
    let flags = c.r16(s, cap + PCI_EXP_FLAGS);
    let ty = (flags >> PCI_EXP_FLAGS_TYPE_SHIFT) & PCI_EXP_FLAGS_TYPE_MASK;
    let ty = pcie_type(ty);
    let slot = matches!(ty, PcieType::RootPort | PcieType::DownstreamPort).then(|| {
        let implemented = flags & PCI_EXP_FLAGS_SLOT != 0;
        let hotplug = if implemented {
            c.r32_known(s, cap + PCI_EXP_SLTCAP)
                .map(|caps| caps & PCI_EXP_SLTCAP_HPC != 0)
        } else {
            Some(false)
        };
        SlotCaps {
            implemented,
            hotplug,
        }
    });
    (Some(ty), slot)
}

fn pcie_type(ty: u16) -> PcieType {
    match ty {
        PCI_EXP_TYPE_ENDPOINT => PcieType::Endpoint,
        PCI_EXP_TYPE_LEG_END => PcieType::LegacyEndpoint,
        PCI_EXP_TYPE_ROOT_PORT => PcieType::RootPort,
        PCI_EXP_TYPE_UPSTREAM => PcieType::UpstreamPort,
        PCI_EXP_TYPE_DOWNSTREAM => PcieType::DownstreamPort,
        PCI_EXP_TYPE_PCI_BRIDGE => PcieType::PcieToPciBridge,
        PCI_EXP_TYPE_PCIE_BRIDGE => PcieType::PciToPcieBridge,
        PCI_EXP_TYPE_RC_END => PcieType::RootComplexIntegratedEndpoint,
        PCI_EXP_TYPE_RC_EC => PcieType::RootComplexEventCollector,
        _ => PcieType::Reserved,
    }
}

/// Sizes and reads every BAR and the expansion ROM, with decoding off meanwhile.
fn bars<B: Backend>(c: &mut Config<'_, B>, s: Sbdf, is_bridge: bool) -> Vec<BarView> {
    let command = c.r16(s, PCI_COMMAND);
    let decode = command & (PCI_COMMAND_IO | PCI_COMMAND_MEMORY);
    if decode != 0 {
        c.w16(s, PCI_COMMAND, command & !decode);
    }
    let (count, rom) = if is_bridge {
        (PCI_BRIDGE_NUM_BARS, PCI_ROM_ADDRESS1)
    } else {
        (PCI_NUM_BARS, PCI_ROM_ADDRESS)
    };
    let mut out = vec![];
    let mut i = 0;
    while i < count {
        let (bar, used) = size_bar(c, s, i, i + 1 < count);
        out.extend(bar);
        i += used;
    }
    out.extend(size_rom(c, s, rom));
    if decode != 0 {
        c.w16(s, PCI_COMMAND, command);
    }
    for b in &mut out {
        b.decoding &= decodes(b.kind, command) && placed(b.address, b.size);
        if b.decoding {
            b.owner = bar_owner(c, b);
        }
    }
    out
}

/// Lowest set bit: the size a BAR's writable address bits give.
fn lowest_bit(mask: u64) -> u64 {
    mask & mask.wrapping_neg()
}

/// BAR `i`: its view (none if unimplemented) and how many registers it takes.
fn size_bar<B: Backend>(
    c: &mut Config<'_, B>,
    s: Sbdf,
    i: usize,
    may_be_64: bool,
) -> (Option<BarView>, usize) {
    let reg = PCI_BASE_ADDRESS_0 + 4 * i;
    let (before, answer) = c.probe(s, reg, u32::MAX);
    // Unimplemented (reads 0), or nobody answered (all ones: no writable address bit).
    if answer == 0 || answer == u32::MAX {
        return (None, 1);
    }
    let bar = |kind, prefetchable, address, mask: u64| {
        let size = lowest_bit(mask);
        (size != 0).then_some(BarView {
            index: i as u8,
            kind,
            prefetchable,
            address,
            size,
            decoding: true,
            owner: None,
        })
    };
    if answer & PCI_BASE_ADDRESS_SPACE_IO != 0 {
        let mask = u64::from(answer & PCI_BASE_ADDRESS_IO_MASK);
        let address = u64::from(before & PCI_BASE_ADDRESS_IO_MASK);
        return (bar(BarKind::Io, false, address, mask), 1);
    }
    let prefetchable = answer & PCI_BASE_ADDRESS_MEM_PREFETCH != 0;
    let mut mask = u64::from(answer & PCI_BASE_ADDRESS_MEM_MASK);
    let mut address = u64::from(before & PCI_BASE_ADDRESS_MEM_MASK);
    let is_64 = answer & PCI_BASE_ADDRESS_MEM_TYPE_MASK == PCI_BASE_ADDRESS_MEM_TYPE_64;
    if !(is_64 && may_be_64) {
        return (bar(BarKind::Mem32, prefetchable, address, mask), 1);
    }
    let (high, high_answer) = c.probe(s, reg + 4, u32::MAX);
    mask |= u64::from(high_answer) << 32;
    address |= u64::from(high) << 32;
    (bar(BarKind::Mem64, prefetchable, address, mask), 2)
}

/// The expansion ROM BAR at `reg` (PCI 3.0, 6.2.5.2), sized with the address bits only.
fn size_rom<B: Backend>(c: &mut Config<'_, B>, s: Sbdf, reg: usize) -> Option<BarView> {
    let (before, answer) = c.probe(s, reg, PCI_ROM_ADDRESS_MASK);
    if answer == u32::MAX {
        return None;
    }
    let size = lowest_bit(u64::from(answer & PCI_ROM_ADDRESS_MASK));
    (size != 0).then_some(BarView {
        index: PCI_NUM_BARS as u8,
        kind: BarKind::Rom,
        prefetchable: false,
        address: u64::from(before & PCI_ROM_ADDRESS_MASK),
        size,
        decoding: before & PCI_ROM_ADDRESS_ENABLE != 0,
        owner: None,
    })
}

/// Whether the command register lets a BAR of `kind` decode.
fn decodes(kind: BarKind, command: u16) -> bool {
    let bit = match kind {
        BarKind::Io => PCI_COMMAND_IO,
        BarKind::Mem32 | BarKind::Mem64 | BarKind::Rom => PCI_COMMAND_MEMORY,
    };
    command & bit != 0
}

/// A BAR at 0 or running past the end of the address space does not decode (QEMU treats both
/// as unmapped).
fn placed(address: u64, size: u64) -> bool {
    address != 0 && address.checked_add(size - 1).is_some()
}

fn bar_owner<B: Backend>(c: &Config<'_, B>, b: &BarView) -> Option<String> {
    let last = b.address + (b.size - 1);
    let r = c.e.router();
    let o = match b.kind {
        BarKind::Io => r.port_owner(b.address, last),
        _ => r.mmio_owner(b.address, last),
    };
    c.owner_name(o)
}

/// A type-1 header's bus numbers and windows (PCI-to-PCI Bridge spec 1.2, 3.2.5).
fn bridge<B: Backend>(c: &mut Config<'_, B>, s: Sbdf) -> BridgeView {
    BridgeView {
        primary_bus: c.r8(s, usize::from(PCI_PRIMARY_BUS)),
        secondary_bus: c.r8(s, usize::from(PCI_SECONDARY_BUS)),
        subordinate_bus: c.r8(s, usize::from(PCI_SUBORDINATE_BUS)),
        io_window: io_window(c, s),
        memory_window: memory_window(c, s, PCI_MEMORY_BASE, PCI_MEMORY_LIMIT, None),
        prefetchable_window: memory_window(
            c,
            s,
            PCI_PREF_MEMORY_BASE,
            PCI_PREF_MEMORY_LIMIT,
            Some((PCI_PREF_BASE_UPPER32, PCI_PREF_LIMIT_UPPER32)),
        ),
    }
}

fn window(base: u64, limit: u64) -> WindowView {
    WindowView {
        base,
        limit,
        enabled: base <= limit,
    }
}

/// The I/O window (3.2.5.6): 4 KiB granular, 32-bit when the base says so.
fn io_window<B: Backend>(c: &mut Config<'_, B>, s: Sbdf) -> WindowView {
    let base_reg = u32::from(c.r8(s, PCI_IO_BASE));
    let limit_reg = u32::from(c.r8(s, PCI_IO_LIMIT));
    let mut base = u64::from(base_reg & PCI_IO_RANGE_MASK) << PCI_IO_RANGE_SHIFT;
    let mut limit = (u64::from(limit_reg & PCI_IO_RANGE_MASK) << PCI_IO_RANGE_SHIFT)
        | (PCI_IO_WINDOW_GRANULE - 1);
    if base_reg & PCI_RANGE_TYPE_MASK == PCI_IO_RANGE_TYPE_32 {
        base |= u64::from(c.r16(s, PCI_IO_BASE_UPPER16)) << 16;
        limit |= u64::from(c.r16(s, PCI_IO_LIMIT_UPPER16)) << 16;
    }
    window(base, limit)
}

/// A memory window (3.2.5.8) or the prefetchable one (3.2.5.9, with `upper`: 64-bit when the
/// base says so).
fn memory_window<B: Backend>(
    c: &mut Config<'_, B>,
    s: Sbdf,
    base_at: usize,
    limit_at: usize,
    upper: Option<(usize, usize)>,
) -> WindowView {
    let base_reg = u32::from(c.r16(s, base_at));
    let limit_reg = u32::from(c.r16(s, limit_at));
    let mut base = u64::from(base_reg & PCI_MEMORY_RANGE_MASK) << PCI_MEMORY_RANGE_SHIFT;
    let mut limit = (u64::from(limit_reg & PCI_MEMORY_RANGE_MASK) << PCI_MEMORY_RANGE_SHIFT)
        | (PCI_MEMORY_WINDOW_GRANULE - 1);
    if let Some((base_hi, limit_hi)) = upper {
        if base_reg & PCI_RANGE_TYPE_MASK == PCI_PREF_RANGE_TYPE_64 {
            base |= u64::from(c.r32(s, base_hi)) << 32;
            limit |= u64::from(c.r32(s, limit_hi)) << 32;
        }
    }
    window(base, limit)
}
