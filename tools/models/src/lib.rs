//! Built-in device models: emulated PCI functions (endpoints and bridges) with real
//! configuration-space semantics, BARs that claim their range when decoding is enabled, and
//! a simple register file behind each BAR.
//!
//! Header layouts are from the PCI Local Bus spec 3.0, 6.1-6.2 (type 0) and the PCI-to-PCI
//! Bridge Architecture spec 1.2, 3.2 (type 1); the PCI Express capability from the PCIe base
//! spec 4.0, 7.5.3; extended capabilities (7.6.3 header) from 7.9.3 (Device Serial Number)
//! and 7.8.4 (Advanced Error Reporting, module [`aer`]).
//!
//! A PCIe function's extended capability chain: DSN at 0x100, then AER at 0x140 (unless the
//! spec says `aer: false`), then the end of the chain; the rest of its 4 KiB reads 0. A
//! conventional function has 256 bytes: accesses past 0xff read all ones and writes are
//! dropped (the function does not claim them; what reaches it past 0xff is the engine's
//! decision, see `decode_ecam`).

pub mod aer;
pub mod port;

use ioreq_server::{
    Claim, DeviceModel, Dir, DmControl, DmError, IoRange, Ioreq, IoreqType, Position, RangeKind,
    abi, size_mask,
};

use aer::{
    AER_CAP_CONTROL, AER_CAP_CONTROL_DEFAULT, AER_CAP_CONTROL_WMASK, AER_CAP_FIRST_ERR_PTR_MASK,
    AER_CAP_VERSION, AER_COR_IMPLEMENTED, AER_COR_MASK, AER_COR_MASK_DEFAULT, AER_COR_STATUS,
    AER_HEADER_LOG, AER_ROOT_COMMAND, AER_ROOT_COMMAND_WMASK, AER_ROOT_STATUS, AER_ROOT_STATUS_W1C,
    AER_UNC_IMPLEMENTED, AER_UNC_MASK_DEFAULT, AER_UNC_SEVERITY_DEFAULT, AER_UNCOR_MASK,
    AER_UNCOR_SEVERITY, AER_UNCOR_STATUS, PCI_EXT_CAP_ID_AER,
};
pub use aer::{AER_HEADER_LOG_DWORDS, AerError, AerOutcome, ErrorMessage, NoAer};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

// The PCI and PCIe register facts, from their one place: offsets as array indices here.
pub use ioreq_server::pci::idx::*;
pub use ioreq_server::pci::{
    EXT_CAP_NEXT_SHIFT, EXT_CAP_VERSION_SHIFT, PCI_BASE_ADDRESS_IO_MASK, PCI_BASE_ADDRESS_MEM_MASK,
    PCI_BASE_ADDRESS_MEM_PREFETCH, PCI_BASE_ADDRESS_MEM_TYPE_64, PCI_BASE_ADDRESS_MEM_TYPE_MASK,
    PCI_BASE_ADDRESS_SPACE_IO, PCI_BRIDGE_NUM_BARS, PCI_CAP_ID_EXP, PCI_CLASS_MAX, PCI_COMMAND_IO,
    PCI_COMMAND_MEMORY, PCI_COMMAND_WMASK, PCI_EXP_DEVCTL_WMASK, PCI_EXP_FLAGS_SLOT,
    PCI_EXP_FLAGS_TYPE_MASK, PCI_EXP_FLAGS_TYPE_SHIFT, PCI_EXP_SLTCAP_HPC, PCI_EXP_TYPE_DOWNSTREAM,
    PCI_EXP_TYPE_ENDPOINT, PCI_EXP_TYPE_LEG_END, PCI_EXP_TYPE_PCI_BRIDGE, PCI_EXP_TYPE_PCIE_BRIDGE,
    PCI_EXP_TYPE_RC_EC, PCI_EXP_TYPE_RC_END, PCI_EXP_TYPE_ROOT_PORT, PCI_EXP_TYPE_UPSTREAM,
    PCI_EXT_CAP_ID_DSN, PCI_HEADER_TYPE_MULTIFUNCTION, PCI_IO_BAR_MAX, PCI_IO_RANGE_MASK,
    PCI_IO_RANGE_SHIFT, PCI_IO_RANGE_TYPE_32, PCI_IO_WINDOW_GRANULE, PCI_MEM32_BAR_MAX,
    PCI_MEMORY_RANGE_MASK, PCI_MEMORY_RANGE_SHIFT, PCI_MEMORY_WINDOW_GRANULE, PCI_NUM_BARS,
    PCI_PREF_RANGE_TYPE_64, PCI_RANGE_TYPE_MASK, PCI_ROM_ADDRESS_ENABLE, PCI_ROM_ADDRESS_MASK,
    PCI_STATUS_CAP_LIST,
};
/// Where the built-in models put the PCIe capability and the first extended capability.
pub const PCIE_CAP_OFFSET: usize = 0x40;
pub const EXT_CAP_OFFSET: usize = 0x100;
/// The Device Serial Number capability: first in the chain (7.9.3), 12 bytes.
pub const DSN_OFFSET: usize = EXT_CAP_OFFSET;
pub const DSN_SIZE: usize = 0x0c;
/// The AER capability (7.8.4), after DSN.
pub const AER_OFFSET: usize = 0x140;
/// DSN capability version (7.9.3.1).
pub const DSN_CAP_VERSION: u32 = 1;
/// Size of the PCI Express capability structure (version 2).
pub const PCIE_CAP_SIZE: usize = 0x3c;

