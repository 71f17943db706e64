//! The control-socket protocol between the multiplexer and an out-of-process device model:
//! message layouts, their encoding and a decoder that turns every malformed packet into a
//! [`WireError`] (never a panic). `docs/dm-protocol.md` is the normative description; the
//! tables here are the same facts.
//!
//! Every packet on the SOCK_SEQPACKET socket is one message: a 16-byte header and a body,
//! all little endian.
//!
//! | offset | width | field                                                     |
//! |--------|-------|-----------------------------------------------------------|
//! | 0      | 4     | magic `"IOMX"`                                            |
//! | 4      | 2     | version (2)                                               |
//! | 6      | 2     | op                                                        |
//! | 8      | 4     | tag: chosen by the sender of a request, echoed in its reply; 0 in notices |
//! | 12     | 4     | body length (= packet length - 16)                        |

use crate::bufioreq::BufioreqMode;
use crate::range::{IoRange, Position, RangeKind};
use std::fmt;
use thiserror::Error;

/// Bytes 0..4 of every message.
pub const MAGIC: [u8; 4] = *b"IOMX";
/// The protocol version this code speaks. Version 2 added the notification page (a third
/// page of shared memory, [`super::notify`]) and `notify_offset` in the
/// GET_IOREQ_SERVER_INFO reply; every other message is laid out as in version 1.
pub const VERSION: u16 = 2;
/// The oldest version whose ERROR reply is laid out as this version's: a packet of a version
/// from here up to [`VERSION`] is refused with an ERROR framed in the peer's own version,
/// which that peer can decode ([`encode_refusal`]).
pub const OLDEST_KNOWN_VERSION: u16 = 1;
/// Size of the message header.
pub const HEADER_SIZE: usize = 16;
/// Largest message either side sends or accepts, header included.
pub const MAX_MESSAGE: usize = 4096;
/// Longest server name, in bytes of UTF-8.
pub const MAX_NAME: usize = 64;
/// Most hops in a position (bridges between the root bus and the function, plus one).
pub const MAX_HOPS: usize = 32;
/// Longest text in an error reply or a goodbye notice.
pub const MAX_TEXT: usize = 1024;

/// Op numbers. 1..=6 and 14 are Xen's DMOP numbers (`XEN_DMOP_*`, public/hvm/dm_op.h);
/// 0x101.. are ioreq-mux's own. A successful reply has the request's op with bit 15 set.
pub mod op {
    pub const CREATE_IOREQ_SERVER: u16 = 1;
    pub const GET_IOREQ_SERVER_INFO: u16 = 2;
    pub const MAP_IO_RANGE_TO_IOREQ_SERVER: u16 = 3;
    pub const UNMAP_IO_RANGE_FROM_IOREQ_SERVER: u16 = 4;
    pub const SET_IOREQ_SERVER_STATE: u16 = 5;
    pub const DESTROY_IOREQ_SERVER: u16 = 6;
    /// `XEN_DMOP_inject_msi` (14, public/hvm/dm_op.h).
    pub const INJECT_MSI: u16 = 14;
    pub const MAP_PCIDEV_TO_IOREQ_SERVER: u16 = 0x101;
    pub const UNMAP_PCIDEV_FROM_IOREQ_SERVER: u16 = 0x102;
    pub const MAP_POSITION_TO_IOREQ_SERVER: u16 = 0x103;
    pub const UNMAP_POSITION_FROM_IOREQ_SERVER: u16 = 0x104;
    /// Set in the op of a successful reply.
    pub const REPLY: u16 = 0x8000;
    /// A failed request's reply.
    pub const ERROR: u16 = 0xffff;
    /// Multiplexer -> device model notices (tag 0, never answered).
    pub const POSITION_MOVED: u16 = 0x4001;
    pub const GOODBYE: u16 = 0x4002;

    /// Every request op, in order.
    pub const REQUESTS: [u16; 11] = [
        CREATE_IOREQ_SERVER,
        GET_IOREQ_SERVER_INFO,
        MAP_IO_RANGE_TO_IOREQ_SERVER,
        UNMAP_IO_RANGE_FROM_IOREQ_SERVER,
        SET_IOREQ_SERVER_STATE,
        DESTROY_IOREQ_SERVER,
        MAP_PCIDEV_TO_IOREQ_SERVER,
        UNMAP_PCIDEV_FROM_IOREQ_SERVER,
        MAP_POSITION_TO_IOREQ_SERVER,
        UNMAP_POSITION_FROM_IOREQ_SERVER,
        INJECT_MSI,
    ];

    /// A name for logs.
    pub fn name(op: u16) -> &'static str {
        match op & !REPLY {
            _ if op == ERROR => "ERROR",
            _ if op == POSITION_MOVED => "POSITION_MOVED",
            _ if op == GOODBYE => "GOODBYE",
            CREATE_IOREQ_SERVER => "CREATE_IOREQ_SERVER",
            GET_IOREQ_SERVER_INFO => "GET_IOREQ_SERVER_INFO",
            MAP_IO_RANGE_TO_IOREQ_SERVER => "MAP_IO_RANGE_TO_IOREQ_SERVER",
            UNMAP_IO_RANGE_FROM_IOREQ_SERVER => "UNMAP_IO_RANGE_FROM_IOREQ_SERVER",
            SET_IOREQ_SERVER_STATE => "SET_IOREQ_SERVER_STATE",
            DESTROY_IOREQ_SERVER => "DESTROY_IOREQ_SERVER",
            MAP_PCIDEV_TO_IOREQ_SERVER => "MAP_PCIDEV_TO_IOREQ_SERVER",
            UNMAP_PCIDEV_FROM_IOREQ_SERVER => "UNMAP_PCIDEV_FROM_IOREQ_SERVER",
            MAP_POSITION_TO_IOREQ_SERVER => "MAP_POSITION_TO_IOREQ_SERVER",
            UNMAP_POSITION_FROM_IOREQ_SERVER => "UNMAP_POSITION_FROM_IOREQ_SERVER",
            INJECT_MSI => "INJECT_MSI",
            _ => "unknown",
        }
    }
}

/// An error code: a Linux errno number, as Xen's DMOPs return them.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Code(pub u32);

