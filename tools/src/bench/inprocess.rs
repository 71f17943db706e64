//! 2. In-process path: guest accesses per second through the simulated hypervisor, the
//!    engine (intercepts, router) and in-process models, against the same hypervisor calling
//!    the same models directly, each model its own ioreq server as under plain Xen.
//!
//! The machine is Q35-like: a chipset model (MCH, LPC, AHCI, SMBus, four root ports, a NIC
//! and a virtio device behind them, ISA ports, HPET), an NVMe model and a vGPU model, every
//! function placed by BDF so plain Xen can route it too. Both setups run the same guest
//! program: number the bridges, enable ECAM (PCIEXBAR), program and enable the BARs; then the
//! measured sequence, a fixed pseudo-random mix of CF8/CFC configuration reads and writes,
//! port accesses and BAR MMIO accesses. Under plain Xen the chipset model claims
//! 0xcf8-0xcff itself and latches CF8, as QEMU does (Xen latches CF8 and still forwards the
//! write), so every access reaches a server in both setups. Both setups must read the same
//! values (checked).
//!
//! The direct loop is what a device model's own ioreq loop does: wait on its backend, call
//! `handle`, complete. It is told which server the hypervisor picked (one event channel per
//! server under Xen), so it polls only that backend.

use super::route_setup::SplitMix64;
use super::util::median;
use super::{Effort, progress};
use crate::engine::{Engine, EngineConfig};
use crate::models::{BarKind, EmulatedModel, FunctionKind, FunctionSpec, Placement};
use bdf_router::Sbdf;
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::sim::{Issued, SimBackend, SimHypervisor};
use ioreq_server::{
    Backend, BackendEvent, Claim, ClaimError, DeviceModel, Dir, DmControl, IoRange, Ioreq,
    IoreqType, MsiError, Position, size_mask,
};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize)]
pub struct InProcess {
    /// Guest accesses (ioreqs issued to the hypervisor) per second through the multiplexer.
    pub mux_per_s: f64,
    /// The same accesses, each model serving its own hypervisor server directly.
    pub direct_per_s: f64,
    /// mux / direct: the median over rounds of the ratio measured within each round.
    pub ratio: f64,
    /// ECAM configuration reads per second through the multiplexer (no direct equivalent:
    /// plain Xen does not decode ECAM).
    pub mux_ecam_per_s: f64,
    /// Ioreqs in one pass of the measured sequence.
    pub sequence_ioreqs: usize,
}

const SEED: u64 = 0x001f_2e3d_4c5b;
const SEQUENCE_OPS: usize = 4096;

const CHIPSET: usize = 0;
const NVME: usize = 1;
const VGPU: usize = 2;
const MODEL_NAMES: [&str; 3] = ["chipset", "nvme", "vgpu"];

/// One function of the machine, with the addresses firmware gives its BARs.
struct Func {
    model: usize,
    at: &'static str,
    spec: FunctionSpec,
    bars: Vec<u64>,
    /// Bridges: (secondary, subordinate) bus.
    buses: Option<(u8, u8)>,
}

fn sbdf(t: &str) -> Result<Sbdf, String> {
    t.parse().map_err(|e| format!("{t}: {e}"))
}

