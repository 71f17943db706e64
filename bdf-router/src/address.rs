//! Typed PCI addresses: a function ([`Sbdf`]) and a register in its configuration space.
//!
//! The packed form is Xen's `XEN_DMOP_PCI_SBDF` (public/hvm/dm_op.h):
//!
//! | bits  | field    |
//! |-------|----------|
//! | 31:16 | segment  |
//! | 15:8  | bus      |
//! | 7:3   | device   |
//! | 2:0   | function |
//!
//! The text form is `SSSS:BB:DD.F` (segment optional: `BB:DD.F` means segment 0), in hex, as
//! `lspci -D` prints it. [`Sbdf::short`] prints `BB:DD.F` for segment 0, as `lspci` without
//! `-D` does; both forms parse back.

use ioreq_server::abi;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// Devices per bus (PCI Local Bus spec 3.0, 3.2.2.3.1: 5-bit device number).
pub const DEVICES_PER_BUS: u8 = 32;
/// Functions per device (3-bit function number).
pub const FUNCTIONS_PER_DEVICE: u8 = 8;
/// Size of a function's configuration space: 4 KiB for PCI Express (PCIe base spec 4.0,
/// 7.2.2), of which the first 256 bytes are the conventional space reachable through CF8/CFC.
pub const CONFIG_SPACE_SIZE: u16 = 0x1000;
/// End of the conventional (CF8/CFC-reachable) configuration space.
pub const LEGACY_CONFIG_SPACE_SIZE: u16 = 0x100;

/// A PCI function: segment, bus, device, function.
///
/// ```
/// use bdf_router::Sbdf;
/// let a: Sbdf = "0000:02:00.1".parse().unwrap();
/// assert_eq!(a, Sbdf::new(0, 2, 0, 1).unwrap());
/// assert_eq!(a.to_string(), "0000:02:00.1");
/// assert_eq!(a.to_xen(), 0x0000_0201);
/// let short: Sbdf = "1f:1f.7".parse().unwrap();
/// assert_eq!(short, Sbdf::from_xen(0x1fff));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Sbdf {
    pub segment: u16,
    pub bus: u8,
    /// 0..32
    pub device: u8,
    /// 0..8
    pub function: u8,
}

/// Why a text or number is not a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    #[error("device {0:#x} is out of range (0 to 0x1f)")]
    DeviceOutOfRange(u32),
    #[error("function {0} is out of range (0 to 7)")]
    FunctionOutOfRange(u32),
    #[error("'{0}' has no '.' before the function")]
    MissingFunction(String),
    #[error("'{0}' is not BB:DD.F or SSSS:BB:DD.F")]
    WrongFieldCount(String),
    #[error("'{text}': {field} '{value}' is not a hex number that fits {bits} bits")]
    BadNumber {
        text: String,
        field: &'static str,
        value: String,
        bits: u32,
    },
    #[error("register {0:#x} is beyond the 4 KiB configuration space")]
    RegisterOutOfRange(u32),
}

impl Sbdf {
    /// Checks the device and function ranges.
    pub fn new(segment: u16, bus: u8, device: u8, function: u8) -> Result<Self, AddressError> {
        if device >= DEVICES_PER_BUS {
            return Err(AddressError::DeviceOutOfRange(device.into()));
        }
        if function >= FUNCTIONS_PER_DEVICE {
            return Err(AddressError::FunctionOutOfRange(function.into()));
        }
        Ok(Sbdf {
            segment,
            bus,
            device,
            function,
        })
    }

    /// From segment, bus and a devfn byte (device << 3 | function).
    pub const fn from_devfn(segment: u16, bus: u8, devfn: u8) -> Self {
        Sbdf {
            segment,
            bus,
            device: devfn >> 3,
            function: devfn & 7,
        }
    }

    /// From Xen's packed form ([`abi::unpack_sbdf`]). Every u32 is a valid SBDF.
    pub const fn from_xen(v: u32) -> Self {
        let (segment, bus, device, function) = abi::unpack_sbdf(v);
        Sbdf {
            segment,
            bus,
            device,
            function,
        }
    }

    /// Xen's packed form (`XEN_DMOP_PCI_SBDF`, [`abi::pack_sbdf`]).
    pub const fn to_xen(self) -> u32 {
        abi::pack_sbdf(self.segment, self.bus, self.device, self.function)
    }

    /// device << 3 | function.
    pub const fn devfn(self) -> u8 {
        (self.device << 3) | self.function
    }

