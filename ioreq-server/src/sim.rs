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
//! An invariant checker runs all the time: every issued request is completed exactly once, no
//! slot moves illegally, and no vCPU waits past the deadline. [`SimHypervisor::check`]
//! reports any violation.

use crate::abi::{self, PCI_CONFIG_ADDRESS_PORT};
use crate::bufioreq::{BufferError, BufferedIoPage, BufioreqMode};
use crate::ioreq::{Dir, Ioreq, IoreqState, IoreqType, size_mask};
use crate::model::{Backend, BackendError, BackendEvent};
use crate::range::{IoRange, RangeKind};
use crate::slot::{Actor, Slot};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};
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

#[derive(Debug)]
enum Notify {
    Vcpu(u32),
    Buffered,
}

#[derive(Debug)]
struct SimServer {
    enabled: bool,
    ranges: [XenRangeSet; 3],
    slots: Vec<(Slot, Ioreq)>,
    eports: Vec<u32>,
    ring: Arc<BufferedIoPage>,
    mode: BufioreqMode,
    /// Event-channel notifications not yet seen by the server.
    queue: std::collections::VecDeque<Notify>,
    /// The server sleeps in `wait`: ring its doorbell.
    sleeping: bool,
    doorbell: Sender<()>,
}

impl SimServer {
    /// Sends an event-channel notification: queued, and the doorbell rung only when the
    /// server is asleep (so a single-threaded driver pays no channel traffic).
    fn notify(&mut self, n: Notify) {
        self.queue.push_back(n);
        if self.sleeping {
            self.sleeping = false;
            let _ = self.doorbell.send(());
        }
    }
}

#[derive(Debug, Default)]
struct VcpuState {
    /// Servers whose slot for this vCPU holds our request.
    waiting_on: Vec<u16>,
    /// A thread sleeps in `wait_collect` for this vCPU.
    sleeping: bool,
    /// Value collected so far (read accesses).
    value: u64,
}

#[derive(Debug)]
struct State {
    cf8: u32,
    servers: Vec<Option<SimServer>>,
    vcpus: Vec<VcpuState>,
    stats: SimStats,
    violations: Vec<String>,
}

