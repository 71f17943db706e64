//! Chipset detection: read vendor/device IDs of the well-known functions through the model
//! that owns them.

use crate::registers::*;
use bdf_router::Sbdf;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The emulated chipset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Chipset {
    /// MCH 8086:29c0 at 00:00.0 and ICH9 LPC 8086:2918 at 00:1f.0.
    Q35,
    /// i440FX 8086:1237 at 00:00.0 and PIIX3 8086:7000 at 00:01.0 (PIIX4 PM 8086:7113 at
    /// 00:01.3 when present).
    I440fx,
    /// Anything else: the multiplexer runs as a plain router.
    Unknown,
}

impl fmt::Display for Chipset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Chipset::Q35 => "Q35 (MCH + ICH9)",
            Chipset::I440fx => "i440FX (PIIX)",
            Chipset::Unknown => "unknown",
        })
    }
}

/// The function at segment 0, bus 0 and `devfn`.
pub fn bus0(devfn: u8) -> Sbdf {
    Sbdf::from_devfn(0, 0, devfn)
}

/// Identifies the chipset. `read_id` returns the dword at register 0 (vendor in 15:0,
/// device in 31:16) of a function, or all ones when nobody answers.
pub fn detect(read_id: &mut dyn FnMut(Sbdf) -> u32) -> Chipset {
    let id = |v: u32| ((v & 0xffff) as u16, (v >> 16) as u16);
    let host = id(read_id(bus0(0)));
    match host {
        (PCI_VENDOR_INTEL, Q35_MCH_DEVICE_ID) => {
            if id(read_id(bus0(ICH9_LPC_DEVFN))) == (PCI_VENDOR_INTEL, ICH9_LPC_DEVICE_ID) {
                Chipset::Q35
            } else {
                Chipset::Unknown
            }
        }
        (PCI_VENDOR_INTEL, I440FX_DEVICE_ID) => {
            if id(read_id(bus0(PIIX_ISA_DEVFN))) == (PCI_VENDOR_INTEL, PIIX3_ISA_DEVICE_ID) {
                Chipset::I440fx
            } else {
                Chipset::Unknown
            }
        }
        _ => Chipset::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(map: &[(u8, u32)]) -> impl FnMut(Sbdf) -> u32 + '_ {
        move |s| {
            map.iter()
                .find(|(d, _)| bus0(*d) == s)
                .map(|(_, v)| *v)
                .unwrap_or(u32::MAX)
        }
    }

    #[test]
    fn q35() {
        let m = [(0, 0x29c0_8086), (0xf8, 0x2918_8086)];
        assert_eq!(detect(&mut ids(&m)), Chipset::Q35);
    }

    #[test]
    fn i440fx() {
        let m = [(0, 0x1237_8086), (0x08, 0x7000_8086), (0x0b, 0x7113_8086)];
        assert_eq!(detect(&mut ids(&m)), Chipset::I440fx);
    }

    #[test]
    fn unknown_when_half_matches_or_nothing_answers() {
        assert_eq!(detect(&mut ids(&[(0, 0x29c0_8086)])), Chipset::Unknown);
        assert_eq!(detect(&mut ids(&[])), Chipset::Unknown);
        assert_eq!(detect(&mut ids(&[(0, 0x0001_1af4)])), Chipset::Unknown);
    }
}
