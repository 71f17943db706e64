//! `libioreq_mux_preload.so`: loaded with `LD_PRELOAD` into an unmodified QEMU (Debian 12's
//! QEMU 7.2, `/usr/libexec/xen-qemu-system-i386`), it turns QEMU's Xen ioreq server into a
//! client of ioreq-mux's device-model protocol (`docs/dm-protocol.md`, version 2), through
//! `ioreq_server::oop::client::Connection`. Everything else QEMU does with Xen goes to the
//! real libraries unchanged.
//!
//! # What is intercepted
//!
//! The library exports, without a symbol version (which makes the dynamic linker bind QEMU's
//! versioned references to them), the calls QEMU makes for its ioreq server. Each one looks
//! at its arguments and passes the call to the real function (`dlsym(RTLD_NEXT, ...)`,
//! resolved once) unless it is about the multiplexed server:
//!
//! | call | what the preload does for the multiplexed server |
//! |---|---|
//! | `xendevicemodel_create_ioreq_server` | connects to `IOREQ_MUX_SOCKET` (once), CREATE + GET_IOREQ_SERVER_INFO; the multiplexer's id becomes QEMU's server id |
//! | `xendevicemodel_get_ioreq_server_info` | the fake buffered port; gfns are refused (EOPNOTSUPP) |
//! | `xendevicemodel_set_ioreq_server_state` | enable: deferred until every port is bound (below); disable: forwarded |
//! | `xendevicemodel_destroy_ioreq_server` | DESTROY; the fake ports are detached |
//! | `xendevicemodel_(un)map_io_range_*`, `_(un)map_pcidev_*` | MAP/UNMAP messages; the multiplexer's error codes are errno values |
//! | `xenforeignmemory_map_resource` (type 0, our id) | maps the protocol's memfd (frame 0 buffered page, frame 1 ioreq page) at the caller's hint, after writing vCPU *i*'s fake remote port into slot *i*'s `vp_eport` |
//! | `xenforeignmemory_unmap_resource` | unmaps a mapping it handed out (never passed to the real library) |
//! | `xenevtchn_*` (open, close, fd, bind_interdomain, unbind, pending, unmask, notify) | fake event channels over the protocol's eventfds |
//!
//! "The multiplexed server" is the (domain, id) pair the create returned; any other id,
//! domain or resource type goes to Xen.
//!
//! Interrupts are not intercepted. QEMU raises its emulated devices' MSIs with
//! `xendevicemodel_inject_msi` on its own devicemodel handle (an MSI write lands in its Xen
//! APIC region, whose handler `xen_apic_mem_write`, hw/i386/xen/xen_apic.c, calls
//! `xen_hvm_inject_msi`). `XEN_DMOP_inject_msi` is an operation on the domain, allowed to
//! any device model of it and tied to no ioreq server, so the call reaches Xen unchanged and
//! works behind the multiplexer as without it; nothing here needs to change. (The protocol's
//! INJECT_MSI is for device models without a Xen handle of their own.) The same holds for
//! INTx levels, ISA IRQs and link routes.
//!
//! # Event channels: classified by handle
//!
//! QEMU's PV backends open event-channel handles of their own, and port numbers are only
//! unique within a handle, so nothing is decided by a port number alone. Every handle opened
//! while the preload is active gets an entry, and its `xenevtchn_fd` is an epoll descriptor
//! over the real handle's descriptor and an internal eventfd; a handle that has no fake port
//! behaves exactly like the real one through it. A `bind_interdomain` to the server's domain
//! whose remote port is one of the fake ones the preload issued (vCPU *i*'s from `vp_eport`,
//! or the buffered one from `get_info`) and not bound yet attaches that channel to *that*
//! handle with a local port the preload numbers (`ports`: numbers above every real port, so
//! they cannot collide with the handle's real ports), and adds the channel's eventfd and the
//! control socket to the handle's epoll set. From then on, on that handle only:
//!
//! - `pending` returns one port per call: fake ports first (each rung eventfd queues its
//!   port once), then a real port only if the real descriptor is readable (the real call
//!   would block otherwise), else -1 with `EAGAIN` (QEMU reads -1 as "nothing"). The
//!   internal eventfd stays readable while ports are queued, so the descriptor stays
//!   readable until every pending port has been returned.
//! - `unmask` of a fake port does nothing; `notify` of vCPU *i*'s port is step 6 of the
//!   protocol (a sequentially consistent fence, then ring the response eventfd unless the
//!   multiplexer's `mux_polling[i]` is set); `notify` of the buffered port does nothing.
//! - `unbind` and `close` detach fake ports; real ports go to the real library.
//!
//! Without Xen (no `/dev/xen/evtchn`: the real open fails with `ENOENT`), `xenevtchn_open`
//! still returns a handle, whose fake ports work and whose real-path calls fail with that
//! `ENOENT`. This is what lets the preload be tested on a machine without Xen; on a Xen host
//! the real open succeeds and the real handle is used.
//!
//! # Why the enable waits for the binds
//!
//! The multiplexer writes each request's sequence number into `vp_eport`
//! (docs/dm-protocol.md, 6), where QEMU reads its remote ports. QEMU 7.2 enables the server
//! *before* it binds them (`xen_hvm_init_pc` in hw/i386/xen/xen-hvm.c: map_resource,
//! get_info, set_state(1), then one bind per vCPU and one for the ring), which with Xen is
//! fine because Xen never changes `vp_eport`. So an enable is remembered and forwarded only
//! once every vCPU's port and the buffered port are bound on some handle (at once if they
//! already are); a disable is forwarded at once.
//!
//! # Failing to start, and the multiplexer going away
//!
//! If the create cannot reach the multiplexer, or the multiplexer refuses it, the preload
//! does not return an error to QEMU: QEMU 7.2 ignores a failed create and carries on with
//! the "default ioreq server" (server id 0, legacy HVM params), which on a host running the
//! multiplexer would map and bind whatever server 0 of the domain is, or fail later with a
//! misleading message. [`cannot_serve`] prints why and exits with status 1 instead.
//!
//! When the connection ends (GOODBYE, or end of file: the control socket is in the epoll
//! set and `pending` reads it), [`connection_lost`] prints the reason and exits QEMU with
//! status 1: a QEMU whose multiplexer is gone can serve nothing (its ranges are released,
//! and its server's memory is never read again), and the domain is then torn down by the
//! toolstack (libxl notices the device model's death) or by the operator.
//!
//! # Configuration (environment, read at the first interposed call)
//!
//! - `IOREQ_MUX_SOCKET`: the multiplexer's device-model socket. Unset or empty: inert, every
//!   call passes straight through.
//! - `IOREQ_MUX_SERVER`: the server name sent in CREATE (default `qemu`).
//! - `IOREQ_MUX_PRELOAD_LOG`: `info` (default), `debug` or `off`; lines on stderr prefixed
//!   `ioreq-mux-preload:`. The two fatal messages are printed at every level.
//!
//! # Unsafe code
//!
//! Confined to [`ffi`] (the exported C functions: raw pointers from C, function pointers
//! from `dlsym`) and [`sys`] (epoll over raw descriptors, `mmap` at a hint, `dlsym`); each
//! module says why it is needed and why it is sound. The rest of the crate denies it.

