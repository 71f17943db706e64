//! The exported C functions: the interposed Xen library calls, and the calls through to
//! the real ones.
//!
//! Why `unsafe` is needed here:
//! - exporting unmangled symbols (`#[unsafe(no_mangle)]`) is what interposition is;
//! - the callers pass raw pointers (out parameters, handles) that only C's contract makes
//!   valid;
//! - the real functions are reached through addresses from `dlsym`, which must be turned
//!   into function pointers of the right type.
//!
//! Why it is sound:
//! - each function pointer type below is transcribed from the C declaration in Debian 12's
//!   libxen-dev headers (`xendevicemodel.h`, `xenforeignmemory.h`, `xenevtchn.h`; `domid_t`
//!   and `ioservid_t` are `uint16_t`, `evtchn_port_t` `uint32_t`, `xen_pfn_t` `unsigned
//!   long` on x86-64), and a symbol is only ever cast to its own declaration's type;
//! - handles are never dereferenced by the preload: they are compared as addresses and
//!   passed on unchanged to the real function they came from;
//! - out parameters are written only after a null check, with the type the C declaration
//!   gives them, as the real library would write them; in parameters are read the same way;
//! - nothing here holds the state lock while calling a real function, [`connection_lost`] or
//!   [`cannot_serve`] (they may re-enter the preload).

use crate::config::{self, debug, info};
use crate::state::{Fail, Route, State};
use crate::sys::{RealFn, map_shared, unmap};
use crate::{cannot_serve, connection_lost, with_state};
use ioreq_server::Claim;
use std::ffi::{c_int, c_uint, c_ulong, c_void};
use std::ptr::null_mut;

type Ptr = *mut c_void;

