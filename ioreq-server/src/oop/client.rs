//! The device-model side: connect to the multiplexer, create an ioreq server, let a
//! [`DeviceModel`] make its claims, enable, and serve requests from the shared page until
//! told to stop. The model is the same one that would run inside the multiplexer.
//!
//! ```no_run
//! # use ioreq_server::{DeviceModel, DmControl, DmError, ClaimError, Ioreq};
//! # struct M;
//! # impl DeviceModel for M {
//! #     fn name(&self) -> &str { "uart" }
//! #     fn attach(&mut self, ctl: &mut dyn DmControl) -> Result<(), ClaimError> { Ok(()) }
//! #     fn handle(&mut self, _: u32, _: &Ioreq, _: &mut dyn DmControl) -> Result<u64, DmError> { Ok(0) }
//! # }
//! let ended = ioreq_server::oop::serve("/run/ioreq-mux/dm.sock".as_ref(), &mut M)?;
//! # Ok::<(), ioreq_server::oop::ClientError>(())
//! ```

use super::notify::NotifyPage;
use super::remote::{CLOCK_EVERY, spin_budget};
use super::shm::SharedPages;
use super::spin::{Awaited, Outcome, Peer, SpinMode, Spinner, Ticket};
use super::sys::{Doorbell, SeqPacket, wait_readable};
use super::wire::{self, Code, Info, Message, Notice, Reply, Request};
use crate::bufioreq::BufioreqMode;
use crate::ioreq::{Dir, Ioreq, IoreqType, size_mask};
use crate::model::{BackendError, ClaimError, DeviceModel, DmControl, MsiError};
use crate::range::{Claim, Position, RangeKind};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;
use tracing::{debug, info, warn};

/// Why serving stopped with an error.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("device-model socket: {0}")]
    Io(#[from] io::Error),
    #[error("the multiplexer refused {op}: {code}: {message}", op = wire::op::name(*.op))]
    Refused {
        op: u16,
        code: Code,
        message: String,
    },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the model's initial claims failed: {0}")]
    Attach(#[source] ClaimError),
    #[error("the multiplexer closed the connection{}", match .goodbye {
        Some((c, m)) => format!(" ({c}: {m})"),
        None => String::new(),
    })]
    Disconnected { goodbye: Option<(Code, String)> },
}

/// How serving ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// [`Stopper::stop`] was called; the server was destroyed.
    Stopped,
    /// The multiplexer said goodbye without blaming the model (it is shutting down).
    Closed { code: Code, message: String },
}

/// Stops a running [`serve_with`] from another thread.
#[derive(Debug, Clone)]
pub struct Stopper {
    inner: Arc<(AtomicBool, Doorbell)>,
}

impl Stopper {
    pub fn new() -> io::Result<Self> {
        Ok(Stopper {
            inner: Arc::new((AtomicBool::new(false), Doorbell::new()?)),
        })
    }

    pub fn stop(&self) {
        self.inner.0.store(true, Ordering::Release);
        let _ = self.inner.1.ring();
    }

    fn stopped(&self) -> bool {
        self.inner.0.load(Ordering::Acquire)
    }
}

/// Device-model options.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Buffered ring mode asked for at create.
    pub bufioreq: BufioreqMode,
    /// After serving, keep polling the slots at most this long before sleeping in `poll`
    /// (lower latency for bursts, at the cost of a busy core). While it polls, the model
    /// says so in the notification page and the multiplexer does not ring its eventfds. How
    /// long it really polls adapts to the load ([`super::spin`]): at most twice the recent
    /// wait for the next request, less and then not at all while polls keep ending in a
    /// sleep, and never on one CPU; `IOREQ_MUX_SPIN=fixed` in the environment makes it poll
    /// this long every time.
    pub spin: Duration,
    pub stop: Option<Stopper>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            bufioreq: BufioreqMode::Atomic,
            spin: Duration::ZERO,
            stop: None,
        }
    }
}

