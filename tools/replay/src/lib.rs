//! `ioreq-mux replay`: a recorded guest's accesses through the simulated hypervisor, the
//! multiplexer and simulated device models, checked access by access against what the real
//! machine did.
//!
//! Per access: the value returned to the vCPU equals the recorded one; the access reached the
//! server standing for the device QEMU routed it to (`qemu_devices` in the topology), as a
//! PCI_CONFIG request for the recorded function and register when it was a configuration
//! access; intercepted registers answered with the recorded values; and (at the end) every
//! ioreq was completed exactly once (the simulation's invariant checker).
//!
//! Trace servers answer with the recorded value. Like a real device model, each claims its
//! BARs when the guest maps them: the trace's BAR events (QEMU's `pci_update_mappings_*`,
//! recorded right after the configuration write that caused them) become map/unmap claims of
//! the server that stands for that device, before the next access.
//!
//! After the last access, trace servers answer configuration accesses from what the trace
//! showed of their functions (`replay::recorded`), so `inspect --trace` can read the layout the
//! firmware left. Until then they answer exactly as before.

use crate::dm::Children;
use bdf_router::Sbdf;
use chipset_intercept::Phase;
use ioreq_mux_config::{Config, ConfigError, Server, ServerKind};
use ioreq_mux_engine::{Control, Engine, EngineError, MUX_NAME};
use ioreq_mux_trace::{
    self as trace, Access, BarEventKind, ProgressHandle, Record, Space, StrId, StringTable,
    Thousands, TraceError, TraceReader,
};
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::sim::{Issued, SimBackend, SimError, SimHypervisor};
use ioreq_server::{
    Claim, ClaimError, DeviceModel, Dir, DmControl, DmError, IoRange, Ioreq, IoreqType, RangeKind,
    abi, size_mask,
};
use recorded::RecordedConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::time::{Duration, Instant};
use thiserror::Error;

pub mod dm;
mod recorded;
mod report;

pub use report::{
    Cause, CauseCount, CauseKind, ClaimFailure, ConfigPlace, Divergence, InvariantViolation,
    LayoutChange, RecordedAccess, ReplayReport, SCHEMA,
};

/// vCPUs the simulated guest has (the traces use 2).
pub const REPLAY_VCPUS: u32 = 8;

/// Where trace servers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DmMode {
    #[default]
    InProcess,
    Process,
}

/// How to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Divergences shown in full.
    pub show: usize,
    pub limit: Option<u64>,
    /// Where to report progress (accesses replayed, against the trace's total when known).
    pub progress: Option<ProgressHandle>,
    pub dm_mode: DmMode,
    /// Fault injection (tests): kill this out-of-process server's process before this access.
    pub kill: Option<(String, u64)>,
    /// The `ioreq-mux` executable for out-of-process servers (default: this one).
    pub dm_exe: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: {source}")]
    Trace {
        path: PathBuf,
        #[source]
        source: TraceError,
    },
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("simulation: {0}")]
    Sim(#[from] SimError),
    #[error("topology: {0}")]
    Topology(String),
    #[error("{0}: the trace has no guest access: nothing to replay")]
    EmptyTrace(PathBuf),
}

/// What the access being replayed recorded, shared with the trace servers.
///
/// The harness writes it before an access and the in-process trace models read it while the
/// engine dispatches that access, inside `Engine::poll` on the harness's own thread. Nothing
/// here is ever touched by two threads at once, so relaxed loads and stores are enough: no
/// lock and no read-modify-write on the path of an access (atomics only because a
/// `DeviceModel` must be `Send`).
#[derive(Debug, Default)]
struct Cursor {
    active: AtomicBool,
    /// The whole trace has been replayed: trace servers answer from what it showed
    /// ([`RecordedConfig`]).
    replayed: AtomicBool,
    /// The recorded access is a write.
    write: AtomicBool,
    data: AtomicU64,
    /// First register of a recorded configuration access, or [`NO_REG`].
    reg: AtomicU32,
    /// A trace model received a request for this access; `first_addr` is its address.
    delivered: AtomicBool,
    first_addr: AtomicU64,
    /// Configuration reads outside the trace that a trace model answered without knowing
    /// the bytes (never accessed by the recorded guest: they read 0), see [`Unrecorded`].
    unrecorded: AtomicU64,
}

/// `Cursor::reg` of an access that is not a configuration access.
const NO_REG: u32 = u32::MAX;

/// The recorded access as a trace model sees it.
#[derive(Debug, Clone, Copy)]
struct Recorded {
    write: bool,
    data: u64,
    reg: Option<u16>,
}

impl Cursor {
    /// The harness starts replaying an access.
    fn begin(&self, write: bool, data: u64, reg: Option<u16>) {
        self.write.store(write, Relaxed);
        self.data.store(data, Relaxed);
        self.reg.store(reg.map_or(NO_REG, u32::from), Relaxed);
        self.delivered.store(false, Relaxed);
        self.active.store(true, Relaxed);
    }

