//! PCI and PCI Express configuration-space facts: the one place every crate takes them from
//! (the router's bridge tracking, the chipset intercepts, the built-in models, `inspect`).
//!
//! Sources: PCI Local Bus spec 3.0, 6.1-6.2 (type-0 header) and 6.7 (capability list);
//! PCI-to-PCI Bridge Architecture spec 1.2, 3.2 (type-1 header); PCI Express Base spec 4.0,
//! 7.5.3 (PCI Express capability). Names follow Linux's `include/uapi/linux/pci_regs.h`.
//!
//! Register offsets are `u16`, as in a configuration access; [`idx`] has each of them as a
//! `usize` for indexing a configuration-space byte array. Both come from the one table below.
//!
//! ```
//! use ioreq_server::pci::{self, idx};
//! assert_eq!(pci::PCI_SECONDARY_BUS, 0x19);
//! assert_eq!(idx::PCI_SECONDARY_BUS, 0x19usize);
//! ```

/// Declares register offsets once, as `u16` constants here and as `usize` ones in [`idx`].
macro_rules! registers {
    ($( $(#[$doc:meta])* $name:ident = $value:expr; )*) => {
        $( $(#[$doc])* pub const $name: u16 = $value; )*

        /// The register offsets of [`crate::pci`] as indices into a configuration-space byte
        /// array (the same values, as `usize`).
        pub mod idx {
            $( $(#[$doc])* pub const $name: usize = super::$name as usize; )*
        }
    };
}

registers! {
    // ---- every header (PCI Local Bus spec 3.0, 6.2.1) ----
    /// Vendor ID (16 bits).
    PCI_VENDOR_ID = 0x00;
    /// Device ID (16 bits).
    PCI_DEVICE_ID = 0x02;
    /// Command (16 bits, 6.2.2).
    PCI_COMMAND = 0x04;
    /// Status (16 bits, 6.2.3).
    PCI_STATUS = 0x06;
    /// Revision ID (8 bits); the class code follows in 0x09-0x0b.
    PCI_REVISION_ID = 0x08;
    /// The dword of revision ID and class code (24 bits at 0x09: programming interface,
    /// sub-class, base class).
    PCI_CLASS_REVISION = 0x08;
    /// Programming interface, the class code's low byte.
    PCI_CLASS_PROG = 0x09;
    /// Cache line size (8 bits, 6.2.4).
    PCI_CACHE_LINE_SIZE = 0x0c;
    /// Latency timer (8 bits, 6.2.4).
    PCI_LATENCY_TIMER = 0x0d;
    /// Header type: bits 6:0 the layout, bit 7 multi-function.
    PCI_HEADER_TYPE = 0x0e;
    /// First base address register (6.2.5.1).
    PCI_BASE_ADDRESS_0 = 0x10;
    /// Capabilities pointer (6.7).
    PCI_CAPABILITY_LIST = 0x34;
    /// Interrupt line (8 bits, 6.2.4): written by software, no meaning to the device.
    PCI_INTERRUPT_LINE = 0x3c;
    /// Interrupt pin (8 bits).
    PCI_INTERRUPT_PIN = 0x3d;

    // ---- type-0 header ----
    /// Subsystem vendor ID (16 bits, 6.2.4).
    PCI_SUBSYSTEM_VENDOR_ID = 0x2c;
    /// Subsystem ID (16 bits).
    PCI_SUBSYSTEM_ID = 0x2e;
    /// Expansion ROM base address (6.2.5.2).
    PCI_ROM_ADDRESS = 0x30;

    // ---- type-1 header (PCI-to-PCI Bridge Architecture spec 1.2, 3.2.5) ----
    /// Primary bus number (3.2.5.2).
    PCI_PRIMARY_BUS = 0x18;
    /// Secondary bus number (3.2.5.3).
    PCI_SECONDARY_BUS = 0x19;
    /// Subordinate bus number (3.2.5.4).
    PCI_SUBORDINATE_BUS = 0x1a;
    /// I/O base, 8 bits (3.2.5.6); upper 16 bits at [`PCI_IO_BASE_UPPER16`].
    PCI_IO_BASE = 0x1c;
    /// I/O limit, 8 bits.
    PCI_IO_LIMIT = 0x1d;
    /// Memory base, 16 bits (3.2.5.8).
    PCI_MEMORY_BASE = 0x20;
    /// Memory limit, 16 bits.
    PCI_MEMORY_LIMIT = 0x22;
    /// Prefetchable memory base, 16 bits (3.2.5.9); upper 32 bits at 0x28.
    PCI_PREF_MEMORY_BASE = 0x24;
    /// Prefetchable memory limit, 16 bits; upper 32 bits at 0x2c.
    PCI_PREF_MEMORY_LIMIT = 0x26;
    /// Prefetchable base, upper 32 bits (3.2.5.10).
    PCI_PREF_BASE_UPPER32 = 0x28;
    /// Prefetchable limit, upper 32 bits.
    PCI_PREF_LIMIT_UPPER32 = 0x2c;
    /// I/O base, upper 16 bits (3.2.5.11).
    PCI_IO_BASE_UPPER16 = 0x30;
    /// I/O limit, upper 16 bits.
    PCI_IO_LIMIT_UPPER16 = 0x32;
    /// Expansion ROM base address of a type-1 header (3.2.5.16).
    PCI_ROM_ADDRESS1 = 0x38;
    /// Secondary status (16 bits, 3.2.5.7; PCIe base spec 4.0, 7.5.1.3.7).
    PCI_SEC_STATUS = 0x1e;
    /// Bridge control (16 bits, 3.2.5.18).
    PCI_BRIDGE_CONTROL = 0x3e;

    // ---- inside a capability ----
    /// A capability list entry: ID at +0, next pointer at +1 (PCI Local Bus spec 3.0, 6.7).
    PCI_CAP_LIST_NEXT = 1;
    /// PCI Express Capabilities register, at +2 in the PCIe capability (PCIe base spec 4.0,
    /// 7.5.3.2): device/port type in bits 7:4, Slot Implemented in bit 8.
    PCI_EXP_FLAGS = 0x02;
    /// Device Capabilities, at +4 (7.5.3.3).
    PCI_EXP_DEVCAP = 0x04;
    /// Device Control, at +8 (7.5.3.4).
    PCI_EXP_DEVCTL = 0x08;
    /// Link Capabilities, at +0x0c (7.5.3.6).
    PCI_EXP_LNKCAP = 0x0c;
    /// Link Control (16 bits), at +0x10 (7.5.3.7).
    PCI_EXP_LNKCTL = 0x10;
    /// Link Status (16 bits), at +0x12 (7.5.3.8).
    PCI_EXP_LNKSTA = 0x12;
    /// Slot Capabilities, at +0x14 (7.5.3.9).
    PCI_EXP_SLTCAP = 0x14;
    /// Slot Control (16 bits), at +0x18 (7.5.3.10).
    PCI_EXP_SLTCTL = 0x18;
    /// Slot Status (16 bits), at +0x1a (7.5.3.11).
    PCI_EXP_SLTSTA = 0x1a;
    /// Root Control (16 bits), at +0x1c (7.5.3.12), Root Ports only.
    PCI_EXP_RTCTL = 0x1c;
    /// Link Capabilities 2, at +0x2c (7.5.3.18).
    PCI_EXP_LNKCAP2 = 0x2c;
    /// Link Control 2 (16 bits), at +0x30 (7.5.3.19).
    PCI_EXP_LNKCTL2 = 0x30;
    /// MSI Message Control (16 bits), at +2 in the MSI capability (PCIe base spec 4.0,
    /// 7.7.1.2).
    PCI_MSI_FLAGS = 0x02;
    /// MSI Message Address, low 32 bits, at +4 (7.7.1.3).
    PCI_MSI_ADDRESS_LO = 0x04;
    /// MSI Message Upper Address, at +8 in a 64-bit capability (7.7.1.4).
    PCI_MSI_ADDRESS_HI = 0x08;
    /// MSI Message Data (16 bits), at +0x0c in a 64-bit capability (7.7.1.5).
    PCI_MSI_DATA_64 = 0x0c;
    /// MSI Mask Bits, at +0x10 in a 64-bit capability with per-vector masking (7.7.1.7).
    PCI_MSI_MASK_64 = 0x10;
    /// MSI Pending Bits, at +0x14 in a 64-bit capability with per-vector masking (7.7.1.8).
    PCI_MSI_PENDING_64 = 0x14;
}

/// Header type bits 6:0: the layout of a PCI-to-PCI bridge (type 1).
pub const PCI_HEADER_TYPE_BRIDGE: u8 = 0x01;
/// Header type: mask of the layout bits.
pub const PCI_HEADER_TYPE_MASK: u8 = 0x7f;
/// Header type bit 7: a multi-function device (PCI Local Bus spec 3.0, 6.2.1).
pub const PCI_HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;
/// Base class 06h (bridge), sub-class 04h (PCI-to-PCI bridge): such a function has a type-1
/// header (PCI Local Bus spec 3.0, appendix D; PCI-to-PCI Bridge spec 1.2, 3.2.4.6).
pub const PCI_CLASS_BRIDGE_PCI: u16 = 0x0604;
/// The largest class code: base class, sub-class and programming interface, a byte each.
pub const PCI_CLASS_MAX: u32 = 0xff_ffff;

/// Command register bits (6.2.2): I/O space, memory space.
pub const PCI_COMMAND_IO: u16 = 0x1;
pub const PCI_COMMAND_MEMORY: u16 = 0x2;
/// Writable command bits of the built-in functions: I/O, memory, bus master, parity error
/// response, SERR#, INTx disable.
pub const PCI_COMMAND_WMASK: u16 = 0x1 | 0x2 | 0x4 | 0x40 | 0x100 | 0x400;
/// Command bit 8: SERR# Enable (6.2.2; PCIe base spec 4.0, 7.5.1.1.3: with it a function
/// reports ERR_NONFATAL and ERR_FATAL even when Device Control's enables are clear, 6.2.5).
pub const PCI_COMMAND_SERR: u16 = 0x100;
/// Command bit 2: Bus Master Enable (6.2.2). Clear, a PCIe function sends no MSI (PCIe base
/// spec 4.0, 7.5.1.1.3: MSIs are memory writes).
pub const PCI_COMMAND_MASTER: u16 = 0x4;
/// Status bit 4: capabilities list present (6.2.3).
pub const PCI_STATUS_CAP_LIST: u16 = 0x10;
/// Status bit 14, Signaled System Error (PCIe base spec 4.0, 7.5.1.1.4): set by a function
/// that sends ERR_FATAL or ERR_NONFATAL (a Switch Port forwarding one from its secondary side
/// counts) while SERR# Enable is set.
pub const PCI_STATUS_SIG_SYSTEM_ERROR: u16 = 0x4000;
/// Secondary status bit 13, Received Master Abort (PCI-to-PCI Bridge spec 1.2, 3.2.5.7; PCIe
/// base spec 4.0, 7.5.1.3.7: a request the bridge made on its secondary side found no
/// target / completed with Unsupported Request), RW1C.
pub const PCI_SEC_STATUS_REC_MASTER_ABORT: u16 = 0x2000;
/// Secondary status bit 14, Received System Error (PCIe base spec 4.0, 7.5.1.3.7): an
/// ERR_FATAL or ERR_NONFATAL arrived on the secondary side, RW1C.
pub const PCI_SEC_STATUS_REC_SYSTEM_ERROR: u16 = 0x4000;
/// Bridge control bit 1, SERR# Enable (3.2.5.18; PCIe base spec 4.0, 7.5.1.3.13): forward
/// ERR_COR, ERR_NONFATAL and ERR_FATAL from the secondary side to the primary.
pub const PCI_BRIDGE_CTL_SERR: u16 = 0x2;

/// BAR bit 0: I/O space; bits 2:1 = 10b: 64-bit memory; bit 3: prefetchable (6.2.5.1).
pub const PCI_BASE_ADDRESS_SPACE_IO: u32 = 0x1;
pub const PCI_BASE_ADDRESS_MEM_TYPE_64: u32 = 0x4;
pub const PCI_BASE_ADDRESS_MEM_PREFETCH: u32 = 0x8;
/// Address bits of a memory BAR (bits 3:0 are type and prefetchable) and of an I/O BAR (bits
/// 1:0 are the space indicator and a reserved bit).
pub const PCI_BASE_ADDRESS_MEM_MASK: u32 = !0xf;
pub const PCI_BASE_ADDRESS_IO_MASK: u32 = !0x3;
/// Bits 2:1 of a memory BAR: its type (00b 32-bit, 10b 64-bit).
pub const PCI_BASE_ADDRESS_MEM_TYPE_MASK: u32 = 0x6;
/// BARs of a type-0 header (0x10-0x24) and of a type-1 header (0x10-0x14) (6.2.5.1;
/// PCI-to-PCI Bridge spec 1.2, 3.2.5.1).
pub const PCI_NUM_BARS: usize = 6;
pub const PCI_BRIDGE_NUM_BARS: usize = 2;
/// An I/O BAR decodes at most 256 bytes (6.2.5.1).
pub const PCI_IO_BAR_MAX: u64 = 0x100;
/// A 32-bit memory BAR decodes at most 2 GiB (its size mask keeps bit 31).
pub const PCI_MEM32_BAR_MAX: u64 = 1 << 31;
/// Expansion ROM BAR: bit 0 enables decoding; bits 31:11 are the address (6.2.5.2).
pub const PCI_ROM_ADDRESS_ENABLE: u32 = 0x1;
pub const PCI_ROM_ADDRESS_MASK: u32 = !0x7ff;

/// Bits 3:0 of the I/O base and of the prefetchable memory base: the addressing capability,
/// 01h = 32-bit I/O (3.2.5.6) or 64-bit prefetchable memory (3.2.5.9); bits 7:4 (I/O) and
/// 15:4 (memory) are address bits 15:12 and 31:20.
pub const PCI_RANGE_TYPE_MASK: u32 = 0xf;
pub const PCI_IO_RANGE_TYPE_32: u32 = 0x1;
pub const PCI_PREF_RANGE_TYPE_64: u32 = 0x1;
pub const PCI_IO_RANGE_MASK: u32 = 0xf0;
pub const PCI_MEMORY_RANGE_MASK: u32 = 0xfff0;
/// Register bits 7:4 of the I/O base/limit are address bits 15:12; register bits 15:4 of the
/// memory base/limit are address bits 31:20 (3.2.5.6, 3.2.5.8).
pub const PCI_IO_RANGE_SHIFT: u32 = 8;
pub const PCI_MEMORY_RANGE_SHIFT: u32 = 16;
/// I/O windows are 4 KiB granular, memory windows 1 MiB (3.2.5.6, 3.2.5.8).
pub const PCI_IO_WINDOW_GRANULE: u64 = 0x1000;
pub const PCI_MEMORY_WINDOW_GRANULE: u64 = 0x10_0000;

/// Capability ID of PCI Express (PCI Code and ID Assignment spec 1.11, 2).
pub const PCI_CAP_ID_EXP: u8 = 0x10;
/// Extended capability ID of the Device Serial Number (PCIe base spec 4.0, 7.9.3).
pub const PCI_EXT_CAP_ID_DSN: u16 = 0x0003;
/// PCI Express Capabilities register fields (7.5.3.2): device/port type in bits 7:4, Slot
/// Implemented in bit 8.
pub const PCI_EXP_FLAGS_TYPE_SHIFT: u32 = 4;
pub const PCI_EXP_FLAGS_TYPE_MASK: u16 = 0xf;
pub const PCI_EXP_FLAGS_SLOT: u16 = 0x0100;
/// PCIe device/port types (PCIe capabilities register bits 7:4, 7.5.3.2).
pub const PCI_EXP_TYPE_ENDPOINT: u16 = 0x0;
pub const PCI_EXP_TYPE_LEG_END: u16 = 0x1;
pub const PCI_EXP_TYPE_ROOT_PORT: u16 = 0x4;
pub const PCI_EXP_TYPE_UPSTREAM: u16 = 0x5;
pub const PCI_EXP_TYPE_DOWNSTREAM: u16 = 0x6;
pub const PCI_EXP_TYPE_PCI_BRIDGE: u16 = 0x7;
pub const PCI_EXP_TYPE_PCIE_BRIDGE: u16 = 0x8;
pub const PCI_EXP_TYPE_RC_END: u16 = 0x9;
pub const PCI_EXP_TYPE_RC_EC: u16 = 0xa;
/// Device Capabilities bit 15, Role-Based Error Reporting: set by every function conforming
/// to PCIe 1.1 or later (7.5.3.3).
pub const PCI_EXP_DEVCAP_RBER: u32 = 0x8000;
/// Device Control bits 2:0 (7.5.3.4): Correctable, Non-Fatal and Fatal Error Reporting
/// Enable, whether the function sends ERR_COR / ERR_NONFATAL / ERR_FATAL for its own errors.
pub const PCI_EXP_DEVCTL_CERE: u16 = 0x1;
pub const PCI_EXP_DEVCTL_NFERE: u16 = 0x2;
pub const PCI_EXP_DEVCTL_FERE: u16 = 0x4;
/// Device Control's writable bits 14:0 (7.5.3.4).
pub const PCI_EXP_DEVCTL_WMASK: u16 = 0x7fff;
/// PCI Express Capabilities register bits 13:9: Interrupt Message Number (7.5.3.2), the MSI
/// vector of the slot's, link's and root's events.
pub const PCI_EXP_FLAGS_IRQ_SHIFT: u32 = 9;

/// Link Capabilities (7.5.3.6): Max Link Speed bits 3:0 (an index into Link Capabilities 2's
/// Supported Link Speeds Vector: 1 = its bit 0, 2.5 GT/s ... 4 = 16 GT/s), Maximum Link
/// Width bits 9:4 (the lane count), Data Link Layer Link Active Reporting Capable bit 20,
/// Port Number bits 31:24.
pub const PCI_EXP_LNKCAP_SLS: u32 = 0xf;
pub const PCI_EXP_LNKCAP_MLW_SHIFT: u32 = 4;
pub const PCI_EXP_LNKCAP_MLW: u32 = 0x3f0;
pub const PCI_EXP_LNKCAP_DLLLARC: u32 = 1 << 20;
pub const PCI_EXP_LNKCAP_PN_SHIFT: u32 = 24;
/// Link Control (7.5.3.7): ASPM Control bits 1:0, Link Disable bit 4 (Downstream Ports),
/// Retrain Link bit 5 (reads 0), Common Clock Configuration bit 6, Extended Synch bit 7.
pub const PCI_EXP_LNKCTL_ASPMC: u16 = 0x3;
pub const PCI_EXP_LNKCTL_LD: u16 = 0x10;
pub const PCI_EXP_LNKCTL_CCC: u16 = 0x40;
pub const PCI_EXP_LNKCTL_ES: u16 = 0x80;
/// Link Status (7.5.3.8): Current Link Speed bits 3:0 (encoded as Max Link Speed),
/// Negotiated Link Width bits 9:4, Data Link Layer Link Active bit 13.
pub const PCI_EXP_LNKSTA_CLS: u16 = 0xf;
pub const PCI_EXP_LNKSTA_NLW_SHIFT: u32 = 4;
pub const PCI_EXP_LNKSTA_NLW: u16 = 0x3f0;
pub const PCI_EXP_LNKSTA_DLLLA: u16 = 0x2000;
/// Link Capabilities 2 bits 7:1: Supported Link Speeds Vector (7.5.3.18), bit 1 = 2.5 GT/s,
/// bit 2 = 5, bit 3 = 8, bit 4 = 16.
pub const PCI_EXP_LNKCAP2_SLS_SHIFT: u32 = 1;
/// Link Control 2 (7.5.3.19): Target Link Speed bits 3:0, Hardware Autonomous Speed Disable
/// bit 5.
pub const PCI_EXP_LNKCTL2_TLS: u16 = 0xf;
pub const PCI_EXP_LNKCTL2_HASD: u16 = 0x20;

/// Slot Capabilities (7.5.3.9): Attention Button Present, Power Controller Present, MRL
/// Sensor Present, Attention Indicator Present, Power Indicator Present, Hot-Plug Surprise,
/// Hot-Plug Capable (bits 0-6); No Command Completed Support bit 18; Physical Slot Number
/// bits 31:19.
pub const PCI_EXP_SLTCAP_ABP: u32 = 0x1;
pub const PCI_EXP_SLTCAP_PCP: u32 = 0x2;
pub const PCI_EXP_SLTCAP_AIP: u32 = 0x8;
pub const PCI_EXP_SLTCAP_PIP: u32 = 0x10;
pub const PCI_EXP_SLTCAP_HPS: u32 = 0x20;
/// Slot Capabilities bit 6: Hot-Plug Capable (7.5.3.9).
pub const PCI_EXP_SLTCAP_HPC: u32 = 0x40;
pub const PCI_EXP_SLTCAP_NCCS: u32 = 1 << 18;
pub const PCI_EXP_SLTCAP_PSN_SHIFT: u32 = 19;
/// The largest Physical Slot Number (13 bits).
pub const PCI_EXP_SLTCAP_PSN_MAX: u16 = 0x1fff;
/// Slot Control (7.5.3.10): the event enables (Attention Button Pressed, Power Fault
/// Detected, MRL Sensor Changed, Presence Detect Changed, Command Completed Interrupt,
/// bits 0-4), Hot-Plug Interrupt Enable bit 5, Attention Indicator Control bits 7:6, Power
/// Indicator Control bits 9:8, Power Controller Control bit 10 (1 = off), Data Link Layer
/// State Changed Enable bit 12.
pub const PCI_EXP_SLTCTL_ABPE: u16 = 0x1;
pub const PCI_EXP_SLTCTL_PFDE: u16 = 0x2;
pub const PCI_EXP_SLTCTL_PDCE: u16 = 0x8;
pub const PCI_EXP_SLTCTL_CCIE: u16 = 0x10;
pub const PCI_EXP_SLTCTL_HPIE: u16 = 0x20;
pub const PCI_EXP_SLTCTL_AIC: u16 = 0xc0;
pub const PCI_EXP_SLTCTL_PIC: u16 = 0x300;
pub const PCI_EXP_SLTCTL_PIC_SHIFT: u32 = 8;
pub const PCI_EXP_SLTCTL_PCC: u16 = 0x400;
pub const PCI_EXP_SLTCTL_DLLSCE: u16 = 0x1000;
/// Indicator Control values (7.5.3.10): 01b on, 10b blink, 11b off (00b reserved).
pub const PCI_EXP_SLTCTL_IND_ON: u16 = 0x1;
pub const PCI_EXP_SLTCTL_IND_BLINK: u16 = 0x2;
pub const PCI_EXP_SLTCTL_IND_OFF: u16 = 0x3;
/// Slot Status (7.5.3.11): the events, RW1C (Attention Button Pressed, Power Fault Detected,
/// MRL Sensor Changed, Presence Detect Changed, Command Completed, bits 0-4; Data Link Layer
/// State Changed bit 8) and Presence Detect State bit 6 (RO). An event bit and its enable in
/// Slot Control are the same bit, but for Data Link Layer State Changed (8 and 12).
pub const PCI_EXP_SLTSTA_ABP: u16 = 0x1;
pub const PCI_EXP_SLTSTA_PFD: u16 = 0x2;
pub const PCI_EXP_SLTSTA_PDC: u16 = 0x8;
pub const PCI_EXP_SLTSTA_CC: u16 = 0x10;
pub const PCI_EXP_SLTSTA_PDS: u16 = 0x40;
pub const PCI_EXP_SLTSTA_DLLSC: u16 = 0x100;
/// Root Control (7.5.3.12): the System Error on Correctable / Non-Fatal / Fatal Error
/// enables and PME Interrupt Enable, bits 3:0, are RW.
pub const PCI_EXP_RTCTL_WMASK: u16 = 0xf;

/// Capability ID of MSI (PCI Code and ID Assignment spec 1.11, 2; PCIe base spec 4.0,
/// 7.7.1.1).
pub const PCI_CAP_ID_MSI: u8 = 0x05;
/// MSI Message Control (7.7.1.2): MSI Enable bit 0, Multiple Message Capable bits 3:1,
/// Multiple Message Enable bits 6:4, 64-bit Address Capable bit 7, Per-Vector Masking
/// Capable bit 8.
pub const PCI_MSI_FLAGS_ENABLE: u16 = 0x1;
pub const PCI_MSI_FLAGS_QSIZE: u16 = 0x70;
pub const PCI_MSI_FLAGS_64BIT: u16 = 0x80;
pub const PCI_MSI_FLAGS_MASKBIT: u16 = 0x100;
/// Message Address bits 1:0 are reserved, read 0 (7.7.1.3).
pub const PCI_MSI_ADDRESS_LO_MASK: u32 = !0x3;

/// AER Root Error Command (7.8.4.9): Correctable, Non-Fatal and Fatal Error Reporting Enable.
pub const PCI_ERR_ROOT_CMD_COR_EN: u32 = 0x1;
pub const PCI_ERR_ROOT_CMD_NONFATAL_EN: u32 = 0x2;
pub const PCI_ERR_ROOT_CMD_FATAL_EN: u32 = 0x4;
/// AER Root Error Status (7.8.4.10): ERR_COR Received, Multiple ERR_COR Received,
/// ERR_FATAL/NONFATAL Received, Multiple ERR_FATAL/NONFATAL Received, First Uncorrectable
/// Fatal, Non-Fatal Error Messages Received, Fatal Error Messages Received (bits 0-6);
/// Advanced Error Interrupt Message Number bits 31:27.
pub const PCI_ERR_ROOT_COR_RCV: u32 = 0x1;
pub const PCI_ERR_ROOT_MULTI_COR_RCV: u32 = 0x2;
pub const PCI_ERR_ROOT_UNCOR_RCV: u32 = 0x4;
pub const PCI_ERR_ROOT_MULTI_UNCOR_RCV: u32 = 0x8;
pub const PCI_ERR_ROOT_FIRST_FATAL: u32 = 0x10;
pub const PCI_ERR_ROOT_NONFATAL_RCV: u32 = 0x20;
pub const PCI_ERR_ROOT_FATAL_RCV: u32 = 0x40;
/// AER Error Source Identification (7.8.4.11): the requester ID of the ERR_FATAL/NONFATAL
/// source in bits 31:16 (ERR_COR's in 15:0).
pub const PCI_ERR_SRC_UNCOR_SHIFT: u32 = 16;
/// Extended capability header (7.6.3): ID bits 15:0, version 19:16, next offset 31:20.
pub const EXT_CAP_VERSION_SHIFT: u32 = 16;
pub const EXT_CAP_NEXT_SHIFT: u32 = 20;

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-array view is the same table.
    #[test]
    fn indices_are_the_offsets() {
        assert_eq!(idx::PCI_VENDOR_ID, usize::from(PCI_VENDOR_ID));
        assert_eq!(idx::PCI_BRIDGE_CONTROL, usize::from(PCI_BRIDGE_CONTROL));
        assert_eq!(idx::PCI_EXP_SLTCAP, usize::from(PCI_EXP_SLTCAP));
    }

    /// The type-1 registers sit where the bridge spec puts them, between the BARs and the
    /// capabilities pointer, without overlapping.
    #[test]
    fn type_1_layout() {
        let regs = [
            (PCI_PRIMARY_BUS, 1),
            (PCI_SECONDARY_BUS, 1),
            (PCI_SUBORDINATE_BUS, 1),
            (PCI_IO_BASE, 1),
            (PCI_IO_LIMIT, 1),
            (PCI_MEMORY_BASE, 2),
            (PCI_MEMORY_LIMIT, 2),
            (PCI_PREF_MEMORY_BASE, 2),
            (PCI_PREF_MEMORY_LIMIT, 2),
            (PCI_PREF_BASE_UPPER32, 4),
            (PCI_PREF_LIMIT_UPPER32, 4),
            (PCI_IO_BASE_UPPER16, 2),
            (PCI_IO_LIMIT_UPPER16, 2),
        ];
        let bars_end = PCI_BASE_ADDRESS_0 + 4 * PCI_BRIDGE_NUM_BARS as u16;
        for w in regs.windows(2) {
            let ((a, len), (b, _)) = (w[0], w[1]);
            assert!(a + len <= b, "{a:#x}+{len} overlaps {b:#x}");
        }
        assert!(regs[0].0 >= bars_end);
        let (last, len) = regs[regs.len() - 1];
        assert!(last + len <= PCI_CAPABILITY_LIST);
    }
}