/// The shared memory and eventfds of a created server.
#[derive(Debug)]
pub struct ServerPages {
    pub info: Info,
    pub pages: SharedPages,
    pub buf_bell: Doorbell,
    pub resp_bell: Doorbell,
    pub vcpu_bells: Vec<Doorbell>,
}

/// A connection to the multiplexer's control socket (one ioreq server at most).
#[derive(Debug)]
pub struct Connection {
    sock: SeqPacket,
    next_tag: u32,
    buf: Vec<u8>,
    /// Where each claimed position is, as the multiplexer last said.
    located: HashMap<Position, u32>,
    goodbye: Option<(Code, String)>,
    name: String,
}

impl Connection {
    pub fn connect(path: &Path) -> io::Result<Self> {
        Ok(Connection {
            sock: SeqPacket::connect(path)?,
            next_tag: 1,
            buf: vec![0u8; wire::MAX_MESSAGE + 1],
            located: HashMap::new(),
            goodbye: None,
            name: String::new(),
        })
    }

    /// The raw socket (tests send malformed packets with it).
    pub fn socket(&self) -> &SeqPacket {
        &self.sock
    }

    /// The goodbye notice, if the multiplexer sent one.
    pub fn goodbye(&self) -> Option<&(Code, String)> {
        self.goodbye.as_ref()
    }

    fn disconnected(&self) -> ClientError {
        ClientError::Disconnected {
            goodbye: self.goodbye.clone(),
        }
    }

    fn notice(&mut self, n: Notice) {
        match n {
            Notice::PositionMoved { position, sbdf, .. } => {
                debug!(%position, ?sbdf, "position moved");
                match sbdf {
                    Some(s) => self.located.insert(position, s),
                    None => self.located.remove(&position),
                };
            }
            Notice::Goodbye { code, message } => {
                info!(%code, %message, "the multiplexer said goodbye");
                self.goodbye = Some((code, message));
            }
        }
    }