fn machine() -> Vec<Func> {
    let ep = FunctionSpec::endpoint;
    let rp = |multi: bool| FunctionSpec {
        multifunction: multi,
        ..FunctionSpec::bridge(0x1b36, 0x000c, FunctionKind::RootPort)
    };
    let f = |model, at, spec, bars: &[u64]| Func {
        model,
        at,
        spec,
        bars: bars.to_vec(),
        buses: None,
    };
    let bridge = |at, spec, bus: u8| Func {
        model: CHIPSET,
        at,
        spec,
        bars: vec![],
        buses: Some((bus, bus)),
    };
    vec![
        f(
            CHIPSET,
            "00:00.0",
            FunctionSpec {
                pcie: false,
                ..ep(0x8086, 0x29c0, 0x060000)
            },
            &[],
        ),
        f(
            CHIPSET,
            "00:1f.0",
            FunctionSpec {
                pcie: false,
                multifunction: true,
                ..ep(0x8086, 0x2918, 0x060100)
            },
            &[],
        ),
        f(
            CHIPSET,
            "00:1f.2",
            FunctionSpec {
                pcie: false,
                ..ep(0x8086, 0x2922, 0x010601).with_bar(BarKind::Mem32, 0x1000)
            },
            &[0xc0e0_0000],
        ),
        f(
            CHIPSET,
            "00:1f.3",
            FunctionSpec {
                pcie: false,
                ..ep(0x8086, 0x2930, 0x0c0500).with_bar(BarKind::Io, 0x40)
            },
            &[0xc000],
        ),
        bridge("00:02.0", rp(true), 1),
        bridge("00:02.1", rp(false), 2),
        bridge("00:02.2", rp(false), 3),
        bridge("00:02.3", rp(false), 4),
        f(
            CHIPSET,
            "01:00.0",
            ep(0x8086, 0x10d3, 0x020000)
                .with_bar(BarKind::Mem32, 0x2_0000)
                .with_bar(BarKind::Io, 0x20),
            &[0xc0c2_0000, 0xb000],
        ),
        f(
            NVME,
            "02:00.0",
            ep(0x8086, 0x5845, 0x010802).with_bar(BarKind::Mem64, 0x4000),
            &[0xc0a0_0000],
        ),
        f(
            VGPU,
            "03:00.0",
            ep(0x10de, 0x1eb8, 0x030000).with_bar(BarKind::Mem64, 0x10_0000),
            &[0xc100_0000],
        ),
        f(
            CHIPSET,
            "04:00.0",
            ep(0x1af4, 0x1044, 0x00ff00).with_bar(BarKind::Mem64, 0x4000),
            &[0xc0a1_0000],
        ),
    ]
}

/// Fixed register ranges of the chipset model (ISA ports, HPET).
fn chipset_ranges() -> Vec<IoRange> {
    vec![
        IoRange::ports(0x70, 0x71),
        IoRange::ports(0x3f8, 0x3ff),
        IoRange::ports(0x510, 0x511),
        IoRange::mmio(0xfed0_0000, 0x400),
    ]
}

fn build_models(direct: bool) -> Result<Vec<Box<dyn DeviceModel>>, String> {
    let mut models: Vec<EmulatedModel> =
        MODEL_NAMES.iter().map(|n| EmulatedModel::new(n)).collect();
    for f in machine() {
        let at = Placement::Bdf(sbdf(f.at)?.to_xen());
        let m = std::mem::replace(&mut models[f.model], EmulatedModel::new(""));
        models[f.model] = m.with_function(at, &f.spec);
    }
    let mut chipset = std::mem::replace(&mut models[CHIPSET], EmulatedModel::new(""));
    for r in chipset_ranges() {
        chipset = chipset.with_range(r);
    }
    models[CHIPSET] = chipset;
    Ok(models
        .into_iter()
        .enumerate()
        .map(|(i, m)| -> Box<dyn DeviceModel> {
            if direct && i == CHIPSET {
                Box::new(Cf8Latch { inner: m, cf8: 0 })
            } else {
                Box::new(m)
            }
        })
        .collect())
}

/// Under plain Xen the chipset model (QEMU) owns 0xcf8-0xcff: Xen latches CF8 and still
/// forwards the write to it, and QEMU's host bridge latches it too. This is that latch in
/// front of the chipset model (the multiplexer has the same latch of its own).
struct Cf8Latch {
    inner: EmulatedModel,
    cf8: u32,
}

impl DeviceModel for Cf8Latch {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn attach(&mut self, ctl: &mut dyn DmControl) -> Result<(), ClaimError> {
        self.inner.attach(ctl)?;
        ctl.map(Claim::Range(IoRange::ports(0xcf8, 0xcff)))
    }

    fn handle(
        &mut self,
        vcpu: u32,
        req: &Ioreq,
        ctl: &mut dyn DmControl,
    ) -> Result<u64, ioreq_server::DmError> {
        if req.ty == IoreqType::Pio && (0xcf8..=0xcff).contains(&req.addr) {
            return Ok(match (req.addr, req.size, req.dir) {
                (0xcf8, 4, Dir::Write) => {
                    self.cf8 = req.data as u32;
                    0
                }
                (0xcf8, 4, Dir::Read) => u64::from(self.cf8),
                _ => req.size_mask(),
            });
        }
        self.inner.handle(vcpu, req, ctl)
    }
}

/// A guest access and the model that serves it under plain Xen.
#[derive(Debug, Clone, Copy)]
struct Op {
    req: Ioreq,
    owner: usize,
}

fn cf8(s: Sbdf, reg: u16) -> u64 {
    0x8000_0000 | (u64::from(s.bdf()) << 8) | u64::from(reg & 0xfc)
}