    /// No recorded access any more: the whole trace has been replayed.
    fn end(&self) {
        self.active.store(false, Relaxed);
        self.replayed.store(true, Relaxed);
    }

    /// Whether the whole trace has been replayed.
    fn replayed(&self) -> bool {
        self.replayed.load(Relaxed)
    }

    /// The access being replayed, if any.
    fn recorded(&self) -> Option<Recorded> {
        if !self.active.load(Relaxed) {
            return None;
        }
        let reg = self.reg.load(Relaxed);
        Some(Recorded {
            write: self.write.load(Relaxed),
            data: self.data.load(Relaxed),
            reg: (reg != NO_REG).then_some(reg as u16),
        })
    }

    /// A trace model received `req`; the first one per access is kept.
    fn deliver(&self, req: &Ioreq) {
        if !self.delivered.load(Relaxed) {
            self.first_addr.store(req.addr, Relaxed);
            self.delivered.store(true, Relaxed);
        }
    }

    /// The address of the first request a trace model received for this access.
    fn first_delivery(&self) -> Option<u64> {
        self.delivered
            .load(Relaxed)
            .then(|| self.first_addr.load(Relaxed))
    }

    /// A trace model answered a read with bytes the trace never showed.
    fn unrecorded_read(&self) {
        self.unrecorded.fetch_add(1, Relaxed);
    }
}

type Shared = Arc<Cursor>;

/// Tells apart a trace server's answers the trace did not give: how many configuration
/// reads outside the recorded accesses (detection, `inspect` after the replay) a trace
/// server answered with bytes the recorded guest never accessed (read as 0: the trace says
/// nothing of them). A reader compares the count before and after a read.
#[derive(Debug, Clone)]
pub struct Unrecorded(Shared);

impl Unrecorded {
    /// Reads answered so far without the trace showing what they read.
    pub fn count(&self) -> u64 {
        self.0.unrecorded.load(Relaxed)
    }
}

/// A simulated device model answering with the recorded values.
struct TraceModel {
    name: String,
    claims: Vec<Claim>,
    ids: Vec<(Sbdf, u32)>,
    cursor: Shared,
    /// What the trace showed of this server's functions, for the configuration accesses made
    /// after the replay (`inspect`).
    recorded: RecordedConfig,
}

impl DeviceModel for TraceModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn attach(&mut self, ctl: &mut dyn DmControl) -> Result<(), ClaimError> {
        ctl.map_all(&self.claims)
    }

    fn handle(
        &mut self,
        _vcpu: u32,
        req: &Ioreq,
        _ctl: &mut dyn DmControl,
    ) -> Result<u64, DmError> {
        if self.cursor.replayed() {
            if let Some(a) = self.recorded.after_replay(req) {
                if !a.recorded {
                    self.cursor.unrecorded_read();
                }
                return Ok(a.value);
            }
        }
        let rec = self.cursor.recorded();
        // Outside the trace (detection, seeding) or a read the engine makes during a recorded
        // write (a header-type probe): answer what is known of the recorded machine.
        let Some(c) = rec.filter(|c| !(c.write && req.dir == Dir::Read)) else {
            if req.ty == IoreqType::PciConfig && req.dir == Dir::Read {
                let (sbdf, reg) = abi::split_pci_config_addr(req.addr);
                let f = Sbdf::from_xen(sbdf);
                let v = self.ids.iter().find(|(s, _)| *s == f).map(|(_, v)| *v);
                return Ok(match v {
                    Some(v) if reg < 4 => u64::from(v) >> (8 * reg),
                    // Unknown registers read as their reset value, taken to be 0.
                    _ => {
                        self.cursor.unrecorded_read();
                        0
                    }
                });
            }
            return Ok(0);
        };
        self.cursor.deliver(req);
        let mut v = c.data;
        if let (IoreqType::PciConfig, Some(r0)) = (req.ty, c.reg) {
            let (_, reg) = abi::split_pci_config_addr(req.addr);
            v >>= 8 * (reg.saturating_sub(u32::from(r0)).min(7));
        }
        self.recorded
            .learn_request(req, if req.dir == Dir::Read { v } else { req.data });
        Ok(v)
    }
}

/// A BAR QEMU has mapped now.
#[derive(Debug, Clone, Copy)]
struct LiveBar {
    space: Space,
    base: u64,
    last: u64,
    device: StrId,
    /// Server that claimed it, if the claim went through.
    claimed_by: Option<u16>,
}

