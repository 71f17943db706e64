//! Dispatch: each request from the hypervisor (port, MMIO, CF8/CFC, ECAM) decoded, run
//! through the intercepts, routed to its owner and completed exactly once; unowned accesses
//! master-abort.

use crate::claims::Ctl;
use crate::layout::log_moves;
use crate::*;
use bdf_router::{ConfigAccess, ConfigPath, Moved, Sbdf, ServerIdx, decode_ecam};
use chipset_intercept::HitList;
use ioreq_server::abi::{self, PCI_CONFIG_ADDRESS_PORT};
use ioreq_server::{
    Backend, BackendError, BackendEvent, Dir, IoRange, Ioreq, IoreqType, size_mask,
};
use std::time::Duration;
use tracing::{debug, trace, warn};

/// What answers a configuration access.
pub(crate) enum ConfigTarget {
    Model(ServerIdx),
    /// Nobody owns the function: master abort.
    Abort,
    /// Past the end of the owner's configuration space (an extended register of a model that
    /// has 256 bytes): reads all ones, writes dropped, the model never sees it.
    Beyond,
    /// A PCI Express port the multiplexer hosts (module `ports`).
    Port,
}

impl<B: Backend> Engine<B> {
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
                    // A request may have changed claims (a model mapped or released a
                    // function): the hosted ports' slots follow before the next one.
                    self.sync_slots();
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

    pub(crate) fn pio(&mut self, vcpu: u32, req: &Ioreq) -> u64 {
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
    pub(crate) fn config_ports(&mut self, vcpu: u32, req: &Ioreq) -> u64 {
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

    pub(crate) fn mmio(&mut self, vcpu: u32, req: &Ioreq) -> u64 {
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
    pub(crate) fn forward(&mut self, o: ServerIdx, vcpu: u32, req: &Ioreq) -> u64 {
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

    pub(crate) fn maps_guest_memory(&self, o: ServerIdx) -> bool {
        self.models
            .get(usize::from(o))
            .and_then(Option::as_ref)
            .and_then(|s| s.grant.as_ref())
            .is_some_and(|g| g.guest_memory)
    }

    pub(crate) fn target(&mut self, acc: &ConfigAccess) -> ConfigTarget {
        match self.router.config_owner(acc.sbdf) {
            Some(o) if o != MUX && acc.reg >= self.config_space(o) => {
                self.stats.beyond_config_space += 1;
                ConfigTarget::Beyond
            }
            Some(o) if self.ports.owns(o) => ConfigTarget::Port,
            Some(o) if o != MUX => ConfigTarget::Model(o),
            _ => ConfigTarget::Abort,
        }
    }

    /// Bytes of configuration space a model's functions have ([`Grant::config_space`]).
    pub(crate) fn config_space(&self, o: ServerIdx) -> u16 {
        self.models
            .get(usize::from(o))
            .and_then(Option::as_ref)
            .and_then(|s| s.grant.as_ref())
            .and_then(|g| g.config_space)
            .unwrap_or(PCIE_CONFIG_SPACE_SIZE)
    }

    /// One configuration access (never crosses a dword).
    pub(crate) fn config(&mut self, vcpu: u32, acc: &ConfigAccess, dir: Dir, data: u64) -> u64 {
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

    pub(crate) fn config_write(
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
            ConfigTarget::Port => self.port_write(acc, data),
            ConfigTarget::Abort => {
                if bytes == all {
                    self.stats.master_aborts += 1;
                    self.note_master_abort(acc.sbdf);
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

    pub(crate) fn config_read(
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
                    self.note_master_abort(acc.sbdf);
                }
                if matches!(target, ConfigTarget::Port) {
                    self.port_read(acc.sbdf, acc.reg, acc.size)
                } else {
                    size_mask(acc.size.into())
                }
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
    pub(crate) fn follow_moves(&mut self, moved: &[Moved]) {
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
    pub(crate) fn forward_write(
        &mut self,
        o: ServerIdx,
        vcpu: u32,
        acc: &ConfigAccess,
        data: u64,
        bytes: u8,
    ) {
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
    pub(crate) fn call(&mut self, o: ServerIdx, vcpu: u32, req: &Ioreq) -> u64 {
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
}

/// One debug line per configuration access decoded from ECAM, in the form of the Xen
/// backend's `served config` lines (which see ECAM accesses as MMIO).
pub(crate) fn log_ecam(vcpu: u32, acc: &ConfigAccess, dir: Dir, data: u64) {
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

/// Master-abort semantics: a read returns all ones, a write is dropped.
pub(crate) fn abort_value(req: &Ioreq) -> u64 {
    if req.dir == Dir::Read {
        size_mask(req.size)
    } else {
        0
    }
}
