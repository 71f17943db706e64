//! The one place in ioreq-server with `unsafe` code: the memory an ioreq server shares with
//! its device model, and adopting file descriptors the kernel hands us.
//!
//! Why unsafe cannot be avoided here (neither is Xen FFI):
//! - `mmap` of the memfd: no safe wrapper exists (nix's `mmap` and `memmap2`'s constructors
//!   are `unsafe fn` because another process can change or shrink the file);
//! - `OwnedFd::from_raw_fd` for a socket returned by `accept4` and for descriptors received
//!   with SCM_RIGHTS: nix returns these as `RawFd`, and std's safe ancillary-data API is
//!   unstable.
//!
//! What makes the mapping sound to share with another process:
//! - the memfd is sealed (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) before the device
//!   model ever sees it, so nobody can shrink it under the mapping (no SIGBUS); a device
//!   model checks the seals and the size before it maps;
//! - the mapping is only ever reached through atomics ([`SlotWords`], [`BufferedIoPage`],
//!   [`NotifyPage`]), every bit pattern of which is a valid value, so whatever the other process writes is
//!   at worst a protocol violation, never undefined behaviour here;
//! - the mapping lives exactly as long as [`SharedPages`], and every reference into it
//!   borrows the `SharedPages`.
#![allow(unsafe_code)]

use super::notify::NotifyPage;
use super::slots::SlotWords;
use super::sys::errno;
use crate::abi;
use crate::bufioreq::BufferedIoPage;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MemFdCreateFlag, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use std::ffi::c_void;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

/// Size of the shared memory: the buffered page, the ioreq page, the notification page.
pub const SHM_SIZE: usize = 12288;
/// Offset of the buffered page (Xen's resource frame 0).
pub const BUF_OFFSET: usize = 0;
/// Offset of the ioreq page (Xen's resource frame 1).
pub const IOREQ_OFFSET: usize = 4096;
/// Offset of the notification page (protocol version 2; no Xen counterpart).
pub const NOTIFY_OFFSET: usize = 8192;
/// The seals the multiplexer puts on the memfd.
pub const SEALS: SealFlag = SealFlag::F_SEAL_SHRINK
    .union(SealFlag::F_SEAL_GROW)
    .union(SealFlag::F_SEAL_SEAL);

/// The three pages of one ioreq server, mapped shared.
#[derive(Debug)]
pub struct SharedPages {
    base: NonNull<c_void>,
    fd: OwnedFd,
}

// SAFETY: the mapping is process-wide memory reached only through atomics; the raw pointer
// is never handed out, so moving or sharing `SharedPages` between threads is as safe as
// sharing `&[AtomicU64]`.
unsafe impl Send for SharedPages {}
// SAFETY: as above: every access through `&SharedPages` is atomic.
unsafe impl Sync for SharedPages {}

impl SharedPages {
    /// Multiplexer side: a new sealed memfd, zeroed (every slot NONE, empty ring, no flag
    /// set), mapped.
    pub fn create(name: &str) -> io::Result<Self> {
        let cname = std::ffi::CString::new(format!("ioreq-mux:{name}"))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in server name"))?;
        let fd = memfd_create(
            &cname,
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .map_err(errno)?;
        nix::unistd::ftruncate(&fd, SHM_SIZE as i64).map_err(errno)?;
        fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(SEALS)).map_err(errno)?;
        Self::map(fd)
    }

    /// Device-model side: maps the memfd the multiplexer sent, after checking it is sealed
    /// against shrinking and exactly [`SHM_SIZE`] bytes.
    pub fn open(fd: OwnedFd) -> io::Result<Self> {
        let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).map_err(errno)?;
        let seals = SealFlag::from_bits_truncate(seals);
        if !seals.contains(SealFlag::F_SEAL_SHRINK) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "shared memory is not sealed against shrinking",
            ));
        }
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(errno)?;
        if st.st_size != SHM_SIZE as i64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("shared memory is {} bytes, not {SHM_SIZE}", st.st_size),
            ));
        }
        Self::map(fd)
    }

    fn map(fd: OwnedFd) -> io::Result<Self> {
        let len = NonZeroUsize::new(SHM_SIZE).ok_or_else(|| io::Error::other("zero size"))?;
        // SAFETY: a fresh shared mapping of a sealed memfd of SHM_SIZE bytes at an address the
        // kernel picks: it aliases no Rust object. It stays valid until `Drop` unmaps it, and
        // nothing outlives `self` (all references borrow `self`).
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(errno)?;
        Ok(SharedPages { base, fd })
    }

    /// The memfd (to send to the device model).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The buffered ring (page 0).
    pub fn buffered(&self) -> &BufferedIoPage {
        const _: () = assert!(std::mem::size_of::<BufferedIoPage>() <= IOREQ_OFFSET - BUF_OFFSET);
        const _: () = assert!(std::mem::align_of::<BufferedIoPage>() <= 4096);
        // SAFETY: page-aligned (mmap) and in bounds (the asserts above); BufferedIoPage is
        // repr(C) and made only of AtomicU64, for which every bit pattern is valid and all
        // access is through shared references; the reference borrows `self`, which keeps the
        // mapping alive.
        unsafe {
            &*self
                .base
                .as_ptr()
                .cast::<u8>()
                .add(BUF_OFFSET)
                .cast::<BufferedIoPage>()
        }
    }

    /// Slot `v` of the ioreq page (`None` past the page's 128 slots).
    pub fn slot(&self, v: usize) -> Option<&SlotWords> {
        if v >= abi::SHARED_PAGE_SLOTS {
            return None;
        }
        // SAFETY: IOREQ_OFFSET + 32 * v + 32 <= SHM_SIZE for v < 128, 8-byte aligned (page
        // base + multiple of 32); SlotWords is repr(C) of four AtomicU64 (any bit pattern
        // valid); the reference borrows `self`, which keeps the mapping alive.
        Some(unsafe {
            &*self
                .base
                .as_ptr()
                .cast::<u8>()
                .add(IOREQ_OFFSET + abi::IOREQ_SIZE * v)
                .cast::<SlotWords>()
        })
    }
}

