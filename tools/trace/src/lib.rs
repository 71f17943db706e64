//! The project's own access-trace format: one record per guest access (port, MMIO, with a PCI
//! config annotation where the access is a config access), identical back-to-back accesses
//! folded into one record with a repeat count, plus BAR (re)placement events.
//!
//! The on-disk layout is described in `docs/trace-format.md`. In short: a zstd *skippable frame*
//! holding the magic, the format version and a JSON [`TraceMeta`], followed by a zstd stream of
//! compact binary records (strings are interned with "define string" records and referenced by
//! [`StrId`]), ending with an end record that carries the counts and an optional JSON trailer.
//!
//! Writing: [`TraceWriter::new`], [`TraceWriter::intern`] for names, [`TraceWriter::write`] per
//! record (folding happens here), [`TraceWriter::finish`]. Reading: [`TraceReader::open`] or
//! [`TraceReader::new`], then [`TraceReader::next_record`] (or the `Iterator` impl) and
//! [`TraceReader::string`] to resolve names. Reading allocates nothing per record.

mod codec;
pub mod counts;
mod reader;
mod writer;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::io;

pub use counts::{Progress, ProgressHandle, Thousands};
pub use reader::{StringTable, TraceContents, TraceReader, looks_like_zstd};
pub use writer::{DEFAULT_LEVEL, TraceSummary, TraceWriter};

/// The format version this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// The first eight bytes of the header frame's payload.
pub const MAGIC: [u8; 8] = *b"IOMUXTRC";

/// The zstd skippable-frame magic the header frame uses (`0x184D2A50..=0x184D2A5F` are all
/// skippable frames; this format uses the last one). Plain zstd tools skip the header.
pub const HEADER_FRAME_MAGIC: u32 = 0x184D_2A5E;

/// Conventional file-name suffix of a trace.
pub const FILE_SUFFIX: &str = ".trace.zst";

/// Longest string (region or device name) a trace may define, in bytes.
pub const MAX_STRING_LEN: usize = 64 * 1024;

/// Largest header metadata and trailer JSON, in bytes.
pub const MAX_JSON_LEN: usize = 64 * 1024 * 1024;

/// Which address space an access (or a BAR) is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Space {
    /// x86 I/O port space (`in`/`out`); the address is the port number (< 0x10000).
    Port,
    /// Memory-mapped I/O; the address is guest-physical.
    Mmio,
}

impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Space::Port => "port",
            Space::Mmio => "mmio",
        })
    }
}

/// Direction of an access: the multiplexer's own (a trace records what an ioreq carries).
pub use ioreq_server::Dir;

/// A PCI function: the router's own address type. A trace stores segment 0 only (bus and
/// devfn, docs/trace-format.md); tools print it in the short form [`Sbdf::short`] (`05:00.0`).
pub use bdf_router::Sbdf;

/// How a PCI config access reached the config space: the router's own
/// ([`ConfigPath::Cf8`], [`ConfigPath::Ecam`]).
pub use bdf_router::ConfigPath;

/// Index of an interned string (region or device name) in a trace's string table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StrId(pub u32);

/// What a recorded config access addressed, and who answered it: the annotation of an
/// [`Access`] that is a config access.
///
/// Not [`bdf_router::ConfigAccess`], which is the router's *decoded* access (function,
/// register and a 1/2/4-byte size inside the 4 KiB space, ready to route). This is what a
/// recording saw: the access's size is [`Access::size`] (an 8-byte ECAM access is one record
/// here and two decoded accesses in the router), and it adds the device that answered. The
/// function and path are the router's types, so the two agree on what they share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConfigAnnotation {
    pub path: ConfigPath,
    /// The function the guest addressed; always segment 0 (the format stores bus and devfn).
    pub sbdf: Sbdf,
    /// Config-space register offset of the access's first byte (0..=0xfff).
    pub reg: u16,
    /// Name of the device model that answered; `None` when no function answered (master
    /// abort) or, in QEMU logs, when the register is past the function's config space size.
    pub device: Option<StrId>,
}

