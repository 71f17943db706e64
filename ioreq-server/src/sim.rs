//! A simulated hypervisor with Xen 4.17's ioreq-server rules, so the multiplexer runs
//! unchanged without Xen.
//!
//! Rules modelled (xen/common/ioreq.c, xen/arch/x86/hvm/ioreq.c and emulate.c):
//! - at most [`MAX_NR_IOREQ_SERVERS`] servers, ids allocated lowest-free-first; a ninth
//!   create fails (ENOSPC);
//! - one range set per kind per server, at most [`MAX_NR_IO_RANGES`] ranges each; a range that
//!   overlaps one the same server has is refused (EEXIST); different servers are not checked;
//! - selection walks servers from the highest id down, skipping disabled ones; a port range
//!   matches only if it contains `[addr, addr + size - 1]`, an MMIO range only if it contains
//!   every byte of every rep item;
//! - CF8 is latched only by 4-byte writes (which still go to whoever claims port 0xcf8); a
//!   CFC..CFF access while the latch has its enable bit set becomes a PCI_CONFIG request with
//!   `addr = SBDF << 32 | reg`, matched on the SBDF alone;
//! - nobody claims it: reads complete with all ones, writes are dropped;
//! - buffered writes go through the server's ring when it has one (a full ring falls back to
//!   a synchronous request); TIMEOFFSET is a buffered broadcast, INVALIDATE a synchronous one
//!   that every enabled server must complete before the vCPU resumes.
//!
//! Not modelled: devices Xen emulates itself (PIT, PIC, RTC, PM timer...). Everything reaches
//! the servers, so a trace recorded on QEMU replays as QEMU saw it.
//!
//! Sharing, as Xen shares its ioreq page: one lock covers the configuration and the send side
//! of an access (selection, the CF8 latch, filling the slot, setting the event channel's
//! pending flag). The rest of a round trip takes none: the server finds the pending flag and
//! takes the request (READY -> INPROCESS), completes it (-> IORESP_READY) and the vCPU collects
//! it (-> NONE) through atomics, every move checked against the slot state machine
//! ([`crate::slot::AtomicSlot`]). Sleeping is decided under the lock for servers and with a
//! fence on both sides for vCPUs, so no wake-up is lost and nobody spins.
//!
//! An invariant checker runs all the time: every issued request is completed exactly once, no
//! slot moves illegally, and no vCPU waits past the deadline. [`SimHypervisor::check`]
//! reports any violation.

use crate::abi::{self, AbiError, PCI_CONFIG_ADDRESS_PORT, RawIoreq};
use crate::bufioreq::{BufferedIoPage, BufioreqMode};
use crate::ioreq::{Dir, Ioreq, IoreqState, IoreqType, size_mask};
use crate::model::{Backend, BackendError, BackendEvent};
use crate::range::{IoRange, RangeKind};
use crate::slot::{Actor, AtomicSlot};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, fence};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use thiserror::Error;

pub use crate::abi::{MAX_NR_IO_RANGES, MAX_NR_IOREQ_SERVERS};

/// The range set already has its limit of ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeLimit;

/// Why a range could not be removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveError {
    /// `[s, e]` is not inside one range of the set.
    NotMapped,
    /// Removing it would split a range and exceed the limit.
    Limit,
}

/// A range set the way Xen keeps one: sorted, adjacent ranges merged, a limit on the count.
#[derive(Debug, Clone, Default)]
pub struct XenRangeSet {
    ranges: Vec<(u64, u64)>,
}

impl XenRangeSet {
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    pub fn overlaps(&self, s: u64, e: u64) -> bool {
        let i = self.ranges.partition_point(|&(_, end)| end < s);
        i < self.ranges.len() && self.ranges[i].0 <= e
    }

    /// Binary search: does one range contain all of `[s, e]`?
    pub fn contains(&self, s: u64, e: u64) -> bool {
        let i = self.ranges.partition_point(|&(_, end)| end < s);
        i < self.ranges.len() && self.ranges[i].0 <= s && e <= self.ranges[i].1
    }

    /// The linear walk Xen's `rangeset_contains_range` does (kept for the benchmark baseline).
    pub fn contains_linear(&self, s: u64, e: u64) -> bool {
        for &(rs, re) in &self.ranges {
            if rs > s {
                return false;
            }
            if e <= re {
                return true;
            }
        }
        false
    }

    /// Adds a range that overlaps nothing, merging with neighbours it touches.
    pub fn add(&mut self, s: u64, e: u64, limit: usize) -> Result<(), RangeLimit> {
        let i = self.ranges.partition_point(|&(_, end)| end < s);
        let touches_prev = i > 0 && self.ranges[i - 1].1.checked_add(1) == Some(s);
        let touches_next = i < self.ranges.len() && e.checked_add(1) == Some(self.ranges[i].0);
        match (touches_prev, touches_next) {
            (true, true) => {
                self.ranges[i - 1].1 = self.ranges[i].1;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].1 = e,
            (false, true) => self.ranges[i].0 = s,
            (false, false) => {
                if self.ranges.len() >= limit {
                    return Err(RangeLimit);
                }
                self.ranges.insert(i, (s, e));
            }
        }
        Ok(())
    }

    /// Removes `[s, e]`, which must lie inside one range (splitting it if needed).
    pub fn remove(&mut self, s: u64, e: u64, limit: usize) -> Result<(), RemoveError> {
        let i = self.ranges.partition_point(|&(_, end)| end < s);
        if i >= self.ranges.len() || self.ranges[i].0 > s || self.ranges[i].1 < e {
            return Err(RemoveError::NotMapped);
        }
        let (rs, re) = self.ranges[i];
        match (rs == s, re == e) {
            (true, true) => {
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i].0 = e + 1,
            (false, true) => self.ranges[i].1 = s - 1,
            (false, false) => {
                if self.ranges.len() >= limit {
                    return Err(RemoveError::Limit);
                }
                self.ranges[i].1 = s - 1;
                self.ranges.insert(i + 1, (e + 1, re));
            }
        }
        Ok(())
    }
}

/// What the guest side of the simulation can get back.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SimError {
    #[error("vCPU {0} does not exist")]
    NoSuchVcpu(u32),
    #[error("vCPU {0} already has an access in flight")]
    Busy(u32),
    #[error("vCPU {vcpu} waited more than {after:?} for its ioreq")]
    Deadline { vcpu: u32, after: Duration },
    #[error("server {server} slot of vCPU {vcpu} is in state {state:?}, not NONE (bad IO state)")]
    BadIoState {
        server: u16,
        vcpu: u32,
        state: IoreqState,
    },
    #[error("server {server} changed vp_eport of vCPU {vcpu} (bad event channel)")]
    BadEventChannel { server: u16, vcpu: u32 },
    #[error("no such server {0}")]
    NoSuchServer(u16),
    #[error("too many ioreq servers (ENOSPC)")]
    TooManyServers,
    #[error("malformed guest access: {0}")]
    Malformed(String),
}

