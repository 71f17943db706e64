//! Target `qemu_import`: the QEMU log importer (`import_reader`) on arbitrary text, lenient
//! and strict.
//!
//! Lenient never fails (every line it cannot use is counted); strict fails exactly at the
//! first line lenient counts as malformed, and otherwise writes the same trace. What the
//! importer writes always reads back to its end, with the counts its statistics report, and
//! every access in it is well formed (size, value masked to the size, config annotations
//! only where they belong).

use ioreq_mux_qemu_import::{ImportError, ImportOptions, import_reader};
use ioreq_mux_trace::{Record, Space, TraceReader};

pub fn run(data: &[u8]) {
    let opts = |lenient| ImportOptions {
        lenient,
        progress: None,
    };
    let (lenient, stats) = match import_reader(data, Vec::new(), "fuzz", &opts(true)) {
        Ok(x) => x,
        Err(e) => panic!("lenient import failed: {e}"),
    };
    assert!(stats.malformed_lines <= stats.lines);
    assert!(stats.malformed_examples.len() as u64 <= stats.malformed_lines);
    let _ = (
        stats.to_string(),
        serde_json::to_string(&stats).expect("stats serialize"),
    );

    // The trace reads back, with the statistics' counts.
    let mut rd = TraceReader::new(&lenient[..]).expect("the importer's trace has a header");
    let (mut records, mut accesses) = (0u64, 0u64);
    while let Some(rec) = rd.next_record().expect("the importer's trace reads") {
        records += 1;
        if let Record::Access { access, repeat } = rec {
            accesses += repeat;
            assert!(matches!(access.size, 1 | 2 | 4 | 8));
            if access.size < 8 {
                assert_eq!(
                    access.data >> (8 * access.size),
                    0,
                    "value masked: {access:?}"
                );
            }
            assert_eq!(access.space == Space::Port, access.addr < 0x1_0000);
            if let Some(c) = access.config {
                assert!(c.sbdf.is_valid() && c.sbdf.segment == 0, "{access:?}");
                assert!(c.reg < 0x1000, "{access:?}");
            }
        }
    }
    let t = rd.trailer().expect("trailer");
    assert_eq!((t.records, t.accesses), (records, accesses));
    assert_eq!(
        (stats.trace.records, stats.trace.accesses),
        (records, accesses)
    );
    assert_eq!(stats.accesses.total, accesses);

    match import_reader(data, Vec::new(), "fuzz", &opts(false)) {
        Ok((strict, s)) => {
            assert_eq!(
                stats.malformed_lines, 0,
                "strict accepted what lenient counted"
            );
            assert_eq!(s.malformed_lines, 0);
            assert_eq!(strict, lenient, "strict and lenient write the same trace");
        }
        Err(ImportError::Malformed { line, .. }) => {
            assert!(
                stats.malformed_lines >= 1,
                "strict refused line {line}, lenient did not"
            );
            let first = &stats.malformed_examples[0];
            assert!(
                first.starts_with(&format!("line {line}:")),
                "strict stops at line {line}, lenient's first is {first}"
            );
        }
        Err(e) => panic!("strict import failed other than on a line: {e}"),
    }
}
