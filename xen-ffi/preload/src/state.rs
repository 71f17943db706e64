//! What the preload knows, behind one lock: the connection to the multiplexer, the one
//! ioreq server it created for QEMU, QEMU's event-channel handles, and the resource mappings
//! it handed out. Every function here is called with the lock held by `ffi`, which does the
//! pointer work and calls the real libraries (never with the lock held).

use crate::config::{Config, debug, info};
use crate::ports::{
    FAKE_REMOTE_BUFFERED, FakePort, LocalPorts, PendingQueue, classify_remote, vcpu_remote_port,
};
use crate::sys::Epoll;
use crate::{LOST, lost};
use ioreq_server::abi::{STATE_IOREQ_NONE, pack_sbdf};
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::oop::ClientError;
use ioreq_server::oop::client::{Connection, ServerPages};
use ioreq_server::oop::shm::{BUF_OFFSET, IOREQ_OFFSET};
use ioreq_server::oop::sys::Doorbell;
use ioreq_server::oop::wire::Code;
use ioreq_server::{Claim, IoRange, RangeKind};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Why an interposed call on the multiplexed server failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fail {
    /// Return -1 with this errno.
    Errno(i32),
    /// The connection to the multiplexer ended ([`crate::connection_lost`]).
    Lost(String),
    /// The server cannot be set up, and QEMU's own fallback would be wrong
    /// ([`crate::cannot_serve`]).
    Fatal(String),
}

/// Where a call goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<T> {
    /// Handled here.
    Ours(T),
    /// To the real library, unchanged.
    Real,
}

/// epoll tokens other than fake local ports (which are < 2^32).
const TOKEN_KICK: u64 = 1 << 40;
const TOKEN_REAL: u64 = (1 << 40) + 1;
const TOKEN_CONTROL: u64 = (1 << 40) + 2;

/// The page size of the resource frames (Xen's `XC_PAGE_SIZE` on x86).
pub const FRAME: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Binding {
    handle: usize,
    local: u32,
}

/// The ioreq server the multiplexer created for QEMU.
#[derive(Debug)]
struct Server {
    domid: u16,
    id: u16,
    nr_vcpus: u32,
    bufioreq: BufioreqMode,
    sp: ServerPages,
    vcpu_bound: Vec<Option<Binding>>,
    buf_bound: Option<Binding>,
    /// QEMU asked to enable.
    enable_wanted: bool,
    /// The enable was forwarded to the multiplexer.
    enabled: bool,
}

impl Server {
    fn bell(&self, p: FakePort) -> Option<&Doorbell> {
        match p {
            FakePort::Vcpu(i) => self.sp.vcpu_bells.get(i as usize),
            FakePort::Buffered => Some(&self.sp.buf_bell),
        }
    }

    fn binding(&self, p: FakePort) -> Option<Binding> {
        match p {
            FakePort::Vcpu(i) => self.vcpu_bound.get(i as usize).copied().flatten(),
            FakePort::Buffered => self.buf_bound,
        }
    }

    fn set_binding(&mut self, p: FakePort, b: Option<Binding>) {
        match p {
            FakePort::Vcpu(i) => {
                if let Some(s) = self.vcpu_bound.get_mut(i as usize) {
                    *s = b;
                }
            }
            FakePort::Buffered => self.buf_bound = b,
        }
    }

    /// The fake channel `remote` names, if it is one of this server's and not bound yet.
    fn unbound_fake(&self, remote: u32) -> Option<FakePort> {
        let p = classify_remote(remote, self.nr_vcpus)?;
        if p == FakePort::Buffered && self.bufioreq == BufioreqMode::Off {
            return None;
        }
        self.binding(p).is_none().then_some(p)
    }

    fn vcpus_bound(&self) -> usize {
        self.vcpu_bound.iter().filter(|b| b.is_some()).count()
    }

