//! The models' life cycle: adding one (it makes its claims), the control channel through
//! which other threads add and remove models between requests, and removing one (its claims
//! released, the chipset detected again if it served the chipset).

use crate::claims::Ctl;
use crate::*;
use bdf_router::{Sbdf, ServerIdx};
use ioreq_server::oop::sys::Doorbell;
use ioreq_server::{
    Backend, Claim, ClaimError, DeviceModel, DmControl, IoRange, MsiError, RangeKind,
};
use tracing::{info, warn};

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
    /// An MSI a model injects outside a request.
    InjectMsi {
        model: ServerIdx,
        addr: u64,
        data: u32,
        reply: crossbeam_channel::Sender<Result<(), MsiError>>,
    },
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
            Control::InjectMsi {
                model, addr, data, ..
            } => write!(f, "InjectMsi({model}, {addr:#x}, {data:#x})"),
        }
    }
}

impl<B: Backend> Engine<B> {
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
            // What it claimed before the refused claim goes, from the hypervisor too.
            self.models.push(None);
            self.release_claims(idx);
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
        self.sync_slots();
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

    pub(crate) fn drain_control(&mut self) {
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
                Control::InjectMsi {
                    model,
                    addr,
                    data,
                    reply,
                } => {
                    let _ = reply.send(self.model_msi(model, addr, data));
                }
            }
        }
    }

    pub(crate) fn model_ctl(
        &mut self,
        idx: ServerIdx,
        f: impl FnOnce(&mut dyn DmControl) -> Result<(), ClaimError>,
    ) -> Result<(), ClaimError> {
        let Some(slot) = self.models.get(usize::from(idx)).and_then(Option::as_ref) else {
            return Err(ClaimError::NoModel { index: idx });
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

    /// Model `idx`'s MSI, through its [`DmControl`] as during a request.
    fn model_msi(&mut self, idx: ServerIdx, addr: u64, data: u32) -> Result<(), MsiError> {
        let mut r = Err(MsiError::NoModel { index: idx });
        let _ = self.model_ctl(idx, |ctl| {
            r = ctl.inject_msi(addr, data);
            Ok(())
        });
        r
    }

    /// Removes a device model (it crashed or left): its claims are released.
    pub fn remove_model(&mut self, idx: ServerIdx) -> Vec<Claim> {
        let Some(slot) = self.models.get_mut(usize::from(idx)).and_then(Option::take) else {
            return vec![];
        };
        let gone = self.release_claims(idx);
        info!(model = %slot.name, released = gone.len(), "device model removed");
        self.sync_slots();
        gone
    }

    /// Releases every claim of model `idx` with the router, and with the hypervisor what
    /// the engine had mapped there on its behalf.
    fn release_claims(&mut self, idx: ServerIdx) -> Vec<Claim> {
        let positions: Vec<Sbdf> = self
            .router
            .positions()
            .iter()
            .filter(|p| p.owner == idx)
            .filter_map(|p| p.resolved)
            .collect();
        let gone = self.router.release_all(idx);
        if gone.iter().any(|c| match c {
            Claim::Position(_) => true,
            Claim::Range(r) => r.kind == RangeKind::Pci,
        }) {
            self.mapped.pci_changed();
        }
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
        gone
    }
}
