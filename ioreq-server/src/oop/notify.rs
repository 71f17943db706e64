//! The notification page (protocol version 2): the third page of a server's shared memory,
//! where each side says whether the other must ring its eventfds, and the multiplexer counts
//! the notices it has put on the control socket. It takes the system calls off the request
//! path of two processes that busy-poll: an eventfd write costs a system call (~300 ns on the
//! machine in `docs/performance.md`) and wakes nobody when the other side is spinning anyway,
//! and a device model need not call `recvmsg` before each request to learn that no notice
//! is queued.
//!
//! | offset          | written by   | contents                                               |
//! |-----------------|--------------|--------------------------------------------------------|
//! | 0               | multiplexer  | `notices`: bumped after each notice it sends, and when it closes the connection |
//! | 64              | device model | `dm_polling`: non-zero while the model polls the slots and the buffered ring |
//! | 128 + 8 *i*     | multiplexer  | `mux_polling[i]`: non-zero while the multiplexer polls slot *i* for its answer |
//! | everything else | nobody       | reserved, 0                                            |
//!
//! Every field is a 64-bit word accessed atomically, in native byte order (both processes
//! share the machine); only zero versus non-zero, or a change, means anything. The words
//! each side writes are on cache lines of their own, so a flag that does not change costs
//! its reader a cache hit.
//!
//! # Doorbell suppression without lost wake-ups
//!
//! Two roles, each side playing both: a *waiter* (the device model waiting for requests, the
//! multiplexer waiting for an answer) and a *notifier* (the multiplexer posting a request or
//! queueing a buffered write, the device model answering a slot).
//!
//! - Notifier: publish the work (the slot's control word, or the ring's write pointer), then
//!   a sequentially consistent fence, then load the waiter's flag; ring the eventfd unless the
//!   flag is non-zero ([`NotifyPage::dm_is_polling`], [`NotifyPage::mux_is_polling`]).
//! - Waiter: set its flag whenever it likes (before polling). Before it sleeps on the eventfd,
//!   it stores 0 to its flag, then a sequentially consistent fence
//!   ([`NotifyPage::clear_dm_polling`], [`NotifyPage::clear_mux_polling`]), then looks for
//!   work once more, and sleeps only if it finds none.
//!
//! Why a wake-up cannot be lost: suppose the waiter sleeps although work W was published and
//! the notifier did not ring. The waiter's last look before sleeping (after its fence F_w)
//! missed W, and the notifier's load of the flag (after its fence F_n) saw non-zero. The two
//! fences are sequentially consistent, so one precedes the other in their single total order:
//! - F_n before F_w: W is stored before F_n, the waiter's look is after F_w, so the look sees
//!   W (or a later value of the same word, which only the waiter itself writes next, after
//!   taking W): it did not miss W. Contradiction.
//! - F_w before F_n: the waiter's store of 0 is before F_w, the notifier's load after F_n, so
//!   the load sees that 0 or a later store to the flag. Later stores are the waiter's own,
//!   made only after it woke up again, so this sleep is not the one that lost W; a waiter that
//!   then polls sees W by coherence, and one that sleeps again does so after another
//!   clear-fence-look, to which the same argument applies. Contradiction.
//!
//! (This is the store-buffering litmus test, which C11/C++11/Rust forbid with
//! `SeqCst` fences on both sides; on x86-64 the fence is an `mfence`, on AArch64 a `dmb ish`.)
//! An eventfd keeps its count until it is read, so a ring that lands before the waiter's
//! `poll` still wakes it; the waiter reads the eventfd before it looks at the slots, and the
//! eventfd's own lock orders that read after the ring, which the notifier made after
//! publishing.
//!
//! Setting a flag needs no fence: a stale zero only makes the notifier ring when it need not.
//! A waiter may leave its flag set while it is busy (serving a request, or between two
//! requests): it looks at the slots again before it ever sleeps, which is all the flag
//! promises. A peer that breaks these rules only delays its own requests: the multiplexer
//! reads `dm_polling` only to decide whether to ring, and its deadline still applies.
//!
//! # Notices
//!
//! The multiplexer sends a notice (POSITION_MOVED, GOODBYE) on the socket, then bumps
//! `notices` with a release add ([`NotifyPage::notice_sent`]). A device model compares the
//! counter (acquire load) with the value it saw last and reads its socket only when it
//! changed. The send completes before the bump, and the device model's `recvmsg` follows its
//! acquire load, so a notice whose bump it has seen is already queued: it is never missed.
//! POSITION_MOVED is sent before the request that depends on it is posted, so a device model
//! that took the request (an acquire on the slot's control word) sees the bump. A device
//! model that sleeps polls the socket descriptor as well, since a connection can also end
//! without a notice (the multiplexer's process dies).

use crate::abi::SHARED_PAGE_SLOTS;
use std::sync::atomic::{AtomicU64, Ordering, fence};

/// Offset of `notices` in the page.
pub const NOTICES_OFFSET: usize = 0;
/// Offset of `dm_polling` in the page.
pub const DM_POLLING_OFFSET: usize = 64;
/// Offset of `mux_polling[0]` in the page (vCPU *i* at `+ 8 * i`).
pub const MUX_POLLING_OFFSET: usize = 128;