impl SharedPages {
    /// The notification page (page 2).
    pub fn notify(&self) -> &NotifyPage {
        const _: () = assert!(std::mem::size_of::<NotifyPage>() <= SHM_SIZE - NOTIFY_OFFSET);
        const _: () = assert!(std::mem::align_of::<NotifyPage>() <= 4096);
        const _: () = assert!(NOTIFY_OFFSET % 4096 == 0);
        // SAFETY: page-aligned (mmap base + a multiple of 4096, the asserts above) and in
        // bounds; NotifyPage is repr(C) and made only of AtomicU64, for which every bit pattern
        // is valid and all access is through shared references; the reference borrows `self`,
        // which keeps the mapping alive.
        unsafe {
            &*self
                .base
                .as_ptr()
                .cast::<u8>()
                .add(NOTIFY_OFFSET)
                .cast::<NotifyPage>()
        }
    }
}

impl Drop for SharedPages {
    fn drop(&mut self) {
        // SAFETY: `base` is the mapping made in `map` with this length; no reference into it
        // can outlive `self`.
        if let Err(e) = unsafe { munmap(self.base, SHM_SIZE) } {
            tracing::warn!(error = %e, "munmap of an ioreq server's shared pages failed");
        }
    }
}

/// Takes ownership of a descriptor the kernel just created for us (from `accept4`, or
/// received with SCM_RIGHTS).
///
/// The caller must pass only a descriptor that nothing else in the process owns: the
/// callers in this module tree pass the return value of `accept4` and the descriptors of a
/// `ControlMessageOwned::ScmRights` they just received, each exactly once.
pub(crate) fn adopt(fd: RawFd) -> OwnedFd {
    // SAFETY: per the contract above: `fd` is open (the kernel just installed it) and has
    // no other owner, so the OwnedFd becomes its only owner and closes it once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ioreq::{Dir, Ioreq};

    #[test]
    fn two_mappings_of_one_memfd_share_slots_and_ring() {
        let a = SharedPages::create("t").unwrap();
        let fd2 = a.fd().try_clone_to_owned().unwrap();
        let b = SharedPages::open(fd2).unwrap();
        let req = Ioreq::pci_config(0x10, 0, Dir::Read, 4, 0);
        assert!(a.slot(3).unwrap().post(&req, 1));
        let t = b.slot(3).unwrap().take().unwrap();
        assert_eq!(t.req.unwrap().addr, req.addr);
        assert!(b.slot(3).unwrap().complete(1, Some(0x1234)));
        assert_eq!(
            a.slot(3).unwrap().collect(1),
            super::super::slots::Collect::Done(0x1234)
        );
        assert!(a.slot(128).is_none());
        a.notify().set_dm_polling();
        a.notify().notice_sent();
        assert!(b.notify().dm_is_polling());
        assert_eq!(b.notify().notices(), 1);
        let w = Ioreq::new(crate::IoreqType::Copy, Dir::Write, 0xa0000, 4, 5);
        a.buffered()
            .push(&w, crate::bufioreq::BufioreqMode::Atomic)
            .unwrap();
        let mut got = vec![];
        b.buffered().drain(|r| got.push(r.data)).unwrap();
        assert_eq!(got, vec![5]);
    }

    #[test]
    fn seals_hold_and_unsealed_memory_is_refused() {
        let a = SharedPages::create("t").unwrap();
        assert!(
            nix::unistd::ftruncate(a.fd(), 4096).is_err(),
            "cannot shrink"
        );
        assert!(
            nix::unistd::ftruncate(a.fd(), 16384).is_err(),
            "cannot grow"
        );
        let plain = memfd_create(c"plain", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&plain, SHM_SIZE as i64).unwrap();
        assert!(SharedPages::open(plain).is_err());
        let small = memfd_create(c"small", MemFdCreateFlag::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&small, 4096).unwrap();
        fcntl(small.as_raw_fd(), FcntlArg::F_ADD_SEALS(SEALS)).unwrap();
        assert!(SharedPages::open(small).is_err());
    }
}