fn pio(dir: Dir, port: u64, size: u32, data: u64) -> Ioreq {
    Ioreq::new(IoreqType::Pio, dir, port, size, data)
}

fn mmio(dir: Dir, addr: u64, size: u32, data: u64) -> Ioreq {
    Ioreq::new(IoreqType::Copy, dir, addr, size, data)
}

fn config_write(out: &mut Vec<Op>, s: Sbdf, owner: usize, reg: u16, size: u32, v: u64) {
    out.push(Op {
        req: pio(Dir::Write, 0xcf8, 4, cf8(s, reg)),
        owner: CHIPSET,
    });
    out.push(Op {
        req: pio(Dir::Write, 0xcfc + u64::from(reg & 3), size, v),
        owner,
    });
}

fn config_read(out: &mut Vec<Op>, s: Sbdf, owner: usize, reg: u16, size: u32) {
    out.push(Op {
        req: pio(Dir::Write, 0xcf8, 4, cf8(s, reg)),
        owner: CHIPSET,
    });
    out.push(Op {
        req: pio(Dir::Read, 0xcfc + u64::from(reg & 3), size, 0),
        owner,
    });
}

/// Firmware's part: bus numbers, ECAM, BARs, command registers.
fn setup_program() -> Result<Vec<Op>, String> {
    let mut out = vec![];
    for f in machine() {
        let s = sbdf(f.at)?;
        if let Some((sec, sub)) = f.buses {
            let v = u64::from(s.bus) | u64::from(sec) << 8 | u64::from(sub) << 16;
            config_write(&mut out, s, f.model, 0x18, 4, v);
        }
    }
    // PCIEXBAR: 256 buses at 0xb0000000, enabled.
    let mch = sbdf("00:00.0")?;
    config_write(&mut out, mch, CHIPSET, 0x64, 4, 0);
    config_write(&mut out, mch, CHIPSET, 0x60, 4, 0xb000_0001);
    for f in machine() {
        let s = sbdf(f.at)?;
        let mut reg = 0x10u16;
        for (b, addr) in f.spec.bars.iter().zip(&f.bars) {
            config_write(&mut out, s, f.model, reg, 4, addr & 0xffff_ffff);
            if b.kind == BarKind::Mem64 {
                config_write(&mut out, s, f.model, reg + 4, 4, addr >> 32);
                reg += 8;
            } else {
                reg += 4;
            }
        }
        if !f.bars.is_empty() {
            config_write(&mut out, s, f.model, 0x04, 2, 0x7);
        }
    }
    Ok(out)
}

/// Where a guest can touch registers: (space is port, base, length, owner, access size).
fn register_windows() -> Vec<(bool, u64, u64, usize, u32)> {
    vec![
        (true, 0x70, 2, CHIPSET, 1),
        (true, 0x3f8, 8, CHIPSET, 1),
        (true, 0x510, 2, CHIPSET, 2),
        (true, 0xb000, 0x20, CHIPSET, 4),
        (true, 0xc000, 0x40, CHIPSET, 1),
        (false, 0xfed0_0000, 0x400, CHIPSET, 4),
        (false, 0xc0c2_0000, 0x1000, CHIPSET, 4),
        (false, 0xc0e0_0000, 0x1000, CHIPSET, 4),
        (false, 0xc0a1_0000, 0x1000, CHIPSET, 4),
        (false, 0xc0a0_0000, 0x1000, NVME, 4),
        (false, 0xc100_0000, 0x1000, VGPU, 4),
    ]
}

