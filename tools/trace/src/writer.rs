//! Streaming trace writer with repeat folding.

use super::codec::{self, TAG_DEFINE_STRING, TAG_END};
use super::{
    Access, BarEvent, FORMAT_VERSION, HEADER_FRAME_MAGIC, MAGIC, MAX_JSON_LEN, MAX_STRING_LEN,
    Record, Sbdf, StrId, TraceError, TraceMeta,
};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::io::Write;

/// zstd level [`TraceWriter::new`] uses.
pub const DEFAULT_LEVEL: i32 = 6;

/// Encoded bytes are handed to the compressor in chunks of about this size.
const FLUSH_AT: usize = 256 * 1024;

/// Counts of what a writer has written (pending folded access included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TraceSummary {
    /// Access records plus BAR event records.
    pub records: u64,
    /// Access records after folding.
    pub access_records: u64,
    pub bar_records: u64,
    /// Accesses with repeat counts expanded.
    pub accesses: u64,
    pub strings: u64,
    /// Size of the record stream before compression (excluding the header frame).
    pub uncompressed_bytes: u64,
}

/// Writes a trace record by record in constant memory (plus the string table).
///
/// Identical back-to-back accesses are folded: writing the same [`Access`] again only bumps the
/// pending record's repeat count. Call [`TraceWriter::finish`] (or
/// [`TraceWriter::finish_with_trailer`]) at the end: a trace without its end record is
/// reported as truncated by the reader.
pub struct TraceWriter<W: Write> {
    enc: zstd::stream::write::Encoder<'static, W>,
    buf: Vec<u8>,
    strings: HashMap<Box<str>, StrId>,
    n_strings: u32,
    pending: Option<(Access, u64)>,
    /// Records passed to `write` (for error messages).
    submitted: u64,
    summary: TraceSummary,
}

impl<W: Write> fmt::Debug for TraceWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceWriter")
            .field("strings", &self.n_strings)
            .field("pending", &self.pending)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

