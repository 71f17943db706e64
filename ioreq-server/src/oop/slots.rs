//! One vCPU's slot of the shared ioreq page, accessed as four 64-bit atomic words so two
//! processes can share it: the byte image is exactly Xen's 32-byte `ioreq_t`
//! ([`crate::abi`]), little endian.
//!
//! | word | bytes  | contents                                                    |
//! |------|--------|-------------------------------------------------------------|
//! | 0    | 0..8   | `addr`                                                      |
//! | 1    | 8..16  | `data`                                                      |
//! | 2    | 16..24 | `count` (low half), `size` (high half)                      |
//! | 3    | 24..32 | `vp_eport` = sequence number, `_pad0`, flags (state...), `type` |
//!
//! Word 3 is the control word: the state lives in it, so each transition is one 64-bit
//! store (or compare-and-exchange) that also carries the sequence number. Protocol:
//!
//! 1. multiplexer (slot NONE): writes words 0..2, then word 3 with state READY and a new
//!    sequence number in `vp_eport` (release), then signals the vCPU's request eventfd;
//! 2. device model: reads word 3 (acquire); if READY, moves it to INPROCESS with a
//!    compare-and-exchange (same sequence), reads words 0..2, serves the request;
//! 3. device model: writes `data` (word 1), then word 3 with state IORESP_READY and the
//!    sequence number unchanged (release), then signals the response eventfd;
//! 4. multiplexer: reads word 3 (acquire); IORESP_READY with its sequence number means
//!    done: it reads `data` and stores word 3 with state NONE.
//!
//! A response carrying another sequence number, or a state that goes backwards, is a
//! protocol violation: the multiplexer drops the server. A request that exceeds its
//! deadline also drops the server, and a dropped server's memory is never reused, so a late
//! answer can never complete a later request.

use crate::abi::{self, RawIoreq};
use crate::ioreq::{Ioreq, IoreqState};
use std::sync::atomic::{AtomicU64, Ordering};

/// One `ioreq_t` in shared memory.
#[repr(C, align(8))]
#[derive(Debug, Default)]
pub struct SlotWords {
    w: [AtomicU64; 4],
}

const _: () = assert!(std::mem::size_of::<SlotWords>() == abi::IOREQ_SIZE);

/// Bit position of the state nibble in the control word (byte 30 of the slot).
const STATE_SHIFT: u32 = 48;

fn control_state(w3: u64) -> u8 {
    ((w3 >> STATE_SHIFT) as u8) & abi::FLAG_STATE_MASK
}

fn with_state(w3: u64, state: u8) -> u64 {
    (w3 & !(u64::from(abi::FLAG_STATE_MASK) << STATE_SHIFT)) | (u64::from(state) << STATE_SHIFT)
}

/// What the multiplexer finds when it looks at a slot it posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collect {
    /// READY or INPROCESS: not answered yet.
    Pending,
    /// Answered: the `data` word.
    Done(u64),
    /// Anything else: the state byte and sequence number found.
    Violation { state: u8, seq: u32 },
}

/// What a device model took from a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub seq: u32,
    /// The request, or why its image does not decode (it must still be completed).
    pub req: Result<Ioreq, abi::AbiError>,
}

impl SlotWords {
    fn load(&self, i: usize) -> u64 {
        u64::from_le(self.w[i].load(Ordering::Acquire))
    }

    fn store(&self, i: usize, v: u64) {
        self.w[i].store(v.to_le(), Ordering::Release);
    }

