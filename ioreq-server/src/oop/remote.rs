//! The multiplexer's stand-in for an out-of-process device model: [`RemoteModel`] is a
//! [`DeviceModel`] whose `handle` writes the vCPU's slot in the shared page, rings the
//! vCPU's eventfd (unless the device model says it is polling) and waits for IORESP_READY:
//! spinning for a short while (saying so, so the device model need not ring back), then
//! blocking on the response eventfd, never past the deadline. The rules that make skipping
//! an eventfd safe are in [`super::notify`].
//!
//! How long it spins adapts ([`super::spin`]): at most [`RemoteOptions::spin`], at most
//! twice the recent answer time, less and then not at all while spins keep ending in a
//! sleep (the device model is not getting a CPU in time: the machine is oversubscribed),
//! learned apart for a device model that said it was polling and one that had to be rung,
//! and never on one CPU.
//!
//! DMOPs the device model sends while a request is in flight (a BAR was programmed, say)
//! reach the connection thread, which hands them here: they are applied with the `ctl` of
//! the request being served, exactly as an in-process model's would be.

use super::server::DmopError;
use super::shm::SharedPages;
use super::slots::{Collect, SlotWords};
use super::spin::{Awaited, Outcome, Peer, SpinMode, Spinner, Ticket};
use super::sys::{Doorbell, SeqPacket, Trigger, Waiter};
use super::wire::{self, Code, Message, Notice};
use crate::bufioreq::BufioreqMode;
use crate::ioreq::{Dir, Ioreq, IoreqType};
use crate::model::{ClaimError, DeviceModel, DmControl, DmError};
use crate::range::{Claim, IoRange, Position, RangeKind};
use std::collections::VecDeque;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// How a remote server is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOptions {
    /// Longest a request may take. Past it the server is dropped (its claims are released)
    /// and the request completes as a master abort.
    pub deadline: Duration,
    /// The longest `handle` polls the slot before it blocks on the response eventfd; with
    /// [`SpinMode::Adaptive`] it polls less when that pays better ([`super::spin`]).
    pub spin: Duration,
    /// Whether `spin` is a maximum the policy adapts under, or a fixed time.
    pub spin_mode: SpinMode,
    /// Writes inside these ranges go through the buffered ring (no waiting), as Xen buffers
    /// VGA memory writes; everything else is synchronous.
    pub buffered: Vec<IoRange>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            deadline: Duration::from_secs(1),
            spin: spin_budget(DEFAULT_SPIN),
            spin_mode: SpinMode::from_env(),
            buffered: vec![],
        }
    }
}

/// The default longest spin: the defaults' round trip (engine spins, device model sleeps)
/// is ~2-3 µs on an idle machine and a wake-up across CPUs 30-80 µs on the machine in
/// `docs/performance.md`, so 50 µs covers the answers that come without a wake-up.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// `want`, or no spinning at all where it cannot pay: a process that may run on one CPU only
/// (a dom0 with one vCPU, a service pinned to a core) would spin while the device model it
/// waits for cannot run, and only delay it. Counts the CPUs this thread may run on
/// (affinity and cgroup quota, as `available_parallelism` does).
pub fn spin_budget(want: Duration) -> Duration {
    match std::thread::available_parallelism() {
        Ok(n) if n.get() > 1 => want,
        _ => Duration::ZERO,
    }
}

/// Counters of one remote server.
#[derive(Debug, Default)]
pub struct RemoteCounters {
    /// Synchronous requests sent through a slot.
    pub requests: AtomicU64,
    /// ... answered while spinning.
    pub spun: AtomicU64,
    /// ... answered after blocking on the eventfd.
    pub blocked: AtomicU64,
    /// Request and buffered-ring eventfds rung for the device model.
    pub bells_rung: AtomicU64,
    /// ... and not rung because the device model said it was polling.
    pub bells_skipped: AtomicU64,
    /// Writes put on the buffered ring.
    pub buffered: AtomicU64,
    /// DMOPs applied while a request was in flight.
    pub dmops_in_request: AtomicU64,
    /// Requests refused because the server was disabled or gone.
    pub refused: AtomicU64,
}