    /// Every vCPU's port and (with a ring) the buffered port are bound on some handle: QEMU
    /// has read every `vp_eport`, so the multiplexer may start writing sequence numbers there.
    fn all_bound(&self) -> bool {
        self.vcpus_bound() == self.vcpu_bound.len()
            && (self.bufioreq == BufioreqMode::Off || self.buf_bound.is_some())
    }
}

/// One `xenevtchn_handle` opened while the preload is active.
#[derive(Debug)]
struct Handle {
    /// The key is the real library's handle (false: the real open failed with ENOENT, no
    /// Xen; only fake ports work on this handle).
    real: bool,
    /// Why the real open failed (the errno of every real-path call on a preload-only handle).
    real_errno: i32,
    /// A preload-only handle's identity: the address of this allocation.
    _anchor: Option<Box<u64>>,
    /// What `xenevtchn_fd` returns: the fake ports' eventfds, the real descriptor, the
    /// control socket and `kick`.
    epoll: Epoll,
    /// Readable while `queue` is not empty.
    kick: Doorbell,
    fake: BTreeMap<u32, FakePort>,
    locals: LocalPorts,
    queue: PendingQueue,
    control_fd: Option<RawFd>,
}

/// A mapping handed out by `xenforeignmemory_map_resource`.
#[derive(Debug)]
pub struct Resource {
    pub addr: usize,
    pub len: usize,
}

/// What `ffi` maps for a `map_resource` of the multiplexed server.
#[derive(Debug, Clone, Copy)]
pub struct MapPlan {
    pub fd: RawFd,
    pub offset: i64,
    pub len: usize,
}

#[derive(Debug, Default)]
pub struct State {
    conn: Option<Connection>,
    server: Option<Server>,
    handles: HashMap<usize, Handle>,
    resources: HashMap<usize, Box<Resource>>,
}

fn io_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn describe_end(goodbye: Option<(Code, String)>) -> String {
    match goodbye {
        Some((code, msg)) => format!("the multiplexer said goodbye ({code}: {msg})"),
        None => "the multiplexer closed the connection without a goodbye (its process ended?)"
            .to_string(),
    }
}

/// A protocol client error as what the caller gets.
fn client_fail(e: ClientError) -> Fail {
    match e {
        ClientError::Refused { code, .. } => Fail::Errno(code.0 as i32),
        ClientError::Disconnected { goodbye } => Fail::Lost(describe_end(goodbye)),
        ClientError::Io(e) => Fail::Errno(io_errno(&e)),
        ClientError::Protocol(m) => Fail::Lost(format!("protocol error: {m}")),
        ClientError::Attach(_) => Fail::Errno(libc::EIO),
    }
}

impl State {
    // ----- devicemodel -----

    /// Is (`domid`, `id`) the multiplexed server?
    pub fn is_ours(&self, domid: u16, id: u16) -> bool {
        self.server
            .as_ref()
            .is_some_and(|s| s.domid == domid && s.id == id)
    }