impl Code {
    /// Goodbye after a clean `DESTROY` or a clean shutdown.
    pub const NONE: Code = Code(0);
    /// The claim is outside the server's grant, or the op names a server that is not yours.
    pub const EPERM: Code = Code(1);
    /// Not mapped; no such server (id or configured name).
    pub const ENOENT: Code = Code(2);
    /// The multiplexer failed internally (its engine is gone).
    pub const EIO: Code = Code(5);
    /// Not now: an MSI sent while the device model serves a broadcast (INVALIDATE).
    pub const EAGAIN: Code = Code(11);
    /// The peer's uid is not the one configured for the server.
    pub const EACCES: Code = Code(13);
    /// Claimed by another server; the server name is connected already.
    pub const EBUSY: Code = Code(16);
    /// Overlaps a range this server has; a second CREATE on one connection.
    pub const EEXIST: Code = Code(17);
    /// A body that does not decode, or a value out of range.
    pub const EINVAL: Code = Code(22);
    /// The hypervisor's limit of ranges is reached.
    pub const ENOSPC: Code = Code(28);
    /// Unknown op.
    pub const ENOSYS: Code = Code(38);
    /// Bad magic, a header whose length does not match the packet, a reply or notice sent to
    /// the multiplexer, file descriptors attached to a request, an op out of state order; in a
    /// goodbye: the device model broke the slot protocol.
    pub const EPROTO: Code = Code(71);
    /// Packet larger than [`MAX_MESSAGE`] (or truncated on receive).
    pub const EMSGSIZE: Code = Code(90);
    /// Unsupported protocol version.
    pub const EPROTONOSUPPORT: Code = Code(93);
    /// The op is known but the hypervisor behind the multiplexer cannot do it (INJECT_MSI
    /// on a backend that cannot interrupt the guest).
    pub const EOPNOTSUPP: Code = Code(95);
    /// Goodbye: the multiplexer is shutting down.
    pub const ESHUTDOWN: Code = Code(108);
    /// The engine did not apply the op in time; in a goodbye: a request exceeded its deadline.
    pub const ETIMEDOUT: Code = Code(110);

    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "OK",
            1 => "EPERM",
            2 => "ENOENT",
            5 => "EIO",
            11 => "EAGAIN",
            13 => "EACCES",
            16 => "EBUSY",
            17 => "EEXIST",
            22 => "EINVAL",
            28 => "ENOSPC",
            38 => "ENOSYS",
            71 => "EPROTO",
            90 => "EMSGSIZE",
            93 => "EPROTONOSUPPORT",
            95 => "EOPNOTSUPP",
            108 => "ESHUTDOWN",
            110 => "ETIMEDOUT",
            _ => "E?",
        }
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What a device model asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `create_ioreq_server`: one server per connection, named as in the multiplexer's
    /// configuration. Starts disabled.
    Create {
        bufioreq: BufioreqMode,
        name: String,
    },
    /// `get_ioreq_server_info`: the reply carries the shared memory and the eventfds.
    GetInfo {
        id: u16,
    },
    /// `map_io_range_to_ioreq_server` (port, memory or PCI SBDF range).
    MapRange {
        id: u16,
        range: IoRange,
    },
    /// `unmap_io_range_from_ioreq_server`: exactly a range mapped before.
    UnmapRange {
        id: u16,
        range: IoRange,
    },
    /// `set_ioreq_server_state`.
    SetState {
        id: u16,
        enabled: bool,
    },
    /// `destroy_ioreq_server`: claims are released, the shared memory is abandoned.
    Destroy {
        id: u16,
    },
    /// `map_pcidev_to_ioreq_server`: one function (a PCI range of one SBDF).
    MapPcidev {
        id: u16,
        sbdf: u32,
    },
    UnmapPcidev {
        id: u16,
        sbdf: u32,
    },
    /// ioreq-mux: claim a function by its place behind bridges.
    MapPosition {
        id: u16,
        position: Position,
    },
    UnmapPosition {
        id: u16,
        position: Position,
    },
    /// `inject_msi`: the guest gets a message-signalled interrupt, a write of `data` to
    /// `addr`. The multiplexer passes both to the hypervisor unchecked.
    InjectMsi {
        id: u16,
        addr: u64,
        data: u32,
    },
}

impl Request {
    pub fn op(&self) -> u16 {
        match self {
            Request::Create { .. } => op::CREATE_IOREQ_SERVER,
            Request::GetInfo { .. } => op::GET_IOREQ_SERVER_INFO,
            Request::MapRange { .. } => op::MAP_IO_RANGE_TO_IOREQ_SERVER,
            Request::UnmapRange { .. } => op::UNMAP_IO_RANGE_FROM_IOREQ_SERVER,
            Request::SetState { .. } => op::SET_IOREQ_SERVER_STATE,
            Request::Destroy { .. } => op::DESTROY_IOREQ_SERVER,
            Request::MapPcidev { .. } => op::MAP_PCIDEV_TO_IOREQ_SERVER,
            Request::UnmapPcidev { .. } => op::UNMAP_PCIDEV_FROM_IOREQ_SERVER,
            Request::MapPosition { .. } => op::MAP_POSITION_TO_IOREQ_SERVER,
            Request::UnmapPosition { .. } => op::UNMAP_POSITION_FROM_IOREQ_SERVER,
            Request::InjectMsi { .. } => op::INJECT_MSI,
        }
    }

    /// The server id the request names (`None` for CREATE).
    pub fn id(&self) -> Option<u16> {
        match self {
            Request::Create { .. } => None,
            Request::GetInfo { id }
            | Request::MapRange { id, .. }
            | Request::UnmapRange { id, .. }
            | Request::SetState { id, .. }
            | Request::Destroy { id }
            | Request::MapPcidev { id, .. }
            | Request::UnmapPcidev { id, .. }
            | Request::MapPosition { id, .. }
            | Request::UnmapPosition { id, .. }
            | Request::InjectMsi { id, .. } => Some(*id),
        }
    }
}

/// The answer to `GET_IOREQ_SERVER_INFO`. File descriptors travel with it (SCM_RIGHTS), in
/// this order: the shared memory, the buffered-ring eventfd, the response eventfd, then one
/// request eventfd per vCPU (`3 + nr_vcpus` in all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    pub id: u16,
    pub bufioreq: BufioreqMode,
    pub nr_vcpus: u32,
    /// Size of the shared memory (12288).
    pub shm_size: u32,
    /// Offset of the buffered page (0; Xen's resource frame 0).
    pub buf_offset: u32,
    /// Offset of the ioreq page (4096; Xen's resource frame 1).
    pub ioreq_offset: u32,
    /// Offset of the notification page (8192; version 2).
    pub notify_offset: u32,
}

/// The multiplexer's answer to a request (same tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Created {
        id: u16,
        nr_vcpus: u32,
    },
    Info(Info),
    /// Success of a request without a result.
    Done {
        op: u16,
    },
    Error {
        op: u16,
        code: Code,
        message: String,
    },
}

/// What the multiplexer tells a device model unasked (tag 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A position this server claimed resolves to `sbdf` now (`None`: not reachable until
    /// firmware numbers the bridges). Sent before the first request that could depend on it.
    PositionMoved {
        id: u16,
        position: Position,
        sbdf: Option<u32>,
    },
    /// The multiplexer is closing the connection (after a fault, a destroy or at shutdown).
    Goodbye { code: Code, message: String },
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Request { tag: u32, req: Request },
    Reply { tag: u32, reply: Reply },
    Notice(Notice),
}

