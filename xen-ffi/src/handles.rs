//! Safe RAII handles over the three Xen tools libraries.
//!
//! The same API exists with and without the `bindgen` feature; without it
//! [`Libraries::load`] returns [`XenError::NotBuilt`], and since every handle needs an
//! `Arc<Libraries>`, no handle can be made.

use crate::abi::{
    XEN_PAGE_SIZE, XENMEM_RESOURCE_IOREQ_SERVER, XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ,
    xenmem_resource_ioreq_server_frame_ioreq,
};
use crate::backend;
use crate::error::XenError;
use crate::pages::{BufferedPageView, IoreqPage};
use std::cell::Cell;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

/// Soname of libxendevicemodel (Debian package `libxendevicemodel1`).
pub const SONAME_DEVICEMODEL: &str = "libxendevicemodel.so.1";
/// Soname of libxenforeignmemory (Debian package `libxenforeignmemory1`).
pub const SONAME_FOREIGNMEMORY: &str = "libxenforeignmemory.so.1";
/// Soname of libxenevtchn (Debian package `libxenevtchn1`).
pub const SONAME_EVTCHN: &str = "libxenevtchn.so.1";

/// The privcmd device every handle ultimately talks through.
pub const PRIVCMD_PATH: &str = "/dev/xen/privcmd";

/// Marker making a type `Send` but not `Sync` in both feature settings.
type NotSync = PhantomData<Cell<()>>;

/// Returns [`XenError::NoPrivcmd`] if [`PRIVCMD_PATH`] does not exist. Every handle
/// constructor calls this first. (If its existence cannot be determined, e.g. no permission
/// on `/dev/xen`, the open is attempted and reports the library's own error.)
pub fn check_privcmd() -> Result<(), XenError> {
    match Path::new(PRIVCMD_PATH).try_exists() {
        Ok(false) => Err(XenError::NoPrivcmd),
        Ok(true) | Err(_) => Ok(()),
    }
}

/// The three Xen tools libraries, loaded at run time by their versioned sonames.
///
/// Handles keep an `Arc<Libraries>`, so the libraries stay loaded as long as any handle
/// (and so any function pointer into them) lives.
pub struct Libraries {
    pub(crate) inner: backend::Libs,
}

impl std::fmt::Debug for Libraries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Libraries")
            .field(
                "sonames",
                &[SONAME_DEVICEMODEL, SONAME_FOREIGNMEMORY, SONAME_EVTCHN],
            )
            .finish()
    }
}

impl Libraries {
    /// Loads `libxendevicemodel.so.1`, `libxenforeignmemory.so.1` and `libxenevtchn.so.1`.
    ///
    /// A missing library gives [`XenError::LibraryLoad`] naming its soname. Loading does not
    /// need Xen to be running; opening a handle does. Without the `bindgen` feature this
    /// returns [`XenError::NotBuilt`].
    pub fn load() -> Result<Arc<Self>, XenError> {
        let inner = backend::load([SONAME_DEVICEMODEL, SONAME_FOREIGNMEMORY, SONAME_EVTCHN])?;
        tracing::debug!("loaded the Xen tools libraries");
        Ok(Arc::new(Libraries { inner }))
    }
}

/// An open libxendevicemodel handle (`xendevicemodel_open`), closed on drop.
pub struct DeviceModelHandle {
    libs: Arc<Libraries>,
    raw: backend::DmRaw,
    _not_sync: NotSync,
}

impl std::fmt::Debug for DeviceModelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceModelHandle").finish_non_exhaustive()
    }
}

impl DeviceModelHandle {
    /// Opens a handle. Fails with [`XenError::NoPrivcmd`] outside a dom0.
    pub fn open(libs: &Arc<Libraries>) -> Result<Self, XenError> {
        check_privcmd()?;
        Self::open_unchecked(libs)
    }

    pub(crate) fn open_unchecked(libs: &Arc<Libraries>) -> Result<Self, XenError> {
        let raw = backend::dm_open(&libs.inner)?;
        Ok(DeviceModelHandle {
            libs: Arc::clone(libs),
            raw,
            _not_sync: PhantomData,
        })
    }

    /// Number of vCPUs of `domid` (`xendevicemodel_nr_vcpus`).
    pub fn nr_vcpus(&self, domid: u16) -> Result<u32, XenError> {
        backend::dm_nr_vcpus(&self.libs.inner, &self.raw, domid)
    }

