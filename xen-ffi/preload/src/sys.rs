//! The preload's system calls on descriptors and addresses it does not own as Rust objects:
//! epoll sets over raw descriptors, mapping the shared memory where the caller asks,
//! and looking up the real Xen functions.
//!
//! Why `unsafe` is needed here:
//! - the real Xen handle's descriptor comes from `xenevtchn_fd` as a bare `int` owned by
//!   libxenevtchn: it can only be put in an epoll set through the raw `epoll_ctl`
//!   (`BorrowedFd::borrow_raw` would be just as unsafe, and would lie about its lifetime);
//! - `mmap` at a caller's hint address, and `munmap` of what we mapped for the caller, have
//!   no safe form;
//! - `dlsym(RTLD_NEXT, ...)` returns an untyped pointer.
//!
//! Why it is sound:
//! - epoll calls pass only a valid `epoll_event` or a buffer with its true length; a
//!   descriptor that is not open makes the kernel fail the call, nothing else;
//! - [`map_shared`] creates a new `MAP_SHARED` mapping of the memfd; it aliases no Rust
//!   object unless the C caller passes `MAP_FIXED` over memory it does not own, which is the
//!   caller's contract with the real library too (it passes the flags to `mmap` the same
//!   way). The memory is only reached by the caller, and by the preload's own separate
//!   mapping through atomics (`ioreq_server::oop::shm`);
//! - [`unmap`] is only called on an (address, length) pair [`map_shared`] returned and that
//!   is still registered (the registry forgets it at once);
//! - [`RealFn::get`] only returns the address; the caller turns it into a function pointer
//!   of the C declaration's type (see `ffi`).

use std::ffi::{CStr, c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

/// An epoll set (level-triggered), reporting the token each descriptor was added with.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: no pointers; a non-negative result is a new descriptor nobody else owns.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created by the kernel for us and has no other owner.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The set's descriptor (what `xenevtchn_fd` hands out; readable while any member is).
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Adds `fd` (reported readable with `token`).
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event living across the call; a bad `fd` only makes
        // the call fail.
        let r = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes `fd`.
    pub fn del(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `add` (the event is ignored for EPOLL_CTL_DEL but must be valid for
        // old kernels).
        let r = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The tokens of the members readable (or hung up) now, without waiting.
    pub fn ready(&self) -> io::Result<Vec<u64>> {
        const MAX: usize = 512;
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; MAX];
        // SAFETY: `evs` holds MAX events and MAX is what the kernel is told.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), evs.as_mut_ptr(), MAX as c_int, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(vec![]);
            }
            return Err(e);
        }
        Ok(evs.iter().take(n as usize).map(|e| e.u64).collect())
    }
}

/// Maps `len` bytes of `fd` from `offset`, `MAP_SHARED`, at `hint` (a hint unless `flags`
/// has `MAP_FIXED`), as `xenforeignmemory_map_resource` does with `*paddr`, `prot` and
/// `flags`. Returns the address or the errno.
pub fn map_shared(
    hint: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: RawFd,
    offset: i64,
) -> Result<*mut c_void, i32> {
    // SAFETY: a new shared mapping of the server's sealed memfd (see the module doc: without
    // MAP_FIXED the kernel picks a free range; MAP_FIXED is the C caller's own request).
    let p = unsafe { libc::mmap(hint, len, prot, flags | libc::MAP_SHARED, fd, offset) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    Ok(p)
}

/// Unmaps what [`map_shared`] returned.
pub fn unmap(addr: usize, len: usize) -> Result<(), i32> {
    // SAFETY: (addr, len) is a mapping `map_shared` made and the registry just forgot, so no
    // other unmap of it follows; only the C caller, which asked for the unmap, uses it.
    let r = unsafe { libc::munmap(addr as *mut c_void, len) };
    if r < 0 {
        return Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    Ok(())
}

/// A function of the real Xen libraries, found once with `dlsym(RTLD_NEXT, name)`: the next
/// definition after this library's in the lookup order (the versioned default in
/// libxendevicemodel, libxenforeignmemory or libxenevtchn).
#[derive(Debug)]
pub struct RealFn {
    name: &'static CStr,
    addr: OnceLock<usize>,
}

impl RealFn {
    pub const fn new(name: &'static CStr) -> Self {
        RealFn {
            name,
            addr: OnceLock::new(),
        }
    }

    pub fn name(&self) -> &'static CStr {
        self.name
    }

    /// Its address, or `None` if no later object defines it.
    pub fn get(&self) -> Option<*mut c_void> {
        let a = *self.addr.get_or_init(|| {
            // SAFETY: `name` is NUL-terminated and static; RTLD_NEXT is resolved relative to
            // this library, which is what makes it find the real definition.
            unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) as usize }
        });
        (a != 0).then_some(a as *mut c_void)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ioreq_server::oop::sys::Doorbell;
    use std::os::fd::AsFd;

    #[test]
    fn epoll_reports_readable_members_by_token_until_cleared() {
        let ep = Epoll::new().unwrap();
        let a = Doorbell::new().unwrap();
        let b = Doorbell::new().unwrap();
        ep.add(a.as_fd().as_raw_fd(), 7).unwrap();
        ep.add(b.as_fd().as_raw_fd(), 9).unwrap();
        assert!(ep.ready().unwrap().is_empty());
        a.ring().unwrap();
        b.ring().unwrap();
        let mut r = ep.ready().unwrap();
        r.sort();
        assert_eq!(r, vec![7, 9]);
        // Level-triggered: still there until read.
        assert_eq!(ep.ready().unwrap().len(), 2);
        a.clear().unwrap();
        assert_eq!(ep.ready().unwrap(), vec![9]);
        ep.del(b.as_fd().as_raw_fd()).unwrap();
        assert!(ep.ready().unwrap().is_empty());
        assert!(ep.add(-1, 1).is_err());
    }

    #[test]
    fn dlsym_next_finds_libc_functions_and_not_made_up_ones() {
        assert!(RealFn::new(c"getpid").get().is_some());
        assert!(RealFn::new(c"no_such_function_anywhere").get().is_none());
    }
}
