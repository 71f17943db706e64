//! Xen's ioreq ABI: the 32-byte `ioreq_t`, the 8-byte `buf_ioreq_t` and the constants that
//! give their fields meaning.
//!
//! Every fact here is from `xen/include/public/hvm/ioreq.h` (Xen 4.17, MIT licence). The layouts
//! are checked against the bindgen-generated types in `xen-ffi`'s layout tests.
//!
//! `ioreq_t` (32 bytes, little endian):
//!
//! | offset | width | field                                                        |
//! |--------|-------|--------------------------------------------------------------|
//! | 0      | 8     | `addr`                                                       |
//! | 8      | 8     | `data` (a guest-physical address when `data_is_ptr`)         |
//! | 16     | 4     | `count` (rep count)                                          |
//! | 20     | 4     | `size` (bytes per item)                                      |
//! | 24     | 4     | `vp_eport` (event channel of the vCPU)                       |
//! | 28     | 2     | `_pad0`                                                      |
//! | 30     | 1     | bits 3:0 `state`, bit 4 `data_is_ptr`, bit 5 `dir`, bit 6 `df` |
//! | 31     | 1     | `type`                                                       |

use thiserror::Error;

/// `MAX_NR_IOREQ_SERVERS` (xen/include/xen/ioreq.h in 4.17): ioreq servers per domain.
pub const MAX_NR_IOREQ_SERVERS: usize = 8;
/// `MAX_NR_IO_RANGES` (xen/common/ioreq.c): ranges per range set of one server.
pub const MAX_NR_IO_RANGES: usize = 256;

/// Size of `ioreq_t` in bytes.
pub const IOREQ_SIZE: usize = 32;
/// Size of `buf_ioreq_t` in bytes.
pub const BUF_IOREQ_SIZE: usize = 8;
/// `IOREQ_BUFFER_SLOT_NUM`: slots in the buffered page after the two 32-bit pointers.
pub const IOREQ_BUFFER_SLOT_NUM: u32 = 511;
/// Slots in the synchronous shared page: one `ioreq_t` per vCPU in a 4 KiB page
/// (`HVM_MAX_VCPUS` = 128 in `public/hvm/hvm_info_table.h`).
pub const SHARED_PAGE_SLOTS: usize = 4096 / IOREQ_SIZE;

/// `IOREQ_READ` / `IOREQ_WRITE`.
pub const IOREQ_READ: u8 = 1;
pub const IOREQ_WRITE: u8 = 0;

/// `STATE_IOREQ_*` values of the 4-bit `state` field.
pub const STATE_IOREQ_NONE: u8 = 0;
pub const STATE_IOREQ_READY: u8 = 1;
pub const STATE_IOREQ_INPROCESS: u8 = 2;
pub const STATE_IORESP_READY: u8 = 3;

/// `IOREQ_TYPE_*` values of the `type` byte.
pub const IOREQ_TYPE_PIO: u8 = 0;
pub const IOREQ_TYPE_COPY: u8 = 1;
pub const IOREQ_TYPE_PCI_CONFIG: u8 = 2;
pub const IOREQ_TYPE_TIMEOFFSET: u8 = 7;
pub const IOREQ_TYPE_INVALIDATE: u8 = 8;

/// Byte 30 of `ioreq_t`: bit masks of the bitfield byte.
pub const FLAG_STATE_MASK: u8 = 0x0f;
pub const FLAG_DATA_IS_PTR: u8 = 0x10;
pub const FLAG_DIR_READ: u8 = 0x20;
pub const FLAG_DF: u8 = 0x40;
/// Bit 7 is `_pad1`; Xen never sets it.
pub const FLAG_PAD1: u8 = 0x80;

/// `HVM_IOREQSRV_BUFIOREQ_*` (public/hvm/hvm_op.h, under `__XEN_TOOLS__`): how a server wants
/// buffered ioreqs.
pub const HVM_IOREQSRV_BUFIOREQ_OFF: u8 = 0;
pub const HVM_IOREQSRV_BUFIOREQ_LEGACY: u8 = 1;
pub const HVM_IOREQSRV_BUFIOREQ_ATOMIC: u8 = 2;

