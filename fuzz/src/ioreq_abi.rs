//! Target `ioreq_abi`: the ioreq ABI decoder and the buffered ring.
//!
//! Input: mode byte, then
//! - mode even: one or more 32-byte `ioreq_t` slot images (a shared ioreq page). Each is
//!   decoded (`Ioreq::from_bytes`), checked against a model of the layout (which error, in
//!   which order; exact re-encoding of what decodes) and validated (`Ioreq::validate` against
//!   a model of Xen's rules, plus what a validated request promises its consumers).
//! - mode odd: a buffered page with arbitrary contents (read pointer, write pointer, 511
//!   slots), then operations on it: drain (against a model: same entries, same error, same
//!   final pointers, bounded work) and push (against Xen's producer rules, Atomic or Legacy).

use crate::Bytes;
use ioreq_server::abi::{self, AbiError, IOREQ_BUFFER_SLOT_NUM, IOREQ_SIZE, RawIoreq};
use ioreq_server::bufioreq::{BufSlot, BufferError, BufferedIoPage, BufioreqMode};
use ioreq_server::{Dir, Ioreq, IoreqError, IoreqState, IoreqType};
use std::sync::atomic::{AtomicU64, Ordering};

pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    if b.u8() & 1 == 0 {
        let mut rest = b.rest();
        loop {
            let mut slot = [0u8; IOREQ_SIZE];
            let n = rest.len().min(IOREQ_SIZE);
            slot[..n].copy_from_slice(&rest[..n]);
            check_slot(&slot);
            if rest.len() <= IOREQ_SIZE {
                break;
            }
            rest = &rest[IOREQ_SIZE..];
        }
    } else {
        ring(&mut b);
    }
}

fn check_slot(b: &[u8; IOREQ_SIZE]) {
    let raw = RawIoreq::from_bytes(b);
    assert_eq!(raw.to_bytes(), *b, "raw image round trip");
    let (flags, ty) = (b[30], b[31]);
    let want_err = if flags & abi::FLAG_PAD1 != 0 {
        Some(AbiError::ReservedFlag(flags))
    } else if flags & abi::FLAG_STATE_MASK > 3 {
        Some(AbiError::UnknownState(flags & abi::FLAG_STATE_MASK))
    } else if !matches!(ty, 0 | 1 | 2 | 7 | 8) {
        Some(AbiError::UnknownType(ty))
    } else {
        None
    };
    match (Ioreq::from_bytes(b), want_err) {
        (Ok(r), None) => {
            let mut want = *b;
            want[28] = 0;
            want[29] = 0;
            assert_eq!(
                r.to_bytes(),
                want,
                "decoded slot re-encodes exactly (padding aside)"
            );
            assert_eq!(Ioreq::from_raw(&r.to_raw()), Ok(r));
            assert_eq!(r.data_is_ptr, flags & abi::FLAG_DATA_IS_PTR != 0);
            assert_eq!(r.dir == Dir::Read, flags & abi::FLAG_DIR_READ != 0);
            assert_eq!(r.df, flags & abi::FLAG_DF != 0);
            check_validate(&r);
        }
        (Err(e), Some(w)) => assert_eq!(e, w, "decode error and its precedence"),
        (got, want) => panic!("slot {b:02x?}: decoded {got:?}, model says {want:?}"),
    }
}

