//! Register facts of the emulated chipsets, each with its source.
//!
//! Q35 = Intel 82Q35 GMCH + ICH9 (Intel 3 Series Express Chipset Family datasheet, doc.
//! 316966; Intel I/O Controller Hub 9 datasheet, doc. 316972), as QEMU models them
//! (include/hw/pci-host/q35.h, include/hw/southbridge/ich9.h). i440FX + PIIX3/PIIX4
//! (Intel 82371AB PIIX4 datasheet, doc. 290562; include/hw/pci-host/i440fx.h).

/// Intel's PCI vendor ID.
pub const PCI_VENDOR_INTEL: u16 = 0x8086;
/// The Vendor ID and Device ID registers (PCI Local Bus spec 3.0, 6.2.1).
pub use ioreq_server::pci::{PCI_DEVICE_ID, PCI_VENDOR_ID};

// ---- Q35 MCH, 00:00.0 ----

/// Q35 MCH device ID (QEMU `PCI_DEVICE_ID_INTEL_Q35_MCH`).
pub const Q35_MCH_DEVICE_ID: u16 = 0x29c0;
/// MCH function.
pub const Q35_MCH_DEVFN: u8 = 0x00;

/// PCIEXBAR: PCI Express register range base address, 64 bits at 0x60 (3 Series datasheet
/// 5.1.14; QEMU `MCH_HOST_BRIDGE_PCIEXBAR`).
pub const MCH_PCIEXBAR: u16 = 0x60;
/// PCIEXBAR width in bytes.
pub const MCH_PCIEXBAR_SIZE: u16 = 8;
/// Bit 0: PCIEXBAREN.
pub const PCIEXBAR_EN: u64 = 1 << 0;
/// Bits 2:1: LENGTH.
pub const PCIEXBAR_LENGTH_MASK: u64 = 0b110;
pub const PCIEXBAR_LENGTH_SHIFT: u32 = 1;
/// LENGTH 00b: 256 MiB, buses 0-255.
pub const PCIEXBAR_LENGTH_256M: u64 = 0;
/// LENGTH 01b: 128 MiB, buses 0-127.
pub const PCIEXBAR_LENGTH_128M: u64 = 1;
/// LENGTH 10b: 64 MiB, buses 0-63.
pub const PCIEXBAR_LENGTH_64M: u64 = 2;
/// LENGTH 11b: reserved.
pub const PCIEXBAR_LENGTH_RESERVED: u64 = 3;
/// Base address bits 35:28 (256 MiB alignment).
pub const PCIEXBAR_BASE_256M_MASK: u64 = 0xf_f000_0000;
/// Bit 27: 128ADMSK, an address bit when LENGTH is 128 MiB or 64 MiB (datasheet). QEMU 7.2
/// puts it at bit 26 (and 64ADMSK at 25), a known QEMU bug; ioreq-mux follows the datasheet.
pub const PCIEXBAR_128ADMSK: u64 = 1 << 27;
/// Bit 26: 64ADMSK, an address bit when LENGTH is 64 MiB.
pub const PCIEXBAR_64ADMSK: u64 = 1 << 26;
/// Writable bits: 35:26 and 2:0; the rest reads as zero.
pub const PCIEXBAR_WMASK: u64 = 0xf_fc00_0007;
/// Reset value: base 0xb0000000, 256 MiB, disabled (QEMU
/// `MCH_HOST_BRIDGE_PCIEXBAR_DEFAULT`).
pub const PCIEXBAR_DEFAULT: u64 = 0xb000_0000;

/// TOM: top of memory, 16 bits at 0xa0 (3/4 Series MCH; coreboot's x4x header). Not
/// modelled by QEMU 7.2 and not needed here: TOLUD and TOUUD bound the hole.
pub const MCH_TOM: u16 = 0xa0;
/// TOUUD: top of upper usable DRAM, 16 bits at 0xa2, bits 15:0 = address bits 35:20
/// (1 MiB granularity). Not modelled by QEMU 7.2 (reads 0).
pub const MCH_TOUUD: u16 = 0xa2;
pub const MCH_TOUUD_SIZE: u16 = 2;
/// TOUUD granularity shift.
pub const MCH_TOUUD_SHIFT: u32 = 20;
/// TOLUD: top of low usable DRAM, 16 bits at 0xb0, bits 15:4 = address bits 31:20 (OVMF's
/// Q35MchIch9.h: "MB shift 4"). Not modelled by QEMU 7.2 (reads 0).
pub const MCH_TOLUD: u16 = 0xb0;
pub const MCH_TOLUD_SIZE: u16 = 2;
/// TOLUD address bits live in register bits 15:4.
pub const MCH_TOLUD_MASK: u64 = 0xfff0;
/// Shift from the masked register value to the address.
pub const MCH_TOLUD_SHIFT: u32 = 16;