/// An extended capability header dword.
pub fn ext_cap_header(id: u16, version: u32, next: usize) -> u32 {
    u32::from(id) | (version << EXT_CAP_VERSION_SHIFT) | ((next as u32) << EXT_CAP_NEXT_SHIFT)
}

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

/// A BAR: kind and size (a power of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BarSpec {
    pub kind: BarKind,
    pub size: u64,
    #[serde(default)]
    pub prefetchable: bool,
}

/// Why a BAR cannot be built as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BarError {
    #[error("size 0: a BAR decodes a power of two of bytes, at least one")]
    Zero,
    #[error("size {0:#x} ({0}) is not a power of two")]
    NotPowerOfTwo(u64),
    #[error("size {size:#x} is more than {kind} BAR decodes ({max:#x})")]
    TooLarge {
        size: u64,
        kind: &'static str,
        max: u64,
    },
    #[error("an I/O BAR cannot be prefetchable")]
    PrefetchableIo,
}

impl BarSpec {
    /// BAR registers it takes: two for a 64-bit memory BAR.
    pub fn registers(&self) -> usize {
        if self.kind == BarKind::Mem64 { 2 } else { 1 }
    }

    /// Checks size and flags (a BAR the model would otherwise round or truncate).
    pub fn check(&self) -> Result<(), BarError> {
        let max = match self.kind {
            BarKind::Io => Some(("an I/O", PCI_IO_BAR_MAX)),
            BarKind::Mem32 => Some(("a 32-bit memory", PCI_MEM32_BAR_MAX)),
            BarKind::Mem64 => None,
        };
        if self.size == 0 {
            return Err(BarError::Zero);
        }
        if !self.size.is_power_of_two() {
            return Err(BarError::NotPowerOfTwo(self.size));
        }
        if let Some((kind, max)) = max.filter(|(_, max)| self.size > *max) {
            return Err(BarError::TooLarge {
                size: self.size,
                kind,
                max,
            });
        }
        if self.prefetchable && self.kind == BarKind::Io {
            return Err(BarError::PrefetchableIo);
        }
        Ok(())
    }
}

/// Why a function cannot be built as written; `bar` counts from 0 in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "class {0:#x} does not fit 24 bits (base class, sub-class, programming interface: \
         at most {PCI_CLASS_MAX:#x})"
    )]
    Class(u32),
    #[error("BAR {bar}: {why}")]
    Bar { bar: usize, why: BarError },
    #[error(
        "BAR {bar} does not fit: {what} has {registers} BAR registers and the BARs before it \
         take {used} (a 64-bit BAR takes two)"
    )]
    TooManyBars {
        bar: usize,
        what: &'static str,
        registers: usize,
        used: usize,
    },
}

/// Which kind of header and PCIe port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FunctionKind {
    #[default]
    Endpoint,
    RootPort,
    UpstreamPort,
    DownstreamPort,
    /// PCIe-to-PCI bridge.
    PciBridge,
}

impl FunctionKind {
    pub fn is_bridge(self) -> bool {
        self != FunctionKind::Endpoint
    }

    /// BAR registers its header has: six in a type 0 header, two in a bridge's type 1.
    pub fn bar_registers(self) -> usize {
        if self.is_bridge() {
            PCI_BRIDGE_NUM_BARS
        } else {
            PCI_NUM_BARS
        }
    }

    fn pcie_type(self) -> u16 {
        match self {
            FunctionKind::Endpoint => PCI_EXP_TYPE_ENDPOINT,
            FunctionKind::RootPort => PCI_EXP_TYPE_ROOT_PORT,
            FunctionKind::UpstreamPort => PCI_EXP_TYPE_UPSTREAM,
            FunctionKind::DownstreamPort => PCI_EXP_TYPE_DOWNSTREAM,
            FunctionKind::PciBridge => PCI_EXP_TYPE_PCI_BRIDGE,
        }
    }
}

