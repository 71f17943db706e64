//! Buffered ioreqs: the 4 KiB ring of 8-byte `buf_ioreq_t` entries that Xen fills with
//! writes nobody has to wait for (public/hvm/ioreq.h).
//!
//! Page layout: `read_pointer` (u32, offset 0), `write_pointer` (u32, offset 4), then
//! [`IOREQ_BUFFER_SLOT_NUM`] slots. Pointers only grow; slot `i` is `i % 511`.
//!
//! `buf_ioreq_t`, as one little-endian u64:
//!
//! | bits  | field                                   |
//! |-------|-----------------------------------------|
//! | 7:0   | `type` (PIO, COPY or TIMEOFFSET)        |
//! | 8     | `pad`                                   |
//! | 9     | `dir` (1 = read)                        |
//! | 11:10 | `size` as log2: 0 => 1 ... 3 => 8 bytes |
//! | 31:12 | `addr` (20 bits)                        |
//! | 63:32 | `data` (low 32 bits)                    |
//!
//! An 8-byte write takes two consecutive slots; the second one's `data` is the high half.
//! In [`BufioreqMode::Atomic`] the producer also folds both pointers back below 511 with one
//! 64-bit compare-and-exchange once `read_pointer` reaches 511, so they never overflow.

use crate::abi::{self, AbiError, IOREQ_BUFFER_SLOT_NUM};
use crate::ioreq::{Dir, Ioreq, IoreqState, IoreqType};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use thiserror::Error;

/// Highest address a buffered entry can carry (20 bits).
pub const BUF_ADDR_MAX: u64 = 0xf_ffff;

/// `HVM_IOREQSRV_BUFIOREQ_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufioreqMode {
    /// No buffered ring: every access is synchronous.
    Off,
    /// Ring without pointer normalisation.
    Legacy,
    /// Ring whose producer normalises both pointers atomically.
    Atomic,
}

impl BufioreqMode {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            abi::HVM_IOREQSRV_BUFIOREQ_OFF => Some(Self::Off),
            abi::HVM_IOREQSRV_BUFIOREQ_LEGACY => Some(Self::Legacy),
            abi::HVM_IOREQSRV_BUFIOREQ_ATOMIC => Some(Self::Atomic),
            _ => None,
        }
    }
}

/// One decoded `buf_ioreq_t` slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufSlot {
    pub ty: u8,
    pub dir: Dir,
    /// log2 of the size.
    pub size_code: u8,
    pub addr: u32,
    pub data: u32,
}

impl BufSlot {
    pub fn encode(&self) -> u64 {
        let lo = u32::from(self.ty)
            | (u32::from(self.dir == Dir::Read) << 9)
            | (u32::from(self.size_code & 3) << 10)
            | ((self.addr & 0xf_ffff) << 12);
        u64::from(lo) | (u64::from(self.data) << 32)
    }

    pub fn decode(v: u64) -> Self {
        let lo = v as u32;
        BufSlot {
            ty: lo as u8,
            dir: if lo & (1 << 9) != 0 {
                Dir::Read
            } else {
                Dir::Write
            },
            size_code: ((lo >> 10) & 3) as u8,
            addr: lo >> 12,
            data: (v >> 32) as u32,
        }
    }
}

/// Why an ioreq cannot go through the ring (it must then be sent synchronously).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum BufferError {
    #[error(
        "ioreq cannot be buffered (only single PIO/COPY/TIMEOFFSET writes below 1 MiB without a pointer)"
    )]
    NotBufferable,
    #[error("buffered ring is full")]
    Full,
}

/// The consumer's view of a buffered ring, wherever its page lives: a [`BufferedIoPage`] in
/// this process, or Xen's page mapped by xen-ffi. [`drain_ring`] is the one implementation of
/// the consumer side on top of it.
pub trait BufferedRing {
    /// (read_pointer, write_pointer), read together (one 64-bit Acquire load).
    fn pointers(&self) -> (u32, u32);
    /// The raw slot `i` (< 511), read with Acquire ordering.
    fn slot(&self, i: u32) -> u64;
    /// Frees `n` slots: read_pointer += n (Release), never touching write_pointer.
    fn advance_read(&self, n: u32);
}

