//! Safe views of an ioreq server's shared pages.
//!
//! Both pages are memory that Xen (on behalf of the guest's vCPUs) reads and writes while we
//! do, so no Rust reference to their bytes is ever created. Every access is a raw-pointer
//! access of one of two kinds:
//!
//! - **volatile** for the plain fields of an `ioreq_t` slot and of a `buf_ioreq_t` slot: the
//!   compiler must neither elide, merge nor invent these accesses, because the other side
//!   changes the memory behind its back;
//! - **atomic** for the buffered ring's `read_pointer`/`write_pointer`, which Xen updates with
//!   locked instructions (and, in `HVM_IOREQSRV_BUFIOREQ_ATOMIC` mode, rewrites both at once
//!   with a 64-bit compare-and-exchange).
//!
//! Ordering (the barriers Xen's protocol needs, public/hvm/ioreq.h and xen/common/ioreq.c):
//!
//! - Synchronous slot: Xen writes the fields, issues a write barrier, then sets `state` to
//!   `STATE_IOREQ_READY`. We read `state` ([`IoreqPage::state`]), then [`IoreqPage::load`]
//!   issues an **Acquire fence** before reading the fields, so they cannot be read before the
//!   state that published them. To answer we write `data` ([`IoreqPage::set_data`]) and then
//!   [`IoreqPage::set_state`] issues a **Release fence** before storing the new state, so Xen
//!   sees the data before it sees `STATE_IORESP_READY`.
//! - Buffered ring: Xen writes a slot, issues a write barrier, then bumps `write_pointer`. We
//!   load the pointers with **Acquire** ([`BufferedPageView::write_pointer`],
//!   [`BufferedPageView::pointers`]) before reading slots, and hand slots back with a
//!   **Release** atomic add on `read_pointer` ([`BufferedPageView::advance_read`]), so our
//!   slot reads complete before Xen may reuse the slots.
//!
//! Aliasing inside this process: a view borrows its page exclusively (`&mut` of the mapping
//! or of a [`PageBuf`]), is `Send` but not `Sync` and not `Clone`, so at any time at most one
//! thread of this process accesses a page, and all of its accesses are sequenced.

use crate::abi::{
    BUF_IOREQ_SIZE, IOREQ_BUFFER_SLOT_NUM, IOREQ_OFFSET_DATA, IOREQ_OFFSET_FLAGS,
    IOREQ_OFFSET_VP_EPORT, IOREQ_PAGE_SLOTS, IOREQ_SIZE, IOREQ_STATE_MASK, XEN_PAGE_SIZE,
};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// Byte offset of the first `buf_ioreq_t` in the buffered page (after the two u32 pointers).
const BUFFERED_SLOTS_OFFSET: usize = 8;

/// View of the synchronous ioreq page: one 32-byte `ioreq_t` slot per vCPU.
///
/// The slot of vCPU `v` is at byte `32 * v`; `v` must be below [`IoreqPage::SLOTS`] (128),
/// otherwise the accessors panic (like slice indexing).
pub struct IoreqPage<'a> {
    base: NonNull<u8>,
    _page: PhantomData<&'a mut [u8; XEN_PAGE_SIZE]>,
}

// SAFETY: an `IoreqPage` is the only accessor of its page inside this process for `'a` (see
// `from_raw`'s contract); moving it to another thread moves that exclusivity with it. It is
// not `Sync` (the `NonNull` field keeps it so), so two threads never access it at once.
unsafe impl Send for IoreqPage<'_> {}

impl std::fmt::Debug for IoreqPage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoreqPage")
            .field("base", &self.base)
            .finish()
    }
}

impl<'a> IoreqPage<'a> {
    /// Number of vCPU slots in the page.
    pub const SLOTS: usize = IOREQ_PAGE_SLOTS;

    /// Wraps a mapped ioreq page.
    ///
    /// # Safety
    ///
    /// `base` must be 8-byte aligned and valid for volatile reads and writes of
    /// [`XEN_PAGE_SIZE`] bytes for all of `'a`, and nothing else in this process may access
    /// those bytes during `'a` except through the returned view. Other parties outside the
    /// process (Xen, the guest) may access them concurrently.
    pub unsafe fn from_raw(base: NonNull<u8>) -> Self {
        debug_assert!(
            base.as_ptr() as usize % 8 == 0,
            "ioreq page must be 8-byte aligned"
        );
        IoreqPage {
            base,
            _page: PhantomData,
        }
    }