/// The header frame: skippable-frame magic, payload length, then magic, version, flags, JSON.
pub(crate) fn encode_header(meta: &TraceMeta) -> Result<Vec<u8>, TraceError> {
    let json = serde_json::to_vec(meta)
        .map_err(|e| TraceError::BadHeader(format!("cannot serialize the metadata: {e}")))?;
    if json.len() > MAX_JSON_LEN {
        return Err(TraceError::BadHeader("metadata JSON too large".into()));
    }
    let payload_len = MAGIC.len() + 4 + 4 + json.len();
    let mut out = Vec::with_capacity(8 + payload_len);
    out.extend_from_slice(&HEADER_FRAME_MAGIC.to_le_bytes());
    let len32 = u32::try_from(payload_len)
        .map_err(|_| TraceError::BadHeader("metadata JSON too large".into()))?;
    out.extend_from_slice(&len32.to_le_bytes());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

impl<W: Write> TraceWriter<W> {
    /// Writes the header to `w` and starts the compressed record stream at [`DEFAULT_LEVEL`].
    pub fn new(w: W, meta: &TraceMeta) -> Result<Self, TraceError> {
        Self::with_level(w, meta, DEFAULT_LEVEL)
    }

    /// Like [`TraceWriter::new`] with a zstd compression level (1..=22).
    pub fn with_level(mut w: W, meta: &TraceMeta, level: i32) -> Result<Self, TraceError> {
        w.write_all(&encode_header(meta)?)?;
        let mut enc = zstd::stream::write::Encoder::new(w, level)?;
        enc.include_checksum(true)?;
        Ok(TraceWriter {
            enc,
            buf: Vec::with_capacity(FLUSH_AT + 1024),
            strings: HashMap::new(),
            n_strings: 0,
            pending: None,
            submitted: 0,
            summary: TraceSummary::default(),
        })
    }

    /// The id of `s`, defining it in the stream on first use.
    pub fn intern(&mut self, s: &str) -> Result<StrId, TraceError> {
        if let Some(&id) = self.strings.get(s) {
            return Ok(id);
        }
        if s.len() > MAX_STRING_LEN {
            return Err(TraceError::InvalidRecord {
                record: self.submitted,
                what: format!("string of {} bytes (limit {MAX_STRING_LEN})", s.len()),
            });
        }
        let id = StrId(self.n_strings);
        self.n_strings =
            self.n_strings
                .checked_add(1)
                .ok_or_else(|| TraceError::InvalidRecord {
                    record: self.submitted,
                    what: "string table full".into(),
                })?;
        self.buf.push(TAG_DEFINE_STRING);
        codec::put_varint(&mut self.buf, s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
        self.strings.insert(s.into(), id);
        self.summary.strings += 1;
        self.maybe_flush()?;
        Ok(id)
    }

    /// Number of strings defined so far.
    pub fn string_count(&self) -> u32 {
        self.n_strings
    }

    /// Writes one record (folding it into the previous one when it is the same access).
    pub fn write(&mut self, rec: &Record) -> Result<(), TraceError> {
        let index = self.submitted;
        self.submitted += 1;
        match rec {
            Record::Access { access, repeat } => {
                self.validate_access(index, access, *repeat)?;
                if let Some((prev, n)) = &mut self.pending {
                    if prev == access {
                        if let Some(total) = n.checked_add(*repeat) {
                            *n = total;
                            self.summary.accesses = self.summary.accesses.saturating_add(*repeat);
                            return Ok(());
                        }
                    }
                }
                self.flush_pending();
                self.pending = Some((*access, *repeat));
                self.summary.records += 1;
                self.summary.access_records += 1;
                self.summary.accesses = self.summary.accesses.saturating_add(*repeat);
            }
            Record::Bar(ev) => {
                self.validate_bar(index, ev)?;
                self.flush_pending();
                codec::encode_bar(&mut self.buf, ev);
                self.summary.records += 1;
                self.summary.bar_records += 1;
            }
        }
        self.maybe_flush()
    }

    /// Writes a single access (repeat 1).
    pub fn write_access(&mut self, access: &Access) -> Result<(), TraceError> {
        self.write(&Record::access(*access))
    }

    /// What has been written so far, counting the pending (still foldable) access.
    pub fn summary(&self) -> TraceSummary {
        let mut s = self.summary;
        s.uncompressed_bytes += self.buf.len() as u64;
        s
    }

    /// Ends the trace (end record with no trailer info) and returns the inner writer.
    pub fn finish(self) -> Result<(W, TraceSummary), TraceError> {
        self.finish_with_trailer(&serde_json::Value::Null)
    }

    /// Ends the trace with `info` stored as JSON in the end record (see
    /// [`super::Trailer::info`]) and returns the inner writer, flushed.
    pub fn finish_with_trailer<T: Serialize>(
        mut self,
        info: &T,
    ) -> Result<(W, TraceSummary), TraceError> {
        self.flush_pending();
        let json = serde_json::to_vec(info).map_err(|e| TraceError::InvalidRecord {
            record: self.submitted,
            what: format!("cannot serialize the trailer: {e}"),
        })?;
        if json.len() > MAX_JSON_LEN {
            return Err(TraceError::InvalidRecord {
                record: self.submitted,
                what: "trailer JSON too large".into(),
            });
        }
        self.buf.push(TAG_END);
        codec::put_varint(&mut self.buf, self.summary.records);
        codec::put_varint(&mut self.buf, self.summary.accesses);
        codec::put_varint(&mut self.buf, self.summary.strings);
        codec::put_varint(&mut self.buf, json.len() as u64);
        self.buf.extend_from_slice(&json);
        self.flush_buf()?;
        let mut w = self.enc.finish()?;
        w.flush()?;
        Ok((w, self.summary))
    }

    fn flush_pending(&mut self) {
        if let Some((a, n)) = self.pending.take() {
            codec::encode_access(&mut self.buf, &a, n);
        }
    }

    fn maybe_flush(&mut self) -> Result<(), TraceError> {
        if self.buf.len() >= FLUSH_AT {
            self.flush_buf()?;
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> Result<(), TraceError> {
        self.enc.write_all(&self.buf)?;
        self.summary.uncompressed_bytes += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    fn check_id(&self, index: u64, id: Option<StrId>, what: &str) -> Result<(), TraceError> {
        match id {
            Some(StrId(i)) if i >= self.n_strings => Err(TraceError::InvalidRecord {
                record: index,
                what: format!("{what} string id {i} was not interned by this writer"),
            }),
            _ => Ok(()),
        }
    }

    fn validate_access(&self, index: u64, a: &Access, repeat: u64) -> Result<(), TraceError> {
        let bad = |what: String| TraceError::InvalidRecord {
            record: index,
            what,
        };
        if !matches!(a.size, 1 | 2 | 4 | 8) {
            return Err(bad(format!("access size {} is not 1, 2, 4 or 8", a.size)));
        }
        if repeat == 0 {
            return Err(bad("repeat count 0".into()));
        }
        if a.rep == 0 {
            return Err(bad("rep count 0".into()));
        }
        self.check_id(index, a.region, "region")?;
        if let Some(c) = &a.config {
            if let Some(why) = unstorable(c.sbdf) {
                return Err(bad(format!("config function {why}")));
            }
            self.check_id(index, c.device, "config device")?;
        }
        Ok(())
    }

    fn validate_bar(&self, index: u64, e: &BarEvent) -> Result<(), TraceError> {
        if let Some(why) = unstorable(e.sbdf) {
            return Err(TraceError::InvalidRecord {
                record: index,
                what: format!("BAR event function {why}"),
            });
        }
        self.check_id(index, e.device, "BAR device")
    }
}

/// Why the format cannot store this function (it stores bus and devfn, segment 0), if it cannot.
fn unstorable(s: Sbdf) -> Option<String> {
    if !s.is_valid() {
        Some(format!(
            "{}: device {} function {} out of range",
            s, s.device, s.function
        ))
    } else if s.segment != 0 {
        Some(format!("{s}: a trace stores segment 0 only"))
    } else {
        None
    }
}