    /// `create_ioreq_server`: connects (once), creates the server, takes its memory and
    /// eventfds. Any failure to reach or be accepted by the multiplexer is [`Fail::Fatal`]
    /// (see the crate doc).
    pub fn create(&mut self, cfg: &Config, domid: u16, handle_bufioreq: i32) -> Result<u16, Fail> {
        if lost() {
            return Err(Fail::Errno(libc::EIO));
        }
        if let Some(s) = &self.server {
            info!(
                "create_ioreq_server for domain {domid} refused: server {} of domain {} exists (one per QEMU)",
                s.id, s.domid
            );
            return Err(Fail::Errno(libc::EEXIST));
        }
        let Some(mode) = u8::try_from(handle_bufioreq)
            .ok()
            .and_then(BufioreqMode::from_u8)
        else {
            return Err(Fail::Errno(libc::EINVAL));
        };
        let Some(path) = cfg.socket.as_deref() else {
            return Err(Fail::Errno(libc::EINVAL));
        };
        if self.conn.is_none() {
            info!("connecting to the multiplexer at {}", path.display());
            let c = Connection::connect(path).map_err(|e| {
                Fail::Fatal(format!(
                    "cannot connect to the multiplexer's device-model socket {}: {e}",
                    path.display()
                ))
            })?;
            self.conn = Some(c);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(Fail::Errno(libc::EIO));
        };
        // A CREATE racing the release of this name's previous connection gets EBUSY
        // (docs/dm-protocol.md, 5): retry for a moment.
        let until = Instant::now() + Duration::from_secs(3);
        let (id, nr_vcpus) = loop {
            match conn.create(&cfg.server, mode) {
                Ok(r) => break r,
                Err(ClientError::Refused { code, .. })
                    if code == Code::EBUSY && Instant::now() < until =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e @ ClientError::Disconnected { .. }) => return Err(client_fail(e)),
                Err(e) => {
                    return Err(Fail::Fatal(format!(
                        "the multiplexer at {} did not create server {:?}: {e}",
                        path.display(),
                        cfg.server
                    )));
                }
            }
        };
        let sp = conn.get_info(id).map_err(|e| match e {
            e @ ClientError::Disconnected { .. } => client_fail(e),
            e => Fail::Fatal(format!("GET_IOREQ_SERVER_INFO of server {id} failed: {e}")),
        })?;
        if sp.vcpu_bells.len() != nr_vcpus as usize {
            return Err(Fail::Fatal(format!(
                "the multiplexer said {nr_vcpus} vCPUs at create and {} in GET_IOREQ_SERVER_INFO",
                sp.vcpu_bells.len()
            )));
        }
        info!(
            "created ioreq server for domain {domid}: multiplexer server id {id}, {nr_vcpus} vCPUs, buffered ring {mode:?}, name {:?}",
            cfg.server
        );
        self.server = Some(Server {
            domid,
            id,
            nr_vcpus,
            bufioreq: mode,
            sp,
            vcpu_bound: vec![None; nr_vcpus as usize],
            buf_bound: None,
            enable_wanted: false,
            enabled: false,
        });
        Ok(id)
    }

    /// `get_ioreq_server_info`: the fake buffered port. Asking for gfns (the legacy mapping
    /// path) is refused: the pages are not guest memory.
    pub fn get_info(&mut self, want_gfns: bool) -> Result<u32, Fail> {
        let Some(s) = &self.server else {
            return Err(Fail::Errno(libc::ENOENT));
        };
        if want_gfns {
            info!(
                "get_ioreq_server_info asked for gfns: refused (EOPNOTSUPP), the multiplexer's pages are mapped with map_resource only"
            );
            return Err(Fail::Errno(libc::EOPNOTSUPP));
        }
        Ok(if s.bufioreq == BufioreqMode::Off {
            0
        } else {
            FAKE_REMOTE_BUFFERED
        })
    }

    /// `set_ioreq_server_state`. An enable is forwarded once every port is bound
    /// ([`Server::all_bound`]); a disable at once.
    pub fn set_state(&mut self, enabled: bool) -> Result<(), Fail> {
        if lost() {
            return Ok(());
        }
        let Some(s) = self.server.as_mut() else {
            return Err(Fail::Errno(libc::ENOENT));
        };
        if enabled {
            s.enable_wanted = true;
            if !s.all_bound() {
                info!(
                    "enable deferred until QEMU has bound every port ({} of {} vCPU ports bound, buffered port {})",
                    s.vcpus_bound(),
                    s.nr_vcpus,
                    if s.buf_bound.is_some() {
                        "bound"
                    } else {
                        "not bound"
                    }
                );
                return Ok(());
            }
            return self.maybe_enable();
        }
        s.enable_wanted = false;
        let id = s.id;
        let Some(conn) = self.conn.as_mut() else {
            return Err(Fail::Errno(libc::EIO));
        };
        conn.set_state(id, false).map_err(client_fail)?;
        if let Some(s) = self.server.as_mut() {
            s.enabled = false;
        }
        info!("disable forwarded to the multiplexer (server {id})");
        Ok(())
    }

    /// Forwards a wanted enable if every port is bound now.
    fn maybe_enable(&mut self) -> Result<(), Fail> {
        let Some(s) = self.server.as_mut() else {
            return Ok(());
        };
        if !s.enable_wanted || s.enabled || !s.all_bound() {
            return Ok(());
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(Fail::Errno(libc::EIO));
        };
        conn.set_state(s.id, true).map_err(client_fail)?;
        s.enabled = true;
        info!(
            "enable forwarded to the multiplexer (server {}): all {} vCPU ports{} bound",
            s.id,
            s.nr_vcpus,
            if s.bufioreq == BufioreqMode::Off {
                ""
            } else {
                " and the buffered port"
            }
        );
        Ok(())
    }

    /// `destroy_ioreq_server`: every fake port is detached from its handle.
    pub fn destroy(&mut self) -> Result<(), Fail> {
        let Some(s) = &self.server else {
            return Err(Fail::Errno(libc::ENOENT));
        };
        let id = s.id;
        if !lost() {
            let Some(conn) = self.conn.as_mut() else {
                return Err(Fail::Errno(libc::EIO));
            };
            conn.destroy(id).map_err(client_fail)?;
        }
        let bound: Vec<Binding> = self
            .server
            .iter()
            .flat_map(|s| s.vcpu_bound.iter().copied().flatten().chain(s.buf_bound))
            .collect();
        for b in bound {
            self.detach(b.handle, b.local);
        }
        self.server = None;
        info!("server {id} destroyed");
        Ok(())
    }

    /// `map/unmap_io_range`, `map/unmap_pcidev`.
    pub fn claim(&mut self, map: bool, claim: Claim) -> Result<(), Fail> {
        let what = if map { "map" } else { "unmap" };
        if lost() {
            return Err(Fail::Errno(libc::EIO));
        }
        let (Some(s), Some(conn)) = (&self.server, self.conn.as_mut()) else {
            return Err(Fail::Errno(libc::ENOENT));
        };
        let r = if map {
            conn.map(s.id, claim.clone())
        } else {
            conn.unmap(s.id, claim.clone())
        };
        match r {
            Ok(()) => {
                debug!("{what} {claim}: ok");
                Ok(())
            }
            Err(e) => {
                debug!("{what} {claim}: {e}");
                Err(client_fail(e))
            }
        }
    }

    // ----- foreignmemory -----

    /// `map_resource` of the multiplexed server's frames: writes the fake remote ports into
    /// every vCPU's `vp_eport` (QEMU reads them right after) and says what to map. `None`:
    /// not the multiplexed server.
    pub fn resource(
        &mut self,
        domid: u16,
        ty: u32,
        id: u32,
        frame: u64,
        nr_frames: u64,
    ) -> Option<Result<MapPlan, Fail>> {
        // XENMEM_resource_ioreq_server (xen/memory.h).
        const XENMEM_RESOURCE_IOREQ_SERVER: u32 = 0;
        let s = self.server.as_ref()?;
        if ty != XENMEM_RESOURCE_IOREQ_SERVER || s.domid != domid || u32::from(s.id) != id {
            return None;
        }
        // Frame 0 is the buffered page, frame 1 the ioreq page
        // (XENMEM_resource_ioreq_server_frame_bufioreq / _frame_ioreq(0)); there is no other.
        const _: () = assert!(BUF_OFFSET == 0 && IOREQ_OFFSET == FRAME);
        if nr_frames == 0 || frame.checked_add(nr_frames).is_none_or(|end| end > 2) {
            return Some(Err(Fail::Errno(libc::EINVAL)));
        }
        for i in 0..s.nr_vcpus {
            if let Some(slot) = s.sp.pages.slot(i as usize) {
                slot.force_control(vcpu_remote_port(i), STATE_IOREQ_NONE);
            }
        }
        Some(Ok(MapPlan {
            fd: s.sp.pages.fd().as_raw_fd(),
            offset: frame as i64 * FRAME as i64,
            len: nr_frames as usize * FRAME,
        }))
    }

    /// Remembers a mapping handed out; returns the handle to give the caller.
    pub fn add_resource(&mut self, addr: usize, len: usize) -> usize {
        let r = Box::new(Resource { addr, len });
        let key = &*r as *const Resource as usize;
        self.resources.insert(key, r);
        key
    }

    /// Forgets a mapping handed out (`None`: not ours).
    pub fn take_resource(&mut self, key: usize) -> Option<Resource> {
        self.resources.remove(&key).map(|b| *b)
    }

    // ----- evtchn -----

    /// Registers a handle opened while the preload is active. `real`: the real library's
    /// handle (its address) and descriptor; `None`: the real open failed with `real_errno`.
    pub fn open_handle(
        &mut self,
        real: Option<(usize, RawFd)>,
        real_errno: i32,
    ) -> std::io::Result<usize> {
        let epoll = Epoll::new()?;
        let kick = Doorbell::new()?;
        epoll.add(kick.as_fd().as_raw_fd(), TOKEN_KICK)?;
        let (key, anchor) = match real {
            Some((h, fd)) => {
                epoll.add(fd, TOKEN_REAL)?;
                (h, None)
            }
            None => {
                let a = Box::new(0u64);
                (&*a as *const u64 as usize, Some(a))
            }
        };
        self.handles.insert(
            key,
            Handle {
                real: real.is_some(),
                real_errno,
                _anchor: anchor,
                epoll,
                kick,
                fake: BTreeMap::new(),
                locals: LocalPorts::default(),
                queue: PendingQueue::default(),
                control_fd: None,
            },
        );
        debug!(
            "evtchn handle {key:#x} opened ({})",
            if real.is_some() {
                "real handle"
            } else {
                "no Xen: fake ports only"
            }
        );
        Ok(key)
    }

    /// `xenevtchn_close`: `None` if the handle is not one of ours; else whether the real
    /// library's close must follow.
    pub fn close_handle(&mut self, key: usize) -> Option<bool> {
        let locals: Vec<u32> = self.handles.get(&key)?.fake.keys().copied().collect();
        for l in locals {
            self.detach(key, l);
        }
        let h = self.handles.remove(&key)?;
        debug!("evtchn handle {key:#x} closed");
        Some(h.real)
    }

    /// `xenevtchn_fd`: the handle's epoll descriptor (`None`: not ours).
    pub fn handle_fd(&self, key: usize) -> Option<RawFd> {
        self.handles.get(&key).map(|h| h.epoll.raw())
    }

    /// For a call that is not about a fake port: the real library, or on a preload-only
    /// handle the real open's error.
    fn real_path<T>(&self, key: usize) -> Route<Result<T, Fail>> {
        match self.handles.get(&key) {
            Some(h) if !h.real => Route::Ours(Err(Fail::Errno(h.real_errno))),
            _ => Route::Real,
        }
    }

    /// `xenevtchn_bind_interdomain`: a fake remote port of the server's domain that is not
    /// bound yet is attached to this handle.
    pub fn bind(&mut self, key: usize, domid: u32, remote: u32) -> Route<Result<u32, Fail>> {
        if !self.handles.contains_key(&key) {
            return Route::Real;
        }
        let fake = self
            .server
            .as_ref()
            .filter(|s| u32::from(s.domid) == domid)
            .and_then(|s| s.unbound_fake(remote));
        match fake {
            Some(p) if !lost() => Route::Ours(self.attach(key, p, remote)),
            _ => self.real_path(key),
        }
    }

    fn attach(&mut self, key: usize, p: FakePort, remote: u32) -> Result<u32, Fail> {
        let State {
            conn,
            server,
            handles,
            ..
        } = self;
        let (Some(s), Some(h)) = (server.as_mut(), handles.get_mut(&key)) else {
            return Err(Fail::Errno(libc::EINVAL));
        };
        let Some(bell_fd) = s.bell(p).map(|b| b.as_fd().as_raw_fd()) else {
            return Err(Fail::Errno(libc::EINVAL));
        };
        let local = h.locals.alloc().ok_or(Fail::Errno(libc::ENOSPC))?;
        if let Err(e) = h.epoll.add(bell_fd, u64::from(local)) {
            h.locals.free(local);
            return Err(Fail::Errno(io_errno(&e)));
        }
        if h.control_fd.is_none() {
            if let Some(c) = conn.as_ref() {
                let fd = c.socket().as_fd().as_raw_fd();
                if let Err(e) = h.epoll.add(fd, TOKEN_CONTROL) {
                    let _ = h.epoll.del(bell_fd);
                    h.locals.free(local);
                    return Err(Fail::Errno(io_errno(&e)));
                }
                h.control_fd = Some(fd);
            }
        }
        h.fake.insert(local, p);
        s.set_binding(p, Some(Binding { handle: key, local }));
        match p {
            FakePort::Vcpu(i) => info!(
                "bound vCPU {i} (remote port {remote:#x}) -> local port {local:#x} on handle {key:#x}"
            ),
            FakePort::Buffered => info!(
                "bound the buffered ring (remote port {remote:#x}) -> local port {local:#x} on handle {key:#x}"
            ),
        }
        if p == FakePort::Buffered && s.enable_wanted && !s.all_bound() {
            info!(
                "the buffered port is bound but only {} of {} vCPU ports are: the enable stays deferred (does QEMU's vCPU count match the multiplexer's?)",
                s.vcpus_bound(),
                s.nr_vcpus
            );
        }
        if let Err(e) = self.maybe_enable() {
            self.detach(key, local);
            return Err(e);
        }
        Ok(local)
    }

    /// Detaches fake port `local` from handle `key` (unbind, close, destroy).
    fn detach(&mut self, key: usize, local: u32) -> bool {
        let Some(h) = self.handles.get_mut(&key) else {
            return false;
        };
        let Some(p) = h.fake.remove(&local) else {
            return false;
        };
        h.queue.remove(local);
        h.locals.free(local);
        if h.queue.is_empty() {
            let _ = h.kick.clear();
        }
        if h.fake.is_empty() {
            // Nothing of the server's left here: the handle is the real one again (the end of
            // the connection no longer makes its descriptor readable).
            if let Some(fd) = h.control_fd.take() {
                let _ = h.epoll.del(fd);
            }
        }
        if let Some(s) = self.server.as_mut() {
            if let Some(bell) = s.bell(p) {
                let _ = h.epoll.del(bell.as_fd().as_raw_fd());
            }
            if s.binding(p) == Some(Binding { handle: key, local }) {
                s.set_binding(p, None);
            }
        }
        debug!("local port {local:#x} ({p:?}) unbound from handle {key:#x}");
        true
    }

    /// `xenevtchn_unbind`.
    pub fn unbind(&mut self, key: usize, port: u32) -> Route<Result<(), Fail>> {
        if self.detach(key, port) {
            return Route::Ours(Ok(()));
        }
        self.real_path(key)
    }

    /// `xenevtchn_unmask`: a no-op for a fake port (an eventfd needs no unmasking).
    pub fn unmask(&mut self, key: usize, port: u32) -> Route<Result<(), Fail>> {
        if self
            .handles
            .get(&key)
            .is_some_and(|h| h.fake.contains_key(&port))
        {
            return Route::Ours(Ok(()));
        }
        self.real_path(key)
    }

    /// `xenevtchn_notify`: for vCPU *i*'s port, protocol step 6 (docs/dm-protocol.md, 7):
    /// QEMU has stored IORESP_READY; a sequentially consistent fence, then ring the response
    /// eventfd unless the multiplexer says it is polling slot *i*. The buffered port needs
    /// nothing.
    pub fn notify(&mut self, key: usize, port: u32) -> Route<Result<(), Fail>> {
        let Some(p) = self
            .handles
            .get(&key)
            .and_then(|h| h.fake.get(&port))
            .copied()
        else {
            return self.real_path(key);
        };
        let FakePort::Vcpu(i) = p else {
            return Route::Ours(Ok(()));
        };
        let Some(s) = &self.server else {
            return Route::Ours(Err(Fail::Errno(libc::EINVAL)));
        };
        // `mux_is_polling` fences (SeqCst) before it loads the flag.
        if !s.sp.pages.notify().mux_is_polling(i as usize) {
            if let Err(e) = s.sp.resp_bell.ring() {
                return Route::Ours(Err(Fail::Errno(io_errno(&e))));
            }
        }
        Route::Ours(Ok(()))
    }

    /// `xenevtchn_pending`: one port per call. Fake ports first (each rung eventfd queues
    /// its port once), then, only if the real descriptor is readable, the real library's.
    /// Nothing: -1 with EAGAIN. Reads the control socket when it is readable: the end of the
    /// connection is [`Fail::Lost`].
    pub fn pending(&mut self, key: usize) -> Route<Result<i32, Fail>> {
        let State {
            conn,
            server,
            handles,
            ..
        } = self;
        let Some(h) = handles.get_mut(&key) else {
            return Route::Real;
        };
        if h.fake.is_empty() && h.queue.is_empty() {
            // Nothing of ours on this handle: exactly the real library's behaviour.
            return if h.real {
                Route::Real
            } else {
                Route::Ours(Err(Fail::Errno(h.real_errno)))
            };
        }
        if LOST.load(Ordering::Acquire) {
            return Route::Ours(Err(Fail::Errno(libc::EAGAIN)));
        }
        let tokens = match h.epoll.ready() {
            Ok(t) => t,
            Err(e) => return Route::Ours(Err(Fail::Errno(io_errno(&e)))),
        };
        let (mut real_ready, mut control) = (false, false);
        for t in tokens {
            match t {
                TOKEN_KICK => {}
                TOKEN_REAL => real_ready = true,
                TOKEN_CONTROL => control = true,
                t => {
                    let Some(&p) = u32::try_from(t).ok().and_then(|l| h.fake.get(&l)) else {
                        continue;
                    };
                    if let Some(bell) = server.as_ref().and_then(|s| s.bell(p)) {
                        let _ = bell.clear();
                    }
                    h.queue.push(t as u32);
                }
            }
        }
        if control {
            if let Some(c) = conn.as_mut() {
                // Notices (QEMU claims no positions, so none matter) or the end.
                if let Err(e) = c.pump() {
                    return Route::Ours(Err(match client_fail(e) {
                        Fail::Errno(e) => Fail::Lost(format!(
                            "reading the control socket failed: {}",
                            std::io::Error::from_raw_os_error(e)
                        )),
                        f => f,
                    }));
                }
            }
        }
        let next = h.queue.pop();
        if h.queue.is_empty() {
            let _ = h.kick.clear();
        } else {
            let _ = h.kick.ring();
        }
        match next {
            Some(p) => {
                debug!(
                    "pending on handle {key:#x}: local port {p:#x} ({} more queued)",
                    h.queue.len()
                );
                Route::Ours(Ok(p as i32))
            }
            None if real_ready && h.real => Route::Real,
            None => Route::Ours(Err(Fail::Errno(libc::EAGAIN))),
        }
    }

    /// The claim for `map_io_range` (`is_mmio` as libxendevicemodel reads it: non-zero is
    /// memory).
    pub fn range_claim(is_mmio: i32, start: u64, end: u64) -> Result<Claim, Fail> {
        if start > end {
            return Err(Fail::Errno(libc::EINVAL));
        }
        let kind = if is_mmio != 0 {
            RangeKind::Mmio
        } else {
            RangeKind::Port
        };
        Ok(Claim::Range(IoRange::new(kind, start, end)))
    }

    /// The claim for `map_pcidev` (device 0–0x1f, function 0–7).
    pub fn pcidev_claim(segment: u16, bus: u8, device: u8, function: u8) -> Result<Claim, Fail> {
        if device > 0x1f || function > 7 {
            return Err(Fail::Errno(libc::EINVAL));
        }
        Ok(Claim::Range(IoRange::pci(pack_sbdf(
            segment, bus, device, function,
        ))))
    }
}