/// Everything needed to build a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    pub vendor: u16,
    pub device: u16,
    /// Base class, subclass, programming interface (24 bits).
    #[serde(default)]
    pub class: u32,
    #[serde(default)]
    pub revision: u8,
    #[serde(default)]
    pub kind: FunctionKind,
    /// Header type bit 7.
    #[serde(default)]
    pub multifunction: bool,
    #[serde(default)]
    pub bars: Vec<BarSpec>,
    /// Add a PCI Express capability at 0x40 and a Device Serial Number extended capability at
    /// 0x100 (4 KiB config space); without it the function has 256 bytes. Configuration
    /// files default to false, [`FunctionSpec::endpoint`] and `ioreq-mux dm` to true.
    #[serde(default)]
    pub pcie: bool,
    /// With `pcie`: an Advanced Error Reporting extended capability after DSN (at 0x140).
    #[serde(default = "default_true")]
    pub aer: bool,
    #[serde(default)]
    pub subsystem_vendor: u16,
    #[serde(default)]
    pub subsystem: u16,
    /// Serial number for the DSN capability.
    #[serde(default)]
    pub serial: u64,
}

fn default_true() -> bool {
    true
}

impl FunctionSpec {
    pub fn endpoint(vendor: u16, device: u16, class: u32) -> Self {
        FunctionSpec {
            vendor,
            device,
            class,
            revision: 0,
            kind: FunctionKind::Endpoint,
            multifunction: false,
            bars: vec![],
            pcie: true,
            aer: true,
            subsystem_vendor: 0,
            subsystem: 0,
            serial: 0,
        }
    }

    /// Checks what the model would otherwise truncate, round or drop: the class code, each
    /// BAR, and that the BARs fit the header's registers.
    pub fn check(&self) -> Result<(), SpecError> {
        if self.class > PCI_CLASS_MAX {
            return Err(SpecError::Class(self.class));
        }
        let registers = self.kind.bar_registers();
        let mut used = 0;
        for (bar, b) in self.bars.iter().enumerate() {
            b.check().map_err(|why| SpecError::Bar { bar, why })?;
            if used + b.registers() > registers {
                let what = if self.kind.is_bridge() {
                    "a bridge (type 1 header)"
                } else {
                    "an endpoint (type 0 header)"
                };
                return Err(SpecError::TooManyBars {
                    bar,
                    what,
                    registers,
                    used,
                });
            }
            used += b.registers();
        }
        Ok(())
    }

    pub fn bridge(vendor: u16, device: u16, kind: FunctionKind) -> Self {
        FunctionSpec {
            kind,
            class: 0x060400,
            ..Self::endpoint(vendor, device, 0x060400)
        }
    }

    pub fn with_bar(mut self, kind: BarKind, size: u64) -> Self {
        self.bars.push(BarSpec {
            kind,
            size,
            prefetchable: false,
        });
        self
    }
}

/// Where a decoding BAR is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BarDecode {
    reg: usize,
    range: IoRange,
}

/// One emulated PCI function.
#[derive(Debug, Clone)]
pub struct PciFunction {
    config: Vec<u8>,
    /// Bits software writes (RW, RWS).
    wmask: Vec<u8>,
    /// Bits a written 1 clears (RW1C, RW1CS); disjoint from `wmask`.
    w1c: Vec<u8>,
    /// Offset of the AER capability, if the function has one.
    aer: Option<usize>,
    /// (register offset, spec) per BAR.
    bars: Vec<(usize, BarSpec)>,
    kind: FunctionKind,
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn get32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Lays out the AER capability at `at` (7.8.4): reset values, writable and write-1-to-clear
/// bits; the Root Port registers when `root_port`.
fn put_aer(c: &mut [u8], w: &mut [u8], w1c: &mut [u8], at: usize, next: usize, root_port: bool) {
    put32(
        c,
        at,
        ext_cap_header(PCI_EXT_CAP_ID_AER, AER_CAP_VERSION, next),
    );
    put32(w1c, at + AER_UNCOR_STATUS, AER_UNC_IMPLEMENTED);
    put32(c, at + AER_UNCOR_MASK, AER_UNC_MASK_DEFAULT);
    put32(w, at + AER_UNCOR_MASK, AER_UNC_IMPLEMENTED);
    put32(c, at + AER_UNCOR_SEVERITY, AER_UNC_SEVERITY_DEFAULT);
    put32(w, at + AER_UNCOR_SEVERITY, AER_UNC_IMPLEMENTED);
    put32(w1c, at + AER_COR_STATUS, AER_COR_IMPLEMENTED);
    put32(c, at + AER_COR_MASK, AER_COR_MASK_DEFAULT);
    put32(w, at + AER_COR_MASK, AER_COR_IMPLEMENTED);
    put32(c, at + AER_CAP_CONTROL, AER_CAP_CONTROL_DEFAULT);
    put32(w, at + AER_CAP_CONTROL, AER_CAP_CONTROL_WMASK);
    if root_port {
        put32(w, at + AER_ROOT_COMMAND, AER_ROOT_COMMAND_WMASK);
        put32(w1c, at + AER_ROOT_STATUS, AER_ROOT_STATUS_W1C);
    }
}

/// A function's three register maps while it is being built: values, writable bits and
/// write-1-to-clear bits.
struct Maps {
    c: Vec<u8>,
    w: Vec<u8>,
    w1c: Vec<u8>,
}

impl Maps {
    fn new(size: usize) -> Self {
        Maps {
            c: vec![0u8; size],
            w: vec![0u8; size],
            w1c: vec![0u8; size],
        }
    }