mod config;
#[allow(unsafe_code)]
mod ffi;
mod ports;
mod state;
#[allow(unsafe_code)]
mod sys;

use state::State;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};

/// The preload's state. QEMU calls from its main thread, but the lock makes any thread safe.
static STATE: LazyLock<Mutex<State>> = LazyLock::new(|| Mutex::new(State::default()));

/// Set once the connection is found ended, just before the process exits: the calls QEMU's
/// exit handlers make (destroy, unmap, close) then complete locally, without the socket.
static LOST: AtomicBool = AtomicBool::new(false);

fn lost() -> bool {
    LOST.load(Ordering::Acquire)
}

/// Runs `f` with the state locked. Never call the real libraries, [`connection_lost`] or
/// [`cannot_serve`] inside `f`.
fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> T {
    let mut g = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    f(&mut g)
}

/// The connection to the multiplexer ended (a GOODBYE, whose code and text are in
/// `reason`, or the end of the socket): prints why and exits the process with status 1.
///
/// Exiting is the only useful thing left to do. The multiplexer has destroyed the server and
/// released its ranges, and never reads its memory again (docs/dm-protocol.md, 9); a QEMU
/// that went on would wait for requests that never come while the guest's accesses to its
/// devices master-abort. Reconnecting would give a new server with fresh state, which an
/// unmodified QEMU cannot be told to re-register. With the device model gone, libxl (or the
/// operator) tears the domain down, as after a QEMU crash.
///
/// Must be called without the state lock: `exit` runs QEMU's exit handlers, which call the
/// interposed functions; [`LOST`] makes them finish without the socket.
pub(crate) fn connection_lost(reason: &str) -> ! {
    LOST.store(true, Ordering::Release);
    config::emit(&format!(
        "the connection to the multiplexer ended: {reason}. QEMU cannot serve this guest any more; exiting with status 1"
    ));
    std::process::exit(1)
}

/// The multiplexed server cannot be set up (`reason`): prints why and exits with status 1.
///
/// Returning the error to QEMU would be worse: QEMU 7.2 treats a failed
/// `xendevicemodel_create_ioreq_server` as "use the default ioreq server" and carries on
/// with server id 0 and the legacy HVM parameters, a QEMU that runs beside the multiplexer
/// instead of behind it. Must be called without the state lock.
pub(crate) fn cannot_serve(reason: &str) -> ! {
    LOST.store(true, Ordering::Release);
    config::emit(&format!(
        "cannot serve this guest through the multiplexer: {reason}. Not falling back to a Xen ioreq server of QEMU's own (it would run beside the multiplexer); exiting with status 1"
    ));
    std::process::exit(1)
}