// ---- ICH9 LPC, 00:1f.0 ----

/// ICH9 LPC bridge device ID (QEMU `PCI_DEVICE_ID_INTEL_ICH9_8`).
pub const ICH9_LPC_DEVICE_ID: u16 = 0x2918;
/// LPC function: device 0x1f, function 0.
pub const ICH9_LPC_DEVFN: u8 = 0x1f << 3;
/// PMBASE: ACPI base address, 32 bits at 0x40 (ICH9 datasheet 13.1.10; QEMU
/// `ICH9_LPC_PMBASE`).
pub const ICH9_PMBASE: u16 = 0x40;
pub const ICH9_PMBASE_SIZE: u16 = 4;
/// Bits 15:7: base address of the 128-byte block (`ICH9_LPC_PMBASE_BASE_ADDRESS_MASK`).
pub const ICH9_PMBASE_MASK: u64 = 0xff80;
/// Bit 0: resource type indicator, reads 1 (I/O space).
pub const ICH9_PMBASE_RTE: u64 = 1;
/// Size of the ICH9 ACPI/PM I/O block.
pub const ICH9_PM_BLOCK_SIZE: u64 = 0x80;
/// ACPI_CNTL: ACPI control, 8 bits at 0x44 (ICH9 datasheet 13.1.11; QEMU
/// `ICH9_LPC_ACPI_CTRL`).
pub const ICH9_ACPI_CNTL: u16 = 0x44;
pub const ICH9_ACPI_CNTL_SIZE: u16 = 1;
/// Bit 7: ACPI_EN, the PM block decodes only while set.
pub const ICH9_ACPI_CNTL_ACPI_EN: u64 = 0x80;
/// Writable bits of ACPI_CNTL: ACPI_EN and the SCI IRQ select in bits 2:0.
pub const ICH9_ACPI_CNTL_WMASK: u64 = 0x87;
/// PMBASE reset value: base 0, I/O indicator set.
pub const ICH9_PMBASE_DEFAULT: u64 = 0x1;

// ---- i440FX / PIIX ----

/// i440FX host bridge device ID (QEMU `PCI_DEVICE_ID_INTEL_82441`).
pub const I440FX_DEVICE_ID: u16 = 0x1237;
/// PIIX3 ISA bridge at 00:01.0 (`PCI_DEVICE_ID_INTEL_82371SB_0`).
pub const PIIX3_ISA_DEVICE_ID: u16 = 0x7000;
/// PIIX4 power management function at 00:01.3 (`PCI_DEVICE_ID_INTEL_82371AB_3`).
pub const PIIX4_PM_DEVICE_ID: u16 = 0x7113;
/// PIIX3 devfn (00:01.0) and PIIX4 PM devfn (00:01.3).
pub const PIIX_ISA_DEVFN: u8 = 1 << 3;
pub const PIIX4_PM_DEVFN: u8 = (1 << 3) | 3;
/// PMBA: power management base address, 32 bits at 0x40 (PIIX4 datasheet 3.4.2.14).
pub const PIIX4_PMBA: u16 = 0x40;
pub const PIIX4_PMBA_SIZE: u16 = 4;
/// Bits 15:6: base of the 64-byte PM block.
pub const PIIX4_PMBA_MASK: u64 = 0xffc0;
pub const PIIX4_PM_BLOCK_SIZE: u64 = 0x40;
/// PMREGMISC at 0x80: bit 0 PMIOSE enables the PM I/O space (PIIX4 datasheet 3.4.2.26).
pub const PIIX4_PMREGMISC: u16 = 0x80;
pub const PIIX4_PMREGMISC_SIZE: u16 = 1;
pub const PIIX4_PMIOSE: u64 = 1;

// ---- fixed platform ranges ----

/// Local APIC window (Intel SDM vol. 3A, 10.4.1: default base 0xfee00000; the MSI address
/// range 0xfee00000-0xfeefffff is reserved, SDM 10.11.1).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
pub const LAPIC_LAST: u64 = 0xfeef_ffff;
/// I/O APIC range decoded by the chipset (ICH9 datasheet 9.4, 0xfec00000-0xfecfffff).
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
pub const IOAPIC_LAST: u64 = 0xfecf_ffff;
/// Legacy ports a PM block must never cover: the PCI configuration mechanism (0xcf8-0xcff),
/// the PICs (0x20/0xa0), the keyboard controller (0x60/0x64), the PIT (0x40-0x43).
pub const PROTECTED_PORTS: &[(u64, u64, &str)] = &[
    (0x20, 0x21, "PIC 1"),
    (0x40, 0x43, "PIT"),
    (0x60, 0x64, "keyboard controller"),
    (0xa0, 0xa1, "PIC 2"),
    (0xcf8, 0xcff, "PCI configuration ports"),
];
