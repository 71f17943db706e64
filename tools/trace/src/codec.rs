//! Binary encoding of the records inside the zstd stream (see `docs/trace-format.md`).

use super::{
    Access, BarEvent, BarEventKind, ConfigAnnotation, ConfigPath, Dir, Sbdf, Space, StrId,
};

/// Record tags below 0x80; an access record's tag has bit 7 set and carries flags.
pub(crate) const TAG_DEFINE_STRING: u8 = 0x01;
pub(crate) const TAG_BAR_EVENT: u8 = 0x02;
pub(crate) const TAG_END: u8 = 0x03;

/// Access tag bits.
pub(crate) const ACC_RECORD: u8 = 0x80;
const ACC_WRITE: u8 = 0x01;
const ACC_MMIO: u8 = 0x02;
const ACC_SIZE_SHIFT: u8 = 2; // two bits: log2(size)
const ACC_CONFIG: u8 = 0x10;
const ACC_REPEAT: u8 = 0x20;
const ACC_EXT: u8 = 0x40;

/// Access extension byte bits.
const EXT_VCPU: u8 = 0x01;
const EXT_REP: u8 = 0x02;
const EXT_NO_REGION: u8 = 0x04;
const EXT_KNOWN: u8 = EXT_VCPU | EXT_REP | EXT_NO_REGION;

/// Config annotation flag bits.
const CFG_ECAM: u8 = 0x01;
const CFG_DEVICE: u8 = 0x02;
const CFG_KNOWN: u8 = CFG_ECAM | CFG_DEVICE;

/// BAR event flag bits.
const BAR_UNMAP: u8 = 0x01;
const BAR_PORT: u8 = 0x02;
const BAR_DEVICE: u8 = 0x04;
const BAR_KNOWN: u8 = BAR_UNMAP | BAR_PORT | BAR_DEVICE;

/// Upper bound of an encoded access or BAR record (the largest fixed-shape records):
/// access: tag, ext, 2x10 (addr, data), 5 (region), 3 (vcpu), 5 (rep), config 1+1+1+3+5,
/// repeat 10 = 56; BAR event: tag, flags, 5, 1, 1, 1, 10, 10 = 30.
pub(crate) const MAX_FIXED_RECORD: usize = 64;

#[inline]
pub(crate) fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn size_log2(size: u8) -> Option<u8> {
    match size {
        1 => Some(0),
        2 => Some(1),
        4 => Some(2),
        8 => Some(3),
        _ => None,
    }
}

/// Appends an access record. The caller has validated `size` (1/2/4/8) and the string ids.
pub(crate) fn encode_access(buf: &mut Vec<u8>, a: &Access, repeat: u64) {
    let mut tag = ACC_RECORD;
    if a.dir == Dir::Write {
        tag |= ACC_WRITE;
    }
    if a.space == Space::Mmio {
        tag |= ACC_MMIO;
    }
    tag |= size_log2(a.size).unwrap_or(0) << ACC_SIZE_SHIFT;
    if a.config.is_some() {
        tag |= ACC_CONFIG;
    }
    if repeat != 1 {
        tag |= ACC_REPEAT;
    }
    let mut ext = 0u8;
    if a.vcpu != 0 {
        ext |= EXT_VCPU;
    }
    if a.rep != 1 {
        ext |= EXT_REP;
    }
    if a.region.is_none() {
        ext |= EXT_NO_REGION;
    }
    if ext != 0 {
        tag |= ACC_EXT;
    }
    buf.push(tag);
    if ext != 0 {
        buf.push(ext);
    }
    put_varint(buf, a.addr);
    put_varint(buf, a.data);
    if let Some(StrId(r)) = a.region {
        put_varint(buf, u64::from(r));
    }
    if a.vcpu != 0 {
        put_varint(buf, u64::from(a.vcpu));
    }
    if a.rep != 1 {
        put_varint(buf, u64::from(a.rep));
    }
    if let Some(c) = &a.config {
        let mut flags = 0u8;
        if c.path == ConfigPath::Ecam {
            flags |= CFG_ECAM;
        }
        if c.device.is_some() {
            flags |= CFG_DEVICE;
        }
        buf.push(flags);
        buf.push(c.sbdf.bus);
        buf.push(c.sbdf.devfn());
        put_varint(buf, u64::from(c.reg));
        if let Some(StrId(d)) = c.device {
            put_varint(buf, u64::from(d));
        }
    }
    if repeat != 1 {
        put_varint(buf, repeat);
    }
}

pub(crate) fn encode_bar(buf: &mut Vec<u8>, e: &BarEvent) {
    buf.push(TAG_BAR_EVENT);
    let mut flags = 0u8;
    if e.kind == BarEventKind::Unmap {
        flags |= BAR_UNMAP;
    }
    if e.space == Space::Port {
        flags |= BAR_PORT;
    }
    if e.device.is_some() {
        flags |= BAR_DEVICE;
    }
    buf.push(flags);
    if let Some(StrId(d)) = e.device {
        put_varint(buf, u64::from(d));
    }
    buf.push(e.sbdf.bus);
    buf.push(e.sbdf.devfn());
    buf.push(e.bar);
    put_varint(buf, e.base);
    put_varint(buf, e.size);
}