    fn cas(&self, i: usize, old: u64, new: u64) -> bool {
        self.w[i]
            .compare_exchange(
                old.to_le(),
                new.to_le(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// The whole 32-byte image as it is now (word 3 read first).
    pub fn snapshot(&self) -> RawIoreq {
        let w3 = self.load(3);
        let mut b = [0u8; abi::IOREQ_SIZE];
        for i in 0..3 {
            b[8 * i..8 * i + 8].copy_from_slice(&self.load(i).to_le_bytes());
        }
        b[24..32].copy_from_slice(&w3.to_le_bytes());
        RawIoreq::from_bytes(&b)
    }

    /// (sequence number, state nibble).
    pub fn control(&self) -> (u32, u8) {
        let w3 = self.load(3);
        (w3 as u32, control_state(w3))
    }

    /// Multiplexer: posts `req` as READY with sequence number `seq`. The slot must be NONE
    /// (the caller owns it); returns false, changing nothing, if it is not.
    pub fn post(&self, req: &Ioreq, seq: u32) -> bool {
        if control_state(self.load(3)) != abi::STATE_IOREQ_NONE {
            return false;
        }
        let mut r = *req;
        r.state = IoreqState::Ready;
        r.vp_eport = seq;
        let b = r.to_bytes();
        let word = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[8 * i..8 * i + 8]);
            u64::from_le_bytes(a)
        };
        for i in 0..3 {
            self.w[i].store(word(i).to_le(), Ordering::Relaxed);
        }
        self.store(3, word(3));
        true
    }

    /// Multiplexer: has the request with sequence number `seq` been answered? On `Done` the
    /// slot is back to NONE.
    pub fn collect(&self, seq: u32) -> Collect {
        let w3 = self.load(3);
        let (s, st) = (w3 as u32, control_state(w3));
        match st {
            abi::STATE_IOREQ_READY | abi::STATE_IOREQ_INPROCESS if s == seq => Collect::Pending,
            abi::STATE_IORESP_READY if s == seq => {
                let data = self.load(1);
                self.store(3, with_state(w3, abi::STATE_IOREQ_NONE));
                Collect::Done(data)
            }
            state => Collect::Violation { state, seq: s },
        }
    }

    /// Multiplexer: forgets whatever the slot holds (a new server's slots start NONE; used
    /// only on memory no device model can reach any more, or in tests).
    pub fn reset(&self) {
        for w in &self.w {
            w.store(0, Ordering::Release);
        }
    }

    /// Device model: takes a READY request (READY -> INPROCESS). `None` if the slot holds no
    /// new request.
    pub fn take(&self) -> Option<Taken> {
        let w3 = self.load(3);
        if control_state(w3) != abi::STATE_IOREQ_READY {
            return None;
        }
        if !self.cas(3, w3, with_state(w3, abi::STATE_IOREQ_INPROCESS)) {
            return None;
        }
        let mut raw = self.snapshot();
        raw.flags = (raw.flags & !abi::FLAG_STATE_MASK) | abi::STATE_IOREQ_INPROCESS;
        Some(Taken {
            seq: w3 as u32,
            req: Ioreq::from_raw(&raw),
        })
    }

    /// Device model: answers request `seq` (INPROCESS -> IORESP_READY) with `data` (the
    /// value for a read; the written value is left alone for a write). Returns false if the
    /// slot no longer holds that request in INPROCESS.
    pub fn complete(&self, seq: u32, data: Option<u64>) -> bool {
        let w3 = self.load(3);
        if w3 as u32 != seq || control_state(w3) != abi::STATE_IOREQ_INPROCESS {
            return false;
        }
        if let Some(d) = data {
            self.w[1].store(d.to_le(), Ordering::Relaxed);
        }
        self.cas(3, w3, with_state(w3, abi::STATE_IORESP_READY))
    }

    /// Test hook: overwrite the control word's state and sequence (what a broken device
    /// model might do).
    pub fn force_control(&self, seq: u32, state: u8) {
        let w3 = self.load(3);
        let w3 = (w3 & !0xffff_ffff) | u64::from(seq);
        self.store(3, with_state(w3, state));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ioreq::{Dir, IoreqType};

    #[test]
    fn full_cycle_with_sequence() {
        let s = SlotWords::default();
        let req = Ioreq::pci_config(0x28, 0x10, Dir::Read, 4, 0);
        assert!(s.post(&req, 7));
        assert!(!s.post(&req, 8), "a busy slot cannot be posted again");
        let raw = s.snapshot();
        assert_eq!(raw.vp_eport, 7);
        assert_eq!(raw.state(), abi::STATE_IOREQ_READY);
        assert_eq!(raw.addr, req.addr);
        assert_eq!(s.collect(7), Collect::Pending);
        let t = s.take().unwrap();
        assert_eq!(t.seq, 7);
        let got = t.req.unwrap();
        assert_eq!(got.addr, req.addr);
        assert_eq!(got.state, IoreqState::InProcess);
        assert!(s.take().is_none(), "taken once");
        assert!(!s.complete(6, Some(1)), "wrong sequence");
        assert_eq!(s.collect(7), Collect::Pending);
        assert!(s.complete(7, Some(0xfeed)));
        assert!(!s.complete(7, Some(0xbad)), "completed once");
        assert_eq!(s.collect(7), Collect::Done(0xfeed));
        assert_eq!(s.control(), (7, abi::STATE_IOREQ_NONE));
        // The image is Xen's byte layout.
        let w = Ioreq::new(IoreqType::Copy, Dir::Write, 0xfe00_0004, 2, 0xabcd);
        assert!(s.post(&w, 8));
        let mut want = w;
        want.vp_eport = 8;
        assert_eq!(s.snapshot(), want.to_raw());
    }

    #[test]
    fn stale_or_backwards_answers_are_violations() {
        let s = SlotWords::default();
        let req = Ioreq::new(IoreqType::Pio, Dir::Read, 0x60, 1, 0);
        assert!(s.post(&req, 3));
        s.force_control(2, abi::STATE_IORESP_READY);
        assert_eq!(
            s.collect(3),
            Collect::Violation {
                state: abi::STATE_IORESP_READY,
                seq: 2
            }
        );
        s.force_control(3, abi::STATE_IOREQ_NONE);
        assert_eq!(s.collect(3), Collect::Violation { state: 0, seq: 3 });
        s.force_control(3, 9);
        assert_eq!(s.collect(3), Collect::Violation { state: 9, seq: 3 });
    }
}