struct Harness {
    /// Engine server index -> our model id.
    by_engine: Vec<Option<u16>>,
    /// Per model id: runs in its own process (claims its BARs itself).
    remote: Vec<bool>,
    engine: Engine<SimBackend>,
    hv: SimHypervisor,
    cursor: Shared,
    /// Server index in the engine (router) by our model id.
    engine_idx: Vec<u16>,
    names: Vec<String>,
    /// Per model id: QEMU device types it stands for; the default ("*") server.
    devices: Vec<Vec<String>>,
    default_server: Option<u16>,
    /// Device type string id -> model id, resolved lazily (indexed by the id: a few dozen
    /// strings; `None` = not resolved yet).
    by_device: Vec<Option<Option<u16>>>,
    /// Memory BARs QEMU has mapped now.
    bars: Vec<LiveBar>,
    /// I/O BARs (few: kept apart so port accesses scan only them).
    port_bars: Vec<LiveBar>,
    /// Intercepted registers the model never sees: (function, offset, width).
    hidden: Vec<(Sbdf, u16, u16)>,
    report: ReplayReport,
    /// Accesses answered: [multiplexer, model 0, model 1, ...].
    served: Vec<u64>,
    /// Accesses by kind: config-cf8, config-ecam, pio, mmio.
    kinds: [u64; 4],
    /// Per model id: the topology line of each of `devices`.
    device_lines: Vec<Vec<usize>>,
    /// Per model id: each claim its `owns` lists, with its topology line.
    owns_lines: Vec<Vec<(Claim, usize)>>,
    strings: StringTable,
}

impl Harness {
    fn string(&self, id: StrId) -> String {
        self.strings.get(id).unwrap_or("?").to_string()
    }

    fn bars_of(&mut self, space: Space) -> &mut Vec<LiveBar> {
        if space == Space::Port {
            &mut self.port_bars
        } else {
            &mut self.bars
        }
    }

    fn name_of(&self, m: Option<u16>) -> String {
        match m {
            Some(m) => self.names[usize::from(m)].clone(),
            None => MUX_NAME.to_string(),
        }
    }

    /// Counts a divergence of access `n` under its cause. `want` is the server expected
    /// (for [`CauseKind::Misrouted`]), standing for QEMU's `device`.
    fn diverge(&mut self, n: u64, a: &Access, cause: (CauseKind, Option<u16>), what: String) {
        self.diverge_to(n, a, cause, None, what);
    }

    fn diverge_to(
        &mut self,
        n: u64,
        a: &Access,
        (kind, handler): (CauseKind, Option<u16>),
        want: Option<(Option<u16>, Option<StrId>)>,
        what: String,
    ) {
        // The claim that routed the access where it went is the line to look at; the
        // `qemu_devices` line that made another server expected is the other half of the
        // disagreement, and the cause when no claim routed it (nobody answered, say).
        let expected_by = want.and_then(|(w, d)| self.place(w?, d?));
        let routed_by = want.and(handler).and_then(|h| self.routed_by(h, a));
        let (config, expected_by) = match routed_by {
            Some(r) => (Some(r), expected_by),
            None => (expected_by, None),
        };
        let cause = Cause {
            kind,
            target: self.target(a),
            answered_by: Some(self.name_of(handler)),
            expected: want.map(|(w, _)| self.name_of(w)),
            config,
            expected_by,
        };
        let recorded = Some(self.describe(a));
        self.report.diverge(Divergence {
            access: n,
            cause,
            what,
            recorded,
        });
    }

    /// What an access addressed, as divergences are grouped: the function of a configuration
    /// access, else QEMU's region.
    fn target(&self, a: &Access) -> String {
        match (a.config, a.region) {
            (Some(c), _) => format!("config of {}", c.sbdf.short()),
            (None, Some(r)) => format!("{} region '{}'", a.space, self.string(r)),
            (None, None) => format!("{} {:#x}", a.space, a.addr),
        }
    }

    /// The `owns` entry of server `m` that routed access `a` to it: for a configuration
    /// access the BDF range, or the position as it resolves now, that holds the function;
    /// else the port or MMIO range that holds the address.
    fn routed_by(&self, m: u16, a: &Access) -> Option<ConfigPlace> {
        let idx = self.engine_idx[usize::from(m)];
        let router = self.engine.router();
        let bdf = a.config.map(|c| c.sbdf);
        let space = match a.space {
            Space::Port => RangeKind::Port,
            Space::Mmio => RangeKind::Mmio,
        };
        let last = a.addr.saturating_add(u64::from(a.size.max(1)) - 1);
        let covers = |claim: &Claim| match (claim, bdf) {
            (Claim::Range(r), Some(f)) => {
                let f = u64::from(f.to_xen());
                r.kind == RangeKind::Pci && r.contains(f, f)
            }
            (Claim::Position(p), Some(f)) => router
                .positions()
                .iter()
                .any(|c| c.owner == idx && c.position == *p && c.resolved == Some(f)),
            (Claim::Range(r), None) => r.kind == space && r.contains(a.addr, last),
            (Claim::Position(_), None) => false,
        };
        let (claim, line) = self.owns_lines[usize::from(m)]
            .iter()
            .find(|(c, _)| covers(c))?;
        let key = match claim {
            Claim::Position(_) => "owns.position",
            Claim::Range(r) => match r.kind {
                RangeKind::Pci => "owns.bdf",
                RangeKind::Port => "owns.ports",
                RangeKind::Mmio => "owns.mmio",
            },
        };
        Some(ConfigPlace { key, line: *line })
    }