    /// IDs, class, header type, command, interrupt pin: what every header has.
    fn common_header(&mut self, spec: &FunctionSpec) {
        let (c, w) = (&mut self.c, &mut self.w);
        put16(c, PCI_VENDOR_ID, spec.vendor);
        put16(c, PCI_DEVICE_ID, spec.device);
        c[PCI_REVISION_ID] = spec.revision;
        c[PCI_CLASS_PROG] = spec.class as u8;
        c[PCI_CLASS_PROG + 1] = (spec.class >> 8) as u8;
        c[PCI_CLASS_PROG + 2] = (spec.class >> 16) as u8;
        c[PCI_HEADER_TYPE] = u8::from(spec.kind.is_bridge())
            | if spec.multifunction {
                PCI_HEADER_TYPE_MULTIFUNCTION
            } else {
                0
            };
        put16(w, PCI_COMMAND, PCI_COMMAND_WMASK);
        w[PCI_CACHE_LINE_SIZE] = 0xff;
        w[PCI_LATENCY_TIMER] = 0xff;
        w[PCI_INTERRUPT_LINE] = 0xff;
        c[PCI_INTERRUPT_PIN] = 1;
    }

    /// The BARs in order from 0x10 (a 64-bit one takes two registers), each at least the
    /// smallest size the spec allows and a power of two; returns their registers and specs.
    fn bars(&mut self, spec: &FunctionSpec) -> Vec<(usize, BarSpec)> {
        let mut bars = vec![];
        let max_bars = spec.kind.bar_registers();
        let mut reg = PCI_BASE_ADDRESS_0;
        for b in spec.bars.iter().take(max_bars) {
            if reg >= PCI_BASE_ADDRESS_0 + 4 * max_bars {
                break;
            }
            let size = b
                .size
                .max(if b.kind == BarKind::Io { 4 } else { 16 })
                .next_power_of_two();
            let low = match b.kind {
                BarKind::Io => PCI_BASE_ADDRESS_SPACE_IO,
                BarKind::Mem32 => 0,
                BarKind::Mem64 => PCI_BASE_ADDRESS_MEM_TYPE_64,
            } | if b.prefetchable {
                PCI_BASE_ADDRESS_MEM_PREFETCH
            } else {
                0
            };
            put32(&mut self.c, reg, low);
            let mask = !(size - 1);
            let address_bits = if b.kind == BarKind::Io {
                PCI_BASE_ADDRESS_IO_MASK
            } else {
                PCI_BASE_ADDRESS_MEM_MASK
            };
            put32(&mut self.w, reg, mask as u32 & address_bits);
            bars.push((reg, BarSpec { size, ..*b }));
            if b.kind == BarKind::Mem64 {
                put32(&mut self.w, reg + 4, (mask >> 32) as u32);
                reg += 8;
            } else {
                reg += 4;
            }
        }
        bars
    }

    /// Type 1: bus numbers, secondary latency, 32-bit I/O and 64-bit prefetchable windows,
    /// bridge control. Type 0: the subsystem IDs.
    fn type_specific(&mut self, spec: &FunctionSpec) {
        let (c, w) = (&mut self.c, &mut self.w);
        if !spec.kind.is_bridge() {
            put16(c, PCI_SUBSYSTEM_VENDOR_ID, spec.subsystem_vendor);
            put16(c, PCI_SUBSYSTEM_ID, spec.subsystem);
            return;
        }
        w[PCI_PRIMARY_BUS..PCI_PRIMARY_BUS + 4].fill(0xff);
        w[PCI_IO_BASE] = 0xf0;
        w[PCI_IO_LIMIT] = 0xf0;
        c[PCI_IO_BASE] = PCI_IO_RANGE_TYPE_32 as u8;
        c[PCI_IO_LIMIT] = PCI_IO_RANGE_TYPE_32 as u8;
        put32(w, PCI_MEMORY_BASE, 0xfff0_fff0);
        put32(w, PCI_PREF_MEMORY_BASE, 0xfff0_fff0);
        put32(c, PCI_PREF_MEMORY_BASE, 0x0001_0001);
        put32(w, PCI_PREF_BASE_UPPER32, 0xffff_ffff);
        put32(w, PCI_PREF_LIMIT_UPPER32, 0xffff_ffff);
        put16(w, PCI_IO_BASE_UPPER16, 0xffff);
        put16(w, PCI_BRIDGE_CONTROL, 0x0fff);
    }