/// A packet that does not decode, or a value that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("message of {0} bytes is shorter than the {HEADER_SIZE}-byte header")]
    Short(usize),
    #[error("message of {0} bytes is longer than the {MAX_MESSAGE}-byte maximum")]
    Long(usize),
    #[error("bad magic {0:02x?} (expected \"IOMX\")")]
    Magic([u8; 4]),
    #[error("protocol version {0} is not supported (this side speaks version {VERSION})")]
    Version(u16),
    #[error("header says the body has {header} bytes, the packet has {actual}")]
    Length { header: u32, actual: usize },
    #[error("unknown op {0:#06x}")]
    UnknownOp(u16),
    #[error("{}: body has {got} bytes, expected {expected}", op::name(*.op))]
    BodySize {
        op: u16,
        expected: usize,
        got: usize,
    },
    #[error("{}: reserved byte {offset} of the body is {value:#04x}, must be 0", op::name(*.op))]
    Reserved { op: u16, offset: usize, value: u8 },
    #[error("range type {0} is not 0 (port), 1 (memory) or 2 (pci)")]
    RangeType(u32),
    #[error("invalid {kind:?} range {start:#x}-{end:#x} (start after end, or beyond the space)")]
    Range {
        kind: RangeKind,
        start: u64,
        end: u64,
    },
    #[error("{}: boolean byte is {value}, must be 0 or 1", op::name(*.op))]
    Bool { op: u16, value: u8 },
    #[error("bufioreq mode {0} is not 0 (off), 1 (legacy) or 2 (atomic)")]
    Bufioreq(u8),
    #[error("server name: {0}")]
    Name(String),
    #[error("position: {0}")]
    Position(String),
    #[error(
        "PCI device {device:#x} function {function} out of range (device 0-0x1f, function 0-7)"
    )]
    Pci { device: u8, function: u8 },
    #[error("text is not UTF-8 or longer than {MAX_TEXT} bytes")]
    Text,
    #[error("a notice must have tag 0, not {0}")]
    NoticeTag(u32),
    #[error("position-moved notice: unresolved but SBDF {0:#x} is not 0")]
    UnresolvedSbdf(u32),
}

impl WireError {
    /// The code an error reply carries for this problem.
    pub fn code(&self) -> Code {
        match self {
            WireError::Short(_) | WireError::Magic(_) | WireError::Length { .. } => Code::EPROTO,
            WireError::NoticeTag(_) => Code::EPROTO,
            WireError::Long(_) => Code::EMSGSIZE,
            WireError::Version(_) => Code::EPROTONOSUPPORT,
            WireError::UnknownOp(_) => Code::ENOSYS,
            WireError::BodySize { .. }
            | WireError::Reserved { .. }
            | WireError::RangeType(_)
            | WireError::Range { .. }
            | WireError::Bool { .. }
            | WireError::Bufioreq(_)
            | WireError::Name(_)
            | WireError::Position(_)
            | WireError::Pci { .. }
            | WireError::Text
            | WireError::UnresolvedSbdf(_) => Code::EINVAL,
        }
    }
}

/// The header fields of a packet, as far as they can be read (for the tag and op of an error
/// reply to a packet whose body is bad). `None` if the packet is shorter than a header.
pub fn peek(buf: &[u8]) -> Option<(u16, u32)> {
    if buf.len() < HEADER_SIZE {
        return None;
    }
    Some((le16(&buf[6..8]), le32(&buf[8..12])))
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn bufioreq_code(m: BufioreqMode) -> u8 {
    match m {
        BufioreqMode::Off => crate::abi::HVM_IOREQSRV_BUFIOREQ_OFF,
        BufioreqMode::Legacy => crate::abi::HVM_IOREQSRV_BUFIOREQ_LEGACY,
        BufioreqMode::Atomic => crate::abi::HVM_IOREQSRV_BUFIOREQ_ATOMIC,
    }
}

fn check_name(name: &str) -> Result<(), WireError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(WireError::Name(format!(
            "{} bytes (1 to {MAX_NAME})",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(WireError::Name("contains a control character".into()));
    }
    Ok(())
}

fn check_position(p: &Position) -> Result<(), WireError> {
    if p.path.is_empty() || p.path.len() > MAX_HOPS {
        return Err(WireError::Position(format!(
            "{} hops (1 to {MAX_HOPS})",
            p.path.len()
        )));
    }
    Ok(())
}

fn check_range(r: &IoRange) -> Result<(), WireError> {
    if r.is_valid() {
        Ok(())
    } else {
        Err(WireError::Range {
            kind: r.kind,
            start: r.start,
            end: r.end,
        })
    }
}

fn check_text(t: &str) -> Result<(), WireError> {
    if t.len() > MAX_TEXT {
        Err(WireError::Text)
    } else {
        Ok(())
    }
}

fn put_position_tail(b: &mut Vec<u8>, p: &Position) {
    b.extend_from_slice(&p.segment.to_le_bytes());
    b.push(p.root_bus);
    b.push(p.path.len() as u8);
}

/// Encodes a message. Fails only for values the format cannot carry (a name, position or
/// text too long, an invalid range).
pub fn encode(m: &Message) -> Result<Vec<u8>, WireError> {
    let (opv, tag, body) = match m {
        Message::Request { tag, req } => (req.op(), *tag, encode_request(req)?),
        Message::Reply { tag, reply } => {
            let (o, b) = encode_reply(reply)?;
            (o, *tag, b)
        }
        Message::Notice(n) => {
            let (o, b) = encode_notice(n)?;
            (o, 0, b)
        }
    };
    let mut out = Vec::with_capacity(HEADER_SIZE + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&opv.to_le_bytes());
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    if out.len() > MAX_MESSAGE {
        return Err(WireError::Long(out.len()));
    }
    Ok(out)
}

fn encode_request(r: &Request) -> Result<Vec<u8>, WireError> {
    let mut b = Vec::with_capacity(32);
    match r {
        Request::Create { bufioreq, name } => {
            check_name(name)?;
            b.push(bufioreq_code(*bufioreq));
            b.push(0);
            b.extend_from_slice(&(name.len() as u16).to_le_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        Request::GetInfo { id } | Request::Destroy { id } => {
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&[0, 0]);
        }
        Request::MapRange { id, range } | Request::UnmapRange { id, range } => {
            check_range(range)?;
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&range.kind.dmop_type().to_le_bytes());
            b.extend_from_slice(&range.start.to_le_bytes());
            b.extend_from_slice(&range.end.to_le_bytes());
        }
        Request::SetState { id, enabled } => {
            b.extend_from_slice(&id.to_le_bytes());
            b.push(u8::from(*enabled));
            b.push(0);
        }
        Request::MapPcidev { id, sbdf } | Request::UnmapPcidev { id, sbdf } => {
            b.extend_from_slice(&id.to_le_bytes());
            let (seg, bus, dev, func) = crate::abi::unpack_sbdf(*sbdf);
            b.extend_from_slice(&seg.to_le_bytes());
            b.extend_from_slice(&[bus, dev, func]);
            b.push(0);
        }
        Request::MapPosition { id, position } | Request::UnmapPosition { id, position } => {
            check_position(position)?;
            b.extend_from_slice(&id.to_le_bytes());
            put_position_tail(&mut b, position);
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&position.path);
        }
        Request::InjectMsi { id, addr, data } => {
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&data.to_le_bytes());
            b.extend_from_slice(&addr.to_le_bytes());
        }
    }
    Ok(b)
}

