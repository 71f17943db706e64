//! Target `engine`: a scripted guest drives the simulated hypervisor and the whole engine
//! (intercepts, router, built-in device models) on one thread, as `tests/src/lib.rs` does,
//! with arbitrary sequences of accesses: configuration reads and writes through CF8/CFC and
//! through the ECAM window to the chipset registers (PCIEXBAR, PMBASE/ACPI_CNTL, TOLUD/TOUUD,
//! PIIX4 PMBA/PMREGMISC), bridges' bus numbers and BARs; raw port and MMIO accesses of any
//! shape, buffered writes; and raw ioreqs handed to `Engine::handle` directly (a backend
//! that does not behave like Xen). After every access:
//!
//! - the access completed exactly once (`SimHypervisor::check`, and a pending access is
//!   complete after one poll);
//! - PCIEXBAR holds what the guest wrote to it through any path (a model of the CF8 latch,
//!   Xen's CFC conversion, the ECAM decode and the write mask);
//! - the ECAM window is what PCIEXBAR decodes to (or none, with the refusal recorded);
//! - the hypervisor's port and MMIO ranges of the engine cover exactly the router's claims
//!   plus the ECAM window;
//! - a configuration read of a function nobody owns reads all ones, and the same register
//!   read through CF8 and through ECAM reads the same.
//!
//! - a configured window of segment 1, when there is one, stays in place and reaches none of
//!   segment 0's functions.
//!
//! Input: a set-up byte (topology, claim mode, platform, a configured segment-1 window), then
//! operations (see `run`).

use crate::{Bytes, merge_ranges, size_from};
use bdf_router::{EcamWindow, Sbdf};
use chipset_intercept::registers::{PCIEXBAR_DEFAULT, PCIEXBAR_WMASK};
use chipset_intercept::{Chipset, InterceptConfig, LayoutEvent, Phase};
use ioreq_mux_engine::{Engine, EngineConfig, MUX, PciClaims};
use ioreq_mux_models::{
    BarKind, DeliveryLog, EmulatedModel, FunctionKind, FunctionSpec, Placement,
};
use ioreq_server::abi::{self, IOREQ_SIZE};
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::sim::{Issued, SimBackend, SimError, SimHypervisor};
use ioreq_server::{DeviceModel, Dir, IoRange, Ioreq, IoreqType, Position, RangeKind, size_mask};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn at(bus: u8, dev: u8, func: u8) -> Placement {
    Placement::Bdf(abi::pack_sbdf(0, bus, dev, func))
}

fn pos(path: &[(u8, u8)]) -> Placement {
    Placement::Position(Position {
        segment: 0,
        root_bus: 0,
        path: path.iter().map(|(d, f)| d << 3 | f).collect(),
    })
}

/// The Q35 topology of the end-to-end tests (MCH, LPC, two root ports, a switch, a
/// PCIe-to-PCI bridge, endpoints behind them, a "vgpu" model behind the switch) plus fixed
/// port and MMIO ranges where firmware may try to put the PM block or the ECAM window.
fn q35() -> Vec<Box<dyn DeviceModel>> {
    let log: DeliveryLog = Arc::new(Mutex::new(vec![]));
    let mut models = ioreq_mux_tests::topology(&log);
    models.push(Box::new(
        EmulatedModel::new("fixed")
            .with_range(IoRange::ports(0x700, 0x70f))
            .with_range(IoRange::mmio(0xfd00_0000, 0x10_0000)),
    ));
    models
}

