//! Imports the real QEMU 7.2 Q35 traces and measures decoding. Ignored by default (the SeaBIOS
//! log is 1.4 GB of text); run in release mode:
//!
//! ```text
//! IOREQ_MUX_QEMU_TRACES=/path/to/traces/q35 \
//!   cargo test --release -p ioreq-mux --test real_traces -- --ignored --nocapture
//! ```
//!
//! `IOREQ_MUX_QEMU_TRACES` is the directory holding `seabios.log.zst`, `ovmf.log.zst` and their
//! `*.info.txt` (default: `/work/shared/traces/q35`); `IOREQ_MUX_TRACE_OUT` is where the traces
//! are written (default: the system temporary directory).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use ioreq_mux::qemu_import::{ImportOptions, ImportStats, import_file};
use ioreq_mux::trace::{Record, TraceReader};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

fn traces_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("IOREQ_MUX_QEMU_TRACES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/shared/traces/q35"));
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "skipping: {} not found (set IOREQ_MUX_QEMU_TRACES)",
            dir.display()
        );
        None
    }
}

/// Peak resident set size of this process so far (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Region names of the `AS "I/O"` and `AS "memory"` flat views in QEMU's `info mtree -f`.
fn mtree_spaces(info: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut io = BTreeSet::new();
    let mut mem = BTreeSet::new();
    let mut current: Option<bool> = None; // Some(true) = I/O view, Some(false) = memory view
    let mut in_flat = false;
    for line in info.lines() {
        if line.starts_with("=== ") {
            in_flat = line.contains("info mtree -f");
            current = None;
            continue;
        }
        if !in_flat {
            continue;
        }
        if line.starts_with("FlatView") {
            current = None;
        } else if line.starts_with(" AS \"I/O\"") {
            current = Some(true);
        } else if line.starts_with(" AS \"memory\"") {
            current = Some(false);
        } else if let (Some(is_io), Some(pos)) = (current, line.find("): ")) {
            let name = line[pos + 3..].split(" @").next().unwrap_or("").trim();
            if is_io {
                io.insert(name.to_string());
            } else {
                mem.insert(name.to_string());
            }
        }
    }
    (io, mem)
}

fn check_against_mtree(stats: &ImportStats, info: &str) {
    let (io, mem) = mtree_spaces(info);
    assert!(io.contains("pci-conf-data") && mem.contains("pcie-mmcfg-mmio"));
    for (name, r) in &stats.regions {
        let (in_io, in_mem) = (io.contains(name), mem.contains(name));
        match r.space.as_str() {
            "port" => assert!(
                in_io || !in_mem,
                "'{name}' classified port, mtree says memory"
            ),
            "mmio" => assert!(in_mem || !in_io, "'{name}' classified mmio, mtree says I/O"),
            "internal" => {}
            other => panic!("'{name}' classified {other}"),
        }
        if !in_io && !in_mem {
            println!(
                "  note: '{name}' ({}) is not in the final flat views",
                r.space
            );
        }
    }
}

/// Decodes the whole trace `rounds` times; returns the best (seconds, records, accesses).
fn decode(path: &PathBuf, rounds: usize) -> (f64, u64, u64) {
    let mut best = f64::MAX;
    let (mut records, mut accesses) = (0, 0);
    for _ in 0..rounds {
        let t = Instant::now();
        let mut r = TraceReader::open(path).unwrap();
        let (mut n, mut a, mut sum) = (0u64, 0u64, 0u64);
        while let Some(rec) = r.next_record().unwrap() {
            n += 1;
            if let Record::Access { access, repeat } = rec {
                a += repeat;
                sum = sum.wrapping_add(access.data ^ access.addr);
            }
        }
        std::hint::black_box(sum);
        best = best.min(t.elapsed().as_secs_f64());
        assert_eq!(r.trailer().unwrap().records, n);
        (records, accesses) = (n, a);
    }
    (best, records, accesses)
}

fn import_and_check(name: &str) {
    let Some(dir) = traces_dir() else { return };
    let input = dir.join(format!("{name}.log.zst"));
    let out_dir = std::env::var_os("IOREQ_MUX_TRACE_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let output = out_dir.join(format!("{name}.trace.zst"));
    let t = Instant::now();
    let stats = import_file(&input, &output, &ImportOptions::default()).unwrap();
    let wall = t.elapsed().as_secs_f64();
    println!("{stats}");
    println!(
        "{name}: import {wall:.2} s ({:.0} MB/s of log text, {:.2} M lines/s), peak RSS {:.1} MiB",
        stats.log_bytes as f64 / wall / 1e6,
        stats.lines as f64 / wall / 1e6,
        peak_rss_mib().unwrap_or(f64::NAN)
    );
    assert_eq!(stats.malformed_lines, 0);
    assert_eq!(stats.anomalies.total, 0, "{:#?}", stats.anomalies);
    assert_eq!(stats.mapping_events.space_inferred_from_address, 0);
    assert_eq!(stats.trace.accesses, stats.accesses.total);
    if let Ok(info) = std::fs::read_to_string(dir.join(format!("{name}.info.txt"))) {
        check_against_mtree(&stats, &info);
    }

    let (secs, records, accesses) = decode(&output, 3);
    assert_eq!(accesses, stats.accesses.total);
    println!(
        "{name}: decode-only {secs:.3} s: {records} records ({:.1} M records/s), {accesses} \
         accesses ({:.1} M accesses/s); trace {} bytes",
        records as f64 / secs / 1e6,
        accesses as f64 / secs / 1e6,
        stats.output_bytes.unwrap_or(0)
    );
}

#[test]
#[ignore = "imports the 1.4 GB SeaBIOS log; run with --ignored in release mode"]
fn seabios() {
    import_and_check("seabios");
}

#[test]
#[ignore = "imports the OVMF log; run with --ignored in release mode"]
fn ovmf() {
    import_and_check("ovmf");
}