    /// The topology line where server `m` lists QEMU's `device` (or `*`).
    fn place(&self, m: u16, device: StrId) -> Option<ConfigPlace> {
        let name = self.string(device);
        let listed = &self.devices[usize::from(m)];
        let i = listed
            .iter()
            .position(|d| *d == name)
            .or_else(|| listed.iter().position(|d| d == "*"))?;
        let line = *self.device_lines[usize::from(m)].get(i)?;
        Some(ConfigPlace {
            key: "qemu_devices",
            line,
        })
    }

    fn describe(&self, a: &Access) -> RecordedAccess {
        RecordedAccess {
            vcpu: a.vcpu,
            space: a.space,
            dir: a.dir,
            addr: a.addr,
            size: a.size,
            value: a.data,
            region: a.region.map(|r| self.string(r)),
            config: a.config.map(|c| report::RecordedConfig {
                path: c.path,
                bdf: c.sbdf,
                reg: c.reg,
                device: c.device.map(|d| self.string(d)),
            }),
        }
    }

    /// The model standing for a QEMU device type.
    fn server_for(&mut self, device: StrId) -> Option<u16> {
        let i = device.0 as usize;
        if let Some(Some(v)) = self.by_device.get(i) {
            return *v;
        }
        let name = self.string(device);
        let v = self
            .devices
            .iter()
            .position(|d| d.contains(&name))
            .map(|i| i as u16)
            .or(self.default_server);
        if self.by_device.len() <= i {
            self.by_device.resize(i + 1, None);
        }
        self.by_device[i] = Some(v);
        v
    }

