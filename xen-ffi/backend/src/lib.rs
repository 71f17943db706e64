//! [`XenBackend`]: the engine's hypervisor side on real Xen, through `xen-ffi`.
//!
//! It behaves towards the engine exactly like `ioreq_server::sim::SimBackend`: `wait` hands
//! out buffered writes first, then synchronous requests whose slots it moved to INPROCESS;
//! `complete` answers one of them exactly once.
//!
//! # Setting up (what QEMU does too, `hw/xen/xen-hvm-common.c`)
//! 1. `xendevicemodel_create_ioreq_server` with `HVM_IOREQSRV_BUFIOREQ_ATOMIC`; if Xen refuses,
//!    again with `BUFIOREQ_OFF` (no buffered ring: every access is synchronous).
//! 2. `xenforeignmemory_map_resource(XENMEM_resource_ioreq_server)`: frame 0 (buffered page,
//!    if any) and frame 1 (the synchronous page, one 32-byte `ioreq_t` per vCPU).
//! 3. Enable the server, *then* read each vCPU's `vp_eport` (Xen writes the ports only while
//!    the server is enabled) and bind it with `xenevtchn_bind_interdomain`; bind the
//!    buffered port from `get_ioreq_server_info` too.
//! 4. The engine's claims arrive through [`Backend::map_range`]: ports and MMIO with
//!    `map_io_range_to_ioreq_server`; PCI functions with `map_pcidev_to_ioreq_server`, or,
//!    for a run of consecutive SBDFs (the engine claims whole segments), one
//!    `XEN_DMOP_map_io_range_to_ioreq_server` of type PCI over the run through
//!    [`xen_ffi::PciRangeDmOp`] (libxendevicemodel has no call taking an SBDF range, although
//!    the DMOP does); if that ioctl is not available, one `map_pcidev` per function.
//!    [`XenBackendOptions`] narrows what is really claimed from Xen, so the multiplexer can
//!    run beside QEMU (see [`PciClaims`]).
//!
//! # Serving (`wait` / `complete`)
//! - `wait` polls the event-channel fd (and an optional wake-up fd, e.g. a signalfd) with the
//!   timeout, then takes every pending port (`xenevtchn_pending`) and unmasks it at once, so
//!   a notification that comes while we work is not lost.
//! - Buffered ring first: entries between `read_pointer` and `write_pointer` (one 64-bit
//!   Acquire load of both) become [`BackendEvent::Buffered`]; `read_pointer` advances with a
//!   Release atomic add (Xen may fold both pointers concurrently in ATOMIC mode). Writes
//!   queued before a synchronous request therefore reach the models before it.
//! - Then every vCPU slot, whether its port fired or not (cheap, and robust against a
//!   notification consumed earlier): `state == READY` → Acquire fence → copy the 32 bytes →
//!   Release fence + `state = INPROCESS` → [`BackendEvent::Request`]. A slot that does not
//!   decode (unknown type, reserved flag) is answered here — all ones for a read — so no
//!   vCPU is ever left waiting; a slot that decodes but is invalid for its type goes to the
//!   engine, whose `validate()` answers it as a master abort.
//! - `complete(vcpu, data)` writes `data` (reads without `data_is_ptr` only), Release fence,
//!   `state = IORESP_READY`, `xenevtchn_notify` on the vCPU's port.
//! - INVALIDATE and TIMEOFFSET need nothing special: they come as a request / ring entry and
//!   the engine broadcasts and completes them.
//!
//! # Tearing down (`Drop`)
//! Disable the server, answer whatever is still in a slot, unmap the ranges, destroy the
//! server; then the pages are unmapped and the handles closed (which unbinds the ports).
//!
//! Not supported: `data_is_ptr` requests (rep string I/O): the data would have to be copied
//! from or to guest memory, which needs guest-memory mappings this backend does not make.
//! They reach the models as if `data` were a value; the vCPU is completed but its buffer is
//! not touched.

use bdf_router::Sbdf;
use ioreq_server::abi::{
    self, FLAG_DATA_IS_PTR, FLAG_DIR_READ, PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_DATA_PORT,
    STATE_IOREQ_INPROCESS, STATE_IOREQ_READY, STATE_IORESP_READY,
};
use ioreq_server::bufioreq;
use ioreq_server::slot::{Actor, SlotError};
use ioreq_server::{
    Backend, BackendError, BackendEvent, Dir, IoRange, Ioreq, IoreqState, IoreqType, RangeKind,
    size_mask,
};
use nix::errno::Errno;
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::Serialize;
use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};
use thiserror::Error;
use tracing::{debug, info, warn};
use xen_ffi::abi::{HVM_IOREQSRV_BUFIOREQ_ATOMIC, HVM_IOREQSRV_BUFIOREQ_OFF};
use xen_ffi::{
    BufferedPageView, DeviceModelHandle, EventChannelHandle, ForeignMemoryHandle, IoreqPage,
    Libraries, PciRangeDmOp, ResourceMapping, XenError,
};

use ioreq_server::abi::MAX_NR_IO_RANGES;

/// Above this many mapped functions, `Drop` leaves them to `destroy_ioreq_server` instead of
/// unmapping one hypercall at a time.
const PCI_UNMAP_ONE_BY_ONE_MAX: usize = 256;

/// Runs of consecutive values, as inclusive (first, last) pairs.
fn runs(sorted: impl IntoIterator<Item = u32>) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = vec![];
    for s in sorted {
        match out.last_mut() {
            Some((_, b)) if b.checked_add(1) == Some(s) => *b = s,
            _ => out.push((s, s)),
        }
    }
    out
}