    /// The PCI Express capability at [`PCIE_CAP_OFFSET`], then the extended chain: DSN,
    /// and AER unless the spec leaves it out. Returns where AER is.
    fn pcie(&mut self, spec: &FunctionSpec) -> Option<usize> {
        let c = &mut self.c;
        put16(c, PCI_STATUS, PCI_STATUS_CAP_LIST);
        c[PCI_CAPABILITY_LIST] = PCIE_CAP_OFFSET as u8;
        c[PCIE_CAP_OFFSET] = PCI_CAP_ID_EXP;
        c[PCIE_CAP_OFFSET + PCI_CAP_LIST_NEXT] = 0;
        // Capability version 2, device/port type in bits 7:4.
        put16(
            c,
            PCIE_CAP_OFFSET + PCI_EXP_FLAGS,
            0x2 | (spec.kind.pcie_type() << PCI_EXP_FLAGS_TYPE_SHIFT),
        );
        put16(
            &mut self.w,
            PCIE_CAP_OFFSET + PCI_EXP_DEVCTL,
            PCI_EXP_DEVCTL_WMASK,
        );
        let after_dsn = if spec.aer { AER_OFFSET } else { 0 };
        put32(
            c,
            DSN_OFFSET,
            ext_cap_header(PCI_EXT_CAP_ID_DSN, DSN_CAP_VERSION, after_dsn),
        );
        put32(c, DSN_OFFSET + 4, spec.serial as u32);
        put32(c, DSN_OFFSET + 8, (spec.serial >> 32) as u32);
        if !spec.aer {
            return None;
        }
        let root_port = spec.kind == FunctionKind::RootPort;
        put_aer(
            &mut self.c,
            &mut self.w,
            &mut self.w1c,
            AER_OFFSET,
            0,
            root_port,
        );
        Some(AER_OFFSET)
    }
}

impl PciFunction {
    pub fn new(spec: &FunctionSpec) -> Self {
        let mut m = Maps::new(if spec.pcie { 0x1000 } else { 0x100 });
        m.common_header(spec);
        let bars = m.bars(spec);
        m.type_specific(spec);
        let aer = if spec.pcie { m.pcie(spec) } else { None };
        PciFunction {
            config: m.c,
            wmask: m.w,
            w1c: m.w1c,
            aer,
            bars,
            kind: spec.kind,
        }
    }

    /// Size of the configuration space (256 or 4096).
    pub fn config_size(&self) -> usize {
        self.config.len()
    }

    pub fn kind(&self) -> FunctionKind {
        self.kind
    }

    /// Reads `size` bytes at `reg`; past the configuration space, all ones (the access is
    /// not claimed by a function, PCIe base spec 4.0, 7.2.2.2).
    pub fn read(&self, reg: usize, size: usize) -> u64 {
        if reg + size > self.config.len() {
            return size_mask(size as u32);
        }
        let mut v = 0u64;
        for i in 0..size {
            v |= u64::from(self.config[reg + i]) << (8 * i);
        }
        v
    }

    /// Writes through the write mask; a 1 written to a write-1-to-clear bit clears it, a 0
    /// leaves it.
    pub fn write(&mut self, reg: usize, size: usize, data: u64) {
        if reg + size > self.config.len() {
            return;
        }
        for i in 0..size {
            let b = (data >> (8 * i)) as u8;
            let m = self.wmask[reg + i];
            let v = (self.config[reg + i] & !m) | (b & m);
            self.config[reg + i] = v & !(b & self.w1c[reg + i]);
        }
    }

    /// Offset of the AER capability, if the function has one.
    pub fn aer_offset(&self) -> Option<usize> {
        self.aer
    }