    /// Creates an ioreq server for `domid` (`xendevicemodel_create_ioreq_server`) and returns
    /// its id. `handle_bufioreq` is one of `HVM_IOREQSRV_BUFIOREQ_*` (0 off, 1 legacy,
    /// 2 atomic). The server starts disabled.
    pub fn create_ioreq_server(&self, domid: u16, handle_bufioreq: u8) -> Result<u16, XenError> {
        backend::dm_create_ioreq_server(&self.libs.inner, &self.raw, domid, handle_bufioreq)
    }

    /// The buffered-ioreq event channel port of server `id`
    /// (`xendevicemodel_get_ioreq_server_info` with NULL gfn pointers, so Xen is asked not to
    /// map the legacy gfns: the pages are mapped as a resource instead). `None` when the
    /// server has no buffered ring (Xen reports port 0, which is never a valid port).
    pub fn get_ioreq_server_info(&self, domid: u16, id: u16) -> Result<Option<u32>, XenError> {
        let port = backend::dm_get_ioreq_server_info(&self.libs.inner, &self.raw, domid, id)?;
        Ok((port != 0).then_some(port))
    }

    /// Routes the range `start..=end` (inclusive) of port I/O (`is_mmio` false) or MMIO
    /// (`is_mmio` true) to server `id` (`xendevicemodel_map_io_range_to_ioreq_server`).
    pub fn map_io_range(
        &self,
        domid: u16,
        id: u16,
        is_mmio: bool,
        start: u64,
        end: u64,
    ) -> Result<(), XenError> {
        backend::dm_io_range(
            &self.libs.inner,
            &self.raw,
            domid,
            id,
            is_mmio,
            (start, end),
            true,
        )
    }

    /// Undoes [`map_io_range`](Self::map_io_range) for the same range
    /// (`xendevicemodel_unmap_io_range_from_ioreq_server`).
    pub fn unmap_io_range(
        &self,
        domid: u16,
        id: u16,
        is_mmio: bool,
        start: u64,
        end: u64,
    ) -> Result<(), XenError> {
        backend::dm_io_range(
            &self.libs.inner,
            &self.raw,
            domid,
            id,
            is_mmio,
            (start, end),
            false,
        )
    }

    /// Routes config-space accesses of PCI device `seg:bus:dev.func` to server `id`
    /// (`xendevicemodel_map_pcidev_to_ioreq_server`). `dev` < 32, `func` < 8, else EINVAL.
    pub fn map_pcidev(
        &self,
        domid: u16,
        id: u16,
        seg: u16,
        bus: u8,
        dev: u8,
        func: u8,
    ) -> Result<(), XenError> {
        backend::dm_pcidev(
            &self.libs.inner,
            &self.raw,
            domid,
            id,
            (seg, bus, dev, func),
            true,
        )
    }

    /// Undoes [`map_pcidev`](Self::map_pcidev)
    /// (`xendevicemodel_unmap_pcidev_from_ioreq_server`).
    pub fn unmap_pcidev(
        &self,
        domid: u16,
        id: u16,
        seg: u16,
        bus: u8,
        dev: u8,
        func: u8,
    ) -> Result<(), XenError> {
        backend::dm_pcidev(
            &self.libs.inner,
            &self.raw,
            domid,
            id,
            (seg, bus, dev, func),
            false,
        )
    }

    /// Enables or disables server `id` (`xendevicemodel_set_ioreq_server_state`). Xen sends
    /// a server no requests until it is enabled.
    pub fn set_ioreq_server_state(
        &self,
        domid: u16,
        id: u16,
        enabled: bool,
    ) -> Result<(), XenError> {
        backend::dm_set_ioreq_server_state(&self.libs.inner, &self.raw, domid, id, enabled)
    }

    /// Destroys server `id` (`xendevicemodel_destroy_ioreq_server`).
    pub fn destroy_ioreq_server(&self, domid: u16, id: u16) -> Result<(), XenError> {
        backend::dm_destroy_ioreq_server(&self.libs.inner, &self.raw, domid, id)
    }

    /// Sends `domid` a message-signalled interrupt: a write of `msi_data` to `msi_addr`
    /// (`0xfeexxxxx` on x86) (`xendevicemodel_inject_msi`, `XEN_DMOP_inject_msi` 14 in
    /// xen/include/public/hvm/dm_op.h). It concerns the domain, not an ioreq server: any
    /// device model of the domain may send it.
    pub fn inject_msi(&self, domid: u16, msi_addr: u64, msi_data: u32) -> Result<(), XenError> {
        backend::dm_inject_msi(&self.libs.inner, &self.raw, domid, msi_addr, msi_data)
    }
}