/// The measured sequence: 45% configuration reads, 10% configuration writes (interrupt
/// line), 20% port accesses, 25% MMIO accesses; reads and writes mixed.
fn measured_sequence() -> Result<Vec<Op>, String> {
    let funcs: Vec<(Sbdf, usize)> = machine()
        .iter()
        .map(|f| sbdf(f.at).map(|s| (s, f.model)))
        .collect::<Result<_, _>>()?;
    let windows = register_windows();
    let ports: Vec<_> = windows.iter().filter(|w| w.0).collect();
    let mems: Vec<_> = windows.iter().filter(|w| !w.0).collect();
    let mut rng = SplitMix64(SEED);
    let mut out = vec![];
    for _ in 0..SEQUENCE_OPS {
        let roll = rng.below(100);
        let dir = if rng.below(2) == 0 {
            Dir::Read
        } else {
            Dir::Write
        };
        let data = rng.next_u64() & 0xffff_ffff;
        if roll < 45 {
            let (s, owner) = funcs[rng.below(funcs.len() as u64) as usize];
            let reg = (rng.below(0x10) * 4) as u16;
            config_read(&mut out, s, owner, reg, 4);
        } else if roll < 55 {
            let (s, owner) = funcs[rng.below(funcs.len() as u64) as usize];
            config_write(&mut out, s, owner, 0x3c, 1, data & 0xff);
        } else if roll < 75 {
            let &&(_, base, len, owner, size) = &ports[rng.below(ports.len() as u64) as usize];
            let port = base + rng.below(len / u64::from(size)) * u64::from(size);
            out.push(Op {
                req: pio(dir, port, size, data & size_mask(size)),
                owner,
            });
        } else {
            let &&(_, base, len, owner, size) = &mems[rng.below(mems.len() as u64) as usize];
            let addr = base + rng.below(len / u64::from(size)) * u64::from(size);
            out.push(Op {
                req: mmio(dir, addr, size, data & size_mask(size)),
                owner,
            });
        }
    }
    Ok(out)
}

/// ECAM configuration reads of the same functions (multiplexer only).
fn ecam_sequence() -> Result<Vec<Op>, String> {
    let funcs: Vec<(Sbdf, usize)> = machine()
        .iter()
        .map(|f| sbdf(f.at).map(|s| (s, f.model)))
        .collect::<Result<_, _>>()?;
    let mut rng = SplitMix64(SEED ^ 0xec);
    Ok((0..SEQUENCE_OPS)
        .map(|_| {
            let (s, owner) = funcs[rng.below(funcs.len() as u64) as usize];
            let reg = rng.below(0x10) * 4;
            let addr = 0xb000_0000 + (u64::from(s.bdf()) << 12) + reg;
            Op {
                req: mmio(Dir::Read, addr, 4, 0),
                owner,
            }
        })
        .collect())
}

/// The multiplexer in front of all models, on one hypervisor server.
struct MuxGuest {
    hv: SimHypervisor,
    engine: Engine<SimBackend>,
}

impl MuxGuest {
    fn new() -> Result<Self, String> {
        let hv = SimHypervisor::new(1, Duration::from_secs(5));
        let backend = hv
            .create_server(BufioreqMode::Atomic)
            .map_err(|e| e.to_string())?;
        let models = build_models(false)?;
        let engine =
            Engine::new(backend, models, &EngineConfig::default()).map_err(|e| e.to_string())?;
        engine
            .backend()
            .set_enabled(true)
            .map_err(|e| e.to_string())?;
        Ok(MuxGuest { hv, engine })
    }

    #[inline]
    fn access(&mut self, op: &Op) -> Result<u64, String> {
        match self.hv.issue(0, &op.req, false) {
            Ok(Issued::Done(v)) => Ok(v),
            Ok(Issued::Pending) => {
                self.engine
                    .poll(Some(Duration::ZERO))
                    .map_err(|e| e.to_string())?;
                self.hv
                    .collect(0)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("the engine did not complete {:?}", op.req))
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A model's DMOPs under plain Xen: straight to its own hypervisor server.
struct DirectCtl<'a> {
    backend: &'a mut SimBackend,
}

impl DmControl for DirectCtl<'_> {
    fn map(&mut self, claim: Claim) -> Result<(), ClaimError> {
        match claim {
            Claim::Range(r) => self
                .backend
                .map_range(r)
                .map_err(|source| ClaimError::Backend {
                    claim: Claim::Range(r),
                    source,
                }),
            Claim::Position(p) => Err(ClaimError::Invalid {
                claim: Claim::Position(p),
                why: "plain Xen has no position claims".into(),
            }),
        }
    }

    fn unmap(&mut self, claim: Claim) -> Result<(), ClaimError> {
        match claim {
            Claim::Range(r) => self
                .backend
                .unmap_range(r)
                .map_err(|source| ClaimError::Backend {
                    claim: Claim::Range(r),
                    source,
                }),
            Claim::Position(p) => Err(ClaimError::NotOwned {
                claim: Claim::Position(p),
                requester: "direct".into(),
            }),
        }
    }

    fn locate(&self, _position: &Position) -> Option<u32> {
        None
    }

    fn inject_msi(&mut self, addr: u64, data: u32) -> Result<(), MsiError> {
        self.backend
            .inject_msi(addr, data)
            .map_err(|source| MsiError::from_backend(addr, data, source))
    }
}

struct DirectServer {
    backend: SimBackend,
    model: Box<dyn DeviceModel>,
}

/// Each model its own hypervisor server, served by its own loop.
struct DirectGuest {
    hv: SimHypervisor,
    servers: Vec<DirectServer>,
    events: Vec<BackendEvent>,
}

impl DirectGuest {
    fn new() -> Result<Self, String> {
        let hv = SimHypervisor::new(1, Duration::from_secs(5));
        let mut servers = vec![];
        for m in build_models(true)? {
            let mut backend = hv
                .create_server(BufioreqMode::Atomic)
                .map_err(|e| e.to_string())?;
            let mut model = m;
            model
                .attach(&mut DirectCtl {
                    backend: &mut backend,
                })
                .map_err(|e| e.to_string())?;
            backend.set_enabled(true).map_err(|e| e.to_string())?;
            servers.push(DirectServer { backend, model });
        }
        Ok(DirectGuest {
            hv,
            servers,
            events: Vec::with_capacity(64),
        })
    }

