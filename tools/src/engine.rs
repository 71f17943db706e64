//! The multiplexer: takes each ioreq from the hypervisor, runs the chipset intercepts, routes
//! the access and hands it to the device model that owns it, then completes the ioreq.
//!
//! One engine serves all vCPUs of a guest from one thread (like QEMU's ioreq loop), so a
//! layout change an intercept makes is applied to the router and the hypervisor before the
//! next request of any vCPU is looked at.

use bdf_router::{
    ConfigAccess, ConfigPath, EcamWindow, Moved, Router, Sbdf, ServerIdx, decode_ecam,
};
use chipset_intercept::{Chipset, HitList, InterceptConfig, InterceptTable, LayoutEvent};
use ioreq_server::abi::{self, PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_DATA_PORT};
use ioreq_server::oop::sys::Doorbell;
use ioreq_server::{
    Backend, BackendError, BackendEvent, Claim, ClaimError, DeviceModel, Dir, DmControl, IoRange,
    Ioreq, IoreqType, Position, RangeKind, size_mask,
};
use serde::Serialize;
use std::time::Duration;
use thiserror::Error;
use tracing::{debug, info, trace, warn};

/// Index of the multiplexer itself in the router's server list: it owns the CF8/CFC ports
/// and the ECAM windows.
pub const MUX: ServerIdx = 0;
/// Name the multiplexer has in claims and errors.
pub const MUX_NAME: &str = "ioreq-mux";
/// A PCI Express function's configuration space: 4 KiB (PCIe Base 4.0, 7.2.2).
pub const PCIE_CONFIG_SPACE_SIZE: u16 = 0x1000;

/// The ports the multiplexer keeps for itself, before any model claims: CF8/CFC.
pub fn config_ports() -> IoRange {
    IoRange::ports(PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_DATA_PORT + 3)
}

/// What the engine claims from the hypervisor for PCI configuration space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PciClaims {
    /// Whole segments, plus the CF8/CFC ports: every configuration access reaches the engine
    /// (unowned ones master-abort here, exactly as Xen would), and bus renumbering never needs
    /// a hypervisor claim. For an engine in front of every device model.
    #[default]
    Segments,
    /// Only the functions the models own (positions as they resolve, following renumbering),
    /// and not the CF8/CFC ports: for an engine beside a device model Xen still serves
    /// directly (QEMU), which keeps the rest of configuration space.
    Functions,
}

/// How the engine is set up.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    pub intercepts: InterceptConfig,
    /// Skip detection and use this chipset.
    pub chipset: Option<Chipset>,
    pub pci_claims: PciClaims,
    /// ECAM windows the toolstack sets up (any segment, as an MCFG table would list them),
    /// installed before any model attaches and never moved by the guest. The Q35 PCIEXBAR
    /// window comes on top of these, from the guest's own writes.
    pub ecam: Vec<EcamWindow>,
}

/// The engine could not start.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("device model {model}: {source}")]
    Attach {
        model: String,
        #[source]
        source: ClaimError,
    },
    #[error("hypervisor: {0}")]
    Backend(#[from] BackendError),
    #[error("cannot create the engine's control doorbell: {0}")]
    Doorbell(#[from] std::io::Error),
    /// A configured window overlaps another (`hypervisor` false: a configuration error) or
    /// the hypervisor refused it.
    #[error("ECAM window {window}: {why}")]
    Window {
        window: String,
        why: String,
        hypervisor: bool,
    },
}

/// Counters the engine keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    /// Synchronous requests completed.
    pub requests: u64,
    /// Buffered writes handled.
    pub buffered: u64,
    pub pio: u64,
    pub mmio: u64,
    pub config_cf8: u64,
    pub config_ecam: u64,
    /// Accesses nobody owns: reads all ones, writes dropped.
    pub master_aborts: u64,
    /// ECAM accesses that are not configuration accesses (see `EcamReject`).
    pub ecam_rejects: u64,
    /// Ioreqs that failed validation.
    pub malformed: u64,
    /// Device-model calls that failed (answered as a master abort).
    pub dm_errors: u64,
    /// Configuration accesses that touched an intercepted register.
    pub intercepted: u64,
    /// Configuration accesses past the end of their function's configuration space (an
    /// extended register of a model with 256 bytes): reads all ones, writes dropped.
    pub beyond_config_space: u64,
    /// TIMEOFFSET and INVALIDATE broadcasts.
    pub broadcasts: u64,
    /// Completions the hypervisor refused.
    pub completion_errors: u64,
    /// Hypervisor claims that failed.
    pub backend_claim_errors: u64,
    /// Rep string accesses through a guest buffer (`data_is_ptr`) to a model that does not
    /// map guest memory: they complete without data (a read leaves the buffer unwritten).
    pub data_ptr_unsupported: u64,
    /// Rep string accesses through a guest buffer handed to a model that maps guest memory
    /// ([`Grant::guest_memory`]).
    pub data_ptr_forwarded: u64,
}

/// What a model may claim (from the configuration's `owns` of a process server). A range
/// claim must lie inside a granted range of its kind; a position claim must be granted as is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    pub ranges: Vec<IoRange>,
    pub positions: Vec<Position>,
    /// The model maps guest memory itself (QEMU, through Xen's foreign mappings): rep
    /// accesses through a guest buffer (`data_is_ptr`) reach it unchanged. Without it they
    /// complete without data, since a pointer is no value.
    pub guest_memory: bool,
    /// Bytes of configuration space the model's functions have: 256 for a model that knows
    /// only conventional PCI's (QEMU 7.2 in Xen mode, whose config handler must not be
    /// asked past 0xff). Accesses past it read all ones and never reach the model, as the
    /// PCIe spec has it for a function without extended space. `None`: 4 KiB.
    pub config_space: Option<u16>,
}

impl Grant {
    pub fn allows(&self, claim: &Claim) -> bool {
        match claim {
            Claim::Range(r) => self
                .ranges
                .iter()
                .any(|g| g.kind == r.kind && g.start <= r.start && r.end <= g.end),
            Claim::Position(p) => self.positions.contains(p),
        }
    }
}

/// Messages from outside the engine thread (the control socket of out-of-process models),
/// applied between requests so they never race a vCPU's access.
pub enum Control {
    /// A model joined: it is attached (and makes its initial claims) on the engine thread.
    Add {
        model: Box<dyn DeviceModel>,
        grant: Option<Grant>,
        reply: crossbeam_channel::Sender<Result<ServerIdx, String>>,
    },
    /// A claim a model makes outside a request.
    Map {
        model: ServerIdx,
        claim: Claim,
        reply: crossbeam_channel::Sender<Result<(), ClaimError>>,
    },
    /// A claim a model drops outside a request.
    Unmap {
        model: ServerIdx,
        claim: Claim,
        reply: crossbeam_channel::Sender<Result<(), ClaimError>>,
    },
    /// The model went away: its claims are released.
    Remove { model: ServerIdx },
}

/// The sending end of the engine's control channel: every message also rings the engine's
/// doorbell ([`Engine::control_wake_fd`]), so a sleeping engine applies it at once.
#[derive(Debug, Clone)]
pub struct ControlSender {
    tx: crossbeam_channel::Sender<Control>,
    bell: std::sync::Arc<Doorbell>,
}

impl ControlSender {
    /// A channel not tied to an engine (tests of what sends to one).
    pub fn detached() -> std::io::Result<(Self, crossbeam_channel::Receiver<Control>)> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let bell = std::sync::Arc::new(Doorbell::new()?);
        Ok((ControlSender { tx, bell }, rx))
    }

    /// Queues `msg` for the engine thread and wakes it. Fails when the engine is gone.
    #[allow(clippy::result_large_err)]
    pub fn send(&self, msg: Control) -> Result<(), crossbeam_channel::SendError<Control>> {
        self.tx.send(msg)?;
        if let Err(e) = self.bell.ring() {
            warn!(error = %e, "ringing the engine's control doorbell");
        }
        Ok(())
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Control::Add { model, .. } => write!(f, "Add({})", model.name()),
            Control::Map { model, claim, .. } => write!(f, "Map({model}, {claim})"),
            Control::Unmap { model, claim, .. } => write!(f, "Unmap({model}, {claim})"),
            Control::Remove { model } => write!(f, "Remove({model})"),
        }
    }
}