    fn control(
        &mut self,
        msg: impl FnOnce(crossbeam_channel::Sender<Result<(), ClaimError>>) -> Control,
    ) -> Result<(), String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let _ = self.engine.control().send(msg(tx));
        self.engine
            .poll(Some(Duration::ZERO))
            .map_err(|e| e.to_string())?;
        match rx.try_recv() {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("engine did not answer".into()),
        }
    }

    fn bar(&mut self, ev: &trace::BarEvent) {
        let last = ev.base.saturating_add(ev.size.max(1) - 1);
        let kind = if ev.space == Space::Port {
            RangeKind::Port
        } else {
            RangeKind::Mmio
        };
        let range = IoRange::new(kind, ev.base, last);
        let Some(device) = ev.device else { return };
        match ev.kind {
            BarEventKind::Map => {
                let owner = self
                    .server_for(device)
                    .filter(|m| !self.remote[usize::from(*m)]);
                let mut claimed_by = None;
                if let Some(m) = owner {
                    let idx = self.engine_idx[usize::from(m)];
                    let covered = match kind {
                        RangeKind::Port => self.engine.router().port_owner(range.start, range.end),
                        _ => self.engine.router().mmio_owner(range.start, range.end),
                    };
                    if covered == Some(idx) {
                        // The server already has this range (its fixed claims cover it).
                        self.bars_of(ev.space).push(LiveBar {
                            space: ev.space,
                            base: ev.base,
                            last,
                            device,
                            claimed_by: None,
                        });
                        return;
                    }
                    match self.control(|reply| Control::Map {
                        model: idx,
                        claim: Claim::Range(range),
                        reply,
                    }) {
                        Ok(()) => claimed_by = Some(m),
                        Err(e) => {
                            let c = ClaimFailure {
                                server: self.names[usize::from(m)].clone(),
                                device: self.string(device),
                                range: range.to_string(),
                                op: "map".into(),
                                error: e,
                                sizing: ClaimFailure::is_sizing(ev.space, last),
                            };
                            self.report.claim_failed(c);
                        }
                    }
                }
                self.bars_of(ev.space).push(LiveBar {
                    space: ev.space,
                    base: ev.base,
                    last,
                    device,
                    claimed_by,
                });
            }
            BarEventKind::Unmap => {
                if let Some(i) = self.bars_of(ev.space).iter().position(|b| {
                    b.space == ev.space && b.base == ev.base && b.last == last && b.device == device
                }) {
                    let b = self.bars_of(ev.space).remove(i);
                    if let Some(m) = b.claimed_by {
                        let idx = self.engine_idx[usize::from(m)];
                        if let Err(e) = self.control(|reply| Control::Unmap {
                            model: idx,
                            claim: Claim::Range(range),
                            reply,
                        }) {
                            let c = ClaimFailure {
                                server: self.names[usize::from(m)].clone(),
                                device: self.string(device),
                                range: range.to_string(),
                                op: "unmap".into(),
                                error: e,
                                sizing: false,
                            };
                            self.report.claim_failed(c);
                        }
                    }
                }
            }
        }
    }

    fn is_hidden(&self, bdf: Sbdf, reg: u16, size: u8) -> bool {
        self.hidden
            .iter()
            .any(|&(f, off, w)| f == bdf && reg >= off && reg + u16::from(size) <= off + w)
    }

    /// Replays one access; returns false on a fatal simulation error.
    fn access(&mut self, n: u64, a: &Access) -> Result<(), ReplayError> {
        let Some(got) = self.round_trip(n, a)? else {
            return Ok(());
        };
        let first_delivery = self.cursor.first_delivery();
        let handler = self
            .engine
            .first_model_since_mark()
            .and_then(|e| self.by_engine.get(usize::from(e)).copied().flatten());
        self.count(a, handler);
        if !self.value_matches(n, a, got, handler) {
            return Ok(());
        }
        match a.config {
            Some(c) => self.check_config_routing(n, a, &c, handler, first_delivery),
            None => self.check_routing(n, a, handler),
        }
        Ok(())
    }

    /// The recorded access as the guest's ioreq, through the simulated hypervisor and the
    /// engine: the value it completed with, or None (a divergence) if it was not completed.
    fn round_trip(&mut self, n: u64, a: &Access) -> Result<Option<u64>, ReplayError> {
        let ty = if a.space == Space::Port {
            IoreqType::Pio
        } else {
            IoreqType::Copy
        };
        let dir = a.dir;
        let size = u32::from(a.size);
        let data = if dir == Dir::Write { a.data } else { 0 };
        let mut req = Ioreq::new(ty, dir, a.addr, size, data);
        req.count = a.rep.max(1);
        self.cursor
            .begin(dir == Dir::Write, a.data, a.config.map(|c| c.reg));
        let vcpu = u32::from(a.vcpu);
        self.engine.mark();
        match self.hv.issue(vcpu, &req, false)? {
            Issued::Done(v) => Ok(Some(v)),
            Issued::Pending => {
                self.engine
                    .poll(Some(Duration::ZERO))
                    .map_err(|e| ReplayError::Topology(e.to_string()))?;
                let got = self.hv.collect(vcpu)?;
                if got.is_none() {
                    let what = "the engine did not complete the ioreq".to_string();
                    self.diverge(n, a, (CauseKind::NotCompleted, None), what);
                }
                Ok(got)
            }
        }
    }

    /// Counts the access for its server and its kind.
    fn count(&mut self, a: &Access, handler: Option<u16>) {
        self.served[handler.map_or(0, |m| usize::from(m) + 1)] += 1;
        let kind = match (a.space, a.config.map(|c| c.path)) {
            (_, Some(trace::ConfigPath::Cf8)) => 0,
            (_, Some(trace::ConfigPath::Ecam)) => 1,
            (Space::Port, None) => 2,
            (Space::Mmio, None) => 3,
        };
        self.kinds[kind] += 1;
    }

    /// A read returned what was recorded (a divergence if not).
    fn value_matches(&mut self, n: u64, a: &Access, got: u64, handler: Option<u16>) -> bool {
        if a.dir != Dir::Read {
            return true;
        }
        let mask = size_mask(u32::from(a.size));
        if got & mask == a.data & mask {
            return true;
        }
        let name = self.name_of(handler);
        let what = format!(
            "read returned {:#x}, recorded {:#x} (answered by {name})",
            got & mask,
            a.data & mask
        );
        self.diverge(n, a, (CauseKind::WrongValue, handler), what);
        false
    }

    /// A configuration access reached the server that owns the recorded device (and, in
    /// process, as the function and register QEMU routed), or nobody for an intercepted
    /// register.
    fn check_config_routing(
        &mut self,
        n: u64,
        a: &Access,
        c: &trace::ConfigAnnotation,
        handler: Option<u16>,
        first_delivery: Option<u64>,
    ) {
        let bdf = c.sbdf;
        if self.is_hidden(bdf, c.reg, a.size) {
            if handler.is_some() {
                let name = self.name_of(handler);
                let what = format!("intercepted register reached {name}");
                self.diverge(n, a, (CauseKind::InterceptReachedModel, handler), what);
            }
            return;
        }
        let want = c.device.and_then(|d| self.server_for(d));
        match (handler, want, c.device) {
            (None, None, None) => {}
            (Some(h), _, None) if Some(h) == self.default_server => {}
            (Some(h), Some(w), Some(_)) if h == w => {
                // In-process trace servers report what they received; a server in its own
                // process checks the request against its record itself.
                let Some(first) = first_delivery else {
                    return;
                };
                let (sbdf, reg) = abi::split_pci_config_addr(first);
                if Sbdf::from_xen(sbdf) != bdf || reg != u32::from(c.reg) {
                    let name = self.name_of(handler);
                    let what = format!(
                        "{name} got {} @{reg:#x}, QEMU routed {bdf} @{:#x}",
                        Sbdf::from_xen(sbdf),
                        c.reg
                    );
                    self.diverge(n, a, (CauseKind::WrongFunction, handler), what);
                }
            }
            (h, w, d) => {
                let what = format!(
                    "answered by {}, expected {}",
                    self.name_of(h),
                    self.name_of(w)
                );
                self.diverge_to(n, a, (CauseKind::Misrouted, h), Some((w, d)), what);
            }
        }
    }

    /// A port or MMIO access reached the server of the BAR it falls in (the catch-all server
    /// for the rest; the multiplexer for the CF8/CFC ports).
    fn check_routing(&mut self, n: u64, a: &Access, handler: Option<u16>) {
        let config_ports =
            u64::from(abi::PCI_CONFIG_ADDRESS_PORT)..=u64::from(abi::PCI_CONFIG_DATA_PORT) + 3;
        let own = a.space == Space::Port && config_ports.contains(&a.addr);
        let (want, dev) = if own {
            (None, None)
        } else {
            let bars = if a.space == Space::Port {
                &self.port_bars
            } else {
                &self.bars
            };
            let dev = bars
                .iter()
                .rev()
                .find(|b| b.base <= a.addr && a.addr <= b.last)
                .map(|b| b.device);
            let want = match (dev, a.region) {
                (Some(d), _) => self.server_for(d),
                // Recorded as answered by nobody (a project-made trace of a master abort;
                // QEMU always names a region, even 'io' for unassigned ports).
                (None, None) => None,
                (None, Some(_)) => self.default_server,
            };
            (want, dev)
        };
        if handler != want {
            let what = format!(
                "answered by {}, expected {}",
                self.name_of(handler),
                self.name_of(want)
            );
            let cause = (CauseKind::Misrouted, handler);
            self.diverge_to(n, a, cause, Some((want, dev)), what);
        }
    }
}