/// The privcmd driver does not know `IOCTL_PRIVCMD_DM_OP` (or Xen the op).
fn unsupported(e: &XenError) -> bool {
    matches!(
        e.errno(),
        Some(libc::ENOTTY | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

/// Which PCI functions the backend really claims from Xen when the engine asks for a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PciClaims {
    /// Every function the engine asks for. The engine asks for whole segments, so Xen sends
    /// the multiplexer every configuration access of the guest: right when every device model
    /// of the guest sits behind the multiplexer.
    Everything,
}

/// What the backend claims from Xen and how it creates its server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XenBackendOptions {
    pub pci: PciClaims,
    /// Claim the configuration ports 0xcf8-0xcff when the engine asks. Off beside QEMU: Xen
    /// latches CF8 and turns CFC accesses into PCI_CONFIG requests for whoever claims the
    /// function anyway, and QEMU keeps CF8 reads and the PIIX reset register at 0xcf9.
    pub config_ports: bool,
    /// Ask for a buffered ring (BUFIOREQ_ATOMIC, falling back to OFF).
    pub buffered: bool,
}

impl XenBackendOptions {
    /// In front of every device model: claim everything the engine asks for.
    pub fn everything() -> Self {
        XenBackendOptions {
            pci: PciClaims::Everything,
            config_ports: true,
            buffered: true,
        }
    }
}

/// Why the backend could not be set up. The `Display` form is one line meant for an operator.
#[derive(Debug, Error)]
pub enum OpenError {
    /// No Xen here: libraries missing, no `/dev/xen/privcmd`, no event-channel device, or a
    /// build without Xen support.
    #[error("not a Xen host: {0}")]
    NotXen(XenError),
    /// The domain does not exist (or is not one an ioreq server can serve).
    #[error("domain {domid} does not exist or is not an HVM guest ({source})")]
    NoDomain { domid: u16, source: XenError },
    #[error("domain {domid} has {vcpus} vCPUs; the ioreq page has {max} slots")]
    TooManyVcpus { domid: u16, vcpus: u32, max: usize },
    /// Any other failure of a Xen call.
    #[error("{what}: {source}")]
    Xen { what: String, source: XenError },
}

impl OpenError {
    fn xen(what: impl Into<String>, source: XenError) -> Self {
        OpenError::Xen {
            what: what.into(),
            source,
        }
    }
}

/// Classifies a failure to open one of the Xen interfaces.
fn open_error(e: XenError) -> OpenError {
    match &e {
        XenError::NotBuilt
        | XenError::NoPrivcmd
        | XenError::LibraryLoad { .. }
        | XenError::MissingSymbol { .. } => OpenError::NotXen(e),
        // The device node is missing (e.g. /dev/xen/evtchn without the xen-evtchn driver).
        XenError::Call { errno, .. }
            if matches!(*errno, libc::ENOENT | libc::ENODEV | libc::ENXIO) =>
        {
            OpenError::NotXen(e)
        }
        XenError::Call { errno, .. } if matches!(*errno, libc::EACCES | libc::EPERM) => {
            OpenError::xen("opening the Xen interfaces (needs root)", e)
        }
        _ => OpenError::xen("opening the Xen interfaces", e),
    }
}

/// Whether a failed call says the domain (or our server in it) is gone.
fn gone(e: &XenError) -> bool {
    matches!(e.errno(), Some(libc::ESRCH | libc::ENOENT))
}

/// Counters the backend keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct XenStats {
    /// Event-channel notifications taken.
    pub notifications: u64,
    /// Synchronous requests handed to the engine.
    pub requests: u64,
    /// Buffered writes handed to the engine.
    pub buffered: u64,
    /// Slots that did not decode, answered by the backend itself.
    pub malformed_answered: u64,
    /// Buffered entries skipped (unknown type).
    pub buffered_skipped: u64,
    /// Slots still busy at shutdown, answered with all ones.
    pub answered_at_shutdown: u64,
}

/// How the server was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BufMode {
    Atomic,
    Off,
}

/// One Xen ioreq server for one domain, serving the engine.
pub struct XenBackend {
    domid: u16,
    id: u16,
    mode: BufMode,
    opts: XenBackendOptions,
    nr_vcpus: u32,
    /// Local event-channel port per vCPU.
    vcpu_ports: Vec<u32>,
    buf_port: Option<u32>,
    /// The request each vCPU has in flight (taken, not yet completed).
    inflight: Vec<Option<Ioreq>>,
    enabled: bool,
    /// Port and MMIO ranges Xen routes to us.
    ranges: Vec<IoRange>,
    /// Ranges the engine asked for that are deliberately not claimed from Xen.
    skipped: Vec<IoRange>,
    /// PCI functions (packed SBDF) Xen routes to us.
    pci: BTreeSet<u32>,
    wake: Vec<OwnedFd>,
    /// For PCI ranges in one DMOP; `None` if privcmd could not be opened or lacks the ioctl.
    pci_range: Option<PciRangeDmOp>,
    stats: XenStats,
    // Declared last: dropped after `Drop::drop` ran, mapping before its handle.
    pages: ResourceMapping,
    evtchn: EventChannelHandle,
    _fmem: ForeignMemoryHandle,
    dm: DeviceModelHandle,
}

impl std::fmt::Debug for XenBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenBackend")
            .field("domid", &self.domid)
            .field("id", &self.id)
            .field("mode", &self.mode)
            .field("nr_vcpus", &self.nr_vcpus)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

/// Destroys a freshly created server unless disarmed (until [`XenBackend`] owns it).
struct ServerGuard<'a> {
    dm: &'a DeviceModelHandle,
    domid: u16,
    id: u16,
    armed: bool,
}

impl Drop for ServerGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.dm.destroy_ioreq_server(self.domid, self.id) {
                warn!(domid = self.domid, id = self.id, error = %e, "destroying the half-built ioreq server");
            }
        }
    }
}