struct Slot {
    name: String,
    model: Box<dyn DeviceModel>,
    served: u64,
    grant: Option<Grant>,
}

/// What the engine has mapped with the hypervisor on its own account.
#[derive(Debug, Default)]
struct Mapped {
    mode: PciClaims,
    windows: Vec<EcamWindow>,
    pci_segments: Vec<u16>,
    /// PM blocks the intercepts placed.
    pm: Vec<PmClaim>,
    /// Counts the PCI claims models made (chipset detection looks again when it moves).
    pci_generation: u64,
}

/// A PM block placed by an intercept, claimed for the model that owns the PM function.
#[derive(Debug, Clone, Copy)]
struct PmClaim {
    function: Sbdf,
    owner: ServerIdx,
    ports: IoRange,
    /// The engine made the claim. False when the model had mapped the block itself (it
    /// emulates it; QEMU does): the engine then neither claims nor releases it.
    by_engine: bool,
}

/// The multiplexer engine over a backend `B`.
pub struct Engine<B: Backend> {
    backend: B,
    router: Router,
    intercepts: InterceptTable,
    chipset: Chipset,
    models: Vec<Option<Slot>>,
    mapped: Mapped,
    stats: EngineStats,
    events: Vec<BackendEvent>,
    layout: Vec<LayoutEvent>,
    history: Vec<LayoutEvent>,
    control: Option<(ControlSender, crossbeam_channel::Receiver<Control>)>,
    /// Rung with every control message, so a backend sleeping on it wakes to apply it.
    control_bell: std::sync::Arc<Doorbell>,
    /// No chipset was found when the engine started and none is configured: look again once
    /// a model that joined later (QEMU through the device-model socket) claims functions.
    detect_pending: bool,
    /// `Mapped::pci_generation` when detection last ran.
    detected_at: u64,
    intercept_cfg: InterceptConfig,
    /// The first model called since [`Engine::mark`].
    first_call: Option<ServerIdx>,
}

impl<B: Backend> std::fmt::Debug for Engine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("chipset", &self.chipset)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// The DMOPs of one device model, applied to the router and the hypervisor.
struct Ctl<'a, B: Backend> {
    owner: ServerIdx,
    grant: Option<&'a Grant>,
    router: &'a mut Router,
    backend: &'a mut B,
    mapped: &'a mut Mapped,
    stats: &'a mut EngineStats,
}

fn ensure_segment<B: Backend>(
    backend: &mut B,
    mapped: &mut Mapped,
    segment: u16,
) -> Result<(), BackendError> {
    if mapped.mode == PciClaims::Functions || mapped.pci_segments.contains(&segment) {
        return Ok(());
    }
    // The engine takes whole segments from the hypervisor: CF8 accesses to any function
    // reach it, unowned ones master-abort here exactly as Xen would, and bus renumbering
    // never needs a new hypervisor claim (nor one of Xen's 256 range slots).
    let base = u64::from(segment) << 16;
    backend.map_range(IoRange::new(RangeKind::Pci, base, base | 0xffff))?;
    mapped.pci_segments.push(segment);
    Ok(())
}

impl<B: Backend> DmControl for Ctl<'_, B> {
    fn map(&mut self, claim: Claim) -> Result<(), ClaimError> {
        if let Some(g) = self.grant {
            if !g.allows(&claim) {
                return Err(ClaimError::NotGranted {
                    claim: claim.to_string(),
                    requester: self.router.server_name(self.owner).to_string(),
                });
            }
        }
        if self.inside_pm_block(&claim) {
            // Already in place: an intercept that runs before the model (the PM base) claimed
            // the whole block on the model's behalf before the model mapped it (or its
            // registers, one range each) itself.
            debug!(model = self.router.server_name(self.owner), %claim, "already claimed for it by an intercept");
            return Ok(());
        }
        self.router.claim(self.owner, &claim)?;
        if matches!(&claim, Claim::Position(_))
            || matches!(&claim, Claim::Range(r) if r.kind == RangeKind::Pci)
        {
            self.mapped.pci_generation += 1;
        }
        let functions = self.mapped.mode == PciClaims::Functions;
        let r = match &claim {
            Claim::Range(r) if r.kind != RangeKind::Pci || functions => self.backend.map_range(*r),
            Claim::Range(r) => {
                let (s0, s1) = ((r.start >> 16) as u16, (r.end >> 16) as u16);
                (s0..=s1).try_for_each(|s| ensure_segment(self.backend, self.mapped, s))
            }
            Claim::Position(p) if functions => match resolved(self.router, self.owner, p) {
                Some(s) => self.backend.map_range(IoRange::pci(s.to_xen())),
                None => Ok(()),
            },
            Claim::Position(p) => ensure_segment(self.backend, self.mapped, p.segment),
        };
        if let Err(source) = r {
            self.stats.backend_claim_errors += 1;
            let _ = self.router.release(self.owner, &claim);
            return Err(ClaimError::Backend {
                claim: claim.to_string(),
                source,
            });
        }
        debug!(model = self.router.server_name(self.owner), %claim, "claimed");
        Ok(())
    }

    fn unmap(&mut self, claim: Claim) -> Result<(), ClaimError> {
        if self.inside_pm_block(&claim) {
            // The block stays claimed until its intercept moves or closes it.
            debug!(model = self.router.server_name(self.owner), %claim, "kept: claimed for it by an intercept");
            return Ok(());
        }
        let was = match &claim {
            Claim::Position(p) => resolved(self.router, self.owner, p),
            Claim::Range(_) => None,
        };
        self.router.release(self.owner, &claim)?;
        let functions = self.mapped.mode == PciClaims::Functions;
        let r = match &claim {
            Claim::Range(r) if r.kind != RangeKind::Pci || functions => Some(*r),
            Claim::Position(_) if functions => was.map(|s| IoRange::pci(s.to_xen())),
            _ => None,
        };
        if let Some(r) = r {
            if let Err(e) = self.backend.unmap_range(r) {
                self.stats.backend_claim_errors += 1;
                warn!(%claim, error = %e, "hypervisor refused an unmap");
            }
        }
        Ok(())
    }

    fn locate(&self, position: &Position) -> Option<u32> {
        self.router
            .positions()
            .iter()
            .find(|p| p.position == *position)
            .and_then(|p| p.resolved)
            .map(Sbdf::to_xen)
    }
}

impl<B: Backend> Ctl<'_, B> {
    /// Whether `claim` lies inside a PM block the engine claimed for this model (and still
    /// holds for it).
    fn inside_pm_block(&self, claim: &Claim) -> bool {
        let Claim::Range(r) = claim else { return false };
        self.mapped.pm.iter().any(|p| {
            p.by_engine
                && p.owner == self.owner
                && p.ports.kind == r.kind
                && p.ports.start <= r.start
                && r.end <= p.ports.end
                && self.router.holds_exactly(self.owner, &p.ports)
        })
    }
}

/// Where a position claim of `owner` points now.
fn resolved(router: &Router, owner: ServerIdx, p: &Position) -> Option<Sbdf> {
    router
        .positions()
        .iter()
        .find(|c| c.owner == owner && c.position == *p)
        .and_then(|c| c.resolved)
}

/// Why an ECAM window was not installed.
struct WindowRefused {
    why: String,
    /// The hypervisor refused the MMIO claim (the router had accepted the window).
    by_hypervisor: bool,
}

