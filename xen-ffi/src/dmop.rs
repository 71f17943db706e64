//! One DMOP that libxendevicemodel does not expose: mapping (or unmapping) an inclusive
//! range of PCI functions to an ioreq server in one hypercall.
//!
//! `xendevicemodel_map_pcidev_to_ioreq_server` sends a single SBDF, and
//! `xendevicemodel_map_io_range_to_ioreq_server` only knows ports and MMIO, but the DMOP
//! itself (`XEN_DMOP_map_io_range_to_ioreq_server` with `type = XEN_DMOP_IO_RANGE_PCI`,
//! public/hvm/dm_op.h) takes an inclusive SBDF range, which Xen adds to the server's PCI
//! range set as one entry. Claiming a whole segment is then one call instead of 65536.
//!
//! The call goes through Linux's privcmd driver exactly as libxendevicemodel's does
//! (`IOCTL_PRIVCMD_DM_OP`, xen/sys/privcmd.h), on a privcmd file descriptor of its own.

use crate::error::XenError;
use crate::handles::{PRIVCMD_PATH, check_privcmd};
use std::fs::File;
use std::os::fd::AsRawFd;

/// `XEN_DMOP_map_io_range_to_ioreq_server` (public/hvm/dm_op.h).
pub const XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER: u32 = 3;
/// `XEN_DMOP_unmap_io_range_from_ioreq_server`.
pub const XEN_DMOP_UNMAP_IO_RANGE_FROM_IOREQ_SERVER: u32 = 4;
/// `XEN_DMOP_IO_RANGE_PCI`: the range is over `XEN_DMOP_PCI_SBDF(s, b, d, f)` values.
pub const XEN_DMOP_IO_RANGE_PCI: u32 = 2;

/// `struct xen_dm_op_ioreq_server_range`: id, pad, type, inclusive start and end.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct IoreqServerRange {
    id: u16,
    pad: u16,
    ty: u32,
    start: u64,
    end: u64,
}

/// `struct xen_dm_op` with its union reduced to the range member, which is also the union's
/// size (24 bytes; the layout test compares with the bindgen type).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct DmOp {
    op: u32,
    pad: u32,
    range: IoreqServerRange,
}

/// `privcmd_dm_op_buf_t` (xen/sys/privcmd.h).
#[repr(C)]
struct PrivcmdDmOpBuf {
    uptr: *mut core::ffi::c_void,
    size: usize,
}

/// `privcmd_dm_op_t`.
#[repr(C)]
struct PrivcmdDmOp {
    dom: u16,
    num: u16,
    ubufs: *const PrivcmdDmOpBuf,
}

/// `IOCTL_PRIVCMD_DM_OP` = `_IOC(_IOC_NONE, 'P', 5, sizeof(privcmd_dm_op_t))`: direction
/// bits 0, size in bits 29:16, type 'P' in 15:8, number 5.
const IOCTL_PRIVCMD_DM_OP: u64 =
    ((size_of::<PrivcmdDmOp>() as u64) << 16) | ((b'P' as u64) << 8) | 5;

/// A privcmd file descriptor for the PCI-range DMOP.
#[derive(Debug)]
pub struct PciRangeDmOp {
    privcmd: File,
}

impl PciRangeDmOp {
    /// Opens `/dev/xen/privcmd` ([`XenError::NoPrivcmd`] outside a dom0).
    pub fn open() -> Result<Self, XenError> {
        check_privcmd()?;
        let privcmd = File::options()
            .read(true)
            .write(true)
            .open(PRIVCMD_PATH)
            .map_err(|e| XenError::Call {
                func: "open(/dev/xen/privcmd)",
                errno: e.raw_os_error().unwrap_or(libc::EIO),
            })?;
        Ok(PciRangeDmOp { privcmd })
    }

    /// Routes configuration accesses of every function `start..=end` (packed SBDFs) of
    /// `domid` to ioreq server `id`. Xen refuses a range overlapping one the server has
    /// (EEXIST) and counts it as one of the server's 256 PCI ranges.
    pub fn map(&self, domid: u16, id: u16, start: u32, end: u32) -> Result<(), XenError> {
        self.call(domid, id, start, end, XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER)
    }