/// Turns a `dlsym` result into a typed function pointer.
///
/// # Safety
/// `F` must be the `unsafe extern "C" fn` type of the C declaration of the symbol `r` names.
unsafe fn resolve<F: Copy>(r: &RealFn) -> Option<F> {
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut c_void>()) };
    let p = r.get()?;
    // SAFETY: per the contract, `F` is a function-pointer type (pointer-sized, asserted
    // above) matching the function at `p`.
    Some(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

/// The real function was not found (the program does not load the library): ENOSYS.
fn missing(r: &RealFn) {
    info!(
        "the real {} was not found after this library: failing the call with ENOSYS",
        r.name().to_string_lossy()
    );
    nix::errno::Errno::set_raw(libc::ENOSYS);
}

/// Calls the real function `$r` of type `$ty` with `$args`, or returns `$missing` if it
/// does not exist.
macro_rules! real {
    ($r:expr, $ty:ty, $missing:expr, ($($arg:expr),* $(,)?)) => {{
        // SAFETY: `$ty` is transcribed from the C declaration of the symbol `$r` names.
        match unsafe { resolve::<$ty>(&$r) } {
            // SAFETY: the caller's own arguments, passed unchanged to the function they were
            // meant for.
            Some(f) => unsafe { f($($arg),*) },
            None => {
                missing(&$r);
                $missing
            }
        }
    }};
}

/// -1 with errno, or never returns (the fatal cases).
fn fail(f: Fail) -> c_int {
    match f {
        Fail::Errno(e) => {
            nix::errno::Errno::set_raw(e);
            -1
        }
        Fail::Lost(reason) => connection_lost(&reason),
        Fail::Fatal(reason) => cannot_serve(&reason),
    }
}

fn status(r: Result<(), Fail>) -> c_int {
    match r {
        Ok(()) => 0,
        Err(f) => fail(f),
    }
}

/// Runs `f` if (`domid`, `id`) is the multiplexed server (and the preload is active).
fn ours<T>(
    domid: u16,
    id: u16,
    f: impl FnOnce(&mut State) -> Result<T, Fail>,
) -> Option<Result<T, Fail>> {
    if !config::active() {
        return None;
    }
    with_state(|st| st.is_ours(domid, id).then(|| f(st)))
}

/// A map or unmap of the multiplexed server.
fn claim_op(
    domid: u16,
    id: u16,
    map: bool,
    claim: impl FnOnce() -> Result<Claim, Fail>,
) -> Option<c_int> {
    ours(domid, id, |st| st.claim(map, claim()?)).map(status)
}

// ---------------------------------------------------------------- libxendevicemodel

type CreateFn = unsafe extern "C" fn(Ptr, u16, c_int, *mut u16) -> c_int;
type GetInfoFn = unsafe extern "C" fn(Ptr, u16, u16, *mut c_ulong, *mut c_ulong, *mut u32) -> c_int;
type RangeFn = unsafe extern "C" fn(Ptr, u16, u16, c_int, u64, u64) -> c_int;
type PcidevFn = unsafe extern "C" fn(Ptr, u16, u16, u16, u8, u8, u8) -> c_int;
type IdFn = unsafe extern "C" fn(Ptr, u16, u16) -> c_int;
type SetStateFn = unsafe extern "C" fn(Ptr, u16, u16, c_int) -> c_int;

static REAL_CREATE: RealFn = RealFn::new(c"xendevicemodel_create_ioreq_server");
static REAL_GET_INFO: RealFn = RealFn::new(c"xendevicemodel_get_ioreq_server_info");
static REAL_MAP_RANGE: RealFn = RealFn::new(c"xendevicemodel_map_io_range_to_ioreq_server");
static REAL_UNMAP_RANGE: RealFn = RealFn::new(c"xendevicemodel_unmap_io_range_from_ioreq_server");
static REAL_MAP_PCIDEV: RealFn = RealFn::new(c"xendevicemodel_map_pcidev_to_ioreq_server");
static REAL_UNMAP_PCIDEV: RealFn = RealFn::new(c"xendevicemodel_unmap_pcidev_from_ioreq_server");
static REAL_DESTROY: RealFn = RealFn::new(c"xendevicemodel_destroy_ioreq_server");
static REAL_SET_STATE: RealFn = RealFn::new(c"xendevicemodel_set_ioreq_server_state");

/// Interposed `xendevicemodel_create_ioreq_server`.
///
/// # Safety
/// As the C function: `id` must be valid for a write of an `ioservid_t` (`dmod` is only
/// passed through).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xendevicemodel_create_ioreq_server(
    dmod: Ptr,
    domid: u16,
    handle_bufioreq: c_int,
    id: *mut u16,
) -> c_int {
    if config::active() {
        if id.is_null() {
            return fail(Fail::Errno(libc::EINVAL));
        }
        let cfg = config::get();
        return match with_state(|st| st.create(cfg, domid, handle_bufioreq)) {
            Ok(v) => {
                // SAFETY: non-null, and the caller's `ioservid_t *` out parameter.
                unsafe { id.write(v) };
                0
            }
            Err(f) => fail(f),
        };
    }
    real!(
        REAL_CREATE,
        CreateFn,
        -1,
        (dmod, domid, handle_bufioreq, id)
    )
}

/// Interposed `xendevicemodel_get_ioreq_server_info`.
///
/// # Safety
/// As the C function: each non-null out pointer must be valid for a write of its type.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xendevicemodel_get_ioreq_server_info(
    dmod: Ptr,
    domid: u16,
    id: u16,
    ioreq_gfn: *mut c_ulong,
    bufioreq_gfn: *mut c_ulong,
    bufioreq_port: *mut u32,
) -> c_int {
    let want_gfns = !ioreq_gfn.is_null() || !bufioreq_gfn.is_null();
    if let Some(r) = ours(domid, id, |st| st.get_info(want_gfns)) {
        return match r {
            Ok(port) => {
                if !bufioreq_port.is_null() {
                    // SAFETY: non-null, the caller's `evtchn_port_t *` out parameter.
                    unsafe { bufioreq_port.write(port) };
                }
                0
            }
            Err(f) => fail(f),
        };
    }
    real!(
        REAL_GET_INFO,
        GetInfoFn,
        -1,
        (dmod, domid, id, ioreq_gfn, bufioreq_gfn, bufioreq_port)
    )
}