    /// bus << 8 | devfn: the index of this function within its segment.
    pub const fn bdf(self) -> u16 {
        ((self.bus as u16) << 8) | self.devfn() as u16
    }

    /// Whether `device` and `function` are in range ([`Sbdf::new`] and the parsers check
    /// this; a struct literal may not).
    pub const fn is_valid(self) -> bool {
        self.device < DEVICES_PER_BUS && self.function < FUNCTIONS_PER_DEVICE
    }

    /// The short text form: `BB:DD.F` in segment 0, the full `SSSS:BB:DD.F` elsewhere (the
    /// segment is left out only where it says nothing). This is how the trace tools print a
    /// function (replay reports and divergences, import warnings), since a QEMU trace only
    /// knows segment 0; it parses back to the same `Sbdf`.
    ///
    /// ```
    /// use bdf_router::Sbdf;
    /// assert_eq!(Sbdf::new(0, 5, 0, 0).unwrap().short().to_string(), "05:00.0");
    /// assert_eq!(Sbdf::new(1, 5, 0, 0).unwrap().short().to_string(), "0001:05:00.0");
    /// ```
    pub const fn short(self) -> ShortSbdf {
        ShortSbdf(self)
    }
}

/// [`Sbdf::short`]: displays `BB:DD.F` when the segment is 0, `SSSS:BB:DD.F` otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShortSbdf(pub Sbdf);

impl fmt::Display for ShortSbdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s.segment != 0 {
            return s.fmt(f);
        }
        write!(f, "{:02x}:{:02x}.{}", s.bus, s.device, s.function)
    }
}

impl fmt::Display for Sbdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.segment, self.bus, self.device, self.function
        )
    }
}

fn hex_field(text: &str, field: &'static str, value: &str, bits: u32) -> Result<u32, AddressError> {
    let bad = || AddressError::BadNumber {
        text: text.to_string(),
        field,
        value: value.to_string(),
        bits,
    };
    if value.is_empty() || value.len() > bits.div_ceil(4) as usize {
        return Err(bad());
    }
    let v = u32::from_str_radix(value, 16).map_err(|_| bad())?;
    if bits < 32 && v >> bits != 0 {
        return Err(bad());
    }
    Ok(v)
}

impl FromStr for Sbdf {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (head, func) = s
            .rsplit_once('.')
            .ok_or_else(|| AddressError::MissingFunction(s.to_string()))?;
        let parts: Vec<&str> = head.split(':').collect();
        let (seg, bus, dev) = match parts.as_slice() {
            [b, d] => ("0", *b, *d),
            [sg, b, d] => (*sg, *b, *d),
            _ => return Err(AddressError::WrongFieldCount(s.to_string())),
        };
        let segment = hex_field(s, "segment", seg, 16)? as u16;
        let bus = hex_field(s, "bus", bus, 8)? as u8;
        let device = hex_field(s, "device", dev, 8)?;
        if device >= u32::from(DEVICES_PER_BUS) {
            return Err(AddressError::DeviceOutOfRange(device));
        }
        let function = hex_field(s, "function", func, 4)?;
        if function >= u32::from(FUNCTIONS_PER_DEVICE) {
            return Err(AddressError::FunctionOutOfRange(function));
        }
        Ok(Sbdf {
            segment,
            bus,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl Serialize for Sbdf {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sbdf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which way a configuration access reached the multiplexer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigPath {
    /// Port 0xcf8/0xcfc mechanism #1 (or Xen's PCI_CONFIG conversion of it).
    Cf8,
    /// Memory-mapped ECAM (MMCONFIG) window.
    Ecam,
}

impl fmt::Display for ConfigPath {
    /// `cf8` or `ecam`, as the serde form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigPath::Cf8 => "cf8",
            ConfigPath::Ecam => "ecam",
        })
    }
}

/// One configuration access to one function: register `reg`, `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConfigAccess {
    pub sbdf: Sbdf,
    /// 0..0x1000
    pub reg: u16,
    /// 1, 2 or 4
    pub size: u8,
    pub path: ConfigPath,
}

impl ConfigAccess {
    /// Checks the register against the 4 KiB space.
    pub fn new(sbdf: Sbdf, reg: u32, size: u8, path: ConfigPath) -> Result<Self, AddressError> {
        if reg + u32::from(size) > u32::from(CONFIG_SPACE_SIZE) {
            return Err(AddressError::RegisterOutOfRange(reg));
        }
        Ok(ConfigAccess {
            sbdf,
            reg: reg as u16,
            size,
            path,
        })
    }