/// A rule of the ioreq protocol broken, as the simulated hypervisor saw it
/// ([`SimHypervisor::check_violations`]). `Display` gives the message; serialized with its
/// `kind` (snake_case) and its fields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Violation {
    /// A new request found the vCPU's slot not free: server `server` left it in `state`
    /// (Xen's "bad IO state").
    BadIoState {
        server: u16,
        vcpu: u32,
        state: IoreqState,
    },
    /// Server `server` changed the vCPU's event channel port in the shared page.
    EventChannelChanged { server: u16, vcpu: u32 },
    /// The vCPU waited for its answer past the deadline.
    Deadline { vcpu: u32, deadline_ms: u64 },
    /// At the end, the vCPU still waits on these servers.
    StillWaiting { vcpu: u32, servers: Vec<u16> },
    /// More completions collected than requests sent.
    ExtraCompletions { completed: u64, sent: u64 },
    /// A server's buffered ring could not be read.
    BufferedRing { error: String },
    /// A server completed a vCPU whose slot did not hold a request in process.
    BadCompletion { vcpu: u32, error: String },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::BadIoState {
                server,
                vcpu,
                state,
            } => write!(
                f,
                "server {server} left vCPU {vcpu}'s slot in {state:?} (bad IO state)"
            ),
            Violation::EventChannelChanged { server, vcpu } => {
                write!(f, "server {server} changed vp_eport of vCPU {vcpu}")
            }
            Violation::Deadline { vcpu, deadline_ms } => write!(
                f,
                "vCPU {vcpu} waited more than {:?}",
                Duration::from_millis(*deadline_ms)
            ),
            Violation::StillWaiting { vcpu, servers } => {
                write!(f, "vCPU {vcpu} still waits on servers {servers:?}")
            }
            Violation::ExtraCompletions { completed, sent } => {
                write!(f, "{completed} completions for {sent} requests")
            }
            Violation::BufferedRing { error } => write!(f, "buffered ring: {error}"),
            Violation::BadCompletion { vcpu, error } => {
                write!(f, "server completed vCPU {vcpu}: {error}")
            }
        }
    }
}

/// Counters the simulation keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SimStats {
    /// Synchronous requests sent to servers.
    pub sent: u64,
    /// Synchronous requests completed by servers and collected by vCPUs.
    pub completed: u64,
    /// Accesses nobody claimed (reads all ones, writes dropped).
    pub unclaimed: u64,
    /// Writes that went through a buffered ring.
    pub buffered: u64,
    /// Accesses the hypervisor converted from CFC to PCI_CONFIG.
    pub cf8_converted: u64,
}

/// A message-signalled interrupt a server sent the guest ([`Backend::inject_msi`], Xen's
/// `XEN_DMOP_inject_msi`): recorded in order, for tests to read
/// ([`SimHypervisor::injected_msis`]). The simulated guest has no interrupt controller, so
/// nothing else happens to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectedMsi {
    /// The server that sent it.
    pub server: u16,
    /// Message Address (PCIe base spec 4.0, 7.7.1.3-4).
    pub addr: u64,
    /// Message Data (7.7.1.5).
    pub data: u32,
}

/// One vCPU's slot in a server's ioreq page: the state and the request, each field its own
/// atomic so the hypervisor and the server use it without a lock, as they share Xen's page.
/// Who writes what follows the state ([`AtomicSlot`]): the hypervisor fills the request while
/// the slot is NONE, the server writes `data` while it is INPROCESS, and the release store of
/// the next state publishes those writes to the other side.
#[derive(Debug, Default)]
struct SlotCell {
    slot: AtomicSlot,
    addr: AtomicU64,
    data: AtomicU64,
    count: AtomicU32,
    size: AtomicU32,
    /// Written by Xen when the vCPU is added; a hostile server may overwrite it.
    vp_eport: AtomicU32,
    /// The `ioreq_t` flags byte without the state (data_is_ptr, dir, df).
    flags: AtomicU8,
    ty: AtomicU8,
}

impl SlotCell {
    /// The hypervisor fills the slot (while it is NONE: the slot is the hypervisor's).
    fn fill(&self, req: &Ioreq) {
        let raw = req.to_raw();
        self.addr.store(raw.addr, Relaxed);
        self.data.store(raw.data, Relaxed);
        self.count.store(raw.count, Relaxed);
        self.size.store(raw.size, Relaxed);
        self.flags.store(raw.flags & !abi::FLAG_STATE_MASK, Relaxed);
        self.ty.store(raw.ty, Relaxed);
    }

    /// The request in the slot, as the given state.
    fn request(&self, state: IoreqState) -> Result<Ioreq, AbiError> {
        Ioreq::from_raw(&RawIoreq {
            addr: self.addr.load(Relaxed),
            data: self.data.load(Relaxed),
            count: self.count.load(Relaxed),
            size: self.size.load(Relaxed),
            vp_eport: self.vp_eport.load(Relaxed),
            pad0: 0,
            flags: self.flags.load(Relaxed) | state as u8,
            ty: self.ty.load(Relaxed),
        })
    }

    fn is_read(&self) -> bool {
        self.flags.load(Relaxed) & abi::FLAG_DIR_READ != 0
    }

    /// A read the server answers with a value (not through a guest buffer).
    fn takes_data(&self) -> bool {
        self.flags.load(Relaxed) & (abi::FLAG_DIR_READ | abi::FLAG_DATA_IS_PTR)
            == abi::FLAG_DIR_READ
    }
}

/// What one server id shares with the hypervisor outside the lock: its ioreq page (a slot per
/// vCPU) and its event channels' pending flags. Reused when the id is, under a new generation.
#[derive(Debug)]
struct Port {
    /// Odd while a server has this id; bumped by create and destroy. A backend or a waiting
    /// vCPU that holds another generation deals with a server that is gone.
    generation: AtomicU64,
    slots: Box<[SlotCell]>,
    /// One event channel per vCPU: set by the hypervisor after it filled the slot, cleared by
    /// the server before it looks at the slot. Plain stores suffice: the hypervisor sets it
    /// again only after the vCPU collected, which needs the server to have taken the slot.
    pending: Box<[AtomicBool]>,
    /// The buffered ring's event channel: set after a push, cleared before a drain.
    buffered_pending: AtomicBool,
}

impl Port {
    fn new(nr_vcpus: u32) -> Self {
        Port {
            generation: AtomicU64::new(0),
            slots: (0..nr_vcpus).map(|_| SlotCell::default()).collect(),
            pending: (0..nr_vcpus).map(|_| AtomicBool::new(false)).collect(),
            buffered_pending: AtomicBool::new(false),
        }
    }

    /// A new server takes the id: every slot free, its event channel written in.
    fn reset(&self, eports: &[u32]) -> u64 {
        for ((cell, p), &eport) in self.slots.iter().zip(&*self.pending).zip(eports) {
            cell.slot.reset();
            cell.vp_eport.store(eport, Relaxed);
            p.store(false, Relaxed);
        }
        self.buffered_pending.store(false, Relaxed);
        self.generation.fetch_add(1, Release) + 1
    }

    fn has_events(&self) -> bool {
        self.buffered_pending.load(Acquire) || self.pending.iter().any(|p| p.load(Acquire))
    }
}

#[derive(Debug)]
struct SimServer {
    enabled: bool,
    ranges: [XenRangeSet; 3],
    eports: Vec<u32>,
    ring: Arc<BufferedIoPage>,
    mode: BufioreqMode,
    /// The server sleeps in `wait`: ring its doorbell.
    sleeping: bool,
    doorbell: Sender<()>,
}

impl SimServer {
    /// After setting a pending flag: the doorbell rings only when the server is asleep (so a
    /// single-threaded driver pays no channel traffic). Both sides decide under the lock.
    fn ring_if_sleeping(&mut self) {
        if std::mem::take(&mut self.sleeping) {
            let _ = self.doorbell.send(());
        }
    }
}