/// Interposed `xendevicemodel_map_io_range_to_ioreq_server`.
///
/// # Safety
/// As the C function (`dmod` is only passed through).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xendevicemodel_map_io_range_to_ioreq_server(
    dmod: Ptr,
    domid: u16,
    id: u16,
    is_mmio: c_int,
    start: u64,
    end: u64,
) -> c_int {
    if let Some(r) = claim_op(domid, id, true, || State::range_claim(is_mmio, start, end)) {
        return r;
    }
    real!(
        REAL_MAP_RANGE,
        RangeFn,
        -1,
        (dmod, domid, id, is_mmio, start, end)
    )
}

/// Interposed `xendevicemodel_unmap_io_range_from_ioreq_server`.
///
/// # Safety
/// As the C function (`dmod` is only passed through).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xendevicemodel_unmap_io_range_from_ioreq_server(
    dmod: Ptr,
    domid: u16,
    id: u16,
    is_mmio: c_int,
    start: u64,
    end: u64,
) -> c_int {
    if let Some(r) = claim_op(domid, id, false, || State::range_claim(is_mmio, start, end)) {
        return r;
    }
    real!(
        REAL_UNMAP_RANGE,
        RangeFn,
        -1,
        (dmod, domid, id, is_mmio, start, end)
    )
}

/// Interposed `xendevicemodel_map_pcidev_to_ioreq_server`.
///
/// # Safety
/// As the C function (`dmod` is only passed through).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xendevicemodel_map_pcidev_to_ioreq_server(
    dmod: Ptr,
    domid: u16,
    id: u16,
    segment: u16,
    bus: u8,
    device: u8,
    function: u8,
) -> c_int {
    if let Some(r) = claim_op(domid, id, true, || {
        State::pcidev_claim(segment, bus, device, function)
    }) {
        return r;
    }
    real!(
        REAL_MAP_PCIDEV,
        PcidevFn,
        -1,
        (dmod, domid, id, segment, bus, device, function)
    )
}

/// Interposed `xendevicemodel_unmap_pcidev_from_ioreq_server`.
///
/// # Safety
/// As the C function (`dmod` is only passed through).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xendevicemodel_unmap_pcidev_from_ioreq_server(
    dmod: Ptr,
    domid: u16,
    id: u16,
    segment: u16,
    bus: u8,
    device: u8,
    function: u8,
) -> c_int {
    if let Some(r) = claim_op(domid, id, false, || {
        State::pcidev_claim(segment, bus, device, function)
    }) {
        return r;
    }
    real!(
        REAL_UNMAP_PCIDEV,
        PcidevFn,
        -1,
        (dmod, domid, id, segment, bus, device, function)
    )
}

/// Interposed `xendevicemodel_destroy_ioreq_server`.
///
/// # Safety
/// As the C function (`dmod` is only passed through).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xendevicemodel_destroy_ioreq_server(
    dmod: Ptr,
    domid: u16,
    id: u16,
) -> c_int {
    if let Some(r) = ours(domid, id, State::destroy) {
        return status(r);
    }
    real!(REAL_DESTROY, IdFn, -1, (dmod, domid, id))
}

/// Interposed `xendevicemodel_set_ioreq_server_state`.
///
/// # Safety
/// As the C function (`dmod` is only passed through).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xendevicemodel_set_ioreq_server_state(
    dmod: Ptr,
    domid: u16,
    id: u16,
    enabled: c_int,
) -> c_int {
    if let Some(r) = ours(domid, id, |st| st.set_state(enabled != 0)) {
        return status(r);
    }
    real!(REAL_SET_STATE, SetStateFn, -1, (dmod, domid, id, enabled))
}

// ---------------------------------------------------------------- libxenforeignmemory

type MapResourceFn = unsafe extern "C" fn(
    Ptr,
    u16,
    c_uint,
    c_uint,
    c_ulong,
    c_ulong,
    *mut *mut c_void,
    c_int,
    c_int,
) -> Ptr;
type UnmapResourceFn = unsafe extern "C" fn(Ptr, Ptr) -> c_int;

static REAL_MAP_RESOURCE: RealFn = RealFn::new(c"xenforeignmemory_map_resource");
static REAL_UNMAP_RESOURCE: RealFn = RealFn::new(c"xenforeignmemory_unmap_resource");