#[derive(Debug)]
struct Shared {
    st: Mutex<State>,
    done: Vec<(Sender<()>, Receiver<()>)>,
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
            vcpus: (0..nr_vcpus).map(|_| VcpuState::default()).collect(),
            stats: SimStats::default(),
            violations: vec![],
        };
        SimHypervisor {
            sh: Arc::new(Shared {
                st: Mutex::new(st),
                done: (0..nr_vcpus).map(|_| unbounded()).collect(),
                deadline,
                nr_vcpus,
            }),
        }
    }

    pub fn nr_vcpus(&self) -> u32 {
        self.sh.nr_vcpus
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
        let n = self.sh.nr_vcpus as usize;
        st.servers[id] = Some(SimServer {
            enabled: false,
            ranges: Default::default(),
            // Xen writes each vCPU's event channel into its slot when the vCPU is added.
            slots: (0..n as u32)
                .map(|v| {
                    let mut r = Ioreq::new(IoreqType::Pio, Dir::Write, 0, 1, 0);
                    r.vp_eport = 1000 + id as u32 * 256 + v;
                    (Slot::default(), r)
                })
                .collect(),
            eports: (0..n as u32).map(|v| 1000 + id as u32 * 256 + v).collect(),
            ring: Arc::new(BufferedIoPage::default()),
            mode,
            queue: std::collections::VecDeque::new(),
            sleeping: false,
            doorbell: tx,
        });
        Ok(SimBackend {
            hv: self.clone(),
            id: id as u16,
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
    /// vCPU is left waiting.
    pub fn destroy_server(&self, id: u16) -> Result<(), SimError> {
        let mut st = lock(&self.sh.st);
        let st = &mut *st;
        let s = st
            .servers
            .get_mut(usize::from(id))
            .and_then(Option::take)
            .ok_or(SimError::NoSuchServer(id))?;
        for (v, (slot, req)) in s.slots.iter().enumerate() {
            if slot.state() != IoreqState::None {
                let vs = &mut st.vcpus[v];
                if let Some(i) = vs.waiting_on.iter().position(|&w| w == id) {
                    vs.waiting_on.swap_remove(i);
                    if req.dir == Dir::Read {
                        vs.value = size_mask(req.size);
                    }
                    st.stats.completed += 1;
                    if std::mem::take(&mut vs.sleeping) {
                        let _ = self.sh.done[v].0.send(());
                    }
                }
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
        if !st.vcpus[vcpu as usize].waiting_on.is_empty() {
            return Err(SimError::Busy(vcpu));
        }
        // CF8 latch: 4-byte writes only (hvm_access_cf8); the write still goes on to
        // whoever claims the port.
        if req.ty == IoreqType::Pio
            && req.addr == u64::from(PCI_CONFIG_ADDRESS_PORT)
            && req.size == 4
            && req.dir == Dir::Write
            && !req.data_is_ptr
        {
            st.cf8 = req.data as u32;
        }
        // CFC conversion.
        let mut match_key = None;
        if req.ty == IoreqType::Pio && !req.data_is_ptr && req.count == 1 {
            if let Some((sbdf, reg)) = abi::cf8_decode(st.cf8, req.addr as u16, req.size) {
                req.ty = IoreqType::PciConfig;
                req.addr = abi::pci_config_addr(sbdf, reg);
                match_key = Some((RangeKind::Pci, u64::from(sbdf), u64::from(sbdf)));
                st.stats.cf8_converted += 1;
            }
        }
        let (kind, s, e) = match_key.unwrap_or_else(|| {
            let (s, e) = if req.ty == IoreqType::Pio {
                (req.addr, req.addr + u64::from(req.size) - 1)
            } else {
                req.byte_span()
            };
            let kind = if req.ty == IoreqType::Pio {
                RangeKind::Port
            } else {
                RangeKind::Mmio
            };
            (kind, s, e)
        });
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
        let Some(srv) = st.servers[id].as_mut() else {
            return Err(SimError::NoSuchServer(id as u16));
        };
        if buffered && srv.mode != BufioreqMode::Off {
            match srv.ring.push(&req, srv.mode) {
                Ok(()) => {
                    st.stats.buffered += 1;
                    srv.notify(Notify::Buffered);
                    return Ok(Issued::Done(0));
                }
                Err(BufferError::Full | BufferError::NotBufferable) => {}
            }
        }
        Self::send_sync(st, id as u16, vcpu, req)?;
        Ok(Issued::Pending)
    }

    fn send_sync(st: &mut State, id: u16, vcpu: u32, mut req: Ioreq) -> Result<(), SimError> {
        let Some(srv) = st.servers[usize::from(id)].as_mut() else {
            return Err(SimError::NoSuchServer(id));
        };
        let (slot, cur) = &mut srv.slots[vcpu as usize];
        // Xen checks the state first ("bad IO state"), then the event channel.
        if slot.state() == IoreqState::None && cur.vp_eport != srv.eports[vcpu as usize] {
            st.violations
                .push(format!("server {id} changed vp_eport of vCPU {vcpu}"));
            return Err(SimError::BadEventChannel { server: id, vcpu });
        }
        if slot.advance(Actor::Hypervisor, IoreqState::Ready).is_err() {
            let state = slot.state();
            st.violations.push(format!(
                "server {id} left vCPU {vcpu}'s slot in {state:?} (bad IO state)"
            ));
            return Err(SimError::BadIoState {
                server: id,
                vcpu,
                state,
            });
        }
        req.state = IoreqState::Ready;
        req.vp_eport = srv.eports[vcpu as usize];
        *cur = req;
        srv.notify(Notify::Vcpu(vcpu));
        st.stats.sent += 1;
        let vs = &mut st.vcpus[vcpu as usize];
        vs.waiting_on.push(id);
        vs.value = 0;
        Ok(())
    }

    /// INVALIDATE: a synchronous broadcast to every enabled server.
    pub fn issue_invalidate(&self, vcpu: u32) -> Result<Issued, SimError> {
        let mut st = lock(&self.sh.st);
        let st = &mut *st;
        if vcpu >= self.sh.nr_vcpus {
            return Err(SimError::NoSuchVcpu(vcpu));
        }
        if !st.vcpus[vcpu as usize].waiting_on.is_empty() {
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
            Self::send_sync(st, id, vcpu, req)?;
        }
        Ok(Issued::Pending)
    }

    /// TIMEOFFSET: a buffered broadcast (8 bytes, two slots) to every enabled server with a
    /// ring. Returns how many servers got it.
    pub fn send_timeoffset(&self, offset: u64) -> usize {
        let mut st = lock(&self.sh.st);
        let mut n = 0;
        for s in st.servers.iter_mut().flatten().filter(|s| s.enabled) {
            let req = Ioreq::new(IoreqType::TimeOffset, Dir::Write, 0, 8, offset);
            if s.ring.push(&req, s.mode).is_ok() {
                s.notify(Notify::Buffered);
                n += 1;
            }
        }
        st.stats.buffered += n as u64;
        n
    }

    /// Collects a pending access once every server it went to has completed it: the slot goes
    /// back to NONE and the read value is returned. `None` while still waiting.
    pub fn collect(&self, vcpu: u32) -> Result<Option<u64>, SimError> {
        let mut st = lock(&self.sh.st);
        Self::collect_locked(&mut st, vcpu)
    }

    fn collect_locked(st: &mut State, vcpu: u32) -> Result<Option<u64>, SimError> {
        let vs = st
            .vcpus
            .get_mut(vcpu as usize)
            .ok_or(SimError::NoSuchVcpu(vcpu))?;
        let mut i = 0;
        while i < vs.waiting_on.len() {
            let id = vs.waiting_on[i];
            let Some(srv) = st.servers[usize::from(id)].as_mut() else {
                vs.waiting_on.swap_remove(i);
                continue;
            };
            let (slot, req) = &mut srv.slots[vcpu as usize];
            if slot.state() == IoreqState::RespReady {
                if slot.advance(Actor::Hypervisor, IoreqState::None).is_ok() {
                    if req.dir == Dir::Read {
                        vs.value = req.data & size_mask(req.size);
                    }
                    st.stats.completed += 1;
                }
                vs.waiting_on.swap_remove(i);
            } else {
                i += 1;
            }
        }
        if vs.waiting_on.is_empty() {
            Ok(Some(vs.value))
        } else {
            Ok(None)
        }
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
        let rx = &self.sh.done[vcpu as usize].1;
        loop {
            {
                // Collect, or say we sleep, under one lock: a completion in between rings.
                let mut st = lock(&self.sh.st);
                if let Some(v) = Self::collect_locked(&mut st, vcpu)? {
                    return Ok(v);
                }
                st.vcpus[vcpu as usize].sleeping = true;
            }
            let left = self.sh.deadline.saturating_sub(start.elapsed());
            match rx.recv_timeout(left) {
                Ok(()) => {}
                Err(RecvTimeoutError::Timeout) => {
                    let mut st = lock(&self.sh.st);
                    st.vcpus[vcpu as usize].sleeping = false;
                    st.violations.push(format!(
                        "vCPU {vcpu} waited more than {:?}",
                        self.sh.deadline
                    ));
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
        lock(&self.sh.st).stats.clone()
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

    /// The invariant checker: Ok when nothing was lost or doubled, no slot moved illegally and
    /// no vCPU is still waiting; otherwise every violation seen.
    pub fn check(&self) -> Result<SimStats, Vec<String>> {
        let st = lock(&self.sh.st);
        let mut v = st.violations.clone();
        for (i, vs) in st.vcpus.iter().enumerate() {
            if !vs.waiting_on.is_empty() {
                v.push(format!(
                    "vCPU {i} still waits on servers {:?}",
                    vs.waiting_on
                ));
            }
        }
        if st.stats.completed > st.stats.sent {
            v.push(format!(
                "{} completions for {} requests",
                st.stats.completed, st.stats.sent
            ));
        }
        if v.is_empty() {
            Ok(st.stats.clone())
        } else {
            Err(v)
        }
    }
}

/// One server's end of the simulated hypervisor.
#[derive(Debug)]
pub struct SimBackend {
    hv: SimHypervisor,
    id: u16,
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
        let mut st = lock(&self.hv.sh.st);
        if let Some(s) = st.servers[usize::from(self.id)].as_mut() {
            if let Some((_, r)) = s.slots.get_mut(vcpu as usize) {
                r.vp_eport = port;
            }
        }
    }

    fn with_server<T>(
        &self,
        f: impl FnOnce(&mut SimServer, &mut State) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let mut st = lock(&self.hv.sh.st);
        let st = &mut *st;
        let mut srv = st.servers[usize::from(self.id)]
            .take()
            .ok_or(BackendError::Disconnected)?;
        let r = f(&mut srv, st);
        st.servers[usize::from(self.id)] = Some(srv);
        r
    }

    fn handle_notify(
        srv: &mut SimServer,
        violations: &mut Vec<String>,
        n: Notify,
        out: &mut Vec<BackendEvent>,
    ) -> Result<(), BackendError> {
        // The ring first: writes queued before a synchronous request stay before it.
        if srv.ring.pending() != 0 {
            let _ = srv
                .ring
                .drain(|r| out.push(BackendEvent::Buffered(r)))
                .map_err(|e| violations.push(format!("buffered ring: {e}")));
        }
        if let Notify::Vcpu(v) = n {
            let (slot, req) = &mut srv.slots[v as usize];
            if slot.state() == IoreqState::Ready {
                slot.advance(Actor::Server, IoreqState::InProcess)
                    .map_err(|source| BackendError::Slot { vcpu: v, source })?;
                req.state = IoreqState::InProcess;
                out.push(BackendEvent::Request { vcpu: v, req: *req });
            }
        }
        Ok(())
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
        self.with_server(|srv, _| {
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
        self.with_server(|srv, _| {
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
            {
                let mut st = lock(&self.hv.sh.st);
                let st = &mut *st;
                let srv = st.servers[usize::from(self.id)]
                    .as_mut()
                    .ok_or(BackendError::Disconnected)?;
                if !srv.queue.is_empty() {
                    let mut q = std::mem::take(&mut srv.queue);
                    let r = q
                        .drain(..)
                        .try_for_each(|n| Self::handle_notify(srv, &mut st.violations, n, out));
                    // Keep the queue's allocation.
                    if let Some(s) = st.servers[usize::from(self.id)].as_mut() {
                        if s.queue.is_empty() {
                            s.queue = q;
                        }
                    }
                    return r;
                }
                if timeout.is_some_and(|t| t.is_zero()) {
                    return Ok(());
                }
                srv.sleeping = true;
            }
            // Drain doorbells rung before we slept, then sleep until the next one.
            while self.rx.try_recv().is_ok() {}
            let started = *start.get_or_insert_with(Instant::now);
            let left = timeout.map(|t| t.saturating_sub(started.elapsed()));
            let woke = match left {
                None => self
                    .rx
                    .recv()
                    .map_err(|_| BackendError::Disconnected)
                    .map(|()| true)?,
                Some(l) => match self.rx.recv_timeout(l) {
                    Ok(()) => true,
                    Err(RecvTimeoutError::Timeout) => false,
                    Err(RecvTimeoutError::Disconnected) => return Err(BackendError::Disconnected),
                },
            };
            if !woke {
                let mut st = lock(&self.hv.sh.st);
                if let Some(s) = st.servers[usize::from(self.id)].as_mut() {
                    s.sleeping = false;
                    if s.queue.is_empty() {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn complete(&mut self, vcpu: u32, data: u64) -> Result<(), BackendError> {
        if vcpu >= self.hv.sh.nr_vcpus {
            return Err(BackendError::NoSuchVcpu(vcpu));
        }
        let mut st = lock(&self.hv.sh.st);
        let st = &mut *st;
        let srv = st.servers[usize::from(self.id)]
            .as_mut()
            .ok_or(BackendError::Disconnected)?;
        let (slot, req) = &mut srv.slots[vcpu as usize];
        if let Err(source) = slot.advance(Actor::Server, IoreqState::RespReady) {
            st.violations
                .push(format!("server completed vCPU {vcpu}: {source}"));
            return Err(BackendError::Slot { vcpu, source });
        }
        if req.dir == Dir::Read && !req.data_is_ptr {
            req.data = data;
        }
        req.state = IoreqState::RespReady;
        if std::mem::take(&mut st.vcpus[vcpu as usize].sleeping) {
            let _ = self.hv.sh.done[vcpu as usize].0.send(());
        }
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
