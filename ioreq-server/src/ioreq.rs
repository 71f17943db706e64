//! The typed ioreq: what a vCPU asked for, with Xen's semantics.

use crate::abi::{self, AbiError, RawIoreq};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// `IOREQ_TYPE_*`: what kind of access an ioreq carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum IoreqType {
    /// Port I/O; `addr` is the port.
    Pio = abi::IOREQ_TYPE_PIO,
    /// MMIO ("copy"); `addr` is the guest-physical address.
    Copy = abi::IOREQ_TYPE_COPY,
    /// PCI configuration access; `addr` is SBDF << 32 | register.
    PciConfig = abi::IOREQ_TYPE_PCI_CONFIG,
    /// Broadcast of the guest's new time offset (no completion data).
    TimeOffset = abi::IOREQ_TYPE_TIMEOFFSET,
    /// Broadcast: flush mappings of guest memory (synchronous).
    Invalidate = abi::IOREQ_TYPE_INVALIDATE,
}

impl IoreqType {
    /// Decodes the `type` byte.
    pub fn from_u8(v: u8) -> Result<Self, AbiError> {
        Ok(match v {
            abi::IOREQ_TYPE_PIO => Self::Pio,
            abi::IOREQ_TYPE_COPY => Self::Copy,
            abi::IOREQ_TYPE_PCI_CONFIG => Self::PciConfig,
            abi::IOREQ_TYPE_TIMEOFFSET => Self::TimeOffset,
            abi::IOREQ_TYPE_INVALIDATE => Self::Invalidate,
            other => return Err(AbiError::UnknownType(other)),
        })
    }
}

/// `STATE_IOREQ_*`: where a slot is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum IoreqState {
    /// Slot free.
    None = abi::STATE_IOREQ_NONE,
    /// The hypervisor filled the slot and notified the server.
    Ready = abi::STATE_IOREQ_READY,
    /// The server took the request.
    InProcess = abi::STATE_IOREQ_INPROCESS,
    /// The server wrote the answer; the hypervisor may collect it.
    RespReady = abi::STATE_IORESP_READY,
}

impl IoreqState {
    /// Decodes the 4-bit state field.
    pub fn from_u8(v: u8) -> Result<Self, AbiError> {
        Ok(match v {
            abi::STATE_IOREQ_NONE => Self::None,
            abi::STATE_IOREQ_READY => Self::Ready,
            abi::STATE_IOREQ_INPROCESS => Self::InProcess,
            abi::STATE_IORESP_READY => Self::RespReady,
            other => return Err(AbiError::UnknownState(other)),
        })
    }
}

/// Direction of an access, from the guest's point of view (the ioreq's `dir`: 1 = read,
/// 0 = write). The one `Dir` of the workspace: traces and reports use it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    Read,
    Write,
}

impl std::fmt::Display for Dir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dir::Read => "read",
            Dir::Write => "write",
        })
    }
}

/// One ioreq as the hypervisor wrote it into a vCPU's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ioreq {
    pub addr: u64,
    /// Value written, value read (after completion), or a guest-physical buffer address when
    /// `data_is_ptr` is set.
    pub data: u64,
    /// Rep count; item i is at `addr + i * size` (minus with `df`).
    pub count: u32,
    /// Bytes per item.
    pub size: u32,
    pub vp_eport: u32,
    pub state: IoreqState,
    pub data_is_ptr: bool,
    pub dir: Dir,
    /// Direction flag of a rep access: addresses descend.
    pub df: bool,
    pub ty: IoreqType,
}

/// Ways a well-formed-in-layout ioreq can still be malformed for its type.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IoreqError {
    #[error(transparent)]
    Abi(#[from] AbiError),
    #[error("ioreq size {0} is not 1, 2, 4 or 8")]
    BadSize(u32),
    #[error("ioreq count is 0")]
    ZeroCount,
    #[error("port ioreq at {addr:#x} size {size} leaves the 16-bit port space")]
    PortOutOfRange { addr: u64, size: u32 },
    #[error("PCI_CONFIG ioreq with count {0} (config accesses are never rep)")]
    ConfigRep(u32),
    #[error("PCI_CONFIG ioreq with data_is_ptr")]
    ConfigPtr,
    #[error("PCI_CONFIG register {reg:#x} size {size} is beyond the 4 KiB config space")]
    ConfigRegister { reg: u32, size: u32 },
    #[error("PCI_CONFIG register {reg:#x} size {size} leaves its dword")]
    ConfigDword { reg: u32, size: u32 },
    #[error("MMIO ioreq at {addr:#x}, {count} x {size} bytes, wraps around the address space")]
    MmioWraps { addr: u64, size: u32, count: u32 },
}

