//! The real backend (feature `bindgen`): calls through the run-time-loaded library structs.
//!
//! Every function here is a thin, checked call: fetch the function pointer (a missing symbol
//! is [`XenError::MissingSymbol`]), call it, turn a failure return into
//! [`XenError::Call`] with the `errno` it left.

use crate::error::XenError;
use crate::sys::devicemodel::XenDeviceModelLib;
use crate::sys::evtchn::XenEvtchnLib;
use crate::sys::foreignmemory::XenForeignMemoryLib;
use crate::sys::types as t;
use core::ffi::{c_int, c_uint, c_ulong, c_void};
use std::ptr::{self, NonNull};

pub(crate) struct Libs {
    dm: XenDeviceModelLib,
    fm: XenForeignMemoryLib,
    ev: XenEvtchnLib,
    sonames: [&'static str; 3],
}

/// An open `xendevicemodel_handle *`.
pub(crate) struct DmRaw(NonNull<t::xendevicemodel_handle>);
/// An open `xenforeignmemory_handle *`.
pub(crate) struct FmRaw(NonNull<t::xenforeignmemory_handle>);
/// A `xenforeignmemory_resource_handle *` from `xenforeignmemory_map_resource`.
pub(crate) struct ResRaw(NonNull<t::xenforeignmemory_resource_handle>);
/// Start of a resource mapping.
pub(crate) struct MapAddr(NonNull<u8>);
/// An open `xenevtchn_handle *`.
pub(crate) struct EvRaw(NonNull<t::xenevtchn_handle>);

// SAFETY (all four `Send`s): the handles are heap objects of the library holding file
// descriptors (and, for mappings, an mmap'ed range); nothing in them is tied to the thread
// that created them, so another thread may use or close them. The public wrappers decide
// which of them may also be shared (`Sync`).
unsafe impl Send for DmRaw {}
unsafe impl Send for FmRaw {}
unsafe impl Send for ResRaw {}
unsafe impl Send for MapAddr {}
unsafe impl Send for EvRaw {}
// SAFETY: the public API shares a foreignmemory handle between its owner and its mappings
// through an `Arc`. The operations it is used for concurrently, `xenforeignmemory_map_resource`
// and `xenforeignmemory_unmap_resource`, each work on their own resource handle (allocated
// per mapping) with independent ioctl/mmap/munmap system calls on the shared privcmd fd and
// keep no other mutable state in the handle; `xenforeignmemory_close` runs only when the
// last `Arc` is dropped, so never concurrently with them.
unsafe impl Sync for FmRaw {}

/// `errno` as left by the call that just failed.
fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn call_err(func: &'static str) -> XenError {
    XenError::Call {
        func,
        errno: errno(),
    }
}

/// The function pointer `$name` of library struct `$lib` (soname `$soname`), or an early
/// return of [`XenError::MissingSymbol`].
macro_rules! sym {
    ($lib:expr, $soname:expr, $name:ident) => {
        match &$lib.$name {
            Ok(f) => *f,
            Err(_) => {
                return Err(XenError::MissingSymbol {
                    soname: $soname,
                    symbol: stringify!($name),
                });
            }
        }
    };
}

fn load_err(soname: &'static str, e: libloading::Error) -> XenError {
    XenError::LibraryLoad {
        soname,
        reason: e.to_string(),
    }
}

pub(crate) fn load(sonames: [&'static str; 3]) -> Result<Libs, XenError> {
    let [dm_name, fm_name, ev_name] = sonames;
    // SAFETY (the three loads): loading runs the library's initialisers. These are Xen's
    // tools libraries (and their dependencies libxencall, libxentoolcore, libxentoollog),
    // whose load-time work is ordinary dynamic linking; we load them by their versioned
    // sonames, so the symbol types bindgen generated from the 4.17 headers match the ABI
    // of that soname version.
    let dm = unsafe { XenDeviceModelLib::new(dm_name) }.map_err(|e| load_err(dm_name, e))?;
    // SAFETY: as above.
    let fm = unsafe { XenForeignMemoryLib::new(fm_name) }.map_err(|e| load_err(fm_name, e))?;
    // SAFETY: as above.
    let ev = unsafe { XenEvtchnLib::new(ev_name) }.map_err(|e| load_err(ev_name, e))?;
    Ok(Libs {
        dm,
        fm,
        ev,
        sonames,
    })
}

// ---- libxendevicemodel -------------------------------------------------------------------

pub(crate) fn dm_open(l: &Libs) -> Result<DmRaw, XenError> {
    let f = sym!(l.dm, l.sonames[0], xendevicemodel_open);
    // SAFETY: a NULL logger asks the library for its default one; flags 0.
    let h = unsafe { f(ptr::null_mut(), 0) };
    NonNull::new(h)
        .map(DmRaw)
        .ok_or_else(|| call_err("xendevicemodel_open"))
}

pub(crate) fn dm_close(l: &Libs, h: &DmRaw) -> Result<(), XenError> {
    let f = sym!(l.dm, l.sonames[0], xendevicemodel_close);
    // SAFETY: `h` is open and this is its owner's drop: it is not used afterwards.
    if unsafe { f(h.0.as_ptr()) } < 0 {
        return Err(call_err("xendevicemodel_close"));
    }
    Ok(())
}

pub(crate) fn dm_nr_vcpus(l: &Libs, h: &DmRaw, domid: u16) -> Result<u32, XenError> {
    let f = sym!(l.dm, l.sonames[0], xendevicemodel_nr_vcpus);
    let mut n: c_uint = 0;
    // SAFETY: `h` is open; `n` is a valid out pointer for the duration of the call.
    if unsafe { f(h.0.as_ptr(), domid, &mut n) } < 0 {
        return Err(call_err("xendevicemodel_nr_vcpus"));
    }
    Ok(n)
}

pub(crate) fn dm_create_ioreq_server(
    l: &Libs,
    h: &DmRaw,
    domid: u16,
    handle_bufioreq: u8,
) -> Result<u16, XenError> {
    let f = sym!(l.dm, l.sonames[0], xendevicemodel_create_ioreq_server);
    let mut id: t::ioservid_t = 0;
    // SAFETY: `h` is open; `id` is a valid out pointer for the duration of the call.
    if unsafe { f(h.0.as_ptr(), domid, c_int::from(handle_bufioreq), &mut id) } < 0 {
        return Err(call_err("xendevicemodel_create_ioreq_server"));
    }
    Ok(id)
}

pub(crate) fn dm_get_ioreq_server_info(
    l: &Libs,
    h: &DmRaw,
    domid: u16,
    id: u16,
) -> Result<u32, XenError> {
    let f = sym!(l.dm, l.sonames[0], xendevicemodel_get_ioreq_server_info);
    let mut port: t::evtchn_port_t = 0;
    // SAFETY: `h` is open; NULL gfn pointers are documented as "not required" (and make the
    // library set XEN_DMOP_no_gfns); `port` is a valid out pointer during the call.
    let rc = unsafe {
        f(
            h.0.as_ptr(),
            domid,
            id,
            ptr::null_mut(),
            ptr::null_mut(),
            &mut port,
        )
    };
    if rc < 0 {
        return Err(call_err("xendevicemodel_get_ioreq_server_info"));
    }
    Ok(port)
}

pub(crate) fn dm_io_range(
    l: &Libs,
    h: &DmRaw,
    domid: u16,
    id: u16,
    is_mmio: bool,
    (start, end): (u64, u64),
    map: bool,
) -> Result<(), XenError> {
    let (f, name) = if map {
        (
            sym!(
                l.dm,
                l.sonames[0],
                xendevicemodel_map_io_range_to_ioreq_server
            ),
            "xendevicemodel_map_io_range_to_ioreq_server",
        )
    } else {
        (
            sym!(
                l.dm,
                l.sonames[0],
                xendevicemodel_unmap_io_range_from_ioreq_server
            ),
            "xendevicemodel_unmap_io_range_from_ioreq_server",
        )
    };
    // SAFETY: `h` is open; the other arguments are plain values.
    if unsafe { f(h.0.as_ptr(), domid, id, c_int::from(is_mmio), start, end) } < 0 {
        return Err(call_err(name));
    }
    Ok(())
}

pub(crate) fn dm_pcidev(
    l: &Libs,
    h: &DmRaw,
    domid: u16,
    id: u16,
    (seg, bus, dev, func): (u16, u8, u8, u8),
    map: bool,
) -> Result<(), XenError> {
    let (f, name) = if map {
        (
            sym!(
                l.dm,
                l.sonames[0],
                xendevicemodel_map_pcidev_to_ioreq_server
            ),
            "xendevicemodel_map_pcidev_to_ioreq_server",
        )
    } else {
        (
            sym!(
                l.dm,
                l.sonames[0],
                xendevicemodel_unmap_pcidev_from_ioreq_server
            ),
            "xendevicemodel_unmap_pcidev_from_ioreq_server",
        )
    };
    // SAFETY: `h` is open; the other arguments are plain values.
    if unsafe { f(h.0.as_ptr(), domid, id, seg, bus, dev, func) } < 0 {
        return Err(call_err(name));
    }
    Ok(())
}

pub(crate) fn dm_set_ioreq_server_state(
    l: &Libs,
    h: &DmRaw,
    domid: u16,
    id: u16,
    enabled: bool,
) -> Result<(), XenError> {
    let f = sym!(l.dm, l.sonames[0], xendevicemodel_set_ioreq_server_state);
    // SAFETY: `h` is open; the other arguments are plain values.
    if unsafe { f(h.0.as_ptr(), domid, id, c_int::from(enabled)) } < 0 {
        return Err(call_err("xendevicemodel_set_ioreq_server_state"));
    }
    Ok(())
}

pub(crate) fn dm_destroy_ioreq_server(
    l: &Libs,
    h: &DmRaw,
    domid: u16,
    id: u16,
) -> Result<(), XenError> {
    let f = sym!(l.dm, l.sonames[0], xendevicemodel_destroy_ioreq_server);
    // SAFETY: `h` is open; the other arguments are plain values.
    if unsafe { f(h.0.as_ptr(), domid, id) } < 0 {
        return Err(call_err("xendevicemodel_destroy_ioreq_server"));
    }
    Ok(())
}

pub(crate) fn dm_inject_msi(
    l: &Libs,
    h: &DmRaw,
    domid: u16,
    addr: u64,
    data: u32,
) -> Result<(), XenError> {
    let f = sym!(l.dm, l.sonames[0], xendevicemodel_inject_msi);
    // SAFETY: `h` is open; the other arguments are plain values (the library copies them into
    // a `xen_dm_op_inject_msi` and makes the hypercall).
    if unsafe { f(h.0.as_ptr(), domid, addr, data) } < 0 {
        return Err(call_err("xendevicemodel_inject_msi"));
    }
    Ok(())
}

// ---- libxenforeignmemory -----------------------------------------------------------------

pub(crate) fn fm_open(l: &Libs) -> Result<FmRaw, XenError> {
    let f = sym!(l.fm, l.sonames[1], xenforeignmemory_open);
    // SAFETY: a NULL logger asks the library for its default one; flags 0.
    let h = unsafe { f(ptr::null_mut(), 0) };
    NonNull::new(h)
        .map(FmRaw)
        .ok_or_else(|| call_err("xenforeignmemory_open"))
}

pub(crate) fn fm_close(l: &Libs, h: &FmRaw) -> Result<(), XenError> {
    let f = sym!(l.fm, l.sonames[1], xenforeignmemory_close);
    // SAFETY: `h` is open, its last user is being dropped (no mapping outlives it: each
    // holds the `Arc` that owns it), and it is not used afterwards.
    if unsafe { f(h.0.as_ptr()) } < 0 {
        return Err(call_err("xenforeignmemory_close"));
    }
    Ok(())
}

pub(crate) fn fm_map_resource(
    l: &Libs,
    h: &FmRaw,
    domid: u16,
    ty: u32,
    id: u32,
    frame: u64,
    nr_frames: u64,
) -> Result<(ResRaw, MapAddr), XenError> {
    let f = sym!(l.fm, l.sonames[1], xenforeignmemory_map_resource);
    let mut addr: *mut c_void = ptr::null_mut();
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: `h` is open; `addr` is NULL on entry (no placement hint) and a valid out
    // pointer during the call; frame numbers are tiny, so the casts to `unsigned long` are
    // lossless; flags 0 (the library adds MAP_SHARED).
    let res = unsafe {
        f(
            h.0.as_ptr(),
            domid,
            ty as c_uint,
            id as c_uint,
            frame as c_ulong,
            nr_frames as c_ulong,
            &mut addr,
            prot,
            0,
        )
    };
    let Some(res) = NonNull::new(res) else {
        return Err(call_err("xenforeignmemory_map_resource"));
    };
    let res = ResRaw(res);
    match NonNull::new(addr.cast::<u8>()) {
        Some(addr) => Ok((res, MapAddr(addr))),
        None => {
            // Not expected: success with no address. Release the resource handle.
            let _ = fm_unmap_resource(l, h, &res);
            Err(XenError::Call {
                func: "xenforeignmemory_map_resource",
                errno: libc::EFAULT,
            })
        }
    }
}

pub(crate) fn fm_unmap_resource(l: &Libs, h: &FmRaw, res: &ResRaw) -> Result<(), XenError> {
    let f = sym!(l.fm, l.sonames[1], xenforeignmemory_unmap_resource);
    // SAFETY: `h` is open and `res` is a live resource handle made from it; this is its
    // owner's drop, and no view of the mapping can outlive that owner's borrow.
    if unsafe { f(h.0.as_ptr(), res.0.as_ptr()) } < 0 {
        return Err(call_err("xenforeignmemory_unmap_resource"));
    }
    Ok(())
}

pub(crate) fn map_addr(a: &MapAddr) -> NonNull<u8> {
    a.0
}

// ---- libxenevtchn ------------------------------------------------------------------------

pub(crate) fn ev_open(l: &Libs) -> Result<EvRaw, XenError> {
    let f = sym!(l.ev, l.sonames[2], xenevtchn_open);
    // SAFETY: a NULL logger is accepted (the evtchn functions do no logging); flags 0 keeps
    // the default O_CLOEXEC.
    let h = unsafe { f(ptr::null_mut(), 0) };
    NonNull::new(h)
        .map(EvRaw)
        .ok_or_else(|| call_err("xenevtchn_open"))
}

pub(crate) fn ev_close(l: &Libs, h: &EvRaw) -> Result<(), XenError> {
    let f = sym!(l.ev, l.sonames[2], xenevtchn_close);
    // SAFETY: `h` is open; this is its owner's drop and it is not used afterwards.
    if unsafe { f(h.0.as_ptr()) } < 0 {
        return Err(call_err("xenevtchn_close"));
    }
    Ok(())
}

pub(crate) fn ev_fd(l: &Libs, h: &EvRaw) -> Result<i32, XenError> {
    let f = sym!(l.ev, l.sonames[2], xenevtchn_fd);
    // SAFETY: `h` is open.
    let fd = unsafe { f(h.0.as_ptr()) };
    if fd < 0 {
        return Err(call_err("xenevtchn_fd"));
    }
    Ok(fd)
}

/// A `xenevtchn_port_or_error_t` (int) result as a port, or the call's errno.
fn port_or_err(rc: c_int, func: &'static str) -> Result<u32, XenError> {
    u32::try_from(rc).map_err(|_| call_err(func))
}

pub(crate) fn ev_bind_interdomain(
    l: &Libs,
    h: &EvRaw,
    domid: u16,
    remote_port: u32,
) -> Result<u32, XenError> {
    let f = sym!(l.ev, l.sonames[2], xenevtchn_bind_interdomain);
    // SAFETY: `h` is open; the other arguments are plain values.
    let rc = unsafe { f(h.0.as_ptr(), u32::from(domid), remote_port) };
    port_or_err(rc, "xenevtchn_bind_interdomain")
}

pub(crate) fn ev_unbind(l: &Libs, h: &EvRaw, port: u32) -> Result<(), XenError> {
    let f = sym!(l.ev, l.sonames[2], xenevtchn_unbind);
    // SAFETY: `h` is open; the port is a plain value (the kernel checks it is ours).
    if unsafe { f(h.0.as_ptr(), port) } < 0 {
        return Err(call_err("xenevtchn_unbind"));
    }
    Ok(())
}

pub(crate) fn ev_notify(l: &Libs, h: &EvRaw, port: u32) -> Result<(), XenError> {
    let f = sym!(l.ev, l.sonames[2], xenevtchn_notify);
    // SAFETY: `h` is open; the port is a plain value.
    if unsafe { f(h.0.as_ptr(), port) } < 0 {
        return Err(call_err("xenevtchn_notify"));
    }
    Ok(())
}

pub(crate) fn ev_pending(l: &Libs, h: &EvRaw) -> Result<u32, XenError> {
    let f = sym!(l.ev, l.sonames[2], xenevtchn_pending);
    // SAFETY: `h` is open.
    let rc = unsafe { f(h.0.as_ptr()) };
    port_or_err(rc, "xenevtchn_pending")
}

pub(crate) fn ev_unmask(l: &Libs, h: &EvRaw, port: u32) -> Result<(), XenError> {
    let f = sym!(l.ev, l.sonames[2], xenevtchn_unmask);
    // SAFETY: `h` is open; the port is a plain value.
    if unsafe { f(h.0.as_ptr(), port) } < 0 {
        return Err(call_err("xenevtchn_unmask"));
    }
    Ok(())
}