    /// Undoes [`map`](Self::map); the range must lie inside one the server has (ENOENT).
    pub fn unmap(&self, domid: u16, id: u16, start: u32, end: u32) -> Result<(), XenError> {
        self.call(
            domid,
            id,
            start,
            end,
            XEN_DMOP_UNMAP_IO_RANGE_FROM_IOREQ_SERVER,
        )
    }

    fn call(&self, domid: u16, id: u16, start: u32, end: u32, op: u32) -> Result<(), XenError> {
        let func = if op == XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER {
            "XEN_DMOP_map_io_range_to_ioreq_server(PCI)"
        } else {
            "XEN_DMOP_unmap_io_range_from_ioreq_server(PCI)"
        };
        let mut dmop = DmOp {
            op,
            pad: 0,
            range: IoreqServerRange {
                id,
                pad: 0,
                ty: XEN_DMOP_IO_RANGE_PCI,
                start: start.into(),
                end: end.into(),
            },
        };
        let buf = PrivcmdDmOpBuf {
            uptr: (&raw mut dmop).cast(),
            size: size_of::<DmOp>(),
        };
        let arg = PrivcmdDmOp {
            dom: domid,
            num: 1,
            ubufs: &raw const buf,
        };
        // SAFETY: `privcmd` is an open privcmd fd; `arg` and the buffer it points to (`buf`,
        // then `dmop`) are live, properly laid out (see the layout test) and valid for
        // reads and writes for the duration of the call, which is all the kernel accesses
        // them for (it pins the buffer, makes the hypercall and unpins it).
        let rc = unsafe {
            libc::ioctl(
                self.privcmd.as_raw_fd(),
                IOCTL_PRIVCMD_DM_OP as libc::c_ulong,
                &raw const arg,
            )
        };
        if rc < 0 {
            return Err(XenError::Call {
                func,
                errno: std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn layout_and_ioctl_number() {
        assert_eq!(size_of::<IoreqServerRange>(), 24);
        assert_eq!(size_of::<DmOp>(), 32);
        assert_eq!(offset_of!(DmOp, range), 8);
        assert_eq!(size_of::<PrivcmdDmOp>(), 16);
        assert_eq!(size_of::<PrivcmdDmOpBuf>(), 16);
        // _IOC(_IOC_NONE, 'P', 5, 16)
        assert_eq!(IOCTL_PRIVCMD_DM_OP, 0x0010_5005);
    }

    #[test]
    fn without_xen_it_is_no_privcmd() {
        if !std::path::Path::new(PRIVCMD_PATH).exists() {
            assert_eq!(PciRangeDmOp::open().err(), Some(XenError::NoPrivcmd));
        }
    }

    /// Against the bindgen types of Xen 4.17's dm_op.h.
    #[cfg(feature = "bindgen")]
    #[test]
    fn matches_the_xen_headers() {
        use crate::sys::types as t;
        assert_eq!(size_of::<DmOp>(), size_of::<t::xen_dm_op>());
        assert_eq!(offset_of!(DmOp, range), offset_of!(t::xen_dm_op, u));
        assert_eq!(
            size_of::<IoreqServerRange>(),
            size_of::<t::xen_dm_op_ioreq_server_range>()
        );
        assert_eq!(
            offset_of!(IoreqServerRange, ty),
            offset_of!(t::xen_dm_op_ioreq_server_range, type_)
        );
        assert_eq!(
            offset_of!(IoreqServerRange, start),
            offset_of!(t::xen_dm_op_ioreq_server_range, start)
        );
        assert_eq!(
            offset_of!(IoreqServerRange, end),
            offset_of!(t::xen_dm_op_ioreq_server_range, end)
        );
        assert_eq!(
            XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER,
            t::XEN_DMOP_map_io_range_to_ioreq_server
        );
        assert_eq!(
            XEN_DMOP_UNMAP_IO_RANGE_FROM_IOREQ_SERVER,
            t::XEN_DMOP_unmap_io_range_from_ioreq_server
        );
        assert_eq!(XEN_DMOP_IO_RANGE_PCI, t::XEN_DMOP_IO_RANGE_PCI);
    }
}
