//! ECAM (MMCONFIG) windows and the decode of an MMIO access inside one; the CF8 latch of
//! configuration mechanism #1.
//!
//! An ECAM address, relative to the window's bus-0 base (PCIe base spec 4.0, 7.2.2,
//! table 7-1):
//!
//! | bits  | field    |
//! |-------|----------|
//! | 27:20 | bus      |
//! | 19:15 | device   |
//! | 14:12 | function |
//! | 11:0  | register |

use crate::address::{ConfigAccess, ConfigPath, Sbdf};
use ioreq_server::abi::{self, CF8_ENABLE, PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_DATA_PORT};
use ioreq_server::{Dir, Ioreq};
use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// Bit position of the bus number in an ECAM offset.
pub const ECAM_BUS_SHIFT: u32 = 20;
/// Bit position of devfn (device 19:15, function 14:12).
pub const ECAM_DEVFN_SHIFT: u32 = 12;
/// Bytes of ECAM space per bus (1 MiB).
pub const ECAM_BUS_SIZE: u64 = 1 << ECAM_BUS_SHIFT;

/// One ECAM window: buses `start_bus..=end_bus` of `segment`, the first of them at `base`.
///
/// (`base` here is the address of `start_bus`; ACPI's MCFG gives the address bus 0 would
/// have, which is `base - start_bus * 1 MiB`.)
///
/// Deserializing checks the window as [`EcamWindow::new`] does (a configuration file's window
/// is refused with the reason, not installed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "WindowFields")]
pub struct EcamWindow {
    pub segment: u16,
    pub base: u64,
    pub start_bus: u8,
    pub end_bus: u8,
}

/// The fields of a window as written, before they are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowFields {
    #[serde(default)]
    segment: u16,
    base: u64,
    #[serde(default)]
    start_bus: u8,
    end_bus: u8,
}

impl TryFrom<WindowFields> for EcamWindow {
    type Error = WindowError;
    fn try_from(f: WindowFields) -> Result<Self, WindowError> {
        EcamWindow::new(f.segment, f.base, f.start_bus, f.end_bus)
    }
}

/// A window that cannot exist.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WindowError {
    #[error("bus range {start:#x}-{end:#x} is empty")]
    EmptyBusRange { start: u8, end: u8 },
    #[error("window base {0:#x} is not 1 MiB aligned")]
    Unaligned(u64),
    #[error("window at {base:#x} of {size:#x} bytes wraps the address space")]
    Wraps { base: u64, size: u64 },
}

impl EcamWindow {
    pub fn new(segment: u16, base: u64, start_bus: u8, end_bus: u8) -> Result<Self, WindowError> {
        if end_bus < start_bus {
            return Err(WindowError::EmptyBusRange {
                start: start_bus,
                end: end_bus,
            });
        }
        if base % ECAM_BUS_SIZE != 0 {
            return Err(WindowError::Unaligned(base));
        }
        let w = EcamWindow {
            segment,
            base,
            start_bus,
            end_bus,
        };
        if base.checked_add(w.size()).is_none() {
            return Err(WindowError::Wraps {
                base,
                size: w.size(),
            });
        }
        Ok(w)
    }

    /// Buses in the window.
    pub fn buses(&self) -> u32 {
        u32::from(self.end_bus) - u32::from(self.start_bus) + 1
    }

    /// Bytes covered.
    pub fn size(&self) -> u64 {
        u64::from(self.buses()) << ECAM_BUS_SHIFT
    }

    /// Last byte covered (inclusive).
    pub fn last(&self) -> u64 {
        self.base + self.size() - 1
    }

    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.base && gpa <= self.last()
    }

    pub fn overlaps(&self, base: u64, last: u64) -> bool {
        self.base <= last && base <= self.last()
    }

    /// The function and register an address inside the window names.
    pub fn decode(&self, gpa: u64) -> Option<(Sbdf, u16)> {
        if !self.contains(gpa) {
            return None;
        }
        let off = gpa - self.base;
        let bus = u64::from(self.start_bus) + (off >> ECAM_BUS_SHIFT);
        let devfn = ((off >> ECAM_DEVFN_SHIFT) & 0xff) as u8;
        let reg = (off & 0xfff) as u16;
        Some((Sbdf::from_devfn(self.segment, bus as u8, devfn), reg))
    }

    /// The address of a function's register in this window, if the bus is in range.
    pub fn address_of(&self, sbdf: Sbdf, reg: u16) -> Option<u64> {
        if sbdf.segment != self.segment || sbdf.bus < self.start_bus || sbdf.bus > self.end_bus {
            return None;
        }
        Some(
            self.base
                + (u64::from(sbdf.bus - self.start_bus) << ECAM_BUS_SHIFT)
                + (u64::from(sbdf.devfn()) << ECAM_DEVFN_SHIFT)
                + u64::from(reg & 0xfff),
        )
    }
}

impl fmt::Display for EcamWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "segment {:04x} buses {:02x}-{:02x} at {:#x}-{:#x} ({} MiB)",
            self.segment,
            self.start_bus,
            self.end_bus,
            self.base,
            self.last(),
            self.size() >> 20
        )
    }
}