    /// Receives one message (blocking or not). `Ok(None)`: nothing queued.
    pub fn recv(&mut self, wait: bool) -> Result<Option<(Message, Vec<OwnedFd>)>, ClientError> {
        let r = match self.sock.recv(&mut self.buf, wait) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(self.disconnected()),
            Err(e) => return Err(e.into()),
        };
        if r.len == 0 {
            return Err(self.disconnected());
        }
        if r.truncated {
            return Err(ClientError::Protocol(
                "truncated message from the multiplexer".into(),
            ));
        }
        let m = wire::decode(&self.buf[..r.len]).map_err(|e| match e {
            wire::WireError::Version(v) => ClientError::Protocol(format!(
                "the multiplexer speaks device-model protocol version {v}; this device model speaks version {}",
                wire::VERSION
            )),
            e => ClientError::Protocol(e.to_string()),
        })?;
        Ok(Some((m, r.fds)))
    }

    /// Handles every notice already queued, without blocking.
    pub fn pump(&mut self) -> Result<(), ClientError> {
        while let Some((m, _)) = self.recv(false)? {
            match m {
                Message::Notice(n) => self.notice(n),
                other => warn!(?other, "unexpected message from the multiplexer ignored"),
            }
        }
        Ok(())
    }

    /// Sends a request and waits for its reply, handling notices that arrive meanwhile.
    pub fn call(&mut self, req: Request) -> Result<(Reply, Vec<OwnedFd>), ClientError> {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1).max(1);
        let op = req.op();
        let bytes = wire::encode(&Message::Request { tag, req })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        match self.sock.send(&bytes, &[]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(self.disconnected()),
            Err(e) => return Err(e.into()),
        }
        loop {
            let Some((m, fds)) = self.recv(true)? else {
                continue;
            };
            match m {
                Message::Notice(n) => self.notice(n),
                Message::Reply { tag: t, reply } if t == tag => {
                    return match reply {
                        Reply::Error { code, message, .. } => {
                            Err(ClientError::Refused { op, code, message })
                        }
                        r => Ok((r, fds)),
                    };
                }
                other => warn!(?other, "unexpected message while waiting for a reply"),
            }
        }
    }

    fn expect_done(&mut self, req: Request) -> Result<(), ClientError> {
        match self.call(req)?.0 {
            Reply::Done { .. } => Ok(()),
            r => Err(ClientError::Protocol(format!("unexpected reply {r:?}"))),
        }
    }

    /// `create_ioreq_server`: returns the id and the number of vCPUs.
    pub fn create(
        &mut self,
        name: &str,
        bufioreq: BufioreqMode,
    ) -> Result<(u16, u32), ClientError> {
        self.name = name.to_string();
        match self
            .call(Request::Create {
                bufioreq,
                name: name.to_string(),
            })?
            .0
        {
            Reply::Created { id, nr_vcpus } => Ok((id, nr_vcpus)),
            r => Err(ClientError::Protocol(format!("unexpected reply {r:?}"))),
        }
    }

    /// `get_ioreq_server_info`: maps the shared memory and takes the eventfds.
    pub fn get_info(&mut self, id: u16) -> Result<ServerPages, ClientError> {
        let (reply, fds) = self.call(Request::GetInfo { id })?;
        let Reply::Info(info) = reply else {
            return Err(ClientError::Protocol(format!("unexpected reply {reply:?}")));
        };
        if info.shm_size as usize != super::shm::SHM_SIZE
            || info.buf_offset as usize != super::shm::BUF_OFFSET
            || info.ioreq_offset as usize != super::shm::IOREQ_OFFSET
            || info.notify_offset as usize != super::shm::NOTIFY_OFFSET
            || info.nr_vcpus as usize > crate::abi::SHARED_PAGE_SLOTS
        {
            return Err(ClientError::Protocol(format!(
                "unsupported memory layout {info:?}"
            )));
        }
        if fds.len() != 3 + info.nr_vcpus as usize {
            return Err(ClientError::Protocol(format!(
                "{} descriptors for {} vCPUs (expected {})",
                fds.len(),
                info.nr_vcpus,
                3 + info.nr_vcpus
            )));
        }
        let mut it = fds.into_iter();
        let mut next = || {
            it.next()
                .ok_or_else(|| ClientError::Protocol("descriptor missing".into()))
        };
        let pages = SharedPages::open(next()?)?;
        let buf_bell = Doorbell::from_fd(next()?);
        let resp_bell = Doorbell::from_fd(next()?);
        let vcpu_bells = (0..info.nr_vcpus)
            .map(|_| next().map(Doorbell::from_fd))
            .collect::<Result<_, _>>()?;
        Ok(ServerPages {
            info,
            pages,
            buf_bell,
            resp_bell,
            vcpu_bells,
        })
    }

    pub fn map(&mut self, id: u16, claim: Claim) -> Result<(), ClientError> {
        self.expect_done(match claim {
            Claim::Range(r) if r.kind == RangeKind::Pci && r.start == r.end => Request::MapPcidev {
                id,
                sbdf: r.start as u32,
            },
            Claim::Range(range) => Request::MapRange { id, range },
            Claim::Position(position) => Request::MapPosition { id, position },
        })
    }

    pub fn unmap(&mut self, id: u16, claim: Claim) -> Result<(), ClientError> {
        if let Claim::Position(p) = &claim {
            self.located.remove(p);
        }
        self.expect_done(match claim {
            Claim::Range(r) if r.kind == RangeKind::Pci && r.start == r.end => {
                Request::UnmapPcidev {
                    id,
                    sbdf: r.start as u32,
                }
            }
            Claim::Range(range) => Request::UnmapRange { id, range },
            Claim::Position(position) => Request::UnmapPosition { id, position },
        })
    }

    /// `inject_msi`: the guest gets the MSI `data` at `addr`, through the multiplexer's
    /// hypervisor.
    pub fn inject_msi(&mut self, id: u16, addr: u64, data: u32) -> Result<(), ClientError> {
        self.expect_done(Request::InjectMsi { id, addr, data })
    }

    pub fn set_state(&mut self, id: u16, enabled: bool) -> Result<(), ClientError> {
        self.expect_done(Request::SetState { id, enabled })
    }

    pub fn destroy(&mut self, id: u16) -> Result<(), ClientError> {
        self.expect_done(Request::Destroy { id })
    }

    /// Where a claimed position is, as the multiplexer last said.
    pub fn locate(&self, p: &Position) -> Option<u32> {
        self.located.get(p).copied()
    }

    /// A [`DmControl`] that sends DMOPs for server `id`.
    pub fn control(&mut self, id: u16) -> Control<'_> {
        Control { conn: self, id }
    }
}