/// One vCPU, outside the lock. Its own thread (a vCPU is one thread) writes `waiting_on`,
/// `waiting_gen`, `value` and `completed`, in `issue` and `collect`.
#[derive(Debug)]
struct VcpuCell {
    /// Bit i: server i's slot for this vCPU holds our request.
    waiting_on: AtomicU8,
    /// The generation of each server waited on.
    waiting_gen: [AtomicU64; MAX_NR_IOREQ_SERVERS],
    /// Value collected so far (read accesses).
    value: AtomicU64,
    /// What the access reads if its server is destroyed (all ones for a read).
    if_gone: AtomicU64,
    /// Requests of this vCPU completed and collected.
    completed: AtomicU64,
    /// A thread sleeps in `wait_collect` for this vCPU.
    sleeping: AtomicBool,
    done: (Sender<()>, Receiver<()>),
}

impl VcpuCell {
    fn new() -> Self {
        VcpuCell {
            waiting_on: AtomicU8::new(0),
            waiting_gen: Default::default(),
            value: AtomicU64::new(0),
            if_gone: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            sleeping: AtomicBool::new(false),
            done: unbounded(),
        }
    }

    /// One more completion (only this vCPU's thread counts: no read-modify-write).
    fn count_completed(&self) {
        self.completed
            .store(self.completed.load(Relaxed) + 1, Relaxed);
    }

    /// After a change the vCPU may be waiting for: wake it if it sleeps. The fence pairs with
    /// the one in `wait_collect` (the sleeper announces itself, fences, and looks again).
    fn wake(&self) {
        fence(SeqCst);
        if self.sleeping.load(Relaxed) && self.sleeping.swap(false, SeqCst) {
            let _ = self.done.0.send(());
        }
    }
}

#[derive(Debug)]
struct State {
    cf8: u32,
    servers: Vec<Option<SimServer>>,
    /// Counters except `completed` (counted per vCPU).
    stats: SimStats,
    violations: Vec<Violation>,
    /// Every MSI servers injected, in order.
    msis: Vec<InjectedMsi>,
}

/// What the hypervisor keeps. The lock covers configuration and the send side (selection,
/// the CF8 latch, filling a slot); the rest of a round trip -- the server taking the request
/// and completing it, the vCPU collecting it -- goes through [`Port`] and [`VcpuCell`].
#[derive(Debug)]
struct Shared {
    st: Mutex<State>,
    ports: Box<[Port]>,
    vcpus: Box<[VcpuCell]>,
    deadline: Duration,
    nr_vcpus: u32,
}

/// The simulated hypervisor. Cheap to clone; clones share state (vCPU threads and server
/// threads use their own clones).
#[derive(Debug, Clone)]
pub struct SimHypervisor {
    sh: Arc<Shared>,
}