    #[inline]
    fn access(&mut self, op: &Op) -> Result<u64, String> {
        match self.hv.issue(0, &op.req, false) {
            Ok(Issued::Done(v)) => Ok(v),
            Ok(Issued::Pending) => {
                let DirectServer { backend, model } = self
                    .servers
                    .get_mut(op.owner)
                    .ok_or("no such direct server")?;
                self.events.clear();
                backend
                    .wait(Some(Duration::ZERO), &mut self.events)
                    .map_err(|e| e.to_string())?;
                for ev in self.events.drain(..) {
                    match ev {
                        BackendEvent::Request { vcpu, req } => {
                            let r = model.handle(vcpu, &req, &mut DirectCtl { backend });
                            let v = match (r, req.dir) {
                                (Ok(v), Dir::Read) => v & req.size_mask(),
                                (Ok(_), Dir::Write) => 0,
                                (Err(_), Dir::Read) => req.size_mask(),
                                (Err(_), Dir::Write) => 0,
                            };
                            backend.complete(vcpu, v).map_err(|e| e.to_string())?;
                        }
                        BackendEvent::Buffered(req) => {
                            let _ = model.handle(0, &req, &mut DirectCtl { backend });
                        }
                    }
                }
                self.hv
                    .collect(0)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("server {} did not complete {:?}", op.owner, op.req))
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

trait Guest {
    fn run(&mut self, ops: &[Op]) -> Result<u64, String>;
}

impl Guest for MuxGuest {
    fn run(&mut self, ops: &[Op]) -> Result<u64, String> {
        let mut sum = 0u64;
        for op in ops {
            let v = self.access(op)?;
            if op.req.dir == Dir::Read {
                sum = sum.wrapping_mul(0x100_0000_01b3).wrapping_add(v);
            }
        }
        Ok(sum)
    }
}

impl Guest for DirectGuest {
    fn run(&mut self, ops: &[Op]) -> Result<u64, String> {
        let mut sum = 0u64;
        for op in ops {
            let v = self.access(op)?;
            if op.req.dir == Dir::Read {
                sum = sum.wrapping_mul(0x100_0000_01b3).wrapping_add(v);
            }
        }
        Ok(sum)
    }
}

/// Accesses per second of `passes` passes over `ops`.
fn rate(g: &mut dyn Guest, ops: &[Op], passes: u64) -> Result<f64, String> {
    let t = Instant::now();
    for _ in 0..passes {
        std::hint::black_box(g.run(ops)?);
    }
    Ok((ops.len() as u64 * passes) as f64 / t.elapsed().as_secs_f64().max(1e-9))
}

pub fn run(e: &Effort) -> Result<InProcess, String> {
    let setup = setup_program()?;
    let seq = measured_sequence()?;
    let ecam = ecam_sequence()?;
    let mut mux = MuxGuest::new()?;
    let mut direct = DirectGuest::new()?;
    mux.run(&setup)?;
    direct.run(&setup)?;
    // The setup worked: ECAM is on and every BAR is claimed, in both.
    if mux.engine.router().windows().is_empty() {
        return Err("the guest's PCIEXBAR write did not open an ECAM window".into());
    }
    for (_, base, _, owner, _) in register_windows() {
        let want = MODEL_NAMES[owner];
        let r = mux.engine.router();
        let got = r
            .mmio_owner(base, base)
            .or_else(|| r.port_owner(base, base))
            .map(|o| r.server_name(o).to_string());
        if got.as_deref() != Some(want) {
            return Err(format!("{base:#x} is owned by {got:?}, not {want}"));
        }
    }
    // Same answers both ways (the sequence leaves the models' state as it found it only
    // modulo written registers, so compare the first pass of fresh-from-setup guests).
    let a = mux.run(&seq)?;
    let b = direct.run(&seq)?;
    if a != b {
        return Err(format!(
            "the multiplexer and the direct path read different values ({a:#x} vs {b:#x})"
        ));
    }
    let ecam_check = mux.run(&ecam)?;
    std::hint::black_box(ecam_check);
    // Calibrate passes per round on the direct path (the faster one).
    let mut passes = 1u64;
    loop {
        let t = Instant::now();
        for _ in 0..passes {
            direct.run(&seq)?;
        }
        let el = t.elapsed();
        if el >= e.inproc_round / 4 {
            passes =
                ((passes as f64 * e.inproc_round.as_secs_f64() / el.as_secs_f64()) as u64).max(1);
            break;
        }
        passes *= 2;
    }
    // Short rounds, the two paths back to back in alternating order, and the ratio taken per
    // round: a slow patch of the machine (a neighbour, a frequency change) hits both halves
    // of the rounds it falls in, and the median discards the rounds it distorts.
    let (mut m, mut d, mut ec, mut ratios) = (vec![], vec![], vec![], vec![]);
    for round in 0..e.inproc_rounds {
        let (rm, rd) = if round % 2 == 0 {
            let rm = rate(&mut mux, &seq, passes)?;
            (rm, rate(&mut direct, &seq, passes)?)
        } else {
            let rd = rate(&mut direct, &seq, passes)?;
            (rate(&mut mux, &seq, passes)?, rd)
        };
        m.push(rm);
        d.push(rd);
        ratios.push(rm / rd.max(1e-9));
        ec.push(rate(&mut mux, &ecam, passes)?);
    }
    if let Err(v) = mux.hv.check() {
        return Err(format!("simulation invariants (mux): {v:?}"));
    }
    if let Err(v) = direct.hv.check() {
        return Err(format!("simulation invariants (direct): {v:?}"));
    }
    let mux_per_s = median(&mut m);
    let direct_per_s = median(&mut d);
    let r = InProcess {
        mux_per_s,
        direct_per_s,
        ratio: median(&mut ratios),
        mux_ecam_per_s: median(&mut ec),
        sequence_ioreqs: seq.len(),
    };
    progress(&format!(
        "in-process: mux {:.0} ioreqs/s, direct {:.0} ioreqs/s ({:.2}x); ECAM through mux {:.0}/s",
        r.mux_per_s, r.direct_per_s, r.ratio, r.mux_ecam_per_s
    ));
    Ok(r)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mux_and_direct_serve_the_same_machine_alike() {
        let mut mux = MuxGuest::new().unwrap();
        let mut direct = DirectGuest::new().unwrap();
        let setup = setup_program().unwrap();
        mux.run(&setup).unwrap();
        direct.run(&setup).unwrap();
        assert_eq!(mux.engine.chipset(), chipset_intercept::Chipset::Q35);
        assert!(!mux.engine.router().windows().is_empty(), "ECAM enabled");
        let seq = measured_sequence().unwrap();
        assert_eq!(mux.run(&seq).unwrap(), direct.run(&seq).unwrap());
        // Every access reached a server in both setups (none answered by the hypervisor).
        assert_eq!(mux.hv.stats().unclaimed, 0);
        assert_eq!(direct.hv.stats().unclaimed, 0);
        // ECAM reads of the same functions read what CF8 reads do.
        let ecam = ecam_sequence().unwrap();
        let mut cf8 = vec![];
        for op in &ecam {
            let off = op.req.addr - 0xb000_0000;
            let s = Sbdf::from_devfn(0, (off >> 20) as u8, (off >> 12) as u8);
            config_read(&mut cf8, s, op.owner, (off & 0xfff) as u16, 4);
        }
        let reads = |g: &mut MuxGuest, ops: &[Op]| -> Vec<u64> {
            ops.iter()
                .filter_map(|o| {
                    let v = g.access(o).unwrap();
                    (o.req.dir == Dir::Read).then_some(v)
                })
                .collect()
        };
        assert_eq!(reads(&mut mux, &ecam), reads(&mut mux, &cf8));
        assert!(mux.hv.check().is_ok());
        assert!(direct.hv.check().is_ok());
    }
}