/// Xen's rules for each type (the model of `Ioreq::validate`), as the variant name.
fn model_validate(r: &Ioreq) -> Result<(), &'static str> {
    if matches!(r.ty, IoreqType::TimeOffset | IoreqType::Invalidate) {
        return Ok(());
    }
    if !matches!(r.size, 1 | 2 | 4 | 8) {
        return Err("BadSize");
    }
    if r.count == 0 {
        return Err("ZeroCount");
    }
    match r.ty {
        IoreqType::Pio if u128::from(r.addr) + u128::from(r.size) > 0x1_0000 => {
            Err("PortOutOfRange")
        }
        IoreqType::Copy => {
            // Every byte of every rep item within 0..2^64, in 128-bit arithmetic.
            let (addr, size) = (i128::from(r.addr), i128::from(r.size));
            let back = i128::from(r.count - 1) * size;
            let (lo, hi) = if r.df {
                (addr - back, addr + size - 1)
            } else {
                (addr, addr + back + size - 1)
            };
            if lo < 0 || hi > i128::from(u64::MAX) {
                Err("MmioWraps")
            } else {
                Ok(())
            }
        }
        IoreqType::PciConfig => {
            let reg = r.addr as u32;
            if r.count != 1 {
                Err("ConfigRep")
            } else if r.data_is_ptr {
                Err("ConfigPtr")
            } else if u64::from(reg) + u64::from(r.size) > 0x1000 {
                Err("ConfigRegister")
            } else if (reg & 3) + r.size > 4 {
                // Xen makes PCI_CONFIG requests only from CF8/CFC accesses, which never leave
                // the 4-byte data window (cf8_decode): 1, 2 or 4 bytes inside one dword.
                Err("ConfigDword")
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

fn variant(e: &IoreqError) -> &'static str {
    match e {
        IoreqError::Abi(_) => "Abi",
        IoreqError::BadSize(_) => "BadSize",
        IoreqError::ZeroCount => "ZeroCount",
        IoreqError::PortOutOfRange { .. } => "PortOutOfRange",
        IoreqError::ConfigRep(_) => "ConfigRep",
        IoreqError::ConfigPtr => "ConfigPtr",
        IoreqError::ConfigRegister { .. } => "ConfigRegister",
        IoreqError::ConfigDword { .. } => "ConfigDword",
        IoreqError::MmioWraps { .. } => "MmioWraps",
    }
}

fn check_validate(r: &Ioreq) {
    let got = r.validate();
    let want = model_validate(r);
    assert_eq!(
        got.as_ref().map_err(variant).copied(),
        want,
        "validate of {r:?}: {got:?}"
    );
    let _ = got.map_err(|e| e.to_string());
    if want.is_err() {
        return;
    }
    // What a validated request promises the engine and the models.
    match r.ty {
        IoreqType::Pio => {
            assert!(r.addr + u64::from(r.size) <= 0x1_0000);
        }
        IoreqType::PciConfig => {
            let (_, reg) = abi::split_pci_config_addr(r.addr);
            assert!(reg + r.size <= 0x1000);
            assert!(r.size <= 4 && (reg & 3) + r.size <= 4, "stays in one dword");
            assert_eq!(r.count, 1);
        }
        _ => {}
    }
    let mask = r.size_mask();
    if r.size < 8 {
        assert_eq!(mask, (1u64 << (8 * r.size)) - 1);
    }
    let (s, e) = r.byte_span();
    if r.ty == IoreqType::Copy {
        assert!(
            s <= e,
            "a validated MMIO span does not wrap: {s:#x}..{e:#x}"
        );
    }
}

// ---- the buffered ring ----

/// The page's storage, owned here so the harness can see the slots; the page under test is
/// a view of it.
struct Page {
    words: Box<[AtomicU64; 512]>,
}

impl Page {
    fn new(ptrs: u64, slots: &[u64; 511]) -> Self {
        let words: Box<[AtomicU64; 512]> = Box::new(std::array::from_fn(|i| {
            AtomicU64::new(if i == 0 { ptrs } else { slots[i - 1] })
        }));
        Page { words }
    }

    fn page(&self) -> &BufferedIoPage {
        const _: () = assert!(std::mem::size_of::<BufferedIoPage>() == 4096);
        // SAFETY: BufferedIoPage is repr(C) of one AtomicU64 (pointers) and 511 AtomicU64
        // (slots): the same layout as [AtomicU64; 512], which `words` is, with the same
        // alignment. All access on both sides is through shared references to atomics, so
        // the two views may alias; the view borrows `self`.
        #[allow(unsafe_code)]
        unsafe {
            &*self.words.as_ptr().cast::<BufferedIoPage>()
        }
    }

    fn slot(&self, i: u32) -> u64 {
        self.words[1 + (i % IOREQ_BUFFER_SLOT_NUM) as usize].load(Ordering::Relaxed)
    }

    fn ptrs(&self) -> (u32, u32) {
        let p = self.words[0].load(Ordering::Relaxed);
        (p as u32, (p >> 32) as u32)
    }
}

/// What Xen's ring holds: separate 32-bit read and write pointers that wrap on their own.
struct Model {
    r: u32,
    w: u32,
    slots: [u64; 511],
}

impl Model {
    fn drain(&mut self) -> (Vec<Ioreq>, Result<usize, AbiError>) {
        let mut out = vec![];
        // Never more than the ring holds: 511 entries per drain.
        for _ in 0..IOREQ_BUFFER_SLOT_NUM {
            if self.r == self.w {
                let n = out.len();
                return (out, Ok(n));
            }
            let s = BufSlot::decode(self.slots[(self.r % IOREQ_BUFFER_SLOT_NUM) as usize]);
            let ty = match s.ty {
                0 => IoreqType::Pio,
                1 => IoreqType::Copy,
                7 => IoreqType::TimeOffset,
                other => {
                    self.r = self.r.wrapping_add(1);
                    return (out, Err(AbiError::BufferedType(other)));
                }
            };
            let size = 1u32 << s.size_code;
            let mut data = u64::from(s.data);
            let used = if size == 8 {
                if self.w.wrapping_sub(self.r) < 2 {
                    return (out, Err(AbiError::MissingSecondSlot(s.size_code)));
                }
                let hi = BufSlot::decode(
                    self.slots[(self.r.wrapping_add(1) % IOREQ_BUFFER_SLOT_NUM) as usize],
                );
                data |= u64::from(hi.data) << 32;
                2
            } else {
                1
            };
            out.push(Ioreq {
                addr: u64::from(s.addr),
                data,
                count: 1,
                size,
                vp_eport: 0,
                state: IoreqState::Ready,
                data_is_ptr: false,
                dir: s.dir,
                df: false,
                ty,
            });
            self.r = self.r.wrapping_add(used);
        }
        let n = out.len();
        (out, Ok(n))
    }

    fn push(&mut self, req: &Ioreq, mode: BufioreqMode) -> Result<(), BufferError> {
        let bufferable = mode != BufioreqMode::Off
            && matches!(
                req.ty,
                IoreqType::Pio | IoreqType::Copy | IoreqType::TimeOffset
            )
            && req.dir == Dir::Write
            && req.count == 1
            && !req.data_is_ptr
            && req.addr <= 0xf_ffff
            && matches!(req.size, 1 | 2 | 4 | 8);
        if !bufferable {
            return Err(BufferError::NotBufferable);
        }
        let needed = if req.size == 8 { 2 } else { 1 };
        if u64::from(self.w.wrapping_sub(self.r)) + needed > u64::from(IOREQ_BUFFER_SLOT_NUM) {
            return Err(BufferError::Full);
        }
        let first = BufSlot {
            ty: req.ty as u8,
            dir: Dir::Write,
            size_code: req.size.trailing_zeros() as u8,
            addr: req.addr as u32,
            data: req.data as u32,
        };
        self.slots[(self.w % IOREQ_BUFFER_SLOT_NUM) as usize] = first.encode();
        if needed == 2 {
            let second = BufSlot {
                data: (req.data >> 32) as u32,
                ..first
            };
            self.slots[(self.w.wrapping_add(1) % IOREQ_BUFFER_SLOT_NUM) as usize] = second.encode();
        }
        self.w = self.w.wrapping_add(needed as u32);
        if mode == BufioreqMode::Atomic && self.r >= IOREQ_BUFFER_SLOT_NUM {
            let n = self.r / IOREQ_BUFFER_SLOT_NUM;
            self.r -= n * IOREQ_BUFFER_SLOT_NUM;
            self.w = self.w.wrapping_sub(n * IOREQ_BUFFER_SLOT_NUM);
        }
        Ok(())
    }
}

fn ring(b: &mut Bytes<'_>) {
    let r = b.u32();
    let w = match b.u8() {
        // Pending entries from 0 to 255: a plausible ring ...
        0..=0xe7 => r.wrapping_add(u32::from(b.u8())),
        // ... a write pointer just behind the read pointer (a peer that wrote garbage) ...
        k @ 0xe8..=0xef => r.wrapping_sub(u32::from(k & 7)),
        // ... or any write pointer at all.
        _ => b.u32(),
    };
    let mut slots = [0u64; 511];
    let n = usize::from(b.u8()) * 2;
    for s in slots.iter_mut().take(n) {
        *s = b.u64();
    }
    let page = Page::new(u64::from(r) | (u64::from(w) << 32), &slots);
    let mut model = Model { r, w, slots };
    let p = page.page();
    assert_eq!(p.pointers(), (r, w));
    assert_eq!(p.pending(), w.wrapping_sub(r));
    let mut ops = 0;
    let check_slots = |model: &Model, from: u32, n: u32| {
        for i in from..from.wrapping_add(n) {
            let i = i % IOREQ_BUFFER_SLOT_NUM;
            assert_eq!(page.slot(i), model.slots[i as usize], "slot {i}");
        }
    };
    while !b.is_empty() && ops < 64 {
        ops += 1;
        match b.u8() % 3 {
            0 => {
                let mut got = vec![];
                let res = p.drain(|req| {
                    assert!(
                        got.len() < 4096,
                        "drain delivers more than the ring can hold"
                    );
                    got.push(req);
                });
                let (want, want_res) = model.drain();
                assert_eq!(res, want_res, "drain result");
                assert_eq!(got, want, "drained entries");
                for req in &got {
                    assert_eq!((req.count, req.data_is_ptr), (1, false));
                    let _ = req.validate();
                }
            }
            1 => {
                let sel = b.u8();
                let ty = match sel & 7 {
                    0 | 1 => IoreqType::Pio,
                    2..=4 => IoreqType::Copy,
                    5 => IoreqType::TimeOffset,
                    6 => IoreqType::PciConfig,
                    _ => IoreqType::Invalidate,
                };
                let dir = if sel & 0x80 != 0 {
                    Dir::Read
                } else {
                    Dir::Write
                };
                let mut req = Ioreq::new(ty, dir, u64::from(b.u32() >> (b.u8() & 31)), 1, 0);
                req.size = crate::size_from(b.u8());
                req.data = b.u64();
                if sel & 0x40 != 0 {
                    req.count = u32::from(b.u8());
                }
                req.data_is_ptr = sel & 0x20 != 0 && sel & 0x10 != 0;
                let mode = match b.u8() % 4 {
                    0 => BufioreqMode::Off,
                    1 => BufioreqMode::Legacy,
                    _ => BufioreqMode::Atomic,
                };
                let w = model.w;
                let got = p.push(&req, mode);
                let want = model.push(&req, mode);
                assert_eq!(got, want, "push of {req:?} in {mode:?}");
                check_slots(&model, w, 2);
            }
            _ => {
                assert_eq!(p.pending(), model.w.wrapping_sub(model.r));
            }
        }
        assert_eq!(page.ptrs(), (model.r, model.w), "pointers");
        assert_eq!(
            p.pointers(),
            (model.r, model.w),
            "pointers as the page reports them"
        );
    }
    check_slots(&model, 0, IOREQ_BUFFER_SLOT_NUM);
}