    /// Does this access touch any byte of `[reg, reg + len)`?
    pub fn overlaps(&self, reg: u16, len: u16) -> bool {
        self.reg < reg + len && reg < self.reg + u16::from(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_forms() {
        assert_eq!(
            "00:1f.3".parse::<Sbdf>().unwrap(),
            Sbdf::new(0, 0, 0x1f, 3).unwrap()
        );
        assert_eq!(
            "ffff:ff:1f.7".parse::<Sbdf>().unwrap(),
            Sbdf::from_xen(u32::MAX)
        );
    }

    #[test]
    fn error_device_out_of_range() {
        assert_eq!(
            "00:20.0".parse::<Sbdf>(),
            Err(AddressError::DeviceOutOfRange(0x20))
        );
        assert_eq!(
            Sbdf::new(0, 0, 32, 0),
            Err(AddressError::DeviceOutOfRange(32))
        );
    }

    #[test]
    fn error_function_out_of_range() {
        assert_eq!(
            "00:01.8".parse::<Sbdf>(),
            Err(AddressError::FunctionOutOfRange(8))
        );
        assert_eq!(
            Sbdf::new(0, 0, 1, 9),
            Err(AddressError::FunctionOutOfRange(9))
        );
    }

    #[test]
    fn error_missing_function() {
        assert!(matches!(
            "00:01".parse::<Sbdf>(),
            Err(AddressError::MissingFunction(_))
        ));
    }

    #[test]
    fn error_wrong_field_count() {
        assert!(matches!(
            "0:0:0:01.0".parse::<Sbdf>(),
            Err(AddressError::WrongFieldCount(_))
        ));
        assert!(matches!(
            "01.0".parse::<Sbdf>(),
            Err(AddressError::WrongFieldCount(_))
        ));
    }

    #[test]
    fn error_bad_number() {
        for bad in [
            "0g:00.0",
            "100:00.0",
            "10000:00:00.0",
            ":00.0",
            "00:00.x",
            "00:00.10",
        ] {
            assert!(
                matches!(bad.parse::<Sbdf>(), Err(AddressError::BadNumber { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn error_register_out_of_range() {
        let s = Sbdf::default();
        assert_eq!(
            ConfigAccess::new(s, 0xffe, 4, ConfigPath::Ecam),
            Err(AddressError::RegisterOutOfRange(0xffe))
        );
        assert!(ConfigAccess::new(s, 0xffc, 4, ConfigPath::Ecam).is_ok());
    }

    #[test]
    fn config_path_text_is_its_serde_form() {
        for p in [ConfigPath::Cf8, ConfigPath::Ecam] {
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
    }

    #[test]
    fn is_valid_catches_struct_literals() {
        let mut s = Sbdf::default();
        assert!(s.is_valid());
        s.device = 32;
        assert!(!s.is_valid());
        s.device = 0;
        s.function = 8;
        assert!(!s.is_valid());
    }

    #[test]
    fn serde_as_text() {
        let s = Sbdf::new(1, 2, 3, 4).unwrap();
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, "\"0001:02:03.4\"");
        assert_eq!(serde_json::from_str::<Sbdf>(&j).unwrap(), s);
        assert!(serde_json::from_str::<Sbdf>("\"00:99.0\"").is_err());
    }

    proptest! {
        #[test]
        fn xen_and_text_roundtrip(v in any::<u32>()) {
            let s = Sbdf::from_xen(v);
            prop_assert_eq!(s.to_xen(), v);
            prop_assert_eq!(s.to_string().parse::<Sbdf>().unwrap(), s);
            prop_assert_eq!(Sbdf::from_devfn(s.segment, s.bus, s.devfn()), s);
            prop_assert_eq!(s.short().to_string().parse::<Sbdf>().unwrap(), s);
            prop_assert!(s.is_valid());
        }

        #[test]
        fn short_form_leaves_out_segment_0_only(v in any::<u32>()) {
            let s = Sbdf::from_xen(v);
            let short = s.short().to_string();
            if s.segment == 0 {
                prop_assert_eq!(format!("0000:{short}"), s.to_string());
            } else {
                prop_assert_eq!(short, s.to_string());
            }
        }

        #[test]
        fn parsing_never_panics(t in "\\PC{0,16}") {
            let _ = t.parse::<Sbdf>();
        }
    }
}