/// Replays a trace against a topology.
pub fn replay(
    trace_path: &Path,
    topology: &Path,
    show: usize,
    limit: Option<u64>,
) -> Result<ReplayReport, ReplayError> {
    replay_engine(trace_path, topology, show, limit).map(|(r, ..)| r)
}

/// Replays a trace and also returns the engine as the trace left it, and what tells apart
/// the trace servers' answers the trace did not give (for `inspect`).
pub fn replay_engine(
    trace_path: &Path,
    topology: &Path,
    show: usize,
    limit: Option<u64>,
) -> Result<(ReplayReport, Engine<SimBackend>, Unrecorded), ReplayError> {
    let opts = ReplayOptions {
        show,
        limit,
        ..Default::default()
    };
    replay_full(trace_path, topology, &opts)
}

/// Replays a trace with every option.
pub fn replay_with(
    trace_path: &Path,
    topology: &Path,
    opts: &ReplayOptions,
) -> Result<(ReplayReport, Engine<SimBackend>), ReplayError> {
    replay_full(trace_path, topology, opts).map(|(r, e, _)| (r, e))
}

fn replay_full(
    trace_path: &Path,
    topology: &Path,
    opts: &ReplayOptions,
) -> Result<(ReplayReport, Engine<SimBackend>, Unrecorded), ReplayError> {
    let cfg = Config::load(topology)?;
    let total = check_trace(&cfg, trace_path)?;
    let mut reader = TraceReader::open(trace_path).map_err(|source| ReplayError::Trace {
        path: trace_path.to_path_buf(),
        source,
    })?;
    let start = Instant::now();
    let (mut h, mut children) = Harness::build(&cfg, trace_path, topology, opts, &reader)?;
    let limit = opts.limit.unwrap_or(u64::MAX);
    let bar = opts.progress.clone();
    if let Some(b) = &bar {
        b.begin(total.map(|t| t.min(limit)));
    }
    h.replay_records(
        &mut reader,
        trace_path,
        limit,
        opts,
        children.as_mut(),
        bar.as_ref(),
    )?;
    if let Some(b) = bar {
        b.finish();
    }
    h.cursor.end();
    if let Some(c) = children.take() {
        for (name, summary) in c.finish(&mut h.engine) {
            if let Some(m) = summary {
                merge_summary(&mut h.report, &name, m);
            }
        }
    }
    h.finish_report();
    h.report.elapsed_s = start.elapsed().as_secs_f64();
    Ok((h.report, h.engine, Unrecorded(h.cursor)))
}

/// The models the replay runs in this process (all but the trace servers that run in their
/// own processes in `--dm-mode process`), and per server its name and QEMU device types.
struct ServerSet {
    models: Vec<Box<dyn DeviceModel>>,
    names: Vec<String>,
    devices: Vec<Vec<String>>,
    /// The server with `qemu_devices = ["*"]`, if any.
    default_server: Option<u16>,
}

impl ServerSet {
    fn build(cfg: &Config, opts: &ReplayOptions, cursor: &Shared) -> Result<Self, ReplayError> {
        let mut set = ServerSet {
            models: vec![],
            names: vec![],
            devices: vec![],
            default_server: None,
        };
        for (i, s) in cfg.servers.iter().enumerate() {
            let catch_all = s.qemu_devices.iter().any(|d| d == "*");
            if catch_all {
                // The topology has at most one (Config checks).
                set.default_server = Some(i as u16);
            }
            set.names.push(s.name.clone());
            set.devices.push(s.qemu_devices.clone());
            let remote =
                opts.dm_mode == DmMode::Process && s.kind == ServerKind::Trace && !catch_all;
            if !remote {
                set.models.push(build_model(s, cursor)?);
            }
        }
        Ok(set)
    }
}