/// A snapshot of [`RemoteCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteStats {
    pub requests: u64,
    pub spun: u64,
    pub blocked: u64,
    pub bells_rung: u64,
    pub bells_skipped: u64,
    pub buffered: u64,
    pub dmops_in_request: u64,
    pub refused: u64,
}

/// Map or unmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmopKind {
    Map,
    Unmap,
}

/// What a DMOP that goes to the engine asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Dmop {
    Claim(DmopKind, Claim),
    InjectMsi { addr: u64, data: u32 },
}

impl Dmop {
    /// The refusal of a DMOP that cannot be applied: `why`, with `msi` the code an MSI gets
    /// (a claim is refused as invalid, as before MSIs existed).
    pub fn refused(&self, msi: Code, why: &str) -> DmopError {
        match self {
            Dmop::Claim(_, claim) => DmopError::from(ClaimError::Invalid {
                claim: claim.clone(),
                why: why.into(),
            }),
            Dmop::InjectMsi { .. } => DmopError::new(msi, format!("MSI not injected: {why}")),
        }
    }
}

/// A DMOP waiting for whoever holds the engine's `ctl` for this server.
#[derive(Debug)]
pub(crate) struct PendingOp {
    pub op: Dmop,
    pub reply: crossbeam_channel::Sender<Result<(), DmopError>>,
}

#[derive(Debug, Default)]
pub(crate) struct Inbox {
    /// A request of this server is in flight: DMOPs go to `ops`, not to the engine.
    pub in_request: bool,
    pub ops: VecDeque<PendingOp>,
    /// Positions the server has claimed (for POSITION_MOVED notices).
    pub positions: Vec<Position>,
}

/// The descriptors and memory of one server, shared by the connection thread (which sends
/// them with GET_IOREQ_SERVER_INFO) and the [`RemoteModel`].
#[derive(Debug)]
pub(crate) struct Resources {
    pub pages: SharedPages,
    pub buf_bell: Doorbell,
    pub resp_bell: Doorbell,
    pub vcpu_bells: Vec<Doorbell>,
}

impl Resources {
    pub fn new(name: &str, nr_vcpus: u32) -> io::Result<Self> {
        Ok(Resources {
            pages: SharedPages::create(name)?,
            buf_bell: Doorbell::new()?,
            resp_bell: Doorbell::new()?,
            vcpu_bells: (0..nr_vcpus)
                .map(|_| Doorbell::new())
                .collect::<io::Result<_>>()?,
        })
    }
}

/// State of one server shared by its connection thread and its [`RemoteModel`].
#[derive(Debug)]
pub(crate) struct Shared {
    pub name: String,
    /// The engine's index of the model, once added.
    pub id: AtomicU32,
    pub enabled: AtomicBool,
    pub dead: AtomicBool,
    /// Set when `inbox.ops` may be non-empty (cheap check while spinning).
    pub has_ops: AtomicBool,
    /// Bumped whenever `inbox.positions` changes.
    pub positions_gen: AtomicU64,
    pub inbox: Mutex<Inbox>,
    /// Connection thread -> RemoteModel: DMOPs queued, or the connection died.
    pub wake: Doorbell,
    /// What a blocked `handle` sleeps on: the response eventfd and `wake`, both
    /// edge-triggered (never read back: `handle` looks at the slot and the flags after every
    /// wake-up, whichever rang).
    pub waiter: Waiter,
    pub sock: Arc<SeqPacket>,
    /// The server's memory (its notification page counts the notices sent on `sock`).
    pub res: Arc<Resources>,
    pub counters: RemoteCounters,
}

pub(crate) const NO_ID: u32 = u32::MAX;