/// What answers a configuration access.
enum ConfigTarget {
    Model(ServerIdx),
    /// Nobody owns the function: master abort.
    Abort,
    /// Past the end of the owner's configuration space (an extended register of a model that
    /// has 256 bytes): reads all ones, writes dropped, the model never sees it.
    Beyond,
}

impl<B: Backend> Engine<B> {
    /// Attaches the models (each makes its claims), detects the chipset through them and
    /// installs the intercepts.
    pub fn new(
        mut backend: B,
        models: Vec<Box<dyn DeviceModel>>,
        cfg: &EngineConfig,
    ) -> Result<Self, EngineError> {
        let mut router = Router::new();
        let mux = router.add_server(MUX_NAME);
        debug_assert_eq!(mux, MUX);
        let cf8 = config_ports();
        router
            .claim(MUX, &Claim::Range(cf8))
            .map_err(|source| EngineError::Attach {
                model: MUX_NAME.into(),
                source,
            })?;
        if cfg.pci_claims == PciClaims::Segments {
            backend.map_range(cf8)?;
        }
        let mut e = Engine {
            backend,
            router,
            intercepts: InterceptTable::default(),
            chipset: Chipset::Unknown,
            models: vec![None],
            mapped: Mapped {
                mode: cfg.pci_claims,
                ..Mapped::default()
            },
            stats: EngineStats::default(),
            events: Vec::with_capacity(64),
            layout: vec![],
            history: vec![],
            control: None,
            control_bell: std::sync::Arc::new(Doorbell::new()?),
            detect_pending: false,
            detected_at: 0,
            intercept_cfg: cfg.intercepts,
            first_call: None,
        };
        ensure_segment(&mut e.backend, &mut e.mapped, 0)?;
        for w in &cfg.ecam {
            e.add_static_window(*w)?;
        }
        for m in models {
            e.add_model(m)?;
        }
        match cfg.chipset {
            Some(c) => e.install_chipset(c),
            None => {
                e.detect_pending = true;
                e.detect();
                if e.detect_pending {
                    info!(
                        "no known chipset yet: running as a plain router; detection runs again \
                         once a device model that joins later claims functions"
                    );
                }
            }
        }
        Ok(e)
    }

    /// Probes the IDs of the chipset functions through whoever owns them; installs the
    /// chipset's intercepts once one is recognised.
    fn detect(&mut self) {
        self.detected_at = self.mapped.pci_generation;
        let c = chipset_intercept::detect(&mut |s| self.probe(s, 0, 4) as u32);
        if c != Chipset::Unknown {
            info!(chipset = %c, "chipset detected");
            self.detect_pending = false;
            self.install_chipset(c);
        }
    }

    fn install_chipset(&mut self, c: Chipset) {
        self.chipset = c;
        self.intercepts = chipset_intercept::build(c, &self.intercept_cfg);
        self.seed_intercepts();
    }

    /// Installs a window of the toolstack's (see [`EngineConfig::ecam`]); a window the router
    /// or the hypervisor refuses (it overlaps another) stops the engine from starting.
    fn add_static_window(&mut self, w: EcamWindow) -> Result<(), EngineError> {
        let ev = LayoutEvent::Ecam {
            old: None,
            new: Some(w),
        };
        info!(event = %ev, "ECAM window from the configuration");
        self.history.push(ev);
        self.apply_ecam(None, Some(w))
            .map_err(|r| EngineError::Window {
                window: w.to_string(),
                why: r.why,
                hypervisor: r.by_hypervisor,
            })
    }

    /// Adds a device model; it makes its claims now.
    pub fn add_model(&mut self, model: Box<dyn DeviceModel>) -> Result<ServerIdx, EngineError> {
        self.add_model_granted(model, None)
    }

    /// Adds a device model that may only claim what `grant` allows (`None`: anything free).
    pub fn add_model_granted(
        &mut self,
        mut model: Box<dyn DeviceModel>,
        grant: Option<Grant>,
    ) -> Result<ServerIdx, EngineError> {
        let name = model.name().to_string();
        let idx = self.router.add_server(&name);
        let mut ctl = Ctl {
            owner: idx,
            grant: grant.as_ref(),
            router: &mut self.router,
            backend: &mut self.backend,
            mapped: &mut self.mapped,
            stats: &mut self.stats,
        };
        if let Err(source) = model.attach(&mut ctl) {
            self.router.release_all(idx);
            self.models.push(None);
            return Err(EngineError::Attach {
                model: name.clone(),
                source,
            });
        }
        info!(model = %name, index = idx, "device model attached");
        self.models.push(Some(Slot {
            name,
            model,
            served: 0,
            grant,
        }));
        Ok(idx)
    }

    /// The sending end of the engine's control channel (created on first use). Messages are
    /// applied at the start of every [`Engine::poll`]; each one also rings
    /// [`Engine::control_wake_fd`].
    pub fn control(&mut self) -> ControlSender {
        let bell = &self.control_bell;
        self.control
            .get_or_insert_with(|| {
                let (tx, rx) = crossbeam_channel::unbounded();
                let tx = ControlSender {
                    tx,
                    bell: std::sync::Arc::clone(bell),
                };
                (tx, rx)
            })
            .0
            .clone()
    }