/// i440FX + PIIX3 + PIIX4 PM, a bridge and an endpoint.
fn i440fx() -> Vec<Box<dyn DeviceModel>> {
    let chipset = EmulatedModel::new("chipset")
        .with_function(
            at(0, 0, 0),
            &FunctionSpec {
                pcie: false,
                ..FunctionSpec::endpoint(0x8086, 0x1237, 0x060000)
            },
        )
        .with_function(
            at(0, 1, 0),
            &FunctionSpec {
                pcie: false,
                multifunction: true,
                ..FunctionSpec::endpoint(0x8086, 0x7000, 0x060100)
            },
        )
        .with_function(
            at(0, 1, 3),
            &FunctionSpec {
                pcie: false,
                ..FunctionSpec::endpoint(0x8086, 0x7113, 0x068000)
            },
        )
        .with_function(
            at(0, 3, 0),
            &FunctionSpec::bridge(0x1b36, 0x0001, FunctionKind::PciBridge),
        )
        .with_function(
            pos(&[(3, 0), (1, 0)]),
            &FunctionSpec::endpoint(0x8086, 0x100e, 0x020000).with_bar(BarKind::Io, 0x40),
        )
        .with_range(IoRange::ports(0x700, 0x70f));
    vec![Box::new(chipset)]
}

const FUNCS: [(u8, u8); 18] = [
    (0, 0x00),
    (0, 0xf8),
    (0, 0x08),
    (0, 0x0b),
    (0, 0x10),
    (0, 0x11),
    (0, 0x18),
    (1, 0x00),
    (2, 0x00),
    (3, 0x00),
    (4, 0x00),
    (5, 0x00),
    (6, 0x00),
    (3, 0x08),
    (4, 0x08),
    (2, 0x01),
    (0xff, 0x00),
    (0, 0x20),
];
const REGS: [u16; 28] = [
    0x00, 0x04, 0x08, 0x0c, 0x0e, 0x10, 0x14, 0x18, 0x19, 0x1a, 0x1c, 0x20, 0x24, 0x3c, 0x40, 0x44,
    0x60, 0x61, 0x63, 0x64, 0x80, 0xa0, 0xa2, 0xb0, 0x100, 0x104, 0x0a, 0x42,
];

/// The config writes a request makes once the engine has it, predicted from the state
/// before it: (function, register, size, data).
type Writes = Vec<(Sbdf, u16, u32, u64)>;

struct Guest {
    hv: SimHypervisor,
    engine: Engine<SimBackend>,
    id: u16,
    functions_mode: bool,
    /// PCIEXBAR as the guest wrote it.
    pciexbar: Option<u64>,
    /// A window of segment 1 from the configuration (`EngineConfig::ecam`), if any.
    configured: Option<EcamWindow>,
}

/// Xen's rule for a claim: one range contains every byte (`XenRangeSet::contains`).
fn contains(ranges: &[(u64, u64)], s: u64, e: u64) -> bool {
    let i = ranges.partition_point(|&(_, end)| end < s);
    i < ranges.len() && ranges[i].0 <= s && e <= ranges[i].1
}

/// An ECAM MMIO access as the engine decodes it (PCIe base spec 4.0, 7.2.2), as writes.
fn ecam_writes(w: &EcamWindow, req: &Ioreq) -> Writes {
    let ok = req.count == 1
        && !req.data_is_ptr
        && matches!(req.size, 1 | 2 | 4 | 8)
        && req.addr % u64::from(req.size) == 0
        && w.contains(req.addr);
    if !ok || req.dir != Dir::Write {
        return vec![];
    }
    let off = req.addr - w.base;
    let s = Sbdf::from_devfn(
        w.segment,
        w.start_bus + (off >> 20) as u8,
        (off >> 12) as u8,
    );
    let reg = (off & 0xfff) as u16;
    if req.size == 8 {
        vec![
            (s, reg, 4, req.data & 0xffff_ffff),
            (s, reg + 4, 4, req.data >> 32),
        ]
    } else {
        vec![(s, reg, req.size, req.data)]
    }
}

/// Xen's CF8/CFC conversion (`cf8_decode`), as a model.
fn cf8_model(cf8: u32, port: u64, size: u32) -> Option<(Sbdf, u16)> {
    (cf8 & 0x8000_0000 != 0
        && (0xcfc..=0xcff).contains(&port)
        && (port - 0xcfc) + u64::from(size) <= 4)
        .then(|| {
            (
                Sbdf::from_xen((cf8 >> 8) & 0xffff),
                (cf8 & 0xfc) as u16 | (port & 3) as u16,
            )
        })
}