/// One request being waited for.
struct Waiting<'a> {
    slot: &'a SlotWords,
    vcpu: u32,
    seq: u32,
    /// When the wait began (the spin budget and the deadline count from here).
    start: Instant,
}

/// Spin loops read the clock once per this many polls of shared memory: a clock read
/// (`clock_gettime` through the vDSO) takes longer than a poll, and while a loop reads the
/// clock it does not see the other side's write.
pub(crate) const CLOCK_EVERY: u32 = 16;

impl Shared {
    pub fn new(name: &str, sock: Arc<SeqPacket>, res: Arc<Resources>) -> io::Result<Self> {
        let wake = Doorbell::new()?;
        let waiter = Waiter::new()?;
        waiter.add(res.resp_bell.as_fd(), 0, Trigger::Edge)?;
        waiter.add(wake.as_fd(), 1, Trigger::Edge)?;
        Ok(Shared {
            name: name.to_string(),
            id: AtomicU32::new(NO_ID),
            enabled: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            has_ops: AtomicBool::new(false),
            positions_gen: AtomicU64::new(0),
            inbox: Mutex::new(Inbox::default()),
            wake,
            waiter,
            sock,
            res,
            counters: RemoteCounters::default(),
        })
    }

    pub fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Marks the server dead and wakes a waiting `handle`. Returns false if it already was.
    pub fn kill(&self) -> bool {
        let first = !self.dead.swap(true, Ordering::AcqRel);
        let _ = self.wake.ring();
        first
    }

    /// Sends a notice without blocking, then tells the device model through the notification
    /// page that there is something on its socket.
    pub fn send_notice(&self, n: Notice) -> io::Result<()> {
        let b = wire::encode(&Message::Notice(n)).map_err(io::Error::other)?;
        self.sock.send_now(&b)?;
        self.res.pages.notify().notice_sent();
        Ok(())
    }

    /// Tells a device model that only looks at its socket when the notification page says so
    /// that the connection is closing (after its shutdown, so the model then reads the end).
    pub fn closed(&self) {
        self.res.pages.notify().notice_sent();
    }

    /// The fault path: tell the device model why (best effort, never blocking), then cut the
    /// connection; the connection thread sees it end and releases the claims.
    pub fn fault(&self, code: Code, why: &str) {
        if !self.kill() {
            return;
        }
        error!(server = %self.name, code = %code, "{why}: dropping the device model");
        let _ = self.send_notice(Notice::Goodbye {
            code,
            message: truncate(why),
        });
        self.sock.shutdown();
        self.closed();
    }

    pub fn stats(&self) -> RemoteStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RemoteStats {
            requests: l(&c.requests),
            spun: l(&c.spun),
            blocked: l(&c.blocked),
            bells_rung: l(&c.bells_rung),
            bells_skipped: l(&c.bells_skipped),
            buffered: l(&c.buffered),
            dmops_in_request: l(&c.dmops_in_request),
            refused: l(&c.refused),
        }
    }
}