/// DMOPs of one server, as a [`DmControl`] for the model.
#[derive(Debug)]
pub struct Control<'a> {
    conn: &'a mut Connection,
    id: u16,
}

/// The owner named by a refused claim's message: the server sends the whole conflict
/// (`CLAIM requested by X is already owned by OWNER`), which [`ClaimError::Conflict`] would
/// otherwise repeat.
fn conflict_owner(message: String) -> String {
    match message.rsplit_once(" is already owned by ") {
        Some((_, owner)) => owner.to_string(),
        None => message,
    }
}

fn claim_error(e: ClientError, claim: &Claim, requester: &str) -> ClaimError {
    let claim = claim.clone();
    let requester = requester.to_string();
    match e {
        ClientError::Refused { code, message, .. } => match code {
            Code::EPERM => ClaimError::NotGranted { claim, requester },
            Code::ENOENT => ClaimError::NotOwned { claim, requester },
            Code::EBUSY => ClaimError::Conflict {
                claim,
                requester,
                owner: conflict_owner(message),
            },
            Code::EINVAL => ClaimError::Invalid {
                claim,
                why: message,
            },
            _ => ClaimError::Backend {
                claim,
                source: BackendError::Other(format!("{code}: {message}")),
            },
        },
        other => ClaimError::Backend {
            claim,
            source: BackendError::Other(other.to_string()),
        },
    }
}

/// What the model is told when the multiplexer does not send its MSI: not supported (the
/// hypervisor cannot, or a multiplexer older than the op) or refused.
fn msi_error(e: ClientError, addr: u64, data: u32) -> MsiError {
    let source = match e {
        ClientError::Refused { code, message, .. } => match code {
            Code::ENOSYS | Code::EOPNOTSUPP => {
                return MsiError::Unsupported {
                    why: format!("{code}: {message}"),
                };
            }
            _ => BackendError::Other(format!("{code}: {message}")),
        },
        ClientError::Disconnected { .. } => BackendError::Disconnected,
        other => BackendError::Other(other.to_string()),
    };
    MsiError::Backend { addr, data, source }
}

impl DmControl for Control<'_> {
    fn map(&mut self, claim: Claim) -> Result<(), ClaimError> {
        let name = self.conn.name.clone();
        self.conn
            .map(self.id, claim.clone())
            .map_err(|e| claim_error(e, &claim, &name))
    }

    fn unmap(&mut self, claim: Claim) -> Result<(), ClaimError> {
        let name = self.conn.name.clone();
        self.conn
            .unmap(self.id, claim.clone())
            .map_err(|e| claim_error(e, &claim, &name))
    }

    fn locate(&self, position: &Position) -> Option<u32> {
        self.conn.locate(position)
    }

    fn inject_msi(&mut self, addr: u64, data: u32) -> Result<(), MsiError> {
        self.conn
            .inject_msi(self.id, addr, data)
            .map_err(|e| msi_error(e, addr, data))
    }
}

/// Connects to `socket`, creates a server named after the model, attaches the model,
/// enables the server and serves requests until the multiplexer closes the connection.
pub fn serve(socket: &Path, model: &mut dyn DeviceModel) -> Result<Ended, ClientError> {
    serve_with(socket, model, &ClientOptions::default())
}