/// Interposed `xenforeignmemory_map_resource`.
///
/// # Safety
/// As the C function: `paddr`, if not null, must be valid for a read and a write of a
/// `void *` (the hint in, the address out).
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn xenforeignmemory_map_resource(
    fmem: Ptr,
    domid: u16,
    ty: c_uint,
    id: c_uint,
    frame: c_ulong,
    nr_frames: c_ulong,
    paddr: *mut *mut c_void,
    prot: c_int,
    flags: c_int,
) -> Ptr {
    if config::active() {
        let hint = if paddr.is_null() {
            null_mut()
        } else {
            // SAFETY: non-null, the caller's `void **` in/out parameter.
            unsafe { paddr.read() }
        };
        // `unsigned long` is 64 bits on the targets Xen's x86 and Arm tools run on.
        #[allow(clippy::useless_conversion)]
        let (frame64, nr64) = (u64::from(frame), u64::from(nr_frames));
        let r = with_state(|st| {
            let plan = match st.resource(domid, ty, id, frame64, nr64)? {
                Ok(p) => p,
                Err(f) => return Some(Err(f)),
            };
            let r = map_shared(hint, plan.len, prot, flags, plan.fd, plan.offset)
                .map(|addr| (st.add_resource(addr as usize, plan.len), addr))
                .map_err(Fail::Errno);
            Some(r)
        });
        if let Some(r) = r {
            debug!(
                "map_resource(domain {domid}, type {ty}, id {id}, frame {frame}, {nr_frames} frames, hint {hint:?}): {}",
                match &r {
                    Ok((_, a)) => format!("mapped at {a:?}"),
                    Err(e) => format!("{e:?}"),
                }
            );
            return match r {
                Ok((key, addr)) => {
                    info!(
                        "map_resource: server {id} frames {frame}..{} of the multiplexer's memory mapped at {addr:?}, fake ports in vp_eport",
                        frame64.saturating_add(nr64)
                    );
                    if !paddr.is_null() {
                        // SAFETY: non-null, the caller's `void **` in/out parameter.
                        unsafe { paddr.write(addr) };
                    }
                    key as Ptr
                }
                Err(f) => {
                    fail(f);
                    null_mut()
                }
            };
        }
    }
    real!(
        REAL_MAP_RESOURCE,
        MapResourceFn,
        null_mut(),
        (fmem, domid, ty, id, frame, nr_frames, paddr, prot, flags)
    )
}

/// Interposed `xenforeignmemory_unmap_resource`: a handle this library handed out is
/// unmapped here and never reaches the real library.
///
/// # Safety
/// As the C function (`fmem` and `fres` are compared and passed through, never read).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xenforeignmemory_unmap_resource(fmem: Ptr, fres: Ptr) -> c_int {
    if config::active() {
        if let Some(res) = with_state(|st| st.take_resource(fres as usize)) {
            let r = unmap(res.addr, res.len);
            debug!(
                "unmap_resource({fres:?}): {} bytes at {:#x}: {r:?}",
                res.len, res.addr
            );
            return status(r.map_err(Fail::Errno));
        }
    }
    real!(REAL_UNMAP_RESOURCE, UnmapResourceFn, -1, (fmem, fres))
}

// ---------------------------------------------------------------- libxenevtchn

type OpenFn = unsafe extern "C" fn(Ptr, c_uint) -> Ptr;
type HandleFn = unsafe extern "C" fn(Ptr) -> c_int;
type PortFn = unsafe extern "C" fn(Ptr, u32) -> c_int;
type BindFn = unsafe extern "C" fn(Ptr, u32, u32) -> c_int;

static REAL_OPEN: RealFn = RealFn::new(c"xenevtchn_open");
static REAL_CLOSE: RealFn = RealFn::new(c"xenevtchn_close");
static REAL_FD: RealFn = RealFn::new(c"xenevtchn_fd");
static REAL_NOTIFY: RealFn = RealFn::new(c"xenevtchn_notify");
static REAL_BIND: RealFn = RealFn::new(c"xenevtchn_bind_interdomain");
static REAL_UNBIND: RealFn = RealFn::new(c"xenevtchn_unbind");
static REAL_PENDING: RealFn = RealFn::new(c"xenevtchn_pending");
static REAL_UNMASK: RealFn = RealFn::new(c"xenevtchn_unmask");