/// Result of starting a guest access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issued {
    /// Finished without a server (unclaimed, or buffered): the value for a read.
    Done(u64),
    /// Waiting for a server; collect with [`SimHypervisor::collect`] once it has completed.
    Pending,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread must not wedge every other vCPU: take the state anyway.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimHypervisor {
    /// A guest with `nr_vcpus` vCPUs; a vCPU waiting longer than `deadline` for a server is
    /// an invariant violation.
    pub fn new(nr_vcpus: u32, deadline: Duration) -> Self {
        let st = State {
            cf8: 0,
            servers: (0..MAX_NR_IOREQ_SERVERS).map(|_| None).collect(),
            stats: SimStats::default(),
            violations: vec![],
            msis: vec![],
        };
        SimHypervisor {
            sh: Arc::new(Shared {
                st: Mutex::new(st),
                ports: (0..MAX_NR_IOREQ_SERVERS)
                    .map(|_| Port::new(nr_vcpus))
                    .collect(),
                vcpus: (0..nr_vcpus).map(|_| VcpuCell::new()).collect(),
                deadline,
                nr_vcpus,
            }),
        }
    }

    pub fn nr_vcpus(&self) -> u32 {
        self.sh.nr_vcpus
    }

    fn vcpu(&self, vcpu: u32) -> Result<&VcpuCell, SimError> {
        self.sh
            .vcpus
            .get(vcpu as usize)
            .ok_or(SimError::NoSuchVcpu(vcpu))
    }

    /// `create_ioreq_server`: returns the server's backend end. The server starts disabled.
    pub fn create_server(&self, mode: BufioreqMode) -> Result<SimBackend, SimError> {
        let mut st = lock(&self.sh.st);
        let id = st
            .servers
            .iter()
            .position(Option::is_none)
            .ok_or(SimError::TooManyServers)?;
        let (tx, rx) = unbounded();
        // Xen writes each vCPU's event channel into its slot when the vCPU is added.
        let eports: Vec<u32> = (0..self.sh.nr_vcpus)
            .map(|v| 1000 + id as u32 * 256 + v)
            .collect();
        let generation = self.sh.ports[id].reset(&eports);
        let ring = Arc::new(BufferedIoPage::default());
        st.servers[id] = Some(SimServer {
            enabled: false,
            ranges: Default::default(),
            eports,
            ring: ring.clone(),
            mode,
            sleeping: false,
            doorbell: tx,
        });
        Ok(SimBackend {
            hv: self.clone(),
            id: id as u16,
            generation,
            ring,
            rx,
        })
    }

    /// `set_ioreq_server_state`.
    pub fn set_server_enabled(&self, id: u16, enabled: bool) -> Result<(), SimError> {
        let mut st = lock(&self.sh.st);
        let s = st
            .servers
            .get_mut(usize::from(id))
            .and_then(Option::as_mut)
            .ok_or(SimError::NoSuchServer(id))?;
        s.enabled = enabled;
        Ok(())
    }

    /// `destroy_ioreq_server`: requests still in its slots complete as if unclaimed, so no
    /// vCPU is left waiting (each sees the generation change when it collects).
    pub fn destroy_server(&self, id: u16) -> Result<(), SimError> {
        let mut st = lock(&self.sh.st);
        st.servers
            .get_mut(usize::from(id))
            .and_then(Option::take)
            .ok_or(SimError::NoSuchServer(id))?;
        self.sh.ports[usize::from(id)]
            .generation
            .fetch_add(1, Release);
        for vs in self.sh.vcpus.iter() {
            if vs.waiting_on.load(Relaxed) & (1 << id) != 0 {
                vs.wake();
            }
        }
        Ok(())
    }

    /// Starts a guest access (`req.ty` is PIO or COPY; `state` is ignored). With `buffered`,
    /// a write the target server can take through its ring goes there.
    pub fn issue(&self, vcpu: u32, req: &Ioreq, buffered: bool) -> Result<Issued, SimError> {
        if vcpu >= self.sh.nr_vcpus {
            return Err(SimError::NoSuchVcpu(vcpu));
        }
        if !matches!(req.ty, IoreqType::Pio | IoreqType::Copy) {
            return Err(SimError::Malformed(format!(
                "guest accesses are PIO or COPY, not {:?}",
                req.ty
            )));
        }
        let mut req = *req;
        req.validate()
            .map_err(|e| SimError::Malformed(e.to_string()))?;
        let mut st = lock(&self.sh.st);
        let st = &mut *st;
        if self.busy(&self.sh.vcpus[vcpu as usize]) {
            return Err(SimError::Busy(vcpu));
        }
        let (kind, s, e) = Self::latch_and_convert(st, &mut req);
        let found = (0..MAX_NR_IOREQ_SERVERS).rev().find(|&id| {
            st.servers[id]
                .as_ref()
                .is_some_and(|srv| srv.enabled && srv.ranges[kind.index()].contains(s, e))
        });
        let Some(id) = found else {
            st.stats.unclaimed += 1;
            return Ok(Issued::Done(if req.dir == Dir::Read {
                size_mask(req.size)
            } else {
                0
            }));
        };
        if buffered && self.push_buffered(st, id, &req) {
            return Ok(Issued::Done(0));
        }
        self.send_sync(st, id as u16, vcpu, req)?;
        Ok(Issued::Pending)
    }

    /// The CF8 latch (4-byte writes only, hvm_access_cf8; the write still goes on to whoever
    /// claims the port) and the CFC conversion to PCI_CONFIG. Returns what selection matches:
    /// the range kind and the first and last item.
    fn latch_and_convert(st: &mut State, req: &mut Ioreq) -> (RangeKind, u64, u64) {
        if req.ty == IoreqType::Pio
            && req.addr == u64::from(PCI_CONFIG_ADDRESS_PORT)
            && req.size == 4
            && req.dir == Dir::Write
            && !req.data_is_ptr
        {
            st.cf8 = req.data as u32;
        }
        if req.ty == IoreqType::Pio && !req.data_is_ptr && req.count == 1 {
            if let Some((sbdf, reg)) = abi::cf8_decode(st.cf8, req.addr as u16, req.size) {
                req.ty = IoreqType::PciConfig;
                req.addr = abi::pci_config_addr(sbdf, reg);
                st.stats.cf8_converted += 1;
                return (RangeKind::Pci, u64::from(sbdf), u64::from(sbdf));
            }
        }
        req.selection_span()
    }

    /// A write through server `id`'s ring, if it has one and the ring takes it.
    fn push_buffered(&self, st: &mut State, id: usize, req: &Ioreq) -> bool {
        let Some(srv) = st.servers[id].as_mut() else {
            return false;
        };
        if srv.mode == BufioreqMode::Off || srv.ring.push(req, srv.mode).is_err() {
            return false;
        }
        st.stats.buffered += 1;
        self.sh.ports[id].buffered_pending.store(true, Release);
        srv.ring_if_sleeping();
        true
    }

    fn send_sync(
        &self,
        st: &mut State,
        id: u16,
        vcpu: u32,
        mut req: Ioreq,
    ) -> Result<(), SimError> {
        let Some(srv) = st.servers[usize::from(id)].as_mut() else {
            return Err(SimError::NoSuchServer(id));
        };
        let port = &self.sh.ports[usize::from(id)];
        let cell = &port.slots[vcpu as usize];
        let eport = srv.eports[vcpu as usize];
        // Xen checks the state first ("bad IO state"), then the event channel.
        if let Err(e) = cell.slot.check(Actor::Hypervisor, IoreqState::Ready) {
            st.violations.push(Violation::BadIoState {
                server: id,
                vcpu,
                state: e.from,
            });
            return Err(SimError::BadIoState {
                server: id,
                vcpu,
                state: e.from,
            });
        }
        if cell.vp_eport.load(Relaxed) != eport {
            st.violations
                .push(Violation::EventChannelChanged { server: id, vcpu });
            return Err(SimError::BadEventChannel { server: id, vcpu });
        }
        req.vp_eport = eport;
        cell.fill(&req);
        cell.slot
            .advance(Actor::Hypervisor, IoreqState::Ready)
            .map_err(|e| SimError::Malformed(e.to_string()))?;
        port.pending[vcpu as usize].store(true, Release);
        srv.ring_if_sleeping();
        st.stats.sent += 1;
        let vs = &self.sh.vcpus[vcpu as usize];
        vs.waiting_gen[usize::from(id)].store(port.generation.load(Relaxed), Relaxed);
        vs.waiting_on
            .store(vs.waiting_on.load(Relaxed) | 1 << id, Relaxed);
        vs.value.store(0, Relaxed);
        let gone = if req.dir == Dir::Read {
            size_mask(req.size)
        } else {
            0
        };
        vs.if_gone.store(gone, Relaxed);
        Ok(())
    }

    /// INVALIDATE: a synchronous broadcast to every enabled server.
    pub fn issue_invalidate(&self, vcpu: u32) -> Result<Issued, SimError> {
        let mut st = lock(&self.sh.st);
        let st = &mut *st;
        if self.busy(self.vcpu(vcpu)?) {
            return Err(SimError::Busy(vcpu));
        }
        let ids: Vec<u16> = (0..MAX_NR_IOREQ_SERVERS as u16)
            .filter(|&i| {
                st.servers[usize::from(i)]
                    .as_ref()
                    .is_some_and(|s| s.enabled)
            })
            .collect();
        if ids.is_empty() {
            return Ok(Issued::Done(0));
        }
        for id in ids {
            let req = Ioreq::new(IoreqType::Invalidate, Dir::Write, 0, 0, 0);
            self.send_sync(st, id, vcpu, req)?;
        }
        Ok(Issued::Pending)
    }

    /// TIMEOFFSET: a buffered broadcast (8 bytes, two slots) to every enabled server with a
    /// ring. Returns how many servers got it.
    pub fn send_timeoffset(&self, offset: u64) -> usize {
        let mut st = lock(&self.sh.st);
        let mut n = 0;
        for (id, s) in st.servers.iter_mut().enumerate() {
            let Some(s) = s.as_mut().filter(|s| s.enabled) else {
                continue;
            };
            let req = Ioreq::new(IoreqType::TimeOffset, Dir::Write, 0, 8, offset);
            if s.ring.push(&req, s.mode).is_ok() {
                self.sh.ports[id].buffered_pending.store(true, Release);
                s.ring_if_sleeping();
                n += 1;
            }
        }
        st.stats.buffered += n as u64;
        n
    }

    /// Collects a pending access once every server it went to has completed it: the slot goes
    /// back to NONE and the read value is returned. `None` while still waiting. Takes no lock:
    /// the slots are read as Xen reads its shared page.
    pub fn collect(&self, vcpu: u32) -> Result<Option<u64>, SimError> {
        let vs = self.vcpu(vcpu)?;
        let mut waiting = vs.waiting_on.load(Relaxed);
        for id in 0..MAX_NR_IOREQ_SERVERS {
            if waiting & (1 << id) != 0 && self.collect_from(vs, id, vcpu) {
                waiting &= !(1 << id);
            }
        }
        vs.waiting_on.store(waiting, Relaxed);
        Ok((waiting == 0).then(|| vs.value.load(Relaxed)))
    }

    /// Server `id`'s part of the pending access of `vcpu`: true once it is over (completed and
    /// collected, or the server is gone).
    fn collect_from(&self, vs: &VcpuCell, id: usize, vcpu: u32) -> bool {
        let port = &self.sh.ports[id];
        if port.generation.load(Acquire) != vs.waiting_gen[id].load(Relaxed) {
            // Destroyed: completes as if unclaimed.
            if vs.if_gone.load(Relaxed) != 0 {
                vs.value.store(vs.if_gone.load(Relaxed), Relaxed);
            }
            vs.count_completed();
            return true;
        }
        let cell = &port.slots[vcpu as usize];
        if cell.slot.state() != IoreqState::RespReady {
            return false;
        }
        if cell.is_read() {
            let mask = size_mask(cell.size.load(Relaxed));
            vs.value.store(cell.data.load(Relaxed) & mask, Relaxed);
        }
        if cell
            .slot
            .advance(Actor::Hypervisor, IoreqState::None)
            .is_ok()
        {
            vs.count_completed();
        }
        true
    }

    /// A whole access, blocking until a server (on another thread) completes it. A vCPU that
    /// waits past the deadline is an invariant violation and gets [`SimError::Deadline`].
    pub fn access(&self, vcpu: u32, req: &Ioreq) -> Result<u64, SimError> {
        match self.issue(vcpu, req, false)? {
            Issued::Done(v) => Ok(v),
            Issued::Pending => self.wait_collect(vcpu),
        }
    }

    /// Blocks until the pending access of `vcpu` completes (or the deadline passes).
    pub fn wait_collect(&self, vcpu: u32) -> Result<u64, SimError> {
        let start = Instant::now();
        let vs = self.vcpu(vcpu)?;
        loop {
            if let Some(v) = self.collect(vcpu)? {
                return Ok(v);
            }
            // Say we sleep, then look again: a completion after the fence sees the flag (it
            // fences too, in `VcpuCell::wake`), one before it is collected here.
            vs.sleeping.store(true, Relaxed);
            fence(SeqCst);
            if let Some(v) = self.collect(vcpu)? {
                vs.sleeping.store(false, Relaxed);
                return Ok(v);
            }
            let left = self.sh.deadline.saturating_sub(start.elapsed());
            match vs.done.1.recv_timeout(left) {
                Ok(()) => {}
                Err(RecvTimeoutError::Timeout) => {
                    vs.sleeping.store(false, Relaxed);
                    lock(&self.sh.st).violations.push(Violation::Deadline {
                        vcpu,
                        deadline_ms: self.sh.deadline.as_millis() as u64,
                    });
                    return Err(SimError::Deadline {
                        vcpu,
                        after: self.sh.deadline,
                    });
                }
                Err(RecvTimeoutError::Disconnected) => return Err(SimError::NoSuchVcpu(vcpu)),
            }
        }
    }

    pub fn stats(&self) -> SimStats {
        let mut s = lock(&self.sh.st).stats.clone();
        s.completed = self
            .sh
            .vcpus
            .iter()
            .map(|v| v.completed.load(Relaxed))
            .sum();
        s
    }

    /// The latched CF8 value.
    pub fn cf8(&self) -> u32 {
        lock(&self.sh.st).cf8
    }

    /// Ranges a server has, by kind (for tests and `inspect`).
    pub fn server_ranges(&self, id: u16, kind: RangeKind) -> Vec<(u64, u64)> {
        lock(&self.sh.st)
            .servers
            .get(usize::from(id))
            .and_then(Option::as_ref)
            .map(|s| s.ranges[kind.index()].ranges().to_vec())
            .unwrap_or_default()
    }

    /// The servers (bits) a vCPU still waits on: a destroyed one is over.
    fn live_waits(&self, vs: &VcpuCell) -> u8 {
        let waiting = vs.waiting_on.load(Relaxed);
        (0..MAX_NR_IOREQ_SERVERS)
            .filter(|&id| {
                waiting & (1 << id) != 0
                    && self.sh.ports[id].generation.load(Acquire)
                        == vs.waiting_gen[id].load(Relaxed)
            })
            .fold(0, |m, id| m | 1 << id)
    }

    /// Has the vCPU an access in flight? Parts of it whose server was destroyed are complete,
    /// as if unclaimed, and forgotten here if the vCPU never collected them.
    fn busy(&self, vs: &VcpuCell) -> bool {
        let waiting = vs.waiting_on.load(Relaxed);
        if waiting == 0 {
            return false;
        }
        let live = self.live_waits(vs);
        for _ in 0..(waiting & !live).count_ones() {
            vs.count_completed();
        }
        vs.waiting_on.store(live, Relaxed);
        live != 0
    }

    /// The MSIs servers injected so far, oldest first.
    pub fn injected_msis(&self) -> Vec<InjectedMsi> {
        lock(&self.sh.st).msis.clone()
    }

    /// The invariant checker: Ok when nothing was lost or doubled, no slot moved illegally and
    /// no vCPU is still waiting; otherwise every violation seen, as messages.
    pub fn check(&self) -> Result<SimStats, Vec<String>> {
        self.check_violations()
            .map_err(|v| v.iter().map(ToString::to_string).collect())
    }

    /// [`Self::check`] with each violation as what it is and its facts.
    pub fn check_violations(&self) -> Result<SimStats, Vec<Violation>> {
        let stats = self.stats();
        let mut v = lock(&self.sh.st).violations.clone();
        for (i, vs) in self.sh.vcpus.iter().enumerate() {
            let live = self.live_waits(vs);
            let servers: Vec<u16> = (0..MAX_NR_IOREQ_SERVERS as u16)
                .filter(|id| live & (1 << id) != 0)
                .collect();
            if !servers.is_empty() {
                v.push(Violation::StillWaiting {
                    vcpu: i as u32,
                    servers,
                });
            }
        }
        if stats.completed > stats.sent {
            v.push(Violation::ExtraCompletions {
                completed: stats.completed,
                sent: stats.sent,
            });
        }
        if v.is_empty() { Ok(stats) } else { Err(v) }
    }
}

