//! Streaming trace reader: no heap allocation per record.

use super::codec::{
    self, ACC_RECORD, Cursor, DecodeError, MAX_FIXED_RECORD, TAG_BAR_EVENT, TAG_DEFINE_STRING,
    TAG_END,
};
use super::{
    FORMAT_VERSION, HEADER_FRAME_MAGIC, MAGIC, MAX_JSON_LEN, MAX_STRING_LEN, Record, StrId,
    TraceError, TraceMeta, Trailer,
};
use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

/// Initial size of the decompressed-bytes buffer.
const BUF_SIZE: usize = 256 * 1024;

/// Standard zstd frame magic (little endian).
const ZSTD_FRAME_MAGIC: u32 = 0xFD2F_B528;

/// Whether `bytes` begin as a zstd stream does: a zstd frame or a skippable frame (a trace
/// begins with one, `0x184D2A50..=0x184D2A5F`).
pub fn looks_like_zstd(bytes: &[u8]) -> bool {
    bytes.first_chunk::<4>().is_some_and(|h| {
        let magic = u32::from_le_bytes(*h);
        magic == ZSTD_FRAME_MAGIC || magic & 0xffff_fff0 == 0x184d_2a50
    })
}

/// What a whole trace names: the QEMU device types of its configuration accesses and BAR
/// events (what a topology's `qemu_devices` lists), and how many accesses it has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContents {
    pub devices: BTreeSet<String>,
    pub accesses: u64,
}

/// The strings a trace has defined so far, indexed by [`StrId`].
#[derive(Debug, Clone, Default)]
pub struct StringTable {
    strings: Vec<Box<str>>,
}

impl StringTable {
    /// The string with id `id`, if defined.
    #[inline]
    pub fn get(&self, id: StrId) -> Option<&str> {
        self.strings.get(id.0 as usize).map(|s| &**s)
    }

    /// Number of strings defined.
    #[inline]
    pub fn len(&self) -> usize {
        self.strings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
    }

    /// The id of `s`, if defined (linear search: for set-up code, not per record).
    pub fn find(&self, s: &str) -> Option<StrId> {
        self.strings
            .iter()
            .position(|x| &**x == s)
            .map(|i| StrId(i as u32))
    }

    /// All strings with their ids, in definition order.
    pub fn iter(&self) -> impl Iterator<Item = (StrId, &str)> {
        self.strings
            .iter()
            .enumerate()
            .map(|(i, s)| (StrId(i as u32), &**s))
    }
}

/// Reads a trace record by record.
///
/// String definitions are consumed internally; resolve the [`StrId`]s of a record with
/// [`TraceReader::string`] (every id a record carries is defined before it). The first error
/// ends the stream: later calls return `Ok(None)`.
pub struct TraceReader<R: Read> {
    dec: zstd::stream::read::Decoder<'static, BufReader<R>>,
    meta: TraceMeta,
    version: u32,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    eof: bool,
    /// Stream offset of `buf[0]`.
    base_offset: u64,
    strings: StringTable,
    records: u64,
    accesses: u64,
    trailer: Option<Trailer>,
    done: bool,
}

impl<R: Read> fmt::Debug for TraceReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceReader")
            .field("meta", &self.meta)
            .field("version", &self.version)
            .field("records", &self.records)
            .field("strings", &self.strings.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl TraceReader<File> {
    /// Opens a trace file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, TraceError> {
        let path = path.as_ref();
        let f = File::open(path).map_err(|source| TraceError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(f)
    }
}

fn read_header<R: Read>(r: &mut R) -> Result<(u32, TraceMeta), TraceError> {
    let mut first = [0u8; 8];
    let got = read_fully(r, &mut first)?;
    if got < first.len() {
        return Err(TraceError::NotATrace(format!(
            "input is only {got} bytes long, shorter than a trace header"
        )));
    }
    let [a, b, c, d, e, f, g, h] = first;
    let frame_magic = u32::from_le_bytes([a, b, c, d]);
    if frame_magic != HEADER_FRAME_MAGIC {
        let what = if frame_magic == ZSTD_FRAME_MAGIC {
            "a zstd stream without the trace header frame (a compressed QEMU log? \
             convert it with import-qemu-trace first)"
                .to_string()
        } else if first.starts_with(b"memory_") || first.starts_with(b"pci_") {
            "looks like a QEMU trace log; convert it with import-qemu-trace first".to_string()
        } else if first
            .iter()
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
        {
            "it is text, not a trace (a topology? the topology is given with --topology, the \
             trace first)"
                .to_string()
        } else {
            format!("bad magic bytes {:02x?}", &first[..4])
        };
        return Err(TraceError::NotATrace(what));
    }
    let len = u32::from_le_bytes([e, f, g, h]) as usize;
    if len < 16 {
        return Err(TraceError::NotATrace(format!(
            "zstd skippable frame of {len} bytes where the trace header was expected"
        )));
    }
    if len > MAX_JSON_LEN + 16 {
        return Err(TraceError::BadHeader(format!(
            "header frame length {len} too large"
        )));
    }
    let mut fixed = [0u8; 16];
    if read_fully(r, &mut fixed)? < fixed.len() {
        return Err(TraceError::BadHeader("file ends inside the header".into()));
    }
    if fixed[..8] != MAGIC {
        return Err(TraceError::NotATrace(format!(
            "header frame magic {:02x?} is not {:?}",
            &fixed[..8],
            String::from_utf8_lossy(&MAGIC)
        )));
    }
    let version = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
    if version != FORMAT_VERSION {
        return Err(TraceError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let flags = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]);
    if flags != 0 {
        return Err(TraceError::BadHeader(format!(
            "unknown header flags {flags:#x} for version {version}"
        )));
    }
    let mut json = vec![0u8; len - 16];
    if read_fully(r, &mut json)? < json.len() {
        return Err(TraceError::BadHeader(
            "file ends inside the header metadata".into(),
        ));
    }
    let meta = serde_json::from_slice(&json)
        .map_err(|e| TraceError::BadHeader(format!("metadata is not valid JSON: {e}")))?;
    Ok((version, meta))
}

/// Reads until `buf` is full or EOF; returns the number of bytes read.
fn read_fully<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, TraceError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TraceError::Io(e)),
        }
    }
    Ok(n)
}

