//! The two seams of the multiplexer: [`Backend`] is the hypervisor side (real Xen or the
//! simulation), [`DeviceModel`] is what a backing ioreq server implements.

use crate::ioreq::Ioreq;
use crate::range::{Claim, IoRange, Position};
use std::time::Duration;
use thiserror::Error;

/// Something went wrong talking to the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BackendError {
    #[error("range {0} overlaps a range this server already has (EEXIST)")]
    Overlap(IoRange),
    #[error("server already has the maximum of {limit} {kind} ranges (ENOSPC)")]
    TooManyRanges { kind: &'static str, limit: usize },
    #[error("range {0} is not mapped by this server (ENOENT)")]
    NotMapped(IoRange),
    #[error("invalid range {0}")]
    InvalidRange(IoRange),
    #[error("vCPU {0} does not exist")]
    NoSuchVcpu(u32),
    #[error("slot of vCPU {vcpu}: {source}")]
    Slot {
        vcpu: u32,
        #[source]
        source: crate::slot::SlotError,
    },
    #[error("the hypervisor is gone")]
    Disconnected,
    /// The backend cannot do this operation (yet): `op` names it.
    #[error("{op} is not supported by this backend")]
    Unsupported { op: &'static str },
    #[error("{0}")]
    Other(String),
}

/// What a backend hands the multiplexer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendEvent {
    /// A synchronous request from `vcpu`; the slot is now INPROCESS and must be completed once
    /// with [`Backend::complete`].
    Request { vcpu: u32, req: Ioreq },
    /// A write drained from the buffered ring: no completion.
    Buffered(Ioreq),
}

/// The hypervisor as an ioreq server sees it: one server's claims, its request slots and its
/// buffered ring.
pub trait Backend {
    /// vCPUs of the guest (one slot each).
    fn nr_vcpus(&self) -> u32;
    /// `map_io_range_to_ioreq_server` / `map_pcidev_to_ioreq_server`.
    fn map_range(&mut self, range: IoRange) -> Result<(), BackendError>;
    /// `unmap_io_range_from_ioreq_server` / `unmap_pcidev_from_ioreq_server`.
    fn unmap_range(&mut self, range: IoRange) -> Result<(), BackendError>;
    /// Waits up to `timeout` (`None` = forever) for work and appends it to `out`. Buffered
    /// writes queued before a synchronous request come before it in `out`.
    fn wait(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<BackendEvent>,
    ) -> Result<(), BackendError>;
    /// Writes `data` (for reads) into the vCPU's slot, marks it IORESP_READY and notifies.
    fn complete(&mut self, vcpu: u32, data: u64) -> Result<(), BackendError>;
    /// Sends the guest a message-signalled interrupt: a memory write of `data` (the MSI
    /// capability's Message Data, PCIe base spec 4.0, 7.7.1.5) to `addr` (Message Address and
    /// Upper Address, 7.7.1.3-4), as an emulated function does when it interrupts. On Xen,
    /// `XEN_DMOP_inject_msi` (`xendevicemodel_inject_msi(dmod, domid, addr, data)`,
    /// xen/include/public/hvm/dm_op.h), an operation on the domain, not on one ioreq server.
    ///
    /// The default refuses with [`BackendError::Unsupported`], for backends that cannot
    /// interrupt the guest (yet).
    fn inject_msi(&mut self, addr: u64, data: u32) -> Result<(), BackendError> {
        let _ = (addr, data);
        Err(BackendError::Unsupported { op: "inject_msi" })
    }
}

/// A device model refused or failed a request.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DmError {
    #[error("device model {0} is not connected")]
    Disconnected(String),
    #[error("device model {name} did not answer within {after:?}")]
    Timeout { name: String, after: Duration },
    #[error("device model {name}: {msg}")]
    Failed { name: String, msg: String },
}

/// A claim was refused. Each refusal carries the claim itself, so a caller can say where it
/// came from (the topology line that made it, say), not only print it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClaimError {
    #[error("{claim} requested by {requester} is already owned by {owner}")]
    Conflict {
        claim: Claim,
        requester: String,
        owner: String,
    },
    #[error("{claim} is not owned by {requester}")]
    NotOwned { claim: Claim, requester: String },
    #[error("{claim} requested by {requester} is outside its grant")]
    NotGranted { claim: Claim, requester: String },
    #[error("invalid claim {claim}: {why}")]
    Invalid { claim: Claim, why: String },
    #[error("hypervisor refused {claim}: {source}")]
    Backend {
        claim: Claim,
        #[source]
        source: BackendError,
    },
    /// A DMOP for a model the multiplexer does not have (it left).
    #[error("no device model {index}")]
    NoModel { index: u16 },
}