/// `XEN_DMOP_IO_RANGE_*` (public/hvm/dm_op.h): the three kinds of range a server claims.
pub const XEN_DMOP_IO_RANGE_PORT: u32 = 0;
pub const XEN_DMOP_IO_RANGE_MEMORY: u32 = 1;
pub const XEN_DMOP_IO_RANGE_PCI: u32 = 2;

/// The `ioreq_t` layout as a plain `repr(C)` struct with the bitfield byte kept whole.
///
/// This is the exact memory image of one slot of Xen's shared ioreq page; the typed
/// [`crate::Ioreq`] converts to and from it without loss.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawIoreq {
    pub addr: u64,
    pub data: u64,
    pub count: u32,
    pub size: u32,
    pub vp_eport: u32,
    pub pad0: u16,
    /// bits 3:0 state, bit 4 data_is_ptr, bit 5 dir, bit 6 df, bit 7 pad.
    pub flags: u8,
    pub ty: u8,
}

const _: () = assert!(std::mem::size_of::<RawIoreq>() == IOREQ_SIZE);

impl RawIoreq {
    /// Reads the 32-byte little-endian image.
    pub fn from_bytes(b: &[u8; IOREQ_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        RawIoreq {
            addr: u64_at(0),
            data: u64_at(8),
            count: u32_at(16),
            size: u32_at(20),
            vp_eport: u32_at(24),
            pad0: u16::from_le_bytes([b[28], b[29]]),
            flags: b[30],
            ty: b[31],
        }
    }

    /// Writes the 32-byte little-endian image.
    pub fn to_bytes(&self) -> [u8; IOREQ_SIZE] {
        let mut b = [0u8; IOREQ_SIZE];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.data.to_le_bytes());
        b[16..20].copy_from_slice(&self.count.to_le_bytes());
        b[20..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..28].copy_from_slice(&self.vp_eport.to_le_bytes());
        b[28..30].copy_from_slice(&self.pad0.to_le_bytes());
        b[30] = self.flags;
        b[31] = self.ty;
        b
    }

    /// The 4-bit `state` field.
    pub fn state(&self) -> u8 {
        self.flags & FLAG_STATE_MASK
    }
}

/// Errors in a raw `ioreq_t` image that make it impossible to interpret.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AbiError {
    #[error(
        "unknown ioreq type {0} (known: 0 PIO, 1 COPY, 2 PCI_CONFIG, 7 TIMEOFFSET, 8 INVALIDATE)"
    )]
    UnknownType(u8),
    #[error("unknown ioreq state {0} (known: 0 NONE, 1 READY, 2 INPROCESS, 3 IORESP_READY)")]
    UnknownState(u8),
    #[error("reserved bit 7 of the ioreq flags byte is set (flags {0:#04x})")]
    ReservedFlag(u8),
    #[error("buffered ioreq size code {0} needs a second slot that is missing")]
    MissingSecondSlot(u8),
    #[error("buffered ioreq of type {0} is not PIO or COPY")]
    BufferedType(u8),
}

/// Packs a 32-bit SBDF and a register offset into a PCI_CONFIG `addr`: SBDF in bits 63:32,
/// register in bits 31:0 (xen/common/ioreq.c, `ioreq_server_select`, and
/// `XEN_DMOP_PCI_SBDF` in public/hvm/dm_op.h for the SBDF packing).
pub const fn pci_config_addr(sbdf: u32, reg: u32) -> u64 {
    ((sbdf as u64) << 32) | reg as u64
}

/// Splits a PCI_CONFIG `addr` into (SBDF, register).
pub const fn split_pci_config_addr(addr: u64) -> (u32, u32) {
    ((addr >> 32) as u32, addr as u32)
}

/// `XEN_DMOP_PCI_SBDF(s, b, d, f)`: segment 31:16, bus 15:8, device 7:3, function 2:0.
/// The one place this packing is written: `bdf_router::Sbdf` converts through it.
pub const fn pack_sbdf(seg: u16, bus: u8, dev: u8, func: u8) -> u32 {
    ((seg as u32) << 16) | ((bus as u32) << 8) | (((dev & 0x1f) as u32) << 3) | (func & 7) as u32
}

/// The inverse of [`pack_sbdf`]: (segment, bus, device, function). Every u32 is an SBDF.
pub const fn unpack_sbdf(v: u32) -> (u16, u8, u8, u8) {
    (
        (v >> 16) as u16,
        (v >> 8) as u8,
        ((v >> 3) & 0x1f) as u8,
        (v & 7) as u8,
    )
}

