//! Event-channel port numbers the preload makes up, and the queue of ports waiting to be
//! returned by `xenevtchn_pending`. Pure bookkeeping, no system calls.
//!
//! Both kinds of number lie far above any real event-channel port: Xen's FIFO ABI has at
//! most 2^17 ports per domain (`EVTCHN_FIFO_NR_CHANNELS`, `xen/event_channel.h`) and the
//! 2-level ABI 4096 on 64-bit guests, so a number the preload makes up can never be mistaken
//! for a real port of the guest (remote) or of one of QEMU's handles (local). Both stay below
//! 2^31 because `xenevtchn_pending` returns a port as a C `int`.

use std::collections::{BTreeSet, VecDeque};

/// First fake remote port: vCPU *i*'s port is `FAKE_REMOTE_BASE + i`. This is what the
/// preload writes into `vp_eport` of slot *i* before QEMU reads it to bind.
pub const FAKE_REMOTE_BASE: u32 = 0x7e00_0000;
/// The fake remote port of the buffered ring (what `get_ioreq_server_info` returns as
/// `bufioreq_port`).
pub const FAKE_REMOTE_BUFFERED: u32 = FAKE_REMOTE_BASE + 0xffff;
/// First fake local port handed out by `xenevtchn_bind_interdomain`.
pub const FAKE_LOCAL_BASE: u32 = 0x0100_0000;
/// Fake local ports per handle (far more than 128 vCPUs and a ring need).
pub const FAKE_LOCAL_COUNT: u32 = 0x1_0000;

// Xen's FIFO ABI allows 2^17 ports: every made-up number lies above the real ones, fits a
// C `int`, and local and remote numbers are apart (a log line is never ambiguous).
const _: () = assert!(FAKE_LOCAL_BASE >= 1 << 17 && FAKE_REMOTE_BASE >= 1 << 17);
const _: () = assert!(FAKE_REMOTE_BUFFERED <= i32::MAX as u32);
const _: () = assert!(FAKE_LOCAL_BASE + FAKE_LOCAL_COUNT <= FAKE_REMOTE_BASE);
// 128 vCPUs (Xen's HVM_MAX_VCPUS, one page of slots) stay below the buffered port.
const _: () = assert!(FAKE_REMOTE_BASE + 128 < FAKE_REMOTE_BUFFERED);

/// The ioreq server's event channels the preload stands in for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FakePort {
    /// vCPU *i*'s channel: the multiplexer rings vCPU *i*'s request eventfd; a notify
    /// answers slot *i*.
    Vcpu(u32),
    /// The buffered ring's channel.
    Buffered,
}

/// The fake remote port of vCPU `i`.
pub const fn vcpu_remote_port(i: u32) -> u32 {
    FAKE_REMOTE_BASE + i
}

/// Which fake channel `remote` names for a server with `nr_vcpus` vCPUs, if any.
pub fn classify_remote(remote: u32, nr_vcpus: u32) -> Option<FakePort> {
    if remote == FAKE_REMOTE_BUFFERED {
        return Some(FakePort::Buffered);
    }
    let i = remote.checked_sub(FAKE_REMOTE_BASE)?;
    (i < nr_vcpus).then_some(FakePort::Vcpu(i))
}

/// Local port numbers of one handle: unique within the handle (and never a real port).
#[derive(Debug, Default)]
pub struct LocalPorts {
    used: BTreeSet<u32>,
}

impl LocalPorts {
    /// The lowest free number, now taken; `None` when all [`FAKE_LOCAL_COUNT`] are in use.
    pub fn alloc(&mut self) -> Option<u32> {
        // Numbers are taken in order and rarely given back: while they are contiguous the
        // next one is one past the last; otherwise look for the first gap.
        let candidate = match self.used.last() {
            None => FAKE_LOCAL_BASE,
            Some(&last) if (last - FAKE_LOCAL_BASE) as usize + 1 == self.used.len() => last + 1,
            Some(_) => {
                let mut c = FAKE_LOCAL_BASE;
                for &u in &self.used {
                    if u != c {
                        break;
                    }
                    c += 1;
                }
                c
            }
        };
        if candidate >= FAKE_LOCAL_BASE + FAKE_LOCAL_COUNT {
            return None;
        }
        self.used.insert(candidate);
        Some(candidate)
    }

