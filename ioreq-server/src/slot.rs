//! The per-vCPU slot state machine: NONE -> READY -> INPROCESS -> IORESP_READY -> NONE.
//!
//! Who may move a slot, from Xen 4.17's `ioreq_send` and `wait_for_io` (xen/common/ioreq.c):
//!
//! | from         | to           | by          | when                                   |
//! |--------------|--------------|-------------|----------------------------------------|
//! | NONE         | READY        | hypervisor  | a vCPU's access is sent to the server  |
//! | READY        | INPROCESS    | server      | the server takes the request           |
//! | INPROCESS    | IORESP_READY | server      | the answer is written                  |
//! | IORESP_READY | NONE         | hypervisor  | the vCPU collects the answer           |
//!
//! Anything else is what Xen treats as fatal ("bad IO state" on send, a state that goes
//! backwards in `wait_for_io` crashes the domain). Here it is an error returned to the caller,
//! never repaired silently.

use crate::ioreq::IoreqState;
use std::sync::atomic::{AtomicU8, Ordering};
use thiserror::Error;

/// Which side asks for a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    Hypervisor,
    Server,
}

/// A transition Xen would reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{actor:?} may not move an ioreq slot from {from:?} to {to:?}")]
pub struct SlotError {
    pub actor: Actor,
    pub from: IoreqState,
    pub to: IoreqState,
}

/// The transition table above. Returns `Ok(())` only for the four legal moves.
pub fn check_transition(actor: Actor, from: IoreqState, to: IoreqState) -> Result<(), SlotError> {
    use IoreqState::*;
    let legal = matches!(
        (actor, from, to),
        (Actor::Hypervisor, None, Ready)
            | (Actor::Server, Ready, InProcess)
            | (Actor::Server, InProcess, RespReady)
            | (Actor::Hypervisor, RespReady, None)
    );
    if legal {
        Ok(())
    } else {
        Err(SlotError { actor, from, to })
    }
}

/// One vCPU's slot with its state enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    state: IoreqState,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            state: IoreqState::None,
        }
    }
}

impl Slot {
    pub fn state(&self) -> IoreqState {
        self.state
    }

    /// Moves the slot, or reports why not (the slot is unchanged on error).
    pub fn advance(&mut self, actor: Actor, to: IoreqState) -> Result<(), SlotError> {
        check_transition(actor, self.state, to)?;
        self.state = to;
        Ok(())
    }
}

/// A slot shared by the hypervisor and a server without a lock, as in Xen's shared ioreq page.
///
/// Every state has exactly one actor that may leave it (the table above: the hypervisor leaves
/// NONE and IORESP_READY, the server READY and INPROCESS), and each side drives a slot from one
/// thread at a time (a vCPU is one thread; a server's backend is used through `&mut`). So a
/// transition is what Xen does on the shared page: read the state (acquire), check the move
/// against the table, write the new state (release) -- no read-modify-write. What the mover
/// wrote to the slot before the release store is visible to whoever reads the new state.
#[derive(Debug)]
pub struct AtomicSlot {
    state: AtomicU8,
}

impl Default for AtomicSlot {
    fn default() -> Self {
        AtomicSlot {
            state: AtomicU8::new(IoreqState::None as u8),
        }
    }
}

impl AtomicSlot {
    pub fn state(&self) -> IoreqState {
        // Only the four states are ever stored.
        IoreqState::from_u8(self.state.load(Ordering::Acquire)).unwrap_or(IoreqState::None)
    }

    /// Would `actor` be allowed to move the slot to `to` now?
    pub fn check(&self, actor: Actor, to: IoreqState) -> Result<(), SlotError> {
        check_transition(actor, self.state(), to)
    }

    /// Moves the slot, or reports why not (the slot is unchanged on error).
    pub fn advance(&self, actor: Actor, to: IoreqState) -> Result<(), SlotError> {
        self.check(actor, to)?;
        self.state.store(to as u8, Ordering::Release);
        Ok(())
    }

    /// Back to NONE outside the state machine: only for a slot nobody uses (a new server).
    pub fn reset(&self) {
        self.state.store(IoreqState::None as u8, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use IoreqState::*;

    const ALL: [IoreqState; 4] = [None, Ready, InProcess, RespReady];

    #[test]
    fn exactly_four_legal_moves() {
        let mut legal = vec![];
        for actor in [Actor::Hypervisor, Actor::Server] {
            for from in ALL {
                for to in ALL {
                    if check_transition(actor, from, to).is_ok() {
                        legal.push((actor, from, to));
                    }
                }
            }
        }
        assert_eq!(
            legal,
            vec![
                (Actor::Hypervisor, None, Ready),
                (Actor::Hypervisor, RespReady, None),
                (Actor::Server, Ready, InProcess),
                (Actor::Server, InProcess, RespReady),
            ]
        );
    }

    #[test]
    fn full_cycle_and_rejections() {
        let mut s = Slot::default();
        s.advance(Actor::Hypervisor, Ready).unwrap();
        // A server may not skip INPROCESS, and may not go backwards.
        assert_eq!(
            s.advance(Actor::Server, RespReady),
            Err(SlotError {
                actor: Actor::Server,
                from: Ready,
                to: RespReady
            })
        );
        s.advance(Actor::Server, InProcess).unwrap();
        assert!(s.advance(Actor::Server, Ready).is_err());
        assert_eq!(
            s.state(),
            InProcess,
            "a rejected move leaves the slot alone"
        );
        s.advance(Actor::Server, RespReady).unwrap();
        // Completing twice is an error.
        assert!(s.advance(Actor::Server, RespReady).is_err());
        s.advance(Actor::Hypervisor, None).unwrap();
        assert_eq!(s.state(), None);
    }

    #[test]
    fn atomic_slot_follows_the_same_table() {
        let s = AtomicSlot::default();
        assert_eq!(s.state(), None);
        assert!(s.advance(Actor::Server, InProcess).is_err());
        s.advance(Actor::Hypervisor, Ready).unwrap();
        assert!(s.advance(Actor::Hypervisor, None).is_err());
        s.advance(Actor::Server, InProcess).unwrap();
        s.advance(Actor::Server, RespReady).unwrap();
        assert_eq!(
            s.advance(Actor::Server, RespReady),
            Err(SlotError {
                actor: Actor::Server,
                from: RespReady,
                to: RespReady
            })
        );
        assert_eq!(
            s.state(),
            RespReady,
            "a rejected move leaves the slot alone"
        );
        s.advance(Actor::Hypervisor, None).unwrap();
        s.advance(Actor::Hypervisor, Ready).unwrap();
        s.reset();
        assert_eq!(s.state(), None);
    }
}