/// Hands every queued entry of `ring`, oldest first, to `f` as a write ioreq and frees its
/// slot(s). At most one ring's worth (511 slots) per call, whatever the pointers say. An entry
/// of a type other than PIO/COPY/TIMEOFFSET is skipped (so it cannot wedge the ring) and
/// reported as an error, which ends the call; an 8-byte entry whose second slot has not been
/// published yet is left in the ring and reported likewise.
pub fn drain_ring<R: BufferedRing + ?Sized>(
    ring: &R,
    mut f: impl FnMut(Ioreq),
) -> Result<usize, AbiError> {
    let mut n = 0;
    for _ in 0..IOREQ_BUFFER_SLOT_NUM {
        let (r, w) = ring.pointers();
        if r == w {
            return Ok(n);
        }
        let slot = BufSlot::decode(ring.slot(r % IOREQ_BUFFER_SLOT_NUM));
        let ty = match slot.ty {
            abi::IOREQ_TYPE_PIO => IoreqType::Pio,
            abi::IOREQ_TYPE_COPY => IoreqType::Copy,
            abi::IOREQ_TYPE_TIMEOFFSET => IoreqType::TimeOffset,
            other => {
                ring.advance_read(1);
                return Err(AbiError::BufferedType(other));
            }
        };
        let size = 1u32 << slot.size_code;
        let mut data = u64::from(slot.data);
        let used = if size == 8 {
            if w.wrapping_sub(r) < 2 {
                return Err(AbiError::MissingSecondSlot(slot.size_code));
            }
            let hi = BufSlot::decode(ring.slot(r.wrapping_add(1) % IOREQ_BUFFER_SLOT_NUM));
            data |= u64::from(hi.data) << 32;
            2
        } else {
            1
        };
        let req = Ioreq {
            addr: u64::from(slot.addr),
            data,
            count: 1,
            size,
            vp_eport: 0,
            state: IoreqState::Ready,
            data_is_ptr: false,
            dir: slot.dir,
            df: false,
            ty,
        };
        // The slots are read before the pointer that frees them moves.
        fence(Ordering::Acquire);
        ring.advance_read(used);
        f(req);
        n += 1;
    }
    Ok(n)
}

impl BufferedRing for BufferedIoPage {
    fn pointers(&self) -> (u32, u32) {
        BufferedIoPage::pointers(self)
    }

    fn slot(&self, i: u32) -> u64 {
        self.slots[(i % IOREQ_BUFFER_SLOT_NUM) as usize].load(Ordering::Acquire)
    }

    fn advance_read(&self, n: u32) {
        self.add_read(n);
    }
}

/// The buffered page as it lies in memory (shared with the hypervisor on real Xen).
#[repr(C)]
#[derive(Debug)]
pub struct BufferedIoPage {
    /// `read_pointer` in bits 31:0, `write_pointer` in bits 63:32 (little endian).
    ptrs: AtomicU64,
    slots: [AtomicU64; IOREQ_BUFFER_SLOT_NUM as usize],
}

const _: () = assert!(std::mem::size_of::<BufferedIoPage>() == 4096);

