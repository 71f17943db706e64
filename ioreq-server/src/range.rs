//! What a server claims: an inclusive range of ports, MMIO addresses or PCI SBDFs, or a PCI
//! function by its position behind bridges.

use crate::abi;
use serde::{Deserialize, Serialize};
use std::fmt;

/// `XEN_DMOP_IO_RANGE_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RangeKind {
    Port,
    Mmio,
    Pci,
}

impl RangeKind {
    /// The DMOP `type` value.
    pub fn dmop_type(self) -> u32 {
        match self {
            RangeKind::Port => abi::XEN_DMOP_IO_RANGE_PORT,
            RangeKind::Mmio => abi::XEN_DMOP_IO_RANGE_MEMORY,
            RangeKind::Pci => abi::XEN_DMOP_IO_RANGE_PCI,
        }
    }

    /// Index 0..3, for per-kind arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    pub const ALL: [RangeKind; 3] = [RangeKind::Port, RangeKind::Mmio, RangeKind::Pci];
}

/// An inclusive range of one kind, as in `xen_dm_op_ioreq_server_range` (start and end both
/// inclusive). PCI ranges are over 32-bit SBDFs packed as `XEN_DMOP_PCI_SBDF`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IoRange {
    pub kind: RangeKind,
    pub start: u64,
    pub end: u64,
}

impl IoRange {
    pub fn new(kind: RangeKind, start: u64, end: u64) -> Self {
        IoRange { kind, start, end }
    }

    pub fn ports(start: u16, end: u16) -> Self {
        Self::new(RangeKind::Port, start.into(), end.into())
    }

    pub fn mmio(start: u64, len: u64) -> Self {
        Self::new(RangeKind::Mmio, start, start + len.max(1) - 1)
    }

    pub fn pci(sbdf: u32) -> Self {
        Self::new(RangeKind::Pci, sbdf.into(), sbdf.into())
    }

    pub fn contains(&self, start: u64, end: u64) -> bool {
        self.start <= start && end <= self.end
    }

    pub fn overlaps(&self, other: &IoRange) -> bool {
        self.kind == other.kind && self.start <= other.end && other.start <= self.end
    }

    pub fn is_valid(&self) -> bool {
        self.start <= self.end
            && match self.kind {
                RangeKind::Port => self.end <= 0xffff,
                RangeKind::Pci => self.end <= u64::from(u32::MAX),
                RangeKind::Mmio => true,
            }
    }
}

impl fmt::Display for IoRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RangeKind::Port => write!(f, "ports {:#x}-{:#x}", self.start, self.end),
            RangeKind::Mmio => write!(f, "mmio {:#x}-{:#x}", self.start, self.end),
            RangeKind::Pci => {
                let s = |v: u64| {
                    let (seg, bus, dev, func) = crate::abi::unpack_sbdf(v as u32);
                    format!("{seg:04x}:{bus:02x}:{dev:02x}.{func}")
                };
                if self.start == self.end {
                    write!(f, "pci {}", s(self.start))
                } else {
                    write!(f, "pci {}-{}", s(self.start), s(self.end))
                }
            }
        }
    }
}

/// A PCI function named by where it sits: start on `root_bus` of `segment`, follow each
/// bridge (device/function on the current bus, whose secondary bus is the next bus), and end
/// at the last device/function. Resolves to a BDF once firmware has numbered the bridges,
/// and follows the function when buses are renumbered.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub segment: u16,
    pub root_bus: u8,
    /// devfn (device << 3 | function) at each hop; the last entry is the function itself.
    pub path: Vec<u8>,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}", self.segment, self.root_bus)?;
        for (i, devfn) in self.path.iter().enumerate() {
            let sep = if i == 0 { ':' } else { '/' };
            write!(f, "{sep}{:02x}.{}", devfn >> 3, devfn & 7)?;
        }
        Ok(())
    }
}

/// One claim a device model makes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Claim {
    Range(IoRange),
    Position(Position),
}

impl Claim {
    /// Whether two claims ask for something in common as written: overlapping ranges of one
    /// kind, or the same position (a position meets a BDF only once firmware numbered the
    /// buses).
    pub fn overlaps(&self, other: &Claim) -> bool {
        match (self, other) {
            (Claim::Range(a), Claim::Range(b)) => a.overlaps(b),
            (Claim::Position(a), Claim::Position(b)) => a == b,
            _ => false,
        }
    }
}

impl fmt::Display for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claim::Range(r) => r.fmt(f),
            Claim::Position(p) => write!(f, "pci position {p}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_forms() {
        assert_eq!(
            IoRange::ports(0x600, 0x67f).to_string(),
            "ports 0x600-0x67f"
        );
        assert_eq!(
            IoRange::mmio(0xb000_0000, 0x1000_0000).to_string(),
            "mmio 0xb0000000-0xbfffffff"
        );
        assert_eq!(
            IoRange::pci(abi::pack_sbdf(0, 2, 0, 0)).to_string(),
            "pci 0000:02:00.0"
        );
        let p = Position {
            segment: 0,
            root_bus: 0,
            path: vec![2 << 3 | 2, 0, 1 << 3],
        };
        assert_eq!(p.to_string(), "0000:00:02.2/00.0/01.0");
    }

    #[test]
    fn validity_and_overlap() {
        assert!(!IoRange::new(RangeKind::Port, 0xff00, 0x1_0000).is_valid());
        assert!(!IoRange::new(RangeKind::Mmio, 5, 4).is_valid());
        let a = IoRange::ports(0x10, 0x1f);
        assert!(a.overlaps(&IoRange::ports(0x1f, 0x20)));
        assert!(!a.overlaps(&IoRange::ports(0x20, 0x20)));
        assert!(!a.overlaps(&IoRange::new(RangeKind::Mmio, 0x10, 0x1f)));
        assert!(a.contains(0x10, 0x1f) && !a.contains(0x10, 0x20));
    }
}