/// Why an MMIO access inside an ECAM window is not a configuration access. Each gets
/// master-abort semantics: a read returns all ones, a write is dropped; the router counts
/// it and emits a trace event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error, Serialize)]
pub enum EcamReject {
    #[error("rep ECAM access (count {0})")]
    Rep(u32),
    #[error("ECAM access through a guest buffer (data_is_ptr)")]
    Pointer,
    #[error("ECAM access of {0} bytes (only 1, 2, 4 and 8)")]
    Size(u32),
    #[error("ECAM access of {size} bytes at {addr:#x} is not naturally aligned")]
    Unaligned { addr: u64, size: u32 },
}

/// One or two configuration accesses an ECAM MMIO access becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EcamAccess {
    /// The access, or the low half of an 8-byte access.
    pub first: ConfigAccess,
    /// The high half (register + 4) of an 8-byte access.
    pub second: Option<ConfigAccess>,
}

impl EcamAccess {
    /// Splits the data of a write between the halves.
    pub fn split_data(&self, data: u64) -> (u64, u64) {
        if self.second.is_some() {
            (data & 0xffff_ffff, data >> 32)
        } else {
            (data, 0)
        }
    }

    /// Joins the values read from the halves.
    pub fn join_data(&self, first: u64, second: u64) -> u64 {
        if self.second.is_some() {
            (first & 0xffff_ffff) | (second << 32)
        } else {
            first
        }
    }
}

/// Decodes an MMIO ioreq inside `window`. 1/2/4-byte naturally aligned accesses become one
/// configuration access, 8-byte naturally aligned ones two 4-byte accesses (register and
/// register + 4 of the same function). Everything else is an [`EcamReject`].
pub fn decode_ecam(window: &EcamWindow, req: &Ioreq) -> Result<EcamAccess, EcamReject> {
    if req.count != 1 {
        return Err(EcamReject::Rep(req.count));
    }
    if req.data_is_ptr {
        return Err(EcamReject::Pointer);
    }
    if !matches!(req.size, 1 | 2 | 4 | 8) {
        return Err(EcamReject::Size(req.size));
    }
    if req.addr % u64::from(req.size) != 0 {
        return Err(EcamReject::Unaligned {
            addr: req.addr,
            size: req.size,
        });
    }
    let (sbdf, reg) = window.decode(req.addr).ok_or(EcamReject::Unaligned {
        addr: req.addr,
        size: req.size,
    })?;
    let mk = |reg: u16, size: u8| ConfigAccess {
        sbdf,
        reg,
        size,
        path: ConfigPath::Ecam,
    };
    if req.size == 8 {
        Ok(EcamAccess {
            first: mk(reg, 4),
            second: Some(mk(reg + 4, 4)),
        })
    } else {
        Ok(EcamAccess {
            first: mk(reg, req.size as u8),
            second: None,
        })
    }
}

/// The CF8 address latch of configuration mechanism #1, for a multiplexer that receives raw
/// port accesses to 0xcf8..0xcff (Xen converts CFC accesses itself; see
/// [`ioreq_server::abi::cf8_decode`], whose rules this follows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cf8Latch {
    pub value: u32,
}

impl Cf8Latch {
    /// Is this port access one the latch handles (CF8 itself)?
    pub fn is_address_port(port: u64, size: u32) -> bool {
        port == u64::from(PCI_CONFIG_ADDRESS_PORT) && size == 4
    }

    /// Latches a 4-byte write to CF8.
    pub fn write(&mut self, data: u64) {
        self.value = data as u32;
    }

    /// Decodes a CFC..CFF access against the latch.
    pub fn decode(&self, port: u64, size: u32, dir: Dir) -> Option<ConfigAccess> {
        let _ = dir;
        if !(u64::from(PCI_CONFIG_DATA_PORT)..u64::from(PCI_CONFIG_DATA_PORT) + 4).contains(&port) {
            return None;
        }
        let (sbdf, reg) = abi::cf8_decode(self.value, port as u16, size)?;
        Some(ConfigAccess {
            sbdf: Sbdf::from_xen(sbdf),
            reg: reg as u16,
            size: size as u8,
            path: ConfigPath::Cf8,
        })
    }