/// Why decoding stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// Ran out of bytes.
    Short,
    /// The bytes are not a valid encoding.
    Bad(&'static str),
}

/// A bounds-checked reading position in a byte slice.
pub(crate) struct Cursor<'a> {
    data: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Cursor<'a> {
    #[inline]
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Cursor { data, pos: 0 }
    }

    #[inline]
    pub(crate) fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self.data.get(self.pos).ok_or(DecodeError::Short)?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    pub(crate) fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        let mut shift = 0u32;
        loop {
            let b = self.byte()?;
            if shift == 63 && b > 1 {
                return Err(DecodeError::Bad("varint overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
            if shift > 63 {
                return Err(DecodeError::Bad("varint longer than 10 bytes"));
            }
        }
    }

    #[inline]
    fn varint_u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        u32::try_from(self.varint()?).map_err(|_| DecodeError::Bad(what))
    }

    #[inline]
    fn string_id(&mut self, n_strings: usize) -> Result<StrId, DecodeError> {
        let id = self.varint_u32("string id out of range")?;
        if (id as usize) < n_strings {
            Ok(StrId(id))
        } else {
            Err(DecodeError::Bad("reference to an undefined string id"))
        }
    }
}

/// Decodes an access record whose tag byte has already been consumed.
#[inline]
pub(crate) fn decode_access(
    c: &mut Cursor<'_>,
    tag: u8,
    n_strings: usize,
) -> Result<(Access, u64), DecodeError> {
    let dir = if tag & ACC_WRITE != 0 {
        Dir::Write
    } else {
        Dir::Read
    };
    let space = if tag & ACC_MMIO != 0 {
        Space::Mmio
    } else {
        Space::Port
    };
    let size = 1u8 << ((tag >> ACC_SIZE_SHIFT) & 3);
    let ext = if tag & ACC_EXT != 0 {
        let e = c.byte()?;
        if e & !EXT_KNOWN != 0 {
            return Err(DecodeError::Bad("unknown access extension flags"));
        }
        e
    } else {
        0
    };
    let addr = c.varint()?;
    let data = c.varint()?;
    let region = if ext & EXT_NO_REGION == 0 {
        Some(c.string_id(n_strings)?)
    } else {
        None
    };
    let vcpu = if ext & EXT_VCPU != 0 {
        u16::try_from(c.varint()?).map_err(|_| DecodeError::Bad("vcpu out of range"))?
    } else {
        0
    };
    let rep = if ext & EXT_REP != 0 {
        let r = c.varint_u32("rep count out of range")?;
        if r == 0 {
            return Err(DecodeError::Bad("rep count 0"));
        }
        r
    } else {
        1
    };
    let config = if tag & ACC_CONFIG != 0 {
        let flags = c.byte()?;
        if flags & !CFG_KNOWN != 0 {
            return Err(DecodeError::Bad("unknown config annotation flags"));
        }
        let bus = c.byte()?;
        let devfn = c.byte()?;
        let reg = u16::try_from(c.varint()?)
            .map_err(|_| DecodeError::Bad("config register out of range"))?;
        let device = if flags & CFG_DEVICE != 0 {
            Some(c.string_id(n_strings)?)
        } else {
            None
        };
        Some(ConfigAnnotation {
            path: if flags & CFG_ECAM != 0 {
                ConfigPath::Ecam
            } else {
                ConfigPath::Cf8
            },
            sbdf: Sbdf::from_devfn(0, bus, devfn),
            reg,
            device,
        })
    } else {
        None
    };
    let repeat = if tag & ACC_REPEAT != 0 {
        let r = c.varint()?;
        if r == 0 {
            return Err(DecodeError::Bad("repeat count 0"));
        }
        r
    } else {
        1
    };
    Ok((
        Access {
            vcpu,
            space,
            dir,
            addr,
            size,
            rep,
            data,
            region,
            config,
        },
        repeat,
    ))
}

/// Decodes a BAR event whose tag byte has already been consumed.
pub(crate) fn decode_bar(c: &mut Cursor<'_>, n_strings: usize) -> Result<BarEvent, DecodeError> {
    let flags = c.byte()?;
    if flags & !BAR_KNOWN != 0 {
        return Err(DecodeError::Bad("unknown BAR event flags"));
    }
    let device = if flags & BAR_DEVICE != 0 {
        Some(c.string_id(n_strings)?)
    } else {
        None
    };
    let bus = c.byte()?;
    let devfn = c.byte()?;
    let bar = c.byte()?;
    let base = c.varint()?;
    let size = c.varint()?;
    Ok(BarEvent {
        kind: if flags & BAR_UNMAP != 0 {
            BarEventKind::Unmap
        } else {
            BarEventKind::Map
        },
        device,
        sbdf: Sbdf::from_devfn(0, bus, devfn),
        bar,
        space: if flags & BAR_PORT != 0 {
            Space::Port
        } else {
            Space::Mmio
        },
        base,
        size,
    })
}