impl Default for BufferedIoPage {
    fn default() -> Self {
        BufferedIoPage {
            ptrs: AtomicU64::new(0),
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

fn split(p: u64) -> (u32, u32) {
    (p as u32, (p >> 32) as u32)
}

fn join(read: u32, write: u32) -> u64 {
    u64::from(read) | (u64::from(write) << 32)
}

impl BufferedIoPage {
    /// (read_pointer, write_pointer).
    pub fn pointers(&self) -> (u32, u32) {
        split(self.ptrs.load(Ordering::Acquire))
    }

    /// Entries waiting to be drained.
    pub fn pending(&self) -> u32 {
        let (r, w) = self.pointers();
        w.wrapping_sub(r)
    }

    /// Producer side (the hypervisor): queue one write. Mirrors Xen's rules: only PIO/COPY
    /// single writes without a pointer, at an address that fits 20 bits; an 8-byte write
    /// takes two slots; a full ring refuses (the caller then sends synchronously).
    pub fn push(&self, req: &Ioreq, mode: BufioreqMode) -> Result<(), BufferError> {
        let bufferable = mode != BufioreqMode::Off
            && matches!(
                req.ty,
                IoreqType::Pio | IoreqType::Copy | IoreqType::TimeOffset
            )
            && req.dir == Dir::Write
            && req.count == 1
            && !req.data_is_ptr
            && req.addr <= BUF_ADDR_MAX
            && matches!(req.size, 1 | 2 | 4 | 8);
        if !bufferable {
            return Err(BufferError::NotBufferable);
        }
        let size_code = req.size.trailing_zeros() as u8;
        let needed: u32 = if req.size == 8 { 2 } else { 1 };
        let (r, w) = self.pointers();
        // (Not `w - r + needed`: a peer that corrupts the pointers must not overflow it.)
        if w.wrapping_sub(r) > IOREQ_BUFFER_SLOT_NUM - needed {
            return Err(BufferError::Full);
        }
        let first = BufSlot {
            ty: req.ty as u8,
            dir: Dir::Write,
            size_code,
            addr: req.addr as u32,
            data: req.data as u32,
        };
        self.slots[(w % IOREQ_BUFFER_SLOT_NUM) as usize].store(first.encode(), Ordering::Relaxed);
        if needed == 2 {
            let second = BufSlot {
                data: (req.data >> 32) as u32,
                ..first
            };
            self.slots[(w.wrapping_add(1) % IOREQ_BUFFER_SLOT_NUM) as usize]
                .store(second.encode(), Ordering::Relaxed);
        }
        // Slots are visible before the pointer that publishes them.
        fence(Ordering::Release);
        // Only the producer writes write_pointer; the consumer only adds to read_pointer, and
        // the low half never carries into the high half (it stays below 2 * 511 in Atomic mode).
        self.ptrs
            .fetch_add(u64::from(needed) << 32, Ordering::AcqRel);
        if mode == BufioreqMode::Atomic {
            self.normalise();
        }
        Ok(())
    }

    /// Folds both pointers down by a multiple of 511 while read_pointer >= 511, with one
    /// 64-bit compare-and-exchange per attempt (bounded, like Xen's loop).
    fn normalise(&self) {
        for _ in 0..IOREQ_BUFFER_SLOT_NUM {
            let old = self.ptrs.load(Ordering::Acquire);
            let (r, w) = split(old);
            if r < IOREQ_BUFFER_SLOT_NUM {
                return;
            }
            let n = r / IOREQ_BUFFER_SLOT_NUM;
            let new = join(
                r - n * IOREQ_BUFFER_SLOT_NUM,
                w.wrapping_sub(n * IOREQ_BUFFER_SLOT_NUM),
            );
            if self
                .ptrs
                .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        }
    }

    /// Consumer side (the server): see [`drain_ring`].
    pub fn drain(&self, f: impl FnMut(Ioreq)) -> Result<usize, AbiError> {
        drain_ring(self, f)
    }

    /// Adds `k` to read_pointer alone: it wraps at 2^32 like Xen's, never carrying into
    /// write_pointer (a plain 64-bit add would, once a Legacy ring's pointer wraps).
    fn add_read(&self, k: u32) {
        let _ = self
            .ptrs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                let (r, w) = split(p);
                Some(join(r.wrapping_add(k), w))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(ty: IoreqType, addr: u64, size: u32, data: u64) -> Ioreq {
        Ioreq::new(ty, Dir::Write, addr, size, data)
    }

    #[test]
    fn slot_encoding_matches_header_bits() {
        let s = BufSlot {
            ty: 1,
            dir: Dir::Read,
            size_code: 3,
            addr: 0xabcde,
            data: 0xdeadbeef,
        };
        let v = s.encode();
        assert_eq!(v as u32 & 0xff, 1);
        assert_eq!((v >> 9) & 1, 1);
        assert_eq!((v >> 10) & 3, 3);
        assert_eq!((v as u32) >> 12, 0xabcde);
        assert_eq!(v >> 32, 0xdeadbeef);
        assert_eq!(BufSlot::decode(v), s);
    }

    #[test]
    fn eight_byte_write_takes_two_slots() {
        let p = BufferedIoPage::default();
        p.push(
            &w(IoreqType::Copy, 0xa0000, 8, 0x1122334455667788),
            BufioreqMode::Atomic,
        )
        .unwrap();
        assert_eq!(p.pointers(), (0, 2));
        let mut got = vec![];
        assert_eq!(p.drain(|r| got.push(r)).unwrap(), 1);
        assert_eq!(got[0].data, 0x1122334455667788);
        assert_eq!(got[0].size, 8);
        assert_eq!(p.pointers(), (2, 2));
    }

    #[test]
    fn unpaired_eight_byte_entry_is_an_error_not_a_guess() {
        let p = BufferedIoPage::default();
        let first = BufSlot {
            ty: 1,
            dir: Dir::Write,
            size_code: 3,
            addr: 0xa0000,
            data: 1,
        };
        p.slots[0].store(first.encode(), Ordering::Relaxed);
        p.ptrs.store(join(0, 1), Ordering::Release);
        assert_eq!(p.drain(|_| {}), Err(AbiError::MissingSecondSlot(3)));
        assert_eq!(
            p.pointers(),
            (0, 1),
            "entry stays until its second half arrives"
        );
    }

    #[test]
    fn what_cannot_be_buffered() {
        let p = BufferedIoPage::default();
        let mut r = w(IoreqType::Copy, 0x10_0000, 4, 0);
        assert_eq!(
            p.push(&r, BufioreqMode::Atomic),
            Err(BufferError::NotBufferable)
        );
        r.addr = 0xa0000;
        r.dir = Dir::Read;
        assert_eq!(
            p.push(&r, BufioreqMode::Atomic),
            Err(BufferError::NotBufferable)
        );
        r.dir = Dir::Write;
        r.count = 2;
        assert_eq!(
            p.push(&r, BufioreqMode::Atomic),
            Err(BufferError::NotBufferable)
        );
        r.count = 1;
        assert_eq!(
            p.push(&r, BufioreqMode::Off),
            Err(BufferError::NotBufferable)
        );
        let c = Ioreq::pci_config(0, 0, Dir::Write, 4, 0);
        assert_eq!(
            p.push(&c, BufioreqMode::Atomic),
            Err(BufferError::NotBufferable)
        );
    }

    #[test]
    fn full_ring_refuses_and_drain_frees_it() {
        let p = BufferedIoPage::default();
        for i in 0..IOREQ_BUFFER_SLOT_NUM {
            p.push(
                &w(IoreqType::Pio, 0x80, 1, u64::from(i)),
                BufioreqMode::Atomic,
            )
            .unwrap();
        }
        assert_eq!(
            p.push(&w(IoreqType::Pio, 0x80, 1, 0), BufioreqMode::Atomic),
            Err(BufferError::Full)
        );
        let mut seen = vec![];
        p.drain(|r| seen.push(r.data)).unwrap();
        assert_eq!(
            seen,
            (0..u64::from(IOREQ_BUFFER_SLOT_NUM)).collect::<Vec<_>>()
        );
        // Normalisation happens on the next push once read_pointer >= 511.
        p.push(&w(IoreqType::Pio, 0x80, 1, 7), BufioreqMode::Atomic)
            .unwrap();
        assert_eq!(p.pointers(), (0, 1));
    }

    #[test]
    fn legacy_mode_does_not_normalise() {
        let p = BufferedIoPage::default();
        for _ in 0..600 {
            p.push(&w(IoreqType::Pio, 0x80, 1, 0), BufioreqMode::Legacy)
                .unwrap();
            p.drain(|_| {}).unwrap();
        }
        assert_eq!(p.pointers(), (600, 600));
    }

    proptest! {
        /// Any interleaving of pushes and drains delivers every accepted write once, in order,
        /// and the pointers stay below 2 * 511 in Atomic mode.
        #[test]
        fn ring_preserves_order(ops in prop::collection::vec((any::<bool>(), prop::sample::select(vec![1u32, 2, 4, 8]), any::<u64>()), 1..2000)) {
            let p = BufferedIoPage::default();
            let mut expect = std::collections::VecDeque::new();
            let mut got = vec![];
            let mut want = vec![];
            for (drain, size, data) in ops {
                if drain {
                    p.drain(|r| got.push((r.size, r.data))).unwrap();
                    want.extend(expect.drain(..));
                } else {
                    let data = data & crate::ioreq::size_mask(size);
                    let r = w(IoreqType::Copy, 0xb8000, size, data);
                    match p.push(&r, BufioreqMode::Atomic) {
                        Ok(()) => expect.push_back((size, data)),
                        Err(BufferError::Full) => {}
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                let (r, w) = p.pointers();
                prop_assert!(r < 2 * IOREQ_BUFFER_SLOT_NUM && w < 3 * IOREQ_BUFFER_SLOT_NUM);
            }
            p.drain(|r| got.push((r.size, r.data))).unwrap();
            want.extend(expect.drain(..));
            prop_assert_eq!(got, want);
        }
    }
}