/// One server's end of the simulated hypervisor.
#[derive(Debug)]
pub struct SimBackend {
    hv: SimHypervisor,
    id: u16,
    /// The generation of the server id this backend was created with.
    generation: u64,
    ring: Arc<BufferedIoPage>,
    rx: Receiver<()>,
}

impl SimBackend {
    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn hypervisor(&self) -> &SimHypervisor {
        &self.hv
    }

    /// `set_ioreq_server_state` for this server.
    pub fn set_enabled(&self, enabled: bool) -> Result<(), SimError> {
        self.hv.set_server_enabled(self.id, enabled)
    }

    /// Test hook for hostile-server tests: overwrite the vp_eport in a slot.
    pub fn write_vp_eport(&self, vcpu: u32, port: u32) {
        if let Ok(p) = self.port() {
            if let Some(cell) = p.slots.get(vcpu as usize) {
                cell.vp_eport.store(port, Relaxed);
            }
        }
    }

    /// This server's page and event channels, while the server exists.
    fn port(&self) -> Result<&Port, BackendError> {
        let p = &self.hv.sh.ports[usize::from(self.id)];
        if p.generation.load(Acquire) == self.generation {
            Ok(p)
        } else {
            Err(BackendError::Disconnected)
        }
    }

    fn with_server<T>(
        &self,
        f: impl FnOnce(&mut SimServer) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let mut st = lock(&self.hv.sh.st);
        self.port()?;
        let srv = st.servers[usize::from(self.id)]
            .as_mut()
            .ok_or(BackendError::Disconnected)?;
        f(srv)
    }

    /// What the event channels say, without the lock: the ring first (writes queued before a
    /// synchronous request stay before it), then each notified vCPU's slot. True if any
    /// channel had something.
    fn take_events(&self, out: &mut Vec<BackendEvent>) -> Result<bool, BackendError> {
        let port = self.port()?;
        let mut any = false;
        if port.buffered_pending.load(Acquire) {
            port.buffered_pending.store(false, Relaxed);
            any = true;
        }
        if any || self.ring.pending() != 0 {
            self.drain_ring(out);
        }
        for (v, p) in port.pending.iter().enumerate() {
            if p.load(Acquire) {
                p.store(false, Relaxed);
                any = true;
                self.take_request(port, v as u32, out)?;
            }
        }
        Ok(any)
    }

    fn drain_ring(&self, out: &mut Vec<BackendEvent>) {
        if let Err(e) = self.ring.drain(|r| out.push(BackendEvent::Buffered(r))) {
            lock(&self.hv.sh.st)
                .violations
                .push(Violation::BufferedRing {
                    error: e.to_string(),
                });
        }
    }