impl Drop for DeviceModelHandle {
    fn drop(&mut self) {
        if let Err(e) = backend::dm_close(&self.libs.inner, &self.raw) {
            tracing::warn!("closing the devicemodel handle: {e}");
        }
    }
}

/// The open libxenforeignmemory handle shared by a [`ForeignMemoryHandle`] and its mappings.
struct FmemInner {
    libs: Arc<Libraries>,
    raw: backend::FmRaw,
}

impl Drop for FmemInner {
    fn drop(&mut self) {
        if let Err(e) = backend::fm_close(&self.libs.inner, &self.raw) {
            tracing::warn!("closing the foreignmemory handle: {e}");
        }
    }
}

/// An open libxenforeignmemory handle (`xenforeignmemory_open`), closed when it and every
/// [`ResourceMapping`] made from it are dropped.
pub struct ForeignMemoryHandle {
    inner: Arc<FmemInner>,
}

impl std::fmt::Debug for ForeignMemoryHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignMemoryHandle")
            .finish_non_exhaustive()
    }
}

impl ForeignMemoryHandle {
    /// Opens a handle. Fails with [`XenError::NoPrivcmd`] outside a dom0.
    pub fn open(libs: &Arc<Libraries>) -> Result<Self, XenError> {
        check_privcmd()?;
        Self::open_unchecked(libs)
    }

    pub(crate) fn open_unchecked(libs: &Arc<Libraries>) -> Result<Self, XenError> {
        let raw = backend::fm_open(&libs.inner)?;
        Ok(ForeignMemoryHandle {
            inner: Arc::new(FmemInner {
                libs: Arc::clone(libs),
                raw,
            }),
        })
    }

    /// Maps ioreq server `id`'s pages of `domid` (`xenforeignmemory_map_resource` of
    /// `XENMEM_resource_ioreq_server`, read-write, shared).
    ///
    /// With `buffered`, maps frames 0 and 1: the buffered page
    /// (`XENMEM_resource_ioreq_server_frame_bufioreq`) then the synchronous ioreq page
    /// (`XENMEM_resource_ioreq_server_frame_ioreq(0)`). Without, maps only frame 1. A server
    /// created with `HVM_IOREQSRV_BUFIOREQ_OFF` has no frame 0, so pass `buffered = false`.
    pub fn map_ioreq_server_pages(
        &self,
        domid: u16,
        id: u16,
        buffered: bool,
    ) -> Result<ResourceMapping, XenError> {
        let (frame, nr_frames) = if buffered {
            (XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ, 2)
        } else {
            (xenmem_resource_ioreq_server_frame_ioreq(0), 1)
        };
        let (res, addr) = backend::fm_map_resource(
            &self.inner.libs.inner,
            &self.inner.raw,
            domid,
            XENMEM_RESOURCE_IOREQ_SERVER,
            id.into(),
            frame,
            nr_frames,
        )?;
        tracing::debug!(domid, id, buffered, "mapped the ioreq server pages");
        Ok(ResourceMapping {
            fmem: Arc::clone(&self.inner),
            res,
            addr,
            buffered,
            _not_sync: PhantomData,
        })
    }
}

/// The mapped pages of one ioreq server; unmapped on drop
/// (`xenforeignmemory_unmap_resource`).
///
/// The views borrow the mapping mutably, so at most one view of each page exists at a time
/// (use [`pages`](Self::pages) to get both at once).
pub struct ResourceMapping {
    fmem: Arc<FmemInner>,
    res: backend::ResRaw,
    addr: backend::MapAddr,
    buffered: bool,
    _not_sync: NotSync,
}

impl std::fmt::Debug for ResourceMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceMapping")
            .field("addr", &self.as_ptr())
            .field("buffered", &self.buffered)
            .finish_non_exhaustive()
    }
}

impl ResourceMapping {
    /// Start of the mapping (the buffered page if [`has_buffered`](Self::has_buffered), else
    /// the ioreq page).
    pub fn as_ptr(&self) -> *const u8 {
        backend::map_addr(&self.addr).as_ptr()
    }

    /// Whether the buffered page (frame 0) is mapped.
    pub fn has_buffered(&self) -> bool {
        self.buffered
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        if self.buffered {
            2 * XEN_PAGE_SIZE
        } else {
            XEN_PAGE_SIZE
        }
    }