impl Guest {
    /// What the engine does with a request it is handed, as config writes.
    fn engine_writes(&self, req: &Ioreq) -> Writes {
        if req.validate().is_err()
            || req.dir != Dir::Write
            || (req.data_is_ptr && matches!(req.ty, IoreqType::Pio | IoreqType::Copy))
        {
            return vec![];
        }
        let r = self.engine.router();
        match req.ty {
            IoreqType::PciConfig => {
                let (sbdf, reg) = abi::split_pci_config_addr(req.addr);
                vec![(Sbdf::from_xen(sbdf), reg as u16, req.size, req.data)]
            }
            IoreqType::Pio => {
                let e = req.addr + u64::from(req.size) - 1;
                if r.port_owner(req.addr, e) != Some(MUX)
                    || (req.addr == 0xcf8 && req.size == 4)
                    || req.count != 1
                {
                    return vec![];
                }
                cf8_model(r.cf8_value(), req.addr, req.size)
                    .map(|(s, reg)| vec![(s, reg, req.size, req.data)])
                    .unwrap_or_default()
            }
            IoreqType::Copy => match r.ecam_window(req.addr) {
                Some(w) => ecam_writes(w, req),
                None => vec![],
            },
            _ => vec![],
        }
    }

    /// What a guest access makes the engine write, through the hypervisor's rules.
    fn guest_writes(&self, req: &Ioreq) -> Writes {
        if !matches!(req.ty, IoreqType::Pio | IoreqType::Copy) || req.validate().is_err() {
            return vec![];
        }
        if req.ty == IoreqType::Pio && !req.data_is_ptr && req.count == 1 {
            if let Some((s, reg)) = cf8_model(self.hv.cf8(), req.addr, req.size) {
                let pci = self.hv.server_ranges(self.id, RangeKind::Pci);
                let v = u64::from(s.to_xen());
                if !contains(&pci, v, v) || req.dir != Dir::Write {
                    return vec![];
                }
                return vec![(s, reg, req.size, req.data)];
            }
        }
        let (kind, s, e) = req.selection_span();
        if !contains(&self.hv.server_ranges(self.id, kind), s, e) {
            return vec![];
        }
        self.engine_writes(req)
    }

    fn apply(&mut self, writes: &Writes) {
        let Some(v) = self.pciexbar.as_mut() else {
            return;
        };
        for &(s, reg, size, data) in writes {
            if s != Sbdf::from_devfn(0, 0, 0) {
                continue;
            }
            let mut bytes = v.to_le_bytes();
            for i in 0..size.min(8) as u16 {
                let r = reg + i;
                if (0x60..0x68).contains(&r) {
                    bytes[usize::from(r - 0x60)] = (data >> (8 * i)) as u8;
                }
            }
            *v = (*v & !PCIEXBAR_WMASK) | (u64::from_le_bytes(bytes) & PCIEXBAR_WMASK);
        }
    }

    /// One guest access through hypervisor -> engine -> model -> back. `None` if the
    /// hypervisor refused it as malformed.
    fn access(&mut self, vcpu: u32, req: Ioreq, buffered: bool) -> Option<u64> {
        let writes = self.guest_writes(&req);
        let r = match self.hv.issue(vcpu, &req, buffered) {
            Err(SimError::Malformed(_)) => {
                assert!(
                    req.validate().is_err() || !matches!(req.ty, IoreqType::Pio | IoreqType::Copy),
                    "hypervisor refused a well-formed access {req:?}"
                );
                None
            }
            Err(e) => panic!("access {req:?} not issued: {e}"),
            Ok(Issued::Done(v)) => {
                // Buffered writes are served at the next poll.
                self.engine
                    .poll(Some(Duration::ZERO))
                    .expect("engine polls");
                Some(v)
            }
            Ok(Issued::Pending) => {
                self.engine
                    .poll(Some(Duration::ZERO))
                    .expect("engine polls");
                let v = self.hv.collect(vcpu).expect("collect");
                assert!(v.is_some(), "the engine did not complete {req:?}");
                v
            }
        };
        self.apply(&writes);
        if let Err(v) = self.hv.check() {
            panic!("hypervisor invariants after {req:?}: {v:?}");
        }
        r
    }