/// [`serve`] with options (a [`Stopper`], spinning, the buffered ring mode).
pub fn serve_with(
    socket: &Path,
    model: &mut dyn DeviceModel,
    opts: &ClientOptions,
) -> Result<Ended, ClientError> {
    let mut conn = Connection::connect(socket)?;
    let (id, nr_vcpus) = conn.create(model.name(), opts.bufioreq)?;
    let sp = conn.get_info(id)?;
    info!(server = model.name(), id, nr_vcpus, "ioreq server created");
    if let Err(e) = model.attach(&mut conn.control(id)) {
        let _ = conn.destroy(id);
        return Err(ClientError::Attach(e));
    }
    conn.set_state(id, true)?;
    run(&mut conn, id, &sp, model, opts)
}

/// The request loop of a created, attached and enabled server.
///
/// No system call on the request path while both sides poll: the socket is read only when
/// the notification page's notice counter moved (or, while sleeping, when `poll` says it is
/// readable), the response eventfd is rung only when the multiplexer is not polling the
/// slot, and while this loop polls it says so, so the multiplexer does not ring the request
/// eventfds. The rules, and why no wake-up is lost, are in [`super::notify`].
pub fn run(
    conn: &mut Connection,
    id: u16,
    sp: &ServerPages,
    model: &mut dyn DeviceModel,
    opts: &ClientOptions,
) -> Result<Ended, ClientError> {
    let nr = sp.vcpu_bells.len();
    let notify = sp.pages.notify();
    let mut batch: Vec<Ioreq> = Vec::with_capacity(64);
    let mut waits = Waits::new(opts.spin);
    // What the multiplexer was doing when this side last answered it: polling for the
    // answer (so it is on a CPU and the next request may come soon), or rung awake.
    let mut peer = Peer::Polling;
    // Notices already queued are read now; from here on the counter says when to look.
    let mut seen = notify.notices();
    if let Some(end) = pump(conn)? {
        return end;
    }
    loop {
        if opts.stop.as_ref().is_some_and(Stopper::stopped) {
            let _ = conn.destroy(id);
            return Ok(Ended::Stopped);
        }
        if let Some(end) = pump_if_noticed(conn, notify, &mut seen)? {
            return end;
        }
        let mut served = drain_ring(conn, id, sp, model, &mut batch);
        for v in 0..nr {
            if let Some(p) = serve_slot(conn, id, sp, model, v, &mut batch, &mut seen)? {
                (served, peer) = (true, p);
            }
        }
        if served {
            continue;
        }
        let ticket = waits.spinner.start(peer);
        let start = Instant::now();
        if !ticket.budget.is_zero() {
            notify.set_dm_polling();
            let stopped = || opts.stop.as_ref().is_some_and(Stopper::stopped);
            if poll_for_work(sp, nr, start, ticket.budget, || {
                notify.notices() != seen || stopped()
            }) {
                waits.finish(ticket, Outcome::Spun(start.elapsed()));
                continue;
            }
        }
        // About to sleep: stop saying "polling", fence, and look once more. Work published
        // before the multiplexer could see the flag cleared is found here; work published
        // after it rings an eventfd (see `super::notify`).
        notify.clear_dm_polling();
        if has_work(sp, nr) {
            // Just past the budget: no sleep, but a longer wait than the budget allowed.
            waits.finish(ticket, Outcome::Spun(start.elapsed()));
            continue;
        }
        // (A device model's wait is for a request, whose budget does not depend on how long
        // the sleeps take: the time so far is enough.)
        waits.finish(ticket, Outcome::Slept(start.elapsed()));
        let mut fds: Vec<BorrowedFd<'_>> = Vec::with_capacity(nr + 3);
        fds.push(conn.sock.as_fd());
        fds.push(sp.buf_bell.as_fd());
        fds.extend(sp.vcpu_bells.iter().map(AsFd::as_fd));
        if let Some(s) = &opts.stop {
            fds.push(s.inner.1.as_fd());
        }
        let ready = wait_readable(&fds, Some(Duration::from_secs(1)))?;
        // Read only the eventfds that rang (each read is a system call).
        if ready.get(1).is_some_and(|r| r.readable) {
            let _ = sp.buf_bell.clear();
        }
        for (b, r) in sp.vcpu_bells.iter().zip(ready.iter().skip(2)) {
            if r.readable {
                let _ = b.clear();
            }
        }
        // The socket: a notice, or the end of the connection (which may come without one,
        // if the multiplexer's process died).
        if ready.first().is_some_and(|r| r.readable || r.hangup) {
            let now = notify.notices();
            if let Some(end) = pump(conn)? {
                return end;
            }
            seen = now;
        }
    }
}