impl Ioreq {
    /// A single (count 1, not a pointer) ioreq in the READY state.
    pub fn new(ty: IoreqType, dir: Dir, addr: u64, size: u32, data: u64) -> Self {
        Ioreq {
            addr,
            data,
            count: 1,
            size,
            vp_eport: 0,
            state: IoreqState::Ready,
            data_is_ptr: false,
            dir,
            df: false,
            ty,
        }
    }

    /// A PCI_CONFIG ioreq for `sbdf` (Xen packing) and register `reg`.
    pub fn pci_config(sbdf: u32, reg: u32, dir: Dir, size: u32, data: u64) -> Self {
        Self::new(
            IoreqType::PciConfig,
            dir,
            abi::pci_config_addr(sbdf, reg),
            size,
            data,
        )
    }

    /// Decodes the raw slot image. Only layout-level problems are errors here; use
    /// [`Ioreq::validate`] for type-level checks.
    pub fn from_raw(r: &RawIoreq) -> Result<Self, AbiError> {
        if r.flags & abi::FLAG_PAD1 != 0 {
            return Err(AbiError::ReservedFlag(r.flags));
        }
        Ok(Ioreq {
            addr: r.addr,
            data: r.data,
            count: r.count,
            size: r.size,
            vp_eport: r.vp_eport,
            state: IoreqState::from_u8(r.state())?,
            data_is_ptr: r.flags & abi::FLAG_DATA_IS_PTR != 0,
            dir: if r.flags & abi::FLAG_DIR_READ != 0 {
                Dir::Read
            } else {
                Dir::Write
            },
            df: r.flags & abi::FLAG_DF != 0,
            ty: IoreqType::from_u8(r.ty)?,
        })
    }

    /// Encodes into the raw slot image (padding zero).
    pub fn to_raw(&self) -> RawIoreq {
        let mut flags = self.state as u8;
        if self.data_is_ptr {
            flags |= abi::FLAG_DATA_IS_PTR;
        }
        if self.dir == Dir::Read {
            flags |= abi::FLAG_DIR_READ;
        }
        if self.df {
            flags |= abi::FLAG_DF;
        }
        RawIoreq {
            addr: self.addr,
            data: self.data,
            count: self.count,
            size: self.size,
            vp_eport: self.vp_eport,
            pad0: 0,
            flags,
            ty: self.ty as u8,
        }
    }

    /// Decodes a 32-byte slot image.
    pub fn from_bytes(b: &[u8; abi::IOREQ_SIZE]) -> Result<Self, AbiError> {
        Self::from_raw(&RawIoreq::from_bytes(b))
    }

    /// Encodes into a 32-byte slot image.
    pub fn to_bytes(&self) -> [u8; abi::IOREQ_SIZE] {
        self.to_raw().to_bytes()
    }