fn encode_reply(r: &Reply) -> Result<(u16, Vec<u8>), WireError> {
    let mut b = Vec::with_capacity(24);
    let o = match r {
        Reply::Created { id, nr_vcpus } => {
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&nr_vcpus.to_le_bytes());
            op::CREATE_IOREQ_SERVER | op::REPLY
        }
        Reply::Info(i) => {
            b.extend_from_slice(&i.id.to_le_bytes());
            b.push(bufioreq_code(i.bufioreq));
            b.push(0);
            for v in [
                i.nr_vcpus,
                i.shm_size,
                i.buf_offset,
                i.ioreq_offset,
                i.notify_offset,
            ] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            op::GET_IOREQ_SERVER_INFO | op::REPLY
        }
        Reply::Done { op: o } => {
            if !op::REQUESTS.contains(o)
                || *o == op::CREATE_IOREQ_SERVER
                || *o == op::GET_IOREQ_SERVER_INFO
            {
                return Err(WireError::UnknownOp(*o));
            }
            o | op::REPLY
        }
        Reply::Error {
            op: o,
            code,
            message,
        } => {
            check_text(message)?;
            b.extend_from_slice(&code.0.to_le_bytes());
            b.extend_from_slice(&o.to_le_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(message.as_bytes());
            op::ERROR
        }
    };
    Ok((o, b))
}

fn encode_notice(n: &Notice) -> Result<(u16, Vec<u8>), WireError> {
    let mut b = Vec::with_capacity(24);
    let o = match n {
        Notice::PositionMoved { id, position, sbdf } => {
            check_position(position)?;
            b.extend_from_slice(&id.to_le_bytes());
            b.push(u8::from(sbdf.is_some()));
            b.push(0);
            b.extend_from_slice(&sbdf.unwrap_or(0).to_le_bytes());
            put_position_tail(&mut b, position);
            b.extend_from_slice(&position.path);
            op::POSITION_MOVED
        }
        Notice::Goodbye { code, message } => {
            check_text(message)?;
            b.extend_from_slice(&code.0.to_le_bytes());
            b.extend_from_slice(message.as_bytes());
            op::GOODBYE
        }
    };
    Ok((o, b))
}

/// The ERROR reply refusing a packet (tag `tag`, op `op`) that came in protocol version
/// `version`: framed in that version when it is one whose ERROR layout this side knows
/// ([`OLDEST_KNOWN_VERSION`] to [`VERSION`]), so an older peer can read why it was refused;
/// in [`VERSION`] otherwise.
pub fn encode_refusal(
    tag: u32,
    op: u16,
    version: u16,
    code: Code,
    message: &str,
) -> Result<Vec<u8>, WireError> {
    let mut b = encode(&Message::Reply {
        tag,
        reply: Reply::Error {
            op,
            code,
            message: message.to_string(),
        },
    })?;
    if (OLDEST_KNOWN_VERSION..=VERSION).contains(&version) {
        b[4..6].copy_from_slice(&version.to_le_bytes());
    }
    Ok(b)
}

/// The version field of a packet (`None` if shorter than a header or without the magic).
pub fn peek_version(buf: &[u8]) -> Option<u16> {
    if buf.len() < HEADER_SIZE || buf[0..4] != MAGIC {
        return None;
    }
    Some(le16(&buf[4..6]))
}

/// Decodes one packet.
pub fn decode(buf: &[u8]) -> Result<Message, WireError> {
    if buf.len() < HEADER_SIZE {
        return Err(WireError::Short(buf.len()));
    }
    if buf.len() > MAX_MESSAGE {
        return Err(WireError::Long(buf.len()));
    }
    let magic = [buf[0], buf[1], buf[2], buf[3]];
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    let version = le16(&buf[4..6]);
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let o = le16(&buf[6..8]);
    let tag = le32(&buf[8..12]);
    let len = le32(&buf[12..16]);
    let body = &buf[HEADER_SIZE..];
    if len as usize != body.len() {
        return Err(WireError::Length {
            header: len,
            actual: body.len(),
        });
    }
    let b = Body { op: o, b: body };
    match o {
        op::POSITION_MOVED | op::GOODBYE => {
            if tag != 0 {
                return Err(WireError::NoticeTag(tag));
            }
            Ok(Message::Notice(b.notice()?))
        }
        op::ERROR => Ok(Message::Reply {
            tag,
            reply: b.error()?,
        }),
        _ if o & op::REPLY != 0 && op::REQUESTS.contains(&(o & !op::REPLY)) => Ok(Message::Reply {
            tag,
            reply: b.reply(o & !op::REPLY)?,
        }),
        _ if op::REQUESTS.contains(&o) => Ok(Message::Request {
            tag,
            req: b.request()?,
        }),
        _ => Err(WireError::UnknownOp(o)),
    }
}

/// A body being decoded: length and reserved bytes checked before any field is read.
struct Body<'a> {
    op: u16,
    b: &'a [u8],
}