/// One guest access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Access {
    pub vcpu: u16,
    pub space: Space,
    pub dir: Dir,
    /// Port number or guest-physical address.
    pub addr: u64,
    /// Bytes per item: 1, 2, 4 or 8.
    pub size: u8,
    /// Rep count of a string instruction (`rep ins`/`outs`/`movs`); 1 for a single access.
    pub rep: u32,
    /// The value written, or for a read the value the recorded machine returned; only the low
    /// `size` bytes are meaningful (the QEMU importer masks the rest off).
    pub data: u64,
    /// The device-model region that answered (QEMU memory-region name), if known.
    pub region: Option<StrId>,
    /// Present when the access is a PCI config access (CF8/CFC data port or ECAM window).
    pub config: Option<ConfigAnnotation>,
}

/// Whether a BAR was placed or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BarEventKind {
    /// The BAR now decodes `base..base+size` (QEMU `pci_update_mappings_add`).
    Map,
    /// The BAR stopped decoding `base..base+size` (QEMU `pci_update_mappings_del`).
    Unmap,
}

/// A BAR (re)placement event, recorded where it happened in the access stream (right after
/// the config write that caused it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BarEvent {
    pub kind: BarEventKind,
    /// Name of the device model owning the BAR.
    pub device: Option<StrId>,
    /// The BAR's function; always segment 0 (the format stores bus and devfn).
    pub sbdf: Sbdf,
    /// BAR index: 0..=5 for the BAR registers, 6 for the expansion ROM.
    pub bar: u8,
    /// [`Space::Port`] for an I/O BAR, [`Space::Mmio`] for a memory BAR or the ROM.
    pub space: Space,
    pub base: u64,
    pub size: u64,
}

/// One record of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Record {
    /// `repeat` identical back-to-back copies of `access` (`repeat >= 1`).
    Access {
        access: Access,
        repeat: u64,
    },
    Bar(BarEvent),
}

impl Record {
    /// A single (unfolded) access.
    pub const fn access(access: Access) -> Self {
        Record::Access { access, repeat: 1 }
    }
}

/// The trace's self-description, stored as JSON in the header. Unknown fields are ignored when
/// reading, so producers may add fields under `extra` freely.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceMeta {
    /// What was recorded, e.g. `QEMU 7.2 trace log seabios.log.zst`.
    #[serde(default)]
    pub source: String,
    /// The program (and version) that wrote the trace.
    #[serde(default)]
    pub producer: String,
    /// Anything else (JSON).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

/// What the end record says; available from [`TraceReader::trailer`] once the end was reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trailer {
    /// Records in the trace (access records after folding, plus BAR events).
    pub records: u64,
    /// Accesses after expanding the repeat counts.
    pub accesses: u64,
    /// Strings defined.
    pub strings: u64,
    /// Producer-defined JSON (the QEMU importer stores its `ImportStats` here); `null` if none.
    pub info: serde_json::Value,
}

/// Everything that can go wrong reading or writing a trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// I/O error of the underlying file or writer.
    #[error("trace I/O error: {0}")]
    Io(#[from] io::Error),
    /// The trace file cannot be opened.
    #[error("cannot open trace {}: {source}", path.display())]
    Open {
        path: std::path::PathBuf,
        source: io::Error,
    },
    /// The input does not start with a trace header.
    #[error("not an ioreq-mux trace: {0}")]
    NotATrace(String),
    /// The header names a format version this build cannot read.
    #[error(
        "unsupported ioreq-mux trace format version {found} (this build reads version \
         {supported} only); re-create the trace with this build or use a matching ioreq-mux"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    /// The header is damaged (bad length, flags, JSON).
    #[error("bad trace header: {0}")]
    BadHeader(String),
    /// The record stream is damaged. `record` is the index (from 0) of the record being decoded
    /// (string definitions not counted); `offset` is the position in the decompressed stream.
    #[error("corrupt trace at record {record} (stream offset {offset}): {what}")]
    Corrupt {
        record: u64,
        offset: u64,
        what: String,
    },
    /// The stream ends early (no end record, or a record cut short).
    #[error("truncated trace at record {record} (stream offset {offset}): {what}")]
    Truncated {
        record: u64,
        offset: u64,
        what: String,
    },
    /// A record given to [`TraceWriter::write`] cannot be stored.
    #[error("invalid record #{record} for the trace writer: {what}")]
    InvalidRecord { record: u64, what: String },
}
