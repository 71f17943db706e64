//! Decodes configuration accesses (ECAM and CF8/CFC) and finds the server that owns each
//! function, port and MMIO range.
//!
//! Any number of segments and buses: every segment has its own flat owner table and its own
//! ECAM windows, and bridges are followed as the guest numbers and renumbers them, so a
//! device claimed by its position behind bridges is found wherever firmware puts it.

pub mod address;
pub mod bridges;
pub mod ecam;
pub mod router;
pub mod tables;

pub use address::{AddressError, ConfigAccess, ConfigPath, Sbdf, ShortSbdf};
pub use bridges::{BridgeInfo, BusNumbers};
pub use ecam::{Cf8Latch, EcamAccess, EcamReject, EcamWindow, WindowError, decode_ecam};
pub use router::{Moved, PositionClaim, Router, RouterStats};
pub use tables::{BdfTable, McfgLayout, RangeMap, ServerIdx};