/// Interposed `xenevtchn_open`: the real handle, registered so that fake ports can be
/// bound on it; without Xen (ENOENT) a handle of the preload's own.
///
/// # Safety
/// As the C function (`logger` is only passed through).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xenevtchn_open(logger: Ptr, flags: c_uint) -> Ptr {
    let h = real!(REAL_OPEN, OpenFn, null_mut(), (logger, flags));
    if !config::active() {
        return h;
    }
    if h.is_null() {
        let e = nix::errno::Errno::last_raw();
        if e != libc::ENOENT {
            return h;
        }
        return match with_state(|st| st.open_handle(None, e)) {
            Ok(key) => key as Ptr,
            Err(err) => {
                info!("cannot set up an event-channel handle: {err}");
                nix::errno::Errno::set_raw(e);
                null_mut()
            }
        };
    }
    let fd = real!(REAL_FD, HandleFn, -1, (h));
    if fd < 0 {
        info!("the real xenevtchn_fd failed: handle {h:?} passes through unchanged");
        return h;
    }
    if let Err(err) = with_state(|st| st.open_handle(Some((h as usize, fd)), 0)) {
        info!("cannot set up event-channel handle {h:?} ({err}): it passes through unchanged");
    }
    h
}

/// Interposed `xenevtchn_close`.
///
/// # Safety
/// As the C function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xenevtchn_close(xce: Ptr) -> c_int {
    if config::active() {
        if let Some(real) = with_state(|st| st.close_handle(xce as usize)) {
            if !real {
                return 0;
            }
        }
    }
    real!(REAL_CLOSE, HandleFn, -1, (xce))
}

/// Interposed `xenevtchn_fd`: the handle's epoll descriptor.
///
/// # Safety
/// As the C function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xenevtchn_fd(xce: Ptr) -> c_int {
    if config::active() {
        if let Some(fd) = with_state(|st| st.handle_fd(xce as usize)) {
            return fd;
        }
    }
    real!(REAL_FD, HandleFn, -1, (xce))
}

/// Interposed `xenevtchn_bind_interdomain`.
///
/// # Safety
/// As the C function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xenevtchn_bind_interdomain(
    xce: Ptr,
    domid: u32,
    remote_port: u32,
) -> c_int {
    if config::active() {
        if let Route::Ours(r) = with_state(|st| st.bind(xce as usize, domid, remote_port)) {
            return match r {
                Ok(local) => local as c_int,
                Err(f) => fail(f),
            };
        }
    }
    real!(REAL_BIND, BindFn, -1, (xce, domid, remote_port))
}

/// Interposed `xenevtchn_unbind`.
///
/// # Safety
/// As the C function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xenevtchn_unbind(xce: Ptr, port: u32) -> c_int {
    if config::active() {
        if let Route::Ours(r) = with_state(|st| st.unbind(xce as usize, port)) {
            return status(r);
        }
    }
    real!(REAL_UNBIND, PortFn, -1, (xce, port))
}

/// Interposed `xenevtchn_unmask`.
///
/// # Safety
/// As the C function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xenevtchn_unmask(xce: Ptr, port: u32) -> c_int {
    if config::active() {
        if let Route::Ours(r) = with_state(|st| st.unmask(xce as usize, port)) {
            return status(r);
        }
    }
    real!(REAL_UNMASK, PortFn, -1, (xce, port))
}

/// Interposed `xenevtchn_notify`.
///
/// # Safety
/// As the C function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xenevtchn_notify(xce: Ptr, port: u32) -> c_int {
    if config::active() {
        if let Route::Ours(r) = with_state(|st| st.notify(xce as usize, port)) {
            return status(r);
        }
    }
    real!(REAL_NOTIFY, PortFn, -1, (xce, port))
}

/// Interposed `xenevtchn_pending`.
///
/// # Safety
/// As the C function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn xenevtchn_pending(xce: Ptr) -> c_int {
    if config::active() {
        if let Route::Ours(r) = with_state(|st| st.pending(xce as usize)) {
            return match r {
                Ok(port) => port,
                Err(f) => fail(f),
            };
        }
    }
    real!(REAL_PENDING, HandleFn, -1, (xce))
}