/// Port of the PCI configuration address register (PCI Local Bus spec 3.0, 3.2.2.3.2).
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// First port of the 4-byte PCI configuration data window (same section).
pub const PCI_CONFIG_DATA_PORT: u16 = 0xcfc;
/// CF8 bit 31: configuration-space enable.
pub const CF8_ENABLE: u32 = 1 << 31;

/// Xen's CF8/CFC conversion (`arch_ioreq_server_get_type_addr`, xen/arch/x86/hvm/ioreq.c):
/// a CFC..CFF access while the latched CF8 has its enable bit set becomes a PCI_CONFIG
/// access to SBDF `0:bus:dev.fn` (CF8 bits 23:16, 15:11, 10:8) and register
/// `(CF8 & 0xfc) | (port & 3)`. Returns `(sbdf, reg)`, or `None` if the access is not such an
/// access. Xen only adds the AMD extended-register bits (CF8 27:24) on AMD family 10h-16h
/// guests with NB_CFG's CF8 extension enabled; we never do.
pub const fn cf8_decode(cf8: u32, port: u16, size: u32) -> Option<(u32, u32)> {
    if cf8 & CF8_ENABLE == 0 || port < PCI_CONFIG_DATA_PORT || port > PCI_CONFIG_DATA_PORT + 3 {
        return None;
    }
    // The whole access must stay inside the 4-byte data window (written so that no size
    // overflows it).
    if size > 4 - (port - PCI_CONFIG_DATA_PORT) as u32 {
        return None;
    }
    let sbdf = (cf8 >> 8) & 0xffff;
    let reg = (cf8 & 0xfc) | (port & 3) as u32;
    Some((sbdf, reg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_roundtrip_is_exact() {
        let mut b = [0u8; IOREQ_SIZE];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(37).wrapping_add(5);
        }
        assert_eq!(RawIoreq::from_bytes(&b).to_bytes(), b);
    }

    #[test]
    fn field_offsets_match_header() {
        let r = RawIoreq {
            addr: 0x1122334455667788,
            data: 0x99aabbccddeeff00,
            count: 0x01020304,
            size: 4,
            vp_eport: 0x0a0b0c0d,
            pad0: 0,
            flags: STATE_IOREQ_READY | FLAG_DIR_READ,
            ty: IOREQ_TYPE_PCI_CONFIG,
        };
        let b = r.to_bytes();
        assert_eq!(b[0], 0x88);
        assert_eq!(b[8], 0x00);
        assert_eq!(b[15], 0x99);
        assert_eq!(&b[16..20], &[4, 3, 2, 1]);
        assert_eq!(b[20], 4);
        assert_eq!(b[24], 0x0d);
        assert_eq!(b[30], 0x21);
        assert_eq!(b[31], 2);
    }

    #[test]
    fn cf8_decode_follows_xen() {
        // 00:02.1 register 0x18, byte 1 through port 0xcfd.
        let cf8 = CF8_ENABLE | (2 << 11) | (1 << 8) | 0x18;
        assert_eq!(
            cf8_decode(cf8, 0xcfd, 1),
            Some((pack_sbdf(0, 0, 2, 1), 0x19))
        );
        assert_eq!(cf8_decode(cf8 & !CF8_ENABLE, 0xcfc, 4), None);
        assert_eq!(
            cf8_decode(cf8, 0xcfe, 4),
            None,
            "crosses the end of the data window"
        );
        assert_eq!(cf8_decode(cf8, 0xcf8, 4), None);
        // The low two bits of CF8 are ignored.
        assert_eq!(
            cf8_decode(cf8 | 3, 0xcfc, 4),
            Some((pack_sbdf(0, 0, 2, 1), 0x18))
        );
    }

    #[test]
    fn pci_config_addr_roundtrip() {
        let sbdf = pack_sbdf(1, 0x80, 0x1f, 7);
        assert_eq!(sbdf, 0x0001_80ff);
        let a = pci_config_addr(sbdf, 0xffc);
        assert_eq!(a, 0x0001_80ff_0000_0ffc);
        assert_eq!(split_pci_config_addr(a), (sbdf, 0xffc));
    }
}