/// The device model's waits for work: the policy, and how they ended (logged at the end).
#[derive(Debug)]
struct Waits {
    spinner: Spinner,
    spun: u64,
    slept: u64,
}

impl Waits {
    /// For a configured maximum spin `max`: adaptive (and none on one CPU) unless
    /// `IOREQ_MUX_SPIN=fixed` asks for the fixed spin of old.
    fn new(max: Duration) -> Self {
        let spinner = match SpinMode::from_env() {
            SpinMode::Fixed => Spinner::new(max, SpinMode::Fixed, Awaited::Request),
            SpinMode::Adaptive => {
                Spinner::new(spin_budget(max), SpinMode::Adaptive, Awaited::Request)
            }
        };
        Waits {
            spinner,
            spun: 0,
            slept: 0,
        }
    }

    fn finish(&mut self, t: Ticket, o: Outcome) {
        match o {
            Outcome::Spun(_) => self.spun += 1,
            Outcome::Slept(_) => self.slept += 1,
        }
        self.spinner.finish(t, o);
    }
}

impl Drop for Waits {
    fn drop(&mut self) {
        debug!(spun = self.spun, slept = self.slept, spinner = ?self.spinner, "waits for work");
    }
}

/// Polls the slots and the ring until there is work or `other()` (true), or `budget` has
/// passed since `start` (false). The clock is read only every few polls: reading it takes
/// longer than a poll.
fn poll_for_work(
    sp: &ServerPages,
    nr: usize,
    start: Instant,
    budget: Duration,
    mut other: impl FnMut() -> bool,
) -> bool {
    let mut polls = 0u32;
    loop {
        if has_work(sp, nr) || other() {
            return true;
        }
        polls = polls.wrapping_add(1);
        if polls % CLOCK_EVERY == 0 && start.elapsed() >= budget {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// A READY slot or a buffered write waiting.
fn has_work(sp: &ServerPages, nr: usize) -> bool {
    sp.pages.buffered().pending() != 0
        || (0..nr).any(|v| {
            sp.pages
                .slot(v)
                .is_some_and(|s| s.control().1 == crate::abi::STATE_IOREQ_READY)
        })
}

/// Reads every queued notice. `Some`: the connection ended, and how serving ends.
#[allow(clippy::type_complexity)]
fn pump(conn: &mut Connection) -> Result<Option<Result<Ended, ClientError>>, ClientError> {
    match conn.pump() {
        Ok(()) => Ok(None),
        Err(ClientError::Disconnected { goodbye }) => Ok(Some(closed(goodbye))),
        Err(e) => Err(e),
    }
}

/// [`pump`] if the notice counter moved since `seen`. `seen` becomes the value loaded before
/// reading, so a notice sent meanwhile moves the counter past it again; it stays unchanged
/// if the connection ended, so the next call reads the end again.
#[allow(clippy::type_complexity)]
fn pump_if_noticed(
    conn: &mut Connection,
    notify: &NotifyPage,
    seen: &mut u64,
) -> Result<Option<Result<Ended, ClientError>>, ClientError> {
    let now = notify.notices();
    if now == *seen {
        return Ok(None);
    }
    let r = pump(conn)?;
    if r.is_none() {
        *seen = now;
    }
    Ok(r)
}

fn closed(goodbye: Option<(Code, String)>) -> Result<Ended, ClientError> {
    match goodbye {
        Some((code, message)) if code == Code::NONE || code == Code::ESHUTDOWN => {
            Ok(Ended::Closed { code, message })
        }
        goodbye => Err(ClientError::Disconnected { goodbye }),
    }
}

/// Serves every write queued on the buffered ring, oldest first.
fn drain_ring(
    conn: &mut Connection,
    id: u16,
    sp: &ServerPages,
    model: &mut dyn DeviceModel,
    batch: &mut Vec<Ioreq>,
) -> bool {
    batch.clear();
    if let Err(e) = sp.pages.buffered().drain(|r| batch.push(r)) {
        warn!(error = %e, "bad entry on the buffered ring");
    }
    for req in batch.drain(..) {
        let r = if req.ty == IoreqType::TimeOffset {
            model.broadcast(&req)
        } else {
            model.handle(0, &req, &mut conn.control(id)).map(|_| ())
        };
        if let Err(e) = r {
            warn!(error = %e, ?req, "buffered write failed");
        }
    }
    !batch.is_empty()
}

/// Takes and serves the request in slot `v`, if there is one. Says whether the
/// multiplexer was polling for the answer or had to be rung (`None`: nothing to serve).
fn serve_slot(
    conn: &mut Connection,
    id: u16,
    sp: &ServerPages,
    model: &mut dyn DeviceModel,
    v: usize,
    batch: &mut Vec<Ioreq>,
    seen: &mut u64,
) -> Result<Option<Peer>, ClientError> {
    let Some(slot) = sp.pages.slot(v) else {
        return Ok(None);
    };
    let Some(t) = slot.take() else {
        return Ok(None);
    };
    // Notices sent before the request (a position moved) are queued by now, and counted in
    // the notification page (bumped before the request was posted, which `take` acquired);
    // so are buffered writes made before it. Both are handled first. The end of the
    // connection is seen by the loop; this request is still answered.
    let _ended = pump_if_noticed(conn, sp.pages.notify(), seen)?;
    drain_ring(conn, id, sp, model, batch);
    let data = match t.req {
        Ok(req) => match req.ty {
            IoreqType::TimeOffset | IoreqType::Invalidate => {
                if let Err(e) = model.broadcast(&req) {
                    warn!(error = %e, "broadcast failed");
                }
                None
            }
            _ => match model.handle(v as u32, &req, &mut conn.control(id)) {
                Ok(val) if req.dir == Dir::Read => Some(val & size_mask(req.size)),
                Ok(_) => None,
                Err(e) => {
                    warn!(error = %e, vcpu = v, "request failed; answered as a master abort");
                    (req.dir == Dir::Read).then(|| size_mask(req.size))
                }
            },
        },
        Err(e) => {
            warn!(error = %e, vcpu = v, "undecodable request; answered with all ones");
            Some(u64::MAX)
        }
    };
    if !slot.complete(t.seq, data) {
        warn!(
            vcpu = v,
            seq = t.seq,
            "slot changed under us; answer dropped"
        );
    }
    // `mux_is_polling` fences after the answer's store: the multiplexer either sees the
    // answer when it looks before sleeping, or has cleared its flag and is rung here.
    if sp.pages.notify().mux_is_polling(v) {
        return Ok(Some(Peer::Polling));
    }
    sp.resp_bell.ring()?;
    Ok(Some(Peer::Rung))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::IoRange;

    /// Before: "mmio ... requested by virtio-net is already owned by mmio ... requested by
    /// virtio-net is already owned by qemu" (the server's whole message taken as the owner).
    #[test]
    fn a_refused_claim_says_its_conflict_once() {
        let claim = Claim::Range(IoRange::new(RangeKind::Mmio, 0xffff_c000, 0xffff_ffff));
        let sent = ClaimError::Conflict {
            claim: claim.clone(),
            requester: "virtio-net".into(),
            owner: "qemu".into(),
        };
        let e = ClientError::Refused {
            op: 0,
            code: Code::EBUSY,
            message: sent.to_string(),
        };
        let got = claim_error(e, &claim, "virtio-net");
        assert_eq!(got, sent);
        assert_eq!(got.to_string().matches("requested by").count(), 1, "{got}");
    }
}