    /// Records an error the function detected in its AER capability (PCIe base spec 4.0,
    /// 6.2.5): the status bit is set; an unmasked uncorrectable error that finds no earlier
    /// one pending (the First Error Pointer's status bit clear) becomes the first error, with
    /// `header` (the offending TLP's header, zeros if none) in the Header Log; the outcome
    /// says which message, if any, the error calls for (severity decides fatal or not).
    /// Advisory Non-Fatal handling (6.2.3.2.4) is the caller's: report `AdvisoryNonFatal`.
    pub fn report_error(
        &mut self,
        error: AerError,
        header: Option<[u32; AER_HEADER_LOG_DWORDS]>,
    ) -> Result<AerOutcome, NoAer> {
        let at = self.aer.ok_or(NoAer)?;
        let bit = error.bit();
        let reg = |r: usize| at + r;
        if !error.is_uncorrectable() {
            let status = get32(&self.config, reg(AER_COR_STATUS));
            put32(&mut self.config, reg(AER_COR_STATUS), status | bit);
            if get32(&self.config, reg(AER_COR_MASK)) & bit != 0 {
                return Ok(AerOutcome::Masked);
            }
            return Ok(AerOutcome::Signal(ErrorMessage::Correctable));
        }
        let status = get32(&self.config, reg(AER_UNCOR_STATUS));
        put32(&mut self.config, reg(AER_UNCOR_STATUS), status | bit);
        if get32(&self.config, reg(AER_UNCOR_MASK)) & bit != 0 {
            return Ok(AerOutcome::Masked);
        }
        let control = get32(&self.config, reg(AER_CAP_CONTROL));
        let first = control & AER_CAP_FIRST_ERR_PTR_MASK;
        if status & (1 << first) == 0 {
            let control = (control & !AER_CAP_FIRST_ERR_PTR_MASK) | bit.trailing_zeros();
            put32(&mut self.config, reg(AER_CAP_CONTROL), control);
            for (i, d) in header.unwrap_or_default().iter().enumerate() {
                put32(&mut self.config, reg(AER_HEADER_LOG) + 4 * i, *d);
            }
        }
        let fatal = get32(&self.config, reg(AER_UNCOR_SEVERITY)) & bit != 0;
        Ok(AerOutcome::Signal(if fatal {
            ErrorMessage::Fatal
        } else {
            ErrorMessage::NonFatal
        }))
    }

    /// The BARs that decode now: enabled in the command register, programmed, not being sized.
    fn decoding(&self) -> Vec<BarDecode> {
        let cmd = self.read(PCI_COMMAND, 2) as u16;
        let mut out = vec![];
        for &(reg, spec) in &self.bars {
            let low = get32(&self.config, reg);
            let (enabled, base) = match spec.kind {
                BarKind::Io => (cmd & PCI_COMMAND_IO != 0, u64::from(low & !0x3)),
                BarKind::Mem32 => (cmd & PCI_COMMAND_MEMORY != 0, u64::from(low & !0xf)),
                BarKind::Mem64 => (
                    cmd & PCI_COMMAND_MEMORY != 0,
                    u64::from(low & !0xf) | (u64::from(get32(&self.config, reg + 4)) << 32),
                ),
            };
            let kind = if spec.kind == BarKind::Io {
                RangeKind::Port
            } else {
                RangeKind::Mmio
            };
            // Like QEMU's pci_bar_address(): a BAR whose range would reach the top of its
            // space (what sizing writes) does not decode.
            let limit = match spec.kind {
                BarKind::Io => 0xffff,
                BarKind::Mem32 => 0xffff_fffe,
                BarKind::Mem64 => (1u64 << 52) - 1,
            };
            let Some(last) = base.checked_add(spec.size - 1) else {
                continue;
            };
            if !enabled || base == 0 || last > limit {
                continue;
            }
            out.push(BarDecode {
                reg,
                range: IoRange::new(kind, base, last),
            });
        }
        out
    }
}

/// Where a model's function lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placement {
    /// A fixed function (bus 0 devices, or when bus numbers are known).
    Bdf(u32),
    /// Behind bridges; follows bus numbering.
    Position(Position),
}

impl Placement {
    pub fn claim(&self) -> Claim {
        match self {
            Placement::Bdf(s) => Claim::Range(IoRange::pci(*s)),
            Placement::Position(p) => Claim::Position(p.clone()),
        }
    }
}

/// What a model saw: for tests and the Xen end-to-end log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub model: String,
    pub vcpu: u32,
    pub req: Ioreq,
    /// The value returned (reads).
    pub value: u64,
}

/// A shared log of deliveries.
pub type DeliveryLog = Arc<Mutex<Vec<Delivery>>>;

/// A device model made of emulated functions, fixed port/MMIO register ranges and the BARs
/// of its functions. Register space reads return `0xcafe0000 | (address & 0xffff)` until
/// written; writes stick (per 4-byte word).
#[derive(Debug)]
pub struct EmulatedModel {
    name: String,
    functions: Vec<(Placement, PciFunction)>,
    fixed: Vec<IoRange>,
    /// Active BAR claims per function: (function index, BAR register, range).
    bar_claims: Vec<(usize, usize, IoRange)>,
    memory: HashMap<(RangeKind, u64), u64>,
    log: Option<DeliveryLog>,
}