pub(crate) fn truncate(s: &str) -> String {
    if s.len() <= wire::MAX_TEXT {
        return s.to_string();
    }
    let mut end = wire::MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The multiplexer's proxy for one out-of-process ioreq server.
pub struct RemoteModel {
    name: String,
    shared: Arc<Shared>,
    res: Arc<Resources>,
    nr_vcpus: u32,
    bufioreq: BufioreqMode,
    opts: RemoteOptions,
    /// How long to spin for the next answer.
    spinner: Spinner,
    seq: u32,
    /// Positions claimed and what the device model was last told about each.
    told: Vec<(Position, Option<u32>)>,
    told_gen: u64,
}

impl std::fmt::Debug for RemoteModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteModel")
            .field("name", &self.name)
            .field("nr_vcpus", &self.nr_vcpus)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl RemoteModel {
    pub(crate) fn new(
        shared: Arc<Shared>,
        res: Arc<Resources>,
        bufioreq: BufioreqMode,
        opts: RemoteOptions,
    ) -> Self {
        RemoteModel {
            name: shared.name.clone(),
            nr_vcpus: res.vcpu_bells.len() as u32,
            shared,
            res,
            bufioreq,
            spinner: Spinner::new(opts.spin, opts.spin_mode, Awaited::Answer),
            opts,
            seq: 0,
            told: vec![],
            told_gen: u64::MAX,
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        if self.seq == 0 {
            self.seq = 1;
        }
        self.seq
    }

    /// Applies the DMOPs the connection thread queued while a request is in flight.
    fn apply_ops(&self, mut ctl: Option<&mut (dyn DmControl + '_)>) {
        self.shared.has_ops.store(false, Ordering::Release);
        loop {
            let Some(op) = self.shared.inbox().ops.pop_front() else {
                return;
            };
            let r = match ctl.as_deref_mut() {
                Some(c) => {
                    self.shared
                        .counters
                        .dmops_in_request
                        .fetch_add(1, Ordering::Relaxed);
                    match op.op {
                        Dmop::Claim(DmopKind::Map, claim) => c.map(claim).map_err(DmopError::from),
                        Dmop::Claim(DmopKind::Unmap, claim) => {
                            c.unmap(claim).map_err(DmopError::from)
                        }
                        Dmop::InjectMsi { addr, data } => {
                            c.inject_msi(addr, data).map_err(DmopError::from)
                        }
                    }
                }
                // Serving a broadcast (INVALIDATE), the model has no `ctl`: nothing reaches
                // the engine until it answers. An MSI may be sent again after that.
                None => Err(op.op.refused(
                    Code::EAGAIN,
                    "DMOPs cannot be applied while the multiplexer waits for a broadcast",
                )),
            };
            let _ = op.reply.send(r);
        }
    }

    /// Sends POSITION_MOVED for every claimed position whose resolution changed since the
    /// device model was last told, before the request that might depend on it.
    fn tell_moves(&mut self, ctl: &dyn DmControl) -> Result<(), DmError> {
        let gen_now = self.shared.positions_gen.load(Ordering::Acquire);
        if gen_now != self.told_gen {
            let claimed = self.shared.inbox().positions.clone();
            self.told.retain(|(p, _)| claimed.contains(p));
            for p in claimed {
                if !self.told.iter().any(|(q, _)| *q == p) {
                    self.told.push((p, None));
                }
            }
            self.told_gen = gen_now;
        }
        let id = self.shared.id.load(Ordering::Relaxed) as u16;
        for (p, last) in &mut self.told {
            let now = ctl.locate(p);
            if now == *last {
                continue;
            }
            let sent = self.shared.send_notice(Notice::PositionMoved {
                id,
                position: p.clone(),
                sbdf: now,
            });
            if let Err(e) = sent {
                let why = format!("cannot send a position notice: {e}");
                self.shared.fault(Code::EPROTO, &why);
                return Err(DmError::Disconnected(self.name.clone()));
            }
            debug!(server = %self.name, position = %p, sbdf = ?now, "told the device model where its function is");
            *last = now;
        }
        Ok(())
    }

    fn refuse(&self, why: &str) -> DmError {
        self.shared.counters.refused.fetch_add(1, Ordering::Relaxed);
        if self.shared.is_dead() {
            DmError::Disconnected(self.name.clone())
        } else {
            DmError::Failed {
                name: self.name.clone(),
                msg: why.to_string(),
            }
        }
    }

    /// Tries the buffered ring for a write the options say may be buffered.
    fn try_buffer(&self, req: &Ioreq) -> bool {
        if self.bufioreq == BufioreqMode::Off
            || req.dir != Dir::Write
            || self.opts.buffered.is_empty()
        {
            return false;
        }
        let kind = match req.ty {
            IoreqType::Pio => RangeKind::Port,
            IoreqType::Copy => RangeKind::Mmio,
            _ => return false,
        };
        let (s, e) = req.byte_span();
        if !self
            .opts
            .buffered
            .iter()
            .any(|r| r.kind == kind && r.contains(s, e))
        {
            return false;
        }
        if self.res.pages.buffered().push(req, self.bufioreq).is_err() {
            return false; // not bufferable or full: synchronous instead, as Xen does
        }
        self.shared
            .counters
            .buffered
            .fetch_add(1, Ordering::Relaxed);
        let _ = self.ring_dm(&self.res.buf_bell);
        true
    }

    /// Rings one of the device model's eventfds after publishing work for it (a slot posted,
    /// a write queued), unless it says it is polling: `dm_is_polling` fences first, so the
    /// model either sees the work when it looks before sleeping or finds the eventfd rung
    /// (the argument is in [`super::notify`]). Says which it was.
    fn ring_dm(&self, bell: &Doorbell) -> io::Result<Peer> {
        let c = &self.shared.counters;
        if self.res.pages.notify().dm_is_polling() {
            c.bells_skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(Peer::Polling);
        }
        c.bells_rung.fetch_add(1, Ordering::Relaxed);
        bell.ring().map(|()| Peer::Rung)
    }

    /// Posts `req` in slot `vcpu` and waits for the answer.
    fn round_trip(
        &mut self,
        vcpu: u32,
        req: &Ioreq,
        mut ctl: Option<&mut (dyn DmControl + '_)>,
    ) -> Result<u64, DmError> {
        let v = vcpu as usize;
        let res = Arc::clone(&self.res);
        let (Some(slot), Some(bell)) = (res.pages.slot(v), res.vcpu_bells.get(v)) else {
            return Err(self.refuse(&format!(
                "vCPU {vcpu} has no slot ({} vCPUs)",
                self.nr_vcpus
            )));
        };
        let seq = self.next_seq();
        self.shared.inbox().in_request = true;
        if !slot.post(req, seq) {
            let (s, st) = slot.control();
            self.leave_request(ctl);
            let why = format!(
                "slot of vCPU {vcpu} is in state {st} (sequence {s}), not NONE, before request {seq}"
            );
            self.shared.fault(Code::EPROTO, &why);
            return Err(DmError::Disconnected(self.name.clone()));
        }
        self.shared
            .counters
            .requests
            .fetch_add(1, Ordering::Relaxed);
        let r = match self.ring_dm(bell) {
            Ok(peer) => {
                let ticket = self.spinner.start(peer);
                let (r, outcome) = self.wait(vcpu, seq, ticket, ctl.as_deref_mut());
                if let Some(o) = outcome {
                    self.spinner.finish(ticket, o);
                }
                r
            }
            Err(e) => {
                self.shared.fault(
                    Code::EIO,
                    &format!("cannot ring vCPU {vcpu}'s eventfd: {e}"),
                );
                Err(DmError::Disconnected(self.name.clone()))
            }
        };
        self.leave_request(ctl);
        r
    }

    /// Ends the in-request window and applies any DMOP queued just before it closed.
    fn leave_request(&self, ctl: Option<&mut (dyn DmControl + '_)>) {
        let late = {
            let mut ib = self.shared.inbox();
            ib.in_request = false;
            !ib.ops.is_empty()
        };
        if late {
            self.apply_ops(ctl);
        }
    }

    /// Looks at slot `vcpu` once: `None` while request `seq` is unanswered; a protocol
    /// violation faults the server.
    fn check(&self, slot: &SlotWords, vcpu: u32, seq: u32) -> Option<Result<u64, DmError>> {
        match slot.collect(seq) {
            Collect::Pending => None,
            Collect::Done(d) => Some(Ok(d)),
            Collect::Violation { state, seq: s } => {
                let why = format!(
                    "vCPU {vcpu} request {seq}: slot went to state {state} with sequence {s} (protocol violation)"
                );
                self.shared.fault(Code::EPROTO, &why);
                Some(Err(DmError::Failed {
                    name: self.name.clone(),
                    msg: why,
                }))
            }
        }
    }

    /// Waits for the answer to request `seq` in slot `vcpu`: spins for the ticket's budget,
    /// then sleeps. Also says how the wait ended, for the spin policy (`None`: it did not end
    /// with an answer).
    fn wait(
        &self,
        vcpu: u32,
        seq: u32,
        ticket: Ticket,
        mut ctl: Option<&mut (dyn DmControl + '_)>,
    ) -> (Result<u64, DmError>, Option<Outcome>) {
        let Some(slot) = self.res.pages.slot(vcpu as usize) else {
            return (Err(self.refuse("no slot")), None);
        };
        let start = Instant::now();
        let w = Waiting {
            slot,
            vcpu,
            seq,
            start,
        };
        if !ticket.budget.is_zero() {
            if let Some(r) = self.spin(&w, ticket.budget, ctl.as_deref_mut()) {
                let ok = r.is_ok();
                if ok {
                    self.shared.counters.spun.fetch_add(1, Ordering::Relaxed);
                }
                return (r, ok.then(|| Outcome::Spun(start.elapsed())));
            }
        }
        let r = self.sleep(&w, ctl);
        let ok = r.is_ok();
        if ok {
            self.shared.counters.blocked.fetch_add(1, Ordering::Relaxed);
        }
        (r, ok.then(|| Outcome::Slept(start.elapsed())))
    }

    /// Polls the slot for up to `budget` after `start`, saying so in the notification page.
    /// `None`: no answer yet (the caller sleeps). The flag may stay set after an answer (the
    /// next wait sets it again anyway, or clears it before it sleeps), since this side looks
    /// at the slot before it ever sleeps.
    fn spin(
        &self,
        w: &Waiting<'_>,
        budget: Duration,
        mut ctl: Option<&mut (dyn DmControl + '_)>,
    ) -> Option<Result<u64, DmError>> {
        self.res.pages.notify().set_mux_polling(w.vcpu as usize);
        let mut polls = 0u32;
        loop {
            if let Some(r) = self.check(w.slot, w.vcpu, w.seq) {
                return Some(r);
            }
            if self.shared.is_dead() {
                return Some(Err(DmError::Disconnected(self.name.clone())));
            }
            if self.shared.has_ops.load(Ordering::Acquire) {
                self.apply_ops(ctl.as_deref_mut());
            }
            // The clock only every few polls: reading it takes longer than a poll.
            polls = polls.wrapping_add(1);
            if polls % CLOCK_EVERY == 0 && w.start.elapsed() >= budget {
                return None;
            }
            std::hint::spin_loop();
        }
    }

    /// Blocks on the response eventfd (and the connection thread's wake-up) until the answer
    /// comes, the server dies or the deadline passes.
    fn sleep(
        &self,
        w: &Waiting<'_>,
        mut ctl: Option<&mut (dyn DmControl + '_)>,
    ) -> Result<u64, DmError> {
        let (vcpu, seq) = (w.vcpu, w.seq);
        // Before sleeping: clear the flag (an earlier wait may have left it set, even if this
        // one did not spin) and fence; the loop looks at the slot once more before its first
        // sleep (see `super::notify`).
        self.res.pages.notify().clear_mux_polling(vcpu as usize);
        loop {
            if let Some(r) = self.check(w.slot, vcpu, seq) {
                return r;
            }
            if self.shared.is_dead() {
                return Err(DmError::Disconnected(self.name.clone()));
            }
            let elapsed = w.start.elapsed();
            if elapsed >= self.opts.deadline {
                let why = format!(
                    "vCPU {vcpu} request {seq} not answered within {:?}",
                    self.opts.deadline
                );
                self.shared.fault(Code::ETIMEDOUT, &why);
                return Err(DmError::Timeout {
                    name: self.name.clone(),
                    after: self.opts.deadline,
                });
            }
            let left = self.opts.deadline - elapsed;
            // One system call: the eventfds are edge-triggered in an epoll set, so neither is
            // read back (a level-triggered eventfd would cost a read per wake-up).
            if let Err(e) = self.shared.waiter.wait(Some(left), |_, _| {}) {
                warn!(server = %self.name, error = %e, "epoll_wait failed; retrying");
            }
            if self.shared.has_ops.load(Ordering::Acquire) {
                self.apply_ops(ctl.as_deref_mut());
            }
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> RemoteStats {
        self.shared.stats()
    }
}

impl DeviceModel for RemoteModel {
    fn name(&self) -> &str {
        &self.name
    }

    /// The device model makes its claims itself, with DMOPs on its socket.
    fn attach(&mut self, _ctl: &mut dyn DmControl) -> Result<(), ClaimError> {
        info!(server = %self.name, vcpus = self.nr_vcpus, "out-of-process device model added");
        Ok(())
    }

    fn handle(&mut self, vcpu: u32, req: &Ioreq, ctl: &mut dyn DmControl) -> Result<u64, DmError> {
        if self.shared.is_dead() {
            return Err(self.refuse("gone"));
        }
        if !self.shared.enabled.load(Ordering::Acquire) {
            return Err(self.refuse("server is disabled"));
        }
        if self.try_buffer(req) {
            return Ok(0);
        }
        self.tell_moves(ctl)?;
        let v = self.round_trip(vcpu, req, Some(ctl))?;
        Ok(if req.dir == Dir::Read { v } else { 0 })
    }

    /// TIMEOFFSET goes through the buffered ring (dropped without one, as Xen does);
    /// INVALIDATE is synchronous through vCPU 0's slot.
    fn broadcast(&mut self, req: &Ioreq) -> Result<(), DmError> {
        if self.shared.is_dead() || !self.shared.enabled.load(Ordering::Acquire) {
            return Ok(());
        }
        match req.ty {
            IoreqType::TimeOffset => {
                if self.bufioreq != BufioreqMode::Off
                    && self.res.pages.buffered().push(req, self.bufioreq).is_ok()
                {
                    let _ = self.ring_dm(&self.res.buf_bell);
                }
                Ok(())
            }
            _ => self.round_trip(0, req, None).map(|_| ()),
        }
    }
}

impl Drop for RemoteModel {
    fn drop(&mut self) {
        let st = self.stats();
        debug!(
            server = %self.name,
            requests = st.requests,
            spun = st.spun,
            blocked = st.blocked,
            bells_rung = st.bells_rung,
            bells_skipped = st.bells_skipped,
            spinner = ?self.spinner,
            "remote model dropped"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// On one CPU the default options never spin; with more they do. The thread's affinity
    /// is what counts (as for a dom0 with one vCPU, or a pinned service).
    #[test]
    fn no_spinning_on_one_cpu() {
        use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
        use nix::unistd::Pid;
        std::thread::spawn(|| {
            let all = sched_getaffinity(Pid::from_raw(0)).unwrap();
            let first = (0..CpuSet::count())
                .find(|&c| all.is_set(c).unwrap_or(false))
                .unwrap();
            let mut one = CpuSet::new();
            one.set(first).unwrap();
            sched_setaffinity(Pid::from_raw(0), &one).unwrap();
            assert_eq!(RemoteOptions::default().spin, Duration::ZERO);
            assert_eq!(spin_budget(Duration::from_micros(50)), Duration::ZERO);
            let cpus = (0..CpuSet::count())
                .filter(|&c| all.is_set(c).unwrap_or(false))
                .count();
            sched_setaffinity(Pid::from_raw(0), &all).unwrap();
            if cpus > 1 {
                assert_eq!(RemoteOptions::default().spin, Duration::from_micros(50));
            }
        })
        .join()
        .unwrap();
    }
}