    /// Start of the page, e.g. for logging or for a caller's own raw access.
    pub fn as_ptr(&self) -> *const u8 {
        self.base.as_ptr()
    }

    /// Pointer to byte `offset` of vCPU `vcpu`'s slot.
    fn field(&self, vcpu: usize, offset: usize) -> *mut u8 {
        assert!(
            vcpu < Self::SLOTS,
            "vCPU index {vcpu} out of range: the ioreq page has {} slots",
            Self::SLOTS
        );
        debug_assert!(offset < IOREQ_SIZE);
        // SAFETY: vcpu < 128 and offset < 32, so the result is inside the 4096-byte page that
        // `from_raw` promised is valid.
        unsafe { self.base.as_ptr().add(vcpu * IOREQ_SIZE + offset) }
    }

    /// The 4-bit `state` of vCPU `vcpu`'s slot (`STATE_IOREQ_*`), by a volatile read of
    /// byte 30.
    ///
    /// # Panics
    ///
    /// If `vcpu >= 128`.
    pub fn state(&self, vcpu: usize) -> u8 {
        let p = self.field(vcpu, IOREQ_OFFSET_FLAGS);
        // SAFETY: `p` is in the page (see `field`), valid for reads; u8 needs no alignment.
        let flags = unsafe { p.read_volatile() };
        flags & IOREQ_STATE_MASK
    }

    /// The whole 32-byte `ioreq_t` of vCPU `vcpu`, as its memory image (little endian on the
    /// architectures Xen supports).
    ///
    /// Issues an Acquire fence first, so when called after [`state`](Self::state) returned
    /// `STATE_IOREQ_READY`, the fields read are the ones Xen published with that state.
    ///
    /// # Panics
    ///
    /// If `vcpu >= 128`.
    pub fn load(&self, vcpu: usize) -> [u8; IOREQ_SIZE] {
        let slot = self.field(vcpu, 0).cast::<u64>();
        fence(Ordering::Acquire);
        let mut out = [0u8; IOREQ_SIZE];
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            // SAFETY: the slot is 32 bytes inside the page and 8-byte aligned (the page is
            // 8-byte aligned and slots are 32 bytes apart), so each of the four u64 words is
            // valid for an aligned volatile read.
            let word = unsafe { slot.add(i).read_volatile() };
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        out
    }

    /// Writes the `data` field (offset 8) of vCPU `vcpu`'s slot with a volatile store: the
    /// value a read returns to the guest.
    ///
    /// # Panics
    ///
    /// If `vcpu >= 128`.
    pub fn set_data(&self, vcpu: usize, data: u64) {
        let p = self.field(vcpu, IOREQ_OFFSET_DATA).cast::<u64>();
        // SAFETY: offset 8 of an 8-byte-aligned slot inside the page: aligned, in bounds,
        // valid for writes.
        unsafe { p.write_volatile(data) }
    }

    /// Sets the 4-bit `state` of vCPU `vcpu`'s slot, keeping the other bits of byte 30
    /// (`data_is_ptr`, `dir`, `df`) as they are, as a C bitfield store would.
    ///
    /// Issues a Release fence before the volatile store, so everything written to the slot
    /// before (e.g. [`set_data`](Self::set_data)) is visible to Xen no later than the state.
    /// Only call this while the slot is ours (`READY`/`INPROCESS`): Xen does not touch the
    /// byte then, so the read-modify-write cannot lose one of its updates.
    ///
    /// # Panics
    ///
    /// If `vcpu >= 128`.
    pub fn set_state(&self, vcpu: usize, state: u8) {
        let p = self.field(vcpu, IOREQ_OFFSET_FLAGS);
        fence(Ordering::Release);
        // SAFETY: `p` is in the page, valid for reads and writes; u8 needs no alignment.
        unsafe {
            let old = p.read_volatile();
            p.write_volatile((old & !IOREQ_STATE_MASK) | (state & IOREQ_STATE_MASK));
        }
    }

