//! Target `trace_reader`: `TraceReader` on hostile input, and the writer/reader round trip.
//!
//! Input: mode byte (mod 3), then
//! - 0: a whole file (header frame and zstd stream) given to `TraceReader::new`;
//! - 1: the decompressed record stream, behind a valid header (compressed here at level 1),
//!   so the fuzzer works on the record encoding rather than on zstd's;
//! - 2: records built from the bytes, written with `TraceWriter` and read back.
//!
//! Reading never panics and stops: every record it returns is well formed (sizes, counts,
//! string ids defined before use), the first error ends the stream, and a trace read to its
//! end record has a trailer whose counts match what was read. Written records read back
//! exactly, folded as the writer folds them.

use crate::Bytes;
use ioreq_mux_trace::{
    Access, BarEvent, BarEventKind, ConfigAnnotation, ConfigPath, Dir, FORMAT_VERSION,
    HEADER_FRAME_MAGIC, MAGIC, Record, Sbdf, Space, StrId, TraceMeta, TraceReader, TraceWriter,
};
use std::io::Read;

/// Records read before a zip bomb is left alone (the reader streams it in constant memory,
/// which is all it promises).
const MAX_RECORDS: u64 = 200_000;

pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    match b.u8() % 3 {
        0 => read_all(b.rest(), u64::MAX),
        1 => {
            let rest = b.rest();
            let mut file = header(b"{}");
            file.extend(zstd::bulk::compress(rest, 1).expect("zstd compresses"));
            // Every record takes at least one byte of the stream.
            read_all(&file, rest.len() as u64);
        }
        _ => round_trip(&mut b),
    }
}

/// The header frame of a trace (docs/trace-format.md).
pub fn header(json: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&HEADER_FRAME_MAGIC.to_le_bytes());
    h.extend_from_slice(&(16 + json.len() as u32).to_le_bytes());
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(json);
    h
}

/// Whether the format can store the function: in range, segment 0 (it stores bus and devfn).
fn storable(s: Sbdf) -> bool {
    s.is_valid() && s.segment == 0
}

/// A function from three bytes (bus, device, function), now and then out of range or in
/// another segment than 0, which the writer must refuse.
fn function(b: &mut Bytes<'_>) -> Sbdf {
    let bus = b.u8();
    let device = b.u8() % 34;
    let f = b.u8();
    Sbdf {
        segment: u16::from(f >= 0xf8),
        bus,
        device,
        function: f % 9,
    }
}

fn check_record<R: Read>(rd: &TraceReader<R>, rec: &Record) -> u64 {
    let defined = |id: Option<StrId>| {
        if let Some(id) = id {
            assert!(
                rd.string(id).is_some(),
                "record refers to undefined string {id:?}"
            );
        }
    };
    match rec {
        Record::Access { access, repeat } => {
            assert!(matches!(access.size, 1 | 2 | 4 | 8), "{access:?}");
            assert!(*repeat >= 1 && access.rep >= 1, "{rec:?}");
            defined(access.region);
            if let Some(c) = &access.config {
                assert!(storable(c.sbdf), "{rec:?}");
                defined(c.device);
            }
            *repeat
        }
        Record::Bar(ev) => {
            assert!(storable(ev.sbdf), "{rec:?}");
            defined(ev.device);
            0
        }
    }
}

fn read_all(file: &[u8], max_records: u64) {
    let Ok(mut rd) = TraceReader::new(file) else {
        return;
    };
    let _ = (rd.meta(), rd.version());
    let (mut n, mut accesses) = (0u64, 0u64);
    loop {
        match rd.next_record() {
            Ok(Some(rec)) => {
                n += 1;
                accesses = accesses.saturating_add(check_record(&rd, &rec));
                assert!(n <= max_records, "more records than bytes in the stream");
                assert_eq!((rd.records_read(), rd.accesses_read()), (n, accesses));
                if n >= MAX_RECORDS {
                    return;
                }
            }
            Ok(None) => {
                let t = rd.trailer().expect("a trace read to its end has a trailer");
                assert_eq!((t.records, t.accesses), (n, accesses));
                assert_eq!(t.strings, rd.strings().len() as u64);
                assert!(matches!(rd.next_record(), Ok(None)));
                return;
            }
            Err(e) => {
                let _ = e.to_string();
                assert!(rd.trailer().is_none());
                assert!(
                    matches!(rd.next_record(), Ok(None)),
                    "the first error ends the stream"
                );
                return;
            }
        }
    }
}