impl Harness {
    /// The simulated hypervisor, the engine over it with the in-process models, the trace
    /// servers' processes (`--dm-mode process`), and the harness's view of them.
    fn build(
        cfg: &Config,
        trace_path: &Path,
        topology: &Path,
        opts: &ReplayOptions,
        reader: &TraceReader<impl std::io::Read>,
    ) -> Result<(Harness, Option<Children>), ReplayError> {
        let hv = SimHypervisor::new(REPLAY_VCPUS, Duration::from_secs(10));
        let backend = hv.create_server(BufioreqMode::Atomic)?;
        let cursor: Shared = Arc::new(Cursor::default());
        let set = ServerSet::build(cfg, opts, &cursor)?;
        let mut engine = Engine::new(backend, set.models, &cfg.engine)?;
        engine.backend().set_enabled(true)?;
        let children = match opts.dm_mode {
            DmMode::InProcess => None,
            DmMode::Process => Some(Children::start(
                &mut engine,
                cfg,
                trace_path,
                topology,
                opts.dm_exe.as_deref(),
            )?),
        };
        let (engine_idx, by_engine) = engine_indices(&engine, &set.names)?;
        let hidden = engine
            .intercepts()
            .snapshot()
            .into_iter()
            .filter(|(_, s, _)| s.phase == Phase::Instead)
            .map(|(_, s, _)| (s.sbdf, s.offset, s.width))
            .collect();
        let remote = cfg
            .servers
            .iter()
            .map(|s| children.as_ref().is_some_and(|c| c.has(&s.name)))
            .collect();
        let report = ReplayReport::new(
            trace_path.display().to_string(),
            topology.display().to_string(),
            engine.chipset().to_string(),
            opts.show,
        );
        let h = Harness {
            by_engine,
            remote,
            engine,
            hv,
            cursor,
            engine_idx,
            names: set.names,
            devices: set.devices,
            default_server: set.default_server,
            by_device: vec![],
            bars: vec![],
            port_bars: vec![],
            hidden,
            report,
            served: vec![0; cfg.servers.len() + 1],
            kinds: [0; 4],
            device_lines: cfg
                .servers
                .iter()
                .map(|s| cfg.qemu_device_lines(s))
                .collect(),
            owns_lines: cfg
                .servers
                .iter()
                .map(|s| s.claims.iter().cloned().zip(cfg.claim_lines(s)).collect())
                .collect(),
            strings: reader.strings().clone(),
        };
        Ok((h, children))
    }

    /// Replays every record (up to `limit` accesses), killing a trace server where the
    /// options say (tests), and moving the progress bar.
    fn replay_records(
        &mut self,
        reader: &mut TraceReader<impl std::io::Read>,
        trace_path: &Path,
        limit: u64,
        opts: &ReplayOptions,
        mut children: Option<&mut Children>,
        bar: Option<&ProgressHandle>,
    ) -> Result<(), ReplayError> {
        loop {
            let rec = match reader.next_record() {
                Ok(Some(r)) => r,
                Ok(None) => return refuse_empty(trace_path, self.report.accesses),
                Err(source) => {
                    return Err(ReplayError::Trace {
                        path: trace_path.to_path_buf(),
                        source,
                    });
                }
            };
            self.report.records += 1;
            if reader.strings().len() != self.strings.len() {
                self.strings = reader.strings().clone();
            }
            let (access, repeat) = match rec {
                Record::Access { access, repeat } => (access, repeat),
                Record::Bar(ev) => {
                    self.bar(&ev);
                    continue;
                }
            };
            for _ in 0..repeat {
                if self.report.accesses >= limit {
                    return Ok(());
                }
                self.report.accesses += 1;
                let n = self.report.accesses;
                if let (Some((who, at)), Some(c)) = (&opts.kill, children.as_deref_mut()) {
                    if *at == n {
                        c.kill(who);
                    }
                }
                self.access(n, &access)?;
            }
            if let Some(b) = bar {
                if self.report.records % 4096 == 0 {
                    let note = format!("{} divergences", Thousands(self.report.divergences));
                    b.advance(self.report.accesses, &note);
                }
            }
        }
    }