    /// The `vp_eport` field (offset 24) of vCPU `vcpu`'s slot: the event channel port Xen
    /// bound for that vCPU's notifications, by a volatile read.
    ///
    /// # Panics
    ///
    /// If `vcpu >= 128`.
    pub fn vp_eport(&self, vcpu: usize) -> u32 {
        let p = self.field(vcpu, IOREQ_OFFSET_VP_EPORT).cast::<u32>();
        // SAFETY: offset 24 of an 8-byte-aligned slot: 4-byte aligned, in bounds.
        unsafe { p.read_volatile() }
    }
}

/// View of the buffered ioreq page (`buffered_iopage_t`, public/hvm/ioreq.h):
/// `read_pointer` u32 at 0, `write_pointer` u32 at 4, then 511 eight-byte `buf_ioreq_t`
/// slots. Pointers only grow (modulo 2^32); entry `p` lives in slot `p % 511`.
pub struct BufferedPageView<'a> {
    base: NonNull<u8>,
    _page: PhantomData<&'a mut [u8; XEN_PAGE_SIZE]>,
}

// SAFETY: as for `IoreqPage`: exclusive within the process for `'a`, and not `Sync`.
unsafe impl Send for BufferedPageView<'_> {}

impl std::fmt::Debug for BufferedPageView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferedPageView")
            .field("base", &self.base)
            .finish()
    }
}

impl<'a> BufferedPageView<'a> {
    /// Number of slots in the ring (`IOREQ_BUFFER_SLOT_NUM`).
    pub const SLOTS: u32 = IOREQ_BUFFER_SLOT_NUM;

    /// Wraps a mapped buffered ioreq page.
    ///
    /// # Safety
    ///
    /// Same contract as [`IoreqPage::from_raw`]: 8-byte aligned, valid for volatile and
    /// atomic reads and writes of [`XEN_PAGE_SIZE`] bytes for `'a`, and accessed by nothing
    /// else in this process during `'a`.
    pub unsafe fn from_raw(base: NonNull<u8>) -> Self {
        debug_assert!(
            base.as_ptr() as usize % 8 == 0,
            "buffered page must be 8-byte aligned"
        );
        BufferedPageView {
            base,
            _page: PhantomData,
        }
    }

    /// Start of the page, for a caller that wants to overlay its own `#[repr(C)]` type
    /// (e.g. `ioreq_server::bufioreq::BufferedIoPage`). Accesses through it must follow the
    /// rules in the module documentation.
    pub fn as_ptr(&self) -> *const u8 {
        self.base.as_ptr()
    }

    fn read_ptr(&self) -> &AtomicU32 {
        // SAFETY: offset 0 is 4-byte aligned and valid for 'a. Inside this process the word is
        // only ever accessed atomically, through this view; Xen accesses it with aligned and
        // locked instructions, which is what an atomic access is on the hardware.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().cast::<u32>()) }
    }