/// The notification page as it lies in shared memory (the first 1152 bytes of the page; the
/// rest is reserved).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct NotifyPage {
    notices: AtomicU64,
    _mux_line: [AtomicU64; 7],
    dm_polling: AtomicU64,
    _dm_line: [AtomicU64; 7],
    mux_polling: [AtomicU64; SHARED_PAGE_SLOTS],
}

const _: () = assert!(std::mem::offset_of!(NotifyPage, notices) == NOTICES_OFFSET);
const _: () = assert!(std::mem::offset_of!(NotifyPage, dm_polling) == DM_POLLING_OFFSET);
const _: () = assert!(std::mem::offset_of!(NotifyPage, mux_polling) == MUX_POLLING_OFFSET);
const _: () = assert!(std::mem::size_of::<NotifyPage>() == MUX_POLLING_OFFSET + 8 * 128);

impl Default for NotifyPage {
    fn default() -> Self {
        NotifyPage {
            notices: AtomicU64::new(0),
            _mux_line: Default::default(),
            dm_polling: AtomicU64::new(0),
            _dm_line: Default::default(),
            mux_polling: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Stores 1 unless the flag is set already (so a flag that stays set is never written, and
/// its reader's copy of the line stays valid).
fn set(flag: &AtomicU64) {
    if flag.load(Ordering::Relaxed) == 0 {
        flag.store(1, Ordering::Relaxed);
    }
}

/// The waiter's half of the protocol: the flag reads 0, then the fence.
fn clear(flag: &AtomicU64) {
    if flag.load(Ordering::Relaxed) != 0 {
        flag.store(0, Ordering::Relaxed);
    }
    fence(Ordering::SeqCst);
}

/// The notifier's half: the fence, then the flag.
fn is_set(flag: &AtomicU64) -> bool {
    fence(Ordering::SeqCst);
    flag.load(Ordering::Relaxed) != 0
}

impl NotifyPage {
    /// Device model: the notice counter (acquire: the notices it counts are queued).
    pub fn notices(&self) -> u64 {
        self.notices.load(Ordering::Acquire)
    }

    /// Multiplexer: a notice was sent (call after the send), or the connection was closed.
    pub fn notice_sent(&self) {
        self.notices.fetch_add(1, Ordering::Release);
    }

    /// Device model: "I am polling the slots and the ring; no need to ring me".
    pub fn set_dm_polling(&self) {
        set(&self.dm_polling);
    }

    /// Device model, before it sleeps: clears its flag and fences. It must then look at the
    /// slots and the ring once more, and sleep only if it finds nothing.
    pub fn clear_dm_polling(&self) {
        clear(&self.dm_polling);
    }

    /// Multiplexer, after posting a request or queueing a buffered write: fences, then tells
    /// whether the device model is polling (if not, ring its eventfd).
    pub fn dm_is_polling(&self) -> bool {
        is_set(&self.dm_polling)
    }

    /// Multiplexer: "I am polling slot `vcpu` for the answer; no need to ring me". Ignored
    /// past the page's 128 slots.
    pub fn set_mux_polling(&self, vcpu: usize) {
        if let Some(f) = self.mux_polling.get(vcpu) {
            set(f);
        }
    }

    /// Multiplexer, before it sleeps waiting for slot `vcpu`: clears its flag and fences. It
    /// must then look at the slot once more, and sleep only if it is still unanswered.
    pub fn clear_mux_polling(&self, vcpu: usize) {
        if let Some(f) = self.mux_polling.get(vcpu) {
            clear(f);
        } else {
            fence(Ordering::SeqCst);
        }
    }

    /// Device model, after answering slot `vcpu`: fences, then tells whether the multiplexer
    /// is polling that slot (if not, ring the response eventfd). False past 128 slots.
    pub fn mux_is_polling(&self, vcpu: usize) -> bool {
        fence(Ordering::SeqCst);
        self.mux_polling
            .get(vcpu)
            .is_some_and(|f| f.load(Ordering::Relaxed) != 0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ioreq::{Dir, Ioreq};
    use crate::oop::slots::{Collect, SlotWords};
    use crate::oop::sys::{Doorbell, wait_readable};
    use std::os::fd::AsFd;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    #[test]
    fn flags_and_counter() {
        let p = NotifyPage::default();
        assert!(!p.dm_is_polling());
        p.set_dm_polling();
        p.set_dm_polling();
        assert!(p.dm_is_polling());
        p.clear_dm_polling();
        assert!(!p.dm_is_polling());
        p.set_mux_polling(3);
        assert!(p.mux_is_polling(3));
        assert!(!p.mux_is_polling(2), "per vCPU");
        p.clear_mux_polling(3);
        assert!(!p.mux_is_polling(3));
        p.set_mux_polling(128);
        p.clear_mux_polling(128);
        assert!(!p.mux_is_polling(128), "past the page: always ring");
        let n = p.notices();
        p.notice_sent();
        assert_eq!(p.notices(), n + 1);
    }

    /// A pseudo-random sequence (xorshift), so every run mixes the same way.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Longer than any wake-up takes: a waiter that sleeps this long with work pending was
    /// not rung, which is the failure this test looks for.
    const LOST: Duration = Duration::from_secs(2);

    /// The protocol of this module between two threads, one slot and real eventfds, for
    /// many round trips in which each side picks at random, for each wait, whether to spin
    /// (0, a few or many polls) before it sleeps, and the model sometimes dawdles before
    /// answering. Each sleep is bounded by [`LOST`]; a sleep that ends by timing out with the
    /// awaited state already there is a lost wake-up and fails the test.
    #[test]
    fn no_lost_wakeup_when_spinning_and_sleeping_mix() {
        const N: u32 = 20_000;
        let page = Arc::new(NotifyPage::default());
        let slot = Arc::new(SlotWords::default());
        let req_bell = Arc::new(Doorbell::new().unwrap());
        let resp_bell = Arc::new(Doorbell::new().unwrap());
        let failed = Arc::new(AtomicBool::new(false));
        let (p2, s2, rq2, rs2, f2) = (
            page.clone(),
            slot.clone(),
            req_bell.clone(),
            resp_bell.clone(),
            failed.clone(),
        );
        // The device model.
        let dm = std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let (mut skipped, mut rung) = (0u64, 0u64);
            let mut served = 0u32;
            while served < N && !f2.load(Ordering::Relaxed) {
                let polls = match rng.next() % 3 {
                    0 => 0,
                    1 => rng.next() % 64,
                    _ => 100_000,
                };
                let mut t = None;
                if polls > 0 {
                    p2.set_dm_polling();
                    for _ in 0..polls {
                        if let Some(x) = s2.take() {
                            t = Some(x);
                            break;
                        }
                        std::hint::spin_loop();
                    }
                }
                let t = match t {
                    Some(t) => t,
                    None => {
                        p2.clear_dm_polling();
                        match s2.take() {
                            Some(t) => t,
                            None => {
                                let r = wait_readable(&[rq2.as_fd()], Some(LOST)).unwrap();
                                if r[0].readable {
                                    rq2.clear().unwrap();
                                } else if s2.control().1 == crate::abi::STATE_IOREQ_READY {
                                    f2.store(true, Ordering::Relaxed);
                                    panic!("model: lost wake-up after {served} requests");
                                }
                                continue;
                            }
                        }
                    }
                };
                if rng.next() % 8 == 0 {
                    for _ in 0..rng.next() % 2000 {
                        std::hint::spin_loop();
                    }
                }
                assert!(s2.complete(t.seq, Some(u64::from(t.seq) * 3)));
                if p2.mux_is_polling(0) {
                    skipped += 1;
                } else {
                    rs2.ring().unwrap();
                    rung += 1;
                }
                served += 1;
            }
            (skipped, rung)
        });
        // The multiplexer.
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let (mut skipped, mut rung) = (0u64, 0u64);
        let req = Ioreq::pci_config(0x28, 0, Dir::Read, 4, 0);
        let started = Instant::now();
        for seq in 1..=N {
            assert!(slot.post(&req, seq));
            if page.dm_is_polling() {
                skipped += 1;
            } else {
                req_bell.ring().unwrap();
                rung += 1;
            }
            let polls = match rng.next() % 3 {
                0 => 0,
                1 => rng.next() % 64,
                _ => 100_000,
            };
            let mut done = None;
            if polls > 0 {
                page.set_mux_polling(0);
                for _ in 0..polls {
                    if let Collect::Done(d) = slot.collect(seq) {
                        done = Some(d);
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
            if done.is_none() {
                page.clear_mux_polling(0);
            }
            while done.is_none() {
                match slot.collect(seq) {
                    Collect::Done(d) => done = Some(d),
                    Collect::Pending => {
                        let r = wait_readable(&[resp_bell.as_fd()], Some(LOST)).unwrap();
                        if r[0].readable {
                            resp_bell.clear().unwrap();
                        } else if slot.control().1 == crate::abi::STATE_IORESP_READY {
                            failed.store(true, Ordering::Relaxed);
                            panic!("multiplexer: lost wake-up at request {seq}");
                        }
                        assert!(!failed.load(Ordering::Relaxed), "the model failed");
                    }
                    v => panic!("{v:?}"),
                }
            }
            assert_eq!(done, Some(u64::from(seq) * 3));
        }
        let (dm_skipped, dm_rung) = dm.join().unwrap();
        // Both paths were taken on both sides, or the test proved nothing.
        assert!(
            skipped > 0 && rung > 0,
            "mux skipped {skipped}, rang {rung}"
        );
        assert!(
            dm_skipped > 0 && dm_rung > 0,
            "model skipped {dm_skipped}, rang {dm_rung}"
        );
        eprintln!(
            "{N} round trips in {:?}: mux skipped {skipped} rang {rung}, model skipped {dm_skipped} rang {dm_rung}",
            started.elapsed()
        );
    }
}