impl<R: Read> TraceReader<R> {
    /// Reads the header from `r` (checking magic and version) and prepares to read records.
    pub fn new(mut r: R) -> Result<Self, TraceError> {
        let (version, meta) = read_header(&mut r)?;
        let mut dec = zstd::stream::read::Decoder::new(r)?;
        dec.window_log_max(31)?;
        Ok(TraceReader {
            dec,
            meta,
            version,
            buf: vec![0; BUF_SIZE],
            pos: 0,
            end: 0,
            eof: false,
            base_offset: 0,
            strings: StringTable::default(),
            records: 0,
            accesses: 0,
            trailer: None,
            done: false,
        })
    }

    /// The header metadata.
    pub fn meta(&self) -> &TraceMeta {
        &self.meta
    }

    /// The format version of the file (always [`FORMAT_VERSION`] for an open reader).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The strings defined so far.
    #[inline]
    pub fn strings(&self) -> &StringTable {
        &self.strings
    }

    /// The string `id` names (region or device name); `None` only for ids not from this trace.
    #[inline]
    pub fn string(&self, id: StrId) -> Option<&str> {
        self.strings.get(id)
    }

    /// Records returned so far (access records plus BAR events).
    pub fn records_read(&self) -> u64 {
        self.records
    }

    /// Accesses returned so far, with repeat counts expanded.
    pub fn accesses_read(&self) -> u64 {
        self.accesses
    }

    /// The end record's contents, once [`TraceReader::next_record`] has returned `Ok(None)`.
    pub fn trailer(&self) -> Option<&Trailer> {
        self.trailer.as_ref()
    }

    /// Reads the rest of the trace for what it names ([`TraceContents`]).
    pub fn contents(mut self) -> Result<TraceContents, TraceError> {
        let mut ids = BTreeSet::new();
        let mut accesses = 0;
        while let Some(rec) = self.next_record()? {
            let device = match rec {
                Record::Access { access, repeat } => {
                    accesses += repeat;
                    access.config.and_then(|c| c.device)
                }
                Record::Bar(ev) => ev.device,
            };
            ids.extend(device);
        }
        let devices = ids
            .into_iter()
            .filter_map(|id| self.string(id).map(str::to_string))
            .collect();
        Ok(TraceContents { devices, accesses })
    }

    /// The next record, `Ok(None)` after the end record.
    #[inline]
    pub fn next_record(&mut self) -> Result<Option<Record>, TraceError> {
        if self.done {
            return Ok(None);
        }
        let r = self.next_inner();
        if r.is_err() {
            self.done = true;
        }
        r
    }

    /// Reads all remaining records, checking them, and returns the trailer.
    pub fn read_to_end(&mut self) -> Result<Option<&Trailer>, TraceError> {
        while self.next_record()?.is_some() {}
        Ok(self.trailer.as_ref())
    }

    #[inline]
    fn next_inner(&mut self) -> Result<Option<Record>, TraceError> {
        loop {
            if self.end - self.pos < MAX_FIXED_RECORD && !self.eof {
                self.refill(MAX_FIXED_RECORD)?;
            }
            let avail = &self.buf[self.pos..self.end];
            let Some((&tag, rest)) = avail.split_first() else {
                return Err(self.truncated("the stream ends without an end record"));
            };
            let mut c = Cursor::new(rest);
            if tag & ACC_RECORD != 0 {
                return match codec::decode_access(&mut c, tag, self.strings.len()) {
                    Ok((access, repeat)) => {
                        self.pos += 1 + c.pos;
                        self.records += 1;
                        self.accesses = self.accesses.saturating_add(repeat);
                        Ok(Some(Record::Access { access, repeat }))
                    }
                    Err(e) => Err(self.decode_error(e, "access record")),
                };
            }
            match tag {
                TAG_BAR_EVENT => {
                    return match codec::decode_bar(&mut c, self.strings.len()) {
                        Ok(ev) => {
                            self.pos += 1 + c.pos;
                            self.records += 1;
                            Ok(Some(Record::Bar(ev)))
                        }
                        Err(e) => Err(self.decode_error(e, "BAR event record")),
                    };
                }
                TAG_DEFINE_STRING => self.define_string()?,
                TAG_END => {
                    self.read_end()?;
                    self.done = true;
                    return Ok(None);
                }
                t => {
                    return Err(self.corrupt(format!("unknown record tag {t:#04x}")));
                }
            }
        }
    }