    pub fn enabled(&self) -> bool {
        self.value & CF8_ENABLE != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ioreq_server::IoreqType;
    use proptest::prelude::*;

    fn q35() -> EcamWindow {
        EcamWindow::new(0, 0xb000_0000, 0, 0xff).unwrap()
    }

    fn mmio(addr: u64, size: u32) -> Ioreq {
        Ioreq::new(IoreqType::Copy, Dir::Read, addr, size, 0)
    }

    #[test]
    fn decode_bit_layout() {
        let w = q35();
        // bus 7, device 0x1f, function 5, register 0x104
        let a = 0xb000_0000 + (7 << 20) + (0x1f << 15) + (5 << 12) + 0x104;
        assert_eq!(
            w.decode(a),
            Some((Sbdf::new(0, 7, 0x1f, 5).unwrap(), 0x104))
        );
        assert_eq!(
            w.address_of(Sbdf::new(0, 7, 0x1f, 5).unwrap(), 0x104),
            Some(a)
        );
        assert_eq!(w.decode(0xc000_0000), None);
        assert_eq!(w.decode(0xafff_ffff), None);
    }

    #[test]
    fn window_with_start_bus() {
        let w = EcamWindow::new(3, 0xe000_0000, 0x40, 0x7f).unwrap();
        assert_eq!(w.size(), 64 << 20);
        assert_eq!(
            w.decode(0xe000_0000),
            Some((Sbdf::new(3, 0x40, 0, 0).unwrap(), 0))
        );
        assert_eq!(w.address_of(Sbdf::new(3, 0x3f, 0, 0).unwrap(), 0), None);
        assert_eq!(w.address_of(Sbdf::new(0, 0x40, 0, 0).unwrap(), 0), None);
    }

    #[test]
    fn window_errors() {
        assert!(matches!(
            EcamWindow::new(0, 0, 5, 4),
            Err(WindowError::EmptyBusRange { .. })
        ));
        assert_eq!(
            EcamWindow::new(0, 0x1234, 0, 0),
            Err(WindowError::Unaligned(0x1234))
        );
        assert!(matches!(
            EcamWindow::new(0, u64::MAX - 0xfffff, 0, 1),
            Err(WindowError::Wraps { .. })
        ));
    }

    #[test]
    fn rejects() {
        let w = q35();
        let mut r = mmio(0xb000_0001, 3);
        assert_eq!(decode_ecam(&w, &r), Err(EcamReject::Size(3)));
        r.size = 2;
        assert!(matches!(
            decode_ecam(&w, &r),
            Err(EcamReject::Unaligned { .. })
        ));
        r.addr = 0xb000_0004;
        r.size = 8;
        assert!(matches!(
            decode_ecam(&w, &r),
            Err(EcamReject::Unaligned { .. })
        ));
        r = mmio(0xb000_0000, 4);
        r.count = 2;
        assert_eq!(decode_ecam(&w, &r), Err(EcamReject::Rep(2)));
        r.count = 1;
        r.data_is_ptr = true;
        assert_eq!(decode_ecam(&w, &r), Err(EcamReject::Pointer));
    }

    #[test]
    fn eight_bytes_become_two_dwords() {
        let w = q35();
        let d = decode_ecam(&w, &mmio(0xb010_0ff8, 8)).unwrap();
        assert_eq!(d.first.reg, 0xff8);
        assert_eq!(d.first.size, 4);
        assert_eq!(d.second.unwrap().reg, 0xffc);
        assert_eq!(d.first.sbdf, Sbdf::new(0, 1, 0, 0).unwrap());
        assert_eq!(
            d.split_data(0x1122_3344_5566_7788),
            (0x5566_7788, 0x1122_3344)
        );
        assert_eq!(d.join_data(0x5566_7788, 0x1122_3344), 0x1122_3344_5566_7788);
    }

    #[test]
    fn cf8_latch() {
        let mut l = Cf8Latch::default();
        assert!(l.decode(0xcfc, 4, Dir::Read).is_none());
        l.write(0x8000_fa44);
        let a = l.decode(0xcfd, 1, Dir::Read).unwrap();
        assert_eq!(a.sbdf, Sbdf::new(0, 0, 0x1f, 2).unwrap());
        assert_eq!(a.reg, 0x45);
        assert_eq!(a.path, ConfigPath::Cf8);
        assert!(l.decode(0xcf8, 4, Dir::Read).is_none());
    }

    proptest! {
        /// Every naturally aligned 1/2/4-byte access inside the window decodes to the function
        /// and register whose address it is.
        #[test]
        fn decode_inverts_address_of(bus in 0u8..=255, devfn in 0u8..=255, reg in 0u16..0x1000, size_log in 0u32..3) {
            let w = q35();
            let size = 1u32 << size_log;
            let reg = reg & !(size as u16 - 1);
            let sbdf = Sbdf::from_devfn(0, bus, devfn);
            let a = w.address_of(sbdf, reg).unwrap();
            let d = decode_ecam(&w, &mmio(a, size)).unwrap();
            prop_assert_eq!(d.first.sbdf, sbdf);
            prop_assert_eq!(d.first.reg, reg);
            prop_assert_eq!(u32::from(d.first.size), size);
            prop_assert!(d.second.is_none());
        }

        /// Any access at all decodes or is rejected, never panics, and a decoded access never
        /// leaves its function's 4 KiB.
        #[test]
        fn any_access_is_defined(off in 0u64..(256 << 20), size in 0u32..16, count in 0u32..4, ptr in any::<bool>()) {
            let w = q35();
            let mut r = mmio(w.base + off, size);
            r.count = count;
            r.data_is_ptr = ptr;
            if let Ok(d) = decode_ecam(&w, &r) {
                let end = d.second.unwrap_or(d.first);
                prop_assert!(u32::from(end.reg) + u32::from(end.size) <= 0x1000);
            }
        }
    }
}