    /// Always false: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Both views at once: the synchronous page and, if mapped, the buffered page.
    pub fn pages(&mut self) -> (IoreqPage<'_>, Option<BufferedPageView<'_>>) {
        let base = backend::map_addr(&self.addr);
        let ioreq_offset = if self.buffered { XEN_PAGE_SIZE } else { 0 };
        // SAFETY: the mapping is `len()` bytes, page aligned, readable and writable, and stays
        // mapped while `self` is borrowed; the offset is 0 or 4096 < len().
        let ioreq_base = unsafe { base.add(ioreq_offset) };
        // SAFETY: `ioreq_base` is one whole page inside the mapping; `&mut self` is held for
        // the view's lifetime, so nothing else in this process reaches the page meanwhile.
        let ioreq = unsafe { IoreqPage::from_raw(ioreq_base) };
        let buffered = self.buffered.then(|| {
            // SAFETY: frame 0 is the first page of the mapping, disjoint from the ioreq page,
            // and exclusively borrowed as above.
            unsafe { BufferedPageView::from_raw(base) }
        });
        (ioreq, buffered)
    }

    /// The synchronous ioreq page (frame 1).
    pub fn ioreq_page(&mut self) -> IoreqPage<'_> {
        self.pages().0
    }

    /// The buffered page (frame 0), if it was mapped.
    pub fn buffered_page(&mut self) -> Option<BufferedPageView<'_>> {
        self.pages().1
    }
}

impl Drop for ResourceMapping {
    fn drop(&mut self) {
        if let Err(e) = backend::fm_unmap_resource(&self.fmem.libs.inner, &self.fmem.raw, &self.res)
        {
            tracing::warn!("unmapping the ioreq server pages: {e}");
        }
    }
}

/// An open libxenevtchn handle (`xenevtchn_open`), closed on drop; closing also unbinds every
/// port bound through it.
///
/// Wait for events by polling [`fd`](Self::fd) for readability, then call
/// [`pending`](Self::pending) (the header warns that a non-blocking fd is not reliable).
pub struct EventChannelHandle {
    libs: Arc<Libraries>,
    raw: backend::EvRaw,
    fd: RawFd,
    _not_sync: NotSync,
}

impl std::fmt::Debug for EventChannelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventChannelHandle")
            .field("fd", &self.fd)
            .finish_non_exhaustive()
    }
}

impl EventChannelHandle {
    /// Opens a handle. Fails with [`XenError::NoPrivcmd`] outside a dom0.
    pub fn open(libs: &Arc<Libraries>) -> Result<Self, XenError> {
        check_privcmd()?;
        Self::open_unchecked(libs)
    }

    pub(crate) fn open_unchecked(libs: &Arc<Libraries>) -> Result<Self, XenError> {
        let raw = backend::ev_open(&libs.inner)?;
        let fd = backend::ev_fd(&libs.inner, &raw);
        let mut handle = EventChannelHandle {
            libs: Arc::clone(libs),
            raw,
            fd: -1,
            _not_sync: PhantomData,
        };
        // On error `handle` is dropped by the `?`, which closes it.
        handle.fd = fd?;
        Ok(handle)
    }

    /// Binds a local port to `remote_port` of `domid` (`xenevtchn_bind_interdomain`) and
    /// returns the local port.
    pub fn bind_interdomain(&self, domid: u16, remote_port: u32) -> Result<u32, XenError> {
        backend::ev_bind_interdomain(&self.libs.inner, &self.raw, domid, remote_port)
    }

    /// Unbinds a local port (`xenevtchn_unbind`).
    pub fn unbind(&self, port: u32) -> Result<(), XenError> {
        backend::ev_unbind(&self.libs.inner, &self.raw, port)
    }

    /// Signals a local port's remote end (`xenevtchn_notify`).
    pub fn notify(&self, port: u32) -> Result<(), XenError> {
        backend::ev_notify(&self.libs.inner, &self.raw, port)
    }