    /// After the trace: requests per server and per kind, the layout history, the engine's
    /// and the simulated hypervisor's counters (its invariants checked), the causes grouped.
    fn finish_report(&mut self) {
        for (i, n) in self.served.iter().enumerate() {
            let name = if i == 0 {
                MUX_NAME.to_string()
            } else {
                self.names[i - 1].clone()
            };
            self.report.per_server.insert(name, *n);
        }
        for (k, n) in ["config-cf8", "config-ecam", "pio", "mmio"]
            .iter()
            .zip(self.kinds)
        {
            self.report.by_kind.insert(k.to_string(), n);
        }
        self.report.layout_events = self
            .engine
            .layout_history()
            .iter()
            .map(LayoutChange::from)
            .collect();
        self.report.engine = self.engine.stats().clone();
        match self.hv.check_violations() {
            Ok(s) => self.report.sim = s,
            Err(v) => {
                self.report.sim = self.hv.stats();
                let cause = Cause {
                    kind: CauseKind::Invariant,
                    target: "simulated hypervisor".into(),
                    answered_by: None,
                    expected: None,
                    config: None,
                    expected_by: None,
                };
                self.report.add_divergences(&cause, 0, v.len() as u64);
                self.report.invariant_violations = v.into_iter().map(Into::into).collect();
            }
        }
        self.report.finish_causes();
    }
}

/// Each topology server's index in the engine, and for each engine index the topology
/// server (none for the multiplexer itself).
fn engine_indices(
    engine: &Engine<SimBackend>,
    names: &[String],
) -> Result<(Vec<u16>, Vec<Option<u16>>), ReplayError> {
    let names_in_engine = engine.router().server_names().to_vec();
    let engine_idx = names
        .iter()
        .map(|n| {
            names_in_engine
                .iter()
                .position(|m| m == n)
                .map(|p| p as u16)
                .ok_or_else(|| ReplayError::Topology(format!("server {n} missing")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut by_engine = vec![None; names_in_engine.len()];
    for (id, e) in engine_idx.iter().enumerate() {
        by_engine[usize::from(*e)] = Some(id as u16);
    }
    Ok((engine_idx, by_engine))
}

/// What a trace server in its own process reported: its mismatches (divergences) and the
/// BAR claims it was refused.
fn merge_summary(r: &mut ReplayReport, name: &str, m: crate::dm::DmSummary) {
    let cause = Cause {
        kind: CauseKind::OutOfProcess,
        target: format!("server {name}"),
        answered_by: Some(name.to_string()),
        expected: None,
        config: None,
        expected_by: None,
    };
    if m.mismatches > 0 {
        r.add_divergences(&cause, 0, m.mismatches);
    }
    for e in m.examples {
        r.first_divergences.push(Divergence {
            access: 0,
            cause: cause.clone(),
            what: format!("{name} (own process) received an access its record did not expect: {e}"),
            recorded: None,
        });
    }
    for c in m.claim_failures {
        r.claim_failed(c);
    }
}

/// Before replaying: the trace has accesses, and names each QEMU device type the topology's
/// `qemu_devices` lists (a misspelt one would only show as divergences). Reads the trace
/// once more, only when the topology lists device types, and then returns its accesses.
fn check_trace(cfg: &Config, trace_path: &Path) -> Result<Option<u64>, ReplayError> {
    let listed = cfg
        .servers
        .iter()
        .any(|s| s.qemu_devices.iter().any(|d| d != "*"));
    if !listed {
        return Ok(None);
    }
    let contents = TraceReader::open(trace_path)
        .and_then(TraceReader::contents)
        .map_err(|source| ReplayError::Trace {
            path: trace_path.to_path_buf(),
            source,
        })?;
    refuse_empty(trace_path, contents.accesses)?;
    cfg.check_qemu_devices(trace_path, &contents.devices)?;
    Ok(Some(contents.accesses))
}

/// A trace without accesses replays "without divergence" and proves nothing: refused.
fn refuse_empty(trace_path: &Path, accesses: u64) -> Result<(), ReplayError> {
    if accesses == 0 {
        return Err(ReplayError::EmptyTrace(trace_path.to_path_buf()));
    }
    Ok(())
}

/// The engine for a topology alone (no trace), as `inspect` shows it before any access, and
/// what tells apart the trace servers' answers they cannot know.
pub fn topology_engine(topology: &Path) -> Result<(Engine<SimBackend>, Unrecorded), ReplayError> {
    let cfg = Config::load(topology)?;
    let hv = SimHypervisor::new(REPLAY_VCPUS, Duration::from_secs(10));
    let backend = hv.create_server(BufioreqMode::Atomic)?;
    let cursor: Shared = Arc::new(Cursor::default());
    let models = cfg
        .servers
        .iter()
        .map(|s| build_model(s, &cursor))
        .collect::<Result<Vec<_>, _>>()?;
    let engine = Engine::new(backend, models, &cfg.engine)?;
    Ok((engine, Unrecorded(cursor)))
}

fn build_model(s: &Server, cursor: &Shared) -> Result<Box<dyn DeviceModel>, ReplayError> {
    match s.kind {
        ServerKind::Trace => Ok(Box::new(TraceModel {
            name: s.name.clone(),
            claims: s.claims.clone(),
            ids: s.ids.clone(),
            cursor: cursor.clone(),
            recorded: RecordedConfig::default(),
        })),
        ServerKind::Emulated => Ok(Box::new(s.emulated_model())),
        ServerKind::Process => Err(ReplayError::Topology(format!(
            "server {}: process servers are not supported by replay yet",
            s.name
        ))),
    }
}
