//! The multiplexer's end of the control socket: a listener that accepts device models,
//! one thread per connection that decodes their DMOPs, and the glue that turns them into
//! calls on a [`Host`] (the engine, in `ioreq-mux`) or, while one of the server's requests
//! is in flight, hands them to its [`RemoteModel`].
//!
//! Per connection: at most one ioreq server. It exists from CREATE until DESTROY or until
//! the connection ends (a crash, a close, or the multiplexer dropping it after a fault);
//! then its claims are released with [`Host::remove`].

use super::remote::{
    Dmop, DmopKind, PendingOp, RemoteModel, RemoteOptions, RemoteStats, Resources, Shared,
};
use super::sys::{Doorbell, PeerCred, SeqListener, SeqPacket, wait_readable};
use super::wire::{self, Code, Info, Message, Notice, Reply, Request};
use crate::abi::SHARED_PAGE_SLOTS;
use crate::bufioreq::BufioreqMode;
use crate::model::{BackendError, ClaimError, DeviceModel, MsiError};
use crate::range::{Claim, IoRange};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{debug, info, warn};

/// Why a DMOP failed: the code and text of the error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmopError {
    pub code: Code,
    pub message: String,
}

impl DmopError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        DmopError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for DmopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for DmopError {}

/// The error code for a refused claim.
pub fn claim_code(e: &ClaimError) -> Code {
    match e {
        ClaimError::NotGranted { .. } => Code::EPERM,
        ClaimError::Conflict { .. } => Code::EBUSY,
        ClaimError::NotOwned { .. } | ClaimError::NoModel { .. } => Code::ENOENT,
        ClaimError::Invalid { .. } => Code::EINVAL,
        ClaimError::Backend { source, .. } => match source {
            BackendError::Overlap(_) => Code::EEXIST,
            BackendError::TooManyRanges { .. } => Code::ENOSPC,
            BackendError::NotMapped(_) => Code::ENOENT,
            BackendError::InvalidRange(_) => Code::EINVAL,
            _ => Code::EIO,
        },
    }
}

impl From<&ClaimError> for DmopError {
    fn from(e: &ClaimError) -> Self {
        DmopError::new(claim_code(e), e.to_string())
    }
}

impl From<ClaimError> for DmopError {
    fn from(e: ClaimError) -> Self {
        DmopError::from(&e)
    }
}

/// The error code for an MSI that was not sent.
pub fn msi_code(e: &MsiError) -> Code {
    match e {
        MsiError::Unsupported { .. } => Code::EOPNOTSUPP,
        MsiError::NoModel { .. } => Code::ENOENT,
        MsiError::Backend { .. } => Code::EIO,
    }
}

impl From<MsiError> for DmopError {
    fn from(e: MsiError) -> Self {
        DmopError::new(msi_code(&e), e.to_string())
    }
}

/// What the listener needs from the multiplexer: policy and the engine's control channel.
/// Calls come from connection threads, never from the engine's thread.
pub trait Host: Send + Sync + 'static {
    /// May a process with credentials `peer` serve the server called `name`? (Looks the
    /// name up in the configuration and checks the uid: ENOENT, EACCES.)
    fn admit(&self, name: &str, peer: &PeerCred) -> Result<(), DmopError>;
    /// vCPUs of the guest (1 to 128).
    fn nr_vcpus(&self) -> u32;
    /// Adds the model to the engine with the server's grant; returns the engine's index.
    fn add(&self, model: Box<dyn DeviceModel>) -> Result<u16, DmopError>;
    /// A claim made outside a request.
    fn map(&self, id: u16, claim: Claim) -> Result<(), DmopError>;
    /// A claim dropped outside a request.
    fn unmap(&self, id: u16, claim: Claim) -> Result<(), DmopError>;
    /// An MSI injected outside a request ([`crate::DmControl::inject_msi`] of the server's
    /// model). Every connected server may: Xen lets any device model of the domain.
    fn inject_msi(&self, id: u16, addr: u64, data: u32) -> Result<(), DmopError>;
    /// The server is gone: release its claims. Called once per added server.
    fn remove(&self, id: u16);
    /// How the multiplexer serves the server called `name` (its deadline, say); `default`
    /// is the listener's [`ServerOptions::remote`].
    fn remote_options(&self, _name: &str, default: &RemoteOptions) -> RemoteOptions {
        default.clone()
    }
}