    /// Readable while a control message waits: a backend that sleeps should wake on it (the
    /// Xen backend polls it beside the event channel), so a device model's DMOP made outside
    /// a request is applied at once, not at the next guest access.
    pub fn control_wake_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.control_bell.as_fd()
    }

    fn drain_control(&mut self) {
        let Some((_, rx)) = &self.control else { return };
        if rx.is_empty() {
            return;
        }
        // Cleared before the messages are taken: one sent meanwhile rings it again.
        if let Err(e) = self.control_bell.clear() {
            warn!(error = %e, "clearing the control doorbell");
        }
        let msgs: Vec<Control> = rx.try_iter().collect();
        for m in msgs {
            match m {
                Control::Add {
                    model,
                    grant,
                    reply,
                } => {
                    let r = self
                        .add_model_granted(model, grant)
                        .map_err(|e| e.to_string());
                    let _ = reply.send(r);
                }
                Control::Map {
                    model,
                    claim,
                    reply,
                } => {
                    let _ = reply.send(self.model_ctl(model, |ctl| ctl.map(claim)));
                }
                Control::Unmap {
                    model,
                    claim,
                    reply,
                } => {
                    let _ = reply.send(self.model_ctl(model, |ctl| ctl.unmap(claim)));
                }
                Control::Remove { model } => {
                    self.remove_model(model);
                }
            }
        }
    }

    fn model_ctl(
        &mut self,
        idx: ServerIdx,
        f: impl FnOnce(&mut dyn DmControl) -> Result<(), ClaimError>,
    ) -> Result<(), ClaimError> {
        let Some(slot) = self.models.get(usize::from(idx)).and_then(Option::as_ref) else {
            return Err(ClaimError::Invalid {
                claim: String::new(),
                why: format!("no model {idx}"),
            });
        };
        let mut ctl = Ctl {
            owner: idx,
            grant: slot.grant.as_ref(),
            router: &mut self.router,
            backend: &mut self.backend,
            mapped: &mut self.mapped,
            stats: &mut self.stats,
        };
        f(&mut ctl)
    }

    /// Removes a device model (it crashed or left): its claims are released.
    pub fn remove_model(&mut self, idx: ServerIdx) -> Vec<Claim> {
        let Some(slot) = self.models.get_mut(usize::from(idx)).and_then(Option::take) else {
            return vec![];
        };
        let positions: Vec<Sbdf> = self
            .router
            .positions()
            .iter()
            .filter(|p| p.owner == idx)
            .filter_map(|p| p.resolved)
            .collect();
        let gone = self.router.release_all(idx);
        let functions = self.mapped.mode == PciClaims::Functions;
        let mut unmap: Vec<IoRange> = gone
            .iter()
            .filter_map(|c| match c {
                Claim::Range(r) if r.kind != RangeKind::Pci || functions => Some(*r),
                _ => None,
            })
            .collect();
        if functions {
            unmap.extend(positions.iter().map(|s| IoRange::pci(s.to_xen())));
        }
        for r in unmap {
            if let Err(e) = self.backend.unmap_range(r) {
                warn!(claim = %r, error = %e, "hypervisor refused an unmap");
            }
        }
        self.mapped.pm.retain(|p| p.owner != idx);
        info!(model = %slot.name, released = gone.len(), "device model removed");
        gone
    }

    /// Reads intercepted registers the models see once, so the handlers start from the
    /// model's values (a guest may have run before the multiplexer attached).
    fn seed_intercepts(&mut self) {
        let regs: Vec<_> = self
            .intercepts
            .snapshot()
            .into_iter()
            .filter(|(_, s, _)| s.phase != chipset_intercept::Phase::Instead)
            .map(|(_, s, _)| s)
            .collect();
        for s in regs {
            let mut off = s.offset & !3;
            while off < s.offset + s.width {
                let acc = ConfigAccess {
                    sbdf: s.sbdf,
                    reg: off,
                    size: 4,
                    path: ConfigPath::Cf8,
                };
                let v = self.probe(s.sbdf, off, 4);
                let hits = self.intercepts.hits(&acc);
                self.intercepts.after_read(&hits, &acc, v, &mut self.layout);
                off += 4;
            }
        }
        self.apply_layout();
    }

    /// A configuration read the engine makes on its own account (detection, header types).
    fn probe(&mut self, sbdf: Sbdf, reg: u16, size: u8) -> u64 {
        match self.router.config_owner(sbdf) {
            Some(o) if o != MUX => {
                let req = Ioreq::pci_config(sbdf.to_xen(), reg.into(), Dir::Read, size.into(), 0);
                self.call(o, 0, &req)
            }
            _ => size_mask(size.into()),
        }
    }

    pub fn chipset(&self) -> Chipset {
        self.chipset
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn intercepts(&self) -> &InterceptTable {
        &self.intercepts
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Every layout change so far, in order.
    pub fn layout_history(&self) -> &[LayoutEvent] {
        &self.history
    }

    /// (name, requests served) per device model.
    pub fn served(&self) -> Vec<(String, u64)> {
        self.models
            .iter()
            .flatten()
            .map(|s| (s.name.clone(), s.served))
            .collect()
    }

    /// Waits up to `timeout` for requests and serves them all. Returns how many.
    pub fn poll(&mut self, timeout: Option<Duration>) -> Result<usize, BackendError> {
        self.drain_control();
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        let r = self.backend.wait(timeout, &mut events);
        let n = events.len();
        // By reference: the backend has just written these events field by field, and
        // copying one out whole would wait on those stores (a store-forwarding stall).
        for ev in &events {
            match ev {
                &BackendEvent::Request { vcpu, ref req } => {
                    // Only now, with a guest access in hand: a device model that joined is
                    // serving by the time the guest runs, not while it is still starting up
                    // (QEMU claims its functions before its main loop runs).
                    if self.detect_pending && self.detected_at != self.mapped.pci_generation {
                        self.detect();
                    }
                    let v = self.handle(vcpu, req);
                    self.stats.requests += 1;
                    if let Err(e) = self.backend.complete(vcpu, v) {
                        self.stats.completion_errors += 1;
                        warn!(vcpu, error = %e, "completion refused");
                    }
                }
                BackendEvent::Buffered(req) => {
                    self.stats.buffered += 1;
                    self.handle(0, req);
                }
            }
        }
        events.clear();
        self.events = events;
        r.map(|()| n)
    }

    /// Serves one ioreq and returns the value for the vCPU (reads) or 0.
    pub fn handle(&mut self, vcpu: u32, req: &Ioreq) -> u64 {
        if let Err(e) = req.validate() {
            self.stats.malformed += 1;
            warn!(vcpu, error = %e, ?req, "malformed ioreq answered as a master abort");
            return abort_value(req);
        }
        match req.ty {
            IoreqType::PciConfig => {
                let (sbdf, reg) = abi::split_pci_config_addr(req.addr);
                let acc = ConfigAccess {
                    sbdf: Sbdf::from_xen(sbdf),
                    reg: reg as u16,
                    size: req.size as u8,
                    path: ConfigPath::Cf8,
                };
                self.stats.config_cf8 += 1;
                self.config(vcpu, &acc, req.dir, req.data)
            }
            IoreqType::Pio => {
                self.stats.pio += 1;
                self.pio(vcpu, req)
            }
            IoreqType::Copy => {
                self.stats.mmio += 1;
                self.mmio(vcpu, req)
            }
            IoreqType::TimeOffset | IoreqType::Invalidate => {
                self.stats.broadcasts += 1;
                for slot in self.models.iter_mut().flatten() {
                    if let Err(e) = slot.model.broadcast(req) {
                        warn!(model = %slot.name, error = %e, "broadcast failed");
                    }
                }
                0
            }
        }
    }

    fn pio(&mut self, vcpu: u32, req: &Ioreq) -> u64 {
        let (s, e) = (req.addr, req.addr + u64::from(req.size) - 1);
        match self.router.port_owner(s, e) {
            Some(MUX) => self.config_ports(vcpu, req),
            Some(o) => self.forward(o, vcpu, req),
            None => {
                self.stats.master_aborts += 1;
                abort_value(req)
            }
        }
    }

    /// Raw accesses to 0xcf8..0xcff (Xen converts enabled CFC accesses itself; these are CF8
    /// itself, CFC while CF8 is disabled, and backends that do not convert).
    fn config_ports(&mut self, vcpu: u32, req: &Ioreq) -> u64 {
        let port = req.addr;
        if port == u64::from(PCI_CONFIG_ADDRESS_PORT) && req.size == 4 {
            // Xen latches every 4-byte write, rep or not (its CF8 handler runs for the first
            // item and passes the access on); the latch here follows it so both agree.
            if req.dir == Dir::Write {
                self.router.cf8().write(req.data);
                return 0;
            }
            if req.count == 1 {
                return u64::from(self.router.cf8_value());
            }
        }
        if req.count == 1 && !req.data_is_ptr {
            if let Some(acc) = self.router.cf8().decode(port, req.size, req.dir) {
                self.stats.config_cf8 += 1;
                return self.config(vcpu, &acc, req.dir, req.data);
            }
        }
        self.stats.master_aborts += 1;
        abort_value(req)
    }

    fn mmio(&mut self, vcpu: u32, req: &Ioreq) -> u64 {
        if let Some(w) = self.router.ecam_window(req.addr).copied() {
            return match decode_ecam(&w, req) {
                Ok(d) => {
                    self.stats.config_ecam += 1;
                    let (lo, hi) = d.split_data(req.data);
                    let a = self.config(vcpu, &d.first, req.dir, lo);
                    log_ecam(
                        vcpu,
                        &d.first,
                        req.dir,
                        if req.dir == Dir::Read { a } else { lo },
                    );
                    let b = match d.second {
                        Some(second) => {
                            let b = self.config(vcpu, &second, req.dir, hi);
                            log_ecam(
                                vcpu,
                                &second,
                                req.dir,
                                if req.dir == Dir::Read { b } else { hi },
                            );
                            b
                        }
                        None => 0,
                    };
                    if req.dir == Dir::Read {
                        d.join_data(a, b)
                    } else {
                        0
                    }
                }
                Err(why) => {
                    self.stats.ecam_rejects += 1;
                    trace!(vcpu, %why, addr = format_args!("{:#x}", req.addr), "ECAM access rejected: master abort");
                    abort_value(req)
                }
            };
        }
        let (s, e) = req.byte_span();
        match self.router.mmio_owner(s, e) {
            Some(o) if o != MUX => self.forward(o, vcpu, req),
            _ => {
                self.stats.master_aborts += 1;
                abort_value(req)
            }
        }
    }

    /// Hands a port or MMIO access to its owner. A rep access through a guest buffer
    /// (`data_is_ptr`) names guest memory, not a value: only a model that maps guest memory
    /// itself ([`Grant::guest_memory`], QEMU) gets it. For any other the request completes
    /// without data, and Xen finishes the instruction with the buffer unchanged.
    fn forward(&mut self, o: ServerIdx, vcpu: u32, req: &Ioreq) -> u64 {
        if req.data_is_ptr && !self.maps_guest_memory(o) {
            self.stats.data_ptr_unsupported += 1;
            warn!(
                vcpu,
                model = self.router.server_name(o),
                ?req,
                "rep access through a guest buffer to a model without guest memory; completed without data"
            );
            return 0;
        }
        if req.data_is_ptr {
            self.stats.data_ptr_forwarded += 1;
        }
        self.call(o, vcpu, req)
    }

    fn maps_guest_memory(&self, o: ServerIdx) -> bool {
        self.models
            .get(usize::from(o))
            .and_then(Option::as_ref)
            .and_then(|s| s.grant.as_ref())
            .is_some_and(|g| g.guest_memory)
    }

    fn target(&mut self, acc: &ConfigAccess) -> ConfigTarget {
        match self.router.config_owner(acc.sbdf) {
            Some(o) if o != MUX && acc.reg >= self.config_space(o) => {
                self.stats.beyond_config_space += 1;
                ConfigTarget::Beyond
            }
            Some(o) if o != MUX => ConfigTarget::Model(o),
            _ => ConfigTarget::Abort,
        }
    }

    /// Bytes of configuration space a model's functions have ([`Grant::config_space`]).
    fn config_space(&self, o: ServerIdx) -> u16 {
        self.models
            .get(usize::from(o))
            .and_then(Option::as_ref)
            .and_then(|s| s.grant.as_ref())
            .and_then(|g| g.config_space)
            .unwrap_or(PCIE_CONFIG_SPACE_SIZE)
    }

    /// One configuration access (never crosses a dword).
    fn config(&mut self, vcpu: u32, acc: &ConfigAccess, dir: Dir, data: u64) -> u64 {
        let hits = self.intercepts.hits(acc);
        let target = self.target(acc);
        if !hits.is_empty() {
            self.stats.intercepted += 1;
        }
        match dir {
            Dir::Write => {
                self.config_write(vcpu, acc, data, &hits, target);
                0
            }
            Dir::Read => self.config_read(vcpu, acc, &hits, target),
        }
    }

    fn config_write(
        &mut self,
        vcpu: u32,
        acc: &ConfigAccess,
        data: u64,
        hits: &HitList,
        target: ConfigTarget,
    ) {
        let all: u8 = ((1u16 << acc.size) - 1) as u8;
        if self.router.needs_header_type(acc) {
            let h = self.probe(acc.sbdf, bdf_router::bridges::PCI_HEADER_TYPE, 1);
            if h != 0xff {
                self.router.learn_header_type(acc.sbdf, h as u8);
            }
        }
        let bytes = if hits.is_empty() {
            all
        } else {
            self.intercepts
                .before_write(hits, acc, data, &mut self.layout)
                .bytes
        };
        if !self.layout.is_empty() {
            // An intercept that runs before the model changes the layout before the
            // model sees the write (a PM block the model then maps finds its claim in
            // place).
            self.apply_layout();
        }
        match target {
            ConfigTarget::Model(o) if bytes != 0 => {
                self.forward_write(o, vcpu, acc, data, bytes);
            }
            ConfigTarget::Model(_) | ConfigTarget::Beyond => {}
            ConfigTarget::Abort => {
                if bytes == all {
                    self.stats.master_aborts += 1;
                }
            }
        }
        let moved = self.router.observe_write(acc, data);
        if !moved.is_empty() {
            log_moves(&self.router, &moved);
            if self.mapped.mode == PciClaims::Functions {
                self.follow_moves(&moved);
            }
        }
        if !hits.is_empty() {
            self.intercepts
                .after_write(hits, acc, data, &mut self.layout);
        }
        if !self.layout.is_empty() {
            self.apply_layout();
        }
    }

    fn config_read(
        &mut self,
        vcpu: u32,
        acc: &ConfigAccess,
        hits: &HitList,
        target: ConfigTarget,
    ) -> u64 {
        let needs_model = hits.is_empty() || self.intercepts.read_needs_model(hits, acc);
        let model_value = match target {
            ConfigTarget::Model(o) if needs_model => {
                let req = Ioreq::pci_config(
                    acc.sbdf.to_xen(),
                    acc.reg.into(),
                    Dir::Read,
                    acc.size.into(),
                    0,
                );
                self.call(o, vcpu, &req)
            }
            target => {
                if matches!(target, ConfigTarget::Abort) && needs_model && hits.is_empty() {
                    self.stats.master_aborts += 1;
                }
                size_mask(acc.size.into())
            }
        };
        let v = if hits.is_empty() {
            model_value
        } else {
            self.intercepts
                .after_read(hits, acc, model_value, &mut self.layout)
        };
        self.router.observe_read(acc, v);
        if !self.layout.is_empty() {
            self.apply_layout();
        }
        v
    }

    /// Functions mode: a position claim moved with bus numbering; move its hypervisor claim.
    fn follow_moves(&mut self, moved: &[Moved]) {
        for m in moved {
            let (old, new) = (
                m.from.map(|s| IoRange::pci(s.to_xen())),
                m.to.map(|s| IoRange::pci(s.to_xen())),
            );
            if let Some(r) = old {
                if let Err(e) = self.backend.unmap_range(r) {
                    self.stats.backend_claim_errors += 1;
                    warn!(claim = %r, error = %e, "hypervisor refused an unmap");
                }
            }
            if let Some(r) = new {
                if let Err(e) = self.backend.map_range(r) {
                    self.stats.backend_claim_errors += 1;
                    warn!(claim = %r, error = %e, "hypervisor refused a moved function");
                }
            }
        }
    }

    /// Sends the bytes of a write the model may see, as naturally aligned pieces.
    fn forward_write(&mut self, o: ServerIdx, vcpu: u32, acc: &ConfigAccess, data: u64, bytes: u8) {
        let all: u8 = ((1u16 << acc.size) - 1) as u8;
        if bytes == all {
            let req = Ioreq::pci_config(
                acc.sbdf.to_xen(),
                acc.reg.into(),
                Dir::Write,
                acc.size.into(),
                data,
            );
            self.call(o, vcpu, &req);
            return;
        }
        let mut i = 0u16;
        while i < u16::from(acc.size) {
            if bytes & (1 << i) == 0 {
                i += 1;
                continue;
            }
            let reg = acc.reg + i;
            let two = reg % 2 == 0 && i + 1 < u16::from(acc.size) && bytes & (1 << (i + 1)) != 0;
            let size: u32 = if two { 2 } else { 1 };
            let piece = (data >> (8 * i)) & size_mask(size);
            let req = Ioreq::pci_config(acc.sbdf.to_xen(), reg.into(), Dir::Write, size, piece);
            self.call(o, vcpu, &req);
            i += size as u16;
        }
    }

    /// Forgets which model was called last (see [`Engine::first_model_since_mark`]).
    pub fn mark(&mut self) {
        self.first_call = None;
    }

    /// The first model the engine called since [`Engine::mark`]: which server answered an
    /// access (tests and replay).
    pub fn first_model_since_mark(&self) -> Option<ServerIdx> {
        self.first_call
    }

    /// Calls a device model; a failure is answered as a master abort.
    fn call(&mut self, o: ServerIdx, vcpu: u32, req: &Ioreq) -> u64 {
        if self.first_call.is_none() {
            self.first_call = Some(o);
        }
        let Some(slot) = self.models.get_mut(usize::from(o)).and_then(Option::as_mut) else {
            self.stats.master_aborts += 1;
            return abort_value(req);
        };
        slot.served += 1;
        let mut ctl = Ctl {
            owner: o,
            grant: slot.grant.as_ref(),
            router: &mut self.router,
            backend: &mut self.backend,
            mapped: &mut self.mapped,
            stats: &mut self.stats,
        };
        match slot.model.handle(vcpu, req, &mut ctl) {
            Ok(v) => {
                if req.dir == Dir::Read {
                    v & req.size_mask()
                } else {
                    0
                }
            }
            Err(e) => {
                self.stats.dm_errors += 1;
                warn!(model = %slot.name, vcpu, error = %e, "device model failed; master abort");
                if matches!(e, ioreq_server::DmError::Disconnected(_)) {
                    // Gone for good: release its claims now, not at the next control message.
                    self.remove_model(o);
                }
                abort_value(req)
            }
        }
    }

    /// Applies the layout events the intercepts emitted, in order, to the router and the
    /// hypervisor.
    fn apply_layout(&mut self) {
        let events = std::mem::take(&mut self.layout);
        for ev in events {
            info!(event = %ev, "layout change");
            // Into the history before it is applied: a refusal that applying it leads to is
            // recorded after the event that asked for it.
            self.history.push(ev.clone());
            let applied = match ev {
                LayoutEvent::Ecam { old, new } => self.apply_ecam(old, new).is_ok(),
                LayoutEvent::PmBlock {
                    function,
                    old: _,
                    new,
                } => self.apply_pm(function, new),
                LayoutEvent::MmioHole { .. } => true,
                LayoutEvent::Refused { .. } => true,
            };
            if !applied {
                // The intercept must not go on believing its window or block is in place:
                // the guest writing the same value again is then a retry.
                self.intercepts.not_applied(&ev);
            }
        }
    }

    /// Moves the ECAM window; an error if the new window was refused (none is left in place;
    /// the refusal is in the history).
    fn apply_ecam(
        &mut self,
        old: Option<EcamWindow>,
        new: Option<EcamWindow>,
    ) -> Result<(), WindowRefused> {
        if let Some(o) = old {
            if let Some(i) = self.mapped.windows.iter().position(|w| *w == o) {
                self.mapped.windows.remove(i);
                let _ = self.router.replace_window(Some(o), None);
                if let Err(e) = self.backend.unmap_range(IoRange::mmio(o.base, o.size())) {
                    self.stats.backend_claim_errors += 1;
                    warn!(window = %o, error = %e, "hypervisor refused to unmap the old ECAM window");
                }
            }
        }
        let Some(n) = new else { return Ok(()) };
        if let Err(e) = self.router.replace_window(None, Some(n)) {
            warn!(window = %n, error = %e, "ECAM window refused; it stays disabled");
            return Err(self.window_refused(n, e.to_string(), false));
        }
        if let Err(e) = self.backend.map_range(IoRange::mmio(n.base, n.size())) {
            self.stats.backend_claim_errors += 1;
            warn!(window = %n, error = %e, "hypervisor refused the ECAM window; it stays disabled");
            let _ = self.router.replace_window(Some(n), None);
            return Err(self.window_refused(n, format!("hypervisor: {e}"), true));
        }
        if let Err(e) = ensure_segment(&mut self.backend, &mut self.mapped, n.segment) {
            self.stats.backend_claim_errors += 1;
            warn!(segment = n.segment, error = %e, "hypervisor refused the segment");
        }
        self.mapped.windows.push(n);
        Ok(())
    }

    /// Records a refused window in the layout history.
    fn window_refused(&mut self, w: EcamWindow, why: String, by_hypervisor: bool) -> WindowRefused {
        self.history.push(LayoutEvent::Refused {
            register: "ECAM window",
            value: w.base,
            why: why.clone(),
        });
        WindowRefused { why, by_hypervisor }
    }

    /// Whether `owner` has mapped ports inside `block` and nobody else holds any of it.
    fn model_maps_block(&self, owner: ServerIdx, block: &IoRange) -> bool {
        let inside: Vec<ServerIdx> = self
            .router
            .port_ranges()
            .into_iter()
            .filter(|&(s, e, _)| s <= block.end && block.start <= e)
            .map(|(_, _, o)| o)
            .collect();
        !inside.is_empty() && inside.iter().all(|&o| o == owner)
    }

    /// Moves a PM block's port claim; false if the new block could not be claimed.
    fn apply_pm(&mut self, function: Sbdf, new: Option<IoRange>) -> bool {
        if let Some(i) = self.mapped.pm.iter().position(|p| p.function == function) {
            let old = self.mapped.pm.remove(i);
            // Released only if the engine claimed it (and the model has not unmapped it).
            if old.by_engine
                && self
                    .router
                    .release(old.owner, &Claim::Range(old.ports))
                    .is_ok()
            {
                if let Err(e) = self.backend.unmap_range(old.ports) {
                    self.stats.backend_claim_errors += 1;
                    warn!(ports = %old.ports, error = %e, "hypervisor refused to unmap the PM block");
                }
            }
        }
        let Some(r) = new else { return true };
        let Some(owner) = self.router.config_owner(function).filter(|o| *o != MUX) else {
            warn!(%function, "PM block of a function nobody owns: not claimed");
            return false;
        };
        if self.model_maps_block(owner, &r) {
            // The model mapped the block (or its registers) itself before the intercept ran
            // (an `after` intercept beside a model that emulates the block): it is in place.
            debug!(ports = %r, model = self.router.server_name(owner), "PM block already mapped by its model");
            self.mapped.pm.push(PmClaim {
                function,
                owner,
                ports: r,
                by_engine: false,
            });
            return true;
        }
        let mut ctl = Ctl {
            owner,
            grant: None,
            router: &mut self.router,
            backend: &mut self.backend,
            mapped: &mut self.mapped,
            stats: &mut self.stats,
        };
        match ctl.map(Claim::Range(r)) {
            Ok(()) => {
                self.mapped.pm.push(PmClaim {
                    function,
                    owner,
                    ports: r,
                    by_engine: true,
                });
                true
            }
            Err(e) => {
                warn!(ports = %r, error = %e, "PM block not claimed");
                self.history.push(LayoutEvent::Refused {
                    register: "PM block",
                    value: r.start,
                    why: e.to_string(),
                });
                false
            }
        }
    }
}

/// One debug line per configuration access decoded from ECAM, in the form of the Xen
/// backend's `served config` lines (which see ECAM accesses as MMIO).
fn log_ecam(vcpu: u32, acc: &ConfigAccess, dir: Dir, data: u64) {
    debug!(
        vcpu,
        sbdf = %acc.sbdf,
        reg = format_args!("{:#x}", acc.reg),
        size = acc.size,
        dir = %dir,
        data = format_args!("{:#x}", data & size_mask(acc.size.into())),
        "served config via ECAM"
    );
}

fn log_moves(router: &Router, moved: &[Moved]) {
    for m in moved {
        info!(
            model = router.server_name(m.owner),
            position = %m.position,
            from = ?m.from.map(|s| s.to_string()),
            to = ?m.to.map(|s| s.to_string()),
            "device moved with bus numbering"
        );
    }
}

/// Master-abort semantics: a read returns all ones, a write is dropped.
fn abort_value(req: &Ioreq) -> u64 {
    if req.dir == Dir::Read {
        size_mask(req.size)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
    use super::*;
    use chipset_intercept::Phase;
    use ioreq_server::DmError;
    use ioreq_server::bufioreq::BufioreqMode;
    use ioreq_server::sim::{Issued, SimBackend, SimHypervisor};
    use std::sync::{Arc, Mutex};

    /// What a [`Chip`] saw: every request, and whether its own PM-block claim succeeded.
    #[derive(Default)]
    struct Seen {
        requests: Vec<Ioreq>,
        pm_claims: Vec<Result<(), ClaimError>>,
    }

    /// An i440FX + PIIX3 + PIIX4 as QEMU is in Xen: owns bus 0's chipset functions, answers
    /// their IDs, and while the guest enables PIIX4's PM I/O space maps the PM block's
    /// registers itself, one range each, moving them with PMBA (QEMU's memory listener does,
    /// during the config write).
    struct Chip {
        name: &'static str,
        claims: Vec<Claim>,
        pmba: u64,
        pm_enabled: bool,
        /// Answer IDs no chipset has.
        unknown_ids: bool,
        seen: Arc<Mutex<Seen>>,
    }

    fn chip(name: &'static str, claims: Vec<Claim>) -> (Chip, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let c = Chip {
            name,
            claims,
            pmba: 1,
            pm_enabled: false,
            unknown_ids: false,
            seen: seen.clone(),
        };
        (c, seen)
    }

    const PIIX4_PM: &str = "00:01.3";
    /// QEMU's PIIX4 PM registers inside the block: PM1a event, control, timer.
    const PM_PIECES: [(u16, u16); 3] = [(0, 3), (4, 5), (8, 0xb)];

    impl Chip {
        /// Maps or unmaps the PM registers at the current base; records each result.
        fn pm_regions(&mut self, map: bool, ctl: &mut dyn DmControl) {
            let base = (self.pmba & 0xffc0) as u16;
            for (a, b) in PM_PIECES {
                let c = Claim::Range(IoRange::ports(base + a, base + b));
                let r = if map { ctl.map(c) } else { ctl.unmap(c) };
                self.seen.lock().unwrap().pm_claims.push(r);
            }
        }
    }

    impl DeviceModel for Chip {
        fn name(&self) -> &str {
            self.name
        }
        fn attach(&mut self, ctl: &mut dyn DmControl) -> Result<(), ClaimError> {
            ctl.map_all(&self.claims)
        }
        fn handle(&mut self, _: u32, req: &Ioreq, ctl: &mut dyn DmControl) -> Result<u64, DmError> {
            self.seen.lock().unwrap().requests.push(*req);
            if req.ty != IoreqType::PciConfig {
                return Ok(0x5a);
            }
            let (sbdf, reg) = abi::split_pci_config_addr(req.addr);
            let f = Sbdf::from_xen(sbdf).to_string();
            let pm = f == format!("0000:{PIIX4_PM}");
            match (req.dir, f.as_str(), reg) {
                (Dir::Read, _, 0) if self.unknown_ids => Ok(0x1234_1af4),
                (Dir::Read, "0000:00:00.0", 0) => Ok(0x1237_8086),
                (Dir::Read, "0000:00:01.0", 0) => Ok(0x7000_8086),
                (Dir::Read, _, 0) if pm => Ok(0x7113_8086),
                (Dir::Read, _, 0x40) if pm => Ok(self.pmba),
                (Dir::Write, _, 0x40) if pm => {
                    if self.pm_enabled {
                        self.pm_regions(false, ctl);
                    }
                    self.pmba = req.data;
                    if self.pm_enabled {
                        self.pm_regions(true, ctl);
                    }
                    Ok(0)
                }
                (Dir::Write, _, 0x80) if pm => {
                    let on = req.data & 1 != 0;
                    if on != self.pm_enabled {
                        self.pm_enabled = on;
                        self.pm_regions(on, ctl);
                    }
                    Ok(0)
                }
                _ => Ok(0),
            }
        }
    }

    fn engine(pm: Phase) -> (SimHypervisor, Engine<SimBackend>) {
        let hv = SimHypervisor::new(2, Duration::from_secs(5));
        let backend = hv.create_server(BufioreqMode::Off).unwrap();
        let cfg = EngineConfig {
            intercepts: InterceptConfig {
                pm: Some(pm),
                ..InterceptConfig::default()
            },
            ..EngineConfig::default()
        };
        let e = Engine::new(backend, vec![], &cfg).unwrap();
        hv.set_server_enabled(e.backend().id(), true).unwrap();
        (hv, e)
    }

    /// One guest access through the simulated hypervisor and the engine.
    fn access(hv: &SimHypervisor, e: &mut Engine<SimBackend>, req: Ioreq) -> u64 {
        match hv.issue(0, &req, false).unwrap() {
            Issued::Done(v) => v,
            Issued::Pending => {
                e.poll(Some(Duration::ZERO)).unwrap();
                hv.collect(0)
                    .unwrap()
                    .expect("the engine completed the access")
            }
        }
    }

    fn cfg_write(
        hv: &SimHypervisor,
        e: &mut Engine<SimBackend>,
        f: &str,
        reg: u8,
        size: u32,
        v: u64,
    ) {
        let s: Sbdf = f.parse().unwrap();
        let cf8 = 0x8000_0000 | s.to_xen() << 8 | u32::from(reg & 0xfc);
        access(
            hv,
            e,
            Ioreq::new(IoreqType::Pio, Dir::Write, 0xcf8, 4, cf8.into()),
        );
        let port = 0xcfc + u64::from(reg & 3);
        access(hv, e, Ioreq::new(IoreqType::Pio, Dir::Write, port, size, v));
    }

    /// A read of the CF8 latch: an access that reaches the engine and no model.
    fn cf8_read() -> Ioreq {
        Ioreq::new(IoreqType::Pio, Dir::Read, 0xcf8, 4, 0)
    }

    fn segment0() -> Claim {
        Claim::Range(IoRange::new(RangeKind::Pci, 0, 0xffff))
    }

    /// QEMU joins after the engine started (through the device-model socket): nothing knew the
    /// chipset then. It is detected at the first guest access after QEMU claimed functions,
    /// not while QEMU is still setting up (it serves nothing until its main loop runs).
    #[test]
    fn a_chipset_that_joins_later_is_detected_at_the_next_guest_access() {
        let (hv, mut e) = engine(Phase::Before);
        assert_eq!(e.chipset(), Chipset::Unknown);
        let (qemu, seen) = chip("qemu", vec![segment0()]);
        e.add_model_granted(Box::new(qemu), None).unwrap();
        assert_eq!(e.chipset(), Chipset::Unknown);
        assert!(
            seen.lock().unwrap().requests.is_empty(),
            "probed during attach"
        );
        access(&hv, &mut e, cf8_read());
        assert_eq!(e.chipset(), Chipset::I440fx);
        assert!(
            !e.intercepts().snapshot().is_empty(),
            "PIIX4 PM intercept installed"
        );
        // Once known, nothing probes again.
        let n = seen.lock().unwrap().requests.len();
        access(&hv, &mut e, cf8_read());
        assert_eq!(seen.lock().unwrap().requests.len(), n);
        assert!(hv.check().is_ok());
    }

    /// Nobody owns a known chipset: detection runs once per change of PCI claims, not at every
    /// access.
    #[test]
    fn detection_waits_for_new_claims() {
        let (hv, mut e) = engine(Phase::Before);
        let (mut other, seen) = chip("other", vec![segment0()]);
        other.unknown_ids = true;
        e.add_model_granted(Box::new(other), None).unwrap();
        access(&hv, &mut e, cf8_read());
        let probes = seen.lock().unwrap().requests.len();
        assert!(probes > 0);
        assert_eq!(e.chipset(), Chipset::Unknown);
        for _ in 0..3 {
            access(&hv, &mut e, cf8_read());
        }
        assert_eq!(
            seen.lock().unwrap().requests.len(),
            probes,
            "probed again without new claims"
        );
        let (late, _) = chip("late", vec![Claim::Range(IoRange::pci(0x1_0000))]);
        e.add_model_granted(Box::new(late), None).unwrap();
        access(&hv, &mut e, cf8_read());
        assert_eq!(
            seen.lock().unwrap().requests.len(),
            2 * probes,
            "a new claim: probed again"
        );
    }

    /// hvmloader's PM base (PMBA 0xb001, then PMREGMISC enable) with a `before` intercept: the
    /// block is claimed for QEMU before QEMU sees the enabling write, and QEMU's own maps of
    /// its registers inside it during that write find them in place instead of failing.
    #[test]
    fn pm_block_before_the_model_then_the_model_maps_it_too() {
        let (hv, mut e) = engine(Phase::Before);
        let (qemu, seen) = chip("qemu", vec![segment0()]);
        let q = e.add_model_granted(Box::new(qemu), None).unwrap();
        cfg_write(&hv, &mut e, PIIX4_PM, 0x40, 4, 0xb001);
        cfg_write(&hv, &mut e, PIIX4_PM, 0x80, 1, 1);
        assert_eq!(e.chipset(), Chipset::I440fx);
        let block = IoRange::ports(0xb000, 0xb03f);
        assert_eq!(seen.lock().unwrap().pm_claims, vec![Ok(()); 3]);
        assert!(e.router().holds_exactly(q, &block));
        let claimed = hv.server_ranges(e.backend().id(), RangeKind::Port);
        assert!(claimed.contains(&(0xb000, 0xb03f)), "{claimed:x?}");
        assert!(
            e.layout_history()
                .iter()
                .any(|ev| matches!(ev, LayoutEvent::PmBlock { new: Some(r), .. } if *r == block))
        );
        // A port access there reaches QEMU.
        assert_eq!(
            access(
                &hv,
                &mut e,
                Ioreq::new(IoreqType::Pio, Dir::Read, 0xb004, 2, 0)
            ),
            0x5a
        );
        // The guest moves the block: the engine's claim moves with it (before QEMU moves its
        // registers: its unmaps of the old ones are refused, its maps of the new ones are in
        // place).
        cfg_write(&hv, &mut e, PIIX4_PM, 0x40, 4, 0xc001);
        assert!(e.router().holds_exactly(q, &IoRange::ports(0xc000, 0xc03f)));
        assert!(e.router().port_owner(0xb000, 0xb000).is_none());
        assert_eq!(
            hv.server_ranges(e.backend().id(), RangeKind::Port)
                .iter()
                .filter(|r| r.0 >= 0xb000)
                .count(),
            1
        );
        let claims = seen.lock().unwrap().pm_claims.clone();
        assert_eq!(
            claims[6..].iter().filter(|r| r.is_ok()).count(),
            3,
            "{claims:?}"
        );
        assert!(hv.check().is_ok());
    }

    /// With an `after` intercept the model maps the block first; the intercept finds it in
    /// place and neither claims nor later releases it.
    #[test]
    fn pm_block_after_a_model_that_mapped_it_itself() {
        let (hv, mut e) = engine(Phase::After);
        let (qemu, seen) = chip("qemu", vec![segment0()]);
        let q = e.add_model_granted(Box::new(qemu), None).unwrap();
        cfg_write(&hv, &mut e, PIIX4_PM, 0x40, 4, 0xb001);
        cfg_write(&hv, &mut e, PIIX4_PM, 0x80, 1, 1);
        assert_eq!(seen.lock().unwrap().pm_claims, vec![Ok(()); 3]);
        assert!(e.router().holds_exactly(q, &IoRange::ports(0xb004, 0xb005)));
        assert!(!e.router().holds_exactly(q, &IoRange::ports(0xb000, 0xb03f)));
        assert!(
            !e.layout_history()
                .iter()
                .any(|ev| ev.to_string().starts_with("refused"))
        );
        // Disabling: the model's own claims stay the model's business (it unmaps them).
        cfg_write(&hv, &mut e, PIIX4_PM, 0x80, 1, 0);
        assert_eq!(seen.lock().unwrap().pm_claims, vec![Ok(()); 6]);
        assert!(e.router().port_owner(0xb004, 0xb005).is_none());
        assert!(hv.check().is_ok());
    }

    /// A rep string access through a guest buffer reaches a model that maps guest memory,
    /// unchanged (the pointer in `data`); any other model never sees it.
    #[test]
    fn guest_buffers_reach_only_models_that_map_guest_memory() {
        let (_hv, mut e) = engine(Phase::After);
        let (qemu, qseen) = chip("qemu", vec![Claim::Range(IoRange::ports(0x1f0, 0x1f7))]);
        let grant = Grant {
            ranges: vec![IoRange::ports(0, 0xffff)],
            guest_memory: true,
            ..Grant::default()
        };
        e.add_model_granted(Box::new(qemu), Some(grant)).unwrap();
        let (other, oseen) = chip("other", vec![Claim::Range(IoRange::ports(0x170, 0x177))]);
        e.add_model_granted(Box::new(other), None).unwrap();
        let mut insw = Ioreq::new(IoreqType::Pio, Dir::Read, 0x1f0, 2, 0x0012_3000);
        insw.count = 256;
        insw.data_is_ptr = true;
        e.handle(0, &insw);
        let got = qseen.lock().unwrap().requests.clone();
        assert_eq!(got, vec![insw], "QEMU gets the request as Xen sent it");
        let mut other_insw = insw;
        other_insw.addr = 0x170;
        e.handle(0, &other_insw);
        assert!(oseen.lock().unwrap().requests.is_empty());
        assert_eq!(e.stats().data_ptr_unsupported, 1);
    }

    /// A model with conventional PCI's 256 bytes (QEMU) is never asked past them: extended
    /// registers read all ones and writes are dropped, counted apart from master aborts.
    #[test]
    fn extended_registers_of_a_256_byte_model_never_reach_it() {
        let (_hv, mut e) = engine(Phase::After);
        let (qemu, seen) = chip("qemu", vec![Claim::Range(IoRange::pci(0x08))]);
        let grant = Grant {
            ranges: vec![IoRange::new(RangeKind::Pci, 0, 0xffff)],
            config_space: Some(0x100),
            ..Grant::default()
        };
        e.add_model_granted(Box::new(qemu), Some(grant)).unwrap();
        let (pcie, pseen) = chip("pcie", vec![Claim::Range(IoRange::pci(0x10))]);
        e.add_model_granted(Box::new(pcie), None).unwrap();
        let read = |sbdf: u32, reg: u32| Ioreq::pci_config(sbdf, reg, Dir::Read, 4, 0);
        assert_eq!(e.handle(0, &read(0x08, 0x100)), 0xffff_ffff);
        e.handle(0, &Ioreq::pci_config(0x08, 0x148, Dir::Write, 4, 0x1234));
        assert!(seen.lock().unwrap().requests.is_empty());
        assert_eq!(e.stats().beyond_config_space, 2);
        assert_eq!(e.stats().master_aborts, 0);
        e.handle(0, &read(0x08, 0xfc));
        assert_eq!(seen.lock().unwrap().requests.len(), 1, "0xfc is inside");
        // A model with 4 KiB (the default) gets its extended registers.
        e.handle(0, &read(0x10, 0x100));
        assert_eq!(pseen.lock().unwrap().requests.len(), 1);
    }

    /// A control message rings the engine's wake fd; applying it clears the fd.
    #[test]
    fn control_messages_wake_a_sleeping_backend() {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let (_hv, mut e) = engine(Phase::After);
        let readable = |e: &Engine<SimBackend>| {
            let mut fds = [PollFd::new(e.control_wake_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
        };
        let tx = e.control();
        assert!(!readable(&e));
        tx.send(Control::Remove { model: 7 }).unwrap();
        assert!(readable(&e));
        e.poll(Some(Duration::ZERO)).unwrap();
        assert!(!readable(&e));
    }
}
