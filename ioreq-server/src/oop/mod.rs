//! Device models in their own processes: the multiplexer's device-model protocol.
//!
//! A device model written against [`crate::DeviceModel`] runs unchanged in the
//! multiplexer's process or in its own: [`client::serve`] connects it to the multiplexer's
//! control socket, and on the multiplexer's side a [`remote::RemoteModel`] stands in for it.
//!
//! - [`wire`]: the control protocol (a Unix SOCK_SEQPACKET socket, one message per packet),
//!   mirroring the DMOPs a Xen device model uses;
//! - [`slots`] and [`shm`]: the request path, one sealed memfd per server holding Xen's
//!   buffered page and shared ioreq page, with eventfds for notification;
//! - [`notify`]: the third page of that memfd, which says when an eventfd need not be rung
//!   and when the control socket has a notice to read;
//! - [`remote`]: the multiplexer's proxy, a [`crate::DeviceModel`];
//! - [`spin`]: how long either side spins before it sleeps (adapting to the load);
//! - [`server`]: the multiplexer's listener, generic over a [`server::Host`] (the engine);
//! - [`client`]: the device-model side.
//!
//! `docs/dm-protocol.md` is the specification.

pub mod client;
pub mod notify;
pub mod remote;
pub mod server;
pub mod shm;
pub mod slots;
pub mod spin;
pub mod sys;
pub mod wire;

pub use client::{ClientError, ClientOptions, Ended, Stopper, serve, serve_with};
pub use remote::{RemoteModel, RemoteOptions, RemoteStats};
pub use server::{DmListener, DmopError, Host, ServerOptions, ServerStatus};
pub use spin::SpinMode;