impl EmulatedModel {
    pub fn new(name: &str) -> Self {
        EmulatedModel {
            name: name.to_string(),
            functions: vec![],
            fixed: vec![],
            bar_claims: vec![],
            memory: HashMap::new(),
            log: None,
        }
    }

    pub fn with_function(mut self, at: Placement, spec: &FunctionSpec) -> Self {
        self.functions.push((at, PciFunction::new(spec)));
        self
    }

    /// A fixed range the model claims from the start.
    pub fn with_range(mut self, r: IoRange) -> Self {
        self.fixed.push(r);
        self
    }

    pub fn with_log(mut self, log: DeliveryLog) -> Self {
        self.log = Some(log);
        self
    }

    /// Records an error in the AER capability of the function placed at `at` (see
    /// [`PciFunction::report_error`]); `None` if the model has no function there.
    pub fn report_error(
        &mut self,
        at: &Placement,
        error: AerError,
        header: Option<[u32; AER_HEADER_LOG_DWORDS]>,
    ) -> Option<Result<AerOutcome, NoAer>> {
        let f = self.functions.iter_mut().find(|(p, _)| p == at)?;
        Some(f.1.report_error(error, header))
    }

    /// Ranges the model's BARs decode now.
    pub fn bar_ranges(&self) -> Vec<IoRange> {
        self.bar_claims.iter().map(|c| c.2).collect()
    }

    fn function_for(&self, sbdf: u32, ctl: &dyn DmControl) -> Option<usize> {
        self.functions.iter().position(|(p, _)| match p {
            Placement::Bdf(s) => *s == sbdf,
            Placement::Position(pos) => ctl.locate(pos) == Some(sbdf),
        })
    }

    /// Re-claims BAR ranges of function `f` after a write that may have changed them.
    fn update_bars(&mut self, f: usize, ctl: &mut dyn DmControl) -> Result<(), DmError> {
        let now = self.functions[f].1.decoding();
        let mut keep = vec![];
        for c in std::mem::take(&mut self.bar_claims) {
            if c.0 == f && !now.iter().any(|d| d.reg == c.1 && d.range == c.2) {
                if let Err(e) = ctl.unmap(Claim::Range(c.2)) {
                    tracing::warn!(model = %self.name, error = %e, "BAR unmap failed");
                }
            } else {
                keep.push(c);
            }
        }
        self.bar_claims = keep;
        for d in now {
            if self
                .bar_claims
                .iter()
                .any(|c| c.0 == f && c.1 == d.reg && c.2 == d.range)
            {
                continue;
            }
            match ctl.map(Claim::Range(d.range)) {
                Ok(()) => self.bar_claims.push((f, d.reg, d.range)),
                // A BAR placed over someone else's range does not decode; the guest sees
                // all ones there. Firmware does that transiently while sizing.
                Err(e) => tracing::debug!(model = %self.name, error = %e, "BAR not claimed"),
            }
        }
        Ok(())
    }

    fn region_access(&mut self, req: &Ioreq) -> u64 {
        let kind = if req.ty == IoreqType::Pio {
            RangeKind::Port
        } else {
            RangeKind::Mmio
        };
        let word = req.addr & !3;
        let shift = 8 * (req.addr & 3) as u32;
        match req.dir {
            Dir::Read => {
                let mut v = 0u64;
                for i in 0..u64::from(req.size).div_ceil(4).max(1) {
                    let w = word + 4 * i;
                    let cur = self
                        .memory
                        .get(&(kind, w))
                        .copied()
                        .unwrap_or(0xcafe_0000 | (w & 0xffff));
                    v |= cur << (32 * i);
                }
                (v >> shift) & size_mask(req.size)
            }
            Dir::Write => {
                for i in 0..u64::from(req.size).div_ceil(4).max(1) {
                    let w = word + 4 * i;
                    let cur = self
                        .memory
                        .get(&(kind, w))
                        .copied()
                        .unwrap_or(0xcafe_0000 | (w & 0xffff));
                    let part = req.data >> (32 * i);
                    let (mask, val) = if i == 0 {
                        (
                            size_mask(req.size.min(4)) << shift,
                            (part << shift) & 0xffff_ffff,
                        )
                    } else {
                        (size_mask(req.size - 4), part)
                    };
                    let new = (cur & !mask) | (val & mask);
                    self.memory.insert((kind, w), new & 0xffff_ffff);
                }
                0
            }
        }
    }
}