/// The domain's vCPU count, which the shared page must have a slot for each of.
fn vcpus_of(dm: &DeviceModelHandle, domid: u16) -> Result<u32, OpenError> {
    let nr_vcpus = dm.nr_vcpus(domid).map_err(|e| match e.errno() {
        Some(libc::ESRCH | libc::EINVAL | libc::EOPNOTSUPP) => {
            OpenError::NoDomain { domid, source: e }
        }
        _ => OpenError::xen(format!("asking Xen for the vCPUs of domain {domid}"), e),
    })?;
    if nr_vcpus == 0 || nr_vcpus as usize > IoreqPage::SLOTS {
        return Err(OpenError::TooManyVcpus {
            domid,
            vcpus: nr_vcpus,
            max: IoreqPage::SLOTS,
        });
    }
    Ok(nr_vcpus)
}

/// Creates the ioreq server, with an atomic buffered ring if asked and Xen agrees (else
/// without one, every access synchronous).
fn create_server(
    dm: &DeviceModelHandle,
    domid: u16,
    buffered: bool,
) -> Result<(u16, BufMode), OpenError> {
    let create = |mode: u8| {
        dm.create_ioreq_server(domid, mode).map_err(|e| {
            if gone(&e) {
                OpenError::NoDomain { domid, source: e }
            } else {
                OpenError::xen(format!("creating an ioreq server for domain {domid}"), e)
            }
        })
    };
    if !buffered {
        return Ok((create(HVM_IOREQSRV_BUFIOREQ_OFF)?, BufMode::Off));
    }
    match create(HVM_IOREQSRV_BUFIOREQ_ATOMIC) {
        Ok(id) => Ok((id, BufMode::Atomic)),
        Err(e @ (OpenError::NoDomain { .. } | OpenError::NotXen(_))) => Err(e),
        Err(e) => {
            warn!(domid, error = %e, "no buffered ring (BUFIOREQ_ATOMIC refused); every access will be synchronous");
            Ok((create(HVM_IOREQSRV_BUFIOREQ_OFF)?, BufMode::Off))
        }
    }
}

impl XenBackend {
    /// Creates, maps and enables an ioreq server for `domid` and binds its event channels.
    /// No range is claimed yet: the engine does that through [`Backend::map_range`].
    pub fn open(domid: u16, opts: XenBackendOptions) -> Result<Self, OpenError> {
        let libs = Libraries::load().map_err(OpenError::NotXen)?;
        let dm = DeviceModelHandle::open(&libs).map_err(open_error)?;
        let fmem = ForeignMemoryHandle::open(&libs).map_err(open_error)?;
        let evtchn = EventChannelHandle::open(&libs).map_err(open_error)?;

        let nr_vcpus = vcpus_of(&dm, domid)?;
        let (id, mode) = create_server(&dm, domid, opts.buffered)?;
        let mut guard = ServerGuard {
            dm: &dm,
            domid,
            id,
            armed: true,
        };
        let pages = fmem
            .map_ioreq_server_pages(domid, id, mode == BufMode::Atomic)
            .map_err(|e| OpenError::xen(format!("mapping the pages of ioreq server {id}"), e))?;
        guard.armed = false;
        drop(guard);

        // From here on `Drop` cleans up whatever fails.
        let mut me = XenBackend {
            domid,
            id,
            mode,
            opts,
            nr_vcpus,
            vcpu_ports: Vec::with_capacity(nr_vcpus as usize),
            buf_port: None,
            inflight: vec![None; nr_vcpus as usize],
            enabled: false,
            ranges: vec![],
            skipped: vec![],
            pci: BTreeSet::new(),
            wake: vec![],
            pci_range: PciRangeDmOp::open()
                .map_err(
                    |e| debug!(error = %e, "no PCI range DMOP: functions are claimed one by one"),
                )
                .ok(),
            stats: XenStats::default(),
            pages,
            evtchn,
            _fmem: fmem,
            dm,
        };
        me.enable_and_bind()?;
        info!(
            domid,
            id,
            vcpus = nr_vcpus,
            bufioreq = ?mode,
            ports = ?me.vcpu_ports,
            buffered_port = ?me.buf_port,
            "ioreq server created and enabled"
        );
        Ok(me)
    }

    /// Enables the server, then binds its event channels: one per vCPU (`vp_eport` is valid
    /// only once the server is enabled) and the buffered ring's.
    fn enable_and_bind(&mut self) -> Result<(), OpenError> {
        let (domid, id) = (self.domid, self.id);
        self.dm
            .set_ioreq_server_state(domid, id, true)
            .map_err(|e| OpenError::xen(format!("enabling ioreq server {id}"), e))?;
        self.enabled = true;
        let (page, _) = self.pages.pages();
        for v in 0..self.nr_vcpus as usize {
            let remote = page.vp_eport(v);
            let local = self.evtchn.bind_interdomain(domid, remote).map_err(|e| {
                OpenError::xen(
                    format!("binding the event channel of vCPU {v} (remote port {remote})"),
                    e,
                )
            })?;
            self.vcpu_ports.push(local);
        }
        if self.mode == BufMode::Atomic {
            let info = self
                .dm
                .get_ioreq_server_info(domid, id)
                .map_err(|e| OpenError::xen("reading the buffered event channel", e))?;
            if let Some(remote) = info {
                let local = self.evtchn.bind_interdomain(domid, remote).map_err(|e| {
                    OpenError::xen(format!("binding the buffered event channel ({remote})"), e)
                })?;
                self.buf_port = Some(local);
            }
        }
        Ok(())
    }

    pub fn domid(&self) -> u16 {
        self.domid
    }

    /// The ioreq server id Xen gave us.
    pub fn server_id(&self) -> u16 {
        self.id
    }

    pub fn buf_mode(&self) -> BufMode {
        self.mode
    }

    pub fn options(&self) -> &XenBackendOptions {
        &self.opts
    }

    pub fn stats(&self) -> &XenStats {
        &self.stats
    }

    /// What Xen routes to this server now: port and MMIO ranges, then PCI functions (runs of
    /// consecutive SBDFs merged).
    pub fn claims(&self) -> Vec<IoRange> {
        let mut out = self.ranges.clone();
        for (a, b) in runs(self.pci.iter().copied()) {
            out.push(IoRange::new(RangeKind::Pci, a.into(), b.into()));
        }
        out
    }