/// How the listener serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// Permissions of the socket file.
    pub mode: u32,
    /// Request path of every server.
    pub remote: RemoteOptions,
    /// Longest a DMOP waits to be applied (by the engine, or by the request in flight).
    pub op_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            mode: 0o600,
            remote: RemoteOptions::default(),
            op_timeout: Duration::from_secs(5),
        }
    }
}

/// One connected device model, for status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStatus {
    pub name: Option<String>,
    /// The engine's index, once created.
    pub id: Option<u16>,
    pub enabled: bool,
    pub peer: PeerCred,
    pub stats: RemoteStats,
}

#[derive(Debug)]
struct Record {
    sock: Arc<SeqPacket>,
    peer: PeerCred,
    name: Option<String>,
    shared: Option<Arc<Shared>>,
}

#[derive(Debug, Default)]
struct Registry {
    conns: Mutex<HashMap<u64, Record>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Record>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The multiplexer's listening control socket and its connection threads.
#[derive(Debug)]
pub struct DmListener {
    path: PathBuf,
    reg: Arc<Registry>,
    stop: Arc<Doorbell>,
    stopping: Arc<AtomicBool>,
    accept: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl DmListener {
    /// Binds `path` (mode `opts.mode`, a stale socket replaced) and serves device models on
    /// background threads until [`DmListener::stop`] or drop.
    pub fn start(path: &Path, host: Arc<dyn Host>, opts: ServerOptions) -> io::Result<Self> {
        let listener = SeqListener::bind(path, opts.mode)?;
        let reg = Arc::new(Registry::default());
        let stop = Arc::new(Doorbell::new()?);
        let stopping = Arc::new(AtomicBool::new(false));
        let (reg2, stop2, stopping2) = (reg.clone(), stop.clone(), stopping.clone());
        let accept = std::thread::Builder::new()
            .name("dm-accept".into())
            .spawn(move || accept_loop(listener, host, opts, reg2, stop2, stopping2))?;
        info!(socket = %path.display(), "device-model socket listening");
        Ok(DmListener {
            path: path.to_path_buf(),
            reg,
            stop,
            stopping,
            accept: Some(accept),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every connected device model.
    pub fn servers(&self) -> Vec<ServerStatus> {
        let reg = self.reg.lock();
        let mut v: Vec<(u64, ServerStatus)> = reg
            .iter()
            .map(|(k, r)| {
                let (id, enabled, stats) = match &r.shared {
                    Some(s) => {
                        let id = s.id.load(Ordering::Relaxed);
                        (
                            (id != super::remote::NO_ID).then_some(id as u16),
                            s.enabled.load(Ordering::Relaxed) && !s.is_dead(),
                            s.stats(),
                        )
                    }
                    None => (None, false, RemoteStats::default()),
                };
                (
                    *k,
                    ServerStatus {
                        name: r.name.clone(),
                        id,
                        enabled,
                        peer: r.peer,
                        stats,
                    },
                )
            })
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// Says goodbye (ESHUTDOWN) to every device model, closes every connection (their
    /// claims are released through the host) and waits for the threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.stopping.store(true, Ordering::Release);
        let _ = self.stop.ring();
        let conns = match accept.join() {
            Ok(c) => c,
            Err(_) => {
                warn!("device-model accept thread panicked");
                vec![]
            }
        };
        for r in self.reg.lock().values() {
            say_goodbye(&r.sock, Code::ESHUTDOWN, "the multiplexer is shutting down");
            if let Some(s) = &r.shared {
                s.kill();
            }
            r.sock.shutdown();
            // A device model that polls its slots reads its socket only when the notification
            // page says so: the goodbye and the end of the connection are there now.
            if let Some(s) = &r.shared {
                s.closed();
            }
        }
        for c in conns {
            if c.join().is_err() {
                warn!("a device-model connection thread panicked");
            }
        }
        info!(socket = %self.path.display(), "device-model socket closed");
    }
}

impl Drop for DmListener {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn say_goodbye(sock: &SeqPacket, code: Code, why: &str) {
    let m = Message::Notice(Notice::Goodbye {
        code,
        message: why.to_string(),
    });
    if let Ok(b) = wire::encode(&m) {
        let _ = sock.send_now(&b);
    }
}

fn accept_loop(
    listener: SeqListener,
    host: Arc<dyn Host>,
    opts: ServerOptions,
    reg: Arc<Registry>,
    stop: Arc<Doorbell>,
    stopping: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let mut threads: Vec<JoinHandle<()>> = vec![];
    loop {
        if stopping.load(Ordering::Acquire) {
            break;
        }
        let fds: [BorrowedFd<'_>; 2] = [listener.as_fd(), stop.as_fd()];
        match wait_readable(&fds, None) {
            Ok(r) if r[1].readable => break,
            Ok(r) if !r[0].readable => continue,
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "poll on the device-model socket failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        }
        let sock = match listener.accept() {
            Ok(s) => Arc::new(s),
            Err(e) => {
                warn!(error = %e, "accept on the device-model socket failed");
                continue;
            }
        };
        let peer = match sock.peer_cred() {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "SO_PEERCRED failed; connection refused");
                continue;
            }
        };
        let conn_id = NEXT.fetch_add(1, Ordering::Relaxed);
        info!(
            conn = conn_id,
            pid = peer.pid,
            uid = peer.uid,
            "device model connected"
        );
        reg.lock().insert(
            conn_id,
            Record {
                sock: sock.clone(),
                peer,
                name: None,
                shared: None,
            },
        );
        let conn = Conn {
            host: host.clone(),
            opts: opts.clone(),
            sock,
            peer,
            reg: reg.clone(),
            conn_id,
            server: None,
        };
        threads.retain(|t| !t.is_finished());
        match std::thread::Builder::new()
            .name(format!("dm-conn-{conn_id}"))
            .spawn(move || conn.run())
        {
            Ok(t) => threads.push(t),
            Err(e) => {
                warn!(error = %e, "cannot start a connection thread");
                if let Some(r) = reg.lock().remove(&conn_id) {
                    r.sock.shutdown();
                }
            }
        }
    }
    threads
}

struct Server {
    id: u16,
    shared: Arc<Shared>,
    res: Arc<Resources>,
    bufioreq: BufioreqMode,
}

struct Conn {
    host: Arc<dyn Host>,
    opts: ServerOptions,
    sock: Arc<SeqPacket>,
    peer: PeerCred,
    reg: Arc<Registry>,
    conn_id: u64,
    server: Option<Server>,
}

/// A reply, and whether the server's descriptors go with it.
struct Answer {
    reply: Reply,
    fds: bool,
}

impl Answer {
    fn plain(reply: Reply) -> Self {
        Answer { reply, fds: false }
    }

    fn done(op: u16) -> Self {
        Answer::plain(Reply::Done { op })
    }
}

impl Conn {
    fn run(mut self) {
        let mut buf = vec![0u8; wire::MAX_MESSAGE + 1];
        let why = loop {
            let r = match self.sock.recv(&mut buf, true) {
                Ok(r) => r,
                Err(e) => break format!("receive failed: {e}"),
            };
            if r.len == 0 {
                break "connection closed".to_string();
            }
            let bytes = &buf[..r.len.min(buf.len())];
            let (op, tag) = wire::peek(bytes).unwrap_or((0, 0));
            let version = wire::peek_version(bytes).unwrap_or(wire::VERSION);
            let result = if r.truncated {
                Err(DmopError::new(
                    Code::EMSGSIZE,
                    format!("message longer than {} bytes", wire::MAX_MESSAGE),
                ))
            } else if !r.fds.is_empty() {
                Err(DmopError::new(
                    Code::EPROTO,
                    format!(
                        "{} file descriptors attached to a request (none may be)",
                        r.fds.len()
                    ),
                ))
            } else {
                match wire::decode(bytes) {
                    Err(e) => Err(DmopError::new(e.code(), e.to_string())),
                    Ok(Message::Request { req, .. }) => self.request(req),
                    Ok(other) => Err(DmopError::new(
                        Code::EPROTO,
                        format!(
                            "only requests go to the multiplexer, not {}",
                            kind_of(&other)
                        ),
                    )),
                }
            };
            drop(r.fds);
            let answer = result.unwrap_or_else(|e| {
                debug!(conn = self.conn_id, op = wire::op::name(op), error = %e, "DMOP refused");
                Answer::plain(Reply::Error {
                    op,
                    code: e.code,
                    message: super::remote::truncate(&e.message),
                })
            });
            if let Err(e) = self.send(tag, &answer, version) {
                break format!("send failed: {e}");
            }
        };
        self.drop_server(&why);
        self.reg.lock().remove(&self.conn_id);
        info!(
            conn = self.conn_id,
            pid = self.peer.pid,
            why,
            "device model disconnected"
        );
    }

    /// Sends the answer to a packet that came in protocol version `version`: an ERROR to a
    /// peer of another version is framed so that it can read it ([`wire::encode_refusal`]).
    fn send(&self, tag: u32, a: &Answer, version: u16) -> io::Result<()> {
        let bytes = match &a.reply {
            Reply::Error { op, code, message } if version != wire::VERSION => {
                wire::encode_refusal(tag, *op, version, *code, message)
            }
            reply => wire::encode(&Message::Reply {
                tag,
                reply: reply.clone(),
            }),
        }
        .map_err(io::Error::other)?;
        match (&self.server, a.fds) {
            (Some(s), true) => {
                let r = &s.res;
                let mut fds: Vec<BorrowedFd<'_>> =
                    vec![r.pages.fd(), r.buf_bell.as_fd(), r.resp_bell.as_fd()];
                fds.extend(r.vcpu_bells.iter().map(AsFd::as_fd));
                self.sock.send(&bytes, &fds)
            }
            _ => self.sock.send(&bytes, &[]),
        }
    }

    fn request(&mut self, req: Request) -> Result<Answer, DmopError> {
        let op = req.op();
        let id = match &req {
            Request::Create { bufioreq, name } => {
                let (bufioreq, name) = (*bufioreq, name.clone());
                return self.create(bufioreq, &name);
            }
            r => r.id().unwrap_or(u16::MAX),
        };
        let Some(srv) = &self.server else {
            return Err(DmopError::new(
                Code::ENOENT,
                format!("no ioreq server {id} on this connection (CREATE one first)"),
            ));
        };
        if srv.id != id {
            return Err(DmopError::new(
                Code::ENOENT,
                format!(
                    "no ioreq server {id} on this connection (it has {})",
                    srv.id
                ),
            ));
        }
        match req {
            Request::Create { .. } => Err(DmopError::new(Code::EIO, "unreachable")),
            Request::GetInfo { .. } => Ok(Answer {
                reply: Reply::Info(Info {
                    id,
                    bufioreq: srv.bufioreq,
                    nr_vcpus: srv.res.vcpu_bells.len() as u32,
                    shm_size: super::shm::SHM_SIZE as u32,
                    buf_offset: super::shm::BUF_OFFSET as u32,
                    ioreq_offset: super::shm::IOREQ_OFFSET as u32,
                    notify_offset: super::shm::NOTIFY_OFFSET as u32,
                }),
                fds: true,
            }),
            Request::MapRange { range, .. } => self.claim(DmopKind::Map, Claim::Range(range), op),
            Request::UnmapRange { range, .. } => {
                self.claim(DmopKind::Unmap, Claim::Range(range), op)
            }
            Request::MapPcidev { sbdf, .. } => {
                self.claim(DmopKind::Map, Claim::Range(IoRange::pci(sbdf)), op)
            }
            Request::UnmapPcidev { sbdf, .. } => {
                self.claim(DmopKind::Unmap, Claim::Range(IoRange::pci(sbdf)), op)
            }
            Request::MapPosition { position, .. } => {
                self.claim(DmopKind::Map, Claim::Position(position), op)
            }
            Request::UnmapPosition { position, .. } => {
                self.claim(DmopKind::Unmap, Claim::Position(position), op)
            }
            Request::InjectMsi { addr, data, .. } => self
                .dmop(Dmop::InjectMsi { addr, data })
                .map(|()| Answer::done(op)),
            Request::SetState { enabled, .. } => {
                let was = srv.shared.enabled.swap(enabled, Ordering::AcqRel);
                if was != enabled {
                    info!(server = %srv.shared.name, id, enabled, "ioreq server state set");
                }
                Ok(Answer::done(op))
            }
            Request::Destroy { .. } => {
                self.drop_server("destroyed by the device model");
                Ok(Answer::done(op))
            }
        }
    }

    fn create(&mut self, bufioreq: BufioreqMode, name: &str) -> Result<Answer, DmopError> {
        if let Some(s) = &self.server {
            return Err(DmopError::new(
                Code::EEXIST,
                format!(
                    "this connection already has ioreq server {} ('{}')",
                    s.id, s.shared.name
                ),
            ));
        }
        self.host.admit(name, &self.peer)?;
        {
            let mut reg = self.reg.lock();
            if let Some((_, r)) = reg
                .iter()
                .find(|(k, r)| **k != self.conn_id && r.name.as_deref() == Some(name))
            {
                return Err(DmopError::new(
                    Code::EBUSY,
                    format!("server '{name}' is already connected (pid {})", r.peer.pid),
                ));
            }
            if let Some(r) = reg.get_mut(&self.conn_id) {
                r.name = Some(name.to_string());
            }
        }
        let r = self.create_admitted(bufioreq, name);
        if r.is_err() {
            self.release_name();
        }
        r
    }

    fn create_admitted(&mut self, bufioreq: BufioreqMode, name: &str) -> Result<Answer, DmopError> {
        let nr = self.host.nr_vcpus();
        if nr == 0 || nr as usize > SHARED_PAGE_SLOTS {
            return Err(DmopError::new(
                Code::EIO,
                format!("the guest has {nr} vCPUs; one ioreq page serves 1 to {SHARED_PAGE_SLOTS}"),
            ));
        }
        let io = |e: io::Error| DmopError::new(Code::EIO, format!("cannot set up the server: {e}"));
        let res = Arc::new(Resources::new(name, nr).map_err(io)?);
        let shared = Arc::new(Shared::new(name, self.sock.clone(), res.clone()).map_err(io)?);
        let model = RemoteModel::new(
            shared.clone(),
            res.clone(),
            bufioreq,
            self.host.remote_options(name, &self.opts.remote),
        );
        let id = self.host.add(Box::new(model))?;
        shared.id.store(u32::from(id), Ordering::Release);
        if let Some(r) = self.reg.lock().get_mut(&self.conn_id) {
            r.shared = Some(shared.clone());
        }
        info!(
            server = name,
            id,
            vcpus = nr,
            ?bufioreq,
            pid = self.peer.pid,
            "ioreq server created"
        );
        self.server = Some(Server {
            id,
            shared,
            res,
            bufioreq,
        });
        Ok(Answer::plain(Reply::Created { id, nr_vcpus: nr }))
    }

    /// A DMOP for the engine: applied by the request in flight if there is one (the device
    /// model is serving it and waits for this answer), else by the engine between requests.
    fn dmop(&self, op: Dmop) -> Result<(), DmopError> {
        let Some(srv) = &self.server else {
            return Err(DmopError::new(Code::ENOENT, "no ioreq server"));
        };
        let queued = {
            let mut ib = srv.shared.inbox();
            if ib.in_request {
                let (tx, rx) = crossbeam_channel::bounded(1);
                ib.ops.push_back(PendingOp {
                    op: op.clone(),
                    reply: tx,
                });
                srv.shared.has_ops.store(true, Ordering::Release);
                Some(rx)
            } else {
                None
            }
        };
        match queued {
            Some(rx) => {
                let _ = srv.shared.wake.ring();
                rx.recv_timeout(self.opts.op_timeout).unwrap_or_else(|_| {
                    let what = match &op {
                        Dmop::Claim(_, claim) => claim.to_string(),
                        Dmop::InjectMsi { addr, data } => format!("MSI {data:#x} to {addr:#x}"),
                    };
                    Err(DmopError::new(
                        Code::ETIMEDOUT,
                        format!("{what} was not applied within {:?}", self.opts.op_timeout),
                    ))
                })
            }
            None => match op {
                Dmop::Claim(DmopKind::Map, claim) => self.host.map(srv.id, claim),
                Dmop::Claim(DmopKind::Unmap, claim) => self.host.unmap(srv.id, claim),
                Dmop::InjectMsi { addr, data } => self.host.inject_msi(srv.id, addr, data),
            },
        }
    }

    /// A map or unmap ([`Conn::dmop`]); a position claimed or dropped is remembered for the
    /// POSITION_MOVED notices.
    fn claim(&self, kind: DmopKind, claim: Claim, op: u16) -> Result<Answer, DmopError> {
        let Some(srv) = &self.server else {
            return Err(DmopError::new(Code::ENOENT, "no ioreq server"));
        };
        let r = self.dmop(Dmop::Claim(kind, claim.clone()));
        if r.is_ok() {
            if let Claim::Position(p) = &claim {
                let mut ib = srv.shared.inbox();
                match kind {
                    DmopKind::Map => ib.positions.push(p.clone()),
                    DmopKind::Unmap => ib.positions.retain(|q| q != p),
                }
                srv.shared.positions_gen.fetch_add(1, Ordering::AcqRel);
            }
            debug!(server = %srv.shared.name, ?kind, %claim, "DMOP applied");
        }
        r.map(|()| Answer::done(op))
    }

    /// Ends the server: wakes a request waiting on it, releases its claims, frees its name.
    fn drop_server(&mut self, why: &str) {
        if let Some(srv) = self.server.take() {
            srv.shared.kill();
            self.host.remove(srv.id);
            let left: Vec<PendingOp> = srv.shared.inbox().ops.drain(..).collect();
            for op in left {
                let _ = op
                    .reply
                    .send(Err(op.op.refused(Code::ENOENT, "the server is gone")));
            }
            info!(server = %srv.shared.name, id = srv.id, why, "ioreq server removed; its claims are released");
            if let Some(r) = self.reg.lock().get_mut(&self.conn_id) {
                r.shared = None;
            }
        }
        self.release_name();
    }

    fn release_name(&self) {
        if let Some(r) = self.reg.lock().get_mut(&self.conn_id) {
            r.name = None;
        }
    }
}

fn kind_of(m: &Message) -> &'static str {
    match m {
        Message::Request { .. } => "a request",
        Message::Reply { .. } => "a reply",
        Message::Notice(_) => "a notice",
    }
}
