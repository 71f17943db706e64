//! Claims: what a model may claim ([`Grant`]) and the DMOPs of one model ([`Ctl`], the
//! engine's [`DmControl`]) applied to the router and, for what the engine forwards, to the
//! hypervisor.

use crate::*;
use bdf_router::{Router, Sbdf, ServerIdx};
use ioreq_server::{
    Backend, BackendError, Claim, ClaimError, DmControl, IoRange, MsiError, Position, RangeKind,
};
use tracing::{debug, warn};

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

/// The DMOPs of one device model, applied to the router and the hypervisor.
pub(crate) struct Ctl<'a, B: Backend> {
    pub(crate) owner: ServerIdx,
    pub(crate) grant: Option<&'a Grant>,
    pub(crate) router: &'a mut Router,
    pub(crate) backend: &'a mut B,
    pub(crate) mapped: &'a mut Mapped,
    pub(crate) stats: &'a mut EngineStats,
}

pub(crate) fn ensure_segment<B: Backend>(
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
                    claim: claim.clone(),
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
                claim: claim.clone(),
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

    /// Straight to the hypervisor: an MSI concerns the domain, not a claim, so no grant or
    /// ownership applies (any device model of a Xen domain may inject one).
    fn inject_msi(&mut self, addr: u64, data: u32) -> Result<(), MsiError> {
        let model = self.router.server_name(self.owner);
        match self.backend.inject_msi(addr, data) {
            Ok(()) => {
                self.stats.msis_injected += 1;
                debug!(model, addr, data, "MSI injected");
                Ok(())
            }
            Err(source) => {
                self.stats.msi_errors += 1;
                // Counted, and the model is told: a model that keeps trying must not flood
                // the log.
                debug!(model, addr, data, error = %source, "MSI refused");
                Err(MsiError::from_backend(addr, data, source))
            }
        }
    }
}

impl<B: Backend> Ctl<'_, B> {
    /// Whether `claim` lies inside a PM block the engine claimed for this model (and still
    /// holds for it).
    pub(crate) fn inside_pm_block(&self, claim: &Claim) -> bool {
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
pub(crate) fn resolved(router: &Router, owner: ServerIdx, p: &Position) -> Option<Sbdf> {
    router
        .positions()
        .iter()
        .find(|c| c.owner == owner && c.position == *p)
        .and_then(|c| c.resolved)
}