    /// READY -> INPROCESS for a notified vCPU, and the request as an event. The request is
    /// built from the slot's fields, never read back from a store just made.
    fn take_request(
        &self,
        port: &Port,
        vcpu: u32,
        out: &mut Vec<BackendEvent>,
    ) -> Result<(), BackendError> {
        let cell = &port.slots[vcpu as usize];
        if cell.slot.state() != IoreqState::Ready {
            return Ok(());
        }
        let req = cell
            .request(IoreqState::InProcess)
            .map_err(|e| BackendError::Other(format!("slot of vCPU {vcpu}: {e}")))?;
        cell.slot
            .advance(Actor::Server, IoreqState::InProcess)
            .map_err(|source| BackendError::Slot { vcpu, source })?;
        out.push(BackendEvent::Request { vcpu, req });
        Ok(())
    }

    /// Sleeps until the doorbell rings or `left` passes, unless an event came in meanwhile.
    /// The decision to sleep is taken under the lock, where the hypervisor sets the flags.
    fn sleep(&self, left: Option<Duration>) -> Result<(), BackendError> {
        // Doorbells rung for an earlier sleep that ended by itself.
        while self.rx.try_recv().is_ok() {}
        {
            let mut st = lock(&self.hv.sh.st);
            let port = self.port()?;
            let srv = st.servers[usize::from(self.id)]
                .as_mut()
                .ok_or(BackendError::Disconnected)?;
            if port.has_events() || self.ring.pending() != 0 {
                return Ok(());
            }
            srv.sleeping = true;
        }
        match left {
            None => self.rx.recv().map_err(|_| BackendError::Disconnected),
            Some(l) => match self.rx.recv_timeout(l) {
                Ok(()) => Ok(()),
                Err(RecvTimeoutError::Timeout) => {
                    let mut st = lock(&self.hv.sh.st);
                    if let Some(s) = st.servers[usize::from(self.id)].as_mut() {
                        s.sleeping = false;
                    }
                    Ok(())
                }
                Err(RecvTimeoutError::Disconnected) => Err(BackendError::Disconnected),
            },
        }
    }
}

impl Backend for SimBackend {
    fn nr_vcpus(&self) -> u32 {
        self.hv.sh.nr_vcpus
    }

    fn map_range(&mut self, r: IoRange) -> Result<(), BackendError> {
        if !r.is_valid() {
            return Err(BackendError::InvalidRange(r));
        }
        self.with_server(|srv| {
            let set = &mut srv.ranges[r.kind.index()];
            if set.overlaps(r.start, r.end) {
                return Err(BackendError::Overlap(r));
            }
            set.add(r.start, r.end, MAX_NR_IO_RANGES)
                .map_err(|RangeLimit| BackendError::TooManyRanges {
                    kind: kind_name(r.kind),
                    limit: MAX_NR_IO_RANGES,
                })
        })
    }

    fn unmap_range(&mut self, r: IoRange) -> Result<(), BackendError> {
        self.with_server(|srv| {
            srv.ranges[r.kind.index()]
                .remove(r.start, r.end, MAX_NR_IO_RANGES)
                .map_err(|e| match e {
                    RemoveError::Limit => BackendError::TooManyRanges {
                        kind: kind_name(r.kind),
                        limit: MAX_NR_IO_RANGES,
                    },
                    RemoveError::NotMapped => BackendError::NotMapped(r),
                })
        })
    }

    fn wait(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<BackendEvent>,
    ) -> Result<(), BackendError> {
        // Taken only when we first have to sleep: the fast path reads no clock.
        let mut start: Option<Instant> = None;
        loop {
            if self.take_events(out)? || timeout == Some(Duration::ZERO) {
                return Ok(());
            }
            let left = match timeout {
                None => None,
                Some(t) => {
                    let started = *start.get_or_insert_with(Instant::now);
                    let l = t.saturating_sub(started.elapsed());
                    if l.is_zero() {
                        return Ok(());
                    }
                    Some(l)
                }
            };
            self.sleep(left)?;
        }
    }

    fn complete(&mut self, vcpu: u32, data: u64) -> Result<(), BackendError> {
        if vcpu >= self.hv.sh.nr_vcpus {
            return Err(BackendError::NoSuchVcpu(vcpu));
        }
        let cell = &self.port()?.slots[vcpu as usize];
        // The answer first, then the state that publishes it.
        if let Err(source) = cell.slot.check(Actor::Server, IoreqState::RespReady) {
            lock(&self.hv.sh.st)
                .violations
                .push(Violation::BadCompletion {
                    vcpu,
                    error: source.to_string(),
                });
            return Err(BackendError::Slot { vcpu, source });
        }
        if cell.takes_data() {
            cell.data.store(data, Relaxed);
        }
        cell.slot
            .advance(Actor::Server, IoreqState::RespReady)
            .map_err(|source| BackendError::Slot { vcpu, source })?;
        self.hv.sh.vcpus[vcpu as usize].wake();
        Ok(())
    }

    /// Records the message ([`SimHypervisor::injected_msis`]); refused once the server is
    /// destroyed, like every other operation of its backend.
    fn inject_msi(&mut self, addr: u64, data: u32) -> Result<(), BackendError> {
        let server = self.id;
        self.with_server(|_| Ok(()))?;
        lock(&self.hv.sh.st)
            .msis
            .push(InjectedMsi { server, addr, data });
        Ok(())
    }
}