fn round_trip(b: &mut Bytes<'_>) {
    let n = usize::from(b.u8() % 32);
    let meta = TraceMeta {
        source: String::from_utf8_lossy(b.take(n)).into_owned(),
        producer: "fuzz".into(),
        extra: serde_json::Value::Null,
    };
    let mut w = TraceWriter::with_level(Vec::new(), &meta, 1).expect("writer");
    let mut names: Vec<String> = vec![];
    let mut want: Vec<Record> = vec![];
    let mut ops = 0;
    while !b.is_empty() && ops < 200 {
        ops += 1;
        let k = b.u8();
        match k % 4 {
            0 => {
                let n = usize::from(b.u8() % 16);
                let s = String::from_utf8_lossy(b.take(n)).into_owned();
                let id = w.intern(&s).expect("intern");
                match names.iter().position(|x| *x == s) {
                    Some(i) => assert_eq!(id, StrId(i as u32)),
                    None => {
                        assert_eq!(id, StrId(names.len() as u32));
                        names.push(s);
                    }
                }
            }
            1 | 2 => {
                let id = |b: &mut Bytes<'_>| {
                    let v = b.u8();
                    (v & 0x80 == 0).then_some(StrId(u32::from(v & 0x7f)))
                };
                let f = b.u8();
                let access = Access {
                    vcpu: if f & 1 != 0 { b.u16() } else { 0 },
                    space: if f & 2 != 0 { Space::Mmio } else { Space::Port },
                    dir: if f & 4 != 0 { Dir::Write } else { Dir::Read },
                    addr: b.u64() >> (b.u8() & 63),
                    size: [1, 2, 4, 8, 0, 3, 16, 255][usize::from(b.u8() & 7)],
                    rep: if f & 8 != 0 { b.u32() } else { 1 },
                    data: b.u64(),
                    region: id(b),
                    config: (f & 16 != 0).then(|| ConfigAnnotation {
                        path: if f & 32 != 0 {
                            ConfigPath::Ecam
                        } else {
                            ConfigPath::Cf8
                        },
                        sbdf: function(b),
                        reg: b.u16(),
                        device: id(b),
                    }),
                };
                let repeat = if f & 64 != 0 {
                    b.u64() >> (b.u8() & 63)
                } else {
                    1
                };
                let valid_id = |i: Option<StrId>| i.is_none_or(|i| (i.0 as usize) < names.len());
                let valid = matches!(access.size, 1 | 2 | 4 | 8)
                    && repeat != 0
                    && access.rep != 0
                    && valid_id(access.region)
                    && access
                        .config
                        .is_none_or(|c| storable(c.sbdf) && valid_id(c.device));
                let rec = Record::Access { access, repeat };
                let got = w.write(&rec);
                assert_eq!(got.is_ok(), valid, "write {rec:?}: {got:?}");
                if valid {
                    // The writer folds an access into the previous identical one.
                    match want.last_mut() {
                        Some(Record::Access {
                            access: a,
                            repeat: n,
                        }) if *a == access && n.checked_add(repeat).is_some() => {
                            *n += repeat;
                        }
                        _ => want.push(rec),
                    }
                }
            }
            _ => {
                let ev = BarEvent {
                    kind: if k & 0x10 != 0 {
                        BarEventKind::Unmap
                    } else {
                        BarEventKind::Map
                    },
                    device: (k & 0x20 != 0).then(|| StrId(u32::from(b.u8() % 8))),
                    sbdf: function(b),
                    bar: b.u8(),
                    space: if k & 0x40 != 0 {
                        Space::Port
                    } else {
                        Space::Mmio
                    },
                    base: b.u64(),
                    size: b.u64(),
                };
                let valid =
                    storable(ev.sbdf) && ev.device.is_none_or(|i| (i.0 as usize) < names.len());
                let got = w.write(&Record::Bar(ev));
                assert_eq!(got.is_ok(), valid, "write {ev:?}: {got:?}");
                if valid {
                    want.push(Record::Bar(ev));
                }
            }
        }
    }
    let summary = w.summary();
    let (file, fin) = w.finish().expect("finish");
    assert_eq!(summary.records, fin.records);
    let mut rd = TraceReader::new(&file[..]).expect("our own header reads");
    assert_eq!(rd.meta(), &meta);
    let mut got = vec![];
    while let Some(rec) = rd.next_record().expect("our own trace reads") {
        check_record(&rd, &rec);
        got.push(rec);
    }
    assert_eq!(got, want, "records read back");
    let t = rd.trailer().expect("trailer");
    assert_eq!(t.records, want.len() as u64);
    assert_eq!(t.records, fin.records);
    assert_eq!(t.accesses, fin.accesses);
    assert_eq!(t.strings, names.len() as u64);
    let got_names: Vec<&str> = rd.strings().iter().map(|(_, s)| s).collect();
    assert_eq!(got_names, names);
}
