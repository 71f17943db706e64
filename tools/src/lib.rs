//! The `ioreq-mux` command-line tool: the commands (serve, replay, import-qemu-trace, inspect,
//! bench, dm, acpi-tables) over the library crates, which it re-exports under short names.
//!
//! The data flow, crate by crate: the hypervisor's requests come from a backend
//! ([`xen_backend`] on Xen, `ioreq_server::sim` in replay), go through the [`engine`] (chipset
//! intercepts, then the router) to the owning device model ([`models`], a process speaking the
//! device-model protocol, or QEMU) and back. The [`config`] file says who owns what; the
//! [`trace`] format and the [`qemu_import`]er feed replay.
pub mod acpi;
pub mod bench;
pub use ioreq_mux_config as config;
pub use ioreq_mux_config::{diagnostic, dm_socket};
pub mod dm;
pub use ioreq_mux_engine as engine;
pub mod inspect;
pub mod logging;
pub mod manual;
pub use ioreq_mux_models as models;
pub mod out;
pub mod qemu_import;
pub mod replay;
pub mod replay_dm;
pub mod serve;
pub use ioreq_mux_trace as trace;
#[cfg(feature = "xen")]
pub use xen_backend;