    fn cf8(sbdf: Sbdf, reg: u16) -> u64 {
        0x8000_0000 | (u64::from(sbdf.bdf()) << 8) | u64::from(reg & 0xfc)
    }

    fn cfg_cf8(
        &mut self,
        vcpu: u32,
        sbdf: Sbdf,
        reg: u16,
        size: u32,
        dir: Dir,
        data: u64,
    ) -> Option<u64> {
        self.access(
            vcpu,
            Ioreq::new(IoreqType::Pio, Dir::Write, 0xcf8, 4, Self::cf8(sbdf, reg)),
            false,
        );
        self.access(
            vcpu,
            Ioreq::new(IoreqType::Pio, dir, 0xcfc + u64::from(reg & 3), size, data),
            false,
        )
    }

    /// The guest's (PCIEXBAR) window.
    fn window(&self) -> Option<EcamWindow> {
        self.engine
            .router()
            .windows()
            .iter()
            .find(|w| Some(**w) != self.configured)
            .copied()
    }

    fn cfg_ecam(
        &mut self,
        vcpu: u32,
        sbdf: Sbdf,
        reg: u16,
        size: u32,
        dir: Dir,
        data: u64,
    ) -> Option<u64> {
        let a = self.window()?.address_of(sbdf, reg)?;
        self.access(vcpu, Ioreq::new(IoreqType::Copy, dir, a, size, data), false)
    }

    fn check(&self) {
        let e = &self.engine;
        let r = e.router();
        // PCIEXBAR and the window it decodes to.
        let snap = e.intercepts().snapshot();
        let pciexbar = snap.iter().find(|(n, _, _)| *n == "pciexbar").map(|x| x.2);
        assert_eq!(pciexbar, self.pciexbar, "PCIEXBAR");
        let windows = r.windows();
        if let Some(c) = self.configured {
            assert!(
                windows.contains(&c),
                "the configured window stays: {windows:?}"
            );
        }
        let guest: Vec<&EcamWindow> = windows
            .iter()
            .filter(|w| Some(**w) != self.configured)
            .collect();
        assert!(
            guest.len() <= 1,
            "one guest ECAM window at most: {windows:?}"
        );
        let want =
            pciexbar.and_then(|v| chipset_intercept::q35::pciexbar_window(v, 0).ok().flatten());
        match (guest.first().copied(), want) {
            (Some(w), Some(x)) => assert_eq!(*w, x, "ECAM window vs PCIEXBAR {pciexbar:#x?}"),
            (None, None) => {}
            (Some(w), None) => {
                panic!("ECAM window {w} but PCIEXBAR {pciexbar:#x?} decodes to none")
            }
            (None, Some(x)) => {
                // Refused: by the intercept (over RAM or the APICs: a refusal, then the old
                // window goes), or by the router (over claimed MMIO: the engine records the
                // refusal after the event that asked for the window).
                let mut relevant = e.layout_history().iter().rev().filter(|ev| {
                    matches!(ev, LayoutEvent::Ecam { .. })
                        || matches!(ev, LayoutEvent::Refused { register, .. } if *register == "PCIEXBAR" || *register == "ECAM window")
                });
                let last = relevant.next();
                let refused = match last {
                    Some(LayoutEvent::Refused { .. }) => true,
                    Some(LayoutEvent::Ecam { new: None, .. }) => {
                        matches!(relevant.next(), Some(LayoutEvent::Refused { register, .. }) if *register == "PCIEXBAR")
                    }
                    _ => false,
                };
                assert!(
                    refused,
                    "PCIEXBAR {pciexbar:#x?} decodes to {x} but there is no window and no refusal: \
                     {last:?}\nrouter MMIO {:x?}\nhypervisor MMIO {:x?}\n{:?}",
                    r.mmio_ranges(),
                    self.hv.server_ranges(self.id, RangeKind::Mmio),
                    e.stats()
                );
            }
        }
        // The hypervisor has what the router has, no more, no less.
        let mut ports: Vec<(u64, u64)> = r.port_ranges().iter().map(|x| (x.0, x.1)).collect();
        if self.functions_mode {
            ports.retain(|&(s, _)| s != 0xcf8);
        }
        let mut mmio: Vec<(u64, u64)> = r.mmio_ranges().iter().map(|x| (x.0, x.1)).collect();
        mmio.extend(windows.iter().map(|w| (w.base, w.last())));
        assert_eq!(
            merge_ranges(self.hv.server_ranges(self.id, RangeKind::Port)),
            merge_ranges(ports),
            "hypervisor port ranges vs the router's claims"
        );
        assert_eq!(
            merge_ranges(self.hv.server_ranges(self.id, RangeKind::Mmio)),
            merge_ranges(mmio),
            "hypervisor MMIO ranges vs the router's claims and the ECAM window"
        );
    }
}