    /// Ranges the engine asked for that this backend did not claim from Xen (options).
    pub fn skipped(&self) -> &[IoRange] {
        &self.skipped
    }

    /// Adds a file descriptor that ends [`Backend::wait`] early when it becomes readable (a
    /// signalfd, the engine's control doorbell). The backend only polls it; reading it is
    /// the caller's business.
    pub fn add_wake_fd(&mut self, fd: OwnedFd) {
        self.wake.push(fd);
    }

    /// Stops Xen from sending new requests (`set_ioreq_server_state(0)`). Requests already in
    /// a slot still have to be completed: keep polling once more before dropping.
    pub fn disable(&mut self) -> Result<(), XenError> {
        if self.enabled {
            self.enabled = false;
            self.dm.set_ioreq_server_state(self.domid, self.id, false)?;
        }
        Ok(())
    }

    /// Whether our server still exists in Xen: false once the domain is dying or gone (Xen
    /// destroys its ioreq servers then) or someone destroyed the server.
    pub fn alive(&self) -> Result<bool, XenError> {
        match self.dm.get_ioreq_server_info(self.domid, self.id) {
            Ok(_) => Ok(true),
            Err(e) if gone(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Polls the event channel (and the wake fd). Returns whether the event channel is
    /// readable.
    fn sleep(&self, timeout: Option<Duration>) -> Result<bool, BackendError> {
        let t = match timeout {
            None => PollTimeout::NONE,
            Some(d) => {
                let ms = d.as_nanos().div_ceil(1_000_000);
                PollTimeout::try_from(i32::try_from(ms).unwrap_or(i32::MAX))
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = Vec::with_capacity(1 + self.wake.len());
        fds.push(PollFd::new(self.evtchn.as_fd(), PollFlags::POLLIN));
        fds.extend(
            self.wake
                .iter()
                .map(|w| PollFd::new(w.as_fd(), PollFlags::POLLIN)),
        );
        match poll(&mut fds, t) {
            Ok(_) => {}
            Err(Errno::EINTR) => return Ok(false),
            Err(e) => {
                return Err(BackendError::Other(format!(
                    "poll on the event channel: {e}"
                )));
            }
        }
        let ev = fds[0].revents().unwrap_or(PollFlags::empty());
        if ev.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL) {
            return Err(BackendError::Disconnected);
        }
        Ok(ev.contains(PollFlags::POLLIN))
    }

    /// Takes every pending port and unmasks it. Never blocks.
    fn take_notifications(&mut self, mut readable: bool) -> Result<(), BackendError> {
        // Bounded: a port cannot be pending twice, so this ends after at most every bound
        // port (vCPUs + buffered) once, plus ports raised again meanwhile.
        for _ in 0..4 * (self.vcpu_ports.len() + 2) {
            if !readable {
                readable = self.sleep(Some(Duration::ZERO))?;
                if !readable {
                    break;
                }
            }
            readable = false;
            let port = match self.evtchn.pending() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => return Err(xen_err(e)),
            };
            self.stats.notifications += 1;
            self.evtchn.unmask(port).map_err(xen_err)?;
        }
        Ok(())
    }

    /// Moves ring entries and READY slots into `out`, ring first.
    fn collect(&mut self, out: &mut Vec<BackendEvent>) {
        let (page, ring) = self.pages.pages();
        if let Some(ring) = ring {
            let (taken, skipped) = drain_ring(&ring, out);
            self.stats.buffered += taken as u64;
            self.stats.buffered_skipped += skipped as u64;
        }
        let before = out.len();
        let answered = take_ready(&page, &mut self.inflight, out);
        self.stats.requests += (out.len() - before) as u64;
        for v in answered {
            self.stats.malformed_answered += 1;
            if let Err(e) = self.evtchn.notify(self.vcpu_ports[v]) {
                warn!(vcpu = v, error = %e, "notifying a vCPU");
            }
        }
        for ev in &out[before..] {
            if let BackendEvent::Request { vcpu, req } = ev {
                tracing::trace!(vcpu, ?req, "request taken");
            }
        }
    }

    fn map_io(&mut self, r: IoRange) -> Result<(), BackendError> {
        let is_mmio = r.kind == RangeKind::Mmio;
        self.dm
            .map_io_range(self.domid, self.id, is_mmio, r.start, r.end)
            .map_err(|e| range_err(e, r))?;
        self.ranges.push(r);
        Ok(())
    }

    fn unmap_pcidev(&self, s: u32) -> Result<(), XenError> {
        let f = Sbdf::from_xen(s);
        self.dm
            .unmap_pcidev(self.domid, self.id, f.segment, f.bus, f.device, f.function)
    }

    /// Claims the functions `a..=b`: one range DMOP when there is more than one (and the
    /// ioctl exists), else one `map_pcidev` each (undone if one fails).
    fn map_pci_run(&mut self, a: u32, b: u32) -> Result<(), XenError> {
        if b > a {
            if let Some(op) = &self.pci_range {
                match op.map(self.domid, self.id, a, b) {
                    Ok(()) => return Ok(()),
                    Err(e) if unsupported(&e) => {
                        warn!(error = %e, "PCI range DMOP unavailable: claiming functions one by one");
                        self.pci_range = None;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        for s in a..=b {
            let f = Sbdf::from_xen(s);
            if let Err(e) = self
                .dm
                .map_pcidev(self.domid, self.id, f.segment, f.bus, f.device, f.function)
            {
                if s > a {
                    let _ = self.unmap_pci_run(a, s - 1);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Releases the functions `a..=b` (which must all be ours).
    fn unmap_pci_run(&self, a: u32, b: u32) -> Result<(), XenError> {
        if b > a {
            if let Some(op) = &self.pci_range {
                match op.unmap(self.domid, self.id, a, b) {
                    Err(e) if unsupported(&e) => {}
                    r => return r,
                }
            }
        }
        let mut result = Ok(());
        for s in a..=b {
            if let Err(e) = self.unmap_pcidev(s) {
                result = Err(e);
            }
        }
        result
    }

    fn is_config_ports(r: &IoRange) -> bool {
        r.kind == RangeKind::Port
            && r.start >= u64::from(PCI_CONFIG_ADDRESS_PORT)
            && r.end <= u64::from(PCI_CONFIG_DATA_PORT) + 3
    }

    /// Answers, with all ones, every slot a vCPU still waits on (shutdown).
    fn answer_stragglers(&mut self) {
        let (page, _) = self.pages.pages();
        for v in 0..self.nr_vcpus as usize {
            let st = page.state(v);
            if st != STATE_IOREQ_READY && st != STATE_IOREQ_INPROCESS {
                continue;
            }
            let bytes = page.load(v);
            if st == STATE_IOREQ_READY {
                page.set_state(v, STATE_IOREQ_INPROCESS);
            }
            answer_raw(&page, v, &bytes);
            self.inflight[v] = None;
            self.stats.answered_at_shutdown += 1;
            if let Err(e) = self.evtchn.notify(self.vcpu_ports[v]) {
                debug!(vcpu = v, error = %e, "notifying a vCPU at shutdown");
            }
        }
    }
}

fn xen_err(e: XenError) -> BackendError {
    if gone(&e) {
        BackendError::Disconnected
    } else {
        BackendError::Other(e.to_string())
    }
}

/// Xen's answer to `XEN_DMOP_inject_msi`, in the engine's terms: a library, privcmd driver
/// or hypervisor without the op is [`BackendError::Unsupported`]; the domain gone is
/// [`BackendError::Disconnected`]; any other refusal keeps the call's errno text.
fn msi_err(e: XenError) -> BackendError {
    if unsupported(&e) || matches!(e, XenError::MissingSymbol { .. }) {
        BackendError::Unsupported { op: "inject_msi" }
    } else {
        xen_err(e)
    }
}

/// Xen's errno for a range DMOP, in the engine's terms.
fn range_err(e: XenError, r: IoRange) -> BackendError {
    match e.errno() {
        Some(libc::EEXIST) => BackendError::Overlap(r),
        Some(libc::ENOSPC) => BackendError::TooManyRanges {
            kind: match r.kind {
                RangeKind::Port => "port",
                RangeKind::Mmio => "mmio",
                RangeKind::Pci => "pci",
            },
            limit: MAX_NR_IO_RANGES,
        },
        Some(libc::ENOENT) => BackendError::NotMapped(r),
        Some(libc::ESRCH) => BackendError::Disconnected,
        Some(libc::EINVAL) => BackendError::InvalidRange(r),
        _ => BackendError::Other(format!("{r}: {e}")),
    }
}

/// Drains the buffered ring into `out`, oldest first. Returns (entries taken, skipped).
///
/// An 8-byte write whose second slot is not published yet stays in the ring for the next
/// call (Xen publishes both with one pointer update, so this does not happen in practice).
fn drain_ring(ring: &BufferedPageView<'_>, out: &mut Vec<BackendEvent>) -> (usize, usize) {
    let (mut taken, mut skipped) = (0, 0);
    // Bounded: each call takes at most a ring's worth, and a bad entry ends a call.
    for _ in 0..BufferedPageView::SLOTS {
        match bufioreq::drain_ring(ring, |req| {
            debug!(
                kind = %kind_name(req.ty),
                addr = format_args!("{:#x}", req.addr),
                size = req.size,
                data = format_args!("{:#x}", req.data),
                "buffered write"
            );
            out.push(BackendEvent::Buffered(req));
            taken += 1;
        }) {
            Ok(_) => break,
            Err(ioreq_server::abi::AbiError::BufferedType(ty)) => {
                warn!(ty, "buffered entry of an unknown type skipped");
                skipped += 1;
            }
            Err(e) => {
                debug!(error = %e, "buffered entry left in the ring for now");
                break;
            }
        }
    }
    (taken, skipped)
}

/// Takes every READY slot: READY → (Acquire) copy → INPROCESS, and a
/// [`BackendEvent::Request`] in `out`. Slots that do not decode are answered in place (all
/// ones for a read); their vCPUs are returned, to be notified.
fn take_ready(
    page: &IoreqPage<'_>,
    inflight: &mut [Option<Ioreq>],
    out: &mut Vec<BackendEvent>,
) -> Vec<usize> {
    let mut answered = vec![];
    for (v, slot) in inflight.iter_mut().enumerate() {
        if page.state(v) != STATE_IOREQ_READY {
            continue;
        }
        // `load` fences (Acquire) before reading the fields Xen published with READY.
        let bytes = page.load(v);
        // `set_state` fences (Release) before the store.
        page.set_state(v, STATE_IOREQ_INPROCESS);
        match Ioreq::from_bytes(&bytes) {
            Ok(mut req) => {
                req.state = IoreqState::InProcess;
                *slot = Some(req);
                out.push(BackendEvent::Request {
                    vcpu: v as u32,
                    req,
                });
            }
            Err(e) => {
                warn!(vcpu = v, error = %e, raw = ?bytes, "undecodable ioreq answered with all ones");
                answer_raw(page, v, &bytes);
                *slot = None;
                answered.push(v);
            }
        }
    }
    answered
}

/// Completes slot `v` from its raw image: all ones for a read without a pointer, then
/// IORESP_READY.
fn answer_raw(page: &IoreqPage<'_>, v: usize, bytes: &[u8; abi::IOREQ_SIZE]) {
    let flags = bytes[30];
    let size = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    if flags & FLAG_DIR_READ != 0 && flags & FLAG_DATA_IS_PTR == 0 {
        page.set_data(v, size_mask(size));
    }
    page.set_state(v, STATE_IORESP_READY);
}

/// Completes the request taken from slot `v`: data (reads), Release fence, IORESP_READY.
fn answer(page: &IoreqPage<'_>, v: usize, req: &Ioreq, data: u64) -> Result<(), SlotError> {
    let st = page.state(v);
    if st != STATE_IOREQ_INPROCESS {
        return Err(SlotError {
            actor: Actor::Server,
            from: IoreqState::from_u8(st).unwrap_or(IoreqState::None),
            to: IoreqState::RespReady,
        });
    }
    if req.dir == Dir::Read && !req.data_is_ptr {
        page.set_data(v, data);
    }
    page.set_state(v, STATE_IORESP_READY);
    Ok(())
}

fn kind_name(ty: IoreqType) -> &'static str {
    match ty {
        IoreqType::Pio => "pio",
        IoreqType::Copy => "mmio",
        IoreqType::PciConfig => "config",
        IoreqType::TimeOffset => "timeoffset",
        IoreqType::Invalidate => "invalidate",
    }
}

/// One debug line per served synchronous request (for reads, the value returned).
fn log_served(vcpu: u32, req: &Ioreq, value: u64) {
    let dir = if req.dir == Dir::Read {
        "read"
    } else {
        "write"
    };
    let data = if req.dir == Dir::Read {
        value
    } else {
        req.data
    };
    match req.ty {
        IoreqType::PciConfig => {
            let (sbdf, reg) = abi::split_pci_config_addr(req.addr);
            debug!(
                vcpu,
                sbdf = %Sbdf::from_xen(sbdf),
                reg = format_args!("{reg:#x}"),
                size = req.size,
                %dir,
                data = format_args!("{:#x}", data & req.size_mask()),
                "served config"
            );
        }
        IoreqType::Pio | IoreqType::Copy => debug!(
            vcpu,
            kind = %kind_name(req.ty),
            addr = format_args!("{:#x}", req.addr),
            size = req.size,
            count = req.count,
            ptr = req.data_is_ptr,
            %dir,
            data = format_args!("{:#x}", data & req.size_mask()),
            "served"
        ),
        IoreqType::TimeOffset | IoreqType::Invalidate => {
            debug!(vcpu, kind = %kind_name(req.ty), "broadcast acknowledged");
        }
    }
}

impl Backend for XenBackend {
    fn nr_vcpus(&self) -> u32 {
        self.nr_vcpus
    }

    fn map_range(&mut self, r: IoRange) -> Result<(), BackendError> {
        if !r.is_valid() {
            return Err(BackendError::InvalidRange(r));
        }
        match r.kind {
            RangeKind::Port if !self.opts.config_ports && Self::is_config_ports(&r) => {
                debug!(range = %r, "not claimed from Xen: it latches CF8 itself, QEMU keeps the ports");
                self.skipped.push(r);
                Ok(())
            }
            RangeKind::Port | RangeKind::Mmio => {
                self.map_io(r)?;
                debug!(range = %r, "claimed from Xen");
                Ok(())
            }
            RangeKind::Pci => {
                let wanted: Vec<u32> = match &self.opts.pci {
                    PciClaims::Everything => (r.start as u32..=r.end as u32)
                        .filter(|s| !self.pci.contains(s))
                        .collect(),
                };
                let t0 = Instant::now();
                let mut done: Vec<(u32, u32)> = vec![];
                for (a, b) in runs(wanted.iter().copied()) {
                    if let Err(e) = self.map_pci_run(a, b) {
                        for &(x, y) in &done {
                            if let Err(e) = self.unmap_pci_run(x, y) {
                                debug!(error = %e, "undoing a PCI claim");
                            }
                        }
                        let run = IoRange::new(RangeKind::Pci, a.into(), b.into());
                        return Err(range_err(e, run));
                    }
                    done.push((a, b));
                }
                self.pci.extend(wanted.iter().copied());
                if wanted.len() != (r.end - r.start + 1) as usize {
                    self.skipped.push(r);
                }
                debug!(
                    range = %r,
                    functions = wanted.len(),
                    runs = done.len(),
                    range_dmop = self.pci_range.is_some(),
                    took = ?t0.elapsed(),
                    "PCI functions claimed from Xen"
                );
                Ok(())
            }
        }
    }

    fn unmap_range(&mut self, r: IoRange) -> Result<(), BackendError> {
        match r.kind {
            RangeKind::Port | RangeKind::Mmio => {
                if let Some(i) = self.ranges.iter().position(|x| *x == r) {
                    self.dm
                        .unmap_io_range(
                            self.domid,
                            self.id,
                            r.kind == RangeKind::Mmio,
                            r.start,
                            r.end,
                        )
                        .map_err(|e| range_err(e, r))?;
                    self.ranges.remove(i);
                    debug!(range = %r, "released to Xen");
                    return Ok(());
                }
                if let Some(i) = self.skipped.iter().position(|x| *x == r) {
                    self.skipped.remove(i);
                    return Ok(());
                }
                Err(BackendError::NotMapped(r))
            }
            RangeKind::Pci => {
                let mine: Vec<u32> = self
                    .pci
                    .range(r.start as u32..=r.end as u32)
                    .copied()
                    .collect();
                for (a, b) in runs(mine) {
                    self.unmap_pci_run(a, b).map_err(|e| {
                        range_err(e, IoRange::new(RangeKind::Pci, a.into(), b.into()))
                    })?;
                    for s in a..=b {
                        self.pci.remove(&s);
                    }
                }
                self.skipped.retain(|x| *x != r);
                Ok(())
            }
        }
    }

    fn wait(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<BackendEvent>,
    ) -> Result<(), BackendError> {
        let before = out.len();
        // Work may be waiting already (a slot whose notification an earlier call took):
        // look before sleeping.
        self.take_notifications(false)?;
        self.collect(out);
        if out.len() > before || timeout == Some(Duration::ZERO) {
            return Ok(());
        }
        let readable = self.sleep(timeout)?;
        if readable {
            self.take_notifications(true)?;
        }
        // Also after a timeout or a wake-up: a cheap scan, and nothing can be missed.
        self.collect(out);
        Ok(())
    }

    fn complete(&mut self, vcpu: u32, data: u64) -> Result<(), BackendError> {
        let v = vcpu as usize;
        if v >= self.inflight.len() {
            return Err(BackendError::NoSuchVcpu(vcpu));
        }
        let Some(req) = self.inflight[v].take() else {
            return Err(BackendError::Slot {
                vcpu,
                source: SlotError {
                    actor: Actor::Server,
                    from: IoreqState::None,
                    to: IoreqState::RespReady,
                },
            });
        };
        {
            let (page, _) = self.pages.pages();
            answer(&page, v, &req, data).map_err(|source| BackendError::Slot { vcpu, source })?;
        }
        self.evtchn.notify(self.vcpu_ports[v]).map_err(xen_err)?;
        log_served(vcpu, &req, data);
        Ok(())
    }

    /// `xendevicemodel_inject_msi` on the domain, with the multiplexer's devicemodel handle
    /// (Xen checks only that the caller may act for the domain, not which server asks).
    fn inject_msi(&mut self, addr: u64, data: u32) -> Result<(), BackendError> {
        self.dm.inject_msi(self.domid, addr, data).map_err(msi_err)
    }
}

impl Drop for XenBackend {
    fn drop(&mut self) {
        let (domid, id) = (self.domid, self.id);
        let report = |what: &str, e: &XenError| {
            if gone(e) {
                debug!(domid, id, error = %e, "{what}: the domain is gone");
            } else {
                warn!(domid, id, error = %e, "{what}");
            }
        };
        if self.enabled {
            self.enabled = false;
            if let Err(e) = self.dm.set_ioreq_server_state(self.domid, self.id, false) {
                report("disabling the ioreq server", &e);
            }
        }
        self.answer_stragglers();
        for r in std::mem::take(&mut self.ranges) {
            if let Err(e) = self.dm.unmap_io_range(
                self.domid,
                self.id,
                r.kind == RangeKind::Mmio,
                r.start,
                r.end,
            ) {
                report("releasing a range", &e);
            }
        }
        let pci = std::mem::take(&mut self.pci);
        if self.pci_range.is_some() || pci.len() <= PCI_UNMAP_ONE_BY_ONE_MAX {
            for (a, b) in runs(pci) {
                if let Err(e) = self.unmap_pci_run(a, b) {
                    report("releasing PCI functions", &e);
                }
            }
        } else {
            debug!(
                functions = pci.len(),
                "PCI functions released by destroying the server"
            );
        }
        match self.dm.destroy_ioreq_server(domid, id) {
            Ok(()) => info!(domid, id, "ioreq server destroyed"),
            Err(e) => report("destroying the ioreq server", &e),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ioreq_server::abi::STATE_IOREQ_NONE;
    use ioreq_server::bufioreq::BufSlot;
    use xen_ffi::PageBuf;

    /// Writes a request into slot `v` the way Xen lays it out, state READY.
    fn put(page: &mut PageBuf, v: usize, req: &Ioreq) {
        let mut r = *req;
        r.state = IoreqState::Ready;
        page.bytes()[v * 32..v * 32 + 32].copy_from_slice(&r.to_bytes());
    }

    fn state(page: &mut PageBuf, v: usize) -> u8 {
        page.bytes()[v * 32 + 30] & 0xf
    }

    fn data(page: &mut PageBuf, v: usize) -> u64 {
        let b = &page.bytes()[v * 32 + 8..v * 32 + 16];
        u64::from_le_bytes(b.try_into().unwrap())
    }

    #[test]
    fn ready_slots_are_taken_then_answered() {
        let mut page = PageBuf::new_boxed();
        let cfg = Ioreq::pci_config(abi::pack_sbdf(0, 0, 5, 0), 0, Dir::Read, 4, 0);
        put(&mut page, 1, &cfg);
        let mut inflight = vec![None; 2];
        let mut out = vec![];
        assert!(take_ready(&page.ioreq_page(), &mut inflight, &mut out).is_empty());
        assert_eq!(state(&mut page, 1), STATE_IOREQ_INPROCESS);
        assert_eq!(state(&mut page, 0), STATE_IOREQ_NONE, "slot 0 untouched");
        let BackendEvent::Request { vcpu, req } = out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(
            (vcpu, req.ty, req.addr, req.state),
            (1, IoreqType::PciConfig, cfg.addr, IoreqState::InProcess)
        );
        // Taken once only.
        out.clear();
        take_ready(&page.ioreq_page(), &mut inflight, &mut out);
        assert!(out.is_empty());
        answer(&page.ioreq_page(), 1, &req, 0x1337_1af4).unwrap();
        assert_eq!(state(&mut page, 1), STATE_IORESP_READY);
        assert_eq!(data(&mut page, 1), 0x1337_1af4);
        // A second answer is refused and changes nothing.
        assert!(answer(&page.ioreq_page(), 1, &req, 5).is_err());
        assert_eq!(data(&mut page, 1), 0x1337_1af4);
    }

    #[test]
    fn writes_and_pointer_requests_keep_their_data() {
        let mut page = PageBuf::new_boxed();
        let w = Ioreq::new(IoreqType::Copy, Dir::Write, 0xf100_0010, 4, 0x1234_5678);
        put(&mut page, 0, &w);
        let mut inflight = vec![None];
        let mut out = vec![];
        take_ready(&page.ioreq_page(), &mut inflight, &mut out);
        answer(&page.ioreq_page(), 0, &inflight[0].unwrap(), 0xffff_ffff).unwrap();
        assert_eq!(data(&mut page, 0), 0x1234_5678);
        let mut p = Ioreq::new(IoreqType::Pio, Dir::Read, 0x7700, 1, 0x8000);
        p.data_is_ptr = true;
        p.count = 4;
        put(&mut page, 0, &p);
        out.clear();
        take_ready(&page.ioreq_page(), &mut inflight, &mut out);
        answer(&page.ioreq_page(), 0, &inflight[0].unwrap(), 0xff).unwrap();
        assert_eq!(
            data(&mut page, 0),
            0x8000,
            "a guest buffer address is not overwritten"
        );
    }

    #[test]
    fn undecodable_slot_is_answered_in_place() {
        let mut page = PageBuf::new_boxed();
        let r = Ioreq::new(IoreqType::Pio, Dir::Read, 0x7700, 2, 0);
        put(&mut page, 0, &r);
        page.bytes()[31] = 3; // no such ioreq type
        let mut inflight = vec![None];
        let mut out = vec![];
        assert_eq!(
            take_ready(&page.ioreq_page(), &mut inflight, &mut out),
            vec![0]
        );
        assert!(out.is_empty() && inflight[0].is_none());
        assert_eq!(state(&mut page, 0), STATE_IORESP_READY);
        assert_eq!(data(&mut page, 0), 0xffff);
    }

    fn push_buf(page: &mut PageBuf, w: &mut u32, s: BufSlot) {
        let off = 8 + 8 * (*w % 511) as usize;
        page.bytes()[off..off + 8].copy_from_slice(&s.encode().to_le_bytes());
        *w += 1;
        page.bytes()[4..8].copy_from_slice(&w.to_le_bytes());
    }

    #[test]
    fn ring_drains_in_order_with_eight_byte_pairs() {
        let mut page = PageBuf::new_boxed();
        let mut w = 0u32;
        let slot = |ty: u8, size_code, addr, data| BufSlot {
            ty,
            dir: Dir::Write,
            size_code,
            addr,
            data,
        };
        push_buf(
            &mut page,
            &mut w,
            slot(abi::IOREQ_TYPE_COPY, 0, 0xa0000, 0x11),
        );
        push_buf(
            &mut page,
            &mut w,
            slot(abi::IOREQ_TYPE_TIMEOFFSET, 3, 0, 0x89ab_cdef),
        );
        push_buf(
            &mut page,
            &mut w,
            slot(abi::IOREQ_TYPE_TIMEOFFSET, 3, 0, 0x0123_4567),
        );
        push_buf(&mut page, &mut w, slot(0x55, 0, 0, 0));
        push_buf(
            &mut page,
            &mut w,
            slot(abi::IOREQ_TYPE_PIO, 1, 0x7704, 0xbeef),
        );
        let mut out = vec![];
        assert_eq!(drain_ring(&page.buffered_page(), &mut out), (3, 1));
        let got: Vec<_> = out
            .iter()
            .map(|e| match e {
                BackendEvent::Buffered(r) => (r.ty, r.addr, r.size, r.data),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (IoreqType::Copy, 0xa0000, 1, 0x11),
                (IoreqType::TimeOffset, 0, 8, 0x0123_4567_89ab_cdef),
                (IoreqType::Pio, 0x7704, 2, 0xbeef),
            ]
        );
        assert_eq!(page.buffered_page().pointers(), (5, 5));
        // An unpaired 8-byte entry stays.
        push_buf(&mut page, &mut w, slot(abi::IOREQ_TYPE_COPY, 3, 0xa0000, 1));
        out.clear();
        assert_eq!(drain_ring(&page.buffered_page(), &mut out), (0, 0));
        assert_eq!(page.buffered_page().pointers(), (5, 6));
    }

    #[test]
    fn error_mapping() {
        let r = IoRange::ports(0x7700, 0x770f);
        let call = |errno| XenError::Call {
            func: "xendevicemodel_map_io_range_to_ioreq_server",
            errno,
        };
        assert_eq!(range_err(call(libc::EEXIST), r), BackendError::Overlap(r));
        assert!(matches!(
            range_err(call(libc::ENOSPC), r),
            BackendError::TooManyRanges { limit: 256, .. }
        ));
        assert_eq!(range_err(call(libc::ESRCH), r), BackendError::Disconnected);
        let msi = |errno| XenError::Call {
            func: "xendevicemodel_inject_msi",
            errno,
        };
        let unsupported = BackendError::Unsupported { op: "inject_msi" };
        assert_eq!(msi_err(msi(libc::EOPNOTSUPP)), unsupported);
        assert_eq!(msi_err(msi(libc::ENOSYS)), unsupported);
        assert_eq!(
            msi_err(XenError::MissingSymbol {
                soname: "libxendevicemodel.so.1",
                symbol: "xendevicemodel_inject_msi",
            }),
            unsupported
        );
        assert_eq!(msi_err(msi(libc::ESRCH)), BackendError::Disconnected);
        assert!(matches!(
            msi_err(msi(libc::EINVAL)),
            BackendError::Other(m) if m.starts_with("xendevicemodel_inject_msi failed")
        ));
        assert!(matches!(
            open_error(XenError::NoPrivcmd),
            OpenError::NotXen(_)
        ));
        let e = open_error(XenError::Call {
            func: "xenevtchn_open",
            errno: libc::ENOENT,
        });
        assert!(
            e.to_string()
                .starts_with("not a Xen host: xenevtchn_open failed"),
            "{e}"
        );
        assert!(matches!(
            open_error(XenError::Call {
                func: "xendevicemodel_open",
                errno: libc::EACCES
            }),
            OpenError::Xen { .. }
        ));
    }

    #[test]
    fn runs_of_consecutive_sbdfs() {
        assert_eq!(runs([1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 7), (9, 10)]);
        assert_eq!(runs(0..=0xffff), vec![(0, 0xffff)]);
        assert_eq!(
            runs([u32::MAX - 1, u32::MAX]),
            vec![(u32::MAX - 1, u32::MAX)]
        );
        assert!(runs([]).is_empty());
    }

    #[test]
    fn config_port_range_detection() {
        assert!(XenBackend::is_config_ports(&IoRange::ports(0xcf8, 0xcff)));
        assert!(!XenBackend::is_config_ports(&IoRange::ports(0xcf0, 0xcff)));
        assert!(!XenBackend::is_config_ports(&IoRange::new(
            RangeKind::Mmio,
            0xcf8,
            0xcff
        )));
    }
}