    fn write_ptr(&self) -> &AtomicU32 {
        // SAFETY: as `read_ptr`, at offset 4 (4-byte aligned).
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(4).cast::<u32>()) }
    }

    /// `read_pointer`, loaded with Acquire ordering.
    pub fn read_pointer(&self) -> u32 {
        self.read_ptr().load(Ordering::Acquire)
    }

    /// `write_pointer`, loaded with Acquire ordering: slots below it, once read after this
    /// load, hold what Xen published.
    pub fn write_pointer(&self) -> u32 {
        self.write_ptr().load(Ordering::Acquire)
    }

    /// `(read_pointer, write_pointer)` from one 64-bit atomic load (Acquire), so the pair is
    /// consistent even if Xen folds both pointers down by a multiple of 511 in between (it
    /// does so in `HVM_IOREQSRV_BUFIOREQ_ATOMIC` mode). Reading the two separately can see
    /// a read pointer from before such a fold and a write pointer from after it.
    pub fn pointers(&self) -> (u32, u32) {
        // SAFETY: offset 0 is 8-byte aligned (the page is) and valid for 'a; only accessed
        // atomically in this process, and never concurrently by two threads of it (the view
        // is not `Sync`), so mixing this 8-byte load with the 4-byte atomics is not a race.
        let both = unsafe { AtomicU64::from_ptr(self.base.as_ptr().cast::<u64>()) };
        let b = both.load(Ordering::Acquire).to_ne_bytes();
        let read = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let write = u32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
        (read, write)
    }

    /// Slot `i` (`0..511`) as one u64 read with a single volatile load: on a little-endian
    /// host bits 31:0 are the first word (`type` 7:0, `pad` 8, `dir` 9, `size` 11:10,
    /// `addr` 31:12) and bits 63:32 are `data`.
    ///
    /// Read only slots between the pointers, after loading `write_pointer`.
    ///
    /// # Panics
    ///
    /// If `i >= 511` (reduce a ring pointer with `% BufferedPageView::SLOTS` first).
    pub fn slot(&self, i: u32) -> u64 {
        assert!(
            i < Self::SLOTS,
            "buffered ioreq slot {i} out of range (the ring has {} slots)",
            Self::SLOTS
        );
        let offset = BUFFERED_SLOTS_OFFSET + i as usize * BUF_IOREQ_SIZE;
        // SAFETY: 8 + 8 * 510 + 8 = 4096, so the u64 is inside the page, and it is 8-byte
        // aligned because the page is.
        unsafe { self.base.as_ptr().add(offset).cast::<u64>().read_volatile() }
    }

    /// Hands `n` consumed slots back to Xen: an atomic `read_pointer += n` with Release
    /// ordering, so the slot reads before it are complete before Xen can reuse the slots. An
    /// atomic add (not a store) because Xen may rewrite `read_pointer` concurrently in
    /// `HVM_IOREQSRV_BUFIOREQ_ATOMIC` mode. Returns the new read pointer.
    pub fn advance_read(&self, n: u32) -> u32 {
        self.read_ptr()
            .fetch_add(n, Ordering::Release)
            .wrapping_add(n)
    }
}

/// The consumer side of the protocol (`ioreq_server::bufioreq::drain_ring`) runs on the
/// mapped page through this: one implementation for Xen's ring and the simulated one.
impl ioreq_server::bufioreq::BufferedRing for BufferedPageView<'_> {
    fn pointers(&self) -> (u32, u32) {
        BufferedPageView::pointers(self)
    }

    fn slot(&self, i: u32) -> u64 {
        let v = BufferedPageView::slot(self, i % Self::SLOTS);
        // The slot is read after the pointers' Acquire load; keep later reads after it too.
        std::sync::atomic::fence(Ordering::Acquire);
        v
    }

    fn advance_read(&self, n: u32) {
        BufferedPageView::advance_read(self, n);
    }
}

/// A page-aligned, zeroed 4 KiB page owned by this process, for tests and simulations: it
/// gives the same views as a real mapping, and direct byte access to play Xen's side.
#[repr(C, align(4096))]
pub struct PageBuf {
    bytes: [u8; XEN_PAGE_SIZE],
}

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBuf").finish_non_exhaustive()
    }
}

impl PageBuf {
    /// A zeroed page on the heap.
    pub fn new_boxed() -> Box<Self> {
        Box::new(PageBuf {
            bytes: [0; XEN_PAGE_SIZE],
        })
    }

    /// The page's bytes, e.g. to fill in requests the way Xen would.
    pub fn bytes(&mut self) -> &mut [u8; XEN_PAGE_SIZE] {
        &mut self.bytes
    }

    fn base(&mut self) -> NonNull<u8> {
        NonNull::from(&mut self.bytes).cast::<u8>()
    }