/// A flags byte: a rep count (bit 0, then a count byte), data_is_ptr (bit 1), df (bit 2).
fn rep_flags(b: &mut Bytes<'_>, req: &mut Ioreq) {
    let f = b.u8();
    if f & 1 != 0 {
        req.count = u32::from(b.u8());
    }
    req.data_is_ptr = f & 2 != 0;
    req.df = f & 4 != 0;
}

fn pick_func(b: &mut Bytes<'_>) -> Sbdf {
    let k = b.u8();
    match FUNCS.get(usize::from(k)) {
        Some(&(bus, devfn)) => Sbdf::from_devfn(0, bus, devfn),
        None => Sbdf::from_devfn(0, b.u8() % 8, b.u8()),
    }
}

fn pick_reg(b: &mut Bytes<'_>) -> u16 {
    let k = b.u8();
    match REGS.get(usize::from(k)) {
        Some(&r) => r,
        None => b.u16() & 0xfff,
    }
}

pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let setup = b.u8();
    let chipset_q35 = setup & 1 == 0;
    let functions_mode = setup & 2 != 0;
    let configured = (setup & 0x80 != 0)
        .then(|| EcamWindow::new(1, 0xc000_0000, 0, 0x0f).expect("a valid window"));
    let cfg = EngineConfig {
        intercepts: InterceptConfig {
            // The multiplexer owns PCIEXBAR (the default); the others in any phase.
            pciexbar: Some(Phase::Instead),
            pm: [
                Some(Phase::After),
                Some(Phase::Before),
                Some(Phase::Instead),
                None,
            ][usize::from(setup >> 2 & 3)],
            mmio_hole: [
                Some(Phase::After),
                Some(Phase::Before),
                Some(Phase::Instead),
                None,
            ][usize::from(setup >> 4 & 3)],
            ecam_segment: 0,
            low_ram_top: (setup & 0x40 != 0).then_some(0x8000_0000),
            high_ram_top: None,
        },
        chipset: None,
        pci_claims: if functions_mode {
            PciClaims::Functions
        } else {
            PciClaims::Segments
        },
        // Sometimes a configured window of segment 1 (16 MiB at 0xc0000000), next to the
        // guest's PCIEXBAR window.
        ecam: configured.into_iter().collect(),
        // No hosted ports: the pcie_port target covers their registers.
        ports: vec![],
    };
    let hv = SimHypervisor::new(2, Duration::from_secs(5));
    let backend = hv
        .create_server(BufioreqMode::Atomic)
        .expect("a server slot is free");
    let id = backend.id();
    let models = if chipset_q35 { q35() } else { i440fx() };
    let engine = Engine::new(backend, models, &cfg).expect("engine starts");
    assert_eq!(
        engine.chipset(),
        if chipset_q35 {
            Chipset::Q35
        } else {
            Chipset::I440fx
        }
    );
    engine.backend().set_enabled(true).expect("enable");
    let mut g = Guest {
        hv,
        engine,
        id,
        functions_mode,
        pciexbar: chipset_q35.then_some(PCIEXBAR_DEFAULT),
        configured,
    };
    g.check();
    let mut ops = 0;
    while !b.is_empty() && ops < 256 {
        ops += 1;
        let op = b.u8();
        let vcpu = u32::from(op >> 7);
        match op & 0x7f {
            // Configuration write / read through CF8 or ECAM.
            0..=0x2f => {
                let sbdf = pick_func(&mut b);
                let reg = pick_reg(&mut b);
                let sz = b.u8();
                let size = [1, 2, 4, 4, 1, 2, 4, 8][usize::from(sz & 7)];
                let dir = if op & 1 == 0 { Dir::Write } else { Dir::Read };
                let data = if dir == Dir::Write {
                    u64::from(b.u32()) | (u64::from(b.u32()) << 32)
                } else {
                    0
                };
                let ecam = op & 2 != 0;
                let owner = g.engine.router().config_owner(sbdf);
                let v = if ecam {
                    g.cfg_ecam(vcpu, sbdf, reg, size, dir, data)
                } else {
                    g.cfg_cf8(vcpu, sbdf, reg, size.min(4), dir, data)
                };
                // Nobody owns it, and no intercept: all ones.
                if let (Some(v), Dir::Read, None) = (v, dir, owner) {
                    let size = if ecam { size } else { size.min(4) };
                    let crosses = !ecam && u32::from(reg & 3) + size > 4;
                    if !crosses {
                        assert_eq!(v, size_mask(size), "read of {sbdf} @{reg:#x} nobody owns");
                    }
                }
            }
            // The same register read through CF8 and through ECAM.
            0x30..=0x3f => {
                let sbdf = pick_func(&mut b);
                // CF8 reaches the first 256 bytes only.
                let reg = pick_reg(&mut b) & 0xfc;
                let a = g.cfg_cf8(vcpu, sbdf, reg, 4, Dir::Read, 0);
                let e = g.cfg_ecam(vcpu, sbdf, reg, 4, Dir::Read, 0);
                if let (Some(a), Some(e)) = (a, e) {
                    assert_eq!(a, e, "{sbdf} @{reg:#x} through CF8 and through ECAM");
                }
                // The same bus/device/function on segment 1 is nobody's: the configured
                // window never reaches segment 0's functions.
                let on1 = Sbdf::from_devfn(1, sbdf.bus, sbdf.devfn());
                if let Some(a) = g.configured.and_then(|w| w.address_of(on1, reg)) {
                    let req = Ioreq::new(IoreqType::Copy, Dir::Read, a, 4, 0);
                    if let Some(v) = g.access(vcpu, req, false) {
                        assert_eq!(
                            v, 0xffff_ffff,
                            "{on1} @{reg:#x} through the configured window"
                        );
                    }
                }
            }
            // Raw port access of any shape.
            0x40..=0x4f => {
                let k = b.u8();
                let port = if k < 0xc0 {
                    0xcf8 + u64::from(k % 8)
                } else {
                    u64::from(b.u16())
                };
                let mut req = Ioreq::new(
                    IoreqType::Pio,
                    if op & 1 == 0 { Dir::Write } else { Dir::Read },
                    port,
                    size_from(b.u8()),
                    u64::from(b.u32()),
                );
                rep_flags(&mut b, &mut req);
                g.access(vcpu, req, op & 2 != 0);
            }
            // Raw MMIO access of any shape, mostly in or near the ECAM window.
            0x50..=0x5f => {
                let k = b.u8();
                let addr = match (k & 3, g.window()) {
                    (0, Some(w)) => w.base + (u64::from(b.u32()) % w.size()),
                    (1, Some(w)) => w.last().wrapping_sub(u64::from(b.u8())),
                    (2, _) => 0xb000_0000 + u64::from(b.u32() & 0x0fff_ffff),
                    _ => b.u64(),
                };
                let mut req = Ioreq::new(
                    IoreqType::Copy,
                    if op & 1 == 0 { Dir::Write } else { Dir::Read },
                    addr,
                    size_from(b.u8()),
                    b.u64(),
                );
                rep_flags(&mut b, &mut req);
                g.access(vcpu, req, op & 2 != 0);
            }
            // Buffered write below 1 MiB (ports, or an ECAM window firmware put at 0).
            0x60..=0x67 => {
                let ty = if op & 1 == 0 {
                    IoreqType::Pio
                } else {
                    IoreqType::Copy
                };
                let addr = u64::from(b.u32() & 0xf_ffff);
                let req = Ioreq::new(ty, Dir::Write, addr, size_from(b.u8()), b.u64());
                g.access(vcpu, req, true);
            }
            // A raw ioreq handed to the engine directly, as a backend that does not follow
            // Xen's rules would.
            0x68..=0x6f => {
                let mut slot = [0u8; IOREQ_SIZE];
                slot.copy_from_slice(&{
                    let mut s = [0u8; IOREQ_SIZE];
                    let t = b.take(IOREQ_SIZE);
                    s[..t.len()].copy_from_slice(t);
                    s
                });
                if let Ok(req) = Ioreq::from_bytes(&slot) {
                    let writes = g.engine_writes(&req);
                    let _ = g.engine.handle(vcpu, &req);
                    g.apply(&writes);
                }
            }
            // A PCI_CONFIG ioreq handed to the engine directly.
            0x70..=0x77 => {
                let sbdf = pick_func(&mut b);
                let reg = pick_reg(&mut b) + u16::from(b.u8() & 3);
                let size = size_from(b.u8());
                let dir = if op & 1 == 0 { Dir::Write } else { Dir::Read };
                let req = Ioreq::pci_config(sbdf.to_xen(), reg.into(), dir, size, b.u64());
                let writes = g.engine_writes(&req);
                let _ = g.engine.handle(vcpu, &req);
                g.apply(&writes);
            }
            // Broadcasts.
            0x78 => {
                if let Ok(Issued::Pending) = g.hv.issue_invalidate(vcpu) {
                    g.engine.poll(Some(Duration::ZERO)).expect("engine polls");
                    assert!(
                        g.hv.collect(vcpu).expect("collect").is_some(),
                        "invalidate completed"
                    );
                }
                assert!(g.hv.check().is_ok());
            }
            0x79 => {
                g.hv.send_timeoffset(b.u64());
                g.engine.poll(Some(Duration::ZERO)).expect("engine polls");
            }
            _ => {
                // Firmware-like: program PCIEXBAR with one dword write through CF8.
                let v = b.u32() | 1;
                g.cfg_cf8(vcpu, Sbdf::default(), 0x60, 4, Dir::Write, v.into());
            }
        }
        g.check();
    }
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        let r = g.engine.router();
        eprintln!("chipset {:?}, {ops} operations", g.engine.chipset());
        eprintln!("windows {:?}", r.windows());
        eprintln!("bridges {:#?}", r.bridges());
        eprintln!("positions {:#?}", r.positions());
        eprintln!("ports {:x?}\nmmio {:x?}", r.port_ranges(), r.mmio_ranges());
        eprintln!("layout {:#?}", g.engine.layout_history());
        eprintln!(
            "engine {:#?}\nhypervisor {:?}",
            g.engine.stats(),
            g.hv.stats()
        );
    }
}
