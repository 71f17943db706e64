//! Layout changes: chipset detection and its intercepts, the ECAM windows and PM blocks the
//! intercepts move (from the guest's own writes to PCIEXBAR, PMBASE...), applied to the router
//! and the hypervisor before the next request.

use crate::claims::{Ctl, ensure_segment};
use crate::*;
use bdf_router::{ConfigAccess, ConfigPath, EcamWindow, Moved, Router, Sbdf, ServerIdx};
use chipset_intercept::{Chipset, LayoutEvent};
use ioreq_server::{Backend, Claim, Dir, DmControl, IoRange, Ioreq, size_mask};
use tracing::{debug, info, warn};

/// Why an ECAM window was not installed.
pub(crate) struct WindowRefused {
    pub(crate) why: String,
    /// The hypervisor refused the MMIO claim (the router had accepted the window).
    pub(crate) by_hypervisor: bool,
}

impl<B: Backend> Engine<B> {
    /// Probes the IDs of the chipset functions through whoever owns them; installs the
    /// chipset's intercepts once one is recognised.
    pub(crate) fn detect(&mut self) {
        self.detected_at = self.mapped.pci_generation;
        let c = chipset_intercept::detect(&mut |s| self.probe(s, 0, 4) as u32);
        if c != Chipset::Unknown {
            info!(chipset = %c, "chipset detected");
            self.detect_pending = false;
            self.install_chipset(c);
        }
    }

    pub(crate) fn install_chipset(&mut self, c: Chipset) {
        self.chipset = c;
        self.intercepts = chipset_intercept::build(c, &self.intercept_cfg);
        self.seed_intercepts();
    }

    /// Installs a window of the toolstack's (see [`EngineConfig::ecam`]); a window the router
    /// or the hypervisor refuses (it overlaps another) stops the engine from starting.
    pub(crate) fn add_static_window(&mut self, w: EcamWindow) -> Result<(), EngineError> {
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

    /// Reads intercepted registers the models see once, so the handlers start from the
    /// model's values (a guest may have run before the multiplexer attached).
    pub(crate) fn seed_intercepts(&mut self) {
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
    pub(crate) fn probe(&mut self, sbdf: Sbdf, reg: u16, size: u8) -> u64 {
        match self.router.config_owner(sbdf) {
            Some(o) if self.ports.owns(o) => self.port_read(sbdf, reg, size),
            Some(o) if o != MUX => {
                let req = Ioreq::pci_config(sbdf.to_xen(), reg.into(), Dir::Read, size.into(), 0);
                self.call(o, 0, &req)
            }
            _ => size_mask(size.into()),
        }
    }

    /// Applies the layout events the intercepts emitted, in order, to the router and the
    /// hypervisor.
    pub(crate) fn apply_layout(&mut self) {
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
    pub(crate) fn apply_ecam(
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
    pub(crate) fn window_refused(
        &mut self,
        w: EcamWindow,
        why: String,
        by_hypervisor: bool,
    ) -> WindowRefused {
        self.history.push(LayoutEvent::Refused {
            register: "ECAM window",
            value: w.base,
            why: why.clone(),
        });
        WindowRefused { why, by_hypervisor }
    }

    /// Whether `owner` has mapped ports inside `block` and nobody else holds any of it.
    pub(crate) fn model_maps_block(&self, owner: ServerIdx, block: &IoRange) -> bool {
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
    pub(crate) fn apply_pm(&mut self, function: Sbdf, new: Option<IoRange>) -> bool {
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

pub(crate) fn log_moves(router: &Router, moved: &[Moved]) {
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