    /// The next pending port (`xenevtchn_pending`), which stays masked until
    /// [`unmask`](Self::unmask). `None` if the call would block (EAGAIN) or was interrupted
    /// (EINTR). Blocks if nothing is pending and the fd is blocking: poll [`fd`](Self::fd)
    /// first.
    pub fn pending(&self) -> Result<Option<u32>, XenError> {
        match backend::ev_pending(&self.libs.inner, &self.raw) {
            Ok(port) => Ok(Some(port)),
            Err(XenError::Call { errno, .. })
                if errno == libc::EAGAIN || errno == libc::EWOULDBLOCK || errno == libc::EINTR =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Unmasks a port so it can be delivered again (`xenevtchn_unmask`).
    pub fn unmask(&self, port: u32) -> Result<(), XenError> {
        backend::ev_unmask(&self.libs.inner, &self.raw, port)
    }

    /// The file descriptor to poll for readability (`xenevtchn_fd`). Owned by the handle:
    /// valid until it is dropped; do not close it.
    pub fn fd(&self) -> RawFd {
        self.fd
    }
}

impl AsRawFd for EventChannelHandle {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

impl AsFd for EventChannelHandle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: `fd` is the library's open descriptor, which stays open until this handle
        // is dropped, and the borrow cannot outlive `&self`. (`open_unchecked` only builds a
        // returned handle after `xenevtchn_fd` succeeded, so it is never -1 here.)
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

impl Drop for EventChannelHandle {
    fn drop(&mut self) {
        if let Err(e) = backend::ev_close(&self.libs.inner, &self.raw) {
            tracing::warn!("closing the event channel handle: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_traits() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Libraries>();
        send_sync::<Arc<Libraries>>();
        send::<DeviceModelHandle>();
        send_sync::<ForeignMemoryHandle>();
        send::<ResourceMapping>();
        send::<EventChannelHandle>();
    }

    #[test]
    fn privcmd_check_matches_the_filesystem() {
        let present = Path::new(PRIVCMD_PATH).exists();
        assert_eq!(check_privcmd().is_ok(), present);
    }

    #[cfg(not(feature = "bindgen"))]
    #[test]
    fn without_bindgen_everything_is_not_built() {
        assert_eq!(Libraries::load().map(|_| ()), Err(XenError::NotBuilt));
    }

    /// On a host with the libraries (this crate's CI and dev machines have libxen-dev) the
    /// load succeeds; elsewhere the error names the first missing soname. Either way, no
    /// panic.
    #[cfg(feature = "bindgen")]
    #[test]
    fn load_succeeds_or_names_the_soname() {
        match Libraries::load() {
            Ok(libs) => assert!(format!("{libs:?}").contains(SONAME_EVTCHN)),
            Err(XenError::LibraryLoad { soname, reason }) => {
                assert!(soname.starts_with("libxen"), "{soname}: {reason}");
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[cfg(feature = "bindgen")]
    #[test]
    fn missing_library_is_a_clear_error() {
        let err = backend::load([
            "libxendevicemodel.so.999",
            SONAME_FOREIGNMEMORY,
            SONAME_EVTCHN,
        ])
        .err()
        .expect("a nonexistent soname must not load");
        let msg = err.to_string();
        assert!(
            msg.starts_with("cannot load libxendevicemodel.so.999: "),
            "{msg}"
        );
        assert!(msg.contains("install libxendevicemodel1"), "{msg}");
    }

    /// Without a hypervisor, opening a handle is refused before touching the library; and if
    /// the library is called anyway, its failure comes back as an errno, not a crash.
    #[cfg(feature = "bindgen")]
    #[test]
    fn opening_without_xen_fails_cleanly() {
        let Ok(libs) = Libraries::load() else {
            return; // No Xen libraries on this host: covered by the test above.
        };
        if Path::new(PRIVCMD_PATH).exists() {
            return; // A real dom0: nothing to check here.
        }
        assert_eq!(
            DeviceModelHandle::open(&libs).err(),
            Some(XenError::NoPrivcmd)
        );
        assert_eq!(
            ForeignMemoryHandle::open(&libs).err(),
            Some(XenError::NoPrivcmd)
        );
        assert_eq!(
            EventChannelHandle::open(&libs).err(),
            Some(XenError::NoPrivcmd)
        );

        let e = DeviceModelHandle::open_unchecked(&libs).expect_err("no privcmd");
        assert!(
            matches!(e, XenError::Call { func: "xendevicemodel_open", errno } if errno != 0),
            "{e:?}"
        );
        let e = ForeignMemoryHandle::open_unchecked(&libs).expect_err("no privcmd");
        assert!(
            matches!(
                e,
                XenError::Call {
                    func: "xenforeignmemory_open",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = EventChannelHandle::open_unchecked(&libs).expect_err("no evtchn");
        assert!(
            matches!(e, XenError::Call { func: "xenevtchn_open", errno } if errno == libc::ENOENT),
            "{e:?}"
        );
    }
}