impl ClaimError {
    /// The claim that was refused (`None`: the model itself is gone).
    pub fn claim(&self) -> Option<&Claim> {
        match self {
            ClaimError::Conflict { claim, .. }
            | ClaimError::NotOwned { claim, .. }
            | ClaimError::NotGranted { claim, .. }
            | ClaimError::Invalid { claim, .. }
            | ClaimError::Backend { claim, .. } => Some(claim),
            ClaimError::NoModel { .. } => None,
        }
    }
}

/// An MSI a device model asked for was not sent ([`DmControl::inject_msi`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MsiError {
    /// Nobody here can interrupt the guest: the hypervisor backend cannot
    /// ([`BackendError::Unsupported`]), or the multiplexer does not know the DMOP (an older
    /// one answering `ENOSYS`). A model may fall back to INTx.
    #[error("MSI injection is not supported: {why}")]
    Unsupported { why: String },
    /// The hypervisor refused or failed it (on Xen, `XEN_DMOP_inject_msi` returned an error).
    #[error("hypervisor refused the MSI (address {addr:#x}, data {data:#x}): {source}")]
    Backend {
        addr: u64,
        data: u32,
        #[source]
        source: BackendError,
    },
    /// A DMOP for a model the multiplexer does not have (it left).
    #[error("no device model {index}")]
    NoModel { index: u16 },
}

impl MsiError {
    /// The error for a backend's refusal: [`MsiError::Unsupported`] when the backend cannot
    /// inject at all, [`MsiError::Backend`] otherwise.
    pub fn from_backend(addr: u64, data: u32, source: BackendError) -> Self {
        match source {
            BackendError::Unsupported { .. } => MsiError::Unsupported {
                why: source.to_string(),
            },
            source => MsiError::Backend { addr, data, source },
        }
    }
}

/// The DMOPs a device model issues, addressed to whoever stands in for Xen (the multiplexer).
pub trait DmControl {
    fn map(&mut self, claim: Claim) -> Result<(), ClaimError>;
    fn unmap(&mut self, claim: Claim) -> Result<(), ClaimError>;

    /// Sends the guest a message-signalled interrupt: a write of `data` to `addr`, what the
    /// function's MSI (or MSI-X) capability holds (PCIe base spec 4.0, 7.7.1.3-5). Xen's
    /// `XEN_DMOP_inject_msi` (xen/include/public/hvm/dm_op.h), which any device model of the
    /// domain may send: it concerns the domain, not one ioreq server, and the multiplexer
    /// passes it to its hypervisor backend ([`Backend::inject_msi`]) on the model's behalf.
    fn inject_msi(&mut self, addr: u64, data: u32) -> Result<(), MsiError>;

    /// Maps each claim in order, stopping at the first refusal (a model's initial claims).
    fn map_all(&mut self, claims: &[Claim]) -> Result<(), ClaimError> {
        for c in claims {
            self.map(c.clone())?;
        }
        Ok(())
    }

    /// Where a function this model claimed by position is now (packed SBDF), if firmware has
    /// numbered the buses above it. A model that owns several functions uses it to tell which
    /// one a PCI_CONFIG request is for.
    fn locate(&self, _position: &Position) -> Option<u32> {
        None
    }
}

/// A backing ioreq server: QEMU, a vGPU model, a storage model...
///
/// The multiplexer hands it PIO, COPY (MMIO) and PCI_CONFIG ioreqs with Xen's semantics
/// (PCI_CONFIG `addr` = SBDF << 32 | register, register up to 0xfff) for what it claimed.
pub trait DeviceModel: Send {
    /// A short name for logs and reports.
    fn name(&self) -> &str;

    /// Called once when the model joins: make the initial claims.
    fn attach(&mut self, ctl: &mut dyn DmControl) -> Result<(), ClaimError>;

    /// Serves one request. For reads, returns the value (its low `size` bytes count); for
    /// writes the return value is ignored. The model may change its claims through `ctl`
    /// (a BAR was programmed, say); they take effect before the next request.
    fn handle(&mut self, vcpu: u32, req: &Ioreq, ctl: &mut dyn DmControl) -> Result<u64, DmError>;

    /// TIMEOFFSET and INVALIDATE broadcasts. The default does nothing (no mapcache).
    fn broadcast(&mut self, _req: &Ioreq) -> Result<(), DmError> {
        Ok(())
    }
}
