//! Xen's ioreq model and the seams of the multiplexer.
//!
//! [`abi`] and [`Ioreq`] are the 32-byte request with Xen's semantics, [`slot`] its per-vCPU
//! state machine and [`bufioreq`] the buffered ring. [`Backend`] is the hypervisor side (real
//! Xen in `xen-ffi`, or [`sim::SimHypervisor`]); [`DeviceModel`] is what every backing ioreq
//! server implements, in process or out of process.

pub mod abi;
pub mod bufioreq;
pub mod ioreq;
pub mod model;
pub mod oop;
pub mod pci;
pub mod range;
pub mod sim;
pub mod slot;

pub use ioreq::{Dir, Ioreq, IoreqError, IoreqState, IoreqType, size_mask};
pub use model::{
    Backend, BackendError, BackendEvent, ClaimError, DeviceModel, DmControl, DmError, MsiError,
};
pub use range::{Claim, IoRange, Position, RangeKind};
