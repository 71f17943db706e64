//! Bindings to the Xen tools libraries an ioreq server needs, loaded at run time.
//!
//! - [`Libraries::load`] opens `libxendevicemodel.so.1`, `libxenforeignmemory.so.1` and
//!   `libxenevtchn.so.1` with `dlopen`, so one binary runs on hosts with and without Xen.
//! - [`DeviceModelHandle`], [`ForeignMemoryHandle`] (with its [`ResourceMapping`]s) and
//!   [`EventChannelHandle`] are RAII wrappers: each closes (or unmaps) on drop, and every
//!   failure is a [`XenError`], never a panic.
//! - [`IoreqPage`] and [`BufferedPageView`] read and write the shared ioreq pages with the
//!   volatile accesses, atomics and fences the protocol needs (see [`pages`]).
//! - `sys` (feature `bindgen` only) is the raw bindgen output.
//! - [`PciRangeDmOp`] makes the one DMOP libxendevicemodel lacks: claiming an SBDF range.
//!
//! Without the `bindgen` feature the crate builds with neither libclang nor the Xen headers,
//! keeps the same API, and [`Libraries::load`] returns [`XenError::NotBuilt`].
//!
//! The workspace denies `unsafe` (`unsafe_code = "deny"` in Cargo.toml) except in three
//! places that allow it by name: this crate (the calls into Xen's libraries), the preload
//! library beside it (`xen-ffi/preload`: the C symbols QEMU calls, and their mappings), and
//! the shared pages of the device-model protocol (`ioreq-server/src/oop/shm.rs`). Every
//! `unsafe` block carries a `SAFETY:` comment.
#![allow(unsafe_code)]

pub mod abi;
pub mod dmop;
mod error;
mod handles;
pub mod pages;

#[cfg(feature = "bindgen")]
pub mod sys;

#[cfg_attr(feature = "bindgen", path = "backend_xen.rs")]
#[cfg_attr(not(feature = "bindgen"), path = "backend_stub.rs")]
mod backend;

#[cfg(all(test, feature = "bindgen"))]
mod layout_tests;

pub use dmop::PciRangeDmOp;
pub use error::XenError;
pub use handles::{
    DeviceModelHandle, EventChannelHandle, ForeignMemoryHandle, Libraries, PRIVCMD_PATH,
    ResourceMapping, SONAME_DEVICEMODEL, SONAME_EVTCHN, SONAME_FOREIGNMEMORY, check_privcmd,
};
pub use pages::{BufferedPageView, IoreqPage, PageBuf};

/// Whether this build has Xen bindings (the `bindgen` feature).
pub const XEN_SUPPORT: bool = cfg!(feature = "bindgen");
