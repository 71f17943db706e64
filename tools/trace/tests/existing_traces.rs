//! Traces written before: the committed fuzz seeds (fuzz/corpus-seed/trace_reader/, written
//! by the importer of their day) and `tests/data/functions.trace.zst` (functions at the
//! corners of bus/device/function, both paths, BAR events) decode to the values recorded in
//! `tests/data/seed-records.txt`, every field spelled out. The trace file and the listing were
//! produced by the writer and reader as they were when the trace had its own `Bdf` type (bus,
//! dev, func); the reader now returns `bdf_router::Sbdf`, and the listing must not change by a
//! byte. Writing the decoded records again gives the same file, byte for byte.
//!
//! `BLESS=1 cargo test -p ioreq-mux-trace --test existing_traces` rewrites the listing (only
//! when the format is meant to change).

use ioreq_mux_trace::{
    FORMAT_VERSION, HEADER_FRAME_MAGIC, MAGIC, Record, TraceError, TraceReader, TraceWriter,
};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const SEEDS: [&str; 5] = [
    "round-trip",
    "seabios-file",
    "seabios-stream",
    "snippet-file",
    "snippet-stream",
];

fn functions_file() -> std::io::Result<Vec<u8>> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/functions.trace.zst"))
}

fn seed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus-seed/trace_reader")
}

/// The trace file a seed stands for (the fuzz target's modes 0 and 1); `None` for mode 2
/// (records built from bytes, not a file).
fn seed_file(seed: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = seed.split_first()?;
    match mode % 3 {
        0 => Some(rest.to_vec()),
        1 => {
            let json = b"{}";
            let mut h = Vec::new();
            h.extend_from_slice(&HEADER_FRAME_MAGIC.to_le_bytes());
            h.extend_from_slice(&(16 + json.len() as u32).to_le_bytes());
            h.extend_from_slice(&MAGIC);
            h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            h.extend_from_slice(&0u32.to_le_bytes());
            h.extend_from_slice(json);
            h.extend(zstd::bulk::compress(rest, 1).ok()?);
            Some(h)
        }
        _ => None,
    }
}

/// bus, device, function and segment as plain numbers: independent of the Rust type.
macro_rules! function {
    ($f:expr) => {
        format!(
            "seg {} bus {:#04x} dev {:#04x} fn {}",
            $f.segment, $f.bus, $f.device, $f.function
        )
    };
}

fn listing(name: &str, file: &[u8]) -> String {
    let mut out = String::new();
    let mut r = match TraceReader::new(file) {
        Ok(r) => r,
        Err(e) => return format!("{name}: open error: {e}\n"),
    };
    let _ = writeln!(out, "{name}: meta {:?}", r.meta());
    loop {
        let rec = match r.next_record() {
            Ok(Some(rec)) => rec,
            Ok(None) => break,
            Err(e) => {
                let _ = writeln!(out, "  error: {e}");
                return out;
            }
        };
        let name = |id: Option<ioreq_mux_trace::StrId>| match id {
            Some(id) => format!("{:?}", r.string(id)),
            None => "-".to_string(),
        };
        match rec {
            Record::Access { access: a, repeat } => {
                let _ = write!(
                    out,
                    "  access x{repeat} vcpu {} {:?} {:?} {:#x} size {} rep {} data {:#x} region {}",
                    a.vcpu,
                    a.space,
                    a.dir,
                    a.addr,
                    a.size,
                    a.rep,
                    a.data,
                    name(a.region)
                );
                if let Some(c) = a.config {
                    let _ = write!(
                        out,
                        " config {:?} {} reg {:#x} device {}",
                        c.path,
                        function!(c.sbdf),
                        c.reg,
                        name(c.device)
                    );
                }
                out.push('\n');
            }
            Record::Bar(e) => {
                let _ = writeln!(
                    out,
                    "  bar {:?} device {} {} bar {} {:?} base {:#x} size {:#x}",
                    e.kind,
                    name(e.device),
                    function!(e.sbdf),
                    e.bar,
                    e.space,
                    e.base,
                    e.size
                );
            }
        }
    }
    let _ = writeln!(out, "  trailer {:?}", r.trailer());
    out
}

#[test]
fn seeds_decode_as_they_always_did() -> Result<(), TraceError> {
    let mut got = String::new();
    for seed in SEEDS {
        let bytes = std::fs::read(seed_dir().join(seed))?;
        if let Some(file) = seed_file(&bytes) {
            got.push_str(&listing(seed, &file));
        }
    }
    got.push_str(&listing("functions.trace.zst", &functions_file()?));
    let expected_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/seed-records.txt");
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&expected_path, &got)?;
    }
    let expected = std::fs::read_to_string(&expected_path)?;
    assert!(got.contains(" config "), "the seeds hold config accesses");
    assert!(got.contains("  bar "), "the seeds hold BAR events");
    assert_eq!(got, expected);
    Ok(())
}

#[test]
fn rewriting_an_old_trace_gives_the_same_bytes() -> Result<(), TraceError> {
    let old = functions_file()?;
    let mut r = TraceReader::new(&old[..])?;
    let mut w = TraceWriter::new(Vec::new(), r.meta())?;
    // The file defines these two, in this order, before its first record.
    w.intern("dev")?;
    w.intern("pci-conf-data")?;
    while let Some(rec) = r.next_record()? {
        w.write(&rec)?;
    }
    let (new, _) = w.finish()?;
    assert!(new == old, "the writer encodes an old trace differently");
    Ok(())
}