impl Body<'_> {
    fn size(&self, expected: usize) -> Result<(), WireError> {
        if self.b.len() != expected {
            return Err(WireError::BodySize {
                op: self.op,
                expected,
                got: self.b.len(),
            });
        }
        Ok(())
    }

    fn at_least(&self, expected: usize) -> Result<(), WireError> {
        if self.b.len() < expected {
            return Err(WireError::BodySize {
                op: self.op,
                expected,
                got: self.b.len(),
            });
        }
        Ok(())
    }

    fn zero(&self, offsets: std::ops::Range<usize>) -> Result<(), WireError> {
        for offset in offsets {
            if self.b[offset] != 0 {
                return Err(WireError::Reserved {
                    op: self.op,
                    offset,
                    value: self.b[offset],
                });
            }
        }
        Ok(())
    }

    fn bool_at(&self, offset: usize) -> Result<bool, WireError> {
        match self.b[offset] {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(WireError::Bool { op: self.op, value }),
        }
    }

    fn u16_at(&self, o: usize) -> u16 {
        le16(&self.b[o..])
    }

    fn u32_at(&self, o: usize) -> u32 {
        le32(&self.b[o..])
    }

    fn text_from(&self, o: usize) -> Result<String, WireError> {
        let t = &self.b[o..];
        if t.len() > MAX_TEXT {
            return Err(WireError::Text);
        }
        String::from_utf8(t.to_vec()).map_err(|_| WireError::Text)
    }

    fn bufioreq_at(&self, o: usize) -> Result<BufioreqMode, WireError> {
        BufioreqMode::from_u8(self.b[o]).ok_or(WireError::Bufioreq(self.b[o]))
    }

    /// `id u16, segment u16, root_bus u8, hops u8` at `o`, the path at `path_at`.
    fn position(&self, o: usize, path_at: usize) -> Result<Position, WireError> {
        let hops = usize::from(self.b[o + 5]);
        if hops == 0 || hops > MAX_HOPS {
            return Err(WireError::Position(format!(
                "{hops} hops (1 to {MAX_HOPS})"
            )));
        }
        self.size(path_at + hops)?;
        Ok(Position {
            segment: self.u16_at(o + 2),
            root_bus: self.b[o + 4],
            path: self.b[path_at..path_at + hops].to_vec(),
        })
    }

    fn request(&self) -> Result<Request, WireError> {
        use op::*;
        let id = || self.u16_at(0);
        Ok(match self.op {
            CREATE_IOREQ_SERVER => {
                self.at_least(4)?;
                self.zero(1..2)?;
                let n = usize::from(self.u16_at(2));
                self.size(4 + n)?;
                let bufioreq = self.bufioreq_at(0)?;
                let name = std::str::from_utf8(&self.b[4..])
                    .map_err(|_| WireError::Name("not UTF-8".into()))?
                    .to_string();
                check_name(&name)?;
                Request::Create { bufioreq, name }
            }
            GET_IOREQ_SERVER_INFO | DESTROY_IOREQ_SERVER => {
                self.size(4)?;
                self.zero(2..4)?;
                if self.op == GET_IOREQ_SERVER_INFO {
                    Request::GetInfo { id: id() }
                } else {
                    Request::Destroy { id: id() }
                }
            }
            MAP_IO_RANGE_TO_IOREQ_SERVER | UNMAP_IO_RANGE_FROM_IOREQ_SERVER => {
                self.size(24)?;
                self.zero(2..4)?;
                let kind = match self.u32_at(4) {
                    crate::abi::XEN_DMOP_IO_RANGE_PORT => RangeKind::Port,
                    crate::abi::XEN_DMOP_IO_RANGE_MEMORY => RangeKind::Mmio,
                    crate::abi::XEN_DMOP_IO_RANGE_PCI => RangeKind::Pci,
                    t => return Err(WireError::RangeType(t)),
                };
                let range = IoRange::new(kind, le64(&self.b[8..]), le64(&self.b[16..]));
                check_range(&range)?;
                if self.op == MAP_IO_RANGE_TO_IOREQ_SERVER {
                    Request::MapRange { id: id(), range }
                } else {
                    Request::UnmapRange { id: id(), range }
                }
            }
            SET_IOREQ_SERVER_STATE => {
                self.size(4)?;
                self.zero(3..4)?;
                Request::SetState {
                    id: id(),
                    enabled: self.bool_at(2)?,
                }
            }
            MAP_PCIDEV_TO_IOREQ_SERVER | UNMAP_PCIDEV_FROM_IOREQ_SERVER => {
                self.size(8)?;
                self.zero(7..8)?;
                let (device, function) = (self.b[5], self.b[6]);
                if device > 0x1f || function > 7 {
                    return Err(WireError::Pci { device, function });
                }
                let sbdf = crate::abi::pack_sbdf(self.u16_at(2), self.b[4], device, function);
                if self.op == MAP_PCIDEV_TO_IOREQ_SERVER {
                    Request::MapPcidev { id: id(), sbdf }
                } else {
                    Request::UnmapPcidev { id: id(), sbdf }
                }
            }
            MAP_POSITION_TO_IOREQ_SERVER | UNMAP_POSITION_FROM_IOREQ_SERVER => {
                self.at_least(8)?;
                self.zero(6..8)?;
                let position = self.position(0, 8)?;
                if self.op == MAP_POSITION_TO_IOREQ_SERVER {
                    Request::MapPosition { id: id(), position }
                } else {
                    Request::UnmapPosition { id: id(), position }
                }
            }
            INJECT_MSI => {
                self.size(16)?;
                self.zero(2..4)?;
                Request::InjectMsi {
                    id: id(),
                    data: self.u32_at(4),
                    addr: le64(&self.b[8..]),
                }
            }
            o => return Err(WireError::UnknownOp(o)),
        })
    }

    fn reply(&self, req_op: u16) -> Result<Reply, WireError> {
        Ok(match req_op {
            op::CREATE_IOREQ_SERVER => {
                self.size(8)?;
                self.zero(2..4)?;
                Reply::Created {
                    id: self.u16_at(0),
                    nr_vcpus: self.u32_at(4),
                }
            }
            op::GET_IOREQ_SERVER_INFO => {
                self.size(24)?;
                self.zero(3..4)?;
                Reply::Info(Info {
                    id: self.u16_at(0),
                    bufioreq: self.bufioreq_at(2)?,
                    nr_vcpus: self.u32_at(4),
                    shm_size: self.u32_at(8),
                    buf_offset: self.u32_at(12),
                    ioreq_offset: self.u32_at(16),
                    notify_offset: self.u32_at(20),
                })
            }
            o => {
                self.size(0)?;
                Reply::Done { op: o }
            }
        })
    }

    fn error(&self) -> Result<Reply, WireError> {
        self.at_least(8)?;
        self.zero(6..8)?;
        Ok(Reply::Error {
            code: Code(self.u32_at(0)),
            op: self.u16_at(4),
            message: self.text_from(8)?,
        })
    }

    fn notice(&self) -> Result<Notice, WireError> {
        Ok(match self.op {
            op::POSITION_MOVED => {
                self.at_least(12)?;
                self.zero(3..4)?;
                let resolved = self.bool_at(2)?;
                let sbdf = self.u32_at(4);
                if !resolved && sbdf != 0 {
                    return Err(WireError::UnresolvedSbdf(sbdf));
                }
                // id u16 at 0, then the position's segment/root_bus/hops at 8..12.
                let hops = usize::from(self.b[11]);
                if hops == 0 || hops > MAX_HOPS {
                    return Err(WireError::Position(format!(
                        "{hops} hops (1 to {MAX_HOPS})"
                    )));
                }
                self.size(12 + hops)?;
                Notice::PositionMoved {
                    id: self.u16_at(0),
                    position: Position {
                        segment: self.u16_at(8),
                        root_bus: self.b[10],
                        path: self.b[12..].to_vec(),
                    },
                    sbdf: resolved.then_some(sbdf),
                }
            }
            _ => {
                self.at_least(4)?;
                Notice::Goodbye {
                    code: Code(self.u32_at(0)),
                    message: self.text_from(4)?,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pos(path: &[u8]) -> Position {
        Position {
            segment: 1,
            root_bus: 0x20,
            path: path.to_vec(),
        }
    }

    fn all_messages() -> Vec<Message> {
        let reqs = vec![
            Request::Create {
                bufioreq: BufioreqMode::Atomic,
                name: "vgpu-0".into(),
            },
            Request::Create {
                bufioreq: BufioreqMode::Off,
                name: "é".into(),
            },
            Request::GetInfo { id: 7 },
            Request::MapRange {
                id: 3,
                range: IoRange::ports(0x60, 0x64),
            },
            Request::UnmapRange {
                id: 3,
                range: IoRange::mmio(0xfe00_0000, 0x1000),
            },
            Request::MapRange {
                id: 3,
                range: IoRange::new(RangeKind::Pci, 0x100, 0x1ff),
            },
            Request::SetState {
                id: 1,
                enabled: true,
            },
            Request::SetState {
                id: 1,
                enabled: false,
            },
            Request::Destroy { id: 65535 },
            Request::MapPcidev {
                id: 2,
                sbdf: crate::abi::pack_sbdf(1, 0x80, 0x1f, 7),
            },
            Request::UnmapPcidev { id: 2, sbdf: 0x28 },
            Request::MapPosition {
                id: 2,
                position: pos(&[0x10, 0, 0x08]),
            },
            Request::UnmapPosition {
                id: 2,
                position: pos(&[0x10]),
            },
            Request::InjectMsi {
                id: 2,
                addr: 0xfee0_100c,
                data: 0x4071,
            },
            Request::InjectMsi {
                id: 9,
                addr: u64::MAX,
                data: u32::MAX,
            },
        ];
        let mut m: Vec<Message> = reqs
            .into_iter()
            .enumerate()
            .map(|(i, req)| Message::Request {
                tag: i as u32 * 0x0101_0101,
                req,
            })
            .collect();
        let replies = vec![
            Reply::Created {
                id: 4,
                nr_vcpus: 128,
            },
            Reply::Info(Info {
                id: 4,
                bufioreq: BufioreqMode::Legacy,
                nr_vcpus: 2,
                shm_size: 12288,
                buf_offset: 0,
                ioreq_offset: 4096,
                notify_offset: 8192,
            }),
            Reply::Done {
                op: op::SET_IOREQ_SERVER_STATE,
            },
            Reply::Done {
                op: op::UNMAP_POSITION_FROM_IOREQ_SERVER,
            },
            Reply::Done { op: op::INJECT_MSI },
            Reply::Error {
                op: op::MAP_IO_RANGE_TO_IOREQ_SERVER,
                code: Code::EPERM,
                message: "outside the grant".into(),
            },
            Reply::Error {
                op: 0x1234,
                code: Code(9999),
                message: String::new(),
            },
        ];
        m.extend(
            replies
                .into_iter()
                .map(|reply| Message::Reply { tag: 99, reply }),
        );
        m.push(Message::Notice(Notice::PositionMoved {
            id: 1,
            position: pos(&[0x10, 0]),
            sbdf: Some(0x0001_0300),
        }));
        m.push(Message::Notice(Notice::PositionMoved {
            id: 1,
            position: pos(&[0x10, 0]),
            sbdf: None,
        }));
        m.push(Message::Notice(Notice::Goodbye {
            code: Code::ETIMEDOUT,
            message: "vCPU 0 request 17 exceeded 200ms".into(),
        }));
        m
    }

    #[test]
    fn every_message_round_trips() {
        for m in all_messages() {
            let b = encode(&m).unwrap();
            assert_eq!(decode(&b).unwrap(), m, "{b:02x?}");
            assert_eq!(le32(&b[12..]) as usize, b.len() - HEADER_SIZE);
        }
    }

    #[test]
    fn byte_layouts_match_the_document() {
        let b = encode(&Message::Request {
            tag: 0x0a0b0c0d,
            req: Request::MapRange {
                id: 0x0102,
                range: IoRange::new(
                    RangeKind::Mmio,
                    0x1122_3344_5566_7788,
                    0x1122_3344_5566_7799,
                ),
            },
        })
        .unwrap();
        assert_eq!(&b[0..4], b"IOMX");
        assert_eq!(&b[4..6], &[2, 0]);
        assert_eq!(&b[6..8], &[3, 0]);
        assert_eq!(&b[8..12], &[0x0d, 0x0c, 0x0b, 0x0a]);
        assert_eq!(&b[12..16], &[24, 0, 0, 0]);
        assert_eq!(&b[16..18], &[2, 1]);
        assert_eq!(&b[20..24], &[1, 0, 0, 0], "type MEMORY");
        assert_eq!(b[24], 0x88);
        assert_eq!(b[32], 0x99);
        let b = encode(&Message::Request {
            tag: 1,
            req: Request::MapPcidev {
                id: 1,
                sbdf: crate::abi::pack_sbdf(2, 3, 4, 5),
            },
        })
        .unwrap();
        assert_eq!(&b[16..], &[1, 0, 2, 0, 3, 4, 5, 0]);
        let b = encode(&Message::Request {
            tag: 1,
            req: Request::MapPosition {
                id: 1,
                position: pos(&[0x10, 0x08]),
            },
        })
        .unwrap();
        assert_eq!(&b[16..], &[1, 0, 1, 0, 0x20, 2, 0, 0, 0x10, 0x08]);
        // INJECT_MSI: op 14 (XEN_DMOP_inject_msi), id, pad, data, then the 64-bit address.
        let b = encode(&Message::Request {
            tag: 3,
            req: Request::InjectMsi {
                id: 0x0102,
                addr: 0x1122_3344_fee0_100c,
                data: 0x0a0b_4071,
            },
        })
        .unwrap();
        assert_eq!(&b[6..8], &[14, 0]);
        assert_eq!(&b[12..16], &[16, 0, 0, 0]);
        assert_eq!(
            &b[16..],
            &[
                2, 1, 0, 0, 0x71, 0x40, 0x0b, 0x0a, 0x0c, 0x10, 0xe0, 0xfe, 0x44, 0x33, 0x22, 0x11
            ]
        );
        let b = encode(&Message::Reply {
            tag: 5,
            reply: Reply::Done {
                op: op::DESTROY_IOREQ_SERVER,
            },
        })
        .unwrap();
        assert_eq!(&b[6..8], &[6, 0x80]);
        assert_eq!(b.len(), HEADER_SIZE);
        let b = encode(&Message::Reply {
            tag: 2,
            reply: Reply::Info(Info {
                id: 1,
                bufioreq: BufioreqMode::Atomic,
                nr_vcpus: 2,
                shm_size: 12288,
                buf_offset: 0,
                ioreq_offset: 4096,
                notify_offset: 8192,
            }),
        })
        .unwrap();
        assert_eq!(
            &b[12..],
            &[
                24, 0, 0, 0, 1, 0, 2, 0, 2, 0, 0, 0, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0,
                0x20, 0, 0
            ]
        );
    }

    #[test]
    fn a_refusal_is_framed_in_a_version_the_peer_reads() {
        // A version-1 peer gets its refusal in version 1: same ERROR layout, its own header.
        let b =
            encode_refusal(7, op::CREATE_IOREQ_SERVER, 1, Code::EPROTONOSUPPORT, "old").unwrap();
        assert_eq!(peek_version(&b), Some(1));
        assert_eq!(&b[6..8], &[0xff, 0xff]);
        assert_eq!(&b[16..20], &93u32.to_le_bytes());
        assert_eq!(
            decode(&b),
            Err(WireError::Version(1)),
            "this side reads only 2"
        );
        let mut as_v2 = b.clone();
        as_v2[4] = 2;
        assert_eq!(
            decode(&as_v2),
            Ok(Message::Reply {
                tag: 7,
                reply: Reply::Error {
                    op: op::CREATE_IOREQ_SERVER,
                    code: Code::EPROTONOSUPPORT,
                    message: "old".into()
                }
            })
        );
        // A version this side does not know gets one in its own.
        let b = encode_refusal(7, 1, 9, Code::EPROTONOSUPPORT, "new").unwrap();
        assert_eq!(peek_version(&b), Some(VERSION));
        assert!(decode(&b).is_ok());
        assert_eq!(peek_version(&b[..15]), None);
        assert_eq!(
            peek_version(b"XOMX\x02\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00"),
            None
        );
    }

    fn header(o: u16, tag: u32, body: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&o.to_le_bytes());
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&(body.len() as u32).to_le_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn every_malformed_message_is_an_error_with_a_code() {
        use op::*;
        let range = |ty: u32, s: u64, e: u64| {
            let mut b = vec![1, 0, 0, 0];
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&e.to_le_bytes());
            b
        };
        let good = header(SET_IOREQ_SERVER_STATE, 1, &[1, 0, 1, 0]);
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        let mut bad_version = good.clone();
        bad_version[4] = 1;
        let mut bad_len = good.clone();
        bad_len[12] = 5;
        let cases: Vec<(Vec<u8>, WireError, Code)> = vec![
            (vec![], WireError::Short(0), Code::EPROTO),
            (good[..15].to_vec(), WireError::Short(15), Code::EPROTO),
            (
                vec![0; MAX_MESSAGE + 1],
                WireError::Long(MAX_MESSAGE + 1),
                Code::EMSGSIZE,
            ),
            (bad_magic, WireError::Magic(*b"XOMX"), Code::EPROTO),
            (bad_version, WireError::Version(1), Code::EPROTONOSUPPORT),
            (
                bad_len,
                WireError::Length {
                    header: 5,
                    actual: 4,
                },
                Code::EPROTO,
            ),
            (
                header(0x77, 1, &[]),
                WireError::UnknownOp(0x77),
                Code::ENOSYS,
            ),
            (
                header(0x8077, 1, &[]),
                WireError::UnknownOp(0x8077),
                Code::ENOSYS,
            ),
            (
                header(SET_IOREQ_SERVER_STATE, 1, &[1, 0, 1]),
                WireError::BodySize {
                    op: 5,
                    expected: 4,
                    got: 3,
                },
                Code::EINVAL,
            ),
            (
                header(SET_IOREQ_SERVER_STATE, 1, &[1, 0, 1, 9]),
                WireError::Reserved {
                    op: 5,
                    offset: 3,
                    value: 9,
                },
                Code::EINVAL,
            ),
            (
                header(SET_IOREQ_SERVER_STATE, 1, &[1, 0, 2, 0]),
                WireError::Bool { op: 5, value: 2 },
                Code::EINVAL,
            ),
            (
                header(DESTROY_IOREQ_SERVER, 1, &[1, 0, 0, 1]),
                WireError::Reserved {
                    op: 6,
                    offset: 3,
                    value: 1,
                },
                Code::EINVAL,
            ),
            (
                header(MAP_IO_RANGE_TO_IOREQ_SERVER, 1, &range(3, 0, 1)),
                WireError::RangeType(3),
                Code::EINVAL,
            ),
            (
                header(MAP_IO_RANGE_TO_IOREQ_SERVER, 1, &range(0, 0x10, 0x10000)),
                WireError::Range {
                    kind: RangeKind::Port,
                    start: 0x10,
                    end: 0x10000,
                },
                Code::EINVAL,
            ),
            (
                header(UNMAP_IO_RANGE_FROM_IOREQ_SERVER, 1, &range(1, 9, 8)),
                WireError::Range {
                    kind: RangeKind::Mmio,
                    start: 9,
                    end: 8,
                },
                Code::EINVAL,
            ),
            (
                header(MAP_IO_RANGE_TO_IOREQ_SERVER, 1, &range(2, 0, 1 << 32)),
                WireError::Range {
                    kind: RangeKind::Pci,
                    start: 0,
                    end: 1 << 32,
                },
                Code::EINVAL,
            ),
            (
                header(MAP_IO_RANGE_TO_IOREQ_SERVER, 1, &range(0, 0, 1)[..20]),
                WireError::BodySize {
                    op: 3,
                    expected: 24,
                    got: 20,
                },
                Code::EINVAL,
            ),
            (
                header(CREATE_IOREQ_SERVER, 1, &[3, 0, 1, 0, b'a']),
                WireError::Bufioreq(3),
                Code::EINVAL,
            ),
            (
                header(CREATE_IOREQ_SERVER, 1, &[2, 0, 2, 0, b'a']),
                WireError::BodySize {
                    op: 1,
                    expected: 6,
                    got: 5,
                },
                Code::EINVAL,
            ),
            (
                header(CREATE_IOREQ_SERVER, 1, &[2, 0, 0, 0]),
                WireError::Name("0 bytes (1 to 64)".into()),
                Code::EINVAL,
            ),
            (
                header(CREATE_IOREQ_SERVER, 1, &[2, 0, 2, 0, 0xff, 0xfe]),
                WireError::Name("not UTF-8".into()),
                Code::EINVAL,
            ),
            (
                header(CREATE_IOREQ_SERVER, 1, &[2, 0, 1, 0, b'\n']),
                WireError::Name("contains a control character".into()),
                Code::EINVAL,
            ),
            (
                header(CREATE_IOREQ_SERVER, 1, &[2, 7, 1, 0, b'a']),
                WireError::Reserved {
                    op: 1,
                    offset: 1,
                    value: 7,
                },
                Code::EINVAL,
            ),
            (
                header(CREATE_IOREQ_SERVER, 1, &[2, 0]),
                WireError::BodySize {
                    op: 1,
                    expected: 4,
                    got: 2,
                },
                Code::EINVAL,
            ),
            (
                header(MAP_PCIDEV_TO_IOREQ_SERVER, 1, &[1, 0, 0, 0, 0, 0x20, 0, 0]),
                WireError::Pci {
                    device: 0x20,
                    function: 0,
                },
                Code::EINVAL,
            ),
            (
                header(UNMAP_PCIDEV_FROM_IOREQ_SERVER, 1, &[1, 0, 0, 0, 0, 1, 8, 0]),
                WireError::Pci {
                    device: 1,
                    function: 8,
                },
                Code::EINVAL,
            ),
            (
                header(MAP_POSITION_TO_IOREQ_SERVER, 1, &[1, 0, 0, 0, 0, 0, 0, 0]),
                WireError::Position("0 hops (1 to 32)".into()),
                Code::EINVAL,
            ),
            (
                header(MAP_POSITION_TO_IOREQ_SERVER, 1, &[1, 0, 0, 0, 0, 33, 0, 0]),
                WireError::Position("33 hops (1 to 32)".into()),
                Code::EINVAL,
            ),
            (
                header(
                    MAP_POSITION_TO_IOREQ_SERVER,
                    1,
                    &[1, 0, 0, 0, 0, 2, 0, 0, 0x10],
                ),
                WireError::BodySize {
                    op: 0x103,
                    expected: 10,
                    got: 9,
                },
                Code::EINVAL,
            ),
            (
                header(
                    MAP_POSITION_TO_IOREQ_SERVER,
                    1,
                    &[1, 0, 0, 0, 0, 1, 0, 1, 0x10],
                ),
                WireError::Reserved {
                    op: 0x103,
                    offset: 7,
                    value: 1,
                },
                Code::EINVAL,
            ),
            (
                header(MAP_POSITION_TO_IOREQ_SERVER, 1, &[1, 0, 0]),
                WireError::BodySize {
                    op: 0x103,
                    expected: 8,
                    got: 3,
                },
                Code::EINVAL,
            ),
            (
                header(
                    INJECT_MSI,
                    1,
                    &[1, 0, 0, 0, 0x71, 0x40, 0, 0, 0, 0, 0xe0, 0xfe],
                ),
                WireError::BodySize {
                    op: 14,
                    expected: 16,
                    got: 12,
                },
                Code::EINVAL,
            ),
            (
                header(
                    INJECT_MSI,
                    1,
                    &[
                        1, 0, 0, 0, 0x71, 0x40, 0, 0, 0, 0, 0xe0, 0xfe, 0, 0, 0, 0, 0,
                    ],
                ),
                WireError::BodySize {
                    op: 14,
                    expected: 16,
                    got: 17,
                },
                Code::EINVAL,
            ),
            (
                header(
                    INJECT_MSI,
                    1,
                    &[1, 0, 0, 2, 0x71, 0x40, 0, 0, 0, 0, 0xe0, 0xfe, 0, 0, 0, 0],
                ),
                WireError::Reserved {
                    op: 14,
                    offset: 3,
                    value: 2,
                },
                Code::EINVAL,
            ),
            (
                header(INJECT_MSI | REPLY, 1, &[0]),
                WireError::BodySize {
                    op: 0x800e,
                    expected: 0,
                    got: 1,
                },
                Code::EINVAL,
            ),
            (
                header(ERROR, 1, &[1, 0, 0, 0, 3, 0, 0, 0, 0xff]),
                WireError::Text,
                Code::EINVAL,
            ),
            (
                header(ERROR, 1, &[1, 0, 0]),
                WireError::BodySize {
                    op: ERROR,
                    expected: 8,
                    got: 3,
                },
                Code::EINVAL,
            ),
            (
                header(GOODBYE, 3, &[0, 0, 0, 0]),
                WireError::NoticeTag(3),
                Code::EPROTO,
            ),
            (
                header(
                    POSITION_MOVED,
                    0,
                    &[1, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 1, 0x10],
                ),
                WireError::UnresolvedSbdf(5),
                Code::EINVAL,
            ),
            (
                header(POSITION_MOVED, 0, &[1, 0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0]),
                WireError::Position("0 hops (1 to 32)".into()),
                Code::EINVAL,
            ),
            (
                header(CREATE_IOREQ_SERVER | REPLY, 1, &[1, 0, 0, 0, 1, 0]),
                WireError::BodySize {
                    op: 0x8001,
                    expected: 8,
                    got: 6,
                },
                Code::EINVAL,
            ),
            (
                header(GET_IOREQ_SERVER_INFO | REPLY, 1, &{
                    let mut b = vec![0u8; 24];
                    b[2] = 9;
                    b
                }),
                WireError::Bufioreq(9),
                Code::EINVAL,
            ),
            (
                // Version 1's reply, without notify_offset.
                header(GET_IOREQ_SERVER_INFO | REPLY, 1, &[0u8; 20]),
                WireError::BodySize {
                    op: 0x8002,
                    expected: 24,
                    got: 20,
                },
                Code::EINVAL,
            ),
            (
                header(SET_IOREQ_SERVER_STATE | REPLY, 1, &[0]),
                WireError::BodySize {
                    op: 0x8005,
                    expected: 0,
                    got: 1,
                },
                Code::EINVAL,
            ),
        ];
        for (bytes, want, code) in cases {
            let got = decode(&bytes);
            assert_eq!(got, Err(want.clone()), "{bytes:02x?}");
            assert_eq!(want.code(), code, "{want}");
            assert!(!want.to_string().is_empty());
        }
    }

    #[test]
    fn encode_refuses_what_the_format_cannot_carry() {
        let long = "x".repeat(MAX_NAME + 1);
        let r = encode(&Message::Request {
            tag: 1,
            req: Request::Create {
                bufioreq: BufioreqMode::Off,
                name: long,
            },
        });
        assert!(matches!(r, Err(WireError::Name(_))));
        let r = encode(&Message::Request {
            tag: 1,
            req: Request::MapPosition {
                id: 1,
                position: pos(&[0; MAX_HOPS + 1]),
            },
        });
        assert!(matches!(r, Err(WireError::Position(_))));
        let r = encode(&Message::Request {
            tag: 1,
            req: Request::MapRange {
                id: 1,
                range: IoRange::new(RangeKind::Port, 5, 4),
            },
        });
        assert!(matches!(r, Err(WireError::Range { .. })));
        let r = encode(&Message::Reply {
            tag: 1,
            reply: Reply::Error {
                op: 1,
                code: Code::EIO,
                message: "y".repeat(MAX_TEXT + 1),
            },
        });
        assert_eq!(r, Err(WireError::Text));
        let r = encode(&Message::Reply {
            tag: 1,
            reply: Reply::Done { op: 0x55 },
        });
        assert_eq!(r, Err(WireError::UnknownOp(0x55)));
    }

    #[test]
    fn peek_reads_op_and_tag_of_a_bad_body() {
        let b = header(op::SET_IOREQ_SERVER_STATE, 0xdead, &[1]);
        assert!(decode(&b).is_err());
        assert_eq!(peek(&b), Some((op::SET_IOREQ_SERVER_STATE, 0xdead)));
        assert_eq!(peek(&b[..10]), None);
    }

    proptest::proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = decode(&b);
            let mut h = header(op::MAP_POSITION_TO_IOREQ_SERVER, 1, &b);
            let _ = decode(&h);
            for o in op::REQUESTS.iter().chain(&[op::ERROR, op::GOODBYE, op::POSITION_MOVED, 0x8001, 0x8002, 0x8003, 0x800e]) {
                h[6..8].copy_from_slice(&o.to_le_bytes());
                if let Ok(m) = decode(&h) {
                    // Whatever decodes re-encodes to the same bytes.
                    let tagged = if matches!(m, Message::Notice(_)) { 0 } else { 1 };
                    let mut want = h.clone();
                    want[8..12].copy_from_slice(&(tagged as u32).to_le_bytes());
                    proptest::prop_assert_eq!(encode(&m).unwrap(), want);
                }
            }
        }
    }
}