    /// Makes at least `want` bytes available from `pos` unless the stream ends first.
    fn refill(&mut self, want: usize) -> Result<(), TraceError> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.base_offset += self.pos as u64;
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.buf.len() < want {
            let n = want.max(self.buf.len() * 2);
            self.buf.resize(n, 0);
        }
        while self.end < want && !self.eof {
            match self.dec.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(self.truncated(&format!("compressed stream cut short ({e})")));
                }
                Err(e) => {
                    return Err(self.corrupt(format!("decompression failed: {e}")));
                }
            }
        }
        Ok(())
    }

    /// Makes `n` bytes available from `pos` or fails with a truncation error.
    fn need(&mut self, n: usize, what: &str) -> Result<(), TraceError> {
        if self.end - self.pos < n {
            self.refill(n)?;
            if self.end - self.pos < n {
                return Err(self.truncated(&format!("{what} cut short")));
            }
        }
        Ok(())
    }

    fn define_string(&mut self) -> Result<(), TraceError> {
        let mut c = Cursor::new(&self.buf[self.pos + 1..self.end]);
        let len = c
            .varint()
            .map_err(|e| self.decode_error(e, "string definition"))?;
        if len > MAX_STRING_LEN as u64 {
            return Err(self.corrupt(format!(
                "string definition of {len} bytes (limit {MAX_STRING_LEN})"
            )));
        }
        let head = 1 + c.pos;
        let total = head + len as usize;
        self.need(total, "string definition")?;
        let bytes = &self.buf[self.pos + head..self.pos + total];
        let s = std::str::from_utf8(bytes)
            .map_err(|_| self.corrupt("string definition is not valid UTF-8".into()))?;
        if self.strings.strings.len() >= u32::MAX as usize {
            return Err(self.corrupt("too many strings".into()));
        }
        self.strings.strings.push(s.into());
        self.pos += total;
        Ok(())
    }

    fn read_end(&mut self) -> Result<(), TraceError> {
        let mut c = Cursor::new(&self.buf[self.pos + 1..self.end]);
        let mut fields = [0u64; 4];
        for f in &mut fields {
            *f = c.varint().map_err(|e| self.decode_error(e, "end record"))?;
        }
        let [records, accesses, strings, json_len] = fields;
        if json_len > MAX_JSON_LEN as u64 {
            return Err(self.corrupt(format!("end record trailer of {json_len} bytes")));
        }
        let head = 1 + c.pos;
        let total = head + json_len as usize;
        self.need(total, "end record")?;
        let json = &self.buf[self.pos + head..self.pos + total];
        let info = if json.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(json)
                .map_err(|e| self.corrupt(format!("end record trailer is not valid JSON: {e}")))?
        };
        if records != self.records || accesses != self.accesses {
            return Err(self.corrupt(format!(
                "end record counts {records} records / {accesses} accesses but the stream held \
                 {} / {}",
                self.records, self.accesses
            )));
        }
        if strings != self.strings.len() as u64 {
            return Err(self.corrupt(format!(
                "end record counts {strings} strings but the stream defined {}",
                self.strings.len()
            )));
        }
        self.pos += total;
        // Nothing may follow the end record; reading on also makes zstd verify the checksum.
        if self.pos == self.end && !self.eof {
            self.refill(1)?;
        }
        if self.pos != self.end {
            return Err(self.corrupt("data after the end record".into()));
        }
        self.trailer = Some(Trailer {
            records,
            accesses,
            strings,
            info,
        });
        Ok(())
    }

    fn offset(&self) -> u64 {
        self.base_offset + self.pos as u64
    }

    fn corrupt(&self, what: String) -> TraceError {
        TraceError::Corrupt {
            record: self.records,
            offset: self.offset(),
            what,
        }
    }

    fn truncated(&self, what: &str) -> TraceError {
        TraceError::Truncated {
            record: self.records,
            offset: self.offset(),
            what: what.to_string(),
        }
    }

    fn decode_error(&self, e: DecodeError, what: &str) -> TraceError {
        match e {
            DecodeError::Short => self.truncated(&format!("{what} cut short")),
            DecodeError::Bad(why) => self.corrupt(format!("{what}: {why}")),
        }
    }
}

impl<R: Read> Iterator for TraceReader<R> {
    type Item = Result<Record, TraceError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}