    /// Checks what Xen guarantees for each type, so a device model can rely on it.
    pub fn validate(&self) -> Result<(), IoreqError> {
        match self.ty {
            IoreqType::TimeOffset | IoreqType::Invalidate => return Ok(()),
            _ => {}
        }
        if !matches!(self.size, 1 | 2 | 4 | 8) {
            return Err(IoreqError::BadSize(self.size));
        }
        if self.count == 0 {
            return Err(IoreqError::ZeroCount);
        }
        match self.ty {
            IoreqType::Pio if self.addr.saturating_add(u64::from(self.size)) > 0x1_0000 => {
                return Err(IoreqError::PortOutOfRange {
                    addr: self.addr,
                    size: self.size,
                });
            }
            IoreqType::Copy if self.mmio_span_wraps() => {
                // No guest instruction spans the top of the address space; a claim check on
                // a wrapped span would compare a start above its end.
                return Err(IoreqError::MmioWraps {
                    addr: self.addr,
                    size: self.size,
                    count: self.count,
                });
            }
            IoreqType::PciConfig => {
                if self.count != 1 {
                    return Err(IoreqError::ConfigRep(self.count));
                }
                if self.data_is_ptr {
                    return Err(IoreqError::ConfigPtr);
                }
                let (_, reg) = abi::split_pci_config_addr(self.addr);
                if u64::from(reg) + u64::from(self.size) > 0x1000 {
                    return Err(IoreqError::ConfigRegister {
                        reg,
                        size: self.size,
                    });
                }
                // Xen makes PCI_CONFIG requests only from CFC..CFF accesses, which stay in
                // the 4-byte data window (`cf8_decode`): 1, 2 or 4 bytes inside one dword.
                if (reg & 3) + self.size > 4 {
                    return Err(IoreqError::ConfigDword {
                        reg,
                        size: self.size,
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether the bytes of every rep item (see [`Ioreq::byte_span`]) fail to fit between 0
    /// and 2^64 - 1 without wrapping.
    fn mmio_span_wraps(&self) -> bool {
        let size = u64::from(self.size);
        let reps = u64::from(self.count.saturating_sub(1));
        let Some(back) = reps.checked_mul(size) else {
            return true;
        };
        if self.df {
            self.addr.checked_sub(back).is_none() || self.addr.checked_add(size - 1).is_none()
        } else {
            self.addr
                .checked_add(back)
                .and_then(|a| a.checked_add(size - 1))
                .is_none()
        }
    }

    /// Mask of the `size` low bytes (all ones for 8).
    pub fn size_mask(&self) -> u64 {
        size_mask(self.size)
    }

    /// What Xen's server selection matches a port or MMIO request against: the range kind
    /// and the first and last address (a port request: the port and its size, Xen's
    /// `ioreq_server_select` ignores the rep count there; MMIO: [`Ioreq::byte_span`]).
    pub fn selection_span(&self) -> (crate::RangeKind, u64, u64) {
        if self.ty == IoreqType::Pio {
            let last = self.addr + u64::from(self.size) - 1;
            (crate::RangeKind::Port, self.addr, last)
        } else {
            let (s, e) = self.byte_span();
            (crate::RangeKind::Mmio, s, e)
        }
    }

    /// The lowest and highest byte addresses touched, for claim checks: Xen's rule is that a
    /// port or MMIO range matches only if it contains every byte of every rep item.
    pub fn byte_span(&self) -> (u64, u64) {
        let size = u64::from(self.size.max(1));
        let reps = u64::from(self.count.max(1)) - 1;
        if self.df {
            (
                self.addr.wrapping_sub(reps.wrapping_mul(size)),
                self.addr.wrapping_add(size - 1),
            )
        } else {
            (
                self.addr,
                self.addr.wrapping_add(reps.wrapping_mul(size) + size - 1),
            )
        }
    }
}

/// Mask of the `size` low bytes (all ones for 8 or more).
pub const fn size_mask(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_ioreq() -> impl Strategy<Value = Ioreq> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            0u8..4,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            prop::sample::select(vec![0u8, 1, 2, 7, 8]),
        )
            .prop_map(
                |(addr, data, count, size, port, st, ptr, rd, df, ty)| Ioreq {
                    addr,
                    data,
                    count,
                    size,
                    vp_eport: port,
                    state: IoreqState::from_u8(st).unwrap(),
                    data_is_ptr: ptr,
                    dir: if rd { Dir::Read } else { Dir::Write },
                    df,
                    ty: IoreqType::from_u8(ty).unwrap(),
                },
            )
    }

    proptest! {
        #[test]
        fn typed_roundtrip_is_exact(r in arb_ioreq()) {
            let b = r.to_bytes();
            prop_assert_eq!(Ioreq::from_bytes(&b).unwrap(), r);
        }

        #[test]
        fn decoding_any_bytes_never_panics(b in prop::array::uniform32(any::<u8>())) {
            if let Ok(r) = Ioreq::from_bytes(&b) {
                // Whatever decodes re-encodes to the same bytes, padding aside.
                let mut expect = b;
                expect[28] = 0;
                expect[29] = 0;
                prop_assert_eq!(r.to_bytes(), expect);
                let _ = r.validate();
            }
        }
    }

    #[test]
    fn unknown_type_and_state_are_errors() {
        let mut r = Ioreq::new(IoreqType::Pio, Dir::Read, 0x60, 1, 0).to_raw();
        r.ty = 3;
        assert_eq!(Ioreq::from_raw(&r), Err(AbiError::UnknownType(3)));
        r.ty = 0;
        r.flags = 0x05;
        assert_eq!(Ioreq::from_raw(&r), Err(AbiError::UnknownState(5)));
        r.flags = 0x81;
        assert_eq!(Ioreq::from_raw(&r), Err(AbiError::ReservedFlag(0x81)));
    }

    #[test]
    fn validate_rejects_what_xen_never_sends() {
        let ok = Ioreq::new(IoreqType::Pio, Dir::Read, 0xcfc, 4, 0);
        assert_eq!(ok.validate(), Ok(()));
        let mut r = ok;
        r.size = 3;
        assert_eq!(r.validate(), Err(IoreqError::BadSize(3)));
        r = ok;
        r.count = 0;
        assert_eq!(r.validate(), Err(IoreqError::ZeroCount));
        r = ok;
        r.addr = 0xfffe;
        assert!(matches!(
            r.validate(),
            Err(IoreqError::PortOutOfRange { .. })
        ));
        let mut c = Ioreq::pci_config(0x10, 0xffc, Dir::Read, 4, 0);
        assert_eq!(c.validate(), Ok(()));
        c.count = 2;
        assert_eq!(c.validate(), Err(IoreqError::ConfigRep(2)));
        c.count = 1;
        c.data_is_ptr = true;
        assert_eq!(c.validate(), Err(IoreqError::ConfigPtr));
        let c = Ioreq::pci_config(0x10, 0xffe, Dir::Read, 4, 0);
        assert!(matches!(
            c.validate(),
            Err(IoreqError::ConfigRegister { .. })
        ));
        let t = Ioreq::new(IoreqType::Invalidate, Dir::Write, 0, 0, 0);
        assert_eq!(t.validate(), Ok(()));
    }

    #[test]
    fn validate_rejects_mmio_spans_that_wrap() {
        // The last 8 bytes of the address space are fine; one more rep item wraps.
        let mut m = Ioreq::new(IoreqType::Copy, Dir::Write, u64::MAX - 7, 8, 0);
        assert_eq!(m.validate(), Ok(()));
        m.count = 2;
        let wraps = Err(IoreqError::MmioWraps {
            addr: u64::MAX - 7,
            size: 8,
            count: 2,
        });
        assert_eq!(m.validate(), wraps);
        // Backwards (df) from low addresses wraps below 0.
        let mut d = Ioreq::new(IoreqType::Copy, Dir::Read, 0x8, 4, 0);
        d.df = true;
        d.count = 3;
        assert_eq!(d.validate(), Ok(()), "0x0..0xb");
        d.count = 4;
        assert!(matches!(d.validate(), Err(IoreqError::MmioWraps { .. })));
        // A huge count whose byte length overflows.
        let mut h = Ioreq::new(IoreqType::Copy, Dir::Read, 0x1000, 8, 0);
        h.count = u32::MAX;
        assert_eq!(h.validate(), Ok(()), "2^35 bytes from 0x1000 fit");
        h.addr = u64::MAX - (1 << 34);
        assert!(matches!(h.validate(), Err(IoreqError::MmioWraps { .. })));
    }

    #[test]
    fn byte_span_follows_df() {
        let mut r = Ioreq::new(IoreqType::Copy, Dir::Write, 0x1000, 4, 0);
        r.count = 3;
        assert_eq!(r.byte_span(), (0x1000, 0x100b));
        r.df = true;
        assert_eq!(r.byte_span(), (0x0ff8, 0x1003));
    }
}