    /// Gives a number back; false if it was not taken.
    pub fn free(&mut self, port: u32) -> bool {
        self.used.remove(&port)
    }
}

/// Ports that fired and were not yet returned by `pending`, oldest first, each at most once
/// (a channel that fires again before it is taken is still one event, as with Xen's
/// pending bit).
#[derive(Debug, Default)]
pub struct PendingQueue {
    order: VecDeque<u32>,
}

impl PendingQueue {
    /// Queues `port` unless it is queued already. Returns whether it was added.
    pub fn push(&mut self, port: u32) -> bool {
        if self.order.contains(&port) {
            return false;
        }
        self.order.push_back(port);
        true
    }

    pub fn pop(&mut self) -> Option<u32> {
        self.order.pop_front()
    }

    /// Forgets `port` (it was unbound).
    pub fn remove(&mut self, port: u32) {
        self.order.retain(|&p| p != port);
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_ports_classify_by_vcpu_count() {
        assert_eq!(
            classify_remote(vcpu_remote_port(0), 2),
            Some(FakePort::Vcpu(0))
        );
        assert_eq!(
            classify_remote(vcpu_remote_port(1), 2),
            Some(FakePort::Vcpu(1))
        );
        assert_eq!(classify_remote(vcpu_remote_port(2), 2), None);
        assert_eq!(
            classify_remote(FAKE_REMOTE_BUFFERED, 2),
            Some(FakePort::Buffered)
        );
        assert_eq!(classify_remote(5, 2), None);
        assert_eq!(classify_remote(FAKE_REMOTE_BASE - 1, 2), None);
        // 128 vCPUs stay below the buffered port.
        assert!(vcpu_remote_port(127) < FAKE_REMOTE_BUFFERED);
    }

    #[test]
    fn local_ports_are_unique_and_reused_after_free() {
        let mut l = LocalPorts::default();
        let a = l.alloc().unwrap();
        let b = l.alloc().unwrap();
        let c = l.alloc().unwrap();
        assert_eq!(
            (a, b, c),
            (FAKE_LOCAL_BASE, FAKE_LOCAL_BASE + 1, FAKE_LOCAL_BASE + 2)
        );
        assert!(l.free(b));
        assert!(!l.free(b), "freeing twice is refused");
        assert_eq!(l.alloc(), Some(b), "the lowest free number comes back");
        assert_eq!(l.alloc(), Some(FAKE_LOCAL_BASE + 3));
        // Two handles number independently.
        let mut other = LocalPorts::default();
        assert_eq!(other.alloc(), Some(FAKE_LOCAL_BASE));
    }

    #[test]
    fn local_ports_run_out() {
        let mut l = LocalPorts::default();
        for _ in 0..FAKE_LOCAL_COUNT {
            assert!(l.alloc().is_some());
        }
        assert_eq!(l.alloc(), None);
        assert!(l.free(FAKE_LOCAL_BASE + 7));
        assert_eq!(l.alloc(), Some(FAKE_LOCAL_BASE + 7));
    }

    #[test]
    fn pending_queue_keeps_order_and_each_port_once() {
        let mut q = PendingQueue::default();
        assert!(q.push(10));
        assert!(q.push(11));
        assert!(!q.push(10), "already queued");
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop(), Some(10));
        assert!(q.push(10), "taken, so it may fire again");
        q.remove(11);
        assert_eq!(q.pop(), Some(10));
        assert_eq!(q.pop(), None);
        assert!(q.is_empty());
    }
}