fn kind_name(k: RangeKind) -> &'static str {
    match k {
        RangeKind::Port => "port",
        RangeKind::Mmio => "mmio",
        RangeKind::Pci => "pci",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::pack_sbdf;

    fn pio(dir: Dir, port: u64, size: u32, data: u64) -> Ioreq {
        Ioreq::new(IoreqType::Pio, dir, port, size, data)
    }

    fn serve_one(b: &mut SimBackend, value: u64) -> Vec<BackendEvent> {
        let mut ev = vec![];
        b.wait(Some(Duration::ZERO), &mut ev).unwrap();
        for e in &ev {
            if let BackendEvent::Request { vcpu, .. } = e {
                b.complete(*vcpu, value).unwrap();
            }
        }
        ev
    }

    #[test]
    fn unclaimed_reads_all_ones_writes_dropped() {
        let hv = SimHypervisor::new(1, Duration::from_secs(1));
        assert_eq!(
            hv.issue(0, &pio(Dir::Read, 0x80, 2, 0), false).unwrap(),
            Issued::Done(0xffff)
        );
        assert_eq!(
            hv.issue(0, &pio(Dir::Write, 0x80, 2, 5), false).unwrap(),
            Issued::Done(0)
        );
        assert_eq!(hv.stats().unclaimed, 2);
    }

    #[test]
    fn newest_enabled_server_wins_and_claim_must_contain_access() {
        let hv = SimHypervisor::new(1, Duration::from_secs(1));
        let mut a = hv.create_server(BufioreqMode::Off).unwrap();
        let mut b = hv.create_server(BufioreqMode::Off).unwrap();
        a.map_range(IoRange::ports(0x60, 0x6f)).unwrap();
        b.map_range(IoRange::ports(0x60, 0x61)).unwrap();
        a.set_enabled(true).unwrap();
        // b disabled: a gets it.
        assert_eq!(
            hv.issue(0, &pio(Dir::Read, 0x60, 1, 0), false).unwrap(),
            Issued::Pending
        );
        assert_eq!(serve_one(&mut a, 0x11).len(), 1);
        assert_eq!(hv.collect(0).unwrap(), Some(0x11));
        b.set_enabled(true).unwrap();
        hv.issue(0, &pio(Dir::Read, 0x60, 2, 0), false).unwrap();
        assert_eq!(serve_one(&mut b, 0x2222).len(), 1);
        assert_eq!(hv.collect(0).unwrap(), Some(0x2222));
        // 0x61..0x62 is not inside b's range: a, whose range contains it, gets it.
        hv.issue(0, &pio(Dir::Read, 0x61, 2, 0), false).unwrap();
        assert!(serve_one(&mut b, 0).is_empty());
        assert_eq!(serve_one(&mut a, 0x3333).len(), 1);
        assert_eq!(hv.collect(0).unwrap(), Some(0x3333));
        assert!(hv.check().is_ok());
    }

    #[test]
    fn cf8_latch_and_cfc_conversion() {
        let hv = SimHypervisor::new(1, Duration::from_secs(1));
        let mut s = hv.create_server(BufioreqMode::Off).unwrap();
        let sbdf = pack_sbdf(0, 0, 2, 1);
        s.map_range(IoRange::pci(sbdf)).unwrap();
        s.set_enabled(true).unwrap();
        // A 2-byte write to CF8 does not latch.
        hv.issue(0, &pio(Dir::Write, 0xcf8, 2, 0x8000_1118), false)
            .unwrap();
        assert_eq!(hv.cf8(), 0);
        hv.issue(0, &pio(Dir::Write, 0xcf8, 4, 0x8000_1118), false)
            .unwrap();
        assert_eq!(hv.cf8(), 0x8000_1118);
        hv.issue(0, &pio(Dir::Read, 0xcfd, 1, 0), false).unwrap();
        let ev = serve_one(&mut s, 0x42);
        match ev[0] {
            BackendEvent::Request { req, .. } => {
                assert_eq!(req.ty, IoreqType::PciConfig);
                assert_eq!(req.addr, abi::pci_config_addr(sbdf, 0x19));
                assert_eq!(req.size, 1);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(hv.collect(0).unwrap(), Some(0x42));
        // Another SBDF: nobody claims it; it is not retried as a port access.
        hv.issue(0, &pio(Dir::Write, 0xcf8, 4, 0x8000_1200), false)
            .unwrap();
        assert_eq!(
            hv.issue(0, &pio(Dir::Read, 0xcfc, 4, 0), false).unwrap(),
            Issued::Done(0xffff_ffff)
        );
    }

    #[test]
    fn limits_and_overlaps() {
        let hv = SimHypervisor::new(1, Duration::from_secs(1));
        let mut servers: Vec<_> = (0..8)
            .map(|_| hv.create_server(BufioreqMode::Off).unwrap())
            .collect();
        assert_eq!(
            hv.create_server(BufioreqMode::Off).unwrap_err(),
            SimError::TooManyServers
        );
        let s = &mut servers[0];
        s.map_range(IoRange::ports(0x10, 0x1f)).unwrap();
        assert_eq!(
            s.map_range(IoRange::ports(0x1f, 0x20)),
            Err(BackendError::Overlap(IoRange::ports(0x1f, 0x20)))
        );
        // Another server may overlap.
        servers[1].map_range(IoRange::ports(0x10, 0x1f)).unwrap();
        let s = &mut servers[2];
        for i in 0..MAX_NR_IO_RANGES as u64 {
            s.map_range(IoRange::new(RangeKind::Mmio, i * 16, i * 16 + 7))
                .unwrap();
        }
        assert!(matches!(
            s.map_range(IoRange::new(RangeKind::Mmio, 0x10_0000, 0x10_0000)),
            Err(BackendError::TooManyRanges { .. })
        ));
        // Adjacent ranges merge and do not count twice.
        s.map_range(IoRange::new(RangeKind::Mmio, 8, 15)).unwrap();
        assert_eq!(
            hv.server_ranges(2, RangeKind::Mmio).len(),
            MAX_NR_IO_RANGES - 1
        );
        assert_eq!(
            s.unmap_range(IoRange::new(RangeKind::Mmio, 0x9999_0000, 0x9999_0000)),
            Err(BackendError::NotMapped(IoRange::new(
                RangeKind::Mmio,
                0x9999_0000,
                0x9999_0000
            )))
        );
    }

    #[test]
    fn buffered_writes_drain_before_the_next_sync_request() {
        let hv = SimHypervisor::new(1, Duration::from_secs(1));
        let mut s = hv.create_server(BufioreqMode::Atomic).unwrap();
        s.map_range(IoRange::new(RangeKind::Mmio, 0xa0000, 0xbffff))
            .unwrap();
        s.set_enabled(true).unwrap();
        let w = |a, d| Ioreq::new(IoreqType::Copy, Dir::Write, a, 1, d);
        assert_eq!(hv.issue(0, &w(0xa0000, 1), true).unwrap(), Issued::Done(0));
        assert_eq!(hv.issue(0, &w(0xa0001, 2), true).unwrap(), Issued::Done(0));
        hv.issue(
            0,
            &Ioreq::new(IoreqType::Copy, Dir::Read, 0xa0000, 1, 0),
            false,
        )
        .unwrap();
        let mut ev = vec![];
        s.wait(Some(Duration::ZERO), &mut ev).unwrap();
        let kinds: Vec<_> = ev
            .iter()
            .map(|e| match e {
                BackendEvent::Buffered(r) => (0, r.data),
                BackendEvent::Request { req, .. } => (1, req.addr),
            })
            .collect();
        assert_eq!(kinds, vec![(0, 1), (0, 2), (1, 0xa0000)]);
        s.complete(0, 7).unwrap();
        assert_eq!(hv.collect(0).unwrap(), Some(7));
    }

    #[test]
    fn completing_twice_is_a_reported_violation() {
        let hv = SimHypervisor::new(1, Duration::from_secs(1));
        let mut s = hv.create_server(BufioreqMode::Off).unwrap();
        s.map_range(IoRange::ports(0x70, 0x71)).unwrap();
        s.set_enabled(true).unwrap();
        hv.issue(0, &pio(Dir::Read, 0x71, 1, 0), false).unwrap();
        serve_one(&mut s, 1);
        assert!(matches!(s.complete(0, 1), Err(BackendError::Slot { .. })));
        assert_eq!(hv.collect(0).unwrap(), Some(1));
        let v = hv.check().unwrap_err();
        assert!(v[0].contains("completed vCPU 0"), "{v:?}");
        let v = hv.check_violations().unwrap_err();
        assert!(
            matches!(&v[0], Violation::BadCompletion { vcpu: 0, .. }),
            "{v:?}"
        );
    }

    #[test]
    fn invalidate_waits_for_every_enabled_server() {
        let hv = SimHypervisor::new(1, Duration::from_secs(1));
        let mut a = hv.create_server(BufioreqMode::Off).unwrap();
        let mut b = hv.create_server(BufioreqMode::Off).unwrap();
        a.set_enabled(true).unwrap();
        b.set_enabled(true).unwrap();
        assert_eq!(hv.issue_invalidate(0).unwrap(), Issued::Pending);
        serve_one(&mut a, 0);
        assert_eq!(hv.collect(0).unwrap(), None);
        serve_one(&mut b, 0);
        assert_eq!(hv.collect(0).unwrap(), Some(0));
        assert_eq!(hv.check().unwrap().completed, 2);
    }

    #[test]
    fn a_vcpu_past_the_deadline_is_a_violation() {
        let hv = SimHypervisor::new(1, Duration::from_millis(20));
        let mut s = hv.create_server(BufioreqMode::Off).unwrap();
        s.map_range(IoRange::ports(0x70, 0x71)).unwrap();
        s.set_enabled(true).unwrap();
        assert!(matches!(
            hv.access(0, &pio(Dir::Read, 0x71, 1, 0)),
            Err(SimError::Deadline { .. })
        ));
        assert!(hv.check().is_err());
        // Destroying the server releases the vCPU.
        hv.destroy_server(0).unwrap();
        assert_eq!(hv.collect(0).unwrap(), Some(0xff));
    }

    #[test]
    fn a_destroyed_server_frees_the_vcpu_and_its_stale_backend_is_disconnected() {
        let hv = SimHypervisor::new(1, Duration::from_secs(1));
        let mut old = hv.create_server(BufioreqMode::Off).unwrap();
        old.map_range(IoRange::ports(0x70, 0x71)).unwrap();
        old.set_enabled(true).unwrap();
        assert_eq!(
            hv.issue(0, &pio(Dir::Read, 0x70, 2, 0), false).unwrap(),
            Issued::Pending
        );
        hv.destroy_server(0).unwrap();
        // Never collected: the next access is not refused as Busy, the old one counts once.
        let mut new = hv.create_server(BufioreqMode::Off).unwrap();
        assert_eq!(new.id(), 0);
        new.map_range(IoRange::ports(0x70, 0x71)).unwrap();
        new.set_enabled(true).unwrap();
        assert_eq!(
            hv.issue(0, &pio(Dir::Read, 0x70, 1, 0), false).unwrap(),
            Issued::Pending
        );
        // The old backend sees nothing of the new server's slots and may not answer them.
        let mut ev = vec![];
        assert_eq!(
            old.wait(Some(Duration::ZERO), &mut ev),
            Err(BackendError::Disconnected)
        );
        assert_eq!(old.complete(0, 1), Err(BackendError::Disconnected));
        assert_eq!(serve_one(&mut new, 0x5a).len(), 1);
        assert_eq!(hv.collect(0).unwrap(), Some(0x5a));
        assert_eq!(hv.check().unwrap().completed, 2);
    }

    #[test]
    fn a_request_is_taken_once_and_a_changed_eport_is_refused() {
        let hv = SimHypervisor::new(1, Duration::from_secs(1));
        let mut s = hv.create_server(BufioreqMode::Off).unwrap();
        s.map_range(IoRange::ports(0x70, 0x71)).unwrap();
        s.set_enabled(true).unwrap();
        hv.issue(0, &pio(Dir::Read, 0x71, 1, 0), false).unwrap();
        let mut ev = vec![];
        s.wait(Some(Duration::ZERO), &mut ev).unwrap();
        assert_eq!(ev.len(), 1);
        // Taken once: a second wait finds nothing, the slot stays INPROCESS.
        ev.clear();
        s.wait(Some(Duration::ZERO), &mut ev).unwrap();
        assert!(ev.is_empty());
        assert_eq!(hv.collect(0).unwrap(), None);
        s.complete(0, 3).unwrap();
        assert_eq!(hv.collect(0).unwrap(), Some(3));
        s.write_vp_eport(0, 7);
        assert_eq!(
            hv.issue(0, &pio(Dir::Read, 0x71, 1, 0), false),
            Err(SimError::BadEventChannel { server: 0, vcpu: 0 })
        );
        assert!(hv.check().is_err());
    }

    #[test]
    fn threaded_server_serves_blocking_vcpus() {
        let hv = SimHypervisor::new(4, Duration::from_secs(5));
        let mut s = hv.create_server(BufioreqMode::Off).unwrap();
        s.map_range(IoRange::ports(0x100, 0x1ff)).unwrap();
        s.set_enabled(true).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st2 = stop.clone();
        let server = std::thread::spawn(move || {
            let mut ev = vec![];
            while !st2.load(std::sync::atomic::Ordering::Relaxed) {
                ev.clear();
                s.wait(Some(Duration::from_millis(5)), &mut ev).unwrap();
                for e in &ev {
                    if let BackendEvent::Request { vcpu, req } = e {
                        s.complete(*vcpu, req.addr + u64::from(*vcpu)).unwrap();
                    }
                }
            }
        });
        let threads: Vec<_> = (0..4u32)
            .map(|v| {
                let hv = hv.clone();
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        let port = 0x100 + (i % 0x80);
                        let got = hv.access(v, &pio(Dir::Read, port, 2, 0)).unwrap();
                        assert_eq!(got, port + u64::from(v));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        server.join().unwrap();
        let stats = hv.check().unwrap();
        assert_eq!((stats.sent, stats.completed), (800, 800));
    }

    /// `inject_msi` is recorded in order with the server that sent it, and refused once the
    /// server is gone (every DMOP of a destroyed server fails).
    #[test]
    fn injected_msis_are_recorded() {
        let hv = SimHypervisor::new(1, Duration::from_secs(1));
        let mut a = hv.create_server(BufioreqMode::Off).unwrap();
        let mut b = hv.create_server(BufioreqMode::Off).unwrap();
        a.inject_msi(0xfee0_0000, 0x4041).unwrap();
        b.inject_msi(0x1_fee0_1000, 0x22).unwrap();
        assert_eq!(
            hv.injected_msis(),
            [
                InjectedMsi {
                    server: a.id(),
                    addr: 0xfee0_0000,
                    data: 0x4041
                },
                InjectedMsi {
                    server: b.id(),
                    addr: 0x1_fee0_1000,
                    data: 0x22
                },
            ]
        );
        hv.destroy_server(b.id()).unwrap();
        assert_eq!(
            b.inject_msi(0xfee0_0000, 1),
            Err(BackendError::Disconnected)
        );
        assert_eq!(hv.injected_msis().len(), 2);
    }

    /// A backend that does not implement it says so (the trait's default).
    #[test]
    fn inject_msi_defaults_to_unsupported() {
        struct Mute;
        impl Backend for Mute {
            fn nr_vcpus(&self) -> u32 {
                1
            }
            fn map_range(&mut self, _: IoRange) -> Result<(), BackendError> {
                Ok(())
            }
            fn unmap_range(&mut self, _: IoRange) -> Result<(), BackendError> {
                Ok(())
            }
            fn wait(
                &mut self,
                _: Option<Duration>,
                _: &mut Vec<BackendEvent>,
            ) -> Result<(), BackendError> {
                Ok(())
            }
            fn complete(&mut self, _: u32, _: u64) -> Result<(), BackendError> {
                Ok(())
            }
        }
        let e = Mute.inject_msi(0xfee0_0000, 0).unwrap_err();
        assert_eq!(e, BackendError::Unsupported { op: "inject_msi" });
        assert_eq!(e.to_string(), "inject_msi is not supported by this backend");
    }

    #[test]
    fn rangeset_remove_splits() {
        let mut r = XenRangeSet::default();
        r.add(0, 99, 4).unwrap();
        r.remove(10, 19, 4).unwrap();
        assert_eq!(r.ranges(), &[(0, 9), (20, 99)]);
        assert!(r.contains(20, 99) && !r.contains(9, 20));
        assert!(r.contains_linear(20, 99) && !r.contains_linear(9, 20));
        assert_eq!(r.remove(5, 25, 4), Err(RemoveError::NotMapped));
    }
}