impl DeviceModel for EmulatedModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn attach(&mut self, ctl: &mut dyn DmControl) -> Result<(), ioreq_server::ClaimError> {
        for (p, _) in &self.functions {
            ctl.map(p.claim())?;
        }
        for r in &self.fixed {
            ctl.map(Claim::Range(*r))?;
        }
        Ok(())
    }

    fn handle(&mut self, vcpu: u32, req: &Ioreq, ctl: &mut dyn DmControl) -> Result<u64, DmError> {
        let value = match req.ty {
            IoreqType::PciConfig => {
                let (sbdf, reg) = abi::split_pci_config_addr(req.addr);
                match self.function_for(sbdf, ctl) {
                    None => size_mask(req.size),
                    Some(f) => {
                        let (reg, size) = (reg as usize, req.size as usize);
                        if req.dir == Dir::Read {
                            self.functions[f].1.read(reg, size)
                        } else {
                            self.functions[f].1.write(reg, size, req.data);
                            let touches = |lo: usize, hi: usize| reg < hi && lo < reg + size;
                            if touches(PCI_COMMAND, PCI_COMMAND + 2) || touches(0x10, 0x28) {
                                self.update_bars(f, ctl)?;
                            }
                            0
                        }
                    }
                }
            }
            IoreqType::Pio | IoreqType::Copy => self.region_access(req),
            IoreqType::TimeOffset | IoreqType::Invalidate => 0,
        };
        if let Some(log) = &self.log {
            if let Ok(mut l) = log.lock() {
                l.push(Delivery {
                    model: self.name.clone(),
                    vcpu,
                    req: *req,
                    value,
                });
            }
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizing_and_readback() {
        let spec = FunctionSpec::endpoint(0x1af4, 0x1337, 0xff0000)
            .with_bar(BarKind::Mem32, 0x1000)
            .with_bar(BarKind::Io, 0x20)
            .with_bar(BarKind::Mem64, 0x4000);
        let mut f = PciFunction::new(&spec);
        assert_eq!(f.read(0, 4), 0x1337_1af4);
        f.write(0x10, 4, 0xffff_ffff);
        assert_eq!(f.read(0x10, 4), 0xffff_f000);
        f.write(0x14, 4, 0xffff_ffff);
        assert_eq!(f.read(0x14, 4), 0xffff_ffe1);
        f.write(0x18, 4, 0xffff_ffff);
        f.write(0x1c, 4, 0xffff_ffff);
        assert_eq!(f.read(0x18, 4), 0xffff_c004);
        assert_eq!(f.read(0x1c, 4), 0xffff_ffff);
        // Read-only IDs stay.
        f.write(0, 4, 0);
        assert_eq!(f.read(0, 2), 0x1af4);
        // Extended config space: the DSN capability header at 0x100, AER next.
        assert_eq!(f.read(0x100, 4), 0x1401_0003);
        assert_eq!(f.read(0x34, 1), 0x40);
        assert_eq!(f.read(0x40, 1), 0x10);
        // A conventional function ends at 256 bytes.
        let g = PciFunction::new(&FunctionSpec {
            pcie: false,
            ..spec.clone()
        });
        assert_eq!(g.read(0x100, 4), 0xffff_ffff);
    }

    #[test]
    fn bars_decode_only_when_enabled_and_placed() {
        let spec = FunctionSpec::endpoint(1, 2, 0)
            .with_bar(BarKind::Mem32, 0x1000)
            .with_bar(BarKind::Io, 0x40);
        let mut f = PciFunction::new(&spec);
        f.write(0x10, 4, 0xfe00_0000);
        f.write(0x14, 4, 0xc000);
        assert!(f.decoding().is_empty(), "command register still 0");
        f.write(PCI_COMMAND, 2, u64::from(PCI_COMMAND_MEMORY));
        assert_eq!(f.decoding().len(), 1);
        assert_eq!(
            f.decoding()[0].range,
            IoRange::new(RangeKind::Mmio, 0xfe00_0000, 0xfe00_0fff)
        );
        f.write(PCI_COMMAND, 2, 3);
        assert_eq!(f.decoding()[1].range, IoRange::ports(0xc000, 0xc03f));
    }

    #[test]
    fn bridge_bus_numbers_are_writable() {
        let mut f = PciFunction::new(&FunctionSpec::bridge(
            0x1b36,
            0x000c,
            FunctionKind::RootPort,
        ));
        assert_eq!(f.read(PCI_HEADER_TYPE, 1), 1);
        f.write(0x18, 4, 0x00ff_0100);
        assert_eq!(f.read(0x18, 4), 0x00ff_0100);
        assert_eq!(f.read(PCIE_CAP_OFFSET + 2, 2), 0x42);
    }
}
