//! The ioreq-mux engine and the pieces of its command-line tool.
//!
//! The engine takes ioreqs from a [`ioreq_server::Backend`], runs the chipset intercepts, routes
//! each access with [`bdf_router`] and hands it to the owning [`ioreq_server::DeviceModel`].

pub mod acpi;
pub mod bench;
pub mod config;
pub mod diagnostic;
pub mod dm;
pub mod dm_socket;
pub mod engine;
pub mod inspect;
pub mod logging;
pub mod manual;
pub mod models;
pub mod out;
pub mod qemu_import;
pub mod replay;
pub mod replay_dm;
pub mod serve;
pub mod trace;
#[cfg(feature = "xen")]
pub mod xen_backend;