    /// The page seen as a synchronous ioreq page.
    pub fn ioreq_page(&mut self) -> IoreqPage<'_> {
        // SAFETY: the pointer comes from `&mut self`, which is borrowed for the view's
        // lifetime: 4096 bytes, 4096-aligned, valid, and exclusively the view's.
        unsafe { IoreqPage::from_raw(self.base()) }
    }

    /// The page seen as a buffered ioreq page.
    pub fn buffered_page(&mut self) -> BufferedPageView<'_> {
        // SAFETY: as in `ioreq_page`.
        unsafe { BufferedPageView::from_raw(self.base()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{STATE_IOREQ_INPROCESS, STATE_IOREQ_READY, STATE_IORESP_READY};

    /// Writes a request into slot `vcpu` the way Xen lays it out.
    fn put_request(page: &mut PageBuf, vcpu: usize, addr: u64, flags: u8, ty: u8, port: u32) {
        let s = &mut page.bytes()[vcpu * 32..vcpu * 32 + 32];
        s[0..8].copy_from_slice(&addr.to_le_bytes());
        s[8..16].copy_from_slice(&0u64.to_le_bytes());
        s[16..20].copy_from_slice(&1u32.to_le_bytes());
        s[20..24].copy_from_slice(&4u32.to_le_bytes());
        s[24..28].copy_from_slice(&port.to_le_bytes());
        s[30] = flags;
        s[31] = ty;
    }

    #[test]
    fn ioreq_slot_round_trip() {
        let mut page = PageBuf::new_boxed();
        // READY, dir = read (0x20), PIO, port 77, on vCPU 5 and the last vCPU.
        put_request(&mut page, 5, 0xcfc, 0x21, 0, 77);
        put_request(&mut page, 127, 0x1234, 0x31, 1, 99);
        {
            let v = page.ioreq_page();
            assert_eq!(v.state(5), STATE_IOREQ_READY);
            assert_eq!(v.state(4), 0);
            assert_eq!(v.vp_eport(5), 77);
            assert_eq!(v.vp_eport(127), 99);
            let raw = v.load(5);
            assert_eq!(u64::from_le_bytes(raw[0..8].try_into().unwrap()), 0xcfc);
            assert_eq!(raw[30], 0x21);
            v.set_state(5, STATE_IOREQ_INPROCESS);
            v.set_data(5, 0xdead_beef);
            v.set_state(5, STATE_IORESP_READY);
            assert_eq!(v.state(5), STATE_IORESP_READY);
            assert_eq!(v.state(127), STATE_IOREQ_READY);
        }
        let b = page.bytes();
        assert_eq!(b[5 * 32 + 30], 0x23, "dir bit kept, state replaced");
        assert_eq!(
            u64::from_le_bytes(b[5 * 32 + 8..5 * 32 + 16].try_into().unwrap()),
            0xdead_beef
        );
        assert_eq!(b[4 * 32..5 * 32], [0u8; 32], "neighbour untouched");
    }

    #[test]
    #[should_panic(expected = "vCPU index 128 out of range")]
    fn ioreq_vcpu_out_of_range_panics() {
        let mut page = PageBuf::new_boxed();
        page.ioreq_page().state(128);
    }

    #[test]
    fn buffered_ring() {
        let mut page = PageBuf::new_boxed();
        {
            let b = page.bytes();
            b[0..4].copy_from_slice(&509u32.to_le_bytes());
            b[4..8].copy_from_slice(&512u32.to_le_bytes());
            // Slot 509 and slot 510 and the wrapped slot 0.
            for (slot, v) in [(509usize, 0x1111u64), (510, 0x2222), (0, 0x3333)] {
                let o = 8 + 8 * slot;
                b[o..o + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        let v = page.buffered_page();
        assert_eq!(v.read_pointer(), 509);
        assert_eq!(v.write_pointer(), 512);
        assert_eq!(v.pointers(), (509, 512));
        let (mut rd, wr) = v.pointers();
        let mut got = vec![];
        while rd != wr {
            got.push(v.slot(rd % BufferedPageView::SLOTS));
            rd = v.advance_read(1);
        }
        assert_eq!(got, [0x1111, 0x2222, 0x3333]);
        assert_eq!(v.read_pointer(), 512);
    }

    #[test]
    fn advance_read_wraps() {
        let mut page = PageBuf::new_boxed();
        page.bytes()[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let v = page.buffered_page();
        assert_eq!(v.advance_read(2), 1);
        assert_eq!(v.read_pointer(), 1);
    }

    #[test]
    #[should_panic(expected = "buffered ioreq slot 511 out of range")]
    fn buffered_slot_out_of_range_panics() {
        let mut page = PageBuf::new_boxed();
        page.buffered_page().slot(511);
    }

    #[test]
    fn views_are_send() {
        fn is_send<T: Send>() {}
        is_send::<IoreqPage<'static>>();
        is_send::<BufferedPageView<'static>>();
    }
}
